"""Keep the checkout's top-level folders from shadowing installed packages.

``python -m pytest`` (the README's test command) puts the current directory, the repository
root, first on ``sys.path``. The root holds ``kernels/``, ``inference/``, ``training/``, ...,
which install as ``difill.kernels`` and so on, but on ``sys.path`` they would also be importable
as top-level modules: ``transformers`` (a test dependency) imports the PyPI package ``kernels``
and would get difill's folder instead (``ImportError: cannot import name 'CUDAProperties' from
'kernels'``). difill itself is installed (``pip install -e``), so the tests never need the root
on the path.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _is_root(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == ROOT
    except OSError:
        return False


sys.path[:] = [entry for entry in sys.path if not _is_root(entry)]
for name in ("kernels", "inference", "grammars", "training", "evaluation", "service", "lsp_server"):
    module = sys.modules.get(name)
    if module is not None and str(getattr(module, "__file__", "") or "").startswith(str(ROOT)):
        del sys.modules[name]  # imported from the checkout before this ran: let the real one load


def pytest_unconfigure(config) -> None:
    """Kill the multiprocessing children that a test left behind. At exit, multiprocessing
    terminates its children and waits for them; a child that ignores SIGTERM (a forked worker
    that inherited a handler, or hangs on a lock) kept a CI run from ending after its last test
    until the CI's limit. Killing them lets the run end and report."""
    import logging
    import multiprocessing

    for child in multiprocessing.active_children():
        logging.getLogger("difill.tests").warning("killing %s, left running by a test", child.name)
        child.kill()
        child.join(5)
