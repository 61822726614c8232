"""Submit `python -m pipelines.train ...` to a Ray cluster as a job, stream its logs, return its summary.

Used by the Prefect flow `train-ssjdn` (flows/train.py); the same thing by hand is
`ray job submit --address http://HEAD:8265 --working-dir . -- python -m pipelines.train ...`.

The submission id is deterministic (`ssjdn-train-<run>-<key>-<n>`): a retried Prefect task attaches to the job
it already submitted instead of starting a second one, and submits `-<n+1>` only when attempt n is over and
failed (the job itself continues from the run's latest checkpoint: `--resume auto`).
Token authentication (Ray >= 2.59) is taken from the environment: RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH with
RAY_AUTH_MODE=token (see ../shared/PITFALLS.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import PipelineError

log = logging.getLogger("pipelines.train")

SUMMARY_PREFIX = "SSJDN_TRAIN_SUMMARY "
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout (this file: pipelines/train/submit.py)


class JobFailedError(PipelineError, RuntimeError):
    """The Ray job ended FAILED or STOPPED; the message carries Ray's reason and the end of the job's log."""


@dataclass
class JobOutcome:
    submission_id: str
    status: str
    summary: dict[str, Any] | None
    logs_tail: str


def train_command(python: str, args: Sequence[str]) -> str:
    """The job entrypoint: `PYTHON -m pipelines.train ARGS...`, shell-quoted."""
    return " ".join(shlex.quote(a) for a in [python, "-m", "pipelines.train", *args])


def submission_base(run_key: str, salt: str = "") -> str:
    """`ssjdn-train-<run key>-<8 hex of the salt>`: the same inputs give the same id."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", run_key).strip("-")[:60] or "run"
    digest = hashlib.sha256(f"{run_key}|{salt}".encode()).hexdigest()[:8]
    return f"ssjdn-train-{slug}-{digest}"


def default_runtime_env(upload_code: bool = True) -> dict[str, Any]:
    """Upload this checkout as the job's working directory (files ignored by git are not uploaded)."""
    if upload_code and (REPO_ROOT / "pyproject.toml").is_file():
        return {
            "working_dir": str(REPO_ROOT),
            "excludes": [".git", ".venv", "runs", "store", "demo-out", "bench-out"],
        }
    return {}


def parse_summary(logs: str) -> dict[str, Any] | None:
    """The summary line `pipelines.train` prints last, if the log holds one."""
    for line in reversed(logs.splitlines()):
        idx = line.find(SUMMARY_PREFIX)
        if idx >= 0:
            try:
                return json.loads(line[idx + len(SUMMARY_PREFIX) :])
            except ValueError:
                return None
    return None


def auth_headers() -> dict[str, str]:
    """An explicit bearer header from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH (never logged).

    Ray reads RAY_AUTH_MODE once, when it is imported; an explicit header also works in a process that set the
    variables later (a Prefect worker's flow run, a test).
    """
    import os

    token = os.environ.get("RAY_AUTH_TOKEN")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path and Path(path).is_file():
        token = Path(path).read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def job_client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=auth_headers() or None)


def _stream(client, job_id: str, sink: Callable[[str], None]) -> None:
    async def follow() -> None:
        async for chunk in client.tail_job_logs(job_id):
            for line in chunk.splitlines():
                sink(line)

    try:
        asyncio.run(follow())
    except Exception as exc:  # noqa: BLE001 - streaming is best effort; the status below decides
        log.warning("log streaming of %s stopped: %s; waiting for the job to end", job_id, exc)


def submit_and_wait(
    address: str,
    entrypoint: str,
    base_id: str,
    *,
    runtime_env: dict[str, Any] | None = None,
    sink: Callable[[str], None] = print,
    poll_s: float = 2.0,
    timeout_s: float | None = None,
) -> JobOutcome:
    """Submit (or attach to) the job, stream its log lines to `sink`, wait for the end; raise JobFailedError."""
    client = job_client(address)
    jobs = {j.submission_id: j for j in client.list_jobs() if j.submission_id}
    n = 0
    while True:
        sid = f"{base_id}-{n}"
        job = jobs.get(sid)
        if job is None:
            client.submit_job(
                entrypoint=entrypoint,
                submission_id=sid,
                runtime_env=runtime_env or {},
                metadata={"ssjdn": "train"},
            )
            log.info("submitted Ray job %s to %s: %s", sid, address, entrypoint)
            break
        if str(job.status) in ("FAILED", "STOPPED"):
            n += 1
            continue
        log.info("attaching to Ray job %s (%s) on %s", sid, job.status, address)
        break
    _stream(client, sid, sink)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    status = str(client.get_job_status(sid))
    while status not in TERMINAL:
        if deadline is not None and time.monotonic() > deadline:
            client.stop_job(sid)
            raise JobFailedError(f"Ray job {sid} did not finish within {timeout_s:.0f}s; stopped it")
        time.sleep(poll_s)
        status = str(client.get_job_status(sid))
    logs = client.get_job_logs(sid)
    tail = "\n".join(logs.splitlines()[-40:])
    if status != "SUCCEEDED":
        info = client.get_job_info(sid)
        raise JobFailedError(f"Ray job {sid} {status}: {info.message}\n--- last log lines ---\n{tail}")
    return JobOutcome(sid, status, parse_summary(logs), tail)
