"""Shared fixtures: every mode as a parameter, and a check that nothing is left behind."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Collection, Iterator

import psutil
import pytest
from hypothesis import HealthCheck, settings

import escala

# Hypothesis: no per-example deadline (a process pool starts in each example), fewer
# examples on CI, where the whole suite shares two cores.
settings.register_profile(
    "default",
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("ci", parent=settings.get_profile("default"), max_examples=15)
settings.load_profile("ci" if os.environ.get("CI") else "default")

ALL_MODES = list(escala.MODES)
# Processes that multiprocessing keeps for the life of the interpreter, by design.
_HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")


@pytest.fixture(params=ALL_MODES)
def mode(request: pytest.FixtureRequest) -> str:
    """Each behaviour test runs once per execution model, with the mode as its id."""
    return str(request.param)


@pytest.fixture(params=[m for m in ALL_MODES if m != "sequential"])
def concurrent_mode(request: pytest.FixtureRequest) -> str:
    """The modes that run several tasks at once."""
    return str(request.param)


def _children(owned_by: Collection[int] = ()) -> set[int]:
    """Return our descendants, but those of ``owned_by`` (long-lived fixtures' processes,
    such as a server started once per module, whose workers come and go as it sees fit)."""
    found = set()
    me = os.getpid()
    for child in psutil.Process().children(recursive=True):
        try:
            if owned_by and any(p.pid in owned_by for p in child.parents() if p.pid != me):
                continue
            if child.status() == psutil.STATUS_ZOMBIE:
                found.add(child.pid)  # an unreaped child is a leak too
                continue
            cmdline = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if not any(helper in cmdline for helper in _HELPERS):
            found.add(child.pid)
    return found


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive()}


@pytest.fixture(autouse=True)
def nothing_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a worker process or thread running after it returns.

    Threads that finish a task escala could not stop (threads and sequential mode) need a
    moment to exit after the test releases them, so the check waits, up to a limit, for
    the counts to come back; it polls because there is nothing to wait on for "a thread
    someone else started has exited".
    """
    threads_before = _threads()
    children_before = _children()
    yield
    deadline = time.monotonic() + 10
    while True:
        threads = _threads() - threads_before
        children = _children(owned_by=children_before) - children_before
        if not threads and not children:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    names = sorted(t.name for t in threads)
    pytest.fail(f"left behind: threads {names}, child processes {sorted(children)}")
