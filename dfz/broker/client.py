"""The client side of the fabric: one DEALER session to one server, kept alive and re-established.

Patterns (named as in the ZeroMQ guide):

* **Request/reply** with correlation ids: :meth:`Client.request` sends with a fresh ``id`` and the time
  budget left (``dl``), and waits for the reply with that ``id`` until its deadline.
* **Credit-based flow control**: at most ``max_in_flight`` requests are open (the smaller of ours and
  the server's grant). A request that the caller abandons keeps its credit until the server answers it
  (the server always answers, at the latest with ``DEADLINE``) or the session ends, so the server never
  sees more than it granted.
* **Heartbeats and liveness** (Paranoid Pirate): the client sends ``hb`` after an interval without
  sending, and declares the server gone after ``liveness`` intervals without hearing anything. Then every
  open request fails with :class:`ConnectionLost`, the socket is thrown away, and a new one connects after
  an exponential backoff with jitter, starting with ``hello`` again.
* **Server push**: pushes are delivered to the callbacks registered with :meth:`Client.on_push`, in order,
  from the receiving task; a callback must not block (hand work to a channel or a nursery).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio
import zmq

from ..log import event, get_logger
from .curve import CurveClient
from .errors import ConnectionLost, ErrorCode, ProtocolError, RemoteError, RequestTimeout
from .messages import Bye, Catalogue, Error, Heartbeat, Hello, Kind, Message, Welcome
from .socket import Buffer, Socket, WouldBlock, default_context

log = get_logger("broker.client")

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Reply:
    """A reply message and its zero-copy payload frames (``frames[i].buffer`` is a memoryview)."""

    msg: Message
    frames: list[Any]

    def expect(self, msg_type: type[M]) -> M:
        if not isinstance(self.msg, msg_type):
            raise ProtocolError(ErrorCode.UNEXPECTED, f"expected {msg_type.wire_name()}, got {self.msg.wire_name()}")
        return self.msg


@dataclass
class ClientConfig:
    heartbeat: float = 1.0
    """Seconds between heartbeats until the server's ``welcome`` says otherwise."""
    liveness: int = 3
    max_in_flight: int = 16
    hwm: int = 64
    timeout: float = 10.0
    """Default deadline of a request, waiting for a session included."""
    reconnect_min: float = 0.05
    reconnect_max: float = 5.0


@dataclass
class ClientStats:
    bad_frames: Counter[str] = field(default_factory=Counter)
    late_replies: int = 0
    sessions: int = 0
    pushes_in: int = 0


class _Pending:
    """One open request. Its task sleeps in :meth:`wait` until :meth:`wake` (reply, error, deadline or
    the session's end); cheaper than a ``trio.Event`` and a cancel scope per request, which cost as much
    as the rest of a small round trip."""

    __slots__ = ("credit", "done", "error", "reply", "task")

    def __init__(self, credit: bool) -> None:
        self.reply: Reply | None = None
        self.error: Exception | None = None
        self.credit = credit
        self.done = False
        self.task: trio.lowlevel.Task | None = None

    def wake(self) -> None:
        if not self.done:
            self.done = True
            task, self.task = self.task, None
            if task is not None:
                trio.lowlevel.reschedule(task)

    async def wait(self) -> None:
        """Sleep until woken (at once if already). Cancellable: then the request stays open."""
        if self.done:
            return

        def abort(_: object) -> trio.lowlevel.Abort:
            self.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        self.task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(abort)


class _Session:
    """State of one connection attempt: its socket and what the server granted."""

    def __init__(self, sock: Socket) -> None:
        self.sock = sock
        self.ready = trio.Event()
        self.lost = trio.Event()
        self.lost_reason = ""
        self.welcome: Welcome | None = None
        self.last_recv = trio.current_time()
        self.last_send = trio.current_time()


class Client:
    """A fabric client. Run it in a nursery (``await nursery.start(client.run)``); cancel to leave.

    ``run`` returns to ``started`` as soon as the first socket exists; requests wait for the session.
    """

    def __init__(
        self,
        catalogue: Catalogue,
        endpoint: str,
        *,
        name: str = "dfz-client",
        config: ClientConfig | None = None,
        curve: CurveClient | None = None,
        ctx: zmq.Context[Any] | None = None,
        on_state: Callable[[str], None] | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.endpoint = endpoint
        self.name = name
        self.config = config or ClientConfig()
        self.curve = curve
        self._ctx = ctx
        self.on_state = on_state
        self.stats = ClientStats()
        self._push_handlers: dict[type[Message], Callable[[Message, list[Any]], None]] = {}
        self._pending: dict[int, _Pending] = {}
        self._deadlines: list[tuple[float, int]] = []  # (deadline, id) of open requests, a heap
        self._reaper_scope: trio.CancelScope | None = None
        self._ids = itertools.count(1)
        self._credit = trio.Semaphore(self.config.max_in_flight)
        self._credit_total = self.config.max_in_flight
        self._session: _Session | None = None
        self._session_changed = trio.Event()
        self._stopped = False

    def on_push(self, msg_type: type[M], handler: Callable[[M, list[Any]], None]) -> None:
        if msg_type.KIND not in (Kind.PUSH, Kind.SERVER_PUSH):
            raise ValueError(f"{msg_type.__name__} is not a push a server may send")
        self._push_handlers[msg_type] = handler  # type: ignore[assignment]

    @property
    def connected(self) -> bool:
        s = self._session
        return s is not None and s.ready.is_set() and not s.lost.is_set()

    @property
    def welcome(self) -> Welcome | None:
        s = self._session
        return s.welcome if s is not None and s.ready.is_set() else None

    async def wait_connected(self) -> None:
        while not self.connected:
            if self._stopped:
                raise ConnectionLost("client stopped")
            await self._session_changed.wait()

    # -- lifetime -------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Client] = trio.TASK_STATUS_IGNORED) -> None:
        ctx = self._ctx or default_context()
        cfg = self.config
        failures = 0
        started = False
        try:
            while True:
                sock = Socket.create(
                    ctx,
                    zmq.DEALER,
                    hwm=cfg.hwm,
                    max_msg_size=self.catalogue.max_payload + 65536,
                    options=self.curve.socket_options() if self.curve else None,
                )
                session = _Session(sock)
                self._set_session(session)
                try:
                    sock.connect(self.endpoint)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._receive_loop, session)
                        nursery.start_soon(self._keepalive, session)
                        nursery.start_soon(self._reaper)
                        if not started:
                            started = True
                            task_status.started(self)
                        if await self._handshake(session):
                            failures = 0
                            await session.lost.wait()
                        nursery.cancel_scope.cancel()
                finally:
                    self._end_session(session, leaving=not session.lost.is_set())
                failures += 1
                delay = min(cfg.reconnect_max, cfg.reconnect_min * 2 ** min(failures - 1, 16))
                event(log, 20, "reconnect", server=self.endpoint, reason=session.lost_reason, after=f"{delay:.2f}s")
                await trio.sleep(delay * random.uniform(0.5, 1.0))
        finally:
            self._stopped = True
            self._set_session(None)

    async def _handshake(self, session: _Session) -> bool:
        hello = Hello(name=self.name, heartbeat_ms=round(self.config.heartbeat * 1000), types=self.catalogue.versions())
        budget = self.config.heartbeat * self.config.liveness
        try:
            reply = await self._call(session, hello, (), trio.current_time() + budget, credit=False)
        except (RequestTimeout, ConnectionLost, RemoteError, ProtocolError) as e:
            self._lose(session, f"handshake: {e}")
            return False
        if not isinstance(reply.msg, Welcome):
            self._lose(session, f"handshake answered with {reply.msg.wire_name()}")
            return False
        welcome = reply.msg
        session.welcome = welcome
        grant = min(self.config.max_in_flight, welcome.max_in_flight)
        if grant != self._credit_total:
            # Resize the credit: the semaphore is idle between sessions (every open request failed).
            self._credit = trio.Semaphore(grant)
            self._credit_total = grant
        self.stats.sessions += 1
        session.ready.set()
        self._notify()
        event(log, 20, "connected", server=self.endpoint, name=welcome.name, session=welcome.session)
        self._state("connected")
        return True

    def _set_session(self, session: _Session | None) -> None:
        self._session = session
        self._notify()

    def _notify(self) -> None:
        """Wake everyone in :meth:`wait_connected` to look at the session again."""
        self._session_changed.set()
        self._session_changed = trio.Event()

    def _lose(self, session: _Session, reason: str) -> None:
        if not session.lost.is_set():
            session.lost_reason = reason
            session.lost.set()

    def _end_session(self, session: _Session, *, leaving: bool) -> None:
        was_ready = session.ready.is_set()
        if leaving and was_ready:
            session.sock.try_send(self.catalogue.encode(Bye(reason="client stopped")))
        session.sock.close(linger_ms=100 if leaving else 0)
        self._lose(session, session.lost_reason or "client stopped")
        failed = ConnectionLost(f"session to {self.endpoint} ended: {session.lost_reason}")
        credit_back = 0
        for pending in self._pending.values():
            pending.error = failed
            pending.wake()
            credit_back += pending.credit
        self._pending.clear()
        self._deadlines.clear()
        for _ in range(credit_back):
            self._credit.release()
        if was_ready:
            self._state("lost")

    def _state(self, state: str) -> None:
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception as e:
                event(log, 40, "state_handler_failed", error=repr(e))

    async def push(self, msg: Message, payload: Sequence[Buffer] = ()) -> None:
        """Send a client push (no answer). Waits for a session; raises :class:`ConnectionLost` if the
        session ends before the push could be handed to the socket."""
        if msg.KIND not in (Kind.PUSH, Kind.CLIENT_PUSH):
            raise ValueError(f"{msg.wire_name()} is not a push a client may send")
        msg.id = 0
        frames = self.catalogue.encode(msg, payload)
        await self.wait_connected()
        session = self._session
        assert session is not None
        try:
            await session.sock.send(frames)
        except trio.ClosedResourceError:
            raise ConnectionLost(f"session to {self.endpoint} ended") from None
        session.last_send = trio.current_time()

    # -- requests -------------------------------------------------------------------------------------

    async def request(
        self,
        msg: Message,
        payload: Sequence[Buffer] = (),
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the deadline travels on the wire (`dl`)
    ) -> Reply:
        """Send a request and return its reply.

        Raises :class:`RequestTimeout` when no reply came within ``timeout`` (the wait for a session and
        for credit included), :class:`RemoteError` when the server answered with an error, and
        :class:`ConnectionLost` when the session ended while the request was open.
        """
        if msg.KIND is not Kind.REQUEST:
            raise ValueError(f"{msg.wire_name()} is not a request")
        # The server learns the budget too; an enclosing trio deadline counts when it is sooner.
        now = trio.current_time()
        deadline = min(now + (self.config.timeout if timeout is None else timeout), trio.current_effective_deadline())
        # Fast path: a session is up and credit is free. No cancel scope and no schedule point here:
        # _call has both (its send is a cancel point, and it blocks for the reply).
        session = self._session
        if session is not None and session.ready.is_set() and not session.lost.is_set():
            try:
                self._credit.acquire_nowait()
            except trio.WouldBlock:
                pass
            else:
                return await self._call(session, msg, payload, deadline, credit=True, now=now)
        with trio.move_on_at(deadline):
            while True:
                await self.wait_connected()
                session = self._session
                assert session is not None
                credit = self._credit
                await credit.acquire()
                if session is not self._session or session.lost.is_set():
                    credit.release()
                    continue
                return await self._call(session, msg, payload, deadline, credit=True)
        raise RequestTimeout(f"{msg.wire_name()} to {self.endpoint}: no session or credit in time")

    async def _call(
        self,
        session: _Session,
        msg: Message,
        payload: Sequence[Buffer],
        deadline: float,
        *,
        credit: bool,
        now: float | None = None,
    ) -> Reply:
        """Send ``msg`` and wait for its reply. ``now``: the current time if the caller just read it."""
        if now is None:
            now = trio.current_time()
        corr = next(self._ids)
        msg.id = corr
        remaining = deadline - now
        msg.dl = max(1, min(0xFFFF_FFFF, math.ceil(remaining * 1000))) if math.isfinite(remaining) else 0
        pending = _Pending(credit)
        frames = self.catalogue.encode(msg, payload)
        self._pending[corr] = pending
        sent = False
        try:
            try:
                # Usually there is room: no cancel scope for the deadline (the reaper keeps it).
                await session.sock.send(frames, wait=False, schedule=False)
            except WouldBlock:  # the queue is full: wait for room, until the deadline
                with trio.move_on_at(deadline):
                    await session.sock.send(frames, schedule=False)
                    sent = True
                if not sent:
                    raise RequestTimeout(f"{msg.wire_name()} to {self.endpoint}: no room to send before the deadline") from None
            sent = True
            session.last_send = now  # (or a little later when the queue was full: heartbeats don't care)
            self._watch_deadline(corr, deadline)
            await pending.wait()  # waiting for the reply is the yield
        except trio.ClosedResourceError:
            raise ConnectionLost(f"session to {self.endpoint} ended") from None
        except BaseException:
            if not sent:
                self._unsend(corr, pending)
            raise
        if pending.error is not None:
            raise pending.error
        if pending.reply is None:
            # The caller gives up. A request that left keeps its credit until the server answers it
            # (the server always does, at the latest with DEADLINE) or the session ends.
            raise RequestTimeout(f"{msg.wire_name()} to {self.endpoint}: no reply before the deadline")
        reply = pending.reply
        if isinstance(reply.msg, Error):
            raise RemoteError(reply.msg.code, reply.msg.reason)
        return reply

    def _watch_deadline(self, corr: int, deadline: float) -> None:
        """Have :meth:`_reaper` wake request ``corr`` at ``deadline`` if it is still open then."""
        if not math.isfinite(deadline):
            return
        heap = self._deadlines
        if len(heap) > 2 * len(self._pending) + 64:  # mostly answered requests: drop them (amortised O(1))
            heap[:] = [entry for entry in heap if entry[1] in self._pending]
            heapq.heapify(heap)
        heapq.heappush(heap, (deadline, corr))
        scope = self._reaper_scope
        if scope is not None and deadline < scope.deadline:
            scope.deadline = deadline

    async def _reaper(self) -> None:
        """Wake every open request whose deadline has passed: its caller raises RequestTimeout. One timer
        for all requests instead of a cancel scope per request."""
        heap = self._deadlines
        pending = self._pending
        while True:
            now = trio.current_time()
            while heap and (heap[0][0] <= now or heap[0][1] not in pending):
                _, corr = heapq.heappop(heap)
                open_request = pending.get(corr)
                if open_request is not None:
                    open_request.wake()  # no reply: the caller gives up, the request keeps its credit
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as scope:
                self._reaper_scope = scope
                await trio.sleep_forever()
            self._reaper_scope = None

    def _unsend(self, corr: int, pending: _Pending) -> None:
        """The request never left: the server will not answer it, so its credit comes back now."""
        if self._pending.pop(corr, None) is pending and pending.credit:
            self._credit.release()

    # -- receiving ------------------------------------------------------------------------------------

    async def _receive_loop(self, session: _Session) -> None:
        sock = session.sock
        try:
            while True:
                frames = await sock.recv()
                session.last_recv = trio.current_time()
                try:
                    msg, payload = self.catalogue.decode(frames)
                except ProtocolError as e:
                    self.stats.bad_frames[e.code.name.lower()] += 1
                    event(log, 30, "bad_message", server=self.endpoint, code=e.code.name, reason=e.reason)
                    continue
                self._deliver(session, msg, payload)
        except trio.ClosedResourceError:
            self._lose(session, "socket closed")

    def _deliver(self, session: _Session, msg: Message, payload: list[Any]) -> None:
        kind = msg.KIND
        if kind is Kind.REPLY and msg.id:
            if isinstance(msg, Error) and msg.code == ErrorCode.UNKNOWN_PEER:
                # The server forgot us (it restarted): this request fails and the session ends (§5.5).
                self._lose(session, "server has no session for us")
            pending = self._pending.pop(msg.id, None)
            if pending is None:
                self.stats.late_replies += 1
                return
            if pending.credit:
                self._credit.release()
            if not pending.done:
                pending.reply = Reply(msg, payload)
                pending.wake()
            return
        if isinstance(msg, Error):  # an error about no request in particular
            if msg.code == ErrorCode.UNKNOWN_PEER:
                self._lose(session, "server has no session for us")
            else:
                self.stats.bad_frames[f"server_error_{msg.code}"] += 1
                event(log, 30, "server_error", server=self.endpoint, code=msg.code, reason=msg.reason)
            return
        if isinstance(msg, Heartbeat):
            return
        if kind in (Kind.PUSH, Kind.SERVER_PUSH):
            self.stats.pushes_in += 1
            handler = self._push_handlers.get(type(msg))
            if handler is None:
                self.stats.bad_frames["unhandled_push"] += 1
                return
            try:
                handler(msg, payload)
            except Exception as e:
                event(log, 40, "push_handler_failed", type=msg.wire_name(), error=repr(e))
            return
        self.stats.bad_frames["unexpected"] += 1

    # -- liveness -------------------------------------------------------------------------------------

    async def _keepalive(self, session: _Session) -> None:
        hb = self.catalogue.encode(Heartbeat())
        while True:
            welcome = session.welcome
            interval = welcome.heartbeat_ms / 1000 if welcome else self.config.heartbeat
            liveness = welcome.liveness if welcome else self.config.liveness
            await trio.sleep(interval / 2)
            if not session.ready.is_set():
                continue  # the handshake has its own deadline
            now = trio.current_time()
            if now - session.last_recv > interval * liveness:
                self._lose(session, f"server silent for {now - session.last_recv:.1f}s")
                return
            if now - session.last_send >= interval and session.sock.try_send(hb):
                session.last_send = now
