"""Tiling throughput against a bare rasterio loop, peak memory at 1x vs 16x scene area, and bytes fetched by
range requests from a large COG on S3 (moto server, through a counting proxy). One run, side by side.

    .venv/bin/python -m benchmarks.bench_tile [--side 4096] [--memory-side 2048] [--large 8192] [--repeat 3]

Scenes: COGs built here by tiling the real aerial COG of ../shared/data/geotiff (cogeo.tif, 0.6 m, EPSG:3857)
into larger mosaics (512 px JPEG tiles, internal mask, overviews), since the shared one is too small to show
what windowed reads save.

Throughput: `ssjdn tile` (one process, `--workers 1`: plan, windowed reads + masks, footprints, PNG encoded in
its threads, tar, sha256, commit, manifest, the scene overview) against a bare loop over the same 256 px windows
of the same file that only reads each window with rasterio and encodes the same lossless PNG, in one thread. Best of `--repeat`, runs interleaved, both with
GDAL's block cache capped at the same size (GDAL_CACHE_MB). MB/s counts decoded pixels.
Memory: a fresh `python -m pipelines.tile` per scene (`--memory-side` and `--large`, 16x the area by default),
peak RSS sampled every 20 ms. Flat means memory depends on chip size x workers, not on the scene.
S3: the `--large` COG uploaded to a moto server; GDAL reads it through /vsis3/ via a proxy that counts the body
bytes of every GET: one chip (listing and header included), the whole scene at native GSD, and the whole scene
at 8x coarser GSD (overviews) - each in a fresh process, so no cache is carried from one to the next.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import shutil
import socketserver
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GEOTIFF = REPO.parent / "shared" / "data" / "geotiff"


# ---------------------------------------------------------------------------------------------- helpers


def mosaic_cog(path: Path, n: int, source: Path = GEOTIFF / "cogeo.tif") -> Path:
    """An (n*1024)^2 px COG tiled from the real aerial COG (512 px JPEG tiles, overviews)."""
    import rasterio
    from rasterio.shutil import copy as rio_copy
    from rasterio.windows import Window

    with rasterio.open(source) as src:
        tile, t, crs = src.read(), src.transform, src.crs
    tmp = path.with_suffix(".src.tif")
    size = 1024 * n
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs=crs, transform=t)
    with rasterio.open(tmp, "w", **profile, tiled=True, blockxsize=512, blockysize=512) as dst:
        for i in range(n):
            for j in range(n):
                dst.write(tile, window=Window(j * 1024, i * 1024, 1024, 1024))
    rio_copy(tmp, path, driver="COG", COMPRESS="JPEG", QUALITY=90, BLOCKSIZE=512, OVERVIEWS="AUTO")
    tmp.unlink()
    return path


class CountingProxy:
    """A plain HTTP reverse proxy on 127.0.0.1 in front of `upstream` (an S3 endpoint) that counts the body
    bytes and the GET requests it relays: what a reader really fetched."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.split("://", 1)[1]
        self.bytes = 0
        self.gets = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if self.command == "GET":
                    with proxy.lock:
                        proxy.bytes += len(data)
                        proxy.gets += 1
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

            def log_message(self, *args) -> None:
                pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> CountingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset(self) -> None:
        with self.lock:
            self.bytes = self.gets = 0


def _grid(width: int, height: int, chip: int) -> list[tuple[int, int]]:
    from pipelines.tile.scene import origins

    return [(r, c) for r in origins(height, chip, chip) for c in origins(width, chip, chip)]


# ---------------------------------------------------------------------------------------------- throughput


def bare_loop(scene: Path, chip: int) -> tuple[float, int, int]:
    """(seconds, chips, pixel bytes): read every window with rasterio, encode the same PNG. Nothing else."""
    import io

    import numpy as np
    import rasterio
    from PIL import Image
    from rasterio.windows import Window

    from pipelines.tile.rio import GDAL_CACHE_MB

    t0 = time.perf_counter()
    n = nbytes = 0
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), rasterio.open(scene) as src:
        for r, c in _grid(src.width, src.height, chip):
            data = src.read(window=Window(c, r, chip, chip))
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(np.moveaxis(data, 0, -1)), mode="RGB").save(
                buf, format="PNG"
            )
            n += 1
            nbytes += data.nbytes
    return time.perf_counter() - t0, n, nbytes


def tiled(scene: Path, dest: Path, **options) -> tuple[float, int]:
    from pipelines.tile.job import tile_scenes

    shutil.rmtree(dest, ignore_errors=True)
    t0 = time.perf_counter()
    result = tile_scenes(scene, str(dest), workers=1, progress=False, **options)
    return time.perf_counter() - t0, result.chips


def compare_throughput(scene: Path, scratch: Path, repeat: int, chip: int = 256) -> dict:
    bare, tile = [], []
    for _ in range(repeat):  # interleaved: a burst of load on a shared machine hits both alike
        secs, n_bare, nbytes = bare_loop(scene, chip)
        bare.append(secs)
        secs, n_tile = tiled(scene, scratch / "throughput")
        tile.append(secs)
    b, t = min(bare), min(tile)
    mb = nbytes / 1e6
    print(f"\nthroughput on {scene.name} ({n_bare} chips of {chip} px, best of {repeat}):")
    print(f"{'':28}{'seconds':>9}{'chips/s':>10}{'MB/s':>8}")
    print(f"{'bare rasterio read + PNG':28}{b:9.2f}{n_bare / b:10.1f}{mb / b:8.1f}")
    print(f"{'ssjdn tile':28}{t:9.2f}{n_tile / t:10.1f}{mb / t:8.1f}")
    ratio = (n_tile / t) / (n_bare / b)
    print(f"throughput ratio tile / bare loop: {ratio:.2f}  (goal >= 0.8)")
    return {
        "bare_s": b,
        "tile_s": t,
        "chips": n_tile,
        "chips_per_s": n_tile / t,
        "mb_per_s": mb / t,
        "ratio": ratio,
    }


# ---------------------------------------------------------------------------------------------- memory


def measure_memory(small: Path, large: Path, scratch: Path) -> dict:
    from benchmarks.bench_shard import peak_tree_rss
    from pipelines.tile.rio import GDAL_CACHE_MB

    rows = {}
    for scene in (small, large):
        dest = scratch / f"mem-{scene.stem}"
        shutil.rmtree(dest, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "pipelines.tile",
            str(scene),
            str(dest),
            "--workers",
            "1",
            "--no-progress",
        ]
        tree, parent, _, secs = peak_tree_rss(cmd, scratch / f"mem-{scene.stem}.log")
        chips = json.loads((dest / "_manifest.json").read_text())["totals"]["samples"]
        rows[scene.name] = (tree, secs, chips)
    print(f"\npeak RSS, one process (GDAL block cache capped at {GDAL_CACHE_MB} MB):")
    print(f"{'scene':28}{'pixels':>14}{'chips':>8}{'RSS MB':>9}{'seconds':>9}")
    import rasterio

    for scene in (small, large):
        with rasterio.open(scene) as src:
            px = src.width * src.height
        tree, secs, chips = rows[scene.name]
        print(f"{scene.name:28}{px:14,d}{chips:8d}{tree / 2**20:9.0f}{secs:9.1f}")
    ratio = rows[large.name][0] / rows[small.name][0]
    print(f"peak RSS ratio 16x area / 1x: {ratio:.2f}  (goal: flat, ~1.0)")
    return {
        "rss_small_mb": rows[small.name][0] / 2**20,
        "rss_large_mb": rows[large.name][0] / 2**20,
        "ratio": ratio,
        "gdal_cache_mb": GDAL_CACHE_MB,
    }


# ---------------------------------------------------------------------------------------------- S3


def _one_chip(url: str, endpoint: str) -> None:
    """Child process: open the scene on S3 and read one chip in the middle, cold (what one chip costs)."""
    from pipelines.tile.chips import SceneChips
    from pipelines.tile.options import TileOptions
    from pipelines.tile.scene import inspect_scene
    from pipelines.tile.sources import list_scenes

    so = {"endpoint_url": endpoint}
    options = TileOptions(storage_options=so)
    _, _, [ref] = list_scenes(url, so)
    scene = inspect_scene(ref, options, so)
    mid = scene["height"] // 2 // 256 * 256
    with SceneChips(scene, options, so) as chips:
        chips.chip_members("one", mid, mid)


def measure_s3(large: Path, scratch: Path) -> dict:
    """Bytes the proxy relayed for each read, each in a fresh process (no GDAL cache carried over)."""
    import subprocess

    import boto3

    from benchmarks.local_s3 import local_s3

    size = large.stat().st_size
    out: dict = {"file_mb": size / 1e6}
    with local_s3("bench-tile") as env:
        endpoint = env["AWS_ENDPOINT_URL"]
        boto3.client("s3", endpoint_url=endpoint).upload_file(
            str(large), "bench-tile", f"scenes/{large.name}"
        )
        url = f"s3://bench-tile/scenes/{large.name}"
        with CountingProxy(endpoint) as proxy:
            runs = {
                "one_chip": [sys.executable, "-m", "benchmarks.bench_tile", "--one-chip", url, proxy.url],
                "whole": [
                    sys.executable,
                    "-m",
                    "pipelines.tile",
                    url,
                    str(scratch / "s3-whole"),
                    "--workers",
                    "1",
                ],
                "whole_8x_gsd": [
                    sys.executable,
                    "-m",
                    "pipelines.tile",
                    url,
                    str(scratch / "s3-8x"),
                    "--workers",
                    "1",
                    "--gsd",
                    str(8 * 0.5971640348434448),
                ],
            }
            for label, cmd in runs.items():
                if label != "one_chip":
                    shutil.rmtree(cmd[4], ignore_errors=True)
                    cmd += ["--no-progress", "--storage-option", f"endpoint_url={proxy.url}"]
                proxy.reset()
                t0 = time.perf_counter()
                subprocess.run(cmd, cwd=REPO, check=True, env=env, capture_output=True)
                out[f"{label}_bytes"], out[f"{label}_gets"] = proxy.bytes, proxy.gets
                out[f"{label}_s"] = time.perf_counter() - t0
    print(f"\nrange requests from S3 (moto server + counting proxy), {large.name}: {size / 1e6:.1f} MB file")
    print(f"{'read (each in a fresh process)':40}{'MB fetched':>11}{'GETs':>7}{'vs file':>9}")
    rows = (
        ("list + open + one 256 px chip", "one_chip"),
        ("whole scene, native GSD", "whole"),
        ("whole scene, 8x GSD (overviews)", "whole_8x_gsd"),
    )
    for text, label in rows:
        b = out[f"{label}_bytes"]
        print(f"{text:40}{b / 1e6:11.2f}{out[f'{label}_gets']:7d}{b / size:9.2%}")
    print("goals: one chip < 5% of the file, the whole scene < 1.3x (130%) the file")
    out["one_chip_ratio"] = out["one_chip_bytes"] / size
    out["whole_ratio"] = out["whole_bytes"] / size
    out["whole_8x_gsd_ratio"] = out["whole_8x_gsd_bytes"] / size
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=4096, help="pixels a side of the throughput scene")
    ap.add_argument("--memory-side", type=int, default=2048, help="pixels a side of the 1x memory scene")
    ap.add_argument("--large", type=int, default=8192, help="pixels a side of the large COG (memory, S3)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-s3", action="store_true")
    ap.add_argument("--scratch", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument(
        "--one-chip", nargs=2, metavar=("URL", "ENDPOINT"), help=argparse.SUPPRESS
    )  # child process
    args = ap.parse_args(argv)
    if args.one_chip:
        _one_chip(*args.one_chip)
        return 0
    if not (GEOTIFF / "cogeo.tif").exists():
        print(f"no {GEOTIFF / 'cogeo.tif'}; the benchmark tiles mosaics of it", file=sys.stderr)
        return 2
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="bench-tile-"))
    scratch.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    try:
        t0 = time.perf_counter()
        scenes = {
            side: mosaic_cog(scratch / f"mosaic{side}.tif", side // 1024)
            for side in sorted({args.side, args.memory_side, args.large})
        }
        print(
            "built "
            + ", ".join(f"{p.name} ({p.stat().st_size / 1e6:.1f} MB)" for p in scenes.values())
            + f" in {time.perf_counter() - t0:.1f}s"
        )
        small, large = scenes[args.memory_side], scenes[args.large]
        results["throughput"] = compare_throughput(scenes[args.side], scratch, args.repeat)
        if not args.skip_memory:
            results["memory"] = measure_memory(small, large, scratch)
        if not args.skip_s3:
            results["s3"] = measure_s3(large, scratch)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
