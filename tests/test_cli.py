"""The CLI contract (issue 2): `difill complete`, `difill infill`, `difill info`, `difill demo`,
run as real subprocesses on real files with the bundled model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import difill
from difill.cli import DTYPE_CHOICES
from difill.inference.engine import WEIGHT_TYPES, default_dtype

SAMPLE = '''def area(width, height):
    """Area of a rectangle."""
    return width * height


def perimeter(width, height):
    total = 2 * (width + height)
    return total
'''


def difill_cli(*args: str, stdin: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "difill", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture()
def sample(tmp_path: Path) -> Path:
    path = tmp_path / "shapes.py"
    path.write_text(SAMPLE)
    return path


def test_complete_json_reports_completion_and_stats(sample: Path) -> None:
    result = difill_cli("complete", f"{sample}:3:12", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for key in ("completion", "latency_ms", "steps", "tokens"):
        assert key in out
    assert isinstance(out["completion"], str)
    assert out["steps"] >= 1 and out["tokens"] >= 1 and out["latency_ms"] > 0
    assert out["language"] == "python"
    assert "\n" not in out["completion"]  # mid-line cursor: a single-line completion


def test_complete_plain_prints_the_same_completion_as_json(sample: Path) -> None:
    plain = difill_cli("complete", f"{sample}:7:13")
    as_json = difill_cli("complete", f"{sample}:7:13", "--json")
    assert plain.returncode == 0 and as_json.returncode == 0
    assert plain.stdout.rstrip("\n") == json.loads(as_json.stdout)["completion"]  # deterministic


@pytest.mark.parametrize("position, message", [
    ("{path}:99:1", "past the end"),
    ("{path}:1:200", "past the end of line 1"),
    ("{path}:0:1", "start at 1"),
    ("{path}:x:1", "PATH:LINE:COL"),
    ("{missing}:1:1", "no such file"),
])
def test_user_mistakes_exit_2_with_one_line_and_no_traceback(sample: Path, position: str, message: str) -> None:
    spec = position.format(path=sample, missing=sample.parent / "nope.py")
    result = difill_cli("complete", spec)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_binary_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "blob.py"
    path.write_bytes(b"\x00\x01\x02binary\x00")
    result = difill_cli("complete", f"{path}:1:1")
    assert result.returncode == 2 and "binary" in result.stderr


def test_infill_jsonl_keeps_going_after_a_bad_line(tmp_path: Path) -> None:
    cases = [
        {"id": "a", "prefix": "import os\n\n\ndef main():\n    path = os.", "suffix": "\n", "language": "python"},
        "this is not json",
        {"id": "c", "prefix": "for i in range(", "suffix": "):\n    pass\n", "language": "python", "max_tokens": 8},
        {"id": "d", "suffix": "no prefix"},
        {"id": "e", "prefix": "x = ", "suffix": "", "language": "cobol"},
    ]
    lines = "\n".join(c if isinstance(c, str) else json.dumps(c) for c in cases) + "\n"
    src = tmp_path / "cases.jsonl"
    src.write_text(lines)
    out = tmp_path / "out.jsonl"
    result = difill_cli("infill", "--input", str(src), "--output", str(out))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5
    assert [r.get("id") for r in rows] == ["a", None, "c", "d", "e"]
    for row in (rows[0], rows[2], rows[4]):
        assert "error" not in row
        assert {"completion", "latency_ms", "steps", "tokens"} <= row.keys()
    assert rows[2]["tokens"] <= 8
    assert "JSON" in rows[1]["error"] and "prefix" in rows[3]["error"]
    assert rows[4]["language"] is None  # unknown language: completed without the syntax constraint


def test_infill_reads_stdin_and_writes_stdout() -> None:
    case = {"id": 7, "prefix": "def square(x):\n    return x", "suffix": "\n", "language": "python"}
    result = difill_cli("infill", stdin=json.dumps(case) + "\n")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["id"] == 7 and isinstance(row["completion"], str)


def test_info_lists_model_backend_device_and_languages() -> None:
    result = difill_cli("info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["version"] == difill.__version__
    assert info["backend"] == "torch" and info["device"] == "cpu"
    assert info["parameters"] > 1_000_000
    assert {"python", "javascript", "typescript", "go", "rust", "java", "c", "cpp"} <= set(info["languages"])
    assert info["dtype"] == default_dtype("cpu")  # float16 weights where FBGEMM serves them; --dtype picks another
    assert json.loads(difill_cli("info", "--json", "--dtype", "bfloat16").stdout)["dtype"] == "bfloat16"
    assert json.loads(difill_cli("info", "--json", "--dtype", "float32").stdout)["dtype"] == "float32"
    assert sorted(DTYPE_CHOICES) == sorted(WEIGHT_TYPES)  # the CLI's choices are the engine's names
    clash = difill_cli("info", "--backend", "onnx", "--dtype", "bfloat16")
    assert clash.returncode == 2 and "torch backend" in clash.stderr and "Traceback" not in clash.stderr


def test_demo_completes_the_bundled_sample() -> None:
    result = difill_cli("demo")
    assert result.returncode == 0, result.stderr
    assert "line completion" in result.stdout and "block completion" in result.stdout


@pytest.mark.parametrize("damage", ["missing_dir", "truncated_weights", "no_tokenizer", "bad_config"])
def test_broken_model_directory_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    model = tmp_path / "model"
    shutil.copytree(difill.default_model_path(), model)
    expected = {"missing_dir": "not found", "truncated_weights": "model.safetensors",
                "no_tokenizer": "tokenizer.json", "bad_config": "config.json"}[damage]
    if damage == "missing_dir":
        shutil.rmtree(model)
    elif damage == "truncated_weights":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: 1000])
    elif damage == "no_tokenizer":
        (model / "tokenizer.json").unlink()
    else:
        (model / "config.json").write_text("{not json")
    result = difill_cli("--model", str(model), "info")
    assert result.returncode == 3
    assert expected in result.stderr and "Traceback" not in result.stderr
