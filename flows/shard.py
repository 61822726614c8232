"""Prefect flow `shard-dataset`: `pipelines.shard.job.shard_dataset` as one task, retried on storage errors.

A retried task resumes: shards already committed (same plan, same sha256) are verified and skipped, so a retry
only redoes what was not finished. The flow's parameters are `ShardOptions`' fields plus `dataset` and `dest`, and
`ray_address` like `train-ssjdn`'s: "local" (default) shards in the flow-run process with the local pool; a
cluster address (`auto`, `HOST:6379`) runs the jobs from this process as Ray tasks on that cluster;
"http://HEAD:8265" submits `python -m pipelines.shard ... --ray auto` as a Ray job (deterministic submission
id), streams the job's log into the flow run's log and fails when the job fails.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import sys
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.retries import retry_on_storage_error
from pipelines.fsio import describe_endpoint
from pipelines.options import REQUIRED, flat_parameters, options_to_argv
from pipelines.shard.job import shard_dataset
from pipelines.shard.options import ShardOptions

TASK_RETRIES = 3
TASK_RETRY_BACKOFF_S = 2.0


def is_job_api(ray_address: str | None) -> bool:
    return bool(ray_address) and ray_address.startswith(("http://", "https://"))


def in_process_ray(ray_address: str | None) -> str | None:
    """The `--ray` value for a run in this process: None (local pool) for "local", else the cluster address."""
    return None if ray_address in (None, "", "local") else ray_address


def job_argv(options: Any) -> list[str]:
    """The options as `python -m pipelines.<job>` flags, for a Ray job's entrypoint (`--ray auto` added: the job
    joins the cluster it runs on). Storage options become `--storage-option key=value` (non-secret only: they
    are stored in the Prefect database and shown by Ray)."""
    argv = options_to_argv(dataclasses.replace(options, ray=None, storage_options={}))
    for key, value in _flat_items(options.storage_options):
        argv += ["--storage-option", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return [*argv, "--ray", "auto"]


def _flat_items(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        out += _flat_items(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    return out


def run_as_ray_job(
    module: str, args: list[str], address: str, python: str, upload_code: bool, run_key: str
) -> str:
    """Submit `PYTHON -m MODULE ARGS` to the cluster's job API at `address` (attaching to the same submission
    when a Prefect retry comes back), stream its log into this flow run's log, raise `JobFailedError` when it
    fails; returns the end of its log."""
    from prefect.runtime import flow_run

    from pipelines.ray_env import worker_env
    from pipelines.train.submit import default_runtime_env, submission_base, submit_and_wait

    logger = get_run_logger()
    entrypoint = shlex.join([python, "-m", module, *args])
    base = submission_base(run_key, salt=str(flow_run.id or "")).replace(
        "ssjdn-train-", f"ssjdn-{module[10:]}-"
    )
    runtime_env = default_runtime_env(upload_code)
    env = worker_env()  # non-secret settings only: Ray writes runtime_env values into its logs
    if env:
        runtime_env["env_vars"] = env
    outcome = submit_and_wait(
        address, entrypoint, base, runtime_env=runtime_env, sink=lambda line: logger.info("%s", line)
    )
    logger.info("Ray job %s %s", outcome.submission_id, outcome.status)
    return outcome.logs_tail


@task(name="ray-job-shard", cache_policy=NO_CACHE)
def shard_on_cluster(
    dataset: str, dest: str, options: ShardOptions, address: str, python: str, upload_code: bool
) -> dict[str, Any]:
    from pipelines.shard.read import read_manifest

    logs = run_as_ray_job(
        "pipelines.shard", [dataset, dest, *job_argv(options)], address, python, upload_code, dest
    )
    m = read_manifest(dest, options.storage_options)
    counts = re.findall(r"\((\d+) written, (\d+) already committed\)", logs)
    return {
        "manifest": f"{dest.rstrip('/')}/_manifest.json",
        "samples": m["totals"]["samples"],
        "captions": m["totals"]["captions"],
        "shards": m["totals"]["shards"],
        "written": int(counts[-1][0]) if counts else None,
        "splits": {k: v["samples"] for k, v in m["splits"].items()},
        "bad": m["bad"]["count"],
    }


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
        "ray_address": (str, "local"),
        "python": (str, "python"),
        "upload_code": (bool, True),
    },
)
def shard_dataset_flow(
    options: ShardOptions,
    dataset: str,
    dest: str,
    task_retries: int,
    task_retry_backoff_s: float,
    ray_address: str = "local",
    python: str = "python",
    upload_code: bool = True,
) -> dict[str, Any]:
    """Shard DATASET into WebDataset tars at DEST (any fsspec URL); returns a summary of the manifest.

    Storage errors are retried twice over: quickly inside each shard (`retries`), then the whole task with
    exponential backoff (`task_retries`, first delay `task_retry_backoff_s`). Prefer the worker's standard
    AWS_* variables for S3 credentials: flow parameters are stored in the Prefect database, so
    `storage_options` should carry only non-secret settings. `ray_address`: see the module's docstring;
    `python` is the interpreter of a Ray job's entrypoint on the cluster, `upload_code` sends this checkout as
    the job's working directory.
    """
    options = dataclasses.replace(options, progress=False)  # a flow run logs; it has no terminal
    if is_job_api(ray_address):
        on_cluster = shard_on_cluster.with_options(
            retries=task_retries,
            retry_delay_seconds=exponential_backoff(task_retry_backoff_s),
            retry_condition_fn=retry_on_storage_error,
        )
        return on_cluster(dataset, dest, options, ray_address, python or sys.executable, upload_code)
    options = dataclasses.replace(options, ray=in_process_ray(ray_address))
    retried = shard_task.with_options(
        retries=task_retries,
        retry_delay_seconds=exponential_backoff(task_retry_backoff_s),
        retry_condition_fn=retry_on_storage_error,
    )
    return retried(dataset, dest, options)
