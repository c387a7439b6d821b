"""Load a model directory in Hugging Face layout: config.json, *.safetensors (one file or
shards with an index), tokenizer.json.

difill's own checkpoints use difill's config names. Open diffusion LLMs are mapped from their
public configs: Dream / Dream-Coder / DiffuCoder / Open-dCoder are Qwen2 models that shift
logits by one position; LLaDA is LLaMA-like with its own tensor names and unshifted logits.
Every problem names the file (and the tensor) so that a user can fix it. Safetensors only:
pickled checkpoints are refused, never unpickled.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from difill.inference.model import ModelConfig, Transformer

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model directory is missing, incomplete, corrupt or of an unknown kind."""


# Qwen2 (Dream family) names are difill's own with a ``model.`` prefix.
QWEN2_PREFIX = "model."
# LLaDA's names (modeling_llada.py): model.transformer.{wte, blocks.N.*, ln_f, ff_out}.
LLADA_NAMES = {
    r"model\.transformer\.wte\.weight": "embed_tokens.weight",
    r"model\.transformer\.ln_f\.weight": "norm.weight",
    r"model\.transformer\.ff_out\.weight": "lm_head.weight",
    r"model\.transformer\.blocks\.(\d+)\.attn_norm\.weight": r"layers.\1.input_layernorm.weight",
    r"model\.transformer\.blocks\.(\d+)\.ff_norm\.weight": r"layers.\1.post_attention_layernorm.weight",
    r"model\.transformer\.blocks\.(\d+)\.q_proj\.(weight|bias)": r"layers.\1.self_attn.q_proj.\2",
    r"model\.transformer\.blocks\.(\d+)\.k_proj\.(weight|bias)": r"layers.\1.self_attn.k_proj.\2",
    r"model\.transformer\.blocks\.(\d+)\.v_proj\.(weight|bias)": r"layers.\1.self_attn.v_proj.\2",
    r"model\.transformer\.blocks\.(\d+)\.attn_out\.weight": r"layers.\1.self_attn.o_proj.weight",
    r"model\.transformer\.blocks\.(\d+)\.ff_proj\.weight": r"layers.\1.mlp.gate_proj.weight",
    r"model\.transformer\.blocks\.(\d+)\.up_proj\.weight": r"layers.\1.mlp.up_proj.weight",
    r"model\.transformer\.blocks\.(\d+)\.ff_out\.weight": r"layers.\1.mlp.down_proj.weight",
}


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not directory.is_dir():
        raise ModelLoadError(f"model directory not found: {directory}")
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing (a model directory needs config.json, *.safetensors and tokenizer.json)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc


def config_from_hf(raw: dict, path: Path) -> ModelConfig:
    """Map difill, Qwen2/Dream and LLaDA configs onto :class:`ModelConfig`."""
    kind = str(raw.get("model_type", "")).lower()
    try:
        if kind == "difill":
            return ModelConfig.from_dict({k: v for k, v in raw.items() if k != "model_type"})
        if kind in {"dream", "qwen2", "diffucoder"}:
            return ModelConfig(
                vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], n_layers=raw["num_hidden_layers"],
                n_heads=raw["num_attention_heads"], n_kv_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
                intermediate_size=raw["intermediate_size"], max_position=raw.get("max_position_embeddings", 32768),
                rope_theta=raw.get("rope_theta", 10000.0), rms_eps=raw.get("rms_norm_eps", 1e-6), qkv_bias=True,
                tie_embeddings=raw.get("tie_word_embeddings", False), attention="bidirectional", shift_logits=True,
                mask_token_id=raw.get("mask_token_id", 151666), end_token_id=raw.get("pad_token_id", 151643),
                pad_token_id=raw.get("pad_token_id", 151643), bos_token_id=raw.get("bos_token_id", 151665),
            )
        if kind == "llada":
            heads = raw["n_heads"]
            return ModelConfig(
                vocab_size=raw.get("embedding_size") or raw["vocab_size"], hidden_size=raw["d_model"], n_layers=raw["n_layers"],
                n_heads=heads, n_kv_heads=raw.get("n_kv_heads") or heads, intermediate_size=raw["mlp_hidden_size"],
                max_position=raw.get("max_sequence_length", 4096), rope_theta=raw.get("rope_theta", 500000.0),
                rms_eps=raw.get("rms_norm_eps", 1e-5), qkv_bias=bool(raw.get("include_qkv_bias", False)),
                tie_embeddings=bool(raw.get("weight_tying", False)), attention="bidirectional", shift_logits=False,
                mask_token_id=raw.get("mask_token_id", 126336), end_token_id=raw.get("eos_token_id", 126081),
                pad_token_id=raw.get("pad_token_id", 126081), bos_token_id=raw.get("bos_token_id", 126080),
            )
    except KeyError as exc:
        raise ModelLoadError(f"{path}: config.json lacks {exc} for model_type {kind!r}") from exc
    raise ModelLoadError(f"{path}: unsupported model_type {raw.get('model_type')!r} (difill, dream, qwen2, llada)")


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelLoadError(f"{index}: not a safetensors index ({exc})") from exc
        files = [directory / s for s in shards]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{f}: shard named in {index.name} is missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        hint = f" (found {', '.join(pickled)}: pickled weights are not loaded; convert them to safetensors)" if pickled else ""
        raise ModelLoadError(f"{directory}: no *.safetensors weights{hint}")
    return files


def rename(name: str, kind: str) -> str:
    if kind == "llada":
        for pattern, target in LLADA_NAMES.items():
            if re.fullmatch(pattern, name):
                return re.sub(pattern, target, name)
        return name
    if kind != "difill" and name.startswith(QWEN2_PREFIX):
        return name[len(QWEN2_PREFIX):]
    return name


def load_model(directory: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """Build the transformer and fill every parameter from the safetensors files."""
    directory = Path(directory)
    raw = read_config(directory)
    config = config_from_hf(raw, directory / "config.json")
    kind = str(raw.get("model_type", "")).lower()
    with torch.device("meta"):
        model = Transformer(config)
    expected = {name: p for name, p in model.state_dict(keep_vars=True).items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(directory):
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"{file}: cannot read safetensors ({exc}); the file is truncated or corrupt") from exc
        for name, tensor in tensors.items():
            target = rename(name, kind)
            if target == "lm_head.weight" and config.tie_embeddings:
                continue
            if target not in expected:
                log.debug("%s: ignoring tensor %s", file.name, name)
                continue
            if tuple(tensor.shape) != tuple(expected[target].shape):
                raise ModelLoadError(f"{file}: tensor {name} has shape {tuple(tensor.shape)}, "
                                     f"config.json implies {tuple(expected[target].shape)}")
            state[target] = tensor
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelLoadError(f"{directory}: tensors missing from the safetensors files: {', '.join(missing[:5])}"
                             + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    model = model.to_empty(device=device)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.to(dtype).eval()
    return model
