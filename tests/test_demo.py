"""The main job end to end: `ssjdn demo` (the `ssjdn-demo` flow) on a real Prefect server, a real local Ray and a
moto S3 store, and what it prints."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from pipelines.report import demo_geo
from pipelines.report import demo_steps as demo
from tests.browser import count_loaded_images
from tests.conftest import REPO, SHARED_DATA

# The geo stage tiles the real scenes whenever they are beside the checkout, whatever the caption data is.
REAL_SCENES = all((SHARED_DATA / "geotiff" / name).is_file() for name in demo_geo.GEO_SCENES)


def test_chance_level_matches_its_definition():
    # 4 images with 2 captions each: t2i R@1 = 1/4; i2t R@1 = P(top caption is one of the image's 2 of 8) = 2/8.
    chance = demo.chance_metrics(4, [0, 0, 1, 1, 2, 2, 3, 3], ks=(1, 5, 10))
    assert chance["t2i_r1"] == pytest.approx(25.0)
    assert chance["i2t_r1"] == pytest.approx(25.0)
    assert chance["i2t_r5"] == pytest.approx(100 * (1 - math.comb(6, 5) / math.comb(8, 5)))
    assert chance["t2i_r10"] == pytest.approx(100.0)  # K beyond the gallery: everything is found


def test_synthetic_fallback_is_labelled(tmp_path):
    chosen = demo.resolve_data("synthetic", tmp_path)
    assert chosen.synthetic and "SYNTHETIC" in chosen.label
    assert (tmp_path / "synthetic-data" / "dataset.json").exists()
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        demo.resolve_data(str(tmp_path / "no-such-dir"), tmp_path)


def test_geo_queries_are_placed_from_the_scene_bboxes():
    scenes = [
        {"name": "a", "bbox": [10.0, 40.0, 12.0, 41.0]},
        {"name": "b", "bbox": [-78.0, 23.0, -76.0, 25.0]},
    ]
    box, near = demo_geo.geo_queries(scenes, radius_km=3.0)
    assert box["kind"] == "bbox" and box["scene"] == "a" and box["bbox"] == (10.0, 40.0, 11.0, 41.0)
    assert near["kind"] == "near" and near["scene"] == "b" and near["near"] == (-77.0, 24.0)
    assert near["radius_km"] == 3.0 and "--radius-km 3" in demo_geo.filter_label(near)
    # Across the antimeridian the western half still starts at the western edge and runs east.
    (box,) = demo_geo.geo_queries([{"name": "x", "bbox": [179.0, 0.0, -179.0, 1.0]}])[:1]
    assert box["bbox"] == (179.0, 0.0, 180.0, 1.0)
    with pytest.raises(ValueError, match="footprint"):
        demo_geo.geo_queries([{"name": "no-place", "bbox": None}])


def test_scenes_real_when_present_else_synthetic_and_labelled(tmp_path, monkeypatch):
    import rasterio

    monkeypatch.delenv(demo_geo.SCENES_ENV, raising=False)
    assert demo_geo.resolve_scenes(None, tmp_path / "auto").synthetic is not REAL_SCENES
    chosen = demo_geo.resolve_scenes("synthetic", tmp_path)
    assert chosen.synthetic and "SYNTHETIC" in chosen.label
    assert [p.rsplit("/", 1)[1] for p in chosen.paths] == list(demo_geo.GEO_SCENES)
    for path in chosen.paths:
        with rasterio.open(path) as src:
            assert src.crs is not None and src.count == 3 and src.width >= 256
    # A folder holding both scenes is used as real data (the choice does not look at the caption dataset).
    real = demo_geo.resolve_scenes(str(tmp_path / "synthetic-scenes"), tmp_path / "other")
    assert not real.synthetic and real.label.startswith("real scenes")
    monkeypatch.setenv(demo_geo.SCENES_ENV, str(tmp_path / "synthetic-scenes"))
    assert demo_geo.resolve_scenes(None, tmp_path / "other") == real
    monkeypatch.setenv(demo_geo.SCENES_ENV, str(tmp_path / "empty"))
    monkeypatch.setattr(demo_geo, "shared_data_dirs", lambda: [tmp_path / "nowhere"])
    assert demo_geo.resolve_scenes(None, tmp_path / "gen").synthetic
    with pytest.raises(FileNotFoundError, match="cogeo.tif"):
        demo_geo.resolve_scenes(str(tmp_path / "empty"), tmp_path)


# What must never reach a user's terminal on a clean run: Ray's, torch's and transformers' own messages (they go to
# the log file whose path the command prints). The pipeline's own lines may say "bad" or "failed" in counts.
# `exception(?!al)`: Prefect names runs with random adjectives, and 'exceptional-hound' is not an exception.
NOISE = re.compile(
    r"traceback|exception(?!al)|error|warn|core_worker|\.cc:\d+|PlacementGroupCleaner|TrainController|LOAD REPORT|"
    r"repeated \d+x|Progress bars|Setting up process group|Reporting training result|Checkpoint successfully",
    re.IGNORECASE,
)


def noise_lines(output: str) -> list[str]:
    """The lines of a command's output that are library noise (the project's own WARNING lines are not)."""
    own = re.compile(r"^\S+ \S+ (INFO|WARNING) (pipelines|ssjdn|flows)[.\w]*: ")
    return [
        line
        for line in output.splitlines()
        if NOISE.search(line) and not own.match(line) and " 0 unit(s) failed" not in line
    ]


def test_noise_filter_catches_what_the_demo_used_to_print():
    seen = [
        "(TrainController pid=1) Requesting resources: {'CPU': 1.0} * 2",
        "[2026-12-02 00:41:58,451 E 20467 20467] core_worker.cc:2465: Actor with class name: 'MapWorker'",
        "(PlacementGroupCleaner pid=2) Exception in thread PlacementGroupCleanerMonitor:",
        "(RayTrainWorker pid=3) Reporting training result 1: TrainingReport(checkpoint=None)",
        "2026-12-02 00:40:21,184 WARNING ray.data: Progress bars disabled",
    ]
    fine = [
        "2026-12-02 00:40:21,184 WARNING pipelines.report.demo_steps: SYNTHETIC DATA (procedurally generated)",
        "(RayTrainWorker pid=3) epoch 1/2: 280 samples in 5.9s (47.4/s), loss 4.6280, val mR 17.22 (best), 0 bad",
        "2026-12-02 00:42:24 INFO prefect.task_runs: embedded 60 images (0 bad sample(s) skipped, 0 unit(s) failed)",
        "2026-12-03 07:52:14,329 INFO prefect.flow_runs: Beginning subflow run 'exceptional-hound' for flow 'reindex'",
    ]
    assert noise_lines("\n".join(seen + fine)) == seen


@pytest.mark.integration
def test_demo_command_end_to_end_on_s3_prints_no_library_noise(
    s3_server, s3_bucket, prefect_server, tmp_path
):
    """`ssjdn demo` as a user runs it (a real process, a real Prefect server, a local Ray, the moto S3 store):
    every output lands, the report's pictures load in Chromium, and the terminal shows the pipeline's own lines
    only - Ray's and transformers' messages are in the log file it names."""
    import fsspec

    out = tmp_path / "out"
    store = f"s3://{s3_bucket}/demo"
    env = {**os.environ, **prefect_server["env"], "SSJDN_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    args = ["--data", "synthetic", "--store", store, "--out", str(out), "--epochs", "2", "--config", "tiny"]
    done = subprocess.run(
        [sys.executable, "-m", "ssjdn_cli.main", "demo", *args, "--set", "model.lsd_cfg.num_classes=0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert not noise_lines(output), "\n".join(noise_lines(output))
    logs = list((tmp_path / "cache" / "logs").glob("ssjdn-demo-*.log"))
    assert logs and str(logs[0]) in output  # where the libraries' messages went is said
    metrics = json.loads((out / "metrics.json").read_text())

    for name in ("metrics.json", "results.md", "training_curve.png", "report.html"):
        assert (out / name).stat().st_size > 0, name
    assert metrics["synthetic"] is True
    assert (
        "SYNTHETIC" in (out / "results.md").read_text() and "SYNTHETIC" in (out / "report.html").read_text()
    )
    test = metrics["test"]
    assert set(test) == {"SSJDN (trained)", "untrained", "chance"}
    n_test = len([1 for _ in demo.load_split_records(metrics["shards"], "test", lambda img: 0)])
    assert test["SSJDN (trained)"]["n_images"] == n_test
    assert test["SSJDN (trained)"]["mr"] > test["chance"]["mr"], test

    # Everything the job wrote went to the object store.
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_server["endpoint_url"]})
    assert fs.exists(f"{metrics['shards']}/_manifest.json".removeprefix("s3://"))
    assert fs.exists(f"{metrics['run']}/metrics.jsonl".removeprefix("s3://"))
    assert fs.exists(f"{metrics['checkpoint']}".removeprefix("s3://"))
    assert fs.exists(f"{metrics['embeddings']}/_manifest.json".removeprefix("s3://"))

    # The geo stage: the real scenes when they are beside the checkout (the captions being synthetic or not),
    # tiled, embedded into the same version; each geo query's GeoJSON holds its hits, which meet its filter.
    page = (out / "report.html").read_text()
    geo = metrics["geo"]
    assert geo["synthetic_scenes"] is not REAL_SCENES
    assert ("SYNTHETIC SCENES" in page) is not REAL_SCENES
    assert geo["chips"] > 0 and geo["chips_embedded"] == geo["chips"]
    assert fs.exists(f"{geo['chips_dest']}/_manifest.json".removeprefix("s3://"))
    assert [q["kind"] for q in geo["queries"]] == ["bbox", "near"]
    for q in geo["queries"]:
        features = check_geojson(q)
        assert len(features) == q["hits"] > 0, q
        for f in features:  # each hit is drawn on its scene's overview in the report
            assert f'data-key="{f["id"]}"' in page, f["id"]
        assert f"href='{os.path.basename(q['geojson'])}'" in page
    assert "id='geo'" in page and page.count("<section class='geo'>") == 2
    maps = page.count('alt="overview of ')
    assert maps >= 2 and "class='missing'" not in page and 'class="missing"' not in page
    text = re.sub(r"data:[^'\"]+", "", page)  # the report's words, without the embedded pictures' bytes
    assert not NOISE.search(text), NOISE.search(text)

    # Every picture in the report loads in a real browser: 4 queries x 5 results, the query image, the curve,
    # then each geo query's hits and the footprint maps (scene overviews).
    total, loaded = count_loaded_images(out / "report.html")
    assert total == 4 * 5 + 1 + 1 + sum(q["hits"] for q in geo["queries"]) + maps
    assert loaded == total


def check_geojson(query: dict) -> list[dict]:
    """The query's GeoJSON file as a FeatureCollection of its hits (ranked, each with a footprint), every footprint
    meeting the query's bbox / lying within its radius (geodesic, in an azimuthal equidistant projection)."""
    import pyproj
    import shapely
    from shapely.geometry import Point, box, shape

    doc = json.loads(open(query["geojson"], encoding="utf-8").read())
    assert doc["type"] == "FeatureCollection"
    features = doc["features"]
    assert [f["properties"]["rank"] for f in features] == list(range(1, len(features) + 1))
    for f in features:
        assert f["type"] == "Feature" and f["geometry"] is not None, f
        geom = shape(f["geometry"])
        if query["kind"] == "bbox":
            assert geom.intersects(box(*query["bbox"])), (f["id"], geom.bounds, query["bbox"])
        else:
            lon, lat = query["near"]
            aeqd = pyproj.Transformer.from_crs(
                "EPSG:4326", f"+proj=aeqd +lat_0={lat} +lon_0={lon} +units=m", always_xy=True
            )
            local = shapely.transform(shapely.segmentize(geom, 0.001), aeqd.transform, interleaved=False)
            assert local.distance(Point(0, 0)) <= query["radius_km"] * 1000 * 1.001, (f["id"], geom.bounds)
    return features
