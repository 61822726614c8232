"""Sharding throughput against `tar -cf` of the same files on the same disk, and peak memory at 1x vs 10x samples.

    .venv/bin/python -m benchmarks.bench_shard [--data ../shared/data/ucm-captions] [--workers 2] [--repeat 3]

Throughput: both read the same image files and write to the same scratch folder, first with the files in the
page cache (warm: what costs CPU), then with the dataset evicted from the page cache before every command
(cold: what a first pass over an archive on local disk costs; `posix_fadvise(DONTNEED)`, no privileges). `tar` only
copies bytes; `ssjdn shard` also reads the dataset description, validates every image, writes json/txt/cls
members, hashes every byte and commits each shard by rename. Both validation levels are measured in the same
run: `structure` (the default: header + the file is complete, no pixel decoding) and `full` (decode every
image). Best of `--repeat` runs each, runs of the different commands interleaved so that a burst of load on a
shared machine hits all of them alike. The floors below say what parts cost on their own, in one process.
The comparison runs on the dataset as it is (UCM: 33 kB JPEGs, where per-sample Python work dominates; warm and
cold) and on `--tiles` generated 1024 px uncompressed RGB TIFF tiles (3 MB each, archive-like, where the bytes do).
Memory: a fresh process shards N and 10N samples (`--scale 10 50` for more sizes; the UCM images listed again
under new names, via symlinks), with one writer and with `--workers`; peak RSS of the parent and of the whole
process tree (parent + writer processes) is sampled every 20 ms.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ucm-captions"


def _image_files(data: Path) -> list[Path]:
    from ssjdn.data.readers import load_dataset

    return [Path(s.source) for s in load_dataset(data).samples]


def _warm(files: list[Path]) -> int:
    return sum(len(p.read_bytes()) for p in files)


def _evict(data: Path) -> None:
    """Drop every file of the dataset (images and description) from the page cache, so the next command reads
    them from the disk: `posix_fadvise(DONTNEED)` needs no privileges and leaves other files cached."""
    for path in data.resolve().rglob("*"):
        path = path.resolve()  # the repeated dataset's symlinks: evict their targets
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class Clock:
    """Wall seconds and CPU seconds (user + system, this process and its finished children) of a block.

    On a shared, loaded machine wall time swings with other people's jobs; CPU time much less so."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), _cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, _cpu_seconds() - self.cpu


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_tar(files: list[Path], scratch: Path) -> Clock:
    image_root = files[0].parent
    names = scratch / "names.txt"
    names.write_text("\n".join(str(p.relative_to(image_root)) for p in files) + "\n")
    out = scratch / "ref.tar"
    with Clock() as clock:
        subprocess.run(["tar", "-cf", str(out), "-C", str(image_root), "-T", str(names)], check=True)
    out.unlink()
    return clock


class _WorkerStarts(logging.Handler):
    """Counts the worker processes `pipelines.shard` starts (it starts them only when the work outlasts them)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.started = 0

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("started %d worker process"):
            self.started += record.args[0]


def time_shard(data: Path, scratch: Path, workers: int, validate: str) -> tuple[Clock, dict, int]:
    from pipelines.shard.job import shard_dataset

    dest = scratch / f"shards-{validate}"
    logger, starts = logging.getLogger("pipelines.shard"), _WorkerStarts()
    level, logger.level = logger.level, logging.DEBUG
    logger.addHandler(starts)
    try:
        with (
            Clock() as clock
        ):  # worker processes (if any) have exited when shard_dataset returns: CPU counted
            result = shard_dataset(data, str(dest), workers=workers, validation=validate, progress=False)
    finally:
        logger.removeHandler(starts)
        logger.setLevel(level)
    shutil.rmtree(dest)
    return clock, result.manifest, starts.started


def time_plan(data: Path, scratch: Path) -> Clock:
    """Reading the dataset description and planning the shards (stat every file; no image is read)."""
    from pipelines.shard.plan import plan_shards

    with Clock() as clock:
        plan_shards(data, str(scratch / "plan-only"))
    return clock


def time_validation_only(files: list[Path], level: str) -> Clock:
    """Validating every (already read) image once in one process: what that level costs by itself."""
    from ssjdn.data.images import check_image

    blobs = [(p.read_bytes(), p.name) for p in files]
    with Clock() as clock:
        for data, name in blobs:
            check_image(data, name, level=level)
    return clock


def make_repeated_dataset(data: Path, out: Path, times: int) -> Path:
    """The dataset listed `times` times under new file names (symlinks to the same images)."""
    data = data.resolve()
    doc = json.loads((data / "dataset.json").read_text())
    (out / "images").mkdir(parents=True)
    images = []
    for r in range(times):
        for im in doc["images"]:
            name = f"r{r}_{im['filename']}"
            os.symlink(data / "images" / im["filename"], out / "images" / name)
            images.append({**im, "filename": name})
    (out / "dataset.json").write_text(json.dumps({"dataset": f"ucm{times}x", "images": images}))
    labels = data / "labels.csv"
    if labels.exists():  # the labels file grows with the dataset too (UCM's classes)
        header, *rows = labels.read_text().splitlines()
        (out / "labels.csv").write_text(
            "\n".join([header, *(f"r{r}_{row}" for r in range(times) for row in rows)]) + "\n"
        )
    return out


def peak_tree_rss(cmd: list[str], log: Path) -> tuple[int, int, int, float]:
    """(peak RSS of the whole process tree, of the parent, of the largest child (0: none), seconds) of a command."""
    import psutil

    t0 = time.perf_counter()
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    ps = psutil.Process(proc.pid)
    peak_tree = peak_parent = peak_child = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_tree, peak_parent, peak_child
        while not stop.is_set():
            try:
                parent = ps.memory_info().rss
                children = [c.memory_info().rss for c in ps.children(recursive=True)]
            except psutil.Error:
                continue
            peak_parent, peak_tree = max(peak_parent, parent), max(peak_tree, parent + sum(children))
            peak_child = max([peak_child, *children])
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    rc = proc.wait()
    stop.set()
    t.join()
    if rc:
        raise SystemExit(f"{' '.join(cmd)} failed with {rc}:\n{log.read_text()[-3000:]}")
    return peak_tree, peak_parent, peak_child, time.perf_counter() - t0


def compare_with_tar(
    data: Path, scratch: Path, workers: int, repeat: int, label: str, cold: bool = False
) -> int:
    """Throughput of `tar -cf` and of sharding (both validation levels) on `data`, printed side by side;
    returns the number of images. `cold`: every command starts with the dataset evicted from the page cache."""
    files = _image_files(data)
    nbytes = _warm(files)
    n = len(files)
    levels = ("structure", "full")
    runs: dict[str, list[Clock]] = {k: [] for k in ("tar", "plan", *levels)}
    procs: dict[str, list[int]] = {level: [] for level in levels}
    settle = _evict if cold else (lambda data: None)
    for _ in range(repeat):  # interleaved: a burst of load elsewhere hits every command alike
        settle(data)
        runs["tar"].append(time_tar(files, scratch))
        for level in levels:
            settle(data)
            clock, manifest, started = time_shard(data, scratch, workers, level)
            assert manifest["totals"]["samples"] == n and manifest["options"]["validate"] == level
            runs[level].append(clock)
            procs[level].append(started)
        settle(data)
        runs["plan"].append(time_plan(data, scratch))
    if cold:
        label += ", cold page cache"
    best = {k: min(c.wall for c in v) for k, v in runs.items()}
    cpu = {k: min(c.cpu for c in v) for k, v in runs.items()}
    _warm(files)
    floors = {level: time_validation_only(files, level) for level in levels}
    best.update({f"floor-{lv}": c.wall for lv, c in floors.items()})
    cpu.update({f"floor-{lv}": c.cpu for lv, c in floors.items()})
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\n{label}: {data} ({n} images, {nbytes / 1e6:.1f} MB, {nbytes / n / 1e3:.0f} kB each); CPUs: "
        f"{os.cpu_count()}; load average {load:.1f}; best of {repeat}"
    )
    width = 54
    print(f"{'':{width}}{'seconds':>9}{'samples/s':>12}{'MB/s':>9}{'vs tar':>8}{'CPU s':>8}")
    rows = [
        ("tar -cf (copy only)", "tar"),
        *((f"ssjdn shard --validate {lv}, {workers} workers", lv) for lv in levels),
        ("  floor: read dataset.json + plan (no image read)", "plan"),
        *((f"  floor: check_image level={lv} alone, 1 process", f"floor-{lv}") for lv in levels),
    ]
    for row_label, k in rows:
        t = best[k]
        print(
            f"{row_label:{width}}{t:9.2f}{n / t:12.0f}{nbytes / 1e6 / t:9.1f}{best['tar'] / t:8.3f}{cpu[k]:8.2f}"
        )
    for level in levels:
        spread = ", ".join(f"{c.wall:.2f}" for c in runs[level])
        print(
            f"throughput ratio shard / tar, {label}, --validate {level}: {best['tar'] / best[level]:.3f}  "
            f"(goal >= 0.5); runs: {spread} s; worker processes started: {procs[level]}"
        )
    return n


def measure_memory(data: Path, scratch: Path, n: int, scales: list[int], workers: int) -> None:
    """Peak RSS of `ssjdn shard` on the dataset and on it listed `scales` times: with one writer (one process:
    how memory scales with the dataset) and with `workers` (the process tree: worker processes come on top)."""
    runs = []
    for scale in [1, *scales]:
        ds = data if scale == 1 else make_repeated_dataset(data, scratch / f"big{scale}", scale)
        for w in sorted({1, workers}):
            dest = scratch / "mem-out"
            cmd = [
                sys.executable,
                "-m",
                "ssjdn_cli.main",
                "shard",
                str(ds),
                str(dest),
                "--no-progress",
                "--workers",
                str(w),
            ]
            runs.append((scale, w, *peak_tree_rss(cmd, scratch / "mem.log")))
            shutil.rmtree(dest)
    print(f"\n{'peak RSS, MB (--validate structure)':40}{'tree':>9}{'parent':>9}{'worker':>9}{'seconds':>9}")
    for scale, w, tree, parent, child, secs in runs:
        worker = f"{child / 2**20:9.0f}" if child else f"{'none':>9}"
        label = f"{n * scale} samples, --workers {w}"
        print(f"{label:40}{tree / 2**20:9.0f}{parent / 2**20:9.0f}{worker}{secs:9.1f}")
    one = {scale: parent for scale, w, _, parent, _, _ in runs if w == 1}
    for scale in scales:
        print(
            f"peak memory ratio {scale}x / 1x, one writer process: {one[scale] / one[1]:.2f}  (goal: flat, ~1.0)"
        )
    # Worker processes start only when the work outlasts their start-up: a small run stays one process, so the
    # tree of a large run is larger by the workers' own (flat) footprint, not by the dataset.


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--scale", type=int, nargs="+", default=[10], help="memory runs: these many times the dataset"
    )
    ap.add_argument("--scratch", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-cold", action="store_true", help="skip the comparison from a cold page cache")
    ap.add_argument(
        "--tiles", type=int, default=100, help="also compare on this many large generated tiles (0: skip)"
    )
    ap.add_argument("--tile-size", type=int, default=1024, help="tile side in pixels (uncompressed RGB TIFF)")
    args = ap.parse_args(argv)
    if not (args.data / "dataset.json").exists():
        print(f"no dataset at {args.data}; pass --data", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="bench-shard-", dir=args.scratch))
    try:
        n = compare_with_tar(args.data, scratch, args.workers, args.repeat, args.data.name)
        if not args.skip_cold:
            compare_with_tar(args.data, scratch, args.workers, args.repeat, args.data.name, cold=True)
        if args.tiles:
            from ssjdn.data.synthetic import generate_synthetic

            tiles = generate_synthetic(
                scratch / "tiles",
                n_per_class=max(1, args.tiles // 10),
                size=args.tile_size,
                image_format="tif",
                name="tiles",
            )
            compare_with_tar(
                tiles,
                scratch,
                args.workers,
                args.repeat,
                f"synthetic {args.tile_size}x{args.tile_size} RGB TIFF tiles",
            )
        if not args.skip_memory:
            measure_memory(args.data, scratch, n, args.scale, args.workers)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
