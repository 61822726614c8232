"""What to tile: SOURCE -> scene references (id, assets, STAC metadata, the identity a re-run compares).

SOURCE is one raster file, a folder or fsspec URL prefix of GeoTIFF/COG scenes, a text file of scene URLs (one
per line, `#` comments; relative paths are relative to the file), or a STAC catalog / collection / item /
item collection as JSON (see `pipelines.tile.stac`). Listing reads no pixels and opens no raster.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

from pipelines.fsio import get_fs, is_local, with_retries
from pipelines.tile.refs import AssetRef, SceneRef, SourceError, identity_of, stat_identity

RASTER_EXTS = (".tif", ".tiff", ".gtiff", ".geotiff")
LIST_EXTS = (".txt", ".lst", ".list")


def _is_raster_name(name: str) -> bool:
    return name.lower().endswith(RASTER_EXTS)


def _looks_like_json(fs, path: str) -> bool:
    if path.lower().endswith(".json") or path.lower().endswith(".geojson"):
        return True
    try:
        with fs.open(path, "rb") as f:
            return f.read(64).lstrip()[:1] == b"{"
    except OSError:
        return False


def list_scenes(
    source: str,
    storage_options: dict[str, Any] | None = None,
    *,
    assets: tuple[str, ...] | None = None,
    bands: tuple[int | str, ...] | None = None,
) -> tuple[str, str, list[SceneRef]]:
    """(kind, canonical source URL, scenes) for SOURCE; kind is file, folder, list or stac. Raises SourceError."""
    source = os.fspath(source)
    try:
        fs, root = get_fs(source, storage_options)
    except (ValueError, ImportError) as exc:
        raise SourceError(f"{source}: cannot open ({exc})") from exc
    url = root if is_local(fs) else fs.unstrip_protocol(root)
    try:
        info = with_retries(lambda: fs.info(root), what=f"stat {url}")
    except FileNotFoundError:
        raise SourceError(f"{source}: not found") from None
    if info.get("type") == "directory":
        return "folder", url, _list_folder(fs, root, url)
    if _is_raster_name(root):
        return "file", url, [_file_scene(url, identity_of(info) if not is_local(fs) else None)]
    if root.lower().endswith(LIST_EXTS):
        return "list", url, _list_file(fs, root, url, storage_options)
    if _looks_like_json(fs, root):
        from pipelines.tile.stac import stac_scenes

        return "stac", url, stac_scenes(url, storage_options, assets=assets, bands=bands)
    # Any other single file: let GDAL decide (JPEG 2000, ERDAS .img, VRT, ...).
    return "file", url, [_file_scene(url, identity_of(info) if not is_local(fs) else None)]


def _stem(url: str) -> str:
    base = posixpath.basename(url.rstrip("/"))
    return base.rsplit(".", 1)[0] if "." in base else base


def _file_scene(url: str, identity: dict[str, Any] | None = None) -> SceneRef:
    ident = identity if identity is not None else stat_identity(url) or {}
    return SceneRef(id=url, name=_stem(url), assets=[AssetRef(href=url, identity=ident)])


def _list_folder(fs, root: str, url: str) -> list[SceneRef]:
    found = with_retries(lambda: fs.find(root, detail=True), what=f"list {url}")
    scenes = []
    for path in sorted(found):
        entry = found[path]
        if entry.get("type") == "directory" or not _is_raster_name(path):
            continue
        if posixpath.basename(path).startswith("."):
            continue
        file_url = path if is_local(fs) else fs.unstrip_protocol(path)
        scenes.append(_file_scene(file_url, None if is_local(fs) else identity_of(entry)))
    if not scenes:
        raise SourceError(f"{url}: no GeoTIFF/COG scenes ({', '.join(RASTER_EXTS)}) in this folder")
    return scenes


def _list_file(fs, root: str, url: str, storage_options) -> list[SceneRef]:
    with fs.open(root, "rb") as f:
        lines = f.read().decode("utf-8").splitlines()
    base = posixpath.dirname(url)
    scenes, seen = [], set()
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if "://" not in entry and not entry.startswith("/"):
            entry = (
                posixpath.join(base, entry) if "://" in base else os.path.abspath(os.path.join(base, entry))
            )
        if entry in seen:
            continue
        seen.add(entry)
        scenes.append(_file_scene(entry, stat_identity(entry, storage_options) or {}))
    if not scenes:
        raise SourceError(f"{url}: lists no scene URLs")
    return scenes
