"""STAC catalogs, collections and item collections as SOURCE (built with pystac over the real scenes): item
metadata in every chip, assets chosen by key or band name (eo:bands and STAC 1.1 bands), one file per band,
broken items quarantined, a grown catalog tiling only its new item."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from pipelines.tile.job import tile_scenes
from tests import tile_support as ts

pytestmark = pytest.mark.integration

LANDSAT_BANDS = [("B3", "red"), ("B2", "green"), ("B1", "blue")]


@pytest.fixture
def archive(tmp_path) -> Path:
    if not ts.GEOTIFF.exists():
        pytest.skip("real GeoTIFF data not present at ../shared/data/geotiff")
    folder = tmp_path / "stac"
    (folder / "data").mkdir(parents=True)
    for name in ("RGB.byte.tif", "cogeo.tif", "RGBA.uint16.tif"):
        shutil.copy2(ts.GEOTIFF / name, folder / "data" / name)
    return folder


def _catalog(folder: Path, items, kind="catalog") -> Path:
    import pystac

    path = ts.save_catalog(folder, items, kind=kind)
    cat = pystac.read_file(str(path))
    cat.make_all_asset_hrefs_relative()  # what real catalogs do: assets relative to their item
    cat.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_catalog_items_become_chips_with_their_metadata(archive, tmp_path):
    data = archive / "data"
    items = [
        ts.stac_item("landsat-1", str(data / "RGB.byte.tif"), bands=LANDSAT_BANDS),
        ts.stac_item(
            "aerial-1", str(data / "cogeo.tif"), props={"platform": "aircraft", "eo:cloud_cover": 0}
        ),
    ]
    source = _catalog(archive, items)
    assert "../data/RGB.byte.tif" in (archive / "landsat-1" / "landsat-1.json").read_text()
    dest = tmp_path / "out"
    result = tile_scenes(source, str(dest), progress=False)
    m = result.manifest
    assert m["tile"]["source"]["kind"] == "stac" and [s["id"] for s in m["tile"]["scenes"]] == [
        "aerial-1",
        "landsat-1",
    ]
    chips = ts.chips_of(dest)
    landsat = [c["json"] for c in chips.values() if c["json"]["item_id"] == "landsat-1"]
    assert len(landsat) == 10
    doc = landsat[0]
    assert doc["datetime"] == "2021-06-01T10:30:00Z" and doc["platform"] == "landsat-7"
    assert doc["eo:cloud_cover"] == 12.5 and doc["instruments"] == ["etm+"]
    assert doc["properties"]["platform"] == "landsat-7" and doc["scene_id"] == "landsat-1"
    assert doc["scene_url"] == str(data / "RGB.byte.tif") and doc["bands"][0] == {
        "index": 1,
        "name": "B3",
        "asset": "visual",
    }
    aerial = [c["json"] for c in chips.values() if c["json"]["item_id"] == "aerial-1"]
    assert len(aerial) == 16 and aerial[0]["platform"] == "aircraft" and aerial[0]["eo:cloud_cover"] == 0
    stac = next(s for s in m["tile"]["scenes"] if s["id"] == "landsat-1")["stac"]
    assert stac == {"item": "landsat-1", "collection": None, "datetime": "2021-06-01T10:30:00Z"}


def test_bands_by_stac_name_in_a_collection_with_stac_1_1_bands(archive, tmp_path):
    data = archive / "data"
    items = [ts.stac_item("landsat", str(data / "RGB.byte.tif"), bands=LANDSAT_BANDS, stac11=True)]
    source = _catalog(archive, items, kind="collection")
    by_name = tile_scenes(source, str(tmp_path / "names"), bands="B1,B2,B3", progress=False)
    by_common = tile_scenes(source, str(tmp_path / "common"), bands="blue,green,red", progress=False)
    a, b = ts.chips_of(tmp_path / "names"), ts.chips_of(tmp_path / "common")
    assert sorted(a) == sorted(b) and all(a[k]["image"] == b[k]["image"] for k in a)
    doc = next(iter(a.values()))["json"]
    assert [x["index"] for x in doc["bands"]] == [3, 2, 1] and doc["collection"] == "scenes"
    assert by_name.manifest["tile"]["scenes"][0]["id"] == "scenes/landsat"
    assert by_common.chips == 10


def test_one_file_per_band_assets_are_stacked(archive, tmp_path):
    """A Landsat/Sentinel-style item: one single-band COG per band, picked by common name."""
    import pystac
    import rasterio

    data = archive / "data"
    with rasterio.open(data / "RGB.byte.tif") as src:
        profile = {**src.profile, "count": 1}
        for i, colour in enumerate(("red", "green", "blue"), 1):
            with rasterio.open(data / f"band_{colour}.tif", "w", **profile) as dst:
                dst.write(src.read(i), 1)
    item = ts.stac_item("per-band", str(data / "band_red.tif"), key="red", bands=[("B3", "red")])
    for colour, name in (("green", "B2"), ("blue", "B1")):
        item.add_asset(
            colour,
            pystac.Asset(
                href=str(data / f"band_{colour}.tif"),
                media_type="image/tiff",
                roles=["data"],
                extra_fields={"eo:bands": [{"name": name, "common_name": colour}]},
            ),
        )
    source = _catalog(archive, [item])
    tile_scenes(source, str(tmp_path / "bands"), progress=False)
    tile_scenes(data / "RGB.byte.tif", str(tmp_path / "whole"), progress=False)
    stacked, whole = ts.chips_of(tmp_path / "bands"), ts.chips_of(tmp_path / "whole")
    assert len(stacked) == len(whole) == 10
    for s, w in zip(
        sorted(
            stacked.values(),
            key=lambda c: c["json"]["window"]["row_off"] * 10**4 + c["json"]["window"]["col_off"],
        ),
        sorted(
            whole.values(),
            key=lambda c: c["json"]["window"]["row_off"] * 10**4 + c["json"]["window"]["col_off"],
        ),
    ):
        assert np.array_equal(ts.decode(s["image"]), ts.decode(w["image"]))
        assert [b["asset"] for b in s["json"]["bands"]] == ["red", "green", "blue"]


def test_broken_items_are_quarantined_and_the_rest_committed(archive, tmp_path):
    import pystac

    data = archive / "data"
    (data / "notes.tif").write_text("this is not a GeoTIFF")
    port = _closed_port()
    items = [
        ts.stac_item("good", str(data / "RGB.byte.tif")),
        ts.stac_item("missing", str(data / "never_delivered.tif")),
        ts.stac_item("unreachable", f"http://127.0.0.1:{port}/scenes/x.tif"),
        ts.stac_item("not-a-raster", str(data / "notes.tif")),
        ts.stac_item("only-thumbnail", str(data / "cogeo.tif"), key="thumbnail", media_type="image/png"),
    ]
    items[-1].assets["thumbnail"].roles = ["thumbnail"]
    items[-1].add_asset(
        "meta", pystac.Asset(href="meta.json", media_type="application/json", roles=["metadata"])
    )
    source = _catalog(archive, items)
    dest = tmp_path / "out"
    result = tile_scenes(
        source, str(dest), max_bad_fraction=0.5, retries=1, retry_backoff=0.1, progress=False
    )
    assert result.chips == 10 and result.scenes_bad == 4
    rows = {
        r["scene_id"]: r
        for r in map(json.loads, (dest / "_quarantine/report.jsonl").read_text().splitlines())
    }
    assert set(rows) == {"missing", "unreachable", "not-a-raster", "only-thumbnail"}
    assert all(r["stage"] == "scene" for r in rows.values())
    assert "never_delivered.tif: not found" in rows["missing"]["reason"]
    assert (
        f"127.0.0.1:{port}/scenes/x.tif" in rows["unreachable"]["reason"]
        and "unreachable" in rows["unreachable"]["reason"]
    )
    assert "notes.tif: not a raster GDAL can read" in rows["not-a-raster"]["reason"]
    assert (
        "item only-thumbnail: no raster asset (assets: thumbnail (image/png), meta (application/json))"
        in (rows["only-thumbnail"]["reason"])
    )
    assert result.manifest["bad"]["count"] == 4

    done = tile_scenes(
        source, str(tmp_path / "keyed"), assets=("meta",), max_bad_fraction=1.0, progress=False
    )
    reasons = [
        json.loads(x)["reason"]
        for x in (tmp_path / "keyed/_quarantine/report.jsonl").read_text().splitlines()
    ]
    assert done.chips == 0 and "item good: no asset 'meta' (assets: visual (image/tiff" in reasons[0]
    assert any("asset 'meta' is not a raster (media type application/json)" in r for r in reasons)


def test_grown_catalog_rerun_tiles_only_the_new_item(archive, tmp_path):
    import pystac

    data = archive / "data"
    source = _catalog(archive, [ts.stac_item("a", str(data / "RGB.byte.tif"))])
    dest = tmp_path / "out"
    first = tile_scenes(source, str(dest), progress=False)
    assert first.scenes_tiled == 1

    cat = pystac.read_file(str(source))
    cat.add_item(ts.stac_item("b", str(data / "cogeo.tif")))
    cat.normalize_hrefs(str(archive))
    cat.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    grown = tile_scenes(source, str(dest), progress=False)
    assert (grown.scenes_tiled, grown.scenes_unchanged, grown.written, grown.chips) == (1, 1, 1, 26)

    item = pystac.read_file(str(archive / "a" / "a.json"))
    item.properties["eo:cloud_cover"] = 3.0  # the provider corrected the metadata: the chips' json changes
    item.save_object()
    fixed = tile_scenes(source, str(dest), progress=False)
    assert (fixed.scenes_tiled, fixed.scenes_unchanged, fixed.chips) == (1, 1, 26)
    assert {
        c["json"]["eo:cloud_cover"] for c in ts.chips_of(dest).values() if c["json"]["item_id"] == "a"
    } == {3.0}


def test_item_collection_and_single_item_files(archive, tmp_path):
    import pystac

    data = archive / "data"
    items = [ts.stac_item("x", str(data / "cogeo.tif")), ts.stac_item("y", str(data / "RGBA.uint16.tif"))]
    fc = tmp_path / "search-results.json"
    fc.write_text(json.dumps(pystac.ItemCollection(items).to_dict()))
    result = tile_scenes(fc, str(tmp_path / "fc"), progress=False)
    assert [s["id"] for s in result.manifest["tile"]["scenes"]] == ["x", "y"] and result.chips == 16 + 4
    single = tmp_path / "item.json"
    single.write_text(json.dumps(items[1].to_dict()))
    one = tile_scenes(single, str(tmp_path / "one"), progress=False)
    assert one.chips == 4 and one.manifest["tile"]["scenes"][0]["scaling"]["method"] == "percentile"
