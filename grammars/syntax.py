"""Shared tree-sitter machinery: windows, error nodes, lexical context, bracket scans.

The completion checks never parse a whole file: a 5 MB file takes seconds, a completion step
takes milliseconds. They parse a *window* of a few thousand characters around the cursor, cut at
line boundaries where the code is least indented, so that the window holds the enclosing
definition in the common case. Errors caused by the cut are the same with and without the
completion, and every check compares against the document without the completion, so the cut
never gets blamed on the completion.

All positions here are byte offsets into UTF-8 text, because that is what tree-sitter reports.
"""

from __future__ import annotations

import bisect
import logging
import re
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import tree_sitter

from .languages import Language

logger = logging.getLogger(__name__)

# Window sizes in characters. The prefix side gets more because the enclosing block header and
# open brackets are before the cursor; the suffix side only needs to show what closes them.
PREFIX_WINDOW_MIN = 1500
PREFIX_WINDOW_MAX = 6000
SUFFIX_WINDOW_MAX = 3000

_LINE_START = re.compile(r"^([ \t]*)(\S)", re.MULTILINE)
# A line that can begin a top-level item: not a continuation, a closer or an operator.
_TOP_LEVEL_START = re.compile(r"[A-Za-z_@#$]")

# Capture names of queries/<lang>/context.scm.
EXCLUDED_CAPTURES = ("string", "comment", "text")
CODE_CAPTURE = "code"


class ErrorNode(NamedTuple):
    """One ERROR or MISSING node: kind is "ERROR" or "MISSING <type>", [start, end) in bytes."""

    kind: str
    start: int
    end: int


def window(prefix: str, suffix: str) -> tuple[str, str]:
    """The parts of prefix and suffix that are parsed: whole when small, else cut at line starts.

    The prefix side starts at the least indented code line between PREFIX_WINDOW_MAX and
    PREFIX_WINDOW_MIN characters before the cursor (the latest such line, to keep parses short),
    which in practice is the start of the enclosing top-level definition or a statement at the
    outermost level in reach. The suffix side ends before the next top-level item, or at a line
    end within SUFFIX_WINDOW_MAX.
    """
    if len(prefix) > PREFIX_WINDOW_MAX:
        low = len(prefix) - PREFIX_WINDOW_MAX
        high = len(prefix) - PREFIX_WINDOW_MIN
        best: tuple[int, int] | None = None  # (indent, -start): least indented, then latest
        for match in _LINE_START.finditer(prefix, low, high):
            start = match.start()
            if start != 0 and prefix[start - 1] != "\n":
                continue  # finditer with a start offset also matches mid-line
            if not _TOP_LEVEL_START.match(match.group(2)):
                continue
            key = (len(match.group(1).expandtabs(8)), -start)
            if best is None or key < best:
                best = key
        if best is not None:
            prefix = prefix[-best[1]:]  # -best[1] is the chosen line's start
        else:
            newline = prefix.find("\n", low)
            prefix = prefix[newline + 1:] if newline != -1 else prefix[low:]
    if len(suffix) > SUFFIX_WINDOW_MAX:
        first_break = suffix.find("\n")
        cut = None
        if first_break != -1:
            for match in _LINE_START.finditer(suffix, first_break + 1, SUFFIX_WINDOW_MAX):
                start = match.start()
                if suffix[start - 1] == "\n" and not match.group(1) and _TOP_LEVEL_START.match(match.group(2)):
                    cut = start
                    break
        if cut is None:
            last_break = suffix.rfind("\n", 0, SUFFIX_WINDOW_MAX)
            cut = last_break + 1 if last_break > first_break else SUFFIX_WINDOW_MAX
        suffix = suffix[:cut]
    return prefix, suffix


def error_nodes(root: tree_sitter.Node) -> list[ErrorNode]:
    """All ERROR and MISSING nodes, in document order; only subtrees flagged has_error are visited."""
    found: list[ErrorNode] = []
    stack = [root]
    while stack:
        node = stack.pop()
        if node.is_missing:
            found.append(ErrorNode("MISSING " + node.type, node.start_byte, node.end_byte))
        elif node.is_error:
            found.append(ErrorNode("ERROR", node.start_byte, node.end_byte))
        if node.has_error:
            stack.extend(reversed(node.children))
    return found


def syntax_errors(text: str, language: Language) -> int:
    """Number of ERROR + MISSING nodes in the parse of text (whole text, no window)."""
    tree = language.parser().parse(text.encode("utf-8"))
    return len(error_nodes(tree.root_node))


def _point(data: bytes, offset: int) -> tuple[int, int]:
    """(row, byte column) of an offset, as tree.edit wants it."""
    row = data.count(b"\n", 0, offset)
    line_start = data.rfind(b"\n", 0, offset) + 1
    return row, offset - line_start


def _common_prefix(a: bytes, b: bytes) -> int:
    """Length of the common prefix, by bisection over slice comparisons (memcmp, not a Python loop)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def _common_suffix(a: bytes, b: bytes, limit: int) -> int:
    """Length of the common suffix, at most limit."""
    low, high = 0, min(limit, len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[len(a) - mid:] == b[len(b) - mid:]:
            low = mid
        else:
            high = mid - 1
    return low


def _change(old: bytes, new: bytes) -> tuple[int, int, int]:
    """The edit that turns old into new: (start, old_end, new_end)."""
    start = _common_prefix(old, new)
    tail = _common_suffix(old, new, min(len(old), len(new)) - start)
    return start, len(old) - tail, len(new) - tail


def last_item_start(prefix: bytes) -> int:
    """Offset of the last line of prefix that starts a top-level item (code at column 0)."""
    for match in reversed(list(re.finditer(rb"^[A-Za-z_@#$]", prefix, re.MULTILINE))):
        return match.start()
    return 0


def ends_at_boundary(suffix: str, kept: int) -> bool:
    """Whether the first ``kept`` characters of suffix (its window) end at the end of the text or
    before a top-level item: then what the window leaves open stays open."""
    rest = suffix[kept:]
    return not rest.strip() or (suffix[kept - 1: kept] == "\n" and bool(_TOP_LEVEL_START.match(rest)))


@dataclass
class IncrementalParser:
    """A parser that remembers documents and trees and reparses only what changed.

    Consecutive documents of one completion differ only around the cursor, so describing the
    change with tree.edit lets tree-sitter reuse every node outside it (a millisecond becomes a
    tenth). Three trees are kept as references: the last two parsed and an anchor (the document
    without the completion, set by the caller), and the one closest to the new text is edited,
    so that switching between "prefix + canvas" and "prefix + canvas + suffix" stays cheap (with
    one recent tree, every switch re-parsed the suffix: a third of TSX's parse time).
    parse_seconds accumulates the time spent here.
    """

    language: Language
    parser: tree_sitter.Parser = field(init=False)
    last_text: bytes | None = field(default=None, init=False)
    last_tree: tree_sitter.Tree | None = field(default=None, init=False)
    previous: tuple[bytes, tree_sitter.Tree] | None = field(default=None, init=False)  # the one before the last
    anchor: tuple[bytes, tree_sitter.Tree] | None = field(default=None, init=False)
    parse_seconds: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.parser = self.language.parser()

    def parse(self, text: bytes) -> tree_sitter.Tree:
        """Parse text, editing the closest remembered tree."""
        started = time.perf_counter()
        best: tuple[int, bytes, tree_sitter.Tree, tuple[int, int, int]] | None = None
        references = [self.anchor] if self.anchor is not None else []
        if self.last_tree is not None and self.last_text is not None:
            references.append((self.last_text, self.last_tree))
        if self.previous is not None:
            references.append(self.previous)
        for old_text, old_tree in references:
            change = _change(old_text, text)
            cost = (change[1] - change[0]) + (change[2] - change[0])
            if best is None or cost < best[0]:
                best = (cost, old_text, old_tree, change)
        if best is None:
            tree = self.parser.parse(text)
        elif best[0] == 0:
            tree = best[2]
        else:
            _, old_text, old_tree, (start, old_end, new_end) = best
            edited = old_tree.copy()
            edited.edit(
                start_byte=start,
                old_end_byte=old_end,
                new_end_byte=new_end,
                start_point=_point(text, start),
                old_end_point=_point(old_text, old_end),
                new_end_point=_point(text, new_end),
            )
            tree = self.parser.parse(text, edited)
        if self.last_tree is not None and self.last_text is not None and self.last_text != text:
            self.previous = (self.last_text, self.last_tree)
        self.last_text, self.last_tree = text, tree
        self.parse_seconds += time.perf_counter() - started
        return tree


@dataclass(frozen=True)
class Spans:
    """Byte intervals of a document where code is not code (strings, comments, prose)."""

    starts: tuple[int, ...]
    ends: tuple[int, ...]
    # Every capture, for containment questions: (name, start, end, has_error).
    captures: tuple[tuple[str, int, int, bool], ...]

    def excluded(self, pos: int) -> bool:
        """True when the byte at pos lies in a string, comment or prose."""
        i = bisect.bisect_right(self.starts, pos) - 1
        return i >= 0 and pos < self.ends[i]

    def innermost(self, pos: int, line_comment: str | None = None, text: bytes = b"") -> tuple[str, int, int, bool] | None:
        """The innermost capture strictly around pos (a cursor between bytes pos-1 and pos).

        A line comment also contains the position just after its last character, because
        typing there continues the comment.
        """
        best: tuple[str, int, int, bool] | None = None
        for capture in self.captures:
            name, start, end, _ = capture
            inside = start < pos < end
            if not inside and name == "comment" and pos == end and start < pos and line_comment:
                inside = text[start:start + len(line_comment)] == line_comment.encode()
            if inside and (best is None or end - start < best[2] - best[1]):
                best = capture
        return best


def context_spans(tree: tree_sitter.Tree, language: Language, start: int, end: int) -> Spans:
    """Strings/comments/prose intersecting [start, end], minus code nested in them, as sorted spans."""
    query = language.query("context")
    if query is None:
        return Spans((), (), ())
    cursor = tree_sitter.QueryCursor(query)
    cursor.set_byte_range(start, max(start, end))
    captured = cursor.captures(tree.root_node)
    captures: list[tuple[str, int, int, bool]] = []
    for name, nodes in captured.items():
        for node in nodes:
            captures.append((name, node.start_byte, node.end_byte, node.has_error))
    raw = sorted((s, e) for name, s, e, _ in captures if name in EXCLUDED_CAPTURES and e > s)
    holes = sorted((s, e) for name, s, e, _ in captures if name == CODE_CAPTURE and e > s)
    merged: list[list[int]] = []
    for s, e in raw:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    # Cut the code holes (interpolations) out of the excluded intervals.
    intervals: list[tuple[int, int]] = []
    for s, e in merged:
        cursor_pos = s
        for hs, he in holes:
            if he <= cursor_pos or hs >= e:
                continue
            if hs > cursor_pos:
                intervals.append((cursor_pos, hs))
            cursor_pos = max(cursor_pos, he)
        if cursor_pos < e:
            intervals.append((cursor_pos, e))
    return Spans(tuple(s for s, _ in intervals), tuple(e for _, e in intervals), tuple(captures))


class Bracket(NamedTuple):
    """A bracket character found by a scan: its byte offset and the character."""

    pos: int
    char: str


def _bracket_pattern(language: Language) -> re.Pattern[bytes]:
    """Bytes regex for brackets, quotes and block-comment openers of a language (cached on id)."""
    key = language.name
    cached = _PATTERNS.get(key)
    if cached is None:
        tokens = [o for o, _ in language.brackets] + [c for _, c in language.brackets]
        tokens += list(language.string_quotes)
        if language.block_comment:
            tokens.append(language.block_comment[0])
        tokens.sort(key=len, reverse=True)
        cached = re.compile("|".join(re.escape(t) for t in tokens).encode())
        _PATTERNS[key] = cached
    return cached


_PATTERNS: dict[str, re.Pattern[bytes]] = {}


def scan_brackets(text: bytes, start: int, end: int, spans: Spans, language: Language) -> tuple[list[Bracket], int | None]:
    """Brackets of text[start:end] that are code, in order.

    Also returns where the scan stopped early: a quote or comment opener in code means a literal
    that tree-sitter could not close (it is still being written), and brackets after it are text,
    so nothing after it can be judged lexically. The scan runs the regex over the code segments
    between excluded spans, so its cost is per bracket, not per byte.
    """
    found: list[Bracket] = []
    pattern = _bracket_pattern(language)
    brackets = _BRACKET_CHARS.setdefault(language.name, frozenset(c for pair in language.brackets for c in pair))
    index = bisect.bisect_right(spans.ends, start)
    position = start
    while position < end:
        if index < len(spans.starts) and spans.starts[index] <= position:
            position = max(position, spans.ends[index])
            index += 1
            continue
        segment_end = min(end, spans.starts[index]) if index < len(spans.starts) else end
        for match in pattern.finditer(text, position, segment_end):
            token = match.group().decode()
            if token in brackets:
                found.append(Bracket(match.start(), token))
            else:
                return found, match.start()
        position = segment_end
    return found, None


_BRACKET_CHARS: dict[str, frozenset[str]] = {}


@dataclass
class BracketStack:
    """Unclosed openers, with where they are; tracks whether the user's own brackets were balanced."""

    openers: list[Bracket] = field(default_factory=list)
    damaged: bool = False

    def feed(self, brackets: list[Bracket], language: Language) -> None:
        """Push openers and pop matching closers, recovering from the user's mismatches leniently."""
        closers = language.closers
        for bracket in brackets:
            opener = closers.get(bracket.char)
            if opener is None:
                self.openers.append(bracket)
                continue
            if self.openers and self.openers[-1].char == opener:
                self.openers.pop()
                continue
            self.damaged = True
            for depth in range(len(self.openers) - 1, -1, -1):
                if self.openers[depth].char == opener:
                    del self.openers[depth:]
                    break


def unmatched_closers(brackets: list[Bracket], language: Language) -> list[Bracket]:
    """Closers of a scan that close something opened before it (in order), e.g. the suffix's `)`."""
    closers = language.closers
    depth: list[str] = []
    result: list[Bracket] = []
    for bracket in brackets:
        if bracket.char not in closers:
            depth.append(bracket.char)
        elif depth and depth[-1] == closers[bracket.char]:
            depth.pop()
        elif depth:
            depth.pop()  # a mismatch inside the scan itself: the user's problem, keep going
        else:
            result.append(bracket)
    return result


def close_with(stack: list[str], closers: list[str], language: Language) -> tuple[int, list[int]]:
    """Apply closers (the suffix's) to a stack of openers, the way a reader pairs them.

    A closer pairs with the innermost opener of its kind; openers skipped over to reach it stay
    unclosed, and a closer with no opener of its kind is stray. Returns the number of problems
    (stray closers + unclosed openers) and the indices into stack of the unclosed openers.
    """
    stray, unclosed = pair_closers(stack, closers, language)
    return len(stray) + len(unclosed), unclosed


def pair_closers(stack: list[str], closers: list[str], language: Language, stack_indents: list[int] | None = None,
                 closer_indents: list[int | None] | None = None) -> tuple[list[int], list[int]]:
    """:func:`close_with`'s pairing: the indices into closers of the stray ones, and into stack
    of the openers left unclosed.

    With indentation (each opener's line's, and each closer's where it starts its line, else
    None), such a closer pairs with the innermost opener of its kind on a line indented as it
    is: the shape of written code, which bracket kinds alone cannot see (`\t}` before `}` after
    `func f() {`: the first closes a block that nothing opened)."""
    pairs = language.closers
    open_indices = list(range(len(stack)))
    unclosed: list[int] = []
    stray: list[int] = []
    for index, closer in enumerate(closers):
        wanted = pairs[closer]
        indent = closer_indents[index] if closer_indents is not None and stack_indents is not None else None
        for depth in range(len(open_indices) - 1, -1, -1):
            opener = open_indices[depth]
            if stack[opener] == wanted and (indent is None or stack_indents[opener] == indent):
                unclosed.extend(open_indices[depth + 1:])
                del open_indices[depth:]
                break
        else:
            stray.append(index)
    unclosed.extend(open_indices)
    return stray, sorted(unclosed)


def map_position(pos: int, cursor: int, length: int) -> tuple[int, ...]:
    """Where a position of the document without the infill can be once length bytes are inserted at cursor."""
    if pos < cursor:
        return (pos,)
    if pos > cursor:
        return (pos + length,)
    return (cursor, cursor + length)


def new_errors(base: list[ErrorNode], doc: list[ErrorNode], cursor: int, length: int) -> list[ErrorNode]:
    """Errors of doc that the base document (without the infill) did not have at the same place.

    An error of the base matches one of the doc when the kind agrees and both ends map onto the
    doc's ends once the infill is inserted; an error that straddled the cursor matches the same
    error stretched over the infill. Each base error matches at most once.
    """
    pool = list(base)
    fresh: list[ErrorNode] = []
    for error in doc:
        for index, old in enumerate(pool):
            if (
                old.kind == error.kind
                and error.start in map_position(old.start, cursor, length)
                and error.end in map_position(old.end, cursor, length)
            ):
                del pool[index]
                break
        else:
            fresh.append(error)
    return fresh


def innermost_errors(errors: list[ErrorNode]) -> list[ErrorNode]:
    """Errors that contain no other error: the small node names the culprit, the big one only its statement."""
    result = []
    for error in errors:
        contains_other = any(
            other is not error
            and error.start <= other.start
            and other.end <= error.end
            and (other.start, other.end) != (error.start, error.end)
            for other in errors
        )
        if not contains_other:
            result.append(error)
    return result


def at_end(error: ErrorNode, text: bytes) -> bool:
    """True when the error reaches the end of text (trailing whitespace aside): more text may fix it."""
    return error.end >= len(text.rstrip())
