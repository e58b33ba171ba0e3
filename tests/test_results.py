"""Results: every mode returns what ``[fn(x) for x in items]`` returns, in order or streaming."""

from __future__ import annotations

import asyncio
import itertools
import pathlib
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import escala
from escala._options import ENGINES


def square(x: int) -> int:
    return x * x


async def asquare(x: int) -> int:
    await asyncio.sleep(0)
    return x * x


def divide(x: int) -> float:
    return 10 / x


def test_map_keeps_input_order(mode: str) -> None:
    items = list(range(200))
    assert escala.map(square, items, mode=mode, workers=3) == [square(x) for x in items]


def test_map_awaits_coroutine_functions_in_every_mode(mode: str) -> None:
    assert escala.map(asquare, range(20), mode=mode) == [x * x for x in range(20)]


def test_map_of_empty_input(mode: str) -> None:
    assert escala.map(square, [], mode=mode) == []
    assert list(escala.imap(square, iter([]), mode=mode)) == []


def test_map_takes_a_generator(mode: str) -> None:
    assert escala.map(square, (x for x in range(50)), mode=mode) == [x * x for x in range(50)]


def test_imap_streams_in_input_order(mode: str) -> None:
    results = escala.imap(square, range(100), mode=mode, workers=2)
    assert isinstance(results, Iterator)
    assert list(results) == [x * x for x in range(100)]


def wait_for_files(folder: pathlib.Path, count: int) -> None:
    """Block a task until ``count`` marker files exist in ``folder``.

    Tasks in another process cannot share an Event with the test, so they meet on the
    file system. The polling is the task's own wait, bounded so a bug fails, not hangs.
    """
    deadline = time.monotonic() + 30
    while len(list(folder.iterdir())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(folder.iterdir()))} of {count} markers came")
        time.sleep(0.002)


def test_imap_unordered_yields_as_tasks_finish(
    concurrent_mode: str, tmp_path: pathlib.Path
) -> None:
    """Item 0 is held until the consumer has item 1's result: only completion order works."""

    def hold_first(x: int) -> int:
        if x == 0:
            wait_for_files(tmp_path, 1)
        return x

    results = escala.imap(hold_first, [0, 1], mode=concurrent_mode, workers=2, ordered=False)
    first = next(results)
    (tmp_path / "got-first").touch()
    assert first == 1
    assert list(results) == [0]


def test_results_never_reach_stdout(capfd: pytest.CaptureFixture[str], mode: str) -> None:
    escala.map(square, range(10), mode=mode)
    out, _ = capfd.readouterr()
    assert out == ""


#: Examples per property on a cluster engine, where each one is a run on the session's
#: cluster (a few hundred milliseconds on two cores).
ENGINE_EXAMPLES = 15


def examples_for(mode: str) -> settings:
    """The session's Hypothesis settings, with at most ``ENGINE_EXAMPLES`` examples on the
    cluster engines; never a deadline (a pool or a cluster run starts in each example)."""
    current = settings()
    examples = current.max_examples
    if mode in ENGINES:
        examples = min(examples, ENGINE_EXAMPLES)
    return settings(current, max_examples=examples, deadline=None)


# Each property runs under every mode, cluster engines included, through the ``mode``
# fixture (which makes the session's cluster the one a run without an address uses); the
# properties are inner functions so that each mode gets its own number of examples.


def test_property_map_equals_list_comprehension(mode: str) -> None:
    @examples_for(mode)
    @given(
        items=st.lists(st.integers(min_value=-1000, max_value=1000), max_size=60),
        batch=st.one_of(st.just("auto"), st.integers(min_value=1, max_value=7)),
        workers=st.integers(min_value=1, max_value=4),
    )
    def check(items: list[int], batch: str | int, workers: int) -> None:
        got = escala.map(square, items, mode=mode, batch=batch, workers=workers)
        assert got == [square(x) for x in items]

    check()


def test_property_errors_match_list_comprehension(mode: str) -> None:
    """Where the comprehension raises, escala raises the same type; else same results."""

    @examples_for(mode)
    @given(
        items=st.lists(st.integers(min_value=-3, max_value=3), max_size=30),
        batch=st.integers(min_value=1, max_value=5),
    )
    def check(items: list[int], batch: int) -> None:
        try:
            expected: list[float] | type[BaseException] = [divide(x) for x in items]
        except ZeroDivisionError:
            expected = ZeroDivisionError
        if expected is ZeroDivisionError:
            with pytest.raises(ZeroDivisionError):
                escala.map(divide, items, mode=mode, batch=batch, workers=2)
        else:
            assert escala.map(divide, items, mode=mode, batch=batch, workers=2) == expected
        collected = escala.map(divide, items, mode=mode, batch=batch, workers=2, errors="collect")
        assert [o.index for o in collected] == list(range(len(items)))
        assert [o.ok for o in collected] == [x != 0 for x in items]

    check()


def test_property_imap_unordered_is_a_permutation(mode: str) -> None:
    @examples_for(mode)
    @given(
        items=st.lists(st.integers(), max_size=50),
        batch=st.integers(min_value=1, max_value=6),
    )
    def check(items: list[int], batch: int) -> None:
        got = list(escala.imap(square, items, mode=mode, batch=batch, ordered=False, workers=3))
        assert sorted(got) == sorted(square(x) for x in items)

    check()


class Counting:
    """An endless input that records how far ahead of the consumer it was pulled."""

    def __init__(self) -> None:
        self.pulled = 0
        self.consumed = 0
        self.most_ahead = 0

    def __iter__(self) -> Iterator[int]:
        for n in itertools.count():
            self.pulled += 1
            self.most_ahead = max(self.most_ahead, self.pulled - self.consumed)
            yield n


def test_imap_pulls_an_endless_input_through_a_bounded_window(mode: str) -> None:
    source = Counting()
    workers, batch = 2, 3
    results = escala.imap(square, source, mode=mode, workers=workers, batch=batch)
    for expected, got in zip(range(2000), results, strict=False):
        assert got == expected * expected
        source.consumed += 1
    results.close()  # type: ignore[attr-defined]
    # The window is 2 × workers × batch tasks (1 × in sequential mode); the input is pulled
    # one batch at a time, so it can run ahead by at most the window.
    assert source.most_ahead <= 2 * workers * batch
    assert source.pulled < 2000 + 2 * workers * batch


def test_ordered_imap_bounds_what_waits_behind_a_slow_task(
    concurrent_mode: str, tmp_path: pathlib.Path
) -> None:
    """Item 0 is held until every other task of the window has finished; while results wait
    behind it, the input must not be pulled any further."""
    source = Counting()
    window = 6

    def task(x: int) -> int:
        if x == 0:
            wait_for_files(tmp_path, window - 1)
        elif x < window:
            (tmp_path / str(x)).touch()
        return x

    results = escala.imap(task, source, mode=concurrent_mode, workers=window, window=window)
    for expected, got in zip(range(60), results, strict=False):
        assert got == expected
        source.consumed += 1
    results.close()  # type: ignore[attr-defined]
    assert source.most_ahead <= window


def test_breaking_out_of_imap_stops_the_run(mode: str) -> None:
    results = escala.imap(square, itertools.count(), mode=mode, workers=2)
    assert [next(results) for _ in range(5)] == [0, 1, 4, 9, 16]
    results.close()  # type: ignore[attr-defined]
    # nothing_left_behind checks that the workers are gone


def test_imap_with_more_items_than_the_window(mode: str) -> None:
    assert sum(escala.imap(square, range(5000), mode=mode, workers=2)) == sum(
        x * x for x in range(5000)
    )


def test_items_may_be_any_picklable_object(mode: str) -> None:
    items = [{"a": [1, 2]}, (3, "x"), None, b"bytes", 1.5, frozenset({1})]
    assert escala.map(repr, items, mode=mode) == [repr(x) for x in items]
