"""Decode the TIFF layouts Pillow cannot open (more than 4 bands, 2 bands, planar multi-band, signed or float
multi-band, multi-band "min-is-black") into a (height, width, bands) numpy array.

Baseline TIFF and BigTIFF, first image only; strips or tiles; chunky or planar; no compression, Deflate,
PackBits or LZW; horizontal-difference predictor; 8/16/32/64-bit unsigned, signed and float samples.
Tags are parsed with Pillow's own IFD reader.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import TYPE_CHECKING

from PIL.TiffImagePlugin import ImageFileDirectory_v2

if TYPE_CHECKING:  # imported where used: reading a directory (probing, validation) needs no numpy
    import numpy as np

WIDTH, LENGTH, BITS, COMPRESSION = 256, 257, 258, 259
STRIP_OFFSETS, SAMPLES, ROWS_PER_STRIP, STRIP_BYTES = 273, 277, 278, 279
PLANAR, PREDICTOR, TILE_WIDTH, TILE_LENGTH, TILE_OFFSETS, TILE_BYTES = 284, 317, 322, 323, 324, 325
SAMPLE_FORMAT = 339
_KIND = {1: "u", 2: "i", 3: "f"}


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
    import numpy as np

    tags = read_ifd(data) if tags is None else tags
    width, height, bands = image_size(tags)
    bits = set(_tuple(tags.get(BITS, 1)))
    formats = set(_tuple(tags.get(SAMPLE_FORMAT, 1)))
    if len(bits) != 1 or len(formats) != 1:
        raise TiffBandError(f"bands differ in bit depth {sorted(bits)} or sample format {sorted(formats)}")
    nbits, fmt = bits.pop(), formats.pop()
    if nbits not in (8, 16, 32, 64) or fmt not in _KIND or (fmt == 3 and nbits < 32):
        raise TiffBandError(f"unsupported sample type: {nbits}-bit, SampleFormat {fmt}")
    order = "<" if data[:2] == b"II" else ">"
    dtype = np.dtype(f"{order}{_KIND[fmt]}{nbits // 8}")
    compression = int(tags.get(COMPRESSION, 1))
    predictor = int(tags.get(PREDICTOR, 1))
    if predictor not in (1, 2) or (predictor == 2 and fmt == 3):
        raise TiffBandError(f"unsupported predictor {predictor}")
    planar = int(tags.get(PLANAR, 1)) == 2
    per_chunk = 1 if planar else bands
    out = np.zeros((bands, height, width) if planar else (height, width, bands), dtype=dtype)

    if TILE_OFFSETS in tags:
        tw, tl = int(tags[TILE_WIDTH]), int(tags[TILE_LENGTH])
        offsets, counts = _tuple(tags[TILE_OFFSETS]), _tuple(tags.get(TILE_BYTES, ()))
        across, down = -(-width // tw), -(-height // tl)
        chunk_shape = (tl, tw, per_chunk)
        places = [
            (p, ty * tl, tx * tw) for p in range(bands if planar else 1) for ty in range(down) for tx in range(across)
        ]
    else:
        rps = min(int(tags.get(ROWS_PER_STRIP, height)), height)
        offsets, counts = _tuple(tags.get(STRIP_OFFSETS, ())), _tuple(tags.get(STRIP_BYTES, ()))
        per_plane = -(-height // rps)
        chunk_shape = (rps, width, per_chunk)
        places = [(p, s * rps, 0) for p in range(bands if planar else 1) for s in range(per_plane)]
    if len(offsets) < len(places) or len(counts) < len(places):
        raise TiffBandError(f"expected {len(places)} data chunks, directory lists {len(offsets)}")
    row_bytes = chunk_shape[1] * per_chunk * dtype.itemsize
    for (plane, y, x), off, n in zip(places, offsets, counts):
        if off + n > len(data):
            raise TiffBandError(f"truncated: data chunk at byte {off} (+{n}) is past the end ({len(data)} bytes)")
        # Tiles are always full size; the last strip of a plane holds only the remaining rows.
        rows = chunk_shape[0] if TILE_OFFSETS in tags else min(chunk_shape[0], height - y)
        expected = rows * row_bytes
        raw = _decompress(data[off : off + n], compression, expected)
        if len(raw) < expected:
            raise TiffBandError(f"truncated: data chunk at byte {off} decodes to {len(raw)} of {expected} bytes")
        chunk = np.frombuffer(raw[:expected], dtype=dtype).reshape(rows, chunk_shape[1], per_chunk)
        if predictor == 2:
            chunk = np.cumsum(chunk, axis=1, dtype=dtype)
        h = min(chunk.shape[0], height - y)
        w = min(chunk.shape[1], width - x)
        if planar:
            out[plane, y : y + h, x : x + w] = chunk[:h, :w, 0]
        else:
            out[y : y + h, x : x + w] = chunk[:h, :w]
    return np.moveaxis(out, 0, -1) if planar else out


def _decompress(raw: bytes, compression: int, expected: int) -> bytes:
    if compression == 1:
        return raw
    if compression in (8, 32946):
        try:
            d = zlib.decompressobj()
            return d.decompress(raw, expected)  # bounded: a bomb cannot expand past the declared size
        except zlib.error as exc:
            raise TiffBandError(f"corrupt Deflate data: {exc}") from None
    if compression == 32773:
        return _unpackbits(raw, expected)
    if compression == 5:
        return _lzw_decode(raw, expected)
    raise TiffBandError(f"unsupported compression {compression} (supported: none, Deflate, PackBits, LZW)")


def _unpackbits(raw: bytes, limit: int) -> bytes:
    out = bytearray()
    i = 0
    while i < len(raw) and len(out) < limit:
        n = raw[i]
        i += 1
        if n < 128:
            out += raw[i : i + n + 1]
            i += n + 1
        elif n > 128:
            if i < len(raw):
                out += bytes([raw[i]]) * (257 - n)
            i += 1
    return bytes(out[:limit])


def _lzw_decode(raw: bytes, limit: int) -> bytes:
    """TIFF LZW (MSB-first codes, early change)."""
    table = [bytes([i]) for i in range(256)] + [b"", b""]
    out = bytearray()
    bitbuf = nbits = pos = 0
    width, prev = 9, b""
    while len(out) < limit:
        while nbits < width and pos < len(raw):
            bitbuf = (bitbuf << 8) | raw[pos]
            pos += 1
            nbits += 8
        if nbits < width:
            break
        nbits -= width
        code = (bitbuf >> nbits) & ((1 << width) - 1)
        bitbuf &= (1 << nbits) - 1
        if code == 257:  # end of information
            break
        if code == 256:  # clear table
            del table[258:]
            width, prev = 9, b""
            continue
        if code < len(table):
            entry = table[code]
            if prev:
                table.append(prev + entry[:1])
        elif code == len(table) and prev:
            entry = prev + prev[:1]
            table.append(entry)
        else:
            raise TiffBandError("corrupt LZW data")
        out += entry
        prev = entry
        if len(table) + 1 >= (1 << width) and width < 12:
            width += 1
    return bytes(out[:limit])
