"""Karpathy-style JSON (RSICD `dataset_rsicd.json`, RSITMD `dataset_RSITMD.json`, UCM/Sydney `dataset.json`):
`{"dataset": NAME, "images": [{"filename", "split", "sentences": [{"raw", "tokens"}, ...]}, ...]}`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ssjdn.data.errors import DatasetFormatError
from ssjdn.data.readers.common import RawRecord, read_text


def parse_json(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(
            f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None


def read_karpathy(path: Path) -> tuple[str | None, list[RawRecord]]:
    """Parse a Karpathy JSON file into (dataset name from its "dataset" field or None, raw records)."""
    data = parse_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetFormatError(f"{path}: not a Karpathy caption file: expected an object with an 'images' list")
    name = data.get("dataset") if isinstance(data.get("dataset"), str) and data["dataset"].strip() else None
    records = []
    for i, img in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(img, dict):
            raise DatasetFormatError(f"{path}: {where}: expected an object, got {type(img).__name__}")
        filename = img.get("filename")
        if isinstance(img.get("filepath"), str) and img["filepath"] and isinstance(filename, str):
            filename = f"{img['filepath']}/{filename}"  # COCO-style Karpathy files split the path
        split = img.get("split")
        if not isinstance(split, str):
            raise DatasetFormatError(f"{path}: {where} ({filename}): missing 'split'")
        sentences = img.get("sentences", [])
        if not isinstance(sentences, list):
            raise DatasetFormatError(f"{path}: {where} ({filename}): 'sentences' must be a list")
        captions, caption_where = [], []
        for j, sent in enumerate(sentences):
            captions.append(_caption(path, where, filename, j, sent))
            caption_where.append(f"sentences[{j}]")
        extra = {k: img[k] for k in ("imgid", "cocoid") if k in img}
        records.append(
            RawRecord(
                file=str(path),
                where=where,
                filename=filename,
                split=split,
                captions=captions,
                caption_where=caption_where,
                class_name=_opt_str(img.get("class") or img.get("label")),
                lat=_opt_float(path, where, img.get("lat")),
                lon=_opt_float(path, where, img.get("lon")),
                extra=extra,
            )
        )
    return name, records


def _caption(path: Path, where: str, filename: Any, j: int, sent: Any) -> str:
    if isinstance(sent, str):
        return sent
    if isinstance(sent, dict):
        if isinstance(sent.get("raw"), str):
            return sent["raw"]
        if isinstance(sent.get("tokens"), list):
            return " ".join(str(t) for t in sent["tokens"])
    raise DatasetFormatError(
        f"{path}: {where} ({filename}): sentences[{j}] has neither a 'raw' string nor a 'tokens' list"
    )


def _opt_str(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _opt_float(path: Path, where: str, value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DatasetFormatError(f"{path}: {where}: coordinate {value!r} is not a number") from None
