"""`ssjdn query "caption" --store URL` / `ssjdn query --image PATH --store URL`: top-k retrieval over a store."""

from __future__ import annotations

import argparse

from pipelines.cli_types import positive_int

NAME = "query"
HELP = "retrieve the images (or captions) nearest to a caption or an image from an embedding store"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="?", default=None, metavar="TEXT", help="the query caption")
    p.add_argument("--image", default=None, metavar="PATH", help="query by an image (path or URL) instead")
    p.add_argument("--store", required=True, metavar="URL", help="embedding store root")
    p.add_argument("-k", type=positive_int, default=10, help="number of results (default 10)")
    p.add_argument(
        "--model-id", default=None, help="store version (model_id or a unique prefix; default: newest)"
    )
    p.add_argument("--where", default=None, help="filter, e.g. \"class = 'airport' AND split = 'test'\"")
    p.add_argument("--table", choices=("images", "captions"), default="images", help="what to search")
    p.add_argument("--ann", action="store_true", help="use (building if needed) the version's ANN index")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="exact search decodes the Parquet files instead of the version's memory-mapped cache "
        "(used, and built by the first query, on tables of 100k rows or more)",
    )
    p.add_argument(
        "--checkpoint", default=None, metavar="URL", help="checkpoint (default: the one the version records)"
    )
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument(
        "--html", default=None, metavar="OUT.html", help="write a page of thumbnails, captions and scores"
    )
    p.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    import json
    import logging

    log = logging.getLogger("ssjdn.query")
    if (args.text is None) == (args.image is None):
        log.error("give either a query TEXT or --image PATH (exactly one)")
        return 2

    from pipelines.embed.encoders import CheckpointError
    from pipelines.fsio import StorageError, UnsafePathError, parse_storage_options
    from pipelines.search.query import query_store
    from pipelines.search.where import FilterError
    from pipelines.store.store import StoreError

    try:
        options = parse_storage_options(args.storage_option)
        result = query_store(
            args.store,
            text=args.text,
            image=args.image,
            k=args.k,
            model_id=args.model_id,
            where=args.where,
            table=args.table,
            ann=args.ann,
            cache=False if args.no_cache else None,
            checkpoint=args.checkpoint,
            storage_options=options,
        )
        if args.html:
            _write_html(args.html, result, options)
    except (
        StoreError,
        FilterError,
        CheckpointError,
        StorageError,
        UnsafePathError,
        FileNotFoundError,
    ) as exc:
        log.error("%s", exc)
        return 1
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
    from pipelines.report.html import fetch_images, render_page

    images = fetch_images([h.source for h in result.hits], options)
    info = {"model_id": result.model_id[:12], "mode": result.mode, "k": len(result.hits)}
    page = render_page(f"ssjdn query: {result.query}", result.hits, images, info)
    fs, out = get_fs(path, options)
    atomic_write_bytes(fs, out, page.encode("utf-8"))
    logging.getLogger("ssjdn.query").info("wrote %s (%d results)", path, len(result.hits))
