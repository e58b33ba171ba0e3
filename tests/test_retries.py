"""Retries: failed tasks run again, with exponential backoff and jitter, for chosen errors."""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable

import pytest

import escala
from escala import Retry


class Flaky(Exception):
    pass


class Fatal(Exception):
    pass


def flaky(
    folder: pathlib.Path, failures: int, error: type[Exception] = Flaky
) -> Callable[[int], int]:
    """Return a task that fails its first ``failures`` runs on each item.

    Attempts are counted in files, so the count holds across worker processes.
    """

    def task(x: int) -> int:
        log = folder / f"{x}.log"
        with log.open("a") as f:
            f.write(f"{time.monotonic()}\n")
        if len(log.read_text().splitlines()) <= failures:
            raise error(f"attempt failed for {x}")
        return x * 10

    return task


def attempts(folder: pathlib.Path, x: int) -> list[float]:
    return [float(line) for line in (folder / f"{x}.log").read_text().splitlines()]


def test_retries_until_success(mode: str, tmp_path: pathlib.Path) -> None:
    fast = Retry(attempts=2, backoff=0.001)
    assert escala.map(flaky(tmp_path, 2), range(5), mode=mode, retries=fast) == [
        0,
        10,
        20,
        30,
        40,
    ]
    assert all(len(attempts(tmp_path, x)) == 3 for x in range(5))


def test_retries_give_up_after_the_last_attempt(mode: str, tmp_path: pathlib.Path) -> None:
    outcomes = escala.map(
        flaky(tmp_path, 5),
        range(3),
        mode=mode,
        retries=Retry(attempts=2, backoff=0.001),
        errors="collect",
    )
    assert [o.ok for o in outcomes] == [False, False, False]
    assert [o.attempts for o in outcomes] == [3, 3, 3]
    assert all(isinstance(o.error, Flaky) for o in outcomes)


def test_an_int_means_that_many_retries(mode: str, tmp_path: pathlib.Path) -> None:
    outcomes = escala.map(flaky(tmp_path, 1), [1], mode=mode, retries=1, errors="collect")
    assert outcomes[0].value == 10
    assert outcomes[0].attempts == 2


def test_only_the_chosen_exceptions_are_retried(mode: str, tmp_path: pathlib.Path) -> None:
    policy = Retry(attempts=3, on=(Flaky,), backoff=0.001)
    with pytest.raises(Fatal):
        escala.map(flaky(tmp_path, 1, error=Fatal), [1], mode=mode, retries=policy)
    assert len(attempts(tmp_path, 1)) == 1


def test_no_retries_by_default(mode: str, tmp_path: pathlib.Path) -> None:
    with pytest.raises(Flaky):
        escala.map(flaky(tmp_path, 1), [1], mode=mode)
    assert len(attempts(tmp_path, 1)) == 1


def test_backoff_waits_between_attempts(tmp_path: pathlib.Path) -> None:
    """Without jitter the pauses are exactly backoff, 2 × backoff: never shorter."""
    policy = Retry(attempts=2, backoff=0.05, jitter=False)
    escala.map(flaky(tmp_path, 2), [7], mode="threads", retries=policy)
    first, second, third = attempts(tmp_path, 7)
    assert second - first >= 0.05
    assert third - second >= 0.10


def test_delays_grow_exponentially_with_full_jitter() -> None:
    policy = Retry(attempts=10, backoff=0.5, max_backoff=3.0)
    assert [policy.delay(n, rand=lambda: 1.0) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.delay(3, rand=lambda: 0.25) == 0.5
    assert Retry(backoff=0.5, jitter=False).delay(2, rand=lambda: 0.0) == 1.0


def test_retry_validation() -> None:
    with pytest.raises(ValueError, match="retries must be 0 or more"):
        Retry(attempts=-1)
    with pytest.raises(TypeError, match="exception types"):
        Retry(on=(int,))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="retries must be an int"):
        escala.map(abs, [1], retries=1.5)  # type: ignore[arg-type]
