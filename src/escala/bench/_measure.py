"""Run a workload under each mode, measure every run, and compare the runs with sequential.

::

    compare("http-io") ─▶ workload.prepared(scale)            (server up, folder made, …)
        │                    │
        │   for each mode:   run_one ─▶ escala.map(fn, items, mode=…)
        │                      wall   perf_counter
        │                      cpu    getrusage(SELF + CHILDREN): workers are reaped by map
        │                      peak   PeakRss thread: RSS of this process and its children
        │                      ─▶ RunResult (frozen; an exception becomes .error)
        ▼
    Comparison(results) ─▶ figures(result): speed-up, efficiency, CPU use against sequential

Every mode must return the list that sequential returns; a run that does not is marked
wrong, never dropped. Exceptions are caught per run, so one failing mode never stops a demo.
"""

from __future__ import annotations

import enum
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import escala

from .._core.plan import plan_for
from .._options import Mode, Options
from .._worker.cpu import usable_cpus
from ..advisor import recording
from ._sampler import PeakRss
from .workloads import Prepared, Workload, get

if TYPE_CHECKING:
    from ..advisor._advice import Advice

__all__ = ["MODES", "Comparison", "Figures", "RunResult", "Status", "compare", "run_one"]

#: The modes compared by default, in display order.
MODES: tuple[str, ...] = ("sequential", "threads", "processes", "async", "auto")
# Computing or disk work has no natural coroutine: an async def would only block the loop.
_NO_ASYNC = "no async form"


class Status(enum.Enum):
    """How one measured run ended."""

    OK = "ok"  # ran and returned the same list as sequential
    WRONG = "wrong"  # ran, but returned something else: a bug to report
    FAILED = "failed"  # raised; RunResult.error holds the exception
    SKIPPED = "skipped"  # not run; RunResult.skipped says why (no async form)


@dataclass(frozen=True, slots=True)
class RunResult:
    """One workload run once under one mode, with what it cost.

    Attributes:
        workload: the workload's name.
        mode: the mode asked for (``"auto"`` included).
        workers: tasks at once: the planned default when none was given; for auto, what
            the advice chose.
        wall: seconds from the call to ``escala.map`` to its return.
        cpu: CPU seconds of this process and its child processes during the run.
        peak_rss: highest resident memory of this process and its children, in bytes
            (``None``: not measured, psutil is missing).
        correct: the results equal the sequential ones.
        error: ``"Type: message"`` of the exception the run raised, if it did.
        advice: for auto, what :func:`escala.advise` said before the run.
        skipped: why the mode was not run, if it was not.
    """

    workload: str
    mode: str
    workers: int
    wall: float
    cpu: float
    peak_rss: int | None
    correct: bool
    error: str | None = None
    advice: Advice | None = None
    skipped: str | None = None

    @property
    def status(self) -> Status:
        """Whether the run completed with the right results, failed or was skipped."""
        if self.skipped is not None:
            return Status.SKIPPED
        if self.error is not None:
            return Status.FAILED
        return Status.OK if self.correct else Status.WRONG

    @property
    def ran(self) -> bool:
        """The run completed: its timings mean something (even if its results were wrong)."""
        return self.status in (Status.OK, Status.WRONG)


@dataclass(frozen=True, slots=True)
class Figures:
    """One run's figures against the sequential run of the same workload.

    Attributes:
        speedup: sequential wall time over this run's (``None``: no sequential run, or
            this run did not complete).
        efficiency: speed-up per core the mode can keep busy (1 for sequential and async,
            ``min(workers, cores)`` for threads and processes). Above 1 when waits
            overlap: concurrency is not bounded by cores, parallelism is.
        cpu_use: share of the machine's usable cores kept busy on average (0 to 1).
        cores_used: the divisor of ``efficiency``.
    """

    speedup: float | None
    efficiency: float | None
    cpu_use: float | None
    cores_used: int


@dataclass(frozen=True, slots=True)
class Comparison:
    """One workload run under several modes on this machine.

    Attributes:
        workload: the workload's name.
        title: its short human title.
        expected: the mode a correct advisor chooses (``None`` for a user's workload).
        explanation: what the workload shows, in one sentence.
        cores: usable CPU cores during the runs.
        scale: the amount of work, relative to the built-in size.
        results: one per mode, in the order the modes were given.
    """

    workload: str
    title: str
    expected: str | None
    explanation: str
    cores: int
    scale: float
    results: tuple[RunResult, ...]

    def result(self, mode: str) -> RunResult | None:
        """Return the run of ``mode``, if it was one of the modes compared."""
        return next((r for r in self.results if r.mode == mode), None)

    @property
    def baseline(self) -> RunResult | None:
        """The sequential run, when it completed: the reference of every speed-up."""
        run = self.result("sequential")
        return run if run is not None and run.ran else None

    @property
    def advice(self) -> Advice | None:
        """What the advisor said before the auto run, if there was one."""
        run = self.result("auto")
        return run.advice if run is not None else None

    def figures(self, run: RunResult) -> Figures:
        """Return ``run``'s speed-up, efficiency and CPU use against sequential."""
        chosen = run.advice.mode if run.mode == "auto" and run.advice is not None else run.mode
        cores_used = min(run.workers, self.cores) if chosen in ("threads", "processes") else 1
        cores_used = max(1, cores_used)
        if not run.ran or run.wall <= 0:
            return Figures(None, None, None, cores_used)
        cpu_use = run.cpu / run.wall / self.cores
        base = self.baseline
        if base is None:
            return Figures(None, None, cpu_use, cores_used)
        speedup = base.wall / run.wall
        return Figures(speedup, speedup / cores_used, cpu_use, cores_used)

    def fastest(self, modes: Sequence[str] | None = None) -> RunResult | None:
        """Return the quickest run with correct results, among ``modes`` (default: all)."""
        runs = [r for r in self.results if r.status is Status.OK]
        if modes is not None:
            runs = [r for r in runs if r.mode in modes]
        return min(runs, key=lambda r: r.wall, default=None)


# -- running --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Raw:
    """A run before its results are checked; ``values`` is ``None`` unless it completed."""

    mode: str
    workers: int
    wall: float = 0.0
    cpu: float = 0.0
    peak_rss: int | None = None
    values: list[Any] | None = None
    error: str | None = None
    advice: Advice | None = None
    skipped: str | None = None

    def result(self, workload: str, reference: list[Any] | None) -> RunResult:
        correct = self.values is not None and reference is not None and self.values == reference
        return RunResult(
            workload=workload,
            mode=self.mode,
            workers=self.workers,
            wall=self.wall,
            cpu=self.cpu,
            peak_rss=self.peak_rss,
            correct=correct,
            error=self.error,
            advice=self.advice,
            skipped=self.skipped,
        )


def run_one(
    prepared: Prepared,
    mode: str,
    *,
    workers: int | None = None,
    reference: list[Any] | None = None,
    workload: str = "custom",
) -> RunResult:
    """Run ``prepared`` once under ``mode`` and measure it.

    For ``"async"`` the workload's ``afn`` runs (the mode is skipped when it has none); for
    ``"auto"``, :func:`escala.advise` is asked first, untimed, and its advice kept.

    Args:
        prepared: the workload, set up (see :meth:`Workload.prepared`).
        mode: any mode of :func:`escala.map`, or ``"auto"``.
        workers: tasks at once; ``None`` leaves the choice to escala.
        reference: the right results; ``None`` computes ``[fn(x) for x in items]``
            (untimed, one more sequential run) when the run completes.
        workload: the name to record.

    Returns:
        The measurements; an exception from the run is in ``error``, never raised.
    """
    raw = _measure(prepared, mode, workers)
    if raw.values is not None and reference is None:
        reference = _reference(prepared)
    return raw.result(workload, reference)


def _reference(prepared: Prepared) -> list[Any] | None:
    try:
        return [prepared.fn(item) for item in prepared.items]
    except Exception:
        return None  # the measured run completed, so this says the function is not repeatable


def _measure(prepared: Prepared, mode: str, workers: int | None) -> _Raw:
    fn: Callable[[Any], Any] = prepared.fn
    if mode == "async":
        if prepared.afn is None:
            return _Raw(mode, 0, skipped=_NO_ASYNC)
        fn = prepared.afn
    advice: Advice | None = None
    try:
        if mode == "auto":
            # Not timed: the advice is shown beside the run; map(mode="auto") decides again.
            advice = escala.advise(prepared.fn, prepared.items)
            used = workers if workers is not None else advice.workers
        else:
            used = plan_for(fn, Options.build(mode=mode, workers=workers)).workers
    except Exception as exc:
        return _Raw(mode, workers or 0, error=_describe(exc), advice=advice)
    values: list[Any] | None = None
    error: str | None = None
    runs: list[Advice] = []
    with PeakRss() as memory:
        before = _cpu_seconds()
        start = time.perf_counter()
        try:
            with recording() as runs:
                values = escala.map(fn, prepared.items, mode=cast(Mode, mode), workers=workers)
        except Exception as exc:
            error = _describe(exc)
        wall = time.perf_counter() - start
        cpu = _cpu_seconds() - before
    if runs:
        advice = runs[-1]  # the run's own decision, and what it verified while running
    cpu = max(0.0, cpu - memory.cpu)  # not the sampling thread's own work
    return _Raw(mode, used, wall, cpu, memory.peak, values, error, advice)


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that have been waited for."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# -- comparing ------------------------------------------------------------------------


def compare(
    workload: str | Workload,
    modes: Sequence[str] = MODES,
    *,
    scale: float = 1.0,
    workers: int | None = None,
    repeat: int = 1,
) -> Comparison:
    """Run one workload under each of ``modes`` and compare them with sequential.

    The workload is prepared once for all modes. Sequential runs first (when asked for): its
    results are the reference every other mode must return. With ``repeat`` > 1 the modes
    take turns, one run each per round, and each keeps its quickest completed run, so a
    burst of noise from elsewhere on the machine hits every mode alike.

    Args:
        workload: a built-in workload's name, or a :class:`Workload` of your own.
        modes: the modes to run, in the order to show them.
        scale: multiplies the amount of work (1.0 takes about a second sequentially).
        workers: tasks at once for every mode; ``None`` leaves each its own default.
        repeat: rounds of runs.

    Raises:
        ValueError: unknown workload, or ``repeat`` below 1.
    """
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be an int >= 1, got {repeat!r}")
    chosen = get(workload) if isinstance(workload, str) else workload
    order = sorted(dict.fromkeys(modes), key=lambda m: m != "sequential")  # stable sort
    best: dict[str, RunResult] = {}
    with chosen.prepared(scale) as prepared:
        reference: list[Any] | None = None
        if "sequential" not in modes:
            reference = _reference(prepared)
        for _ in range(repeat):
            for mode in order:
                raw = _measure(prepared, mode, workers)
                if mode == "sequential" and reference is None:
                    reference = raw.values if raw.values is not None else _reference(prepared)
                run = raw.result(chosen.name, reference)
                if mode not in best or _better(run, best[mode]):
                    best[mode] = run
    return Comparison(
        workload=chosen.name,
        title=chosen.title,
        expected=chosen.expected,
        explanation=chosen.explanation,
        cores=usable_cpus(),
        scale=scale,
        results=tuple(best[mode] for mode in dict.fromkeys(modes)),
    )


def _better(run: RunResult, kept: RunResult) -> bool:
    """Say whether ``run`` replaces ``kept``: a failure in any round shows, else the quicker."""
    if run.status is not kept.status:
        return run.status is not Status.OK and kept.status is Status.OK
    return run.wall < kept.wall
