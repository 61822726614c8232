"""Plain data of a training run, shared by the driver and the workers; importing it is cheap (no torch, no Ray).

`ShardRef` is one committed shard and its sample count; `LoopSpec` is everything a Ray Train worker needs
(it travels to every rank as a plain dict).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ShardRef:
    """One committed shard: its URL and sample count (from the manifest)."""

    url: str
    samples: int


def shard_refs(manifest: dict[str, Any], shards_url: str, split: str, storage_options=None) -> list[ShardRef]:
    """The committed shards of `split` with their sample counts, in manifest order."""
    from pipelines.shard.read import list_shards

    urls = list_shards(shards_url, split, storage_options, manifest=manifest)
    entries = [s for s in manifest["shards"] if s["split"] == split]
    return [ShardRef(u, int(e["samples"])) for u, e in zip(urls, entries, strict=True)]


@dataclass
class LoopSpec:
    """What every rank needs, as plain data (see pipelines.train.worker)."""

    config: dict[str, Any]
    run_url: str
    train_shards: list[tuple[str, int]]
    eval_shards: list[tuple[str, int]]
    eval_split: str
    epochs: int
    dataset: dict[str, Any]
    tokenizer_state: dict[str, Any] | None = None
    loader_workers: int = 1
    shuffle_buffer: int = 1000
    max_bad_fraction: float = 0.01
    checkpoint_every: int = 0
    progress_every: int = 20
    audit_keys: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)
    loader_context: str | None = None

    def train_refs(self) -> list[ShardRef]:
        return [ShardRef(u, n) for u, n in self.train_shards]

    def eval_refs(self) -> list[ShardRef]:
        return [ShardRef(u, n) for u, n in self.eval_shards]
