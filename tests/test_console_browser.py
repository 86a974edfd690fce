"""The web console in a real browser against a real cluster: headless Chromium (Debian's ``chromium``, driven
by Playwright through ``executable_path``: ``scripts/browser_testbed.py``) and ``dfz mgr``, ``dfz sched``,
``dfz seed`` and ``dfz daemon`` processes on 127.0.0.1, with an HTTP origin in the test.

Through the page only: sign in; the overview shows the scheduler, the seed peer and the host active; a
preheat job made with the form is followed to ``succeeded``, one of a file the origin does not have to
``failed`` with its task's error; the task page finds where that file is cached (the seed peer, through a
``get_task`` job) and deletes it after a confirmation (a ``delete_task`` job), after which nobody holds it;
the live swarm of a download that the origin's rate limit makes last several seconds is drawn, nested (the
daemon under the seed), and changes from one push to the next, with rates; the overview's live part lists
that task and charts every scheduler's throughput; a tenant, a role and a user of both are made with the
admin forms and the user disabled; a personal access token is made and shown once; signing
out ends the session; a guest sees neither administration nor forms its role cannot use (the API refuses
them anyway: ``test_mgr_rbac.py``). No error reaches the browser's console (a Content-Security-Policy
violation would).

Screenshots go to ``tests/artifacts/console/`` (ignored by git; ``$DFZ_TEST_ARTIFACTS`` chooses another
directory); their paths are printed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from e2e_helpers import Procs, Route, dfz_cmd, read_line, serve_origin

from dfz.mgr.service import ROOT_PASSWORD_ENV
from dfz.tasks import task_id

if TYPE_CHECKING:
    from playwright.sync_api import Page

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import browser_testbed

pytestmark = [pytest.mark.timeout(150), pytest.mark.slow]

PASSWORD = "console-browser-password"
PIECE = 1 << 20
SWARM_SIZE = 12 << 20
SWARM_RATE = 512 << 10
"""Bytes/s of each answer of the origin for the swarm's file: 1 MiB pieces, four at a time (the seed's
``origin_concurrency``), about six seconds of download to watch."""


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.1)


def artifacts_dir() -> Path:
    chosen = os.environ.get("DFZ_TEST_ARTIFACTS")
    path = Path(chosen) if chosen else Path(__file__).resolve().parent / "artifacts"
    path = path / "console"
    path.mkdir(parents=True, exist_ok=True)
    return path


class Shots:
    def __init__(self, page: Page) -> None:
        self.page = page
        self.dir = artifacts_dir()
        self.taken: list[Path] = []

    def __call__(self, name: str) -> None:
        path = self.dir / f"{len(self.taken) + 1:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        self.taken.append(path)
        print(f"screenshot: {path}")


@pytest.fixture
def cluster(procs: Procs, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A manager, a scheduler, a seed peer and a daemon; yields the manager's URL and the daemon's API."""
    try:
        browser_testbed.install()
    except browser_testbed.BrowserUnavailable as e:
        pytest.skip(f"no browser for the console test: {e}")
    fabric = f"tcp://127.0.0.1:{free_port()}"
    config = tmp_path / "mgr.toml"
    config.write_text("keepalive = 0.3\nliveness = 3\nrefresh = 2\nconfig_poll = 0.2\njob_poll = 0.1\nseed_wait = 5\n")
    argv = dfz_cmd("mgr", "--config", str(config), "--database", f"sqlite:///{tmp_path / 'm.db'}", "--listen", "127.0.0.1:0")
    with (tmp_path / "mgr.log").open("ab") as log:
        env = {**os.environ, ROOT_PASSWORD_ENV: PASSWORD}
        mgr = procs.start([*argv, "--fabric", fabric, "-v"], stdout=subprocess.PIPE, stderr=log, env=env)
    url = read_line(mgr, "listening")

    def start(*args: str, name: str, ready: str) -> str:
        with (tmp_path / f"{name}.log").open("ab") as err:
            proc = procs.start(dfz_cmd(*args, "-v"), stdout=subprocess.PIPE, stderr=err)
        return read_line(proc, ready)

    start("sched", "--manager", fabric, "--listen", "tcp://127.0.0.1:0", name="sched", ready="listening")
    start("seed", "--data-dir", str(tmp_path / "seed"), "--manager", fabric, name="seed", ready="api")
    api = start("daemon", "--data-dir", str(tmp_path / "daemon"), "--manager", fabric, name="daemon", ready="api")
    with httpx.Client(base_url=url, timeout=10) as client:
        assert client.post("/api/v1/sessions", json={"name": "root", "password": PASSWORD}).status_code == 201

        def active(path: str) -> bool:
            rows = client.get(f"/api/v1/{path}", params={"per_page": 100}).json()["items"]
            return any(r["state"] == "active" for r in rows)

        wait_for(lambda: active("schedulers") and active("seed-peers") and active("hosts"), 15, "the cluster registered")
    yield url, api


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peer_pieces(page: Page) -> dict[str, str]:
    """The swarm tree as drawn: peer id -> its ``done/total`` pieces text."""
    found: dict[str, str] = page.eval_on_selector_all(
        "#swarm-tree li.peer",
        "els => Object.fromEntries(els.map(e => [e.dataset.peer, e.querySelector(':scope > .muted').textContent]))",
    )
    return found


def test_console_in_chromium(cluster: tuple[str, str], procs: Procs, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, api = cluster
    preheat_data = os.urandom(3 << 20)
    swarm_data = os.urandom(SWARM_SIZE)
    routes = {"/preheat.bin": Route(preheat_data), "/swarm.bin": Route(swarm_data, rate=SWARM_RATE)}
    with serve_origin(routes) as origin, sync_playwright() as pw:
        browser = browser_testbed.launch(pw)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        problems: list[str] = []
        # The browser logs every API error answer (a 401 before signing in, a wrong password, a 404 asked for):
        # the page shows those itself. Anything else is a problem: a missing file, a script error, a CSP refusal.
        failed = "Failed to load resource: the server responded with a status of"

        def console(message: Any) -> None:
            api_answer = message.text.startswith(failed) and "/api/v1/" in message.location.get("url", "")
            if message.type == "error" and not api_answer:
                problems.append(f"console {message.type}: {message.text} ({message.location.get('url', '')})")

        page.on("console", console)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        shot = Shots(page)
        expect.set_options(timeout=30_000)
        try:
            # Sign in.
            page.goto(url + "/console/")
            page.fill("#signin-name", "root")
            page.fill("#signin-password", "a wrong password")
            page.click("#signin-submit")
            expect(page.locator("#signin-out .error")).to_contain_text("wrong name or password")
            page.fill("#signin-password", PASSWORD)
            page.click("#signin-submit")
            expect(page.locator("#who-name")).to_have_text("root")

            # The overview: every part of the cluster is there and active.
            for table in ("#schedulers", "#seed-peers", "#hosts"):
                expect(page.locator(f"{table} .badge.state-active")).to_have_count(1)
            shot("overview")

            # A preheat made through the form, followed to its end.
            page.click("a[data-view=jobs]")
            page.fill("#preheat-urls", origin.url + "/preheat.bin")
            page.click("#preheat-submit")
            page.wait_for_url("**/console/#/jobs/*")
            expect(page.locator("#job-state")).to_have_attribute("data-state", "succeeded")
            expect(page.locator("#job-tasks")).to_contain_text("succeeded")
            expect(page.locator("#job-tasks")).to_contain_text("3.0 MiB")
            shot("preheat-succeeded")
            assert origin.served["/preheat.bin"] == len(preheat_data)

            # One the origin cannot serve fails, and the page says why, task by task.
            page.click("a[data-view=jobs]")
            page.fill("#preheat-urls", origin.url + "/missing.bin")
            page.click("#preheat-submit")
            expect(page.locator("#job-state")).to_have_attribute("data-state", "failed")
            expect(page.locator("#job-tasks .error")).to_contain_text("origin_not_found")
            expect(page.locator("#job-error")).not_to_be_empty()
            shot("preheat-failed")

            # Where is it cached: the seed peer, found by URL.
            page.click("a[data-view=tasks]")
            page.fill("#task-url", origin.url + "/preheat.bin")
            page.click("#task-cached")
            expect(page.locator("#job-state")).to_have_attribute("data-state", "succeeded")
            expect(page.locator("#task-id")).to_have_value(task_id(origin.url + "/preheat.bin"))
            holders = page.locator("[id^=cached-] tbody tr")
            expect(holders).to_have_count(1)
            expect(holders).to_contain_text("seed")
            expect(holders).to_contain_text("succeeded")
            shot("task-cached")

            # Delete it from every cache (after the confirmation the page asks for): then nobody holds it.
            page.once("dialog", lambda dialog: dialog.accept())
            page.click("#task-delete")
            expect(page.locator("#job-state")).to_have_attribute("data-state", "succeeded")
            expect(page.locator("[id^=deleted-] tbody tr")).to_contain_text("deleted")
            shot("task-deleted")
            page.click("#task-cached")
            expect(page.locator("#job-state")).to_have_attribute("data-state", "succeeded")
            expect(page.locator("[id^=cached-]")).to_have_text("no peer holds it")

            # The live swarm of a download the origin makes slow: drawn, nested, and changing.
            swarm_url = origin.url + "/swarm.bin"
            out = tmp_path / "swarm.bin"
            get = procs.start(
                dfz_cmd("get", swarm_url, "-O", str(out), "--endpoint", api, "--piece-length", str(PIECE), "--no-progress"),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            swarm_id = task_id(swarm_url, piece_length=PIECE)
            page.goto(f"{url}/console/#/swarm/{swarm_id}")
            expect(page.locator("#swarm-tree li.peer")).to_have_count(2)  # the seed and the daemon
            expect(page.locator("#swarm-tree li.peer li.peer")).to_have_count(1)  # the daemon under the seed
            seen: list[dict[str, str]] = []

            def changed() -> bool:
                now = peer_pieces(page)
                if not seen or now != seen[-1]:
                    seen.append(now)
                return len(seen) >= 3

            wait_for(changed, 20, "the swarm tree changed twice")
            expect(page.locator("#swarm-chart .rate-origin")).to_contain_text("/s")
            expect(page.locator("#swarm-chart polyline.peers")).to_have_count(1)
            updates = int(page.locator("#swarm-status").get_attribute("data-updates") or 0)
            assert updates >= 3, updates
            shot("swarm-live")
            assert get.wait(40) == 0, get.stderr.read().decode() if get.stderr else ""
            assert out.read_bytes() == swarm_data
            done = f"{SWARM_SIZE // PIECE}/{SWARM_SIZE // PIECE}"
            wait_for(lambda: list(peer_pieces(page).values()) == [done, done], 10, "both peers have every piece")
            shot("swarm-done")

            # The overview's live part: every scheduler's totals and the most active tasks, pushed each second.
            page.click("a[data-view=overview]")
            expect(page.locator("#active-tasks-table")).to_contain_text("/swarm.bin")
            expect(page.locator("#live-schedulers")).to_contain_text("answering")
            wait_for(lambda: int(page.locator("#cluster-chart").get_attribute("data-samples") or 0) >= 2, 10, "two pushes")
            expect(page.locator("#cluster-chart .rate-peers")).to_contain_text("/s")
            shot("overview-live")
            assert origin.served["/swarm.bin"] == SWARM_SIZE  # the seed went to the origin; the daemon to the seed

            # Administration, and a personal access token shown once.
            page.click("a[data-view=admin]")
            expect(page.locator("#users-table tbody tr")).to_have_count(1)
            expect(page.locator("#admin-roles")).to_contain_text("tenant-admin")
            # A tenant, a role and a user of both, made with the forms; then the user is disabled.
            page.fill("#tenant-name", "team-a")
            page.click("#tenant-submit")
            expect(page.locator("#tenants-table")).to_contain_text("team-a")
            page.fill("#role-name", "viewer")
            page.check("#role-form input[value='cluster:read']")
            page.check("#role-form input[value='job:read']")
            page.click("#role-submit")
            expect(page.locator("#roles-table")).to_contain_text("cluster:read, job:read")
            expect(page.locator("#user-role option", has_text="viewer")).to_have_count(1)
            expect(page.locator("#user-tenant option", has_text="team-a")).to_have_count(1)
            page.fill("#user-name", "alice")
            page.fill("#user-password", "alice-password")
            page.select_option("#user-role", label="viewer")
            page.select_option("#user-tenant", label="team-a")
            page.click("#user-submit")
            alice = page.locator("#users-table tr", has_text="alice")
            expect(alice).to_contain_text("viewer")
            expect(alice).to_contain_text("team-a")
            page.once("dialog", lambda dialog: dialog.accept())
            alice.locator("button", has_text="Disable").click()
            expect(page.locator("#users-table tr", has_text="alice").locator(".badge")).to_have_text("disabled")
            shot("admin")
            page.click("a[data-view=tokens]")
            page.fill("#token-name", "from-the-console")
            page.check("#token-form input[value='cluster:read']")
            page.click("#token-submit")
            expect(page.locator("#secret-value")).to_contain_text("dfz_")
            token = page.locator("#secret-value").inner_text()
            expect(page.locator("#token-table")).to_contain_text("from-the-console")
            shot("token-made")
            mine = httpx.get(url + "/api/v1/users/me/permissions", headers={"Authorization": f"Bearer {token}"})
            assert mine.status_code == 200 and mine.json()["scopes"] == ["cluster:read"], mine.text

            # Signing out ends the session: the page asks to sign in, and the API refuses the old cookie.
            cookies = {c["name"]: c["value"] for c in page.context.cookies()}
            page.click("#sign-out")
            expect(page.locator("#signin")).to_be_visible()
            old = httpx.get(url + "/api/v1/users/me", cookies={"dfz_session": cookies["dfz_session"]})
            assert old.status_code == 401
            shot("signed-out")

            # A guest (read only) sees no administration and no forms that its role could not use.
            with httpx.Client(base_url=url, timeout=10) as admin:
                assert admin.post("/api/v1/sessions", json={"name": "root", "password": PASSWORD}).status_code == 201
                roles = {r["name"]: r["id"] for r in admin.get("/api/v1/roles").json()["items"]}
                body = {"name": "visitor", "password": "visitor-password", "role_id": roles["guest"]}
                assert admin.post("/api/v1/users", json=body).status_code == 201
            page.fill("#signin-name", "visitor")
            page.fill("#signin-password", "visitor-password")
            page.click("#signin-submit")
            expect(page.locator("#who-name")).to_have_text("visitor")
            expect(page.locator("#nav-admin")).to_be_hidden()
            page.click("a[data-view=jobs]")
            expect(page.locator("#jobs tbody tr")).to_have_count(5)  # two preheats, three task jobs: all readable
            expect(page.locator("#preheat-form")).to_have_count(0)
            page.click("a[data-view=tasks]")
            expect(page.locator("#task-cached")).to_be_hidden()
            expect(page.locator("#task-out")).to_contain_text("job:write")
            page.goto(f"{url}/console/#/jobs/999999")  # what the API answers is said on the page
            expect(page.locator("#job-out .error")).to_have_text("no job with id 999999")
            shot("guest")
        except Exception:
            shot("failure")
            raise
        finally:
            browser.close()
        assert not problems, problems
        print("screenshots:", *shot.taken, sep="\n  ")
