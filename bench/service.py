"""Load test of the inference service (difill serve-model) on loopback: throughput and latency
against the number of concurrent clients, with dynamic batching and without it.

    python bench/service.py                # table on stdout (about 2 minutes on a 2-core CPU)
    python bench/service.py --json         # one JSON object on stdout
    python bench/service.py --out FILE     # the JSON object into FILE as well
    python bench/service.py --quick        # shorter levels, for a smoke run
    python bench/service.py --workload typing   # editors typing: a request per keystroke, one document key each
    python bench/service.py --dtype bfloat16    # bfloat16 weights (faster batches on AMX CPUs)

Two real ``difill serve-model`` processes run on 127.0.0.1, batched (``--max-batch 16``) and
unbatched (``--max-batch 1``); level by level, alternating between them, 1, 4 and 16 clients each send
``POST /v1/infill`` requests back to back over a keep-alive connection (single-line infills at
varied positions of a Python file), for a bounded time and count per level. Throughput is
completed requests per second of wall time; latency is per request, as a client sees it.

For reference, just before the 16-client level, 16 of the cases also run in this process on the engine alone: one by one and
as one ``Engine.infill_batch``. Their ratio bounds what batching can give the service here.

The targets (issue 10): with batching, at 16 clients, >= 3x the single-request throughput (one
client, no batching) with p95 latency under 3x the single-request p95.
"""

from __future__ import annotations

import argparse
import http.client
import inspect
import json
import os
import platform
import random
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

LEVELS = (1, 4, 16)
CONFIGS = {"unbatched": ["--max-batch", "1", "--max-wait-ms", "0"],
           "batched": ["--max-batch", "16", "--max-wait-ms", "10"]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def cases(n: int, seed: int = 0) -> list[dict]:
    """Single-line holes at the ends of lines of a stdlib module (the same for every run)."""
    source = inspect.getsource(textwrap)
    lines = source.split("\n")
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        i = rng.randrange(20, len(lines) - 1)
        line = lines[i]
        if len(line.strip()) < 8:
            continue
        cut = rng.randrange(len(line) - len(line.lstrip()) + 2, len(line))
        prefix = "\n".join(lines[:i] + [line[:cut]])
        suffix = "\n".join(lines[i + 1:])
        out.append({"prefix": prefix[-4000:], "suffix": suffix[:1000], "language": "python",
                    "options": {"mode": "line", "maxTokens": 16}, "rest": line[cut:]})
    return out


def request_bodies(client: int, clients: int, all_cases: list[dict], workload: str) -> list[bytes]:
    """One client's requests. ``cold``: its share of the cases, each a new document. ``typing``:
    an editor's session on each of its cases: the rest of the line typed one character at a time,
    a request after every keystroke, under one document key (the service reuses the context)."""
    mine = all_cases[client::clients] or all_cases[:1]
    bodies = []
    for j, case in enumerate(mine):
        request = {k: v for k, v in case.items() if k != "rest"}
        if workload == "cold":
            bodies.append(json.dumps(request).encode())
            continue
        for i in range(len(case["rest"]) + 1):
            bodies.append(json.dumps({**request, "prefix": case["prefix"] + case["rest"][:i],
                                      "documentKey": f"client{client}/case{j}"}).encode())
    return bodies


class Server:
    """A ``difill serve-model`` subprocess on a free loopback port."""

    def __init__(self, extra: list[str], model: str | None, dtype: str | None = None):
        args = [sys.executable, "-m", "difill"] + (["--model", model] if model else []) + \
               (["--dtype", dtype] if dtype else []) + ["serve-model", "--host", "127.0.0.1", "--port", "0", "--rate-limit", "0", *extra]
        self.process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 180
        line = ""
        while "serving on" not in line:
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"difill serve-model did not start: {line!r}")
            line = self.process.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        self.port = int(match.group(1))
        threading.Thread(target=self.process.stderr.read, daemon=True).start()  # keep the pipe drained

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def client_loop(port: int, bodies: list[bytes], deadline: float, max_requests: int, latencies: list[float],
                batch_sizes: list[int], errors: list[str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for k in range(max_requests):
            if time.monotonic() >= deadline:
                break
            body = bodies[k % len(bodies)]
            start = time.perf_counter()
            conn.request("POST", "/v1/infill", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            took = (time.perf_counter() - start) * 1000
            if response.status != 200:
                errors.append(f"HTTP {response.status}: {data[:200]!r}")
                continue
            latencies.append(took)
            batch_sizes.append(json.loads(data)["stats"]["batchSize"])
    finally:
        conn.close()


def run_level(port: int, clients: int, all_cases: list[dict], seconds: float, max_requests: int,
              workload: str = "cold") -> dict:
    latencies: list[float] = []
    sizes: list[int] = []
    errors: list[str] = []
    threads = []
    deadline = time.monotonic() + seconds
    start = time.perf_counter()
    for c in range(clients):
        mine = request_bodies(c, clients, all_cases, workload)
        threads.append(threading.Thread(target=client_loop, args=(port, mine, deadline, max_requests, latencies, sizes, errors)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "first_error": errors[0] if errors else None,
            "wall_s": round(wall, 2), "throughput_rps": round(len(latencies) / wall, 2),
            "p50_ms": round(percentile(latencies, 50), 1), "p95_ms": round(percentile(latencies, 95), 1),
            "mean_batch": round(sum(sizes) / len(sizes), 2) if sizes else 0.0}


def engine_reference(all_cases: list[dict], model: str | None, dtype: str | None = None) -> dict:
    """16 cases one by one and as one batch, on the engine in this process."""
    from difill.inference.engine import Engine, EngineSettings, InfillRequest

    engine = Engine.load(model, settings=EngineSettings(dtype=dtype))
    requests = [InfillRequest(prefix=c["prefix"], suffix=c["suffix"], language=c["language"], mode="line",
                              max_tokens=c["options"]["maxTokens"]) for c in all_cases[:16]]  # cold: new documents
    engine.infill(requests[0])
    start = time.perf_counter()
    for request in requests:
        engine.infill(request)
    single = time.perf_counter() - start
    start = time.perf_counter()
    engine.infill_batch(requests)
    batch = time.perf_counter() - start
    return {"requests": len(requests), "one_by_one_s": round(single, 2), "batch_s": round(batch, 2),
            "batch_speedup": round(single / batch, 2), "single_ms": round(single / len(requests) * 1000, 1)}


def run(args: argparse.Namespace) -> dict:
    seconds = 4.0 if args.quick else args.seconds
    all_cases = cases(64)
    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    servers: dict[str, Server] = {}
    try:
        for name, extra in CONFIGS.items():
            servers[name] = Server(extra, args.model, args.dtype)
            run_level(servers[name].port, 1, all_cases[:2], 30, 3)  # warm-up
        # Both servers stay up and the configurations alternate level by level, so that a
        # background load that comes and goes hits both alike (an idle server costs nothing).
        reference = None
        for n in LEVELS:
            if n == LEVELS[-1]:  # the engine reference, in the same stretch of time as the last level
                reference = engine_reference(all_cases, args.model, args.dtype)
            for name in CONFIGS:
                results[name].append(run_level(servers[name].port, n, all_cases, seconds, args.max_requests, args.workload))
    finally:
        for server in servers.values():
            server.stop()
    single = results["unbatched"][0]
    top = results["batched"][-1]
    summary = {
        "speedup_at_16": round(top["throughput_rps"] / single["throughput_rps"], 2) if single["throughput_rps"] else None,
        "p95_ratio_at_16": round(top["p95_ms"] / single["p95_ms"], 2) if single["p95_ms"] else None,
        "unbatched_speedup_at_16": round(results["unbatched"][-1]["throughput_rps"] / single["throughput_rps"], 2)
        if single["throughput_rps"] else None,
    }
    summary["meets_target"] = bool(summary["speedup_at_16"] and summary["speedup_at_16"] >= 3
                                   and summary["p95_ratio_at_16"] is not None and summary["p95_ratio_at_16"] < 3)
    return {"benchmark": "service", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds_per_level": seconds,
            "max_requests_per_client": args.max_requests, "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "dtype": args.dtype or "float32", "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()], "workload": args.workload,
            "case": "line infill, maxTokens 16, Python" + (", typing sessions (documentKey)" if args.workload == "typing" else ""),
            "configs": {name: " ".join(extra) for name, extra in CONFIGS.items()}, "results": results, "engine_reference": reference,
            "summary": summary}


def print_table(report: dict) -> None:
    print(f"difill serve-model on 127.0.0.1 ({report['dtype']} weights): {report['case']}; {report['seconds_per_level']:g} s per level; "
          f"{report['cpu_count']} CPUs, load average {report['load_average_before'][0]} before, "
          f"{report['load_average_after'][0]} after")
    print(f"{'config':10} {'clients':>7} {'requests':>8} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'batch':>6} {'errors':>6}")
    for name, levels in report["results"].items():
        for r in levels:
            print(f"{name:10} {r['clients']:7d} {r['requests']:8d} {r['throughput_rps']:7.2f} {r['p50_ms']:8.1f} "
                  f"{r['p95_ms']:8.1f} {r['mean_batch']:6.2f} {r['errors']:6d}")
    e = report["engine_reference"]
    print(f"engine alone, in process: {e['requests']} requests one by one {e['one_by_one_s']} s, as one batch "
          f"{e['batch_s']} s: {e['batch_speedup']}x (the most batching can give here)")
    s = report["summary"]
    print(f"batched at 16 clients: {s['speedup_at_16']}x the single-request throughput, p95 {s['p95_ratio_at_16']}x "
          f"the single-request p95 (target >= 3x and < 3x: {'met' if s['meets_target'] else 'not met'}); "
          f"unbatched at 16: {s['unbatched_speedup_at_16']}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--out", help="also write the JSON object to this file")
    parser.add_argument("--quick", action="store_true", help="4 s per level")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each level (default 10)")
    parser.add_argument("--max-requests", type=int, default=200, help="most requests per client per level (default 200)")
    parser.add_argument("--model", help="model directory (default: the bundled model)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="the servers' weights (difill --dtype; default float32)")
    parser.add_argument("--workload", choices=("cold", "typing"), default="cold",
                        help="cold: every request a new document; typing: editors' typing sessions, one document key each")
    args = parser.parse_args()
    report = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
