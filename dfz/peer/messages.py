"""The piece protocol between daemons (``peer.*``): message types, error codes and the piece bitmap.

Rules of this file:

* Every type here is a :class:`dfz.broker.Message` with a wire name starting ``peer.``; ``protocol.md``
  ("Piece protocol (peer.*)") documents the same catalogue, flows and codes. The two change together.
* Every field is bounded: task ids are 64 lowercase hex digits, piece indices are below
  :data:`dfz.tasks.MAX_PIECES`, lists and strings have a maximum length. The fabric's codec turns
  anything else into an ``INVALID`` (422) error before a handler sees it.
* Piece bytes travel in one raw payload frame, never in the header, and never with a digest: a child
  verifies against the digests the scheduler forwarded, not against anything a parent says.
* The piece bitmap is a raw payload frame too (2**20 pieces take 128 KiB, more than a header may hold).
  Bit ``i`` is ``bitmap[i // 8] >> (7 - i % 8) & 1`` (most significant bit first, as in BitTorrent);
  its length is ``ceil(n / 8)`` bytes for ``n`` pieces; spare bits at the end are zero.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum
from typing import Annotated, ClassVar

import msgspec
from msgspec import Meta

from ..broker import U63, Catalogue, Kind, Message, Text
from ..tasks import MAX_PIECE_LENGTH, MAX_PIECES, MIN_FIXED_PIECE_LENGTH

TaskId = Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
"""A task id (:func:`dfz.tasks.task_id`)."""
PieceIndex = Annotated[int, Meta(ge=0, lt=MAX_PIECES)]
PieceLength = Annotated[int, Meta(ge=MIN_FIXED_PIECE_LENGTH, le=MAX_PIECE_LENGTH)]
PieceCount = Annotated[int, Meta(ge=0, le=MAX_PIECES)]
Encoding = Annotated[str, Meta(min_length=1, max_length=16)]

MAX_HAVE_PIECES = 4096
"""Most piece indices in one ``peer.have`` (about 20 KiB of header); a longer batch is split."""

MAX_BITMAP_BYTES = (MAX_PIECES + 7) // 8

RAW = "raw"
"""The encoding of a piece sent as it is stored. Every peer speaks it; others (zstd) may be added."""


class PeerErrorCode(IntEnum):
    """Error codes of the piece protocol (range 1200-1299; the fabric's own codes stay below 1000)."""

    UNKNOWN_TASK = 1200  # the parent does not store this task (any more, or not yet): ask another parent
    PIECE_MISSING = 1201  # the parent does not have this piece (yet): wait for its `peer.have`, or ask another
    NO_UPLOAD_SLOT = 1202  # every upload slot of the parent is in use: go to another parent, retry later
    TASK_DROPPED = 1203  # the parent dropped (deleted) the task: it will not serve it again
    NOT_SUBSCRIBED = 1204  # `peer.get_piece` for a task the child has not subscribed to on this session
    WRONG_TENANT = 1205  # the task is not of the tenant the child's ticket proves (or it has one and no ticket came)
    BAD_TICKET = 1206  # the tenant ticket is malformed, not the manager's, expired or another host's


class TaskStatus:
    """Values of :attr:`TaskState.state`. A receiver ignores a value it does not know."""

    SUCCEEDED = "succeeded"  # the parent has every piece: it has them all from now on
    DROPPED = "dropped"  # the parent dropped the task: the subscription has ended


# --- subscribe ----------------------------------------------------------------------------------------


class Subscribe(Message, tag="peer.subscribe"):
    """Request: follow a parent's pieces of a task. Takes one of the parent's upload slots (unless this
    session holds one already) and lasts until ``peer.unsubscribe``, a ``dropped`` task state, or the
    end of the session. Answered by :class:`Subscribed`."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    VERSION: ClassVar[int] = 2
    task_id: TaskId
    ticket: Annotated[bytes, Meta(max_length=1024)] = b""
    """(1.9) The child's tenant ticket (``dfz/tickets.py``); empty: the child is in no tenant. A task of a
    tenant is served only to children whose ticket proves that tenant."""
    host_id: Annotated[str, Meta(max_length=128)] = ""
    """(1.9) The child's host id, which its ticket must name (with a ticket)."""


class Subscribed(Message, tag="peer.subscribed"):
    """Reply to :class:`Subscribe`: what the parent knows and has now. One payload frame: the bitmap of
    the pieces it stores (see the module docstring), ``ceil(n / 8)`` bytes where ``n`` is ``piece_count``,
    or, while the content length is unknown, the number of piece entries the parent has so far."""

    KIND: ClassVar[Kind] = Kind.REPLY
    PAYLOAD_FRAMES: ClassVar[int] = 1
    task_id: TaskId
    piece_length: PieceLength
    content_length: U63 | None = None
    """None while the parent streams from an origin that gave no length."""
    piece_count: PieceCount | None = None
    """``ceil(content_length / piece_length)``; None when the content length is."""
    finished: bool = False
    """The parent has every piece (the task succeeded there)."""


class Have(Message, tag="peer.have"):
    """Server push to subscribers: pieces the parent has stored (and verified) since the last one.

    Batched: a parent collects the pieces that land for a short while and sends them in one push, at
    most :data:`MAX_HAVE_PIECES` per message. A subscriber may get a piece it already knows of."""

    KIND: ClassVar[Kind] = Kind.SERVER_PUSH
    task_id: TaskId
    pieces: Annotated[list[PieceIndex], Meta(min_length=1, max_length=MAX_HAVE_PIECES)]


class TaskState(Message, tag="peer.task_state"):
    """Server push to subscribers: the parent's task ended. ``succeeded``: it has every piece (and
    ``content_length`` is set). ``dropped``: it deleted the task; the subscription is over."""

    KIND: ClassVar[Kind] = Kind.SERVER_PUSH
    task_id: TaskId
    state: Annotated[str, Meta(max_length=32)]
    content_length: U63 | None = None
    reason: Text = ""


class Unsubscribe(Message, tag="peer.unsubscribe"):
    """Request: stop following a task (idempotent). The session's upload slot is released when it
    follows no task any more. Answered by :class:`Unsubscribed`."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    task_id: TaskId


class Unsubscribed(Message, tag="peer.unsubscribed"):
    KIND: ClassVar[Kind] = Kind.REPLY
    task_id: TaskId


# --- pieces -------------------------------------------------------------------------------------------


class GetPiece(Message, tag="peer.get_piece"):
    """Request: the bytes of one piece of a task this session subscribed to. Answered by
    :class:`PieceData`, or an error: ``PIECE_MISSING``, ``NOT_SUBSCRIBED``, ``TASK_DROPPED``,
    ``INVALID`` (a piece beyond the content, or no acceptable encoding)."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    task_id: TaskId
    piece: PieceIndex
    accept: Annotated[list[Encoding], Meta(min_length=1, max_length=8)] = msgspec.field(default_factory=lambda: [RAW])
    """Encodings the child can decode, in its order of preference; must include ``raw``."""


class PieceData(Message, tag="peer.piece"):
    """Reply to :class:`GetPiece`. One payload frame: the piece, in ``encoding`` (one of those the
    child accepted). No digest: the child checks the decoded bytes against its trusted digest."""

    KIND: ClassVar[Kind] = Kind.REPLY
    PAYLOAD_FRAMES: ClassVar[int] = 1
    task_id: TaskId
    piece: PieceIndex
    size: Annotated[int, Meta(ge=1, le=MAX_PIECE_LENGTH)]
    """Length of the piece once decoded (the payload's length for ``raw``)."""
    encoding: Encoding = RAW


PEER_TYPES: tuple[type[Message], ...] = (
    Subscribe,
    Subscribed,
    Have,
    TaskState,
    Unsubscribe,
    Unsubscribed,
    GetPiece,
    PieceData,
)
"""The ``peer.*`` types, for a catalogue that serves more than the piece protocol."""

PEER_CATALOGUE = Catalogue(PEER_TYPES, max_payload=MAX_PIECE_LENGTH)
"""The catalogue of a piece server and of its children: one piece (at most 64 MiB) per payload frame."""


# --- the piece bitmap ---------------------------------------------------------------------------------


def bitmap_length(count: int) -> int:
    return (count + 7) // 8


def encode_bitmap(pieces: Iterable[int], count: int) -> bytes:
    """The bitmap of ``count`` pieces with ``pieces`` set (each ``0 <= i < count``)."""
    bits = bytearray(bitmap_length(count))
    for i in pieces:
        if not 0 <= i < count:
            raise ValueError(f"piece {i} is outside a bitmap of {count} pieces")
        bits[i >> 3] |= 0x80 >> (i & 7)
    return bytes(bits)


def decode_bitmap(bits: bytes | bytearray | memoryview, count: int) -> list[int]:
    """The set pieces of a bitmap of ``count`` pieces, in increasing order.

    Raises :class:`ValueError` when its length is not ``ceil(count / 8)`` or a spare bit is set."""
    view = memoryview(bits).cast("B")
    if len(view) != bitmap_length(count):
        raise ValueError(f"a bitmap of {count} pieces has {bitmap_length(count)} bytes, not {len(view)}")
    spare = 8 * len(view) - count
    if spare and view[-1] & ((1 << spare) - 1):
        raise ValueError("a spare bit after the last piece is set")
    pieces: list[int] = []
    for byte_index, byte in enumerate(view):
        if byte:
            base = byte_index << 3
            pieces.extend(base + bit for bit in range(8) if byte & (0x80 >> bit))
    return pieces
