"""The closed model: N users, each sending its next request when the previous is answered.

This is how most load tools work, and what it measures is real for a fixed population of
clients (a pool of workers calling a service, a batch job). It is also why they mislead:
when the server stalls, every user is stuck waiting, nobody sends, and the stall shows up
as one slow request per user among thousands of fast ones. The report says so beside the
figures; the open model (:mod:`._open`) is the one that sees the stall.
"""

from __future__ import annotations

import asyncio

import aiohttp

from ._record import Recorder
from ._request import cancel_all, default_headers, send
from ._spec import LoadSpec

__all__ = ["run_closed"]

# The loop-lag probe's period: short enough to see a generator that cannot keep up.
_PROBE = 0.005


async def run_closed(
    spec: LoadSpec,
    session: aiohttp.ClientSession,
    recorder: Recorder,
    *,
    t0: float,
) -> None:
    """Run ``spec.users`` users from ``t0`` (event-loop time) until the duration is over.

    A user starts no request after the duration or beyond ``spec.limit`` requests in all;
    latency runs from each request's actual send. Cancelled, the users stop where they are.
    """
    loop = asyncio.get_running_loop()
    headers = default_headers(spec)
    end = spec.duration
    left = spec.limit

    async def user() -> None:
        nonlocal left
        while left > 0:
            started = loop.time() - t0
            if started >= end:
                return
            left -= 1
            recorder.on_send(started, started)
            outcome, status, error = await send(session, spec, headers)
            now = loop.time() - t0
            recorder.on_answer(started, now, outcome, now - started, status, error)
            pause = min(spec.think, end - now)
            if pause > 0:
                await asyncio.sleep(pause)

    async def probe() -> None:
        # Nothing here is scheduled, so the loop's own lateness is measured by a sleeper:
        # a busy generator's latencies include its own queueing, and the report says so.
        while True:
            asked = loop.time() + _PROBE
            await asyncio.sleep(_PROBE)
            recorder.lag.record(loop.time() - asked)

    assert spec.users is not None
    users = {loop.create_task(user()) for _ in range(spec.users)}
    prober = loop.create_task(probe())
    try:
        await asyncio.wait(users)
        for task in users:
            task.result()  # a bug in a user is raised, not lost
    finally:
        await cancel_all({*users, prober})
