"""Optional approximate nearest-neighbour index (usearch HNSW) per store version, with its measured recall.

Layout: `STORE/{model_id}/_ann/{table}/g{generation}/index.usearch` + `meta.json` (written last: the index's
commit point). An index belongs to one manifest generation; once more units are committed it is stale and
queries fall back to exact search until it is rebuilt. usearch labels are global row numbers in manifest
file order, so no extra key table is stored.

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

from pipelines.fsio import atomic_write_json, commit, full_url, is_local, read_json, safe_join, temp_path
from pipelines.search.query import DEFAULT_BATCH_ROWS, Hit, _hits, _iter_file_batches, exact_topk, normalize
from pipelines.store.store import EmbeddingStore, Manifest, StoreError, embeddings_to_numpy

log = logging.getLogger(__name__)

DEFAULTS = {"metric": "ip", "dtype": "f16", "connectivity": 16, "expansion_add": 64, "expansion_search": 128}


def ann_dir(store: EmbeddingStore, manifest: Manifest, table: str = "images") -> str:
    return safe_join(store.version_path(manifest.model_id), "_ann", table, f"g{manifest.generation:06d}")


@dataclass
class AnnIndex:
    index: Any  # usearch.index.Index
    meta: dict[str, Any]
    files: list[str]
    offsets: np.ndarray  # global row -> file index by searchsorted

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

    def position(self, row: int) -> tuple[int, int]:
        f = int(np.searchsorted(self.offsets, row, side="right") - 1)
        return f, int(row - self.offsets[f])

    def hits(
        self, store: EmbeddingStore, rows: np.ndarray, scores: np.ndarray, table: str = "images"
    ) -> list[Hit]:
        ranked = [(float(s), *self.position(int(r))) for r, s in zip(rows, scores) if r >= 0]
        return _hits(store, self.files, ranked, table)


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


def _recall_queries(store, manifest, table, matrix_sample, n, rng) -> tuple[np.ndarray, str]:
    if table == "images" and manifest.rows("captions") > 0:
        caps = store.read_table(manifest, "captions", columns=["embedding"])
        pick = rng.choice(caps.num_rows, size=min(n, caps.num_rows), replace=False)
        return embeddings_to_numpy(caps.column("embedding").take(pick)), "caption embeddings"
    noisy = matrix_sample + rng.normal(0, 0.05, matrix_sample.shape).astype(np.float32)
    return normalize(noisy), "stored embeddings + N(0, 0.05) noise"


def build_ann(
    store: EmbeddingStore,
    manifest: Manifest,
    table: str = "images",
    *,
    k: int = 10,
    recall_queries: int = 200,
    seed: int = 0,
    **params: Any,
) -> AnnIndex:
    """Build, measure and save the ANN index of one version's table; returns it loaded."""
    params = {**DEFAULTS, **params}
    files = store.committed_files(manifest, table)
    total = manifest.rows(table)
    if total == 0:
        raise StoreError(
            f"version {manifest.model_id[:12]} of {store.url} has no {table} embeddings to index"
        )
    index = _new_index(manifest.dim, params)
    rng = np.random.default_rng(seed)
    sample_rows = np.sort(rng.choice(total, size=min(recall_queries, total), replace=False))
    sample = np.empty((len(sample_rows), manifest.dim), np.float32)
    t0 = time.perf_counter()
    at = 0
    for path in files:
        for batch in _iter_file_batches(store, path, ["embedding"], DEFAULT_BATCH_ROWS):
            m = embeddings_to_numpy(batch.column("embedding"))
            index.add(np.arange(at, at + len(m), dtype=np.uint64), m)
            hit = (sample_rows >= at) & (sample_rows < at + len(m))
            sample[hit] = m[sample_rows[hit] - at]
            at += len(m)
    build_s = time.perf_counter() - t0
    queries, query_kind = _recall_queries(store, manifest, table, sample, recall_queries, rng)
    ann = AnnIndex(index=index, meta={}, files=files, offsets=manifest.row_offsets(table))
    recall = measure_recall(ann, store, manifest, queries, k=k, table=table)
    meta = {
        "model_id": manifest.model_id,
        "generation": manifest.generation,
        "table": table,
        "rows": int(total),
        "params": params,
        "build_seconds": round(build_s, 2),
        f"recall@{k}": round(recall, 4),
        "recall_k": k,
        "recall_queries": len(queries),
        "recall_query_kind": query_kind,
    }
    ann.meta = meta
    _save(store, manifest, table, index, meta)
    log.info(
        "ANN index for %s/%s: %d rows in %.1fs, recall@%d vs exact = %.3f (%d %s)",
        manifest.model_id[:12],
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
    ann: AnnIndex, store, manifest, queries: np.ndarray, *, k: int = 10, table="images"
) -> float:
    """Mean |ANN top-k ∩ exact top-k| / k over `queries` (exact = the streaming Parquet scan)."""
    _, exact = exact_topk(store, manifest, queries, k=k, table=table)
    rows, _ = ann.search(queries, k)
    found = possible = 0
    for q, ranked in enumerate(exact):
        truth = {int(ann.offsets[f]) + r for _, f, r in ranked}  # fewer than k when the table is tiny
        found += len(truth & {int(r) for r in rows[q] if r >= 0})
        possible += len(truth)
    return found / max(possible, 1)


def _save(store: EmbeddingStore, manifest: Manifest, table: str, index, meta: dict[str, Any]) -> None:
    fs = store.fs
    folder = ann_dir(store, manifest, table)
    target = posixpath.join(folder, "index.usearch")
    with tempfile.TemporaryDirectory(prefix="ssjdn-ann-") as tmp:
        local = os.path.join(tmp, "index.usearch")
        index.save(local)
        if is_local(fs):
            fs.makedirs(folder, exist_ok=True)
        staged = temp_path(target)
        fs.put_file(local, staged)
        commit(fs, staged, target)
    atomic_write_json(fs, posixpath.join(folder, "meta.json"), meta)
    log.info("saved ANN index to %s", full_url(fs, folder))


def load_ann(store: EmbeddingStore, manifest: Manifest, table: str = "images") -> AnnIndex | None:
    """The saved index of this exact manifest generation, or None when there is none (or it is stale)."""
    from usearch.index import Index

    folder = ann_dir(store, manifest, table)
    meta = read_json(store.fs, posixpath.join(folder, "meta.json"))
    if meta is None:
        return None
    if meta.get("generation") != manifest.generation or meta.get("rows") != manifest.rows(table):
        return None
    path = posixpath.join(folder, "index.usearch")
    if is_local(store.fs):
        index = Index.restore(path, view=False)
    else:
        with tempfile.TemporaryDirectory(prefix="ssjdn-ann-") as tmp:
            local = os.path.join(tmp, "index.usearch")
            store.fs.get_file(path, local)
            index = Index.restore(local, view=False)
    if index is None or len(index) != meta["rows"]:
        raise StoreError(f"ANN index at {full_url(store.fs, folder)} is unreadable or incomplete; rebuild it")
    index.expansion_search = meta["params"]["expansion_search"]
    return AnnIndex(
        index=index,
        meta=meta,
        files=store.committed_files(manifest, table),
        offsets=manifest.row_offsets(table),
    )
