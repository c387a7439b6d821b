"""Run untrusted code (a model's completion inside a program) with limits.

What is enforced, per command:

* a wall-clock time limit: the command runs in its own session (process group) and the whole
  group is killed with SIGKILL when the limit passes, so a hang, a fork or a child that ignores
  signals never hangs the harness; RLIMIT_CPU backs it up;
* a memory limit: RLIMIT_DATA (set by util-linux ``prlimit`` in front of the command). It counts the
  memory a process actually makes writable (heap, anonymous mmap), not the address space it
  merely reserves, so the JVM, V8 and Go runtimes, which reserve gigabytes up front and die
  under RLIMIT_AS, still start; Python raises MemoryError and C++ throws bad_alloc past it;
* output files of at most ``file_mb`` (RLIMIT_FSIZE) and no core dumps; stdout and stderr go to
  files, so a program printing forever is cut at that size, never buffered in the harness;
* a fresh temporary working directory per case, removed afterwards, and a small environment
  (PATH, HOME in that directory, C.UTF-8);
* no network: ``unshare -n`` (a new, empty network namespace) when this machine allows it, as
  root or through an unprivileged user namespace (``unshare -r -n``). Where neither works, Python
  programs get a ``sitecustomize`` that makes socket connections raise; compiled C++ and Java
  programs then run with the network (``network_isolation()`` says which, and the report
  records it).

The limits are set by ``prlimit``, not by Python code between fork and exec (``preexec_fn``):
the harness runs inside threaded programs (the engine, the tests), and a forked child that runs
Python can block for ever on a lock another thread held at the fork, and ``Popen`` with it.
``resource.setrlimit`` in ``preexec_fn`` is the fallback where ``prlimit`` is missing.

Not enforced: a process-count limit (RLIMIT_NPROC does not apply to root) and file-system
isolation beyond the working directory: this is a harness for model output, not for hostile
code.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 1 << 20  # bytes of stdout/stderr read back

_BLOCK_SOCKETS = '''"""difill eval: no network for code under test."""
import socket as _socket


def _refuse(*args, **kwargs):
    raise OSError("network access is disabled by the difill eval sandbox")


_socket.socket.connect = _refuse
_socket.socket.connect_ex = _refuse
_socket.socket.sendto = _refuse
_socket.create_connection = _refuse
_socket.getaddrinfo = _refuse
'''


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_mb: int = 1024  # 0: no memory limit
    file_mb: int = 64
    network: bool = False


@dataclass
class RunResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def out_of_memory(self) -> bool:
        tail = self.stderr[-4000:]
        return any(s in tail for s in ("MemoryError", "std::bad_alloc", "OutOfMemoryError", "Cannot allocate memory",
                                       "insufficient memory"))


@functools.lru_cache(maxsize=1)
def network_isolation() -> list[str]:
    """The command prefix that cuts the network off, or [] when none works here."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    for prefix in ([unshare, "-n"], [unshare, "-r", "-n"]):
        try:
            done = subprocess.run(prefix + ["true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return prefix
    log.warning("unshare -n does not work here: only Python code under test is kept off the network")
    return []


def isolation_summary() -> str:
    prefix = network_isolation()
    if prefix:
        return "network namespace (" + " ".join(Path(prefix[0]).name if i == 0 else p for i, p in enumerate(prefix)) + ")"
    return "python sockets blocked (no network namespace available)"


def _resource_limits(limits: Limits) -> dict[str, tuple[int, int]]:
    """prlimit's option name -> (soft, hard) for the command's resource limits."""
    cpu = int(limits.timeout_s) + 2  # the wall clock kills first; CPU time backs it up
    file_size = limits.file_mb << 20
    chosen = {"cpu": (cpu, cpu + 1), "fsize": (file_size, file_size), "core": (0, 0)}
    if limits.memory_mb > 0:
        chosen["data"] = (limits.memory_mb << 20,) * 2
    return chosen


def _limit_command(limits: Limits) -> tuple[list[str], Callable[[], None] | None]:
    """The command prefix that sets the limits, or (where ``prlimit`` is missing) a preexec_fn."""
    chosen = _resource_limits(limits)
    prlimit = shutil.which("prlimit")
    if prlimit is not None:
        return [prlimit, *(f"--{name}={soft}:{hard}" for name, (soft, hard) in chosen.items()), "--"], None
    names = {"cpu": resource.RLIMIT_CPU, "fsize": resource.RLIMIT_FSIZE, "core": resource.RLIMIT_CORE,
             "data": resource.RLIMIT_DATA}

    def apply() -> None:  # runs in the child between fork and exec: keep it to system calls
        for name, pair in chosen.items():
            resource.setrlimit(names[name], pair)

    return [], apply


def sandbox_env(workdir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir), "LANG": "C.UTF-8",
           "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "TMPDIR": str(workdir)}
    if extra:
        env.update(extra)
    return env


def _python_socket_block(workdir: Path) -> dict[str, str]:
    """Without a network namespace: a sitecustomize on PYTHONPATH that refuses connections."""
    site = workdir / ".difill-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_BLOCK_SOCKETS)
    return {"PYTHONPATH": str(site)}


def _read(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(OUTPUT_LIMIT).decode("utf-8", errors="replace")
    except OSError:
        return ""


def run(argv: Sequence[str], workdir: Path, limits: Limits = Limits(), stdin: str = "",
        env: dict[str, str] | None = None, shell: bool = False, inherit_env: bool = False) -> RunResult:
    """Run one command in ``workdir`` under ``limits``; never raises for the command's failures.

    ``shell``: ``argv[0]`` is a shell command line. ``inherit_env``: start from this process's
    environment (a repository's own test command may need it) instead of the minimal one."""
    workdir = Path(workdir)
    full_env = {**os.environ, **(env or {})} if inherit_env else sandbox_env(workdir, env)
    command = list(argv) if not shell else ["/bin/sh", "-c", str(argv[0])]
    if not limits.network:
        prefix = network_isolation()
        if prefix:
            command = prefix + command
        else:
            full_env.update(_python_socket_block(workdir))
    limit_prefix, preexec = _limit_command(limits)
    command = limit_prefix + command
    with tempfile.TemporaryDirectory(prefix="difill-io-") as io_dir:
        out_path, err_path, in_path = Path(io_dir, "stdout"), Path(io_dir, "stderr"), Path(io_dir, "stdin")
        in_path.write_text(stdin, encoding="utf-8")
        start = time.perf_counter()
        timed_out = False
        with open(in_path, "rb") as fin, open(out_path, "wb") as fout, open(err_path, "wb") as ferr:
            try:
                process = subprocess.Popen(command, cwd=workdir, stdin=fin, stdout=fout, stderr=ferr, env=full_env,
                                           preexec_fn=preexec, start_new_session=True)
            except OSError as exc:
                return RunResult(None, "", f"cannot start {command[0]}: {exc}", False, 0.0)
            try:
                process.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(process)
        seconds = time.perf_counter() - start
        return RunResult(None if timed_out else process.returncode, _read(out_path), _read(err_path), timed_out, seconds)


def _kill_group(process: subprocess.Popen) -> None:
    """Kill the command and everything it started (they share its session's process group)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL'd processes end
        log.warning("process %d did not end after SIGKILL", process.pid)


def python_command() -> list[str]:
    """The interpreter that runs Python tests: this one, without the user's site-packages."""
    return [sys.executable, "-B", "-s"]
