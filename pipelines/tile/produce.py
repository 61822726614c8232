"""The samples of one chip shard, for `pipelines.shard.write`: read, check, scale, encode and describe each
planned chip of one scene; skip (and count) the empty ones; hand over the broken ones as bad samples.

A read that fails on the data (a corrupted tile) makes that chip a bad sample, quarantined with its scene and
window. One that fails on the network - GDAL says so, or the object no longer answers a HEAD request - raises
`TransientSceneError` instead: the shard is retried as a whole and, if storage stays down, the run fails
without a manifest (a re-run resumes). The first shard of a scene also writes the scene's overview PNG and
record under `_scenes/`.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from fsspec.utils import get_protocol

from pipelines.fsio import atomic_write_bytes, get_fs, safe_join
from pipelines.shard.layout import TMP
from pipelines.shard.write import report_progress
from pipelines.tile.chips import ChipReadError, ChipSkipped, SceneChips, gdal_reason
from pipelines.tile.footprint import FootprintError
from pipelines.tile.layout import OVERVIEW_SIDE, SCENES
from pipelines.tile.refs import probe
from pipelines.tile.rio import is_transient_read_error
from pipelines.tile.scene import SceneError, TransientSceneError, read_overview

log = logging.getLogger("pipelines.tile")


def _details(scene: dict[str, Any], meta: dict[str, Any], size: int) -> dict[str, Any]:
    window = {"col_off": meta["col"], "row_off": meta["row"], "width": size, "height": size}
    return {"scene_id": scene["id"], "scene_url": scene["url"], "window": window}


def _bad(exc: Exception, scene: dict[str, Any], meta: dict[str, Any]) -> Exception:
    exc.details = _details(scene, meta, scene["src_size"])  # type: ignore[attr-defined]
    return exc


def _reachable(scene: dict[str, Any], storage_options) -> bool:
    """Does the scene's (remote) file still answer? Tells a corrupted tile from storage going away (GDAL may
    report both as a failed TIFF read)."""
    return probe(scene["url"], storage_options) is None


def produce_chips(job, planned: list, ctx, dataset: str) -> Iterator[tuple[dict[str, Any], Any]]:
    """(chip metadata, (tar members, raw bytes read) or the exception that makes it a bad sample), in order."""
    scene, options = job.scene, job.options
    remote = any(get_protocol(a["href"]) != "file" for a in scene["assets"])
    chips = SceneChips(scene, options, ctx.storage_options, dataset)
    try:
        chips.__enter__()
    except SceneError as exc:  # gone or broken since it was planned: every chip of it is bad
        for meta, _, _ in planned:
            yield meta, _bad(SceneError(str(exc)), scene, meta)
        return
    try:
        if job.first_of_scene:
            try:
                write_scene_files(chips, ctx)
            except ChipReadError as exc:
                if remote and (is_transient_read_error(exc) or not _reachable(scene, ctx.storage_options)):
                    raise TransientSceneError(
                        f"{scene['url']}: reading failed on the network: {exc}"
                    ) from exc
                log.warning("scene %s: no overview written (%s); its chips are read on", scene["url"], exc)
        yield from _in_order(chips, _outcomes(chips, planned, remote, ctx))
    finally:
        chips.__exit__(None, None, None)


# PNG encoding is most of a chip's cost; Pillow releases the GIL while it encodes, so a few threads encode
# while this one reads the next windows (GDAL handles stay in this thread). Measured on the 2-core machine:
# 16 encodes 4.8 s in one thread, 2.7 s in two. At most ENCODE_AHEAD chips wait encoded or encoding.
ENCODE_THREADS = min(2, os.cpu_count() or 1)
ENCODE_AHEAD = 4 * ENCODE_THREADS


def _outcomes(chips: SceneChips, planned: list, remote: bool, ctx):
    """Per planned chip, in order: (meta, pixels + doc to encode) or (meta, exception) or (meta, None: skipped)."""
    scene = chips.scene
    for meta, _, _ in planned:
        try:
            yield meta, chips.prepare(meta["key"], meta["row"], meta["col"])
        except ChipSkipped:
            yield meta, None
        except ChipReadError as exc:
            if remote and (is_transient_read_error(exc) or not _reachable(scene, ctx.storage_options)):
                raise TransientSceneError(f"{scene['url']}: reading failed on the network: {exc}") from exc
            yield meta, _bad(exc, scene, meta)
        except FootprintError as exc:
            yield meta, _bad(exc, scene, meta)


def _in_order(chips: SceneChips, outcomes) -> Iterator[tuple[dict[str, Any], Any]]:
    """Encode in threads, hand over in plan order (the shard's bytes must not depend on timing)."""
    pending: deque = deque()
    with ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="tile-encode") as pool:
        try:
            for meta, outcome in outcomes:
                if isinstance(outcome, tuple):
                    pixels, doc, nbytes = outcome
                    fut = pool.submit(chips.finish, meta["key"], pixels, doc)
                    pending.append((meta, fut, nbytes))
                else:
                    pending.append((meta, outcome, 0))
                while len(pending) > ENCODE_AHEAD or (pending and _ready(pending[0][1])):
                    yield from _hand_over(pending.popleft())
            while pending:
                yield from _hand_over(pending.popleft())
        finally:
            for _, fut, _ in pending:
                if isinstance(fut, Future):
                    fut.cancel()


def _ready(item) -> bool:
    return not isinstance(item, Future) or item.done()


def _hand_over(entry) -> Iterator[tuple[dict[str, Any], Any]]:
    meta, item, nbytes = entry
    if item is None:  # skipped as mostly nodata: counted by the plan, reported to the progress bar here
        report_progress(1, 0)
        return
    if isinstance(item, Future):
        yield meta, (item.result(), nbytes)
        return
    yield meta, item


def write_scene_files(chips: SceneChips, ctx) -> None:
    """`_scenes/{key}.png` (the scene at most OVERVIEW_SIDE a side, scaled like its chips, nodata transparent)
    and `_scenes/{key}.json` (where it lies and how it was read), for maps. Written atomically."""
    from PIL import Image
    from rasterio.errors import RasterioIOError

    scene = chips.scene
    try:
        data, valid = read_overview(scene, chips.datasets, OVERVIEW_SIDE, chips.options.resampling)
    except RasterioIOError as exc:
        raise ChipReadError(gdal_reason(exc)) from exc
    pixels = chips.to_uint8(data, valid)
    alpha = np.where(valid, 255, 0).astype(np.uint8)
    planes = [*pixels, alpha]
    img = Image.fromarray(
        np.ascontiguousarray(np.stack(planes, axis=-1)), mode="RGBA" if len(planes) == 4 else "LA"
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    h, w = alpha.shape
    sx, sy = scene["width"] / w, scene["height"] / h
    a, b, c, d, e, f = scene["transform"]
    record = {
        "id": scene["id"],
        "key": scene["key"],
        "name": scene["name"],
        "url": scene["url"],
        "crs": scene["crs"],
        "epsg": scene["epsg"],
        "width": scene["width"],
        "height": scene["height"],
        "gsd": scene["gsd"],
        "native_gsd": scene["native_gsd"],
        "footprint": (scene.get("footprint") or {}).get("footprint"),
        "bbox": (scene.get("footprint") or {}).get("bbox"),
        "centroid": (scene.get("footprint") or {}).get("centroid"),
        "scaling": scene["scaling"],
        "bands": scene["bands"],
        "dtype": scene["dtype"],
        "stac": scene.get("stac"),
        "overview": {
            "path": f"{scene['key']}.png",
            "width": w,
            "height": h,
            "transform": [a * sx, b * sy, c, d * sx, e * sy, f],
        },
    }
    fs, root = get_fs(ctx.dest_url, ctx.storage_options)
    tmp = safe_join(root, TMP)
    atomic_write_bytes(fs, safe_join(root, SCENES, f"{scene['key']}.png"), buf.getvalue(), tmp)
    doc = json.dumps(record, sort_keys=True, indent=1, ensure_ascii=False) + "\n"
    atomic_write_bytes(fs, safe_join(root, SCENES, f"{scene['key']}.json"), doc.encode("utf-8"), tmp)
