"""Run the service under uvicorn: one event loop, one process pool, signals handled.

The connections are guarded (``_connections``): a cap below the descriptor limit,
raised to the hard limit at start, and deadlines for silent and slow clients. The loop
refuses NaN timers and logs running out of descriptors tersely (``_loop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn

from ._app import create_app
from ._config import ConfigError, ServiceConfig
from ._connections import (
    ConnectionGuard,
    Descriptors,
    accept_batch,
    connection_cap,
    descriptors,
    guarded_protocol,
)
from ._core import Service
from ._loop import quiet_accept_errors, run
from ._types import console

__all__ = ["serve"]


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
    announce = announce or console("serve")
    raised = descriptors()  # before the pools start, so that their processes inherit it
    run(_serve(config, tasks, announce, raised.was))


async def _serve(
    config: ServiceConfig,
    tasks: dict[str, Callable[..., Any]],
    announce: Callable[[str], None],
    was: int,
) -> None:
    asyncio.get_running_loop().set_exception_handler(quiet_accept_errors())
    service = Service(config, tasks)
    # bind first, so that port 0 gives a free port, the real one can be announced, and a
    # port in use fails before anything else starts
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = _listen(config.host, config.port, family)
    try:
        # the service starts outside uvicorn, so that its errors (a database in use, a
        # bad file) reach the user as one line rather than as uvicorn's startup traceback
        await service.start()
        app = create_app(service, manage=False)

        @contextlib.asynccontextmanager
        async def stop_on_shutdown(app: object) -> AsyncIterator[None]:
            # uvicorn raises SIGTERM again once serve() returns: stop inside its shutdown
            try:
                yield
            finally:
                await service.stop()

        app.router.lifespan_context = stop_on_shutdown
        # counted once the store and the pools hold theirs: what is left is for clients
        fds = descriptors(raise_limit=False)
        try:
            cap, warning = connection_cap(fds, config.max_connections)
        except ValueError as exc:
            raise ConfigError(f"max_connections cannot be met: {exc}") from None
        guard = ConnectionGuard(
            cap, config.header_timeout, on_shed=lambda why: service.metrics.shed.labels(why).inc()
        )
        service.metrics.connections.set_function(lambda: len(guard))
        server = _Server(
            uvicorn.Config(
                app,
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=max(1, min(round(config.grace), 3)),
                lifespan="on",
                http=guarded_protocol(guard),
                # uvicorn's default of 5 s closes idle pooled connections under clients
                # that reuse them a moment later (a POST can race the close)
                timeout_keep_alive=config.keep_alive,
                backlog=accept_batch(fds.limit),
            )
        )
        host, port = sock.getsockname()[:2]
        url = f"http://{'[' + host + ']' if family == socket.AF_INET6 else host}:{port}"
        if not config.auth:
            announce(
                "WARNING: no API keys (--no-auth): anyone who can connect to this machine "
                "acts as user 'local'. Loopback only; never use this on a shared machine."
            )
        where = getattr(service.store, "where", config.db)
        slots = service.stats()["workers"]
        if config.executor == "none":
            runs = "runs no jobs itself (--executor none: escala worker runs them)"
        elif config.executor == "local":
            runs = f"{slots['cpu']} CPU worker processes"
        else:
            runs = f"CPU tasks on Ray ({slots['cpu']} CPU{'s' * (slots['cpu'] != 1)})"
        announce(f"escala serve: {len(service.tasks)} tasks, {runs}, jobs in {where}")
        if warning is not None:
            announce(f"WARNING: {warning}")
        announce(_limits(config, fds, was, cap))
        announce(f"listening on {url}  (dashboard {url}/, API docs {url}/docs)")
        try:
            await server.serve(sockets=[sock])
        finally:
            guard.close()
    finally:
        await service.stop()
        sock.close()


def _limits(config: ServiceConfig, fds: Descriptors, was: int, cap: int) -> str:
    """The start-up line of the connection limits, with the figures they come from."""
    limit = f"descriptor limit {fds.limit}" if fds.limit else "no descriptor limit known"
    if fds.limit and was != fds.limit:
        limit += f", raised from {was}"
    return (
        f"connections: {cap} open at most ({limit}, {fds.in_use} in use); request heads "
        f"within {config.header_timeout:g} s, bodies within {config.body_timeout:g} s, "
        f"idle ones closed after {config.keep_alive:g} s"
    )


#: the kernel's queue of connections not yet accepted: long, so that a burst waits there
#: rather than being turned away, while asyncio accepts only ``accept_batch`` per turn
_LISTEN_QUEUE = 2048


class _Server(uvicorn.Server):
    """uvicorn's server, with a long listening queue but short accept batches.

    asyncio takes both from one number (uvicorn's ``backlog``): given the short batch,
    ``startup`` lengthens the queue again.
    """

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        for sock in sockets or ():
            sock.listen(_LISTEN_QUEUE)


def _listen(host: str, port: int, family: socket.AddressFamily) -> socket.socket:
    """Return a listening TCP socket.

    Made by hand rather than with ``socket.create_server``: that one leaves ``proto`` at
    0, and asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets whose
    ``proto`` says TCP. With Nagle on, every answer on a kept-alive connection after the
    first waits for the client's delayed ACK: 40 ms each, measured here.
    """
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(_LISTEN_QUEUE)
    except BaseException:
        sock.close()
        raise
    return sock
