"""Loading model directories: every layout difill reads, single-file and sharded, and every way
a directory can be broken (each error names the file, and the tensor where there is one).

The checkpoints are tiny random models written here, under the names the real checkpoints use:
difill's own, Qwen2/Dream (``model.``-prefixed, QKV bias, ``lm_head`` outside the prefix) and
LLaDA (``model.transformer.blocks.N.*``, see tests/test_model.py for the forward-pass checks).
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from difill import default_model_path
from difill.inference import engine as engine_module
from difill.inference.engine import Engine, InfillRequest, cpu_weights_that_fit
from difill.inference.loader import ModelLoadError, load_model, model_config
from difill.inference.model import ModelConfig, Transformer, init_weights

VOCAB = 96


def difill_model() -> Transformer:
    config = ModelConfig(vocab_size=VOCAB, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48,
                         attention="block", mask_token_id=0, end_token_id=1, pad_token_id=2, prefix_token_id=3,
                         suffix_token_id=4, middle_token_id=5, extra={"context_tokens": 64})
    model = Transformer(config)
    init_weights(model, seed=5)
    return model.eval()


def write_difill(directory: Path, model: Transformer) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "difill", **model.config.to_dict()}))
    return directory


def dream_state(model: Transformer) -> dict[str, torch.Tensor]:
    """difill's names -> Dream's (Qwen2's): ``model.`` prefix, ``lm_head.weight`` at the top."""
    out = {}
    for name, tensor in model.state_dict().items():
        out[name if name == "lm_head.weight" else f"model.{name}"] = tensor.contiguous().clone()
    return out


def write_dream(directory: Path, model: Transformer, shards: int = 1) -> Path:
    c = model.config
    directory.mkdir(parents=True, exist_ok=True)
    state = dream_state(model)
    if shards == 1:
        save_file(state, str(directory / "model.safetensors"))
    else:
        names = sorted(state)
        weight_map = {}
        for i in range(shards):
            shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = names[i::shards]
            save_file({n: state[n] for n in part}, str(directory / shard))
            weight_map.update({n: shard for n in part})
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({
        "model_type": "Dream", "architectures": ["DreamModel"], "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "max_position_embeddings": 512, "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_eps, "tie_word_embeddings": False, "hidden_act": "silu",
        "mask_token_id": c.mask_token_id, "pad_token_id": c.pad_token_id, "eos_token_id": c.end_token_id,
        "bos_token_id": c.bos_token_id,
    }))
    return directory


def qkv_bias_model(vocab: int = VOCAB) -> Transformer:
    config = ModelConfig(vocab_size=vocab, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48,
                         qkv_bias=True, tie_embeddings=False, attention="bidirectional", shift_logits=True,
                         mask_token_id=vocab - 1, end_token_id=vocab - 2, pad_token_id=vocab - 2, bos_token_id=vocab - 3)
    model = Transformer(config)
    init_weights(model, seed=6)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.q_proj.bias.normal_()
            layer.self_attn.k_proj.bias.normal_()
    return model.eval()


def same_outputs(a: Transformer, b: Transformer) -> None:
    ids = torch.randint(6, VOCAB - 4, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------- layouts
def test_difill_layout_round_trip(tmp_path):
    model = difill_model()
    loaded = load_model(write_difill(tmp_path / "m", model))
    assert loaded.config.to_dict() == model.config.to_dict()
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    same_outputs(model, loaded)


@pytest.mark.parametrize("shards", [1, 3])
def test_dream_layout_single_and_sharded(tmp_path, shards):
    model = qkv_bias_model()
    loaded = load_model(write_dream(tmp_path / "m", model, shards=shards))
    c = loaded.config
    assert (c.attention, c.shift_logits, c.qkv_bias, c.tie_embeddings) == ("bidirectional", True, True, False)
    assert (c.mask_token_id, c.end_token_id, c.bos_token_id) == (95, 94, 93)
    same_outputs(model, loaded)


def test_llada_layout_sharded(tmp_path):
    """LLaDA's tensor names; the architecture itself is checked against LLaMA in test_model.py."""
    model = qkv_bias_model()
    names = {"embed_tokens.weight": "model.transformer.wte.weight", "norm.weight": "model.transformer.ln_f.weight",
             "lm_head.weight": "model.transformer.ff_out.weight"}
    block = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ff_norm.weight",
             "self_attn.q_proj.weight": "q_proj.weight", "self_attn.q_proj.bias": "q_proj.bias",
             "self_attn.k_proj.weight": "k_proj.weight", "self_attn.k_proj.bias": "k_proj.bias",
             "self_attn.v_proj.weight": "v_proj.weight", "self_attn.v_proj.bias": "v_proj.bias",
             "self_attn.o_proj.weight": "attn_out.weight", "mlp.gate_proj.weight": "ff_proj.weight",
             "mlp.up_proj.weight": "up_proj.weight", "mlp.down_proj.weight": "ff_out.weight"}
    state = {}
    for name, tensor in model.state_dict().items():
        if name in names:
            state[names[name]] = tensor.contiguous()
        else:
            _, index, rest = name.split(".", 2)
            state[f"model.transformer.blocks.{index}.{block[rest]}"] = tensor.contiguous()
    d = tmp_path / "llada"
    d.mkdir()
    first = sorted(state)[: len(state) // 2]
    save_file({n: state[n] for n in first}, str(d / "model-1.safetensors"))
    save_file({n: state[n] for n in state if n not in first}, str(d / "model-2.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "model-1.safetensors" if n in first else "model-2.safetensors" for n in state}}))
    c = model.config
    (d / "config.json").write_text(json.dumps({
        "model_type": "llada", "d_model": c.hidden_size, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
        "n_layers": c.n_layers, "mlp_hidden_size": c.intermediate_size, "vocab_size": c.vocab_size,
        "embedding_size": c.vocab_size, "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_eps, "weight_tying": False,
        "include_qkv_bias": True, "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
        "mask_token_id": 95, "eos_token_id": 94, "pad_token_id": 94,
    }))
    loaded = load_model(d)
    assert not loaded.config.shift_logits and loaded.config.mask_token_id == 95
    with torch.no_grad():  # difill's qkv_bias_model is Dream-like (shifted); the weights must still agree
        ids = torch.randint(6, 90, (1, 9))
        torch.testing.assert_close(loaded(ids), model(ids), atol=1e-6, rtol=1e-6)


def test_engine_loads_a_dream_checkpoint_and_infills(tmp_path):
    """An open-dLLM layout runs end to end through the engine (random weights: mechanics only)."""
    d = write_dream(tmp_path / "dream", qkv_bias_model(vocab=8192))  # the bundled tokenizer's vocabulary
    shutil.copy(default_model_path() / "tokenizer.json", d / "tokenizer.json")
    engine = Engine.load(d)
    assert not engine.block_layout and 8190 in engine.end_ids
    result = engine.infill(InfillRequest(prefix="def f(x):\n    return ", suffix="\n", mode="line", max_tokens=6))
    assert result.steps >= 1 and result.tokens <= 6



def test_cpu_weights_fit_in_memory_or_fail_clearly():
    """A 7B model in the CPU default (float16 weights beside float32 copies) takes ~42 GB."""
    seven_b = 7_000_000_000
    assert cpu_weights_that_fit("float16", seven_b, 64 << 30, chosen_by_user=False) == "float16"
    assert cpu_weights_that_fit("float16", seven_b, None, chosen_by_user=False) == "float16"  # unknown: as asked
    assert cpu_weights_that_fit("float16", seven_b, 24 << 30, chosen_by_user=False) == "bfloat16"
    with pytest.raises(ModelLoadError, match=r"7.00B parameters as float16 weights need about 39.1 GiB.*bfloat16 weights need the least, 13.0 GiB"):
        cpu_weights_that_fit("float16", seven_b, 24 << 30, chosen_by_user=True)
    with pytest.raises(ModelLoadError, match=r"need about 39.1 GiB of memory, and 8.0 GiB is available; bfloat16 weights need the least, 13.0 GiB$"):
        cpu_weights_that_fit("float16", seven_b, 8 << 30, chosen_by_user=False)


def test_engine_loads_bfloat16_where_the_default_would_not_fit(tmp_path, monkeypatch):
    """The machine's free memory is the one thing simulated: the model, loader and engine are real."""
    d = write_dream(tmp_path / "dream", qkv_bias_model(vocab=8192))
    shutil.copy(default_model_path() / "tokenizer.json", d / "tokenizer.json")
    n_params = model_config(d).n_params()
    monkeypatch.setattr(engine_module, "memory_available", lambda: n_params * 3)
    engine = Engine.load(d)
    assert engine.dtype == "bfloat16"
    assert engine.infill(InfillRequest(prefix="def f(x):\n    return ", suffix="\n", mode="line", max_tokens=6)).steps >= 1
    monkeypatch.setattr(engine_module, "memory_available", lambda: n_params)
    with pytest.raises(ModelLoadError, match=str(d)):
        Engine.load(d)

# ---------------------------------------------------------------------------- errors
def broken_dir(tmp_path: Path) -> Path:
    return write_difill(tmp_path / "m", difill_model())


def load_error(directory: Path) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(directory)
    return str(info.value)


def test_missing_directory_and_config(tmp_path):
    assert "model directory not found" in load_error(tmp_path / "nowhere")
    d = broken_dir(tmp_path)
    (d / "config.json").unlink()
    message = load_error(d)
    assert "config.json" in message and "missing" in message


@pytest.mark.parametrize("text, needle", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"model_type": "gpt2"}', "unsupported model_type 'gpt2'"),
    ('{"model_type": "llada", "d_model": 32}', "lacks 'n_heads'"),
])
def test_bad_config_json(tmp_path, text, needle):
    d = broken_dir(tmp_path)
    (d / "config.json").write_text(text)
    message = load_error(d)
    assert needle in message and "config.json" in message


def test_unsupported_options_are_refused_not_miscomputed(tmp_path):
    model = qkv_bias_model()
    d = write_dream(tmp_path / "m", model)
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**raw, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    assert "rope scaling 'yarn'" in load_error(d)
    (d / "config.json").write_text(json.dumps({**raw, "mask_token_id": 151666}))
    assert "mask_token_id 151666 is outside the vocabulary" in load_error(d)
    (d / "config.json").write_text(json.dumps({"model_type": "llada", "d_model": 32, "n_heads": 4, "n_layers": 2,
                                               "mlp_hidden_size": 48, "vocab_size": VOCAB, "scale_logits": True}))
    assert "scale_logits=True is not supported" in load_error(d)


def test_missing_tokenizer_names_the_file(tmp_path):
    d = broken_dir(tmp_path)
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Engine.load(d)


def test_tokenizer_larger_than_the_vocabulary(tmp_path):
    d = broken_dir(tmp_path)  # 96 tokens; the bundled tokenizer has thousands
    shutil.copy(default_model_path() / "tokenizer.json", d / "tokenizer.json")
    with pytest.raises(ModelLoadError, match="tokenizer and weights do not match"):
        Engine.load(d)


def test_missing_shard(tmp_path):
    d = write_dream(tmp_path / "m", qkv_bias_model(), shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    message = load_error(d)
    assert "model-00002-of-00002.safetensors" in message and "missing" in message


def test_bad_index(tmp_path):
    d = write_dream(tmp_path / "m", qkv_bias_model(), shards=2)
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    assert "model.safetensors.index.json: not a safetensors index" in load_error(d)


def test_truncated_safetensors(tmp_path):
    d = broken_dir(tmp_path)
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = load_error(d)
    assert str(weights) in message and "truncated or corrupt" in message


def test_garbage_safetensors_header(tmp_path):
    d = broken_dir(tmp_path)
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    assert "truncated or corrupt" in load_error(d)


def test_wrong_shape_names_file_and_tensor(tmp_path):
    model = qkv_bias_model()
    d = write_dream(tmp_path / "m", model)
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**raw, "intermediate_size": 40}))
    message = load_error(d)
    assert "model.safetensors: tensor model.layers.0.mlp.down_proj.weight has shape (32, 48)" in message
    assert "config.json implies (32, 40)" in message


def test_missing_tensor_is_named(tmp_path):
    model = qkv_bias_model()
    d = tmp_path / "m"
    write_dream(d, model)
    state = dream_state(model)
    del state["model.layers.1.self_attn.v_proj.bias"]
    save_file(state, str(d / "model.safetensors"))
    assert "layers.1.self_attn.v_proj.bias" in load_error(d)


class _Boom:
    """Unpickling this would create a file: proof that the loader never unpickles."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_weights_are_refused_not_unpickled(tmp_path):
    d = broken_dir(tmp_path)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    message = load_error(d)
    assert "pytorch_model.bin" in message and "never loaded" in message
    assert not marker.exists()


def test_loading_the_bundled_model_leaves_torch_compile_unimported() -> None:
    """The loader builds the model on the meta device; an init there that goes through PyTorch's
    Python meta kernels imports torch._dynamo and sympy: ~140 MiB resident and a second of every
    server start (bench/README.md, language server). A fresh interpreter shows what loading pulls in."""
    program = ("import sys\nfrom difill.inference.engine import Engine, InfillRequest\n"
               "Engine.load().infill(InfillRequest(prefix='def f(x):\\n    return ', suffix='\\n', language='python'))\n"
               "print(sorted(m for m in ('torch._dynamo', 'sympy', 'triton') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "[]"
