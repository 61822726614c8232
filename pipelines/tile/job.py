"""Tile satellite scenes (GeoTIFF/COG files, folders, URL lists, STAC) into WebDataset shards of georeferenced
chips on any fsspec URL, with the guarantees of `ssjdn shard`: a plan, per-shard records, quarantine, the
manifest as the commit point, resume after a kill, byte-identical shards on every run.

Layout (docs/tiling.md):

    DEST/chips/{scene_key}/shard-000000.tar   committed shards: the chips of one scene each
    DEST/_scenes/{scene_key}.png / .json      a small overview of each scene and its record, for maps
    DEST/_stats/chips/{scene_key}/shard-000000.json, DEST/_stats/run.json   per-shard records, the run
    DEST/_quarantine/report.jsonl             bad scenes and chips: scene, window, reason
    DEST/_manifest.json                       the commit point; its "tile" section lists the scenes

The writing, per-shard records, quarantine report and manifest are `pipelines.shard`'s: a tile plan is a shard
plan whose jobs produce chips instead of dataset samples.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import time
from dataclasses import dataclass
from typing import Any

from pipelines.fsio import describe_endpoint, full_url, get_fs, safe_join, with_retries
from pipelines.shard.job import finalize, prepare_destination, write_shards
from pipelines.shard.layout import MANIFEST
from pipelines.tile.layout import CHIPS, SCENES
from pipelines.tile.options import TileOptions
from pipelines.tile.plan import TilePlan, plan_tiles, stats_path

log = logging.getLogger("pipelines.tile")


@dataclass
class TileRunResult:
    manifest: dict[str, Any]
    manifest_url: str
    written: int  # shards written by this run
    skipped: int  # shards already committed (verified) or carried over with their unchanged scene
    seconds: float
    scenes_tiled: int
    scenes_unchanged: int
    scenes_bad: int

    @property
    def chips(self) -> int:
        return self.manifest["totals"]["samples"]


def _scene_entry(scene: dict[str, Any], results_by_path: dict[str, Any]) -> dict[str, Any]:
    rs = [results_by_path[p] for p in scene["shards"]]
    written, bad = sum(r.samples for r in rs), sum(len(r.bad) for r in rs)
    stac = scene.get("stac") or None
    place = scene.get("footprint") or {}
    return {
        "id": scene["id"],
        "key": scene["key"],
        "name": scene["name"],
        "url": scene["url"],
        "fingerprint": scene["fingerprint"],
        "crs": scene["crs"],
        "epsg": scene["epsg"],
        "width": scene["width"],
        "height": scene["height"],
        "dtype": scene["dtype"],
        "bands": scene["bands"],
        "mask": scene["mask"]["kind"],
        "native_gsd": scene["native_gsd"],
        "gsd": scene["gsd"],
        "overview_level": scene["overview"],
        "scaling": scene["scaling"],
        "bbox": place.get("bbox"),
        "chips": scene["chips"],
        "written": written,
        "skipped_nodata": scene["chips"] - written - bad,
        "bad": bad,
        "shards": scene["shards"],
        "overview": f"{SCENES}/{scene['key']}.png",
        "stac": None
        if not stac
        else {
            "item": stac.get("item"),
            "collection": stac.get("collection"),
            "datetime": (stac.get("properties") or {}).get("datetime"),
        },
    }


def tile_section(plan: TilePlan, results: list) -> dict[str, Any]:
    """The manifest's "tile" section: the source, every scene with its counts and scaling, the totals."""
    by_path = {r.path: r for r in results}
    scenes = sorted(plan.carried + [_scene_entry(s, by_path) for s in plan.scenes], key=lambda s: s["id"])
    totals = {
        "scenes": len(scenes),
        "scenes_bad": len(plan.bad_scenes),
        "chips_planned": sum(s["chips"] for s in scenes),
        "chips_written": sum(s["written"] for s in scenes),
        "chips_skipped_nodata": sum(s["skipped_nodata"] for s in scenes),
        "chips_bad": sum(s["bad"] for s in scenes),
        "scenes_without_chips": sum(1 for s in scenes if not s["written"]),
    }
    return {
        "source": {"url": plan.source_url, "kind": plan.source_kind, "scenes_listed": plan.listed},
        "gdal_cache_mb": plan.shard_plan.ctx.options.gdal_cache_mb,
        "scenes": scenes,
        "totals": totals,
    }


def _remove_unreferenced(fs, root: str, manifest: dict[str, Any]) -> int:
    """After the commit: shards (and their records) and scene files the manifest no longer lists - a changed
    scene's previous version, scenes gone from SOURCE. Before it, readers of the old manifest still had them."""
    keep = {e["path"] for e in manifest["shards"]}
    scene_keys = {s["key"] for s in manifest["tile"]["scenes"]}
    gone = 0
    for folder in (CHIPS, SCENES):
        base = safe_join(root, folder)
        try:
            found = with_retries(lambda b=base: fs.find(b), what=f"list {full_url(fs, base)}")
        except FileNotFoundError:
            continue
        for path in found:
            rel = posixpath.relpath(path, root)
            if folder == CHIPS:
                stale = rel.endswith(".tar") and rel not in keep
                extra = [stats_path(rel)] if stale else []
            else:
                stale = posixpath.splitext(posixpath.basename(rel))[0] not in scene_keys
                extra = []
            if not stale:
                continue
            for r in (rel, *extra):
                try:
                    with_retries(lambda r=r: fs.rm(safe_join(root, r)), what=f"remove {r}")
                except FileNotFoundError:
                    pass
            gone += 1
    if gone:
        fs.invalidate_cache(root)
    return gone


def tile_scenes(
    source: str | os.PathLike, dest_url: str, options: TileOptions | None = None, **overrides: Any
) -> TileRunResult:
    """Tile SOURCE into chip shards under `dest_url`; returns the committed manifest and run statistics.

    `options` (default `TileOptions()`), any field overridden by keyword (`tile_scenes(src, dest, gsd=2.0)`).
    Raises `SourceError` (SOURCE cannot be listed), `DestinationConflictError` (DEST holds another source's or
    other options' chips), `TooManyBadSamplesError`, `StorageError` (storage kept failing after `retries`).
    Re-running resumes a killed run, and over a grown SOURCE tiles only the new and changed scenes.
    """
    t0 = time.monotonic()
    options = dataclasses.replace(options or TileOptions(), **overrides)
    plan = plan_tiles(source, dest_url, options)
    sp = plan.shard_plan
    try:
        log.info(
            "tiling %s: %d scene(s) listed, %d new or changed (%d chips in %d shard(s)), %d unchanged, "
            "%d unusable, %d gone from the source -> %s",
            plan.source_url,
            plan.listed,
            len(plan.scenes),
            sum(j.count for j in plan.jobs),
            len(plan.jobs),
            len(plan.carried),
            len(plan.bad_scenes),
            len(plan.removed),
            describe_endpoint(dest_url, options.storage_options),
        )
        for b in plan.bad_scenes:
            log.warning("scene quarantined: %s", b["reason"])
        prepare_destination(sp, overwrite=options.overwrite)
        results = (
            write_shards(
                sp,
                workers=options.workers,
                progress=options.progress,
                ray=options.ray,
                ray_resource=options.ray_resource,
            )
            if plan.jobs
            else []
        )
        manifest = finalize(sp, plan.carried_results + results, extra={"tile": tile_section(plan, results)})
    finally:
        plan.close()
    fs, root = get_fs(dest_url, options.storage_options)
    removed = _remove_unreferenced(fs, root, manifest)
    written = sum(not r.skipped for r in results)
    skipped = len(manifest["shards"]) - written
    for s in manifest["tile"]["scenes"]:
        if not s["written"] and any(s["id"] == x["id"] for x in plan.scenes):
            log.info(
                "scene %s: no chips (%d of %d mostly nodata, %d bad)",
                s["url"],
                s["skipped_nodata"],
                s["chips"],
                s["bad"],
            )
    manifest_url = full_url(fs, safe_join(root, MANIFEST))
    seconds = time.monotonic() - t0
    t = manifest["tile"]["totals"]
    log.info(
        "committed %s: %d chips of %d scene(s) (%d tiled now, %d unchanged) in %d shard(s) (%d written, %d kept); "
        "%d mostly-nodata chips skipped, %d bad chips, %d bad scenes -> %s; %d stale file(s) removed; %.1fs",
        manifest_url,
        manifest["totals"]["samples"],
        t["scenes"],
        len(plan.scenes),
        len(plan.carried),
        len(manifest["shards"]),
        written,
        skipped,
        t["chips_skipped_nodata"],
        t["chips_bad"],
        t["scenes_bad"],
        manifest["bad"]["report"],
        removed,
        seconds,
    )
    return TileRunResult(
        manifest,
        manifest_url,
        written,
        skipped,
        seconds,
        len(plan.scenes),
        len(plan.carried),
        t["scenes_bad"],
    )
