"""difill's transformer against the reference implementations in ``transformers``.

The open diffusion LLMs are Qwen2 (Dream, Dream-Coder, DiffuCoder) and LLaMA (LLaDA) with the
causal mask removed, so the reference is the ``transformers`` module of that family run with an
all-true 4D attention mask (bidirectional). Checkpoints are written by ``transformers`` itself
(Qwen2) or renamed from a LLaMA state dict to LLaDA's names, then read by difill's loader.

The block layout's claim is that caching is exact: a context run in pieces (keystrokes) and a
canvas evaluated over the cache give what one masked forward pass over everything gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from difill.inference.loader import load_model
from difill.inference.model import (CanvasKV, HalfWeightLinear, Int8WeightLinear, KVCache, ModelConfig, Transformer, attention_mask,
                                   block_diffusion_mask, init_weights)

transformers = pytest.importorskip("transformers")

torch.manual_seed(0)
ATOL = 2e-5  # float32 rounding over two layers of a 32-wide model


def bidirectional(n: int, batch: int = 1) -> torch.Tensor:
    return torch.ones(batch, 1, n, n, dtype=torch.bool)


def qwen2_reference(tmp_path: Path, tie: bool = False, kv_heads: int = 2):
    config = transformers.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                                      rope_theta=10000.0, tie_word_embeddings=tie, rms_norm_eps=1e-6)
    torch.manual_seed(1)
    ref = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # transformers zero-initialises biases: make them count
        for layer in ref.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update(model_type="Dream", mask_token_id=95, eos_token_id=94, pad_token_id=94, bos_token_id=93)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return ref


def test_qwen2_dream_forward_matches_transformers_bidirectional(tmp_path):
    ref = qwen2_reference(tmp_path)
    model = load_model(tmp_path)
    assert model.config.attention == "bidirectional" and model.config.shift_logits and model.config.qkv_bias
    ids = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=bidirectional(17, 2)).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    # and it is not the causal model: the first position sees the last token
    with torch.no_grad():
        causal = ref(input_ids=ids).logits
    assert (got[:, 0] - causal[:, 0]).abs().max() > 1e-3


def test_qwen2_tied_embeddings_and_rope_positions(tmp_path):
    ref = qwen2_reference(tmp_path, tie=True, kv_heads=4)
    model = load_model(tmp_path)
    assert model.lm_head.weight is model.embed_tokens.weight
    ids = torch.randint(0, 96, (1, 12))
    positions = torch.arange(30, 42)  # a window further into the document
    with torch.no_grad():
        expected = ref(input_ids=ids, position_ids=positions[None], attention_mask=bidirectional(12)).logits
        got = model(ids, positions)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


LLAMA_TO_LLADA = {
    "model.embed_tokens.weight": "model.transformer.wte.weight",
    "model.norm.weight": "model.transformer.ln_f.weight",
    "lm_head.weight": "model.transformer.ff_out.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ff_norm.weight",
    "self_attn.q_proj.weight": "q_proj.weight",
    "self_attn.k_proj.weight": "k_proj.weight",
    "self_attn.v_proj.weight": "v_proj.weight",
    "self_attn.o_proj.weight": "attn_out.weight",
    "mlp.gate_proj.weight": "ff_proj.weight",
    "mlp.up_proj.weight": "up_proj.weight",
    "mlp.down_proj.weight": "ff_out.weight",
}


def llada_name(name: str) -> str:
    if name in LLAMA_TO_LLADA:
        return LLAMA_TO_LLADA[name]
    _, _, index, rest = name.split(".", 3)  # model.layers.N.<rest>
    return f"model.transformer.blocks.{index}.{LLAMA_TO_LLADA[rest]}"


def write_llada(tmp_path: Path, ref) -> None:
    """LLaDA's modeling_llada.py names and configuration_llada.py keys (LLaDA-8B's values)."""
    c = ref.config
    save_file({llada_name(k): v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": c.hidden_size, "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads, "n_layers": c.num_hidden_layers, "mlp_hidden_size": c.intermediate_size,
        "vocab_size": c.vocab_size, "embedding_size": c.vocab_size, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "max_sequence_length": 4096, "weight_tying": False, "block_type": "llama", "activation_type": "silu",
        "layer_norm_type": "rms", "include_bias": False, "include_qkv_bias": False, "alibi": False, "rope": True,
        "input_emb_norm": False, "scale_logits": False, "attention_layer_norm": False, "block_group_size": 1,
        "mask_token_id": 95, "eos_token_id": 94, "pad_token_id": 94, "bos_token_id": 93,
    }))


def test_llada_forward_matches_transformers_llama_bidirectional(tmp_path):
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(2)
    ref = transformers.LlamaForCausalLM(config).eval()
    write_llada(tmp_path, ref)
    model = load_model(tmp_path)
    assert not model.config.shift_logits and model.config.rope_theta == 500000.0 and model.config.mask_token_id == 95
    ids = torch.randint(0, 96, (2, 15))
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=bidirectional(15, 2)).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


def tiny_block_model(kv_heads: int = 2) -> Transformer:
    config = ModelConfig(vocab_size=80, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=kv_heads, intermediate_size=64,
                         attention="block", prefix_token_id=3, suffix_token_id=4, middle_token_id=5)
    model = Transformer(config)
    init_weights(model, seed=3)
    return model.eval()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_block_layout_cached_steps_equal_one_masked_forward(kv_heads):
    model = tiny_block_model(kv_heads)
    context = torch.randint(6, 80, (1, 23))
    canvas = torch.randint(0, 80, (1, 9))
    ids = torch.cat([context, canvas], dim=1)
    with torch.no_grad():
        one_shot = model.hidden_states(ids, torch.arange(32), mask=block_diffusion_mask(23, 9))
        cache = model.new_cache()
        for start, stop in ((0, 10), (10, 11), (11, 17), (17, 23)):  # the context arrives in pieces, as keystrokes
            model.hidden_states(context[:, start:stop], torch.arange(start, stop), cache=cache, causal=True, store=True)
        assert cache.length == 23
        canvas_hidden = model.hidden_states(canvas, torch.arange(23, 32), cache=cache)
    torch.testing.assert_close(canvas_hidden, one_shot[:, 23:], atol=1e-5, rtol=1e-5)
    # the cache reproduces the context's own (causal) states too: recompute them through it
    with torch.no_grad():
        again = model.new_cache()
        ctx_hidden = model.hidden_states(context, torch.arange(23), cache=again, causal=True, store=True)
    torch.testing.assert_close(ctx_hidden, one_shot[:, :23], atol=1e-5, rtol=1e-5)
    for a, b in zip(cache.keys, again.keys):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_truncate_then_append_equals_fresh_cache():
    model = tiny_block_model()
    first = torch.randint(6, 80, (1, 20))
    edited = torch.cat([first[:, :12], torch.randint(6, 80, (1, 5))], dim=1)
    with torch.no_grad():
        cache = model.new_cache()
        model.hidden_states(first, torch.arange(20), cache=cache, causal=True, store=True)
        cache.truncate(12)
        model.hidden_states(edited[:, 12:], torch.arange(12, 17), cache=cache, causal=True, store=True)
        fresh = model.new_cache()
        model.hidden_states(edited, torch.arange(17), cache=fresh, causal=True, store=True)
    for a, b in zip(cache.values, fresh.values):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_stacked_caches_with_key_mask_equal_separate_rows():
    """Batched requests: contexts of different lengths left-padded, canvases of different
    lengths right-padded, per-row positions: each row equals that request alone."""
    model = tiny_block_model()
    lengths, widths = [7, 19, 12], [5, 3, 5]
    caches, alone = [], []
    with torch.no_grad():
        canvases = [torch.randint(0, 80, (1, w)) for w in widths]
        for n, canvas in zip(lengths, canvases):
            cache = model.new_cache()
            model.hidden_states(torch.randint(6, 80, (1, n)), torch.arange(n), cache=cache, causal=True, store=True)
            caches.append(cache)
            alone.append(model.hidden_states(canvas, torch.arange(n, n + canvas.shape[1]), cache=cache))
        stacked, valid = KVCache.stack(caches)
        assert stacked.length == 19 and valid.sum(dim=1).tolist() == lengths
        width = max(widths)
        batch = torch.zeros(3, width, dtype=torch.long)
        for r, canvas in enumerate(canvases):
            batch[r, : canvas.shape[1]] = canvas[0]
        positions = torch.tensor(lengths)[:, None] + torch.arange(width)[None]
        canvas_valid = torch.arange(width)[None] < torch.tensor(widths)[:, None]
        together = model.hidden_states(batch, positions, cache=stacked, key_valid=torch.cat([valid, canvas_valid], dim=1))
    assert torch.isfinite(together).all()
    for r, w in enumerate(widths):
        torch.testing.assert_close(together[r, :w], alone[r][0], atol=1e-5, rtol=1e-5)


def test_attention_mask_shapes_and_no_empty_rows():
    assert attention_mask(4, 0, causal=False) is None
    causal = attention_mask(3, 2, causal=True)
    assert causal.tolist() == [[True, True, True, False, False], [True, True, True, True, False], [True] * 5]
    valid = torch.tensor([[False, False, True, True, True]])
    masked = attention_mask(3, 2, causal=True, key_valid=valid)
    assert masked.shape == (1, 1, 3, 5)
    assert masked.any(dim=-1).all()  # every query sees at least itself
    assert not masked[0, 0, :, :2].any()


def test_kv_cache_bytes_count_and_compact():
    model = tiny_block_model()
    cache = model.new_cache()
    with torch.no_grad():
        model.hidden_states(torch.randint(6, 80, (1, 40)), torch.arange(40), cache=cache, causal=True, store=True)
    per_token = 2 * 2 * 2 * 8 * 4  # layers x (k, v) x kv heads x head dim x float32
    full = cache.nbytes()
    assert full == per_token * (40 + KVCache.SPARE)  # the buffers, spare room included
    cache.truncate(10)
    assert cache.nbytes() == full  # a truncated view still holds its storage
    cache.compact()
    assert cache.nbytes() == per_token * 10


def test_kv_cache_appends_into_spare_room_and_lends_it_to_a_canvas():
    """Appending writes behind the cached positions in the same buffer (no copy of the context)
    until it is full, then grows it; a truncate and append overwrites the dropped tail; a
    CanvasKV over a batch-1 context uses the spare room instead of copying, and its canvas slots
    are not part of the cache; a context replaced by a tensor of its own is copied again."""
    cache = KVCache(1)
    first = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)
    cache.append(0, first, -first)
    buffer = cache.keys[0].data_ptr()
    capacity = 3 + KVCache.SPARE
    for step in range(KVCache.SPARE):
        cache.append(0, torch.full((1, 2, 1, 4), float(step)), torch.zeros(1, 2, 1, 4))
    assert cache.length == capacity and cache.keys[0].data_ptr() == buffer  # never copied while it fit
    torch.testing.assert_close(cache.keys[0][:, :, :3], first)
    cache.append(0, torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))  # full: grown once
    assert cache.keys[0].data_ptr() != buffer and cache.length == capacity + 1
    torch.testing.assert_close(cache.keys[0][:, :, :3], first)
    cache.truncate(2)
    cache.append(0, torch.full((1, 2, 1, 4), 7.0), torch.zeros(1, 2, 1, 4))
    assert cache.length == 3 and bool((cache.keys[0][:, :, 2] == 7).all())
    kv = CanvasKV(cache, rows=1, width=5)
    assert kv.keys[0].data_ptr() == cache.keys[0].data_ptr() and kv.keys[0].shape[2] == 3 + 5
    kv.columns = torch.tensor([0, 4])
    kv.write(0, torch.full((1, 2, 2, 4), 9.0), torch.full((1, 2, 2, 4), 9.0))
    assert cache.length == 3 and bool((kv.keys[0][:, :, 3] == 9).all()) and bool((kv.keys[0][:, :, 7] == 9).all())
    copied = CanvasKV(cache, rows=2, width=5)  # two candidates over one context: rows of their own
    assert copied.keys[0].data_ptr() != cache.keys[0].data_ptr()
    cache.keys[0] = cache.keys[0].clone()  # replaced (the bidirectional cache gathers its keys)
    assert cache.room_for(5) is None
    cache.append(0, torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    assert cache.length == 4 and bool((cache.keys[0][:, :, 2] == 7).all())


def context_then_canvas_logits(*models: Transformer) -> list[torch.Tensor]:
    """Each model's logits for one random canvas of 3 rows over one random cached context."""
    ids, canvas = torch.randint(0, 96, (1, 11)), torch.randint(0, 96, (3, 5))
    outputs = []
    with torch.no_grad():
        for model in models:
            cache = model.new_cache()
            model.hidden_states(ids, torch.arange(11), cache=cache, causal=True, store=True)
            outputs.append(model(canvas, torch.arange(11, 16), cache=cache))
    return outputs


def test_fused_projections_give_the_unfused_models_logits(tmp_path):
    """The engine's inference form (q/k/v and gate/up in one product each, weights stored
    pre-transposed) computes what the Hugging Face-named modules compute: GQA, QKV bias, untied
    head, a cached context and a canvas over it."""
    qwen2_reference(tmp_path, kv_heads=2)
    plain, fused = load_model(tmp_path), load_model(tmp_path).fuse_projections()
    assert not hasattr(fused.layers[0].self_attn, "q_proj") and fused.layers[0].mlp.gate_up_proj is not None
    outputs = context_then_canvas_logits(plain, fused)
    torch.testing.assert_close(outputs[1], outputs[0], atol=ATOL, rtol=1e-4)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in plain.parameters())  # untied head


@pytest.mark.skipif(not HalfWeightLinear.available(), reason="this torch build has no FBGEMM half-precision GEMM")
def test_half_weights_compute_the_float32_product_of_rounded_weights(tmp_path):
    """HalfWeightLinear is x @ W.T + b with W rounded to float16 and float32 arithmetic (not
    half-precision activations); a packed model stays within the rounding of its weights of the
    float32 one, over a cached context and a canvas, with bias (Qwen2's QKV) and GQA."""
    torch.manual_seed(0)
    weight, bias, x = torch.randn(48, 32) * 0.1, torch.randn(48), torch.randn(2, 5, 32)
    layer = HalfWeightLinear(weight, bias)
    torch.testing.assert_close(layer(x), x @ weight.half().float().t() + bias, atol=1e-5, rtol=1e-5)
    many = torch.randn(3, HalfWeightLinear.ROWS_FOR_FLOAT32, 32)  # float32 GEMM over the same rounded weights
    torch.testing.assert_close(layer(many), many @ weight.half().float().t() + bias, atol=1e-5, rtol=1e-5)
    assert layer(torch.randn(0, 32)).shape == (0, 48)
    qwen2_reference(tmp_path, kv_heads=2)
    fused, packed = load_model(tmp_path).fuse_projections(), load_model(tmp_path).fuse_projections().pack_half_weights()
    assert isinstance(packed.layers[0].self_attn.qkv_proj, HalfWeightLinear) and isinstance(packed.lm_head, HalfWeightLinear)
    outputs = context_then_canvas_logits(fused, packed)
    error = (outputs[1] - outputs[0]).abs().max() / outputs[0].abs().max()
    assert 0 < error < 2e-3  # rounded (not the float32 weights), but only by the weights' rounding
    with pytest.raises(ValueError, match="fuse_projections"):
        load_model(tmp_path).pack_half_weights()


def test_smoothing_keeps_the_float32_function(tmp_path):
    """SmoothQuant's folding (input channels scaled down, weight rows up, 1/s in the RMSNorm
    weights and the value channels) changes no float32 logit: GQA (values shared by two heads),
    QKV bias, a cached context and a canvas; activations large in a few channels shrink."""
    qwen2_reference(tmp_path, kv_heads=2)
    fused = load_model(tmp_path).fuse_projections()
    smoothed = load_model(tmp_path).fuse_projections()
    with torch.no_grad():  # a few large channels, as trained models have them
        for model in (fused, smoothed):
            model.layers[0].input_layernorm.weight[:3] = 20.0
    before = smoothed.layers[0].input_layernorm.weight.clone()
    smoothed.smooth_activations(torch.randint(0, 96, (40,)), window=16)
    outputs = context_then_canvas_logits(fused, smoothed)
    torch.testing.assert_close(outputs[1], outputs[0], atol=ATOL, rtol=1e-4)
    after = smoothed.layers[0].input_layernorm.weight
    assert (after[:3] / before[:3]).max() < (after[3:] / before[3:]).min()  # the large channels shrank most
    with pytest.raises(ValueError, match="fuse_projections"):
        load_model(tmp_path).smooth_activations(torch.arange(8))


@pytest.mark.skipif(not (Int8WeightLinear.available() and HalfWeightLinear.available()),
                    reason="this torch build has no FBGEMM int8 or half-precision GEMM")
def test_int8_weights_approximate_the_float32_product(tmp_path):
    """Int8WeightLinear is x @ W.T + b within int8 rounding (per-channel weights, activations
    quantized per product), for any leading shape; a packed model keeps the MLP's down
    projection float16 and stays near the float32 logits."""
    torch.manual_seed(0)
    weight, bias, x = torch.randn(48, 32) * 0.1, torch.randn(48), torch.randn(2, 5, 32)
    layer = Int8WeightLinear(weight, bias)
    exact = x @ weight.t() + bias
    out = layer(x)
    assert out.shape == (2, 5, 48)
    error = (out - exact).norm() / exact.norm()
    assert 0 < error < 0.03  # rounded, by int8's rounding and no more
    assert layer(torch.randn(0, 32)).shape == (0, 48)
    qwen2_reference(tmp_path, kv_heads=2)
    fused = load_model(tmp_path).fuse_projections()
    packed = load_model(tmp_path).fuse_projections().smooth_activations(torch.randint(0, 96, (32,))).pack_int8_weights()
    attn, mlp = packed.layers[0].self_attn, packed.layers[0].mlp
    assert isinstance(attn.qkv_proj, Int8WeightLinear) and isinstance(packed.lm_head, Int8WeightLinear)
    assert isinstance(mlp.down_proj, HalfWeightLinear)
    outputs = context_then_canvas_logits(fused, packed)
    error = (outputs[1] - outputs[0]).norm() / outputs[0].norm()
    assert 0 < error < 0.05
    with pytest.raises(ValueError, match="fuse_projections"):
        load_model(tmp_path).pack_int8_weights()


def test_canvas_kv_steps_are_exact_over_every_column_and_reuse_keys_of_the_others(tmp_path):
    """A canvas step through CanvasKV over every column equals the plain cached forward; a later
    step over a few columns of the same canvas reads the others' keys from the buffer, which
    here are exact too (nothing changed), so its logits match at those columns; once a token
    changes, a step that does not rerun the others differs from the exact forward (the reuse
    is approximate), and a full pass makes it exact again."""
    qwen2_reference(tmp_path, kv_heads=2)
    model = load_model(tmp_path).fuse_projections()
    context, canvas = torch.randint(0, 96, (1, 9)), torch.randint(0, 96, (2, 6))
    positions = torch.arange(9, 15)
    with torch.no_grad():
        cache = model.new_cache()
        model.hidden_states(context, torch.arange(9), cache=cache, causal=True, store=True)
        exact = model(canvas, positions, cache=cache)
        kv = CanvasKV(cache, rows=2, width=6)
        kv.columns = torch.arange(6)
        torch.testing.assert_close(model(canvas, positions, cache=kv), exact, atol=ATOL, rtol=1e-4)
        kv.columns = torch.tensor([1, 4])
        torch.testing.assert_close(model(canvas[:, [1, 4]], positions[[1, 4]], cache=kv), exact[:, [1, 4]], atol=ATOL, rtol=1e-4)
        changed = canvas.clone()
        changed[:, 2] = (changed[:, 2] + 1) % 96
        fresh = model(changed, positions, cache=cache)
        kv.columns = torch.tensor([2, 4])
        stale = model(changed[:, [2, 4]], positions[[2, 4]], cache=kv)
        assert not torch.allclose(stale, fresh[:, [2, 4]], atol=ATOL)
        kv.columns = torch.arange(6)
        torch.testing.assert_close(model(changed, positions, cache=kv), fresh, atol=ATOL, rtol=1e-4)


def test_cache_only_prefill_stores_the_same_keys_and_values(tmp_path):
    qwen2_reference(tmp_path, kv_heads=2)
    model = load_model(tmp_path)
    ids = torch.randint(0, 96, (1, 13))
    with torch.no_grad():
        full, lean = model.new_cache(), model.new_cache()
        model.hidden_states(ids, torch.arange(13), cache=full, causal=True, store=True)
        assert model.hidden_states(ids, torch.arange(13), cache=lean, causal=True, store=True, cache_only=True) is None
    for a, b in zip(full.keys + full.values, lean.keys + lean.values):
        torch.testing.assert_close(b, a, atol=0, rtol=0)
