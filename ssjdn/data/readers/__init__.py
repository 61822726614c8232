"""Dataset readers with format detection: Karpathy JSON, the "precomp" text layout, and generic tables
(CSV / JSONL / Parquet beside a folder of images). See docs/data-formats.md.

`load_dataset(path)` returns a `Dataset` of `Sample`s (metadata only: no image is opened here).
"""

from __future__ import annotations

import os
from pathlib import Path

from ssjdn.data.errors import DatasetFormatError, NoDatasetDescriptionError
from ssjdn.data.readers.base import BadRecord, Dataset
from ssjdn.data.readers.common import LABELS_FILE, build_dataset, default_image_root, read_labels_file

FORMATS = ("karpathy", "precomp", "precomp:verify", "table")
TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")

__all__ = ["FORMATS", "BadRecord", "Dataset", "detect_format", "load_dataset"]


def load_dataset(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    images: str | os.PathLike | None = None,
    name: str | None = None,
) -> Dataset:
    """Read a dataset's captions, splits and labels.

    `path` is a dataset folder or its description file (a Karpathy `.json`, a `.csv` / `.jsonl` / `.parquet`
    table). `format` overrides detection (one of `FORMATS`). `images` is the image folder (default:
    `DATASET/images` if it exists, else `DATASET`). `name` overrides the dataset name used in sample keys.
    """
    path = Path(os.path.abspath(path))
    if not path.exists():
        raise FileNotFoundError(f"dataset path {path} does not exist")
    fmt, desc = detect_format(path) if format is None else (format, _description_file(path, format))
    root = path if path.is_dir() else path.parent
    image_root = default_image_root(root, images)
    labels_path = root / LABELS_FILE
    labels = read_labels_file(labels_path) if labels_path.exists() else None

    if fmt == "karpathy":
        from ssjdn.data.readers.karpathy import read_karpathy

        file_name, records = read_karpathy(desc)
        ds_name = name or file_name or root.name
        prefix = True
    elif fmt in ("precomp", "precomp:verify"):
        from ssjdn.data.readers.precomp import read_precomp

        records = read_precomp(root, "_verify" if fmt == "precomp:verify" else "")
        # `rsitmd_precomp` -> `rsitmd`, so keys match those from the same data's Karpathy file.
        ds_name = name or root.name.removesuffix("_precomp")
        prefix = True
    elif fmt == "table":
        from ssjdn.data.readers.table import read_table

        records = read_table(desc)
        ds_name = name or root.name
        prefix = False  # users' own file names carry no class convention; use a label column or labels.csv
    else:
        raise DatasetFormatError(f"{path}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return build_dataset(
        records,
        name=ds_name,
        format=fmt,
        root=root,
        image_root=image_root,
        labels=labels,
        prefix_labels=prefix,
    )


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
