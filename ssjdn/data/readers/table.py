"""A generic layout for users' own archives: a CSV / JSONL / Parquet table beside a folder of images.

Columns are found by name (case-insensitive; see docs/data-formats.md):
image (`image`, `image_path`, `filepath`, `filename`, `file`, `path`, `url`, `image_url`): a name relative to the
image root or a URL (s3://, gs://, http(s)://); captions: a list column (`captions`, `sentences`; a JSON list
string in CSV) and/or one or more text columns (`caption`, `caption_1`, `caption2`, `text`, `sentence`...);
optional `split` (default train), label (`label`, `class`, `class_name`, `category`, `scene`), `lat`/`latitude`,
`lon`/`lng`/`longitude`, `bbox` (4 numbers), `crs`. Other columns go to `Sample.extra`.
Rows naming the same image are merged (one row per caption is fine) when their other fields agree.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any

from ssjdn.data.errors import DatasetFormatError
from ssjdn.data.readers.common import RawRecord, is_url, read_lines, read_text

IMAGE_COLUMNS = ("image", "image_path", "filepath", "file_path", "filename", "file", "path", "url", "image_url")
LIST_CAPTION_COLUMNS = ("captions", "sentences")
TEXT_CAPTION = re.compile(r"(caption|sentence|text)[_ ]?\d*")
LABEL_COLUMNS = ("label", "class", "class_name", "category", "scene")
LAT_COLUMNS = ("lat", "latitude")
LON_COLUMNS = ("lon", "lng", "long", "longitude")
_MERGE_FIELDS = ("split", "class_name", "lat", "lon", "bbox", "crs")


def read_table(path: Path) -> list[RawRecord]:
    rows = _read_rows(path)
    if not rows:
        raise DatasetFormatError(f"{path}: the table has no rows")
    columns = {c.lower(): c for row in rows[:1] for c in row[1]}
    for _, row in rows[1:]:
        for c in row:
            columns.setdefault(c.lower(), c)
    image_col = _find(columns, IMAGE_COLUMNS)
    list_cols = [columns[c] for c in LIST_CAPTION_COLUMNS if c in columns]
    text_cols = [orig for low, orig in columns.items() if TEXT_CAPTION.fullmatch(low)]
    if image_col is None or not (list_cols or text_cols):
        raise DatasetFormatError(
            f"{path}: needs an image column (one of {', '.join(IMAGE_COLUMNS)}) and a caption column "
            f"({', '.join(LIST_CAPTION_COLUMNS)}, caption, caption_1, text, ...); found {sorted(columns.values())}"
        )
    label_col, split_col = _find(columns, LABEL_COLUMNS), _find(columns, ("split",))
    lat_col, lon_col = _find(columns, LAT_COLUMNS), _find(columns, LON_COLUMNS)
    bbox_col, crs_col = _find(columns, ("bbox",)), _find(columns, ("crs",))
    used = {image_col, label_col, split_col, lat_col, lon_col, bbox_col, crs_col, *list_cols, *text_cols}

    by_name: dict[str, RawRecord] = {}
    records: list[RawRecord] = []
    for where, row in rows:
        image = row.get(image_col)
        if not isinstance(image, str) or not image.strip():
            raise DatasetFormatError(f"{path}: {where}: empty or missing image in column {image_col!r}")
        image = image.strip()
        captions = []
        for c in list_cols:
            captions += _caption_list(path, where, c, row.get(c))
        for c in text_cols:
            value = row.get(c)
            if not _missing(value):
                captions.append(value if isinstance(value, str) else str(value))
        source = None
        if is_url(image):
            if image.lower().startswith("file:"):
                raise DatasetFormatError(f"{path}: {where}: file:// URL {image!r} escapes the image root")
            source = image
            image = image.split("://", 1)[1]
        rec = RawRecord(
            file=str(path),
            where=where,
            filename=image,
            split=_text(row.get(split_col)) or "train",
            captions=captions,
            caption_where=[where] * len(captions),
            source=source,
            class_name=_text(row.get(label_col)),
            lat=_number(path, where, lat_col, row.get(lat_col)),
            lon=_number(path, where, lon_col, row.get(lon_col)),
            bbox=_bbox(path, where, row.get(bbox_col)),
            crs=_text(row.get(crs_col)),
            extra={k: _plain(v) for k, v in row.items() if k not in used and not _missing(v)},
        )
        first = by_name.get(image)
        if first is None:
            by_name[image] = rec
            records.append(rec)
            continue
        for f in _MERGE_FIELDS:
            if getattr(first, f) != getattr(rec, f) and getattr(rec, f) is not None:
                raise DatasetFormatError(
                    f"{path}: {where}: image {image!r} listed again with {f} {getattr(rec, f)!r}, "
                    f"but {first.where} gives {getattr(first, f)!r}"
                )
        first.captions += rec.captions
        first.caption_where += rec.caption_where
    return records


def _read_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
        rows = []
        for row in reader:
            if None in row:
                raise DatasetFormatError(f"{path}: line {reader.line_num}: more cells than header columns")
            rows.append((f"line {reader.line_num}", row))
        return rows
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(read_lines(path), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetFormatError(f"{path}: malformed JSON at line {i}, column {exc.colno}: {exc.msg}") from None
            if not isinstance(row, dict):
                raise DatasetFormatError(f"{path}: line {i}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"line {i}", row))
        return rows
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise DatasetFormatError(f"{path}: unreadable Parquet file: {exc}") from None
        return [(f"row {i}", row) for i, row in enumerate(table.to_pylist())]
    raise DatasetFormatError(f"{path}: unsupported table type {suffix!r}; expected .csv, .jsonl or .parquet")


def _find(columns: dict[str, str], names: tuple[str, ...]) -> str | None:
    return next((columns[n] for n in names if n in columns), None)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(value: Any) -> str | None:
    if _missing(value):
        return None
    return str(value).strip() or None


def _caption_list(path: Path, where: str, col: str, value: Any) -> list[str]:
    if _missing(value):
        return []
    if isinstance(value, str):
        if not value.lstrip().startswith("["):
            return [value]
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"{path}: {where}: column {col!r} is not a JSON list: {exc.msg}") from None
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise DatasetFormatError(f"{path}: {where}: column {col!r} must be a list of strings")
    return list(value)


def _number(path: Path, where: str, col: str | None, value: Any) -> float | None:
    if _missing(value) or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DatasetFormatError(f"{path}: {where}: column {col!r} value {value!r} is not a number") from None


def _bbox(path: Path, where: str, value: Any) -> tuple[float, float, float, float] | None:
    if _missing(value) or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = [v for v in re.split(r"[,\s]+", value.strip()) if v]
    try:
        box = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        box = ()
    if len(box) != 4:
        raise DatasetFormatError(f"{path}: {where}: bbox {value!r} is not 4 numbers (min_x, min_y, max_x, max_y)")
    return box  # type: ignore[return-value]


def _plain(value: Any) -> Any:
    """Keep `extra` JSON-serialisable (Parquet may hand back dates, bytes, numpy scalars)."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)
