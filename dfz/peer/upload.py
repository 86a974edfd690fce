"""The piece server: serves a daemon's stored pieces to its children over the piece protocol (``peer.*``).

One :class:`PieceServer` per daemon serves every task in its :class:`~dfz.peer.storage.Storage`, finished or
still downloading. It owns a :class:`dfz.broker.Server` (a ROUTER); see ``protocol.md``, "Piece protocol
(peer.*)", for the messages and flows.

Limits, each enforced here and nowhere else:

* **Requests in flight per child**: the fabric's credit (``max_requests_per_child`` becomes the server's
  ``max_in_flight``): a child never has more than that many requests open on its session, and one more is
  answered ``BUSY`` (429) by the fabric without running.
* **Upload slots**: a child session takes a slot with its first ``peer.subscribe`` and gives it back when
  it follows no task any more (``peer.unsubscribe``, a dropped task, or the session's end). When every slot
  is taken, a new child is answered ``NO_UPLOAD_SLOT`` (1202) at once, so it goes to another parent; a
  ``peer.get_piece`` needs a subscription, so only children holding a slot are ever served.
* **Upload rate**: one token bucket (:class:`~dfz.peer.ratelimit.RateLimiter`) for all bytes served, paid
  before the piece is read, so a throttled server holds no piece in memory while it waits.

Tenants: a task stored for a tenant (:attr:`StoredTask.tenant`) is served only to children whose
``peer.subscribe`` carries a ticket of that tenant, signed by a manager the daemon trusts, issued to the host
id the child names, and not expired (``dfz/tickets.py``); anyone else is refused at subscription
(``WRONG_TENANT``, or ``BAD_TICKET`` for a ticket that does not verify), so never holds the subscription that
``peer.get_piece`` needs. A task of no tenant is served to children without a ticket only. Refusals are
counted (``stats.errors``, ``stats.tickets_refused``) and change nothing else: the server goes on serving.

Pieces are read with ``os.pread`` in a worker thread (:meth:`StoredTask.read_piece`) and sent zero-copy;
sockets are only touched from the trio thread. The owner tells the server about pieces as they land
(:meth:`PieceServer.announce`) and the server pushes them, batched, to the children subscribed to the
task (``peer.have``); :meth:`PieceServer.task_finished` and :meth:`PieceServer.drop_task` push
``peer.task_state``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
import zmq

from ..broker import (
    CurveServer,
    ErrorCode,
    Message,
    PeerEvent,
    PeerGone,
    RemoteError,
    Request,
    Server,
    ServerConfig,
)
from ..log import event, get_logger
from ..tasks import BytesLike, DigestMismatch
from ..tickets import TicketError, TicketVerifier
from .messages import (
    MAX_HAVE_PIECES,
    PEER_CATALOGUE,
    RAW,
    GetPiece,
    Have,
    PeerErrorCode,
    PieceData,
    Subscribe,
    Subscribed,
    TaskState,
    TaskStatus,
    Unsubscribe,
    Unsubscribed,
    encode_bitmap,
)
from .ratelimit import RateLimiter
from .storage import PieceMissing, Storage, StorageError, StoredTask, TaskClosed
from .storage import TaskState as StoredState

log = get_logger("peer.upload")

_DROPPED_REMEMBERED = 1024
"""Dropped task ids remembered to answer ``TASK_DROPPED`` rather than ``UNKNOWN_TASK``."""


@dataclass
class PieceServerConfig:
    upload_slots: int = 32
    """Children served at once, over all tasks (a child holds a slot while it is subscribed to a task)."""
    max_requests_per_child: int = 8
    """Requests a child may have in flight on its session (the fabric's credit)."""
    rate_limit: int = 0
    """Upload rate limit in bytes per second over all children; 0 = unlimited."""
    rate_burst: int | None = None
    """Bytes the upload may send at once after an idle time; default a tenth of a second of the rate."""
    have_batch_delay: float = 0.01
    """Seconds announcements are collected before they are pushed (one ``peer.have`` per task and child)."""
    fabric: ServerConfig = field(default_factory=ServerConfig)
    """Heartbeats, liveness and high-water marks of the server (``max_in_flight`` is set from above)."""
    corrupt_pieces_for_tests: bool = False
    """FOR TESTS ONLY: flip the first byte of every piece served, to play a lying parent. Off by default;
    no configuration file or command-line flag sets it."""

    def __post_init__(self) -> None:
        if self.upload_slots < 1 or self.max_requests_per_child < 1:
            raise ValueError("upload_slots and max_requests_per_child must be at least 1")
        if self.rate_limit < 0:
            raise ValueError("rate_limit must be >= 0 (0 = unlimited)")


@dataclass
class PieceServerStats:
    pieces_served: int = 0
    bytes_served: int = 0
    refused_no_slot: int = 0
    """Subscriptions refused with ``NO_UPLOAD_SLOT``."""
    errors: Counter[str] = field(default_factory=Counter)
    """Requests answered with a piece-protocol error, by code name."""
    tickets_refused: Counter[str] = field(default_factory=Counter)
    """Children's tenant tickets refused, by kind (``signature``, ``expired``, ``wrong_host``, ...)."""
    haves_pushed: int = 0
    serving: int = 0
    """``peer.get_piece`` requests being served now."""
    peak_children_serving: int = 0
    """Most children with a ``peer.get_piece`` being served at one time."""
    peak_requests_per_child: int = 0
    """Most ``peer.get_piece`` requests of one child being served at one time."""


@dataclass(eq=False)
class _Outbox:
    """What to push to the subscribers of one task at the next flush, in order."""

    pieces: list[int] = field(default_factory=list)
    state: TaskState | None = None
    state_to: set[bytes] = field(default_factory=set)
    """For ``dropped``: the subscribers at the time of the drop (already unsubscribed)."""


def _corrupt(data: BytesLike) -> bytes:
    damaged = bytearray(data)
    damaged[0] ^= 0xFF
    return bytes(damaged)


class PieceServer:
    """Serves pieces of the tasks in ``storage`` on ``endpoints``.

    Run it in a nursery (``await nursery.start(piece_server.run)``; it returns itself once bound, with
    :attr:`endpoints` filled in); cancel to stop, which answers open requests ``UNAVAILABLE``. The other
    methods are synchronous and called from the trio thread that runs it.
    """

    def __init__(
        self,
        storage: Storage,
        endpoints: Sequence[str],
        *,
        config: PieceServerConfig | None = None,
        name: str = "dfz-piece-server",
        curve: CurveServer | None = None,
        ctx: zmq.Context[Any] | None = None,
        tickets: TicketVerifier | None = None,
    ) -> None:
        self.storage = storage
        self.tickets = tickets if tickets is not None else TicketVerifier()
        """The manager keys children's tenant tickets are checked with (the daemon adds its manager's)."""
        self.config = config or PieceServerConfig()
        cfg = self.config
        fabric = dataclasses.replace(cfg.fabric, max_in_flight=cfg.max_requests_per_child)
        self.server = Server(
            PEER_CATALOGUE, endpoints, name=name, config=fabric, curve=curve, ctx=ctx, on_peer_event=self._peer_event
        )
        self.server.handle(Subscribe, self._subscribe)
        self.server.handle(Unsubscribe, self._unsubscribe)
        self.server.handle(GetPiece, self._get_piece)
        self.limiter = RateLimiter(cfg.rate_limit, cfg.rate_burst)
        self.stats = PieceServerStats()
        self._tasks: dict[str, StoredTask] = {}
        self._dropped: OrderedDict[str, str] = OrderedDict()  # task id -> reason
        self._subscribers: dict[str, set[bytes]] = {}  # task id -> routing ids of subscribed children
        self._slots: dict[bytes, set[str]] = {}  # routing id of a child holding a slot -> its tasks
        self._serving: Counter[bytes] = Counter()  # routing id -> get_piece requests being served
        self._outbox: dict[str, _Outbox] = {}
        self._wake = trio.Event()

    @property
    def endpoints(self) -> list[str]:
        return self.server.endpoints

    @property
    def children(self) -> int:
        """Children holding an upload slot now."""
        return len(self._slots)

    async def run(self, *, task_status: trio.TaskStatus[PieceServer] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.server.run)
            nursery.start_soon(self._flusher)
            task_status.started(self)

    # -- the owner's side -------------------------------------------------------------------------------

    def add_task(self, task: StoredTask) -> None:
        """Serve ``task`` (a task the daemon is downloading or has). Optional for tasks already in the
        storage (they are found there on first request), required to serve a task again after
        :meth:`drop_task`."""
        self._dropped.pop(task.task_id, None)
        self._tasks[task.task_id] = task

    def announce(self, task_id: str, piece: int) -> None:
        """Piece ``piece`` of ``task_id`` has been written and verified: tell the subscribed children."""
        self.announce_many(task_id, (piece,))

    def announce_many(self, task_id: str, pieces: Iterable[int]) -> None:
        if task_id not in self._subscribers:
            return
        self._outbox.setdefault(task_id, _Outbox()).pieces.extend(pieces)
        self._wake.set()

    def task_finished(self, task_id: str) -> None:
        """The task succeeded here: tell its subscribers that this parent now has every piece."""
        if task_id not in self._subscribers:
            return
        task = self._tasks.get(task_id)
        length = task.content_length if task is not None else None
        box = self._outbox.setdefault(task_id, _Outbox())
        box.state = TaskState(task_id=task_id, state=TaskStatus.SUCCEEDED, content_length=length)
        self._wake.set()

    def drop_task(self, task_id: str, reason: str = "") -> None:
        """Stop serving a task (call it before deleting the task from the storage): its subscribers get a
        ``dropped`` task state and lose their subscription; later requests get ``TASK_DROPPED``."""
        self._tasks.pop(task_id, None)
        self._dropped[task_id] = reason
        self._dropped.move_to_end(task_id)
        while len(self._dropped) > _DROPPED_REMEMBERED:
            self._dropped.popitem(last=False)
        subscribers = set(self._subscribers.get(task_id, ()))
        for rid in subscribers:
            self._release(rid, task_id)
        if subscribers:
            box = self._outbox.setdefault(task_id, _Outbox())
            box.state = TaskState(task_id=task_id, state=TaskStatus.DROPPED, reason=reason[:4096])
            box.state_to = subscribers
            self._wake.set()
        event(log, logging.INFO, "upload.task_dropped", task=task_id, subscribers=len(subscribers))

    # -- subscriptions ----------------------------------------------------------------------------------

    def _peer_event(self, ev: PeerEvent) -> None:
        if ev.kind == "gone":
            for task_id in list(self._slots.get(ev.peer.routing_id, ())):
                self._release(ev.peer.routing_id, task_id)

    def _release(self, rid: bytes, task_id: str) -> None:
        """End one subscription (idempotent); the slot goes back when the child follows no task."""
        subs = self._subscribers.get(task_id)
        if subs is not None:
            subs.discard(rid)
            if not subs:
                del self._subscribers[task_id]
                self._outbox.pop(task_id, None)
        tasks = self._slots.get(rid)
        if tasks is not None:
            tasks.discard(task_id)
            if not tasks:
                del self._slots[rid]

    def _refuse(self, code: PeerErrorCode, reason: str) -> RemoteError:
        self.stats.errors[code.name] += 1
        return RemoteError(code, reason)

    async def _task(self, task_id: str) -> StoredTask:
        if task_id in self._dropped:
            raise self._refuse(PeerErrorCode.TASK_DROPPED, f"task {task_id} was dropped by this peer")
        task = self._tasks.get(task_id)
        if task is None:
            try:
                task = await trio.to_thread.run_sync(self.storage.get, task_id)
            except StorageError as e:
                raise RemoteError(ErrorCode.INTERNAL, f"storage: {e}") from None
            if task is None:
                raise self._refuse(PeerErrorCode.UNKNOWN_TASK, f"task {task_id} is not stored on this peer")
            if task_id in self._dropped:  # dropped while it was being looked up
                raise self._refuse(PeerErrorCode.TASK_DROPPED, f"task {task_id} was dropped by this peer")
            self._tasks[task_id] = task
        return task

    async def _subscribe(self, req: Request) -> tuple[Message, list[bytes]]:
        msg = req.msg
        assert isinstance(msg, Subscribe)
        rid = req.peer.routing_id
        task = await self._task(msg.task_id)
        self._admit(msg, task)
        tasks = self._slots.get(rid)
        if tasks is None:
            if len(self._slots) >= self.config.upload_slots:
                self.stats.refused_no_slot += 1
                raise self._refuse(
                    PeerErrorCode.NO_UPLOAD_SLOT,
                    f"all {self.config.upload_slots} upload slots of this peer are in use: try another parent, or later",
                )
            tasks = self._slots[rid] = set()
        # Subscribe before the snapshot: a piece that lands after it is announced to this child, one that
        # landed before is in the bitmap (announce() follows the write), so none is missed.
        tasks.add(msg.task_id)
        self._subscribers.setdefault(msg.task_id, set()).add(rid)
        try:
            reply, bitmap = await trio.to_thread.run_sync(_snapshot, task)
        except BaseException as e:
            self._release(rid, msg.task_id)
            if isinstance(e, TaskClosed):
                self.drop_task(msg.task_id, "deleted")
                raise self._refuse(PeerErrorCode.TASK_DROPPED, f"task {msg.task_id} was deleted on this peer") from None
            raise
        return reply, [bitmap]

    def _admit(self, msg: Subscribe, task: StoredTask) -> None:
        """Refuse a child that may not have this task: its ticket does not verify, or proves another tenant than
        the task's, or it brings none for a task of a tenant."""
        tenant = task.tenant
        if msg.ticket:
            try:
                ticket = self.tickets.verify(msg.ticket, now=time.time(), host_id=msg.host_id)
            except TicketError as e:
                self.stats.tickets_refused[e.kind] += 1
                event(log, logging.WARNING, "upload.ticket_refused", host=msg.host_id[:128], kind=e.kind, reason=e.reason)
                raise self._refuse(PeerErrorCode.BAD_TICKET, f"the tenant ticket is refused ({e.kind}): {e.reason}") from None
            if ticket.tenant == tenant:
                return
            child = ticket.tenant
        elif not tenant:
            return
        else:
            child = ""
        event(log, logging.WARNING, "upload.wrong_tenant", task=msg.task_id, host=msg.host_id[:128], tenant=child or "-")
        raise self._refuse(
            PeerErrorCode.WRONG_TENANT,
            f"task {msg.task_id} is not served to peers of {'your tenant' if child else 'no tenant (no ticket came)'}",
        )

    async def _unsubscribe(self, req: Request) -> Message:
        msg = req.msg
        assert isinstance(msg, Unsubscribe)
        self._release(req.peer.routing_id, msg.task_id)
        return Unsubscribed(task_id=msg.task_id)

    # -- pieces -----------------------------------------------------------------------------------------

    async def _get_piece(self, req: Request) -> tuple[Message, list[BytesLike]]:
        msg = req.msg
        assert isinstance(msg, GetPiece)
        rid = req.peer.routing_id
        if msg.task_id in self._dropped:
            raise self._refuse(PeerErrorCode.TASK_DROPPED, f"task {msg.task_id} was dropped by this peer")
        if msg.task_id not in self._slots.get(rid, ()):
            raise self._refuse(PeerErrorCode.NOT_SUBSCRIBED, f"subscribe to task {msg.task_id} before asking for its pieces")
        if RAW not in msg.accept:
            raise RemoteError(ErrorCode.INVALID, f"accept must include {RAW!r}, got {msg.accept}")
        task = self._tasks[msg.task_id]  # a subscription implies it (drop_task ends the subscriptions)
        stats = self.stats
        self._serving[rid] += 1
        stats.serving += 1
        stats.peak_requests_per_child = max(stats.peak_requests_per_child, self._serving[rid])
        stats.peak_children_serving = max(stats.peak_children_serving, len(self._serving))
        try:
            # Pay before reading, so a throttled server holds no piece while it waits; the reservation
            # is a full piece, and what a short last piece (or an error) did not use goes back.
            reserved = task.piece_length
            await self.limiter.acquire(reserved)
            data: BytesLike = b""
            try:
                data = await trio.to_thread.run_sync(_read, task, msg.piece)
            finally:
                self.limiter.refund(reserved - len(data))
        except PieceMissing:
            raise self._refuse(
                PeerErrorCode.PIECE_MISSING, f"piece {msg.piece} of task {msg.task_id} is not here (yet)"
            ) from None
        except TaskClosed:
            self.drop_task(msg.task_id, "deleted")
            raise self._refuse(PeerErrorCode.TASK_DROPPED, f"task {msg.task_id} was deleted on this peer") from None
        except IndexError as e:
            raise RemoteError(ErrorCode.INVALID, str(e)) from None
        except (StorageError, OSError) as e:
            event(log, logging.ERROR, "upload.read_failed", task=msg.task_id, piece=msg.piece, error=repr(e))
            raise RemoteError(ErrorCode.INTERNAL, f"cannot read piece {msg.piece}") from None
        finally:
            stats.serving -= 1
            self._serving[rid] -= 1
            if not self._serving[rid]:
                del self._serving[rid]
        if self.config.corrupt_pieces_for_tests:
            data = _corrupt(data)
        stats.pieces_served += 1
        stats.bytes_served += len(data)
        return PieceData(task_id=msg.task_id, piece=msg.piece, size=len(data), encoding=RAW), [data]

    # -- announcements ----------------------------------------------------------------------------------

    async def _flusher(self) -> None:
        """Push what the owner announced, one batch every ``have_batch_delay`` at most."""
        while True:
            await self._wake.wait()
            await trio.sleep(self.config.have_batch_delay)
            self._wake = trio.Event()
            outbox, self._outbox = self._outbox, {}
            per_child: dict[bytes, list[Message]] = {}
            for task_id, box in outbox.items():
                messages: list[Message] = []
                pieces = sorted(set(box.pieces))
                for start in range(0, len(pieces), MAX_HAVE_PIECES):
                    messages.append(Have(task_id=task_id, pieces=pieces[start : start + MAX_HAVE_PIECES]))
                subscribers = self._subscribers.get(task_id, set())
                for rid in subscribers:
                    per_child.setdefault(rid, []).extend(messages)
                if box.state is not None:
                    for rid in subscribers | box.state_to:
                        per_child.setdefault(rid, []).append(box.state)
            # One task per child, so a child slow to take its pushes does not hold up the others.
            async with trio.open_nursery() as nursery:
                for rid, messages in per_child.items():
                    nursery.start_soon(self._push_all, rid, messages)

    async def _push_all(self, rid: bytes, messages: list[Message]) -> None:
        for msg in messages:
            try:
                await self.server.push(rid, msg)
            except PeerGone:
                return  # its session is over: the peer event releases its subscriptions
            if isinstance(msg, Have):
                self.stats.haves_pushed += 1


# -- in worker threads -----------------------------------------------------------------------------------


def _snapshot(task: StoredTask) -> tuple[Subscribed, bytes]:
    """The task's layout and piece bitmap now (a worker thread: this copies the digest list)."""
    digests = task.piece_digests()
    layout = task.layout()
    finished = task.state is StoredState.SUCCEEDED
    bitmap = encode_bitmap((i for i, d in enumerate(digests) if d is not None), len(digests))
    reply = Subscribed(
        task_id=task.task_id,
        piece_length=task.piece_length,
        content_length=None if layout is None else layout.content_length,
        piece_count=None if layout is None else layout.count,
        finished=finished,
    )
    return reply, bitmap


def _read(task: StoredTask, piece: int) -> BytesLike:
    """The piece's bytes (a worker thread). IndexError for a piece beyond the content."""
    layout = task.layout()
    if layout is not None and piece >= layout.count:
        raise IndexError(f"piece {piece} is beyond the content: task {task.task_id} has {layout.count} pieces")
    try:
        return task.read_piece(piece)
    except DigestMismatch:  # only with verify=True; kept for safety: the piece was dropped
        raise PieceMissing(f"piece {piece} of task {task.task_id} was damaged and dropped") from None
