"""The fair queue: weighted deficit round robin across users, priorities within one."""

from __future__ import annotations

from collections import Counter
from typing import TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from escala.service._fair import FairQueue

T = TypeVar("T")


def drain(queue: FairQueue[T]) -> list[tuple[str, T]]:
    out = []
    while (got := queue.pop()) is not None:
        out.append(got)
    return out


def shares(queue: FairQueue[T], pops: int) -> Counter[str]:
    """Pop ``pops`` items and count them by user."""
    served: Counter[str] = Counter()
    for _ in range(pops):
        got = queue.pop()
        assert got is not None
        served[got[0]] += 1
    return served


def test_empty_pop_returns_none() -> None:
    queue: FairQueue[int] = FairQueue()
    assert queue.pop() is None
    assert len(queue) == 0
    assert queue.depths() == {}


def test_a_flood_does_not_starve_a_small_user() -> None:
    queue: FairQueue[int] = FairQueue()
    for i in range(100_000):
        queue.push("flood", i)
    for i in range(10):
        queue.push("small", i)
    first = [got for _ in range(20) if (got := queue.pop()) is not None]
    assert [item for user, item in first if user == "small"] == list(range(10))
    assert len(queue) == 100_000 - 10


def test_a_user_who_arrives_late_is_served_within_a_round() -> None:
    queue: FairQueue[int] = FairQueue()
    for user in "abcde":
        for i in range(1000):
            queue.push(user, i)
    for _ in range(7):  # mid-round
        queue.pop()
    queue.push("late", 0)
    served = [queue.pop() for _ in range(6)]
    assert ("late", 0) in served


def test_weights_give_shares() -> None:
    weights = {"heavy": 2.0, "light": 1.0}
    queue: FairQueue[int] = FairQueue(weight_of=weights.__getitem__)
    for i in range(10_000):
        queue.push("heavy", i)
        queue.push("light", i)
    served = shares(queue, 3000)
    assert abs(served["heavy"] - 2000) <= 2
    assert abs(served["light"] - 1000) <= 2


def test_fractional_weights_and_quantum() -> None:
    weights = {"a": 0.25, "b": 0.75}
    queue: FairQueue[int] = FairQueue(quantum=2.0, weight_of=weights.__getitem__)
    for i in range(1000):
        queue.push("a", i)
        queue.push("b", i)
    served = shares(queue, 400)
    assert abs(served["a"] - 100) <= 2
    assert abs(served["b"] - 300) <= 2


def test_weights_are_looked_up_on_each_turn() -> None:
    weights = {"a": 1.0, "b": 1.0}
    queue: FairQueue[int] = FairQueue(weight_of=weights.__getitem__)
    for i in range(1000):
        queue.push("a", i)
        queue.push("b", i)
    first = shares(queue, 100)
    assert first == {"a": 50, "b": 50}
    weights["a"] = 3.0
    later = shares(queue, 400)
    assert abs(later["a"] - 300) <= 3


def test_priority_within_a_user_then_fifo() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("u", "low-1", priority=-1)
    queue.push("u", "mid-1")
    queue.push("u", "high-1", priority=5)
    queue.push("u", "mid-2")
    queue.push("u", "high-2", priority=5)
    queue.push("u", "low-2", priority=-1)
    assert [item for _, item in drain(queue)] == [
        "high-1",
        "high-2",
        "mid-1",
        "mid-2",
        "low-1",
        "low-2",
    ]


def test_priority_does_not_cross_users() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("a", "a-low")
    queue.push("a", "a-low-2")
    queue.push("b", "b-urgent", priority=100)
    queue.push("b", "b-urgent-2", priority=100)
    # b's priority orders b's jobs, it does not buy b more than its turn
    assert [user for user, _ in drain(queue)] == ["a", "b", "a", "b"]


def test_costly_item_waits_for_credit_while_others_proceed() -> None:
    queue: FairQueue[str] = FairQueue(quantum=1.0)
    queue.push("big", "heavy", cost=3.0)
    for i in range(10):
        queue.push("small", f"s{i}")
    order = drain(queue)
    # big earns 1 per turn: its job goes out on its third turn, after two of small's
    assert order[:3] == [("small", "s0"), ("small", "s1"), ("big", "heavy")]
    assert len(order) == 11


def test_costly_items_everywhere_still_come_out() -> None:
    queue: FairQueue[str] = FairQueue(quantum=1.0)
    queue.push("a", "a1", cost=1e9)  # a billion turns, skipped in a few steps
    queue.push("b", "b1", cost=1.5e9)
    queue.push("a", "a2", cost=1e9)
    # a's first job on round 1e9, b's on round 1.5e9, a's second on round 2e9
    assert drain(queue) == [("a", "a1"), ("b", "b1"), ("a", "a2")]


def test_costs_share_by_work_not_by_count() -> None:
    queue: FairQueue[int] = FairQueue()
    for i in range(3000):
        queue.push("cheap", i, cost=1.0)
        queue.push("dear", i, cost=4.0)
    served = shares(queue, 1000)
    # equal work: four cheap jobs for each dear one
    assert abs(served["cheap"] - 800) <= 4
    assert abs(served["dear"] - 200) <= 4


def test_emptied_user_does_not_bank_credit() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("a", "a1")
    assert queue.pop() == ("a", "a1")
    # a left the round; back, it starts from nothing like a newcomer
    for i in range(3):
        queue.push("b", f"b{i}")
        queue.push("a", f"a{i + 2}")
    assert [user for user, _ in drain(queue)] == ["b", "a", "b", "a", "b", "a"]


def test_discard() -> None:
    queue: FairQueue[int] = FairQueue()
    for i in range(10):
        queue.push("a", i)
        queue.push("b", i)
    assert queue.discard("a", lambda item: item % 2 == 0) == 5
    assert queue.discard("a", lambda item: item > 100) == 0
    assert queue.discard("nobody", lambda item: True) == 0
    assert queue.depth("a") == 5
    assert len(queue) == 15
    assert [item for user, item in drain(queue) if user == "a"] == [1, 3, 5, 7, 9]


def test_discard_everything_of_the_user_on_its_turn() -> None:
    queue: FairQueue[int] = FairQueue(quantum=2.0)
    for i in range(4):
        queue.push("a", i)
        queue.push("b", i)
    assert queue.pop() == ("a", 0)  # a's turn, with credit left for one more
    assert queue.discard("a", lambda item: True) == 3
    assert queue.depths() == {"b": 4}
    assert [user for user, _ in drain(queue)] == ["b"] * 4
    queue.push("a", 9)
    assert queue.pop() == ("a", 9)


def test_len_depth_depths() -> None:
    queue: FairQueue[int] = FairQueue()
    queue.push("a", 1)
    queue.push("a", 2)
    queue.push("b", 3)
    assert len(queue) == 3
    assert queue.depth("a") == 2
    assert queue.depth("c") == 0
    assert queue.depths() == {"a": 2, "b": 1}
    drain(queue)
    assert queue.depths() == {}
    assert len(queue) == 0


def test_bad_weight_refused_at_push() -> None:
    weights = {"ok": 1.0, "zero": 0.0, "negative": -1.0, "nan": float("nan")}
    queue: FairQueue[int] = FairQueue(weight_of=weights.__getitem__)
    queue.push("ok", 1)
    for user in ("zero", "negative", "nan"):
        with pytest.raises(ValueError, match=f"weight of user '{user}'"):
            queue.push(user, 1)
    assert queue.depths() == {"ok": 1}


def test_weight_gone_bad_later_is_reported_and_state_kept() -> None:
    weights = {"a": 1.0}
    queue: FairQueue[int] = FairQueue(weight_of=weights.__getitem__)
    queue.push("a", 1)
    weights["a"] = 0.0
    with pytest.raises(ValueError, match="weight of user 'a'"):
        queue.pop()
    weights["a"] = 1.0
    assert queue.pop() == ("a", 1)


@pytest.mark.parametrize("cost", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_cost_refused(cost: float) -> None:
    queue: FairQueue[int] = FairQueue()
    with pytest.raises(ValueError, match="cost"):
        queue.push("a", 1, cost=cost)


@pytest.mark.parametrize("quantum", [0.0, -1.0, float("inf")])
def test_bad_quantum_refused(quantum: float) -> None:
    with pytest.raises(ValueError, match="quantum"):
        FairQueue(quantum=quantum)


# An operation: push (user, priority, cost) or pop (None).
_ops = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from("abcd"),
            st.integers(-2, 2),
            st.sampled_from([0.5, 1.0, 2.0, 3.5]),
        ),
        st.none(),
    ),
    max_size=200,
)


@given(ops=_ops, weights=st.lists(st.sampled_from([0.5, 1.0, 3.0]), min_size=4, max_size=4))
def test_every_item_out_once_in_per_user_order(
    ops: list[tuple[str, int, float] | None], weights: list[float]
) -> None:
    weight = dict(zip("abcd", weights, strict=True))
    queue: FairQueue[int] = FairQueue(weight_of=weight.__getitem__)
    queued: dict[str, list[tuple[int, int]]] = {u: [] for u in "abcd"}  # (-priority, seq)
    pushed: list[int] = []
    out: list[int] = []

    def pop_and_check() -> None:
        got = queue.pop()
        assert got is not None
        user, item = got
        # the user's best job now: highest priority, the earliest among equals
        best = min(queued[user])
        assert item == best[1]
        queued[user].remove(best)
        out.append(item)

    for op in ops:
        if op is None:
            if len(queue):
                pop_and_check()
            else:
                assert queue.pop() is None
        else:
            user, priority, cost = op
            item = len(pushed)
            queue.push(user, item, priority=priority, cost=cost)
            queued[user].append((-priority, item))
            pushed.append(item)
        assert len(queue) == sum(len(q) for q in queued.values())
        assert queue.depths() == {u: len(q) for u, q in queued.items() if q}
    while len(queue):
        pop_and_check()
    assert queue.pop() is None
    assert sorted(out) == pushed
