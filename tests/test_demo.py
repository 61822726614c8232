"""The main job end to end: `ssjdn demo` (the `ssjdn-demo` flow) on a real Prefect server, a real local Ray and a
moto S3 store, and what it prints."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from pipelines.report import demo_steps as demo
from tests.browser import count_loaded_images
from tests.conftest import REPO


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


# What must never reach a user's terminal on a clean run: Ray's, torch's and transformers' own messages (they go to
# the log file whose path the command prints). The pipeline's own lines may say "bad" or "failed" in counts.
NOISE = re.compile(
    r"traceback|exception|error|warn|core_worker|\.cc:\d+|PlacementGroupCleaner|TrainController|LOAD REPORT|"
    r"repeated \d+x|Progress bars|Setting up process group|Reporting training result|Checkpoint successfully",
    re.IGNORECASE,
)


def noise_lines(output: str) -> list[str]:
    """The lines of a command's output that are library noise (the project's own WARNING lines are not)."""
    own = re.compile(r"^\S+ \S+ (INFO|WARNING) (pipelines|ssjdn|flows)[.\w]*: ")
    return [
        line
        for line in output.splitlines()
        if NOISE.search(line) and not own.match(line) and " 0 unit(s) failed" not in line
    ]


def test_noise_filter_catches_what_the_demo_used_to_print():
    seen = [
        "(TrainController pid=1) Requesting resources: {'CPU': 1.0} * 2",
        "[2026-12-02 00:41:58,451 E 20467 20467] core_worker.cc:2465: Actor with class name: 'MapWorker'",
        "(PlacementGroupCleaner pid=2) Exception in thread PlacementGroupCleanerMonitor:",
        "(RayTrainWorker pid=3) Reporting training result 1: TrainingReport(checkpoint=None)",
        "2026-12-02 00:40:21,184 WARNING ray.data: Progress bars disabled",
    ]
    fine = [
        "2026-12-02 00:40:21,184 WARNING pipelines.report.demo_steps: SYNTHETIC DATA (procedurally generated)",
        "(RayTrainWorker pid=3) epoch 1/2: 280 samples in 5.9s (47.4/s), loss 4.6280, val mR 17.22 (best), 0 bad",
        "2026-12-02 00:42:24 INFO prefect.task_runs: embedded 60 images (0 bad sample(s) skipped, 0 unit(s) failed)",
    ]
    assert noise_lines("\n".join(seen + fine)) == seen


@pytest.mark.integration
def test_demo_command_end_to_end_on_s3_prints_no_library_noise(
    s3_server, s3_bucket, prefect_server, tmp_path
):
    """`ssjdn demo` as a user runs it (a real process, a real Prefect server, a local Ray, the moto S3 store):
    every output lands, the report's pictures load in Chromium, and the terminal shows the pipeline's own lines
    only - Ray's and transformers' messages are in the log file it names."""
    import fsspec

    out = tmp_path / "out"
    store = f"s3://{s3_bucket}/demo"
    env = {**os.environ, **prefect_server["env"], "SSJDN_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    args = ["--data", "synthetic", "--store", store, "--out", str(out), "--epochs", "2", "--config", "tiny"]
    done = subprocess.run(
        [sys.executable, "-m", "ssjdn_cli.main", "demo", *args, "--set", "model.lsd_cfg.num_classes=0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert not noise_lines(output), "\n".join(noise_lines(output))
    logs = list((tmp_path / "cache" / "logs").glob("ssjdn-demo-*.log"))
    assert logs and str(logs[0]) in output  # where the libraries' messages went is said
    metrics = json.loads((out / "metrics.json").read_text())

    for name in ("metrics.json", "results.md", "training_curve.png", "report.html"):
        assert (out / name).stat().st_size > 0, name
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
    assert fs.exists(f"{metrics['shards']}/_manifest.json".removeprefix("s3://"))
    assert fs.exists(f"{metrics['run']}/metrics.jsonl".removeprefix("s3://"))
    assert fs.exists(f"{metrics['checkpoint']}".removeprefix("s3://"))
    assert fs.exists(f"{metrics['embeddings']}/_manifest.json".removeprefix("s3://"))

    # Every picture in the report loads in a real browser: 4 queries x 5 results, the query image, the curve.
    total, loaded = count_loaded_images(out / "report.html")
    assert total == 4 * 5 + 1 + 1
    assert loaded == total
