"""The AMFMN / GaLR / SWAN "precomp" text layout: `{split}_caps.txt` (one caption per line) beside
`{split}_filename.txt`. Two alignments exist and are detected from the line counts:

- per image (train): one name per image, each followed by K consecutive caption lines (K = captions / names);
- per caption (test): one name per caption line, each name repeated on consecutive lines.

Sydney-Captions also ships a `_verify` re-split (`train_caps_verify.txt`, `val_caps_verify.txt`); the format
name `precomp:verify` reads those files where they exist and the plain files for the other splits.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from ssjdn.data.errors import DatasetFormatError
from ssjdn.data.readers.common import RawRecord, read_lines
from ssjdn.data.record import SPLITS

_CAPS = re.compile(r"(?P<split>.+?)_caps(?P<variant>_[A-Za-z0-9]+)?\.txt")


def find_caption_files(root: Path, variant: str = "") -> dict[str, tuple[Path, Path]]:
    """{split: (caps file, filename file)} for the chosen variant ("" or "_verify")."""
    found: dict[str, dict[str, Path]] = {}
    for caps in sorted(root.glob("*_caps*.txt")):
        m = _CAPS.fullmatch(caps.name)
        if not m:
            continue
        found.setdefault(m.group("split"), {})[m.group("variant") or ""] = caps
    if not found:
        raise DatasetFormatError(f"{root}: no '{{split}}_caps.txt' files (precomp layout)")
    chosen: dict[str, tuple[Path, Path]] = {}
    for split, variants in found.items():
        caps = variants.get(variant) or variants.get("")
        if caps is None:
            continue  # e.g. only `val_caps_verify.txt` exists and the plain variant was asked for
        names = caps.with_name(caps.name.replace("_caps", "_filename"))
        if not names.exists():
            raise DatasetFormatError(f"{caps}: no matching file-name list {names.name} beside it")
        chosen[split] = (caps, names)
    return chosen


def iter_precomp(root: Path, variant: str = "") -> Iterator[RawRecord]:
    """The raw records of every split, split by split. One split's two text files are held while it is read
    (their alignment is decided from the line counts); the benchmark datasets in this layout are small."""
    files = find_caption_files(root, variant)
    # train, val, test first (file order); unknown split names last, where the dataset builder refuses them.
    for split in sorted(files, key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s)):
        caps_path, names_path = files[split]
        yield from _read_split(split, caps_path, names_path)


def _read_split(split: str, caps_path: Path, names_path: Path) -> Iterator[RawRecord]:
    caps = read_lines(caps_path)
    names = read_lines(names_path)
    for i, n in enumerate(names):
        if not n.strip():
            raise DatasetFormatError(f"{names_path}: line {i + 1}: empty image file name")
    if not names:
        raise DatasetFormatError(f"{names_path}: empty file-name list")
    if len(names) == len(caps):
        groups = _group_per_caption(names, names_path)
    elif len(caps) % len(names) == 0:
        k = len(caps) // len(names)
        groups = [(n.strip(), list(range(i * k, (i + 1) * k)), i + 1) for i, n in enumerate(names)]
    else:
        raise DatasetFormatError(
            f"{caps_path}: {len(caps)} caption lines do not align with {len(names)} names in {names_path.name}: "
            "expected one name per caption or the same number of captions per name"
        )
    for name, lines, name_line in groups:
        yield RawRecord(
            file=str(names_path),
            where=f"line {name_line}",
            filename=name,
            split=split,
            captions=[caps[j] for j in lines],
            caption_where=[f"{caps_path.name} line {j + 1}" for j in lines],
        )


def _group_per_caption(names: list[str], names_path: Path) -> list[tuple[str, list[int], int]]:
    """Runs of the same name -> (name, caption line indices, first line). A name in two runs is a duplicate."""
    groups: list[tuple[str, list[int], int]] = []
    first_line: dict[str, int] = {}
    for i, raw in enumerate(names):
        n = raw.strip()
        if groups and groups[-1][0] == n:
            groups[-1][1].append(i)
            continue
        if n in first_line:
            raise DatasetFormatError(
                f"{names_path}: line {i + 1}: duplicate image file name {n!r} (its captions started at line "
                f"{first_line[n]} and were interrupted by other names)"
            )
        first_line[n] = i + 1
        groups.append((n, [i], i + 1))
    return groups
