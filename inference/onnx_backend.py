"""ONNX Runtime backend (``--backend onnx``): the denoiser's two calls as two ONNX graphs.

* ``prefill``: context tokens ``ids`` [1, T] at ``positions`` [T] after a cache of P earlier
  positions (``past_k_i``/``past_v_i`` [1, kv_heads, P, head_dim] per layer, P may be 0), causal;
  returns the new tokens' keys and values, which the engine appends to its cache.
* ``canvas``: canvases [B, M] at ``positions`` [B, M] over a cache [1 or B, kv_heads, P, head_dim],
  with ``key_valid`` [B, P + M] hiding padding (batched requests) and ``select`` [N] (flat
  indices into B x M) naming the positions whose logits [N, V] are wanted.

Both are exported from the PyTorch model (``torch.onnx.export``, TorchScript-based, dynamic
batch and length axes) the first time a model is used with this backend and kept in the user's
cache directory (``$DIFILL_CACHE_DIR`` or ``$XDG_CACHE_HOME/difill`` or ``~/.cache/difill``,
then ``onnx/<hash>``), keyed by the model's config, its weight files (name, size, mtime), the
graph version and the torch version, never inside the package. With ``int8=True`` the CPU path
uses weights quantised to int8 by ``onnxruntime.quantization.quantize_dynamic`` (MatMul
weights; activations quantised on the fly); bench/README.md has the speed and the agreement
with float32.

The engine's :class:`difill.inference.model.KVCache` stays a list of torch tensors (on the
CPU); numpy views cross into ONNX Runtime without copies where the tensors are contiguous.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from difill.inference.loader import ModelLoadError
from difill.inference.model import KVCache, Transformer

if TYPE_CHECKING:
    from difill.inference.engine import Engine

log = logging.getLogger(__name__)

GRAPH_VERSION = "1"
OPSET = 17


def cache_root() -> Path:
    """Where exported graphs live: ``$DIFILL_CACHE_DIR``, else ``$XDG_CACHE_HOME/difill``, else ``~/.cache/difill``."""
    if os.environ.get("DIFILL_CACHE_DIR"):
        return Path(os.environ["DIFILL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "difill"


def model_fingerprint(directory: Path | None, model: Transformer) -> str:
    """A short hash that changes when the model, the graph layout or torch changes."""
    h = hashlib.sha256()
    h.update(f"graph={GRAPH_VERSION};opset={OPSET};torch={torch.__version__}".encode())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    files = sorted(directory.glob("*.safetensors")) if directory is not None else []
    for f in files:
        stat = f.stat()
        h.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    if not files:  # a model that was not loaded from disk: hash the weights themselves
        for name, p in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class _PrefillGraph(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, *past: torch.Tensor):
        cache = KVCache(self.model.config.n_layers)
        cache.keys, cache.values = list(past[0::2]), list(past[1::2])
        p = past[0].shape[2]
        key_valid = torch.ones(1, p + ids.shape[1], dtype=torch.bool)  # forces the general causal mask path
        self.model.hidden_states(ids, positions, cache=cache, causal=True, store=True, key_valid=key_valid)
        out = []
        for k, v in zip(cache.keys, cache.values):
            out += [k[:, :, p:], v[:, :, p:]]
        return tuple(out)


class _CanvasGraph(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, canvas: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor, select: torch.Tensor,
                *past: torch.Tensor):
        cache = KVCache(self.model.config.n_layers)
        b = canvas.shape[0]
        cache.keys = [k.expand(b, -1, -1, -1) for k in past[0::2]]
        cache.values = [v.expand(b, -1, -1, -1) for v in past[1::2]]
        hidden = self.model.hidden_states(canvas, positions, cache=cache, key_valid=key_valid)
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, select)
        return self.model.logits(flat)


def _past_names(n_layers: int) -> list[str]:
    return [f"past_{kind}_{i}" for i in range(n_layers) for kind in ("k", "v")]


def export(model: Transformer, directory: Path) -> tuple[Path, Path]:
    """Write ``prefill.onnx`` and ``canvas.onnx`` for ``model`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    c = model.config
    net = model if next(model.parameters()).dtype == torch.float32 and next(model.parameters()).device.type == "cpu" \
        else _float_cpu_copy(model)
    n, kv, hd = c.n_layers, c.n_kv_heads, c.head_dim
    past = tuple(torch.zeros(1, kv, 5, hd) for _ in range(2 * n))
    past_names = _past_names(n)
    past_axes = {name: {2: "past"} for name in past_names}
    new_names = [name.replace("past", "new") for name in past_names]
    prefill_path, canvas_path = directory / "prefill.onnx", directory / "canvas.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            _PrefillGraph(net), (torch.ones(1, 4, dtype=torch.long), torch.arange(5, 9)) + past, str(prefill_path),
            input_names=["ids", "positions"] + past_names, output_names=new_names, opset_version=OPSET, dynamo=False,
            dynamic_axes={"ids": {1: "tokens"}, "positions": {0: "tokens"}, **past_axes,
                          **{name: {2: "tokens"} for name in new_names}})
        b, m = 2, 3
        torch.onnx.export(
            _CanvasGraph(net),
            (torch.ones(b, m, dtype=torch.long), torch.arange(5, 5 + m).repeat(b, 1), torch.ones(b, 5 + m, dtype=torch.bool),
             torch.arange(b * m)) + past,
            str(canvas_path),
            input_names=["canvas", "positions", "key_valid", "select"] + past_names, output_names=["logits"],
            opset_version=OPSET, dynamo=False,
            dynamic_axes={"canvas": {0: "rows", 1: "width"}, "positions": {0: "rows", 1: "width"},
                          "key_valid": {0: "rows", 1: "keys"}, "select": {0: "selected"}, "logits": {0: "selected"},
                          **{name: {0: "cache_rows", 2: "past"} for name in past_names}})
    return prefill_path, canvas_path


def _float_cpu_copy(model: Transformer) -> Transformer:
    return copy.deepcopy(model).float().cpu().eval()  # fused (Engine.load) or not, as the model is


def int8_needs_reduced_range() -> bool:
    """Whether int8 weights must keep to 7 bits on this CPU: an x86 CPU without VNNI multiplies
    uint8 activations by int8 weights with an instruction whose int16 sums saturate, and full-range
    weights then decode garbage (the bundled model wrote ``_max_max_max`` on a 2-core AMD EPYC
    with AVX2 only). VNNI CPUs (and other architectures) keep the full 8 bits."""
    if platform.machine().lower() not in {"x86_64", "amd64", "i386", "i686"}:
        return False
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    except OSError:
        return True  # unknown: the safe choice
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)


def quantize(source: Path, target: Path, reduce_range: bool) -> Path:
    """int8 weights for the MatMuls (dynamic quantisation: activations are quantised per call);
    ``reduce_range``: 7-bit weights (:func:`int8_needs_reduced_range`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    quiet = _DropMessage("pre-processing before quantization")  # the quantizer's advice, logged on the root logger
    root.addFilter(quiet)
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         per_channel=True, reduce_range=reduce_range)
    finally:
        root.removeFilter(quiet)
    return target


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class OnnxDenoiser:
    """The engine's denoiser on ONNX Runtime: the same ``prefill`` and ``canvas_logits`` as
    :class:`difill.inference.engine.TorchDenoiser`."""

    name = "onnx"

    def __init__(self, prefill_path: Path, canvas_path: Path, n_layers: int, device: str = "cpu", threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelLoadError("--backend onnx needs onnxruntime: pip install 'difill[onnx]'") from exc
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif device == "cuda":
            log.warning("onnxruntime has no CUDA execution provider here: running the ONNX graphs on the CPU")
        self.providers = providers
        self.prefill_session = ort.InferenceSession(str(prefill_path), options, providers=providers)
        self.canvas_session = ort.InferenceSession(str(canvas_path), options, providers=providers)
        self.n_layers = n_layers
        self.past_names = _past_names(n_layers)
        shape = {i.name: i.shape for i in self.prefill_session.get_inputs()}["past_k_0"]
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        # The cache does not change between the steps of a block: its numpy feeds are kept.
        self._feeds_of: tuple[tuple, dict] | None = None

    @classmethod
    def for_engine(cls, engine: "Engine", directory: Path | None, int8: bool | None = None) -> "OnnxDenoiser":
        """Export (once, into the user cache) and open the graphs of the engine's model."""
        if int8 is None:
            int8 = getattr(engine.settings, "onnx_int8", False) and engine.device == "cpu"
        folder = cache_root() / "onnx" / model_fingerprint(Path(directory) if directory else None, engine.model)
        prefill_path, canvas_path = folder / "prefill.onnx", folder / "canvas.onnx"
        try:
            if not (prefill_path.is_file() and canvas_path.is_file()):
                log.info("exporting %s to ONNX in %s", engine.name, folder)
                tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
                export(engine.model, tmp)
                tmp.mkdir(parents=True, exist_ok=True)
                for f in tmp.iterdir():
                    folder.mkdir(parents=True, exist_ok=True)
                    os.replace(f, folder / f.name)
                tmp.rmdir()
            if int8:
                reduce_range = int8_needs_reduced_range()
                suffix = ".int8-7bit.onnx" if reduce_range else ".int8.onnx"
                quantized_paths = []
                for source in (prefill_path, canvas_path):
                    quantized = folder / (source.name.removesuffix(".onnx") + suffix)
                    if not quantized.is_file():
                        quantize(source, quantized.with_suffix(".tmp"), reduce_range)
                        os.replace(quantized.with_suffix(".tmp"), quantized)
                    quantized_paths.append(quantized)
                prefill_path, canvas_path = quantized_paths
        except (OSError, RuntimeError) as exc:
            raise ModelLoadError(f"{folder}: cannot export the model to ONNX ({exc}); use --backend torch") from exc
        denoiser = cls(prefill_path, canvas_path, engine.model.config.n_layers, engine.device, torch.get_num_threads())
        denoiser.folder, denoiser.int8 = folder, int8
        return denoiser

    @staticmethod
    def _np(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(t.detach().cpu().numpy())

    def _past(self, cache: KVCache | None) -> dict[str, np.ndarray]:
        # The key holds the tensors themselves, so an identity match cannot be a recycled id.
        key = None if cache is None else tuple(cache.keys) + tuple(cache.values)
        if key is not None and self._feeds_of is not None and len(key) == len(self._feeds_of[0]) \
                and all(a is b for a, b in zip(key, self._feeds_of[0])):
            return self._feeds_of[1]
        feeds = {}
        for i in range(self.n_layers):
            k = cache.keys[i] if cache is not None else None
            v = cache.values[i] if cache is not None else None
            if k is None:
                k = v = torch.zeros(1, self.kv_heads, 0, self.head_dim)
            feeds[f"past_k_{i}"], feeds[f"past_v_{i}"] = self._np(k.float()), self._np(v.float())
        if key is not None:
            self._feeds_of = (key, feeds)
        return feeds

    def prefill(self, cache: KVCache, ids: torch.Tensor, positions: torch.Tensor) -> None:
        feeds = {"ids": self._np(ids.long()), "positions": self._np(positions.long())}
        feeds.update(self._past(cache))
        outputs = self.prefill_session.run(None, feeds)
        for i in range(self.n_layers):
            cache.append(i, torch.from_numpy(outputs[2 * i]), torch.from_numpy(outputs[2 * i + 1]))

    def canvas_logits(self, cache: KVCache | None, canvas: torch.Tensor, positions: torch.Tensor,
                      select: torch.Tensor | None = None, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        b, m = canvas.shape
        past = cache.length if cache is not None else 0
        if positions.dim() == 1:
            positions = positions[None].expand(b, -1)
        if key_valid is None:
            key_valid = torch.ones(b, past + m, dtype=torch.bool)
        index = torch.arange(b * m) if select is None else select.reshape(-1).nonzero()[:, 0]
        feeds = {"canvas": self._np(canvas.long()), "positions": self._np(positions.long()),
                 "key_valid": self._np(key_valid.bool()), "select": self._np(index.long())}
        feeds.update(self._past(cache))
        logits = torch.from_numpy(self.canvas_session.run(None, feeds)[0])
        return logits if select is not None else logits.view(b, m, -1)
