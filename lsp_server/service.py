"""What the server does, without the wire: documents, settings, the model, suggestions, counters.

:class:`Service` is driven by the pygls handlers in ``server.py`` (which only translate
messages) and talks back through a small :class:`Client` interface. All of its methods run on
the event loop thread; the model runs on the engine host's worker thread.

A suggestion request goes: document + position -> context window -> typing-through cache ->
supersede the document's previous request -> debounce (automatic triggers only) -> wait for
the model (bounded) -> engine.infill on the worker thread, polling the request's cancel token
between denoising steps -> remember for typing-through -> items. Every way out that is not a
suggestion (unknown document, language disabled, binary text, model not ready, superseded)
is an empty answer with a status word, never an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from itertools import count
from typing import Any, Callable, Protocol
from urllib.parse import unquote, urlparse

from difill import __version__
from difill.lsp_server import config
from difill.lsp_server.completion import TypingCache, Window, context_window, looks_binary
from difill.lsp_server.debounce import Debouncer
from difill.lsp_server.documents import UTF16, Document, DocumentStore
from difill.lsp_server.engine_host import READY, CancelToken, EngineHost, Skipped

log = logging.getLogger(__name__)

MAX_SHOWN_ITEMS = 1024  # item ids remembered for acceptance feedback


class Client(Protocol):
    """How the service reaches the editor; every method is safe to call from any thread."""

    def notify(self, method: str, params: Any) -> None: ...

    def show_message(self, error: bool, text: str) -> None: ...


@dataclass
class Counters:
    """Kept in memory for difill/status and the log; never sent anywhere else."""

    requests: int = 0
    inline: int = 0
    completion: int = 0
    infill: int = 0
    model_runs: int = 0
    served_from_cache: int = 0
    superseded: int = 0
    cancelled: int = 0
    not_ready: int = 0
    empty: int = 0
    errors: int = 0
    items_shown: int = 0
    accepted: int = 0
    partially_accepted: int = 0
    accepted_chars: int = 0

    def to_dict(self) -> dict[str, int]:
        return {config._camel(k): v for k, v in asdict(self).items()}


@dataclass
class Suggestion:
    """Texts to offer at the cursor, or none, with what happened (``status``)."""

    status: str  # ok | cached | empty | superseded | cancelled | not-ready | disabled | unknown-document | binary | error
    texts: list[str] = field(default_factory=list)
    item_ids: list[str] = field(default_factory=list)
    result: Any = None  # the engine's InfillResult when the model ran
    window: Window | None = None
    server_ms: float = 0.0
    debounce_ms: float = 0.0


@dataclass(frozen=True)
class Options:
    """Per-request engine options (settings, possibly overridden by difill/infill)."""

    mode: str
    max_tokens: int | None
    steps: int | None
    candidates: int
    constrain_syntax: bool

    @classmethod
    def from_settings(cls, s: config.Settings) -> "Options":
        return cls(s.mode, s.max_tokens, s.steps, s.candidates, s.constrain_syntax)

    def key(self) -> tuple:
        return (self.mode, self.max_tokens, self.steps, self.candidates, self.constrain_syntax)


def path_of(uri: str) -> str | None:
    """File name of a URI, for the engine's language detection when the languageId is unknown."""
    parsed = urlparse(uri)
    return unquote(parsed.path) if parsed.path else None


class Service:
    def __init__(self, settings: config.Settings, client: Client):
        self.settings = settings
        self.client = client
        self.documents = DocumentStore(UTF16)
        self.host = EngineHost()
        self.debouncer = Debouncer()
        self.typing_cache = TypingCache()
        self.counters = Counters()
        self.shown: OrderedDict[str, int] = OrderedDict()  # item id -> length of its text
        self.inflight: dict[str, CancelToken] = {}
        self.tokens: set[CancelToken] = set()  # every running request's token, for shutdown
        self.last: dict[str, Any] = {}
        self._ids = count(1)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_loaded: list[Callable[[str, str], None]] = []

    # ---------------------------------------------------------------- lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.load_model()

    def load_model(self) -> None:
        """(Re)load the model in the background; listeners in ``on_loaded`` hear the outcome."""
        s = self.settings

        def done(state: str, message: str) -> None:
            if state != READY:
                self.client.show_message(True, f"difill: {message}. Completion is off until the model loads "
                                         "(check the 'model' setting or the --model option).")
            for listener in list(self.on_loaded):
                listener(state, message)

        assert self.loop is not None
        self.host.load(self.loop, s.model, s.backend, s.device, s.dtype, done)

    def configure(self, options: Any) -> list[str]:
        """Apply settings from the client; reload the model if its path, backend or device changed."""
        new, warnings = config.update(self.settings, options)
        reload = config.model_changed(self.settings, new)
        self.settings = new
        if reload and self.loop is not None:
            log.info("model settings changed: reloading")
            self.load_model()
        return warnings

    def shutdown(self, wait_s: float = 0.0) -> bool:
        """Cancel every request and stop the engine's worker; whether it has stopped within
        ``wait_s`` seconds (EngineHost.stop)."""
        for token in list(self.tokens):
            token.cancel("shutdown")
        return self.host.stop(wait_s)

    # ---------------------------------------------------------------- documents
    def did_close(self, uri: str) -> None:
        self.documents.close(uri)
        self.typing_cache.forget(uri)
        self.debouncer.forget("doc:" + uri)
        token = self.inflight.pop("doc:" + uri, None)
        if token is not None:
            token.cancel("superseded")
        engine = self.host.engine
        if engine is not None:
            self.host.submit(self.loop, lambda: engine.forget(uri), None)

    # ---------------------------------------------------------------- suggestions
    async def suggest_at(self, uri: str, line: int, character: int, *, automatic: bool = False,
                         selected: tuple[tuple[int, int], tuple[int, int], str] | None = None,
                         options: Options | None = None, progress_token: Any = None,
                         document: Document | None = None) -> Suggestion:
        """Suggestions at a position of an open document (``document``: its version when the
        request arrived, if the caller took it then)."""
        started = time.perf_counter()
        document = document or self.documents.get(uri)
        if document is None:
            log.info("completion requested for %s, which is not open: no suggestion", uri)
            return Suggestion("unknown-document")
        if not self.settings.enabled_for(document.language_id):
            return Suggestion("disabled")
        encoding = self.documents.encoding
        offset = document.offset_at(line, character, encoding)
        s = self.settings
        if selected is not None:
            (l1, c1), (l2, c2), text = selected
            start = document.offset_at(l1, c1, encoding)
            end = max(start, document.offset_at(l2, c2, encoding), offset)
            base = context_window(document.text, start, s.max_prefix_chars, 0)
            tail = context_window(document.text, end, 0, s.max_suffix_chars)
            window = Window(base.prefix + text, tail.suffix, base.start)
        else:
            window = context_window(document.text, offset, s.max_prefix_chars, s.max_suffix_chars)
        options = options or Options.from_settings(s)
        cache_offset = None if selected is not None else offset
        return await self._suggest(window, document.language_id, path_of(uri), options, key="doc:" + uri,
                                   document_key=uri, automatic=automatic, cache_offset=cache_offset,
                                   progress_token=progress_token, started=started)

    async def suggest_text(self, prefix: str, suffix: str, language: str | None, path: str | None,
                           options: Options, document_key: str | None, progress_token: Any = None) -> Suggestion:
        """Suggestions for raw text (difill/infill without a document)."""
        started = time.perf_counter()
        if language is not None and not self.settings.enabled_for(language):
            return Suggestion("disabled")
        window = context_window(prefix + suffix, len(prefix), self.settings.max_prefix_chars, self.settings.max_suffix_chars) \
            if len(prefix) > self.settings.max_prefix_chars or len(suffix) > self.settings.max_suffix_chars else Window(prefix, suffix, 0)
        key = f"key:{document_key}" if document_key else None
        return await self._suggest(window, language, path, options, key=key, document_key=document_key,
                                   automatic=False, cache_offset=None, progress_token=progress_token, started=started)

    async def _suggest(self, window: Window, language: str | None, path: str | None, options: Options, *,
                       key: str | None, document_key: str | None, automatic: bool, cache_offset: int | None,
                       progress_token: Any, started: float) -> Suggestion:
        if looks_binary(window):
            log.info("the text around the cursor looks binary (NUL characters): no suggestion")
            return Suggestion("binary", window=window)
        cache_uri = document_key or ""
        if cache_offset is not None:
            cached = self.typing_cache.lookup(cache_uri, cache_offset, window, options.key())
            if cached is not None:
                if key is not None and (previous := self.inflight.pop(key, None)) is not None:
                    previous.cancel("superseded")
                self.counters.served_from_cache += 1
                return self._done(Suggestion("cached", cached, window=window), started)
        token = CancelToken()
        if key is not None:
            previous = self.inflight.get(key)
            if previous is not None:
                previous.cancel("superseded")
            self.inflight[key] = token
        self.tokens.add(token)
        debounce_ms = 0.0
        try:
            if automatic:
                s = self.settings
                debounce_ms = self.debouncer.delay_ms(key or "", time.monotonic() * 1000, window.line_before, window.line_after,
                                                      adaptive=s.adaptive_debounce, fixed_ms=s.debounce_ms,
                                                      low_ms=s.debounce_min_ms, high_ms=s.debounce_max_ms)
                await self._sleep(token, debounce_ms / 1000)
            if token.cancelled:
                return self._superseded(token, window)
            if not await self.host.wait_ready(self.settings.ready_timeout_ms / 1000):
                self.counters.not_ready += 1
                return Suggestion("not-ready", window=window)
            if token.cancelled:
                return self._superseded(token, window)
            result = await self._run_model(window, language, path, options, document_key, token, progress_token)
        except asyncio.CancelledError:  # $/cancelRequest of this very request (counted by the protocol)
            token.cancel("cancelled")
            raise
        except Skipped:
            return self._superseded(token, window)
        except Exception as exc:  # a model or grammar failure: logged, answered with no suggestion
            log.exception("completion failed: %s", exc)
            self.counters.errors += 1
            return Suggestion("error", window=window)
        finally:
            self.tokens.discard(token)
            if key is not None and self.inflight.get(key) is token:
                del self.inflight[key]
        if result is None:
            return self._superseded(token, window)
        texts = list(dict.fromkeys(t for t in result.candidates if t))
        if cache_offset is not None:
            self.typing_cache.remember(cache_uri, cache_offset, window, texts, options.key())
        self.debouncer.observe_latency(result.latency_ms)
        suggestion = Suggestion("ok" if texts else "empty", texts, result=result, window=window, debounce_ms=debounce_ms)
        return self._done(suggestion, started)

    async def _run_model(self, window: Window, language: str | None, path: str | None, options: Options,
                         document_key: str | None, token: CancelToken, progress_token: Any):
        from difill.inference.engine import InfillRequest
        from difill.inference.sampler import Cancelled

        engine = self.host.engine
        request = InfillRequest(prefix=window.prefix, suffix=window.suffix, language=language or None, path=path,
                                max_tokens=options.max_tokens, mode=options.mode, steps=options.steps,
                                candidates=options.candidates, document_key=document_key,
                                constrain_syntax=options.constrain_syntax)
        on_step = self._progress_callback(engine, progress_token) if progress_token is not None else None

        def work():
            try:
                return engine.infill(request, cancel=token, on_step=on_step)
            except Cancelled:
                return None

        assert self.loop is not None
        self.counters.model_runs += 1
        return await self.host.submit(self.loop, work, token)

    def _progress_callback(self, engine, progress_token: Any) -> Callable:
        """difill/progress: the decoded canvas after every denoising step (worker thread)."""
        from difill.inference.engine import render_canvas

        mask_id = engine.model.config.mask_token_id
        end_id = engine.model.config.end_token_id
        finished_blocks: list[str] = []
        current: dict[str, Any] = {"block": 0, "texts": [""]}

        def on_step(view) -> None:
            if view.block != current["block"]:
                finished_blocks.append(current["texts"][0])
                current["block"] = view.block
            texts = render_canvas(engine.tokenizer, view, mask_id, end_id)
            current["texts"] = texts
            head = "".join(finished_blocks)
            self.client.notify("difill/progress", {"token": progress_token, "block": view.block, "step": view.step,
                                                   "committed": view.committed, "texts": [head + t for t in texts]})

        return on_step

    async def _sleep(self, token: CancelToken, seconds: float) -> None:
        """The debounce: sleep, but wake as soon as the request is superseded."""
        if seconds <= 0:
            return
        assert self.loop is not None
        wakeup = self.loop.create_future()
        token.wakeup = wakeup
        handle = self.loop.call_later(seconds, lambda: wakeup.done() or wakeup.set_result(None))
        try:
            await wakeup
        finally:
            handle.cancel()

    def _superseded(self, token: CancelToken, window: Window) -> Suggestion:
        if token.reason == "superseded":
            self.counters.superseded += 1
        return Suggestion(token.reason or "superseded", window=window)

    def _done(self, suggestion: Suggestion, started: float) -> Suggestion:
        suggestion.item_ids = [f"d{next(self._ids)}" for _ in suggestion.texts]
        for item_id, text in zip(suggestion.item_ids, suggestion.texts):
            self.shown[item_id] = len(text)
            if len(self.shown) > MAX_SHOWN_ITEMS:
                self.shown.popitem(last=False)
        self.counters.items_shown += len(suggestion.texts)
        if not suggestion.texts:
            self.counters.empty += 1
        suggestion.server_ms = (time.perf_counter() - started) * 1000 - suggestion.debounce_ms
        result = suggestion.result
        self.last = {"status": suggestion.status, "serverMs": round(suggestion.server_ms, 3),
                     "latencyMs": result.latency_ms if result is not None else 0.0,
                     "debounceMs": round(suggestion.debounce_ms, 3), "fromCache": suggestion.status == "cached",
                     "mode": result.mode if result is not None else None, "itemIds": suggestion.item_ids}
        return suggestion

    # ---------------------------------------------------------------- feedback
    def accepted(self, item_id: Any) -> bool:
        """The user accepted a whole item (the difill.accept command)."""
        if item_id not in self.shown:
            log.info("accept for unknown item %r", item_id)
            return False
        self.counters.accepted += 1
        self.counters.accepted_chars += self.shown[item_id]
        log.info("item %s accepted (%d characters)", item_id, self.shown[item_id])
        return True

    def partially_accepted(self, item_id: Any, length: Any) -> bool:
        """The user accepted the first ``length`` characters of an item (difill/didPartiallyAccept)."""
        if item_id not in self.shown or isinstance(length, bool) or not isinstance(length, int) or length < 0:
            log.info("didPartiallyAccept ignored: item %r, length %r", item_id, length)
            return False
        self.counters.partially_accepted += 1
        self.counters.accepted_chars += min(length, self.shown[item_id])
        log.info("item %s partially accepted (%d characters)", item_id, length)
        return True

    # ---------------------------------------------------------------- status
    def status(self, uri: str | None = None) -> dict[str, Any]:
        engine = self.host.engine
        engine_bytes = engine.cache_bytes() if engine is not None else 0
        typing_bytes = self.typing_cache.nbytes()
        document = self.documents.get(uri) if uri else None
        return {
            "version": __version__,
            "model": {"state": self.host.state, "message": self.host.message, "loadMs": round(self.host.load_ms, 1),
                      **({"name": engine.name, "parameters": engine.n_params, "backend": engine.backend,
                          "device": engine.device} if engine is not None else {})},
            "counters": self.counters.to_dict(),
            "cacheBytes": {"engine": engine_bytes, "typing": typing_bytes, "total": engine_bytes + typing_bytes},
            "documents": {"open": len(self.documents), "chars": self.documents.total_chars()},
            "positionEncoding": self.documents.encoding,
            "inFlight": len(self.tokens),
            "queued": self.host.pending(),
            "debounce": {"latencyMs": round(self.debouncer.latency_ms, 2),
                         "typingMs": {k: round(v, 1) for k, v in list(self.debouncer.typing_ms.items())[:16]}},
            "lastRequest": self.last,
            "settings": self.settings.to_dict(),
            "document": None if document is None else {
                "uri": document.uri, "version": document.version, "languageId": document.language_id,
                "length": len(document.text), "lines": document.line_count, "sha256": document.digest()},
        }
