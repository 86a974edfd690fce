"""The server side of the fabric: one ROUTER socket, many client sessions.

Patterns (named as in the ZeroMQ guide):

* **Request/reply** over ROUTER/DEALER: each request runs as its own task under the request's deadline
  (``dl``) and is answered exactly once, with its reply or an ``error`` carrying the same ``id``.
* **Server push**: :meth:`Server.push` sends to a connected client at any time.
* **Heartbeats and liveness** (Paranoid Pirate): the server sends ``hb`` to a client it has sent nothing
  to for one interval, and declares a client gone after ``liveness`` intervals of silence; the owner
  hears of it through ``on_peer_event``.
* **Flow control** by credit: each session may have at most ``max_in_flight`` requests open; one more is
  answered ``BUSY`` at once. High-water marks and POLLOUT are never used for flow control.
* A malformed message is answered with an ``error`` where it carries a readable correlation id, dropped
  otherwise, and counted in :attr:`Server.bad_frames`; the server keeps serving everyone else.
"""

from __future__ import annotations

import itertools
import math
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import trio
import zmq

from ..log import event, get_logger
from .curve import CurveServer, ZapHandler
from .errors import ErrorCode, PeerGone, ProtocolError, RemoteError
from .messages import Bye, Catalogue, Error, Heartbeat, Hello, Kind, Message, Welcome
from .socket import Buffer, HostUnreachable, Socket, WouldBlock, default_context

log = get_logger("broker.server")


@dataclass(eq=False)
class PeerSession:
    """One client session on a server, from its ``hello`` until it leaves or falls silent."""

    routing_id: bytes
    name: str
    session: str
    user_id: str | None  # the client's CURVE public key (Z85) when the fabric is encrypted
    types: dict[str, int]
    last_recv: float
    last_send: float
    in_flight: int = 0
    handlers: set[trio.CancelScope] = field(default_factory=set)  # of requests still being served


@dataclass(frozen=True)
class PeerEvent:
    kind: Literal["joined", "gone"]
    peer: PeerSession
    reason: str  # joined: "hello"; gone: "left", "silent", "rejoined", "unreachable"


@dataclass(eq=False)
class Request:
    """What a request handler receives. ``payload`` frames are zero-copy; keep them while in use."""

    peer: PeerSession
    msg: Message
    payload: list[Any]
    deadline: float


Reply = Message | tuple[Message, Sequence[Buffer]]
Handler = Callable[[Request], Awaitable[Reply]]
SyncHandler = Callable[[Request], Reply]
PushHandler = Callable[[PeerSession, Message, list[Any]], None]


@dataclass
class ServerConfig:
    heartbeat: float = 1.0
    """Seconds between heartbeats on an idle session."""
    liveness: int = 3
    """Silent intervals after which the other side is declared gone."""
    max_in_flight: int = 16
    """Requests a client may have open at once (its credit)."""
    hwm: int = 64
    """Socket high-water mark in messages; above what credit allows, never reached."""
    send_timeout: float = 2.0
    """How long a reply or push waits for room at a full peer before it is given up."""


@dataclass
class ServerStats:
    bad_frames: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    pushes_in: int = 0
    dropped_sends: int = 0


class Server:
    """A fabric server: bind, answer requests with handlers, push to clients, watch their liveness.

    Run it in a nursery: ``server = await nursery.start(Server(...).run)``; cancel to stop. Handlers
    are registered with :meth:`handle` (requests) and :meth:`on_push` (client pushes) before it runs.
    """

    def __init__(
        self,
        catalogue: Catalogue,
        endpoints: Sequence[str],
        *,
        name: str = "dfz",
        config: ServerConfig | None = None,
        curve: CurveServer | None = None,
        ctx: zmq.Context[Any] | None = None,
        on_peer_event: Callable[[PeerEvent], None] | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.name = name
        self.config = config or ServerConfig()
        self.curve = curve
        if curve is not None and ctx is not None:
            raise ValueError("a CURVE server owns a private context (its ZAP handler is per context)")
        self._ctx = ctx
        self._want_endpoints = list(endpoints)
        self.endpoints: list[str] = []
        self.on_peer_event = on_peer_event
        self.peers: dict[bytes, PeerSession] = {}
        self.stats = ServerStats()
        self._handlers: dict[type[Message], Handler] = {}
        self._sync_handlers: dict[type[Message], SyncHandler] = {}
        self._push_handlers: dict[type[Message], PushHandler] = {}
        self._sock: Socket | None = None
        self._nursery: trio.Nursery | None = None
        self._sessions = itertools.count(1)
        self._boot = os.urandom(4).hex()
        self.zap: ZapHandler | None = None

    # -- registration ---------------------------------------------------------------------------------

    def handle(self, msg_type: type[Message], handler: Handler) -> None:
        self._check_request_type(msg_type)
        self._sync_handlers.pop(msg_type, None)
        self._handlers[msg_type] = handler

    def handle_now(self, msg_type: type[Message], handler: SyncHandler) -> None:
        """Register a handler that answers at once, in the receive loop, without a task of its own.

        For handlers that only compute (a scheduler applying an event, a reply from memory): no task to
        spawn and no scheduler pass, and requests are answered strictly in arrival order. It must not
        block; an exception is answered like one from :meth:`handle`'s handlers.
        """
        self._check_request_type(msg_type)
        self._handlers.pop(msg_type, None)
        self._sync_handlers[msg_type] = handler

    def _check_request_type(self, msg_type: type[Message]) -> None:
        if msg_type.KIND is not Kind.REQUEST:
            raise ValueError(f"{msg_type.__name__} is not a request type")
        if msg_type.wire_name() not in self.catalogue.types:
            raise ValueError(f"{msg_type.__name__} is not in the catalogue")

    def on_push(self, msg_type: type[Message], handler: PushHandler) -> None:
        if msg_type.KIND not in (Kind.PUSH, Kind.CLIENT_PUSH):
            raise ValueError(f"{msg_type.__name__} is not a push a client may send")
        self._push_handlers[msg_type] = handler

    # -- lifetime -------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        own_ctx = self.curve is not None
        ctx: zmq.Context[Any] = zmq.Context(io_threads=1) if own_ctx else (self._ctx or default_context())
        sock: Socket | None = None
        zap_sock: Socket | None = None
        try:
            # Bind before any task starts, so a bind error (address in use, bad endpoint) reaches the
            # caller as itself rather than inside an exception group.
            options: dict[int, int | bytes] = {}
            if self.curve is not None:
                self.zap = ZapHandler(ctx, self.curve.allowed)
                zap_sock = self.zap.open()  # before the server socket: no handshake without a handler
                options = self.curve.socket_options()
            sock = self._sock = Socket.create(
                ctx,
                zmq.ROUTER,
                hwm=self.config.hwm,
                max_msg_size=self.catalogue.max_payload + 65536,
                options=options,
            )
            for ep in self._want_endpoints:
                self.endpoints.append(sock.bind(ep))
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.zap is not None and zap_sock is not None:
                    nursery.start_soon(self.zap.serve, zap_sock)
                    zap_sock = None  # serve closes it
                nursery.start_soon(self._keepalive)
                event(log, 20, "server_started", name=self.name, endpoints=",".join(self.endpoints))
                task_status.started(self)
                await self._receive_loop(sock, nursery)
        finally:
            # Closed only after the handlers have ended, so those cancelled by a shutdown could still
            # answer UNAVAILABLE; a short linger lets those last answers leave.
            self._nursery = None
            if zap_sock is not None:
                zap_sock.close()
            if sock is not None:
                sock.close(linger_ms=100)
            if own_ctx:
                ctx.term()

    # -- receiving ------------------------------------------------------------------------------------

    async def _receive_loop(self, sock: Socket, nursery: trio.Nursery) -> None:
        while True:
            frames = await sock.recv()
            try:
                self._dispatch(frames, nursery)
            except Exception as e:  # a bug must not take every client down with it
                self.stats.bad_frames["internal"] += 1
                event(log, 40, "dispatch_failed", error=repr(e))

    def _bad(self, rid: bytes | None, err: ProtocolError) -> None:
        self.stats.bad_frames[err.code.name.lower()] += 1
        event(log, 20, "bad_message", peer=rid.hex() if rid else "-", code=err.code.name, reason=err.reason)
        if rid is not None and err.corr:
            self._send_now(rid, Error(id=err.corr, code=err.code, reason=err.reason))

    def _dispatch(self, frames: list[Any], nursery: trio.Nursery) -> None:
        if len(frames) < 2:
            self._bad(None, ProtocolError(ErrorCode.MALFORMED, "message without header frame"))
            return
        rid: bytes = frames[0].bytes
        try:
            msg, payload = self.catalogue.decode(frames[1:])
        except ProtocolError as e:
            self._bad(rid, e)
            return
        now = trio.current_time()
        peer = self.peers.get(rid)
        if peer is not None:
            peer.last_recv = now
        if isinstance(msg, Hello):
            self._hello(rid, msg, frames[1], now)
            return
        if peer is None:
            # A client we hold no session for (new after a restart of ours, or declared gone).
            self.stats.bad_frames["unknown_peer"] += 1
            self._send_now(rid, Error(id=msg.id, code=ErrorCode.UNKNOWN_PEER, reason="no session: send hello"))
            return
        kind = msg.KIND
        if kind is Kind.REQUEST:
            self._request(peer, msg, payload, now, nursery)
        elif isinstance(msg, Heartbeat):
            pass
        elif isinstance(msg, Bye):
            self._gone(peer, "left")
        elif kind in (Kind.PUSH, Kind.CLIENT_PUSH):
            self.stats.pushes_in += 1
            push_handler = self._push_handlers.get(type(msg))
            if push_handler is None:
                self._bad(rid, ProtocolError(ErrorCode.UNEXPECTED, f"{msg.wire_name()} is not accepted here"))
                return
            try:
                push_handler(peer, msg, payload)
            except Exception as e:
                self.stats.bad_frames["push_handler"] += 1
                event(log, 40, "push_handler_failed", type=msg.wire_name(), peer=peer.name, error=repr(e))
        else:
            self._bad(rid, ProtocolError(ErrorCode.UNEXPECTED, f"a client may not send {msg.wire_name()}", msg.id))

    def _hello(self, rid: bytes, msg: Hello, head: Any, now: float) -> None:
        if not msg.id:
            self._bad(rid, ProtocolError(ErrorCode.INVALID, "hello is a request and needs an id"))
            return
        old = self.peers.get(rid)
        if old is not None:
            self._gone(old, "rejoined")
        user_id = None
        if self.curve is not None:
            try:
                user_id = head.get("User-Id")
            except zmq.ZMQError:
                user_id = None
        peer = PeerSession(
            routing_id=rid,
            name=msg.name,
            session=f"{self._boot}-{next(self._sessions)}",
            user_id=user_id,
            types=dict(msg.types),
            last_recv=now,
            last_send=now,
        )
        self.peers[rid] = peer
        cfg = self.config
        self._send_now(
            rid,
            Welcome(
                id=msg.id,
                name=self.name,
                session=peer.session,
                heartbeat_ms=max(10, round(cfg.heartbeat * 1000)),
                liveness=cfg.liveness,
                max_in_flight=cfg.max_in_flight,
                max_payload=self.catalogue.max_payload,
                types=self.catalogue.versions(),
            ),
        )
        event(log, 20, "peer_joined", peer=peer.name, session=peer.session)
        self._emit(PeerEvent("joined", peer, "hello"))

    def _request(self, peer: PeerSession, msg: Message, payload: list[Any], now: float, nursery: trio.Nursery) -> None:
        rid = peer.routing_id
        if not msg.id:
            self._bad(rid, ProtocolError(ErrorCode.INVALID, f"{msg.wire_name()} is a request and needs an id"))
            return
        handler = self._handlers.get(type(msg))
        if handler is None:
            sync_handler = self._sync_handlers.get(type(msg))
            if sync_handler is None:
                self._bad(rid, ProtocolError(ErrorCode.UNEXPECTED, f"{msg.wire_name()} is not served here", msg.id))
            else:
                self._serve_now(sync_handler, Request(peer, msg, payload, math.inf), nursery)
            return
        if peer.in_flight >= self.config.max_in_flight:
            self.stats.bad_frames["busy"] += 1
            self._send_now(rid, Error(id=msg.id, code=ErrorCode.BUSY, reason=f"more than {self.config.max_in_flight} in flight"))
            return
        self.stats.requests += 1
        peer.in_flight += 1
        deadline = now + msg.dl / 1000 if msg.dl else math.inf
        nursery.start_soon(self._serve, handler, Request(peer, msg, payload, deadline))

    def _serve_now(self, handler: SyncHandler, req: Request, nursery: trio.Nursery) -> None:
        self.stats.requests += 1
        frames: Sequence[Buffer] = ()
        try:
            result = handler(req)
            if isinstance(result, tuple):
                reply, frames = result
            else:
                reply = result
            reply.id = req.msg.id
            out = self.catalogue.encode(reply, frames)
        except RemoteError as e:
            out = self.catalogue.encode(Error(id=req.msg.id, code=e.code, reason=e.reason[:4096]))
        except Exception as e:
            event(log, 40, "handler_failed", type=req.msg.wire_name(), peer=req.peer.name, error=repr(e))
            self.stats.bad_frames["handler"] += 1
            out = self.catalogue.encode(Error(id=req.msg.id, code=ErrorCode.INTERNAL, reason=f"{type(e).__name__} in handler"))
        peer = req.peer
        sock = self._sock
        if sock is not None and sock.try_send([peer.routing_id, *out]):
            peer.last_send = peer.last_recv  # answered in the same instant the request was received
        else:  # the peer's queue is full (or it left): the patient path, in a task of its own
            nursery.start_soon(self._send_later, peer.routing_id, out)

    async def _send_later(self, rid: bytes, frames: list[Any]) -> None:
        try:
            await self._send(rid, frames)
        except PeerGone:
            pass

    async def _serve(self, handler: Handler, req: Request) -> None:
        reply: Message
        frames: Sequence[Buffer] = ()
        peer = req.peer
        # Cancelled at the request's deadline, or at once when its session ends (see _gone).
        scope = trio.CancelScope(deadline=req.deadline)
        peer.handlers.add(scope)
        try:
            with scope:
                result = await handler(req)
                if isinstance(result, tuple):
                    reply, frames = result
                else:
                    reply = result
                reply.id = req.msg.id
                await self._send(peer.routing_id, self.catalogue.encode(reply, frames), schedule=False)
                return
            if self.peers.get(peer.routing_id) is not peer:
                return  # the session ended: nobody is waiting for an answer
            reply = Error(id=req.msg.id, code=ErrorCode.DEADLINE, reason="deadline passed")
        except RemoteError as e:
            reply = Error(id=req.msg.id, code=e.code, reason=e.reason[:4096])
        except PeerGone:
            return
        except trio.Cancelled:
            # The server is shutting down: tell the client now rather than let it time out.
            self._send_now(req.peer.routing_id, Error(id=req.msg.id, code=ErrorCode.UNAVAILABLE, reason="server stopping"))
            raise
        except Exception as e:
            event(log, 40, "handler_failed", type=req.msg.wire_name(), peer=req.peer.name, error=repr(e))
            self.stats.bad_frames["handler"] += 1
            reply = Error(id=req.msg.id, code=ErrorCode.INTERNAL, reason=f"{type(e).__name__} in handler")
        finally:
            peer.in_flight -= 1
            peer.handlers.discard(scope)
        try:
            await self._send(req.peer.routing_id, self.catalogue.encode(reply))
        except PeerGone:
            pass

    # -- sending --------------------------------------------------------------------------------------

    async def push(self, routing_id: bytes, msg: Message, payload: Sequence[Buffer] = ()) -> None:
        """Send a push to a connected client. Raises :class:`PeerGone` if it is not connected."""
        if msg.KIND not in (Kind.PUSH, Kind.SERVER_PUSH):
            raise ValueError(f"{msg.wire_name()} is not a push")
        if routing_id not in self.peers:
            raise PeerGone(f"no session for {routing_id.hex()}")
        msg.id = 0
        await self._send(routing_id, self.catalogue.encode(msg, payload))

    async def _send(self, rid: bytes, frames: list[Any], *, schedule: bool = True) -> None:
        sock = self._sock
        if sock is None:
            raise trio.ClosedResourceError("server is not running")
        # Fast path, the usual case: the peer's queue has room. The timeout scope below (a cancel
        # scope with a deadline costs several µs to enter and leave) is needed only when it has none.
        try:
            await sock.send([rid, *frames], wait=False, schedule=schedule)
        except HostUnreachable:
            peer = self.peers.get(rid)
            if peer is not None:
                self._gone(peer, "unreachable")
            raise PeerGone(f"{rid.hex()} is not connected") from None
        except WouldBlock:
            pass
        else:
            self._sent(rid)
            return
        delay = 0.001
        with trio.move_on_after(self.config.send_timeout):
            while True:
                try:
                    await sock.send([rid, *frames], wait=False)
                except HostUnreachable:
                    peer = self.peers.get(rid)
                    if peer is not None:
                        self._gone(peer, "unreachable")
                    raise PeerGone(f"{rid.hex()} is not connected") from None
                except WouldBlock:
                    # A peer whose queue is full despite its credit: back off, never spin on POLLOUT.
                    await trio.sleep(delay)
                    delay = min(delay * 2, 0.05)
                    continue
                self._sent(rid)
                return
        self.stats.dropped_sends += 1
        raise PeerGone(f"{rid.hex()} did not take a message for {self.config.send_timeout}s")

    def _send_now(self, rid: bytes, msg: Message) -> None:
        sock = self._sock
        if sock is not None and sock.try_send([rid, *self.catalogue.encode(msg)]):
            self._sent(rid)
        else:
            self.stats.dropped_sends += 1

    def _sent(self, rid: bytes) -> None:
        peer = self.peers.get(rid)
        if peer is not None:
            peer.last_send = trio.current_time()

    # -- liveness -------------------------------------------------------------------------------------

    async def _keepalive(self) -> None:
        cfg = self.config
        hb = self.catalogue.encode(Heartbeat())
        while True:
            await trio.sleep(cfg.heartbeat / 2)
            now = trio.current_time()
            silent_after = cfg.heartbeat * cfg.liveness
            for peer in list(self.peers.values()):
                if now - peer.last_recv > silent_after:
                    self._gone(peer, "silent")
                elif (
                    now - peer.last_send >= cfg.heartbeat
                    and self._sock is not None
                    and self._sock.try_send([peer.routing_id, *hb])
                ):
                    peer.last_send = now

    def _gone(self, peer: PeerSession, reason: str) -> None:
        if self.peers.get(peer.routing_id) is peer:
            del self.peers[peer.routing_id]
            for scope in peer.handlers:
                scope.cancel()
            event(log, 20, "peer_gone", peer=peer.name, session=peer.session, reason=reason)
            self._emit(PeerEvent("gone", peer, reason))

    def _emit(self, ev: PeerEvent) -> None:
        if self.on_peer_event is not None:
            try:
                self.on_peer_event(ev)
            except Exception as e:
                event(log, 40, "peer_event_handler_failed", error=repr(e))
