"""amap and aimap: async and plain functions, a concurrency limit, async iterable input."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections.abc import AsyncIterator

import pytest

import escala


class Gauge:
    """Counts tasks running at once and remembers the most."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.lock = threading.Lock()

    def __enter__(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *_: object) -> None:
        with self.lock:
            self.now -= 1


def test_amap_runs_coroutines_on_the_callers_loop() -> None:
    async def main() -> list[int]:
        loop = asyncio.get_running_loop()

        async def task(x: int) -> int:
            assert asyncio.get_running_loop() is loop
            await asyncio.sleep(0)
            return x * 2

        return await escala.amap(task, range(50))

    assert asyncio.run(main()) == [x * 2 for x in range(50)]


def test_amap_respects_the_limit() -> None:
    gauge = Gauge()
    everyone_in = asyncio.Event()

    async def task(x: int) -> int:
        with gauge:
            if gauge.now == 5:
                everyone_in.set()
            # hold the slot until the limit has been reached once: proves the limit is
            # reachable, and the gauge proves it is never passed
            await asyncio.wait_for(everyone_in.wait(), 30)
        return x

    async def main() -> list[int]:
        return await escala.amap(task, range(40), limit=5)

    assert asyncio.run(main()) == list(range(40))
    assert gauge.most == 5


def test_amap_sends_plain_functions_to_threads() -> None:
    caller = threading.get_ident()
    gauge = Gauge()
    barrier = threading.Barrier(3, timeout=30)

    def blocking(x: int) -> int:
        assert threading.get_ident() != caller  # never on the event loop's thread
        with gauge:
            if x < 3:
                barrier.wait()  # three at once: only possible on three threads
        return x + 1

    async def main() -> list[int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        tick = asyncio.create_task(ticker())
        results = await escala.amap(blocking, range(10), limit=3)
        tick.cancel()
        assert ticks > 0
        return results

    assert asyncio.run(main()) == list(range(1, 11))
    assert gauge.most == 3


def test_amap_takes_an_async_iterable() -> None:
    async def numbers() -> AsyncIterator[int]:
        for i in range(20):
            await asyncio.sleep(0)
            yield i

    async def task(x: int) -> int:
        return -x

    assert asyncio.run(escala.amap(task, numbers(), limit=4)) == [-i for i in range(20)]


def test_aimap_streams_in_order_and_unordered() -> None:
    async def task(x: int) -> int:
        await asyncio.sleep(0.01 if x == 0 else 0)
        return x

    async def main() -> tuple[list[int], list[int]]:
        ordered = [r async for r in escala.aimap(task, range(5))]
        unordered = [r async for r in escala.aimap(task, range(5), ordered=False)]
        return ordered, unordered

    ordered, unordered = asyncio.run(main())
    assert ordered == [0, 1, 2, 3, 4]
    assert sorted(unordered) == [0, 1, 2, 3, 4]


_gate = multiprocessing.get_context("fork").Event()


def wait_for_gate(x: int) -> int:
    if not _gate.wait(30):
        raise TimeoutError("the event loop never opened the gate")
    return x * x


def test_amap_with_processes_keeps_the_loop_free() -> None:
    """The workers wait for a gate that only the event loop opens, while amap runs:
    if amap blocked the loop, this would deadlock (and the watchdog would fail it)."""
    _gate.clear()

    async def main() -> list[int]:
        async def open_gate() -> None:
            await asyncio.sleep(0)
            _gate.set()

        opener = asyncio.create_task(open_gate())
        results = await escala.amap(wait_for_gate, range(6), mode="processes", workers=2)
        await opener
        return results

    assert asyncio.run(main()) == [x * x for x in range(6)]


def test_amap_errors_and_collect() -> None:
    async def task(x: int) -> int:
        if x == 2:
            raise KeyError(x)
        return x

    with pytest.raises(KeyError):
        asyncio.run(escala.amap(task, range(5)))
    outcomes = asyncio.run(escala.amap(task, range(5), errors="collect"))
    assert [o.ok for o in outcomes] == [True, True, False, True, True]


def test_cancelling_amap_cancels_its_tasks() -> None:
    started = asyncio.Event()
    cancelled = 0

    async def task(x: int) -> int:
        nonlocal cancelled
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return x

    async def main() -> None:
        run = asyncio.create_task(escala.amap(task, range(10), limit=4))
        await started.wait()
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run

    asyncio.run(main())
    assert cancelled == 4


def test_limit_and_workers_are_one_setting() -> None:
    async def task(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="limit or workers"):
        asyncio.run(escala.amap(task, [1], limit=2, workers=3))


def test_plain_map_of_a_coroutine_function_from_inside_a_running_loop() -> None:
    """Called from async code, map cannot use this thread's loop (it is busy running the
    caller): it runs the tasks on a loop of its own, on another thread."""

    async def task(x: int) -> int:
        await asyncio.sleep(0)
        return x + 1

    async def main() -> list[int]:
        return escala.map(task, range(5), mode="async")

    assert asyncio.run(main()) == [1, 2, 3, 4, 5]


def _meeting(count: int) -> tuple[Gauge, object]:
    """A coroutine function whose calls all wait until ``count`` of them are awaiting."""
    gauge = Gauge()
    arrived: list[asyncio.Event] = []

    async def meet(x: int) -> int:
        if not arrived:
            arrived.append(asyncio.Event())
        with gauge:
            if gauge.now >= count:
                arrived[0].set()
            await asyncio.wait_for(arrived[0].wait(), timeout=30)  # a bug fails, not hangs
        return x

    return gauge, meet


@pytest.mark.parametrize("call", ["map", "imap", "amap"])
def test_by_default_coroutines_start_hundreds_at_once(call: str) -> None:
    """300 coroutines meet before any returns: more than a fixed limit of 100 lets in."""
    gauge, meet = _meeting(300)
    if call == "map":
        results = escala.map(meet, range(300))  # type: ignore[arg-type]
    elif call == "imap":
        results = list(escala.imap(meet, range(300)))  # type: ignore[arg-type]
    else:
        results = asyncio.run(escala.amap(meet, range(300)))  # type: ignore[arg-type]
    assert results == list(range(300))
    assert gauge.most >= 300


def test_a_limit_given_is_kept() -> None:
    gauge = Gauge()

    async def task(x: int) -> int:
        with gauge:
            await asyncio.sleep(0.001)
        return x

    assert escala.map(task, range(200), workers=20) == list(range(200))
    assert gauge.most <= 20
