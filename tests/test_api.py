"""The public face: the exported names, and clear errors for option mistakes."""

from __future__ import annotations

import os

import psutil
import pytest

import escala

EXPECTED = {
    "MODES",
    "Advice",
    "BrokenWorker",
    "EngineMissing",
    "EscalaError",
    "Options",
    "Outcome",
    "Pool",
    "PoolClosed",
    "RemoteError",
    "RemoteTraceback",
    "Retry",
    "SendError",
    "TaskError",
    "TaskTimeout",
    "WorkerDied",
    "advise",
    "aimap",
    "amap",
    "imap",
    "map",
    "task",
    "usable_cpus",
    "worker_state",
}


def test_exported_members() -> None:
    """The public surface changes only on purpose: update this list when it does."""
    assert set(escala.__all__) == EXPECTED
    for name in EXPECTED:
        assert getattr(escala, name) is not None
    public = {name for name in vars(escala) if not name.startswith("_")}
    assert public - EXPECTED <= {
        "annotations",
        "advisor",
        "backends",
        "bench",
        "load",
        "service",
        "store",
    }


def test_modes() -> None:
    assert escala.MODES == ("sequential", "threads", "processes", "async")


def test_error_tree() -> None:
    assert issubclass(escala.TaskTimeout, escala.TaskError)
    assert issubclass(escala.TaskTimeout, TimeoutError)
    assert issubclass(escala.WorkerDied, escala.TaskError)
    assert issubclass(escala.SendError, escala.TaskError)
    assert issubclass(escala.RemoteError, escala.TaskError)
    assert issubclass(escala.TaskError, escala.EscalaError)
    assert issubclass(escala.PoolClosed, escala.EscalaError)
    assert issubclass(escala.EngineMissing, ImportError)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"mode": "gpu"}, ValueError, "unknown mode 'gpu'"),
        ({"workers": 0}, ValueError, "workers must be 1 or more"),
        ({"workers": 2.5}, TypeError, "workers must be a positive int"),
        ({"batch": 0}, ValueError, "batch must be 1 or more"),
        ({"timeout": -1}, ValueError, "timeout must be a number of seconds > 0"),
        ({"timeout": float("inf")}, ValueError, "timeout must be"),
        ({"retries": -2}, ValueError, "retries must be 0 or more"),
        ({"errors": "ignore"}, ValueError, "errors must be 'raise' or 'collect'"),
        ({"worker": 4}, TypeError, "did you mean 'workers'"),
        ({"initializer": 3}, TypeError, "initializer must be callable"),
        ({"initargs": [1]}, TypeError, "initargs must be a tuple"),
        ({"start_method": "clone"}, ValueError, "start_method must be"),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(v),
)
def test_option_mistakes_are_named_before_any_work(
    kwargs: dict[str, object], error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        escala.map(abs, [1], **kwargs)  # type: ignore[call-overload]
    with pytest.raises(error, match=words):
        escala.imap(abs, [1], **kwargs)  # type: ignore[arg-type]


def test_bad_function_and_items() -> None:
    with pytest.raises(TypeError, match="fn must be callable"):
        escala.map(3, [1])  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="items must be an iterable"):
        escala.map(abs, 5)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="items must be an iterable"):
        escala.imap(abs, 5)  # type: ignore[arg-type]


def test_options_object_and_keywords_combine() -> None:
    base = escala.Options(mode="threads", workers=2, timeout=5)
    assert escala.map(abs, [-1, -2], options=base, workers=3) == [1, 2]
    with pytest.raises(AttributeError):
        base.workers = 4  # type: ignore[misc]


def test_default_mode_fits_the_function() -> None:
    """Coroutine functions run on an event loop; plain functions are measured (auto)."""
    import asyncio

    async def coro(x: int) -> bool:
        return asyncio.get_running_loop().is_running()  # awaited on an event loop

    assert escala.map(coro, [1]) == [True]
    assert escala.map(abs, [-1, -2, -3]) == [1, 2, 3]


def _siblings(_: object) -> set[int]:
    """The pids of the processes the parent of this worker has."""
    return {child.pid for child in psutil.Process(os.getppid()).children()}


@pytest.mark.parametrize(("mode", "kind"), [("processes", "processes"), ("threads", "threads")])
def test_absurd_worker_counts_are_refused_at_the_call(mode: str, kind: str) -> None:
    with pytest.raises(ValueError, match=rf"workers=1,000,000 would start 1,000,000 {kind}"):
        escala.map(abs, range(3), mode=mode, workers=10**6)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="at most"):
        escala.Pool(mode, workers=10**6)  # type: ignore[arg-type]


def test_a_run_starts_no_more_processes_than_it_has_items() -> None:
    before = {child.pid for child in psutil.Process().children()}
    seen = escala.map(_siblings, range(3), mode="processes", workers=200)
    assert len(set().union(*seen) - before) <= 3
