"""Planning a sharding run: options, the shard -> samples assignment, and the names and constants of the layout.

The plan is a pure function of the input (the dataset's metadata and its files' sizes and mtimes) and the output
options, so every shard is an independent unit of work whose bytes are the same on every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import posixpath
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Any

from fsspec.utils import get_protocol

from pipelines.errors import PipelineError
from pipelines.fsio import get_fs, with_retries
from pipelines.shard.layout import FORMAT, SHARD_NAME, SPLIT_ORDER, STATS, TAR_BLOCK, TAR_RECORD
from pipelines.shard.options import ShardOptions
from ssjdn.data.paths import SymlinkGuard
from ssjdn.data.record import Sample


class ShardError(PipelineError, RuntimeError):
    """Base class for sharding failures that the CLI reports as a one-line error."""


class DestinationConflictError(ShardError):
    """The destination already holds shards of another dataset or other options (pass overwrite=True)."""


class TooManyBadSamplesError(ShardError):
    """More samples were quarantined than `max_bad_fraction` allows; the manifest was not written."""


# ---------------------------------------------------------------------------------------------- options & plan


class PlanFile:
    """The local file a plan's jobs read their samples from. Its scratch folder is removed by `remove()`, or once
    the plan and every job that uses it are freed. A pickled copy (a job sent to a worker process) only refers
    to the file: it never removes it."""

    def __init__(self, path: str, *, owner: bool = True) -> None:
        self.path = path
        self._remove = weakref.finalize(self, shutil.rmtree, os.path.dirname(path), True) if owner else None

    def remove(self) -> None:
        if self._remove is not None:
            self._remove()

    def read(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def __reduce__(self):
        return _plan_file_reference, (self.path,)

    def __repr__(self) -> str:
        return f"PlanFile({self.path!r})"


def _plan_file_reference(path: str) -> PlanFile:
    return PlanFile(path, owner=False)


class InlinePlan:
    """The plan lines of one job, carried with it: a task on another node has no access to the plan file."""

    path = None

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def remove(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"InlinePlan({len(self.data)} bytes)"


@dataclass
class ShardJob:
    """One shard: where it goes and which samples it holds - a byte range of the plan file, one JSON line per
    sample (`[metadata, source size, source mtime]`, in shard order). Picklable and small at any shard size."""

    split: str
    index: int
    path: str  # relative to DEST, e.g. "train/shard-000000.tar"
    plan_file: PlanFile | InlinePlan  # written by `plan_shards`; inline once sent by value (`by_value`)
    offset: int
    length: int
    count: int
    digest: str = ""  # sha256 of the options + this shard's plan lines: identifies its intended content

    @property
    def name(self) -> str:
        return f"{self.split}/{self.index:06d}"

    @property
    def stats_path(self) -> str:
        return f"{STATS}/{self.path.removesuffix('.tar')}.json"

    def planned(self) -> list[tuple[dict[str, Any], int, float | str | None]]:
        """(sample metadata, source size, source mtime) per sample, in shard order."""
        data = self.plan_file.read(self.offset, self.length)
        return [tuple(json.loads(line)) for line in data.splitlines()]

    def by_value(self) -> ShardJob:
        """A copy that carries its own plan lines, so it runs on any node (the plan file is this machine's)."""
        if isinstance(self.plan_file, InlinePlan):
            return self
        data = self.plan_file.read(self.offset, self.length)
        return dataclasses.replace(self, plan_file=InlinePlan(data), offset=0)

    def keys(self) -> list[str]:
        return [meta["key"] for meta, _, _ in self.planned()]


@dataclass
class ShardResult:
    """What a written (or verified and skipped) shard holds."""

    split: str
    index: int
    path: str
    digest: str
    samples: int
    captions: int
    bytes: int
    sha256: str
    first_key: str | None
    last_key: str | None
    input_bytes: int
    bad: list[dict[str, Any]] = field(default_factory=list)
    classes: dict[str, int] = field(default_factory=dict)  # samples written per class name
    skipped: bool = False
    node: str | None = None  # which machine wrote it: the Ray node id, else the host name (record only)

    def entry(self) -> dict[str, Any]:
        """The shard's manifest entry."""
        return {
            "split": self.split,
            "index": self.index,
            "path": self.path,
            "samples": self.samples,
            "captions": self.captions,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "first_key": self.first_key,
            "last_key": self.last_key,
            "bad": len(self.bad),
            "digest": self.digest,
        }

    def record(self) -> dict[str, Any]:
        return {
            **self.entry(),
            "input_bytes": self.input_bytes,
            "bad_samples": self.bad,
            "classes": self.classes,
            "node": self.node,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> ShardResult:
        fields = {f.name for f in dataclasses.fields(cls)} - {"bad", "skipped", "node"}
        return cls(
            **{k: rec[k] for k in fields},
            bad=list(rec.get("bad_samples", [])),
            skipped=True,
            node=rec.get("node"),  # records written before the field existed have none
        )


@dataclass(frozen=True)
class WriteContext:
    """Everything a worker process needs besides its job (picklable; no open handles)."""

    dest_url: str
    storage_options: dict[str, Any]
    options: ShardOptions
    retries: int = 3
    retry_backoff: float = 1.0


@dataclass
class ShardPlan:
    dataset_name: str
    dataset_format: str
    dataset_path: str
    dataset_fingerprint: str
    classes: list[str]
    ctx: WriteContext
    jobs: list[ShardJob]
    bad: list[dict[str, Any]]  # quarantined before any image is read (reader, missing files)
    captions_dropped: int
    total_samples: int  # every sample the dataset lists in the selected splits, bad ones included
    input_bytes: int
    plan_file: PlanFile | None = None

    def close(self) -> None:
        """Remove the plan's scratch files now (its jobs cannot be written afterwards)."""
        if self.plan_file is not None:
            self.plan_file.remove()

    @property
    def dest_url(self) -> str:
        return self.ctx.dest_url

    @property
    def fingerprint(self) -> str:
        return _sha256_json(
            {"dataset": self.dataset_fingerprint, "options": self.ctx.options.output_options()}
        )

    def run_record(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "dataset": self.dataset_name,
            "dataset_fingerprint": self.dataset_fingerprint,
            "options": self.ctx.options.output_options(),
            "fingerprint": self.fingerprint,
        }


def _sha256_json(obj: Any) -> str:
    """Digest of canonical compact JSON (no indent: keeps json's C encoder, ~10x faster on large plans)."""
    return hashlib.sha256(_canonical(obj)).hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode(
        "utf-8"
    )


def natural_order(key: str) -> bytes:
    """Bytes that sort like the key with its digit runs compared as numbers (`ucm__2` before `ucm__10`).

    Text runs end with a NUL (keys never hold one), numbers are their digit count then their digits."""
    out = []
    for i, part in enumerate(_DIGITS.split(key)):
        if i % 2:
            digits = part.lstrip("0") or "0"
            out.append(len(digits).to_bytes(4, "big") + digits.encode("ascii"))
        else:
            out.append(part.encode("utf-8") + b"\0")
    return b"".join(out)


def shuffled_order(seed: int):
    """A seeded shuffle that is a pure function of (seed, key): no RNG state involved, so it is the same on every
    Python version and does not depend on the reader's listing order."""
    return lambda key: hashlib.sha256(f"{seed}\0{key}".encode()).digest()


_DIGITS = re.compile(r"(\d+)")


def _padded(n: int) -> int:
    return TAR_BLOCK + -(-n // TAR_BLOCK) * TAR_BLOCK


class SourceStat:
    """(size, mtime) of image sources, or None when missing: `os.stat` for local files, one listing per folder
    for remote ones (cached for the run)."""

    def __init__(self, storage_options: dict[str, Any]) -> None:
        self.storage_options = storage_options
        self._listings: dict[str, tuple[Any, dict[str, Any]]] = {}

    def __call__(self, source: str) -> tuple[int, float | str | None] | None:
        if source.startswith(os.sep) or get_protocol(source) == "file":  # a local name may hold "::"
            try:
                st = os.stat(source.removeprefix("file://"))
            except OSError:
                return None
            return st.st_size, st.st_mtime_ns / 1e9
        folder = posixpath.dirname(source)
        if folder not in self._listings:
            fs, root = get_fs(folder, self.storage_options)
            entries = with_retries(lambda: fs.ls(root, detail=True), what=f"list {folder}")
            self._listings[folder] = (fs, {e["name"].rstrip("/"): e for e in entries})
        fs, listing = self._listings[folder]
        e = listing.get(fs._strip_protocol(source))
        if e is None or e.get("type") == "directory":
            return None
        mtime = e.get("mtime") or e.get("LastModified") or e.get("last_modified")
        return int(e["size"]), str(mtime) if mtime is not None else None


class _PlanWriter:
    """Writes planned samples to the plan file in shard order and cuts them into shards of at most `maxcount`
    samples and `maxsize` bytes (estimated from the source sizes: a single larger sample gets a shard of its own)."""

    def __init__(self, plan_file: PlanFile, options: ShardOptions) -> None:
        self.plan_file = plan_file
        self.file = open(plan_file.path, "wb")  # noqa: SIM115 - closed by finish()
        self.options = options
        self.options_json = _canonical(options.output_options())
        self.jobs: list[ShardJob] = []
        self.offset = 0
        self.input_bytes = 0
        self._split: str | None = None
        self._start()

    def _start(self) -> None:
        self.count, self.size, self.start = 0, TAR_RECORD, self.offset  # TAR_RECORD: end blocks + padding
        self.digest = hashlib.sha256(self.options_json + b"\n")

    def _cut(self) -> None:
        if self.count:
            same_split = self.jobs and self.jobs[-1].split == self._split
            index = self.jobs[-1].index + 1 if same_split else 0
            self.jobs.append(
                ShardJob(
                    self._split,
                    index,
                    f"{self._split}/{SHARD_NAME.format(index)}",
                    self.plan_file,
                    self.start,
                    self.offset - self.start,
                    self.count,
                    self.digest.hexdigest(),
                )
            )
        self._start()

    def add(self, meta: dict[str, Any], size: int, mtime: float | str | None) -> None:
        line = _canonical([meta, size, mtime]) + b"\n"
        # Tar bytes of the sample: headers + padded members; the json member is over-estimated by an allowance
        # for the image fields the writer adds. Exact for the image unless it is resized or re-encoded.
        est = _padded(size) + _padded(len(line) + 600) + _padded(len(meta["captions"][0].encode()))
        est += _padded(8) if meta["class_index"] is not None else 0
        if meta["split"] != self._split:
            self._cut()
            self._split = meta["split"]
        elif self.count >= self.options.maxcount or self.size + est > self.options.maxsize:
            self._cut()
        self.file.write(line)
        self.digest.update(line)
        self.offset += len(line)
        self.count += 1
        self.size += est
        self.input_bytes += size

    def finish(self) -> list[ShardJob]:
        self._cut()
        self.file.close()
        return self.jobs


def bad_entry(
    sample_meta: dict[str, Any], reason: str, stage: str, shard: str | None = None
) -> dict[str, Any]:
    return {
        "key": sample_meta.get("key"),
        "source": sample_meta.get("source"),
        "filename": sample_meta.get("filename"),
        "split": sample_meta.get("split"),
        "shard": shard,
        "stage": stage,
        "reason": reason,
    }


def sample_meta(sample: Any) -> dict[str, Any]:
    """A `Sample`'s fields but the image bytes, as they go into the plan and the json member (shallow: fast)."""
    return {f: getattr(sample, f) for f in _META_FIELDS}


_META_FIELDS = tuple(f.name for f in dataclasses.fields(Sample) if f.name != "image")


PLAN_DIR_PREFIX = "ssjdn-shard-plan-"


def remove_stale_plans() -> None:
    """Remove the scratch folders of plans whose process is gone (a killed run cannot clean up after itself)."""
    root = tempfile.gettempdir()
    for entry in os.scandir(root):
        rest = entry.name.removeprefix(PLAN_DIR_PREFIX)
        pid = rest.split("-", 1)[0]
        if rest == entry.name or not pid.isdigit() or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            pass  # alive, owned by another user


def plan_shards(dataset: str | os.PathLike, dest_url: str, options: ShardOptions | None = None) -> ShardPlan:
    """Read the dataset's metadata and decide which sample goes to which shard. Writes nothing at `dest_url`.

    Memory stays bounded at any dataset size: records are checked into an SQLite file and come back sorted
    from it; the plan itself is a local file (one JSON line per sample, in shard order) that each job indexes
    by byte range. Both live in a scratch folder under the temp dir (`TMPDIR`) until the plan is closed.
    """
    from ssjdn.data.readers import SampleIndex, open_dataset

    options = options or ShardOptions()
    source = open_dataset(
        dataset,
        format=options.format,
        images=options.images,
        name=options.name,
        allow_roots=options.allow_root,
    )
    remove_stale_plans()
    plan_file = PlanFile(
        os.path.join(tempfile.mkdtemp(prefix=f"{PLAN_DIR_PREFIX}{os.getpid()}-"), "plan.jsonl")
    )
    records = os.path.join(os.path.dirname(plan_file.path), "records.sqlite")
    try:
        index = SampleIndex(source, path=records)
        try:
            return _plan(
                index,
                dataset,
                dest_url,
                options,
                options.storage_options,
                options.retries,
                options.retry_backoff,
                plan_file,
            )
        finally:
            index.close()
            os.remove(records)
    except BaseException:
        plan_file.remove()
        raise


def _plan(index, dataset, dest_url, options, storage_options, retries, retry_backoff, plan_file) -> ShardPlan:
    wanted = tuple(s for s in SPLIT_ORDER if s in set(options.splits or SPLIT_ORDER))
    counts = index.split_counts()
    total = sum(counts.get(s, 0) for s in wanted)
    if not total:
        have = ", ".join(sorted(counts)) or "none"
        raise ShardError(
            f"{dataset}: no samples in split(s) {', '.join(sorted(wanted))} (dataset has: {have})"
        )

    stat = SourceStat(storage_options)
    links = SymlinkGuard(index.source.roots, follow=options.follow_symlinks)
    order = natural_order if options.shuffle_seed is None else shuffled_order(options.shuffle_seed)
    writer = _PlanWriter(plan_file, options)
    bad: list[dict[str, Any]] = []
    captions_dropped = 0
    for sample, rejected in index.samples(wanted, order):
        if rejected is not None:
            if rejected.sample is not None:  # dropped as a whole (no usable caption)
                bad.append(bad_entry(sample_meta(sample), rejected.message, "reader"))
                continue
            captions_dropped += rejected.captions_dropped
        refused = links.check(sample.source)  # before any byte of it is read
        if refused is not None:
            bad.append(bad_entry(sample_meta(sample), refused, "plan"))
            continue
        found = stat(sample.source)
        if found is None:
            bad.append(bad_entry(sample_meta(sample), f"image file not found: {sample.source}", "plan"))
            continue
        writer.add(sample_meta(sample), *found)
    jobs = writer.finish()

    # What the dataset lists, good or bad: fixing a bad sample and re-running is the same dataset. Hashed as the
    # canonical JSON of {"name", "samples": sorted [split, key, file name]}, streamed.
    identity = hashlib.sha256(b'{"name":' + _canonical(index.name) + b',"samples":[')
    rows, first = index.identity(wanted), True
    while chunk := list(itertools.islice(rows, 10_000)):  # one JSON encoding per chunk, not per row
        identity.update((b"" if first else b",") + _canonical(chunk)[1:-1])
        first = False
    identity.update(b"]}")
    return ShardPlan(
        dataset_name=index.name,
        dataset_format=index.source.format,
        dataset_path=os.path.abspath(dataset),
        dataset_fingerprint=identity.hexdigest(),
        classes=list(index.classes),
        ctx=WriteContext(dest_url, storage_options, options, retries, retry_backoff),
        jobs=jobs,
        bad=bad,
        captions_dropped=captions_dropped,
        total_samples=total,
        input_bytes=writer.input_bytes,
        plan_file=plan_file,
    )
