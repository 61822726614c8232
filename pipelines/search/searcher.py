"""Warm search: a `Searcher`, opened once on a store version, keeps everything a query needs loaded.

    searcher = Searcher("./store/embeddings")                    # newest version; model_id=, checkpoint=, ...
    result = searcher.search(text="a harbour", k=10, where="class = 'harbor'")
    results = searcher.search_many([Query(text="a beach"), Query(image=png_bytes, k=5)])   # one pass each
    result = searcher.search(text="a harbour", bbox=(-5, 40, -3, 42), after="2024-05-01")   # where and when

What it holds, loaded once:
- the text and image encoders of the version's checkpoint (its sha256 must equal the version's model_id);
- per table and store generation: the exact-search matrix (the store's own matrix cache when it has one for this
  generation; a small table in memory; otherwise a memory-mapped copy it builds - in the store as
  `ssjdn query` does, or with `read_only=True` in a local cache folder), the filter columns a `where` needed
  (read once per generation, not per query), the key index (`item(key)`), and with `ann=True` the ANN index
  (the store's, or one built in the background; until it is ready ANN queries are answered exactly).

Snapshots. The searcher works from one snapshot (generation) at a time. At most every `refresh_s` seconds a
query (or, with `watch()`, a background thread) reads the version's manifest - one small read - and when a new
generation was committed, prepares it completely (matrix included) and then switches over in one assignment.
A query takes the current generation when it starts and finishes on it, so nothing changes under a query.
The version (model) stays the one opened: a new checkpoint is a new version and needs a new Searcher.

Read-only. With `read_only=True` (what `ssjdn serve` uses) nothing is ever written under the store URL: caches
the store lacks go to `cache_dir` (default `$SSJDN_CACHE_DIR/searcher`, else `~/.cache/ssjdn/searcher`).

Result order and scores are exactly those of pipelines.search's exact engines (score descending, then global
row); a batch of queries is scored in one pass over the matrix, each query keeping its own k.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.errors import PipelineError
from pipelines.geo.filters import GeoFilter
from pipelines.geo.geoparquet import GEOMETRY
from pipelines.search import geo as geo_rows
from pipelines.search.ann import DEFAULTS as ANN_DEFAULTS
from pipelines.search.ann import AnnIndex, build_ann, load_ann
from pipelines.search.matrix_cache import MatrixCache, get_cache, load_cache
from pipelines.search.results import Hit, QueryResult
from pipelines.search.scan import scan_topk
from pipelines.search.topk import normalize
from pipelines.search.where import FilterError, columns_of, parse_where, to_arrow
from pipelines.store.reader import EmbeddingStore, Snapshot
from pipelines.store.schema import KEY, TABLES, StoreError

log = logging.getLogger(__name__)

IN_MEMORY_BYTES = 256 << 20  # a table's matrix up to this size is held in memory instead of a file on disk
METADATA_MEMORY_ROWS = (
    5_000_000  # tables up to this size keep their metadata columns in memory (~100 B a row)
)
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # query images above this are refused before their pixels are decoded
ROW = "_global_row"


class SearchError(PipelineError, ValueError):
    """A query that cannot be answered as given (no input, two inputs, k < 1, a table the version lacks)."""


class ImageTooLargeError(SearchError):
    """A query image whose pixel count is over the limit (checked from its header, before decoding)."""


class NotAnImageError(SearchError):
    """Query image bytes that do not decode as an image."""


@dataclass(frozen=True)
class Query:
    """One query: exactly one of `text`, `image` (encoded bytes, a path/URL, a PIL image, or the [3, H, W]
    model input `Searcher.image_pixels` made of one) or `vector`.

    `ann`: None takes the searcher's default. A `where` or geo filter always searches exactly. The geo filters
    (pipelines.geo.filters, all ANDed with `where`): `bbox` (minlon, minlat, maxlon, maxlat; minlon > maxlon
    across the antimeridian), `near` (lon, lat) with `radius_km`, `after` / `before` (inclusive; ISO strings,
    dates or datetimes); each a tuple / value or the flag's string. `geometry`: the hits carry their
    footprints (WKB), for GeoJSON.
    """

    text: str | None = None
    image: Any = None
    vector: Any = None
    k: int = 10
    where: str | None = None
    table: str = "images"
    ann: bool | None = None
    bbox: Any = None
    near: Any = None
    radius_km: Any = None
    after: Any = None
    before: Any = None
    geometry: bool = False

    def geo_filter(self) -> GeoFilter | None:
        """The checked geo / time filter (None without one); raises GeoFilterError."""
        return geo_rows.geo_filter(self.bbox, self.near, self.radius_km, self.after, self.before)

    def label(self) -> str:
        if self.text is not None:
            return self.text
        if self.image is not None:
            return f"image {self.image}" if isinstance(self.image, (str, os.PathLike)) else "image"
        return "vector"


@dataclass
class SearchResult(QueryResult):
    """`QueryResult` plus the snapshot it came from and where the time went (ms)."""

    generation: int = 0
    table: str = "images"
    timings: dict[str, float] = field(default_factory=dict)
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out.update(generation=self.generation, table=self.table, timings=self.timings, note=self.note)
        return out


# ---------------------------------------------------------------------------------------------- per generation


class KeyIndex:
    """key -> global row of one table, by binary search over the sorted keys (an Arrow array: ~bytes of the keys
    plus 8 per row, not a Python dict)."""

    def __init__(self, keys: pa.Array) -> None:
        import pyarrow.compute as pc

        order = pc.sort_indices(keys)
        self.sorted = keys.take(order)
        self.rows = order.to_numpy().astype(np.int64)

    def row(self, key: str) -> int | None:
        lo, hi = 0, len(self.sorted)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.sorted[mid].as_py() < key:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(self.sorted) and self.sorted[lo].as_py() == key:
            return int(self.rows[lo])
        return None


class _Table:
    """What one table of one snapshot needs for queries; built lazily, kept for the generation's lifetime."""

    def __init__(self, snapshot: Snapshot, table: str) -> None:
        self.snapshot = snapshot
        self.table = table
        self.rows = snapshot.rows(table)
        self.matrix: MatrixCache | None = None  # None: search by scanning Parquet
        self.matrix_kind = "scan"
        self.ann: AnnIndex | None = None
        self.ann_state = "off"  # off | building | ready | failed: reason
        self.columns: dict[str, pa.ChunkedArray] = {}
        self.metadata: pa.Table | None = None  # every metadata column, in global-row order (when held)
        self.keys: KeyIndex | None = None
        self.lock = threading.Lock()
        self.keys_lock = threading.Lock()

    def hold_metadata(self) -> None:
        """Read the metadata columns once (one pass over the files): hits and items then cost no read."""
        names = list(self.snapshot.meta_columns(self.table))
        batches = [b for _, b in self.snapshot.iter_batches(self.table, names)]
        schema = self.snapshot.schema(self.table)
        table = pa.Table.from_batches(batches, schema=pa.schema([schema.field(n) for n in names]))
        table = table.combine_chunks()
        with self.lock:
            self.metadata = table
            for name in names:
                self.columns.setdefault(name, table.column(name))

    def records(self, rows: np.ndarray) -> list[dict[str, Any]]:
        """The metadata rows of these global rows, in that order."""
        if self.metadata is not None:
            return self.metadata.take(pa.array(rows, pa.int64())).to_pylist()
        return self.snapshot.take(self.table, rows, self.snapshot.meta_columns(self.table)).to_pylist()

    def column(self, name: str) -> pa.ChunkedArray:
        with self.lock:
            if name not in self.columns:
                batches = [b.column(name) for _, b in self.snapshot.iter_batches(self.table, [name])]
                self.columns[name] = pa.chunked_array(
                    batches, type=self.snapshot.schema(self.table).field(name).type
                )
            return self.columns[name]

    def take_column(self, name: str, rows: np.ndarray) -> pa.Array | pa.ChunkedArray:
        """One column's values at `rows`: from memory on a table whose metadata is held there (the column is then
        read once per generation), else from the row groups holding them."""
        if self.metadata is not None:
            return self.column(name).take(pa.array(rows, pa.int64()))
        return self.snapshot.take(self.table, rows, [name]).column(name)

    def key_index(self) -> KeyIndex:
        with self.keys_lock:  # built once, however many requests ask for it at the same time
            if self.keys is None:
                self.keys = KeyIndex(self.column(KEY).combine_chunks())
            return self.keys

    def filter_rows(self, tree) -> np.ndarray:
        """Sorted global rows passing the filter, from the table's cached filter columns."""
        names = sorted(columns_of(tree))
        data = pa.table({n: self.column(n) for n in names})
        data = data.append_column(ROW, pa.array(np.arange(self.rows, dtype=np.int64)))
        return data.filter(to_arrow(tree)).column(ROW).to_numpy().astype(np.int64)


@dataclass
class _State:
    snapshot: Snapshot
    tables: dict[str, _Table]
    opened_at: float


# ---------------------------------------------------------------------------------------------- the searcher


class Searcher:
    """Open once, query many times (see the module docstring). Thread-safe; a context manager.

    `options`: a `QueryOptions` to take model_id, checkpoint, storage_options, cache, ann, table, k and where
    from; the keywords override it. `model_id`: the version (full id or unique prefix; default the newest).
    `checkpoint`: default the one the version records (its sha256 must be the model_id). `table`: the table
    prepared at open and searched by default. `cache`: False scans the Parquet files on every query (as
    `--no-cache`); otherwise exact search uses a matrix: the store's matrix cache of the generation, else the
    table in memory (up to IN_MEMORY_BYTES), else - as `ssjdn query` - the cache built in the store (True:
    always; None: from MIN_ROWS rows on, scanning below), or with `read_only` a memory-mapped copy in
    `cache_dir`. `ann`: load the ANN index (the store's; else built in the background, into the store or with
    `read_only` into `cache_dir`) and use it by default. `wait_ann`: wait at open for that build. `refresh_s`:
    how often a query may look for a new generation (None: never; `refresh()` and `watch()` still do).
    `max_image_pixels`: bigger query images are refused from their header. `metadata_in_memory`: keep the
    metadata columns in memory (None: up to METADATA_MEMORY_ROWS rows), else read the winners' row groups per
    query. `ann_expansion_search`: the HNSW search width (default: the index's, 128). `text_cache_size`: the
    embeddings of that many recent query texts are kept (a text asked again - another k, another filter - is
    not encoded again). `load_encoders=False`: vector queries only (no checkpoint read). `device`: where the
    encoders run ("cpu", "cuda").
    """

    def __init__(
        self,
        store_url: str,
        options: Any = None,
        *,
        model_id: str | None = None,
        checkpoint: str | None = None,
        storage_options: dict[str, Any] | None = None,
        table: str | None = None,
        cache: bool | None = None,
        ann: bool | None = None,
        read_only: bool = False,
        cache_dir: str | os.PathLike | None = None,
        refresh_s: float | None = 10.0,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        load_encoders: bool = True,
        wait_ann: bool = True,
        metadata_in_memory: bool | None = None,
        ann_expansion_search: int | None = None,
        text_cache_size: int = 1024,
        device: str = "cpu",
    ) -> None:
        def pick(value, name, default):
            if value is not None:
                return value
            return getattr(options, name, default) if options is not None else default

        self.store_url = str(store_url)
        self.storage_options = pick(storage_options, "storage_options", {}) or {}
        self.cache = pick(cache, "cache", None)
        self.ann = bool(pick(ann, "ann", False))
        self.table = pick(table, "table", "images")
        self.default_k = int(getattr(options, "k", 10)) if options is not None else 10
        self.default_where = getattr(options, "where", None) if options is not None else None
        self.default_geo = {
            n: getattr(options, n, None) for n in ("bbox", "near", "radius_km", "after", "before")
        }
        self.read_only = read_only
        self.cache_dir = Path(cache_dir) if cache_dir else _default_cache_dir()
        self.refresh_s = refresh_s
        self.max_image_pixels = int(max_image_pixels)
        self.device = device
        self.metadata_in_memory = metadata_in_memory
        self.ann_expansion_search = ann_expansion_search
        self.text_cache_size = max(0, int(text_cache_size))
        # Recent query texts -> their embeddings; the model never changes, so they outlive generations.
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        if self.table not in TABLES:
            raise SearchError(f"table must be one of {', '.join(TABLES)} (got {self.table!r})")
        self.store = EmbeddingStore(self.store_url, self.storage_options)
        snapshot = self.store.snapshot(pick(model_id, "model_id", None))
        self.model_id = snapshot.model_id
        self._lock = threading.Lock()  # guards the state swap and the lazily created tables
        self._refresh_lock = threading.Lock()  # one preparation at a time
        self._encode_lock = threading.Lock()  # tokenizers are not safe to share between threads
        self._checked_at = time.monotonic()
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()
        self._ann_threads: list[threading.Thread] = []
        self.encoders = None
        self.checkpoint_url = pick(checkpoint, "checkpoint", None) or snapshot.model.get("checkpoint")
        if load_encoders:
            self.encoders = self._load_encoders(snapshot)
        self._state = self._prepare(snapshot)
        self._start_anns(self._state)
        if self.ann and wait_ann:
            self.wait_for_ann()

    # ------------------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the watcher and wait for background index builds to finish their current step."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
            self._watcher = None

    @property
    def snapshot(self) -> Snapshot:
        return self._state.snapshot

    @property
    def generation(self) -> int:
        return self._state.snapshot.generation

    @property
    def dim(self) -> int:
        return self._state.snapshot.dim

    def status(self) -> dict[str, Any]:
        """What is loaded: version, generation, rows, how each table is searched, the ANN index's state."""
        state = self._state
        tables = {}
        for name, t in state.tables.items():
            entry: dict[str, Any] = {
                "rows": t.rows,
                "exact": t.matrix_kind,
                "ann": t.ann_state,
                "metadata": "memory" if t.metadata is not None else "read per query",
            }
            if t.ann is not None:
                k = t.ann.meta.get("recall_k", 10)
                entry["ann_recall"] = {f"recall@{k}": t.ann.meta.get(f"recall@{k}")}
            tables[name] = entry
        return {
            "model_id": self.model_id,
            "generation": state.snapshot.generation,
            "dim": state.snapshot.dim,
            "tables": tables,
            "encoders": self.encoders is not None,
            "read_only": self.read_only,
        }

    def _load_encoders(self, snapshot: Snapshot):
        from pipelines.encoders import CheckpointError, read_checkpoint, restore_encoders

        if not self.checkpoint_url:
            raise StoreError(f"version {snapshot.model_id[:12]} records no checkpoint; pass checkpoint=")
        blob = read_checkpoint(self.checkpoint_url, self.storage_options)
        if blob.model_id != snapshot.model_id:
            raise CheckpointError(
                f"checkpoint {blob.url} is model {blob.model_id[:12]}, but the store version is "
                f"{snapshot.model_id[:12]}: queries must be encoded by the model that embedded the store"
            )
        t0 = time.perf_counter()
        enc = restore_encoders(blob, device=self.device)
        log.info("loaded the encoders of %s in %.1fs", snapshot.model_id[:12], time.perf_counter() - t0)
        return enc

    # ------------------------------------------------------------------------------------------ snapshots

    def _prepare(self, snapshot: Snapshot) -> _State:
        """Everything the default table needs for this snapshot, before anyone queries it."""
        state = _State(snapshot=snapshot, tables={}, opened_at=time.time())
        if snapshot.rows(self.table) > 0:
            state.tables[self.table] = self._prepare_table(snapshot, self.table)
        return state

    def _prepare_table(self, snapshot: Snapshot, table: str) -> _Table:
        t = _Table(snapshot, table)
        if t.rows and self.cache is not False:
            t.matrix, t.matrix_kind = self._matrix(snapshot, table)
        if t.rows and (
            self.metadata_in_memory if self.metadata_in_memory is not None else t.rows <= METADATA_MEMORY_ROWS
        ):
            t.hold_metadata()
            t.key_index()  # items and thumbnails of this generation then never wait for it
        return t

    def _start_anns(self, state: _State) -> None:
        """Once `state` is the current one: load or start building the ANN index of its tables."""
        if self.ann:
            for t in state.tables.values():
                if t.rows and t.ann_state == "off":
                    self._start_ann(t)

    def _table(self, state: _State, table: str) -> _Table:
        if table not in TABLES:
            raise SearchError(f"table must be one of {', '.join(TABLES)} (got {table!r})")
        t = state.tables.get(table)
        if t is not None:
            return t
        if state.snapshot.rows(table) == 0:
            raise SearchError(
                f"version {self.model_id[:12]} (generation {state.snapshot.generation}) has no committed "
                f"{table} embeddings"
            )
        with self._refresh_lock:  # prepared once, even when several queries ask at the same time
            t = state.tables.get(table)
            if t is None:
                t = self._prepare_table(state.snapshot, table)
                with self._lock:
                    state.tables[table] = t
                if state is self._state:
                    self._start_anns(state)
        return t

    def refresh(self) -> bool:
        """Look for a new generation (one manifest read); when there is one, prepare it and switch to it.
        Returns whether the searcher switched. Queries running meanwhile finish on the generation they began on."""
        with self._refresh_lock:
            self._checked_at = time.monotonic()
            manifest = self.store.read_manifest(self.model_id)
            current = self._state
            if manifest is None:
                log.warning(
                    "version %s has no manifest any more; still serving generation %d",
                    self.model_id[:12],
                    current.snapshot.generation,
                )
                return False
            if manifest.generation == current.snapshot.generation:
                return False
            snapshot = self.store.snapshot_of(manifest)
            t0 = time.perf_counter()
            new = _State(snapshot=snapshot, tables={}, opened_at=time.time())
            for name in current.tables:  # every table in use is ready before the switch
                if snapshot.rows(name) > 0:
                    new.tables[name] = self._prepare_table(snapshot, name)
            with self._lock:
                self._state = new
            self._start_anns(new)
            log.info(
                "switched %s from generation %d to %d (%s rows; prepared in %.2fs)",
                self.model_id[:12],
                current.snapshot.generation,
                snapshot.generation,
                ", ".join(f"{n}: {t.rows}" for n, t in new.tables.items()) or "no",
                time.perf_counter() - t0,
            )
        if self.read_only:
            self._drop_local_generations(snapshot)
        return True

    def _maybe_refresh(self) -> None:
        if self._watcher is not None or self.refresh_s is None:
            return
        if time.monotonic() - self._checked_at >= self.refresh_s:
            try:
                self.refresh()
            except Exception as exc:  # a storage hiccup must not fail the query: keep serving what we have
                log.warning("could not check %s for a new generation: %s", self.store_url, exc)

    def watch(self, interval_s: float | None = None) -> None:
        """Check for new generations in a background thread every `interval_s` (default `refresh_s`), so
        queries never wait for a switch."""
        if self._watcher is not None:
            return
        interval = interval_s or self.refresh_s or 10.0

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.refresh()
                except Exception as exc:
                    log.warning("could not check %s for a new generation: %s", self.store_url, exc)

        self._watcher = threading.Thread(target=loop, name="ssjdn-searcher-watch", daemon=True)
        self._watcher.start()

    # ------------------------------------------------------------------------------------------ caches

    def _local_root(self, snapshot: Snapshot, table: str) -> Path:
        store_id = hashlib.sha256(snapshot.store_url.rstrip("/").encode()).hexdigest()[:16]
        return self.cache_dir / store_id / snapshot.model_id / table

    def _matrix(self, snapshot: Snapshot, table: str) -> tuple[MatrixCache | None, str]:
        """(matrix to search, how it was obtained)."""
        cache = load_cache(snapshot, table)  # the store's own cache of this generation (read only)
        if cache is not None:
            return cache, "store matrix cache"
        rows = snapshot.rows(table)
        if not self.read_only:
            cache = get_cache(snapshot, table, build=self.cache)
            if cache is not None:
                return cache, "store matrix cache"
        if rows * snapshot.dim * 4 <= IN_MEMORY_BYTES:
            matrix = np.empty((rows, snapshot.dim), np.float32)
            for start, m in snapshot.iter_embeddings(table):
                matrix[start : start + len(m)] = m
            matrix.flags.writeable = False
            return MatrixCache(matrix, Path()), "memory"
        if not self.read_only:  # get_cache declined (too small to pay, or no room): scan as `ssjdn query`
            return None, "scan"
        try:
            return self._local_matrix(snapshot, table), "local matrix cache"
        except OSError as exc:
            log.warning(
                "could not build a local matrix cache under %s (%s); scanning Parquet", self.cache_dir, exc
            )
            return None, "scan"

    def _local_matrix(self, snapshot: Snapshot, table: str) -> MatrixCache:
        """A memory-mapped matrix of this generation under cache_dir (the same format as the store's cache)."""
        fingerprint = snapshot.fingerprint(table)
        folder = self._local_root(snapshot, table) / "flat" / f"g{snapshot.generation:06d}"
        try:
            if json.loads((folder / "meta.json").read_text()) == fingerprint:
                matrix = np.load(folder / "embeddings.npy", mmap_mode="r")
                if matrix.shape == (fingerprint["rows"], fingerprint["dim"]):
                    return MatrixCache(matrix, folder)
        except (OSError, ValueError):
            pass
        folder.mkdir(parents=True, exist_ok=True)
        need = fingerprint["rows"] * fingerprint["dim"] * 4
        if shutil.disk_usage(folder).free < 2 * need:
            raise OSError(f"{need / 1e9:.2f} GB needed, the disk is short of room")
        log.info(
            "building a local matrix cache of %s/%s generation %d (%.2f GB) at %s",
            snapshot.model_id[:12],
            table,
            snapshot.generation,
            need / 1e9,
            folder,
        )
        tmp = folder / f".embeddings.{os.getpid()}.{threading.get_ident()}.npy"
        try:
            out = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=np.float32, shape=(fingerprint["rows"], fingerprint["dim"])
            )
            for start, m in snapshot.iter_embeddings(table):
                out[start : start + len(m)] = m
            out.flush()
            del out
            os.replace(tmp, folder / "embeddings.npy")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _write_json(folder / "meta.json", fingerprint)
        return MatrixCache(np.load(folder / "embeddings.npy", mmap_mode="r"), folder)

    def _drop_local_generations(self, snapshot: Snapshot) -> None:
        """Remove local caches of older generations (a query still on one keeps its open memory map)."""
        for table in TABLES:
            root = self._local_root(snapshot, table)
            for kind in ("flat", "ann"):
                base = root / kind
                if not base.is_dir():
                    continue
                for old in base.iterdir():
                    if old.is_dir() and old.name != f"g{snapshot.generation:06d}":
                        shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ ANN

    def _start_ann(self, t: _Table) -> None:
        index = load_ann(t.snapshot, t.table)
        if index is None and self.read_only:
            index = self._load_local_ann(t)
        if index is not None:
            t.ann, t.ann_state = self._tuned(index), "ready"
            return
        t.ann_state = "building"

        def build() -> None:
            try:
                if self.read_only:
                    idx = self._build_local_ann(t)
                else:
                    idx = build_ann(t.snapshot, t.table)
                t.ann, t.ann_state = self._tuned(idx), "ready"
            except Exception as exc:
                log.warning(
                    "ANN index of %s/%s generation %d failed: %s",
                    self.model_id[:12],
                    t.table,
                    t.snapshot.generation,
                    exc,
                )
                t.ann_state = f"failed: {exc}"

        thread = threading.Thread(target=build, name="ssjdn-ann-build", daemon=True)
        self._ann_threads = [th for th in self._ann_threads if th.is_alive()] + [thread]
        thread.start()

    def _tuned(self, index: AnnIndex) -> AnnIndex:
        """Apply `ann_expansion_search` (a wider search: better recall for queries far from every stored
        vector, e.g. text against image embeddings, at more time per query)."""
        if self.ann_expansion_search:
            index.index.expansion_search = int(self.ann_expansion_search)
            index.meta = {**index.meta, "expansion_search": int(self.ann_expansion_search)}
        return index

    def wait_for_ann(self, timeout_s: float | None = None) -> bool:
        """Wait for background ANN builds; True when the default table's index is ready."""
        for thread in list(self._ann_threads):
            thread.join(timeout_s)
        t = self._state.tables.get(self.table)
        return t is not None and t.ann is not None

    def _ann_folder(self, t: _Table) -> Path:
        return self._local_root(t.snapshot, t.table) / "ann" / f"g{t.snapshot.generation:06d}"

    def _load_local_ann(self, t: _Table) -> AnnIndex | None:
        from usearch.index import Index

        folder = self._ann_folder(t)
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        fingerprint = t.snapshot.fingerprint(t.table)
        if {k: meta.get(k) for k in fingerprint} != fingerprint:
            return None
        index = Index.restore(str(folder / "index.usearch"), view=True)
        if index is None or len(index) != meta["rows"]:
            return None
        index.expansion_search = meta["params"]["expansion_search"]
        return AnnIndex(index=index, meta=meta)

    def _build_local_ann(self, t: _Table, k: int = 10, recall_queries: int = 200) -> AnnIndex:
        """Build the ANN index of a table under cache_dir (the store's format), with its recall measured
        against this searcher's exact search."""
        from usearch.index import Index

        params = dict(ANN_DEFAULTS)
        index = Index(
            ndim=t.snapshot.dim,
            metric=params["metric"],
            dtype=params["dtype"],
            connectivity=params["connectivity"],
            expansion_add=params["expansion_add"],
            expansion_search=params["expansion_search"],
        )
        t0 = time.perf_counter()
        for start, m in t.snapshot.iter_embeddings(t.table):
            if self._stop.is_set():
                raise RuntimeError("searcher closed")
            if self._state.snapshot.generation != t.snapshot.generation:
                raise RuntimeError(
                    f"generation {t.snapshot.generation} was superseded before its index was done"
                )
            index.add(np.arange(start, start + len(m), dtype=np.uint64), m)
        build_s = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        pick = np.sort(rng.choice(t.rows, size=min(recall_queries, t.rows), replace=False))
        sample = self._rows_embeddings(t, pick)
        queries = normalize(sample + rng.normal(0, 0.05, sample.shape).astype(np.float32))
        ann = AnnIndex(index=index, meta={})
        recall = _recall(ann, self._exact(t, queries, k, None)[0], queries, k)
        meta = {
            **t.snapshot.fingerprint(t.table),
            "params": params,
            "build_seconds": round(build_s, 2),
            f"recall@{k}": round(recall, 4),
            "recall_k": k,
            "recall_queries": len(queries),
            "recall_query_kind": "stored embeddings + N(0, 0.05) noise",
        }
        ann.meta = meta
        folder = self._ann_folder(t)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".index.{os.getpid()}.usearch"
        index.save(str(tmp))
        os.replace(tmp, folder / "index.usearch")
        _write_json(folder / "meta.json", meta)
        log.info(
            "ANN index of %s/%s generation %d: %d rows in %.1fs, recall@%d vs exact %.3f (at %s)",
            self.model_id[:12],
            t.table,
            t.snapshot.generation,
            t.rows,
            build_s,
            k,
            recall,
            folder,
        )
        return ann

    def _rows_embeddings(self, t: _Table, rows: np.ndarray) -> np.ndarray:
        if t.matrix is not None:
            return np.asarray(t.matrix.matrix[rows], np.float32)
        from pipelines.store.schema import EMBEDDING, embeddings_to_numpy

        return embeddings_to_numpy(t.snapshot.take(t.table, rows, [EMBEDDING]).column(EMBEDDING))

    # ------------------------------------------------------------------------------------------ queries

    def search(
        self,
        *,
        text: str | None = None,
        image: Any = None,
        vector: Any = None,
        k: int | None = None,
        where: str | None = None,
        table: str | None = None,
        ann: bool | None = None,
        bbox: Any = None,
        near: Any = None,
        radius_km: Any = None,
        after: Any = None,
        before: Any = None,
        geometry: bool = False,
    ) -> SearchResult:
        """Top-k for one query (exactly one of text, image, vector); see `Query`."""
        d = self.default_geo
        query = Query(
            text=text,
            image=image,
            vector=vector,
            k=self.default_k if k is None else k,
            where=self.default_where if where is None else where,
            table=table or self.table,
            ann=ann,
            bbox=d.get("bbox") if bbox is None else bbox,
            near=d.get("near") if near is None else near,
            radius_km=d.get("radius_km") if radius_km is None else radius_km,
            after=d.get("after") if after is None else after,
            before=d.get("before") if before is None else before,
            geometry=geometry,
        )
        return self.search_many([query])[0]

    def image_at(self, lon: float, lat: float) -> tuple[str, np.ndarray]:
        """(key, stored embedding) of the image whose footprint covers (lon, lat) - the one whose centroid is
        nearest when several do -, to query by place. Raises SearchError when none covers it."""
        state = self._state
        t = self._table(state, "images")
        rows = geo_rows.covering_rows(t, lon, lat)
        if not len(rows):
            raise SearchError(
                f"--image-at {lon:g},{lat:g}: no image of version {self.model_id[:12]} (generation "
                f"{state.snapshot.generation}) has a footprint covering this point"
            )
        key = t.records(rows[:1])[0][KEY]
        return key, self._rows_embeddings(t, rows[:1])[0]

    def search_many(self, queries: list[Query]) -> list[SearchResult]:
        """Answer several queries on one generation: one encoder call per kind, one scoring pass per
        (table, filter, engine). Raises SearchError (or FilterError, ...) when any query is invalid."""
        self._maybe_refresh()
        state = self._state
        trees = [self.check(q, state.snapshot) for q in queries]
        geos = [q.geo_filter() for q in queries]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, q in enumerate(queries):
            groups[(q.table, q.where or None, geos[i], bool(self.ann if q.ann is None else q.ann))].append(i)
        tables = {table: self._table(state, table) for table, _, _, _ in groups}
        t0 = time.perf_counter()
        vectors = self._encode(queries)
        encode_ms = (time.perf_counter() - t0) * 1000
        results: list[SearchResult | None] = [None] * len(queries)
        for (table, where, geo, want_ann), idx in groups.items():
            t = tables[table]
            kmax = max(queries[i].k for i in idx)
            ts = time.perf_counter()
            mode, note, meta = "exact", None, None
            if want_ann and where is None and geo is None and t.ann is not None:
                rows, scores = t.ann.search(vectors[idx], kmax)
                mode, meta = "ann", t.ann.meta
            else:
                if want_ann:
                    why = (
                        "a where filter"
                        if where
                        else "a geo filter"
                        if geo is not None
                        else f"the ANN index is {t.ann_state if self.ann else 'not loaded'}"
                    )
                    note = f"searched exactly: {why}"
                rows, scores = self._exact(t, vectors[idx], kmax, trees[idx[0]], geo)
            search_ms = (time.perf_counter() - ts) * 1000
            tf = time.perf_counter()
            pairs = [(rows[j, : queries[i].k], scores[j, : queries[i].k]) for j, i in enumerate(idx)]
            wants_geometry = any(queries[i].geometry for i in idx)
            hits = self._hits(t, pairs, geometry=True) if wants_geometry else self._hits(t, pairs)
            fetch_ms = (time.perf_counter() - tf) * 1000
            for j, i in enumerate(idx):
                results[i] = SearchResult(
                    query=queries[i].label(),
                    model_id=self.model_id,
                    mode=mode,
                    hits=hits[j],
                    seconds=(search_ms + fetch_ms) / 1000,
                    ann=meta,
                    generation=state.snapshot.generation,
                    table=table,
                    timings={
                        "encode_ms": round(encode_ms, 3),
                        "search_ms": round(search_ms, 3),
                        "fetch_ms": round(fetch_ms, 3),
                        "batch": len(idx),
                    },
                    note=note,
                )
        return results  # type: ignore[return-value]

    def check(self, q: Query, snapshot: Snapshot | None = None):
        """Validate a query without running it; returns its parsed `where` tree (or None). The where columns
        and the geo filter are checked against the version (`snapshot`, default the current one)."""
        given = [n for n, v in (("text", q.text), ("image", q.image), ("vector", q.vector)) if v is not None]
        if len(given) != 1:
            raise SearchError(f"give exactly one of text, image or vector (got {', '.join(given) or 'none'})")
        if q.text is not None and not q.text.strip():
            raise SearchError("the query text is empty")
        if isinstance(q.k, bool) or not isinstance(q.k, (int, np.integer)) or q.k < 1:
            raise SearchError(f"k must be a whole number of at least 1 (got {q.k!r})")
        if q.table not in TABLES:
            raise SearchError(f"table must be one of {', '.join(TABLES)} (got {q.table!r})")
        snapshot = snapshot or self.snapshot
        geo = q.geo_filter()
        if geo is not None:
            geo_rows.check_version(snapshot, q.table, geo)
        if not q.where:
            return None
        tree = parse_where(q.where, q.table)
        missing = sorted(columns_of(tree) - set(snapshot.schema(q.table).names))
        if missing:
            raise FilterError(
                f"--where: version {snapshot.model_id[:12]} has no column {', '.join(map(repr, missing))} "
                "(it was written before the store had geo columns)"
            )
        return tree

    def _encode(self, queries: list[Query]) -> np.ndarray:
        """[Q, D] normalised query vectors: texts in one encoder call, images in one, vectors as given."""
        dim = self.dim
        out = np.empty((len(queries), dim), np.float32)
        texts = [i for i, q in enumerate(queries) if q.text is not None]
        images = [i for i, q in enumerate(queries) if q.image is not None]
        for i, q in enumerate(queries):
            if q.vector is not None:
                v = np.asarray(q.vector, dtype=np.float32).reshape(-1)
                if v.shape != (dim,):
                    raise SearchError(
                        f"the query vector has {v.size} values; version {self.model_id[:12]} is {dim}-d"
                    )
                try:
                    out[i] = normalize(v)[0]
                except ValueError as exc:
                    raise SearchError(str(exc)) from None
        if texts or images:
            if self.encoders is None:
                raise SearchError("this searcher was opened without encoders: pass vector=")
            pixels = [self._pixels(queries[i].image) for i in images]
            with self._encode_lock:
                todo = []
                for i in texts:
                    cached = self._text_cache.get(queries[i].text)
                    if cached is None:
                        todo.append(i)
                    else:
                        self._text_cache.move_to_end(queries[i].text)
                        out[i] = cached
                if todo:
                    out[todo] = normalize(self.encoders.encode_texts([queries[i].text for i in todo]))
                    for i in todo:
                        self._text_cache[queries[i].text] = out[i].copy()
                    while len(self._text_cache) > self.text_cache_size:
                        self._text_cache.popitem(last=False)
                if images:
                    out[images] = normalize(self.encoders.encode_pixels(np.stack(pixels)))
        return out

    def _pixels(self, image: Any) -> np.ndarray:
        # Already the model's input (`image_pixels`, e.g. made in a request thread)?
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[0] != 3:
                raise SearchError(f"query pixels have shape {image.shape}; expected [3, H, W]")
            return image
        return self.image_pixels(image)

    def image_pixels(self, image: Any) -> np.ndarray:
        """[3, H, W] model input of a query image: encoded bytes, a path/URL or a PIL image. The pixel count is
        read from the header and refused over `max_image_pixels` (ImageTooLargeError) before any decoding;
        bytes that are not an image raise NotAnImageError."""
        from PIL import Image

        from ssjdn.data.errors import ImageDecodeError
        from ssjdn.data.images import decode_image, read_image_bytes

        if self.encoders is None:
            raise SearchError("this searcher was opened without encoders: pass vector=")
        if isinstance(image, Image.Image):
            self._check_pixels(image.width, image.height, "the query image")
            return self.encoders.transform().array(image.convert("RGB"))
        name = "the uploaded image"
        if isinstance(image, (str, os.PathLike)):
            name = str(image)
            image = read_image_bytes(image)
        data = bytes(image)
        if not data:
            raise NotAnImageError(f"{name} is empty")
        try:
            with Image.open(io.BytesIO(data)) as im:
                self._check_pixels(im.width, im.height, name)
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(
                f"{name} is over the limit of {self.max_image_pixels} pixels ({exc})"
            ) from None
        except ImageTooLargeError:
            raise
        except Exception:  # not for Pillow (e.g. a multi-band TIFF): decode_image says what it is
            pass
        try:
            decoded = decode_image(data, name, max_pixels=self.max_image_pixels)
        except ImageDecodeError as exc:
            raise NotAnImageError(" ".join(str(exc).split())) from None
        return self.encoders.transform().array(decoded)

    def _check_pixels(self, width: int, height: int, name: str) -> None:
        if width * height > self.max_image_pixels:
            raise ImageTooLargeError(
                f"{name} is {width}x{height} = {width * height} pixels, over the limit of {self.max_image_pixels}"
            )

    def _exact(
        self, t: _Table, q: np.ndarray, k: int, tree, geo: GeoFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        allowed = geo_rows.filter_rows(t, geo) if geo is not None else None
        if t.matrix is not None:
            rows = t.filter_rows(tree) if tree is not None else None
            if allowed is not None:
                rows = allowed if rows is None else np.intersect1d(rows, allowed)
            return t.matrix.topk(q, k, rows)
        expr = to_arrow(tree) if tree is not None else None
        cols = sorted(columns_of(tree)) if tree is not None else []
        if allowed is not None:  # the scan numbers every batch's rows in this column before filtering
            within = pc.field(ROW).isin(pa.array(allowed, pa.int64()))
            expr = within if expr is None else expr & within
        return scan_topk(t.snapshot, t.table, q, k, filter=expr, filter_columns=cols)

    def _hits(
        self, t: _Table, per_query: list[tuple[np.ndarray, np.ndarray]], geometry: bool = False
    ) -> list[list[Hit]]:
        """Hits of each query's (rows, scores), their metadata read in one `take` for the whole batch (and
        with `geometry` their footprints, in another)."""
        kept = []
        for rows, scores in per_query:
            valid = np.asarray(rows) >= 0  # ANN pads short results with -1
            kept.append((np.asarray(rows)[valid], np.asarray(scores)[valid]))
        every = np.unique(np.concatenate([r for r, _ in kept])) if kept else np.empty(0, np.int64)
        records: dict[int, dict[str, Any]] = {}
        footprints: dict[int, bytes | None] = {}
        if len(every):
            records = dict(zip(every.tolist(), t.records(every)))
            if geometry and t.snapshot.geo:
                wkb = t.snapshot.take(t.table, every, [GEOMETRY]).column(GEOMETRY).to_pylist()
                footprints = dict(zip(every.tolist(), wkb))
        out = []
        for rows, scores in kept:
            hits = []
            for rank, (row, score) in enumerate(zip(rows.tolist(), scores.tolist()), start=1):
                hits.append(Hit.from_record(rank, score, records[row]))
                hits[-1].geometry = footprints.get(row)
            out.append(hits)
        return out

    # ------------------------------------------------------------------------------------------ items

    def item(self, key: str, table: str = "images") -> dict[str, Any] | None:
        """The metadata row of `key` in the current generation (None when the key is not there)."""
        state = self._state
        t = self._table(state, table)
        row = t.key_index().row(key)
        if row is None:
            return None
        return t.records(np.array([row]))[0]


def _recall(ann: AnnIndex, exact_rows: np.ndarray, queries: np.ndarray, k: int) -> float:
    rows, _ = ann.search(queries, k)
    found = sum(len(set(e.tolist()) & {int(r) for r in a if r >= 0}) for e, a in zip(exact_rows, rows))
    return found / max(exact_rows.size, 1)


def _default_cache_dir() -> Path:
    base = os.environ.get("SSJDN_CACHE_DIR") or str(Path.home() / ".cache" / "ssjdn")
    return Path(base) / "searcher"


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
