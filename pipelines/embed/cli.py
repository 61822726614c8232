"""`ssjdn embed ARCHIVE_URL STORE_URL --checkpoint URL`: embed an archive into the versioned Parquet store."""

from __future__ import annotations

import argparse

from pipelines.cli_types import positive_int

NAME = "embed"
HELP = (
    "embed an archive (shards, image files, dataset) with a trained checkpoint into a Parquet embedding store"
)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "archive",
        metavar="ARCHIVE_URL",
        help="shards (ssjdn shard output), a .tar or folder of tars, "
        "a listing .txt, a dataset folder, or a folder of images; local path or fsspec URL",
    )
    p.add_argument(
        "store", metavar="STORE_URL", help="embedding store root (local path, s3://bucket/prefix, ...)"
    )
    p.add_argument(
        "--checkpoint", required=True, metavar="URL", help="trained SSJDN checkpoint (path or URL)"
    )
    p.add_argument("--captions", action="store_true", help="also embed the captions (second table)")
    p.add_argument(
        "--batch-size", type=positive_int, default=64, help="images per encoder batch (default 64)"
    )
    p.add_argument("--concurrency", type=positive_int, default=1, help="encoder actors (default 1)")
    p.add_argument("--gpu", action="store_true", help="one GPU per encoder actor")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored embedding type")
    p.add_argument("--splits", default=None, help="comma-separated splits to embed (default: all)")
    p.add_argument(
        "--threads", type=positive_int, default=None, help="torch threads per CPU actor (default: cores/C)"
    )
    p.add_argument(
        "--max-rows-per-file", type=positive_int, default=None, help="rows per Parquet file (default 50000)"
    )
    p.add_argument(
        "--commit-every", type=float, default=30.0, metavar="S", help="commit finished units every S s"
    )
    p.add_argument("--ann", action="store_true", help="(re)build the ANN index of the version afterwards")
    p.add_argument(
        "--ray-address", default=None, help="Ray cluster to use (default: RAY_ADDRESS or a local Ray)"
    )
    p.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option for archive, store and checkpoint (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print the run report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import json
    import logging
    import os
    import sys

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep, never spin
    from pipelines.embed.encoders import CheckpointError
    from pipelines.embed.job import embed_archive
    from pipelines.fsio import StorageError, UnsafePathError, parse_storage_options
    from pipelines.store.store import StoreError

    log = logging.getLogger("ssjdn.embed")
    try:
        report = embed_archive(
            args.archive,
            args.store,
            args.checkpoint,
            captions=args.captions,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            gpu=args.gpu,
            dtype=args.dtype,
            splits=[s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None,
            storage_options=parse_storage_options(args.storage_option),
            max_rows_per_file=args.max_rows_per_file,
            commit_every_s=args.commit_every,
            threads_per_actor=args.threads,
            ray_address=args.ray_address,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
        if args.ann and report.images:
            from pipelines.search.ann import build_ann
            from pipelines.store.store import EmbeddingStore

            store = EmbeddingStore(args.store, parse_storage_options(args.storage_option))
            build_ann(store, store.manifest(report.model_id))
    except (CheckpointError, StoreError, StorageError, UnsafePathError, ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps(report.to_json(), indent=1) if args.json else report.summary())
    return 1 if report.failed_units else 0
