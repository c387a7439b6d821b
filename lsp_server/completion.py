"""From a document and a cursor to the engine's request, and from its result to LSP items.

Plain functions and one small cache, so that every rule here is testable without a server:

* :func:`context_window`: the prefix and suffix handed to the engine. The engine only reads the
  last ~1k tokens anyway; bounding the strings keeps a 5 MB file as cheap as a small one. The
  window's start moves in steps of ``WINDOW_QUANTUM`` characters (then to a line start) so it
  stays put while the user types, which keeps the engine's per-document context cache valid.
* :class:`TypingCache`: "typing through" a suggestion. When the user types the first characters
  of the suggestion just shown, the rest is served from here without running the model.
* :func:`inline_items` / :func:`completion_items`: LSP items, each with the ``difill.accept``
  command that reports acceptance back (kept locally, for counters only).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field

from lsprotocol import types

WINDOW_QUANTUM = 4096
ACCEPT_COMMAND = "difill.accept"
TAIL_CHARS = 512  # how much of the text around the cursor a cache entry remembers and compares
_WORD_BEFORE = re.compile(r"[\w$]*$")


@dataclass(frozen=True)
class Window:
    prefix: str
    suffix: str
    start: int  # document offset of prefix[0]

    @property
    def line_before(self) -> str:
        return self.prefix[self.prefix.rfind("\n") + 1:]

    @property
    def line_after(self) -> str:
        end = self.suffix.find("\n")
        return self.suffix if end < 0 else self.suffix[:end]


def context_window(text: str, offset: int, max_prefix: int, max_suffix: int) -> Window:
    """Prefix and suffix around ``offset``, at most ``max_prefix`` / ``max_suffix`` characters,
    cut at line boundaries when a cut is needed."""
    offset = min(max(0, offset), len(text))
    start = 0
    if offset > max_prefix:
        start = -(-(offset - max_prefix) // WINDOW_QUANTUM) * WINDOW_QUANTUM  # round up: stay within budget
        newline = text.find("\n", start, offset)
        start = newline + 1 if newline >= 0 else min(start, offset)
    end = len(text)
    if len(text) - offset > max_suffix:
        end = offset + max_suffix
        newline = text.rfind("\n", offset, end)
        end = newline + 1 if newline >= 0 else end
    return Window(text[start:offset], text[offset:end], start)


def looks_binary(window: Window) -> bool:
    """NUL characters never occur in source code; completing a binary blob wastes the model."""
    return "\0" in window.prefix[-4096:] or "\0" in window.suffix[:4096]


@dataclass
class _Shown:
    offset: int  # document offset of the cursor when the suggestions were made
    prefix_tail: str
    suffix_head: str
    texts: list[str]
    key: tuple


@dataclass
class TypingCache:
    """The last suggestions per document, to serve the remainder while the user types them.

    Bounded: one entry per document and at most ``max_documents`` documents (least recently
    used dropped), each entry at most ``TAIL_CHARS`` of context plus the suggestions' text.
    """

    max_documents: int = 64
    _entries: OrderedDict[str, _Shown] = field(default_factory=OrderedDict)

    def remember(self, uri: str, offset: int, window: Window, texts: list[str], key: tuple) -> None:
        texts = [t for t in texts if t]
        if not texts:
            self._entries.pop(uri, None)
            return
        self._entries[uri] = _Shown(offset, window.prefix[-TAIL_CHARS:], window.suffix[:TAIL_CHARS], texts, key)
        self._entries.move_to_end(uri)
        while len(self._entries) > self.max_documents:
            self._entries.popitem(last=False)

    def lookup(self, uri: str, offset: int, window: Window, key: tuple) -> list[str] | None:
        """The suggestions' remainders if the text since the last request is exactly a typed
        start of them (or nothing was typed), the context is otherwise unchanged and the options
        are the same; else None."""
        entry = self._entries.get(uri)
        if entry is None or entry.key != key:
            return None
        typed_len = offset - entry.offset
        if typed_len < 0 or typed_len > len(window.prefix):
            return None
        typed = window.prefix[len(window.prefix) - typed_len:]
        before = window.prefix[: len(window.prefix) - typed_len]
        if not before.endswith(entry.prefix_tail) and not entry.prefix_tail.endswith(before):
            return None
        if window.suffix[:TAIL_CHARS] != entry.suffix_head:
            return None
        remainders = [t[typed_len:] for t in entry.texts if t.startswith(typed) and len(t) > typed_len]
        return remainders or None

    def forget(self, uri: str) -> None:
        self._entries.pop(uri, None)

    def nbytes(self) -> int:
        return sum(2 * (len(e.prefix_tail) + len(e.suffix_head) + sum(map(len, e.texts))) for e in self._entries.values())


def accept_command(item_id: str) -> types.Command:
    return types.Command(title="difill: accept", command=ACCEPT_COMMAND, arguments=[item_id])


def inline_items(texts: list[str], position: types.Position, item_ids: list[str],
                 selected: types.SelectedCompletionInfo | None = None) -> list[types.InlineCompletionItem]:
    """Inline items inserting at the cursor. With a selected completion from the popup, each
    item replaces the selected item's range and starts with its text, as LSP 3.18 requires."""
    items = []
    for text, item_id in zip(texts, item_ids):
        if selected is not None:
            insert, range_ = selected.text + text, selected.range
        else:
            insert, range_ = text, types.Range(position, position)
        items.append(types.InlineCompletionItem(insert_text=insert, range=range_, command=accept_command(item_id)))
    return items


def completion_items(texts: list[str], position: types.Position, word_units: int, word: str, item_ids: list[str],
                     language_id: str = "") -> list[types.CompletionItem]:
    """Classic completion items for editors without inline completion. The edit replaces the
    word before the cursor (``word_units`` code units long) with that word plus the infill, so
    the client's own filtering keeps the item while the user types; a multi-line infill shows
    in full in the documentation."""
    items = []
    start = types.Position(position.line, max(0, position.character - word_units))
    for rank, (text, item_id) in enumerate(zip(texts, item_ids)):
        first_line = text.split("\n", 1)[0]
        label = (word + first_line).strip() or text.strip().split("\n", 1)[0] or "⋯"
        if len(label) > 80:
            label = label[:79] + "…"
        multi_line = "\n" in text.strip("\n")
        documentation = None
        if multi_line:
            documentation = types.MarkupContent(kind=types.MarkupKind.Markdown, value=f"```{language_id}\n{word}{text}\n```")
        items.append(types.CompletionItem(
            label=label + (" …" if multi_line else ""),
            kind=types.CompletionItemKind.Snippet if multi_line else types.CompletionItemKind.Text,
            detail="difill" + (" (multi-line)" if multi_line else ""),
            documentation=documentation,
            text_edit=types.TextEdit(range=types.Range(start, position), new_text=word + text),
            filter_text=word + first_line,
            insert_text_format=types.InsertTextFormat.PlainText,
            sort_text=f"0{rank}",
            preselect=rank == 0,
            command=accept_command(item_id),
        ))
    return items


def word_before(line_before: str) -> str:
    """The identifier the cursor is in (the part before the cursor)."""
    match = _WORD_BEFORE.search(line_before)
    return match.group(0) if match else ""
