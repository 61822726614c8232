"""The cheap first pass of a spatial filter: which rows' bbox columns can meet the query at all.

A row is kept when its bbox (xmin, ymin, xmax, ymax in lon/lat degrees) overlaps the query's search region;
the polygon then decides (`pipelines.geo.exact`). Never too small: a row this pass drops cannot match.

- `bbox`: the box itself, as two boxes when it crosses the antimeridian.
- `near`: a lat/lon box holding every point within `radius_km` of the point (see `near_region`).

The store writes planar bounds (xmin <= xmax, an antimeridian-cut footprint spans -180..180); a row whose
xmin > xmax (a wrapped bbox from another writer) is kept for any longitude, so it is never wrongly dropped.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.geo.filters import WGS84_A_KM, GeoFilter
from pipelines.geo.geoparquet import BBOX, BBOX_FIELDS

# WGS84's smallest meridional radius of curvature, a(1 - e^2), at the equator: latitude changes by at most
# 1/M_MIN radians per km along any path, and longitude by at most 1/(a cos(lat)) (the prime vertical radius
# N >= a), which bounds the region around a point from outside.
WGS84_E2 = 6.69437999014e-3
M_MIN_KM = WGS84_A_KM * (1 - WGS84_E2)
_SLACK = 1e-9  # degrees, so rounding never makes the region a hair too small
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Region:
    """A latitude band and the longitude intervals (each lo <= hi) a matching footprint's bbox must meet."""

    lat_lo: float
    lat_hi: float
    lons: tuple[tuple[float, float], ...]

    @property
    def all_lons(self) -> bool:
        return self.lons == ((-180.0, 180.0),)


def near_region(lon: float, lat: float, radius_km: float) -> Region:
    """Every point within `radius_km` (geodesic, WGS84) of (lon, lat) lies in this region; all longitudes
    when the band reaches a pole or the longitude half-width reaches 180 degrees."""
    dlat = math.degrees(radius_km / M_MIN_KM) + _SLACK
    lat_lo, lat_hi = lat - dlat, lat + dlat
    if lat_lo <= -90.0 or lat_hi >= 90.0:
        return Region(max(lat_lo, -90.0), min(lat_hi, 90.0), ((-180.0, 180.0),))
    cos_max = math.cos(math.radians(max(abs(lat_lo), abs(lat_hi))))
    dlon = math.degrees(radius_km / (WGS84_A_KM * cos_max)) + _SLACK
    if dlon >= 180.0:
        return Region(lat_lo, lat_hi, ((-180.0, 180.0),))
    return Region(lat_lo, lat_hi, _lon_intervals(lon - dlon, lon + dlon))


def _lon_intervals(lo: float, hi: float) -> tuple[tuple[float, float], ...]:
    """[lo, hi] with lo, hi possibly beyond +-180 -> intervals inside [-180, 180]."""
    if lo < -180.0:
        return ((-180.0, hi), (lo + 360.0, 180.0))
    if hi > 180.0:
        return ((lo, 180.0), (-180.0, hi - 360.0))
    return ((lo, hi),)


def regions(filt: GeoFilter) -> list[Region]:
    """The regions a row's bbox must meet, all of them (bbox and near are ANDed)."""
    out = []
    if filt.bbox is not None:
        parts = filt.bbox_parts()
        out.append(Region(filt.bbox[1], filt.bbox[3], tuple((b[0], b[2]) for b in parts)))
    if filt.near is not None:
        out.append(near_region(filt.near[0], filt.near[1], filt.radius_km))
    return out


def _floats(values) -> np.ndarray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = values.to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float64)  # None / null -> NaN, which fails every comparison


def bbox_arrays(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, ...]:
    """A `bbox` struct column -> (xmin, ymin, xmax, ymax) float arrays, NaN where the row has no bbox."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    fields = column.flatten()  # flatten() carries the struct's own nulls into its fields
    names = [column.type.field(i).name for i in range(column.type.num_fields)]
    return tuple(_floats(fields[names.index(n)]) for n in BBOX_FIELDS)


def bbox_prune_mask(xmin, ymin, xmax, ymax, filt: GeoFilter) -> np.ndarray:
    """Boolean mask of the rows whose bbox can meet `filt`'s spatial part (all True without one; rows without
    a bbox are False under a spatial filter)."""
    xmin, ymin, xmax, ymax = (_floats(a) for a in (xmin, ymin, xmax, ymax))
    keep = np.ones(xmin.shape, dtype=bool)
    for region in regions(filt):
        keep &= (ymin <= region.lat_hi) & (ymax >= region.lat_lo)
        if region.all_lons:
            keep &= np.isfinite(xmin) & np.isfinite(xmax)
            continue
        lon = xmin > xmax  # a wrapped bbox: kept for any longitude
        for lo, hi in region.lons:
            lon |= (xmin <= hi) & (xmax >= lo)
        keep &= lon
    return keep


def bbox_sql(filt: GeoFilter, column: str = BBOX) -> tuple[str, list[float]]:
    """The same test as `bbox_prune_mask` as a SQL predicate on the struct column `column`
    (fields xmin, ymin, xmax, ymax) with `?` placeholders, and its parameters in order. Values are never
    written into the text; ("TRUE", []) without a spatial part. Rows whose bbox is null never match."""
    if not _IDENT.match(column):
        raise ValueError(f"{column!r} is not a plain column name")
    c = {f: f'"{column}".{f}' for f in BBOX_FIELDS}
    terms, params = [], []
    for region in regions(filt):
        term = f"{c['ymin']} <= ? AND {c['ymax']} >= ?"
        params += [region.lat_hi, region.lat_lo]
        if region.all_lons:
            term += f" AND {c['xmin']} IS NOT NULL AND {c['xmax']} IS NOT NULL"
        else:
            lons = [f"{c['xmin']} > {c['xmax']}"]
            for lo, hi in region.lons:
                lons.append(f"({c['xmin']} <= ? AND {c['xmax']} >= ?)")
                params += [hi, lo]
            term += " AND (" + " OR ".join(lons) + ")"
        terms.append(f"({term})")
    return (" AND ".join(terms), params) if terms else ("TRUE", [])
