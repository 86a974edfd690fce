"""Unit tests of the envelope codec (dfz.broker.messages), sans I/O: no sockets, no trio.

Every way a header or a multipart message can be wrong maps to one ErrorCode, and the correlation id is
kept whenever a positive integer ``id`` can be read (protocol.md §6.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import msgpack  # type: ignore[import-untyped]
import msgspec
import pytest
import zmq
from conftest import CATALOGUE, Echo, EchoOk, Note, Tick, Upload
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dfz.broker import (
    PROTOCOL_VERSION,
    Bye,
    Catalogue,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    Kind,
    Message,
    ProtocolError,
    Welcome,
)
from dfz.broker.messages import FABRIC_TYPES, MAX_HEADER_BYTES

MiB = 1024 * 1024


def pack(obj: Any) -> bytes:
    out = msgpack.packb(obj)
    assert isinstance(out, bytes)
    return out


def header(t: Any = "test.echo", **fields: Any) -> bytes:
    """A header map with the envelope keys (``v`` 1 unless given) and ``fields``; ``None`` drops a key."""
    h: dict[str, Any] = {"t": t, "v": PROTOCOL_VERSION, **fields}
    return pack({k: v for k, v in h.items() if v is not None})


def fails(frames: Sequence[Any], catalogue: Catalogue = CATALOGUE) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        catalogue.decode(frames)
    return info.value


def error_reply_round_trips(err: ProtocolError) -> None:
    """What a server answers with for ``err`` must itself be a valid message on the other side."""
    reply = Error(id=err.corr, code=err.code, reason=err.reason)
    msg, _ = CATALOGUE.decode(Catalogue.encode(reply))
    assert msg == reply


# -- round trips ----------------------------------------------------------------------------------------

SAMPLES: list[tuple[Message, list[bytes]]] = [
    (Hello(id=1, dl=2500, name="peer-1", minor=3, heartbeat_ms=250, types={"hello": 1, "test.echo": 2}), []),
    (
        Welcome(
            id=2,
            name="sched",
            session="abcd-1",
            heartbeat_ms=1000,
            liveness=3,
            max_in_flight=16,
            max_payload=8 * MiB,
            minor=1,
            types={"welcome": 1},
        ),
        [],
    ),
    (Heartbeat(), []),
    (Bye(reason="shutting down"), []),
    (Error(id=9, code=int(ErrorCode.BUSY), reason="too many"), []),
    (Echo(id=2**63 - 1, dl=0xFFFF_FFFF, n=-(2**63), sleep_ms=7), []),
    (EchoOk(id=5, n=2**64 - 1), []),
    (Upload(id=6), [b"\x00payload\xff" * 100]),
    (Note(seq=42), []),
    (Tick(seq=-1), []),
]


def test_samples_cover_every_type() -> None:
    assert {type(m) for m, _ in SAMPLES} == set(CATALOGUE.types.values())
    assert set(FABRIC_TYPES) <= set(CATALOGUE.types.values())


@pytest.mark.parametrize(("msg", "payload"), SAMPLES, ids=lambda x: x.wire_name() if isinstance(x, Message) else "")
def test_round_trip(msg: Message, payload: list[bytes]) -> None:
    frames = Catalogue.encode(msg, payload)
    assert len(frames) == 1 + msg.PAYLOAD_FRAMES
    decoded, got = CATALOGUE.decode(frames)
    assert decoded == msg
    assert type(decoded) is type(msg)
    assert got == payload
    # The header is a map holding the envelope keys and the type's tag.
    head = msgpack.unpackb(frames[0])
    assert isinstance(head, dict)
    assert {"t", "v", "id", "dl"} <= head.keys()
    assert head["t"] == msg.wire_name() == type(msg).wire_name()
    assert head["v"] == PROTOCOL_VERSION


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview, zmq.Frame], ids=lambda w: w.__name__)
def test_decode_accepts_every_buffer_kind_and_keeps_payload_untouched(wrap: Any) -> None:
    head, body = Catalogue.encode(Upload(id=3), [b"x" * 1000])
    frames = [wrap(head), wrap(body)]
    msg, payload = CATALOGUE.decode(frames)
    assert msg == Upload(id=3)
    assert payload[0] is frames[1]  # never copied nor re-encoded


def test_kinds_and_payload_counts() -> None:
    assert Hello.KIND is Kind.REQUEST and Welcome.KIND is Kind.REPLY and Error.KIND is Kind.REPLY
    assert Heartbeat.KIND is Kind.PUSH and Bye.KIND is Kind.CLIENT_PUSH
    assert Upload.PAYLOAD_FRAMES == 1 and Echo.PAYLOAD_FRAMES == 0
    assert CATALOGUE.max_frames == 2
    assert CATALOGUE.versions()["hello"] == Hello.VERSION


ids_ = st.integers(0, 2**63 - 1)
dls = st.integers(0, 2**32 - 1)
texts = st.text(max_size=40)


@given(
    msg=st.one_of(
        st.builds(Echo, id=ids_, dl=dls, n=st.integers(-(2**63), 2**64 - 1), sleep_ms=dls),
        st.builds(EchoOk, id=ids_, n=st.integers(-(2**63), 2**64 - 1)),
        st.builds(
            Hello,
            id=ids_,
            dl=dls,
            name=texts,
            minor=st.integers(0, 0xFFFF),
            heartbeat_ms=dls,
            types=st.dictionaries(texts, st.integers(0, 0xFFFF), max_size=5),
        ),
        st.builds(Error, id=ids_, code=dls, reason=st.text(max_size=4096)),
        st.builds(Bye, reason=texts),
        st.builds(Note, seq=st.integers(-(2**63), 2**63 - 1)),
    )
)
def test_round_trip_property(msg: Message) -> None:
    decoded, payload = CATALOGUE.decode(Catalogue.encode(msg))
    assert decoded == msg and payload == []


# -- failures and their codes ---------------------------------------------------------------------------

Case = tuple[str, list[bytes], ErrorCode, int]


def _with_field(id_: int, key: str, raw_value: bytes) -> bytes:
    """A test.echo header whose last field ``key`` holds ``raw_value`` (raw MessagePack bytes)."""
    return b"\x84" + pack("t") + pack("test.echo") + pack("v") + pack(1) + pack("id") + pack(id_) + pack(key) + raw_value


FAILURES: list[Case] = [
    # not MessagePack at all
    ("invalid opcode", [b"\xc1"], ErrorCode.MALFORMED, 0),
    ("empty header frame", [b""], ErrorCode.MALFORMED, 0),
    ("truncated map", [header(id=5)[:-1]], ErrorCode.MALFORMED, 0),
    ("trailing bytes", [header(id=5) + b"\x00"], ErrorCode.MALFORMED, 0),
    ("array32 of 4 billion", [b"\xdd\xff\xff\xff\xff"], ErrorCode.MALFORMED, 0),
    ("str32 of 4 GiB", [b"\xdb\xff\xff\xff\xff"], ErrorCode.MALFORMED, 0),
    ("map32 of 4 billion", [b"\xdf\xff\xff\xff\xff"], ErrorCode.MALFORMED, 0),
    ("bin32 of 4 GiB", [b"\xc6\xff\xff\xff\xff"], ErrorCode.MALFORMED, 0),
    # MessagePack, but not a map
    ("array header", [pack(["test.echo", 1, 5, 0])], ErrorCode.MALFORMED, 0),
    ("int header", [pack(5)], ErrorCode.MALFORMED, 0),
    ("nil header", [pack(None)], ErrorCode.MALFORMED, 0),
    ("string header", [pack("test.echo")], ErrorCode.MALFORMED, 0),
    ("non-string key", [b"\x83\x01\x02" + pack("t") + pack("test.echo") + pack("id") + pack(5)], ErrorCode.MALFORMED, 0),
    # no usable type
    ("missing t", [header(t=None, id=5)], ErrorCode.MALFORMED, 5),
    ("missing t, no id", [header(t=None)], ErrorCode.MALFORMED, 0),
    ("t is an int", [header(t=7, id=5)], ErrorCode.MALFORMED, 5),
    ("t is nil", [pack({"t": None, "v": 1, "id": 5})], ErrorCode.MALFORMED, 5),
    ("t is bytes", [header(t=b"test.echo", id=5)], ErrorCode.MALFORMED, 5),
    ("unknown type", [header(t="no.such.type", id=5)], ErrorCode.UNKNOWN_TYPE, 5),
    ("unknown type, no id", [header(t="no.such.type")], ErrorCode.UNKNOWN_TYPE, 0),
    ("unknown type with junk fields", [header(t="x", id=5, dl="x", zz=[1, {}])], ErrorCode.UNKNOWN_TYPE, 5),
    # wrong field types and ranges
    ("n is a string", [header(id=5, n="1")], ErrorCode.INVALID, 5),
    ("n is a float", [header(id=5, n=1.0)], ErrorCode.INVALID, 5),
    ("n is a bool", [header(id=5, n=True)], ErrorCode.INVALID, 5),
    ("id is a bool", [header(id=True)], ErrorCode.INVALID, 0),
    ("id is a string", [header(id="5")], ErrorCode.INVALID, 0),
    ("id is a float", [header(id=5.0)], ErrorCode.INVALID, 0),
    ("id negative", [header(id=-1)], ErrorCode.INVALID, 0),
    ("id 2**63", [header(id=2**63)], ErrorCode.INVALID, 0),
    ("id 2**64-1", [header(id=2**64 - 1)], ErrorCode.INVALID, 0),
    ("dl 2**32", [header(id=5, dl=2**32)], ErrorCode.INVALID, 5),
    ("dl negative", [header(id=5, dl=-1)], ErrorCode.INVALID, 5),
    ("dl is a bool", [header(id=5, dl=False)], ErrorCode.INVALID, 5),
    ("sleep_ms 2**32", [header(id=5, sleep_ms=2**32)], ErrorCode.INVALID, 5),
    ("v is a string", [header(id=5, v="1")], ErrorCode.INVALID, 5),
    ("hello without name", [header(t="hello", id=5)], ErrorCode.INVALID, 5),
    ("hello name too long", [header(t="hello", id=5, name="x" * 257)], ErrorCode.INVALID, 5),
    ("hello minor over u16", [header(t="hello", id=5, name="a", minor=65536)], ErrorCode.INVALID, 5),
    ("hello types not a map", [header(t="hello", id=5, name="a", types=[1])], ErrorCode.INVALID, 5),
    ("hello types key too long", [header(t="hello", id=5, name="a", types={"k" * 257: 1})], ErrorCode.INVALID, 5),
    ("hello too many types", [header(t="hello", id=5, name="a", types={str(i): 1 for i in range(1025)})], ErrorCode.INVALID, 5),
    ("bye reason too long", [header(t="bye", id=5, reason="r" * 4097)], ErrorCode.INVALID, 5),
    ("error code negative", [header(t="error", id=5, code=-1)], ErrorCode.INVALID, 5),
    ("welcome session too long", [header(t="welcome", id=5, name="s", session="s" * 65)], ErrorCode.INVALID, 5),
    ("welcome heartbeat 0", [header(t="welcome", id=5, name="s", session="s", heartbeat_ms=0)], ErrorCode.INVALID, 5),
    # protocol version
    ("v 2", [header(id=5, v=2)], ErrorCode.VERSION, 5),
    ("v 0", [header(id=5, v=0)], ErrorCode.VERSION, 5),
    ("v 2 of unknown type", [header(t="future.type", id=5, v=2)], ErrorCode.VERSION, 5),
    ("v 2 with invalid fields", [header(id=5, v=2, n="x")], ErrorCode.VERSION, 5),
    ("v 2**40", [header(id=5, v=2**40)], ErrorCode.VERSION, 5),
    ("v negative", [header(id=5, v=-1)], ErrorCode.VERSION, 5),
    # payload frame counts
    ("upload without payload", [header(t="test.upload", id=5)], ErrorCode.INVALID, 5),
    ("echo with a payload", [header(id=5), b"x"], ErrorCode.INVALID, 5),
    ("echo with an empty payload frame", [header(id=5), b""], ErrorCode.INVALID, 5),
    ("too many frames", [header(t="test.upload", id=5), b"x", b"y"], ErrorCode.TOO_LARGE, 5),
    ("too many frames, bad header", [b"\xc1", b"x", b"y"], ErrorCode.TOO_LARGE, 0),
    # sizes
    ("header over 64 KiB", [header(id=5, pad="p" * MAX_HEADER_BYTES)], ErrorCode.TOO_LARGE, 0),
    # deep nesting: bounded by the recursion limit, never a crash
    ("deeply nested header", [b"\x91" * 60000 + b"\xc0"], ErrorCode.MALFORMED, 0),
    ("huge length inside a field", [_with_field(5, "zz", b"\xdd\xff\xff\xff\xff")], ErrorCode.MALFORMED, 0),
    ("huge str length inside a field", [_with_field(5, "zz", b"\xdb\xff\xff\xff\xff")], ErrorCode.MALFORMED, 0),
    ("n is an ext", [_with_field(5, "n", b"\xd4\x01\x00")], ErrorCode.INVALID, 5),
    ("deeply nested field", [_with_field(5, "zz", b"\x91" * 60000 + b"\xc0")], ErrorCode.MALFORMED, 0),
    ("deeply nested map field", [_with_field(5, "zz", b"\x81\xa1k" * 20000 + b"\xc0")], ErrorCode.MALFORMED, 0),
]


@pytest.mark.parametrize(("name", "frames", "code", "corr"), FAILURES, ids=[c[0] for c in FAILURES])
def test_failure_codes(name: str, frames: list[bytes], code: ErrorCode, corr: int) -> None:
    err = fails(frames)
    assert (err.code, err.corr) == (code, corr), err
    assert str(int(code)) in str(err)
    error_reply_round_trips(err)


def test_empty_message() -> None:
    assert fails([]).code is ErrorCode.MALFORMED


def test_bool_is_not_an_int() -> None:
    """msgspec refuses a bool where an int is expected (Python's bool is an int subclass)."""
    assert fails([header(id=5, n=True)]).code is ErrorCode.INVALID
    assert fails([header(id=True)]).corr == 0  # a bool id is not a readable id
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(pack({"t": "test.echo", "n": False}), type=Echo)


def test_header_at_the_size_limit() -> None:
    base = len(header(id=5, pad=""))
    # A str of n >= 65536 bytes takes a 5-byte prefix; at the limit the pad needs a str16 (3 bytes).
    pad = MAX_HEADER_BYTES - base - 2
    exact = header(id=5, pad="p" * pad)
    assert len(exact) == MAX_HEADER_BYTES
    msg, _ = CATALOGUE.decode([exact])
    assert msg == Echo(id=5)
    over = header(id=5, pad="p" * (pad + 1))
    assert len(over) == MAX_HEADER_BYTES + 1
    err = fails([over])
    assert (err.code, err.corr) == (ErrorCode.TOO_LARGE, 0)


def test_payload_size_limit() -> None:
    small = Catalogue([Upload], max_payload=16)
    head = header(t="test.upload", id=5)
    msg, payload = small.decode([head, b"x" * 16])
    assert msg == Upload(id=5) and payload == [b"x" * 16]
    err = fails([head, b"x" * 17], small)
    assert (err.code, err.corr) == (ErrorCode.TOO_LARGE, 5)
    # the test catalogue's own limit (8 MiB), with a zmq.Frame as on the wire
    assert CATALOGUE.decode([head, zmq.Frame(b"\0" * (8 * MiB))])[0] == Upload(id=5)
    err = fails([head, zmq.Frame(b"\0" * (8 * MiB + 1))])
    assert (err.code, err.corr) == (ErrorCode.TOO_LARGE, 5)


def test_unknown_fields_are_ignored() -> None:
    """Forward compatibility: a newer minor version adds optional fields; older receivers skip them."""
    extra: dict[str, Any] = {
        "future": {"nested": [1, 2.5, None, b"\x00", {"k": ["deep"]}]},
        "flag": True,
        "big": 2**64 - 1,
        "neg": -(2**63),
    }
    msg, _ = CATALOGUE.decode([header(id=5, n=3, **extra)])
    assert msg == Echo(id=5, n=3)
    # also a timestamp (ext -1) and an application ext type nobody here knows
    msg, _ = CATALOGUE.decode([_with_field(5, "ts", b"\xd6\xff\x00\x00\x00\x01")])
    assert msg == Echo(id=5)
    msg, _ = CATALOGUE.decode([_with_field(5, "ext", b"\xd4\x05\x00")])
    assert msg == Echo(id=5)
    # a hello from a newer client with fields this side does not know yet
    msg, _ = CATALOGUE.decode([header(t="hello", id=1, name="n", features=["x"], minor=9)])
    assert msg == Hello(id=1, name="n", minor=9)


def test_defaults_fill_missing_optional_fields() -> None:
    msg, _ = CATALOGUE.decode([pack({"t": "test.echo"})])
    assert msg == Echo()
    assert (msg.v, msg.id, msg.dl) == (PROTOCOL_VERSION, 0, 0)
    msg, _ = CATALOGUE.decode([pack({"t": "hb"})])
    assert isinstance(msg, Heartbeat)


def test_duplicate_wire_name_is_refused() -> None:
    class Other(Message, tag="test.echo"):
        KIND: ClassVar[Kind] = Kind.REQUEST

    class FakeHello(Message, tag="hello"):
        KIND: ClassVar[Kind] = Kind.REQUEST

    with pytest.raises(ValueError, match=r"test\.echo"):
        Catalogue([Echo, Other])
    with pytest.raises(ValueError, match="hello"):
        Catalogue([FakeHello])
    # the same class twice is one type, not a conflict
    assert Catalogue([Echo, Echo]).types["test.echo"] is Echo


def test_encode_refuses_a_wrong_payload_count() -> None:
    with pytest.raises(ValueError, match="payload"):
        Catalogue.encode(Upload(id=1))
    with pytest.raises(ValueError, match="payload"):
        Catalogue.encode(Upload(id=1), [b"a", b"b"])
    with pytest.raises(ValueError, match="payload"):
        Catalogue.encode(Echo(id=1), [b"a"])


def test_another_catalogue_does_not_know_the_test_types() -> None:
    fabric_only = Catalogue([])
    err = fails([Catalogue.encode(Echo(id=77))[0]], fabric_only)
    assert (err.code, err.corr) == (ErrorCode.UNKNOWN_TYPE, 77)
    assert fabric_only.decode(Catalogue.encode(Hello(id=1, name="x")))[0] == Hello(id=1, name="x")


def test_reason_of_an_invalid_value_is_bounded() -> None:
    """msgspec quotes a bad enum/literal value whole; the error a server sends must still be a valid Error."""

    class Mode(Message, tag="test.mode"):
        KIND: ClassVar[Kind] = Kind.REQUEST
        mode: Literal["fast", "slow"] = "fast"

    cat = Catalogue([Mode])
    err = fails([header(t="test.mode", id=5, mode="m" * 60000)], cat)
    assert (err.code, err.corr) == (ErrorCode.INVALID, 5)
    error_reply_round_trips(err)


# -- property: decode never raises anything but ProtocolError -------------------------------------------

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    st.builds(msgpack.Timestamp, st.integers(-(2**40), 2**40), st.integers(0, 999_999_999)),
)
keys = st.one_of(
    st.sampled_from(["t", "v", "id", "dl", "n", "name", "types", "code", "reason"]), st.text(max_size=6), st.integers(-3, 3)
)
values = st.recursive(leaves, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(keys, kids, max_size=4), max_leaves=16)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "t": st.one_of(st.sampled_from(sorted(CATALOGUE.types)), values),
        "v": st.one_of(st.just(1), values),
        "id": st.one_of(st.integers(0, 2**63 - 1), values),
        "dl": st.one_of(st.integers(0, 2**32 - 1), values),
        "n": values,
        "name": values,
        "reason": values,
        "code": values,
        "types": values,
    },
)


def _check_any(frames: list[bytes]) -> None:
    try:
        msg, payload = CATALOGUE.decode(frames)
    except ProtocolError as err:
        assert isinstance(err.code, ErrorCode)
        assert 0 <= err.corr < 2**63
        error_reply_round_trips(err)
    else:
        assert isinstance(msg, Message)
        assert len(payload) == msg.PAYLOAD_FRAMES == len(frames) - 1
        # whatever was accepted encodes back to an equal message
        assert CATALOGUE.decode(Catalogue.encode(msg, payload))[0] == msg


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=3))
def test_random_bytes_only_raise_protocol_error(frames: list[bytes]) -> None:
    _check_any(frames)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(values, envelopes), st.lists(st.binary(max_size=8), max_size=2))
def test_random_msgpack_only_raises_protocol_error(head: Any, payload: list[bytes]) -> None:
    _check_any([pack(head), *payload])


@given(st.binary(min_size=1, max_size=64), st.integers(0, 200))
def test_truncated_and_prefixed_headers(suffix: bytes, cut: int) -> None:
    good = header(t="hello", id=9, name="x", types={"a": 1})
    _check_any([good[:cut]])
    _check_any([good + suffix])
    _check_any([b"\xdd\xff\xff\xff\xff" + suffix])
