"""`ssjdn demo`: the main job end to end (shard -> train -> evaluate -> embed -> query -> geo -> report) as
the Prefect flow `ssjdn-demo`."""

from __future__ import annotations

import argparse

NAME = "demo"
HELP = "run the whole pipeline end to end on a local Ray + local Prefect + a local (or s3://) store"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        help="dataset folder (default: ../shared/data/ucm-captions when present, "
        "else a generated synthetic dataset, labelled as such; 'synthetic' forces the generated one)",
    )
    p.add_argument(
        "--scenes",
        help="folder holding cogeo.tif and RGB.byte.tif for the geo stage (default: ../shared/data/geotiff "
        "when it holds them, whatever --data is, else two generated scenes, labelled SYNTHETIC; 'synthetic' "
        "forces the generated ones)",
    )
    p.add_argument(
        "--store", default="./store", help="object store root: a local folder or any fsspec URL (s3://...)"
    )
    p.add_argument(
        "--out",
        default="./demo-out",
        help="where metrics.json, results.md, training_curve.png and report.html go",
    )
    p.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--config", default="cpu-small", help="model config name or YAML path (default cpu-small)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set model.bsd=false (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    import os

    from ssjdn.config import parse_override

    overrides = dict(parse_override(o) for o in args.overrides)
    # Without PREFECT_API_URL the flow runs on Prefect's ephemeral local server: give it time to start on a
    # loaded 2-core machine, and keep it from phoning home (there is no network).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The one sanctioned upward import (see tests/test_layering.py): the demo *is* a Prefect flow.
    from flows.demo import ssjdn_demo

    ssjdn_demo(
        data=args.data,
        store=args.store,
        out=args.out,
        epochs=args.epochs,
        workers=args.workers,
        config=args.config,
        overrides=overrides or None,
        scenes=args.scenes,
    )
    return 0
