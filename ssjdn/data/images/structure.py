"""Cheap completeness checks on encoded image files: is every part the header promises there, without decoding
a single pixel (tens of microseconds against about a millisecond for a decode of a 256x256 JPEG).

- JPEG: a start-of-scan (SOS) marker after the header segments, and an end-of-image marker (FFD9) after it.
  Bytes after the EOI (NUL/0xFF/whitespace padding, or trailers some tools append) are allowed.
- PNG: signature, IHDR first, every chunk's declared length inside the file, an IDAT, and an IEND chunk with
  its (fixed) CRC; bytes after IEND are allowed.
- TIFF: every strip or tile of the first image (offset + byte count) lies inside the file.

What this cannot see: corrupted entropy-coded / compressed data inside a complete file (a decode finds that).
Every failure raises `ImageDecodeError` naming the file and the reason.
"""

from __future__ import annotations

from collections.abc import Mapping

from ssjdn.data.errors import ImageDecodeError

STRIP_OFFSETS, STRIP_BYTES, TILE_OFFSETS, TILE_BYTES = 273, 279, 324, 325
_JPEG_PADDING = b"\x00\xff \t\r\n"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IEND_CRC = b"\xaeB`\x82"  # CRC-32 of b"IEND": the same in every PNG


def check_jpeg(data: bytes, name: str) -> None:
    sos = _jpeg_scan_start(data)
    if sos is None:
        raise ImageDecodeError(f"{name}: truncated or corrupt JPEG: no start-of-scan (SOS) marker after the header")
    tail = data.rstrip(_JPEG_PADDING)
    if tail.endswith(b"\xff\xd9") and len(tail) - 2 > sos:
        return
    if data.find(b"\xff\xd9", sos) < 0:  # byte stuffing keeps FFD9 out of the scan data: only an EOI matches
        raise ImageDecodeError(
            f"{name}: truncated JPEG: no end-of-image marker (FFD9) after the scan data ({len(data)} bytes)"
        )


def _jpeg_scan_start(data: bytes) -> int | None:
    """Offset of the first SOS marker, found by walking the header segments by their declared lengths."""
    n = len(data)
    pos = 2  # after SOI
    while True:
        pos = data.find(b"\xff", pos)  # decoders skip stray bytes between segments; so do we
        if pos < 0 or pos + 1 >= n:
            return None
        marker = data[pos + 1]
        if marker == 0xDA:
            return pos
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD8:  # no length field
            pos += 2
        elif marker == 0xD9:  # EOI before any scan
            return None
        else:
            if pos + 4 > n:
                return None
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")


def check_png(data: bytes, name: str) -> None:
    n = len(data)
    if not data.startswith(_PNG_SIGNATURE):
        raise ImageDecodeError(f"{name}: corrupt PNG: bad signature")
    pos, index, seen_idat = len(_PNG_SIGNATURE), 0, False
    while pos + 12 <= n:
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if index == 0 and kind != b"IHDR":
            raise ImageDecodeError(f"{name}: corrupt PNG: first chunk is {kind!r}, not IHDR")
        if end > n:
            raise ImageDecodeError(
                f"{name}: truncated PNG: chunk {kind.decode('latin-1')!r} at byte {pos} declares {length} bytes, "
                f"the file ends at byte {n}"
            )
        if kind == b"IEND":
            if data[end - 4 : end] != _IEND_CRC:
                raise ImageDecodeError(f"{name}: corrupt PNG: IEND chunk at byte {pos} has a bad CRC")
            if not seen_idat:
                raise ImageDecodeError(f"{name}: corrupt PNG: no IDAT (pixel data) chunk before IEND")
            return
        seen_idat = seen_idat or kind == b"IDAT"
        pos, index = end, index + 1
    raise ImageDecodeError(f"{name}: truncated PNG: no IEND chunk ({n} bytes, last chunk ends at byte {pos})")


def check_tiff(data: bytes, name: str, tags: Mapping[int, object]) -> bool:
    """Raise when a strip or tile lies past the end of the file. False when the directory lists no byte counts
    (legal for some uncompressed files): the caller decodes instead."""
    tiled = TILE_OFFSETS in tags
    kind = "tile" if tiled else "strip"
    offsets = _ints(tags.get(TILE_OFFSETS if tiled else STRIP_OFFSETS))
    counts = _ints(tags.get(TILE_BYTES if tiled else STRIP_BYTES))
    if not offsets:
        raise ImageDecodeError(f"{name}: corrupt TIFF: no {kind} offsets in the first directory")
    if not counts:
        return False
    if len(counts) < len(offsets):
        raise ImageDecodeError(f"{name}: corrupt TIFF: {len(offsets)} {kind} offsets but {len(counts)} byte counts")
    n = len(data)
    for i, (off, count) in enumerate(zip(offsets, counts)):
        if off + count > n:
            raise ImageDecodeError(
                f"{name}: truncated TIFF: {kind} {i} at byte {off} (+{count} bytes) ends past the end of the file "
                f"({n} bytes)"
            )
    return True


def _ints(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),)
