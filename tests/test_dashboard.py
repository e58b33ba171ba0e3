"""The dashboard at / in a real headless Chromium, against a real server.

The browser is Debian's chromium, found on PATH: Playwright never downloads one here
(there is no network). Without chromium the tests skip, except on CI, where .ci/run
(``bash scripts/run test``) installs it, so that there its absence is a failure.
Every wait is Playwright's own auto-waiting on a condition in the page: no fixed sleeps.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Error, Page, Route, expect, sync_playwright

from svc import serving, write_app

WAIT_MS = 20_000  # how long the page may take to show a change (it polls every second)
SCREENSHOT = pathlib.Path("/tmp/escala-dashboard.png")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UPDATED = re.compile(r"^updated \d\d:\d\d:\d\d$")


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Headless chromium, closed (with Playwright's node driver) before the test ends."""
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(
                "chromium is not on PATH: .ci/run (scripts/run test) should have installed it"
            )
        pytest.skip("chromium is not on PATH (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=path, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            launched.close()


def open_page(browser: Browser) -> tuple[Page, list[str]]:
    """A new page, and the list its JavaScript errors and console errors go to."""
    page = browser.new_page(viewport={"width": 1280, "height": 720})
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(f"console: {message.text}")

    def on_page_error(error: Error) -> None:
        errors.append(f"page error: {error}")

    page.on("console", on_console)
    page.on("pageerror", on_page_error)
    return page, errors


def number(page: Page, selector: str) -> int:
    return int((page.locator(selector).text_content() or "").replace(",", ""))


def reaches(page: Page, selector: str, least: int) -> None:
    """Wait until the number the page shows in ``selector`` is at least ``least``."""
    page.wait_for_function(
        """([selector, least]) => {
            const text = document.querySelector(selector).textContent.replace(/,/g, "");
            return /^\\d+$/.test(text) && Number(text) >= least;
        }""",
        arg=[selector, least],
    )


def submit(client: httpx.Client, task: str, *args: object, priority: int = 0) -> str:
    response = client.post(
        "/v1/jobs", json={"task": task, "args": list(args), "priority": priority}
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def state(client: httpx.Client, job_id: str) -> str:
    return str(client.get(f"/v1/jobs/{job_id}").json()["state"])


def wait(client: httpx.Client, job_id: str) -> str:
    response = client.get(f"/v1/jobs/{job_id}/wait", params={"timeout": 30})
    assert response.status_code == 200, response.text
    ended = str(response.json()["state"])
    assert ended in ("succeeded", "failed", "cancelled"), response.text
    return ended


def test_the_page_shows_the_servers_figures_as_they_change(
    tmp_path: pathlib.Path, browser: Browser
) -> None:
    cwd = write_app(tmp_path)
    # two I/O slots: two held jobs fill them, and every job after them waits in the queue
    with serving(cwd, "--no-auth", "--io-limit", "2") as server, server.client() as client:
        page, errors = open_page(browser)
        holds: list[str] = []
        try:
            page.goto(server.url + "/")
            expect(page).to_have_title("escala — live")
            expect(page.locator("h1")).to_have_text("escala — live")
            expect(page.locator("#updated")).to_have_text(UPDATED)
            expect(page.locator("#error")).to_be_hidden()
            succeeded = number(page, "#succeeded")
            submitted = number(page, "#submitted")

            work = [("echo", i) for i in range(50)] + [("square", i) for i in range(10)]
            work += [("boom", "on purpose")] * 3
            # a few clients at once: each request on one connection takes a while here
            with ThreadPoolExecutor(8) as pool:
                ended = list(pool.map(lambda job: wait(client, submit(client, *job)), work))
            assert ended.count("succeeded") == 60 and ended.count("failed") == 3
            reaches(page, "#succeeded", succeeded + 60)
            reaches(page, "#submitted", submitted + 63)
            reaches(page, "#failed", 3)
            page.wait_for_function(
                "() => Number(document.querySelector('#throughput').textContent) > 0"
            )

            holds = [submit(client, "hold", "gate") for _ in range(7)]
            expect(page.locator("#queue-total")).to_have_text("5")
            rows = page.locator("#users tr")
            expect(rows).to_have_count(1)
            expect(rows.locator("td")).to_have_text(["local", "", "5"])
            expect(page.locator("#use-io")).to_have_text("2 / 2")
            expect(page.locator("#loop-lag")).to_have_text(re.compile(r"^\d+(\.\d+)?$"))
            expect(page.locator("#latency tr")).to_have_count(3)

            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            shutil.copyfile(shot, SCREENSHOT)
            assert errors == []
        finally:
            page.close()
            if holds:
                # the release job waits for an I/O slot like any other: it goes first
                # (priority), and cancelling one held job gives it that slot
                release = submit(client, "release", "gate", priority=1000)
                running = next(job for job in holds if state(client, job) == "running")
                assert client.delete(f"/v1/jobs/{running}").status_code == 200
                assert wait(client, release) == "succeeded"
                ended = sorted(wait(client, job) for job in holds)
                assert ended == ["cancelled"] + ["succeeded"] * 6


def test_an_error_banner_shows_while_the_server_cannot_be_reached(
    tmp_path: pathlib.Path, browser: Browser
) -> None:
    cwd = write_app(tmp_path)
    with serving(cwd, "--no-auth") as server:
        page, _ = open_page(browser)
        banner = page.locator("#error")
        try:
            page.goto(server.url + "/")
            expect(page.locator("#updated")).to_have_text(UPDATED)
            expect(banner).to_be_hidden()

            # the stats fail for a while, then come back: the banner shows, then clears
            page.route("**/v1/stats", lambda route: route.abort("connectionrefused"))
            expect(banner).to_be_visible()
            expect(banner).to_contain_text("Cannot reach the server")
            page.unroute("**/v1/stats")
            expect(banner).to_be_hidden()
            expect(page.locator("#state")).to_have_text("serving")

            server.stop()
            expect(banner).to_be_visible()
            expect(banner).to_contain_text("Cannot reach the server")
            expect(page.locator("#state")).to_have_text("unreachable")
        finally:
            page.close()


def test_the_page_asks_for_its_stats_beside_itself_under_a_prefix(
    tmp_path: pathlib.Path, browser: Browser
) -> None:
    """Mounted under /escala/, the page must ask /escala/v1/stats, not /v1/stats."""
    cwd = write_app(tmp_path)
    with serving(cwd, "--no-auth") as server, server.client() as client:
        page, errors = open_page(browser)
        html = client.get("/").text
        asked: list[str] = []

        def mounted(route: Route) -> None:
            # stands in for a proxy that serves the service under /escala/
            path = route.request.url.removeprefix(server.url)
            asked.append(path)
            if path in ("/escala", "/escala/"):
                route.fulfill(body=html, content_type="text/html; charset=utf-8")
            elif path == "/escala/v1/stats":
                route.fulfill(response=route.fetch(url=server.url + "/v1/stats"))
            else:
                route.fulfill(status=404, body="not under the prefix")

        page.route(f"{server.url}/**", mounted)
        try:
            for address in ("/escala/", "/escala"):
                asked.clear()
                page.goto(server.url + address)
                expect(page.locator("#updated")).to_have_text(UPDATED)
                expect(page.locator("#state")).to_have_text("serving")
                assert "/escala/v1/stats" in asked
                assert set(asked) == {address, "/escala/v1/stats"}, asked
            assert errors == []
        finally:
            page.close()
