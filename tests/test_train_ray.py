"""Distributed training end to end on real Ray: checkpoints on the moto S3 server, a worker process killed
mid-epoch, the whole job killed and resumed, a NaN loss, `ray job submit` on a two-node cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import pytest

from pipelines.train.data import assign_shards, lockstep_steps
from pipelines.train.faults import Faults
from pipelines.train.spec import shard_refs
from tests.test_train import make_shards, new_bucket, train_keys

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
RAY_CLI = str(Path(sys.executable).with_name("ray"))
# tiny (GRU, 32 px) at batch 8: about 11 steps per epoch and rank on 168 train samples
TINY = ["--config", "tiny", "--set", "train.batch_size=8"]


@pytest.fixture(scope="module")
def shards(s3_server, tmp_path_factory):
    """240 synthetic samples (168 train in 17 shards, 36 val, 36 test) on the moto S3 server."""
    bucket = new_bucket(s3_server["endpoint_url"], "ray")
    url = f"s3://{bucket}/synthetic"
    manifest = make_shards(tmp_path_factory.mktemp("syn"), url, n_per_class=60, maxcount=10)
    return {"url": url, "bucket": bucket, "manifest": manifest, "keys": train_keys(manifest, url)}


def _steps_until(shards_info, epochs: int, world: int = 2, batch: int = 8) -> int:
    refs = shard_refs(shards_info["manifest"], shards_info["url"], "train")
    return sum(lockstep_steps(assign_shards(refs, world, e, 0), batch) for e in range(1, epochs + 1))


def _run(url: str):
    from pipelines.train.rundir import RunDir

    return RunDir(url)


def _epochs_in(run) -> list[int]:
    return [r["epoch"] for r in run.read_jsonl("metrics.jsonl")]


def _assert_epoch_exact(run, epoch: int, keys: set[str]) -> None:
    plan = run.read_json(f"plan/epoch-{epoch:04d}.json")
    seen = Counter(k for r in plan["ranks"] for k in r["keys"])
    assert seen == Counter(keys), (
        f"epoch {epoch}: missing {keys - set(seen)}, twice {[k for k, n in seen.items() if n > 1]}"
    )
    shard_lists = [set(r["shards"]) for r in plan["ranks"]]
    assert not shard_lists[0] & shard_lists[1]
    assert len({r["digest"] for r in plan["ranks"]}) == 1  # the same weights on every rank


def _alive_train_workers(ray_head) -> int:
    req = urllib.request.Request(
        f"{ray_head['dashboard']}/api/v0/actors?limit=1000",
        headers={"Authorization": f"Bearer {ray_head['token']}"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        actors = json.loads(resp.read())["data"]["result"]["result"]
    return sum(a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE" for a in actors)


def _driver(ray_head, args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.train", *TINY, "--address", ray_head["address"], *args],
        cwd=REPO,
        env={**os.environ, **ray_head["env"], **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_ray_job_submit_on_two_nodes_survives_a_killed_worker(ray_head, shards, s3_server):
    """`ray job submit` -> SUCCEEDED on a two-raylet cluster, one worker per node (SPREAD), disjoint shards per
    node, identical weights; the worker on one node is SIGKILLed mid-epoch and the run resumes from the
    mid-epoch checkpoint, sees every sample of the epoch exactly once and trains exactly the 1 epoch asked."""
    from ray.job_submission import JobSubmissionClient

    from ssjdn.checkpoint import load_checkpoint

    storage = f"s3://{new_bucket(s3_server['endpoint_url'], 'runs')}/runs"
    kill_at = 5  # one step after the mid-epoch checkpoint at step 4
    sid = f"ssjdn-test-{uuid.uuid4().hex[:8]}"
    cmd = [
        RAY_CLI,
        "job",
        "submit",
        "--address",
        ray_head["dashboard"],
        "--working-dir",
        str(REPO),
        "--submission-id",
        sid,
        "--runtime-env-json",
        json.dumps({"env_vars": Faults(kill_at_step=kill_at).env()}),
        "--",
        sys.executable,
        "-m",
        "pipelines.train",
        *TINY,
        "--shards",
        shards["url"],
        "--storage",
        storage,
        "--name",
        "two-nodes",
        "--workers",
        "2",
        "--placement",
        "SPREAD",
        "--epochs",
        "1",
        "--checkpoint-every",
        "4",
        "--audit-keys",
        "--progress-every",
        "4",
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, **ray_head["env"]}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    client = JobSubmissionClient(
        ray_head["dashboard"], headers={"Authorization": f"Bearer {ray_head['token']}"}
    )
    assert client.get_job_status(sid) == "SUCCEEDED"
    assert "SSJDN_TRAIN_SUMMARY" in proc.stdout

    run = _run(f"{storage}/two-nodes")
    assert _epochs_in(run) == [0, 1]
    attempts = run.read_jsonl("attempts.jsonl")
    assert len(attempts) == 2, attempts
    for a in attempts:
        assert len({w["node_id"] for w in a["workers"]}) == 2  # one worker per raylet
    resumed = attempts[1]["resumed_from"]
    assert resumed == f"{storage}/two-nodes/checkpoint-e0000-s{kill_at - 1:07d}-m", (
        resumed
    )  # right before the kill
    assert attempts[1]["mid_epoch"] and attempts[1]["step"] == kill_at - 1
    _assert_epoch_exact(
        run, 1, shards["keys"]
    )  # across the kill: disjoint shards per node, same weights, once each
    plan = run.read_json("plan/epoch-0001.json")
    assert len({r["node_id"] for r in plan["ranks"]}) == 2
    names = run.checkpoints()
    assert names[-1].startswith("checkpoint-e0001-") and len(names) <= 2
    ckpt = load_checkpoint(run.fs.cat_file(run.path(f"{names[-1]}/checkpoint.pt")))
    assert (
        ckpt["epoch"] == 1 and ckpt["step"] == _steps_until(shards, 1) and ckpt["extra"]["position"] is None
    )
    assert (
        ckpt["optimizer"] is not None and ckpt["scheduler"] is not None and ckpt["config"]["name"] == "tiny"
    )
    assert run.read_json("best/metrics.json")["epoch"] == 1 and run.exists("best/checkpoint.pt")
    assert run.read_json("summary.json")["epochs"] == 1


def test_whole_job_killed_resumes_then_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    ray_head, shards, s3_server
):
    from ssjdn.checkpoint import load_checkpoint

    storage = f"s3://{new_bucket(s3_server['endpoint_url'], 'runs')}/runs"
    common = [
        "--shards",
        shards["url"],
        "--storage",
        storage,
        "--name",
        "job-kill",
        "--workers",
        "2",
        "--epochs",
        "3",
        "--progress-every",
        "2",
    ]
    run = _run(f"{storage}/job-kill")

    # 1. the whole job (driver, controller, workers) dies by SIGKILL in epoch 2, once Ray has committed the
    #    checkpoint of epoch 1 (its snapshot lists it; a checkpoint reported but not yet committed is lost)
    first = _driver(ray_head, common)
    deadline = time.monotonic() + 300
    while True:
        progress = run.read_json("progress.json") or {}
        snapshot = run.read_json("checkpoint_manager_snapshot.json") or {}
        if (
            (progress.get("epoch", 0) >= 2 and snapshot.get("latest_checkpoint_result"))
            or first.poll() is not None
            or time.monotonic() > deadline
        ):
            break
        time.sleep(0.5)
    assert first.poll() is None, (
        f"the first job ended before it could be killed:\n{first.stdout.read()[-3000:]}"
    )
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    while _alive_train_workers(ray_head) and time.monotonic() < deadline:  # Ray reaps the dead job's workers
        time.sleep(0.5)

    # 2. started again with --resume auto: continues from that checkpoint (not epoch 0); a NaN loss at its first
    #    step stops it with a clear error, and that checkpoint stays the last good one
    snapshot = run.read_json("checkpoint_manager_snapshot.json")
    good_name = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    good = f"{storage}/job-kill/{good_name}"
    nan_at = int(good_name.split("-s")[1][:7]) + 1
    done = int(good_name.split("-e")[1][:4])
    before = run.checkpoints()
    second = _driver(ray_head, [*common, "--resume", "auto"], **Faults(nan_at_step=nan_at).env())
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 1, out[-4000:]
    attempts = run.read_jsonl("attempts.jsonl")
    assert len(attempts) >= 2, out[-5000:]
    restart = attempts[1]
    assert (restart["resumed_from"], restart["epochs_done"], restart["step"]) == (good, done, nan_at - 1), (
        restart
    )
    assert done >= 1 and _epochs_in(run) == list(
        range(done + 1)
    )  # metrics follow the checkpoint resumed from
    assert "NonFiniteLoss" in out and f"epoch {done + 1}, step {nan_at}" in out, out[-3000:]
    assert f"Last good checkpoint: {good};" in out, out[-3000:]
    ckpt = load_checkpoint(run.fs.cat_file(run.path(f"{good_name}/checkpoint.pt")))
    assert ckpt["epoch"] == done and all(
        bool(v.isfinite().all()) for v in ckpt["model"].values() if v.is_floating_point()
    )
    assert run.checkpoints() == before  # the failed attempt wrote no checkpoint
    names = [p.rsplit("/", 1)[-1] for p in run.fs.ls(run.root, detail=False)]
    assert "fatal.json" not in names and any(
        n.startswith("fatal-") for n in names
    )  # archived: a re-run continues
