"""The Ray distributor (`--ray [ADDRESS]`): one Ray task per shard job, spread over the cluster's nodes.

Each task gets its job by value (its plan lines travel with it: the plan file is the driver's) and the write
context; it reads its sources and writes its shard and per-shard record through fsspec URLs every node must
reach, exactly as a local writer does, and records the Ray node id as the shard's `node`. A task returns its
`ShardResult`, or a `JobFailure` (node, URL, reason) instead of raising, so one unreachable source does not cost
the driver a traceback from another machine.

Retries: storage errors are retried inside the task with backoff (`--retries`, `--retry-backoff`); a task lost
with its worker or node is resubmitted by the driver (up to `LOST_TASK_RETRIES` times; Ray's own retries are
off so a lost job is counted once). After the first job that fails for good no new jobs start; the running ones
finish (their shards commit), then one error sums the failed jobs up.

Credentials never travel through Ray: the tasks get only `pipelines.ray_env.worker_env()` (non-secret settings:
endpoint, region, `SSJDN_*`), as a task argument - not a `runtime_env`, which Ray writes into its session logs
and which costs a worker pool of its own. Each node reads
credentials from its own environment (instance role, the environment `ray start` ran in, a Kubernetes secret).
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from typing import Any

from pipelines.errors import PipelineError
from pipelines.ray_env import worker_env
from pipelines.shard.distribute import Accept, JobFailure, Progress, failed_jobs_error, job_failure
from pipelines.shard.plan import ShardJob, ShardPlan, ShardResult, WriteContext
from pipelines.shard.write import write_shard

log = logging.getLogger("pipelines.shard")

LOST_TASK_RETRIES = 3  # a job whose worker or node died is submitted again this many times
IN_FLIGHT_PER_CPU = 2  # jobs submitted ahead per cluster CPU: enough to keep every node busy, few to cancel
CONNECT_TIMEOUT_S = 5.0
RESOURCE_UNIT = 0.001  # a custom resource works as a node label: many tasks fit on one node


class RayConnectError(PipelineError, RuntimeError):
    """The Ray cluster named by `--ray` cannot be reached (one line: the address and Ray's reason)."""


def _node_label() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def run_job(job: ShardJob, ctx: WriteContext, dataset: str, env: dict[str, str]) -> ShardResult | JobFailure:
    """The body of one Ray task (any node): write the shard, or say which node failed reaching what.

    `env`: the driver's non-secret settings, applied here rather than as a task `runtime_env`: a runtime env
    makes Ray start a separate pool of workers for it (seconds per run on a busy node), and the settings are
    only read when a filesystem is opened. Workers belong to one driver's job, so nothing leaks to another."""
    os.environ.update(env)
    node = _node_label()
    try:
        return write_shard(job, ctx, dataset, node=node)
    except Exception as exc:  # noqa: BLE001 - reported to the driver as data (node, URL, reason)
        return job_failure(job, node, ctx.dest_url, exc)


def connect(address: str) -> bool:
    """Join the cluster at `address` (`auto`: the running one, as `RAY_ADDRESS` or the local head says).
    Returns True when this call connected (and so should disconnect)."""
    import ray

    from pipelines.logfile import reroute

    if ray.is_initialized():
        return False
    _check_reachable(address)
    reroute()  # Ray's console handlers -> the command's log file
    try:
        ray.init(address=address, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayConnectError(f"--ray {address}: cannot join the Ray cluster: {exc}") from None
    return True


def _check_reachable(address: str) -> None:
    """Fail in seconds, in one line, when nothing listens at a HOST:PORT address (`ray.init` retries for minutes)."""
    host, sep, port = address.rpartition(":")
    if address == "auto" or "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise RayConnectError(
            f"--ray {address}: cannot join the Ray cluster: nothing answers there ({exc.strerror or exc})"
        ) from None


class RayTasks:
    """Shard jobs as Ray tasks on the cluster at `address`; `resource` restricts them to nodes that offer that
    custom resource (`ray start --resources '{"NAME": 1}'`: e.g. the nodes that can reach the archive)."""

    def __init__(self, address: str = "auto", resource: str | None = None) -> None:
        self.address = address
        self.resource = resource

    def run(self, jobs: list[ShardJob], plan: ShardPlan, bar: Progress, accept: Accept) -> None:
        import ray

        owned = connect(self.address)
        try:
            self._run(ray, jobs, plan, bar, accept)
        finally:
            if owned:
                ray.shutdown()

    def _task(self, ray):
        options: dict[str, Any] = {
            "num_cpus": 1,
            "max_retries": 0,  # lost tasks are resubmitted below, counted once
            "scheduling_strategy": "SPREAD",
        }
        if self.resource:
            options["resources"] = {self.resource: RESOURCE_UNIT}
        return ray.remote(run_job).options(**options)

    def _run(self, ray, jobs: list[ShardJob], plan: ShardPlan, bar: Progress, accept: Accept) -> None:
        from ray.exceptions import RayError, RayTaskError

        task = self._task(ray)
        ctx = ray.put(plan.ctx)
        env = worker_env()  # non-secret settings only, by value: never credentials
        cpus = int(ray.cluster_resources().get("CPU", 1))
        cap = max(2, IN_FLIGHT_PER_CPU * cpus)
        todo: deque[tuple[ShardJob, int]] = deque((j, 0) for j in jobs)
        running: dict[Any, tuple[ShardJob, int]] = {}
        failures: list[JobFailure] = []
        nodes: set[str] = set()
        log.info(
            "%d shard job(s) as Ray tasks on %s (%d CPU(s)%s)",
            len(jobs),
            self.address,
            cpus,
            f", nodes with resource {self.resource}" if self.resource else "",
        )
        try:
            while todo or running:
                while todo and not failures and len(running) < cap:
                    job, attempt = todo.popleft()
                    running[task.remote(job.by_value(), ctx, plan.dataset_name, env)] = (job, attempt)
                if not running:
                    break
                ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                for ref in ready:
                    job, attempt = running.pop(ref)
                    try:
                        out = ray.get(ref)
                    except RayTaskError as exc:  # run_job returns failures: this is a bug, reported as one
                        failures.append(job_failure(job, "?", plan.ctx.dest_url, exc.cause or exc))
                        continue
                    except RayError as exc:  # the worker or its node died, the object was lost
                        if attempt < LOST_TASK_RETRIES:
                            log.warning(
                                "shard %s: Ray task lost (%s); submitting it again (%d/%d)",
                                job.name,
                                type(exc).__name__,
                                attempt + 1,
                                LOST_TASK_RETRIES,
                            )
                            todo.appendleft((job, attempt + 1))
                        else:
                            reason = f"Ray task lost {attempt + 1} times: {type(exc).__name__}"
                            failures.append(JobFailure(job.name, "?", None, reason, False))
                        continue
                    if isinstance(out, JobFailure):
                        log.warning("%s", out.describe())
                        failures.append(out)
                        continue
                    nodes.add(out.node or "?")
                    bar.update(job.count, 0 if out.skipped else out.input_bytes)
                    accept(out)
        finally:
            for ref in running:  # stopping early (an error, too many bad samples): leave nothing behind
                ray.cancel(ref)
        if failures:
            raise failed_jobs_error(failures, len(jobs), len(todo))
        log.info("%d shard job(s) done on %d node(s)", len(jobs), len(nodes))
