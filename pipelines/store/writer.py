"""Writing a store version: whole units are staged, then committed together with one manifest update.

A *unit* is the piece of the archive that is embedded and committed as a whole: one WebDataset shard, or a
chunk of plain image files. A writer stages a unit's Parquet files under `_staging/{run_id}/` (recording each
file's sha256 and size as it is written), and `commit()` then, holding the version's commit lock
(pipelines.store.manifest): re-reads the manifest, leaves out units another writer committed meanwhile, moves
the staged files to their final names (deterministic per unit) and publishes the merged manifest with a
compare-and-swap, re-merging on a conflict. Readers list files from the manifest only, so a killed run leaves
nothing visible.

A unit whose source changed is *replaced*: `stage(unit, tables, replaces=...)` names the committed entry it
supersedes (its fingerprint and commit time, as the run saw them). Its new files get names of their own (the
run id in them), and the commit that lists them unlists the old entry's files in the same manifest update, so
a reader sees the old rows or the new ones, never both. The old files are kept (`retired` in the manifest) for
`retire_grace_s`, for readers still on an older generation, and deleted by a later commit. If another writer
changed that entry first, this run's copy is dropped, as for any unit committed meanwhile.

A unit whose source is gone (a re-tiled scene's old shards, a shard its archive's manifest no longer lists) is
*removed*: `stage_removal(unit_id, token)` unlists its files (retired as above) with the next commit, together
with whatever was staged before it - a changed scene's new units and its old units' removal are one manifest
update. A unit another writer replaced or removed meanwhile is left as that writer left it.

Several writers may work on one version at once (two `ssjdn embed` runs over different splits): every run
keeps a lease (`_staging/{run_id}.lease.json`: host, pid, expiry), and a writer clears only the staging
folders of runs that are dead (same host and the process is gone, or the lease expired).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from pipelines.fsio import (
    atomic_write_json,
    commit,
    full_url,
    is_local,
    is_storage_error,
    safe_join,
    with_retries,
)
from pipelines.geo.geoparquet import BBOX, GEOMETRY, with_geo_metadata
from pipelines.geo.prune import bbox_arrays
from pipelines.store.manifest import (
    DEFAULT_LOCK_TIMEOUT_S,
    Manifest,
    ManifestConflict,
    commit_lock,
    read_for_update,
    write_manifest,
)
from pipelines.store.reader import EmbeddingStore
from pipelines.store.schema import (
    CURRENT_SCHEMA,
    DEFAULT_MAX_ROWS_PER_FILE,
    EMBEDDING,
    GEO_COLUMNS,
    LEASE_SUFFIX,
    ROW_GROUP_ROWS,
    SCHEMA_KEY,
    STAGING,
    StoreError,
    check_model_id,
    has_geo,
    table_schema,
)

log = logging.getLogger(__name__)

RUN_LEASE_S = 3600.0  # a run on another host that has not renewed its lease for this long is dead
RETIRE_GRACE_S = 3600.0  # a replaced unit's old files outlive their last generation by this long
MAX_COMMIT_ATTEMPTS = 20
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def unit_slug(unit_id: str) -> str:
    """File-name-safe, collision-free token for a unit id (`test/shard-000003.tar` -> `test_shard-000003_tar-1a2b3c4d`)."""
    digest = hashlib.sha1(unit_id.encode("utf-8")).hexdigest()[:8]
    return f"{_UNSAFE.sub('_', unit_id).strip('_')[-80:]}-{digest}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _HashingFile:
    """A write-only file object that hashes and counts what passes through it (what pyarrow needs of one)."""

    def __init__(self, raw) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data) -> int:
        self.sha.update(data)
        self.raw.write(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()


@dataclass
class StagedUnit:
    unit: dict[str, Any]
    files: list[tuple[str, str, dict[str, Any]]]  # (staged path, final path, manifest file entry)
    moved: bool = False
    replaces: dict[str, Any] | None = (
        None  # the committed entry this unit supersedes (fingerprint, committed_at)
    )
    removal: bool = False  # no files: the commit unlists the committed entry `replaces` names


def replacement_token(entry: dict[str, Any]) -> dict[str, Any]:
    """What identifies a committed unit entry for `stage(..., replaces=)`: unchanged until it is replaced."""
    return {"fingerprint": entry.get("fingerprint"), "committed_at": entry.get("committed_at")}


def _geo_schema(table: pa.Table) -> pa.Schema:
    """The file's schema with GeoParquet's `geo` key: its geometry types and extent (none without footprints)."""
    geoms = table.column(GEOMETRY).drop_null().to_pylist()
    types = set(shapely.get_type_id(shapely.from_wkb(geoms)).tolist()) if geoms else set()
    names = {
        int(shapely.GeometryType.POLYGON): "Polygon",
        int(shapely.GeometryType.MULTIPOLYGON): "MultiPolygon",
    }
    extent = None
    if geoms:
        xmin, ymin, xmax, ymax = bbox_arrays(table.column(BBOX))
        extent = [np.nanmin(xmin), np.nanmin(ymin), np.nanmax(xmax), np.nanmax(ymax)]
    # geometry_types [] means "any": used when a file holds something other than polygons
    listed = [names[t] for t in types] if types <= set(names) else []
    return with_geo_metadata(table.schema, listed, extent)


def _alive(lease: dict[str, Any]) -> bool:
    """Whether the run that wrote `lease` may still be working: on this host, whether its process exists;
    elsewhere, whether its lease has not expired."""
    if lease.get("host") != socket.gethostname():
        return float(lease.get("expires_at", 0)) >= time.time()
    try:
        os.kill(int(lease["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    return True


class VersionWriter:
    """Stages whole units and commits them (see the module docstring).

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
        lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
        retire_grace_s: float = RETIRE_GRACE_S,
    ) -> None:
        if max_rows_per_file < 1:
            raise ValueError("max_rows_per_file must be at least 1")
        self.store = store
        self.fs = store.fs
        self.model_id = check_model_id(model_id)
        self.base = store.version_path(model_id)
        self.max_rows_per_file = max_rows_per_file
        self.lock_timeout_s = lock_timeout_s
        self.retire_grace_s = retire_grace_s
        self.run_id = run_id or f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        self.staging = safe_join(self.base, STAGING, self.run_id)
        self.lease_path = safe_join(self.base, STAGING, self.run_id + LEASE_SUFFIX)
        self._lease_renewed: float | None = None
        self.model = dict(model)
        existing = store.read_manifest(model_id)
        if existing is None:
            now = _now()
            # A new version gets the current schema (a test may ask for an older one); an existing one keeps
            # the schema its files were written with.
            first = {**model, SCHEMA_KEY: int(model.get(SCHEMA_KEY, CURRENT_SCHEMA))}
            self.manifest = Manifest(model_id=model_id, model=first, created_at=now, updated_at=now)
        else:
            self._check_compatible(existing)
            self.manifest = existing
        self.pending: list[StagedUnit] = []
        self.superseded: list[str] = []  # units another writer committed first (this run's copy was dropped)
        self.replaced: list[str] = []  # units whose old entry this run's commits replaced
        self.removed: list[str] = []  # units this run's commits unlisted (their source is gone)
        self._expired: list[dict[str, Any]] = []  # retired files the manifest being written stops keeping
        self._replacing: list[str] = []  # units the manifest being written replaces
        self._removing: list[str] = []  # units the manifest being written unlists

    def _check_compatible(self, existing: Manifest) -> None:
        for k in ("dim", "dtype"):
            if str(existing.model.get(k)) != str(self.model.get(k)):
                raise StoreError(
                    f"version {self.model_id[:12]} in {self.store.url} stores {k}={existing.model.get(k)!r}; "
                    f"this run would write {k}={self.model.get(k)!r}. Use the same setting or another store."
                )

    @property
    def dim(self) -> int:
        return int(self.manifest.model["dim"])

    @property
    def dtype(self) -> str:
        return str(self.manifest.model["dtype"])

    @property
    def geo(self) -> bool:
        """Whether this version's files have the geo columns (schema 2)."""
        return has_geo(self.manifest.model)

    def _conform(self, unit_id: str, table: str, data: pa.Table) -> pa.Table:
        """`data` in this version's schema: a version written before the geo columns takes rows without
        footprints (the geo columns dropped, so its new files match its old ones), never footprints."""
        expected = table_schema(table, self.dim, self.dtype, geo=self.geo)
        if not self.geo and GEO_COLUMNS[0] in data.column_names:
            present = [
                c for c in GEO_COLUMNS if c in data.column_names and data.column(c).null_count < len(data)
            ]
            if present:
                raise StoreError(
                    f"unit {unit_id}: version {self.model_id[:12]} in {self.store.url} was written before the "
                    f"geo columns and cannot hold {', '.join(present)}; embed georeferenced chips into a new store"
                )
            data = data.drop_columns([c for c in GEO_COLUMNS if c in data.column_names])
        if not data.schema.equals(expected):
            raise StoreError(f"unit {unit_id}: {table} rows do not match the store schema:\n{data.schema}")
        return data

    def done(self) -> dict[str, dict[str, Any]]:
        """Committed units by id (as of the last manifest this writer read)."""
        return self.manifest.unit_map()

    # ------------------------------------------------------------------------------------------ runs

    def _renew_lease(self, force: bool = False) -> None:
        if not force and self._lease_renewed and time.monotonic() - self._lease_renewed < RUN_LEASE_S / 8:
            return
        doc = {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "renewed_at": _now(),
            "expires_at": time.time() + RUN_LEASE_S,
        }
        with_retries(
            lambda: atomic_write_json(self.fs, self.lease_path, doc), what=f"write {self.lease_path}"
        )
        self._lease_renewed = time.monotonic()

    def remove_stale_staging(self) -> None:
        """Drop what dead runs left in `_staging/` (folders of live concurrent writers are left alone)."""
        root = safe_join(self.base, STAGING)
        try:
            entries = self.fs.ls(root, detail=False)
        except FileNotFoundError:
            return
        runs: dict[str, list[str]] = {}
        for entry in entries:
            name = posixpath.basename(entry.rstrip("/"))
            runs.setdefault(name.split(".", 1)[0], []).append(entry)
        for run_id, paths in runs.items():
            if run_id == self.run_id:
                continue
            lease_path = safe_join(root, run_id + LEASE_SUFFIX)
            lease = None
            if any(p.rstrip("/").endswith(LEASE_SUFFIX) for p in paths):
                try:
                    lease = json.loads(self.fs.cat_file(lease_path))
                except (FileNotFoundError, ValueError):
                    continue  # being written or removed right now: not ours to judge
            elif any(".lease.json." in p for p in paths):
                continue  # a lease being written: a run starting up
            if lease is not None and _alive(lease):
                continue
            log.info("removing leftovers of interrupted run %s under %s", run_id, full_url(self.fs, root))
            for p in sorted(paths, key=lambda p: p.endswith(LEASE_SUFFIX)):  # the lease last
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(p, recursive=True)
        with contextlib.suppress(FileNotFoundError, OSError):
            if not self.fs.ls(root, detail=False):
                self.fs.rm(root, recursive=True)

    # ------------------------------------------------------------------------------------------ staging

    def stage(
        self, unit: dict[str, Any], tables: dict[str, pa.Table], *, replaces: dict[str, Any] | None = None
    ) -> None:
        """Write one unit's tables to staging (bounded rows per file). `unit` must have an `id`.

        The unit entry records per table the row count (`images`, `captions`: int or None when not embedded).
        `replaces`: the `replacement_token` of the committed entry this unit supersedes (its source changed);
        the commit then swaps the old entry's files for these.
        """
        unit = dict(unit)
        unit_id = unit["id"]
        prior = None if replaces is not None else self.done().get(unit_id)
        # A replacement's files must not take a name an older copy of the unit used (it may still be listed, or
        # retired and due for deletion): the run id makes them new.
        slug = unit_slug(unit_id) + (f"-{self.run_id}" if replaces is not None else "")
        self._renew_lease()
        files = []
        for table, data in tables.items():
            data = self._conform(unit_id, table, data)
            if prior is not None and prior.get(table) is not None:
                raise StoreError(f"unit {unit_id} already has committed {table}; versions are append-only")
            unit[table] = data.num_rows
            for i, start in enumerate(range(0, max(data.num_rows, 1), self.max_rows_per_file)):
                part = data.slice(start, self.max_rows_per_file)
                if part.num_rows == 0:
                    break
                rel = f"{table}/part-{slug}-{i:04d}.parquet"
                staged = safe_join(self.staging, rel)
                sha256, size = self._write_parquet(part, staged)
                entry = {
                    "table": table,
                    "path": rel,
                    "rows": part.num_rows,
                    "unit": unit_id,
                    "sha256": sha256,
                    "bytes": size,
                }
                files.append((staged, safe_join(self.base, rel), entry))
        self.pending.append(StagedUnit(unit=unit, files=files, replaces=replaces))

    def stage_removal(self, unit_id: str, token: dict[str, Any]) -> None:
        """Unlist committed unit `unit_id` (its `replacement_token` as the caller saw it) with the next commit."""
        self.pending.append(StagedUnit(unit={"id": unit_id}, files=[], replaces=dict(token), removal=True))

    def _write_parquet(self, table: pa.Table, path: str) -> tuple[str, int]:
        if GEOMETRY in table.column_names:
            table = table.replace_schema_metadata(_geo_schema(table).metadata)
        if is_local(self.fs):
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)

        def write() -> tuple[str, int]:
            with self.fs.open(path, "wb") as f:
                out = _HashingFile(f)
                # Embeddings are incompressible floats: store them plain, compress the metadata. Page CRCs let
                # partial reads (filters, the winners' metadata) check what they read without hashing the file.
                pq.write_table(
                    table,
                    out,
                    compression={c: ("none" if c == EMBEDDING else "zstd") for c in table.column_names},
                    use_dictionary=[c for c in table.column_names if c != EMBEDDING],
                    row_group_size=ROW_GROUP_ROWS,
                    write_page_checksum=True,
                )
            return out.sha.hexdigest(), out.size

        return with_retries(write, what=f"write {full_url(self.fs, path)}")

    # ------------------------------------------------------------------------------------------ commit

    def commit(self) -> int:
        """Publish every staged unit with one manifest update; returns how many units this call committed.

        Holds the version's commit lock; merges into whatever other writers committed meanwhile. A unit (table)
        another writer committed first is not committed twice: this run's copy is dropped, with a warning, and
        listed in `superseded`.
        """
        if not self.pending:
            return 0
        self._renew_lease(force=True)
        with commit_lock(self.fs, self.base, self.run_id, self.lock_timeout_s) as lock:
            for _ in range(MAX_COMMIT_ATTEMPTS):
                latest, token = with_retries(
                    lambda: read_for_update(self.fs, self.base), what=f"read the manifest of {self.base}"
                )
                if latest is not None:
                    self._check_compatible(latest)
                merged, committed = self._merge(latest, lock)
                if committed == 0:  # everything was committed by other writers first
                    merged, self._expired, self._replacing, self._removing = latest, [], [], []
                    break
                try:
                    with_retries(
                        lambda m=merged, t=token: write_manifest(self.fs, self.base, m, t),
                        what=f"write the manifest of {full_url(self.fs, self.base)}",
                        retry_on=lambda e: not isinstance(e, StoreError) and is_storage_error(e),
                    )
                except ManifestConflict as exc:
                    log.info("concurrent commit to %s (%s); merging again", full_url(self.fs, self.base), exc)
                    continue
                break
            else:
                raise StoreError(
                    f"could not commit to {full_url(self.fs, self.base)}: the manifest kept changing "
                    f"({MAX_COMMIT_ATTEMPTS} attempts)"
                )
        if merged is not None:
            self.manifest = merged
            self.replaced += [u for u in self._replacing if u not in self.replaced]
            self.removed += [u for u in self._removing if u not in self.removed]
            self._delete_expired(merged)
        self.pending = []
        log.info(
            "committed %d change(s) to %s (generation %d)",
            committed,
            full_url(self.fs, self.base),
            self.manifest.generation,
        )
        return committed

    def _merge(self, latest: Manifest | None, lock) -> tuple[Manifest, int]:
        """The manifest after this commit: `latest` plus the pending units it does not hold yet (their files
        moved to their final names now, under the lock)."""
        now = _now()
        if latest is None:
            base = Manifest(
                model_id=self.model_id,
                model=dict(self.manifest.model),
                created_at=self.manifest.created_at or now,
            )
        else:
            base = latest
        units = base.unit_map()
        files = list(base.files)
        listed = {f["path"] for f in files}
        kept = []
        for staged in self.pending:
            uid = staged.unit["id"]
            theirs = units.get(uid, {})
            if staged.removal:  # gone already, or replaced by another writer: nothing of ours to unlist
                if theirs and replacement_token(theirs) == staged.replaces:
                    kept.append(staged)
                else:
                    log.info("unit %s was removed or replaced by another writer meanwhile", uid)
                continue
            tables = [t for t in ("images", "captions") if staged.unit.get(t) is not None]
            clash = [t for t in tables if theirs.get(t) is not None]
            if staged.replaces is not None:  # a replacement clashes when the entry it replaces is gone
                clash = tables if theirs and replacement_token(theirs) != staged.replaces else []
            if clash and not staged.moved:
                log.warning(
                    "unit %s (%s) was committed to %s by another writer meanwhile; this run's copy is dropped",
                    uid,
                    ", ".join(clash),
                    full_url(self.fs, self.base),
                )
                self.superseded.append(uid)
                for src, _, _ in staged.files:
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm(src)
                continue
            if not staged.moved:
                for src, dst, entry in staged.files:
                    if entry["path"] in listed:
                        raise StoreError(
                            f"{full_url(self.fs, dst)} is already committed; refusing to replace it"
                        )
                    with_retries(
                        lambda s=src, d=dst: commit(self.fs, s, d), what=f"commit {full_url(self.fs, dst)}"
                    )
                    lock.renew()
                staged.moved = True
            kept.append(staged)
        retired = self._still_retired(base.retired)
        self._replacing, self._removing = [], []
        for staged in kept:
            uid = staged.unit["id"]
            prior = units.get(uid)
            if staged.removal:
                retired += [
                    {"path": f["path"], "unit": uid, "retired_at": time.time()}
                    for f in files
                    if f.get("unit") == uid
                ]
                files = [f for f in files if f.get("unit") != uid]
                units.pop(uid, None)
                self._removing.append(uid)
                continue
            unit = dict(staged.unit)
            if staged.replaces is not None and prior is not None:
                old = [f for f in files if f.get("unit") == uid]
                files = [f for f in files if f.get("unit") != uid]
                retired += [{"path": f["path"], "unit": uid, "retired_at": time.time()} for f in old]
                self._replacing.append(uid)
            elif (
                prior is not None
            ):  # a unit that gains a table (e.g. captions added later) keeps the old counts
                unit = {**prior, **{k: v for k, v in unit.items() if v is not None}}
            units[uid] = {**unit, "committed_at": now}
            files.extend(entry for _, _, entry in staged.files if entry["path"] not in listed)
        self.pending = kept
        merged = Manifest(
            model_id=base.model_id,
            model=base.model,
            files=sorted(files, key=lambda f: (f["table"], f["path"])),
            units=sorted(units.values(), key=lambda u: u["id"]),
            created_at=base.created_at or now,
            updated_at=now,
            generation=base.generation + 1,
            retired=retired,
        )
        self._expired = [r for r in base.retired if r not in retired]
        return merged, len(kept)

    def _still_retired(self, retired: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The retired files still within their grace period (the others are deleted after this commit)."""
        cutoff = time.time() - self.retire_grace_s
        return [r for r in retired if float(r.get("retired_at", 0)) > cutoff]

    def _delete_expired(self, merged: Manifest) -> None:
        """Delete the retired files the manifest just written no longer keeps (never a listed file)."""
        listed = {f["path"] for f in merged.files}
        for entry in self._expired:
            if entry["path"] in listed:
                continue
            with contextlib.suppress(FileNotFoundError, OSError):
                self.fs.rm(safe_join(self.base, entry["path"]))
        self._expired = []

    def close(self) -> None:
        """Remove this run's (now empty) staging folder and its lease."""
        parent = posixpath.dirname(self.staging)
        with contextlib.suppress(FileNotFoundError, OSError):
            if self.fs.exists(self.staging):
                self.fs.rm(self.staging, recursive=True)
        with contextlib.suppress(FileNotFoundError, OSError):
            if self._lease_renewed is not None:
                self.fs.rm(self.lease_path)
        with contextlib.suppress(FileNotFoundError, OSError):
            if self.fs.exists(parent) and not self.fs.ls(parent, detail=False):
                self.fs.rm(parent, recursive=True)
