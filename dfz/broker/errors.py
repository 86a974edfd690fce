"""Error codes of the wire and the exceptions that carry them.

One place for every code: `protocol.md` lists the same table. Codes below 1000 belong to the fabric;
subsystems (scheduler, peer, manager) define theirs from 1000 up, each in its own range.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    MALFORMED = 400  # the header frame is not a MessagePack map of the envelope's shape
    UNKNOWN_PEER = 401  # the server has no session for this client: send `hello` first
    UNKNOWN_TYPE = 404  # the message type is not in the receiver's catalogue
    UNEXPECTED = 405  # a known type that the receiver does not accept in this direction
    TOO_LARGE = 413  # a frame or the frame count exceeds the limits
    INVALID = 422  # a field has the wrong type, range or length, or is missing
    VERSION = 426  # the protocol major version is not supported
    BUSY = 429  # more requests in flight than the server granted
    INTERNAL = 500  # the handler failed; the server keeps running
    UNAVAILABLE = 503  # the server is shutting down
    DEADLINE = 504  # the request's deadline passed before it was answered


class FabricError(Exception):
    """Base of every error the fabric raises to its users."""


class ProtocolError(FabricError):
    """A received message broke the protocol. ``corr`` is its correlation id when it could be read."""

    def __init__(self, code: ErrorCode, reason: str, corr: int = 0) -> None:
        super().__init__(f"{code.name} ({int(code)}): {reason}")
        self.code = code
        self.reason = reason
        self.corr = corr


class RemoteError(FabricError):
    """The other side answered a request with an error. Handlers raise it to answer with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        name = ErrorCode(code).name if code in ErrorCode._value2member_map_ else str(code)
        super().__init__(f"{name}: {reason}")
        self.code = code
        self.reason = reason


class RequestTimeout(FabricError, TimeoutError):
    """No reply arrived before the request's deadline."""


class ConnectionLost(FabricError):
    """The server was declared gone (or the client stopped) while the request was in flight."""


class PeerGone(FabricError):
    """A push named a peer that is not connected (or no longer is)."""
