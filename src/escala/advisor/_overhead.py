"""What a hand-off costs on this machine, per mode: measured once per process, then cached.

Measuring costs a process's first auto call tens of milliseconds (a pool of processes
starts), so the advisor measures only where the figures can change its decision: it
decides with :data:`CAUTIOUS` and with :data:`HOPEFUL` figures first, and when both give
the same mode, the measuring is skipped (see :func:`escala.advisor.measure`). Measuring
in the background instead was tried and dropped: beside a task that holds the GIL, a
thread's hand-off measured sixty times its cost, and the figures are cached for good.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator

from .._core.plan import collect
from .._core.run import start_run
from .._options import Options
from ._rules import GUESSED_PROCESS_START, GUESSED_PROCESS_TASK, GUESSED_THREAD_TASK

__all__ = ["CAUTIOUS", "HOPEFUL", "known", "overheads"]

_cache: dict[tuple[str, int], float] = {}
_lock = threading.Lock()

#: Several times what the figures measure on a 2-core machine...
CAUTIOUS = {
    "threads-task": GUESSED_THREAD_TASK,
    "processes-start": GUESSED_PROCESS_START,
    "processes-task": GUESSED_PROCESS_TASK,
}
#: ...and a fraction of it: a decision that is the same with both does not hinge on them.
HOPEFUL = {"threads-task": 5e-6, "processes-start": 0.003, "processes-task": 5e-7}


def _noop(x: int) -> int:
    return x


def _timed(mode: str, n: int, workers: int) -> float:
    """Time a whole run of ``n`` empty tasks, as ``escala.map`` would run it."""
    items = range(n)
    options = Options.build(mode=mode, workers=workers)
    start = time.perf_counter()
    collect(start_run(_noop, items, options, ordered=False, keep_all=True).chunks(items))
    return time.perf_counter() - start


@contextlib.contextmanager
def _sharing_the_gil(contended: bool) -> Iterator[None]:
    """Measure fairly while a sampled task still runs on another thread.

    A task holding the GIL would make every step of the measurement wait up to a switch
    interval (5 ms), and a pool start look six times dearer than it is; a shorter interval
    for the few milliseconds of measuring keeps the figures true.
    """
    if not contended:
        yield
        return
    before = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _measure(cores: int, processes: bool) -> None:
    if ("threads-task", cores) not in _cache:
        n = 200
        _cache[("threads-task", cores)] = _timed("threads", n, min(cores, 4)) / n
    if processes and ("processes-start", cores) not in _cache:
        # one empty task per worker: a run starts no more workers than it has items
        start = min(_timed("processes", cores, cores) for _ in range(2))
        n = 20_000
        many = _timed("processes", n, cores)
        _cache[("processes-start", cores)] = start
        _cache[("processes-task", cores)] = max(0.0, many - start) / n


def known(cores: int) -> dict[str, float]:
    """The figures measured so far in this process, for ``cores`` cores."""
    return {kind: value for (kind, c), value in _cache.items() if c == cores}


def overheads(cores: int, *, processes: bool, contended: bool = False) -> dict[str, float]:
    """Return the measured cost of handing work to each mode, in seconds.

    ``threads-task``: per task on threads (one task per hand-off, as threads mode sends
    them). ``processes-start``: starting and stopping a pool of ``cores`` workers with an
    empty task each. ``processes-task``: per task in processes mode once batches are
    sized. Process figures are measured only when ``processes`` is true (they start a
    pool, ~20 ms). ``contended``: a task still runs on another thread while measuring.
    """
    with _lock, _sharing_the_gil(contended):
        _measure(cores, processes)
        return known(cores)
