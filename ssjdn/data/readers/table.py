"""A generic layout for users' own archives: a CSV / JSONL / Parquet table beside a folder of images.

Columns are found by name (case-insensitive; see docs/data-formats.md):
image (`image`, `image_path`, `filepath`, `filename`, `file`, `path`, `url`, `image_url`): a name relative to the
image root or a URL (s3://, gs://, http(s)://); captions: a list column (`captions`, `sentences`; a JSON list
string in CSV) and/or one or more text columns (`caption`, `caption_1`, `caption2`, `text`, `sentence`...);
optional `split` (default train), label (`label`, `class`, `class_name`, `category`, `scene`), `lat`/`latitude`,
`lon`/`lng`/`longitude`, `bbox` (4 numbers), `crs`. Other columns go to `Sample.extra`.
Rows naming the same image are merged (one row per caption is fine) when their other fields agree.
Rows are read one at a time (a JSONL file twice: once for its column names).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ssjdn.data.errors import DatasetFormatError
from ssjdn.data.readers.common import RawRecord, is_url, open_text, strict_utf8

IMAGE_COLUMNS = ("image", "image_path", "filepath", "file_path", "filename", "file", "path", "url", "image_url")
LIST_CAPTION_COLUMNS = ("captions", "sentences")
TEXT_CAPTION = re.compile(r"(caption|sentence|text)[_ ]?\d*")
LABEL_COLUMNS = ("label", "class", "class_name", "category", "scene")
LAT_COLUMNS = ("lat", "latitude")
LON_COLUMNS = ("lon", "lng", "long", "longitude")
_MERGE_FIELDS = ("split", "class_name", "lat", "lon", "bbox", "crs")


def iter_table(path: Path) -> Iterator[RawRecord]:
    """The raw records of a table, row by row (rows naming the same image are merged later, by the dataset
    index, with `merge_repeat`). Column roles come from the union of the table's column names."""
    columns = _columns(path)
    if not columns:
        raise DatasetFormatError(f"{path}: the table has no rows")
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

    n_rows = 0
    for where, row in _iter_rows(path):
        n_rows += 1
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
        if is_url(image):  # a URL that reads local files (file:, local:) is checked by the dataset index
            source = image
            image = image.split("://", 1)[1]
        yield RawRecord(
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
    if not n_rows:
        raise DatasetFormatError(f"{path}: the table has no rows")


def merge_repeat(first: RawRecord, rec: RawRecord) -> None:
    """Fold a later row naming the same image into the first (one row per caption is fine) when the other
    fields agree; a conflicting field is an error naming both rows."""
    for f in _MERGE_FIELDS:
        if getattr(first, f) != getattr(rec, f) and getattr(rec, f) is not None:
            raise DatasetFormatError(
                f"{rec.file}: {rec.where}: image {rec.filename!r} listed again with {f} {getattr(rec, f)!r}, "
                f"but {first.where} gives {getattr(first, f)!r}"
            )
    first.captions += rec.captions
    first.caption_where += rec.caption_where


def _columns(path: Path) -> dict[str, str]:
    """{lower-case name: name as written} of every column (JSONL: the union over all rows, first seen first)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open_text(path) as f:
            header = next(strict_utf8(path, csv.reader(f)), None)
        return {c.lower(): c for c in header or []}
    if suffix == ".parquet":
        return {c.lower(): c for c in _parquet(path).schema_arrow.names}
    columns: dict[str, str] = {}
    for _, row in _iter_rows(path):
        for c in row:
            columns.setdefault(c.lower(), c)
    return columns


def _iter_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open_text(path) as f:
            reader = csv.DictReader(f)
            for row in strict_utf8(path, reader):
                if None in row:
                    raise DatasetFormatError(f"{path}: line {reader.line_num}: more cells than header columns")
                yield f"line {reader.line_num}", row
    elif suffix == ".jsonl":
        with open_text(path) as f:
            for i, line in enumerate(strict_utf8(path, f), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetFormatError(
                        f"{path}: malformed JSON at line {i}, column {exc.colno}: {exc.msg}"
                    ) from None
                if not isinstance(row, dict):
                    raise DatasetFormatError(f"{path}: line {i}: expected a JSON object, got {type(row).__name__}")
                yield f"line {i}", row
    elif suffix == ".parquet":
        import pyarrow as pa

        i = 0
        try:
            for batch in _parquet(path).iter_batches(batch_size=4096):
                for row in batch.to_pylist():
                    yield f"row {i}", row
                    i += 1
        except (pa.ArrowException, OSError) as exc:
            raise DatasetFormatError(f"{path}: unreadable Parquet file: {exc}") from None
    else:
        raise DatasetFormatError(f"{path}: unsupported table type {suffix!r}; expected .csv, .jsonl or .parquet")


def _parquet(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetFormatError(f"{path}: unreadable Parquet file: {exc}") from None


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
