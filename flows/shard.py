"""Prefect flow `shard-dataset`: `pipelines.shard.job.shard_dataset` as one task, retried on storage errors.

A retried task resumes: shards already committed (same plan, same sha256) are verified and skipped, so a retry
only redoes what was not finished. The flow's parameters are `ShardOptions`' fields plus `dataset` and `dest`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.retries import retry_on_storage_error
from pipelines.fsio import describe_endpoint
from pipelines.options import REQUIRED, flat_parameters
from pipelines.shard.job import shard_dataset
from pipelines.shard.options import ShardOptions

TASK_RETRIES = 3
TASK_RETRY_BACKOFF_S = 2.0


@task(name="shard", cache_policy=NO_CACHE)
def shard_task(dataset: str, dest: str, options: ShardOptions) -> dict[str, Any]:
    logger = get_run_logger()
    logger.info("sharding %s into %s", dataset, describe_endpoint(dest, options.storage_options))
    result = shard_dataset(dataset, dest, options)
    m = result.manifest
    logger.info(
        "committed %s: %d samples (%s), %d captions, %d shard(s) (%d written, %d already committed), "
        "%d bad (report %s)",
        result.manifest_url,
        m["totals"]["samples"],
        ", ".join(f"{k} {v['samples']}" for k, v in m["splits"].items()),
        m["totals"]["captions"],
        m["totals"]["shards"],
        result.written,
        result.skipped,
        m["bad"]["count"],
        m["bad"]["report"],
    )
    return {
        "manifest": result.manifest_url,
        "samples": m["totals"]["samples"],
        "captions": m["totals"]["captions"],
        "shards": m["totals"]["shards"],
        "written": result.written,
        "splits": {k: v["samples"] for k, v in m["splits"].items()},
        "bad": m["bad"]["count"],
    }


@flow(name="shard-dataset", log_prints=True)
@flat_parameters(
    ShardOptions,
    defaults={"workers": 1},
    extra={
        "dataset": (str, REQUIRED),
        "dest": (str, REQUIRED),
        "task_retries": (int, TASK_RETRIES),
        "task_retry_backoff_s": (float, TASK_RETRY_BACKOFF_S),
    },
)
def shard_dataset_flow(
    options: ShardOptions, dataset: str, dest: str, task_retries: int, task_retry_backoff_s: float
) -> dict[str, Any]:
    """Shard DATASET into WebDataset tars at DEST (any fsspec URL); returns a summary of the manifest.

    Storage errors are retried twice over: quickly inside each shard (`retries`), then the whole task with
    exponential backoff (`task_retries`, first delay `task_retry_backoff_s`). Prefer the worker's standard
    AWS_* variables for S3 credentials: flow parameters are stored in the Prefect database, so
    `storage_options` should carry only non-secret settings.
    """
    options = dataclasses.replace(options, progress=False)  # a flow run logs; it has no terminal
    retried = shard_task.with_options(
        retries=task_retries,
        retry_delay_seconds=exponential_backoff(task_retry_backoff_s),
        retry_condition_fn=retry_on_storage_error,
    )
    return retried(dataset, dest, options)
