"""``sched.inspect`` / ``sched.snapshot`` (dfz/sched/inspect.py and the scheduler service), on real sockets.

A real ``SchedulerService`` in process, simulated daemons that are real fabric clients (``Daemon`` of
test_sched_service.py), and an observer session that announces nothing and asks for snapshots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_sched_service import (
    CONTENT_LENGTH,
    PIECE_LENGTH,
    TASK,
    URL,
    Daemon,
    RawSession,
    WallClock,
    done,
    service_config,
    wait_until,
)

from dfz.broker import CurveClient, Error, ErrorCode, KeyPair, ProtocolError, RemoteError
from dfz.broker.messages import MAX_HEADER_BYTES
from dfz.sched import (
    SCHED_CATALOGUE,
    AnnounceHost,
    HostType,
    RegisterPeer,
    SchedDigests,
    SchedErrorCode,
    SchedHostLoad,
    SchedInspect,
    SchedParents,
    SchedPieces,
    SchedSeed,
    SchedSnapshot,
    SchedTaskMetadata,
    SchedulerConfig,
    SchedulerCore,
    SchedulerService,
)
from dfz.sched import service as service_module
from dfz.sched.inspect import build_snapshot, connect, inspect, inspect_hosts
from dfz.sched.messages import (
    MAX_INSPECT_HOSTS,
    MAX_INSPECT_PEERS,
    MAX_INSPECT_TASKS,
    MAX_PARENTS,
    InspectHost,
    InspectPeer,
    InspectTask,
)
from dfz.tasks import task_id
from dfz.tickets import TicketSigner


async def test_a_snapshot_shows_hosts_tasks_and_the_swarm_as_the_scheduler_sees_them() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            service: SchedulerService = await nursery.start(SchedulerService(service_config()).run)
            endpoint = service.endpoints[0]
            seed = await Daemon(endpoint, "seed", seed=True, port=4001).start(nursery)
            a = await Daemon(endpoint, "host-a", port=4002).start(nursery)
            b = await Daemon(endpoint, "host-b", port=4003).start(nursery)
            for daemon in (seed, a, b):
                await daemon.announce()
            assert (await a.register("a-1")).assignment == "wait"
            await seed.expect(SchedSeed)
            assert (await seed.register("seed-1")).assignment == "back_to_source"
            await a.expect(SchedParents, lambda m: m.peer_id == "a-1")
            await seed.report(SchedTaskMetadata(peer_id="seed-1", content_length=CONTENT_LENGTH, piece_length=PIECE_LENGTH))
            await seed.report(SchedPieces(peer_id="seed-1", finished=[done(0), done(1)]))
            await a.expect(SchedDigests)  # the digests are known: a piece from a parent can be reported
            await a.report(SchedPieces(peer_id="a-1", finished=[done(0, parent="seed-1")]))
            reg_b = await b.register("b-1")
            assert [p.peer_id for p in reg_b.parents] == ["seed-1", "a-1"]
            await b.report(SchedPieces(peer_id="b-1", finished=[done(0, parent="a-1")]))
            await seed.report(SchedHostLoad(upload_rate=5000, uploads_in_flight=2, upload_peers=2))
            core = service.core
            await wait_until(
                lambda: core.hosts["seed"].upload_rate == 5000 and core.tasks[TASK].bytes_from_peers == 2 * PIECE_LENGTH
            )

            async with connect(endpoint) as observer:
                snap = await inspect(observer, task_id=TASK, host_sort="id")
                # Totals: everything the scheduler holds; the observer announced nothing and is not a host.
                assert (snap.scheduler, snap.tenant, snap.hosts_total, snap.seed_hosts) == ("dfz-sched", "", 3, 1)
                assert (snap.tasks_total, snap.peers_total, snap.downloading) == (1, 3, 3)
                assert (snap.upload_rate, snap.bytes_from_origin, snap.bytes_from_peers) == (
                    5000,
                    2 * PIECE_LENGTH,
                    2 * PIECE_LENGTH,
                )
                assert snap.events == service.stats.events and not snap.truncated
                # Hosts, by id, with the counters their peers' reports made.
                by_id = {h.host_id: h for h in snap.hosts}
                assert [h.host_id for h in snap.hosts] == ["host-a", "host-b", "seed"]
                assert (by_id["seed"].type, by_id["seed"].port, by_id["seed"].upload_rate) == ("seed", 4001, 5000)
                assert (by_id["seed"].bytes_uploaded, by_id["seed"].bytes_downloaded) == (PIECE_LENGTH, 2 * PIECE_LENGTH)
                assert (by_id["host-a"].bytes_uploaded, by_id["host-a"].bytes_downloaded) == (PIECE_LENGTH, PIECE_LENGTH)
                assert (by_id["host-b"].bytes_uploaded, by_id["host-b"].bytes_downloaded) == (0, PIECE_LENGTH)
                assert by_id["seed"].uploads == 2 and by_id["host-a"].uploads == 1 and by_id["seed"].peers == 1
                # The task, and its swarm breadth first from the seed's peer: parents before children.
                assert snap.task is not None and snap.tasks == [snap.task]
                task = snap.task
                assert (task.task_id, task.url, task.state, task.piece_count, task.peers) == (TASK, URL, "running", 3, 3)
                assert (task.back_to_source, task.running, task.finished_pieces) == (1, 2, 4)
                assert (task.bytes_from_origin, task.bytes_from_peers) == (2 * PIECE_LENGTH, 2 * PIECE_LENGTH)
                peers = {p.peer_id: p for p in snap.peers}
                assert [p.peer_id for p in snap.peers] == ["seed-1", "a-1", "b-1"]
                assert [(p.depth, p.parents) for p in snap.peers] == [(0, []), (1, ["seed-1"]), (1, ["seed-1", "a-1"])]
                assert (peers["seed-1"].state, peers["seed-1"].children, peers["seed-1"].uploaded) == ("back_to_source", 2, 1)
                assert (peers["a-1"].hostname, peers["a-1"].finished_pieces, peers["a-1"].uploaded) == ("host-a", 1, 1)

                # Sorts and pages: by measured upload rate the seed comes first; offsets page through.
                first = await inspect(observer, hosts=1)
                assert [h.host_id for h in first.hosts] == ["seed"] and first.hosts_total == 3 and first.peers == []
                second = await inspect(observer, hosts=1, host_offset=1)
                assert [h.host_id for h in second.hosts] == ["host-a"]  # equal rates: by id
                assert (await inspect(observer, host_sort="bytes_downloaded")).hosts[0].host_id == "seed"
                assert (await inspect(observer, hosts=5, host_offset=3)).hosts == []
                assert (await inspect(observer, tasks=0, task_id="0" * 64)).task is None  # unknown: not an error
                every = await inspect_hosts(observer, max_hosts=10, host_sort="id")
                assert [h.host_id for h in every.hosts] == ["host-a", "host-b", "seed"]

            # A one-shot inspection by endpoint opens and closes its own session.
            once = await inspect(endpoint, tasks=1)
            assert [t.task_id for t in once.tasks] == [TASK]
            service.core.check_invariants()
            nursery.cancel_scope.cancel()


async def test_a_tenant_sees_only_its_tenant_and_an_observer_with_no_tenant_sees_all(monkeypatch: pytest.MonkeyPatch) -> None:
    signer = TicketSigner.generate()
    wall = WallClock()
    monkeypatch.setattr(service_module, "time", wall)

    def ticket(host: str, tenant: str) -> bytes:
        return signer.issue(tenant=tenant, tenant_name=f"tenant-{tenant}", host_id=host, now=wall.now, ttl=600)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            service: SchedulerService = await nursery.start(
                SchedulerService(service_config(ticket_keys=(signer.public_key.hex(),))).run
            )
            endpoint = service.endpoints[0]
            a, b = [await Daemon(endpoint, f"host-{x}").start(nursery) for x in "ab"]
            await a.announce(ticket=ticket("host-a", "7"))
            await b.announce(ticket=ticket("host-b", "8"))
            assert (await a.register("a-1")).assignment == "back_to_source"
            task_b = task_id(URL, tenant="8")
            assert (await b.register("b-1", task=task_b)).assignment == "back_to_source"

            # Host a's own session sees tenant 7 only; b's task is as if unknown.
            view = await inspect(a.client, task_id=task_b)
            assert (view.tenant, view.hosts_total, view.tasks_total, view.peers_total) == ("7", 1, 1, 1)
            assert [h.host_id for h in view.hosts] == ["host-a"] and [t.task_id for t in view.tasks] == [TASK]
            assert view.task is None and view.peers == []
            assert (await inspect(a.client, task_id=TASK)).peers[0].peer_id == "a-1"
            # An observer in no tenant sees both.
            everything = await inspect(endpoint, task_id=task_b)
            assert (everything.tenant, everything.hosts_total, everything.tasks_total) == ("", 2, 2)
            assert everything.task is not None and everything.task.tenant == "8"
            nursery.cancel_scope.cancel()


async def test_on_an_encrypted_fabric_a_key_that_holds_a_tenant_host_sees_only_that_tenant_from_any_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tenant's daemon gains nothing by opening a session that announces no host: its CURVE key holds a
    host of the tenant. A key holding hosts of two tenants is refused; an operator's key sees everything."""
    signer = TicketSigner.generate()
    wall = WallClock()
    monkeypatch.setattr(service_module, "time", wall)

    def ticket(host: str, tenant: str) -> bytes:
        return signer.issue(tenant=tenant, tenant_name=f"tenant-{tenant}", host_id=host, now=wall.now, ttl=600)

    keys = tmp_path / "keys"
    server_keys = KeyPair.generate()
    server_keys.save(tmp_path, "sched")
    daemon_7, both, operator = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    for name, pair in (("d7", daemon_7), ("both", both), ("operator", operator)):
        pair.save(keys, name)
    config = service_config(
        curve_secret_key=tmp_path / "sched.key_secret", curve_allowed_keys=(keys,), ticket_keys=(signer.public_key.hex(),)
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            service: SchedulerService = await nursery.start(SchedulerService(config).run)
            endpoint = service.endpoints[0]

            def curve(pair: KeyPair) -> CurveClient:
                return CurveClient(pair, server_keys.public)

            a = await Daemon(endpoint, "host-a", curve=curve(daemon_7)).start(nursery)
            await a.announce(ticket=ticket("host-a", "7"))
            b = await Daemon(endpoint, "host-b", curve=curve(both)).start(nursery)
            await b.announce(ticket=ticket("host-b", "8"))
            await a.register("a-1")

            side = await inspect(endpoint, curve=curve(daemon_7))  # another session, announcing nothing
            assert (side.tenant, side.hosts_total, side.tasks_total) == ("7", 1, 1)
            everything = await inspect(endpoint, curve=curve(operator))
            assert (everything.tenant, everything.hosts_total) == ("", 2)

            c = await Daemon(endpoint, "host-c", curve=curve(both)).start(nursery)
            await c.announce(ticket=ticket("host-c", "7"))  # the same key now holds hosts of tenants 7 and 8
            with pytest.raises(RemoteError) as refused:
                await inspect(endpoint, curve=curve(both))
            assert refused.value.code == SchedErrorCode.NOT_ALLOWED and "several tenants" in refused.value.reason
            own = await inspect(c.client)  # its host's own session: that host's tenant
            assert (own.tenant, own.hosts_total) == ("7", 2)
            nursery.cancel_scope.cancel()


async def test_a_scheduler_with_inspect_off_refuses_and_malformed_inspections_get_invalid() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            closed: SchedulerService = await nursery.start(SchedulerService(service_config(inspect=False)).run)
            with pytest.raises(RemoteError) as e:
                await inspect(closed.endpoints[0])
            assert e.value.code == SchedErrorCode.NOT_ALLOWED and "inspect = false" in e.value.reason
            assert closed.stats.refused["NOT_ALLOWED"] == 1

            service: SchedulerService = await nursery.start(SchedulerService(service_config(heartbeat=1.0)).run)
            raw = RawSession(service.endpoints[0])
            try:
                await raw.hello()
                cases: list[dict[str, Any]] = [
                    {"hosts": MAX_INSPECT_HOSTS + 1},
                    {"hosts": -1},
                    {"tasks": MAX_INSPECT_TASKS + 1},
                    {"peers": MAX_INSPECT_PEERS + 1},
                    {"host_sort": "nonsense"},
                    {"task_sort": 3},
                    {"task_id": TASK.upper()},
                    {"task_id": "x"},
                    {"host_offset": 2**32},
                    {"hosts": True},
                    {"peers": 1.5},
                ]
                for corr, fields in enumerate(cases, start=100):
                    await raw.send_raw({"t": "sched.inspect", "id": corr, **fields})
                    answer = await raw.answer(corr)
                    assert isinstance(answer, Error) and answer.code == ErrorCode.INVALID, (fields, answer)
                # The same session is still served, and an inspect push (no id) is dropped and counted.
                await raw.send_raw({"t": "sched.inspect", "id": 0})
                ok = await raw.call(SchedInspect(hosts=0, tasks=0))
                assert isinstance(ok, SchedSnapshot) and ok.hosts_total == 0
            finally:
                raw.kill()
            # Out-of-bounds arguments are refused before anything is sent.
            with pytest.raises(ValueError, match=r"sched\.inspect"):
                await inspect(service.endpoints[0], hosts=MAX_INSPECT_HOSTS + 1)
            nursery.cancel_scope.cancel()


def test_the_largest_snapshot_fits_the_header_frame_and_stays_a_prefix_of_the_order() -> None:
    long_id, hex64 = "i" * 128, "f" * 64
    host = InspectHost(
        host_id=long_id, hostname="h" * 256, ip="n" * 256, port=65535, type="seed", idc="d" * 256, location="l" * 256,
        tenant="t" * 64, upload_capacity=2**63 - 1, upload_slots=2**32 - 1, uploads=2**32 - 1, upload_rate=2**63 - 1,
        uploads_in_flight=2**32 - 1, upload_peers=2**32 - 1, peers=2**32 - 1, bytes_uploaded=2**63 - 1,
        bytes_downloaded=2**63 - 1,
    )  # fmt: skip
    task = InspectTask(
        task_id=hex64, url="u" * 8192, tag="g" * 256, application="a" * 256, tenant="t" * 64, state="running",
        content_length=2**63 - 1, piece_length=2**32 - 1, piece_count=2**32 - 1, peers=2**32 - 1, finished_pieces=2**63 - 1,
        bytes_from_origin=2**63 - 1, bytes_from_peers=2**63 - 1, age_ms=2**63 - 1,
    )  # fmt: skip
    peer = InspectPeer(
        peer_id=long_id, host_id=long_id, hostname="h" * 256, state="back_to_source", parents=[long_id] * MAX_PARENTS
    )
    # What the budget lets through, at most, with every list as long as the protocol allows past it.
    budget = 56 * 1024
    records = len(msgspec.msgpack.encode(task)) * 2
    hosts = [host] * min(MAX_INSPECT_HOSTS, max(1, (budget - records) // len(msgspec.msgpack.encode(host))))
    snap = SchedSnapshot(scheduler="s" * 256, clock_ms=2**63 - 1, tenant="t" * 64, hosts=hosts, tasks=[task], task=task)
    frames = SCHED_CATALOGUE.encode(snap)
    assert len(frames[0]) < MAX_HEADER_BYTES
    assert SCHED_CATALOGUE.decode(frames)[0] == snap
    too_many = SchedSnapshot(scheduler="s", clock_ms=0, peers=[peer] * (MAX_INSPECT_PEERS + 1))
    with pytest.raises(ProtocolError):
        SCHED_CATALOGUE.decode([msgspec.msgpack.encode(too_many)])


async def test_a_snapshot_of_many_hosts_with_long_names_is_cut_to_the_budget_and_paged() -> None:
    """Hosts whose records are large: one snapshot cannot hold 256 of them; it says so and the pages
    that follow give the rest, each fitting the header frame."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            service: SchedulerService = await nursery.start(SchedulerService(service_config(heartbeat=1.0)).run)
            endpoint = service.endpoints[0]
            names = [f"{k:03d}-" + "x" * 120 for k in range(300)]
            async with connect(endpoint) as observer:
                # Hosts announced straight into the core (on the trio thread, between two events, as the
                # service applies them): 300 sessions would only slow the test down.
                for name in names:
                    service.core.apply(
                        AnnounceHost(host_id=name, hostname="h" * 250, ip="127.0.0.1", port=1, type=HostType.NORMAL,
                                     idc="i" * 200, location="l" * 200, upload_capacity=0, upload_slots=4)
                    )  # fmt: skip
                snap = await inspect(observer, hosts=MAX_INSPECT_HOSTS, host_sort="id")
                assert snap.truncated and 0 < len(snap.hosts) < MAX_INSPECT_HOSTS and snap.hosts_total == 300
                assert [h.host_id for h in snap.hosts] == names[: len(snap.hosts)]
                every = await inspect_hosts(observer, max_hosts=1000, host_sort="id")
                assert [h.host_id for h in every.hosts] == names
            nursery.cancel_scope.cancel()


def test_build_snapshot_reads_the_model_without_a_service() -> None:
    """The builder is sans-I/O: the same model objects the core keeps, no sockets."""

    now = [100.0]
    core = SchedulerCore(SchedulerConfig(), clock=lambda: now[0])
    for k in range(5):
        core.apply(AnnounceHost(host_id=f"h{k}", hostname=f"h{k}", ip="10.0.0.1", port=1, type=HostType.NORMAL,
                                idc="", location="", upload_capacity=0, upload_slots=4))  # fmt: skip
    core.apply(RegisterPeer(peer_id="p0", task_id=TASK, host_id="h0", url=URL, tag="", application="", piece_length=None,
                            back_to_source_allowed=True, headers=()))  # fmt: skip
    now[0] = 102.5
    snap = build_snapshot(
        core.hosts.values(), core.tasks.values(), SchedInspect(hosts=2, task_id=TASK), scheduler="x", now=now[0]
    )
    assert [h.host_id for h in snap.hosts] == ["h0", "h1"] and snap.hosts_total == 5
    assert snap.task is not None and snap.task.age_ms == 2500 and snap.clock_ms == 102_500
    assert [(p.peer_id, p.state, p.depth) for p in snap.peers] == [("p0", "back_to_source", 0)]
    assert build_snapshot([], [], SchedInspect(), scheduler="x", now=0).hosts == []


_INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what MessagePack can carry
_ANY = st.one_of(
    st.none(),
    st.booleans(),
    _INT,
    st.floats(allow_nan=True),
    st.text(max_size=80),
    st.binary(max_size=40),
    st.lists(_INT, max_size=3),
    st.dictionaries(st.text(max_size=3), _INT, max_size=2),
)
_FIELDS = {
    "hosts": st.one_of(st.integers(-2, MAX_INSPECT_HOSTS + 2), _ANY),
    "host_offset": st.one_of(st.integers(-1, 2**32 + 1), _ANY),
    "host_sort": st.one_of(
        st.sampled_from(["upload_rate", "bytes_uploaded", "bytes_downloaded", "uploads", "peers", "id"]), _ANY
    ),
    "tasks": st.one_of(st.integers(-2, MAX_INSPECT_TASKS + 2), _ANY),
    "task_offset": st.one_of(st.integers(-1, 5), _ANY),
    "task_sort": st.one_of(st.sampled_from(["active", "peers", "bytes", "created", "id"]), _ANY),
    "task_id": st.one_of(st.just(TASK), st.none(), st.text(alphabet="0123456789abcdefABCDEF", min_size=63, max_size=65), _ANY),
    "peers": st.one_of(st.integers(-2, MAX_INSPECT_PEERS + 2), _ANY),
    "zz_unknown": _ANY,  # unknown keys are ignored (protocol.md §3)
}
_INSPECTIONS = st.lists(st.fixed_dictionaries({}, optional=_FIELDS), min_size=40, max_size=40)


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(_INSPECTIONS)
def test_fuzzed_inspections_get_a_snapshot_or_invalid_and_the_scheduler_keeps_serving(batch: list[dict[str, Any]]) -> None:
    """Whatever the fields hold, the scheduler answers every sched.inspect with a snapshot that fits the
    header frame or with INVALID, over a swarm it holds, and keeps serving the same session."""

    async def main() -> None:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                service: SchedulerService = await nursery.start(SchedulerService(service_config(heartbeat=1.0)).run)
                seed = await Daemon(service.endpoints[0], "seed", seed=True).start(nursery)
                await seed.announce()
                await seed.register("seed-1")
                raw = RawSession(service.endpoints[0])
                try:
                    await raw.hello()
                    answers: list[str] = []
                    for corr, fields in enumerate(batch, start=1):
                        await raw.send_raw({"t": "sched.inspect", "id": corr, **fields})
                        answer = await raw.answer(corr)
                        if isinstance(answer, SchedSnapshot):
                            answers.append("snapshot")
                            assert answer.hosts_total == 1 and len(SCHED_CATALOGUE.encode(answer)[0]) < MAX_HEADER_BYTES
                        else:
                            assert isinstance(answer, Error) and answer.code == ErrorCode.INVALID, (fields, answer)
                            answers.append("invalid")
                    event(f"{answers.count('snapshot')} snapshots")
                    ok = await raw.call(SchedInspect(task_id=TASK))
                    assert isinstance(ok, SchedSnapshot) and [p.peer_id for p in ok.peers] == ["seed-1"]
                finally:
                    raw.kill()
                nursery.cancel_scope.cancel()

    trio.run(main)
