"""Warm search and the search service under load, on a large store of the `cpu-small` model's dimension.

    .venv/bin/python benchmarks/bench_serve.py                       # 1M x 256-d (~1 GB float32); the ANN
                                                                     # build takes most of the run on 2 cores
    .venv/bin/python benchmarks/bench_serve.py --n 200000            # quicker look
    .venv/bin/python benchmarks/bench_serve.py --checkpoint runs/cpu-small/best/checkpoint.pt   # a trained one

The store holds synthetic embeddings (the clustered generator of bench_query.py) under the model_id of a real
`cpu-small` checkpoint (default: one built here from the config - the offline MiniLM text encoder, random image
weights; a trained one gives the same timings), so every query is encoded by the real text encoder. One run,
bounded loops, loopback only:

1. warm vs cold: `Searcher.search(text=...)` (model, matrix and index loaded once) against a cold in-process
   `query_store` call (checkpoint read, encoders rebuilt, then the same search) and one `ssjdn query` command;
2. the service (`python -m pipelines.serve --ann`, a subprocess) end to end over HTTP including the text
   encoding: 1 client, p50/p95 for exact (memory-mapped matrix) and ANN, and ANN recall@k against exact for
   text queries and for vectors like the stored ones; then 8 concurrent clients, p50/p95, throughput, errors,
   the mean micro-batch and the server's memory (RSS sampled through the run).
Goals (1 client, p50): exact < 150 ms, ANN < 20 ms; 8 clients: no errors, memory flat.
`--dir DIR --keep` keeps the store with its matrix cache and ANN index; a later run with the same `--dir` and
`--n` reuses them (the ANN build of 1M rows is most of a first run).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: as every ssjdn command runs it

import argparse
import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.bench_query import Generator
from pipelines.store.reader import EmbeddingStore
from pipelines.store.schema import build_table
from pipelines.store.writer import VersionWriter

REPO = Path(__file__).resolve().parents[1]
GOALS = {"exact_p50_s": 0.150, "ann_p50_s": 0.020}
SCENES = [
    "airport",
    "beach",
    "farmland",
    "forest",
    "harbor",
    "river",
    "parking lot",
    "residential area",
    "golf course",
    "freeway",
    "baseball field",
    "tennis court",
    "storage tanks",
    "overpass",
    "runway",
]
PHRASES = [
    "many planes parked near a terminal",
    "a {s} next to a road",
    "a dense {s} with green trees",
    "some buildings around a {s}",
    "a small {s} seen from above",
    "a {s} beside the blue sea",
]


def texts(n: int, tag: str = "") -> list[str]:
    """n distinct captions; another `tag` gives other texts (the searcher keeps the embeddings of recent texts,
    so each timed loop asks texts no loop asked before: every query pays its encoding)."""
    out = list(dict.fromkeys(p.format(s=s) for s in SCENES for p in PHRASES))
    return [
        f"{out[i % len(out)]}{f' {tag}' if tag else ''}{'' if i < len(out) else f' number {i}'}"
        for i in range(n)
    ]


def make_checkpoint(path: Path) -> Path:
    from ssjdn.checkpoint import save_checkpoint
    from ssjdn.config import load_config
    from ssjdn.model import build_model
    from ssjdn.tokenization import build_tokenizer

    cfg = load_config("cpu-small", {"model.lsd_cfg.num_classes": 21})
    tok = build_tokenizer(cfg)
    model = build_model(cfg, tok, pretrained=True)  # the offline MiniLM weights; the image side is random
    save_checkpoint(path, model=model, cfg=model.cfg, tokenizer=tok)
    return path


def write_store(url: str, checkpoint: Path, n: int, unit_rows: int) -> str:
    import hashlib

    model_id = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    gen = Generator(256)
    writer = VersionWriter(
        EmbeddingStore(url),
        model_id,
        {"checkpoint": str(checkpoint.resolve()), "config": "cpu-small", "dim": 256, "dtype": "float32"},
        max_rows_per_file=unit_rows,
    )
    rng = np.random.default_rng(1)
    for u, start in enumerate(range(0, n, unit_rows)):
        m = min(unit_rows, n - start)
        keys = [f"syn__{i:08d}" for i in range(start, start + m)]
        cols = {
            "key": keys,
            "source": [f"synthetic://{k}" for k in keys],
            "split": ["test"] * m,
            "class": [SCENES[i % len(SCENES)] for i in range(start, start + m)],
            "lat": [None] * m,
            "lon": [None] * m,
        }
        table = build_table("images", cols, gen.sample(m, rng), dim=256, model_id=model_id)
        writer.stage({"id": f"unit-{u:04d}", "kind": "synthetic", "bad": []}, {"images": table})
    writer.commit()
    writer.close()
    return model_id


def _reusable(store: str, n: int) -> bool:
    try:
        return EmbeddingStore(store).snapshot().rows("images") == n
    except Exception:
        return False


def pct(xs: list[float]) -> tuple[float, float]:
    return float(np.percentile(xs, 50)), float(np.percentile(xs, 95))


class Service:
    """`python -m pipelines.serve --ann` on a free loopback port, in a subprocess."""

    def __init__(self, store: str, cache_dir: Path, extra: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"}
        cmd = [sys.executable, "-m", "pipelines.serve", "--store", store, "--cache-dir", str(cache_dir)]
        cmd += ["--ann", "--port", "0", *extra]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        t0 = time.perf_counter()
        while True:
            found = [m.group(1) for x in list(self.lines) if (m := re.search(r"running on (http://\S+)", x))]
            if found:
                self.url = found[0]
                self.start_s = time.perf_counter() - t0
                return
            if self.proc.poll() is not None or time.perf_counter() - t0 > 1800:
                raise RuntimeError("service did not start:\n" + "\n".join(self.lines[-30:]))
            time.sleep(0.1)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def run_clients(url: str, queries: list[str], clients: int, mode: str, k: int, service: Service):
    """(latencies s, errors, wall s, rss samples MB) of `clients` concurrent clients sharing `queries`."""
    import httpx

    lat: list[float] = []
    errors: list[str] = []
    rss: list[float] = [service.rss_mb()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            rss.append(service.rss_mb())

    def client(part: list[str]) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            for text in part:
                t = time.perf_counter()
                r = c.get("/search", params={"text": text, "k": k, "mode": mode})
                lat.append(time.perf_counter() - t)
                if r.status_code != 200 or r.json()["mode"] != mode:
                    errors.append(f"{r.status_code} {r.text[:200]}")

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [queries[i::clients] for i in range(clients)]))
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    rss.append(service.rss_mb())
    return lat, errors, wall, rss


def one_client(c, qs, k: int, mode: str, vectors: bool = False) -> tuple[list[float], list[set[str]]]:
    """(latencies, hit keys) of sequential queries: texts (GET) or vectors (POST)."""
    lat, keys = [], []
    for q in qs:
        t = time.perf_counter()
        if vectors:
            r = c.post("/search", json={"vector": q.tolist(), "k": k, "mode": mode})
        else:
            r = c.get("/search", params={"text": q, "k": k, "mode": mode})
        lat.append(time.perf_counter() - t)
        body = r.json()
        assert r.status_code == 200 and body["mode"] == mode, body
        keys.append({h["key"] for h in body["hits"]})
    return lat, keys


def recall(found: list[set[str]], truth: list[set[str]], k: int) -> float:
    return float(np.mean([len(a & e) / k for a, e in zip(found, truth)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="rows in the store (default 1M)")
    p.add_argument("--unit-rows", type=int, default=100_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--queries", type=int, default=50, help="queries per single-client measurement")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--load-queries", type=int, default=400, help="queries per concurrent measurement")
    p.add_argument("--cold", type=int, default=3, help="cold query_store calls timed")
    p.add_argument(
        "--checkpoint", default=None, help="a cpu-small checkpoint (default: built from the config)"
    )
    p.add_argument(
        "--ann-expansion", type=int, default=None, help="the service's --ann-expansion (default 128)"
    )
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    p.add_argument(
        "--keep", action="store_true", help="keep the work folder (a later run with --dir reuses it)"
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    import httpx

    from pipelines.search.ann import build_ann, load_ann
    from pipelines.search.matrix_cache import build_cache, load_cache
    from pipelines.search.query import query_store
    from pipelines.search.searcher import Searcher

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-serve-"))
    root.mkdir(parents=True, exist_ok=True)
    record: dict = {"n": args.n, "dim": 256, "k": args.k, "load_average_at_start": os.getloadavg()[0]}
    service = None
    try:
        t = time.perf_counter()
        store = str(root / "store")
        if _reusable(store, args.n):  # a --keep folder of an earlier run: its store and derived data
            print(f"store: reusing {args.n:,} x 256 float32 under {root}")
        else:
            shutil.rmtree(store, ignore_errors=True)
            ckpt = Path(args.checkpoint) if args.checkpoint else make_checkpoint(root / "cpu-small.pt")
            write_store(store, ckpt, args.n, args.unit_rows)
            took = time.perf_counter() - t
            print(f"store: {args.n:,} x 256 float32 under {root} ({took:.0f}s with the checkpoint)")
        snap = EmbeddingStore(store).snapshot()
        t = time.perf_counter()
        if load_cache(snap, "images") is None:
            build_cache(snap, "images")
        record["matrix_cache_build_s"] = round(time.perf_counter() - t, 1)
        ann = load_ann(snap, "images") or build_ann(snap, "images", k=10)
        record["ann_build_s"] = ann.meta["build_seconds"]
        record["ann_recall@10_at_build"] = ann.meta["recall@10"]
        del ann
        print(
            f"derived data (once per generation, in the store): matrix cache {record['matrix_cache_build_s']}s, "
            f"ANN index {record['ann_build_s']}s (recall@10 at build {record['ann_recall@10_at_build']}, "
            "stored vectors + noise)"
        )

        # 1. warm Searcher vs cold query_store
        qs = texts(args.queries)
        query_store(store, text=qs[0], k=args.k)  # imports and page cache warm: what stays cold is the model
        cold = []
        for text in qs[1 : 1 + args.cold]:
            t = time.perf_counter()
            query_store(store, text=text, k=args.k)
            cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        searcher = Searcher(store, read_only=True, cache_dir=root / "cache")
        open_s = time.perf_counter() - t
        searcher.search(text="a first query", k=args.k)
        warm, parts = [], []
        for text in qs:
            t = time.perf_counter()
            parts.append(searcher.search(text=text, k=args.k).timings)
            warm.append(time.perf_counter() - t)
        searcher.close()
        del searcher
        t = time.perf_counter()
        cli = subprocess.run(
            [sys.executable, "-m", "ssjdn_cli.main", "query", qs[0], "--store", store, "-k", str(args.k)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
        )
        cli_s = time.perf_counter() - t
        w50, w95 = pct(warm)
        split = {k: float(np.median([x[k] for x in parts])) for k in ("encode_ms", "search_ms", "fetch_ms")}
        record.update(
            warm_p50_s=w50, warm_p95_s=w95, warm_median_ms=split, cold_query_store_s=float(np.median(cold))
        )
        record.update(searcher_open_s=open_s, cli_query_s=cli_s, cli_rc=cli.returncode)
        print(f"\nwarm vs cold ({args.n:,} rows, text query, k={args.k}, exact from the matrix cache)")
        print(
            f"  Searcher.search (warm)        p50 {w50 * 1e3:8.1f} ms   p95 {w95 * 1e3:8.1f} ms   ({len(warm)} queries; "
            f"median encode {split['encode_ms']:.1f} + search {split['search_ms']:.1f} + metadata "
            f"{split['fetch_ms']:.1f} ms; opening it took {open_s:.1f}s, once)"
        )
        print(
            f"  query_store (cold, in process)   {np.median(cold) * 1e3:8.0f} ms median of {len(cold)}   "
            f"ratio cold / warm p50: {np.median(cold) / w50:.0f}x"
        )
        print(
            f"  `ssjdn query` command             {cli_s * 1e3:8.0f} ms wall (imports included; rc {cli.returncode})"
        )

        # 2. the service
        extra = ["--ann-expansion", str(args.ann_expansion)] if args.ann_expansion else []
        service = Service(store, root / "serve-cache", extra)
        vectors = Generator(256).sample(args.queries, np.random.default_rng(7))  # like stored items
        with httpx.Client(base_url=service.url, timeout=120) as c:
            health = c.get("/health").json()
            while health["tables"]["images"]["ann"] == "building":
                time.sleep(0.5)
                health = c.get("/health").json()
            assert health["tables"]["images"]["ann"] == "ready", health
            for text in texts(5, "warm-up"):
                c.get("/search", params={"text": text, "k": args.k})
                c.get("/search", params={"text": text, "k": args.k, "mode": "ann"})
            one, keys = {}, {}
            for mode in ("exact", "ann"):
                lat, keys[mode] = one_client(c, texts(args.queries, f"1-{mode}"), args.k, mode)
                one[mode] = pct(lat)
                keys[mode + "-vec"] = one_client(c, vectors, args.k, mode, vectors=True)[1]
            truth = one_client(c, texts(args.queries, "1-ann"), args.k, "exact")[
                1
            ]  # untimed: encodings cached
        text_recall = recall(keys["ann"], truth, args.k)
        vec_recall = recall(keys["ann-vec"], keys["exact-vec"], args.k)
        table = health["tables"]["images"]
        print(
            f"\nservice over HTTP, 1 client, {len(qs)} text queries, k={args.k} (encoding included; started in "
            f"{service.start_s:.1f}s; {table['exact']}, metadata in {table['metadata']}, ANN {table['ann']})"
        )
        for mode, goal in (("exact", GOALS["exact_p50_s"]), ("ann", GOALS["ann_p50_s"])):
            p50, p95 = one[mode]
            ok = "OK" if p50 < goal else "MISSED"
            print(
                f"  {mode:5}  p50 {p50 * 1e3:7.1f} ms   p95 {p95 * 1e3:7.1f} ms   goal p50 < {goal * 1e3:.0f} ms: {ok}"
            )
            record[f"http_1client_{mode}_p50_s"], record[f"http_1client_{mode}_p95_s"] = p50, p95
        print(
            f"  ANN recall@{args.k} vs exact over HTTP: {vec_recall:.3f} for {len(vectors)} vectors like the stored "
            f"ones, {text_recall:.3f} for the text queries (the untrained text tower puts them far from every "
            "synthetic vector: the hard case for HNSW; --ann-expansion widens the search)"
        )
        record.update(http_ann_recall_vectors=vec_recall, http_ann_recall_texts=text_recall)

        print(
            f"\nservice over HTTP, {args.clients} concurrent clients, {args.load_queries} text queries per run"
        )
        for mode in ("exact", "ann"):
            load_qs = texts(args.load_queries, f"{args.clients}-{mode}")
            before = httpx.get(service.url + "/health").json()["batching"]
            lat, errors, wall, rss = run_clients(service.url, load_qs, args.clients, mode, args.k, service)
            after = httpx.get(service.url + "/health").json()["batching"]
            batch = (after["queries"] - before["queries"]) / max(1, after["batches"] - before["batches"])
            p50, p95 = pct(lat)
            print(
                f"  {mode:5}  p50 {p50 * 1e3:7.1f} ms   p95 {p95 * 1e3:7.1f} ms   {len(lat) / wall:6.1f} queries/s   "
                f"errors {len(errors)}   mean batch {batch:.1f}   server RSS {rss[0]:.0f} -> {rss[-1]:.0f} MB "
                f"(max {max(rss):.0f})"
            )
            record[f"http_{args.clients}clients_{mode}"] = {
                "p50_s": p50,
                "p95_s": p95,
                "qps": len(lat) / wall,
                "errors": len(errors),
                "mean_batch": batch,
                "rss_mb_first": rss[0],
                "rss_mb_last": rss[-1],
                "rss_mb_max": max(rss),
            }
            if errors:
                print("   first error:", errors[0])
        rc = service.stop()
        service = None
        print(f"  SIGTERM: the service stopped with exit status {rc}")
        record["load_average_at_end"] = os.getloadavg()[0]
        print(json.dumps(record))
    finally:
        if service is not None:
            service.proc.kill()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
