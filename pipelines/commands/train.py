"""`ssjdn train`: distributed training on Ray Train from shards on any storage URL (see pipelines/train.py)."""

from __future__ import annotations

import argparse

NAME = "train"
HELP = "train SSJDN with Ray Train from WebDataset shards; checkpoints and metrics go to --storage (resumable)"


def configure(parser: argparse.ArgumentParser) -> None:
    from pipelines.train import add_arguments  # argparse-only at import time

    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pipelines.train import run_cli

    return run_cli(args)
