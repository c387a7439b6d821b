"""Decide whether a completion works by running the case's tests in the sandbox.

Two kinds of tests:

* Python test code (difill's ``tests`` as a string, HumanEval's ``check``): the program
  ``prefix + completion + suffix`` followed by the test code runs as one script; exit status 0
  passes.
* stdin/stdout pairs (SAFIM, or difill's ``tests`` as a list): the program is compiled once
  (C++ with g++, Java with javac) and run on each input; its output must match one of the
  expected outputs token by token (numbers within 1e-6, as competitive-programming judges
  compare). The first failing pair ends the case.

Outcomes: ``passed``, ``failed`` (wrong answer, failed assertion, non-zero exit), ``timeout``,
``memory``, ``compile_error``, ``skipped`` (no runtime for the language on this machine).
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from difill.evaluation import sandbox
from difill.evaluation.cases import Case
from difill.evaluation.sandbox import Limits

log = logging.getLogger(__name__)

COMPILE_LIMITS = Limits(timeout_s=60.0, memory_mb=2048)
JAVA_FLAGS = ["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xss64m", "-XX:ReservedCodeCacheSize=32m",
              "-XX:CompressedClassSpaceSize=64m", "-XX:MaxMetaspaceSize=128m"]


@dataclass
class TestOutcome:
    passed: bool | None  # None: not run (skipped)
    outcome: str
    detail: str = ""
    seconds: float = 0.0
    runs: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "outcome": self.outcome, "detail": self.detail[-2000:],
                "seconds": round(self.seconds, 3), "runs": self.runs}


@functools.lru_cache(maxsize=None)
def runtime_available(language: str) -> bool:
    """Can tests in this language run here? (Python always; C++ needs g++; Java javac and java.)"""
    needs = {"python": [], "cpp": ["g++"], "c": ["gcc"], "java": ["javac", "java"]}.get(language)
    if needs is None:
        return False
    return all(shutil.which(tool) for tool in needs)


def _tokens_match(actual: str, expected: str) -> bool:
    a, b = actual.split(), expected.split()
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        try:
            fx, fy = float(x), float(y)
        except ValueError:
            return False
        if abs(fx - fy) > 1e-6 * max(1.0, abs(fy)):
            return False
    return True


def output_matches(actual: str, expected: str | list[str]) -> bool:
    """Whitespace-insensitive, token-wise comparison against any of the accepted outputs."""
    accepted = expected if isinstance(expected, list) else [expected]
    return any(_tokens_match(actual, str(e)) for e in accepted)


def _failure(result: sandbox.RunResult, what: str) -> TestOutcome:
    if result.timed_out:
        return TestOutcome(False, "timeout", f"{what}: no result within the time limit", result.seconds)
    if result.out_of_memory:
        return TestOutcome(False, "memory", f"{what}: out of memory\n{result.stderr[-1500:]}", result.seconds)
    detail = result.stderr.strip()[-1500:] or result.stdout.strip()[-1500:]
    return TestOutcome(False, "failed", f"{what}: exit status {result.returncode}\n{detail}", result.seconds)


def java_main_class(program: str) -> str:
    """The class javac must find in a file of the same name: the public one, else the one with main."""
    match = re.search(r"\bpublic\s+(?:final\s+|abstract\s+)*class\s+(\w+)", program)
    if match:
        return match.group(1)
    match = re.search(r"\bclass\s+(\w+)[^{]*\{(?:(?!\bclass\b).)*?static\s+void\s+main\s*\(", program, re.S)
    if match:
        return match.group(1)
    return "Main"


def _build(language: str, program: str, workdir: Path, limits: Limits) -> tuple[list[str] | None, TestOutcome | None]:
    """Write (and compile) the program; returns the command that runs it, or a failed outcome."""
    if language == "python":
        (workdir / "main.py").write_text(program, encoding="utf-8")
        return sandbox.python_command() + ["main.py"], None
    if language in {"cpp", "c"}:
        source = workdir / ("main.cpp" if language == "cpp" else "main.c")
        source.write_text(program, encoding="utf-8")
        compiler = ["g++", "-std=gnu++17"] if language == "cpp" else ["gcc", "-std=gnu11"]
        built = sandbox.run(compiler + ["-O2", "-o", "main", source.name, "-lm"], workdir, COMPILE_LIMITS)
        if not built.ok:
            return None, TestOutcome(False, "timeout" if built.timed_out else "compile_error", built.stderr[-2000:], built.seconds)
        return ["./main"], None
    if language == "java":
        name = java_main_class(program)
        (workdir / f"{name}.java").write_text(program, encoding="utf-8")
        built = sandbox.run(["javac", "-J-XX:+UseSerialGC", "-J-XX:TieredStopAtLevel=1", "-J-Xmx512m", "-nowarn",
                             "-encoding", "UTF-8", "-d", ".", f"{name}.java"], workdir, COMPILE_LIMITS)
        if not built.ok:
            return None, TestOutcome(False, "timeout" if built.timed_out else "compile_error", built.stderr[-2000:], built.seconds)
        heap = max(64, limits.memory_mb // 2) if limits.memory_mb else 1024
        return ["java", f"-Xmx{heap}m", *JAVA_FLAGS, "-cp", ".", name], None
    return None, TestOutcome(None, "skipped", f"no runtime for {language} tests")


def run_tests(case: Case, completion: str, limits: Limits = Limits()) -> TestOutcome:
    """Run the case's tests against ``completion``; never raises for the program's failures."""
    if not case.tests:
        return TestOutcome(None, "skipped", "no tests")
    if isinstance(case.tests, str) and case.language != "python":
        return TestOutcome(None, "skipped", "test code is only run for Python cases")
    if not runtime_available(case.language):
        return TestOutcome(None, "skipped", f"no runtime for {case.language} tests on this machine")
    program = case.prefix + completion + case.suffix
    with tempfile.TemporaryDirectory(prefix="difill-case-") as tmp:
        workdir = Path(tmp)
        if isinstance(case.tests, str):
            program = program + "\n\n" + case.tests + "\n"
            command, failed = _build("python", program, workdir, limits)
            assert command is not None
            result = sandbox.run(command, workdir, limits)
            if result.ok:
                return TestOutcome(True, "passed", "", result.seconds, 1)
            return _failure(result, "tests")
        command, failed = _build(case.language, program, workdir, limits)
        if failed is not None:
            return failed
        assert command is not None
        total = 0.0
        for number, pair in enumerate(case.tests, 1):
            result = sandbox.run(command, workdir, limits, stdin=str(pair.get("input", "")))
            total += result.seconds
            if not result.ok:
                outcome = _failure(result, f"test {number}")
                outcome.seconds, outcome.runs = total, number
                return outcome
            if not output_matches(result.stdout, pair.get("output", "")):
                expected = pair.get("output")
                shown = expected[0] if isinstance(expected, list) and expected else expected
                return TestOutcome(False, "failed", f"test {number}: wrong answer\nexpected: {str(shown)[:300]}\n"
                                   f"got: {result.stdout[:300]}", total, number)
        return TestOutcome(True, "passed", "", total, len(case.tests))
