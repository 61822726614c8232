"""A command that starts Ray and loads a model shows the pipeline's own lines only (issue 19): Ray's and the
libraries' messages go to a log file whose path is printed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ssjdn.data.synthetic import generate_synthetic
from tests.embed_helpers import dataset_captions, make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NOISE = re.compile(
    r"core_worker\.cc|PlacementGroupCleaner|LOAD REPORT|Progress bars disabled|Token authentication"
    r"|streaming_executor|Started a local Ray instance"
)
OWN = re.compile(r" (pipelines|ssjdn|flows|prefect)[\w.]*: ")


@pytest.mark.integration
def test_embed_output_has_no_ray_noise_and_names_the_log_file(tmp_path):
    data = generate_synthetic(tmp_path / "syn", n_per_class=1, size=32, seed=3)
    make_tiny_checkpoint(tmp_path / "run" / "best.pt", dataset_captions(data))
    logs = tmp_path / "logs"
    ray_tmp = tempfile.mkdtemp(prefix="rq-", dir="/tmp")
    env = {
        **os.environ,
        "RAY_TMPDIR": ray_tmp,  # short: Ray's socket paths must stay under 107 bytes
        "SSJDN_LOG_DIR": str(logs),
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("SSJDN_LIBRARY_LOGS_ON_CONSOLE", None)
    env.pop("RAY_ADDRESS", None)  # its own local Ray, whatever cluster another test left running
    cmd = [sys.executable, "-m", "ssjdn_cli.main", "embed", str(data), str(tmp_path / "store")]
    cmd += ["--checkpoint", str(tmp_path / "run")]  # a run folder: its best.pt (issue 19)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    lines = output.splitlines()
    noisy = [line for line in lines if NOISE.search(line)]
    assert not noisy, "\n".join(noisy)
    alarming = [
        line for line in lines if re.search(r" (WARNING|ERROR) |\bE \d+ \d+\]", line) and not OWN.search(line)
    ]
    assert not alarming, "\n".join(alarming)
    named = [line for line in lines if "messages go to" in line]
    assert len(named) == 1, output
    files = list(logs.glob("ssjdn-embed-*.log"))
    assert len(files) == 1 and str(files[0]) in named[0], (files, named)
    text = files[0].read_text()
    # Ray's own lines are in the file (which ones depends on whether Ray started fresh or found its temp dir).
    assert "streaming_executor" in text and "Dataset" in text, text[:2000]
    assert "using " in output and "best.pt" in output  # the run folder resolved to its checkpoint
