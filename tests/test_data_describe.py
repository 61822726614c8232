"""`ssjdn data describe`: the report, missing/unreadable images, exit codes, and the issue-2 acceptance on real data."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssjdn.data.describe import describe_dataset, format_report
from ssjdn.data.readers import load_dataset
from ssjdn.data.synthetic import generate_synthetic
from ssjdn_cli.main import main


@pytest.fixture
def synth(tmp_path):
    return generate_synthetic(tmp_path / "synth", n_per_class=4, size=32, classes=["forest", "lake", "beach"])


def describe_json(capsys, *argv) -> tuple[int, dict, str]:
    code = main(["data", "describe", *map(str, argv), "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def test_report_counts_match_the_generated_dataset(synth, capsys):
    code, r, err = describe_json(capsys, synth)
    assert code == 0, err
    assert (r["dataset"], r["format"], r["images"], r["captions"]) == ("synthetic", "karpathy", 12, 60)
    assert r["captions_per_image"] == {"mean": 5.0, "min": 5, "max": 5}
    assert r["classes"] == {
        "count": 3,
        "counts": {"beach": 4, "forest": 4, "lake": 4},
        "unlabelled_images": 0,
    }
    assert {k: v["images"] for k, v in r["splits"].items()} == {"train": 6, "val": 3, "test": 3}
    assert r["image_check"]["mode"] == "decode" and r["image_check"]["readable"] == 12
    assert r["image_check"]["formats"] == {"JPEG": 12} and r["image_check"]["min_size"] == [32, 32]
    assert r["missing_images"] == {"count": 0, "first": []} and r["unreadable_images"]["count"] == 0


def test_duplicate_caption_ratio(tmp_path, capsys):
    images = [
        {"filename": f"{i}.jpg", "split": "train", "sentences": [{"raw": c} for c in caps]}
        for i, caps in enumerate([["a", "a", "b"], ["b", "c", "d"]])
    ]
    (tmp_path / "dataset.json").write_text(json.dumps({"images": images}))
    code, r, _ = describe_json(capsys, tmp_path, "--allow-missing")
    assert code == 0
    assert r["duplicate_captions"] == {"captions": 6, "distinct": 4, "ratio": round(1 - 4 / 6, 4)}


def test_missing_images_exit_non_zero_and_are_named(synth, capsys):
    gone = ["beach_0001.jpg", "lake_0002.jpg", "lake_0003.jpg"]
    for name in gone:
        (synth / "images" / name).unlink()
    code = main(["data", "describe", str(synth)])
    out, err = capsys.readouterr()
    assert code == 1
    assert f"error: 3 of 12 images are missing from {synth / 'images'} (first: {', '.join(gone)})" in err
    assert "missing images: 3" in out and "lake_0003.jpg" in out
    code, r, _ = describe_json(capsys, synth, "--allow-missing", "--show", "2")
    assert code == 0 and r["missing_images"] == {"count": 3, "first": gone[:2]}
    assert r["image_check"]["readable"] == 9


def test_images_option_points_elsewhere(synth, tmp_path, capsys):
    moved = tmp_path / "moved"
    (synth / "images").rename(moved)
    code, r, _ = describe_json(capsys, synth, "--allow-missing")
    assert r["missing_images"]["count"] == 12
    code, r, _ = describe_json(capsys, synth, "--images", moved)
    assert code == 0 and r["image_root"] == str(moved) and r["missing_images"]["count"] == 0


def test_zero_byte_and_truncated_images_are_unreadable(synth, capsys):
    (synth / "images" / "forest_0000.jpg").write_bytes(b"")
    # A noisy JPEG big enough that cutting off its last third leaves the header whole.
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(buf, "JPEG")
    (synth / "images" / "lake_0001.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    code = main(["data", "describe", str(synth)])
    out, err = capsys.readouterr()
    assert code == 1
    assert (
        "error: 2 images are unreadable: forest_0000.jpg: empty file (0 bytes); lake_0001.jpg: truncated"
        in err
    )
    code, r, _ = describe_json(capsys, synth, "--allow-unreadable")
    assert code == 0
    assert [u["file"] for u in r["unreadable_images"]["first"]] == ["forest_0000.jpg", "lake_0001.jpg"]
    # A header-only check cannot see the truncation; existence checks see neither.
    _, r, _ = describe_json(capsys, synth, "--allow-unreadable", "--check", "header")
    assert [u["file"] for u in r["unreadable_images"]["first"]] == ["forest_0000.jpg"]
    _, r, _ = describe_json(capsys, synth, "--check", "exists")
    assert r["unreadable_images"]["count"] == 0 and r["image_check"]["readable"] == 12


def test_quarantined_records_are_counted_and_named(tmp_path, capsys):
    images = [
        {"filename": "a_1.jpg", "split": "train", "sentences": [{"raw": "ok"}, {"raw": " "}]},
        {"filename": "b_1.jpg", "split": "test", "sentences": [{"raw": ""}]},
    ]
    (tmp_path / "dataset.json").write_text(json.dumps({"dataset": "q", "images": images}))
    code, r, _ = describe_json(capsys, tmp_path, "--check", "none")
    assert code == 0
    assert (r["images"], r["captions"], r["usable_images"], r["usable_captions"]) == (2, 3, 1, 1)
    assert r["splits"]["test"] == {"images": 1, "captions": 1, "distinct_captions": 0}
    assert r["quarantined"]["records"] == 2 and r["quarantined"]["images"] == 1
    assert "images[1] (b_1.jpg): 1 of 1 captions empty" in r["quarantined"]["first"][1]


def test_unusable_dataset_exits_2_with_the_reason(tmp_path, capsys):
    (tmp_path / "dataset.json").write_text("{broken")
    assert main(["data", "describe", str(tmp_path)]) == 2
    assert "malformed JSON at line 1, column 2" in capsys.readouterr().err
    assert main(["data", "describe", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_text_report(synth):
    text = format_report(describe_dataset(load_dataset(synth)))
    assert "images     12 listed, 12 usable" in text
    assert (
        "splits     train 6 images / 30 captions, val 3 images / 15 captions, test 3 images / 15 captions"
        in text
    )
    assert "  forest                   4" in text


# --- acceptance on the real data (issue 2) --------------------------------------------------------------------


@pytest.mark.integration
def test_acceptance_ucm_console_script(ucm_dir):
    exe = Path(sys.executable).with_name("ssjdn")
    proc = subprocess.run(
        [str(exe), "data", "describe", str(ucm_dir), "--json"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert (r["images"], r["captions"], r["classes"]["count"]) == (2000, 10000, 21)
    counts = sorted(r["classes"]["counts"].values())
    assert counts == [90] * 10 + [100] * 11
    assert {k: v["images"] for k, v in r["splits"].items()} == {"train": 1680, "val": 110, "test": 210}
    assert r["image_check"]["readable"] == 2000 and r["missing_images"]["count"] == 0
    assert r["unreadable_images"]["count"] == 0


@pytest.mark.integration
def test_acceptance_rsitmd_without_images(precomp_dir, tmp_path, capsys):
    empty = tmp_path / "no-images"
    empty.mkdir()
    rsitmd = precomp_dir / "rsitmd_precomp"
    assert main(["data", "describe", str(rsitmd), "--images", str(empty)]) == 1
    err = capsys.readouterr().err
    assert "error: 4743 of 4743 images are missing" in err
    assert "(first: baseballfield_452.tif, baseballfield_453.tif, baseballfield_454.tif" in err

    code, r, _ = describe_json(capsys, rsitmd, "--images", empty, "--allow-missing")
    assert code == 0
    assert r["splits"]["train"]["images"] == 4291 and r["splits"]["train"]["captions"] == 21455
    assert r["splits"]["test"]["images"] == 452 and r["splits"]["test"]["captions"] == 2260
    assert r["missing_images"]["count"] == 4743
    # The 4 train images whose 5 caption lines are all blank in the published files are reported, not hidden.
    assert (r["quarantined"]["images"], r["quarantined"]["captions"]) == (4, 20)
    assert r["usable_captions"] == 21455 + 2260 - 20
