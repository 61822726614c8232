"""Checkpoint -> encoders, shared by the embedding job (inside Ray actors) and the query command.

The store version of a checkpoint is the sha256 of its bytes (`model_id`), so the same file always maps to
the same version and any other file (retrained, fine-tuned, edited) to a new one.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.errors import PipelineError
from pipelines.fsio import full_url, get_fs, with_retries

log = logging.getLogger(__name__)


class CheckpointError(PipelineError, ValueError):
    """The checkpoint cannot be used: unreadable, not an SSJDN checkpoint, or its config does not fit its weights."""


@dataclass
class CheckpointBlob:
    url: str
    data: bytes
    model_id: str


# In a folder, where its checkpoint is, best first: a Ray checkpoint folder or `best/` (checkpoint.pt), a Ray
# run folder (best/checkpoint.pt), a train-local run folder (best.pt); then the newest Ray checkpoint, last.pt.
FOLDER_CHECKPOINTS = ("checkpoint.pt", "best/checkpoint.pt", "best.pt")


def resolve_checkpoint(fs, path: str) -> str:
    """The checkpoint file a path names: the file itself, or the checkpoint of a run or checkpoint folder."""
    try:
        is_dir = fs.isdir(path)
    except OSError:
        is_dir = False
    if not is_dir:
        return path
    base = path.rstrip("/")
    for name in FOLDER_CHECKPOINTS:
        if fs.isfile(f"{base}/{name}"):
            return f"{base}/{name}"
    try:
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False))
    except OSError:
        names = []
    for name in reversed([n for n in names if n.startswith("checkpoint-e")]):
        if fs.isfile(f"{base}/{name}/checkpoint.pt"):
            return f"{base}/{name}/checkpoint.pt"
    if fs.isfile(f"{base}/last.pt"):
        return f"{base}/last.pt"
    raise CheckpointError(
        f"checkpoint folder {full_url(fs, base)} holds no checkpoint (looked for "
        f"{', '.join(FOLDER_CHECKPOINTS)}, checkpoint-e*/checkpoint.pt, last.pt)"
    )


def read_checkpoint(url: str, storage_options: dict[str, Any] | None = None) -> CheckpointBlob:
    """The checkpoint's bytes (any fsspec URL) and their sha256, the store's `model_id`.

    `url` may be the `.pt` file, a checkpoint folder (`checkpoint-e0001-s0000032/`, `best/`) or a run folder
    (Ray Train's or train-local's): see `resolve_checkpoint`."""
    fs, path = get_fs(url, storage_options)
    resolved = resolve_checkpoint(fs, path)
    if resolved != path:
        log.info("checkpoint %s: using %s", full_url(fs, path), full_url(fs, resolved))
    path = resolved
    where = full_url(fs, path)

    def read() -> bytes:
        with fs.open(path, "rb") as f:
            return f.read()

    try:
        data = with_retries(read, what=f"read checkpoint {where}")
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {where} does not exist") from exc
    return CheckpointBlob(url=where, data=data, model_id=hashlib.sha256(data).hexdigest())


@dataclass
class Encoders:
    model: Any  # ssjdn.model.SSJDN in eval mode
    tokenizer: Any
    cfg: Any
    device: str

    @property
    def dim(self) -> int:
        return int(self.cfg.model.embed_dim)

    def transform(self):
        from ssjdn.transforms import ImageTransform

        return ImageTransform.from_config(self.cfg.data, train=False)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """[B, 3, H, W] preprocessed pixels -> [B, D] float32, L2-normalised."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device)
            return self.model.encode_image(x).float().cpu().numpy()

    def encode_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """Captions -> [N, D] float32, L2-normalised."""
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                tokens = self.tokenizer(texts[i : i + batch_size])
                tokens = {k: v.to(self.device) for k, v in tokens.items()}
                out.append(self.model.encode_text(tokens).float().cpu().numpy())
        return np.concatenate(out) if out else np.empty((0, self.dim), np.float32)

    def model_info(self, blob: CheckpointBlob, dtype: str) -> dict[str, Any]:
        """What the store's manifest records about the model."""
        return {
            "checkpoint": blob.url,
            "config": getattr(self.cfg, "name", None),
            "dim": self.dim,
            "dtype": dtype,
            "image_size": int(self.cfg.data.image_size),
            "text": {"kind": self.cfg.model.text.kind, "name": self.cfg.model.text.name},
        }


def restore_encoders(blob: CheckpointBlob, device: str = "cpu") -> Encoders:
    """Build the model of a checkpoint and load its weights, with clear errors for every way this fails."""
    from ssjdn.checkpoint import load_checkpoint, restore_model

    try:
        ckpt = load_checkpoint(blob.data, map_location="cpu")
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {blob.url}: {exc}") from exc
    try:
        model, tokenizer, cfg = restore_model(ckpt, map_location=device)
    except RuntimeError as exc:  # load_state_dict: missing/unexpected keys, size mismatches
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:4] if line.strip())
        name = (ckpt.get("config") or {}).get("name", "?")
        raise CheckpointError(
            f"checkpoint {blob.url}: its config ({name!r}, embed_dim="
            f"{(ckpt.get('config') or {}).get('model', {}).get('embed_dim', '?')}) does not match its weights: "
            f"{detail or exc}"
        ) from exc
    except (
        ValueError,
        KeyError,
        TypeError,
        OSError,
    ) as exc:  # invalid config, unknown keys, missing text model
        raise CheckpointError(f"checkpoint {blob.url}: cannot rebuild its model: {exc}") from exc
    return Encoders(model=model, tokenizer=tokenizer, cfg=cfg, device=device)
