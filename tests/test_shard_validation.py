"""Image validation while sharding: the default `structure` level (header + the file is complete, no pixel
decoding) and `full` (decode every image); and the writers (this process + worker processes) agreeing on bytes."""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.shard import job as shard_job
from pipelines.shard.job import finalize, prepare_destination, shard_dataset, write_shards
from pipelines.shard.options import ShardOptions
from pipelines.shard.plan import DestinationConflictError, plan_shards
from pipelines.shard.write import TarStream, write_shard
from ssjdn.data.readers import load_dataset
from ssjdn.data.synthetic import generate_synthetic
from ssjdn_cli.main import main as cli_main
from tests.test_data_images import write_tiff
from tests.test_shard import read_back, sha_files


@pytest.fixture
def synthetic(tmp_path) -> Path:
    return generate_synthetic(tmp_path / "syn", n_per_class=2, size=48, seed=11)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _scene() -> Image.Image:
    y, x = np.mgrid[0:40, 0:56]
    noise = np.random.default_rng(4).integers(0, 40, (40, 56, 3))
    return Image.fromarray((np.stack([x * 4, y * 5, (x + y) * 2], axis=2) + noise).astype(np.uint8), "RGB")


def _swap_images(root: Path, files: dict[str, bytes]) -> dict[str, str]:
    """Give the first samples of the dataset new image files (name -> bytes); returns name -> sample key."""
    doc = json.loads((root / "dataset.json").read_text())
    assert len(doc["images"]) >= len(files)
    for im, (name, data) in zip(doc["images"], files.items()):
        (root / "images" / im["filename"]).unlink()
        (root / "images" / name).write_bytes(data)
        im["filename"] = name
    (root / "dataset.json").write_text(json.dumps(doc))
    by_name = {s.filename: s.key for s in load_dataset(root).samples}
    return {name: by_name[name] for name in files}


def _jpeg_with_stray_marker_in_scan(jpeg: bytes) -> bytes:
    """A complete JPEG (SOI ... EOI) whose entropy-coded data holds a stray SOI marker halfway through."""
    sos = jpeg.find(b"\xff\xda")
    mid = (sos + len(jpeg)) // 2
    return jpeg[:mid] + b"\xff\xd8" + jpeg[mid + 2 :]


def _quarantined(dest: Path) -> dict[str, str]:
    return {
        r["filename"]: r["reason"]
        for r in map(json.loads, (dest / "_quarantine/report.jsonl").read_text().splitlines())
    }


def test_structure_validation_quarantines_incomplete_files_and_keeps_complete_ones(synthetic, tmp_path):
    scene = _scene()
    jpeg, png, tiff = _encode(scene, "JPEG"), _encode(scene, "PNG"), _encode(scene, "TIFF")
    assert png.endswith(b"IEND\xaeB`\x82") and tiff[4:8] == struct.pack("<I", 8)  # Pillow: directory first
    six = write_tiff(
        np.random.default_rng(2).integers(0, 255, (20, 24, 6), dtype=np.uint8)
    )  # the band reader
    six_cut = bytearray(six)  # directory intact, but it promises a strip longer than the file
    entry = six_cut.find(struct.pack("<HHI", 279, 4, 1))
    six_cut[entry + 8 : entry + 12] = struct.pack("<I", 20 * 24 * 6 * 3)
    good = {
        "ok_padded.jpg": jpeg + bytes(37),  # zero padding after EOI, as some writers leave
        "ok_trailer.jpg": jpeg + b"APPENDED-METADATA",  # data appended after EOI: decoders ignore it
        "ok_png.png": png,
        "ok_tiff.tif": tiff,
        "ok_six.tif": six,
    }
    bad = {
        "no_eoi.jpg": jpeg[:-2],  # complete but for the end-of-image marker
        "cut_jpeg.jpg": jpeg[: len(jpeg) * 3 // 4],
        "no_iend.png": png[:-12],  # every pixel there (Pillow decodes it), but the file is incomplete
        "cut_png.png": png[: len(png) // 2],
        "cut_tiff.tif": tiff[: len(tiff) * 2 // 3],  # strip runs past the end of the file
        "cut_six.tif": bytes(six_cut),
        "empty.jpg": b"",
        "text.png": b"definitely not an image",
    }
    keys = _swap_images(synthetic, {**good, **bad})
    dest = tmp_path / "out"
    result = shard_dataset(synthetic, str(dest), max_bad_fraction=0.5, progress=False)  # default level

    m = result.manifest
    assert m["options"]["validate"] == "structure"
    reasons = _quarantined(dest)
    assert set(reasons) == set(bad) and m["bad"]["count"] == len(bad)
    assert (
        "no_eoi.jpg: truncated JPEG: no end-of-image marker (FFD9) after the scan data"
        in reasons["no_eoi.jpg"]
    )
    assert "cut_jpeg.jpg: truncated JPEG: no end-of-image marker" in reasons["cut_jpeg.jpg"]
    assert "no_iend.png: truncated PNG: no IEND chunk" in reasons["no_iend.png"]
    assert "cut_png.png: truncated PNG: chunk 'IDAT' at byte 33 declares" in reasons["cut_png.png"]
    assert re.search(
        rf"cut_tiff\.tif: truncated TIFF: strip 0 at byte \d+ \(\+{40 * 56 * 3} bytes\) ends past the end "
        rf"of the file \({len(tiff) * 2 // 3} bytes\)",
        reasons["cut_tiff.tif"],
    )
    assert (
        f"cut_six.tif: truncated TIFF: strip 0 at byte 8 (+{20 * 24 * 6 * 3} bytes)" in reasons["cut_six.tif"]
    )
    assert "empty file (0 bytes)" in reasons["empty.jpg"] and "not a recognised image" in reasons["text.png"]

    back = read_back(str(dest))
    assert len(back) == m["totals"]["samples"] == m["totals"]["listed"] - len(bad)
    for name, data in good.items():
        s = back[keys[name]]
        assert s["image"] == data  # stored as they are, padding and trailers included
        assert s["image_ext"] == Path(name).suffix[1:] and s["meta"]["format"] in ("JPEG", "PNG", "TIFF")
    assert (back[keys["ok_png.png"]]["meta"]["width"], back[keys["ok_six.tif"]]["meta"]["mode"]) == (
        56,
        "6xuint8",
    )


def test_full_validation_catches_corrupt_scan_data_that_structure_lets_through(synthetic, tmp_path):
    corrupt = _jpeg_with_stray_marker_in_scan(_encode(_scene(), "JPEG"))
    keys = _swap_images(synthetic, {"corrupt_scan.jpg": corrupt})
    structure_dest, full_dest = tmp_path / "structure", tmp_path / "full"

    lenient = shard_dataset(synthetic, str(structure_dest), maxcount=8, progress=False)
    assert lenient.manifest["bad"]["count"] == 0  # complete file: SOS, EOI, nothing missing
    assert read_back(str(structure_dest))[keys["corrupt_scan.jpg"]]["image"] == corrupt

    rc = cli_main(
        [
            "shard",
            str(synthetic),
            str(full_dest),
            "--maxcount",
            "8",
            "--validate",
            "full",
            "--max-bad-fraction",
            "0.1",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0
    strict = json.loads((full_dest / "_manifest.json").read_text())
    assert strict["options"]["validate"] == "full" and strict["bad"]["count"] == 1
    reason = _quarantined(full_dest)["corrupt_scan.jpg"]
    assert reason.startswith(
        "ImageDecodeError: corrupt_scan.jpg: truncated or corrupt JPEG data: broken data stream"
    )
    assert keys["corrupt_scan.jpg"] not in read_back(str(full_dest))
    assert strict["totals"]["samples"] == lenient.manifest["totals"]["samples"] - 1

    # the level decides what the shards hold, so a destination written at one level refuses the other
    with pytest.raises(DestinationConflictError, match=r"validate='structure' \(this run: 'full'\)"):
        shard_dataset(synthetic, str(structure_dest), maxcount=8, validation="full", progress=False)
    with pytest.raises(ValueError, match="--validate 'pixels': expected one of structure, full"):
        ShardOptions(validation="pixels")


def test_worker_processes_and_this_process_write_identical_bytes(synthetic, tmp_path, monkeypatch):
    reference = shard_dataset(synthetic, str(tmp_path / "one"), maxcount=3, workers=1, progress=False)

    # Start worker processes at once, and hold this process's first shard until a worker has committed one,
    # so that both kinds of writer write shards in this run.
    monkeypatch.setattr(shard_job, "MIN_WORK_FOR_WORKERS_S", 0.0)
    worker_done = threading.Event()
    real_write_shard = write_shard

    def write_after_a_worker(job, ctx, dataset):
        assert worker_done.wait(120), "no worker process committed a shard"
        return real_write_shard(job, ctx, dataset)

    monkeypatch.setattr(shard_job, "write_shard", write_after_a_worker)
    plan = plan_shards(synthetic, str(tmp_path / "two"), options=ShardOptions(maxcount=3))
    prepare_destination(plan)
    results = write_shards(plan, workers=2, progress=False, on_result=lambda r: worker_done.set())
    manifest = finalize(plan, results)

    assert worker_done.is_set() and len(results) == len(reference.manifest["shards"]) >= 6
    assert sha_files(tmp_path / "two") == sha_files(tmp_path / "one")
    assert manifest["shards"] == reference.manifest["shards"]


def test_tar_bytes_do_not_depend_on_how_writes_are_batched(tmp_path):
    """Members reach the file through HashingWriter's batches: the same tar (and hash) whatever the batch size."""
    from pipelines.fsio import HashingWriter

    big = np.random.default_rng(0).bytes(3 << 20)
    samples = [
        {"__key__": "small", "txt": b"caption", "jpg": b"\xff\xd8" + bytes(700), "cls": b"4"},
        {"__key__": "large", "json": b"{}", "tif": big},
        {"__key__": "x" * 120, "txt": b"a name too long for a plain ustar header"},
    ]

    def write(path: Path, batch_bytes: int) -> tuple[bytes, str]:
        with open(path, "wb") as f, HashingWriter(f, batch_bytes=batch_bytes) as out:
            tar = TarStream(out)
            for s in samples:
                tar.write_sample(s)
            tar.close()
        assert out.size == path.stat().st_size == tar.written
        return path.read_bytes(), out.hexdigest()

    batched, sha = write(tmp_path / "a.tar", 1 << 20)
    assert write(tmp_path / "b.tar", 0) == (batched, sha)  # every write handed over on its own
    assert hashlib.sha256(batched).hexdigest() == sha and len(batched) % TarStream.RECORD == 0
    with tarfile.open(tmp_path / "a.tar") as tf:
        names = tf.getnames()
        assert tf.extractfile("large.tif").read() == big and tf.extractfile("small.cls").read() == b"4"
        assert tf.extractfile("x" * 120 + ".txt").read().startswith(b"a name too long")
    assert names == ["small.cls", "small.jpg", "small.txt", "large.json", "large.tif", "x" * 120 + ".txt"]
