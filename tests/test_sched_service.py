"""The scheduler's I/O shell (dfz/sched/service.py) and its wire protocol (sched.*), end to end.

In-process ``SchedulerService`` instances and a real ``dfz sched`` process, on real sockets, talked to by
simulated daemons: real fabric clients (or bare DEALERs, where a test must break the rules: vanish
without ``bye``, stop reading, send malformed headers) that speak sched.* exactly as protocol.md says.
Nothing here fakes the scheduler, and nothing waits on a fixed sleep: tests wait for the pushes and
replies they expect, under ``trio.fail_after``.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self, TypeVar

import msgspec
import pytest
import trio
import zmq
from blake3 import blake3
from click.testing import CliRunner

from dfz.broker import (
    Client,
    ClientConfig,
    CurveClient,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    KeyPair,
    Message,
    ProtocolError,
    RemoteError,
    Socket,
    Welcome,
    default_context,
)
from dfz.broker.messages import MAX_HEADER_BYTES, Catalogue
from dfz.cli import main as cli_main
from dfz.sched import (
    SCHED_CATALOGUE,
    ConfigError,
    FailedPiece,
    FinishedPiece,
    PeerState,
    SchedAnnounceHost,
    SchedBackToSource,
    SchedDigests,
    SchedErrorCode,
    SchedFail,
    SchedHostAnnounced,
    SchedHostLoad,
    SchedParent,
    SchedParents,
    SchedPeerFailed,
    SchedPeerFinished,
    SchedPeerLeft,
    SchedPeerRegistered,
    SchedPieces,
    SchedRefused,
    SchedRegisterPeer,
    SchedSeed,
    SchedTaskInfo,
    SchedTaskMetadata,
    SchedulerConfig,
    SchedulerService,
    ServiceConfig,
    TaskState,
)
from dfz.sched import service as service_module
from dfz.sched.messages import (
    MAX_DIGESTS_PER_MESSAGE,
    MAX_FAILED_PER_REPORT,
    MAX_FINISHED_PER_REPORT,
    MAX_PARENTS,
    MAX_PEERS_PER_MESSAGE,
    SchedAnnounceTask,
    SchedTaskAnnounced,
)
from dfz.tasks import MAX_PIECE_LENGTH, MAX_PIECES, task_id
from dfz.tickets import TicketSigner

HB = 0.1
LIVENESS = 3
GONE_BOUND = 3 * HB * LIVENESS + 1.0
"""Upper bound for the service to notice a vanished daemon: a wide margin over heartbeat * liveness."""

URL = "http://origin.example/model.bin"
TASK = task_id(URL)
PIECE_LENGTH = 64 * 1024
CONTENT_LENGTH = 3 * PIECE_LENGTH - 100  # three pieces, the last one short
FILE_DIGEST = blake3(b"the whole file").hexdigest()

PUSH_TYPES = (SchedParents, SchedSeed, SchedBackToSource, SchedFail, SchedDigests, SchedTaskInfo, SchedRefused)

M = TypeVar("M", bound=Message)
_names = itertools.count()


def digest(piece: int) -> str:
    return blake3(f"piece {piece}".encode()).hexdigest()


def done(piece: int, parent: str | None = None) -> FinishedPiece:
    size = min(PIECE_LENGTH, CONTENT_LENGTH - piece * PIECE_LENGTH)
    return FinishedPiece(piece=piece, digest=digest(piece), size=max(size, 1), cost_ms=3, parent=parent)


def service_config(**kw: Any) -> ServiceConfig:
    values: dict[str, Any] = {"listen": ("tcp://127.0.0.1:0",), "heartbeat": HB, "liveness": LIVENESS, **kw}
    return ServiceConfig(**values)


class Daemon:
    """A simulated daemon: a real fabric client that speaks sched.* and keeps every push it receives."""

    def __init__(
        self,
        endpoint: str,
        host_id: str,
        *,
        seed: bool = False,
        port: int = 4000,
        slots: int = 4,
        curve: CurveClient | None = None,
        catalogue: Catalogue = SCHED_CATALOGUE,
    ) -> None:
        self.host_id = host_id
        self.seed = seed
        self.port = port
        self.slots = slots
        config = ClientConfig(heartbeat=HB, liveness=LIVENESS, reconnect_max=0.5, timeout=5)
        self.client = Client(catalogue, endpoint, name=host_id, config=config, curve=curve)
        self.pushes: list[Message] = []
        self._changed = trio.Event()
        self._scope = trio.CancelScope()
        for kind in PUSH_TYPES:
            self.client.on_push(kind, self._got)

    def _got(self, msg: Message, payload: list[Any]) -> None:
        self.pushes.append(msg)
        self._changed.set()
        self._changed = trio.Event()

    async def start(self, nursery: trio.Nursery) -> Self:
        await nursery.start(self._run)
        return self

    async def _run(self, *, task_status: trio.TaskStatus[Client] = trio.TASK_STATUS_IGNORED) -> None:
        with self._scope:
            await self.client.run(task_status=task_status)

    def stop(self) -> None:
        """Leave like a daemon that stops: the client says ``bye``."""
        self._scope.cancel()

    async def announce(self, boot: str = "boot-1", ticket: bytes = b"") -> SchedHostAnnounced:
        msg = SchedAnnounceHost(
            host_id=self.host_id,
            boot=boot,
            hostname=self.host_id,
            ip="127.0.0.1",
            port=self.port,
            type="seed" if self.seed else "normal",
            upload_slots=self.slots,
            ticket=ticket,
        )
        return (await self.client.request(msg)).expect(SchedHostAnnounced)

    async def register(self, peer_id: str, task: str = TASK, **kw: Any) -> SchedPeerRegistered:
        msg = SchedRegisterPeer(peer_id=peer_id, task_id=task, url=kw.pop("url", URL), **kw)
        return (await self.client.request(msg)).expect(SchedPeerRegistered)

    async def report(self, msg: Message) -> None:
        await self.client.push(msg)

    async def expect(self, kind: type[M], where: Callable[[M], bool] = lambda _: True) -> M:
        """The first push of ``kind`` (matching ``where``) not taken yet, waiting for it if need be."""
        while True:
            for i, msg in enumerate(self.pushes):
                if isinstance(msg, kind) and where(msg):
                    del self.pushes[i]
                    return msg
            await self._changed.wait()


class RawSession:
    """A bare DEALER that says hello and then speaks sched.* by hand: it may send anything, stop reading,
    or vanish without ``bye`` (``kill``). ``keepalive`` sends heartbeats so the service keeps it."""

    def __init__(self, endpoint: str, *, hwm: int = 64) -> None:
        self.sock = Socket.create(default_context(), zmq.DEALER, hwm=hwm)
        self.sock.connect(endpoint)
        self.pushes: list[Message] = []
        self._ids = itertools.count(1)

    async def hello(self) -> Welcome:
        answer = await self.call(Hello(name="raw"))
        assert isinstance(answer, Welcome)
        return answer

    async def send(self, msg: Message) -> None:
        await self.sock.send(SCHED_CATALOGUE.encode(msg))

    async def send_raw(self, header: dict[str, Any]) -> None:
        await self.sock.send([msgspec.msgpack.encode({"v": 1, "dl": 0, **header})])

    async def answer(self, corr: int) -> Message:
        """The reply (or error) with id ``corr``; pushes met on the way are kept."""
        while True:
            msg, _ = SCHED_CATALOGUE.decode(await self.sock.recv())
            if msg.id == corr:
                return msg
            if not isinstance(msg, Heartbeat):
                self.pushes.append(msg)

    async def call(self, msg: Message) -> Message:
        msg.id = next(self._ids)
        await self.send(msg)
        return await self.answer(msg.id)

    async def next_push(self) -> Message:
        while not self.pushes:
            msg, _ = SCHED_CATALOGUE.decode(await self.sock.recv())
            if not isinstance(msg, Heartbeat):
                self.pushes.append(msg)
        return self.pushes.pop(0)

    async def keepalive(self) -> None:
        hb = SCHED_CATALOGUE.encode(Heartbeat())
        while not self.sock.closed:
            self.sock.try_send(hb)
            await trio.sleep(HB / 2)

    def kill(self) -> None:
        self.sock.close()  # no bye: like a crashed daemon or a pulled cable


def announce_msg(host_id: str, *, seed: bool = False, boot: str = "boot-1") -> SchedAnnounceHost:
    return SchedAnnounceHost(
        host_id=host_id, boot=boot, hostname=host_id, ip="127.0.0.1", port=4000, type="seed" if seed else "normal"
    )


def for_peer(peer_id: str) -> Callable[[SchedTaskInfo], bool]:
    return lambda msg: msg.peer_ids == [peer_id]


def state_of(service: SchedulerService, peer_id: str) -> PeerState:
    return service.core.peers[peer_id].state


async def wait_until(cond: Callable[[], bool]) -> None:
    """Poll a condition on in-process state (the caller bounds the wait with fail_after)."""
    while not cond():  # noqa: ASYNC110 - in-process state with no event to wait on
        await trio.sleep(0.01)


async def seed_with_pieces(seed: Daemon, pieces: range, *, content_length: int | None = CONTENT_LENGTH) -> None:
    """The seed's peer ``seed-1`` goes to the origin, learns the size and reports ``pieces``."""
    reg = await seed.register("seed-1")
    assert reg.assignment == "back_to_source", reg
    await seed.report(SchedTaskMetadata(peer_id="seed-1", content_length=content_length, piece_length=PIECE_LENGTH))
    for start in range(pieces.start, pieces.stop, MAX_FINISHED_PER_REPORT):
        batch = [done(k) for k in range(start, min(start + MAX_FINISHED_PER_REPORT, pieces.stop))]
        await seed.report(SchedPieces(peer_id="seed-1", finished=batch))


# -- the swarm's life through the service -----------------------------------------------------------------


class _Catalogue112(Catalogue):
    """The sched.* catalogue as a 1.12 daemon's hello lists it: ``sched.seed`` at revision 1."""

    def versions(self) -> dict[str, int]:
        return {**super().versions(), SchedSeed.wire_name(): 1}


async def test_wanted_ranges_reach_a_seed_that_speaks_them_and_not_an_older_one() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            service: SchedulerService = await nursery.start(SchedulerService(service_config()).run)
            endpoint = service.endpoints[0]
            seed = await Daemon(endpoint, "seed", seed=True, port=4001).start(nursery)
            a = await Daemon(endpoint, "host-a", port=4002).start(nursery)
            b = await Daemon(endpoint, "host-b", port=4003).start(nursery)
            for daemon in (seed, a, b):
                await daemon.announce()
            # Malformed ranges are left out; the seed's trigger carries the others.
            assert (await a.register("a-1", wanted=[(-1000, None), (7, 3), (-5, 9)])).assignment == "wait"
            trigger = await seed.expect(SchedSeed)
            assert trigger.wanted == [(-1000, None)]
            # While the seed fetches the task from the origin, a new peer's new range is sent to it again.
            assert (await seed.register("seed-1")).assignment == "back_to_source"
            await b.register("b-1", wanted=[(0, 100), (-1000, None)])
            again = await seed.expect(SchedSeed)
            assert (again.task_id, again.wanted) == (TASK, [(0, 100)])

            old_seed = await Daemon(
                endpoint, "old-seed", seed=True, port=4004, catalogue=_Catalogue112(SCHED_CATALOGUE.types.values())
            ).start(nursery)
            await old_seed.announce()
            # Tasks the scheduler triggers the old seed for (rendezvous hashing over the seed hosts).
            other, third = [t for t in (f"{i:064x}" for i in range(100)) if _seed_for(t) == "old-seed"][:2]
            await a.register("a-2", task=other, wanted=[(-1000, None)])
            old_trigger = await old_seed.expect(SchedSeed, lambda m: m.task_id == other)
            assert old_trigger.wanted == []  # a 1.12 seed knows no `wanted`
            await b.register("b-2", task=other, wanted=[(0, 100)])
            await a.register("a-3", task=third)
            await old_seed.expect(SchedSeed, lambda m: m.task_id == third)  # pushes to a host keep their order
            assert not [m for m in old_seed.pushes if isinstance(m, SchedSeed)]  # no repeat for `other`
            nursery.cancel_scope.cancel()


def _seed_for(task_id: str) -> str:
    """The seed host of ``seed`` and ``old-seed`` that the scheduler triggers first for ``task_id``."""
    return max(("seed", "old-seed"), key=lambda h: (zlib.crc32(f"{task_id}\n{h}".encode()), h))


async def test_a_registration_triggers_the_seed_and_waiting_peers_get_parents_and_digests() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            service: SchedulerService = await nursery.start(SchedulerService(service_config()).run)
            endpoint = service.endpoints[0]
            seed = await Daemon(endpoint, "seed", seed=True, port=4001).start(nursery)
            a = await Daemon(endpoint, "host-a", port=4002).start(nursery)
            b = await Daemon(endpoint, "host-b", port=4003).start(nursery)
            for daemon in (seed, a, b):
                ok = await daemon.announce()
                assert (ok.host_id, ok.resumed, ok.peers, ok.scheduler) == (daemon.host_id, False, 0, "dfz-sched")

            # Nobody has the task: the seed host is triggered, with the request's headers; a-1 waits.
            reg_a = await a.register("a-1", tag="v1", headers=[("Authorization", "Bearer t")])
            assert (reg_a.assignment, reg_a.parents, reg_a.digests) == ("wait", [], [])
            trigger = await seed.expect(SchedSeed)
            assert (trigger.task_id, trigger.url, trigger.tag) == (TASK, URL, "v1")
            assert trigger.headers == [("Authorization", "Bearer t")]

            # The seed answers by registering its own peer: it goes to the origin and becomes a-1's parent.
            reg_seed = await seed.register("seed-1", url=trigger.url, tag=trigger.tag, headers=trigger.headers)
            assert reg_seed.assignment == "back_to_source"
            parents = await a.expect(SchedParents, lambda m: m.peer_id == "a-1")
            assert parents.task_id == TASK
            assert parents.parents == [SchedParent(peer_id="seed-1", host_id="seed", ip="127.0.0.1", port=4001)]

            # What the seed learns from the origin reaches the downloaders: the file's facts, the digests.
            await seed.report(SchedTaskMetadata(peer_id="seed-1", content_length=CONTENT_LENGTH, piece_length=PIECE_LENGTH))
            info = await a.expect(SchedTaskInfo)
            assert (info.peer_ids, info.content_length, info.piece_length, info.piece_count) == (
                ["a-1"],
                CONTENT_LENGTH,
                PIECE_LENGTH,
                3,
            )
            await seed.report(SchedPieces(peer_id="seed-1", finished=[done(0), done(1)]))
            digests = await a.expect(SchedDigests)
            assert (digests.task_id, digests.peer_ids, digests.digests) == (TASK, ["a-1"], [(0, digest(0)), (1, digest(1))])
            await a.report(SchedPieces(peer_id="a-1", finished=[done(0, parent="seed-1")]))

            # A later peer gets everything at once in its registration's reply.
            reg_b = await b.register("b-1")
            assert reg_b.assignment == "parents"
            assert [p.peer_id for p in reg_b.parents] == ["seed-1", "a-1"]
            assert (reg_b.content_length, reg_b.piece_length, reg_b.piece_count) == (CONTENT_LENGTH, PIECE_LENGTH, 3)
            assert reg_b.digests == [(0, digest(0)), (1, digest(1))] and not reg_b.more_digests

            # The last piece and the whole-file digest reach both downloaders.
            await seed.report(SchedPieces(peer_id="seed-1", finished=[done(2)]))
            await seed.report(SchedPeerFinished(peer_id="seed-1", content_length=CONTENT_LENGTH, digest=FILE_DIGEST))
            for daemon, peer_id in ((a, "a-1"), (b, "b-1")):
                assert (await daemon.expect(SchedDigests)).digests == [(2, digest(2))]
                assert (await daemon.expect(SchedTaskInfo, for_peer(peer_id))).digest == FILE_DIGEST

            core = service.core
            await wait_until(lambda: core.tasks[TASK].state is TaskState.SUCCEEDED)
            assert core.peers["a-1"].finished_count == 1 and core.peers["seed-1"].state is PeerState.SUCCEEDED
            assert core.tasks[TASK].bytes_from_origin == CONTENT_LENGTH
            core.check_invariants()
            assert not service.stats.refused and service.stats.undeliverable == 0
            nursery.cancel_scope.cancel()


async def test_digests_that_do_not_fit_the_reply_follow_it_as_pushes() -> None:
    pieces = MAX_DIGESTS_PER_MESSAGE + 100
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            service: SchedulerService = await nursery.start(SchedulerService(service_config()).run)
            seed = await Daemon(service.endpoints[0], "seed", seed=True).start(nursery)
            a = await Daemon(service.endpoints[0], "host-a").start(nursery)
            await seed.announce()
            await a.announce()
            await seed_with_pieces(seed, range(pieces), content_length=None)
            await wait_until(lambda: len(service.core.tasks[TASK].digests) == pieces)

            reg = await a.register("a-1")
            assert reg.assignment == "parents" and reg.more_digests
            assert reg.digests == [(k, digest(k)) for k in range(MAX_DIGESTS_PER_MESSAGE)]
            rest = await a.expect(SchedDigests)
            assert rest.peer_ids == ["a-1"]
            assert rest.digests == [(k, digest(k)) for k in range(MAX_DIGESTS_PER_MESSAGE, pieces)]
            nursery.cancel_scope.cancel()


async def test_a_daemon_that_vanishes_takes_its_peers_along_and_their_children_get_new_parents() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            service: SchedulerService = await nursery.start(SchedulerService(service_config()).run)
            endpoint = service.endpoints[0]
            seed = await Daemon(endpoint, "seed", seed=True, slots=1).start(nursery)
            b = await Daemon(endpoint, "host-b").start(nursery)
            await seed.announce()
            await b.announce()
            await seed_with_pieces(seed, range(2))

            # The victim's peer takes the seed's only upload slot, so b-1's only parent is the victim.
            victim = RawSession(endpoint)
            await victim.hello()
            nursery.start_soon(victim.keepalive)
            assert isinstance(await victim.call(announce_msg("host-v")), SchedHostAnnounced)
            reg_v = await victim.call(SchedRegisterPeer(peer_id="v-1", task_id=TASK, url=URL))
            assert isinstance(reg_v, SchedPeerRegistered) and [p.peer_id for p in reg_v.parents] == ["seed-1"]
            reg_b = await b.register("b-1")
            assert [p.peer_id for p in reg_b.parents] == ["v-1"]

            # The victim dies without a word: its session falls silent, its host leaves with its peer,
            # and b-1 gets a new parent pushed at once (the seed's slot is free again).
            victim.kill()
            start = trio.current_time()
            parents = await b.expect(SchedParents, lambda m: m.peer_id == "b-1")
            assert [p.peer_id for p in parents.parents] == ["seed-1"]
            assert trio.current_time() - start < GONE_BOUND
            assert "host-v" not in service.core.hosts and "v-1" not in service.core.peers
            assert service.session_of("host-v") is None
            service.core.check_invariants()
            nursery.cancel_scope.cancel()


async def test_a_host_belongs_to_its_session_a_reconnect_keeps_its_peers_and_a_restart_drops_them() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            service: SchedulerService = await nursery.start(SchedulerService(service_config()).run)
            endpoint = service.endpoints[0]
            first = await Daemon(endpoint, "host-a").start(nursery)
            assert not (await first.announce()).resumed
            assert (await first.register("a-1")).assignment == "back_to_source"  # no seed host: the first peer
            first_rid = service.session_of("host-a")
            assert first_rid is not None and service.host_of(first_rid) == "host-a"

            # One session is one host.
            with pytest.raises(RemoteError) as refused:
                await first.client.request(announce_msg("host-other"))
            assert refused.value.code == SchedErrorCode.HOST_MISMATCH

            # The same daemon (same boot id) on a new session takes its host over, peers included (a
            # reconnect); the old session ending afterwards does not make the host leave.
            second = await Daemon(endpoint, "host-a").start(nursery)
            again = await second.announce(boot="boot-1")
            assert (again.resumed, again.peers) == (True, 1)
            assert service.session_of("host-a") not in (None, first_rid) and service.host_of(first_rid) is None
            first.stop()
            await wait_until(lambda: first_rid not in service.server.peers)
            assert "a-1" in service.core.peers and "host-a" in service.core.hosts

            # A restarted daemon (another boot id) starts afresh: the old host leaves with its peers, and
            # the session that held it has no host any more.
            third = await Daemon(endpoint, "host-a").start(nursery)
            fresh = await third.announce(boot="boot-2")
            assert (fresh.resumed, fresh.peers) == (False, 0)
            assert "a-1" not in service.core.peers
            with pytest.raises(RemoteError) as refused:
                await second.register("a-2")
            assert refused.value.code == SchedErrorCode.NOT_ANNOUNCED
            assert (await third.register("a-3")).assignment == "back_to_source"
            service.core.check_invariants()
            nursery.cancel_scope.cancel()


async def test_on_an_encrypted_fabric_a_host_id_belongs_to_the_client_key_that_holds_it(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    server_keys = KeyPair.generate()
    server_keys.save(tmp_path, "sched")
    clients = [KeyPair.generate() for _ in range(2)]
    for n, pair in enumerate(clients):
        pair.save(keys, f"host-{n}")  # the allowed set: every *.key of the directory
    config = service_config(curve_secret_key=tmp_path / "sched.key_secret", curve_allowed_keys=(keys,))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            service: SchedulerService = await nursery.start(SchedulerService(config).run)
            endpoint = service.endpoints[0]
            owner, intruder = [
                await Daemon(endpoint, "host-a", curve=CurveClient(pair, server_keys.public)).start(nursery) for pair in clients
            ]
            assert not (await owner.announce()).resumed
            with pytest.raises(RemoteError) as refused:
                await intruder.announce()  # same host id, same boot, another key
            assert refused.value.code == SchedErrorCode.HOST_TAKEN
            again = await Daemon(endpoint, "host-a", curve=CurveClient(clients[0], server_keys.public)).start(nursery)
            assert (await again.announce()).resumed  # the owner's key may take its host over
            nursery.cancel_scope.cancel()


# -- refusals and bad input -----------------------------------------------------------------------------


async def test_reports_about_peers_of_another_host_are_refused_with_the_sched_codes() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            service: SchedulerService = await nursery.start(SchedulerService(service_config()).run)
            a = await Daemon(service.endpoints[0], "host-a").start(nursery)
            b = await Daemon(service.endpoints[0], "host-b").start(nursery)
            await a.announce()
            assert (await a.register("a-1")).assignment == "back_to_source"

            # Before announcing, a session can neither register nor report.
            with pytest.raises(RemoteError) as refused:
                await b.register("b-1")
            assert refused.value.code == SchedErrorCode.NOT_ANNOUNCED
            await b.report(SchedPeerLeft(peer_id="a-1"))
            answer = await b.expect(SchedRefused)
            assert (answer.type, answer.code, answer.peer_id) == ("sched.peer_left", SchedErrorCode.NOT_ANNOUNCED, "a-1")

            # After announcing, b still may not speak for a's peer, nor register its id.
            await b.announce()
            await b.report(SchedPieces(peer_id="a-1", finished=[done(0)]))
            answer = await b.expect(SchedRefused)
            assert (answer.type, answer.code, answer.peer_id) == ("sched.pieces", SchedErrorCode.NOT_YOUR_PEER, "a-1")
            with pytest.raises(RemoteError) as refused:
                await b.register("a-1")
            assert refused.value.code == SchedErrorCode.NOT_YOUR_PEER
            await b.report(SchedPeerLeft(peer_id="nobody"))
            assert (await b.expect(SchedRefused)).code == SchedErrorCode.UNKNOWN_PEER
            assert state_of(service, "a-1") is PeerState.BACK_TO_SOURCE
            assert service.core.peers["a-1"].finished == 0

            # A batch is applied up to the first report the core refuses; the refusal names the piece.
            await a.report(SchedTaskMetadata(peer_id="a-1", content_length=CONTENT_LENGTH, piece_length=PIECE_LENGTH))
            await a.report(SchedPieces(peer_id="a-1", finished=[done(0), done(5), done(1)]))
            answer = await a.expect(SchedRefused)
            assert (answer.code, answer.piece) == (SchedErrorCode.REFUSED, 5)
            assert "out of range" in answer.reason
            assert service.core.peers["a-1"].finished_pieces() == [0]

            # A failed piece from a parent is recorded; a failed peer cannot fail again.
            await a.report(SchedPieces(peer_id="a-1", failed=[FailedPiece(piece=1, parent="x-1", reason="timeout")]))
            await a.report(SchedPeerFailed(peer_id="a-1", reason="disk full"))
            await a.report(SchedPeerFailed(peer_id="a-1", reason="disk full"))
            answer = await a.expect(SchedRefused)
            assert (answer.type, answer.code) == ("sched.peer_failed", SchedErrorCode.WRONG_STATE)
            assert state_of(service, "a-1") is PeerState.FAILED and service.core.peers["a-1"].avoid == {"x-1"}
            assert service.stats.refused["NOT_YOUR_PEER"] == 2 and service.stats.refused["NOT_ANNOUNCED"] == 2
            service.core.check_invariants()
            nursery.cancel_scope.cancel()


class WallClock:
    """Stands in for the ``time`` module of the service: the wall clock tickets are checked against."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now


async def test_tenant_tickets_bind_hosts_to_tenants_and_tenants_never_share_a_task(monkeypatch: pytest.MonkeyPatch) -> None:
    signer, stranger = TicketSigner.generate(), TicketSigner.generate()
    wall = WallClock()
    monkeypatch.setattr(service_module, "time", wall)
    now = wall.now

    def ticket(host: str, tenant: str = "7", *, by: TicketSigner = signer, at: float = now, ttl: float = 600) -> bytes:
        return by.issue(tenant=tenant, tenant_name=f"tenant-{tenant}", host_id=host, now=at, ttl=ttl)

    async def refused(call: Any) -> RemoteError:
        with pytest.raises(RemoteError) as e:
            await call
        return e.value

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            service: SchedulerService = await nursery.start(
                SchedulerService(service_config(ticket_keys=(signer.public_key.hex(),))).run
            )
            a, b, c = [await Daemon(service.endpoints[0], f"host-{x}").start(nursery) for x in "abc"]
            # Every ticket that does not verify is refused, counted by kind; the host is not announced.
            bad = {
                "malformed": b"junk",
                "signature": ticket("host-a", by=stranger),
                "expired": ticket("host-a", at=now - 2000, ttl=60),
                "not_yet_valid": ticket("host-a", at=now + 600),
                "wrong_host": ticket("host-b"),
            }
            for kind, forged in bad.items():
                e = await refused(a.announce(ticket=forged))
                assert e.code == SchedErrorCode.BAD_TICKET and kind.replace("_", " ") in e.reason.replace("_", " "), e
            assert service.stats.tickets_refused == dict.fromkeys(bad, 1)
            assert "host-a" not in service.core.hosts and service.stats.refused["BAD_TICKET"] == len(bad)

            # Verified: each host in the tenant its ticket proves (c in none); a task is its maker's tenant's.
            assert (await a.announce(ticket=ticket("host-a"))).tenant == "7"
            assert (await b.announce(ticket=ticket("host-b", "8"))).tenant == "8"
            assert (await c.announce()).tenant == ""
            assert (await a.register("a-1")).assignment == "back_to_source"
            assert service.core.tasks[TASK].tenant == "7"
            for other in (b, c):
                e = await refused(other.register(f"{other.host_id}-1"))
                assert e.code == SchedErrorCode.WRONG_TENANT and "tenant '7'" in e.reason
            other_task = task_id(URL, tenant="8")
            assert (await b.register("b-1", task=other_task)).assignment == "back_to_source"
            assert service.stats.refused["WRONG_TENANT"] == 2
            # A host stays in its tenant: announcing into another is refused; a fresh ticket of its own is taken.
            assert (await refused(a.announce(ticket=ticket("host-a", "8")))).code == SchedErrorCode.WRONG_TENANT
            assert (await refused(c.announce(ticket=ticket("host-c")))).code == SchedErrorCode.WRONG_TENANT
            assert (await a.announce(ticket=ticket("host-a", at=now + 5))).resumed

            # A ticket that expires after the announce: registrations are refused until a fresh one is announced.
            d = await Daemon(service.endpoints[0], "host-d").start(nursery)
            await d.announce(ticket=ticket("host-d", ttl=60))
            wall.now += 100
            e = await refused(d.register("d-1"))
            assert e.code == SchedErrorCode.BAD_TICKET and "announce the host again" in e.reason
            await d.announce(ticket=ticket("host-d", at=wall.now))
            assert (await d.register("d-1")).assignment == "parents"
            assert service.core.peers["d-1"].host.tenant == "7"
            service.core.check_invariants()

            # A scheduler that knows no manager key refuses every ticket, and serves hosts without one.
            lone: SchedulerService = await nursery.start(SchedulerService(service_config()).run)
            e_host = await Daemon(lone.endpoints[0], "host-e").start(nursery)
            e = await refused(e_host.announce(ticket=ticket("host-e")))
            assert e.code == SchedErrorCode.BAD_TICKET and "no manager key" in e.reason
            assert (await e_host.announce()).tenant == ""
            lone.trust_key(signer.public_key)  # as its manager session would give it
            f_host = await Daemon(lone.endpoints[0], "host-f").start(nursery)
            assert (await f_host.announce(ticket=ticket("host-f"))).tenant == "7"
            nursery.cancel_scope.cancel()


async def test_host_load_reports_reach_the_evaluator_and_need_an_announced_host() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            service: SchedulerService = await nursery.start(SchedulerService(service_config()).run)
            a = await Daemon(service.endpoints[0], "host-a").start(nursery)
            b = await Daemon(service.endpoints[0], "host-b").start(nursery)
            await a.announce()
            await a.report(SchedHostLoad(upload_rate=125_000_000, uploads_in_flight=12, upload_peers=3))
            host = service.core.hosts["host-a"]
            await wait_until(lambda: host.upload_rate == 125_000_000)
            assert (host.uploads_in_flight, host.upload_peers) == (12, 3)

            await b.report(SchedHostLoad(upload_rate=1, uploads_in_flight=0, upload_peers=0))
            answer = await b.expect(SchedRefused)
            assert (answer.type, answer.code, answer.peer_id) == ("sched.host_load", SchedErrorCode.NOT_ANNOUNCED, "")
            assert "host-b" not in service.core.hosts
            nursery.cancel_scope.cancel()


async def test_malformed_sched_messages_get_invalid_and_the_service_keeps_serving() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            # A slow heartbeat: the raw session sends none and must not be forgotten mid-test.
            service: SchedulerService = await nursery.start(SchedulerService(service_config(heartbeat=1.0)).run)
            raw = RawSession(service.endpoints[0])
            try:
                await raw.hello()
                good = {"peer_id": "p-1", "task_id": TASK, "url": URL}
                cases: list[tuple[dict[str, Any], ErrorCode]] = [
                    ({**good, "task_id": TASK.upper()}, ErrorCode.INVALID),  # digests and ids are lowercase hex
                    ({**good, "task_id": TASK + "\n"}, ErrorCode.INVALID),
                    ({**good, "peer_id": "has space"}, ErrorCode.INVALID),
                    ({k: v for k, v in good.items() if k != "url"}, ErrorCode.INVALID),
                    ({**good, "piece_length": 100_000}, ErrorCode.INVALID),  # in range, not a power of two
                    ({**good, "headers": [["A", "b"]] * 65}, ErrorCode.INVALID),
                ]
                for corr, (fields, code) in enumerate(cases, start=100):
                    await raw.send_raw({"t": "sched.register_peer", "id": corr, **fields})
                    answer = await raw.answer(corr)
                    assert isinstance(answer, Error) and answer.code == code, (fields, answer)
                await raw.send_raw({"t": "sched.no_such_thing", "id": 200})
                answer = await raw.answer(200)
                assert isinstance(answer, Error) and answer.code == ErrorCode.UNKNOWN_TYPE
                # A bad push has no id to answer: it is dropped and counted.
                await raw.send_raw({"t": "sched.pieces", "id": 0, "peer_id": "p-1", "finished": [{"piece": -1}]})

                # The same session goes on: announce, register, and a report that breaks the piece rule.
                assert isinstance(await raw.call(announce_msg("host-r")), SchedHostAnnounced)
                reg = await raw.call(SchedRegisterPeer(peer_id="p-1", task_id=TASK, url=URL))
                assert isinstance(reg, SchedPeerRegistered) and reg.assignment == "back_to_source"
                await raw.send(SchedTaskMetadata(peer_id="p-1", content_length=10, piece_length=3 * PIECE_LENGTH))
                refusal = await raw.next_push()
                assert isinstance(refusal, SchedRefused) and refusal.code == ErrorCode.INVALID
                assert "power of two" in refusal.reason
                assert service.server.stats.bad_frames["invalid"] == 6
            finally:
                raw.kill()
            # Everyone else was served all along.
            other = await Daemon(service.endpoints[0], "host-o").start(nursery)
            assert (await other.announce()).host_id == "host-o"
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("send_timeout", "outbox_limit", "why"),
    [(0.3, 1024, "a push failed"), (30.0, 8, "pushes waiting: the daemon does not read them")],
    ids=["push-times-out", "outbox-overflows"],
)
async def test_a_daemon_that_stops_reading_its_pushes_loses_its_host(
    send_timeout: float, outbox_limit: int, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dfz.sched.service")
    endpoint = f"inproc://sched-stuck-{os.getpid()}-{next(_names)}"
    config = service_config(listen=(endpoint,), send_timeout=send_timeout, outbox_limit=outbox_limit)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            service: SchedulerService = await nursery.start(SchedulerService(config).run)
            seed = await Daemon(endpoint, "seed", seed=True).start(nursery)
            reader = await Daemon(endpoint, "host-r").start(nursery)
            await seed.announce()
            await reader.announce()
            assert (await seed.register("seed-1")).assignment == "back_to_source"
            await seed.report(SchedTaskMetadata(peer_id="seed-1", content_length=None, piece_length=PIECE_LENGTH))
            await reader.register("r-1")

            # The stuck daemon's queue holds one message (inproc: the pipe's room is both high-water marks).
            stuck = RawSession(endpoint, hwm=1)
            await stuck.hello()
            nursery.start_soon(stuck.keepalive)
            assert isinstance(await stuck.call(announce_msg("host-s")), SchedHostAnnounced)
            assert isinstance(await stuck.call(SchedRegisterPeer(peer_id="s-1", task_id=TASK, url=URL)), SchedPeerRegistered)

            # One digests push per batch goes to each downloader; the stuck one never reads them.
            for k in range(200):
                await seed.report(SchedPieces(peer_id="seed-1", finished=[done(k)]))
            await wait_until(lambda: "host-s" not in service.core.hosts)
            assert "s-1" not in service.core.peers and service.stats.hosts_lost == 1
            assert any("host_left host=host-s" in r.getMessage() and why in r.getMessage() for r in caplog.records)
            assert service.session_of("host-s") is None
            # The reader got every digest, in order.
            got: list[int] = []
            while len(got) < 200:
                got.extend(k for k, _ in (await reader.expect(SchedDigests)).digests)
            assert got == list(range(200))
            stuck.kill()
            nursery.cancel_scope.cancel()


# -- the real process -------------------------------------------------------------------------------------

CHILD_DAEMON = """
import sys
import trio
from dfz.broker import Client, ClientConfig
from dfz.sched import SCHED_CATALOGUE, SchedAnnounceHost, SchedPeerRegistered, SchedRegisterPeer

async def main(endpoint, host_id, peer_id, task_id, url):
    client = Client(SCHED_CATALOGUE, endpoint, name=host_id, config=ClientConfig(heartbeat=0.1, liveness=3))
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await client.request(SchedAnnounceHost(host_id=host_id, boot="b", hostname=host_id, ip="127.0.0.1", port=4100))
        reply = await client.request(SchedRegisterPeer(peer_id=peer_id, task_id=task_id, url=url))
        reg = reply.expect(SchedPeerRegistered)
        print("registered", reg.assignment, *[p.peer_id for p in reg.parents], flush=True)
        await trio.sleep_forever()

trio.run(main, *sys.argv[1:])
"""


class Lines:
    """A process's stdout, a line at a time."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self._buf = b""

    async def line(self) -> str:
        assert self.proc.stdout is not None
        while b"\n" not in self._buf:
            chunk = await self.proc.stdout.receive_some(4096)
            if not chunk:
                raise EOFError(f"process ended (status {self.proc.poll()}) before a full line: {self._buf!r}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()


@asynccontextmanager
async def process(*args: str) -> AsyncIterator[Lines]:
    proc = await trio.lowlevel.open_process([sys.executable, *args], stdout=subprocess.PIPE)
    try:
        yield Lines(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.aclose()


async def test_the_dfz_sched_process_serves_daemons_survives_a_killed_one_and_stops_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "sched.toml"
    config.write_text(f'name = "sched-test"\nheartbeat = {HB}\nliveness = {LIVENESS}\n\n[scheduler]\nretry_interval = 0.5\n')
    with trio.fail_after(20):
        async with process("-m", "dfz.cli", "sched", "--config", str(config), "--listen", "tcp://127.0.0.1:0") as sched:
            word, endpoint = (await sched.line()).split(" ", 1)
            assert word == "listening" and endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith(":0")
            async with trio.open_nursery() as nursery:
                seed = await Daemon(endpoint, "seed", seed=True, slots=1).start(nursery)
                b = await Daemon(endpoint, "host-b").start(nursery)
                assert (await seed.announce()).scheduler == "sched-test"
                await b.announce()
                await seed_with_pieces(seed, range(2))

                # A daemon in its own process takes the seed's only slot; b-1 then hangs below it.
                async with process("-c", CHILD_DAEMON, endpoint, "host-k", "k-1", TASK, URL) as child:
                    assert (await child.line()).split() == ["registered", "parents", "seed-1"]
                    reg_b = await b.register("b-1")
                    assert [p.peer_id for p in reg_b.parents] == ["k-1"]
                    child.proc.kill()  # SIGKILL: no bye, no cleanup
                    start = trio.current_time()
                    parents = await b.expect(SchedParents, lambda m: m.peer_id == "b-1")
                    assert [p.peer_id for p in parents.parents] == ["seed-1"]
                    assert trio.current_time() - start < GONE_BOUND
                nursery.cancel_scope.cancel()

            sched.proc.send_signal(signal.SIGTERM)
            assert await sched.proc.wait() == 0


async def test_sigint_stops_dfz_sched_cleanly_too() -> None:
    with trio.fail_after(10):
        async with process("-m", "dfz.cli", "sched", "--listen", "tcp://127.0.0.1:0") as sched:
            assert (await sched.line()).startswith("listening tcp://127.0.0.1:")
            sched.proc.send_signal(signal.SIGINT)
            assert await sched.proc.wait() == 0


# -- configuration and message bounds ----------------------------------------------------------------------


def test_the_config_file_sets_every_setting_and_errors_name_the_bad_key(tmp_path: Path) -> None:
    good = tmp_path / "sched.toml"
    good.write_text(
        'name = "s1"\nlisten = ["tcp://0.0.0.0:8002", "ipc:///tmp/s1"]\nheartbeat = 2\nliveness = 5\n'
        "max_in_flight = 8\nsend_timeout = 1.5\noutbox_limit = 100\n"
        "[scheduler]\ncandidate_parent_limit = 6\nretry_limit = 3\nretry_interval = 0.5\nhost_timeout = 30\n"
        "candidate_parent_sample = 20\nload_weight = 0.5\nidc_weight = 0\nprogress_weight = 0.25\nretry_jitter = 0.1\n"
        'bad_parent_window = 24\npeer_ttl = 3600\ntask_ttl = 60\nmax_peers_per_task = 5000\nevaluator = "random"\nseed = 7\n'
    )
    config = ServiceConfig.load(good)
    assert config.listen == ("tcp://0.0.0.0:8002", "ipc:///tmp/s1") and config.heartbeat == 2.0
    assert (config.liveness, config.max_in_flight, config.send_timeout, config.outbox_limit) == (5, 8, 1.5, 100)
    assert config.scheduler == SchedulerConfig(
        candidate_parent_limit=6,
        retry_limit=3,
        retry_interval=0.5,
        host_timeout=30.0,
        candidate_parent_sample=20,
        load_weight=0.5,
        idc_weight=0.0,
        progress_weight=0.25,
        retry_jitter=0.1,
        bad_parent_window=24,
        peer_ttl=3600.0,
        task_ttl=60.0,
        max_peers_per_task=5000,
        evaluator="random",
        seed=7,
    )
    assert ServiceConfig.from_mapping({"listen": "tcp://127.0.0.1:1"}).listen == ("tcp://127.0.0.1:1",)
    assert ServiceConfig.from_mapping({"curve_secret_key": "k/s.key_secret"}, base=tmp_path).curve_secret_key == (
        tmp_path / "k/s.key_secret"
    )

    bad: list[tuple[str, str]] = [
        ("listn = 1", "unknown key 'listn'"),
        ('heartbeat = "fast"', "heartbeat: must be a number of seconds"),
        ("heartbeat = -1", "heartbeat: must be a positive number"),
        ("liveness = true", "liveness: must be an integer"),
        ("outbox_limit = 0", "outbox_limit: must be an integer from 1"),
        ('listen = ["http://x"]', "listen: 'http://x' is not an endpoint"),
        ("listen = []", "listen: needs at least one endpoint"),
        ("[scheduler]\nretry_limit = 0", "scheduler.retry_limit must be at least 1"),
        ("[scheduler]\nretry_limt = 2", "unknown key 'scheduler.retry_limt'"),
        ('[scheduler]\nhost_timeout = "1m"', "scheduler.host_timeout: must be a number of seconds"),
        (f"[scheduler]\ncandidate_parent_limit = {MAX_PARENTS + 1}", "scheduler.candidate_parent_limit: at most"),
        ('[scheduler]\nload_weight = "high"', "scheduler.load_weight: must be a number, got 'high'"),
        ("[scheduler]\nload_weight = -1", "scheduler.load_weight must be 0 or more"),
        ("[scheduler]\ncandidate_parent_sample = 2", "scheduler.candidate_parent_sample must be at least candidate_parent_limit"),
        ("[scheduler]\ncandidate_parent_sample = 2.5", "scheduler.candidate_parent_sample: must be an integer"),
        ("[scheduler]\nload_weight = 0\nidc_weight = 0\nlocation_weight = 0\nhost_type_weight = 0", "at least one must be"),
        ("[scheduler]\nretry_jitter = 1.5", "scheduler.retry_jitter must be from 0 to below 1"),
        ('[scheduler]\nevaluator = "best"', "scheduler.evaluator must be one of multi_feature, simple, random"),
        ("[scheduler]\nevaluator = 1", "scheduler.evaluator: must be a string"),
        ('curve_allowed_keys = ["a.key"]', "curve_allowed_keys: set curve_secret_key too"),
        ("heartbeat = ", "not valid TOML"),
    ]
    for text, message in bad:
        path = tmp_path / "bad.toml"
        path.write_text(text + "\n")
        with pytest.raises(ConfigError) as error:
            ServiceConfig.load(path)
        assert message in str(error.value) and str(path) in str(error.value), (text, str(error.value))
    with pytest.raises(ConfigError, match="cannot read"):
        ServiceConfig.load(tmp_path / "missing.toml")

    # The command says what is wrong and exits non-zero before it binds anything.
    path = tmp_path / "bad.toml"
    path.write_text("[scheduler]\nretry_limt = 2\n")
    result = CliRunner().invoke(cli_main, ["sched", "--config", str(path)])
    assert result.exit_code != 0 and "unknown key 'scheduler.retry_limt'" in result.output
    result = CliRunner().invoke(cli_main, ["sched", "--listen", "udp://x"])
    assert result.exit_code != 0 and "is not an endpoint" in result.output


def test_every_sched_message_fits_the_header_frame_at_its_bounds() -> None:
    hex64, long_id, last = "f" * 64, "i" * 128, MAX_PIECES - 1
    parent = SchedParent(peer_id=long_id, host_id=long_id, ip="n" * 256, port=65535)
    largest: list[Message] = [
        SchedPieces(
            peer_id=long_id,
            finished=[FinishedPiece(piece=last, digest=hex64, size=MAX_PIECE_LENGTH, cost_ms=2**32 - 1, parent=long_id)]
            * MAX_FINISHED_PER_REPORT,
            failed=[FailedPiece(piece=last, parent=long_id, reason="r" * 256)] * MAX_FAILED_PER_REPORT,
        ),
        SchedDigests(
            task_id=hex64, peer_ids=[long_id] * MAX_PEERS_PER_MESSAGE, digests=[(last, hex64)] * MAX_DIGESTS_PER_MESSAGE
        ),
        SchedPeerRegistered(
            peer_id=long_id,
            task_id=hex64,
            assignment="parents",
            parents=[parent] * MAX_PARENTS,
            reason="x" * 4096,
            content_length=2**63 - 1,
            piece_length=2**32 - 1,
            piece_count=2**32 - 1,
            digest=hex64,
            digests=[(last, hex64)] * MAX_DIGESTS_PER_MESSAGE,
            more_digests=True,
        ),
        SchedParents(peer_id=long_id, task_id=hex64, parents=[parent] * MAX_PARENTS),
        SchedTaskInfo(task_id=hex64, peer_ids=[long_id] * MAX_PEERS_PER_MESSAGE, content_length=1, digest=hex64),
    ]
    for msg in largest:
        frames = SCHED_CATALOGUE.encode(msg)
        assert len(frames[0]) < MAX_HEADER_BYTES, msg.wire_name()
        decoded, _ = SCHED_CATALOGUE.decode(frames)
        assert decoded == msg

    def invalid(msg: Message) -> None:
        with pytest.raises(ProtocolError) as error:
            SCHED_CATALOGUE.decode(SCHED_CATALOGUE.encode(msg))
        assert error.value.code == ErrorCode.INVALID

    invalid(SchedPeerFinished(peer_id="p", content_length=1, digest="F" * 64))
    invalid(SchedPeerFinished(peer_id="p", content_length=1, digest="f" * 63))
    invalid(SchedPieces(peer_id="p", finished=[done(0)] * (MAX_FINISHED_PER_REPORT + 1)))
    invalid(SchedPieces(peer_id="p", finished=[FinishedPiece(piece=MAX_PIECES, digest=hex64, size=1)]))
    invalid(SchedParents(peer_id="p", task_id=hex64, parents=[]))
    invalid(SchedPeerLeft(peer_id="x" * 129))


async def test_a_task_of_more_pieces_than_one_message_holds_is_announced_in_parts() -> None:
    count = 2 * MAX_DIGESTS_PER_MESSAGE + 100
    length = count * PIECE_LENGTH
    pairs = [(i, digest(i)) for i in range(count)]

    def part(peer_id: str, lo: int, hi: int, more: bool, **kw: Any) -> SchedAnnounceTask:
        fields: dict[str, Any] = dict(
            peer_id=peer_id, task_id=TASK, url=URL, piece_length=PIECE_LENGTH, content_length=length, digest=FILE_DIGEST
        )
        fields.update(kw)
        return SchedAnnounceTask(digests=pairs[lo:hi], more=more, **fields)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            service: SchedulerService = await nursery.start(SchedulerService(service_config()).run)
            endpoint = service.endpoints[0]
            daemon = await Daemon(endpoint, "host-k").start(nursery)
            await daemon.announce()
            m = MAX_DIGESTS_PER_MESSAGE

            async def send(msg: SchedAnnounceTask) -> SchedTaskAnnounced:
                return (await daemon.client.request(msg)).expect(SchedTaskAnnounced)

            # One part alone is not a whole task: refused, nothing registered.
            with pytest.raises(RemoteError) as refused:
                await send(part("k-0", 0, m, more=False))
            assert "k-0" not in service.core.peers
            # Parts whose fields differ: the announcement is dropped.
            assert (await send(part("k-1", 0, m, more=True))).pending
            with pytest.raises(RemoteError) as refused:
                await send(part("k-1", m, 2 * m, more=True, content_length=length - 1))
            assert refused.value.code == ErrorCode.INVALID and "same fields" in refused.value.reason
            # More digests than pieces: dropped too.
            assert (await send(part("k-2", 0, m, more=True))).pending
            assert (await send(part("k-2", 0, m, more=True))).pending  # 1,024 of 1,124: not too many yet
            with pytest.raises(RemoteError) as refused:
                await send(part("k-2", 0, m, more=True))
            assert refused.value.code == ErrorCode.INVALID and "more digests" in refused.value.reason
            assert (await send(part("k-2", 0, m, more=True))).pending  # a fresh start after the refusal
            assert "k-2" not in service.core.peers
            # One announcement in parts at a time per session: another one drops both.
            with pytest.raises(RemoteError) as refused:
                await send(part("k-3", 0, m, more=True))
            assert refused.value.code == ErrorCode.INVALID and "k-2's is dropped" in refused.value.reason
            # In three parts: pending, pending, then the peer is registered as succeeded, a source.
            assert (await send(part("k-3", 0, m, more=True))).pending
            assert (await send(part("k-3", m, 2 * m, more=True))).pending
            done = await send(part("k-3", 2 * m, count, more=False))
            assert not done.pending and done.peer_id == "k-3"
            peer = service.core.peers["k-3"]
            assert peer.state is PeerState.SUCCEEDED and peer.finished_count == count
            assert len(service.core.tasks[TASK].digests) == count
            service.core.check_invariants()
            nursery.cancel_scope.cancel()
