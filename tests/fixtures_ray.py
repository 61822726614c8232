"""Ray fixtures: one local Ray instance shared by the tests that need it (real raylet, real object store)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance for the whole session.

    4 logical CPUs on a 2-core machine: Train workers and Ray Data tasks otherwise starve each other
    (see ../shared/PITFALLS.md). Tests that need a different cluster shut this one down first and call
    `ray_local_restart` afterwards.
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
