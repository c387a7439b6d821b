"""The inference service on Ray Serve (issue 10): a real local Ray instance on loopback with
minimal resources, the service deployed on it, real HTTP through Ray Serve's proxy."""

from __future__ import annotations

import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

from difill.inference.engine import InfillRequest  # noqa: E402
from difill.service import ray_serve  # noqa: E402
from difill.service.client import RemoteEngine  # noqa: E402
from difill.service.settings import ServiceSettings  # noqa: E402

from test_service import AUTH, PREFIX, TOKEN, call, metric, post_json, raw_post, wait_for  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_deployment_autoscales_on_requests_in_flight() -> None:
    options = ray_serve.deployment_options(ServiceSettings(max_batch=8, min_replicas=1, max_replicas=3, replica_cpus=0.5))
    scaling = options["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (1, 3, 8)
    assert options["max_ongoing_requests"] > scaling["target_ongoing_requests"]  # room for a batch to form
    assert options["ray_actor_options"] == {"num_cpus": 0.5}


@pytest.fixture(scope="module")
def ray_url() -> Iterator[tuple[str, int]]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", include_dashboard=False, num_cpus=2, _node_ip_address="127.0.0.1", log_to_driver=False)
    settings = ServiceSettings(port=port, token=TOKEN, max_batch=4, max_wait_ms=2000, rate_limit=0, max_tokens_cap=16,
                               max_body_bytes=32 * 1024, min_replicas=1, max_replicas=1, replica_cpus=1)
    try:
        url = ray_serve.start(settings)
        yield url, port
    finally:
        ray_serve.stop()


def test_ray_batches_concurrent_completions(ray_url: tuple[str, int]) -> None:
    url, _ = ray_url
    bodies = [{"prompt": f"def f{i}(x):\n    return ", "suffix": "\n", "max_tokens": 6} for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: post_json(url, "/v1/completions", b), bodies))
    assert all(status == 200 for status, _ in answers), answers
    assert max(out["difill"]["batch_size"] for _, out in answers) > 1
    assert metric(url, "difill_batch_size_max") > 1
    health = json.loads(call(url, "/health")[2])
    assert health["status"] == "ok" and health["replica"] != "local"


def test_ray_auth_and_bad_requests(ray_url: tuple[str, int]) -> None:
    url, _ = ray_url
    body = {"prompt": PREFIX, "max_tokens": 2}
    assert call(url, "/v1/completions", body, headers={})[0] == 401
    assert call(url, "/v1/completions", body, headers={"Authorization": "Bearer wrong"})[0] == 401
    status, _, data = call(url, "/v1/completions", raw=b'{"prompt": ', headers=AUTH)
    assert status == 400 and "not valid JSON" in json.loads(data)["error"]["message"]
    status, _, data = call(url, "/v1/completions", {"prompt": ["a", "b"]}, headers=AUTH)
    assert status == 400 and "prompt" in json.loads(data)["error"]["message"]
    assert call(url, "/v1/completions", {"prompt": "x" * 40_000}, headers=AUTH)[0] == 413
    assert call(url, "/v1/completions", body, headers=AUTH)[0] == 200  # still serving


def test_ray_drops_the_request_of_a_gone_client(ray_url: tuple[str, int]) -> None:
    url, port = ray_url
    stopped = metric(url, "difill_stopped_total")
    batches = metric(url, "difill_batches_total")
    sock = raw_post(port, "/v1/infill", {"prefix": PREFIX, "options": {"maxTokens": 4}})
    time.sleep(0.5)  # queued: its batch waits up to 2 s for three more
    sock.close()
    assert wait_for(lambda: metric(url, "difill_stopped_total") == stopped + 1, 1.4)
    time.sleep(2)
    assert metric(url, "difill_batches_total") == batches


def test_ray_streams_steps_to_a_remote_engine(ray_url: tuple[str, int]) -> None:
    url, _ = ray_url
    remote = RemoteEngine(url, token=TOKEN)
    views = []
    request = InfillRequest(prefix=PREFIX, suffix="\n", max_tokens=8, steps=4)
    streamed = remote.infill(request, on_step=views.append)
    assert views and [v.step for v in views] == list(range(1, len(views) + 1))
    assert streamed.completion == remote.infill(request).completion
