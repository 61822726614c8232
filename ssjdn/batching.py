"""Batch assembly shared by local training, Ray Train workers and embedding jobs.

`collate(items, tokenizer)` with items = (pixels [3, H, W], caption str, class_index int or -1/None, key str)
returns {"pixels": [B, 3, H, W], "tokens": {input_ids, attention_mask} [B, L], "labels": [B] long (-1 =
unlabelled), "key_ids": [B] long (equal ids <=> same image key), "keys": list[str], "captions": list[str]}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

Item = tuple[torch.Tensor, str, "int | None", str]


@dataclass(frozen=True)
class BadItem:
    """Stands in for a sample whose image could not be read; `make_collate_fn` drops it and reports it."""

    key: str
    source: str
    reason: str


def collate(items: Sequence[Item], tokenizer: Callable[[list[str]], dict[str, torch.Tensor]]) -> dict:
    if not items:
        raise ValueError("cannot collate an empty batch")
    pixels, captions, labels, keys = zip(*items)
    first: dict[str, int] = {}
    key_ids = [first.setdefault(k, len(first)) for k in keys]
    return {
        "pixels": torch.stack(list(pixels)),
        "tokens": tokenizer(list(captions)),
        "labels": torch.tensor([-1 if c is None else int(c) for c in labels], dtype=torch.long),
        "key_ids": torch.tensor(key_ids, dtype=torch.long),
        "keys": list(keys),
        "captions": list(captions),
    }


def make_collate_fn(tokenizer) -> Callable[[Sequence[Item | BadItem]], dict]:
    """A picklable collate function (for DataLoader workers) that drops `BadItem`s and lists them under "bad".

    A batch made only of bad items is {"bad": [...]} (no "pixels").
    """
    return partial(_collate_skip_bad, tokenizer=tokenizer)


def _collate_skip_bad(items, tokenizer):
    bad = [it for it in items if isinstance(it, BadItem)]
    kept = [it for it in items if not isinstance(it, BadItem)]
    batch = collate(kept, tokenizer) if kept else {}
    batch["bad"] = bad
    return batch


def move_to_device(batch: dict, device: torch.device | str) -> dict:
    """Tensors (and tensors inside `tokens`) to `device`; lists of strings stay where they are."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, dict):
            out[k] = {kk: vv.to(device, non_blocking=True) for kk, vv in v.items()}
        else:
            out[k] = v
    return out
