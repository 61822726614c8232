"""The main job end to end: the `ssjdn-demo` flow on a real Prefect server, a real local Ray and a moto S3 store."""

from __future__ import annotations

import json
import math

import pytest

from pipelines.report import demo_steps as demo
from tests.browser import count_loaded_images


def test_chance_level_matches_its_definition():
    # 4 images with 2 captions each: t2i R@1 = 1/4; i2t R@1 = P(top caption is one of the image's 2 of 8) = 2/8.
    chance = demo.chance_metrics(4, [0, 0, 1, 1, 2, 2, 3, 3], ks=(1, 5, 10))
    assert chance["t2i_r1"] == pytest.approx(25.0)
    assert chance["i2t_r1"] == pytest.approx(25.0)
    assert chance["i2t_r5"] == pytest.approx(100 * (1 - math.comb(6, 5) / math.comb(8, 5)))
    assert chance["t2i_r10"] == pytest.approx(100.0)  # K beyond the gallery: everything is found


def test_synthetic_fallback_is_labelled(tmp_path):
    chosen = demo.resolve_data("synthetic", tmp_path)
    assert chosen.synthetic and "SYNTHETIC" in chosen.label
    assert (tmp_path / "synthetic-data" / "dataset.json").exists()
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        demo.resolve_data(str(tmp_path / "no-such-dir"), tmp_path)


@pytest.mark.integration
def test_demo_flow_end_to_end_on_s3(s3_server, s3_bucket, prefect_server, tmp_path):
    import fsspec

    from flows.demo import ssjdn_demo

    out = tmp_path / "out"
    store = f"s3://{s3_bucket}/demo"
    summary = ssjdn_demo(
        data="synthetic",
        store=store,
        out=str(out),
        epochs=2,
        config="tiny",
        overrides={"model.lsd_cfg.num_classes": 0},
    )

    for name in ("metrics.json", "results.md", "training_curve.png", "report.html"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["synthetic"] is True
    assert (
        "SYNTHETIC" in (out / "results.md").read_text() and "SYNTHETIC" in (out / "report.html").read_text()
    )
    test = metrics["test"]
    assert set(test) == {"SSJDN (trained)", "untrained", "chance"}
    n_test = len([1 for _ in demo.load_split_records(metrics["shards"], "test", lambda img: 0)])
    assert test["SSJDN (trained)"]["n_images"] == n_test
    assert test["SSJDN (trained)"]["mr"] > test["chance"]["mr"], test

    # Everything the job wrote went to the object store.
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_server["endpoint_url"]})
    assert fs.exists(f"{summary['shards']}/_manifest.json".removeprefix("s3://"))
    assert fs.exists(f"{summary['run']}/metrics.jsonl".removeprefix("s3://"))
    assert fs.exists(f"{summary['checkpoint']}".removeprefix("s3://"))
    assert fs.exists(f"{summary['embeddings']}/_manifest.json".removeprefix("s3://"))

    # Every picture in the report loads in a real browser: 4 queries x 5 results, the query image, the curve.
    total, loaded = count_loaded_images(out / "report.html")
    assert total == 4 * 5 + 1 + 1
    assert loaded == total
