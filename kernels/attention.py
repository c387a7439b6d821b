"""Canvas attention: a few canvas queries over a long cached context, flash-decoding style.

A denoising step runs the model over the canvas only (16-64 positions) while the context's
keys and values (up to a few thousand positions) sit in the cache. Each canvas query attends to
the whole cache and to the whole canvas, with no causal mask. The engine did this with
``torch.cat`` (cache + canvas: a copy of the whole cache, every layer, every step),
``repeat_interleave`` for grouped-query attention (another copy, ``n_heads / n_kv_heads`` times
larger) and SDPA. This kernel reads the cache in place and reads each key/value head once per
group of query heads that share it.

Work split (flash-decoding): one program per (batch x kv head, block of query rows, key
chunk). The query rows of a program are the ``group x M`` (query head, canvas position) pairs
that share one kv head, so K/V tiles are loaded once for all of them. The key range
``[0, T + M)`` is virtual: positions below T come from the cache, the rest from the canvas's
own keys, so nothing is concatenated. With only ``B x kv_heads`` groups there are too few
programs to fill a GPU, so the keys are split into chunks; each chunk writes its normalised
partial output and log-sum-exp, and a second pass merges the chunks (skipped when there is
one chunk). Softmax statistics are fp32 (base-2 exponentials), inputs fp16/bf16/fp32.
"""

from __future__ import annotations

import math

import torch

from difill.kernels._common import cdiv, interpreting, multiprocessor_count, next_power_of_2, triton


def check_attention_inputs(q: torch.Tensor, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                           k_canvas: torch.Tensor, v_canvas: torch.Tensor) -> None:
    """Shapes: q [B, Hq, M, D]; k/v_cache [B or 1, Hkv, T, D] (or None: no context); k/v_canvas
    [B, Hkv, M', D]; Hq a multiple of Hkv; one float dtype and one device for all."""
    if q.dim() != 4 or k_canvas.dim() != 4 or v_canvas.dim() != 4:
        raise ValueError(f"q, k_canvas and v_canvas must be [B, H, T, D], got {list(q.shape)}, {list(k_canvas.shape)}, {list(v_canvas.shape)}")
    b, hq, _, d = q.shape
    if k_canvas.shape != v_canvas.shape:
        raise ValueError(f"k_canvas {list(k_canvas.shape)} and v_canvas {list(v_canvas.shape)} differ")
    if k_canvas.shape[0] != b or k_canvas.shape[3] != d:
        raise ValueError(f"k_canvas {list(k_canvas.shape)} does not fit q {list(q.shape)}")
    hkv = k_canvas.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if (k_cache is None) != (v_cache is None):
        raise ValueError("k_cache and v_cache must both be given or both be None")
    tensors = [q, k_canvas, v_canvas]
    if k_cache is not None:
        if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
            raise ValueError(f"k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} must be equal [B, Hkv, T, D] shapes")
        if k_cache.shape[0] not in (1, b) or k_cache.shape[1] != hkv or k_cache.shape[3] != d:
            raise ValueError(f"cache {list(k_cache.shape)} does not fit canvas keys {list(k_canvas.shape)}")
        tensors += [k_cache, v_cache]
    if not q.is_floating_point() or any(t.dtype != q.dtype for t in tensors):
        raise ValueError(f"all inputs must share one float dtype, got {sorted({str(t.dtype) for t in tensors})}")
    if any(t.device != q.device for t in tensors):
        raise ValueError(f"all inputs must be on one device, got {sorted({str(t.device) for t in tensors})}")


def canvas_attention_reference(q: torch.Tensor, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                               k_canvas: torch.Tensor, v_canvas: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Plain PyTorch, fp32 math: softmax(q K^T * scale) V over cache + canvas, no mask."""
    check_attention_inputs(q, k_cache, v_cache, k_canvas, v_canvas)
    b, hq, _, d = q.shape
    keys, values = k_canvas, v_canvas
    if k_cache is not None:
        keys = torch.cat([k_cache.expand(b, -1, -1, -1), k_canvas], dim=2)
        values = torch.cat([v_cache.expand(b, -1, -1, -1), v_canvas], dim=2)
    group = hq // keys.shape[1]
    keys = keys.float().repeat_interleave(group, dim=1)
    values = values.float().repeat_interleave(group, dim=1)
    scores = q.float() @ keys.transpose(-1, -2) * (scale if scale is not None else 1.0 / math.sqrt(d))
    return (torch.softmax(scores, dim=-1) @ values).to(q.dtype)


def canvas_attention_sdpa(q: torch.Tensor, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                          k_canvas: torch.Tensor, v_canvas: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """PyTorch's fused attention over cache + canvas: what the dispatcher uses for long query
    windows (a bidirectional model's full pass), where SDPA's flash kernel is the right tool."""
    check_attention_inputs(q, k_cache, v_cache, k_canvas, v_canvas)
    b, hq = q.shape[:2]
    keys, values = k_canvas, v_canvas
    if k_cache is not None:
        keys = torch.cat([k_cache.expand(b, -1, -1, -1), k_canvas], dim=2)
        values = torch.cat([v_cache.expand(b, -1, -1, -1), v_canvas], dim=2)
    if keys.shape[1] != hq:
        keys, values = keys.repeat_interleave(hq // keys.shape[1], dim=1), values.repeat_interleave(hq // keys.shape[1], dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, scale=scale)


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _canvas_attention_partial_kernel(
        q_ptr, kc_ptr, vc_ptr, kn_ptr, vn_ptr, o_ptr, lse_ptr,
        sq_b, sq_h, sq_m, skc_b, skc_h, skc_t, svc_b, svc_h, svc_t,
        skn_b, skn_h, skn_t, svn_b, svn_h, svn_t, so_b, so_h, so_m, so_s,
        HKV, GROUP, M, T, L_NEW, D, keys_per_split, qk_scale,
        DIRECT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One (batch x kv head, query rows, key chunk): online softmax over the chunk."""
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_s = tl.program_id(2)
        b = pid_bh // HKV
        kv_head = pid_bh % HKV
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (query head in the group, canvas position)
        row_ok = rows < GROUP * M
        head = kv_head * GROUP + rows // M
        pos_q = rows % M
        dims = tl.arange(0, BLOCK_D)
        d_ok = dims < D
        q = tl.load(q_ptr + b * sq_b + head[:, None] * sq_h + pos_q[:, None] * sq_m + dims[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:  # Triton's interpreter multiplies bf16 as raw integers
            q = q.to(tl.float32)
        kc = kc_ptr + b * skc_b + kv_head * skc_h
        vc = vc_ptr + b * svc_b + kv_head * svc_h
        kn = kn_ptr + b * skn_b + kv_head * skn_h
        vn = vn_ptr + b * svn_b + kv_head * svn_h
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        start = pid_s * keys_per_split
        end = tl.minimum(start + keys_per_split, T + L_NEW)
        for k0 in range(start, end, BLOCK_N):
            pos = k0 + tl.arange(0, BLOCK_N)
            in_cache = pos < T
            in_canvas = (pos >= T) & (pos < end)
            new = tl.maximum(pos - T, 0)
            c_mask = in_cache[:, None] & d_ok[None, :]
            n_mask = in_canvas[:, None] & d_ok[None, :]
            # A tile may straddle the cache/canvas boundary: each key comes from exactly one of them.
            k = tl.load(kc + pos[:, None] * skc_t + dims[None, :], mask=c_mask, other=0.0) \
                + tl.load(kn + new[:, None] * skn_t + dims[None, :], mask=n_mask, other=0.0)
            v = tl.load(vc + pos[:, None] * svc_t + dims[None, :], mask=c_mask, other=0.0) \
                + tl.load(vn + new[:, None] * svn_t + dims[None, :], mask=n_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # log2 domain
            qk = tl.where((in_cache | in_canvas)[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        o = o_ptr + b * so_b + head[:, None] * so_h + pos_q[:, None] * so_m + dims[None, :]
        if DIRECT:  # one chunk: this is the answer
            tl.store(o, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        else:
            tl.store(o + pid_s * so_s, out, mask=row_ok[:, None] & d_ok[None, :])
            lse = m_i + tl.log2(l_i)
            tl.store(lse_ptr + ((b * HKV * GROUP + head) * M + pos_q) * tl.num_programs(2) + pid_s, lse, mask=row_ok)

    @triton.jit
    def _canvas_attention_combine_kernel(
        part_ptr, lse_ptr, o_ptr, n_splits, D, stride_row, stride_split,
        HM, so_b, so_h, so_m, M,
        SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One (batch, head, canvas position): merge the chunks' partial outputs by their weights."""
        row = tl.program_id(0)  # flattened (b, head, position)
        b = row // HM
        head = (row % HM) // M
        pos = row % M
        j = tl.arange(0, SPLITS)
        dims = tl.arange(0, BLOCK_D)
        ok = j < n_splits
        lse = tl.load(lse_ptr + row * n_splits + j, mask=ok, other=float("-inf"))
        weight = tl.exp2(lse - tl.max(lse, axis=0))
        part = tl.load(part_ptr + row * stride_row + j[:, None] * stride_split + dims[None, :],
                       mask=ok[:, None] & (dims < D)[None, :], other=0.0)
        out = tl.sum(part * weight[:, None], axis=0) / tl.sum(weight, axis=0)
        tl.store(o_ptr + b * so_b + head * so_h + pos * so_m + dims, out.to(o_ptr.dtype.element_ty), mask=dims < D)


def canvas_attention_triton(q: torch.Tensor, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                            k_canvas: torch.Tensor, v_canvas: torch.Tensor, scale: float | None = None,
                            *, splits: int | None = None, block_m: int = 64, block_n: int | None = None) -> torch.Tensor:
    """The split-K Triton kernel; runs on CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    ``splits`` (key chunks) defaults to enough programs for a few per SM; key tiles are 64 on a
    GPU and larger in the interpreter (fewer Python-level operations)."""
    if triton is None:
        raise RuntimeError("Triton is not installed (pip install 'difill[gpu]')")
    check_attention_inputs(q, k_cache, v_cache, k_canvas, v_canvas)
    b, hq, m, d = q.shape
    hkv, l_new = k_canvas.shape[1], k_canvas.shape[2]
    group = hq // hkv
    out = torch.empty_like(q)
    if q.numel() == 0:
        return out

    def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
        return t if t.stride(-1) == 1 else t.contiguous()

    q, k_canvas, v_canvas = last_dim_contiguous(q), last_dim_contiguous(k_canvas), last_dim_contiguous(v_canvas)
    if k_cache is None or k_cache.shape[2] == 0:
        k_cache, v_cache, t = k_canvas, v_canvas, 0  # never read: every key position is >= T = 0
    else:
        k_cache, v_cache, t = last_dim_contiguous(k_cache), last_dim_contiguous(v_cache), k_cache.shape[2]

    def strides(x: torch.Tensor) -> tuple[int, int, int]:
        # A cache shared by every row of the batch has batch 1: stride 0 reads it for each row.
        return (0 if x.shape[0] == 1 else x.stride(0)), x.stride(1), x.stride(2)

    total = t + l_new
    block_n = block_n or (256 if interpreting() else 64)
    block_d = max(16, next_power_of_2(d))
    block_m = max(16, min(block_m, next_power_of_2(group * m)))
    row_blocks = cdiv(group * m, block_m)
    base = b * hkv * row_blocks
    key_tiles = cdiv(total, block_n)
    if splits is None:
        splits = max(1, (2 * multiprocessor_count(q.device)) // base)
    splits = max(1, min(splits, key_tiles, 1024))
    keys_per_split = cdiv(key_tiles, splits) * block_n
    splits = cdiv(total, keys_per_split)  # every chunk holds at least one key

    direct = splits == 1
    if direct:
        part, lse = out, out  # lse is never written when DIRECT
        so = (out.stride(0), out.stride(1), out.stride(2), 0)
    else:
        part = torch.empty(b, hq, m, splits, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, hq, m, splits, dtype=torch.float32, device=q.device)
        so = (part.stride(0), part.stride(1), part.stride(2), part.stride(3))
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    qk_scale = (scale if scale is not None else 1.0 / math.sqrt(d)) * 1.4426950408889634  # log2(e)
    _canvas_attention_partial_kernel[(b * hkv, row_blocks, splits)](
        q, k_cache, v_cache, k_canvas, v_canvas, part, lse,
        q.stride(0), q.stride(1), q.stride(2), *strides(k_cache), *strides(v_cache),
        *strides(k_canvas), *strides(v_canvas), *so,
        hkv, group, m, t, l_new, d, keys_per_split, qk_scale,
        DIRECT=direct, UPCAST=interpreting() and q.dtype == torch.bfloat16, DOT_PRECISION=dot_precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4, num_stages=2,
    )
    if not direct:
        _canvas_attention_combine_kernel[(b * hq * m,)](
            part, lse, out, splits, d, part.stride(2), part.stride(3),
            hq * m, out.stride(0), out.stride(1), out.stride(2), m,
            SPLITS=next_power_of_2(splits), BLOCK_D=block_d, num_warps=4,
        )
    return out
