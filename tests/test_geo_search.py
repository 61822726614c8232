"""Geo and time filters in search: a bbox, a --near (also across the antimeridian) and a time window each
return exactly the chips a brute-force shapely / pyproj check over every row selects, in the order of the
unfiltered search restricted to them, through the Searcher (matrix and Parquet scan), `query_store`, the CLI
(`--geojson`, `--image-at`) and the service's POST /search. No model: vector queries."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import shapely

from pipelines.geo.errors import GeoFilterError
from pipelines.geo.filters import GeoFilter
from pipelines.geo.prune import bbox_prune_mask
from pipelines.search.query import query_store
from pipelines.search.searcher import Searcher, SearchError
from pipelines.search.where import FilterError
from ssjdn_cli.main import main
from tests.geo_store_data import (
    DIAGONAL,
    TOUCH_BOX,
    distance_km,
    in_box,
    utc,
    write_geo_version,
    write_plain_version,
)
from tests.serve_support import ThreadServer

QUERY = np.linspace(-1, 1, 16).astype(np.float32)


@pytest.fixture(scope="module")
def geo(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("geo-search") / "store")
    store, model_id, vectors, rows = write_geo_version(url, chips=120)
    return {"url": url, "model_id": model_id, "vectors": vectors, "rows": rows}


@pytest.fixture(scope="module", params=["memory", "scan"])
def searcher(geo, request):
    s = Searcher(geo["url"], load_encoders=False, cache=None if request.param == "memory" else False)
    assert s.status()["tables"]["images"]["exact"] == request.param
    yield s
    s.close()


def unfiltered_order(searcher) -> list[str]:
    n = searcher.snapshot.rows("images")
    return [h.key for h in searcher.search(vector=QUERY, k=n).hits]


def expect(searcher, keep) -> list[str]:
    return [k for k in unfiltered_order(searcher) if keep(k)]


def keys(result) -> list[str]:
    return [h.key for h in result.hits]


def test_bbox_is_decided_by_the_polygon_not_the_bbox(geo, searcher):
    rows = geo["rows"]
    n = len(rows)
    for box in [(-30.0, -60.0, 60.0, 10.0), (170.0, -80.0, -170.0, 80.0), TOUCH_BOX, (-180, 80, 180, 90)]:
        want = expect(searcher, lambda k, b=box: in_box(rows[k].get("geometry"), b))
        got = keys(searcher.search(vector=QUERY, k=n, bbox=box))
        assert got == want, box
    # the diagonal chip's bbox meets TOUCH_BOX (pruning keeps it), its footprint does not (excluded)
    x0, y0, x1, y1 = DIAGONAL.bounds
    assert bbox_prune_mask([x0], [y0], [x1], [y1], GeoFilter(bbox=TOUCH_BOX))[0]
    diagonal = next(k for k, r in rows.items() if r.get("geometry") is DIAGONAL)
    assert diagonal not in keys(searcher.search(vector=QUERY, k=n, bbox=TOUCH_BOX))
    # the antimeridian box found something, on both sides
    across = searcher.search(vector=QUERY, k=n, bbox=(170.0, -80.0, -170.0, 80.0)).hits
    assert {h.lon > 0 for h in across} == {True, False}, "chips on both sides of the antimeridian"


def _radius_clear_of(dists: np.ndarray, around: float) -> float:
    """A radius near `around` with no row within 2 km of it, so a brute force bound cannot flip a row."""
    for r in np.arange(around, around * 2, 7.3):
        if not np.any(np.abs(dists - r) < 2.0):
            return float(r)
    raise AssertionError("no clear radius")


@pytest.mark.parametrize("where", ["antimeridian", "pole", "inside"])
def test_near_equals_geodesic_brute_force(geo, searcher, where):
    rows = geo["rows"]
    chips = [k for k, r in rows.items() if r.get("geometry") is not None]
    if where == "antimeridian":
        centre = next(rows[k]["geometry"] for k in chips if rows[k]["geometry"].geom_type == "MultiPolygon")
        lon, lat = 179.9, centre.representative_point().y
    elif where == "pole":
        lon, lat = 0.0, 89.0
    else:
        p = rows[chips[3]]["geometry"].representative_point()
        lon, lat = p.x, p.y
    dists = np.array([distance_km(rows[k]["geometry"], lon, lat) for k in chips])
    radius = _radius_clear_of(dists, 400.0)
    inside = {k for k, d in zip(chips, dists) if d <= radius}
    got = keys(searcher.search(vector=QUERY, k=len(rows), near=(lon, lat), radius_km=radius))
    assert got == expect(searcher, lambda k: k in inside)
    assert got, "the check must select something"
    if where == "antimeridian":
        found = shapely.union_all([rows[k]["geometry"] for k in got])
        assert found.intersects(shapely.box(179, -90, 180, 90)) and found.intersects(
            shapely.box(-180, -90, -179, 90)
        )


def test_time_window_and_where_combine(geo, searcher):
    rows = geo["rows"]
    n = len(rows)
    lo, hi = utc(2021, 3, 1), utc(2022, 8, 31, 23, 59, 59, 999999)

    def dated(k):
        t = rows[k].get("datetime")
        return t is not None and lo <= t <= hi

    got = keys(searcher.search(vector=QUERY, k=n, after="2021-03-01", before="2022-08-31"))
    assert got == expect(searcher, dated) and got
    cloudy = lambda k: rows[k].get("cloud_cover") is not None and rows[k]["cloud_cover"] < 20  # noqa: E731
    got = keys(searcher.search(vector=QUERY, k=n, after=lo, before=hi, where="cloud_cover < 20"))
    assert got == expect(searcher, lambda k: dated(k) and cloudy(k)) and got
    box = (-180.0, -45.0, 180.0, 45.0)
    got = keys(searcher.search(vector=QUERY, k=5, bbox=box, where="platform = 'landsat-8'", after=lo))
    assert (
        got
        == expect(
            searcher,
            lambda k: (
                in_box(rows[k].get("geometry"), box)
                and rows[k].get("platform") == "landsat-8"
                and rows[k]["datetime"] is not None
                and rows[k]["datetime"] >= lo
            ),
        )[:5]
    )


def test_geo_filters_search_exactly_and_hits_carry_the_stac_scalars(geo, searcher):
    r = searcher.search(vector=QUERY, k=3, bbox=(-180, -90, 180, 90), ann=True)
    assert r.mode == "exact"
    hit = r.hits[0].to_json()
    assert {"datetime", "scene_id", "cloud_cover", "platform"} <= set(hit) and "geometry" not in hit
    json.dumps(hit)


def test_a_geo_filter_on_a_version_without_footprints_is_an_error(tmp_path):
    store, mid = write_plain_version(str(tmp_path / "plain"))
    with Searcher(str(tmp_path / "plain"), load_encoders=False) as s:
        assert s.search(vector=QUERY, k=3).hits
        with pytest.raises(GeoFilterError, match="holds no footprints"):
            s.search(vector=QUERY, bbox=(0, 0, 1, 1))
        with pytest.raises(GeoFilterError, match="holds no datetimes"):
            s.search(vector=QUERY, after="2020-01-01")
    old, _ = write_plain_version(str(tmp_path / "old"), schema=1)
    with Searcher(str(tmp_path / "old"), load_encoders=False) as s:
        assert len(s.search(vector=QUERY, k=50).hits) == 30
        with pytest.raises(GeoFilterError, match="written before"):
            s.search(vector=QUERY, near=(0, 0), radius_km=5)
        with pytest.raises(FilterError, match="cloud_cover"):
            s.search(vector=QUERY, where="cloud_cover < 20")


def test_query_store_geojson_and_image_at(geo, tmp_path, capsys):
    rows = geo["rows"]
    chip = next(
        k for k, r in rows.items() if r.get("geometry") is not None and r["geometry"].geom_type == "Polygon"
    )
    p = rows[chip]["geometry"].representative_point()
    result = query_store(geo["url"], image_at=f"{p.x},{p.y}", k=3)
    assert result.hits[0].key == chip and result.hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert chip in result.query
    out = tmp_path / "hits.geojson"
    box = "-180,-60,180,60"
    assert (
        main(
            [
                "query",
                "--store",
                geo["url"],
                "--image-at",
                f"{p.x},{p.y}",
                f"--bbox={box}",
                "-k",
                "4",
                "--geojson",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    doc = json.loads(out.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(printed["hits"]) == 4
    for f, h in zip(doc["features"], printed["hits"]):
        assert f["id"] == h["key"] and f["properties"]["rank"] == h["rank"]
        assert shapely.geometry.shape(f["geometry"]).equals(rows[h["key"]]["geometry"])
        assert f["properties"]["scene_id"] == rows[h["key"]]["scene_id"]
    with pytest.raises(SearchError, match="no image .* covering"):
        query_store(geo["url"], image_at="0,-89.99999")


def test_post_search_takes_the_geo_body(geo, tmp_path):
    from pipelines.serve.app import create_app

    rows = geo["rows"]
    with Searcher(geo["url"], load_encoders=False, read_only=True, cache_dir=tmp_path / "c") as s:
        app = create_app(s)
        box = [170.0, -80.0, -170.0, 80.0]
        with ThreadServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
            body = {"vector": QUERY.tolist(), "k": 50, "bbox": box, "time": {"after": "2020-06-01"}}
            r = c.post("/search", json=body)
            assert r.status_code == 200, r.text
            want = expect(
                s,
                lambda k: (
                    in_box(rows[k].get("geometry"), tuple(box))
                    and rows[k]["datetime"] is not None
                    and rows[k]["datetime"] >= utc(2020, 6, 1)
                ),
            )
            assert [h["key"] for h in r.json()["hits"]] == want[:50] and want
            r = c.post("/search", json={"vector": QUERY.tolist(), "near": [0, 0], "radius_km": -1})
            assert r.status_code == 422 and r.json()["error"].startswith("radius-km: -1 is negative")
            r = c.post("/search", json={"vector": QUERY.tolist(), "bbox": [1, 2, 3]})
            assert r.status_code == 422 and "4 numbers" in r.json()["error"]
            r = c.get("/search", params={"text": "a", "bbox": "0,0,1"})
            assert r.status_code == 422 and "bbox: expected 4" in r.json()["error"]
            r = c.get("/search", params={"text": "a", "after": "2024-06-01", "before": "2024-05-01"})
            assert r.status_code == 422 and "later than" in r.json()["error"]
