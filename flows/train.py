"""Prefect flow `train-ssjdn`: run `pipelines.train` in this process, or submit it to a Ray cluster as a job.

ray_address="local": train in the flow-run process (a local Ray is started if none is connected).
ray_address="http://HEAD:8265": submit `PYTHON -m pipelines.train ...` with `JobSubmissionClient` under a
deterministic submission id, stream the job's log into the flow run's log, fail when the job fails.
Either way the per-epoch metrics end up in a table artifact (`train-ssjdn-metrics`) and the flow returns the
run summary. The training itself resumes from the run's latest checkpoint (`--resume auto`), so re-running a
failed flow continues where the job stopped.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipelines.fsio import redact
from pipelines.options import flat_parameters, options_to_argv
from pipelines.train.options import TrainOptions

ARTIFACT_KEY = "train-ssjdn-metrics"
# The flow's defaults where the command line has none (a deployment run may pass only `shards`).
FLOW_DEFAULTS = {"config": "cpu-small", "shards": "s3://ssjdn/shards/ucm", "storage": "s3://ssjdn/runs"}


@task(name="train-in-process", cache_policy=NO_CACHE)
def train_here(options: TrainOptions) -> dict[str, Any]:
    from pipelines.train.driver import run_training

    return run_training(options)


@task(name="ray-job-train", cache_policy=NO_CACHE)
def train_on_cluster(
    address: str, args: list[str], python: str, upload_code: bool, run_key: str
) -> dict[str, Any]:
    from prefect.runtime import flow_run

    from pipelines.train.submit import default_runtime_env, submission_base, submit_and_wait, train_command

    logger = get_run_logger()
    base = submission_base(run_key, salt=str(flow_run.id or ""))
    outcome = submit_and_wait(
        address,
        train_command(python, args),
        base,
        runtime_env=default_runtime_env(upload_code),
        sink=lambda line: logger.info("%s", line),
    )
    if outcome.summary is None:
        raise RuntimeError(
            f"Ray job {outcome.submission_id} succeeded but printed no summary:\n{outcome.logs_tail}"
        )
    logger.info("Ray job %s %s", outcome.submission_id, outcome.status)
    return outcome.summary


def metrics_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per epoch from the run's metrics.jsonl (falls back to the summary's untrained/final rows)."""
    from pipelines.train.rundir import RunDir

    split = summary.get("eval_split", "val")
    try:
        rows = RunDir(summary["run"]).read_jsonl("metrics.jsonl")
    except Exception:  # noqa: BLE001 - the table is a report; the summary still has the numbers
        rows = [
            {"epoch": 0, split: summary.get("untrained") or {}},
            {"epoch": summary.get("epochs"), split: summary.get("final") or {}},
        ]

    def num(value, digits: int = 2):
        return round(value, digits) if isinstance(value, (int, float)) else None  # None, not NaN: valid JSON

    table = []
    for r in rows:
        m = r.get(split) or {}
        table.append(
            {
                "epoch": r.get("epoch"),
                "train_loss": num(r.get("train", {}).get("loss"), 4),
                f"{split}_mR": num(m.get("mr")),
                "i2t_R@1": num(m.get("i2t_r1")),
                "t2i_R@1": num(m.get("t2i_r1")),
                "samples_per_s": r.get("samples_per_s"),
                "bad_samples": r.get("bad_samples", 0),
            }
        )
    return table


@flow(name="train-ssjdn", log_prints=True)
@flat_parameters(
    TrainOptions,
    defaults=FLOW_DEFAULTS,
    extra={"ray_address": (str, "local"), "python": (str, "python"), "upload_code": (bool, True)},
)
def train_ssjdn(
    options: TrainOptions, *, ray_address: str = "local", python: str = "python", upload_code: bool = True
) -> dict[str, Any]:
    """Train SSJDN on Ray from the shards at `shards`; checkpoints and metrics go to `storage`.

    The parameters are `TrainOptions`' fields (`ssjdn train`'s flags) plus: `ray_address` ("local": train in this
    process; "http://HEAD:8265": submit `python -m pipelines.train ...` as a Ray job), `python` (the interpreter of
    the job's entrypoint on the cluster, the one with this project installed) and `upload_code` (send this
    checkout as the job's working directory).
    """
    logger = get_run_logger()
    if ray_address in ("local", "", None):
        shown = dataclasses.replace(options, storage_options=redact(options.storage_options))
        logger.info("training in this process: %s", shown)
        summary = train_here(options)
    else:
        args = options_to_argv(options)  # the same options, as `python -m pipelines.train` reads them
        run_key = options.name or f"{options.config}-{options.shards}"
        summary = train_on_cluster(ray_address, args, python or sys.executable, upload_code, run_key=run_key)
    table = metrics_table(summary)
    create_table_artifact(
        table=table,
        key=ARTIFACT_KEY,
        description=f"SSJDN training {summary.get('run')}: per-epoch metrics ({summary.get('eval_split')})",
    )
    logger.info(
        "run %s: %s epoch(s), best %s mR %s",
        summary.get("run"),
        summary.get("epochs"),
        summary.get("eval_split"),
        summary.get("best_mr"),
    )
    return summary
