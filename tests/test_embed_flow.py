"""The Prefect flow `reindex-archive` on a real Prefect server and Ray, and its nightly deployment."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.embed_helpers import dataset_captions, make_tiny_checkpoint

pytestmark = pytest.mark.integration


def _artifact_markdown(client, flow_run_id) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    arts = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    )
    assert [a.key for a in arts] == ["reindex-archive-report"]
    return arts[0].data


def test_reindex_flow_embeds_new_units_and_reports_counts(prefect_server, ray_local, tmp_path):
    from prefect import get_client

    from flows.reindex import reindex_archive
    from pipelines.shard.job import shard_dataset
    from ssjdn.data.readers import load_dataset
    from ssjdn.data.synthetic import generate_synthetic

    data = generate_synthetic(tmp_path / "data", n_per_class=3, seed=2, size=32, classes=["beach", "forest"])
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.pt", dataset_captions(data))
    archive, store = str(tmp_path / "shards"), str(tmp_path / "store")
    shard_dataset(data, archive, maxcount=2, progress=False)
    n_images = len(load_dataset(data).samples)
    n_shards = len(json.loads((tmp_path / "shards" / "_manifest.json").read_text())["shards"])

    first = reindex_archive(archive, store, str(ckpt), build_ann=True, return_state=True)
    assert first.is_completed(), first
    s1 = first.result()
    assert (s1["new_units"], s1["new_images"], s1["new_captions"]) == (n_shards, n_images, 5 * n_images)
    assert s1["failed_units"] == 0 and s1["ann_recall_at_10"] == 1.0  # a tiny index finds every image
    # the nightly run after nothing landed: nothing embedded, and the report says so
    second = reindex_archive(archive, store, str(ckpt), return_state=True)
    s2 = second.result()
    assert (s2["new_units"], s2["new_images"], s2["model_id"]) == (0, 0, s1["model_id"])

    with get_client(sync_client=True) as client:
        md1 = _artifact_markdown(client, first.state_details.flow_run_id)
        md2 = _artifact_markdown(client, second.state_details.flow_run_id)
        flow = client.read_flow(client.read_flow_run(first.state_details.flow_run_id).flow_id)
    assert flow.name == "reindex-archive"
    assert (
        f"| new units (shards) embedded | **{n_shards}** |" in md1
        and f"| new images | **{n_images}** |" in md1
    )
    assert "| new images | **0** |" in md2 and f"| units already in the store | {n_shards} |" in md2
    assert "ANN index" in md1


def test_reindex_deployment_is_nightly_with_explicit_timezone(prefect_server):
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
        [*prefect, "deploy", "--name", "reindex-archive"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    from prefect import get_client

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("reindex-archive/reindex-archive")
    assert dep.entrypoint == "flows/reindex.py:reindex_archive" and dep.work_pool_name == "ssjdn-process"
    [schedule] = dep.schedules
    assert schedule.active and schedule.schedule.cron == "30 2 * * *"
    assert schedule.schedule.timezone == "Europe/Berlin"
    assert {"archive_url", "store_url", "checkpoint_url"} <= set(dep.parameters)
    assert set(dep.parameter_openapi_schema["required"]) == {"archive_url", "store_url", "checkpoint_url"}
