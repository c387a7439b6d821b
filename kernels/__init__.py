"""difill.kernels: Triton kernels for the two hot spots of a denoising step on a GPU.

* :func:`fused_confidence`: output head + softmax statistics in one pass over the vocabulary,
  giving each canvas position's argmax token, its probability and the unmasking score, without
  materialising (or copying to the host) the [positions, vocabulary] logits.
* :func:`canvas_attention`: the canvas's few queries over the cached context plus the canvas
  itself, split over the keys (flash-decoding), grouped-query aware, reading the cache in place.

Both dispatch the same way: the Triton kernel for CUDA tensors when Triton imports (the ``gpu``
extra) and ``DIFILL_KERNELS`` is not ``0``; the plain PyTorch reference in the same module
otherwise. The references are the specification the tests hold the kernels to. Under
``TRITON_INTERPRET=1`` CPU tensors take the kernels as well (Triton's interpreter), which is how
the tests run them without a GPU. :mod:`difill.kernels.hooks` connects them to the engine.
"""

from __future__ import annotations

import torch

from difill.kernels._common import TRITON_ERROR, kernels_disabled_by_env, triton_available, use_triton
from difill.kernels.attention import canvas_attention_reference, canvas_attention_sdpa, canvas_attention_triton
from difill.kernels.confidence import POLICIES, Confidence, confidence_reference, confidence_triton

# The attention kernel is for the canvas's few queries; a longer query window (a bidirectional
# model's full forward pass through the same hook) goes to PyTorch's flash attention instead.
MAX_KERNEL_QUERIES = 256

__all__ = [
    "MAX_KERNEL_QUERIES",
    "Confidence",
    "POLICIES",
    "TRITON_ERROR",
    "canvas_attention",
    "canvas_attention_reference",
    "canvas_attention_sdpa",
    "canvas_attention_triton",
    "confidence_reference",
    "confidence_triton",
    "fused_confidence",
    "kernels_disabled_by_env",
    "kernels_enabled",
    "triton_available",
]


def kernels_enabled(device: str | torch.device) -> bool:
    """Would a tensor on ``device`` get the Triton kernels? (CUDA, Triton importable, not
    switched off with ``DIFILL_KERNELS=0``.)"""
    return torch.device(device).type == "cuda" and triton_available() and not kernels_disabled_by_env()


def fused_confidence(hidden: torch.Tensor, head_weight: torch.Tensor, policy: str = "confidence",
                     bias: torch.Tensor | None = None, banned_ids: torch.Tensor | None = None) -> Confidence:
    """Argmax token, its probability and the ``policy`` score for each row of ``hidden`` [..., d]
    under the head ``head_weight`` [V, d] (logits = hidden @ head_weight.T, in fp32).

    ``bias`` is an additive float [V] (shared) or [..., V] (per row) tensor, ``-inf`` banning a
    token; ``banned_ids`` [..., K] lists per-row banned ids (``-1`` = empty slot). Outputs have
    the leading shape of ``hidden``.
    """
    if use_triton(hidden):
        return confidence_triton(hidden, head_weight, policy, bias, banned_ids)
    return confidence_reference(hidden, head_weight, policy, bias, banned_ids)


def canvas_attention(q: torch.Tensor, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                     k_canvas: torch.Tensor, v_canvas: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q K^T * scale) V over the cache's and the canvas's keys, no mask.

    q [B, Hq, M, D]; k/v_cache [B or 1, Hkv, T, D] or None; k/v_canvas [B, Hkv, M', D];
    ``scale`` defaults to 1/sqrt(D). Returns [B, Hq, M, D] in q's dtype. Windows of more than
    ``MAX_KERNEL_QUERIES`` queries take PyTorch's SDPA rather than the split-K kernel.
    """
    if use_triton(q):
        if q.shape[2] > MAX_KERNEL_QUERIES:
            return canvas_attention_sdpa(q, k_cache, v_cache, k_canvas, v_canvas, scale)
        return canvas_attention_triton(q, k_cache, v_cache, k_canvas, v_canvas, scale)
    return canvas_attention_reference(q, k_cache, v_cache, k_canvas, v_canvas, scale)
