"""Admission control: refuse early and cheaply what the service cannot serve in time.

``TokenBuckets`` limits each user's rate; ``Gate`` (with ``AdmissionMiddleware``) limits
requests in flight, with a wait queue whose timeout follows CoDel as adapted in
Facebook's "Fail at Scale" (a queue that drains now and then absorbs bursts, a standing
one only adds latency); ``QueueDeadline`` runs CoDel (Nichols & Jacobson) on the time
jobs spend queued. None is thread-safe: the service uses them from its event loop.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["AdmissionMiddleware", "Gate", "Lane", "QueueDeadline", "TokenBuckets"]


def _positive(name: str, value: float) -> None:
    if not (0 < value < math.inf):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


class TokenBuckets:
    """A token bucket per user, for rate limits.

    A full bucket is the same as no bucket, so only users whose bucket is not full have
    state, dropped as it refills. At most ``max_users`` are kept: beyond that the least
    recently used goes (likely full; if not, its user gets a full one a little early).

    Args:
        clock: monotonic seconds.
        max_users: the most users with state at once.

    Raises:
        ValueError: ``max_users`` is not positive.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, max_users: int = 100_000
    ) -> None:
        if max_users < 1:
            raise ValueError(f"max_users must be a positive integer, got {max_users!r}")
        self._clock = clock
        self._max_users = max_users
        # user -> [tokens, when counted, when full again], least recently used first
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self._next_sweep = 1024

    def take(
        self, user: str, rate: float | None, burst: int | None = None, n: float = 1.0
    ) -> float:
        """Take ``n`` tokens from ``user``'s bucket if it holds them.

        Args:
            user: whose bucket.
            rate: tokens per second the bucket refills at; None for no limit.
            burst: what a full bucket holds; None for ``max(1, 2 × rate)``.
            n: tokens to take.

        Returns:
            0.0 if the tokens were taken; otherwise the seconds until the bucket will
            hold ``n`` tokens, and nothing is taken.

        Raises:
            ValueError: ``rate``, ``burst`` or ``n`` is not positive, or ``n`` is more
                than a full bucket holds.
        """
        if rate is None:
            return 0.0
        _positive("rate", rate)
        capacity = float(burst) if burst is not None else max(1.0, 2 * rate)
        _positive("burst", capacity)
        _positive("n", n)
        if n > capacity:
            raise ValueError(f"n ({n!r}) is more than a full bucket holds ({capacity!r})")
        now = self._clock()
        bucket = self._buckets.get(user)
        if bucket is None:
            tokens = capacity
        else:
            tokens = min(capacity, bucket[0] + (now - bucket[1]) * rate)
        if tokens < n:
            return (n - tokens) / rate
        tokens -= n
        full_at = now + (capacity - tokens) / rate
        if bucket is None:
            self._make_room()
            self._buckets[user] = [tokens, now, full_at]
        else:
            bucket[:] = [tokens, now, full_at]
            self._buckets.move_to_end(user)
        self._prune(now)
        return 0.0

    def __len__(self) -> int:
        """Return the number of users with state (buckets not known to be full)."""
        return len(self._buckets)

    def _make_room(self) -> None:
        while len(self._buckets) >= self._max_users:
            self._buckets.popitem(last=False)

    def _prune(self, now: float) -> None:
        # The least recently used buckets are the likeliest to be full: drop those from
        # the front, each once, so amortised O(1) per take. Rates differ between users,
        # so some full ones hide behind one that is not: a sweep whenever the count
        # doubles finds those, amortised O(1) per take too.
        while self._buckets:
            oldest = next(iter(self._buckets))
            if self._buckets[oldest][2] > now:
                break
            del self._buckets[oldest]
        if len(self._buckets) >= self._next_sweep:
            for user in [u for u, b in self._buckets.items() if b[2] <= now]:
                del self._buckets[user]
            self._next_sweep = max(1024, 2 * len(self._buckets))


class Gate:
    """In-flight limit with a bounded wait queue whose timeout follows CoDel.

    Facebook's "Fail at Scale" adaptation: while the queue has been empty within the
    last ``interval``, a request may wait up to ``interval``; once it has not been empty
    for a whole interval (a standing queue), waiting requests time out after
    ``target``. Requests beyond ``max_waiting`` are refused at once. Waiters are served
    first in, first out; a freed slot passes straight to the next waiter.

    A waiter's timeout is chosen as it starts to wait, as in the original, and runs on
    the event loop's timers; ``clock`` only tells how long the queue has gone without
    being empty (so tests can move it by hand).

    Args:
        max_inflight: requests admitted at once.
        max_waiting: requests that may wait for a slot; 0 refuses at once when full.
        target: seconds a request may wait while the queue stands.
        interval: seconds a request may wait while the queue drains now and then, and
            how long the queue must stay non-empty to count as standing.
        clock: monotonic seconds.

    Raises:
        ValueError: an argument is out of range (the message names it).
    """

    def __init__(
        self,
        *,
        max_inflight: int = 256,
        max_waiting: int = 1024,
        target: float = 0.005,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be a positive integer, got {max_inflight!r}")
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be 0 or more, got {max_waiting!r}")
        _positive("target", target)
        _positive("interval", interval)
        if target > interval:
            raise ValueError(f"target ({target!r}) must not exceed interval ({interval!r})")
        self._max_inflight = max_inflight
        self._max_waiting = max_waiting
        self._target = target
        self._interval = interval
        self._clock = clock
        self._inflight = 0
        # Each waiter's future resolves to True (a slot was handed to it) or False
        # (timed out); both happen on the loop, so a waiter never gets both.
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._last_empty = 0.0  # when the wait queue was last empty; set before use
        self.admitted = 0
        self.refused = 0

    @property
    def inflight(self) -> int:
        """Requests admitted and not released."""
        return self._inflight

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiters)

    async def acquire(self) -> bool:
        """Wait for a slot, within the queue's limits.

        Returns:
            True if admitted (the caller must ``release()``); False if refused: the
            wait queue is full or the wait timed out.

        Raises:
            asyncio.CancelledError: cancelled while waiting; no slot is held then.
        """
        if self._inflight < self._max_inflight and not self._waiters:
            self._inflight += 1
            self.admitted += 1
            return True
        if len(self._waiters) >= self._max_waiting:
            self.refused += 1
            return False
        now = self._clock()
        if not self._waiters:
            # empty now, and the last time it was empty until it empties again
            self._last_empty = now
        standing = now - self._last_empty >= self._interval
        timeout = self._target if standing else self._interval
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(timeout, self._expire, waiter)
        try:
            admitted = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                # a slot was handed over just as the caller went away: pass it on
                self.release()
            else:
                self._forget(waiter)
            raise
        finally:
            timer.cancel()
        if admitted:
            self.admitted += 1
        else:
            self.refused += 1
        return admitted

    def release(self) -> None:
        """Give back a slot: to the first waiter, or to the pool.

        Raises:
            RuntimeError: no slot is held.
        """
        if self._inflight <= 0:
            raise RuntimeError("release() called more times than acquire() admitted")
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)  # the slot moves on; inflight stays the same
                return
        self._inflight -= 1

    def _expire(self, waiter: asyncio.Future[bool]) -> None:
        if not waiter.done():
            self._forget(waiter)
            waiter.set_result(False)

    def _forget(self, waiter: asyncio.Future[bool]) -> None:
        try:
            self._waiters.remove(waiter)  # mostly the head: timeouts expire in order
        except ValueError:
            pass


_REFUSED_BODY = json.dumps(
    {"detail": "the server is overloaded: too many requests in flight; retry after 1 s"}
).encode()
_REFUSED_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_REFUSED_BODY)).encode()),
    (b"retry-after", b"1"),
]


#: Requests of their own: the paths they match, and the gate they go through instead of
#: the main one (``None``: none, for what is bounded elsewhere).
Lane = tuple[Callable[[str], bool], Gate | None]


class AdmissionMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it buffers and is slow).

    Each HTTP request holds a slot of ``gate`` while the app handles it; one the gate
    refuses gets a 503 at once, without calling the app. Other scopes pass through.
    A streaming response (server-sent events, a long poll) holds its slot while it
    streams, so a few hundred watchers would fill the gate: list the prefixes of such
    paths in ``unlimited``, or give them a lane, and bound them separately.

    Args:
        app: the app to protect.
        gate: the in-flight limit.
        exempt: exact paths never gated (health checks and metrics must answer most
            of all when the server is overloaded).
        on_refuse: called on each refusal (metrics).
        unlimited: path prefixes that bypass the in-flight limit (long-lived streams).
        lanes: requests with a gate of their own, so that a flood of them (clients
            polling their jobs) cannot take the slots of the rest, nor the rest theirs;
            the first lane whose test matches the path is taken.
    """

    def __init__(
        self,
        app: ASGIApp,
        gate: Gate,
        *,
        exempt: Collection[str] = ("/healthz", "/metrics"),
        on_refuse: Callable[[], None] | None = None,
        unlimited: Collection[str] = (),
        lanes: Sequence[Lane] = (),
    ) -> None:
        self.app = app
        self.gate = gate
        self._exempt = frozenset(exempt)
        self._unlimited = tuple(unlimited)
        self._lanes = tuple(lanes)
        self._on_refuse = on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path in self._exempt or path.startswith(self._unlimited):
            await self.app(scope, receive, send)
            return
        gate: Gate | None = self.gate
        for matches, lane in self._lanes:
            if matches(path):
                gate = lane
                break
        if gate is None:
            await self.app(scope, receive, send)
            return
        if not await gate.acquire():
            if self._on_refuse is not None:
                self._on_refuse()
            await send({"type": "http.response.start", "status": 503, "headers": _REFUSED_HEADERS})
            await send({"type": "http.response.body", "body": _REFUSED_BODY})
            return
        try:
            await self.app(scope, receive, send)
        finally:
            gate.release()


class QueueDeadline:
    """CoDel on job queueing time.

    A standing queue is detected when the *minimum* sojourn time of jobs leaving the
    queue stayed above ``target`` for a whole ``interval`` (a mere burst lets some job
    through quickly within any interval). A job that waited less than ``target``, or
    the queue emptying, ends it. Only CoDel's detection is kept, not its drop schedule:
    while overloaded the service refuses new jobs with ``retry_after()``.

    Args:
        target: acceptable queueing time, seconds.
        interval: how long the queueing time must stay above ``target``, seconds.
        clock: monotonic seconds.

    Raises:
        ValueError: ``target`` or ``interval`` is not positive.
    """

    def __init__(
        self, *, target: float, interval: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        _positive("target", target)
        _positive("interval", interval)
        self._target = target
        self._interval = interval
        self._clock = clock
        self._first_above: float | None = None  # when queueing time went above target
        self._window_start = 0.0
        self._window_min = math.inf  # lowest sojourn in the current interval
        self._last_min = math.inf  # lowest sojourn in the interval before

    def observe(self, sojourn: float) -> None:
        """Record that a job left the queue after waiting ``sojourn`` seconds."""
        now = self._clock()
        if sojourn < self._target:
            self.idle()
            return
        if self._first_above is None:
            self._first_above = self._window_start = now
            self._window_min = sojourn
            return
        if now - self._window_start >= self._interval:
            self._last_min, self._window_min = self._window_min, math.inf
            self._window_start = now
        self._window_min = min(self._window_min, sojourn)

    def overloaded(self) -> bool:
        """Return whether a standing queue persists.

        Judged at the time of the call, not of the last job out: a queue from which
        nothing leaves (every worker stuck) is standing too, until ``idle()``.
        """
        return self._first_above is not None and self._clock() - self._first_above >= self._interval

    def retry_after(self) -> int:
        """Return the whole seconds a refused client should wait, 1 to 3600.

        The excess of the last interval's lowest queueing time over ``target``: about
        how long the standing queue takes to drain.
        """
        lowest = self._last_min if self._last_min < math.inf else self._window_min
        if lowest == math.inf:
            return 1
        return max(1, math.ceil(min(3600.0, lowest - self._target)))  # inf-safe

    def idle(self) -> None:
        """Record that the queue became empty: any standing queue is over."""
        self._first_above = None
        self._window_min = self._last_min = math.inf
