"""Where the service's jobs run: escala pools on this machine, a Ray cluster, or nowhere.

The service is a client of escala's own engine, like any user: CPU tasks go to one
``Pool("processes")`` (or ``Pool("ray")``), plain I/O functions to a ``Pool("threads")``,
coroutines to the event loop. ``executor="none"`` runs nothing: a server that only
accepts jobs, for ``escala worker`` processes to run.

A task on a thread or in a process cannot be stopped once it runs: giving up on it
(a cancel, a ``/v1/run`` past its deadline) only drops its result. ``Running.ended``
says when its worker is really free again, so that the service counts the worker busy
until then: it would otherwise start the next job on a worker that is still busy, and
that job would wait, unseen, behind the abandoned one. The pool's timeout bounds how long.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from .._pool import Pool
from ._config import ServiceConfig
from ._registry import TaskSpec
from ._types import Carried, reporter, yield_to_the_loop

__all__ = ["Executor", "Running"]


@dataclass(frozen=True, slots=True)
class Running:
    """A task the executor started."""

    result: asyncio.Future[Any]  # its outcome; cancel it to give up on the task
    ended: asyncio.Future[Any]  # done once the task holds its worker no more


class Executor:
    """The pools that run jobs, how many jobs of each kind may run at once, and how
    busy they are.

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
        #: slots taken, by pool; the service takes and gives them back
        self.busy = dict.fromkeys(self.slots, 0)
        #: busy slots whose task was given up on but still runs: busy for how long,
        #: nobody can say (up to the job timeout)
        self.abandoned = dict.fromkeys(self.slots, 0)
        # recent run time per pool (EWMA), to tell a request that cannot be served in time
        self._run_time = dict.fromkeys(self.slots, 0.0)

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

    def ran(self, pool: str, seconds: float) -> None:
        """Count a task of ``pool`` that ran (or held its worker) ``seconds``."""
        # an exponential moving average: recent enough to follow a change of load
        if self._run_time[pool] == 0.0:
            self._run_time[pool] = seconds
        else:
            self._run_time[pool] += 0.1 * (seconds - self._run_time[pool])

    def expected_wait(self, pool: str, queued: int) -> float:
        """Estimate how long a job entering ``pool``'s queue, behind ``queued`` others,
        waits for a worker.

        A worker busy with a task given up on counts as gone, since how long it stays
        busy is unknown; with every worker so, the wait is infinite.
        """
        workers = self.slots[pool] - self.abandoned[pool]
        if workers <= 0:
            return math.inf
        ahead = queued + max(0, self.busy[pool] - self.slots[pool] + 1)
        return ahead * self._run_time[pool] / workers

    async def until_free(self, pool: str, running: Running, stopping: asyncio.Event) -> None:
        """Wait until the worker of a task given up on is free, or ``stopping`` is set,
        counting its slot as abandoned meanwhile."""
        if running.ended.done():
            return
        self.abandoned[pool] += 1
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait((running.ended, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            self.abandoned[pool] -= 1

    def call(self, job_id: str, spec: TaskSpec, args: list[Any], kwargs: dict[str, Any]) -> Running:
        """Start a task; cancel its ``result`` to give up on it (an async one stops)."""
        if spec.is_async:
            # the task runs in a copy of this context: report_progress() finds its job there
            token = reporter.set(functools.partial(self._progress, job_id))
            try:
                coro = _contained(spec.fn(*args, **kwargs))
                # inside wait_for, which runs it as a task of its own: the one to contain
                task = asyncio.ensure_future(asyncio.wait_for(coro, self.config.job_timeout))
            finally:
                reporter.reset(token)
            return Running(task, task)
        pool = self._procs if spec.pool == "cpu" else self._threads
        assert pool is not None, "no executor runs jobs in this process"
        loop = asyncio.get_running_loop()
        result: asyncio.Future[Any] = loop.create_future()
        ended: asyncio.Future[Any] = loop.create_future()
        fn = spec.fn
        if spec.pool == "io":
            # I/O slots outnumber the threads, so a thread task may wait in the pool's
            # queue: one given up on meanwhile is skipped when its turn comes
            fn = functools.partial(_unless_given_up, result, spec.fn)
        work = pool.submit(fn, *args, **kwargs)
        # The worker's future is never cancelled: a cancelled one no longer tells when
        # its task ends. And not asyncio.wrap_future: an asyncio future refuses a
        # StopIteration, so the job would stay running for good, holding its worker;
        # _settle carries that one, and any BaseException, inside Carried.
        work.add_done_callback(functools.partial(_from_worker, loop, result, ended))
        return Running(result, ended)


async def _contained(coro: Coroutine[Any, Any, Any]) -> Any:
    """Await an async task, turning what would end the event loop into a failure."""
    try:
        return await coro
    except BaseException as exc:
        # asyncio re-raises KeyboardInterrupt and SystemExit out of the loop: one task's
        # sys.exit() would end the server and every job on it. Other BaseExceptions
        # (GeneratorExit, a CancelledError the task raised with nobody cancelling it)
        # would pass the job's `except Exception` and leave it running for good.
        if isinstance(exc, Exception):
            raise
        if isinstance(exc, asyncio.CancelledError):
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # really cancelled: by a client, the job's timeout or shutdown
        raise Carried(exc) from exc


def _unless_given_up(
    result: asyncio.Future[Any], fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    if result.cancelled():  # read from a thread: at worst a stale answer runs it anyway
        return None
    return fn(*args, **kwargs)


def _from_worker(
    loop: asyncio.AbstractEventLoop,
    result: asyncio.Future[Any],
    ended: asyncio.Future[Any],
    work: concurrent.futures.Future[Any],
) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(_settle, result, ended, work)


def _settle(
    result: asyncio.Future[Any], ended: asyncio.Future[Any], work: concurrent.futures.Future[Any]
) -> None:
    if not ended.done():
        ended.set_result(None)
    if result.done():  # given up on
        return
    if work.cancelled():
        result.cancel()
        return
    exc = work.exception()
    if exc is None:
        result.set_result(work.result())
    elif isinstance(exc, Exception) and not isinstance(exc, StopIteration):
        result.set_exception(exc)
    else:
        result.set_exception(Carried(exc))
