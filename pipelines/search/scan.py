"""Exact search by scanning a snapshot's Parquet files: bounded memory, every query decodes the whole table.

Files are scanned concurrently (Parquet decoding and the matrix product release the GIL), each in batches of
`batch_rows` rows: only the `embedding` column and the columns a filter needs are read, so memory stays about
`threads * batch_rows * D * 4` bytes plus the running top-k, whatever the store size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.search.topk import BlockTopK
from pipelines.store.reader import DEFAULT_BATCH_ROWS, CommittedFile, Snapshot
from pipelines.store.schema import EMBEDDING, embeddings_to_numpy

SCAN_THREADS = min(4, os.cpu_count() or 1)
ROW = "_global_row"  # the column a filtered batch carries its global rows in


def _with_rows(batch: pa.RecordBatch, start: int) -> pa.Table:
    rows = pa.array(np.arange(start, start + batch.num_rows, dtype=np.int64))
    return pa.Table.from_batches([batch]).append_column(ROW, rows)


def _per_file(snapshot: Snapshot, table: str, work):
    files = snapshot.table_files(table)
    with ThreadPoolExecutor(max_workers=max(1, min(SCAN_THREADS, len(files)))) as pool:
        return list(pool.map(work, files))


def scan_topk(
    snapshot: Snapshot,
    table: str,
    queries: np.ndarray,
    k: int,
    *,
    filter: pc.Expression | None = None,
    filter_columns: Sequence[str] = (),
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """(global rows [Q, k'], scores [Q, k']) best first for normalised `queries` [Q, D]; `filter` (a pyarrow
    expression over `filter_columns`) restricts the rows searched."""
    qt = np.ascontiguousarray(queries.T)
    columns = [EMBEDDING, *filter_columns]

    def scan(file: CommittedFile) -> BlockTopK:
        top = BlockTopK(len(queries), k)
        for start, batch in snapshot.iter_file(file, columns, batch_rows):
            if filter is None:
                emb, rows = batch.column(EMBEDDING), np.arange(start, start + batch.num_rows)
            else:
                passed = _with_rows(batch, start).filter(filter)
                if passed.num_rows == 0:
                    continue
                emb, rows = passed.column(EMBEDDING), passed.column(ROW).to_numpy()
            top.add((embeddings_to_numpy(emb) @ qt).T, rows)
        return top

    top = BlockTopK(len(queries), k)
    for part in _per_file(snapshot, table, scan):
        top.merge(part)
    return top.result()


def matching_rows(
    snapshot: Snapshot,
    table: str,
    filter: pc.Expression,
    columns: Sequence[str],
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> np.ndarray:
    """Sorted global rows that pass `filter`, reading only `columns` (the filter's) of each file."""

    def scan(file: CommittedFile) -> np.ndarray:
        found = [
            _with_rows(batch, start).filter(filter).column(ROW).to_numpy()
            for start, batch in snapshot.iter_file(file, columns, batch_rows)
        ]
        return np.concatenate(found) if found else np.empty(0, np.int64)

    parts = _per_file(snapshot, table, scan)
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)
