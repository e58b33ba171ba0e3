"""Ctrl-C: a real SIGINT to a real Python process running a map, in every mode.

The child prints the pid of each worker process and the names of its threads as tasks
start, then the tasks block. The test waits for those lines (no sleeping), sends SIGINT,
and checks that KeyboardInterrupt reached the child's main code promptly and that every
worker process is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

CHILD = textwrap.dedent(
    r"""
    import asyncio, os, sys, threading, time
    import escala

    MODE = sys.argv[1]

    def report():
        # one write per line: print() from several threads can interleave its pieces
        sys.stdout.write(f"started {os.getpid()} {threading.current_thread().name}\n")
        sys.stdout.flush()

    def block(x):
        report()
        time.sleep(3600)

    async def ablock(x):
        report()
        await asyncio.sleep(3600)

    try:
        escala.map(ablock if MODE == "async" else block, range(4), mode=MODE, workers=2)
    except KeyboardInterrupt:
        print(f"interrupted {time.monotonic()}", flush=True)
        print(f"threads {sorted(t.name for t in threading.enumerate())}", flush=True)
        sys.exit(42)
    """
)


@pytest.mark.parametrize("how", ["sequential", "threads", "processes", "async"])
def test_ctrl_c_reaches_the_caller_and_leaves_nothing(how: str) -> None:
    expected = 1 if how == "sequential" else 2
    child, started, sent, out, err = _ctrl_c(CHILD, how, expected)
    assert all(line.startswith("started") for line in started), started
    worker_pids = {int(line.split()[1]) for line in started} - {child.pid}
    assert child.returncode == 42, err
    interrupted = float(out.split("interrupted ")[1].split()[0])
    # "within about a second": generous here so a slow machine cannot fail it
    assert interrupted - sent < 10
    threads_line = next(line for line in out.splitlines() if line.startswith("threads"))
    if how in ("processes", "async"):
        assert "escala-" not in threads_line  # the manager / loop thread stopped
    for pid in worker_pids:
        assert not _alive(pid), f"worker {pid} outlived Ctrl-C"


# A task's own KeyboardInterrupt is its outcome; a real Ctrl-C afterwards must still stop
# the run. On the main thread (sequential, and async def tasks run by map) both are the
# same exception: escala tells them apart by counting SIGINTs.
AFTER_A_TASKS_OWN = textwrap.dedent(
    r"""
    import asyncio, sys, time
    import escala

    MODE = sys.argv[1]

    def task(x):
        if x == 1:
            raise KeyboardInterrupt("the task's own")
        if x == 3:
            sys.stdout.write("blocking\n")
            sys.stdout.flush()
            time.sleep(3600)
        return x

    async def atask(x):
        if x == 1:
            raise KeyboardInterrupt("the task's own")
        if x == 3:
            sys.stdout.write("blocking\n")
            sys.stdout.flush()
            await asyncio.sleep(3600)
        return x

    try:
        escala.map(atask if MODE == "async" else task, range(5), mode=MODE, workers=1,
                   errors="collect")
    except KeyboardInterrupt as exc:
        print(f"interrupted {exc!r}", flush=True)
        sys.exit(42)
    print("collected the Ctrl-C as a task's outcome", flush=True)
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["sequential", "async"])
def test_ctrl_c_after_a_tasks_own_keyboard_interrupt_still_stops(how: str) -> None:
    child, started, _, out, err = _ctrl_c(AFTER_A_TASKS_OWN, how, 1)
    assert started == ["blocking\n"]  # task #1's KeyboardInterrupt is past
    assert child.returncode == 42, out + err
    assert "the task's own" not in out  # the real one reached the caller, not task #1's


def _ctrl_c(
    script: str, arg: str, lines: int
) -> tuple[subprocess.Popen[str], list[str], float, str, str]:
    """Run ``script`` in a child interpreter, read ``lines`` lines, then send it SIGINT.

    Returns the child (ended), the lines read before the signal, when it was sent, and
    what the child wrote after.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", script, arg],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert child.stdout is not None
        started = [child.stdout.readline() for _ in range(lines)]
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return child, started, sent, out, err


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


ORPHANING = textwrap.dedent(
    r"""
    import os, sys, time
    import escala

    def block(x):
        sys.stdout.write(f"started {os.getpid()}\n")
        sys.stdout.flush()
        time.sleep(3600)

    escala.map(block, range(2), mode="processes", workers=2, start_method=sys.argv[1])
    """
)


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_workers_do_not_outlive_a_killed_parent(method: str) -> None:
    """kill -9 of the program: nobody stops the workers, so they must notice and exit."""
    child = subprocess.Popen(
        [sys.executable, "-c", ORPHANING, method], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    try:
        lines = [child.stdout.readline() for _ in range(2)]
        assert all(line.startswith("started") for line in lines), lines
        workers = {int(line.split()[1]) for line in lines}
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    deadline = time.monotonic() + 20  # the backstop check runs every 5 s
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling another process's exit: nothing to wait on
    survivors = [pid for pid in workers if _alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"workers {survivors} outlived their parent"
