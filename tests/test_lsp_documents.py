"""The server's document model: positions in UTF-8/16/32, CRLF and lone CR, incremental edits.

The reference here is deliberately naive and independent of the implementation: it splits the
text into lines with their terminators and counts code units by actually encoding the text.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from difill.lsp_server.documents import UTF8, UTF16, UTF32, Document, DocumentStore, line_starts

ENCODINGS = [UTF8, UTF16, UTF32]


def units(text: str, encoding: str) -> int:
    """Length of ``text`` in code units, by encoding it."""
    if encoding == UTF8:
        return len(text.encode("utf-8", "surrogatepass"))
    if encoding == UTF16:
        return len(text.encode("utf-16-le", "surrogatepass")) // 2
    return len(text)


def reference_lines(text: str) -> list[tuple[str, str]]:
    """(content, terminator) per line."""
    parts = re.split(r"(\r\n|\r|\n)", text)
    return [(parts[i], parts[i + 1] if i + 1 < len(parts) else "") for i in range(0, len(parts), 2)]


def reference_offset(text: str, line: int, character: int, encoding: str) -> int:
    """Offset of a valid position (on a character boundary, inside the document)."""
    lines = reference_lines(text)
    offset = sum(len(c) + len(t) for c, t in lines[:line])
    content = lines[line][0]
    for index in range(len(content) + 1):
        if units(content[:index], encoding) == character:
            return offset + index
    raise AssertionError("not a character boundary")


def reference_position(text: str, offset: int, encoding: str) -> tuple[int, int]:
    before = text[:offset]
    line = len(reference_lines(before)) - 1
    return line, units(reference_lines(before)[-1][0], encoding)


# Text mixing ASCII, CJK, emoji (astral: two UTF-16 units, four UTF-8 bytes), accents and every
# kind of line break.
ALPHABET = st.sampled_from(list("ab \t(){}") + ["\n", "\r\n", "\r", "é", "中", "文", "😀", "🧪", "\u200d"])
TEXT = st.lists(ALPHABET, max_size=40).map("".join)


@st.composite
def edit(draw, text: str, encoding: str):
    """A valid client edit of ``text``: a range between two character boundaries, new text."""
    a = draw(st.integers(0, len(text)))
    b = draw(st.integers(a, len(text)))
    # Never split a CRLF pair: no client position can point between \r and \n.
    if 0 < a < len(text) and text[a - 1] == "\r" and text[a] == "\n":
        a -= 1
    if 0 < b < len(text) and text[b - 1] == "\r" and text[b] == "\n":
        b += 1
    b = max(a, b)
    return reference_position(text, a, encoding), reference_position(text, b, encoding), draw(TEXT), a, b


def test_line_starts_all_terminators() -> None:
    assert line_starts("") == [0]
    assert line_starts("a\nb") == [0, 2]
    assert line_starts("a\r\nb\rc\n") == [0, 3, 5, 7]
    assert line_starts("\n\n") == [0, 1, 2]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_emoji_cjk_crlf_positions(encoding: str) -> None:
    text = "x = '😀中'\r\ny = 1\rz"
    doc = Document("file:///t.py", text)
    assert doc.line_count == 3
    assert doc.line(0) == "x = '😀中'"
    after_emoji = units("x = '😀", encoding)
    assert doc.offset_at(0, after_emoji, encoding) == text.index("中")
    assert doc.position_at(text.index("中"), encoding) == (0, after_emoji)
    assert doc.offset_at(1, 0, encoding) == text.index("y")
    assert doc.offset_at(2, 1, encoding) == len(text)


def test_positions_are_clamped() -> None:
    doc = Document("file:///t.py", "ab\r\ncd")
    assert doc.offset_at(0, 99) == 2  # past the end of the line: before its CRLF
    assert doc.offset_at(99, 0) == len(doc.text)  # past the last line: end of the document
    assert doc.offset_at(-1, 5) == 0
    # Inside a surrogate pair (UTF-16) or a multi-byte sequence (UTF-8): the character's start.
    emoji = Document("file:///e.py", "a😀b")
    assert emoji.offset_at(0, 2, UTF16) == 1
    assert emoji.offset_at(0, 3, UTF8) == 1
    assert emoji.offset_at(0, 5, UTF8) == 2


def test_store_ignores_documents_never_opened() -> None:
    store = DocumentStore()
    assert store.change("file:///never.py", 2, [("x", None)]) is None
    assert store.get("file:///never.py") is None


def test_reversed_range_is_accepted() -> None:
    doc = Document("file:///t.py", "hello world")
    doc.apply("X", ((0, 11), (0, 6)))
    assert doc.text == "hello X"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), TEXT, st.sampled_from(ENCODINGS))
def test_fuzz_edit_sequences_keep_texts_equal(data: st.DataObject, initial: str, encoding: str) -> None:
    """After any sequence of valid edits the server's text equals the client's."""
    store = DocumentStore(encoding)
    client = initial
    store.open("file:///f.py", initial, "python", 1)
    for version in range(2, 2 + data.draw(st.integers(1, 8))):
        if data.draw(st.integers(0, 9)) == 0:  # now and then a full-text sync
            client = data.draw(TEXT)
            store.change("file:///f.py", version, [(client, None)])
        else:
            start, end, new, a, b = data.draw(edit(client, encoding))
            client = client[:a] + new + client[b:]
            store.change("file:///f.py", version, [(new, (start, end))])
        doc = store.get("file:///f.py")
        assert doc.text == client
        assert doc.version == version
        # Every character boundary maps to its position and back.
        for offset in range(len(client) + 1):
            if 0 < offset < len(client) and client[offset - 1] == "\r" and client[offset] == "\n":
                continue
            line, character = reference_position(client, offset, encoding)
            assert doc.position_at(offset, encoding) == (line, character)
            assert doc.offset_at(line, character, encoding) == reference_offset(client, line, character, encoding)


@given(TEXT, st.integers(0, 12), st.integers(0, 60), st.sampled_from(ENCODINGS))
def test_fuzz_any_position_is_clamped_inside(text: str, line: int, character: int, encoding: str) -> None:
    doc = Document("file:///f.py", text)
    offset = doc.offset_at(line, character, encoding)
    assert 0 <= offset <= len(text)
    # Never between the two halves of a CRLF.
    assert not (0 < offset < len(text) and text[offset - 1] == "\r" and text[offset] == "\n")


def test_five_megabyte_document_edits() -> None:
    text = ("def f(x):\r\n    return x  # 中文 😀\r\n" * 150_000)[: 5 * 2**20]
    doc = DocumentStore().open("file:///big.py", text)
    last = doc.line_count - 1
    doc.apply("tail", ((last, 0), (last, 0)))
    doc.apply("head", ((0, 0), (0, 3)))
    assert doc.text.startswith("head f(x):")
    assert doc.line(last).startswith("tail")
