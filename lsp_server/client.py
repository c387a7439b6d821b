"""A small JSON-RPC client for driving ``difill serve`` as a subprocess over stdio.

Used by the tests and by bench/lsp.py; plugin authors can read it as a reference of the wire
format. Content-Length framing, one reader thread, responses matched by id, notifications
kept in order, and the server's own requests (``window/workDoneProgress/create``,
``workspace/configuration``) answered automatically.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from typing import Any, Callable, IO


class ServerError(Exception):
    """The server answered with a JSON-RPC error, or did not answer in time."""


class LspClient:
    def __init__(self, args: list[str] | None = None, log_file: str | None = None, log_level: str = "INFO",
                 env: dict[str, str] | None = None, stderr: IO | int | None = None):
        argv = [sys.executable, "-m", "difill", "--log-level", log_level, "serve"]
        if log_file:
            argv += ["--log-file", log_file]
        argv += list(args or [])
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=stderr if stderr is not None else subprocess.DEVNULL,
                                        env={**os.environ, **(env or {})})
        self._next_id = 0
        self._lock = threading.Condition()
        self._responses: dict[Any, dict] = {}
        self.notifications: list[dict] = []
        self.server_requests: list[dict] = []
        self.configuration: Any = {}
        self.raw_stdout_garbage: list[bytes] = []  # anything on stdout that is not a frame
        self.handlers: dict[str, Callable[[dict], Any]] = defaultdict(lambda: (lambda message: None))
        self.handlers["workspace/configuration"] = lambda message: [self.configuration for _ in message["params"]["items"]]
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    # ---------------------------------------------------------------- wire
    def send(self, message: dict) -> None:
        self.send_raw(json.dumps(message).encode("utf-8"))

    def send_raw(self, body: bytes, header: bytes | None = None) -> None:
        frame = (header if header is not None else f"Content-Length: {len(body)}\r\n\r\n".encode()) + body
        assert self.process.stdin is not None
        self.process.stdin.write(frame)
        self.process.stdin.flush()

    def _read(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        while True:
            length = None
            while True:
                line = stream.readline()
                if not line:
                    with self._lock:
                        self._lock.notify_all()
                    return
                if line in (b"\r\n", b"\n"):
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
                elif not line.lower().startswith(b"content-type:"):
                    self.raw_stdout_garbage.append(line)
            if length is None:
                continue
            message = json.loads(stream.read(length))
            if "method" in message and "id" in message:
                self.server_requests.append(message)
                result = self.handlers[message["method"]](message)
                self.send({"jsonrpc": "2.0", "id": message["id"], "result": result})
                continue
            with self._lock:
                if "method" in message:
                    self.notifications.append(message)
                else:
                    self._responses[message.get("id")] = message
                self._lock.notify_all()

    # ---------------------------------------------------------------- requests
    def send_request(self, method: str, params: Any = None) -> int:
        with self._lock:
            self._next_id += 1
            msg_id = self._next_id
        self.send({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
        return msg_id

    def response(self, msg_id: Any, timeout: float = 60.0) -> dict:
        """The raw response message (with ``result`` or ``error``)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while msg_id not in self._responses:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None:
                    raise ServerError(f"no response to request {msg_id!r} within {timeout} s (server alive: {self.process.poll() is None})")
                self._lock.wait(min(remaining, 0.5))
            return self._responses.pop(msg_id)

    def request(self, method: str, params: Any = None, timeout: float = 60.0) -> Any:
        """The result, or ServerError for an error response."""
        message = self.response(self.send_request(method, params), timeout)
        if "error" in message:
            raise ServerError(f"{method}: {message['error']}")
        return message.get("result")

    def notify(self, method: str, params: Any = None) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def cancel(self, msg_id: int) -> None:
        self.notify("$/cancelRequest", {"id": msg_id})

    def wait_notification(self, method: str, predicate: Callable[[dict], bool] = lambda m: True, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for message in self.notifications:
                    if message["method"] == method and predicate(message):
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServerError(f"no {method} notification within {timeout} s")
                self._lock.wait(min(remaining, 0.5))

    # ---------------------------------------------------------------- LSP conveniences
    def initialize(self, initialization_options: Any = None, position_encodings: list[str] | None = None,
                   work_done_progress: bool = True, wait_ready: bool = True, timeout: float = 120.0) -> dict:
        capabilities: dict[str, Any] = {
            "window": {"workDoneProgress": work_done_progress},
            "workspace": {"configuration": True},
            "textDocument": {"inlineCompletion": {}, "completion": {"completionItem": {"snippetSupport": False}},
                             "synchronization": {"dynamicRegistration": False}},
        }
        if position_encodings is not None:
            capabilities["general"] = {"positionEncodings": position_encodings}
        result = self.request("initialize", {"processId": os.getpid(), "rootUri": None, "capabilities": capabilities,
                                             "initializationOptions": initialization_options}, timeout)
        self.notify("initialized", {})
        if wait_ready:
            self.wait_ready(timeout)
        return result

    def wait_ready(self, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = self.request("difill/status", {})
            if status["model"]["state"] != "loading" or time.monotonic() > deadline:
                return status
            time.sleep(0.1)

    def open(self, uri: str, text: str, language_id: str = "python", version: int = 1) -> None:
        self.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": language_id, "version": version, "text": text}})

    def change(self, uri: str, version: int, changes: list[dict]) -> None:
        self.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": version}, "contentChanges": changes})

    def inline(self, uri: str, line: int, character: int, trigger: int = 1, selected: dict | None = None,
               timeout: float = 60.0) -> Any:
        context: dict[str, Any] = {"triggerKind": trigger}
        if selected is not None:
            context["selectedCompletionInfo"] = selected
        return self.request("textDocument/inlineCompletion", {"textDocument": {"uri": uri},
                                                              "position": {"line": line, "character": character},
                                                              "context": context}, timeout)

    def close(self, timeout: float = 20.0) -> int:
        """shutdown + exit; returns the process's exit code."""
        try:
            if self.process.poll() is None:
                self.request("shutdown", None, timeout)
                self.notify("exit")
            return self.process.wait(timeout)
        except (ServerError, OSError, subprocess.TimeoutExpired):
            self.process.kill()
            return self.process.wait()
