"""The glue between the engine's denoising loop and the kernels (kept here, not in the engine).

Two hooks, both switched on by the engine only on CUDA (``EngineSettings.use_kernels``,
``DIFILL_KERNELS=0`` turns them off):

* :func:`set_canvas_attention` flags the model's attention layers so that a canvas step (a
  window attending to a cache, no mask) calls :func:`difill.kernels.canvas_attention` instead
  of concatenating the cache and repeating the kv heads.
* :func:`make_confidence_fn` gives the sampler a ``confidence_fn(canvas, forbidden, reviews)``
  that runs the model to the final hidden states and calls :func:`difill.kernels.fused_confidence`
  with the engine's banned tokens (a shared ``-inf`` bias) and the critic's vetoes (per-position
  banned ids), so the [rows, M, V] logits are never built nor copied to the host.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from difill.kernels import fused_confidence

ConfidenceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def set_canvas_attention(model: nn.Module, enabled: bool) -> int:
    """Turn the canvas-attention kernel on or off in every attention layer; returns how many."""
    from difill.inference.model import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.use_kernels = enabled
    return len(layers)


def forbidden_ids(forbidden: torch.Tensor, reviews: torch.Tensor) -> torch.Tensor | None:
    """The sampler's vetoes as per-position id lists: [R, M, V] bool -> [R, M, K] int64 with -1
    padding, or None when nothing is vetoed. ``reviews`` [R, M] (vetoes per position) marks the
    few positions to look at, so the cost does not grow with the vocabulary."""
    flagged = (reviews > 0).nonzero().tolist()
    if not flagged:
        return None
    lists = [forbidden[r, p].nonzero()[:, 0] for r, p in flagged]
    width = max(1, max(len(ids) for ids in lists))
    out = torch.full((*reviews.shape, width), -1, dtype=torch.int64)
    for (r, p), ids in zip(flagged, lists):
        out[r, p, : len(ids)] = ids
    return out


def make_confidence_fn(model: nn.Module, cache, canvas_len: int, banned: torch.Tensor, policy: str) -> ConfidenceFn:
    """A ``confidence_fn`` for :class:`difill.inference.sampler.Denoise` over the block layout:
    the canvas sits at positions ``cache.length ...`` and attends to the whole cache.

    Returns CPU tensors [rows, M]: argmax token, its probability, and the policy's score.
    """
    weight = model.lm_head.weight
    device = weight.device
    start = cache.length
    positions = torch.arange(start, start + canvas_len, device=device)
    bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=device)
    bias.masked_fill_(banned.to(device), float("-inf"))

    def confidence(canvas: torch.Tensor, forbidden: torch.Tensor, reviews: torch.Tensor):
        hidden = model.hidden_states(canvas.to(device), positions, cache=cache)
        vetoed = forbidden_ids(forbidden, reviews)
        result = fused_confidence(hidden, weight, policy, bias=bias,
                                  banned_ids=None if vetoed is None else vetoed.to(device))
        return result.token.cpu(), result.prob.cpu(), result.score.cpu()

    return confidence
