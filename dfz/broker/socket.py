"""A trio-native wrapper around one pyzmq socket.

Rules of this file (see ../shared/MEASURED.md for the measurements behind them):

* ``ZMQ_FD`` is edge-triggered and *any* call on the socket (send, recv, reading ``EVENTS``) may consume
  the edge. So after every call we re-read ``EVENTS`` and wake exactly the waiters whose condition now
  holds: one receiver when ``POLLIN`` is set, one sender when ``POLLOUT`` is set. A woken task always
  makes its call next (nothing can cancel it between the wake-up and the call), and that call re-reads
  ``EVENTS`` in turn, so wake-ups travel down the queue of waiters like a baton.
* trio allows one task per fd in ``wait_readable``. The first waiter becomes the *fd owner* and sleeps on
  the fd; ``_refresh`` wakes it when the owner's own condition holds, with ``notify_closing(fd)`` (its
  ``wait_readable`` raises ``ClosedResourceError``, taken for a wake-up while the socket is open): a cancel
  scope around every wait costs ~5 µs, a quarter of a small round trip's CPU. Every other
  waiter parks in a ``ParkingLot`` per direction. When the owner leaves and others are still parked, one
  of them is woken to take the fd over, so there is never a parked task with nobody watching the fd.
* Cancellation: non-blocking send and recv are all-or-nothing, multipart included. An operation checks for
  cancellation before its call, and after a successful call it only passes a *shielded* checkpoint: a
  received message is never lost and a sent one is never reported as cancelled.
* Close: ``notify_closing(fd)`` before ``close()`` so that a task sleeping on the fd gets
  ``trio.ClosedResourceError``; parked tasks are woken and get the same. LINGER is always 0.
* Sockets are not thread-safe. Every call happens on the trio thread; received frames' buffers may be
  handed to threads (hashing, ``pwrite``) while the frame object is kept alive.
* A ROUTER with ``ROUTER_MANDATORY`` reports EAGAIN for *one* full peer while ``POLLOUT`` stays set if any
  other peer has room, so waiting for ``POLLOUT`` would spin. ``send(..., wait=False)`` raises
  :class:`WouldBlock` instead; the caller's protocol bounds what is in flight so this does not happen.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import sys
from collections.abc import Sequence
from typing import Any

import trio
import zmq

Buffer = bytes | bytearray | memoryview | zmq.Frame

_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
# Plain ints: pyzmq's flags are enum.Flag members, and `NOBLOCK | SNDMORE` costs ~1 µs per frame.
_EVENTS = int(zmq.EVENTS)
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_SNDMORE = int(zmq.NOBLOCK | zmq.SNDMORE)


class WouldBlock(Exception):
    """A non-waiting send found the peer's queue full (EAGAIN)."""


class HostUnreachable(Exception):
    """A ROUTER send named a peer that is not connected (EHOSTUNREACH with ``ROUTER_MANDATORY``)."""


class Socket:
    """One ZeroMQ socket driven from trio tasks.

    Any number of tasks may send and receive concurrently. Messages are whole multipart messages: a
    receiver gets all frames of one message or nothing.
    """

    __slots__ = (
        "_closed",
        "_events",
        "_fd",
        "_fresh",
        "_lots",
        "_owner_flag",
        "_owner_woken",
        "_parked",
        "_z",
        "socket_type",
    )

    def __init__(self, zsock: zmq.Socket[Any]) -> None:
        self._z = zsock
        self._fd = int(zsock.getsockopt(zmq.FD))
        self._lots: dict[int, trio.lowlevel.ParkingLot] = {
            _POLLIN: trio.lowlevel.ParkingLot(),
            _POLLOUT: trio.lowlevel.ParkingLot(),
        }
        self._owner_flag = 0
        self._owner_woken = False
        self._parked = 0  # tasks in either lot, or woken from one and not yet running: 0 => both lots empty
        self._closed = False
        self._events = 0  # EVENTS as last read by _refresh
        self._fresh = False  # no libzmq call on the socket since that read: a change since shows on the fd
        self.socket_type = int(zsock.getsockopt(zmq.TYPE))
        zsock.setsockopt(zmq.LINGER, 0)

    @classmethod
    def create(
        cls,
        ctx: zmq.Context[Any],
        socket_type: int,
        *,
        hwm: int = 16,
        max_msg_size: int = -1,
        options: dict[int, int | bytes] | None = None,
    ) -> Socket:
        """Make a socket with dfz's defaults: LINGER 0, small high-water marks, MAXMSGSIZE, and
        ``ROUTER_MANDATORY`` on a ROUTER so that no message is ever dropped silently. The first call
        also applies :func:`tune_malloc` to the process."""
        tune_malloc()
        z = ctx.socket(socket_type)
        try:
            z.setsockopt(zmq.LINGER, 0)
            z.setsockopt(zmq.SNDHWM, hwm)
            z.setsockopt(zmq.RCVHWM, hwm)
            z.setsockopt(zmq.MAXMSGSIZE, max_msg_size)
            if socket_type == zmq.ROUTER:
                z.setsockopt(zmq.ROUTER_MANDATORY, 1)
            for opt, value in (options or {}).items():
                z.setsockopt(opt, value)
        except BaseException:
            z.close(linger=0)
            raise
        return cls(z)

    @property
    def zmq_socket(self) -> zmq.Socket[Any]:
        """The underlying socket, for options and bind/connect only; never call send/recv on it."""
        return self._z

    @property
    def closed(self) -> bool:
        return self._closed

    def bind(self, endpoint: str) -> str:
        """Bind and return the resolved endpoint (a ``tcp://127.0.0.1:0`` becomes its real port)."""
        self._check_open()
        self._fresh = False
        self._z.bind(endpoint)
        return str(self._z.getsockopt_string(zmq.LAST_ENDPOINT))

    def connect(self, endpoint: str) -> None:
        self._check_open()
        self._fresh = False
        self._z.connect(endpoint)

    # -- the edge-triggered fd ------------------------------------------------------------------------

    def _refresh(self, promote: bool = True) -> int:
        """Re-read EVENTS (which may consume the fd's edge) and wake whoever can now proceed."""
        ev = self._events = int(self._z.getsockopt(_EVENTS))
        self._fresh = True
        owner = self._owner_flag
        if not self._parked:  # the usual case, one task per direction: only the owner can need waking
            if owner and ev & owner:
                self._wake_owner()
            return ev
        woke = False
        for flag in (_POLLIN, _POLLOUT):
            if ev & flag:
                if owner == flag:
                    self._wake_owner()
                    woke = True
                elif self._lots[flag]:
                    self._lots[flag].unpark()
                    woke = True
        if promote and not woke and owner == 0:
            # Nobody watches the fd and nobody was woken: promote a parked task to watch it.
            self._handoff()
        return ev

    def _wake_owner(self) -> None:
        """Wake the task sleeping on the fd: ``notify_closing`` makes its ``wait_readable`` raise
        ``ClosedResourceError``, which :meth:`_wait` takes for a wake-up while the socket is open. A
        cancel scope around every wait would do the same at ~5 µs per wait; this costs only when used."""
        if not self._owner_woken:
            self._owner_woken = True
            trio.lowlevel.notify_closing(self._fd)

    def _handoff(self) -> None:
        for lot in self._lots.values():
            if lot:
                lot.unpark()
                return

    async def _wait(self, flag: int) -> None:
        """Wait until a call for ``flag`` may succeed. Called after that call raised EAGAIN.

        Returns without a guarantee: the caller retries its call and comes back here on EAGAIN.
        Raises ``trio.Cancelled`` (nothing was consumed) or ``trio.ClosedResourceError``.
        """
        # Re-read EVENTS unless the last libzmq call was that read: then the fd's edge is intact and
        # wait_readable returns at once if anything changed since (one getsockopt and two syscalls less).
        ev = self._events if self._fresh else self._refresh(promote=False)
        if ev & flag:
            await trio.lowlevel.checkpoint()
            return
        if self._owner_flag == 0:
            self._owner_flag = flag
            self._owner_woken = False
            try:
                await trio.lowlevel.wait_readable(self._fd)
            except trio.ClosedResourceError:
                if self._closed:
                    self._owner_flag = 0
                    raise
                # Woken by _wake_owner: leave to make the call.
            except BaseException:
                # Leaving without making a call (cancelled): someone else must watch the fd.
                self._owner_flag = 0
                if not self._closed:
                    self._handoff()
                raise
            # Leaving to make a call: that call's _refresh promotes a parked task if nobody watches.
            self._owner_flag = 0
        else:
            self._parked += 1
            try:
                await self._lots[flag].park()
            finally:
                self._parked -= 1
        self._check_open()

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("socket was closed")

    # -- operations -------------------------------------------------------------------------------------

    async def send(self, frames: Sequence[Buffer], *, wait: bool = True, schedule: bool = True) -> None:
        """Send one multipart message; frames are sent zero-copy (large ones) and must not change after.

        With ``wait=False`` a full queue raises :class:`WouldBlock` instead of waiting for room. A ROUTER
        with ``ROUTER_MANDATORY`` raises :class:`HostUnreachable` for an unknown peer. Once this returns
        or is cancelled, the outcome is unambiguous: cancelled means nothing was sent.

        Always a cancel point. ``schedule=False`` skips the schedule point after a send that did not
        have to wait, for a caller that blocks right after anyway (a request about to wait for its
        reply, a handler task about to end): that yield costs a whole pass of the trio scheduler.
        """
        if not frames:
            raise ValueError("a message has at least one frame")
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        z = self._z
        last = len(frames) - 1
        waited = False
        while True:
            try:
                # libzmq queues a multipart message atomically: once its first frame is accepted the
                # rest never block, so EAGAIN can only come from the first frame.
                for i, frame in enumerate(frames):
                    z.send(frame, _NOBLOCK_SNDMORE if i < last else _NOBLOCK, copy=False)
            except zmq.Again:
                if not wait:
                    self._refresh()
                    raise WouldBlock() from None
                self._fresh = False
                await self._wait(_POLLOUT)
                waited = True
                continue
            except zmq.ZMQError as e:
                if not self._closed:
                    self._refresh()
                if e.errno == errno.EHOSTUNREACH:
                    raise HostUnreachable() from None
                if e.errno in (zmq.ENOTSOCK, zmq.ETERM):
                    raise trio.ClosedResourceError("socket was closed") from None
                raise
            self._refresh()
            if schedule and not waited:  # _wait has yielded already
                await trio.lowlevel.cancel_shielded_checkpoint()
            return

    async def recv(self) -> list[zmq.Frame]:
        """Receive one whole multipart message as zero-copy frames.

        Cancelled means nothing was received: a message taken off the socket is always returned.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        z = self._z
        waited = False
        while True:
            # Try only when the last EVENTS showed a message or the fd woke us: a failed recv costs a
            # zmq.Again exception, and _wait re-reads EVENTS before it sleeps anyway.
            if waited or self._events & _POLLIN:
                try:
                    # recv_multipart reads RCVMORE with a getsockopt per frame; Frame.more has it.
                    frame: zmq.Frame = z.recv(_NOBLOCK, copy=False)
                    frames = [frame]
                    while frame.more:  # libzmq delivers a multipart message whole: the rest is there
                        frame = z.recv(_NOBLOCK, copy=False)
                        frames.append(frame)
                except zmq.Again:
                    self._fresh = False
                except zmq.ZMQError as e:
                    if e.errno in (zmq.ENOTSOCK, zmq.ETERM):
                        raise trio.ClosedResourceError("socket was closed") from None
                    self._refresh()
                    raise
                else:
                    self._refresh()
                    if not waited:  # _wait has yielded already: one schedule point is enough
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return frames
            await self._wait(_POLLIN)
            waited = True

    def try_send(self, frames: Sequence[Buffer]) -> bool:
        """Send now if the queue has room, without yielding; False if it has none (or the peer is
        unknown to a ROUTER). For heartbeats and goodbyes, which are worth nothing late."""
        if self._closed:
            return False
        last = len(frames) - 1
        try:
            for i, frame in enumerate(frames):
                self._z.send(frame, _NOBLOCK_SNDMORE if i < last else _NOBLOCK, copy=False)
        except zmq.ZMQError:
            return False
        finally:
            self._refresh()
        return True

    def close(self, linger_ms: int = 0) -> None:
        """Close now. Tasks blocked in send or recv get ``trio.ClosedResourceError``. With the default
        LINGER of 0 unsent messages are dropped; a short linger lets a last goodbye leave."""
        if self._closed:
            return
        self._closed = True
        try:
            trio.lowlevel.notify_closing(self._fd)
        except RuntimeError:  # closed from outside trio (interpreter shutdown, sync cleanup)
            pass
        for lot in self._lots.values():
            lot.unpark_all()
        self._z.close(linger=linger_ms)

    def __enter__(self) -> Socket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_context: zmq.Context[Any] | None = None
_malloc_tuned: bool | None = None  # None: not tried yet

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MALLOC_ARENAS = 2
"""Arenas glibc may use. Each keeps up to ``trim_threshold`` of freed memory, and every worker thread
(pread, hashing, pwrite) would otherwise get an arena of its own: a seed serving 8 children held
452 MiB at its peak with glibc's default of 8 per core."""


def tune_malloc(mmap_threshold: int = 32 * 1024 * 1024, trim_threshold: int = 64 * 1024 * 1024) -> bool:
    """Keep freed piece-sized buffers in malloc's heap for reuse (glibc only; once per process).

    libzmq's I/O thread mallocs a buffer for every message it receives and the trio thread frees it
    after use. With glibc's defaults (an 8 MiB trim threshold once 4 MiB chunks have been seen), those
    frees keep shrinking the arena (madvise) and the next messages fault the pages back in: measured
    60-140 minor faults per 4 MiB piece in a dfz client and about 20% more client CPU per piece, against
    ~10 with this. Costs up to ``trim_threshold`` of retained free memory per malloc arena. Setting either
    value turns glibc's dynamic thresholds off, so both are set. Returns whether it took effect.
    """
    global _malloc_tuned
    if _malloc_tuned is not None:
        return _malloc_tuned
    _malloc_tuned = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no libc to load, or not glibc
        return False
    # mallopt returns 1 on success, 0 for a value out of range (mmap_threshold is capped at 32 MiB).
    _malloc_tuned = (
        bool(mallopt(_M_ARENA_MAX, MALLOC_ARENAS))
        and bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
        and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    )
    return _malloc_tuned


def default_context() -> zmq.Context[Any]:
    """The process-wide context for fabric sockets, with room for many sockets (the libzmq default
    refuses the 1,024th)."""
    global _context
    if _context is None or _context.closed:
        ctx: zmq.Context[Any] = zmq.Context(io_threads=1)
        ctx.set(zmq.MAX_SOCKETS, 65536)
        _context = ctx
    return _context
