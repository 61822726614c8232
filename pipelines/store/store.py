"""Versioned Parquet embedding store.

Layout (one version per checkpoint; `model_id` = sha256 of the checkpoint file):

    STORE/{model_id}/_manifest.json                 commit point: the committed files and the units they cover
    STORE/{model_id}/images/part-*.parquet          one row per image
    STORE/{model_id}/captions/part-*.parquet        one row per caption (optional)
    STORE/{model_id}/_staging/{run_id}/...          files of a run that are not committed yet (never read)

A *unit* is the piece of the archive that is embedded and committed as a whole: one WebDataset shard, or a
chunk of plain image files. Writers stage Parquet files, move them to their final names and then rewrite the
manifest (atomically, last). Readers list files from the manifest only, so a killed run leaves nothing
visible: files it moved but did not list are invisible and get overwritten by the re-run (names are
deterministic per unit). One writer per version at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import posixpath
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.fsio import (
    UnsafePathError,
    atomic_write_json,
    commit,
    full_url,
    get_fs,
    is_local,
    read_json,
    safe_join,
    with_retries,
)

log = logging.getLogger(__name__)

FORMAT = "ssjdn-embedding-store/1"
MANIFEST = "_manifest.json"
STAGING = "_staging"
TABLES = ("images", "captions")
DTYPES = {"float32": pa.float32(), "float16": pa.float16()}
DEFAULT_MAX_ROWS_PER_FILE = 50_000
_MODEL_ID = re.compile(r"^[0-9a-f]{64}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")

# Columns shared by both tables, in schema order. `class` is the scene class name (null when unlabelled).
META_COLUMNS = ("key", "source", "split", "class", "lat", "lon")
CAPTION_COLUMNS = ("image_key", "caption_index", "caption")


class StoreError(RuntimeError):
    """The store cannot answer: empty, unknown version, corrupt manifest, incompatible write."""


# ---------------------------------------------------------------------------------------------- schema


def embedding_type(dim: int, dtype: str = "float32") -> pa.DataType:
    if dtype not in DTYPES:
        raise ValueError(f"embedding dtype {dtype!r} is not one of {sorted(DTYPES)}")
    # Non-null items: Parquet then stores no definition level per float, which reads ~2x faster.
    return pa.list_(pa.field("item", DTYPES[dtype], nullable=False), dim)


def table_schema(table: str, dim: int, dtype: str = "float32") -> pa.Schema:
    """The Parquet schema of `table` ("images" or "captions"); documented in docs/store.md."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; expected one of {TABLES}")
    fields = [pa.field("key", pa.string(), nullable=False)]
    if table == "captions":
        fields += [
            pa.field("image_key", pa.string(), nullable=False),
            pa.field("caption_index", pa.int32(), nullable=False),
            pa.field("caption", pa.string(), nullable=False),
        ]
    fields += [
        pa.field("source", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("class", pa.string()),
        pa.field("lat", pa.float64()),
        pa.field("lon", pa.float64()),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("embedding", embedding_type(dim, dtype), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
    return pa.schema(fields)


def embedding_array(matrix: np.ndarray, dtype: str = "float32") -> pa.FixedSizeListArray:
    """A portable `fixed_size_list<float>[D]` column from an [N, D] matrix (not Ray's tensor extension type)."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D [N, D] array, got shape {matrix.shape}")
    flat = np.ascontiguousarray(matrix, dtype=np.dtype(dtype)).reshape(-1)
    if not np.all(np.isfinite(flat)):
        raise ValueError("embeddings contain NaN or infinite values")
    values = pa.array(flat, type=DTYPES[dtype])
    return pa.FixedSizeListArray.from_arrays(values, type=embedding_type(matrix.shape[1], dtype))


def embeddings_to_numpy(column: pa.Array | pa.ChunkedArray, dtype=np.float32) -> np.ndarray:
    """[N, D] numpy matrix from a fixed-size-list column (zero-copy where the layout allows)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    dim = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, dim).astype(dtype, copy=False)


def build_table(
    table: str,
    columns: dict[str, Iterable[Any]],
    embeddings: np.ndarray,
    *,
    dim: int,
    model_id: str,
    dtype: str = "float32",
    created_at: datetime | None = None,
) -> pa.Table:
    """Assemble one table's rows, sorted by key so identical input gives identical files."""
    n = len(embeddings)
    schema = table_schema(table, dim, dtype)
    created_at = created_at or datetime.now(timezone.utc)
    data: dict[str, Any] = {}
    for f in schema:
        if f.name == "embedding":
            data[f.name] = embedding_array(np.asarray(embeddings).reshape(n, dim), dtype)
        elif f.name == "model_id":
            data[f.name] = pa.array([model_id] * n, pa.string())
        elif f.name == "created_at":
            data[f.name] = pa.array([created_at] * n, f.type)
        else:
            values = list(columns.get(f.name, [None] * n))
            if len(values) != n:
                raise ValueError(f"column {f.name!r} has {len(values)} values for {n} embeddings")
            data[f.name] = pa.array(values, f.type)
    out = pa.table(data, schema=schema)
    return out.sort_by("key") if n else out


# ---------------------------------------------------------------------------------------------- manifest


@dataclass
class Manifest:
    """The commit point of one version. Lists only: the JSON stays easy to read from DuckDB."""

    model_id: str
    model: dict[str, Any]
    files: list[dict[str, Any]] = field(default_factory=list)
    units: list[dict[str, Any]] = field(default_factory=list)
    created_at: str = ""
    updated_at: str = ""
    generation: int = 0

    @classmethod
    def from_json(cls, doc: dict[str, Any], where: str) -> Manifest:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise StoreError(f"{where}: not an embedding-store manifest (expected format {FORMAT!r})")
        try:
            return cls(
                model_id=doc["model_id"],
                model=doc["model"],
                files=list(doc["files"]),
                units=list(doc["units"]),
                created_at=doc.get("created_at", ""),
                updated_at=doc.get("updated_at", ""),
                generation=int(doc.get("generation", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from exc

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model_id": self.model_id,
            "model": self.model,
            "files": self.files,
            "units": self.units,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "generation": self.generation,
        }

    @property
    def dim(self) -> int:
        return int(self.model["dim"])

    @property
    def dtype(self) -> str:
        return str(self.model["dtype"])

    def unit_map(self) -> dict[str, dict[str, Any]]:
        return {u["id"]: u for u in self.units}

    def rows(self, table: str) -> int:
        return sum(int(f["rows"]) for f in self.files if f["table"] == table)

    def row_offsets(self, table: str) -> np.ndarray:
        """[files + 1] first global row of each committed file of `table` (manifest order), then the total:
        global row g is row g - offsets[f] of file f = searchsorted(offsets, g, "right") - 1."""
        rows = [int(f["rows"]) for f in self.files if f["table"] == table]
        return np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)


def unit_slug(unit_id: str) -> str:
    """File-name-safe, collision-free token for a unit id (`test/shard-000003.tar` -> `test_shard-000003_tar-1a2b3c4d`)."""
    digest = hashlib.sha1(unit_id.encode("utf-8")).hexdigest()[:8]
    return f"{_UNSAFE.sub('_', unit_id).strip('_')[-80:]}-{digest}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- reader


class EmbeddingStore:
    """Read access to a store at any fsspec URL; sees committed files only."""

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
            if _MODEL_ID.match(name):
                manifest = self.read_manifest(name)
                if manifest is not None:
                    found.append((manifest.created_at, name))
        return [name for _, name in sorted(found)]

    def read_manifest(self, model_id: str) -> Manifest | None:
        path = safe_join(self.version_path(model_id), MANIFEST)
        doc = with_retries(lambda: read_json(self.fs, path), what=f"read {path}")
        return None if doc is None else Manifest.from_json(doc, full_url(self.fs, path))

    def resolve_model_id(self, model_id: str | None = None) -> str:
        """The version to read: `model_id` (a full id or a unique prefix), or the only/newest one.

        Raises StoreError with a message that says what the store holds.
        """
        ids = self.model_ids()
        if not ids:
            raise StoreError(
                f"embedding store {self.url} is empty: no committed version (run `ssjdn embed ARCHIVE {self.url} "
                "--checkpoint CKPT` first)"
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

    def manifest(self, model_id: str | None = None) -> Manifest:
        mid = self.resolve_model_id(model_id)
        manifest = self.read_manifest(mid)
        if manifest is None:  # deleted between listing and reading
            raise StoreError(f"version {mid} of store {self.url} has no manifest")
        return manifest

    def committed_files(self, manifest: Manifest, table: str) -> list[str]:
        """Filesystem paths of the committed Parquet files of `table`, validated to stay inside the version."""
        base = self.version_path(manifest.model_id)
        paths = []
        for f in manifest.files:
            if f["table"] != table:
                continue
            try:
                paths.append(safe_join(base, f["path"]))
            except UnsafePathError as exc:
                raise StoreError(f"manifest of {manifest.model_id[:12]} lists an unsafe path: {exc}") from exc
        return paths

    def dataset(self, manifest: Manifest, table: str = "images"):
        """A pyarrow dataset over exactly the committed files (None when the table has none)."""
        import pyarrow.dataset as pads

        paths = self.committed_files(manifest, table)
        if not paths:
            return None
        schema = table_schema(table, manifest.dim, manifest.dtype)
        return pads.dataset(paths, schema=schema, format="parquet", filesystem=self.fs)

    def read_table(self, manifest: Manifest, table: str = "images", columns=None, filter=None) -> pa.Table:
        ds = self.dataset(manifest, table)
        if ds is None:
            return table_schema(table, manifest.dim, manifest.dtype).empty_table()
        return ds.to_table(columns=columns, filter=filter)


def check_model_id(model_id: str) -> str:
    if not isinstance(model_id, str) or not _MODEL_ID.match(model_id):
        raise StoreError(f"{model_id!r} is not a model_id (the sha256 hex digest of a checkpoint)")
    return model_id


# ---------------------------------------------------------------------------------------------- writer


@dataclass
class StagedUnit:
    unit: dict[str, Any]
    files: list[tuple[str, str, dict[str, Any]]]  # (staged path, final path, manifest file entry)


class VersionWriter:
    """Stages whole units and commits them: final names first, the manifest (listing them) last.

    `model` is recorded in the manifest (checkpoint URL, config name, dim, dtype, ...). Reopening an existing
    version checks that dim and dtype agree, so one version never mixes layouts.
    """

    def __init__(
        self,
        store: EmbeddingStore,
        model_id: str,
        model: dict[str, Any],
        *,
        max_rows_per_file: int = DEFAULT_MAX_ROWS_PER_FILE,
        run_id: str | None = None,
    ) -> None:
        if max_rows_per_file < 1:
            raise ValueError("max_rows_per_file must be at least 1")
        self.store = store
        self.fs = store.fs
        self.model_id = check_model_id(model_id)
        self.base = store.version_path(model_id)
        self.max_rows_per_file = max_rows_per_file
        self.run_id = run_id or f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        self.staging = safe_join(self.base, STAGING, self.run_id)
        existing = store.read_manifest(model_id)
        if existing is None:
            now = _now()
            self.manifest = Manifest(model_id=model_id, model=dict(model), created_at=now, updated_at=now)
        else:
            for k in ("dim", "dtype"):
                if str(existing.model.get(k)) != str(model.get(k)):
                    raise StoreError(
                        f"version {model_id[:12]} in {store.url} stores {k}={existing.model.get(k)!r}; "
                        f"this run would write {k}={model.get(k)!r}. Use the same setting or another store."
                    )
            self.manifest = existing
        self.pending: list[StagedUnit] = []

    @property
    def dim(self) -> int:
        return int(self.manifest.model["dim"])

    @property
    def dtype(self) -> str:
        return str(self.manifest.model["dtype"])

    def done(self) -> dict[str, dict[str, Any]]:
        """Committed units by id."""
        return self.manifest.unit_map()

    def remove_stale_staging(self) -> None:
        """Drop what killed runs left in `_staging/` (single writer per version: they are dead)."""
        root = safe_join(self.base, STAGING)
        try:
            if self.fs.exists(root):
                log.info("removing leftovers of interrupted runs under %s", full_url(self.fs, root))
                self.fs.rm(root, recursive=True)
        except FileNotFoundError:
            pass

    def stage(self, unit: dict[str, Any], tables: dict[str, pa.Table]) -> None:
        """Write one unit's tables to staging (bounded rows per file). `unit` must have an `id`.

        The unit entry records per table the row count (`images`, `captions`: int or None when not embedded).
        """
        unit = dict(unit)
        unit_id = unit["id"]
        prior = self.done().get(unit_id)
        slug = unit_slug(unit_id)
        files = []
        for table, data in tables.items():
            expected = table_schema(table, self.dim, self.dtype)
            if not data.schema.equals(expected):
                raise StoreError(
                    f"unit {unit_id}: {table} rows do not match the store schema:\n{data.schema}"
                )
            if prior is not None and prior.get(table) is not None:
                raise StoreError(f"unit {unit_id} already has committed {table}; versions are append-only")
            unit[table] = data.num_rows
            for i, start in enumerate(range(0, max(data.num_rows, 1), self.max_rows_per_file)):
                part = data.slice(start, self.max_rows_per_file)
                if part.num_rows == 0:
                    break
                rel = f"{table}/part-{slug}-{i:04d}.parquet"
                staged = safe_join(self.staging, rel)
                self._write_parquet(part, staged)
                entry = {"table": table, "path": rel, "rows": part.num_rows, "unit": unit_id}
                files.append((staged, safe_join(self.base, rel), entry))
        if prior is not None:  # a unit that gains a table (e.g. captions added later) keeps the old counts
            unit = {**prior, **{k: v for k, v in unit.items() if v is not None}}
        self.pending.append(StagedUnit(unit=unit, files=files))

    def _write_parquet(self, table: pa.Table, path: str) -> None:
        if is_local(self.fs):
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)

        def write() -> None:
            with self.fs.open(path, "wb") as f:
                # Embeddings are incompressible floats: store them plain, compress the metadata.
                pq.write_table(
                    table,
                    f,
                    compression={c: ("none" if c == "embedding" else "zstd") for c in table.column_names},
                    use_dictionary=[c for c in table.column_names if c != "embedding"],
                    row_group_size=8192,
                )

        with_retries(write, what=f"write {full_url(self.fs, path)}")

    def commit(self) -> int:
        """Publish every staged unit with one manifest write; returns how many units were committed."""
        if not self.pending:
            return 0
        for staged in self.pending:
            for src, dst, _ in staged.files:
                with_retries(
                    lambda s=src, d=dst: commit(self.fs, s, d), what=f"commit {full_url(self.fs, dst)}"
                )
        units = self.manifest.unit_map()
        files = list(self.manifest.files)
        for staged in self.pending:
            units[staged.unit["id"]] = {**staged.unit, "committed_at": _now()}
            files.extend(entry for _, _, entry in staged.files)
        self.manifest.units = sorted(units.values(), key=lambda u: u["id"])
        self.manifest.files = sorted(files, key=lambda f: (f["table"], f["path"]))
        self.manifest.generation += 1
        self.manifest.updated_at = _now()
        path = safe_join(self.base, MANIFEST)
        with_retries(lambda: atomic_write_json(self.fs, path, self.manifest.to_json()), what=f"write {path}")
        n = len(self.pending)
        self.pending = []
        log.info(
            "committed %d unit(s) to %s (generation %d)",
            n,
            full_url(self.fs, self.base),
            self.manifest.generation,
        )
        return n

    def close(self) -> None:
        """Remove this run's (now empty) staging folder."""
        parent = posixpath.dirname(self.staging)
        with contextlib.suppress(FileNotFoundError, OSError):
            if self.fs.exists(self.staging):
                self.fs.rm(self.staging, recursive=True)
            if self.fs.exists(parent) and not self.fs.ls(parent, detail=False):
                self.fs.rm(parent, recursive=True)
