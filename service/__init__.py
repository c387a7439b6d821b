"""difill.service: a shared inference service over HTTP (issue 10).

    difill serve-model [--host H] [--port P] [--ray ADDRESS] [--token T] [--max-batch N] [--max-wait-ms M]

One process with uvicorn by default; ``--ray local`` (a Ray instance on loopback) or ``--ray
ADDRESS`` (a cluster) deploys the same app as a Ray Serve deployment whose replicas scale with
the load. Modules: ``settings`` (ServiceSettings), ``batcher`` (dynamic batching shared by both
modes), ``app`` (the FastAPI app: routes, guards), ``metrics`` (Prometheus text), ``server``
(local mode), ``ray_serve`` (Ray mode), ``client`` (RemoteEngine: the Engine surface over HTTP).

This module stays light (no web stack imported) so that the CLI can build its parser.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from difill.service.settings import ServiceSettings

__all__ = ["ServiceSettings", "add_arguments", "settings_from_args", "main", "TOKEN_ENV"]

log = logging.getLogger(__name__)

TOKEN_ENV = "DIFILL_API_TOKEN"  # the bearer token, for servers and clients, when not given as an option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``difill serve-model``."""
    d = ServiceSettings()
    parser.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    parser.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port}; 0: any free port, local mode)")
    parser.add_argument("--ray", metavar="ADDRESS", help="serve on Ray Serve: 'local' starts Ray on loopback, "
                        "else a cluster address (ray://host:10001 or auto)")
    parser.add_argument("--token", help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV} if set)")
    parser.add_argument("--max-batch", type=int, default=d.max_batch, help=f"requests denoised together (default {d.max_batch})")
    parser.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                        help=f"how long a request waits for others to join its batch (default {d.max_wait_ms:g})")
    parser.add_argument("--max-queue", type=int, default=d.max_queue, help=f"queued requests before 503 (default {d.max_queue})")
    parser.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="413 above (default 1 MiB)")
    parser.add_argument("--rate-limit", type=float, default=d.rate_limit,
                        help=f"requests/s per client, 0: off (default {d.rate_limit:g})")
    parser.add_argument("--rate-burst", type=int, default=d.rate_burst, help=f"burst per client (default {d.rate_burst})")
    parser.add_argument("--max-tokens-cap", type=int, default=d.max_tokens_cap,
                        help=f"clamp max_tokens to this (default {d.max_tokens_cap})")
    parser.add_argument("--min-replicas", type=int, default=d.min_replicas, help="Ray mode (default 1)")
    parser.add_argument("--max-replicas", type=int, default=d.max_replicas, help=f"Ray mode (default {d.max_replicas})")
    parser.add_argument("--replica-cpus", type=float, default=d.replica_cpus, help="Ray mode: CPUs per replica (default 1)")


def settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    """ServiceSettings from parsed options (and the CLI's global --model/--backend/--device/--dtype)."""
    return ServiceSettings(
        host=args.host, port=args.port, token=args.token or os.environ.get(TOKEN_ENV) or None,
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes, rate_limit=args.rate_limit, rate_burst=args.rate_burst,
        max_tokens_cap=args.max_tokens_cap, model=getattr(args, "model", None), backend=getattr(args, "backend", "torch"),
        device=getattr(args, "device", "cpu"), dtype=getattr(args, "dtype", None), ray=args.ray, min_replicas=args.min_replicas,
        max_replicas=args.max_replicas, replica_cpus=args.replica_cpus)


def main(args: argparse.Namespace) -> int:
    """``difill serve-model``: 2 on a bad option or a missing web stack; a model that cannot be
    loaded raises ModelLoadError (the CLI exits 3)."""
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"difill: {exc}", file=sys.stderr)
        return 2
    needed = ["fastapi", "uvicorn"] + (["ray.serve"] if settings.ray else [])
    for module in needed:
        try:
            __import__(module)
        except ImportError:
            print(f"difill: serve-model needs {module.split('.')[0]}: pip install 'difill[serve]'", file=sys.stderr)
            return 2
    if settings.ray:
        from difill.service.ray_serve import serve_ray

        return serve_ray(settings)
    from difill.service.server import serve_local

    try:
        return serve_local(settings)
    except OSError as exc:  # the port is taken, the address is not ours
        print(f"difill: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
