"""benchmarks.bench_gpu: exits cleanly without CUDA; its model-building and timing path works on CPU (tiny)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from benchmarks import bench_gpu
from tests.fixtures_torch import single_torch_thread  # noqa: F401  (autouse)


def test_exits_cleanly_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_gpu.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_module_entry_point_exits_zero_here():
    if torch.cuda.is_available():  # pragma: no cover - the GPU machine runs the real benchmark
        return
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_gpu"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout


def test_ucm_architecture_builds_offline(tmp_path):
    """The measured model is the ucm layout (ResNet-50 stages, BERT-base-sized text), with random weights."""
    model, cfg = bench_gpu.build("ucm", tmp_path / "text", tiny=False)
    assert cfg.data.image_size == 256 and cfg.model.embed_dim == 512 and cfg.model.bsd and cfg.model.lsd
    assert model.text.bert.config.hidden_size == 768 and model.text.bert.config.num_hidden_layers == 12
    assert model.image.backbone.channels == [512, 1024, 2048]  # ResNet-50 stages 2-4
    assert 130 < sum(p.numel() for p in model.parameters()) / 1e6 < 180


def test_tiny_run_on_cpu(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = [
        "--tiny",
        "--device",
        "cpu",
        "--batch",
        "4",
        "--embed-batch",
        "4",
        "--steps",
        "1",
        "--warmup",
        "1",
    ]
    assert bench_gpu.main([*argv, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for mode in ("fp32", "bf16_channels_last"):
        assert res[f"train_{mode}"]["images_per_s"] > 0 and res[f"embed_{mode}"]["images_per_s"] > 0
        assert res[f"embed_{mode}"]["dim"] == 32
    assert res["device"] == "cpu" and res["train_speedup_bf16_cl"] > 0
