"""Shard and tile jobs as Ray tasks on a real two-raylet cluster (`ray_head`): spread over both nodes with the
bytes of a single-machine run, a node killed mid-run, the driver killed and the command run again, sentinel
credentials on an S3 destination, and a node that cannot reach a source. Every run is a real
`python -m pipelines.<job> ... --ray ADDRESS` process; a test hook (`SSJDN_SHARD_FAULTS`) slows jobs down for
the kill tests instead of big data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import boto3
import pytest

from pipelines.shard.job import shard_dataset
from pipelines.shard.read import open_split, read_manifest
from ssjdn.data.readers import load_dataset
from ssjdn.data.synthetic import generate_synthetic
from tests.conftest import REPO
from tests.fixtures_ray import ExtraNode, _nodes
from tests.test_secrets import SENTINELS, _grep_tree

pytestmark = pytest.mark.integration

MAXCOUNT = 2  # 40 samples -> 20 shard jobs: enough to spread, and to kill something mid-run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny synthetic dataset and the shards a single-machine run (local pool) writes from it."""
    root = tmp_path_factory.mktemp("shard-ray")
    ds = generate_synthetic(root / "syn", n_per_class=4, size=32, seed=3)
    ref = shard_dataset(ds, str(root / "reference"), maxcount=MAXCOUNT, workers=1, progress=False)
    keys = [s.key for s in load_dataset(ds).samples]
    return {"path": ds, "root": root, "sha": _shas(ref.manifest), "keys": keys}


def _shas(manifest: dict) -> dict[str, str]:
    return {e["path"]: e["sha256"] for e in manifest["shards"]}


def _records(dest: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((dest / "_stats").glob("*/shard-*.json"))]


def _keys(dest: str) -> Counter:
    return Counter(s["key"] for split in read_manifest(dest)["splits"] for s in open_split(dest, split))


def _env(ray_head, faults: dict | None = None, **extra: str) -> dict[str, str]:
    env = {**os.environ, **ray_head["env"], "PYTHONUNBUFFERED": "1", **extra}
    env.pop("RAY_ADDRESS", None)
    if faults:
        env["SSJDN_SHARD_FAULTS"] = json.dumps(faults)
    return env


def _shard_cmd(ray_head, data, dest: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipelines.shard",
        str(data["path"]),
        dest,
        "--maxcount",
        str(MAXCOUNT),
        "--no-progress",
        "--ray",
        ray_head["address"],
        *extra,
    ]


def _run(cmd: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def third_node(ray_head, tmp_path_factory):
    """A third raylet joined to the session cluster, started with sentinel credentials in its environment and
    a custom resource of its own (jobs can be steered to it). The kill test kills it; never the session's."""
    node = ExtraNode(ray_head, num_cpus=2, env=SENTINELS, log=tmp_path_factory.mktemp("node") / "node.log")
    yield node
    if node.proc.poll() is None:
        node.stop()


def _alive(ray_head) -> set[str]:
    return {n["node_id"] for n in _nodes(ray_head["dashboard"], ray_head["token"]) if n["state"] == "ALIVE"}


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before the kill: {proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the run to get going")
        time.sleep(0.05)


def test_driver_killed_mid_run_then_the_same_command_resumes(ray_head, data, tmp_path):
    dest = tmp_path / "out"
    cmd = _shard_cmd(ray_head, data, str(dest))
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=_env(ray_head, {"job_delay_s": 0.3}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for(lambda: len(_records(dest)) >= 2, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    committed = len(_records(dest))
    assert not (dest / "_manifest.json").exists() and committed < 20

    again = _run(cmd, _env(ray_head))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    written, skipped = (
        int(x) for x in again.stdout.split(" shards (")[1].split(" already")[0].split(" written, ")
    )
    assert skipped >= committed and written + skipped == 20, again.stdout
    assert _shas(read_manifest(str(dest))) == data["sha"]


def test_s3_destination_with_sentinel_credentials_leaves_them_nowhere(
    ray_head, data, third_node, s3_server, tmp_path
):
    """The raylet that runs the jobs and the driver hold sentinel credentials (moto takes any); nothing passes
    them through Ray, so no file of the Ray session, no log and no output may hold them."""
    bucket = f"sentinel-ray-{os.getpid()}"
    s3 = boto3.client("s3", endpoint_url=s3_server["endpoint_url"])
    s3.create_bucket(Bucket=bucket)
    node = third_node
    dest = f"s3://{bucket}/shards"
    cmd = _shard_cmd(ray_head, data, dest, "--ray-resource", node.resource, "--maxcount", "10")
    done = _run(cmd, _env(ray_head, **SENTINELS))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert read_manifest(dest)["totals"]["samples"] == len(data["keys"])
    nodes = set()
    objects = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            objects[obj["Key"]] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            if obj["Key"].startswith("shards/_stats/") and obj["Key"].endswith(".json"):
                nodes.add(json.loads(objects[obj["Key"]]).get("node"))
    nodes.discard(None)  # run.json has no node
    assert nodes == {node.node_id}  # every job ran on the sentinel node

    needles = [v.encode() for v in SENTINELS.values()]
    hits = [f"output: {n.decode()}" for n in needles if n.decode() in done.stdout + done.stderr]
    hits += [f"s3 object {k}: {n.decode()}" for k, d in objects.items() for n in needles if n in d]
    session = ray_head["tmp"] / "ray"
    assert list(session.rglob("*.log")), "no Ray logs found: the search would prove nothing"
    hits += _grep_tree(session, needles)
    hits += _grep_tree(tmp_path, needles)
    assert not hits, "\n".join(hits)


def test_jobs_spread_over_the_nodes_and_a_node_killed_mid_run_leaves_the_same_bytes(
    ray_head, data, third_node, tmp_path
):
    """Jobs go to every node (records name both session raylets), one node is SIGKILLed while it holds a job:
    the job is submitted again elsewhere, and every shard is byte-identical to a single-machine run, each sample
    once. (Jobs of 0.8 s: a tiny job would be done before the other nodes' workers have started.)"""
    session_nodes = _alive(ray_head) - {third_node.node_id}
    extra = third_node
    started = tmp_path / "started"
    started.mkdir()
    dest = tmp_path / "out"
    env = _env(ray_head, {"job_delay_s": 0.8, "started_dir": str(started)})
    proc = subprocess.Popen(
        _shard_cmd(ray_head, data, str(dest)),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        # Kill the extra node while it holds a job (its marker is there, the job sleeps before writing).
        _wait_for(lambda: any(p.name.startswith(extra.node_id) for p in started.iterdir()), proc)
        extra.kill()
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    assert "Ray task lost" in out  # the job on the dead node was submitted again elsewhere
    manifest = read_manifest(str(dest))
    assert _shas(manifest) == data["sha"]  # every shard byte-identical to the local pool's
    seen = _keys(str(dest))
    assert set(seen) == set(data["keys"]) and max(seen.values()) == 1  # the input, each sample once
    nodes = Counter(r["node"] for r in _records(dest))
    assert session_nodes <= set(nodes) <= session_nodes | {extra.node_id}, nodes  # both raylets wrote shards
    assert all("node" not in e for e in manifest["shards"])  # the manifest is as it was


def test_a_node_that_cannot_reach_a_source_is_named_with_the_url_and_reason(ray_head, data, tmp_path):
    source = next(s.source for s in load_dataset(data["path"]).samples)
    dest = tmp_path / "out"
    cmd = _shard_cmd(ray_head, data, str(dest), "--retries", "1", "--retry-backoff", "0.05")
    done = _run(cmd, _env(ray_head, {"unreachable": Path(source).name}))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    [line] = [x for x in done.stderr.splitlines() if "error:" in x]
    node = line.split(" node ")[1].split(" ")[0]
    assert node in _alive(ray_head), line
    assert f"cannot reach {source}: ConnectionRefusedError" in line and "1 of 20 shard job(s) failed" in line
    assert "run the same command again to resume" in line
    assert not (dest / "_manifest.json").exists()


def test_ray_address_that_cannot_work_is_one_line(data, tmp_path):
    from pipelines.errors import PipelineError
    from pipelines.shard.options import ShardOptions
    from pipelines.tile.options import TileOptions

    for cls in (ShardOptions, TileOptions):
        with pytest.raises(PipelineError, match="--ray 'http://head:8265'.*ray job submit"):
            cls(ray="http://head:8265")
    done = _run(
        [
            sys.executable,
            "-m",
            "pipelines.shard",
            str(data["path"]),
            str(tmp_path / "x"),
            "--ray",
            "127.0.0.1:9",
        ],
        {**os.environ, "RAY_ADDRESS": ""},
        timeout=120,
    )
    assert done.returncode == 1 and "--ray 127.0.0.1:9: cannot join the Ray cluster" in done.stderr, (
        done.stderr
    )
    assert len(done.stderr.strip().splitlines()) <= 3  # the error line (and where library logs went)
