"""Image bytes and sample metadata for the service, read from where the store says each image is.

A store row's `source` is a shard member (`tar://KEY.jpg::s3://bucket/shards/test/shard-000000.tar`) or an
image file URL. The first request for a shard walks its tar headers once (seeking over the member data) and
keeps {member: (offset, size)} for the most recently used shards; every image or json member is then one
ranged read. Nothing from a request is ever turned into a path: the service looks a key up in the store and
reads the source that row names.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import threading
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pipelines.errors import PipelineError
from pipelines.fsio import get_fs, with_retries
from pipelines.shard.layout import split_member_uri

log = logging.getLogger(__name__)

CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "gif": "image/gif",
    "webp": "image/webp",
}
THUMB_PX = 512
# The json member fields an item response may show (the rest - e.g. the source path on the sharding machine -
# stays private).
PUBLIC_META = (
    "captions",
    "width",
    "height",
    "format",
    "dataset",
    "bbox",
    "crs",
    "footprint",
    "centroid",
    "window",
)


class MediaError(PipelineError):
    """The image of an existing key cannot be read or decoded (the store points at something unreadable)."""


def public_url(url: str | None) -> str | None:
    """A URL without user info or query string (no credentials or signatures in responses)."""
    if not url:
        return url
    if url.startswith("tar://") and "::" in url:
        member, shard = url[len("tar://") :].split("::", 1)
        return f"tar://{member}::{public_url(shard)}"
    parts = urlsplit(url)
    if not parts.scheme or parts.scheme == "file":
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


class MediaReader:
    """Reads images and json members of store rows; thread-safe, with an LRU of shard member indexes."""

    def __init__(self, storage_options: dict[str, Any] | None = None, max_shards: int = 256) -> None:
        self.storage_options = storage_options or {}
        self.max_shards = max_shards
        self._index: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}

    def members(self, shard_url: str) -> dict[str, tuple[int, int]]:
        """{member name: (data offset, size)} of one shard (headers only; built once per shard, LRU-kept)."""
        with self._lock:
            found = self._index.get(shard_url)
            if found is not None:
                self._index.move_to_end(shard_url)
                return found
            building = self._building.setdefault(shard_url, threading.Lock())
        with building:  # one walk per shard, however many requests want it at once
            with self._lock:
                if shard_url in self._index:
                    return self._index[shard_url]
            fs, path = get_fs(shard_url, self.storage_options)

            def walk() -> dict[str, tuple[int, int]]:
                out = {}
                with fs.open(path, "rb", block_size=1 << 20) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                    for info in tar:
                        if info.isfile():
                            out[info.name] = (info.offset_data, info.size)
                return out

            index = with_retries(walk, what=f"index {shard_url}")
            with self._lock:
                self._index[shard_url] = index
                self._building.pop(shard_url, None)
                while len(self._index) > self.max_shards:
                    self._index.popitem(last=False)
            return index

    def _member(self, shard_url: str, member: str, max_bytes: int) -> bytes | None:
        at = self.members(shard_url).get(member)
        if at is None:
            return None
        offset, size = at
        if size > max_bytes:
            raise MediaError(f"member {member} is {size} bytes, over the limit of {max_bytes}")
        fs, path = get_fs(shard_url, self.storage_options)
        return with_retries(lambda: fs.cat_file(path, start=offset, end=offset + size), what=f"read {member}")

    def image(self, source: str, max_bytes: int) -> tuple[bytes, str]:
        """(encoded image bytes, member or file name) of a store row's source; MediaError when unreadable."""
        parts = split_member_uri(source)
        try:
            if parts is not None:
                shard, member = parts
                data = self._member(shard, member, max_bytes)
                if data is None:
                    raise MediaError(f"{member} is not in its shard")
                return data, member
            fs, path = get_fs(source, self.storage_options)
            size = fs.size(path)
            if size is not None and size > max_bytes:
                raise MediaError(f"the image is {size} bytes, over the limit of {max_bytes}")
            return with_retries(lambda: fs.cat_file(path), what="read image"), path.rsplit("/", 1)[-1]
        except MediaError:
            raise
        except (OSError, tarfile.TarError) as exc:
            raise MediaError(f"the image cannot be read: {type(exc).__name__}") from exc

    def sample_meta(self, source: str, max_bytes: int = 1 << 20) -> dict[str, Any]:
        """The public fields of the sample's json member (shard sources only; {} otherwise or when unreadable)."""
        parts = split_member_uri(source)
        if parts is None:
            return {}
        shard, member = parts
        try:
            data = self._member(shard, member.split(".", 1)[0] + ".json", max_bytes)
            doc = json.loads(data.decode("utf-8")) if data else {}
        except (OSError, tarfile.TarError, MediaError, ValueError, UnicodeDecodeError) as exc:
            log.warning("cannot read the json member of %s: %s", member, type(exc).__name__)
            return {}
        if not isinstance(doc, dict):
            return {}
        out = {k: doc[k] for k in PUBLIC_META if k in doc}
        if "captions" in out:
            out["captions"] = [c for c in out["captions"] or [] if isinstance(c, str)]
        return out


def thumbnail(data: bytes, name: str, *, passthrough_bytes: int, max_pixels: int) -> tuple[bytes, str]:
    """(bytes, content type) a browser shows: a stored JPEG/PNG/GIF/WebP as it is (up to `passthrough_bytes`),
    anything else (TIFF, BMP, a huge file) decoded - at most `max_pixels` - and sent as a JPEG of THUMB_PX."""
    from ssjdn.data.errors import ImageDecodeError
    from ssjdn.data.images import decode_image

    kind = CONTENT_TYPES.get(_ext(name))
    if kind is not None and len(data) <= passthrough_bytes:
        return data, kind
    try:
        img = decode_image(data, name, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        raise MediaError(f"the stored image cannot be shown: {' '.join(str(exc).split())}") from None
    img.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue(), "image/jpeg"
