"""What the advisor measured and what it chose: :class:`Advice`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._explain import explain
from ._rules import PICKLE_RATE, Reason
from ._verify import Leg

__all__ = ["Advice", "Cluster", "Leg", "Measurements", "Reason"]


@dataclass(frozen=True, slots=True)
class Measurements:
    """Figures from sampling the workload on this machine.

    Attributes:
        samples: items run while measuring (their results are kept).
        lower_bound: no task had finished when the decision came: ``wall`` and ``cpu``
            are what the first task had used by then.
        wall: mean wall time per task, seconds.
        cpu: mean CPU time per task in the running thread, seconds.
        queued: mean time per task the thread was ready but had no core (the machine busy
            with other work), seconds; neither computing nor waiting on I/O.
        gil_held: whether the task kept other Python threads waiting (``None`` when the
            sample was too short to tell).
        gil_wait: median time another thread waited for the GIL while tasks ran, seconds.
        free_threaded: this interpreter runs without a GIL.
        arg_bytes: pickled size of the first item (``None``: could not be pickled).
        result_bytes: pickled size of the first result (``None``: could not be pickled).
        picklable: the function and the first item can be sent to a worker process.
        total: how many items in all, when the input has a length.
        cores: usable CPU cores.
        overhead: measured cost of a hand-off per mode on this machine, seconds:
            ``{"processes-start": ..., "processes-task": ..., "threads-task": ...}``.
        overhead_guessed: some of ``overhead`` are cautious guesses, this process's first
            auto call having decided while they were being measured.
        send_time: seconds to pickle and unpickle the first item and its result, as
            measured (``None``: not measured). See :attr:`moving`.
        child_cpu: mean CPU time per task of the child processes it started and waited
            for (a subprocess), seconds: the task waited for them, but they computed on
            this machine's cores, which more threads do not multiply.
    """

    samples: int
    lower_bound: bool
    wall: float
    cpu: float
    queued: float
    gil_held: bool | None
    gil_wait: float
    free_threaded: bool
    arg_bytes: int | None
    result_bytes: int | None
    picklable: bool
    total: int | None
    cores: int
    overhead: dict[str, float] = field(default_factory=dict)
    overhead_guessed: bool = False
    send_time: float | None = None
    child_cpu: float = 0.0

    @property
    def moving(self) -> float:
        """Seconds a task's item and result take to cross to a worker process and back:
        pickling and unpickling them, as measured, and copying their bytes through a
        pipe at ``PICKLE_RATE`` (which, unmeasured, stands for the pickling too)."""
        copying = ((self.arg_bytes or 0) + (self.result_bytes or 0)) / PICKLE_RATE
        return copying + (self.send_time or 0.0)

    @property
    def computing(self) -> float:
        """Seconds per task spent computing on this machine: the task's own CPU time and
        its child processes'."""
        return self.cpu + self.child_cpu

    @property
    def waiting(self) -> float:
        """Seconds per task spent waiting on something other than this machine's cores
        (I/O, a server): neither computing, nor queued for a core, nor its children's."""
        return max(0.0, self.wall - self.queued - self.computing)

    @property
    def cpu_share(self) -> float:
        """CPU time as a share of the time the task could run (0 waits, 1 computes).

        Time spent queued for a core does not count as waiting: on a busy machine a
        computing task gets less CPU per second, but it does not wait on I/O.
        """
        active = self.wall - self.queued
        return min(1.0, self.cpu / active) if active > 0 else 1.0


@dataclass(frozen=True, slots=True)
class Cluster:
    """The cluster named by ``address=``: what was measured there, and how it compared.

    Attributes:
        engine: ``"dask"`` or ``"ray"``, from the address's form.
        address: as given.
        cores: tasks it runs at once: its worker threads (Dask) or CPUs (Ray); 0 when it
            was not reached (nothing measured locally, or nothing left to run).
        overhead: seconds per task handed to it: empty tasks sent one per hand-off, as
            many in flight as it runs at once, timed from the caller.
        start: seconds to connect and get ready (the function shipped, the initializer run).
        batch: tasks per hand-off it would be sent (hand-offs cost ``overhead`` each).
        predicted: seconds the remaining items would take there, ``start`` included.
        work: the part of ``predicted`` spent running the tasks themselves.
        local: seconds they would take with ``local_mode`` on this machine.
        local_mode: the best mode of this machine.
        remaining: the items weighed (assumed 10,000 when the input has no length).
    """

    engine: str
    address: str
    cores: int = 0
    overhead: float = 0.0
    start: float = 0.0
    batch: int = 1
    predicted: float = 0.0
    work: float = 0.0
    local: float = 0.0
    local_mode: str = ""
    remaining: int = 0

    @property
    def reached(self) -> bool:
        """Whether the cluster was reached and measured."""
        return self.cores > 0

    @property
    def overhead_share(self) -> float:
        """The share of the predicted time on the cluster not spent running the tasks."""
        return max(0.0, 1.0 - self.work / self.predicted) if self.predicted > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Advice:
    """The execution model escala recommends for a workload, and why.

    Attributes:
        mode: ``"sequential"``, ``"threads"``, ``"processes"`` or ``"async"``; ``"dask"``
            or ``"ray"`` when the cluster named by ``address=`` was chosen.
        workers: how many tasks to run at once.
        batch: tasks per hand-off (``"auto"``: sized while running).
        speedup: expected speed-up over sequential, from the measurements.
        reason: the rule that decided.
        measured: the figures behind it (``None`` when a hint skipped measuring).
        adaptive: concurrency adjusts itself during the run (I/O-bound work).
        cluster: the cluster named by ``address=``, with its measured figures and the
            predictions that decided (``None`` without an address).
        legs: what a run in this mode verified as it went: the mode it started in, then
            each it tried or moved to, with the speed-up measured (empty before a run, or
            when it did not verify; see :func:`escala.advisor.recording`).
    """

    mode: str
    workers: int
    batch: int | str
    speedup: float
    reason: Reason
    measured: Measurements | None = None
    adaptive: bool = False
    cluster: Cluster | None = None
    legs: tuple[Leg, ...] = ()

    def explain(self) -> str:
        """Say in plain words what was measured and why this mode was chosen."""
        return explain(self)

    def __str__(self) -> str:
        return self.explain()
