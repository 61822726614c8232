"""Sharding throughput against `tar -cf` of the same files on the same disk, and peak memory at 1x vs 10x samples.

    .venv/bin/python -m benchmarks.bench_shard [--data ../shared/data/ucm-captions] [--workers 2] [--repeat 3]

Throughput: both read the same (page-cached) image files and write to the same scratch folder. `tar` only
copies bytes; `ssjdn shard` also reads the dataset description, decodes every image once (validation on),
writes json/txt/cls members, hashes every byte and commits each shard by rename. Best of `--repeat` runs each.
Memory: a fresh process shards N and 10N samples (the UCM images listed 10x under new names, via symlinks);
peak RSS of the whole process tree (parent + writer processes) is sampled every 20 ms.
"""

from __future__ import annotations

import argparse
import json
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


def time_tar(data: Path, files: list[Path], scratch: Path, repeat: int) -> float:
    image_root = files[0].parent
    names = scratch / "names.txt"
    names.write_text("\n".join(str(p.relative_to(image_root)) for p in files) + "\n")
    best = float("inf")
    for _ in range(repeat):
        out = scratch / "ref.tar"
        t0 = time.perf_counter()
        subprocess.run(["tar", "-cf", str(out), "-C", str(image_root), "-T", str(names)], check=True)
        best = min(best, time.perf_counter() - t0)
        out.unlink()
    return best


def time_shard(data: Path, scratch: Path, repeat: int, workers: int) -> tuple[float, dict]:
    from pipelines.shard import shard_dataset

    best, manifest = float("inf"), {}
    for i in range(repeat):
        dest = scratch / f"shards-{i}"
        t0 = time.perf_counter()
        result = shard_dataset(data, str(dest), workers=workers, progress=False)
        best = min(best, time.perf_counter() - t0)
        manifest = result.manifest
        shutil.rmtree(dest)
    return best, manifest


def time_validation_only(files: list[Path]) -> float:
    """The floor: decoding every image once in one process (what validation costs by itself)."""
    from ssjdn.data.images import check_image

    blobs = [(p.read_bytes(), p.name) for p in files]
    t0 = time.perf_counter()
    for data, name in blobs:
        check_image(data, name)
    return time.perf_counter() - t0


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
    return out


def peak_tree_rss(cmd: list[str]) -> tuple[int, int, int, float]:
    """(peak RSS of the whole process tree, of the parent, of the largest child, seconds) of a command."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO)
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
        raise SystemExit(f"{' '.join(cmd)} failed with {rc}")
    return peak_tree, peak_parent, peak_child, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scale", type=int, default=10, help="memory run: this many times the dataset")
    ap.add_argument("--scratch", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args(argv)
    if not (args.data / "dataset.json").exists():
        print(f"no dataset at {args.data}; pass --data", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="bench-shard-", dir=args.scratch))
    try:
        files = _image_files(args.data)
        nbytes = _warm(files)
        n = len(files)
        t_tar = time_tar(args.data, files, scratch, args.repeat)
        t_shard, manifest = time_shard(args.data, scratch, args.repeat, args.workers)
        t_val = time_validation_only(files)
        assert manifest["totals"]["samples"] == n
        print(f"data: {args.data} ({n} images, {nbytes / 1e6:.1f} MB); scratch: {scratch}; CPUs: {os.cpu_count()}")
        print(f"{'':34}{'seconds':>9}{'samples/s':>12}{'MB/s':>9}")
        rows = [
            ("tar -cf (copy only)", t_tar),
            (f"ssjdn shard, validation on, {args.workers} workers", t_shard),
            ("validation alone (1 process)", t_val),
        ]
        for label, t in rows:
            print(f"{label:34}{t:9.2f}{n / t:12.0f}{nbytes / 1e6 / t:9.1f}")
        print(f"throughput ratio shard / tar: {t_tar / t_shard:.3f}  (goal >= 0.5)")

        if not args.skip_memory:
            big = make_repeated_dataset(args.data, scratch / "big", args.scale)
            results = []
            for label, ds in ((f"{n} samples", args.data), (f"{n * args.scale} samples", big)):
                dest = scratch / f"mem-{len(results)}"
                cmd = [sys.executable, "-m", "pipelines.cli", "shard", str(ds), str(dest), "--no-progress",
                       "--workers", str(args.workers)]  # fmt: skip
                results.append((label, *peak_tree_rss(cmd)))
                shutil.rmtree(dest)
            print(f"{'peak RSS, MB':34}{'tree':>9}{'parent':>12}{'worker':>9}{'seconds':>9}")
            for label, tree, parent, child, secs in results:
                print(f"{label:34}{tree / 2**20:9.0f}{parent / 2**20:12.0f}{child / 2**20:9.0f}{secs:9.1f}")
            (_, t1, p1, c1, _), (_, t10, p10, c10, _) = results
            print(
                f"peak memory ratio {args.scale}x / 1x: tree {t10 / t1:.2f}, parent {p10 / p1:.2f}, "
                f"worker {c10 / c1:.2f}  (goal: flat, ~1.0; the parent holds the dataset's metadata)"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
