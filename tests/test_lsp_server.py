"""The language server end to end: ``python -m difill serve`` as a subprocess over stdio, the
real bundled model, a JSON-RPC client with Content-Length framing (difill.lsp_server.client).

One server process serves the whole module (the model loads once). Assertions are about the
protocol's mechanics, which hold for any model; where a test needs the model to say something,
it completes at a probe context found at start-up (fixed-step decoding, which commits text
before it can end) and skips, saying so, if the model says nothing anywhere.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from difill.lsp_server.client import LspClient

pytestmark = pytest.mark.timeout(300)

OPTIONS = {"steps": 4, "maxTokens": 12, "adaptiveDebounce": False, "debounceMs": 0}
PROBES = [
    ("def add(a, b):\n    return ", "\n"),
    ("x = [1, 2, 3]\nprint(", ")\n"),
    ("import os\nimport ", "\n"),
    ("for i in range(10):\n    ", "\n"),
    ("class A:\n    def __init__(self):\n        self.", "\n"),
]


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lsp") / "server.log"


@pytest.fixture(scope="module")
def client(log_file: Path):
    c = LspClient(log_file=str(log_file), log_level="INFO")
    c.init_result = c.initialize(OPTIONS)
    assert c.wait_ready()["model"]["state"] == "ready"
    yield c
    assert c.close() == 0


@pytest.fixture(scope="module")
def probe(client: LspClient) -> tuple[str, str, str]:
    """(prefix, suffix, completion) where the model completes with some text."""
    for prefix, suffix in PROBES:
        result = client.request("difill/infill", {"prefix": prefix, "suffix": suffix, "language": "python"})
        if result["completion"].strip():
            return prefix, suffix, result["completion"]
    pytest.skip("the bundled model completes none of the probe contexts with text")


def status(client: LspClient, uri: str | None = None) -> dict:
    return client.request("difill/status", {"textDocument": {"uri": uri}} if uri else {})


def end_of(text: str) -> tuple[int, int]:
    """UTF-16 position of the end of ``text``."""
    lines = text.split("\n")
    return len(lines) - 1, len(lines[-1].encode("utf-16-le")) // 2


def test_initialize_advertises_capabilities(client: LspClient) -> None:
    caps = client.init_result["capabilities"]
    assert "inlineCompletionProvider" in caps
    assert "completionProvider" in caps
    assert caps["executeCommandProvider"]["commands"] == ["difill.accept"]
    assert caps["positionEncoding"] == "utf-16"
    assert caps["textDocumentSync"]["change"] == 2 and caps["textDocumentSync"]["openClose"]
    assert client.init_result["serverInfo"]["name"] == "difill"


def test_model_load_reports_work_done_progress(client: LspClient) -> None:
    # The client sends `initialized` right after the initialize answer, long before the model
    # (torch import included) is loaded, so there is always a load to report.
    creates = [r for r in client.server_requests if r["method"] == "window/workDoneProgress/create"]
    assert len(creates) == 1
    token = creates[0]["params"]["token"]
    kinds = [n["params"]["value"]["kind"] for n in client.notifications if n["method"] == "$/progress" and n["params"]["token"] == token]
    assert kinds[0] == "begin" and kinds[-1] == "end"


def test_inline_completion_matches_the_engine(client: LspClient, probe) -> None:
    prefix, suffix, completion = probe
    uri = "file:///inline.py"
    client.open(uri, prefix + suffix)
    line, character = end_of(prefix)
    items = client.inline(uri, line, character, trigger=1)
    assert isinstance(items, list) and items
    item = items[0]
    assert item["insertText"] == completion
    assert item["range"] == {"start": {"line": line, "character": character}, "end": {"line": line, "character": character}}
    assert item["command"]["command"] == "difill.accept" and len(item["command"]["arguments"]) == 1


def test_automatic_trigger_is_answered(client: LspClient, probe) -> None:
    prefix, suffix, completion = probe
    uri = "file:///automatic.py"
    client.open(uri, prefix + suffix)
    items = client.inline(uri, *end_of(prefix), trigger=2)
    assert [i["insertText"] for i in items] == [completion]


def test_selected_completion_info_is_extended(client: LspClient, probe) -> None:
    prefix, suffix, _ = probe
    uri = "file:///selected.py"
    client.open(uri, prefix + "ab" + suffix)
    line, character = end_of(prefix + "ab")
    selected = {"range": {"start": {"line": line, "character": character - 2}, "end": {"line": line, "character": character}},
                "text": "abc"}
    items = client.inline(uri, line, character, selected=selected)
    for item in items:
        assert item["insertText"].startswith("abc")
        assert item["range"] == selected["range"]


def test_completion_request_inserts_the_infill(client: LspClient, probe) -> None:
    prefix, suffix, completion = probe
    uri = "file:///completion.py"
    client.open(uri, prefix + suffix)
    line, character = end_of(prefix)
    result = client.request("textDocument/completion", {"textDocument": {"uri": uri}, "position": {"line": line, "character": character}})
    assert result["isIncomplete"] is True
    item = result["items"][0]
    word = prefix.split("\n")[-1]
    word = word[len(word.rstrip("abcdefghijklmnopqrstuvwxyz_")):]
    assert item["textEdit"]["newText"] == word + completion
    assert item["textEdit"]["range"]["end"] == {"line": line, "character": character}
    assert item["command"]["command"] == "difill.accept"
    if "\n" in completion.strip("\n"):
        assert completion.strip() in item["documentation"]["value"]


def test_infill_request_forms_and_stats(client: LspClient, probe) -> None:
    prefix, suffix, completion = probe
    raw = client.request("difill/infill", {"prefix": prefix, "suffix": suffix, "language": "python",
                                           "options": {"mode": "line", "maxTokens": 8, "steps": 4}})
    assert set(raw["stats"]) >= {"steps", "tokens", "latencyMs", "serverMs"}
    assert raw["mode"] == "line" and raw["stats"]["steps"] >= 1 and raw["stats"]["latencyMs"] > 0
    assert raw["candidates"][0]["text"] == raw["completion"] if raw["candidates"] else raw["completion"] == ""
    uri = "file:///infill.py"
    client.open(uri, prefix + suffix)
    line, character = end_of(prefix)
    by_document = client.request("difill/infill", {"textDocument": {"uri": uri}, "position": {"line": line, "character": character}})
    assert by_document["completion"] == completion
    several = client.request("difill/infill", {"prefix": prefix, "suffix": suffix, "options": {"candidates": 3, "mode": "line"}})
    assert len(several["candidates"]) <= 3
    assert len({c["text"] for c in several["candidates"]}) == len(several["candidates"])  # no duplicates


def test_infill_rejects_bad_params(client: LspClient) -> None:
    for params in ({"prefix": 3}, {"textDocument": {"uri": "file:///x.py"}}, {"prefix": "x", "options": {"mode": "page"}},
                   {"prefix": "x", "options": {"maxTokens": 0}}, [1, 2], None):
        message = client.response(client.send_request("difill/infill", params))
        assert message["error"]["code"] == -32602, params
        assert message["error"]["message"]


def test_progress_notifications_stream_each_step(client: LspClient, probe) -> None:
    prefix, suffix, _ = probe
    result = client.request("difill/infill", {"prefix": prefix, "suffix": suffix, "progressToken": "p-1",
                                              "options": {"progress": True, "mode": "block", "steps": 4, "maxTokens": 16}})
    steps = [n["params"] for n in client.notifications if n["method"] == "difill/progress" and n["params"]["token"] == "p-1"]
    assert len(steps) == result["stats"]["steps"]
    assert all(isinstance(s["texts"][0], str) for s in steps)
    committed = [s["committed"] for s in steps if s["block"] == 0]
    assert committed == sorted(committed)  # fixed-step decoding only ever commits more
    # Without a token, the request id is the token; without "progress", nothing is streamed.
    before = len(client.notifications)
    client.request("difill/infill", {"prefix": prefix, "suffix": suffix})
    assert not [n for n in client.notifications[before:] if n["method"] == "difill/progress"]


def test_acceptance_feedback_counts(client: LspClient, probe) -> None:
    prefix, suffix, _ = probe
    uri = "file:///accept.py"
    client.open(uri, prefix + suffix)
    item = client.inline(uri, *end_of(prefix))[0]
    item_id = item["command"]["arguments"][0]
    before = status(client)["counters"]
    assert client.request("workspace/executeCommand", {"command": "difill.accept", "arguments": [item_id]}) is True
    client.notify("difill/didPartiallyAccept", {"itemId": item_id, "acceptedLength": 1})
    client.notify("difill/didPartiallyAccept", {"itemId": "no-such-item", "acceptedLength": 1})
    assert client.request("workspace/executeCommand", {"command": "difill.accept", "arguments": ["no-such-item"]}) is False
    after = status(client)["counters"]
    assert after["accepted"] == before["accepted"] + 1
    assert after["partiallyAccepted"] == before["partiallyAccepted"] + 1
    assert after["acceptedChars"] == before["acceptedChars"] + len(item["insertText"]) + 1


def test_typing_through_is_served_from_cache(client: LspClient, probe) -> None:
    prefix, suffix, completion = probe
    uri = "file:///typing.py"
    client.open(uri, prefix + suffix)
    line, character = end_of(prefix)
    first = client.inline(uri, line, character, trigger=2)
    assert first[0]["insertText"] == completion
    before = status(client)["counters"]
    typed = completion[0]
    client.change(uri, 2, [{"range": {"start": {"line": line, "character": character}, "end": {"line": line, "character": character}},
                            "text": typed}])
    new_line, new_character = end_of(prefix + typed)
    items = client.inline(uri, new_line, new_character, trigger=2)
    after = status(client)["counters"]
    if len(completion) > 1:
        assert items[0]["insertText"] == completion[1:]
        assert after["servedFromCache"] == before["servedFromCache"] + 1
        assert after["modelRuns"] == before["modelRuns"]
    # A character that does not match the suggestion runs the model again.
    wrong = "\x01" if typed != "\x01" else "\x02"
    client.change(uri, 3, [{"range": {"start": {"line": new_line, "character": new_character},
                                      "end": {"line": new_line, "character": new_character}}, "text": wrong}])
    client.inline(uri, new_line, new_character + 1, trigger=2)
    assert status(client)["counters"]["modelRuns"] == after["modelRuns"] + 1


def test_a_newer_request_supersedes_an_older_one(client: LspClient) -> None:
    uri = "file:///supersede.py"
    client.open(uri, "def f(x):\n    return \n")
    client.notify("workspace/didChangeConfiguration", {"settings": {"difill": {"debounceMs": 400}}})
    try:
        before = status(client)["counters"]
        first = client.send_request("textDocument/inlineCompletion", {"textDocument": {"uri": uri}, "position": {"line": 1, "character": 11},
                                                                      "context": {"triggerKind": 2}})
        second = client.send_request("textDocument/inlineCompletion", {"textDocument": {"uri": uri}, "position": {"line": 1, "character": 11},
                                                                       "context": {"triggerKind": 2}})
        assert client.response(first)["result"] == []
        assert "result" in client.response(second)
        assert status(client)["counters"]["superseded"] == before["superseded"] + 1
    finally:
        client.notify("workspace/didChangeConfiguration", {"settings": {"difill": {"debounceMs": 0}}})


def test_cancel_request_stops_denoising(client: LspClient) -> None:
    """A request cancelled mid-run answers -32800 and its denoising stops between two steps:
    it streams fewer steps than the same request run to the end."""
    params = {"prefix": "def main():\n", "suffix": "\n", "language": "python",
              "options": {"progress": True, "mode": "block", "steps": 64, "maxTokens": 256, "constrainSyntax": False}}
    full = client.request("difill/infill", {**params, "progressToken": "full"})
    full_steps = full["stats"]["steps"]
    if full_steps < 8 or full["stats"]["latencyMs"] < 200:
        pytest.skip(f"this infill ends after {full_steps} steps in {full['stats']['latencyMs']} ms: too soon to cancel it mid-run reliably")
    msg_id = client.send_request("difill/infill", {**params, "progressToken": "cut"})
    client.wait_notification("difill/progress", lambda m: m["params"]["token"] == "cut")
    client.cancel(msg_id)
    assert client.response(msg_id)["error"]["code"] == -32800
    client.request("difill/status", {})  # the worker is free again: this and the next answer
    time.sleep(0.5)
    cut_steps = [n for n in client.notifications if n["method"] == "difill/progress" and n["params"]["token"] == "cut"]
    assert len(cut_steps) < full_steps
    assert status(client)["counters"]["cancelled"] >= 1


def test_document_sync_full_and_incremental_unicode(client: LspClient) -> None:
    uri = "file:///unicode.py"
    text = "s = '😀中文'\r\nt = 1\r\n"
    client.open(uri, text)
    # Insert after the emoji (UTF-16: the emoji is two code units).
    col = len("s = '😀".encode("utf-16-le")) // 2
    client.change(uri, 2, [{"range": {"start": {"line": 0, "character": col}, "end": {"line": 0, "character": col}}, "text": "🧪"}])
    text = text.replace("😀", "😀🧪")
    client.change(uri, 3, [{"range": {"start": {"line": 1, "character": 4}, "end": {"line": 1, "character": 5}}, "text": "２"}])
    text = text.replace("t = 1", "t = ２")
    doc = status(client, uri)["document"]
    assert doc["sha256"] == hashlib.sha256(text.encode()).hexdigest() and doc["version"] == 3 and doc["lines"] == 3
    client.change(uri, 4, [{"text": "whole\nnew"}])
    assert status(client, uri)["document"]["sha256"] == hashlib.sha256(b"whole\nnew").hexdigest()
    client.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
    assert status(client, uri)["document"] is None


def test_configuration_changes_apply_and_bad_values_warn(client: LspClient) -> None:
    client.notify("workspace/didChangeConfiguration", {"settings": {"difill": {"candidates": 2, "steps": "lots"}}})
    try:
        settings = status(client)["settings"]
        assert settings["candidates"] == 2 and settings["steps"] == 4
        client.wait_notification("window/logMessage", lambda m: "'steps'" in m["params"]["message"])
    finally:
        client.notify("workspace/didChangeConfiguration", {"settings": {"difill": {"candidates": 1}}})
    # Pull model: empty settings make the server ask with workspace/configuration.
    client.configuration = {"maxTokens": 10}
    client.notify("workspace/didChangeConfiguration", {"settings": None})
    deadline = time.monotonic() + 10
    while status(client)["settings"]["maxTokens"] != 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status(client)["settings"]["maxTokens"] == 10
    client.notify("workspace/didChangeConfiguration", {"settings": {"maxTokens": OPTIONS["maxTokens"]}})


def test_languages_setting_disables_completion(client: LspClient, probe) -> None:
    prefix, suffix, _ = probe
    uri = "file:///notes.md"
    client.open(uri, prefix + suffix, language_id="markdown")
    client.notify("workspace/didChangeConfiguration", {"settings": {"languages": ["python"]}})
    try:
        assert client.inline(uri, *end_of(prefix)) == []
    finally:
        client.notify("workspace/didChangeConfiguration", {"settings": {"languages": None}})
    assert status(client)["settings"]["languages"] is None


def test_nothing_but_protocol_on_stdout_and_a_log_file(client: LspClient, log_file: Path) -> None:
    status(client)
    assert client.raw_stdout_garbage == []
    assert any(n["method"] == "window/logMessage" for n in client.notifications)
    assert "difill" in log_file.read_text()
