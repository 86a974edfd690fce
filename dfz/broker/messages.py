"""Typed, versioned messages and the sans-I/O codec of the envelope.

Rules of this file:

* A message on the wire is one ZeroMQ multipart message: a **header frame** (a MessagePack map) followed by
  zero or more **payload frames** of raw bytes that are never re-encoded (piece data travels this way).
  On a ROUTER the routing-id frame comes first; it is not part of the message.
* The header map always holds the envelope keys ``t`` (message type), ``v`` (protocol major version),
  ``id`` (correlation id: non-zero on a request and on its reply, zero on a push) and ``dl`` (a request's
  remaining time budget in milliseconds, 0 for none), then the fields of the type.
* Each message type is a class below (or in a subsystem) deriving from :class:`Message`, with its wire name
  as the msgspec tag, a :class:`Kind`, a schema ``VERSION`` and the number of payload frames it carries.
  Within one protocol major version a type only gains optional fields; receivers ignore unknown keys.
* Decoding validates everything (types, ranges, lengths, frame sizes and counts) and turns anything
  malformed into :class:`ProtocolError` with the code a server answers with. This file does no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import Enum
from typing import Annotated, Any, ClassVar, TypeVar, Union

import msgspec
from msgspec import Meta

from .errors import ErrorCode, ProtocolError

PROTOCOL_VERSION = 1
"""The protocol major version this implementation speaks (the ``v`` key of every header)."""

MAX_HEADER_BYTES = 64 * 1024
"""Largest header frame accepted: every header is a few hundred bytes; more is an attack or a bug."""

# Reusable field types. Every string and container on the wire has a bound.
U8 = Annotated[int, Meta(ge=0, le=0xFF)]
U16 = Annotated[int, Meta(ge=0, le=0xFFFF)]
U32 = Annotated[int, Meta(ge=0, le=0xFFFF_FFFF)]
U63 = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Name = Annotated[str, Meta(max_length=256)]
Text = Annotated[str, Meta(max_length=4096)]


class Kind(Enum):
    REQUEST = "request"  # client -> server, expects exactly one reply (or error) with the same id
    REPLY = "reply"  # server -> client, answers the request with the same id
    PUSH = "push"  # either direction, id 0, no answer
    SERVER_PUSH = "server_push"  # server -> client only, id 0
    CLIENT_PUSH = "client_push"  # client -> server only, id 0


class Message(msgspec.Struct, tag_field="t", kw_only=True):
    """Base of every message type. Subclass with ``tag="wire-name"`` and set the class variables."""

    v: U8 = PROTOCOL_VERSION
    id: U63 = 0
    dl: U32 = 0

    KIND: ClassVar[Kind]
    VERSION: ClassVar[int] = 1
    PAYLOAD_FRAMES: ClassVar[int] = 0
    """Exact number of raw payload frames that follow the header."""

    @classmethod
    def wire_name(cls) -> str:
        tag = cls.__struct_config__.tag
        assert isinstance(tag, str), f"{cls.__name__} has no wire tag"
        return tag


M = TypeVar("M", bound=Message)

# --- the fabric's own messages -------------------------------------------------------------------------


class Hello(Message, tag="hello"):
    """First request of a client session. Answered by :class:`Welcome`."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    name: Name
    minor: U16 = 0
    heartbeat_ms: U32 = 1000
    types: Annotated[dict[Name, U16], Meta(max_length=1024)] = {}


class Welcome(Message, tag="welcome"):
    """Reply to :class:`Hello`: the server's parameters, which the client adopts."""

    KIND: ClassVar[Kind] = Kind.REPLY
    name: Name
    session: Annotated[str, Meta(max_length=64)]
    heartbeat_ms: Annotated[int, Meta(ge=10, le=3_600_000)]
    liveness: Annotated[int, Meta(ge=1, le=1000)]
    max_in_flight: Annotated[int, Meta(ge=1, le=65536)]
    max_payload: U63
    minor: U16 = 0
    types: Annotated[dict[Name, U16], Meta(max_length=1024)] = {}


class Heartbeat(Message, tag="hb"):
    """Sent by either side after a heartbeat interval without any other traffic to the other side."""

    KIND: ClassVar[Kind] = Kind.PUSH


class Bye(Message, tag="bye"):
    """A client leaves on purpose; the server ends its session at once."""

    KIND: ClassVar[Kind] = Kind.CLIENT_PUSH
    reason: Text = ""


class Error(Message, tag="error"):
    """Answer to a request that failed (``id`` of the request), or a push about a bad message (id 0)."""

    KIND: ClassVar[Kind] = Kind.REPLY
    code: U32
    reason: Text = ""


FABRIC_TYPES: tuple[type[Message], ...] = (Hello, Welcome, Heartbeat, Bye, Error)


class _Probe(msgspec.Struct):
    """Lenient view of a header that failed validation, to find what to answer."""

    t: Any = None
    v: Any = None
    id: Any = 0


_probe_decoder = msgspec.msgpack.Decoder(_Probe)
_encoder = msgspec.msgpack.Encoder()


class Catalogue:
    """The set of message types one endpoint speaks, with the codec for them.

    ``decode`` is the only way bytes from the wire become messages.
    """

    def __init__(self, types: Iterable[type[Message]], *, max_payload: int = 64 * 1024 * 1024) -> None:
        by_name: dict[str, type[Message]] = {}
        for t in (*FABRIC_TYPES, *types):
            name = t.wire_name()
            if by_name.get(name, t) is not t:
                raise ValueError(f"two message types named {name!r}")
            by_name[name] = t
        self.types = by_name
        self.max_payload = max_payload
        self.max_frames = 1 + max(t.PAYLOAD_FRAMES for t in by_name.values())
        union = Union[tuple(by_name.values())]  # type: ignore[valid-type]  # noqa: UP007
        self._decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(union)

    def versions(self) -> dict[str, int]:
        return {name: t.VERSION for name, t in self.types.items()}

    @staticmethod
    def encode(msg: Message, payload: Sequence[Any] = ()) -> list[Any]:
        """The frames of ``msg``: its header then its payload buffers, which are sent as they are."""
        if len(payload) != msg.PAYLOAD_FRAMES:
            raise ValueError(f"{msg.wire_name()} carries {msg.PAYLOAD_FRAMES} payload frames, got {len(payload)}")
        return [_encoder.encode(msg), *payload]

    def decode(self, frames: Sequence[Any]) -> tuple[Message, list[Any]]:
        """Validate and decode one message (frames without the routing id).

        Frames may be ``zmq.Frame`` (zero-copy), bytes or memoryviews. Returns the message and its payload
        frames untouched. Raises :class:`ProtocolError` for anything malformed.
        """
        if not frames:
            raise ProtocolError(ErrorCode.MALFORMED, "empty message")
        head = frames[0]
        buf = head.buffer if hasattr(head, "buffer") else head
        if len(buf) > MAX_HEADER_BYTES:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"header frame of {len(buf)} bytes > {MAX_HEADER_BYTES}")
        if len(frames) > self.max_frames:
            # The header is small enough to read: answer with its id where it has one (protocol.md §6.2).
            raise ProtocolError(ErrorCode.TOO_LARGE, f"{len(frames)} frames > {self.max_frames}", self._explain(buf, "").corr)
        try:
            msg = self._decoder.decode(buf)
        except msgspec.ValidationError as e:  # first: ValidationError is a subclass of DecodeError
            raise self._explain(buf, str(e)) from None
        except msgspec.DecodeError as e:
            raise ProtocolError(ErrorCode.MALFORMED, f"header is not MessagePack: {e}") from None
        except RecursionError:  # msgspec bounds nesting with Python's recursion limit
            raise ProtocolError(ErrorCode.MALFORMED, "header nested too deeply") from None
        if msg.v != PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.VERSION, f"protocol version {msg.v}, this side speaks {PROTOCOL_VERSION}", msg.id)
        payload = list(frames[1:])
        if len(payload) != msg.PAYLOAD_FRAMES:
            raise ProtocolError(
                ErrorCode.INVALID, f"{msg.wire_name()} carries {msg.PAYLOAD_FRAMES} payload frames, got {len(payload)}", msg.id
            )
        for p in payload:
            size = len(p.buffer if hasattr(p, "buffer") else p)
            if size > self.max_payload:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"payload frame of {size} bytes > {self.max_payload}", msg.id)
        return msg, payload

    def _explain(self, buf: Any, detail: str) -> ProtocolError:
        detail = detail[:1024]  # msgspec quotes bad enum/literal values whole; an Error's reason is a Text
        try:
            probe = _probe_decoder.decode(buf)
        except (msgspec.DecodeError, RecursionError):
            return ProtocolError(ErrorCode.MALFORMED, f"header is not a map with the envelope keys: {detail}")
        corr = probe.id if isinstance(probe.id, int) and not isinstance(probe.id, bool) and 0 < probe.id < 2**63 else 0
        if isinstance(probe.v, int) and not isinstance(probe.v, bool) and probe.v != PROTOCOL_VERSION:
            return ProtocolError(ErrorCode.VERSION, f"protocol version {probe.v}, this side speaks {PROTOCOL_VERSION}", corr)
        if not isinstance(probe.t, str):
            return ProtocolError(ErrorCode.MALFORMED, "header has no string `t` (message type)", corr)
        if probe.t not in self.types:
            return ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {probe.t[:64]!r}", corr)
        return ProtocolError(ErrorCode.INVALID, f"{probe.t}: {detail}", corr)
