"""Reports of a run: JSON (the baseline format), JUnit XML for CI dashboards, a Markdown summary,
and the comparison with a baseline report that decides the exit status.

The JSON report's top level::

    {"difill_eval": 1, "created": ..., "model": {...}, "sandbox": ..., "metrics": {...},
     "by_kind": {kind: metrics}, "by_language": {language: metrics},
     "by_kind_language": {"kind/language": metrics}, "cases": [row, ...]}
"""

from __future__ import annotations

import json
import math
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from difill.evaluation import metrics

REPORT_VERSION = 1

# Checked against a baseline unless --tolerance says otherwise. Quality metrics are
# deterministic for a given model (greedy decoding, seed 0); a small allowance absorbs
# float differences between machines. Timing is noisy, so it is checked only when asked.
DEFAULT_TOLERANCES = {"exact_match": 0.01, "edit_similarity": 0.01, "syntax_valid_rate": 0.02, "pass_at_1": 0.01}

_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def build_report(rows: Sequence[dict], model: dict | None = None, extra: dict | None = None) -> dict:
    for row in rows:
        row["kind_language"] = f"{row['kind']}/{row['language']}"
    report = {
        "difill_eval": REPORT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": model or {},
        "metrics": metrics.aggregate(rows),
        "by_kind": metrics.group_by(rows, "kind"),
        "by_language": metrics.group_by(rows, "language"),
        "by_kind_language": metrics.group_by(rows, "kind_language"),
        "cases": [{k: v for k, v in row.items() if k != "kind_language"} for row in rows],
    }
    if extra:
        report.update(extra)
    for row in rows:
        row.pop("kind_language", None)
    return report


def write_json(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def load_report(path: str | Path) -> dict:
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the baseline: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the baseline is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(report, dict) or not isinstance(report.get("metrics"), dict):
        raise ValueError(f"{path}: not a difill eval report (no 'metrics' object)")
    return report


def _xml_text(text: str | None, limit: int = 4000) -> str:
    return _XML_INVALID.sub("\ufffd", (text or "")[:limit])


def write_junit(report: dict, path: str | Path, name: str = "difill-eval") -> None:
    """One testcase per FIM case; a failure where the completion is neither exact nor passing."""
    cases = report["cases"]
    failures = sum(1 for c in cases if not c.get("ok") and not c.get("error"))
    errors = sum(1 for c in cases if c.get("error"))
    total_s = sum((c.get("latency_ms") or 0) for c in cases) / 1000
    suites = ET.Element("testsuites", name=name, tests=str(len(cases)), failures=str(failures), errors=str(errors),
                        time=f"{total_s:.3f}")
    suite = ET.SubElement(suites, "testsuite", name=name, tests=str(len(cases)), failures=str(failures),
                          errors=str(errors), time=f"{total_s:.3f}", timestamp=report.get("created", ""))
    properties = ET.SubElement(suite, "properties")
    for key, value in report["metrics"].items():
        ET.SubElement(properties, "property", name=key, value=_xml_text("" if value is None else str(value)))
    for case in cases:
        testcase = ET.SubElement(suite, "testcase", classname=_xml_text(f"{case['language']}.{case['kind']}"),
                                 name=_xml_text(case["id"]), time=f"{(case.get('latency_ms') or 0) / 1000:.3f}")
        if case.get("error"):
            element = ET.SubElement(testcase, "error", message=_xml_text(case["error"], 300), type="error")
            element.text = _xml_text(case["error"])
        elif not case.get("ok"):
            if case.get("passed") is False:
                message = f"tests {case.get('test_outcome')}"
            else:
                message = f"not an exact match (edit similarity {case['edit_similarity']:.2f})"
            element = ET.SubElement(testcase, "failure", message=_xml_text(message, 300), type="mismatch")
            element.text = _xml_text(f"expected:\n{case['reference']}\n\ngot:\n{case['completion']}\n"
                                     + (f"\n{case['test_detail']}" if case.get("test_detail") else ""))
    ET.indent(suites)
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)


def parse_tolerance(spec: str) -> tuple[str, float | None, bool]:
    """'exact_match=0.02' -> ('exact_match', 0.02, False); 'latency_p95_ms=25%' -> (.., 25.0, True);
    'tokens_per_s=off' -> (.., None, False): not checked."""
    if "=" not in spec:
        raise ValueError(f"--tolerance {spec!r}: expected METRIC=VALUE (e.g. exact_match=0.02 or latency_p95_ms=20%)")
    name, value = (s.strip() for s in spec.split("=", 1))
    if name not in metrics.HIGHER_IS_BETTER:
        raise ValueError(f"--tolerance {spec!r}: unknown metric {name!r} (one of {', '.join(metrics.HIGHER_IS_BETTER)})")
    if value.lower() in {"off", "none"}:
        return name, None, False
    relative = value.endswith("%")
    try:
        number = float(value.rstrip("%"))
    except ValueError:
        raise ValueError(f"--tolerance {spec!r}: {value!r} is not a number") from None
    if number < 0 or math.isnan(number):
        raise ValueError(f"--tolerance {spec!r}: a tolerance cannot be negative")
    return name, number, relative


@dataclass
class Comparison:
    regressions: list[dict] = field(default_factory=list)
    checked: list[dict] = field(default_factory=list)
    pass_to_fail: list[str] = field(default_factory=list)
    fail_to_pass: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # baseline cases this run did not have

    @property
    def regressed(self) -> bool:
        return bool(self.regressions)

    def to_dict(self) -> dict:
        return {"regressed": self.regressed, "regressions": self.regressions, "checked": self.checked,
                "pass_to_fail": self.pass_to_fail, "fail_to_pass": self.fail_to_pass, "missing": self.missing}


def compare(report: dict, baseline: dict, tolerances: Sequence[str] = ()) -> Comparison:
    """Overall metrics against the baseline's, each within its tolerance, plus case-by-case changes."""
    allowed: dict[str, tuple[float | None, bool]] = {k: (v, False) for k, v in DEFAULT_TOLERANCES.items()}
    for spec in tolerances:
        name, value, relative = parse_tolerance(spec)
        allowed[name] = (value, relative)
    result = Comparison()
    for name, (tolerance, relative) in allowed.items():
        if tolerance is None:
            continue
        new, old = report["metrics"].get(name), baseline["metrics"].get(name)
        if new is None or old is None:
            continue
        slack = abs(old) * tolerance / 100 if relative else tolerance
        worse = (old - new) if metrics.HIGHER_IS_BETTER[name] else (new - old)
        entry = {"metric": name, "baseline": old, "current": new, "tolerance": f"{tolerance:g}{'%' if relative else ''}",
                 "regressed": worse > slack + 1e-12}
        result.checked.append(entry)
        if entry["regressed"]:
            result.regressions.append(entry)
    before = {c["id"]: bool(c.get("ok")) for c in baseline.get("cases", [])}
    now = {c["id"]: bool(c.get("ok")) for c in report["cases"]}
    result.pass_to_fail = sorted(i for i, ok in now.items() if before.get(i) is True and not ok)
    result.fail_to_pass = sorted(i for i, ok in now.items() if before.get(i) is False and ok)
    result.missing = sorted(set(before) - set(now))
    return result


def _fmt(value, name: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not name.endswith(("_ms", "_per_s")):
        return f"{value:.3f}"
    return f"{value}"


COLUMNS = ("cases", "exact_match", "edit_similarity", "non_empty_rate", "syntax_valid_rate", "pass_at_1", "tested",
           "latency_p50_ms", "latency_p95_ms", "tokens_per_s", "errors")


def _table(groups: dict[str, dict], first: str) -> list[str]:
    lines = [f"| {first} | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for name, values in groups.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(values.get(c), c) for c in COLUMNS) + " |")
    return lines


def summary_markdown(report: dict, comparison: Comparison | None = None, max_listed: int = 50) -> str:
    model = report.get("model") or {}
    lines = ["# difill eval", ""]
    if model:
        lines.append(f"Model `{model.get('model', '?')}` ({model.get('parameters', '?')} parameters, "
                     f"{model.get('backend', '?')}, {model.get('device', '?')}); sandbox: {report.get('sandbox', '?')}.")
        lines.append("")
    lines += _table({"all": report["metrics"]}, "run") + ["", "## By kind", ""] + _table(report["by_kind"], "kind")
    lines += ["", "## By language", ""] + _table(report["by_language"], "language")
    crossed = report.get("by_kind_language") or {}
    if 1 < len(crossed) <= 48 and len(crossed) > max(len(report["by_kind"]), len(report["by_language"])):
        lines += ["", "## By kind and language", ""] + _table(crossed, "kind/language")
    if comparison is not None:
        lines += ["", "## Against the baseline", ""]
        lines.append("**Regressed**: " + ", ".join(f"`{r['metric']}` {r['baseline']} → {r['current']} (tolerance {r['tolerance']})"
                                                  for r in comparison.regressions) if comparison.regressed
                     else "No metric regressed beyond its tolerance.")
        lines += ["", "| metric | baseline | current | tolerance | |", "|---|---:|---:|---:|---|"]
        for entry in comparison.checked:
            lines.append(f"| {entry['metric']} | {_fmt(entry['baseline'], entry['metric'])} | "
                         f"{_fmt(entry['current'], entry['metric'])} | {entry['tolerance']} | "
                         f"{'regressed' if entry['regressed'] else 'ok'} |")
        lines += ["", f"### Cases that went from pass to fail ({len(comparison.pass_to_fail)})", ""]
        lines += [f"- `{i}`" for i in comparison.pass_to_fail[:max_listed]] or ["None."]
        if len(comparison.pass_to_fail) > max_listed:
            lines.append(f"- … and {len(comparison.pass_to_fail) - max_listed} more (see the JSON report)")
        lines += ["", f"Cases that went from fail to pass: {len(comparison.fail_to_pass)}."]
        if comparison.missing:
            lines.append(f"Baseline cases not in this run: {len(comparison.missing)}.")
    return "\n".join(lines) + "\n"
