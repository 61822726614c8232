"""Read access to an embedding store: its versions, and a `Snapshot` of one version that every reader works from.

A snapshot is a version's generation plus its committed files, each with its row count, sha256 and size, in a
fixed order. Rows of a table are addressed by *global row*: file after file in snapshot order, so global row g
lives in the file whose `first_row <= g < first_row + rows`. Scans, the matrix cache and the ANN index stream
embeddings by global row (`iter_embeddings`); hits are fetched back by global row (`take`).

Integrity: a file whose embeddings are streamed is verified against its recorded sha256 and size, once per
process and generation (scans, and always before a matrix cache or ANN index is built from it). Reads of a few
columns (filters, the metadata of the k winners) check the size and Parquet's page CRCs instead of hashing
the whole file. A mismatch raises StoreError naming the file. Files committed before checksums were recorded
are read unverified.
"""

from __future__ import annotations

import logging
import posixpath
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.fsio import UnsafePathError, full_url, get_fs, is_local, safe_join, sha256_of, with_retries
from pipelines.store.manifest import Manifest, read_manifest
from pipelines.store.schema import (
    EMBEDDING,
    MANIFEST,
    MODEL_ID_RE,
    StoreError,
    check_model_id,
    check_table,
    embeddings_to_numpy,
    has_geo,
    meta_columns,
    table_schema,
)

log = logging.getLogger(__name__)

DEFAULT_BATCH_ROWS = 32_768

# (file URL, generation, sha256) of the files this process has verified in full, and (file URL, generation)
# of those whose size it has checked.
_verified: set[tuple[str, int, str]] = set()
_sized: set[tuple[str, int]] = set()
_verified_lock = threading.Lock()


def forget_verified_files() -> None:
    """Forget which files this process has verified (the next read verifies again, as a new process would)."""
    with _verified_lock:
        _verified.clear()
        _sized.clear()


@dataclass(frozen=True)
class CommittedFile:
    """One committed Parquet file of a snapshot."""

    table: str
    path: str  # filesystem path (inside the version, validated)
    rel_path: str  # as the manifest lists it, relative to the version
    rows: int
    first_row: int  # global row of its first row within its table
    sha256: str | None  # None: committed before checksums were recorded
    size: int | None
    unit: str | None


@dataclass(frozen=True, eq=False)
class Snapshot:
    """One generation of one store version: what every reader reads (see the module docstring)."""

    store_url: str
    fs: Any
    version_path: str
    model_id: str
    generation: int
    model: dict[str, Any]
    files: tuple[CommittedFile, ...]

    @property
    def dim(self) -> int:
        return int(self.model["dim"])

    @property
    def dtype(self) -> str:
        return str(self.model["dtype"])

    @property
    def is_local(self) -> bool:
        return is_local(self.fs)

    def url_of(self, file: CommittedFile) -> str:
        return full_url(self.fs, file.path)

    def table_files(self, table: str) -> tuple[CommittedFile, ...]:
        check_table(table)
        return tuple(f for f in self.files if f.table == table)

    def rows(self, table: str) -> int:
        return sum(f.rows for f in self.table_files(table))

    def paths(self, table: str) -> list[str]:
        """Filesystem paths of the committed files of `table`, in global-row order (for pyarrow, DuckDB)."""
        return [f.path for f in self.table_files(table)]

    def row_offsets(self, table: str) -> np.ndarray:
        """[files + 1]: the first global row of each file of `table`, then the table's row count."""
        files = self.table_files(table)
        return np.array([f.first_row for f in files] + [self.rows(table)], np.int64)

    @property
    def geo(self) -> bool:
        """Whether this version's files have the geo columns (written with schema 2, see pipelines.store.schema)."""
        return has_geo(self.model)

    def schema(self, table: str) -> pa.Schema:
        return table_schema(table, self.dim, self.dtype, geo=self.geo)

    def meta_columns(self, table: str) -> tuple[str, ...]:
        """The metadata columns a hit of this version carries."""
        return meta_columns(table, geo=self.geo)

    def require_rows(self, table: str) -> None:
        if self.rows(table) == 0:
            raise StoreError(
                f"version {self.model_id[:12]} of {self.store_url} has no committed {table} embeddings"
            )

    def fingerprint(self, table: str) -> dict[str, Any]:
        """What derived data (matrix cache, ANN index) records to know it was built from exactly this table."""
        files = self.table_files(table)
        return {
            "model_id": self.model_id,
            "generation": self.generation,
            "table": table,
            "rows": self.rows(table),
            "dim": self.dim,
            "files": [f.rel_path for f in files],
            "sha256": [f.sha256 for f in files],
        }

    # ------------------------------------------------------------------------------------------ integrity

    def verify(self, file: CommittedFile) -> None:
        """Check size and sha256 against the snapshot, once per process and generation; StoreError if they differ."""
        self._check_size(file)
        if file.sha256 is None:
            return
        key = (self.url_of(file), self.generation, file.sha256)
        with _verified_lock:
            if key in _verified:
                return
        digest, size = sha256_of(self.fs, file.path)
        if digest != file.sha256 or (file.size is not None and size != file.size):
            raise StoreError(
                f"{self.url_of(file)}: committed file is corrupt: its sha256 is {digest[:16]}…, the manifest of "
                f"version {self.model_id[:12]} (generation {self.generation}) records {file.sha256[:16]}… "
                f"(unit {file.unit}); restore the file, or embed into a fresh store"
            )
        with _verified_lock:
            _verified.add(key)

    def _check_size(self, file: CommittedFile) -> None:
        if file.size is None:
            return
        key = (self.url_of(file), self.generation)
        with _verified_lock:
            if key in _sized:
                return
        try:
            size = self.fs.size(file.path)
        except FileNotFoundError:
            raise StoreError(
                f"{self.url_of(file)}: committed file is missing (version {self.model_id[:12]}, "
                f"generation {self.generation}, unit {file.unit})"
            ) from None
        if size != file.size:
            raise StoreError(
                f"{self.url_of(file)}: committed file is corrupt: {size} bytes, the manifest of version "
                f"{self.model_id[:12]} (generation {self.generation}) records {file.size} (unit {file.unit})"
            )
        with _verified_lock:
            _sized.add(key)

    # ------------------------------------------------------------------------------------------ reading

    def _open(self, file: CommittedFile, columns: Sequence[str]):
        """A ParquetFile on `file`, verified for what is about to be read (see the module docstring)."""
        # A full read (the embeddings) is covered by the file's sha256, checked once per process and
        # generation; a partial read checks the page CRCs of what it reads (about 10 % of a scan's time).
        full = EMBEDDING in columns and file.sha256 is not None
        if full:
            self.verify(file)
        else:
            self._check_size(file)
        if self.is_local:  # memory-mapped: no copy through a Python file object
            return pq.ParquetFile(file.path, memory_map=True, page_checksum_verification=not full), None
        handle = self.fs.open(file.path, "rb")
        return pq.ParquetFile(handle, page_checksum_verification=not full), handle

    def _read_error(self, file: CommittedFile, exc: Exception) -> StoreError:
        return StoreError(f"{self.url_of(file)}: cannot read committed file: {type(exc).__name__}: {exc}")

    def iter_file(
        self, file: CommittedFile, columns: Sequence[str], batch_rows: int = DEFAULT_BATCH_ROWS
    ) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(global row of the batch's first row, batch) over one file, reading only `columns`."""
        columns = list(columns)
        pf, handle = self._open(file, columns)
        at = file.first_row
        try:
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False):
                yield at, batch
                at += batch.num_rows
        except (OSError, pa.ArrowException) as exc:
            raise self._read_error(file, exc) from exc
        finally:
            if handle is not None:
                handle.close()
        if at != file.first_row + file.rows:
            raise StoreError(
                f"{self.url_of(file)} holds {at - file.first_row} rows, the manifest of version "
                f"{self.model_id[:12]} lists {file.rows}"
            )

    def iter_batches(
        self, table: str, columns: Sequence[str], batch_rows: int = DEFAULT_BATCH_ROWS
    ) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(global row of the batch's first row, batch) over every file of `table`, in global-row order."""
        for file in self.table_files(table):
            yield from self.iter_file(file, columns, batch_rows)

    def iter_embeddings(
        self, table: str, batch_rows: int = DEFAULT_BATCH_ROWS
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(global row of the first row, [n, D] float32 embeddings) over the whole table, in global-row order."""
        for start, batch in self.iter_batches(table, [EMBEDDING], batch_rows):
            yield start, embeddings_to_numpy(batch.column(EMBEDDING))

    def locate(self, table: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(file index within `table_files(table)`, row within that file) of each global row."""
        offsets = self.row_offsets(table)
        rows = np.asarray(rows, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= offsets[-1]):
            raise IndexError(f"global rows outside 0..{offsets[-1] - 1} of {table}")
        files = np.searchsorted(offsets, rows, side="right") - 1
        return files, rows - offsets[files]

    def take(self, table: str, rows: Sequence[int], columns: Sequence[str]) -> pa.Table:
        """The given global rows (in that order) of `columns`, reading only the row groups that hold them."""
        rows = np.asarray(rows, np.int64)
        files = self.table_files(table)
        file_idx, local = self.locate(table, rows)
        parts: list[pa.Table] = []
        order: list[np.ndarray] = []
        for f in np.unique(file_idx):
            sel = np.flatnonzero(file_idx == f)
            parts.append(self._take_from_file(files[f], local[sel], list(columns)))
            order.append(sel)
        if not parts:
            return self.schema(table).empty_table().select(list(columns))
        out = pa.concat_tables(parts)
        inverse = np.empty(len(rows), np.int64)
        inverse[np.concatenate(order)] = np.arange(len(rows))
        return out.take(pa.array(inverse))

    def _take_from_file(self, file: CommittedFile, local: np.ndarray, columns: list[str]) -> pa.Table:
        """Rows `local` (in that order) of one file, reading only the row groups that hold them."""
        pf, handle = self._open(file, columns)
        try:
            md = pf.metadata
            starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
            group_of = np.searchsorted(starts, local, side="right") - 1
            groups = np.unique(group_of)
            data = pf.read_row_groups(groups.tolist(), columns=columns, use_threads=False)
        except (OSError, pa.ArrowException) as exc:
            raise self._read_error(file, exc) from exc
        finally:
            if handle is not None:
                handle.close()
        # where each wanted group starts in `data` (the groups read, one after another)
        sizes = starts[groups + 1] - starts[groups]
        read_at = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        idx = read_at[np.searchsorted(groups, group_of)] + (local - starts[group_of])
        return data.take(pa.array(idx, pa.int64()))

    def dataset(self, table: str = "images"):
        """A pyarrow dataset over exactly the committed files (None when the table has none); unverified."""
        import pyarrow.dataset as pads

        paths = self.paths(table)
        if not paths:
            return None
        return pads.dataset(paths, schema=self.schema(table), format="parquet", filesystem=self.fs)

    def read_table(self, table: str = "images", columns: Sequence[str] | None = None) -> pa.Table:
        """The committed rows of `table` (optionally only some `columns`) in global-row order, verified like any
        other read. For filtered or lazy reads use `dataset()` (pyarrow) or DuckDB on `paths()`."""
        schema = self.schema(table)
        columns = list(schema.names if columns is None else columns)
        parts = []
        for file in self.table_files(table):
            pf, handle = self._open(file, columns)
            try:
                parts.append(pf.read(columns=columns, use_threads=False))
            except (OSError, pa.ArrowException) as exc:
                raise self._read_error(file, exc) from exc
            finally:
                if handle is not None:
                    handle.close()
        return pa.concat_tables(parts) if parts else schema.empty_table().select(columns)


class EmbeddingStore:
    """A store at any fsspec URL: its versions, their manifests (the commit records) and snapshots."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = str(url)
        self.storage_options = storage_options or {}
        self.fs, self.root = get_fs(self.url, self.storage_options)

    def version_path(self, model_id: str) -> str:
        check_model_id(model_id)
        return safe_join(self.root, model_id)

    def version_url(self, model_id: str) -> str:
        return full_url(self.fs, self.version_path(model_id))

    def model_ids(self) -> list[str]:
        """Versions with a committed manifest, oldest first."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            name = posixpath.basename(entry.rstrip("/"))
            if MODEL_ID_RE.match(name):
                manifest = self.read_manifest(name)
                if manifest is not None:
                    found.append((manifest.created_at, name))
        return [name for _, name in sorted(found)]

    def read_manifest(self, model_id: str) -> Manifest | None:
        base = self.version_path(model_id)
        return with_retries(lambda: read_manifest(self.fs, base), what=f"read the manifest of {base}")

    def resolve_model_id(self, model_id: str | None = None) -> str:
        """The version to read: `model_id` (a full id or a unique prefix), or the only/newest one.

        Raises StoreError with a message that says what the store holds.
        """
        ids = self.model_ids()
        if not ids:
            raise StoreError(
                f"embedding store {self.url} is empty: no committed version{self._misplaced()} (run "
                f"`ssjdn embed ARCHIVE {self.url} --checkpoint CKPT` first)"
            )
        if model_id is None:
            if len(ids) > 1:
                log.info("store %s holds %d versions; using the newest, %s", self.url, len(ids), ids[-1][:12])
            return ids[-1]
        matches = [i for i in ids if i.startswith(model_id.lower())] if model_id else []
        if len(matches) == 1:
            return matches[0]
        listing = ", ".join(i[:12] for i in ids)
        if not matches:
            raise StoreError(f"model_id {model_id!r} is not in store {self.url}; it holds: {listing}")
        raise StoreError(f"model_id prefix {model_id!r} is ambiguous in store {self.url}: {listing}")

    def _misplaced(self) -> str:
        """For the empty-store message: manifests in folders that are not named like a version."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return ""
        found = []
        for entry in entries:
            if not MODEL_ID_RE.match(posixpath.basename(entry.rstrip("/"))):
                path = posixpath.join(entry.rstrip("/"), MANIFEST)
                if self.fs.exists(path):
                    found.append(full_url(self.fs, path))
        if not found:
            return ""
        return f"; not versions (their folder is not named by a model_id): {', '.join(found[:3])}"

    def manifest(self, model_id: str | None = None) -> Manifest:
        """The commit record of a version (units, bad samples, files); readers use `snapshot`."""
        mid = self.resolve_model_id(model_id)
        manifest = self.read_manifest(mid)
        if manifest is None:  # deleted between listing and reading
            raise StoreError(f"version {mid} of store {self.url} has no manifest")
        return manifest

    def snapshot(self, model_id: str | None = None) -> Snapshot:
        """The current snapshot of a version (`model_id`: full id or unique prefix; default the newest)."""
        return self.snapshot_of(self.manifest(model_id))

    def snapshot_of(self, manifest: Manifest) -> Snapshot:
        base = self.version_path(manifest.model_id)
        files, first = [], {t: 0 for t in ("images", "captions")}
        for entry in sorted(manifest.files, key=lambda f: (f["table"], f["path"])):
            table = entry["table"]
            if table not in first:
                raise StoreError(
                    f"manifest of {manifest.model_id[:12]} lists a file of unknown table {table!r}"
                )
            try:
                path = safe_join(base, entry["path"])
            except UnsafePathError as exc:
                raise StoreError(f"manifest of {manifest.model_id[:12]} lists an unsafe path: {exc}") from exc
            rows = int(entry["rows"])
            files.append(
                CommittedFile(
                    table=table,
                    path=path,
                    rel_path=entry["path"],
                    rows=rows,
                    first_row=first[table],
                    sha256=entry.get("sha256"),
                    size=None if entry.get("bytes") is None else int(entry["bytes"]),
                    unit=entry.get("unit"),
                )
            )
            first[table] += rows
        return Snapshot(
            store_url=self.url,
            fs=self.fs,
            version_path=base,
            model_id=manifest.model_id,
            generation=manifest.generation,
            model=dict(manifest.model),
            files=tuple(files),
        )
