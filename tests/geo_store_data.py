"""Store versions with chips' rows (footprints, datetimes, STAC scalars) beside benchmark rows (none), written
with the store's own writer as the embedding job writes them; and brute-force geo checks that do not use
pipelines.geo (shapely on densified rings, pyproj.Geod distances)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import shapely
from pyproj import Geod

from pipelines.store.reader import EmbeddingStore
from pipelines.store.schema import build_table
from pipelines.store.writer import VersionWriter
from tests.geo_support import boxes_of, random_datetimes, random_footprints
from tests.store_data import fake_model_id, image_columns, unit_vectors

DIM = 16
GEOD = Geod(ellps="WGS84")
PLATFORMS = ("sentinel-2a", "sentinel-2b", "landsat-8")
# A thin diagonal chip whose bbox meets TOUCH_BOX but whose footprint does not.
DIAGONAL = shapely.Polygon([(10.0, 10.0), (10.2, 10.0), (12.0, 11.8), (12.0, 12.0), (11.8, 12.0)])
TOUCH_BOX = (10.0, 11.5, 10.5, 12.0)


def chip_rows(n: int = 160, seed: int = 7) -> dict:
    """Columns of chip rows: random footprints over the globe (about 10 % None), datetimes, STAC scalars."""
    fps = list(random_footprints(seed=seed, n=n)) + [DIAGONAL]
    m = len(fps)
    rng = np.random.default_rng(seed)
    keys = [f"chip__s{seed}_{i:04d}" for i in range(m)]
    return {
        "key": keys,
        "source": [f"tar://{k}.png::file:///chips/shard-000000.tar" for k in keys],
        "split": ["chips"] * m,
        "class": [None] * m,
        "lat": [None] * m,
        "lon": [None] * m,
        "geometry": fps,
        "datetime": random_datetimes(seed, m),
        "scene_id": [f"scene-{i % 7}" for i in range(m)],
        "cloud_cover": [None if i % 11 == 0 else float(rng.uniform(0, 100)) for i in range(m)],
        "platform": [PLATFORMS[i % 3] for i in range(m)],
    }


def write_geo_version(url: str, *, model: str = "geo", seed: int = 7, chips: int = 160, plain: int = 40):
    """A version holding one unit of chips and one of benchmark rows (no footprint). Returns (store,
    model_id, {key: vector}, {key: row of columns})."""
    store = EmbeddingStore(url)
    model_id = fake_model_id(model)
    writer = VersionWriter(store, model_id, {"dim": DIM, "dtype": "float32", "config": "synthetic"})
    units = {"chips/shard-000000.tar": chip_rows(chips, seed)}
    if plain:
        units["test/shard-000000.tar"] = image_columns(0, plain)
    vectors, rows = {}, {}
    for u, (uid, cols) in enumerate(units.items()):
        n = len(cols["key"])
        v = unit_vectors(n, DIM, seed + u)
        writer.stage(
            {"id": uid, "bad": []}, {"images": build_table("images", cols, v, dim=DIM, model_id=model_id)}
        )
        for i, key in enumerate(cols["key"]):
            vectors[key] = v[i]
            rows[key] = {c: vals[i] for c, vals in cols.items()}
    writer.commit()
    writer.close()
    return store, model_id, vectors, rows


def write_plain_version(url: str, model: str = "plain", schema: int | None = None):
    """A version of benchmark rows only; `schema=1` writes it as a store from before the geo columns did
    (the manifest then carries no schema, as those manifests do)."""
    store = EmbeddingStore(url)
    model_id = fake_model_id(model)
    info = {"dim": DIM, "dtype": "float32", "config": "synthetic"}
    writer = VersionWriter(store, model_id, {**info, **({"schema": schema} if schema else {})})
    cols = image_columns(1, 30)
    table = build_table("images", cols, unit_vectors(30, DIM, 3), dim=DIM, model_id=model_id, geo=schema != 1)
    writer.stage({"id": "test/shard-000001.tar", "bad": []}, {"images": table})
    writer.commit()
    writer.close()
    if schema == 1:
        path = Path(store.version_path(model_id)) / "_manifest.json"
        doc = json.loads(path.read_text())
        doc["model"].pop("schema")
        path.write_text(json.dumps(doc))
    return store, model_id


# ---------------------------------------------------------------------------------------------- brute force


def in_box(geom, bbox) -> bool:
    return geom is not None and any(geom.intersects(b) for b in boxes_of(bbox))


def distance_km(geom, lon: float, lat: float) -> float:
    """Geodesic distance from the point to the footprint: 0 inside, else the nearest vertex of its rings
    densified to 0.002 degrees (pyproj.Geod), an upper bound within metres of the true distance."""
    if geom.contains(shapely.Point(lon, lat)) or geom.touches(shapely.Point(lon, lat)):
        return 0.0
    xy = shapely.get_coordinates(shapely.segmentize(shapely.boundary(geom), 0.002))
    _, _, metres = GEOD.inv(np.full(len(xy), lon), np.full(len(xy), lat), xy[:, 0], xy[:, 1])
    return float(np.min(metres)) / 1000.0


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)
