"""The floor of a worker: escala's batch runner against Python's own loops, per call.

Run from the repository root::

    .venv/bin/python benchmarks/bench_fastpath.py [--markdown PATH]

Every mode ends in ``WorkerContext.run_batch``, which runs a batch of tasks in the worker
(a process, a thread, the caller). Its fast path runs the tasks in a generator so that a
task's ``StopIteration`` fails that task (the builtin ``map`` would end the batch quietly);
this measures what that costs against ``list(map(fn, items))`` and a list comprehension,
the loops a user would write, on a trivial Python function and on a builtin.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchlib import Table, best_each, machine_line, markdown, show
from escala._worker.context import WorkerContext
from escala._worker.messages import Batch, Call

N = 100_000
REPEATS = 40


def inc(x: int) -> int:
    return x + 1


def measure() -> Table:
    items = list(range(N))
    ctx = WorkerContext()
    table = Table(
        f"{N:,} calls in one batch, per call (best of {REPEATS}, taken in turn)",
        ["function", "list(map(fn, items))", "list comprehension", "run_batch", "ratio"],
    )
    for fn in (inc, abs):
        batch = Batch(Call(fn), items, items)
        times = best_each(
            {
                "map": lambda fn=fn: list(map(fn, items)),
                "comprehension": lambda fn=fn: [fn(x) for x in items],
                "run_batch": lambda batch=batch: ctx.run_batch(batch)[0],
            },
            REPEATS,
        )
        per = {name: t / N * 1e9 for name, t in times.items()}
        table.rows.append(
            [
                fn.__name__ + ("" if fn is inc else " (builtin)"),
                f"{per['map']:.1f} ns",
                f"{per['comprehension']:.1f} ns",
                f"{per['run_batch']:.1f} ns",
                f"{per['run_batch'] / per['map']:.2f}× map",
            ]
        )
    table.notes.append(
        "run_batch keeps every result before a failing task and records the failure by "
        "position; the builtin map is faster but ends quietly at a StopIteration"
    )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", type=Path, help="also write the results here")
    args = parser.parse_args()
    table = measure()
    show(table)
    if args.markdown:
        args.markdown.write_text(markdown([table], [f"- Machine: {machine_line()}"]))


if __name__ == "__main__":
    main()
