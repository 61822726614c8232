"""Is the shard input pipeline ever the bottleneck of distributed training? Measured side by side in one run.

    .venv/bin/python -m benchmarks.bench_train_input [--data ../shared/data/ucm-captions] [--steps 8]
        [--batch 32] [--config cpu-small] [--threads 1] [--loader-workers 1]

1. Throughput: the training loop of one Ray Train worker (engine `train_step`, same model, same batch size)
   fed (a) from pre-decoded, pre-collated tensors in memory and (b) from WebDataset shards on an S3 server
   (a `moto_server` subprocess on 127.0.0.1) through `pipelines.train.data` (shuffle buffer, decoding and
   augmentation in DataLoader worker processes, exact rebatching, tokenisation). Each mode runs in its own
   subprocess; samples/s exclude one warm-up step. Goal: s3 / memory >= 0.9.
   `--threads` is torch's intra-op threads, as in a Ray worker that reserves that many CPUs (1 by default).
2. Memory: the input pipeline alone streams the whole train split from the same images sharded into few
   vs. 10x as many shards; peak RSS of the process tree (loop process + loader workers) for both. Goal: flat.

The dataset is the real UCM-Captions when present (train split only), else a synthetic one. The machine is
shared: the load average is printed with the numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UCM = REPO.parent / "shared" / "data" / "ucm-captions"


class PeakRSS:
    """Samples the RSS of this process and its children every 50 ms; `.peak` in bytes."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


# ----------------------------------------------------------------------------------------------- subprocess modes


def _model(config: str, num_classes: int):
    from ssjdn.config import load_config
    from ssjdn.engine import build_optimizer_and_scheduler, seed_everything
    from ssjdn.model import build_model
    from ssjdn.tokenization import build_tokenizer

    seed_everything(0)
    cfg = load_config(config, {"model.lsd_cfg.num_classes": num_classes})
    tok = build_tokenizer(cfg)
    model = build_model(cfg, tok)
    opt, sch = build_optimizer_and_scheduler(model, cfg, 1000)
    return cfg, tok, model, opt, sch


def _stream(args, cfg, shards_url: str):
    from pipelines.shard.read import read_manifest
    from pipelines.train.data import TrainShardStream, make_loader
    from pipelines.train.spec import shard_refs
    from ssjdn.transforms import ImageTransform

    refs = shard_refs(read_manifest(shards_url), shards_url, "train")
    stream = TrainShardStream(
        refs,
        transform=ImageTransform.from_config(cfg.data, train=True),
        epoch=1,
        seed=0,
        rank=0,
        shuffle_buffer=args.shuffle_buffer,
    )
    return make_loader(stream, args.loader_workers), len(refs)


def mode_throughput(args) -> dict:
    import torch

    from pipelines.shard.read import read_manifest
    from pipelines.train.data import Rebatcher
    from ssjdn.batching import collate
    from ssjdn.engine import train_step

    torch.set_num_threads(args.threads)
    num_classes = len(read_manifest(args.shards)["classes"])
    cfg, tok, model, opt, sch = _model(args.config, num_classes)
    loader, _ = _stream(args, cfg, args.shards)
    batches = iter(Rebatcher(loader, args.batch, lambda items: collate(items, tok)))
    if args.mode == "memory":  # the same batches, decoded and collated before the clock starts
        kept = [next(batches) for _ in range(args.steps + 1)]
        del batches, loader  # stops the loader processes: nothing runs beside the training loop
        gc.collect()
        batches = iter(kept)
    train_step(model, next(batches), opt, sch, grad_clip=cfg.optim.grad_clip)  # warm-up (and loader start)
    t0 = time.perf_counter()
    n = 0
    for _ in range(args.steps):
        b = next(batches)
        train_step(model, b, opt, sch, grad_clip=cfg.optim.grad_clip)
        n += len(b["keys"])
    dt = time.perf_counter() - t0
    return {"mode": args.mode, "samples": n, "seconds": round(dt, 2), "samples_per_s": round(n / dt, 2)}


def mode_memory(args) -> dict:
    from pipelines.train.data import Rebatcher
    from ssjdn.config import load_config

    cfg = load_config(args.config, {"model.lsd_cfg.num_classes": 2})
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        loader, n_shards = _stream(args, cfg, args.shards)
        rb = Rebatcher(loader, args.batch, lambda items: len(items))
        samples = sum(rb)
        dt = time.perf_counter() - t0
    return {
        "mode": "memory-scan",
        "shards": n_shards,
        "samples": samples,
        "bad": len(rb.bad),
        "seconds": round(dt, 2),
        "peak_rss_mb": round(rss.peak / 2**20, 1),
    }


# ----------------------------------------------------------------------------------------------- driver


def _child(mode: str, args, shards: str, env: dict) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_train_input",
        "--child",
        mode,
        "--shards",
        shards,
        "--config",
        args.config,
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--loader-workers",
        str(args.loader_workers),
        "--shuffle-buffer",
        str(args.shuffle_buffer),
    ]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(UCM) if (UCM / "dataset.json").exists() else None)
    p.add_argument("--config", default="cpu-small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--loader-workers", type=int, default=1)
    p.add_argument("--shuffle-buffer", type=int, default=256)
    p.add_argument("--few", type=int, default=200, help="samples per shard for the 'few shards' layout")
    p.add_argument("--many", type=int, default=20, help="samples per shard for the 'many shards' layout")
    p.add_argument("--child", choices=("memory", "s3", "memory-scan"), help=argparse.SUPPRESS)
    p.add_argument("--shards", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.mode = args.child
        result = mode_memory(args) if args.child == "memory-scan" else mode_throughput(args)
        print(json.dumps(result), flush=True)
        return 0

    from benchmarks.local_s3 import local_s3
    from pipelines.shard.job import shard_dataset

    with local_s3("bench-train-input") as env:
        with tempfile.TemporaryDirectory() as tmp:
            data = args.data
            if data is None:
                from ssjdn.data.synthetic import generate_synthetic

                data = str(generate_synthetic(Path(tmp) / "syn", n_per_class=100, seed=0, size=256))
            layouts = {}
            for label, maxcount in (("few", args.few), ("many", args.many)):
                url = f"s3://bench-train-input/{label}"
                t0 = time.time()
                m = shard_dataset(data, url, splits=["train"], maxcount=maxcount, progress=False).manifest
                layouts[label] = url
                print(
                    f"sharded {m['splits']['train']['samples']} train samples of {data} into "
                    f"{m['splits']['train']['shards']} shards at {url} ({time.time() - t0:.0f}s)",
                    flush=True,
                )
        load0 = os.getloadavg()[0]
        s3 = _child("s3", args, layouts["few"], env)
        mem = _child("memory", args, layouts["few"], env)
        few = _child("memory-scan", args, layouts["few"], env)
        many = _child("memory-scan", args, layouts["many"], env)
        load1 = os.getloadavg()[0]

    ratio = s3["samples_per_s"] / mem["samples_per_s"]
    rss_ratio = many["peak_rss_mb"] / few["peak_rss_mb"]
    print(json.dumps({"s3": s3, "memory": mem, "few_shards": few, "many_shards": many}, indent=1))
    print(
        f"\nconfig {args.config}, batch {args.batch}, {args.steps} timed steps, torch threads {args.threads}, "
        f"{args.loader_workers} loader worker(s); load average {load0:.1f} -> {load1:.1f}"
    )
    print(f"training loop fed from S3 shards : {s3['samples_per_s']:8.2f} samples/s")
    print(f"training loop fed from memory    : {mem['samples_per_s']:8.2f} samples/s")
    print(
        f"ratio s3 / memory                : {ratio:8.3f}   (goal >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'})"
    )
    print(
        f"peak RSS streaming {few['shards']:>3} shards   : {few['peak_rss_mb']:8.1f} MB ({few['samples']} samples)"
    )
    print(
        f"peak RSS streaming {many['shards']:>3} shards   : {many['peak_rss_mb']:8.1f} MB ({many['samples']} samples)"
    )
    print(f"ratio many / few                 : {rss_ratio:8.3f}   (goal: flat, ~1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
