"""``escala serve`` and ``escala keys`` as a user runs them, and the app mounted in another."""

from __future__ import annotations

import contextlib
import pathlib
import socket
import threading
from collections.abc import Iterator

import httpx
import uvicorn
from fastapi import FastAPI

import escala
from escala.service import Service, ServiceConfig, create_app
from svc import escala as run_escala
from svc import serving, write_app


def test_keys_are_made_listed_and_removed(tmp_path: pathlib.Path) -> None:
    made = run_escala(tmp_path, "keys", "add", "alice", "--weight", "2", "--rate", "10")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("esk_") and len(key) > 40
    assert "shown only now" in made.stderr
    listed = run_escala(tmp_path, "keys", "list")
    assert listed.stdout.split() == ["alice", "weight", "2", "10/s"]
    assert key not in listed.stdout
    again = run_escala(tmp_path, "keys", "add", "alice")
    assert again.returncode == 2
    assert "alice" in again.stderr and "remove" in again.stderr
    assert "Traceback" not in again.stderr
    assert run_escala(tmp_path, "keys", "remove", "alice").returncode == 0
    gone = run_escala(tmp_path, "keys", "remove", "alice")
    assert gone.returncode == 2
    assert "has no key" in gone.stderr
    bad = run_escala(tmp_path, "keys", "add", "bob", "--weight", "0")
    assert bad.returncode == 2


def test_serve_mistakes_are_one_line_errors(tmp_path: pathlib.Path) -> None:
    write_app(tmp_path)
    (tmp_path / "empty.py").write_text("x = 1\n")
    cases = {
        ("--app", "no_such_module"): "cannot import the app module 'no_such_module'",
        ("--app", "empty"): "registers no task",
        ("--app", "svcapp", "--no-auth", "--host", "0.0.0.0"): "only allowed on a loopback",
        ("--app", "svcapp", "--db", "missing/escala.db"): "missing",
        ("--app", "svcapp", "--port", "70000"): "port must be between 0 and 65535",
    }
    for args, expected in cases.items():
        done = run_escala(tmp_path, "serve", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert expected in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_port_in_use_is_said_plainly(tmp_path: pathlib.Path) -> None:
    write_app(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = run_escala(tmp_path, "serve", "--app", "svcapp", "--no-auth", "--port", port)
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_no_auth_is_announced_loudly(tmp_path: pathlib.Path) -> None:
    write_app(tmp_path)
    with serving(tmp_path, "--no-auth") as server:
        assert "WARNING: no API keys" in server.text()


@escala.task(kind="io", name="double")
async def double(x: int) -> int:
    return 2 * x


@contextlib.contextmanager
def uvicorn_in_a_thread(app: FastAPI) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn")
    thread.start()
    try:
        # the server says when it is up; nothing to poll but its own flag
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            thread.join(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def test_the_service_mounts_inside_an_existing_app(tmp_path: pathlib.Path) -> None:
    config = ServiceConfig(db=tmp_path / "jobs.db", auth=False, cpu_workers=1)
    service = Service(config, {"double": double})
    host = FastAPI(lifespan=service.lifespan)

    @host.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    host.mount("/jobs", create_app(service, manage=False))
    with uvicorn_in_a_thread(host) as url, httpx.Client(base_url=url) as client:
        assert client.get("/hello").json() == {"hello": "world"}
        assert client.post("/jobs/v1/run/double", json={"args": [21]}).json()["result"] == 42
        job = client.post("/jobs/v1/jobs", json={"task": "double", "args": [4]}).json()
        done = client.get(f"/jobs/v1/jobs/{job['id']}/wait").json()
        assert done["result"] == 8
        assert "escala — live" in client.get("/jobs/").text
        assert client.get("/jobs/healthz").json() == {"status": "ok"}
    assert service.state.value == "stopped"
