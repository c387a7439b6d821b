"""Completion modes: how much text the cursor wants, and trimming a completion to fit.

"line" completes the rest of the current line; "block" completes whole statements (the body of
a header just typed, or the next statements in a body). The decision comes from the cursor's
syntactic position, and trimming cuts the model's text back to a syntactic boundary, because a
diffusion canvas has a fixed length and its end rarely falls where the code does.
"""

from __future__ import annotations

import logging
import re

from .languages import Language
from .site import CursorSite

logger = logging.getLogger(__name__)

LINE = "line"
BLOCK = "block"

_WORD = re.compile(r"\w")
# A chunk of 6+ characters written three times in a row: a small model's loop. Searched in lines
# up to _LOOP_LINE_CHARS long (the search grows with the square of the length: 1 ms at 400).
_LOOP = re.compile(r"(.{6,}?)\1\1")
_LOOP_LINE_CHARS = 300
# Without a grammar: brackets counted naively, for the fallbacks only.
_OPENERS = "([{"
_CLOSERS = ")]}"


def _rest_of_line(suffix: str) -> str:
    return suffix.split("\n", 1)[0]


def _line_before(prefix: str) -> str:
    return prefix[prefix.rfind("\n") + 1:]


def _header_of_the_body_below(prefix: str, suffix: str) -> bool:
    """On a blank line, the next non-blank line is indented deeper than the cursor: its body
    is already written, so the line at the cursor is its header (`def f(x):`, `if (a) {`), one
    line, and a block would write the body a second time."""
    current = _line_before(prefix)
    if current.strip():
        return False
    for line in suffix.split("\n")[1:]:
        if line.strip():
            indent = line[: len(line) - len(line.lstrip())]
            return len(indent.expandtabs(8)) > len(current.expandtabs(8))
    return False


def _heuristic_mode(prefix: str) -> str:
    """Mode for an unknown language: a block after a line ending in ':' or '{', else a line."""
    current = _line_before(prefix)
    if current.strip():
        return BLOCK if current.rstrip().endswith((":", "{")) else LINE
    lines = prefix.split("\n")
    previous = lines[-2] if len(lines) > 1 else ""
    return BLOCK if previous.rstrip().endswith((":", "{")) else LINE


def decide_mode(prefix: str, suffix: str, language: Language | None) -> str:
    """"line" or "block" from the cursor's syntactic position.

    Block: at the end of a block header (`def f():`, `if x {`: the table's header_pattern), or on
    an empty line where statements go: no bracket open (Python bodies, top level), or the
    innermost open bracket opens a block node of the table (`{` of a function body, not of an
    object literal). Line: the rest of a non-empty line, inside a string or comment, on an
    empty line inside an expression's brackets (call arguments, literals), or on an empty line
    above a body that is indented deeper (its header is missing). Unknown language: a
    text heuristic (block only right after a line ending in ':' or '{').
    """
    if _rest_of_line(suffix).strip() or _header_of_the_body_below(prefix, suffix):
        return LINE
    if language is None:
        return _heuristic_mode(prefix)
    site = CursorSite(language, prefix, suffix)
    if site.context is not None and site.context[0] != "code":
        return LINE
    current = _line_before(prefix)
    if current.strip():
        return BLOCK if language.header_pattern.search(current) else LINE
    if not site.stack.openers:
        return BLOCK
    opener = site.stack.openers[-1]
    node = site.opener_node(opener)
    if node is not None and not node.is_error and not node.has_error:
        return BLOCK if node.type in language.block_node_types else LINE
    # The parse around the opener is broken (often: the suffix does not close it yet), so fall
    # back to the text: does the opener end a block header?
    line_start = site.base_text.rfind(b"\n", 0, opener.pos) + 1
    header = site.base_text[line_start:opener.pos + len(opener.char)].decode("utf-8", "replace")
    return BLOCK if language.header_pattern.search(header) else LINE


def _problem_count(site: CursorSite | None, text: str) -> int:
    return len(site.judge(text.encode("utf-8"), closed=True)) if site is not None else 0


def _naive_balance(text: str) -> int:
    """Openers minus closers, ignoring strings: only for languages without a grammar."""
    return sum(text.count(o) for o in _OPENERS) - sum(text.count(c) for c in _CLOSERS)


def _drop_suffix_overlap(text: str, suffix: str, site: CursorSite | None) -> str:
    """Drop the end of text that repeats what follows the cursor on its line (`)` then `)`).

    Only overlaps that are punctuation, or the whole rest of the line, are candidates, and with
    a grammar the drop must not make the document worse: `print(` + `foo()` + `)` keeps its `)`.
    """
    rest = _rest_of_line(suffix).rstrip()
    for size in range(min(len(rest), len(text)), 0, -1):
        overlap = rest[:size]
        if not overlap.strip() or not text.endswith(overlap):
            continue
        punctuation = not _WORD.search(overlap)
        if not (punctuation or size == len(rest)):
            continue
        trimmed = text[:-size]
        if site is not None:
            if _problem_count(site, trimmed) <= _problem_count(site, text):
                return trimmed
        elif punctuation and (_naive_balance(text) < 0 or any(text.count(q) % 2 for q in "\"'`" if q in overlap)):
            return trimmed
    return text


def _strip_trailing_blank(text: str, suffix: str) -> str:
    """Remove trailing whitespace-only lines; keep a final line break if suffix text follows on the line."""
    stripped = text.rstrip()
    tail = text[len(stripped):]
    if _rest_of_line(suffix).strip() and "\n" in tail:
        return stripped + "\n" + tail.rsplit("\n", 1)[1]
    return stripped


def _loop_end(line: str) -> int | None:
    """Where a chunk written three times in a row inside the line first ends (after the first
    `r2.Key == r2.Key && ` of three), or None. Rulers and runs of one character (`# =====`)
    are no loop."""
    if len(line) > _LOOP_LINE_CHARS:
        return None
    for match in _LOOP.finditer(line):
        chunk = match.group(1)
        if _WORD.search(chunk) and len(set(chunk.strip())) >= 3:
            return match.start() + len(chunk)
    return None


def stop_at_stutter(prefix: str, text: str) -> str:
    """Cut a completion at its first repetition: before a line that repeats the line above it
    (the cursor's line counts, whole), or after the first of three copies of a chunk inside a
    line. Small models stutter (`value += 0.0` nine times, `a == b && a == b && ...` to the end
    of the canvas), repetition is almost never what the user wants, and editors' completion
    tools filter it the same way. The engine also stops growing a completion that stutters."""
    lines = text.split("\n")
    previous = (prefix[prefix.rfind("\n") + 1:] + lines[0]).strip()
    for index in range(len(lines)):
        loop = _loop_end(lines[index])
        if loop is not None:
            return "\n".join(lines[:index] + [lines[index][:loop]]).rstrip()
        if index == 0:
            continue
        current = lines[index].strip()
        if current and current == previous and _WORD.search(current):  # `}` under `}` is no stutter
            return "\n".join(lines[:index]).rstrip()
        previous = current or previous
    return text


def _drop_repeated_lines(text: str, suffix: str, site: CursorSite | None) -> str:
    """Drop the completion's last lines when they repeat the first lines after the cursor."""
    lines = text.split("\n")
    following = [line.strip() for line in suffix.split("\n") if line.strip()]
    for count in range(min(len(lines), len(following)), 0, -1):
        if [line.strip() for line in lines[-count:]] != following[:count]:
            continue
        candidate = "\n".join(lines[:-count]).rstrip()
        repeated = "".join(following[:count])
        if site is not None:
            if _problem_count(site, candidate) <= _problem_count(site, text):
                return candidate
        elif _WORD.search(repeated) or _naive_balance(text) < 0:
            return candidate
    return text


def _statement_ends(site: CursorSite, text: str) -> set[int]:
    """Character offsets in text where a statement (a child of a block node) ends."""
    data = text.encode("utf-8")
    site.judge(data, closed=True)
    tree = site.parser.last_tree
    if tree is None:
        return set()
    low, high = site.cursor, site.cursor + len(data)
    ends: set[int] = set()
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        if node.end_byte <= low or node.start_byte >= high:
            continue
        parent = node.parent
        if (
            parent is not None
            and parent.type in site.language.block_node_types
            and node.is_named
            and not node.has_error
            and low < node.end_byte <= high
        ):
            ends.add(len(data[: node.end_byte - low].decode("utf-8", "ignore")))
        stack.extend(node.children)
    return ends


MAX_CUTS = 48


def _cut_to_complete(text: str, site: CursorSite | None) -> str:
    """End the completion at the end of a complete statement or block.

    With a grammar: first stop where the completion leaves the block it started in (it should
    complete that block, not start the next definition); then the longest cut (at a statement end or a line end) whose document has no new
    problems; if none is clean, the one with the fewest. Without one: the last line end where
    the brackets opened by the completion are all closed.
    """
    if site is None:
        if _naive_balance(text) <= 0:
            return text
        balance, best = 0, None
        for index, char in enumerate(text):
            if char == "\n" and balance == 0 and text[:index].strip():
                best = index
            balance += (char in _OPENERS) - (char in _CLOSERS)
        return text[:best].rstrip() if best is not None else text
    problems = _problem_count(site, text)
    inside = site.inside_block(text)
    if inside is not None and inside.strip() and _problem_count(site, inside) <= problems:
        logger.debug("cut where the completion leaves its block: %r -> %r", text, inside)
        text = inside
        problems = _problem_count(site, text)
    if not problems:
        return text
    cuts = {index for index, char in enumerate(text) if char == "\n"} | _statement_ends(site, text)
    best_text, best_problems = text, problems
    seen: set[str] = set()
    for cut in sorted((c for c in cuts if 0 < c < len(text)), reverse=True)[:MAX_CUTS]:
        candidate = text[:cut].rstrip()
        if not candidate.strip() or candidate in seen:
            continue
        seen.add(candidate)
        count = _problem_count(site, candidate)
        if count < best_problems:
            best_text, best_problems = candidate, count
            if count == 0:
                break
    if best_text != text:
        logger.debug("trimmed a partial statement: %r -> %r", text, best_text)
    return best_text


def trim_completion(prefix: str, completion: str, suffix: str, language: Language | None, mode: str) -> str:
    """Trim a completion to a syntactic boundary.

    line: stop at the end of the first line, and at a loop inside it. block: strip trailing blank
    lines, stop at a loop or before a line that repeats the line above it, drop lines that repeat
    the suffix, then end at the end of a complete statement or block (dropping a trailing partial
    statement when possible). Both: never duplicate text that already follows the cursor (suffix
    starts with `)` and completion ends with `)` -> drop it, when that helps).
    """
    if mode == LINE:
        text = stop_at_stutter(prefix, completion.split("\n", 1)[0])
        if not _rest_of_line(suffix).strip():
            text = text.rstrip()
        if not text.strip():
            return ""
        rest = _rest_of_line(suffix).strip()
        site = CursorSite(language, prefix, suffix) if language is not None and rest else None
        return _drop_suffix_overlap(text, suffix, site) if rest else text
    text = _strip_trailing_blank(completion, suffix)
    if not text.strip():
        return ""
    site = CursorSite(language, prefix, suffix) if language is not None else None
    text = stop_at_stutter(prefix, text)
    if not text.strip():
        return ""
    text = _drop_repeated_lines(text, suffix, site)
    text = _drop_suffix_overlap(text, suffix, site)
    return _cut_to_complete(text, site)
