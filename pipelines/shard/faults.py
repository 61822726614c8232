"""Test support: fault injection into shard jobs, armed by one environment variable.

Ray tasks run in processes on other nodes, so a test arms the faults with a variable that reaches every worker
like any `SSJDN_*` variable (the Ray distributor forwards them through `pipelines.ray_env.worker_env`):

    SSJDN_SHARD_FAULTS='{"job_delay_s": 0.5}'         every job sleeps this long before it writes (kill tests)
    SSJDN_SHARD_FAULTS='{"started_dir": "/tmp/x"}'    every job first drops a marker file `<node>--<shard>` there
    SSJDN_SHARD_FAULTS='{"unreachable": "img_3"}'     reading any source whose URL holds this text fails as a
                                                      refused connection (a node that cannot reach a source)

A normal run never sets the variable; each check is one dictionary lookup.
"""

from __future__ import annotations

import json
import os
import time

ENV = "SSJDN_SHARD_FAULTS"


def _armed() -> dict:
    raw = os.environ.get(ENV)
    return json.loads(raw) if raw else {}


def before_job(name: str, node: str) -> None:
    faults = _armed()
    if not faults:
        return
    if faults.get("started_dir"):
        marker = os.path.join(faults["started_dir"], f"{node}--{name.replace('/', '_')}")
        with open(marker, "w"):
            pass
    if faults.get("job_delay_s"):
        time.sleep(float(faults["job_delay_s"]))


def before_read(source: str) -> None:
    needle = _armed().get("unreachable") if ENV in os.environ else None
    if needle and needle in source:
        raise ConnectionRefusedError(f"[fault injection] connection refused reading {source}")
