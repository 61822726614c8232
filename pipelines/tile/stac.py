"""STAC catalogs, collections, items and item collections (local or any fsspec URL, read with pystac) -> scenes.

Which assets of an item are read: `--assets KEY[,KEY]` by key; otherwise by the band names asked for
(`--bands red,green,blue`), matched against each raster asset's `eo:bands` (STAC 1.0) or `bands` (STAC 1.1)
`name` / `common_name`; otherwise the `visual` asset, or single-band assets whose common names are red, green
and blue, or the first raster asset with the `data` role. An item without a usable asset becomes a scene with
a `problem` (quarantined with the reason), not an error of the run.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

from fsspec.utils import get_protocol

from pipelines.fsio import get_fs, with_retries
from pipelines.tile.refs import AssetRef, SceneRef, SourceError, stat_identity

RASTER_MEDIA_HINTS = ("image/tiff", "geotiff", "image/jp2", "image/vnd.stac.geotiff", "x-hdf", "netcdf")
NOT_DATA_ROLES = {"thumbnail", "overview", "metadata"}


def _stac_io(storage_options: dict[str, Any] | None):
    import pystac

    class FsspecStacIO(pystac.StacIO):
        """pystac reads every catalog/collection/item document through fsspec (S3, HTTP, memory, local)."""

        def read_text(self, source, *args: Any, **kwargs: Any) -> str:
            href = source if isinstance(source, str) else getattr(source, "href", str(source))
            fs, path = get_fs(href, storage_options)
            with fs.open(path, "rb") as f:
                return f.read().decode("utf-8")

        def write_text(self, dest, txt: str, *args: Any, **kwargs: Any) -> None:
            raise NotImplementedError("tiling never writes STAC documents")

    return FsspecStacIO()


def _resolve(href: str, base_url: str) -> str:
    """An asset href relative to the document it was read from -> absolute."""
    if "://" in href or href.startswith("/"):
        return href
    if get_protocol(base_url) == "file":
        return os.path.normpath(os.path.join(os.path.dirname(base_url), href))
    proto, rest = base_url.split("://", 1)
    return f"{proto}://" + posixpath.normpath(posixpath.join(posixpath.dirname(rest), href))


def stac_scenes(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    assets: tuple[str, ...] | None = None,
    bands: tuple[int | str, ...] | None = None,
) -> list[SceneRef]:
    """One scene per STAC item reachable from `url`, sorted by id."""
    import pystac

    io = _stac_io(storage_options)
    try:
        text = with_retries(lambda: io.read_text(url), what=f"read {url}")
        doc = json.loads(text)
    except FileNotFoundError:
        raise SourceError(f"{url}: not found") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourceError(f"{url}: not a JSON document ({exc})") from None
    kind = doc.get("type") if isinstance(doc, dict) else None
    try:
        if kind == "FeatureCollection":
            items = list(pystac.ItemCollection.from_dict(doc, preserve_dict=False))
            base = {id(i): url for i in items}
        elif kind == "Feature":
            item = pystac.Item.from_dict(doc, href=url, preserve_dict=False)
            items, base = [item], {id(item): url}
        elif kind in ("Catalog", "Collection"):
            root = pystac.read_file(url, stac_io=io)
            items = list(root.get_items(recursive=True))
            base = {id(i): i.get_self_href() or url for i in items}
        else:
            raise SourceError(
                f"{url}: not a STAC catalog, collection, item or item collection (type {kind!r})"
            )
    except SourceError:
        raise
    except Exception as exc:  # pystac: STACTypeError, KeyError on malformed documents, broken links
        raise SourceError(f"{url}: cannot read the STAC document: {type(exc).__name__}: {exc}") from None
    if not items:
        raise SourceError(f"{url}: the STAC {kind.lower()} holds no items")
    scenes = [_item_scene(i, base[id(i)], storage_options, assets, bands) for i in items]
    seen: dict[str, int] = {}
    for s in scenes:
        seen[s.id] = seen.get(s.id, 0) + 1
    dup = sorted(k for k, n in seen.items() if n > 1)
    if dup:
        raise SourceError(f"{url}: item id {dup[0]!r} appears {seen[dup[0]]} times in one collection")
    return sorted(scenes, key=lambda s: s.id)


def band_metadata(asset_dict: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-band `{"name", "common_name"}` of an asset: `eo:bands` (STAC 1.0) or `bands` (STAC 1.1)."""
    out = []
    for b in asset_dict.get("bands") or asset_dict.get("eo:bands") or []:
        if isinstance(b, dict):
            out.append(
                {"name": b.get("name"), "common_name": b.get("eo:common_name") or b.get("common_name")}
            )
    return out


def _is_raster(asset) -> bool:
    roles = set(asset.roles or [])
    if roles & NOT_DATA_ROLES and "data" not in roles:
        return False
    media = (asset.media_type or "").lower()
    if media:
        return any(h in media for h in RASTER_MEDIA_HINTS)
    return asset.href.lower().split("?", 1)[0].endswith((".tif", ".tiff", ".jp2", ".img", ".vrt"))


def _choose(item, assets, bands) -> tuple[list[str], str | None]:
    """(asset keys to read, problem)."""
    listed = ", ".join(f"{k} ({a.media_type or '?'})" for k, a in item.assets.items()) or "none"
    raster = {k: a for k, a in item.assets.items() if _is_raster(a)}
    if assets:
        missing = [k for k in assets if k not in item.assets]
        if missing:
            return [], f"item {item.id}: no asset {missing[0]!r} (assets: {listed})"
        not_raster = [k for k in assets if k not in raster]
        if not_raster:
            k = not_raster[0]
            return (
                [],
                f"item {item.id}: asset {k!r} is not a raster (media type {item.assets[k].media_type or '?'})",
            )
        return list(assets), None
    if not raster:
        return [], f"item {item.id}: no raster asset (assets: {listed})"
    names = [b for b in (bands or ()) if isinstance(b, str)]
    if names:
        keys: list[str] = []
        for name in names:
            hit = next((k for k, a in raster.items() if _has_band(a, name)), None)
            if hit is None:
                known = sorted(
                    {n for a in raster.values() for b in band_metadata(a.to_dict()) for n in b.values() if n}
                )
                return (
                    [],
                    f"item {item.id}: no band named {name!r} (bands: {', '.join(known) or 'none described'})",
                )
            if hit not in keys:
                keys.append(hit)
        return keys, None
    for k, a in raster.items():
        if k == "visual" or "visual" in (a.roles or []):
            return [k], None
    rgb = []
    for colour in ("red", "green", "blue"):
        hit = next(
            (k for k, a in raster.items() if len(band_metadata(a.to_dict())) == 1 and _has_band(a, colour)),
            None,
        )
        rgb.append(hit)
    if all(rgb):
        return rgb, None
    data = [k for k, a in raster.items() if "data" in (a.roles or [])]
    return [(data or list(raster))[0]], None


def _has_band(asset, name: str) -> bool:
    name = name.lower()
    return any(
        name in (str(b.get("name") or "").lower(), str(b.get("common_name") or "").lower())
        for b in band_metadata(asset.to_dict())
    )


def _item_scene(item, base_url: str, storage_options, assets, bands) -> SceneRef:
    collection = item.collection_id
    scene_id = f"{collection}/{item.id}" if collection else item.id
    props = json.loads(json.dumps(item.properties, default=str))  # plain JSON: datetimes as strings
    stac = {
        "item": item.id,
        "collection": collection,
        "href": item.get_self_href() or base_url,
        "properties": props,
    }
    keys, problem = _choose(item, assets, bands)
    refs = []
    for k in keys:
        a = item.assets[k]
        d = a.to_dict()
        href = _resolve(a.href, base_url)
        checksum = d.get("file:checksum")
        identity = {"checksum": checksum} if checksum else (stat_identity(href, storage_options) or {})
        refs.append(AssetRef(href=href, key=k, bands=band_metadata(d), identity=identity))
    return SceneRef(id=scene_id, name=item.id, assets=refs, stac=stac, problem=problem)
