"""How long to wait before answering an automatic inline-completion trigger.

Every keystroke triggers a request; most are superseded by the next keystroke before the user
could read a suggestion. Waiting a little saves model time and avoids flicker, waiting too long
makes completion feel slow. In the spirit of Tabby's adaptive debounce, the delay follows three
signals (docs/protocol.md documents the formula and its settings):

* typing speed: an exponential moving average of the intervals between automatic triggers of
  the same document (intervals over ``PAUSE_MS`` are pauses, not typing, and are skipped). We
  wait about 1.5 typical intervals: if another keystroke were coming, it would usually have
  arrived by then.
* trigger context: after a newline, an opening bracket, ``:``, ``,``, ``=`` or a space the user
  likely pauses to think and a suggestion is wanted, so the delay is halved; in the middle of a
  line with code after the cursor a suggestion is less likely wanted, so it grows by half.
* expected latency: the moving average of the model's own latency. Half of it is taken off
  the delay, so that a slow model starts earlier (a superseded run is stopped between two
  denoising steps, so starting early wastes at most one step).

The result is clamped to [debounceMinMs, debounceMaxMs]. With ``adaptiveDebounce`` off the
delay is the fixed ``debounceMs``. Invoked triggers (the user asked) are never debounced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PAUSE_MS = 1000.0  # a longer gap between two triggers is a pause, not typing speed
INITIAL_TYPING_MS = 150.0  # a typical interval between keystrokes before we have measured any
SMOOTHING = 0.3  # weight of the newest observation in the moving averages
PAUSE_CHARS = set("\n([{:,=; ")
CLOSERS = set(")]}\"'`;,")


def context_factor(line_before: str, line_after: str) -> float:
    """0.5 where a suggestion is likely wanted, 1.5 where it is not, else 1."""
    if line_after.strip() and not set(line_after.strip()) <= CLOSERS:
        return 1.5  # editing inside a line: code follows the cursor
    if not line_before.strip():
        return 0.5  # start of a (new) line, after its indentation
    if line_before[-1] in PAUSE_CHARS:
        return 0.5
    return 1.0


def adaptive_delay_ms(typing_ms: float, factor: float, expected_latency_ms: float, low: float, high: float) -> float:
    """The documented formula: clamp(1.5 * typing * factor - 0.5 * latency, low, high)."""
    return min(high, max(low, 1.5 * typing_ms * factor - 0.5 * expected_latency_ms))


@dataclass
class Debouncer:
    """Keeps the moving averages; one per server."""

    typing_ms: dict[str, float] = field(default_factory=dict)
    last_trigger: dict[str, float] = field(default_factory=dict)
    latency_ms: float = 0.0

    def observe_latency(self, ms: float) -> None:
        self.latency_ms = ms if self.latency_ms == 0.0 else (1 - SMOOTHING) * self.latency_ms + SMOOTHING * ms

    def observe_trigger(self, uri: str, now_ms: float) -> float:
        """Record an automatic trigger; returns the document's typing-interval estimate."""
        previous = self.last_trigger.get(uri)
        self.last_trigger[uri] = now_ms
        estimate = self.typing_ms.get(uri, INITIAL_TYPING_MS)
        if previous is not None and 0 <= now_ms - previous <= PAUSE_MS:
            estimate = (1 - SMOOTHING) * estimate + SMOOTHING * (now_ms - previous)
            self.typing_ms[uri] = estimate
        return estimate

    def delay_ms(self, uri: str, now_ms: float, line_before: str, line_after: str, *, adaptive: bool,
                 fixed_ms: float, low_ms: float, high_ms: float) -> float:
        typing = self.observe_trigger(uri, now_ms)
        if not adaptive:
            return fixed_ms
        return adaptive_delay_ms(typing, context_factor(line_before, line_after), self.latency_ms, low_ms, high_ms)

    def forget(self, uri: str) -> None:
        self.typing_ms.pop(uri, None)
        self.last_trigger.pop(uri, None)
