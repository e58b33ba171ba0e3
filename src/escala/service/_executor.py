"""Where the service's jobs run: escala pools on this machine, a Ray cluster, or nowhere.

The service is a client of escala's own engine, like any user: CPU tasks go to one
``Pool("processes")`` (or ``Pool("ray")``), plain I/O functions to a ``Pool("threads")``,
coroutines to the event loop. ``executor="none"`` runs nothing: a server that only
accepts jobs, for ``escala worker`` processes to run.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from .._pool import Pool
from ._config import ServiceConfig
from ._registry import TaskSpec
from ._types import reporter, yield_to_the_loop

__all__ = ["Executor"]


class Executor:
    """The pools that run jobs, and how many jobs of each kind may run at once.

    Args:
        config: the settings (``executor``, ``cpu_workers``, ``io_limit``, timeouts).
        progress: called with ``(job_id, done, note)`` when an async task reports.
    """

    def __init__(self, config: ServiceConfig, progress: Callable[[str, float, str], None]) -> None:
        self.config = config
        self._progress = progress
        self._procs: Pool | None = None
        self._threads: Pool | None = None
        #: jobs that may run at once, by pool ("cpu", "io"); a Ray cluster's CPUs are
        #: known only once ``start`` has joined it
        self.slots = {"cpu": config.cpu_pool_size, "io": config.io_limit}
        if config.executor == "none":
            self.slots = dict.fromkeys(self.slots, 0)

    def start(self) -> None:
        """Start the pools (blocking: a Ray cluster may take seconds to join).

        Raises:
            EscalaError: a Ray cluster that cannot be reached, or Ray not installed.
        """
        cfg = self.config
        if cfg.executor == "none":
            return
        if cfg.executor == "local":
            # the process pool forks first, while this process has the fewest threads
            self._procs = Pool(
                "processes",
                cfg.cpu_pool_size,
                timeout=cfg.job_timeout,
                initializer=yield_to_the_loop,
            )
        else:
            address = None if cfg.executor == "ray" else cfg.executor
            self._procs = Pool("ray", cfg.cpu_workers, timeout=cfg.job_timeout, address=address)
            self.slots["cpu"] = self._procs.workers  # the cluster's CPUs, unless told
        self._threads = Pool("threads", cfg.io_threads, timeout=cfg.job_timeout)

    def stop(self, kill: bool) -> None:
        """Stop the pools: let running tasks finish, or kill them (``kill``)."""
        for pool in (self._procs, self._threads):
            if pool is not None:
                pool.terminate() if kill else pool.close()

    def call(
        self, job_id: str, spec: TaskSpec, args: list[Any], kwargs: dict[str, Any]
    ) -> asyncio.Future[Any]:
        """Start a task; return a future for its result (cancel it to stop an async one)."""
        if spec.is_async:
            # the task runs in a copy of this context: report_progress() finds its job there
            token = reporter.set(functools.partial(self._progress, job_id))
            try:
                coro = asyncio.wait_for(spec.fn(*args, **kwargs), self.config.job_timeout)
                return asyncio.ensure_future(coro)
            finally:
                reporter.reset(token)
        pool = self._procs if spec.pool == "cpu" else self._threads
        assert pool is not None, "no executor runs jobs in this process"
        return asyncio.wrap_future(pool.submit(spec.fn, *args, **kwargs))
