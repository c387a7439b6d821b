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
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw


def _ids(value) -> list[int]:
    """A token id field of a Hugging Face config: an int, a list of ints (``eos_token_id``), or null."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _first(value, default: int | None) -> int | None:
    ids = _ids(value)
    return ids[0] if ids else default


def _rope_theta(raw: dict, default: float) -> float:
    """``rope_theta`` at the top level (transformers 4) or in ``rope_parameters`` (transformers 5).
    Scaled RoPE variants (YaRN, linear, dynamic) would silently change every position: refused."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    for table in (params, scaling):
        kind = table.get("rope_type", table.get("type", "default"))
        if kind not in (None, "default"):
            raise ValueError(f"rope scaling {kind!r} is not supported (only plain RoPE)")
    return float(raw.get("rope_theta", params.get("rope_theta", default)))


# LLaDA options that change the computation; difill implements the values the released
# checkpoints use (configuration_llada.py names) and refuses the others rather than computing
# something else.
LLADA_REQUIRED = {
    "block_type": "llama",
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "alibi": False,
    "rope": True,
    "include_bias": False,
    "attention_layer_norm": False,
    "input_emb_norm": False,
    "scale_logits": False,
    "block_group_size": 1,
}


def config_from_hf(raw: dict, path: Path) -> ModelConfig:
    """Map difill, Qwen2/Dream (Dream, Dream-Coder, DiffuCoder) and LLaDA configs onto :class:`ModelConfig`.

    Token ids follow the released configs: Dream's mask is 151666 and its end/pad 151643
    (<|endoftext|>); Dream-Coder's bos is 151665; LLaDA's mask is 126336, eos/pad 126081 and bos
    126080. Extra end ids (a list ``eos_token_id``) go to ``extra["end_token_ids"]``.
    """
    kind = str(raw.get("model_type", "")).lower()
    try:
        if kind == "difill":
            return ModelConfig.from_dict({k: v for k, v in raw.items() if k != "model_type"})
        if kind in {"dream", "qwen2", "diffucoder"}:
            if raw.get("hidden_act", "silu") != "silu":
                raise ValueError(f"hidden_act {raw['hidden_act']!r} is not supported (silu)")
            heads = raw["num_attention_heads"]
            ends = _ids(raw.get("eos_token_id")) or [151643]
            pad = _first(raw.get("pad_token_id"), ends[0])
            return ModelConfig(
                vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], n_layers=raw["num_hidden_layers"],
                n_heads=heads, n_kv_heads=raw.get("num_key_value_heads") or heads,
                intermediate_size=raw["intermediate_size"], max_position=raw.get("max_position_embeddings", 32768),
                rope_theta=_rope_theta(raw, 10000.0), rms_eps=raw.get("rms_norm_eps", 1e-6),
                qkv_bias=True,  # Qwen2 attention: q/k/v projections always carry a bias, o_proj never
                tie_embeddings=bool(raw.get("tie_word_embeddings", False)), attention="bidirectional", shift_logits=True,
                mask_token_id=raw.get("mask_token_id", 151666), end_token_id=ends[0], pad_token_id=pad,
                bos_token_id=_first(raw.get("bos_token_id"), 151665),
                extra={"end_token_ids": ends, "source_model_type": raw.get("model_type")},
            )
        if kind == "llada":
            for key, wanted in LLADA_REQUIRED.items():
                if key in raw and raw[key] is not None and raw[key] != wanted:
                    raise ValueError(f"{key}={raw[key]!r} is not supported (difill implements {key}={wanted!r})")
            heads = raw["n_heads"]
            kv_heads = raw.get("n_kv_heads") or (1 if raw.get("multi_query_attention") else heads)
            ends = _ids(raw.get("eos_token_id")) or [126081]
            return ModelConfig(
                vocab_size=raw.get("embedding_size") or raw["vocab_size"], hidden_size=raw["d_model"], n_layers=raw["n_layers"],
                n_heads=heads, n_kv_heads=kv_heads, intermediate_size=raw["mlp_hidden_size"],
                max_position=raw.get("max_sequence_length", 4096), rope_theta=_rope_theta(raw, 10000.0),
                rms_eps=raw.get("rms_norm_eps", 1e-5), qkv_bias=bool(raw.get("include_qkv_bias", False)),
                tie_embeddings=bool(raw.get("weight_tying", False)), attention="bidirectional", shift_logits=False,
                mask_token_id=raw.get("mask_token_id", 126336), end_token_id=ends[0],
                pad_token_id=_first(raw.get("pad_token_id"), ends[0]), bos_token_id=_first(raw.get("bos_token_id"), 126080),
                extra={"end_token_ids": ends, "source_model_type": raw.get("model_type")},
            )
    except KeyError as exc:
        raise ModelLoadError(f"{path}: config.json lacks {exc} for model_type {kind!r}") from exc
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: {exc} (model_type {kind!r})") from exc
    raise ModelLoadError(f"{path}: unsupported model_type {raw.get('model_type')!r} (difill, dream, qwen2, llada)")


def check_config(config: ModelConfig, path: Path) -> ModelConfig:
    """Shapes that divide and token ids inside the vocabulary, or a message naming the field."""
    if config.hidden_size <= 0 or config.n_heads <= 0 or config.hidden_size % config.n_heads:
        raise ModelLoadError(f"{path}: hidden size {config.hidden_size} is not a multiple of the {config.n_heads} heads")
    if config.n_kv_heads <= 0 or config.n_heads % config.n_kv_heads:
        raise ModelLoadError(f"{path}: {config.n_heads} heads are not a multiple of the {config.n_kv_heads} key/value heads")
    if config.attention not in ("block", "bidirectional"):
        raise ModelLoadError(f"{path}: attention {config.attention!r} is neither 'block' nor 'bidirectional'")
    for name in ("mask_token_id", "end_token_id"):
        value = getattr(config, name)
        if not isinstance(value, int) or not 0 <= value < config.vocab_size:
            raise ModelLoadError(f"{path}: {name} {value!r} is outside the vocabulary of {config.vocab_size} tokens")
    return config


def model_config(directory: Path, raw: dict | None = None) -> ModelConfig:
    """The checked config of a model directory (its config.json, or ``raw`` already read from it)."""
    path = Path(directory) / "config.json"
    return check_config(config_from_hf(read_config(Path(directory)) if raw is None else raw, path), path)


PICKLED_SUFFIXES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files: the shards an index names, else every ``*.safetensors``."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"{index}: not a safetensors index ({type(exc).__name__}: {exc})") from exc
        files = [directory / s for s in shards]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{f}: shard named in {index.name} is missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for pattern in PICKLED_SUFFIXES for p in directory.glob(pattern))
        hint = f" (found {', '.join(pickled)}: pickled weights are never loaded, they can run code; convert them to safetensors)" if pickled else ""
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
    """Build the transformer and fill every parameter from the safetensors files.

    The model is built on the meta device and the loaded tensors are assigned to it (no second
    copy of the weights in memory).
    """
    directory = Path(directory)
    raw = read_config(directory)
    config = model_config(directory, raw)
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
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
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
            if not tensor.is_floating_point():
                raise ModelLoadError(f"{file}: tensor {name} has dtype {tensor.dtype}, expected floating point weights")
            state[target] = tensor.to(device=device, dtype=dtype)
        del tensors
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelLoadError(f"{directory}: tensors missing from the safetensors files: {', '.join(missing[:5])}"
                             + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    for name, p in model.named_parameters():
        if p.is_meta:  # cannot happen after the missing check; a clear error if it ever does
            raise ModelLoadError(f"{directory}: parameter {name} was not loaded")
        p.requires_grad_(False)
    return model.eval()
