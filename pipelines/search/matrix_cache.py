"""Exact-search cache: one version's embeddings as a contiguous float32 matrix on local disk, memory-mapped.

Exact search over Parquet decodes every embedding on every query (seconds at 1M x 512). This cache pays that
once per manifest generation: the first exact query on a large table writes the matrix (`.npy`, rows in
manifest file order, so row r is global row r of the committed files); later queries memory-map it and do a
blocked matrix product, bounded by page cache rather than process memory.

Where it lives (always a local folder - it is derived data, rebuilt from the store whenever missing):
    local store:   STORE/{model_id}/_flat/{table}/g{generation}/embeddings.npy + meta.json
    remote store:  $SSJDN_CACHE_DIR (default ~/.cache/ssjdn)/flat/{sha256(store url)[:16]}/{model_id}/...
`meta.json` is written last (the commit point) and names the generation, row count and files it was built
from; a cache that does not match the current manifest is ignored, and older generations are removed when
a new one is built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.fsio import is_local
from pipelines.store.store import EmbeddingStore, Manifest, StoreError, embeddings_to_numpy

log = logging.getLogger(__name__)

# Below this many rows the Parquet scan takes well under a second: not worth a copy on disk.
MIN_ROWS = 100_000
BLOCK_ROWS = 131_072  # rows per matrix-product block: scores stay small, BLAS stays efficient


def cache_root(store: EmbeddingStore, manifest: Manifest, table: str) -> Path:
    """The folder that holds this version's caches of `table` (one sub-folder per generation)."""
    if is_local(store.fs):
        return Path(store.version_path(manifest.model_id)) / "_flat" / table
    base = Path(os.environ.get("SSJDN_CACHE_DIR") or Path.home() / ".cache" / "ssjdn")
    store_id = hashlib.sha256(store.url.rstrip("/").encode()).hexdigest()[:16]
    return base / "flat" / store_id / manifest.model_id / table


def _expected_meta(manifest: Manifest, table: str) -> dict:
    return {
        "model_id": manifest.model_id,
        "generation": manifest.generation,
        "table": table,
        "rows": manifest.rows(table),
        "dim": manifest.dim,
        "files": [f["path"] for f in manifest.files if f["table"] == table],
    }


@dataclass
class FlatCache:
    """A committed cache: the memory-mapped matrix ([rows, dim] float32, read-only) and where it lives."""

    matrix: np.ndarray
    folder: Path

    def topk(
        self, queries: np.ndarray, k: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(global rows [Q, k'], scores [Q, k']) best first, k' = min(k, candidates); `rows` restricts the
        search to those global rows (sorted), as a filter does."""
        qt = np.ascontiguousarray(queries.T)
        n = len(self.matrix) if rows is None else len(rows)
        best_s = np.full((len(queries), 0), -np.inf, np.float32)
        best_r = np.empty((len(queries), 0), np.int64)
        for start in range(0, n, BLOCK_ROWS):
            if rows is None:
                ids = np.arange(start, min(start + BLOCK_ROWS, n))
                block = self.matrix[start : start + BLOCK_ROWS]
            else:
                ids = rows[start : start + BLOCK_ROWS]
                block = self.matrix[ids]
            scores = (block @ qt).T  # [Q, block]
            kk = min(k, scores.shape[1])
            part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            best_s = np.concatenate([best_s, np.take_along_axis(scores, part, axis=1)], axis=1)
            best_r = np.concatenate([best_r, ids[part]], axis=1)
            if best_s.shape[1] > k:
                keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
                best_s, best_r = (
                    np.take_along_axis(best_s, keep, axis=1),
                    np.take_along_axis(best_r, keep, axis=1),
                )
        # Score descending, then row ascending: the same tie order as the Parquet scan.
        order = np.lexsort((best_r, -best_s), axis=1) if best_s.size else np.empty_like(best_r)
        return np.take_along_axis(best_r, order, axis=1), np.take_along_axis(best_s, order, axis=1)


def load_cache(store: EmbeddingStore, manifest: Manifest, table: str) -> FlatCache | None:
    """The committed cache of exactly this manifest generation, or None."""
    folder = cache_root(store, manifest, table) / f"g{manifest.generation:06d}"
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):  # missing, unreadable, or its folder cannot exist: no cache
        return None
    if meta != _expected_meta(manifest, table):
        return None
    matrix = np.load(folder / "embeddings.npy", mmap_mode="r")
    if matrix.shape != (meta["rows"], meta["dim"]) or matrix.dtype != np.float32:
        log.warning("exact-search cache at %s does not match its meta.json; ignoring it", folder)
        return None
    return FlatCache(matrix, folder)


def build_cache(store: EmbeddingStore, manifest: Manifest, table: str) -> FlatCache:
    """Write this generation's matrix (temp name, rename, then meta.json) and drop older generations."""
    from pipelines.search.query import DEFAULT_BATCH_ROWS, _iter_file_batches

    meta = _expected_meta(manifest, table)
    root = cache_root(store, manifest, table)
    folder = root / f"g{manifest.generation:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".embeddings.{os.getpid()}.npy"
    log.info(
        "building the exact-search cache of %s/%s (%d x %d float32, %.2f GB; once per store generation) at %s",
        manifest.model_id[:12],
        table,
        meta["rows"],
        meta["dim"],
        meta["rows"] * meta["dim"] * 4 / 1e9,
        folder,
    )
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(meta["rows"], meta["dim"]))
        at = 0
        for path in store.committed_files(manifest, table):
            for batch in _iter_file_batches(store, path, ["embedding"], DEFAULT_BATCH_ROWS):
                m = embeddings_to_numpy(batch.column("embedding"))
                if at + len(m) > meta["rows"]:
                    raise StoreError(
                        f"{path} holds more rows than the manifest of {manifest.model_id[:12]} lists"
                    )
                out[at : at + len(m)] = m
                at += len(m)
        if at != meta["rows"]:
            raise StoreError(
                f"manifest of {manifest.model_id[:12]} lists {meta['rows']} {table} rows, files hold {at}"
            )
        out.flush()
        del out
        os.replace(tmp, folder / "embeddings.npy")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    meta_tmp = folder / f".meta.{os.getpid()}.json"
    meta_tmp.write_text(json.dumps(meta))
    os.replace(meta_tmp, folder / "meta.json")
    for old in root.iterdir():
        if old.is_dir() and old.name.startswith("g") and old != folder:
            shutil.rmtree(old, ignore_errors=True)  # a stale generation: nothing will read it again
    return FlatCache(np.load(folder / "embeddings.npy", mmap_mode="r"), folder)


def get_cache(
    store: EmbeddingStore, manifest: Manifest, table: str, *, build: bool | None = None
) -> FlatCache | None:
    """The cache to search with: the committed one, else built now when `build` (None: when the table has at
    least MIN_ROWS rows), else None (the caller scans Parquet)."""
    cache = load_cache(store, manifest, table)
    if cache is not None:
        return cache
    if build is None:
        build = manifest.rows(table) >= MIN_ROWS
    if not build:
        return None
    root = cache_root(store, manifest, table)
    need = manifest.rows(table) * manifest.dim * 4
    try:
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        if free < 2 * need:  # leave room for everything else on that disk
            log.warning(
                "not building the exact-search cache at %s: it needs %.2f GB and the disk has %.2f GB free; "
                "scanning Parquet instead",
                root,
                need / 1e9,
                free / 1e9,
            )
            return None
        return build_cache(store, manifest, table)
    except OSError as exc:  # a read-only store mount, a full disk: the scan gives the same answer
        log.warning("could not build the exact-search cache at %s (%s); scanning Parquet instead", root, exc)
        return None
