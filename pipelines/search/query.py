"""Exact cosine top-k over the committed embeddings of a store version, and the query entry point.

Embeddings are L2-normalised when written, so cosine similarity is a dot product. Two ways to the same
result: the version's memory-mapped matrix (`pipelines.flat`, the default on large tables) or a scan of
the committed Parquet files in bounded batches (only the `embedding` column and the columns a filter needs;
memory about `batch_rows * D * 4` bytes plus the running top-k). Metadata is fetched afterwards for the k
winners only.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.fsio import is_local
from pipelines.search.where import columns_of, parse_where, to_arrow
from pipelines.store.store import EmbeddingStore, Manifest, StoreError, embeddings_to_numpy

log = logging.getLogger(__name__)

DEFAULT_BATCH_ROWS = 32_768
SCAN_THREADS = min(4, os.cpu_count() or 1)
META = ("key", "source", "split", "class", "lat", "lon")
CAPTION_META = ("image_key", "caption_index", "caption")


@dataclass
class Hit:
    rank: int
    score: float
    key: str
    source: str
    split: str | None = None
    class_name: str | None = None
    lat: float | None = None
    lon: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["class"] = out.pop("class_name")
        extra = out.pop("extra")
        out.update(extra)
        return out


def normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError("query vector is zero or not finite")
    return vectors / norms


class _TopK:
    """Running top-k per query over (score, position) with a bounded buffer."""

    def __init__(self, n_queries: int, k: int) -> None:
        self.k = k
        self.scores = [np.empty(0, np.float32) for _ in range(n_queries)]
        self.pos = [np.empty((0, 2), np.int64) for _ in range(n_queries)]

    def update(self, scores: np.ndarray, file_idx: int, rows: np.ndarray) -> None:
        # scores: [n_rows, n_queries]
        k = min(self.k, scores.shape[0])
        if k == 0:
            return
        for q in range(scores.shape[1]):
            col = scores[:, q]
            top = np.argpartition(-col, k - 1)[:k] if k < len(col) else np.arange(len(col))
            s = np.concatenate([self.scores[q], col[top]])
            p = np.concatenate([self.pos[q], np.stack([np.full(len(top), file_idx), rows[top]], axis=1)])
            if len(s) > self.k:
                keep = np.argpartition(-s, self.k - 1)[: self.k]
                s, p = s[keep], p[keep]
            self.scores[q], self.pos[q] = s, p

    def merge(self, other: _TopK) -> None:
        for q in range(len(self.scores)):
            s = np.concatenate([self.scores[q], other.scores[q]])
            p = np.concatenate([self.pos[q], other.pos[q]])
            if len(s) > self.k:
                keep = np.argpartition(-s, self.k - 1)[: self.k]
                s, p = s[keep], p[keep]
            self.scores[q], self.pos[q] = s, p

    def result(self, q: int) -> list[tuple[float, int, int]]:
        # Stable order: score descending, then file and row ascending (ties resolved deterministically).
        items = [(float(s), int(f), int(r)) for s, (f, r) in zip(self.scores[q], self.pos[q])]
        return sorted(items, key=lambda t: (-t[0], t[1], t[2]))


def _iter_file_batches(store: EmbeddingStore, path: str, columns: list[str], batch_rows: int):
    if is_local(store.fs):  # memory-mapped: no copy through a Python file object
        pf = pq.ParquetFile(path, memory_map=True)
        yield from pf.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False)
        return
    with store.fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        yield from pf.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False)


def exact_search(
    store: EmbeddingStore,
    manifest: Manifest,
    queries: np.ndarray,
    *,
    k: int = 10,
    where: str | None = None,
    table: str = "images",
    batch_rows: int = DEFAULT_BATCH_ROWS,
    cache: bool | None = None,
) -> list[list[Hit]]:
    """Top-k hits per query vector (rows of `queries`, [Q, D] or [D]), best first."""
    files, ranked = exact_topk(
        store, manifest, queries, k=k, where=where, table=table, batch_rows=batch_rows, cache=cache
    )
    return [_hits(store, files, r, table) for r in ranked]


def exact_topk(
    store: EmbeddingStore,
    manifest: Manifest,
    queries: np.ndarray,
    *,
    k: int = 10,
    where: str | None = None,
    table: str = "images",
    batch_rows: int = DEFAULT_BATCH_ROWS,
    cache: bool | None = None,
) -> tuple[list[str], list[list[tuple[float, int, int]]]]:
    """(committed files, per query the top-k as (score, file index, row)), best first.

    `cache`: search the version's memory-mapped matrix (`pipelines.flat`) - True builds it when missing,
    None (default) uses it when present and builds it for tables of at least `flat.MIN_ROWS` rows, False
    always scans the Parquet files.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    q = normalize(queries)
    if q.shape[1] != manifest.dim:
        raise StoreError(
            f"query has dimension {q.shape[1]} but version {manifest.model_id[:12]} stores {manifest.dim}-d embeddings"
        )
    files = store.committed_files(manifest, table)
    if not files:
        raise StoreError(
            f"version {manifest.model_id[:12]} of {store.url} has no committed {table} embeddings"
        )
    tree = parse_where(where, table) if where else None
    expr = to_arrow(tree) if tree is not None else None
    filter_columns = sorted(columns_of(tree)) if tree is not None else []
    columns = ["embedding", *filter_columns]
    if cache is not False:
        from pipelines.search.matrix_cache import get_cache

        flat = get_cache(store, manifest, table, build=cache)
        if flat is not None:
            rows = None
            if expr is not None:  # only the filter's columns are read, not the embeddings
                rows = _matching_rows(store, files, expr, filter_columns, batch_rows)
            return files, _ranked_from_global(manifest, table, *flat.topk(q, k, rows))
    qt = np.ascontiguousarray(q.T)

    def scan(file_idx: int) -> _TopK:
        top = _TopK(len(q), k)
        offset = 0
        for batch in _iter_file_batches(store, files[file_idx], columns, batch_rows):
            n = batch.num_rows
            rows = np.arange(offset, offset + n)
            offset += n
            if expr is not None:
                tbl = _filter_batch(batch, rows, expr)
                if tbl.num_rows == 0:
                    continue
                emb, rows = tbl.column("embedding"), tbl.column("_row").to_numpy()
            else:
                emb = batch.column("embedding")
            top.update(embeddings_to_numpy(emb) @ qt, file_idx, rows)
        return top

    # Files are scanned concurrently: Parquet decoding and the matrix product release the GIL.
    top = _TopK(len(q), k)
    workers = max(1, min(SCAN_THREADS, len(files)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for part in pool.map(scan, range(len(files))):
            top.merge(part)
    return files, [top.result(i) for i in range(len(q))]


def _filter_batch(batch: pa.RecordBatch, rows: np.ndarray, expr) -> pa.Table:
    """The rows of `batch` that pass `expr`, with their row numbers in the file as column `_row`."""
    return pa.Table.from_batches([batch]).append_column("_row", pa.array(rows)).filter(expr)


def _matching_rows(
    store: EmbeddingStore, files: list[str], expr, columns: list[str], batch_rows: int
) -> np.ndarray:
    """Global row numbers (manifest file order) that pass the filter, reading only `columns` of each file."""

    def scan(path: str) -> tuple[np.ndarray, int]:
        found, offset = [], 0
        for batch in _iter_file_batches(store, path, columns, batch_rows):
            rows = np.arange(offset, offset + batch.num_rows)
            offset += batch.num_rows
            found.append(_filter_batch(batch, rows, expr).column("_row").to_numpy())
        return (np.concatenate(found) if found else np.empty(0, np.int64)), offset

    with ThreadPoolExecutor(max_workers=max(1, min(SCAN_THREADS, len(files)))) as pool:
        parts = list(pool.map(scan, files))
    out, base = [], 0
    for rows, n in parts:
        out.append(rows + base)
        base += n
    return np.concatenate(out).astype(np.int64) if out else np.empty(0, np.int64)


def _ranked_from_global(
    manifest: Manifest, table: str, rows: np.ndarray, scores: np.ndarray
) -> list[list[tuple[float, int, int]]]:
    """[Q, k] global rows and scores -> per query [(score, file index, row in file)]."""
    offsets = manifest.row_offsets(table)
    out = []
    for qr, qs in zip(rows, scores):
        files = np.searchsorted(offsets, qr, side="right") - 1
        out.append([(float(s), int(f), int(r - offsets[f])) for s, f, r in zip(qs, files, qr)])
    return out


def _hits(
    store: EmbeddingStore, files: list[str], ranked: list[tuple[float, int, int]], table: str
) -> list[Hit]:
    """Fetch the metadata of the winners, reading only the files that hold them."""
    wanted: dict[int, list[int]] = {}
    for _, f, r in ranked:
        wanted.setdefault(f, []).append(r)
    meta: dict[tuple[int, int], dict[str, Any]] = {}
    cols = list(META) + (list(CAPTION_META) if table == "captions" else [])
    for f, rows in wanted.items():
        with store.fs.open(files[f], "rb") as fh:
            tbl = pq.read_table(fh, columns=cols).take(pa.array(rows))
        for r, rec in zip(rows, tbl.to_pylist()):
            meta[(f, r)] = rec
    hits = []
    for rank, (score, f, r) in enumerate(ranked, start=1):
        rec = meta[(f, r)]
        extra = {c: rec[c] for c in CAPTION_META if c in rec}
        hits.append(
            Hit(
                rank=rank,
                score=score,
                key=rec["key"],
                source=rec["source"],
                split=rec["split"],
                class_name=rec["class"],
                lat=rec["lat"],
                lon=rec["lon"],
                extra=extra,
            )
        )
    return hits


@dataclass
class QueryResult:
    query: str
    model_id: str
    mode: str  # "exact" | "ann"
    hits: list[Hit]
    seconds: float
    ann: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "model_id": self.model_id,
            "mode": self.mode,
            "seconds": round(self.seconds, 4),
            "ann": self.ann,
            "hits": [h.to_json() for h in self.hits],
        }


def encode_query(
    manifest: Manifest, *, text=None, image=None, checkpoint=None, storage_options=None
) -> np.ndarray:
    """Encode a caption or an image (path/URL) with the version's own checkpoint (sha256 checked)."""
    from pipelines.embed.encoders import CheckpointError, read_checkpoint, restore_encoders

    url = checkpoint or manifest.model.get("checkpoint")
    if not url:
        raise StoreError(f"version {manifest.model_id[:12]} records no checkpoint; pass --checkpoint")
    blob = read_checkpoint(url, storage_options)
    if blob.model_id != manifest.model_id:
        raise CheckpointError(
            f"checkpoint {blob.url} is model {blob.model_id[:12]}, but the store version is "
            f"{manifest.model_id[:12]}: queries must be encoded by the model that embedded the store"
        )
    enc = restore_encoders(blob)
    if text is not None:
        return enc.encode_texts([text])[0]
    from ssjdn.data.images import decode_image, read_image_bytes

    pixels = enc.transform()(decode_image(read_image_bytes(image), str(image))).numpy()[None]
    return enc.encode_pixels(pixels)[0]


def query_store(
    store_url: str,
    *,
    text: str | None = None,
    image: str | None = None,
    vector: np.ndarray | None = None,
    k: int = 10,
    model_id: str | None = None,
    where: str | None = None,
    table: str = "images",
    ann: bool = False,
    cache: bool | None = None,
    checkpoint: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> QueryResult:
    """Resolve the version, encode the query, search (exact, or ANN when asked and possible)."""
    import time

    store = EmbeddingStore(store_url, storage_options)
    manifest = store.manifest(model_id)  # clear StoreError for an empty store / unknown model_id
    if where:
        parse_where(where, table)  # reject a bad filter before loading any model
    if manifest.rows(table) == 0:
        raise StoreError(
            f"version {manifest.model_id[:12]} of {store.url} has no committed {table} embeddings"
        )
    if vector is None:
        vector = encode_query(
            manifest, text=text, image=image, checkpoint=checkpoint, storage_options=storage_options
        )
    label = text if text is not None else f"image {image}" if image is not None else "vector"
    t0 = time.perf_counter()
    if ann and where:
        log.info("--where is applied by exact search only; not using the ANN index for this query")
        ann = False
    if ann:
        from pipelines.search.ann import build_ann, load_ann

        index = load_ann(store, manifest, table)
        if index is None:
            log.info("no current ANN index for %s/%s: building it", manifest.model_id[:12], table)
            index = build_ann(store, manifest, table)
        t0 = time.perf_counter()
        rows, scores = index.search(vector, k)
        hits = index.hits(store, rows[0], scores[0], table)
        return QueryResult(label, manifest.model_id, "ann", hits, time.perf_counter() - t0, index.meta)
    hits = exact_search(store, manifest, vector, k=k, where=where, table=table, cache=cache)[0]
    return QueryResult(label, manifest.model_id, "exact", hits, time.perf_counter() - t0)
