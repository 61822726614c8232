"""Quality benchmark harness: real train-local runs on a tiny synthetic dataset; table/JSON structure; resume."""

from __future__ import annotations

import json

import pytest

from benchmarks import quality
from ssjdn.data.synthetic import CLASSES, generate_synthetic


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    # The tiny config expects 4 scene classes (lsd_cfg.num_classes: 4).
    return generate_synthetic(
        tmp_path_factory.mktemp("qdata"), n_per_class=4, classes=list(CLASSES[:4]), size=64
    )


def test_queue_puts_acceptance_pair_first():
    order = quality.queue_order(["bsd", "vsepp", "stl", "full"], [0, 1])
    assert order[:4] == [("vsepp", 0), ("full", 0), ("vsepp", 1), ("full", 1)]
    assert order[4:] == [("bsd", 0), ("stl", 0), ("bsd", 1), ("stl", 1)]


def test_ablation_overrides_are_real_config_keys():
    from ssjdn.config import load_config

    for name, overrides in quality.CONFIGS.items():
        cfg = load_config("cpu-small", overrides)  # raises on an unknown key or a bad value
        assert cfg.model.bsd == overrides["model.bsd"] and cfg.model.lsd == overrides["model.lsd"], name


def test_benchmark_writes_table_and_json_and_skips_finished_runs(tiny_data, tmp_path):
    out = tmp_path / "bench"
    argv = [
        "--data",
        str(tiny_data),
        "--configs",
        "vsepp,full",
        "--seeds",
        "1",
        "--epochs",
        "1",
        "--base-config",
        "tiny",
        "--out",
        str(out),
        "--jobs",
        "2",
    ]
    first = quality.main(argv)
    assert sorted((r["spec"]["config"], r["status"]) for r in first) == [
        ("full", "trained"),
        ("vsepp", "trained"),
    ]

    results = json.loads((out / "results.json").read_text())
    assert {r["spec"]["config"] for r in results["runs"]} == {"vsepp", "full"}
    for run in results["runs"]:
        test = run["test"]
        assert run["spec"]["overrides"]["train.seed"] == 0
        assert test["n_images"] > 0 and test["n_captions"] == 5 * test["n_images"]
        for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mr", "cls_mr"):
            assert 0.0 <= test[k] <= 100.0, k
        assert run["best_epoch"] == 1
    # The vsepp run really trained without BSD/LSD, the full one with them.
    vsepp_cfg = (out / "runs" / "vsepp-s0" / "config.yaml").read_text()
    assert "bsd: false" in vsepp_cfg and "lsd: false" in vsepp_cfg and "name: triplet" in vsepp_cfg

    table = (out / "results.md").read_text()
    assert "| config | seeds |" in table and "| mR |" in table
    assert table.count("\n| vsepp | 1 |") == 1 and table.count("\n| full | 1 |") == 1
    assert f"{results['summary']['full']['mean']['mr']:.2f}" in table

    mtime = (out / "runs" / "full-s0" / "best.pt").stat().st_mtime_ns
    again = quality.main(argv)
    assert {r["status"] for r in again} == {"skipped"}
    assert (out / "runs" / "full-s0" / "best.pt").stat().st_mtime_ns == mtime
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]

    with pytest.raises(SystemExit, match="different spec"):  # a changed budget never reuses an old run
        quality.main([*argv[:-4], "--out", str(out), "--jobs", "1", "--max-steps-per-epoch", "1"])
