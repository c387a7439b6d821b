"""The Triton kernels against their PyTorch references, on random inputs of several shapes and dtypes.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set below before
difill.kernels is imported, since Triton reads it when a kernel is defined), on small shapes.
With a GPU the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from difill import kernels  # noqa: E402
from difill.kernels import (  # noqa: E402
    canvas_attention,
    canvas_attention_reference,
    canvas_attention_triton,
    confidence_reference,
    confidence_triton,
    fused_confidence,
)
from difill.kernels import _common  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


def _interpreted() -> bool:
    from difill.kernels import confidence

    return type(confidence._confidence_partial_kernel).__name__ == "InterpretedFunction"


needs_triton = pytest.mark.skipif(
    not kernels.triton_available() or (not ON_GPU and not _interpreted()),
    reason=f"triton is not importable ({kernels.TRITON_ERROR})" if not kernels.triton_available()
    else "no GPU, and difill.kernels was imported before TRITON_INTERPRET=1 was set (run this file on its own)",
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _head(n: int, d: int, vocab: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states and a head weight whose logits spread over a few units, as a trained head's do."""
    g = _gen(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(vocab, d, generator=g) * (2.0 / math.sqrt(d))
    return hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype)


def _assert_confidence_close(got, want, logits: torch.Tensor, atol: float = 1e-4) -> None:
    """Same probability and score; same token unless the top two logits are within rounding."""
    torch.testing.assert_close(got.prob.cpu(), want.prob.cpu(), atol=atol, rtol=1e-4)
    torch.testing.assert_close(got.score.cpu(), want.score.cpu(), atol=atol, rtol=1e-4)
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert torch.equal(got.token.cpu()[clear], want.token.cpu()[clear])
    picked = logits.gather(1, got.token.cpu().reshape(-1, 1).long())[:, 0]
    assert torch.all(picked >= top2[:, 0] - 1e-3), "the kernel picked a token that is not (nearly) the argmax"


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]).float(), weight.float()).cpu()
    return logits if bias is None else logits + bias.float().cpu().reshape(-1, weight.shape[0])


# ---------------------------------------------------------------------------- fused confidence
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, d, vocab, policy", [
    (1, 16, 17, "confidence"),  # one row, a vocabulary smaller than a tile
    (20, 48, 300, "margin"),  # hidden size not a power of two, a ragged last tile
    (70, 40, 260, "entropy"),  # more rows than one row block
])
def test_confidence_matches_reference(dtype, n, d, vocab, policy):
    hidden, weight = _head(n, d, vocab, dtype, seed=n + vocab)
    got = confidence_triton(hidden, weight, policy, block_v=64, splits=3)
    want = confidence_reference(hidden, weight, policy)
    _assert_confidence_close(got, want, _logits(hidden, weight))


@needs_triton
@pytest.mark.parametrize("policy", ["confidence", "margin", "entropy"])
def test_confidence_every_policy_with_bans(policy):
    """The engine's two kinds of bans: a shared -inf bias (special tokens) and per-row vetoed ids."""
    n, d, vocab = 24, 32, 200
    hidden, weight = _head(n, d, vocab, torch.float32, seed=7)
    logits = _logits(hidden, weight)
    bias = torch.zeros(vocab, device=DEVICE)
    bias[[0, 1, 2, 150]] = float("-inf")
    bias[10] = 0.5
    winners = logits.argmax(dim=-1)
    banned = torch.full((n, 3), -1, dtype=torch.int64)
    banned[::2, 0] = winners[::2]  # veto the argmax of every other row: the runner-up must win
    banned[1, 2] = 199
    banned = banned.to(DEVICE)
    got = confidence_triton(hidden, weight, policy, bias=bias, banned_ids=banned, block_v=32, splits=4)
    want = confidence_reference(hidden, weight, policy, bias=bias, banned_ids=banned)
    masked = logits + bias.cpu()
    masked[torch.arange(0, n, 2), winners[::2]] = float("-inf")
    _assert_confidence_close(got, want, masked)
    assert not torch.any(got.token.cpu()[::2] == winners[::2])
    assert not torch.isin(got.token.cpu(), torch.tensor([0, 1, 2, 150])).any()


@needs_triton
def test_confidence_per_row_bias_and_leading_dims():
    """A [B, M, V] bias on [B, M, d] hidden states: outputs keep the leading shape."""
    b, m, d, vocab = 2, 5, 32, 150
    hidden, weight = _head(b * m, d, vocab, torch.float16, seed=3)
    hidden = hidden.reshape(b, m, d)
    bias = torch.randn(b, m, vocab, generator=_gen(4)).to(DEVICE)
    bias[0, 0, :100] = float("-inf")
    got = confidence_triton(hidden, weight, "entropy", bias=bias, block_v=64, splits=2)
    want = confidence_reference(hidden, weight, "entropy", bias=bias)
    assert got.token.shape == (b, m) and got.prob.shape == (b, m)
    assert int(got.token[0, 0]) >= 100
    flat = type(got)(*(t.reshape(-1) for t in got))
    _assert_confidence_close(flat, type(want)(*(t.reshape(-1) for t in want)), _logits(hidden, weight, bias), atol=2e-4)


@needs_triton
@pytest.mark.parametrize("splits", [1, 2, 9])
def test_confidence_ties_pick_the_first_index(splits):
    """Identical head rows in different tiles and chunks: the lowest id wins, the margin is 0."""
    d, vocab = 16, 288
    weight = torch.randn(vocab, d, generator=_gen(5)) * 0.1
    direction = torch.randn(d, generator=_gen(6))
    for i in (40, 41, 130, 250):  # two in one tile, then other tiles / chunks
        weight[i] = direction
    hidden = direction.repeat(3, 1)
    got = confidence_triton(hidden.to(DEVICE), weight.to(DEVICE), "margin", block_v=32, splits=splits)
    assert got.token.tolist() == [40, 40, 40]
    assert torch.allclose(got.score.cpu(), torch.zeros(3), atol=1e-6)
    want = confidence_reference(hidden, weight, "margin")
    assert want.token.tolist() == [40, 40, 40]


@needs_triton
def test_confidence_split_count_does_not_change_the_answer():
    hidden, weight = _head(16, 32, 500, torch.float32, seed=11)
    one = confidence_triton(hidden, weight, "entropy", block_v=32, splits=1)
    many = confidence_triton(hidden, weight, "entropy", block_v=32, splits=16)
    assert torch.equal(one.token, many.token)
    torch.testing.assert_close(one.prob, many.prob, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one.score, many.score, atol=1e-5, rtol=1e-5)


def test_confidence_reference_matches_the_sampler():
    """The reference is the sampler's own arithmetic (softmax, max, top-2, entropy)."""
    from difill.inference.sampler import score

    hidden, weight = torch.randn(6, 16, generator=_gen(1)), torch.randn(50, 16, generator=_gen(2))
    probs = torch.softmax(hidden @ weight.T, dim=-1)
    for policy in ("confidence", "margin", "entropy"):
        ref = confidence_reference(hidden, weight, policy)
        torch.testing.assert_close(ref.score, score(probs, policy))
        assert torch.equal(ref.token, probs.argmax(dim=-1))


# ---------------------------------------------------------------------------- canvas attention
def _attention_inputs(b, hq, hkv, m, t, d, cache_batch, dtype, seed):
    g = _gen(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    q = rand(b, hq, m, d)
    k_cache, v_cache = (rand(cache_batch, hkv, t, d), rand(cache_batch, hkv, t, d)) if t else (None, None)
    return q, k_cache, v_cache, rand(b, hkv, m, d), rand(b, hkv, m, d)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b, hq, hkv, m, t, d, cache_batch, splits", [
    (1, 4, 4, 16, 100, 32, 1, None),  # multi-head, several key chunks
    (2, 6, 2, 5, 37, 24, 1, 3),  # GQA (3 q heads per kv head), a cache shared by the batch, odd sizes
    (2, 4, 1, 8, 0, 16, 2, None),  # no context: the canvas attends to itself only
    (1, 8, 2, 16, 70, 64, 1, 1),  # one chunk: the direct path without the merge pass
])
def test_canvas_attention_matches_reference(dtype, b, hq, hkv, m, t, d, cache_batch, splits):
    inputs = _attention_inputs(b, hq, hkv, m, t, d, cache_batch, dtype, seed=b * 100 + t)
    got = canvas_attention_triton(*inputs, splits=splits, block_m=16, block_n=16)
    want = canvas_attention_reference(*inputs)
    assert got.dtype == dtype and got.shape == (b, hq, m, d)
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=TOL[dtype], rtol=TOL[dtype])


@needs_triton
def test_canvas_attention_reads_a_truncated_cache_in_place():
    """KVCache.truncate leaves strided views; the kernel reads them without a copy."""
    q, k_cache, v_cache, k_new, v_new = _attention_inputs(1, 4, 2, 8, 90, 32, 1, torch.float32, seed=9)
    k_view, v_view = k_cache[:, :, :50], v_cache[:, :, :50]
    assert not k_view.is_contiguous()
    got = canvas_attention_triton(q, k_view, v_view, k_new, v_new, block_m=16, block_n=16)
    want = canvas_attention_reference(q, k_view.contiguous(), v_view.contiguous(), k_new, v_new)
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=2e-5, rtol=2e-5)


def test_canvas_attention_reference_matches_the_model_path():
    """The reference computes what the model did (cat + repeat_interleave + SDPA, no mask)."""
    q, k_cache, v_cache, k_new, v_new = _attention_inputs(2, 6, 2, 5, 20, 16, 1, torch.float32, seed=2)
    q, k_cache, v_cache, k_new, v_new = (x.cpu() for x in (q, k_cache, v_cache, k_new, v_new))
    keys = torch.cat([k_cache.expand(2, -1, -1, -1), k_new], dim=2).repeat_interleave(3, dim=1)
    values = torch.cat([v_cache.expand(2, -1, -1, -1), v_new], dim=2).repeat_interleave(3, dim=1)
    sdpa = F.scaled_dot_product_attention(q, keys, values)
    torch.testing.assert_close(canvas_attention_reference(q, k_cache, v_cache, k_new, v_new), sdpa, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- dispatch and errors
def test_dispatch_uses_the_reference_when_switched_off(monkeypatch):
    monkeypatch.setenv("DIFILL_KERNELS", "0")
    assert not kernels.kernels_enabled("cuda")
    assert not _common.use_triton(torch.zeros(1))
    hidden, weight = torch.randn(3, 8, generator=_gen(0)), torch.randn(40, 8, generator=_gen(1))
    got, want = fused_confidence(hidden, weight, "margin"), confidence_reference(hidden, weight, "margin")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    inputs = [x.cpu() for x in _attention_inputs(1, 2, 1, 4, 6, 8, 1, torch.float32, seed=0)]
    assert torch.equal(canvas_attention(*inputs), canvas_attention_reference(*inputs))


def test_cpu_device_never_enables_the_engine_kernels():
    assert not kernels.kernels_enabled("cpu")


@needs_triton
def test_dispatch_reaches_the_kernel_when_enabled(monkeypatch):
    """On CUDA (or in the interpreter) the public functions run the Triton kernels."""
    monkeypatch.setenv("DIFILL_KERNELS", "1")
    hidden, weight = _head(4, 16, 40, torch.float32, seed=0)
    calls = []
    original = _common.use_triton
    monkeypatch.setattr(kernels, "use_triton", lambda t: calls.append(original(t)) or original(t))
    got = fused_confidence(hidden, weight, "confidence")
    assert calls == [True]
    _assert_confidence_close(got, confidence_reference(hidden, weight, "confidence"), _logits(hidden, weight))


@pytest.mark.parametrize("call, message", [
    (lambda: confidence_reference(torch.zeros(2, 8), torch.zeros(10, 8), "greedy"), "unknown policy"),
    (lambda: confidence_reference(torch.zeros(2, 8), torch.zeros(10, 9), "margin"), "hidden size 8"),
    (lambda: confidence_reference(torch.zeros(2, 8), torch.zeros(10, 8, dtype=torch.float16), "margin"), "share a float dtype"),
    (lambda: confidence_reference(torch.zeros(2, 8), torch.zeros(10, 8), "margin", bias=torch.zeros(11)), "bias must be"),
    (lambda: confidence_reference(torch.zeros(2, 8), torch.zeros(10, 8), "margin", banned_ids=torch.zeros(3, 1, dtype=torch.long)), "banned_ids"),
    (lambda: canvas_attention_reference(torch.zeros(1, 3, 4, 8), None, None, torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8)), "multiple"),
    (lambda: canvas_attention_reference(torch.zeros(1, 2, 4, 8), torch.zeros(3, 2, 5, 8), torch.zeros(3, 2, 5, 8),
                                        torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8)), "does not fit"),
    (lambda: canvas_attention_reference(torch.zeros(1, 2, 4, 8), None, None, torch.zeros(1, 2, 4, 8, dtype=torch.float16),
                                        torch.zeros(1, 2, 4, 8, dtype=torch.float16)), "one float dtype"),
])
def test_bad_inputs_get_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@needs_triton
def test_long_query_windows_go_to_sdpa(monkeypatch):
    """A bidirectional model's full pass reaches the same hook: past MAX_KERNEL_QUERIES queries
    the dispatcher uses SDPA, not the split-K kernel."""
    monkeypatch.setenv("DIFILL_KERNELS", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("the split-K kernel ran on a long query window")

    monkeypatch.setattr(kernels, "canvas_attention_triton", refuse)
    m = kernels.MAX_KERNEL_QUERIES + 1
    q, _, _, k, v = _attention_inputs(1, 4, 2, m, 0, 16, 1, torch.float32, seed=4)
    torch.testing.assert_close(canvas_attention(q, None, None, k, v).cpu(),
                               canvas_attention_reference(q, None, None, k, v).cpu(), atol=1e-5, rtol=1e-5)
