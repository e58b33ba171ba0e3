"""The progress bar: on stderr, with count, rate and time left; never on stdout or in results."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    import escala

    def double(x):
        return x * 2

    results = escala.map(double, range(300), mode=sys.argv[1], progress="doubling")
    print(sum(results))
    for r in escala.imap(double, iter(range(5)), mode=sys.argv[1], progress=True):
        print(r)
    """
)


@pytest.mark.parametrize("how", ["sequential", "threads", "processes", "async"])
def test_progress_goes_to_stderr_and_never_touches_results(how: str) -> None:
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm", "FORCE_COLOR": "0"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, how], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(2 * sum(range(300))), "0", "2", "4", "6", "8"]
    assert "doubling" in done.stderr
    assert "300/300" in done.stderr
    assert "tasks/s" in done.stderr
    # the generator input has no length: the bar counts without a total
    assert "escala · " in done.stderr
