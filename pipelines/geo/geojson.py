"""Query hits as a GeoJSON FeatureCollection (RFC 7946): lon/lat positions, exterior rings counter-clockwise,
footprints cut at the antimeridian as the store keeps them, a null geometry for a hit without a footprint."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import mapping, polygon

from pipelines.geo.errors import GeoError
from pipelines.geo.geoparquet import as_footprints

GEOMETRY_KEYS = ("geometry", "bbox")  # a hit's keys that are no properties of its feature


def _oriented(geom):
    """RFC 7946 3.1.6: exterior rings counter-clockwise, holes clockwise."""
    if geom.geom_type == "Polygon":
        return polygon.orient(geom, sign=1.0)
    if geom.geom_type == "MultiPolygon":
        return shapely.MultiPolygon([polygon.orient(p, sign=1.0) for p in geom.geoms])
    return geom


def _plain(value: Any) -> Any:
    """A property value as JSON: datetimes as ISO 8601 (naive = UTC), numpy scalars as numbers, NaN as null."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise GeoError("a hit property is binary; GeoJSON properties hold text, numbers and lists only")
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    return value


def _coords(c):
    return [_coords(x) for x in c] if isinstance(c[0], (list, tuple)) else [float(c[0]), float(c[1])]


def hit_feature(hit: Mapping[str, Any], geometry=None) -> dict[str, Any]:
    """One hit -> a Feature: `id` is its key; every key but the geometry's is a property."""
    geom = None
    if geometry is not None:
        g = mapping(_oriented(geometry))
        geom = {"type": g["type"], "coordinates": _coords(g["coordinates"])}
    props = {k: _plain(v) for k, v in hit.items() if k not in GEOMETRY_KEYS}
    feature: dict[str, Any] = {"type": "Feature", "geometry": geom, "properties": props}
    if hit.get("key") is not None:
        feature["id"] = str(hit["key"])
    return feature


def feature_collection(hits: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Hits (dicts with key, score, rank, scene_id, datetime, geometry as WKB / shapely / GeoJSON or None, and
    any other properties) -> a FeatureCollection dict, hits in the given order."""
    hits = list(hits)
    geoms = as_footprints(h.get("geometry") for h in hits)
    return {"type": "FeatureCollection", "features": [hit_feature(h, g) for h, g in zip(hits, geoms)]}


def write_geojson(path: str | os.PathLike, hits: Iterable[Mapping[str, Any]]) -> Path:
    """Write the hits' FeatureCollection to a local file atomically (temp file beside it, then rename), so a
    reader never sees half a file. Returns the path."""
    path = Path(path)
    text = json.dumps(feature_collection(hits), allow_nan=False, ensure_ascii=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; an output file is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
