"""difill eval with the real bundled model: the runner's invariants, the CLI end to end (reports,
baseline exit codes) and repository mode. Nothing here depends on how good the model is."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from difill.cli import main as difill_main
from difill.evaluation.cases import Case, load_cases, write_cases
from difill.evaluation.cli import FIMSET
from difill.evaluation.repo import RepoError, RepoSettings, evaluate_repo
from difill.evaluation.runner import Settings, evaluate
from difill.evaluation.sandbox import Limits

ADD = Case(id="add", language="python", prefix="def add(a, b):\n    return ", suffix="\n", reference="a + b",
           kind="expression", tests="assert add(2, 3) == 5\n")


@pytest.fixture(scope="module")
def engine():
    from difill.inference.engine import Engine

    return Engine.load()


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    python = load_cases([FIMSET / "python.jsonl"], kinds=["line"], limit=2)
    go = load_cases([FIMSET / "go.jsonl"], kinds=["block"], limit=1)
    return [ADD] + python + go


def _check_row(row: dict) -> None:
    assert row["error"] is None, row["error"]
    assert isinstance(row["completion"], str)
    assert 0.0 <= row["edit_similarity"] <= 1.0
    assert row["non_empty"] == bool(row["completion"].strip())
    if row["exact"]:
        assert row["edit_similarity"] == pytest.approx(1.0)
    if not row["non_empty"]:
        assert row["syntax_valid"] is None
    assert row["latency_ms"] > 0 and row["tokens"] >= 0 and row["steps"] >= 0
    assert row["ok"] == (row["passed"] if row["passed"] is not None else row["exact"])


def test_model_completions_are_scored(engine, cases):
    rows = evaluate(cases, engine, Settings(limits=Limits(timeout_s=5)), progress=False)
    assert [r["id"] for r in rows] == [c.id for c in cases]
    for row in rows:
        _check_row(row)
    assert rows[0]["passed"] is not None  # the case with tests ran them, whatever the model wrote
    assert rows[1]["passed"] is None  # mined cases have no tests


def test_a_failing_completion_is_a_row_not_a_crash(engine):
    bad = Case(id="bad", language="python", prefix="x = ", suffix="", reference="1")

    def explode(case):
        raise RuntimeError("backend fell over")

    rows = evaluate([bad], engine, progress=False, complete=explode)
    assert rows[0]["error"] == "RuntimeError: backend fell over" and rows[0]["ok"] is False


def test_cli_reports_and_baseline_exit_codes(tmp_path, cases, capsys):
    data = tmp_path / "cases.jsonl"
    write_cases(cases, data)
    worse = tmp_path / "worse.json"
    worse.write_text(json.dumps({"metrics": {"exact_match": 0.0, "edit_similarity": 0.0, "syntax_valid_rate": 0.0,
                                             "pass_at_1": 0.0}, "cases": []}))
    report, junit, summary = tmp_path / "r.json", tmp_path / "j.xml", tmp_path / "s.md"
    status = difill_main(["eval", str(data), "--report", str(report), "--junit", str(junit), "--summary", str(summary),
                          "--baseline", str(worse), "--timeout", "5", "--quiet"])
    assert status == 0
    first = json.loads(report.read_text())
    assert first["metrics"]["cases"] == len(cases) and first["metrics"]["tested"] == 1
    assert set(first["by_language"]) == {"python", "go"}
    assert {"metrics", "by_kind", "by_language", "cases"} <= set(first)
    root = ET.parse(junit).getroot()
    assert len(root.findall(".//testcase")) == len(cases)
    assert "no metric regressed" in capsys.readouterr().out

    better = json.loads(report.read_text())
    better["metrics"]["exact_match"] = first["metrics"]["exact_match"] + 0.5  # out of reach: must regress
    for case in better["cases"]:
        case["ok"] = True
    baseline = tmp_path / "better.json"
    baseline.write_text(json.dumps(better))
    summary2 = tmp_path / "s2.md"
    status = difill_main(["eval", str(data), "--report", str(tmp_path / "r2.json"), "--summary", str(summary2),
                          "--baseline", str(baseline), "--quiet", "--timeout", "5"])
    assert status == 1
    second = json.loads((tmp_path / "r2.json").read_text())
    failing = sorted(c["id"] for c in second["cases"] if not c["ok"])
    assert second["baseline"]["pass_to_fail"] == failing
    text = summary2.read_text()
    assert "Regressed" in text and all(f"`{i}`" in text for i in failing)
    assert "REGRESSED exact_match" in capsys.readouterr().out


def test_cli_usage_errors_exit_2(tmp_path, capsys):
    assert difill_main(["eval", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    data = tmp_path / "c.jsonl"
    write_cases([ADD], data)
    assert difill_main(["eval", str(data), "--tolerance", "speed=1"]) == 2
    assert "unknown metric" in capsys.readouterr().err
    (tmp_path / "b.json").write_text("[1, 2]")
    assert difill_main(["eval", str(data), "--baseline", str(tmp_path / "b.json")]) == 2
    assert "not a difill eval report" in capsys.readouterr().err
    assert difill_main(["eval", str(data), "--language", "cobol"]) == 2
    assert "no cases" in capsys.readouterr().err


CALC = '''def double(x):
    return x * 2


def clamp(x, lo, hi):
    if x < lo:
        return lo
    if x > hi:
        return hi
    return x


def mean(values):
    total = sum(values)
    return total / len(values)
'''

TEST_CALC = '''from calc import clamp, double, mean


def test_calc():
    assert double(4) == 8
    assert clamp(5, 0, 3) == 3 and clamp(-1, 0, 3) == 0 and clamp(2, 0, 3) == 2
    assert mean([1, 2, 3]) == 2
'''


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "calc-repo"
    root.mkdir()
    (root / "calc.py").write_text(CALC)
    (root / "test_calc.py").write_text(TEST_CALC)
    return root


TEST_CMD = f"{sys.executable} -m pytest -x -q -p no:cacheprovider"


def test_repo_mode_fills_holes_and_runs_the_repos_tests(repo, tmp_path, capsys):
    report = tmp_path / "repo.json"
    status = difill_main(["eval", "repo", str(repo), "--test-cmd", TEST_CMD, "--holes", "3", "--timeout", "120",
                          "--report", str(report), "--quiet"])
    assert status == 0
    data = json.loads(report.read_text())
    assert data["repo"]["holes"] == 3 == len(data["cases"])
    assert data["repo"]["holes_passing"] == sum(1 for c in data["cases"] if c["passed"])
    for case in data["cases"]:
        assert case["passed"] in (True, False) and case["id"].startswith("calc-repo/calc.py:")  # never in the tests
        if case["completion"] == case["reference"]:
            assert case["passed"]
    assert (repo / "calc.py").read_text() == CALC  # the original is never written
    assert "holes keep" in capsys.readouterr().out


def test_repo_mode_refuses_a_repository_whose_tests_already_fail(repo):
    (repo / "test_calc.py").write_text(TEST_CALC + "\n\ndef test_broken():\n    assert False\n")
    with pytest.raises(RepoError, match="fails on the unmodified repository"):
        evaluate_repo(repo, engine=None, settings=RepoSettings(test_cmd=TEST_CMD, holes=1, limits=Limits(timeout_s=120)),
                      progress=False)


def test_holes_go_in_code_the_tests_run():
    from difill.evaluation.repo import is_hole_candidate

    assert is_hole_candidate("pkg/core.py") and is_hole_candidate("src/lib.rs")
    for rel in ("tests/test_core.py", "test_core.py", "pkg/conftest.py", "web/app.test.js", "cmd/main_test.go",
                "pkg/core.pyi", "src/__tests__/a.ts"):
        assert not is_hole_candidate(rel), rel
