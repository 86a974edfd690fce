"""The fabric's patterns end to end, on real sockets and with real processes.

Request/reply with deadlines, server and client push, credit-based flow control, liveness when a peer
process is killed (SIGKILL) or leaves, a server restart, and shutdown. Children run ``fabric_child.py``
and report readiness on stdout; nothing here waits on a fixed sleep. Timing assertions are upper bounds
with a wide margin, never tight.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import zmq
from conftest import CATALOGUE, Echo, EchoOk, Note, Tick

from dfz.broker import (
    Bye,
    Client,
    ClientConfig,
    ConnectionLost,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    Message,
    PeerEvent,
    PeerGone,
    PeerSession,
    RemoteError,
    Request,
    RequestTimeout,
    Server,
    ServerConfig,
    Socket,
    Welcome,
    default_context,
)

HEARTBEAT = 0.1
LIVENESS = 3
WINDOW = HEARTBEAT * LIVENESS
"""Silence after which a side declares the other gone."""
BOUND = 3 * WINDOW + 0.5
"""Upper bound for noticing a vanished peer: a wide margin over the window, for a loaded machine."""

CHILD = Path(__file__).with_name("fabric_child.py")


def server_config(**kw: Any) -> ServerConfig:
    return ServerConfig(**{"heartbeat": HEARTBEAT, "liveness": LIVENESS, **kw})


def client_config(**kw: Any) -> ClientConfig:
    return ClientConfig(**{"heartbeat": HEARTBEAT, "liveness": LIVENESS, "reconnect_max": 0.5, **kw})


@pytest.fixture(params=["ipc", "tcp"])
def net_endpoint(request: pytest.FixtureRequest, short_tmp: str) -> str:
    """An endpoint that another process can reach (and a restarted server can bind again)."""
    return f"ipc://{short_tmp}/fabric" if request.param == "ipc" else "tcp://127.0.0.1:0"


class Countdown:
    """An event set once ``n`` things have happened."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.done = trio.Event()
        if n <= 0:
            self.done.set()

    def tick(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.done.set()


class Child:
    """A ``fabric_child.py`` process and its stdout, read a line at a time."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self._buf = b""

    async def line(self) -> str:
        assert self.proc.stdout is not None
        while b"\n" not in self._buf:
            chunk = await self.proc.stdout.receive_some(4096)
            if not chunk:
                raise EOFError(f"child ended (exit status {self.proc.poll()}) before a full line: {self._buf!r}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    async def expect(self, word: str) -> str:
        """Skip lines until one starts with ``word``; return the rest of it."""
        while True:
            head, _, rest = (await self.line()).partition(" ")
            if head == word:
                return rest

    async def say(self, text: str) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(text.encode() + b"\n")

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no goodbye, no cleanup, like a crash or a pulled cable


@asynccontextmanager
async def child(*args: str) -> AsyncIterator[Child]:
    proc = await trio.lowlevel.open_process([sys.executable, str(CHILD), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        yield Child(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    await stream.aclose()


async def echo(req: Request) -> EchoOk:
    assert isinstance(req.msg, Echo)
    await trio.sleep(req.msg.sleep_ms / 1000)
    return EchoOk(n=req.msg.n)


async def recv_msg(sock: Socket) -> Message:
    """The next message on a bare socket that is not a heartbeat."""
    while True:
        msg, _ = CATALOGUE.decode(await sock.recv())
        if not isinstance(msg, Heartbeat):
            return msg


@asynccontextmanager
async def raw_session(endpoint: str) -> AsyncIterator[tuple[Socket, Welcome]]:
    """A bare DEALER that has said hello: it speaks the protocol by hand and may break its rules.

    It sends no heartbeats, so its server needs a heartbeat slow enough not to forget it mid-test.
    """
    sock = Socket.create(default_context(), zmq.DEALER)
    try:
        sock.connect(endpoint)
        await sock.send(CATALOGUE.encode(Hello(id=1, name="raw")))
        welcome = await recv_msg(sock)
        assert isinstance(welcome, Welcome)
        yield sock, welcome
    finally:
        sock.close()


# -- 1. request/reply with deadlines --------------------------------------------------------------------


async def test_request_timeout_and_the_server_runs_the_handler_under_the_same_budget(endpoint: str) -> None:
    budgets: list[float] = []
    cancelled = Countdown(2)

    async def slow(req: Request) -> EchoOk:
        assert isinstance(req.msg, Echo)
        budgets.append(req.deadline - trio.current_time())
        try:
            await trio.sleep(req.msg.sleep_ms / 1000)
        except trio.Cancelled:
            cancelled.tick()
            raise
        return EchoOk(n=req.msg.n)

    server = Server(CATALOGUE, [endpoint], config=server_config(max_in_flight=2))
    server.handle(Echo, slow)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client = await nursery.start(Client(CATALOGUE, server.endpoints[0], config=client_config()).run)
            assert (await client.request(Echo(n=1))).expect(EchoOk).n == 1
            assert budgets[-1] > 5  # the default timeout (10 s) travelled as `dl`

            # Two slow requests take all of the server's credit, and their callers give up.
            start = trio.current_time()

            async def give_up(n: int) -> None:
                with pytest.raises(RequestTimeout):
                    await client.request(Echo(n=n, sleep_ms=10_000), timeout=0.2)

            async with trio.open_nursery() as callers:
                callers.start_soon(give_up, 2)
                callers.start_soon(give_up, 3)
            assert trio.current_time() - start < 2
            assert all(0 < b <= 0.2 + 0.01 for b in budgets[-2:])  # the server knew the callers' budget...
            await cancelled.done.wait()  # ...and abandoned the handlers when it ran out

            # Right away, more requests than the credit: none is sent before the server's DEADLINE
            # answers have returned the credit, so none is answered BUSY.
            results: list[int] = []

            async def ask(n: int) -> None:
                results.append((await client.request(Echo(n=n), timeout=2)).expect(EchoOk).n)

            async with trio.open_nursery() as callers:
                for n in range(4, 24):
                    callers.start_soon(ask, n)
            assert sorted(results) == list(range(4, 24))
            assert server.stats.bad_frames["busy"] == 0
            assert client.stats.late_replies == 0  # the DEADLINE answers found their (abandoned) requests
            nursery.cancel_scope.cancel()


async def test_each_request_times_out_at_its_own_deadline_in_any_order(endpoint: str) -> None:
    """One timer serves every open request's deadline: a later request with a sooner deadline moves it."""

    async def silent(req: Request) -> EchoOk:
        assert isinstance(req.msg, Echo)
        await trio.sleep(req.msg.sleep_ms / 1000)
        return EchoOk(n=req.msg.n)

    server = Server(CATALOGUE, [endpoint], config=server_config(max_in_flight=8))
    server.handle(Echo, silent)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client = await nursery.start(Client(CATALOGUE, server.endpoints[0], config=client_config()).run)
            await client.request(Echo(n=0))
            order: list[int] = []

            async def give_up(n: int, budget: float) -> None:
                with pytest.raises(RequestTimeout):
                    await client.request(Echo(n=n, sleep_ms=60_000), timeout=budget)
                order.append(n)

            async def answered(n: int) -> None:
                assert (await client.request(Echo(n=n, sleep_ms=10), timeout=30)).expect(EchoOk).n == n
                order.append(n)

            async with trio.open_nursery() as callers:
                for n, budget in ((1, 2.5), (2, 1.2), (3, 0.3)):  # each sooner than the ones before it
                    callers.start_soon(give_up, n, budget)
                    await trio.sleep(0.01)
                callers.start_soon(answered, 4)
            assert order == [4, 3, 2, 1]
            # Every abandoned request got the server's DEADLINE answer, which found it still open.
            assert client.stats.late_replies == 0
            nursery.cancel_scope.cancel()


async def test_the_server_answers_deadline_when_a_handler_overruns(endpoint: str) -> None:
    server = Server(CATALOGUE, [endpoint], config=server_config(heartbeat=1.0))
    server.handle(Echo, echo)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            async with raw_session(server.endpoints[0]) as (sock, _):
                start = trio.current_time()
                await sock.send(CATALOGUE.encode(Echo(id=2, dl=150, n=2, sleep_ms=10_000)))
                answer = await recv_msg(sock)
                assert isinstance(answer, Error) and answer.id == 2 and answer.code == ErrorCode.DEADLINE
                assert 0.1 < trio.current_time() - start < 2
                await sock.send(CATALOGUE.encode(Echo(id=3, dl=1000, n=3)))
                answer = await recv_msg(sock)
                assert isinstance(answer, EchoOk) and answer.id == 3 and answer.n == 3
            nursery.cancel_scope.cancel()


async def test_abandoned_requests_keep_their_credit_until_the_server_answers(endpoint: str) -> None:
    log: list[str] = []

    async def stubborn(req: Request) -> EchoOk:
        assert isinstance(req.msg, Echo)
        n = req.msg.n
        log.append(f"start {n}")
        if n < 0:
            # Overrun the deadline on purpose, like a handler in uninterruptible work: the server
            # answers only when it returns, so its slot stays taken well after the caller gave up.
            with trio.CancelScope(shield=True):
                await trio.sleep(0.4)
        log.append(f"end {n}")
        return EchoOk(n=n)

    server = Server(CATALOGUE, [endpoint], config=server_config(max_in_flight=2))
    server.handle(Echo, stubborn)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client = await nursery.start(Client(CATALOGUE, server.endpoints[0], config=client_config()).run)
            await client.request(Echo(n=0))
            assert client.welcome is not None and client.welcome.max_in_flight == 2

            async def abandon(n: int) -> None:
                with pytest.raises(RequestTimeout):
                    await client.request(Echo(n=n), timeout=0.1)

            async with trio.open_nursery() as callers:
                callers.start_soon(abandon, -1)
                callers.start_soon(abandon, -2)

            # Both of the server's slots are still taken. The client queues these rather than send them
            # into BUSY, and sends them once the late answers have returned the credit.
            results: list[int] = []

            async def ask(n: int) -> None:
                results.append((await client.request(Echo(n=n), timeout=5)).expect(EchoOk).n)

            async with trio.open_nursery() as callers:
                for n in range(1, 7):
                    callers.start_soon(ask, n)
            assert sorted(results) == list(range(1, 7))
            assert server.stats.bad_frames["busy"] == 0
            first = min(log.index(f"start {n}") for n in range(1, 7))
            assert log.index("end -1") < first and log.index("end -2") < first
            nursery.cancel_scope.cancel()


async def test_handler_errors_reach_the_client_and_the_server_keeps_serving(endpoint: str) -> None:
    async def picky(req: Request) -> EchoOk:
        assert isinstance(req.msg, Echo)
        if req.msg.n == 1:
            raise RemoteError(1001, "x")
        if req.msg.n == 2:
            raise ValueError("a bug in a handler")
        return EchoOk(n=req.msg.n)

    server = Server(CATALOGUE, [endpoint], config=server_config())
    server.handle(Echo, picky)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client = await nursery.start(Client(CATALOGUE, server.endpoints[0], config=client_config()).run)
            with pytest.raises(RemoteError) as remote:
                await client.request(Echo(n=1))
            assert remote.value.code == 1001 and remote.value.reason == "x"
            with pytest.raises(RemoteError) as internal:
                await client.request(Echo(n=2))
            assert internal.value.code == ErrorCode.INTERNAL
            assert "a bug in a handler" not in internal.value.reason  # no internals leak to the peer
            assert server.stats.bad_frames["handler"] == 1
            for n in range(3, 10):
                assert (await client.request(Echo(n=n))).expect(EchoOk).n == n
            assert client.connected
            nursery.cancel_scope.cancel()


# -- 2. push, both ways ---------------------------------------------------------------------------------


async def test_server_push_reaches_one_client_in_order(endpoint: str) -> None:
    count = 500  # well above the high-water mark: the server's sends back off, in order
    joined: dict[str, bytes] = {}
    both_joined = Countdown(2)

    def on_peer_event(ev: PeerEvent) -> None:
        if ev.kind == "joined":
            joined[ev.peer.name] = ev.peer.routing_id
            both_joined.tick()

    server = Server(CATALOGUE, [endpoint], config=server_config(), on_peer_event=on_peer_event)
    server.handle(Echo, echo)
    got: dict[str, list[int]] = {"alice": [], "bob": []}
    all_in = trio.Event()

    def on_note(name: str) -> Callable[[Note, list[Any]], None]:
        def handler(msg: Note, payload: list[Any]) -> None:
            assert payload == []
            got[name].append(msg.seq)
            if len(got[name]) == count:
                all_in.set()

        return handler

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            for name in ("alice", "bob"):
                client = Client(CATALOGUE, server.endpoints[0], name=name, config=client_config())
                client.on_push(Note, on_note(name))
                await nursery.start(client.run)
            await both_joined.done.wait()
            assert {rid: p.name for rid, p in server.peers.items()} == {v: k for k, v in joined.items()}

            for seq in range(count):
                await server.push(joined["alice"], Note(seq=seq))
            await all_in.wait()
            assert got["alice"] == list(range(count))
            assert got["bob"] == []

            with pytest.raises(PeerGone):
                await server.push(b"\x00nobody", Note(seq=0))
            with pytest.raises(ValueError):
                await server.push(joined["bob"], Echo(n=1))  # a request is not a push
            nursery.cancel_scope.cancel()


async def test_client_push_reaches_the_servers_handler(endpoint: str) -> None:
    ticks: list[tuple[str, int]] = []
    all_in = trio.Event()

    def on_tick(peer: PeerSession, msg: Message, payload: list[Any]) -> None:
        assert isinstance(msg, Tick) and payload == []
        ticks.append((peer.name, msg.seq))
        if len(ticks) == 20:
            all_in.set()

    server = Server(CATALOGUE, [endpoint], config=server_config(heartbeat=1.0))
    server.on_push(Tick, on_tick)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client = await nursery.start(Client(CATALOGUE, server.endpoints[0], name="ticker").run)
            for seq in range(20):
                await client.push(Tick(seq=seq))
            await all_in.wait()
            assert ticks == [("ticker", seq) for seq in range(20)]
            assert server.stats.pushes_in == 20
            with pytest.raises(ValueError):
                await client.push(Echo(n=1))  # a request is not a push
            nursery.cancel_scope.cancel()


async def test_handlers_of_a_departed_client_are_cancelled(endpoint: str) -> None:
    started = trio.Event()
    cancelled = trio.Event()

    async def forever(req: Request) -> EchoOk:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    server = Server(CATALOGUE, [endpoint], config=server_config())
    server.handle(Echo, forever)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            async with raw_session(server.endpoints[0]) as (sock, _):
                # dl 0: no deadline, so only the end of the session can stop the handler.
                await sock.send(CATALOGUE.encode(Echo(id=5, n=1)))
                await started.wait()
                await sock.send(CATALOGUE.encode(Bye(reason="done")))
                await cancelled.wait()
            assert not server.peers
            nursery.cancel_scope.cancel()


# -- 3. flow control ------------------------------------------------------------------------------------


async def test_the_client_queues_requests_beyond_its_credit(endpoint: str) -> None:
    running = 0
    most = 0

    async def counting(req: Request) -> EchoOk:
        nonlocal running, most
        assert isinstance(req.msg, Echo)
        running += 1
        most = max(most, running)
        try:
            await trio.sleep(0.02)
        finally:
            running -= 1
        return EchoOk(n=req.msg.n)

    server = Server(CATALOGUE, [endpoint], config=server_config(max_in_flight=2))
    server.handle(Echo, counting)
    results: list[int] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client = await nursery.start(Client(CATALOGUE, server.endpoints[0], config=client_config()).run)

            async def ask(n: int) -> None:
                results.append((await client.request(Echo(n=n))).expect(EchoOk).n)

            async with trio.open_nursery() as callers:
                for n in range(30):
                    callers.start_soon(ask, n)
            nursery.cancel_scope.cancel()
    assert sorted(results) == list(range(30))
    assert most == 2
    assert server.stats.bad_frames["busy"] == 0


async def test_a_dealer_that_ignores_its_credit_gets_busy(endpoint: str) -> None:
    server = Server(CATALOGUE, [endpoint], config=server_config(heartbeat=1.0, max_in_flight=2))
    server.handle(Echo, echo)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            async with raw_session(server.endpoints[0]) as (sock, welcome):
                assert welcome.max_in_flight == 2
                for i in range(5):
                    await sock.send(CATALOGUE.encode(Echo(id=10 + i, dl=5000, n=i, sleep_ms=200)))
                answers = {}
                for _ in range(5):
                    msg = await recv_msg(sock)
                    answers[msg.id] = msg
            busy = {i for i, m in answers.items() if isinstance(m, Error) and m.code == ErrorCode.BUSY}
            ok = {i for i, m in answers.items() if isinstance(m, EchoOk)}
            assert (ok, busy) == ({10, 11}, {12, 13, 14})
            assert server.stats.bad_frames["busy"] == 3
            nursery.cancel_scope.cancel()


# -- 4. liveness with real processes --------------------------------------------------------------------


async def _gone_after_kill(*, idle: bool) -> None:
    events_in, events_out = trio.open_memory_channel[PeerEvent](100)
    handler_done = trio.Event()
    handler_started = trio.Event()

    async def slow(req: Request) -> EchoOk:
        assert isinstance(req.msg, Echo)
        if req.msg.sleep_ms:
            handler_started.set()
        try:
            await trio.sleep(req.msg.sleep_ms / 1000)
        finally:
            if req.msg.sleep_ms:
                handler_done.set()
        return EchoOk(n=req.msg.n)

    server = Server(CATALOGUE, ["tcp://127.0.0.1:0"], config=server_config(), on_peer_event=events_in.send_nowait)
    server.handle(Echo, slow)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            args = ["--count", "3"] if idle else ["--count", "-1", "--sleep-ms", "1000"]
            async with child("client", server.endpoints[0], "victim", *args) as victim:
                ev = await events_out.receive()
                assert (ev.kind, ev.peer.name) == ("joined", "victim")
                if idle:
                    await victim.expect("idle")  # it made its requests and now only heartbeats
                else:
                    await handler_started.wait()  # a request of the victim's is being handled
                victim.kill()
                killed = trio.current_time()
                ev = await events_out.receive()
                took = trio.current_time() - killed
            assert (ev.kind, ev.peer.name, ev.reason) == ("gone", "victim", "silent")
            assert took < BOUND, f"declared gone after {took:.2f}s"
            assert server.peers == {}
            if not idle:
                # The orphaned handler finishes; its answer has nowhere to go and is dropped quietly.
                await handler_done.wait()
            client = await nursery.start(Client(CATALOGUE, server.endpoints[0], config=client_config()).run)
            assert (await client.request(Echo(n=7))).expect(EchoOk).n == 7
            nursery.cancel_scope.cancel()


async def test_a_killed_idle_client_is_declared_silent() -> None:
    await _gone_after_kill(idle=True)


async def test_a_client_killed_mid_request_is_declared_silent() -> None:
    await _gone_after_kill(idle=False)


async def test_a_client_that_leaves_says_bye() -> None:
    events_in, events_out = trio.open_memory_channel[PeerEvent](100)
    server = Server(CATALOGUE, ["tcp://127.0.0.1:0"], config=server_config(), on_peer_event=events_in.send_nowait)
    server.handle(Echo, echo)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            async with child("client", server.endpoints[0], "polite", "--count", "3") as polite:
                await polite.expect("idle")
                await polite.say("stop")
                ev = await events_out.receive()
                assert (ev.kind, ev.peer.name) == ("joined", "polite")
                ev = await events_out.receive()
                assert (ev.kind, ev.peer.name, ev.reason) == ("gone", "polite", "left")
                assert await polite.proc.wait() == 0
            nursery.cancel_scope.cancel()


async def test_a_killed_server_fails_open_requests_and_the_client_reconnects_to_its_successor(net_endpoint: str) -> None:
    states_in, states_out = trio.open_memory_channel[str](100)
    with trio.fail_after(30):
        async with child("server", net_endpoint) as first:
            endpoint = await first.expect("ready")
            async with trio.open_nursery() as nursery:
                client = Client(CATALOGUE, endpoint, config=client_config(), on_state=states_in.send_nowait)
                await nursery.start(client.run)
                assert await states_out.receive() == "connected"
                assert (await client.request(Echo(n=1))).expect(EchoOk).n == 1

                lost: list[int] = []

                async def doomed(n: int) -> None:
                    try:
                        await client.request(Echo(n=n, sleep_ms=30_000), timeout=20)
                    except ConnectionLost:
                        lost.append(n)

                async with trio.open_nursery() as callers:
                    callers.start_soon(doomed, 2)
                    callers.start_soon(doomed, 3)
                    await first.expect("busy")
                    await first.expect("busy")
                    first.kill()
                    killed = trio.current_time()
                    assert await states_out.receive() == "lost"
                    took = trio.current_time() - killed
                assert took < BOUND, f"server declared gone after {took:.2f}s"
                assert sorted(lost) == [2, 3]
                assert not client.connected

                # A new server on the same endpoint: the same Client finds it and works again.
                async with child("server", endpoint) as second:
                    assert await second.expect("ready") == endpoint
                    assert await states_out.receive() == "connected"
                    assert client.stats.sessions == 2
                    for n in range(10):
                        assert (await client.request(Echo(n=n))).expect(EchoOk).n == n
                nursery.cancel_scope.cancel()


# -- 5. a server restarted in-process --------------------------------------------------------------------


async def _bind_again(nursery: trio.Nursery, endpoint: str) -> Server:
    """Start a server on an endpoint another server just left (a tcp port may linger briefly)."""
    while True:
        server = Server(CATALOGUE, [endpoint], config=ServerConfig(heartbeat=1.0, liveness=3))
        server.handle(Echo, echo)
        try:
            started: Server = await nursery.start(server.run)
            return started
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE:
                raise
            await trio.sleep(0.02)


async def test_a_restarted_server_answers_unknown_peer_and_the_client_rejoins(net_endpoint: str) -> None:
    # Slower heartbeats here, so that neither side's liveness ends the old session before the
    # restarted server has answered a request of it.
    config = ClientConfig(heartbeat=1.0, liveness=3)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as servers:
                old = await _bind_again(servers, net_endpoint)
                endpoint = old.endpoints[0]
                client = await nursery.start(Client(CATALOGUE, endpoint, config=config).run)
                assert (await client.request(Echo(n=1))).expect(EchoOk).n == 1
                old_session = client.welcome
                servers.cancel_scope.cancel()

            new = await _bind_again(nursery, endpoint)
            # The restarted server answers UNKNOWN_PEER; or, if the request went into the old, dying
            # connection (ZeroMQ drops what is queued to a disconnected pipe), the client's next
            # heartbeat gets UNKNOWN_PEER and the request fails with the session.
            with pytest.raises((RemoteError, ConnectionLost)) as unknown:
                await client.request(Echo(n=2))
            if isinstance(unknown.value, RemoteError):
                assert unknown.value.code == ErrorCode.UNKNOWN_PEER
            assert new.stats.bad_frames["unknown_peer"] >= 1
            # The client set up a new session by itself: the next request works.
            assert (await client.request(Echo(n=3))).expect(EchoOk).n == 3
            assert client.stats.sessions == 2
            assert client.welcome is not None and old_session is not None
            assert client.welcome.session != old_session.session
            assert len(new.peers) == 1
            nursery.cancel_scope.cancel()


# -- 6. shutdown -----------------------------------------------------------------------------------------


async def test_cancelling_the_server_ends_running_handlers_promptly(endpoint: str) -> None:
    started = Countdown(3)
    cancelled = Countdown(3)
    answered = Countdown(3)
    outcomes: list[str] = []

    async def stuck(req: Request) -> EchoOk:
        started.tick()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.tick()

    server = Server(CATALOGUE, [endpoint], config=server_config())
    server.handle(Echo, stuck)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def ask(n: int) -> None:
                try:
                    await client.request(Echo(n=n), timeout=8)
                except RemoteError as e:
                    outcomes.append(ErrorCode(e.code).name)
                except ConnectionLost:
                    outcomes.append("lost")
                answered.tick()

            async with trio.open_nursery() as server_nursery:
                await server_nursery.start(server.run)
                client = await nursery.start(Client(CATALOGUE, server.endpoints[0], config=client_config()).run)
                for n in range(3):
                    nursery.start_soon(ask, n)
                await started.done.wait()
                stopping = trio.current_time()
                server_nursery.cancel_scope.cancel()
            assert trio.current_time() - stopping < 1
            assert cancelled.done.is_set()
            # The open requests end soon: UNAVAILABLE if the server said so, else by the client's liveness.
            await answered.done.wait()
            assert trio.current_time() - stopping < BOUND
            assert set(outcomes) <= {"UNAVAILABLE", "lost"}, outcomes
            nursery.cancel_scope.cancel()


async def test_cancelling_a_client_ends_its_open_requests(endpoint: str) -> None:
    running_in, running_out = trio.open_memory_channel[int](100)
    ended = Countdown(2)
    outcomes: list[str] = []
    gone = trio.Event()
    reasons: list[str] = []

    def on_peer_event(ev: PeerEvent) -> None:
        if ev.kind == "gone":
            reasons.append(ev.reason)
            gone.set()

    async def stuck(req: Request) -> EchoOk:
        assert isinstance(req.msg, Echo)
        running_in.send_nowait(req.msg.n)
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    server = Server(CATALOGUE, [endpoint], config=server_config(), on_peer_event=on_peer_event)
    server.handle(Echo, stuck)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)

            async def ask(client: Client, n: int) -> None:
                try:
                    await client.request(Echo(n=n), timeout=8)
                except ConnectionLost:
                    outcomes.append("lost")
                ended.tick()

            async with trio.open_nursery() as client_nursery:
                client = await client_nursery.start(Client(CATALOGUE, server.endpoints[0], config=client_config()).run)
                for n in range(2):
                    nursery.start_soon(ask, client, n)  # the callers live outside the client's nursery
                assert {await running_out.receive(), await running_out.receive()} == {0, 1}
                stopping = trio.current_time()
                client_nursery.cancel_scope.cancel()
            await ended.done.wait()
            assert trio.current_time() - stopping < 1
            assert outcomes == ["lost", "lost"]
            with pytest.raises(ConnectionLost):
                await client.request(Echo(n=9))  # a stopped client fails at once
            await gone.wait()
            assert reasons == ["left"]

            # Callers in the client's own nursery are simply cancelled with it.
            cancelled = Countdown(2)

            async def ask_until_cancelled(client: Client, n: int) -> None:
                try:
                    await client.request(Echo(n=n), timeout=8)
                except trio.Cancelled:
                    cancelled.tick()
                    raise

            async with trio.open_nursery() as client_nursery:
                client = await client_nursery.start(Client(CATALOGUE, server.endpoints[0], config=client_config()).run)
                for n in range(2, 4):
                    client_nursery.start_soon(ask_until_cancelled, client, n)
                assert {await running_out.receive(), await running_out.receive()} == {2, 3}
                stopping = trio.current_time()
                client_nursery.cancel_scope.cancel()
            assert trio.current_time() - stopping < 1
            assert cancelled.done.is_set()
            nursery.cancel_scope.cancel()


async def test_handle_now_answers_in_arrival_order_and_maps_errors(endpoint: str) -> None:
    seen: list[int] = []

    def now(req: Request) -> EchoOk:
        assert isinstance(req.msg, Echo)
        if req.msg.n == 13:
            raise RemoteError(1013, "unlucky")
        if req.msg.n == 14:
            raise KeyError("bug")
        seen.append(req.msg.n)
        return EchoOk(n=req.msg.n)

    server = Server(CATALOGUE, [endpoint], config=server_config())
    server.handle_now(Echo, now)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client = await nursery.start(Client(CATALOGUE, server.endpoints[0], config=client_config()).run)
            results: dict[int, int] = {}

            async def ask(n: int) -> None:
                results[n] = (await client.request(Echo(n=n))).expect(EchoOk).n

            async with trio.open_nursery() as asks:
                for n in range(10):
                    asks.start_soon(ask, n)
            assert results == {n: n for n in range(10)}
            assert sorted(seen) == list(range(10))
            with pytest.raises(RemoteError) as unlucky:
                await client.request(Echo(n=13))
            assert unlucky.value.code == 1013
            with pytest.raises(RemoteError) as bug:
                await client.request(Echo(n=14))
            assert bug.value.code == ErrorCode.INTERNAL
            assert (await client.request(Echo(n=15))).expect(EchoOk).n == 15
            nursery.cancel_scope.cancel()
