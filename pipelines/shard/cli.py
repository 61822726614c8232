"""`ssjdn shard DATASET DEST_URL`: write a dataset as WebDataset shards to a local folder or any fsspec URL."""

from __future__ import annotations

import argparse

from pipelines.cli_types import positive_int

NAME = "shard"
HELP = "shard an image-caption dataset into WebDataset tars (local path, s3://bucket/prefix, any fsspec URL)"


def _splits(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected a comma-separated list such as train,val,test")
    return parts


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction within [0, 1]")
    return value


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", metavar="DATASET", help="dataset folder or description file (see `ssjdn data`)")
    p.add_argument(
        "dest", metavar="DEST_URL", help="output: a local path, s3://bucket/prefix, or any fsspec URL"
    )
    p.add_argument("--format", default=None, help="dataset format (default: detected)")
    p.add_argument("--images", default=None, help="image folder (default: DATASET/images or DATASET)")
    p.add_argument(
        "--name", default=None, help="dataset name used in sample keys (default: from the dataset)"
    )
    p.add_argument("--splits", type=_splits, default=None, help="comma-separated splits (default: all)")
    p.add_argument(
        "--maxcount", type=positive_int, default=1000, help="samples per shard at most (default 1000)"
    )
    p.add_argument(
        "--maxsize", type=positive_int, default=1_000_000_000, help="bytes per shard, about (default 1e9)"
    )
    p.add_argument(
        "--shuffle-seed", type=int, default=None, help="spread samples over shards by a seeded shuffle"
    )
    p.add_argument(
        "--resize", type=positive_int, default=None, help="shrink images to this longer side (re-encodes)"
    )
    p.add_argument("--reencode", choices=("jpg", "png", "webp"), default=None, help="re-encode images")
    p.add_argument(
        "--validate",
        choices=("structure", "full"),
        default="structure",
        help="image validation: 'structure' (default: header + file complete, e.g. JPEG EOI, PNG IEND, TIFF strips "
        "inside the file; no pixel decoding) or 'full' (decode every image; about 10x slower)",
    )
    p.add_argument(
        "--max-bad-fraction",
        type=_fraction,
        default=0.01,
        help="fail above this fraction of bad samples (0.01)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="writers: this process plus up to W-1 worker processes, started only when the remaining work "
        "outlasts their start-up (default: min(4, CPUs))",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace shards of another dataset/options at DEST"
    )
    p.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option, repeatable (e.g. endpoint_url=http://127.0.0.1:9000, anon=true); "
        "S3 credentials are best left to the standard AWS_* variables",
    )
    p.add_argument("--retries", type=int, default=3, help="retries per shard on storage errors (default 3)")
    p.add_argument(
        "--retry-backoff", type=float, default=1.0, help="first retry delay in s, doubling (default 1)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import logging
    import os
    import sys

    from pipelines.fsio import StorageError, UnsafePathError, parse_storage_options
    from pipelines.shard.job import shard_dataset
    from pipelines.shard.plan import ShardError

    log = logging.getLogger("ssjdn.shard")
    try:
        storage_options = parse_storage_options(args.storage_option)
        result = shard_dataset(
            args.dataset,
            args.dest,
            format=args.format,
            images=args.images,
            name=args.name,
            splits=args.splits,
            maxcount=args.maxcount,
            maxsize=args.maxsize,
            shuffle_seed=args.shuffle_seed,
            resize=args.resize,
            reencode=args.reencode,
            validate=args.validate,
            max_bad_fraction=args.max_bad_fraction,
            workers=args.workers or min(4, os.cpu_count() or 1),
            overwrite=args.overwrite,
            storage_options=storage_options,
            retries=args.retries,
            retry_backoff=args.retry_backoff,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except (ShardError, StorageError, UnsafePathError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return 1
    m = result.manifest
    splits = ", ".join(f"{k} {v['samples']}" for k, v in m["splits"].items())
    print(
        f"{result.manifest_url}: {m['totals']['samples']} samples ({splits}), {m['totals']['captions']} captions, "
        f"{m['totals']['shards']} shards ({result.written} written, {result.skipped} already committed), "
        f"{m['bad']['count']} bad"
    )
    return 0
