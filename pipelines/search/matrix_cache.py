"""Exact-search matrix cache: one snapshot's embeddings as a contiguous float32 matrix on local disk, memory-mapped.

Scanning Parquet decodes every embedding on every query (seconds at 1M x 512). This cache pays that once per
generation: the first exact query on a large table writes the matrix (`.npy`, row r = global row r of the
snapshot), streamed from the snapshot (which verifies every file's checksum on the way); later queries
memory-map it and score it in blocks, bounded by page cache rather than process memory.

Where it lives (always a local folder - it is derived data, rebuilt from the store whenever missing):
    local store:   STORE/{model_id}/_flat/{table}/g{generation}/embeddings.npy + meta.json
    remote store:  $SSJDN_CACHE_DIR (default ~/.cache/ssjdn)/flat/{sha256(store url)[:16]}/{model_id}/...
`meta.json` is written last (the commit point) and holds the snapshot's fingerprint (generation, rows, files
and their checksums); a cache that does not match the current snapshot is ignored, and older generations are
removed when a new one is built.
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

from pipelines.search.topk import BlockTopK
from pipelines.store.reader import Snapshot
from pipelines.store.schema import MATRIX_CACHE_DIR, StoreError

log = logging.getLogger(__name__)

# Below this many rows the Parquet scan takes well under a second: not worth a copy on disk.
MIN_ROWS = 100_000
BLOCK_ROWS = 131_072  # rows per matrix-product block: scores stay small, BLAS stays efficient


def cache_root(snapshot: Snapshot, table: str) -> Path:
    """The folder that holds this version's caches of `table` (one sub-folder per generation)."""
    if snapshot.is_local:
        return Path(snapshot.version_path) / MATRIX_CACHE_DIR / table
    base = Path(os.environ.get("SSJDN_CACHE_DIR") or Path.home() / ".cache" / "ssjdn")
    store_id = hashlib.sha256(snapshot.store_url.rstrip("/").encode()).hexdigest()[:16]
    return base / "flat" / store_id / snapshot.model_id / table


@dataclass
class MatrixCache:
    """A committed cache: the memory-mapped matrix ([rows, dim] float32, read-only) and where it lives."""

    matrix: np.ndarray
    folder: Path

    def topk(
        self, queries: np.ndarray, k: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(global rows [Q, k'], scores [Q, k']) best first for normalised `queries`; `rows` (sorted global
        rows, as a filter gives) restricts the search to those rows."""
        qt = np.ascontiguousarray(queries.T)
        top = BlockTopK(len(queries), k)
        n = len(self.matrix) if rows is None else len(rows)
        for start in range(0, n, BLOCK_ROWS):
            if rows is None:
                ids = np.arange(start, min(start + BLOCK_ROWS, n))
                block = self.matrix[start : start + BLOCK_ROWS]
            else:
                ids = rows[start : start + BLOCK_ROWS]
                block = self.matrix[ids]
            top.add((block @ qt).T, ids)
        return top.result()


def load_cache(snapshot: Snapshot, table: str) -> MatrixCache | None:
    """The committed cache of exactly this snapshot's table, or None."""
    folder = cache_root(snapshot, table) / f"g{snapshot.generation:06d}"
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):  # missing, unreadable, or its folder cannot exist: no cache
        return None
    if meta != snapshot.fingerprint(table):
        return None
    matrix = np.load(folder / "embeddings.npy", mmap_mode="r")
    if matrix.shape != (meta["rows"], meta["dim"]) or matrix.dtype != np.float32:
        log.warning("exact-search cache at %s does not match its meta.json; ignoring it", folder)
        return None
    return MatrixCache(matrix, folder)


def build_cache(snapshot: Snapshot, table: str) -> MatrixCache:
    """Write this snapshot's matrix (temp name, rename, then meta.json) and drop older generations."""
    meta = snapshot.fingerprint(table)
    root = cache_root(snapshot, table)
    folder = root / f"g{snapshot.generation:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".embeddings.{os.getpid()}.npy"
    log.info(
        "building the exact-search cache of %s/%s (%d x %d float32, %.2f GB; once per store generation) at %s",
        snapshot.model_id[:12],
        table,
        meta["rows"],
        meta["dim"],
        meta["rows"] * meta["dim"] * 4 / 1e9,
        folder,
    )
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(meta["rows"], meta["dim"]))
        for start, m in snapshot.iter_embeddings(table):
            if start + len(m) > meta["rows"]:
                raise StoreError(
                    f"version {snapshot.model_id[:12]}: {table} files hold more rows than the manifest lists"
                )
            out[start : start + len(m)] = m
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
    return MatrixCache(np.load(folder / "embeddings.npy", mmap_mode="r"), folder)


def get_cache(snapshot: Snapshot, table: str, *, build: bool | None = None) -> MatrixCache | None:
    """The cache to search with: the committed one, else built now when `build` (None: when the table has at
    least MIN_ROWS rows), else None (the caller scans Parquet)."""
    cache = load_cache(snapshot, table)
    if cache is not None:
        return cache
    rows = snapshot.rows(table)
    if build is None:
        build = rows >= MIN_ROWS
    if not build:
        return None
    root = cache_root(snapshot, table)
    need = rows * snapshot.dim * 4
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
        return build_cache(snapshot, table)
    except OSError as exc:  # a read-only store mount, a full disk: the scan gives the same answer
        log.warning("could not build the exact-search cache at %s (%s); scanning Parquet instead", root, exc)
        return None
