"""The test run itself: it ends whatever its tests leave behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")

LEAKY_TEST = '''
import multiprocessing, signal, time

def _stubborn():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(3600)

def test_leaves_a_child_that_ignores_sigterm():
    child = multiprocessing.get_context("fork").Process(target=_stubborn, daemon=True)
    child.start()
    time.sleep(0.5)  # its handler is in place
'''


def test_a_run_ends_when_a_test_leaves_a_stubborn_child(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_leak.py").write_text(LEAKY_TEST)
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        out, _ = run.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        out, _ = run.communicate()
        pytest.fail("the run did not end after its last test:\n" + out)
    assert run.returncode == 0, out
    assert "1 passed" in out
