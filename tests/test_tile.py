"""`ssjdn tile` on the real scenes of ../shared/data/geotiff plus generated ones (rotated, antimeridian, polar,
full-disk geostationary, 16-bit, float): footprints, chip json, pixels, quarantine, nodata, scaling, GSD."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipelines.tile.job import tile_scenes
from tests import tile_support as ts

pytestmark = pytest.mark.integration

GENERATED = {
    "rotated.tif": ts.rotated_scene,
    "antimeridian.tif": ts.antimeridian_scene,
    "polar.tif": ts.polar_scene,
    "geostationary.tif": ts.geostationary_scene,
    "uint16.tif": ts.uint16_scene,
    "float.tif": ts.float_scene,
}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict[str, Path]:
    if not ts.GEOTIFF.exists():
        pytest.skip("real GeoTIFF data not present at ../shared/data/geotiff")
    folder = tmp_path_factory.mktemp("scenes")
    out = {name: ts.GEOTIFF / name for name in ts.SHARED_SCENES}
    out.update({name: make(folder / name) for name, make in GENERATED.items()})
    return out


@pytest.fixture(scope="module")
def tiled(scenes, tmp_path_factory):
    """Every shared and generated scene, tiled once (a URL list as SOURCE), with the defaults."""
    root = tmp_path_factory.mktemp("tiled")
    listing = root / "scenes.txt"
    listing.write_text("# every test scene\n" + "\n".join(str(p) for p in scenes.values()) + "\n")
    dest = root / "out"
    result = tile_scenes(listing, str(dest), max_bad_fraction=0.5, workers=1, progress=False)
    return {"dest": dest, "result": result, "manifest": result.manifest, "chips": ts.chips_of(dest)}


def _scene_of(tiled, name: str) -> dict:
    return next(s for s in tiled["manifest"]["tile"]["scenes"] if s["url"].endswith("/" + name))


def _chips_of_scene(tiled, name: str) -> list[dict]:
    key = _scene_of(tiled, name)["key"]
    return [c for c in tiled["chips"].values() if c["json"]["scene_key"] == key]


def test_every_scene_is_accounted_for_and_the_run_commits(tiled, scenes):
    m = tiled["manifest"]
    t = m["tile"]["totals"]
    assert t["scenes"] == len(scenes) and t["scenes_bad"] == 0
    for s in m["tile"]["scenes"]:  # each planned chip is written, skipped as mostly nodata, or bad
        assert s["written"] + s["skipped_nodata"] + s["bad"] == s["chips"], s["url"]
    assert t["chips_written"] == m["totals"]["samples"] == len(tiled["chips"])
    # scenes of seven different CRSs in one run, each chip with its own
    assert {
        c["json"]["crs"].split(":")[0] if c["json"]["epsg"] else "WKT" for c in tiled["chips"].values()
    } == {
        "EPSG",
        "WKT",
    }
    assert {s["epsg"] for s in m["tile"]["scenes"]} >= {32618, 32612, 3857, 4326, 32601, 3413, 32632, 3035}
    for e in m["shards"]:  # one scene per shard, in its folder
        assert e["path"].startswith("chips/") and e["split"] == "chips"


def test_stored_footprints_equal_transform_geom_of_the_densified_window(tiled, scenes):
    import rasterio

    checked = 0
    for name, path in scenes.items():
        chips = _chips_of_scene(tiled, name)
        with rasterio.open(path) as src:
            crs, transform = src.crs, src.transform
        for chip in chips:
            doc = chip["json"]
            want = ts.reference_footprint(crs, transform, doc["window"])
            got = doc["footprint"]
            assert got["type"] == want["type"], (name, doc["key"])
            a, b = ts.flat_coords(got), ts.flat_coords(want)
            assert a.shape == b.shape and a.shape[0] >= 81, (name, doc["key"])
            assert np.abs(a - b).max() < 1e-6, (name, doc["key"])
            checked += 1
    assert checked == len(tiled["chips"]) and checked > 60


def test_utm_footprints_are_really_densified(tiled):
    """A 4-corner footprint of a 77 km UTM chip misses the curved edges: the stored one does not."""
    from rasterio.warp import transform_geom
    from shapely.geometry import Polygon, shape

    doc = _chips_of_scene(tiled, "RGB.byte.tif")[0]["json"]
    x0, y0, x1, y1 = doc["bounds"]
    t = doc["transform"]
    corners = [(t[2] + t[0] * c, t[5] + t[4] * r) for c, r in ((0, 0), (256, 0), (256, 256), (0, 256))]
    four = transform_geom(
        doc["crs"], "EPSG:4326", {"type": "Polygon", "coordinates": [corners + corners[:1]]}
    )
    stored = shape(doc["footprint"])
    assert len(doc["footprint"]["coordinates"][0]) == 81
    assert Polygon(four["coordinates"][0]).hausdorff_distance(stored) > 1e-5  # degrees; > 1 m here
    assert (x0, y0) == pytest.approx((t[2], t[5] + t[4] * 256)) and x1 > x0 and y1 > y0


def test_antimeridian_chip_is_a_valid_multipolygon(tiled):
    from shapely.geometry import shape

    chips = _chips_of_scene(tiled, "antimeridian.tif")
    crossing = [c["json"] for c in chips if c["json"]["footprint"]["type"] == "MultiPolygon"]
    assert crossing, "some chip of the scene crosses 180 degrees"
    for doc in crossing:
        geom = shape(doc["footprint"])
        assert geom.is_valid and len(geom.geoms) == 2
        west, south, east, north = doc["bbox"]
        assert (
            west > 0 > east and -180 <= east and west <= 180
        )  # RFC 7946: west > east across the antimeridian
        assert south < doc["centroid"][1] < north and -180 <= doc["centroid"][0] <= 180
    for c in chips:  # the others are plain polygons on one side
        assert shape(c["json"]["footprint"]).is_valid


def test_polar_and_whole_globe_footprints_stay_valid(tiled):
    from shapely.geometry import shape

    (polar,) = _chips_of_scene(tiled, "polar.tif")
    doc = polar["json"]
    assert shape(doc["footprint"]).is_valid
    assert doc["bbox"][0] == -180 and doc["bbox"][2] == 180 and doc["bbox"][3] == pytest.approx(90)
    assert doc["centroid"][1] > 89.9  # the chip centre is the pole
    world = _chips_of_scene(tiled, "world.rgb.tif")
    assert len(world) == 2
    lons = sorted(c["json"]["bbox"][0] for c in world)
    assert lons == [-180, 0] and all(shape(c["json"]["footprint"]).is_valid for c in world)
    assert all(c["json"]["bbox"][1] == -90 and c["json"]["bbox"][3] == 90 for c in world)


def test_off_globe_chips_are_quarantined_with_the_reason_others_committed(tiled):
    dest = tiled["dest"]
    scene = _scene_of(tiled, "geostationary.tif")
    assert scene["chips"] == 16 and scene["written"] == 4 and scene["bad"] == 12
    rows = [json.loads(line) for line in (dest / "_quarantine" / "report.jsonl").read_text().splitlines()]
    off = [r for r in rows if r["scene_id"] == scene["id"]]
    assert len(off) == 12 and all("footprint cannot be computed" in r["reason"] for r in off)
    assert all(r["reason"].startswith("FootprintError:") and r["window"]["width"] == 256 for r in off)
    for c in _chips_of_scene(tiled, "geostationary.tif"):  # the 4 central chips: on the disk, placed
        lon, lat = c["json"]["centroid"]
        assert abs(lon) < 40 and abs(lat) < 40 and c["json"]["crs"].startswith("PROJCS")


def test_corrupted_tiles_are_quarantined_with_scene_and_window(tiled):
    dest = tiled["dest"]
    scene = _scene_of(tiled, "corrupt.tif")
    assert (scene["chips"], scene["written"], scene["bad"]) == (16, 12, 4)
    rows = [json.loads(line) for line in (dest / "_quarantine" / "report.jsonl").read_text().splitlines()]
    bad = [r for r in rows if r["scene_id"] == scene["id"]]
    assert len(bad) == 4
    for r in bad:
        assert (
            r["reason"].startswith("ChipReadError: RasterioIOError") and "TIFFReadEncodedTile" in r["reason"]
        )
        assert set(r["window"]) == {"col_off", "row_off", "width", "height"} and r["source"].endswith(
            "corrupt.tif"
        )
    assert tiled["manifest"]["bad"]["by_reason"]["ChipReadError"] == 4


def test_an_all_nodata_scene_gives_zero_chips_and_the_run_succeeds(tiled):
    s = _scene_of(tiled, "all-nodata.tif")
    assert s["written"] == 0 and s["skipped_nodata"] == s["chips"] == 10 and s["bad"] == 0
    assert tiled["manifest"]["tile"]["totals"]["scenes_without_chips"] >= 1
    assert (tiled["dest"] / s["overview"]).exists()  # reported, with its (empty) overview, not an error


def test_chip_json_schema(tiled):
    doc = _chips_of_scene(tiled, "RGB.byte.tif")[0]["json"]
    assert {
        "key",
        "scene_id",
        "scene_url",
        "scene_key",
        "crs",
        "epsg",
        "transform",
        "window",
        "bounds",
        "footprint",
        "bbox",
        "centroid",
        "lon",
        "lat",
        "gsd",
        "width",
        "height",
        "format",
        "mode",
        "dtype",
        "bands",
        "scale",
        "nodata_fraction",
        "dataset",
    } <= set(doc)
    assert (
        doc["crs"] == "EPSG:32618"
        and doc["epsg"] == 32618
        and doc["format"] == "PNG"
        and doc["mode"] == "RGB"
    )
    assert set(doc["window"]) == {"col_off", "row_off", "width", "height"} and doc["window"]["width"] == 256
    assert doc["gsd"] == pytest.approx(300.04, abs=0.01)
    assert [b["name"] for b in doc["bands"]] == ["red", "green", "blue"] and doc["scale"] == {
        "method": "none"
    }
    assert 0 <= doc["nodata_fraction"] <= 0.5 and (doc["lon"], doc["lat"]) == tuple(doc["centroid"])
    w, s, e, n = doc["bbox"]
    assert w <= doc["lon"] <= e and s <= doc["lat"] <= n and -80 < w < -75 and 20 < s < 27


def test_chip_pixels_are_the_window_read_by_rasterio(tiled, scenes):
    """Lossless PNG: the stored pixels are exactly the window, nodata pixels (all bands 0) as 0."""
    import rasterio
    from rasterio.windows import Window

    chips = _chips_of_scene(tiled, "RGB.byte.tif")
    with rasterio.open(scenes["RGB.byte.tif"]) as src:
        for chip in chips[:4]:
            w = chip["json"]["window"]
            data = src.read(window=Window(w["col_off"], w["row_off"], 256, 256))
            assert np.array_equal(ts.decode(chip["image"]), np.moveaxis(data, 0, -1)), chip["json"]["key"]


def test_rotated_scene_chips_carry_the_rotated_transform(tiled, scenes):
    import rasterio
    from affine import Affine

    with rasterio.open(scenes["rotated.tif"]) as src:
        st = src.transform
    for chip in _chips_of_scene(tiled, "rotated.tif"):
        doc = chip["json"]
        w = doc["window"]
        t = Affine(*doc["transform"])
        assert t @ (0, 0) == pytest.approx(st @ (w["col_off"], w["row_off"]))
        assert t @ (256, 256) == pytest.approx(st @ (w["col_off"] + 256, w["row_off"] + 256))
        assert abs(t.b) > 1  # rotation terms are there
        corners = [st @ (w["col_off"] + dc, w["row_off"] + dr) for dc in (0, 256) for dr in (0, 256)]
        assert doc["bounds"] == pytest.approx(
            [
                min(p[0] for p in corners),
                min(p[1] for p in corners),
                max(p[0] for p in corners),
                max(p[1] for p in corners),
            ]
        )


def test_16_bit_and_float_scenes_are_scaled_by_per_scene_percentiles(tiled, scenes):
    import rasterio

    s16 = _scene_of(tiled, "uint16.tif")
    sc = s16["scaling"]
    assert sc["method"] == "percentile" and sc["percentiles"] == [2.0, 98.0] and len(sc["low"]) == 3
    with rasterio.open(scenes["uint16.tif"]) as src:  # the survey is the whole (small) scene here
        band = src.read(1)
    valid = band[band != 0]
    assert sc["low"][0] == pytest.approx(np.percentile(valid, 2)) and sc["high"][0] == pytest.approx(
        np.percentile(valid, 98)
    )
    pixels = []
    for chip in _chips_of_scene(tiled, "uint16.tif"):
        assert chip["json"]["scale"] == sc and chip["json"]["dtype"] == "uint16"
        pixels.append(ts.decode(chip["image"]))
        assert pixels[-1].dtype == np.uint8 and pixels[-1].shape == (256, 256, 3)
    assert max(p.max() for p in pixels) == 255 and np.mean([p.mean() for p in pixels]) > 60  # stretched
    sf = _scene_of(tiled, "float.tif")
    assert (
        sf["scaling"]["method"] == "percentile"
        and sf["mask"] == "nodata"
        and math.isfinite(sf["scaling"]["low"][0])
    )
    assert all(ts.decode(c["image"]).ndim == 2 for c in _chips_of_scene(tiled, "float.tif"))  # one band: L


def test_scene_overviews_are_written_beside_the_shards(tiled):
    from PIL import Image

    for s in tiled["manifest"]["tile"]["scenes"]:
        png = tiled["dest"] / s["overview"]
        img = Image.open(png)
        assert max(img.size) <= 512 and img.mode in ("RGBA", "LA")
        rec = json.loads(png.with_suffix(".json").read_text())
        assert rec["id"] == s["id"] and rec["overview"]["width"] == img.size[0]


def test_gsd_reads_come_from_overviews_or_decimated_reads(tmp_path, scenes):
    """--gsd 4x coarser: the COG's overview level 4 serves it; the Landsat scene (no overviews) is decimated by
    GDAL while reading (`out_shape`). The chips equal those very reads."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    folder = ts.copy_shared(["cogeo.tif"], tmp_path / "cog")
    m2 = tile_scenes(folder, str(tmp_path / "out2"), gsd=4 * 0.5971640348434448, progress=False).manifest
    cog = next(s for s in m2["tile"]["scenes"] if s["name"] == "cogeo")
    assert cog["overview_level"] == 4 and cog["chips"] == 1 and cog["gsd"] == pytest.approx(2.389, abs=1e-3)
    (chip,) = [c for c in ts.chips_of(tmp_path / "out2").values() if c["json"]["scene_key"] == cog["key"]]
    with rasterio.open(folder / "cogeo.tif") as src:
        want = src.read(
            window=Window(0, 0, 1024, 1024), out_shape=(3, 256, 256), resampling=Resampling.average
        )
        assert len(src.overviews(1)) == 6
    assert chip["json"]["window"] == {"col_off": 0, "row_off": 0, "width": 1024, "height": 1024}
    assert np.array_equal(ts.decode(chip["image"]), np.moveaxis(want, 0, -1))
    folder = ts.copy_shared(["RGB.byte.tif"], tmp_path / "landsat")
    dest = tmp_path / "out"
    m = tile_scenes(folder, str(dest), gsd=1200.0, max_nodata=1.0, progress=False).manifest
    landsat = m["tile"]["scenes"][0]
    assert landsat["gsd"] == pytest.approx(1200.16, abs=0.1)
    assert landsat["overview_level"] is None and landsat["chips"] == 1  # 1024 source px per chip
    (chip,) = [c for c in ts.chips_of(dest).values() if c["json"]["scene_key"] == landsat["key"]]
    with rasterio.open(folder / "RGB.byte.tif") as src:
        part = src.read(window=Window(0, 0, 791, 718), out_shape=(3, 180, 198), resampling=Resampling.average)
    px = ts.decode(chip["image"])
    valid = (part != 0).any(axis=0)
    assert np.array_equal(px[:180, :198][valid], np.moveaxis(part, 0, -1)[valid]) and not px[180:].any()


def test_bands_by_index_and_name_stride_and_jpeg(tmp_path):
    folder = ts.copy_shared(["RGB.byte.tif"], tmp_path / "in")
    by_index = tile_scenes(folder, str(tmp_path / "a"), bands="3,2,1", progress=False)
    by_name = tile_scenes(folder, str(tmp_path / "b"), bands="blue,green,red", progress=False)
    a, b = ts.chips_of(tmp_path / "a"), ts.chips_of(tmp_path / "b")
    assert sorted(a) == sorted(b) and all(a[k]["image"] == b[k]["image"] for k in a)
    assert [x["index"] for x in next(iter(a.values()))["json"]["bands"]] == [3, 2, 1]
    assert by_index.manifest["options"]["bands"] == [3, 2, 1] and by_name.manifest["options"]["bands"] == [
        "blue",
        "green",
        "red",
    ]
    tile_scenes(folder, str(tmp_path / "a1"), bands="2", progress=False)
    single = ts.chips_of(tmp_path / "a1")
    assert single
    assert all(ts.decode(c["image"]).ndim == 2 and c["json"]["mode"] == "L" for c in single.values())
    overlapped = tile_scenes(
        folder, str(tmp_path / "c"), overlap=128, encoding="jpg", progress=False
    ).manifest
    sc = overlapped["tile"]["scenes"][0]
    assert sc["chips"] == 6 * 5 and overlapped["options"]["stride"] == 128
    chips = ts.chips_of(tmp_path / "c")
    assert all(c["ext"] == "jpg" and c["json"]["format"] == "JPEG" for c in chips.values())
    cols = sorted({c["json"]["window"]["col_off"] for c in chips.values()})
    assert cols[:3] == [0, 128, 256] and cols[-1] == 791 - 256  # the last one flush with the edge


def test_max_nodata_decides_which_chips_are_kept(tmp_path):
    folder = ts.copy_shared(["RGB.byte.tif"], tmp_path / "in")
    strict = tile_scenes(folder, str(tmp_path / "s"), max_nodata=0.0, progress=False).manifest["tile"][
        "scenes"
    ][0]
    loose = tile_scenes(folder, str(tmp_path / "l"), max_nodata=1.0, progress=False).manifest["tile"][
        "scenes"
    ][0]
    assert strict["chips"] == loose["chips"] == 12
    assert (
        loose["written"] == 12
        and strict["written"] < 12
        and strict["skipped_nodata"] == 12 - strict["written"]
    )
    assert all(c["json"]["nodata_fraction"] == 0 for c in ts.chips_of(tmp_path / "s").values())
