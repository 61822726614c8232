"""Writing one shard: read and validate each image, stream the tar (hashing on the way), commit it, record it.

Runs in worker processes (or a thread of the parent); everything it needs comes in a picklable `ShardJob` and
`WriteContext`. Per sample the hot path is: one read of the file, one header parse plus a structural check (or
one decode with `validate="full"`), one json dump, and one hand-over of the sample's tar parts to
`HashingWriter` (which hashes and writes them in two background threads).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import posixpath
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fsspec.utils import get_protocol

from pipelines.fsio import (
    HashingWriter,
    atomic_write_bytes,
    commit,
    full_url,
    get_fs,
    is_local,
    json_bytes,
    read_json,
    remove_quietly,
    safe_join,
    sha256_of,
    temp_path,
    with_retries,
)
from pipelines.shard import faults
from pipelines.shard.layout import (
    EXT_OF_FORMAT,
    REENCODE,
    TAR_BLOCK,
    TAR_MODE,
    TAR_MTIME,
    TAR_OWNER,
    TAR_RECORD,
    TMP,
)
from pipelines.shard.options import ShardOptions
from pipelines.shard.plan import ShardJob, ShardResult, WriteContext, bad_entry

log = logging.getLogger("pipelines.shard")

# ---------------------------------------------------------------------------------------------- one shard

# Where a shard writer reports (samples, image bytes) done: the parent's bar, or a queue in a worker process.
# Thread-local because the Prefect flow writes several groups of shards in threads of one process.
_progress = threading.local()


def set_progress_sink(sink: Callable[[int, int], None] | None) -> Callable[[int, int], None] | None:
    """Send this thread's progress reports (samples, image bytes) to `sink`; returns the previous sink."""
    previous = getattr(_progress, "sink", None)
    _progress.sink = sink
    return previous


def _no_progress(samples: int, nbytes: int) -> None:
    pass


def report_progress(samples: int, nbytes: int) -> None:
    sink = getattr(_progress, "sink", None)
    if sink is not None:
        sink(samples, nbytes)


def _encode_image(
    data: bytes, info: Any, name: str, options: ShardOptions
) -> tuple[bytes, str, dict[str, Any]]:
    """(image bytes, member extension, json fields): the original bytes unless resizing/re-encoding is asked."""
    ext = EXT_OF_FORMAT.get(info.format) or posixpath.splitext(name)[1].lstrip(".").lower() or "img"
    fields = {"width": info.width, "height": info.height, "format": info.format, "mode": info.mode}
    needs_resize = options.resize is not None and max(info.width, info.height) > options.resize
    if not needs_resize and (options.reencode is None or REENCODE[options.reencode][0] == info.format):
        return data, ext, fields
    from PIL import Image

    from ssjdn.data.images import decode_image

    img = decode_image(data, name)
    if needs_resize:
        scale = options.resize / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    target = options.reencode or next((e for e, (f, _) in REENCODE.items() if f == info.format), "png")
    pil_format, save_kw = REENCODE[target]
    buf = io.BytesIO()
    img.save(buf, format=pil_format, **save_kw)
    fields.update(
        width=img.width,
        height=img.height,
        format=pil_format,
        mode=img.mode,
        original={"width": info.width, "height": info.height, "format": info.format},
    )
    return buf.getvalue(), target, fields


def _sample_members(
    meta: dict[str, Any], options: ShardOptions, dataset: str
) -> tuple[dict[str, bytes], int]:
    """The tar members of one planned sample (reads and validates its image); raises for a bad sample."""
    from ssjdn.data.images import check_image, read_image_bytes

    data = read_image_bytes(meta["source"])
    name = meta.get("filename") or meta["source"]
    # One open of the file: format, size, mode, plus the structural check or the full decode; or ImageDecodeError.
    info = check_image(data, name, level=options.validation)
    image, ext, image_fields = _encode_image(data, info, name, options)
    doc = {**meta, **image_fields, "dataset": dataset}
    members = {
        "__key__": meta["key"],
        ext: image,
        "json": json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
        "txt": meta["captions"][0].encode("utf-8"),
    }
    if meta.get("class_index") is not None:
        members["cls"] = str(meta["class_index"]).encode("ascii")
    return members, len(data)


# Where it pays, samples are read, validated and encoded by threads ahead of the tar writer, a batch per task,
# in order: remote reads wait on the network and Pillow decodes without the GIL. Measured on UCM with
# `--validate full` (2 cores): 1.43 s in the writer's thread, 1.10 s with 2 threads, 1.23 s with 4; local files
# checked for structure are mostly Python work, where threads (4 preparing, or 1 reading ahead) were slower warm
# and no faster cold than kernel read-ahead hints, so they are read and checked in the writer's own thread.
# Memory: at most 2 batches per thread (READ_AHEAD_BYTES of source images) are in flight per writer.
NETWORK_THREADS = 4
BATCH_SAMPLES = 16
BATCH_BYTES = 8 << 20
READ_AHEAD_BYTES = 64 << 20


# Local files are announced to the kernel (posix_fadvise WILLNEED) this many samples ahead: it reads them in the
# background while this thread checks and writes, without a thread of ours. From a cold page cache this cut the
# write phase on UCM from 0.51 to 0.32 s (best of 5; warm: unchanged).
READ_HINT_AHEAD = 32


def _hint_reads(planned: list) -> None:
    if not hasattr(os, "posix_fadvise"):
        return
    for meta, _, _ in planned:
        try:
            fd = os.open(meta["source"].removeprefix("file://"), os.O_RDONLY)
        except OSError:
            continue  # missing now: reported when its turn comes
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def _pool_threads(planned: list, options: ShardOptions) -> int:
    """Threads that prepare samples ahead of the writer: 0 (this thread does it), one per core where Pillow
    decodes (without the GIL), NETWORK_THREADS for remote sources (reads wait on the network)."""
    if any(get_protocol(meta["source"]) != "file" for meta, _, _ in planned):
        return NETWORK_THREADS
    if options.validation == "full" or options.resize or options.reencode:
        return min(NETWORK_THREADS, os.cpu_count() or 1)
    return 0


def _batches(planned: list) -> Iterator[tuple[list, int]]:
    batch, nbytes = [], 0
    for meta, size, _ in planned:
        if batch and (len(batch) >= BATCH_SAMPLES or nbytes + size > BATCH_BYTES):
            yield batch, nbytes
            batch, nbytes = [], 0
        batch.append(meta)
        nbytes += size
    if batch:
        yield batch, nbytes


def _prepared(planned: list, options: ShardOptions, dataset: str) -> Iterator[tuple[dict, Any]]:
    """(metadata, (members, image bytes) or the exception that made it a bad sample) per planned sample, in order."""

    def prepare(batch: list[dict[str, Any]]) -> list[Any]:
        out = []
        for meta in batch:
            try:
                faults.before_read(meta["source"])
                out.append(_sample_members(meta, options, dataset))
            except Exception as exc:  # sorted out by the caller: a bad sample, or re-raised
                out.append(exc)
        return out

    threads = _pool_threads(planned, options)
    if not threads:
        for i, (meta, _, _) in enumerate(planned):
            if i % READ_HINT_AHEAD == 0:
                _hint_reads(planned[i + READ_HINT_AHEAD : i + 2 * READ_HINT_AHEAD])
            yield meta, prepare([meta])[0]
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="shard-read") as pool:
        pending: deque = deque()
        in_flight = 0
        batches = _batches(planned)
        try:
            while True:
                while not pending or (len(pending) < 2 * threads and in_flight < READ_AHEAD_BYTES):
                    nxt = next(batches, None)
                    if nxt is None:
                        break
                    pending.append((nxt, pool.submit(prepare, nxt[0])))
                    in_flight += nxt[1]
                if not pending:
                    return
                (batch, nbytes), fut = pending.popleft()
                in_flight -= nbytes
                yield from zip(batch, fut.result())
        finally:
            for _, fut in pending:
                fut.cancel()


def _is_bad_sample_error(exc: BaseException) -> bool:
    from ssjdn.data.errors import DataError

    return isinstance(exc, (DataError, FileNotFoundError, IsADirectoryError))


class TarStream:
    """Minimal deterministic tar writer: USTAR headers with fixed owner, mode and mtime; members in given order.

    Why not `wds.TarWriter`/`tarfile`: tarfile's stream mode costs ~0.5 ms per sample here (header building in
    Python plus buffer copies) against ~0.08 ms for headers built from a template (docs/sharding.md).
    The output is a plain POSIX tar that `tarfile`, GNU tar and webdataset read. Names over 100 bytes fall
    back to tarfile's own PAX header so nothing is ever truncated.
    """

    RECORD = TAR_RECORD

    def __init__(self, out) -> None:
        self.out = out
        self.written = 0
        template = bytearray(TAR_BLOCK)
        template[148:156] = b"        "  # the checksum field counts as spaces while summing
        template[100:108] = b"%07o\x00" % TAR_MODE
        template[108:124] = b"0000000\x000000000\x00"  # uid, gid
        template[136:148] = b"%011o\x00" % TAR_MTIME
        template[156:157] = b"0"  # regular file
        template[257:265] = b"ustar\x0000"
        owner = TAR_OWNER.encode()
        template[265 : 265 + len(owner)] = owner
        template[297 : 297 + len(owner)] = owner
        template[329:345] = b"0000000\x000000000\x00"  # devmajor, devminor
        # A header is name | mode uid gid | size | mtime | checksum | the rest: only name, size and checksum vary.
        self._mode_ids, self._mtime, self._rest = (
            bytes(template[100:124]),
            bytes(template[136:148]),
            bytes(template[156:]),
        )
        self._sum = sum(template)  # name and size fields are still zero here
        self._zeros = [bytes(n) for n in range(TAR_BLOCK)]

    def _header(self, name: str, size: int) -> bytes:
        raw = name.encode("utf-8")
        if len(raw) > 100 or not name.isascii():
            import tarfile

            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = size, TAR_MTIME, TAR_MODE
            ti.uname = ti.gname = TAR_OWNER
            return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")
        size_field = b"%011o\x00" % size
        # The checksum is the byte sum of the header: the template's plus what was filled in (no 512-byte sum).
        checksum = b"%06o\x00 " % (self._sum + sum(raw) + sum(size_field))
        return b"".join(
            (raw, self._zeros[100 - len(raw)], self._mode_ids, size_field, self._mtime, checksum, self._rest)
        )

    def _member(self, name: str, data: bytes, parts: list[bytes]) -> None:
        header = self._header(name, len(data))
        parts += (header, data, self._zeros[-len(data) % TAR_BLOCK])
        self.written += len(header) + len(data) + (-len(data) % TAR_BLOCK)

    def add(self, name: str, data: bytes) -> None:
        """Append one member."""
        parts: list[bytes] = []
        self._member(name, data, parts)
        self.out.writelines(parts)

    def write_sample(self, sample: dict[str, bytes]) -> None:
        """`{"__key__": k, ext: bytes, ...}` -> members `k.ext` in sorted extension order (as webdataset). The parts
        go to `out` in one `writelines` call, as they are (no copy): `out` batches small writes."""
        key = sample["__key__"]
        parts: list[bytes] = []
        for ext in sorted(k for k in sample if not k.startswith("_")):
            self._member(f"{key}.{ext}", sample[ext], parts)
        self.out.writelines(parts)

    def close(self) -> None:
        end = self.written + 2 * TAR_BLOCK
        trailer = bytes(2 * TAR_BLOCK + (-end % self.RECORD))
        self.out.write(trailer)
        self.written += len(trailer)


def _write_once(job: ShardJob, ctx: WriteContext, fs, root: str, dataset: str) -> ShardResult:
    final = safe_join(root, job.path)
    tmp = temp_path(final, safe_join(root, TMP, job.split))
    bad: list[dict[str, Any]] = []
    keys: list[str] = []
    classes: dict[str, int] = {}
    captions = input_bytes = 0
    report = getattr(_progress, "sink", None) or _no_progress  # looked up once, not per sample
    if is_local(fs):
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
    try:
        # We open and close the stream ourselves: on S3 the object only exists once close() returns.
        # Hashing and writing happen in HashingWriter's threads while this one reads and checks the next sample.
        with open(tmp, "wb") if is_local(fs) else fs.open(tmp, "wb") as raw, HashingWriter(raw) as out:
            tar = TarStream(out)
            # A job may bring its own producer of (metadata, members or bad-sample error) pairs (pipelines.tile).
            produce = getattr(job, "produce", None)
            planned = job.planned()
            samples = produce(planned, ctx, dataset) if produce else _prepared(planned, ctx.options, dataset)
            for meta, prepared in samples:
                if isinstance(prepared, BaseException):
                    if not _is_bad_sample_error(prepared):
                        with contextlib.suppress(AttributeError):  # which URL failed, for the error message
                            prepared.source_url = meta.get("source")
                        raise prepared
                    reason = f"{type(prepared).__name__}: {prepared}"
                    details = getattr(prepared, "details", {})  # e.g. a chip's scene and window
                    bad.append({**bad_entry(meta, reason, "image", job.name), **details})
                    report(1, 0)
                    continue
                members, n_in = prepared
                tar.write_sample(members)
                keys.append(meta["key"])
                captions += len(meta.get("captions") or ())
                if meta.get("class_name"):
                    classes[meta["class_name"]] = classes.get(meta["class_name"], 0) + 1
                input_bytes += n_in
                report(1, n_in)
            tar.close()
        commit(fs, tmp, final)
    except BaseException:
        remove_quietly(fs, tmp)
        raise
    return ShardResult(
        split=job.split,
        index=job.index,
        path=job.path,
        digest=job.digest,
        samples=len(keys),
        captions=captions,
        bytes=out.size,
        sha256=out.hexdigest(),
        first_key=keys[0] if keys else None,
        last_key=keys[-1] if keys else None,
        input_bytes=input_bytes,
        bad=bad,
        classes=classes,
    )


def _committed(job: ShardJob, fs, root: str) -> ShardResult | None:
    """The recorded result when this exact shard is already committed and its bytes still hash right."""
    rec = read_json(fs, safe_join(root, job.stats_path))
    if not rec or rec.get("digest") != job.digest or "classes" not in rec:
        return None
    try:
        sha, size = sha256_of(fs, safe_join(root, job.path))
    except FileNotFoundError:
        return None
    if sha != rec.get("sha256") or size != rec.get("bytes"):
        log.warning("shard %s: stored bytes do not match its record; rewriting it", job.name)
        return None
    return ShardResult.from_record(rec)


def this_host() -> str:
    return socket.gethostname()


def write_shard(job: ShardJob, ctx: WriteContext, dataset: str, node: str | None = None) -> ShardResult:
    """Write (or verify and skip) one shard, then its per-shard record. Storage errors are retried.

    Safe to run concurrently with other shards and to kill at any point: the shard only appears under its
    final name when complete, and its record is written after it. `node` (default: the host name) is recorded
    as the machine that wrote it.
    """
    node = node or this_host()
    faults.before_job(job.name, node)
    fs, root = get_fs(ctx.dest_url, ctx.storage_options)
    where = f"shard {job.name} -> {full_url(fs, safe_join(root, job.path))}"

    def attempt() -> ShardResult:
        done = _committed(job, fs, root)
        if done is not None:
            report_progress(job.count, 0)
            return done
        result = _write_once(job, ctx, fs, root, dataset)
        result.node = node
        atomic_write_bytes(
            fs, safe_join(root, job.stats_path), json_bytes(result.record()), safe_join(root, TMP)
        )
        return result

    result = with_retries(attempt, what=where, retries=ctx.retries, backoff=ctx.retry_backoff)
    log.debug(
        "%s: %s (%d samples, %d bad, %.1f MB, sha256 %s)",
        where,
        "already committed" if result.skipped else "committed",
        result.samples,
        len(result.bad),
        result.bytes / 1e6,
        result.sha256[:12],
    )
    return result


def init_worker(q) -> None:
    """Worker-process initializer: progress goes back to the parent through `q`, a few times a second."""
    pending = [0, 0, time.monotonic()]

    def sink(samples: int, nbytes: int) -> None:
        pending[0] += samples
        pending[1] += nbytes
        now = time.monotonic()
        if now - pending[2] > 0.2:
            q.put((pending[0], pending[1]))
            pending[0] = pending[1] = 0
            pending[2] = now

    def flush() -> None:
        if pending[0] or pending[1]:
            q.put((pending[0], pending[1]))
            pending[0] = pending[1] = 0

    sink.flush = flush  # type: ignore[attr-defined]
    _progress.sink = sink


def worker_ready(ctx: WriteContext) -> None:
    """First task of a worker process: pay the imports and the filesystem setup, then report ready, so the
    parent hands this worker a shard only once it can start on it right away."""
    import ssjdn.data.images  # noqa: F401

    get_fs(ctx.dest_url, ctx.storage_options)


def write_shard_in_worker(job: ShardJob, ctx: WriteContext, dataset: str) -> ShardResult:
    try:
        return write_shard(job, ctx, dataset)
    finally:
        flush = getattr(getattr(_progress, "sink", None), "flush", None)
        if flush:
            flush()
