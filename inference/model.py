"""One transformer for every model difill runs: its own and the open diffusion LLMs.

The LLaMA/Qwen2 family block (RMSNorm, rotary embeddings, SwiGLU, grouped-query attention,
optional QKV bias, tied or untied head). What differs between the models difill serves is
*which positions attend to which*, so that is the only thing the forward pass is told:

* ``attention="bidirectional"`` (LLaDA, Dream, Dream-Coder, DiffuCoder): every position sees
  every other. A context cache is then an approximation (Fast-dLLM), refreshed now and then.
* ``attention="block"`` (difill's own model; BD3-LM / SDAR style): the context is processed
  causally and the canvas attends bidirectionally to itself and to the whole context. The
  context's keys and values never depend on the canvas, so caching them is exact and a typed
  character only appends to the cache.

The forward pass works on a *window* of tokens on top of an optional cache of earlier keys
and values. With ``causal=True`` window position i sees the cache and window positions <= i;
with ``causal=False`` it sees the cache and the whole window.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    """Shapes and conventions of a model; saved as ``config.json`` under difill's own names."""

    vocab_size: int = 8192
    hidden_size: int = 256
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: int = 4
    intermediate_size: int = 768
    max_position: int = 4096
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    qkv_bias: bool = False
    tie_embeddings: bool = True
    attention: str = "block"  # "block" | "bidirectional"
    shift_logits: bool = False  # Dream family: token i is read from the logits at i - 1
    mask_token_id: int = 0
    end_token_id: int = 1  # ends an infill (difill's <|eoi|>, DiffuCoder's <|dlm_pad|>)
    pad_token_id: int = 2
    bos_token_id: int | None = None
    # difill's own layout tokens; None for models that infill without them.
    prefix_token_id: int | None = None
    suffix_token_id: int | None = None
    middle_token_id: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = {k: v for k, v in data.items() if k not in known}
        config = cls(**{k: v for k, v in data.items() if k in known})
        config.extra.update(unknown)
        return config

    def n_params(self) -> int:
        d, v, layers = self.hidden_size, self.vocab_size, self.n_layers
        kv = self.n_kv_heads * self.head_dim
        per_layer = d * (d + 2 * kv) + d * d + 3 * d * self.intermediate_size + 2 * d
        head = 0 if self.tie_embeddings else v * d
        return v * d + layers * per_layer + d + head


class KVCache:
    """Keys and values of earlier positions, one (k, v) pair of [B, kv_heads, T, head_dim] per layer."""

    def __init__(self, n_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (the user edited the text there)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k[:, :, :length], v[:, :, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_tables(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [T, head_dim] for the rotate-half convention of LLaMA and Qwen2."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, mask: torch.Tensor | None, store: bool):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        keys, values = k, v
        if cache is not None and cache.keys[layer] is not None:
            cached_k, cached_v = cache.keys[layer], cache.values[layer]
            if cached_k.shape[0] != b:  # one shared context denoising several candidates
                cached_k, cached_v = cached_k.expand(b, -1, -1, -1), cached_v.expand(b, -1, -1, -1)
            keys, values = torch.cat([cached_k, k], dim=2), torch.cat([cached_v, v], dim=2)
        if store and cache is not None:
            cache.append(layer, k, v)
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            keys, values = keys.repeat_interleave(repeat, dim=1), values.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache, layer, mask, store):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, mask, store)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Embeddings, blocks, final norm and output head; parameter names follow Hugging Face's
    Qwen2/LLaMA modules (without the ``model.`` prefix) so checkpoints map one to one."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layers)

    def hidden_states(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        causal: bool = False,
        store: bool = False,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states of the window ``ids`` [B, T] at ``positions`` [T].

        ``mask`` (bool, True = may attend, broadcastable to [B, H, T, cache + T]) overrides the
        causal/bidirectional choice; training uses it for the block-diffusion pattern.
        ``store`` appends the window's keys and values to ``cache``.
        """
        past = cache.length if cache is not None else 0
        if mask is None and causal and ids.shape[1] > 1:
            t = ids.shape[1]
            mask = torch.ones(t, past + t, dtype=torch.bool, device=ids.device).tril(diagonal=past)
        cos, sin = rotary_tables(self.config.head_dim, positions, self.config.rope_theta)
        x = self.embed_tokens(ids)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, i, mask, store)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Logits for every position of ``ids``; a convenience for tests and exports."""
        if positions is None:
            past = kwargs["cache"].length if kwargs.get("cache") is not None else 0
            positions = torch.arange(past, past + ids.shape[1], device=ids.device)
        return self.logits(self.hidden_states(ids, positions, **kwargs))


def block_diffusion_mask(context_len: int, canvas_len: int, device=None) -> torch.Tensor:
    """Training mask of the block layout: causal over the context, the canvas sees everything."""
    total = context_len + canvas_len
    mask = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    mask[context_len:, :] = True
    return mask


def init_weights(model: Transformer, seed: int = 0) -> None:
    """GPT-2 style initialisation, scaled residual projections."""
    gen = torch.Generator().manual_seed(seed)
    std = 0.02
    for name, p in model.named_parameters():
        if p.dim() == 2:
            scale = std / math.sqrt(2 * model.config.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
