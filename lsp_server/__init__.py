"""difill's language server: inline completion (LSP 3.18), classic completion and the
``difill/*`` requests, over stdio or TCP. docs/protocol.md is the protocol for plugin authors.

Modules: ``documents`` (text and positions), ``completion`` (context window, typing-through
cache, items), ``debounce`` (adaptive delay), ``config`` (settings), ``engine_host`` (model
loading and the worker thread), ``service`` (the request pipeline), ``requests`` (difill/*
params), ``transport`` (framing and error answers), ``server`` (pygls wiring).
"""

from __future__ import annotations

import logging
import os
import socket
import sys

log = logging.getLogger(__name__)


def run(model: str | None = None, backend: str = "torch", device: str = "cpu", tcp: str | None = None,
        log_file: str | None = None, dtype: str | None = None) -> int:
    """Serve one client over stdio (or the first connection on ``tcp`` = "HOST:PORT").

    Nothing may reach stdout but protocol messages: in stdio mode the protocol gets a private
    copy of file descriptor 1 and descriptor 1 itself is pointed at stderr, so a stray print,
    a library warning or C-level output lands in the log instead of corrupting the channel.
    """
    from difill.lsp_server.config import Settings
    from difill.lsp_server.server import ClientLogHandler, build_server
    from difill.lsp_server.transport import FdReader

    _setup_logging(log_file)
    server = build_server(Settings(model=model, backend=backend, device=device, dtype=dtype))
    root = logging.getLogger()
    handler = ClientLogHandler(server, max(root.level, logging.INFO) if root.level else logging.INFO)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    try:
        if tcp is None:
            reader, writer = _private_stdio()
            return server.serve(reader, writer)
        host, port = _parse_address(tcp)
        with socket.create_server((host, port)) as listener:
            log.info("listening on %s:%d", host, listener.getsockname()[1])
            print(f"difill: listening on {host}:{listener.getsockname()[1]}", file=sys.stderr, flush=True)
            connection, peer = listener.accept()
        log.info("client connected from %s", peer)
        with connection:
            return server.serve(FdReader(connection.fileno()), connection.makefile("wb"))
    finally:
        root.removeHandler(handler)
        if not server.engine_stopped:
            _exit_now(server.exit_code)


def _exit_now(code: int) -> None:
    """End the process without finalizing the interpreter. The engine's worker is still inside a
    job that cannot be cut short (a model load): finalizing under a running torch operation
    aborts the process ("terminate called without an active exception", SIGABRT) instead of
    letting it exit with ``code``."""
    log.info("the engine is still busy: exiting without waiting for it")
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


def _private_stdio():
    from difill.lsp_server.transport import FdReader

    protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return FdReader(sys.stdin.fileno()), protocol_out


def _parse_address(spec: str) -> tuple[str, int]:
    from difill.cli import UserError

    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"--tcp {spec!r}: expected HOST:PORT")
    return host or "127.0.0.1", int(port)


def _setup_logging(log_file: str | None) -> None:
    """The CLI configures logging (stderr, --log-file); called directly, we add the file here.
    pygls logs every message body at INFO: keep it to warnings unless debugging."""
    root = logging.getLogger()
    if log_file and not any(isinstance(h, logging.FileHandler) and os.path.abspath(getattr(h, "baseFilename", "")) ==
                            os.path.abspath(log_file) for h in root.handlers):
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    if root.level > logging.DEBUG or root.level == logging.NOTSET:
        logging.getLogger("pygls").setLevel(logging.WARNING)


__all__ = ["run"]
