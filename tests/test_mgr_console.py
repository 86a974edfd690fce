"""The manager's web console at the HTTP and websocket level (the page itself is driven by a browser in
``test_console_browser.py``): its static files come from the package with a strict Content-Security-Policy
and no framing; ``/api/v1/users/me/permissions`` and ``/api/v1/task-id``; a session cookie sent from another
site's page changes nothing; the swarm websocket refuses a handshake from another origin, answers without
credentials (or without ``cluster:read``) with an error and a close code, answers malformed messages with
an error and stays open; the rates of a swarm are counter differences over the scheduler's clock; and the
task's scheduler is found along the task's preference order on the ring, asked again directly, and looked
for again when it forgets the task; the overview sums the schedulers' rates; and against two real schedulers
(one with ``inspect = false``) the overview and a watch say which answers and why not.

A real manager (SQLite, 127.0.0.1, ephemeral ports) serves, in this process; clients are httpx and
trio-websocket."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection, open_websocket_url

from dfz.mgr import console
from dfz.mgr.auth import Principal
from dfz.mgr.console import CONTENT_SECURITY_POLICY, SwarmUnavailable, console_files
from dfz.mgr.fabric import ManagerFabric
from dfz.mgr.messages import MgrScheduler
from dfz.mgr.registry import ClusterView, Snapshot
from dfz.mgr.service import ROOT_PASSWORD_ENV, Manager, ManagerConfig
from dfz.mgr.swarm import SwarmInspector, shape
from dfz.peer.schedring import SchedulerRing
from dfz.sched.messages import InspectHost, InspectPeer, InspectTask, SchedSnapshot
from dfz.sched.service import SchedulerService, ServiceConfig, _manager_agent
from dfz.tasks import task_id

pytestmark = pytest.mark.timeout(60)

PASSWORD = "console-root-password"
WS = "/api/v1/ws/swarm"


@pytest.fixture
async def manager(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Manager]:
    config = ManagerConfig(database=f"sqlite:///{tmp_path / 'manager.db'}", listen="127.0.0.1:0")
    m = Manager(config, environ={ROOT_PASSWORD_ENV: PASSWORD})
    await nursery.start(m.run)
    yield m
    m.stop()


@pytest.fixture
async def root(manager: Manager) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=manager.urls[0], timeout=20) as client:
        answer = await client.post("/api/v1/sessions", json={"name": "root", "password": PASSWORD})
        assert answer.status_code == 201, answer.text
        yield client


def hdr(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in pairs]


def close_code(closed: pytest.ExceptionInfo[ConnectionClosed]) -> int | None:
    reason = closed.value.reason
    return None if reason is None else reason.code


def ws_url(manager: Manager) -> str:
    return manager.urls[0].replace("http://", "ws://", 1) + WS


async def next_json(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(10):
        message = await ws.get_message()
    assert isinstance(message, str)
    parsed: dict[str, Any] = json.loads(message)
    return parsed


# --- static files -------------------------------------------------------------------------------------------


async def test_static_files_come_from_the_package_with_a_strict_policy(manager: Manager) -> None:
    files = console_files()
    assert {"index.html", "app.js", "app.css", "api.js", "dom.js", "swarm.js"} <= files.keys()
    async with httpx.AsyncClient(base_url=manager.urls[0], timeout=20) as client:
        moved = await client.get("/console")
        assert moved.status_code == 308 and moved.headers["location"] == "/console/"
        for path, name, kind in [
            ("/console/", "index.html", "text/html"),
            ("/console/app.js", "app.js", "text/javascript"),
            ("/console/swarm.js", "swarm.js", "text/javascript"),
            ("/console/app.css", "app.css", "text/css"),
        ]:
            answer = await client.get(path)  # public: the files hold no data
            assert answer.status_code == 200, path
            assert answer.content == files[name][0]
            assert answer.headers["content-type"].startswith(kind)
            assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            assert answer.headers["x-frame-options"] == "DENY"
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert answer.headers["referrer-policy"] == "no-referrer"
        policy = dict(part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";"))
        assert policy["script-src"] == "'self'" and policy["frame-ancestors"] == "'none'" and policy["default-src"] == "'none'"
        for bad in ("/console/nothing.js", "/console/%2e%2e%2fapi.py", "/console/..%2f..%2fservice.py", "/console/manager.db"):
            answer = await client.get(bad)
            assert answer.status_code == 404, bad
            assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    # No markup is built from strings anywhere in the page's scripts, and nothing is fetched from elsewhere.
    for name, (body, _) in files.items():
        text = body.decode()
        assert "innerHTML" not in text and "outerHTML" not in text and "insertAdjacentHTML" not in text, name
        assert "document.write" not in text and "eval(" not in text, name
        assert not re.search(r"""(src|href)=["']?(https?:)?//|from\s+["'](https?:)?//|fetch\(["'](https?:)?//""", text), name
        assert "@import" not in text, name


# --- the REST endpoints the page uses ---------------------------------------------------------------------------


async def test_permissions_and_task_id(manager: Manager, root: httpx.AsyncClient) -> None:
    mine = (await root.get("/api/v1/users/me/permissions")).json()
    assert mine["name"] == "root" and mine["role"] == "root" and mine["permissions"] == ["*"]
    assert mine["via"] == "session" and mine["scopes"] is None and not mine["confined"]
    assert {"cluster", "job", "user", "tenant", "token", "daemon"} <= mine["groups"].keys()

    made = await root.post("/api/v1/personal-access-tokens", json={"name": "ro", "scopes": ["cluster:read"]})
    token = made.json()["token"]
    async with httpx.AsyncClient(base_url=manager.urls[0], timeout=20) as anyone:
        assert (await anyone.get("/api/v1/users/me/permissions")).status_code == 401
        assert (await anyone.get("/api/v1/task-id", params={"url": "http://a/b"})).status_code == 401
        through = await anyone.get("/api/v1/users/me/permissions", headers={"Authorization": f"Bearer {token}"})
        assert through.json()["scopes"] == ["cluster:read"] and through.json()["via"] == "token"

    url = "http://origin.example/data/file.bin?x=1&X-Amz-Signature=abc"
    got = await root.get("/api/v1/task-id", params={"url": url, "tag": "t", "application": "a"})
    assert got.status_code == 200, got.text
    assert got.json()["task_id"] == task_id(url, tag="t", application="a")
    fixed = await root.get("/api/v1/task-id", params={"url": url, "piece_length": 1 << 20, "filtered_query_params": "x"})
    assert fixed.json()["task_id"] == task_id(url, piece_length=1 << 20, filtered_query_params=["x"])
    bads: list[dict[str, str | int]] = [
        {},
        {"url": "ftp://a/b"},
        {"url": "http://a/b", "piece_length": 1000},
        {"url": "http://a/b", "colour": "red"},
    ]
    for bad in bads:
        answer = await root.get("/api/v1/task-id", params=bad)
        assert answer.status_code == 422, (bad, answer.text)


async def test_a_cookie_sent_from_another_site_changes_nothing(root: httpx.AsyncClient) -> None:
    host = root.base_url.netloc.decode()
    forged = await root.post("/api/v1/tenants", json={"name": "forged"}, headers={"Origin": "http://evil.example"})
    assert forged.status_code == 403, forged.text
    assert "this site" in forged.json()["detail"]
    assert (await root.get("/api/v1/tenants", headers={"Origin": "http://evil.example"})).status_code == 200  # reads are not
    own = await root.post("/api/v1/tenants", json={"name": "own"}, headers={"Origin": f"http://{host}"})
    assert own.status_code == 201, own.text
    # A form post (not JSON) is refused whatever its origin.
    form = await root.post("/api/v1/tenants", content=b"name=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 422
    names = [t["name"] for t in (await root.get("/api/v1/tenants")).json()["items"]]
    assert "own" in names and "forged" not in names and "x" not in names


# --- the websocket --------------------------------------------------------------------------------------------


async def test_websocket_refuses_without_credentials_and_from_other_sites(manager: Manager, root: httpx.AsyncClient) -> None:
    url = ws_url(manager)
    async with open_websocket_url(url) as ws:
        refused = await next_json(ws)
        assert refused["type"] == "error" and refused["status"] == 401 and "sign in" in refused["detail"]
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        assert close_code(closed) == 4401
    async with open_websocket_url(url, extra_headers=hdr(("Authorization", "Bearer dfz_not-a-token"))) as ws:
        assert (await next_json(ws))["status"] == 401
    cookie = root.cookies["dfz_session"]
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_websocket_url(
            url, extra_headers=hdr(("Cookie", f"dfz_session={cookie}"), ("Origin", "http://evil.example"))
        ):
            pass
    assert rejected.value.status_code == 403
    # A token without cluster:read: accepted as someone, refused the view.
    made = await root.post("/api/v1/personal-access-tokens", json={"name": "tok", "scopes": ["token"]})
    async with open_websocket_url(url, extra_headers=hdr(("Authorization", f"Bearer {made.json()['token']}"))) as ws:
        refused = await next_json(ws)
        assert refused["status"] == 403 and "cluster:read" in refused["detail"]
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        assert close_code(closed) == 4403


async def test_websockets_open_at_once_are_bounded(
    manager: Manager, root: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console, "MAX_SOCKETS", 2)
    headers = hdr(("Cookie", f"dfz_session={root.cookies['dfz_session']}"))
    async with open_websocket_url(ws_url(manager), extra_headers=headers) as one:
        async with open_websocket_url(ws_url(manager), extra_headers=headers) as two:
            await two.send_message("{}")
            assert (await next_json(two))["status"] == 400  # served
            async with open_websocket_url(ws_url(manager), extra_headers=headers) as three:
                refused = await next_json(three)
                assert refused["status"] == 503 and "live views" in refused["detail"]
        await one.send_message("{}")
        assert (await next_json(one))["status"] == 400
    with trio.fail_after(10):
        while True:  # once the closed sockets' handlers have ended, there is room again
            async with open_websocket_url(ws_url(manager), extra_headers=headers) as again:
                await again.send_message("{}")
                if (await next_json(again))["status"] == 400:
                    break
            await trio.sleep(0.1)


async def test_a_revoked_token_ends_its_open_websocket(
    manager: Manager, root: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console, "REAUTH_INTERVAL", 0.2)
    made = (await root.post("/api/v1/personal-access-tokens", json={"name": "live", "scopes": ["cluster:read"]})).json()
    async with open_websocket_url(ws_url(manager), extra_headers=hdr(("Authorization", f"Bearer {made['token']}"))) as ws:
        await ws.send_message("{}")
        assert (await next_json(ws))["status"] == 400  # served
        await trio.sleep(0.5)  # checked again meanwhile: still valid
        await ws.send_message("{}")
        assert (await next_json(ws))["status"] == 400
        assert (await root.delete(f"/api/v1/personal-access-tokens/{made['id']}")).status_code == 204
        ended = await next_json(ws)
        assert ended["type"] == "error" and ended["status"] == 401 and "revoked" in ended["detail"]
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        assert close_code(closed) == 4401


async def test_websocket_answers_bad_messages_and_stays_open(manager: Manager, root: httpx.AsyncClient) -> None:
    host = root.base_url.netloc.decode()
    headers = hdr(("Cookie", f"dfz_session={root.cookies['dfz_session']}"), ("Origin", f"http://{host}"))
    async with open_websocket_url(ws_url(manager), extra_headers=headers) as ws:
        bad: list[tuple[str | bytes, str]] = [
            ("nonsense", "not JSON"),
            ("[1, 2]", "JSON object"),
            ('{"type": "dance"}', "type"),
            ('{"type": "watch"}', "task_id"),
            ('{"type": "watch", "task_id": "ABC"}', "task_id"),
            (json.dumps({"type": "watch", "task_id": "AB" * 32}), "task_id"),
            (json.dumps({"type": "watch", "task_id": "ab" * 32, "interval": 0}), "interval"),
            (json.dumps({"type": "watch", "task_id": "ab" * 32, "interval": True}), "interval"),
            (json.dumps({"type": "watch", "task_id": "ab" * 32, "pad": "x" * 5000}), "at most"),
            (b"\x00\x01binary", "text"),
        ]
        for message, why in bad:
            await ws.send_message(message)
            answer = await next_json(ws)
            assert answer["type"] == "error" and answer["status"] == 400 and why in answer["detail"], (message, answer)
        # Still open, and a good request is answered: no scheduler knows this task (there is none).
        await ws.send_message(json.dumps({"type": "watch", "task_id": "ab" * 32, "interval": 0.25}))
        first = await next_json(ws)
        assert first == {"type": "unavailable", "task_id": "ab" * 32, "detail": "no scheduler is active"}
        assert (await next_json(ws))["type"] == "unavailable"  # pushed again at the interval
        await ws.send_message('{"type": "stop"}')
        with trio.move_on_after(1) as quiet:
            while True:
                await next_json(ws)  # at most one more, sent before the stop was read
        assert quiet.cancelled_caught


# --- rates ----------------------------------------------------------------------------------------------------


def _snapshot(clock_ms: int, origin: int, peers: int, pieces: dict[str, int]) -> SchedSnapshot:
    task = InspectTask(
        task_id="cd" * 32,
        url="http://o/f",
        state="running",
        content_length=40 << 20,
        piece_length=4 << 20,
        piece_count=10,
        peers=len(pieces),
        bytes_from_origin=origin,
        bytes_from_peers=peers,
    )
    return SchedSnapshot(
        scheduler="s1",
        clock_ms=clock_ms,
        task=task,
        hosts=[InspectHost(host_id="h-seed", hostname="seed", ip="10.0.0.1", port=1, type="seed", upload_rate=5)],
        peers=[
            InspectPeer(
                peer_id=pid,
                host_id="h-seed" if pid == "seed" else f"h-{pid}",
                hostname=pid,
                state="running",
                finished_pieces=done,
                parents=[] if pid == "seed" else ["seed"],
            )
            for pid, done in pieces.items()
        ],
    )


def test_swarm_rates_are_counter_differences_over_the_schedulers_clock() -> None:
    first = _snapshot(10_000, 8 << 20, 0, {"seed": 2, "a": 0})
    shown = shape(first, None)
    assert shown["rates"] == {"from_origin": None, "from_peers": None}
    assert [p["rate"] for p in shown["peers"]] == [None, None]
    second = _snapshot(12_000, 16 << 20, 8 << 20, {"seed": 4, "a": 2, "b": 0})
    shown = shape(second, first)
    assert shown["rates"] == {"from_origin": 4 << 20, "from_peers": 4 << 20}  # 8 MiB each in 2 s
    by_id = {p["peer_id"]: p for p in shown["peers"]}
    assert by_id["seed"]["rate"] == 4 << 20 and by_id["a"]["rate"] == 4 << 20 and by_id["b"]["rate"] is None
    assert by_id["seed"]["host_type"] == "seed" and by_id["seed"]["ip"] == "10.0.0.1" and by_id["a"]["host_type"] == ""
    assert by_id["a"]["parents"] == ["seed"]
    assert shown["task"]["piece_count"] == 10 and shown["task"]["url"] == "http://o/f"
    # A counter that went back (the scheduler restarted, the task was made again): no rate, not a negative one.
    third = _snapshot(13_000, 1 << 20, 0, {"seed": 1})
    assert shape(third, second)["rates"] == {"from_origin": None, "from_peers": None}
    assert shape(third, second)["peers"][0]["rate"] is None


# --- which scheduler is asked ------------------------------------------------------------------------------------


def _mgr_scheduler(sid: int, port: int) -> MgrScheduler:
    return MgrScheduler(id=sid, hostname=f"s{sid}", ip="127.0.0.1", port=port, endpoint=f"tcp://127.0.0.1:{port}")


class _Schedulers(SwarmInspector):
    """The inspector's search and bookkeeping, with scripted schedulers instead of fabric clients: which
    endpoints know which task (None: the scheduler does not answer)."""

    def __init__(self, clusters: tuple[ClusterView, ...], knows: dict[str, bool | None]) -> None:
        super().__init__(cast(ManagerFabric, SimpleNamespace(snapshot=Snapshot(clusters=clusters))))
        self.knows = knows
        self.asked: list[str] = []

    async def snapshot(self, endpoint: str, task_id: str | None, *, tasks: int = 0) -> SchedSnapshot:
        self.asked.append(endpoint)
        known = self.knows.get(endpoint)
        if known is None:
            raise SwarmUnavailable(f"scheduler {endpoint} did not answer")
        calls = self.asked.count(endpoint)
        snap = _snapshot(calls * 1000, calls << 20, 3 * calls << 20, {"seed": 1})
        if task_id is None:  # the totals, and its task among the most active
            assert tasks > 0 and snap.task is not None
            snap.task.running = calls
            snap.bytes_from_origin, snap.bytes_from_peers, snap.tasks = (
                snap.task.bytes_from_origin,
                snap.task.bytes_from_peers,
                [snap.task],
            )
            snap.task, snap.peers = None, []
            return snap
        if not known:
            snap.task, snap.peers = None, []
        else:
            assert snap.task is not None
            snap.task.tenant = "7"
        return snap


def _principal(tenant_id: int | None = None, role: str = "root") -> Principal:
    return Principal(user_id=1, name="u", role=role, permissions=("*",), tenant_id=tenant_id, via="session")


async def test_the_swarm_is_asked_of_the_schedulers_in_the_tasks_preference_order() -> None:
    one = ClusterView(id=1, name="a", schedulers=(_mgr_scheduler(1, 1001), _mgr_scheduler(2, 1002), _mgr_scheduler(3, 1003)))
    two = ClusterView(id=2, name="b", schedulers=(_mgr_scheduler(4, 2001),))
    task = "cd" * 32
    order = SchedulerRing([s.endpoint for s in one.schedulers]).preference(task)
    first, second, third = order
    inspector = _Schedulers((two, one), {first: None, second: False, third: True, "tcp://127.0.0.1:2001": False})
    assert [e for _, _, e in inspector.schedulers_for(task)] == [*order, "tcp://127.0.0.1:2001"]  # clusters by id

    watch = inspector.watch()
    shown = await watch.snapshot(task, _principal())
    # The first is down, the second does not know the task: the third, further along the ring, has it.
    assert inspector.asked == [first, second, third]
    assert shown["scheduler"]["endpoint"] == third and shown["scheduler"]["scheduler_cluster_id"] == 1
    assert shown["rates"]["from_peers"] is None  # the first snapshot has no rates
    shown = await watch.snapshot(task, _principal())
    assert inspector.asked[3:] == [third]  # and is asked again directly
    assert shown["rates"]["from_peers"] == 3 << 20  # 3 MiB more in one second of its clock
    # It forgets the task: the search starts again; nobody knows it: unavailable, saying why.
    inspector.knows[third] = False
    with pytest.raises(SwarmUnavailable) as nobody:
        await watch.snapshot(task, _principal())
    assert "did not answer" in str(nobody.value)
    assert inspector.asked[4:] == [third, first, second, third, "tcp://127.0.0.1:2001"]
    # A principal of another tenant is told nothing of the task; one of its tenant sees it.
    inspector.knows[third] = True
    with pytest.raises(SwarmUnavailable):
        await inspector.watch().snapshot(task, _principal(tenant_id=3))
    assert (await inspector.watch().snapshot(task, _principal(tenant_id=7)))["task"]["tenant"] == "7"
    with pytest.raises(SwarmUnavailable, match="no scheduler is active"):
        await _Schedulers((), {}).watch().snapshot(task, _principal())


async def test_the_cluster_overview_sums_every_schedulers_rates() -> None:
    one = ClusterView(id=1, name="a", schedulers=(_mgr_scheduler(1, 1001), _mgr_scheduler(2, 1002)))
    two = ClusterView(id=2, name="b", schedulers=(_mgr_scheduler(3, 2001),))
    inspector = _Schedulers(
        (one, two), {"tcp://127.0.0.1:1001": True, "tcp://127.0.0.1:1002": None, "tcp://127.0.0.1:2001": True}
    )
    watch = inspector.watch()
    first = await watch.overview(_principal())
    assert [(s["endpoint"], s["ok"]) for s in first["schedulers"]] == [
        ("tcp://127.0.0.1:1001", True),
        ("tcp://127.0.0.1:1002", False),
        ("tcp://127.0.0.1:2001", True),
    ]
    assert "did not answer" in first["schedulers"][1]["error"]
    assert first["rates"] == {"from_origin": None, "from_peers": None}  # nothing to compare with yet
    assert len(first["tasks"]) == 2 and first["tasks"][0]["scheduler"] in ("s1", "s3")
    second = await watch.overview(_principal())
    # Each answering scheduler: 1 MiB more from the origin and 3 MiB more from peers in one second of its clock.
    assert second["schedulers"][0]["rates"] == {"from_origin": 1 << 20, "from_peers": 3 << 20}
    assert second["rates"] == {"from_origin": 2 << 20, "from_peers": 6 << 20}
    assert second["schedulers"][2]["tasks"] == 0 and second["schedulers"][2]["bytes_from_peers"] == 6 << 20
    with pytest.raises(SwarmUnavailable, match="every tenant"):
        await watch.overview(_principal(tenant_id=7))


# --- against real schedulers ---------------------------------------------------------------------------------------


async def test_real_schedulers_one_of_which_refuses_inspections(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Two real schedulers registered with a real manager (in this process); one has ``inspect = false``. The
    overview shows one answering and the other's refusal; a task nobody knows is ``unavailable``, saying so."""
    config = ManagerConfig(database=f"sqlite:///{tmp_path / 'manager.db'}", listen="127.0.0.1:0", keepalive=0.3, config_poll=0.1)
    manager = Manager(config, environ={ROOT_PASSWORD_ENV: PASSWORD})
    await nursery.start(manager.run)
    fabric = manager.fabric_endpoints[0]
    for name, allowed in (("open", True), ("closed", False)):
        settings = ServiceConfig(listen=("tcp://127.0.0.1:0",), manager=fabric, hostname=name, inspect=allowed)
        service = await nursery.start(SchedulerService(settings).run)
        await nursery.start(_manager_agent(service).run)  # as `dfz sched --manager` does (sched/service.py serve)
    assert manager.fabric is not None
    with trio.fail_after(10):
        while True:
            if sum(len(c.schedulers) for c in manager.fabric.snapshot.clusters) == 2:
                break
            await trio.sleep(0.05)
    async with httpx.AsyncClient(base_url=manager.urls[0], timeout=20) as root:
        assert (await root.post("/api/v1/sessions", json={"name": "root", "password": PASSWORD})).status_code == 201
        headers = hdr(("Cookie", f"dfz_session={root.cookies['dfz_session']}"))
        async with open_websocket_url(ws_url(manager), extra_headers=headers) as ws:
            await ws.send_message(json.dumps({"type": "overview", "interval": 0.25}))
            first = await next_json(ws)
            assert first["type"] == "cluster"
            by_name = {s["hostname"]: s for s in first["schedulers"]}
            assert by_name["open"]["ok"] and by_name["open"]["tasks"] == 0 and by_name["open"]["rates"]["from_peers"] is None
            assert not by_name["closed"]["ok"] and "does not answer inspections" in by_name["closed"]["error"]
            second = await next_json(ws)
            assert {s["hostname"]: s for s in second["schedulers"]}["open"]["rates"] == {"from_origin": 0, "from_peers": 0}
            assert second["tasks"] == []

            await ws.send_message(json.dumps({"type": "watch", "task_id": "ef" * 32, "interval": 0.25}))
            while (answer := await next_json(ws))["type"] == "cluster":
                pass  # an overview pushed before the watch was read
            assert answer["type"] == "unavailable" and answer["task_id"] == "ef" * 32
            assert "does not answer inspections" in answer["detail"]  # the open one does not know it: said why not
    manager.stop()
