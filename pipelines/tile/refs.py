"""References to scenes before they are opened: what a SOURCE lists (ids, asset URLs, STAC metadata) and the
identity a re-run compares (checksum, size + mtime, ETag)."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from fsspec.utils import get_protocol

from pipelines.errors import PipelineError
from pipelines.fsio import get_fs, with_retries


class SourceError(PipelineError, ValueError):
    """SOURCE cannot be listed at all (missing, empty, unreadable catalog); one line, names SOURCE."""


@dataclass
class AssetRef:
    """One raster file of a scene."""

    href: str  # absolute URL or local path
    key: str | None = None  # STAC asset key
    bands: list[dict[str, Any]] = field(default_factory=list)  # STAC band metadata per band of the file
    identity: dict[str, Any] = field(
        default_factory=dict
    )  # checksum / size+mtime / ETag: what a re-run compares


@dataclass
class SceneRef:
    """A scene to tile: one raster file, or the raster assets of one STAC item."""

    id: str  # STAC item id (collection/id), or the file's URL
    name: str  # a readable name (item id, file stem)
    assets: list[AssetRef]
    stac: dict[str, Any] | None = None  # {"item", "collection", "href", "properties"}
    problem: str | None = None  # why this scene cannot be tiled, known while listing (e.g. no raster asset)

    @property
    def url(self) -> str:
        return self.assets[0].href if self.assets else (self.stac or {}).get("href", self.id)

    @property
    def key(self) -> str:
        """Safe, unique, stable name for file paths and sample keys: readable slug + digest of the id."""
        return scene_key(self.name, self.id)

    def identity(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "assets": [[a.key, a.href, a.identity] for a in self.assets],
            "stac": self.stac,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneRef:
        return cls(**{**d, "assets": [AssetRef(**a) for a in d["assets"]]})


_SLUG = re.compile(r"[^A-Za-z0-9]+")


def scene_key(name: str, scene_id: str) -> str:
    slug = _SLUG.sub("-", name).strip("-")[:48] or "scene"
    return f"{slug}-{hashlib.sha256(scene_id.encode('utf-8')).hexdigest()[:10]}"


def identity_of(info: dict[str, Any]) -> dict[str, Any]:
    """size + (ETag or mtime) from an fsspec `info`/listing entry: what says a file changed."""
    out: dict[str, Any] = {"size": int(info.get("size") or 0)}
    etag = info.get("ETag") or info.get("etag")
    if etag:
        out["etag"] = str(etag).strip('"')
    else:
        mtime = (
            info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
        )
        if mtime is not None:
            out["mtime"] = mtime if isinstance(mtime, (int, float)) else str(mtime)
    return out


def stat_identity(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Identity of one file, or None when it cannot be found (reported when the scene is opened)."""
    if get_protocol(url) == "file":
        try:
            st = os.stat(url.removeprefix("file://"))
        except OSError:
            return None
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        fs, path = get_fs(url, storage_options)
        info = with_retries(lambda: fs.info(path), what=f"stat {url}", retries=2, backoff=0.5)
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - unreachable: the open reports it, with GDAL's reason
        return None
    return identity_of(info)


def probe(url: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """Why a remote file cannot be read, asked through fsspec (one HEAD / stat, no retries): None when it
    answers, "not found", or the network error. GDAL reports a refused connection as "does not exist"."""
    proto = get_protocol(url)
    if proto == "file":
        return None if os.path.exists(url.removeprefix("file://")) else "not found"
    if proto in ("http", "https"):  # fsspec's HTTP filesystem calls every failure "not found"
        return _probe_http(url)
    try:
        fs, path = get_fs(url, storage_options)
        fs.invalidate_cache(path)  # a listing's cached entry says nothing about the server now
        fs.info(path)
        return None
    except FileNotFoundError:
        return "not found"
    except Exception as exc:  # noqa: BLE001 - connection refused, DNS, timeouts, 5xx: the reason is the message
        return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _probe_http(url: str) -> str | None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10):
            return None
    except urllib.error.HTTPError as exc:
        return "not found" if exc.code in (404, 410) else f"HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{type(reason).__name__}: {reason}"
