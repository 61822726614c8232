"""Decode the TIFF layouts Pillow cannot open (more than 4 bands, 2 bands, planar multi-band, 16-bit colour, signed
or float multi-band, multi-band "min-is-black") into a (height, width, bands) numpy array.

The pixels are decoded by tifffile, with imagecodecs for compression: classic TIFF and BigTIFF, first image,
strips or tiles, chunky or planar, 8-64-bit integer and 16-64-bit float samples, every compression imagecodecs
decodes (Deflate, LZW, PackBits, ZSTD, LZMA, JPEG, JPEG 2000, WebP, ...) and the horizontal and floating-point
predictors. The header is read with Pillow's IFD reader (cheaper than opening the file with tifffile, and the
image routing in `ssjdn.data.images` needs it for every TIFF), and checked here first, so that truncated or
unsupported files fail with a precise reason instead of a library exception.
"""

from __future__ import annotations

import io
import struct
from typing import TYPE_CHECKING

from PIL.TiffImagePlugin import ImageFileDirectory_v2

if TYPE_CHECKING:  # imported where used: reading a directory (probing, validation) needs neither numpy nor tifffile
    import numpy as np

WIDTH, LENGTH, BITS, COMPRESSION = 256, 257, 258, 259
STRIP_OFFSETS, SAMPLES, ROWS_PER_STRIP, STRIP_BYTES = 273, 277, 278, 279
PLANAR, PREDICTOR, TILE_WIDTH, TILE_LENGTH, TILE_OFFSETS, TILE_BYTES = 284, 317, 322, 323, 324, 325
SAMPLE_FORMAT = 339


class TiffBandError(ValueError):
    """The TIFF is malformed, truncated or uses a feature this reader does not support (message says which)."""


def is_tiff(data: bytes) -> bool:
    return data[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")


def read_ifd(data: bytes) -> dict[int, object]:
    """The first image file directory as {tag: value or tuple}."""
    if not is_tiff(data):
        raise TiffBandError("not a TIFF file")
    big = data[2:4] in (b"+\0", b"\0+")
    order = "<" if data[:2] == b"II" else ">"
    ifh = data[:16] if big else data[:8]
    if len(ifh) < (16 if big else 8):
        raise TiffBandError(f"truncated: header is cut off ({len(data)} bytes)")
    offset = struct.unpack(order + ("Q" if big else "I"), data[8:16] if big else data[4:8])[0]
    if offset >= len(data):
        raise TiffBandError(f"truncated: first directory at byte {offset} is past the end ({len(data)} bytes)")
    count_size, entry_size = (8, 20) if big else (2, 12)
    if offset + count_size > len(data):
        raise TiffBandError(f"truncated: directory at byte {offset} is cut off ({len(data)} bytes)")
    n = struct.unpack(order + ("Q" if big else "H"), data[offset : offset + count_size])[0]
    if offset + count_size + n * entry_size > len(data):
        raise TiffBandError(f"truncated: directory at byte {offset} with {n} entries is cut off ({len(data)} bytes)")
    ifd = ImageFileDirectory_v2(ifh)
    fp = io.BytesIO(data)
    fp.seek(offset)
    try:
        ifd.load(fp)
    except (struct.error, OSError, ValueError, KeyError) as exc:
        raise TiffBandError(f"unreadable directory: {exc}") from None
    return dict(ifd)


def _tuple(v) -> tuple:
    return v if isinstance(v, tuple) else (v,)


def image_size(tags: dict[int, object]) -> tuple[int, int, int]:
    """(width, height, bands)."""
    try:
        return int(tags[WIDTH]), int(tags[LENGTH]), int(tags.get(SAMPLES, 1))
    except KeyError as exc:
        raise TiffBandError(f"missing required tag {exc}") from None


def decode_bands(data: bytes, tags: dict[int, object] | None = None) -> np.ndarray:
    """Every sample of the first image, as (height, width, bands) in the file's sample type (native byte order)."""
    import numpy as np
    import tifffile

    tags = read_ifd(data) if tags is None else tags
    width, height, bands = image_size(tags)
    _check(data, tags, tifffile)
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            # One thread: callers decode many images in parallel already (thread pools, Ray workers).
            arr, axes = page.asarray(maxworkers=1), page.axes
    except MemoryError:
        raise
    except Exception as exc:  # tifffile and imagecodecs raise many types (TiffFileError, ImcdError, ValueError, ...)
        name = _compression_name(tags, tifffile)
        raise TiffBandError(f"corrupt or undecodable {name} data: {_first_line(exc)}") from None
    if "S" in axes:  # planar files come back samples-first
        arr, axes = np.moveaxis(arr, axes.index("S"), -1), axes.replace("S", "") + "S"
    else:
        arr, axes = arr[..., None], axes + "S"
    if axes != "YXS" or arr.shape != (height, width, bands):
        raise TiffBandError(f"unsupported layout: decoded as {axes} {arr.shape}, header says {height}x{width}x{bands}")
    return arr


def _check(data: bytes, tags: dict[int, object], tifffile) -> None:
    """Refuse, with the reason, what tifffile would decode wrongly or fail on obscurely."""
    bits = set(_tuple(tags.get(BITS, 1)))
    formats = set(_tuple(tags.get(SAMPLE_FORMAT, 1)))
    if len(bits) != 1 or len(formats) != 1:
        raise TiffBandError(f"bands differ in bit depth {sorted(bits)} or sample format {sorted(formats)}")
    compression = int(tags.get(COMPRESSION, 1))
    if compression != 1 and compression not in tifffile.TIFF.DECOMPRESSORS:
        raise TiffBandError(
            f"unsupported compression {compression} ({_compression_name(tags, tifffile)}: no decoder in imagecodecs)"
        )
    predictor = int(tags.get(PREDICTOR, 1))
    if predictor != 1 and predictor not in tifffile.TIFF.UNPREDICTORS:
        raise TiffBandError(f"unsupported predictor {predictor}")
    # tifffile reads what is there of a strip or tile that runs past the end: check that each one is complete.
    tiled = TILE_OFFSETS in tags
    offsets = _tuple(tags.get(TILE_OFFSETS if tiled else STRIP_OFFSETS, ()))
    counts = _tuple(tags.get(TILE_BYTES if tiled else STRIP_BYTES, ()))
    if not offsets:
        raise TiffBandError(f"no {'tile' if tiled else 'strip'} offsets in the first directory")
    for off, n in zip(offsets, counts):
        if int(off) + int(n) > len(data):
            raise TiffBandError(f"truncated: data chunk at byte {off} (+{n}) is past the end ({len(data)} bytes)")


def _compression_name(tags: dict[int, object], tifffile) -> str:
    code = int(tags.get(COMPRESSION, 1))
    if code == 1:
        return "uncompressed"
    try:
        return tifffile.COMPRESSION(code).name
    except ValueError:
        return "unknown"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
