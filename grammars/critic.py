"""SyntaxCritic: judges a canvas between denoising steps and names the tokens that broke it."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .languages import Language
from .site import CursorSite, Problem

logger = logging.getLogger(__name__)


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
        """A single-line completion may stop at a block header, leaving the block to the user."""
        if self.mode != "line" or "\n" in infill.strip():
            return False
        return bool(self.language.header_pattern.search(self._cursor_line + infill.rstrip()))

    def review(self, pieces: Sequence[str | None], newly_committed: Sequence[int], ended: bool) -> list[int]:
        """Positions among newly_committed whose tokens introduced new syntax errors.

        Only the contiguous decoded run from the start of the canvas can be parsed; tokens after
        the first masked position are judged once the gap is filled. The suffix joins the
        judgement only when the whole canvas is decoded and ended.
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
        self.last_problems = problems
        if not problems:
            return []
        blamed = self._blame(problems, texts)
        result = sorted(blamed & candidates)
        if not result:
            # tree-sitter may put the error node on an older token (`x = a` + ` b` marks `a`);
            # if the run was fine before the new tokens, the first one that breaks it is the culprit.
            result = self._first_breaking(texts, sorted(candidates), closed, tolerate)
            self.last_blamed_old = sorted(blamed - candidates) if not result else []
            if not result:
                logger.debug("problems %s point only at earlier tokens %s", problems, self.last_blamed_old)
        return result

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
