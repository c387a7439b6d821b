"""The inference service (issue 10): real HTTP over loopback, the real model, uvicorn in local
mode and a real local Ray instance with Ray Serve.

Servers here run in this process on threads (uvicorn) sharing one loaded engine, except the
CLI test (``difill serve-model`` in a subprocess) and the Ray test (replicas are Ray workers).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import uvicorn  # noqa: E402

from difill.inference.engine import Engine, InfillRequest  # noqa: E402
from difill.inference.loader import ModelLoadError  # noqa: E402
from difill.inference.sampler import Cancelled  # noqa: E402
from difill.service.app import InferenceService, create_app  # noqa: E402
from difill.service.batcher import BatchItem, EngineRunner  # noqa: E402
from difill.service.client import RemoteEngine, RemoteError  # noqa: E402
from difill.service.settings import ServiceSettings  # noqa: E402

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PREFIX = "def add(a, b):\n    return "


# ---------------------------------------------------------------------- helpers
class ThreadServer:
    """uvicorn serving one InferenceService on 127.0.0.1:<free port>, on a thread."""

    def __init__(self, engine: Engine, **settings: Any):
        self.service = InferenceService(engine, ServiceSettings(port=0, **settings))
        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.service), log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def call(url: str, path: str, body: Any = None, headers: dict | None = None, raw: bytes | None = None,
         timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request; error statuses are returned, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url + path, data=data, headers=hdrs, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def post_json(url: str, path: str, body: Any, headers: dict | None = AUTH) -> tuple[int, dict]:
    status, _, data = call(url, path, body, headers)
    return status, json.loads(data) if data else {}


def metric(url: str, name: str, headers: dict | None = AUTH) -> float:
    """Sum of a metric's samples (all label sets) from /metrics."""
    status, _, text = call(url, "/metrics", headers=headers)
    assert status == 200
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text.decode(), re.M)]
    assert values, f"{name} not in /metrics"
    return sum(values)


def raw_post(port: int, path: str, body: dict) -> socket.socket:
    """A POST over a plain socket, so that a test can hang up whenever it likes."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def sse_events(body: bytes) -> list[tuple[str, Any]]:
    events = []
    for block in body.decode().split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        event = next((line[6:].strip() for line in lines if line.startswith("event:")), "message")
        data = "\n".join(line[5:].strip() for line in lines if line.startswith("data:"))
        events.append((event, data if data == "[DONE]" else json.loads(data)))
    return events


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load()


@pytest.fixture(scope="module")
def local(engine: Engine) -> Iterator[ThreadServer]:
    """The main local-mode server: a token, small limits, no rate limit."""
    server = ThreadServer(engine, token=TOKEN, max_batch=8, max_wait_ms=50, rate_limit=0,
                          max_body_bytes=64 * 1024, max_tokens_cap=32)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def patient(engine: Engine) -> Iterator[ThreadServer]:
    """A server whose requests wait up to 3 s for a batch of 4: deterministic batching and
    a window in which a queued request's client can hang up."""
    server = ThreadServer(engine, token=TOKEN, max_batch=4, max_wait_ms=3000, rate_limit=0, max_tokens_cap=32)
    yield server
    server.stop()


# ---------------------------------------------------------------------- local mode
def test_completions_openai_shape(local: ThreadServer, engine: Engine) -> None:
    status, out = post_json(local.url, "/v1/completions", {"model": "whatever", "prompt": PREFIX, "suffix": "\n",
                                                           "max_tokens": 8, "n": 2, "seed": 3, "temperature": 0.2})
    assert status == 200, out
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert out["model"] == engine.name
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert all(isinstance(c["text"], str) and c["finish_reason"] in ("stop", "length") for c in out["choices"])
    expected = engine.infill(InfillRequest(prefix=PREFIX, suffix="\n", max_tokens=8, candidates=2, seed=3))
    assert [c["text"] for c in out["choices"]] == expected.candidates
    assert out["difill"]["batch_size"] >= 1 and out["usage"]["completion_tokens"] == expected.tokens


def test_infill_matches_engine_and_caps_max_tokens(local: ThreadServer, engine: Engine) -> None:
    body = {"prefix": PREFIX, "suffix": "\n", "language": "python",
            "options": {"mode": "block", "maxTokens": 200, "steps": 4}}
    status, out = post_json(local.url, "/v1/infill", body)
    assert status == 200, out
    expected = engine.infill(InfillRequest(prefix=PREFIX, suffix="\n", language="python", mode="block",
                                           max_tokens=32, steps=4))  # the server's cap is 32
    assert out["completion"] == expected.completion and out["candidates"] == expected.candidates
    assert out["stats"]["tokens"] == expected.tokens <= 32
    assert out["mode"] == "block" and out["language"] == expected.language


def test_concurrent_requests_share_a_batch(patient: ThreadServer) -> None:
    before = metric(patient.url, "difill_batches_total")
    bodies = [{"prefix": f"def f{i}(x):\n    return ", "suffix": "\n", "options": {"mode": "line", "maxTokens": 8}}
              for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: post_json(patient.url, "/v1/infill", b), bodies))
    assert all(status == 200 for status, _ in answers), answers
    sizes = [out["stats"]["batchSize"] for _, out in answers]
    assert max(sizes) > 1, sizes
    assert metric(patient.url, "difill_batch_size_max") > 1
    assert metric(patient.url, "difill_batches_total") - before < 4  # fewer batches than requests


def test_queued_request_of_a_gone_client_is_dropped(patient: ThreadServer) -> None:
    stopped = metric(patient.url, "difill_stopped_total")
    batches = metric(patient.url, "difill_batches_total")
    sock = raw_post(patient.port, "/v1/infill", {"prefix": PREFIX, "options": {"maxTokens": 8}})
    time.sleep(0.3)  # queued: the batch waits up to 3 s for three more requests
    sock.close()
    assert wait_for(lambda: metric(patient.url, "difill_stopped_total") == stopped + 1, 2.5)
    assert metric(patient.url, "difill_cancelled_total") >= 1
    time.sleep(3)
    assert metric(patient.url, "difill_batches_total") == batches  # it never reached the engine


def test_stream_of_a_gone_client_is_cancelled(local: ThreadServer, engine: Engine) -> None:
    stopped = metric(local.url, "difill_stopped_total")
    cancelled = metric(local.url, "difill_cancelled_total")
    # Keep the engine busy with a batch of this test's own, so that the stream is still waiting
    # for it when its client hangs up: the engine must then stop at its first cancel check.
    busy = threading.Thread(target=engine.infill_batch, args=([InfillRequest(prefix=f"def g{i}():\n", mode="block",
                                                                             max_tokens=64, steps=64)
                                                                for i in range(16)],))
    busy.start()
    try:
        assert wait_for(lambda: engine._lock.locked(), 5)
        sock = raw_post(local.port, "/v1/infill", {"prefix": PREFIX, "stream": True, "options": {"maxTokens": 8}})
        received = b""
        while b": waiting" not in received:  # the stream is open and the request waits
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
        assert received.startswith(b"HTTP/1.1 200")
        sock.close()
        assert wait_for(lambda: metric(local.url, "difill_cancelled_total") == cancelled + 1, 5)
        assert busy.is_alive(), "the engine's own batch ended too soon for this test"
    finally:
        busy.join()
    assert wait_for(lambda: metric(local.url, "difill_stopped_total") == stopped + 1, 5)
    status, out = post_json(local.url, "/v1/infill", {"prefix": PREFIX, "options": {"maxTokens": 4}})
    assert status == 200, out  # and it goes on serving


def test_cancel_flag_is_checked_between_steps(engine: Engine) -> None:
    runner = EngineRunner(engine)
    request = InfillRequest(prefix=PREFIX, suffix="\n", mode="block", max_tokens=16, steps=16)
    full = engine.infill(request)
    item = BatchItem(request)
    seen = []

    def on_step(view) -> None:
        seen.append(view.step)
        item.cancel()  # the client goes away during the first step

    item.on_step = on_step
    (result,) = runner([item])
    if full.steps > 1:
        assert isinstance(result, Cancelled) and seen == [1]
    else:  # one step and done: nothing left to cancel
        assert result.completion == full.completion


def test_a_gone_client_leaves_its_batch_and_the_others_go_on(engine: Engine) -> None:
    runner = EngineRunner(engine)
    requests = [InfillRequest(prefix=f"x{i} = ", mode="line", max_tokens=8) for i in range(2)]
    items = [BatchItem(r) for r in requests]
    for item in items:
        item.cancel()
    assert all(isinstance(r, Cancelled) for r in runner(items))
    partly = [BatchItem(r) for r in requests]
    partly[0].cancel()  # one client left: the batch goes on for it alone
    results = runner(partly)
    assert isinstance(results[0], Cancelled)
    assert results[1].completion == engine.infill(requests[1]).completion


def test_streams_report_each_step_then_the_result(local: ThreadServer, engine: Engine) -> None:
    status, _, body = call(local.url, "/v1/infill", {"prefix": PREFIX, "suffix": "\n", "stream": True,
                                                     "options": {"maxTokens": 6, "steps": 3}}, AUTH)
    assert status == 200
    events = sse_events(body)
    steps = [data for event, data in events if event == "step"]
    results = [data for event, data in events if event == "result"]
    assert steps and len(results) == 1
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    mask = engine.model.config.mask_token_id
    masked = [sum(t == mask for t in s["canvas"][0]) for s in steps]
    assert masked == sorted(masked, reverse=True) and masked[0] < 6  # the first step committed something
    assert results[0]["completion"] == engine.infill(InfillRequest(prefix=PREFIX, suffix="\n", max_tokens=6, steps=3)).completion

    status, _, body = call(local.url, "/v1/completions", {"prompt": PREFIX, "suffix": "\n", "stream": True,
                                                          "max_tokens": 6}, AUTH)
    chunks = sse_events(body)
    assert status == 200 and chunks[-1] == ("message", "[DONE]")
    final = chunks[-2][1]
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c[1]["choices"][0]["finish_reason"] is None for c in chunks[:-2])


def test_authentication(local: ThreadServer) -> None:
    body = {"prompt": PREFIX, "max_tokens": 2}
    status, _, data = call(local.url, "/v1/completions", body, headers={})
    assert status == 401 and "missing bearer token" in json.loads(data)["error"]["message"]
    status, headers, data = call(local.url, "/v1/completions", body, headers={"Authorization": "Bearer nope"})
    assert status == 401 and "wrong bearer token" in json.loads(data)["error"]["message"]
    assert headers.get("www-authenticate", headers.get("WWW-Authenticate")) == "Bearer"
    assert call(local.url, "/metrics", headers={})[0] == 401
    assert call(local.url, "/health", headers={})[0] == 200  # liveness needs no token
    assert call(local.url, "/v1/completions", body, headers=AUTH)[0] == 200


@pytest.mark.parametrize("body, status, words", [
    (b'{"prompt": "x = ', 400, "not valid JSON"),
    (b'[1, 2]', 400, "body"),
    (json.dumps({"prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "x", "max_tokens": "8"}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "n": 9}).encode(), 400, "n: Input should be less than or equal to 8"),
    (json.dumps({"suffix": "x"}).encode(), 400, "prompt: Field required"),
    (b'{"prompt": "\\ud800"}', 400, "lone surrogate"),
    (json.dumps({"prompt": "x" * 70_000}).encode(), 413, "larger than 65536 bytes"),
])
def test_bad_completions_get_a_clear_4xx(local: ThreadServer, body: bytes, status: int, words: str) -> None:
    got, _, data = call(local.url, "/v1/completions", raw=body, headers=AUTH)
    assert got == status
    message = json.loads(data)["error"]["message"]
    assert words in message, message
    assert call(local.url, "/v1/completions", {"prompt": "y = ", "max_tokens": 2}, AUTH)[0] == 200  # still serving


def test_bad_infill_bodies(local: ThreadServer) -> None:
    status, out = post_json(local.url, "/v1/infill", {"prefix": "x", "options": {"maxTokenz": 3}})
    assert status == 400 and "options.maxTokenz" in out["error"]["message"]
    status, out = post_json(local.url, "/v1/infill", {"prefix": "x", "options": {"mode": "paragraph"}})
    assert status == 400 and out["error"]["param"] == "options.mode"
    status, out = post_json(local.url, "/v1/infill", {"prefix": "x", "seed": -1})
    assert status == 400 and "seed" in out["error"]["message"]


def test_chunked_oversized_body_gets_413(local: ThreadServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", local.port, timeout=30)
    chunks = (b"x" * 16384 for _ in range(8))  # 128 KiB without a Content-Length
    conn.request("POST", "/v1/completions", body=chunks, headers={**AUTH, "Content-Type": "application/json"},
                 encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413
    conn.close()


def test_rate_limit_per_client(engine: Engine) -> None:
    server = ThreadServer(engine, rate_limit=1.0, rate_burst=2)
    try:
        statuses = [call(server.url, "/v1/completions", raw=b"{")[0] for _ in range(3)]
        assert statuses[:2] == [400, 400] and statuses[2] == 429
        status, headers, data = call(server.url, "/v1/completions", raw=b"{")
        assert status == 429 and int(headers.get("retry-after", headers.get("Retry-After"))) >= 1
        assert "rate limit" in json.loads(data)["error"]["message"]
        assert call(server.url, "/health")[0] == 200  # GETs are not limited
    finally:
        server.stop()


def test_metrics_health_openapi(local: ThreadServer) -> None:
    post_json(local.url, "/v1/completions", {"prompt": "z = ", "max_tokens": 2})
    status, _, text = call(local.url, "/metrics", headers=AUTH)
    body = text.decode()
    assert status == 200
    for line in ("# TYPE difill_requests_total counter", "# TYPE difill_batch_size histogram",
                 "# TYPE difill_request_latency_seconds histogram"):
        assert line in body
    assert metric(local.url, 'difill_request_latency_seconds_count') >= 1
    assert re.search(r'^difill_requests_total\{replica="local",endpoint="/v1/completions",status="200"\} [1-9]', body, re.M)
    for line in body.strip().split("\n"):  # every sample line: name{labels} value
        assert line.startswith("#") or re.fullmatch(r'[a-z_]+(\{[^}]*\})? -?[0-9.e+]+', line), line
    health = json.loads(call(local.url, "/health")[2])
    assert health["status"] == "ok" and health["queued"] == 0
    doc = json.loads(call(local.url, "/openapi.json")[2])
    props = doc["components"]["schemas"]["CompletionBody"]["properties"]
    assert {"prompt", "suffix", "max_tokens", "n", "stream", "seed", "model"} <= set(props)
    assert {"/v1/completions", "/v1/infill", "/health", "/metrics"} <= set(doc["paths"])


# ---------------------------------------------------------------------- clients
def test_remote_engine_matches_the_local_engine(local: ThreadServer, engine: Engine) -> None:
    remote = RemoteEngine(local.url, token=TOKEN)
    request = InfillRequest(prefix=PREFIX, suffix="\n", language="python", max_tokens=16, candidates=2, seed=7)
    assert remote.infill(request).candidates == engine.infill(request).candidates
    views = []
    result = remote.infill(request, on_step=views.append)
    assert views and result.completion == engine.infill(request).completion
    assert remote.tokenizer.decode([t for t in views[-1].canvas[0] if t != remote.model.config.mask_token_id]) \
        == engine.tokenizer.decode([t for t in views[-1].canvas[0] if t != engine.model.config.mask_token_id])
    with pytest.raises(Cancelled):
        remote.infill(request, cancel=lambda: True)
    with pytest.raises(ValueError, match="lone surrogate"):  # the service's 400 comes back as ValueError
        remote.infill(InfillRequest(prefix="x = '\ud800"))
    assert remote.describe()["model"] == engine.name
    batch = remote.infill_batch([InfillRequest(prefix=f"y{i} = ", max_tokens=4) for i in range(3)])
    assert all(not isinstance(r, Exception) for r in batch)


def test_remote_engine_errors(local: ThreadServer) -> None:
    with pytest.raises(ModelLoadError, match="wrong bearer token"):
        RemoteEngine(local.url, token="nope")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(ModelLoadError, match="cannot reach"):
        RemoteEngine(f"http://127.0.0.1:{free}")
    with pytest.raises(ModelLoadError, match="http"):
        RemoteEngine("ftp://127.0.0.1/")
    assert issubclass(RemoteError, RuntimeError)


def test_language_server_host_uses_a_service_url(local: ThreadServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from difill.lsp_server.engine_host import READY, EngineHost

    monkeypatch.setenv("DIFILL_API_TOKEN", TOKEN)
    host = EngineHost()

    async def scenario():
        loop = asyncio.get_running_loop()
        state = await host.load(loop, local.url, "torch", "cpu", None)
        request = InfillRequest(prefix=PREFIX, suffix="\n", max_tokens=4)
        result = await host.submit(loop, lambda: host.engine.infill(request), None)
        return state, result

    (state, message), result = asyncio.run(scenario())
    host.stop()
    assert state == READY, message
    assert isinstance(host.engine, RemoteEngine) and local.url in host.engine.name
    assert isinstance(result.completion, str) and result.steps >= 1


def test_cli_serve_model_and_infill_endpoint_match_local(tmp_path: Path) -> None:
    from difill import cli

    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(json.dumps({"id": i, "prefix": f"def f{i}(a, b):\n    return ", "suffix": "\n",
                                         "language": "python", "max_tokens": 12}) + "\n" for i in range(4))
                     + '{"id": "bad", "prefix": 3}\n')
    env = {**os.environ, "DIFILL_API_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "difill", "serve-model", "--port", "0", "--max-wait-ms", "20"],
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "serving on" not in line and time.monotonic() < deadline and server.poll() is None:
            line = server.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert match, f"no 'serving on' line: {line!r}"
        url = match.group(0)
        assert cli.main(["infill", "--input", str(cases), "--output", str(tmp_path / "local.jsonl"), "--batch-size", "1"]) == 0
        os.environ["DIFILL_API_TOKEN"] = TOKEN
        try:
            assert cli.main(["infill", "--endpoint", url, "--input", str(cases), "--output", str(tmp_path / "remote.jsonl"),
                             "--batch-size", "1"]) == 0
        finally:
            del os.environ["DIFILL_API_TOKEN"]
        local_out = [json.loads(x) for x in (tmp_path / "local.jsonl").read_text().splitlines()]
        remote_out = [json.loads(x) for x in (tmp_path / "remote.jsonl").read_text().splitlines()]
        assert [o["id"] for o in remote_out] == [0, 1, 2, 3, "bad"]
        assert [o.get("completion") for o in remote_out] == [o.get("completion") for o in local_out]
        assert "error" in remote_out[-1] and "prefix" in remote_out[-1]["error"]
        assert cli.main(["infill", "--endpoint", "http://127.0.0.1:1", "--input", str(cases)]) == 3
    finally:
        server.terminate()
        server.wait(30)


def test_serve_model_rejects_bad_options(capsys: pytest.CaptureFixture) -> None:
    from difill import cli

    assert cli.main(["serve-model", "--max-batch", "0"]) == 2
    assert "--max-batch must be at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------------- schemathesis
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(local: ThreadServer):
    return schemathesis.openapi.from_url(local.url + "/openapi.json")


fuzzed = schemathesis.pytest.from_fixture("api_schema")


@fuzzed.parametrize()
@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
def test_openapi_fuzz_never_gets_a_5xx(case, local: ThreadServer) -> None:
    case.call_and_validate(headers=AUTH, checks=[not_a_server_error], timeout=60)
