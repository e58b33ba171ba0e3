"""Workloads that escala's built-in set does not contain, to judge ``mode="auto"`` on.

Each :class:`Workload` names a task function (module-level, so worker processes can
import it), a builder for its items and, where the task needs something running (a server,
a folder), a setup context manager whose value the builder receives. Everything a setup
starts is stopped on the way out, by its own pid or handle, even when the run raised.

Sizes aim at 0.3–1.5 s for a sequential run on a 2-core machine, so the whole suite, every
fixed mode swept, stays within a few minutes. The two coroutine workloads are the
exception in one way: 5000 × 1 ms and 500 × 50 ms would take 5 s and 25 s sequentially,
so they are cut to 1000 and 25 items.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import http.server
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["WORKLOADS", "Workload"]

# thread counts worth sweeping: a few for computing work (more only adds switching),
# many for waiting work (one thread per waiting task is the most that can help)
CPU_THREADS = (2, 4, 8)
WAIT_THREADS = (2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Workload:
    """One benchmark case: a task, how to build its items, and what it needs around it.

    Attributes:
        name: short, unique, used in tables.
        kind: the class of work, for grouping the results.
        fn: the task, plain or ``async``.
        build: returns the items, given what ``setup`` yielded (``None`` without one).
        setup: a context manager factory for servers, folders and the like.
        threads: the thread counts to sweep, capped at the item count by the caller.
        errors: passed to ``escala.map`` (``"collect"`` for tasks meant to fail).
    """

    name: str
    kind: str
    fn: Callable[[Any], Any]
    build: Callable[[Any], list[Any]]
    setup: Callable[[], AbstractContextManager[Any]] = nullcontext
    threads: tuple[int, ...] = WAIT_THREADS
    errors: str = "raise"

    @contextmanager
    def prepared(self) -> Iterator[list[Any]]:
        """Run the setup and yield the items; the teardown runs however the block ends."""
        with self.setup() as env:
            yield self.build(env)


# -- computing in Python, holding the GIL -----------------------------------------------


def spin(n: int) -> int:
    """Integer arithmetic in a Python loop: ``n`` rounds."""
    total = 0
    for i in range(n):
        total += (i * i) % 7
    return total


def arith_small(x: int) -> int:
    return spin(1500) + x


def arith_large(x: int) -> int:
    return spin(300_000) + x


def strings(x: int) -> int:
    """Build a string from hundreds of formatted pieces, as a report generator would."""
    parts = [f"{x}:{i:04d}:{'ab' * (i % 5)}" for i in range(400)]
    return len(",".join(parts).upper().replace("AB", "c"))


def dict_sort(x: int) -> int:
    """Count words in a seeded pseudo-text and sort them by frequency."""
    rng = random.Random(x)
    counts: dict[str, int] = {}
    for _ in range(1500):
        word = f"w{rng.randrange(300)}"
        counts[word] = counts.get(word, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ranked[0][1]


def big_list(values: list[int]) -> int:
    """Work over a 100,000-element list: the argument itself is the heavy part to send."""
    return sum(v * v % 7 for v in values)


def compute_for(seconds: float) -> float:
    """Compute in Python for ``seconds`` of this thread's CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
    return seconds


def inc(x: int) -> int:
    return x + 1


def tiny_20us(x: int) -> int:
    return spin(400) + x


def fail_5pct(x: int) -> int:
    """A short computing task that fails, deterministically, for one item in 20."""
    if x % 20 == 0:
        raise ValueError(f"item {x} is bad")
    return spin(3000) + x


# -- native code --------------------------------------------------------------------------


# random bytes mapped onto 12 letters and a space: about 3.7 bits a byte, so zlib has work
_TEXTLIKE = bytes(b"etaoinshrdl "[i % 12] for i in range(256))


@functools.cache
def blob(size: int) -> bytes:
    """Seeded text-like bytes, made once per process by native code, in milliseconds.

    Made in Python, the first call would hold the GIL for a long while and make the
    sampled task look like pure-Python work.
    """
    return hashlib.shake_256(str(size).encode()).digest(size).translate(_TEXTLIKE)


def sha256_large(x: int) -> str:
    # hashlib releases the GIL for data over 2047 bytes: the whole call runs without it
    digest = hashlib.sha256(blob(4 << 20))
    digest.update(x.to_bytes(4, "little"))
    return digest.hexdigest()


def zlib_large(x: int) -> int:
    # zlib.compress releases the GIL for the whole compression
    return len(zlib.compress(blob(1 << 20), 6)) + x


def sha256_steps(x: int) -> int:
    """Many tiny hashes: the GIL is free only for a moment in each, so threads can't scale."""
    buf = bytes([x % 256]) * 64
    acc = 0
    for i in range(1500):
        acc ^= hashlib.sha256(buf + i.to_bytes(4, "little")).digest()[0]
    return acc


_LOG_LINE = re.compile(r"(\d+)\.(\d+)\.(\d+)\.(\d+) - (GET|POST) (/\S*) (\d{3})")


def regex_steps(x: int) -> int:
    """Parse short log lines with a compiled pattern, one native call per line."""
    hits = 0
    for i in range(1500):
        line = f"10.0.{x % 256}.{i % 256} - GET /item/{i} {200 + i % 3}"
        match = _LOG_LINE.match(line)
        if match is not None and match.group(7) == "200":
            hits += 1
    return hits


# -- large arguments and results ----------------------------------------------------------


def sum_sample(data: bytes) -> int:
    """Light work over a 1 MB argument: what it costs to send dominates in processes."""
    return _light(data)


def make_megabyte(x: int) -> bytes:
    """Return 1 MB: what it costs to send back dominates in processes."""
    data = bytes([x % 256]) * (1 << 20)
    return data[:-1] + bytes([_light(data) % 256])


def _light(data: bytes) -> int:
    """About 2 ms of Python over a sample of ``data``: little next to sending 1 MB."""
    return sum(b & 7 for b in data[::16])


# -- waiting --------------------------------------------------------------------------------


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def compute_then_wait(x: int) -> int:
    compute_for(0.005)
    time.sleep(0.020)
    return x


def wait_then_compute(x: int) -> int:
    time.sleep(0.020)
    compute_for(0.005)
    return x


def mixed(x: int) -> int:
    """The demo's mixed class: about 12 ms of computing, then about 40 ms of waiting."""
    compute_for(0.012)
    time.sleep(0.040)
    return x


def fetch(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as response:
        return len(response.read())


def write_fsync(path: str) -> int:
    """Write 16 KB to a file of its own and wait until the disk has it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        written = os.write(fd, b"x" * 16384)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def run_true(x: int) -> int:
    return subprocess.run([_TRUE], check=True).returncode + x


def run_python(x: int) -> int:
    return subprocess.run([sys.executable, "-c", "pass"], check=True).returncode + x


_TRUE = shutil.which("true") or "/bin/true"


async def coro_sleep_short(x: int) -> int:
    await asyncio.sleep(0.001)
    return x


async def coro_sleep_long(x: int) -> int:
    await asyncio.sleep(0.05)
    return x


# -- setups ---------------------------------------------------------------------------------

# a server in its own interpreter: it prints its port, then serves a fixed body quietly
_SERVER = """
import http.server, sys
class Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"x" * 512
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


class _Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"x" * 512
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a line per request on stderr would drown the progress lines


@contextmanager
def server_process() -> Iterator[str]:
    """Start an HTTP server in a child interpreter; yield its URL; stop it by its pid."""
    proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def server_thread() -> Iterator[str]:
    """Serve HTTP from a daemon thread of this process, sharing its GIL with the client."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def scratch_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="escala-bench-") as path:
        yield path


# -- builders -------------------------------------------------------------------------------


def ints(n: int) -> Callable[[Any], list[int]]:
    return lambda _env: list(range(n))


def lognormal_lengths(_env: Any) -> list[float]:
    """120 CPU lengths, median 4 ms, a long tail capped at 120 ms, seeded."""
    rng = random.Random(7)
    return [min(0.120, rng.lognormvariate(-5.5, 1.0)) for _ in range(120)]


def random_waits(_env: Any) -> list[float]:
    rng = random.Random(11)
    return [rng.uniform(0.001, 0.030) for _ in range(80)]


def big_lists(_env: Any) -> list[list[int]]:
    # rotations of one list share its int objects: 60 lists cost 48 MB, not 200 MB
    base = list(range(100_000))
    return [base[k * 1000 :] + base[: k * 1000] for k in range(60)]


def megabytes(_env: Any) -> list[bytes]:
    # distinct objects: one object sent many times would be pickled once per batch
    return [bytes([k % 256]) * (1 << 20) for k in range(150)]


def warmed(size: int, n: int) -> Callable[[Any], list[int]]:
    """Items ``0..n-1``, the blob the task reads made beforehand in this process."""

    def build(_env: Any) -> list[int]:
        blob(size)
        return list(range(n))

    return build


def urls(n: int) -> Callable[[str], list[str]]:
    return lambda url: [f"{url}{i}" for i in range(n)]


def paths(n: int) -> Callable[[str], list[str]]:
    return lambda folder: [str(Path(folder) / f"f{i}") for i in range(n)]


def _cpu(name: str, fn: Callable[[Any], Any], build: Callable[[Any], list[Any]]) -> Workload:
    return Workload(name, "cpu (Python)", fn, build, threads=CPU_THREADS)


WORKLOADS: list[Workload] = [
    _cpu("arith-small", arith_small, ints(4000)),
    _cpu("arith-large", arith_large, ints(24)),
    _cpu("strings", strings, ints(3000)),
    _cpu("dict-sort", dict_sort, ints(1000)),
    _cpu("big-list-arg", big_list, big_lists),
    Workload("sha256-4MB", "native, GIL released", sha256_large, warmed(4 << 20, 140)),
    Workload("zlib-1MB", "native, GIL released", zlib_large, warmed(1 << 20, 10)),
    Workload(
        "sha256-64B-steps", "native, short steps", sha256_steps, ints(600), threads=CPU_THREADS
    ),
    Workload("regex-steps", "native, short steps", regex_steps, ints(300), threads=CPU_THREADS),
    Workload("few-long-2x0.4", "few long", compute_for, lambda _: [0.4, 0.4], threads=CPU_THREADS),
    Workload("few-long-4x0.25", "few long", compute_for, lambda _: [0.25] * 4, threads=CPU_THREADS),
    Workload("uneven-lognormal", "uneven", compute_for, lognormal_lengths, threads=CPU_THREADS),
    Workload("tiny-20k", "tiny", inc, ints(20_000), threads=CPU_THREADS),
    Workload("tiny-200k", "tiny", inc, ints(200_000), threads=CPU_THREADS),
    Workload("tiny-20us-20k", "tiny", tiny_20us, ints(20_000), threads=CPU_THREADS),
    Workload("args-1MB", "large data", sum_sample, megabytes, threads=CPU_THREADS),
    Workload("results-1MB", "large data", make_megabyte, ints(150), threads=CPU_THREADS),
    Workload("sleep-10ms", "blocking wait", sleep_for, lambda _: [0.01] * 200),
    Workload("sleep-1-30ms", "blocking wait", sleep_for, random_waits),
    Workload("http-process", "network", fetch, urls(600), setup=server_process),
    Workload("http-thread", "network", fetch, urls(800), setup=server_thread),
    Workload("fsync-16KB", "disk", write_fsync, paths(1000), setup=scratch_dir),
    Workload("spawn-true", "subprocess", run_true, ints(500)),
    Workload("spawn-python", "subprocess", run_python, ints(40)),
    Workload("coro-1ms", "coroutine", coro_sleep_short, ints(1000)),
    Workload("coro-50ms", "coroutine", coro_sleep_long, ints(25)),
    Workload("compute-then-wait", "cpu + wait", compute_then_wait, ints(40)),
    Workload("wait-then-compute", "cpu + wait", wait_then_compute, ints(40)),
    Workload("mixed-12ms-40ms", "cpu + wait", mixed, ints(24)),
    Workload("fail-5pct", "failing", fail_5pct, ints(2000), threads=CPU_THREADS, errors="collect"),
]
