"""The tile destination's layout: the names a reader or writer of chip shards needs, defined once.

DEST/chips/{scene_key}/shard-000000.tar   committed shards: the chips of one scene each
DEST/_scenes/{scene_key}.png / .json      a small overview of each scene and its record, for maps
The rest (`_manifest.json`, `_stats/`, `_quarantine/report.jsonl`, `_tmp/`) is `pipelines.shard.layout`'s.
"""

from __future__ import annotations

SPLIT = "chips"  # the manifest's one split: chips are not train/val/test samples
CHIPS = "chips"
SCENES = "_scenes"
SHARD_NAME = "shard-{:06d}.tar"
OVERVIEW_SIDE = 512  # pixels a side of a scene's overview PNG


def chip_key(scene_key: str, row: int, col: int) -> str:
    """A chip's sample key: no dots (webdataset splits member names at the first one)."""
    return f"{scene_key}__r{row}_c{col}"


def shard_path(scene_key: str, index: int) -> str:
    return f"{CHIPS}/{scene_key}/{SHARD_NAME.format(index)}"


def scene_of_shard(path: str) -> str | None:
    """The scene key of a committed shard path (`chips/{scene_key}/shard-N.tar`); None for any other path."""
    parts = path.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == CHIPS and parts[2].endswith(".tar") else None
