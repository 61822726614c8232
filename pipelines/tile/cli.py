"""`ssjdn tile SOURCE DEST_URL` (= `python -m pipelines.tile`): cut GeoTIFF/COG scenes or a STAC catalog into
WebDataset shards of georeferenced chips. The flags are `TileOptions`' fields."""

from __future__ import annotations

import argparse

NAME = "tile"
HELP = (
    "cut GeoTIFF/COG scenes (a file, folder, URL list or STAC catalog) into georeferenced chip shards "
    "(local path, s3://bucket/prefix, any fsspec URL)"
)


def configure(p: argparse.ArgumentParser) -> None:
    from pipelines.options import add_arguments
    from pipelines.shard.options import add_ray_arguments
    from pipelines.tile.options import TileOptions

    p.add_argument(
        "source",
        metavar="SOURCE",
        help="a raster file, a folder or URL prefix of GeoTIFF/COG scenes, a .txt list of scene URLs, or a STAC "
        "catalog / collection / item collection (JSON, local or any fsspec URL)",
    )
    p.add_argument(
        "dest", metavar="DEST_URL", help="output: a local path, s3://bucket/prefix, or any fsspec URL"
    )
    add_arguments(p, TileOptions)
    add_ray_arguments(p)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import logging
    import sys

    from pipelines.options import from_args
    from pipelines.tile.job import tile_scenes
    from pipelines.tile.options import TileOptions

    if not getattr(args, "verbose", False):  # GDAL's own messages (e.g. a corrupted tile) go to the report
        logging.getLogger("rasterio").setLevel(logging.WARNING)
    options = from_args(TileOptions, args, ray=args.ray)
    options = dataclasses.replace(options, progress=options.progress and sys.stderr.isatty())
    result = tile_scenes(args.source, args.dest, options)
    t = result.manifest["tile"]["totals"]
    print(
        f"{result.manifest_url}: {result.chips} chips from {t['scenes']} scene(s) ({result.scenes_tiled} tiled, "
        f"{result.scenes_unchanged} unchanged), {t['chips_skipped_nodata']} mostly-nodata chips skipped, "
        f"{t['chips_bad']} bad chips, {t['scenes_bad']} bad scenes; {len(result.manifest['shards'])} shards "
        f"({result.written} written, {result.skipped} kept)"
    )
    return 0
