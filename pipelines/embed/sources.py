"""What an archive holds, as units of work for the embedding job, and how one unit is read.

Archive kinds (detected in this order):
- WebDataset shards written by `ssjdn shard` or chip shards written by `ssjdn tile` (a folder with
  `_manifest.json`): one unit per committed shard; a committed unit the manifest no longer lists is gone
  (`gone_units`), and a tiled scene's shards form one group (pipelines.embed.groups);
- a `.tar` file, or a folder (any fsspec URL) of `.tar` files: one unit per tar;
- a listing (`.txt`, one URL per line) of tars or of image files;
- a dataset folder/file that `ssjdn.data.readers.load_dataset` reads (Karpathy JSON, precomp, tables);
- a folder of image files.
Image files are grouped into chunks of at most `chunk_size` (sorted by key), each chunk a unit that records
its keys, so a re-run embeds only images that are not in the store yet.

A tar unit carries a `fingerprint` of its source, recorded with the unit when it is committed: the shard's
sha256 from the shard manifest, else the tar's size plus ETag (object stores) or mtime (local files). A unit
whose fingerprint differs from the recorded one has changed since it was embedded (`change_reason`).

A chip written by `ssjdn tile` carries where and when it lies in its json member (`footprint`, `datetime`,
`scene_id`, `eo:cloud_cover`, `platform`; docs/tiling.md): `chip_fields` turns them into the store's geo
columns, an invalid footprint repaired (pipelines.geo.repair) so one bad chip never fails a run.

`read_unit` yields the samples of one unit as plain dicts (image bytes undecoded) and never unpickles: a tar
is read with `tarfile` in stream mode, only the members this project writes are kept, and they are decoded by
`pipelines.shard.read.decode_sample` (explicit member decoding only). A tar that does not read to its end
(cut short, unreadable, a size other than the shard manifest's) raises `UnitReadError`: the unit fails as a
whole and a re-run retries it; only samples whose own members are broken are skipped one by one.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipelines.errors import PipelineError
from pipelines.fsio import full_url, get_fs, is_local, read_json, safe_join
from pipelines.shard.layout import member_uri
from pipelines.store.writer import replacement_token

log = logging.getLogger(__name__)

# The store's geo columns a sample may carry (plain strings and numbers: they travel through Ray blocks).
GEO_SAMPLE_FIELDS = ("geometry", "datetime", "scene_id", "cloud_cover", "platform")

SHARD_MANIFEST = "_manifest.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
DEFAULT_CHUNK = 1000


class ArchiveError(PipelineError, ValueError):
    """An archive this job cannot embed (nothing embeddable in it, a STAC catalog not tiled yet); one line."""


class UnitReadError(PipelineError, OSError):
    """A unit's tar does not read to its end (cut short, unreadable, not the size its manifest lists)."""


def _shard_unit(
    uid: str,
    url: str,
    split: str | None,
    fingerprint: str | None,
    samples: int | None,
    nbytes: int | None = None,
) -> dict:
    return {
        "id": uid,
        "kind": "shard",
        "url": url,
        "split": split,
        "fingerprint": fingerprint,
        "expected": samples,
        "bytes": nbytes,
    }


def source_signature(info: dict[str, Any] | None) -> str | None:
    """`size=N,etag=E` (object stores) or `size=N,mtime=T` (local files) from an fsspec `info`; None if unknown."""
    if not info or info.get("size") is None:
        return None
    size = int(info["size"])
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if etag:
        return f"size={size},etag=" + str(etag).strip('"')
    keys = ("mtime", "LastModified", "last_modified", "updated", "modified")
    mtime = next((info[k] for k in keys if info.get(k)), None)
    if mtime is None:
        return None
    return f"size={size},mtime={mtime.isoformat() if hasattr(mtime, 'isoformat') else repr(mtime)}"


def _listing_signatures(urls: list[str], storage_options: dict[str, Any] | None) -> dict[str, str | None]:
    """Signatures of the tars a listing names: one folder listing per folder, not one request per tar."""
    out: dict[str, str | None] = {}
    folders: dict[str, list[str]] = {}
    for u in urls:
        folders.setdefault(posixpath.dirname(u), []).append(u)
    for folder, members in folders.items():
        try:
            fs, path = get_fs(folder, storage_options)
            listing = {e["name"].rstrip("/"): e for e in fs.ls(path, detail=True)}
        except Exception as exc:  # best effort (any backend's errors): without a listing, no signature
            log.debug("cannot list %s: %s", folder, exc)
            listing, fs = {}, None
        for u in members:
            info = listing.get(fs._strip_protocol(u).rstrip("/")) if fs is not None else None
            out[u] = source_signature(info)
    return out


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


@dataclass
class Archive:
    """What `discover_archive` found: the kind, the tar units or the image samples, and for an archive with a
    shard manifest (its commit point) every shard path it lists, so units committed from it that it no longer
    lists can leave the store (`gone_units`)."""

    kind: str
    units: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    root_url: str = ""
    listed: set[str] | None = None  # shard paths of the manifest, every split; None without a manifest
    tiled: bool = False  # the manifest is `ssjdn tile`'s: units are grouped by scene (`group`)


def discover(
    archive_url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    splits: list[str] | None = None,
    follow_symlinks: bool = False,
) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """(archive kind, shard units, image samples) of an archive; exactly one of the two lists is non-empty."""
    found = discover_archive(archive_url, storage_options, splits=splits, follow_symlinks=follow_symlinks)
    return found.kind, found.units, found.samples


def discover_archive(
    archive_url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    splits: list[str] | None = None,
    follow_symlinks: bool = False,
) -> Archive:
    """The archive's kind and units (see the module docstring).

    Local files reached through a symbolic link that leads out of the archive's folder (a dataset's: its image
    roots) carry `refused` (the reason) unless `follow_symlinks`: the caller reports them, never reads them.
    """
    fs, root = get_fs(archive_url, storage_options)
    if not fs.exists(root):
        raise FileNotFoundError(f"archive {archive_url} does not exist")
    want = set(splits) if splits else None
    if fs.isdir(root) and fs.exists(safe_join(root, SHARD_MANIFEST)):
        return _manifest_archive(fs, root, read_json(fs, safe_join(root, SHARD_MANIFEST)), want)
    kind, units, samples = _discover_files(fs, root, archive_url, want, follow_symlinks, storage_options)
    return Archive(kind, units, samples, root_url=full_url(fs, root))


def _manifest_archive(fs, root: str, manifest: dict[str, Any], want: set[str] | None) -> Archive:
    """The units of a folder written by `ssjdn shard` or `ssjdn tile` (one read of its manifest)."""
    from pipelines.tile.layout import scene_of_shard

    tiled = isinstance(manifest.get("tile"), dict)
    shards = manifest.get("shards", [])
    units = []
    for s in shards:
        if want is not None and s.get("split") not in want:
            continue
        unit = _shard_unit(
            s["path"],
            full_url(fs, safe_join(root, s["path"])),
            s.get("split"),
            s.get("sha256"),
            s.get("samples"),
            s.get("bytes"),
        )
        if tiled:
            unit["group"] = scene_of_shard(s["path"])
        units.append(unit)
    return Archive(
        "tiles" if tiled else "webdataset",
        units,
        [],
        root_url=full_url(fs, root),
        listed={s["path"] for s in shards},
        tiled=tiled,
    )


def gone_units(archive: Archive, done: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Committed units that came from this archive's manifest and that it no longer lists (a re-tiled scene's
    old shards, a scene gone from the catalog), each `{"id", "group", "replaces"}` for `stage_removal`.

    Only an archive with a manifest has this rule: the manifest is its commit point, while a bare folder's
    listing may be caught mid-upload. A unit is this archive's when its recorded URL lies under the archive."""
    from pipelines.tile.layout import scene_of_shard

    if archive.listed is None:
        return []
    prefix = archive.root_url.rstrip("/") + "/"
    out = []
    for uid, entry in sorted(done.items()):
        url = str(entry.get("url") or "")
        if entry.get("kind") != "shard" or not url.startswith(prefix) or uid in archive.listed:
            continue
        if url[len(prefix) :] != uid:  # another archive's unit that happens to live below this one
            continue
        group = scene_of_shard(uid) if archive.tiled else None
        out.append({"id": uid, "group": group, "replaces": replacement_token(entry)})
    return out


def _discover_files(
    fs, root: str, archive_url: str, want: set[str] | None, follow_symlinks: bool, storage_options
) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    from ssjdn.data.record import make_key

    if fs.isfile(root) and root.endswith(".tar"):
        sig = source_signature(fs.info(root))
        return "tar", [_shard_unit(posixpath.basename(root), full_url(fs, root), None, sig, None)], []
    if fs.isfile(root) and root.endswith((".txt", ".lst")):
        with fs.open(root, "rb") as f:
            urls = [line.strip() for line in f.read().decode("utf-8").splitlines() if line.strip()]
        urls = [u for u in urls if not u.startswith("#")]
        if urls and all(u.endswith(".tar") for u in urls):
            sigs = _listing_signatures(urls, storage_options)
            return "listing", [_shard_unit(u, u, None, sigs[u], None) for u in urls], []
        stem = posixpath.splitext(posixpath.basename(root))[0]
        return "listing", [], [_image_sample(make_key(stem, u.rsplit("/", 1)[-1]), u) for u in urls]
    if fs.isfile(root) and root.endswith(".json") and _is_stac(fs, root):
        raise ArchiveError(
            f"archive {archive_url} is a STAC document: tile its scenes first (`ssjdn tile`, or reindex-archive "
            "with tile_dest) and embed the chips"
        )
    if is_local(fs):
        found_ds = _dataset_samples(root, want)
        if found_ds is not None:
            samples, roots = found_ds
            return "dataset", [], _guard(samples, roots, follow_symlinks)
    if fs.isdir(root):
        found = fs.find(root, detail=True)
        tars = sorted(p for p in found if p.endswith(".tar"))
        if tars:
            units = [
                _shard_unit(
                    posixpath.relpath(p, root), full_url(fs, p), None, source_signature(found[p]), None
                )
                for p in tars
            ]
            return "tar-folder", _guard(units, [root], follow_symlinks and is_local(fs), key="url"), []
        name = posixpath.basename(root)
        images = sorted(p for p in found if p.lower().endswith(IMAGE_SUFFIXES))
        if images:
            samples = [
                _image_sample(make_key(name, posixpath.relpath(p, root)), full_url(fs, p)) for p in images
            ]
            return "image-folder", [], _guard(samples, [root], follow_symlinks) if is_local(fs) else samples
    raise ArchiveError(
        f"archive {archive_url}: found no shards (_manifest.json or *.tar), dataset description or image files"
    )


def _is_stac(fs, path: str) -> bool:
    try:
        doc = read_json(fs, path)
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "stac_version" in doc


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
    samples = [
        _image_sample(
            s.key, s.source, split=s.split, class_name=s.class_name, lat=s.lat, lon=s.lon, captions=s.captions
        )
        for s in ds.samples
        if want is None or s.split in want
    ]
    return samples, list(ds.roots)


def _guard(
    items: list[dict[str, Any]], roots: list[str], follow: bool, key: str = "source"
) -> list[dict[str, Any]]:
    """Mark (`refused`) the local items whose file is a link leading out of `roots` (ssjdn.data.paths)."""
    from ssjdn.data.paths import SymlinkGuard

    guard = SymlinkGuard(roots, follow=follow)
    out = []
    for item in items:
        where = item[key]
        path = where[len("file://") :] if where.startswith("file://") else where
        reason = guard.check(path)
        out.append({**item, "refused": reason} if reason else item)
    return out


def plan_units(
    shard_units: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    done: dict[str, dict[str, Any]],
    tables: tuple[str, ...],
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[list[dict[str, Any]], int, list[str]]:
    """(units to embed, units already complete, ids of committed tar units that changed since: `change_reason`).

    A unit is complete when every requested table is committed for it; a unit that has images but now also
    needs captions is planned for the missing table only (`tables` on the unit). A changed unit is planned
    again whole - every requested table and every table it had - with `replaces` (the committed entry's
    `replacement_token`): its commit swaps the old rows for the new ones in one manifest update.
    """
    todo, complete, changed = [], 0, []
    for unit in shard_units:
        prior = done.get(unit["id"])
        missing = tuple(t for t in tables if prior is None or prior.get(t) is None)
        if prior is not None and change_reason(unit, prior) is not None:
            changed.append(unit["id"])
            again = [t for t in ("images", "captions") if t in tables or prior.get(t) is not None]
            todo.append({**unit, "tables": again, "replaces": replacement_token(prior)})
        elif missing:
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


def change_reason(unit: dict[str, Any], prior: dict[str, Any]) -> str | None:
    """Why the committed entry `prior` of a tar unit no longer stands for `unit`'s source; None when it does.

    Changed: the fingerprint recorded at commit (shard sha256, or size + ETag/mtime) differs from the source's
    now. Also: an entry committed by an earlier version of this job from a tar that broke off mid-stream (its
    bad samples include one keyed `?`): its rows stop where the read stopped.
    """
    old, new = prior.get("fingerprint"), unit.get("fingerprint")
    if old and new and old != new:
        return f"its source changed since it was embedded (recorded {old}, now {new})"
    if unit.get("kind") == "shard":
        broken = next((b for b in prior.get("bad") or [] if b.get("key") == "?"), None)
        if broken is not None:
            return f"it was committed from a tar that did not read to its end ({broken.get('reason')})"
    return None


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
    from pipelines.shard.read import ShardReadError, decode_sample

    broken: list[str] = []
    for raw in _tar_samples(unit, storage_options):
        try:
            s = decode_sample(raw)
        except ShardReadError as exc:  # this sample's own members: reported; the tar reads on
            broken.append(f"{type(exc).__name__}: {exc}")
            continue
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
            **chip_fields(meta, s["key"]),
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


# A member's sample key is its name up to the first dot of the base name, the rest its extension (as webdataset).
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_MAX_TAIL = 4 << 20  # bytes after the end-of-archive marker that can still be padding (blocking factors)


class _HashingReader:
    """What tarfile's stream mode needs of a file (`read`), hashing every byte that passes."""

    def __init__(self, raw) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        return data


def _tar_samples(unit: dict[str, Any], storage_options: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    """Raw samples (`{"__key__", "__url__", ext: bytes}`, as webdataset groups them) of one tar, only the
    members this project reads (nothing is unpickled or decoded here). Raises `UnitReadError` unless the tar
    reads to its end: Python's tarfile (and so webdataset) stops silently at a header that is cut short or
    corrupt, so what follows the last member read must be the end-of-archive marker (zero blocks) and nothing
    else. A shard listed in a shard manifest must also have the size and the sha256 the manifest lists (the
    bytes are hashed as they are read; the samples of a shard whose hash turns out wrong are already yielded,
    so the caller must treat the unit as failed, as the embedding job does with any exception)."""
    import tarfile

    from pipelines.shard.layout import EXPECTED_MEMBERS

    url = unit["url"]
    fs, path = get_fs(url, storage_options)
    size = fs.size(path)
    listed = unit.get("bytes") is not None  # a shard of a shard manifest: its size and sha256 are known
    if listed and size != unit["bytes"]:
        raise UnitReadError(
            f"{url}: {size} bytes, but the shard manifest lists {unit['bytes']} (cut short or replaced)"
        )
    read = 0
    with fs.open(path, "rb", block_size=8 << 20) as f:
        reader = _HashingReader(f)
        try:
            tar = tarfile.open(fileobj=reader, mode="r|", bufsize=1 << 20)
            current: dict[str, Any] | None = None
            for info in tar:
                m = _MEMBER.match(info.name)
                if not info.isreg() or m is None or m.group(2).lower() not in EXPECTED_MEMBERS:
                    continue  # never read into memory (tarfile skips over its data)
                key, ext = m.group(1), m.group(2).lower()
                data = tar.extractfile(info).read()
                if current is not None and current["__key__"] != key:
                    read += 1
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                if ext in current:
                    raise UnitReadError(f"{url}: member {info.name} appears twice in sample {key!r}")
                current[ext] = data
            if current is not None:
                read += 1
                yield current
            end = tar.offset
        except (tarfile.TarError, EOFError) as exc:
            raise UnitReadError(
                f"{url}: the tar does not read to its end (stopped after {read} sample(s)): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        rest = size - end
        padding = b""
        if 512 <= rest <= _MAX_TAIL:
            while reader.read(1 << 20):  # the rest of the file, for the hash
                pass
            f.seek(end)
            padding = f.read(rest)
    if rest < 512 or rest > _MAX_TAIL or padding.count(0) != len(padding):
        what = "the file is cut short" if rest < 512 else "a corrupt member header, or a second archive"
        raise UnitReadError(
            f"{url}: the tar does not read to its end: {read} sample(s) read, then no end-of-archive "
            f"marker at byte {end} of {size}: {what}"
        )
    if listed and unit.get("fingerprint") and reader.sha.hexdigest() != unit["fingerprint"]:
        raise UnitReadError(
            f"{url}: sha256 {reader.sha.hexdigest()[:16]}... is not the {str(unit['fingerprint'])[:16]}... "
            "the shard manifest lists (the shard changed after it was written)"
        )


def _scalar(value: Any, kind: type):
    if isinstance(value, bool) or value is None:
        return None
    if kind is float:
        return float(value) if isinstance(value, (int, float)) else None
    return str(value) if isinstance(value, (str, int, float)) else None


def chip_fields(meta: dict[str, Any], key: str = "?") -> dict[str, Any]:
    """The geo columns of one chip from its json: `geometry` as WKB hex (None without a footprint; repaired
    when GDAL made it invalid), `datetime` as the item's ISO string, `scene_id`, `cloud_cover`
    (`eo:cloud_cover`), `platform`. Absent fields are None: a benchmark sample has none of them."""
    import shapely
    from shapely.geometry import shape

    from pipelines.geo.repair import valid_footprint

    props = meta.get("properties") if isinstance(meta.get("properties"), dict) else {}
    wkb = None
    footprint = meta.get("footprint")
    if isinstance(footprint, dict):
        try:
            geom = shape(footprint)
        except Exception as exc:  # noqa: BLE001 - shapely raises several kinds for a malformed mapping
            log.warning("chip %s: footprint is not a GeoJSON geometry (%s); stored without one", key, exc)
            geom = None
        fixed = valid_footprint(geom)
        if geom is not None and fixed is not geom:
            log.info("chip %s: invalid footprint (%s) repaired", key, shapely.is_valid_reason(geom))
        wkb = shapely.to_wkb(fixed, hex=True, output_dimension=2) if fixed is not None else None
    pick = lambda name: meta.get(name, props.get(name))  # noqa: E731 - top level first, then the item's
    return {
        "geometry": wkb,
        "datetime": _scalar(pick("datetime"), str),
        "scene_id": _scalar(meta.get("scene_id"), str),
        "cloud_cover": _scalar(pick("eo:cloud_cover"), float),
        "platform": _scalar(pick("platform"), str),
    }


def _key_from_reason(reason: str) -> str:
    marker = "sample '"
    if marker in reason:
        return reason.split(marker, 1)[1].split("'", 1)[0]
    return "?"
