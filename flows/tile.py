"""Prefect flow `tile-archive`: `pipelines.tile.job.tile_scenes` as one task, retried on storage errors.

Meant to run nightly over a growing folder or STAC catalog: each run tiles only the scenes that are new or
changed since the last committed manifest, so a retried or re-run task redoes only what is not finished. The
flow's parameters are `TileOptions`' fields plus `source` and `dest`, and `ray_address` as in `shard-dataset`
("local"; a cluster address for Ray tasks from this process; "http://HEAD:8265" to submit
`python -m pipelines.tile ... --ray auto` as a Ray job whose log is streamed here and whose failure fails the run).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.retries import retry_on_storage_error
from flows.shard import in_process_ray, is_job_api, job_argv, run_as_ray_job
from pipelines.fsio import describe_endpoint
from pipelines.options import REQUIRED, flat_parameters
from pipelines.tile.job import tile_scenes
from pipelines.tile.options import TileOptions

TASK_RETRIES = 3
TASK_RETRY_BACKOFF_S = 2.0


@task(name="ray-job-tile", cache_policy=NO_CACHE)
def tile_on_cluster(
    source: str, dest: str, options: TileOptions, address: str, python: str, upload_code: bool
) -> dict[str, Any]:
    from pipelines.shard.read import read_manifest

    logs = run_as_ray_job(
        "pipelines.tile", [source, dest, *job_argv(options)], address, python, upload_code, dest
    )
    m = read_manifest(dest, options.storage_options)
    t = m["tile"]["totals"]
    tiled = re.findall(r"\((\d+) tiled, (\d+) unchanged\)", logs)
    written = re.findall(r"\((\d+) written, (\d+) kept\)", logs)
    return {
        "manifest": f"{dest.rstrip('/')}/_manifest.json",
        "chips": m["totals"]["samples"],
        "scenes": t["scenes"],
        "scenes_tiled": int(tiled[-1][0]) if tiled else None,
        "scenes_unchanged": int(tiled[-1][1]) if tiled else None,
        "scenes_bad": t["scenes_bad"],
        "chips_bad": t["chips_bad"],
        "chips_skipped_nodata": t["chips_skipped_nodata"],
        "shards": len(m["shards"]),
        "written": int(written[-1][0]) if written else None,
    }


@task(name="tile", cache_policy=NO_CACHE)
def tile_task(source: str, dest: str, options: TileOptions) -> dict[str, Any]:
    logger = get_run_logger()
    logger.info("tiling %s into %s", source, describe_endpoint(dest, options.storage_options))
    result = tile_scenes(source, dest, options)
    m, t = result.manifest, result.manifest["tile"]["totals"]
    logger.info(
        "committed %s: %d chips of %d scene(s) (%d tiled now, %d unchanged), %d shard(s) (%d written), "
        "%d mostly-nodata chips skipped, %d bad chips, %d bad scenes (report %s)",
        result.manifest_url,
        result.chips,
        t["scenes"],
        result.scenes_tiled,
        result.scenes_unchanged,
        len(m["shards"]),
        result.written,
        t["chips_skipped_nodata"],
        t["chips_bad"],
        t["scenes_bad"],
        m["bad"]["report"],
    )
    return {
        "manifest": result.manifest_url,
        "chips": result.chips,
        "scenes": t["scenes"],
        "scenes_tiled": result.scenes_tiled,
        "scenes_unchanged": result.scenes_unchanged,
        "scenes_bad": t["scenes_bad"],
        "chips_bad": t["chips_bad"],
        "chips_skipped_nodata": t["chips_skipped_nodata"],
        "shards": len(m["shards"]),
        "written": result.written,
    }


@flow(name="tile-archive", log_prints=True)
@flat_parameters(
    TileOptions,
    defaults={"workers": 1},
    extra={
        "source": (str, REQUIRED),
        "dest": (str, REQUIRED),
        "task_retries": (int, TASK_RETRIES),
        "task_retry_backoff_s": (float, TASK_RETRY_BACKOFF_S),
        "ray_address": (str, "local"),
        "python": (str, "python"),
        "upload_code": (bool, True),
    },
)
def tile_archive(
    options: TileOptions,
    source: str,
    dest: str,
    task_retries: int,
    task_retry_backoff_s: float,
    ray_address: str = "local",
    python: str = "python",
    upload_code: bool = True,
) -> dict[str, Any]:
    """Tile the scenes of SOURCE (GeoTIFF/COG folder, URL list or STAC catalog) into chip shards at DEST; returns
    a summary of the manifest. Only new and changed scenes are tiled.

    Storage errors are retried twice over: inside each shard and scene (`retries`), then the whole task with
    exponential backoff (`task_retries`, first delay `task_retry_backoff_s`). Flow parameters are stored in the
    Prefect database: S3 credentials belong in the worker's AWS_* variables, never in `storage_options`.
    """
    options = dataclasses.replace(options, progress=False)  # a flow run logs; it has no terminal
    if is_job_api(ray_address):
        on_cluster = tile_on_cluster.with_options(
            retries=task_retries,
            retry_delay_seconds=exponential_backoff(task_retry_backoff_s),
            retry_condition_fn=retry_on_storage_error,
        )
        return on_cluster(source, dest, options, ray_address, python or sys.executable, upload_code)
    options = dataclasses.replace(options, ray=in_process_ray(ray_address))
    retried = tile_task.with_options(
        retries=task_retries,
        retry_delay_seconds=exponential_backoff(task_retry_backoff_s),
        retry_condition_fn=retry_on_storage_error,
    )
    return retried(source, dest, options)
