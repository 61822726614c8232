"""Training-step cost of SSJDN on CPU, measured side by side in one run, plus a FLOPs estimate of the full config.

    .venv/bin/python -m benchmarks.bench_train_step [--steps 10] [--batch 32] [--flops-config ucm]

1. Step time and peak memory of `cpu-small` at batch 32 on CPU for the full model (BSD + LSD + STL) and for the
   VSE++ baseline (both off, hardest-negative triplet), each in a fresh subprocess (so peak RSS is its own),
   printed with their ratio. Load average is printed too: the machine is shared, so read times with it.
2. Forward and forward+backward FLOPs of one training step of the full-size config (ResNet-50 layout at
   256 px, BERT-base-sized text encoder, batch from the config), counted with
   torch.utils.flop_counter.FlopCounterMode on a small batch and scaled linearly to the config's batch
   (every op is per-sample except the B x B similarity, which is negligible).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = {
    "full": {},
    "vsepp": {"model.bsd": False, "model.lsd": False, "loss.name": "triplet", "loss.variant": "hardest"},
}
# bert-base-uncased's architecture, built from the offline MiniLM config (no hub access needed for counting).
BERT_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
}
CAPTION = "many buildings and green trees are around a parking lot with some cars"


def _fake_batch(tok, batch: int, size: int, num_classes: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return {
        "pixels": torch.randn(batch, 3, size, size, generator=g),
        "tokens": tok([f"{CAPTION} {i}" for i in range(batch)]),
        "labels": torch.randint(0, num_classes, (batch,), generator=g),
        "key_ids": torch.arange(batch),
    }


def measure_step(variant: str, steps: int, batch: int) -> dict:
    """Runs in a subprocess: mean/median step time and peak RSS for cpu-small with the variant's switches."""
    import resource

    import psutil
    import torch

    from ssjdn.config import load_config
    from ssjdn.engine import build_optimizer_and_scheduler, seed_everything, train_step
    from ssjdn.model import build_model
    from ssjdn.tokenization import build_tokenizer

    seed_everything(0)
    cfg = load_config(
        "cpu-small", {**VARIANTS[variant], "model.lsd_cfg.num_classes": 21, "train.batch_size": batch}
    )
    tok = build_tokenizer(cfg)
    model = build_model(cfg, tok)
    opt, sched = build_optimizer_and_scheduler(model, cfg, total_steps=steps + 2)
    data = _fake_batch(tok, batch, cfg.data.image_size, 21)
    rss_before = psutil.Process().memory_info().rss
    for _ in range(2):  # warm-up: allocator, oneDNN primitives
        train_step(model, data, opt, sched, grad_clip=cfg.optim.grad_clip)
    times, cpu0 = [], time.process_time()
    for _ in range(steps):
        t = time.perf_counter()
        train_step(model, data, opt, sched, grad_clip=cfg.optim.grad_clip)
        times.append(time.perf_counter() - t)
    times.sort()
    return {
        "variant": variant,
        "batch": batch,
        "image_size": cfg.data.image_size,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "trainable_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "step_s_mean": sum(times) / len(times),
        "step_s_median": times[len(times) // 2],
        "cpu_s_per_step": (time.process_time() - cpu0) / steps,
        "samples_per_s": batch * len(times) / sum(times),
        "rss_after_build_mb": rss_before / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
    }


def count_flops(config: str, count_batch: int = 2) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from ssjdn.config import load_config
    from ssjdn.model import build_model
    from ssjdn.tokenization import MINILM, build_tokenizer

    over = {"model.lsd_cfg.num_classes": 21, "model.image.pretrained": False}
    if load_config(config).model.text.kind == "bert":
        over.update(
            {
                "model.text.name": MINILM,
                "model.text.pretrained": False,
                "model.text.config_overrides": BERT_BASE,
            }
        )
    cfg = load_config(config, over)
    tok = build_tokenizer(cfg)
    model = build_model(cfg, tok, pretrained=False)
    data = _fake_batch(tok, count_batch, cfg.data.image_size, 21)
    fwd = FlopCounterMode(display=False)
    with fwd:
        out = model(data)
    both = FlopCounterMode(display=False)
    with both:
        out = model(data)
        out["loss"].backward()
    scale = cfg.train.batch_size / count_batch
    return {
        "config": config,
        "image": f"ResNet {cfg.model.image.layer_type} {cfg.model.image.depths} at {cfg.data.image_size}px",
        "text": f"BERT-base-sized ({BERT_BASE['num_hidden_layers']} layers, {BERT_BASE['hidden_size']} wide), "
        f"{data['tokens']['input_ids'].shape[1]} tokens",
        "batch": cfg.train.batch_size,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "fwd_gflops_per_sample": fwd.get_total_flops() / count_batch / 1e9,
        "fwd_bwd_gflops_per_sample": both.get_total_flops() / count_batch / 1e9,
        "fwd_bwd_tflops_per_step": both.get_total_flops() * scale / 1e12,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--flops-config", default="ucm")
    ap.add_argument("--no-flops", action="store_true")
    ap.add_argument("--_one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args._one:
        import transformers

        transformers.logging.set_verbosity_error()
        print(json.dumps(measure_step(args._one, args.steps, args.batch)))
        return 0

    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    results = {}
    for variant in VARIANTS:
        load = os.getloadavg()[0]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.bench_train_step",
                "--_one",
                variant,
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        results[variant] = {**json.loads(proc.stdout.strip().splitlines()[-1]), "load_avg_1m_at_start": load}
    print(
        f"cpu-small train step on CPU, batch {args.batch}, {args.steps} timed steps, "
        f"{os.cpu_count()} cores, OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}"
    )
    print(
        f"{'variant':8} {'step s (median)':>16} {'mean':>7} {'cpu s/step':>10} {'samples/s':>9} "
        f"{'peak RSS MB':>11} {'params M':>8} {'load':>5}"
    )
    for r in results.values():
        print(
            f"{r['variant']:8} {r['step_s_median']:16.3f} {r['step_s_mean']:7.3f} {r['cpu_s_per_step']:10.3f} "
            f"{r['samples_per_s']:9.1f} {r['peak_rss_mb']:11.0f} {r['params_m']:8.2f} {r['load_avg_1m_at_start']:5.1f}"
        )
    full, base = results["full"], results["vsepp"]
    print(
        f"ratio full / vsepp: step time {full['step_s_median'] / base['step_s_median']:.2f}x, "
        f"cpu time {full['cpu_s_per_step'] / base['cpu_s_per_step']:.2f}x, "
        f"peak RSS {full['peak_rss_mb'] / base['peak_rss_mb']:.2f}x"
    )
    out = {"step": results}
    if not args.no_flops:
        f = count_flops(args.flops_config)
        out["flops"] = f
        print(
            f"FLOPs, full SSJDN config '{f['config']}' ({f['image']}; {f['text']}), {f['params_m']:.1f}M params: "
            f"forward {f['fwd_gflops_per_sample']:.1f} GFLOP/sample, forward+backward "
            f"{f['fwd_bwd_gflops_per_sample']:.1f} GFLOP/sample = {f['fwd_bwd_tflops_per_step']:.2f} TFLOP "
            f"per step of batch {f['batch']}"
        )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
