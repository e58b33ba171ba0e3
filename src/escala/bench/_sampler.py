"""Peak memory of this process and its children, sampled by a background thread.

::

    caller ──start()──▶ thread "escala-bench-rss" ──every 20 ms──▶ RSS(self + children)
           ◀──stop()───  (joined; its own CPU time is reported so it can be subtracted)

psutil is imported here only, when a run is measured: without it (it is an optional
dependency) the peak is reported as unknown instead of failing the run.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

__all__ = ["PeakRss"]

_INTERVAL = 0.02
# Listing children scans every process on the machine (about 1 ms with 70 of them); RSS of a
# known process is one small read. So after the first few samples, while worker processes
# start, the list is renewed every few samples only: workers live for the whole run.
_RESCAN_EVERY = 5


class PeakRss:
    """Sample the resident memory of this process tree until stopped; keep the highest sum.

    Use as a context manager. ``peak`` is ``None`` when psutil is not installed.

    Attributes:
        peak: the highest sum of RSS seen, in bytes (shared pages count once per process).
        cpu: CPU seconds the sampling thread itself used, to subtract from a measurement.
    """

    def __init__(self, interval: float = _INTERVAL) -> None:
        self.peak: int | None = None
        self.cpu = 0.0
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._psutil: Any = None
        self._me: Any = None
        self._children: list[Any] = []

    def __enter__(self) -> PeakRss:
        try:
            import psutil  # type: ignore[import-untyped, unused-ignore]
        except ImportError:
            return self
        self._psutil = psutil
        self._me = psutil.Process()
        self._sample(rescan=True)  # in the caller: imports and first reads happen before any fork
        self._thread = threading.Thread(target=self._loop, name="escala-bench-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        started = time.thread_time()
        tick = 0
        while not self._stop.wait(self._interval):
            tick += 1
            self._sample(rescan=tick <= _RESCAN_EVERY or tick % _RESCAN_EVERY == 0)
        self.cpu = time.thread_time() - started

    def _sample(self, *, rescan: bool) -> None:
        error = self._psutil.Error
        if rescan:
            try:
                self._children = self._me.children(recursive=True)
            except error:
                pass  # keep the last list: this process is alive, a child just went away
        total = self._me.memory_info().rss
        for child in self._children:
            try:
                total += child.memory_info().rss
            except error:
                continue  # exited (or a zombie) since the last scan: it holds no memory now
        self.peak = total if self.peak is None else max(self.peak, total)
