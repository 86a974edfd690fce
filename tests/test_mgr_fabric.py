"""The manager's fabric side in one process: the cluster-matching precedence (``registry.match_cluster``),
registration and keepalive against a real :class:`~dfz.mgr.service.Manager` (SQLite, 127.0.0.1, ephemeral
ports), every kind of malformed or wrong ``mgr.*`` message (the manager answers and keeps serving), the
scheduler's runtime reconfiguration, and a daemon fed garbage by a fake manager (it keeps running)."""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import Any

import httpx
import msgpack  # type: ignore[import-untyped]
import pytest
import trio
import zmq

from dfz.broker import Client, ErrorCode, RemoteError, Request, Server
from dfz.mgr.agent import ManagerAgent
from dfz.mgr.messages import (
    MGR_CATALOGUE,
    MgrConfig,
    MgrErrorCode,
    MgrKeepalive,
    MgrListSchedulers,
    MgrRegister,
    MgrRegistered,
    MgrScheduler,
    MgrSchedulers,
)
from dfz.mgr.registry import ClusterView, match_cluster
from dfz.mgr.service import ROOT_PASSWORD_ENV, Manager, ManagerConfig
from dfz.peer.config import DaemonConfig
from dfz.peer.daemon import Daemon
from dfz.sched.config import SchedulerConfig
from dfz.sched.service import SchedulerService, ServiceConfig

pytestmark = pytest.mark.timeout(60)
PASSWORD = "root-password-for-tests"


def _sched(i: int) -> MgrScheduler:
    return MgrScheduler(id=i, hostname=f"s{i}", ip="10.9.9.9", port=8000 + i, endpoint=f"tcp://10.9.9.9:{8000 + i}")


def _cluster(cid: int, *, live: bool = True, **kw: Any) -> ClusterView:
    return ClusterView(id=cid, name=f"c{cid}", schedulers=(_sched(cid),) if live else (), **kw)


def test_cluster_precedence() -> None:
    net = ipaddress.ip_network
    wide = _cluster(1, cidrs=(net("10.0.0.0/8"),))
    narrow = _cluster(2, cidrs=(net("10.1.0.0/16"),))
    by_name = _cluster(3, hostnames=(re.compile(r"^gpu-\d+$"),))
    by_idc = _cluster(4, idcs=("dc-a", "dc-b"))
    by_loc = _cluster(5, location=("cn", "sh"))
    by_loc_wide = _cluster(6, location=("cn",))
    default = _cluster(7, is_default=True)
    every = [wide, narrow, by_name, by_idc, by_loc, by_loc_wide, default]

    def pick(clusters: list[ClusterView] = every, **daemon: str) -> tuple[int | None, str]:
        found, rule = match_cluster(clusters, **daemon)
        return (found.id if found else None), rule

    # CIDR first, the longest prefix winning; then hostname, IDC, location (longest), default.
    assert pick(ip="10.1.2.3", hostname="gpu-1", idc="dc-a", location="cn|sh") == (2, "cidr")
    assert pick(ip="10.2.0.1") == (1, "cidr")
    assert pick(ip="192.168.0.1", hostname="gpu-7", idc="dc-a") == (3, "hostname")
    assert pick(ip="not an ip", hostname="web-1", idc="DC-B", location="cn|sh") == (4, "idc")
    assert pick(hostname="web-1", location="CN|sh|zone-1") == (5, "location")
    assert pick(location="cn|bj") == (6, "location")
    assert pick(location="us|ny", ip="::1") == (7, "default")
    # Clusters without an active scheduler are passed over (the daemon falls to the next rule) ...
    assert pick([_cluster(1, live=False, cidrs=(net("10.0.0.0/8"),)), by_idc, default], ip="10.0.0.1", idc="dc-a") == (4, "idc")
    # ... but the default cluster is the answer even without one; no default and no match: none.
    assert pick([_cluster(9, live=False, is_default=True)], ip="10.0.0.1") == (9, "default")
    assert pick([wide], ip="11.0.0.1") == (None, "none")
    # Ties: the lowest cluster id.
    assert pick([_cluster(12, idcs=("x",)), _cluster(11, idcs=("x",))], idc="x") == (11, "idc")
    assert pick([_cluster(1, cidrs=(net("fd00::/8"),))], ip="fd00::1") == (1, "cidr")


# --- a manager in this process --------------------------------------------------------------------------


async def start_manager(nursery: trio.Nursery, tmp: Path, **settings: Any) -> Manager:
    config = ManagerConfig(
        database=f"sqlite:///{tmp / 'manager.db'}",
        listen="127.0.0.1:0",
        **{"keepalive": 0.2, "liveness": 3, "config_poll": 0.1, "refresh": 1.0, **settings},
    )
    manager = Manager(config, environ={ROOT_PASSWORD_ENV: PASSWORD})
    await nursery.start(manager.run)
    assert manager.fabric_endpoints and manager.fabric_endpoints[0].startswith("tcp://127.0.0.1:")
    return manager


async def rest(manager: Manager) -> httpx.AsyncClient:
    client = httpx.AsyncClient(base_url=manager.urls[0] + "/api/v1", timeout=10)
    answer = await client.post("/sessions", json={"name": "root", "password": PASSWORD})
    assert answer.status_code == 201, answer.text
    return client


async def until(condition: Any, within: float, what: str) -> None:
    """Poll ``condition`` (an async callable) until true; a test of outside state has no event to wait on."""
    deadline = trio.current_time() + within
    while not await condition():
        assert trio.current_time() < deadline, f"{what}: not within {within} s"
        await trio.sleep(0.05)


async def test_register_keepalive_and_inactive_in_process(nursery: trio.Nursery, tmp_path: Path) -> None:
    manager = await start_manager(nursery, tmp_path)
    api = await rest(manager)
    client = Client(MGR_CATALOGUE, manager.fabric_endpoints[0], name="fake-sched")
    await nursery.start(client.run)
    reg = MgrRegister(kind="scheduler", hostname="sched-a", ip="127.0.0.1", port=4000)
    reply = (await client.request(reg)).expect(MgrRegistered)
    assert reply.cluster == "default" and reply.keepalive_ms == 200 and reply.config == {}
    rows = (await api.get("/schedulers")).json()["items"]
    assert [(r["id"], r["state"], r["port"]) for r in rows] == [(reply.instance_id, "active", 4000)]
    clusters = (await api.get("/scheduler-clusters")).json()["items"]
    assert [(c["name"], c["is_default"]) for c in clusters] == [("default", True)]  # made for it, audited
    audit = (await api.get("/audit-logs", params={"per_page": 100})).json()["items"]
    assert {(a["actor_name"], a["action"], a["resource_type"]) for a in audit if a["via"] == "fabric"} == {
        ("fabric", "create", "scheduler_cluster"),
        ("fabric", "create", "scheduler"),
    }

    # Keepalives hold it; silence (but a live fabric session) makes it inactive; a keepalive brings it back.
    for _ in range(5):
        await client.request(MgrKeepalive())
        await trio.sleep(0.15)

    async def state(want: str) -> bool:
        return bool((await api.get(f"/schedulers/{reply.instance_id}")).json()["state"] == want)

    assert await state("active")
    await until(lambda: state("inactive"), 3, "inactive after missed keepalives")
    await client.request(MgrKeepalive())
    await until(lambda: state("active"), 2, "active again after a keepalive")
    # State flips are not audited; registering again with a new port is (an update).
    await client.request(MgrRegister(kind="scheduler", hostname="sched-a", ip="127.0.0.1", port=4001))
    audit = (await api.get("/audit-logs", params={"per_page": 100, "resource_type": "scheduler"})).json()["items"]
    assert [a["action"] for a in audit] == ["create", "update"]
    assert audit[1]["changes"] == {"port": {"from": 4000, "to": 4001}}

    # A session that ends makes its instance inactive at once.
    client2 = Client(MGR_CATALOGUE, manager.fabric_endpoints[0], name="fake-seed")
    with trio.CancelScope() as scope:
        nursery.start_soon(client2.run)
        seed = (await client2.request(MgrRegister(kind="seed_peer", hostname="seed-a", ip="127.0.0.1", port=5000))).expect(
            MgrRegistered
        )
        assert seed.cluster == "default"
    scope.cancel()

    async def seed_inactive() -> bool:
        return bool((await api.get(f"/seed-peers/{seed.instance_id}")).json()["state"] == "inactive")

    await until(seed_inactive, 2, "seed peer inactive after bye")
    await api.aclose()
    manager.stop()


def raw(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header)  # type: ignore[no-any-return]


async def test_malformed_and_wrong_messages_never_stop_the_manager(nursery: trio.Nursery, tmp_path: Path) -> None:
    manager = await start_manager(nursery, tmp_path)
    endpoint = manager.fabric_endpoints[0]

    # Raw bytes on a DEALER: garbage, wrong types, unknown types, too many frames. Answered where an id is.
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    hello = {"t": "hello", "v": 1, "id": 1, "dl": 0, "name": "fuzz"}
    bad: list[list[bytes]] = [
        [b"\xc1\xc1 not msgpack"],
        [
            raw(
                {
                    "t": "mgr.register",
                    "v": 1,
                    "id": 2,
                    "dl": 0,
                    "kind": "scheduler",
                    "hostname": "h",
                    "ip": "1.2.3.4",
                    "port": "x",
                }
            )
        ],
        [raw({"t": "mgr.register", "v": 1, "id": 3, "dl": 0, "kind": "mystery", "hostname": "h", "ip": "1.2.3.4", "port": 1})],
        [raw({"t": "mgr.list_schedulers", "v": 1, "id": 4, "dl": 0, "host_id": "h", "hostname": "x" * 5000})],
        [raw({"t": "mgr.nope", "v": 1, "id": 5, "dl": 0})],
        [raw({"t": "mgr.keepalive", "v": 1, "id": 6, "dl": 0}), b"extra"],
        [raw({"t": "mgr.config", "v": 1, "id": 7, "dl": 0, "target": "daemon", "config": {}})],  # a server push, sent to a server
        [raw({"t": "mgr.register", "v": 9, "id": 8, "dl": 0})],
        [
            raw(
                {
                    "t": "mgr.register",
                    "v": 1,
                    "id": 9,
                    "dl": 0,
                    "kind": "scheduler",
                    "hostname": "bad host!",
                    "ip": "x",
                    "port": 1,
                }
            )
        ],
    ]

    def exchange() -> dict[int, int]:
        sock.send_multipart([raw(hello)])
        assert sock.poll(5000), "no welcome"
        sock.recv_multipart()
        for frames in bad:
            sock.send_multipart(frames)
        codes: dict[int, int] = {}
        while sock.poll(1000):
            head = msgpack.unpackb(sock.recv_multipart()[0])
            if head.get("t") == "error":
                codes[head["id"]] = head["code"]
        return codes

    codes = await trio.to_thread.run_sync(exchange)
    sock.close()
    assert codes == {
        2: ErrorCode.INVALID,
        3: ErrorCode.INVALID,
        4: ErrorCode.INVALID,
        5: ErrorCode.UNKNOWN_TYPE,
        6: ErrorCode.TOO_LARGE,
        7: ErrorCode.UNEXPECTED,
        8: ErrorCode.VERSION,
        9: ErrorCode.INVALID,
    }, codes

    # Well-formed but wrong: answered with the manager's codes.
    client = Client(MGR_CATALOGUE, endpoint, name="wrong")
    await nursery.start(client.run)
    wrong: list[tuple[Any, int]] = [
        (MgrKeepalive(), MgrErrorCode.NOT_REGISTERED),
        (MgrRegister(kind="scheduler", hostname="h", ip="not-an-ip", port=1), MgrErrorCode.BAD_VALUE),
        (MgrRegister(kind="scheduler", hostname="h", ip="10.0.0.1", port=1, cluster="nowhere"), MgrErrorCode.UNKNOWN_CLUSTER),
        (MgrRegister(kind="seed_peer", hostname="h", ip="10.0.0.1", port=1, cluster_id=77), MgrErrorCode.UNKNOWN_CLUSTER),
    ]
    for msg, code in wrong:
        with pytest.raises(RemoteError) as caught:
            await client.request(msg)
        assert caught.value.code == code, (msg, caught.value)
    # A daemon of no cluster is answered "none" with nothing in it, not an error; the manager still serves.
    answer = (await client.request(MgrListSchedulers(host_id="d1", hostname="d1", ip="garbage"))).expect(MgrSchedulers)
    assert (answer.matched_by, answer.schedulers, answer.cluster_id) == ("none", [], 0)
    ok = (await client.request(MgrRegister(kind="scheduler", hostname="h", ip="10.0.0.1", port=1))).expect(MgrRegistered)
    assert ok.instance_id >= 1
    assert manager.fabric is not None and manager.fabric.server.stats.bad_frames
    api = await rest(manager)
    assert (await api.get("/schedulers")).json()["total"] == 1
    await api.aclose()
    manager.stop()


async def test_scheduler_reconfigure_keeps_its_invariants(nursery: trio.Nursery) -> None:
    service = SchedulerService(ServiceConfig(listen=("tcp://127.0.0.1:0",), scheduler=SchedulerConfig(load_weight=0.6)))
    await nursery.start(service.run)
    taken, ignored = service.reconfigure({"load_weight": 0.1, "idc_weight": 2.0, "max_peers_per_task": 3, "host_timeout": 1.0})
    assert taken == ["idc_weight", "load_weight"] and ignored == ["host_timeout", "max_peers_per_task"]
    core = service.core
    assert (core.config.load_weight, core.config.idc_weight, core.config.max_peers_per_task) == (0.1, 2.0, 20000)
    assert getattr(core.evaluator, "idc_weight", None) == 2.0
    before = core.config
    for bad in ({"candidate_parent_sample": 1, "candidate_parent_limit": 4}, {"load_weight": -1}, {"candidate_parent_limit": 99}):
        with pytest.raises(ValueError):
            service.reconfigure(bad)
        assert core.config is before
    service.reconfigure({})  # back to the start configuration
    assert core.config == service.config.scheduler
    core.check_invariants()


async def test_daemon_survives_a_manager_that_sends_garbage(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A fake manager answers with schedulers that are not addresses and pushes settings of wrong types and
    ranges: the daemon ignores them and keeps running; good settings pushed afterwards apply."""
    fake = Server(MGR_CATALOGUE, ["tcp://127.0.0.1:0"], name="fake-mgr")
    sessions: list[bytes] = []

    def lookup(req: Request) -> MgrSchedulers:
        sessions.append(req.peer.routing_id)
        bad = [
            MgrScheduler(id=1, hostname="x", ip="no-such-host", port=1, endpoint="tcp://no-such-host:1"),
            MgrScheduler(id=2, hostname="y", ip="127.0.0.1", port=0, endpoint="garbage"),
        ]
        return MgrSchedulers(cluster_id=1, cluster="c", matched_by="default", schedulers=bad, config={"upload_slots": "many"})

    fake.handle_now(MgrListSchedulers, lookup)
    await nursery.start(fake.run)
    config = DaemonConfig(data_dir=tmp_path / "d", manager=fake.endpoints[0], heartbeat=0.2, direct_io=False)
    daemon = await nursery.start(Daemon(config).run)
    await until(lambda: _true(bool(sessions)), 5, "the daemon asked the fake manager")
    assert daemon.ring is None and not daemon._links  # nothing usable was given
    garbage: list[dict[str, Any]] = [
        {"upload_slots": 0},
        {"upload_rate_limit": -5, "upload_slots": True},
        {"download_rate_limit": 2**62 + 1},
    ]
    for settings in garbage:
        await fake.push(sessions[-1], MgrConfig(target="daemon", config=settings))
    await fake.push(sessions[-1], MgrConfig(target="daemon", config={"upload_rate_limit": 123456, "upload_slots": 3}))
    await until(lambda: _true(daemon.settings == {"upload_rate_limit": 123456, "upload_slots": 3}), 5, "good settings applied")
    assert daemon.piece_server.limiter.bucket.rate == 123456 and daemon.piece_server.config.upload_slots == 3
    assert daemon.download_limiter.bucket.rate == 0
    await fake.push(sessions[-1], MgrConfig(target="daemon", config={}))  # every setting back to the daemon's own
    await until(lambda: _true(daemon.settings == {}), 5, "settings withdrawn")
    assert daemon.piece_server.limiter.bucket.rate == 0 and daemon.piece_server.config.upload_slots == config.upload_slots


async def _true(value: bool) -> bool:
    return value


async def test_agent_keeps_trying_an_absent_manager(nursery: trio.Nursery) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    got: list[Any] = []
    agent = ManagerAgent(
        f"tcp://127.0.0.1:{port}",
        name="lonely",
        on_config=lambda target, settings: got.append(settings),
        registration=lambda: MgrRegister(kind="scheduler", hostname="h", ip="127.0.0.1", port=1),
        heartbeat=0.1,
    )
    await nursery.start(agent.run)
    await trio.sleep(0.5)
    assert not agent.connected and agent.registered is None and got == []


async def test_daemon_registers_as_a_host_and_keeps_alive(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A daemon with a manager is a host there (``hosts``, through the REST API): active while it keeps alive,
    in the cluster that serves it, inactive once it stops; a host registration without a host id is refused."""
    manager = await start_manager(nursery, tmp_path)
    api = await rest(manager)
    cluster = (await api.post("/scheduler-clusters", json={"name": "c", "is_default": True})).json()
    fabric = manager.fabric
    assert fabric is not None  # a host's cluster is the one the manager's snapshot matches when it registers
    await until(lambda: _true(fabric.snapshot.cluster(cluster["id"]) is not None), 5, "the manager saw the cluster")
    config = DaemonConfig(
        data_dir=tmp_path / "d",
        manager=manager.fabric_endpoints[0],
        heartbeat=0.2,
        direct_io=False,
        idc="dc-1",
        host_id="host-77",
    )

    async def host_state() -> str:
        items = (await api.get("/hosts", params={"host_id": "host-77"})).json()["items"]
        return str(items[0]["state"]) if items else "absent"

    async with trio.open_nursery() as daemon_nursery:
        daemon_nursery.start_soon(Daemon(config).run)
        await until(lambda: _is(host_state(), "active"), 10, "the daemon registered as a host")
        await trio.sleep(1.0)  # five keepalive intervals: still active
        assert await host_state() == "active"
        [host] = (await api.get("/hosts", params={"host_id": "host-77"})).json()["items"]
        assert host["scheduler_cluster_id"] == cluster["id"] and host["idc"] == "dc-1" and host["port"] > 0
        assert host["last_keepalive_at"] is not None and host["type"] == "normal" and host["os"]
        daemon_nursery.cancel_scope.cancel()  # the daemon stops
    await until(lambda: _is(host_state(), "inactive"), 5, "the host inactive once its daemon stopped")
    audit = (await api.get("/audit-logs", params={"resource_type": "host"})).json()["items"]
    assert [(a["actor_name"], a["action"]) for a in audit] == [("fabric", "create")]

    client = Client(MGR_CATALOGUE, manager.fabric_endpoints[0], name="no-id")
    await nursery.start(client.run)
    with pytest.raises(RemoteError) as refused:
        await client.request(MgrRegister(kind="host", hostname="h", ip="127.0.0.1", port=1))
    assert refused.value.code == MgrErrorCode.BAD_VALUE
    await api.aclose()
    manager.stop()


async def _is(value: Any, want: str) -> bool:
    return bool(await value == want)
