"""The one top-k of exact search: cosine scores of blocks of global rows, reduced to the k best per query.

Embeddings are L2-normalised when written, so cosine similarity is a dot product with the normalised query.
Every exact engine (the Parquet scan, the matrix cache) scores blocks of rows and feeds them here; the ANN
index's recall is measured against the same result. Order: score descending, then global row ascending.
"""

from __future__ import annotations

import numpy as np


def normalize(vectors: np.ndarray) -> np.ndarray:
    """[Q, D] float32 unit rows from a [D] or [Q, D] array."""
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError("query vector is zero or not finite")
    return vectors / norms


class BlockTopK:
    """Running top-k of Q queries over scored blocks of global rows, vectorised over the queries."""

    def __init__(self, n_queries: int, k: int) -> None:
        if k < 1:
            raise ValueError("k must be at least 1")
        self.k = k
        self.scores = np.empty((n_queries, 0), np.float32)
        self.rows = np.empty((n_queries, 0), np.int64)

    def add(self, scores: np.ndarray, rows: np.ndarray) -> None:
        """`scores` [Q, n] of the global `rows` [n] (any order)."""
        n = scores.shape[1]
        if n == 0:
            return
        if self.k < n:
            part = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]
        else:
            part = np.broadcast_to(np.arange(n), scores.shape)
        self._keep(
            np.concatenate([self.scores, np.take_along_axis(scores, part, axis=1)], axis=1),
            np.concatenate([self.rows, np.asarray(rows, np.int64)[part]], axis=1),
        )

    def merge(self, other: BlockTopK) -> None:
        self._keep(
            np.concatenate([self.scores, other.scores], axis=1),
            np.concatenate([self.rows, other.rows], axis=1),
        )

    def _keep(self, scores: np.ndarray, rows: np.ndarray) -> None:
        # At most 2k candidates per query: a full sort (score descending, row ascending) is cheap and keeps
        # the result sorted.
        order = np.lexsort((rows, -scores), axis=1)[:, : self.k]
        self.scores, self.rows = (
            np.take_along_axis(scores, order, axis=1),
            np.take_along_axis(rows, order, axis=1),
        )

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(global rows [Q, k'], scores [Q, k']) best first, k' = min(k, rows seen)."""
        return self.rows, self.scores
