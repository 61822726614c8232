"""GeoParquet 1.1 for footprints: the `geometry` (WKB, WGS84 lon/lat) and `bbox` covering columns, centroids,
and the `geo` schema metadata that lets geopandas, DuckDB and GDAL read a file as geometries.

`bbox` holds each footprint's planar bounds (xmin <= xmax; an antimeridian-cut MultiPolygon spans -180..180),
so every reader's bbox test, this package's and geopandas' included, is conservative without knowing about
wrapping. A row without a footprint has null `geometry` and null `bbox`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import shapely
from pyproj import CRS, Transformer
from shapely.geometry import shape

from pipelines.geo.errors import GeoError

GEO_KEY = b"geo"
GEO_VERSION = "1.1.0"
GEOMETRY = "geometry"
BBOX = "bbox"
BBOX_FIELDS = ("xmin", "ymin", "xmax", "ymax")
_EDGE = 1e-9  # degrees: how close to +-180 a part must be to count as cut there


def bbox_type() -> pa.StructType:
    return pa.struct([pa.field(f, pa.float64(), nullable=False) for f in BBOX_FIELDS])


def geo_fields() -> list[pa.Field]:
    """The schema fragment: `geometry` (WKB, binary) and `bbox` struct<xmin, ymin, xmax, ymax: double>."""
    return [pa.field(GEOMETRY, pa.binary()), pa.field(BBOX, bbox_type())]


@lru_cache(maxsize=1)
def _wgs84_projjson() -> str:
    return CRS.from_epsg(4326).to_json()


def wgs84_projjson() -> dict[str, Any]:
    """EPSG:4326 as PROJJSON (from pyproj), the `crs` of the geometry column."""
    return json.loads(_wgs84_projjson())


def geo_metadata(geometry_types: Iterable[str] = (), extent: Iterable[float] | None = None) -> dict[str, Any]:
    """The `geo` metadata document. `geometry_types` ([] = any), `extent` the file's [xmin, ymin, xmax, ymax]."""
    column: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": sorted(set(geometry_types)),
        "crs": wgs84_projjson(),
        "covering": {BBOX: {f: [BBOX, f] for f in BBOX_FIELDS}},
    }
    if extent is not None:
        column["bbox"] = [float(v) for v in extent]
    return {"version": GEO_VERSION, "primary_column": GEOMETRY, "columns": {GEOMETRY: column}}


def with_geo_metadata(
    schema: pa.Schema, geometry_types: Iterable[str] = (), extent: Iterable[float] | None = None
) -> pa.Schema:
    """`schema` with the `geo` key set (other metadata kept); it must hold the `geometry` and `bbox` fields."""
    names = set(schema.names)
    if not {GEOMETRY, BBOX} <= names:
        raise GeoError(f"a GeoParquet schema needs the {GEOMETRY!r} and {BBOX!r} columns")
    meta = dict(schema.metadata or {})
    meta[GEO_KEY] = json.dumps(geo_metadata(geometry_types, extent)).encode()
    return schema.with_metadata(meta)


@dataclass(frozen=True)
class FootprintColumns:
    """Arrow columns of a list of footprints, in input order, and what the `geo` metadata needs."""

    geometry: pa.BinaryArray
    bbox: pa.StructArray
    lon: pa.DoubleArray  # centroid, null without a footprint
    lat: pa.DoubleArray
    geometry_types: tuple[str, ...]
    extent: tuple[float, float, float, float] | None

    def metadata(self) -> dict[str, Any]:
        return geo_metadata(self.geometry_types, self.extent)


def _geometry(value: Any, i: int):
    if value is None:
        return None
    if isinstance(value, shapely.Geometry):
        geom = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        geom = shapely.from_wkb(bytes(value))
    elif isinstance(value, Mapping):
        try:
            geom = shape(value)
        except Exception as exc:  # noqa: BLE001 - shapely raises several kinds for a malformed mapping
            raise GeoError(f"footprint {i} is not a GeoJSON geometry: {exc}") from None
    else:
        raise GeoError(f"footprint {i} is a {type(value).__name__}, not a geometry, GeoJSON dict or WKB")
    if geom.is_empty:
        return None
    xy = shapely.get_coordinates(geom)
    if not np.isfinite(xy).all() or (np.abs(xy[:, 0]) > 180).any() or (np.abs(xy[:, 1]) > 90).any():
        raise GeoError(f"footprint {i} has coordinates that are not lon/lat on the globe")
    if not geom.is_valid:
        raise GeoError(f"footprint {i} is not a valid geometry: {shapely.is_valid_reason(geom)}")
    return geom


def as_footprints(footprints: Iterable[Any]) -> np.ndarray:
    """Shapely geometries, GeoJSON dicts, WKB or None -> object array of checked geometries (None: none)."""
    values = list(footprints)
    out = np.empty(len(values), dtype=object)
    out[:] = [_geometry(v, i) for i, v in enumerate(values)]
    return out


def _polar_centroid(geom) -> tuple[float, float]:
    """Centroid of a footprint around a pole, taken in an equidistant projection centred on that pole."""
    pole = 90.0 if shapely.bounds(geom)[3] > 0 else -90.0
    crs = CRS.from_dict({"proj": "aeqd", "lat_0": pole, "lon_0": 0, "datum": "WGS84", "units": "m"})
    forward = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    back = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    dense = shapely.segmentize(geom, 0.5)  # a parallel is a curve there: sample it before projecting
    plane = shapely.transform(dense, lambda xy: np.column_stack(forward.transform(xy[:, 0], xy[:, 1])))
    c = shapely.centroid(shapely.make_valid(plane))
    lon, lat = back.transform(c.x, c.y)
    return float(lon), float(lat)


def centroid(geom) -> tuple[float, float]:
    """Area centroid (lon, lat) of a lon/lat footprint, with the parts of one cut at the antimeridian joined
    across it and one around a pole measured around the pole (its lon/lat centroid would be off the chip)."""
    parts = shapely.get_parts(geom)
    spans = [b[2] - b[0] for b in shapely.bounds(parts)]
    if any(s >= 360 - 1e-6 for s in spans):
        return _polar_centroid(geom)
    xmin, _, xmax, _ = shapely.bounds(geom)
    if len(parts) > 1 and xmin <= -180 + _EDGE and xmax >= 180 - _EDGE:
        east = [shapely.transform(p, lambda xy: xy + [360.0, 0.0]) if p.centroid.x < 0 else p for p in parts]
        c = shapely.centroid(shapely.union_all(east))
        return (float(c.x - 360 if c.x > 180 else c.x), float(c.y))
    c = shapely.centroid(geom)
    return float(c.x), float(c.y)


def footprint_columns(footprints: Iterable[Any]) -> FootprintColumns:
    """Footprints (shapely, GeoJSON dicts, WKB or None, in lon/lat) -> `geometry` WKB, `bbox`, centroid lon and
    lat columns. Raises GeoError for coordinates off the globe or an invalid geometry."""
    geoms = as_footprints(footprints)
    present = geoms != None  # noqa: E711 - elementwise on an object array
    wkb = np.empty(len(geoms), dtype=object)
    wkb[present] = shapely.to_wkb(geoms[present], output_dimension=2, byte_order=1)
    bounds = np.full((len(geoms), 4), np.nan)
    if present.any():
        bounds[present] = shapely.bounds(geoms[present])
    lonlat = np.full((len(geoms), 2), np.nan)
    for i in np.flatnonzero(present):
        lonlat[i] = centroid(geoms[i])
    missing = pa.array(~present)
    bbox = pa.StructArray.from_arrays(
        [pa.array(bounds[:, k]) for k in range(4)], fields=list(bbox_type()), mask=missing
    )
    types = tuple(sorted({g.geom_type for g in geoms[present]}))
    extent = None
    if present.any():
        b = bounds[present]
        extent = (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max())
        extent = tuple(float(v) for v in extent)
    return FootprintColumns(
        geometry=pa.array(list(wkb), pa.binary()),
        bbox=bbox,
        lon=pa.array(lonlat[:, 0], pa.float64(), mask=~present),
        lat=pa.array(lonlat[:, 1], pa.float64(), mask=~present),
        geometry_types=types,
        extent=extent,
    )
