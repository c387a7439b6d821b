"""The server's copy of the client's open documents, and LSP positions.

An LSP position is (line, character) where ``character`` counts code units of the negotiated
position encoding: UTF-16 (the default, what VS Code speaks), UTF-8 or UTF-32. Python strings
index code points, i.e. UTF-32, so every position that crosses the wire goes through
:func:`offset_at` / :func:`position_at`.

Lines end at ``\\n``, ``\\r\\n`` or a lone ``\\r`` (all three are line terminators in LSP). A
``character`` past the end of its line means the end of the line, a ``line`` past the last line
means the end of the document, and a position inside a surrogate pair or a multi-byte UTF-8
sequence falls back to the start of that character: positions are clamped, never rejected,
because a completion server should degrade to "no suggestion" rather than error while the
client and server briefly disagree.

The text is one ``str``; line starts are computed lazily (one C-speed pass, about 10 ms for a
5 MB file) and dropped on every edit, so a burst of edits costs one pass at the next lookup.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Iterable, Sequence

log = logging.getLogger(__name__)

UTF8, UTF16, UTF32 = "utf-8", "utf-16", "utf-32"
ENCODINGS = (UTF8, UTF16, UTF32)

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def line_starts(text: str) -> list[int]:
    """Offsets (code points) at which each line starts; the first is always 0."""
    if "\r" not in text:
        # Fast path: one split and one running sum, both in C.
        return [0] + list(accumulate(len(line) + 1 for line in text.split("\n")))[:-1]
    return [0] + [m.end() for m in _LINE_BREAK.finditer(text)]


def units_to_index(line: str, units: int, encoding: str) -> int:
    """Code point index in ``line`` of a column counted in ``encoding`` code units (clamped)."""
    if units <= 0:
        return 0
    if encoding == UTF32 or line.isascii():
        return min(units, len(line))
    count = 0
    for index, char in enumerate(line):
        width = char_units(char, encoding)
        if count + width > units:
            return index  # inside this character: its start
        count += width
    return len(line)


def index_to_units(line: str, index: int, encoding: str) -> int:
    """Column in ``encoding`` code units of a code point index in ``line``."""
    head = line[: max(0, index)]
    if encoding == UTF32 or head.isascii():
        return len(head)
    if encoding == UTF8:
        return len(head.encode("utf-8", "surrogatepass"))
    return len(head) + sum(1 for char in head if ord(char) > 0xFFFF)


def char_units(char: str, encoding: str) -> int:
    code = ord(char)
    if encoding == UTF16:
        return 2 if code > 0xFFFF else 1
    if encoding == UTF8:
        return 1 if code < 0x80 else 2 if code < 0x800 else 3 if code < 0x10000 else 4
    return 1


def _line_end(text: str, start: int, next_start: int | None) -> int:
    """End of the line's content (before its terminator)."""
    if next_start is None:
        return len(text)
    end = next_start
    if end > start and text[end - 1] == "\n":
        end -= 1
    if end > start and text[end - 1] == "\r":
        end -= 1
    return end


@dataclass
class Document:
    """One open document: what the client sent, kept in sync by didChange."""

    uri: str
    text: str = ""
    language_id: str = ""
    version: int = 0
    _starts: list[int] | None = field(default=None, repr=False)

    # ---------------------------------------------------------------- positions
    @property
    def starts(self) -> list[int]:
        if self._starts is None:
            self._starts = line_starts(self.text)
        return self._starts

    @property
    def line_count(self) -> int:
        return len(self.starts)

    def line(self, number: int) -> str:
        """Content of line ``number`` without its terminator ('' past the end)."""
        starts = self.starts
        if not 0 <= number < len(starts):
            return ""
        start = starts[number]
        return self.text[start:_line_end(self.text, start, starts[number + 1] if number + 1 < len(starts) else None)]

    def offset_at(self, line: int, character: int, encoding: str = UTF16) -> int:
        """Code point offset of an LSP position, clamped into the document."""
        starts = self.starts
        if line < 0:
            return 0
        if line >= len(starts):
            return len(self.text)
        return starts[line] + units_to_index(self.line(line), character, encoding)

    def position_at(self, offset: int, encoding: str = UTF16) -> tuple[int, int]:
        """LSP (line, character) of a code point offset (clamped)."""
        from bisect import bisect_right

        offset = min(max(0, offset), len(self.text))
        number = bisect_right(self.starts, offset) - 1
        start = self.starts[number]
        content = self.line(number)
        return number, index_to_units(content, min(offset - start, len(content)), encoding)

    # ---------------------------------------------------------------- edits
    def apply(self, text: str, range_: tuple[tuple[int, int], tuple[int, int]] | None, encoding: str = UTF16) -> None:
        """Apply one change: the whole text when ``range_`` is None, else replace the range."""
        if range_ is None:
            self.text = text
        else:
            (l1, c1), (l2, c2) = range_
            start = self.offset_at(l1, c1, encoding)
            end = self.offset_at(l2, c2, encoding)
            if end < start:  # a reversed range: be lenient, as editors are
                start, end = end, start
            self.text = self.text[:start] + text + self.text[end:]
        self._starts = None

    def digest(self) -> str:
        """SHA-256 of the UTF-8 text: lets a client check that the server sees what it sees."""
        return hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest()


class DocumentStore:
    """The open documents by URI. Changes to documents that were never opened are ignored
    (with a log line): the server cannot know their text, and guessing would be worse.

    A change replaces the :class:`Document` object rather than mutating it, so a request can
    hold the document as it was when the request arrived (texts are immutable strings: the copy
    is free) while later edits come in."""

    def __init__(self, encoding: str = UTF16):
        self.encoding = encoding
        self._documents: dict[str, Document] = {}

    def __contains__(self, uri: str) -> bool:
        return uri in self._documents

    def __len__(self) -> int:
        return len(self._documents)

    def get(self, uri: str) -> Document | None:
        return self._documents.get(uri)

    def all(self) -> Iterable[Document]:
        return self._documents.values()

    def open(self, uri: str, text: str, language_id: str = "", version: int = 0) -> Document:
        document = Document(uri, text, language_id, version)
        self._documents[uri] = document
        return document

    def change(self, uri: str, version: int | None, changes: Sequence[tuple[str, tuple | None]]) -> Document | None:
        """Apply (text, range) changes in order, as LSP requires."""
        document = self._documents.get(uri)
        if document is None:
            log.warning("didChange for %s, which was never opened: ignored", uri)
            return None
        # Copy on write: a request that took this document at dispatch keeps seeing that text.
        document = Document(document.uri, document.text, document.language_id, document.version, document._starts)
        for text, range_ in changes:
            document.apply(text, range_, self.encoding)
        if version is not None:
            document.version = version
        self._documents[uri] = document
        return document

    def close(self, uri: str) -> Document | None:
        return self._documents.pop(uri, None)

    def total_chars(self) -> int:
        return sum(len(d.text) for d in self._documents.values())
