"""What an archive holds, as units of work for the embedding job, and how one unit is read.

Archive kinds (detected in this order):
- WebDataset shards written by `ssjdn shard` (a folder with `_manifest.json`): one unit per committed shard;
- a `.tar` file, or a folder (any fsspec URL) of `.tar` files: one unit per tar;
- a listing (`.txt`, one URL per line) of tars or of image files;
- a dataset folder/file that `ssjdn.data.readers.load_dataset` reads (Karpathy JSON, precomp, tables);
- a folder of image files.
Image files are grouped into chunks of at most `chunk_size` (sorted by key), each chunk a unit that records
its keys, so a re-run embeds only images that are not in the store yet.

`read_unit` yields the samples of one unit as plain dicts (image bytes undecoded) and never unpickles:
shards go through `pipelines.shards_read` (explicit member decoding only).
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections.abc import Iterator
from typing import Any

from pipelines.fsio import full_url, get_fs, is_local, read_json, safe_join

log = logging.getLogger(__name__)

SHARD_MANIFEST = "_manifest.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
DEFAULT_CHUNK = 1000


def member_uri(shard_url: str, member: str) -> str:
    """fsspec URL of one tar member (`tar://KEY.jpg::s3://bucket/test/shard-000000.tar`): `fsspec.open` reads it."""
    return f"tar://{member}::{shard_url}"


def split_member_uri(uri: str) -> tuple[str, str] | None:
    """(shard URL, member) for a `member_uri`, else None."""
    if not uri.startswith("tar://") or "::" not in uri:
        return None
    member, shard = uri[len("tar://") :].split("::", 1)
    return shard, member


def _shard_unit(uid: str, url: str, split: str | None, fingerprint: str | None, samples: int | None) -> dict:
    return {
        "id": uid,
        "kind": "shard",
        "url": url,
        "split": split,
        "fingerprint": fingerprint,
        "expected": samples,
    }


def _files_unit(samples: list[dict[str, Any]]) -> dict:
    keys = [s["key"] for s in samples]
    digest = hashlib.sha1("\n".join(keys).encode("utf-8")).hexdigest()[:16]
    split = samples[0].get("split") if len({s.get("split") for s in samples}) == 1 else None
    return {
        "id": f"files/{split or 'mixed'}/{digest}",
        "kind": "files",
        "samples": samples,
        "split": split,
        "fingerprint": digest,
        "expected": len(samples),
    }


def _image_sample(
    key: str, source: str, *, split=None, class_name=None, lat=None, lon=None, captions=()
) -> dict:
    return {
        "key": key,
        "source": source,
        "split": split,
        "class": class_name,
        "lat": lat,
        "lon": lon,
        "captions": list(captions),
    }


def discover(
    archive_url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    splits: list[str] | None = None,
) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """(archive kind, shard units, image samples) of an archive; exactly one of the two lists is non-empty."""
    from ssjdn.data.record import make_key

    fs, root = get_fs(archive_url, storage_options)
    if not fs.exists(root):
        raise FileNotFoundError(f"archive {archive_url} does not exist")
    want = set(splits) if splits else None
    if fs.isdir(root) and fs.exists(safe_join(root, SHARD_MANIFEST)):
        manifest = read_json(fs, safe_join(root, SHARD_MANIFEST))
        units = [
            _shard_unit(
                s["path"],
                full_url(fs, safe_join(root, s["path"])),
                s.get("split"),
                s.get("sha256"),
                s.get("samples"),
            )
            for s in manifest.get("shards", [])
            if want is None or s.get("split") in want
        ]
        return "webdataset", units, []
    if fs.isfile(root) and root.endswith(".tar"):
        return "tar", [_shard_unit(posixpath.basename(root), full_url(fs, root), None, None, None)], []
    if fs.isfile(root) and root.endswith((".txt", ".lst")):
        with fs.open(root, "rb") as f:
            urls = [line.strip() for line in f.read().decode("utf-8").splitlines() if line.strip()]
        urls = [u for u in urls if not u.startswith("#")]
        if urls and all(u.endswith(".tar") for u in urls):
            return "listing", [_shard_unit(u, u, None, None, None) for u in urls], []
        stem = posixpath.splitext(posixpath.basename(root))[0]
        return "listing", [], [_image_sample(make_key(stem, u.rsplit("/", 1)[-1]), u) for u in urls]
    if is_local(fs):
        samples = _dataset_samples(root, want)
        if samples is not None:
            return "dataset", [], samples
    if fs.isdir(root):
        tars = sorted(p for p in fs.find(root) if p.endswith(".tar"))
        if tars:
            units = [_shard_unit(posixpath.relpath(p, root), full_url(fs, p), None, None, None) for p in tars]
            return "tar-folder", units, []
        name = posixpath.basename(root)
        images = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES))
        if images:
            return (
                "image-folder",
                [],
                [_image_sample(make_key(name, posixpath.relpath(p, root)), full_url(fs, p)) for p in images],
            )
    raise ValueError(
        f"archive {archive_url}: found no shards (_manifest.json or *.tar), dataset description or image files"
    )


def _dataset_samples(root: str, want: set[str] | None) -> list[dict[str, Any]] | None:
    from ssjdn.data.errors import DatasetFormatError
    from ssjdn.data.readers import load_dataset

    try:
        ds = load_dataset(root)
    except DatasetFormatError as exc:
        if "no dataset description found" in str(exc):
            return None
        raise
    for bad in ds.quarantine:
        log.warning("dataset record skipped: %s", bad.message)
    return [
        _image_sample(
            s.key, s.source, split=s.split, class_name=s.class_name, lat=s.lat, lon=s.lon, captions=s.captions
        )
        for s in ds.samples
        if want is None or s.split in want
    ]


def plan_units(
    shard_units: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    done: dict[str, dict[str, Any]],
    tables: tuple[str, ...],
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[list[dict[str, Any]], int, list[str]]:
    """(units to embed, units already complete, ids of committed shards whose content changed since).

    A unit is complete when every requested table is committed for it; a unit that has images but now also
    needs captions is planned for the missing table only (`tables` on the unit).
    """
    todo, complete, changed = [], 0, []
    for unit in shard_units:
        prior = done.get(unit["id"])
        missing = tuple(t for t in tables if prior is None or prior.get(t) is None)
        if (
            prior is not None
            and unit.get("fingerprint")
            and prior.get("fingerprint") not in (None, unit["fingerprint"])
        ):
            changed.append(unit["id"])
        if missing:
            todo.append({**unit, "tables": list(missing)})
        else:
            complete += 1
    if samples:
        covered: dict[str, set[str]] = {t: set() for t in tables}
        for entry in done.values():
            for t in tables:
                if entry.get(t) is not None:
                    covered[t].update(entry.get("keys") or [])
        pending: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for s in sorted(samples, key=lambda s: s["key"]):
            missing = tuple(t for t in tables if s["key"] not in covered[t])
            if missing:
                pending.setdefault(missing, []).append(s)
        for missing, group in pending.items():
            for i in range(0, len(group), chunk_size):
                todo.append({**_files_unit(group[i : i + chunk_size]), "tables": list(missing)})
    return todo, complete, changed


def read_unit(
    unit: dict[str, Any], storage_options: dict[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """Samples of one unit: dicts with key, source, split, class, lat, lon, captions and `image` (bytes) or
    `error` (why the sample cannot be used). Raises only when the unit itself cannot be read."""
    if unit["kind"] == "files":
        from ssjdn.data.images import read_image_bytes

        for s in unit["samples"]:
            try:
                data = read_image_bytes(s["source"])
                yield {**s, "image": data, "name": s["source"], "error": None}
            except OSError as exc:
                yield {**s, "image": None, "name": s["source"], "error": f"cannot read {s['source']}: {exc}"}
        return
    yield from _read_shard(unit, storage_options)


def _read_shard(unit: dict[str, Any], storage_options: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    from pipelines.shard.read import open_shards

    broken: list[str] = []

    def skip_broken(exc: Exception) -> bool:
        # A sample whose members do not parse: remembered and reported; the tar itself stays readable.
        broken.append(f"{type(exc).__name__}: {exc}")
        return True

    for s in open_shards([unit["url"]], storage_options=storage_options, handler=skip_broken):
        meta = s["meta"] if isinstance(s["meta"], dict) else {}
        member = f"{s['key']}.{s['image_ext']}"
        yield {
            "key": s["key"],
            "source": member_uri(unit["url"], member),
            "split": meta.get("split") or unit.get("split"),
            "class": meta.get("class_name"),
            "lat": meta.get("lat"),
            "lon": meta.get("lon"),
            "captions": [c for c in meta.get("captions") or [] if isinstance(c, str)],
            "image": s["image"],
            "name": f"{unit['url']}:{member}",
            "error": None,
        }
    for reason in broken:
        yield {
            "key": _key_from_reason(reason),
            "source": unit["url"],
            "split": unit.get("split"),
            "class": None,
            "lat": None,
            "lon": None,
            "captions": [],
            "image": None,
            "name": unit["url"],
            "error": reason,
        }


def _key_from_reason(reason: str) -> str:
    marker = "sample '"
    if marker in reason:
        return reason.split(marker, 1)[1].split("'", 1)[0]
    return "?"
