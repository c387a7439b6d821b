"""Benchmark of the inference engine: latency, throughput, quality against baselines, backends.

    python bench/engine.py                 # tables on stdout (a few minutes on a 2-core CPU)
    python bench/engine.py --json          # one JSON object on stdout
    python bench/engine.py --out FILE      # the JSON object into FILE as well
    python bench/engine.py --quick         # fewer cases, for a smoke run
    python bench/engine.py --gpu-7b        # Dream-Coder-7B shapes, bf16, CUDA (skipped without CUDA)

Everything is measured in one run, on the same machine, model and cases, with the variants
interleaved case by case (torch, onnx, onnx-int8, torch, ...), so that a background load that
comes and goes hits every variant alike: compare figures within a run, not across runs.

Cases: ``evaluation/fimset/python.jsonl`` (held-out packages: attrs, click, more-itertools) when
it is there, else holes mined here from the installed ``click`` package (which the training
corpus excludes). Single-line cases are line and line-tail holes whose reference is at most 24
tokens; multi-line cases are block holes.

Sections:

* warm: a recorded typing session per case (the reference typed one character at a time, a
  request after every keystroke, one document key): latency p50/p95 and the share of the context
  reused from the cache; ``--backends`` torch (its default weights: float16 on the CPU),
  torch-fp32, torch-fp16, torch-int8 (int8 weights, activations quantized per product), torch-bf16
  (bfloat16 weights), onnx, onnx-int8.
* block: 64-token infills (the end token disabled, so every request decodes 64 real tokens):
  latency and tokens/s, warm (one keystroke after a first request on the document).
* cold: new documents, the model's own context budget, and a 1k-token context (budgets raised).
* naive: the engine against a naive sampler (a full forward pass over context + canvas every
  step, one token per step, same canvas and stopping rule): speed-up and exact match of both.
* window: decoding order, pure threshold decoding against semi-autoregressive windows of 1, 4, 8 (the
  leftmost masked position every step): exact match, edit similarity, non-empty rate, steps.
* canvas: canvas key/value reuse of block models (``refresh_every`` 1 = exact, 2, 4, 8): the same quality
  figures on line and block holes, and the forced 64-token block's latency.
* agreement: completions of every other variant against torch on the same cases.
* batch: 8 requests through ``infill_batch`` against one by one.
* threads: 1 against 2 torch threads.
* refresh: the approximate cache of bidirectional models (Fast-dLLM ``refresh_every``): agreement
  with refresh_every=1 and latency. The bundled model is block-layout; this section runs its
  weights with full attention in the open-dLLM layout, a proxy that exercises the mechanism
  (``--bidirectional-model PATH`` uses a real bidirectional checkpoint instead).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MERCURY_CODER_TOKENS_PER_S = 1109  # Mercury Coder Mini on an H100, as published by Inception Labs


@dataclass
class Case:
    id: str
    prefix: str
    suffix: str
    reference: str
    kind: str


# ---------------------------------------------------------------------------- cases
def load_cases(tokenizer, limit_line: int, limit_block: int, seed: int = 0) -> tuple[list[Case], list[Case], str]:
    fimset = ROOT / "evaluation" / "fimset" / "python.jsonl"
    if fimset.is_file():
        rows = [json.loads(line) for line in fimset.read_text().splitlines() if line.strip()]
        cases = [Case(r["id"], r["prefix"], r["suffix"], r["reference"], r.get("kind", "?")) for r in rows]
        source = str(fimset.relative_to(ROOT))
    else:
        cases = mine_click(seed)
        source = "mined from the installed click package"
    line = [c for c in cases if c.kind in ("line", "line-tail") and c.reference.strip() and "\n" not in c.reference
            and len(tokenizer.encode(c.reference)) <= 24]
    block = [c for c in cases if c.kind == "block" and len(tokenizer.encode(c.reference)) <= 64]
    rng = random.Random(seed)
    rng.shuffle(line)
    rng.shuffle(block)
    return line[:limit_line], block[:limit_block], source


def mine_click(seed: int, n: int = 120) -> list[Case]:
    """Line, line-tail and block holes from click's sources (held out from training)."""
    import click

    rng = random.Random(seed)
    files = sorted(Path(click.__file__).parent.glob("*.py"))
    cases: list[Case] = []
    while len(cases) < n:
        path = rng.choice(files)
        text = path.read_text()
        lines = text.splitlines(keepends=True)
        starts = [0]
        for ln in lines:
            starts.append(starts[-1] + len(ln))
        i = rng.randrange(len(lines))
        content = lines[i].rstrip("\n")
        indent = len(content) - len(content.lstrip())
        if len(content.strip()) < 8:
            continue
        kind = rng.choice(["line", "line-tail", "block"])
        if kind == "line":
            start, end = starts[i] + indent, starts[i] + len(content)
        elif kind == "line-tail":
            start, end = starts[i] + rng.randint(indent + 1, len(content) - 1), starts[i] + len(content)
        else:
            j = min(len(lines), i + rng.randint(2, 5))
            start, end = starts[i] + indent, starts[j] - 1
        cases.append(Case(f"click/{path.name}:{i + 1}:{kind}", text[:start][-3000:], text[end:][:1000], text[start:end], kind))
    return cases


def exact(completion: str, reference: str) -> bool:
    return " ".join(completion.split()) == " ".join(reference.split())


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return round(ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo), 2)


# ---------------------------------------------------------------------------- engines
TORCH_DTYPES = {"torch-fp32": "float32", "torch-fp16": "float16", "torch-bf16": "bfloat16", "torch-int8": "int8"}


def default_backends() -> str:
    """torch (its default weights: float16 on the CPU), torch-fp32, torch-int8 where FBGEMM serves
    it, ONNX Runtime; torch-bf16 only where the CPU has bfloat16 units (elsewhere it is emulated,
    many times slower)."""
    from difill.inference.engine import cpu_has_bfloat16_units
    from difill.inference.model import Int8WeightLinear

    return "torch,torch-fp32," + ("torch-int8," if Int8WeightLinear.available() else "") + \
        ("torch-bf16," if cpu_has_bfloat16_units() else "") + "onnx,onnx-int8"


def load_engines(names: list[str], model: str | None, threads: int | None = None) -> dict:
    """Engines by bench name: a backend of Engine.load (torch with its default weights), or torch
    with the weights of TORCH_DTYPES ("torch-fp32", "torch-fp16", "torch-bf16", "torch-int8")."""
    from difill.inference.engine import Engine, EngineSettings

    engines = {}
    for name in names:
        backend, dtype = ("torch", TORCH_DTYPES[name]) if name in TORCH_DTYPES else (name, None)
        engines[name] = Engine.load(model, backend=backend, settings=EngineSettings(threads=threads, dtype=dtype))
    return engines


def line_request(case: Case, prefix: str | None = None, key: str | None = None, max_tokens: int = 24):
    from difill.inference.engine import InfillRequest

    return InfillRequest(prefix=case.prefix if prefix is None else prefix, suffix=case.suffix, mode="line",
                         max_tokens=max_tokens, language="python", constrain_syntax=False, document_key=key)


def forced(engine):
    """The same engine with end tokens disabled and banned, and no stop at a repeated line: every
    infill decodes its whole budget in real tokens."""
    from difill.inference.engine import Engine

    twin = Engine(engine.model, engine.tokenizer, name=engine.name, device=engine.device, backend=engine.backend,
                  settings=replace(engine.settings, stop_at_stutter=False))
    twin.denoiser = engine.denoiser
    twin._end = torch.zeros_like(engine._end)
    twin._newline_end = torch.zeros_like(engine._newline_end)
    twin._banned = engine._banned.clone()
    twin._banned[engine.end_ids] = True
    return twin


# ---------------------------------------------------------------------------- sections
def section_warm(engines: dict, cases: list[Case], max_keys: int) -> dict:
    """A typing session per case: the reference typed one character at a time."""
    lat = {n: [] for n in engines}
    reuse = {n: [0, 0] for n in engines}
    for case in cases:
        typed = case.reference[:max_keys]
        for name, engine in engines.items():
            key = f"{name}:{case.id}"
            for i in range(len(typed) + 1):
                request = line_request(case, case.prefix + typed[:i], key=key)
                result = engine.infill(request)
                if i > 0:  # the first request of a session is cold
                    lat[name].append(result.latency_ms)
                    reuse[name][0] += result.cached_tokens
                    reuse[name][1] += len(engine._encode_context(request.prefix, request.suffix).before)
            engine.forget(key)
    out = {n: {"p50_ms_line": pct(lat[n], 0.5), "p95_ms_line": pct(lat[n], 0.95), "warm_requests": len(lat[n]),
               "cached_fraction": round(reuse[n][0] / max(1, reuse[n][1]), 4)} for n in engines}
    add_fp32_ratios(out, lat, "line")
    return out


def add_fp32_ratios(out: dict, lat: dict[str, list[float]], kind: str) -> None:
    """``fp32_over_this_<kind>``: the median over requests of torch-fp32's latency over this
    variant's on the same request (>1: faster than float32 weights), when torch-fp32 ran."""
    base = lat.get("torch-fp32")
    if not base:
        return
    for name, values in lat.items():
        if name != "torch-fp32" and len(values) == len(base):
            out[name][f"fp32_over_this_{kind}"] = round(statistics.median(b / v for b, v in zip(base, values)), 3)


def section_block(engines: dict, cases: list[Case]) -> dict:
    from difill.inference.engine import InfillRequest

    lat = {n: [] for n in engines}
    tokens = {n: [] for n in engines}
    steps = {n: [] for n in engines}
    twins = {n: forced(e) for n, e in engines.items()}
    for case in cases:
        for name, engine in twins.items():
            key = f"block:{case.id}"
            first = InfillRequest(prefix=case.prefix, suffix=case.suffix, mode="block", max_tokens=64, language="python",
                                  constrain_syntax=False, document_key=key)
            engine.infill(first)
            result = engine.infill(replace(first, prefix=case.prefix + case.reference[:1]))  # one keystroke later
            lat[name].append(result.latency_ms)
            tokens[name].append(result.tokens)
            steps[name].append(result.steps)
            engine.forget(key)
    out = {}
    for n in engines:
        total_s = sum(lat[n]) / 1000
        out[n] = {"p50_ms_block": pct(lat[n], 0.5), "p95_ms_block": pct(lat[n], 0.95),
                  "tokens_per_s_block": round(sum(tokens[n]) / max(total_s, 1e-9), 1), "block_requests": len(lat[n]),
                  "mean_tokens": round(statistics.mean(tokens[n]), 1) if tokens[n] else 0,
                  # what the block target turns on: the model's confidence sets the steps, the
                  # hardware the milliseconds per step
                  "tokens_per_step_block": round(sum(tokens[n]) / max(1, sum(steps[n])), 2),
                  "ms_per_step_block": round(sum(lat[n]) / max(1, sum(steps[n])), 2)}
    add_fp32_ratios(out, lat, "block")
    return out


def section_cold(engines: dict, cases: list[Case], long_context: bool) -> dict:
    from difill.inference.engine import Engine

    lat = {n: [] for n in engines}
    lat_1k = {n: [] for n in engines}
    context = {n: [] for n in engines}
    big = {}
    if long_context:
        for n, e in engines.items():
            twin = Engine(e.model, e.tokenizer, name=e.name, device=e.device, backend=e.backend,
                          settings=replace(e.settings, prefix_tokens=1000 - 160 - 4, suffix_tokens=160))
            twin.denoiser = e.denoiser
            big[n] = twin
    filler = long_filler() if long_context else ""
    for case in cases:
        for name, engine in engines.items():
            lat[name].append(engine.infill(line_request(case)).latency_ms)
            if long_context:  # more code above the case's own prefix, so that the budget fills up
                request = line_request(case, prefix=filler + case.prefix)
                context[name].append(len(big[name]._encode_context(request.prefix, request.suffix).before))
                lat_1k[name].append(big[name].infill(request).latency_ms)
    out = {n: {"cold_p50_ms_line": pct(lat[n], 0.5), "cold_p95_ms_line": pct(lat[n], 0.95)} for n in engines}
    if long_context:
        for n in engines:
            out[n].update(cold_p50_ms_line_1k=pct(lat_1k[n], 0.5), cold_p95_ms_line_1k=pct(lat_1k[n], 0.95),
                          context_tokens_1k_mean=round(statistics.mean(context[n]), 1))
    return out


def long_filler() -> str:
    """Real code to lengthen a prefix: the installed click package (held out from training)."""
    try:
        import click

        return (Path(click.__file__).parent / "core.py").read_text()[:12000] + "\n\n"
    except ImportError:
        return "".join(p.read_text() for p in sorted((ROOT / "inference").glob("*.py")))[:12000] + "\n\n"


def naive_infill(engine, case: Case, max_tokens: int = 24) -> tuple[str, float, int]:
    """Full forward over context + canvas every step, one token per step (the most confident),
    the same canvas size, stopping rule and trimming as the engine; no cache of any kind."""
    from difill.inference.engine import _grammars
    from difill.inference.model import block_diffusion_mask
    from difill.inference.sampler import first_end

    start = time.perf_counter()
    model, c = engine.model, engine.model.config
    encoded = engine._encode_context(case.prefix, case.suffix)
    context = encoded.before
    # Token healing as the engine does it: the canvas starts with the word taken back, its
    # positions chosen left to right among the tokens that agree with it.
    heal = encoded.heal
    is_end = engine._newline_end
    out: list[int] = []
    steps = 0
    with torch.inference_mode():
        while len(out) < max_tokens:
            width = min(engine.settings.line_tokens, max_tokens - len(out))
            canvas = torch.full((width,), c.mask_token_id, dtype=torch.long)
            ended = False
            for _ in range(width):
                ids = torch.tensor(context + canvas.tolist())[None]
                n = len(context)
                hidden = model.hidden_states(ids, torch.arange(ids.shape[1]), mask=block_diffusion_mask(n, width))
                logits = model.logits(hidden[0, n:]).float()
                logits[:, engine._banned] = float("-inf")
                masked = canvas == c.mask_token_id
                written = engine.tokenizer.decode(out + canvas[: int(masked.int().argmax())].tolist())
                healing = len(written) < len(heal)
                if healing:  # the leftmost masked position only, and only tokens that agree with the word
                    logits[int(masked.int().argmax()), ~engine._heal_allowed(heal[len(written):])[0]] = float("-inf")
                probs = torch.softmax(logits, dim=-1)
                conf, tokens = probs.max(dim=-1)
                conf[~masked] = -1.0
                if healing:
                    conf[int(masked.int().argmax()) + 1:] = -1.0
                p = int(conf.argmax())
                canvas[p] = tokens[p]
                steps += 1
                e = first_end(canvas, is_end, c.mask_token_id)
                if e is not None:
                    out += canvas[: e + 1].tolist()
                    ended = True
                    break
            if ended:
                break
            out += canvas.tolist()
            context = context[:-1] + canvas.tolist() + context[-1:]  # the block joins the context, <|middle|> stays last
    text = engine.tokenizer.decode(out)
    prefix = case.prefix[: len(case.prefix) - len(encoded.heal)]
    text = _grammars().trim_completion(prefix, text, case.suffix, None, "line")[len(encoded.heal):]
    return text, (time.perf_counter() - start) * 1000, steps


def section_naive(engine, cases: list[Case]) -> dict:
    eng_ms, naive_ms, eng_hit, naive_hit, eng_steps, naive_steps = [], [], 0, 0, 0, 0
    for case in cases:
        result = engine.infill(line_request(case))
        text, ms, steps = naive_infill(engine, case)
        eng_ms.append(result.latency_ms)
        naive_ms.append(ms)
        eng_hit += exact(result.completion, case.reference)
        naive_hit += exact(text, case.reference)
        eng_steps += result.steps
        naive_steps += steps
    n = max(1, len(cases))
    return {"cases": len(cases), "exact_engine": round(eng_hit / n, 4), "exact_naive": round(naive_hit / n, 4),
            "speedup_vs_naive": round(sum(naive_ms) / max(sum(eng_ms), 1e-9), 2),
            "engine_p50_ms": pct(eng_ms, 0.5), "naive_p50_ms": pct(naive_ms, 0.5),
            "engine_steps_mean": round(eng_steps / n, 2), "naive_steps_mean": round(naive_steps / n, 2)}


def section_window(engine, line_cases: list[Case], block_cases: list[Case]) -> dict:
    """Decoding order on the default path (syntax constraint on): pure threshold decoding (the
    most confident position first, window=0) against semi-autoregressive windows (the leftmost
    masked position every step, plus the sure ones among the first 1, 4 or 8): the evidence behind
    the model's decode_window, quality against steps."""
    return compare_settings(engine, {f"window={w}": {"window": w} for w in (0, 1, 4, 8)}, line_cases, block_cases)


def section_canvas(engine, line_cases: list[Case], block_cases: list[Case]) -> dict:
    """Canvas key/value reuse of block models (``refresh_every``, torch): every canvas position each step
    (1, exact) against runs over the changed and predicted positions only, with a full pass every
    2, 4 or 8 steps. Quality on the default path, and the forced 64-token block's latency."""
    variants = {f"refresh={n}": {"refresh_every": n} for n in (1, 2, 4, 8)}
    out = compare_settings(engine, variants, line_cases, block_cases)
    for name, changes in variants.items():
        out[f"64 tokens {name}"] = section_block({name: variant_engine(engine, changes)}, block_cases[:6])[name]
    return out


def variant_engine(engine, changes: dict):
    """The same model and backend with other engine settings."""
    from difill.inference.engine import Engine

    variant = Engine(engine.model, engine.tokenizer, name=engine.name, settings=replace(engine.settings, **changes))
    variant.denoiser = engine.denoiser
    return variant


def compare_settings(engine, variants: dict[str, dict], line_cases: list[Case], block_cases: list[Case]) -> dict:
    """Exact match, edit similarity, non-empty rate, steps and latency of engine-setting variants
    on line and block holes, on the default path (syntax constraint on)."""
    from difill.evaluation.metrics import edit_similarity
    from difill.inference.engine import InfillRequest

    engines = {name: variant_engine(engine, changes) for name, changes in variants.items()}
    out = {}
    for kind, cases, mode in (("line", line_cases, "line"), ("block", block_cases, "block")):
        for name, variant in engines.items():
            hits, similarity, non_empty, steps, ms = 0, 0.0, 0, 0, []
            for case in cases:
                result = variant.infill(InfillRequest(prefix=case.prefix, suffix=case.suffix, mode=mode, language="python"))
                hits += exact(result.completion, case.reference)
                similarity += edit_similarity(result.completion, case.reference)
                non_empty += bool(result.completion.strip())
                steps += result.steps
                ms.append(result.latency_ms)
            n = max(1, len(cases))
            out[f"{kind} {name}"] = {"cases": len(cases), "exact": round(hits / n, 4), "edit_similarity": round(similarity / n, 4),
                                     "non_empty": round(non_empty / n, 4), "steps_mean": round(steps / n, 2), "p50_ms": pct(ms, 0.5)}
    return out


def section_agreement(engines: dict, cases: list[Case]) -> dict:
    """Completions of each backend against torch, and (end tokens disabled, 16 tokens per case,
    so that even a weak model writes text to compare) the share of identical canvas tokens."""
    outputs = {n: [] for n in engines}
    canvases = {n: [] for n in engines}
    hits = {n: 0 for n in engines}
    twins = {n: forced(e) for n, e in engines.items()}
    for case in cases:
        for name, engine in engines.items():
            completion = engine.infill(line_request(case)).completion
            outputs[name].append(completion)
            hits[name] += exact(completion, case.reference)
            views = []
            twins[name].infill(replace(line_request(case, max_tokens=16), mode="block"), on_step=views.append)
            canvases[name].append(views[-1].canvas[0] if views else [])
    base, base_canvas = outputs.get("torch"), canvases.get("torch")
    out = {}
    for n in engines:
        out[n] = {"exact": round(hits[n] / max(1, len(cases)), 4)}
        if base is not None:
            out[n]["same_as_torch"] = round(sum(a == b for a, b in zip(outputs[n], base)) / max(1, len(cases)), 4)
            same = sum(sum(a == b for a, b in zip(x, y)) for x, y in zip(canvases[n], base_canvas))
            out[n]["tokens_same_as_torch"] = round(same / max(1, sum(len(y) for y in base_canvas)), 4)
    return out


def section_batch(engines: dict, cases: list[Case], size: int = 8) -> dict:
    out = {}
    requests = [line_request(c) for c in (cases * size)[:size]]
    for name, engine in engines.items():
        for r in requests[:2]:
            engine.infill(r)  # warm both paths
        seq_ms, batch_ms, same = [], [], True
        for _ in range(3):
            t = time.perf_counter()
            one = [engine.infill(r) for r in requests]
            seq_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            many = engine.infill_batch(requests)
            batch_ms.append((time.perf_counter() - t) * 1000)
            same &= [r.completion for r in one] == [getattr(r, "completion", r) for r in many]
        out[name] = {"batch": size, "sequential_ms": round(statistics.median(seq_ms), 1),
                     "batched_ms": round(statistics.median(batch_ms), 1),
                     "speedup": round(statistics.median(seq_ms) / statistics.median(batch_ms), 2), "same_results": same}
    return out


def section_threads(model: str | None, cases: list[Case]) -> dict:
    from difill.inference.engine import Engine, EngineSettings

    engine = Engine.load(model, settings=EngineSettings(threads=1))
    lat = {1: [], 2: []}
    for case in cases:
        for n in (1, 2):
            torch.set_num_threads(n)
            lat[n].append(engine.infill(line_request(case)).latency_ms)
    torch.set_num_threads(1)
    return {f"threads_{n}_p50_ms_line": pct(v, 0.5) for n, v in lat.items()}


SIZE_SHAPES = {"5.3M (256x4)": (256, 4, 4, 704), "13.8M (384x6)": (384, 6, 6, 1024), "17.3M (384x8)": (384, 8, 6, 1024),
               "23.5M (512x6)": (512, 6, 8, 1408), "29.9M (512x8)": (512, 8, 8, 1408)}


def section_sizes(rows: int = 24, context: int = 300, repeats: int = 20) -> dict:
    """CPU cost of one canvas step against model shape (random weights, fused as Engine.load
    fuses them), with the default CPU weights (``step_ms``) and with int8 weights
    (``step_ms_int8``, where FBGEMM serves them; unsmoothed: the weights are random, only the
    time counts): what sizes the next model for the editor's latency budget."""
    from difill.inference.engine import default_dtype
    from difill.inference.model import Int8WeightLinear, ModelConfig, Transformer

    def step_ms(model: Transformer) -> float:
        with torch.no_grad():
            cache = model.new_cache()
            model.hidden_states(torch.randint(10, 8000, (1, context)), torch.arange(context), cache=cache, causal=True, store=True)
            ids, positions = torch.randint(10, 8000, (1, rows)), torch.arange(context, context + rows)
            times = []
            for i in range(repeats + 3):
                start = time.perf_counter()
                model.logits(model.hidden_states(ids, positions, cache=cache))
                if i >= 3:
                    times.append((time.perf_counter() - start) * 1000)
        return round(statistics.median(times), 2)

    out = {}
    for name, (hidden, layers, heads, mlp) in SIZE_SHAPES.items():
        config = ModelConfig(hidden_size=hidden, n_layers=layers, n_heads=heads, n_kv_heads=heads, intermediate_size=mlp)
        model = Transformer(config).eval().fuse_projections(head=True)
        int8 = copy.deepcopy(model).pack_int8_weights() if Int8WeightLinear.available() else None
        if default_dtype("cpu") == "float16":
            model.pack_half_weights()
        out[name] = {"parameters": config.n_params(), "threads": torch.get_num_threads(), "weights": default_dtype("cpu"),
                     "step_ms": step_ms(model), "step_ms_int8": step_ms(int8) if int8 is not None else None}
    return out


def section_refresh(model: str | None, cases: list[Case], bidirectional_model: str | None) -> dict:
    """Agreement of the approximate cache with refresh_every=1 (exact), on 16 forced tokens per
    case (end tokens disabled, so there is text to compare even with a weak model)."""
    from difill import default_model_path
    from difill.inference.engine import Engine, EngineSettings
    from difill.inference.loader import load_model
    from difill.inference.model import Transformer

    if bidirectional_model:
        base = Engine.load(bidirectional_model)
        proxy = False
    else:
        block = Engine.load(model)
        config = replace(block.model.config, attention="bidirectional", prefix_token_id=None, suffix_token_id=None,
                         middle_token_id=None)
        net = Transformer(config)
        net.load_state_dict(load_model(Path(model) if model else default_model_path()).state_dict())  # the unfused weights
        base = Engine(net.eval().fuse_projections(), block.tokenizer, name=block.name + " (bidirectional proxy)")
        proxy = True
    out: dict = {"proxy": proxy}
    reference: list[list[int]] = []
    for every in (1, 2, 4, 8):
        engine = forced(base)
        engine.settings = EngineSettings(refresh_every=every)
        token_rows, lat = [], []
        for case in cases:
            views = []
            result = engine.infill(replace(line_request(case, max_tokens=16), mode="block"), on_step=views.append)
            token_rows.append(views[-1].canvas[0] if views else [])
            lat.append(result.latency_ms)
        if every == 1:
            reference = token_rows
        same_tokens = sum(sum(a == b for a, b in zip(x, y)) for x, y in zip(token_rows, reference))
        total = sum(len(y) for y in reference)
        out[f"refresh_{every}"] = {"p50_ms": pct(lat, 0.5), "token_agreement": round(same_tokens / max(1, total), 4),
                                   "infill_agreement": round(sum(x == y for x, y in zip(token_rows, reference)) / max(1, len(cases)), 4)}
    return out


# ---------------------------------------------------------------------------- GPU, 7B shapes
def gpu_7b(args) -> dict:
    """Random weights in Dream-Coder-7B's shapes, bf16, 2k context, 64-token infills."""
    from difill import default_model_path
    from difill.inference.engine import Engine, EngineSettings, InfillRequest
    from difill.inference.model import ModelConfig, Transformer
    from difill.inference.tokenizer import Tokenizer

    if not torch.cuda.is_available() and not args.dry_run:
        return {"skipped": "no CUDA device: --gpu-7b needs one (run it on a GPU machine)"}
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    shapes = dict(vocab_size=152064, hidden_size=3584, n_layers=28, n_heads=28, n_kv_heads=4, intermediate_size=18944)
    context, suffix = 2048 - 256 - 4, 256
    step_counts, repeats = (64, 32, 16, 8), 3
    if args.dry_run:  # the same code path with tiny shapes, to check it on a CPU
        shapes = dict(vocab_size=8192, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128)
        step_counts, repeats = (16, 8), 1
        torch.set_num_threads(1)
    tokenizer = Tokenizer.from_file(default_model_path() / "tokenizer.json")
    source = "".join(p.read_text() for p in sorted((ROOT / "inference").glob("*.py")))
    prefix, rest = source[: len(source) * 3 // 4], source[len(source) * 3 // 4:]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)", "shapes": shapes,
                     "mercury_coder_tokens_per_s_h100": MERCURY_CODER_TOKENS_PER_S}
    for layout in ("block", "bidirectional"):
        special = dict(mask_token_id=0, end_token_id=1, pad_token_id=2, bos_token_id=6)
        if layout == "block":
            special.update(prefix_token_id=3, suffix_token_id=4, middle_token_id=5)
        config = ModelConfig(**shapes, qkv_bias=True, tie_embeddings=False, max_position=32768, rope_theta=1e6,
                             attention=layout, shift_logits=layout == "bidirectional", **special)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = Transformer(config).eval().fuse_projections(head=device == "cpu")  # as Engine.load does
        finally:
            torch.set_default_dtype(previous)
        engine = forced(Engine(model, tokenizer, name=f"random-{layout}", device=device,
                               settings=EngineSettings(prefix_tokens=context, suffix_tokens=suffix, block_tokens=64,
                                                       canvas_tokens=64, refresh_every=4)))
        rows = {}
        for steps in step_counts:
            request = InfillRequest(prefix=prefix, suffix=rest, mode="block", max_tokens=64, steps=steps,
                                    constrain_syntax=False, document_key=f"gpu-{layout}")
            engine.infill(request)  # warm-up (and the context cache)
            times = []
            for i in range(repeats):
                if device == "cuda":
                    torch.cuda.synchronize()
                r = engine.infill(replace(request, prefix=prefix + "x" * (i + 1)))
                times.append(r.latency_ms)
            ms = statistics.median(times)
            rows[f"steps_{steps}"] = {"ms": round(ms, 1), "tokens_per_s": round(64 / (ms / 1000), 1),
                                      "vs_mercury": round(64 / (ms / 1000) / MERCURY_CODER_TOKENS_PER_S, 3)}
        results[layout] = rows
        del engine, model
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------------------- main
def conditions(engines: dict) -> dict:
    import onnxruntime

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    e = next(iter(engines.values()))
    return {"date": dt.datetime.now().isoformat(timespec="seconds"), "cpu": cpu, "cores": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "threads": torch.get_num_threads(),
            "model": e.name, "parameters": e.n_params, "context_tokens": e.context_tokens,
            "line_canvas": e.settings.line_tokens, "block_canvas": e.settings.canvas_tokens,
            "threshold": e.settings.threshold}


def table(title: str, rows: dict) -> str:
    keys = sorted({k for v in rows.values() for k in v})
    lines = [f"\n{title}", "  " + "variant".ljust(14) + "".join(k[:24].rjust(26) for k in keys)]
    for name, values in rows.items():
        lines.append("  " + name.ljust(14) + "".join(str(values.get(k, "")).rjust(26) for k in keys))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--out", help="also write the JSON object to this file")
    parser.add_argument("--quick", action="store_true", help="fewer cases (a smoke run)")
    parser.add_argument("--model", help="model directory (default: the bundled model)")
    parser.add_argument("--backends", help="comma-separated (default: torch,torch-fp32,[torch-int8,][torch-bf16,]onnx,onnx-int8)")
    parser.add_argument("--sections", default="warm,block,cold,naive,window,canvas,agreement,batch,threads,refresh")
    parser.add_argument("--bidirectional-model", help="a real bidirectional checkpoint for the refresh section")
    parser.add_argument("--gpu-7b", action="store_true", help="Dream-Coder-7B shapes in bf16 on CUDA")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu-7b: tiny shapes on the CPU (checks the code path)")
    args = parser.parse_args(argv)

    if args.gpu_7b:
        result = gpu_7b(args)
        if "skipped" in result:
            print(f"--gpu-7b skipped: {result['skipped']}", file=sys.stderr)
        emit(result, args, lambda r: json.dumps(r, indent=1))
        return 0

    sections = set(args.sections.split(","))
    backends = [b for b in (args.backends or default_backends()).split(",") if b]
    engines = load_engines(backends, args.model)
    first = next(iter(engines.values()))
    n_line, n_block, n_naive, n_keys, n_quality = (6, 3, 12, 12, 6) if args.quick else (30, 6, 50, 24, 40)
    line_cases, quality_blocks, source = load_cases(first.tokenizer, max(n_line, n_naive), max(n_block, n_quality))
    block_cases = quality_blocks[:n_block]  # latency; the quality comparisons take more
    report: dict = {"conditions": {**conditions(engines), "cases": source, "line_cases": len(line_cases),
                                   "block_cases": len(block_cases)}, "backends": {n: {} for n in engines}}

    def merge(section: dict) -> None:
        for name, values in section.items():
            report["backends"].setdefault(name, {}).update(values)

    started = time.perf_counter()
    if "warm" in sections:
        merge(section_warm(engines, line_cases[: 4 if args.quick else 8], n_keys))
    if "block" in sections:
        merge(section_block(engines, block_cases))
    if "cold" in sections:
        merge(section_cold(engines, line_cases[:n_line], long_context=True))
    if "naive" in sections and "torch" in engines:
        report["naive"] = section_naive(engines["torch"], line_cases[:n_naive])
    if "window" in sections and "torch" in engines:
        report["window"] = section_window(engines["torch"], line_cases[:n_naive], quality_blocks)
    if "canvas" in sections and "torch" in engines:
        report["canvas"] = section_canvas(engines["torch"], line_cases[:n_naive], quality_blocks)
    if "agreement" in sections:
        merge(section_agreement(engines, line_cases[:n_naive]))
    if "batch" in sections:
        report["batch"] = section_batch(engines, line_cases)
    if "threads" in sections:
        report["threads"] = section_threads(args.model, line_cases[: 4 if args.quick else 12])
    if "sizes" in sections:  # not in the default run: it times shapes, not the model
        report["sizes"] = section_sizes()
    if "refresh" in sections:
        report["refresh"] = section_refresh(args.model, line_cases[: 4 if args.quick else 12], args.bidirectional_model)
    report["conditions"]["seconds"] = round(time.perf_counter() - started, 1)
    report["conditions"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]

    # The headline figures: the default backend (torch), warm where the brief says so.
    main_backend = report["backends"].get("torch") or next(iter(report["backends"].values()))
    headline = {k: main_backend.get(k) for k in ("p50_ms_line", "p95_ms_line", "p50_ms_block", "tokens_per_s_block",
                                                  "cold_p50_ms_line", "cold_p50_ms_line_1k")}
    if "naive" in report:
        headline.update({k: report["naive"][k] for k in ("speedup_vs_naive", "exact_engine", "exact_naive")})
    torch_p50 = report["backends"].get("torch", {}).get("p50_ms_line")
    onnx_p50 = report["backends"].get("onnx", {}).get("p50_ms_line")
    headline["onnx_over_torch"] = round(torch_p50 / onnx_p50, 2) if torch_p50 and onnx_p50 else None  # >1: ONNX faster
    int8_p50 = report["backends"].get("onnx-int8", {}).get("p50_ms_line")
    headline["onnx_int8_over_torch"] = round(torch_p50 / int8_p50, 2) if torch_p50 and int8_p50 else None
    bf16_p50 = report["backends"].get("torch-bf16", {}).get("p50_ms_line")
    headline["bf16_over_torch"] = round(torch_p50 / bf16_p50, 2) if torch_p50 and bf16_p50 else None
    torch_int8_p50 = report["backends"].get("torch-int8", {}).get("p50_ms_line")
    headline["torch_int8_over_torch"] = round(torch_p50 / torch_int8_p50, 2) if torch_p50 and torch_int8_p50 else None
    # The default weights against float32 (>1: the default is faster), per case in one run.
    for kind in ("line", "block"):
        ratio = report["backends"].get("torch", {}).get(f"fp32_over_this_{kind}")
        if ratio is not None:
            headline[f"torch_over_fp32_{kind}"] = ratio
    for name, key in (("torch", "batch8_speedup"), ("torch-bf16", "batch8_speedup_bf16")):
        if name in report.get("batch", {}):
            headline[key] = report["batch"][name]["speedup"]
    report = {**headline, **report}
    emit(report, args, render)
    return 0


def render(report: dict) -> str:
    out = [f"difill engine benchmark, {report['conditions']['date']}: {report['conditions']['cpu']}, "
           f"{report['conditions']['cores']} cores, load {report['conditions']['load_average']} -> "
           f"{report['conditions']['load_average_end']}, model {report['conditions']['model']} "
           f"({report['conditions']['parameters'] / 1e6:.1f}M), cases: {report['conditions']['cases']}"]
    out.append(table("backends (warm = typing session; block = 64 forced tokens; cold = new document)", report["backends"]))
    for key in ("naive", "window", "canvas", "batch", "threads", "refresh", "sizes"):
        if key in report:
            section = report[key]
            nested = {k: v for k, v in section.items() if isinstance(v, dict)}
            flat = {k: v for k, v in section.items() if not isinstance(v, dict)}
            rows = {**({key: flat} if flat else {}), **nested}
            out.append(table(key, rows))
    out.append("\nheadline: " + json.dumps({k: v for k, v in report.items() if not isinstance(v, dict)}))
    return "\n".join(out)


def emit(report: dict, args, human) -> None:
    text = json.dumps(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(text if args.json else human(report))


if __name__ == "__main__":
    sys.exit(main())
