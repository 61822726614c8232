"""Prefect flow `train-ssjdn`: run `pipelines.train` in this process, or submit it to a Ray cluster as a job.

ray_address="local": train in the flow-run process (a local Ray is started if none is connected).
ray_address="http://HEAD:8265": submit `PYTHON -m pipelines.train ...` with `JobSubmissionClient` under a
deterministic submission id, stream the job's log into the flow run's log, fail when the job fails.
Either way the per-epoch metrics end up in a table artifact (`train-ssjdn-metrics`) and the flow returns the
run summary. The training itself resumes from the run's latest checkpoint (`--resume auto`), so re-running a
failed flow continues where the job stopped.
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

ARTIFACT_KEY = "train-ssjdn-metrics"


def _cli_args(
    config: str,
    shards: str,
    storage: str,
    workers: int,
    gpu: bool,
    epochs: int | None,
    resume: str,
    name: str | None,
    overrides: dict[str, Any] | None,
    extra_args: list[str] | None,
) -> list[str]:
    args = [
        "--config",
        config,
        "--shards",
        shards,
        "--storage",
        storage,
        "--workers",
        str(workers),
        "--resume",
        resume,
    ]
    if gpu:
        args.append("--gpu")
    if epochs is not None:
        args += ["--epochs", str(epochs)]
    if name:
        args += ["--name", name]
    for key, value in (overrides or {}).items():
        args += ["--set", f"{key}={value}"]
    return args + list(extra_args or [])


@task(name="train-in-process", cache_policy=NO_CACHE)
def train_here(args: list[str]) -> dict[str, Any]:
    import argparse

    from pipelines.train.driver import add_arguments, options_from_args, run_training

    parser = argparse.ArgumentParser(prog="train-ssjdn")
    add_arguments(parser)
    return run_training(options_from_args(parser.parse_args(args)))


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
def train_ssjdn(
    config: str = "cpu-small",
    shards: str = "s3://ssjdn/shards/ucm",
    storage: str = "s3://ssjdn/runs",
    workers: int = 2,
    gpu: bool = False,
    epochs: int | None = None,
    ray_address: str = "local",
    resume: str = "auto",
    name: str | None = None,
    overrides: dict[str, Any] | None = None,
    extra_args: list[str] | None = None,
    python: str = "python",
    upload_code: bool = True,
) -> dict[str, Any]:
    """Train SSJDN on Ray from the shards at `shards`; checkpoints and metrics go to `storage`.

    `python` is the interpreter of the job's entrypoint on the cluster (the one with this project installed).
    """
    logger = get_run_logger()
    args = _cli_args(config, shards, storage, workers, gpu, epochs, resume, name, overrides, extra_args)
    if ray_address in ("local", "", None):
        logger.info("training in this process: %s", " ".join(args))
        summary = train_here(args)
    else:
        summary = train_on_cluster(
            ray_address, args, python or sys.executable, upload_code, run_key=name or f"{config}-{shards}"
        )
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
