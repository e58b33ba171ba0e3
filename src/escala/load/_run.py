"""Running a spec: in this process, or fanned out over escala's own process pool.

::

    run(spec) ──▶ one process? ──yes──▶ asyncio.run(drive(share)) ───────────────┐
                     │ no                                                         │
                     ▼                                                            ▼
          escala.Pool(mode="processes")                                  Recorder(s)
          submit(generate, share k) for k in 0..P-1                          │ add
            each: its own event loop, 1/P of the rate (staggered)            ▼
            or of the users, 1/P of the in-flight cap and the count      LoadReport
          parent: Board (see _board.py): ready → go → progress → stop

One event loop per process is the fastest a Python generator gets: the GIL makes threads
in one process share a core, and a loop drives thousands of connections on its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import math
import time
from collections.abc import Callable

from .. import Pool  # escala's own Pool, through its public face
from .._worker.cpu import usable_cpus
from ._board import Board, Field, Snapshot
from ._closed import run_closed
from ._open import run_open
from ._record import Recorder, Verdict
from ._report import LoadReport
from ._request import cancel_all, ensure_allowed, open_session
from ._spec import LoadError, LoadSpec, Model

__all__ = ["LoadProgress", "arun", "processes_for", "run"]

# What one generator process is given by default: a share of the rate it sends with time
# to spare (it sustains several times more against a fast server), or of the users.
PER_PROCESS_RATE = 1000.0
# How often a process publishes its counters, and the parent or loop shows them.
_PUBLISH = 0.1
_SHOW = 0.25
# Processes start their schedules together this long after the last one is ready.
_GO_DELAY = 0.05
_READY_TIMEOUT = 60.0


@dataclasses.dataclass(frozen=True)
class LoadProgress:
    """Where a run stands, for a live progress line.

    Attributes:
        elapsed: seconds since the run started sending (0 while processes start).
        duration: seconds it will send for.
        counts: the counters of every process, added up (a tenth of a second old).
    """

    elapsed: float
    duration: float
    counts: Snapshot


@dataclasses.dataclass(frozen=True)
class _Share:
    """One process's part of a run."""

    spec: LoadSpec  # its rate or users, its count and in-flight cap
    slot: int
    slots: int
    offset: float = 0.0  # its first intended send after t0
    seed: int | None = None
    board: str | None = None  # the shared board's path; None: run in this process


def processes_for(spec: LoadSpec) -> int:
    """Return how many generator processes run ``spec``.

    ``spec.processes`` if given; otherwise one per 1,000 requests/s of the rate (open
    model) or one per user (closed), at most the usable cores. Never more processes than
    users, requests or in-flight slots to share out.
    """
    if spec.processes is not None:
        wanted = spec.processes
    elif spec.rate is not None:
        wanted = min(usable_cpus(), math.ceil(spec.rate / PER_PROCESS_RATE))
    else:
        wanted = usable_cpus()
    bounds = [wanted, spec.limit]
    if spec.model is Model.OPEN:
        bounds.append(spec.max_inflight)
    else:
        assert spec.users is not None
        bounds.append(spec.users)
    return max(1, min(bounds))


def planned_span(spec: LoadSpec) -> float:
    """Seconds the open model's schedule sends for: the duration, or less with a count."""
    if spec.rate is None:
        return spec.duration
    return min(spec.duration, spec.limit / spec.rate)


def run(spec: LoadSpec, *, progress: Callable[[LoadProgress], None] | None = None) -> LoadReport:
    """Run ``spec`` and return what it measured; Ctrl-C returns the partial report.

    Args:
        spec: the run.
        progress: called a few times a second with where the run stands.

    Raises:
        LoadError: the target is not allowed (see :class:`LoadSpec`'s ``allow_remote``).
    """
    ensure_allowed(spec)
    count = processes_for(spec)
    if count == 1:
        return _run_here(spec, progress)
    return _run_fanned(spec, count, progress)


async def arun(
    spec: LoadSpec, *, progress: Callable[[LoadProgress], None] | None = None
) -> LoadReport:
    """Run ``spec`` on the running event loop, in this process, and return its report.

    Raises:
        LoadError: the spec asks for several processes, or the target is not allowed.
    """
    if spec.processes not in (None, 1):
        raise LoadError("arun() runs on the caller's event loop: use run() for processes")
    ensure_allowed(spec)
    recorder = Recorder(spec.duration)
    board = Board(1)
    try:
        await _drive(_Share(spec, 0, 1), recorder, board, progress)
    finally:
        board.close()
    return LoadReport(spec, 1, recorder, planned_span(spec))


def _run_here(spec: LoadSpec, progress: Callable[[LoadProgress], None] | None) -> LoadReport:
    recorder = Recorder(spec.duration)
    board = Board(1)
    interrupted = False
    try:
        asyncio.run(_drive(_Share(spec, 0, 1), recorder, board, progress))
    except KeyboardInterrupt:
        # asyncio.run cancelled the run, which left its figures in the recorder
        interrupted = True
    finally:
        board.close()
    return LoadReport(spec, 1, recorder, planned_span(spec), interrupted)


def _run_fanned(
    spec: LoadSpec, count: int, progress: Callable[[LoadProgress], None] | None
) -> LoadReport:

    board = Board(count, shared=True)
    assert board.path is not None
    shares = _shares(spec, count, board.path)
    interrupted = False
    try:
        with Pool(mode="processes", workers=count) as pool:
            futures = [pool.submit(generate, share) for share in shares]
            try:
                _wait_ready(board, futures)
                board.go(_GO_DELAY)
                started = time.monotonic() + _GO_DELAY
                while not all(future.done() for future in futures):
                    concurrent.futures.wait(
                        futures, timeout=_SHOW, return_when=concurrent.futures.FIRST_EXCEPTION
                    )
                    if any(f.done() and f.exception() for f in futures):
                        board.stop()
                        break
                    if progress is not None:
                        elapsed = max(0.0, time.monotonic() - started)
                        progress(LoadProgress(elapsed, spec.duration, board.total()))
            except KeyboardInterrupt:
                # every process stops sending and hands back what it has
                interrupted = True
                board.stop()
            concurrent.futures.wait(futures, timeout=spec.timeout + 30)
            recorders = [future.result(timeout=0) for future in futures]
    finally:
        board.close()
    total = Recorder(spec.duration)
    for recorder in recorders:
        total.add(recorder)
    return LoadReport(spec, count, total, planned_span(spec), interrupted)


def _wait_ready(board: Board, futures: list[concurrent.futures.Future[Recorder]]) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT
    while board.total().ready < board.slots:
        failed = [f for f in futures if f.done()]
        if failed:
            failed[0].result()  # raises what went wrong in the process
            raise LoadError("a generator process ended before it started sending")
        if time.monotonic() > deadline:
            board.stop()
            raise LoadError(f"the generator processes did not start in {_READY_TIMEOUT:g} s")
        concurrent.futures.wait(futures, timeout=0.005)


def _shares(spec: LoadSpec, count: int, path: str) -> list[_Share]:
    shares = []
    for k in range(count):
        changes: dict[str, object] = {"processes": 1, "requests": _part(spec.limit, count, k)}
        offset = 0.0
        if spec.rate is not None:
            changes["rate"] = spec.rate / count
            changes["max_inflight"] = _part(spec.max_inflight, count, k)
            # staggered starts: together the processes send one every 1/rate seconds
            offset = k / spec.rate
        else:
            assert spec.users is not None
            changes["users"] = _part(spec.users, count, k)
        seed = None if spec.seed is None else spec.seed + k
        shares.append(
            _Share(dataclasses.replace(spec, **changes), k, count, offset, seed, path)  # type: ignore[arg-type]
        )
    return shares


def _part(total: int, count: int, k: int) -> int:
    return total // count + (1 if k < total % count else 0)


def generate(share: _Share) -> Recorder:
    """Run one process's share on its own event loop; what a pool worker is given."""
    assert share.board is not None
    board = Board.attach(share.board, share.slots)
    recorder = Recorder(share.spec.duration)
    try:
        asyncio.run(_drive(share, recorder, board))
    finally:
        board.close()
    return recorder


async def _drive(
    share: _Share,
    recorder: Recorder,
    board: Board,
    progress: Callable[[LoadProgress], None] | None = None,
) -> None:
    spec = share.spec
    loop = asyncio.get_running_loop()
    connections = spec.max_inflight if spec.model is Model.OPEN else (spec.users or 1)
    async with open_session(spec, connections) as session:
        if share.board is None:
            t0 = loop.time()
        else:
            board.write(share.slot, Field.READY, 1)
            start = await _wait_go(board, loop)
            if start is None:
                return
            t0 = start
        if spec.model is Model.OPEN:
            work = run_open(spec, session, recorder, t0=t0, offset=share.offset, seed=share.seed)
        else:
            work = run_closed(spec, session, recorder, t0=t0)
        runner = loop.create_task(work)
        watcher = loop.create_task(_watch(share, recorder, board, runner, t0, progress))
        try:
            await asyncio.wait({runner})
            if not (runner.cancelled() and board.stopped):
                runner.result()
        finally:
            await cancel_all({runner, watcher})
            _publish(share.slot, recorder, board)


async def _wait_go(board: Board, loop: asyncio.AbstractEventLoop) -> float | None:
    """Wait for the parent's go; return it as event-loop time (None: asked to stop)."""
    deadline = loop.time() + _READY_TIMEOUT
    while True:
        go = board.go_at()
        if go is not None:
            return loop.time() + (go - time.time_ns()) / 1e9
        if board.stopped:
            return None
        if loop.time() > deadline:
            raise LoadError(f"the parent did not say go within {_READY_TIMEOUT:g} s")
        # a millisecond of polling, once per process per run: nothing else to wait on
        # across processes that asyncio could watch
        await asyncio.sleep(0.001)


async def _watch(
    share: _Share,
    recorder: Recorder,
    board: Board,
    runner: asyncio.Task[None],
    t0: float,
    progress: Callable[[LoadProgress], None] | None,
) -> None:
    """Publish the counters, show progress, and stop the run when the parent asks."""
    loop = asyncio.get_running_loop()
    shown = loop.time()
    while True:
        await asyncio.sleep(_PUBLISH)
        _publish(share.slot, recorder, board)
        if board.stopped:
            runner.cancel()
            return
        if progress is not None and loop.time() - shown >= _SHOW:
            shown = loop.time()
            elapsed = max(0.0, loop.time() - t0)
            progress(LoadProgress(elapsed, share.spec.duration, board.total()))


def _publish(slot: int, recorder: Recorder, board: Board) -> None:
    counts = recorder.outcomes
    board.write(slot, Field.SENT, recorder.sent)
    board.write(slot, Field.ANSWERED, recorder.answered)
    board.write(slot, Field.OK, counts[Verdict.OK])
    board.write(slot, Field.REJECTED, counts[Verdict.TOO_MANY] + counts[Verdict.UNAVAILABLE])
    failed = counts[Verdict.OTHER] + counts[Verdict.TIMEOUT] + counts[Verdict.CONNECTION]
    board.write(slot, Field.FAILED, failed)
    board.write(slot, Field.DROPPED, recorder.dropped)
    board.write(slot, Field.INFLIGHT, recorder.inflight)
