"""The one sample record that flows through the whole pipeline (readers -> shards -> training -> embeddings)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

SPLITS = ("train", "val", "test")

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(dataset: str, filename: str) -> str:
    """Stable, unique, dot-free WebDataset key from the dataset name and the image's relative file name.

    Dots are forbidden because WebDataset treats everything after the first dot as the member extension.
    """
    stem = filename.rsplit(".", 1)[0] if "." in filename.rsplit("/", 1)[-1] else filename
    return f"{_KEY_UNSAFE.sub('_', dataset)}__{_KEY_UNSAFE.sub('_', stem)}".strip("_")


@dataclass
class Sample:
    """One image with its captions.

    `image` holds the encoded bytes when they are already in memory (a shard, a test); otherwise the image is
    read from `source` (a local path or any fsspec URL) on demand. Nothing here decodes pixels.
    """

    key: str
    captions: list[str]
    split: str
    source: str
    image: bytes | None = None
    class_name: str | None = None
    class_index: int | None = None
    filename: str | None = None  # name relative to the dataset's image root
    lat: float | None = None
    lon: float | None = None
    bbox: tuple[float, float, float, float] | None = None  # (min_x, min_y, max_x, max_y) in `crs`
    crs: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"sample {self.key!r} ({self.source}): split {self.split!r} is not one of {SPLITS}")
        if "." in self.key:
            raise ValueError(f"sample key {self.key!r} contains a dot; WebDataset keys must not")

    @property
    def labelled(self) -> bool:
        return self.class_index is not None

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable metadata (everything but the image bytes)."""
        out = asdict(self)
        out.pop("image")
        if out["bbox"] is not None:
            out["bbox"] = list(out["bbox"])
        return out
