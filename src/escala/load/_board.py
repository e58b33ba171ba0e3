"""A board of counters shared by the generator processes and the parent, without locks.

::

    parent                                   generator process k (one event loop)
      │  creates the board (a file in         │
      │  /dev/shm, mapped in memory)          │
      │                                       ├─ writes READY in slot k when its session
      │  waits for READY in every slot        │  is open
      │  writes GO (a wall-clock instant) ───▶├─ waits for GO: every process starts its
      │                                       │  schedule at the same instant
      │  reads the slots 4× a second for      ├─ writes its counters into slot k 10× a
      │  the live progress line               │  second
      │  writes STOP on Ctrl-C ──────────────▶└─ stops sending, returns what it has

Each slot is written by one process only, eight bytes at a time, so a reader may see a
slot a tenth of a second old but never a torn number. A plain file mapped by path (rather
than ``multiprocessing.shared_memory``) works with every start method and leaves nothing
for Python 3.11's resource tracker to unlink behind the parent's back. In a single process
the board is a plain ``bytearray``.
"""

from __future__ import annotations

import enum
import mmap
import os
import tempfile
import time
from dataclasses import dataclass

__all__ = ["Board", "Field", "Snapshot"]


class _Header(enum.IntEnum):
    STOP = 0  # 1: the parent asks every process to stop (Ctrl-C)
    GO = 1  # wall-clock nanoseconds at which every process starts; 0: not yet


class Field(enum.IntEnum):
    """The counters of one process's slot."""

    READY = 0  # 1 once the process can send
    SENT = 1
    ANSWERED = 2  # an outcome: an answer, a timeout or a connection error
    OK = 3
    REJECTED = 4  # 429 and 503
    FAILED = 5  # other statuses, timeouts, connection errors
    DROPPED = 6
    INFLIGHT = 7


@dataclass(frozen=True)
class Snapshot:
    """The counters of every process, added up."""

    ready: int
    sent: int
    answered: int
    ok: int
    rejected: int
    failed: int
    dropped: int
    inflight: int


class Board:
    """Counters for ``slots`` processes; see the module's diagram.

    Args:
        slots: how many processes write to it.
        shared: back it with a file other processes can :meth:`attach` to.
    """

    def __init__(self, slots: int, *, shared: bool = False) -> None:
        self.slots = slots
        self.path: str | None = None
        size = 8 * (len(_Header) + slots * len(Field))
        self._map: mmap.mmap | None = None
        if shared:
            folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
            fd, self.path = tempfile.mkstemp(prefix="escala-load-", dir=folder)
            try:
                os.ftruncate(fd, size)
                self._map = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            self._cells = memoryview(self._map).cast("q")
        else:
            self._cells = memoryview(bytearray(size)).cast("q")

    @classmethod
    def attach(cls, path: str, slots: int) -> Board:
        """Map the board another process created at ``path``."""
        board = cls.__new__(cls)
        board.slots = slots
        board.path = None  # only its creator removes the file
        fd = os.open(path, os.O_RDWR)
        try:
            board._map = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        board._cells = memoryview(board._map).cast("q")
        return board

    def close(self) -> None:
        """Unmap the board, and remove its file if this process created it."""
        self._cells.release()
        if self._map is not None:
            self._map.close()
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    # -- the parent ---------------------------------------------------------------------

    def go(self, delay: float) -> None:
        """Tell every process to start ``delay`` seconds from now."""
        self._cells[_Header.GO] = time.time_ns() + int(delay * 1e9)

    def stop(self) -> None:
        """Ask every process to stop sending and return what it has."""
        self._cells[_Header.STOP] = 1

    def total(self) -> Snapshot:
        """Return the counters of all slots added up."""
        sums = [0] * len(Field)
        for slot in range(self.slots):
            base = len(_Header) + slot * len(Field)
            for field in Field:
                sums[field] += self._cells[base + field]
        return Snapshot(*sums)

    # -- a generator process ------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        """Whether the parent asked to stop."""
        return bool(self._cells[_Header.STOP])

    def go_at(self) -> int | None:
        """The wall-clock nanoseconds to start at, once the parent has said."""
        return self._cells[_Header.GO] or None

    def write(self, slot: int, field: Field, value: int) -> None:
        """Set one counter of ``slot`` (only its own process writes there)."""
        self._cells[len(_Header) + slot * len(Field) + field] = value
