"""The Prefect flow `tile-archive` against a real Prefect server (scenes and chips on the moto S3 server), a
nightly re-run that tiles only the new scene, and its deployment in prefect.yaml."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import boto3
import pytest

from pipelines.shard.read import read_manifest
from tests import tile_support as ts
from tests.conftest import REPO
from tests.fixtures_prefect import flush_run_logs

pytestmark = pytest.mark.integration


def test_tile_archive_flow_tiles_new_scenes_and_logs_where_they_went(prefect_server, s3_server, s3_bucket):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    from flows.tile import tile_archive

    s3 = boto3.client("s3", endpoint_url=s3_server["endpoint_url"])
    s3.upload_file(str(ts.GEOTIFF / "world.rgb.tif"), s3_bucket, "scenes/world.rgb.tif")
    source, dest = f"s3://{s3_bucket}/scenes", f"s3://{s3_bucket}/chips"
    state = tile_archive(source=source, dest=dest, chip_size=128, return_state=True)
    assert state.is_completed(), state
    summary = state.result()
    assert (summary["chips"], summary["scenes"], summary["scenes_tiled"], summary["written"]) == (8, 1, 1, 1)
    assert (
        summary["manifest"] == f"{dest}/_manifest.json" and read_manifest(dest)["options"]["chip_size"] == 128
    )

    run_id = state.state_details.flow_run_id
    flush_run_logs()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        assert client.read_flow(run.flow_id).name == "tile-archive"
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        assert sorted(t.name.rsplit("-", 1)[0] for t in tasks) == ["tile"]
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)
        messages = "\n".join(log.message for log in logs)
    assert f"committed {dest}/_manifest.json: 8 chips of 1 scene(s)" in messages

    s3.upload_file(str(ts.GEOTIFF / "shade.tif"), s3_bucket, "scenes/shade.tif")  # the next night's delivery
    again = tile_archive(source=source, dest=dest, chip_size=128)
    assert (again["scenes"], again["scenes_tiled"], again["scenes_unchanged"]) == (2, 1, 1)
    assert again["chips"] >= 8


def test_tile_archive_deployment_is_nightly(prefect_server):
    env = {**os.environ, **prefect_server["env"]}
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    subprocess.run(
        [*prefect, "work-pool", "create", "ssjdn-process", "--type", "process", "--overwrite"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    done = subprocess.run(
        [*prefect, "deploy", "--name", "tile-archive"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    from prefect import get_client

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("tile-archive/tile-archive")
    assert dep.entrypoint == "flows/tile.py:tile_archive" and dep.work_pool_name == "ssjdn-process"
    [schedule] = dep.schedules
    assert (
        schedule.active
        and schedule.schedule.cron == "30 1 * * *"
        and schedule.schedule.timezone == "Europe/Berlin"
    )
    assert {"source", "dest", "chip_size", "gsd", "bands", "scale", "max_nodata"} <= set(
        dep.parameter_openapi_schema["properties"]
    )
    assert set(dep.parameter_openapi_schema["required"]) == {"source", "dest"}


def test_tile_archive_flow_submits_a_ray_job_with_the_bytes_of_a_local_run(
    prefect_server, ray_head, tmp_path, monkeypatch
):
    """`ray_address=http://HEAD:8265`: the flow submits `python -m pipelines.tile ... --ray auto` to the two-node
    test cluster (chips written by Ray tasks, the same distributor as `ssjdn shard --ray`), streams the job's
    log into the flow run's log; the shards are byte for byte those of a local run."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.tile import tile_archive
    from pipelines.tile.job import tile_scenes

    for k, v in ray_head["env"].items():
        monkeypatch.setenv(k, v)
    scene = ts.GEOTIFF / "world.rgb.tif"
    local = tile_scenes(scene, str(tmp_path / "local"), chip_size=128, maxcount=2, workers=1, progress=False)
    dest = str(tmp_path / "ray")
    state = tile_archive(
        source=str(scene),
        dest=dest,
        chip_size=128,
        maxcount=2,
        ray_address=ray_head["dashboard"],
        python=sys.executable,
        upload_code=False,
        return_state=True,
    )
    assert state.is_completed(), state
    summary = state.result()
    assert (summary["chips"], summary["shards"], summary["written"], summary["scenes_tiled"]) == (8, 4, 4, 1)
    manifest = read_manifest(dest)
    assert [(e["path"], e["sha256"]) for e in manifest["shards"]] == [
        (e["path"], e["sha256"]) for e in local.manifest["shards"]
    ]
    records = [json.loads(p.read_text()) for p in (tmp_path / "ray" / "_stats").rglob("shard-*.json")]
    assert len(records) == 4 and all(len(r["node"]) == 56 for r in records)  # Ray node ids wrote them
    flush_run_logs()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])), limit=200
        )
    messages = "\n".join(log.message for log in logs)
    assert "4 shard job(s) as Ray tasks on auto" in messages  # the job's own log, streamed
    assert f"{dest}/_manifest.json: 8 chips" in messages
