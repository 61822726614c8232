"""Optional approximate nearest-neighbour index (usearch HNSW) per store snapshot, with its measured recall.

Layout: `STORE/{model_id}/_ann/{table}/g{generation}/index.usearch` + `meta.json` (written last: the index's
commit point). An index belongs to one generation (its meta.json holds the snapshot's fingerprint); once more
units are committed it is stale and queries fall back to exact search until it is rebuilt. usearch labels
are the snapshot's global rows, so no extra key table is stored.

Recall@k against exact search is measured when the index is built, on held-out queries: caption
embeddings when the version has a caption table (the real text->image workload), otherwise stored image
embeddings with Gaussian noise. It is saved in meta.json and printed with every ANN query.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.fsio import atomic_write_json, commit, full_url, read_json, safe_join, temp_path
from pipelines.search.matrix_cache import load_cache
from pipelines.search.scan import scan_topk
from pipelines.search.topk import normalize
from pipelines.store.reader import Snapshot
from pipelines.store.schema import ANN_DIR, EMBEDDING, StoreError, embeddings_to_numpy

log = logging.getLogger(__name__)

DEFAULTS = {"metric": "ip", "dtype": "f16", "connectivity": 16, "expansion_add": 64, "expansion_search": 128}


def ann_dir(snapshot: Snapshot, table: str = "images") -> str:
    return safe_join(snapshot.version_path, ANN_DIR, table, f"g{snapshot.generation:06d}")


@dataclass
class AnnIndex:
    index: Any  # usearch.index.Index
    meta: dict[str, Any]

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(global rows [Q, k], cosine scores [Q, k]), best first; -1 rows pad short results."""
        q = normalize(queries)
        m = self.index.search(q, k)
        keys = np.full((len(q), k), -1, np.int64)
        dist = np.full((len(q), k), np.inf, np.float32)
        if hasattr(m, "counts"):  # BatchMatches: padded [Q, k] plus the valid count per row
            for i, c in enumerate(np.asarray(m.counts)):
                keys[i, :c] = m.keys[i, :c]
                dist[i, :c] = m.distances[i, :c]
        else:  # a single query gives Matches with only the found items
            keys[0, : len(m.keys)] = m.keys
            dist[0, : len(m.keys)] = m.distances
        return keys, 1.0 - dist


def _new_index(dim: int, params: dict[str, Any]):
    from usearch.index import Index

    return Index(
        ndim=dim,
        metric=params["metric"],
        dtype=params["dtype"],
        connectivity=params["connectivity"],
        expansion_add=params["expansion_add"],
        expansion_search=params["expansion_search"],
    )


def _recall_queries(snapshot: Snapshot, table, matrix_sample, n, rng) -> tuple[np.ndarray, str]:
    if table == "images" and snapshot.rows("captions") > 0:
        caps = snapshot.read_table("captions", columns=[EMBEDDING])
        pick = rng.choice(caps.num_rows, size=min(n, caps.num_rows), replace=False)
        return embeddings_to_numpy(caps.column(EMBEDDING).take(pick)), "caption embeddings"
    noisy = matrix_sample + rng.normal(0, 0.05, matrix_sample.shape).astype(np.float32)
    return normalize(noisy), "stored embeddings + N(0, 0.05) noise"


def build_ann(
    snapshot: Snapshot,
    table: str = "images",
    *,
    k: int = 10,
    recall_queries: int = 200,
    seed: int = 0,
    **params: Any,
) -> AnnIndex:
    """Build, measure and save the ANN index of one snapshot's table; returns it loaded."""
    params = {**DEFAULTS, **params}
    total = snapshot.rows(table)
    if total == 0:
        raise StoreError(
            f"version {snapshot.model_id[:12]} of {snapshot.store_url} has no {table} embeddings to index"
        )
    index = _new_index(snapshot.dim, params)
    rng = np.random.default_rng(seed)
    sample_rows = np.sort(rng.choice(total, size=min(recall_queries, total), replace=False))
    sample = np.empty((len(sample_rows), snapshot.dim), np.float32)
    t0 = time.perf_counter()
    for at, m in snapshot.iter_embeddings(table):
        index.add(np.arange(at, at + len(m), dtype=np.uint64), m)
        hit = (sample_rows >= at) & (sample_rows < at + len(m))
        sample[hit] = m[sample_rows[hit] - at]
    build_s = time.perf_counter() - t0
    queries, query_kind = _recall_queries(snapshot, table, sample, recall_queries, rng)
    ann = AnnIndex(index=index, meta={})
    recall = measure_recall(ann, snapshot, queries, k=k, table=table)
    meta = {
        **snapshot.fingerprint(table),
        "params": params,
        "build_seconds": round(build_s, 2),
        f"recall@{k}": round(recall, 4),
        "recall_k": k,
        "recall_queries": len(queries),
        "recall_query_kind": query_kind,
    }
    ann.meta = meta
    _save(snapshot, table, index, meta)
    log.info(
        "ANN index for %s/%s: %d rows in %.1fs, recall@%d vs exact = %.3f (%d %s)",
        snapshot.model_id[:12],
        table,
        total,
        build_s,
        k,
        recall,
        len(queries),
        query_kind,
    )
    return ann


def measure_recall(
    ann: AnnIndex, snapshot: Snapshot, queries: np.ndarray, *, k: int = 10, table: str = "images"
) -> float:
    """Mean |ANN top-k ∩ exact top-k| / k over `queries` (exact: the matrix cache when there is one, else
    the Parquet scan - the same answer)."""
    q = normalize(queries)
    cache = load_cache(snapshot, table)
    exact, _ = cache.topk(q, k) if cache is not None else scan_topk(snapshot, table, q, k)
    rows, _ = ann.search(q, k)
    found = sum(len(set(e.tolist()) & {int(r) for r in a if r >= 0}) for e, a in zip(exact, rows))
    return found / max(exact.size, 1)  # fewer than k truths per query when the table is tiny


def _save(snapshot: Snapshot, table: str, index, meta: dict[str, Any]) -> None:
    fs = snapshot.fs
    folder = ann_dir(snapshot, table)
    target = posixpath.join(folder, "index.usearch")
    with tempfile.TemporaryDirectory(prefix="ssjdn-ann-") as tmp:
        local = os.path.join(tmp, "index.usearch")
        index.save(local)
        if snapshot.is_local:
            fs.makedirs(folder, exist_ok=True)
        staged = temp_path(target)
        fs.put_file(local, staged)
        commit(fs, staged, target)
    atomic_write_json(fs, posixpath.join(folder, "meta.json"), meta)
    log.info("saved ANN index to %s", full_url(fs, folder))


def load_ann(snapshot: Snapshot, table: str = "images") -> AnnIndex | None:
    """The saved index of exactly this snapshot's table, or None when there is none (or it is stale)."""
    from usearch.index import Index

    folder = ann_dir(snapshot, table)
    meta = read_json(snapshot.fs, posixpath.join(folder, "meta.json"))
    if meta is None:
        return None
    fingerprint = snapshot.fingerprint(table)
    # Indexes built before checksums were recorded name only their generation and row count.
    keys = fingerprint if "sha256" in meta else ("generation", "rows")
    if any(meta.get(key) != fingerprint[key] for key in keys):
        return None
    path = posixpath.join(folder, "index.usearch")
    if snapshot.is_local:
        index = Index.restore(path, view=False)
    else:
        with tempfile.TemporaryDirectory(prefix="ssjdn-ann-") as tmp:
            local = os.path.join(tmp, "index.usearch")
            snapshot.fs.get_file(path, local)
            index = Index.restore(local, view=False)
    if index is None or len(index) != meta["rows"]:
        raise StoreError(
            f"ANN index at {full_url(snapshot.fs, folder)} is unreadable or incomplete; rebuild it"
        )
    index.expansion_search = meta["params"]["expansion_search"]
    return AnnIndex(index=index, meta=meta)
