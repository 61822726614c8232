"""Reading one large JSON document piece by piece: `{"images": [item, item, ...], "dataset": ...}` yields its items
one at a time, so a caption file of any size is parsed in bounded memory.

The parsing is ijson's (its C backend `yajl2_c` when installed, which is the normal case; otherwise the best
backend ijson finds, `ijson.backend`). Three steps, all over the same file:

1. the head: ijson's event stream up to the start of the array (normally a few bytes) checks that the document is
   an object with an array under `array_key` and decodes the members before it;
2. the array: `ijson.items(..., "<array_key>.item")` builds each item in C, one 64 KiB read at a time (memory
   stays at about one read's worth of items); the last `TAIL_BYTES` of the file are handed to ijson one byte at a
   time, so the byte where the last item ends is known exactly;
3. the tail: the members after the array are decoded from the bytes after that item (a file whose members after
   the array do not fit in `TAIL_BYTES`, or whose array is empty, is walked a second time with ijson's events).

ijson's errors name no position, so on malformed JSON the file is parsed again up to the failing read and then
one byte at a time: the message names the line, column and byte offset where the parser stopped, and its reason.
Invalid UTF-8 is reported as `read_text` reports it (byte offset and line).

Numbers follow the C parser: integers beyond 64 bits and floats beyond double range are refused ("integer
overflow", "numeric (floating point) overflow"), as are NaN / Infinity (which `json.loads` accepts).
"""

from __future__ import annotations

import ast
import codecs
import io
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ijson

from ssjdn.data.errors import DatasetFormatError


def _pick_backend():
    try:
        return ijson.get_backend("yajl2_c")
    except ImportError:  # no compiled extension on this platform: ijson's own choice (same results, slower)
        return ijson.get_backend(ijson.backend)


BACKEND = _pick_backend()
CHUNK_BYTES = 1 << 16  # one read; ijson's own default
HEAD_CHUNK_BYTES = 1 << 12  # reads while looking for the start of the array (events there are handled in Python)
TAIL_BYTES = 1 << 10  # the end of the file is read one byte at a time, to find where the array's last item ends
_BOM = b"\xef\xbb\xbf"
_WS = b" \t\n\r"
_CONTINUATION = bytes(range(0x80, 0xC0))  # UTF-8 continuation bytes: deleting them leaves one byte per character
_ERRORS = (ijson.JSONError, UnicodeDecodeError)


class _Reader:
    """The file as ijson reads it: from `start` (past a BOM), at most `chunk` bytes a read, one byte a read from
    offset `fine_from` on. `last` is where the latest read began, `pos` where it ended (absolute offsets)."""

    def __init__(self, path: Path, start: int, chunk: int, fine_from: int | None = None) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close(), used as a context manager
        self._file.seek(start)
        self.pos = self.last = start
        self.chunk = chunk
        self.fine_from = fine_from if fine_from is not None else float("inf")

    def read(self, n: int = -1) -> bytes:
        if n == 0:  # ijson's probe for bytes vs text
            return b""
        n = 1 if self.pos >= self.fine_from else min(self.chunk, self.fine_from - self.pos)
        data = self._file.read(n)
        self.last, self.pos = self.pos, self.pos + len(data)
        return data

    @property
    def fine(self) -> bool:
        """Whether the latest read was a single byte (so what completed in it ends exactly at `pos`)."""
        return self.last >= self.fine_from

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stream_object_array(path: str | Path, array_key: str, fields: dict[str, Any]) -> Iterator[Any]:
    """Yield the items of the list under `array_key` of the top-level JSON object in `path`, one at a time.

    The object's other members are decoded whole and stored in `fields` (complete once the generator is
    exhausted: a member may follow the array). Raises `DatasetFormatError` naming the line, column and byte offset
    of malformed JSON, or saying that the document is not an object holding an `array_key` list.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = len(_BOM) if f.read(len(_BOM)) == _BOM else 0
    if not _walk(path, start, array_key, fields, head_only=True):
        raise DatasetFormatError(f"{path}: expected a JSON object with an {array_key!r} list")

    end = None  # offset just past the last item, when it is known exactly
    with _Reader(path, start, CHUNK_BYTES, fine_from=max(start, size - TAIL_BYTES)) as reader:
        items = BACKEND.items(reader, f"{array_key}.item", use_float=True, buf_size=CHUNK_BYTES)
        while True:
            try:
                item = next(items)
            except StopIteration:
                break
            except _ERRORS as exc:
                raise _malformed(path, start, exc, hint=reader.last) from None
            # A container ends with its closing bracket, so a single-byte read that completed it ends right there.
            end = reader.pos if reader.fine and isinstance(item, (dict, list)) else None
            yield item
    if end is None or not _tail(path, end, fields):
        _walk(path, start, array_key, fields, head_only=False)


def _walk(path: Path, start: int, key: str, fields: dict[str, Any], *, head_only: bool) -> bool:
    """Check the document's shape with ijson's events and store its members other than the `key` array in `fields`.

    `head_only`: stop at the start of the array (True when found). Otherwise walk the whole document, skipping the
    array's items, and return whether the array was found.
    """
    with _Reader(path, start, HEAD_CHUNK_BYTES if head_only else CHUNK_BYTES) as reader:
        events = BACKEND.parse(reader, use_float=True, buf_size=reader.chunk)
        try:
            first = next(events, None)
            if first is None or first[1] != "start_map":
                raise DatasetFormatError(
                    f"{path}: expected a JSON object with an {key!r} list, found a JSON value that is not an object"
                )
            found = False
            for prefix, event, value in events:
                if prefix or event != "map_key":
                    continue  # the top-level object's end (trailing data is still parsed, and refused)
                _, event, first_value = next(events)
                if value == key and not found:
                    if event != "start_array":
                        raise DatasetFormatError(f"{path}: {key!r} must be a list")
                    found = True
                    if head_only:
                        return True
                    for inner, event, _ in events:  # the items (already streamed) are not built again
                        if event == "end_array" and inner == key:
                            break
                else:
                    fields[value] = _build(event, first_value, events)
            return found
        except _ERRORS as exc:
            if not _has_content(path, start):
                raise DatasetFormatError(
                    f"{path}: expected a JSON object with an {key!r} list, found empty file"
                ) from None
            raise _malformed(path, start, exc, hint=reader.last) from None


def _build(event: str, value: Any, events: Iterator) -> Any:
    """The value whose first event is (`event`, `value`), taking the rest of its events from `events`."""
    if event not in ("start_map", "start_array"):
        return value
    builder = ijson.ObjectBuilder()
    builder.event(event, value)
    depth = 1
    for _, event, value in events:
        builder.event(event, value)
        if event in ("start_map", "start_array"):
            depth += 1
        elif event in ("end_map", "end_array"):
            depth -= 1
            if not depth:
                break
    return builder.value


def _tail(path: Path, end: int, fields: dict[str, Any]) -> bool:
    """Decode the members after the array, from the bytes past its last item (`end`); False when they do not
    have the expected shape (the caller then walks the whole document instead)."""
    with open(path, "rb") as f:
        f.seek(end)
        rest = f.read().lstrip(_WS)
    if not rest.startswith(b"]"):
        return False
    rest = rest[1:].lstrip(_WS)
    if rest.rstrip(_WS) == b"}":
        return True
    if not rest.startswith(b","):
        return False
    try:
        members = list(BACKEND.kvitems(io.BytesIO(b"{" + rest[1:]), "", use_float=True))
    except _ERRORS:
        return False
    fields.update(members)
    return True


# -- errors ----------------------------------------------------------------------------------------------------


def _has_content(path: Path, start: int) -> bool:
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(CHUNK_BYTES):
            if chunk.strip(_WS):
                return True
    return False


def _malformed(path: Path, start: int, exc: Exception, *, hint: int | None = None) -> DatasetFormatError:
    """A one-line error naming where the parser stopped (re-parsing up to there) and why."""
    offset = _error_offset(path, start, hint)
    bad = _invalid_utf8(path, start, offset)
    if bad is not None:
        at, reason, byte = bad
        return DatasetFormatError(
            f"{path}: not valid UTF-8 at byte offset {at} (line {_line_col(path, start, at)[0]}): {reason} "
            f"(byte 0x{byte:02x}); re-encode the file as UTF-8"
        )
    if offset is None:
        return DatasetFormatError(f"{path}: malformed JSON: {_reason(exc)}")
    line, col = _line_col(path, start, offset)
    return DatasetFormatError(
        f"{path}: malformed JSON at line {line}, column {col} (byte offset {offset}): {_reason(exc)}"
    )


def _error_offset(path: Path, start: int, hint: int | None) -> int | None:
    """The byte offset at which the parser fails: parse again up to the read that failed (`hint`, found by a first
    pass when not given), then one byte at a time. The end of the file for a document that stops too early."""
    fine_from = hint
    for _ in range(3):
        with _Reader(path, start, CHUNK_BYTES, fine_from=fine_from) as reader:
            try:
                deque(BACKEND.basic_parse(reader, use_float=True, buf_size=CHUNK_BYTES), maxlen=0)
            except _ERRORS:
                if reader.fine:
                    return reader.pos - 1 if reader.pos > reader.last else reader.pos
                fine_from = reader.last
            else:
                return None
    return None


def _invalid_utf8(path: Path, start: int, upto: int | None) -> tuple[int, str, int] | None:
    """(offset, reason, byte) of the first invalid UTF-8 at or before `upto` (anywhere when None)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        size = f.seek(0, io.SEEK_END)
        stop = size if upto is None else min(size, upto + 4)  # a sequence starting at `upto` is up to 4 bytes
        f.seek(start)
        pos = start
        while pos < stop:
            chunk = f.read(min(CHUNK_BYTES, stop - pos))
            if not chunk:
                break
            pos += len(chunk)
            try:
                decoder.decode(chunk, final=pos >= size)
            except UnicodeDecodeError as exc:
                at = pos - len(exc.object) + exc.start  # exc.object: the decoder's pending bytes + this chunk
                return (at, exc.reason, exc.object[exc.start]) if upto is None or at <= upto else None
    return None


def _line_col(path: Path, start: int, offset: int) -> tuple[int, int]:
    """1-based line and column (in characters; a BOM does not count) of byte `offset`."""
    line, col, pos = 1, 0, start
    with open(path, "rb") as f:
        f.seek(start)
        while pos < offset:
            chunk = f.read(min(CHUNK_BYTES, offset - pos))
            if not chunk:
                break
            pos += len(chunk)
            newlines = chunk.count(b"\n")
            if newlines:
                line, col = line + newlines, 0
                chunk = chunk[chunk.rfind(b"\n") + 1 :]
            col += len(chunk.translate(None, _CONTINUATION))
    return line, col + 1


def _reason(exc: Exception) -> str:
    """The first line of ijson's message (yajl adds the text around the error on the next lines)."""
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid UTF-8: {exc.reason}"
    text = str(exc)
    if text[:2] in ("b'", 'b"'):  # some yajl messages arrive as the repr of bytes
        try:
            text = ast.literal_eval(text).decode("utf-8", "replace")
        except (ValueError, SyntaxError):
            pass
    reason = text.strip().splitlines()[0].strip().rstrip(".") if text.strip() else type(exc).__name__
    return reason
