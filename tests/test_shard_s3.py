"""Sharding real data to a real S3 endpoint (moto server over HTTP on 127.0.0.1): read-back, kill -9 and resume,
the endpoint going away mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from pipelines.fsio import get_fs
from pipelines.shard.job import shard_dataset
from pipelines.shard.read import read_manifest
from ssjdn.data.readers import load_dataset
from tests.conftest import REPO, _free_port
from tests.test_shard import read_back

pytestmark = pytest.mark.integration


def assert_exactly_the_input(back: dict[str, dict], samples) -> None:
    """Same keys, every image byte-identical to its source file, captions and split as listed."""
    assert sorted(back) == sorted(s.key for s in samples)
    for s in samples:
        got = back[s.key]
        assert got["image"] == Path(s.source).read_bytes(), s.key
        assert got["meta"]["captions"] == s.captions and got["split"] == s.split


def shard_cli(dataset, dest, *extra, env=None) -> subprocess.Popen:
    """`ssjdn shard` as a real process (own process group, so a kill takes its workers too)."""
    return subprocess.Popen(
        [sys.executable, "-m", "ssjdn_cli.main", "shard", str(dataset), dest, "--no-progress", *extra],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_ucm_to_s3_reads_back_byte_identical(ucm_dir, s3_bucket):
    dest = f"s3://{s3_bucket}/ucm"
    result = shard_dataset(ucm_dir, dest, maxcount=500, workers=2, progress=False)
    m = read_manifest(dest)
    assert m == result.manifest
    assert {k: v["samples"] for k, v in m["splits"].items()} == {"train": 1680, "val": 110, "test": 210}
    assert (m["totals"]["samples"], m["totals"]["captions"], m["bad"]["count"]) == (2000, 10000, 0)
    assert len(m["classes"]) == 21

    back = read_back(dest)  # plain webdataset.WebDataset, shards opened through fsspec
    assert len(back) == 2000 and sum(len(s["meta"]["captions"]) for s in back.values()) == 10000
    assert_exactly_the_input(back, load_dataset(ucm_dir).samples)

    fs, root = get_fs(dest)
    fs.invalidate_cache()
    stored = sorted(p.removeprefix(root + "/") for p in fs.find(root))
    shards = sorted(e["path"] for e in m["shards"])
    assert [p for p in stored if p.endswith(".tar")] == shards  # no temporary object left anywhere
    assert not [p for p in stored if p.startswith("_tmp/")]
    assert [fs.info(f"{root}/{p}")["size"] for p in shards] == [
        next(e["bytes"] for e in m["shards"] if e["path"] == p) for p in shards
    ]


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended (rc={proc.returncode}) before {what}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _committed_records(fs, root: str) -> list[str]:
    fs.invalidate_cache()
    try:
        return [p for p in fs.find(f"{root}/_stats") if p.endswith(".json") and not p.endswith("run.json")]
    except FileNotFoundError:
        return []


def test_killed_run_resumes_to_exactly_the_input(ucm_dir, s3_bucket):
    dest = f"s3://{s3_bucket}/crash"
    fs, root = get_fs(dest)
    splits = ("val", "test")  # 320 real images in 7 + 14 shards: enough to be killed halfway
    proc = shard_cli(ucm_dir, dest, "--splits", ",".join(splits), "--maxcount", "16", "--workers", "2")
    try:
        _wait_for(lambda: len(_committed_records(fs, root)) >= 4, 90, "4 committed shards", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the real thing: no cleanup, no atexit, workers included
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/_manifest.json")
    done_before = len(_committed_records(fs, root))
    assert done_before < 21  # killed halfway

    again = shard_dataset(ucm_dir, dest, splits=splits, maxcount=16, workers=1, progress=False)
    assert again.skipped >= done_before and again.written >= 1  # committed shards are not redone
    assert again.written + again.skipped == 21
    back = read_back(dest)
    assert_exactly_the_input(back, [s for s in load_dataset(ucm_dir).samples if s.split in splits])


@pytest.fixture
def own_s3_server(s3_server):
    """A second moto server (same in-process backend as the shared one) that this test may stop and restart."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)]
    servers[0].start()

    def restart():
        servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
        servers[-1].start()

    yield {"endpoint_url": f"http://127.0.0.1:{port}", "stop": lambda: servers[-1].stop(), "restart": restart}
    try:
        servers[-1].stop()
    except Exception:
        pass


def test_endpoint_lost_mid_run_fails_clearly_and_a_rerun_completes(ucm_dir, s3_bucket, own_s3_server):
    endpoint = own_s3_server["endpoint_url"]
    dest = f"s3://{s3_bucket}/outage"
    options = {"endpoint_url": endpoint}
    fs, root = get_fs(dest, options)
    args = [
        "--splits",
        "val",
        "--maxcount",
        "10",
        "--workers",
        "1",
        "--retries",
        "2",
        "--retry-backoff",
        "0.2",
    ]
    args += ["--storage-option", f"endpoint_url={endpoint}"]
    proc = shard_cli(ucm_dir, dest, *args, env={"AWS_MAX_ATTEMPTS": "1"})  # botocore: no hidden retries
    try:
        _wait_for(lambda: len(_committed_records(fs, root)) >= 3, 90, "3 committed shards", proc)
        own_s3_server["stop"]()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err[-2000:]
    assert "storage still failing after 2 retries" in err and "Could not connect to the endpoint URL" in err
    assert "retry 1/2" in err and "retry 2/2" in err
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in err  # no credentials in the logs

    own_s3_server["restart"]()
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/_manifest.json")  # nothing committed, so nothing partial listed
    for path in fs.find(root):  # whatever is under a final name is a complete tar
        if path.endswith(".tar") and "/_tmp/" not in path:
            with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
                assert sum(1 for _ in tf) > 0

    again = shard_dataset(ucm_dir, dest, splits=["val"], maxcount=10, storage_options=options, progress=False)
    assert again.skipped >= 3 and again.written + again.skipped == 11
    back = read_back(dest, options)
    assert_exactly_the_input(back, load_dataset(ucm_dir).by_split("val"))


def test_images_on_s3_listed_in_a_table_shard_byte_identical_and_missing_ones_are_quarantined(
    s3_bucket, tmp_path
):
    """A users' archive whose images live on S3 (a CSV of s3:// URLs): sizes come from one listing per folder,
    images are read by the writer's threads, a listed image missing from the bucket is quarantined by name."""
    import csv

    from ssjdn.data.synthetic import generate_synthetic

    fs, _ = get_fs(f"s3://{s3_bucket}")
    ds = load_dataset(generate_synthetic(tmp_path / "syn", n_per_class=4, size=48, seed=3))
    rows = []
    for s in ds.samples[:24]:
        url = f"s3://{s3_bucket}/archive/{s.split}/{Path(s.source).name}"
        fs.pipe(url, Path(s.source).read_bytes())
        rows.append({"image": url, "caption": s.captions[0], "split": s.split, "label": s.class_name})
    missing = f"s3://{s3_bucket}/archive/train/never_uploaded.png"
    rows.append({"image": missing, "caption": "a field", "split": "train", "label": "field"})
    table = tmp_path / "archive" / "items.csv"
    table.parent.mkdir()
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    dest = tmp_path / "shards"
    result = shard_dataset(table, str(dest), maxcount=5, max_bad_fraction=0.1, progress=False)
    m = result.manifest
    assert (m["totals"]["samples"], m["totals"]["bad"], m["totals"]["listed"]) == (24, 1, 25)
    report = (dest / "_quarantine" / "report.jsonl").read_text()
    assert "never_uploaded.png" in report and "image file not found" in report
    back = read_back(str(dest))
    by_url = {r["image"]: r for r in rows}
    assert len(back) == 24
    for sample in back.values():
        url = sample["meta"]["source"]
        assert sample["image"] == fs.cat(url) and sample["meta"]["captions"] == [by_url[url]["caption"]]
