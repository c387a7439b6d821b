"""Prometheus text-format metrics of one replica: requests, batch sizes, latency.

A few counters and histograms are all the service needs, so they are kept here (thread-safe,
no dependency) rather than in prometheus_client's global registry, which would be shared by
every service object in a test process. In Ray mode each replica counts its own requests and
``GET /metrics`` answers from the replica that took it (label ``replica``); a Prometheus that
scrapes Ray's own metrics endpoint sees Ray Serve's per-deployment figures as well.
"""

from __future__ import annotations

import threading
from typing import Iterable

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, buckets: Iterable[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


class Metrics:
    """Request counts by endpoint and status, batch sizes, latency and queue wait."""

    def __init__(self, replica: str = "local"):
        self.replica = replica
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.cancelled = 0
        self.stopped = 0
        self.batches = 0
        self.batched_requests = 0
        self.max_batch_size = 0
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.queue_wait = Histogram(LATENCY_BUCKETS)
        self.in_flight = 0

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def completed(self, latency_s: float, queue_s: float) -> None:
        with self._lock:
            self.latency.observe(latency_s)
            self.queue_wait.observe(queue_s)

    def batch(self, size: int) -> None:
        with self._lock:
            self.batches += 1
            self.batched_requests += size
            self.max_batch_size = max(self.max_batch_size, size)
            self.batch_size.observe(size)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled += 1

    def stop(self, n: int = 1) -> None:
        with self._lock:
            self.stopped += n

    def render(self, queued: int = 0) -> str:
        """The exposition text (version 0.0.4)."""
        r = f'replica="{self.replica}"'
        out: list[str] = []
        with self._lock:
            out += ["# HELP difill_requests_total HTTP requests by endpoint and status code.",
                    "# TYPE difill_requests_total counter"]
            for (endpoint, status), n in sorted(self.requests.items()):
                out.append(f'difill_requests_total{{{r},endpoint="{endpoint}",status="{status}"}} {n}')
            out += ["# HELP difill_cancelled_total Requests dropped or stopped because their client disconnected.",
                    "# TYPE difill_cancelled_total counter", f"difill_cancelled_total{{{r}}} {self.cancelled}",
                    "# HELP difill_stopped_total Requests whose denoising was cut short or never started "
                    "because their client disconnected.",
                    "# TYPE difill_stopped_total counter", f"difill_stopped_total{{{r}}} {self.stopped}",
                    "# HELP difill_batches_total Batches run on the engine.",
                    "# TYPE difill_batches_total counter", f"difill_batches_total{{{r}}} {self.batches}",
                    "# HELP difill_batch_size_max The largest batch so far.",
                    "# TYPE difill_batch_size_max gauge", f"difill_batch_size_max{{{r}}} {self.max_batch_size}",
                    "# HELP difill_queued_requests Requests waiting for a batch.",
                    "# TYPE difill_queued_requests gauge", f"difill_queued_requests{{{r}}} {queued}",
                    "# HELP difill_in_flight_requests Requests being served.",
                    "# TYPE difill_in_flight_requests gauge", f"difill_in_flight_requests{{{r}}} {self.in_flight}"]
            out += _histogram("difill_batch_size", "Requests per engine batch.", self.batch_size, r)
            out += _histogram("difill_request_latency_seconds", "Time from arrival to result of an infill.",
                              self.latency, r)
            out += _histogram("difill_queue_wait_seconds", "Time an infill waited for its batch to start.",
                              self.queue_wait, r)
        return "\n".join(out) + "\n"


def _histogram(name: str, help_text: str, h: Histogram, labels: str) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for bound, n in zip(h.buckets, h.counts):
        lines.append(f'{name}_bucket{{{labels},le="{bound:g}"}} {n}')
    lines += [f'{name}_bucket{{{labels},le="+Inf"}} {h.total}', f"{name}_sum{{{labels}}} {h.sum:.6f}",
              f"{name}_count{{{labels}}} {h.total}"]
    return lines
