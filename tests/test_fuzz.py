"""Fuzzing a live server: hostile frames never take it down, nor the session of a well-behaved client.

A real :class:`Server` (an Echo and an Upload handler) runs on tcp (and inproc) with a real
:class:`Client` making requests the whole time, while an attacker on a raw DEALER sends garbage: random
bytes, random MessagePack, envelopes with wrong or nonsense values, known types with wrong fields,
unknown types, wrong frame counts, empty and oversized frames, huge declared lengths, deep nesting,
server->client kinds, with or without a session (a valid ``hello`` first).

Every reply the attacker gets must be a valid message, and must be exactly what protocol.md §6.2
prescribes: an ``error`` with the message's id and code where a positive id can be read, nothing
otherwise. A small model of the server (the codec's verdict plus the session state) predicts the
replies and the ``bad_frames`` counters of each Hypothesis example exactly; a fixed battery checks the
same against hand-written expectations. After each run the server task still runs, the good client
never lost its session and its requests still succeed. Last, a raw ROUTER plays a hostile server to a
real Client, which must drop and count the garbage and keep working.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
import trio
import zmq
from conftest import CATALOGUE, Echo, EchoOk, Note, Tick, Upload
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from dfz.broker import (
    Bye,
    Catalogue,
    Client,
    ClientConfig,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    Kind,
    Message,
    ProtocolError,
    Request,
    Server,
    ServerConfig,
    Socket,
    Welcome,
)
from dfz.broker.messages import MAX_HEADER_BYTES

MAX_PAYLOAD = CATALOGUE.max_payload
MAX_MSG_SIZE = MAX_PAYLOAD + 65536  # the server's ZMQ_MAXMSGSIZE: a bigger frame drops the connection

Label = ErrorCode | str
"""What a reply is: the code of an ``error``, else the wire name of its type."""

SENTINEL_ID = 0x5E57_1E11_D00D_0001
SENTINEL_ANSWERS: frozenset[Label] = frozenset({ErrorCode.UNEXPECTED, ErrorCode.UNKNOWN_PEER})
ECHO_REPLIES: frozenset[Label] = frozenset({"test.echo_ok", ErrorCode.DEADLINE, ErrorCode.BUSY})


def pack(obj: Any) -> bytes:
    out = msgpack.packb(obj)
    assert isinstance(out, bytes)
    return out


def sentinel() -> list[bytes]:
    """A reply sent to the server: always answered at once (UNEXPECTED, or UNKNOWN_PEER without a
    session) by the server's own logic, not by the codec under test. The server handles one peer's
    messages in order, so this answer comes after every synchronous answer to what was sent before it."""
    return Catalogue.encode(EchoOk(id=SENTINEL_ID))


def label_of(msg: Message) -> Label:
    return ErrorCode(msg.code) if isinstance(msg, Error) else msg.wire_name()


def frame_len(frame: Any) -> int:
    return len(frame.buffer) if isinstance(frame, zmq.Frame) else len(frame)


# -- the live fabric ------------------------------------------------------------------------------------


async def echo(req: Request) -> EchoOk:
    msg = req.msg
    assert isinstance(msg, Echo)
    if msg.sleep_ms:
        await trio.sleep(min(msg.sleep_ms, 20) / 1000)
    return EchoOk(n=msg.n)


async def upload(req: Request) -> EchoOk:
    assert isinstance(req.msg, Upload)
    return EchoOk(n=frame_len(req.payload[0]))


@dataclass
class Fabric:
    server: Server
    client: Client
    ctx: zmq.Context[Any]
    endpoint: str
    server_stopped: trio.Event

    def check_alive(self) -> None:
        assert not self.server_stopped.is_set(), "the server task ended"
        assert self.server.stats.bad_frames["internal"] == 0, self.server.stats
        assert self.server.stats.bad_frames["handler"] == 0, self.server.stats
        assert self.client.connected
        assert self.client.stats.sessions == 1, "the good client lost its session"
        assert not self.client.stats.bad_frames, self.client.stats


_inproc_names = itertools.count()


def endpoint_for(transport: str) -> str:
    if transport == "inproc":
        return f"inproc://fuzz-{os.getpid()}-{next(_inproc_names)}"
    return "tcp://127.0.0.1:0"


@asynccontextmanager
async def fabric(transport: str) -> AsyncIterator[Fabric]:
    """A server with Echo and Upload handlers and a connected good client, on a private context."""
    ctx: zmq.Context[Any] = zmq.Context(io_threads=1)
    try:
        # A long heartbeat: a session only ends when the test says so, however slow the machine.
        server = Server(
            CATALOGUE,
            [endpoint_for(transport)],
            name="fuzzed",
            config=ServerConfig(heartbeat=10.0),
            ctx=ctx,
        )
        server.handle(Echo, echo)
        server.handle(Upload, upload)
        stopped = trio.Event()

        async def run_server(*, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await server.run(task_status=task_status)
            finally:
                stopped.set()

        async with trio.open_nursery() as nursery:
            await nursery.start(run_server)
            good = Client(CATALOGUE, server.endpoints[0], name="good", config=ClientConfig(timeout=10.0), ctx=ctx)
            client: Client = await nursery.start(good.run)
            await client.wait_connected()
            yield Fabric(server, client, ctx, server.endpoints[0], stopped)
            nursery.cancel_scope.cancel()
    finally:
        ctx.destroy(linger=0)


async def good_traffic(client: Client, stop: trio.Event) -> int:
    """Requests with checked answers until ``stop``; returns how many round trips were made."""
    n = 0
    while not stop.is_set():
        reply = await client.request(Echo(n=n))
        assert reply.expect(EchoOk).n == n
        reply = await client.request(Upload(), [bytes(n % 97)])
        assert reply.expect(EchoOk).n == n % 97
        n += 1
    return n


async def final_check(fab: Fabric) -> None:
    reply = await fab.client.request(Echo(n=-7))
    assert reply.expect(EchoOk).n == -7
    reply = await fab.client.request(Upload(), [b"z" * 1000])
    assert reply.expect(EchoOk).n == 1000
    fab.check_alive()


class Attacker:
    """A raw DEALER that sends whatever it is given and reads what the server answers."""

    def __init__(self, fab: Fabric) -> None:
        self.sock = Socket.create(fab.ctx, zmq.DEALER, hwm=100_000)
        self.sock.connect(fab.endpoint)

    async def send(self, frames: Sequence[bytes]) -> None:
        await self.sock.send(list(frames))

    async def recv(self) -> Message:
        """The server's next message but heartbeats. Anything a server sends must decode."""
        while True:
            frames = await self.sock.recv()
            msg, _ = CATALOGUE.decode(frames)
            if not isinstance(msg, Heartbeat):
                return msg

    async def hello(self, corr: int) -> None:
        await self.send(Catalogue.encode(Hello(id=corr, name="attacker")))
        with trio.fail_after(5):
            msg = await self.recv()
        assert isinstance(msg, Welcome) and msg.id == corr, msg

    async def replies_until_sentinel(self) -> list[tuple[int, Label]]:
        got: list[tuple[int, Label]] = []
        with trio.fail_after(10):
            while True:
                msg = await self.recv()
                if msg.id == SENTINEL_ID and label_of(msg) in SENTINEL_ANSWERS:
                    return got
                got.append((msg.id, label_of(msg)))

    def close(self) -> None:
        self.sock.close()


# -- a model of the server's answers --------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    id: int
    accept: frozenset[Label]
    later: bool = False
    """Answered from a handler task, so possibly after the answers to later messages."""
    session: int = 0
    """For a request: the session it came in. A session that ends (``bye``, a new ``hello``) while the
    handler runs may take the answer with it, so answers of ended sessions are optional."""


@dataclass
class Model:
    """What the server answers to one peer's messages, and how it counts them (protocol.md §6.2)."""

    session: int = 0  # the current session's number, 0 for none
    sessions: int = 0
    ended: set[int] = field(default_factory=set)
    stats: Counter[str] = field(default_factory=Counter)

    def required(self, e: Expect) -> bool:
        return not (e.later and e.session in self.ended)

    def step(self, frames: Sequence[bytes]) -> Expect | None:
        try:
            msg, _ = CATALOGUE.decode(frames)
        except ProtocolError as e:
            self.stats[e.code.name.lower()] += 1
            return Expect(e.corr, frozenset({e.code})) if e.corr else None
        if isinstance(msg, Hello):
            if not msg.id:
                self.stats["invalid"] += 1
                return None
            if self.session:
                self.ended.add(self.session)
            self.sessions += 1
            self.session = self.sessions
            return Expect(msg.id, frozenset({"welcome"}))
        if not self.session:
            self.stats["unknown_peer"] += 1
            return Expect(msg.id, frozenset({ErrorCode.UNKNOWN_PEER}))  # even with id 0
        if msg.KIND is Kind.REQUEST:  # Echo and Upload, both served
            if not msg.id:
                self.stats["invalid"] += 1
                return None
            return Expect(msg.id, ECHO_REPLIES, later=True, session=self.session)
        if isinstance(msg, Heartbeat):
            return None
        if isinstance(msg, Bye):
            self.ended.add(self.session)
            self.session = 0
            return None
        self.stats["unexpected"] += 1  # a push nobody takes, or a server->client kind
        if msg.KIND in (Kind.PUSH, Kind.CLIENT_PUSH) or not msg.id:
            return None
        return Expect(msg.id, frozenset({ErrorCode.UNEXPECTED}))


def match(expected: list[Expect], got: list[tuple[int, Label]]) -> list[Expect]:
    """Pair every reply with an expectation; returns the expectations left over."""
    left = list(expected)
    for corr, label in got:
        for i, e in enumerate(left):
            if e.id == corr and label in e.accept:
                del left[i]
                break
        else:
            raise AssertionError(f"unexpected reply {label!r} id={corr}; expected {expected}")
    return left


async def attack(fab: Fabric, attacker: Attacker, model: Model, batch: Sequence[Sequence[bytes]]) -> None:
    """Send ``batch`` and the sentinel; check every reply against ``model`` and the good client meanwhile."""
    expected = [e for e in map(model.step, batch) if e is not None]
    end = model.step(sentinel())
    assert end is not None and end.id == SENTINEL_ID and end.accept <= SENTINEL_ANSWERS
    got: list[tuple[int, Label]] = []
    stop = trio.Event()

    async def collect() -> None:
        got.extend(await attacker.replies_until_sentinel())
        # Only answers from handler tasks may still be on their way.
        left = match(expected, got)
        assert all(e.later for e in left), f"no reply for {left}; got {got}"
        with trio.fail_after(5):
            while any(map(model.required, match(expected, got))):
                msg = await attacker.recv()
                got.append((msg.id, label_of(msg)))
        stop.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(good_traffic, fab.client, stop)
        nursery.start_soon(collect)
        for frames in batch:
            await attacker.send(frames)
        await attacker.send(sentinel())
    fab.check_alive()


def assert_counts(server: Server, expected: Counter[str]) -> None:
    counted = Counter(server.stats.bad_frames)
    counted.pop("busy", None)  # depends on timing: an attacker's echoes may outrun their handlers
    assert counted == expected, f"server counted {dict(counted)}, expected {dict(expected)}"


# -- Hypothesis strategies of hostile messages ----------------------------------------------------------

FIELDS = sorted({name for t in CATALOGUE.types.values() for name in t.__struct_fields__} | {"t"})
BOUNDARY_INTS = [0, 1, -1, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]

ints = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from(BOUNDARY_INTS))
leaves = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(),
    st.text(max_size=16),
    st.binary(max_size=16),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    st.builds(msgpack.Timestamp, st.integers(-(2**40), 2**40), st.integers(0, 999_999_999)),
)
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=8), st.integers(-3, 3), st.binary(max_size=3))
values = st.recursive(leaves, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(keys, kids, max_size=4), max_leaves=12)
ids = st.one_of(st.integers(1, 2**63 - 1), st.sampled_from([0, 1, 2, 2**63 - 1]))
dls = st.one_of(st.just(0), st.integers(0, 2**32 - 1))
names = st.text(max_size=24)
small_payload = st.binary(max_size=64)
type_names = st.one_of(st.sampled_from(sorted(CATALOGUE.types)), st.text(max_size=20))


def valid_messages() -> st.SearchStrategy[Message]:
    """Every type of the catalogue with valid field values: requests, pushes and server->client kinds."""
    u16 = st.integers(0, 0xFFFF)
    u32 = st.integers(0, 0xFFFF_FFFF)
    return st.one_of(
        st.builds(Hello, id=ids, dl=dls, name=names, minor=u16, heartbeat_ms=u32, types=st.dictionaries(names, u16, max_size=3)),
        st.builds(
            Welcome,
            id=ids,
            name=names,
            session=st.text(max_size=64),
            heartbeat_ms=st.integers(10, 3_600_000),
            liveness=st.integers(1, 1000),
            max_in_flight=st.integers(1, 65536),
            max_payload=st.integers(0, 2**63 - 1),
        ),
        st.builds(Heartbeat, id=ids),
        st.builds(Bye, id=ids, reason=names),
        st.builds(Error, id=ids, code=u32, reason=names),
        st.builds(Echo, id=ids, dl=dls, n=st.integers(-(2**63), 2**64 - 1), sleep_ms=st.one_of(st.integers(0, 30), u32)),
        st.builds(EchoOk, id=ids, n=ints),
        st.builds(Upload, id=ids, dl=dls),
        st.builds(Note, id=ids, seq=st.integers(-(2**63), 2**63 - 1)),
        st.builds(Tick, id=ids, seq=st.integers(-(2**63), 2**63 - 1)),
    )


@st.composite
def encoded_valid(draw: st.DrawFn) -> list[bytes]:
    msg = draw(valid_messages())
    return Catalogue.encode(msg, [draw(small_payload) for _ in range(msg.PAYLOAD_FRAMES)])


@st.composite
def payloads(draw: st.DrawFn, t: Any) -> list[bytes]:
    """Payload frames for a header of type ``t``: mostly the right count, sometimes too few or too many,
    sometimes empty frames."""
    want = CATALOGUE.types[t].PAYLOAD_FRAMES if isinstance(t, str) and t in CATALOGUE.types else 0
    count = draw(st.one_of(st.just(want), st.integers(0, 3)))
    return [draw(st.one_of(small_payload, st.just(b""))) for _ in range(count)]


@st.composite
def mutated(draw: st.DrawFn) -> list[bytes]:
    """A valid message's header with keys dropped, replaced by junk or added."""
    msg = draw(valid_messages())
    head = msgpack.unpackb(Catalogue.encode(msg, [b""] * msg.PAYLOAD_FRAMES)[0])
    assert isinstance(head, dict)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop", "junk", "add", "nonsense"]))
        key = draw(st.sampled_from(sorted(head, key=repr))) if head else "t"
        if op == "drop":
            head.pop(key, None)
        elif op == "junk":
            head[key] = draw(values)
        elif op == "add":
            head[draw(keys)] = draw(values)
        else:  # a value of the right type but out of range or meaningless
            head[key] = draw(st.one_of(ints, st.text(min_size=200, max_size=5000), type_names))
    return [pack(head), *draw(payloads(msg.wire_name()))]


@st.composite
def envelopes(draw: st.DrawFn) -> list[bytes]:
    """A map with the envelope keys present (valid or wrong) and random fields."""
    head: dict[Any, Any] = {}
    nonsense = {  # the right MessagePack type, a wrong value
        "t": st.one_of(st.text(max_size=300), st.sampled_from(["", "HELLO", "hello ", "test.echo\x00", "test."])),
        "v": st.one_of(st.integers(-1, 300), ints),
        "id": ints,
        "dl": ints,
    }
    for key, good in (("t", type_names), ("v", st.just(1)), ("id", ids), ("dl", dls)):
        how = draw(st.sampled_from(["good", "good", "junk", "nonsense", "absent"]))
        if how == "good":
            head[key] = draw(good)
        elif how == "junk":
            head[key] = draw(values)
        elif how == "nonsense":
            head[key] = draw(nonsense[key])
    head.update(draw(st.dictionaries(st.sampled_from(FIELDS), values, max_size=3)))
    return [pack(head), *draw(payloads(head.get("t")))]


HUGE_LENGTHS = [
    b"\xdd\xff\xff\xff\xff",  # array32 of 4 billion items
    b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
    b"\xdf\xff\xff\xff\xff",  # map32 of 4 billion pairs
    b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
    b"\xc9\xff\xff\xff\xff\x05",  # ext32 of 4 GiB
    b"\xdc\xff\xff",  # array16
    b"\xde\xff\xff",  # map16
]


def with_field(corr: Any, key: str, raw: bytes, t: str = "test.echo") -> bytes:
    """A header map whose last value is the raw MessagePack ``raw`` (which may claim any length)."""
    return b"\x84" + pack("t") + pack(t) + pack("v") + pack(1) + pack("id") + pack(corr) + pack(key) + raw


@st.composite
def huge_lengths(draw: st.DrawFn) -> list[bytes]:
    raw = draw(st.sampled_from(HUGE_LENGTHS)) + draw(st.binary(max_size=32))
    if draw(st.booleans()):
        return [raw]
    return [
        with_field(draw(ids), draw(st.sampled_from(["zz", "n", "name"])), raw, draw(st.sampled_from(sorted(CATALOGUE.types))))
    ]


@st.composite
def deep(draw: st.DrawFn) -> list[bytes]:
    """Deep nesting. Depths stay far from the recursion limit (~1000, minus the stack in use) so that the
    model (called here) and the server (called deeper in a trio task) always agree."""
    depth = draw(st.one_of(st.integers(1, 50), st.integers(3000, 60000)))
    opener = draw(st.sampled_from([b"\x91", b"\x81\xa1k", b"\xdc\x00\x01"]))
    raw = opener * depth + b"\xc0"
    if draw(st.booleans()):
        return [raw]
    return [with_field(draw(ids), "zz", raw, draw(st.sampled_from(sorted(CATALOGUE.types))))]


random_bytes = st.lists(st.binary(max_size=64), min_size=1, max_size=4)
random_msgpack = st.builds(lambda v, extra: [pack(v), *extra], values, st.lists(small_payload, max_size=2))

hostile = st.one_of(random_bytes, random_msgpack, envelopes(), mutated(), encoded_valid(), huge_lengths(), deep())


@st.composite
def attacks(draw: st.DrawFn) -> tuple[str, list[list[bytes]]]:
    transport = draw(st.sampled_from(["tcp", "tcp", "tcp", "inproc"]))
    batch = draw(st.lists(hostile, min_size=1, max_size=20))
    if draw(st.booleans()):  # an attacker with a session
        batch.insert(0, Catalogue.encode(Hello(id=draw(st.integers(1, 2**63 - 1)), name="attacker")))
    return transport, batch


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(attacks())
def test_fuzz_live_server(case: tuple[str, list[list[bytes]]]) -> None:
    """One server, good client and attacker per example (``--hypothesis-show-statistics`` shows what
    the examples covered)."""
    transport, batch = case
    model = Model()
    preview = Model()
    expected = [e for e in map(preview.step, batch) if e is not None]
    assume(all(e.id != SENTINEL_ID for e in expected))
    event(f"transport {transport}")
    for key in preview.stats:
        event(f"counted {key}")
    for e in expected:
        if len(e.accept) == 1:
            event(f"answered {next(iter(e.accept))!s}")

    async def main() -> None:
        with trio.fail_after(30):
            async with fabric(transport) as fab:
                attacker = Attacker(fab)
                try:
                    await attack(fab, attacker, model, batch)
                finally:
                    attacker.close()
                assert_counts(fab.server, model.stats)
                assert fab.server.stats.dropped_sends == 0
                await final_check(fab)

    trio.run(main)


# -- a fixed battery with hand-written expectations -----------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """A message the codec refuses: counted under ``code``, answered with ``code`` only if ``corr``."""

    name: str
    frames: list[bytes]
    code: ErrorCode
    corr: int


@dataclass(frozen=True)
class Valid:
    """A message that decodes. Without a session: UNKNOWN_PEER with its id (0 included). With one:
    ``reply`` (None: nothing) and counted under ``count`` (None: not counted as bad)."""

    name: str
    frames: list[bytes]
    id: int
    reply: Label | None
    count: str | None


def hdr(t: Any = "test.echo", **fields: Any) -> bytes:
    return pack({"t": t, "v": 1, **fields})


BAD: list[Bad] = [
    Bad("random bytes", [b"\xc1\x00\xff"], ErrorCode.MALFORMED, 0),
    Bad("empty frame", [b""], ErrorCode.MALFORMED, 0),
    Bad("empty frames", [b"", b""], ErrorCode.MALFORMED, 0),
    Bad("array header", [pack(["test.echo", 1, 11])], ErrorCode.MALFORMED, 0),
    Bad("int header", [pack(11)], ErrorCode.MALFORMED, 0),
    Bad("nil header", [pack(None)], ErrorCode.MALFORMED, 0),
    Bad("missing t", [pack({"v": 1, "id": 12})], ErrorCode.MALFORMED, 12),
    Bad("t is a map", [pack({"t": {"x": 1}, "id": 13})], ErrorCode.MALFORMED, 13),
    Bad("unknown type", [hdr("no.such", id=14)], ErrorCode.UNKNOWN_TYPE, 14),
    Bad("unknown type without id", [hdr("no.such")], ErrorCode.UNKNOWN_TYPE, 0),
    Bad("n is a string", [hdr(id=15, n="x")], ErrorCode.INVALID, 15),
    Bad("n is a bool", [hdr(id=16, n=False)], ErrorCode.INVALID, 16),
    Bad("id is a bool", [hdr(id=True)], ErrorCode.INVALID, 0),
    Bad("id negative", [hdr(id=-17)], ErrorCode.INVALID, 0),
    Bad("id 2**63", [hdr(id=2**63)], ErrorCode.INVALID, 0),
    Bad("dl 2**32", [hdr(id=18, dl=2**32)], ErrorCode.INVALID, 18),
    Bad("hello name too long", [hdr("hello", id=19, name="n" * 257)], ErrorCode.INVALID, 19),
    Bad("v 2", [hdr(id=20, v=2)], ErrorCode.VERSION, 20),
    Bad("v 0 and junk", [hdr("no.such", id=21, v=0, n=[{}])], ErrorCode.VERSION, 21),
    Bad("upload without its payload frame", [hdr("test.upload", id=22)], ErrorCode.INVALID, 22),
    Bad("echo with a payload frame", [hdr(id=23), b"extra"], ErrorCode.INVALID, 23),
    Bad("echo with an empty payload frame", [hdr(id=24), b""], ErrorCode.INVALID, 24),
    Bad("too many frames", [hdr("test.upload", id=25), b"a", b"b", b""], ErrorCode.TOO_LARGE, 25),
    Bad("header over 64 KiB", [hdr(id=26, pad="p" * MAX_HEADER_BYTES)], ErrorCode.TOO_LARGE, 0),
    Bad("payload over max_payload", [hdr("test.upload", id=27), bytes(MAX_PAYLOAD + 1)], ErrorCode.TOO_LARGE, 27),
    Bad("array32 of 4 billion", [b"\xdd\xff\xff\xff\xff"], ErrorCode.MALFORMED, 0),
    Bad("str32 of 4 GiB", [b"\xdb\xff\xff\xff\xff"], ErrorCode.MALFORMED, 0),
    Bad("huge length in a field", [with_field(28, "zz", b"\xdf\xff\xff\xff\xff")], ErrorCode.MALFORMED, 0),
    Bad("deep nesting", [b"\x91" * 30000 + b"\xc0"], ErrorCode.MALFORMED, 0),
    Bad("deep nesting in a field", [with_field(29, "zz", b"\x91" * 60000 + b"\xc0")], ErrorCode.MALFORMED, 0),
]

VALID: list[Valid] = [
    Valid("echo with unknown extra fields", [hdr(id=40, n=5, future={"a": [1, b"x"]})], 40, "test.echo_ok", None),
    Valid(
        "welcome from a client",
        Catalogue.encode(Welcome(id=41, name="x", session="s", heartbeat_ms=10, liveness=1, max_in_flight=1, max_payload=1)),
        41,
        ErrorCode.UNEXPECTED,
        "unexpected",
    ),
    Valid("error from a client", Catalogue.encode(Error(id=42, code=400)), 42, ErrorCode.UNEXPECTED, "unexpected"),
    Valid("reply from a client", Catalogue.encode(EchoOk(id=43)), 43, ErrorCode.UNEXPECTED, "unexpected"),
    Valid("server push from a client", Catalogue.encode(Note(id=44)), 44, ErrorCode.UNEXPECTED, "unexpected"),
    Valid("server push from a client, id 0", Catalogue.encode(Note()), 0, None, "unexpected"),
    Valid("client push nobody takes", Catalogue.encode(Tick(seq=1)), 0, None, "unexpected"),
    Valid("request without id", Catalogue.encode(Echo(n=1)), 0, None, "invalid"),
    Valid("heartbeat", Catalogue.encode(Heartbeat()), 0, None, None),
    Valid("upload", Catalogue.encode(Upload(id=45), [b"12345"]), 45, "test.echo_ok", None),
]


@pytest.mark.parametrize("transport", ["tcp", "inproc"])
async def test_battery_with_and_without_session(transport: str) -> None:
    with trio.fail_after(30):
        async with fabric(transport) as fab:
            stranger, member = Attacker(fab), Attacker(fab)
            await member.hello(corr=99)
            counts: Counter[str] = Counter()
            for attacker, has_session in ((stranger, False), (member, True)):
                batch: list[list[bytes]] = []
                want: list[tuple[int, Label]] = []
                for bad in BAD:
                    batch.append(bad.frames)
                    counts[bad.code.name.lower()] += 1
                    if bad.corr:
                        want.append((bad.corr, bad.code))
                for valid in VALID:
                    batch.append(valid.frames)
                    if not has_session:
                        want.append((valid.id, ErrorCode.UNKNOWN_PEER))
                        counts["unknown_peer"] += 1
                        continue
                    if valid.reply is not None:
                        want.append((valid.id, valid.reply))
                    if valid.count is not None:
                        counts[valid.count] += 1
                # a hello without id is refused and does not end the session
                batch.append(Catalogue.encode(Hello(name="no-id")))
                counts["invalid"] += 1
                batch.append(sentinel())
                counts["unexpected" if has_session else "unknown_peer"] += 1
                stop = trio.Event()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(good_traffic, fab.client, stop)
                    for frames in batch:
                        await attacker.send(frames)
                    got = await attacker.replies_until_sentinel()
                    # echo and upload answer from handler tasks, maybe after the sentinel
                    with trio.fail_after(5):
                        while sum(label == "test.echo_ok" for _, label in got) < sum(
                            label == "test.echo_ok" for _, label in want
                        ):
                            msg = await attacker.recv()
                            got.append((msg.id, label_of(msg)))
                    stop.set()
                assert sorted(got, key=repr) == sorted(want, key=repr)
                fab.check_alive()
            assert_counts(fab.server, counts)
            counted = fab.server.stats.bad_frames
            assert counted["unknown_type"] == 4 and counted["malformed"] > 0 and counted["too_large"] > 0
            # the member still has its session: a plain request is served
            await member.send(Catalogue.encode(Echo(id=7, n=7)))
            with trio.fail_after(5):
                reply = await member.recv()
            assert (reply.id, label_of(reply)) == (7, "test.echo_ok")
            stranger.close()
            member.close()
            await final_check(fab)


async def test_oversized_frames_drop_the_connection_not_the_server() -> None:
    """A frame over ZMQ_MAXMSGSIZE never reaches the server: libzmq closes that connection, the DEALER
    reconnects by itself under a new routing id (so it has no session any more), the server serves on."""
    with trio.fail_after(30):
        async with fabric("tcp") as fab:
            for oversized in (
                [bytes(MAX_MSG_SIZE + 1)],  # as the header
                [hdr("test.upload", id=60), bytes(MAX_MSG_SIZE + 1)],  # as the payload
            ):
                attacker = Attacker(fab)
                await attacker.hello(corr=61)
                stop = trio.Event()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(good_traffic, fab.client, stop)
                    await attacker.send(oversized)
                    # Once reconnected the same socket works again, without a session. A message queued
                    # right behind the oversized one may be lost with the old connection: retry.
                    reply = None
                    with trio.fail_after(5):
                        for corr in itertools.count(62_000):
                            await attacker.send(Catalogue.encode(Echo(id=corr)))
                            with trio.move_on_after(0.5):
                                reply = await attacker.recv()
                                break
                    assert reply is not None and label_of(reply) == ErrorCode.UNKNOWN_PEER, reply
                    assert reply.id >= 62_000
                    # A fresh socket gets a session and is served.
                    fresh = Attacker(fab)
                    await fresh.hello(corr=63)
                    await fresh.send(Catalogue.encode(Upload(id=64), [bytes(MAX_PAYLOAD)]))  # at the limit: fine
                    with trio.fail_after(5):
                        reply = await fresh.recv()
                    assert isinstance(reply, EchoOk) and (reply.id, reply.n) == (64, MAX_PAYLOAD)
                    stop.set()
                attacker.close()
                fresh.close()
                fab.check_alive()
            assert fab.server.stats.bad_frames["unknown_peer"] >= 2
            await final_check(fab)


async def test_many_attackers_at_once() -> None:
    """Several hostile peers, some with sessions, interleave garbage while the good client works."""
    with trio.fail_after(30):
        async with fabric("tcp") as fab:
            stop = trio.Event()

            async def one(k: int) -> None:
                attacker = Attacker(fab)
                got: list[tuple[int, Label]] = []

                async def collect() -> None:
                    got.extend(await attacker.replies_until_sentinel())
                    with trio.fail_after(5):
                        while sum(1 for corr, _ in got if 10_000 <= corr < 10_050) < 50:
                            msg = await attacker.recv()
                            got.append((msg.id, label_of(msg)))

                try:
                    if k % 2:
                        await attacker.hello(corr=1000 + k)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(collect)
                        for i in range(50):
                            bad = BAD[(i + k) % len(BAD)]
                            if all(len(f) <= MAX_HEADER_BYTES for f in bad.frames):  # keep this test light
                                await attacker.send(bad.frames)
                            await attacker.send(Catalogue.encode(Echo(id=10_000 + i, n=i)))
                        await attacker.send(sentinel())
                    replies = {corr: label for corr, label in got if 10_000 <= corr < 10_050}
                    assert len(replies) == 50
                    if k % 2:
                        assert set(replies.values()) <= ECHO_REPLIES
                    else:
                        assert set(replies.values()) == {ErrorCode.UNKNOWN_PEER}
                finally:
                    attacker.close()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(good_traffic, fab.client, stop)
                async with trio.open_nursery() as attackers:
                    for k in range(6):
                        attackers.start_soon(one, k)
                stop.set()
            assert sum(fab.server.stats.bad_frames.values()) > 0
            await final_check(fab)


async def test_client_survives_a_hostile_server() -> None:
    """The other way round: a raw ROUTER plays the server, welcomes a real Client, then sends it garbage.
    The client drops and counts every bad message, keeps its session and still gets its replies."""
    ctx: zmq.Context[Any] = zmq.Context(io_threads=1)
    try:
        with trio.fail_after(30):
            router = Socket.create(ctx, zmq.ROUTER, hwm=1000)
            endpoint = router.bind("tcp://127.0.0.1:0")
            client = Client(CATALOGUE, endpoint, name="victim", ctx=ctx)
            async with trio.open_nursery() as nursery:
                await nursery.start(client.run)
                rid, head = await router.recv()
                hello, _ = CATALOGUE.decode([head])
                assert isinstance(hello, Hello)
                welcome = Welcome(
                    id=hello.id,
                    name="evil",
                    session="s",
                    heartbeat_ms=10_000,
                    liveness=3,
                    max_in_flight=4,
                    max_payload=MAX_PAYLOAD,
                )
                await router.send([rid, *Catalogue.encode(welcome)])
                await client.wait_connected()

                expected: Counter[str] = Counter(bad.code.name.lower() for bad in BAD)
                garbage = [bad.frames for bad in BAD] + [
                    Catalogue.encode(EchoOk(id=123_456)),  # a reply nobody waits for: late
                    Catalogue.encode(Error(id=123_457, code=int(ErrorCode.INTERNAL))),  # idem
                    Catalogue.encode(Note(seq=1)),  # a push without a handler
                    Catalogue.encode(Error(code=int(ErrorCode.MALFORMED))),  # an error about nothing in particular
                    Catalogue.encode(Echo(id=5)),  # a request sent to a client
                    Catalogue.encode(Tick(seq=2)),  # a client push sent to a client
                    Catalogue.encode(
                        Welcome(
                            id=hello.id, name="again", session="t", heartbeat_ms=10, liveness=1, max_in_flight=1, max_payload=1
                        )
                    ),
                ]
                expected.update({"unhandled_push": 1, "server_error_400": 1, "unexpected": 2})
                for frames in garbage:
                    await router.send([rid, *frames])

                async def serve_one() -> None:
                    while True:
                        rid2, *frames = await router.recv()
                        msg, _ = CATALOGUE.decode(frames)
                        if isinstance(msg, Echo):
                            await router.send([rid2, *Catalogue.encode(EchoOk(id=msg.id, n=msg.n))])
                            return

                nursery.start_soon(serve_one)
                # The request goes out after the garbage was queued, so its reply comes after it all.
                reply = await client.request(Echo(n=77))
                assert reply.expect(EchoOk).n == 77
                assert client.connected and client.stats.sessions == 1
                assert client.stats.bad_frames == expected, client.stats.bad_frames
                assert client.stats.late_replies == 3  # the two stray replies and the second welcome
                nursery.cancel_scope.cancel()
            router.close()
    finally:
        ctx.destroy(linger=0)
