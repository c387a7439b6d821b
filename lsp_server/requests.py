"""The custom ``difill/*`` requests: parameter checking and result shapes (docs/protocol.md).

Parameters arrive as plain JSON (dicts); a malformed one raises :class:`ParamsError` with a
message naming the field, which the server answers as JSON-RPC ``-32602 Invalid params``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from difill.lsp_server.config import Settings
from difill.lsp_server.service import Options, Suggestion


class ParamsError(ValueError):
    """A difill/* request's params do not fit the documented shape."""


@dataclass
class InfillCall:
    uri: str | None = None
    line: int = 0
    character: int = 0
    prefix: str | None = None
    suffix: str = ""
    language: str | None = None
    path: str | None = None
    document_key: str | None = None
    options: Options | None = None
    progress_token: Any = None


def _int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ParamsError(f"{name} must be an integer between {low} and {high}, got {value!r}")
    return value


def _str(value: Any, name: str, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ParamsError(f"{name} must be a string, got {type(value).__name__}")
    return value


def text_document_uri(params: Any, required: bool) -> str | None:
    document = params.get("textDocument") if isinstance(params, dict) else None
    if document is None and not required:
        return None
    if not isinstance(document, dict) or not isinstance(document.get("uri"), str):
        raise ParamsError("textDocument must be an object with a string uri")
    return document["uri"]


def parse_infill(params: Any, settings: Settings, request_id: Any) -> InfillCall:
    """difill/infill params: {textDocument, position} or {prefix, suffix, language}, plus options."""
    if not isinstance(params, dict):
        raise ParamsError("params must be an object")
    call = InfillCall()
    if "textDocument" in params:
        call.uri = text_document_uri(params, True)
        position = params.get("position")
        if not isinstance(position, dict):
            raise ParamsError("position must be an object {line, character}")
        call.line = _int(position.get("line"), "position.line", 0, 2**31 - 1)
        call.character = _int(position.get("character"), "position.character", 0, 2**31 - 1)
    elif "prefix" in params:
        call.prefix = _str(params["prefix"], "prefix", optional=False)
        call.suffix = _str(params.get("suffix", ""), "suffix", optional=False) or ""
        call.language = _str(params.get("language"), "language")
        call.path = _str(params.get("path"), "path")
        call.document_key = _str(params.get("documentKey"), "documentKey")
    else:
        raise ParamsError("give either textDocument and position, or prefix (and suffix, language)")
    options = params.get("options", {})
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ParamsError("options must be an object")
    mode = options.get("mode", settings.mode)
    if mode not in ("line", "block", "auto"):
        raise ParamsError(f"options.mode must be line, block or auto, got {mode!r}")
    max_tokens = options.get("maxTokens", settings.max_tokens)
    steps = options.get("steps", settings.steps)
    constrain = options.get("constrainSyntax", settings.constrain_syntax)
    if not isinstance(constrain, bool):
        raise ParamsError("options.constrainSyntax must be true or false")
    call.options = Options(
        mode=mode,
        max_tokens=None if max_tokens is None else _int(max_tokens, "options.maxTokens", 1, 1024),
        steps=None if steps is None else _int(steps, "options.steps", 1, 1024),
        candidates=_int(options.get("candidates", settings.candidates), "options.candidates", 1, 8),
        constrain_syntax=constrain,
    )
    progress = options.get("progress", settings.progress)
    if not isinstance(progress, bool):
        raise ParamsError("options.progress must be true or false")
    if progress:
        token = params.get("progressToken", request_id)
        if isinstance(token, bool) or not isinstance(token, (int, str)):
            raise ParamsError("progressToken must be a number or a string")
        call.progress_token = token
    return call


def infill_result(suggestion: Suggestion) -> dict[str, Any]:
    result = suggestion.result
    return {
        "status": suggestion.status,
        "completion": suggestion.texts[0] if suggestion.texts else "",
        "candidates": [{"text": t, "itemId": i} for t, i in zip(suggestion.texts, suggestion.item_ids)],
        "mode": result.mode if result is not None else None,
        "language": result.language if result is not None else None,
        "stats": {
            "steps": result.steps if result is not None else 0,
            "tokens": result.tokens if result is not None else 0,
            "latencyMs": result.latency_ms if result is not None else 0.0,
            "serverMs": round(suggestion.server_ms, 3),
            "cachedTokens": result.cached_tokens if result is not None else 0,
            "parseMs": result.parse_ms if result is not None else 0.0,
            "fromCache": suggestion.status == "cached",
        },
    }
