"""Quality benchmark harness: real train-local runs on a tiny synthetic dataset; table/JSON structure; resume."""

from __future__ import annotations

import json
import shutil

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


def test_a_fine_curve_run_is_its_own_record():
    # A run recorded with per-epoch points only must not stand in for the convergence table's 10-step curve.
    base = "--data d/ucm-captions --configs full --seed-list 0 --epochs 3 --out o".split()
    plain = quality.run_spec("full", 0, quality.parse_args(base))
    fine = quality.run_spec("full", 0, quality.parse_args([*base, "--convergence"]))
    assert "curve_every" not in plain and fine["curve_every"] == 10
    assert quality.record_name(plain) == "ucm-captions--cpu-small--full--e3--s0.json"
    assert quality.record_name(fine) == "ucm-captions--cpu-small--full--e3--c10--s0.json"
    assert not quality._same_spec(plain, fine)


def test_a_record_made_under_an_old_default_no_longer_matches(tmp_path, monkeypatch):
    # Records name their base config; when a default in that YAML changes, the full resolved configuration is
    # what tells an old record from the new run, and an override that pins the old value makes it match again.
    base = tmp_path / "base.yaml"
    base.write_text("base: tiny\n")
    argv = f"--data d/ucm-captions --configs full --epochs 3 --out o --base-config {base}".split()
    recorded = quality.run_spec("full", 0, quality.parse_args(argv))
    base.write_text("base: tiny\nmodel: {bsd_cfg: {scale_loss_weight: 0.5}}\n")
    now = quality.run_spec("full", 0, quality.parse_args(argv))
    assert now["overrides"] == recorded["overrides"] and not quality._same_spec(recorded, now)
    monkeypatch.setitem(
        quality.CONFIGS, "full", {**quality.CONFIGS["full"], "model.bsd_cfg.scale_loss_weight": 0.0}
    )
    pinned = quality.run_spec("full", 0, quality.parse_args(argv))
    assert pinned["overrides"] != recorded["overrides"] and quality._same_spec(recorded, pinned)
    # Through a JSON record and back, and for a record made before `resolved` existed.
    assert quality._same_spec(json.loads(json.dumps(recorded)), pinned)
    legacy = {k: v for k, v in recorded.items() if k != "resolved"}
    assert quality._same_spec(legacy, recorded) and not quality._same_spec(legacy, {**recorded, "seed": 1})


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
        "--records",
        str(tmp_path / "records"),
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
    val = {c: results["summary"][c]["val_mr_mean"] for c in ("full", "vsepp")}
    best, other = sorted(val, key=lambda c: -val[c])
    assert f"{best} {val[best]:.2f} > {other} {val[other]:.2f}" in table  # the val ranking picks defaults

    mtime = (out / "runs" / "full-s0" / "best.pt").stat().st_mtime_ns
    again = quality.main(argv)
    assert {r["status"] for r in again} == {"skipped"}
    assert (out / "runs" / "full-s0" / "best.pt").stat().st_mtime_ns == mtime
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]

    # The committed records alone make a fresh OUT (another machine: no runs/) skip the finished runs.
    records = sorted(p.name for p in (tmp_path / "records").glob("*.json"))
    assert records == [f"{tiny_data.name}--tiny--{c}--e1--s0.json" for c in ("full", "vsepp")]
    fresh = quality.main(
        [*argv[: argv.index("--out") + 1], str(tmp_path / "fresh"), *argv[argv.index("--out") + 2 :]]
    )
    assert {r["status"] for r in fresh} == {"skipped"} and not (tmp_path / "fresh" / "runs").exists()
    assert json.loads((tmp_path / "fresh" / "results.json").read_text())["summary"] == results["summary"]
    # --report-only trains nothing: an unrecorded configuration is just left out
    report = [*argv, "--report-only"]
    report[report.index("vsepp,full")] = "vsepp,full,lsd_stl"
    report[report.index("--out") + 1] = str(tmp_path / "report")
    assert sorted(r["spec"]["config"] for r in quality.main(report)) == ["full", "vsepp"]
    assert not (tmp_path / "report" / "runs").exists()
    rec = json.loads((tmp_path / "records" / records[0]).read_text())
    assert rec["spec"]["data"] == tiny_data.name  # portable: the folder name, not this machine's path
    assert rec["load_avg_1m"]["mean"] >= 0 and [p["epoch"] for p in rec["curve"]] == [0, 1]
    assert rec["machine"]["cpu"] and rec["machine"]["torch"]  # results compare only on one machine kind

    with pytest.raises(SystemExit, match="different spec"):  # a changed budget never reuses an old run
        quality.main([*argv[:-6], "--out", str(out), "--jobs", "1", "--max-steps-per-epoch", "1"])
    with pytest.raises(SystemExit, match="different spec"):  # nor does a changed configuration
        bad = dict(quality.CONFIGS["vsepp"], **{"loss.margin": 0.3})
        try:
            quality.CONFIGS["vsepp"], old = bad, quality.CONFIGS["vsepp"]
            quality.main(
                [*argv[: argv.index("--out") + 1], str(tmp_path / "fresh2"), *argv[argv.index("--out") + 2 :]]
            )
        finally:
            quality.CONFIGS["vsepp"] = old


def test_variant_configs_are_full_plus_one_bsd_change():
    from ssjdn.config import load_config

    full = quality.CONFIGS["full"]
    for name, extra in quality.BSD_VARIANTS.items():
        assert quality.CONFIGS[name] == {**full, **extra} and len(extra) == 1, name
        cfg = load_config("cpu-small", quality.CONFIGS[name])
        assert cfg.model.bsd and cfg.model.lsd and cfg.loss.name == "stl"
    # lsd_stl is full with only BSD off; the variant keys have no effect without BSD
    assert quality.CONFIGS["lsd_stl"] == {**full, "model.bsd": False}


def test_every_bsd_configuration_is_paired_with_its_twin_without_bsd():
    names = list(quality.CONFIGS)
    pairs = dict(p for p in quality.default_pairs(names) if p[1] != "vsepp" or p[0] == "bsd")
    assert pairs["full"] == pairs["full_scaleloss"] == pairs["full_content"] == "lsd_stl"
    assert pairs["full_stlnce"] == pairs["full_stlnce_scaleloss"] == "lsd_stlnce"
    assert pairs["bsd"] == "vsepp" and "infonce" not in pairs  # no infonce network without BSD is measured
    assert {("full", "vsepp"), (quality.DEFAULT_CONFIG, "vsepp")} <= set(quality.default_pairs(names))
    assert quality.default_pairs(["full", "vsepp"]) == [("full", "vsepp")]  # a twin must be among the runs


def test_convergence_mode_curves_table_and_plot(tiny_data, tmp_path):
    out = tmp_path / "conv"
    argv = [
        "--data",
        str(tiny_data),
        "--convergence",
        "--configs",
        "full,full_triplet",
        "--seeds",
        "1",
        "--epochs",
        "2",
        "--curve-every",
        "1",
        "--base-config",
        "tiny",
        "--out",
        str(out),
        "--jobs",
        "1",
        "--records",
        str(tmp_path / "records"),
        "--plot",
        str(tmp_path / "img" / "convergence.png"),
    ]
    recs = quality.main(argv)
    assert sorted(f.name.split("--")[-4:] for f in (tmp_path / "records").iterdir()) == [
        ["full", "e2", "c1", "s0.json"],
        ["full_triplet", "e2", "c1", "s0.json"],
    ]
    steps_per_epoch = recs[0]["curve"][-1]["step"] // 2
    for r in recs:
        steps = [p["step"] for p in r["curve"]]
        # untrained, every step of epoch 1 (evaluated in the train-local process), then each epoch end
        assert steps == [0, *range(1, steps_per_epoch), steps_per_epoch, 2 * steps_per_epoch]
        assert all(0 <= p["val_mr"] <= 100 for p in r["curve"])
    conv = json.loads((out / "convergence.json").read_text())
    finals = [conv["configs"][c]["final_val_mr_mean"] for c in ("full", "full_triplet")]
    assert conv["target"] == pytest.approx(0.8 * max(finals))
    assert "steps to target" in (out / "convergence.md").read_text()
    assert (tmp_path / "img" / "convergence.png").read_bytes()[:4] == b"\x89PNG"

    # The extra evaluations do not change the training: same metrics as a run without the curve.
    plain = quality.main(
        [*argv[: argv.index("--out") + 1], str(tmp_path / "plain"), "--jobs", "1", "--records", "none"]
        + ["--curve-every", "0"]
    )
    by_cfg = {r["spec"]["config"]: r for r in recs}
    for r in plain:
        assert r["test"] == by_cfg[r["spec"]["config"]]["test"]
        assert [p["step"] for p in r["curve"]] == [0, steps_per_epoch, 2 * steps_per_epoch]


def test_paired_differences_and_convergence_steps():
    def rec(config, seed, mr, curve=()):
        return {
            "spec": {"config": config, "seed": seed},
            "test": {"mr": mr},
            "val": {"mr": mr},
            "curve": [{"step": s, "epoch": e, "val_mr": v} for s, e, v in curve],
        }

    records = [rec("full", 0, 20.0), rec("full", 1, 22.0), rec("lsd_stl", 0, 19.0), rec("lsd_stl", 1, 19.5)]
    p = quality.paired_differences(records, "full", "lsd_stl")
    assert p["seeds"] == [0, 1] and p["diffs"] == [1.0, 2.5] and p["mean"] == pytest.approx(1.75)
    records = [
        rec("full", 0, 0, [(0, 0, 1.0), (10, None, 10.5), (52, 1, 12.0), (104, 2, 20.0)]),
        rec("full_triplet", 0, 0, [(0, 0, 1.0), (10, None, 4.0), (52, 1, 10.0), (104, 2, 18.0)]),
    ]
    conv = quality.convergence(records, ["full", "full_triplet"])
    assert conv["target"] == pytest.approx(16.0)
    assert conv["configs"]["full"]["steps_to_target"] == [104]
    assert conv["configs"]["full_triplet"]["steps_to_target"] == [104]
    conv = quality.convergence(records, ["full", "full_triplet"], fraction=0.5)  # target 10
    assert conv["configs"]["full"]["steps_to_target"] == [10]
    assert conv["configs"]["full_triplet"]["steps_to_target"] == [52]


def test_the_end_of_budget_reading_beside_the_best_val_checkpoint():
    def rec(config, seed, best_epoch, test_by_epoch):
        return {
            "spec": {"config": config, "seed": seed, "epochs": len(test_by_epoch)},
            "best_epoch": best_epoch,
            "test": {"mr": test_by_epoch[best_epoch - 1]},
            "val": {"mr": 30.0},
            "train_s": 1.0,
            "curve": [{"step": 0, "epoch": 0, "val_mr": 1.0, "test_mr": 1.0}]
            + [{"step": 5, "epoch": None, "val_mr": 9.0, "test_mr": None}]  # a fine-curve point has no test
            + [
                {"step": 10 * e, "epoch": e, "val_mr": 30.0, "test_mr": t}
                for e, t in enumerate(test_by_epoch, 1)
            ],
        }

    # seed 1 of "full" picked epoch 1 on val: its best-val test mR is low, its end-of-budget one is not
    records = [
        rec("full", 0, 3, [10.0, 18.0, 22.0]),
        rec("full", 1, 1, [12.0, 20.0, 24.0]),
        rec("lsd_stl", 0, 3, [9.0, 17.0, 20.0]),
        rec("lsd_stl", 1, 3, [9.0, 16.0, 19.0]),
    ]
    assert quality.last_epoch_test_mr(records[1]) == 24.0
    assert (
        quality.last_epoch_test_mr({"spec": {"epochs": 3}, "curve": records[1]["curve"][:3]}) is None
    )  # cut short
    best = quality.paired_differences(records, "full", "lsd_stl")
    last = quality.paired_differences(records, "full", "lsd_stl", split="last")
    assert best["diffs"] == [2.0, -7.0] and best["positive"] == 1
    assert last["diffs"] == [2.0, 5.0] and last["positive"] == 2 and last["split"] == "last"
    agg = quality.aggregate(records, ["full", "lsd_stl"])
    assert agg["full"]["last_mr_mean"] == pytest.approx(23.0) and agg["full"]["mean"]["mr"] == pytest.approx(
        17.0
    )
    table = quality.markdown_table(agg)
    assert "| mR last epoch |" in table and "| 23.00 ± 1.41 |" in table
    details = quality.details_markdown(agg, [best, last])
    assert "s1 12.00 (30.00) [best val at epoch 1; last epoch 24.00]" in details
    assert "s0 22.00 (30.00)," in details  # no note where the best-val epoch is the last one
    assert "- full − lsd_stl: -2.50 ± 6.36, positive on 1 of 2" in details
    assert "- full − lsd_stl: +3.50 ± 2.12, positive on 2 of 2" in details
    same = quality.paired_differences(records[:1] + records[2:3], "full", "lsd_stl", split="last")
    kept = quality.paired_differences(records[:1] + records[2:3], "full", "lsd_stl")
    assert quality.details_markdown(agg, [kept, same]).count("- full − lsd_stl:") == 1  # equal: not repeated


def test_report_only_names_a_broken_record_keeps_it_and_reports_the_rest(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    good = "ucm-captions--cpu-small--full--e3--s0.json"
    shutil.copy(quality.DEFAULT_RECORDS / good, records / good)
    broken = records / "ucm-captions--cpu-small--full--e3--s1.json"
    broken.write_text('{"spec": {"config": "full"')  # cut short mid-write
    argv = ["--data", str(tmp_path / "ucm-captions"), "--configs", "full", "--seeds", "2", "--epochs", "3"]
    argv += ["--out", str(tmp_path / "out"), "--report-only"]
    with pytest.raises(SystemExit, match=r"1 run\(s\) failed: .*s1\.json: not a readable result record"):
        quality.main([*argv, "--records", str(records)])
    assert broken.read_text() == '{"spec": {"config": "full"'  # nothing deleted or rewritten
    assert "\n| full | 1 |" in (tmp_path / "out" / "results.md").read_text()  # the good record is reported
    with pytest.raises(SystemExit, match="--records .*missing: not a folder of result records"):
        quality.main([*argv, "--records", str(tmp_path / "missing")])


def test_the_presets_train_the_default_configuration():
    from ssjdn.config import load_config

    # cpu-small with no override is the configuration the report names as the default
    assert quality.resolved_config("cpu-small", {}) == quality.resolved_config(
        "cpu-small", quality.CONFIGS[quality.DEFAULT_CONFIG]
    )
    default_loss = quality.CONFIGS[quality.DEFAULT_CONFIG]["loss.name"]
    for preset in ("ucm", "rsicd", "rsitmd", "sydney"):
        cfg = load_config(preset, {})
        assert cfg.loss.name == default_loss and cfg.model.bsd and cfg.model.lsd, preset
    # every measured configuration names its loss, so the YAML default cannot change what a record means
    assert all("loss.name" in overrides for overrides in quality.CONFIGS.values())
