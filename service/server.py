"""The local mode: one process, the engine behind the batcher, served by uvicorn."""

from __future__ import annotations

import logging
import socket
import sys

from difill.service.settings import ServiceSettings

log = logging.getLogger(__name__)


def serve_local(settings: ServiceSettings) -> int:
    """Load the model, listen on ``settings.host:port`` (port 0: any free port) and serve until
    interrupted. Prints ``difill: serving on http://HOST:PORT`` on stderr once it listens."""
    import uvicorn

    from difill.service.app import InferenceService, create_app

    service = InferenceService.load(settings)
    app = create_app(service)
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.create_server((settings.host, settings.port), family=family)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level=logging.getLevelName(max(logging.getLogger().level, logging.WARNING)).lower(),
                            access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    print(f"difill: serving on http://{host}:{port} (model {service.engine.name}, max batch {settings.max_batch}, "
          f"max wait {settings.max_wait_ms:g} ms)", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    return 0
