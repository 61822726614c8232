"""Test support: fault injection into the Ray Train worker loop, as a `StepHook` (pipelines.train.hooks).

Ray Train workers are separate processes (on other nodes, too), so a test arms the faults with one environment
variable, which reaches every worker like any `SSJDN_*` variable (the driver forwards them; for `ray job submit`
put it into the job's runtime_env):

    SSJDN_TRAIN_FAULTS='{"kill_at_step": 5}'    the worker of rank 1 SIGKILLs its own process before global step 5
                                                (first attempt only; `kill_rank` picks another rank)
    SSJDN_TRAIN_FAULTS='{"nan_at_step": 9}'     the pixels of global step 9 become NaN, so the real model's loss is
                                                NaN there

`armed()` reads the variable once, when a worker starts; the step loop only calls the hook it was given. A normal
run never sets the variable and gets no hook.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

from pipelines.train.hooks import StepInfo

log = logging.getLogger("pipelines.train")

ENV = "SSJDN_TRAIN_FAULTS"


@dataclass(frozen=True)
class Faults:
    """The faults to inject; steps are global optimizer steps, 1-based."""

    nan_at_step: int | None = None
    kill_at_step: int | None = None
    kill_rank: int = 1

    def env(self) -> dict[str, str]:
        """The environment that arms these faults in a run's processes."""
        return {ENV: json.dumps({k: v for k, v in asdict(self).items() if v is not None})}

    def before_step(self, info: StepInfo, batch: dict[str, Any]) -> dict[str, Any]:
        if info.step == self.nan_at_step and not info.replay:
            import torch

            batch = {**batch, "pixels": torch.full_like(batch["pixels"], float("nan"))}
        if info.step == self.kill_at_step and info.attempt == 1 and info.rank == self.kill_rank:
            _kill_self(info)
        return batch


def _kill_self(info: StepInfo) -> None:
    import signal

    import ray.train
    from ray.train import CheckpointConsistencyMode

    # Deterministic for the test: die only once Ray has committed the checkpoints reported so far.
    ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED, timeout_s=60)
    log.warning("fault injection: rank %d kills its own process at step %d", info.rank, info.step)
    os.kill(os.getpid(), signal.SIGKILL)


def armed() -> Faults | None:
    """The faults this process was started with (`SSJDN_TRAIN_FAULTS`), or None."""
    raw = os.environ.get(ENV)
    return Faults(**json.loads(raw)) if raw else None
