"""``mode="auto"``: measure the first items, choose a mode, run the rest, lose nothing.

    items ──▶ advisor.measure ──▶ Advice ──▶ backend + scheduler for the advised mode
                 │   sampled items, finished ──▶ scheduler (as if a worker had run them)
                 └── sampled items still running ──▶ delivered to the driver's queue
                                                     when the probe thread ends them
    address= ──▶ advisor.weigh: the cluster's figures against the Advice; when the
                 cluster wins, the backend that measured it (connected, started) runs the rest
The rest of the input goes to the advised mode through the usual driver. No item runs
twice because it was measured.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

from ._core.adaptive import ConcurrencyLimit
from ._core.drive import Chunk
from ._core.plan import total_of
from ._core.run import start_run
from ._core.scheduler import Scheduler
from ._errors import TaskTimeout
from ._options import ENGINES, Options
from ._worker.messages import Batch, Done, Failure, Sink
from .advisor import Advice, measure, weigh
from .advisor._probe import Group, Probe, Sample
from .advisor._rules import THREADS_CAP
from .backends.base import Backend

__all__ = ["run_auto"]


def run_auto(
    fn: Callable[..., Any],
    items: Iterable[Any],
    opts: Options,
    *,
    ordered: bool,
    keep_all: bool = False,
    on_advice: Callable[[Advice], None] | None = None,
) -> Iterator[Chunk]:
    """Measure, choose and run; yield result chunks as :meth:`escala._core.run.Run.chunks` does."""
    iterator = iter(items)
    total = total_of(items)
    advice, sample, probe = measure(
        fn,
        iterator,
        total,
        workers=opts.workers,
        initializer=opts.initializer,
        initargs=opts.initargs,
    )
    clean = False
    timers: list[threading.Timer] = []
    abandoned: list[Group] = []  # sampled tasks reported as timed out: never waited for
    cluster: Backend | None = None  # started while weighing the cluster; the run's if chosen
    try:
        if sample is not None and sample.input_error is not None:
            raise sample.input_error
        if opts.address is not None:
            advice, cluster = weigh(
                advice,
                opts.address,
                workers=opts.workers,
                initializer=opts.initializer,
                initargs=opts.initargs,
            )
        if on_advice is not None:
            on_advice(advice)
        limit = None
        workers = advice.workers
        if advice.adaptive:
            # Sampled tasks still finishing on the probe thread sit in the window without
            # using one of the backend's threads: make room for them on top.
            running = len(sample.groups) - sum(g.done for g in sample.groups) if sample else 0
            high = min(THREADS_CAP, total) if total else THREADS_CAP
            limit = ConcurrencyLimit(advice.workers + running, high=max(1, high + running))
            workers = high  # threads start on demand; the limit decides how many
        address = opts.address if advice.mode in ENGINES else None  # a local mode takes none
        chosen = replace(
            opts,
            mode=advice.mode,  # type: ignore[arg-type]
            workers=workers,
            address=address,
        )
        # the cluster won: the backend that measured it (started) runs the rest
        backend, cluster = cluster, None
        run = start_run(
            fn,
            items,
            chosen,
            ordered=ordered,
            keep_all=keep_all,
            backend=backend,
            start=advice.batch if isinstance(advice.batch, int) else 1,
            limit=limit,
            label=f"auto → {advice.mode}",
        )
        done_queue: queue.SimpleQueue[Done] = queue.SimpleQueue()
        if sample is not None and probe is not None:
            try:
                _absorb(
                    run.scheduler, sample, probe, done_queue.put, opts.timeout, timers, abandoned
                )
            except BaseException:
                if run.started:
                    run.close()
                raise
        yield from run.chunks(iterator, done_queue=done_queue)
        clean = True
    finally:
        if cluster is not None:  # weighed and chosen, but the run never got it
            cluster.shutdown(cancel=True)
        for timer in timers:
            timer.cancel()
            timer.join()
        if probe is not None:
            # A sampled task that is still running cannot be stopped (it is on a thread):
            # wait for it after a normal end, leave it to finish after an error or once
            # it was reported as timed out.
            probe.join(None if clean and not abandoned else 0)


def _absorb(
    sched: Scheduler,
    sample: Sample,
    probe: Probe,
    sink: Sink,
    timeout: float | None,
    timers: list[threading.Timer],
    abandoned: list[Group],
) -> None:
    """Hand the sampled items to the scheduler: finished ones as done, the rest in flight."""
    running: dict[int, Batch] = {}
    for group in sample.groups:
        (batch,) = sched.take(group.items, whole=True)
        if group.done:
            sched.complete(_done(batch, group, timeout))
        else:
            running[id(group)] = batch
    if not running:
        return
    once = threading.Lock()
    delivered: set[int] = set()

    def deliver(group: Group, done: Done, overrun: bool = False) -> None:
        with once:
            if id(group) in delivered:
                return  # its timeout was reported already
            delivered.add(id(group))
            if overrun:
                abandoned.append(group)
        sink(done)

    probe.hand_over(lambda group: deliver(group, _done(running[id(group)], group, timeout)))
    if timeout is not None:
        for group in sample.groups:
            if id(group) in running:
                timer = threading.Timer(
                    max(0.0, timeout - group.wall),
                    lambda g=group: deliver(g, _overrun(running[id(g)], timeout), True),
                )
                timer.daemon = True
                timer.name = "escala-probe-timeout"
                timers.append(timer)
                timer.start()


def _done(batch: Batch, group: Group, timeout: float | None) -> Done:
    failures = {pos: Failure(error=exc) for pos, exc in group.failures.items()}
    if timeout is not None and group.wall / len(group.items) > timeout:
        for pos in range(len(group.items)):
            failures.setdefault(pos, Failure(error=_timeout_error(batch, pos, timeout)))
    return Done(batch, group.values, failures or None, busy=group.wall)


def _overrun(batch: Batch, timeout: float) -> Done:
    failures = {
        pos: Failure(error=_timeout_error(batch, pos, timeout)) for pos in range(len(batch.items))
    }
    return Done(batch, [None] * len(batch.items), failures)


def _timeout_error(batch: Batch, pos: int, timeout: float) -> TaskTimeout:
    return TaskTimeout(
        batch.indices[pos],
        timeout,
        stopped=False,
        how="mode='auto' was measuring it on a thread, which cannot be stopped, so it was "
        "left to finish in the background",
    )
