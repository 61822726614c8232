"""A dataset's samples, checked record by record into SQLite, so any size of caption file becomes a `Dataset`
(small ones) or an ordered stream of samples (sharding a whole archive) in bounded memory.

Hard errors (the whole dataset is refused): a split that is not train/val/test, unsafe or duplicate file
names, two names that map to the same sample key. Quarantined (reported, not passed on): empty or
whitespace-only captions; a sample left with no caption at all is dropped as a whole.
Classes come from an explicit per-record class, else `labels`, else (when `prefix_labels`) the file-name
prefix; a record with none stays unlabelled. Class index = position in the sorted class list.

The database lives in memory by default or in a file (`path`): SQLite keeps a few MB of pages in memory and
sorts larger-than-memory results on disk. Rows naming the same image are merged where the format allows it
(tables: one row per caption), and refused as duplicates elsewhere.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssjdn.data.errors import DatasetFormatError
from ssjdn.data.paths import allowed_roots, local_url_path
from ssjdn.data.readers.base import BadRecord, Dataset
from ssjdn.data.readers.common import (
    RawRecord,
    iter_labels_file,
    prefix_class,
    resolve_image_name,
    resolve_local_url,
)
from ssjdn.data.record import SPLITS, Sample, make_key

_SCHEMA = """
CREATE TABLE records (
    n INTEGER PRIMARY KEY,          -- listing order
    filename TEXT NOT NULL UNIQUE,  -- relative to the image root (the URL's path for remote images)
    split TEXT NOT NULL,
    source TEXT,                    -- set for URLs only
    cls TEXT,                       -- explicit, else labels-file class
    prefix TEXT,                    -- file-name prefix class, used only if the dataset has two or more
    key TEXT,                       -- set once the dataset's name is known (a Karpathy name may follow the images)
    doc TEXT NOT NULL               -- the rest of the raw record, JSON (see _doc)
);
CREATE TABLE labels (filename TEXT PRIMARY KEY, cls TEXT NOT NULL, line INTEGER NOT NULL) WITHOUT ROWID;
"""
_BATCH = 1000  # records per INSERT call
_SPLIT_RANK = "CASE split " + " ".join(f"WHEN '{s}' THEN {i}" for i, s in enumerate(SPLITS)) + " END"


@dataclass
class DatasetSource:
    """A dataset opened but not read: where it is, how to read its records, and the naming rules."""

    format: str
    root: Path
    image_root: Path
    records: Callable[[], Iterator[RawRecord]]
    name: Callable[[], str]  # valid once `records()` has been exhausted
    labels: Path | None = None  # a `filename,class` CSV (labels.csv)
    prefix_labels: bool = False
    merge_repeat: Callable[[RawRecord, RawRecord], None] | None = None  # tables: fold a repeated image's rows
    allow_roots: tuple[str, ...] = ()  # more folders images may come from (`--allow-root`)

    @property
    def roots(self) -> tuple[str, ...]:
        """Where a listed image may lie on the local file system: the dataset root, the image root and the
        allowed roots (absolute, normalised)."""
        return allowed_roots(self.root, self.image_root, *self.allow_roots)


class SampleIndex:
    """Read every record of `source` into SQLite (memory or the file `path`), checking each; see the module."""

    def __init__(self, source: DatasetSource, path: str | os.PathLike = ":memory:") -> None:
        self.source = source
        self.db = sqlite3.connect(path, isolation_level=None)  # transactions are ours: one per phase
        # A rollback journal on disk (not in memory: that grew with the dataset) without fsyncs: the file is
        # scratch. Rollbacks are needed for the batch savepoints.
        self.db.executescript("PRAGMA journal_mode=TRUNCATE; PRAGMA synchronous=OFF;" + _SCHEMA)
        self.db.create_function("make_key", 2, make_key, deterministic=True)
        self._root = str(source.image_root)
        self.db.execute("BEGIN")
        if source.labels is not None:
            self._load_labels(source.labels)
        self._ingest()
        self.name = source.name()
        self._assign_keys()
        self.db.execute("COMMIT")
        self._resolve_classes()

    def close(self) -> None:
        self.db.close()

    # -- reading --------------------------------------------------------------------------------------------

    def _load_labels(self, path: Path) -> None:
        def conflict(row: tuple) -> None:
            name, cls, line = row
            (first,) = self.db.execute("SELECT cls FROM labels WHERE filename = ?", (name,)).fetchone()
            if first != cls:
                raise DatasetFormatError(f"{path}: line {line}: {name} labelled both {first!r} and {cls!r}")

        insert = "INSERT INTO labels (filename, cls, line) VALUES (?, ?, ?)"
        for batch in _chunks((name, cls, line) for line, name, cls in iter_labels_file(path)):
            self._insert(insert, [(row, row) for row in batch], conflict)

    def _ingest(self) -> None:
        src = self.source
        roots = src.roots
        guess_prefix = src.prefix_labels and src.labels is None
        insert = "INSERT INTO records (filename, split, source, cls, prefix, doc) VALUES (?, ?, ?, ?, ?, ?)"
        batch: list[tuple[tuple, RawRecord]] = []
        for r in src.records():
            if r.split not in SPLITS:
                raise DatasetFormatError(
                    f"{r.file}: {r.where} ({r.filename}): split {r.split!r} is not one of {', '.join(SPLITS)}"
                )
            if r.source is None:
                r.filename, r.source = resolve_image_name(
                    r.filename, file=r.file, where=r.where, image_root=self._root, roots=roots
                )
            elif local_url_path(r.source) is not None:  # file:, local:, ... (normalised by fsspec)
                r.filename, r.source = resolve_local_url(
                    r.source, file=r.file, where=r.where, image_root=self._root, roots=roots
                )
            prefix = prefix_class(r.filename) if r.class_name is None and guess_prefix else None
            batch.append(((r.filename, r.split, r.source, r.class_name, prefix, _doc(r)), r))
            if len(batch) >= _BATCH:
                self._insert(insert, batch, self._repeat)
                batch = []
        self._insert(insert, batch, self._repeat)
        if src.labels is not None:  # a labels-file class where the record names none
            self.db.execute(
                "UPDATE records SET cls = (SELECT l.cls FROM labels l WHERE l.filename = records.filename) "
                "WHERE cls IS NULL"
            )

    def _insert(self, sql: str, batch: list[tuple[tuple, Any]], on_conflict: Callable[[Any], None]) -> None:
        """Insert a batch in one call; when a unique key repeats in it, row by row, handing each repeat to
        `on_conflict` (merge it, ignore it or raise)."""
        self.db.execute("SAVEPOINT batch")
        try:
            self.db.executemany(sql, [row for row, _ in batch])
        except sqlite3.IntegrityError:
            self.db.execute("ROLLBACK TO batch")
            for row, item in batch:
                try:
                    self.db.execute(sql, row)
                except sqlite3.IntegrityError:
                    on_conflict(item)
        self.db.execute("RELEASE batch")

    def _repeat(self, r: RawRecord) -> None:
        n, split, source, doc = self.db.execute(
            "SELECT n, split, source, doc FROM records WHERE filename = ?", (r.filename,)
        ).fetchone()
        first = _raw(r.filename, split, source, doc)
        if self.source.merge_repeat is None:
            raise DatasetFormatError(
                f"{r.file}: {r.where}: duplicate image file name {r.filename!r} "
                f"(first listed at {first.file}: {first.where}, split {first.split}; this one split {r.split})"
            )
        self.source.merge_repeat(first, r)
        self.db.execute("UPDATE records SET doc = ? WHERE n = ?", (_doc(first), n))

    def _assign_keys(self) -> None:
        self.db.execute("UPDATE records SET key = make_key(?, filename)", (self.name,))
        try:
            self.db.execute("CREATE UNIQUE INDEX records_key ON records (key)")
        except sqlite3.IntegrityError:
            a, b, doc, key = self.db.execute(
                "SELECT a.filename, b.filename, b.doc, a.key FROM records a JOIN records b "
                "ON a.key = b.key AND a.n < b.n ORDER BY b.n LIMIT 1"
            ).fetchone()
            file, where = json.loads(doc)[:2]
            raise DatasetFormatError(
                f"{file}: {where}: image file names {a!r} and {b!r} map to the same sample key {key!r}; "
                "rename one of them"
            ) from None

    def _resolve_classes(self) -> None:
        distinct_prefixes = self.db.execute(
            "SELECT COUNT(DISTINCT prefix) FROM records WHERE cls IS NULL AND prefix IS NOT NULL"
        ).fetchone()[0]
        # One prefix shared by every name (IMG_0001, IMG_0002) is a naming scheme, not a scene class.
        self._use_prefix = int(distinct_prefixes >= 2)
        names = self.db.execute(
            "SELECT DISTINCT cls FROM records WHERE cls IS NOT NULL UNION "
            "SELECT DISTINCT prefix FROM records WHERE cls IS NULL AND prefix IS NOT NULL AND ?",
            (self._use_prefix,),
        ).fetchall()
        self.classes: list[str] = sorted(c for (c,) in names)
        self._class_index = {c: i for i, c in enumerate(self.classes)}

    # -- queries --------------------------------------------------------------------------------------------

    def split_counts(self) -> dict[str, int]:
        """Records per split (samples dropped for having no caption included)."""
        rows = dict(self.db.execute("SELECT split, COUNT(*) FROM records GROUP BY split").fetchall())
        return {s: rows[s] for s in SPLITS if s in rows}

    def identity(self, splits: tuple[str, ...] = SPLITS) -> Iterator[tuple[str, str, str]]:
        """(split, key, file name) of every record in `splits`, sorted: what the dataset lists, good or bad."""
        marks = ",".join("?" * len(splits))
        yield from self.db.execute(
            f"SELECT split, key, filename FROM records WHERE split IN ({marks}) ORDER BY split, key, filename",
            splits,
        )

    def samples(
        self, splits: tuple[str, ...] = SPLITS, sort_key: Callable[[str], Any] | None = None
    ) -> Iterator[tuple[Sample, BadRecord | None]]:
        """(sample, quarantine entry or None) per record of `splits`: in listing order, or split by split
        (train, val, test) ordered by `sort_key(key)` (then the key). The entry's `sample` is set when the whole
        sample is dropped (no usable caption); otherwise it only counts captions dropped from a kept sample."""
        marks = ",".join("?" * len(splits))
        order = "n"
        if sort_key is not None:
            self.db.create_function("sort_key", 1, sort_key, deterministic=True)
            order = f"{_SPLIT_RANK}, sort_key(key), key"
        query = (
            "SELECT key, filename, split, source, CASE WHEN cls IS NOT NULL THEN cls WHEN ? THEN prefix END, doc "
            f"FROM records WHERE split IN ({marks}) ORDER BY {order}"
        )
        for row in self.db.execute(query, (self._use_prefix, *splits)):
            yield self._sample(*row)

    def _sample(self, key, filename, split, source, cls, doc) -> tuple[Sample, BadRecord | None]:
        file, where, captions, caption_where, lat, lon, bbox, crs, extra, _ = json.loads(doc)
        good = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
        sample = Sample(
            key=key,
            captions=good,
            split=split,
            source=source or f"{self._root}/{filename}",
            class_name=cls,
            class_index=self._class_index[cls] if cls else None,
            filename=filename,
            lat=lat,
            lon=lon,
            bbox=tuple(bbox) if bbox is not None else None,
            crs=crs,
            extra=extra,
        )
        n_bad = len(captions) - len(good)
        if not n_bad and captions:
            return sample, None
        if captions:
            reason = f"{n_bad} of {len(captions)} captions empty or whitespace-only{_bad_caption_where(captions, caption_where)}"
        else:
            reason = "no captions"
        dropped = not good
        if dropped:
            reason += "; sample quarantined (no usable caption)"
        bad = BadRecord(
            file=file, where=where, filename=filename, reason=reason, split=split,
            captions_dropped=n_bad, sample=sample if dropped else None,
        )  # fmt: skip
        return sample, bad

    def dataset(self) -> Dataset:
        """Everything as an in-memory `Dataset` (for datasets that fit in memory: training, embedding, describe)."""
        samples, quarantine = [], []
        for sample, bad in self.samples():
            if bad is not None:
                quarantine.append(bad)
                if bad.sample is not None:
                    continue
            samples.append(sample)
        src = self.source
        return Dataset(
            name=self.name, format=src.format, root=src.root, image_root=src.image_root,
            classes=list(self.classes), samples=samples, quarantine=quarantine, allow_roots=src.allow_roots,
        )  # fmt: skip


def _chunks(items: Iterator[Any] | Any, size: int = 0) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size or _BATCH)):
        yield chunk


def _doc(r: RawRecord) -> str:
    return json.dumps(
        [r.file, r.where, r.captions, r.caption_where, r.lat, r.lon, r.bbox, r.crs, r.extra, r.class_name],
        ensure_ascii=False,
    )


def _raw(filename: str, split: str, source: str | None, doc: str) -> RawRecord:
    file, where, captions, caption_where, lat, lon, bbox, crs, extra, class_name = json.loads(doc)
    return RawRecord(
        file=file, where=where, filename=filename, split=split, captions=captions, caption_where=caption_where,
        source=source, class_name=class_name, lat=lat, lon=lon, bbox=tuple(bbox) if bbox is not None else None,
        crs=crs, extra=extra,
    )  # fmt: skip


def _bad_caption_where(captions: list[Any], caption_where: list[str]) -> str:
    if not caption_where:
        return ""
    bad = [w for c, w in zip(captions, caption_where) if not (isinstance(c, str) and c.strip())]
    if not bad:
        return ""
    return f" ({bad[0]})" if len(bad) == 1 else f" ({bad[0]} to {bad[-1]})"
