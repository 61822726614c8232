"""Read shards written by `pipelines.shard` back with plain `webdataset.WebDataset`, safely.

    ds = open_split("s3://bucket/ucm", "train", nodesplitter=wds.split_by_node)
    for sample in ds:  # {"key", "image", "image_ext", "meta", "cls", "txt", "url"}
        ...

The shard list comes from `_manifest.json` (the commit point), never from listing folders, so shards of an
unfinished run are never read. Only the members this project writes are decoded, explicitly: image bytes are
passed through undecoded, `json` is parsed, `cls` is an int, `txt` is UTF-8. Webdataset's default decoder is
never used (it unpickles `.pyd`/`.pickle` members). Remote URLs are opened through fsspec (webdataset itself
has no S3 handler): endpoint and credentials come from the standard AWS variables or `storage_options`.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Iterable
from typing import Any

from fsspec.utils import get_protocol

from pipelines.errors import PipelineError
from pipelines.fsio import full_url, get_fs, read_json, safe_join, with_retries
from pipelines.shard.layout import EXPECTED_MEMBERS, IMAGE_EXTS, MANIFEST

# Storage options per URL prefix for the fsspec opener below (webdataset's openers take only a URL).
# Processes that start fresh (spawned loader workers) see none of these and use the AWS variables instead.
_OPTIONS: dict[str, dict[str, Any]] = {}
_OPTIONS_LOCK = threading.Lock()


class ShardReadError(PipelineError, ValueError):
    """A shard sample is missing a member or holds one that does not parse; names the shard and key."""


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The committed manifest of a shard destination; a clear error when there is none (yet)."""
    fs, root = get_fs(url, storage_options)
    path = safe_join(root, MANIFEST)
    doc = with_retries(lambda: read_json(fs, path), what=f"read {full_url(fs, path)}")
    if doc is None:
        raise FileNotFoundError(
            f"{full_url(fs, path)} not found: {url} holds no committed shards (run `ssjdn shard` to completion)"
        )
    return doc


def list_shards(
    url: str,
    split: str,
    storage_options: dict[str, Any] | None = None,
    manifest: dict[str, Any] | None = None,
) -> list[str]:
    """URLs of the committed shards of `split`, in manifest order (paths checked to stay under `url`)."""
    manifest = manifest if manifest is not None else read_manifest(url, storage_options)
    fs, root = get_fs(url, storage_options)
    urls = [full_url(fs, safe_join(root, s["path"])) for s in manifest["shards"] if s["split"] == split]
    if not urls:
        have = ", ".join(manifest.get("splits", {})) or "none"
        raise ShardReadError(f"{url}: no shards for split {split!r} (splits present: {have})")
    return urls


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any):
    """webdataset `gopen` handler for fsspec URLs (s3://, gs://, memory://, ...)."""
    if mode != "rb":
        raise ValueError(f"{url}: shards are opened read-only here")
    with _OPTIONS_LOCK:
        opts = next((o for prefix, o in _OPTIONS.items() if url.startswith(prefix)), None)
    fs, path = get_fs(url, opts)
    return fs.open(path, "rb", block_size=8 << 20)


def register_fsspec_opener(
    protocol: str, url_prefix: str | None = None, storage_options: dict | None = None
) -> None:
    """Let webdataset open `protocol://` URLs through fsspec (optionally with options for `url_prefix`)."""
    from webdataset.gopen import gopen_schemes  # the dispatch table itself (mutated in place)

    gopen_schemes[protocol] = _fsspec_gopen
    if url_prefix is not None and storage_options:
        with _OPTIONS_LOCK:
            _OPTIONS[url_prefix] = dict(storage_options)


for _proto in ("s3", "s3a"):  # the common case works in any process that imports this module
    register_fsspec_opener(_proto)


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Raw webdataset sample (member name -> bytes) -> `{key, image, image_ext, meta, cls, txt, url}`.

    Image bytes stay encoded (decode them with `ssjdn.data.images.decode_image` where pixels are needed).
    Members other than the expected ones are ignored, never decoded.
    """
    key, url = raw.get("__key__"), raw.get("__url__")
    exts = [e for e in IMAGE_EXTS if e in raw]
    if len(exts) != 1:
        raise ShardReadError(f"{url}: sample {key!r}: expected one image member, found {exts or 'none'}")
    if "json" not in raw:
        raise ShardReadError(f"{url}: sample {key!r}: no json member")
    try:
        meta = json.loads(bytes(raw["json"]).decode("utf-8"))
        cls = int(bytes(raw["cls"]).decode("ascii")) if "cls" in raw else None
        txt = bytes(raw["txt"]).decode("utf-8") if "txt" in raw else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ShardReadError(f"{url}: sample {key!r}: unreadable member: {exc}") from exc
    return {
        "key": key,
        "image": bytes(raw[exts[0]]),
        "image_ext": exts[0],
        "meta": meta,
        "cls": cls,
        "txt": txt,
        "url": url,
    }


def _only_expected(name: str) -> bool:
    """`select_files` for webdataset: skip unknown members before they are even read into memory."""
    ext = name.rsplit("/", 1)[-1].split(".", 1)[-1] if "." in name else ""
    return ext.lower() in EXPECTED_MEMBERS


def open_shards(
    urls: Iterable[str],
    *,
    storage_options: dict[str, Any] | None = None,
    nodesplitter: Callable | None = None,
    workersplitter: Callable | None = None,
    shardshuffle: int | bool = False,
    shuffle: int = 0,
    resampled: bool = False,
    handler: Callable[[Exception], bool] | None = None,
    empty_check: bool = False,
    seed: int | None = None,
):
    """A `webdataset.WebDataset` over `urls` yielding decoded dicts (see `decode_sample`).

    `nodesplitter`/`workersplitter` are webdataset's (`wds.split_by_node`, `wds.split_by_worker`; default: no
    node splitting, split by DataLoader worker). `handler` decides what a broken sample does (default: raise;
    `wds.warn_and_continue` skips it with a warning, as open_clip does for training).
    """
    import webdataset as wds

    urls = list(urls)
    for u in urls:
        proto = get_protocol(u)
        if proto != "file":
            prefix = u.rsplit("/", 1)[0] + "/"
            register_fsspec_opener(proto, prefix, storage_options)
    handler = handler or wds.reraise_exception
    ds = wds.WebDataset(
        urls,
        handler=handler,
        shardshuffle=shardshuffle if not resampled else None,
        resampled=resampled,
        nodesplitter=nodesplitter or wds.single_node_only,
        workersplitter=workersplitter or wds.split_by_worker,
        select_files=_only_expected,
        empty_check=empty_check,
        seed=seed,
    )
    if shuffle:
        ds = ds.shuffle(shuffle)
    return ds.compose(functools.partial(_decoded, handler=handler))


def _decoded(samples: Iterable[dict[str, Any]], handler: Callable[[Exception], bool]):
    """Pipeline stage: raw samples -> `decode_sample` dicts; `handler` decides on a broken one (True: skip)."""
    for raw in samples:
        try:
            yield decode_sample(raw)
        except Exception as exc:
            if handler(exc):
                continue
            break


def open_split(url: str, split: str, *, storage_options: dict[str, Any] | None = None, **kwargs: Any):
    """The committed shards of `split` under `url` as a decoded WebDataset (keyword arguments: `open_shards`)."""
    return open_shards(list_shards(url, split, storage_options), storage_options=storage_options, **kwargs)
