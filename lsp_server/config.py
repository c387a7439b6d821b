"""Server settings, from ``initializationOptions`` and ``workspace/didChangeConfiguration``.

Keys are camelCase as editors write them; they may be given flat or under a ``"difill"``
section (``{"difill": {"steps": 8}}``). A value of the wrong type or out of range is ignored
with a warning naming the key, and the previous value stays: a typo in an editor's settings
file must never take completion down. docs/protocol.md lists every key with its default.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass
class Settings:
    model: str | None = None  # model directory; None: the bundled model (or the CLI's --model)
    backend: str = "torch"
    device: str = "cpu"
    dtype: str | None = None  # torch weights: None (bfloat16 on CUDA, float16 on the CPU), "float32", "bfloat16", "float16", "int8" (CPU)
    steps: int | None = None  # None: confidence-threshold decoding
    max_tokens: int | None = None  # None: the engine's default for the mode
    mode: str = "auto"  # "auto" | "line" | "block"
    candidates: int = 1  # inline items per request
    constrain_syntax: bool = True
    languages: list[str] | None = None  # languageIds to complete; None: all
    debounce_ms: int = 75  # fixed delay for automatic triggers when adaptive is off
    adaptive_debounce: bool = True
    debounce_min_ms: int = 20
    debounce_max_ms: int = 400
    ready_timeout_ms: int = 2000  # how long a request waits for the model to finish loading
    max_prefix_chars: int = 32_000  # context window around the cursor handed to the engine
    max_suffix_chars: int = 8_000
    progress: bool = False  # default for difill/infill's "progress" option

    def enabled_for(self, language_id: str | None) -> bool:
        return self.languages is None or (language_id or "") in self.languages

    def to_dict(self) -> dict[str, Any]:
        return {_camel(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _optional_int(low: int, high: int) -> Callable[[Any], int | None]:
    def check(value: Any) -> int | None:
        if value is None:
            return None
        return _int(low, high)(value)
    return check


def _int(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"expected an integer, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return int(value)
    return check


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _choice(*choices: str | None) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(map(json.dumps, choices))}, got {value!r}")
        return value
    return check


def _optional_str(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _languages(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ValueError(f"expected a list of languageIds or null, got {value!r}")
    return list(value)


CHECKS: dict[str, Callable[[Any], Any]] = {
    "model": _optional_str,
    "backend": _choice("torch", "onnx"),
    "device": _choice("cpu", "cuda"),
    "dtype": _choice(None, "float32", "bfloat16", "float16", "int8"),
    "steps": _optional_int(1, 1024),
    "max_tokens": _optional_int(1, 1024),
    "mode": _choice("auto", "line", "block"),
    "candidates": _int(1, 8),
    "constrain_syntax": _bool,
    "languages": _languages,
    "debounce_ms": _int(0, 5000),
    "adaptive_debounce": _bool,
    "debounce_min_ms": _int(0, 5000),
    "debounce_max_ms": _int(0, 5000),
    "ready_timeout_ms": _int(0, 600_000),
    "max_prefix_chars": _int(100, 10_000_000),
    "max_suffix_chars": _int(0, 10_000_000),
    "progress": _bool,
}
KEYS = {_camel(name): name for name in CHECKS}


def update(settings: Settings, options: Any) -> tuple[Settings, list[str]]:
    """A copy of ``settings`` with ``options`` applied, and the warnings for rejected keys."""
    if not isinstance(options, dict):
        return settings, [] if options is None else [f"settings must be an object, not {type(options).__name__}"]
    if isinstance(options.get("difill"), dict):
        options = options["difill"]
    values: dict[str, Any] = {}
    warnings: list[str] = []
    for key, value in options.items():
        name = KEYS.get(key) or (key if key in CHECKS else None)
        if name is None:
            warnings.append(f"unknown setting {key!r} ignored")
            continue
        try:
            values[name] = CHECKS[name](value)
        except ValueError as exc:
            warnings.append(f"setting {key!r} ignored: {exc}")
    new = dataclasses.replace(settings, **values)
    if new.debounce_min_ms > new.debounce_max_ms:
        warnings.append("debounceMinMs is above debounceMaxMs: both ignored")
        new = dataclasses.replace(new, debounce_min_ms=settings.debounce_min_ms, debounce_max_ms=settings.debounce_max_ms)
    for warning in warnings:
        log.warning("%s", warning)
    return new, warnings


def model_changed(old: Settings, new: Settings) -> bool:
    return (old.model, old.backend, old.device, old.dtype) != (new.model, new.backend, new.device, new.dtype)


__all__ = ["Settings", "update", "model_changed", "KEYS"]
