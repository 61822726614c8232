"""Query latency with a geo filter: a bbox holding ~1 % of a large store's rows vs the unfiltered query.

    .venv/bin/python -m benchmarks.bench_geo_query                 # 1M x 256-d chips with footprints
    .venv/bin/python -m benchmarks.bench_geo_query --rows 200000   # quicker look

The store is one schema-2 version (geometry WKB + bbox covering columns, GeoParquet metadata) written with
`pipelines.store.writer.VersionWriter` in units of `--unit-rows`: synthetic unit embeddings (the clustered
generator of bench_query.py) and synthetic chip footprints spread uniformly over the globe by area (rotated
quadrilaterals 5 to 50 km a side; none crosses the antimeridian or reaches a pole). The box (default
10..46 E, 0..11.54 N: 36/360 x (sin 11.54 - sin 0)/2 = 1 % of the sphere) holds about 1 % of them; the run
prints the exact share (shapely over every footprint).

One `Searcher` (no encoders: vector queries; exact search on the store's matrix cache, which opening it builds
for tables of 100k rows or more; a smaller table's matrix is held in memory) answers
`--queries` fresh vectors twice each, interleaved: unfiltered, and with `bbox=` (the bbox columns prune, the
footprints of the candidates decide: pipelines/search/geo.py). Reported side by side: p50/p95 of each, their
ratio, the Searcher's open time and the first query of each kind (the first filtered one reads the bbox
column). Every filtered hit is checked to meet the box. Then where the filtered query's time goes: reading
back the footprints of the rows whose bbox meets the box (what pipelines/search/geo.py reads per query to
decide). Goal (issue 15): the filtered query is not slower than the unfiltered one.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import shapely

from benchmarks.bench_query import Generator, pct
from pipelines.search.searcher import Searcher
from pipelines.store.reader import EmbeddingStore
from pipelines.store.schema import build_table
from pipelines.store.writer import VersionWriter

BOX = (10.0, 0.0, 46.0, 11.54)  # ~1 % of the sphere's area
KM_PER_DEG = 111.32


def footprints(n: int, rng: np.random.Generator) -> np.ndarray:
    """n chip footprints (shapely Polygons, lon/lat), centres uniform over the sphere's area, each a square
    5 to 50 km a side rotated at random, its corners placed on the local lon/lat scale."""
    lat = np.degrees(np.arcsin(rng.uniform(-np.sin(np.radians(85)), np.sin(np.radians(85)), n)))
    side_km = np.exp(rng.uniform(np.log(5.0), np.log(50.0), n))
    half_deg = side_km / 2 / KM_PER_DEG
    stretch = 1 / np.cos(np.radians(lat))  # degrees of longitude per degree of latitude here
    margin = half_deg * np.sqrt(2) * stretch
    lon = rng.uniform(-180 + margin, 180 - margin)
    turn = rng.uniform(0, np.pi / 2, n)
    corners = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1), (-1, -1)], float)  # closed ring
    cos, sin = np.cos(turn)[:, None], np.sin(turn)[:, None]
    dx = (corners[:, 0] * cos - corners[:, 1] * sin) * half_deg[:, None]
    dy = (corners[:, 0] * sin + corners[:, 1] * cos) * half_deg[:, None]
    ring = np.stack([lon[:, None] + dx * stretch[:, None], lat[:, None] + dy], axis=-1)
    return shapely.polygons(ring)


def write_store(url: str, gen: Generator, n: int, unit_rows: int) -> tuple[EmbeddingStore, str, np.ndarray]:
    """The version, committed unit by unit; returns (store, model_id, every footprint in row order of keys)."""
    store = EmbeddingStore(url)
    model_id = "c" * 64
    writer = VersionWriter(
        store,
        model_id,
        {"dim": gen.dim, "dtype": "float32", "config": "synthetic"},
        max_rows_per_file=unit_rows,
    )
    rng = np.random.default_rng(1)
    every = []
    for u, start in enumerate(range(0, n, unit_rows)):
        m = min(unit_rows, n - start)
        keys = [f"chip__{i:08d}" for i in range(start, start + m)]
        fps = footprints(m, rng)
        every.append(fps)
        cols = {
            "key": keys,
            "source": [f"synthetic://{k}" for k in keys],
            "split": ["chips"] * m,
            "class": [None] * m,
            "lat": [None] * m,
            "lon": [None] * m,
            "geometry": fps,
            "scene_id": [f"scene-{i // 64}" for i in range(start, start + m)],
        }
        table = build_table("images", cols, gen.sample(m, rng), dim=gen.dim, model_id=model_id)
        writer.stage({"id": f"unit-{u:04d}", "kind": "synthetic", "bad": []}, {"images": table})
        writer.commit()
        logging.info("unit %d: %d rows committed", u, m)
    writer.close()
    return store, model_id, np.concatenate(every)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--unit-rows", type=int, default=100_000)
    p.add_argument("--bbox", default=",".join(map(str, BOX)), metavar="MINLON,MINLAT,MAXLON,MAXLAT")
    p.add_argument("--dir", default=None, help="where to write the store (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the store afterwards")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    box = tuple(float(v) for v in args.bbox.split(","))

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-geo-query-"))
    gen = Generator(args.dim)
    try:
        t0 = time.perf_counter()
        store, mid, fps = write_store(str(root / "store"), gen, args.rows, args.unit_rows)
        write_s = time.perf_counter() - t0
        inside = int(shapely.intersects(fps, shapely.box(*box)).sum())
        print(
            f"wrote {args.rows:,} x {args.dim}-d rows with footprints in {len(store.snapshot(mid).files)} "
            f"files ({write_s:.1f}s) under {root}; the box {box} meets {inside:,} footprints "
            f"({100 * inside / args.rows:.2f} %)"
        )
        queries = gen.sample(args.queries, np.random.default_rng(99))
        t = time.perf_counter()
        with Searcher(str(root / "store"), load_encoders=False, refresh_s=None) as searcher:
            open_s = time.perf_counter() - t
            exact = searcher.status()["tables"]["images"]["exact"]
            t = time.perf_counter()
            searcher.search(vector=queries[0], k=args.k)
            first_s = time.perf_counter() - t
            t = time.perf_counter()
            searcher.search(vector=queries[0], k=args.k, bbox=box)
            first_geo_s = time.perf_counter() - t
            # where the filtered query's time goes: the candidates the bbox columns keep, and reading their
            # footprints back (Snapshot.take of the geometry column: the row groups that hold them)
            bounds = shapely.bounds(fps)
            meets = (bounds[:, 0] <= box[2]) & (bounds[:, 2] >= box[0]) & (bounds[:, 1] <= box[3])
            meets &= bounds[:, 3] >= box[1]
            within = meets & (bounds[:, 0] >= box[0]) & (bounds[:, 2] <= box[2]) & (bounds[:, 1] >= box[1])
            within &= bounds[:, 3] <= box[3]
            snapshot = searcher.snapshot
            take_t = []
            for _ in range(3):
                t = time.perf_counter()
                snapshot.take("images", np.flatnonzero(meets), ["geometry"])
                take_t.append(time.perf_counter() - t)
            row_groups = sum(pq_row_groups(path) for path in snapshot.paths("images"))
            plain_t, geo_t, bad = [], [], 0
            for q in queries:
                t = time.perf_counter()
                searcher.search(vector=q, k=args.k)
                plain_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                res = searcher.search(vector=q, k=args.k, bbox=box)
                geo_t.append(time.perf_counter() - t)
                rows = [int(h.key.rsplit("_", 1)[1]) for h in res.hits]  # chip__{row:08d}
                bad += int((~shapely.intersects(fps[rows], shapely.box(*box))).sum())
                assert len(res.hits) == min(args.k, inside)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    (p50, p95), (g50, g95) = pct(plain_t), pct(geo_t)
    verdict = "OK" if g50 <= p50 else "MISSED"
    print(
        f"\nquery latency, {args.rows:,} x {args.dim}-d, k={args.k}, {len(queries)} vector queries each "
        f"(Searcher, exact; matrix: {exact}, opened in {open_s:.1f}s; interleaved)"
    )
    print(
        f"  unfiltered                    p50 {p50 * 1e3:8.1f} ms   p95 {p95 * 1e3:8.1f} ms   "
        f"(first query {first_s * 1e3:.0f} ms)"
    )
    print(
        f"  --bbox ({100 * inside / args.rows:.2f} % of rows)       p50 {g50 * 1e3:8.1f} ms   "
        f"p95 {g95 * 1e3:8.1f} ms   (first {first_geo_s * 1e3:.0f} ms: reads the bbox column; "
        f"hits off the box: {bad})"
    )
    print(
        f"  ratio bbox / unfiltered       p50 {g50 / p50:.2f}x   p95 {g95 / p95:.2f}x   "
        f"goal <= 1x (not slower): {verdict}"
    )
    print(
        f"  of the filtered query: reading the footprints of the {int(meets.sum()):,} rows whose bbox meets the "
        f"box ({int(within.sum()):,} of them lie inside it) takes {min(take_t) * 1e3:.0f} ms "
        f"(Snapshot.take of `geometry`, best of 3; the store has {row_groups} row groups)"
    )


def pq_row_groups(path: str) -> int:
    return pq.ParquetFile(path).metadata.num_row_groups


if __name__ == "__main__":
    main()
