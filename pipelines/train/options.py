"""The options of a training run, written once: `ssjdn train`'s flags (`pipelines.train.cli`), the Python API
(`pipelines.train.driver.run_training(TrainOptions(...))`), the Prefect flow's flat parameters (`flows/train.py`)
and the command line of a Ray job (`pipelines.options.options_to_argv`) are all built from `TrainOptions`.

Importing this module is cheap (no torch, no Ray): `ssjdn --help` builds its parser from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipelines.cli_types import positive_int
from pipelines.options import option

PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def _overrides(items: list[str]) -> dict[str, Any]:
    """`--set key=value ...` -> {key: value} (values parsed as YAML: `false`, `3`, `[1, 2]`)."""
    from ssjdn.config import parse_override

    return dict(parse_override(o) for o in items)


def _override_args(overrides: dict[str, Any]) -> list[str]:
    """The inverse of `_overrides`: each value as YAML, so it reads back as the same value (`'8'` stays a string)."""
    import yaml

    def scalar(value: Any) -> str:
        text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
        return text.removesuffix("...").strip()  # a plain scalar ends its YAML document with "..."

    return [f"{k}={scalar(v)}" for k, v in overrides.items()]


def _storage_options(items: list[str]) -> dict[str, Any]:
    from pipelines.fsio import parse_storage_options

    return parse_storage_options(items)


def _storage_option_args(options: dict[str, Any], prefix: str = "") -> list[str]:
    """The inverse of `parse_storage_options`: nested keys dotted, values as it coerces them back."""
    import json

    from pipelines.fsio import parse_storage_options

    out: list[str] = []
    for key, value in options.items():
        if isinstance(value, dict) and value:
            out += _storage_option_args(value, f"{prefix}{key}.")
            continue
        item = f"{prefix}{key}={value if isinstance(value, str) else json.dumps(value)}"
        if parse_storage_options([item]) != _nest(f"{prefix}{key}", value):
            raise ValueError(f"storage option {prefix}{key}={value!r} has no command-line form")
        out.append(item)
    return out


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    *parents, leaf = dotted.split(".")
    out: dict[str, Any] = {leaf: value}
    for part in reversed(parents):
        out = {part: out}
    return out


@dataclass(frozen=True)
class TrainOptions:
    """What to train, where from, where to, and how (see docs/training.md)."""

    config: str = option(help="config name (ssjdn/configs) or YAML path")
    shards: str = option(help="shard destination URL written by `ssjdn shard`")
    storage: str = option(help="where runs live (checkpoints, metrics): path or s3://bucket/prefix")
    workers: int = option(2, type=positive_int, help="Ray Train workers (default 2)")
    gpu: bool = option(
        False, action="store_true", help="one GPU per worker: NCCL, bf16 autocast, channels_last"
    )
    epochs: int | None = option(None, type=positive_int, help="total epochs (default: the config's)")
    resume: str = option(
        "auto",
        choices=("auto", "never"),
        help="auto: continue the run of the same name from its latest checkpoint; never: refuse if it exists",
    )
    name: str | None = option(None, help="run name under --storage (default ssjdn-CONFIG-DATASET)")
    overrides: dict[str, Any] = option(
        default_factory=dict,
        flag="--set",
        action="append",
        metavar="KEY=VALUE",
        parse=_overrides,
        unparse=_override_args,
        help="config override, repeatable (e.g. train.batch_size=64)",
    )
    # Ray address; the Prefect flow has its own `ray_address` (train here, or submit to a cluster).
    address: str | None = option(
        None, flow=False, help="Ray address (default: RAY_ADDRESS, else a local Ray)"
    )
    max_failures: int = option(2, type=int, help="worker-group restarts from the last checkpoint (2)")
    keep_checkpoints: int = option(2, type=positive_int, help="checkpoints kept in storage (2)")
    checkpoint_every: int = option(0, type=int, help="also checkpoint every N steps inside an epoch")
    loader_workers: int | None = option(None, type=int, help="decoding processes per worker (config's, >= 1)")
    shuffle_buffer: int = option(1000, type=int, help="samples in each shuffle buffer (1000)")
    max_bad_fraction: float = option(0.01, type=float, help="fail above this fraction of bad samples")
    cpus_per_worker: float = option(1.0, type=float, help="logical CPUs reserved per worker (1)")
    placement: str = option(
        "PACK",
        choices=PLACEMENTS,
        help="placement of the workers over nodes (SPREAD: one per node when possible)",
    )
    audit_keys: bool = option(
        False, action="store_true", help="record every sample key seen, per rank and epoch"
    )
    storage_options: dict[str, Any] = option(
        default_factory=dict,
        flag="--storage-option",
        action="append",
        metavar="KEY=VALUE",
        parse=_storage_options,
        unparse=_storage_option_args,
        help="fsspec storage option for --shards/--storage (credentials: use the AWS_* variables)",
    )
    progress_every: int | None = option(None, type=int, help="progress.json every N steps (train.log_every)")
