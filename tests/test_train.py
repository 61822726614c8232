"""Distributed-training input pipeline and preflight, without Ray: real shards on the moto S3 server, real
DataLoader worker processes, the real driver checks (pipelines.train.prepare)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import boto3
import pytest
import torch

from pipelines.train.data import (
    Position,
    Rebatcher,
    TrainShardStream,
    assign_shards,
    batches_for,
    lockstep_steps,
    make_loader,
)
from pipelines.train.spec import ShardRef, shard_refs
from ssjdn.batching import BadItem

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- helpers


def make_shards(
    work: Path,
    dest: str,
    *,
    name: str = "synthetic",
    seed: int = 0,
    classes: int = 4,
    n_per_class: int = 20,
    maxcount: int = 10,
    size: int = 40,
) -> dict:
    """A synthetic dataset written as shards to `dest`; returns the manifest."""
    from pipelines.shard.job import shard_dataset
    from ssjdn.data.synthetic import CLASSES, generate_synthetic

    data = generate_synthetic(
        work / f"data-{name}-{seed}",
        n_per_class=n_per_class,
        seed=seed,
        size=size,
        classes=list(CLASSES[:classes]),
        name=name,
    )
    return shard_dataset(data, dest, maxcount=maxcount, progress=False).manifest


def new_bucket(endpoint: str, prefix: str = "train") -> str:
    import uuid

    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


def train_keys(manifest: dict, url: str) -> set[str]:
    from pipelines.shard.read import open_split

    return {s["key"] for s in open_split(url, "train")}


@pytest.fixture(scope="module")
def s3_shards(s3_server, tmp_path_factory):
    """Synthetic shards (56 train samples in 6 shards of <= 10, val 12, test 12) on the moto S3 server."""
    bucket = new_bucket(s3_server["endpoint_url"], "shards")
    url = f"s3://{bucket}/synthetic"
    manifest = make_shards(tmp_path_factory.mktemp("syn"), url)
    return {"url": url, "manifest": manifest, "bucket": bucket, "keys": train_keys(manifest, url)}


def _collate(items):
    return {"keys": [it[3] for it in items], "pixels": torch.stack([it[0] for it in items])}


def _rank_batches(refs, rank, epoch, *, skip=(), workers=2, batch_size=8, take=None):
    from ssjdn.transforms import ImageTransform

    stream = TrainShardStream(
        refs,
        transform=ImageTransform(32, train=True),
        epoch=epoch,
        seed=0,
        rank=rank,
        shuffle_buffer=16,
        skip=skip,
    )
    pos = Position({w: n for w, n in enumerate(skip)})
    rb = Rebatcher(make_loader(stream, workers), batch_size, _collate, position=pos)
    out = []
    for b in rb:
        out.append(b)
        if take is not None and len(out) == take:
            break
    return out, pos, rb


# ----------------------------------------------------------------------------------------------- planning


def test_assign_shards_is_disjoint_balanced_and_reshuffled_per_epoch():
    shards = [ShardRef(f"s3://b/train/shard-{i:06d}.tar", 100 if i < 9 else 37) for i in range(10)]
    seen_layouts = set()
    for epoch in (1, 2, 3):
        parts = assign_shards(shards, 3, epoch, seed=7)
        flat = [s for p in parts for s in p]
        assert sorted(s.url for s in flat) == sorted(s.url for s in shards)  # each shard exactly once
        loads = [sum(s.samples for s in p) for p in parts]
        assert max(loads) - min(loads) <= 100  # within one shard of each other
        assert parts == assign_shards(shards, 3, epoch, seed=7)  # every rank computes the same split
        seen_layouts.add(tuple(tuple(s.url for s in p) for p in parts))
    assert len(seen_layouts) > 1  # ranks see other shards in other epochs
    assert lockstep_steps(assign_shards(shards, 3, 1, 7), 32) == max(
        batches_for(sum(s.samples for s in p), 32) for p in assign_shards(shards, 3, 1, 7)
    )
    assert [batches_for(n, 8) for n in (0, 1, 7, 8, 9, 10, 16, 17)] == [0, 0, 1, 1, 1, 2, 2, 2]


def test_rebatcher_exact_batches_bad_entries_and_prefix_positions():
    def item(i):
        return (torch.zeros(1), f"c{i}", 0, f"k{i:03d}")

    # two "loader workers" interleaved, with bad entries in between; 2 * 12 good = 24 items, batch 5
    w0 = [item(i) for i in range(12)]
    w1 = [item(100 + i) for i in range(12)]
    w1.insert(3, BadItem("bad1", "s3://b/x.tar", "ValueError: broken"))
    w0.append(BadItem("bad0", "s3://b/y.tar", "no json"))
    chunks = []
    for start in range(0, 13, 4):
        chunks += [(0, w0[start : start + 4]), (1, w1[start : start + 4])]
    rb = Rebatcher(iter(chunks), 5, lambda items: {"keys": [it[3] for it in items]})
    sizes, keys = [], []
    for b in rb:
        sizes.append(len(b["keys"]))
        keys += b["keys"]
    assert sizes == [5, 5, 5, 5, 4]  # 24 items: full batches, the remainder kept
    assert Counter(keys) == Counter(it[3] for it in w0 + w1 if not isinstance(it, BadItem))
    assert sorted(b.key for b in rb.bad) == ["bad0", "bad1"]
    assert rb.position.consumed == {0: 13, 1: 13}  # everything, bad entries included

    # a single leftover joins the last batch instead of being a batch of one (no in-batch negatives)
    rb2 = Rebatcher(iter([(0, [item(i) for i in range(11)])]), 5, lambda items: [it[3] for it in items])
    assert [len(b) for b in rb2] == [5, 6]

    # stopping early: what was consumed from each worker is a prefix of that worker's stream
    rb3 = Rebatcher(iter(chunks), 5, lambda items: [it[3] for it in items])
    first = next(rb3) + next(rb3)
    for w, stream in ((0, w0), (1, w1)):
        prefix = stream[: rb3.position.consumed[w]]
        assert [it[3] for it in prefix if not isinstance(it, BadItem)] == [
            k for k in first if (k < "k100") == (w == 0)
        ]


# ----------------------------------------------------------------------------------------------- streams


@pytest.mark.integration
def test_each_train_sample_once_per_epoch_across_ranks_and_mid_epoch_resume(s3_shards):
    refs = shard_refs(s3_shards["manifest"], s3_shards["url"], "train")
    parts = assign_shards(refs, 2, epoch=1, seed=0)
    seen: list[str] = []
    full: list[dict] = []
    for rank in (0, 1):
        batches, pos, rb = _rank_batches(parts[rank], rank, epoch=1)
        keys = [k for b in batches for k in b["keys"]]
        assert len(keys) == sum(s.samples for s in parts[rank])
        assert len(batches) == batches_for(len(keys), 8)
        assert all(len(b["keys"]) == 8 for b in batches[:-1])
        assert all(
            b["pixels"].shape[1:] == (3, 32, 32) and torch.isfinite(b["pixels"]).all() for b in batches
        )
        assert not rb.bad
        seen += keys
        full = full or batches
    assert Counter(seen) == Counter(s3_shards["keys"])  # every train sample exactly once, across both ranks

    # resume rank 0 inside the epoch from the position after two batches: the rest, and nothing twice
    first, pos, _ = _rank_batches(parts[0], 0, epoch=1, take=2)
    rest, _, _ = _rank_batches(parts[0], 0, epoch=1, skip=pos.as_list(2))
    before = [k for b in first for k in b["keys"]]
    after = [k for b in rest for k in b["keys"]]
    assert sorted(before + after) == sorted(k for b in full for k in b["keys"])
    assert not set(before) & set(after)
    # deterministic: the same epoch gives the same order and the same augmented pixels; another epoch does not
    assert [b["keys"] for b in first] == [b["keys"] for b in full[:2]]
    assert torch.equal(first[0]["pixels"], full[0]["pixels"])  # augmentation seeded per (epoch, key)
    other, _, _ = _rank_batches(parts[0], 0, epoch=2)
    assert [b["keys"] for b in other] != [b["keys"] for b in full]


def _tar_with_bad_samples(path: Path, good_jpeg: bytes) -> list[str]:
    import webdataset as wds

    meta = {"captions": ["a scene"], "class_name": "airport", "class_index": 0}
    with open(path, "wb") as f, wds.TarWriter(f) as tw:
        for i in range(6):
            tw.write(
                {"__key__": f"good_{i}", "jpg": good_jpeg, "json": json.dumps(meta).encode(), "cls": b"0"}
            )
        tw.write(
            {
                "__key__": "truncated_jpeg",
                "jpg": good_jpeg[: len(good_jpeg) // 3],
                "json": json.dumps(meta).encode(),
            }
        )
        tw.write({"__key__": "no_json", "jpg": good_jpeg})
        tw.write({"__key__": "no_caption", "jpg": good_jpeg, "json": json.dumps({"captions": []}).encode()})
    return ["truncated_jpeg", "no_json", "no_caption"]


def test_bad_samples_are_skipped_counted_and_named(tmp_path):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (90, 120, 60)).save(buf, "JPEG")
    tar = tmp_path / "shard-000000.tar"
    bad_keys = _tar_with_bad_samples(tar, buf.getvalue())
    batches, pos, rb = _rank_batches([ShardRef(str(tar), 9)], 0, epoch=1, workers=1, batch_size=3)
    assert sorted(k for b in batches for k in b["keys"]) == [f"good_{i}" for i in range(6)]
    reasons = {b.key: b.reason for b in rb.bad}
    assert set(reasons) == set(bad_keys), rb.bad
    assert all(b.source == str(tar) for b in rb.bad)  # each one named by shard and key
    assert "no json" in reasons["no_json"]
    assert "no caption" in reasons["no_caption"]
    assert "truncated_jpeg" in reasons["truncated_jpeg"]
    assert pos.consumed == {0: 9}


# ----------------------------------------------------------------------------------------------- preflight


def _opts(shards: str, storage: str, **kw):
    from pipelines.train.options import TrainOptions

    return TrainOptions(config="tiny", shards=shards, storage=storage, **kw)


@pytest.mark.integration
def test_preflight_refuses_before_any_worker(s3_server, s3_shards, tmp_path):
    from pipelines.train.driver import TrainSetupError, prepare
    from pipelines.train.rundir import RunDir

    bucket = new_bucket(s3_server["endpoint_url"], "runs")
    storage = f"s3://{bucket}/runs"

    with pytest.raises(TrainSetupError, match=r"no shards at s3://.*/nothing-here"):
        prepare(_opts(f"s3://{bucket}/nothing-here", storage))
    with pytest.raises(TrainSetupError, match=r"6 shard\(s\) for 8 workers"):
        prepare(_opts(s3_shards["url"], storage, workers=8))
    with pytest.raises(TrainSetupError, match=r"expects 3 classes .* has 4"):
        prepare(_opts(s3_shards["url"], storage, overrides={"model.lsd_cfg.num_classes": 3}))

    # a run is tied to its dataset: another dataset's shards under the same run name are refused
    first = prepare(_opts(s3_shards["url"], storage, name="r1"))
    assert (
        not first.resuming and RunDir(first.run_url).read_json("run.json")["dataset"]["name"] == "synthetic"
    )
    other_url = f"s3://{bucket}/other"
    make_shards(tmp_path, other_url, name="othersyn", seed=5)
    with pytest.raises(TrainSetupError, match=r"trained on dataset 'synthetic' .* holds dataset 'othersyn'"):
        prepare(_opts(other_url, storage, name="r1"))
    with pytest.raises(TrainSetupError, match=r"another config \(differs in optim.lr\)"):
        prepare(_opts(s3_shards["url"], storage, name="r1", overrides={"optim.lr": 0.1}))
    with pytest.raises(TrainSetupError, match="already holds run 'r1'"):
        prepare(_opts(s3_shards["url"], storage, name="r1", resume="never"))
    again = prepare(_opts(s3_shards["url"], storage, name="r1", epochs=5))  # more epochs: same run
    assert again.resuming and again.spec["epochs"] == 5 and again.spec["tokenizer_state"]["kind"] == "gru"
    assert [Path(u).name for u, _ in again.spec["train_shards"]] == [f"shard-{i:06d}.tar" for i in range(6)]


@pytest.mark.integration
def test_cli_exits_2_with_the_reason_and_starts_no_ray(s3_server):
    bucket = new_bucket(s3_server["endpoint_url"], "empty")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.train",
            "--config",
            "tiny",
            "--shards",
            f"s3://{bucket}/none",
            "--storage",
            f"s3://{bucket}/runs",
            "--workers",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"no shards at s3://{bucket}/none" in proc.stderr
    assert "Ray instance" not in proc.stderr + proc.stdout and "RayTrainWorker" not in proc.stderr
    assert (
        not boto3.client("s3", endpoint_url=s3_server["endpoint_url"])
        .list_objects_v2(Bucket=bucket)
        .get("Contents")
    )


@pytest.mark.integration
def test_ray_storage_reaches_the_custom_s3_endpoint(s3_server):
    import pyarrow.fs as pafs

    from pipelines.train.rundir import ray_storage, run_url

    bucket = new_bucket(s3_server["endpoint_url"], "pa")
    path, fs = ray_storage(f"s3://{bucket}/runs")
    assert path == f"{bucket}/runs" and isinstance(fs, pafs.S3FileSystem)
    with fs.open_output_stream(f"{path}/x/hello.txt") as f:  # what Ray Train does with checkpoints
        f.write(b"hi")
    body = boto3.client("s3", endpoint_url=s3_server["endpoint_url"]).get_object(
        Bucket=bucket, Key="runs/x/hello.txt"
    )
    assert body["Body"].read() == b"hi"
    assert run_url(f"s3://{bucket}/runs", "r-1") == f"s3://{bucket}/runs/r-1"
    with pytest.raises(ValueError, match="run name"):
        run_url(f"s3://{bucket}/runs", "../escape")


def test_ssjdn_train_subcommand_has_the_same_arguments():
    from pipelines.options import from_args
    from pipelines.train.options import TrainOptions
    from ssjdn_cli.main import build_parser

    args = build_parser().parse_args(
        [
            "train",
            "--config",
            "tiny",
            "--shards",
            "s3://b/s",
            "--storage",
            "/tmp/r",
            "--workers",
            "3",
            "--gpu",
            "--epochs",
            "4",
            "--resume",
            "never",
            "--set",
            "train.batch_size=16",
        ]
    )
    opts = from_args(TrainOptions, args)
    assert (opts.workers, opts.gpu, opts.epochs, opts.resume) == (3, True, 4, "never")
    assert opts.overrides == {"train.batch_size": 16} and args._run.__module__ == "pipelines.train.cli"


def test_train_options_go_through_the_command_line_unchanged():
    """`options_to_argv` (the Ray job's command line) reads back into the same options; defaults stay out."""
    import argparse

    from pipelines.options import add_arguments, from_args, options_to_argv
    from pipelines.train.options import TrainOptions

    def round_trip(opts: TrainOptions) -> TrainOptions:
        parser = argparse.ArgumentParser()
        add_arguments(parser, TrainOptions)
        return from_args(TrainOptions, parser.parse_args(options_to_argv(opts)))

    plain = TrainOptions(config="tiny", shards="s3://b/s", storage="s3://b/runs")
    assert options_to_argv(plain) == ["--config", "tiny", "--shards", "s3://b/s", "--storage", "s3://b/runs"]
    assert round_trip(plain) == plain
    full = TrainOptions(
        config="tiny",
        shards="s3://b/s",
        storage="/tmp/runs",
        workers=3,
        gpu=True,
        epochs=4,
        resume="never",
        name="r1",
        overrides={"train.batch_size": 8, "optim.lr": 1e-05, "model.text.name": "8", "model.lsd": False},
        max_bad_fraction=0.25,
        cpus_per_worker=0.5,
        placement="SPREAD",
        audit_keys=True,
        checkpoint_every=4,
        storage_options={
            "endpoint_url": "http://127.0.0.1:9000",
            "anon": True,
            "client_kwargs": {"region_name": "x"},
        },
        progress_every=2,
    )
    assert round_trip(full) == full
    argv = options_to_argv(full)
    assert "--gpu" in argv and "--storage-option" in argv and "--max-failures" not in argv
    with pytest.raises(ValueError, match="storage option anon='true'"):
        options_to_argv(TrainOptions(config="c", shards="s", storage="t", storage_options={"anon": "true"}))


def test_train_flow_parameters_are_the_options_fields():
    import inspect

    from flows.train import FLOW_DEFAULTS, train_ssjdn

    params = inspect.signature(train_ssjdn.fn).parameters
    assert list(params)[:6] == ["config", "shards", "storage", "workers", "gpu", "epochs"]
    assert {
        "ray_address",
        "python",
        "upload_code",
        "overrides",
        "storage_options",
        "checkpoint_every",
    } <= set(params)
    assert "address" not in params and "extra_args" not in params  # the flow has ray_address instead
    assert {k: params[k].default for k in FLOW_DEFAULTS} == FLOW_DEFAULTS
    assert params["overrides"].default is None and params["ray_address"].default == "local"


def test_fault_hook_is_armed_by_one_variable(monkeypatch):
    from pipelines.train.faults import ENV, Faults, armed
    from pipelines.train.hooks import NoHook, StepInfo

    monkeypatch.delenv(ENV, raising=False)
    assert armed() is None
    faults = Faults(nan_at_step=3)
    monkeypatch.setenv(*next(iter(faults.env().items())))
    assert armed() == faults
    batch = {"keys": ["a", "b"], "pixels": torch.zeros(2, 3, 4, 4)}
    at = StepInfo(epoch=1, step=3, rank=0, attempt=1, replay=False)
    assert torch.isnan(faults.before_step(at, batch)["pixels"]).all()
    assert not torch.isnan(batch["pixels"]).any()  # the loop's own batch is left alone
    for other in (StepInfo(1, 2, 0, 1, False), StepInfo(1, 3, 0, 1, True)):  # another step; a replayed batch
        assert faults.before_step(other, batch) is batch
    assert NoHook().before_step(at, batch) is batch
