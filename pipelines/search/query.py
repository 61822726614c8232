"""The front door of search for one query: `query_store(store_url, options, text=...)` opens a `Searcher` on the
store version (its own checkpoint encodes the query), asks it once and closes it. Exact search uses the matrix
cache on large tables, else a Parquet scan; `ann=True` the version's ANN index (built when missing); only the
k winners' metadata is read. For many queries open a `Searcher` (pipelines/search/searcher.py) once instead.

`QueryOptions` is written once: `ssjdn query`'s flags (pipelines/search/cli.py), the Python API and the demo
flow all use it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.cli_types import positive_int
from pipelines.errors import PipelineError
from pipelines.fsio import parse_storage_options
from pipelines.options import option
from pipelines.search.results import QueryResult
from pipelines.search.searcher import Searcher
from pipelines.search.where import parse_where
from pipelines.store.schema import TABLES


class QueryOptionsError(PipelineError, ValueError):
    """An option value or a combination that cannot work (named, with what is accepted)."""


def _cache_flag(keep_default: bool) -> bool | None:
    """`--no-cache` (argparse store_false) -> False: always scan; absent -> None: the cache where it pays."""
    return None if keep_default else False


@dataclass(frozen=True)
class QueryOptions:
    """How to search: what `ssjdn query` takes besides the query itself and the store URL."""

    k: int = option(10, flag="-k", type=positive_int, help="number of results (default 10)")
    model_id: str | None = option(None, help="store version (model_id or a unique prefix; default: newest)")
    where: str | None = option(None, help="filter, e.g. \"class = 'airport' AND split = 'test'\"")
    table: str = option("images", choices=TABLES, help="what to search")
    ann: bool = option(False, action="store_true", help="use (building if needed) the version's ANN index")
    cache: bool | None = option(
        None,
        flag="--no-cache",
        action="store_false",
        parse=_cache_flag,
        help="exact search decodes the Parquet files instead of the version's memory-mapped cache "
        "(used, and built by the first query, on tables of 100k rows or more)",
    )
    checkpoint: str | None = option(
        None, metavar="URL", help="checkpoint (default: the one the version records)"
    )
    storage_options: dict[str, Any] = option(
        default_factory=dict,
        flag="--storage-option",
        action="append",
        metavar="KEY=VALUE",
        parse=parse_storage_options,
        help="fsspec storage option (repeatable)",
    )

    def __post_init__(self) -> None:
        if self.k < 1:
            raise QueryOptionsError(f"k must be at least 1 (got {self.k})")
        if self.table not in TABLES:
            raise QueryOptionsError(f"table must be one of {', '.join(TABLES)} (got {self.table!r})")


def _read_image(source: str | os.PathLike):
    from ssjdn.data.images import decode_image, read_image_bytes

    return decode_image(read_image_bytes(source), str(source))


def query_store(
    store_url: str,
    options: QueryOptions | None = None,
    *,
    text: str | None = None,
    image: str | None = None,
    vector: np.ndarray | None = None,
    **overrides: Any,
) -> QueryResult:
    """Search the store for one query: `text`, an `image` (path/URL) or a ready `vector` (exactly one).

    `options` (default `QueryOptions()`), with any of its fields overridden by keyword:
    `query_store("./store/embeddings", text="a harbour", k=5)`.
    """
    opts = dataclasses.replace(options or QueryOptions(), **overrides)
    given = [
        name for name, value in (("text", text), ("image", image), ("vector", vector)) if value is not None
    ]
    if len(given) != 1:
        raise QueryOptionsError(
            "give a query TEXT or --image PATH (from Python: text=, image= or vector=), exactly one "
            f"(got {', '.join(given) or 'none'})"
        )
    # Bad input first, before the store is opened or a model loaded.
    if opts.where:
        parse_where(opts.where, opts.table)
    picture = _read_image(image) if image is not None else None
    # One query: no refresh, and only the winners' metadata is read (not the table's columns into memory).
    with Searcher(
        store_url,
        opts,
        refresh_s=None,
        load_encoders=vector is None,
        metadata_in_memory=False,
    ) as searcher:
        searcher.snapshot.require_rows(opts.table)  # the store's own message for an empty table
        result = searcher.search(text=text, image=picture, vector=vector)
    if image is not None:
        result.query = f"image {image}"
    return result
