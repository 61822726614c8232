"""Exact top-k over one snapshot, without a model: the engines `Searcher` and the benchmarks share. The matrix
cache on large tables (built by the first query that needs it), else a streamed scan of the Parquet files; both
give the same ranking (score descending, then global row)."""

from __future__ import annotations

import numpy as np

from pipelines.search.matrix_cache import get_cache
from pipelines.search.results import Hit, hits
from pipelines.search.scan import matching_rows, scan_topk
from pipelines.search.topk import normalize
from pipelines.search.where import columns_of, parse_where, to_arrow
from pipelines.store.reader import DEFAULT_BATCH_ROWS, Snapshot
from pipelines.store.schema import StoreError


def exact_topk(
    snapshot: Snapshot,
    queries: np.ndarray,
    *,
    k: int = 10,
    where: str | None = None,
    table: str = "images",
    cache: bool | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """(global rows [Q, k'], scores [Q, k']) best first for the query vectors ([Q, D] or [D]).

    `cache`: search the snapshot's memory-mapped matrix (pipelines.search.matrix_cache) - True builds it when
    missing, None (default) uses it when present and builds it for tables of at least `MIN_ROWS` rows, False
    always scans the Parquet files. Both give the same result.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    q = normalize(queries)
    if q.shape[1] != snapshot.dim:
        raise StoreError(
            f"query has dimension {q.shape[1]} but version {snapshot.model_id[:12]} stores {snapshot.dim}-d embeddings"
        )
    snapshot.require_rows(table)
    tree = parse_where(where, table) if where else None
    expr = to_arrow(tree) if tree is not None else None
    filter_columns = sorted(columns_of(tree)) if tree is not None else []
    if cache is not False:
        matrix = get_cache(snapshot, table, build=cache)
        if matrix is not None:
            rows = None
            if expr is not None:  # only the filter's columns are read, not the embeddings
                rows = matching_rows(snapshot, table, expr, filter_columns, batch_rows)
            return matrix.topk(q, k, rows)
    return scan_topk(snapshot, table, q, k, filter=expr, filter_columns=filter_columns, batch_rows=batch_rows)


def exact_search(
    snapshot: Snapshot,
    queries: np.ndarray,
    *,
    k: int = 10,
    where: str | None = None,
    table: str = "images",
    cache: bool | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> list[list[Hit]]:
    """Top-k hits per query vector (rows of `queries`, [Q, D] or [D]), best first."""
    rows, scores = exact_topk(
        snapshot, queries, k=k, where=where, table=table, cache=cache, batch_rows=batch_rows
    )
    return [hits(snapshot, table, r, s) for r, s in zip(rows, scores)]
