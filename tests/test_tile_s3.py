"""Scenes on a real S3 endpoint (moto server over HTTP on 127.0.0.1): COGs read by range requests through GDAL's
/vsis3/ (bytes counted by a proxy in front of the server), chips written to S3 and read back with the shard
reader, credentials never logged, the endpoint going away mid-run."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import boto3
import pytest

from pipelines.fsio import get_fs
from pipelines.tile.job import tile_scenes
from tests import tile_support as ts
from tests.conftest import REPO, _free_port

pytestmark = pytest.mark.integration

SECRET = "tile-test-s3cr3t-value"


@pytest.fixture
def distinct_secret(s3_server, monkeypatch):
    """A secret that cannot appear in a log line by accident (moto accepts any credentials)."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    return SECRET


def test_cog_on_s3_is_read_by_range_requests_and_tiles_like_the_local_file(
    s3_server, s3_bucket, distinct_secret, tmp_path, caplog
):
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    from pipelines.shard.read import open_split
    from pipelines.tile.chips import SceneChips
    from pipelines.tile.options import TileOptions
    from pipelines.tile.scene import inspect_scene
    from pipelines.tile.sources import list_scenes

    cog = ts.mosaic_cog(tmp_path / "mosaic.tif", 2)  # 2048 x 2048 px, 512 px JPEG tiles, overviews
    size = cog.stat().st_size
    boto3.client("s3", endpoint_url=s3_server["endpoint_url"]).upload_file(
        str(cog), s3_bucket, "scenes/m.tif"
    )
    url = f"s3://{s3_bucket}/scenes/m.tif"
    caplog.set_level(logging.DEBUG)
    with ts.CountingProxy(s3_server["endpoint_url"]) as proxy:
        via_proxy = {"endpoint_url": proxy.url}
        options = TileOptions(storage_options=via_proxy)
        _, _, [ref] = list_scenes(url, via_proxy)
        scene = inspect_scene(ref, options, via_proxy)
        assert scene["chips"] == 64 and scene["url"] == url
        proxy.reset()
        with SceneChips(scene, options, via_proxy) as chips:
            chips.chip_members("k", 1024, 1024)  # one chip in the middle
        one_chip = proxy.bytes
        # header + one 512 px tile + its mask: 7-8% of this small file; benchmarks/bench_tile.py: 8192 px, <5%
        assert 0 < one_chip < 0.1 * size, (one_chip, size)

        proxy.reset()
        dest = f"s3://{s3_bucket}/chips"
        result = tile_scenes(url, dest, storage_options=via_proxy, progress=False)
        assert result.chips == 64
        # the whole scene: each tile fetched about once (plus headers, the overview reads and the listing)
        assert proxy.bytes < 1.3 * size, (proxy.bytes, size)
    text = caplog.text + "\n".join(str(r.args) for r in caplog.records)
    assert SECRET not in text and "AWS_SECRET_ACCESS_KEY" not in text

    back = list(open_split(dest, "chips"))  # the shard reader reads chip shards as they are
    assert len(back) == 64
    with rasterio.open(cog) as src:  # the same pixels as a local read of the same windows
        for s in back[::9]:
            w = s["meta"]["window"]
            want = src.read(window=Window(w["col_off"], w["row_off"], 256, 256))
            assert np.array_equal(ts.decode(s["image"]), np.moveaxis(want, 0, -1))
    assert all(s["meta"]["scene_url"] == url and s["meta"]["crs"] == "EPSG:3857" for s in back)
    fs, root = get_fs(dest)
    fs.invalidate_cache()
    assert not [p for p in fs.find(root) if "/_tmp/" in p or p.endswith(".partial")]
    assert fs.exists(f"{root}/_scenes/{scene['key']}.png")


@pytest.fixture
def own_s3_server(s3_server):
    """A second moto server (same in-process backend as the shared one) that this test may stop and restart."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)]
    servers[0].start()

    def restart():
        servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
        servers[-1].start()

    yield {"endpoint_url": f"http://127.0.0.1:{port}", "stop": lambda: servers[-1].stop(), "restart": restart}
    try:
        servers[-1].stop()
    except Exception:
        pass


def test_endpoint_lost_mid_run_fails_clearly_and_a_rerun_completes(
    s3_server, s3_bucket, own_s3_server, distinct_secret, tmp_path
):
    from affine import Affine

    endpoint = own_s3_server["endpoint_url"]
    s3 = boto3.client("s3", endpoint_url=s3_server["endpoint_url"])
    for i in range(6):
        path = ts.write_raster(
            tmp_path / f"s{i}.tif",
            ts.texture(3, 512, 512, seed=30 + i),
            crs="EPSG:32633",
            transform=Affine(10, 0, 400000 + 20000 * i, 0, -10, 5_600_000),
            tiled=True,
            blockxsize=256,
            blockysize=256,
            compress="deflate",
        )
        s3.upload_file(str(path), s3_bucket, f"archive/s{i}.tif")
    source, dest = f"s3://{s3_bucket}/archive", tmp_path / "out"
    args = ["--maxcount", "1", "--workers", "1", "--retries", "2", "--retry-backoff", "0.2"]
    args += ["--storage-option", f"endpoint_url={endpoint}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.tile", source, str(dest), "--no-progress", *args],
        cwd=REPO,
        env={**os.environ, "AWS_MAX_ATTEMPTS": "1", "GDAL_HTTP_MAX_RETRY": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    records = dest / "_stats" / "chips"
    try:
        deadline = time.monotonic() + 120
        while len(list(records.rglob("*.json")) if records.exists() else []) < 3:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        own_s3_server["stop"]()
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err[-3000:]
    error = [line for line in err.splitlines() if "storage still failing after 2 retries" in line]
    assert error and "reading failed on the network" in error[0] and "Traceback" not in err, err[-3000:]
    assert "retry 1/2" in err and "retry 2/2" in err
    assert SECRET not in err + out
    assert not (dest / "_manifest.json").exists()

    own_s3_server["restart"]()
    again = tile_scenes(
        source, str(dest), maxcount=1, storage_options={"endpoint_url": endpoint}, progress=False
    )
    assert again.skipped >= 3 and again.written + again.skipped == 24 and again.chips == 24
    assert len(ts.chips_of(dest)) == 24
