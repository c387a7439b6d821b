"""Latency of inline completion through the real language server over stdio.

    python bench/lsp.py                 # table
    python bench/lsp.py --json          # table on stderr, the JSON document on stdout
    python bench/lsp.py --out lsp.json  # also write the JSON document to a file

Starts ``python -m difill serve`` (the bundled model unless --model), opens the bundled sample
file and asks for ``textDocument/inlineCompletion`` (trigger Invoked: no debounce) at the end of
each of its non-empty lines, in turn, ``--requests`` times. For every request:

* e2e: from writing the request on the server's stdin to reading the response on its stdout;
* model: the engine's own latency for that request, as the server reports it afterwards in
  ``difill/status`` (``lastRequest.latencyMs``, asked outside the timed span);
* overhead = e2e - model: JSON-RPC framing and parsing, pygls dispatch, the context window,
  queueing to the worker thread, item building and the pipes. Target: < 5 ms at p50.

Then it types one character of a shown suggestion and asks again (typing through: served from
the cache without the model), to time the cached path. Every request differs in its position
or text from the one before, so the typing-through cache never answers a timed model request.

Start: seconds from starting the server to its model being ready (what an editor waits for
after opening). Memory: the server's resident set once the model is ready and its peak over the run (Linux's
/proc VmRSS and VmHWM; None elsewhere), what an editor user pays for keeping difill running.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from difill import __version__, default_model_path
from difill.lsp_server.client import LspClient

URI = "file:///bench/demo.py"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def sample_text() -> str:
    path = default_model_path().parent / "samples" / "demo.py"
    return path.read_text().replace("<|cursor|>", "")


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def resident_mib(pid: int, field: str) -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of a process in MiB, from /proc; None where there is none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    return None


def timed_inline(client: LspClient, line: int, character: int) -> tuple[float, list]:
    params = {"textDocument": {"uri": URI}, "position": {"line": line, "character": character}, "context": {"triggerKind": 1}}
    start = time.perf_counter()
    message = client.response(client.send_request("textDocument/inlineCompletion", params), timeout=120)
    e2e = (time.perf_counter() - start) * 1000
    if "error" in message:
        raise RuntimeError(f"inlineCompletion failed: {message['error']}")
    return e2e, message["result"] or []


def run(args: argparse.Namespace) -> dict:
    server_args = []
    if args.model:
        server_args += ["--model", args.model]
    server_args += ["--backend", args.backend, "--device", args.device]
    started = time.perf_counter()
    client = LspClient(args=server_args, log_level="WARNING")
    try:
        options = {}
        if args.max_tokens:
            options["maxTokens"] = args.max_tokens
        if args.steps:
            options["steps"] = args.steps
        client.initialize(options or None)
        status = client.wait_ready(300)
        if status["model"]["state"] != "ready":
            raise RuntimeError(f"model not ready: {status['model']['message']}")
        ready_s = time.perf_counter() - started  # process start, imports, initialize, model load
        rss_ready = resident_mib(client.process.pid, "VmRSS")
        text = sample_text()
        lines = text.split("\n")
        targets = [(i, utf16_len(line)) for i, line in enumerate(lines) if line.strip()]
        client.open(URI, text)
        version = 1
        for _ in range(args.warmup):
            line, character = targets[0]
            timed_inline(client, line, character)
            # change the text a little so the next request cannot come from the cache
            version += 1
            client.change(URI, version, [{"range": {"start": {"line": 0, "character": 0}, "end": {"line": 0, "character": 0}}, "text": " "}])
            client.change(URI, version + 1, [{"range": {"start": {"line": 0, "character": 0}, "end": {"line": 0, "character": 1}}, "text": ""}])
            version += 1
        e2e, model, server, cached = [], [], [], []
        for i in range(args.requests):
            line, character = targets[i % len(targets)]
            took, items = timed_inline(client, line, character)
            last = client.request("difill/status", {})["lastRequest"]
            if last.get("fromCache"):
                continue  # the same position and text came round again: not a model request
            e2e.append(took)
            model.append(float(last["latencyMs"]))
            server.append(float(last["serverMs"]))
            if items and items[0]["insertText"] and len(cached) < args.requests:
                # type the suggestion's first character, ask again: served from the cache
                typed = items[0]["insertText"][0]
                version += 1
                client.change(URI, version, [{"range": {"start": {"line": line, "character": character},
                                                        "end": {"line": line, "character": character}}, "text": typed}])
                took_cached, _ = timed_inline(client, line, character + utf16_len(typed))
                if client.request("difill/status", {})["lastRequest"].get("fromCache"):
                    cached.append(took_cached)
                version += 1
                client.change(URI, version, [{"range": {"start": {"line": line, "character": character},
                                                        "end": {"line": line, "character": character + utf16_len(typed)}}, "text": ""}])
        final = client.request("difill/status", {})
        rss_peak = resident_mib(client.process.pid, "VmHWM")
    finally:
        client.close()
    overhead = [a - b for a, b in zip(e2e, model)]
    return {
        "benchmark": "lsp",
        "version": __version__,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "processor": platform.processor()},
        "model": final["model"].get("name"), "backend": args.backend, "device": args.device,
        "settings": {"steps": args.steps, "maxTokens": args.max_tokens},
        "requests": len(e2e),
        "overhead_p50_ms": round(percentile(overhead, 50), 3),
        "overhead_p95_ms": round(percentile(overhead, 95), 3),
        "e2e_p50_ms": round(percentile(e2e, 50), 3),
        "e2e_p95_ms": round(percentile(e2e, 95), 3),
        "model_p50_ms": round(percentile(model, 50), 3),
        "model_p95_ms": round(percentile(model, 95), 3),
        "server_extra_p50_ms": round(percentile([s - m for s, m in zip(server, model)], 50), 3),
        "cached_requests": len(cached),
        "cached_e2e_p50_ms": round(percentile(cached, 50), 3) if cached else None,
        "cached_e2e_p95_ms": round(percentile(cached, 95), 3) if cached else None,
        "overhead_target_p50_ms": 5.0,
        "overhead_mean_ms": round(statistics.fmean(overhead), 3) if overhead else None,
        "ready_s": round(ready_s, 2),
        "rss_ready_mib": rss_ready,
        "rss_peak_mib": rss_peak,
        "counters": final["counters"],
    }


def table(result: dict) -> str:
    rows = [
        ("inline completions timed", result["requests"], ""),
        ("e2e p50 / p95", f"{result['e2e_p50_ms']:.2f} / {result['e2e_p95_ms']:.2f}", "ms"),
        ("model p50 / p95", f"{result['model_p50_ms']:.2f} / {result['model_p95_ms']:.2f}", "ms"),
        ("overhead p50 / p95", f"{result['overhead_p50_ms']:.2f} / {result['overhead_p95_ms']:.2f}", "ms (target p50 < 5)"),
        ("  of which in the server, p50", f"{result['server_extra_p50_ms']:.2f}", "ms"),
        ("typing through (cache) p50 / p95",
         "-" if result["cached_e2e_p50_ms"] is None else f"{result['cached_e2e_p50_ms']:.2f} / {result['cached_e2e_p95_ms']:.2f}",
         f"ms ({result['cached_requests']} requests)"),
        ("server start to model ready", f"{result['ready_s']:.2f}", "s"),
        ("server memory: ready / peak", f"{result['rss_ready_mib']} / {result['rss_peak_mib']}", "MiB resident"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"difill LSP benchmark: {result['model']} ({result['backend']}, {result['device']})"]
    lines += [f"  {name:<{width}}  {value} {unit}".rstrip() for name, value, unit in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the JSON document on stdout (the table goes to stderr)")
    parser.add_argument("--out", help="also write the JSON document to this file")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, help="maxTokens setting (default: the engine's)")
    parser.add_argument("--steps", type=int, help="steps setting (default: confidence-threshold decoding)")
    parser.add_argument("--model")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnx"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    result = run(args)
    print(table(result), file=sys.stderr if args.json else sys.stdout)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
