"""The service's jobs through PostgreSQL with 1, 2 and 4 workers, beside SQLite.

Run from the repository root::

    .venv/bin/python benchmarks/bench_scaleout.py [--quick] [--pg-url URL] [--json PATH]

Two workloads, each run on four set-ups in the same invocation:

- **noop**: jobs that do nothing, so that every figure is the cost of the job's path:
  HTTP, three durable writes (submitted, claimed, finished) and the hand-offs. What
  saturates here is the machine's few cores and the store, not the work.
- **nap**: jobs that sleep 50 ms and use no CPU, each node running at most 8 at once, so
  that one node can finish at most 160 a second: capacity that only more nodes add. This
  is what ``escala worker`` is for, and how far the shared queue lets it grow.

Then the two statements whose cost decides how far one database goes, timed against a
queue of 1,000, 20,000 and 100,000 jobs of 50 users: the fair claim of 16 jobs (every
node runs it whenever it has room) and the backlog count (every accepting node, twice a
second).

Set-ups: ``escala serve`` alone on SQLite (one node does everything: the default);
``escala serve`` alone on PostgreSQL; and ``serve --executor none`` (accepts only) with 1,
2 and 4 ``escala worker`` processes on PostgreSQL. Jobs are submitted by a closed loop of
64 connections; the time runs until the store says every job succeeded.

Without ``--pg-url`` a throwaway PostgreSQL server is started (``tests/pg.py``: initdb
and pg_ctl, as the ``postgres`` user under root) with fsync ON, like SQLite's
``synchronous=FULL``: both sides are durable. Every process is stopped by its own pid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import psycopg

from bench_service import APP, Child, Http, closed_loop, until
from benchlib import Table, machine_line, show, warn_stray_children

ROOT = Path(__file__).resolve().parent.parent
WIDTH = 64  # connections submitting at once
NAP = 0.05  # seconds each "nap" job sleeps
PER_NODE = 8  # "nap" jobs one node runs at once (--io-limit)


@contextmanager
def postgres(url: str | None) -> Iterator[str]:
    """The given server, or a throwaway durable one (fsync on)."""
    if url:
        yield url
        return
    sys.path.insert(0, str(ROOT / "tests"))
    import pg  # tests/pg.py: initdb + pg_ctl on a free port of 127.0.0.1

    with pg.server(durable=True) as started:
        yield started


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    import pg

    with pg.database(server_url) as url:
        yield url


def node(folder: Path, command: str, *args: str) -> Child:
    argv = [sys.executable, "-m", "escala.cli", command, "--app", APP, *args]
    if command == "serve":
        argv += ["--no-auth", "--host", "127.0.0.1", "--port", "0"]
        ready = r"listening on (http://\S+)"
    else:
        ready = r"escala worker (\S+):"
    return Child(f"escala {command}", argv, ready, cwd=str(folder))


def succeeded(store: str) -> int:
    """Jobs that succeeded, read from the store itself (any node may have run them)."""
    if store.startswith("postgresql://"):
        with psycopg.connect(store) as conn:
            row = conn.execute("SELECT count(*) FROM escala_jobs WHERE state = 'succeeded'")
            return int(row.fetchone()[0])  # type: ignore[index]
    import sqlite3

    with sqlite3.connect(store) as conn:
        return int(
            conn.execute("SELECT count(*) FROM jobs WHERE state = 'succeeded'").fetchone()[0]
        )


def run_setup(
    folder: Path, pg_server: str, setup: str, workers: int, body: bytes, n: int, io_limit: int
) -> dict[str, Any]:
    """Start the set-up's nodes, push ``n`` jobs through, stop everything."""
    with ExitStack() as stack:
        if setup == "sqlite":
            store = str(folder / f"jobs-{time.monotonic_ns()}.db")
            where = ["--db", store]
        else:
            store = stack.enter_context(fresh_database(pg_server))
            where = ["--store", store]
        limit = ["--io-limit", str(io_limit)]
        executor = ["--executor", "none"] if workers else []
        server = node(folder, "serve", *where, *executor, *limit)
        stack.callback(server.stop)
        for _ in range(workers):
            worker = node(folder, "worker", "--store", store, *limit)
            stack.callback(worker.stop)
        assert server.match is not None
        url = server.match.group(1)

        async def main() -> dict[str, Any]:
            http = Http(url, WIDTH)

            async def send() -> int:
                return (await http.request("POST", "/v1/jobs", body))[0]

            async def done() -> bool:
                return await asyncio.to_thread(succeeded, store) >= n

            start = time.perf_counter()
            statuses = await closed_loop(send, WIDTH, 300, n)
            submitted = time.perf_counter() - start
            finished = await until(done, 300, every=0.05)
            took = time.perf_counter() - start
            await http.close()
            return {
                "statuses": statuses,
                "submit_s": submitted,
                "all_done_s": took,
                "finished": finished,
                "jobs_per_s": n / took,
            }

        return asyncio.run(main())


def bench_statements(pg_server: str, sizes: list[int]) -> Table:
    """Median time of the fair claim and of the backlog count, by queue length."""
    from escala.store.postgres import PostgresStore

    table = Table(
        "the shared queue's statements against a long queue (50 users, median of 7)",
        ["jobs queued", "claim_next(16)", "backlog()"],
    )

    async def timed(call: Any) -> float:
        times = []
        for _ in range(7):
            start = time.perf_counter()
            await call()
            times.append(time.perf_counter() - start)
        return sorted(times)[3]

    with fresh_database(pg_server) as url:

        async def main() -> None:
            store = PostgresStore(url)
            await store.open()
            try:
                for size in sizes:
                    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as c:
                        await c.execute("DELETE FROM escala_jobs")
                        await c.execute(
                            'INSERT INTO escala_jobs (id, "user", task, args, kwargs, '
                            "priority, state, attempts, created_at) SELECT md5(g::text), "
                            "'u' || (g %% 50), 'noop', '[]', '{}', 0, 'queued', 0, g "
                            "FROM generate_series(1, %s) AS g",
                            (size,),
                        )
                        await c.execute("VACUUM ANALYZE escala_jobs")
                    claim = await timed(lambda: store.claim_next("bench", 16, 30, ["noop"]))
                    count = await timed(store.backlog)
                    table.rows.append(
                        [f"{size:,}", f"{claim * 1000:.1f} ms", f"{count * 1000:.1f} ms"]
                    )
            finally:
                await store.close()

        asyncio.run(main())
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer jobs (a smoke run)")
    parser.add_argument(
        "--pg-url", help="a PostgreSQL server to use (its database must allow CREATE DATABASE)"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    setups = [
        ("sqlite", 0),
        ("postgresql", 0),
        ("postgresql", 1),
        ("postgresql", 2),
        ("postgresql", 4),
    ]
    workloads = {
        "noop": (json.dumps({"task": "noop"}).encode(), 500 if args.quick else 3000, 256),
        "nap": (
            json.dumps({"task": "nap", "args": [NAP]}).encode(),
            300 if args.quick else 2000,
            PER_NODE,
        ),
    }
    print(machine_line())
    figures: dict[str, Any] = {"machine": machine_line()}
    with postgres(args.pg_url) as pg_server, tempfile.TemporaryDirectory() as tmp:
        for name, (body, n, io_limit) in workloads.items():
            table = Table(
                f"{n:,} {name} jobs end to end"
                + (
                    f" ({NAP * 1000:.0f} ms asleep each, {PER_NODE} at once per node)"
                    if name == "nap"
                    else ""
                ),
                [
                    "store",
                    "nodes that run jobs",
                    "all submitted after",
                    "all succeeded after",
                    "jobs/s",
                    "vs SQLite",
                ],
            )
            base = None
            for store, workers in setups:
                run = run_setup(Path(tmp), pg_server, store, workers, body, n, io_limit)
                figures[f"{name}/{store}/{workers}"] = run
                base = base or run["jobs_per_s"]
                runners = (
                    "serve itself" if not workers else f"{workers} worker{'s' * (workers > 1)}"
                )
                bad = {k: v for k, v in run["statuses"].items() if k != 202}
                table.rows.append(
                    [
                        store,
                        runners,
                        f"{run['submit_s']:.2f} s",
                        f"{run['all_done_s']:.2f} s" + ("" if run["finished"] else " (timed out)"),
                        f"{run['jobs_per_s']:,.0f}",
                        f"{run['jobs_per_s'] / base:.2f}×",
                    ]
                )
                if bad:
                    table.notes.append(f"{store} with {runners}: answers other than 202: {bad}")
            show(table)
        show(bench_statements(pg_server, [1000, 20_000] if args.quick else [1000, 20_000, 100_000]))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    warn_stray_children()


if __name__ == "__main__":
    main()
