"""Checkpoints: one dict of tensors and plain data, written atomically, read with `torch.load(weights_only=True)`.

Contents: format, config (plain dict), model / optimizer / scheduler state dicts, step, epoch, tokenizer state
(the GRU vocabulary or the text model name) and `extra` (plain data chosen by the caller, e.g. data position).
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ssjdn.config import config_from_dict, config_to_dict
from ssjdn.data.errors import DataError

FORMAT = "ssjdn-checkpoint/1"


class CheckpointError(DataError):
    """A checkpoint cannot be used: unreadable, unsafe (objects other than tensors and plain data), not an SSJDN
    checkpoint, or made with another config than the one it is loaded into. The message is one line."""


def _unsafe_reason(exc: BaseException) -> str:
    """One line out of torch's many-line `weights_only` refusal: the global it would not load, if it says."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        # "... Unsupported global: GLOBAL io.open was not an allowed global by default. Please use ..."
        if "Unsupported global" in line:
            return "Unsupported global" + line.split("Unsupported global", 1)[1].split(" was not ")[0]
    return lines[0].rstrip(".") if lines else type(exc).__name__


def flat_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as dotted keys: {"model.embed_dim": 512, ...}."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any], limit: int = 6) -> str:
    """`key: saved -> current` for the keys that differ (at most `limit`, then a count), '' when none."""
    a, b = flat_config(saved or {}), flat_config(current or {})
    keys = sorted(k for k in a.keys() | b.keys() if k != "name" and a.get(k) != b.get(k))
    parts = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return ", ".join(parts)


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
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {where} does not exist") from exc
    except pickle.UnpicklingError as exc:  # weights_only refused something: never unpickled
        raise CheckpointError(
            f"checkpoint {where}: refused, it holds objects other than tensors and plain data "
            f"({_unsafe_reason(exc)}); only load checkpoints you trust"
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"checkpoint {where}: cannot be read ({_unsafe_reason(exc)})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {where}: not an SSJDN checkpoint (format {FORMAT!r} expected)")
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
