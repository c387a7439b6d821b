"""Repository mode: ``difill eval repo PATH --test-cmd "pytest -x -q" --holes N``.

Like llm-ls' testbed: punch holes in a real repository, fill each with difill, and run the
repository's own test command on the result. A hole counts as passing when the tests still
pass with difill's fill in place. Everything happens in a temporary copy of the repository,
under the sandbox's limits (time, memory, no network); the original is never written.

The test command runs in the copy's root with this process's environment. For Python
projects the copy's root (and its ``src/``) are put first on PYTHONPATH, so that the copy is
what the tests import even when the project is installed in editable mode.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from difill.evaluation import sandbox
from difill.evaluation.cases import Case
from difill.evaluation.mining import KINDS, mine_holes
from difill.evaluation.runner import Progress, score
from difill.evaluation.sandbox import Limits

log = logging.getLogger(__name__)

TEST_FILE = re.compile(r"(^|/)(tests?|testing|__tests__|spec)/|(^|/)test_[^/]*$|_test\.[a-z]+$|\.(test|spec)\.[a-z]+$|"
                       r"(^|/)conftest\.py$")
COPY_IGNORE = shutil.ignore_patterns("__pycache__", ".pytest_cache", ".mypy_cache", ".tox", ".nox", ".ruff_cache")


class RepoError(Exception):
    """The repository cannot be evaluated (no tests that pass, nothing to mine)."""


@dataclass
class RepoSettings:
    test_cmd: str
    holes: int = 10
    seed: int = 0
    kinds: tuple[str, ...] = KINDS
    languages: tuple[str, ...] = ()
    limits: Limits = Limits(timeout_s=600.0, memory_mb=8192)
    mode: str = "auto"


def is_test_file(rel: str) -> bool:
    """Holes go in the code under test, not in the tests themselves."""
    return bool(TEST_FILE.search(rel))


def is_hole_candidate(rel: str) -> bool:
    """Code the tests run: not the tests, and not type stubs (``.pyi``), which never execute."""
    return not is_test_file(rel) and not rel.endswith(".pyi")


def _run_tests(copy: Path, settings: RepoSettings) -> sandbox.RunResult:
    python_path = ":".join(str(p) for p in (copy, copy / "src") if p.is_dir())
    return sandbox.run([settings.test_cmd], copy, settings.limits, shell=True, inherit_env=True,
                       env={"PYTHONPATH": python_path, "PYTHONDONTWRITEBYTECODE": "1"})


def evaluate_repo(path: str | Path, engine, settings: RepoSettings, progress: bool = True) -> tuple[list[dict], dict]:
    """Fill ``settings.holes`` holes one at a time and run the tests after each; returns the
    result rows (``passed`` says whether the tests passed) and facts about the run."""
    from difill.inference.engine import InfillRequest

    source = Path(path)
    if not source.is_dir():
        raise RepoError(f"{source}: not a folder")
    with tempfile.TemporaryDirectory(prefix="difill-repo-") as tmp:
        copy = Path(tmp) / source.resolve().name
        shutil.copytree(source, copy, symlinks=True, ignore=COPY_IGNORE)
        baseline = _run_tests(copy, settings)
        if not baseline.ok:
            why = "timed out" if baseline.timed_out else f"exit status {baseline.returncode}"
            raise RepoError(f"the test command fails on the unmodified repository ({why}): "
                            f"{(baseline.stdout + baseline.stderr).strip()[-800:]}")
        log.info("tests pass on the unmodified copy in %.1f s", baseline.seconds)
        holes, texts = mine_holes(copy, n=settings.holes, seed=settings.seed, kinds=settings.kinds,
                                  languages=settings.languages, include=is_hole_candidate)
        if not holes:
            raise RepoError(f"{source}: no source files to punch holes in (outside the tests, in a supported language)")
        bar = Progress(len(holes), enabled=progress)
        rows = []
        for hole in holes:
            text = texts[hole.path]
            case = Case(id=f"{source.resolve().name}/{hole.path}:{hole.line}:{hole.kind}", language=hole.language,
                        prefix=text[:hole.start], suffix=text[hole.end:], reference=text[hole.start:hole.end],
                        kind=hole.kind, path=hole.path, source="repo")
            try:
                result = engine.infill(InfillRequest(prefix=case.prefix, suffix=case.suffix, path=hole.path,
                                                     language=hole.language, mode=settings.mode))
            except (ValueError, RuntimeError) as exc:
                row = score(case, "", error=f"{type(exc).__name__}: {exc}")
                rows.append(row)
                bar.update(row)
                continue
            row = score(case, result.completion, latency_ms=result.latency_ms, tokens=result.tokens, steps=result.steps, run=False)
            row["id"] = case.id
            if result.completion == case.reference:
                row["passed"], row["test_outcome"] = True, "reference"
            else:
                target = copy / hole.path
                target.write_text(case.prefix + result.completion + case.suffix, encoding="utf-8")
                try:
                    run = _run_tests(copy, settings)
                finally:
                    target.write_text(text, encoding="utf-8")
                row["passed"] = run.ok
                row["test_outcome"] = "passed" if run.ok else ("timeout" if run.timed_out else "failed")
                if not run.ok:
                    row["test_detail"] = (run.stdout + run.stderr).strip()[-1500:]
            row["ok"] = bool(row["passed"])
            rows.append(row)
            bar.update(row)
    info = {"repository": str(source.resolve()), "test_cmd": settings.test_cmd, "baseline_test_seconds": round(baseline.seconds, 2),
            "holes": len(rows), "holes_passing": sum(1 for r in rows if r.get("passed"))}
    return rows, info
