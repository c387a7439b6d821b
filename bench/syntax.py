"""Benchmark of the syntax constraint: the FIM set completed with and without it, per language.

    python bench/syntax.py --limit 5          # at most 5 cases per language, table
    python bench/syntax.py --json             # the whole set; one JSON object on stdout (table on stderr)
    python bench/syntax.py --out syntax.json  # also write that JSON object to a file
    python bench/syntax.py --model runs/small/export   # another checkpoint
    python bench/syntax.py --min-tokens 4     # stress: the model may not end before 4 tokens

Every case of ``evaluation/fimset`` whose language difill has a grammar for is completed twice
with the same request, once with ``constrain_syntax=False`` and once with ``True``, and scored
with ``difill.evaluation.metrics``:

* syntax valid: prefix + completion + suffix parses with no error node, counted over the cases
  whose prefix + reference + suffix parses cleanly (else "no new error" is not well defined) and
  whose completion is non-empty (an empty completion adds nothing; the non-empty rate is beside
  it, so that a constraint that only empties completions shows);
* exact match (whitespace-insensitive), over all cases;
* pass@1 where a case has tests (the FIM set has none: reported as null);
* also, over every non-empty completion: no more error nodes than with the reference
  (``valid_vs_reference_*``, the metric of ``difill eval``), which also counts the cases whose
  window does not parse cleanly (most C, C++ and TSX holes);
* latency (the engine's ``latency_ms``, mean and p95) and, with the constraint, the share of it
  spent in tree-sitter (``parse_ms / latency_ms``), plus the critic's re-masks (positions that
  were committed in one step and masked again in the next; nothing else re-masks by default;
  a rejected token that a next-best token of the same step replaces is not seen here) and the
  completions the constraint returned still invalid (``InfillResult.syntax_valid`` False).

``--min-tokens K`` is a stress condition for weak checkpoints, which mostly end the infill at
once (then the constraint has nothing to do): the model's own distributions, with the end and
line-break tokens forbidden at the first K canvas positions, so that its tokens reach the critic.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch

from difill import grammars
from difill.evaluation import metrics
from difill.evaluation.cases import Case, load_cases
from difill.evaluation.execution import run_tests
from difill.inference.engine import Engine, InfillRequest, StepView

FIMSET = Path(__file__).resolve().parent.parent / "evaluation" / "fimset"
log = logging.getLogger("bench.syntax")


def _remask_counter(mask_id: int) -> tuple[list[int], Callable[[StepView], None]]:
    """An on_step callback counting canvas positions that go from committed back to masked."""
    count = [0]
    last: dict[int, list[int]] = {}

    def on_step(view: StepView) -> None:
        row = view.canvas[0]
        previous = last.get(view.block)
        if previous is not None and len(previous) == len(row):
            count[0] += sum(1 for before, now in zip(previous, row) if before != mask_id and now == mask_id)
        last[view.block] = list(row)

    return count, on_step


class NoEarlyEnd:
    """The engine's denoiser, with ending (end or line-break tokens) forbidden before position k."""

    def __init__(self, real, end_mask: torch.Tensor, k: int) -> None:
        self.real, self.end_mask, self.k = real, end_mask, k
        self.name = getattr(real, "name", "torch")

    def prefill(self, cache, ids, positions) -> None:
        self.real.prefill(cache, ids, positions)

    def canvas_logits(self, cache, canvas, positions, select=None, key_valid=None) -> torch.Tensor:
        logits = self.real.canvas_logits(cache, canvas, positions, select, key_valid)
        if select is None:
            select = torch.ones(canvas.shape, dtype=torch.bool)
        columns = torch.arange(canvas.shape[1])[None].expand(canvas.shape[0], -1)[select.cpu()]
        early = (columns < self.k).to(logits.device)
        return logits.masked_fill(early[:, None] & self.end_mask[None, :].to(logits.device), float("-inf"))


def complete(engine: Engine, case: Case, constrain: bool) -> dict:
    """One completion of a case and its scores."""
    remasks, on_step = _remask_counter(engine.model.config.mask_token_id)
    request = InfillRequest(prefix=case.prefix, suffix=case.suffix, language=case.language, path=case.path,
                            constrain_syntax=constrain)
    result = engine.infill(request, on_step=on_step)
    completion = result.completion
    row = {"completion": completion, "non_empty": bool(completion.strip()),
           "exact": metrics.exact_match(completion, case.reference), "latency_ms": result.latency_ms,
           "parse_ms": result.parse_ms, "remasks": remasks[0], "engine_valid": result.syntax_valid,
           "mode": result.mode, "passed": None}
    if case.has_tests:
        row["passed"] = completion == case.reference or run_tests(case, completion).passed
    return row


def _rate(hits: int, total: int) -> float | None:
    return round(hits / total, 4) if total else None


def summarize(rows: list[dict]) -> dict:
    """Per-language figures from the per-case rows (each has 'clean', 'off' and 'on')."""
    out: dict = {"cases": len(rows), "clean_cases": sum(r["clean"] for r in rows)}
    for key, name in (("on", "constrained"), ("off", "unconstrained")):
        runs = [r[key] for r in rows]
        judged = [r[key] for r in rows if r["clean"] and r[key]["non_empty"]]
        latencies = [run["latency_ms"] for run in runs]
        tested = [run for run in runs if run["passed"] is not None]
        out[f"valid_{name}"] = _rate(sum(run["valid"] for run in judged), len(judged))
        out[f"valid_judged_{name}"] = len(judged)
        non_empty = [run for run in runs if run["non_empty"]]
        out[f"valid_vs_reference_{name}"] = _rate(sum(bool(run["valid_vs_reference"]) for run in non_empty), len(non_empty))
        out[f"nonempty_{name}"] = _rate(sum(run["non_empty"] for run in runs), len(runs))
        out[f"exact_{name}"] = _rate(sum(run["exact"] for run in runs), len(runs))
        out[f"pass_at_1_{name}"] = _rate(sum(bool(run["passed"]) for run in tested), len(tested))
        out[f"latency_mean_ms_{name}"] = round(sum(latencies) / len(latencies), 1) if latencies else None
        out[f"latency_p95_ms_{name}"] = round(metrics.percentile(latencies, 95), 1) if latencies else None
    on = [r["on"] for r in rows]
    latency = sum(run["latency_ms"] for run in on)
    out["parse_ms_share"] = round(sum(run["parse_ms"] for run in on) / latency, 4) if latency else None
    out["parse_ms_mean"] = round(sum(run["parse_ms"] for run in on) / len(on), 3) if on else None
    out["remasks_constrained"] = sum(run["remasks"] for run in on)
    out["returned_invalid_constrained"] = sum(run["engine_valid"] is False for run in on)
    return out


def _fmt(value, percent: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:g}"


def table(summary: dict) -> str:
    """The figures as a fixed-width table (on = constrained, off = unconstrained)."""
    header = (f"{'language':<11} {'cases':>5} {'clean':>5} {'valid on':>9} {'(n)':>4} {'valid off':>9} {'(n)':>4} "
              f"{'vs ref on':>9} {'off':>6} {'nonempty on':>11} {'off':>6} {'exact on':>8} {'off':>6} {'lat on ms':>9} {'off':>7} "
              f"{'parse %':>7} {'remasks':>7} {'invalid':>7}")
    lines = [header, "-" * len(header)]
    for language, s in summary.items():
        lines.append(
            f"{language:<11} {s['cases']:>5} {s['clean_cases']:>5} {_fmt(s['valid_constrained']):>9} "
            f"{s['valid_judged_constrained']:>4} {_fmt(s['valid_unconstrained']):>9} {s['valid_judged_unconstrained']:>4} "
            f"{_fmt(s['valid_vs_reference_constrained']):>9} {_fmt(s['valid_vs_reference_unconstrained']):>6} "
            f"{_fmt(s['nonempty_constrained']):>11} {_fmt(s['nonempty_unconstrained']):>6} "
            f"{_fmt(s['exact_constrained']):>8} {_fmt(s['exact_unconstrained']):>6} "
            f"{_fmt(s['latency_mean_ms_constrained'], False):>9} {_fmt(s['latency_mean_ms_unconstrained'], False):>7} "
            f"{_fmt(s['parse_ms_share']):>7} {s['remasks_constrained']:>7} {s['returned_invalid_constrained']:>7}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object keyed by language (table on stderr)")
    parser.add_argument("--out", help="also write the JSON object to this file")
    parser.add_argument("--limit", type=int, default=None, help="at most N cases per language")
    parser.add_argument("--languages", nargs="*", default=None, help="only these languages")
    parser.add_argument("--cases", default=str(FIMSET), help="FIM cases: a .jsonl file or a folder (default: the FIM set)")
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--cases-out", help="write the per-case rows (JSON Lines) here, for a closer look")
    parser.add_argument("--min-tokens", type=int, default=0,
                        help="stress: forbid ending the infill before this many tokens (weak checkpoints end at once)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")

    supported = set(grammars.supported_languages())
    wanted = set(args.languages or supported)
    unknown = wanted - supported
    if unknown:
        parser.error(f"no grammar for {', '.join(sorted(unknown))} (supported: {', '.join(sorted(supported))})")
    by_language: dict[str, list[Case]] = defaultdict(list)
    for case in load_cases([args.cases]):
        if case.language in wanted and (args.limit is None or len(by_language[case.language]) < args.limit):
            by_language[case.language].append(case)
    if not by_language:
        parser.error(f"no cases for {', '.join(sorted(wanted))} in {args.cases}")

    engine = Engine.load(args.model)
    engine.infill(InfillRequest("def warm(a):\n    return ", "\n", language="python"))  # first-call costs out of the figures
    if args.min_tokens > 0:
        engine.denoiser = NoEarlyEnd(engine.denoiser, engine._newline_end, args.min_tokens)
    out = sys.stderr if args.json else sys.stdout
    total = sum(len(cases) for cases in by_language.values())
    with_tests = sum(case.has_tests for cases in by_language.values() for case in cases)
    print(f"# {datetime.date.today()} | {total} cases ({with_tests} with tests) | model {engine.name} "
          f"({engine.describe()['parameters'] / 1e6:.1f}M parameters) | torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}"
          + (f" | stress: no end before {args.min_tokens} tokens" if args.min_tokens > 0 else ""), file=out)
    started = time.perf_counter()
    rows_by_language: dict[str, list[dict]] = {}
    done = 0
    for language in sorted(by_language):
        rows = []
        for case in by_language[language]:
            reference_errors = metrics.syntax_errors(case.prefix + case.reference + case.suffix, language)
            row = {"id": case.id, "language": language, "kind": case.kind, "clean": reference_errors == 0}
            for key, constrain in (("off", False), ("on", True)):
                run = complete(engine, case, constrain)
                run["valid_vs_reference"] = run["non_empty"] and metrics.syntax_valid(
                    case.prefix, run["completion"], case.suffix, case.reference, language, reference_errors)
                run["valid"] = bool(row["clean"] and run["valid_vs_reference"])
                row[key] = run
            rows.append(row)
            done += 1
            if done % 25 == 0:
                print(f"# {done}/{total} cases, {time.perf_counter() - started:.0f} s", file=sys.stderr)
        rows_by_language[language] = rows

    summary = {language: summarize(rows) for language, rows in rows_by_language.items()}
    summary["all"] = summarize([row for rows in rows_by_language.values() for row in rows])
    print(table(summary), file=out)
    print(f"# {time.perf_counter() - started:.0f} s; valid = no error node where the reference parses cleanly, over "
          f"non-empty completions (n = how many); vs ref = no more error nodes than the reference, over all non-empty "
          f"completions; pass@1: "
          f"{'see JSON' if with_tests else 'no case has tests'}; invalid = returned by the constraint still invalid",
          file=out)
    if args.cases_out:
        with open(args.cases_out, "w", encoding="utf-8") as f:
            for rows in rows_by_language.values():
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
