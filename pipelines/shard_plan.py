"""Planning a sharding run: options, the shard -> samples assignment, and the names and constants of the layout.

The plan is a pure function of the input (the dataset's metadata and its files' sizes and mtimes) and the output
options, so every shard is an independent unit of work whose bytes are the same on every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pipelines.storage import (
    get_fs,
    with_retries,
)

FORMAT = "ssjdn-webdataset-shards/1"
MANIFEST = "_manifest.json"
STATS = "_stats"
TMP = "_tmp"
QUARANTINE = "_quarantine/report.jsonl"
RUN_RECORD = f"{STATS}/run.json"
SPLIT_ORDER = ("train", "val", "test")
SHARD_NAME = "shard-{:06d}.tar"
SHARD_FILE_RE = re.compile(r"^shard-\d{6}\.tar$")

# Fixed tar header fields: with these the bytes of a shard depend only on its samples.
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z
TAR_OWNER = "ssjdn"
TAR_MODE = 0o444

# PIL format -> member extension. The extension names the real encoding, whatever the file was called.
EXT_OF_FORMAT = {"JPEG": "jpg", "PNG": "png", "TIFF": "tif", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}
REENCODE = {"jpg": ("JPEG", {"quality": 95}), "png": ("PNG", {}), "webp": ("WEBP", {"quality": 95})}
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tar pads the archive to whole records (as tarfile and GNU tar do)


class ShardError(RuntimeError):
    """Base class for sharding failures that the CLI reports as a one-line error."""


class DestinationConflictError(ShardError):
    """The destination already holds shards of another dataset or other options (pass overwrite=True)."""


class TooManyBadSamplesError(ShardError):
    """More samples were quarantined than `max_bad_fraction` allows; the manifest was not written."""


# ---------------------------------------------------------------------------------------------- options & plan


@dataclass(frozen=True)
class ShardOptions:
    """Options of a sharding run. All but `max_bad_fraction` change the output bytes."""

    maxcount: int = 1000
    maxsize: int = 1_000_000_000
    shuffle_seed: int | None = None
    splits: tuple[str, ...] | None = None  # None: every split the dataset has
    resize: int | None = None  # longer side, pixels; only ever shrinks
    reencode: str | None = None  # one of REENCODE
    validate: str = "structure"  # "structure" (header + completeness) or "full" (decode): decides what gets in
    max_bad_fraction: float = 0.01

    def __post_init__(self) -> None:
        if self.maxcount < 1 or self.maxsize < 1:
            raise ValueError(f"maxcount and maxsize must be >= 1 (got {self.maxcount}, {self.maxsize})")
        if self.splits is not None:
            unknown = sorted(set(self.splits) - set(SPLIT_ORDER))
            if unknown:
                raise ValueError(f"unknown split(s) {unknown}; expected some of {', '.join(SPLIT_ORDER)}")
        if self.reencode is not None and self.reencode not in REENCODE:
            raise ValueError(f"--reencode {self.reencode!r}: expected one of {', '.join(REENCODE)}")
        from ssjdn.data.images import VALIDATION_LEVELS

        if self.validate not in VALIDATION_LEVELS:
            raise ValueError(f"--validate {self.validate!r}: expected one of {', '.join(VALIDATION_LEVELS)}")
        if self.resize is not None and self.resize < 1:
            raise ValueError(f"--resize must be a positive number of pixels (got {self.resize})")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be within [0, 1] (got {self.max_bad_fraction})")

    def output_options(self) -> dict[str, Any]:
        """The options that decide the shards' content (what a destination is checked against)."""
        d = dataclasses.asdict(self)
        d.pop("max_bad_fraction")
        d["splits"] = list(self.splits) if self.splits is not None else None
        return d


class Planned(NamedTuple):
    """A sample and what its source looked like at planning time (size decides packing; both go in the digest).

    The `Sample` objects are the reader's own (not copies): the plan adds a few bytes per sample, no more.
    """

    sample: Any  # ssjdn.data.record.Sample
    size: int
    mtime: float | str | None


@dataclass
class ShardJob:
    """One shard: where it goes and which samples (metadata + source) it holds, in order. Picklable."""

    split: str
    index: int
    path: str  # relative to DEST, e.g. "train/shard-000000.tar"
    samples: list[Planned]
    digest: str = ""  # sha256 of the options + samples: identifies this shard's intended content

    @property
    def name(self) -> str:
        return f"{self.split}/{self.index:06d}"

    @property
    def stats_path(self) -> str:
        return f"{STATS}/{self.path.removesuffix('.tar')}.json"


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
    skipped: bool = False

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
        return {**self.entry(), "input_bytes": self.input_bytes, "bad_samples": self.bad}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> ShardResult:
        fields = {f.name for f in dataclasses.fields(cls)} - {"bad", "skipped"}
        return cls(**{k: rec[k] for k in fields}, bad=list(rec.get("bad_samples", [])), skipped=True)


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

    @property
    def dest_url(self) -> str:
        return self.ctx.dest_url

    @property
    def fingerprint(self) -> str:
        return _sha256_json({"dataset": self.dataset_fingerprint, "options": self.ctx.options.output_options()})

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
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _digest_row(p: Planned) -> list[Any]:
    """Everything about a planned sample that ends up in its shard: every Sample field but the image bytes
    (their hash instead), plus the source's size and mtime."""
    s = p.sample
    fields = [getattr(s, f.name) for f in dataclasses.fields(s) if f.name != "image"]
    return [fields, p.size, p.mtime, _sha_or_none(s.image)]


def _natural(key: str) -> tuple:
    """`ucm__2` before `ucm__10`: digits compare as numbers (parts alternate str, int, str, ...)."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", key)))


def _order(planned: list[Planned], seed: int | None) -> list[Planned]:
    """Natural key order, or a seeded shuffle that is a pure function of (seed, key): no RNG state involved,
    so it is the same on every Python version and does not depend on the reader's listing order."""
    if seed is None:
        return sorted(planned, key=lambda p: _natural(p.sample.key))
    return sorted(planned, key=lambda p: hashlib.sha256(f"{seed}\0{p.sample.key}".encode()).digest())


def _estimate_bytes(p: Planned) -> int:
    """Tar bytes a sample will take: headers + padded members. The json member is over-estimated from the
    variable-length fields plus a fixed allowance for the rest (keys, numbers, size and format fields)."""

    def padded(n: int) -> int:
        return TAR_BLOCK + -(-n // TAR_BLOCK) * TAR_BLOCK

    s = p.sample
    text = [*s.captions, s.key, s.source, s.filename or "", s.class_name or "", s.crs or ""]
    json_len = 600 + sum(len(t.encode()) * 2 for t in text) + (len(json.dumps(s.extra)) if s.extra else 0)
    size = padded(p.size) + padded(json_len) + padded(len((s.captions or [""])[0].encode()))
    return size + (padded(8) if s.class_index is not None else 0)


def _pack(samples: list[Planned], maxcount: int, maxsize: int) -> list[list[Planned]]:
    """Cut an ordered sample list into shards of at most `maxcount` samples and `maxsize` bytes (estimated from
    the source sizes: exact unless images are re-encoded; a single larger sample gets a shard of its own)."""
    trailer = TAR_RECORD  # end-of-archive blocks + padding to a whole record
    shards: list[list[Planned]] = []
    cur: list[Planned] = []
    cur_size = trailer
    for s in samples:
        est = _estimate_bytes(s)
        if cur and (len(cur) >= maxcount or cur_size + est > maxsize):
            shards.append(cur)
            cur, cur_size = [], trailer
        cur.append(s)
        cur_size += est
    if cur:
        shards.append(cur)
    return shards


def _stat_sources(samples: list[Any], storage_options: dict[str, Any]) -> dict[str, tuple[int, float | None]]:
    """source -> (size, mtime) for the images that exist; one listing per folder for remote sources."""
    out: dict[str, tuple[int, float | None]] = {}
    remote: dict[str, list[str]] = {}
    for s in samples:
        if s.image is not None:
            out[s.source] = (len(s.image), None)
        elif "://" in s.source and not s.source.startswith("file://"):
            remote.setdefault(posixpath.dirname(s.source), []).append(s.source)
        else:
            path = s.source.removeprefix("file://")
            try:
                st = os.stat(path)
            except OSError:
                continue
            out[s.source] = (st.st_size, st.st_mtime_ns / 1e9)
    for folder, sources in remote.items():
        fs, root = get_fs(folder, storage_options)
        listing = {
            e["name"].rstrip("/"): e
            for e in with_retries(lambda fs=fs, root=root: fs.ls(root, detail=True), what=f"list {folder}")
        }
        for src in sources:
            e = listing.get(fs._strip_protocol(src))
            if e is not None and e.get("type") != "directory":
                mtime = e.get("mtime") or e.get("LastModified") or e.get("last_modified")
                out[src] = (int(e["size"]), str(mtime) if mtime is not None else None)
    return out


def bad_entry(sample_meta: dict[str, Any], reason: str, stage: str, shard: str | None = None) -> dict[str, Any]:
    return {
        "key": sample_meta.get("key"),
        "source": sample_meta.get("source"),
        "filename": sample_meta.get("filename"),
        "split": sample_meta.get("split"),
        "shard": shard,
        "stage": stage,
        "reason": reason,
    }


def plan_shards(
    dataset: str | os.PathLike,
    dest_url: str,
    *,
    format: str | None = None,
    images: str | os.PathLike | None = None,
    name: str | None = None,
    options: ShardOptions | None = None,
    storage_options: dict[str, Any] | None = None,
    retries: int = 3,
    retry_backoff: float = 1.0,
) -> ShardPlan:
    """Read the dataset's metadata and decide which sample goes to which shard. Writes nothing."""
    from ssjdn.data.readers import load_dataset

    options = options or ShardOptions()
    ds = load_dataset(dataset, format=format, images=images, name=name)
    wanted = set(options.splits or SPLIT_ORDER)
    samples = [s for s in ds.samples if s.split in wanted]
    if not samples:
        have = ", ".join(sorted({s.split for s in ds.samples})) or "none"
        raise ShardError(f"{dataset}: no samples in split(s) {', '.join(sorted(wanted))} (dataset has: {have})")

    bad: list[dict[str, Any]] = []
    for rec in ds.quarantine:
        if rec.sample is not None and rec.sample.split in wanted:
            bad.append(bad_entry(rec.sample.metadata(), rec.message, "reader"))
    captions_dropped = sum(r.captions_dropped for r in ds.quarantine if r.sample is None and r.split in wanted)

    storage_options = storage_options or {}
    stats = _stat_sources(samples, storage_options)
    by_split: dict[str, list[Planned]] = {}
    for s in samples:
        if s.source not in stats:
            bad.append(bad_entry(s.metadata(), f"image file not found: {s.source}", "plan"))
            continue
        by_split.setdefault(s.split, []).append(Planned(s, *stats[s.source]))

    ctx = WriteContext(dest_url, storage_options, options, retries, retry_backoff)
    output_options = options.output_options()
    jobs: list[ShardJob] = []
    for split in SPLIT_ORDER:
        ordered = _order(by_split.get(split, []), options.shuffle_seed)
        for i, members in enumerate(_pack(ordered, options.maxcount, options.maxsize)):
            job = ShardJob(split, i, f"{split}/{SHARD_NAME.format(i)}", members)
            job.digest = _sha256_json(
                {
                    "options": output_options,
                    "samples": [_digest_row(p) for p in members],
                }
            )
            jobs.append(job)

    # What the dataset lists, good or bad: fixing a bad sample and re-running is the same dataset.
    dropped = [r.sample for r in ds.quarantine if r.sample is not None and r.sample.split in wanted]
    identity = sorted((s.split, s.key, s.filename or s.source) for s in [*samples, *dropped])
    return ShardPlan(
        dataset_name=ds.name,
        dataset_format=ds.format,
        dataset_path=os.path.abspath(dataset),
        dataset_fingerprint=_sha256_json({"name": ds.name, "samples": identity}),
        classes=list(ds.classes),
        ctx=ctx,
        jobs=jobs,
        bad=bad,
        captions_dropped=captions_dropped,
        total_samples=len(samples) + len(dropped),
        input_bytes=sum(p.size for j in jobs for p in j.samples),
    )


def _sha_or_none(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


