"""Shard an image-caption dataset into WebDataset tars on any fsspec URL (local disk, S3, ...).

Layout (see docs/sharding.md):

    DEST/{split}/shard-000000.tar        committed shards (written under _tmp/, then renamed / copied)
    DEST/_stats/{split}/shard-000000.json per-shard record: plan digest, sha256, bytes, key range, bad samples
    DEST/_stats/run.json                  which dataset and options this destination is being written with
    DEST/_quarantine/report.jsonl         bad samples: key, source, reason
    DEST/_manifest.json                   the commit point, written last and atomically

The run is planned up front: the shard -> samples assignment is a pure function of the input and the output
options, so every shard is an independent unit of work (spread over `workers` writers) whose bytes are
identical on every run. A re-run skips shards whose per-shard record matches the plan and whose stored bytes
hash to the recorded sha256, and redoes the rest; the manifest is only written once every shard is in place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.fsio import (
    atomic_write_bytes,
    atomic_write_json,
    describe_endpoint,
    full_url,
    get_fs,
    read_json,
    remove_quietly,
    safe_join,
    with_retries,
)
from pipelines.shard.distribute import Distributor, LocalPool, Progress
from pipelines.shard.layout import (
    FORMAT,
    MANIFEST,
    QUARANTINE,
    RUN_RECORD,
    SHARD_FILE_RE,
    SPLIT_ORDER,
    STATS,
    TAR_MODE,
    TAR_MTIME,
    TAR_OWNER,
    TMP,
)
from pipelines.shard.options import ShardOptions
from pipelines.shard.plan import (
    DestinationConflictError,
    ShardError,
    ShardJob,
    ShardPlan,
    ShardResult,
    TooManyBadSamplesError,
    plan_shards,
)
from pipelines.shard.write import write_shard

log = logging.getLogger(__name__)


@dataclass
class ShardRunResult:
    manifest: dict[str, Any]
    manifest_url: str
    written: int
    skipped: int
    seconds: float
    input_bytes_written: int

    @property
    def samples(self) -> int:
        return self.manifest["totals"]["samples"]


# ---------------------------------------------------------------------------------------------- destination


def prepare_destination(plan: ShardPlan, *, overwrite: bool = False) -> None:
    """Refuse a destination that holds another dataset's (or other options') shards; clear it if `overwrite`.

    Then record which dataset and options this destination is being written with (`_stats/run.json`), so a
    different run cannot mix its shards in before this one commits.
    """
    fs, root = get_fs(plan.dest_url, plan.ctx.storage_options)
    url = full_url(fs, root)

    def read(rel: str) -> Any:
        return with_retries(lambda: read_json(fs, safe_join(root, rel)), what=f"read {url}/{rel}")

    manifest = read(MANIFEST)
    run = read(RUN_RECORD)
    found = _existing_shards(fs, root)
    conflict = None
    if manifest is not None and manifest.get("fingerprint") != plan.fingerprint:
        conflict = _describe_conflict(
            manifest.get("dataset", {}).get("name"), manifest, plan, "a committed manifest"
        )
    elif run is not None and run.get("fingerprint") != plan.fingerprint:
        conflict = _describe_conflict(run.get("dataset"), run, plan, "an unfinished run")
    elif manifest is None and run is None and found:
        conflict = f"{len(found)} shard file(s) (e.g. {found[0]}) that no manifest or run record describes"
    if conflict and not overwrite:
        raise DestinationConflictError(
            f"destination {url} already holds {conflict}; pick another destination or pass --overwrite"
        )
    if conflict:
        log.warning("overwriting %s: it held %s", url, conflict)
        _clear_destination(fs, root, found)
    with_retries(
        lambda: atomic_write_json(fs, safe_join(root, RUN_RECORD), plan.run_record(), safe_join(root, TMP)),
        what=f"write {url}/{RUN_RECORD}",
    )


def _describe_conflict(name: str | None, doc: dict[str, Any], plan: ShardPlan, what: str) -> str:
    if doc.get("format") != FORMAT:
        return f"{what} of another format ({doc.get('format')!r})"
    dataset = doc.get("dataset")
    theirs_fp = dataset.get("fingerprint") if isinstance(dataset, dict) else doc.get("dataset_fingerprint")
    if theirs_fp != plan.dataset_fingerprint:
        return f"{what} of another dataset ({name!r}, this run: {plan.dataset_name!r})"
    theirs, ours = doc.get("options", {}), plan.ctx.options.output_options()
    diff = ", ".join(
        f"{k}={theirs.get(k)!r} (this run: {ours[k]!r})" for k in ours if theirs.get(k) != ours[k]
    )
    return f"{what} written with other options: {diff}"


def _existing_shards(fs, root: str) -> list[str]:
    found = []
    for split in SPLIT_ORDER:
        folder = safe_join(root, split)
        try:
            names = with_retries(lambda f=folder: fs.ls(f, detail=False, refresh=True), what=f"list {folder}")
        except FileNotFoundError:
            continue
        found += sorted(
            f"{split}/{posixpath.basename(n)}" for n in names if SHARD_FILE_RE.match(posixpath.basename(n))
        )
    return found


def _clear_destination(fs, root: str, shards: list[str]) -> None:
    """Remove what an earlier run wrote - the manifest first (it is the commit point), then the rest.

    Only names this module writes are touched; anything else under DEST is left alone.
    """
    remove_quietly(fs, safe_join(root, MANIFEST))
    for rel in shards:
        with_retries(lambda r=rel: fs.rm(safe_join(root, r)), what=f"remove {rel}")
    for rel in (STATS, TMP, posixpath.dirname(QUARANTINE)):
        path = safe_join(root, rel)
        if fs.exists(path):
            with_retries(lambda p=path: fs.rm(p, recursive=True), what=f"remove {rel}")
    fs.invalidate_cache(root)


# ---------------------------------------------------------------------------------------------- many shards


def write_shards(
    plan: ShardPlan,
    jobs: Sequence[ShardJob] | None = None,
    *,
    workers: int = 1,
    progress: bool = True,
    on_result: Callable[[ShardResult], None] | None = None,
    ray: str | None = None,
    ray_resource: str | None = None,
) -> list[ShardResult]:
    """Write `jobs` (default: the whole plan) and return their results in plan order.

    Who writes them is the distributor's business (`pipelines.shard.distribute`): by default `workers` writers on
    this machine (this process plus up to `workers - 1` worker processes); with `ray` (a cluster address or
    `auto`) one Ray task per job across the cluster's nodes (`ray_resource`: only nodes offering it).
    Stops early - without a manifest - when shards keep failing on storage or when the bad samples already
    exceed `max_bad_fraction` of the whole plan.
    """
    jobs = list(plan.jobs if jobs is None else jobs)
    bar = Progress(sum(j.count for j in jobs), len(jobs), progress, f"shard {plan.dataset_name}")
    allowed_bad = plan.ctx.options.max_bad_fraction * plan.total_samples
    bad_so_far = len(plan.bad)
    results: dict[tuple[str, int], ShardResult] = {}

    def accept(r: ShardResult) -> None:
        nonlocal bad_so_far
        results[(r.split, r.index)] = r
        bad_so_far += len(r.bad)
        bar.job_done()
        if on_result:
            on_result(r)
        if bad_so_far > allowed_bad:  # it can only grow: stop now rather than after the whole dataset
            bad = write_quarantine_report(plan, results.values())
            raise _too_many_bad(plan, bad, stopped_early=len(results) < len(jobs))

    try:
        if len(plan.bad) > allowed_bad:  # the reader and the file listing already found too many
            raise _too_many_bad(plan, write_quarantine_report(plan, []), stopped_early=True)
        if jobs:
            distributor(workers, ray, ray_resource).run(jobs, plan, bar, accept)
    finally:
        bar.close()
    return [results[(j.split, j.index)] for j in jobs]


def distributor(workers: int, ray: str | None = None, ray_resource: str | None = None) -> Distributor:
    """Ray tasks when `ray` names a cluster, else the local pool (this module's `MIN_WORK_FOR_WORKERS_S` and
    `write_shard` are looked up now, so a test may replace them)."""
    if ray:
        from pipelines.shard.ray_distribute import RayTasks

        return RayTasks(ray, ray_resource)
    return LocalPool(workers, MIN_WORK_FOR_WORKERS_S, write_shard)


# Worker processes are started only when the shards nobody has taken yet would keep this process busy for
# longer than this. A worker costs 0.6-1.6 s of CPU before it writes anything (interpreter, imports, filesystem;
# measured on the busy 2-core dev box) and competes with this process meanwhile; below about twice that, runs
# that started one were measured slower (UCM with --validate full: 1.7 s without, 3.0-3.2 s with one).
# 0 starts the workers right away.
MIN_WORK_FOR_WORKERS_S = 2.0


# ---------------------------------------------------------------------------------------------- commit


def _quarantine_url(plan: ShardPlan) -> str:
    fs, root = get_fs(plan.dest_url, plan.ctx.storage_options)
    return full_url(fs, safe_join(root, QUARANTINE))


def write_quarantine_report(plan: ShardPlan, results: Iterable[ShardResult]) -> list[dict[str, Any]]:
    """Write `_quarantine/report.jsonl` (one JSON object per bad sample, plan order) atomically; return it."""
    fs, root = get_fs(plan.dest_url, plan.ctx.storage_options)
    results = sorted(results, key=lambda r: (_split_rank(r.split), r.index))
    bad = list(plan.bad) + [b for r in results for b in r.bad]
    report = b"".join(json.dumps(b, sort_keys=True, ensure_ascii=False).encode() + b"\n" for b in bad)
    with_retries(
        lambda: atomic_write_bytes(fs, safe_join(root, QUARANTINE), report, safe_join(root, TMP)),
        what=f"write {full_url(fs, safe_join(root, QUARANTINE))}",
    )
    return bad


def _too_many_bad(
    plan: ShardPlan, bad: list[dict[str, Any]], *, stopped_early: bool
) -> TooManyBadSamplesError:
    limit = plan.ctx.options.max_bad_fraction
    first = bad[0]
    return TooManyBadSamplesError(
        f"{'at least ' if stopped_early else ''}{len(bad)} of {plan.total_samples} samples are bad "
        f"({len(bad) / max(plan.total_samples, 1):.2%} > max {limit:.2%}){'; stopped early' if stopped_early else ''}. "
        f"Reasons: {summarise_reasons(bad)}. e.g. {first['key']} ({first['source']}): {first['reason']}. "
        f"Report: {_quarantine_url(plan)}. Manifest not written; fix the inputs or raise --max-bad-fraction."
    )


def summarise_reasons(bad: list[dict[str, Any]], top: int = 5, samples: int = 3) -> str:
    """`"no captions; sample quarantined" x 2 (ucm__1, ucm__7); "image file not found" x 1 (ucm__9)`: the most
    common reasons (as `reason_kind` groups them), each with its count and the first few sample keys."""
    keys: dict[str, list[str]] = {}
    for b in bad:
        keys.setdefault(reason_kind(b), []).append(str(b.get("key")))
    ranked = sorted(keys.items(), key=lambda kv: -len(kv[1]))  # stable: first seen first among equals
    parts = [
        f'"{kind}" x {len(ks)} ({", ".join(ks[:samples])}{", ..." if len(ks) > samples else ""})'
        for kind, ks in ranked[:top]
    ]
    if len(ranked) > top:
        parts.append(f"{len(ranked) - top} more reason(s)")
    return "; ".join(parts)


def finalize(
    plan: ShardPlan, results: Iterable[ShardResult], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write the quarantine report, check the bad fraction, drop stale shards, and commit the manifest (with
    `extra` top-level sections, e.g. a tile run's "tile")."""
    fs, root = get_fs(plan.dest_url, plan.ctx.storage_options)
    url = full_url(fs, root)
    tmp_dir = safe_join(root, TMP)
    results = sorted(results, key=lambda r: (_split_rank(r.split), r.index))
    planned = {(j.split, j.index) for j in plan.jobs}
    missing = sorted(planned - {(r.split, r.index) for r in results})
    if missing:
        raise ShardError(
            f"cannot commit {url}: {len(missing)} planned shard(s) not written, e.g. {missing[0]}"
        )

    bad = write_quarantine_report(plan, results)
    if len(bad) > plan.ctx.options.max_bad_fraction * plan.total_samples:
        raise _too_many_bad(plan, bad, stopped_early=False)

    keep = {r.path for r in results}
    for rel in _existing_shards(fs, root):
        if rel not in keep:  # left by an earlier plan of the same dataset (e.g. inputs changed size)
            log.info("removing stale shard %s/%s", url, rel)
            with_retries(lambda r=rel: fs.rm(safe_join(root, r)), what=f"remove {rel}")

    manifest = {**build_manifest(plan, results, bad), **(extra or {})}
    with_retries(
        lambda: atomic_write_json(fs, safe_join(root, MANIFEST), manifest, tmp_dir),
        what=f"write {url}/{MANIFEST}",
    )
    remove_quietly(fs, tmp_dir, recursive=True)  # leftovers of killed attempts; nothing reads them
    return manifest


def _split_rank(split: str) -> tuple[int, str]:
    """Plan order of splits: train, val, test, then any other by name (a tile run's "chips")."""
    return (SPLIT_ORDER.index(split), "") if split in SPLIT_ORDER else (len(SPLIT_ORDER), split)


_ERROR_NAME = re.compile(r"[A-Za-z_][\w.]*: ")
_LOCATOR = re.compile(r"\s*\([^()]*\)")


def reason_kind(entry: dict[str, Any]) -> str:
    """A bad sample's reason without what names the sample (file, record, line, path, counts), so that samples
    that are bad for the same reason group together: `/x/dataset.json: images[3] (a.jpg): no captions; ...`
    -> `no captions; sample quarantined`; `ImageDecodeError: a.jpg: truncated or corrupt JPEG data: ...` ->
    `truncated or corrupt JPEG data`; `ChipReadError: RasterioIOError: ...` -> `ChipReadError`;
    `image file not found: /x/a.jpg` -> `image file not found`."""
    reason = str(entry.get("reason") or "")
    names = [n for n in (entry.get("filename"), entry.get("source")) if n]
    # a reader's `file: where (name): why`
    record = next((f" ({n}): " for n in names if f" ({n}): " in reason), None)
    error = _ERROR_NAME.match(reason)
    if record is not None:
        kind = reason.split(record, 1)[1]
    elif error is not None:  # `Error: <name>: why ...` or `Error: why`
        rest = reason[error.end() :]
        named = next((n for n in names if rest.startswith(f"{n}: ")), None)
        kind = rest[len(named) + 2 :].split(": ", 1)[0] if named else error.group(0)[:-2]
    else:
        kind = reason.split(": ", 1)[0]
    kind = re.sub(r"\d+", "N", _LOCATOR.sub("", kind)).strip(" ;,.")
    return kind[:80] or "unknown"


def build_manifest(plan: ShardPlan, results: list[ShardResult], bad: list[dict[str, Any]]) -> dict[str, Any]:
    splits: dict[str, dict[str, Any]] = {}
    for r in results:
        s = splits.setdefault(r.split, {"shards": 0, "samples": 0, "captions": 0, "bytes": 0, "bad": 0})
        s["shards"] += 1
        s["samples"] += r.samples
        s["captions"] += r.captions
        s["bytes"] += r.bytes
    for b in bad:
        if b.get("split") in splits:
            splits[b["split"]]["bad"] += 1
    class_counts: Counter[str] = Counter()
    for r in results:
        class_counts.update(r.classes)
    return {
        "format": FORMAT,
        "dataset": {
            "name": plan.dataset_name,
            "format": plan.dataset_format,
            "path": plan.dataset_path,
            "fingerprint": plan.dataset_fingerprint,
        },
        "fingerprint": plan.fingerprint,
        "options": plan.ctx.options.output_options(),
        "max_bad_fraction": plan.ctx.options.max_bad_fraction,
        "classes": [{"index": i, "name": c, "samples": class_counts[c]} for i, c in enumerate(plan.classes)],
        "splits": {k: splits[k] for k in sorted(splits, key=_split_rank)},
        "totals": {
            "shards": len(results),
            "samples": sum(r.samples for r in results),
            "captions": sum(r.captions for r in results),
            "bytes": sum(r.bytes for r in results),
            "bad": len(bad),
            "listed": plan.total_samples,
            "captions_dropped": plan.captions_dropped,
        },
        "bad": {
            "count": len(bad),
            "by_reason": dict(Counter(reason_kind(b) for b in bad).most_common()),
            "report": QUARANTINE,
        },
        "tar": {"mtime": TAR_MTIME, "owner": TAR_OWNER, "mode": oct(TAR_MODE)},
        "shards": [r.entry() for r in results],
    }


# ---------------------------------------------------------------------------------------------- one call


def shard_dataset(
    dataset: str | os.PathLike, dest_url: str, options: ShardOptions | None = None, **overrides: Any
) -> ShardRunResult:
    """Shard `dataset` (a folder or description file that `ssjdn.data.readers.load_dataset` reads) into
    WebDataset tars under `dest_url`; returns the committed manifest and run statistics.

    `options` (default `ShardOptions()`), with any of its fields overridden by keyword
    (`shard_dataset(data, dest, maxcount=200)`). Raises `DestinationConflictError` (destination holds another
    dataset/options), `TooManyBadSamplesError`, `StorageError` (storage kept failing after `retries`),
    `ShardError` (anything else, named). Re-running after any failure resumes: committed shards are verified
    and skipped.
    """
    t0 = time.monotonic()
    options = dataclasses.replace(options or ShardOptions(), **overrides)
    storage_options = options.storage_options
    plan = plan_shards(dataset, dest_url, options)
    try:
        where = describe_endpoint(dest_url, storage_options)
        log.info(
            "sharding %s (%d samples, %.1f MB, %d quarantined before reading) into %d shard(s) at %s",
            plan.dataset_name,
            plan.total_samples,
            plan.input_bytes / 1e6,
            len(plan.bad),
            len(plan.jobs),
            where,
        )
        prepare_destination(plan, overwrite=options.overwrite)
        results = write_shards(
            plan,
            workers=options.workers,
            progress=options.progress,
            ray=options.ray,
            ray_resource=options.ray_resource,
        )
        manifest = finalize(plan, results)
    finally:
        plan.close()
    skipped = sum(r.skipped for r in results)
    fs, root = get_fs(dest_url, storage_options)
    manifest_url = full_url(fs, safe_join(root, MANIFEST))
    seconds = time.monotonic() - t0
    written_bytes = sum(r.input_bytes for r in results if not r.skipped)
    log.info(
        "committed %s: %d samples in %d shard(s) (%d written, %d already there), %d bad -> %s; %.1fs",
        manifest_url,
        manifest["totals"]["samples"],
        len(results),
        len(results) - skipped,
        skipped,
        manifest["bad"]["count"],
        manifest["bad"]["report"],
        seconds,
    )
    return ShardRunResult(manifest, manifest_url, len(results) - skipped, skipped, seconds, written_bytes)
