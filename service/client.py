"""RemoteEngine: the :class:`~difill.inference.engine.Engine` surface over a difill service.

``difill infill --endpoint URL`` and the language server (a ``model`` setting or ``--model``
that is an ``http(s)://`` URL) use it in place of a local model::

    engine = RemoteEngine("http://127.0.0.1:8000")            # token: $DIFILL_API_TOKEN
    engine.infill(InfillRequest(prefix="def add(a, b):\\n    return ", suffix="\\n"))

Only the standard library (urllib): a client needs no web stack. ``infill`` with ``cancel`` or
``on_step`` streams (server-sent events): ``on_step`` gets a :class:`StepView` per denoising
step as the engine would give it, and ``cancel()`` is checked on every event (the server sends a
heartbeat while the request waits), closing the connection, which cancels the request on the
server, and raising :class:`Cancelled`. ``infill_batch`` sends its requests concurrently, so the
service denoises them together.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from difill.inference.engine import InfillRequest, InfillResult
from difill.inference.loader import ModelLoadError
from difill.inference.sampler import Cancelled, StepView

log = logging.getLogger(__name__)

TOKEN_ENV = "DIFILL_API_TOKEN"


class RemoteError(RuntimeError):
    """The service failed (5xx), could not be reached, or answered something unexpected."""


@dataclass
class RemoteConfig:
    """What the LSP reads from ``engine.model.config`` (progress rendering)."""

    mask_token_id: int
    end_token_id: int


@dataclass
class RemoteModel:
    config: RemoteConfig


class RemoteEngine:
    """An engine whose model runs in a difill service (``difill serve-model``)."""

    backend = "remote"

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 120.0):
        """Checks the service at once: an unreachable or foreign URL raises ModelLoadError."""
        if not url.startswith(("http://", "https://")):
            raise ModelLoadError(f"{url}: a service URL starts with http:// or https://")
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.timeout_s = timeout_s
        self._tokenizer = None
        self._tokenizer_lock = threading.Lock()
        try:
            self._info = self._get_json("/v1/info")
        except (RemoteError, ValueError) as exc:
            raise ModelLoadError(f"{self.url}: {exc}") from exc
        if "mask_token_id" not in self._info:
            raise ModelLoadError(f"{self.url}/v1/info: not a difill service (no mask_token_id)")
        self.name = f"{self._info.get('model', 'model')}@{self.url}"
        self.n_params = int(self._info.get("parameters", 0))
        self.device = str(self._info.get("device", "remote"))
        self.model = RemoteModel(RemoteConfig(int(self._info["mask_token_id"]), int(self._info["end_token_id"])))

    # ------------------------------------------------------------------ the Engine surface
    def describe(self) -> dict:
        return {**self._info, "endpoint": self.url, "backend": "remote", "remote_backend": self._info.get("backend")}

    def infill(self, request: InfillRequest, cancel: Callable[[], bool] | None = None,
               on_step: Callable[[StepView], None] | None = None) -> InfillResult:
        """Like :meth:`Engine.infill`; raises ValueError for a request the service rejects (4xx),
        RemoteError when it fails or cannot be reached, Cancelled when ``cancel()`` turns true."""
        body = self._body(request, stream=cancel is not None or on_step is not None)
        if not body["stream"]:
            return self._result(self._post_json("/v1/infill", body))
        for event, data in self._stream("/v1/infill", body):
            if cancel is not None and cancel():
                raise Cancelled()
            if event == "step" and on_step is not None:
                on_step(StepView(int(data["block"]), int(data["step"]), data["canvas"], int(data["committed"])))
            elif event == "result":
                return self._result(data)
            elif event == "error":
                message = data.get("error", {}).get("message", "the service failed")
                raise (ValueError if 400 <= int(data.get("status", 500)) < 500 else RemoteError)(message)
        raise RemoteError(f"{self.url}/v1/infill: the stream ended without a result")

    def infill_batch(self, requests: Sequence[InfillRequest],
                     cancels: Sequence[Callable[[], bool] | None] | None = None) -> list[InfillResult | Exception]:
        """Concurrent requests, so that the service batches them; one result or exception each
        (``cancels`` as in :meth:`Engine.infill_batch`: a cancelled request closes its stream)."""
        if not requests:
            return []
        flags = list(cancels) if cancels is not None else [None] * len(requests)
        if len(flags) != len(requests):
            raise ValueError(f"need one cancel flag per request, got {len(flags)} for {len(requests)}")

        def one(request: InfillRequest, cancel: Callable[[], bool] | None) -> InfillResult | Exception:
            try:
                return self.infill(request, cancel=cancel)
            except (ValueError, RemoteError, Cancelled) as exc:
                return exc

        with ThreadPoolExecutor(max_workers=min(16, len(requests))) as pool:
            return list(pool.map(one, requests, flags))

    def infill_many(self, requests: Sequence[InfillRequest]) -> list[InfillResult | Exception]:
        return self.infill_batch(requests)

    def forget(self, document_key: str) -> None:
        """The service keeps context caches under a memory bound and drops the oldest itself."""

    def cache_bytes(self) -> int:
        return 0  # the caches live in the service

    @property
    def tokenizer(self):
        """The service's tokenizer, fetched once (the LSP decodes step canvases with it)."""
        with self._tokenizer_lock:
            if self._tokenizer is None:
                from tokenizers import Tokenizer as HFTokenizer

                from difill.inference.tokenizer import Tokenizer

                text = self._request("GET", "/v1/tokenizer").read().decode("utf-8")
                self._tokenizer = Tokenizer(HFTokenizer.from_str(text))
            return self._tokenizer

    # ------------------------------------------------------------------ HTTP
    @staticmethod
    def _body(request: InfillRequest, stream: bool) -> dict[str, Any]:
        options = {"mode": request.mode, "maxTokens": request.max_tokens, "steps": request.steps,
                   "candidates": request.candidates, "constrainSyntax": request.constrain_syntax}
        return {"prefix": request.prefix, "suffix": request.suffix, "language": request.language, "path": request.path,
                "documentKey": request.document_key, "seed": request.seed, "stream": stream,
                "options": {k: v for k, v in options.items() if v is not None}}

    @staticmethod
    def _result(data: dict[str, Any]) -> InfillResult:
        stats = data.get("stats", {})
        return InfillResult(completion=data["completion"], candidates=list(data["candidates"]), steps=stats.get("steps", 0),
                            tokens=stats.get("tokens", 0), latency_ms=stats.get("latencyMs", 0.0), mode=data.get("mode", ""),
                            language=data.get("language"), cached_tokens=stats.get("cachedTokens", 0),
                            parse_ms=stats.get("parseMs", 0.0), syntax_valid=stats.get("syntaxValid"))

    def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        headers = {"Accept": "application/json, text/event-stream"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            message = _error_message(exc)
            if exc.code in (401, 403):
                raise RemoteError(f"{self.url}: {message} (set ${TOKEN_ENV})") from None
            if 400 <= exc.code < 500 and exc.code != 429:
                raise ValueError(message) from None
            raise RemoteError(f"{self.url}{path}: HTTP {exc.code}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RemoteError(f"cannot reach {self.url}: {reason}") from None

    def _get_json(self, path: str) -> dict[str, Any]:
        with self._request("GET", path) as response:
            return json.loads(response.read())

    def _post_json(self, path: str, body: dict) -> dict[str, Any]:
        with self._request("POST", path, body) as response:
            return json.loads(response.read())

    def _stream(self, path: str, body: dict) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event, data) of each server-sent event; heartbeats come as ("wait", {}). Leaving the
        loop early closes the connection (the service cancels the request)."""
        with self._request("POST", path, body) as response:
            event, data = "message", []
            for raw in response:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith(":"):
                    yield "wait", {}
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    yield event, json.loads("\n".join(data))
                    event, data = "message", []


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return json.loads(exc.read())["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        return exc.reason if isinstance(exc.reason, str) else f"HTTP {exc.code}"
