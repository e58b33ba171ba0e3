"""Run the service under uvicorn: one event loop, one process pool, signals handled."""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Callable
from typing import Any

import uvicorn

from ._app import create_app
from ._config import ServiceConfig
from ._core import Service

__all__ = ["serve"]

log = logging.getLogger("escala.service")


def serve(
    config: ServiceConfig,
    tasks: dict[str, Callable[..., Any]],
    *,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then stop gracefully.

    On a signal, uvicorn stops accepting connections and gives open requests a few
    seconds; then the service refuses new jobs, gives running ones ``config.grace``
    seconds, and leaves what is left queued in the store for the next start.

    One web process by design: the event loop only routes, admits and awaits, which one
    core does for thousands of requests a second, and every other core goes to the one
    process pool. Several web processes would each need their own pool or a broker
    between them, and each would fight the pool for cores.
    """
    announce = announce or (lambda line: print(line, file=sys.stderr, flush=True))
    service = Service(config, tasks)
    app = create_app(service)
    # bind here, so that port 0 gives a free port and the real one can be announced
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.create_server((config.host, config.port), family=family, backlog=2048)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if family == socket.AF_INET6 else host}:{port}"
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=max(1, min(round(config.grace), 3)),
            lifespan="on",
        )
    )
    if not config.auth:
        announce(
            "WARNING: no API keys (--no-auth): anyone who can connect to this machine acts "
            "as user 'local'. Loopback only; never use this on a shared machine."
        )
    announce(
        f"escala serve: {len(service.tasks)} tasks, {config.cpu_pool_size} CPU worker "
        f"processes, jobs in {config.db}"
    )
    announce(f"listening on {url}  (dashboard {url}/, API docs {url}/docs)")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise SystemExit(1)
