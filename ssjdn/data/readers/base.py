"""The `Dataset` a reader returns, and the quarantine entries it carries for records it refused."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ssjdn.data.paths import allowed_roots
from ssjdn.data.record import SPLITS, Sample


@dataclass(frozen=True)
class BadRecord:
    """A record the reader refused to pass on (quarantined), with where it came from and why.

    `sample` is set when the whole sample was dropped (it keeps the file name and source so a caller can still
    report or check the image); `captions_dropped` counts captions removed from it or from a kept sample.
    """

    file: str
    where: str
    filename: str | None
    reason: str
    split: str | None = None
    captions_dropped: int = 0
    sample: Sample | None = None

    @property
    def message(self) -> str:
        name = f" ({self.filename})" if self.filename else ""
        return f"{self.file}: {self.where}{name}: {self.reason}"


@dataclass
class Dataset:
    """A dataset's metadata: one `Sample` per usable image (no image bytes read) plus the quarantined records."""

    name: str
    format: str
    root: Path
    image_root: Path
    classes: list[str]
    samples: list[Sample]
    quarantine: list[BadRecord] = field(default_factory=list)
    allow_roots: tuple[str, ...] = ()  # more folders its images may come from (`--allow-root`)

    @property
    def roots(self) -> tuple[str, ...]:
        """Where its images may lie on the local file system: the dataset root, the image root, `allow_roots`."""
        return allowed_roots(self.root, self.image_root, *self.allow_roots)

    def by_split(self, split: str) -> list[Sample]:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        return [s for s in self.samples if s.split == split]

    def split_counts(self) -> dict[str, int]:
        counts = Counter(s.split for s in self.samples)
        return {s: counts[s] for s in SPLITS if counts[s]}

    @property
    def dropped_samples(self) -> list[Sample]:
        """Samples listed by the dataset but quarantined as a whole (e.g. every caption empty)."""
        return [b.sample for b in self.quarantine if b.sample is not None]

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, format={self.format!r}, samples={len(self.samples)}, "
            f"classes={len(self.classes)}, quarantined={len(self.quarantine)}, root='{self.root}')"
        )
