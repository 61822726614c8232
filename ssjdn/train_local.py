"""Single-process training for debugging and small machines: readers -> DataLoader -> engine -> metrics/checkpoints.

`train_local(cfg, data, out_dir, ...)` writes to `out_dir`:
  config.yaml      the resolved config (class count filled in)
  metrics.jsonl    one line per epoch (epoch 0 = the untrained model): train loss parts, val/test metrics
  best.pt          checkpoint with the best val mR (test metrics are reported, never used for selection)
  last.pt          checkpoint after the last finished epoch, with the epoch log (`resume=True` continues from it)
  bad_samples.jsonl images that could not be read or decoded (skipped, with the reason)
  summary.json     untrained vs best test metrics, timings

The epoch bookkeeping (the metrics rows, best-by-val, the bad-sample budget, the train stats) is
`ssjdn.engine`'s `EpochLog`, `check_bad_samples` and `StepSums`, the same as in every Ray Train worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ssjdn.batching import BadItem, make_collate_fn
from ssjdn.checkpoint import CheckpointError, config_differences
from ssjdn.config import ConfigError, SSJDNConfig, apply_overrides, config_to_dict
from ssjdn.data.errors import DataError
from ssjdn.engine import (
    EpochLog,
    EvalSet,
    StepSums,
    apply_checkpoint,
    build_optimizer_and_scheduler,
    check_bad_samples,
    evaluate,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    train_step,
)
from ssjdn.model import build_model
from ssjdn.tokenization import build_tokenizer
from ssjdn.transforms import ImageTransform

log = logging.getLogger(__name__)


def load_pixels(sample, transform: ImageTransform) -> torch.Tensor:
    from ssjdn.data.images import decode_image, read_image_bytes

    data = sample.image if sample.image is not None else read_image_bytes(sample.source)
    return transform(decode_image(data, sample.filename or sample.source))


class CaptionedImages(Dataset):
    """One item per image per epoch: (pixels, one of its captions at random, class index or -1, key)."""

    def __init__(self, samples: list, transform: ImageTransform) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        try:
            pixels = load_pixels(s, self.transform)
        except (OSError, ValueError) as exc:  # ImageDecodeError is a ValueError; missing files are OSError
            return BadItem(s.key, s.source, str(exc))
        caption = s.captions[int(torch.randint(len(s.captions), ()).item())]
        return pixels, caption, -1 if s.class_index is None else int(s.class_index), s.key


def _eval_records(samples: list, transform: ImageTransform, bad: list[BadItem]) -> Iterator:
    for s in samples:
        try:
            pixels = load_pixels(s, transform)
        except (OSError, ValueError) as exc:
            bad.append(BadItem(s.key, s.source, str(exc)))
            continue
        yield s.key, pixels, s.captions, s.class_index


def build_eval_set(samples: list, cfg: SSJDNConfig, bad: list[BadItem]) -> EvalSet | None:
    if not samples:
        return None
    transform = ImageTransform.from_config(cfg.data, train=False)
    return EvalSet.from_records(_eval_records(samples, transform, bad), batch_size=cfg.train.eval_batch_size)


def _with_class_count(cfg: SSJDNConfig, classes: list[str]) -> SSJDNConfig:
    if not cfg.model.lsd:
        return cfg
    if len(classes) < 2:
        raise ConfigError(
            f"model.lsd needs scene labels, but the dataset has {len(classes)} classes: "
            "add labels.csv or train with model.lsd=false"
        )
    have = cfg.model.lsd_cfg.num_classes
    if have and have != len(classes):
        raise ConfigError(
            f"config has model.lsd_cfg.num_classes={have} but the dataset has {len(classes)} classes"
        )
    return apply_overrides(cfg, {"model.lsd_cfg.num_classes": len(classes)})


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def _resume_errors(path: Path, ckpt: dict | None, cfg: SSJDNConfig) -> Iterator[None]:
    """A checkpoint that does not fit the config (size mismatch, missing keys, another tokenizer) as one line
    that names the checkpoint and the config keys that differ."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        if ckpt is None:
            raise
        diff = config_differences(ckpt.get("config") or {}, config_to_dict(cfg))
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        saved = (ckpt.get("config") or {}).get("name", "?")
        made = f"config {saved!r}, not {cfg.name!r}" if saved != cfg.name else f"another {saved!r} config"
        raise CheckpointError(
            f"cannot resume from {path}: it was made with {made}"
            + (f"; differing keys: {diff}" if diff else f" ({first})")
            + "; use another --out or the config it was trained with"
        ) from exc


def train_local(
    cfg: SSJDNConfig,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    epochs: int | None = None,
    device: str = "auto",
    resume: bool = False,
    max_steps_per_epoch: int | None = None,
    dataset_format: str | None = None,
    images: str | os.PathLike | None = None,
    progress: bool = True,
    max_bad_fraction: float | None = None,
) -> dict[str, Any]:
    """Train `cfg` on the dataset at `data` (any format the readers know) and evaluate every epoch.

    `max_bad_fraction`: stop (TooManyBadSamples) when more of an epoch's train images are unreadable; None: no
    limit (they are skipped and listed)."""
    import yaml
    from tqdm import tqdm

    from ssjdn.data.readers import load_dataset

    t_start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if epochs is not None:
        cfg = apply_overrides(cfg, {"train.epochs": epochs})
    seed_everything(cfg.train.seed)
    dev = _pick_device(device)

    ds = load_dataset(data, format=dataset_format, images=images)
    train_samples = ds.by_split("train")
    if not train_samples:
        raise DataError(f"dataset {ds.root} has no train split samples")
    cfg = _with_class_count(cfg, ds.classes)
    log.info("dataset %s: %s, %d classes", ds.name, ds.split_counts(), len(ds.classes))

    bad: list[BadItem] = []
    val_set = build_eval_set(ds.by_split("val"), cfg, bad)
    test_set = build_eval_set(ds.by_split("test"), cfg, bad)
    if val_set is None:
        log.warning("no val split: the best checkpoint is selected on the test split")

    ckpt = None
    last = out / "last.pt"
    if resume and last.exists():
        ckpt = load_checkpoint(last)
        with _resume_errors(last, ckpt, cfg):
            tokenizer = build_tokenizer(cfg, state=ckpt["tokenizer"])
    else:
        tokenizer = build_tokenizer(cfg, captions=[c for s in train_samples for c in s.captions])
    with _resume_errors(last, ckpt, cfg):
        model = build_model(cfg, tokenizer, pretrained=ckpt is None).to(dev)
    cfg = model.cfg  # resolved text model name
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    generator = torch.Generator().manual_seed(cfg.train.seed)
    loader = DataLoader(
        CaptionedImages(train_samples, ImageTransform.from_config(cfg.data, train=True)),
        batch_size=cfg.train.batch_size,
        shuffle=True,
        drop_last=len(train_samples) > cfg.train.batch_size,  # full batches: in-batch negatives
        num_workers=cfg.train.num_workers,
        collate_fn=make_collate_fn(tokenizer),
        generator=generator,
        persistent_workers=cfg.train.num_workers > 0,
    )
    steps_per_epoch = min(len(loader), max_steps_per_epoch or len(loader))
    total_steps = steps_per_epoch * cfg.train.epochs
    optimizer, scheduler = build_optimizer_and_scheduler(model, cfg, total_steps)

    metrics_path = out / "metrics.jsonl"
    start_epoch, step, history = 1, 0, EpochLog()
    if ckpt is not None:
        with _resume_errors(last, ckpt, cfg):
            step, done = apply_checkpoint(ckpt, model, optimizer, scheduler)
        start_epoch = done + 1
        history = EpochLog.from_state(ckpt["extra"])
        if not history.rows:  # a last.pt from before the log was kept in it: the rows are in metrics.jsonl
            history.rows = [r for r in _read_jsonl(metrics_path) if r.get("epoch", 0) <= done]
        log.info("resumed from %s: epoch %d, step %d", out / "last.pt", done, step)

    def run_eval() -> dict[str, Any]:
        res = {}
        for name, es in (("val", val_set), ("test", test_set)):
            if es is not None:
                res[name] = evaluate(
                    model, tokenizer, es, batch_size=cfg.train.eval_batch_size, amp=cfg.train.amp
                )
        return res

    summary: dict[str, Any] = {"config": cfg.name, "data": str(ds.root), "device": str(dev)}
    if ckpt is None and history.needs_untrained:
        t0 = time.time()
        res = run_eval()
        history.add_untrained(res, time.time() - t0)
        _write_jsonl_atomic(metrics_path, history.rows)
        summary["untrained"] = res
        log.info(
            "untrained: val mR %.2f, test mR %.2f",
            *(res.get(k, {}).get("mr", float("nan")) for k in ("val", "test")),
        )

    for epoch in range(start_epoch, cfg.train.epochs + 1):
        t0 = time.time()
        sums = StepSums()
        bad_epoch: list[BadItem] = []
        seen = 0
        bar = tqdm(
            total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.train.epochs}", disable=not progress, leave=False
        )
        for i, batch in enumerate(loader):
            if i >= steps_per_epoch:
                break
            for b in batch.pop("bad", []):
                bad_epoch.append(b)
                log.warning("skipped unreadable image %s (%s): %s", b.key, b.source, b.reason)
            if batch.get("pixels") is None or len(batch["keys"]) < 2:
                continue
            stats = train_step(
                model, batch, optimizer, scheduler, amp=cfg.train.amp, grad_clip=cfg.optim.grad_clip
            )
            step += 1
            seen += len(batch["keys"])
            sums.add(stats)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}")
            if step % cfg.train.log_every == 0:
                log.info("epoch %d step %d: %s", epoch, step, {k: round(v, 4) for k, v in stats.items()})
        bar.close()
        train_s = time.time() - t0
        bad.extend(bad_epoch)
        history.bad_total += len(bad_epoch)
        check_bad_samples(bad_epoch, seen, max_bad_fraction, epoch)
        t1 = time.time()
        res = run_eval()
        row = {
            "epoch": epoch,
            "step": step,
            "train": StepSums.mean_of([sums]),
            **res,
            "train_s": round(train_s, 2),
            "eval_s": round(time.time() - t1, 2),
        }
        improved = history.add_epoch(row)
        if improved:
            mr = history.best_mr
            save_checkpoint(
                out / "best.pt",
                model=model,
                step=step,
                epoch=epoch,
                tokenizer=tokenizer,
                extra={"val_mr": mr, "best_mr": mr},
            )
            summary["best"] = {"epoch": epoch, **res}
        save_checkpoint(
            out / "last.pt",
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            step=step,
            epoch=epoch,
            tokenizer=tokenizer,
            extra=history.state(),
        )
        _write_jsonl_atomic(metrics_path, history.rows)  # after last.pt: a line never outlives its checkpoint
        log.info(
            "epoch %d: loss %.4f, val mR %.2f, test mR %.2f (%.0fs train, %.0fs eval)%s",
            epoch,
            row["train"].get("loss", float("nan")),
            res.get("val", {}).get("mr", float("nan")),
            res.get("test", {}).get("mr", float("nan")),
            train_s,
            row["eval_s"],
            " *best*" if improved else "",
        )

    if bad:
        with (out / "bad_samples.jsonl").open("w") as f:
            for b in bad:
                f.write(json.dumps({"key": b.key, "source": b.source, "reason": b.reason}) + "\n")
        log.warning("%d unreadable images skipped; listed in %s", len(bad), out / "bad_samples.jsonl")
    summary.update({"bad_samples": len(bad), "wall_s": round(time.time() - t_start, 1), "out": str(out)})
    _write_json_atomic(out / "summary.json", summary)
    log.info(
        "done in %.0fs: metrics %s, best checkpoint %s", summary["wall_s"], metrics_path, out / "best.pt"
    )
    return summary
