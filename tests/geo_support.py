"""Random chip footprints over the whole globe for the geo tests, made the way the tile job makes them.

Each footprint is a square window of a local azimuthal-equidistant "scene" (random size and rotation)
run through `pipelines.tile.footprint.chip_footprint`, so chips across the antimeridian come out cut into
MultiPolygons and chips over a pole closed along the pole, as in a real store. Centres are drawn uniformly on
the sphere plus clusters at the antimeridian and the poles, where pruning and distances are hardest.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from functools import lru_cache

import numpy as np
import shapely
from shapely.geometry import shape

from pipelines.tile.footprint import chip_footprint


def _centres(rng: np.random.Generator, n: int) -> np.ndarray:
    kind = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])  # globe, antimeridian, poles
    lon = rng.uniform(-180, 180, n)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    am = kind == 1
    lon[am] = np.where(rng.random(am.sum()) < 0.5, 180, -180) + rng.uniform(-3, 3, am.sum())
    lon[am] = (lon[am] + 180) % 360 - 180
    lat[am] = rng.uniform(-75, 75, am.sum())
    pole = kind == 2
    lat[pole] = np.where(rng.random(pole.sum()) < 0.5, 1, -1) * rng.uniform(84, 90, pole.sum())
    return np.column_stack([lon, lat])


@lru_cache(maxsize=4)  # both geo test modules share one draw (a footprint costs 5-25 ms of GDAL)
def random_footprints(seed: int, n: int, null_share: float = 0.1) -> tuple:
    """Up to `n` shapely footprints (None for about `null_share` of them), chips 2 to 300 km wide.

    `chip_footprint` returns an invalid polygon for about 1.5 % of such chips (a chip near a pole that does
    not contain it, or one GDAL did not cut at the antimeridian): those are left out, the geo package refuses
    them (`GeoError`)."""
    from affine import Affine
    from rasterio.crs import CRS

    rng = np.random.default_rng(seed)
    out = []
    for lon, lat in _centres(rng, n):
        if rng.random() < null_share:
            out.append(None)
            continue
        crs = CRS.from_proj4(f"+proj=aeqd +lat_0={lat} +lon_0={lon} +datum=WGS84 +units=m")
        width_m = float(np.exp(rng.uniform(np.log(2e3), np.log(3e5))))
        res = width_m / 256
        centre = rng.uniform(-0.4, 0.4, 2) * width_m  # the point of tangency need not be the chip's centre
        t = (
            Affine.translation(*centre)
            @ Affine.rotation(rng.uniform(0, 90))
            @ Affine(res, 0, -width_m / 2, 0, -res, width_m / 2)
        )
        geom = shape(chip_footprint(crs, t, 0, 0, 256, 256)["footprint"])
        if geom.is_valid:
            out.append(geom)
    return tuple(out)


def random_datetimes(seed: int, n: int, null_share: float = 0.1) -> list:
    rng = np.random.default_rng(seed)
    start = datetime(2020, 1, 1, tzinfo=timezone.utc)
    return [
        None if rng.random() < null_share else start + timedelta(seconds=int(s))
        for s in rng.integers(0, 5 * 365 * 86400, n)
    ]


def boxes_of(bbox: tuple[float, float, float, float]) -> list:
    """A query box as shapely boxes, cut in two across the antimeridian (written here, not taken from geo)."""
    w, s, e, n = bbox
    return [shapely.box(w, s, e, n)] if w <= e else [shapely.box(w, s, 180, n), shapely.box(-180, s, e, n)]
