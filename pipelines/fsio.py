"""fsspec plumbing shared by the jobs: URL -> (filesystem, path), atomic writes, safe joins, storage retries.

Any fsspec URL works: a local path, `s3://bucket/prefix`, `memory://`, ... For S3 the endpoint and credentials
come from the standard AWS environment variables (`AWS_ENDPOINT_URL[_S3]`, `AWS_ACCESS_KEY_ID`, ...) or from
storage options (`--storage-option key=value` on the command line). Credentials are never logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from fsspec.utils import get_protocol

from pipelines.errors import PipelineError

log = logging.getLogger(__name__)

T = TypeVar("T")

_SECRET_HINTS = ("secret", "token", "password", "passwd", "credential", "key", "session")


class UnsafePathError(PipelineError, ValueError):
    """A relative path that would leave its root (`..`, absolute, or a URL)."""


class StorageOptionError(PipelineError, ValueError):
    """A `--storage-option` that is not `key=value` (or clashes with another)."""


class StorageError(PipelineError, RuntimeError):
    """A storage operation kept failing after its retries; the message says what, where and why."""


# ---------------------------------------------------------------------------------------------- options


def _coerce(value: str) -> Any:
    """`true`/`false`/`null`, numbers and JSON objects become Python values; anything else stays a string."""
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if value[:1] in "{[" or value.lstrip("-").replace(".", "", 1).isdigit():
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value


def parse_storage_options(items: Iterable[str] | None) -> dict[str, Any]:
    """Parse `key=value` strings into fsspec storage options.

    Dotted keys nest (`client_kwargs.region_name=eu-west-1` -> `{"client_kwargs": {"region_name": ...}}`),
    values are coerced (`anon=true` -> True, `default_block_size=8388608` -> int).
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise StorageOptionError(f"storage option {item.split('=')[0]!r} is not of the form key=value")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise StorageOptionError(f"storage option {key!r} conflicts with an earlier non-nested option")
        node[leaf] = _coerce(value)
    return out


def redact(options: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of storage options that is safe to log: anything that looks like a credential is masked."""
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif any(h in k.lower() for h in _SECRET_HINTS) and k.lower() not in ("endpoint_url",):
            out[k] = "***"
        else:
            out[k] = v
    return out


def _with_env_defaults(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """Make the S3 endpoint explicit so fsspec's instance cache can't hand out a client for another endpoint.

    botocore reads the variables itself as well; credentials are deliberately left to botocore's own chain.
    """
    opts = dict(options)
    if get_protocol(url) in ("s3", "s3a") and "endpoint_url" not in opts:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs = opts.get("client_kwargs") or {}
        if endpoint and "endpoint_url" not in client_kwargs:
            opts["endpoint_url"] = endpoint
    return opts


def get_fs(url: str, storage_options: dict[str, Any] | None = None):
    """`url` -> `(filesystem, path)`: the fsspec filesystem and the path without protocol, trailing `/` removed."""
    import fsspec.core

    url = os.fspath(url)
    opts = _with_env_defaults(url, storage_options or {})
    fs, path = fsspec.core.url_to_fs(url, **opts)
    if is_local(fs):
        path = os.path.abspath(path)
    return fs, path.rstrip("/") or "/"


def is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def full_url(fs, path: str) -> str:
    """The URL another process (or webdataset) can open: plain path for local files, `proto://path` otherwise."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def describe_endpoint(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """A one-line, credential-free description of where `url` lives, for log lines."""
    if get_protocol(url) not in ("s3", "s3a"):
        return url
    opts = _with_env_defaults(url, storage_options or {})
    endpoint = (
        opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url") or "AWS default"
    )
    return f"{url} (endpoint {endpoint})"


# ---------------------------------------------------------------------------------------------- paths


def safe_join(root: str, *parts: str) -> str:
    """Join relative `parts` under `root` (posix separators), refusing anything that would escape `root`."""
    rel: list[str] = []
    for part in parts:
        part = os.fspath(part)
        if not part or "://" in part or part.startswith(("/", "\\")) or "\\" in part or "\x00" in part:
            raise UnsafePathError(f"refusing path {part!r}: must be relative to {root!r}")
        for seg in part.split("/"):
            if seg in ("", "."):
                continue
            if seg == "..":
                raise UnsafePathError(f"refusing path {part!r}: '..' would leave {root!r}")
            rel.append(seg)
    if not rel:
        raise UnsafePathError(f"refusing empty path under {root!r}")
    return posixpath.join(root.rstrip("/") or "/", *rel)


# ---------------------------------------------------------------------------------------------- atomic writes


def temp_path(final_path: str, temp_dir: str | None = None) -> str:
    """A unique temporary sibling (or a name inside `temp_dir`) for `final_path`."""
    name = f"{posixpath.basename(final_path)}.{uuid.uuid4().hex[:12]}.partial"
    return posixpath.join(temp_dir or posixpath.dirname(final_path), name)


def commit(fs, tmp: str, final: str) -> None:
    """Make a fully written temporary file visible under its final name.

    Local: `os.replace` (atomic on one filesystem). Object stores have no rename: copy (server side) and
    then delete the temporary object; readers only ever see the final key once it is complete.
    """
    if is_local(fs):
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(tmp, final)
        return
    fs.copy(tmp, final)
    fs.rm(tmp)
    fs.invalidate_cache(posixpath.dirname(final))


def remove_quietly(fs, path: str, recursive: bool = False) -> None:
    """Best-effort delete (temporary files): a failure here must not hide the error being handled."""
    with contextlib.suppress(Exception):
        fs.rm(path, recursive=recursive)


@contextlib.contextmanager
def atomic_open(fs, path: str, temp_dir: str | None = None) -> Iterator[Any]:
    """`with atomic_open(fs, path) as f: f.write(...)`: written under a temporary name, committed on success.

    On any error the temporary file is removed and `path` is untouched.
    """
    tmp = temp_path(path, temp_dir)
    if is_local(fs):
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
    try:
        with fs.open(tmp, "wb") as f:
            yield f
        commit(fs, tmp, path)
    except BaseException:
        remove_quietly(fs, tmp)
        raise


def atomic_write_bytes(fs, path: str, data: bytes, temp_dir: str | None = None) -> None:
    with atomic_open(fs, path, temp_dir) as f:
        f.write(data)


def atomic_write_json(fs, path: str, obj: Any, temp_dir: str | None = None) -> None:
    atomic_write_bytes(fs, path, json_bytes(obj), temp_dir)


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, no whitespace noise) so identical content gives identical bytes."""
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def read_json(fs, path: str) -> Any | None:
    """The JSON document at `path`, or None when it does not exist."""
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None


def sha256_of(fs, path: str, block: int = 8 << 20) -> tuple[str, int]:
    """(sha256 hex, size) of a stored file, streamed."""
    h = hashlib.sha256()
    n = 0
    with fs.open(path, "rb", block_size=block) if not is_local(fs) else open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


class HashingWriter:
    """Write-through wrapper that hashes and counts the bytes on their way to storage (no second read).

    Writes are batched (`batch_bytes`; many small parts are joined into one) and every batch goes to two
    background threads, one hashing and one writing - both release the GIL - so the caller prepares the next
    piece meanwhile and pays one hand-over per batch, not per write. On large files sha256 (~1.1 GB/s here)
    is the slowest step; with its own thread the write no longer waits behind it. Written objects must not be
    changed afterwards. Use it as a context manager around the open target: leaving the block waits until every
    byte is hashed and written, and re-raises the first write error (a failed write is also raised by a later
    `write`). At most `max_pending` batches are in flight per thread.
    """

    def __init__(self, raw, max_pending: int = 8, batch_bytes: int = 1 << 20) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0
        self.batch_bytes = batch_bytes
        self._batch: list = []
        self._batched = 0
        self._error: BaseException | None = None
        self._queues = [queue.Queue(maxsize=max_pending), queue.Queue(maxsize=max_pending)]
        self._threads = [
            threading.Thread(
                target=self._drain, args=(q, consume), name=f"hashing-writer-{name}", daemon=True
            )
            for q, consume, name in zip(self._queues, (self.sha.update, raw.write), ("hash", "write"))
        ]
        for t in self._threads:
            t.start()

    def _drain(self, q: queue.Queue, consume) -> None:
        while (parts := q.get()) is not None:
            if self._error is None:  # after a failure keep taking items, so a blocked `write` wakes up
                try:
                    for data in parts:
                        consume(data)
                except BaseException as exc:
                    self._error = exc

    def write(self, data) -> int:
        self.writelines((data,))
        return len(data)

    def writelines(self, parts) -> None:
        """`write` for each part, in one call."""
        if self._error is not None:
            raise self._error
        n = sum(map(len, parts))
        self._batch += parts
        self._batched += n
        self.size += n
        if self._batched >= self.batch_bytes:
            self._send()

    def _send(self) -> None:
        batch = self._batch
        if not batch:
            return
        if len(batch) > 1 and self._batched < 64 * 1024 * len(batch):  # many small parts: one joined piece
            batch = [b"".join(batch)]
        for q in self._queues:
            q.put(batch)
        self._batch, self._batched = [], 0

    def _stop(self) -> None:
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()

    def close(self) -> None:
        """Wait until everything written is hashed and written; raise the first write error."""
        if any(t.is_alive() for t in self._threads):
            self._send()
            self._stop()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller failed: stop the threads, their error (if any) is secondary
            self._stop()

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


# ---------------------------------------------------------------------------------------------- retries


def is_storage_error(exc: BaseException) -> bool:
    """Transient-looking storage failures worth retrying: connection/timeouts/5xx, not missing files or bad data."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    mod = type(exc).__module__ or ""
    if mod.startswith(("botocore", "aiobotocore", "aiohttp", "urllib3", "requests")):
        return True
    # s3fs translates service errors to OSError; local disk errors (ENOSPC, EIO) are OSError as well.
    return isinstance(exc, OSError) and not mod.startswith("PIL")


def with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    retries: int = 3,
    backoff: float = 1.0,
    retry_on: Callable[[BaseException], bool] = is_storage_error,
) -> T:
    """Call `fn`, retrying storage errors with exponential backoff (backoff, 2*backoff, ...).

    After the last try raises `StorageError` naming `what` and the last cause.
    """
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if not retry_on(exc):
                raise
            attempt += 1
            if attempt > retries:
                raise StorageError(
                    f"{what}: storage still failing after {retries} retries: {type(exc).__name__}: {exc}"
                ) from exc
            delay = backoff * 2 ** (attempt - 1)
            log.warning(
                "%s: %s: %s; retry %d/%d in %.1fs", what, type(exc).__name__, exc, attempt, retries, delay
            )
            time.sleep(delay)
