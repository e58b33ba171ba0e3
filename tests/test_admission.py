"""Admission control: token buckets, the CoDel gate and its middleware, queue deadlines.

Time is a hand-driven clock wherever the code takes one. The gate's timeouts run on the
event loop's real timers: a test that needs one to fire uses a tiny one and asserts only
on the outcome; one that needs it not to fire uses a minute, far beyond any test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from escala.service._admission import AdmissionMiddleware, Gate, QueueDeadline, TokenBuckets

LONG = 60.0  # a timeout no test lives to see


class Clock:
    """A clock that moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


async def until(condition: Callable[[], bool]) -> None:
    """Let other tasks run until ``condition`` holds.

    Each turn is a zero-length yield to the event loop (``sleep(0)``), not a timed wait:
    the tasks just started run up to their next wait, however slow the machine.
    """
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


# --- token buckets ---------------------------------------------------------------------


def test_bucket_allows_a_burst_then_says_how_long_to_wait() -> None:
    clock = Clock()
    buckets = TokenBuckets(clock=clock)
    assert [buckets.take("u", rate=2.0, burst=4) for _ in range(4)] == [0.0] * 4
    assert buckets.take("u", rate=2.0, burst=4) == pytest.approx(0.5)
    assert buckets.take("u", rate=2.0, burst=4, n=3) == pytest.approx(1.5)
    clock.advance(0.25)
    assert buckets.take("u", rate=2.0, burst=4) == pytest.approx(0.25)  # nothing taken
    clock.advance(0.25)
    assert buckets.take("u", rate=2.0, burst=4) == 0.0
    assert buckets.take("u", rate=2.0, burst=4) == pytest.approx(0.5)


def test_bucket_refills_up_to_the_burst_only() -> None:
    clock = Clock()
    buckets = TokenBuckets(clock=clock)
    assert buckets.take("u", rate=1.0, burst=3, n=3) == 0.0
    clock.advance(100)
    assert buckets.take("u", rate=1.0, burst=3, n=3) == 0.0
    assert buckets.take("u", rate=1.0, burst=3) == pytest.approx(1.0)


def test_buckets_are_per_user() -> None:
    buckets = TokenBuckets(clock=Clock())
    assert buckets.take("a", rate=1.0, burst=1) == 0.0
    assert buckets.take("a", rate=1.0, burst=1) > 0
    assert buckets.take("b", rate=1.0, burst=1) == 0.0


def test_default_burst_is_twice_the_rate_at_least_one() -> None:
    buckets = TokenBuckets(clock=Clock())
    assert [buckets.take("fast", rate=5.0) for _ in range(10)] == [0.0] * 10
    assert buckets.take("fast", rate=5.0) == pytest.approx(0.2)
    assert buckets.take("slow", rate=0.1) == 0.0
    assert buckets.take("slow", rate=0.1) == pytest.approx(10.0)


def test_no_rate_means_no_limit_and_no_state() -> None:
    buckets = TokenBuckets(clock=Clock())
    assert all(buckets.take("u", rate=None) == 0.0 for _ in range(1000))
    assert len(buckets) == 0


def test_full_buckets_are_dropped() -> None:
    clock = Clock()
    buckets = TokenBuckets(clock=clock)
    for i in range(10_000):
        buckets.take(f"user{i}", rate=1.0, burst=2)
    assert len(buckets) == 10_000
    clock.advance(1.0)  # each got its token back: all full
    buckets.take("another", rate=1.0, burst=2)
    assert len(buckets) == 1


def test_full_buckets_behind_slow_ones_are_swept() -> None:
    clock = Clock()
    buckets = TokenBuckets(clock=clock)
    buckets.take("slow", rate=0.001, burst=1)  # full again only after 1000 s
    for i in range(5000):
        buckets.take(f"fast{i}", rate=100.0)
    clock.advance(1.0)
    for i in range(5000):
        buckets.take(f"new{i}", rate=100.0)
    # the fast buckets, full again, hid behind the slow one: a sweep found them
    assert len(buckets) == 1 + 5000  # slow and the new ones
    clock.advance(1.0)
    assert buckets.take("slow", rate=0.001, burst=1) > 0  # its state was kept


def test_user_count_is_capped() -> None:
    buckets = TokenBuckets(clock=Clock(), max_users=100)
    for i in range(1000):
        assert buckets.take(f"user{i}", rate=1.0, burst=1) == 0.0
        assert len(buckets) <= 100
    # the oldest was evicted: its user starts with a full bucket again
    assert buckets.take("user0", rate=1.0, burst=1) == 0.0
    assert buckets.take("user999", rate=1.0, burst=1) > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate": 0.0}, "rate"),
        ({"rate": -1.0}, "rate"),
        ({"rate": 1.0, "burst": 0}, "burst"),
        ({"rate": 1.0, "n": 0.0}, "n must"),
        ({"rate": 1.0, "burst": 2, "n": 3.0}, "more than a full bucket"),
    ],
)
def test_bucket_arguments_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TokenBuckets(clock=Clock()).take("u", **kwargs)


def test_max_users_checked() -> None:
    with pytest.raises(ValueError, match="max_users"):
        TokenBuckets(max_users=0)


# --- gate ------------------------------------------------------------------------------


def test_gate_admits_up_to_the_limit_and_queues_fifo() -> None:
    async def main() -> None:
        gate = Gate(max_inflight=2, max_waiting=10, interval=LONG)
        assert await gate.acquire()
        assert await gate.acquire()
        assert gate.inflight == 2
        order: list[int] = []

        async def wait(i: int) -> None:
            assert await gate.acquire()
            order.append(i)

        tasks = [asyncio.create_task(wait(i)) for i in range(4)]
        await until(lambda: gate.waiting == 4)
        for expected in ([0], [0, 1], [0, 1, 2], [0, 1, 2, 3]):
            gate.release()
            await until(lambda: len(order) == len(expected))
            assert order == expected
            assert gate.inflight == 2
        await asyncio.gather(*tasks)
        for _ in range(2):
            gate.release()
        assert (gate.inflight, gate.waiting, gate.admitted, gate.refused) == (0, 0, 6, 0)

    run(main)


def test_gate_refuses_beyond_max_waiting() -> None:
    async def main() -> None:
        gate = Gate(max_inflight=1, max_waiting=2, interval=LONG)
        assert await gate.acquire()
        waiters = [asyncio.create_task(gate.acquire()) for _ in range(2)]
        await until(lambda: gate.waiting == 2)
        assert not await gate.acquire()
        assert gate.refused == 1
        gate.release()
        gate.release()
        assert await asyncio.gather(*waiters) == [True, True]
        gate.release()
        assert gate.inflight == 0

    run(main)


def test_gate_with_no_waiting_room_refuses_at_once() -> None:
    async def main() -> None:
        gate = Gate(max_inflight=1, max_waiting=0)
        assert await gate.acquire()
        assert not await gate.acquire()
        gate.release()
        assert await gate.acquire()
        gate.release()

    run(main)


def test_waiter_times_out_after_interval_when_queue_drains() -> None:
    async def main() -> None:
        gate = Gate(max_inflight=1, target=0.001, interval=0.01)
        assert await gate.acquire()
        assert not await gate.acquire()  # queue was empty: waited `interval`, then out
        assert (gate.waiting, gate.inflight, gate.refused) == (0, 1, 1)
        gate.release()
        assert gate.inflight == 0

    run(main)


def test_standing_queue_switches_timeout_from_interval_to_target() -> None:
    async def main() -> None:
        clock = Clock()
        gate = Gate(max_inflight=1, max_waiting=10, target=0.001, interval=LONG, clock=clock)
        assert await gate.acquire()
        first = asyncio.create_task(gate.acquire())  # queue empty now: may wait LONG
        await until(lambda: gate.waiting == 1)
        clock.advance(LONG / 2)
        second = asyncio.create_task(gate.acquire())  # empty half an interval ago: LONG
        await until(lambda: gate.waiting == 2)
        clock.advance(LONG / 2)
        # not empty for a whole interval: a standing queue, so newcomers get `target`
        assert not await gate.acquire()
        assert not first.done() and not second.done()
        assert gate.waiting == 2
        gate.release()
        gate.release()
        assert await first and await second
        gate.release()
        # the queue drained: later waiters get the long timeout again
        clock.advance(10 * LONG)
        assert await gate.acquire()
        third = asyncio.create_task(gate.acquire())
        await until(lambda: gate.waiting == 1)
        clock.advance(LONG / 2)
        assert not third.done()
        gate.release()
        assert await third
        gate.release()
        assert (gate.inflight, gate.admitted, gate.refused) == (0, 5, 1)

    run(main)


def test_cancelled_waiter_leaves_no_trace() -> None:
    async def main() -> None:
        gate = Gate(max_inflight=1, interval=LONG)
        assert await gate.acquire()
        gone = asyncio.create_task(gate.acquire())
        stays = asyncio.create_task(gate.acquire())
        await until(lambda: gate.waiting == 2)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert gate.waiting == 1
        gate.release()  # goes to the waiter still there, not the cancelled one
        assert await stays
        gate.release()
        assert (gate.inflight, gate.waiting) == (0, 0)

    run(main)


def test_slot_handed_to_a_waiter_cancelled_at_that_moment_is_passed_on() -> None:
    async def main() -> None:
        gate = Gate(max_inflight=1, interval=LONG)
        assert await gate.acquire()
        gone = asyncio.create_task(gate.acquire())
        stays = asyncio.create_task(gate.acquire())
        await until(lambda: gate.waiting == 2)
        gate.release()  # hands the slot to `gone`...
        gone.cancel()  # ...which is cancelled before it can run
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert await stays  # the slot went on to the next waiter
        assert gate.inflight == 1
        gate.release()
        assert (gate.inflight, gate.waiting) == (0, 0)

    run(main)


def test_slot_of_a_cancelled_last_waiter_goes_back() -> None:
    async def main() -> None:
        gate = Gate(max_inflight=1, interval=LONG)
        assert await gate.acquire()
        gone = asyncio.create_task(gate.acquire())
        await until(lambda: gate.waiting == 1)
        gate.release()
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert (gate.inflight, gate.waiting) == (0, 0)

    run(main)


def test_release_without_acquire_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="release"):
        Gate().release()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_inflight": 0}, "max_inflight"),
        ({"max_waiting": -1}, "max_waiting"),
        ({"target": 0.0}, "target"),
        ({"interval": -1.0}, "interval"),
        ({"interval": float("nan")}, "interval"),
        ({"target": 1.0, "interval": 0.5}, "must not exceed interval"),
    ],
)
def test_gate_arguments_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Gate(**kwargs)


# --- middleware ------------------------------------------------------------------------


class Service:
    """A Starlette app whose /work handler holds its slot until told to finish."""

    def __init__(self) -> None:
        self.calls = 0
        self.finish = asyncio.Event()

        async def work(request: Request) -> Response:
            self.calls += 1
            await self.finish.wait()
            return PlainTextResponse("done")

        async def boom(request: Request) -> Response:
            self.calls += 1
            raise RuntimeError("boom")

        async def ok(request: Request) -> Response:
            self.calls += 1
            return PlainTextResponse("ok")

        self.routes = [
            Route("/work", work),
            Route("/boom", boom),
            Route("/healthz", ok),
            Route("/metrics", ok),
            Route("/events/{job}", ok),
        ]


def client(app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def test_middleware_refuses_when_full_without_calling_the_app() -> None:
    async def main() -> None:
        service = Service()
        gate = Gate(max_inflight=1, max_waiting=0)
        refusals: list[None] = []
        app = AdmissionMiddleware(
            Starlette(routes=service.routes),
            gate,
            on_refuse=lambda: refusals.append(None),
            unlimited=("/events/",),
        )
        async with client(app) as http:
            busy = asyncio.create_task(http.get("/work"))
            await until(lambda: service.calls == 1)
            assert gate.inflight == 1

            refused = await http.get("/work")
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.headers["content-type"] == "application/json"
            assert refused.json() == {
                "detail": "the server is overloaded: too many requests in flight; retry after 1 s"
            }
            assert service.calls == 1  # the app never saw it
            assert len(refusals) == 1

            for path in ("/healthz", "/metrics", "/events/7"):  # exempt or unlimited
                assert (await http.get(path)).status_code == 200
            assert service.calls == 4
            assert gate.inflight == 1

            service.finish.set()
            assert (await busy).text == "done"
            assert gate.inflight == 0
            assert (await http.get("/work")).status_code == 200
        assert (gate.inflight, gate.admitted, gate.refused) == (0, 2, 1)

    run(main)


def test_middleware_releases_after_the_app_raises() -> None:
    async def main() -> None:
        service = Service()
        gate = Gate(max_inflight=1, max_waiting=0)
        async with client(AdmissionMiddleware(Starlette(routes=service.routes), gate)) as http:
            for _ in range(3):
                assert (await http.get("/boom")).status_code == 500
                assert gate.inflight == 0
        assert gate.admitted == 3

    run(main)


def test_middleware_as_starlette_middleware() -> None:
    async def main() -> None:
        service = Service()
        gate = Gate(max_inflight=1, max_waiting=0)
        app = Starlette(routes=service.routes, middleware=[Middleware(AdmissionMiddleware, gate)])
        async with client(app) as http:
            busy = asyncio.create_task(http.get("/work"))
            await until(lambda: service.calls == 1)
            assert (await http.get("/work")).status_code == 503
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/boom")).status_code == 503
            service.finish.set()
            assert (await busy).status_code == 200
            assert (await http.get("/boom")).status_code == 500
        assert gate.inflight == 0

    run(main)


@pytest.mark.parametrize("kind", ["websocket", "lifespan"])
def test_middleware_passes_other_scopes_through(kind: str) -> None:
    async def main() -> None:
        gate = Gate(max_inflight=1, max_waiting=0)
        assert await gate.acquire()  # full
        seen: list[str] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            seen.append(scope["type"])

        async def receive() -> Message:
            raise AssertionError("not called")

        async def send(message: Message) -> None:
            raise AssertionError("not called")

        await AdmissionMiddleware(app, gate)({"type": kind, "path": "/x"}, receive, send)
        assert seen == [kind]
        assert gate.inflight == 1

    run(main)


# --- queue deadline --------------------------------------------------------------------


def test_deadline_short_waits_are_fine() -> None:
    clock = Clock()
    deadline = QueueDeadline(target=0.5, interval=1.0, clock=clock)
    for _ in range(100):
        deadline.observe(0.1)
        clock.advance(0.1)
    assert not deadline.overloaded()
    assert deadline.retry_after() == 1


def test_deadline_standing_queue_after_a_whole_interval_above_target() -> None:
    clock = Clock()
    deadline = QueueDeadline(target=0.5, interval=1.0, clock=clock)
    deadline.observe(2.0)
    assert not deadline.overloaded()  # could be a burst
    clock.advance(0.5)
    deadline.observe(3.0)
    assert not deadline.overloaded()
    clock.advance(0.5)
    deadline.observe(2.5)
    assert deadline.overloaded()
    clock.advance(1.0)
    assert deadline.overloaded()  # nothing left the queue since: still standing


def test_deadline_one_short_wait_ends_it() -> None:
    clock = Clock()
    deadline = QueueDeadline(target=0.5, interval=1.0, clock=clock)
    deadline.observe(2.0)
    clock.advance(0.9)
    deadline.observe(0.1)  # the queue drained within the interval: only a burst
    clock.advance(0.5)
    deadline.observe(2.0)
    assert not deadline.overloaded()  # the interval starts again
    clock.advance(1.0)
    assert deadline.overloaded()
    deadline.observe(0.2)
    assert not deadline.overloaded()


def test_deadline_idle_ends_it() -> None:
    clock = Clock()
    deadline = QueueDeadline(target=0.5, interval=1.0, clock=clock)
    deadline.observe(2.0)
    clock.advance(2.0)
    assert deadline.overloaded()
    deadline.idle()
    assert not deadline.overloaded()
    assert deadline.retry_after() == 1
    clock.advance(5.0)
    assert not deadline.overloaded()


def test_deadline_retry_after_follows_the_last_intervals_lowest_wait() -> None:
    clock = Clock()
    deadline = QueueDeadline(target=0.5, interval=1.0, clock=clock)
    for sojourn in (9.0, 4.2, 6.0):  # the first interval: lowest 4.2
        deadline.observe(sojourn)
        clock.advance(0.3)
    assert deadline.retry_after() == 4  # ceil(4.2 - 0.5), this interval so far
    clock.advance(0.2)
    deadline.observe(20.0)  # a new interval begins
    assert deadline.overloaded()
    assert deadline.retry_after() == 4  # from the interval before
    clock.advance(1.0)
    deadline.observe(30.0)
    assert deadline.retry_after() == 20  # ceil(20 - 0.5)
    clock.advance(1.0)
    deadline.observe(1e9)
    clock.advance(1.0)
    deadline.observe(1e9)
    assert deadline.retry_after() == 3600
    deadline.observe(0.0)
    assert deadline.retry_after() == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"target": 0.0}, "target"), ({"target": 1.0, "interval": 0.0}, "interval")],
)
def test_deadline_arguments_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QueueDeadline(**kwargs)
