"""Verify while running: does the chosen mode deliver the speed-up it was chosen for?

A decision from a few milliseconds of sampling is a prediction. The run checks it::

    leg (a mode on a part of the input) ──▶ Meter: tasks done over time, once enough
         ran ──▶ measured speed-up = tasks/s × sequential seconds per task
         ──▶ judge(legs so far, what each mode promises, the work left)
               ├── a mode not run yet promises clearly more than any delivered, and
               │   the time it would save pays for trying: try it on the next part
               ├── an earlier mode (or sequential) measured clearly faster: move there
               └── otherwise: stay (verified, when it delivered MET of its promise)

No clock or I/O of its own: the run feeds the meter completions and the time, so the
rules are tested with synthetic figures.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MET", "NOISE", "PAYBACK", "TRIAL_GAIN", "Leg", "Meter", "judge", "redecide"]

#: A mode that delivers this share of its predicted speed-up is verified: it stays.
MET = 0.75
#: A mode is tried only when it promises this many times what the current one delivers.
TRIAL_GAIN = 1.3
#: ...and the time it would save on the work left pays this many times what trying costs.
PAYBACK = 3.0
#: A mode measured faster than the current one wins a move only by more than this share
#: (the measurements are a few hundred milliseconds long).
NOISE = 0.1
#: Seconds of running measured, at least, before a mode is judged...
SPAN = 0.1
#: ...and at least this many rounds of its tasks (each worker finishing one), so that a
#: round whose tasks end together weighs little.
ROUNDS = 5


@dataclass
class Leg:
    """One mode's part of a run, as the verification saw it.

    Attributes:
        mode: the mode.
        workers: tasks it ran at once.
        predicted: the speed-up over sequential it was chosen or tried for.
        measured: the speed-up it delivered (``None`` until judged).
        tasks: tasks it had run when judged.
        seconds: over how long.
        first: the input position of its first item.
    """

    mode: str
    workers: int
    predicted: float
    measured: float | None = None
    tasks: int = 0
    seconds: float = 0.0
    first: int = 0


class Meter:
    """Measure one leg's speed-up over sequential from its completions.

    Args:
        per_task: seconds one task takes sequentially (from the sample).
        round_time: seconds a round of tasks takes (a task's, or a batch's, length).
    """

    def __init__(self, per_task: float, round_time: float) -> None:
        self.per_task = per_task
        self.span = max(SPAN, ROUNDS * round_time)
        self._start: tuple[int, float] | None = None

    def restart(self) -> None:
        """Forget what was counted: the conditions changed (the sampling thread ended)."""
        self._start = None

    def glimpse(self, ran: int, now: float) -> float | None:
        """The speed-up so far, once half the span has passed (``None`` before): an early
        hint, not a measurement, to prepare what a verdict may need."""
        if self._start is None:
            return None
        ran0, start = self._start
        seconds = now - start
        if seconds < self.span / 2 or ran <= ran0:
            return None
        return (ran - ran0) * self.per_task / seconds

    def observe(self, ran: int, now: float) -> tuple[float, int, float] | None:
        """Take the leg's count of tasks run at ``now``.

        Returns:
            ``(speed-up, tasks, seconds)`` once the leg has run ``span`` seconds since its
            first observation; ``None`` until then.
        """
        if self._start is None:
            self._start = (ran, now)
            return None
        ran0, start = self._start
        seconds = now - start
        if seconds < self.span or ran <= ran0:
            return None
        tasks = ran - ran0
        return tasks * self.per_task / seconds, tasks, seconds


def redecide(
    mode: str,
    promises: dict[str, tuple[int, float]],
    work_left: float,
    start_costs: dict[str, float],
    round_time: float = 0.0,
) -> str:
    """Decide again once the figures the decision had were completed.

    A task still running when the decision came gave only part of its figures (a task
    that computes first and waits after looks like pure computing); when it ends, what
    each mode promises may change before ``mode`` has run long enough to be measured.
    Another mode is tried at once when it now promises ``TRIAL_GAIN`` times what ``mode``
    does and the time saved pays for trying; otherwise ``mode`` stays, to be measured.
    """
    current = promises.get(mode, (1, 1.0))[1]
    leg = Leg(mode, 1, current, measured=current)
    return judge([leg], promises, work_left, start_costs, round_time)


def judge(
    legs: list[Leg],
    promises: dict[str, tuple[int, float]],
    work_left: float,
    start_costs: dict[str, float],
    round_time: float = 0.0,
) -> str:
    """Decide where the rest of the input goes, once the last leg is measured.

    Args:
        legs: the legs so far, the last one measured just now.
        promises: each mode's ``(workers, predicted speed-up)`` for the work left, from
            the freshest figures.
        work_left: seconds the work left would take sequentially.
        start_costs: seconds a mode costs to get ready (processes: starting workers).
        round_time: seconds the last leg takes to finish what it has in flight, which a
            trial costs on top of its start.

    Returns:
        The mode for the rest: the last leg's to stay; one never run, to try it on the
        next part; an earlier leg's, or ``"sequential"``, to move there for good.
    """
    current = legs[-1]
    delivered = max(current.measured or 0.0, 1e-9)
    best = max(
        [Leg("sequential", 1, 1.0, measured=1.0), *legs[:-1]],
        key=lambda leg: leg.measured or 0.0,
    )
    bar = TRIAL_GAIN * max(delivered, best.measured or 0.0)
    tried = {leg.mode for leg in legs} | {"sequential"}
    untried = sorted(
        ((speedup, mode) for mode, (_, speedup) in promises.items() if mode not in tried),
        reverse=True,
    )
    # a trial that the input would end before it is measured is a blind move
    measurable = max(SPAN, ROUNDS * round_time)
    for speedup, mode in untried:
        if speedup < bar:
            break  # sorted: none further promises more
        if work_left / speedup < measurable:
            continue
        saved = work_left * (1 / delivered - 1 / speedup)
        if saved >= PAYBACK * (start_costs.get(mode, 0.0) + round_time):
            return mode
    if best.mode != current.mode and (best.measured or 0.0) > delivered * (1 + NOISE):
        return best.mode
    return current.mode
