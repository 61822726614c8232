"""The options of a sharding run, written once: `ssjdn shard`'s flags, the Python API and the flow's parameters
are all built from `ShardOptions`."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

from pipelines.cli_types import comma_list, fraction, positive_int
from pipelines.errors import PipelineError
from pipelines.fsio import parse_storage_options
from pipelines.options import option
from pipelines.shard.layout import REENCODE, SPLIT_ORDER


class ShardOptionsError(PipelineError, ValueError):
    """An option value that cannot work (named, with the accepted values)."""


RAY_HELP = (
    "run the jobs as Ray tasks across a cluster: ADDRESS is its GCS address (HOST:6379) or `auto` (the running "
    "cluster: inside `ray job submit`, or the head on this machine; the default without ADDRESS); workers take "
    "storage credentials from their own node's environment"
)


def check_ray_address(address: str | None) -> None:
    """`--ray` takes what `ray.init(address=...)` takes; the dashboard URL is for `ray job submit` (one line)."""
    if address is not None and (not address.strip() or address.startswith(("http://", "https://"))):
        raise ShardOptionsError(
            f"--ray {address!r}: expected `auto` or the cluster's GCS address HOST:PORT; the dashboard URL "
            f"is for `ray job submit --address URL -- python -m pipelines.<job> ... --ray auto`"
        )


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS", help=RAY_HELP)


def _default_workers() -> int:
    return min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class ShardOptions:
    """Options of a sharding run. The first group decides the shards' bytes (see `output_options`)."""

    maxcount: int = option(1000, type=positive_int, help="samples per shard at most (default 1000)")
    maxsize: int = option(1_000_000_000, type=positive_int, help="bytes per shard, about (default 1e9)")
    shuffle_seed: int | None = option(None, type=int, help="spread samples over shards by a seeded shuffle")
    splits: tuple[str, ...] | None = option(
        None, type=comma_list, help="comma-separated splits (default: every split the dataset has)"
    )
    resize: int | None = option(
        None, type=positive_int, help="shrink images to this longer side (re-encodes)"
    )
    reencode: str | None = option(None, choices=tuple(REENCODE), help="re-encode images")
    validation: str = option(
        "structure",
        flag="--validate",
        choices=("structure", "full"),
        help="image validation: 'structure' (default: header + file complete, e.g. JPEG EOI, PNG IEND, TIFF "
        "strips inside the file; no pixel decoding) or 'full' (decode every image; about 10x slower)",
    )
    max_bad_fraction: float = option(
        0.01, type=fraction, help="fail above this fraction of bad samples (0.01)"
    )
    # Reading the dataset.
    format: str | None = option(None, help="dataset format (default: detected)")
    images: str | None = option(None, help="image folder (default: DATASET/images or DATASET)")
    name: str | None = option(None, help="dataset name used in sample keys (default: from the dataset)")
    # Where images may come from (not output options: they decide which samples are refused, and the plan
    # digest of every shard already covers exactly which samples it holds).
    allow_root: tuple[str, ...] = option(
        (),
        flag="--allow-root",
        action="append",
        metavar="DIR",
        parse=tuple,
        help="a local folder outside the dataset that absolute names, '..' names and file:/local: URLs may "
        "point into, and symbolic links may lead into (repeatable; default: the dataset and image folders only)",
    )
    follow_symlinks: bool = option(
        False,
        action="store_true",
        help="read images through symbolic links that lead out of the dataset (default: quarantine them)",
    )
    # Running.
    workers: int = option(
        default_factory=_default_workers,
        type=positive_int,
        help="writers: this process plus up to W-1 worker processes, started only when the remaining work "
        "outlasts their start-up (default: min(4, CPUs))",
    )
    ray: str | None = option(
        None,
        cli=False,  # `--ray [ADDRESS]` (an optional value) is added by the CLI itself: see `add_ray_arguments`
        flow=False,  # the flows take `ray_address`
        help=RAY_HELP,
    )
    ray_resource: str | None = option(
        None,
        metavar="NAME",
        help="with --ray: run jobs only on nodes that offer this custom resource (`ray start --resources "
        "'{\"NAME\": 1}'`, e.g. the nodes that can reach the archive)",
    )
    overwrite: bool = option(
        False, action="store_true", help="replace shards of another dataset/options at DEST"
    )
    storage_options: dict[str, Any] = option(
        default_factory=dict,
        flag="--storage-option",
        action="append",
        metavar="KEY=VALUE",
        parse=parse_storage_options,
        help="fsspec storage option, repeatable (e.g. endpoint_url=http://127.0.0.1:9000, anon=true); "
        "S3 credentials are best left to the standard AWS_* variables",
    )
    retries: int = option(3, type=int, help="retries per shard on storage errors (default 3)")
    retry_backoff: float = option(1.0, type=float, help="first retry delay in s, doubling (default 1)")
    progress: bool = option(
        True, flag="--no-progress", action="store_false", help="no progress bar", flow=False
    )

    def __post_init__(self) -> None:
        if self.splits is not None:
            object.__setattr__(self, "splits", tuple(self.splits) or None)
        if isinstance(self.allow_root, str):
            object.__setattr__(self, "allow_root", (self.allow_root,))
        for d in self.allow_root:
            if "://" in str(d) or not os.path.isdir(os.path.expanduser(str(d))):
                raise ShardOptionsError(f"--allow-root {d!r} is not a local folder")
        allowed = tuple(os.path.abspath(os.path.expanduser(str(d))) for d in self.allow_root)
        object.__setattr__(self, "allow_root", allowed)
        if self.maxcount < 1 or self.maxsize < 1:
            raise ShardOptionsError(
                f"maxcount and maxsize must be >= 1 (got {self.maxcount}, {self.maxsize})"
            )
        if self.splits is not None:
            unknown = sorted(set(self.splits) - set(SPLIT_ORDER))
            if unknown:
                raise ShardOptionsError(
                    f"unknown split(s) {unknown}; expected some of {', '.join(SPLIT_ORDER)}"
                )
        if self.reencode is not None and self.reencode not in REENCODE:
            raise ShardOptionsError(f"--reencode {self.reencode!r}: expected one of {', '.join(REENCODE)}")
        from ssjdn.data.images import VALIDATION_LEVELS

        if self.validation not in VALIDATION_LEVELS:
            raise ShardOptionsError(
                f"--validate {self.validation!r}: expected one of {', '.join(VALIDATION_LEVELS)}"
            )
        if self.resize is not None and self.resize < 1:
            raise ShardOptionsError(f"--resize must be a positive number of pixels (got {self.resize})")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ShardOptionsError(f"max_bad_fraction must be within [0, 1] (got {self.max_bad_fraction})")
        if self.workers < 1:
            raise ShardOptionsError(f"workers must be >= 1 (got {self.workers})")
        check_ray_address(self.ray)

    def output_options(self) -> dict[str, Any]:
        """The options that decide the shards' content (what a destination and each shard's digest are checked
        against). The key names are part of the on-disk format: changing one changes every digest."""
        return {
            "maxcount": self.maxcount,
            "maxsize": self.maxsize,
            "shuffle_seed": self.shuffle_seed,
            "splits": list(self.splits) if self.splits is not None else None,
            "resize": self.resize,
            "reencode": self.reencode,
            "validate": self.validation,
        }
