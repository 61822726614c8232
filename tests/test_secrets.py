"""Credentials never land in a log, a file or an output: every job runs with sentinel credentials (on the moto
S3 server, which accepts any), then every file Ray, Prefect and the jobs wrote is searched for them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest

from ssjdn.data.synthetic import generate_synthetic
from tests.conftest import REPO
from tests.embed_helpers import dataset_captions, make_tiny_checkpoint

pytestmark = pytest.mark.integration

SENTINELS = {
    "AWS_ACCESS_KEY_ID": "AKIASENTINEL7KEYID42",
    "AWS_SECRET_ACCESS_KEY": "SENTINELsecret7value42",
    "AWS_SESSION_TOKEN": "SENTINELsession7token42",
    "HF_TOKEN": "hf_SENTINEL7token42",
}


def _grep_tree(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            hits += [f"{path}: {n.decode()}" for n in needles if n in data]
    return hits


@pytest.fixture(scope="module")
def sentinel_run(s3_server, prefect_server, tmp_path_factory):
    """Shard, embed, query, train and the shard-dataset Prefect flow, each a real process with sentinel credentials
    (the embed job inside the reindex flow is the same job as `ssjdn embed`: covered by the embed run)."""
    work = tmp_path_factory.mktemp("secrets")
    # Short: Ray's socket paths under it must stay within the 107-byte limit of Unix sockets.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    bucket = "sentinel-secrets"
    boto3.client("s3", endpoint_url=s3_server["endpoint_url"]).create_bucket(Bucket=bucket)
    data = generate_synthetic(work / "syn", n_per_class=4, size=32, seed=11)
    ckpt = make_tiny_checkpoint(work / "tiny.pt", dataset_captions(data))
    env = {
        **os.environ,
        **prefect_server["env"],
        **SENTINELS,
        "RAY_TMPDIR": str(ray_tmp),
        "SSJDN_CACHE_DIR": str(work / "cache"),
        "PYTHONUNBUFFERED": "1",
    }
    s3 = f"s3://{bucket}"
    flow = "from flows.{0} import {1}; print({1}({2}))"
    commands = {
        "shard": [
            "-m",
            "ssjdn_cli.main",
            "shard",
            str(data),
            f"{s3}/shards",
            "--maxcount",
            "4",
            "--no-progress",
        ],
        "embed": [
            "-m",
            "ssjdn_cli.main",
            "embed",
            f"{s3}/shards",
            f"{s3}/store",
            "--checkpoint",
            str(ckpt),
            "--captions",
            "--no-progress",
        ],
        "query": [
            "-m",
            "ssjdn_cli.main",
            "query",
            "a green field",
            "--store",
            f"{s3}/store",
            "-k",
            "3",
            "--json",
        ],
        "train": [
            "-m",
            "pipelines.train",
            "--config",
            "tiny",
            "--set",
            "train.batch_size=8",
            "--set",
            "model.lsd_cfg.num_classes=10",
            "--shards",
            f"{s3}/shards",
            "--storage",
            f"{s3}/runs",
            "--workers",
            "1",
            "--epochs",
            "1",
        ],
        "shard-flow": [
            "-c",
            flow.format("shard", "shard_dataset_flow", f"dataset={str(data)!r}, dest='{s3}/flow'"),
        ],
    }
    outputs = {}

    def run(*names: str) -> None:
        for name in names:
            done = subprocess.run(
                [sys.executable, *commands[name]],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            outputs[name] = (done.returncode, done.stdout + done.stderr)

    # The shards first; then the jobs that read them side by side (each its own process and Ray instance:
    # most of their time is start-up, which overlaps well), the query after the embedding it reads.
    run("shard")
    with ThreadPoolExecutor(max_workers=4) as pool:
        chains = (("embed", "query"), ("train",), ("shard-flow",))
        for done in [pool.submit(run, *chain) for chain in chains]:
            done.result()  # a timeout fails the fixture instead of leaving a job out of `outputs`
    assert set(outputs) == set(commands)
    objects = {}
    client = boto3.client("s3", endpoint_url=s3_server["endpoint_url"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            objects[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    yield {"outputs": outputs, "objects": objects, "trees": [ray_tmp, work, Path(prefect_server["home"])]}
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_every_job_ran(sentinel_run):
    failed = {k: out[-6000:] for k, (code, out) in sentinel_run["outputs"].items() if code != 0}
    assert not failed, failed
    keys = sentinel_run["objects"]
    assert "shards/_manifest.json" in keys and "flow/_manifest.json" in keys
    assert any(k.startswith("store/") and k.endswith("_manifest.json") for k in keys)
    assert any(k.startswith("runs/") for k in keys)


def test_no_sentinel_in_any_output_log_or_file(sentinel_run):
    needles = [v.encode() for v in SENTINELS.values()]
    hits = [
        f"output of {k}: {n.decode()}"
        for k, (_, out) in sentinel_run["outputs"].items()
        for n in needles
        if n.decode() in out
    ]
    hits += [
        f"s3 object {k}: {n.decode()}"
        for k, data in sentinel_run["objects"].items()
        for n in needles
        if n in data
    ]
    for tree in sentinel_run["trees"]:
        hits += _grep_tree(tree, needles)
    # The search itself works: the Ray session folder is there and holds logs.
    assert list(sentinel_run["trees"][0].rglob("*.log")), "no Ray logs found: the search would prove nothing"
    assert not hits, "\n".join(hits)
