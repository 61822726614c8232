"""Tiling runs as a whole: the command line, byte-identical re-runs, kill -9 and resume, nightly growth (only new
scenes tiled, changed ones replaced), bad input refused with one line naming the file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.tile.job import tile_scenes
from tests import tile_support as ts
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def tile_cli(source, dest, *extra) -> subprocess.Popen:
    """`python -m pipelines.tile` as a real process (own process group, so a kill takes its workers too)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.tile", str(source), str(dest), "--no-progress", *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def run_cli(source, dest, *extra, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = tile_cli(source, dest, *extra)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_main(capsys, source, dest, *extra) -> subprocess.CompletedProcess:
    """`ssjdn tile ...` through the CLI entry point, in this process (seconds cheaper than a subprocess)."""
    from ssjdn_cli.main import main

    capsys.readouterr()
    rc = main(["tile", str(source), str(dest), "--no-progress", *extra])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["ssjdn", "tile"], rc, out, err)


def shard_digests(dest: Path) -> dict[str, str]:
    m = json.loads((dest / "_manifest.json").read_text())
    return {e["path"]: hashlib.sha256((dest / e["path"]).read_bytes()).hexdigest() for e in m["shards"]}


@pytest.fixture
def textured(tmp_path) -> Path:
    """Eight 512 x 512 textured scenes (32 chips), UTM 33N, different places."""
    from affine import Affine

    folder = tmp_path / "archive"
    for i in range(8):
        ts.write_raster(
            folder / f"scene_{i:02d}.tif",
            ts.texture(3, 512, 512, seed=10 + i),
            crs="EPSG:32633",
            transform=Affine(10, 0, 400000 + 20000 * i, 0, -10, 5_600_000),
        )
    return folder


def test_cli_tiles_and_two_runs_give_identical_shards(tmp_path, monkeypatch):
    folder = ts.copy_shared(["RGB.byte.tif", "cogeo.tif", "world.rgb.tif"], tmp_path / "in")
    a, b = tmp_path / "a", tmp_path / "b"
    done = run_cli(folder, a, "--maxcount", "5", "--workers", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{a}/_manifest.json: " in done.stdout and "chips from 3 scene(s)" in done.stdout
    assert f"committed {a}/_manifest.json" in done.stderr  # the log says where the output went
    import pipelines.shard.job

    monkeypatch.setattr(pipelines.shard.job, "MIN_WORK_FOR_WORKERS_S", 0)  # worker processes write chips too
    tile_scenes(folder, str(b), maxcount=5, workers=2, progress=False)
    da, db = shard_digests(a), shard_digests(b)
    assert da == db and len(da) >= 6
    ma, mb = (json.loads((d / "_manifest.json").read_text()) for d in (a, b))
    assert ma == mb  # same source, same options: the same manifest, byte for byte in its content
    again = tile_scenes(folder, str(a), maxcount=5, progress=False)
    assert again.written == 0 and again.scenes_unchanged == 3 and shard_digests(a) == da


def _records(dest: Path) -> list[Path]:
    return (
        [p for p in (dest / "_stats" / "chips").rglob("*.json")]
        if (dest / "_stats" / "chips").exists()
        else []
    )


def test_killed_run_resumes_to_exactly_the_planned_chips(textured, tmp_path):
    dest = tmp_path / "out"
    proc = tile_cli(textured, dest, "--maxcount", "1", "--workers", "1")
    deadline = time.monotonic() + 120
    try:
        while len(_records(dest)) < 4:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no shard committed in time"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no cleanup, no atexit
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and not (dest / "_manifest.json").exists()
    done_before = len(_records(dest))
    assert done_before < 32

    again = tile_scenes(textured, str(dest), maxcount=1, progress=False)
    assert again.skipped >= done_before and again.written + again.skipped == 32
    planned = {
        f"{s['key']}__r{r}_c{c}" for s in again.manifest["tile"]["scenes"] for r in (0, 256) for c in (0, 256)
    }
    keys = [k for e in again.manifest["shards"] for k in _tar_keys(dest / e["path"])]
    assert sorted(keys) == sorted(planned) and len(keys) == 32  # every planned chip, none twice
    assert set(ts.chips_of(dest)) == planned
    assert not list(dest.rglob("*.partial")) and not (dest / "_tmp").exists()


def _tar_keys(path: Path) -> list[str]:
    import tarfile

    with tarfile.open(path) as tf:
        return [n.split(".", 1)[0] for n in tf.getnames() if n.endswith(".json")]


def test_grown_folder_rerun_tiles_only_the_new_scene_and_replaces_a_changed_one(textured, tmp_path):
    folder = tmp_path / "growing"
    folder.mkdir()
    for name in ("scene_00.tif", "scene_01.tif"):
        shutil.copy2(textured / name, folder / name)
    dest = tmp_path / "out"
    first = tile_scenes(folder, str(dest), progress=False)
    assert first.scenes_tiled == 2 and first.chips == 8
    before = {p: p.stat().st_mtime_ns for p in dest.joinpath("chips").rglob("*.tar")}

    shutil.copy2(textured / "scene_02.tif", folder / "scene_02.tif")  # the nightly delivery
    grown = tile_scenes(folder, str(dest), progress=False)
    assert (grown.scenes_tiled, grown.scenes_unchanged, grown.written) == (1, 2, 1)
    assert grown.chips == 12 and len(grown.manifest["tile"]["scenes"]) == 3
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the old shards were not touched
    new = [s for s in grown.manifest["tile"]["scenes"] if s["name"] == "scene_02"][0]
    assert all(sh not in {str(p.relative_to(dest)) for p in before} for sh in new["shards"])

    shutil.copy2(textured / "scene_05.tif", folder / "scene_01.tif")  # a reprocessed scene: other pixels
    changed = tile_scenes(folder, str(dest), progress=False)
    assert (changed.scenes_tiled, changed.scenes_unchanged, changed.chips) == (1, 2, 12)
    chips = ts.chips_of(dest)
    assert len(chips) == 12  # replaced, not duplicated
    s1 = [s for s in changed.manifest["tile"]["scenes"] if s["name"] == "scene_01"]
    assert len(s1) == 1
    tars = sorted(str(p.relative_to(dest)) for p in dest.joinpath("chips").rglob("*.tar"))
    assert tars == sorted(e["path"] for e in changed.manifest["shards"])  # the old version is gone
    fresh = tmp_path / "fresh"
    tile_scenes(folder, str(fresh), progress=False)
    assert sorted(shard_digests(fresh).values()) == sorted(shard_digests(dest).values())

    (folder / "scene_00.tif").unlink()  # a scene withdrawn from the archive
    shrunk = tile_scenes(folder, str(dest), progress=False)
    assert shrunk.chips == 8 and shrunk.written == 0
    assert not any("scene-00" in str(p) for p in dest.joinpath("chips").rglob("*.tar"))


def test_raster_without_crs_is_refused_by_name_or_tiled_pixel_only(tmp_path, capsys):
    scene = ts.ungeoreferenced_scene(tmp_path / "scan.tif")
    done = run_main(capsys, scene, tmp_path / "out")
    assert done.returncode == 1
    [line] = [x for x in done.stderr.splitlines() if ": error: " in x]
    assert "scan.tif: no CRS; refusing to tile it (pass --allow-ungeoreferenced" in line
    assert "Traceback" not in done.stderr and not (tmp_path / "out" / "_manifest.json").exists()

    done = run_main(capsys, scene, tmp_path / "pixels", "--allow-ungeoreferenced")
    assert done.returncode == 0, done.stderr[-2000:]
    chips = ts.chips_of(tmp_path / "pixels")
    assert len(chips) == 4
    doc = next(iter(chips.values()))["json"]
    assert doc["crs"] is None and doc["footprint"] is None and doc["transform"] is None and doc["gsd"] is None
    assert set(doc["window"]) == {"col_off", "row_off", "width", "height"}


def test_a_band_that_does_not_exist_is_a_one_line_error(tmp_path, capsys):
    folder = ts.copy_shared(["RGB.byte.tif"], tmp_path / "in")
    for bands, words in (
        ("5", "band 5 does not exist (scene has 3 band(s): 1 red, 2 green, 3 blue)"),
        ("nir", "no band named 'nir' (bands: 1 red, 2 green, 3 blue)"),
    ):
        done = run_main(capsys, folder, tmp_path / f"out-{bands}", "--bands", bands)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert words in done.stderr and "RGB.byte.tif" in done.stderr
    done = run_main(capsys, folder, tmp_path / "up", "--gsd", "10")
    assert (
        done.returncode == 1
        and "native GSD 300 m is 30x coarser than --gsd 10 m; refusing to upsample" in done.stderr
    )
    done = run_main(capsys, folder, tmp_path / "x", "--bands", "1,2")
    assert done.returncode == 2 or (done.returncode == 1 and "1 or 3 bands" in done.stderr)


def test_bad_source_and_options_are_one_line_errors(tmp_path, capsys):
    done = run_main(capsys, tmp_path / "nowhere", tmp_path / "out")
    assert done.returncode == 1 and "nowhere: not found" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "empty").mkdir()
    done = run_main(capsys, tmp_path / "empty", tmp_path / "out")
    assert done.returncode == 1 and "no GeoTIFF/COG scenes" in done.stderr
    done = run_main(capsys, tmp_path / "empty", tmp_path / "out", "--scale", "fixed:9")
    assert done.returncode == 1 and "--scale 'fixed:9'" in done.stderr


def test_other_options_at_the_same_destination_need_overwrite(tmp_path, capsys):
    folder = ts.copy_shared(["world.rgb.tif"], tmp_path / "in")
    dest = tmp_path / "out"
    tile_scenes(folder, str(dest), progress=False)
    done = run_main(capsys, folder, dest, "--chip-size", "128")
    assert (
        done.returncode == 1
        and "chip_size=256 (this run: 128)" in done.stderr
        and "--overwrite" in done.stderr
    )
    result = tile_scenes(folder, str(dest), chip_size=128, overwrite=True, progress=False)
    assert result.chips == 8 and all(c["json"]["width"] == 128 for c in ts.chips_of(dest).values())
    assert sorted(str(p.relative_to(dest)) for p in dest.joinpath("chips").rglob("*.tar")) == sorted(
        e["path"] for e in result.manifest["shards"]
    )
