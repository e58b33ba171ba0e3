"""The open model: requests leave at intended times, whatever earlier ones are doing.

A real service's users do not wait for each other. A generator that sends the next request
only when the previous one is answered stops sending exactly when the server stalls, and
so never measures the stall ("coordinated omission"). Here a schedule fixes every send time
in advance (``t0 + i/rate``, or Poisson gaps), and each request's latency runs from its
*intended* time: a request that could not leave on time because the generator was late
carries that delay too, and the generator's own lateness is measured to say when a run
cannot be trusted.

::

    schedule ──▶ due times ──▶ wake-up: every request now due ──▶ task per request
                                       │                              │
                         in-flight cap reached?                 latency = answer time
                           yes: count as dropped                          − intended time
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import aiohttp

from ._record import Recorder
from ._request import cancel_all, default_headers, send, wait_idle
from ._spec import Arrivals, LoadSpec

__all__ = ["run_open", "schedule"]


def schedule(spec: LoadSpec, offset: float = 0.0, seed: int | None = None) -> Iterator[float]:
    """Yield intended send times, in seconds after ``t0``, without end.

    Args:
        spec: its ``rate`` and ``arrivals``.
        offset: the first time (constant arrivals): processes sharing a rate start
            staggered, so that together they send evenly.
        seed: seed of the Poisson gaps.
    """
    assert spec.rate is not None
    rate = spec.rate
    if spec.arrivals is Arrivals.POISSON:
        draw = random.Random(seed).expovariate
        at = offset
        while True:
            at += draw(rate)
            yield at
    index = 0
    while True:
        # multiplied, not accumulated: no drift from rounding over millions of sends
        yield offset + index / rate
        index += 1


async def run_open(
    spec: LoadSpec,
    session: aiohttp.ClientSession,
    recorder: Recorder,
    *,
    t0: float,
    offset: float = 0.0,
    seed: int | None = None,
) -> None:
    """Send ``spec``'s requests on schedule from ``t0`` (event-loop time) for its duration.

    Returns after the last request is answered (or timed out). Cancelled, it stops
    sending, cancels what is in flight and leaves in ``recorder`` what was recorded.
    """
    loop = asyncio.get_running_loop()
    headers = default_headers(spec)
    end = spec.duration
    # Far behind, the generator stops: what it had not sent by then counts as missed.
    give_up = end + max(1.0, 0.1 * end)
    limit = spec.limit
    inflight: set[asyncio.Task[None]] = set()
    failures: list[BaseException] = []
    issued = missed = 0

    async def one(intended: float) -> None:
        started = loop.time() - t0
        # how late the generator is: the wake-up, then every send before this one
        recorder.lag.record(started - intended)
        recorder.on_send(intended, started)
        outcome, status, error = await send(session, spec, headers)
        now = loop.time() - t0
        recorder.on_answer(intended, now, outcome, now - intended, status, error)

    def finished(task: asyncio.Task[None]) -> None:
        inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())  # type: ignore[arg-type]

    times = schedule(spec, offset, seed)
    due = next(times)
    try:
        while due < end and issued < limit:
            now = loop.time() - t0
            if now > give_up:
                break
            # One wake-up sends everything now due: at high rates a sleep per request
            # would cost more than the gap between them. (No ``continue`` after the
            # sleep: a Ctrl-C raised at that jump would skip the ``finally`` on CPython
            # 3.11/3.12, see escala._core.drive._pump.)
            if due > now:
                await asyncio.sleep(due - now)
            while due <= now and due < end and issued < limit:
                if len(inflight) >= spec.max_inflight:
                    recorder.on_drop(due, now)
                else:
                    task = loop.create_task(one(due))
                    inflight.add(task)
                    task.add_done_callback(finished)
                issued += 1
                due = next(times)
            if failures:
                raise failures[0]
        while due < end and issued + missed < limit:
            missed += 1
            due = next(times)
        await wait_idle(inflight, spec.timeout + 1.0)
        if failures:
            raise failures[0]
    finally:
        recorder.scheduled += issued + missed
        recorder.missed += missed
        await cancel_all(inflight)
