"""Sampling: run the first items of a run on a thread of their own and measure them.

A probe thread pulls groups of items from the input and runs them, timing each group by
the wall clock and by the thread's own CPU clock. Meanwhile the caller's thread wakes every
millisecond and notes how late it wakes: a task that holds the GIL keeps it waiting up to
the interpreter's switch interval (5 ms), a task that waits on I/O or runs native code that
releases the GIL (hashlib on large buffers, zlib, numpy) lets it in at once, and so does a
free-threaded build. That is the "two threads" test, on real items, none run twice. (Probing
on several threads at once was tried: contention for the GIL then inflates each task's wall
time and blurs the line between computing and waiting.)

    caller thread                          probe thread ("escala-probe-0")
    ─────────────                          ───────────────────────────────
    start ────────────────────────────────▶ pull a group, run it, record it, repeat
    every 1 ms: wake (late if the GIL       until the time budget, the item cap or the end
      is held elsewhere)
    a group runs past the window? ────────▶ stop pulling; finish the group in hand and
    decide now, hand the group over          give it to whoever takes it over

Groups grow (×4) while a group takes under a millisecond: a clock reading per tiny task
would cost more than the task. Every sampled item counts as done: its result (or its
exception) goes to the run.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .._worker.context import WorkerContext
from .._worker.messages import Batch, Call

__all__ = ["Group", "Probe", "Sample", "budget"]

#: How long sampling may take before a decision, in switch intervals (5 ms by default): a
#: task holding the GIL makes each reading last one interval, so the window must hold a
#: few; short enough that running items one at a time costs little when parallel wins.
#: A group still running when the window closes is measured as it runs, and the run goes
#: on without it: the group finishes on the probe thread, beside the chosen workers.
BUDGET_INTERVALS = 2.5
#: The most items sampled; with a known length, at most this share of it.
MAX_ITEMS = 2048
#: A running group this old that has used under WAITING_SHARE of its time in CPU is I/O:
#: decide at once, without waiting for the window to close.
EARLY = 0.004
WAITING_SHARE = 0.1
MAX_SHARE = 1 / 16
#: The caller's wake-up period while measuring GIL contention.
TICK = 0.001
#: The longest :meth:`Probe.join` blocks at once (see ``escala._core.drive.WAIT_SLICE``).
JOIN_SLICE = 0.1
#: Groups of tasks are timed together, and grow (×4) while a group takes less than this.
GROUP_TIME = 0.001
MAX_GROUP = 4096


def children_cpu() -> float:
    """Seconds of CPU used so far by this process's child processes that have ended and
    been waited for (a subprocess's, once ``run`` returns)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _live_children_cpu(native: int) -> float:
    """Seconds of CPU used so far by the child processes that thread ``native`` started
    and that still run (Linux's ``/proc``; elsewhere none are seen)."""
    try:
        with open(f"/proc/self/task/{native}/children") as file:
            pids = file.read().split()
    except OSError:
        return 0.0
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat") as file:
                total += int(file.read().split()[0]) / 1e9
        except (OSError, IndexError, ValueError):
            pass  # it ended meanwhile: counted once reaped, by children_cpu()
    return total


def budget() -> float:
    """Return the sampling window in seconds (the same for deciding on a running task)."""
    return max(0.005, BUDGET_INTERVALS * sys.getswitchinterval())


@dataclass
class Group:
    """Items pulled and run together by one probe thread."""

    items: list[Any]
    started: float
    cpu_start: float
    queued_start: float | None = None
    values: list[Any] = field(default_factory=list)
    failures: dict[int, BaseException] = field(default_factory=dict)
    wall: float = 0.0
    cpu: float = 0.0
    queued: float = 0.0  # time the thread was ready to run but had no core
    children_start: float = 0.0
    children: float = 0.0  # CPU time of the child processes reaped meanwhile
    done: bool = False


@dataclass
class Sample:
    """What sampling ran and saw.

    Attributes:
        groups: every group pulled, in input order; some may still be running.
        elapsed: how long sampling took, seconds.
        threads: how many probe threads ran.
        gil_wait_mean: the caller's thread, waking every millisecond, was kept from running
            this long per wake-up on average (by the GIL, when a task holds it); ``None``
            when sampling was too short to tell.
        exhausted: the input ended during sampling.
        input_error: the input itself raised while being pulled (or the initializer did).
    """

    groups: list[Group] = field(default_factory=list)
    elapsed: float = 0.0
    threads: int = 1
    gil_wait_mean: float | None = None
    exhausted: bool = False
    input_error: BaseException | None = None

    @property
    def count(self) -> int:
        """Items pulled while sampling (run, or still running)."""
        return sum(len(g.items) for g in self.groups)

    @property
    def finished(self) -> int:
        """Items run to the end while sampling."""
        return sum(len(g.items) for g in self.groups if g.done)

    @property
    def has_running(self) -> bool:
        """Whether groups were still running when the decision came."""
        return any(not g.done for g in self.groups)

    @property
    def lower_bound(self) -> bool:
        """Whether per-task times are only lower bounds (no task had finished)."""
        return self.finished == 0 and self.has_running

    def per_task(self) -> tuple[float, float, float]:
        """Return mean wall, CPU and queued seconds per task, running groups included.

        Queued time is time the probe thread was ready to run but got no core (the machine
        busy with other work): it is neither computing nor waiting on I/O.
        """
        wall = sum(g.wall for g in self.groups)
        cpu = sum(g.cpu for g in self.groups)
        queued = sum(g.queued for g in self.groups)
        n = sum(len(g.items) for g in self.groups if g.done or g.wall > 0)
        return (wall / n, cpu / n, queued / n) if n else (0.0, 0.0, 0.0)

    def children_per_task(self) -> float:
        """Return the mean CPU time per task of the child processes the tasks waited for.

        Read for the process as a whole (``RUSAGE_CHILDREN``: children reaped by any of
        its threads), so only while sampling, when the probe threads alone run tasks.
        """
        timed = [g for g in self.groups if g.done or g.wall > 0]  # as per_task counts
        n = sum(len(g.items) for g in timed)
        return sum(g.children for g in timed) / n if n else 0.0

    def gil_wait(self) -> float | None:
        """How long the caller's thread was kept waiting per wake-up, or ``None``.

        Counted over the whole window (its length less the time the thread chose to
        sleep), not per reading: a task holding the GIL keeps the waiter out for whole
        switch intervals (5 ms), a short window holds only one or two wake-ups, and one
        that lands just as the task ends looks prompt. A waiter that hardly woke at all is
        the signal itself.
        """
        return self.gil_wait_mean


#: Receives a handed-over group when it ends (on the probe thread that ran it).
Handover = Callable[[Group], None]


class Probe:
    """Run the first items of an input on a few threads of their own and measure them.

    Args:
        fn: the task.
        threads: how many probe threads.
        initializer: the run's worker initializer (a probe thread is a worker too).
        initargs: its arguments.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        threads: int = 1,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        self._call = Call(fn)
        self._initializer = initializer
        self._initargs = initargs
        self._lock = threading.Lock()
        self._stop = False
        self._sample = Sample(threads=max(1, threads))
        # thread id -> (group, CPU clock, native thread id)
        self._running: dict[int, tuple[Group, int | None, int]] = {}
        self._handover: Handover | None = None
        self._late: list[Group] = []  # groups that ended between decision and hand_over
        self._threads: list[threading.Thread] = []
        self._left = 0  # probe threads still running
        self._all_done = threading.Event()

    def sample(self, items: Iterator[Any], *, total: int | None = None) -> Sample:
        """Run items from ``items`` until the budget is spent; return what was measured.

        The probes never touch ``items`` again after this returns. Groups still running
        are in the sample, not done; :meth:`hand_over` receives them when they end.
        """
        sample = self._sample
        cap = MAX_ITEMS if total is None else max(1, min(MAX_ITEMS, int(total * MAX_SHARE)))
        queued_before = run_delay()
        start = time.perf_counter()
        window = budget()
        deadline = start + window
        self._left = sample.threads
        for n in range(sample.threads):
            thread = threading.Thread(
                target=self._serve,
                args=(items, deadline, cap),
                name=f"escala-probe-{n}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()
        slept = 0.0  # time this thread chose to sleep; the rest of the window, it was busy
        wakes = 0  # or starved of the GIL
        try:
            while True:
                asked = time.perf_counter()
                finished = self._all_done.wait(TICK)
                woke = time.perf_counter()
                slept += min(TICK, woke - asked)
                wakes += 1
                if finished:
                    break
                with self._lock:
                    now = time.perf_counter()
                    if any(
                        now - g.started >= window or _clearly_waiting(g, clock, native, now)
                        for g, clock, native in self._running.values()
                    ):
                        self._stop = True
                        self._measure_running(now)
                        break
        except BaseException:
            with self._lock:  # Ctrl-C while measuring: stop pulling, drop what runs
                self._stop = True
                self._handover = lambda group: None
            raise
        sample.elapsed = time.perf_counter() - start
        if sample.elapsed >= sys.getswitchinterval():  # shorter says nothing about the GIL
            # Time this thread could not run for want of a core is not the GIL's doing.
            starved = _queued_since(queued_before, None)
            kept_out = sample.elapsed - slept - starved
            sample.gil_wait_mean = max(0.0, kept_out) / max(1, wakes)
        return sample

    def _measure_running(self, now: float) -> None:
        """Take the figures of the groups still running, as of ``now`` (lock held)."""
        for group, clock, native in self._running.values():
            group.wall = now - group.started
            group.cpu = _cpu_since(clock, group.cpu_start)
            group.queued = _queued_since(group.queued_start, native)
            group.children = children_cpu() - group.children_start + _live_children_cpu(native)

    def watch_running(self, timeout: float) -> bool:
        """After :meth:`sample`, wait up to ``timeout`` for the groups still running.

        Returns whether they all ended (their figures are then final); otherwise their
        figures are brought up to now, so that a decision can look again.
        """
        if self._all_done.wait(timeout):
            return True
        with self._lock:
            self._measure_running(time.perf_counter())
        return False

    def _serve(self, items: Iterator[Any], deadline: float, cap: int) -> None:
        clock = (
            time.pthread_getcpuclockid(threading.get_ident())
            if hasattr(time, "pthread_getcpuclockid")
            else None
        )
        native = threading.get_native_id()
        delay = _RunDelay()
        tiny = False
        sample = self._sample
        ctx = WorkerContext(self._initializer, self._initargs)
        ctx.enter()
        size = 1
        try:
            ctx.initialize()
            while True:
                with self._lock:
                    pulled = sample.count
                    if self._stop or pulled >= cap or (pulled and time.perf_counter() >= deadline):
                        break
                    group_items = self._pull(items, min(size, cap - pulled))
                    if not group_items:
                        break
                    # Run-queue delay matters only for groups long enough to be delayed; a
                    # reading costs microseconds, more than a trivial task.
                    group = Group(
                        group_items,
                        time.perf_counter(),
                        time.thread_time(),
                        None if tiny else delay.read(),
                        children_start=children_cpu(),
                    )
                    sample.groups.append(group)
                    self._running[threading.get_ident()] = (group, clock, native)
                self._run(ctx, group, delay)
                if group.wall < GROUP_TIME:
                    size = min(size * 4, MAX_GROUP)
                    tiny = True
        except BaseException as exc:  # the initializer failed: the run reports it
            with self._lock:
                sample.input_error = sample.input_error or exc
                self._stop = True
        finally:
            ctx.close()
            delay.close()
            with self._lock:
                self._left -= 1
                if self._left == 0:
                    self._all_done.set()

    def _pull(self, items: Iterator[Any], count: int) -> list[Any]:
        """Take up to ``count`` items (the lock is held); note the end or a failing input."""
        group: list[Any] = []
        while len(group) < count:
            try:
                group.append(next(items))
            except StopIteration:
                self._sample.exhausted = True
                self._stop = True
                break
            except Exception as exc:  # the input itself failed: the run raises it
                self._sample.input_error = exc
                self._stop = True
                break
        return group

    def _run(self, ctx: WorkerContext, group: Group, delay: _RunDelay) -> None:
        values, errors, _ = ctx.run_batch(Batch(self._call, range(len(group.items)), group.items))
        cpu = time.thread_time() - group.cpu_start
        wall = time.perf_counter() - group.started
        children = children_cpu() - group.children_start
        queued = 0.0
        if group.queued_start is not None and (now_delay := delay.read()) is not None:
            queued = max(0.0, now_delay - group.queued_start)
        with self._lock:
            self._running.pop(threading.get_ident(), None)
            decided = self._stop and not group.done and group.wall > 0
            group.values, group.failures = values, errors or {}
            group.wall, group.cpu, group.queued, group.done = wall, cpu, queued, True
            group.children = children
            if not decided:
                return
            handover = self._handover
            if handover is None:
                self._late.append(group)
                return
        handover(group)

    def hand_over(self, receive: Handover) -> None:
        """Give each group still running at the decision to ``receive`` when it ends.

        ``receive(group)`` runs on the probe thread that ran the group, or here, at once,
        for a group that ended while the caller was deciding.
        """
        with self._lock:
            late, self._late = self._late, []
            self._handover = receive
        for group in late:
            receive(group)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the probe threads; return whether they have all ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            # in slices: a Ctrl-C the kernel handed to another thread is seen between them
            while thread.is_alive():
                left = JOIN_SLICE if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    break
                thread.join(min(JOIN_SLICE, left))
        return not any(thread.is_alive() for thread in self._threads)


def _clearly_waiting(group: Group, clock: int | None, native: int, now: float) -> bool:
    """Whether a running group has waited long enough, using little CPU, to call it I/O.

    Work that waits goes to threads whatever the GIL does, so there is no need to sit out
    the whole window to time the GIL: a few milliseconds at under a tenth of CPU will do.
    (Not less: a probe thread the OS has not run yet also shows no CPU.)
    """
    elapsed = now - group.started - _queued_since(group.queued_start, native)
    if elapsed < EARLY or _cpu_since(clock, group.cpu_start) >= WAITING_SHARE * elapsed:
        return False
    # waiting for a child process that computes is not waiting on I/O
    children = children_cpu() - group.children_start + _live_children_cpu(native)
    return _cpu_since(clock, group.cpu_start) + children < WAITING_SHARE * elapsed


class _RunDelay:
    """This thread's run-queue delay, read through one descriptor kept open (a pread)."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = None

    def read(self) -> float | None:
        if self._fd is None:
            return None
        try:
            return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def run_delay(native: int | None = None) -> float | None:
    """Return seconds a thread has spent ready to run but without a core, if Linux says.

    From ``/proc/.../schedstat`` (its second field): ``None`` elsewhere, or where the
    kernel keeps no such count. ``native`` is a thread's native id; ``None`` is this thread.
    """
    path = (
        "/proc/thread-self/schedstat" if native is None else f"/proc/self/task/{native}/schedstat"
    )
    try:
        with open(path, "rb") as stats:
            return int(stats.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def _queued_since(start: float | None, native: int | None) -> float:
    """Run-queue delay of a thread since ``start`` (0 when unknown)."""
    if start is None:
        return 0.0
    now = run_delay(native)
    return max(0.0, now - start) if now is not None else 0.0


def _cpu_since(clock: int | None, start: float) -> float:
    if clock is None:
        return 0.0
    try:
        return max(0.0, time.clock_gettime(clock) - start)
    except OSError:  # pragma: no cover - the thread ended meanwhile
        return 0.0
