"""GPU throughput of the full-size SSJDN (`ucm` config: ResNet-50 layout at 256 px + a BERT-base-sized text encoder).

    python -m benchmarks.bench_gpu [--batch 100] [--steps 20] [--embed-batch 256] [--max-seconds 270]

Built from configs with random weights and synthetic token ids: no hub, no dataset, no internet (a GPU machine
here has its own Python and torch; this imports only `ssjdn`, torch and transformers, which `ssjdn` needs).
Measures, on `cuda:0`, each after a few warm-up steps and with `torch.cuda.synchronize()` around the timing:

1. training step images/s (forward, the config's loss (stl_nce) + LSD, backward, grad clip, Adam step), fp32 vs bf16 autocast
   with channels_last images and weights;
2. image embedding images/s (`encode_image`, inference mode), fp32 vs bf16 + channels_last;
3. peak GPU memory of each.

Prints the GPU's name and a JSON line with every number. On a machine without CUDA it says so and exits 0.
`--tiny` runs the same code path on a tiny model (the unit test uses it on CPU with `--device cpu`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# bert-base-uncased's architecture (transformers' BertConfig defaults), written to a local folder.
BERT_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
}
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
TINY_IMAGE = {
    "model.image.layer_type": "basic",
    "model.image.embedding_size": 8,
    "model.image.depths": [1, 1, 1, 1],
    "model.image.hidden_sizes": [8, 16, 16, 32],
    "model.width": 32,
    "model.embed_dim": 32,
    "model.lsd_cfg.heads": 2,
    "data.image_size": 64,
}
NUM_CLASSES = 21  # UCM scene classes
SEQ_LEN = 32
VOCAB = 30522


def build(config: str, text_dir: Path, *, tiny: bool, overrides: dict | None = None):
    """The config's architecture with random weights; the text encoder from a local BertConfig folder."""
    from transformers import BertConfig

    from ssjdn.config import load_config
    from ssjdn.model import build_model

    BertConfig(vocab_size=VOCAB, **(TINY_BERT if tiny else BERT_BASE)).save_pretrained(text_dir)
    ov = {
        "model.image.pretrained": False,
        "model.text.kind": "bert",
        "model.text.name": str(text_dir),
        "model.text.pretrained": False,
        "model.lsd_cfg.num_classes": NUM_CLASSES,
        **(TINY_IMAGE if tiny else {}),
        **(overrides or {}),
    }
    cfg = load_config(config, ov)
    return build_model(cfg, None, pretrained=False), cfg


def synthetic_batch(batch: int, size: int, device, *, channels_last: bool, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, size, size, generator=g)
    ids = torch.randint(1000, VOCAB, (batch, SEQ_LEN), generator=g)
    ids[:, 0] = 101  # [CLS]
    lengths = torch.randint(8, SEQ_LEN + 1, (batch,), generator=g)
    mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
    pixels = pixels.to(device)
    if channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    return {
        "pixels": pixels,
        "tokens": {"input_ids": (ids * mask).to(device), "attention_mask": mask.to(device)},
        "labels": torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device),
        "key_ids": torch.arange(batch).to(device),
        "keys": [f"k{i}" for i in range(batch)],
    }


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def measure_train(model, cfg, device, *, batch: int, steps: int, warmup: int, amp: bool, channels_last: bool):
    import torch

    from ssjdn.engine import build_optimizer_and_scheduler, train_step

    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt, sched = build_optimizer_and_scheduler(model, cfg, total_steps=warmup + steps)
    data = synthetic_batch(batch, cfg.data.image_size, device, channels_last=channels_last)
    _peak_reset(device)
    for _ in range(warmup):
        train_step(model, data, opt, sched, amp=amp, grad_clip=cfg.optim.grad_clip)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        stats = train_step(model, data, opt, sched, amp=amp, grad_clip=cfg.optim.grad_clip)
    _sync(device)
    dt = time.perf_counter() - t0
    return {
        "images_per_s": round(batch * steps / dt, 1),
        "s_per_step": round(dt / steps, 4),
        "peak_gib": _peak_gib(device),
        "loss": round(stats["loss"], 4),
    }


def measure_embed(model, cfg, device, *, batch: int, steps: int, warmup: int, amp: bool, channels_last: bool):
    import torch

    from ssjdn.engine import autocast

    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    pixels = synthetic_batch(batch, cfg.data.image_size, device, channels_last=channels_last)["pixels"]
    _peak_reset(device)
    with torch.inference_mode(), autocast(device, amp):
        for _ in range(warmup):
            model.encode_image(pixels)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            emb = model.encode_image(pixels)
        _sync(device)
    dt = time.perf_counter() - t0
    model.train()
    return {
        "images_per_s": round(batch * steps / dt, 1),
        "peak_gib": _peak_gib(device),
        "dim": int(emb.shape[-1]),
    }


def run(args: argparse.Namespace) -> dict:
    import torch

    device = torch.device(args.device)
    t_start = time.time()
    result: dict = {
        "config": args.config,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch": args.batch,
        "embed_batch": args.embed_batch,
        "steps": args.steps,
    }
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (no TF32) in the comparison
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    modes = {"fp32": (False, False), "bf16_channels_last": (True, True)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (amp, cl) in modes.items():
            if time.time() - t_start > args.max_seconds:
                result[f"train_{name}"] = result[f"embed_{name}"] = "skipped: time limit"
                continue
            torch.manual_seed(0)
            model, cfg = build(args.config, Path(tmp) / "text", tiny=args.tiny)
            model = model.to(device)
            result.setdefault("params_m", round(sum(p.numel() for p in model.parameters()) / 1e6, 1))
            result.setdefault("image_size", cfg.data.image_size)
            result[f"train_{name}"] = measure_train(
                model,
                cfg,
                device,
                batch=args.batch,
                steps=args.steps,
                warmup=args.warmup,
                amp=amp,
                channels_last=cl,
            )
            print(f"train {name}: {result[f'train_{name}']}", flush=True)
            result[f"embed_{name}"] = measure_embed(
                model,
                cfg,
                device,
                batch=args.embed_batch,
                steps=args.steps,
                warmup=args.warmup,
                amp=amp,
                channels_last=cl,
            )
            print(f"embed {name}: {result[f'embed_{name}']}", flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    tr, te = result.get("train_fp32"), result.get("train_bf16_channels_last")
    if isinstance(tr, dict) and isinstance(te, dict):
        result["train_speedup_bf16_cl"] = round(te["images_per_s"] / tr["images_per_s"], 2)
    er, ee = result.get("embed_fp32"), result.get("embed_bf16_channels_last")
    if isinstance(er, dict) and isinstance(ee, dict):
        result["embed_speedup_bf16_cl"] = round(ee["images_per_s"] / er["images_per_s"], 2)
    result["wall_s"] = round(time.time() - t_start, 1)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="ucm", help="config whose architecture is measured (default ucm)")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (only with --tiny)")
    p.add_argument("--batch", type=int, default=100, help="training batch (ucm: 100)")
    p.add_argument("--embed-batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=270.0, help="skip remaining measurements after this")
    p.add_argument("--tiny", action="store_true", help="a tiny model through the same code path (tests)")
    p.add_argument("--json", default=None, help="also write the result JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "bench_gpu: no CUDA device on this machine (torch.cuda.is_available() is false); nothing measured."
        )
        return 0
    if args.device == "cpu" and not args.tiny:
        print("bench_gpu: the full-size model on CPU is not a GPU figure; use --tiny for a CPU smoke run.")
        return 0
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name(torch.device(args.device))}", flush=True)
    result = run(args)
    line = json.dumps(result)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
