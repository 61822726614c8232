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
from pipelines.search.geo import geo_filter, parse_lonlat
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
    bbox: str | None = option(
        None,
        metavar="MINLON,MINLAT,MAXLON,MAXLAT",
        help="only footprints meeting this lon/lat box (MINLON > MAXLON: across the antimeridian; "
        "write --bbox=-5,... when it starts with a minus)",
    )
    near: str | None = option(
        None, metavar="LON,LAT", help="only footprints within --radius-km of this point (geodesic)"
    )
    radius_km: float | None = option(
        None, flag="--radius-km", metavar="R", help="the distance for --near, in km"
    )
    after: str | None = option(
        None, metavar="DATE", help="only rows dated at or after this ISO date/datetime"
    )
    before: str | None = option(
        None, metavar="DATE", help="only rows dated at or before this ISO date/datetime (a date: its end)"
    )
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
        self.geo_filter()  # bad input is a one-line error before any store is opened

    def geo_filter(self):
        """The checked `GeoFilter` of the geo / time fields (None when none is set)."""
        return geo_filter(self.bbox, self.near, self.radius_km, self.after, self.before)


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
    image_at: Any = None,
    geometry: bool = False,
    **overrides: Any,
) -> QueryResult:
    """Search the store for one query: `text`, an `image` (path/URL), a ready `vector`, or `image_at`
    (`"LON,LAT"` or a pair: the stored image whose footprint covers that point is the query) - exactly one.

    `options` (default `QueryOptions()`), with any of its fields overridden by keyword:
    `query_store("./store/embeddings", text="a harbour", k=5, bbox="-5,40,-3,42")`. `geometry`: the hits carry
    their footprints (`Hit.geometry`, WKB), e.g. for `pipelines.geo.geojson.write_geojson`.
    """
    opts = dataclasses.replace(options or QueryOptions(), **overrides)
    given = [
        name
        for name, value in (("text", text), ("image", image), ("vector", vector), ("image_at", image_at))
        if value is not None
    ]
    if len(given) != 1:
        raise QueryOptionsError(
            "give a query TEXT, --image PATH or --image-at LON,LAT (from Python: text=, image=, vector= or "
            f"image_at=), exactly one (got {', '.join(given) or 'none'})"
        )
    # Bad input first, before the store is opened or a model loaded.
    if opts.where:
        parse_where(opts.where, opts.table)
    place = parse_lonlat(image_at, "--image-at") if image_at is not None else None
    picture = _read_image(image) if image is not None else None
    # One query: no refresh, and only the winners' metadata is read (not the table's columns into memory).
    with Searcher(
        store_url,
        opts,
        refresh_s=None,
        load_encoders=vector is None and place is None,
        metadata_in_memory=False,
    ) as searcher:
        searcher.snapshot.require_rows(opts.table)  # the store's own message for an empty table
        label = None
        if place is not None:
            key, vector = searcher.image_at(*place)
            label = f"image at {place[0]:g},{place[1]:g} ({key})"
        result = searcher.search(text=text, image=picture, vector=vector, geometry=geometry)
    if image is not None:
        result.query = f"image {image}"
    if label is not None:
        result.query = label
    return result
