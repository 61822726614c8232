"""A tiny random-weight SSJDN checkpoint and the model's direct outputs, for the embedding/query tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def dataset_captions(dataset_dir: Path) -> list[str]:
    doc = json.loads((Path(dataset_dir) / "dataset.json").read_text())
    return [s["raw"] for im in doc["images"] for s in im["sentences"]]


def make_tiny_checkpoint(
    path: Path, captions: list[str], *, seed: int = 0, overrides: dict | None = None
) -> Path:
    """Save the `tiny` config's model with random weights (GRU vocabulary from `captions`)."""
    import torch

    from ssjdn.checkpoint import save_checkpoint
    from ssjdn.config import load_config
    from ssjdn.model import build_model
    from ssjdn.tokenization import build_tokenizer

    cfg = load_config("tiny", overrides)
    tok = build_tokenizer(cfg, captions=captions)
    torch.manual_seed(seed)
    model = build_model(cfg, tok, pretrained=False)
    save_checkpoint(path, model=model, cfg=model.cfg, tokenizer=tok)
    return Path(path)


def direct_embeddings(
    checkpoint: Path, image_paths: list[Path], captions: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """What the model itself outputs for these image files and captions (no Ray, no store)."""
    import torch

    from ssjdn.checkpoint import restore_model
    from ssjdn.data.images import decode_image
    from ssjdn.transforms import ImageTransform

    model, tok, cfg = restore_model(str(checkpoint))
    tf = ImageTransform.from_config(cfg.data, train=False)
    with torch.inference_mode():
        pixels = torch.stack([tf(decode_image(Path(p).read_bytes(), str(p))) for p in image_paths])
        img = model.encode_image(pixels).numpy()
        txt = model.encode_text(tok(captions)).numpy() if captions else np.empty((0, img.shape[1]))
    return img, txt
