"""The metrics of a fill-in-the-middle run, each a plain function of a completion.

They take the completion as an argument (not a model) so that the same code scores a model's
output, a known-perfect answer and a known-broken one; the tests rely on that.

* exact match: equal after collapsing whitespace (so CRLF, trailing spaces or a final newline
  do not count as mistakes).
* edit similarity: ``1 - levenshtein(a, b) / max(len(a), len(b))`` on the text with line ends
  normalised and outer whitespace stripped (1.0 for identical, 0.0 for nothing in common).
* syntax valid: the file with the completion has no more tree-sitter errors than the file with
  the reference. Comparing with the reference, not with zero, is what makes it fair on holes
  whose surroundings were cut (the prefix window starts mid-function) or never parsed.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Iterable, Sequence

log = logging.getLogger(__name__)

# Metric name -> True when higher is better. Baseline comparison reads this.
HIGHER_IS_BETTER = {
    "exact_match": True,
    "edit_similarity": True,
    "non_empty_rate": True,
    "syntax_valid_rate": True,
    "pass_at_1": True,
    "tokens_per_s": True,
    "latency_p50_ms": False,
    "latency_p95_ms": False,
    "error_rate": False,
}


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def exact_match(completion: str, reference: str) -> bool:
    return normalize_whitespace(completion) == normalize_whitespace(reference)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute all cost 1), two rows of memory."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _canonical(text: str) -> str:
    return text.replace("\r\n", "\n").strip()


def edit_similarity(completion: str, reference: str) -> float:
    a, b = _canonical(completion), _canonical(reference)
    if not a and not b:
        return 1.0
    return 1.0 - levenshtein(a, b) / max(len(a), len(b))


@functools.lru_cache(maxsize=32)
def _grammar(language: str):
    """difill.grammars' language for a name, or None (no grammar, or the package is missing)."""
    try:
        from difill import grammars
    except ImportError as exc:  # pragma: no cover - grammars is part of difill
        log.warning("difill.grammars is not importable (%s): syntax validity is not measured", exc)
        return None
    try:
        return grammars.language_for(language)
    except (ValueError, LookupError, AttributeError, ImportError) as exc:
        log.info("no grammar for %r: %s", language, exc)
        return None


def syntax_errors(text: str, language: str) -> int | None:
    """Tree-sitter error count of ``text``, or None when difill has no grammar for ``language``."""
    grammar = _grammar(language)
    if grammar is None:
        return None
    from difill import grammars

    return grammars.syntax_errors(text, grammar)


def syntax_valid(prefix: str, completion: str, suffix: str, reference: str, language: str,
                 reference_errors: int | None = None) -> bool | None:
    """True when prefix+completion+suffix has no more syntax errors than prefix+reference+suffix.

    None where it is not measured: no grammar for the language. ``reference_errors`` can be
    passed in when already known (it is the same for every completion of a case)."""
    if reference_errors is None:
        reference_errors = syntax_errors(prefix + reference + suffix, language)
        if reference_errors is None:
            return None
    errors = syntax_errors(prefix + completion + suffix, language)
    if errors is None:
        return None
    return errors <= reference_errors


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def aggregate(results: Sequence[dict]) -> dict:
    """Totals over per-case results (dicts as in the report's ``cases``).

    Rates are over the cases where they apply: syntax validity over non-empty completions with a
    grammar, pass@1 over cases with tests that were run. The counts beside them say how many."""
    scored = [r for r in results if r.get("error") is None]
    non_empty = [r for r in scored if r.get("non_empty")]
    syntax = [r["syntax_valid"] for r in non_empty if r.get("syntax_valid") is not None]
    tested = [r["passed"] for r in scored if r.get("passed") is not None]
    latencies = [r["latency_ms"] for r in scored if r.get("latency_ms") is not None]
    tokens = sum(r.get("tokens") or 0 for r in scored)
    seconds = sum(latencies) / 1000
    return {
        "cases": len(results),
        "errors": len(results) - len(scored),
        "error_rate": _rounded((len(results) - len(scored)) / len(results)) if results else None,
        "exact_match": _rounded(_mean(1.0 if r["exact"] else 0.0 for r in scored)),
        "edit_similarity": _rounded(_mean(r["edit_similarity"] for r in scored)),
        "non_empty_rate": _rounded(len(non_empty) / len(scored)) if scored else None,
        "syntax_checked": len(syntax),
        "syntax_valid_rate": _rounded(_mean(1.0 if v else 0.0 for v in syntax)),
        "tested": len(tested),
        "pass_at_1": _rounded(_mean(1.0 if v else 0.0 for v in tested)),
        "latency_p50_ms": _rounded(percentile(latencies, 50), 1),
        "latency_p95_ms": _rounded(percentile(latencies, 95), 1),
        "tokens": tokens,
        "tokens_per_s": _rounded(tokens / seconds, 1) if seconds > 0 else None,
    }


def group_by(results: Sequence[dict], key: str) -> dict[str, dict]:
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(str(r.get(key)), []).append(r)
    return {name: aggregate(rows) for name, rows in sorted(groups.items())}
