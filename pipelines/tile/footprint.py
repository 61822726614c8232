"""Where a chip lies on Earth: its window's outline in the scene CRS, densified and transformed to WGS84.

A projected window's straight edges are curves in lon/lat, so every edge is sampled at `EDGE_POINTS` points
(corners included) before transforming; 4 corners alone can be off by hundreds of metres on a UTM chip. GDAL's
geometry transformation (`rasterio.warp.transform_geom`) cuts footprints that cross the antimeridian into a
MultiPolygon and closes the ones around a pole along the pole's latitude, so both stay valid polygons.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ssjdn.data.errors import DataError

EDGE_POINTS = 21  # per edge, both corners included: 20 segments per edge, 81 ring positions (closed)
WGS84 = "EPSG:4326"


class FootprintError(DataError):
    """The chip's footprint cannot be computed (corners off the globe, a CRS PROJ cannot transform)."""


def window_ring(transform, col_off: float, row_off: float, width: float, height: float, n: int = EDGE_POINTS):
    """The window's outline in the scene CRS as a closed ring (list of (x, y)), `n` points per edge, in the
    order top, right, bottom, left (clockwise in pixel space). `transform`: the scene's affine."""
    t = np.linspace(0.0, 1.0, n)[:-1]
    c0, r0, c1, r1 = col_off, row_off, col_off + width, row_off + height
    cols = np.concatenate([c0 + (c1 - c0) * t, np.full_like(t, c1), c1 + (c0 - c1) * t, np.full_like(t, c0)])
    rows = np.concatenate([np.full_like(t, r0), r0 + (r1 - r0) * t, np.full_like(t, r1), r1 + (r0 - r1) * t])
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    xs, ys = a * cols + b * rows + c, d * cols + e * rows + f
    ring = list(zip(xs.tolist(), ys.tolist()))
    ring.append(ring[0])
    return ring


def window_polygon(transform, col_off, row_off, width, height, n: int = EDGE_POINTS) -> dict[str, Any]:
    """GeoJSON-like Polygon of the window in the scene CRS (what gets transformed)."""
    return {"type": "Polygon", "coordinates": [window_ring(transform, col_off, row_off, width, height, n)]}


def chip_footprint(crs, transform, col_off, row_off, width, height) -> dict[str, Any]:
    """`{"footprint": GeoJSON (Multi)Polygon lon/lat, "bbox": [w, s, e, n], "centroid": [lon, lat]}`.

    Raises FootprintError when any point of the outline cannot be transformed. A bbox of a footprint cut at the
    antimeridian has west > east (RFC 7946, 5.2)."""
    from rasterio.warp import transform_geom

    poly = window_polygon(transform, col_off, row_off, width, height)
    try:
        geom = transform_geom(crs, WGS84, poly, antimeridian_cutting=True)
    except Exception as exc:  # GDAL (CPLE_*): "Reprojection failed" for points off the globe
        gdal = " ".join(str(exc).split())
        raise FootprintError(
            "footprint cannot be computed: part of the window's outline lies off the globe or outside what "
            f"PROJ can transform to lon/lat (GDAL: {gdal})"
        ) from exc
    geom = _checked(geom)
    centre = _centre(crs, transform, col_off + width / 2, row_off + height / 2)
    return {"footprint": geom, "bbox": _bbox(geom), "centroid": _centroid(geom, centre)}


def _as_lists(geom: dict[str, Any]) -> dict[str, Any]:
    def conv(c):
        return [conv(x) for x in c] if isinstance(c[0], (list, tuple)) else [float(c[0]), float(c[1])]

    return {"type": geom["type"], "coordinates": conv(geom["coordinates"])}


def _polygons(geom: dict[str, Any]) -> list:
    return [geom["coordinates"]] if geom["type"] == "Polygon" else list(geom["coordinates"])


def _checked(geom: dict[str, Any]) -> dict[str, Any]:
    if geom.get("type") not in ("Polygon", "MultiPolygon") or not geom.get("coordinates"):
        raise FootprintError(f"footprint cannot be computed: transformed outline is a {geom.get('type')}")
    geom = _as_lists(geom)
    pts = np.array([p for poly in _polygons(geom) for ring in poly for p in ring], dtype=float)
    if (
        not np.isfinite(pts).all()
        or (np.abs(pts[:, 0]) > 180 + 1e-9).any()
        or (np.abs(pts[:, 1]) > 90 + 1e-9).any()
    ):
        raise FootprintError("footprint cannot be computed: outline points transform off the globe")
    return geom


def _bbox(geom: dict[str, Any]) -> list[float]:
    polys = _polygons(geom)
    boxes = []
    for poly in polys:
        ring = np.array(poly[0])
        boxes.append((ring[:, 0].min(), ring[:, 1].min(), ring[:, 0].max(), ring[:, 1].max()))
    south, north = min(b[1] for b in boxes), max(b[3] for b in boxes)
    west, east = min(b[0] for b in boxes), max(b[2] for b in boxes)
    if len(polys) > 1 and west <= -180 + 1e-9 and east >= 180 - 1e-9:  # cut at the antimeridian
        east_parts = [b for b in boxes if b[2] >= 180 - 1e-9]
        west_parts = [b for b in boxes if b[0] <= -180 + 1e-9]
        if east_parts and west_parts and not any(b in west_parts for b in east_parts):
            west, east = min(b[0] for b in east_parts), max(b[2] for b in west_parts)
    return [float(west), float(south), float(east), float(north)]


def _centre(crs, transform, col: float, row: float) -> list[float] | None:
    from rasterio.warp import transform as transform_points

    x, y = transform @ (col, row)
    try:
        lon, lat = transform_points(crs, WGS84, [x], [y])
    except Exception:  # noqa: BLE001 - GDAL's CPLE_* errors: no centre, the outline says why
        return None
    if not (math.isfinite(lon[0]) and math.isfinite(lat[0])):
        return None
    return [float(lon[0]), float(lat[0])]


def _centroid(geom: dict[str, Any], centre: list[float] | None) -> list[float]:
    """Area centroid in lon/lat, with the parts of an antimeridian-cut footprint joined (east of 180 first);
    for a footprint around a pole (its outline spans all longitudes) the chip centre, which is on the globe."""
    from shapely.geometry import shape
    from shapely.ops import unary_union

    polys = _polygons(geom)
    spans_all = any(max(p[0] for p in poly[0]) - min(p[0] for p in poly[0]) >= 360 - 1e-6 for poly in polys)
    if spans_all and centre is not None:
        return centre
    if len(polys) > 1 and centre is not None and _bbox(geom)[0] > _bbox(geom)[2]:
        shifted = [[[[x + 360 if x < 0 else x, y] for x, y in ring] for ring in poly] for poly in polys]
        c = unary_union([shape({"type": "Polygon", "coordinates": p}) for p in shifted]).centroid
        lon = c.x - 360 if c.x > 180 else c.x
        return [float(lon), float(c.y)]
    c = shape(geom).centroid
    return [float(c.x), float(c.y)]
