"""The front door of search: `query_store(store_url, options, text=...)` resolves a store version's snapshot,
encodes the query with the version's own checkpoint and searches it - exact (the matrix cache on large tables,
else a Parquet scan) or ANN - then fetches the metadata of the k winners only.

`QueryOptions` is written once: `ssjdn query`'s flags (pipelines/search/cli.py), the Python API and the demo
flow all use it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipelines.cli_types import positive_int
from pipelines.errors import PipelineError
from pipelines.fsio import parse_storage_options
from pipelines.options import option
from pipelines.search.ann import build_ann, load_ann
from pipelines.search.matrix_cache import get_cache
from pipelines.search.scan import matching_rows, scan_topk
from pipelines.search.topk import normalize
from pipelines.search.where import columns_of, parse_where, to_arrow
from pipelines.store.reader import DEFAULT_BATCH_ROWS, EmbeddingStore, Snapshot
from pipelines.store.schema import CAPTION_COLUMNS, TABLES, StoreError, meta_columns

log = logging.getLogger(__name__)


class QueryOptionsError(PipelineError, ValueError):
    """An option value or a combination that cannot work (named, with what is accepted)."""


def _cache_flag(keep_default: bool) -> bool | None:
    """`--no-cache` (argparse store_false) -> False: always scan; absent -> None: the cache where it pays."""
    return None if keep_default else False


@dataclass(frozen=True)
class QueryOptions:
    """How to search: what `ssjdn query` takes besides the query itself and the store URL."""

    k: int = option(10, flag="-k", type=positive_int, help="number of results (default 10)")
    model_id: str | None = option(None, help="store version (model_id or a unique prefix; default: newest)")
    where: str | None = option(None, help="filter, e.g. \"class = 'airport' AND split = 'test'\"")
    table: str = option("images", choices=TABLES, help="what to search")
    ann: bool = option(False, action="store_true", help="use (building if needed) the version's ANN index")
    cache: bool | None = option(
        None,
        flag="--no-cache",
        action="store_false",
        parse=_cache_flag,
        help="exact search decodes the Parquet files instead of the version's memory-mapped cache "
        "(used, and built by the first query, on tables of 100k rows or more)",
    )
    checkpoint: str | None = option(
        None, metavar="URL", help="checkpoint (default: the one the version records)"
    )
    storage_options: dict[str, Any] = option(
        default_factory=dict,
        flag="--storage-option",
        action="append",
        metavar="KEY=VALUE",
        parse=parse_storage_options,
        help="fsspec storage option (repeatable)",
    )

    def __post_init__(self) -> None:
        if self.k < 1:
            raise QueryOptionsError(f"k must be at least 1 (got {self.k})")
        if self.table not in TABLES:
            raise QueryOptionsError(f"table must be one of {', '.join(TABLES)} (got {self.table!r})")


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

    @classmethod
    def from_record(cls, rank: int, score: float, rec: dict[str, Any]) -> Hit:
        """A hit from one stored row's metadata (the store's column names -> the hit's fields)."""
        return cls(
            rank=rank,
            score=float(score),
            key=rec["key"],
            source=rec["source"],
            split=rec["split"],
            class_name=rec["class"],
            lat=rec["lat"],
            lon=rec["lon"],
            extra={c: rec[c] for c in CAPTION_COLUMNS if c in rec},
        )


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


def hits(snapshot: Snapshot, table: str, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
    """Hits for one query's global rows and scores (best first; rows < 0 pad short ANN results)."""
    keep = np.asarray(rows) >= 0
    rows, scores = np.asarray(rows)[keep], np.asarray(scores)[keep]
    records = snapshot.take(table, rows, meta_columns(table)).to_pylist()
    out = []
    for rank, (score, rec) in enumerate(zip(scores, records), start=1):
        out.append(Hit.from_record(rank, score, rec))
    return out


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


def encode_query(
    snapshot: Snapshot, *, text=None, image=None, checkpoint=None, storage_options=None
) -> np.ndarray:
    """Encode a caption, or an image (a path/URL, or a decoded PIL image), with the version's own checkpoint
    (its sha256 checked against the version's model_id)."""
    from pipelines.encoders import CheckpointError, read_checkpoint, restore_encoders

    url = checkpoint or snapshot.model.get("checkpoint")
    if not url:
        raise StoreError(f"version {snapshot.model_id[:12]} records no checkpoint; pass --checkpoint")
    blob = read_checkpoint(url, storage_options)
    if blob.model_id != snapshot.model_id:
        raise CheckpointError(
            f"checkpoint {blob.url} is model {blob.model_id[:12]}, but the store version is "
            f"{snapshot.model_id[:12]}: queries must be encoded by the model that embedded the store"
        )
    enc = restore_encoders(blob)
    if text is not None:
        return enc.encode_texts([text])[0]
    if isinstance(image, (str, os.PathLike)):
        image = _read_image(image)
    pixels = enc.transform()(image).numpy()[None]
    return enc.encode_pixels(pixels)[0]


def _read_image(source: str | os.PathLike):
    from ssjdn.data.images import decode_image, read_image_bytes

    return decode_image(read_image_bytes(source), str(source))


def query_store(
    store_url: str,
    options: QueryOptions | None = None,
    *,
    text: str | None = None,
    image: str | None = None,
    vector: np.ndarray | None = None,
    **overrides: Any,
) -> QueryResult:
    """Search the store for one query: `text`, an `image` (path/URL) or a ready `vector` (exactly one).

    `options` (default `QueryOptions()`), with any of its fields overridden by keyword:
    `query_store("./store/embeddings", text="a harbour", k=5)`.
    """
    opts = dataclasses.replace(options or QueryOptions(), **overrides)
    given = [
        name for name, value in (("text", text), ("image", image), ("vector", vector)) if value is not None
    ]
    if len(given) != 1:
        raise QueryOptionsError(
            "give a query TEXT or --image PATH (from Python: text=, image= or vector=), exactly one "
            f"(got {', '.join(given) or 'none'})"
        )
    # Bad input first, before the store is opened or a model loaded.
    if opts.where:
        parse_where(opts.where, opts.table)
    picture = _read_image(image) if image is not None else None
    store = EmbeddingStore(store_url, opts.storage_options)
    snapshot = store.snapshot(opts.model_id)  # clear StoreError for an empty store / unknown model_id
    snapshot.require_rows(opts.table)
    if vector is None:
        vector = encode_query(
            snapshot,
            text=text,
            image=picture,
            checkpoint=opts.checkpoint,
            storage_options=opts.storage_options,
        )
    label = text if text is not None else f"image {image}" if image is not None else "vector"
    use_ann = opts.ann
    if use_ann and opts.where:
        log.info("--where is applied by exact search only; not using the ANN index for this query")
        use_ann = False
    if use_ann:
        index = load_ann(snapshot, opts.table)
        if index is None:
            log.info("no current ANN index for %s/%s: building it", snapshot.model_id[:12], opts.table)
            index = build_ann(snapshot, opts.table)
        t0 = time.perf_counter()
        rows, scores = index.search(vector, opts.k)
        found = hits(snapshot, opts.table, rows[0], scores[0])
        return QueryResult(label, snapshot.model_id, "ann", found, time.perf_counter() - t0, index.meta)
    t0 = time.perf_counter()
    rows, scores = exact_topk(
        snapshot, vector, k=opts.k, where=opts.where, table=opts.table, cache=opts.cache
    )
    found = hits(snapshot, opts.table, rows[0], scores[0])
    return QueryResult(label, snapshot.model_id, "exact", found, time.perf_counter() - t0)
