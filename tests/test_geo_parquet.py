"""GeoParquet footprint columns and GeoJSON hits: a file written with the geo package's columns and metadata
reads back in geopandas as EPSG:4326 with the same geometries, the DuckDB bbox SQL of docs/store.md selects
what brute force selects on it, and hits become an RFC 7946 FeatureCollection that GDAL reads back."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

import duckdb
import geopandas
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely

from pipelines.geo.errors import GeoError
from pipelines.geo.exact import exact_mask
from pipelines.geo.filters import GeoFilter
from pipelines.geo.geojson import feature_collection, write_geojson
from pipelines.geo.geoparquet import GEO_KEY, footprint_columns, geo_fields, with_geo_metadata
from pipelines.geo.prune import bbox_arrays, bbox_prune_mask
from tests.conftest import REPO
from tests.geo_support import boxes_of, random_footprints

DOC = REPO / "docs" / "store.md"


@pytest.fixture(scope="module")
def footprints():
    fps = list(random_footprints(seed=7, n=120))
    # GeoJSON dicts are accepted as well as shapely geometries
    return [shapely.geometry.mapping(g) if g is not None and i % 3 == 0 else g for i, g in enumerate(fps)]


def shapes(footprints):
    return [
        g if g is None or isinstance(g, shapely.Geometry) else shapely.geometry.shape(g) for g in footprints
    ]


@pytest.fixture(scope="module")
def geo_file(footprints, tmp_path_factory):
    cols = footprint_columns(footprints)
    keys = [f"chip__{i:04d}" for i in range(len(footprints))]
    table = pa.table(
        {"key": keys, "geometry": cols.geometry, "bbox": cols.bbox, "lon": cols.lon, "lat": cols.lat}
    )
    schema = with_geo_metadata(table.schema, cols.geometry_types, cols.extent)
    path = tmp_path_factory.mktemp("geo") / "part-0.parquet"
    pq.write_table(table.cast(schema), path)
    return path, keys, cols


def test_geopandas_reads_crs_and_the_same_valid_geometries(geo_file, footprints):
    path, keys, cols = geo_file
    gdf = geopandas.read_parquet(path)
    assert gdf.crs.to_epsg() == 4326 and gdf.geometry.name == "geometry"
    want = shapes(footprints)
    assert gdf["key"].tolist() == keys
    for got, ref in zip(gdf.geometry, want):
        if ref is None:
            assert got is None
        else:
            assert got.is_valid and shapely.equals_exact(got, ref, tolerance=0)
    assert any(g is None for g in want) and any(g is not None and g.geom_type == "MultiPolygon" for g in want)
    meta = json.loads(pq.read_schema(path).metadata[GEO_KEY])
    column = meta["columns"]["geometry"]
    assert meta["version"] == "1.1.0" and meta["primary_column"] == "geometry" and column["encoding"] == "WKB"
    assert column["covering"] == {"bbox": {f: ["bbox", f] for f in ("xmin", "ymin", "xmax", "ymax")}}
    assert column["geometry_types"] == sorted({g.geom_type for g in want if g is not None})
    present = [g for g in want if g is not None]
    assert column["bbox"] == pytest.approx(
        [min(g.bounds[0] for g in present), min(g.bounds[1] for g in present)]
        + [max(g.bounds[2] for g in present), max(g.bounds[3] for g in present)]
    )


def test_the_covering_prunes_in_geopandas_like_the_geo_package(geo_file):
    path, keys, cols = geo_file
    box = (-20.0, 30.0, 40.0, 70.0)
    got = geopandas.read_parquet(path, bbox=box)["key"].tolist()
    mask = bbox_prune_mask(*bbox_arrays(cols.bbox), GeoFilter(bbox=box))
    assert got == [k for k, m in zip(keys, mask) if m]


def test_bbox_and_centroid_columns(footprints, geo_file):
    _, _, cols = geo_file
    xmin, ymin, xmax, ymax = bbox_arrays(cols.bbox)
    lon, lat = cols.lon.to_numpy(zero_copy_only=False), cols.lat.to_numpy(zero_copy_only=False)
    for i, g in enumerate(shapes(footprints)):
        if g is None:
            assert np.isnan([xmin[i], lon[i]]).all() and not cols.bbox[i].is_valid
            continue
        assert (xmin[i], ymin[i], xmax[i], ymax[i]) == g.bounds
        # The centroid of a chip lies on it, for chips cut at the antimeridian too.
        assert g.intersects(shapely.Point(lon[i], lat[i])), (i, g.bounds, lon[i], lat[i])
    assert pa.schema(geo_fields()).field("bbox").type == cols.bbox.type


def test_centroids_of_a_cut_and_a_polar_footprint():
    cut = shapely.MultiPolygon([shapely.box(179, 0, 180, 2), shapely.box(-180, 0, -179, 2)])
    cap = shapely.Polygon([(-180, 85), (180, 85), (180, 90), (-180, 90)])
    cols = footprint_columns([cut, cap])
    lon, lat = cols.lon.to_pylist(), cols.lat.to_pylist()
    assert abs(abs(lon[0]) - 180) < 1e-9 and lat[0] == pytest.approx(1.0)
    assert lat[1] == pytest.approx(90.0, abs=1e-6)


@pytest.mark.parametrize(
    "bad",
    [
        shapely.Polygon([(0, 0), (2, 2), (2, 0), (0, 2)]),  # a bow tie
        shapely.box(170, 0, 190, 1),  # beyond the antimeridian
        {"type": "Polygon", "coordinates": [[[0, 0], [1]]]},
        "POLYGON ((0 0, 1 0, 1 1, 0 0))",
    ],
)
def test_footprints_that_are_no_lon_lat_geometry_are_refused(bad):
    with pytest.raises(GeoError, match="footprint 1"):
        footprint_columns([shapely.box(0, 0, 1, 1), bad])


def doc_geo_statements() -> list[list[str]]:
    blocks = re.findall(r"```sql geo\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 2, "docs/store.md lost its geo SQL examples"
    return [[s.strip() for s in block.split(";") if s.strip()] for block in blocks]


def test_the_docs_bbox_sql_selects_the_brute_force_answer(geo_file, footprints):
    path, keys, cols = geo_file
    geoms = shapes(footprints)
    con = duckdb.connect()
    con.execute(f"CREATE VIEW images AS SELECT * FROM read_parquet('{path}')")
    crossing = False
    for statements in doc_geo_statements():
        for stmt in statements:
            rows = con.execute(stmt).fetchall()
        box = con.execute(
            "SELECT getvariable('minlon'), getvariable('minlat'), getvariable('maxlon'), getvariable('maxlat')"
        ).fetchone()
        box = tuple(float(v) for v in box)  # DuckDB keeps 170.0 as a DECIMAL
        crossing |= box[0] > box[2]
        got = [r[0] for r in rows]
        by_bbox = [
            k
            for k, g in zip(keys, geoms)
            if g is not None and any(shapely.box(*g.bounds).intersects(b) for b in boxes_of(box))
        ]
        by_polygon = [
            k for k, g in zip(keys, geoms) if g is not None and any(g.intersects(b) for b in boxes_of(box))
        ]
        assert got == by_bbox and set(by_polygon) <= set(got) and by_polygon
        # the doc's Python step: the polygon decides among DuckDB's candidates
        cand = con.execute(
            "SELECT key, geometry FROM images WHERE key IN (SELECT unnest(?)) ORDER BY key", [got]
        )
        cand = cand.fetchall()
        keep = exact_mask([g for _, g in cand], None, GeoFilter(bbox=box))
        assert [k for (k, _), m in zip(cand, keep) if m] == by_polygon
    assert crossing, "the doc lost its antimeridian example"


# ------------------------------------------------------------------------------------------- GeoJSON


def hits():
    fp = shapely.Polygon([(100, 10), (100, 11), (101, 11), (101, 10)])  # clockwise on purpose
    cut = shapely.MultiPolygon([shapely.box(179.5, -1, 180, 1), shapely.box(-180, -1, -179.5, 1)])
    return [
        {
            "key": "a",
            "score": np.float32(0.91),
            "rank": 1,
            "scene_id": "S1",
            "geometry": shapely.to_wkb(fp),
            "datetime": datetime(2024, 5, 1, 10, 30),
            "cloud_cover": 12.5,
            "platform": "sentinel-2a",
        },
        {
            "key": "b",
            "score": 0.5,
            "rank": 2,
            "scene_id": "S2",
            "geometry": cut,
            "datetime": datetime(2024, 5, 2, tzinfo=timezone.utc),
            "cloud_cover": float("nan"),
        },
        {"key": "c", "score": 0.4, "rank": 3, "scene_id": None, "geometry": None, "datetime": None},
    ]


def test_hits_become_an_rfc7946_feature_collection():
    fc = feature_collection(hits())
    assert fc["type"] == "FeatureCollection" and [f["id"] for f in fc["features"]] == ["a", "b", "c"]
    a, b, c = fc["features"]
    ring = a["geometry"]["coordinates"][0]
    assert a["geometry"]["type"] == "Polygon" and all(100 <= x <= 101 and 10 <= y <= 11 for x, y in ring)
    assert shapely.LinearRing(ring).is_ccw  # exterior rings counter-clockwise
    assert a["properties"] == {
        "key": "a",
        "score": pytest.approx(0.91),
        "rank": 1,
        "scene_id": "S1",
        "datetime": "2024-05-01T10:30:00+00:00",
        "cloud_cover": 12.5,
        "platform": "sentinel-2a",
    }
    assert b["geometry"]["type"] == "MultiPolygon" and b["properties"]["cloud_cover"] is None
    assert c["geometry"] is None and c["properties"]["datetime"] is None
    json.dumps(fc, allow_nan=False)


def test_write_geojson_is_atomic_and_gdal_reads_it(tmp_path):
    path = tmp_path / "hits.geojson"
    path.write_text("old")
    assert write_geojson(path, hits()) == path
    assert json.loads(path.read_text()) == json.loads(json.dumps(feature_collection(hits())))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hits.geojson"]  # no temp file left
    gdf = geopandas.read_file(path)
    assert gdf.crs.to_epsg() == 4326 and gdf["key"].tolist() == ["a", "b", "c"]
    assert gdf.geometry.iloc[0].equals(shapely.Polygon([(100, 10), (100, 11), (101, 11), (101, 10)]))
    with pytest.raises(OSError):
        write_geojson(tmp_path / "missing" / "hits.geojson", hits())
