"""The Ray Train worker function: one per rank, the model library's engine driven over this rank's shards.

`train_loop_per_worker(spec_dict)` is what `pipelines.train` hands to `TrainTorch`; the spec is plain data
(`LoopSpec`). Per epoch: stream this rank's shards (pipelines.train_data), step in lockstep with the other
ranks, evaluate on the val shards (split over ranks, gathered on rank 0), checkpoint + report, write
metrics. Checkpoints can also be taken every `checkpoint_every` steps inside an epoch, with the data position.

Lockstep: before every step the ranks sum a "still has data" flag. While any rank has data, every rank
steps; a rank that is done replays its last batch with gradient weight 0, and the DDP communication hook
averages gradients over the ranks that really had data. So uneven shard sizes neither hang the all-reduce
nor repeat or drop samples, and reports (which are barriers) happen on every rank at the same step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

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
from pipelines.train.rundir import RunDir, checkpoint_dir_name
from pipelines.train.spec import LoopSpec

log = logging.getLogger("pipelines.train")

CHECKPOINT_FILE = "checkpoint.pt"
STATE_FILE = "state.json"
# Fault injection for the tests (read from the environment; unset in normal runs):
# a non-finite input at this global step (1-based) makes the loss NaN through the real model, and
FAULT_NAN_AT_STEP = "SSJDN_FAULT_NAN_AT_STEP"
# the worker of rank SSJDN_FAULT_KILL_RANK (default 1) SIGKILLs its own process at this step, first attempt only.
FAULT_KILL_AT_STEP = "SSJDN_FAULT_KILL_AT_STEP"
FAULT_KILL_RANK = "SSJDN_FAULT_KILL_RANK"


class FatalTrainingError(RuntimeError):
    """A failure that retrying from the last checkpoint cannot fix; recorded in `fatal.json`."""


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


def _fault_step(var: str) -> int | None:
    raw = os.environ.get(var)
    return int(raw) if raw else None


def _maybe_kill_self(step: int, rank: int, attempt: int) -> None:
    at = _fault_step(FAULT_KILL_AT_STEP)
    if at is not None and step == at and attempt == 1 and rank == int(os.environ.get(FAULT_KILL_RANK, "1")):
        import signal

        import ray.train
        from ray.train import CheckpointConsistencyMode

        # Deterministic for the test: die only once Ray has committed the checkpoints reported so far.
        ray.train.get_all_reported_checkpoints(
            consistency_mode=CheckpointConsistencyMode.COMMITTED, timeout_s=60
        )
        log.warning("fault injection: rank %d kills its own process at step %d", rank, step)
        os.kill(os.getpid(), signal.SIGKILL)


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


# ----------------------------------------------------------------------------------------------- the loop


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


def train_loop_per_worker(spec_dict: dict[str, Any]) -> dict[str, Any] | None:
    import ray.train
    import ray.train.torch

    from ssjdn.batching import BadItem, collate
    from ssjdn.checkpoint import apply_checkpoint, save_checkpoint
    from ssjdn.config import config_from_dict
    from ssjdn.engine import NonFiniteLossError, build_optimizer_and_scheduler, seed_everything, train_step
    from ssjdn.model import build_model
    from ssjdn.tokenization import build_tokenizer
    from ssjdn.transforms import ImageTransform

    spec = LoopSpec(**spec_dict)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run = RunDir(spec.run_url, spec.storage_options)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # A failure that a retry cannot fix was recorded by the previous attempt: stop cleanly, no training.
    fatal = run.read_json("fatal.json")
    if fatal is not None:
        return {"fatal": fatal}

    cfg = config_from_dict(spec.config, source=f"run {spec.run_url}")
    seed_everything(cfg.train.seed)
    device = ray.train.torch.get_device()
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.backends.cudnn.benchmark = True

    payload, resumed_from = _load_payload(ray.train.get_checkpoint(), run)
    tok_state = payload["tokenizer"] if payload else spec.tokenizer_state
    tokenizer = build_tokenizer(cfg, state=tok_state)
    model = build_model(cfg, tokenizer, pretrained=payload is None)
    cfg = model.cfg
    if payload is not None:
        apply_checkpoint(payload, model)
    if use_cuda:
        model = model.to(device, memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    hook = _HookState()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model.register_comm_hook(hook, _weighted_allreduce_hook)

    train_refs = spec.train_refs()
    batch_size = cfg.train.batch_size
    total_steps = sum(
        lockstep_steps(assign_shards(train_refs, world, e, cfg.train.seed), batch_size)
        for e in range(1, spec.epochs + 1)
    )
    optimizer, scheduler = build_optimizer_and_scheduler(model, cfg, total_steps)

    extra: dict[str, Any] = {}
    epochs_done, step = 0, 0
    if payload is not None:
        step, epochs_done = apply_checkpoint(payload, model, optimizer, scheduler)
        extra = payload.get("extra") or {}
        for f in getattr(scheduler, "lr_lambdas", []):  # --epochs may have changed since the checkpoint
            if hasattr(f, "total_steps"):
                f.total_steps = max(int(total_steps), 1)
    history: list[dict[str, Any]] = list(extra.get("history", []))
    best_mr = float(extra.get("best_mr", -math.inf))
    position = extra.get("position")
    bad_total = int(extra.get("bad_total", 0))

    me = {
        "rank": rank,
        "pid": os.getpid(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "device": str(device),
        "attempt": len(run.read_jsonl("attempts.jsonl")) + 1 if rank == 0 else None,
    }
    workers = _gather(me)
    attempt = workers[0].pop("attempt")  # every start of a worker group, over all jobs of this run
    for w in workers:
        w.pop("attempt", None)
    progress = _Progress(
        run,
        {"attempt": attempt, "epochs": spec.epochs, "world_size": world, "workers": workers},
        spec.progress_every,
    )
    if rank == 0:
        if payload is not None:  # the file follows the checkpoint we resume from (a later epoch may be lost)
            run.write_jsonl("metrics.jsonl", history)
        run.append_jsonl(
            "attempts.jsonl",
            {
                "attempt": attempt,
                "time": time.time(),
                "world_size": world,
                "workers": workers,
                "resumed_from": resumed_from,
                "epochs_done": epochs_done,
                "step": step,
                "mid_epoch": bool(position),
            },
        )
        log.info(
            "attempt %d on %d worker(s): %s",
            attempt,
            world,
            f"resuming after epoch {epochs_done}, step {step} from {resumed_from}"
            if resumed_from
            else "fresh start",
        )

    collate_fn = partial(collate, tokenizer=tokenizer)
    train_transform = ImageTransform.from_config(cfg.data, train=True)
    last_ckpt: list[str | None] = [resumed_from]

    def report(metrics: dict[str, Any], *, epoch_done: int, mid_epoch: bool, pos: dict | None) -> None:
        """Checkpoint (rank 0 writes it, Ray uploads it) + metrics; every rank calls this at the same step."""
        name = checkpoint_dir_name(epoch_done, step, mid_epoch)
        if rank != 0:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            last_ckpt[0] = run.url_of(name)
            return
        with tempfile.TemporaryDirectory(prefix="ssjdn-ckpt-") as tmp:
            state = {
                "best_mr": best_mr,
                "history": history,
                "position": pos,
                "bad_total": bad_total,
                "attempt": attempt,
                "dataset": spec.dataset,
                "epochs": spec.epochs,
            }
            save_checkpoint(
                Path(tmp) / CHECKPOINT_FILE,
                model=model,
                cfg=cfg,
                optimizer=optimizer,
                scheduler=scheduler,
                step=step,
                epoch=epoch_done,
                tokenizer=tokenizer,
                extra=state,
            )
            (Path(tmp) / STATE_FILE).write_text(
                json.dumps(
                    {"epoch": epoch_done, "step": step, "position": pos, "metrics": metrics},
                    indent=1,
                    default=str,
                )
            )
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name
            )
        last_ckpt[0] = run.url_of(name)

    def record_fatal(kind: str, message: str, *, write: bool) -> dict[str, Any]:
        """Record a failure that a retry cannot fix: the next attempt (if Ray retries) stops at once."""
        record = {
            "error": kind,
            "message": message,
            "rank": rank,
            "epoch": epochs_done + 1,
            "step": step,
            "last_checkpoint": last_ckpt[0],
            "time": time.time(),
        }
        if write:
            run.write_json("fatal.json", record)
        log.error("%s: %s (last good checkpoint: %s)", kind, message, last_ckpt[0] or "none")
        return record

    def evaluate_now() -> tuple[dict[str, float] | None, float]:
        t0 = time.time()
        if rank == 0:
            progress.write(phase="eval", epoch=epochs_done + 1, step=step)
        metrics, bad = evaluate_sharded(model, tokenizer, cfg, spec, device)
        for b in bad:
            log.warning("eval: skipped %s (%s): %s", b.key, b.source, b.reason)
        return metrics, time.time() - t0

    # Epoch 0: the untrained model, so that the curve starts where training started.
    if payload is None and not history:
        metrics0, eval_s = evaluate_now()
        if rank == 0:
            history.append({"epoch": 0, "step": 0, spec.eval_split: metrics0, "eval_s": round(eval_s, 2)})
            run.write_jsonl("metrics.jsonl", history)
            log.info("untrained: %s mR %.2f", spec.eval_split, metrics0["mr"])

    nan_at = _fault_step(FAULT_NAN_AT_STEP)
    last_batch: dict | None = None
    for epoch in range(epochs_done + 1, spec.epochs + 1):
        parts = assign_shards(train_refs, world, epoch, cfg.train.seed)
        mine = parts[rank]
        skip: list[int] = []
        sums: dict[str, float] = defaultdict(float)
        n_steps, samples, step_in_epoch = 0, 0, 0
        bad_epoch: list[BadItem] = []
        keys_seen: list[str] = []
        if position and position.get("epoch") == epoch:
            same_layout = (
                position.get("world_size") == world and position.get("loader_workers") == spec.loader_workers
            )
            if same_layout:
                # Continue this epoch: every rank skips what it had consumed at the checkpoint.
                skip = list(position["consumed"][rank])
                step_in_epoch = int(position["step_in_epoch"])
                sums.update(position["sums"][rank])
                n_steps, samples = int(position["steps"][rank]), int(position["samples"][rank])
                bad_epoch = [BadItem(**b) for b in position["bad"][rank]]
                keys_seen = list(position["keys"][rank] or [])
            elif rank == 0:
                log.warning(
                    "epoch %d: resumed with another layout (%s ranks x %s loader workers, was %s x %s): "
                    "the epoch restarts from its first sample",
                    epoch,
                    world,
                    spec.loader_workers,
                    position.get("world_size"),
                    position.get("loader_workers"),
                )
        position = None
        pos = Position({w: n for w, n in enumerate(skip)})
        stream = TrainShardStream(
            mine,
            transform=train_transform,
            epoch=epoch,
            seed=cfg.train.seed,
            rank=rank,
            shuffle_buffer=spec.shuffle_buffer,
            skip=skip,
            storage_options=spec.storage_options,
        )
        loader = make_loader(stream, spec.loader_workers, context=spec.loader_context)
        batches = iter(Rebatcher(loader, batch_size, collate_fn, position=pos, on_bad=bad_epoch.append))
        t0 = time.time()
        idle = False
        if rank == 0:
            progress.write(phase="train", epoch=epoch, step=step, step_in_epoch=step_in_epoch)
        while True:
            batch = None if idle else next(batches, None)
            idle = batch is None
            active = int(_sum([0.0 if idle else 1.0], device)[0])
            if active == 0:
                break
            if idle:
                if last_batch is None:
                    raise TrainDataError(f"rank {rank}: no usable training sample in epoch {epoch}")
                batch = last_batch
            hook.weight = 0.0 if idle else 1.0 / active
            if not idle and nan_at is not None and step + 1 == nan_at:
                batch = {**batch, "pixels": torch.full_like(batch["pixels"], float("nan"))}
            if use_cuda:
                batch["pixels"] = batch["pixels"].contiguous(memory_format=torch.channels_last)
            _maybe_kill_self(step + 1, rank, attempt)
            try:
                stats = train_step(
                    model, batch, optimizer, scheduler, amp=cfg.train.amp, grad_clip=cfg.optim.grad_clip
                )
            except NonFiniteLossError as exc:
                # Only this rank knows (the others wait in the gradient all-reduce): record, then fail the group.
                rec = record_fatal(
                    "NonFiniteLoss", f"epoch {epoch}, step {step + 1}, rank {rank}: {exc}", write=True
                )
                raise FatalTrainingError(f"{rec['error']}: {rec['message']}") from exc
            step += 1
            step_in_epoch += 1
            if not idle:
                last_batch = batch
                n_steps += 1
                samples += len(batch["keys"])
                if spec.audit_keys:
                    keys_seen.extend(batch["keys"])
                for k, v in stats.items():
                    sums[k] += v
            if rank == 0 and step_in_epoch % progress.every == 0:
                progress.write(
                    phase="train",
                    epoch=epoch,
                    step=step,
                    step_in_epoch=step_in_epoch,
                    loss=round(stats.get("loss", float("nan")), 5),
                )
                log.info("epoch %d step %d: loss %.4f lr %.2e", epoch, step, stats["loss"], stats["lr"])
            if spec.checkpoint_every and step_in_epoch % spec.checkpoint_every == 0:
                # The data position: per rank, per loader worker, how many stream entries were consumed.
                mine_pos = {
                    "consumed": pos.as_list(max(1, spec.loader_workers)),
                    "sums": dict(sums),
                    "steps": n_steps,
                    "samples": samples,
                    "bad": [asdict(b) for b in bad_epoch],
                    "keys": keys_seen if spec.audit_keys else None,
                }
                per_rank = _gather(mine_pos)
                mid = {
                    "epoch": epoch,
                    "step_in_epoch": step_in_epoch,
                    "world_size": world,
                    "loader_workers": spec.loader_workers,
                    **{k: [p[k] for p in per_rank] for k in mine_pos},
                }
                report(
                    {"epoch": epoch - 1, "step": step, "mid_epoch": True},
                    epoch_done=epoch - 1,
                    mid_epoch=True,
                    pos=mid,
                )
        train_s = time.time() - t0
        del batches, loader

        # ---- epoch end: gather, check the bad-sample budget, evaluate, checkpoint, report
        mine_stats = {
            "rank": rank,
            "node_id": me["node_id"],
            "shards": [s.url for s in mine],
            "expected": sum(s.samples for s in mine),
            "samples": samples,
            "steps": n_steps,
            "sums": dict(sums),
            "bad": [asdict(b) for b in bad_epoch],
            "keys": keys_seen if spec.audit_keys else None,
            "digest": _params_digest(model),
        }
        ranks = _gather(mine_stats)
        n_seen = sum(r["samples"] for r in ranks)
        bad_rows = [b for r in ranks for b in r["bad"]]
        bad_total += len(bad_rows)
        digests = {r["digest"] for r in ranks}
        # Both checks see the same gathered data on every rank, so all ranks stop together, without an error
        # that Ray would retry.
        if len(digests) != 1:
            msg = f"epoch {epoch}: parameters differ between ranks after the epoch: {sorted(digests)}"
            return {"fatal": record_fatal("RanksOutOfSync", msg, write=rank == 0)}
        if bad_rows and len(bad_rows) > spec.max_bad_fraction * max(n_seen + len(bad_rows), 1):
            names = "; ".join(f"{b['key']} ({b['source']}): {b['reason']}" for b in bad_rows[:5])
            msg = (
                f"epoch {epoch}: {len(bad_rows)} bad of {n_seen + len(bad_rows)} samples "
                f"(limit {spec.max_bad_fraction:.2%}): {names}"
            )
            return {"fatal": record_fatal("TooManyBadSamples", msg, write=rank == 0)}
        metrics, eval_s = evaluate_now()
        epochs_done = epoch
        steps_all = max(1.0, _sum([float(n_steps)], device)[0])
        row: dict[str, Any] = {}
        if rank == 0:
            totals = defaultdict(float)
            for r in ranks:
                for k, v in r["sums"].items():
                    totals[k] += v
            train = {k: v / steps_all for k, v in totals.items()}
            row = {
                "epoch": epoch,
                "step": step,
                "train": train,
                spec.eval_split: metrics,
                "samples": n_seen,
                "bad_samples": len(bad_rows),
                "train_s": round(train_s, 2),
                "eval_s": round(eval_s, 2),
                "samples_per_s": round(n_seen / max(train_s, 1e-9), 2),
                "world_size": world,
                "attempt": attempt,
            }
            history.append(row)
            improved = metrics["mr"] > best_mr
            if improved:
                best_mr = metrics["mr"]
                from ssjdn.checkpoint import checkpoint_bytes

                run.write_bytes(
                    "best/checkpoint.pt",
                    checkpoint_bytes(
                        model=model,
                        cfg=cfg,
                        step=step,
                        epoch=epoch,
                        tokenizer=tokenizer,
                        extra={"val_mr": best_mr, "metrics": metrics},
                    ),
                )
                run.write_json("best/metrics.json", {"epoch": epoch, "step": step, spec.eval_split: metrics})
            run.write_json(
                f"plan/epoch-{epoch:04d}.json",
                {
                    "epoch": epoch,
                    "world_size": world,
                    "ranks": [{k: v for k, v in r.items() if k != "sums"} for r in ranks],
                },
            )
            if bad_rows:
                run.write_jsonl(
                    "bad_samples.jsonl",
                    [*run.read_jsonl("bad_samples.jsonl"), *({**b, "epoch": epoch} for b in bad_rows)],
                )
            log.info(
                "epoch %d/%d: %d samples in %.1fs (%.1f/s), loss %.4f, %s mR %.2f%s, %d bad",
                epoch,
                spec.epochs,
                n_seen,
                train_s,
                row["samples_per_s"],
                train.get("loss", float("nan")),
                spec.eval_split,
                metrics["mr"],
                " (best)" if improved else "",
                len(bad_rows),
            )
        flat = {"epoch": epoch, "step": step, "samples": n_seen, "bad_samples": len(bad_rows)}
        if rank == 0:
            flat.update(_flat_metrics("train", row["train"]))
            flat.update(_flat_metrics(spec.eval_split, metrics))
            flat["best_mr"] = best_mr
        report(flat, epoch_done=epoch, mid_epoch=False, pos=None)
        if rank == 0:  # after the checkpoint: a metrics line never describes an epoch that has none
            run.write_jsonl("metrics.jsonl", history)
            progress.write(phase="epoch-done", epoch=epoch, step=step, checkpoint=last_ckpt[0])

    if rank == 0:
        progress.write(phase="done", epoch=epochs_done, step=step, checkpoint=last_ckpt[0])
    return {"epochs": epochs_done, "step": step, "best_mr": best_mr, "last_checkpoint": last_ckpt[0]}
