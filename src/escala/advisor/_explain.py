"""Advice in plain words, with the figures that decided it."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from ._rules import CLUSTER_GAIN, Reason
from ._verify import MET

if TYPE_CHECKING:  # the types only: _advice imports this module to explain itself
    from ._advice import Advice, Cluster, Measurements
    from ._verify import Leg

__all__ = ["explain", "human_time"]


def human_time(seconds: float) -> str:
    """Format a duration for a reader: "3.2 ms", "1.40 s", "850 µs"."""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    if seconds >= 1e-5:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1e6:.2f} µs"


def _cores(n: int) -> str:
    return f"{n} core" if n == 1 else f"{n} cores"


def explain(advice: Advice) -> str:
    """Return a few sentences: what was measured, what was chosen, and why."""
    m = advice.measured
    chosen = f"{advice.mode} with {advice.workers} worker" + ("" if advice.workers == 1 else "s")
    lines: list[str] = []
    if m is not None:
        lines.append(_measured(m))
    reason = advice.reason
    if reason is Reason.COROUTINE:
        lines.append(
            "The function is a coroutine function (async def): its waits overlap on one "
            "event loop, so async was chosen, "
            + (
                f"starting with {advice.workers} tasks at once (a waiting coroutine costs a "
                "few kilobytes)."
                if advice.adaptive
                else f"at most {advice.workers} tasks at once."
            )
        )
    elif reason is Reason.HINT_IO:
        lines.append(
            f'It is marked @escala.task(kind="io"): nothing was measured. {chosen}, '
            "adjusting how many run at once while it runs."
        )
    elif reason is Reason.HINT_CPU:
        lines.append(f'It is marked @escala.task(kind="cpu"): nothing was measured. {chosen}.')
    elif reason is Reason.ALL_SAMPLED:
        lines.append("Every item already ran while measuring: there is nothing left to run.")
    elif reason is Reason.CLUSTER and m is not None and advice.cluster is not None:
        lines.append(_weighed(advice.cluster, m, chosen=advice.workers))
    elif m is not None:
        lines.append(_because(advice, m))
    if advice.cluster is not None and reason is not Reason.CLUSTER:
        lines.append(_cluster_not_chosen(advice, advice.cluster))
    if advice.speedup > 1 and reason not in (Reason.COROUTINE, Reason.ALL_SAMPLED):
        lines.append(f"Expected speed-up over sequential: about {advice.speedup:.1f}×.")
    if advice.adaptive:
        lines.append(
            "How many tasks run at once is adjusted during the run: raised while it pays, "
            "lowered when tasks slow down or fail."
        )
    if advice.legs and reason is Reason.COROUTINE:
        lines.append(_overlapped(advice, advice.legs[0]))
    elif advice.legs:
        lines.append(_verified(advice.legs))
    return "\n".join(lines)


def _overlapped(advice: Advice, leg: Leg) -> str:
    """What a coroutine run measured: how many of its tasks overlapped, and the limit."""
    if leg.measured is None:
        return "The run ended before there was enough of it to measure."
    text = (
        f"While running, {leg.tasks:,} tasks overlapped {leg.measured:.1f}-fold on average "
        f"over {human_time(leg.seconds)}: about {leg.measured:.1f}× the speed of awaiting "
        "them one after another"
    )
    if advice.adaptive:
        text += (
            f"; the limit ended at {leg.workers:,} at once (from {advice.workers:,})"
            if leg.workers != advice.workers
            else f"; the limit stayed at {leg.workers:,} at once"
        )
    return text + "."


def _verified(legs: tuple[Leg, ...]) -> str:
    """What the run measured in each mode, and why it moved: one sentence per leg."""
    first = legs[0]
    if first.measured is None and len(legs) == 1:
        return f"The run ended in {first.mode} before there was enough of it to measure."
    if first.measured is None:
        text = (
            "When the sampled task that was still running ended, its whole figures "
            f"changed the promises ({first.mode}: {first.predicted:.1f}× from part of them)"
        )
    else:
        text = f"While running, {_delivered(first)}"
    if len(legs) == 1:
        verdict = "as predicted" if (first.measured or 0.0) >= MET * first.predicted else "short"
        return text + f" ({verdict}), and nothing else promised enough to be worth a try."
    for before, leg in itertools.pairwise(legs):
        earlier = any(old.mode == leg.mode for old in legs[: legs.index(leg)])
        if leg.mode == "sequential":
            why = "sequential is faster than that"
        elif earlier:
            why = "it had measured faster"
        else:
            why = f"it promised {leg.predicted:.1f}× from the figures measured so far"
        text += (
            f"; so the rest, from item #{leg.first} on, went to {leg.mode} ({why})"
            if before is first
            else f"; then the rest, from item #{leg.first} on, went to {leg.mode} ({why})"
        )
        if leg.measured is not None and leg.mode != "sequential":
            text += f", which {_delivered(leg, named=False)}"
    return text + "."


def _delivered(leg: Leg, *, named: bool = True) -> str:
    who = f"{leg.mode} ({leg.workers} at once) " if named else ""
    return (
        f"{who}ran at {leg.measured or 0:.2f}× sequential's speed over {leg.tasks:,} tasks "
        f"({human_time(leg.seconds)}), for {leg.predicted:.1f}× predicted"
    )


def _measured(m: Measurements) -> str:
    samples = f"{m.samples} sample" + ("" if m.samples == 1 else "s")
    if m.lower_bound:
        text = (
            f"Measured on the first task while it ran: over {human_time(m.wall)} per task, "
            f"{m.cpu_share:.0%} of it CPU time"
        )
    else:
        text = (
            f"Measured over {samples}: {human_time(m.wall)} per task, of which CPU "
            f"{human_time(m.cpu)} ({m.cpu_share:.0%} of wall time)"
        )
    if m.child_cpu > 0.1 * m.wall:
        text += (
            f", and {human_time(m.child_cpu)} more in the child processes it waited for, "
            "computing on this machine's cores"
        )
    if m.queued > 0.1 * m.wall:
        text += (
            f" (another {human_time(m.queued)} waiting for a free core: the machine is busy, "
            "which is not counted as waiting on I/O)"
        )
    if m.free_threaded:
        text += "; this Python has no GIL (free-threaded)"
    elif m.gil_held is True:
        text += f"; the task held the GIL (other threads waited {human_time(m.gil_wait)})"
    elif m.gil_held is False:
        text += "; the task let other threads run (the GIL was free)"
    if m.total is not None:
        text += f"; {m.total:,} items in all"
    return text + "."


def _because(advice: Advice, m: Measurements) -> str:
    reason = advice.reason
    wait = m.waiting
    if reason is Reason.WAITS:
        ratio = wait / max(m.computing, 1e-9)
        on = (
            "on I/O"
            if m.child_cpu <= 0.1 * m.wall
            else "for its child processes (whose CPU time counts as computing)"
        )
        return (
            f"CPU time was {m.cpu_share:.0%} of wall time: this work waits {on}, so threads "
            f"were chosen: {_cores(m.cores)} × (1 + {ratio:,.0f}) ≈ "
            f"{m.cores * (1 + ratio):,.0f}, capped at {advice.workers}."
            if m.cores * (1 + ratio) > advice.workers + 0.5
            else f"CPU time was {m.cpu_share:.0%} of wall time: this work waits {on}, so "
            f"threads were chosen: {_cores(m.cores)} × (1 + {ratio:,.1f}) ≈ {advice.workers}."
        )
    if reason is Reason.RELEASES_GIL:
        why = "this Python has no GIL" if m.free_threaded else "it releases the GIL"
        return (
            f"The work computes ({m.cpu_share:.0%} CPU), but {why}, so threads run it in "
            f"parallel without copying anything to other processes: {advice.workers} threads."
        )
    if reason is Reason.HOLDS_GIL and m.lower_bound:
        return (
            f"The first task was still running after {human_time(m.wall)}, computing "
            f"({m.cpu_share:.0%} CPU) in Python and holding the GIL: the rest would wait for "
            f"it in this process, so {_workers(advice.workers)} beside it, which pays "
            "for starting processes whatever the task's length beyond that."
        )
    if reason is Reason.HOLDS_GIL:
        return (
            f"The work computes ({m.cpu_share:.0%} CPU) in Python, holding the GIL: only "
            f"processes run it on several cores, so processes were chosen, one per core "
            f"({advice.workers}), sending about {advice.batch} task(s) per hand-off so that "
            "hand-offs stay a small part of the work."
        )
    if reason is Reason.ONE_CORE:
        return "The work computes, and only one core is usable here: sequential is fastest."
    if reason is Reason.NOT_PICKLABLE:
        return (
            "The work computes in Python, holding the GIL, so processes would help, but the "
            "function or its items cannot be sent to another process (they cannot be "
            "pickled): sequential was chosen. Make them picklable to run in parallel."
        )
    if not m.overhead:
        total = m.wall * (m.total - m.samples) if m.total is not None else 0.0
        return (
            f"The whole job would take about {human_time(total)} sequentially: less than "
            "starting any worker costs, so sequential was chosen."
        )
    handoff = m.overhead.get("processes-task") if m.cpu_share >= 0.5 else None
    handoff = handoff if handoff is not None else m.overhead.get("threads-task", 0.0)
    return (
        f"Each task takes {human_time(m.wall)}; a hand-off to a worker costs about "
        f"{human_time(handoff)} here"
        + (
            f" and starting processes {human_time(m.overhead['processes-start'])}"
            if "processes-start" in m.overhead and m.cpu_share >= 0.5
            else ""
        )
        + (
            " (guessed cautiously: this process is measuring them for the first time)"
            if m.overhead_guessed
            else ""
        )
        + ": the work is too short, or there is too little of it, to pay for any hand-off. "
        "Sequential was chosen."
    )


def _cluster_not_chosen(advice: Advice, c: Cluster) -> str:
    name = f"The {c.engine.title()} cluster at {c.address}"
    m = advice.measured
    if m is None or not c.reached:
        if advice.reason is Reason.COROUTINE:
            why = "a coroutine function runs on this machine's event loop"
        elif m is None:
            why = f"nothing was measured here; choose mode={c.engine!r} to run there"
        else:
            why = "nothing was left to run"
        return f"{name} was not weighed: {why}."
    if not m.picklable:
        return (
            f"{name} was not used: the function or its items cannot be pickled, so they "
            "cannot be sent to it."
        )
    return _weighed(c, m, chosen=None)


def _weighed(c: Cluster, m: Measurements, *, chosen: int | None) -> str:
    """The trade-off in one sentence: the cluster's size and cost per task, the tasks' own
    length, the share of overhead, and both predictions."""
    unit = "worker thread" if c.engine == "dask" else "CPU"
    size = f"{c.cores} {unit}" + ("" if c.cores == 1 else "s")
    length = ("over " if m.lower_bound else "") + human_time(m.wall)
    batches = "sent one per hand-off" if c.batch == 1 else f"sent in batches of {c.batch:,}"
    text = (
        f"The {c.engine.title()} cluster at {c.address} has {size} "
        + ("and" if chosen is not None else "but")
        + f" costs {human_time(c.overhead)} per task handed to it, plus "
        f"{human_time(c.start)} to connect and get ready; these tasks take {length} each, "
        f"so, {batches}, it would spend {c.overhead_share:.0%} of its time on overhead: "
        f"about {human_time(c.predicted)} for the remaining {c.remaining:,} items, against "
        f"{human_time(c.local)} with {c.local_mode} here"
    )
    if chosen is not None:
        return text + f". The cluster was chosen, {chosen} tasks at once."
    if c.predicted < c.local:
        return (
            text + f": not the {CLUSTER_GAIN:g}× sooner a cluster must promise to be worth "
            f"it, so {c.local_mode} was chosen here."
        )
    return text + f", so {c.local_mode} was chosen here."


def _workers(n: int) -> str:
    return "a worker process runs the rest" if n == 1 else f"{n} worker processes run the rest"
