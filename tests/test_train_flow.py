"""Prefect deployment `train-ssjdn` end to end: a real Prefect server, the process work pool made by
infra/prefect/setup-work-pool.sh, `prefect deploy`, a process worker, `prefect deployment run --watch`; the flow
submits the training as a Ray job to the two-node test cluster and publishes the metrics as a table artifact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_prefect import stop_process_group
from tests.test_train import make_shards, new_bucket

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _prefect(args: list[str], env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_prefect_deployment_trains_as_a_ray_job(prefect_server, ray_head, s3_server, tmp_path):
    bucket = new_bucket(s3_server["endpoint_url"], "flow")
    shards = f"s3://{bucket}/synthetic"
    make_shards(tmp_path, shards, n_per_class=20, maxcount=10)
    storage = f"s3://{bucket}/runs"
    env = {
        **os.environ,
        **prefect_server["env"],
        **ray_head["env"],
        "PREFECT": PREFECT,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
    }

    setup = subprocess.run(
        ["bash", str(REPO / "infra/prefect/setup-work-pool.sh")],
        cwd=REPO,
        env={**env, "DEPLOY": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert setup.returncode == 0, setup.stdout + setup.stderr
    deploy = _prefect(["--no-prompt", "deploy", "--name", "train-ssjdn"], env)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    worker_log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "ssjdn-process", "--type", "process"],
        cwd=REPO,
        env=env,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        params = {
            "config": "tiny",
            "shards": shards,
            "storage": storage,
            "workers": 2,
            "epochs": 1,
            "ray_address": ray_head["dashboard"],
            "python": sys.executable,
            "name": "from-prefect",
            "overrides": {"train.batch_size": 8},
        }
        run = _prefect(
            [
                "deployment",
                "run",
                "train-ssjdn/train-ssjdn",
                "--params",
                json.dumps(params),
                "--watch",
                "--watch-timeout",
                "600",
            ],
            env,
            timeout=700,
        )
        assert run.returncode == 0, (
            run.stdout[-3000:] + run.stderr[-3000:] + (tmp_path / "worker.log").read_text()[-5000:]
        )
    finally:
        # SIGTERM first, SIGKILL if a loaded box keeps the worker from exiting in time.
        stop_process_group(worker)
        worker_log.close()

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def artifact_and_logs():
        async with get_client() as client:
            arts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["train-ssjdn-metrics"]))
            )
            logs: list = []
            while batch := await client.read_logs(limit=200, offset=len(logs)):
                logs += batch
            return arts, logs

    import asyncio

    arts, logs = asyncio.run(artifact_and_logs())
    assert arts, "no table artifact"
    # The session's Prefect server is shared (the demo flow also trains): this run's artifact is the newest.
    newest = max(arts, key=lambda a: a.created)
    table = json.loads(newest.data) if isinstance(newest.data, str) else newest.data
    assert [row["epoch"] for row in table] == [0, 1] and all("val_mR" in row for row in table)
    messages = "\n".join(log.message for log in logs)
    assert (
        "submitted Ray job ssjdn-train-from-prefect-" in messages or "ssjdn-train-from-prefect-" in messages
    )
    assert "epoch 1/1" in messages  # the Ray job's own log lines, streamed into the flow run's log

    from pipelines.train.rundir import RunDir

    run_dir = RunDir(f"{storage}/from-prefect")
    assert [r["epoch"] for r in run_dir.read_jsonl("metrics.jsonl")] == [0, 1] and run_dir.checkpoints()


def test_job_submission_is_idempotent_and_fails_with_the_job(ray_head, monkeypatch):
    """The submission path of the flow against the real job server: a deterministic id attaches to a finished
    job instead of submitting twice; a failing job raises with Ray's reason and its log; a retry submits -1."""
    import shlex
    import uuid

    from pipelines.train.submit import JobFailedError, submission_base, submit_and_wait

    for k, v in ray_head["env"].items():
        monkeypatch.setenv(k, v)
    lines: list[str] = []
    ok = shlex.join([sys.executable, "-c", 'print("SSJDN_TRAIN_SUMMARY " + \'{"epochs": 1}\')'])
    base = submission_base(f"ok-{uuid.uuid4().hex[:6]}", salt="flow-run-1")
    assert submission_base("r", salt="a") == submission_base("r", salt="a") != submission_base("r", salt="b")
    first = submit_and_wait(ray_head["dashboard"], ok, base, sink=lines.append, poll_s=0.5)
    assert (first.submission_id, first.status, first.summary) == (f"{base}-0", "SUCCEEDED", {"epochs": 1})
    assert any("SSJDN_TRAIN_SUMMARY" in line for line in lines)  # streamed
    again = submit_and_wait(ray_head["dashboard"], ok, base, sink=lines.append, poll_s=0.5)
    assert again.submission_id == f"{base}-0"  # attached, not submitted twice

    bad = shlex.join([sys.executable, "-c", "import sys; print('boom in the job'); sys.exit(3)"])
    base_bad = submission_base(f"bad-{uuid.uuid4().hex[:6]}")
    with pytest.raises(JobFailedError, match=rf"{base_bad}-0 FAILED(.|\n)*boom in the job"):
        submit_and_wait(ray_head["dashboard"], bad, base_bad, sink=lines.append, poll_s=0.5)
    with pytest.raises(JobFailedError, match=rf"{base_bad}-1 FAILED"):  # a retry is a new attempt
        submit_and_wait(ray_head["dashboard"], bad, base_bad, sink=lines.append, poll_s=0.5)
