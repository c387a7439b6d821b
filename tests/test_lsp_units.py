"""The language server's plain functions: settings, debounce, context window, typing-through
cache, items, framing. The server itself is driven over stdio in test_lsp_server.py."""

from __future__ import annotations

import io
import json

from lsprotocol import types

from difill.lsp_server import config
from difill.inference.engine import render_canvas
from difill.inference.sampler import StepView
from difill.lsp_server.completion import (TypingCache, completion_items, context_window, inline_items, looks_binary,
                                          word_before)
from difill.lsp_server.debounce import Debouncer, adaptive_delay_ms, context_factor
from difill.lsp_server.transport import FrameError, read_frame


def test_settings_accept_camel_case_and_sections() -> None:
    s, warnings = config.update(config.Settings(), {"difill": {"steps": 8, "maxTokens": 32, "adaptiveDebounce": False}})
    assert (s.steps, s.max_tokens, s.adaptive_debounce) == (8, 32, False)
    assert warnings == []


def test_bad_settings_are_ignored_with_a_warning() -> None:
    base = config.Settings(steps=4)
    s, warnings = config.update(base, {"steps": "many", "mode": "paragraph", "colour": "red", "languages": "python"})
    assert s == base
    assert len(warnings) == 4 and any("colour" in w for w in warnings) and any("'steps'" in w for w in warnings)
    s, warnings = config.update(base, {"debounceMinMs": 900, "debounceMaxMs": 100})
    assert (s.debounce_min_ms, s.debounce_max_ms) == (base.debounce_min_ms, base.debounce_max_ms) and warnings


def test_model_change_is_detected() -> None:
    s, _ = config.update(config.Settings(), {"device": "cuda"})
    assert config.model_changed(config.Settings(), s)
    s, _ = config.update(config.Settings(), {"steps": 3})
    assert not config.model_changed(config.Settings(), s)
    s, warnings = config.update(config.Settings(), {"dtype": "bfloat16"})
    assert s.dtype == "bfloat16" and not warnings and config.model_changed(config.Settings(), s)
    s, warnings = config.update(s, {"dtype": "float64"})
    assert s.dtype == "bfloat16" and warnings  # not a choice: ignored, the previous value stays
    from difill.inference.engine import WEIGHT_TYPES

    for weights in WEIGHT_TYPES:  # every weight type the engine loads is a setting an editor may send
        s, warnings = config.update(config.Settings(), {"dtype": weights})
        assert s.dtype == weights and not warnings


def test_languages_filter() -> None:
    s, _ = config.update(config.Settings(), {"languages": ["python", "rust"]})
    assert s.enabled_for("python") and not s.enabled_for("markdown")
    assert config.Settings().enabled_for("anything")


def test_debounce_context_and_formula() -> None:
    assert context_factor("    ", "") == 0.5
    assert context_factor("foo(", ")") == 0.5
    assert context_factor("    retu", "") == 1.0
    assert context_factor("x = f", "(a, b) + 1") == 1.5
    assert adaptive_delay_ms(100, 1.0, 0, 20, 400) == 150
    assert adaptive_delay_ms(100, 1.0, 200, 20, 400) == 50  # slow model: start earlier
    assert adaptive_delay_ms(10_000, 1.0, 0, 20, 400) == 400
    assert adaptive_delay_ms(0, 1.0, 0, 20, 400) == 20


def test_debounce_follows_typing_speed() -> None:
    d = Debouncer()
    for i in range(30):  # fast typist: 50 ms per key
        fast = d.delay_ms("a", i * 50.0, "    retu", "", adaptive=True, fixed_ms=75, low_ms=20, high_ms=400)
    e = Debouncer()
    for i in range(30):  # slow typist: 400 ms per key
        slow = e.delay_ms("a", i * 400.0, "    retu", "", adaptive=True, fixed_ms=75, low_ms=20, high_ms=400)
    assert fast < slow
    assert abs(fast - 75) < 5  # 1.5 * 50
    assert d.delay_ms("a", 10**7, "x", "", adaptive=False, fixed_ms=75, low_ms=20, high_ms=400) == 75


def test_context_window_bounds_and_line_cuts() -> None:
    text = "".join(f"line {i}\n" for i in range(20_000))
    offset = text.index("line 10000\n") + 4
    w = context_window(text, offset, 1000, 200)
    assert text[w.start:offset] == w.prefix
    assert len(w.prefix) <= 1000 + 12 and w.prefix.startswith("line ")
    assert text[offset:].startswith(w.suffix) and len(w.suffix) <= 200 and w.suffix.endswith("\n")
    # The start moves in quanta: typing a few characters keeps it.
    assert context_window(text, offset + 3, 1000, 200).start == w.start
    small = context_window("abc", 1, 1000, 1000)
    assert (small.prefix, small.suffix, small.start) == ("a", "bc", 0)


def test_binary_detection() -> None:
    assert looks_binary(context_window("ab\0cd", 3, 100, 100))
    assert not looks_binary(context_window("abcd", 3, 100, 100))


def test_typing_through_serves_the_remainder() -> None:
    cache = TypingCache()
    text = "def f(x):\n    return \n"
    offset = text.index("return ") + 7
    key = ("auto", None, None, 1, True)
    cache.remember("u", offset, context_window(text, offset, 1000, 1000), ["x + 1", "x * 2"], key)
    typed = text[:offset] + "x " + text[offset:]
    assert cache.lookup("u", offset + 2, context_window(typed, offset + 2, 1000, 1000), key) == ["+ 1", "* 2"]
    plus = text[:offset] + "x +" + text[offset:]
    assert cache.lookup("u", offset + 3, context_window(plus, offset + 3, 1000, 1000), key) == [" 1"]
    assert cache.lookup("u", offset, context_window(text, offset, 1000, 1000), key) == ["x + 1", "x * 2"]
    wrong = text[:offset] + "y" + text[offset:]
    assert cache.lookup("u", offset + 1, context_window(wrong, offset + 1, 1000, 1000), key) is None
    assert cache.lookup("u", offset + 2, context_window(typed, offset + 2, 1000, 1000), ("line",)) is None
    suffix_changed = typed.replace("\n    return x \n", "\n    return x \n# new\n")
    assert cache.lookup("u", offset + 2, context_window(suffix_changed, offset + 2, 1000, 1000), key) is None
    # Typed all of it: nothing left to serve, the model must run.
    whole = text[:offset] + "x + 1" + text[offset:]
    assert cache.lookup("u", offset + 5, context_window(whole, offset + 5, 1000, 1000), key) is None


def test_typing_cache_is_bounded() -> None:
    cache = TypingCache(max_documents=3)
    w = context_window("x" * 5000, 5000, 10_000, 10)
    for i in range(10):
        cache.remember(f"u{i}", 5000, w, ["y" * 100], ())
    assert len(cache._entries) == 3
    assert cache.nbytes() <= 3 * 2 * (512 + 100)


def test_inline_items_extend_the_selected_completion() -> None:
    position = types.Position(3, 7)
    selected = types.SelectedCompletionInfo(range=types.Range(types.Position(3, 4), types.Position(3, 7)), text="append")
    items = inline_items(["(x)"], position, ["d1"], selected)
    assert items[0].insert_text == "append(x)" and items[0].range == selected.range
    assert items[0].command.command == "difill.accept" and items[0].command.arguments == ["d1"]
    plain = inline_items(["foo", "bar"], position, ["d2", "d3"])
    assert [i.insert_text for i in plain] == ["foo", "bar"] and plain[0].range == types.Range(position, position)


def test_completion_items_replace_the_word_and_document_multi_line() -> None:
    position = types.Position(1, 8)
    items = completion_items(["urn x\n    y = 2"], position, 3, "ret", ["d1"], "python")
    item = items[0]
    assert item.text_edit.new_text == "return x\n    y = 2" and item.filter_text == "return x"
    assert item.text_edit.range.start == types.Position(1, 5) and item.text_edit.range.end == position
    assert item.documentation is not None and "y = 2" in item.documentation.value
    single = completion_items(["x + 1"], position, 0, "", ["d2"])[0]
    assert single.documentation is None and single.label == "x + 1"
    assert word_before("    self.val") == "val" and word_before("x = ") == ""


def test_render_canvas_marks_masked_positions() -> None:
    class Tok:
        def decode(self, ids):
            return "".join(chr(ord("a") + i - 10) for i in ids)

    assert render_canvas(Tok(), StepView(0, 1, [[10, 0, 11, 1, 12]], 2), mask_id=0, end_id=1) == ["a░b"]
    # Token healing: the canvas rewrites the word before the cursor ("ab|"), which is not shown again.
    healing = StepView(0, 1, [[10, 0, 12], [10, 11, 12, 13]], 4, heal=["ab", "ab"])
    assert render_canvas(Tok(), healing, mask_id=0, end_id=1) == ["░c", "cd"]


def test_read_frame_headers() -> None:
    body = json.dumps({"jsonrpc": "2.0", "method": "x"}).encode()
    stream = io.BytesIO(b"content-length: %d\r\nContent-Type: application/vscode-jsonrpc\r\n\r\n" % len(body) + body)
    assert read_frame(stream) == body
    assert read_frame(stream) is None
    bad = io.BytesIO(b"Content-Length: abc\r\n\r\n" + b"Content-Length: 2\r\n\r\n{}")
    try:
        read_frame(bad)
        raise AssertionError("a bad header must raise")
    except FrameError:
        pass
    assert read_frame(bad) == b"{}"  # and reading goes on


def test_engine_host_stop_waits_for_the_job_in_hand() -> None:
    """stop() lets the worker finish its job and says whether it did within the wait: the server
    exits normally when it did, and without finalizing the interpreter (under a running torch
    operation) when it did not."""
    import asyncio
    import threading

    from difill.lsp_server.engine_host import EngineHost

    release = threading.Event()
    host = EngineHost()
    host.start()
    loop = asyncio.new_event_loop()
    try:
        host.submit(loop, lambda: release.wait(10), None)
        assert host.stop(wait_s=0.2) is False  # the job is still running
        release.set()
        assert host.stop(wait_s=5) is True
    finally:
        release.set()
        loop.close()
    assert EngineHost().stop(wait_s=1) is True  # never started
