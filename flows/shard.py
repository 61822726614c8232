"""Prefect flow `shard-dataset`: `pipelines.shard` as plan -> groups of shards (tasks, retried) -> commit.

Each group task writes its shards through `pipelines.shard.write_shards`, which skips shards already committed
(same plan, same sha256). A task that fails on storage is retried with exponential backoff, so a retry only
redoes the shards that were not finished. The manifest is written by the last task, once every group is done.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from flows.retries import retry_on_storage_error
from pipelines.fsio import describe_endpoint
from pipelines.shard.job import finalize, prepare_destination, write_shards
from pipelines.shard.layout import MANIFEST
from pipelines.shard.plan import ShardJob, ShardOptions, ShardPlan, ShardResult, plan_shards

GROUP_RETRIES = 3
GROUP_RETRY_BACKOFF_S = 2.0


@task(
    name="plan-shards",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=exponential_backoff(2.0),
    retry_condition_fn=retry_on_storage_error,
)
def plan_task(dataset: str, dest: str, overwrite: bool, **kwargs: Any) -> ShardPlan:
    logger = get_run_logger()
    plan = plan_shards(dataset, dest, **kwargs)
    logger.info(
        "planned %d shard(s) for %s: %d samples, %.1f MB of images, %d quarantined before reading -> %s",
        len(plan.jobs),
        plan.dataset_name,
        plan.total_samples,
        plan.input_bytes / 1e6,
        len(plan.bad),
        describe_endpoint(dest, plan.ctx.storage_options),
    )
    prepare_destination(plan, overwrite=overwrite)
    return plan


@task(
    name="write-shard-group",
    cache_policy=NO_CACHE,
    retries=GROUP_RETRIES,
    retry_delay_seconds=exponential_backoff(GROUP_RETRY_BACKOFF_S),
    retry_condition_fn=retry_on_storage_error,
)
def write_group_task(plan: ShardPlan, jobs: list[ShardJob], label: str) -> list[ShardResult]:
    logger = get_run_logger()
    logger.info("%s: writing %d shard(s), %d samples", label, len(jobs), sum(j.count for j in jobs))
    results = write_shards(plan, jobs, workers=1, progress=False)
    for r in results:
        logger.info(
            "%s: shard %s/%06d %s: %d samples, %d bad, %.1f MB, sha256 %s",
            label,
            r.split,
            r.index,
            "already committed" if r.skipped else "written",
            r.samples,
            len(r.bad),
            r.bytes / 1e6,
            r.sha256[:12],
        )
    return results


@task(
    name="commit-manifest",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=exponential_backoff(2.0),
    retry_condition_fn=retry_on_storage_error,
)
def commit_task(plan: ShardPlan, groups: list[list[ShardResult]]) -> dict[str, Any]:
    logger = get_run_logger()
    manifest = finalize(plan, [r for g in groups for r in g])
    logger.info(
        "committed %s/%s: %d samples (%s), %d captions, %d shard(s), %d bad (report %s)",
        plan.dest_url.rstrip("/"),
        MANIFEST,
        manifest["totals"]["samples"],
        ", ".join(f"{k} {v['samples']}" for k, v in manifest["splits"].items()),
        manifest["totals"]["captions"],
        manifest["totals"]["shards"],
        manifest["bad"]["count"],
        manifest["bad"]["report"],
    )
    return manifest


@flow(name="shard-dataset", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def shard_dataset_flow(
    dataset: str,
    dest: str,
    format: str | None = None,
    images: str | None = None,
    name: str | None = None,
    splits: list[str] | None = None,
    maxcount: int = 1000,
    maxsize: int = 1_000_000_000,
    shuffle_seed: int | None = None,
    resize: int | None = None,
    reencode: str | None = None,
    validation: str = "structure",  # `validate=` of shard_dataset; that name would shadow pydantic's BaseModel.validate
    max_bad_fraction: float = 0.01,
    overwrite: bool = False,
    group_size: int = 8,
    storage_options: dict[str, Any] | None = None,
    storage_retries: int = 1,
    group_retries: int = GROUP_RETRIES,
    group_retry_backoff_s: float = GROUP_RETRY_BACKOFF_S,
) -> dict[str, Any]:
    """Shard DATASET into WebDataset tars at DEST (any fsspec URL); returns a summary of the manifest.

    Storage errors are retried twice over: quickly inside each shard (`storage_retries`), then the whole group
    task with exponential backoff (`group_retries`, first delay `group_retry_backoff_s`); a retried group skips
    the shards it already committed. Prefer the worker's standard AWS_* variables for S3 credentials: flow
    parameters are stored in the Prefect database, so `storage_options` should carry only non-secret settings.
    """
    logger = get_run_logger()
    options = ShardOptions(
        maxcount=maxcount,
        maxsize=maxsize,
        shuffle_seed=shuffle_seed,
        splits=tuple(splits) if splits else None,
        resize=resize,
        reencode=reencode,
        validate=validation,
        max_bad_fraction=max_bad_fraction,
    )
    plan = plan_task(
        dataset,
        dest,
        overwrite,
        format=format,
        images=images,
        name=name,
        options=options,
        storage_options=storage_options or {},
        retries=storage_retries,
        retry_backoff=1.0,
    )
    groups = [plan.jobs[i : i + max(1, group_size)] for i in range(0, len(plan.jobs), max(1, group_size))]
    logger.info(
        "writing %d shard(s) in %d group task(s) of up to %d", len(plan.jobs), len(groups), group_size
    )
    write_group = write_group_task.with_options(
        retries=group_retries, retry_delay_seconds=exponential_backoff(group_retry_backoff_s)
    )
    futures = [
        write_group.submit(plan, jobs, f"group {n}/{len(groups)} ({jobs[0].name}..{jobs[-1].name})")
        for n, jobs in enumerate(groups, 1)
    ]
    try:
        results = [f.result() for f in futures]
        manifest = commit_task(plan, results)
    finally:
        wait(
            futures
        )  # no group task still reads the local plan file when it is removed (a re-run plans again)
        plan.close()
    return {
        "manifest": f"{dest.rstrip('/')}/{MANIFEST}",
        "samples": manifest["totals"]["samples"],
        "captions": manifest["totals"]["captions"],
        "shards": manifest["totals"]["shards"],
        "splits": {k: v["samples"] for k, v in manifest["splits"].items()},
        "bad": manifest["bad"]["count"],
    }
