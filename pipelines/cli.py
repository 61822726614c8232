"""The `ssjdn` command line: one entry point, one module per subcommand (see pipelines/commands/)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Order is the order shown by `ssjdn --help`. A module missing here simply does not register.
COMMAND_MODULES = (
    "pipelines.commands.data",
    "pipelines.commands.train_local",
    "pipelines.commands.shard",
    "pipelines.commands.train",
    "pipelines.commands.embed",
    "pipelines.commands.query",
    "pipelines.commands.demo",
    "pipelines.commands.benchmark_quality",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssjdn",
        description="SSJDN remote-sensing image-text retrieval: data, training, embedding and queries.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
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
