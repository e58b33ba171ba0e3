"""escala serve under floods: /healthz latency during each, and how soon it recovers after.

Run from the repository root::

    .venv/bin/python benchmarks/bench_floods.py [--seconds 5] [--markdown PATH]

The floods of the reachability issue, each from a process of its own (so that the
flood's CPU does not slow the probes' process), against a fresh server:

1. idle: silent connections, more than the server's descriptor limit (set low for it);
2. slowloris: connections sending their request head a byte every 100 ms;
3. reads: 300 closed-loop clients polling one job's state;
4. streams: 500 server-sent-event streams on a running job.

/healthz is probed on a new connection every 10 ms meanwhile; the target is 100 ms at
most (p99) during every flood, and a normal answer (health, a run, a job) within a second
after it ends. Every loop is bounded in time; every server is stopped by its own pid.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from benchlib import Table, machine_line, markdown, show, verdict

APP = "escala.service.examples"
TARGET = 0.100  # /healthz p99 during a flood, seconds
RECOVERY = 1.0  # seconds after it ends
EVERY = 0.010  # seconds between two probes

FLOOD = textwrap.dedent(
    r"""
    import asyncio, contextlib, json, sys, time

    kind, host, port, path, count, seconds = sys.argv[1:7]
    port, count, seconds = int(port), int(count), float(seconds)
    answers = {}

    async def idle(deadline):
        writer = (await asyncio.open_connection(host, port))[1]
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        writer.close()

    async def slow(deadline):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode())
        while time.monotonic() < deadline and not reader.at_eof():
            writer.write(b"X")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(65536), 0.1)
        writer.close()

    async def reads(deadline):
        reader, writer = await asyncio.open_connection(host, port)
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        while time.monotonic() < deadline:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            status = head.split(b" ", 2)[1].decode()
            answers[status] = answers.get(status, 0) + 1
            size = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(size)
        writer.close()

    async def stream(deadline):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = head.split(b" ", 2)[1].decode()
        answers[status] = answers.get(status, 0) + 1
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        writer.close()

    async def main():
        deadline = time.monotonic() + seconds
        flood = {"idle": idle, "slow": slow, "reads": reads, "streams": stream}[kind]
        clients = [asyncio.ensure_future(flood(deadline)) for _ in range(count)]
        print("flooding", flush=True)
        done = await asyncio.gather(*clients, return_exceptions=True)
        answers["errors"] = sum(isinstance(d, BaseException) for d in done)

    asyncio.run(main())
    print(json.dumps(answers), flush=True)
    """
)


@contextmanager
def server(folder: Path, *flags: str, fd_limit: int | None = None) -> Iterator[tuple[str, int]]:
    """``escala serve`` of the example tasks on a free loopback port; yield its address."""
    db = folder / f"escala-{time.monotonic_ns()}.db"
    argv = [sys.executable, "-m", "escala.cli", "serve", "--app", APP, "--no-auth"]
    argv += ["--port", "0", "--db", str(db), *flags]

    def limit() -> None:
        if fd_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    child = subprocess.Popen(
        argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, preexec_fn=limit
    )
    assert child.stderr is not None
    lines: list[str] = []
    found = threading.Event()

    def drain() -> None:
        assert child.stderr is not None
        for line in child.stderr:
            lines.append(line)
            if "listening on" in line:
                found.set()
        found.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        if not found.wait(60):
            raise RuntimeError("escala serve did not start:\n" + "".join(lines))
        url = re.search(r"listening on http://(\S+):(\d+)", "".join(lines))
        assert url is not None, "".join(lines)
        yield url.group(1), int(url.group(2))
    finally:
        child.terminate()
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(30)
        reader.join(10)
        child.stderr.close()


def probe(address: tuple[str, int], path: str = "/healthz", body: bytes = b"") -> int:
    """One request on a new connection; return its status (0: no answer)."""
    method = "POST" if body else "GET"
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    try:
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(head.encode() + b"\r\n" + body)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return int(answer.split(b" ", 2)[1])
    except (OSError, IndexError, ValueError):
        return 0


def recovered(address: tuple[str, int], within: float = 10.0) -> float:
    """Seconds until health, a run and a job are all answered as usual (polling)."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if (
            probe(address) == 200
            and probe(address, "/v1/run/echo", b'{"args": [1]}') == 200
            and probe(address, "/v1/jobs", b'{"task": "noop"}') == 202
        ):
            return time.monotonic() - started
    return math.inf


def flood(address: tuple[str, int], kind: str, count: int, path: str, seconds: float) -> Any:
    """Run one flood in a child process, probing /healthz meanwhile; return the figures."""
    host, port = address
    argv = [sys.executable, "-c", FLOOD, kind, host, str(port), path, str(count), str(seconds)]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    try:
        child.stdout.readline()  # "flooding": its clients are on their way
        times: list[float] = []
        failed = 0
        while child.poll() is None:
            began = time.perf_counter()
            if probe(address) != 200:
                failed += 1
            times.append(time.perf_counter() - began)
            with suppress(subprocess.TimeoutExpired):
                child.wait(EVERY)  # pace the probes until the flood ends
        answers = json.loads(child.stdout.read() or "{}")
    finally:
        child.kill()
        child.wait(30)
        child.stdout.close()
    ordered = sorted(times) or [math.inf]
    return {
        "probes": len(times),
        "failed": failed,
        "p50": ordered[len(ordered) // 2],
        "p99": ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)],
        "max": ordered[-1],
        "answers": answers,
        "recovery": recovered(address),
    }


def job(address: tuple[str, int], body: bytes) -> str:
    """Submit a job; return its id."""
    with socket.create_connection(address, timeout=10) as sock:
        head = "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    found = re.search(rb'"id":"(\w+)"', answer)
    assert found is not None, answer
    return found.group(1).decode()


# name, the server's descriptor limit, and the flood: kind, clients, path (given the server)
FLOODS: list[tuple[str, int | None, Callable[[tuple[str, int]], tuple[str, int, str]]]] = [
    ("1,100 idle connections, descriptor limit 1,024", 1024, lambda a: ("idle", 1100, "/")),
    ("200 slowloris connections", None, lambda a: ("slow", 200, "/healthz")),
    (
        "300 clients polling one job",
        None,
        lambda a: ("reads", 300, "/v1/jobs/" + job(a, NOOP)),
    ),
    (
        "500 event streams",
        None,
        lambda a: ("streams", 500, f"/v1/jobs/{job(a, NAP)}/events"),
    ),
]
NOOP = b'{"task": "noop"}'
NAP = b'{"task": "nap", "args": [60]}'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="each flood's length")
    parser.add_argument("--markdown", metavar="PATH", help="write the results section here")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 and (hard == resource.RLIM_INFINITY or hard >= 4096):
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))  # the floods' children
    header = [f"- Machine: {machine_line()}", f"- Each flood: {args.seconds:g} s"]
    print("\n".join(header) + "\n")
    table = Table(
        "/healthz during floods, on a new connection every 10 ms",
        ["flood", "probes", "failed", "p50", "p99", "max", "the flood's answers", "recovered"],
    )
    with tempfile.TemporaryDirectory(prefix="bench-floods-") as tmp:
        for name, fd_limit, what in FLOODS:
            with server(Path(tmp), "--header-timeout", "3", fd_limit=fd_limit) as address:
                kind, count, path = what(address)
                got = flood(address, kind, count, path, args.seconds)
            ms = [f"{got[key] * 1000:.1f} ms" for key in ("p50", "p99", "max")]
            answers = ", ".join(f"{k}: {v}" for k, v in got["answers"].items())
            recovery = got["recovery"]
            row = [name, str(got["probes"]), str(got["failed"]), *ms, answers]
            table.rows.append([*row, f"{recovery * 1000:.0f} ms"])
            p99 = got["p99"]
            table.targets.append((f"{name}: /healthz p99 <= 100 ms", ms[1], verdict(p99, TARGET)))
            after = f"{name}: answers normally within 1 s after"
            table.targets.append((after, f"{recovery:.2f} s", verdict(recovery, RECOVERY)))
    show(table)
    for target, measured, result in table.targets:
        print(f"{result:>16}  {target}: {measured}")
    if args.markdown:
        Path(args.markdown).write_text(markdown([table], header))


if __name__ == "__main__":
    main()
