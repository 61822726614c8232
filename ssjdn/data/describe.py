"""Summarise a dataset: images, captions, classes, splits, duplicate captions, and which images are missing,
unreadable or refused (a symbolic link out of the dataset root). Backs `ssjdn data describe`.

Counts of images and captions are the ones the dataset lists (quarantined records included, reported apart);
`usable_*` counts are what a reader passes on. Image checks run in a thread pool (Pillow releases the GIL).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ssjdn.data.errors import ImageDecodeError
from ssjdn.data.images import check_image, probe_image, read_image_bytes
from ssjdn.data.paths import SymlinkGuard
from ssjdn.data.readers.base import Dataset
from ssjdn.data.record import SPLITS, Sample

log = logging.getLogger(__name__)

CHECK_MODES = ("decode", "header", "exists", "none")


@dataclass
class ImageCheck:
    mode: str
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason): never read
    formats: Counter = field(default_factory=Counter)
    min_size: tuple[int, int] | None = None
    max_size: tuple[int, int] | None = None


def check_images(
    samples: list[Sample],
    *,
    mode: str = "decode",
    workers: int | None = None,
    progress: bool | None = None,
    links: SymlinkGuard | None = None,
) -> ImageCheck:
    """Check that every sample's image exists and (mode `header`) has a valid header or (mode `decode`) decodes
    completely. With `links`, an image it refuses (a symbolic link out of the dataset root) is counted as
    refused and never read. Results keep the samples' order."""
    if mode not in CHECK_MODES:
        raise ValueError(f"check mode {mode!r} must be one of {CHECK_MODES}")
    result = ImageCheck(mode=mode)
    if mode == "none":
        return result
    from tqdm import tqdm

    workers = workers or min(8, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = pool.map(lambda s: _check_one(s, mode, links), samples)
        # progress None: a bar only on a terminal (tqdm's own rule).
        disable = None if progress is None else not progress
        bar = tqdm(zip(samples, outcomes), total=len(samples), desc="checking images", unit="img", disable=disable)
        for sample, (status, detail) in bar:
            result.checked += 1
            name = sample.filename or sample.source
            if status == "missing":
                result.missing.append(name)
            elif status == "unreadable":
                result.unreadable.append((name, detail))
            elif status == "refused":
                result.refused.append((name, detail))
            elif detail is not None:
                result.formats[detail.format] += 1
                # Smallest and largest width and height, each on its own.
                lo, hi = result.min_size or (detail.width, detail.height), result.max_size or (0, 0)
                result.min_size = (min(lo[0], detail.width), min(lo[1], detail.height))
                result.max_size = (max(hi[0], detail.width), max(hi[1], detail.height))
    return result


def _check_one(sample: Sample, mode: str, links: SymlinkGuard | None = None) -> tuple[str, Any]:
    name = sample.filename or sample.source
    refused = links.check(sample.source) if links is not None else None
    if refused is not None:
        return "refused", refused
    if mode == "exists" and "://" not in sample.source:
        return ("ok", None) if os.path.isfile(sample.source) else ("missing", None)
    try:
        data = read_image_bytes(sample.source)
    except FileNotFoundError:
        return "missing", None
    except OSError as exc:
        return "unreadable", f"{name}: cannot read {sample.source}: {exc}"
    if mode == "exists":
        return "ok", None
    try:
        info = check_image(data, name) if mode == "decode" else probe_image(data, name)
    except ImageDecodeError as exc:
        return "unreadable", str(exc)
    return "ok", info


def describe_dataset(
    ds: Dataset,
    *,
    check: str = "decode",
    max_named: int = 5,
    workers: int | None = None,
    progress: bool | None = False,
    follow_symlinks: bool = False,
) -> dict[str, Any]:
    """A JSON-serialisable report on `ds` (see docs/data-formats.md for the fields). Images behind symbolic
    links that lead out of `ds.roots` are refused (not read) unless `follow_symlinks`."""
    dropped = ds.dropped_samples
    listed = ds.samples + dropped
    dropped_captions = Counter()  # per split
    for b in ds.quarantine:
        dropped_captions[b.split] += b.captions_dropped
    # Kept samples that lost some captions: add the lost ones back to their count.
    lost = {b.filename: b.captions_dropped for b in ds.quarantine if b.sample is None}
    per_image = [len(s.captions) + lost.get(s.filename, 0) for s in ds.samples] + [
        b.captions_dropped for b in ds.quarantine if b.sample is not None
    ]
    usable_captions = [c for s in ds.samples for c in s.captions]
    n_captions = sum(per_image)

    splits = {}
    for split in SPLITS:
        in_split = [s for s in listed if s.split == split]
        if not in_split:
            continue
        caps = [c for s in in_split for c in s.captions]
        splits[split] = {
            "images": len(in_split),
            "captions": len(caps) + dropped_captions[split],
            "distinct_captions": len(set(caps)),
        }

    class_counts = Counter(s.class_name for s in listed if s.class_name is not None)
    log.info("checking %d images under %s (%s)", len(listed), ds.image_root, check)
    links = SymlinkGuard(ds.roots, follow=follow_symlinks)
    checked = check_images(listed, mode=check, workers=workers, progress=progress, links=links)
    distinct = len(set(usable_captions))
    return {
        "dataset": ds.name,
        "format": ds.format,
        "root": str(ds.root),
        "image_root": str(ds.image_root),
        "images": len(listed),
        "captions": n_captions,
        "usable_images": len(ds.samples),
        "usable_captions": len(usable_captions),
        "captions_per_image": {
            "mean": round(n_captions / len(listed), 3) if listed else 0.0,
            "min": min(per_image, default=0),
            "max": max(per_image, default=0),
        },
        "classes": {
            "count": len(ds.classes),
            "counts": {c: class_counts[c] for c in ds.classes},
            "unlabelled_images": sum(1 for s in listed if s.class_name is None),
        },
        "splits": splits,
        "duplicate_captions": {
            "captions": len(usable_captions),
            "distinct": distinct,
            "ratio": round(1 - distinct / len(usable_captions), 4) if usable_captions else 0.0,
        },
        "image_check": {
            "mode": check,
            "checked": checked.checked,
            "readable": checked.checked - len(checked.missing + checked.unreadable + checked.refused),
            "formats": dict(checked.formats),
            "min_size": list(checked.min_size) if checked.min_size else None,
            "max_size": list(checked.max_size) if checked.max_size else None,
        },
        "missing_images": {"count": len(checked.missing), "first": checked.missing[:max_named]},
        "unreadable_images": {
            "count": len(checked.unreadable),
            "first": [{"file": f, "reason": r} for f, r in checked.unreadable[:max_named]],
        },
        "refused_images": {
            "count": len(checked.refused),
            "first": [{"file": f, "reason": r} for f, r in checked.refused[:max_named]],
        },
        "quarantined": {
            "records": len(ds.quarantine),
            "images": len(dropped),
            "captions": sum(b.captions_dropped for b in ds.quarantine),
            "first": [b.message for b in ds.quarantine[:max_named]],
        },
    }


def format_report(r: dict[str, Any]) -> str:
    """The report as plain text for a terminal."""
    cpi = r["captions_per_image"]
    lines = [
        f"dataset    {r['dataset']} ({r['format']}) at {r['root']}",
        f"images     {r['images']} listed, {r['usable_images']} usable; image folder {r['image_root']}",
        f"captions   {r['captions']} listed, {r['usable_captions']} usable; per image mean {cpi['mean']:.2f} "
        f"(min {cpi['min']}, max {cpi['max']})",
        f"duplicates {r['duplicate_captions']['distinct']} distinct of {r['duplicate_captions']['captions']} "
        f"usable captions; duplicate ratio {r['duplicate_captions']['ratio']:.3f}",
        "splits     " + ", ".join(
            f"{k} {v['images']} images / {v['captions']} captions" for k, v in r["splits"].items()
        ),
    ]
    cls = r["classes"]
    if cls["count"]:
        lines.append(f"classes    {cls['count']} ({cls['unlabelled_images']} images unlabelled)")
        lines += [f"  {name:<24} {n}" for name, n in cls["counts"].items()]
    else:
        lines.append("classes    none (no labels file, label column or file-name prefixes)")
    chk = r["image_check"]
    if chk["mode"] != "none":
        fmts = ", ".join(f"{k} {v}" for k, v in sorted(chk["formats"].items())) or "none"
        sizes = f"; sizes {_size(chk['min_size'])} to {_size(chk['max_size'])}" if chk["min_size"] else ""
        lines.append(
            f"image check ({chk['mode']}): {chk['readable']} of {chk['checked']} readable; formats {fmts}{sizes}"
        )
    for key, label in (
        ("missing_images", "missing"),
        ("unreadable_images", "unreadable"),
        ("refused_images", "refused"),
    ):
        m = r.get(key) or {"count": 0}
        if m["count"]:
            names = [x if isinstance(x, str) else x["reason"] for x in m["first"]]
            more = f" (and {m['count'] - len(names)} more)" if m["count"] > len(names) else ""
            lines.append(f"{label} images: {m['count']}")
            lines += [f"  {n}" for n in names]
            if more:
                lines.append(f"  ...{more}")
    q = r["quarantined"]
    if q["records"]:
        lines.append(
            f"quarantined: {q['records']} records ({q['images']} images, {q['captions']} captions dropped)"
        )
        lines += [f"  {m}" for m in q["first"]]
    return "\n".join(lines)


def _size(wh: list[int]) -> str:
    return f"{wh[0]}x{wh[1]}"
