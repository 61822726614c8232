"""Sharding on local disk: tar format, determinism, quarantine, destination checks, resume, safe reading."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from pipelines.shard.job import shard_dataset
from pipelines.shard.layout import TAR_MTIME
from pipelines.shard.options import ShardOptions
from pipelines.shard.plan import DestinationConflictError, TooManyBadSamplesError, plan_shards
from pipelines.shard.read import ShardReadError, list_shards, open_shards, open_split, read_manifest
from pipelines.shard.write import TarStream
from ssjdn.data.readers import load_dataset
from ssjdn.data.synthetic import generate_synthetic
from ssjdn_cli.main import main as cli_main


@pytest.fixture
def synthetic(tmp_path) -> Path:
    return generate_synthetic(tmp_path / "syn", n_per_class=4, size=48, seed=3)


def read_back(dest: str, storage_options=None) -> dict[str, dict]:
    """Every sample of every split, read with plain webdataset via pipelines.shards_read; key -> sample."""
    manifest = read_manifest(dest, storage_options)
    out: dict[str, dict] = {}
    for split in manifest["splits"]:
        for s in open_split(dest, split, storage_options=storage_options):
            assert s["key"] not in out, f"duplicate key {s['key']}"
            s["split"] = split
            out[s["key"]] = s
    return out


def sha_files(dest: Path) -> dict[str, str]:
    return {
        str(p.relative_to(dest)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(dest.glob("*/shard-*.tar"))
    }


def test_shards_are_plain_tars_with_the_documented_members(synthetic, tmp_path):
    dest = tmp_path / "out"
    result = shard_dataset(synthetic, str(dest), maxcount=7, progress=False)
    ds = load_dataset(synthetic)
    m = result.manifest
    assert m["totals"]["samples"] == len(ds.samples) == 40
    assert {k: v["samples"] for k, v in m["splits"].items()} == ds.split_counts()
    assert [c["name"] for c in m["classes"]] == ds.classes
    assert all(e["samples"] <= 7 for e in m["shards"]) and len(m["shards"]) == 3 + 2 + 2

    first = dest / m["shards"][0]["path"]
    with tarfile.open(first) as tf:
        members = tf.getmembers()
    assert {(t.uname, t.gname, t.uid, t.gid, t.mtime, t.mode) for t in members} == {
        ("ssjdn", "ssjdn", 0, 0, TAR_MTIME, 0o444)
    }
    key0 = m["shards"][0]["first_key"]
    assert [t.name for t in members[:4]] == [f"{key0}.cls", f"{key0}.jpg", f"{key0}.json", f"{key0}.txt"]
    gnu = subprocess.run(["tar", "-tf", str(first)], capture_output=True, text=True, check=True)
    assert gnu.stdout.split() == [t.name for t in members]
    assert first.stat().st_size == m["shards"][0]["bytes"]
    assert hashlib.sha256(first.read_bytes()).hexdigest() == m["shards"][0]["sha256"]

    back = read_back(str(dest))
    assert set(back) == {s.key for s in ds.samples}
    for s in ds.samples:
        got = back[s.key]
        assert got["image"] == Path(s.source).read_bytes()
        assert got["image_ext"] == "jpg" and got["cls"] == s.class_index and got["split"] == s.split
        assert got["txt"] == s.captions[0]
        meta = got["meta"]
        assert meta["captions"] == s.captions and meta["class_name"] == s.class_name
        assert (meta["width"], meta["height"], meta["format"], meta["source"]) == (48, 48, "JPEG", s.source)
    assert (dest / "_quarantine" / "report.jsonl").read_text() == ""
    assert not (dest / "_tmp").exists()


@pytest.mark.integration
def test_same_input_and_options_give_identical_shards_whatever_the_worker_count(ucm_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ra = shard_dataset(ucm_dir, str(a), maxcount=300, shuffle_seed=7, workers=1, progress=False)
    shard_dataset(ucm_dir, str(b), maxcount=300, shuffle_seed=7, workers=2, progress=False)
    sha_a, sha_b = sha_files(a), sha_files(b)
    assert len(sha_a) == 8 and sha_a == sha_b
    assert sha_a == {e["path"]: e["sha256"] for e in ra.manifest["shards"]}
    assert (a / "_manifest.json").read_bytes() == (b / "_manifest.json").read_bytes()
    # the seeded shuffle spreads classes over shards; another seed gives another assignment, no seed key order
    first = list(open_shards([str(a / "train/shard-000000.tar")]))
    assert len({s["cls"] for s in first}) == 21
    keys = [s["key"] for s in first]

    def first_shard_keys(**kw) -> list[str]:
        return plan_shards(ucm_dir, str(tmp_path / "x"), **kw).jobs[0].keys()

    assert first_shard_keys(options=ShardOptions(maxcount=300, shuffle_seed=7)) == keys
    assert first_shard_keys(options=ShardOptions(maxcount=300, shuffle_seed=8)) != keys
    assert first_shard_keys(options=ShardOptions(maxcount=300))[:3] == ["ucm__1", "ucm__2", "ucm__3"]


def _break_dataset(root: Path) -> dict[str, str]:
    """Truncate one image, overwrite one with junk, delete one, and empty one sample's captions."""
    doc = json.loads((root / "dataset.json").read_text())
    names = [im["filename"] for im in doc["images"]]
    truncated, junk, missing, captionless = names[1], names[5], names[9], names[13]
    data = (root / "images" / truncated).read_bytes()
    (root / "images" / truncated).write_bytes(data[: len(data) // 2])
    (root / "images" / junk).write_bytes(b"this is not an image at all")
    (root / "images" / missing).unlink()
    doc["images"][13]["sentences"] = []
    (root / "dataset.json").write_text(json.dumps(doc))
    return {"truncated": truncated, "junk": junk, "missing": missing, "captionless": captionless}


def test_bad_samples_are_quarantined_named_and_counted(synthetic, tmp_path):
    broken = _break_dataset(synthetic)
    dest = tmp_path / "out"
    result = shard_dataset(synthetic, str(dest), maxcount=10, max_bad_fraction=0.2, progress=False)
    report = [json.loads(line) for line in (dest / "_quarantine/report.jsonl").read_text().splitlines()]
    by_file = {r["filename"]: r for r in report}
    assert set(by_file) == set(broken.values())
    assert "truncated" in by_file[broken["truncated"]]["reason"]
    assert "not a recognised image" in by_file[broken["junk"]]["reason"]
    assert "not found" in by_file[broken["missing"]]["reason"]
    assert "no captions" in by_file[broken["captionless"]]["reason"]
    assert all(r["key"] and r["source"].endswith(r["filename"]) for r in report)

    m = result.manifest
    assert m["bad"]["count"] == 4 and m["totals"]["samples"] == 36 and m["totals"]["listed"] == 40
    assert sum(v["bad"] for v in m["splits"].values()) == 4
    back = read_back(str(dest))
    assert len(back) == 36 and not {r["key"] for r in report} & set(back)

    # fixing inputs is not "another dataset": the re-run adds the repaired samples and rewrites only their shards
    doc = json.loads((synthetic / "dataset.json").read_text())
    doc["images"][13]["sentences"] = [{"raw": "a repaired caption .", "tokens": ["a", "repaired", "caption"]}]
    (synthetic / "dataset.json").write_text(json.dumps(doc))
    (synthetic / "images" / broken["missing"]).write_bytes(
        (synthetic / "images" / broken["junk"]).read_bytes()
    )
    fixed = shard_dataset(synthetic, str(dest), maxcount=10, max_bad_fraction=0.2, progress=False)
    assert fixed.manifest["totals"]["samples"] == 37 and fixed.manifest["bad"]["count"] == 3
    assert 1 <= fixed.written <= 2 and fixed.skipped == len(fixed.manifest["shards"]) - fixed.written


def test_too_many_bad_samples_fail_with_a_summary_and_no_manifest(synthetic, tmp_path, capsys):
    broken = _break_dataset(synthetic)
    dest = tmp_path / "out"
    rc = cli_main(["shard", str(synthetic), str(dest), "--workers", "1", "--no-progress"])
    assert rc == 1
    # the reader's and the listing's findings (no captions, missing file) already exceed 1%: no image is read;
    # the command prints one error line (pipelines.command), which groups the bad samples by reason
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert "at least 2 of 40 samples are bad (5.00% > max 1.00%); stopped early" in line
    assert f"Report: {dest}/_quarantine/report.jsonl. Manifest not written" in line
    assert '"no captions; sample quarantined" x 1 (' in line and '"image file not found" x 1 (' in line
    assert broken["captionless"].rsplit(".", 1)[0] in line
    assert not (dest / "_manifest.json").exists()
    assert len((dest / "_quarantine/report.jsonl").read_text().splitlines()) == 2

    # within the limit at planning, over it once images are checked
    with pytest.raises(TooManyBadSamplesError, match=r"4 of 40 samples are bad \(10.00% > max 6.00%\)"):
        shard_dataset(synthetic, str(dest), max_bad_fraction=0.06, progress=False)
    assert not (dest / "_manifest.json").exists()
    assert len((dest / "_quarantine/report.jsonl").read_text().splitlines()) == 4


def test_destination_holding_another_dataset_or_options_is_refused(synthetic, tmp_path):
    other = generate_synthetic(tmp_path / "other", n_per_class=2, size=32, seed=9, name="other")
    dest = str(tmp_path / "out")
    shard_dataset(synthetic, dest, maxcount=10, progress=False)
    before = sha_files(Path(dest))

    with pytest.raises(DestinationConflictError, match="another dataset.*'other'.*--overwrite"):
        shard_dataset(other, dest, maxcount=10, progress=False)
    with pytest.raises(DestinationConflictError, match=r"other options: maxcount=10 \(this run: 5\)"):
        shard_dataset(synthetic, dest, maxcount=5, progress=False)
    assert sha_files(Path(dest)) == before  # refused runs touched nothing

    assert cli_main(["shard", str(other), dest, "--maxcount", "10", "--workers", "1", "--no-progress"]) == 1
    result = shard_dataset(other, dest, maxcount=10, overwrite=True, progress=False)
    assert result.manifest["dataset"]["name"] == "other"
    assert set(sha_files(Path(dest))) == {e["path"] for e in result.manifest["shards"]}  # no stale shards
    assert set(read_back(dest)) == {s.key for s in load_dataset(other).samples}

    stray = tmp_path / "stray"
    (stray / "train").mkdir(parents=True)
    (stray / "train/shard-000000.tar").write_bytes(b"")
    with pytest.raises(DestinationConflictError, match="no manifest or run record describes"):
        shard_dataset(synthetic, str(stray), progress=False)


def test_rerun_skips_verified_shards_and_rewrites_damaged_or_missing_ones(synthetic, tmp_path):
    dest = tmp_path / "out"
    first = shard_dataset(synthetic, str(dest), maxcount=5, progress=False)
    shas = sha_files(dest)
    assert first.written == len(shas) == 8

    (dest / "_manifest.json").unlink()
    (dest / "train/shard-000001.tar").unlink()
    damaged = dest / "val/shard-000000.tar"
    data = bytearray(damaged.read_bytes())
    data[700] ^= 0xFF
    damaged.write_bytes(bytes(data))

    again = shard_dataset(synthetic, str(dest), maxcount=5, progress=False)
    assert (again.written, again.skipped) == (2, 6)
    assert sha_files(dest) == shas
    assert again.manifest == first.manifest


def test_maxsize_bounds_shard_bytes(synthetic, tmp_path):
    dest = tmp_path / "out"
    maxsize = 40_000
    m = shard_dataset(synthetic, str(dest), maxsize=maxsize, progress=False).manifest
    assert all(e["bytes"] <= maxsize for e in m["shards"])
    assert any(e["samples"] > 1 for e in m["shards"]) and m["totals"]["samples"] == 40


def test_resize_and_reencode_are_opt_in(synthetic, tmp_path):
    dest = tmp_path / "out"
    shard_dataset(synthetic, str(dest), resize=24, reencode="png", splits=["val"], progress=False)
    back = read_back(str(dest))
    assert len(back) == 10
    for s in back.values():
        assert s["image_ext"] == "png" and s["image"].startswith(b"\x89PNG")
        assert (s["meta"]["width"], s["meta"]["height"], s["meta"]["format"]) == (24, 24, "PNG")
        assert s["meta"]["original"] == {"width": 48, "height": 48, "format": "JPEG"}


class _Trap:
    """Unpickling this creates a marker file: proof that a reader unpickled shard data."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def test_reader_never_unpickles_and_names_incomplete_samples(tmp_path):
    marker = tmp_path / "unpickled"
    shard = tmp_path / "evil.tar"
    _tar(
        shard,
        {
            "k1.jpg": b"\xff\xd8jpeg-bytes",
            "k1.json": b'{"captions": ["a"]}',
            "k1.cls": b"3",
            "k1.pyd": pickle.dumps(_Trap(str(marker))),
            "k1.pickle": pickle.dumps(_Trap(str(marker))),
        },
    )
    [s] = list(open_shards([str(shard)]))
    assert not marker.exists()
    assert (s["key"], s["image"], s["image_ext"], s["cls"], s["meta"]) == (
        "k1",
        b"\xff\xd8jpeg-bytes",
        "jpg",
        3,
        {"captions": ["a"]},
    )
    assert set(s) == {"key", "image", "image_ext", "meta", "cls", "txt", "url"}  # nothing else, no .pyd

    _tar(tmp_path / "partial.tar", {"k2.json": b"{}"})
    with pytest.raises(ShardReadError, match="k2.*expected one image member"):
        list(open_shards([str(tmp_path / "partial.tar")]))


def test_list_shards_reads_the_manifest_only(synthetic, tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="holds no committed shards"):
        list_shards(str(dest), "train")
    shard_dataset(synthetic, str(dest), maxcount=8, progress=False)
    (dest / "train/shard-000099.tar").write_bytes(b"not listed")  # e.g. a stray file: never read
    urls = list_shards(str(dest), "train")
    assert urls == [
        str(dest / "train/shard-000000.tar"),
        str(dest / "train/shard-000001.tar"),
        str(dest / "train/shard-000002.tar"),
    ]
    assert Counter(s["meta"]["split"] for s in open_split(str(dest), "train")) == {"train": 20}
    with pytest.raises(ValueError, match="no shards for split 'nope'"):
        list_shards(str(dest), "nope")


def test_tar_stream_keeps_long_names_and_matches_tarfile_layout(tmp_path):
    key = "archive__" + "deep_folder_" * 12 + "img"  # > 100 bytes with its extension: PAX header
    path = tmp_path / "long.tar"
    with open(path, "wb") as f:
        tar = TarStream(f)
        tar.write_sample({"__key__": key, "txt": b"caption", "jpg": b"\xff\xd8" + bytes(1000)})
        tar.write_sample({"__key__": "short", "json": b"{}"})
        tar.close()
    assert path.stat().st_size % TarStream.RECORD == 0
    with tarfile.open(path) as tf:
        got = [(t.name, t.size, t.mtime, t.uname) for t in tf.getmembers()]
        assert tf.extractfile(f"{key}.txt").read() == b"caption"
    assert got == [
        (f"{key}.jpg", 1002, TAR_MTIME, "ssjdn"),
        (f"{key}.txt", 7, TAR_MTIME, "ssjdn"),
        ("short.json", 2, TAR_MTIME, "ssjdn"),
    ]


def test_cli_sizes_accept_whole_scientific_notation_only(capsys):
    from ssjdn_cli.main import build_parser

    args = build_parser().parse_args(["shard", "data", "out", "--maxsize", "1e9", "--maxcount", "250"])
    assert (args.maxsize, args.maxcount) == (1_000_000_000, 250)
    for bad in ("1.5", "0", "many"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["shard", "data", "out", "--maxcount", bad])
        assert "--maxcount" in capsys.readouterr().err


def test_natural_order_bytes_sort_like_digit_aware_tuples():
    """The planner sorts keys in SQLite by `natural_order` bytes: the same order as comparing digit runs as
    numbers (Python tuples), ties (same numbers, other zero padding) broken by the key."""
    import random

    from pipelines.shard.plan import natural_order

    def as_tuple(key: str) -> tuple:
        return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", key)))

    rng = random.Random(0)
    keys = {
        "ucm__2",
        "ucm__10",
        "ucm__1",
        "a",
        "a1",
        "a1b",
        "a01",
        "ab",
        "a_1",
        "a-1",
        "a__9",
        "b10c2",
        "b10c10",
        "9",
    }
    alphabet = "ab_-0123456789"
    keys |= {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(3000)}
    keys = sorted(keys)
    assert sorted(keys, key=lambda k: (natural_order(k), k)) == sorted(keys, key=lambda k: (as_tuple(k), k))


def test_plan_scratch_is_removed_after_the_run_and_after_a_killed_run(synthetic, tmp_path, monkeypatch):
    """The plan file lives in a scratch folder under TMPDIR: gone when the run ends, and a folder left by a killed
    run (its process is gone) is removed by the next plan; a live process's folder is left alone."""
    import os
    import sys
    import tempfile

    from pipelines.shard.plan import PLAN_DIR_PREFIX

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = scratch / f"{PLAN_DIR_PREFIX}{int(dead.stdout)}-x1"
    live = scratch / f"{PLAN_DIR_PREFIX}{os.getpid()}-x2"
    for d in (stale, live):
        d.mkdir()
        (d / "plan.jsonl").write_text("{}\n")

    plan = plan_shards(synthetic, str(tmp_path / "dest"), options=ShardOptions(maxcount=7))
    assert not stale.exists() and live.exists()
    mine = Path(plan.plan_file.path).parent
    assert mine.parent == scratch and sum(j.count for j in plan.jobs) == 40
    del plan
    assert not mine.exists()  # freed with the plan (and its jobs)

    shard_dataset(synthetic, str(tmp_path / "dest"), maxcount=7, progress=False)
    assert sorted(p.name for p in scratch.iterdir()) == [live.name]
