"""Embedding throughput: the Ray Data job (`pipelines.embed`) against a plain PyTorch loop, and its peak memory.

    .venv/bin/python benchmarks/bench_embed.py [--checkpoint runs/x/best.pt] [--small 2000] [--large 20000]

One run, same machine, same shards, same model, same cores:
- plain loop: read the shards (`pipelines.shards_read`), decode + preprocess, encode in batches with torch
  (default threads = cores), write the embeddings to one Parquet file;
- Ray Data: `embed_archive` (read/decode tasks, one encoder actor with the same torch threads, commit to the
  store), timed end to end on an already started local Ray (cluster start-up excluded, job start-up included).
Both are timed on `--small` and on `--large` images: the ratio of images/s, Ray / plain (goal >= 0.9), end to
end (Ray's one-off start-up included: actor process, model load) and after the first result. Peak memory of the
Ray job on both sizes: PSS (proportional set size: shared pages counted once) of the driver and every Ray
process, sampled every 0.25 s (goal: flat, i.e. the 10x larger archive needs about the same peak).

Images: the UCM-Captions JPEGs from ../shared/data (repeated under new keys to reach `--large`), or synthetic
scenes when that folder is absent. Model: `--checkpoint`, or a `cpu-small` model with random weights
(throughput does not depend on the weights).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
UCM = REPO.parent / "shared" / "data" / "ucm-captions"
GOAL_RATIO = 0.9


def source_shards(work: Path) -> Path:
    from pipelines.shard.job import shard_dataset

    data = UCM
    if not (UCM / "dataset.json").exists():
        from ssjdn.data.synthetic import generate_synthetic

        data = generate_synthetic(work / "synthetic", n_per_class=100, size=256, seed=0)
    out = work / "src-shards"
    shard_dataset(data, str(out), maxcount=250, progress=False)
    return out


def repeated_archive(src: Path, out: Path, n_images: int) -> tuple[Path, int]:
    """A folder of tars holding `n_images` samples: the source shards' samples again and again, keys renamed."""
    out.mkdir(parents=True, exist_ok=True)
    tars = sorted(src.rglob("*.tar"))
    written, r = 0, 0
    while written < n_images:
        for t in tars:
            if written >= n_images:
                break
            with (
                tarfile.open(t) as tin,
                tarfile.open(out / f"r{r:03d}-{t.parent.name}-{t.name}", "w") as tout,
            ):
                keep: set[str] = set()
                for m in tin.getmembers():
                    stem, ext = m.name.split(".", 1)
                    if stem not in keep:
                        if written >= n_images:
                            break
                        keep.add(stem)
                        written += 1
                    data = tin.extractfile(m).read()
                    info = tarfile.TarInfo(f"{stem}_r{r}.{ext}")
                    info.size = len(data)
                    tout.addfile(info, io.BytesIO(data))
        r += 1
    return out, written


def checkpoint(path: str | None, work: Path) -> str:
    if path:
        return path
    from ssjdn.checkpoint import save_checkpoint
    from ssjdn.config import load_config
    from ssjdn.model import build_model
    from ssjdn.tokenization import build_tokenizer

    cfg = load_config("cpu-small", {"model.lsd_cfg.num_classes": 21})
    tok = build_tokenizer(cfg)
    model = build_model(cfg, tok, pretrained=True)
    out = work / "cpu-small-random.pt"
    save_checkpoint(out, model=model, cfg=model.cfg, tokenizer=tok)
    return str(out)


def plain_loop(archive: Path, ckpt: str, batch_size: int, out: Path) -> int:
    import pyarrow.parquet as pq

    from pipelines.encoders import read_checkpoint, restore_encoders
    from pipelines.shard.read import open_shards
    from pipelines.store.schema import build_table
    from ssjdn.data.images import decode_image

    blob = read_checkpoint(ckpt)
    enc = restore_encoders(blob)
    tf = enc.transform()
    keys, pixels, embs = [], [], []
    for s in open_shards(sorted(str(p) for p in archive.glob("*.tar"))):
        keys.append(s["key"])
        pixels.append(tf(decode_image(s["image"], s["key"])).numpy())
        if len(pixels) == batch_size:
            embs.append(enc.encode_pixels(np.stack(pixels)))
            pixels = []
    if pixels:
        embs.append(enc.encode_pixels(np.stack(pixels)))
    emb = np.concatenate(embs)
    cols = {
        "key": keys,
        "source": keys,
        "split": [None] * len(keys),
        "class": [None] * len(keys),
        "lat": [None] * len(keys),
        "lon": [None] * len(keys),
    }
    pq.write_table(build_table("images", cols, emb, dim=enc.dim, model_id=blob.model_id), out)
    return len(keys)


class PeakPSS:
    """Peak of the summed PSS of this process and all its descendants (Ray's raylet, workers, actors)."""

    def __init__(self, every_s: float = 0.25) -> None:
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakPSS:
        self.baseline = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def ray_job(archive: Path, store: Path, ckpt: str, batch_size: int) -> tuple[float, int, int, float]:
    from pipelines.embed.job import embed_archive

    with PeakPSS() as mem:
        t = time.perf_counter()
        report = embed_archive(str(archive), str(store), ckpt, batch_size=batch_size, progress=False)
        seconds = time.perf_counter() - t
    assert not report.failed_units and not report.bad, report.summary()
    return seconds, report.images, mem.peak, report.first_result_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint", default=None, help="checkpoint to use (default: cpu-small, random weights)"
    )
    p.add_argument("--small", type=int, default=2000, help="images for the throughput comparison")
    p.add_argument("--large", type=int, default=20000, help="images for the memory comparison")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dir", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `ssjdn embed` does, for both sides
    import ray

    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-embed-"))
    load_before = os.getloadavg()[0]
    try:
        ckpt = checkpoint(args.checkpoint, work)
        src = source_shards(work)
        small, n_small = repeated_archive(src, work / "small", args.small)
        large, n_large = repeated_archive(src, work / "large", args.large)
        print(f"archives: {n_small} and {n_large} images in tars under {work}; checkpoint {ckpt}")

        plain = {}
        for name, archive in (("small", small), ("large", large)):
            t = time.perf_counter()
            with PeakPSS() as plain_mem:
                count = plain_loop(archive, ckpt, args.batch_size, work / "plain.parquet")
            plain[name] = (time.perf_counter() - t, count, plain_mem.peak)

        # Ray runs its workers at niceness 15 by default; the plain loop runs at 0. On a machine shared with
        # other work that would measure the neighbours, not Ray: give both the same priority.
        ray.init(
            num_cpus=max(4, 2 * (os.cpu_count() or 1)),
            include_dashboard=False,
            log_to_driver=False,
            _system_config={"worker_niceness": 0},
        )
        ray_runs = {
            name: ray_job(archive, work / f"store-{name}", ckpt, args.batch_size)
            for name, archive in (("small", small), ("large", large))
        }
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nembedding throughput (batch {args.batch_size}, {os.cpu_count()} cores, load average before: "
        f"{load_before:.1f})"
    )
    for name in ("small", "large"):
        plain_s, n, plain_peak = plain[name]
        ray_s, n_ray, ray_peak, first_s = ray_runs[name]
        assert n == n_ray, (n, n_ray)
        ratio = (n / ray_s) / (n / plain_s)
        steady = (n / (ray_s - first_s)) / (n / plain_s) if first_s else float("nan")
        print(
            f"  {n:6d} images: plain loop {plain_s:7.1f} s ({n / plain_s:6.1f}/s, peak PSS {plain_peak / 2**20:5.0f} MiB)"
            f" | Ray Data {ray_s:7.1f} s ({n / ray_s:6.1f}/s, first result after {first_s:4.1f} s, peak PSS "
            f"{ray_peak / 2**20:5.0f} MiB) | ratio {ratio:.2f} end to end, {steady:.2f} after start-up"
            f"   goal >= {GOAL_RATIO}: {'OK' if ratio >= GOAL_RATIO else 'MISSED'}"
        )
    (_, n_s, peak_s, _), (_, n_l, peak_l, _) = ray_runs["small"], ray_runs["large"]
    growth = peak_l / peak_s
    print(
        f"\nRay job peak memory (driver + every Ray process, PSS): {n_s} images {peak_s / 2**20:.0f} MiB, "
        f"{n_l} images {peak_l / 2**20:.0f} MiB -> x{growth:.2f} for x{n_l / n_s:.0f} images "
        f"({'flat' if growth < 1.25 else 'NOT flat'})"
    )


if __name__ == "__main__":
    main()
