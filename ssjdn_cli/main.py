"""The `ssjdn` command line: registers each job's parser (`pipelines/<job>/cli.py`) and the commands that run
Prefect flows (`demo`). Imports point one way: ssjdn_cli -> flows -> pipelines -> ssjdn."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pipelines.command import add_command, run_command, setup_logging

# Order is the order shown by `ssjdn --help`. Every module must import: a broken one is an error, not skipped.
COMMAND_MODULES = (
    "ssjdn_cli.data",
    "ssjdn_cli.train_local",
    "pipelines.shard.cli",
    "pipelines.tile.cli",
    "pipelines.train.cli",
    "pipelines.embed.cli",
    "pipelines.search.cli",
    "pipelines.serve.cli",
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
        add_command(sub, importlib.import_module(name))
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before torch loads: spinning OpenMP threads starve each other (and Ray workers) on shared CPUs.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
