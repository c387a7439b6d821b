"""The cursor's site: the document around the cursor, parsed once, and judgements of infills.

A :class:`CursorSite` holds the windowed prefix and suffix, the parse of the document without the
completion (the *base*: its errors are the user's, never the completion's) and the lexical state
at the cursor (open brackets, the string or comment the cursor is in, the indentation levels).
:meth:`CursorSite.judge` then says what is wrong with the document once an infill is inserted,
as byte ranges of the infill, so that callers can map them to tokens (the critic), count them
(trimming), or only ask whether there are any (the final check).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import tree_sitter

from .languages import Language
from .syntax import (
    Bracket,
    BracketStack,
    ErrorNode,
    IncrementalParser,
    Spans,
    at_end,
    close_with,
    context_spans,
    ends_at_boundary,
    error_nodes,
    innermost_errors,
    last_item_start,
    new_errors,
    pair_closers,
    scan_brackets,
    unmatched_closers,
    window,
)

logger = logging.getLogger(__name__)

_NEWLINE = re.compile(rb"\n")
_BLANK = re.compile(rb"[ \t\r\f]*")
# A line that starts a top-level statement: the indentation state there is known (level 0).
_TOP_LEVEL_LINE = re.compile(rb"^[A-Za-z_@]", re.MULTILINE)


@dataclass
class Problem:
    """Something wrong with an infill: the byte range [start, end) of the document that causes it.

    lexical problems (brackets, leaving a string, indentation) point at the exact token; parse
    problems point at a tree-sitter ERROR/MISSING node, which can be wider.
    """

    start: int
    end: int
    reason: str
    lexical: bool


@dataclass
class IndentState:
    """Python-style indentation state at the start of a logical line: the open levels and whether
    the previous logical line opened a block."""

    levels: list[int] = field(default_factory=lambda: [0])
    after_header: bool = False
    # Levels between 0 and this one are unknown: the text seen began inside a block (a window cut
    # from a long class). A dedent into that range opens no error.
    open_below: int = 0

    def copy(self) -> "IndentState":
        return IndentState(list(self.levels), self.after_header, self.open_below)

    def accept(self, indent: int, strict: bool) -> str | None:
        """Apply a logical line's indent; returns what is wrong with it (None if fine).

        Lenient mode (the user's own lines) adapts the state to whatever it sees, because the
        user's mistakes must not make every completion look wrong.
        """
        top = self.levels[-1]
        problem = None
        if self.after_header:
            if indent > top:
                self.levels.append(indent)
            else:
                problem = "expected an indented block"
                self._dedent(indent)
        elif indent > top:
            problem = "unexpected indent"
            self.levels.append(indent)
        elif indent < top:
            if not self._dedent(indent):
                problem = "unindent does not match any outer indentation level"
        return problem if strict else None

    def _dedent(self, indent: int) -> bool:
        while len(self.levels) > 1 and self.levels[-1] > indent:
            self.levels.pop()
        if self.levels[-1] < indent < self.open_below:  # a level the text seen never showed
            self.levels.append(indent)
            self.open_below = indent
            return True
        if self.levels[-1] != indent:
            if indent > self.levels[-1]:
                self.levels.append(indent)
            return False
        return True


def _line_indent(text: bytes, pos: int, first_only: bool = True) -> int | None:
    """Indentation of the line holding text[pos]; None when ``first_only`` and code precedes pos
    on that line."""
    start = text.rfind(b"\n", 0, pos) + 1
    lead = text[start:pos]
    if lead.strip():
        if first_only:
            return None
        lead = lead[: len(lead) - len(lead.lstrip())]
    return _indent_width(lead)


def _indent_width(whitespace: bytes) -> int:
    return len(whitespace.decode("utf-8", "replace").expandtabs(8))


class CursorSite:
    """The document without the completion, parsed once, plus everything known at the cursor."""

    def __init__(self, language: Language, prefix: str, suffix: str) -> None:
        self.language = language
        prefix_w, suffix_w = window(prefix, suffix)
        self.pre = prefix_w.encode("utf-8")
        self.suf = suffix_w.encode("utf-8")
        self.cursor = len(self.pre)
        self.parser = IncrementalParser(language)
        self.base_text = self.pre + self.suf
        self.base_tree = self.parser.parse(self.base_text)
        self.parser.anchor = (self.base_text, self.base_tree)
        self.base_errors = error_nodes(self.base_tree.root_node)
        self.base_spans = context_spans(self.base_tree, language, 0, len(self.base_text))
        self.line_start = self.pre.rfind(b"\n") + 1
        newline = self.suf.find(b"\n")
        self.line_end = self.cursor + (newline if newline != -1 else len(self.suf))
        second = self.suf.find(b"\n", newline + 1) if newline != -1 else -1
        self.next_line_end = self.cursor + (second if second != -1 else len(self.suf))  # the line after the cursor's
        # Nothing follows the cursor on its line: a completion may stop at a block header there.
        self.rest_of_line_blank = not self.suf[: newline if newline != -1 else len(self.suf)].strip()
        # The suffix window reaches the end of the file or of the enclosing top-level item.
        self.suffix_whole = ends_at_boundary(suffix, len(suffix_w))
        self.item_start = last_item_start(self.pre)  # where the top-level item around the cursor begins

        # Where the cursor is: inside a string or comment that the document closes after it?
        self.context = self.base_spans.innermost(self.cursor, language.line_comment, self.base_text)
        self.enclosure: tuple[str, int, int, bool] | None = None
        if (
            self.context
            and self.context[0] in ("string", "comment")
            and not self.context[3]
            and not self._is_line_comment(self.context)
        ):
            self.enclosure = self.context

        # Brackets: what the prefix leaves open and what the suffix closes.
        prefix_brackets = self._prefix_brackets()
        self.stack = BracketStack()
        self.stack.feed(prefix_brackets, language)
        self.prefix_brackets = prefix_brackets
        suffix_brackets, _ = scan_brackets(self.base_text, self.cursor, len(self.base_text), self.base_spans, language)
        closers = unmatched_closers(suffix_brackets, language)
        # The suffix closes every bracket it opens (one that does not is a file cut short or the
        # user's unfinished text, whose errors can reach back over the cursor).
        opened = sum(1 for b in suffix_brackets if b.char in language.openers)
        self.suffix_balanced = opened <= len(suffix_brackets) - opened - len(closers)  # its own closers pair them all
        self.suffix_closers = [b.char for b in closers]
        self.suffix_closer_indents = [_line_indent(self.base_text, b.pos) for b in closers]
        self._stack_reliable: bool | None = None
        self._hole_problems: int | None = None  # _hole_unbalanced's count without the infill

        self._prefix_alone: list[ErrorNode] | None = None
        self._prefix_clean: bool | None = None
        self._indent: tuple[IndentState, int] | None = None
        self._window_indent: int | None = None

    # ------------------------------------------------------------------ helpers

    @property
    def parse_seconds(self) -> float:
        return self.parser.parse_seconds

    def _is_line_comment(self, capture: tuple[str, int, int, bool]) -> bool:
        marker = self.language.line_comment
        if capture[0] != "comment" or not marker:
            return False
        return self.base_text[capture[1]:capture[1] + len(marker.encode())] == marker.encode()

    def _prefix_brackets(self) -> list[Bracket]:
        """The prefix's code brackets as tree-sitter understood them, so that the user's mistakes on
        earlier lines do not leave the cursor "inside" a bracket forever: brackets inside an ERROR
        region that ends before the cursor's line are dropped (tree-sitter isolated them), and a
        MISSING closer on an earlier line closes its opener where tree-sitter put it."""
        brackets, _ = scan_brackets(self.base_text, 0, self.cursor, self.base_spans, self.language)
        closed_regions = [e for e in self.base_errors if e.kind == "ERROR" and e.end <= self.line_start]
        virtual = [
            Bracket(e.start, e.kind.split(" ", 1)[1])
            for e in self.base_errors
            if e.kind.startswith("MISSING ") and e.start < self.line_start
            and e.kind.split(" ", 1)[1] in self.language.closers
        ]
        if not closed_regions and not virtual:
            return brackets
        kept = [b for b in brackets if not any(e.start <= b.pos < e.end for e in closed_regions)]
        # A virtual closer sorts before a real bracket at the same position (it precedes it).
        return sorted(kept + virtual, key=lambda b: (b.pos, b in kept))

    @property
    def stack_reliable(self) -> bool:
        """Whether the open brackets at the cursor can be trusted to be the user's structure.

        They can unless the user's brackets mismatch, or the prefix itself (parsed alone, so that
        errors only due to its unfinished end do not count) has an error on the cursor's line or
        running into it: then the brackets around the cursor may be anyone's.
        """
        if self._stack_reliable is None:
            self._stack_reliable = not self.stack.damaged and all(
                e.end <= self.line_start for e in self.pre_errors()
            )
        return self._stack_reliable

    def pre_errors(self) -> list[ErrorNode]:
        """Errors of the prefix alone that do not reach its end (those at the end are just unfinished)."""
        return [e for e in self._prefix_errors() if not at_end(e, self.pre)]

    def _prefix_errors(self) -> list[ErrorNode]:
        """Every error of the prefix parsed alone (once)."""
        if self._prefix_alone is None:
            self._prefix_alone = self._errors_aside(self.pre)
        return self._prefix_alone

    def _errors_aside(self, text: bytes) -> list[ErrorNode]:
        """The errors of text, leaving the parser's last tree the judged document's (_opens_block reads it)."""
        last = self.parser.last_text, self.parser.last_tree
        errors = error_nodes(self.parser.parse(text).root_node)
        self.parser.last_text, self.parser.last_tree = last
        return errors

    def line_text_before_cursor(self) -> str:
        return self.pre[self.line_start:].decode("utf-8", "replace")

    def opener_node(self, bracket: Bracket) -> tree_sitter.Node | None:
        """The syntax node that a bracket of the prefix opens (the bracket token's parent)."""
        token = self.base_tree.root_node.descendant_for_byte_range(bracket.pos, bracket.pos + len(bracket.char))
        return token.parent if token is not None else None

    # ------------------------------------------------------------------ indentation

    def _logical_lines(self, text: bytes, start: int, end: int, depth: int, brackets: list[Bracket], spans: Spans) -> tuple[list[tuple[int, int]], int]:
        """Logical lines of text[start:end] as (start, end) pairs, and the bracket depth at end.

        A newline ends a logical line only outside brackets, strings and comments and when not
        escaped by a backslash. The last line is the open one.
        """
        closers = self.language.closers
        lines: list[tuple[int, int]] = []
        line_start = start
        index = 0
        for match in _NEWLINE.finditer(text, start, end):
            newline = match.start()
            while index < len(brackets) and brackets[index].pos < newline:
                depth = max(0, depth + (-1 if brackets[index].char in closers else 1))
                index += 1
            if depth > 0 or spans.excluded(newline) or text[newline - 1:newline] == b"\\":
                continue
            lines.append((line_start, newline))
            line_start = newline + 1
        for bracket in brackets[index:]:
            if bracket.pos < end:
                depth = max(0, depth + (-1 if bracket.char in closers else 1))
        lines.append((line_start, end))
        return lines, depth

    @property
    def window_indent(self) -> int:
        """Indentation of the parsed prefix's first code line. Above 0 the window (or the prefix an
        editor sent) begins inside a block: levels and brackets opened before it are unknown."""
        if self._window_indent is None:
            self._window_indent = 0
            start = 0
            while start < self.cursor:
                end = self.pre.find(b"\n", start)
                end = len(self.pre) if end == -1 else end
                first = self._first_code_byte(self.pre, start, end)
                if first is not None:
                    self._window_indent = _indent_width(self.pre[start:first])
                    break
                start = end + 1
        return self._window_indent

    def _first_code_byte(self, text: bytes, start: int, end: int) -> int | None:
        """Position of the first non-blank byte of a line, None for a blank or comment-only line."""
        position = _BLANK.match(text, start, end).end()
        if position >= end or text[position:position + 1] == b"\n":
            return None
        marker = self.language.line_comment
        if marker and text.startswith(marker.encode(), position):
            return None
        return position

    def _is_header(self, text: bytes, start: int, end: int) -> bool:
        """Does the logical line text[start:end] open a block (table's header_pattern)?"""
        joined = text[start:end].decode("utf-8", "replace").replace("\n", " ")
        return bool(self.language.header_pattern.search(joined))

    def indent_at_cursor_line(self) -> tuple[IndentState, int]:
        """Indentation state before the logical line that holds the cursor, and where that line starts."""
        if self._indent is None:
            state = IndentState()
            # Start at the last top-level statement before the cursor's line: only the enclosing
            # definition matters, and the level there is 0 with no bracket open.
            begin = 0
            for match in _TOP_LEVEL_LINE.finditer(self.pre, 0, self.line_start):
                if not self.base_spans.excluded(match.start()):
                    begin = match.start()
            brackets = [b for b in self.prefix_brackets if b.pos >= begin]
            lines, _ = self._logical_lines(self.pre, begin, self.cursor, 0, brackets, self.base_spans)
            if begin == 0:
                state.open_below = self.window_indent
            for start, end in lines[:-1]:
                first = self._first_code_byte(self.pre, start, end)
                if first is None:
                    continue
                state.accept(_indent_width(self.pre[start:first]), strict=False)
                state.after_header = self._is_header(self.pre, start, end)
            self._indent = (state, lines[-1][0])
        return self._indent

    def _indent_problems(self, doc: bytes, infill_end: int, brackets: list[Bracket], spans: Spans, closed: bool) -> list[Problem]:
        """Indentation errors of the infill's logical lines (tree-sitter's Python grammar accepts most).

        Each line whose first code character comes from the infill must sit at an open level, or
        deeper than the previous line when that one opened a block; when the infill is closed,
        the first code line of the suffix must still fit after it (if it fitted before).
        """
        initial, logical_start = self.indent_at_cursor_line()
        state = initial.copy()
        lines, depth = self._logical_lines(doc, self.cursor, infill_end, len(self.stack.openers), brackets, spans)
        lines[0] = (logical_start, lines[0][1])
        wrote_code = False
        for number, (start, end) in enumerate(lines):
            first = self._first_code_byte(doc, start, end)
            if first is None or first >= infill_end:
                continue
            strict = first >= self.cursor
            problem = state.accept(_indent_width(doc[start:first]), strict=strict)
            if problem:
                return [Problem(max(start, self.cursor), first + 1, problem, True)]
            if number < len(lines) - 1:
                state.after_header = self._is_header(doc, start, end)
                wrote_code = True
        if not closed or depth > 0:
            return []
        following = self._suffix_first_line_indent()
        last_start = lines[-1][0]
        line_end = doc.find(b"\n", infill_end)
        line_end = len(doc) if line_end == -1 else line_end
        if self._first_code_byte(doc, last_start, line_end) is not None:
            state.after_header = self._is_header(doc, last_start, line_end)
            wrote_code = wrote_code or infill_end > self.cursor
        opened_block = wrote_code and state.after_header
        if not state.accept(following, strict=True):
            return []
        if opened_block:
            return [Problem(infill_end, infill_end, "a block header without its block", True)]
        # Otherwise the misfit is the infill's if the document without the infill had none there,
        # or if the prefix is clean: then the suffix is indented for a block whose header the
        # hole must hold (`if MYPY:` before an indented class). Else the cursor is the user's
        # unfinished spot.
        if self.prefix_clean:
            return [Problem(max(last_start, self.cursor), infill_end, "the suffix does not fit the infill's indentation", True)]
        base = initial.copy()
        first = self._first_code_byte(self.base_text, logical_start, self.line_end)
        if first is not None:
            base.accept(_indent_width(self.base_text[logical_start:first]), strict=False)
            base.after_header = self._is_header(self.base_text, logical_start, self.line_end)
        if base.accept(following, strict=True):
            return []
        return [Problem(max(last_start, self.cursor), infill_end, "the suffix does not fit the infill's indentation", True)]

    def _suffix_first_line_indent(self) -> int:
        """Indent of the first code line that starts in the suffix; 0 when there is none (the end
        of the file, or of a window, which always ends before a top-level line)."""
        position = self.suf.find(b"\n")
        while position != -1:
            start = position + 1
            end = self.suf.find(b"\n", start)
            line_end = len(self.suf) if end == -1 else end
            first = self._first_code_byte(self.suf, start, line_end)
            if first is not None:
                if not self.base_spans.excluded(self.cursor + first):
                    return _indent_width(self.suf[start:first])
            position = end
        return 0

    # ------------------------------------------------------------------ judgement

    def judge(self, infill: bytes, closed: bool, tolerate_open_end: bool = False, last_token: int | None = None) -> list[Problem]:
        """What is wrong with the document once infill is inserted at the cursor.

        closed: the infill ends here and the suffix follows it (else more text may follow and an
        unfinished construct at its end is fine). tolerate_open_end: the infill may leave a
        construct open for the user to continue (a single-line `if x:`), so judge it as unclosed.
        last_token: byte offset in infill where its last token starts; when the infill is not
        closed, that token may be the first half of something (`/` of `//`, `$` of `${`), so
        errors reaching it count as unfinished too.
        Lexical problems come first; when there are any, the parse is not consulted.
        """
        if tolerate_open_end and self.language.block_fillers:
            return self._judge_header(infill)
        if tolerate_open_end:
            closed = False
        doc = self.pre + infill + (self.suf if closed else b"")
        end = self.cursor + len(infill)
        tree = self.parser.parse(doc)
        spans = context_spans(tree, self.language, self.cursor, end)
        brackets, stopped = scan_brackets(doc, self.cursor, end, spans, self.language)

        problems = self._enclosure_problems(end, spans)
        problems += self._bracket_problems(brackets, end, closed and stopped is None, doc)
        if not problems and self.language.indent_based and stopped is None:
            problems += self._indent_problems(doc, end, brackets, spans, closed)
        if problems:
            return problems
        # Where the unfinished end begins: the last code token (trailing comments are extras that
        # tree-sitter leaves outside the error), or a literal tree-sitter cannot close yet.
        unfinished = len(doc.rstrip())
        if not closed:
            comments = {c_end: c_start for name, c_start, c_end, _ in spans.captures if name == "comment"}
            while unfinished in comments:
                unfinished = len(doc[: comments[unfinished]].rstrip())
            if last_token is not None:
                unfinished = min(unfinished, self.cursor + last_token)
            if stopped is not None:
                unfinished = min(unfinished, stopped)
        return self._parse_problems(tree, doc, end, closed, unfinished)

    def _judge_header(self, infill: bytes) -> list[Problem]:
        """A single-line completion that stops at a block header: the block is the user's to type,
        but the header must be a whole one (`if (x:` or `return import {` is not). Fine when the
        suffix already holds the block, else judged with the least block that closes it (the
        table's block_fillers) and the suffix after it."""
        problems = self.judge(infill, True)
        if not problems:
            return []
        line = (self.pre[self.line_start:] + infill).decode("utf-8", "replace").rstrip("\r\n")
        for pattern, filler in self.language.block_fillers:
            if pattern.search(line):
                indent = re.match(r"[ \t]*", line).group()
                problems = self.judge(infill + filler.replace("{indent}", indent).encode("utf-8"), True)
                opener = self._last_opener(infill)
                if not problems and opener is not None and not self._opens_block(opener):
                    # `indexOf(value, {` leaves an object literal open, not a block for the user to type
                    return [Problem(opener, opener + 1, "the bracket at the end opens no block", True)]
                return problems
        return problems

    def _last_opener(self, infill: bytes) -> int | None:
        """Document offset of the opening bracket that ends the infill's code (a trailing comment
        aside), or None when the code ends otherwise (Python's `:`)."""
        language = self.language
        comments = [re.escape(m) for m in (language.line_comment, language.block_comment and language.block_comment[0]) if m]
        trailing_comment = f"(?:(?:{'|'.join(comments)}).*)?" if comments else ""
        text = infill.decode("utf-8").rstrip()
        match = re.search(rf"[{re.escape(''.join(language.openers))}](?=\s*{trailing_comment}$)", text)
        return None if match is None else self.cursor + len(text[: match.start()].encode("utf-8"))

    def _opens_block(self, offset: int) -> bool:
        """Whether the bracket at offset opens a block node in the last parsed tree."""
        tree = self.parser.last_tree
        token = tree.root_node.descendant_for_byte_range(offset, offset + 1) if tree is not None else None
        return token is not None and token.parent is not None and token.parent.type in self.language.block_node_types

    def inside_block(self, text: str) -> str | None:
        """``text`` up to where it leaves the block it started in (trailing blanks dropped), or
        None when it never leaves: what block trimming keeps of it first."""
        data = text.encode("utf-8")
        exit_at = self.block_exit(data)
        return None if exit_at is None else data[:exit_at].decode("utf-8", "ignore").rstrip()

    def block_exit(self, infill: bytes) -> int | None:
        """Where the infill leaves the block it started in (byte offset into infill), if it does.

        A block completion should complete the enclosing block, not close it and go on with the
        next definition. Leaving means: a closer that closes a bracket opened before the cursor
        while the suffix closes it too, or (indent-based languages) a line indented less than the
        infill's first line.
        """
        doc = self.pre + infill
        end = self.cursor + len(infill)
        tree = self.parser.parse(doc)
        spans = context_spans(tree, self.language, self.cursor, end)
        brackets, _ = scan_brackets(doc, self.cursor, end, spans, self.language)
        exits: list[int] = []
        if self.suffix_closers:
            depth = 0
            for bracket in brackets:
                depth += -1 if bracket.char in self.language.closers else 1
                if depth < 0:
                    exits.append(bracket.pos)
                    break
        if self.language.indent_based:
            lines, _ = self._logical_lines(doc, self.cursor, end, len(self.stack.openers), brackets, spans)
            level = None
            for start, line_end in [(self.line_start, lines[0][1])] + lines[1:]:
                first = self._first_code_byte(doc, start, line_end)
                if first is None or first < self.cursor:
                    continue  # the level is that of the first line the infill starts
                indent = _indent_width(doc[start:first])
                if level is None:
                    level = indent
                elif indent < level:
                    exits.append(first)
                    break
        if not exits:
            return None
        line_start = doc.rfind(b"\n", self.cursor, min(exits)) + 1
        return max(line_start, self.cursor) - self.cursor

    def _enclosure_problems(self, end: int, spans: Spans) -> list[Problem]:
        """The cursor is in a string/comment that the document closes later: the infill must not close it.

        (When the document does not close it, e.g. the user has just typed the opening quote,
        closing it is the completion's job, and the cursor's site has no enclosure.)
        """
        if self.enclosure is None or end == self.cursor:
            return []
        name, start, _, _ = self.enclosure
        for captured, c_start, c_end, broken in spans.captures:
            if captured == name and c_start == start and c_end <= end and not broken:
                return [Problem(max(self.cursor, c_end - 1), c_end, f"closes the {name} the cursor is in", True)]
        return []

    def _bracket_problems(self, brackets: list[Bracket], end: int, closed: bool, doc: bytes) -> list[Problem]:
        """Closers that match nothing, and (when closed) brackets left open that the suffix does not close."""
        language = self.language
        closers = language.closers
        prefix_stack = [b.char for b in self.stack.openers]
        line_openers = sum(1 for b in self.stack.openers if b.pos >= self.line_start)
        opened: list[Bracket] = []
        consumed: list[Bracket] = []
        for bracket in brackets:
            wanted = closers.get(bracket.char)
            if wanted is None:
                opened.append(bracket)
            elif opened:
                if opened[-1].char != wanted:
                    return [Problem(bracket.pos, bracket.pos + 1, f"{bracket.char} closes {opened[-1].char}", True)]
                opened.pop()
            elif self.stack_reliable:
                if not prefix_stack or prefix_stack[-1] != wanted:
                    return [Problem(bracket.pos, bracket.pos + 1, f"{bracket.char} matches nothing", True)]
                prefix_stack.pop()
                consumed.append(bracket)
            elif prefix_stack and prefix_stack[-1] == wanted:
                prefix_stack.pop()
                consumed.append(bracket)
        if not closed or not self.stack_reliable:
            return []
        base_problems, _ = close_with([b.char for b in self.stack.openers], self.suffix_closers, language)
        after = prefix_stack + [b.char for b in opened]
        problems, unclosed = close_with(after, self.suffix_closers, language)
        # Brackets opened on the cursor's own line, or by the infill, must be closed by the
        # infill or the suffix; those of earlier lines may close further on.
        owned_from = len(prefix_stack) - max(0, line_openers - len(consumed))
        owned = [index for index in unclosed if index >= owned_from]
        if not owned and self.suffix_whole and self.suffix_balanced and self._hole_unbalanced(
                self._prefix_openers()[: len(prefix_stack)] + [(b.char, _line_indent(doc, b.pos, False)) for b in opened]):
            # The suffix closes what the top-level item's prefix never opened, or leaves open what it
            # opened, with the prefix well-formed: the document is broken only because the hole is
            # empty (`if !ok {` is missing before `}`). The completion has to repair that, not leave
            # it as it found it. (Brackets of earlier items are the user's unfinished business; a
            # suffix that opens what it never closes was cut short, and its end proves nothing.)
            return [Problem(end, end, "the code after the cursor needs brackets the infill does not give", True)]
        if problems <= base_problems and not owned:
            return []
        unclosed_infill = [opened[index - len(prefix_stack)] for index in owned if index >= len(prefix_stack)]
        if unclosed_infill:
            return [Problem(b.pos, b.pos + 1, f"{b.char} is never closed", True) for b in unclosed_infill]
        if opened and problems > base_problems:
            # The infill's openers took closers that the document needs for its own.
            return [Problem(b.pos, b.pos + 1, f"{b.char} is never closed", True) for b in opened]
        if consumed and problems > base_problems:
            extra = problems - base_problems
            return [Problem(b.pos, b.pos + 1, f"{b.char} closes what the suffix closes", True) for b in consumed[-extra:]]
        return [Problem(end, end, "leaves a bracket of this line open", True)]

    def _hole_unbalanced(self, after: list[tuple[str, int]]) -> bool:
        """Whether the suffix's closers still mismatch the openers of the cursor's top-level item
        with ``after`` (the stack once the infill is in: bracket and its line's indentation) where
        they mismatch without the infill."""
        outer = sum(1 for b in self.stack.openers if b.pos < self.item_start)

        indents = self.suffix_closer_indents
        item_end = indents.index(0) if 0 in indents else None  # the first closer at column 0 ends the item

        def local_problems(stack: list[tuple[str, int]]) -> int:
            """Stray closers of the cursor's item (indented ones, and the first at column 0; a later
            one at column 0 may close something before the parsed window, a namespace), and
            openers of the item left unclosed (those of earlier items, `function broken(` above,
            may be the user's unfinished business)."""
            stray, unclosed = pair_closers([c for c, _ in stack], self.suffix_closers, self.language,
                                           [i for _, i in stack], indents)
            return sum(1 for index in stray if counts(index)) + sum(1 for index in unclosed if index >= outer)

        def counts(index: int) -> bool:
            """A stray closer is the item's unless a column-0 one past the item's end, or one left
            of where the window's text starts (it closes something the window cut off)."""
            indent = indents[index]
            if indent is None:  # after code on its line
                return True
            return (indent != 0 or index == item_end) and indent >= self.window_indent

        if self._hole_problems is None:
            self._hole_problems = local_problems(self._prefix_openers())
        return self._hole_problems > 0 and local_problems(after) >= self._hole_problems

    def _prefix_openers(self) -> list[tuple[str, int]]:
        """The prefix's open brackets with their lines' indentation."""
        return [(b.char, _line_indent(self.base_text, b.pos, False)) for b in self.stack.openers]

    @property
    def prefix_clean(self) -> bool:
        """The prefix, its open brackets closed, has no error before the cursor's line, and the
        suffix closes every bracket it opens: then errors around the cursor in the document
        without the infill are the empty hole's. (An error from far above, such as a window that
        starts inside a comment, or a suffix cut short, leaves that undecided.)"""
        if not self.suffix_balanced:
            return False
        if self._prefix_clean is None:
            # The prefix with its open brackets closed: an open function body is not an error.
            closing = "".join(self.language.openers[b.char] for b in reversed(self.stack.openers)).encode()
            errors = self._errors_aside(self.pre + b"\n" + closing)
            self._prefix_clean = not self.stack.damaged and all(e.start >= self.line_start for e in errors)
        return self._prefix_clean

    def _parse_problems(self, tree: tree_sitter.Tree, doc: bytes, end: int, closed: bool, unfinished: int) -> list[Problem]:
        """New ERROR/MISSING nodes compared with the document without the infill.

        Errors the base had at the same place are the user's; so are errors confined to lines
        before the cursor's (the infill did not touch that text: tree-sitter only recovered from
        the user's mistake differently) and errors that merely wrap such a region.
        """
        length = end - self.cursor
        found = error_nodes(tree.root_node)
        if closed:
            # Errors that begin on the cursor's line and reach the cursor are the unfinished
            # construct the completion is meant to finish (however far tree-sitter's recovery
            # stretches them): they do not excuse the same error after it. Errors that begin
            # earlier (an unclosed bracket above) stay the user's.
            # So are errors that begin just after the cursor, on its line or the next one: text that
            # only breaks because the hole is empty (`func (r *T) |` + a body on the next line).
            # And with a clean prefix, any error around the cursor or on its line before it is the
            # hole's (tree-sitter's recovery from `for |:` may reach back to the start of the file;
            # `x, y := |` ends its error before the cursor).
            base = [e for e in self.base_errors
                    if not (self.line_start <= e.start <= self.cursor <= e.end or self.cursor <= e.start <= self.next_line_end
                            or self.prefix_clean and (e.start <= self.cursor <= e.end or self.line_start <= e.start <= self.cursor))]
            fresh = new_errors(base, found, self.cursor, length)
            # Past the line after the infill, inside a region at the end of the window that the
            # document without it could not parse either (a file cut off inside a string):
            # tree-sitter recovered from the user's text differently, no error of the infill's.
            broken = [(e.start + length, e.end + length) for e in self.base_errors
                      if e.start > self.next_line_end and e.end >= len(self.base_text) - 1]
            fresh = [e for e in fresh if not (e.start > self.next_line_end + length
                                              and any(start <= e.start and e.end <= stop for start, stop in broken))]
        else:
            # More text may follow: errors reaching the unfinished end are not errors yet. The user's own
            # errors are those of the prefix alone, plus those the full document shows strictly
            # before the cursor (e.g. `foo(a b, ` is broken whatever comes next).
            found = [e for e in found if e.end < unfinished]
            base = self.pre_errors() + [e for e in self.base_errors if e.end < self.cursor]
            fresh = new_errors(base, found, self.cursor, 0)
        # The user's errors before the cursor's line (not new ones the infill caused there, such as a
        # MISSING node at the line break before `>>`): an error wrapping them is excused.
        earlier = [e for e in found if e.end <= self.line_start and e not in fresh]
        fresh = [
            e for e in fresh
            if e.end > self.line_start
            and not (e.start < self.line_start and any(e.start <= o.start and o.end <= e.end for o in earlier))
        ]
        return [Problem(e.start, e.end, e.kind, False) for e in innermost_errors(fresh)]
