"""Ray fixtures: one local Ray instance shared by the tests that need it (real raylet, real object store),
and one real two-node cluster started with the `ray` CLI (for `ray job submit`, multi-node and Prefect tests)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

RAY_CLI = str(Path(sys.executable).with_name("ray"))
HEAD_STARTUP_TIMEOUT_S = float(os.environ.get("SSJDN_TEST_RAY_STARTUP_S", "120"))


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray instance for the whole session.

    4 logical CPUs on a 2-core machine: Train workers and Ray Data tasks otherwise starve each other
    (see ../shared/PITFALLS.md). Tests that need a different cluster shut this one down first and call
    `ray_local_restart` afterwards. Started after `s3_server`, so every Ray worker reaches the test S3
    endpoint with the test credentials whichever test asks for Ray first.
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("AWS_")}},
        )
    yield ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, token: str):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=3) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def _alive_nodes(dashboard: str, token: str) -> int:
    doc = _get_json(f"{dashboard}/api/v0/nodes", token)
    try:
        return sum(n["state"] == "ALIVE" for n in doc["data"]["result"]["result"])
    except (TypeError, KeyError):
        return 0


NODE_COMMON = ["--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]


def _node_ports() -> list[str]:
    return [
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
    ]


def _nodes(dashboard: str, token: str) -> list[dict]:
    doc = _get_json(f"{dashboard}/api/v0/nodes?detail=true", token)
    try:
        return doc["data"]["result"]["result"]
    except (TypeError, KeyError):
        return []


class ExtraNode:
    """One more raylet joined to `ray_head` (`ray start --address --block` in its own process group), with a
    custom resource of its own (`resource`) so tasks can be steered to it and its node id found. `kill()` is
    SIGKILL of its whole process group (a node lost); `stop()` the polite end. Never the session's nodes."""

    def __init__(
        self, head: dict, *, num_cpus: int = 2, env: dict[str, str] | None = None, log: Path
    ) -> None:
        self.resource = f"extra-{uuid.uuid4().hex[:8]}"
        cmd = [
            RAY_CLI,
            "start",
            f"--address={head['address']}",
            *NODE_COMMON,
            f"--num-cpus={num_cpus}",
            f"--resources={json.dumps({self.resource: 1})}",
            *_node_ports(),
        ]
        self.log = open(log, "wb")  # noqa: SIM115 - closed by stop()/kill()
        self.proc = subprocess.Popen(
            cmd,
            env={**head["node_env"], **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + HEAD_STARTUP_TIMEOUT_S
        self.node_id = None
        while self.node_id is None:
            for n in _nodes(head["dashboard"], head["token"]):
                if n.get("state") == "ALIVE" and self.resource in (n.get("resources_total") or {}):
                    self.node_id = n["node_id"]
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"extra ray node did not join:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)

    def kill(self) -> None:
        _signal_group(self.proc, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.log.close()

    def stop(self) -> None:
        _stop([self.proc])
        self.log.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _stop(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    """Stop the Ray processes of these `ray start --block` sessions, and nothing else (never `ray stop`: that
    would also stop other people's Ray instances on this machine). `ray start` gets SIGTERM and a short grace
    period; then its whole process group (raylet, GCS, workers: a throwaway test cluster) gets SIGKILL."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        _signal_group(p, signal.SIGKILL)
        p.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_head(s3_server):
    """A two-node Ray cluster on this machine: `ray start --head --block` plus one `ray start --address --block`.

    Token authentication is on (a token file of its own, never ~/.ray), the dashboard (job API) listens on
    127.0.0.1, every port is chosen free. Both nodes get 2 logical CPUs and the S3 test endpoint's variables
    (started after `s3_server`), like a real cluster whose nodes carry their own storage configuration.
    Yields a dict: `address` (GCS), `dashboard` (http URL for `ray job submit` / JobSubmissionClient),
    `env` (the variables a client subprocess needs: RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH) and `token`.
    """
    tmp = Path(
        tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    )  # short: Ray's unix socket paths are length-limited
    token = uuid.uuid4().hex
    token_path = tmp / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    # Test-cluster settings: no preemption on a test machine (one actor process less per worker-group start),
    # and Ray Train's controller polls its workers every 0.5 s instead of 2 s (failures and checkpoints are
    # noticed sooner; the behaviour is the same).
    env = {
        **os.environ,
        **client_env,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    }
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    dashboard = f"http://127.0.0.1:{dash}"

    node_ports = _node_ports
    common = [*NODE_COMMON, "--num-cpus=2"]
    head_cmd = [
        RAY_CLI,
        "start",
        "--head",
        f"--port={gcs}",
        f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={_free_port()}",
        f"--temp-dir={tmp / 'ray'}",
        *common,
        *node_ports(),
    ]
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        log = open(tmp / "head.log", "wb")  # noqa: SIM115 - closed in teardown
        logs.append(log)
        procs.append(
            subprocess.Popen(head_cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
        deadline = time.monotonic() + HEAD_STARTUP_TIMEOUT_S
        while _get_json(f"{dashboard}/api/version", token) is None:
            if procs[0].poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"ray head did not start:\n{(tmp / 'head.log').read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.5)
        address = f"127.0.0.1:{gcs}"
        log2 = open(tmp / "worker.log", "wb")  # noqa: SIM115
        logs.append(log2)
        def start_worker() -> subprocess.Popen:
            worker_cmd = [RAY_CLI, "start", f"--address={address}", *common, *node_ports()]
            return subprocess.Popen(
                worker_cmd, env=env, stdout=log2, stderr=subprocess.STDOUT, start_new_session=True
            )

        procs.append(start_worker())
        retried = False
        while _alive_nodes(dashboard, token) < 2:
            # On an overloaded machine `ray start` can give up on the GCS (an RPC deadline); once, try again.
            if procs[1].poll() is not None and not retried and time.monotonic() < deadline:
                retried = True
                procs[1] = start_worker()
            if procs[1].poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"second ray node did not join:\n{(tmp / 'worker.log').read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.5)
        yield {
            "address": address,
            "dashboard": dashboard,
            "env": client_env,
            "token": token,
            "tmp": tmp,
            "node_env": env,  # the environment the nodes were started with (for `join_node`)
        }
    finally:
        _stop(list(reversed(procs)))
        for f in logs:
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
