"""Distributors: who runs a plan's shard jobs. One interface, two implementations.

- `LocalPool` (the default): this process plus up to `workers - 1` spawned worker processes on this machine.
- `pipelines.shard.ray_distribute.RayTasks` (`--ray [ADDRESS]`): one Ray task per job, spread over a cluster.

A distributor gets the jobs, the plan and two callbacks: `bar` (the run's one progress line) and `accept` (called
once per finished job with its `ShardResult`, in completion order; it may raise to stop the run, e.g. too many
bad samples). It returns once every job is done, or raises. A job's bytes never depend on who writes it or
where, so the distributors are interchangeable: same plan, same shards, same sha256s (the idea follows
img2dataset's multiprocessing / Spark / Ray distributors). Jobs that fail are summed up in one error
(`failed_jobs_error`) naming each job, the node, the URL and the reason; committed shards stay, and running the
same command again resumes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pipelines.fsio import StorageError
from pipelines.shard.plan import ShardError, ShardJob, ShardPlan, ShardResult
from pipelines.shard.write import (
    init_worker,
    set_progress_sink,
    worker_ready,
    write_shard,
    write_shard_in_worker,
)

log = logging.getLogger("pipelines.shard")


class Progress:
    """The run's one progress line (tqdm): samples (or chips) per second, MB/s of input, jobs done / total."""

    def __init__(self, total: int, jobs: int, enabled: bool, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="sample", desc=desc, disable=not enabled, dynamic_ncols=True)
        self.bytes = 0
        self.jobs, self.jobs_done = jobs, 0
        self.t0 = time.monotonic()
        self.lock = threading.Lock()  # the parent's writer thread and the main thread both report

    def update(self, samples: int, nbytes: int) -> None:
        with self.lock:
            self.bytes += nbytes
            self.bar.update(samples)
            self._postfix()

    def job_done(self) -> None:
        with self.lock:
            self.jobs_done += 1
            self._postfix()

    def _postfix(self) -> None:
        dt = max(time.monotonic() - self.t0, 1e-6)
        self.bar.set_postfix_str(
            f"{self.bytes / 1e6 / dt:.1f} MB/s, jobs {self.jobs_done}/{self.jobs}", refresh=False
        )

    def close(self) -> None:
        self.bar.close()


Accept = Callable[[ShardResult], None]


class Distributor(Protocol):
    def run(self, jobs: list[ShardJob], plan: ShardPlan, bar: Progress, accept: Accept) -> None: ...


# ---------------------------------------------------------------------------------------------- failures


@dataclass
class JobFailure:
    """A job that failed for good: which, on which node, reaching what, and why. Plain data (crosses Ray)."""

    job: str
    node: str
    url: str | None
    reason: str
    storage: bool  # storage kept failing (a retry later may heal it), not bad data

    def describe(self) -> str:
        if self.storage and self.url:
            return f"shard {self.job}: node {self.node} cannot reach {self.url}: {self.reason}"
        return f"shard {self.job} on node {self.node}: {self.reason}"


def _root_cause(exc: BaseException) -> BaseException:
    seen = exc
    while seen.__cause__ is not None:
        seen = seen.__cause__
    return seen


def job_failure(job: ShardJob, node: str, dest_url: str, exc: BaseException) -> JobFailure:
    """What to report for a job that raised `exc`: a storage error names the source URL (when reading a source
    failed) or the shard's destination URL, and its root cause."""
    cause = _root_cause(exc)
    storage = isinstance(exc, StorageError)
    url = getattr(cause, "source_url", None) or (f"{dest_url.rstrip('/')}/{job.path}" if storage else None)
    reason = f"{type(cause).__name__}: {cause}"
    if storage and cause is not exc:
        reason += " (retries exhausted)"
    return JobFailure(job.name, node, url, " ".join(reason.split()), storage)


class FailedJobsError(ShardError):
    """Some jobs failed (data or code); the rest ran. One line: how many, and each job's node, URL, reason."""


class UnreachableStorageError(StorageError):
    """Every failed job failed on storage: a node could not reach a source or the destination. A `StorageError`,
    so the flows' retry policy retries it."""


def failed_jobs_error(
    failures: Sequence[JobFailure], total: int, not_started: int
) -> ShardError | StorageError:
    shown = "; ".join(f.describe() for f in failures[:5])
    more = f"; and {len(failures) - 5} more" if len(failures) > 5 else ""
    skipped = f", {not_started} not started" if not_started else ""
    msg = (
        f"{len(failures)} of {total} shard job(s) failed{skipped}: {shown}{more}. Committed shards are kept; "
        "run the same command again to resume"
    )
    cls = UnreachableStorageError if all(f.storage for f in failures) else FailedJobsError
    return cls(msg)


# ---------------------------------------------------------------------------------------------- local pool


class _Stopped(Exception):
    """Raised inside the parent's writer thread (at its next sample) once the run is stopping."""


class LocalPool:
    """`workers` writers: a thread of this (already warm) process plus up to `workers - 1` spawned processes.

    This process starts writing at once. Worker processes are started only once the shards nobody has taken
    yet would keep this process busy for longer than `min_work_s` (judged from its rate so far), and a worker
    is handed a shard only once it has started: no shard waits for a process that is not ready, and a small
    run is simply written here. Shards go one at a time to whichever writer is free.
    """

    def __init__(
        self, workers: int, min_work_s: float, write: Callable[..., ShardResult] = write_shard
    ) -> None:
        self.workers = workers
        self.min_work_s = min_work_s
        self.write = write  # how this process writes one shard (worker processes use `write_shard_in_worker`)

    def run(self, jobs: list[ShardJob], plan: ShardPlan, bar: Progress, accept: Accept) -> None:
        if self.workers <= 1 or len(jobs) <= 1:
            saved = set_progress_sink(bar.update)
            try:
                for job in jobs:
                    accept(self.write(job, plan.ctx, plan.dataset_name))
            finally:
                set_progress_sink(saved)
            return
        self._pool(jobs, plan, bar, accept)

    def _pool(self, jobs: list[ShardJob], plan: ShardPlan, bar: Progress, accept: Accept) -> None:
        import concurrent.futures as cf
        import multiprocessing as mp
        from collections import deque

        workers, min_work_s = self.workers, self.min_work_s
        todo = deque(jobs)
        stop = threading.Event()
        done_here = [0]  # samples this process has written (its rate decides whether workers are worth it)

        def report_here(samples: int, nbytes: int) -> None:
            if stop.is_set():  # a cancellation point per sample: the failure elsewhere is reported, not this
                raise _Stopped("run stopping")
            done_here[0] += samples
            bar.update(samples, nbytes)

        def write_here(job: ShardJob) -> ShardResult:
            saved = set_progress_sink(report_here)
            try:
                return self.write(job, plan.ctx, plan.dataset_name)
            finally:
                set_progress_sink(saved)

        here = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        procs: cf.ProcessPoolExecutor | None = None
        q = None
        running: dict[cf.Future, tuple[cf.Executor, ShardJob | None]] = {}
        t0 = time.monotonic()

        def hand_out(executor: cf.Executor) -> None:
            if todo:
                job = todo.popleft()
                if executor is here:
                    running[here.submit(write_here, job)] = (here, job)
                else:
                    running[executor.submit(write_shard_in_worker, job, plan.ctx, plan.dataset_name)] = (
                        executor,
                        job,
                    )

        def start_workers_if_worth_it() -> None:
            nonlocal procs, q
            if procs is not None or not todo:
                return
            if min_work_s > 0:
                elapsed = time.monotonic() - t0
                if not done_here[0] or elapsed < 0.25:  # no steady rate yet
                    return
                if sum(j.count for j in todo) * elapsed / done_here[0] <= min_work_s:
                    return
            # spawn, not fork: the parent may already hold s3fs's event-loop thread and open connections.
            mpctx = mp.get_context("spawn")
            q = mpctx.Queue()
            n = min(workers - 1, len(todo))
            procs = cf.ProcessPoolExecutor(
                max_workers=n, mp_context=mpctx, initializer=init_worker, initargs=(q,)
            )
            for _ in range(n):  # each submit starts one process; its first task says when it is ready
                running[procs.submit(worker_ready, plan.ctx)] = (procs, None)
            log.debug("started %d worker process(es) for %d remaining shard(s)", n, len(todo))

        try:
            start_workers_if_worth_it()
            hand_out(here)
            while running:
                done, _ = cf.wait(running, timeout=0.1, return_when=cf.FIRST_COMPLETED)
                if q is not None:
                    _drain(q, bar)
                for fut in done:
                    executor, job = running.pop(fut)
                    try:
                        result = fut.result()
                    except (StorageError, ShardError):
                        raise
                    except Exception as exc:
                        what = f"shard {job.name}" if job else "starting a worker process"
                        raise ShardError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
                    if job is not None:
                        accept(result)
                    hand_out(executor)
                start_workers_if_worth_it()
            if q is not None:
                _drain(q, bar)
        finally:
            stop.set()
            here.shutdown(wait=True, cancel_futures=True)
            if procs is not None:
                procs.shutdown(wait=True, cancel_futures=True)
                q.close()


def _drain(q, bar: Progress) -> None:
    while True:
        try:
            samples, nbytes = q.get_nowait()
        except queue.Empty:
            return
        bar.update(samples, nbytes)
