"""Helpers for the service's tests: a real ``escala serve`` in a subprocess, and its app.

The server listens on 127.0.0.1 on a free port (``--port 0``); the tests learn the port
from the line it announces. It is stopped by its own pid.
"""

from __future__ import annotations

import os
import pathlib
import re
import resource
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

APP = textwrap.dedent(
    '''
    """Tasks of the service's tests."""
    import asyncio
    import os
    import time

    import escala
    import escala.service

    _gates: dict[str, asyncio.Event] = {}


    def _gate(name):
        return _gates.setdefault(name, asyncio.Event())


    @escala.task(kind="io")
    async def hold(name: str) -> str:
        """Wait until release(name) runs."""
        await _gate(name).wait()
        return name


    @escala.task(kind="io")
    async def release(name: str) -> None:
        _gate(name).set()


    @escala.task(kind="io")
    async def steps(name: str) -> str:
        """Wait for release(name), then report progress twice."""
        await _gate(name).wait()
        escala.service.report_progress(0.5, "half way")
        escala.service.report_progress(1.0, "done")
        return name


    @escala.task(kind="io")
    async def echo(value=None):
        return value


    @escala.task(kind="io")
    async def nap(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds


    @escala.task(kind="io")
    async def trusting_nap(seconds: str) -> float:
        """Sleep float(seconds), unchecked: "nan" reaches the event loop's timers."""
        await asyncio.sleep(float(seconds))
        return float(seconds)


    @escala.task(kind="io")
    async def boom(message: str = "boom") -> None:
        raise ValueError(message)


    @escala.task(kind="cpu")
    def square(x: int) -> int:
        return x * x


    @escala.task(kind="cpu")
    def spin(seconds: float) -> int:
        deadline = time.perf_counter() + seconds
        n = 0
        while time.perf_counter() < deadline:
            n += 1
        return n


    @escala.task(kind="cpu")
    def not_json() -> object:
        return {1, 2}


    @escala.task(kind="io")
    async def exits() -> None:
        """sys.exit() on the event loop, which asyncio would re-raise out of it."""
        raise SystemExit(3)


    @escala.task(kind="cpu")
    def exits_in_a_process() -> None:
        raise SystemExit(4)


    @escala.task(kind="cpu")
    def out_of_items() -> None:
        """Raise StopIteration, which an asyncio future refuses to carry."""
        raise StopIteration("out of items")


    @escala.task(kind="io")
    def interrupts_a_thread() -> None:
        """KeyboardInterrupt raised by a job on a thread (it once lost the thread)."""
        raise KeyboardInterrupt("raised by the job")


    @escala.task(kind="cpu")
    def interrupts_a_process() -> None:
        raise KeyboardInterrupt("raised by the job")


    @escala.task(kind="io")
    async def closes_itself() -> None:
        raise GeneratorExit()


    @escala.task(kind="io")
    async def cancels_itself() -> None:
        """A CancelledError with nobody cancelling: the job's failure, not a cancel."""
        raise asyncio.CancelledError()


    @escala.task(kind="io")
    def take_the_server_down() -> None:
        """A poison job: runs on a thread of the server, and ends the server."""
        os._exit(3)


    @escala.task(kind="cpu")
    def pid() -> int:
        return os.getpid()


    @escala.task(kind="io")
    async def mark(folder: str, n: int) -> int:
        """Leave a mark for job n: a second run of the same job fails."""
        os.close(os.open(os.path.join(folder, str(n)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        await asyncio.sleep(0.01)
        return n


    @escala.task(kind="io")
    async def first_run_hangs(marker: str) -> str:
        """Hang the first time (its node is killed under it); return at once after."""
        if os.path.exists(marker):
            return "ran again"
        open(marker, "w").close()
        await asyncio.sleep(3600)
        return "first run"
    '''
)


def write_app(folder: pathlib.Path, name: str = "svcapp") -> pathlib.Path:
    """Write the tests' app module into ``folder``."""
    (folder / f"{name}.py").write_text(APP)
    return folder


def escala(cwd: pathlib.Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the escala command in ``cwd`` and return what it did."""
    return subprocess.run(
        [sys.executable, "-m", "escala.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "NO_COLOR": "1"},
    )


def add_key(cwd: pathlib.Path, user: str, *args: str, db: str = "escala.db") -> str:
    """Make an API key for ``user`` with ``escala keys add`` and return it."""
    done = escala(cwd, "keys", "--db", db, "add", user, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


class Server:
    """``escala serve`` in a subprocess, on a free loopback port; or ``escala worker``.

    A server's ``url`` is where it listens; a worker's ``name`` is its owner name on jobs.
    ``fd_limit`` sets its descriptor limit, soft and hard, so that it cannot raise it.
    """

    def __init__(
        self,
        cwd: pathlib.Path,
        *args: str,
        app: str = "svcapp",
        db: str = "escala.db",
        command: str = "serve",
        fd_limit: int | None = None,
    ):
        self.cwd = cwd
        self.log: list[str] = []
        if command == "serve":
            argv = ["serve", "--app", app, "--port", "0", "--db", db, *args]
            ready = r"listening on (http://\S+)"
        else:
            argv = [command, "--app", app, *args]
            ready = r"escala worker (\S+):"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "escala.cli", *argv],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "NO_COLOR": "1", "PYTHONFAULTHANDLER": "1"},
            preexec_fn=None if fd_limit is None else _limit_descriptors(fd_limit),
        )
        self.url = self.name = ""
        announced = threading.Event()
        assert self.process.stderr is not None
        stderr = self.process.stderr

        def drain() -> None:
            # reads until the server exits, so that its stderr pipe never fills up
            for line in stderr:
                self.log.append(line)
                found = re.search(ready, line)
                if found:
                    self.url = self.name = found.group(1)
                    announced.set()
            announced.set()

        self._reader = threading.Thread(target=drain, name="server-log", daemon=True)
        self._reader.start()
        if not announced.wait(60) or not self.url:
            self.kill()
            raise RuntimeError(f"escala {command} did not start:\n" + "".join(self.log))

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self, key: str | None = None, timeout: float = 30) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as an orchestrator would; return the exit status.

        A node still running after ``timeout`` gets SIGABRT, on which faulthandler
        (``PYTHONFAULTHANDLER``) prints every thread's stack, and the test fails with
        its log: a hang at shutdown shows where it hung.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGABRT)
            self.process.wait(30)
            self._close()
            raise AssertionError(
                f"escala did not stop within {timeout} s of SIGTERM:\n{self.text()}"
            ) from None
        self._close()
        return code

    def kill(self) -> None:
        """kill -9: no chance to clean up."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
        self._close()

    def _close(self) -> None:
        self._reader.join(10)
        if self.process.stderr is not None:
            self.process.stderr.close()

    def text(self) -> str:
        return "".join(self.log)


def _limit_descriptors(limit: int) -> Callable[[], None]:
    def limit_them() -> None:  # runs in the child, between fork and exec
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return limit_them


@contextmanager
def serving(cwd: pathlib.Path, *args: str, **kwargs: Any) -> Iterator[Server]:
    """Run a server for the block, and stop it (SIGTERM, then kill) after."""
    server = Server(cwd, *args, **kwargs)
    try:
        yield server
    finally:
        try:
            server.stop(60)
        finally:
            server.kill()
