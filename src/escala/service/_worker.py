"""``escala worker``: run the jobs of a shared store, with no HTTP, on any machine.

A worker is the service's running half: the same ``Service`` as ``escala serve``, with
its dispatcher, pools, leases and heartbeat, claiming from a store that ``serve``
processes fill (PostgreSQL). Any number of workers and servers may share one database;
the fair claim and the leases live there, so nothing has to know how many there are.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
from collections.abc import Callable
from typing import Any

from .._worker.cpu import usable_cpus
from ._config import ConfigError, ServiceConfig
from ._core import Service
from ._loop import run
from ._types import console

__all__ = ["work"]


def work(
    config: ServiceConfig,
    tasks: dict[str, Callable[..., Any]],
    *,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Run jobs from ``config.store`` until SIGINT or SIGTERM, then stop gracefully.

    On a signal the worker claims no more jobs, gives running ones ``config.grace``
    seconds, and puts the rest back in the queue for any other node to take.

    Raises:
        ConfigError: ``config.store`` is not set (a SQLite file cannot be shared), or the
            executor is ``"none"``.
        StoreError: the store cannot be opened.
    """
    if config.store is None:
        raise ConfigError(
            "store is needed: a worker takes jobs from a database that escala serve "
            "shares with it (--store postgresql://...); with SQLite, escala serve runs "
            "the jobs itself"
        )
    if config.executor == "none":
        raise ConfigError("executor none would leave a worker with nothing to do")
    if config.cpu_workers is None and config.executor == "local":
        # no web process to leave a core for: every usable core runs CPU tasks (at nice
        # 10, as in serve, so that the event loop and its heartbeats still get their turn)
        config = dataclasses.replace(config, cpu_workers=usable_cpus())
    announce = announce or console("worker")
    run(_work(config, tasks, announce))


async def _work(
    config: ServiceConfig, tasks: dict[str, Callable[..., Any]], announce: Callable[[str], None]
) -> None:
    service = Service(config, tasks, accepts=False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()  # a signal meanwhile is kept: the worker stops at once after
        where = getattr(service.store, "where", config.store)
        slots = service.stats()["workers"]
        announce(
            f"escala worker {service.owner}: {len(service.tasks)} tasks, "
            f"{slots['cpu']} CPU tasks and {slots['io']} I/O tasks at once, jobs from {where}"
        )
        await stop.wait()
        announce(f"stopping: running jobs get {config.grace:g} s, the rest go back to the queue")
    finally:
        await service.stop()
        for sig in signals:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
