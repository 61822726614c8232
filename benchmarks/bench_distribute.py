"""Ray tasks against the local process pool: the same shard and tile jobs, the same cores, one run side by side.

    .venv/bin/python -m benchmarks.bench_distribute [--scale 50] [--side 4096] [--workers 2] [--repeat 3]

Sharding: UCM-Captions (../shared/data/ucm-captions) listed `--scale` times under new names (symlinks, as
`bench_shard --scale` builds it), `--maxcount 1000`. Tiling: the throughput scene of `bench_tile` (a `--side`
px COG mosaic of the real aerial COG), `--maxcount 32` so that one scene makes several jobs.
Local pool: `workers` writers (this process + worker processes). Ray: a local Ray started here with `workers`
CPUs, the jobs as Ray tasks (`ray=auto`), this process only drives. Best of `--repeat` runs each, interleaved,
each into an empty destination. Start-up: `ray.init` plus the first round of task workers, paid once per
run of a command; the ratio is given without it (the distributor's overhead, goal
>= 0.8) and with it (a single command on a cold cluster).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_shard import DEFAULT_DATA, make_repeated_dataset
from benchmarks.bench_tile import GEOTIFF, mosaic_cog


def start_ray(workers: int) -> float:
    """Seconds until a local Ray runs tasks: `ray.init` and the first `workers` task workers."""
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    warm = ray.remote(num_cpus=1)(_noop)
    ray.get([warm.remote(i) for i in range(workers)])
    return time.perf_counter() - t0


def _noop(i: int) -> int:
    time.sleep(0.2)  # hold the worker, so that each call gets a worker of its own
    return i


def timed(run, dest: Path) -> tuple[float, int, float]:
    shutil.rmtree(dest, ignore_errors=True)
    t0 = time.perf_counter()
    samples, mb = run(str(dest))
    return time.perf_counter() - t0, samples, mb


def compare(name: str, local, ray_run, scratch: Path, repeat: int, startup: float, unit: str) -> dict:
    secs = {"local": [], "ray": []}
    n = mb = 0
    for _ in range(repeat):  # interleaved: a burst of load on a shared machine hits both alike
        for mode, fn in (("local", local), ("ray", ray_run)):
            s, n, mb = timed(fn, scratch / f"{name.split()[0]}-{mode}")
            secs[mode].append(s)
    lo, ra = min(secs["local"]), min(secs["ray"])
    ratio, with_start = lo / ra, lo / (ra + startup)
    print(f"\n{name}: {n} {unit}s, best of {repeat}")
    print(f"{'':26}{'seconds':>9}{unit + 's/s':>11}{'MB/s':>8}")
    print(f"{'local pool':26}{lo:9.2f}{n / lo:11.1f}{mb / lo:8.1f}")
    print(f"{'Ray tasks':26}{ra:9.2f}{n / ra:11.1f}{mb / ra:8.1f}")
    print(
        f"{'Ray tasks + start-up':26}{ra + startup:9.2f}{n / (ra + startup):11.1f}{mb / (ra + startup):8.1f}"
    )
    print(
        f"throughput ratio Ray / local: {ratio:.2f} without start-up (goal >= 0.8), {with_start:.2f} with it"
    )
    return {
        unit + "s": n,
        "local_s": lo,
        "ray_s": ra,
        "all_local_s": secs["local"],
        "all_ray_s": secs["ray"],
        "ratio": ratio,
        "ratio_with_startup": with_start,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--scale", type=int, default=50, help="the dataset listed this many times (default 50)")
    ap.add_argument("--side", type=int, default=4096, help="pixels a side of the tiling scene")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scratch", type=Path, default=None)
    args = ap.parse_args(argv)
    if not (args.data / "dataset.json").exists() or not (GEOTIFF / "cogeo.tif").exists():
        print(f"needs {args.data}/dataset.json and {GEOTIFF}/cogeo.tif", file=sys.stderr)
        return 2
    import ray

    from pipelines.shard.job import shard_dataset
    from pipelines.tile.job import tile_scenes

    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="bench-distribute-"))
    scratch.mkdir(parents=True, exist_ok=True)
    w = args.workers
    results: dict = {"workers": w, "scale": args.scale, "side": args.side, "repeat": args.repeat}
    try:
        data = make_repeated_dataset(args.data, scratch / f"ucm{args.scale}x", args.scale)
        scene = mosaic_cog(scratch / f"mosaic{args.side}.tif", args.side // 1024)
        startup = start_ray(w)
        results["startup_s"] = startup
        print(f"Ray start-up (ray.init + {w} task workers): {startup:.2f}s")

        def shard(ray_address):
            def run(dest: str):
                r = shard_dataset(
                    data, dest, workers=w, follow_symlinks=True, progress=False, ray=ray_address
                )
                return r.samples, sum(s["bytes"] for s in r.manifest["shards"]) / 1e6

            return run

        def tile(ray_address):
            def run(dest: str):
                r = tile_scenes(scene, dest, workers=w, maxcount=32, progress=False, ray=ray_address)
                return r.chips, sum(s["bytes"] for s in r.manifest["shards"]) / 1e6

            return run

        results["shard"] = compare(
            f"shard UCM x{args.scale}", shard(None), shard("auto"), scratch, args.repeat, startup, "sample"
        )
        results["tile"] = compare(
            f"tile {args.side} px COG", tile(None), tile("auto"), scratch, args.repeat, startup, "chip"
        )
    finally:
        ray.shutdown()
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
