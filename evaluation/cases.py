"""Fill-in-the-middle cases and the three JSON Lines formats they come in.

One :class:`Case` is a hole in a file: the text before it (``prefix``), the text after it
(``suffix``), the text that was there (``reference``) and, where the source has them, tests that
decide whether a completion works. Three formats are read, detected line by line, so that one
harness scores difill's own set, HumanEval-infilling and SAFIM alike:

* difill's own: ``id``, ``language``, ``prefix``, ``suffix``, ``reference``, optional ``tests``
  (Python source run after the program, or a list of ``{"input", "output"}`` stdin/stdout pairs),
  optional ``kind`` (how the hole was chosen) and ``path``.
* HumanEval-infilling: ``task_id``, ``prompt``, ``suffix``, ``canonical_solution``, ``test``,
  ``entry_point`` (the test defines ``check(candidate)``).
* SAFIM: ``task_id``, ``lang``, ``eval_prompt`` (the program with ``{{completion}}`` where the middle
  goes), ``ground_truth``, ``unit_tests`` (stdin/stdout pairs; empty for the API split).
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)

SAFIM_HOLE = "{{completion}}"
FORMATS = ("difill", "humaneval", "safim")

# SAFIM's language names are difill's except C#, which difill has no grammar for.
SAFIM_LANGUAGES = {"python": "python", "cpp": "cpp", "java": "java", "csharp": "csharp"}


class CaseFormatError(ValueError):
    """A line that is none of the three formats, or a field of the wrong type."""


@dataclass
class Case:
    id: str
    language: str
    prefix: str
    suffix: str
    reference: str
    kind: str = "unknown"
    tests: str | list[dict] | None = None  # Python test code, or stdin/stdout pairs
    path: str | None = None  # file name, for language detection and reports
    source: str = "difill"  # the format the case was read from
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        """difill's own format (what ``difill eval mine`` writes)."""
        row = {"id": self.id, "language": self.language, "kind": self.kind, "prefix": self.prefix,
               "suffix": self.suffix, "reference": self.reference}
        if self.tests is not None:
            row["tests"] = self.tests
        if self.path:
            row["path"] = self.path
        if self.meta:
            row["meta"] = self.meta
        return row

    @property
    def has_tests(self) -> bool:
        return bool(self.tests)


def detect_format(row: dict) -> str:
    """Which of the three formats a parsed JSON line is in (by its fields)."""
    if "eval_prompt" in row and "ground_truth" in row:
        return "safim"
    if "canonical_solution" in row and "prompt" in row:
        return "humaneval"
    if "prefix" in row and "reference" in row:
        return "difill"
    keys = ", ".join(sorted(row)[:8])
    raise CaseFormatError(f"unknown case format (fields: {keys}); expected difill's (prefix, suffix, reference), "
                          "HumanEval-infilling's (prompt, suffix, canonical_solution) or SAFIM's (eval_prompt, ground_truth)")


def _string(row: dict, name: str, default: str | None = None) -> str:
    value = row.get(name, default)
    if not isinstance(value, str):
        if value is None:
            raise CaseFormatError(f"missing field {name!r}")
        raise CaseFormatError(f"field {name!r} must be a string, not {type(value).__name__}")
    return value


def _check_io_tests(tests: Any) -> list[dict]:
    if not isinstance(tests, list) or not all(isinstance(t, dict) and "input" in t and "output" in t for t in tests):
        raise CaseFormatError("tests must be Python code (a string) or a list of {\"input\", \"output\"} objects")
    return tests


def _humaneval_kind(task_id: str) -> str:
    """'SingleLineInfilling/HumanEval/0/L0' -> 'single-line' (the three HumanEval-infilling splits)."""
    head = task_id.split("/", 1)[0]
    return {"SingleLineInfilling": "single-line", "MultiLineInfilling": "multi-line",
            "RandomSpanInfilling": "random-span", "RandomSpanInfillingLight": "random-span"}.get(head, "humaneval")


def _safim_kind(row: dict, hint: str | None) -> str:
    """SAFIM's split: from the file name where known (API task ids say "block_completion"), else the id."""
    if hint in {"block", "control", "api"}:
        return hint
    if not row.get("unit_tests"):
        return "api"  # only the API split is graded without unit tests
    return "control" if str(row.get("task_id", "")).startswith("control") else "block"


def case_from_row(row: dict, split_hint: str | None = None) -> Case:
    """One parsed JSON object -> a :class:`Case`, whatever its format."""
    if not isinstance(row, dict):
        raise CaseFormatError("each line must be a JSON object")
    fmt = detect_format(row)
    if fmt == "difill":
        tests = row.get("tests")
        if tests is not None and not isinstance(tests, str):
            tests = _check_io_tests(tests)
        meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
        return Case(id=str(row.get("id") or ""), language=_string(row, "language", "") or "unknown",
                    prefix=_string(row, "prefix"), suffix=_string(row, "suffix", ""), reference=_string(row, "reference"),
                    kind=str(row.get("kind") or "unknown"), tests=tests or None, path=row.get("path"), source="difill", meta=meta)
    if fmt == "humaneval":
        entry_point = _string(row, "entry_point")
        test = _string(row, "test")
        return Case(id=_string(row, "task_id"), language="python", prefix=_string(row, "prompt"),
                    suffix=_string(row, "suffix", ""), reference=_string(row, "canonical_solution"),
                    kind=_humaneval_kind(row["task_id"]), tests=f"{test}\n\ncheck({entry_point})\n",
                    path="humaneval.py", source="humaneval", meta={"entry_point": entry_point})
    program = _string(row, "eval_prompt")
    if program.count(SAFIM_HOLE) != 1:
        raise CaseFormatError(f"SAFIM eval_prompt must contain {SAFIM_HOLE} exactly once")
    prefix, suffix = program.split(SAFIM_HOLE)
    lang = _string(row, "lang")
    tests = row.get("unit_tests") or None
    if tests is not None:
        tests = _check_io_tests(tests)
    kind = _safim_kind(row, split_hint)
    return Case(id=f"safim/{kind}/{_string(row, 'task_id')}", language=SAFIM_LANGUAGES.get(lang, lang), prefix=prefix,
                suffix=suffix, reference=_string(row, "ground_truth"), kind=kind, tests=tests, source="safim",
                meta={"task_id": row["task_id"]})


def _open_text(path: Path):
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":  # gzip, whatever the file is called
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _split_hint(path: Path) -> str | None:
    name = path.name.lower()
    for split in ("block", "control", "api"):
        if name.startswith(split):
            return split
    return None


def read_cases(path: str | Path) -> Iterator[Case]:
    """Cases from one JSON Lines file (plain or gzip). Errors name the file and line."""
    path = Path(path)
    hint = _split_hint(path)
    seen: dict[str, int] = {}
    try:
        handle = _open_text(path)
    except OSError as exc:
        raise CaseFormatError(f"{path}: {exc.strerror or exc}") from exc
    with handle:
        try:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    case = case_from_row(json.loads(line), hint)
                except json.JSONDecodeError as exc:
                    raise CaseFormatError(f"{path}:{number}: not valid JSON: {exc.msg} at column {exc.colno}") from exc
                except CaseFormatError as exc:
                    raise CaseFormatError(f"{path}:{number}: {exc}") from exc
                if not case.id:
                    case.id = f"{path.stem}:{number}"
                # Ids must be unique for baselines to compare case by case.
                if case.id in seen:
                    seen[case.id] += 1
                    case.id = f"{case.id}#{seen[case.id]}"
                else:
                    seen[case.id] = 0
                yield case
        except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
            raise CaseFormatError(f"{path}: cannot read: {exc}") from exc


def case_files(target: str | Path) -> list[Path]:
    """A file, or every ``*.jsonl`` / ``*.jsonl.gz`` in a folder (sorted, so runs are repeatable)."""
    target = Path(target)
    if target.is_dir():
        files = sorted(p for p in target.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
        if not files:
            raise CaseFormatError(f"{target}: no *.jsonl or *.jsonl.gz files in this folder")
        return files
    if not target.exists():
        raise CaseFormatError(f"{target}: no such file or folder")
    return [target]


def load_cases(targets: Iterable[str | Path], languages: Iterable[str] = (), kinds: Iterable[str] = (),
               limit: int | None = None) -> list[Case]:
    """Read, filter by language and kind, and cut to ``limit`` (in file order)."""
    languages, kinds = set(languages), set(kinds)
    cases: list[Case] = []
    for target in targets:
        for path in case_files(target):
            for case in read_cases(path):
                if languages and case.language not in languages:
                    continue
                if kinds and case.kind not in kinds:
                    continue
                cases.append(case)
                if limit is not None and len(cases) >= limit:
                    return cases
    return cases


def write_cases(cases: Iterable[Case], path: str | Path) -> int:
    """Write difill-format JSON Lines (gzip when the name ends in .gz); returns the count."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    count = 0
    with opener(path, "wt", encoding="utf-8") as f:
        for case in cases:
            f.write(json.dumps(case.to_json(), ensure_ascii=False) + "\n")
            count += 1
    return count


__all__ = ["Case", "CaseFormatError", "FORMATS", "detect_format", "case_from_row", "read_cases", "case_files",
           "load_cases", "write_cases"]
