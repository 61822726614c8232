"""Geo columns in the embedding store: every committed file is GeoParquet (geopandas reads EPSG:4326 and the
stored footprints back), chips and benchmark rows share a version, versions written before the geo columns stay
readable and keep their schema, GDAL's invalid chip footprints are repaired instead of failing a run, and one
end-to-end run tiles a GeoTIFF, embeds its chips (Ray) and finds them by place."""

from __future__ import annotations

import json

import geopandas
import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
from affine import Affine
from rasterio.crs import CRS
from shapely.geometry import shape

from pipelines.embed.sources import chip_fields
from pipelines.geo.geoparquet import GEO_KEY, centroid
from pipelines.search.query import query_store
from pipelines.store.reader import EmbeddingStore
from pipelines.store.schema import SCHEMA_KEY, StoreError, build_table, table_schema
from pipelines.store.writer import VersionWriter
from pipelines.tile.footprint import chip_footprint
from tests.geo_store_data import DIM, chip_rows, in_box, write_geo_version, write_plain_version
from tests.store_data import fake_model_id, image_columns, unit_vectors

# Chips for which GDAL's transform_geom returns a self-intersecting footprint (found by drawing chips as
# tests/geo_support.py does): (lon, lat, width m, centre offset m, rotation degrees) of an aeqd "scene".
INVALID_CHIPS = [
    (
        -179.26855010437157,
        69.10557348986259,
        65640.43994178069,
        (-2963.259819551139, 15634.600724534073),
        21.0289483144966,
    ),
    (
        177.68486016765735,
        67.69980410256522,
        142031.04713621305,
        (27565.224818284547, 38075.097485297054),
        52.02769920026661,
    ),
    (
        -178.68039511816977,
        -4.367184181900882,
        199755.9297486627,
        (-55132.82430595781, 57656.59649191135),
        63.332196404098994,
    ),
    (
        125.88960335272083,
        89.93722094420035,
        100629.37815572775,
        (20906.60001515375, 14108.396265842675),
        1.5741368198974215,
    ),
]


@pytest.fixture(scope="module")
def geo(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("geo-store") / "store")
    store, model_id, vectors, rows = write_geo_version(url, chips=120)
    return {"store": store, "model_id": model_id, "rows": rows}


def test_every_committed_file_reads_in_geopandas_with_the_stored_footprints(geo):
    snapshot = geo["store"].snapshot()
    assert snapshot.geo and geo["store"].manifest().model[SCHEMA_KEY] == 2
    files = snapshot.paths("images")
    assert len(files) == 2  # a unit of chips and one of benchmark rows, in one version
    seen = 0
    for path in files:
        meta = json.loads(pq.read_schema(path).metadata[GEO_KEY])
        assert meta["version"] == "1.1.0" and "covering" in meta["columns"]["geometry"]
        gdf = geopandas.read_parquet(path)
        assert gdf.crs.to_epsg() == 4326 and gdf.geometry.name == "geometry"
        boxes = (
            pq.read_table(path, columns=["bbox"]).column("bbox").to_pylist()
        )  # geopandas drops the covering
        for key, geom, lon, lat, bbox in zip(gdf["key"], gdf.geometry, gdf["lon"], gdf["lat"], boxes):
            row = geo["rows"][key]
            given = row.get("geometry")
            if given is None:
                assert geom is None and bbox is None
                assert (lat, lon) == (row["lat"], row["lon"]) or (np.isnan(lat) and row["lat"] is None)
                continue
            seen += 1
            assert geom.is_valid and shapely.equals_exact(geom, given, tolerance=0)
            assert [bbox[f] for f in ("xmin", "ymin", "xmax", "ymax")] == list(given.bounds)
            assert (lon, lat) == pytest.approx(centroid(given))
        assert set(gdf.columns) >= {"datetime", "scene_id", "cloud_cover", "platform"}
    assert seen > 80


def test_a_version_from_before_the_geo_columns_keeps_its_schema(tmp_path):
    url = str(tmp_path / "old")
    store, model_id = write_plain_version(url, schema=1)
    assert not store.snapshot().geo
    old_schema = table_schema("images", DIM, geo=False)
    writer = VersionWriter(store, model_id, {"dim": DIM, "dtype": "float32", "config": "synthetic"})
    assert not writer.geo
    cols = image_columns(2, 10)
    writer.stage(
        {"id": "test/shard-000002.tar", "bad": []},
        {"images": build_table("images", cols, unit_vectors(10, DIM, 1), dim=DIM, model_id=model_id)},
    )
    chips = chip_rows(5, seed=3)
    table = build_table("images", chips, unit_vectors(len(chips["key"]), DIM, 2), dim=DIM, model_id=model_id)
    with pytest.raises(StoreError, match="written before the geo columns.*geometry"):
        writer.stage({"id": "chips/shard-000000.tar", "bad": []}, {"images": table})
    writer.commit()
    writer.close()
    snapshot = store.snapshot()
    assert SCHEMA_KEY not in store.manifest().model and snapshot.rows("images") == 40
    for path in snapshot.paths("images"):
        schema = pq.read_schema(path)
        assert schema.equals(old_schema) and GEO_KEY not in (schema.metadata or {})
    assert len(snapshot.read_table("images")) == 40


@pytest.mark.parametrize("chip", INVALID_CHIPS, ids=lambda c: f"{c[0]:.1f},{c[1]:.1f}")
def test_invalid_chip_footprints_are_repaired_and_committed(tmp_path, chip):
    lon, lat, width, offset, rotation = chip
    crs = CRS.from_proj4(f"+proj=aeqd +lat_0={lat} +lon_0={lon} +datum=WGS84 +units=m")
    res = width / 256
    t = (
        Affine.translation(*offset)
        @ Affine.rotation(rotation)
        @ Affine(res, 0, -width / 2, 0, -res, width / 2)
    )
    place = chip_footprint(crs, t, 0, 0, 256, 256)
    assert not shape(place["footprint"]).is_valid  # what GDAL gives
    meta = {
        **place,
        "scene_id": "s1",
        "datetime": "2024-05-01T10:00:00Z",
        "properties": {"eo:cloud_cover": 12.5},
    }
    fields = chip_fields(meta, "chip__x")
    fixed = shapely.from_wkb(bytes.fromhex(fields["geometry"]))
    assert fixed.is_valid and fixed.area > 0
    from rasterio.warp import transform

    cx, cy = transform(crs, "EPSG:4326", *[[v] for v in t @ (128, 128)])
    assert fixed.covers(shapely.Point(cx[0], cy[0]))  # the repaired footprint still holds the chip
    assert fields["cloud_cover"] == 12.5 and fields["scene_id"] == "s1"
    store = EmbeddingStore(str(tmp_path / "store"))
    mid = fake_model_id("repair")
    writer = VersionWriter(store, mid, {"dim": DIM, "dtype": "float32"})
    cols = {**image_columns(0, 1), "geometry": [bytes.fromhex(fields["geometry"])], "scene_id": ["s1"]}
    writer.stage(
        {"id": "u", "bad": []},
        {"images": build_table("images", cols, unit_vectors(1, DIM, 0), dim=DIM, model_id=mid)},
    )
    writer.commit()
    assert geopandas.read_parquet(store.snapshot().paths("images")[0]).geometry[0].equals(fixed)


@pytest.mark.integration
def test_tile_embed_and_query_a_geotiff_end_to_end(tmp_path, ray_local):
    """A STAC item over RGB.byte.tif (datetime, eo:cloud_cover, platform), tiled and embedded for real."""
    from pipelines.embed.job import embed_archive
    from pipelines.tile.job import tile_scenes
    from tests.embed_helpers import make_tiny_checkpoint
    from tests.tile_support import GEOTIFF, chips_of, save_catalog, stac_item, texture, write_raster

    scene = GEOTIFF / "RGB.byte.tif"
    if not scene.exists():  # the shared data is absent: a small UTM scene of our own
        scene = write_raster(
            tmp_path / "scene.tif",
            texture(3, 600, 600),
            crs="EPSG:32618",
            transform=Affine(30.0, 0, 101985.0, 0, -30.0, 2826915.0),
        )
    catalog = save_catalog(tmp_path / "stac", [stac_item("landsat", str(scene))])
    chips = tmp_path / "chips"
    tile_scenes(str(catalog), str(chips), workers=1, progress=False)
    docs = {k: c["json"] for k, c in chips_of(chips).items()}
    assert len(docs) >= 4
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.pt", ["a river", "a town near the coast"])
    store_url = str(tmp_path / "store")
    report = embed_archive(str(chips), store_url, str(ckpt), progress=False, concurrency=1)
    assert report.images == len(docs) and not report.failed_units
    snapshot = EmbeddingStore(store_url).snapshot()
    gdf = geopandas.read_parquet(snapshot.paths("images")[0])
    assert gdf.crs.to_epsg() == 4326 and len(gdf) == len(docs)
    for _, row in gdf.iterrows():
        doc = docs[row["key"]]
        assert row.geometry.is_valid and row.geometry.equals(shape(doc["footprint"]))
        assert (row["lon"], row["lat"]) == pytest.approx(centroid(row.geometry))
        assert row["scene_id"] == doc["scene_id"] and row["platform"] == "landsat-7"
        assert row["cloud_cover"] == 12.5 and row["datetime"].isoformat() == "2021-06-01T10:30:00+00:00"
    # the scene's western half, on the day, not too cloudy: exactly the chips whose footprints meet the box
    w, s, e, n = gdf.total_bounds
    box = (w, s, (w + e) / 2, n)
    want = {k for k, d in docs.items() if in_box(shape(d["footprint"]), box)}
    p = shape(docs[sorted(docs)[0]]["footprint"]).representative_point()
    result = query_store(
        store_url,
        image_at=(p.x, p.y),
        k=len(docs),
        bbox=",".join(map(str, box)),
        after="2021-06-01",
        before="2021-06-01",
        where="cloud_cover < 20",
    )
    assert {h.key for h in result.hits} == want and 0 < len(want) < len(docs)
