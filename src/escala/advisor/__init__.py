"""The advisor: measure a workload on this machine, choose how to run it, say why.

    measure(fn, items) ──▶ Probe (sample the first items, GIL test)  ─┐
                        ──▶ overheads (cost of a hand-off, cached)    ─┼─▶ decide ─▶ Advice
                        ──▶ size and picklability of fn and items     ─┘        .explain()
    with address=: weigh(advice, address) ──▶ the cluster's size and cost per task,
                        measured with empty tasks (cached) ──▶ decide_cluster ─▶ Advice

``mode="auto"`` calls :func:`measure` (and :func:`weigh`) and runs the rest of the input as
advised, keeping the sampled results; :func:`advise` only measures and returns the advice.
"""

from __future__ import annotations

import contextlib
import contextvars
import pickle
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import replace
from typing import Any

import cloudpickle

from .._core.plan import is_async
from .._options import Options
from .._task import kind_of
from .._worker.cpu import usable_cpus
from ._advice import Advice, Cluster, Leg, Measurements, Reason
from ._cluster import weigh
from ._decide import decide, decide_for_coroutine, decide_from_hint
from ._overhead import CAUTIOUS, HOPEFUL, known, overheads
from ._probe import Probe, Sample, budget
from ._rules import TINY_JOB, WATCH_LIMIT, WATCH_STEP

__all__ = [
    "Advice",
    "Cluster",
    "Leg",
    "Measurements",
    "Reason",
    "advise",
    "measure",
    "recorded",
    "recording",
    "weigh",
]


_NONE: Any = object()
_recorders: contextvars.ContextVar[tuple[list[Advice], ...]] = contextvars.ContextVar(
    "escala_recorders", default=()
)


@contextlib.contextmanager
def recording() -> Iterator[list[Advice]]:
    """Keep what every ``mode="auto"`` run in this block decided and verified.

    Each run adds its :class:`Advice` when it ends (or fails), with :attr:`Advice.legs`
    saying what it measured while running and where it moved::

        with escala.advisor.recording() as runs:
            escala.map(fn, items)
        print(runs[-1].explain())

    Blocks nest; each sees the runs inside it. Runs on other threads are not seen unless
    the thread was started with this context.
    """
    runs: list[Advice] = []
    token = _recorders.set((*_recorders.get(), runs))
    try:
        yield runs
    finally:
        _recorders.reset(token)


def recorded(advice: Advice) -> None:
    """Give ``advice`` (a finished run's) to every :func:`recording` block around it."""
    for runs in _recorders.get():
        runs.append(advice)


def _pickled_size(obj: Any) -> int | None:
    return _pickled(obj)[0]


#: Objects whose pickle is smaller than this are not timed (see _pickled).
_TIMED_PICKLE = 64 * 1024


def _pickled(obj: Any) -> tuple[int | None, float]:
    """The pickled size of ``obj`` (``None``: it cannot be pickled), and the seconds it
    takes to pickle and unpickle it, as a worker process would need."""
    start = time.perf_counter()
    try:
        data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    except Exception:
        try:
            data = cloudpickle.dumps(obj)
        except Exception:
            return None, 0.0
    if len(data) < _TIMED_PICKLE:
        # a single pickling of a small object takes microseconds that are mostly the
        # clock and the call's own warm-up: the size says more (see Measurements.moving)
        return len(data), 0.0
    try:
        pickle.loads(data)
    except Exception:
        pass  # its own business, which a worker would report; the size is what counts here
    return len(data), time.perf_counter() - start


def _gil_threshold() -> float:
    # A thread that holds the GIL keeps others waiting up to the switch interval (5 ms
    # by default); one that releases it keeps them waiting microseconds.
    return sys.getswitchinterval() / 4


def measure(
    fn: Callable[..., Any],
    items: Iterator[Any],
    total: int | None,
    *,
    workers: int | None = None,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
    prepare: Callable[[str, int], Callable[[], bool]] | None = None,
) -> tuple[Advice, Sample | None, Probe | None]:
    """Measure ``fn`` on the first items of ``items`` and decide how to run the rest.

    Args:
        fn: the task.
        items: the input, as an iterator: the sampled items are taken from it.
        total: how many items in all, if known.
        workers: the caller's own choice of concurrency, which the advice keeps.
        prepare: called with a mode and a number of workers when the decision leans to
            that mode before it is final (the run starts them in the background); it
            returns a check that says when they are ready.
        initializer: the run's worker initializer (the sampling thread runs it too).
        initargs: its arguments.

    Returns:
        The advice; the sample (its results belong to the run); the probe, whose thread
        may still be finishing one task (see :meth:`Probe.hand_over`). Sample and probe
        are ``None`` when nothing ran (a coroutine function, or a ``kind`` hint).
    """
    cores = usable_cpus()
    if is_async(fn):
        advice = decide_for_coroutine(workers, total)
        return _with_workers(advice, workers), None, None
    hint = kind_of(fn)
    if hint is not None:
        advice = decide_from_hint(hint, cores, _pickled_size(fn) is not None)
        return _with_workers(advice, workers), None, None
    probe = Probe(fn, 1, initializer, initargs)
    sample = probe.sample(items, total=total)
    wall, cpu, queued = sample.per_task()
    free_threaded = not getattr(sys, "_is_gil_enabled", lambda: True)()
    gil_wait = sample.gil_wait()
    gil_held = None if gil_wait is None else gil_wait > _gil_threshold()
    done = [g for g in sample.groups if g.done]
    first = sample.groups[0].items[0] if sample.groups else None
    arg_bytes, arg_time = _pickled(first) if sample.groups else (0, 0.0)
    first_ok = next((v for g in done for i, v in enumerate(g.values) if i not in g.failures), _NONE)
    result_bytes, result_time = _pickled(first_ok) if first_ok is not _NONE else (0, 0.0)
    picklable = arg_bytes is not None and _pickled_size(fn) is not None
    ran = sample.count
    if total is not None:
        remaining: int | None = max(0, total - ran)
    else:
        remaining = 0 if sample.exhausted else None
    compute_bound = wall > 0 and cpu / max(cpu, wall - queued) >= 0.5
    processes_possible = compute_bound and gil_held is not False and not free_threaded
    tiny = remaining is not None and wall * remaining < TINY_JOB
    measured = Measurements(
        samples=ran,
        lower_bound=sample.lower_bound,
        wall=wall,
        cpu=cpu,
        queued=queued,
        gil_held=gil_held,
        gil_wait=gil_wait or 0.0,
        free_threaded=free_threaded,
        arg_bytes=arg_bytes,
        result_bytes=result_bytes,
        picklable=picklable,
        total=total,
        cores=cores,
        send_time=arg_time + result_time,
        child_cpu=sample.children_per_task(),
    )
    processes = processes_possible and picklable and cores > 1
    if not tiny and remaining != 0:  # else nothing can pay for a hand-off: none is measured
        measured = _with_overheads(measured, sample, remaining, processes)
    advice = decide(measured, remaining)
    if (
        measured.lower_bound
        and advice.reason is Reason.TOO_SMALL
        and "processes-start" in measured.overhead
    ):
        advice, measured = _watch_the_first(probe, sample, measured, remaining, advice)
    if measured.lower_bound and advice.mode == "processes":
        ready = None if prepare is None else prepare("processes", workers or advice.workers)
        advice = _watch_while_starting(probe, sample, measured, remaining, advice, ready)
    if advice.measured is not None and advice.measured.overhead_guessed:
        # the figures went on changing while the first task was watched: the guesses
        # may have come to matter
        rechecked = _with_overheads(advice.measured, sample, remaining, processes)
        if not rechecked.overhead_guessed:
            advice = decide(rechecked, remaining)
    return _with_workers(advice, workers), sample, probe


def _with_overheads(
    measured: Measurements, sample: Sample, remaining: int | None, processes: bool
) -> Measurements:
    """The measurements with what a hand-off costs: measured, or cautious guesses where
    the measuring would change nothing.

    Measuring costs a process's first call tens of milliseconds. When the decision is the
    same with cautious and with hopeful figures, it does not hinge on them: the cautious
    ones stand (and say so), and nothing is measured.
    """
    kinds = (
        ("threads-task", "processes-start", "processes-task") if processes else ("threads-task",)
    )
    figures = known(measured.cores)
    if all(kind in figures for kind in kinds):
        return replace(measured, overhead=figures, overhead_guessed=False)
    cautious = replace(measured, overhead={k: figures.get(k, CAUTIOUS[k]) for k in kinds})
    hopeful = replace(measured, overhead={k: figures.get(k, HOPEFUL[k]) for k in kinds})
    if decide(cautious, remaining).mode == decide(hopeful, remaining).mode:
        return replace(cautious, overhead_guessed=True)
    figures = overheads(measured.cores, processes=processes, contended=sample.has_running)
    # measuring took a while: a sampled task may have ended meanwhile, and its whole
    # figures decide better than the part seen when the window closed
    return _refreshed(replace(measured, overhead=figures, overhead_guessed=False), sample)


def _watch_while_starting(
    probe: Probe,
    sample: Sample,
    measured: Measurements,
    remaining: int | None,
    advice: Advice,
    ready: Callable[[], bool] | None,
) -> Advice:
    """Watch a first task still running when processes were chosen, while they start.

    Everything it showed so far was computing, but a task may compute first and wait
    after (parse, then fetch): threads would serve that better. Processes take time to
    get ready anyway (the run starts them in the background meanwhile: ``ready`` says
    when they are), so the task is watched until then, at most ``processes-start``, and
    the decision taken again as it runs: should it stop computing, its figures say so.
    """
    until = time.perf_counter() + measured.overhead.get("processes-start", 0.0)
    while time.perf_counter() < until and not (ready is not None and ready()):
        ended = probe.watch_running(WATCH_STEP)
        measured = _refreshed(measured, sample)
        fresh = decide(measured, remaining)
        if fresh.mode != "processes" or ended:
            return fresh
    return advice


def _refreshed(measured: Measurements, sample: Sample) -> Measurements:
    wall, cpu, queued = sample.per_task()
    return replace(measured, wall=wall, cpu=cpu, queued=queued, lower_bound=sample.lower_bound)


def _watch_the_first(
    probe: Probe,
    sample: Sample,
    measured: Measurements,
    remaining: int | None,
    advice: Advice,
) -> tuple[Advice, Measurements]:
    """Watch a first task that outlasted the sampling window until its figures decide.

    What it has run so far is only a lower bound of its length: too short yet to pay for
    starting processes, perhaps, but each moment it goes on computing raises the bound.
    Waiting costs nothing against the sequential outcome, which would run it to its end
    before anything else; so the decision is taken again as it runs, until processes pay
    for the rest (then they run beside it), it ends (a real measurement), or it has been
    watched for ``WATCH_LIMIT`` times what starting processes costs (a bound on what the
    waiting can cost, should it end just short of paying).
    """
    start_cost = measured.overhead.get("processes-start", 0.0)
    until = time.perf_counter() + max(WATCH_LIMIT * start_cost, budget())
    while advice.mode == "sequential" and time.perf_counter() < until:
        ended = probe.watch_running(WATCH_STEP)
        measured = _refreshed(measured, sample)
        advice = decide(measured, remaining)
        if ended:
            break
    return advice, measured


def _with_workers(advice: Advice, workers: int | None) -> Advice:
    if workers is None or advice.mode == "sequential":
        return advice
    return replace(advice, workers=workers, adaptive=False)


def advise(fn: Callable[..., Any], items: Iterable[Any], *, address: str | None = None) -> Advice:
    """Measure ``fn`` on a few items and say how escala would run the whole input.

    The first items really run (in this process, on a thread) to be measured; their
    results are dropped. ``escala.map(fn, items, mode="auto")`` does the same measuring
    but keeps those results, so no task runs twice.

    Args:
        fn: the task.
        items: the input (a list, a range, any iterable).
        address: a Dask or Ray cluster to weigh as well (see :func:`escala.map`): escala
            connects to it, times empty tasks there, and says whether these tasks are long
            enough to pay for what a task costs on it.

    Returns:
        An :class:`Advice`; ``print(advice.explain())`` says why, with the figures.

    Raises:
        ValueError: ``address`` names neither a Dask nor a Ray cluster.
        EscalaError: the cluster could not be reached.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    if address is not None:
        Options(mode="auto", address=address)  # the address's form, checked at the door
    total = len(items) if isinstance(items, Sized) else None
    advice, _, probe = measure(fn, iter(items), total)
    try:
        if address is not None:
            advice, backend = weigh(advice, address)
            if backend is not None:
                backend.shutdown(cancel=False)
    finally:
        if probe is not None:
            probe.hand_over(lambda group: None)
            probe.join()
    return advice
