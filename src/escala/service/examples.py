"""Example tasks, for trying ``escala serve`` and for its demo and tests.

escala serve --app escala.service.examples --no-auth

Every argument is checked before use, as a task behind a public API must: a client
sends anything JSON allows, and ``"nan"`` reads as a float that passes any ``min``
and ``max`` (NaN compares false both ways).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from typing import Any

from .._task import task

__all__ = ["echo", "fail", "fib", "fib_on_loop", "hash_rounds", "nap", "noop", "spin"]


def _seconds(value: Any, most: float = 60.0) -> float:
    """Read a duration: a finite number of seconds, clamped to 0 ... ``most``.

    Raises:
        ValueError: not a number, or not a finite one.
    """
    seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"seconds must be a finite number, got {value!r}")
    return min(max(seconds, 0.0), most)


@task(kind="io")
async def echo(value: Any = None) -> Any:
    """Return the value given: the cheapest possible job."""
    return value


@task(kind="io")
async def noop() -> None:
    """Do nothing: measures the service's own cost per job."""


@task(kind="io")
async def nap(seconds: float = 0.1) -> float:
    """Wait ``seconds`` (at most 60) without using the CPU, like a call to another service."""
    seconds = _seconds(seconds)
    await asyncio.sleep(seconds)
    return seconds


@task(kind="cpu")
def fib(n: int = 25) -> int:
    """Compute the n-th Fibonacci number the slow way (n at most 32): pure Python CPU work."""
    n = min(int(n), 32)  # int() refuses NaN and infinities itself
    return n if n < 2 else fib(n - 1) + fib(n - 2)


@task(kind="io")
async def fib_on_loop(n: int = 25) -> int:
    """What not to do, for the demo: ``fib(n)`` computed ON the event loop.

    A coroutine that computes without awaiting holds the loop for the whole call, so
    every other request on the server (health checks included) waits behind it.
    ``escala demo --service`` sets it beside :func:`fib`, which runs in the process pool,
    and measures the difference. CPU work belongs in a plain ``kind="cpu"`` function.
    """
    return fib(n)


@task(kind="cpu")
def spin(seconds: float = 0.1) -> int:
    """Keep one core busy in Python for ``seconds`` (at most 60); return the loop count."""
    deadline = time.perf_counter() + _seconds(seconds)
    count = 0
    while time.perf_counter() < deadline:
        count += 1
    return count


@task(kind="io")
def hash_rounds(rounds: int = 1000) -> str:
    """Hash 64 KiB ``rounds`` times (at most 100,000): hashlib releases the GIL."""
    data = bytes(65536)
    digest = b""
    for _ in range(min(int(rounds), 100_000)):
        digest = hashlib.sha256(data + digest).digest()
    return digest.hex()


@task(kind="io")
async def fail(message: str = "this task always fails") -> None:
    """Raise ``RuntimeError(message)``: shows how a failed job looks."""
    raise RuntimeError(message)
