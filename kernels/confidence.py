"""Fused output head + confidence: argmax token and its score without the [N, V] softmax.

Every denoising step asks, for each canvas position, "which token, and how sure?". The plain
way computes the logits over the whole vocabulary (N x 152k floats for the open dLLMs), adds
the bans, softmaxes, takes the max (and the top-2 or the entropy), and, in the engine as it
was, copies all the logits to the host. All of that is memory traffic over a tensor that is
thrown away a moment later. The only big thing that has to be read is the head weight [V, d];
this kernel reads it once and keeps per-row running statistics instead of the logits:

* the running max ``m`` and the running sum of ``exp(l - m)`` (online softmax),
* the running sum of ``exp(l - m) * l``, which gives the entropy at the end:
  ``H = -sum p log p = m + log S - T / S`` with ``S = sum e^(l-m)`` and ``T = sum e^(l-m) l``,
* the top-1 logit with its index and the top-2 logit (for the margin policy).

Pass 1 splits the vocabulary into contiguous chunks, one program per (row block, chunk), so a
GPU with 132 SMs has a few hundred programs even for 16 rows; each writes its partial
statistics. Pass 2 merges each row's chunks (a log-sum-exp merge) and writes token, probability
and score. Logits are accumulated in fp32 from fp16/bf16/fp32 inputs.

Bans. The sampler bans two kinds of tokens: the same few ids for every position (mask, pad,
layout tokens, padded vocabulary rows) and, per position, the tokens the syntax critic vetoed
there (at most ``max_reviews_per_position``, i.e. 3). So the kernel takes both forms:

* ``bias``: an additive fp32 vector [V] (``-inf`` bans; shared by every row, read once per
  tile from L2) or a per-row matrix [N, V] when a caller really needs one;
* ``banned_ids``: an int tensor [N, K] of ids banned per row, ``-1`` = unused slot; K is small
  (the kernel compares each logit tile against K ids).

At least one token per row must stay allowed (the sampler never bans everything): with every
logit ``-inf`` the probability is NaN in the reference and undefined in the kernel.

Ties: the reference's ``argmax`` picks the first maximal index, and so does the kernel (within
a tile ``tl.argmax`` breaks ties to the left, across tiles and chunks only a strictly larger
logit wins). Logits that differ only by fp32 rounding can still pick different tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from difill.kernels._common import cdiv, interpreting, multiprocessor_count, next_power_of_2, triton

POLICIES = ("confidence", "margin", "entropy")


class Confidence(NamedTuple):
    """Per position: the argmax token, its probability, and the policy's score (higher is surer).

    ``score`` is the probability for ``confidence``, top-1 minus top-2 probability for
    ``margin``, and the negative entropy (nats) for ``entropy`` — the sampler's conventions.
    """

    token: torch.Tensor  # int64 [...]
    prob: torch.Tensor  # float32 [...]
    score: torch.Tensor  # float32 [...]


def check_confidence_inputs(hidden: torch.Tensor, head_weight: torch.Tensor, policy: str,
                            bias: torch.Tensor | None, banned_ids: torch.Tensor | None) -> None:
    """Clear errors for shapes and dtypes that would otherwise fail deep inside a kernel."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r} (one of {', '.join(POLICIES)})")
    if hidden.dim() < 1 or head_weight.dim() != 2:
        raise ValueError(f"hidden must be [..., d] and head_weight [V, d], got {tuple(hidden.shape)} and {tuple(head_weight.shape)}")
    if hidden.shape[-1] != head_weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match head_weight {tuple(head_weight.shape)}")
    if not hidden.is_floating_point() or hidden.dtype != head_weight.dtype:
        raise ValueError(f"hidden and head_weight must share a float dtype, got {hidden.dtype} and {head_weight.dtype}")
    if hidden.device != head_weight.device:
        raise ValueError(f"hidden is on {hidden.device} but head_weight on {head_weight.device}")
    vocab, lead = head_weight.shape[0], tuple(hidden.shape[:-1])
    if bias is not None:
        if not bias.is_floating_point() or bias.device != hidden.device:
            raise ValueError(f"bias must be a float tensor on {hidden.device}, got {bias.dtype} on {bias.device}")
        if tuple(bias.shape) not in {(vocab,), lead + (vocab,)}:
            raise ValueError(f"bias must be [V] = [{vocab}] or [..., V] = {list(lead + (vocab,))}, got {list(bias.shape)}")
    if banned_ids is not None:
        if banned_ids.dtype not in (torch.int32, torch.int64) or banned_ids.device != hidden.device:
            raise ValueError(f"banned_ids must be int32/int64 on {hidden.device}, got {banned_ids.dtype} on {banned_ids.device}")
        if banned_ids.dim() != len(lead) + 1 or tuple(banned_ids.shape[:-1]) != lead:
            raise ValueError(f"banned_ids must be [..., K] with leading shape {list(lead)}, got {list(banned_ids.shape)}")


def confidence_reference(hidden: torch.Tensor, head_weight: torch.Tensor, policy: str,
                         bias: torch.Tensor | None = None, banned_ids: torch.Tensor | None = None) -> Confidence:
    """Plain PyTorch: full fp32 logits, softmax, max / top-2 / entropy (as the sampler does)."""
    check_confidence_inputs(hidden, head_weight, policy, bias, banned_ids)
    lead, vocab = hidden.shape[:-1], head_weight.shape[0]
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]).float(), head_weight.float())
    if bias is not None:
        logits = logits + bias.float().reshape(-1, vocab)
    if banned_ids is not None and banned_ids.numel():
        ids = banned_ids.reshape(logits.shape[0], -1).long()
        ban = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
        ban.scatter_(1, torch.where(ids < 0, vocab, ids), True)  # -1 slots land in the spare column
        logits = logits.masked_fill(ban[:, :vocab], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    prob, token = probs.max(dim=-1)
    if policy == "confidence":
        score = prob
    elif policy == "margin":
        top2 = probs.topk(2, dim=-1).values if vocab > 1 else torch.cat([probs, torch.zeros_like(probs)], dim=-1)
        score = top2[:, 0] - top2[:, 1]
    else:
        score = (probs * probs.clamp_min(1e-12).log()).sum(dim=-1)  # minus the entropy
    return Confidence(token.reshape(lead), prob.reshape(lead), score.reshape(lead))


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _confidence_partial_kernel(
        h_ptr, w_ptr, bias_ptr, banned_ptr,
        m_ptr, s_ptr, t_ptr, top1_ptr, idx1_ptr, top2_ptr,
        N, V, D, stride_hn, stride_wv, stride_bias_n, tiles_per_split,
        HAS_BIAS: tl.constexpr, N_BANNED: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One (row block, vocabulary chunk): online softmax statistics over the chunk's tiles."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        n_splits = tl.num_programs(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        lanes = tl.arange(0, BLOCK_V)
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_N], tl.float32)
        t = tl.zeros([BLOCK_N], tl.float32)
        top1 = tl.full([BLOCK_N], float("-inf"), tl.float32)
        top2 = tl.full([BLOCK_N], float("-inf"), tl.float32)
        idx1 = tl.zeros([BLOCK_N], tl.int32)
        for i in range(0, tiles_per_split):
            start = (pid_s * tiles_per_split + i) * BLOCK_V
            cols = start + lanes
            col_ok = cols < V
            acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
            for k0 in range(0, D, BLOCK_D):
                ks = k0 + tl.arange(0, BLOCK_D)
                k_ok = ks < D
                h = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                # int64 offsets: V x d passes 2^31 for the largest vocabularies
                w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_wv + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                if UPCAST:  # Triton's interpreter multiplies bf16 as raw integers
                    h = h.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rows.to(tl.int64)[:, None] * stride_bias_n + cols[None, :],
                               mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            for j in tl.static_range(N_BANNED):
                ids = tl.load(banned_ptr + rows * N_BANNED + j, mask=row_ok, other=-1)
                acc = tl.where(cols[None, :] == ids[:, None], float("-inf"), acc)
            acc = tl.where(col_ok[None, :], acc, float("-inf"))
            # Top-2 of this tile, merged into the running top-2 (first index wins ties).
            tile_max = tl.max(acc, axis=1)
            tile_arg = tl.argmax(acc, axis=1)
            tile_second = tl.max(tl.where(lanes[None, :] == tile_arg[:, None], float("-inf"), acc), axis=1)
            better = tile_max > top1
            top2 = tl.where(better, tl.maximum(top1, tile_second), tl.maximum(top2, tile_max))
            idx1 = tl.where(better, start + tile_arg.to(tl.int32), idx1)
            top1 = tl.where(better, tile_max, top1)
            # Online softmax; a row whose logits are all -inf so far keeps m = -inf and s = 0.
            m_new = tl.maximum(m, tile_max)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            p = tl.exp(acc - m_safe[:, None])
            finite = tl.where(acc == float("-inf"), 0.0, acc)
            s = s * alpha + tl.sum(p, axis=1)
            t = t * alpha + tl.sum(p * finite, axis=1)
            m = m_new
        out = rows * n_splits + pid_s
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(s_ptr + out, s, mask=row_ok)
        tl.store(t_ptr + out, t, mask=row_ok)
        tl.store(top1_ptr + out, top1, mask=row_ok)
        tl.store(top2_ptr + out, top2, mask=row_ok)
        tl.store(idx1_ptr + out, idx1, mask=row_ok)

    @triton.jit
    def _confidence_combine_kernel(
        m_ptr, s_ptr, t_ptr, top1_ptr, idx1_ptr, top2_ptr, token_ptr, prob_ptr, score_ptr,
        N, n_splits, POLICY: tl.constexpr, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """BLOCK_R rows: merge each row's chunk statistics, write token, probability and score."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < N
        j = tl.arange(0, SPLITS)
        ok = row_ok[:, None] & (j < n_splits)[None, :]
        at = rows[:, None] * n_splits + j[None, :]
        m = tl.load(m_ptr + at, mask=ok, other=float("-inf"))
        s = tl.load(s_ptr + at, mask=ok, other=0.0)
        t = tl.load(t_ptr + at, mask=ok, other=0.0)
        top1 = tl.load(top1_ptr + at, mask=ok, other=float("-inf"))
        top2 = tl.load(top2_ptr + at, mask=ok, other=float("-inf"))
        idx1 = tl.load(idx1_ptr + at, mask=ok, other=2147483647)
        big_m = tl.max(m, axis=1)
        big_m = tl.where(big_m == float("-inf"), 0.0, big_m)
        weight = tl.exp(m - big_m[:, None])
        total = tl.where(row_ok, tl.sum(s * weight, axis=1), 1.0)  # rows past N: no 0/0
        weighted_logit = tl.sum(t * weight, axis=1)
        best = tl.max(top1, axis=1)
        # Chunks cover increasing ids, so the smallest index among the maxima is the first one.
        token = tl.min(tl.where(top1 == best[:, None], idx1, 2147483647), axis=1)
        runner_up = tl.max(tl.where(idx1 == token[:, None], float("-inf"), top1), axis=1)
        second = tl.maximum(tl.max(top2, axis=1), runner_up)
        prob = tl.exp(best - big_m) / total
        if POLICY == 0:
            score = prob
        elif POLICY == 1:
            score = prob - tl.exp(second - big_m) / total
        else:
            score = -(big_m + tl.log(total) - weighted_logit / total)
        tl.store(token_ptr + rows, token.to(tl.int64), mask=row_ok)
        tl.store(prob_ptr + rows, prob, mask=row_ok)
        tl.store(score_ptr + rows, score, mask=row_ok)


def confidence_triton(hidden: torch.Tensor, head_weight: torch.Tensor, policy: str,
                      bias: torch.Tensor | None = None, banned_ids: torch.Tensor | None = None,
                      *, splits: int | None = None, block_v: int | None = None, block_d: int | None = None) -> Confidence:
    """The two-pass Triton kernel; runs on CUDA tensors, or on CPU tensors under
    ``TRITON_INTERPRET=1``. ``splits`` (vocabulary chunks) defaults to a few per SM; the tile
    sizes default to 128 x 64 on a GPU and to larger tiles in the interpreter, where each
    operation costs Python overhead and bigger tiles are simply faster."""
    if triton is None:
        raise RuntimeError("Triton is not installed (pip install 'difill[gpu]')")
    check_confidence_inputs(hidden, head_weight, policy, bias, banned_ids)
    lead, d = hidden.shape[:-1], hidden.shape[-1]
    h = hidden.reshape(-1, d)
    h = h if h.stride(-1) == 1 else h.contiguous()
    w = head_weight if head_weight.stride(-1) == 1 else head_weight.contiguous()
    n, vocab = h.shape[0], w.shape[0]
    device = h.device
    token = torch.empty(n, dtype=torch.int64, device=device)
    prob = torch.empty(n, dtype=torch.float32, device=device)
    score = torch.empty(n, dtype=torch.float32, device=device)
    if n == 0:
        return Confidence(token.reshape(lead), prob.reshape(lead), score.reshape(lead))

    if bias is None:
        bias_arg, stride_bias = h, 0  # never read (HAS_BIAS is False)
    elif bias.dim() == 1:
        bias_arg, stride_bias = bias.contiguous(), 0  # one vector for every row
    else:
        bias_arg = bias.reshape(n, vocab).contiguous()
        stride_bias = vocab
    if banned_ids is not None and banned_ids.shape[-1] > 0:
        banned_arg = banned_ids.reshape(n, -1).to(torch.int32).contiguous()
        n_banned = banned_arg.shape[1]
    else:
        banned_arg, n_banned = token, 0  # never read

    block_v = block_v or (2048 if interpreting() else 128)
    block_d = max(16, min(block_d or (256 if interpreting() else 64), next_power_of_2(d)))
    block_n = 16 if n <= 16 else 32 if n <= 32 else 64
    row_blocks = cdiv(n, block_n)
    tiles = cdiv(vocab, block_v)
    if splits is None:
        splits = max(1, (4 * multiprocessor_count(device)) // row_blocks)
    splits = max(1, min(splits, tiles, 4096))
    tiles_per_split = cdiv(tiles, splits)
    splits = cdiv(tiles, tiles_per_split)  # no empty chunk at the end

    partial = torch.empty(5, n, splits, dtype=torch.float32, device=device)
    idx1 = torch.empty(n, splits, dtype=torch.int32, device=device)
    m, s, t, top1, top2 = partial.unbind(0)
    _confidence_partial_kernel[(row_blocks, splits)](
        h, w, bias_arg, banned_arg, m, s, t, top1, idx1, top2,
        n, vocab, d, h.stride(0), w.stride(0), stride_bias, tiles_per_split,
        HAS_BIAS=bias is not None, N_BANNED=n_banned,
        UPCAST=interpreting() and h.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if h.dtype == torch.float32 else "tf32",
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=4, num_stages=3,
    )
    splits_p2 = next_power_of_2(splits)
    block_r = max(1, min(16, 2048 // splits_p2, next_power_of_2(n)))  # rows per program, bounded registers
    _confidence_combine_kernel[(cdiv(n, block_r),)](
        m, s, t, top1, idx1, top2, token, prob, score, n, splits,
        POLICY=POLICIES.index(policy), SPLITS=splits_p2, BLOCK_R=block_r, num_warps=4,
    )
    return Confidence(token.reshape(lead), prob.reshape(lead), score.reshape(lead))
