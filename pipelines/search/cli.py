"""`ssjdn query "caption" --store URL` / `ssjdn query --image PATH --store URL`: top-k retrieval over a store.
The search flags are `QueryOptions`' fields (pipelines/search/query.py)."""

from __future__ import annotations

import argparse

NAME = "query"
HELP = "retrieve the images (or captions) nearest to a caption or an image from an embedding store"


def configure(p: argparse.ArgumentParser) -> None:
    from pipelines.options import add_arguments
    from pipelines.search.query import QueryOptions

    p.add_argument("text", nargs="?", default=None, metavar="TEXT", help="the query caption")
    p.add_argument("--image", default=None, metavar="PATH", help="query by an image (path or URL) instead")
    p.add_argument(
        "--image-at",
        default=None,
        metavar="LON,LAT",
        help="query by the stored chip whose footprint covers this point",
    )
    p.add_argument("--store", required=True, metavar="URL", help="embedding store root")
    add_arguments(p, QueryOptions)
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument(
        "--html",
        default=None,
        metavar="OUT.html",
        help="write a page of thumbnails, captions and scores (hits with footprints also drawn on their "
        "scene's overview from the tile run, offline)",
    )
    p.add_argument(
        "--geojson",
        default=None,
        metavar="OUT.geojson",
        help="write the hits as a GeoJSON FeatureCollection (footprint, score, rank, key, scene, datetime)",
    )


def run(args: argparse.Namespace) -> int:
    import json

    from pipelines.options import from_args
    from pipelines.search.query import QueryOptions, query_store

    # Bad input and failed searches raise PipelineError (or OSError naming the file): pipelines.command prints
    # them as one line and exits 1.
    options = from_args(QueryOptions, args)
    result = query_store(
        args.store,
        options,
        text=args.text,
        image=args.image,
        image_at=args.image_at,
        geometry=bool(args.geojson or args.html),
    )
    if args.geojson:
        from pipelines.geo.geojson import write_geojson

        write_geojson(args.geojson, [h.feature() for h in result.hits])
    if args.html:
        _write_html(args.html, result, options.storage_options)
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
        return 0
    extra = ""
    if result.ann:
        k = result.ann["recall_k"]
        extra = f", ANN recall@{k} vs exact {result.ann[f'recall@{k}']:.3f} (at build)"
    print(
        f"{result.query!r}: top {len(result.hits)} of version {result.model_id[:12]} ({result.mode}{extra}, "
        f"{result.seconds * 1000:.1f} ms)"
    )
    for h in result.hits:
        label = h.extra.get("caption") or h.source
        print(
            f"{h.rank:3d}  {h.score:.4f}  {h.key:<32} {h.class_name or '-':<18} {h.split or '-':<6} {label}"
        )
    return 0


def _write_html(path: str, result, options) -> None:
    import logging

    from pipelines.fsio import atomic_write_bytes, get_fs
    from pipelines.search.page import fetch_images, fetch_scene_maps, render_page

    images = fetch_images([h.source for h in result.hits], options)
    maps = fetch_scene_maps(result.hits, images, options)
    info = {"model_id": result.model_id[:12], "mode": result.mode, "k": len(result.hits)}
    if maps:
        info["footprints drawn"] = sum(len(m.outlines) for m in maps)
    page = render_page(f"ssjdn query: {result.query}", result.hits, images, info, maps)
    fs, out = get_fs(path, options)
    atomic_write_bytes(fs, out, page.encode("utf-8"))
    logging.getLogger("ssjdn.query").info("wrote %s (%d results)", path, len(result.hits))
