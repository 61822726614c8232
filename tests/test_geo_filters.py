"""The geo package's filters: parsing (a bad-input table), the bbox pruning, the exact polygon / distance /
time decision and the SQL predicate, checked against brute force over random footprints on the whole globe
(antimeridian and poles included)."""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely
from pyproj import Geod

from pipelines.errors import PipelineError
from pipelines.geo.errors import GeoFilterError
from pipelines.geo.exact import DISTANCE_TOLERANCE_KM, exact_mask, footprint_distance_km, time_mask
from pipelines.geo.filters import MAX_RADIUS_KM, GeoFilter, check_columns, parse_geo_filter
from pipelines.geo.geoparquet import footprint_columns
from pipelines.geo.prune import bbox_arrays, bbox_prune_mask, bbox_sql, near_region
from tests.geo_support import boxes_of, random_datetimes, random_footprints

GEOD = Geod(ellps="WGS84")
BRUTE_STEP_DEG = 0.002  # the brute force samples boundaries this finely (<= 0.23 km between samples)
# The brute force overestimates by at most half a sample step; the package is within DISTANCE_TOLERANCE_KM.
TOLERANCE_KM = DISTANCE_TOLERANCE_KM + 0.5 * BRUTE_STEP_DEG * 111.7


# ------------------------------------------------------------------------------------------- parsing

BAD = [
    ({"bbox": "1,2,3"}, "--bbox", "expected 4"),
    ({"bbox": "1,2,3,4,5"}, "--bbox", "expected 4"),
    ({"bbox": "a,2,3,4"}, "--bbox", "not a number"),
    ({"bbox": "0,-91,10,10"}, "--bbox", "outside [-90, 90]"),
    ({"bbox": "0,0,10,95"}, "--bbox", "outside [-90, 90]"),
    ({"bbox": "-181,0,10,10"}, "--bbox", "outside [-180, 180]"),
    ({"bbox": "nan,0,10,10"}, "--bbox", "finite"),
    ({"bbox": "0,0,inf,10"}, "--bbox", "finite"),
    ({"bbox": "0,20,10,10"}, "--bbox", "greater than MAXLAT"),
    ({"near": "10", "radius_km": "5"}, "--near", "expected 2"),
    ({"near": "10,95", "radius_km": "5"}, "--near", "outside [-90, 90]"),
    ({"near": "200,0", "radius_km": "5"}, "--near", "outside [-180, 180]"),
    ({"near": "10,nan", "radius_km": "5"}, "--near", "finite"),
    ({"near": "10,10", "radius_km": "-1"}, "--radius-km", "negative"),
    ({"near": "10,10", "radius_km": "25000"}, "--radius-km", "half Earth's circumference"),
    ({"near": "10,10", "radius_km": "nan"}, "--radius-km", "finite"),
    ({"near": "10,10", "radius_km": "ten"}, "--radius-km", "not a number"),
    ({"near": "10,10"}, "--near", "needs --radius-km"),
    ({"radius_km": "5"}, "--radius-km", "needs --near"),
    ({"after": "2024-13-01"}, "--after", "not an ISO date"),
    ({"before": "yesterday"}, "--before", "not an ISO date"),
    ({"after": "2024-06-01", "before": "2024-05-01"}, "--after", "later than --before"),
]


@pytest.mark.parametrize(("flags", "flag", "reason"), BAD, ids=[f"{b[1]}:{b[2]}" for b in BAD])
def test_bad_flags_are_one_line_errors_naming_the_flag(flags, flag, reason):
    with pytest.raises(GeoFilterError) as err:
        parse_geo_filter(**flags)
    message = str(err.value)
    assert isinstance(err.value, PipelineError) and "\n" not in message
    assert flag in message and reason in message


def test_programmatic_filters_are_checked_like_flags():
    with pytest.raises(GeoFilterError, match="--bbox: MINLAT 95"):
        GeoFilter(bbox=(0, 95, 1, 96))
    with pytest.raises(GeoFilterError, match="--near needs --radius-km"):
        GeoFilter(near=(0, 0))
    with pytest.raises(GeoFilterError, match="later than"):
        GeoFilter(after=datetime(2024, 2, 1), before=datetime(2024, 1, 1))


def test_a_filter_the_table_cannot_answer_is_refused_not_empty():
    cols = ["key", "embedding", "lat", "lon"]
    with pytest.raises(GeoFilterError, match="--bbox and --near: this table has no footprints"):
        check_columns(parse_geo_filter(bbox="0,0,1,1", near="0,0", radius_km="1"), cols)
    with pytest.raises(GeoFilterError, match="--before: this table has no 'datetime'"):
        check_columns(parse_geo_filter(before="2024-01-01"), cols + ["geometry", "bbox"])
    check_columns(
        parse_geo_filter(bbox="0,0,1,1", after="2024-01-01"), cols + ["geometry", "bbox", "datetime"]
    )


def test_good_flags():
    f = parse_geo_filter(bbox=" 170, -10 ,-170,10", near="179.5,0", radius_km="0")
    assert f.bbox == (170.0, -10.0, -170.0, 10.0) and f.spatial and not f.temporal
    assert f.bbox_parts() == [(170.0, -10.0, 180.0, 10.0), (-180.0, -10.0, -170.0, 10.0)]
    assert f.near == (179.5, 0.0) and f.radius_km == 0.0
    assert parse_geo_filter(near="0,0", radius_km=str(MAX_RADIUS_KM)).radius_km == MAX_RADIUS_KM
    t = parse_geo_filter(after="2024-05-01", before="2024-05-31")
    assert t.after == datetime(2024, 5, 1, tzinfo=timezone.utc)
    assert t.before == datetime(2024, 6, 1, tzinfo=timezone.utc) - timedelta(microseconds=1)  # all of May 31
    z = parse_geo_filter(after="2024-05-01T12:00:00Z", before="2024-05-01T14:00:00+02:00")
    assert z.after == z.before  # an offset is converted to UTC
    naive = parse_geo_filter(after="2024-05-01T12:30")
    assert naive.after == datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc)
    assert parse_geo_filter().empty


# ---------------------------------------------------------------------------------- brute force


@pytest.fixture(scope="module")
def rows():
    fps = list(random_footprints(seed=7, n=120)) + polar_caps(np.random.default_rng(3), 8)
    cols = footprint_columns(fps)
    return {
        "footprints": fps,
        "cols": cols,
        "bbox": bbox_arrays(cols.bbox),
        "datetimes": random_datetimes(seed=7, n=len(fps)),
    }


def polar_caps(rng, k: int) -> list:
    """Footprints that hold a pole, closed along the pole's latitude as the tile job writes them."""
    out = []
    for i in range(k):
        sign = 1 if i % 2 else -1
        lons = np.linspace(-180, 180, 73)
        lats = sign * (rng.uniform(80, 88) + 0.5 * np.sin(np.radians(lons) * rng.integers(1, 4)))
        ring = list(zip(lons, lats)) + [(180, sign * 90), (-180, sign * 90)]
        out.append(shapely.Polygon(ring))
    return out


def brute_bbox(fps, bbox) -> np.ndarray:
    return np.array([g is not None and any(g.intersects(b) for b in boxes_of(bbox)) for g in fps])


def _dense_boundary(geom) -> np.ndarray:
    """Every boundary edge sampled at most BRUTE_STEP_DEG apart (longitude steps scaled by cos(lat))."""
    pts = []
    for part in getattr(geom, "geoms", [geom]):
        for ring in [part.exterior, *part.interiors]:
            xy = np.asarray(ring.coords)
            for (x0, y0), (x1, y1) in zip(xy[:-1], xy[1:]):
                c = math.cos(math.radians(min(abs(y0), abs(y1)) if y0 * y1 > 0 else 0.0))
                n = int(math.ceil(math.hypot(y1 - y0, c * (x1 - x0)) / BRUTE_STEP_DEG)) + 1
                pts.append(np.column_stack([np.linspace(x0, x1, n), np.linspace(y0, y1, n)]))
    return np.concatenate(pts)


def brute_distance_km(fps, lon, lat, beyond_km: float = np.inf) -> np.ndarray:
    """Distances from (lon, lat) to every footprint; a footprint whose vertices show it lies further than
    `beyond_km` (no edge point is more than half the edge's length from a vertex) gets that lower bound."""
    out = np.full(len(fps), np.nan)
    for i, g in enumerate(fps):
        if g is None:
            continue
        if g.intersects(shapely.Point(lon, lat)):
            out[i] = 0.0
            continue
        xy = shapely.get_coordinates(g)
        _, _, d = GEOD.inv(np.full(len(xy), lon), np.full(len(xy), lat), xy[:, 0], xy[:, 1])
        _, _, edge = GEOD.inv(xy[:-1, 0], xy[:-1, 1], xy[1:, 0], xy[1:, 1])
        lower = (np.minimum(d[:-1], d[1:]) - np.maximum(edge, _along_parallel_km(xy)) / 2).min() / 1000
        if lower > beyond_km:
            out[i] = lower
            continue
        b = _dense_boundary(g)
        _, _, d = GEOD.inv(np.full(len(b), lon), np.full(len(b), lat), b[:, 0], b[:, 1])
        out[i] = np.min(d) / 1000
    return out


def _along_parallel_km(xy: np.ndarray) -> np.ndarray:
    """A bound of each lon/lat edge's length in metres (a geodesic between its ends can be much shorter)."""
    y0, y1 = xy[:-1, 1], xy[1:, 1]
    lat = np.where(y0 * y1 > 0, np.minimum(abs(y0), abs(y1)), 0.0)  # an edge across the equator reaches it
    return 6400e3 * np.radians(np.hypot(np.diff(xy[:, 1]), np.cos(np.radians(lat)) * np.diff(xy[:, 0])))


BBOXES = [
    (-20.0, 30.0, 40.0, 70.0),  # ordinary
    (170.0, -60.0, -170.0, 60.0),  # across the antimeridian
    (179.0, -90.0, -179.0, 90.0),  # a thin band across it, pole to pole
    (-180.0, 80.0, 180.0, 90.0),  # around the north pole
    (-100.0, -90.0, 100.0, -84.0),  # near the south pole
    (180.0, -70.0, 180.0, 70.0),  # zero width, on the antimeridian
]


@pytest.mark.parametrize("bbox", BBOXES, ids=lambda b: ",".join(f"{v:g}" for v in b))
def test_bbox_prune_then_polygon_equals_brute_force(rows, bbox):
    f = GeoFilter(bbox=bbox)
    prune = bbox_prune_mask(*rows["bbox"], f)
    got = prune & exact_mask(rows["cols"].geometry, None, f, within=prune)
    want = brute_bbox(rows["footprints"], bbox)
    assert np.array_equal(got, want)
    assert np.array_equal(exact_mask(rows["cols"].geometry, None, f), want)  # pruning drops no hit
    assert not prune[np.array([g is None for g in rows["footprints"]])].any()
    assert want.any() and prune.sum() < len(prune)  # a query that selects, and a pruning that prunes


def test_the_polygon_decides_not_the_bbox():
    # An L-shaped footprint: its bbox covers the query box, the polygon does not.
    ell = shapely.Polygon([(0, 0), (10, 0), (10, 1), (1, 1), (1, 10), (0, 10)])
    cols = footprint_columns([ell])
    f = GeoFilter(bbox=(5, 5, 8, 8))
    assert bbox_prune_mask(*bbox_arrays(cols.bbox), f).tolist() == [True]
    assert exact_mask(cols.geometry, None, f).tolist() == [False]


NEARS = [
    (179.9, 0.3, 400.0),  # on the antimeridian
    (-179.7, -50.0, 900.0),  # across it at high southern latitude
    (10.0, 89.7, 300.0),  # near the north pole
    (0.0, -90.0, 700.0),  # on the south pole
    (25.0, 40.0, 2500.0),
    (-60.0, 10.0, 6000.0),  # a sixth of the globe
]


@pytest.mark.parametrize(("lon", "lat", "radius"), NEARS, ids=lambda v: f"{v:g}")
def test_near_prune_then_distance_equals_brute_force(rows, lon, lat, radius):
    f = GeoFilter(near=(lon, lat), radius_km=radius)
    fps = rows["footprints"]
    brute = brute_distance_km(fps, lon, lat, beyond_km=radius + 10 * TOLERANCE_KM)
    exact = brute <= radius + 10 * TOLERANCE_KM  # the rows whose distance the brute force measured
    mine = footprint_distance_km(rows["cols"].geometry, lon, lat)
    present = ~np.isnan(brute)
    assert np.array_equal(present, ~np.isnan(mine))
    assert np.all(np.abs(mine[exact] - brute[exact]) <= TOLERANCE_KM)
    assert np.all(mine[present & ~exact] >= brute[present & ~exact] - TOLERANCE_KM)
    prune = bbox_prune_mask(*rows["bbox"], f)
    got = exact_mask(rows["cols"].geometry, None, f, within=prune)
    want = present & (np.nan_to_num(brute, nan=np.inf) <= radius)
    assert prune[want].all()  # the box around the point is never too small
    clear = np.abs(np.nan_to_num(brute, nan=np.inf) - radius) > TOLERANCE_KM  # outside the tolerance band
    assert np.array_equal(got[clear], want[clear])
    assert want.any() and not want[present].all()  # a query that selects some rows, not all


def test_near_region_holds_every_point_within_the_radius():
    rng = np.random.default_rng(0)
    for lon, lat, r in [(179.99, 10, 500), (-180, -70, 2000), (30, 89.9, 50), (0, 0, 10000), (45, 60, 0.5)]:
        region = near_region(lon, lat, r)
        az = rng.uniform(-180, 180, 2000)
        dist = rng.uniform(0, 1, 2000) ** 0.5 * r * 1000
        plon, plat, _ = GEOD.fwd(np.full(2000, lon), np.full(2000, lat), az, dist)
        f = GeoFilter(near=(lon, lat), radius_km=r)
        assert bbox_prune_mask(plon, plat, plon, plat, f).all(), region  # each point as a zero-size bbox


def test_distance_is_zero_inside_and_exact_for_a_parallel():
    sq = shapely.box(10, 10, 11, 11)
    d = footprint_distance_km([shapely.to_wkb(sq), None, shapely.geometry.mapping(sq)], 10.5, 10.5)
    assert d[0] == 0 and np.isnan(d[1]) and d[2] == 0
    # Due north of the box: the nearest point is on its top edge, straight south along the meridian.
    _, _, metres = GEOD.inv(10.5, 12.0, 10.5, 11.0)
    assert footprint_distance_km([sq], 10.5, 12.0)[0] == pytest.approx(metres / 1000, abs=1e-3)


def test_time_window_equals_brute_force(rows):
    times = rows["datetimes"]
    for after, before in [("2021-03-01", "2022-08-31"), (None, "2020-06-30T12:00:00"), ("2024-01-01", None)]:
        f = parse_geo_filter(after=after, before=before)
        lo = f.after or datetime.min.replace(tzinfo=timezone.utc)
        hi = f.before or datetime.max.replace(tzinfo=timezone.utc)
        want = np.array([t is not None and lo <= t <= hi for t in times])
        assert np.array_equal(time_mask(times, f), want)
        arrow = pa.array(times, pa.timestamp("us", tz="UTC"))
        assert np.array_equal(time_mask(arrow, f), want)
        naive = pa.array([None if t is None else t.replace(tzinfo=None) for t in times], pa.timestamp("ms"))
        assert np.array_equal(time_mask(naive, f), want)  # naive = UTC; any unit
        assert want.any() and not want.all()


def test_combined_filter_is_the_and_of_its_parts(rows):
    f = parse_geo_filter(bbox="150,-80,-150,80", near="175,0", radius_km="3000", after="2021-01-01")
    geoms, times = rows["cols"].geometry, rows["datetimes"]
    prune = bbox_prune_mask(*rows["bbox"], f)
    got = exact_mask(geoms, times, f, within=prune)
    parts = [
        exact_mask(geoms, None, GeoFilter(bbox=f.bbox)),
        exact_mask(geoms, None, GeoFilter(near=f.near, radius_km=f.radius_km)),
        time_mask(times, GeoFilter(after=f.after)),
    ]
    assert np.array_equal(got, parts[0] & parts[1] & parts[2])
    with pytest.raises(GeoFilterError, match="no datetime"):
        exact_mask(geoms, None, f)


# ------------------------------------------------------------------------------------------- SQL


@pytest.mark.parametrize(
    "filt",
    [GeoFilter(bbox=b) for b in BBOXES] + [GeoFilter(near=(x, y), radius_km=r) for x, y, r in NEARS[:4]],
    ids=lambda f: str(f.bbox or f.near),
)
def test_bbox_sql_selects_what_the_mask_selects_in_duckdb(rows, tmp_path, filt):
    path = tmp_path / "rows.parquet"
    keys = [f"k{i:04d}" for i in range(len(rows["footprints"]))]
    pq.write_table(pa.table({"key": keys, "bbox": rows["cols"].bbox}), path)
    sql, params = bbox_sql(filt)
    assert not re.search(r"\d", sql) and sql.count("?") == len(params)  # values only as parameters
    con = duckdb.connect()
    got = con.execute(f"SELECT key FROM read_parquet(?) WHERE {sql} ORDER BY key", [str(path), *params])
    want = [keys[i] for i in np.flatnonzero(bbox_prune_mask(*rows["bbox"], filt))]
    assert [r[0] for r in got.fetchall()] == want


def test_bbox_sql_without_a_spatial_part_and_refuses_odd_columns():
    assert bbox_sql(GeoFilter(after=datetime(2024, 1, 1))) == ("TRUE", [])
    with pytest.raises(ValueError):
        bbox_sql(GeoFilter(bbox=(0, 0, 1, 1)), column='bbox"; DROP TABLE x; --')
