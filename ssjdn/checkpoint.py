"""Checkpoints: one dict of tensors and plain data, written atomically, read with `torch.load(weights_only=True)`.

Contents: format, config (plain dict), model / optimizer / scheduler state dicts, step, epoch, tokenizer state
(the GRU vocabulary or the text model name) and `extra` (plain data chosen by the caller, e.g. data position).
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ssjdn.config import config_from_dict, config_to_dict

FORMAT = "ssjdn-checkpoint/1"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel


def checkpoint_payload(
    *,
    model,
    cfg=None,
    optimizer=None,
    scheduler=None,
    step: int = 0,
    epoch: int = 0,
    tokenizer=None,
    extra=None,
) -> dict[str, Any]:
    model = _unwrap(model)
    cfg = cfg if cfg is not None else model.cfg
    return {
        "format": FORMAT,
        "config": config_to_dict(cfg),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "epoch": int(epoch),
        "tokenizer": tokenizer.state_dict() if tokenizer is not None else None,
        "extra": dict(extra or {}),
    }


def save_checkpoint(dest: str | os.PathLike | BinaryIO, **parts) -> None:
    """Save a checkpoint to a path (atomically: temp file, then rename) or to a writable binary file object.

    Keyword arguments: model (required), cfg, optimizer, scheduler, step, epoch, tokenizer, extra.
    """
    payload = checkpoint_payload(**parts)
    if hasattr(dest, "write"):
        torch.save(payload, dest)
        return
    path = Path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checkpoint_bytes(**parts) -> bytes:
    buf = io.BytesIO()
    save_checkpoint(buf, **parts)
    return buf.getvalue()


def load_checkpoint(
    src: str | os.PathLike | BinaryIO | bytes, map_location: str | torch.device = "cpu"
) -> dict:
    """Read a checkpoint (path, file object or bytes) safely: `weights_only=True`, format checked."""
    if isinstance(src, (bytes, bytearray)):
        src = io.BytesIO(src)
    where = src if isinstance(src, (str, os.PathLike)) else getattr(src, "name", "<file object>")
    try:
        ckpt = torch.load(src, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {where}: cannot be read safely ({exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"checkpoint {where}: not an SSJDN checkpoint (format {FORMAT!r} expected)")
    return ckpt


def apply_checkpoint(ckpt: dict, model, optimizer=None, scheduler=None) -> tuple[int, int]:
    """Load the states of `ckpt` into existing objects; returns (step, epoch)."""
    _unwrap(model).load_state_dict(ckpt["model"])
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    return int(ckpt["step"]), int(ckpt["epoch"])


def restore_model(src, map_location: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, cfg) from a checkpoint path / file object / bytes / loaded dict."""
    from ssjdn.model import build_model
    from ssjdn.tokenization import build_tokenizer

    ckpt = src if isinstance(src, dict) else load_checkpoint(src, map_location)
    cfg = config_from_dict(ckpt["config"], source="checkpoint config")
    tokenizer = build_tokenizer(cfg, state=ckpt.get("tokenizer"))
    model = build_model(cfg, tokenizer, pretrained=False)
    model.load_state_dict(ckpt["model"])
    return model.to(map_location).eval(), tokenizer, cfg
