"""The HTTP API of the inference service (FastAPI; served by uvicorn or by Ray Serve).

    POST /v1/completions   OpenAI-style completions with ``prompt`` + ``suffix`` (fill in the middle)
    POST /v1/infill        difill's own request, the options of the language server's difill/infill
    GET  /v1/models        the served model (OpenAI's list shape)
    GET  /v1/info          the engine's description and the service's limits
    GET  /v1/tokenizer     the tokenizer (tokenizer.json), for clients that render step canvases
    GET  /health           liveness and queue depth (no authentication)
    GET  /metrics          Prometheus text: requests, batch sizes, latency
    GET  /openapi.json     this API (no authentication)

``stream: true`` answers with server-sent events: one event after every denoising step (the
canvas so far), then the result. As in Mercury Coder's "diffusing" stream, every completions
chunk carries the *whole* text so far, which replaces the previous chunk's text (a diffusion
model revises the whole canvas, it does not append), with ``░`` for positions still masked.

Guards, in this order, before a request reaches a route: bearer token (401), per-client rate
limit (429 with Retry-After), body size (413). Bad bodies get 400 with an OpenAI-style
``{"error": {"message", "type", "param", "code"}}`` naming the field.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from difill import __version__
from difill.inference.sampler import Cancelled, StepView
from difill.service.batcher import Batcher, BatchItem, EngineRunner, Overloaded
from difill.service.metrics import Metrics
from difill.service.settings import ServiceSettings

log = logging.getLogger(__name__)

MASK_PLACEHOLDER = "░"
PUBLIC_PATHS = {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
ENDPOINTS = {"/v1/completions", "/v1/infill", "/v1/models", "/v1/info", "/v1/tokenizer", "/health", "/metrics",
             "/openapi.json"}
MAX_SEED = 2**63 - 1


# ---------------------------------------------------------------------- request bodies
class CompletionBody(BaseModel):
    """OpenAI's completions request, read as fill in the middle: the text is generated between
    ``prompt`` and ``suffix``. Other OpenAI fields (temperature, top_p, stop, user, ...) are
    accepted and ignored: the first choice is greedy, the others are sampled."""

    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: str = Field(description="the text before the cursor")
    suffix: str = Field("", description="the text after the cursor")
    model: str | None = Field(None, description="ignored: the service serves one model (see /v1/models)")
    max_tokens: int | None = Field(None, ge=1, le=1024, description="most tokens to generate (default: by mode)")
    n: int = Field(1, ge=1, le=8, description="number of choices (candidates)")
    stream: bool = Field(False, description="server-sent events after every denoising step")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="sampling seed of choices after the first")
    language: str | None = Field(None, description="difill: LSP languageId or language name (grammar)")
    mode: Literal["auto", "line", "block"] = Field("auto", description="difill: single line, block, or by the cursor")
    steps: int | None = Field(None, ge=1, le=1024, description="difill: fixed denoising steps (default: confidence)")


class InfillOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    mode: Literal["auto", "line", "block"] = "auto"
    maxTokens: int | None = Field(None, ge=1, le=1024)
    steps: int | None = Field(None, ge=1, le=1024)
    candidates: int = Field(1, ge=1, le=8)
    constrainSyntax: bool | None = None


class InfillBody(BaseModel):
    """The language server's difill/infill on raw text (docs/protocol.md), plus seed and stream."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prefix: str
    suffix: str = ""
    language: str | None = None
    path: str | None = None
    documentKey: str | None = Field(None, max_length=512, description="reuse this document's context cache "
                                    "(kept per client)")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    stream: bool = False
    options: InfillOptions = Field(default_factory=InfillOptions)


class ErrorBody(BaseModel):
    error: dict[str, Any]


ERRORS = {code: {"model": ErrorBody, "description": text} for code, text in
          [(400, "bad request body"), (401, "missing or wrong bearer token"), (413, "request body too large"),
           (429, "rate limit exceeded"), (503, "queue full")]}


def error(status: int, message: str, param: str | None = None, kind: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    kind = kind or {400: "invalid_request_error", 401: "authentication_error", 413: "invalid_request_error",
                    429: "rate_limit_error", 503: "overloaded_error"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status,
                        headers=headers)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ---------------------------------------------------------------------- limits
class RateLimiter:
    """A token bucket per client: ``rate`` requests per second on average, ``burst`` at once."""

    MAX_CLIENTS = 10_000

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = burst
        self.buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, time)

    def allow(self, client: str) -> float:
        """0 when allowed, else the seconds until the next request would be."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        tokens, last = self.buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self.buckets[client] = (tokens, now)  # re-inserted last: the oldest clients go first
        while len(self.buckets) > self.MAX_CLIENTS:
            self.buckets.pop(next(iter(self.buckets)))
        return wait


def client_key(scope: dict, token: str | None) -> str:
    """Who is asking: the bearer token when there is one (a digest of it), else the address."""
    for name, value in scope.get("headers", []):
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return "t:" + hashlib.sha256(value[7:].strip()).hexdigest()[:16]
    client = scope.get("client") or ("?", 0)
    return "a:" + str(client[0])


class Guard:
    """ASGI middleware: authentication, rate limit, body size; counts every response."""

    def __init__(self, app: Any, service: "InferenceService"):
        self.app = app
        self.service = service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        metrics = self.service.metrics

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                metrics.request(endpoint, message["status"])
            await send(message)

        s = self.service.settings
        headers = {name: value for name, value in scope.get("headers", [])}
        if s.token and path not in PUBLIC_PATHS:
            given = headers.get(b"authorization", b"")
            expected = b"Bearer " + s.token.encode()
            if not hmac.compare_digest(given, expected):
                reason = "missing bearer token" if not given else "wrong bearer token"
                await error(401, f"{reason}: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})(scope, receive, counted_send)
                return
        if scope.get("method") == "POST":
            wait = self.service.limiter.allow(client_key(scope, s.token))
            if wait > 0:
                await error(429, f"rate limit of {s.rate_limit:g} requests/s exceeded; retry in {wait:.2f} s",
                            headers={"Retry-After": str(max(1, round(wait + 0.5)))})(scope, receive, counted_send)
                return
            body, too_large = await self._read_body(headers, receive, s.max_body_bytes)
            if too_large:
                await error(413, f"request body is larger than {s.max_body_bytes} bytes")(scope, receive, counted_send)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, counted_send)

    @staticmethod
    async def _read_body(headers: dict, receive: Any, limit: int) -> tuple[bytes, bool]:
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return b"", True
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), False


def _replay(body: bytes, receive: Any) -> Any:
    """A receive that hands the buffered body over once, then listens for the disconnect."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


# ---------------------------------------------------------------------- the service
class InferenceService:
    """What one replica serves: the engine behind a batcher, metrics and the rate limiter."""

    def __init__(self, engine: Any, settings: ServiceSettings, replica: str = "local"):
        self.engine = engine
        self.settings = settings
        self.metrics = Metrics(replica)
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_burst)
        self.batcher = Batcher(EngineRunner(engine), settings.max_batch, settings.max_wait_ms, settings.max_queue,
                               on_drop=lambda item: self.metrics.stop(), on_batch=self._batch_done)
        config = engine.model.config
        self.mask_id = config.mask_token_id
        self.end_id = config.end_token_id
        self.started = time.time()

    def _batch_done(self, batch: list[BatchItem], results: list[Any], seconds: float) -> None:
        self.metrics.batch(len(batch))
        self.metrics.stop(sum(isinstance(r, Cancelled) for r in results))

    @classmethod
    def load(cls, settings: ServiceSettings, replica: str = "local") -> "InferenceService":
        """Load the model (errors: ModelLoadError naming the file) and warm it up."""
        from difill.inference.engine import Engine, EngineSettings, InfillRequest

        engine = Engine.load(settings.model, backend=settings.backend, device=settings.device,
                             settings=EngineSettings(dtype=settings.dtype))
        engine.infill(InfillRequest(prefix="x = ", suffix="\n", mode="line", max_tokens=2))
        return cls(engine, settings, replica)

    def info(self) -> dict[str, Any]:
        s = self.settings
        return {**self.engine.describe(), "version": __version__, "replica": self.metrics.replica,
                "mask_token_id": self.mask_id, "end_token_id": self.end_id,
                "limits": {"max_batch": s.max_batch, "max_wait_ms": s.max_wait_ms, "max_queue": s.max_queue,
                           "max_body_bytes": s.max_body_bytes, "rate_limit": s.rate_limit, "rate_burst": s.rate_burst,
                           "max_tokens_cap": s.max_tokens_cap, "authentication": bool(s.token)}}

    def make_request(self, prefix: str, suffix: str, *, language: str | None, path: str | None, max_tokens: int | None,
                     mode: str, steps: int | None, candidates: int, seed: int, document_key: str | None,
                     constrain_syntax: bool | None, names: tuple[str, str] = ("prefix", "suffix")):
        from difill.inference.engine import InfillRequest

        for name, text in zip(names, (prefix, suffix)):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise BadRequest(f"{name} is not valid Unicode (a lone surrogate at character {exc.start})", name) from exc
        if max_tokens is not None:
            max_tokens = min(max_tokens, self.settings.max_tokens_cap)
        try:
            return InfillRequest(prefix=prefix, suffix=suffix, language=language, path=path, max_tokens=max_tokens,
                                 mode=mode, steps=steps, candidates=candidates, seed=seed, document_key=document_key,
                                 constrain_syntax=constrain_syntax)
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc

    def render(self, view: StepView) -> list[str]:
        """Each canvas row of a step as text (:func:`difill.inference.engine.render_canvas`)."""
        from difill.inference.engine import render_canvas

        return render_canvas(self.engine.tokenizer, view, self.mask_id, self.end_id, MASK_PLACEHOLDER)

    async def run(self, http: Request, item: BatchItem) -> Any:
        """The item's result; raises Cancelled when the client disconnects first (checked every
        50 ms here; Ray Serve cancels the awaiting task itself)."""
        started = time.monotonic()
        self.metrics.in_flight += 1
        task = asyncio.ensure_future(self.batcher.submit(item))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.05)
                if done:
                    result = task.result()
                    self.metrics.completed(time.monotonic() - started, item.queue_ms / 1000)
                    return result
                if await http.is_disconnected():
                    task.cancel()
                    self.metrics.cancel()
                    log.info("client disconnected: request cancelled")
                    raise Cancelled()
        except asyncio.CancelledError:
            task.cancel()
            self.metrics.cancel()
            raise
        finally:
            self.metrics.in_flight -= 1

    async def stream(self, item: BatchItem, views: "asyncio.Queue[Any]") -> AsyncIterator[tuple[str, Any]]:
        """("step", StepView) after every denoising step, ("wait", None) heartbeats while queued,
        then ("result", InfillResult) or ("error", exception). Closing the iterator (the client
        went away) cancels the request."""
        started = time.monotonic()
        done_marker = object()
        self.metrics.in_flight += 1
        task = asyncio.ensure_future(self.batcher.submit(item))
        task.add_done_callback(lambda _: views.put_nowait(done_marker))
        finished = False
        try:
            while True:
                try:
                    message = await asyncio.wait_for(views.get(), self.settings.heartbeat_s)
                except asyncio.TimeoutError:
                    yield "wait", None
                    continue
                if message is done_marker:
                    break
                yield "step", message
            finished = True
            if task.cancelled():
                yield "error", Cancelled()
            elif task.exception() is not None:
                yield "error", task.exception()
            else:
                self.metrics.completed(time.monotonic() - started, item.queue_ms / 1000)
                yield "result", task.result()
        finally:
            self.metrics.in_flight -= 1
            if not finished and not task.done():
                task.cancel()
                self.metrics.cancel()
                log.info("stream closed by the client: request cancelled")


def step_callback(views: "asyncio.Queue[Any]") -> Any:
    """An engine on_step (worker thread) that hands each view to the event loop's queue."""
    loop = asyncio.get_running_loop()

    def on_step(view: StepView) -> None:
        loop.call_soon_threadsafe(views.put_nowait, view)

    return on_step


def sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


def engine_error(exc: BaseException) -> JSONResponse:
    """An exception from the engine or the batcher as an HTTP answer."""
    if isinstance(exc, Cancelled):  # the client is gone: nobody reads this
        return error(499, "cancelled: the client disconnected", kind="cancelled")
    if isinstance(exc, Overloaded):
        return error(503, str(exc), headers={"Retry-After": "1"})
    if isinstance(exc, (ValueError, BadRequest)):
        return error(400, str(exc), getattr(exc, "param", None))
    log.error("infill failed: %s: %s", type(exc).__name__, exc)
    return error(500, f"the engine failed: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------- the app
def create_app(service: InferenceService) -> FastAPI:
    """The FastAPI application of one service (replica)."""
    app = FastAPI(title="difill inference service", version=__version__,
                  description="Fill-in-the-middle code completion by masked diffusion, batched across clients.")
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        param = None
        for e in exc.errors():
            loc = [str(x) for x in e.get("loc", ()) if x != "body"]
            if e.get("type") == "json_invalid":
                ctx = e.get("ctx") or {}
                problems.append(f"the body is not valid JSON: {ctx.get('error', e.get('msg'))}")
                continue
            param = param or (".".join(loc) or None)
            problems.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
        return error(400, "; ".join(problems) or "invalid request body", param)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return error(400, str(exc), exc.param)

    async def run_unstreamed(http: Request, request: Any) -> "tuple[Any, BatchItem] | Response":
        """One request answered in one piece: its result and batch item, or the error answer."""
        item = BatchItem(request)
        try:
            return await service.run(http, item), item
        except Cancelled:
            return Response(status_code=499)
        except Exception as exc:
            return engine_error(exc)

    @app.get("/health", summary="liveness, model and queue depth")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.engine.name, "version": __version__, "replica": service.metrics.replica,
                "queued": service.batcher.queued(), "running": service.batcher.running,
                "uptime_s": round(time.time() - service.started, 1)}

    @app.get("/metrics", summary="Prometheus text format", response_class=PlainTextResponse, responses=ERRORS)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(service.batcher.queued()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", summary="the served model", responses=ERRORS)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.engine.name, "object": "model", "created": int(service.started),
                                            "owned_by": "difill"}]}

    @app.get("/v1/info", summary="engine description and the service's limits", responses=ERRORS)
    async def info() -> dict[str, Any]:
        return service.info()

    @app.get("/v1/tokenizer", summary="the model's tokenizer.json", responses=ERRORS)
    async def tokenizer() -> Response:
        return Response(service.engine.tokenizer.hf.to_str(), media_type="application/json")

    @app.post("/v1/completions", summary="OpenAI-style fill-in-the-middle completion", responses=ERRORS)
    async def completions(body: CompletionBody, http: Request) -> Any:
        request = service.make_request(body.prompt, body.suffix, language=body.language, path=None,
                                       max_tokens=body.max_tokens, mode=body.mode, steps=body.steps,
                                       candidates=body.n, seed=body.seed or 0, document_key=None,
                                       constrain_syntax=None, names=("prompt", "suffix"))
        ident = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model = service.engine.name

        def chunk(texts: list[str], finish: str | None, extra: dict | None = None) -> dict:
            return {"id": ident, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": k, "text": t, "logprobs": None, "finish_reason": finish}
                                for k, t in enumerate(texts)], **(extra or {})}

        def finish_reason(result: Any) -> str:
            budget = request.max_tokens
            return "length" if budget and result.tokens >= budget * request.candidates else "stop"

        def difill_stats(result: Any, item: BatchItem) -> dict:
            return {"difill": {"batch_size": item.batch_size, "queue_ms": round(item.queue_ms, 2),
                               "latency_ms": result.latency_ms, "steps": result.steps, "mode": result.mode,
                               "language": result.language}, "usage": {"completion_tokens": result.tokens}}

        if not body.stream:
            outcome = await run_unstreamed(http, request)
            if isinstance(outcome, Response):
                return outcome
            result, item = outcome
            return chunk(result.candidates, finish_reason(result), difill_stats(result, item))

        views: asyncio.Queue = asyncio.Queue()
        item = BatchItem(request, on_step=step_callback(views))
        finished: list[str] = []

        async def events() -> AsyncIterator[str]:
            current = {"block": 0, "texts": [""] * request.candidates}
            async for kind, value in service.stream(item, views):
                if kind == "wait":
                    yield ": waiting\n\n"
                elif kind == "step":
                    if value.block != current["block"]:
                        finished.append(current["texts"][0])
                        current["block"] = value.block
                    current["texts"] = service.render(value)
                    head = "".join(finished)
                    yield sse(chunk([head + t for t in current["texts"]], None))
                elif kind == "result":
                    yield sse(chunk(value.candidates, finish_reason(value), difill_stats(value, item)))
                    yield sse("[DONE]")
                else:
                    response = engine_error(value)
                    yield sse(json.loads(response.body))
                    yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/infill", summary="difill's infill (the options of the language server's difill/infill)",
              responses=ERRORS)
    async def infill(body: InfillBody, http: Request) -> Any:
        o = body.options
        # Context caches are kept per client: two users' "file:///src/a.py" are different documents.
        key = f"{client_key(http.scope, service.settings.token)}|{body.documentKey}" if body.documentKey else None
        request = service.make_request(body.prefix, body.suffix, language=body.language, path=body.path,
                                       max_tokens=o.maxTokens, mode=o.mode, steps=o.steps, candidates=o.candidates,
                                       seed=body.seed, document_key=key, constrain_syntax=o.constrainSyntax)

        def result_json(result: Any, item: BatchItem, server_ms: float) -> dict:
            return {"status": "ok", "completion": result.completion, "candidates": result.candidates,
                    "mode": result.mode, "language": result.language,
                    "stats": {"steps": result.steps, "tokens": result.tokens, "latencyMs": result.latency_ms,
                              "serverMs": round(server_ms, 2), "queueMs": round(item.queue_ms, 2),
                              "batchSize": item.batch_size, "cachedTokens": result.cached_tokens,
                              "parseMs": result.parse_ms, "syntaxValid": result.syntax_valid}}

        started = time.monotonic()
        if not body.stream:
            outcome = await run_unstreamed(http, request)
            if isinstance(outcome, Response):
                return outcome
            result, item = outcome
            return result_json(result, item, (time.monotonic() - started) * 1000)

        views: asyncio.Queue = asyncio.Queue()
        item = BatchItem(request, on_step=step_callback(views))

        async def events() -> AsyncIterator[str]:
            async for kind, value in service.stream(item, views):
                if kind == "wait":
                    yield ": waiting\n\n"
                elif kind == "step":
                    yield sse({"block": value.block, "step": value.step, "committed": value.committed,
                               "canvas": value.canvas, "texts": service.render(value)}, "step")
                elif kind == "result":
                    yield sse(result_json(value, item, (time.monotonic() - started) * 1000), "result")
                else:
                    response = engine_error(value)
                    yield sse({**json.loads(response.body), "status": response.status_code}, "error")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app.add_middleware(Guard, service=service)
    return app
