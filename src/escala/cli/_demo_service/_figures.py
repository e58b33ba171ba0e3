"""What ``escala demo --service`` measures: its settings and the figures of one run.

Shared by the run (``__init__``), the tables (``_show``) and the chart (``_chart``), which
read the same names without importing each other.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...load import Comparison, LoadReport

__all__ = [
    "CONCURRENCY",
    "HEALTH_RATE",
    "IO_LIMIT",
    "NAP",
    "OVERLOAD_NAP",
    "TIMEOUT",
    "LoopLag",
    "OffloadPhase",
    "OverloadPhase",
    "Results",
]

# (a) one request naps this long: I/O-bound, the server's CPU is idle meanwhile
NAP = 0.05
CONCURRENCY = 20
# (b) one fib call should take about this long; the load keeps one core 40% busy
CALL_TARGET = 0.020
CPU_SHARE = 0.4
HEALTH_RATE = 50.0
# (c) a server that runs IO_LIMIT naps of OVERLOAD_NAP at once serves IO_LIMIT/OVERLOAD_NAP
# requests/s; it is offered three times that
IO_LIMIT = 8
OVERLOAD_NAP = 0.1
OVERLOAD = 3.0
# below 5 s on purpose: aiohttp rounds a deadline of 5 s or more up to the loop clock's next
# whole second, so that a "5 s" timeout fires after 5 to 6 s
TIMEOUT = 4.0


@dataclasses.dataclass(frozen=True)
class LoopLag:
    """The server's event-loop lag over one phase, from its ``escala_loop_lag_seconds``.

    A histogram knows how many samples fell between two bucket edges, not where: p99 and
    max are given as the bucket that holds them, ``(lower, upper)`` in seconds (upper is
    ``inf`` past the last edge).

    Attributes:
        probes: lag samples taken in the phase (one per 20 ms while the loop is free).
        mean: seconds, exact (the histogram's sum over its count).
        p99: the bucket that holds the 99th percentile.
        max: the highest bucket with a sample.
        buckets: samples of the phase at or below each edge (seconds; cumulative).
    """

    probes: int
    mean: float
    p99: tuple[float, float]
    max: tuple[float, float]
    buckets: dict[float, int]


@dataclasses.dataclass(frozen=True)
class OffloadPhase:
    """(b) one CPU task under load, with a /healthz probe beside it."""

    task: str
    runs_on: str
    work: LoadReport
    health: LoadReport
    lag: LoopLag


@dataclasses.dataclass(frozen=True)
class OverloadPhase:
    """(c) one server offered more than it can serve, admission control on or off."""

    admission: bool
    report: LoadReport


@dataclasses.dataclass
class Results:
    """Everything the demo measured, filled in as it goes."""

    scale: float
    machine: str = ""
    simultaneous: Comparison | None = None
    fib_n: int = 0
    call_seconds: float = 0.0
    cpu_workers: int = 0
    offload: list[OffloadPhase] = dataclasses.field(default_factory=list)
    offload_rate: float = 0.0
    offload_duration: float = 0.0
    overload: list[OverloadPhase] = dataclasses.field(default_factory=list)
    overload_duration: float = 0.0
    servers: list[int] = dataclasses.field(default_factory=list)
