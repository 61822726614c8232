"""`ssjdn shard DATASET DEST_URL` (= `python -m pipelines.shard`): write a dataset as WebDataset shards to a
local folder or any fsspec URL. The flags are `ShardOptions`' fields."""

from __future__ import annotations

import argparse

NAME = "shard"
HELP = "shard an image-caption dataset into WebDataset tars (local path, s3://bucket/prefix, any fsspec URL)"


def configure(p: argparse.ArgumentParser) -> None:
    from pipelines.options import add_arguments
    from pipelines.shard.options import ShardOptions, add_ray_arguments

    p.add_argument("dataset", metavar="DATASET", help="dataset folder or description file (see `ssjdn data`)")
    p.add_argument(
        "dest", metavar="DEST_URL", help="output: a local path, s3://bucket/prefix, or any fsspec URL"
    )
    add_arguments(p, ShardOptions)
    add_ray_arguments(p)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import sys

    from pipelines.options import from_args
    from pipelines.shard.job import shard_dataset
    from pipelines.shard.options import ShardOptions

    options = from_args(ShardOptions, args, ray=args.ray)
    options = dataclasses.replace(options, progress=options.progress and sys.stderr.isatty())
    result = shard_dataset(args.dataset, args.dest, options)
    m = result.manifest
    splits = ", ".join(f"{k} {v['samples']}" for k, v in m["splits"].items())
    print(
        f"{result.manifest_url}: {m['totals']['samples']} samples ({splits}), {m['totals']['captions']} captions, "
        f"{m['totals']['shards']} shards ({result.written} written, {result.skipped} already committed), "
        f"{m['bad']['count']} bad"
    )
    return 0
