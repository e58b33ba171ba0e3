"""The lesson of asynchronism, measured: the same requests one after another, then together.

Little's law (L = λW) ties the three figures of any stable system: requests in flight (L)
equal throughput (λ) times the time each one takes (W). Sent one after another, L is 1 and
throughput is 1/W. Sent C at a time, L is C: while W stays put, throughput grows C-fold,
which is all that concurrency buys; once the server is saturated, W grows instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ._report import LoadReport
from ._run import LoadProgress, run
from ._spec import LoadError, LoadSpec

__all__ = ["Comparison", "compare"]


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Two runs of the same requests: one in flight at a time, then ``concurrency``.

    Attributes:
        count: requests in each run.
        concurrency: requests in flight at once in the second run.
        one_by_one: the first run (a closed model with one user).
        together: the second run (``concurrency`` users), or ``None`` when the first was
            interrupted.
    """

    count: int
    concurrency: int
    one_by_one: LoadReport
    together: LoadReport | None

    @property
    def interrupted(self) -> bool:
        """Whether Ctrl-C cut it short."""
        return self.together is None or self.together.interrupted

    @property
    def speedup(self) -> float:
        """Throughput together over throughput one by one (0 if not measured)."""
        if self.together is None or not self.one_by_one.throughput:
            return 0.0
        return self.together.throughput / self.one_by_one.throughput

    def littles_law(self) -> str:
        """Say how the figures obey Little's law, with the measured numbers."""
        lines = ["Little's law: requests in flight = throughput × time each takes (L = λW)."]
        for name, report in (
            ("one after another", self.one_by_one),
            ("simultaneously", self.together),
        ):
            if report is None:
                continue
            latency = report.ok.mean
            in_flight = report.throughput * latency
            lines.append(
                f"  {name}: {in_flight:,.1f} in flight = {report.throughput:,.1f} requests/s "
                f"× {latency * 1e3:,.1f} ms"
            )
        if self.together is not None and self.one_by_one.ok.mean:
            stretch = self.together.ok.mean / self.one_by_one.ok.mean
            if stretch < 1.5:
                lines.append(
                    f"  The time per request stayed about the same (×{stretch:.2f}), so "
                    f"{self.concurrency} in flight gave ×{self.speedup:.1f} the throughput."
                )
            else:
                lines.append(
                    f"  Each request took ×{stretch:.1f} as long with {self.concurrency} in "
                    f"flight: the server is saturated, and more concurrency buys only "
                    "waiting."
                )
        return "\n".join(lines)


def compare(
    spec: LoadSpec,
    *,
    count: int = 200,
    concurrency: int = 20,
    progress: Callable[[str, LoadProgress], None] | None = None,
) -> Comparison:
    """Send ``count`` requests one after another, then ``concurrency`` at a time.

    Each run is the closed model in this process, bounded by ``spec.duration`` as well.

    Args:
        spec: the request, its timeout and duration; its pacing is not used.
        count: requests in each run.
        concurrency: requests in flight at once in the second run.
        progress: called with the run's name and where it stands.

    Raises:
        LoadError: ``count`` or ``concurrency`` below 1.
    """
    if count < 1 or concurrency < 1:
        raise LoadError("--count and --concurrency must be 1 or more")
    base = dataclasses.replace(spec, rate=None, users=1, requests=count, processes=1)

    def shown(name: str) -> Callable[[LoadProgress], None] | None:
        if progress is None:
            return None
        return lambda where: progress(name, where)

    one = run(base, progress=shown("one after another"))
    if one.interrupted:
        return Comparison(count, concurrency, one, None)
    together = run(
        dataclasses.replace(base, users=min(concurrency, count)),
        progress=shown(f"{concurrency} at a time"),
    )
    return Comparison(count, concurrency, one, together)
