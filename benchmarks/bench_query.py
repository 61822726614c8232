"""Query latency over a large embedding store: exact (Parquet scan and memory-mapped cache) and ANN (usearch HNSW).

    .venv/bin/python benchmarks/bench_query.py                 # 1M x 512-d (2 GB of float32), ~10-20 min on 2 cores
    .venv/bin/python benchmarks/bench_query.py --n 100000      # quick look

Synthetic embeddings mimic real ones: a low-dimensional latent (mixture of 1000 clusters in 32-d) mapped
linearly to D dimensions plus isotropic noise, then L2-normalised. (Isotropic random vectors in 512-d have no
neighbourhood structure at all: every point is nearly equidistant, which no real embedding looks like.)
Queries are 50 fresh vectors from the same generator, i.e. not stored items, like caption queries.

Reported side by side, in one run: p50/p95 latency of one query (k=10) for
- exact, cached: what `ssjdn query` does on a table of >= 100k rows - the version's matrix memory-mapped from
  its exact-search cache (`pipelines.search.matrix_cache`, built by the first query; its build time is printed),
- exact, Parquet scan: the same search decoding the committed Parquet files in batches (`--no-cache`),
- ANN: `pipelines.search.ann` usearch index, and its recall@10 against exact on the same queries.
and, separately, fetching the k winners' metadata (`hits`), which every query adds to its search.
Goals: exact < 1 s; ANN < 20 ms at recall@10 >= 0.95.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipelines.search.ann import build_ann
from pipelines.search.exact import exact_topk
from pipelines.search.matrix_cache import build_cache
from pipelines.search.results import hits
from pipelines.store.reader import EmbeddingStore
from pipelines.store.schema import build_table
from pipelines.store.writer import VersionWriter

GOALS = {"exact_s": 1.0, "ann_s": 0.020, "recall": 0.95}


class Generator:
    def __init__(self, dim: int, seed: int = 0, latent: int = 32, clusters: int = 1000) -> None:
        rng = np.random.default_rng(seed)
        self.proj = rng.standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
        self.centers = rng.standard_normal((clusters, latent)).astype(np.float32)
        self.dim = dim

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        z = self.centers[rng.integers(0, len(self.centers), n)]
        z = z + 0.5 * rng.standard_normal(z.shape, dtype=np.float32)
        x = z @ self.proj + 0.1 * rng.standard_normal((n, self.dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_store(url: str, gen: Generator, n: int, unit_rows: int) -> tuple[EmbeddingStore, str]:
    store = EmbeddingStore(url)
    model_id = "b" * 64
    writer = VersionWriter(
        store,
        model_id,
        {"dim": gen.dim, "dtype": "float32", "config": "synthetic"},
        max_rows_per_file=unit_rows,
    )
    rng = np.random.default_rng(1)
    classes = [f"class_{i:02d}" for i in range(21)]
    for u, start in enumerate(range(0, n, unit_rows)):
        m = min(unit_rows, n - start)
        keys = [f"syn__{i:08d}" for i in range(start, start + m)]
        cols = {
            "key": keys,
            "source": [f"synthetic://{k}" for k in keys],
            "split": ["test"] * m,
            "class": [classes[i % 21] for i in range(start, start + m)],
            "lat": [None] * m,
            "lon": [None] * m,
        }
        table = build_table("images", cols, gen.sample(m, rng), dim=gen.dim, model_id=model_id)
        writer.stage({"id": f"unit-{u:04d}", "kind": "synthetic", "bad": []}, {"images": table})
        writer.commit()
    writer.close()
    return store, model_id


def pct(xs: list[float]) -> tuple[float, float]:
    return float(np.percentile(xs, 50)), float(np.percentile(xs, 95))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--unit-rows", type=int, default=100_000)
    p.add_argument(
        "--exact-queries", type=int, default=10, help="streaming-exact queries timed (each scans all)"
    )
    p.add_argument("--dir", default=None, help="where to write the store (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the store afterwards")
    p.add_argument(
        "--no-ann", action="store_true", help="exact search only (the ANN build takes most of the run)"
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-query-"))
    gen = Generator(args.dim)
    t0 = time.perf_counter()
    store, mid = write_store(str(root / "store"), gen, args.n, args.unit_rows)
    snapshot = store.snapshot(mid)
    print(
        f"wrote {args.n} x {args.dim} float32 embeddings in {len(snapshot.files)} files "
        f"({time.perf_counter() - t0:.1f}s) under {root}"
    )
    queries = gen.sample(args.queries, np.random.default_rng(99))
    try:
        # exact, streaming over Parquet (what `ssjdn query` does per call); first call warms the page cache
        exact_topk(snapshot, queries[0], k=args.k, cache=False)
        stream_t = []
        for q in queries[: args.exact_queries]:
            t = time.perf_counter()
            exact_topk(snapshot, q, k=args.k, cache=False)
            stream_t.append(time.perf_counter() - t)

        t = time.perf_counter()
        build_cache(snapshot, "images")
        load_s = time.perf_counter() - t
        flat_t, hits_t, truth = [], [], []
        for q in queries:
            t = time.perf_counter()
            rows, scores = exact_topk(snapshot, q, k=args.k, cache=True)
            flat_t.append(time.perf_counter() - t)
            truth.append(set(rows[0].tolist()))
            t = time.perf_counter()
            hits(snapshot, "images", rows[0], scores[0])
            hits_t.append(time.perf_counter() - t)

        ann, build_s, ann_t, found = None, 0.0, [], 0
        if not args.no_ann:
            t = time.perf_counter()
            ann = build_ann(snapshot, k=args.k)
            build_s = time.perf_counter() - t
        for q, exact in zip(queries, truth if ann else []):
            t = time.perf_counter()
            rows, _ = ann.search(q, args.k)
            ann_t.append(time.perf_counter() - t)
            found += len(exact & set(rows[0].tolist()))
        recall = found / (args.k * len(queries))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    (s50, s95), (f50, f95), (h50, h95) = pct(stream_t), pct(flat_t), pct(hits_t)
    ok = lambda cond: "OK" if cond else "MISSED"  # noqa: E731
    print(
        f"\nquery latency, {args.n:,} x {args.dim}-d, k={args.k} ({len(queries)} queries; "
        f"{len(stream_t)} for streaming exact)"
    )
    print(
        f"  exact, cached (default)    p50 {f50 * 1e3:8.1f} ms   p95 {f95 * 1e3:8.1f} ms   "
        f"goal < {GOALS['exact_s'] * 1e3:.0f} ms: {ok(f95 < GOALS['exact_s'])}   (cache build {load_s:.1f}s, once)"
    )
    print(
        f"  exact, Parquet scan        p50 {s50 * 1e3:8.1f} ms   p95 {s95 * 1e3:8.1f} ms   "
        f"(--no-cache; every query decodes the whole table)"
    )
    print(
        f"  + the k winners' metadata  p50 {h50 * 1e3:8.1f} ms   p95 {h95 * 1e3:8.1f} ms   "
        f"(every query, after its search; the row groups that hold them)"
    )
    if ann is None:
        print(f"  ratio p50 Parquet scan / cached exact: {s50 / f50:.1f}x   (ANN skipped: --no-ann)")
        return
    a50, a95 = pct(ann_t)
    print(
        f"  ANN (usearch HNSW f16)     p50 {a50 * 1e3:8.2f} ms   p95 {a95 * 1e3:8.2f} ms   "
        f"goal < {GOALS['ann_s'] * 1e3:.0f} ms: {ok(a95 < GOALS['ann_s'])}   (build {build_s:.0f}s)"
    )
    print(
        f"  ANN recall@{args.k} vs exact      {recall:.3f} on these queries "
        f"({ann.meta[f'recall@{args.k}']:.3f} at build, {ann.meta['recall_query_kind']})   "
        f"goal >= {GOALS['recall']}: {ok(recall >= GOALS['recall'])}"
    )
    print(f"  ratio p50 Parquet scan / cached exact: {s50 / f50:.1f}x; cached exact / ANN: {f50 / a50:.0f}x")


if __name__ == "__main__":
    main()
