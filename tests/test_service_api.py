"""The service's HTTP API end to end: a real server, a real SQLite file, an HTTP client."""

from __future__ import annotations

import asyncio
import json
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

import escala.service
from svc import Server, add_key, serving, write_app


@dataclass
class Site:
    server: Server
    keys: dict[str, str]

    def client(self, user: str = "alice") -> httpx.Client:
        return self.server.client(self.keys[user])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    cwd = write_app(tmp_path_factory.mktemp("api"))
    keys = {user: add_key(cwd, user) for user in ("alice", "bob")}
    with serving(cwd, "--io-limit", "8", "--cpu-workers", "1") as server:
        yield Site(server, keys)


def submit(client: httpx.Client, task: str, *args: object, **body: object) -> dict[str, object]:
    response = client.post("/v1/jobs", json={"task": task, "args": list(args), **body})
    assert response.status_code == 202, response.text
    job: dict[str, object] = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    return job


def wait(client: httpx.Client, job_id: object) -> dict[str, object]:
    response = client.get(f"/v1/jobs/{job_id}/wait", params={"timeout": 30})
    assert response.status_code == 200, response.text
    job: dict[str, object] = response.json()
    assert job["state"] in ("succeeded", "failed", "cancelled"), job
    return job


def test_a_cpu_job_and_an_io_job_run_to_their_results(site: Site) -> None:
    with site.client() as alice:
        cpu = submit(alice, "square", 7)
        io = alice.post("/v1/jobs", json={"task": "echo", "kwargs": {"value": {"a": [1, 2]}}})
        assert cpu["state"] == "queued"
        assert cpu["attempts"] == 0
        done = wait(alice, cpu["id"])
        assert (done["state"], done["result"], done["attempts"]) == ("succeeded", 49, 1)
        created, started, finished = done["created_at"], done["started_at"], done["finished_at"]
        assert isinstance(created, str) and isinstance(started, str) and isinstance(finished, str)
        assert created <= started <= finished
        assert wait(alice, io.json()["id"])["result"] == {"a": [1, 2]}
        assert alice.get(f"/v1/jobs/{cpu['id']}").json() == done


def test_a_failed_job_says_why_without_a_traceback(site: Site) -> None:
    with site.client() as alice:
        failed = wait(alice, submit(alice, "boom", "it broke")["id"])
        assert failed["state"] == "failed"
        assert failed["error"] == {"type": "ValueError", "message": "it broke"}
        odd = wait(alice, submit(alice, "not_json")["id"])
        assert odd["state"] == "failed"
        error = odd["error"]
        assert isinstance(error, dict)
        assert error["type"] == "TypeError"
        assert "JSON" in error["message"]
        for job in (failed, odd):
            assert "Traceback" not in str(job)


def test_events_stream_every_state_until_the_end(site: Site) -> None:
    with site.client() as alice, site.client() as other:
        job = submit(alice, "hold", "events")
        states = []
        with alice.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    states.append(line.removeprefix("event: "))
                    if states == ["running"] or states == ["queued"]:
                        # the job waits for this: released only once the stream is open
                        assert other.post("/v1/run/release", json={"args": ["events"]}).is_success
        assert states[-1] == "succeeded"
        assert set(states) <= {"queued", "running", "succeeded"}


def test_async_tasks_report_progress_to_the_event_stream(site: Site) -> None:
    with site.client() as alice, site.client() as other:
        job = submit(alice, "steps", "progress")
        events: list[tuple[str, dict[str, object]]] = []
        with alice.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
            name = ""
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((name, json.loads(line.removeprefix("data: "))))
                    if name == "running":
                        assert other.post("/v1/run/release", json={"args": ["progress"]}).is_success
        progress = [data for name, data in events if name == "progress"]
        assert progress == [
            {"id": job["id"], "done": 0.5, "note": "half way"},
            {"id": job["id"], "done": 1.0, "note": "done"},
        ]
        assert events[-1][0] == "succeeded"
    # anywhere but in a running async task, there is nobody to tell
    assert escala.service.report_progress(0.5) is False


def test_without_a_valid_key_nothing_is_served(site: Site) -> None:
    with httpx.Client(base_url=site.server.url) as anonymous:
        response = anonymous.post("/v1/jobs", json={"task": "echo"})
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert "API key" in response.json()["detail"]
        wrong = {"Authorization": "Bearer esk_not-a-key"}
        assert anonymous.get("/v1/tasks", headers=wrong).status_code == 401
        # what operators and orchestrators need stays open
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        assert anonymous.get("/metrics").status_code == 200


def test_nobody_sees_or_cancels_another_users_job(site: Site) -> None:
    with site.client("alice") as alice, site.client("bob") as bob:
        job = submit(alice, "hold", "private")
        path = f"/v1/jobs/{job['id']}"
        assert bob.get(path).status_code == 404
        assert bob.get(path + "/wait", params={"timeout": 0}).status_code == 404
        assert bob.get(path + "/events", params={"timeout": 0}).status_code == 404
        assert bob.delete(path).status_code == 404
        assert bob.get(path).json() == {"detail": "no such job"}
        assert alice.get(path).json()["state"] in ("queued", "running")
        assert alice.delete(path).json()["state"] == "cancelled"


def test_bad_requests_are_named_and_refused(site: Site) -> None:
    with site.client() as alice:
        missing = alice.post("/v1/jobs", json={"args": [1]})
        assert missing.status_code == 422
        assert missing.json()["detail"][0]["loc"] == ["body", "task"]
        typed = alice.post("/v1/jobs", json={"task": "echo", "priority": "high"})
        assert typed.status_code == 422
        assert typed.json()["detail"][0]["loc"] == ["body", "priority"]
        extra = alice.post("/v1/jobs", json={"task": "echo", "code": "import os"})
        assert extra.status_code == 422
        assert extra.json()["detail"][0]["loc"] == ["body", "code"]
        garbled = alice.post(
            "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert garbled.status_code == 422
        form = alice.post("/v1/jobs", content=b'{"task": "echo"}', headers={"content-type": ""})
        assert form.status_code == 422
        assert "Content-Type: application/json" in form.json()["detail"]
        unknown = alice.post("/v1/jobs", json={"task": "os.system", "args": ["true"]})
        assert unknown.status_code == 404
        assert "GET /v1/tasks" in unknown.json()["detail"]
        misfit = alice.post("/v1/jobs", json={"task": "square", "args": [1, 2]})
        assert misfit.status_code == 422
        assert "square" in misfit.json()["detail"]
        huge = alice.post("/v1/jobs", json={"task": "echo", "args": ["x" * (2 << 20)]})
        assert huge.status_code == 413
        assert alice.post("/v1/run/nope").status_code == 404
        assert alice.get("/v1/jobs/" + "0" * 32).status_code == 404
        for response in (missing, typed, extra, garbled, unknown, misfit, huge):
            assert "Traceback" not in response.text


def test_the_same_idempotency_key_gives_the_same_job(site: Site) -> None:
    with site.client("alice") as alice, site.client("bob") as bob:
        first = alice.post(
            "/v1/jobs", json={"task": "square", "args": [3], "idempotency_key": "k1"}
        )
        again = alice.post(
            "/v1/jobs", json={"task": "square", "args": [3], "idempotency_key": "k1"}
        )
        assert first.status_code == again.status_code == 202
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["idempotent-replayed"] == "true"
        other = alice.post(
            "/v1/jobs", json={"task": "square", "args": [4], "idempotency_key": "k1"}
        )
        assert other.status_code == 409
        assert "already used for job" in other.json()["detail"]
        theirs = bob.post("/v1/jobs", json={"task": "square", "args": [3], "idempotency_key": "k1"})
        assert theirs.json()["id"] != first.json()["id"]

    async def race() -> set[str]:
        headers = {"Authorization": f"Bearer {site.keys['alice']}"}
        async with httpx.AsyncClient(base_url=site.server.url, headers=headers) as client:
            body = {"task": "echo", "args": [1], "idempotency_key": "raced"}
            answers = await asyncio.gather(*(client.post("/v1/jobs", json=body) for _ in range(20)))
        assert {a.status_code for a in answers} == {202}
        return {a.json()["id"] for a in answers}

    assert len(asyncio.run(race())) == 1


def test_cancel_a_queued_job_and_a_running_one(site: Site) -> None:
    with site.client() as alice:
        # fill all 8 I/O slots, so that the next I/O job has to wait
        holds = [submit(alice, "hold", "cancel") for _ in range(8)]
        for job in holds:
            with alice.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
                for line in stream.iter_lines():
                    if line == "event: running":
                        break
        waiting = submit(alice, "echo", "never")
        assert alice.get(f"/v1/jobs/{waiting['id']}").json()["state"] == "queued"
        cancelled = alice.delete(f"/v1/jobs/{waiting['id']}")
        assert cancelled.json()["state"] == "cancelled"
        assert cancelled.json()["error"]["type"] == "Cancelled"
        conflict = alice.delete(f"/v1/jobs/{waiting['id']}")
        assert conflict.status_code == 409
        # a running async job is stopped at once, which frees its slot
        stopped = alice.delete(f"/v1/jobs/{holds[0]['id']}").json()
        assert stopped["state"] == "cancelled"
        assert (
            alice.post("/v1/run/release", json={"args": ["cancel"]}).json()["state"] == "succeeded"
        )
        assert [wait(alice, job["id"])["state"] for job in holds[1:]] == ["succeeded"] * 7
        assert wait(alice, waiting["id"])["state"] == "cancelled"
        assert wait(alice, holds[0]["id"])["state"] == "cancelled"


def test_run_answers_in_the_request_with_a_deadline(site: Site) -> None:
    with site.client() as alice:
        answer = alice.post("/v1/run/square", json={"args": [9]})
        assert answer.status_code == 200
        assert answer.json()["state"] == "succeeded"
        assert answer.json()["result"] == 81
        assert alice.post("/v1/run/boom").json()["error"]["type"] == "ValueError"
        late = alice.post("/v1/run/hold", json={"args": ["forever"]}, params={"timeout": 0.2})
        assert late.status_code == 504
        assert "0.2 s" in late.json()["detail"]
        assert alice.post("/v1/run/echo", json={"args": [5]}).json()["result"] == 5


def test_tasks_health_metrics_and_docs(site: Site) -> None:
    with site.client() as alice:
        tasks = {t["name"]: t for t in alice.get("/v1/tasks").json()}
        assert tasks["square"]["pool"] == "cpu"
        assert tasks["square"]["parameters"] == ["x"]
        assert tasks["nap"]["pool"] == "io"
        assert tasks["nap"]["is_async"] is True
        assert "hold" in tasks
        metrics = alice.get("/metrics").text
        assert "escala_loop_lag_seconds_bucket" in metrics
        assert 'escala_jobs_finished_total{pool="cpu",state="succeeded"}' in metrics
        schema = alice.get("/openapi.json").json()
        assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/run/{task}"} <= set(schema["paths"])
        assert alice.get("/docs").status_code == 200
        stats = alice.get("/v1/stats").json()
        assert stats["state"] == "serving"
        assert stats["jobs"]["succeeded"] >= 1


def test_keys_are_stored_hashed(site: Site) -> None:
    data = pathlib.Path(site.server.cwd, "escala.db").read_bytes()
    wal = pathlib.Path(site.server.cwd, "escala.db-wal")
    data += wal.read_bytes() if wal.exists() else b""
    for key in site.keys.values():
        assert key.startswith("esk_")
        assert key.encode() not in data
