"""Block-diffusion against bidirectional attention, trained alike: the bundled model's layout choice.

    python bench/layouts.py runs/compare-block runs/compare-bidirectional          # a table
    python bench/layouts.py RUN_A RUN_B --json --out bench/results/layouts.json    # JSON too

Each argument is a training run folder (``training/train.py``) of the same model size, data and
steps, with ``"attention"`` the only difference in their configs (``training/configs/compare-*``).
The run's ``log.jsonl`` gives its training speed and its validation masked cross-entropy, and its
``export/`` the model, which is then measured here on the same cases, interleaved case by case:

* quality: exact match, edit similarity and the non-empty rate on Python single-line holes of the
  project's held-out FIM set (the engine's default path, syntax constraint on);
* latency, as an editor sees it: a typing session per case (warm: block models extend their exact
  context cache, bidirectional ones recompute or approximate it every request) and new documents
  (cold, with a 1k-token context budget as well), from ``bench/engine.py``.

Why it matters: bidirectional attention sees the suffix from the canvas and the canvas from the
prefix at once, which may learn faster per token, while block diffusion makes the context cache
exact, which is what keeps per-keystroke latency low. The model card records this table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _bench_engine():
    """bench/engine.py's sections and case loader (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_engine", HERE / "engine.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_summary(run: Path) -> dict:
    """What the run says: its layout, steps, training time per step and last validation loss.
    (Steps rather than tokens: runs logged before the count included the bidirectional layout's
    suffix undercount it, and both layouts see the same examples per step.)"""
    config = json.loads((run / "config.json").read_text())
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    validation = [r for r in records if "val_masked_ce" in r]
    state = json.loads((run / "ckpt" / "state.json").read_text())
    if not validation:
        raise SystemExit(f"{run}: no validation record in log.jsonl yet (train it further)")
    last = validation[-1]
    return {"attention": config["model"].get("attention", "block"), "steps": last["step"], "tokens": last["tokens"],
            "val_masked_ce": last["val_masked_ce"], "train_ms_per_step": round(1000 * state["seconds"] / max(1, state["step"])),
            "fim_check": {k: v for k, v in last.items() if k.startswith("fim_exact")}}


def quality(engines: dict, cases: list) -> dict:
    from difill.evaluation.metrics import edit_similarity, exact_match
    from difill.inference.engine import InfillRequest

    scores = {name: {"exact": 0, "similarity": 0.0, "non_empty": 0} for name in engines}
    for case in cases:
        for name, engine in engines.items():
            request = InfillRequest(prefix=case.prefix, suffix=case.suffix, language="python", mode="line")
            completion = engine.infill(request).completion
            scores[name]["exact"] += exact_match(completion, case.reference)
            scores[name]["similarity"] += edit_similarity(completion, case.reference)
            scores[name]["non_empty"] += bool(completion.strip())
    n = max(1, len(cases))
    return {name: {"exact_match": round(s["exact"] / n, 4), "edit_similarity": round(s["similarity"] / n, 4),
                   "non_empty_rate": round(s["non_empty"] / n, 4), "quality_cases": len(cases)}
            for name, s in scores.items()}


def compare(runs: list[Path], cases: int, typing_cases: int) -> dict:
    from difill.inference.engine import Engine

    bench = _bench_engine()
    summaries = {str(run): run_summary(run) for run in runs}
    engines = {str(run): Engine.load(run / "export") for run in runs}
    tokenizer = next(iter(engines.values())).tokenizer
    line_cases, _, source = bench.load_cases(tokenizer, cases, 0)
    report = {"cases": source, "runs": summaries}
    for section in (quality(engines, line_cases[:cases]),
                    bench.section_warm(engines, line_cases[:typing_cases], 16),
                    bench.section_cold(engines, line_cases[:typing_cases], long_context=True)):
        for name, values in section.items():
            summaries[name].update(values)
    return report


COLUMNS = ("attention", "steps", "train_ms_per_step", "val_masked_ce", "exact_match", "edit_similarity",
           "non_empty_rate", "p50_ms_line", "p95_ms_line", "cached_fraction", "cold_p50_ms_line", "cold_p50_ms_line_1k")


def table(report: dict) -> str:
    lines = ["| run | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for run, values in report["runs"].items():
        lines.append(f"| {run} | " + " | ".join(str(values.get(c, "–")) for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="training run folders (log.jsonl, export/)")
    parser.add_argument("--cases", type=int, default=60, help="single-line cases for the quality columns")
    parser.add_argument("--typing-cases", type=int, default=8, help="cases for the latency columns")
    parser.add_argument("--json", action="store_true", help="print the JSON object instead of the table")
    parser.add_argument("--out", type=Path, help="also write the JSON object here")
    args = parser.parse_args(argv)
    report = compare(args.runs, args.cases, args.typing_cases)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
