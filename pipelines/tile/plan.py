"""Planning a tiling run: which scenes are new or changed, their chip grids, and the shards they go to.

The plan is a pure function of the scenes (their identity and header, and for percentile scaling one overview
read) and the output options, so every shard is an independent unit of work whose bytes are the same on every
run. Each shard holds chips of one scene. A scene whose fingerprint (asset checksum, size+mtime or ETag, STAC
metadata, options) matches the last committed manifest is carried over as it is, without opening it; a new or
changed one gets shard indexes after the highest one ever committed, so resuming a killed run plans the same
shards again, and a changed scene's old shards stay readable until the new manifest replaces them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fsspec.utils import get_protocol

from pipelines.errors import PipelineError
from pipelines.fsio import StorageError, full_url, get_fs, read_json, safe_join, with_retries
from pipelines.shard.layout import MANIFEST, QUARANTINE, STATS
from pipelines.shard.plan import (
    PLAN_DIR_PREFIX,
    PlanFile,
    ShardJob,
    ShardPlan,
    ShardResult,
    WriteContext,
    bad_entry,
    remove_stale_plans,
)
from pipelines.tile.layout import CHIPS, SPLIT, chip_key, shard_path
from pipelines.tile.options import TileOptions
from pipelines.tile.refs import SceneRef
from pipelines.tile.scene import (
    SceneError,
    TransientSceneError,
    chip_windows,
    inspect_scene,
    scene_fingerprint,
)
from pipelines.tile.sources import list_scenes

log = logging.getLogger("pipelines.tile")

PLAN_THREADS_LOCAL = 2
PLAN_THREADS_REMOTE = 8  # opening a remote scene waits on a few range requests


class TileError(PipelineError, RuntimeError):
    """A tiling run that cannot go on (nothing to tile, SOURCE unreadable); one line, names what and why."""


@dataclass
class ChipJob(ShardJob):
    """One shard of chips of one scene: `pipelines.shard.write` writes it, asking `produce` for its samples."""

    scene: dict[str, Any] = field(default_factory=dict)  # the scene record (pipelines.tile.scene)
    options: TileOptions | None = None
    first_of_scene: bool = False  # also writes the scene's overview PNG and record under _scenes/

    def produce(self, planned: list, ctx: WriteContext, dataset: str):
        from pipelines.tile.produce import produce_chips

        return produce_chips(self, planned, ctx, dataset)


@dataclass
class TilePlan:
    """The shard plan (jobs, write context, scene-level bad entries) plus what the manifest says per scene."""

    shard_plan: ShardPlan
    source_kind: str
    source_url: str
    scenes: list[dict[str, Any]]  # records of the scenes tiled by this run (new or changed)
    carried: list[dict[str, Any]]  # manifest entries of unchanged scenes, kept as they are
    carried_results: list[ShardResult]  # their shards, for the manifest
    removed: list[str]  # ids of scenes the last manifest had and SOURCE no longer lists
    listed: int  # scenes SOURCE lists

    @property
    def jobs(self) -> list[ChipJob]:
        return self.shard_plan.jobs  # type: ignore[return-value]

    @property
    def bad_scenes(self) -> list[dict[str, Any]]:
        return self.shard_plan.bad

    def close(self) -> None:
        self.shard_plan.close()


def source_fingerprint(kind: str, url: str) -> str:
    """What makes a destination "the same run": the SOURCE (not its contents, which grow) + the options."""
    return hashlib.sha256(_canonical({"kind": kind, "source": url})).hexdigest()


def _canonical(obj: Any) -> bytes:
    """Compact canonical JSON: what plan lines and digests are made of."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode(
        "utf-8"
    )


def _scene_bad(ref: SceneRef, reason: str) -> dict[str, Any]:
    meta = {"key": ref.key, "source": ref.url, "filename": None, "split": SPLIT}
    return {**bad_entry(meta, reason, "scene"), "scene_id": ref.id}


def _previous(fs, root: str, fingerprint: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The last committed manifest of this same run (source + options) and its quarantine rows."""
    manifest = with_retries(lambda: read_json(fs, safe_join(root, MANIFEST)), what=f"read {root}/{MANIFEST}")
    if not manifest or manifest.get("fingerprint") != fingerprint or "tile" not in manifest:
        return None, []

    def read_report() -> list[dict[str, Any]]:
        try:
            with fs.open(safe_join(root, QUARANTINE), "rb") as f:
                return [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    return manifest, with_retries(read_report, what=f"read {root}/{QUARANTINE}")


def _stored_sizes(fs, root: str) -> dict[str, int]:
    """Sizes of the shard files under DEST/chips/ (one listing): a carried scene must still have its shards."""
    folder = safe_join(root, CHIPS)
    try:
        found = with_retries(lambda: fs.find(folder, detail=True), what=f"list {full_url(fs, folder)}")
    except FileNotFoundError:
        return {}
    return {
        posixpath.relpath(p, root): int(e.get("size") or 0) for p, e in found.items() if p.endswith(".tar")
    }


def _inspect_all(
    refs: list[SceneRef], options: TileOptions
) -> list[tuple[SceneRef, dict | None, str | None]]:
    """(ref, scene record or None, why not) per scene, in order; network failures are retried first."""

    def one(ref: SceneRef):
        try:
            scene = with_retries(
                lambda: inspect_scene(ref, options, options.storage_options),
                what=f"open {ref.url}",
                retries=options.retries,
                backoff=options.retry_backoff,
                retry_on=lambda e: isinstance(e, TransientSceneError),
            )
            return ref, scene, None
        except SceneError as exc:
            return ref, None, str(exc)
        except StorageError as exc:
            return ref, None, f"unreachable: {exc}"

    from tqdm import tqdm

    remote = any(get_protocol(a.href) != "file" for r in refs for a in r.assets)
    threads = min(len(refs), PLAN_THREADS_REMOTE if remote else PLAN_THREADS_LOCAL) or 1
    bar = tqdm(
        total=len(refs), unit="scene", desc="open scenes", disable=not options.progress, dynamic_ncols=True
    )
    try:
        if threads == 1:
            return [_counted(one(r), bar) for r in refs]
        with ThreadPoolExecutor(threads, thread_name_prefix="tile-plan") as pool:
            return [_counted(r, bar) for r in pool.map(one, refs)]
    finally:
        bar.close()


def _counted(item, bar):
    bar.update(1)
    return item


def plan_tiles(source: str | os.PathLike, dest_url: str, options: TileOptions | None = None) -> TilePlan:
    """List SOURCE, compare it with DEST's last manifest, open the new and changed scenes, cut their chip grids
    into shards. Writes nothing at `dest_url`."""
    options = options or TileOptions()
    so = options.storage_options
    kind, url, refs = list_scenes(source, so, assets=options.assets, bands=options.band_list)
    name = posixpath.basename(url.rstrip("/")) or url
    ctx = WriteContext(dest_url, so, options, options.retries, options.retry_backoff)  # type: ignore[arg-type]
    fingerprint_doc = {"dataset": source_fingerprint(kind, url), "options": options.output_options()}
    fingerprint = hashlib.sha256(_canonical(fingerprint_doc)).hexdigest()

    fs, root = get_fs(dest_url, so)
    previous, previous_bad = _previous(fs, root, fingerprint)
    prev_scenes = {s["id"]: s for s in (previous or {}).get("tile", {}).get("scenes", [])}
    prev_shards = {e["path"]: e for e in (previous or {}).get("shards", [])}
    stored = _stored_sizes(fs, root) if previous else {}

    carried, carried_results, todo = [], [], []
    for ref in refs:
        fp = scene_fingerprint(ref, options)
        old = prev_scenes.get(ref.id)
        if (
            old
            and old["fingerprint"] == fp
            and all(p in prev_shards and stored.get(p) == prev_shards[p]["bytes"] for p in old["shards"])
        ):
            carried.append(old)
            for p in old["shards"]:
                e = prev_shards[p]
                rows = [b for b in previous_bad if b.get("shard") == f"{e['split']}/{e['index']:06d}"]
                carried_results.append(_result_of_entry(e, rows))
        else:
            todo.append((ref, fp))
    listed_ids = {r.id for r in refs}
    removed = sorted(i for i in prev_scenes if i not in listed_ids)

    inspected = _inspect_all([r for r, _ in todo], options)
    next_index = 1 + max((e["index"] for e in prev_shards.values()), default=-1)
    remove_stale_plans()
    plan_file = PlanFile(
        os.path.join(tempfile.mkdtemp(prefix=f"{PLAN_DIR_PREFIX}{os.getpid()}-tile-"), "plan.jsonl")
    )
    jobs: list[ChipJob] = []
    scenes: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    offset = 0
    try:
        with open(plan_file.path, "wb") as f:
            for (ref, fp), (_, scene, problem) in zip(todo, inspected):
                if scene is None:
                    bad.append(_scene_bad(ref, problem or "cannot be tiled"))
                    continue
                scene["fingerprint"] = fp
                scene["shards"] = []
                scenes.append(scene)
                windows = chip_windows(scene)
                scene_blob = _canonical(scene)
                for start in range(0, len(windows), options.maxcount):
                    lines = b"".join(
                        _canonical(
                            [
                                {
                                    "key": chip_key(scene["key"], r, c),
                                    "row": r,
                                    "col": c,
                                    "split": SPLIT,
                                    "source": scene["url"],
                                },
                                0,
                                None,
                            ]
                        )
                        + b"\n"
                        for r, c in windows[start : start + options.maxcount]
                    )
                    digest = hashlib.sha256(_canonical(options.output_options()) + b"\n" + scene_blob + b"\n")
                    digest.update(lines)
                    path = shard_path(scene["key"], next_index)
                    f.write(lines)
                    jobs.append(
                        ChipJob(
                            SPLIT,
                            next_index,
                            path,
                            plan_file,
                            offset,
                            len(lines),
                            lines.count(b"\n"),
                            digest.hexdigest(),
                            scene=scene,
                            options=options,
                            first_of_scene=start == 0,
                        )
                    )
                    scene["shards"].append(path)
                    offset += len(lines)
                    next_index += 1
    except BaseException:
        plan_file.remove()
        raise
    planned = sum(j.count for j in jobs) + sum(s["chips"] for s in carried)
    shard_plan = ShardPlan(
        dataset_name=name,
        dataset_format=f"scenes/{kind}",
        dataset_path=url,
        dataset_fingerprint=fingerprint_doc["dataset"],
        classes=[],
        ctx=ctx,
        jobs=jobs,  # type: ignore[arg-type]
        bad=bad,
        captions_dropped=0,
        total_samples=planned + len(bad),
        input_bytes=0,
        plan_file=plan_file,
    )
    return TilePlan(shard_plan, kind, url, scenes, carried, carried_results, removed, len(refs))


def _result_of_entry(e: dict[str, Any], bad: list[dict[str, Any]]) -> ShardResult:
    return ShardResult(
        split=e["split"],
        index=e["index"],
        path=e["path"],
        digest=e["digest"],
        samples=e["samples"],
        captions=e["captions"],
        bytes=e["bytes"],
        sha256=e["sha256"],
        first_key=e["first_key"],
        last_key=e["last_key"],
        input_bytes=0,
        bad=bad,
        classes={},
        skipped=True,
    )


def stats_path(shard_path: str) -> str:
    return f"{STATS}/{shard_path.removesuffix('.tar')}.json"
