"""The contract every execution model implements.

A backend runs *batches* (:mod:`escala._worker.messages`): a function, how to apply it,
and a few items. It knows nothing of input order, retries, error policy or progress; the
scheduler above it owns those. It reports each finished batch to the batch's *sink* as a
``Done``.
"""

from __future__ import annotations

from typing import Protocol

from .._worker.messages import Batch, Sink

__all__ = ["Backend", "ClusterBackend"]


class Backend(Protocol):
    """One execution model. ``submit`` may be called from any thread."""

    #: how many tasks run at once
    workers: int
    #: whether measured batching pays here (True for processes: each hand-off costs IPC)
    batches_pay: bool

    def start(self) -> None:
        """Get the workers ready; called once before the first ``submit``."""

    def submit(self, batch: Batch, sink: Sink) -> None:
        """Queue ``batch``; report it to ``sink`` when done. Must not block for long.

        Raises:
            SendError: an item cannot be sent to a worker (the process backend checks this
                here, so the caller learns which item before any work is lost).
            PoolClosed: the backend has been shut down.
        """

    def cancel(self, sink: Sink) -> None:
        """Drop the queued batches reported to ``sink``; running ones finish unreported."""

    def shutdown(self, *, cancel: bool) -> None:
        """Stop the workers and wait for them.

        Args:
            cancel: stop running tasks too (kill worker processes, cancel coroutines); a
                running thread cannot be stopped and is left to finish on its own.
        """

    async def aclose(self, *, cancel: bool) -> None:
        """Shut down without blocking the event loop: ``shutdown``, awaited.

        A backend whose shutdown blocks (joining threads or processes) runs it in a thread
        (``asyncio.to_thread``); the async backend on the caller's loop awaits its tasks.

        Args:
            cancel: as for :meth:`shutdown`.
        """


class ClusterBackend(Backend, Protocol):
    """An execution model on an engine's cluster (Dask, Ray), which says how big it is."""

    #: the engine's name, as messages give it ("Dask", "Ray")
    engine: str

    def capacity(self) -> int:
        """Return how many tasks the cluster runs at once (its worker threads, or CPUs)."""
