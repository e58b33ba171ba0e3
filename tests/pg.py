"""A PostgreSQL server for the tests: the one in ``ESCALA_TEST_PG_URL``, or a throwaway one.

Without ``ESCALA_TEST_PG_URL``, ``server()`` looks for PostgreSQL's own tools (``initdb``
and ``pg_ctl`` on PATH, or Debian's ``/usr/lib/postgresql/<version>/bin``), creates a
cluster in a temporary folder, starts it on a free port of 127.0.0.1 and stops it at
the end. PostgreSQL refuses to run as root, so as root both run as the ``postgres`` OS
user (``runuser``), who owns the folder. ``pg_ctl`` daemonizes the postmaster: it is not
a child of the tests' process, so the left-behind check does not see it.

Where no server can be had, the tests skip, except on CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator

import psycopg
import pytest

URL_VARIABLE = "ESCALA_TEST_PG_URL"


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"no PostgreSQL for the tests on CI: {reason}", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def server(*, durable: bool = False) -> Iterator[str]:
    """Yield the URL of a PostgreSQL server's ``postgres`` database, superuser, no password.

    ``durable`` keeps PostgreSQL's fsync on (for benchmarks that compare durable stores);
    by default the throwaway server skips it, for speed.
    """
    url = os.environ.get(URL_VARIABLE)
    if url:
        yield url
        return
    initdb, pg_ctl = _tool("initdb"), _tool("pg_ctl")
    if initdb is None or pg_ctl is None:
        _unavailable(f"set {URL_VARIABLE}, or install PostgreSQL (initdb and pg_ctl)")
        return  # pragma: no cover - skip and fail raise
    prefix: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("running as root and there is no 'postgres' user to run PostgreSQL")
            return  # pragma: no cover
        prefix = ["runuser", "-u", "postgres", "--"]
    folder = tempfile.mkdtemp(prefix="escala-pg-")  # in /tmp: the postgres user can reach it
    if owner is not None:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    data, log, port = os.path.join(folder, "data"), os.path.join(folder, "log"), _free_port()

    def pg(*args: str) -> None:
        done = subprocess.run(
            [*prefix, *args], capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            logged = ""
            with contextlib.suppress(OSError), open(log) as file:
                logged = file.read()[-3000:]
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({done.returncode}): {done.stdout}{done.stderr}"
                f"{logged}"
            )

    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=200"
    if not durable:
        options += " -c fsync=off -c full_page_writes=off"  # throwaway: speed over safety
    try:
        pg(initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        pg(pg_ctl, "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start")
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            pg(pg_ctl, "-D", data, "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def database(server_url: str) -> Iterator[str]:
    """Yield the URL of a fresh, empty database on that server; drop it after.

    ``server_url`` is a ``postgresql://`` URL (as ``ESCALA_TEST_PG_URL`` must be): the
    new database's URL is the same with another path.
    """
    name = f"escala_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield urllib.parse.urlsplit(server_url)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
