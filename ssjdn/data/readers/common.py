"""Shared reader plumbing: the raw record every reader yields, strict text decoding, safe relative names and
class labels (file-name prefixes, labels.csv). Checking records into a `Dataset` is `index.SampleIndex`'s job."""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ssjdn.data.errors import DatasetFormatError
from ssjdn.data.paths import local_url_path, under

LABELS_FILE = "labels.csv"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
# `airport_12.jpg` -> `airport`; `00123.jpg` (no letters before the number) -> no class.
_PREFIX_CLASS = re.compile(r"(?P<cls>.*[A-Za-z].*?)_\d+")


@dataclass
class RawRecord:
    """One image as a reader found it, before validation. `where` locates it in `file` for error messages."""

    file: str
    where: str
    filename: str
    split: str
    captions: list[str]
    caption_where: list[str] = field(default_factory=list)  # per caption, e.g. "line 12"; may be empty
    source: str | None = None  # set only for URLs; local names are joined to the image root
    class_name: str | None = None
    lat: float | None = None
    lon: float | None = None
    bbox: tuple[float, float, float, float] | None = None
    crs: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def is_url(name: str) -> bool:
    return bool(_URL.match(name))


def read_text(path: Path) -> str:
    """Read a UTF-8 text file (a BOM is allowed); anything else is an error naming the byte offset and line."""
    data = Path(path).read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetFormatError(
            f"{path}: not valid UTF-8 at byte offset {exc.start} (line {line}): {exc.reason} "
            f"(byte 0x{data[exc.start]:02x}); re-encode the file as UTF-8"
        ) from None


def read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file without their line endings; a final newline does not add an empty line."""
    lines = read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def safe_relative_name(name: Any, *, file: str, where: str) -> str:
    """Return `name` as a normalised POSIX relative path, refusing anything that could escape the image root."""
    if not isinstance(name, str) or not name.strip():
        raise DatasetFormatError(f"{file}: {where}: empty or missing image file name")
    name = name.strip()
    if name.startswith(("/", "~")) or _WINDOWS_DRIVE.match(name) or "\\" in name:
        raise DatasetFormatError(
            f"{file}: {where}: image file name {name!r} is absolute or not a POSIX relative path; "
            "names must be relative to the image root"
        )
    parts = [p for p in name.split("/") if p not in ("", ".")]  # as PurePosixPath(name).parts, ~5x cheaper
    if ".." in parts:
        raise DatasetFormatError(f"{file}: {where}: image file name {name!r} escapes the image root ('..')")
    if not parts:
        raise DatasetFormatError(f"{file}: {where}: image file name {name!r} names no file")
    return "/".join(parts)


def resolve_image_name(
    name: Any, *, file: str, where: str, image_root: str, roots: tuple[str, ...]
) -> tuple[str, str | None]:
    """(file name, source) of a listed image name: a safe relative name as it is (source None: the image root's);
    an absolute or `..` name only when it lands inside one of `roots` (the dataset root, the image root, the
    folders passed with `--allow-root`): then the name relative to the image root when it is inside it, else
    the absolute path as both (without its leading `/` as the file name, like a URL without its scheme)."""
    try:
        return safe_relative_name(name, file=file, where=where), None
    except DatasetFormatError as exc:
        stripped = name.strip() if isinstance(name, str) else ""
        if not stripped or stripped.startswith("~") or _WINDOWS_DRIVE.match(stripped) or "\\" in stripped:
            raise
        path = os.path.normpath(os.path.join(image_root, stripped))  # an absolute name replaces the root
        if not under(path, roots):
            raise DatasetFormatError(f"{exc}; it resolves to {path}, {_outside(roots)}") from None
        return local_file_name(path, image_root)


def resolve_local_url(
    url: str, *, file: str, where: str, image_root: str, roots: tuple[str, ...]
) -> tuple[str, str | None]:
    """(file name, source) of a table's URL that reads the local file system (`file:`, `local:`, a chain ending in
    one): refused unless the file it reads lies inside `roots` (see `resolve_image_name`); a plain local URL
    becomes the path itself, a chain (`tar://m::/x.tar`) stays the URL."""
    path = local_url_path(url)
    assert path is not None
    scheme = url.split("://", 1)[0].split("::", 1)[0]
    if not under(path, roots):
        raise DatasetFormatError(
            f"{file}: {where}: {scheme}:// URL {url!r} reads the local file {path}, {_outside(roots)}"
        )
    if "::" in url:
        return url.split("://", 1)[1], url
    return local_file_name(path, image_root)


def local_file_name(path: str, image_root: str) -> tuple[str, str | None]:
    """(file name, source) of an allowed local path: relative to the image root when inside it (source None)."""
    if under(path, (image_root,)):
        return Path(path).relative_to(image_root).as_posix(), None
    return path.lstrip(os.sep).replace(os.sep, "/"), path


def _outside(roots: tuple[str, ...]) -> str:
    return (
        f"outside the dataset (allowed: {', '.join(roots)}); pass --allow-root DIR to read images from another "
        "folder"
    )


def prefix_class(filename: str) -> str | None:
    """Scene class from a file-name prefix (`airport_12.jpg` -> `airport`); None when there is no such prefix."""
    stem = PurePosixPath(filename).name.rsplit(".", 1)[0]
    m = _PREFIX_CLASS.fullmatch(stem)
    return m.group("cls") if m else None


def open_text(path: Path):
    """A UTF-8 text file (a BOM is allowed) opened for reading line by line; pass it through `strict_utf8`."""
    return open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 - callers close it


def strict_utf8(path: Path, lines: Iterable[Any]) -> Iterator[Any]:
    """Pass `lines` through; on invalid UTF-8 re-read the file once for an error naming the byte offset and line."""
    try:
        yield from lines
    except UnicodeDecodeError:
        read_text(path)  # raises DatasetFormatError with the exact position
        raise


def iter_labels_file(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line number, relative file name, class) per row of a `filename,class` CSV (header required), one row at a
    time. A file named twice with two classes is refused by the dataset index, which sees every row."""
    with open_text(path) as f:
        reader = csv.reader(f)
        header_row = next(strict_utf8(path, reader), None)
        if header_row is None:
            raise DatasetFormatError(f"{path}: empty labels file; expected a header 'filename,class'")
        header = [h.strip().lower() for h in header_row]
        name_col = _pick(header, ("filename", "file", "image", "image_path", "path"))
        class_col = _pick(header, ("class", "label", "class_name", "category"))
        if name_col is None or class_col is None:
            raise DatasetFormatError(f"{path}: line 1: header {header_row} needs a 'filename' and a 'class' column")
        for row in strict_utf8(path, reader):
            lineno = reader.line_num
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) <= max(name_col, class_col):
                raise DatasetFormatError(f"{path}: line {lineno}: expected {len(header)} columns, got {len(row)}")
            name = safe_relative_name(row[name_col], file=str(path), where=f"line {lineno}")
            cls = row[class_col].strip()
            if not cls:
                raise DatasetFormatError(f"{path}: line {lineno} ({name}): empty class")
            yield lineno, name, cls


def _pick(header: list[str], names: tuple[str, ...]) -> int | None:
    for n in names:
        if n in header:
            return header.index(n)
    return None


def default_image_root(root: Path, images: str | os.PathLike | None) -> Path:
    """`images` when given, else `root/images` when that folder exists, else `root` itself."""
    if images is not None:
        return Path(os.path.abspath(images))
    return root / "images" if (root / "images").is_dir() else root
