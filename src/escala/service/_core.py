"""The service without HTTP: admission, fair queues, dispatch to escala pools, durability.

How a job moves (one event loop; the store's I/O on its own threads)::

    submit ─> admission ─> store.submit ─> FairQueue[pool] ──dispatcher──> store.claim
              (429/503)    (durable: 202)  (per user, DRR)    (batches)        │
                                                                               v
        finish <── result <── Pool("processes") for CPU tasks, Pool("threads") or the
          │                   event loop for I/O tasks: escala's own engine, never a second one
          v
    store.finish ─> watchers (wait, events) and metrics

A job is claimed with a lease that a heartbeat renews; a job whose server died is found
RUNNING with no living owner at the next start and queued again (at-least-once).

With a store that many nodes share (PostgreSQL), the queue is the store's, not a
FairQueue's: the dispatcher claims the fairest jobs from it (``SharedQueue``), and only
``/v1/run`` requests, which are never stored, wait in this node's FairQueue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..store import Job, JobState, NewJob, Store, is_shared, open_store
from ._admission import QueueDeadline, TokenBuckets
from ._auth import Authenticator
from ._config import ServiceConfig
from ._events import Watchers
from ._executor import Executor
from ._fair import FairQueue
from ._metrics import LoopLagProbe, Metrics
from ._registry import TaskSpec, specs_of
from ._shared import POLL, SharedQueue
from ._types import (
    JobProgress,
    Lifecycle,
    Refused,
    RunResult,
    TooManyAttempts,
    UnknownTask,
    cancelled_error,
    error_of,
    stop_loops,
)

__all__ = ["Service"]

log = logging.getLogger("escala.service")
POOLS = ("cpu", "io")


@dataclass(eq=False, slots=True)
class _Ticket:
    """A job waiting in a fair queue. Durable jobs carry only their id; the store has
    the arguments. A request/response run (``/v1/run``) carries everything in memory."""

    job_id: str
    user: str
    spec: TaskSpec
    queued_at: float  # monotonic
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    reply: asyncio.Future[RunResult] | None = None  # set only for runs that are not stored


class Service:
    """The user's tasks behind admission control, fair queues and a durable store.

    Args:
        config: the settings.
        tasks: the tasks to offer, by public name.
        store: where jobs live; default: the one ``config.store`` or ``config.db`` names.
        accepts: whether clients submit jobs here; ``False`` for ``escala worker``, which
            only runs what others accepted (and so never counts the shared backlog).
    """

    def __init__(
        self,
        config: ServiceConfig,
        tasks: Mapping[str, Callable[..., Any]],
        store: Store | None = None,
        *,
        accepts: bool = True,
    ) -> None:
        if store is None:
            store = open_store(config.where)
        self.config = config
        self.store = store
        self.tasks = specs_of(tasks)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.metrics = Metrics()
        self.auth = Authenticator(store)
        self.state = Lifecycle.NEW
        self._queues: dict[str, FairQueue[_Ticket]] = {
            pool: FairQueue(weight_of=self._weight) for pool in POOLS
        }
        # one job per CPU worker: a job waits in the fair queue, where a deadline or a
        # cancel can still drop it, and is RUNNING only once a worker can run it
        self.executor = Executor(config, self._progress)
        self._slots, self._busy = self.executor.slots, self.executor.busy
        self._stopping = asyncio.Event()
        self._deadlines = {pool: QueueDeadline(target=config.max_queue_wait) for pool in POOLS}
        self._buckets = TokenBuckets()
        self._wakes = {pool: asyncio.Event() for pool in POOLS}
        self._running: dict[str, asyncio.Future[Any]] = {}
        self._cancelled: set[str] = set()
        self._jobs: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self.watchers = Watchers(
            self.get,
            config.max_streams,
            poll=POLL if is_shared(store) else None,
            per_user=config.max_streams_per_user,
            reads=config.max_reads,
        )
        self._probe = LoopLagProbe(self.metrics)
        self.shared: SharedQueue | None = None
        if is_shared(store):
            self.shared = SharedQueue(
                store,
                self.owner,
                config.lease,
                {pool: [n for n, s in self.tasks.items() if s.pool == pool] for pool in POOLS},
                self._deadlines,
                wake=lambda pool: self._wakes[pool].set(),
                on_done=self._heard_done,
                on_cancel=self._heard_cancel,
                count=accepts,
            )

    # -- life -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the pools, open the store, queue again what a dead server left, serve."""
        if self.state is not Lifecycle.NEW:
            return
        try:
            self.executor.start()
            await self.store.open()
            recovered = await self.store.recover(self.owner, all_others=self.store.exclusive)
            await self.auth.load()
            if self.shared is None:
                await self._requeue_stored()
            else:
                await self.shared.start()
        except BaseException:
            await asyncio.to_thread(self.executor.stop, True)
            with contextlib.suppress(Exception):
                await self.store.close()
            raise
        if recovered:
            log.warning("jobs running when the last server stopped, queued again: %d", recovered)
        for pool in POOLS:
            self.metrics.workers.labels(pool).set(self._slots[pool])
            self._loops.append(asyncio.create_task(self._dispatch(pool), name=f"escala-{pool}"))
            self._wakes[pool].set()  # jobs loaded from the store wait for it
        self._loops.append(asyncio.create_task(self._heartbeat(), name="escala-heartbeat"))
        self._probe.start()
        self.state = Lifecycle.SERVING

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new work, give running jobs ``grace`` seconds, queue the rest again."""
        if self.state is not Lifecycle.SERVING:
            self.state = Lifecycle.STOPPED
            return
        self.state = Lifecycle.STOPPING
        self._stopping.set()
        grace = self.config.grace if grace is None else grace
        await stop_loops(self._loops)
        if self._jobs:
            await asyncio.wait(self._jobs, timeout=grace)
        for running in self._running.values():
            running.cancel()
        # the stored ones go back to the queue; runs that were not stored are just refused
        unfinished = [job_id for job_id in self._running if not job_id.startswith("run-")]
        # a worker still busy after the grace period, or with a task given up on, is killed
        kill = bool(self._running) or any(self.executor.abandoned.values())
        if self._jobs:
            await asyncio.wait(self._jobs, timeout=5)
        left = sum(len(q) for q in self._queues.values())
        for pool in POOLS:
            while (item := self._queues[pool].pop()) is not None:
                _, ticket = item
                if ticket.reply is not None and not ticket.reply.done():
                    ticket.reply.set_exception(Refused(503, "the server is shutting down", 5))
        await self._probe.stop()
        await asyncio.to_thread(self.executor.stop, kill)
        try:
            released = await self.store.release(self.owner, unfinished) if unfinished else 0
            if released:
                log.warning(
                    "running jobs that did not finish in %g s, queued again: %d", grace, released
                )
                if self.shared is not None:  # for the other nodes to take at once
                    self.shared.requeued()
        finally:
            if self.shared is not None:
                await self.shared.stop()
            await self.store.close()
            self.state = Lifecycle.STOPPED
        log.info(
            "stopped; jobs left unfinished, kept in the store for the next start: %d",
            left + len(unfinished),
        )

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Run the service for the life of an ASGI app (FastAPI's ``lifespan=``)."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def _requeue_stored(self) -> None:
        stored = await self.store.queued()
        limit = self.config.max_attempts
        gone = [job for job in stored if job.task not in self.tasks or job.attempts >= limit]
        stored = [job for job in stored if job not in gone]
        for job in stored:
            if job.attempts:
                log.warning(
                    "job %s (task %s) was interrupted %d time(s) while it ran: it runs again",
                    job.id,
                    job.task,
                    job.attempts,
                )
        now_wall, now = time.time(), time.monotonic()
        for job in stored:
            if job.task in self.tasks:
                waited = max(0.0, now_wall - job.created_at)
                ticket = _Ticket(job.id, job.user, self.tasks[job.task], now - waited)
                self._queues[ticket.spec.pool].push(job.user, ticket, priority=job.priority)
        if gone:
            # jobs of a task this app no longer offers would wait forever: end them, and say why
            for job in await self.store.claim([j.id for j in gone], self.owner, self.config.lease):
                # a job that keeps taking its server down must not do it forever
                unknown = job.task not in self.tasks
                error = error_of(UnknownTask(job.task) if unknown else TooManyAttempts(limit))
                log.warning("job %s (task %s) failed: %s", job.id, job.task, error["message"])
                await self.store.finish(job.id, self.owner, JobState.FAILED, error=error)
        if stored:
            log.info("queued jobs loaded from the store: %d", len(stored))

    def _weight(self, user: str) -> float:
        record = self.auth.record_of(user)
        return record.weight if record is not None else 1.0

    # -- what clients ask -----------------------------------------------------------------

    def _admit(self, user: str, spec: TaskSpec) -> None:
        """Refuse, cheaply and before any work, what cannot be served in time."""
        if self.state is not Lifecycle.SERVING:
            raise Refused(503, "the server is shutting down; retry on another one or later", 5)
        record = self.auth.record_of(user)
        rate = record.rate if record is not None and record.rate is not None else self.config.rate
        burst = (
            record.burst if record is not None and record.burst is not None else self.config.burst
        )
        wait = self._buckets.take(user, rate, burst)
        if wait > 0:
            self.metrics.rejected.labels("rate").inc()
            raise Refused(
                429, f"rate limit of {rate:g} jobs/s reached for {user!r}", max(1, math.ceil(wait))
            )
        depth = self._queues[spec.pool].depth(user)
        total = sum(len(q) for q in self._queues.values())
        if self.shared is not None:  # jobs queued on every node, as last counted
            depth += self.shared.depth(user)
            total += len(self.shared)
        if depth >= self.config.max_queued_per_user:
            self.metrics.rejected.labels("user_queue").inc()
            raise Refused(
                429, f"{user!r} already has {depth} jobs waiting, the most one user may have", 5
            )
        if total >= self.config.max_queued:
            self.metrics.rejected.labels("queue_full").inc()
            raise Refused(503, "the job queue is full", 5)
        deadline = self._deadlines[spec.pool]
        if self.config.admission and deadline.overloaded():
            self.metrics.rejected.labels("queue_wait").inc()
            raise Refused(
                503,
                f"{spec.pool} jobs have waited over {self.config.max_queue_wait:g} s: "
                "the server cannot serve more in time",
                deadline.retry_after(),
            )

    async def submit(self, job: NewJob) -> tuple[Job, bool]:
        """Admit and store a job, then queue it; return it and whether it is new.

        Raises:
            KeyError: no such task. TypeError: the arguments do not fit it.
            Refused: admission control turned it away.
        """
        spec = self.tasks[job.task]
        spec.check_arguments(job.args, job.kwargs)
        # a retry of a job that exists is answered before admission: its client is not
        # asking for more work, and a 429 would tell it its job might not exist
        known = None
        if job.idempotency_key is not None:
            known = await self.store.find(job.user, job.idempotency_key)
        if known is None:
            self._admit(job.user, spec)
            stored, created = await self.store.submit(job)
        else:
            stored, created = known, False
        if not created and (stored.task, stored.args, stored.kwargs, stored.priority) != (
            job.task,
            list(job.args),
            dict(job.kwargs),
            job.priority,
        ):
            # the key is the client's promise that this is the same request, retried
            raise Refused(
                409,
                f"idempotency key {job.idempotency_key!r} was already used for job "
                f"{stored.id} ({stored.task}) with other arguments or priority; use a new key "
                "for new work",
            )
        if created:
            if self.shared is not None:
                self.shared.queued(stored.user, spec.pool)  # the store is the queue
            else:
                ticket = _Ticket(stored.id, stored.user, spec, time.monotonic())
                self._queues[spec.pool].push(stored.user, ticket, priority=stored.priority)
            self.metrics.submitted.labels(spec.pool).inc()
            self._wakes[spec.pool].set()
        return stored, created

    async def run(
        self, user: str, task: str, args: list[Any], kwargs: dict[str, Any], timeout: float
    ) -> RunResult:
        """Run a task now, fairly queued like a job but not stored, and return its outcome.

        A run that the queue ahead of it would keep past ``timeout`` is refused at once
        (503), before any work: its client would only give up on it, and a server that
        accepts such runs spends its overload on answers nobody reads.

        Raises:
            KeyError, TypeError, Refused: as ``submit``.
            TimeoutError: it did not finish within ``timeout``. An async task is stopped;
                a task on a thread or in a process finishes, its result dropped.
        """
        spec = self.tasks[task]
        spec.check_arguments(args, kwargs)
        if not self._slots[spec.pool]:
            raise Refused(
                503, "this server only accepts jobs (--executor none): POST /v1/jobs instead"
            )
        self._admit(user, spec)
        wait = self.executor.expected_wait(spec.pool, len(self._queues[spec.pool]))
        if wait > timeout:
            self.metrics.rejected.labels("deadline").inc()
            if math.isinf(wait):
                raise Refused(
                    503,
                    f"every {spec.pool} worker is still busy with a task whose client gave "
                    "up on it (it cannot be stopped mid-task)",
                    1,
                )
            raise Refused(
                503,
                f"the {spec.pool} workers are busy for about {wait:.1f} s, past this "
                f"request's {timeout:g} s deadline",
                max(1, math.ceil(wait - timeout)),
            )
        reply: asyncio.Future[RunResult] = asyncio.get_running_loop().create_future()
        ticket = _Ticket(
            f"run-{uuid.uuid4().hex}", user, spec, time.monotonic(), args, kwargs, reply
        )
        self._queues[spec.pool].push(user, ticket)
        self.metrics.submitted.labels(spec.pool).inc()
        self._wakes[spec.pool].set()
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(reply)
        finally:
            if not reply.done():
                reply.cancel()
                self._queues[spec.pool].discard(user, lambda t: t is ticket)
                if (running := self._running.get(ticket.job_id)) is not None:
                    self._cancelled.add(ticket.job_id)
                    running.cancel()

    async def get(self, user: str, job_id: str) -> Job | None:
        """Return the user's job; ``None`` for a job that is missing or someone else's."""
        job = await self.store.get(job_id)
        return job if job is not None and job.user == user else None

    async def cancel(self, user: str, job_id: str) -> tuple[Job | None, bool]:
        """Cancel the user's job: dropped from the queue, or stopped if it runs.

        Returns the job as it now is (``None``: missing or someone else's), and whether
        this call cancelled it (``False`` for a job that had already ended).
        """
        before = await self.get(user, job_id)
        if before is None or before.state.final:
            return before, False
        job = await self.store.cancel(job_id, user)
        if job is None or job.state is not JobState.CANCELLED:
            return job, False
        spec = self.tasks.get(job.task)
        if spec is not None:
            self._queues[spec.pool].discard(user, lambda t: t.job_id == job_id)
        self._heard_cancel(job_id)
        if self.shared is not None:
            self.shared.cancelled(job_id)  # it may run on another node
        self.watchers.publish(job)
        return job, True

    def _heard_cancel(self, job_id: str) -> None:
        if (running := self._running.get(job_id)) is not None:
            # async tasks stop at once; a thread or process finishes, its result dropped
            self._cancelled.add(job_id)
            running.cancel()

    def _heard_done(self, job_id: str) -> None:
        if job_id in self.watchers:  # a job that ended elsewhere, with clients here
            task = asyncio.create_task(self._republish(job_id))
            self._jobs.add(task)
            task.add_done_callback(self._jobs.discard)

    async def _republish(self, job_id: str) -> None:
        with contextlib.suppress(Exception):  # watchers also re-read the job by themselves
            if (job := await self.store.get(job_id)) is not None:
                self.watchers.publish(job)

    def watch(self, user: str, job_id: str, timeout: float) -> AsyncIterator[Job | JobProgress]:
        """Yield the user's job now and at every change, until it ends or ``timeout``.

        Between changes of state, yields the ``JobProgress`` its task reports. Yields
        nothing for a job that is missing or someone else's.
        """
        return self.watchers.watch(user, job_id, timeout)

    # -- running jobs ---------------------------------------------------------------------

    async def _dispatch(self, pool: str) -> None:
        """Start queued jobs of one pool while it has room, fairest first."""
        queue, wake, deadline = self._queues[pool], self._wakes[pool], self._deadlines[pool]
        while self.state is Lifecycle.SERVING:
            if self.shared is None:
                await wake.wait()
            else:  # other nodes queue jobs too: look now and then, in case a message was lost
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), POLL)
            wake.clear()
            more = True
            while more and self._busy[pool] < self._slots[pool]:
                picked: list[_Ticket] = []
                now = time.monotonic()
                while self._busy[pool] + len(picked) < self._slots[pool]:
                    item = queue.pop()
                    if item is None:
                        if self.shared is None:
                            deadline.idle()
                        break
                    picked.append(item[1])
                    deadline.observe(now - item[1].queued_at)
                self._busy[pool] += len(picked)
                stored = [t.job_id for t in picked if t.reply is None]
                claimed: dict[str, Job] = {}
                try:
                    if stored:
                        jobs = await self.store.claim(stored, self.owner, self.config.lease)
                        claimed = {one.id: one for one in jobs}
                    more = bool(queue)
                    free = self._slots[pool] - self._busy[pool]
                    if self.shared is not None and free > 0:
                        # the shared queue: the store picks the fairest jobs of every node
                        jobs = await self.shared.claim(pool, free)
                        more = more or len(jobs) == free
                        self._busy[pool] += len(jobs)
                        for one in jobs:
                            claimed[one.id] = one
                            picked.append(self._ticket_of(one))
                except Exception:
                    log.exception("claiming jobs failed; they stay queued in the store")
                    more = False
                for ticket in picked:
                    job = claimed.get(ticket.job_id)
                    if ticket.reply is None and job is None:
                        self._busy[pool] -= 1  # cancelled meanwhile
                        continue
                    task = asyncio.create_task(self._execute(ticket, job))
                    self._jobs.add(task)
                    task.add_done_callback(self._jobs.discard)

    def _ticket_of(self, job: Job) -> _Ticket:
        """A ticket for a job claimed from a shared store, dated from when it was queued."""
        waited = max(0.0, (job.started_at or job.created_at) - job.created_at)
        return _Ticket(job.id, job.user, self.tasks[job.task], time.monotonic() - waited)

    def _progress(self, job_id: str, done: float, note: str) -> None:
        self.watchers.publish(JobProgress(job_id, done, note))

    async def _execute(self, ticket: _Ticket, job: Job | None) -> None:
        pool = ticket.spec.pool
        started = time.monotonic()
        waited = started - ticket.queued_at
        self.metrics.running.labels(pool).inc()
        if job is not None:
            self.watchers.publish(job)
        outcome: RunResult | None = None
        try:
            if job is not None and job.attempts > self.config.max_attempts:
                # claimed again after its node died under it each time: stop there
                raise TooManyAttempts(self.config.max_attempts)
            args, kwargs = (
                (job.args, job.kwargs) if job is not None else (ticket.args, ticket.kwargs)
            )
            running = self.executor.call(ticket.job_id, ticket.spec, args, kwargs)
            self._running[ticket.job_id] = running.result
            try:
                value = await running.result
            except asyncio.CancelledError:
                if ticket.job_id not in self._cancelled:
                    # shutting down: stop() puts a stored job back in the queue
                    if ticket.reply is not None and not ticket.reply.done():
                        ticket.reply.set_exception(Refused(503, "the server is shutting down", 5))
                    return
                outcome = RunResult(JobState.CANCELLED, error=cancelled_error())
                self._running.pop(ticket.job_id, None)  # settled: only its worker is held
                await self.executor.until_free(pool, running, self._stopping)
            else:
                try:
                    # the client gets strict JSON: say so in the job, not in a 500 later
                    json.dumps(value, allow_nan=False)
                    outcome = RunResult(JobState.SUCCEEDED, value)
                except (TypeError, ValueError) as exc:
                    what = "the task's result is not JSON"
                    outcome = RunResult(JobState.FAILED, error=error_of(exc, what))
        except Exception as exc:
            if isinstance(exc, TimeoutError) and ticket.spec.is_async:
                exc = TimeoutError(f"the task ran longer than {self.config.job_timeout:g} s")
            log.warning("job %s (%s) failed", ticket.job_id, ticket.spec.name, exc_info=exc)
            outcome = RunResult(JobState.FAILED, error=error_of(exc))
        finally:
            self._running.pop(ticket.job_id, None)
            self._cancelled.discard(ticket.job_id)
            self._busy[pool] -= 1
            self.metrics.running.labels(pool).dec()
            self._wakes[pool].set()
        ran = time.monotonic() - started
        outcome = replace(outcome, duration=ran)
        self.metrics.job_done(pool, outcome.state.value, waited, ran)
        self.executor.ran(pool, ran)
        if ticket.reply is not None:
            if not ticket.reply.done():
                ticket.reply.set_result(outcome)
        elif job is not None and outcome.state is not JobState.CANCELLED:
            await self._record(job, outcome)

    async def _record(self, job: Job, outcome: RunResult) -> None:
        try:
            kept = await self.store.finish(
                job.id, self.owner, outcome.state, result=outcome.result, error=outcome.error
            )
        except TypeError as exc:
            outcome = RunResult(JobState.FAILED, error=error_of(exc, "the task's result"))
            kept = await self.store.finish(job.id, self.owner, outcome.state, error=outcome.error)
        if kept and self.shared is not None:
            self.shared.finished(job.id)
        if kept and job.id in self.watchers:
            # read back what the store recorded, so watchers see the very same job as GET
            finished = await self.store.get(job.id)
            if finished is not None:
                self.watchers.publish(finished)

    async def _heartbeat(self) -> None:
        """Renew the leases of running jobs, so that nobody takes them while they run."""
        while self.state is Lifecycle.SERVING:
            await asyncio.sleep(self.config.lease / 3)
            try:
                await self.store.heartbeat(self.owner, self.config.lease)
            except Exception:
                log.exception("renewing job leases failed; retrying")

    # -- what operators see ---------------------------------------------------------------

    def refresh_gauges(self) -> None:
        """Bring the queue and in-flight gauges up to date (before a scrape)."""
        for pool in POOLS:
            self.metrics.queued.labels(pool).set(len(self._queues[pool]))
        if self.shared is not None:  # by user, not by pool: counted once, as cpu
            self.metrics.queued.labels("cpu").inc(len(self.shared))

    def stats(self) -> dict[str, Any]:
        """Return the live figures the dashboard shows."""
        by_user = self.shared.depths() if self.shared is not None else {}
        for queue in self._queues.values():
            for user, depth in queue.depths().items():
                by_user[user] = by_user.get(user, 0) + depth
        return {
            "time": time.time(),
            "state": self.state.value,
            **self.metrics.figures(),
            "queue": {"total": sum(by_user.values()), "users": len(by_user), "by_user": by_user},
            "running": dict(self._busy),
            "workers": dict(self._slots),
            "streams": self.watchers.count,
        }
