"""The exact decision of a geo / time filter: the footprint polygon and the datetime decide.

- `bbox`: shapely `intersects` of the footprint (lon/lat, RFC 7946's straight edges) with the query box, as
  two boxes when it crosses the antimeridian.
- `near`: the geodesic distance (WGS84) from the point to the footprint, 0 when the point lies in it
  (`footprint_distance_km`), at most `radius_km`.
- `after` / `before`: inclusive bounds on the row's datetime.

A row without a footprint never matches a spatial filter; a row without a datetime never matches a time one.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, time, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import shapely
from pyproj import CRS, Geod, Transformer
from shapely.geometry import shape

from pipelines.geo.errors import GeoFilterError
from pipelines.geo.filters import GeoFilter

# Boundary edges are cut into pieces of at most SEGMENT_KM, so every boundary point is within SEGMENT_KM / 2
# of a piece's end, whose geodesic distance is exact: the distance is known to that bound.
SEGMENT_KM = 0.2
DISTANCE_TOLERANCE_KM = SEGMENT_KM / 2
# a^2 / b, WGS84's largest radius of curvature: a piece of a lon/lat edge spanning dlat, dlon (radians) is at
# most R_MAX * hypot(dlat, cos(lat) dlon) long, cos taken where the piece is nearest the equator.
R_MAX_KM = 6378.137**2 / 6356.752314245
_GEOD = Geod(ellps="WGS84")
_EPOCH = np.datetime64("1970-01-01T00:00:00", "us")


def as_geometries(geometries) -> np.ndarray:
    """WKB bytes / shapely geometries / GeoJSON dicts / None (a list, numpy or pyarrow array) -> object array
    of shapely geometries, None where missing or empty."""
    if isinstance(geometries, (pa.Array, pa.ChunkedArray)):
        geometries = geometries.to_numpy(zero_copy_only=False)
    values = np.empty(len(geometries), dtype=object)
    values[:] = list(geometries)
    wkb = np.array([isinstance(v, (bytes, bytearray, memoryview)) for v in values], dtype=bool)
    if wkb.any():
        values[wkb] = shapely.from_wkb([bytes(v) for v in values[wkb]])
    for i in np.flatnonzero([isinstance(v, Mapping) for v in values]):
        values[i] = shape(values[i])
    values[shapely.is_missing(values)] = None
    present = values != None  # noqa: E711 - elementwise on an object array
    values[present & shapely.is_empty(values)] = None
    return values


def _lines(geoms: np.ndarray):
    """Every ring and line of the geometries (points as one-vertex lines) with the geometry each belongs to."""
    parts, owner = shapely.get_parts(geoms, return_index=True)
    poly = shapely.get_type_id(parts) == shapely.GeometryType.POLYGON
    rings, ring_owner = shapely.get_rings(parts[poly], return_index=True)
    lines = np.concatenate([rings, parts[~poly]])
    return lines, np.concatenate([owner[poly][ring_owner], owner[~poly]])


def _edge_km(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """An upper bound of the length (km) of each lon/lat straight edge a -> b."""
    lat_a, lat_b = a[:, 1], b[:, 1]
    nearest_equator = np.where(np.sign(lat_a) != np.sign(lat_b), 0.0, np.minimum(abs(lat_a), abs(lat_b)))
    d = np.radians(b - a)
    return R_MAX_KM * np.hypot(d[:, 1], np.cos(np.radians(nearest_equator)) * d[:, 0])


def _piece_points(a: np.ndarray, b: np.ndarray, length: np.ndarray):
    """Each edge a -> b cut into pieces of at most SEGMENT_KM: the points (both ends of every edge included)
    and a mask of the points a piece starts at (every one but each edge's last)."""
    n = np.maximum(1, np.ceil(length / SEGMENT_KM)).astype(np.int64)
    edge = np.repeat(np.arange(len(a)), n + 1)
    step = np.arange((n + 1).sum()) - np.repeat(np.cumsum(n + 1) - (n + 1), n + 1)
    pts = a[edge] + (step / n[edge])[:, None] * (b - a)[edge]
    return pts, edge, step < n[edge]


class _Plane:
    """The azimuthal-equidistant projection centred on the point: a point's distance from the origin is its
    geodesic distance from the centre (PROJ computes it with the geodesic inverse, to nanometres)."""

    def __init__(self, lon: float, lat: float):
        self.lon, self.lat = lon, lat
        crs = CRS.from_dict({"proj": "aeqd", "lat_0": lat, "lon_0": lon, "datum": "WGS84", "units": "m"})
        self._forward = Transformer.from_crs("EPSG:4326", crs, always_xy=True)

    def project(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x, y in metres, geodesic km from the centre); pyproj.Geod where the projection gives no number."""
        if not len(pts):
            return np.zeros((0, 2)), np.zeros(0)
        xy = np.column_stack(self._forward.transform(pts[:, 0], pts[:, 1]))
        km = np.hypot(xy[:, 0], xy[:, 1]) / 1000.0
        bad = ~np.isfinite(km)
        if bad.any():
            n = int(bad.sum())
            _, _, metres = _GEOD.inv(np.full(n, self.lon), np.full(n, self.lat), pts[bad, 0], pts[bad, 1])
            km[bad] = np.asarray(metres) / 1000.0
        return xy, km


def _chord_km(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Planar distance from the origin to each segment, in km (inputs in metres)."""
    d = end - start
    dd = (d * d).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.clip(np.where(dd > 0, -(start * d).sum(axis=1) / dd, 0.0), 0.0, 1.0)
    return np.hypot(*(start + t[:, None] * d).T) / 1000.0


def footprint_distance_km(geometries, lon: float, lat: float) -> np.ndarray:
    """Geodesic distance (WGS84, km) from (lon, lat) to each footprint: 0 inside it, NaN where missing.

    Each boundary edge (a straight line in lon/lat, as in GeoJSON) that may hold the nearest point is cut
    into pieces of at most SEGMENT_KM. In an azimuthal-equidistant projection centred on the point (pyproj),
    every vertex and piece end lies at its exact geodesic distance from the origin; the distance to a piece
    is the plane distance to its chord, clamped between the nearest end's distance and that minus
    SEGMENT_KM / 2. So the result is within DISTANCE_TOLERANCE_KM (0.1 km) of the true distance anywhere on
    Earth, antipode included, and within metres for footprints up to a few hundred km away, where the
    projection barely bends an edge."""
    geoms = as_geometries(geometries)
    out = np.full(len(geoms), np.nan)
    present = np.flatnonzero(geoms != None)  # noqa: E711
    if not len(present):
        return out
    g = geoms[present]
    plane = _Plane(lon, lat)
    lines, owner = _lines(g)
    coords, line_ids = shapely.get_coordinates(lines, return_index=True)
    _, vertex_km = plane.project(coords)
    nearest = np.full(len(g), np.inf)
    np.minimum.at(nearest, owner[line_ids], vertex_km)
    # Only edges that may hold a point nearer than the nearest vertex are cut into pieces: no point of an
    # edge is further than half its length from an end of it.
    ia = np.flatnonzero(line_ids[1:] == line_ids[:-1])
    length = _edge_km(coords[ia], coords[ia + 1])
    edge_owner = owner[line_ids[ia]]
    near = np.minimum(vertex_km[ia], vertex_km[ia + 1]) - length / 2 <= nearest[edge_owner]
    pts, edge, starts = _piece_points(coords[ia[near]], coords[ia[near] + 1], length[near])
    point_owner = edge_owner[near][edge]
    xy, point_km = plane.project(pts)
    np.minimum.at(nearest, point_owner, point_km)
    first = np.flatnonzero(starts)
    chord = np.full(len(g), np.inf)
    np.minimum.at(chord, point_owner[first], _chord_km(xy[first], xy[first + 1]))
    refined = np.where(np.isfinite(chord), np.clip(chord, nearest - DISTANCE_TOLERANCE_KM, nearest), nearest)
    inside = shapely.intersects(g, shapely.Point(lon, lat))
    out[present] = np.where(inside, 0.0, np.maximum(refined, 0.0))
    return out


def _micros(value) -> int:
    return int((np.datetime64(value.replace(tzinfo=None), "us") - _EPOCH).astype(np.int64))


def datetime_micros(datetimes) -> tuple[np.ndarray, np.ndarray]:
    """Datetimes (pyarrow timestamps or dates, numpy datetime64, or datetime / None) -> (microseconds since
    the epoch in UTC, valid mask). Naive values are UTC, as in the filter."""
    if isinstance(datetimes, pa.ChunkedArray):
        datetimes = datetimes.combine_chunks()
    if isinstance(datetimes, pa.Array):
        arr = datetimes
        if pa.types.is_date(arr.type):
            arr = arr.cast(pa.timestamp("us"))
        if not pa.types.is_timestamp(arr.type):
            raise GeoFilterError(
                f"--after/--before: the datetime column has type {arr.type}, not a timestamp"
            )
        arr = pc.cast(arr, pa.timestamp("us", tz=arr.type.tz)).cast(pa.int64())
        valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        return np.asarray(arr.fill_null(0).to_numpy(), dtype=np.int64), valid
    values = list(datetimes)
    valid = np.array([v is not None and not (isinstance(v, np.datetime64) and np.isnat(v)) for v in values])
    micros = np.zeros(len(values), dtype=np.int64)
    for i in np.flatnonzero(valid):
        v = values[i]
        if isinstance(v, np.datetime64):
            micros[i] = int((v.astype("datetime64[us]") - _EPOCH).astype(np.int64))
        else:
            if not isinstance(v, datetime):  # a date: its first instant
                v = datetime.combine(v, time())
            micros[i] = _micros(v.astimezone(timezone.utc) if v.tzinfo else v)
    return micros, valid


def time_mask(datetimes, filt: GeoFilter) -> np.ndarray:
    """Rows whose datetime lies in [after, before] (all True without a time part; null datetimes False)."""
    micros, valid = datetime_micros(datetimes)
    keep = valid.copy() if filt.temporal else np.ones(len(valid), dtype=bool)
    if filt.after is not None:
        keep &= micros >= _micros(filt.after)
    if filt.before is not None:
        keep &= micros <= _micros(filt.before)
    return keep


def spatial_mask(geometries, filt: GeoFilter, within: np.ndarray | None = None) -> np.ndarray:
    """Rows whose footprint meets the filter's bbox and lies within its radius (rows outside `within`, a
    boolean mask such as the bbox pruning's, are not evaluated and come out False)."""
    if not filt.spatial:
        return np.ones(len(geometries), dtype=bool) if within is None else np.array(within, dtype=bool)
    geoms = as_geometries(geometries)
    keep = geoms != None  # noqa: E711
    if within is not None:
        keep &= np.asarray(within, dtype=bool)
    if filt.bbox is not None:
        idx = np.flatnonzero(keep)
        hit = np.zeros(len(idx), dtype=bool)
        for part in filt.bbox_parts():
            hit |= shapely.intersects(geoms[idx], shapely.box(*part))
        keep[idx] = hit
    if filt.near is not None:
        idx = np.flatnonzero(keep)
        keep[idx] = footprint_distance_km(geoms[idx], *filt.near) <= filt.radius_km
    return keep


def exact_mask(geometries, datetimes, filt: GeoFilter, within: np.ndarray | None = None) -> np.ndarray:
    """Rows that satisfy every part of `filt`: footprint (WKB or shapely, None for none) and datetime decide.
    `datetimes` may be None when the filter has no time part. `within` restricts the work to candidate rows
    (the others come out False): `exact_mask(g, t, f, within=bbox_prune_mask(...))`."""
    keep = spatial_mask(geometries, filt, within)
    if filt.temporal:
        if datetimes is None:
            raise GeoFilterError("--after/--before: these rows have no datetime to filter on")
        keep &= time_mask(datetimes, filt)
    return keep
