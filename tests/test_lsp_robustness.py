"""The server under bad input: every case gets a proper error response or an empty result, and
the server keeps serving. Real server processes over stdio (and one over TCP)."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from difill.lsp_server.client import LspClient

pytestmark = pytest.mark.timeout(300)

MISSING_MODEL = "/nonexistent/difill-model"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def alive(client: LspClient) -> dict:
    """The server still answers."""
    return client.request("difill/status", {}, timeout=30)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    log_file = tmp_path_factory.mktemp("lsp") / "robust.log"
    c = LspClient(log_file=str(log_file), log_level="INFO")
    c.initialize({"steps": 2, "maxTokens": 4}, wait_ready=False)
    # Sent before the model is ready: must wait (bounded) or answer empty, never error.
    c.open("file:///early.py", "def f(x):\n    return \n")
    c.early = c.response(c.send_request("textDocument/inlineCompletion", {
        "textDocument": {"uri": "file:///early.py"}, "position": {"line": 1, "character": 11}, "context": {"triggerKind": 1}}))
    assert c.wait_ready()["model"]["state"] == "ready"
    yield c
    assert c.close() == 0


def test_requests_before_the_model_is_ready_do_not_error(client: LspClient) -> None:
    assert "error" not in client.early and isinstance(client.early["result"], list)


def test_malformed_json_gets_a_parse_error(client: LspClient) -> None:
    client.send_raw(b'{"jsonrpc": "2.0", "id": 77, "method": ')
    message = client.response(None)
    assert message["error"]["code"] == -32700 and message["id"] is None
    alive(client)


def test_invalid_utf8_on_the_wire_gets_a_parse_error(client: LspClient) -> None:
    client.send_raw(b'{"jsonrpc": "2.0", "id": 78, "method": "difill/status", "params": {"x": "\xff\xfe\xc3"}}')
    message = client.response(None)
    assert message["error"]["code"] == -32700 and "UTF-8" in message["error"]["message"]
    alive(client)


def test_invalid_requests_get_invalid_request(client: LspClient) -> None:
    client.send_raw(b"[1, 2, 3]")
    assert client.response(None)["error"]["code"] == -32600
    client.send_raw(json.dumps({"id": 79, "method": "difill/status"}).encode())  # no "jsonrpc"
    assert client.response(79)["error"]["code"] == -32600
    client.send_raw(json.dumps({"jsonrpc": "2.0", "id": 80, "method": 42}).encode())
    assert client.response(80)["error"]["code"] == -32600
    alive(client)


def test_unknown_methods(client: LspClient) -> None:
    message = client.response(client.send_request("textDocument/noSuchThing", {}))
    assert message["error"]["code"] == -32601
    client.notify("difill/noSuchNotification", {"a": 1})
    client.notify("$/someExtension", {})
    alive(client)


def test_invalid_params_for_a_standard_method(client: LspClient) -> None:
    message = client.response(client.send_request("textDocument/inlineCompletion", {"textDocument": {"uri": "file:///x.py"}}))
    assert message["error"]["code"] == -32602 and "inlineCompletion" in message["error"]["message"]
    alive(client)


def test_positions_past_the_end(client: LspClient) -> None:
    uri = "file:///short.py"
    client.open(uri, "x = 1\n")
    assert isinstance(client.inline(uri, 999, 999), list)
    assert isinstance(client.inline(uri, 0, 10**6), list)
    result = client.request("textDocument/completion", {"textDocument": {"uri": uri}, "position": {"line": 50, "character": 3}})
    assert result["isIncomplete"] is True
    # An edit whose range lies past the end appends, as editors expect.
    client.change(uri, 2, [{"range": {"start": {"line": 9, "character": 0}, "end": {"line": 9, "character": 4}}, "text": "y"}])
    doc = client.request("difill/status", {"textDocument": {"uri": uri}})["document"]
    assert doc["sha256"] == hashlib.sha256(b"x = 1\ny").hexdigest()


def test_documents_never_opened(client: LspClient) -> None:
    uri = "file:///never-opened.py"
    client.change(uri, 2, [{"text": "x"}])
    assert client.inline(uri, 0, 0) == []
    assert client.request("textDocument/completion", {"textDocument": {"uri": uri}, "position": {"line": 0, "character": 0}})["items"] == []
    result = client.request("difill/infill", {"textDocument": {"uri": uri}, "position": {"line": 0, "character": 0}})
    assert result["status"] == "unknown-document" and result["candidates"] == []
    client.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
    assert client.request("difill/status", {"textDocument": {"uri": uri}})["document"] is None


def test_empty_file(client: LspClient) -> None:
    uri = "file:///empty.py"
    client.open(uri, "")
    assert isinstance(client.inline(uri, 0, 0), list)
    assert isinstance(client.request("difill/infill", {"textDocument": {"uri": uri}, "position": {"line": 0, "character": 0}})["candidates"], list)


def test_five_megabyte_file(client: LspClient) -> None:
    uri = "file:///big.py"
    unit = "def f(x):\n    return x + 1  # 中文 😀\n"
    text = unit * (5 * 2**20 // len(unit.encode()))
    client.open(uri, text)
    line = text.count("\n")
    client.change(uri, 2, [{"range": {"start": {"line": line, "character": 0}, "end": {"line": line, "character": 0}}, "text": "def g(y):\n    return "}])
    text += "def g(y):\n    return "
    result = client.request("difill/infill", {"textDocument": {"uri": uri}, "position": {"line": line + 1, "character": 11}})
    assert result["status"] in ("ok", "empty")
    assert client.request("difill/status", {"textDocument": {"uri": uri}})["document"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    client.notify("textDocument/didClose", {"textDocument": {"uri": uri}})


def test_binary_content(client: LspClient) -> None:
    uri = "file:///blob.bin"
    client.open(uri, "\x00\x01\x02ELF\x00\x00\ufffd\ufffd\x7f" * 100, language_id="plaintext")
    assert client.inline(uri, 0, 50) == []
    assert client.request("difill/infill", {"textDocument": {"uri": uri}, "position": {"line": 0, "character": 50}})["status"] == "binary"
    alive(client)


def test_burst_of_a_thousand_requests_mostly_cancelled(client: LspClient) -> None:
    """Bounded memory: each in-flight request costs a task and a token (about a kilobyte); a
    superseded or cancelled one is dropped before it reaches the model. The server may grow by
    its caches (engine context cache: at most 256 MiB by default, about 1 MiB per document for
    the bundled model; typing cache: at most 64 documents) but not per request: we allow 64 MiB."""
    uri = "file:///burst.py"
    client.open(uri, "def f(x):\n    return \n")
    before = rss_bytes(client.process.pid)
    ids = []
    for i in range(1000):
        ids.append(client.send_request("textDocument/inlineCompletion", {
            "textDocument": {"uri": uri}, "position": {"line": 1, "character": 11}, "context": {"triggerKind": 2}}))
        if i % 10 != 9 and i != 999:
            client.cancel(ids[-1])
    answers = [client.response(i, timeout=120) for i in ids]
    assert "result" in answers[-1] and isinstance(answers[-1]["result"], list)
    assert all("result" in a or a["error"]["code"] == -32800 for a in answers)
    counters = alive(client)["counters"]
    assert counters["cancelled"] + counters["superseded"] >= 900
    assert alive(client)["inFlight"] == 0
    assert rss_bytes(client.process.pid) - before < 64 * 2**20


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.data())
def test_fuzz_server_text_equals_client_text(client: LspClient, data: st.DataObject) -> None:
    """Random incremental edits (emoji, CJK, CRLF) sent to the real server; its text hash must
    equal the client's after the sequence."""
    alphabet = st.sampled_from(list("ab (\t") + ["\n", "\r\n", "😀", "中", "é"])
    text = data.draw(st.lists(alphabet, max_size=30).map("".join))
    uri = f"file:///fuzz-{time.monotonic_ns()}.py"
    client.open(uri, text)
    for version in range(2, 2 + data.draw(st.integers(1, 6))):
        lines = re.split(r"\r\n|\n", text)
        l1 = data.draw(st.integers(0, len(lines) - 1))
        l2 = data.draw(st.integers(l1, len(lines) - 1))
        c1 = data.draw(st.integers(0, len(lines[l1])))
        c2 = data.draw(st.integers(0, len(lines[l2]))) if l2 > l1 else data.draw(st.integers(c1, len(lines[l1])))
        new = data.draw(st.lists(alphabet, max_size=8).map("".join))
        starts = [m.end() for m in re.finditer(r"\r\n|\n", text)]
        starts = [0] + starts
        a, b = starts[l1] + c1, starts[l2] + c2
        utf16 = lambda line, c: len(lines[line][:c].encode("utf-16-le")) // 2
        client.change(uri, version, [{"range": {"start": {"line": l1, "character": utf16(l1, c1)},
                                                "end": {"line": l2, "character": utf16(l2, c2)}}, "text": new}])
        text = text[:a] + new + text[b:]
    doc = client.request("difill/status", {"textDocument": {"uri": uri}})["document"]
    client.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
    assert doc["sha256"] == hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("encodings,expected", [(["utf-8"], "utf-8"), (["utf-32", "utf-16"], "utf-32")])
def test_position_encoding_negotiation_and_a_missing_model(encodings: list[str], expected: str) -> None:
    """With the model missing: a clear showMessage, status "failed", empty answers; and the
    offered position encoding is used for every position."""
    c = LspClient(args=["--model", MISSING_MODEL], log_level="WARNING")
    try:
        result = c.initialize({"readyTimeoutMs": 100}, position_encodings=encodings, wait_ready=False)
        assert result["capabilities"]["positionEncoding"] == expected
        shown = c.wait_notification("window/showMessage", timeout=60)
        assert shown["params"]["type"] == 1 and MISSING_MODEL in shown["params"]["message"]
        assert c.wait_ready()["model"]["state"] == "failed"
        uri = "file:///enc.py"
        text = "a = '😀中'\nb"
        c.open(uri, text)
        col = len("a = '😀".encode(expected.replace("utf-16", "utf-16-le").replace("utf-32", "utf-32-le"))) // (4 if expected == "utf-32" else 1)
        c.change(uri, 2, [{"range": {"start": {"line": 0, "character": col}, "end": {"line": 0, "character": col}}, "text": "X"}])
        doc = c.request("difill/status", {"textDocument": {"uri": uri}})["document"]
        assert doc["sha256"] == hashlib.sha256("a = '😀X中'\nb".encode()).hexdigest()
        assert c.inline(uri, 0, col) == []
        assert c.request("difill/infill", {"prefix": "x = "})["status"] == "not-ready"
    finally:
        assert c.close() == 0



def test_tcp_transport() -> None:
    """`difill serve --tcp HOST:0` announces its port on stderr and speaks the same protocol."""
    process = subprocess.Popen([sys.executable, "-m", "difill", "serve", "--tcp", "127.0.0.1:0", "--model", MISSING_MODEL],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = b""
        while b"listening on" not in line:
            line = process.stderr.readline()
            assert line, "the server exited before listening"
        port = int(re.search(rb":(\d+)\s*$", line).group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            stream = sock.makefile("rb")

            def call(msg_id: int, method: str, params) -> dict:
                body = json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params}).encode()
                sock.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)
                while True:
                    length = None
                    while (header := stream.readline()) not in (b"\r\n", b""):
                        if header.lower().startswith(b"content-length:"):
                            length = int(header.split(b":")[1])
                    message = json.loads(stream.read(length))
                    if message.get("id") == msg_id and "method" not in message:
                        return message

            assert call(1, "initialize", {"processId": None, "capabilities": {}})["result"]["serverInfo"]["name"] == "difill"
            assert call(2, "difill/status", {})["result"]["version"]
            assert call(3, "shutdown", None)["result"] is None
            body = b'{"jsonrpc": "2.0", "method": "exit"}'
            sock.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)
            assert process.wait(timeout=60) == 0
        assert process.stdout.read() == b""  # nothing on stdout in TCP mode either
    finally:
        if process.poll() is None:
            process.kill()


def test_requests_before_initialize_and_after_shutdown_get_errors() -> None:
    c = LspClient(args=["--model", MISSING_MODEL], log_level="WARNING")
    try:
        assert c.response(c.send_request("difill/status", {}))["error"]["code"] == -32002
        c.initialize(None, wait_ready=False)
        assert c.request("shutdown", None) is None
        assert c.response(c.send_request("difill/status", {}))["error"]["code"] == -32600
        c.notify("exit")
        assert c.process.wait(60) == 0
    finally:
        if c.process.poll() is None:
            c.process.kill()


@pytest.mark.parametrize("delay_s", [0.1, 0.5])
def test_a_client_that_hangs_up_while_the_model_loads_gets_a_clean_exit(delay_s: float) -> None:
    """The editor quits (its end of stdin closes) right after asking for a completion, while the
    model is still loading: the server ends at once with exit code 0. It used to abort
    (SIGABRT, "terminate called without an active exception") when the interpreter finalized
    under the engine thread's running torch operation."""
    c = LspClient(log_level="WARNING", stderr=subprocess.PIPE)
    try:
        c.initialize(None, wait_ready=False)
        c.open("file:///bye.py", "def f(x):\n    return \n")
        c.send_request("textDocument/inlineCompletion", {"textDocument": {"uri": "file:///bye.py"},
                                                          "position": {"line": 1, "character": 11}, "context": {"triggerKind": 1}})
        time.sleep(delay_s)
        assert c.process.stdin is not None
        c.process.stdin.close()
        assert c.process.wait(30) == 0
        assert c.process.stderr is not None and b"terminate called" not in c.process.stderr.read()
    finally:
        if c.process.poll() is None:
            c.process.kill()


def test_a_client_that_stops_reading_then_hangs_up_gets_a_clean_exit() -> None:
    """The editor closes its end of our output first (an answer hits a broken pipe), then of our
    input: the server ends with exit code 0. It used to hang for ever, holding its memory: the
    "output closed" log record, forwarded to the client as window/logMessage, wrote to the same
    closed channel under the writer's lock that the failed write still held."""
    process = subprocess.Popen([sys.executable, "-m", "difill", "--log-level", "INFO", "serve"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdin is not None and process.stdout is not None

    def send(message: dict) -> None:
        body = json.dumps(message).encode()
        process.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        process.stdin.flush()

    try:
        send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"processId": None, "rootUri": None, "capabilities": {}}})
        header = process.stdout.readline()  # the initialize response: the server is up
        assert header.startswith(b"Content-Length")
        send({"jsonrpc": "2.0", "method": "initialized", "params": {}})
        process.stdout.close()
        for i in range(3):
            send({"jsonrpc": "2.0", "id": 2 + i, "method": "difill/status", "params": {}})
        time.sleep(1)
        process.stdin.close()
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
