"""`ssjdn train` (= `python -m pipelines.train`): distributed training on Ray Train from shards on any storage URL.
The flags are `TrainOptions`' fields (pipelines/train/options.py); the job itself is pipelines/train/driver.py.

Exit status: 0 done (the last stdout line is `SSJDN_TRAIN_SUMMARY {json}`), 2 refused before any worker started
(the reason on one line), 1 training failed.
"""

from __future__ import annotations

import argparse

NAME = "train"
HELP = (
    "train SSJDN with Ray Train from WebDataset shards; checkpoints and metrics go to --storage (resumable)"
)


def configure(parser: argparse.ArgumentParser) -> None:
    from pipelines.options import add_arguments
    from pipelines.train.options import TrainOptions

    add_arguments(parser, TrainOptions)


def run(args: argparse.Namespace) -> int:
    import json
    import os
    import sys

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pipelines.options import from_args
    from pipelines.train.driver import TrainSetupError, run_training
    from pipelines.train.options import TrainOptions
    from pipelines.train.submit import SUMMARY_PREFIX
    from ssjdn.config import ConfigError

    try:
        summary = run_training(from_args(TrainOptions, args))
    except (TrainSetupError, ConfigError) as exc:  # refused before any worker started: exit 2
        if os.environ.get("SSJDN_DEBUG"):
            raise
        reason = " ".join(str(exc).split())
        print(
            f"{getattr(args, '_name', 'ssjdn train')}: error: cannot start training: {reason}",
            file=sys.stderr,
        )
        return 2
    # Any other PipelineError (TrainingError: the run failed) is one line and exit 1 (pipelines.command).
    print(SUMMARY_PREFIX + json.dumps(summary, sort_keys=True, default=str), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    import sys

    from pipelines.command import module_main

    return module_main(sys.modules[__name__], argv, prog="python -m pipelines.train")
