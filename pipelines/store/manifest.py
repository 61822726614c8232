"""The commit mechanism of a store version: the manifest document, how it is read, and how writers commit.

`_manifest.json` is the commit point: it lists the committed Parquet files (row count, sha256 and size each) and
the units they cover, under a `generation` that grows by one per commit. Readers never see this module's
types: `EmbeddingStore.snapshot()` turns the manifest into a `Snapshot` (pipelines.store.reader), so another
commit mechanism (a table format) can replace this one without touching any reader.

Concurrent writers commit safely:

- `commit_lock(...)` serialises commits of one version. Local disk: an `flock` on `_commit.lock` (the kernel
  drops it when its process dies). S3: a lock object created with a conditional put (`IfNoneMatch="*"`)
  holding a lease; an expired lease is taken over with `IfMatch=<its ETag>`, so only one writer wins it.
  Other filesystems: no lock (a warning says so), the compare-and-swap below still applies where it can.
- `read_for_update(...)` returns the current manifest and a token; `write_manifest(..., token)` is a
  compare-and-swap on it. S3: a conditional put on `_manifest.json` (`IfMatch` its ETag, or `IfNoneMatch`
  for the first commit). Local disk: the generation is re-read under the lock just before the atomic rename.
  A lost race raises `ManifestConflict`; the writer then re-reads, merges its units again and retries.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pipelines.fsio import atomic_write_json, full_url, is_local, json_bytes, safe_join
from pipelines.store.schema import COMMIT_LOCK, FORMAT, MANIFEST, StoreError

log = logging.getLogger(__name__)

LOCK_LEASE_S = 120.0  # an S3 commit lock not renewed for this long belongs to a dead writer
LOCK_POLL_S = 0.2
DEFAULT_LOCK_TIMEOUT_S = 900.0


class ManifestConflict(StoreError):
    """Another writer committed between this writer's read and its write: read again, merge, retry."""


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
    # Files a replaced unit no longer uses: unlisted (no new reader sees them) but kept for a grace period, so a
    # reader that opened an older generation can finish; each entry has `path`, `retired_at` (unix seconds).
    retired: list[dict[str, Any]] = field(default_factory=list)

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
                retired=list(doc.get("retired", [])),
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
            "retired": self.retired,
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


def _is_s3(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocols or "s3a" in protocols


def _parse(data: bytes, path: str, fs) -> Manifest:
    where = full_url(fs, path)
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{where}: unreadable manifest ({exc})") from exc
    return Manifest.from_json(doc, where)


def read_manifest(fs, version_path: str) -> Manifest | None:
    """The committed manifest of a version, or None when it has none. A direct GET on object stores (never a
    listing cache), so a reader sees the latest commit."""
    path = safe_join(version_path, MANIFEST)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    return _parse(data, path, fs)


def read_for_update(fs, version_path: str) -> tuple[Manifest | None, Any]:
    """(manifest or None, token for `write_manifest`'s compare-and-swap)."""
    path = safe_join(version_path, MANIFEST)
    if _is_s3(fs):
        try:
            data, etag = _s3_get(fs, path)
        except FileNotFoundError:
            return None, None
        return _parse(data, path, fs), etag
    manifest = read_manifest(fs, version_path)
    return manifest, None if manifest is None else manifest.generation


def write_manifest(fs, version_path: str, manifest: Manifest, token: Any) -> None:
    """Publish `manifest` if the committed one is still the one `token` came from; else ManifestConflict."""
    path = safe_join(version_path, MANIFEST)
    if _is_s3(fs):
        data = json_bytes(manifest.to_json())
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            _s3_put(fs, path, data, condition)
        except Exception as exc:
            if _precondition_failed(exc):
                raise ManifestConflict(f"{full_url(fs, path)} changed since it was read") from exc
            raise
        fs.invalidate_cache(version_path)
        return
    current = read_manifest(
        fs, version_path
    )  # under the commit lock: nothing moves between here and the rename
    if (None if current is None else current.generation) != token:
        raise ManifestConflict(
            f"{full_url(fs, path)} is at generation {current.generation if current else None}, "
            f"this commit was prepared on {token}"
        )
    atomic_write_json(fs, path, manifest.to_json())


# ---------------------------------------------------------------------------------------------- commit lock


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


class _NoLock:
    def renew(self) -> None:
        pass


class _LocalLock:
    """`flock` on the lock file: exclusive between processes, released by the kernel when a holder dies."""

    def __init__(self, path: str, owner: str, timeout_s: float) -> None:
        import fcntl

        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout_s
        waited = False
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = _read_text(path)
                    os.close(self.fd)
                    raise StoreError(
                        f"another writer has held the commit lock {path} for over {timeout_s:.0f}s ({holder}); "
                        "try again when it has finished"
                    ) from None
                if not waited:
                    log.info("waiting for another writer's commit to %s (%s)", path, _read_text(path))
                    waited = True
                time.sleep(LOCK_POLL_S)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"owner": owner, **_holder()}).encode(), 0)

    def renew(self) -> None:
        pass

    def release(self) -> None:
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or "holder unknown"
    except OSError:
        return "holder unknown"


class _S3Lock:
    """A lock object with a lease: created with IfNoneMatch="*", renewed and taken over with IfMatch=ETag."""

    def __init__(self, fs, path: str, owner: str, timeout_s: float) -> None:
        self.fs, self.path, self.owner = fs, path, owner
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        deadline = time.monotonic() + timeout_s
        waited = False
        while True:
            if self._put({"IfNoneMatch": "*"}):
                return
            try:
                data, etag = _s3_get(fs, path)
                holder = json.loads(data.decode("utf-8"))
            except FileNotFoundError:  # released between our put and our read
                continue
            except (UnicodeDecodeError, json.JSONDecodeError):
                holder, etag = {"expires_at": 0}, None
            if float(holder.get("expires_at", 0)) < time.time() and etag is not None:
                if self._put({"IfMatch": etag}):
                    log.warning("took over the expired commit lock %s of %s", full_url(fs, path), holder)
                    return
                continue
            if time.monotonic() > deadline:
                raise StoreError(
                    f"another writer has held the commit lock {full_url(fs, path)} for over {timeout_s:.0f}s "
                    f"({holder}); try again when it has finished"
                )
            if not waited:
                log.info("waiting for another writer's commit to %s (%s)", full_url(fs, path), holder)
                waited = True
            time.sleep(LOCK_POLL_S)

    def _put(self, condition: dict[str, str]) -> bool:
        doc = {
            "owner": self.owner,
            "token": self.token,
            "expires_at": time.time() + LOCK_LEASE_S,
            **_holder(),
        }
        try:
            out = _s3_put(self.fs, self.path, json.dumps(doc).encode(), condition)
        except Exception as exc:
            if _precondition_failed(exc):
                return False
            raise
        self.etag = out.get("ETag")
        self.renewed = time.monotonic()
        return True

    def renew(self) -> None:
        """Extend the lease (between long steps of a commit); fails loudly when the lock was taken over."""
        if time.monotonic() - self.renewed < LOCK_LEASE_S / 4:
            return
        if not self._put({"IfMatch": self.etag} if self.etag else {}):
            raise StoreError(
                f"lost the commit lock {full_url(self.fs, self.path)}: its lease expired mid-commit"
            )

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            data, _ = _s3_get(self.fs, self.path)
            if json.loads(data.decode("utf-8")).get("token") == self.token:
                self.fs.rm_file(self.path)


@contextlib.contextmanager
def commit_lock(
    fs, version_path: str, owner: str, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S
) -> Iterator[Any]:
    """Hold the version's commit lock; yields an object whose `renew()` a long commit calls between steps."""
    path = safe_join(version_path, COMMIT_LOCK)
    if is_local(fs):
        lock: Any = _LocalLock(path, owner, timeout_s)
    elif _is_s3(fs):
        lock = _S3Lock(fs, path, owner, timeout_s)
    else:
        log.warning(
            "%s: no commit lock on this filesystem (%s): concurrent writers into one version are not safe",
            full_url(fs, version_path),
            fs.protocol,
        )
        yield _NoLock()
        return
    try:
        yield lock
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------- S3 calls


def _s3_get(fs, path: str) -> tuple[bytes, str]:
    """(body, ETag) of one object, from one GET (so the ETag is the body's)."""
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)

    async def get() -> tuple[bytes, str]:
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            body = await resp["Body"].read()
        finally:
            resp["Body"].close()
        return body, resp["ETag"]

    return sync(fs.loop, get)


def _s3_put(fs, path: str, data: bytes, condition: dict[str, str]) -> dict[str, Any]:
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)

    async def put() -> dict[str, Any]:
        return await fs._call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)

    out = sync(fs.loop, put)
    fs.invalidate_cache(path)
    return out


def _precondition_failed(exc: BaseException) -> bool:
    """A conditional put that lost (412 PreconditionFailed, or 409 ConditionalRequestConflict)."""
    if isinstance(exc, FileExistsError):  # s3fs's translation of a failed IfNoneMatch
        return True
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return True
    return False
