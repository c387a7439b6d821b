"""SyntaxCritic: judges a canvas between denoising steps and names the tokens that broke it."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from .languages import Language
from .site import CursorSite, Problem
from .syntax import close_with, context_spans, scan_brackets

logger = logging.getLogger(__name__)

# SyntaxCritic.longest_valid_prefix cuts after each of these units, at most this many times.
_UNIT = re.compile(r"\w+|\s+|[^\w\s]")
MAX_PREFIX_CUTS = 64


def _last_token(texts: list[str]) -> int | None:
    """Byte offset where the last non-blank piece starts (None if there is none)."""
    offset = sum(len(t.encode("utf-8")) for t in texts)
    for text in reversed(texts):
        offset -= len(text.encode("utf-8"))
        if text.strip():
            return offset
    return None


class SyntaxCritic:
    """Checks a canvas while it is denoised, between steps.

    The judgement is "no new syntax errors": errors the user's document already has are not the
    completion's fault, and text that may still continue is allowed to end in an unfinished
    construct. The document without the completion is parsed once here; each review reparses
    incrementally (only the canvas region changes), so a review costs well under a millisecond
    on normal files.
    """

    def __init__(self, language: Language, prefix: str, suffix: str, mode: str) -> None:
        self.language = language
        self.mode = mode
        self._site = CursorSite(language, prefix, suffix)
        self._cursor_line = self._site.line_text_before_cursor()
        # The problems found by the last review or is_valid, for logging and diagnostics.
        self.last_problems: list[Problem] = []
        # Positions committed in earlier steps that the last review's problems point at: the engine
        # may not re-mask them (only newly committed tokens are returned), but may want to know.
        self.last_blamed_old: list[int] = []

    @property
    def parse_seconds(self) -> float:
        """Total time spent in tree-sitter so far (setup included)."""
        return self._site.parse_seconds

    @parse_seconds.setter
    def parse_seconds(self, value: float) -> None:
        self._site.parser.parse_seconds = value

    def _open_end_allowed(self, infill: str) -> bool:
        """A single-line completion may stop at a block header, leaving the block to the user:
        where nothing follows the cursor on its line (`=> {` before the line's `;` is no header)."""
        if self.mode != "line" or "\n" in infill.strip() or not self._site.rest_of_line_blank:
            return False
        return bool(self.language.header_pattern.search(self._cursor_line + infill.rstrip()))

    def review(self, pieces: Sequence[str | None], newly_committed: Sequence[int], ended: bool) -> list[int]:
        """Positions among newly_committed whose tokens introduced new syntax errors.

        Only the contiguous decoded run from the start of the canvas can be parsed; tokens after
        the first masked position are judged once the gap is filled. The suffix joins the
        judgement only when the whole canvas is decoded and ended; then the last piece is
        normally the end token's ("" for end-of-infill), and it alone is blamed when the text
        could go on but may not end there.
        """
        run = 0
        while run < len(pieces) and pieces[run] is not None:
            run += 1
        candidates = {i for i in newly_committed if 0 <= i < run}
        self.last_problems, self.last_blamed_old = [], []
        if not candidates:
            return []
        texts = [piece or "" for piece in pieces[:run]]
        infill = "".join(texts)
        closed = ended and run == len(pieces)
        tolerate = closed and self._open_end_allowed(infill)
        problems = self._site.judge(infill.encode("utf-8"), closed, tolerate, _last_token(texts))
        if problems and closed and self._valid_once_trimmed(infill):
            problems = []
        self.last_problems = problems
        if not problems:
            return []
        last = run - 1
        if closed and not tolerate and last in candidates:
            # Fine as long as more text may follow, wrong once it ends: ending here is the mistake
            # (`foo(a` + end of infill), so only the last position (the end token) is blamed.
            # Unless the parse puts an error on other new tokens: the judgement of unfinished text
            # excuses errors that reach its end, so `f(a,,` is judged once more with its brackets
            # closed (`f(a,,)`), where the error no longer reaches the end.
            on_new = self._parse_blame(problems, texts, candidates - {last})
            if not on_new:
                closers = self._missing_closers(infill)
                if closers:
                    repaired = self._site.judge((infill + closers).encode("utf-8"), True)
                    on_new = self._parse_blame(repaired, texts, candidates - {last})
            if on_new:
                return on_new
            if not self._site.judge(infill.encode("utf-8"), False):  # no last_token: the end follows it
                return [last]
        blamed = self._blame(problems, texts)
        result = sorted(blamed & candidates)
        if closed and len(result) > 1 and last in result and not texts[last].strip():
            result.remove(last)  # a blank end blamed beside real culprits: they are the mistake
        if not result:
            # tree-sitter may put the error node on an older token (`x = a` + ` b` marks `a`);
            # if the run was fine before the new tokens, the first one that breaks it is the culprit.
            result = self._first_breaking(texts, sorted(candidates), closed, tolerate)
            self.last_blamed_old = sorted(blamed - candidates) if not result else []
            if not result:
                logger.debug("problems %s point only at earlier tokens %s", problems, self.last_blamed_old)
        return result

    def _valid_once_trimmed(self, infill: str) -> bool:
        """Whether the text that trimming would keep of this ended infill is valid: a line
        completion's first line, a block completion up to where it leaves the block it started in
        (`return true;` then the method's `}` and the next method). Then ending here is no
        mistake: the rest is never shown, and forbidding the end only forces the model on."""
        kept = infill.split("\n", 1)[0].rstrip() if self.mode == "line" else self._site.inside_block(infill)
        return (kept is not None and bool(kept.strip()) and kept != infill.rstrip()
                and not self._site.judge(kept.encode("utf-8"), True))

    def _parse_blame(self, problems: list[Problem], texts: list[str], candidates: set[int]) -> list[int]:
        """Candidate positions under the parse errors of problems (not lexical problems, and not
        zero-width ones at the end of the infill: those are about where it ends)."""
        end = self._site.cursor + sum(len(text.encode("utf-8")) for text in texts)
        inside = [p for p in problems if not p.lexical and (p.end > p.start or p.start < end)]
        return sorted(self._blame(inside, texts) & candidates)

    def _missing_closers(self, infill: str) -> str | None:
        """The closers that the brackets open after prefix + infill need and the suffix does not
        give, innermost first ("" when none; None when the infill mismatches a bracket or ends
        inside a literal: nothing to repair then)."""
        site, language = self._site, self.language
        doc = site.pre + infill.encode("utf-8")
        tree = site.parser.parse(doc)
        spans = context_spans(tree, language, site.cursor, len(doc))
        brackets, stopped = scan_brackets(doc, site.cursor, len(doc), spans, language)
        if stopped is not None:
            return None
        stack = [b.char for b in site.stack.openers]
        for bracket in brackets:
            opener = language.closers.get(bracket.char)
            if opener is None:
                stack.append(bracket.char)
            elif stack and stack[-1] == opener:
                stack.pop()
            else:
                return None
        _, unclosed = close_with(stack, site.suffix_closers, language)
        return "".join(language.openers[stack[i]] for i in reversed(unclosed))

    def _first_breaking(self, texts: list[str], candidates: list[int], closed: bool, tolerate: bool) -> list[int]:
        """The newly committed position that broke a run whose error node sits on an older token.

        Growing the run one new token at a time finds a token that breaks an unfinished run. A
        token that filled a gap in the middle of text decoded earlier (diffusion decodes out of
        order), or that ended the infill, is tested by leaving it out: if the rest is fine without
        it, it is the culprit. A new token at the end of an unfinished run that only reveals an
        older mistake is not blamed.
        """
        first = candidates[0]
        if self._site.judge("".join(texts[:first]).encode("utf-8"), False, last_token=_last_token(texts[:first])):
            return []  # broken before any new token: not theirs
        for index in candidates:
            if index == len(texts) - 1:
                break
            run = texts[: index + 1]
            if self._site.judge("".join(run).encode("utf-8"), False, last_token=_last_token(run)):
                return [index]
        for index in candidates:
            # The last token of an unfinished run is not tested: without it the run may only
            # look fine because an unfinished end is tolerated (`foo(a b` + `)`).
            if (index == len(texts) - 1 and not closed) or not texts[index].strip():
                continue
            rest = texts[:index] + texts[index + 1:]
            if not self._site.judge("".join(rest).encode("utf-8"), closed, tolerate, _last_token(rest)):
                return [index]
        return []

    def _blame(self, problems: list[Problem], texts: list[str]) -> set[int]:
        """Canvas positions whose text overlaps a problem.

        A zero-width problem (a MISSING token at m) blames the token at m, which came where the
        missing one was expected; at the end of the infill, the last tokens (and empty ones there).
        """
        cursor = self._site.cursor
        ranges = []
        offset = cursor
        for text in texts:
            size = len(text.encode("utf-8"))
            ranges.append((offset, offset + size))
            offset += size
        blamed: set[int] = set()
        for problem in problems:
            for index, (start, end) in enumerate(ranges):
                if problem.end > problem.start:
                    hit = start < problem.end and end > problem.start
                elif problem.start < offset:
                    hit = start <= problem.start < end
                else:
                    hit = end == offset
                if hit:
                    blamed.add(index)
        return blamed

    def is_valid(self, completion: str) -> bool:
        """True when prefix + completion + suffix has no syntax error that prefix + suffix lacks.

        Stricter than comparing counts: each remaining error must be one the document already had
        at the same place, and an unfinished line at the cursor must be finished. A single-line
        completion in line mode may end at a block header (the user types the block).
        """
        problems = self._site.judge(completion.encode("utf-8"), True, self._open_end_allowed(completion))
        self.last_problems = problems
        return not problems

    def continued(self, earlier: Sequence[str]) -> "ContinuedCritic":
        """This critic for a canvas that continues text already committed (the engine's later
        blocks): reviews see the earlier pieces first, positions stay those of the canvas."""
        return ContinuedCritic(self, list(earlier))

    def longest_valid_prefix(self, completion: str, max_cuts: int = MAX_PREFIX_CUTS) -> str | None:
        """The longest non-blank prefix of completion that :meth:`is_valid` accepts, or None.

        The engine's last resort for a completion the constraint could not keep valid while
        denoising (a step cap, a review budget used up): a shorter completion that adds no new
        error beats one that breaks the file. Cuts fall at the ends of words, runs of blanks and
        single punctuation characters (not after blanks: trailing blanks are trimmed anyway), tried
        from the longest down, at most max_cuts of them, because validity is not monotonic in the
        length (`f(a` is wrong, `f(a)` fine, `f(a)+` wrong).
        """
        cuts = sorted(
            {m.end() for m in _UNIT.finditer(completion) if m.end() < len(completion) and not m.group().isspace()},
            reverse=True,
        )
        for cut in cuts[:max_cuts]:
            candidate = completion[:cut]
            if candidate.strip() and self.is_valid(candidate):
                return candidate
        return None


class ContinuedCritic:
    """A :class:`SyntaxCritic` over ``earlier`` pieces + the canvas: the infill so far is judged
    whole, and only canvas positions are returned (the earlier pieces are final)."""

    def __init__(self, critic: SyntaxCritic, earlier: list[str]) -> None:
        self.critic = critic
        self.earlier = earlier

    @property
    def parse_seconds(self) -> float:
        return self.critic.parse_seconds

    @property
    def last_blamed_old(self) -> list[int]:
        return [p - len(self.earlier) for p in self.critic.last_blamed_old if p >= len(self.earlier)]

    def review(self, pieces: Sequence[str | None], newly_committed: Sequence[int], ended: bool) -> list[int]:
        offset = len(self.earlier)
        blamed = self.critic.review(self.earlier + list(pieces), [p + offset for p in newly_committed], ended)
        return [p - offset for p in blamed if p >= offset]
