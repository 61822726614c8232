"""`ssjdn embed ARCHIVE_URL STORE_URL --checkpoint URL` (= `python -m pipelines.embed`): embed an archive into
the versioned Parquet store. The flags are `EmbedOptions`' fields."""

from __future__ import annotations

import argparse

NAME = "embed"
HELP = (
    "embed an archive (shards, image files, dataset) with a trained checkpoint into a Parquet embedding store"
)


def configure(p: argparse.ArgumentParser) -> None:
    from pipelines.embed.options import EmbedOptions
    from pipelines.options import add_arguments

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
    add_arguments(p, EmbedOptions)
    p.add_argument("--json", action="store_true", help="print the run report as JSON")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    import os
    import sys

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep, never spin
    from pipelines.embed.job import embed_archive
    from pipelines.embed.options import EmbedOptions
    from pipelines.options import from_args

    options = from_args(EmbedOptions, args)
    options = dataclasses.replace(options, progress=options.progress and sys.stderr.isatty())
    report = embed_archive(args.archive, args.store, args.checkpoint, options)
    print(json.dumps(report.to_json(), indent=1) if args.json else report.summary())
    return 1 if report.failed_units else 0
