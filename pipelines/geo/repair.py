"""Footprints that come out of GDAL invalid, made valid before they are stored.

About 1.5 % of chips near the antimeridian or a pole get a self-intersecting outline from
`rasterio.warp.transform_geom` (an edge not cut at +-180, so it runs the long way round; a ring around a pole
closed on the wrong side). `footprint_columns` refuses invalid geometries, and one bad chip must not fail an
embedding run, so:

1. an outline that is valid once its western longitudes are moved past +180 (it only crosses the antimeridian)
   is cut there, as GDAL should have: the same area, in two parts;
2. anything else (the rings around a pole) becomes its bounding box, a band of latitudes: larger than the chip,
   so a filter may take it where it should not, but never misses it (`shapely.make_valid` gave shapes that
   leave out the chip's own centre).
"""

from __future__ import annotations

import numpy as np
import shapely

_EAST = shapely.box(0.0, -90.0, 180.0, 90.0)
_WEST = shapely.box(180.0, -90.0, 360.0, 90.0)


def _polygonal(geom):
    """The polygons of a geometry (a collection may hold lines or points after make_valid), or None."""
    parts = [
        p for p in shapely.get_parts(geom) if p.geom_type in ("Polygon", "MultiPolygon") and not p.is_empty
    ]
    if not parts:
        return None
    out = shapely.union_all(parts)
    return out if out.is_valid and not out.is_empty else None


def _cut_at_antimeridian(geom):
    """`geom` with every longitude < 0 moved by +360, valid there and then cut at 180; None when that does not
    give a valid footprint (it does not simply cross the antimeridian)."""
    shifted = shapely.transform(geom, lambda xy: np.where(xy[:, :1] < 0, xy + [360.0, 0.0], xy))
    if not shifted.is_valid:
        return None
    east = shapely.intersection(shifted, _EAST)
    west = shapely.transform(shapely.intersection(shifted, _WEST), lambda xy: xy - [360.0, 0.0])
    return _polygonal(shapely.union_all([east, west]))


def valid_footprint(geom):
    """A valid lon/lat footprint for `geom` (a shapely geometry or None): itself when valid, else repaired
    (see the module docstring); None when nothing polygonal is left."""
    if geom is None or geom.is_empty:
        return None
    if geom.is_valid:
        return geom
    xmin, _, xmax, _ = shapely.bounds(geom)
    if xmin <= -180.0 + 1e-6 or xmax >= 180.0 - 1e-6 or xmax - xmin > 180.0:
        cut = _cut_at_antimeridian(geom)
        if cut is not None:
            return cut
    return shapely.box(*shapely.bounds(geom))
