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
import warnings
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
    """Keys and values of earlier positions, one (k, v) pair of [B, kv_heads, T, head_dim] per layer.

    Each pair is a view of the first T positions of a larger buffer. Appending writes into the
    spare room behind them, so a keystroke that adds a few tokens copies only those (a full
    buffer is copied once into one half as large again), and a prefill attends over the view
    instead of concatenating the context with itself. The spare room also holds a canvas's keys
    and values while it is denoised (:meth:`room_for`, :class:`CanvasKV`): no copy of the context
    per request either. The memory bound counts the buffers (:meth:`nbytes`).
    """

    SPARE = 64  # free positions at least after a buffer grows (a line canvas is 16, a block 32)

    def __init__(self, n_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self._buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def _in_buffer(self, layer: int) -> bool:
        """Whether layer's keys/values are still the views of its buffer (nothing replaced them)."""
        buffer, k, v = self._buffers[layer], self.keys[layer], self.values[layer]
        return buffer is not None and k is not None and v is not None and k.data_ptr() == buffer[0].data_ptr() \
            and v.data_ptr() == buffer[1].data_ptr() and k.stride() == buffer[0].stride() \
            and v.stride() == buffer[1].stride() and k.shape[:2] == buffer[0].shape[:2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = self.keys[layer].shape[2] if self.keys[layer] is not None else 0
        total = n + k.shape[2]
        buffer = self._buffers[layer]
        if n == 0 or not self._in_buffer(layer) or buffer[0].shape[2] < total:
            capacity = total + max(self.SPARE, total // 2)
            grown = tuple(t.new_empty(t.shape[0], t.shape[1], capacity, t.shape[3]) for t in (k, v))
            if n:
                grown[0][:, :, :n] = self.keys[layer]
                grown[1][:, :, :n] = self.values[layer]
            buffer = self._buffers[layer] = grown
        buffer[0][:, :, n:total] = k
        buffer[1][:, :, n:total] = v
        self.keys[layer], self.values[layer] = buffer[0][:, :, :total], buffer[1][:, :, :total]

    def room_for(self, width: int) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Per layer, views of the buffers over the cached positions and ``width`` more, or None
        where a buffer lacks the room. What is written past :attr:`length` is not part of the
        cache (its views end before it) and the next append overwrites it."""
        end = self.length + width
        if self.keys[0] is None or not all(self._in_buffer(i) and self._buffers[i][0].shape[2] >= end
                                           for i in range(len(self.keys))):
            return None
        return [b[0][:, :, :end] for b in self._buffers], [b[1][:, :, :end] for b in self._buffers]

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (the user edited the text there)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k[:, :, :length], v[:, :, :length]

    def nbytes(self) -> int:
        """Bytes held, counting the whole storage behind a truncated view (what memory really holds)."""
        total = 0
        for t in self.keys + self.values:
            if t is not None:
                total += max(t.numel() * t.element_size(), t.untyped_storage().nbytes())
        return total

    def compact(self) -> None:
        """Copy the views into tensors of their own so that the buffers' spare room and any
        truncated tail are freed (the next append allocates a buffer again)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None and k.untyped_storage().nbytes() > k.numel() * k.element_size():
                self.keys[i], self.values[i] = k.clone(), v.clone()
            self._buffers[i] = None

    @classmethod
    def stack(cls, caches: "list[KVCache]") -> "tuple[KVCache, torch.Tensor]":
        """Batch rows of different lengths: left-pad each (batch-1) cache with zeros to the
        longest and stack them. Returns the batched cache and ``valid`` [B, T_max] (False at
        padding), which the attention must use as a key mask."""
        lengths = [c.length for c in caches]
        longest = max(lengths)
        n_layers = len(caches[0].keys)
        out = cls(n_layers)
        ref = next((c.keys[0] for c in caches if c.keys[0] is not None), None)
        device = ref.device if ref is not None else None
        valid = torch.zeros(len(caches), longest, dtype=torch.bool, device=device)
        for r, n in enumerate(lengths):
            valid[r, longest - n:] = True
        if ref is None:
            return out, valid
        for layer in range(n_layers):
            for store, source in ((out.keys, [c.keys[layer] for c in caches]), (out.values, [c.values[layer] for c in caches])):
                first = next(t for t in source if t is not None)
                batch = first.new_zeros(len(caches), first.shape[1], longest, first.shape[3])
                for r, t in enumerate(source):
                    if t is not None and t.shape[2]:
                        batch[r:r + 1, :, longest - t.shape[2]:] = t
                store[layer] = batch
        return out, valid


class CanvasKV:
    """What a canvas step attends to, one buffer per layer: the context's keys and values, then
    one slot per canvas position. A step runs only the canvas positions in ``columns``, writes
    their keys and values into their slots and attends over the whole buffer; the other slots
    keep what an earlier step computed for them.

    Running every column each step is exact (no ``torch.cat`` of the context per step either).
    Running only the positions that changed or are predicted is Fast-dLLM's approximate reuse:
    a committed token's neighbours see keys computed while it was still masked until the engine
    refreshes every column (``EngineSettings.refresh_every``).
    """

    def __init__(self, context: KVCache, rows: int, width: int):
        if context.keys[0] is None:
            raise ValueError("a canvas step needs a context (at least the layout tokens)")
        self.context_len = context.length
        self.columns: torch.Tensor | None = None  # set by the caller before each step
        # [B, len(columns)] bool, or None for all: the rows whose slot a step rewrites. A batch of
        # requests runs the union of its rows' columns; each row keeps its own slots elsewhere,
        # so that a request decodes the same in a batch as alone.
        self.fresh: torch.Tensor | None = None
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        room = context.room_for(width) if context.keys[0].shape[0] == rows else None
        if room is not None:  # the canvas goes into the context cache's spare room: nothing is copied
            self.keys, self.values = room
            return
        for store, source in ((self.keys, context.keys), (self.values, context.values)):
            for t in source:
                buffer = t.new_empty(rows, t.shape[1], self.context_len + width, t.shape[3])
                buffer[:, :, : self.context_len] = t  # a batch-1 context is shared by every row
                store.append(buffer)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values [B, kv_heads, len(columns), D]; return the whole buffers."""
        slots = self.columns + self.context_len
        if self.fresh is not None:
            keep = ~self.fresh[:, None, :, None]
            k = torch.where(keep, self.keys[layer].index_select(2, slots), k)
            v = torch.where(keep, self.values[layer].index_select(2, slots), v)
        self.keys[layer].index_copy_(2, slots, k)
        self.values[layer].index_copy_(2, slots, v)
        return self.keys[layer], self.values[layer]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (the others finished)."""
        self.fresh = None
        self.keys = [t.index_select(0, rows) for t in self.keys]
        self.values = [t.index_select(0, rows) for t in self.values]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 whatever the weights' dtype, as Hugging Face's Qwen2/LLaMA norms. One fused
        # operation, except when traced for ONNX export: opset 17 has no RMSNorm.
        dtype, x = x.dtype, x.float()
        if torch.jit.is_tracing():
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            x = F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        return self.weight * x.to(dtype)


class RowMajorLinear(nn.Module):
    """``x @ weight_t (+ bias)`` with the weight stored [in, out]: the inference form of one or
    several ``nn.Linear`` (:meth:`Transformer.fuse_projections`). MKL multiplies a few rows by a
    pre-transposed weight about 1.8x faster than by the transposed view ``nn.Linear`` uses."""

    def __init__(self, linears: "list[nn.Linear]"):
        super().__init__()
        self.weight_t = nn.Parameter(torch.cat([lin.weight for lin in linears]).t().contiguous(), requires_grad=False)
        biases = [lin.bias for lin in linears]
        self.bias = None if biases[0] is None else nn.Parameter(torch.cat(biases), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as ``nn.Linear`` holds it, [out, in] (a view)."""
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight_t
        return out if self.bias is None else out + self.bias


class HalfWeightLinear(nn.Module):
    """``x @ weight.T (+ bias)`` with the weight rounded to float16; the arithmetic stays float32,
    so the result is the float32 product with float16-rounded weights.

    A denoising step multiplies a few rows by every weight, which on CPUs without bfloat16 units
    is bound by reading the weights from memory: FBGEMM's half-precision GEMM reads half the
    bytes (the bundled model: a warm line 1.47x and a 64-token block 1.39x faster on a 2-core AMD
    EPYC, the same completions; bench/README.md). Over many rows (a context prefill, a batch) the
    product is bound by arithmetic, where MKL's float32 GEMM is faster: those rows go through a
    float32 copy of the same rounded weights (``ROWS_FOR_FLOAT32``). Holding both costs 1.5x the
    float32 weights' memory. CPU only (:meth:`Transformer.pack_half_weights`)."""

    ROWS_FOR_FLOAT32 = 48  # measured: the half-precision GEMM wins below about this many rows

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        rounded = weight.detach().to(torch.float16).float()
        self.register_buffer("weight_t", rounded.t().contiguous())
        self.register_buffer("bias", (bias.detach().float() if bias is not None else torch.zeros(weight.shape[0])).clone())
        # Both ops are marked deprecated in torch 2.x but still served; torch warns once per
        # process, so one call here takes the warning and forward() runs without a filter.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.packed = torch.fbgemm_pack_gemm_matrix_fp16(rounded.contiguous())
            torch.fbgemm_linear_fp16_weight_fp32_activation(torch.zeros(1, rounded.shape[1]), self.packed, self.bias)

    @staticmethod
    def available() -> bool:
        """Whether this torch build has FBGEMM's half-precision GEMM (x86 builds; gone in a future torch)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                packed = torch.fbgemm_pack_gemm_matrix_fp16(torch.ones(1, 1))
                return bool(torch.fbgemm_linear_fp16_weight_fp32_activation(torch.ones(1, 1), packed, torch.zeros(1)).item() == 1.0)
        except (AttributeError, RuntimeError):
            return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() >= self.ROWS_FOR_FLOAT32 * x.shape[-1]:
            return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight_t).view(*x.shape[:-1], -1)
        return torch.fbgemm_linear_fp16_weight_fp32_activation(x, self.packed, self.bias)


class Int8WeightLinear(nn.Module):
    """``x @ weight.T (+ bias)`` with the weight quantized to int8, one scale per output channel,
    and ``x`` quantized on the fly to 7-bit unsigned integers with one scale per product
    (FBGEMM's dynamic int8 GEMM, int32 sums, float32 result).

    On the 2-core AMD EPYC (AVX2 only, no VNNI or AMX) this is the fastest product torch has for
    every row count the engine uses: 2.5x (32 rows) to 4x (a 512-row prefill) faster than
    :class:`HalfWeightLinear` (bench/README.md). The price is rounding: about 2% relative error per
    product on random data, against 0.02% for float16 weights, so completions may differ from the
    float32 model's: an opt-in, measured on the FIM set before it is anyone's default. The
    7-bit activations are what FBGEMM asks for on x86 (``reduce_range``): u8 x s8 products summed in
    pairs then fit int16 without saturating. CPU only (:meth:`Transformer.pack_int8_weights`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        weight = weight.detach().float().contiguous()
        scales = (weight.abs().amax(dim=1).clamp(min=1e-8) / 127).double()
        zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are marked deprecated in torch 2.x but still served
            warnings.simplefilter("ignore")
            quantized = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(quantized, None if bias is None else bias.detach().float())
        self.out_features = weight.shape[0]

    @staticmethod
    def available() -> bool:
        """Whether this torch build has FBGEMM's dynamic int8 linear (x86 builds)."""
        try:
            layer = Int8WeightLinear(torch.ones(1, 4), None)
            return abs(float(layer(torch.ones(1, 4))) - 4.0) < 0.1
        except (AttributeError, RuntimeError):
            return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return torch.ops.quantized.linear_dynamic(flat, self.packed, True).view(*x.shape[:-1], self.out_features)


def rotary_tables(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for the rotate-half convention of LLaMA, Qwen2 and LLaDA.

    ``positions`` [T] gives tables [T, head_dim] shared by every row; [B, T] (one position per
    row and token, for batches of requests whose contexts differ in length) gives [B, 1, T, head_dim].
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    if positions.dim() == 2:
        emb = emb[:, None]
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    if x.dtype == torch.float32:
        return x * cos + rotated * sin
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def attention_mask(queries: int, past: int, causal: bool, key_valid: torch.Tensor | None = None,
                   device=None) -> torch.Tensor | None:
    """The bool mask (True = may attend) for a window of ``queries`` tokens after ``past`` cached ones.

    ``causal``: window token i sees the cache and window tokens <= i; otherwise the whole window.
    ``key_valid`` [B, past + queries] hides keys (left padding of batched contexts, right padding
    of batched canvases). Every query always sees itself so that no softmax row is empty (NaN).
    Returns None when nothing is hidden (the fastest attention path).
    """
    if not causal and key_valid is None:
        return None
    # Index arithmetic rather than tril/eye: it exports to ONNX with dynamic lengths.
    q_index = torch.arange(queries, device=device)[:, None] + past  # each query's own index among the keys
    k_index = torch.arange(past + queries, device=device)[None, :]
    mask = k_index <= q_index if causal else torch.ones_like(k_index - q_index, dtype=torch.bool)
    if key_valid is not None:
        mask = (mask[None] & key_valid[:, None, :]) | (k_index == q_index)[None]
        return mask[:, None]  # [B, 1, T, past + T]
    return mask


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.qkv_proj: RowMajorLinear | None = None  # q, k and v in one product (fuse_projections)
        # Set by difill.kernels.hooks on CUDA: an unmasked canvas step calls the fused kernel.
        self.use_kernels = False

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotated queries and keys, and values, each [B, heads, T, head_dim]."""
        b, t, _ = x.shape
        if self.qkv_proj is not None:
            kv_width = self.n_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, kv_width, kv_width], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, mask: torch.Tensor | None, store: bool,
                is_causal: bool = False):
        b, t, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        cached_k = cached_v = None
        if isinstance(cache, CanvasKV):  # from here on k, v are the context's and the whole canvas's
            k, v = cache.write(layer, k, v)
        elif cache is not None and cache.keys[layer] is not None:
            cached_k, cached_v = cache.keys[layer], cache.values[layer]
        if self.use_kernels and mask is None and not is_causal:
            from difill.kernels import canvas_attention

            out = canvas_attention(q, cached_k, cached_v, k, v)
            if store and cache is not None:
                cache.append(layer, k, v)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        if store and cache is not None and (cached_k is None or cached_k.shape[0] == b):
            cache.append(layer, k, v)  # behind the cached keys in their buffer: attend over the view, no copy
            keys, values = cache.keys[layer], cache.values[layer]
        else:
            keys, values = k, v
            if cached_k is not None:
                if cached_k.shape[0] != b:  # one shared context denoising several candidates
                    cached_k, cached_v = cached_k.expand(b, -1, -1, -1), cached_v.expand(b, -1, -1, -1)
                keys, values = torch.cat([cached_k, k], dim=2), torch.cat([cached_v, v], dim=2)
            if store and cache is not None:
                cache.append(layer, k, v)
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            keys, values = keys.repeat_interleave(repeat, dim=1), values.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=is_causal and mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: RowMajorLinear | None = None  # gate and up in one product (fuse_projections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache, layer, mask, store, is_causal=False):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, mask, store, is_causal)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Embeddings, blocks, final norm and output head; parameter names follow Hugging Face's
    Qwen2/LLaMA modules (without the ``model.`` prefix) so checkpoints map one to one."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # nn.Embedding's own init, N(0, 1), except on the meta device (the loader, which assigns the
        # checkpoint's tensors): there its Python meta kernel imports torch._dynamo and sympy,
        # ~140 MiB and a second of every server start for nothing (bench/README.md, language server).
        embedding = torch.empty(config.vocab_size, config.hidden_size)
        if not embedding.is_meta:
            nn.init.normal_(embedding)
        self.embed_tokens = nn.Embedding.from_pretrained(embedding, freeze=False)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layers)

    @torch.no_grad()
    def fuse_projections(self, head: bool = True) -> "Transformer":
        """Inference only: q, k, v in one matrix product and gate, up in another, every weight
        pre-transposed (:class:`RowMajorLinear`). A denoising step over a few canvas tokens is
        bound by the number of operations rather than by arithmetic: this makes a 16-token step
        of the bundled model about 25% faster (bench/README.md). The Hugging Face parameter
        names are gone afterwards, so training and checkpoints use the unfused model; a tied
        head is untied (the fused model has the embedding's size more parameters)."""
        for block in self.layers:
            attn, mlp = block.self_attn, block.mlp
            attn.qkv_proj = RowMajorLinear([attn.q_proj, attn.k_proj, attn.v_proj])
            attn.o_proj = RowMajorLinear([attn.o_proj])
            del attn.q_proj, attn.k_proj, attn.v_proj
            mlp.gate_up_proj = RowMajorLinear([mlp.gate_proj, mlp.up_proj])
            mlp.down_proj = RowMajorLinear([mlp.down_proj])
            del mlp.gate_proj, mlp.up_proj
        if head:  # 2.5x faster over the 8 rows of a windowed CPU step; a tied head gets a copy of its own
            self.lm_head = RowMajorLinear([self.lm_head])
        return self

    @torch.no_grad()
    def pack_half_weights(self) -> "Transformer":
        """CPU inference only, after :meth:`fuse_projections`: every projection and the head as
        :class:`HalfWeightLinear` (float16 weights, float32 activations). The embedding stays
        float32. Check :meth:`HalfWeightLinear.available` first."""
        return self._pack_weights(HalfWeightLinear)

    @torch.no_grad()
    def smooth_activations(self, calibration_ids: torch.Tensor, alpha: float = 0.7, window: int = 512) -> "Transformer":
        """SmoothQuant (Xiao et al., 2023) before :meth:`pack_int8_weights`: scale each input
        channel j of a product down by s_j and the weight's row j up by s_j, folding 1/s_j into
        what computes the input (the RMSNorm weight before qkv, gate/up and the head; the values'
        channels before o), so that the model computes the same function in float32 while the
        activations' few large channels shrink and one 7-bit scale per product rounds the rest
        less (the bundled model: KL to float32 0.0076 -> 0.0024, bench/README.md).
        s_j = max|x_j|^alpha / max|W_j|^(1 - alpha), the activations' maxima measured on
        ``calibration_ids`` [T]. The MLP's down projection is not smoothed: it stays float16.
        Needs the fused inference form (:meth:`fuse_projections`)."""
        if any(b.self_attn.qkv_proj is None for b in self.layers) or not isinstance(self.lm_head, RowMajorLinear):
            raise ValueError("smooth_activations needs the fused inference form with its head (fuse_projections first)")
        maxima: dict[nn.Module, torch.Tensor] = {}

        def record(module: nn.Module, inputs: tuple, _output) -> None:
            seen = inputs[0].abs().reshape(-1, inputs[0].shape[-1]).amax(0)
            maxima[module] = torch.maximum(maxima[module], seen) if module in maxima else seen

        smoothed = [m for b in self.layers for m in (b.self_attn.qkv_proj, b.self_attn.o_proj, b.mlp.gate_up_proj)]
        hooks = [m.register_forward_hook(record) for m in [*smoothed, self.lm_head]]
        try:
            for start in range(0, len(calibration_ids), window):
                ids = calibration_ids[start:start + window][None]
                self.logits(self.hidden_states(ids, torch.arange(ids.shape[1]), causal=True))
        finally:
            for hook in hooks:
                hook.remove()

        def scales(linear: RowMajorLinear, groups: int = 1) -> torch.Tensor:
            """One scale per input channel; ``groups`` > 1: channels of heads that share values share it."""
            act, weight = maxima[linear], linear.weight_t.abs().amax(1)
            if groups > 1:
                act, weight = (t.view(-1, groups, self.config.head_dim).amax(1) for t in (act, weight))
            s = (act.clamp(min=1e-5) ** alpha / weight.clamp(min=1e-5) ** (1 - alpha)).clamp(1e-2, 1e2)
            return s.view(-1, 1, self.config.head_dim).expand(-1, groups, -1).reshape(-1) if groups > 1 else s

        def fold(norm: RMSNorm, linear: RowMajorLinear) -> None:
            s = scales(linear)
            norm.weight /= s
            linear.weight_t *= s[:, None]

        for block in self.layers:
            attn = block.self_attn
            fold(block.input_layernorm, attn.qkv_proj)
            fold(block.post_attention_layernorm, block.mlp.gate_up_proj)
            s = scales(attn.o_proj, attn.n_heads // attn.n_kv_heads)
            values = attn.qkv_proj.weight_t.shape[1] - attn.n_kv_heads * attn.head_dim  # the v columns start here
            s_values = s.view(attn.n_kv_heads, -1, attn.head_dim)[:, 0].reshape(-1)  # one per value channel
            attn.qkv_proj.weight_t[:, values:] /= s_values
            if attn.qkv_proj.bias is not None:
                attn.qkv_proj.bias[values:] /= s_values
            attn.o_proj.weight_t *= s[:, None]
        fold(self.norm, self.lm_head)
        return self

    @torch.no_grad()
    def pack_int8_weights(self) -> "Transformer":
        """CPU inference only, after :meth:`fuse_projections`: the projections and the head as
        :class:`Int8WeightLinear`, except the MLP's down projection, which stays
        :class:`HalfWeightLinear`: its input (the SwiGLU product) is heavy-tailed token by token,
        and one 7-bit scale per product rounds most of it away (the bundled model:
        top-1 agreement with float32 0.74 with it quantized, 0.97 without; bench/README.md).
        :meth:`smooth_activations` first rounds less. The embedding stays float32. Check both
        classes' ``available`` first."""
        return self._pack_weights(Int8WeightLinear, keep_half={"down_proj"})

    def _pack_weights(self, packed: "type[HalfWeightLinear] | type[Int8WeightLinear]",
                      keep_half: set[str] = frozenset()) -> "Transformer":
        for block in self.layers:
            attn, mlp = block.self_attn, block.mlp
            if attn.qkv_proj is None or mlp.gate_up_proj is None:
                raise ValueError(f"packing weights as {packed.__name__} needs the fused inference form (fuse_projections first)")
            for owner, name in ((attn, "qkv_proj"), (attn, "o_proj"), (mlp, "gate_up_proj"), (mlp, "down_proj")):
                linear = getattr(owner, name)  # RowMajorLinear
                setattr(owner, name, (HalfWeightLinear if name in keep_half else packed)(linear.weight, linear.bias))
        self.lm_head = packed(self.lm_head.weight, self.lm_head.bias)  # RowMajorLinear, or the CUDA form's nn.Linear
        return self

    def hidden_states(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | CanvasKV | None = None,
        causal: bool = False,
        store: bool = False,
        mask: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        cache_only: bool = False,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """Final-norm hidden states of the window ``ids`` [B, T] at ``positions`` [T] or [B, T].

        ``mask`` (bool, True = may attend, broadcastable to [B, H, T, cache + T]) overrides the
        causal/bidirectional choice; training uses it for the block-diffusion pattern.
        ``key_valid`` [B, cache + T] hides padding keys (batched requests).
        ``store`` appends the window's keys and values to ``cache``.
        A :class:`CanvasKV` cache makes this a canvas step over its ``columns`` (``ids`` and
        ``positions`` are those columns'); ``key_valid`` then covers context + whole canvas.
        ``cache_only`` (with ``store``): the last layer computes only its keys and values and
        nothing is returned. A context prefill needs no hidden states: this saves the last
        layer's attention and MLP (a fifth of a 4-layer prefill).
        ``rotary``: the (cos, sin) tables of ``positions`` when the caller keeps them (a canvas
        step runs at the same positions again and again).
        """
        is_causal = False
        if isinstance(cache, CanvasKV):
            if key_valid is not None:  # every row has context keys: no softmax row is empty
                mask = key_valid[:, None, None, :]
        elif mask is None:
            past = cache.length if cache is not None else 0
            if causal and past == 0 and key_valid is None and ids.shape[1] > 1:
                is_causal = True  # SDPA's own causal path: no mask tensor, the fastest kernel
            elif causal and ids.shape[1] > 1 or key_valid is not None:
                mask = attention_mask(ids.shape[1], past, causal, key_valid, ids.device)
        cos, sin = rotary or rotary_tables(self.config.head_dim, positions, self.config.rope_theta)
        x = self.embed_tokens(ids)
        last = len(self.layers) - 1
        for i, block in enumerate(self.layers):
            if cache_only and i == last:
                _, k, v = block.self_attn.project(block.input_layernorm(x), cos, sin)
                cache.append(i, k, v)
                return None
            x = block(x, cos, sin, cache, i, mask, store, is_causal)
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
