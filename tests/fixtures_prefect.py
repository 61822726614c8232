"""Prefect server fixture (a real `prefect server start` on 127.0.0.1), shared by flow and deployment tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

# A cold start on a busy 2-core machine (SQLite migrations, services) can take well over 30 s; see PITFALLS.
STARTUP_TIMEOUT_S = float(os.environ.get("SSJDN_TEST_PREFECT_STARTUP_S", "180"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def stop_process_group(proc: subprocess.Popen) -> None:
    """Stop the server and anything it spawned (its own process group), politely first."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def flush_run_logs(timeout: float = 10) -> None:
    """Send the flow/task-run logs this process has queued to the API now (they are batched every few s)."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout)


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect API server for the whole session, with its own PREFECT_HOME and SQLite database.

    Sets `PREFECT_API_URL` in `os.environ` (so subprocesses - `prefect deploy`, workers - use it) and in
    Prefect's settings context for this process. Yields a dict with `api_url`, `home` and `env` (the variables
    a subprocess needs). Stops the server (and its process group) at the end of the session.
    """
    home = Path(tempfile.mkdtemp(prefix="ssjdn-prefect-"))
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
    }
    server_env = {**os.environ, **env}
    server_env.pop("PREFECT_API_KEY", None)
    log_path = home / "server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=server_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: teardown stops the server's children too
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not _healthy(api_url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process_group(proc)
            tail = log_path.read_text(errors="replace")[-3000:]
            pytest.fail(f"prefect server on {api_url} did not become healthy (rc={proc.returncode}):\n{tail}")
        time.sleep(0.5)

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: env[k] for k in ("PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED")})
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield {"api_url": api_url, "home": home, "env": env, "log": log_path}
            flush_run_logs()  # while the server is still up: otherwise exit stalls retrying a dead API
    finally:
        stop_process_group(proc)
        shutil.rmtree(home, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
