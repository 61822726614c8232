"""`ssjdn data ...`: dataset utilities. `ssjdn data describe DATASET` summarises a dataset and checks its images."""

from __future__ import annotations

import argparse

NAME = "data"
HELP = "dataset utilities (describe: counts, classes, splits, missing, unreadable or refused images)"

FORMAT_CHOICES = ("karpathy", "precomp", "precomp:verify", "table")  # = ssjdn.data.readers.FORMATS
CHECK_CHOICES = ("decode", "header", "exists", "none")  # = ssjdn.data.describe.CHECK_MODES


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser(
        "describe",
        help="summarise a dataset: images, captions, classes, splits, missing/unreadable images, duplicates",
        description=(
            "Read a dataset (Karpathy JSON, precomp caption files, or a CSV/JSONL/Parquet table), check its images "
            "and print a summary. Exits 1 when images are missing (unless --allow-missing), unreadable (unless "
            "--allow-unreadable) or refused (symbolic links out of the dataset: see --follow-symlinks), 2 when the "
            "dataset files themselves are unusable."
        ),
    )
    p.add_argument("dataset", metavar="DATASET", help="dataset folder or its description file")
    p.add_argument("--images", metavar="DIR", help="image folder (default: DATASET/images, else DATASET)")
    p.add_argument("--format", choices=FORMAT_CHOICES, help="skip format detection")
    p.add_argument("--name", help="dataset name used in sample keys (default: from the data)")
    p.add_argument(
        "--allow-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder outside the dataset that image names, file:/local: URLs and symbolic links may point "
        "into (repeatable)",
    )
    p.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="read images through symbolic links that lead out of the dataset (default: refuse them)",
    )
    p.add_argument("--allow-missing", action="store_true", help="exit 0 even when images are missing")
    p.add_argument(
        "--allow-unreadable", action="store_true", help="exit 0 even when images cannot be decoded"
    )
    p.add_argument(
        "--check",
        choices=CHECK_CHOICES,
        default="decode",
        help="image check: full decode (default), header only, existence only, or none",
    )
    p.add_argument(
        "--show", type=int, default=5, metavar="N", help="name the first N missing/unreadable images"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(_data_run=_describe)


def run(args: argparse.Namespace) -> int:
    return args._data_run(args)


def _describe(args: argparse.Namespace) -> int:
    import json
    import sys

    from ssjdn.data.describe import describe_dataset, format_report
    from ssjdn.data.errors import DataError
    from ssjdn.data.readers import load_dataset

    try:
        ds = load_dataset(
            args.dataset,
            format=args.format,
            images=args.images,
            name=args.name,
            allow_roots=tuple(args.allow_root),
        )
    except (DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = describe_dataset(
        ds, check=args.check, max_named=args.show, progress=None, follow_symlinks=args.follow_symlinks
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))

    status = 0
    missing, unreadable = report["missing_images"], report["unreadable_images"]
    if missing["count"] and not args.allow_missing:
        print(
            f"error: {missing['count']} of {report['images']} images are missing from {ds.image_root} "
            f"(first: {', '.join(missing['first'])}); pass --images DIR to point at them, "
            "or --allow-missing to describe the dataset anyway",
            file=sys.stderr,
        )
        status = 1
    if unreadable["count"] and not args.allow_unreadable:
        first = "; ".join(u["reason"] for u in unreadable["first"])
        print(f"error: {unreadable['count']} images are unreadable: {first}", file=sys.stderr)
        status = 1
    refused = report["refused_images"]
    if refused["count"]:
        first = "; ".join(u["reason"] for u in refused["first"][:1])
        print(f"error: {refused['count']} images refused (not read): {first}", file=sys.stderr)
        status = 1
    return status
