"""Reading and decoding images with Pillow: JPEG, PNG, TIFF (multi-band included), always to 8-bit RGB.

Rules (also in docs/data-formats.md):
- bands: 1 band -> grey copied to R, G, B; 2 bands -> the first as grey; 3+ bands -> the first three as R, G, B
  (RGBA drops alpha; CMYK and palette images use Pillow's colour conversion);
- depth: 8-bit unchanged; unsigned 16-bit -> the high byte (v >> 8), the same for every image so brightness stays
  comparable (Pillow's own rule for 16-bit RGB); any other type (signed, 32/64-bit, float) -> a linear stretch of
  the kept bands from their minimum to their maximum onto 0..255, one factor for all bands; NaN -> 0;
- size: images over `MAX_IMAGE_PIXELS` (env `SSJDN_MAX_IMAGE_PIXELS`, default Pillow's 89,478,485) are refused
  before their pixels are decoded (decompression-bomb guard); Pillow's own hard limit is twice its default.
Every failure raises `ImageDecodeError` naming the file and the reason.
Validation (`check_image`) has two levels: "full" decodes every pixel; "structure" reads the header and checks
that the file is complete without decoding pixels (`structure.py`; formats it has no check for are decoded).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from ssjdn.data.errors import ImageDecodeError
from ssjdn.data.images import structure, tiff_bands

if TYPE_CHECKING:  # numpy is imported where it is used: most callers (e.g. shard writers) never need it
    import numpy as np

MAX_IMAGE_PIXELS = int(os.environ.get("SSJDN_MAX_IMAGE_PIXELS", 89_478_485))
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, TypeError)
VALIDATION_LEVELS = ("structure", "full")

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "ImageDecodeError",
    "ImageInfo",
    "VALIDATION_LEVELS",
    "bands_to_rgb",
    "check_image",
    "decode_image",
    "probe_image",
    "read_image_bytes",
    "to_rgb",
]


@dataclass(frozen=True)
class ImageInfo:
    format: str  # "JPEG", "PNG", "TIFF", ...
    width: int
    height: int
    mode: str  # Pillow mode, or e.g. "6xuint16" for a multi-band TIFF Pillow cannot represent


def read_image_bytes(source: str | os.PathLike) -> bytes:
    """The encoded bytes of a local file or any fsspec URL (s3://, http://, file://...).

    A missing file raises FileNotFoundError (naming it); other read failures raise OSError as-is.
    """
    source = os.fspath(source)
    if "://" in source:
        import fsspec

        with fsspec.open(source, "rb") as f:
            return f.read()
    with open(source, "rb") as f:  # not Path.read_bytes(): its path parsing doubles the cost of a small read
        return f.read()


def probe_image(data: bytes, name: str, *, max_pixels: int | None = None) -> ImageInfo:
    """Format, size and mode from the header only (fast; does not detect truncated pixel data)."""
    _check_not_empty(data, name)
    if tiff_bands.is_tiff(data):
        info = _probe_tiff_bands(data, name)
        if info is not None:
            _check_size(info.width, info.height, name, max_pixels)
            return info
    with _open(data, name) as im:
        _check_size(im.width, im.height, name, max_pixels)
        return ImageInfo(im.format or "unknown", im.width, im.height, im.mode)


def decode_image(data: bytes, name: str, *, max_pixels: int | None = None) -> Image.Image:
    """Decode every pixel and return an 8-bit RGB image (see the module rules)."""
    return _decode(data, name, max_pixels=max_pixels, draft=False)


def check_image(data: bytes, name: str, *, max_pixels: int | None = None, level: str = "full") -> ImageInfo:
    """Prove the file is a readable image and return its header info; the file is opened once.

    `level="full"`: decode every pixel (truncation and corrupt pixel data are caught). JPEGs are decoded in
    Pillow's draft mode (DCT scaled by 1/8): the whole entropy-coded stream is still read, at a fraction of the
    cost. `level="structure"`: the header plus `structure`'s completeness checks (JPEG SOS + EOI, PNG chunks up
    to IEND, TIFF strips/tiles inside the file), no pixel decoding; other formats are decoded as in "full".
    Corrupt entropy-coded data inside a complete file passes "structure" (readers skip such samples).
    """
    if level not in VALIDATION_LEVELS:
        raise ValueError(f"validation level {level!r}: expected one of {', '.join(VALIDATION_LEVELS)}")
    _check_not_empty(data, name)
    if tiff_bands.is_tiff(data):
        tags = _band_tiff_tags(data, name)
        if tags is not None:  # a layout Pillow cannot open: the band reader's own header
            info = _band_tiff_info(tags, name)
            _check_size(info.width, info.height, name, max_pixels)
            if level == "full" or not structure.check_tiff(data, name, tags):
                _decode_tiff_bands(data, name, max_pixels, tags)
            return info
    if level == "structure":
        plain_jpeg = structure.jpeg_info(data, name)  # the common case, without Pillow
        if plain_jpeg is not None:
            _check_size(plain_jpeg[0], plain_jpeg[1], name, max_pixels)
            return ImageInfo("JPEG", *plain_jpeg)
    im = _open(data, name)
    _check_size(im.width, im.height, name, max_pixels)
    info = ImageInfo(im.format or "unknown", im.width, im.height, im.mode)
    if level == "structure" and _check_structure(im, data, name):
        return info
    _load(im, name, draft=True)
    return info


def _check_structure(im: Image.Image, data: bytes, name: str) -> bool:
    """True when the format has a structural check and it passed (raises when it failed); False: decode it."""
    if im.format in ("JPEG", "MPO"):  # MPO: a JPEG with more pictures appended (checked up to the first EOI)
        structure.check_jpeg(data, name)
        return True
    if im.format == "PNG":
        structure.check_png(data, name)
        return True
    if im.format == "TIFF":
        return structure.check_tiff(data, name, im.tag_v2)
    return False


def _decode(data: bytes, name: str, *, max_pixels: int | None, draft: bool) -> Image.Image:
    _check_not_empty(data, name)
    if tiff_bands.is_tiff(data):
        tags = _band_tiff_tags(data, name)
        if tags is not None:
            return _decode_tiff_bands(data, name, max_pixels, tags)
    # No `with`: the source is an in-memory buffer, and the decoded image must outlive this call.
    im = _open(data, name)
    _check_size(im.width, im.height, name, max_pixels)
    return _load(im, name, draft=draft)


def _load(im: Image.Image, name: str, *, draft: bool) -> Image.Image:
    """Decode an opened image's pixels and convert them to RGB."""
    fmt = im.format or "image"
    try:
        if draft and im.format == "JPEG":
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
        im.load()
        return to_rgb(im)
    except _PILLOW_ERRORS as exc:
        raise ImageDecodeError(f"{name}: truncated or corrupt {fmt} data: {exc}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "RGBX", "RGBa"):
        return im.convert("RGB")
    if im.mode in ("L", "LA", "La", "1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        return im.convert("RGB")
    # Wide single-band modes (I;16*, I, F): apply the depth rule on the raw values.
    import numpy as np

    arr = np.asarray(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 0xFFFF):
        arr = arr.astype(np.uint16)
    return bands_to_rgb(arr[:, :, None] if arr.ndim == 2 else arr)


def bands_to_rgb(arr: np.ndarray) -> Image.Image:
    """(H, W, B) samples of any numeric type -> 8-bit RGB by the band and depth rules above."""
    import numpy as np

    if arr.ndim != 3 or arr.shape[2] < 1:
        raise ValueError(f"expected (height, width, bands), got shape {arr.shape}")
    kept = arr[:, :, :3] if arr.shape[2] >= 3 else np.repeat(arr[:, :, :1], 3, axis=2)
    if kept.dtype == np.uint8:
        out = kept
    elif kept.dtype.kind == "u" and kept.dtype.itemsize == 2:
        out = (kept >> 8).astype(np.uint8)
    else:
        values = np.nan_to_num(kept.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(values.min()), float(values.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        out = np.clip(np.rint((values - lo) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(out), "RGB")


def _check_not_empty(data: bytes, name: str) -> None:
    if not data:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")


def _check_size(width: int, height: int, name: str, max_pixels: int | None) -> None:
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if width * height > limit:
        raise ImageDecodeError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {limit} "
            "(possible decompression bomb; raise SSJDN_MAX_IMAGE_PIXELS if the image is genuine)"
        )


def _open(data: bytes, name: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{name}: exceeds Pillow's decompression-bomb limit: {exc}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"{name}: not a recognised image ({len(data)} bytes, {_kind_of(data)}); expected JPEG, PNG or TIFF"
        ) from None
    except _PILLOW_ERRORS as exc:
        raise ImageDecodeError(f"{name}: truncated or corrupt image header: {exc}") from None


_SIGNATURES = ((b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive"), (b"\x1f\x8b", "gzip data"))


def _kind_of(data: bytes) -> str:
    """What a file that is not an image looks like, in words. Never its bytes: a message ends up in logs and
    quarantine reports, and the file may be anything (a link to a secret, a credentials file)."""
    for magic, kind in _SIGNATURES:
        if data.startswith(magic):
            return kind
    head = data[:512]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = head[: exc.start].decode("utf-8") if exc.start > len(head) - 4 else None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "looks like HTML or XML" if text.lstrip().startswith("<") else "looks like text"
    return "binary data of no known image format"


def _pillow_can_decode_tiff(tags: dict) -> bool:
    """Whether Pillow handles this TIFF itself: 8-bit grey or 3-4 band colour, bilevel, 16-bit unsigned grey.

    Everything else (more bands, 2 bands, 16-bit colour, signed or float data) goes through `tiff_bands`, so the
    band and depth rules are applied by one piece of code.
    """
    bands = int(tags.get(tiff_bands.SAMPLES, 1))
    photometric = int(tags.get(262, 1))
    bits = set(tiff_bands._tuple(tags.get(tiff_bands.BITS, 1)))
    unsigned = set(tiff_bands._tuple(tags.get(tiff_bands.SAMPLE_FORMAT, 1))) <= {1}
    if not unsigned:
        return False
    if bands == 1:
        return bits <= {1, 8, 16}
    return bits == {8} and bands in (3, 4) and photometric in (2, 5, 6)


def _probe_tiff_bands(data: bytes, name: str) -> ImageInfo | None:
    """Header info for a TIFF that needs the band reader; None when Pillow can decode it itself."""
    tags = _band_tiff_tags(data, name)
    return None if tags is None else _band_tiff_info(tags, name)


def _band_tiff_tags(data: bytes, name: str) -> dict | None:
    """The first directory of a TIFF that needs the band reader; None when Pillow can decode it itself."""
    try:
        tags = tiff_bands.read_ifd(data)
    except tiff_bands.TiffBandError as exc:
        raise ImageDecodeError(f"{name}: TIFF {exc}") from None
    return None if _pillow_can_decode_tiff(tags) else tags


def _band_tiff_info(tags: dict, name: str) -> ImageInfo:
    try:
        width, height, bands = tiff_bands.image_size(tags)
    except tiff_bands.TiffBandError as exc:
        raise ImageDecodeError(f"{name}: TIFF {exc}") from None
    bits = tiff_bands._tuple(tags.get(tiff_bands.BITS, 1))[0]
    kind = {1: "uint", 2: "int", 3: "float"}.get(tiff_bands._tuple(tags.get(tiff_bands.SAMPLE_FORMAT, 1))[0], "?")
    return ImageInfo("TIFF", width, height, f"{bands}x{kind}{bits}")


def _decode_tiff_bands(data: bytes, name: str, max_pixels: int | None, tags: dict | None = None) -> Image.Image:
    try:
        tags = tiff_bands.read_ifd(data) if tags is None else tags
        width, height, _ = tiff_bands.image_size(tags)
        _check_size(width, height, name, max_pixels)
        return bands_to_rgb(tiff_bands.decode_bands(data, tags))
    except tiff_bands.TiffBandError as exc:
        raise ImageDecodeError(f"{name}: TIFF {exc}") from None
