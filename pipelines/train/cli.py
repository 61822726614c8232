"""`ssjdn train`: distributed training on Ray Train from shards on any storage URL (see pipelines/train.py)."""

from __future__ import annotations

import argparse

NAME = "train"
HELP = (
    "train SSJDN with Ray Train from WebDataset shards; checkpoints and metrics go to --storage (resumable)"
)


def configure(parser: argparse.ArgumentParser) -> None:
    from pipelines.train.driver import add_arguments

    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pipelines.train.driver import run_cli

    return run_cli(args)


def main(argv: list[str] | None = None) -> int:
    from pipelines.train.driver import main as driver_main

    return driver_main(argv)
