"""Run cases through the engine and score each completion.

:func:`score` is the one place a completion becomes a result row; it takes the completion as
an argument, so a model's output, a perfect answer and a broken one are scored the same way.
:func:`evaluate` drives the engine over a list of cases with a progress display.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence, TextIO

from difill.evaluation import metrics
from difill.evaluation.cases import Case
from difill.evaluation.execution import run_tests
from difill.evaluation.sandbox import Limits

log = logging.getLogger(__name__)


@dataclass
class Settings:
    mode: str = "auto"
    max_tokens: int | None = None
    steps: int | None = None
    run_tests: bool = True
    limits: Limits = Limits()


def score(case: Case, completion: str, *, latency_ms: float | None = None, tokens: int | None = None,
          steps: int | None = None, run: bool = True, limits: Limits = Limits(), error: str | None = None) -> dict:
    """One result row: the metrics of ``completion`` on ``case`` (and its tests, when ``run``)."""
    row = {"id": case.id, "language": case.language, "kind": case.kind, "source": case.source,
           "completion": completion, "reference": case.reference, "latency_ms": latency_ms, "tokens": tokens,
           "steps": steps, "error": error, "exact": False, "edit_similarity": 0.0, "non_empty": False,
           "syntax_valid": None, "passed": None, "test_outcome": None, "test_detail": None}
    if error is not None:
        row["ok"] = False
        return row
    row["exact"] = metrics.exact_match(completion, case.reference)
    row["edit_similarity"] = round(metrics.edit_similarity(completion, case.reference), 4)
    row["non_empty"] = bool(completion.strip())
    if row["non_empty"]:
        row["syntax_valid"] = metrics.syntax_valid(case.prefix, completion, case.suffix, case.reference, case.language)
    if case.has_tests and run:
        if completion == case.reference:
            # The file as it was: its tests pass by definition (SAFIM's harness does the same).
            row["passed"], row["test_outcome"] = True, "reference"
        else:
            outcome = run_tests(case, completion, limits)
            row["passed"], row["test_outcome"], row["test_detail"] = outcome.passed, outcome.outcome, outcome.detail or None
    row["ok"] = bool(row["passed"]) if row["passed"] is not None else row["exact"]
    return row


class Progress:
    """A bar on a terminal; one plain line per case in CI logs (no carriage returns)."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True):
        self.total, self.done, self.ok = total, 0, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty() and not os.environ.get("CI")
        self.start = time.perf_counter()

    def update(self, row: dict) -> None:
        self.done += 1
        self.ok += bool(row.get("ok"))
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        if self.tty:
            width = 30
            filled = int(width * self.done / max(1, self.total))
            eta = elapsed / self.done * (self.total - self.done)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                              f"ok {self.ok} | {elapsed:.0f}s, {eta:.0f}s left ")
            if self.done == self.total:
                self.stream.write("\n")
        else:
            status = "error" if row.get("error") else ("ok" if row.get("ok") else "fail")
            latency = f"{row['latency_ms']:.0f} ms" if row.get("latency_ms") is not None else "-"
            self.stream.write(f"[{self.done}/{self.total}] {row['id']}: {status} ({latency})\n")
        self.stream.flush()


def evaluate(cases: Sequence[Case], engine, settings: Settings = Settings(), progress: bool = True,
             complete: Callable[[Case], tuple[str, dict]] | None = None) -> list[dict]:
    """Complete every case with ``engine`` and score it. A case whose completion raises is an
    error row (counted, reported), never the end of the run."""
    from difill.inference.engine import InfillRequest

    bar = Progress(len(cases), enabled=progress)
    rows = []
    for case in cases:
        try:
            if complete is not None:
                completion, stats = complete(case)
            else:
                language = case.language if case.language not in {"unknown", ""} else None
                request = InfillRequest(prefix=case.prefix, suffix=case.suffix, language=language, path=case.path,
                                        mode=settings.mode, max_tokens=settings.max_tokens, steps=settings.steps)
                result = engine.infill(request)
                completion = result.completion
                stats = {"latency_ms": result.latency_ms, "tokens": result.tokens, "steps": result.steps}
            row = score(case, completion, run=settings.run_tests, limits=settings.limits, **stats)
        except (ValueError, RuntimeError, KeyError, IndexError) as exc:
            log.warning("%s: %s", case.id, exc)
            row = score(case, "", error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
        bar.update(row)
    return rows
