"""`ssjdn train-local`: single-process SSJDN training on a local dataset (debugging, small machines)."""

from __future__ import annotations

import argparse

NAME = "train-local"
HELP = "train SSJDN in one process from a dataset folder; writes metrics.jsonl and the best checkpoint"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config name (ucm, cpu-small, ...) or a YAML path")
    parser.add_argument(
        "--data", required=True, help="dataset folder or description file (Karpathy JSON, ...)"
    )
    parser.add_argument("--out", required=True, help="run directory (metrics.jsonl, best.pt, last.pt, ...)")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument("--format", default=None, help="dataset format (default: detected)")
    parser.add_argument("--images", default=None, help="image folder (default: DATA/images or DATA)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt when it exists")
    parser.add_argument(
        "--max-steps-per-epoch", type=int, default=None, help="cap steps per epoch (smoke runs)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set model.bsd=false --set loss.name=triplet (repeatable)",
    )
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=None,
        help="stop when more of an epoch's train images are unreadable (default: no limit, they are skipped)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import json
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Before torch loads OpenMP: idle threads sleep instead of spinning. On a shared 2-core machine spinning
    # threads of several processes starve each other (measured: ~10x slower steps under load, same CPU work).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from ssjdn.config import load_config, parse_override
    from ssjdn.train_local import train_local

    cfg = load_config(args.config, dict(parse_override(o) for o in args.overrides))
    summary = train_local(
        cfg,
        args.data,
        args.out,
        epochs=args.epochs,
        device=args.device,
        resume=args.resume,
        max_steps_per_epoch=args.max_steps_per_epoch,
        dataset_format=args.format,
        images=args.images,
        progress=not args.no_progress,
        max_bad_fraction=args.max_bad_fraction,
    )
    brief = {
        "untrained_test_mr": summary.get("untrained", {}).get("test", {}).get("mr"),
        "best_epoch": summary.get("best", {}).get("epoch"),
        "best_val_mr": summary.get("best", {}).get("val", {}).get("mr"),
        "best_test_mr": summary.get("best", {}).get("test", {}).get("mr"),
        "out": summary["out"],
    }
    print(json.dumps(brief))
    return 0
