"""Single-process training/evaluation engine: what `train-local` and each Ray Train worker call.

- `seed_everything(seed)`
- `build_optimizer_and_scheduler(model, cfg, total_steps) -> (optimizer, scheduler)` (per-step LR schedule)
- `train_step(model, batch, optimizer, scheduler, *, amp, grad_clip) -> dict[str, float]`
- `EvalSet` + `evaluate(model, tokenizer, eval_set, ...) -> metrics dict`; `embed_images`, `embed_captions`
- checkpoints: `save_checkpoint`, `load_checkpoint`, `apply_checkpoint`, `restore_model` (see ssjdn.checkpoint)
- epoch bookkeeping shared by `train-local` and every Ray Train worker: `StepSums` (an epoch's train stats),
  `EpochLog` (the metrics rows, epoch 0 = untrained, the best-by-val mR, bad samples over the run; goes into
  every checkpoint) and `check_bad_samples` (the bad-sample budget of an epoch)
Works with a plain module or a DistributedDataParallel wrapper.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ssjdn.batching import BadItem, move_to_device
from ssjdn.checkpoint import apply_checkpoint, load_checkpoint, restore_model, save_checkpoint
from ssjdn.data.errors import DataError
from ssjdn.metrics import retrieval_metrics_from_embeddings

__all__ = [
    "EpochLog",
    "EvalSet",
    "NonFiniteLossError",
    "StepSums",
    "TooManyBadSamples",
    "apply_checkpoint",
    "build_optimizer_and_scheduler",
    "check_bad_samples",
    "embed_captions",
    "embed_images",
    "evaluate",
    "load_checkpoint",
    "restore_model",
    "save_checkpoint",
    "seed_everything",
    "selection_mr",
    "train_step",
]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; raised before the optimizer step so the last checkpoint stays good."""


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when `amp`; a no-op elsewhere (CPU bf16 is slower than fp32 on most CPUs)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class LRSchedule:
    """Multiplier of the base LR per optimizer step: linear warmup, then cosine to 0, step decay or constant.

    A plain object (not a lambda) so `LambdaLR.state_dict()` stores its numbers and reloads with weights_only.
    """

    def __init__(self, kind: str, total_steps: int, warmup_steps: int, step_size: int, gamma: float) -> None:
        self.kind, self.total_steps, self.warmup_steps = kind, max(int(total_steps), 1), int(warmup_steps)
        self.step_size, self.gamma = max(int(step_size), 1), float(gamma)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
            return 0.5 * (1 + math.cos(math.pi * progress))
        if self.kind == "step":
            return self.gamma ** ((step - self.warmup_steps) // self.step_size)
        return 1.0


def build_optimizer_and_scheduler(model: torch.nn.Module, cfg, total_steps: int):
    """Adam(W) with three LR groups (image backbone, pretrained text transformer, the rest) and an LR schedule.

    `total_steps` = optimizer steps of the whole run; the step schedule decays every `optim.step_epochs` epochs
    (converted with total_steps / train.epochs).
    """
    o = cfg.optim
    net = _unwrap(model)
    backbone = {id(p) for p in net.image.backbone.parameters()}
    text_tf = set()
    if hasattr(net.text, "bert") and cfg.model.text.pretrained:
        text_tf = {id(p) for p in net.text.bert.parameters()}
    groups: dict[str, list] = {"backbone": [], "text": [], "head": []}
    for p in net.parameters():
        if not p.requires_grad:
            continue
        groups["backbone" if id(p) in backbone else "text" if id(p) in text_tf else "head"].append(p)
    scales = {"backbone": o.backbone_lr_scale, "text": o.text_lr_scale, "head": 1.0}
    param_groups = [
        {"params": ps, "lr": o.lr * scales[name], "name": name} for name, ps in groups.items() if ps
    ]
    opt_cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    optimizer = opt_cls(param_groups, lr=o.lr, weight_decay=o.weight_decay)
    warmup = o.warmup_steps or int(round(o.warmup_fraction * total_steps))
    steps_per_epoch = max(total_steps // max(cfg.train.epochs, 1), 1)
    schedule = LRSchedule(o.schedule, total_steps, warmup, o.step_epochs * steps_per_epoch, o.step_gamma)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def train_step(
    model: torch.nn.Module,
    batch: dict,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    *,
    amp: bool = False,
    grad_clip: float | None = None,
) -> dict[str, float]:
    """One optimisation step. Returns the loss parts as floats plus `lr` and `grad_norm`.

    Raises NonFiniteLossError (before touching the weights) when the loss is NaN or infinite.
    """
    model.train()
    device = _device(model)
    batch = move_to_device(batch, device)
    with autocast(device, amp):
        out = model(batch)
    loss = out["loss"]
    if not torch.isfinite(loss.detach()):
        parts = {k: float(v.detach()) for k, v in out.items()}
        raise NonFiniteLossError(
            f"non-finite loss {float(loss.detach())} (parts {parts}); keys {batch.get('keys', [])[:4]}..."
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if grad_clip:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(
            torch.stack([p.grad.detach().norm() for p in params if p.grad is not None])
        )
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    stats = {k: float(v.detach()) for k, v in out.items()}
    stats["grad_norm"] = float(grad_norm)
    stats["lr"] = float(optimizer.param_groups[-1]["lr"])
    return stats


@dataclass
class EvalSet:
    """Evaluation input that a Ray worker can also build from shards.

    image_batches: (keys, pixels [b, 3, H, W]) batches; image index = position in this stream.
    captions: (caption text, image index) pairs.
    image_classes: one class index per image (-1 = unlabelled), or None.
    """

    image_batches: Sequence[tuple[list[str], torch.Tensor]]
    captions: list[tuple[str, int]]
    image_classes: list[int] | None = None

    @classmethod
    def from_records(
        cls, records: Iterable[tuple[str, torch.Tensor, Sequence[str], int | None]], batch_size: int = 64
    ) -> EvalSet:
        """From (key, pixels [3, H, W], captions, class_index or None) records, e.g. decoded val shards."""
        batches, captions, classes = [], [], []
        keys, pix = [], []
        for i, (key, pixels, caps, class_index) in enumerate(records):
            keys.append(key)
            pix.append(pixels)
            captions.extend((c, i) for c in caps)
            classes.append(-1 if class_index is None else int(class_index))
            if len(keys) == batch_size:
                batches.append((keys, torch.stack(pix)))
                keys, pix = [], []
        if keys:
            batches.append((keys, torch.stack(pix)))
        return cls(batches, captions, classes if any(c >= 0 for c in classes) else None)


@torch.inference_mode()
def embed_images(model, image_batches: Iterable[tuple[list[str], torch.Tensor]], *, amp: bool = False):
    """(keys, embeddings [N, D] float32 on CPU) for a stream of (keys, pixels) batches."""
    net = _unwrap(model).eval()
    device = _device(net)
    keys, embs = [], []
    for batch_keys, pixels in image_batches:
        with autocast(device, amp):
            embs.append(net.encode_image(pixels.to(device, non_blocking=True)).float().cpu())
        keys.extend(batch_keys)
    return keys, torch.cat(embs) if embs else torch.empty(0, 0)


@torch.inference_mode()
def embed_captions(model, tokenizer, captions: Sequence[str], *, batch_size: int = 256, amp: bool = False):
    """Embeddings [M, D] float32 on CPU for a list of caption strings."""
    net = _unwrap(model).eval()
    device = _device(net)
    embs = []
    for start in range(0, len(captions), batch_size):
        tokens = {k: v.to(device) for k, v in tokenizer(list(captions[start : start + batch_size])).items()}
        with autocast(device, amp):
            embs.append(net.encode_text(tokens).float().cpu())
    return torch.cat(embs) if embs else torch.empty(0, 0)


def evaluate(
    model,
    tokenizer,
    eval_set: EvalSet,
    *,
    batch_size: int = 256,
    amp: bool = False,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Embed the eval set and compute `ssjdn.metrics` retrieval metrics (plus class-level recall when known)."""
    was_training = _unwrap(model).training
    _, img = embed_images(model, eval_set.image_batches, amp=amp)
    txt = embed_captions(model, tokenizer, [c for c, _ in eval_set.captions], batch_size=batch_size, amp=amp)
    caption_image = torch.tensor([i for _, i in eval_set.captions], dtype=torch.long)
    classes = eval_set.image_classes
    metrics = retrieval_metrics_from_embeddings(
        img, txt, caption_image, torch.tensor(classes) if classes is not None else None, ks
    )
    _unwrap(model).train(was_training)
    return metrics


# ----------------------------------------------------------------------------------------------- epoch bookkeeping


class TooManyBadSamples(DataError):
    """More samples of an epoch were unreadable than the run allows; the message names the first ones."""


def check_bad_samples(bad: Sequence[BadItem], seen: int, max_fraction: float | None, epoch: int) -> None:
    """The bad-sample budget: raise TooManyBadSamples when the `bad` samples of `epoch` are more than
    `max_fraction` of all its samples (`seen` good + bad). `max_fraction=None`: no limit."""
    if max_fraction is None or not bad:
        return
    total = seen + len(bad)
    if len(bad) > max_fraction * max(total, 1):
        names = "; ".join(f"{b.key} ({b.source}): {b.reason}" for b in bad[:5])
        raise TooManyBadSamples(
            f"epoch {epoch}: {len(bad)} bad of {total} samples (limit {max_fraction:.2%}): {names}"
        )


class StepSums:
    """Running sums of `train_step`'s stats over an epoch (of one process); `mean_of` makes the epoch's row."""

    def __init__(self, sums: dict[str, float] | None = None, steps: int = 0) -> None:
        self.sums: dict[str, float] = defaultdict(float, sums or {})
        self.steps = int(steps)

    def add(self, stats: dict[str, float]) -> None:
        self.steps += 1
        for k, v in stats.items():
            self.sums[k] += v

    @staticmethod
    def mean_of(parts: Iterable[StepSums]) -> dict[str, float]:
        """Per stat: the sum over `parts` (e.g. one per rank, in rank order) / all their steps together."""
        parts = list(parts)
        totals: dict[str, float] = defaultdict(float)
        for part in parts:
            for k, v in part.sums.items():
                totals[k] += v
        steps = max(sum(part.steps for part in parts), 1)
        return {k: v / steps for k, v in totals.items()}


def selection_mr(row: dict[str, Any]) -> float:
    """The number that picks the best epoch: val mR, else test mR (when there is no val split)."""
    return row.get("val", row.get("test", {})).get("mr", -math.inf)


@dataclass
class EpochLog:
    """What a run has recorded so far, one row per epoch (epoch 0: the untrained model), the best selection mR
    (`selection_mr`) and the bad samples counted over the run. `state()` goes into every checkpoint and
    `from_state` reads it back, so a resumed run continues the same record."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    best_mr: float = -math.inf
    bad_total: int = 0

    @classmethod
    def from_state(cls, extra: dict[str, Any] | None) -> EpochLog:
        extra = extra or {}
        return cls(
            list(extra.get("history", [])),
            float(extra.get("best_mr", -math.inf)),
            int(extra.get("bad_total", 0)),
        )

    def state(self) -> dict[str, Any]:
        return {"best_mr": self.best_mr, "history": self.rows, "bad_total": self.bad_total}

    @property
    def needs_untrained(self) -> bool:
        """Nothing recorded yet: evaluate the untrained model first, so the curve starts where training did."""
        return not self.rows

    def add_untrained(self, results: dict[str, dict[str, float]], eval_s: float) -> dict[str, Any]:
        """Record epoch 0 from {split: metrics}."""
        row = {"epoch": 0, "step": 0, **results, "eval_s": round(eval_s, 2)}
        self.rows.append(row)
        return row

    def add_epoch(self, row: dict[str, Any]) -> bool:
        """Record a trained epoch's row; True when it is the best so far (its checkpoint becomes the best)."""
        self.rows.append(row)
        mr = selection_mr(row)
        if mr > self.best_mr:
            self.best_mr = mr
            return True
        return False
