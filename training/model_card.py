"""Write the bundled model's card from what was measured: the corpus manifest, the training
log (loss and FIM checks against tokens seen), and `difill eval` reports on the project's FIM
set for this model and, when given, the model it replaces.

    difill eval evaluation/fimset --no-tests --report runs/cont/eval.json --model runs/cont/export
    python bench/layouts.py runs/compare-block runs/compare-bidirectional --out runs/layouts.json
    python bench/engine.py --model runs/cont/export --out runs/engine.json
    difill eval safim --language python --report runs/safim.json --model runs/cont/export
    python -m difill.training.model_card --model runs/cont/export \\
        --report runs/cont/eval.json --previous-report runs/small/eval.json --layouts runs/layouts.json \\
        --engine runs/engine.json --safim runs/safim.json --out runs/cont/export/MODEL_CARD.md

The training history (runs, totals, learning curve) comes from the model's own training.json,
which nests the record of every model it continued from: no run folder is needed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = ("exact_match", "edit_similarity", "syntax_valid_rate", "non_empty_rate", "latency_p50_ms")


def training_history(record: dict) -> list[dict]:
    """The runs that made a model, oldest first: its training.json record and, nested under
    "continued", the records of the models it continued from."""
    chain: list[dict] = []
    while record:
        chain.insert(0, record)
        record = record.get("continued")
    return chain


def learning_curve(history: list[dict]) -> list[dict]:
    """Validation records of the runs in order, tokens and steps counted from the first run's start."""
    curve: list[dict] = []
    step_offset = token_offset = 0
    for record in history:
        curve += [{**r, "step": r["step"] + step_offset, "tokens": r["tokens"] + token_offset} for r in record.get("curve", [])]
        step_offset += record["steps"]
        token_offset += record["tokens"]
    return curve


def training_stages(history: list[dict]) -> list[dict]:
    """Per run: its name, steps, tokens, seconds and the settings that distinguish it."""
    return [{"run": r.get("run") or f"run {i + 1}", "steps": r["steps"], "tokens": r["tokens"], "seconds": r["train_seconds"],
             "batch_size": r["config"]["batch_size"], "lr": r["config"]["lr"], "init_from": r["config"].get("init_from"),
             "hardware": r.get("hardware", "CPU")} for i, r in enumerate(history)]


def attribution(manifest: dict, earlier: dict | None) -> dict:
    """corpus.json for a model: the corpus manifest without its file list, and the packages of
    every corpus the model was trained on (a continued run adds to what it started from)."""
    packages = {(p["name"], p["version"]): p for p in (earlier or {}).get("packages", []) + manifest["packages"]}
    excluded = set((earlier or {}).get("excluded_for_evaluation", [])) | set(manifest["excluded_for_evaluation"])
    return {"stats": manifest["stats"], "excluded_for_evaluation": sorted(excluded),
            "packages": [packages[key] for key in sorted(packages, key=lambda k: (k[0].lower(), k[1]))]}


def layout_table(layouts: dict) -> list[str]:
    """bench/layouts.py's comparison of the two attention layouts, trained alike."""
    columns = (("attention", "attention"), ("steps", "training steps"), ("train_ms_per_step", "ms per training step"),
               ("val_masked_ce", "validation masked CE"), ("exact_match", "exact match (line)"),
               ("edit_similarity", "edit similarity"), ("p50_ms_line", "warm p50 ms"), ("cached_fraction", "context reused"),
               ("cold_p50_ms_line", "cold p50 ms"), ("cold_p50_ms_line_1k", "cold p50 ms, 1k context"))
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for values in layouts["runs"].values():
        lines.append("| " + " | ".join(fmt(values.get(key)) for key, _ in columns) + " |")
    return lines


def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.0f}"
    return str(value)


def score_table(report: dict, previous: dict | None) -> list[str]:
    lines = ["| kind | cases | " + " | ".join(METRICS) + (" | previous model: exact | edit similarity | non-empty |" if previous else " |"),
             "|---|---:|" + "---:|" * len(METRICS) + ("---:|---:|---:|" if previous else "")]
    groups = {"all": report["metrics"], **report["by_kind"]}
    before = {"all": previous["metrics"], **previous["by_kind"]} if previous else {}
    for kind, m in groups.items():
        row = f"| {kind} | {m.get('cases', m.get('n', '–'))} | " + " | ".join(fmt(m.get(k)) for k in METRICS) + " |"
        if previous:
            row += "".join(f" {fmt(before.get(kind, {}).get(k))} |" for k in ("exact_match", "edit_similarity", "non_empty_rate"))
        lines.append(row)
    return lines


def single_line_exact(groups: list[dict | None]) -> float:
    """Exact match over the report's groups of single-line holes, weighted by their case counts."""
    groups = [g for g in groups if g]
    return sum(g["exact_match"] * g["cases"] for g in groups) / max(1, sum(g["cases"] for g in groups))


def decoding_section(engine: dict, decode_window: int | dict | None) -> list[str]:
    """bench/engine.py's decoding-order comparison and headline latencies, for this model."""
    lines = ["## Decoding and speed", "",
             f"The config recommends `decode_window: {json.dumps(decode_window)}` to the engine (`EngineSettings.window`): "
             "with a window, each denoising step commits the leftmost masked position and any sure one beside it "
             "(semi-autoregressive); without, the most confident positions first. Chosen per mode by this "
             "measurement (`python bench/engine.py`, held-out Python holes, syntax constraint on):", "",
             "| variant | cases | exact | edit similarity | non-empty | steps | p50 ms |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in engine.get("window", {}).items():
        lines.append(f"| {name} | {row['cases']} | {fmt(row['exact'])} | {fmt(row['edit_similarity'])} | "
                     f"{fmt(row['non_empty'])} | {fmt(row['steps_mean'])} | {fmt(row['p50_ms'])} |")
    keys = ("p50_ms_line", "p95_ms_line", "p50_ms_block", "cold_p50_ms_line", "cold_p50_ms_line_1k", "speedup_vs_naive")
    threads = engine.get("conditions", {}).get("threads", "?")
    lines += ["", f"Latency on this 2-core CPU (torch, {threads} thread(s); warm = a typing session): " +
              ", ".join(f"{k} {fmt(engine.get(k))}" for k in keys if engine.get(k) is not None) + ".", ""]
    return lines


def safim_section(report: dict) -> list[str]:
    """``difill eval safim`` on this model: the public benchmark whose cases carry unit tests,
    so pass@1 (the completion run against them in the sandbox) stands beside exact match."""
    languages = ", ".join(sorted(report["by_language"]))
    lines = ["## SAFIM", "",
             f"`difill eval safim --language {languages}` (the SAFIM benchmark in `../shared/benchmarks/safim`, never "
             "trained on; block and control cases run their unit tests in the sandbox, api cases have none):", "",
             "| kind | cases | exact_match | edit_similarity | pass@1 | tested | latency_p50_ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, m in {"all": report["metrics"], **report["by_kind"]}.items():
        lines.append(f"| {kind} | {m.get('cases', '–')} | {fmt(m.get('exact_match'))} | {fmt(m.get('edit_similarity'))} | "
                     f"{fmt(m.get('pass_at_1'))} | {m.get('tested', 0)} | {fmt(m.get('latency_p50_ms'))} |")
    return lines + [""]


def write_card(model: Path, report_path: Path, previous_path: Path | None, corpus: Path, out: Path,
               layouts_path: Path | None = None, engine_path: Path | None = None, safim_path: Path | None = None) -> str:
    """The card of the exported model in ``model``; its training history comes from its training.json."""
    config = json.loads((model / "config.json").read_text())
    training = json.loads((model / "training.json").read_text())
    history = training_history(training)
    stages = training_stages(history)
    total_steps = sum(st["steps"] for st in stages)
    total_tokens = sum(st["tokens"] for st in stages)
    total_minutes = sum(st["seconds"] for st in stages) / 60
    layouts = json.loads(layouts_path.read_text()) if layouts_path else None
    report = json.loads(report_path.read_text())
    previous = json.loads(previous_path.read_text()) if previous_path else None
    manifest = json.loads((corpus / "MANIFEST.json").read_text()) if (corpus / "MANIFEST.json").exists() else {}
    stats = manifest.get("stats", {})
    languages: dict[str, int] = {}
    for entry in manifest.get("files", []):
        if "language" in entry:
            languages[entry["language"]] = languages.get(entry["language"], 0) + 1
    corpus_languages = ", ".join(f"{name} {count / sum(languages.values()):.0%}"
                                 for name, count in sorted(languages.items(), key=lambda kv: -kv[1])) or "unknown"
    if manifest:  # the attribution beside the card: this corpus and those of the models it continued
        init_from = training.get("config", {}).get("init_from")
        earlier_path = Path(init_from, "corpus.json") if init_from else None
        earlier = json.loads(earlier_path.read_text()) if earlier_path and earlier_path.is_file() else None
        manifest = attribution(manifest, earlier)
        (out.parent / "corpus.json").write_text(json.dumps(manifest, indent=1))
    size_mb = sum(p.stat().st_size for p in model.iterdir() if p.is_file()) / 2**20
    curve = learning_curve(history)
    line_exact = single_line_exact([report["by_kind"].get(k) for k in ("line", "line-tail")])
    python_line_exact = single_line_exact([report.get("by_kind_language", {}).get(f"{k}/python") for k in ("line", "line-tail")])
    lines = [
        "# difill default model",
        "",
        "difill's bundled masked-diffusion code model, trained with the project's own pipeline",
        "(`training/`) and shipped inside the package so that difill works out of the box.",
        "",
        "## Model",
        "",
        f"- {training['parameters'] / 1e6:.2f}M parameters, {size_mb:.1f} MB on disk "
        f"({training['config'].get('export_dtype', 'float32')} safetensors + tokenizer).",
        f"- Transformer: {config['n_layers']} layers, hidden {config['hidden_size']}, {config['n_heads']} heads "
        f"({config['n_kv_heads']} KV heads), SwiGLU {config['intermediate_size']}, RMSNorm, rotary embeddings, tied head.",
        f"- Attention: `{config['attention']}` (context causal, suffix first, canvas bidirectional); context "
        f"{config['extra'].get('context_tokens')} tokens of which at most {config['extra'].get('suffix_tokens')} suffix.",
        f"- Tokenizer: byte-level BPE, {config['vocab_size']} tokens, trained on the same corpus; special tokens "
        "`<|mask|> <|eoi|> <|pad|> <|prefix|> <|suffix|> <|middle|> <|bos|>` at ids 0-6.",
        "",
        "## Training",
        "",
        f"- Corpus: {stats.get('train', '?')} training files and {stats.get('val', '?')} held-out validation files, "
        f"{stats.get('bytes', 0) / 1e6:.0f} MB of permissively licensed source (the Python standard library and the "
        f"MIT/BSD/Apache/PSF/ISC packages installed on the build machine; {len(manifest.get('packages', []))} packages, "
        "listed with version and license in corpus.json beside this card); exact and near duplicates removed. "
        "Never trained on: anything under `shared/benchmarks`, HumanEval or MBPP, the packages `attrs`, `click`, "
        "`more-itertools` and the other sources of `evaluation/fimset` (also when vendored inside another package).",
        "- Objective: MDLM on infill-shaped canvases (line tails, whole lines, blocks, random spans; the canvas is "
        "padded with `<|eoi|>` so the model learns where an infill ends), plus next-token loss on the causal context.",
        f"- {total_steps} steps, {total_tokens / 1e6:.1f}M tokens, {total_minutes:.0f} minutes of training, bf16 autocast, "
        f"in {len(stages)} run(s), each continuing the last:",
        "",
        "| run | steps | tokens | minutes | hardware | batch | peak lr | started from |",
        "|---|---:|---:|---:|---|---:|---:|---|",
        *[f"| {st['run']} | {st['steps']} | {st['tokens'] / 1e6:.1f}M | {st['seconds'] / 60:.0f} | {st['hardware']} | "
          f"{st['batch_size']} | {st['lr']} | {st['init_from'] or 'random initialisation'} |" for st in stages],
        "",
        "Each run's whole config is in `training.json` beside this card; the README's training commands reproduce "
        "the runs from `training/configs/`.",
        "",
        "### Learning curve (held-out files)",
        "",
        "Steps and tokens count from the first run's start. Each run measures on the validation split of the "
        "corpus it trained on (a corpus rebuilt on another machine holds other files), and the FIM check is 48 "
        "single-line holes of those files: read the trend, not single rows.",
        "",
        "| step | tokens | validation masked CE | FIM exact, line tail | FIM exact, whole line |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in curve:
        lines.append(f"| {r['step']} | {r['tokens'] / 1e6:.1f}M | {r['val_masked_ce']:.3f} | "
                     f"{fmt(r.get('fim_exact_line_tail'))} | {fmt(r.get('fim_exact_whole_line'))} |")
    lines += [
        "",
        "## Scores on the project's FIM set",
        "",
        f"`difill eval evaluation/fimset --no-tests` ({report['metrics'].get('cases', '?')} held-out cases over nine languages; "
        f"the last corpus's files by language: {corpus_languages}). Exact match is whitespace-normalised; syntax-valid counts non-empty "
        "completions whose document parses with no new error.",
        "",
        *score_table(report, previous),
        "",
        "### By language",
        "",
        "| language | exact_match | edit_similarity | syntax_valid_rate | non_empty_rate |",
        "|---|---:|---:|---:|---:|",
        *[f"| {lang} | " + " | ".join(fmt(m.get(k)) for k in METRICS[:4]) + " |" for lang, m in report["by_language"].items()],
        "",
    ]
    if safim_path:
        lines += safim_section(json.loads(safim_path.read_text()))
    if engine_path:
        lines += decoding_section(json.loads(engine_path.read_text()), config["extra"].get("decode_window"))
    if layouts:
        lines += [
            "## Attention layout: block diffusion against bidirectional",
            "",
            "Two small models (hidden 256, 4 layers) trained alike from scratch (`training/configs/compare-*.json`, the attention "
            "layout the only difference), measured by `python bench/layouts.py` on the same held-out Python "
            f"single-line cases ({next(iter(layouts['runs'].values())).get('quality_cases', '?')} for quality, typing "
            "sessions for latency) on this 2-core CPU:",
            "",
            *layout_table(layouts),
            "",
        ]
    lines += [
        "## Limits",
        "",
        f"Single-line exact match (line and line-tail holes) is {python_line_exact:.1%} on the FIM set's Python "
        f"(goal: 40% on unseen Python) and {line_exact:.1%} over all its languages. "
        f"{total_tokens / 1e6:.0f}M training tokens ({', '.join(sorted({st['hardware'] for st in stages}))}) are far "
        "from what a strong completion model needs; the learning curve above is the basis for planning the next, "
        "larger run.",
        "",
    ]
    text = "\n".join(lines)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", type=Path, help="bench/layouts.py's JSON: the attention layout comparison")
    parser.add_argument("--engine", type=Path, help="bench/engine.py's JSON: decoding order and latency")
    parser.add_argument("--safim", type=Path, help="difill eval safim's report: pass@1 with unit tests")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--previous-report", type=Path)
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    write_card(args.model, args.report, args.previous_report, args.corpus, args.out,
               args.layouts, args.engine, args.safim)


if __name__ == "__main__":
    main()
