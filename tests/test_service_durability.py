"""Nothing accepted is ever lost: kill -9 of the server, SIGTERM, restarts."""

from __future__ import annotations

import pathlib
import signal
import sqlite3
import threading

import httpx

from svc import Server, serving, write_app

# uvicorn raises the signal again once it has shut down, as a process killed by it would
STOPPED = (0, -signal.SIGTERM)


def events_until(client: httpx.Client, job_id: str, state: str) -> None:
    """Block until the job's event stream reports ``state``."""
    with client.stream("GET", f"/v1/jobs/{job_id}/events", params={"timeout": 60}) as stream:
        for line in stream.iter_lines():
            if line == f"event: {state}":
                return
    raise AssertionError(f"job {job_id} never reached {state}")


def wait_all(client: httpx.Client, ids: list[str]) -> dict[str, dict[str, object]]:
    jobs = {}
    for job_id in ids:
        response = client.get(f"/v1/jobs/{job_id}/wait", params={"timeout": 20})
        assert response.status_code == 200, response.text
        jobs[job_id] = response.json()
    return jobs


def test_every_accepted_job_completes_after_kill_9(tmp_path: pathlib.Path) -> None:
    """Submissions stream in; the server is killed mid-stream; after a restart, every job
    that got a 202 completes, and none is lost or invented."""
    write_app(tmp_path)
    server = Server(tmp_path, "--no-auth", "--io-limit", "2")
    accepted: list[str] = []
    enough = threading.Event()
    stop = threading.Event()

    def stream_jobs() -> None:
        with server.client(timeout=10) as client:
            for i in range(5000):  # bounded; stops at the first refused connection
                if stop.is_set():
                    return
                try:
                    response = client.post("/v1/jobs", json={"task": "nap", "args": [0.02]})
                except httpx.TransportError:
                    return  # the server is gone: this one was never accepted
                if response.status_code == 202:
                    accepted.append(response.json()["id"])
                if i == 150:
                    enough.set()

    sender = threading.Thread(target=stream_jobs)
    sender.start()
    try:
        assert enough.wait(60), "the server never accepted 150 jobs"
        server.kill()
    finally:
        stop.set()
        sender.join(60)
        server.kill()
    assert len(accepted) >= 150
    with serving(tmp_path, "--no-auth", "--io-limit", "16") as again, again.client() as client:
        jobs = wait_all(client, accepted)
        stats = client.get("/v1/stats").json()
    assert {job["state"] for job in jobs.values()} == {"succeeded"}
    assert len(jobs) == len(accepted)
    # what was running at the kill ran again: at least once, never lost
    assert all(isinstance(job["attempts"], int) and job["attempts"] >= 1 for job in jobs.values())
    assert stats["queue"]["total"] == 0
    # nothing was invented: the file holds the accepted jobs, and at most the one whose
    # answer the kill cut off (committed, but the client never heard)
    with sqlite3.connect(tmp_path / "escala.db") as db:
        stored = db.execute("SELECT count(*), sum(state = 'succeeded') FROM jobs").fetchone()
    assert stored[0] - len(accepted) in (0, 1)


def test_sigterm_lets_running_jobs_finish_and_keeps_the_queue(tmp_path: pathlib.Path) -> None:
    write_app(tmp_path)
    with serving(tmp_path, "--no-auth", "--io-limit", "1", "--grace", "30") as server:
        with server.client() as client:
            running = client.post("/v1/jobs", json={"task": "nap", "args": [0.5]}).json()
            waiting = client.post("/v1/jobs", json={"task": "echo", "args": ["later"]}).json()
            events_until(client, running["id"], "running")
        assert server.stop() in STOPPED
    assert "jobs left unfinished, kept in the store for the next start: 1" in server.text()
    assert "Traceback" not in server.text()
    with serving(tmp_path, "--no-auth") as again, again.client() as client:
        first = client.get(f"/v1/jobs/{running['id']}").json()
        assert (first["state"], first["attempts"]) == ("succeeded", 1)
        later = wait_all(client, [waiting["id"]])[waiting["id"]]
        assert (later["state"], later["result"], later["attempts"]) == ("succeeded", "later", 1)


def test_a_job_still_running_after_the_grace_period_runs_again_next_time(
    tmp_path: pathlib.Path,
) -> None:
    write_app(tmp_path)
    with serving(tmp_path, "--no-auth", "--grace", "0.2") as server, server.client() as client:
        held = client.post("/v1/jobs", json={"task": "hold", "args": ["grace"]}).json()
        events_until(client, held["id"], "running")
        assert server.stop() in STOPPED
    assert "running jobs that did not finish in 0.2 s, queued again: 1" in server.text()
    with serving(tmp_path, "--no-auth") as again, again.client() as client:
        events_until(client, held["id"], "running")
        assert client.post("/v1/run/release", json={"args": ["grace"]}).is_success
        job = wait_all(client, [held["id"]])[held["id"]]
    assert (job["state"], job["attempts"]) == ("succeeded", 2)


def test_a_second_server_on_the_same_file_is_refused(tmp_path: pathlib.Path) -> None:
    write_app(tmp_path)
    with serving(tmp_path, "--no-auth") as first:
        try:
            second = Server(tmp_path, "--no-auth")
        except RuntimeError as exc:
            message = str(exc)
        else:
            second.kill()
            raise AssertionError("two servers opened one SQLite file")
        assert f"in use by another escala server (pid {first.pid})" in message
        assert "Traceback" not in message


def test_a_job_that_keeps_killing_its_server_fails_after_max_attempts(
    tmp_path: pathlib.Path,
) -> None:
    write_app(tmp_path)
    args = ("--no-auth", "--max-attempts", "2")
    with serving(tmp_path, *args) as server, server.client() as client:
        poison = client.post("/v1/jobs", json={"task": "take_the_server_down"}).json()
        assert server.process.wait(30) == 3
    again = Server(tmp_path, *args)  # runs it a second time, and goes down with it
    assert again.process.wait(30) == 3
    again.kill()
    assert f"job {poison['id']} (task take_the_server_down) was interrupted 1 time" in again.text()
    with serving(tmp_path, *args) as last, last.client() as client:
        job = client.get(f"/v1/jobs/{poison['id']}").json()
        assert client.get("/healthz").json() == {"status": "ok"}
    assert job["state"] == "failed"
    assert job["error"]["type"] == "TooManyAttempts"
    assert "2 times" in job["error"]["message"]
