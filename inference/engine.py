"""The engine: from (prefix, suffix, language) to a completion, fast.

It owns the model, the tokenizer, the context caches and the denoising loop, and is the one
object that the CLI, the language server and the benchmarks talk to::

    engine = Engine.load()                      # the bundled model on the CPU
    result = engine.infill(InfillRequest(prefix="def add(a, b):\\n    return ", suffix="\\n"))
    result.completion, result.latency_ms, result.steps, result.tokens

Two context layouts, chosen by the model:

* difill's block layout ``<|suffix|> suffix <|prefix|> prefix <|middle|> [canvas]``: the
  context is causal, so its cache is exact; with the suffix first, typing only appends to the
  prefix, and a request for the same document (``document_key``) re-encodes only what changed
  (the longest common token prefix with the document's previous context). Within a block, the
  torch backend keeps the canvas's keys and values too (:class:`difill.inference.model.CanvasKV`):
  between full passes every ``refresh_every`` steps, a step runs only the canvas positions that
  changed or are predicted (Fast-dLLM's approximate cache, applied to the canvas).
* the open dLLM layout ``[bos] prefix [canvas] suffix`` with bidirectional attention: the
  context's keys and values are taken from a full forward pass and reused for
  ``refresh_every`` steps (Fast-dLLM's approximate dual cache).

Token healing (``EngineSettings.heal_tokens``): where the cursor is inside a word, the
prefix's tokens of that word are taken back and the canvas must start with their text, split
only where the tokenizer splits it: a prefix cut mid-word ends in a token the model has rarely
seen a word continue from (`ar` + `gs`), and its tokens are what the model would have chosen
for the whole word. On the FIM set, Python line tails went from 29.6% to 40.7% exact. Where
the cursor is after a space inside a line (`x = `), the space is taken back the same way and
the canvas starts with it (` b`), or ends at once: there may be nothing to write.

The model is reached through a *denoiser* with two calls, ``prefill`` (run context tokens into
a cache) and ``canvas_logits`` (the output head at the canvas positions that can still change;
the torch backend's block-layout steps go through :class:`_CanvasSteps` instead);
:class:`TorchDenoiser` is the PyTorch one, :class:`difill.inference.onnx_backend.OnnxDenoiser`
the ONNX Runtime one.

Several requests can share one forward pass per step (:meth:`Engine.infill_batch`): each keeps
its own context cache; the caches are left-padded to a common length and stacked, with a key
mask hiding the padding, and each row reads its own positions.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from difill import default_model_path
from difill.inference.loader import ModelLoadError, load_model, model_config
from difill.inference.model import CanvasKV, HalfWeightLinear, Int8WeightLinear, KVCache, Transformer, rotary_tables
from difill.inference.sampler import Cancelled, Denoise, SamplerSettings, StepView
from difill.inference.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger(__name__)

__all__ = ["Engine", "InfillRequest", "InfillResult", "Cancelled", "ModelLoadError", "EngineSettings", "TorchDenoiser"]

MODES = ("line", "block", "auto")
# The cursor is inside a word: token healing takes the word's last tokens back (at most this
# many characters of them: a long identifier's start stays in the context).
_WORD_END = re.compile(r"\w\Z")
_WORD = re.compile(r"\w+")
HEAL_CHARS = 12
# The cursor after spaces inside a line (`x = `, `f(a, `): the tokenizer joins the last space to
# the word after it (` b`), so the prefix alone ends in a whitespace token that the model has
# rarely seen a word follow. Not after indentation: training cut whole lines and blocks there,
# with the prefix encoded apart (`\n    ` + `def`), and healing it measured worse (bench/README.md).
_SPACE_END = re.compile(r"\S[ \t]+\Z")
_PROBE = "a"  # a word character: how the whitespace is split when a word follows it
# Tokens that end an infill in the open checkpoints' vocabularies, besides the config's eos:
# DiffuCoder pads a finished answer with <|dlm_pad|>; chat-tuned models close with these.
OPEN_END_TOKENS = ("<|dlm_pad|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")
# Models below this size run fastest on one CPU thread (bench/README.md): a step is many small
# matrix products, and OpenMP's fork/join costs more than it saves, badly so when other
# processes (the editor, a build) keep the cores busy. Above it two threads pay even so: the
# 13.8M bundled model answers a cold line in 80 ms on two threads against 135 ms on one
# (bench/engine.py's threads section, idle 2-core CPU).
SMALL_MODEL_PARAMS = 10_000_000


@dataclass(frozen=True)
class InfillRequest:
    prefix: str
    suffix: str = ""
    language: str | None = None  # LSP languageId or a difill language name
    path: str | None = None  # file name, used when language is None
    max_tokens: int | None = None  # default: settings.line_max_tokens or settings.block_tokens
    mode: str = "auto"  # "line" | "block" | "auto" (from the cursor's syntactic position)
    steps: int | None = None  # None: threshold decoding
    candidates: int = 1
    seed: int = 0
    document_key: str | None = None  # enables keystroke-to-keystroke cache reuse
    constrain_syntax: bool | None = None  # None: settings.constrain_syntax

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not isinstance(self.suffix, str):
            raise ValueError("prefix and suffix must be strings")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.max_tokens is not None and not 1 <= self.max_tokens <= 1024:
            raise ValueError(f"max_tokens must be between 1 and 1024, not {self.max_tokens}")
        if self.steps is not None and not 1 <= self.steps <= 1024:
            raise ValueError(f"steps must be between 1 and 1024, not {self.steps}")
        if not 1 <= self.candidates <= 8:
            raise ValueError(f"candidates must be between 1 and 8, not {self.candidates}")


@dataclass
class InfillResult:
    completion: str
    candidates: list[str]
    steps: int
    tokens: int
    latency_ms: float
    mode: str
    language: str | None
    cached_tokens: int = 0  # context tokens reused from the cache
    parse_ms: float = 0.0  # time the syntax critic spent parsing
    syntax_valid: bool | None = None  # the constraint's final check of completion (None: not checked)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class EngineSettings:
    prefix_tokens: int | None = None  # None: what the model was trained with (config "context_tokens")
    suffix_tokens: int | None = None
    line_tokens: int = 16  # canvas of a single-line completion
    # Most tokens of a single-line completion: a line that fills its canvas without ending goes
    # on in another canvas of line_tokens (12% of the FIM set's single-line holes are longer than
    # 16 tokens, and could not be completed whole before).
    line_max_tokens: int = 48
    block_tokens: int = 64  # most tokens of a multi-line completion
    canvas_tokens: int = 32  # one block of the canvas; it grows block by block
    threshold: float = 0.9
    policy: str = "confidence"
    # Semi-autoregressive decoding: each step commits the leftmost masked position and the sure
    # ones among the first ``window`` (SamplerSettings.window), in every mode. None: what the
    # model's config recommends ("decode_window" in its extra settings: a number, or one per mode
    # such as {"line": null, "block": 1}, chosen by measurement for the bundled model), else off;
    # 0: off (pure threshold decoding, the most confident position first).
    window: int | None = None
    remask_below: float | None = None
    # Steps between full forward passes; in between a step runs over part of the input and reads
    # the rest's keys and values from an earlier step (Fast-dLLM's approximate caches).
    # Bidirectional models: the canvas only, over prefix and suffix keys. Block models (torch
    # backend): the canvas positions that changed or are predicted (CanvasKV); 64-token blocks
    # 1.3x faster at 4, the same quality on the FIM set (bench/README.md). 1: exact.
    refresh_every: int = 4
    constrain_syntax: bool = True
    cache_bytes: int = 256 * 2**20  # memory bound of the per-document context caches
    prefix_quantum_lines: int = 4  # the prefix starts on a multiple of this line (cache stability)
    fill_after_end: bool = True  # an end-of-infill token fills the rest of its canvas at once
    stop_at_stutter: bool = True  # a block that repeats a line ends the infill (trimming would cut there)
    threads: int | None = None  # torch CPU threads; None: 1 for small models (Engine.load), else torch's default
    # Weights and activations of the torch backend: "float32", "bfloat16" or "float16"; None:
    # bfloat16 on CUDA, float16 on the CPU (default_dtype). float16 on the CPU rounds only the
    # weights and keeps float32 arithmetic (HalfWeightLinear): a step reads half the bytes, a warm
    # line is 1.47x and a 64-token block 1.39x faster on a 2-core AMD EPYC, and the FIM set's 600
    # cases complete exactly as with float32 (bench/README.md). bfloat16 on a CPU with AMX
    # tiles is 1.15x faster per warm request, 1.4-1.7x per cold one and 1.5x per batch, but rounds
    # activations differently between a cached and a fresh context, so a completion is no longer
    # bit-reproducible across the two: an opt-in for throughput (serve-model --dtype bfloat16).
    # "int8" (CPU): int8 weights and activations quantized per product, after SmoothQuant
    # (Int8WeightLinear, Transformer.smooth_activations): a warm line 1.2x, a 64-token block
    # 1.15-1.4x and a cold request 1.25-1.8x faster than float16 on the AMD EPYC (three runs), at
    # 9.7% against 10.0% exact on the FIM set. An opt-in: a product's activation scale depends on every row in it, so a
    # completion depends on what was batched or cached with it, as with bfloat16.
    dtype: str | None = None
    # Token healing: where the cursor is inside a word (`wrap_text(ar|`), the prefix's tokens of
    # that word ("ar"; at most HEAL_CHARS characters) are taken back and the canvas must start
    # with their text ("args"), so the model continues from a token boundary it has seen rather
    # than from a word split in two, and chooses the word's tokenization itself. After a space
    # inside a line (`x = |`), the canvas starts with that space (` b`), or ends.
    heal_tokens: bool = True
    use_kernels: bool = True  # CUDA only: the fused kernels of difill.kernels when they are installed
    onnx_int8: bool = False  # --backend onnx on the CPU: int8 weights (bench/README.md: speed and agreement)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Weight types the torch backend keeps packed for the CPU: loaded as float32, then packed.
CPU_PACKED_WEIGHTS = {"float16": HalfWeightLinear, "int8": Int8WeightLinear}
WEIGHT_TYPES = [*DTYPES, "int8"]


def default_dtype(device: str, backend: str = "torch") -> str:
    """bfloat16 on CUDA; float16 weights (float32 arithmetic) for torch on the CPU where FBGEMM
    serves them, else float32. ONNX Runtime exports from the float32 model."""
    if device == "cuda":
        return "bfloat16"
    return "float16" if backend == "torch" and HalfWeightLinear.available() else "float32"


# Resident bytes per parameter while a model loads on the CPU, by weight type: float16 keeps a
# float32 copy for prefills beside the packed half-precision weights; int8 is packed from float32.
CPU_BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 6, "int8": 5}


def memory_available() -> int | None:
    """Bytes this process can still take: /proc/meminfo's MemAvailable, or less where a cgroup
    (a container) caps it lower; None where neither can be read (not Linux)."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def _count(n_params: int) -> str:
    return f"{n_params / 1e9:.2f}B" if n_params >= 1e9 else f"{n_params / 1e6:.1f}M"


def cpu_weights_that_fit(weights: str, n_params: int, available: int | None, chosen_by_user: bool) -> str:
    """The weight type to load a model on the CPU in. The default float16 form takes 1.5x the
    float32 weights (a 7B model: ~39 GiB): where it would not fit, the default becomes bfloat16,
    the smallest form. Where the user's choice or even bfloat16 does not fit, a clear error
    rather than the kernel's out-of-memory killer ending the server in the middle of a load."""
    def need(kind: str) -> int:
        return n_params * CPU_BYTES_PER_PARAM[kind]

    if available is None or need(weights) <= available:
        return weights
    if not chosen_by_user and need("bfloat16") <= available:
        log.warning("%s parameters as %s weights need %s, %s is available: loading bfloat16 weights (%s; slower "
                    "where the CPU lacks AMX)", _count(n_params), weights, _size(need(weights)), _size(available),
                    _size(need("bfloat16")))
        return "bfloat16"
    hint = f"; bfloat16 weights need the least, {_size(need('bfloat16'))}" if weights != "bfloat16" else ""
    raise ModelLoadError(f"{_count(n_params)} parameters as {weights} weights need about {_size(need(weights))} "
                         f"of memory, and {_size(max(0, available))} is available{hint}")


def calibration_ids(tokenizer: Tokenizer, tokens: int = 1024, per_file: int = 256) -> torch.Tensor:
    """Code to measure activations on before int8 quantization (Transformer.smooth_activations):
    the first lines of difill.inference's own modules, which every installation has. Which code
    matters little: the stdlib's gave the same agreement with float32 (bench/README.md)."""
    ids: list[int] = []
    for source in sorted(Path(__file__).parent.glob("*.py")):
        ids += tokenizer.encode(source.read_text(encoding="utf-8"))[:per_file]
    return torch.tensor(ids[:tokens])


def cpu_has_bfloat16_units() -> bool:
    """AMX tiles: oneDNN runs bfloat16 matrix products on them (elsewhere it emulates them)."""
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)  # private in torch 2.x: absent means no
    return bool(has_amx())


class TorchDenoiser:
    """The two calls a denoising loop makes, on the PyTorch model. Other backends (ONNX
    Runtime) and GPU kernels provide the same two methods."""

    name = "torch"

    def __init__(self, model: Transformer):
        self.model = model

    def prefill(self, cache: KVCache, ids: torch.Tensor, positions: torch.Tensor) -> None:
        """Run context tokens ``ids`` [1, T] causally after the cache, appending their keys and values."""
        self.model.hidden_states(ids, positions, cache=cache, causal=True, store=True, cache_only=True)

    def canvas_logits(self, cache: KVCache | None, canvas: torch.Tensor, positions: torch.Tensor,
                      select: torch.Tensor | None = None, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [N, V] at the ``select``ed canvas positions (all [B, M, V] when None).

        Only the selected rows go through the output head: on a small model the head over an
        8k vocabulary is a third of a step, and most canvas positions are settled after a few steps.
        """
        hidden = self.model.hidden_states(canvas, positions, cache=cache, key_valid=key_valid)
        if select is not None:
            hidden = hidden[select.to(hidden.device)]
        return self.model.logits(hidden)


@dataclass
class _CacheEntry:
    ids: list[int]
    cache: KVCache


@dataclass
class _Context:
    """The tokens around the canvas: ``before`` precedes it, ``after`` follows it (open dLLMs).

    ``heal``: the text of the prefix's last token when it was taken back (token healing, see
    ``EngineSettings.heal_tokens``): the canvas must start with it."""

    before: list[int]
    after: list[int] = field(default_factory=list)
    heal: str = ""


@dataclass
class _Job:
    """One request on its way through the denoising loop."""

    request: InfillRequest
    language: object
    mode: str
    max_tokens: int
    critics: list
    is_end: torch.Tensor
    generator: torch.Generator
    state: dict
    start: float
    outputs: list[list[int]] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    steps: int = 0
    done: bool = False
    latency_ms: float = 0.0
    cancel: Callable[[], bool] | None = None  # per request, in a batch (infill_batch)
    window: int | None = None  # the decoding window of its mode (Engine.decode_windows)
    cancelled: bool = False
    heal: str = ""  # the prefix's partial word taken back: the outputs start with it (token healing)

    @property
    def prefix(self) -> str:
        """The prefix the model continues: the request's, less the text taken back for healing."""
        return self.request.prefix[: len(self.request.prefix) - len(self.heal)]

    @property
    def rows(self) -> int:
        return self.request.candidates


class _NoGrammars:
    """Stands in for :mod:`difill.grammars` while it is not installed: no language, the mode
    from the cursor line, line completions cut at the first newline, no syntax critic."""

    SyntaxCritic = None

    @staticmethod
    def language_for(language_id=None, path=None):
        return None

    @staticmethod
    def decide_mode(prefix: str, suffix: str, language) -> str:
        before = prefix[prefix.rfind("\n") + 1:]
        after = suffix.split("\n", 1)[0]
        return "block" if not before.strip() and not after.strip() else "line"

    @staticmethod
    def trim_completion(prefix: str, completion: str, suffix: str, language, mode: str) -> str:
        return completion.split("\n", 1)[0] if mode == "line" else completion

    @staticmethod
    def stop_at_stutter(prefix: str, text: str) -> str:
        return text


_warned_no_grammars = False


def _grammars():
    """difill.grammars when it provides its API, else :class:`_NoGrammars` (logged once)."""
    global _warned_no_grammars
    try:
        from difill import grammars
    except ImportError:
        grammars = None
    if grammars is not None and all(hasattr(grammars, n) for n in ("language_for", "decide_mode", "trim_completion", "stop_at_stutter")):
        return grammars
    if not _warned_no_grammars:
        log.warning("difill.grammars is not available: completing without languages or the syntax constraint")
        _warned_no_grammars = True
    return _NoGrammars


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, name: str = "model", device: str = "cpu",
                 backend: str = "torch", settings: EngineSettings | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.backend = backend
        self.settings = settings or EngineSettings()
        self.denoiser = TorchDenoiser(model)
        c = model.config
        self.block_layout = c.attention == "block" and c.prefix_token_id is not None
        self.context_tokens = int(c.extra.get("context_tokens", 1024))
        self.default_suffix_tokens = int(c.extra.get("suffix_tokens", 256))
        recommended = c.extra.get("decode_window")
        if self.settings.window is not None:
            recommended = self.settings.window
        per_mode = recommended if isinstance(recommended, dict) else dict.fromkeys(("line", "block"), recommended)
        self.decode_windows: dict[str, int | None] = {mode: int(per_mode[mode]) if per_mode.get(mode) else None
                                                      for mode in ("line", "block")}
        vocab = c.vocab_size
        pieces = tokenizer.pieces()
        end_ids = {c.end_token_id, *[int(i) for i in c.extra.get("end_token_ids", [])]}
        if not self.block_layout:
            end_ids |= {i for i in (tokenizer.token_id(t) for t in OPEN_END_TOKENS) if i is not None}
        self.end_ids = sorted(i for i in end_ids if 0 <= i < vocab)
        self._end = torch.zeros(vocab, dtype=torch.bool)
        self._end[self.end_ids] = True
        self._newline_end = self._end.clone()
        newline = [i for i in range(min(vocab, len(pieces))) if "\n" in pieces[i]]
        self._newline_end[newline] = True
        self._banned = torch.zeros(vocab, dtype=torch.bool)
        for special in (c.mask_token_id, c.pad_token_id, c.bos_token_id, c.prefix_token_id, c.suffix_token_id, c.middle_token_id):
            if special is not None and special not in end_ids and 0 <= special < vocab:
                self._banned[special] = True
        if tokenizer.vocab_size < vocab:  # padded embedding rows that no text maps to
            self._banned[tokenizer.vocab_size:] = True
        self._caches: OrderedDict[str, _CacheEntry] = OrderedDict()
        self._healing: dict[str, tuple[torch.Tensor, bool]] = {}  # _heal_allowed's answers
        self._healing_stops = {c.prefix_token_id, c.suffix_token_id, c.middle_token_id, c.bos_token_id}
        self._lock = threading.Lock()
        # difill.kernels (issue 9): Triton canvas attention and fused head + confidence, CUDA only;
        # EngineSettings.use_kernels=False or DIFILL_KERNELS=0 turns them off.
        self.use_kernels = False
        if device == "cuda" and self.settings.use_kernels:
            from difill.kernels import kernels_enabled
            from difill.kernels.hooks import set_canvas_attention

            self.use_kernels = kernels_enabled(device)
            set_canvas_attention(model, self.use_kernels)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model: str | Path | None = None, backend: str = "torch", device: str = "cpu",
             settings: EngineSettings | None = None) -> "Engine":
        """Load a model directory (default: the bundled model). Errors name the file at fault."""
        directory = Path(model) if model else default_model_path()
        if backend not in {"torch", "onnx", "onnx-int8"}:
            raise ValueError(f"unknown backend {backend!r} (torch, onnx, onnx-int8)")
        settings = settings or EngineSettings()
        if backend == "onnx-int8":  # ONNX Runtime with int8 weights (CPU)
            backend, settings = "onnx", replace(settings, onnx_int8=True)
        if device not in {"cpu", "cuda"}:
            raise ValueError(f"unknown device {device!r} (cpu, cuda)")
        if device == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("--device cuda: no CUDA device is available to PyTorch on this machine")
        # The tokenizer first: a missing tokenizer.json should not wait for gigabytes of weights.
        if not (directory / "config.json").is_file():
            load_model(directory)  # raises the precise ModelLoadError (no directory, no config)
        try:
            tokenizer = Tokenizer.from_file(directory / "tokenizer.json")
        except TokenizerError as exc:
            raise ModelLoadError(str(exc)) from exc
        if settings.dtype not in (None, *WEIGHT_TYPES):
            raise ValueError(f"unknown dtype {settings.dtype!r} ({', '.join(WEIGHT_TYPES)})")
        if settings.dtype and backend != "torch":
            raise ValueError(f"dtype {settings.dtype!r} is for the torch backend; ONNX Runtime runs float32 or int8 weights")
        if settings.dtype == "int8" and device != "cpu":
            raise ValueError("dtype 'int8' is for the CPU (FBGEMM's int8 GEMM); CUDA runs bfloat16 or float16")
        weights = settings.dtype or default_dtype(device, backend)
        if device == "cpu" and backend == "torch":
            n_params = model_config(directory).n_params()
            try:
                weights = cpu_weights_that_fit(weights, n_params, memory_available(), settings.dtype is not None)
            except ModelLoadError as exc:
                raise ModelLoadError(f"{directory}: {exc}") from exc
        if weights == "bfloat16" and device == "cpu" and not cpu_has_bfloat16_units():
            log.warning("bfloat16 on a CPU without AMX tiles is emulated and slower than float32")
        # float16 and int8 on the CPU: packed weights under float32 (float16) or integer (int8)
        # arithmetic, whose products FBGEMM serves (the CPU's own half-precision arithmetic is
        # slow): loaded as float32 and packed below.
        packed = CPU_PACKED_WEIGHTS.get(weights) if device == "cpu" else None
        net = load_model(directory, device=device, dtype=torch.float32 if packed else DTYPES[weights])
        # The engine only runs inference: fewer, larger matrix products. The head stays as it is on
        # CUDA, where difill.kernels reads it [V, d] and cuBLAS gains nothing from a transpose.
        net.fuse_projections(head=device == "cpu")
        if packed is Int8WeightLinear and packed.available() and HalfWeightLinear.available():
            net.smooth_activations(calibration_ids(tokenizer)).pack_int8_weights()
        elif packed is HalfWeightLinear and packed.available():
            net.pack_half_weights()
        elif packed:
            log.warning("%s weights need FBGEMM, which this torch build lacks: using float32", weights)
        if tokenizer.vocab_size > net.config.vocab_size:
            raise ModelLoadError(f"{directory / 'tokenizer.json'}: {tokenizer.vocab_size} tokens, more than the model's "
                                 f"vocabulary of {net.config.vocab_size} (config.json): tokenizer and weights do not match")
        n_params = net.config.n_params()
        threads = settings.threads
        if threads is None and device == "cpu" and n_params < SMALL_MODEL_PARAMS:
            threads = 1
        if threads:
            torch.set_num_threads(threads)
        engine = cls(net, tokenizer, name=directory.name, device=device,
                     backend="onnx-int8" if backend == "onnx" and settings.onnx_int8 and device == "cpu" else backend,
                     settings=settings)
        if backend == "onnx":
            if not engine.block_layout:
                raise ModelLoadError(f"{directory}: --backend onnx runs difill's block-layout models; this "
                                     f"{net.config.attention} model needs --backend torch")
            from difill.inference.onnx_backend import OnnxDenoiser

            engine.denoiser = OnnxDenoiser.for_engine(engine, directory)
        log.info("loaded %s (%.1fM parameters, %s, %s, %d threads)", directory, engine.n_params / 1e6, backend, device,
                 torch.get_num_threads())
        return engine

    @property
    def n_params(self) -> int:
        """The model's parameters (the inference form's untied head copy not counted)."""
        return self.model.config.n_params()

    @property
    def dtype(self) -> str:
        """The torch model's weight type: "float16" or "int8" where the CPU model holds packed weights."""
        for name, packed in CPU_PACKED_WEIGHTS.items():
            if isinstance(self.model.lm_head, packed):
                return name
        return str(self.model.lm_head.weight.dtype).removeprefix("torch.")

    def describe(self) -> dict:
        c = self.model.config
        return {"model": self.name, "parameters": self.n_params, "attention": c.attention, "backend": self.backend,
                "device": self.device, "dtype": self.dtype,
                "vocab_size": c.vocab_size, "layers": c.n_layers, "hidden_size": c.hidden_size,
                "context_tokens": self.context_tokens, "decode_windows": self.decode_windows,
                "threads": torch.get_num_threads(),
                "cached_documents": len(self._caches), "cache_bytes": self.cache_bytes()}

    # ------------------------------------------------------------------ public API
    def infill(self, request: InfillRequest, cancel: Callable[[], bool] | None = None,
               on_step: Callable[[StepView], None] | None = None) -> InfillResult:
        """Complete one request. ``cancel`` is polled between steps (raises :class:`Cancelled`)."""
        with self._lock, torch.inference_mode():
            job = self._start(request)
            self._denoise([job], cancel, on_step)
            return self._result(job)

    def infill_batch(self, requests: Sequence[InfillRequest],
                     cancels: Sequence[Callable[[], bool] | None] | None = None) -> list[InfillResult | Exception]:
        """Complete several requests together: one forward pass per denoising step for all of
        them (block-layout models; open dLLMs run one after the other). A request that fails
        yields its exception in its slot; the others still complete. Each result's latency is
        the time from the start of the batch until that request finished.

        ``cancels`` (one per request, polled between steps): a request whose flag turns true
        stops denoising and gets :class:`Cancelled` in its slot, while the rest of the batch goes
        on (a client of the shared service disconnected)."""
        if cancels is not None and len(cancels) != len(requests):
            raise ValueError(f"need one cancel flag per request, got {len(cancels)} for {len(requests)}")
        results: list[InfillResult | Exception | None] = [None] * len(requests)
        with self._lock, torch.inference_mode():
            jobs: list[tuple[int, _Job]] = []
            keys_seen: set[str] = set()
            for i, request in enumerate(requests):
                try:
                    if request.document_key in keys_seen:  # one cache per document: the second one goes without
                        request = _replace(request, document_key=None)
                    if request.document_key:
                        keys_seen.add(request.document_key)
                    job = self._start(request)
                    job.cancel = cancels[i] if cancels is not None else None
                    jobs.append((i, job))
                except (ValueError, RuntimeError) as exc:
                    results[i] = exc
            if self.block_layout:
                groups: dict[tuple[int | None, int | None], list[tuple[int, _Job]]] = {}
                for i, job in jobs:  # one sampler setting per forward pass: group by steps and window
                    groups.setdefault((job.request.steps, job.window), []).append((i, job))
                batches = list(groups.values())
            else:
                batches = [[pair] for pair in jobs]
            for batch in batches:
                try:
                    self._denoise([job for _, job in batch], None, None)
                    for i, job in batch:
                        results[i] = Cancelled() if job.cancelled else self._result(job)
                except (ValueError, RuntimeError) as exc:
                    for i, _ in batch:
                        results[i] = exc
        return results  # type: ignore[return-value]

    def infill_many(self, requests: Sequence[InfillRequest]) -> list[InfillResult | Exception]:
        """Complete several requests (batched, see :meth:`infill_batch`)."""
        return self.infill_batch(requests)

    def forget(self, document_key: str) -> None:
        """Drop a document's cache (it was closed)."""
        with self._lock:
            self._caches.pop(document_key, None)

    def cache_bytes(self) -> int:
        return sum(entry.cache.nbytes() for entry in list(self._caches.values()))

    # ------------------------------------------------------------------ one request
    def _start(self, request: InfillRequest) -> _Job:
        """Decide mode and budget, encode the context and bring its cache up to date."""
        start = time.perf_counter()
        grammars = _grammars()
        s = self.settings
        language = grammars.language_for(request.language, request.path)
        if language is None and (request.language or request.path):
            log.debug("no grammar for language %r / %r: completing without the syntax constraint", request.language, request.path)
        mode = request.mode if request.mode != "auto" else grammars.decide_mode(request.prefix, request.suffix, language)
        max_tokens = request.max_tokens or (s.line_max_tokens if mode == "line" else s.block_tokens)
        constrain = (s.constrain_syntax if request.constrain_syntax is None else request.constrain_syntax) and language is not None
        context = self._encode_context(request.prefix, request.suffix)
        # The critics judge the canvas after the prefix the model continues (less the healed text).
        prefix = request.prefix[: len(request.prefix) - len(context.heal)]
        critic_class = getattr(grammars, "SyntaxCritic", None)
        critics = [critic_class(language, prefix, request.suffix, mode) for _ in range(request.candidates)] \
            if constrain and critic_class is not None else []
        state = self._prepare(context, request.document_key)
        job = _Job(request, language, mode, max_tokens, critics, self._newline_end if mode == "line" else self._end,
                   torch.Generator().manual_seed(request.seed), state, start, heal=context.heal)
        job.outputs = [[] for _ in range(request.candidates)]
        job.finished = [False] * request.candidates
        job.window = self.decode_windows[mode]
        return job

    def _result(self, job: _Job) -> InfillResult:
        grammars = _grammars()
        request = job.request
        finishing = time.perf_counter()
        texts = []
        for ids in job.outputs:
            text = self.tokenizer.decode(ids)
            texts.append(grammars.trim_completion(job.prefix, text, request.suffix, job.language, job.mode))
        syntax_valid = self._check_syntax(job, texts) if job.critics else None
        if job.heal:  # the text after the cursor: what the canvas wrote past the healed text
            texts = [text[len(job.heal):] if text.startswith(job.heal) else "" for text in texts]
        # Trimming and the final check are part of the wait, so they count in the latency.
        latency = (job.latency_ms or (finishing - job.start) * 1000) + (time.perf_counter() - finishing) * 1000
        parse_ms = sum(getattr(c, "parse_seconds", 0.0) for c in job.critics if c is not None) * 1000
        return InfillResult(texts[0], texts, job.steps, sum(len(o) for o in job.outputs), round(latency, 2), job.mode,
                            getattr(job.language, "name", None), job.state["reused"], round(parse_ms, 3), syntax_valid)

    @staticmethod
    def _check_syntax(job: _Job, texts: list[str]) -> bool:
        """The syntax constraint's last word on the trimmed texts, which may still break the file
        (a review budget or the step cap ran out, or trimming cut them). An invalid first text
        gives way to a valid candidate, else to its longest prefix that adds no new error; other
        invalid candidates are cut back the same way. An empty text adds nothing and is valid.
        Returns whether texts[0] was valid (False: nothing valid was found and it is dropped to "",
        and counted), so that an editor never shows a suggestion that breaks the file."""
        critics = job.critics
        valid = [not text.strip() or critics[k].is_valid(text) for k, text in enumerate(texts)]
        if not valid[0]:
            other = next((k for k in range(1, len(texts)) if valid[k] and texts[k].strip()), None)
            if other is not None:
                texts.insert(0, texts.pop(other))
                valid.insert(0, valid.pop(other))
        for k, text in enumerate(texts):
            if not valid[k]:
                shorter = critics[k].longest_valid_prefix(text)
                if shorter is not None:
                    texts[k], valid[k] = shorter, True
        if not valid[0] and not critics[0].is_valid(texts[0]):  # is_valid again: its problems, for the log
            log.info("dropping a completion that still adds a syntax error after the constraint: %r (%s)", texts[0],
                     "; ".join(p.reason for p in critics[0].last_problems))
        for k in range(len(texts)):  # the constraint never shows a suggestion that breaks the file
            if not valid[k]:
                texts[k] = ""
        return valid[0]

    def _sampler_settings(self, steps: int | None, window: int | None) -> SamplerSettings:
        s = self.settings
        return SamplerSettings(policy=s.policy, steps=steps, threshold=s.threshold, remask_below=s.remask_below,
                               window=window, temperature=0.8)  # read by the rows that sample (candidates after the first)

    def _denoise(self, jobs: list[_Job], cancel, on_step) -> None:
        """Block by block until every job has ended or reached its token budget."""
        s = self.settings
        c = self.model.config
        block = 0
        active = list(jobs)
        while active:
            for job in active:  # a cancelled request of a batch leaves it between blocks too
                if job.cancel is not None and job.cancel():
                    job.done = job.cancelled = True
            active = [j for j in active if not j.done]
            if not active:
                break
            lens: list[int] = []
            for job in active:
                produced = max(len(o) for o in job.outputs)
                width = s.canvas_tokens if job.mode == "block" else s.line_tokens
                lens += [max(1, min(width, job.max_tokens - produced))] * job.rows
            if self.block_layout:
                logits_fn = self._block_logits_fn(active, lens)
            else:
                logits_fn = self._bidirectional_logits_fn(active[0].state, lens[0])
            rows = len(lens)
            is_end = active[0].is_end if all(j.is_end is active[0].is_end for j in active) else \
                torch.stack([j.is_end for j in active for _ in range(j.rows)])
            # A later block goes on from the earlier ones: its critic judges them + the canvas.
            critics = [critic.continued([self.tokenizer.piece(t) for t in j.outputs[k]]) if critic is not None and j.outputs[k]
                       else critic for j in active for k, critic in enumerate(j.critics or [None] * j.rows)]
            confidence_fn = None
            if self.use_kernels and self.block_layout and len(active) == 1 and self.denoiser.name == "torch":
                from difill.kernels.hooks import make_confidence_fn  # difill.kernels (issue 9): no logits on the host

                confidence_fn = make_confidence_fn(self.model, active[0].state["cache"], max(lens), self._banned, s.policy)
            denoise = Denoise(logits_fn, c.mask_token_id, is_end, self._banned, self._sampler_settings(active[0].request.steps, active[0].window),
                              piece=self.tokenizer.piece, critics=critics if any(critics) else (), cancel=cancel,
                              row_cancel=[j.cancel for j in active for _ in range(j.rows)] if any(j.cancel for j in active) else (),
                              on_step=on_step, generators=[j.generator for j in active for _ in range(j.rows)],
                              fill_id=c.end_token_id if s.fill_after_end else None, confidence_fn=confidence_fn,
                              heal=[j.heal if block == 0 else None for j in active for _ in range(j.rows)],
                              heal_allowed=self._heal_allowed)
            sampled = [r > 0 for j in active for r in range(j.rows)]
            result = denoise.run(rows, lens, block=block, sampled=sampled)
            row = 0
            for job in active:
                rows_of_job = range(row, row + job.rows)
                row += job.rows
                if any(result.cancelled[r] for r in rows_of_job):
                    job.done = job.cancelled = True
                    continue
                job.steps += max(result.row_steps[r] for r in rows_of_job)
                for k, r in enumerate(rows_of_job):
                    if not job.finished[k]:
                        job.outputs[k].extend(result.tokens[r])
                        job.finished[k] = result.ended[r]
                if all(job.finished) or max(len(o) for o in job.outputs) >= job.max_tokens or job.rows > 1 \
                        or self._stutters(job):
                    # candidates diverge: one block each is what editors show
                    job.done = True
                    job.latency_ms = (time.perf_counter() - job.start) * 1000
                else:  # the canvas is full and the infill goes on: the block joins the context
                    self._extend(job.state, result.tokens[rows_of_job[0]])
            active = [j for j in active if not j.done]
            block += 1

    def _stutters(self, job: _Job) -> bool:
        """The text so far repeats a line: trimming cuts it there, so another block is wasted."""
        if not self.settings.stop_at_stutter:
            return False
        text = self.tokenizer.decode(job.outputs[0])
        return _grammars().stop_at_stutter(job.prefix, text) != text

    # ------------------------------------------------------------------ context
    def _budget_prefix(self, prefix: str, budget: int) -> list[int]:
        """The last ``budget`` tokens of the prefix, starting at a line start.

        The start must not move while the user types, or every keystroke would invalidate the
        cached context. So it is chosen from the lines *before* the cursor's line, leaving
        ``reserve`` tokens for the cursor's line (a multiple of 32 that covers it), and it sits on
        a multiple of ``prefix_quantum_lines``: it moves only when a line is added or the current
        line outgrows its reserve, and then by whole blocks of lines. Token counts are not
        monotonic in the typed characters (``pie`` is two tokens, ``piece`` one), which is why
        the cursor's line is kept out of the choice.
        """
        line_start = prefix.rfind("\n") + 1
        head, line = prefix[:line_start], prefix[line_start:]
        line_ids = self.tokenizer.encode(line[-budget * 8:])
        if len(line_ids) >= budget:  # one huge line
            return line_ids[-budget:]
        reserve = -(-max(1, len(line_ids)) // 32) * 32
        room = max(0, budget - reserve)
        if room == 0:  # a tiny budget: the cursor's line is all that fits
            return line_ids
        window = head[-room * 8:] if len(head) > room * 8 else head
        ids, offsets = self.tokenizer.encode_with_offsets(window)
        if len(ids) <= room and len(window) == len(head):
            start = 0
        else:
            first_fit = offsets[len(ids) - room][0] if len(ids) > room else 0
            start = window.find("\n", max(0, first_fit - 1)) + 1 if first_fit > 0 else 0
            start += len(head) - len(window)
            quantum = max(1, self.settings.prefix_quantum_lines)
            while 0 < start < len(head) and head.count("\n", 0, start) % quantum:
                start = head.find("\n", start) + 1
            start = start if 0 < start <= len(head) else len(head)
        while True:
            ids = self.tokenizer.encode(prefix[start:])
            if len(ids) <= budget or start >= line_start:
                return ids[-budget:]
            start = head.find("\n", start) + 1 or line_start

    def _budget_suffix(self, suffix: str, budget: int) -> list[int]:
        """The first ``budget`` tokens of the suffix, ending at a line end where one fits."""
        window = suffix[: budget * 8]
        ids, offsets = self.tokenizer.encode_with_offsets(window)
        if len(ids) > budget:
            # Cut at the last line end that the first ``budget`` tokens reach, then check the count
            # (tokens need not split the same way at a cut): one or two encodings, not one per line.
            cut = window.rfind("\n", 0, offsets[budget - 1][1]) + 1 if budget > 0 else 0
            if cut > 0:
                window = window[:cut]
                ids = self.tokenizer.encode(window)
        while len(ids) > budget and "\n" in window:
            window = window[: window.rstrip("\n").rfind("\n") + 1] if window.rstrip("\n").rfind("\n") >= 0 else ""
            ids = self.tokenizer.encode(window)
        return ids[:budget]

    def _encode_context(self, prefix: str, suffix: str) -> _Context:
        c = self.model.config
        s = self.settings
        suffix_budget = s.suffix_tokens or self.default_suffix_tokens
        prefix_budget = s.prefix_tokens or max(16, self.context_tokens - suffix_budget - 4)
        suffix_ids = self._budget_suffix(suffix, suffix_budget)
        prefix_ids = self._budget_prefix(prefix, prefix_budget)
        heal = ""
        if s.heal_tokens and _SPACE_END.search(prefix[prefix.rfind("\n") + 1:]):
            prefix_ids, heal = self._heal_space(prefix, prefix_ids)
        elif s.heal_tokens and _WORD_END.search(prefix):
            # The word's tokens from the end: the last one whatever it holds (` ar`), the ones
            # before it while they are word characters only (`_run` `_` `val` `i`).
            while prefix_ids and len(heal) < HEAL_CHARS and prefix_ids[-1] not in self._healing_stops:
                piece = self.tokenizer.piece(prefix_ids[-1])
                if not piece or not prefix.endswith(piece + heal) or (heal and not _WORD.fullmatch(piece)):
                    break  # a piece of a multi-byte character, or the word's start
                heal, prefix_ids = piece + heal, prefix_ids[:-1]
                if len(heal) >= HEAL_CHARS or not _WORD.fullmatch(piece):
                    break
        if self.block_layout:
            return _Context([c.suffix_token_id] + suffix_ids + [c.prefix_token_id] + prefix_ids + [c.middle_token_id], heal=heal)
        bos = [c.bos_token_id] if c.bos_token_id is not None else []
        return _Context(bos + prefix_ids, suffix_ids, heal=heal)

    def _heal_space(self, prefix: str, prefix_ids: list[int]) -> tuple[list[int], str]:
        """The prefix's last token when it is whitespace (`  ` after `x =`), encoded again as it
        is when a word follows it (` ` + ` a`): the tokens before the word stay in the prefix, and
        the whitespace the word's token starts with (` `) is what the canvas must start with."""
        if not prefix_ids or prefix_ids[-1] in self._healing_stops:
            return prefix_ids, ""
        piece = self.tokenizer.piece(prefix_ids[-1])
        if not piece or piece.strip() or not prefix.endswith(piece):
            return prefix_ids, ""
        again = self.tokenizer.encode(piece + _PROBE)
        kept = again[:-1]
        word = self.tokenizer.piece(again[-1]) if again else ""
        heal = word[: -len(_PROBE)] if word.endswith(_PROBE) else ""
        if not heal or "".join(self.tokenizer.piece(t) for t in kept) + heal != piece:
            return prefix_ids, ""  # the word's token takes none of the whitespace: nothing to heal
        return prefix_ids[:-1] + kept, heal

    def _heal_allowed(self, text: str) -> tuple[torch.Tensor, bool]:
        """The tokens that may come next in a canvas that must start with ``text`` ([V] bool):
        those whose text starts with it (`args` for `ar`), and the first token of its own encoding
        when that is shorter (`_` for `_vali`): the word may be split where the tokenizer splits
        it, not anywhere (` ` + `t` for ` t` is no split the model has seen). And whether each of
        them covers the whole text (no split: the rest of the canvas need not wait for it)."""
        entry = self._healing.get(text)
        if entry is None:
            allowed = torch.zeros(self.model.config.vocab_size, dtype=torch.bool)
            pieces = self.tokenizer.pieces()[: len(allowed)]
            allowed[[i for i, piece in enumerate(pieces) if piece.startswith(text)]] = True
            first = self.tokenizer.encode(text)[:1]
            split = bool(first) and first[0] < len(allowed) and 0 < len(pieces[first[0]]) < len(text) \
                and text.startswith(pieces[first[0]]) and not bool(self._banned[first[0]])
            if split:
                allowed[first[0]] = True
            allowed &= ~self._banned
            if not text.strip():  # after spaces there may be nothing to write: the infill may end
                allowed |= self._end
            if len(self._healing) >= 256:  # a word typed letter by letter asks for each of its prefixes
                self._healing.pop(next(iter(self._healing)))
            entry = self._healing[text] = (allowed, not split)
        return entry

    def _prepare(self, context: _Context, document_key: str | None) -> dict:
        """Block layout: an exact cache of the context, reusing the document's previous one."""
        if not self.block_layout:
            return {"context": _Context(list(context.before), list(context.after)), "cache": None, "reused": 0}
        entry = self._caches.pop(document_key, None) if document_key else None
        ids = context.before
        reused = 0
        if entry is not None:
            for a, b in zip(entry.ids, ids):
                if a != b:
                    break
                reused += 1
            reused = min(reused, len(ids) - 1)  # always run at least the last token
            entry.cache.truncate(reused)
            cache = entry.cache
        else:
            cache = self.model.new_cache()
        self._prefill(cache, ids[reused:], start=reused)
        if document_key:
            self._caches[document_key] = _CacheEntry(list(ids), cache)
            self._evict()
        return {"context": context, "cache": cache, "reused": reused, "ids": list(ids), "key": document_key}

    def _prefill(self, cache: KVCache, ids: list[int], start: int) -> None:
        if not ids:
            return
        tensor = torch.tensor([ids], device=self.device)
        positions = torch.arange(start, start + len(ids), device=self.device)
        self.denoiser.prefill(cache, tensor, positions)

    def _extend(self, state: dict, committed: list[int]) -> None:
        """The canvas block is final: append it to the context (the next block continues it)."""
        if self.block_layout:
            # The layout token <|middle|> stays last: re-run it after the new tokens.
            cache, ids = state["cache"], state["ids"]
            cache.truncate(len(ids) - 1)
            new = committed + [ids[-1]]
            self._prefill(cache, new, start=len(ids) - 1)
            state["ids"] = ids[:-1] + new
            if state.get("key"):
                self._caches[state["key"]] = _CacheEntry(list(state["ids"]), cache)
                self._evict()
        else:
            state["context"].before.extend(committed)

    # ------------------------------------------------------------------ logits
    def _block_logits_fn(self, jobs: list[_Job], lens: list[int]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Logits at the selected canvas positions of every row, the rows of each job reading
        that job's context cache. One job: its cache is shared by its rows (no copy). Several:
        the caches are stacked with left padding and a key mask; each row has its own positions."""
        device = self.device
        width = max(lens)
        if self.denoiser.name == "torch" and len(jobs) == 1:
            cache = jobs[0].state["cache"]
            positions = torch.arange(cache.length, cache.length + width, device=device)
            return _CanvasSteps(self.model, cache, positions, None, len(lens), width, self.settings.refresh_every)
        if len(jobs) == 1:
            cache = jobs[0].state["cache"]
            start = cache.length
            positions = torch.arange(start, start + width, device=device)

            def one_context(canvas: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
                rows = _live_rows(select)
                if rows is None:
                    return self.denoiser.canvas_logits(cache, canvas.to(device), positions, select)
                if len(rows) == 0:
                    return self._no_logits()
                return self.denoiser.canvas_logits(cache, canvas[rows].to(device), positions, select[rows])

            return one_context
        caches = [j.state["cache"] for j in jobs for _ in range(j.rows)]
        lengths = torch.tensor([cache.length for cache in caches], device=device)
        stacked, context_valid = KVCache.stack(caches)
        positions = lengths[:, None] + torch.arange(width, device=device)[None, :]
        canvas_valid = torch.arange(width, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
        key_valid = torch.cat([context_valid.to(device), canvas_valid], dim=1)
        if bool(key_valid.all()):
            key_valid = None  # equal lengths: no mask, the fast attention path
        if self.denoiser.name == "torch":
            return _CanvasSteps(self.model, stacked, positions, key_valid, len(lens), width, self.settings.refresh_every)

        subset: dict[tuple[int, ...], tuple[KVCache, torch.Tensor, torch.Tensor | None]] = {}

        def many_contexts(canvas: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
            rows = _live_rows(select)
            if rows is None:
                return self.denoiser.canvas_logits(stacked, canvas.to(device), positions, select, key_valid)
            if len(rows) == 0:
                return self._no_logits()
            key = tuple(rows.tolist())
            if key not in subset:  # rows only ever finish, so the previous subset is not needed again
                subset.clear()
                index = rows.to(device)
                cache = KVCache(len(stacked.keys))
                cache.keys = [k.index_select(0, index) for k in stacked.keys]
                cache.values = [v.index_select(0, index) for v in stacked.values]
                subset[key] = (cache, positions[index], key_valid[index] if key_valid is not None else None)
            cache, row_positions, row_keys = subset[key]
            return self.denoiser.canvas_logits(cache, canvas[rows].to(device), row_positions, select[rows], row_keys)

        return many_contexts

    def _no_logits(self) -> torch.Tensor:
        return torch.empty(0, self.model.config.vocab_size, device=self.device)

    def _bidirectional_logits_fn(self, state: dict, canvas_len: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Open dLLMs: full forward every ``refresh_every`` steps, canvas-only steps in between
        over the cached keys/values of prefix and suffix (approximate, as in Fast-dLLM)."""
        context = state["context"]
        shift = self.model.config.shift_logits
        before, after = context.before, context.after
        n_before = len(before)
        # With shifted logits, canvas token i is read at position i - 1: the window starts one early.
        window_start = n_before - 1 if shift else n_before
        window_len = canvas_len + (1 if shift else 0)
        total = n_before + canvas_len + len(after)
        keep = torch.tensor([i for i in range(total) if not window_start <= i < window_start + window_len], dtype=torch.long)
        before_t = torch.tensor([before], dtype=torch.long)
        after_t = torch.tensor([after], dtype=torch.long)
        memo: dict = {"cache": None, "age": 0}
        device = self.device
        model = self.model

        def bidirectional_logits(canvas: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
            b = canvas.shape[0]
            full = torch.cat([before_t.expand(b, -1), canvas, after_t.expand(b, -1)], dim=1).to(device)
            if memo["cache"] is None or memo["age"] >= self.settings.refresh_every:
                cache = model.new_cache()
                hidden = model.hidden_states(full, torch.arange(total, device=device), cache=cache, store=True)
                index = keep.to(device)
                for layer in range(len(cache.keys)):
                    cache.keys[layer] = cache.keys[layer][:1, :, index]
                    cache.values[layer] = cache.values[layer][:1, :, index]
                memo.update(cache=cache, age=1)
                window_hidden = hidden[:, window_start: window_start + window_len]
            else:
                memo["age"] += 1
                window = full[:, window_start: window_start + window_len]
                # The cache holds the keys of every position outside the window, rotated at their
                # true positions; attention is bidirectional, so their order does not matter.
                positions = torch.arange(window_start, window_start + window_len, device=device)
                window_hidden = model.hidden_states(window, positions, cache=memo["cache"])
            if shift:
                window_hidden = window_hidden[:, :-1]
            return model.logits(window_hidden[select.to(window_hidden.device)])

        return bidirectional_logits

    def _evict(self) -> None:
        while len(self._caches) > 1 and self.cache_bytes() > self.settings.cache_bytes:
            key, _ = self._caches.popitem(last=False)
            log.debug("context cache over %d bytes: dropped %s", self.settings.cache_bytes, key)


class _CanvasSteps:
    """The torch backend's canvas steps of one block (a LogitsFn) over a :class:`CanvasKV`.

    Every ``refresh_every`` steps the transformer runs over every canvas position; in between
    only over the positions whose token changed since their keys were computed and those whose
    logits the sampler needs, the others' keys and values coming from the buffer (Fast-dLLM's
    approximate reuse; ``refresh_every=1`` is exact). Rows that finished leave the buffer: in a
    batch of requests they would otherwise cost as much as the slowest row until the block ends.
    """

    def __init__(self, model: Transformer, context: KVCache, positions: torch.Tensor, key_valid: torch.Tensor | None,
                 rows: int, width: int, refresh_every: int):
        self.model, self.positions, self.key_valid = model, positions, key_valid  # positions [W] or [B, W]
        self.rotary = rotary_tables(model.config.head_dim, positions, model.config.rope_theta)
        self.kv = CanvasKV(context, rows, width)
        self.rows = torch.arange(rows)  # the rows the buffer holds
        self.written: torch.Tensor | None = None  # [rows, W]: the tokens whose keys the buffer holds
        self.refresh_every = max(1, refresh_every)
        self.age = 0

    def __call__(self, canvas: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
        live = select.any(dim=1).nonzero()[:, 0]
        if len(live) == 0:
            return torch.empty(0, self.model.config.vocab_size, device=self.positions.device)
        if len(live) < len(self.rows):  # rows only ever finish: live is a subset of self.rows
            self._keep(torch.searchsorted(self.rows, live))
            self.rows = live
        canvas, select = canvas[self.rows], select[self.rows]
        device = self.positions.device
        if self.written is None or self.age % self.refresh_every == 0:
            columns, fresh = torch.arange(canvas.shape[1]), None
            self.written = canvas.clone()
        else:
            needed = (canvas != self.written) | select  # per row; the step runs the union
            columns = needed.any(dim=0).nonzero()[:, 0]
            fresh = needed[:, columns]
            self.written[:, columns] = torch.where(fresh, canvas[:, columns], self.written[:, columns])
        self.age += 1
        self.kv.columns = columns.to(device)
        self.kv.fresh = None if fresh is None or bool(fresh.all()) else fresh.to(device)
        index = self.kv.columns
        rotary = tuple(t.index_select(-2, index) for t in self.rotary)  # [W, D] or [B, 1, W, D]
        hidden = self.model.hidden_states(canvas[:, columns].to(device), self.positions[..., index], cache=self.kv,
                                          key_valid=self.key_valid, rotary=rotary)
        return self.model.logits(hidden[select[:, columns].to(device)])

    def _keep(self, index: torch.Tensor) -> None:
        self.kv.select_rows(index.to(self.positions.device))
        self.written = self.written[index] if self.written is not None else None
        if self.positions.dim() == 2:
            self.positions = self.positions[index.to(self.positions.device)]
            self.rotary = tuple(t[index.to(t.device)] for t in self.rotary)
        if self.key_valid is not None:
            self.key_valid = self.key_valid[index.to(self.key_valid.device)]


def _live_rows(select: torch.Tensor) -> torch.Tensor | None:
    """The rows of a denoising step that still have positions to predict, or None when all do.
    Rows that finished (or were cancelled) early leave the forward pass: in a batch of requests
    they would otherwise cost as much as the slowest row until the block ends."""
    live = select.any(dim=1)
    return None if bool(live.all()) else live.nonzero()[:, 0]


def render_canvas(tokenizer, view: StepView, mask_id: int, end_id: int, placeholder: str = "░") -> list[str]:
    """Text of each canvas row of a step, as an editor shows the "diffusion view": committed runs
    decoded together (so multi-token characters decode), one ``placeholder`` per still-masked
    position, cut at the end-of-infill token, and without the word that token healing rewrites
    (the text before the cursor)."""
    texts = []
    for r, row in enumerate(view.canvas):
        if end_id in row:
            row = row[: row.index(end_id)]
        parts: list[str] = []
        run: list[int] = []
        for token in row:
            if token == mask_id:
                if run:
                    parts.append(tokenizer.decode(run))
                    run = []
                parts.append(placeholder)
            else:
                run.append(token)
        if run:
            parts.append(tokenizer.decode(run))
        text = "".join(parts)
        heal = view.heal[r] if r < len(view.heal) else ""
        written = len(os.path.commonprefix([text, heal]))  # all of it, once the word is written
        texts.append(text[written:])
    return texts


def _replace(request: InfillRequest, **changes) -> InfillRequest:
    return replace(request, **changes)
