"""The synthetic dataset generator: Karpathy layout, determinism, splits, and captions that match the pixels."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ssjdn.data.images import decode_image, read_image_bytes
from ssjdn.data.readers import load_dataset
from ssjdn.data.synthetic import CLASSES, generate_synthetic, render_scene


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("synth"), n_per_class=8, seed=3, size=48)


def test_karpathy_layout_and_labels(synth):
    doc = json.loads((synth / "dataset.json").read_text())
    assert doc["dataset"] == "synthetic"
    assert len(doc["images"]) == 8 * len(CLASSES)
    first = doc["images"][0]
    assert set(first) >= {"filename", "imgid", "split", "sentids", "sentences"}
    assert len(first["sentences"]) == 5 and all(s["raw"] and s["tokens"] for s in first["sentences"])
    labels = (synth / "labels.csv").read_text().splitlines()
    assert labels[0] == "filename,class" and len(labels) == 1 + 8 * len(CLASSES)
    for img in doc["images"]:
        assert (synth / "images" / img["filename"]).is_file()
    sentids = [i for img in doc["images"] for i in img["sentids"]]
    assert sentids == list(range(len(sentids)))


def test_reads_back_with_every_class_in_every_split(synth):
    ds = load_dataset(synth)
    assert ds.classes == sorted(CLASSES)
    assert Counter(s.class_name for s in ds.samples) == {c: 8 for c in CLASSES}
    for split in ("train", "val", "test"):
        assert {s.class_name for s in ds.by_split(split)} == set(CLASSES)
    assert ds.split_counts() == {"train": 6 * len(CLASSES), "val": len(CLASSES), "test": len(CLASSES)}
    img = decode_image(read_image_bytes(ds.samples[0].source), ds.samples[0].filename)
    assert img.size == (48, 48) and img.mode == "RGB"


def test_deterministic_by_seed(tmp_path):
    a = generate_synthetic(tmp_path / "a", n_per_class=3, seed=5, size=32, classes=["lake", "forest"])
    b = generate_synthetic(tmp_path / "b", n_per_class=3, seed=5, size=32, classes=["lake", "forest"])
    c = generate_synthetic(tmp_path / "c", n_per_class=3, seed=6, size=32, classes=["lake", "forest"])
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "images/lake_0000.jpg").read_bytes() != (c / "images/lake_0000.jpg").read_bytes()
    assert (a / "dataset.json").read_bytes() != (c / "dataset.json").read_bytes()
    # Re-running into the same folder is safe and gives the same files.
    generate_synthetic(tmp_path / "a", n_per_class=3, seed=5, size=32, classes=["lake", "forest"])
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_captions_vary_and_describe_the_drawn_scene():
    ds_captions, lake_checks = [], 0
    for i in range(12):
        img, attrs = render_scene("lake", seed=0, index=i, size=64)
        arr = np.asarray(img, dtype=float)
        blue = arr[:, :, 2] - arr[:, :, 1]  # water is bluer than land
        halves = {
            "on the left": blue[:, :32].mean() > blue[:, 32:].mean(),
            "on the right": blue[:, 32:].mean() > blue[:, :32].mean(),
            "at the top": blue[:32].mean() > blue[32:].mean(),
            "at the bottom": blue[32:].mean() > blue[:32].mean(),
        }
        if attrs["pos"] in halves:
            assert halves[attrs["pos"]], f"lake {i} said {attrs['pos']!r} but the water is elsewhere"
            lake_checks += 1
        ds_captions.append(attrs["pos"])
    assert lake_checks >= 4 and len(set(ds_captions)) >= 3


def test_classes_look_different():
    """Mean colour alone tells several classes apart: the scenes are not noise with a label."""
    means = {
        c: np.mean(
            [np.asarray(render_scene(c, seed=0, index=i, size=48)[0], float).mean((0, 1)) for i in range(4)],
            axis=0,
        )
        for c in ("forest", "beach", "parking", "lake")
    }
    assert means["forest"][1] > means["forest"][0] + 20  # green
    assert means["beach"][0] > means["forest"][0] + 60  # sand is bright
    names = list(means)
    dists = [np.linalg.norm(means[a] - means[b]) for i, a in enumerate(names) for b in names[i + 1 :]]
    assert min(dists) > 10


def test_each_image_gets_distinct_captions(synth):
    ds = load_dataset(synth)
    assert all(len(s.captions) == 5 for s in ds.samples)
    assert np.mean([len(set(s.captions)) for s in ds.samples]) == 5
    airport = next(s for s in ds.samples if s.class_name == "airport")
    assert any("runway" in c for c in airport.captions)


@pytest.mark.parametrize("fmt,pil", [("png", "PNG"), ("tif", "TIFF")])
def test_other_image_formats(tmp_path, fmt, pil):
    out = generate_synthetic(tmp_path, n_per_class=1, size=32, classes=["river"], image_format=fmt)
    path = out / "images" / f"river_0000.{fmt}"
    with Image.open(path) as im:
        assert im.format == pil and im.size == (32, 32)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic classes"):
        generate_synthetic(tmp_path, classes=["volcano"])
    with pytest.raises(ValueError, match="image_format"):
        generate_synthetic(tmp_path, image_format="gif")
