"""Karpathy-style JSON (RSICD `dataset_rsicd.json`, RSITMD `dataset_RSITMD.json`, UCM/Sydney `dataset.json`):
`{"dataset": NAME, "images": [{"filename", "split", "sentences": [{"raw", "tokens"}, ...]}, ...]}`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ssjdn.data.errors import DatasetFormatError
from ssjdn.data.readers.common import RawRecord
from ssjdn.data.readers.jsonstream import stream_object_array


def dataset_name(fields: dict[str, Any]) -> str | None:
    """The name in a Karpathy file's "dataset" field (known once its records have been read), or None."""
    name = fields.get("dataset")
    return name if isinstance(name, str) and name.strip() else None


def iter_karpathy(path: Path, fields: dict[str, Any]) -> Iterator[RawRecord]:
    """The raw records of a Karpathy JSON file, parsed one image at a time (bounded memory at any size).

    The file's other top-level fields (e.g. "dataset") land in `fields`; complete once the iterator is exhausted.
    """
    for i, img in enumerate(stream_object_array(path, "images", fields)):
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
        yield RawRecord(
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
