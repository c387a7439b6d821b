"""The Ray Serve mode: the same app (:func:`difill.service.app.create_app`) in every replica of a
Ray Serve deployment whose replica count follows the load.

Each replica loads the model and runs its own :class:`~difill.service.batcher.Batcher`, so
requests that Ray routes to one replica are denoised together; Ray Serve's autoscaler adds a
replica when the requests in flight per replica stay above ``max_batch`` (one full batch) and
removes it when they stay low. Every node of a cluster needs difill (the same version) installed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

from difill.service.settings import ServiceSettings

log = logging.getLogger(__name__)

APP_NAME = "difill"


def deployment_options(settings: ServiceSettings) -> dict[str, Any]:
    """Ray Serve's options: autoscaling on requests in flight, a replica's CPUs."""
    return {
        "name": "difill",
        "ray_actor_options": {"num_cpus": settings.replica_cpus},
        # Room for a batch being denoised and the next one forming behind it.
        "max_ongoing_requests": max(2, settings.max_batch * 4),
        "autoscaling_config": {
            "min_replicas": settings.min_replicas,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": max(1, settings.max_batch),
            "upscale_delay_s": 5,
            "downscale_delay_s": 60,
        },
    }


def build_application(settings: ServiceSettings) -> Any:
    """The bound Ray Serve application (``serve.run`` it)."""
    from ray import serve

    def build_app():  # runs in each replica when it starts
        from difill.service.app import InferenceService, create_app

        context = serve.get_replica_context()
        replica = getattr(getattr(context, "replica_id", None), "unique_id", None) or getattr(context, "replica_tag", "replica")
        return create_app(InferenceService.load(settings, replica=str(replica)))

    class DifillReplica:
        """A replica: its app (engine, batcher, metrics) is built by ``build_app``."""

    ingress = serve.ingress(build_app)(DifillReplica)
    return serve.deployment(**deployment_options(settings))(ingress).bind()


def start(settings: ServiceSettings) -> str:
    """Join (or start) Ray, deploy, and return the service's URL. ``settings.ray``: "local"
    starts a Ray instance on loopback for this process; anything else is a cluster address."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        if settings.ray == "local":
            # A loopback instance sends nothing out: no usage statistics either.
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        else:
            ray.init(address=settings.ray, log_to_driver=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_application(settings), name=APP_NAME, route_prefix="/")
    return f"http://{settings.host}:{settings.port}"


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.delete(APP_NAME)
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_ray(settings: ServiceSettings) -> int:
    """``difill serve-model --ray ADDRESS``: deploy and block until interrupted, then tear down."""
    url = start(settings)
    print(f"difill: serving on {url} (Ray Serve, {settings.min_replicas}-{settings.max_replicas} replicas, "
          f"max batch {settings.max_batch})", file=sys.stderr, flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    stop()
    return 0
