"""The VS Code extension (editors/vscode): ``npm ci``, ``npm run compile`` (tsc, strict), ``npm test``
(node:test, no VS Code needed) and ``vsce package``.

``npm test`` includes test/server.test.ts, which starts the real server with this Python
(DIFILL_PYTHON) through the extension's own command line and sends it the extension's
initializationOptions, didChangeConfiguration payload and workspace/configuration answers.
A real VS Code is not started: @vscode/test-electron downloads VS Code at run time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXTENSION = ROOT / "editors" / "vscode"
NPM = shutil.which("npm")

pytestmark = [pytest.mark.skipif(NPM is None or shutil.which("node") is None, reason="node/npm not installed"),
              pytest.mark.slow]


def npm(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([NPM, *args], cwd=EXTENSION, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"npm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def compiled() -> Path:
    """npm ci (skipped when node_modules already matches package-lock.json), then tsc."""
    installed = EXTENSION / "node_modules" / ".package-lock.json"
    lock = EXTENSION / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        npm("ci", "--prefer-offline", "--no-audit", "--no-fund")
    npm("run", "compile")
    return EXTENSION / "out"


def test_npm_test(compiled):
    proc = npm("test", env={"DIFILL_PYTHON": sys.executable}, timeout=400)
    summary = {line.split()[1]: int(line.split()[2]) for line in proc.stdout.splitlines()
               if line.startswith("# ") and len(line.split()) == 3 and line.split()[2].isdigit()}
    assert summary.get("fail") == 0 and summary.get("pass", 0) >= 20, proc.stdout[-4000:]
    assert summary.get("skipped", 0) == 0, "the server tests were skipped:\n" + proc.stdout[-4000:]


def test_vsce_package(compiled, tmp_path):
    vsix = tmp_path / "difill.vsix"
    npm("exec", "--", "vsce", "package", "--allow-missing-repository", "--skip-license", "--out", str(vsix))
    with zipfile.ZipFile(vsix) as archive:
        names = {name.lower() if name.lower().endswith("readme.md") else name for name in archive.namelist()}
    for needed in ("extension/package.json", "extension/out/src/extension.js", "extension/out/src/settings.js",
                   "extension/node_modules/vscode-languageclient/package.json", "extension/readme.md"):
        assert needed in names, f"{needed} missing from the .vsix"
    assert not any(name.startswith("extension/out/test/") or name.startswith("extension/src/") for name in names)
