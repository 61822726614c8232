"""Acceptance run of distributed training (issue 5): 2 CPU Ray Train workers train `cpu-small` on the real
UCM-Captions shards on an S3 server for 2 epochs; prints the untrained and per-epoch val mR and what is in
the storage URL.

    .venv/bin/python -m benchmarks.accept_train_ucm [--data ../shared/data/ucm-captions] [--epochs 2]
        [--workers 2] [--keep DIR]

The S3 server is a `moto_server` subprocess on 127.0.0.1 (in memory: with --keep the run directory is copied
to DIR at the end). Training runs as `python -m pipelines.train` in a subprocess with a local Ray, exactly as a
user would start it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_train_input import UCM
from benchmarks.local_s3 import local_s3

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(UCM))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--config", default="cpu-small")
    p.add_argument("--keep", default=None, help="copy the run directory here at the end")
    args = p.parse_args(argv)

    with local_s3("accept") as env:
        from pipelines.shard.job import shard_dataset

        t0 = time.time()
        manifest = shard_dataset(args.data, "s3://accept/ucm", maxcount=100, progress=False).manifest
        print(f"sharded {args.data}: {json.dumps(manifest['splits'])} in {time.time() - t0:.0f}s", flush=True)
        cmd = [
            sys.executable,
            "-m",
            "pipelines.train",
            "--config",
            args.config,
            "--shards",
            "s3://accept/ucm",
            "--storage",
            "s3://accept/runs",
            "--workers",
            str(args.workers),
            "--epochs",
            str(args.epochs),
        ]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        log = proc.stdout + proc.stderr
        for line in log.splitlines():
            if "epoch" in line and ("mR" in line or "untrained" in line) or "pipelines.train:" in line:
                print(line[-220:])
        if proc.returncode != 0:
            print(log[-5000:])
            return proc.returncode
        summary = json.loads(
            next(line for line in log.splitlines() if line.startswith("SSJDN_TRAIN_SUMMARY "))[20:]
        )
        from pipelines.train.rundir import RunDir

        run = RunDir(summary["run"])
        rows = run.read_jsonl("metrics.jsonl")
        print(
            f"\ntrained {args.epochs} epoch(s) of {args.config} on {args.workers} CPU workers in {wall:.0f}s "
            f"(driver wall time, Ray start included)"
        )
        for r in rows:
            v = r.get("val", {})
            print(
                f"  epoch {r['epoch']}: val mR {v.get('mr', float('nan')):6.2f}  i2t R@1 {v.get('i2t_r1', 0):5.1f}  "
                f"t2i R@1 {v.get('t2i_r1', 0):5.1f}  class mR {v.get('cls_mr', 0):6.2f}  "
                f"train loss {r.get('train', {}).get('loss', float('nan')):.4f}  "
                f"{r.get('samples_per_s', '-')} samples/s"
            )
        untrained, last = rows[0]["val"]["mr"], rows[-1]["val"]["mr"]
        print(
            f"val mR: untrained {untrained:.2f} -> after epoch {rows[-1]['epoch']} {last:.2f} "
            f"({'above' if last > untrained else 'NOT above'} the untrained model)"
        )
        listing = sorted(
            n for p in run.fs.ls(run.root, detail=False) if (n := p.rstrip("/").rsplit("/", 1)[-1])
        )
        print(f"in {summary['run']}: {listing}")
        for name in run.checkpoints():
            files = sorted(
                n for f in run.fs.ls(run.path(name), detail=False) if (n := f.rstrip("/").rsplit("/", 1)[-1])
            )
            print(f"  {name}: {files}")
        if args.keep:
            run.fs.get(run.root, args.keep, recursive=True)
            print(f"copied the run directory to {args.keep}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
