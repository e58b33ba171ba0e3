"""Weighted deficit round robin across users: one user's flood cannot starve another.

A service for many users must not serve jobs first come, first served: one user who
submits 100,000 jobs would then hold every worker until the flood drains, and another
who submits ten would wait behind all of it. Deficit round robin (Shreedhar & Varghese,
"Efficient fair queueing using deficit round robin", 1995) gives each user with work a
turn in a round; on its turn a user earns ``quantum × weight`` of credit and is served
while its credit covers the cost of its next job. With unit costs the second user's
jobs are therefore served within one round, however deep the first user's queue is;
weights give shares (2:1 weights get 2:1 of the service), and costs let a heavy job
wait for the credit it needs while lighter ones proceed.

A user whose queue empties leaves the round and loses its credit, as in standard DRR:
an idle user must not bank credit and then burst past everyone when it comes back.

Within one user jobs come out by priority (higher first), first in first out among
equal priorities. No I/O, no clock, no locks: the service calls it from its event loop.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["FairQueue"]

T = TypeVar("T")

# A user's queued job: (-priority, sequence, cost, item). The sequence is unique, so
# heap comparisons never reach the item, which need not be orderable.
_Entry = tuple[int, int, float, T]


def _unit_weight(user: str) -> float:
    return 1.0


class FairQueue(Generic[T]):
    """Jobs of many users, served by weighted deficit round robin.

    Args:
        quantum: credit a user earns on each turn, times its weight; with unit costs and
            unit weights, 1.0 serves one job per user per round.
        weight_of: the user's weight, looked up on each of its turns (so weights may
            change at run time); must be a positive finite number.

    Raises:
        ValueError: ``quantum`` is not a positive finite number.
    """

    def __init__(
        self,
        *,
        quantum: float = 1.0,
        weight_of: Callable[[str], float] = _unit_weight,
    ) -> None:
        if not (0 < quantum < math.inf):
            raise ValueError(f"quantum must be a positive finite number, got {quantum!r}")
        self._quantum = quantum
        self._weight_of = weight_of
        self._heaps: dict[str, list[_Entry[T]]] = {}  # only users with items
        self._deficit: dict[str, float] = {}
        self._round: deque[str] = deque()  # users with items, the one on its turn first
        self._on_turn = False  # whether _round[0] has already earned this turn's credit
        self._sequence = itertools.count()
        self._len = 0

    def push(self, user: str, item: T, *, priority: int = 0, cost: float = 1.0) -> None:
        """Queue ``item`` for ``user``.

        Args:
            user: who the job belongs to.
            item: the job.
            priority: higher comes out first among this user's jobs.
            cost: credit the job uses up when it is served (e.g. its expected work).

        Raises:
            ValueError: ``cost`` or the user's weight is not a positive finite number.
        """
        if not (0 < cost < math.inf):
            # a free job would let its user be served without end on one turn
            raise ValueError(f"cost must be a positive finite number, got {cost!r}")
        self._weight(user)  # refuse a bad weight now, not later in pop()
        heap = self._heaps.get(user)
        if heap is None:
            heap = self._heaps[user] = []
            self._deficit[user] = 0.0
            self._round.append(user)  # joins at the end of the round
        heapq.heappush(heap, (-priority, next(self._sequence), cost, item))
        self._len += 1

    def pop(self) -> tuple[str, T] | None:
        """Take the next job by weighted deficit round robin.

        Returns:
            ``(user, item)``, or None when the queue is empty.

        Raises:
            ValueError: the weight of the user on its turn is no longer valid.
        """
        if not self._len:
            return None
        turns_unserved = 0  # turns in a row that ended without serving anything
        while True:
            user = self._round[0]
            if not self._on_turn:
                self._deficit[user] += self._quantum * self._weight(user)
                self._on_turn = True
            heap = self._heaps[user]
            cost = heap[0][2]
            if self._deficit[user] >= cost:
                _, _, _, item = heapq.heappop(heap)
                self._len -= 1
                if heap:
                    self._deficit[user] -= cost
                else:
                    self._leave(user)
                return user, item
            # not enough credit for the head job: the turn passes to the next user
            self._round.rotate(-1)
            self._on_turn = False
            turns_unserved += 1
            if turns_unserved >= len(self._round):
                self._skip_empty_rounds()
                turns_unserved = 0

    def discard(self, user: str, predicate: Callable[[T], bool]) -> int:
        """Remove ``user``'s queued jobs for which ``predicate`` is true (cancellation).

        Costs O(that user's queued jobs), plus O(users) if it empties the user's queue.

        Args:
            user: whose jobs to look at.
            predicate: true for a job to remove.

        Returns:
            How many jobs were removed.
        """
        heap = self._heaps.get(user)
        if heap is None:
            return 0
        kept = [entry for entry in heap if not predicate(entry[3])]
        removed = len(heap) - len(kept)
        if not removed:
            return 0
        self._len -= removed
        if kept:
            heapq.heapify(kept)
            self._heaps[user] = kept
        else:
            self._leave(user)
        return removed

    def __len__(self) -> int:
        """Return the number of queued jobs, all users together."""
        return self._len

    def depth(self, user: str) -> int:
        """Return the number of ``user``'s queued jobs."""
        heap = self._heaps.get(user)
        return len(heap) if heap is not None else 0

    def depths(self) -> dict[str, int]:
        """Return the number of queued jobs of each user that has any."""
        return {user: len(heap) for user, heap in self._heaps.items()}

    def _weight(self, user: str) -> float:
        weight = self._weight_of(user)
        if not (0 < weight < math.inf):
            raise ValueError(
                f"the weight of user {user!r} must be a positive finite number, got {weight!r}"
            )
        return weight

    def _leave(self, user: str) -> None:
        """Take an emptied user out of the round; its credit goes (standard DRR)."""
        if self._round[0] == user:
            self._round.popleft()
            self._on_turn = False
        else:
            self._round.remove(user)
        del self._heaps[user]
        del self._deficit[user]

    def _skip_empty_rounds(self) -> None:
        """Credit at once the whole rounds in which nobody could be served.

        A whole round went by without serving anything: every head job costs more than
        its user's credit (costs far above ``quantum × weight``). Rather than turn the
        round over until someone has enough, add the credit of the rounds that would
        serve nobody; the next round then serves someone.
        """
        earn = {user: self._quantum * self._weight(user) for user in self._round}
        rounds = min(
            math.ceil((self._heaps[user][0][2] - self._deficit[user]) / earn[user])
            for user in self._round
        )
        # one round fewer: rounding must not carry anyone past the round that serves it
        rounds -= 1
        if rounds > 0:
            for user in self._round:
                self._deficit[user] += rounds * earn[user]
