"""Geo and time filters in search: building a `GeoFilter` from flags or API values, and the rows of a table
that pass one. The bbox covering columns prune, the footprint polygon decides (pipelines.geo), so a chip whose
bbox meets the box but whose footprint does not is left out.

A filter the version cannot answer - written before the geo columns, or holding no footprint / datetime at all -
is a one-line error, never zero hits.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from pipelines.geo.errors import GeoFilterError
from pipelines.geo.exact import spatial_mask, time_mask
from pipelines.geo.filters import (
    GeoFilter,
    check_columns,
    parse_bbox,
    parse_point,
    parse_radius_km,
    parse_time,
)
from pipelines.geo.geoparquet import BBOX, GEOMETRY
from pipelines.geo.prune import bbox_arrays, bbox_prune_mask
from pipelines.store.reader import Snapshot

DATETIME = "datetime"


def _time(value: Any, flag: str, end_of_day: bool) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    if isinstance(value, date):  # a date: the whole day, as for the flag
        return parse_time(value.isoformat(), flag, end_of_day=end_of_day)
    return parse_time(str(value), flag, end_of_day=end_of_day)


def _values(value: Any, flag: str) -> tuple | None:
    if value is None:
        return None
    try:
        return tuple(value)
    except TypeError:
        raise GeoFilterError(f"{flag}: expected a list of numbers, got {value!r}") from None


def geo_filter(
    bbox: Any = None, near: Any = None, radius_km: Any = None, after: Any = None, before: Any = None
) -> GeoFilter | None:
    """A checked GeoFilter (None when no part is given) from the flags' strings (`"w,s,e,n"`, `"lon,lat"`,
    ISO dates) or Python values (tuples / lists, numbers, dates, datetimes). Raises GeoFilterError."""
    if all(v is None for v in (bbox, near, radius_km, after, before)):
        return None
    return GeoFilter(
        bbox=parse_bbox(bbox) if isinstance(bbox, str) else _values(bbox, "--bbox"),
        near=parse_point(near) if isinstance(near, str) else _values(near, "--near"),
        radius_km=parse_radius_km(radius_km) if isinstance(radius_km, str) else radius_km,
        after=_time(after, "--after", end_of_day=False),
        before=_time(before, "--before", end_of_day=True),
    )


def parse_lonlat(value: Any, flag: str) -> tuple[float, float]:
    """`"LON,LAT"` or a pair -> a checked (lon, lat)."""
    text = value if isinstance(value, str) else ",".join(str(v) for v in value)
    return parse_point(text, flag)


class _Columns(Protocol):
    snapshot: Snapshot
    table: str
    rows: int

    def column(self, name: str) -> pa.ChunkedArray: ...

    def take_column(self, name: str, rows: np.ndarray) -> pa.Array | pa.ChunkedArray: ...


def check_version(snapshot: Snapshot, table: str, filt: GeoFilter) -> None:
    """Refuse a filter this version's schema cannot answer (written before the geo columns)."""
    try:
        check_columns(filt, snapshot.schema(table).names, GEOMETRY, BBOX, DATETIME)
    except GeoFilterError as exc:
        raise GeoFilterError(
            f"{exc} (version {snapshot.model_id[:12]} was written before the store had geo columns)"
        ) from None


def filter_rows(t: _Columns, filt: GeoFilter) -> np.ndarray:
    """Sorted global rows of the table that pass `filt`: the bbox columns and the datetime first (cached
    columns, vectorised), then the footprint polygons of the candidates only (their row groups are read)."""
    snapshot = t.snapshot
    check_version(snapshot, t.table, filt)
    keep = np.ones(t.rows, dtype=bool)
    where = f"version {snapshot.model_id[:12]} (generation {snapshot.generation})"
    if filt.spatial:
        bbox = t.column(BBOX)
        if t.rows and bbox.null_count == t.rows:
            flags = " and ".join(
                f for f, v in (("--bbox", filt.bbox), ("--near", filt.near)) if v is not None
            )
            raise GeoFilterError(
                f"{flags}: {where} holds no footprints: none of its {t.rows} {t.table} rows has a geometry "
                "(only chips of georeferenced scenes have one)"
            )
        boxes = bbox_arrays(bbox)
        keep &= bbox_prune_mask(*boxes, filt)
    if filt.temporal:
        stamps = t.column(DATETIME)
        if t.rows and stamps.null_count == t.rows:
            raise GeoFilterError(
                f"--after/--before: {where} holds no datetimes: none of its {t.rows} {t.table} rows has one"
            )
        keep &= time_mask(stamps, filt)
    rows = np.flatnonzero(keep).astype(np.int64)
    if filt.spatial and len(rows):
        inside = np.zeros(len(rows), dtype=bool)
        if filt.near is None:
            # A footprint lies inside its bbox: a bbox inside the query box means the footprint meets it, so only
            # the footprints on the box's edge are read and decided (most candidates of a small box need no read).
            xmin, ymin, xmax, ymax = (np.asarray(a, dtype=float)[rows] for a in boxes)
            for lo_lon, lo_lat, hi_lon, hi_lat in filt.bbox_parts():
                inside |= (xmin >= lo_lon) & (xmax <= hi_lon) & (ymin >= lo_lat) & (ymax <= hi_lat)
        edge = rows[~inside]
        if len(edge):
            geoms = t.take_column(GEOMETRY, edge)
            edge = edge[spatial_mask(geoms, filt)]
        rows = np.sort(np.concatenate([rows[inside], edge]))
    return rows


def covering_rows(t: _Columns, lon: float, lat: float) -> np.ndarray:
    """Global rows whose footprint covers (lon, lat), nearest centroid first (ties: row order)."""
    rows = filter_rows(t, GeoFilter(near=(lon, lat), radius_km=0.0))
    if len(rows) > 1:
        cols = t.snapshot.take(t.table, rows, ["lon", "lat"])
        dlon = (np.asarray(cols.column("lon").to_numpy(zero_copy_only=False), float) - lon + 180) % 360 - 180
        dlat = np.asarray(cols.column("lat").to_numpy(zero_copy_only=False), float) - lat
        rows = rows[np.lexsort((rows, np.hypot(dlon * np.cos(np.radians(lat)), dlat)))]
    return rows
