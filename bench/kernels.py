"""Benchmark of difill.kernels: each Triton kernel against its PyTorch reference and the engine's path.

    python bench/kernels.py                # table
    python bench/kernels.py --json         # table, then the JSON document on stdout
    python bench/kernels.py --out k.json   # also write the JSON document to a file

On a CUDA machine, for each kernel and shape: the floor (the time to move the bytes at HBM
bandwidth, or to do the FLOPs at tensor-core peak, whichever is longer), then correctness
(kernel vs the fp32 reference), then timings with CUDA events (median over runs, L2 flushed
before each run) of the kernel, the plain-PyTorch path the engine takes without kernels, and
the reference. Floors assume an H100 SXM: 3.35 TB/s HBM3 and 989 TFLOP/s dense bf16/fp16.

On CUDA it also times the bundled model's infill end to end with the kernels on and off.
Without CUDA it says that the GPU figures are pending and times the PyTorch paths on the CPU
at the small (bundled model) shapes, as a smoke figure.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from difill.kernels import (
    TRITON_ERROR,
    canvas_attention_reference,
    canvas_attention_triton,
    confidence_reference,
    confidence_triton,
    triton_available,
)

HBM_BYTES_PER_S = 3.35e12  # H100 SXM5 HBM3
TENSOR_FLOPS = 989e12  # H100 SXM5 dense bf16/fp16 tensor cores
ASSUMPTIONS = {
    "gpu": "H100 SXM5",
    "hbm_bandwidth_TBps": HBM_BYTES_PER_S / 1e12,
    "dense_bf16_TFLOPs": TENSOR_FLOPS / 1e12,
    "floor": "max(bytes / bandwidth, flops / peak): each input read once, each output written once, nothing else",
    "timing": "CUDA events, median of runs, a 256 MiB buffer overwritten before each run to flush L2",
}


@dataclass
class ConfidenceCase:
    name: str
    rows: int  # canvas positions scored at once (candidates x canvas length)
    hidden: int
    vocab: int
    policy: str = "margin"
    small: bool = False  # also run on the CPU smoke pass


@dataclass
class AttentionCase:
    name: str
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    context: int  # cached keys
    canvas: int  # queries = canvas keys
    small: bool = False


CONFIDENCE_CASES = [
    ConfidenceCase("difill-small (bundled)", 32, 256, 8192, small=True),
    ConfidenceCase("difill-small, 8 candidates", 256, 256, 8192, small=True),
    ConfidenceCase("7B dLLM (Qwen2.5 vocab)", 32, 3584, 152064),
    ConfidenceCase("7B dLLM, 64 positions, entropy", 64, 3584, 152064, policy="entropy"),
]
ATTENTION_CASES = [
    AttentionCase("difill-small (bundled)", 1, 4, 4, 64, 256, 32, small=True),
    AttentionCase("7B dLLM GQA 28/4, 2k context", 1, 28, 4, 128, 2048, 32),
    AttentionCase("7B dLLM GQA 28/4, 4k context, 64 canvas", 1, 28, 4, 128, 4096, 64),
    AttentionCase("7B dLLM, 4 candidates, shared 2k cache", 4, 28, 4, 128, 2048, 32),
]


@dataclass
class Row:
    kernel: str
    case: str
    shape: dict
    dtype: str
    bytes: int
    flops: int
    floor_us: float
    correctness: dict = field(default_factory=dict)
    timings_us: dict = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        t, base = self.timings_us.get("triton"), self.timings_us.get("torch_engine_path")
        return round(base / t, 2) if t and base else None


def floor_us(nbytes: int, flops: int) -> float:
    return max(nbytes / HBM_BYTES_PER_S, flops / TENSOR_FLOPS) * 1e6


def time_cuda(fn: Callable[[], object], runs: int = 30, warmup: int = 5) -> float:
    """Median microseconds of ``fn`` with CUDA events, L2 flushed before each run."""
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return round(statistics.median(times), 2)


def time_cpu(fn: Callable[[], object], runs: int = 5) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return round(statistics.median(times), 1)


# ---------------------------------------------------------------------------- fused confidence
def engine_confidence(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, policy: str, to_host: bool):
    """What the engine and sampler do without the kernel: full logits in the model dtype, cast
    to fp32, (copied to the host), banned, softmaxed, then max and the policy score."""
    logits = F.linear(hidden, weight).float()
    if to_host:
        logits = logits.cpu()
    probs = torch.softmax(logits + bias.to(logits.device), dim=-1)
    prob, token = probs.max(dim=-1)
    if policy == "margin":
        top2 = probs.topk(2, dim=-1).values
        return token, prob, top2[:, 0] - top2[:, 1]
    if policy == "entropy":
        return token, prob, (probs * probs.clamp_min(1e-12).log()).sum(-1)
    return token, prob, prob


def bench_confidence(case: ConfidenceCase, device: str, dtype: torch.dtype) -> Row:
    n, d, v = case.rows, case.hidden, case.vocab
    size = torch.finfo(dtype).bits // 8
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).to(device, dtype)
    weight = (torch.randn(v, d, generator=gen) * (2 / math.sqrt(d))).to(device, dtype)
    bias = torch.zeros(v, device=device)
    bias[:8] = float("-inf")  # the special tokens the sampler bans
    nbytes = v * d * size + n * d * size + v * 4 + n * 16
    flops = 2 * n * v * d
    row = Row("fused_confidence", case.name, {"rows": n, "hidden": d, "vocab": v, "policy": case.policy},
              str(dtype).replace("torch.", ""), nbytes, flops, round(floor_us(nbytes, flops), 2))
    want = confidence_reference(hidden, weight, case.policy, bias=bias)
    engine = engine_confidence(hidden, weight, bias, case.policy, to_host=False)
    row.correctness["torch_engine_path_max_abs_err_prob"] = float((engine[1] - want.prob).abs().max())
    if device == "cuda":
        if triton_available():
            got = confidence_triton(hidden, weight, case.policy, bias=bias)
            row.correctness.update(
                token_agreement=float((got.token == want.token).float().mean()),
                max_abs_err_prob=float((got.prob - want.prob).abs().max()),
                max_abs_err_score=float((got.score - want.score).abs().max()),
            )
            row.timings_us["triton"] = time_cuda(lambda: confidence_triton(hidden, weight, case.policy, bias=bias))
        row.timings_us["torch_engine_path"] = time_cuda(lambda: engine_confidence(hidden, weight, bias, case.policy, False))
        row.timings_us["torch_engine_path_with_host_copy"] = time_cuda(lambda: engine_confidence(hidden, weight, bias, case.policy, True))
        row.timings_us["reference_fp32"] = time_cuda(lambda: confidence_reference(hidden, weight, case.policy, bias=bias))
    else:
        row.timings_us["torch_engine_path"] = time_cpu(lambda: engine_confidence(hidden, weight, bias, case.policy, False))
        row.timings_us["reference_fp32"] = time_cpu(lambda: confidence_reference(hidden, weight, case.policy, bias=bias))
    return row


# ---------------------------------------------------------------------------- canvas attention
def engine_attention(q, k_cache, v_cache, k_new, v_new):
    """The model's path without the kernel: cat the cache and the canvas, repeat kv heads, SDPA."""
    b = q.shape[0]
    keys = torch.cat([k_cache.expand(b, -1, -1, -1), k_new], dim=2)
    values = torch.cat([v_cache.expand(b, -1, -1, -1), v_new], dim=2)
    group = q.shape[1] // keys.shape[1]
    if group > 1:
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, keys, values)


def bench_attention(case: AttentionCase, device: str, dtype: torch.dtype) -> Row:
    b, hq, hkv, d, t, m = case.batch, case.q_heads, case.kv_heads, case.head_dim, case.context, case.canvas
    size = torch.finfo(dtype).bits // 8
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    q, k_cache, v_cache, k_new, v_new = rand(b, hq, m, d), rand(1, hkv, t, d), rand(1, hkv, t, d), rand(b, hkv, m, d), rand(b, hkv, m, d)
    nbytes = (2 * hkv * t * d + 2 * b * hkv * m * d + 2 * b * hq * m * d) * size
    flops = 4 * b * hq * m * (t + m) * d
    row = Row("canvas_attention", case.name, {"batch": b, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "context": t, "canvas": m},
              str(dtype).replace("torch.", ""), nbytes, flops, round(floor_us(nbytes, flops), 2))
    want = canvas_attention_reference(q, k_cache, v_cache, k_new, v_new).float()
    row.correctness["torch_engine_path_max_abs_err"] = float((engine_attention(q, k_cache, v_cache, k_new, v_new).float() - want).abs().max())
    if device == "cuda":
        if triton_available():
            got = canvas_attention_triton(q, k_cache, v_cache, k_new, v_new)
            row.correctness["max_abs_err"] = float((got.float() - want).abs().max())
            row.timings_us["triton"] = time_cuda(lambda: canvas_attention_triton(q, k_cache, v_cache, k_new, v_new))
        row.timings_us["torch_engine_path"] = time_cuda(lambda: engine_attention(q, k_cache, v_cache, k_new, v_new))
        row.timings_us["reference_fp32"] = time_cuda(lambda: canvas_attention_reference(q, k_cache, v_cache, k_new, v_new))
    else:
        row.timings_us["torch_engine_path"] = time_cpu(lambda: engine_attention(q, k_cache, v_cache, k_new, v_new))
        row.timings_us["reference_fp32"] = time_cpu(lambda: canvas_attention_reference(q, k_cache, v_cache, k_new, v_new))
    return row


# ---------------------------------------------------------------------------- end to end
def bench_engine(runs: int = 10) -> dict:
    """CUDA only: the bundled model's infill latency with the kernels on and off (what a user
    feels; on a model this small a step is mostly launch overhead, so expect a modest gap)."""
    from difill.inference.engine import Engine, EngineSettings, InfillRequest

    request = InfillRequest("def fibonacci(n):\n    if n < 2:\n        return n\n    return ", "\n", language="python",
                            mode="line", constrain_syntax=False)
    out = {}
    for label, on in (("kernels", True), ("no_kernels", False)):
        engine = Engine.load(device="cuda", settings=EngineSettings(use_kernels=on))
        engine.infill(request)
        times = []
        for _ in range(runs):
            torch.cuda.synchronize()
            start = time.perf_counter()
            result = engine.infill(request)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
        out[label] = {"median_ms": round(statistics.median(times), 2), "steps": result.steps,
                      "tokens": result.tokens, "completion": result.completion, "use_kernels": engine.use_kernels}
    out["same_completion"] = out["kernels"]["completion"] == out["no_kernels"]["completion"]
    return out


# ---------------------------------------------------------------------------- report
def print_table(rows: list[Row], gpu: bool) -> None:
    header = f"{'kernel':<17} {'case':<42} {'dtype':<9} {'MB':>8} {'floor us':>9} {'triton us':>10} {'torch us':>10} {'ref us':>10} {'speedup':>8} {'% floor':>8}  correctness"
    print(header)
    print("-" * len(header))
    for r in rows:
        t = r.timings_us
        triton_us = t.get("triton")
        pct = f"{100 * r.floor_us / triton_us:.0f}%" if triton_us else "-"
        errs = ", ".join(f"{k}={v:.2g}" for k, v in r.correctness.items())
        print(f"{r.kernel:<17} {r.case:<42} {r.dtype:<9} {r.bytes / 1e6:>8.2f} {r.floor_us:>9.2f} "
              f"{triton_us if triton_us is not None else '-':>10} {t.get('torch_engine_path', '-'):>10} "
              f"{t.get('reference_fp32', '-'):>10} {r.speedup if r.speedup else '-':>8} {pct:>8}  {errs}")
    if not gpu:
        print("\nGPU figures pending: no CUDA device here. The timings above are the PyTorch paths on the CPU"
              " (smoke figures, small shapes only); the floors are for an H100.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the JSON document after the table")
    parser.add_argument("--out", help="write the JSON document to this file")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = getattr(torch, args.dtype) if gpu else torch.float32  # the CPU engine runs fp32
    torch.manual_seed(0)
    rows: list[Row] = []
    for case in CONFIDENCE_CASES:
        if gpu or case.small:
            rows.append(bench_confidence(case, device, dtype))
    for case in ATTENTION_CASES:
        if gpu or case.small:
            rows.append(bench_attention(case, device, dtype))
    print_table(rows, gpu)
    engine = None
    if gpu:
        engine = bench_engine()
        print(f"\nengine, bundled model, line completion: kernels {engine['kernels']['median_ms']} ms, "
              f"without {engine['no_kernels']['median_ms']} ms, same completion: {engine['same_completion']}")
    document = {
        "device": torch.cuda.get_device_name() if gpu else f"cpu ({platform.processor() or platform.machine()})",
        "gpu_figures": "measured" if gpu else "pending: no CUDA device",
        "torch": torch.__version__,
        "triton": (__import__("triton").__version__ if triton_available() else f"not importable ({TRITON_ERROR})"),
        "assumptions": ASSUMPTIONS,
        "results": [dict(asdict(r), speedup=r.speedup) for r in rows],
        "engine": engine if engine is not None else "pending: no CUDA device",
    }
    if args.json:
        print(json.dumps(document, indent=2))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2)
    if gpu and triton_available():
        bad = [r for r in rows if r.correctness.get("max_abs_err", 0) > 0.05 or r.correctness.get("max_abs_err_prob", 0) > 0.01]
        if bad:
            print(f"\ncorrectness check failed for: {', '.join(f'{r.kernel} / {r.case}' for r in bad)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
