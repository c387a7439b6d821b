"""``difill eval``: fill-in-the-middle regression tests.

    difill eval CASES... [--report R.json] [--junit J.xml] [--summary S.md]
                         [--baseline B.json] [--tolerance METRIC=VALUE ...]
                         [--limit N] [--language L] [--kind K]
    difill eval mine PATH [--out CASES.jsonl] [--seed N] [--n N] [--language L] [--kind K]
    difill eval repo PATH --test-cmd "pytest -x -q" [--holes N] [--seed N]

CASES are JSON Lines files (plain or gzip) or folders of them, in difill's, HumanEval-infilling's
or SAFIM's format (detected per line). Two names are shortcuts: ``fimset`` (difill's own set,
evaluation/fimset/) and ``safim`` (../shared/benchmarks/safim/ beside the repository).

Exit status: 0 done (and no metric regressed against --baseline), 1 a metric regressed beyond
its tolerance, 2 a usage mistake or unreadable input, 3 the model cannot be loaded.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from difill.cli import DTYPE_CHOICES
from difill.evaluation import report as reports
from difill.evaluation.cases import CaseFormatError, load_cases, write_cases
from difill.evaluation.mining import KINDS, mine
from difill.evaluation.sandbox import Limits, isolation_summary

log = logging.getLogger(__name__)

FIMSET = Path(__file__).resolve().parent / "fimset"
SAFIM = Path(__file__).resolve().parent.parent.parent / "shared" / "benchmarks" / "safim"


class UsageError(Exception):
    """Reported in one line; exit status 2."""


def _global_options(parser: argparse.ArgumentParser) -> None:
    """The global options may also come after ``eval`` (difill's CLI accepts them anywhere)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="model directory (default: the bundled model)")
    group.add_argument("--backend", choices=["torch", "onnx", "onnx-int8"])
    group.add_argument("--device", choices=["cpu", "cuda"])
    group.add_argument("--dtype", choices=DTYPE_CHOICES)
    group.add_argument("--log-level", help=argparse.SUPPRESS)


def _engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=["auto", "line", "block"], default="auto", help="infill mode (default: auto)")
    parser.add_argument("--max-tokens", type=int, help="most tokens per completion (default: the engine's)")
    parser.add_argument("--steps", type=int, help="fixed denoising steps (default: confidence threshold)")


def _output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report", metavar="R.json", help="write the JSON report (the format --baseline reads)")
    parser.add_argument("--junit", metavar="J.xml", help="write JUnit XML: one testcase per FIM case")
    parser.add_argument("--summary", metavar="S.md", help="write a Markdown summary")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difill eval", description="Fill-in-the-middle regression tests.",
                                     epilog="Also: difill eval mine PATH ...; difill eval repo PATH --test-cmd CMD ...")
    parser.add_argument("cases", nargs="+", metavar="CASES", help="JSON Lines files or folders; 'fimset' or 'safim'")
    _output_options(parser)
    parser.add_argument("--baseline", metavar="B.json", help="an earlier --report: exit 1 if a metric regressed")
    parser.add_argument("--tolerance", action="append", default=[], metavar="METRIC=VALUE",
                        help="allowed regression per metric: absolute (exact_match=0.02), relative (latency_p95_ms=20%%) "
                             "or off; defaults: " + ", ".join(f"{k}={v}" for k, v in reports.DEFAULT_TOLERANCES.items()))
    parser.add_argument("--limit", type=int, help="first N cases (after filtering)")
    parser.add_argument("--language", action="append", default=[], help="only this language (repeatable)")
    parser.add_argument("--kind", action="append", default=[], help="only this kind (repeatable)")
    parser.add_argument("--no-tests", action="store_true", help="do not run the cases' tests (no pass@1)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per test program run (default 10)")
    parser.add_argument("--memory-mb", type=int, default=1024, help="memory limit of a test program (default 1024; 0: none)")
    _engine_options(parser)
    _global_options(parser)
    return parser


def mine_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difill eval mine", description="Mine FIM cases from a source tree or git repository.")
    parser.add_argument("path", help="a folder, git repository or file")
    parser.add_argument("--out", default="-", metavar="CASES.jsonl", help="output (default: stdout; .gz compresses)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=100, help="number of cases, spread evenly over the kinds (default 100)")
    parser.add_argument("--language", action="append", default=[], help="only this language (repeatable)")
    parser.add_argument("--kind", action="append", default=[], choices=KINDS, help="only this kind (repeatable)")
    parser.add_argument("--label", help="id prefix of the cases (default: the folder's name)")
    parser.add_argument("--prefix-chars", type=int, default=6000, help="prefix kept before the hole (default 6000)")
    parser.add_argument("--suffix-chars", type=int, default=3000, help="suffix kept after the hole (default 3000)")
    return parser


def repo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difill eval repo",
                                     description="Punch holes in a repository, fill them, and run its own tests.")
    parser.add_argument("path", help="the repository (it is copied; the original is never written)")
    parser.add_argument("--test-cmd", required=True, help='shell command that runs the tests, e.g. "pytest -x -q"')
    parser.add_argument("--holes", type=int, default=10, help="number of holes (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--language", action="append", default=[])
    parser.add_argument("--kind", action="append", default=[], choices=KINDS)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per test run (default 600)")
    parser.add_argument("--memory-mb", type=int, default=8192, help="memory limit of the test run (default 8192; 0: none)")
    _output_options(parser)
    _engine_options(parser)
    _global_options(parser)
    return parser


def _resolve(target: str) -> str:
    if target == "fimset" and not Path(target).exists():
        return str(FIMSET)
    if target == "safim" and not Path(target).exists():
        if not SAFIM.is_dir():
            raise UsageError(f"safim: the SAFIM data is not at {SAFIM}")
        return str(SAFIM)
    return target


def _option(args: argparse.Namespace, defaults: argparse.Namespace | None, name: str, fallback):
    value = getattr(args, name, None)
    if value is None and defaults is not None:
        value = getattr(defaults, name, None)
    return fallback if value is None else value


def _load_engine(args: argparse.Namespace, defaults: argparse.Namespace | None):
    from difill.inference.engine import Engine, EngineSettings

    try:
        return Engine.load(_option(args, defaults, "model", None), _option(args, defaults, "backend", "torch"),
                           _option(args, defaults, "device", "cpu"), EngineSettings(dtype=_option(args, defaults, "dtype", None)))
    except ValueError as exc:  # options that do not go together, e.g. --backend onnx --dtype bfloat16
        raise UsageError(str(exc)) from exc


def _write_outputs(args: argparse.Namespace, report: dict, comparison: reports.Comparison | None) -> None:
    if args.report:
        reports.write_json(report, args.report)
    if args.junit:
        reports.write_junit(report, args.junit)
    if args.summary:
        Path(args.summary).write_text(reports.summary_markdown(report, comparison), encoding="utf-8")


def _print_totals(report: dict, comparison: reports.Comparison | None) -> None:
    m = report["metrics"]

    def pct(value):
        return "–" if value is None else f"{100 * value:.1f}%"

    print(f"{m['cases']} cases: exact {pct(m['exact_match'])}, edit similarity {m['edit_similarity'] or 0:.3f}, "
          f"non-empty {pct(m['non_empty_rate'])}, syntax-valid {pct(m['syntax_valid_rate'])} of {m['syntax_checked']}, "
          f"pass@1 {pct(m['pass_at_1'])} of {m['tested']}, latency p50 {m['latency_p50_ms']} ms p95 {m['latency_p95_ms']} ms, "
          f"{m['tokens_per_s']} tokens/s, {m['errors']} errors")
    if comparison is not None:
        if comparison.regressed:
            for r in comparison.regressions:
                print(f"REGRESSED {r['metric']}: {r['baseline']} -> {r['current']} (tolerance {r['tolerance']})")
        else:
            print("no metric regressed against the baseline")
        print(f"{len(comparison.pass_to_fail)} cases went from pass to fail, {len(comparison.fail_to_pass)} from fail to pass")


def _log_level(args: argparse.Namespace) -> None:
    """--log-level given after ``eval`` (difill's CLI only sees the ones before it)."""
    if args.log_level:
        logging.getLogger().setLevel(getattr(logging, args.log_level.upper(), logging.WARNING))


def cmd_eval(argv: list[str], defaults: argparse.Namespace | None) -> int:
    from difill.evaluation.runner import Settings, evaluate

    args = eval_parser().parse_args(argv)
    _log_level(args)
    for spec in args.tolerance:
        try:
            reports.parse_tolerance(spec)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    baseline = None
    if args.baseline:
        try:
            baseline = reports.load_report(args.baseline)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    try:
        cases = load_cases([_resolve(t) for t in args.cases], languages=args.language, kinds=args.kind, limit=args.limit)
    except CaseFormatError as exc:
        raise UsageError(str(exc)) from exc
    if not cases:
        raise UsageError("no cases to run (check the files and the --language / --kind filters)")
    engine = _load_engine(args, defaults)
    settings = Settings(mode=args.mode, max_tokens=args.max_tokens, steps=args.steps, run_tests=not args.no_tests,
                        limits=Limits(timeout_s=args.timeout, memory_mb=args.memory_mb))
    rows = evaluate(cases, engine, settings, progress=not args.quiet)
    report = reports.build_report(rows, model=engine.describe(), extra={
        "sandbox": isolation_summary(), "inputs": list(args.cases),
        "settings": {"mode": args.mode, "max_tokens": args.max_tokens, "steps": args.steps, "timeout_s": args.timeout,
                     "memory_mb": args.memory_mb, "tests": not args.no_tests}})
    comparison = reports.compare(report, baseline, args.tolerance) if baseline is not None else None
    if comparison is not None:
        report["baseline"] = {"path": args.baseline, **comparison.to_dict()}
    _write_outputs(args, report, comparison)
    _print_totals(report, comparison)
    return 1 if comparison is not None and comparison.regressed else 0


def cmd_mine(argv: list[str]) -> int:
    args = mine_parser().parse_args(argv)
    if args.n < 1:
        raise UsageError("--n must be at least 1")
    try:
        cases = mine(args.path, n=args.n, seed=args.seed, kinds=args.kind or KINDS, languages=args.language,
                     label=args.label, prefix_chars=args.prefix_chars, suffix_chars=args.suffix_chars)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    if not cases:
        raise UsageError(f"{args.path}: nothing to mine (no source files in a supported language)")
    if args.out == "-":
        import json

        for case in cases:
            sys.stdout.write(json.dumps(case.to_json(), ensure_ascii=False) + "\n")
    else:
        write_cases(cases, args.out)
    counts: dict[str, int] = {}
    for case in cases:
        counts[case.kind] = counts.get(case.kind, 0) + 1
    print(f"mined {len(cases)} cases from {args.path} (seed {args.seed}): "
          + ", ".join(f"{k} {v}" for k, v in counts.items()), file=sys.stderr)
    return 0


def cmd_repo(argv: list[str], defaults: argparse.Namespace | None) -> int:
    from difill.evaluation.repo import RepoError, RepoSettings, evaluate_repo

    args = repo_parser().parse_args(argv)
    _log_level(args)
    if args.holes < 1:
        raise UsageError("--holes must be at least 1")
    engine = _load_engine(args, defaults)
    settings = RepoSettings(test_cmd=args.test_cmd, holes=args.holes, seed=args.seed, kinds=tuple(args.kind or KINDS),
                            languages=tuple(args.language), limits=Limits(timeout_s=args.timeout, memory_mb=args.memory_mb),
                            mode=args.mode)
    try:
        rows, info = evaluate_repo(args.path, engine, settings, progress=not args.quiet)
    except RepoError as exc:
        raise UsageError(str(exc)) from exc
    report = reports.build_report(rows, model=engine.describe(), extra={"sandbox": isolation_summary(), "repo": info})
    _write_outputs(args, report, None)
    _print_totals(report, None)
    print(f"{info['holes_passing']} of {info['holes']} holes keep `{args.test_cmd}` passing")
    return 0


def main(argv: list[str], defaults: argparse.Namespace | None = None) -> int:
    """Entry point from ``difill eval``; returns the exit status."""
    from difill.inference.loader import ModelLoadError

    argv = list(argv)
    try:
        if argv[:1] == ["mine"]:
            return cmd_mine(argv[1:])
        if argv[:1] == ["repo"]:
            return cmd_repo(argv[1:], defaults)
        return cmd_eval(argv, defaults)
    except UsageError as exc:
        print(f"difill eval: {exc}", file=sys.stderr)
        return 2
    except ModelLoadError as exc:
        print(f"difill eval: cannot load the model: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
