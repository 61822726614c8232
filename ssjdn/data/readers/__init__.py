"""Dataset readers with format detection: Karpathy JSON, the "precomp" text layout, and generic tables
(CSV / JSONL / Parquet beside a folder of images). See docs/data-formats.md.

`load_dataset(path)` returns a `Dataset` of `Sample`s (metadata only: no image is opened here);
`SampleIndex(open_dataset(path), path=FILE)` checks the same records into an SQLite file instead, for datasets
too large to hold in memory (sharding an archive).
"""

from __future__ import annotations

import os
from pathlib import Path

from ssjdn.data.errors import DatasetFormatError, NoDatasetDescriptionError
from ssjdn.data.paths import allowed_roots
from ssjdn.data.readers.base import BadRecord, Dataset
from ssjdn.data.readers.common import LABELS_FILE, default_image_root
from ssjdn.data.readers.index import DatasetSource, SampleIndex

FORMATS = ("karpathy", "precomp", "precomp:verify", "table")
TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")

__all__ = [
    "FORMATS", "BadRecord", "Dataset", "DatasetSource", "SampleIndex", "detect_format", "load_dataset", "open_dataset",
]  # fmt: skip


def load_dataset(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    images: str | os.PathLike | None = None,
    name: str | None = None,
    allow_roots: tuple[str | os.PathLike, ...] = (),
) -> Dataset:
    """Read a dataset's captions, splits and labels into memory.

    `path` is a dataset folder or its description file (a Karpathy `.json`, a `.csv` / `.jsonl` / `.parquet`
    table). `format` overrides detection (one of `FORMATS`). `images` is the image folder (default:
    `DATASET/images` if it exists, else `DATASET`). `name` overrides the dataset name used in sample keys.
    `allow_roots`: folders outside the dataset that absolute names, `..` names and `file:`/`local:` URLs may
    point into (by default only the dataset root and the image root are allowed).
    Datasets too large for memory: `SampleIndex(open_dataset(...), path=FILE)` streams them instead.
    """
    index = SampleIndex(open_dataset(path, format=format, images=images, name=name, allow_roots=allow_roots))
    try:
        return index.dataset()
    finally:
        index.close()


def open_dataset(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    images: str | os.PathLike | None = None,
    name: str | None = None,
    allow_roots: tuple[str | os.PathLike, ...] = (),
) -> DatasetSource:
    """Find a dataset's format and description file (arguments as `load_dataset`); reads no record yet."""
    path = Path(os.path.abspath(path))
    allowed = allowed_roots(*allow_roots)
    if not path.exists():
        raise FileNotFoundError(f"dataset path {path} does not exist")
    fmt, desc = detect_format(path) if format is None else (format, _description_file(path, format))
    root = path if path.is_dir() else path.parent
    image_root = default_image_root(root, images)
    labels = root / LABELS_FILE if (root / LABELS_FILE).exists() else None

    def source(records, dataset_name, **kw) -> DatasetSource:
        return DatasetSource(fmt, root, image_root, records, dataset_name, labels, allow_roots=allowed, **kw)

    if fmt == "karpathy":
        from ssjdn.data.readers.karpathy import dataset_name, iter_karpathy

        fields: dict = {}  # the file's top-level fields; its "dataset" name may come after the images
        return source(
            lambda: iter_karpathy(desc, fields), lambda: name or dataset_name(fields) or root.name, prefix_labels=True
        )
    if fmt in ("precomp", "precomp:verify"):
        from ssjdn.data.readers.precomp import iter_precomp

        variant = "_verify" if fmt == "precomp:verify" else ""
        # `rsitmd_precomp` -> `rsitmd`, so keys match those from the same data's Karpathy file.
        return source(
            lambda: iter_precomp(root, variant), lambda: name or root.name.removesuffix("_precomp"), prefix_labels=True
        )
    if fmt == "table":
        from ssjdn.data.readers.table import iter_table, merge_repeat

        # users' own file names carry no class convention; use a label column or labels.csv
        return source(lambda: iter_table(desc), lambda: name or root.name, merge_repeat=merge_repeat)
    raise DatasetFormatError(f"{path}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def detect_format(path: Path) -> tuple[str, Path]:
    """(format, description file) for a dataset folder or file; ambiguity is an error asking for --format."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "karpathy", path
        if path.suffix.lower() in TABLE_SUFFIXES:
            return "table", path
        if path.name.endswith("_caps.txt") or path.name.endswith("_filename.txt"):
            return "precomp", path.parent
        raise DatasetFormatError(f"{path}: cannot tell the dataset format from this file; pass --format")
    candidates: list[tuple[str, Path]] = [("karpathy", p) for p in _karpathy_files(path)]
    if any(path.glob("*_caps.txt")):
        candidates.append(("precomp", path))
    candidates += [("table", p) for p in _table_files(path)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise NoDatasetDescriptionError(
            f"{path}: no dataset description found (a Karpathy dataset*.json, precomp *_caps.txt files, or a "
            f"{'/'.join(TABLE_SUFFIXES)} table)"
        )
    listed = ", ".join(f"{fmt} ({p.name})" for fmt, p in candidates)
    raise DatasetFormatError(
        f"{path}: several dataset descriptions found: {listed}; pass the file itself or --format"
    )


def _description_file(path: Path, fmt: str) -> Path:
    if path.is_file() or fmt.startswith("precomp"):
        return path
    found = _karpathy_files(path) if fmt == "karpathy" else _table_files(path) if fmt == "table" else []
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
        raise DatasetFormatError(f"{path}: {what} {fmt} description files; pass the file itself")
    return found[0]


def _karpathy_files(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*.json") if p.name.lower().startswith("dataset"))


def _table_files(root: Path) -> list[Path]:
    return sorted(
        p for p in root.iterdir() if p.suffix.lower() in TABLE_SUFFIXES and p.name != LABELS_FILE and p.is_file()
    )
