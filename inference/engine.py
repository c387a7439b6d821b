"""The engine: from (prefix, suffix, language) to a completion, fast.

It owns the model, the tokenizer, the context caches and the denoising loop, and is the one
object that the CLI, the language server and the benchmarks talk to::

    engine = Engine.load()                      # the bundled model on the CPU
    result = engine.infill(InfillRequest(prefix="def add(a, b):\\n    return ", suffix="\\n"))
    result.completion, result.latency_ms, result.steps, result.tokens

Two context layouts, chosen by the model:

* difill's block layout ``<|suffix|> suffix <|prefix|> prefix <|middle|> [canvas]``: the
  context is causal, so its cache is exact; with the suffix first, typing only appends to the
  prefix, and a request for the same document (``document_key``) re-encodes only what changed.
* the open dLLM layout ``[bos] prefix [canvas] suffix`` with bidirectional attention: the
  context's keys and values are taken from a full forward pass and reused for
  ``refresh_every`` steps (Fast-dLLM's approximate dual cache).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from difill import default_model_path
from difill.inference.loader import ModelLoadError, load_model
from difill.inference.model import KVCache, Transformer
from difill.inference.sampler import Cancelled, Critic, Denoise, SamplerSettings, StepView
from difill.inference.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger(__name__)

__all__ = ["Engine", "InfillRequest", "InfillResult", "Cancelled", "ModelLoadError", "EngineSettings"]

MODES = ("line", "block", "auto")


@dataclass(frozen=True)
class InfillRequest:
    prefix: str
    suffix: str = ""
    language: str | None = None  # LSP languageId or a difill language name
    path: str | None = None  # file name, used when language is None
    max_tokens: int | None = None  # default: settings.line_tokens or settings.block_tokens
    mode: str = "auto"  # "line" | "block" | "auto" (from the cursor's syntactic position)
    steps: int | None = None  # None: threshold decoding
    candidates: int = 1
    seed: int = 0
    document_key: str | None = None  # enables keystroke-to-keystroke cache reuse
    constrain_syntax: bool | None = None  # None: settings.constrain_syntax

    def __post_init__(self) -> None:
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

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class EngineSettings:
    prefix_tokens: int | None = None  # None: what the model was trained with (config "context_tokens")
    suffix_tokens: int | None = None
    line_tokens: int = 16  # canvas of a single-line completion
    block_tokens: int = 64  # most tokens of a multi-line completion
    canvas_tokens: int = 32  # one block of the canvas; it grows block by block
    threshold: float = 0.9
    policy: str = "confidence"
    remask_below: float | None = None
    refresh_every: int = 4  # bidirectional models: steps between full forward passes
    constrain_syntax: bool = True
    cache_bytes: int = 256 * 2**20  # memory bound of the per-document context caches
    prefix_quantum_lines: int = 4  # the prefix starts on a multiple of this line (cache stability)


@dataclass
class _CacheEntry:
    ids: list[int]
    cache: KVCache


@dataclass
class _Context:
    """The tokens around the canvas: ``before`` precedes it, ``after`` follows it (open dLLMs)."""

    before: list[int]
    after: list[int] = field(default_factory=list)


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, name: str = "model", device: str = "cpu",
                 backend: str = "torch", settings: EngineSettings | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.backend = backend
        self.settings = settings or EngineSettings()
        c = model.config
        self.block_layout = c.attention == "block" and c.prefix_token_id is not None
        self.context_tokens = int(c.extra.get("context_tokens", 1024))
        self.default_suffix_tokens = int(c.extra.get("suffix_tokens", 256))
        vocab = c.vocab_size
        self._end = torch.zeros(vocab, dtype=torch.bool)
        self._end[c.end_token_id] = True
        self._newline_end = self._end.clone()
        for i in range(min(vocab, tokenizer.vocab_size)):
            if "\n" in tokenizer.piece(i):
                self._newline_end[i] = True
        self._banned = torch.zeros(vocab, dtype=torch.bool)
        for special in (c.mask_token_id, c.pad_token_id, c.bos_token_id, c.prefix_token_id, c.suffix_token_id, c.middle_token_id):
            if special is not None and special != c.end_token_id and special < vocab:
                self._banned[special] = True
        if tokenizer.vocab_size < vocab:  # padded embedding rows that no text maps to
            self._banned[tokenizer.vocab_size:] = True
        self._caches: OrderedDict[str, _CacheEntry] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model: str | Path | None = None, backend: str = "torch", device: str = "cpu",
             settings: EngineSettings | None = None) -> "Engine":
        """Load a model directory (default: the bundled model). Errors name the file at fault."""
        directory = Path(model) if model else default_model_path()
        if backend not in {"torch", "onnx"}:
            raise ValueError(f"unknown backend {backend!r} (torch, onnx)")
        if device not in {"cpu", "cuda"}:
            raise ValueError(f"unknown device {device!r} (cpu, cuda)")
        if device == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("--device cuda: no CUDA device is available to PyTorch on this machine")
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        net = load_model(directory, device=device, dtype=dtype)
        try:
            tokenizer = Tokenizer.from_file(directory / "tokenizer.json")
        except TokenizerError as exc:
            raise ModelLoadError(str(exc)) from exc
        engine = cls(net, tokenizer, name=directory.name, device=device, backend=backend, settings=settings)
        if backend == "onnx":
            from difill.inference.onnx_backend import OnnxDenoiser
            engine._onnx = OnnxDenoiser.for_engine(engine, directory)
        log.info("loaded %s (%.1fM parameters, %s, %s)", directory, engine.n_params / 1e6, backend, device)
        return engine

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> dict:
        c = self.model.config
        return {"model": self.name, "parameters": self.n_params, "attention": c.attention, "backend": self.backend,
                "device": self.device, "vocab_size": c.vocab_size, "layers": c.n_layers, "hidden_size": c.hidden_size,
                "context_tokens": self.context_tokens}

    # ------------------------------------------------------------------ public API
    def infill(self, request: InfillRequest, cancel: Callable[[], bool] | None = None,
               on_step: Callable[[StepView], None] | None = None) -> InfillResult:
        """Complete one request. ``cancel`` is polled between steps (raises :class:`Cancelled`)."""
        with self._lock, torch.inference_mode():
            return self._infill(request, cancel, on_step)

    def infill_many(self, requests: Sequence[InfillRequest]) -> list[InfillResult | Exception]:
        """Complete several requests; a failing one yields its exception, the others still run."""
        results: list[InfillResult | Exception] = []
        for request in requests:
            try:
                results.append(self.infill(request))
            except (ValueError, RuntimeError) as exc:
                results.append(exc)
        return results

    def forget(self, document_key: str) -> None:
        """Drop a document's cache (it was closed)."""
        with self._lock:
            self._caches.pop(document_key, None)

    def cache_bytes(self) -> int:
        return sum(entry.cache.nbytes() for entry in self._caches.values())

    # ------------------------------------------------------------------ internals
    def _infill(self, request: InfillRequest, cancel, on_step) -> InfillResult:
        from difill import grammars

        start = time.perf_counter()
        s = self.settings
        language = grammars.language_for(request.language, request.path)
        if language is None and (request.language or request.path):
            log.info("no grammar for language %r / %r: completing without the syntax constraint", request.language, request.path)
        mode = request.mode if request.mode != "auto" else grammars.decide_mode(request.prefix, request.suffix, language)
        max_tokens = request.max_tokens or (s.line_tokens if mode == "line" else s.block_tokens)
        constrain = (s.constrain_syntax if request.constrain_syntax is None else request.constrain_syntax) and language is not None
        rows = request.candidates
        critics: list[Critic | None] = [grammars.SyntaxCritic(language, request.prefix, request.suffix, mode) for _ in range(rows)] if constrain else []
        context = self._encode_context(request.prefix, request.suffix)
        generator = torch.Generator().manual_seed(request.seed)
        settings = SamplerSettings(policy=s.policy, steps=request.steps, threshold=s.threshold, remask_below=s.remask_below,
                                   temperature=0.0 if rows == 1 else 0.8)
        is_end = self._newline_end if mode == "line" else self._end
        outputs: list[list[int]] = [[] for _ in range(rows)]
        finished = [False] * rows
        total_steps, cached_tokens, block = 0, 0, 0
        state = self._prepare(context, request.document_key)
        cached_tokens = state["reused"]
        while not all(finished) and len(outputs[0]) < max_tokens:
            canvas_len = min(s.canvas_tokens if mode == "block" else s.line_tokens, max_tokens - max(len(o) for o in outputs))
            logits_fn = self._logits_fn(state, rows, canvas_len)
            denoise = Denoise(logits_fn, self.model.config.mask_token_id, is_end, self._banned, settings,
                              piece=self.tokenizer.piece, critics=critics, cancel=cancel, on_step=on_step, generator=generator)
            result = denoise.run(rows, canvas_len, block=block)
            total_steps += result.steps
            for r in range(rows):
                if not finished[r]:
                    outputs[r].extend(result.tokens[r])
                    finished[r] = result.ended[r]
            block += 1
            if all(finished) or len(outputs[0]) >= max_tokens:
                break
            # The canvas is full and the infill goes on: the committed block joins the context.
            if rows > 1:
                break  # candidates diverge; one block each is what editors show
            self._extend(state, result.tokens[0])
        texts = [self._finish_text(o, request, language, mode) for o in outputs]
        best = texts[0]
        latency = (time.perf_counter() - start) * 1000
        parse_ms = sum(getattr(c, "parse_seconds", 0.0) for c in critics if c is not None) * 1000
        return InfillResult(best, texts, total_steps, sum(len(o) for o in outputs), round(latency, 2), mode,
                            language.name if language else None, cached_tokens, round(parse_ms, 3))

    def _finish_text(self, ids: list[int], request: InfillRequest, language, mode: str) -> str:
        from difill import grammars

        text = self.tokenizer.decode(ids)
        return grammars.trim_completion(request.prefix, text, request.suffix, language, mode)

    def _budget_prefix(self, prefix: str, budget: int) -> list[int]:
        """The last ``budget`` tokens of the prefix, starting at a line start. The start line is a
        multiple of ``prefix_quantum_lines`` so it rarely moves while the user types, which keeps
        the cached context valid."""
        window = prefix[-budget * 8:] if len(prefix) > budget * 8 else prefix
        ids = self.tokenizer.encode(window)
        if len(ids) <= budget and len(window) == len(prefix):
            return ids
        line_starts = [0] + [i + 1 for i, ch in enumerate(window) if ch == "\n"]
        base_line = prefix.count("\n") - window.count("\n")
        quantum = max(1, self.settings.prefix_quantum_lines)
        for k, start in enumerate(line_starts):
            if k > 0 and (base_line + k) % quantum != 0:
                continue
            ids = self.tokenizer.encode(window[start:])
            if len(ids) <= budget:
                return ids
        return self.tokenizer.encode(window[-budget * 2:])[-budget:]  # one huge line

    def _budget_suffix(self, suffix: str, budget: int) -> list[int]:
        window = suffix[: budget * 8]
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
        if self.block_layout:
            return _Context([c.suffix_token_id] + suffix_ids + [c.prefix_token_id] + prefix_ids + [c.middle_token_id])
        bos = [c.bos_token_id] if c.bos_token_id is not None else []
        return _Context(bos + prefix_ids, suffix_ids)

    def _prepare(self, context: _Context, document_key: str | None) -> dict:
        """Block layout: an exact cache of the context, reusing the document's previous one."""
        if not self.block_layout:
            return {"context": context, "cache": None, "reused": 0, "steps_since_refresh": 0}
        entry = self._caches.pop(document_key, None) if document_key else None
        ids = context.before
        reused = 0
        if entry is not None:
            reused = 0
            for a, b in zip(entry.ids, ids):
                if a != b:
                    break
                reused += 1
            reused = min(reused, len(ids) - 1)  # always run at least the last token
            entry.cache.truncate(reused)
            cache = entry.cache
        else:
            cache = self.model.new_cache()
        self._run_context(cache, ids[reused:], start=reused)
        if document_key:
            self._caches[document_key] = _CacheEntry(list(ids), cache)
            self._evict()
        return {"context": context, "cache": cache, "reused": reused, "ids": list(ids), "key": document_key}

    def _run_context(self, cache: KVCache, ids: list[int], start: int) -> None:
        if not ids:
            return
        tensor = torch.tensor([ids], device=self.device)
        positions = torch.arange(start, start + len(ids), device=self.device)
        if getattr(self, "_onnx", None) is not None:
            self._onnx.prefill(cache, tensor, positions)
        else:
            self.model.hidden_states(tensor, positions, cache=cache, causal=True, store=True)

    def _extend(self, state: dict, committed: list[int]) -> None:
        """The canvas block is final: append it to the context (the next block continues it)."""
        if self.block_layout:
            # The layout token <|middle|> stays last: re-run it after the new tokens.
            cache, ids = state["cache"], state["ids"]
            cache.truncate(len(ids) - 1)
            new = committed + [ids[-1]]
            self._run_context(cache, new, start=len(ids) - 1)
            state["ids"] = ids[:-1] + new
            if state.get("key"):
                self._caches[state["key"]] = _CacheEntry(list(state["ids"]), cache)
        else:
            state["context"].before.extend(committed)
            state["steps_since_refresh"] = 0

    def _logits_fn(self, state: dict, rows: int, canvas_len: int) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.block_layout:
            cache = state["cache"]
            start = cache.length
            positions = torch.arange(start, start + canvas_len, device=self.device)
            onnx = getattr(self, "_onnx", None)

            def block_logits(canvas: torch.Tensor) -> torch.Tensor:
                canvas = canvas.to(self.device)
                if onnx is not None:
                    return onnx.canvas_logits(cache, canvas, positions)
                return self.model.logits(self.model.hidden_states(canvas, positions, cache=cache)).cpu()

            return block_logits
        return self._bidirectional_logits_fn(state, rows, canvas_len)

    def _bidirectional_logits_fn(self, state: dict, rows: int, canvas_len: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Open dLLMs: full forward every ``refresh_every`` steps, canvas-only steps in between
        over the cached keys/values of prefix and suffix (approximate, as in Fast-dLLM)."""
        context = state["context"]
        shift = self.model.config.shift_logits
        before, after = context.before, context.after
        n_before = len(before)
        # With shifted logits, canvas token i is read at position i - 1: the window starts one early.
        window_start = n_before - 1 if shift else n_before
        window_len = canvas_len + (1 if shift else 0)
        memo: dict = {"cache": None, "age": 0}
        device = self.device

        def bidirectional_logits(canvas: torch.Tensor) -> torch.Tensor:
            b = canvas.shape[0]
            full = torch.cat([torch.tensor([before] * b, dtype=torch.long), canvas, torch.tensor([after] * b, dtype=torch.long)], dim=1).to(device)
            if memo["cache"] is None or memo["age"] >= self.settings.refresh_every:
                cache = self.model.new_cache()
                positions = torch.arange(full.shape[1], device=device)
                hidden = self.model.hidden_states(full, positions, cache=cache, store=True)
                keep = torch.tensor([i for i in range(full.shape[1]) if not window_start <= i < window_start + window_len], device=device)
                for layer in range(len(cache.keys)):
                    cache.keys[layer] = cache.keys[layer][:1, :, keep]
                    cache.values[layer] = cache.values[layer][:1, :, keep]
                memo.update(cache=cache, age=1)
                window_hidden = hidden[:, window_start: window_start + window_len]
            else:
                memo["age"] += 1
                window = full[:, window_start: window_start + window_len]
                positions = torch.arange(window_start, window_start + window_len, device=device)
                window_hidden = self.model.hidden_states(window, positions, cache=memo["cache"])
            logits = self.model.logits(window_hidden).cpu()
            return logits[:, :-1] if shift else logits

        return bidirectional_logits

    def _evict(self) -> None:
        while len(self._caches) > 1 and self.cache_bytes() > self.settings.cache_bytes:
            self._caches.popitem(last=False)
