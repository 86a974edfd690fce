"""Real-socket tests of :class:`dfz.broker.socket.Socket`, the trio adapter for one pyzmq socket.

No fakes: every test drives real ZeroMQ sockets over inproc, ipc and tcp (the ``endpoint`` fixture), and
every test is bounded by ``trio.fail_after`` so a stall fails instead of hanging.

What is checked, against the rules in the module's docstring:

* many tasks sending and receiving on one socket pair with a tiny high-water mark lose nothing, duplicate
  nothing, never reorder one sender's messages and never stall (a watchdog fails the test when no receive
  completes for about a second while messages are known to be in flight, or no send completes while
  sends are waiting), one way and both ways at once;
* the wake-up baton step by step: an fd edge consumed by another task's call, a cancelled fd owner and a
  parked waiter that must be promoted, each staged deterministically;
* cancellation storms never lose a received message and never report a sent message as cancelled (nor
  let a cancelled one through);
* ``close()`` wakes every task blocked in send or recv with ``trio.ClosedResourceError``;
* a ROUTER with ``ROUTER_MANDATORY`` raises ``HostUnreachable`` / ``WouldBlock`` instead of dropping;
* received frames are zero-copy ``zmq.Frame`` objects whose buffers can be hashed in a thread;
* ``try_send`` says False instead of raising.
"""

from __future__ import annotations

import functools
import os
import random
import select
import struct
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
import zmq
from blake3 import blake3

from dfz.broker.socket import HostUnreachable, Socket, WouldBlock

# A receive must complete within this long whenever messages are known to be in flight, and a send
# whenever sends are waiting (the receivers always drain).
STALL_LIMIT = 1.0
# How long to keep listening after the last expected message, to catch duplicates and ghosts.
QUIET = 0.1

HEADER = struct.Struct("!IQ")  # sender id, sequence number


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    """A fresh context per test; destroy() closes any socket a failing test left open, so term never hangs."""
    context: zmq.Context[Any] = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


def open_pair(
    ctx: zmq.Context[Any],
    endpoint: str,
    bind_type: int,
    connect_type: int,
    *,
    hwm: int,
    bind_options: dict[int, int | bytes] | None = None,
    connect_options: dict[int, int | bytes] | None = None,
) -> tuple[Socket, Socket]:
    """A bound socket and a socket connected to it."""
    bound = Socket.create(ctx, bind_type, hwm=hwm, options=bind_options)
    try:
        resolved = bound.bind(endpoint)
        if endpoint.startswith("tcp://"):
            assert not resolved.endswith(":0"), resolved
        connected = Socket.create(ctx, connect_type, hwm=hwm, options=connect_options)
        connected.connect(resolved)
    except BaseException:
        bound.close()
        raise
    return bound, connected


def make_message(sender: int, seq: int) -> list[bytes]:
    """Two frames, so that multipart atomicity is checked too: a header and a body derived from it."""
    header = HEADER.pack(sender, seq)
    return [header, header * (seq % 4)]


def parse_message(frames: Sequence[zmq.Frame]) -> tuple[int, int]:
    assert len(frames) == 2, f"a message arrived with {len(frames)} frames instead of 2"
    header = frames[0].bytes
    sender, seq = HEADER.unpack(header)
    assert frames[1].bytes == header * (seq % 4), f"body of {(sender, seq)} is corrupt"
    return sender, seq


class Flow:
    """Book-keeping for one direction of traffic: what was sent and received, and since when neither a
    receive (while messages are in flight) nor a send (while sends are waiting) has completed."""

    def __init__(self, name: str, total: int | None = None) -> None:
        self.name = name
        self.total = total
        self.sent = 0
        self.count = 0
        self.received: set[tuple[int, int]] = set()
        self.recv_since = trio.current_time()
        self.sending = 0
        self.send_since = trio.current_time()
        self.done = trio.Event()

    def begin_send(self) -> None:
        if self.sending == 0:  # no send was waiting: the send stall clock starts now
            self.send_since = trio.current_time()
        self.sending += 1

    def on_sent(self) -> None:
        now = trio.current_time()
        self.sending -= 1
        self.send_since = now
        if self.sent <= self.count:  # nothing was in flight: the receive stall clock starts now
            self.recv_since = now
        self.sent += 1

    def send_cancelled(self) -> None:
        self.sending -= 1

    def on_received(self, key: tuple[int, int], last: dict[int, int]) -> None:
        """Record one message; ``last`` is the receiving task's own view of each sender's sequence."""
        sender, seq = key
        assert key not in self.received, f"{self.name}: message {key} received twice"
        previous = last.get(sender, -1)
        assert seq > previous, f"{self.name}: sender {sender} reordered: {seq} after {previous} in one receiver"
        last[sender] = seq
        self.received.add(key)
        self.count += 1
        self.recv_since = trio.current_time()
        self._check_done()

    def expect(self, total: int) -> None:
        self.total = total
        self._check_done()

    def _check_done(self) -> None:
        if self.total is not None and self.count >= self.total:
            self.done.set()

    def check_progress(self) -> None:
        now = trio.current_time()
        if self.sent > self.count and now - self.recv_since > STALL_LIMIT:
            raise AssertionError(
                f"{self.name}: receive stalled: {self.sent - self.count} messages sent but not received and no "
                f"receive completed for {now - self.recv_since:.2f}s ({self.count} of {self.total} received)"
            )
        if self.sending > 0 and now - self.send_since > STALL_LIMIT:
            raise AssertionError(
                f"{self.name}: send stalled: {self.sending} sends waiting and none completed for "
                f"{now - self.send_since:.2f}s while the receivers drain ({self.sent} sent, {self.count} received)"
            )


async def watchdog(flows: Sequence[Flow]) -> None:
    """Fail when, for more than STALL_LIMIT, no receive completed while sent messages were outstanding,
    or no send completed while sends were waiting (the receivers always drain, so room must come)."""
    while True:
        await trio.sleep(0.05)
        for flow in flows:
            flow.check_progress()


def random_scope(rng: random.Random, *, max_delay: float = 0.002) -> trio.CancelScope:
    """A cancel scope that is either cancelled up front (10%) or expires after a random 0-2 ms."""
    scope = trio.CancelScope()
    if rng.random() < 0.1:
        scope.cancel()
    else:
        scope.deadline = trio.current_time() + rng.uniform(0.0, max_delay)
    return scope


async def sender(sock: Socket, flow: Flow, sender_id: int, count: int, rng: random.Random) -> None:
    for seq in range(count):
        flow.begin_send()
        await sock.send(make_message(sender_id, seq))
        flow.on_sent()
        if rng.random() < 0.05:
            await trio.lowlevel.checkpoint()


async def receiver(sock: Socket, flow: Flow, strip: int, rng: random.Random) -> None:
    last: dict[int, int] = {}
    while True:
        frames = await sock.recv()
        flow.on_received(parse_message(frames[strip:]), last)
        if rng.random() < 0.05:
            await trio.lowlevel.checkpoint()


async def assert_nothing_more(sock: Socket) -> None:
    with trio.move_on_after(QUIET):
        frames = await sock.recv()
        pytest.fail(f"unexpected extra message: {[f.bytes[:32] for f in frames]}")


# -- 1. many senders and receivers on one pair, tiny HWM ---------------------------------------------------


@pytest.mark.parametrize(
    "kinds",
    [pytest.param((zmq.ROUTER, zmq.DEALER, 1), id="dealer-to-router"), pytest.param((zmq.PAIR, zmq.PAIR, 0), id="pair")],
)
async def test_many_tasks_one_way_no_loss_no_dup_no_reorder_no_stall(
    ctx: zmq.Context[Any], endpoint: str, kinds: tuple[int, int, int]
) -> None:
    bind_type, connect_type, strip = kinds
    senders, receivers, per_sender = 4, 4, 2_500
    rng = random.Random(1)
    flow = Flow("one-way", senders * per_sender)
    with trio.fail_after(40):
        bound, connected = open_pair(ctx, endpoint, bind_type, connect_type, hwm=2)
        with bound, connected:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watchdog, [flow])
                for _ in range(receivers):
                    nursery.start_soon(receiver, bound, flow, strip, random.Random(rng.random()))
                for s in range(senders):
                    nursery.start_soon(sender, connected, flow, s, per_sender, random.Random(rng.random()))
                await flow.done.wait()
                nursery.cancel_scope.cancel()
            assert flow.sent == senders * per_sender
            assert flow.received == {(s, q) for s in range(senders) for q in range(per_sender)}
            await assert_nothing_more(bound)


async def test_many_tasks_both_ways_at_once(ctx: zmq.Context[Any], endpoint: str) -> None:
    """DEALER <-> DEALER, each side sending and receiving concurrently on the same socket: senders and
    receivers share one edge-triggered fd, the case where a consumed edge would stall someone."""
    senders, receivers, per_sender = 3, 3, 3_334
    rng = random.Random(2)
    a_to_b = Flow("a->b", senders * per_sender)
    b_to_a = Flow("b->a", senders * per_sender)
    with trio.fail_after(40):
        a, b = open_pair(ctx, endpoint, zmq.DEALER, zmq.DEALER, hwm=2)
        with a, b:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watchdog, [a_to_b, b_to_a])
                for _ in range(receivers):
                    nursery.start_soon(receiver, b, a_to_b, 0, random.Random(rng.random()))
                    nursery.start_soon(receiver, a, b_to_a, 0, random.Random(rng.random()))
                for s in range(senders):
                    nursery.start_soon(sender, a, a_to_b, s, per_sender, random.Random(rng.random()))
                    nursery.start_soon(sender, b, b_to_a, s, per_sender, random.Random(rng.random()))
                await a_to_b.done.wait()
                await b_to_a.done.wait()
                nursery.cancel_scope.cancel()
            expected = {(s, q) for s in range(senders) for q in range(per_sender)}
            assert a_to_b.received == expected
            assert b_to_a.received == expected
            await assert_nothing_more(a)
            await assert_nothing_more(b)


# -- 2. cancellation storms --------------------------------------------------------------------------------


async def storm_sender(
    sock: Socket,
    flow: Flow,
    sender_id: int,
    *,
    count: int,
    outcome: dict[tuple[int, int], bool],
    rng: random.Random,
    cancel: bool,
) -> None:
    for seq in range(count):
        returned = False
        flow.begin_send()
        with random_scope(rng) if cancel else trio.CancelScope():
            await sock.send(make_message(sender_id, seq))
            returned = True
        outcome[(sender_id, seq)] = returned
        if returned:
            flow.on_sent()
        else:
            flow.send_cancelled()
            if rng.random() < 0.5:
                await trio.lowlevel.checkpoint()  # a send cancelled up front does not yield: let others run


async def storm_receiver(sock: Socket, flow: Flow, *, strip: int, rng: random.Random, cancel: bool, cancelled: list[int]) -> None:
    last: dict[int, int] = {}
    while True:
        with random_scope(rng) if cancel else trio.CancelScope() as scope:
            frames = await sock.recv()
            # No checkpoint between the return and the record: if recv returned, the message is counted.
            flow.on_received(parse_message(frames[strip:]), last)
        if scope.cancelled_caught:
            cancelled[0] += 1
            if rng.random() < 0.5:
                await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("storm", ["receivers", "senders", "both"])
async def test_cancellation_storm(ctx: zmq.Context[Any], endpoint: str, storm: str) -> None:
    cancel_senders = storm in ("senders", "both")
    cancel_receivers = storm in ("receivers", "both")
    senders, receivers, per_sender = 8, 12, 400
    rng = random.Random(3)
    flow = Flow(f"storm on {storm}")
    outcome: dict[tuple[int, int], bool] = {}
    receives_cancelled = [0]
    with trio.fail_after(40):
        bound, connected = open_pair(ctx, endpoint, zmq.ROUTER, zmq.DEALER, hwm=2)
        with bound, connected:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watchdog, [flow])
                for _ in range(receivers):
                    nursery.start_soon(
                        functools.partial(
                            storm_receiver,
                            bound,
                            flow,
                            strip=1,
                            rng=random.Random(rng.random()),
                            cancel=cancel_receivers,
                            cancelled=receives_cancelled,
                        )
                    )
                async with trio.open_nursery() as sending:
                    for s in range(senders):
                        sending.start_soon(
                            functools.partial(
                                storm_sender,
                                connected,
                                flow,
                                s,
                                count=per_sender,
                                outcome=outcome,
                                rng=random.Random(rng.random()),
                                cancel=cancel_senders,
                            )
                        )
                flow.expect(sum(outcome.values()))
                await flow.done.wait()
                # Keep the storm going a little: a cancelled send that went out anyway, or a message
                # delivered twice, would show up now.
                await trio.sleep(QUIET)
                nursery.cancel_scope.cancel()
            assert len(outcome) == senders * per_sender
            returned = {key for key, ok in outcome.items() if ok}
            assert flow.received - returned == set(), "a send reported as cancelled was delivered"
            assert returned - flow.received == set(), "a send that returned normally was never received"
            await assert_nothing_more(bound)
    if cancel_senders:
        assert 0 < len(returned) < senders * per_sender, "the storm should both cancel and complete sends"
    if cancel_receivers:
        assert receives_cancelled[0] > 0


# -- 3. close while tasks are blocked ---------------------------------------------------------------------


# Over tcp, kernel buffers keep taking a little more for a while (delayed ACKs): a queue counts as full
# only when it has refused everything for this long.
FULL_FOR = 0.3


async def fill_until_full(attempt: Callable[[], Awaitable[bool]]) -> int:
    """Call ``attempt`` (a non-waiting send that says whether it went) until the queue stays full."""
    sent = 0
    full_since: float | None = None
    while True:
        if await attempt():
            sent += 1
            full_since = None
            assert sent < 10_000, "the queue never filled up"
        else:
            now = trio.current_time()
            if full_since is None:
                full_since = now
            elif now - full_since >= FULL_FOR:
                return sent
            await trio.sleep(0.02)


async def fill(sock: Socket, frames: Sequence[bytes]) -> int:
    """Fill a peer that never reads, with try_send."""

    async def attempt() -> bool:
        return sock.try_send(frames)

    return await fill_until_full(attempt)


async def fill_router(router: Socket, rid: bytes, payload: bytes) -> int:
    """Fill one peer of a ROUTER with ``send(..., wait=False)``, which must report WouldBlock at once."""

    async def attempt() -> bool:
        started = time.monotonic()
        try:
            await router.send([rid, payload], wait=False)
        except WouldBlock:
            assert time.monotonic() - started < 0.5, "send(wait=False) did not return at once"
            return False
        return True

    return await fill_until_full(attempt)


@pytest.mark.parametrize("fd_owner", ["recv", "send"])
async def test_close_wakes_tasks_blocked_in_send_and_recv(ctx: zmq.Context[Any], endpoint: str, fd_owner: str) -> None:
    """Four receivers and four senders blocked on one socket (the first to block owns the fd, the others
    are parked) all get ClosedResourceError when another task closes it."""
    with trio.fail_after(10):
        peer, sock = open_pair(ctx, endpoint, zmq.DEALER, zmq.DEALER, hwm=1)  # the peer never reads
        with peer, sock:
            assert await fill(sock, [bytes(256 * 1024)]) >= 1
            outcomes: list[str] = []

            async def blocked(op: Callable[[], Awaitable[object]]) -> None:
                try:
                    await op()
                except trio.ClosedResourceError:
                    outcomes.append("closed")
                else:
                    outcomes.append("returned")

            ops: list[Callable[[], Awaitable[object]]] = [sock.recv, functools.partial(sock.send, [b"never"])]
            if fd_owner == "send":
                ops.reverse()
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    for op in ops:
                        nursery.start_soon(blocked, op)
                        await trio.testing.wait_all_tasks_blocked()
                assert outcomes == []
                sock.close()
            assert outcomes == ["closed"] * 8
            assert sock.closed

            # After close: every operation says closed, and closing again is harmless.
            with pytest.raises(trio.ClosedResourceError):
                await sock.recv()
            with pytest.raises(trio.ClosedResourceError):
                await sock.send([b"late"])
            with pytest.raises(trio.ClosedResourceError):
                await sock.send([b"late"], wait=False)
            with pytest.raises(trio.ClosedResourceError):
                sock.connect(endpoint)
            with pytest.raises(trio.ClosedResourceError):
                sock.bind(endpoint)
            assert sock.try_send([b"late"]) is False
            sock.close()
            sock.close()


async def test_close_wakes_blocked_recv_without_any_peer(ctx: zmq.Context[Any]) -> None:
    """The simplest case: a lone socket, one task owning the fd and others parked behind it."""
    with trio.fail_after(5):
        sock = Socket.create(ctx, zmq.DEALER, hwm=1)
        closed = 0

        async def wait_forever() -> None:
            nonlocal closed
            with pytest.raises(trio.ClosedResourceError):
                await sock.recv()
            closed += 1

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(wait_forever)
            await trio.testing.wait_all_tasks_blocked()
            sock.close()
        assert closed == 3


async def test_cancelled_fd_owner_hands_over_to_a_parked_waiter(ctx: zmq.Context[Any], endpoint: str) -> None:
    """The first receiver owns the fd; cancelling it must leave a parked receiver watching, or the
    parked one would sleep through the next message."""
    with trio.fail_after(10):
        bound, connected = open_pair(ctx, endpoint, zmq.PAIR, zmq.PAIR, hwm=2)
        with bound, connected:
            got: list[bytes] = []

            async def receive_one() -> None:
                frames = await bound.recv()
                got.append(frames[0].bytes)

            async with trio.open_nursery() as nursery:
                owner_scope = trio.CancelScope()
                nursery.start_soon(_run_in, owner_scope, receive_one)  # becomes the fd owner
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(receive_one)  # parks behind the owner
                await trio.testing.wait_all_tasks_blocked()
                owner_scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
                await connected.send([b"hello"])
            assert got == [b"hello"]


async def _run_in(scope: trio.CancelScope, fn: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await fn()


# -- the wake-up baton, step by step ------------------------------------------------------------------------


async def handshake(a: Socket, b: Socket) -> None:
    """One message each way, so that a tcp or ipc connection is up before the test proper."""
    await a.send([b"ping"])
    assert [f.bytes for f in await b.recv()] == [b"ping"]
    await b.send([b"pong"])
    assert [f.bytes for f in await a.recv()] == [b"pong"]


def fd_readable(sock: Socket, timeout: float) -> bool:
    """Whether the socket's edge-triggered ZMQ_FD signals, waiting synchronously (trio does not run)."""
    readable, _, _ = select.select([int(sock.zmq_socket.getsockopt(zmq.FD))], [], [], timeout)
    return bool(readable)


@pytest.mark.parametrize("via", ["try_send", "send"])
async def test_a_call_that_consumes_the_edge_wakes_the_fd_owner(ctx: zmq.Context[Any], endpoint: str, via: str) -> None:
    """A message arrives while a receiver sleeps on the fd, and before trio polls again another task's
    send on the same socket drains the fd. That send's re-read of EVENTS must wake the receiver, or the
    receiver sleeps on a silent fd with a message waiting. (``send`` drains the fd before it first yields.)"""
    with trio.fail_after(10):
        # A high HWM keeps libzmq's low-water-mark notifications (which would signal the fd) out of the way.
        a, b = open_pair(ctx, endpoint, zmq.DEALER, zmq.DEALER, hwm=1000)
        with a, b:
            await handshake(a, b)
            got: list[bytes] = []

            async def receive_one() -> None:
                got.append((await a.recv())[0].bytes)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive_one)
                await trio.testing.wait_all_tasks_blocked()
                assert b.try_send([b"for a"])
                assert fd_readable(a, 5.0), "the message's arrival was never signalled"
                if via == "try_send":
                    assert a.try_send([b"for b"])  # without yielding: this call consumes the edge
                else:
                    await a.send([b"for b"])
                assert not fd_readable(a, 0.0), "the edge was not consumed; the test proves nothing"
                with trio.fail_after(2):
                    await trio.testing.wait_all_tasks_blocked()
                    assert got == [b"for a"], "the receiver slept through a consumed edge"
            assert [f.bytes for f in await b.recv()] == [b"for b"]


async def test_a_send_that_must_wait_still_wakes_the_fd_owner(ctx: zmq.Context[Any], endpoint: str) -> None:
    """Same as above, but the call that consumes the edge is a send that finds the queue full and goes to
    wait itself: its own re-read of EVENTS, before it sleeps, must wake the receiver."""
    with trio.fail_after(10):
        a, b = open_pair(ctx, endpoint, zmq.DEALER, zmq.DEALER, hwm=1)
        with a, b:
            await handshake(a, b)
            assert await fill(a, [bytes(256 * 1024)]) >= 1  # b never reads: a's sends now wait
            got: list[bytes] = []

            async def receive_one() -> None:
                got.append((await a.recv())[0].bytes)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive_one)
                await trio.testing.wait_all_tasks_blocked()
                assert b.try_send([b"for a"])
                assert fd_readable(a, 5.0), "the message's arrival was never signalled"
                with trio.move_on_after(0.5) as waited:
                    await a.send([b"no room"])  # runs to EAGAIN and its wait without yielding first
                assert waited.cancelled_caught
                assert got == [b"for a"], "the receiver slept through an edge consumed by a waiting send"


async def test_a_parked_receiver_takes_over_the_fd_when_the_woken_one_needs_no_wait(ctx: zmq.Context[Any], endpoint: str) -> None:
    """Receivers O (fd owner), P1 and P2 (parked). O is cancelled and hands over to P1, whose retry
    succeeds at once; P2 must then be promoted to watch the fd, or nobody is watching it."""
    with trio.fail_after(10):
        a, b = open_pair(ctx, endpoint, zmq.DEALER, zmq.DEALER, hwm=1000)
        with a, b:
            await handshake(a, b)
            got: list[bytes] = []
            both = trio.Event()

            async def receive_one() -> None:
                got.append((await a.recv())[0].bytes)
                if len(got) == 2:
                    both.set()

            owner = trio.CancelScope()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_run_in, owner, receive_one)
                await trio.testing.wait_all_tasks_blocked()
                for _ in range(2):
                    nursery.start_soon(receive_one)
                    await trio.testing.wait_all_tasks_blocked()
                assert b.try_send([b"one"])
                assert fd_readable(a, 5.0), "the message's arrival was never signalled"
                owner.cancel()
                await trio.testing.wait_all_tasks_blocked()
                assert got == [b"one"]
                assert b.try_send([b"two"])
                with trio.move_on_after(2):
                    await both.wait()
                assert got == [b"one", b"two"], "the parked receiver was never promoted to watch the fd"
                nursery.cancel_scope.cancel()  # the cancelled owner's task has finished; nothing else is left
            assert owner.cancelled_caught


# -- 4. ROUTER with ROUTER_MANDATORY ------------------------------------------------------------------------


async def test_router_unknown_peer_and_full_peer(ctx: zmq.Context[Any], endpoint: str) -> None:
    with trio.fail_after(15):
        router = Socket.create(ctx, zmq.ROUTER, hwm=2)
        with router:
            addr = router.bind(endpoint)
            # An unknown routing id is an error, never a silent drop; the socket stays usable.
            with pytest.raises(HostUnreachable):
                await router.send([b"nobody", b"hello"])
            with pytest.raises(HostUnreachable):
                await router.send([b"nobody", b"hello"], wait=False)
            assert router.try_send([b"nobody", b"hello"]) is False

            slow = Socket.create(ctx, zmq.DEALER, hwm=1, options={zmq.ROUTING_ID: b"slow"})
            with slow:
                slow.connect(addr)
                await slow.send([b"hi"])
                rid, hi = await router.recv()
                assert (rid.bytes, hi.bytes) == (b"slow", b"hi")

                # Fill the peer that never reads; wait=False then reports WouldBlock, it does not spin.
                payload = bytes(256 * 1024)
                sent = await fill_router(router, b"slow", payload)
                assert sent >= 1
                with pytest.raises(WouldBlock):
                    await router.send([b"slow", b"more"], wait=False)
                assert router.try_send([b"slow", b"more"]) is False

                # Another peer with room is still reachable while the first one is full.
                fast = Socket.create(ctx, zmq.DEALER, hwm=2, options={zmq.ROUTING_ID: b"fast"})
                with fast:
                    fast.connect(addr)
                    await fast.send([b"hi"])
                    rid, _ = await router.recv()
                    assert rid.bytes == b"fast"
                    await router.send([b"fast", b"for fast"], wait=False)
                    (msg,) = await fast.recv()
                    assert msg.bytes == b"for fast"

                # The slow peer gets everything that was accepted, nothing was dropped.
                received = 0
                while received < sent:
                    frames = await slow.recv()
                    assert len(frames) == 1 and frames[0].buffer == payload
                    received += 1
                await assert_nothing_more(slow)


async def test_router_send_waits_for_room_at_its_only_peer(ctx: zmq.Context[Any], endpoint: str) -> None:
    """With a single peer POLLOUT really means room at that peer, so a waiting send is woken when the
    peer drains its queue (with more peers it would spin, which is why dfz bounds in-flight requests)."""
    with trio.fail_after(15):
        router = Socket.create(ctx, zmq.ROUTER, hwm=1)
        with router:
            addr = router.bind(endpoint)
            dealer = Socket.create(ctx, zmq.DEALER, hwm=1, options={zmq.ROUTING_ID: b"d"})
            with dealer:
                dealer.connect(addr)
                await dealer.send([b"hi"])
                await router.recv()
                payload = bytes(256 * 1024)
                sent = await fill_router(router, b"d", payload)
                assert sent >= 1
                waiting_send_done = trio.Event()

                async def waiting_send() -> None:
                    await router.send([b"d", b"last"])
                    waiting_send_done.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(waiting_send)
                    await trio.testing.wait_all_tasks_blocked()
                    assert not waiting_send_done.is_set()
                    for _ in range(sent):
                        (frame,) = await dealer.recv()
                        assert len(frame.buffer) == len(payload)
                    (last,) = await dealer.recv()
                    assert last.bytes == b"last"
                assert waiting_send_done.is_set()


async def test_router_reports_a_peer_that_went_away(ctx: zmq.Context[Any], endpoint: str) -> None:
    with trio.fail_after(10):
        router = Socket.create(ctx, zmq.ROUTER, hwm=2)
        with router:
            addr = router.bind(endpoint)
            dealer = Socket.create(ctx, zmq.DEALER, hwm=2, options={zmq.ROUTING_ID: b"gone"})
            dealer.connect(addr)
            await dealer.send([b"hi"])
            await router.recv()
            await router.send([b"gone", b"welcome"])
            dealer.close()
            while True:  # the disconnection reaches the ROUTER asynchronously
                try:
                    await router.send([b"gone", b"still there?"], wait=False)
                except HostUnreachable:
                    break
                except WouldBlock:
                    pass
                await trio.sleep(0.01)


# -- 5. zero-copy frames ---------------------------------------------------------------------------------


async def test_large_frames_are_zero_copy_and_hashable_in_a_thread(ctx: zmq.Context[Any], endpoint: str) -> None:
    size = 4 * 1024 * 1024
    payloads = [os.urandom(size) for _ in range(3)]
    digests = [blake3(p).digest() for p in payloads]
    with trio.fail_after(30):
        router, dealer = open_pair(ctx, endpoint, zmq.ROUTER, zmq.DEALER, hwm=2)
        with router, dealer:
            kept: list[zmq.Frame] = []
            hashed: dict[int, bytes] = {}

            async def hash_in_thread(index: int, frame: zmq.Frame) -> None:
                # The frame object stays referenced (in ``kept``) while a thread reads its buffer.
                hashed[index] = await trio.to_thread.run_sync(lambda: blake3(frame.buffer, max_threads=1).digest())

            async def send_all() -> None:
                for i, payload in enumerate(payloads * 2):
                    await dealer.send([struct.pack("!I", i), payload])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all)
                for _ in range(len(payloads) * 2):
                    frames = await router.recv()
                    assert len(frames) == 3
                    assert all(isinstance(f, zmq.Frame) for f in frames)
                    (index,) = struct.unpack("!I", frames[1].bytes)
                    body = frames[2]
                    assert isinstance(body.buffer, memoryview)
                    assert body.buffer.nbytes == size
                    assert body.buffer == payloads[index % len(payloads)]
                    kept.append(body)
                    nursery.start_soon(hash_in_thread, index, body)
            assert hashed == {i: digests[i % len(payloads)] for i in range(len(payloads) * 2)}

            # A received frame can be sent on as it is (zero-copy forwarding), and arrives intact.
            rid = frames[0]
            await router.send([rid, kept[0]])
            (echo,) = await dealer.recv()
            assert echo.buffer == kept[0].buffer


# -- 6. try_send ---------------------------------------------------------------------------------------------


async def test_try_send_says_false_instead_of_raising(ctx: zmq.Context[Any], endpoint: str) -> None:
    with trio.fail_after(10):
        lonely = Socket.create(ctx, zmq.DEALER, hwm=1)
        with lonely:
            assert lonely.try_send([b"nobody is there"]) is False  # a DEALER without peers has no room

        peer, sock = open_pair(ctx, endpoint, zmq.DEALER, zmq.DEALER, hwm=1)
        with peer, sock:
            assert sock.try_send([b"first", b"two frames"]) is True
            frames = await peer.recv()
            assert [f.bytes for f in frames] == [b"first", b"two frames"]

            sent = await fill(sock, [b"x" * 65536])
            assert sock.try_send([b"x"]) is False  # full
            for _ in range(sent):
                await peer.recv()
            for _ in range(500):  # room again once the peer has read
                if sock.try_send([b"after"]):
                    break
                await trio.sleep(0.01)
            else:
                pytest.fail("try_send never found room again")
            (after,) = await peer.recv()
            assert after.bytes == b"after"

            sock.close()
            assert sock.try_send([b"closed"]) is False

        router = Socket.create(ctx, zmq.ROUTER, hwm=1)
        with router:
            assert router.try_send([b"unknown", b"x"]) is False  # HostUnreachable, as a False
