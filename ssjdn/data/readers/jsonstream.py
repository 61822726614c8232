"""Reading one large JSON document piece by piece: `{"images": [item, item, ...], "dataset": ...}` yields its items
one at a time, so a caption file of any size is parsed in bounded memory.

Each value is decoded by the standard library's C scanner (`json.JSONDecoder.raw_decode`) from a text buffer that
is refilled in chunks and trimmed behind the cursor; only the bracket and comma structure of the top-level object
and of the streamed array is walked here. Errors name the line and column, as `json.loads` would.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ssjdn.data.errors import DatasetFormatError

CHUNK_CHARS = 1 << 20
_WS = re.compile(r"[ \t\n\r]*")
# A decode error this close to the end of the buffer may just mean the value continues in the next chunk.
_END_MARGIN = 8


class JsonStream:
    """A cursor over a UTF-8 JSON file (a BOM is allowed) that decodes one value at a time."""

    def __init__(self, path: str | Path, chunk_chars: int = CHUNK_CHARS) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close() / the generator that owns it
        self._utf8 = codecs.getincrementaldecoder("utf-8")("strict")
        self._chunk = chunk_chars
        self._decoder = json.JSONDecoder()
        self.buf = ""
        self.pos = 0
        self.eof = False
        self._dropped_lines = 0  # newlines in the text already trimmed off the buffer
        self._dropped_col = 0  # characters of the current line trimmed off the buffer
        self._first = True

    def close(self) -> None:
        self._file.close()

    # -- buffer ----------------------------------------------------------------------------------------------

    def _fill(self, chars: int | None = None) -> bool:
        """Append the next chunk to the buffer (trimming what is behind the cursor); False at end of file."""
        if self.eof:
            return False
        raw = self._file.read(chars or self._chunk)
        try:
            text = self._utf8.decode(raw, final=not raw)
        except UnicodeDecodeError:
            from ssjdn.data.readers.common import read_text

            read_text(self.path)  # the error path reads the file once more, for a message naming offset and line
            raise
        if self._first:
            text, self._first = text.removeprefix("\ufeff"), False
        if not raw:
            self.eof = True
        if self.pos > self._chunk:  # drop what was consumed, remembering where lines and columns stood
            dropped = self.buf[: self.pos]
            newlines = dropped.count("\n")
            self._dropped_lines += newlines
            last = dropped.rfind("\n")
            self._dropped_col = len(dropped) - last - 1 if last >= 0 else self._dropped_col + len(dropped)
            self.buf, self.pos = self.buf[self.pos :], 0
        self.buf += text
        return bool(raw)

    def _where(self, pos: int) -> tuple[int, int]:
        line = self._dropped_lines + self.buf.count("\n", 0, pos) + 1
        last = self.buf.rfind("\n", 0, pos)
        col = pos - last if last >= 0 else self._dropped_col + pos + 1
        return line, col

    def error(self, msg: str, pos: int | None = None) -> DatasetFormatError:
        line, col = self._where(self.pos if pos is None else pos)
        return DatasetFormatError(f"{self.path}: malformed JSON at line {line}, column {col}: {msg}")

    # -- tokens ----------------------------------------------------------------------------------------------

    def peek(self) -> str:
        """The next non-whitespace character ('' at end of file), without consuming it."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill():
                return ""

    def expect(self, chars: str, what: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            raise self.error(f"Expecting {what}")
        self.pos += 1
        return c

    def value(self) -> Any:
        """Decode the value at the cursor, reading further chunks while it is incomplete."""
        self.peek()
        more = self._chunk
        while True:
            try:
                obj, end = self._decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                incomplete = exc.pos >= len(self.buf) - _END_MARGIN or exc.msg.startswith("Unterminated string")
                if not incomplete or self.eof:
                    raise self.error(exc.msg, exc.pos) from None
            else:
                # A number may continue in the next chunk: a value that ends the buffer counts only at end of file.
                if end < len(self.buf) or self.eof:
                    self.pos = end
                    return obj
            self._fill(more)  # may trim the buffer: decode again from the (moved) cursor
            more *= 2  # a value larger than a chunk: grow geometrically, not one chunk per retry

    def end(self) -> None:
        if self.peek():
            raise self.error("Extra data")


def stream_object_array(path: str | Path, array_key: str, fields: dict[str, Any]) -> Iterator[Any]:
    """Yield the items of the list under `array_key` of the top-level JSON object in `path`, one at a time.

    The object's other members are decoded whole and stored in `fields` (complete once the generator is
    exhausted: a member may follow the array). Raises `DatasetFormatError` naming the line and column of
    malformed JSON, or saying that the document is not an object holding an `array_key` list.
    """
    stream = JsonStream(path)
    try:
        if stream.peek() != "{":
            kind = "empty file" if not stream.peek() else "a JSON value that is not an object"
            raise DatasetFormatError(f"{path}: expected a JSON object with an {array_key!r} list, found {kind}")
        stream.pos += 1
        found = False
        if stream.peek() == "}":
            stream.pos += 1
        else:
            while True:
                if stream.peek() != '"':
                    raise stream.error("Expecting property name enclosed in double quotes")
                name = stream.value()
                stream.expect(":", "':' delimiter")
                if name == array_key and not found:
                    found = True
                    if stream.peek() != "[":
                        raise DatasetFormatError(f"{path}: {array_key!r} must be a list")
                    stream.pos += 1
                    if stream.peek() == "]":
                        stream.pos += 1
                    else:
                        while True:
                            yield stream.value()
                            if stream.expect(",]", "',' delimiter") == "]":
                                break
                else:
                    fields[name] = stream.value()
                if stream.expect(",}", "',' delimiter") == "}":
                    break
        stream.end()
        if not found:
            raise DatasetFormatError(f"{path}: expected a JSON object with an {array_key!r} list")
    finally:
        stream.close()
