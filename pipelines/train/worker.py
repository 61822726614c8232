"""The Ray Train worker: one per rank, the model library's engine driven over this rank's shards.

`train_loop_per_worker(spec)` is what `pipelines.train.driver` hands to `TorchTrainer`; the spec is plain data
(`LoopSpec`). It reads top to bottom:

    worker = join_group(spec)          this rank, its device, the run folder, the step hook (tests only)
    state = restore(worker)            model, optimizer, LR schedule, step and the epoch log, from Ray's checkpoint
    announce(worker, state)            attempts.jsonl, progress.json
    evaluate_untrained(...)            epoch 0, once per run
    per epoch: run_epoch(...)          this rank's shards in lockstep with the other ranks; mid-epoch checkpoints
               end_epoch(...)          checks, evaluation, the metrics row, best/, plan file, the epoch's checkpoint

The epoch bookkeeping (the metrics rows, best-by-val, the bad-sample budget, the train stats) is the model
library's (`ssjdn.engine.EpochLog`, `StepSums`, `check_bad_samples`), shared with `train-local`.

Lockstep: before every step the ranks sum a "still has data" flag. While any rank has data, every rank
steps; a rank that is done replays its last batch with gradient weight 0, and the DDP communication hook
averages gradients over the ranks that really had data. So uneven shard sizes neither hang the all-reduce
nor repeat or drop samples, and reports (which are barriers) happen on every rank at the same step.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipelines.errors import PipelineError
from pipelines.train.data import (
    EvalShardStream,
    Position,
    Rebatcher,
    TrainDataError,
    TrainShardStream,
    assign_shards,
    lockstep_steps,
    make_loader,
)
from pipelines.train.hooks import NoHook, StepHook, StepInfo
from pipelines.train.rundir import RunDir, checkpoint_dir_name
from pipelines.train.spec import LoopSpec, ShardRef
from ssjdn.batching import BadItem
from ssjdn.engine import EpochLog, StepSums

log = logging.getLogger("pipelines.train")

CHECKPOINT_FILE = "checkpoint.pt"
STATE_FILE = "state.json"


class FatalTrainingError(PipelineError, RuntimeError):
    """A failure that retrying from the last checkpoint cannot fix; recorded in `fatal.json`."""


# ----------------------------------------------------------------------------------------------- state


@dataclass
class Worker:
    """This rank in the worker group, fixed for the attempt."""

    spec: LoopSpec
    rank: int
    world: int
    device: torch.device
    run: RunDir
    hook: StepHook
    attempt: int = 0  # set by `announce`
    identity: dict[str, Any] = field(default_factory=dict)  # pid, node, host, device of this rank
    progress: _Progress | None = None  # rank 0's heartbeat, set by `announce`

    @property
    def leader(self) -> bool:
        return self.rank == 0


@dataclass
class TrainState:
    """What a checkpoint restores and the loop advances."""

    cfg: Any
    tokenizer: Any
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    grad_weight: _HookState  # this rank's weight in the DDP gradient average, set every step
    step: int = 0
    epochs_done: int = 0
    log: EpochLog = field(default_factory=EpochLog)
    position: dict[str, Any] | None = None  # the mid-epoch data position to continue from (used once)
    resumed_from: str | None = None
    last_checkpoint: str | None = None
    last_batch: dict | None = None  # what this rank replays once it has no data left


@dataclass
class EpochCounters:
    """This rank's counts of one epoch: what a mid-epoch checkpoint stores per rank and `end_epoch` gathers."""

    epoch: int
    shards: list[ShardRef]
    skip: list[int] = field(default_factory=list)  # stream entries to skip per loader worker (resuming)
    consumed: Position = field(default_factory=Position)
    step_in_epoch: int = 0
    sums: StepSums = field(default_factory=StepSums)
    samples: int = 0
    bad: list[BadItem] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    train_s: float = 0.0

    @classmethod
    def continued(
        cls, epoch: int, shards: list[ShardRef], position: dict[str, Any], rank: int
    ) -> EpochCounters:
        """The counts of this rank at a mid-epoch checkpoint: the epoch continues where it stopped."""
        skip = list(position["consumed"][rank])
        return cls(
            epoch,
            shards,
            skip=skip,
            consumed=Position({w: n for w, n in enumerate(skip)}),
            step_in_epoch=int(position["step_in_epoch"]),
            sums=StepSums(position["sums"][rank], int(position["steps"][rank])),
            samples=int(position["samples"][rank]),
            bad=[BadItem(**b) for b in position["bad"][rank]],
            keys=list(position["keys"][rank] or []),
        )

    def add(self, batch: dict[str, Any], stats: dict[str, float], audit_keys: bool) -> None:
        self.sums.add(stats)
        self.samples += len(batch["keys"])
        if audit_keys:
            self.keys.extend(batch["keys"])

    def position_part(self, spec: LoopSpec) -> dict[str, Any]:
        """This rank's part of a mid-epoch data position."""
        return {
            "consumed": self.consumed.as_list(max(1, spec.loader_workers)),
            "sums": dict(self.sums.sums),
            "steps": self.sums.steps,
            "samples": self.samples,
            "bad": [asdict(b) for b in self.bad],
            "keys": self.keys if spec.audit_keys else None,
        }


# ----------------------------------------------------------------------------------------------- the loop


def train_loop_per_worker(spec_dict: dict[str, Any]) -> dict[str, Any] | None:
    """Train (or continue) the run on this rank; rank 0's return value is what the driver gets from Ray."""
    spec = LoopSpec(**spec_dict)
    worker = join_group(spec)
    # A failure that a retry cannot fix was recorded by the previous attempt: stop cleanly, no training.
    fatal = worker.run.read_json("fatal.json")
    if fatal is not None:
        return {"fatal": fatal}

    state = restore(worker)
    announce(worker, state)
    if state.resumed_from is None and state.log.needs_untrained:
        evaluate_untrained(worker, state)
    for epoch in range(state.epochs_done + 1, spec.epochs + 1):
        counters = run_epoch(worker, state, epoch)
        fatal = end_epoch(worker, state, counters)
        if fatal is not None:
            return {"fatal": fatal}
    return finish(worker, state)


class _OwnInfoOnly(logging.Filter):
    """On a worker's console (forwarded to the driver's terminal): INFO lines of the project's own loggers only;
    warnings and errors of everyone. Libraries' INFO lines (botocore's "Found credentials", Ray Train's
    per-report lines - some of its modules log through `getLogger(__file__)`, outside `ray.train`, so Ray
    Train's own log level misses them) stay in the Ray session's log files."""

    OWN = ("pipelines", "ssjdn", "flows", "root")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".")[0] in self.OWN


def _quiet_library_info() -> None:
    if os.environ.get("SSJDN_LIBRARY_LOGS_ON_CONSOLE"):
        return
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
            handler.addFilter(_OwnInfoOnly())


def join_group(spec: LoopSpec) -> Worker:
    """This rank's place in the group: rank, world size, device, the run folder and the step hook."""
    import ray.train
    import ray.train.torch

    from pipelines.train.faults import armed

    ctx = ray.train.get_context()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_library_info()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return Worker(
        spec=spec,
        rank=ctx.get_world_rank(),
        world=ctx.get_world_size(),
        device=device,
        run=RunDir(spec.run_url, spec.storage_options),
        hook=armed() or NoHook(),  # test faults, read once here: never in the step loop
    )


# ----------------------------------------------------------------------------------------------- resume


def restore(w: Worker) -> TrainState:
    """Build the model, optimizer and LR schedule; load Ray's checkpoint of this run when there is one."""
    import ray.train
    import ray.train.torch

    from ssjdn.checkpoint import apply_checkpoint
    from ssjdn.config import config_from_dict
    from ssjdn.engine import build_optimizer_and_scheduler, seed_everything
    from ssjdn.model import build_model
    from ssjdn.tokenization import build_tokenizer

    spec = w.spec
    cfg = config_from_dict(spec.config, source=f"run {spec.run_url}")
    seed_everything(cfg.train.seed)
    payload, resumed_from = _load_payload(ray.train.get_checkpoint(), w.run)
    tokenizer = build_tokenizer(cfg, state=payload["tokenizer"] if payload else spec.tokenizer_state)
    model = build_model(cfg, tokenizer, pretrained=payload is None)
    cfg = model.cfg
    if payload is not None:
        apply_checkpoint(payload, model)
    if w.device.type == "cuda":
        model = model.to(w.device, memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    grad_weight = _HookState()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model.register_comm_hook(grad_weight, _weighted_allreduce_hook)

    total_steps = sum(
        lockstep_steps(assign_shards(spec.train_refs(), w.world, e, cfg.train.seed), cfg.train.batch_size)
        for e in range(1, spec.epochs + 1)
    )
    optimizer, scheduler = build_optimizer_and_scheduler(model, cfg, total_steps)
    state = TrainState(cfg, tokenizer, model, optimizer, scheduler, grad_weight, resumed_from=resumed_from)
    state.last_checkpoint = resumed_from
    if payload is not None:
        state.step, state.epochs_done = apply_checkpoint(payload, model, optimizer, scheduler)
        extra = payload.get("extra") or {}
        for f in getattr(scheduler, "lr_lambdas", []):  # --epochs may have changed since the checkpoint
            if hasattr(f, "total_steps"):
                f.total_steps = max(int(total_steps), 1)
        state.log = EpochLog.from_state(extra)
        state.position = extra.get("position")
    return state


def _load_payload(checkpoint, run: RunDir) -> tuple[dict[str, Any] | None, str | None]:
    """(checkpoint payload, its URL) of the checkpoint Ray hands this attempt, or (None, None)."""
    from ssjdn.checkpoint import load_checkpoint

    if checkpoint is None:
        return None, None
    # Read the file straight from storage: `as_directory()` shares one download folder between the processes
    # of a machine, which races when several ranks (or raylets) share /tmp.
    path = f"{checkpoint.path.rstrip('/')}/{CHECKPOINT_FILE}"
    with checkpoint.filesystem.open_input_stream(path) as f:
        payload = load_checkpoint(f.read())
    return payload, run.url_of(checkpoint.path.rstrip("/").rsplit("/", 1)[-1])


def announce(w: Worker, state: TrainState) -> None:
    """Agree on the attempt number, start the heartbeat; rank 0 records the attempt in `attempts.jsonl`."""
    import ray

    spec = w.spec
    w.identity = {
        "rank": w.rank,
        "pid": os.getpid(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "device": str(w.device),
        "attempt": len(w.run.read_jsonl("attempts.jsonl")) + 1 if w.leader else None,
    }
    workers = _gather(w.identity)
    w.attempt = workers[0].pop("attempt")  # every start of a worker group, over all jobs of this run
    for one in workers:
        one.pop("attempt", None)
    w.progress = _Progress(
        w.run,
        {"attempt": w.attempt, "epochs": spec.epochs, "world_size": w.world, "workers": workers},
        spec.progress_every,
    )
    if not w.leader:
        return
    if state.resumed_from is not None:
        # metrics.jsonl follows the checkpoint we resume from (a later epoch may be lost)
        w.run.write_jsonl("metrics.jsonl", state.log.rows)
    w.run.append_jsonl(
        "attempts.jsonl",
        {
            "attempt": w.attempt,
            "time": time.time(),
            "world_size": w.world,
            "workers": workers,
            "resumed_from": state.resumed_from,
            "epochs_done": state.epochs_done,
            "step": state.step,
            "mid_epoch": bool(state.position),
        },
    )
    log.info(
        "attempt %d on %d worker(s): %s",
        w.attempt,
        w.world,
        f"resuming after epoch {state.epochs_done}, step {state.step} from {state.resumed_from}"
        if state.resumed_from
        else "fresh start",
    )


# ----------------------------------------------------------------------------------------------- one epoch


def run_epoch(w: Worker, state: TrainState, epoch: int) -> EpochCounters:
    """Train one epoch on this rank's shards, in lockstep with the other ranks; checkpoint every
    `checkpoint_every` steps inside it. Returns this rank's counts of the epoch."""
    spec = w.spec
    counters = start_epoch(w, state, epoch)
    t0 = time.time()
    if w.leader:
        w.progress.write(phase="train", epoch=epoch, step=state.step, step_in_epoch=counters.step_in_epoch)
    for batch, replay in lockstep(w, state, epoch_batches(w, state, counters), epoch):
        batch = w.hook.before_step(StepInfo(epoch, state.step + 1, w.rank, w.attempt, replay), batch)
        stats = train_one_step(w, state, batch, epoch)
        state.step += 1
        counters.step_in_epoch += 1
        if not replay:
            counters.add(batch, stats, spec.audit_keys)
        if w.leader and counters.step_in_epoch % w.progress.every == 0:
            heartbeat(w, state, counters, stats)
        if spec.checkpoint_every and counters.step_in_epoch % spec.checkpoint_every == 0:
            checkpoint_mid_epoch(w, state, counters)
    counters.train_s = time.time() - t0
    return counters


def start_epoch(w: Worker, state: TrainState, epoch: int) -> EpochCounters:
    """This rank's shards of the epoch, and its counts so far: zero, or those of a mid-epoch checkpoint."""
    mine = assign_shards(w.spec.train_refs(), w.world, epoch, state.cfg.train.seed)[w.rank]
    position, state.position = state.position, None
    if not position or position.get("epoch") != epoch:
        return EpochCounters(epoch, mine)
    if position.get("world_size") == w.world and position.get("loader_workers") == w.spec.loader_workers:
        return EpochCounters.continued(epoch, mine, position, w.rank)  # every rank skips what it had consumed
    if w.leader:
        log.warning(
            "epoch %d: resumed with another layout (%s ranks x %s loader workers, was %s x %s): "
            "the epoch restarts from its first sample",
            epoch,
            w.world,
            w.spec.loader_workers,
            position.get("world_size"),
            position.get("loader_workers"),
        )
    return EpochCounters(epoch, mine)


def epoch_batches(w: Worker, state: TrainState, counters: EpochCounters) -> Iterator[dict]:
    """This rank's training batches of the epoch: its shards streamed, decoded in loader processes, rebatched."""
    from ssjdn.batching import collate
    from ssjdn.transforms import ImageTransform

    spec, cfg = w.spec, state.cfg
    stream = TrainShardStream(
        counters.shards,
        transform=ImageTransform.from_config(cfg.data, train=True),
        epoch=counters.epoch,
        seed=cfg.train.seed,
        rank=w.rank,
        shuffle_buffer=spec.shuffle_buffer,
        skip=counters.skip,
        storage_options=spec.storage_options,
    )
    loader = make_loader(stream, spec.loader_workers, context=spec.loader_context)
    collate_fn = partial(collate, tokenizer=state.tokenizer)
    return iter(
        Rebatcher(
            loader, cfg.train.batch_size, collate_fn, position=counters.consumed, on_bad=counters.bad.append
        )
    )


def lockstep(
    w: Worker, state: TrainState, batches: Iterator[dict], epoch: int
) -> Iterator[tuple[dict, bool]]:
    """(batch, replay) for every step of the epoch, on every rank alike: steps go on while any rank has data;
    a rank without data replays its last batch (`replay`) with gradient weight 0."""
    idle = False
    while True:
        batch = None if idle else next(batches, None)
        idle = batch is None
        active = int(_sum([0.0 if idle else 1.0], w.device)[0])
        if active == 0:
            return
        if idle:
            if state.last_batch is None:
                raise TrainDataError(f"rank {w.rank}: no usable training sample in epoch {epoch}")
            batch = state.last_batch
        else:
            state.last_batch = batch
        state.grad_weight.weight = 0.0 if idle else 1.0 / active
        yield batch, idle


def train_one_step(w: Worker, state: TrainState, batch: dict, epoch: int) -> dict[str, float]:
    """One optimizer step (`ssjdn.engine.train_step`); a NaN/inf loss is recorded as fatal and fails the group."""
    from ssjdn.engine import NonFiniteLossError, train_step

    cfg = state.cfg
    if w.device.type == "cuda":
        batch["pixels"] = batch["pixels"].contiguous(memory_format=torch.channels_last)
    try:
        return train_step(
            state.model,
            batch,
            state.optimizer,
            state.scheduler,
            amp=cfg.train.amp,
            grad_clip=cfg.optim.grad_clip,
        )
    except NonFiniteLossError as exc:
        # Only this rank knows (the others wait in the gradient all-reduce): record, then fail the group.
        message = f"epoch {epoch}, step {state.step + 1}, rank {w.rank}: {exc}"
        rec = record_fatal(w, state, "NonFiniteLoss", message, write=True)
        raise FatalTrainingError(f"{rec['error']}: {rec['message']}") from exc


def heartbeat(w: Worker, state: TrainState, counters: EpochCounters, stats: dict[str, float]) -> None:
    w.progress.write(
        phase="train",
        epoch=counters.epoch,
        step=state.step,
        step_in_epoch=counters.step_in_epoch,
        loss=round(stats.get("loss", float("nan")), 5),
    )
    log.info("epoch %d step %d: loss %.4f lr %.2e", counters.epoch, state.step, stats["loss"], stats["lr"])


# ----------------------------------------------------------------------------------------------- epoch end


def end_epoch(w: Worker, state: TrainState, counters: EpochCounters) -> dict[str, Any] | None:
    """Gather the ranks' counts and check them, evaluate, record the epoch (rank 0) and checkpoint it.

    Returns a fatal record (on every rank alike: they all see the same gathered counts, so they stop together,
    without an error that Ray would retry) when the ranks went out of sync or the epoch had too many bad samples.
    """
    from ssjdn.engine import TooManyBadSamples, check_bad_samples

    spec, epoch = w.spec, counters.epoch
    ranks = _gather(
        {
            "rank": w.rank,
            "node_id": w.identity["node_id"],
            "shards": [s.url for s in counters.shards],
            "expected": sum(s.samples for s in counters.shards),
            "samples": counters.samples,
            "steps": counters.sums.steps,
            "sums": dict(counters.sums.sums),
            "bad": [asdict(b) for b in counters.bad],
            "keys": counters.keys if spec.audit_keys else None,
            "digest": _params_digest(state.model),
        }
    )
    seen = sum(r["samples"] for r in ranks)
    bad_rows = [b for r in ranks for b in r["bad"]]
    state.log.bad_total += len(bad_rows)
    digests = {r["digest"] for r in ranks}
    if len(digests) != 1:
        msg = f"epoch {epoch}: parameters differ between ranks after the epoch: {sorted(digests)}"
        return record_fatal(w, state, "RanksOutOfSync", msg, write=w.leader)
    try:
        check_bad_samples([BadItem(**b) for b in bad_rows], seen, spec.max_bad_fraction, epoch)
    except TooManyBadSamples as exc:
        return record_fatal(w, state, "TooManyBadSamples", str(exc), write=w.leader)

    metrics, eval_s = evaluate(w, state)
    state.epochs_done = epoch
    reported: dict[str, Any] = {
        "epoch": epoch,
        "step": state.step,
        "samples": seen,
        "bad_samples": len(bad_rows),
    }
    if w.leader:
        row = record_epoch(w, state, ranks, bad_rows, metrics, counters.train_s, eval_s)
        reported.update(_flat_metrics("train", row["train"]))
        reported.update(_flat_metrics(spec.eval_split, metrics))
        reported["best_mr"] = state.log.best_mr
    save_and_report(w, state, reported, epoch_done=epoch, mid_epoch=False, position=None)
    if w.leader:  # after the checkpoint: a metrics line never describes an epoch that has none
        w.run.write_jsonl("metrics.jsonl", state.log.rows)
        w.progress.write(phase="epoch-done", epoch=epoch, step=state.step, checkpoint=state.last_checkpoint)
    return None


def record_epoch(
    w: Worker,
    state: TrainState,
    ranks: list[dict[str, Any]],
    bad_rows: list[dict[str, Any]],
    metrics: dict[str, float],
    train_s: float,
    eval_s: float,
) -> dict[str, Any]:
    """Rank 0: the epoch's metrics row, `best/` when it is the best so far, the plan file, bad_samples.jsonl."""
    spec, epoch, step = w.spec, state.epochs_done, state.step
    seen = sum(r["samples"] for r in ranks)
    row = {
        "epoch": epoch,
        "step": step,
        "train": StepSums.mean_of(StepSums(r["sums"], r["steps"]) for r in ranks),
        spec.eval_split: metrics,
        "samples": seen,
        "bad_samples": len(bad_rows),
        "train_s": round(train_s, 2),
        "eval_s": round(eval_s, 2),
        "samples_per_s": round(seen / max(train_s, 1e-9), 2),
        "world_size": w.world,
        "attempt": w.attempt,
    }
    improved = state.log.add_epoch(row)
    if improved:
        _write_best(w, state, metrics)
    w.run.write_json(
        f"plan/epoch-{epoch:04d}.json",
        {
            "epoch": epoch,
            "world_size": w.world,
            "ranks": [{k: v for k, v in r.items() if k != "sums"} for r in ranks],
        },
    )
    if bad_rows:
        w.run.write_jsonl(
            "bad_samples.jsonl",
            [*w.run.read_jsonl("bad_samples.jsonl"), *({**b, "epoch": epoch} for b in bad_rows)],
        )
    log.info(
        "epoch %d/%d: %d samples in %.1fs (%.1f/s), loss %.4f, %s mR %.2f%s, %d bad",
        epoch,
        spec.epochs,
        seen,
        train_s,
        row["samples_per_s"],
        row["train"].get("loss", float("nan")),
        spec.eval_split,
        metrics["mr"],
        " (best)" if improved else "",
        len(bad_rows),
    )
    return row


def _write_best(w: Worker, state: TrainState, metrics: dict[str, float]) -> None:
    from ssjdn.checkpoint import checkpoint_bytes

    epoch, step = state.epochs_done, state.step
    w.run.write_bytes(
        "best/checkpoint.pt",
        checkpoint_bytes(
            model=state.model,
            cfg=state.cfg,
            step=step,
            epoch=epoch,
            tokenizer=state.tokenizer,
            extra={"val_mr": state.log.best_mr, "metrics": metrics},
        ),
    )
    w.run.write_json("best/metrics.json", {"epoch": epoch, "step": step, w.spec.eval_split: metrics})


def evaluate(w: Worker, state: TrainState) -> tuple[dict[str, float] | None, float]:
    """Retrieval metrics of the eval split (rank 0; None elsewhere) and the seconds it took; every rank calls it."""
    t0 = time.time()
    if w.leader:
        w.progress.write(phase="eval", epoch=state.epochs_done + 1, step=state.step)
    metrics, bad = evaluate_sharded(state.model, state.tokenizer, state.cfg, w.spec, w.device)
    for b in bad:
        log.warning("eval: skipped %s (%s): %s", b.key, b.source, b.reason)
    return metrics, time.time() - t0


def evaluate_untrained(w: Worker, state: TrainState) -> None:
    """Epoch 0: the untrained model, so that the curve starts where training started."""
    metrics, eval_s = evaluate(w, state)
    if w.leader:
        state.log.add_untrained({w.spec.eval_split: metrics}, eval_s)
        w.run.write_jsonl("metrics.jsonl", state.log.rows)
        log.info("untrained: %s mR %.2f", w.spec.eval_split, metrics["mr"])


def finish(w: Worker, state: TrainState) -> dict[str, Any]:
    if w.leader:
        w.progress.write(
            phase="done", epoch=state.epochs_done, step=state.step, checkpoint=state.last_checkpoint
        )
    return {
        "epochs": state.epochs_done,
        "step": state.step,
        "best_mr": state.log.best_mr,
        "last_checkpoint": state.last_checkpoint,
    }


# ----------------------------------------------------------------------------------------------- checkpoints


def checkpoint_mid_epoch(w: Worker, state: TrainState, counters: EpochCounters) -> None:
    """A checkpoint inside epoch `counters.epoch`, with the data position: per rank, per loader worker, how many
    stream entries were consumed, and the epoch's counts so far."""
    mine = counters.position_part(w.spec)
    per_rank = _gather(mine)
    position = {
        "epoch": counters.epoch,
        "step_in_epoch": counters.step_in_epoch,
        "world_size": w.world,
        "loader_workers": w.spec.loader_workers,
        **{k: [p[k] for p in per_rank] for k in mine},
    }
    done = counters.epoch - 1
    metrics = {"epoch": done, "step": state.step, "mid_epoch": True}
    save_and_report(w, state, metrics, epoch_done=done, mid_epoch=True, position=position)


def save_and_report(
    w: Worker,
    state: TrainState,
    metrics: dict[str, Any],
    *,
    epoch_done: int,
    mid_epoch: bool,
    position: dict[str, Any] | None,
) -> None:
    """Checkpoint (rank 0 writes it, Ray uploads it) + metrics; every rank calls this at the same step."""
    import ray.train

    from ssjdn.checkpoint import save_checkpoint

    name = checkpoint_dir_name(epoch_done, state.step, mid_epoch)
    if not w.leader:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        state.last_checkpoint = w.run.url_of(name)
        return
    with tempfile.TemporaryDirectory(prefix="ssjdn-ckpt-") as tmp:
        extra = {
            **state.log.state(),
            "position": position,
            "attempt": w.attempt,
            "dataset": w.spec.dataset,
            "epochs": w.spec.epochs,
        }
        save_checkpoint(
            Path(tmp) / CHECKPOINT_FILE,
            model=state.model,
            cfg=state.cfg,
            optimizer=state.optimizer,
            scheduler=state.scheduler,
            step=state.step,
            epoch=epoch_done,
            tokenizer=state.tokenizer,
            extra=extra,
        )
        readable = {"epoch": epoch_done, "step": state.step, "position": position, "metrics": metrics}
        (Path(tmp) / STATE_FILE).write_text(json.dumps(readable, indent=1, default=str))
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name
        )
    state.last_checkpoint = w.run.url_of(name)


def record_fatal(w: Worker, state: TrainState, kind: str, message: str, *, write: bool) -> dict[str, Any]:
    """Record a failure that a retry cannot fix: the next attempt (if Ray retries) stops at once."""
    record = {
        "error": kind,
        "message": message,
        "rank": w.rank,
        "epoch": state.epochs_done + 1,
        "step": state.step,
        "last_checkpoint": state.last_checkpoint,
        "time": time.time(),
    }
    if write:
        w.run.write_json("fatal.json", record)
    log.error("%s: %s (last good checkpoint: %s)", kind, message, state.last_checkpoint or "none")
    return record


# ----------------------------------------------------------------------------------------------- collectives


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _world()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


def _gather(obj: Any) -> list[Any]:
    if _world()[1] == 1:
        return [obj]
    out: list[Any] = [None] * _world()[1]
    dist.all_gather_object(out, obj)
    return out


@dataclass
class _HookState:
    """Gradient weight of this rank for the current step: 1/active ranks, or 0 when replaying a batch."""

    weight: float = 1.0


def _weighted_allreduce_hook(state: _HookState, bucket):
    """DDP communication hook: sum of weight * local gradient, i.e. the mean over the ranks with data."""
    buf = bucket.buffer()
    buf.mul_(state.weight)
    fut = dist.all_reduce(buf, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


# ----------------------------------------------------------------------------------------------- helpers


def _params_digest(model) -> str:
    """Checksum of every parameter (float64 sums): equal on all ranks when DDP kept them in sync."""
    net = getattr(model, "module", model)
    with torch.no_grad():
        total = torch.zeros(2, dtype=torch.float64)
        for i, p in enumerate(net.parameters()):
            d = p.detach().double().cpu()
            total[0] += d.sum()
            total[1] += (d * (i % 7 + 1)).abs().sum()
    return f"{total[0].item():.12e}/{total[1].item():.12e}"


def _flat_metrics(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    return {f"{prefix}_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


class _Progress:
    """Rank 0's `progress.json`: a cheap heartbeat a user (or a test) can watch."""

    def __init__(self, run: RunDir, base: dict[str, Any], every: int) -> None:
        self.run, self.base, self.every = run, base, max(1, every)

    def write(self, **fields: Any) -> None:
        try:
            self.run.write_json("progress.json", {**self.base, **fields, "time": time.time()})
        except Exception as exc:  # noqa: BLE001 - a heartbeat must never stop training
            log.warning("could not write progress.json: %s", exc)


# ----------------------------------------------------------------------------------------------- evaluation


def evaluate_sharded(model, tokenizer, cfg, spec: LoopSpec, device) -> tuple[dict[str, float] | None, list]:
    """Retrieval metrics on the eval split: each rank embeds its share of the shards, rank 0 scores them.

    Images are put in key order before scoring, so the result does not depend on the number of ranks.
    Returns (metrics on rank 0 / None elsewhere, bad items of this rank).
    """
    from ssjdn.batching import BadItem
    from ssjdn.engine import embed_captions, embed_images
    from ssjdn.metrics import retrieval_metrics_from_embeddings
    from ssjdn.transforms import ImageTransform

    rank, world = _world()
    mine = [r for i, r in enumerate(spec.eval_refs()) if i % world == rank]
    stream = EvalShardStream(
        mine,
        transform=ImageTransform.from_config(cfg.data, train=False),
        storage_options=spec.storage_options,
    )
    loader = make_loader(stream, spec.loader_workers if mine else 0, context=spec.loader_context)
    bad: list[BadItem] = []
    records: list[tuple[str, list[str], int]] = []
    pending_keys: list[str] = []
    pending_pix: list[torch.Tensor] = []
    keys_all: list[str] = []
    embs: list[torch.Tensor] = []

    def flush() -> None:
        if pending_keys:
            k, e = embed_images(model, [(list(pending_keys), torch.stack(pending_pix))], amp=cfg.train.amp)
            keys_all.extend(k)
            embs.append(e)
            pending_keys.clear()
            pending_pix.clear()

    for _, entries in loader:
        for e in entries:
            if isinstance(e, BadItem):
                bad.append(e)
                continue
            key, pixels, captions, cls = e
            records.append((key, captions, -1 if cls is None else int(cls)))
            pending_keys.append(key)
            pending_pix.append(pixels)
            if len(pending_keys) >= cfg.train.eval_batch_size:
                flush()
    flush()
    captions = [c for _, caps, _ in records for c in caps]
    cap_emb = embed_captions(
        model, tokenizer, captions, batch_size=cfg.train.eval_batch_size, amp=cfg.train.amp
    )
    parts = _gather({"records": records, "img": torch.cat(embs) if embs else None, "cap": cap_emb})
    if not any(p["records"] for p in parts):  # every rank sees the gathered parts: all stop together
        raise TrainDataError(f"{spec.eval_split} split: no readable samples to evaluate on")
    if rank != 0:
        return None, bad
    entries_all = []  # (key, image embedding, its caption embeddings, class)
    for p in parts:
        offset = 0
        for i, (key, caps, cls) in enumerate(p["records"]):
            entries_all.append((key, p["img"][i], p["cap"][offset : offset + len(caps)], cls))
            offset += len(caps)
    entries_all.sort(key=lambda e: e[0])
    cap_image = torch.tensor([i for i, e in enumerate(entries_all) for _ in range(len(e[2]))])
    classes = [e[3] for e in entries_all]
    cls_t = torch.tensor(classes) if any(c >= 0 for c in classes) else None
    img = torch.stack([e[1] for e in entries_all])
    cap = torch.cat([e[2] for e in entries_all])
    metrics = retrieval_metrics_from_embeddings(img, cap, cap_image, cls_t)
    return metrics, bad
