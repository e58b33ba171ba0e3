"""Functions users actually write: lambdas, closures, ``__main__`` and notebook functions."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap

import pytest

import escala


def test_lambdas(mode: str) -> None:
    assert escala.map(lambda x: x + 1, range(5), mode=mode) == [1, 2, 3, 4, 5]


def test_closures_capture_their_values(mode: str) -> None:
    offset = 100
    table = {1: "one", 2: "two"}

    def describe(x: int) -> str:
        return f"{x + offset}:{table.get(x, '?')}"

    assert escala.map(describe, [1, 2, 3], mode=mode) == ["101:one", "102:two", "103:?"]


def test_partials_and_builtins(mode: str) -> None:
    assert escala.map(functools.partial(pow, 2), range(5), mode=mode) == [1, 2, 4, 8, 16]
    assert escala.map(len, ["a", "bb"], mode=mode) == [1, 2]


class Scaler:
    def __init__(self, k: int) -> None:
        self.k = k

    def scale(self, x: int) -> int:
        return x * self.k

    def __call__(self, x: int) -> int:
        return x + self.k


def test_bound_methods_and_callable_objects(mode: str) -> None:
    s = Scaler(3)
    assert escala.map(s.scale, [1, 2], mode=mode) == [3, 6]
    assert escala.map(s, [1, 2], mode=mode) == [4, 5]


MAIN_SCRIPT = textwrap.dedent(
    r"""
    import sys
    import escala

    def in_main(x):
        return x * 3

    offset = 7
    if __name__ == "__main__":
        method = sys.argv[1]
        print(escala.map(in_main, range(4), mode="processes", start_method=method))
        print(escala.map(lambda x: x + offset, range(3), mode="processes", start_method=method))
    """
)


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_functions_defined_in_main_work_with_every_start_method(
    method: str, tmp_path: object
) -> None:
    """A script's own functions and lambdas reach workers that cannot import ``__main__``."""
    import pathlib

    script = pathlib.Path(str(tmp_path)) / "script.py"
    script.write_text(MAIN_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), method], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[0, 3, 6, 9]", "[7, 8, 9]"]


NOTEBOOK_CELL = textwrap.dedent(
    r"""
    import escala
    def cell_fn(x):
        return {"x": x, "sq": x * x}
    print(escala.map(cell_fn, [1, 2], mode="processes", start_method="spawn"))
    """
)


def test_functions_from_an_interactive_session() -> None:
    """Code given with -c has no file to re-import, like a notebook cell; spawned workers
    get the function by value."""
    done = subprocess.run(
        [sys.executable, "-c", NOTEBOOK_CELL], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[{'x': 1, 'sq': 1}, {'x': 2, 'sq': 4}]"
