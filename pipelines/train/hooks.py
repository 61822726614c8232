"""The step hook of the worker loop: what `pipelines.train.worker` calls before every optimizer step.

A normal run has `NoHook`; the tests' fault injection (`pipelines.train.faults`) is one, armed at worker start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class StepInfo:
    """Where the loop is when it calls the step hook."""

    epoch: int
    step: int  # the global optimizer step about to run, 1-based
    rank: int
    attempt: int  # starts of the worker group over the run, 1 = the first
    replay: bool  # this rank has no data left: it replays its last batch with gradient weight 0


class StepHook(Protocol):
    """Called before every optimizer step with the batch about to be used; returns the batch to use."""

    def before_step(self, info: StepInfo, batch: dict[str, Any]) -> dict[str, Any]: ...


class NoHook:
    def before_step(self, info: StepInfo, batch: dict[str, Any]) -> dict[str, Any]:
        return batch
