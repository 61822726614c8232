"""Opening scenes with rasterio/GDAL: the GDAL environment (block cache cap, S3 endpoint, credentials) and the
mapping of fsspec URLs to GDAL paths.

S3 objects are read by GDAL's `/vsis3/` driver, which fetches only the byte ranges a read needs (a COG's header,
then the tiles of each window). The endpoint comes from `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (or the
`endpoint_url` storage option), credentials from boto3's usual chain through a `rasterio.session.AWSSession`:
they reach GDAL as session options, never through logged configuration, and `CPL_CURL_VERBOSE` stays off.
http(s) URLs go through `/vsicurl/`; any other fsspec protocol (memory://, gs://, ...) is read through fsspec
file objects (`rasterio.open(..., opener=)`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from fsspec.utils import get_protocol

from pipelines.fsio import get_fs

# GDAL's block cache (per process). Its default is 5% of RAM (1.2 GB on a 24 GB machine): reading a large
# scene window by window would then keep up to that much of it in memory. 64 MB holds a few rows of 512x512
# blocks of a 13-band scene, enough for windows that share blocks with their neighbours.
GDAL_CACHE_MB = 64

_BASE_OPTIONS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no folder listing per open (one LIST request per scene on S3)
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",  # adjacent tiles of a window: one range request
    "GDAL_HTTP_MULTIPLEX": "YES",
    "GDAL_HTTP_MAX_RETRY": "3",  # 429/5xx answers; connection failures are retried by the job
    "GDAL_HTTP_RETRY_DELAY": "0.5",
    "GDAL_HTTP_CONNECTTIMEOUT": "10",
    "GDAL_HTTP_TIMEOUT": "60",
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": str(8 << 20),
    "CPL_VSIL_CURL_CACHE_SIZE": str(32 << 20),
    "GTIFF_REPORT_COMPD_CS": "NO",
}


def s3_endpoint(storage_options: dict[str, Any] | None = None) -> str | None:
    opts = storage_options or {}
    return (
        opts.get("endpoint_url")
        or (opts.get("client_kwargs") or {}).get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )


def gdal_options(
    cache_mb: int = GDAL_CACHE_MB, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """GDAL configuration for reading scenes: block cache cap and, for S3, the endpoint (no credentials)."""
    opts: dict[str, Any] = {**_BASE_OPTIONS, "GDAL_CACHEMAX": int(cache_mb)}
    endpoint = s3_endpoint(storage_options)
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        opts["AWS_S3_ENDPOINT"] = parts.netloc + parts.path.rstrip("/")
        opts["AWS_HTTPS"] = "YES" if parts.scheme == "https" else "NO"
        opts["AWS_VIRTUAL_HOSTING"] = (
            "FALSE"  # path-style requests: what custom endpoints (MinIO, moto) serve
        )
    region = (storage_options or {}).get("client_kwargs", {}).get("region_name") or os.environ.get(
        "AWS_REGION"
    )
    if region:
        opts["AWS_REGION"] = region
    return opts


def _aws_session(storage_options: dict[str, Any] | None):
    from rasterio.session import AWSSession

    opts = storage_options or {}
    if opts.get("anon"):
        return AWSSession(aws_unsigned=True)
    # s3fs's names for explicit credentials; otherwise boto3's chain (AWS_* variables, profiles, instance role).
    return AWSSession(
        aws_access_key_id=opts.get("key"),
        aws_secret_access_key=opts.get("secret"),
        aws_session_token=opts.get("token"),
        profile_name=opts.get("profile"),
    )


_ENV = threading.local()


@contextlib.contextmanager
def gdal_env(
    *, s3: bool = False, cache_mb: int = GDAL_CACHE_MB, storage_options: dict[str, Any] | None = None
) -> Iterator[None]:
    """`rasterio.Env` for reading scenes; with `s3=True` an AWS session carries the credentials. Re-entrant:
    a nested call inside an active one (same thread) reuses it."""
    import rasterio

    if getattr(_ENV, "depth", 0):
        _ENV.depth += 1
        try:
            yield
        finally:
            _ENV.depth -= 1
        return
    session = _aws_session(storage_options) if s3 else None
    kwargs = {"session": session} if session is not None else {}
    with rasterio.Env(**kwargs, **gdal_options(cache_mb, storage_options)):
        _ENV.depth = 1
        try:
            yield
        finally:
            _ENV.depth = 0


def gdal_path(url: str) -> str | None:
    """The path GDAL opens for `url`, or None when it has to go through an fsspec file object."""
    proto = get_protocol(url)
    if proto == "file":
        return url.removeprefix("file://")
    if proto in ("s3", "s3a"):
        return "/vsis3/" + url.split("://", 1)[1]
    if proto in ("http", "https"):
        return "/vsicurl/" + url
    return None


def open_raster(url: str, storage_options: dict[str, Any] | None = None):
    """Open a scene for reading (inside `gdal_env`)."""
    import rasterio

    path = gdal_path(url)
    if path is not None:
        return rasterio.open(path)
    fs, _ = get_fs(url, storage_options)
    return rasterio.open(url, opener=functools.partial(_fsspec_open, fs))


def _fsspec_open(fs, path: str, mode: str = "rb"):
    return fs.open(path, mode if "b" in mode else mode + "b")


def needs_s3(urls) -> bool:
    return any(get_protocol(u) in ("s3", "s3a") for u in urls)


# ---------------------------------------------------------------------------------------------- errors

# GDAL reports network trouble and broken data alike as RasterioIOError; the message tells them apart.
_TRANSIENT_HINTS = (
    "curl error",
    "couldn't connect",
    "could not connect",
    "failed to connect",
    "connection refused",
    "connection reset",
    "timed out",
    "timeout",
    "could not resolve",
    "http response code: 5",
    "http error 5",
    "empty reply",
    "recv failure",
    "send failure",
    "ssl connect",
)
_MISSING_HINTS = ("no such file", "does not exist", "http response code: 404", "nosuchkey", "not found")


def is_transient_read_error(exc: BaseException) -> bool:
    """A read that failed on the network (worth retrying), not on the data."""
    text = str(exc).lower()
    return any(h in text for h in _TRANSIENT_HINTS) and "404" not in text


def describe_open_error(url: str, exc: BaseException) -> str:
    """One line: why `url` could not be opened as a raster."""
    text = " ".join(str(exc).split())
    low = text.lower()
    if isinstance(exc, FileNotFoundError) or any(h in low for h in _MISSING_HINTS):
        return f"{url}: not found ({text})"
    if "not recognized as" in low or "not a supported file format" in low or "not recognised" in low:
        return f"{url}: not a raster GDAL can read ({text})"
    if is_transient_read_error(exc):
        return f"{url}: unreachable ({text})"
    return f"{url}: cannot open ({type(exc).__name__}: {text})"
