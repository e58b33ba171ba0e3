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

import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

from ._core.adaptive import ConcurrencyLimit, for_coroutines
from ._core.drive import Chunk
from ._core.plan import fitted, make_backend, plan_for, total_of
from ._core.progress import progress_for
from ._core.run import Run, start_run
from ._core.scheduler import Scheduler
from ._errors import TaskTimeout
from ._options import ENGINES, Options
from ._worker.cpu import usable_cpus
from ._worker.messages import Batch, Done, Failure, Sink
from .advisor import Advice, Measurements, _verify, measure, recorded, weigh
from .advisor._decide import alternatives
from .advisor._probe import Group, Probe, Sample
from .advisor._rules import (
    ASSUMED_ITEMS,
    BATCH_TARGET,
    GUESSED_PROCESS_START,
    MAX_BATCH,
    THREADS_CAP,
    Reason,
)
from .backends.base import Backend

__all__ = ["run_auto"]

#: Processes are started beside a threads leg only when the work left (at sequential's
#: pace) is at least this many times their start-up.
RUNNER_UP_PAYS = 4


def run_auto(
    fn: Callable[..., Any],
    items: Iterable[Any],
    opts: Options,
    *,
    ordered: bool,
    keep_all: bool = False,
    on_advice: Callable[[Advice], None] | None = None,
) -> Iterator[Chunk]:
    """Measure, choose and run; yield result chunks as :meth:`escala._core.run.Run.chunks` does.

    ``on_advice`` hears the advice when the run starts, and again at its end with what the
    run verified (:attr:`Advice.legs`) when it did.
    """
    iterator = iter(items)
    total = total_of(items)
    backends = _Backends(fn, opts, total)
    try:
        advice, sample, probe = measure(
            fn,
            iterator,
            total,
            workers=opts.workers,
            initializer=opts.initializer,
            initargs=opts.initargs,
            prepare=backends.prepare,
        )
    except BaseException:
        backends.close(clean=False)
        raise
    clean = False
    timers: list[threading.Timer] = []
    abandoned: list[Group] = []  # sampled tasks reported as timed out: never waited for
    cluster: Backend | None = None  # started while weighing the cluster; the run's if chosen
    legs: _Legs | None = None
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
        done_queue: queue.SimpleQueue[Done] = queue.SimpleQueue()
        if sample is not None and _verifiable(advice, opts):
            legs = _Legs(
                fn, items, opts, advice, sample, backends, ordered=ordered, keep_all=keep_all
            )
            first = legs.first()
            _absorb_or_close(first, sample, probe, done_queue.put, opts, timers, abandoned)
            yield from legs.chunks(iterator, first, done_queue)
            clean = True
            return
        chosen, limit = _sized(advice, opts, total, sample)
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
        _absorb_or_close(run, sample, probe, done_queue.put, opts, timers, abandoned)
        yield from run.chunks(iterator, done_queue=done_queue)
        clean = True
    finally:
        backends.close(clean)
        if legs is not None:
            legs.close()
            advice = legs.advice()
            if on_advice is not None and clean:
                on_advice(advice)
        recorded(advice)
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


def _verifiable(advice: Advice, opts: Options) -> bool:
    """Whether the run checks the advice as it goes: a local parallel mode, measured."""
    return (
        advice.measured is not None
        and advice.mode in ("threads", "processes")
        and advice.reason in (Reason.WAITS, Reason.RELEASES_GIL, Reason.HOLDS_GIL)
        and opts.address is None
    )


def _sized(
    advice: Advice, opts: Options, total: int | None, sample: Sample | None
) -> tuple[Options, ConcurrencyLimit | None]:
    """The options for a run in the advised mode, and its adaptive limit if it has one."""
    limit = None
    workers = advice.workers
    if advice.adaptive and advice.mode == "async":
        limit = for_coroutines(total)
        workers = limit.high  # the backend's own bound; the limit decides how many
    elif advice.adaptive:
        # Sampled tasks still finishing on the probe thread sit in the window without
        # using one of the backend's threads: make room for them on top.
        running = len(sample.groups) - sum(g.done for g in sample.groups) if sample else 0
        high = min(THREADS_CAP, total) if total else THREADS_CAP
        limit = ConcurrencyLimit(advice.workers + running, high=max(1, high + running))
        workers = high  # threads start on demand; the limit decides how many
    address = opts.address if advice.mode in ENGINES else None  # a local mode takes none
    chosen = replace(opts, mode=advice.mode, workers=workers, address=address)  # type: ignore[arg-type]
    return chosen, limit


def _absorb_or_close(
    run: Run,
    sample: Sample | None,
    probe: Probe | None,
    sink: Sink,
    opts: Options,
    timers: list[threading.Timer],
    abandoned: list[Group],
) -> None:
    if sample is None or probe is None:
        return
    try:
        _absorb(run.scheduler, sample, probe, sink, opts.timeout, timers, abandoned)
    except BaseException:
        if run.started and not run.shared:
            run.close()
        raise


class _Gate:
    """The input of one leg: passes items on, and ends the leg once it is judged and the
    rest goes elsewhere (the driver sees the input end; what it pulled still runs)."""

    def __init__(self, items: Iterator[Any], check: Callable[[], bool | None] | None) -> None:
        self._items = items
        self._check = check
        self.ended = False

    def __iter__(self) -> _Gate:
        return self

    def __next__(self) -> Any:
        if self._check is not None:
            move = self._check()  # None: not judged yet
            if move is not None:
                self._check = None
                if move:
                    self.ended = True
                    raise StopIteration
        return next(self._items)


#: The modes a run may move between on this machine.
_LOCAL = ("sequential", "threads", "processes")


class _Backends:
    """The backends of one auto run, by mode: each started once, kept to the end.

    ``prepare`` starts one on a thread of its own while the decision is still being
    watched (the first task still running), so that the run finds it ready.
    """

    def __init__(self, fn: Callable[..., Any], opts: Options, total: int | None) -> None:
        self._fn = fn
        self._opts = opts
        self._total = total
        self._backends: dict[str, Backend] = {}
        self._starting: dict[str, tuple[threading.Thread, list[BaseException]]] = {}

    def __contains__(self, mode: str) -> bool:
        return mode in self._backends

    def prepare(self, mode: str, workers: int) -> Callable[[], bool]:
        """Start ``mode`` with ``workers`` in the background, unless it is there already;
        return a check that says whether it has started."""
        if mode in self._backends:
            return lambda: mode not in self._starting or not self._starting[mode][0].is_alive()
        chosen = replace(self._opts, mode=mode, workers=workers, address=None)  # type: ignore[arg-type]
        backend = self._make(mode, chosen, self._total)
        failed: list[BaseException] = []
        started = threading.Event()

        def start() -> None:
            try:
                backend.start()
            except BaseException as exc:  # handed to whoever needs the backend
                failed.append(exc)
            finally:
                started.set()

        thread = threading.Thread(target=start, name=f"escala-auto-start-{mode}", daemon=True)
        self._starting[mode] = (thread, failed)
        thread.start()
        # a pool's workers report when they are up: until then, the watching is free
        return lambda: started.is_set() and getattr(backend, "ready", True)

    def ready(self, mode: str, chosen: Options, left: int | None) -> Backend:
        """The started backend for ``mode``: the one prepared or used before, or a new one."""
        if mode not in self._backends:
            self._make(mode, chosen, left).start()
        self._wait(mode)
        return self._backends[mode]

    def close(self, clean: bool) -> None:
        """Stop every backend, once any still starting has started."""
        for mode in list(self._starting):
            try:
                self._wait(mode)
            except BaseException:
                pass  # it never started: stopping it is all that is left to do
        for backend in self._backends.values():
            backend.shutdown(cancel=not clean)

    def _make(self, mode: str, chosen: Options, left: int | None) -> Backend:
        backend = make_backend(fitted(plan_for(self._fn, chosen), left), chosen)
        self._backends[mode] = backend  # stopped by close(), started or not
        return backend

    def _wait(self, mode: str) -> None:
        thread, failed = self._starting.pop(mode, (None, []))
        if thread is not None:
            thread.join()
        if failed:
            raise failed[0]


class _Legs:
    """One auto run as legs: each a mode on a part of the input, measured and judged.

    Every mode keeps the backend it started until the run ends (a move back costs no
    start-up); each leg's scheduler numbers items from where the last one stopped, so
    results, errors and outcomes name positions in the whole input, and no item is
    pulled by two legs. A leg ends only once all it pulled is done, so results keep
    their order across a move.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        opts: Options,
        advice: Advice,
        sample: Sample,
        backends: _Backends,
        *,
        ordered: bool,
        keep_all: bool,
    ) -> None:
        self._fn = fn
        self._items = items
        self._total = total_of(items)
        self._opts = opts
        self._advice = advice
        self._sample = sample
        self._ordered = ordered
        self._keep_all = keep_all
        self._backends = backends
        self._progress = progress_for(opts.progress, f"auto → {advice.mode}", self._total)
        self.legs = [_verify.Leg(advice.mode, advice.workers, advice.speedup)]
        # a sampled task was still running at the decision: its figures were partial, and
        # the decision is taken again when it ends
        decided = advice.measured.wall if advice.measured is not None else 0.0
        self._partial = sample.has_running or sample.per_task()[0] > 1.1 * decided

    def first(self) -> Run:
        """The first leg's run, in the advised mode (the sampled items go to it)."""
        return self._run(self._advice, offset=0)

    def _prepare_runner_up(self, sched: Scheduler) -> None:
        """Start processes in the background for a threads leg chosen for computing that
        looked GIL-free, and falling short halfway through its measuring: should the look
        have deceived (native code that takes the GIL back between short steps),
        processes are the way out, and a move to them then costs no start-up stall. Only
        where the work left would outlast their start-up a few times over."""
        advice, m = self._advice, self._advice.measured
        if advice.mode != "threads" or advice.reason is not Reason.RELEASES_GIL or m is None:
            return
        if not m.picklable or m.cores < 2 or self._opts.workers is not None:
            return
        left = self._left(sched)
        start = m.overhead.get("processes-start", GUESSED_PROCESS_START)
        if left is not None and left * m.wall < RUNNER_UP_PAYS * start:
            return
        self._backends.prepare("processes", min(m.cores, left) if left is not None else m.cores)

    def chunks(
        self, iterator: Iterator[Any], run: Run, done_queue: queue.SimpleQueue[Done]
    ) -> Iterator[Chunk]:
        """Drive leg after leg until the input is done."""
        queue_for: queue.SimpleQueue[Done] | None = done_queue
        while True:
            gate = _Gate(iterator, self._check(run))
            yield from run.chunks(gate, done_queue=queue_for, progress=self._progress)
            if not gate.ended:
                return
            queue_for = None  # the sampled tasks all went to the first leg
            leg = self.legs[-1]
            leg.first = run.scheduler.pulled
            run = self._run(self._advice_for(leg), offset=leg.first)

    def advice(self) -> Advice:
        """The advice the run started with, and the legs it ran."""
        return replace(self._advice, legs=tuple(replace(leg) for leg in self.legs))

    def close(self) -> None:
        """Close the progress bar the legs shared."""
        self._progress.close()

    def _check(self, run: Run) -> Callable[[], bool | None] | None:
        """The gate's check for ``run``'s leg: ``None`` until it is measured and judged,
        then whether the rest moves to another leg (appended to :attr:`legs`)."""
        leg = self.legs[-1]
        if leg.mode == "sequential" or len(self.legs) >= len(_LOCAL):
            return None  # sequential is the yardstick, and after every mode ran, no more
        wall = self._sample.per_task()[0]
        batch = run.scheduler.sizer.size
        round_time = wall * batch if batch > 1 or leg.mode != "processes" else BATCH_TARGET
        meter = _verify.Meter(wall, max(wall, round_time))
        sched = run.scheduler
        seen = -1
        # Until the leg is judged, fewer batches wait in flight: a move waits for what
        # the leg has pulled, and the fewer, the sooner the next leg starts.
        lookahead, sched.lookahead = sched.lookahead, min(sched.lookahead, 2)
        # A sampled task still computing on a probe thread holds a core. Were the leg's
        # workers to fill every core beside it, two tasks would share one and the run's
        # end wait for the slower: while it runs, one batch per worker, the sampled ones
        # among them (they count as outstanding), if that leaves the leg some.
        held = sum(not group.done for group in self._sample.groups)
        computing = self._advice.reason in (Reason.HOLDS_GIL, Reason.RELEASES_GIL)
        if computing and held and leg.workers > held and leg.workers + held > usable_cpus():
            sched.lookahead = 1

        def check() -> bool | None:
            nonlocal seen
            if sched.ran == seen:
                return None
            seen = sched.ran
            if self._sample.has_running:
                meter.restart()  # a sampled task still runs beside the leg
                return None
            if sched.lookahead < min(lookahead, 2):
                sched.lookahead = min(lookahead, 2)  # the sampled tasks ended
            if self._partial:
                self._partial = False
                go, promise = self._judge(sched, max(wall, round_time), again=leg.mode)
                if go != leg.mode:
                    self.legs.append(_verify.Leg(go, *promise))
                    return True
                # Sequential's pace was taken from a task still running, a lower bound:
                # measured against it, the leg would look slower than it is.
                done_wall = self._sample.per_task()[0]
                meter.per_task = max(meter.per_task, done_wall)
            now = time.perf_counter()
            measured = meter.observe(seen, now)
            if measured is None:
                hint = meter.glimpse(seen, now)
                if len(self.legs) == 1 and hint is not None and hint < _verify.MET * leg.predicted:
                    self._prepare_runner_up(sched)
                return None
            leg.measured, leg.tasks, leg.seconds = measured
            go, promise = self._judge(sched, max(wall, round_time))
            if go == leg.mode:
                sched.lookahead = lookahead  # verified: as many in flight as usual
                return False
            earlier = next((old for old in self.legs if old.mode == go), None)
            if earlier is not None:
                promise = (earlier.workers, earlier.measured or promise[1])
            self.legs.append(_verify.Leg(go, *promise))
            return True

        return check

    def _fresh(self) -> Measurements:
        """The advice's measurements with the sampled tasks that finished since."""
        m = self._advice.measured
        assert m is not None  # _verifiable
        wall, cpu, queued = self._sample.per_task()
        return replace(m, wall=wall, cpu=cpu, queued=queued, lower_bound=False)

    def _left(self, sched: Scheduler) -> int | None:
        return None if self._total is None else max(0, self._total - sched.pulled)

    def _judge(
        self, sched: Scheduler, round_time: float, again: str | None = None
    ) -> tuple[str, tuple[int, float]]:
        """Where the rest goes: judged on the last leg's measurement, or decided ``again``
        for that mode on figures completed since (:func:`_verify.redecide`)."""
        m = self._fresh()
        left = self._left(sched)
        promises = alternatives(m, left, self._opts.workers)
        starts = {
            "processes": 0.0
            if "processes" in self._backends
            else m.overhead.get("processes-start", GUESSED_PROCESS_START)
        }
        work_left = (left if left is not None else ASSUMED_ITEMS) * m.wall
        if again is not None:
            go = _verify.redecide(again, promises, work_left, starts, round_time)
        else:
            go = _verify.judge(self.legs, promises, work_left, starts, round_time)
        return go, promises.get(go, (1, 1.0))

    def _advice_for(self, leg: _verify.Leg) -> Advice:
        """Advice for a leg that the verification chose, from the freshest figures."""
        m = self._fresh()
        waits = m.cpu_share < 0.5 and self._opts.workers is None and leg.mode == "threads"
        batch = max(1, min(MAX_BATCH, math.floor(BATCH_TARGET / max(m.wall, 1e-9))))
        return Advice(
            leg.mode,
            leg.workers,
            batch if leg.mode == "processes" else 1,
            leg.predicted,
            self._advice.reason,
            m,
            adaptive=waits,
        )

    def _run(self, advice: Advice, *, offset: int) -> Run:
        left = None if self._total is None else self._total - offset
        chosen, limit = _sized(advice, self._opts, left, self._sample if offset == 0 else None)
        backend = self._backends.ready(advice.mode, chosen, left)
        return start_run(
            self._fn,
            self._items if offset == 0 else (range(left) if left is not None else iter(())),
            chosen,
            ordered=self._ordered,
            keep_all=self._keep_all,
            backend=backend,
            shared=True,
            start=advice.batch if isinstance(advice.batch, int) else 1,
            limit=limit,
            label=f"auto → {advice.mode}",
            offset=offset,
        )


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
