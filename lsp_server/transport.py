"""JSON-RPC framing over stdio or TCP, and the answers pygls does not give to bad messages.

pygls reads and dispatches messages itself, but a body that is not UTF-8, not JSON, or whose
params do not fit the method only gets a log line there: the client never hears back and waits
forever. Here every such message gets a JSON-RPC error response (``-32700`` parse error with
``id: null``, ``-32600`` invalid request, ``-32602`` invalid params with the request's id) and
the server goes on serving.

Stdio is read by a daemon thread that hands complete message bodies to the event loop, so a
client that exits without closing the pipe never keeps the process alive.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from typing import BinaryIO, Callable

from pygls.exceptions import JsonRpcException

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 2**20  # larger bodies are skipped with a parse error (5 MB files fit easily)
PARSE_ERROR, INVALID_REQUEST, INVALID_PARAMS, INTERNAL_ERROR = -32700, -32600, -32602, -32603


class FrameError(Exception):
    """The header block was unusable; the body (if any) could not be located."""


def read_frame(stream: BinaryIO) -> bytes | None:
    """One message body, or None at end of input. Raises FrameError for a header block without
    a usable Content-Length (the block is consumed, so reading can go on) or a body too large
    (it is read and discarded)."""
    length: int | None = None
    saw_header = False
    while True:
        line = stream.readline(65536)
        if not line:
            return None
        stripped = line.strip()
        if not stripped:
            if saw_header:
                break
            continue  # stray blank lines between messages
        saw_header = True
        name, _, value = stripped.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                length = None
    if length is None or length < 0:
        raise FrameError("header without a valid Content-Length")
    if length > MAX_MESSAGE_BYTES:
        remaining = length
        while remaining > 0:
            chunk = stream.read(min(remaining, 2**20))
            if not chunk:
                return None
            remaining -= len(chunk)
        raise FrameError(f"message of {length} bytes is larger than the {MAX_MESSAGE_BYTES} bytes accepted")
    body = stream.read(length)
    if len(body) < length:
        return None
    return body


class FdReader:
    """A minimal buffered reader over a file descriptor (stdin or a socket).

    Not ``sys.stdin.buffer``: a daemon thread blocked in a ``BufferedReader`` holds its lock,
    and the interpreter aborts ("could not acquire lock ... at interpreter shutdown") when it
    finalizes that object on exit. ``os.read`` holds no Python lock.
    """

    CHUNK = 1 << 20

    def __init__(self, fd: int):
        self.fd = fd
        self.buffer = bytearray()
        self.eof = False

    def _fill(self) -> bool:
        if self.eof:
            return False
        chunk = os.read(self.fd, self.CHUNK)
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    def readline(self, limit: int = -1) -> bytes:
        start = 0
        while True:
            end = self.buffer.find(b"\n", start)
            if end >= 0:
                end += 1
                break
            if 0 <= limit <= len(self.buffer):
                end = limit
                break
            start = len(self.buffer)
            if not self._fill():
                end = len(self.buffer)
                break
        if limit >= 0:
            end = min(end, limit)
        line = bytes(self.buffer[:end])
        del self.buffer[:end]
        return line

    def read(self, n: int) -> bytes:
        while len(self.buffer) < n and self._fill():
            pass
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data


class Writer:
    """pygls' writer interface over a binary stream (stdout, or a socket's file)."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.closed = False
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        """Messages after ``exit`` (or after the client hung up) are dropped: there is no one to
        read them, and an error here would only make pygls try to report it over this channel.
        The hang-up is logged after the lock is released: the log record goes to the client too
        (window/logMessage), through this writer, and the lock is not reentrant."""
        with self._lock:
            if self.closed:
                return
            try:
                self.stream.write(data)
                self.stream.flush()
                return
            except (OSError, ValueError) as exc:
                self.closed = True
                error = exc
        log.info("output closed: %s", error)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            try:
                self.stream.flush()
                self.stream.close()
            except (OSError, ValueError):
                pass


def error_response(msg_id, code: int, message: str) -> dict:
    return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}}


class Dispatcher:
    """Decodes, validates and hands messages to a pygls protocol; answers the bad ones."""

    def __init__(self, protocol, on_exit: Callable[[int], None]):
        self.protocol = protocol
        self.on_exit = on_exit

    def send_error(self, msg_id, code: int, message: str) -> None:
        log.warning("answering message %r with error %d: %s", msg_id, code, message)
        self.protocol._send_data(error_response(msg_id, code, message))

    def dispatch(self, body: bytes) -> None:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.send_error(None, PARSE_ERROR, f"Parse error: the message is not valid UTF-8 ({exc.reason} at byte {exc.start})")
            return
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            self.send_error(None, PARSE_ERROR, f"Parse error: {exc.msg} at line {exc.lineno} column {exc.colno}")
            return
        except RecursionError:
            self.send_error(None, PARSE_ERROR, "Parse error: the message is nested too deeply")
            return
        if not isinstance(data, dict):
            self.send_error(None, INVALID_REQUEST, "Invalid Request: a message must be a JSON object (batches are not used by LSP)")
            return
        msg_id = data.get("id")
        if msg_id is not None and (isinstance(msg_id, bool) or not isinstance(msg_id, (int, str))):
            self.send_error(None, INVALID_REQUEST, "Invalid Request: id must be a number or a string")
            return
        method = data.get("method")
        is_request = "method" in data and "id" in data
        if data.get("jsonrpc") != "2.0":
            self.send_error(msg_id, INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"')
            return
        if "method" in data and not isinstance(method, str):
            self.send_error(msg_id, INVALID_REQUEST, "Invalid Request: method must be a string")
            return
        if "method" not in data and "result" not in data and "error" not in data:
            self.send_error(msg_id, INVALID_REQUEST, "Invalid Request: neither a request, a notification nor a response")
            return
        try:
            message = self.protocol.structure_message(data)
        except JsonRpcException as exc:
            cause = exc.__cause__
            detail = f": {_first_line(cause)}" if cause is not None else ""
            if is_request:
                self.send_error(msg_id, exc.code, f"{exc.message} for {method}{detail}")
            else:
                log.warning("dropping malformed %s message: %s%s", method or "response", exc.message, detail)
            return
        try:
            self.protocol.handle_message(message)
        except SystemExit as exc:  # the "exit" notification
            self.on_exit(int(exc.code or 0))
        except Exception as exc:  # pygls answers handler errors itself; this is a last resort
            log.exception("failed to handle %s", method)
            if is_request:
                self.send_error(msg_id, INTERNAL_ERROR, f"Internal error: {exc}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().split("\n", 1)[0]
    if hasattr(exc, "exceptions") and exc.exceptions:  # cattrs' grouped validation errors
        text = "; ".join(_first_line(e) for e in exc.exceptions[:3])
    return text or type(exc).__name__


def start_reader(stream: BinaryIO, loop: asyncio.AbstractEventLoop, dispatcher: Dispatcher,
                 on_eof: Callable[[], None]) -> threading.Thread:
    """Read frames on a daemon thread and dispatch them, in order, on the event loop."""

    def read() -> None:
        while True:
            try:
                body = read_frame(stream)
            except FrameError as exc:
                loop.call_soon_threadsafe(dispatcher.send_error, None, PARSE_ERROR, f"Parse error: {exc}")
                continue
            except (OSError, ValueError) as exc:
                log.info("input closed: %s", exc)
                body = None
            if body is None:
                loop.call_soon_threadsafe(on_eof)
                return
            loop.call_soon_threadsafe(dispatcher.dispatch, body)

    thread = threading.Thread(target=read, name="difill-reader", daemon=True)
    thread.start()
    return thread
