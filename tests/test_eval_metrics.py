"""difill eval without a model: metrics on known completions, the three case formats, the
sandbox's limits, test execution, JUnit XML and the baseline comparison."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from difill.evaluation import metrics, report as reports, sandbox
from difill.evaluation.cases import Case, CaseFormatError, case_from_row, detect_format, load_cases, read_cases
from difill.evaluation.execution import java_main_class, output_matches, run_tests, runtime_available
from difill.evaluation.runner import score
from difill.evaluation.sandbox import Limits

SAFIM = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "safim"

# A Python case with tests: the hole is the body of a function.
ADD = Case(id="add", language="python", prefix="def add(a, b):\n    return ", suffix="\n", reference="a + b",
           kind="expression", tests="assert add(2, 3) == 5\nassert add(-1, 1) == 0\n")


# ---------------------------------------------------------------- metrics on known completions
def test_levenshtein_and_edit_similarity_known_values():
    assert metrics.levenshtein("kitten", "sitting") == 3
    assert metrics.levenshtein("", "abc") == 3
    assert metrics.levenshtein("same", "same") == 0
    assert metrics.edit_similarity("abc", "abd") == pytest.approx(2 / 3)
    assert metrics.edit_similarity("", "") == 1.0
    assert metrics.edit_similarity("", "x") == 0.0
    assert metrics.edit_similarity("x = 1\r\n", "x = 1") == 1.0  # line ends and outer whitespace do not count


def test_exact_match_normalises_whitespace_only():
    assert metrics.exact_match("a  +\n b ", "a + b")
    assert not metrics.exact_match("a+b", "a + b")
    assert not metrics.exact_match("", "a + b")


def test_percentile():
    assert metrics.percentile([], 50) is None
    assert metrics.percentile([5.0], 95) == 5.0
    assert metrics.percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert metrics.percentile(list(range(101)), 95) == pytest.approx(95)


def test_perfect_completion():
    row = score(ADD, "a + b")
    assert row["exact"] and row["ok"] and row["non_empty"]
    assert row["edit_similarity"] == 1.0
    assert row["syntax_valid"] is True
    assert row["passed"] is True


def test_perfect_but_differently_spaced_completion_runs_the_tests():
    row = score(ADD, "a +  b")
    assert row["exact"] and row["passed"] is True and row["test_outcome"] == "passed"


def test_empty_completion():
    row = score(ADD, "")
    assert not row["exact"] and not row["non_empty"] and not row["ok"]
    assert row["edit_similarity"] == 0.0
    assert row["syntax_valid"] is None  # only non-empty completions are checked
    assert row["passed"] is False  # `return` alone returns None


def test_syntax_error_completion():
    row = score(ADD, "a + (b")
    assert row["syntax_valid"] is False
    assert row["passed"] is False and row["test_outcome"] == "failed"
    assert 0 < row["edit_similarity"] < 1


def test_syntax_is_judged_against_the_reference_not_against_zero():
    # The prefix is cut mid-expression: the file never parses, but a completion that adds no
    # error is as valid as the reference.
    case = Case(id="cut", language="python", prefix="x = (1,\n", suffix="\n", reference="y = 2", kind="line")
    assert metrics.syntax_errors(case.prefix + case.reference + case.suffix, "python") > 0
    assert score(case, "y = 2", run=False)["syntax_valid"] is True


def test_language_without_grammar_has_no_syntax_verdict():
    case = Case(id="cs", language="csharp", prefix="class A { int f() { return ", suffix="; } }", reference="1")
    assert score(case, "1")["syntax_valid"] is None


def test_failing_test():
    row = score(ADD, "a - b")
    assert row["passed"] is False and row["test_outcome"] == "failed"
    assert "AssertionError" in row["test_detail"]


def test_hanging_test_times_out_without_hanging_the_harness():
    start = time.perf_counter()
    row = score(ADD, "next(x for x in iter(int, 1) if x)", limits=Limits(timeout_s=1.5))  # loops forever
    assert row["passed"] is False and row["test_outcome"] == "timeout"
    assert time.perf_counter() - start < 10


def test_aggregate_counts_syntax_over_non_empty_and_pass_over_tested():
    rows = [score(ADD, "a + b"), score(ADD, ""), score(ADD, "a + (b"), score(ADD, "a - b", run=False)]
    for row, latency in zip(rows, (100.0, 200.0, 300.0, 400.0)):
        row["latency_ms"], row["tokens"] = latency, 5
    m = metrics.aggregate(rows)
    assert m["cases"] == 4 and m["errors"] == 0
    assert m["exact_match"] == 0.25
    assert m["non_empty_rate"] == 0.75
    assert m["syntax_checked"] == 3 and m["syntax_valid_rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["tested"] == 3 and m["pass_at_1"] == pytest.approx(1 / 3, abs=1e-4)
    assert m["latency_p50_ms"] == 250.0
    assert m["tokens_per_s"] == pytest.approx(20 / 1.0)
    grouped = metrics.group_by(rows, "kind")
    assert list(grouped) == ["expression"] and grouped["expression"]["cases"] == 4


# ---------------------------------------------------------------- formats
def test_detect_three_formats():
    difill = {"id": "a", "language": "python", "prefix": "x = ", "suffix": "\n", "reference": "1"}
    humaneval = {"task_id": "SingleLineInfilling/HumanEval/0/L0", "entry_point": "f", "prompt": "def f():\n    return ",
                 "suffix": "\n", "canonical_solution": "1", "test": "def check(candidate):\n    assert candidate() == 1\n"}
    safim = {"task_id": "block_completion_000001", "lang": "python", "prompt": "...", "ground_truth": "print(1)",
             "eval_prompt": "{{completion}}\n", "unit_tests": [{"input": "", "output": ["1"]}]}
    assert [detect_format(r) for r in (difill, humaneval, safim)] == ["difill", "humaneval", "safim"]
    he = case_from_row(humaneval)
    assert he.kind == "single-line" and he.language == "python" and "check(f)" in he.tests
    assert score(he, "1")["passed"] is True
    assert score(he, "2")["passed"] is False
    sa = case_from_row(safim)
    assert sa.prefix == "" and sa.suffix == "\n" and sa.kind == "block" and sa.tests[0]["output"] == ["1"]
    assert score(sa, "print( 1 )")["passed"] is True
    with pytest.raises(CaseFormatError, match="unknown case format"):
        detect_format({"text": "x"})
    with pytest.raises(CaseFormatError, match="exactly once"):
        case_from_row({**safim, "eval_prompt": "no hole"})
    with pytest.raises(CaseFormatError, match="must be a string"):
        case_from_row({**difill, "prefix": 3})


def test_read_cases_gzip_mixed_formats_and_line_numbers_in_errors(tmp_path):
    rows = [{"id": "a", "language": "python", "prefix": "x = ", "suffix": "\n", "reference": "1", "kind": "line"},
            {"task_id": "RandomSpanInfilling/HumanEval/1/0", "entry_point": "g", "prompt": "def g():\n    return ",
             "suffix": "\n", "canonical_solution": "2", "test": "def check(c):\n    assert c() == 2\n"}]
    path = tmp_path / "mixed.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n\n")
    cases = list(read_cases(path))
    assert [c.source for c in cases] == ["difill", "humaneval"]
    assert [c.kind for c in load_cases([path], kinds=["random-span"])] == ["random-span"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(CaseFormatError, match=r"bad.jsonl:2: not valid JSON"):
        list(read_cases(bad))


@pytest.mark.skipif(not SAFIM.is_dir(), reason="SAFIM data is not beside the repository")
def test_real_safim_lines_in_all_three_splits():
    seen = {}
    for split in ("block", "control", "api"):
        cases = list(itertools.islice(read_cases(SAFIM / f"{split}_completion.jsonl.gz"), 40))
        assert all(c.source == "safim" and c.kind == split for c in cases)
        assert all(c.language in {"python", "cpp", "java", "csharp"} for c in cases)
        seen[split] = cases
    assert all(c.tests for c in seen["block"] + seen["control"])
    assert not any(c.tests for c in seen["api"])  # the API split is graded by match, not by tests
    python = next(c for c in seen["block"] if c.language == "python")
    assert run_tests(python, python.reference).passed is True
    assert run_tests(python, "pass").passed is False


@pytest.mark.skipif(not SAFIM.is_dir() or not runtime_available("cpp") or not runtime_available("java"),
                    reason="needs SAFIM data, g++, javac and java")
def test_real_safim_cpp_and_java_reference_solutions_pass():
    cases = list(itertools.islice(read_cases(SAFIM / "control_completion.jsonl.gz"), 30))
    for language in ("cpp", "java"):
        case = next(c for c in cases if c.language == language)
        outcome = run_tests(case, case.reference, Limits(timeout_s=10))
        assert outcome.passed is True, outcome.detail
        assert run_tests(case, case.reference + " +", Limits(timeout_s=10)).outcome == "compile_error"


def test_output_comparison_and_java_class_name():
    assert output_matches("1 2\n3\n", ["1 2 3"])
    assert output_matches("0.3333333", "0.33333333")
    assert not output_matches("1 2", ["1 2 3"])
    assert java_main_class("import x;\npublic final class Sol { }") == "Sol"
    assert java_main_class("class A {}\nclass B { public static void main(String[] a) {} }") == "B"


# ---------------------------------------------------------------- sandbox
def test_sandbox_timeout_kills_the_whole_process_group(tmp_path):
    start = time.perf_counter()
    result = sandbox.run(["/bin/sh", "-c", "sleep 30 & sleep 30; wait"], tmp_path, Limits(timeout_s=1))
    assert result.timed_out and not result.ok
    assert time.perf_counter() - start < 8


def test_sandbox_memory_limit(tmp_path):
    script = "x = bytearray(600 * 2**20)\nprint('allocated')\n"
    limited = sandbox.run(sandbox.python_command() + ["-c", script], tmp_path, Limits(timeout_s=20, memory_mb=256))
    assert not limited.ok and limited.out_of_memory and "allocated" not in limited.stdout
    free = sandbox.run(sandbox.python_command() + ["-c", script], tmp_path, Limits(timeout_s=20, memory_mb=2048))
    assert free.ok and "allocated" in free.stdout


def test_sandbox_output_is_capped_and_stdin_is_passed(tmp_path):
    flood = sandbox.run(sandbox.python_command() + ["-c", "import sys\nwhile True: sys.stdout.write('x' * 65536)"],
                        tmp_path, Limits(timeout_s=20, file_mb=1))
    assert not flood.ok and not flood.timed_out  # killed by the file size limit, not by the clock
    assert len(flood.stdout) <= sandbox.OUTPUT_LIMIT
    echo = sandbox.run(sandbox.python_command() + ["-c", "print(input()[::-1])"], tmp_path, stdin="abc\n")
    assert echo.ok and echo.stdout.strip() == "cba"


def test_sandbox_has_no_network(tmp_path):
    script = ("import socket\ns = socket.socket()\ns.settimeout(2)\n"
              "try:\n    s.connect(('127.0.0.1', 9))\nexcept OSError as e:\n    print('refused', e)\n"
              "else:\n    print('connected')\n")
    result = sandbox.run(sandbox.python_command() + ["-c", script], tmp_path, Limits(timeout_s=10))
    assert result.ok and result.stdout.startswith("refused")
    if sandbox.network_isolation():  # in a network namespace even the interfaces are gone
        listing = sandbox.run(sandbox.python_command() + ["-c", "import socket; print(socket.if_nameindex())"], tmp_path)
        assert "eth" not in listing.stdout



def test_sandbox_runs_no_python_between_fork_and_exec(tmp_path):
    """The harness runs inside threaded programs; a child that runs Python before exec (to set
    its limits) blocks for ever on a lock another thread held at the fork, and Popen with it.
    The at-fork hook below stands for that lock: it blocks any child that runs Python code."""
    program = ("import os, sys, threading\nfrom pathlib import Path\nfrom difill.evaluation import sandbox\n"
               "os.register_at_fork(after_in_child=lambda: threading.Event().wait())\n"
               "print(sandbox.run(['/bin/sh', '-c', 'ulimit -t'], Path(sys.argv[1]), sandbox.Limits(timeout_s=5)).stdout)\n")
    harness = subprocess.Popen([sys.executable, "-c", program, str(tmp_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = harness.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(harness.pid, signal.SIGKILL)  # the blocked child too: it is still in this group
        harness.communicate()
        pytest.fail("sandbox.run hung: its child ran Python code between fork and exec")
    assert harness.returncode == 0, err
    assert out.split() == ["7"]  # the CPU-time limit is still set (timeout 5 s + 2)

# ---------------------------------------------------------------- reports
def _rows():
    rows = [score(ADD, "a + b"), score(ADD, "a - b"), score(ADD, "\x00bad \x1b[31m <tag> & 'q'", run=False),
            score(Case(id="err", language="python", prefix="", suffix="", reference="x"), "", error="RuntimeError: boom")]
    for row in rows:
        row["latency_ms"], row["tokens"] = 50.0, 3
    rows[1]["id"], rows[2]["id"] = "add-wrong", "add-garbage"
    return rows


def test_junit_xml_is_well_formed(tmp_path):
    report = reports.build_report(_rows(), model={"model": "m"})
    path = tmp_path / "j.xml"
    reports.write_junit(report, path)
    root = ET.parse(path).getroot()
    cases = root.findall(".//testcase")
    assert [c.get("name") for c in cases] == ["add", "add-wrong", "add-garbage", "err"]
    assert cases[0].find("failure") is None
    assert cases[1].find("failure").get("message") == "tests failed"
    assert "not an exact match" in cases[2].find("failure").get("message")
    assert cases[3].find("error") is not None
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("4", "2", "1")


def test_report_layout_and_summary():
    report = reports.build_report(_rows(), model={"model": "m"})
    assert {"metrics", "by_kind", "by_language", "by_kind_language", "cases"} <= set(report)
    assert report["metrics"]["cases"] == 4 and report["by_language"]["python"]["cases"] == 4
    text = reports.summary_markdown(report)
    assert "| all | 4 |" in text and "## By kind" in text


def test_baseline_comparison_and_tolerances():
    current = reports.build_report(_rows())
    better = json.loads(json.dumps(current))
    better["metrics"]["exact_match"] = current["metrics"]["exact_match"] + 0.2
    for case in better["cases"]:
        case["ok"] = True
    comparison = reports.compare(current, better)
    assert comparison.regressed and [r["metric"] for r in comparison.regressions] == ["exact_match"]
    assert comparison.pass_to_fail == ["add-garbage", "add-wrong", "err"]
    assert not reports.compare(current, better, ["exact_match=0.25"]).regressed
    assert not reports.compare(current, better, ["exact_match=off"]).regressed
    assert not reports.compare(current, current).regressed
    slower = json.loads(json.dumps(current))
    slower["metrics"]["latency_p95_ms"] = current["metrics"]["latency_p95_ms"] / 2
    assert not reports.compare(current, slower).regressed  # timing is checked only when asked
    assert reports.compare(current, slower, ["latency_p95_ms=50%"]).regressed
    assert not reports.compare(current, slower, ["latency_p95_ms=150%"]).regressed
    for bad in ("exact_match", "nonsense=1", "exact_match=x", "exact_match=-1"):
        with pytest.raises(ValueError):
            reports.parse_tolerance(bad)
