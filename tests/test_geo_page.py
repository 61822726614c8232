"""`ssjdn query --html` draws each hit's footprint on its scene's overview (the `_scenes/` PNG the tile job
wrote), offline: a real GeoTIFF tiled here (no Ray), its chips stored with their footprints beside benchmark
rows without any, the page written by the CLI and opened in headless Chromium, which must load the overview
and draw one outline per hit that has a footprint - where the chip's window lies on the overview."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import shapely
from affine import Affine
from shapely.geometry import shape

from pipelines.embed.sources import chip_fields
from pipelines.search.page import fetch_images, fetch_scene_maps, render_page
from pipelines.search.query import query_store
from pipelines.search.results import Hit
from pipelines.shard.layout import member_uri
from pipelines.store.reader import EmbeddingStore
from pipelines.store.schema import build_table
from pipelines.store.writer import VersionWriter
from ssjdn_cli.main import main
from tests.browser import run_page_check
from tests.store_data import fake_model_id, image_columns, unit_vectors
from tests.tile_support import GEOTIFF, chips_of, texture, write_raster

DIM = 16
PLAIN = 6  # benchmark rows without a footprint, in the same version

# Written into the DOM once the page has loaded: images on the page and how many loaded, the overview images
# that decoded at their record's size, footprint paths drawn, and how many of them lie on their overview.
_FOOTPRINT_CHECK = """
<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const ovs = Array.from(document.querySelectorAll('.overview img'));
  const ovOk = ovs.filter(i => i.complete && i.naturalWidth == i.getAttribute('width')).length;
  const paths = Array.from(document.querySelectorAll('.overview svg path.footprint'));
  const inside = paths.filter(p => {
    const vb = p.ownerSVGElement.viewBox.baseVal, b = p.getBBox();
    return b.width > 0 && b.height > 0 && b.x < vb.width && b.y < vb.height && b.x + b.width > 0
      && b.y + b.height > 0;
  }).length;
  const ranks = paths.map(p => p.dataset.rank).join(',');
  const el = document.createElement('pre');
  el.id = 'ssjdn-footprint-check';
  el.textContent = 'CHECK images=' + imgs.length + ' loaded=' + ok + ' overviews=' + ovs.length
    + ' overviews_loaded=' + ovOk + ' footprints=' + paths.length + ' inside=' + inside
    + ' ranks=' + ranks + ' END';
  document.body.appendChild(el);
});
</script>
"""


def render_in_chromium(html_path: Path) -> dict[str, str]:
    """Open the page (plus the check above) in headless Chromium, offline; the check's fields."""
    match = run_page_check(html_path, _FOOTPRINT_CHECK, r"CHECK (.*?) END")
    return dict(kv.split("=", 1) for kv in match.group(1).split(" "))


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """RGB.byte.tif (UTM 18N) tiled into 256 px chips (the local writer, one process), and a store version
    holding its chips (footprints from their json) and PLAIN rows without footprints."""
    from pipelines.tile.job import tile_scenes

    root = tmp_path_factory.mktemp("geo-page")
    src = root / "scenes"
    src.mkdir()
    scene = GEOTIFF / "RGB.byte.tif"
    if scene.exists():
        (src / scene.name).symlink_to(scene)
    else:  # the shared data is absent: a UTM scene of our own
        write_raster(
            src / "scene.tif",
            texture(3, 600, 600),
            crs="EPSG:32618",
            transform=Affine(300.0, 0, 101985.0, 0, -300.0, 2826915.0),
        )
    dest = root / "chips"
    tile_scenes(str(src), str(dest), workers=1, progress=False)
    chips = chips_of(dest)
    assert len(chips) >= 4
    manifest = json.loads((dest / "_manifest.json").read_text())
    shard_of = {}
    for e in manifest["shards"]:
        for key in chips:
            if e["path"].split("/")[-2] == chips[key]["json"]["scene_key"]:
                shard_of[key] = str(dest / e["path"])
    keys = sorted(chips)
    docs = [chips[k]["json"] for k in keys]
    cols = {
        "key": keys,
        "source": [member_uri(shard_of[k], f"{k}.{chips[k]['ext']}") for k in keys],
        "split": ["chips"] * len(keys),
        "class": [None] * len(keys),
        "lat": [None] * len(keys),
        "lon": [None] * len(keys),
        "geometry": [d["footprint"] for d in docs],
        **{c: [chip_fields(d, d["key"])[c] for d in docs] for c in ("scene_id", "cloud_cover", "platform")},
    }
    store_url = str(root / "store")
    model_id = fake_model_id("geo-page")
    writer = VersionWriter(
        EmbeddingStore(store_url), model_id, {"dim": DIM, "dtype": "float32", "config": "synthetic"}
    )
    units = {"chips/shard-000000.tar": cols, "test/shard-000000.tar": image_columns(0, PLAIN)}
    for u, (uid, c) in enumerate(units.items()):
        v = unit_vectors(len(c["key"]), DIM, u)
        table = build_table("images", c, v, dim=DIM, model_id=model_id)
        writer.stage({"id": uid, "bad": []}, {"images": table})
    writer.commit()
    writer.close()
    (scene_json,) = (dest / "_scenes").glob("*.json")
    return {
        "dest": dest,
        "store": store_url,
        "chips": {d["key"]: d for d in docs},
        "record": json.loads(scene_json.read_text()),
        "root": root,
    }


def _outlines(page: str) -> dict[str, np.ndarray]:
    """key -> the (N, 2) overview pixels of its footprint path, parsed from the page's SVG."""
    out = {}
    for key, d in re.findall(r'<path class="footprint" data-rank="\d+" data-key="([^"]+)" d="([^"]+)"', page):
        out[key] = np.array(re.findall(r"(-?[\d.]+),(-?[\d.]+)", d), float)
    return out


def test_html_draws_each_hit_footprint_on_its_scene_overview(tiled, tmp_path):
    chips, record = tiled["chips"], tiled["record"]
    p = shape(next(iter(chips.values()))["footprint"]).representative_point()
    out = tmp_path / "hits.html"
    k = len(chips) + PLAIN
    rc = main(
        ["query", f"--image-at={p.x},{p.y}", "--store", tiled["store"], "-k", str(k), "--html", str(out)]
    )
    assert rc == 0
    page = out.read_text()
    # every row is a hit; the chips (and only they) are outlined, once each, on the one overview
    outlines = _outlines(page)
    assert set(outlines) == set(chips)
    assert page.count("<svg") == 1 and page.count('class="footprint"') == len(chips)
    assert page.count('<figure class="hit">') == k
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    # each outline is the chip's window on the overview: scene pixels / the overview's decimation
    sx, sy = record["width"] / record["overview"]["width"], record["height"] / record["overview"]["height"]
    for key, xy in outlines.items():
        w = chips[key]["window"]
        want = np.array(
            [
                w["col_off"] / sx,
                w["row_off"] / sy,
                (w["col_off"] + w["width"]) / sx,
                (w["row_off"] + w["height"]) / sy,
            ]
        )
        got = np.array([*xy.min(axis=0), *xy.max(axis=0)])
        np.testing.assert_allclose(got, want, atol=1.0)
    # in a real browser: the overview and the chip thumbnails load, one outline per chip hit, all on the image
    check = render_in_chromium(out)
    assert check["images"] == check["loaded"] == str(len(chips) + 1)  # the plain rows' images are absent
    assert check["overviews"] == check["overviews_loaded"] == "1"
    assert check["footprints"] == check["inside"] == str(len(chips))
    ranks = re.findall(r'<path class="footprint" data-rank="(\d+)"', page)
    assert check["ranks"] == ",".join(ranks) and len(set(ranks)) == len(chips)


def test_hits_without_footprints_render_as_before(tiled, tmp_path):
    out = tmp_path / "plain.html"
    p = shape(next(iter(tiled["chips"].values()))["footprint"]).representative_point()
    rc = main(
        [
            "query",
            f"--image-at={p.x},{p.y}",
            "--store",
            tiled["store"],
            "--where",
            "split != 'chips'",
            "-k",
            "3",
            "--html",
            str(out),
        ]
    )
    assert rc == 0
    page = out.read_text()
    assert page.count('<figure class="hit">') == 3
    assert "<svg" not in page and "Footprints" not in page and ".overview" not in page
    # byte for byte the page of the grid alone (what --html wrote before footprint maps)
    result = query_store(tiled["store"], image_at=(p.x, p.y), where="split != 'chips'", k=3)
    images = fetch_images([h.source for h in result.hits])
    info = {"model_id": result.model_id[:12], "mode": result.mode, "k": 3}
    assert page == render_page(f"ssjdn query: {result.query}", result.hits, images, info)


def test_a_scene_without_its_overview_keeps_the_hits_in_the_grid(tiled):
    """A chip whose tile destination lost `_scenes/` (or any source outside one) gets no map outline."""
    key, doc = next(iter(tiled["chips"].items()))
    geom = shapely.to_wkb(shape(doc["footprint"]))
    lost = Hit(
        1,
        0.9,
        key,
        member_uri(f"{tiled['root']}/gone/chips/{doc['scene_key']}/shard-000000.tar", f"{key}.png"),
    )
    lost.geometry = geom
    elsewhere = Hit(2, 0.8, "x", "file:///archive/x.jpg", geometry=geom)
    maps = fetch_scene_maps([lost, elsewhere], {})
    assert len(maps) == 1 and maps[0].error and not maps[0].outlines
    page = render_page("q", [lost, elsewhere], {}, {}, maps)
    assert "overview of" in page and "unavailable" in page and 'class="footprint"' not in page
    assert page.count('<figure class="hit">') == 2


def test_a_footprint_cut_at_the_antimeridian_is_one_outline_on_a_geographic_overview():
    """A scene in lon/lat reaching past 180 E: the two parts of the cut footprint meet on the overview."""
    from pipelines.search.page import footprint_outline, overview_projector

    record = {
        "crs": "EPSG:4326",
        "overview": {"width": 100, "height": 100, "transform": [0.01, 0.0, 179.5, 0.0, -0.01, 10.0]},
    }
    cut = shapely.MultiPolygon([shapely.box(179.8, 9.6, 180.0, 9.8), shapely.box(-180.0, 9.6, -179.8, 9.8)])
    outline = footprint_outline(Hit(1, 1.0, "k", "s"), cut, overview_projector(record))
    xy = np.array(re.findall(r"(-?[\d.]+),(-?[\d.]+)", outline.path), float)
    assert outline.path.count("M") == 2
    np.testing.assert_allclose([*xy.min(axis=0), *xy.max(axis=0)], [30, 20, 70, 40], atol=1e-6)
    assert outline.label_xy == pytest.approx((50, 30))
