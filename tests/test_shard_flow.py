"""The Prefect flow `shard-dataset` against a real Prefect server, and the deployment in prefect.yaml."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipelines.fsio import StorageError
from pipelines.shard.read import read_manifest
from ssjdn.data.readers import load_dataset
from ssjdn.data.synthetic import generate_synthetic
from tests.conftest import REPO
from tests.fixtures_prefect import flush_run_logs
from tests.test_shard import read_back

pytestmark = pytest.mark.integration


def test_shard_dataset_flow_writes_shards_and_records_the_run(prefect_server, s3_bucket, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    from flows.shard import shard_dataset_flow

    data = generate_synthetic(tmp_path / "syn", n_per_class=3, size=32, seed=5)
    dest = f"s3://{s3_bucket}/flow"
    state = shard_dataset_flow(
        dataset=str(data), dest=dest, maxcount=4, validation="full", return_state=True
    )
    assert state.is_completed(), state
    summary = state.result()
    expected = load_dataset(data)
    assert summary["samples"] == 30 and summary["splits"] == expected.split_counts() and summary["bad"] == 0
    assert summary["manifest"] == f"{dest}/_manifest.json"
    assert read_manifest(dest)["options"]["validate"] == "full"
    assert set(read_back(dest)) == {s.key for s in expected.samples}

    run_id = state.state_details.flow_run_id
    flush_run_logs()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        assert client.read_flow(run.flow_id).name == "shard-dataset"
        assert run.state.is_completed()
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        names = sorted(t.name.rsplit("-", 1)[0] for t in tasks)
        assert names == ["shard"]  # the flow is thin: one task calls the pipeline
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)
        messages = "\n".join(log.message for log in logs)
    assert f"committed {dest}/_manifest.json" in messages
    assert f"{summary['shards']} shard(s) ({summary['shards']} written, 0 already committed)" in messages


def test_flow_tasks_retry_storage_errors_only(prefect_server):
    from prefect import flow, task

    from flows.retries import retry_on_storage_error

    calls: list[str] = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_on_storage_error)
    def flaky(kind: str) -> int:
        calls.append(kind)
        if kind == "storage" and calls.count(kind) < 3:
            raise StorageError(
                "write s3://b/x: storage still failing after 1 retries: EndpointConnectionError"
            )
        if kind == "data":
            raise ValueError("bad data does not heal")
        return calls.count(kind)

    @flow
    def probe(kind: str):
        return flaky(kind, return_state=True)

    assert probe("storage").result() == 3  # failed twice on storage, retried, then succeeded
    state = probe("data", return_state=True)
    assert state.is_failed() and calls.count("data") == 1  # not retried


def test_prefect_yaml_deploys(prefect_server):
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
        [*prefect, "deploy", "--all"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    from prefect import get_client

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("shard-dataset/shard-dataset")
    assert dep.work_pool_name == "ssjdn-process"
    assert dep.entrypoint == "flows/shard.py:shard_dataset_flow"
    assert dep.job_variables["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"] == "pipelines"
    assert {"dataset", "dest", "maxcount", "validation"} <= set(dep.parameter_openapi_schema["properties"])
    assert set(dep.parameter_openapi_schema["required"]) == {"dataset", "dest"}
    assert dep.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)
