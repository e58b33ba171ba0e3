"""Many nodes, one PostgreSQL store: ``escala serve --store`` and ``escala worker``.

Every node is a real process (``escala serve`` or ``escala worker``) on a real
PostgreSQL server started by the tests; nodes are killed with SIGKILL where the test
says so. Leases are short (2 s) so that a dead node's jobs come back quickly.
"""

from __future__ import annotations

import pathlib
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import httpx
import psutil
import psycopg
import pytest

from svc import Server, add_key, escala, serving, write_app

LEASE = ["--lease", "2"]


@pytest.fixture
def app(tmp_path: pathlib.Path) -> pathlib.Path:
    return write_app(tmp_path)


@contextmanager
def workers(cwd: pathlib.Path, url: str, n: int, *args: str) -> Iterator[list[Server]]:
    """Run ``n`` workers on the store for the block."""
    with ExitStack() as stack:
        yield [
            stack.enter_context(serving(cwd, "--store", url, *LEASE, *args, command="worker"))
            for _ in range(n)
        ]


def submit(client: httpx.Client, task: str, *args: object, **fields: object) -> str:
    response = client.post("/v1/jobs", json={"task": task, "args": list(args), **fields})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def wait(client: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, object]:
    response = client.get(f"/v1/jobs/{job_id}/wait", params={"timeout": timeout})
    assert response.status_code == 200, response.text
    job: dict[str, object] = response.json()
    assert job["state"] in ("succeeded", "failed", "cancelled"), job
    return job


def test_jobs_accepted_by_one_server_run_on_the_workers(app: pathlib.Path, pg_url: str) -> None:
    with (
        serving(app, "--no-auth", "--store", pg_url, "--executor", "none") as server,
        workers(app, pg_url, 2, "--cpu-workers", "1") as nodes,
        server.client() as client,
    ):
        ids = [submit(client, "pid") for _ in range(30)]
        pids = {wait(client, job_id)["result"] for job_id in ids}
        runners = {psutil.Process(p).ppid() for p in pids if isinstance(p, int)}
        # every job ran, in the workers' process pools only (the server runs none)
        assert len(pids) >= 2 and runners == {w.pid for w in nodes}
        assert "runs no jobs itself" in server.text()
        refused = client.post("/v1/run/echo", json={"args": [1]})
        assert refused.status_code == 503 and "--executor none" in refused.json()["detail"]


def test_two_workers_never_run_the_same_job(app: pathlib.Path, pg_url: str) -> None:
    marks = app / "marks"
    marks.mkdir()
    with (
        serving(app, "--no-auth", "--store", pg_url, "--executor", "none") as server,
        server.client() as client,
    ):
        ids = [submit(client, "mark", str(marks), n) for n in range(150)]
        with workers(app, pg_url, 2, "--io-limit", "8"):
            jobs = [wait(client, job_id) for job_id in ids]
    # a second run of any job would have failed on its mark (O_EXCL)
    assert [j["state"] for j in jobs] == ["succeeded"] * 150
    assert sorted(int(p.name) for p in marks.iterdir()) == list(range(150))
    assert {j["attempts"] for j in jobs} == {1}


def test_kill_9_of_a_worker_mid_job_and_another_finishes_it(app: pathlib.Path, pg_url: str) -> None:
    marker = app / "started"
    with (
        serving(app, "--no-auth", "--store", pg_url, "--executor", "none") as server,
        server.client() as client,
    ):
        with serving(app, "--store", pg_url, *LEASE, command="worker") as doomed:
            job_id = submit(client, "first_run_hangs", str(marker))
            with client.stream(
                "GET", f"/v1/jobs/{job_id}/events", params={"timeout": 60}
            ) as stream:
                assert "event: running" in list(_until(stream.iter_lines(), "event: running"))
            doomed.kill()  # kill -9: no chance to put its job back
        assert marker.exists()
        with workers(app, pg_url, 1) as (rescuer,):
            job = wait(client, job_id)
        assert job["state"] == "succeeded" and job["result"] == "ran again"
        assert job["attempts"] == 2
        assert "queued again: 1" in rescuer.text()


def test_a_worker_stopped_with_sigterm_hands_its_job_to_another(
    app: pathlib.Path, pg_url: str
) -> None:
    marker = app / "started"
    with (
        serving(app, "--no-auth", "--store", pg_url, "--executor", "none") as server,
        server.client() as client,
    ):
        leaving = Server(app, "--store", pg_url, "--grace", "1", command="worker")
        job_id = submit(client, "first_run_hangs", str(marker))
        with client.stream("GET", f"/v1/jobs/{job_id}/events", params={"timeout": 60}) as stream:
            assert "event: running" in list(_until(stream.iter_lines(), "event: running"))
        # the default lease (30 s) would keep it for long: it comes back by release
        with workers(app, pg_url, 1, "--lease", "30"):
            assert leaving.stop() == 0
            job = wait(client, job_id, timeout=20)
        assert job["state"] == "succeeded" and job["result"] == "ran again"
        assert "running jobs that did not finish in 1 s, queued again: 1" in leaving.text()


def _until_true(check: Callable[[], bool], within: float = 60) -> None:
    """Poll ``check`` (a read of the outside world) until it holds; fail after ``within``."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.02)


def _until(lines: Iterator[str], wanted: str) -> Iterator[str]:
    for line in lines:
        yield line
        if line == wanted:
            return


def test_a_restart_of_everything_loses_no_accepted_job(app: pathlib.Path, pg_url: str) -> None:
    server = Server(app, "--no-auth", "--store", pg_url, "--executor", "none", *LEASE)
    with server.client() as client:
        ids = [submit(client, "nap", 0.05) for _ in range(120)]
    with workers(app, pg_url, 2, "--io-limit", "2") as nodes:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            # until some jobs are done and some are running: then kill everything
            _until_true(
                lambda: (
                    conn.execute(
                        "SELECT count(*) >= 20 FROM escala_jobs WHERE state = 'succeeded'"
                    ).fetchone()
                    == (True,)
                )
            )
        for node in [*nodes, server]:
            node.kill()
    with (
        serving(app, "--no-auth", "--store", pg_url, *LEASE) as again,
        workers(app, pg_url, 1, "--io-limit", "8"),
        again.client() as client,
    ):
        jobs = [wait(client, job_id) for job_id in ids]
    assert [j["state"] for j in jobs] == ["succeeded"] * 120
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM escala_jobs").fetchone() == (120,)


def test_users_take_turns_across_nodes(app: pathlib.Path, pg_url: str) -> None:
    keys = {user: _key(app, pg_url, user) for user in ("ann", "bob")}
    with serving(app, "--store", pg_url, "--executor", "none") as server:
        with server.client(keys["ann"]) as ann:
            mine = [submit(ann, "echo", n) for n in range(12)]
        with server.client(keys["bob"]) as bob:
            theirs = [submit(bob, "echo", n) for n in range(3)]
        # one worker, one job at a time: the order it runs them in is the claims' order
        with (
            workers(app, pg_url, 1, "--io-limit", "1"),
            server.client(keys["ann"]) as ann,
            server.client(keys["bob"]) as bob,
        ):
            started = {i: wait(ann, i)["started_at"] for i in mine}
            started |= {i: wait(bob, i)["started_at"] for i in theirs}
    order = sorted(started, key=lambda i: str(started[i]))
    # bob's three jobs, queued after ann's twelve, still run among ann's first four
    assert order[:6] == [mine[0], theirs[0], mine[1], theirs[1], mine[2], theirs[2]]


def _key(cwd: pathlib.Path, url: str, user: str) -> str:
    done = escala(cwd, "keys", "--store", url, "add", user)
    assert done.returncode == 0, done.stderr
    assert "PostgreSQL at 127.0.0.1" in done.stderr and "postgres@" not in done.stderr
    return done.stdout.strip()


def test_wait_and_cancel_reach_across_nodes(app: pathlib.Path, pg_url: str) -> None:
    with (
        serving(app, "--no-auth", "--store", pg_url, "--executor", "none") as server,
        workers(app, pg_url, 1, "--io-limit", "1"),
        server.client() as client,
    ):
        # a client waiting on the server hears of a job the worker finished
        assert wait(client, submit(client, "echo", "hi"))["result"] == "hi"
        held = submit(client, "hold", "never")
        with client.stream("GET", f"/v1/jobs/{held}/events", params={"timeout": 60}) as stream:
            assert "event: running" in list(_until(stream.iter_lines(), "event: running"))
        assert client.delete(f"/v1/jobs/{held}").json()["state"] == "cancelled"
        # the worker has one slot: the next job runs only if the held one was stopped
        assert wait(client, submit(client, "echo", 2), timeout=30)["result"] == 2


def test_servers_share_idempotency_keys_and_queue_bounds(app: pathlib.Path, pg_url: str) -> None:
    common = ["--no-auth", "--store", pg_url, "--executor", "none", "--max-queued-per-user", "3"]
    with (
        serving(app, *common) as one,
        serving(app, *common) as two,
        one.client() as first,
        two.client() as second,
    ):
        a = submit(first, "echo", 1, idempotency_key="k1")
        b = second.post("/v1/jobs", json={"task": "echo", "args": [1], "idempotency_key": "k1"})
        assert b.status_code == 202 and b.json()["id"] == a
        assert b.headers["Idempotent-Replayed"] == "true"
        submit(first, "echo", 2)
        submit(first, "echo", 3)
        # the second server counts the backlog that the first one filled
        _until_true(lambda: second.get("/v1/stats").json()["queue"]["total"] >= 3)
        refused = second.post("/v1/jobs", json={"task": "echo", "args": [4]})
        assert refused.status_code == 429 and "already has 3 jobs waiting" in refused.text


def test_mistakes_get_one_line_errors(app: pathlib.Path, pg_url: str) -> None:
    cases = [
        (["worker", "--app", "svcapp", "--store", "jobs.db"], "--store must be a PostgreSQL URL"),
        (["serve", "--app", "svcapp", "--executor", "none"], "--executor none leaves jobs"),
        (["serve", "--app", "svcapp", "--executor", "spark"], "--executor must be local, none"),
        (
            ["worker", "--app", "svcapp", "--store", "postgresql://u@127.0.0.1:1/x"],
            "cannot connect to PostgreSQL at 127.0.0.1:1",
        ),
        (["keys", "--store", "escala.db", "list"], "--store must be a PostgreSQL URL"),
    ]
    for argv, message in cases:
        done = escala(app, *argv)
        assert done.returncode == 2, (argv, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    add_key(app, "local-user")  # the SQLite file still works as before


def test_a_server_hands_cpu_tasks_to_ray(app: pathlib.Path) -> None:
    pytest.importorskip("ray")
    with serving(app, "--no-auth", "--executor", "ray", "--cpu-workers", "1") as server:
        with server.client() as client:
            assert wait(client, submit(client, "square", 7))["result"] == 49
            ran = client.post("/v1/run/pid", json={}).json()
            assert ran["state"] == "succeeded" and ran["result"] != server.pid
            assert client.get("/v1/stats").json()["workers"]["cpu"] == 1
        assert "CPU tasks on Ray (1 CPU)" in server.text()
        # Ray's own SIGTERM handler ends the process with status 15 once it has stopped
        assert server.stop() in (0, 15, -signal.SIGTERM)
        assert "stopped; jobs left unfinished" in server.text()


def test_a_database_that_goes_away_gets_503_not_500(
    app: pathlib.Path, pg_server: str, pg_url: str
) -> None:
    with serving(app, "--no-auth", "--store", pg_url) as server, server.client() as client:
        assert wait(client, submit(client, "echo", 1))["result"] == 1
        name = pg_url.rsplit("/", 1)[1]
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
            admin.execute(f"CREATE DATABASE {name}")  # for the fixture to drop after
        answer = client.post("/v1/jobs", json={"task": "echo", "args": [2]})
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
        assert "job store is unavailable" in answer.json()["detail"]
        assert "Traceback" not in answer.text
        assert client.get("/healthz").status_code == 200
    assert "the job store failed during POST /v1/jobs" in server.text()
