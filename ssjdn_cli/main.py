"""The `ssjdn` command line: registers each job's parser (`pipelines/<job>/cli.py`) and the commands that run
Prefect flows (`demo`). Imports point one way: ssjdn_cli -> flows -> pipelines -> ssjdn."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Order is the order shown by `ssjdn --help`. Every module must import: a broken one is an error, not skipped.
COMMAND_MODULES = (
    "ssjdn_cli.data",
    "ssjdn_cli.train_local",
    "pipelines.shard.cli",
    "pipelines.train.cli",
    "pipelines.embed.cli",
    "pipelines.search.cli",
    "ssjdn_cli.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssjdn",
        description="SSJDN remote-sensing image-text retrieval: data, training, embedding and queries.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before torch loads: spinning OpenMP threads starve each other (and Ray workers) on shared CPUs.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # one line per HTTP request (Prefect API, S3) buries what the job itself says
        for noisy in ("httpx", "httpcore", "botocore", "aiobotocore", "s3fs"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
