"""The service's settings: light (no web stack), so that the CLI can build its parser without it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class ServiceSettings:
    """Everything ``difill serve-model`` can set; one object for the local server and the replicas."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # bearer token; None: no authentication
    max_batch: int = 8  # requests denoised together
    max_wait_ms: float = 10.0  # how long the oldest queued request waits for others to join
    max_queue: int = 256  # queued requests beyond this get 503
    max_body_bytes: int = 1 << 20  # 413 above
    rate_limit: float = 20.0  # requests per second per client (token or address); 0: off
    rate_burst: int = 40
    max_tokens_cap: int = 1024  # max_tokens above this are clamped (a shared service's cost bound)
    heartbeat_s: float = 0.1  # streams: a comment line this often while a request waits
    model: str | None = None
    backend: str = "torch"
    device: str = "cpu"
    dtype: str | None = None  # EngineSettings.dtype; bfloat16 batches 1.2-1.6x faster on AMX CPUs
    ray: str | None = None  # None: one local process; "local" or a cluster address: Ray Serve
    min_replicas: int = 1
    max_replicas: int = 4
    replica_cpus: float = 1.0

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be at least 1, not {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ValueError(f"--max-wait-ms must be >= 0, not {self.max_wait_ms}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be between 0 and 65535, not {self.port}")
        if self.rate_limit < 0 or self.rate_burst < 1:
            raise ValueError("the rate limit must be >= 0 requests/s with a burst of at least 1")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min replicas ({self.min_replicas}) <= max replicas ({self.max_replicas})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
