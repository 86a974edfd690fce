"""The downloader: a sans-I/O piece picker, and the trio shell that fetches pieces from many parents.

Part 1, :class:`PiecePicker`, decides which piece to ask of which parent. Its rules:

* No I/O, no trio, no clock: it is told what happened (a parent's pieces, a piece done or failed, a
  parent gone) and answers with assignments ``(parent, piece)``. One owner drives it from one thread.
* A piece is assigned only to a parent that has it, only when its trusted digest is known ("ready"),
  never when it is stored, and to at most one parent at a time, except in the endgame (below).
* Each parent has a window: at most that many of its assignments are in flight.
* A piece whose fetch failed or whose parent went away goes back to the pool at once. A parent that sent
  a bad piece is blocked: it is removed and never accepted again.
* Which of the candidate pieces comes first is a strategy (:class:`RarestFirst`, the default, or
  :class:`InOrder`), a small object that only keeps the candidates in order.
* Wanted pieces first: the pieces the download's callers need before the rest (their byte ranges,
  :class:`dfz.peer.wanted.WantedPieces`, given with :meth:`PiecePicker.set_wanted`) are candidates of a
  strategy of their own, of the same kind; a parent is given the wanted pieces it has first (rarest first
  among them), then the others as usual.

Theory of operation. The picker counts, for each piece, how many parents have it (its availability).
The candidates (ready, missing, not in flight) live in the strategy. :meth:`PiecePicker.next_assignments`
visits the parents with room in their window, in turn, and asks the strategy for the best candidates each
one has. Rarest-first keeps the candidates in buckets by availability, each in random order (ties are
broken at random so that the children of one parent spread out over its pieces and can trade them);
in-order keeps them sorted by index (for streaming a file front to back). When no candidate is left that
any parent has and every missing piece is in flight, the **endgame** starts: a parent with room may also
fetch a piece already in flight elsewhere (at most two fetches of a piece), and whichever copy lands
first wins; the picker then names the parents whose fetch became redundant so that the shell cancels
them. Pieces that no parent has yet keep the endgame off: a child that keeps up with a swarm still
downloading waits at its frontier for most of the transfer, and doubling every fetch there cost a
quarter of its pieces twice (8 daemons, 512 MiB: 128-171 fetches for 128 pieces).

Part 2, :class:`Downloader` with one :class:`ParentFetcher` per parent, is the trio shell: a
:class:`dfz.broker.Client` per parent, ``peer.subscribe`` and the ``peer.have`` pushes feed the picker,
each assignment becomes a ``peer.get_piece`` request, each piece is verified against its trusted BLAKE3
digest and written (:meth:`StoredTask.write_piece`, in a worker thread), and failures move pieces to
other parents.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any, Literal, Protocol

import trio
import zmq

from ..broker import (
    Client,
    ClientConfig,
    ConnectionLost,
    CurveClient,
    ErrorCode,
    ProtocolError,
    RemoteError,
    Reply,
    RequestTimeout,
)
from ..log import event, get_logger
from ..tasks import DigestMismatch, PieceLayout, is_hex_digest
from .messages import (
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
    decode_bitmap,
)
from .ratelimit import RateLimiter
from .storage import PieceRejected, StorageError, StoredTask

log = get_logger("peer.download")

ParentId = str
"""A parent, as its owner names it (the downloader uses the piece server's endpoint)."""


# === Part 1: the piece picker (sans-I/O) ================================================================


class FailureKind(StrEnum):
    """Why a fetch failed, which decides what the picker does with the piece and the parent."""

    MISSING = "missing"
    """The parent does not have the piece (any more): it is marked as lacking it; others may serve it."""
    TRANSIENT = "transient"
    """A timeout, a busy or lost connection: the piece goes back to the pool, the parent stays."""
    BAD = "bad"
    """The parent sent wrong bytes (digest, size, or a protocol violation): it is blocked."""


class PickStrategy(Protocol):
    """Keeps the candidate pieces in the order they should be fetched.

    The picker tells it which pieces are candidates, with their availability, and asks it for the best
    ones a parent has. ``holds`` is the set of pieces the parent has, or None when it has them all.
    ``pick`` does not remove what it returns (the picker does, as the pieces go in flight)."""

    name: str
    randomize: bool
    """Whether the picker should hand over batches in random order (ties broken at random)."""

    def add(self, piece: int, availability: int) -> None: ...

    def remove(self, piece: int, availability: int) -> None: ...

    def move(self, piece: int, old: int, new: int) -> None: ...

    def pick(self, holds: AbstractSet[int] | None, n: int) -> list[int]: ...


class _Bucket:
    """A set of pieces with O(1) add, remove and random access (a list and each piece's index in it)."""

    __slots__ = ("items", "pos")

    def __init__(self) -> None:
        self.items: list[int] = []
        self.pos: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def add(self, piece: int) -> None:
        self.pos[piece] = len(self.items)
        self.items.append(piece)

    def remove(self, piece: int) -> None:
        i = self.pos.pop(piece)
        last = self.items.pop()
        if last != piece:
            self.items[i] = last
            self.pos[last] = i


class RarestFirst:
    """The candidates held by the fewest parents first; among equally rare ones, a random choice.

    Random, not in order of arrival: a seed announces pieces in the order it gets them from the origin,
    and children that all took the oldest rarest piece asked the seed for the same pieces at the same
    time and had nothing to trade (with the seed's upload limited, 61 of 64 pieces per child came from
    the seed, bench_swarm --heterogeneous --seed-upload-rate). Picking for a parent that has everything
    costs O(1) a piece."""

    name = "rarest_first"
    randomize = True

    def __init__(self, rng: random.Random | None = None) -> None:
        self._buckets: list[_Bucket] = []  # by availability
        self.rng = rng or random.Random()

    def add(self, piece: int, availability: int) -> None:
        while len(self._buckets) <= availability:
            self._buckets.append(_Bucket())
        self._buckets[availability].add(piece)

    def remove(self, piece: int, availability: int) -> None:
        self._buckets[availability].remove(piece)

    def move(self, piece: int, old: int, new: int) -> None:
        self.remove(piece, old)
        self.add(piece, new)

    def pick(self, holds: AbstractSet[int] | None, n: int) -> list[int]:
        out: list[int] = []
        rng = self.rng
        for bucket in self._buckets[1:]:  # availability 0: nobody has it
            size = len(bucket)
            if not size:
                continue
            need = n - len(out)
            found: list[int] | None
            if holds is None:
                found = bucket.items
            elif len(holds) < size:
                pos = bucket.pos
                found = [p for p in holds if p in pos]
            else:
                found = None
            if found is not None:
                if len(found) <= need:
                    out.extend(found)
                else:
                    out.extend(rng.sample(found, need))
                    return out
            else:
                # Scan the bucket from a random place for pieces the parent holds (it holds at least as
                # many pieces as the bucket has, so the scan seldom goes far).
                items = bucket.items
                start = rng.randrange(size)
                for k in range(size):
                    piece = items[(start + k) % size]
                    if piece in holds:  # type: ignore[operator]
                        out.append(piece)
                        if len(out) >= n:
                            return out
            if len(out) >= n:
                return out
        return out


class InOrder:
    """The candidates by increasing index, whoever has them (to stream a file from its start).

    A byte per piece and a cursor below which there is no candidate: the scan for the next one runs in
    C (``bytearray.find``), and adding or removing a candidate is O(1)."""

    name = "in_order"
    randomize = False

    def __init__(self) -> None:
        self._flags = bytearray()
        self._low = 0  # no candidate below this index

    def add(self, piece: int, availability: int) -> None:
        if piece >= len(self._flags):
            self._flags.extend(bytes(piece + 1 - len(self._flags)))
        self._flags[piece] = 1
        self._low = min(self._low, piece)

    def remove(self, piece: int, availability: int) -> None:
        self._flags[piece] = 0

    def move(self, piece: int, old: int, new: int) -> None:
        pass

    def pick(self, holds: AbstractSet[int] | None, n: int) -> list[int]:
        out: list[int] = []
        flags = self._flags
        piece = flags.find(1, self._low)
        self._low = piece if piece >= 0 else len(flags)
        while piece >= 0 and len(out) < n:
            if holds is None or piece in holds:
                out.append(piece)
            piece = flags.find(1, piece + 1)
        return out


STRATEGIES: dict[str, Callable[[], PickStrategy]] = {"rarest_first": RarestFirst, "in_order": InOrder}

MAX_FETCHES_PER_PIECE = 2
"""In the endgame, a piece is fetched from at most this many parents at once."""


@dataclass(eq=False)
class _Parent:
    id: ParentId
    window: int
    has: set[int] = field(default_factory=set)
    has_all: bool = False
    in_flight: set[int] = field(default_factory=set)

    def holds(self, piece: int) -> bool:
        return self.has_all or piece in self.has


class PiecePicker:
    """Which piece to fetch from which parent (see the module docstring for its rules).

    ``ready`` lists the pieces whose trusted digest is known (None: all of them); more become ready with
    :meth:`set_ready`. ``window`` is the default number of requests in flight per parent. ``rng`` breaks
    ties (inject a seeded one for reproducible tests).
    """

    def __init__(
        self,
        piece_count: int,
        *,
        stored: Iterable[int] = (),
        ready: Iterable[int] | None = None,
        window: int = 4,
        strategy: PickStrategy | None = None,
        endgame: bool = True,
        rng: random.Random | None = None,
        wanted: Iterable[int] = (),
    ) -> None:
        if piece_count < 0 or window < 1:
            raise ValueError("piece_count must be >= 0 and window >= 1")
        self.piece_count = piece_count
        self.window = window
        self.endgame = endgame
        self.rng = rng or random.Random()
        self.strategy: PickStrategy = strategy if strategy is not None else RarestFirst(self.rng)
        # The wanted candidates, in a strategy of the same kind (picked from before self.strategy).
        self.first: PickStrategy = InOrder() if isinstance(self.strategy, InOrder) else RarestFirst(self.rng)
        self._wanted = bytearray(piece_count)
        self._wanted_set: set[int] = set()
        for piece in wanted:
            self._check(piece)
            self._wanted[piece] = 1
            self._wanted_set.add(piece)
        self.blocked: set[ParentId] = set()
        self._parents: dict[ParentId, _Parent] = {}
        self._stored = bytearray(piece_count)
        self._ready = bytearray(b"\x01" * piece_count if ready is None else piece_count)
        self._candidate = bytearray(piece_count)
        self._avail = [0] * piece_count
        self._in_flight: dict[int, set[ParentId]] = {}  # piece -> parents fetching it, oldest piece first
        self._held_candidates = 0  # candidates that at least one parent has
        self._missing = piece_count
        self._turn = 0
        for piece in stored:
            self._check(piece)
            if not self._stored[piece]:
                self._stored[piece] = 1
                self._missing -= 1
        if ready is not None:
            for piece in ready:
                self._check(piece)
                self._ready[piece] = 1
        for piece in self._shuffled(range(piece_count)):
            self._update(piece)

    # -- queries --

    @property
    def done(self) -> bool:
        """Every piece is stored."""
        return self._missing == 0

    @property
    def missing(self) -> int:
        return self._missing

    @property
    def parents(self) -> list[ParentId]:
        return list(self._parents)

    def has_parent(self, parent: ParentId) -> bool:
        return parent in self._parents

    def is_stored(self, piece: int) -> bool:
        return bool(self._stored[piece])

    def is_ready(self, piece: int) -> bool:
        return bool(self._ready[piece])

    def availability(self, piece: int) -> int:
        return self._avail[piece]

    def in_flight(self, parent: ParentId | None = None) -> frozenset[int]:
        """Pieces in flight from ``parent``, or from anyone."""
        if parent is None:
            return frozenset(self._in_flight)
        p = self._parents.get(parent)
        return frozenset(p.in_flight) if p is not None else frozenset()

    def fetching(self, parent: ParentId, piece: int) -> bool:
        return parent in self._in_flight.get(piece, ())

    def fetchers(self, piece: int) -> frozenset[ParentId]:
        """The parents fetching ``piece`` now (two at most, in the endgame)."""
        return frozenset(self._in_flight.get(piece, ()))

    def window_of(self, parent: ParentId) -> int:
        return self._parents[parent].window

    @property
    def wanted(self) -> frozenset[int]:
        """The pieces to fetch before the others (see :meth:`set_wanted`)."""
        return frozenset(self._wanted_set)

    # -- internals --

    def _check(self, piece: int) -> None:
        if not 0 <= piece < self.piece_count:
            raise IndexError(f"piece {piece} out of range: the task has {self.piece_count} pieces")

    def _held_candidate(self, piece: int) -> bool:
        return bool(self._candidate[piece]) and self._avail[piece] > 0

    def _strategy_of(self, piece: int) -> PickStrategy:
        return self.first if self._wanted[piece] else self.strategy

    def _update(self, piece: int) -> None:
        """Put the piece in the strategy or take it out, as its state now says."""
        want = not self._stored[piece] and self._ready[piece] and piece not in self._in_flight
        if want == bool(self._candidate[piece]):
            return
        before = self._held_candidate(piece)
        if want:
            self._strategy_of(piece).add(piece, self._avail[piece])
        else:
            self._strategy_of(piece).remove(piece, self._avail[piece])
        self._candidate[piece] = want
        self._held_candidates += self._held_candidate(piece) - before

    def _set_avail(self, piece: int, value: int) -> None:
        old = self._avail[piece]
        before = self._held_candidate(piece)
        self._avail[piece] = value
        if self._candidate[piece]:
            self._strategy_of(piece).move(piece, old, value)
        self._held_candidates += self._held_candidate(piece) - before

    def _shuffled(self, pieces: Iterable[int]) -> list[int]:
        # A batch of availability changes (a bitmap, a `have`) arrives in index order; shuffled, it leaves
        # the rarest-first buckets in random order, so children do not all start at the same piece.
        batch = list(pieces)
        if self.strategy.randomize:
            self.rng.shuffle(batch)
        return batch

    def _stop_fetch(self, parent: _Parent, piece: int) -> None:
        parent.in_flight.discard(piece)
        fetchers = self._in_flight.get(piece)
        if fetchers is not None:
            fetchers.discard(parent.id)
            if not fetchers:
                del self._in_flight[piece]
                self._update(piece)

    # -- parents --

    def add_parent(self, parent: ParentId, *, window: int | None = None) -> bool:
        """Start using ``parent`` (it has no pieces until told); False if it is blocked. Adding a present
        parent only changes its window."""
        if parent in self.blocked:
            return False
        w = window if window is not None else self.window
        if w < 1:
            raise ValueError("a window is at least 1")
        p = self._parents.get(parent)
        if p is None:
            self._parents[parent] = _Parent(parent, w)
        else:
            p.window = w
        return True

    def remove_parent(self, parent: ParentId) -> list[int]:
        """Stop using ``parent``; return its pieces that were in flight (now back in the pool unless
        another parent is fetching them too). Unknown parents are ignored."""
        p = self._parents.pop(parent, None)
        if p is None:
            return []
        freed = sorted(p.in_flight)
        for piece in freed:
            self._stop_fetch(p, piece)
        for piece in range(self.piece_count) if p.has_all else p.has:
            self._set_avail(piece, self._avail[piece] - 1)
        return freed

    def block_parent(self, parent: ParentId) -> list[int]:
        """Remove ``parent`` for good (it sent a bad piece); :meth:`add_parent` refuses it from now on."""
        self.blocked.add(parent)
        return self.remove_parent(parent)

    def parent_has(self, parent: ParentId, pieces: Iterable[int]) -> None:
        """``parent`` has these pieces (from its bitmap or a ``peer.have``)."""
        p = self._parents[parent]
        if p.has_all:
            return
        for piece in self._shuffled(pieces):
            self._check(piece)
            if piece not in p.has:
                p.has.add(piece)
                self._set_avail(piece, self._avail[piece] + 1)
        if len(p.has) == self.piece_count:
            p.has_all = True
            p.has = set()

    def parent_has_all(self, parent: ParentId) -> None:
        """``parent`` has every piece (its task succeeded)."""
        p = self._parents[parent]
        if p.has_all:
            return
        for piece in self._shuffled(i for i in range(self.piece_count) if i not in p.has):
            self._set_avail(piece, self._avail[piece] + 1)
        p.has_all = True
        p.has = set()

    def parent_lacks(self, parent: ParentId, piece: int) -> None:
        """``parent`` does not have ``piece`` after all (it answered ``PIECE_MISSING``)."""
        self._check(piece)
        p = self._parents.get(parent)
        if p is None or not p.holds(piece):
            return
        if p.has_all:
            p.has_all = False
            p.has = set(range(self.piece_count))
        p.has.discard(piece)
        self._set_avail(piece, self._avail[piece] - 1)

    def set_window(self, parent: ParentId, window: int) -> None:
        if window < 1:
            raise ValueError("a window is at least 1")
        self._parents[parent].window = window

    # -- pieces --

    def set_ready(self, pieces: Iterable[int]) -> None:
        """The trusted digests of these pieces are known: they may be fetched."""
        for piece in pieces:
            self._check(piece)
            if not self._ready[piece]:
                self._ready[piece] = 1
                self._update(piece)

    def set_wanted(self, pieces: Iterable[int]) -> None:
        """Fetch these pieces before the others (the union of the callers' ranges; it replaces the
        previous set). Pieces stored or in flight stay as they are."""
        new = set(pieces)
        for piece in new:
            self._check(piece)
        for piece in self._shuffled(new ^ self._wanted_set):
            avail = self._avail[piece]
            if self._candidate[piece]:
                self._strategy_of(piece).remove(piece, avail)
            self._wanted[piece] = piece in new
            if self._candidate[piece]:
                self._strategy_of(piece).add(piece, avail)
        self._wanted_set = new

    def next_assignments(self) -> list[tuple[ParentId, int]]:
        """Fill every parent's window; return the new ``(parent, piece)`` fetches (now in flight)."""
        out: list[tuple[ParentId, int]] = []
        parents = list(self._parents.values())
        if not parents or self.done:
            return out
        start = self._turn % len(parents)
        self._turn += 1
        for p in parents[start:] + parents[:start]:
            free = p.window - len(p.in_flight)
            if free <= 0:
                continue
            picks: list[int] = []
            if self._held_candidates:
                holds = None if p.has_all else p.has
                if self._wanted_set:
                    picks = self.first.pick(holds, free)
                if len(picks) < free:
                    picks += self.strategy.pick(holds, free - len(picks))
            self._start(p, picks, out)
            free -= len(picks)
            if free > 0 and self.endgame and self._missing == len(self._in_flight):
                self._start(p, self._endgame_picks(p, free), out)
        return out

    def _start(self, p: _Parent, pieces: list[int], out: list[tuple[ParentId, int]]) -> None:
        for piece in pieces:
            p.in_flight.add(piece)
            self._in_flight.setdefault(piece, set()).add(p.id)
            self._update(piece)
            out.append((p.id, piece))

    def _endgame_picks(self, p: _Parent, n: int) -> list[int]:
        picks: list[int] = []
        # the longest in flight first; wanted pieces before the others
        flights: Iterable[tuple[int, set[ParentId]]] = self._in_flight.items()
        if self._wanted_set:
            flights = sorted(flights, key=lambda item: not self._wanted[item[0]])
        for piece, fetchers in flights:
            if len(fetchers) < MAX_FETCHES_PER_PIECE and p.id not in fetchers and p.holds(piece):
                picks.append(piece)
                if len(picks) >= n:
                    break
        return picks

    def piece_done(self, parent: ParentId | None, piece: int) -> list[ParentId]:
        """``piece`` is verified and stored (``parent`` None: it was there already). Returns the other
        parents still fetching it (endgame): their fetches are redundant and should be cancelled."""
        self._check(piece)
        fetchers = self._in_flight.pop(piece, set())
        for other in fetchers:
            op = self._parents.get(other)
            if op is not None:
                op.in_flight.discard(piece)
        if not self._stored[piece]:
            self._stored[piece] = 1
            self._missing -= 1
        self._update(piece)
        return sorted(f for f in fetchers if f != parent)

    def piece_failed(self, parent: ParentId, piece: int, kind: FailureKind) -> list[int]:
        """A fetch of ``piece`` from ``parent`` failed. Returns the pieces that went back to the pool
        (more than one when the parent is blocked for a bad piece)."""
        self._check(piece)
        p = self._parents.get(parent)
        freed: list[int] = []
        if p is not None and piece in p.in_flight:
            self._stop_fetch(p, piece)
            if piece not in self._in_flight:
                freed.append(piece)
        if kind is FailureKind.MISSING:
            self.parent_lacks(parent, piece)
        elif kind is FailureKind.BAD:
            freed += self.block_parent(parent)
        return freed


# === Part 2: the trio shell ==============================================================================


@dataclass
class DownloaderConfig:
    window: int = 4
    """Requests in flight per parent (capped by the credit the parent's piece server grants)."""
    strategy: Literal["rarest_first", "in_order"] = "rarest_first"
    endgame: bool = True
    piece_timeout: float = 60.0
    """Seconds a ``peer.get_piece`` may take (it travels to the parent as the request's deadline)."""
    stall_timeout: float = 20.0
    """A parent with requests out that answers none of them for this long is dropped as stalled."""
    subscribe_timeout: float = 5.0
    subscribe_attempts: int = 3
    """Failed subscriptions in a row (unknown task, timeout, lost connection) before a parent is dropped."""
    busy_retry: float = 0.5
    """Seconds before subscribing again to a parent without a free upload slot (doubles each time)."""
    busy_retry_max: float = 8.0
    max_transient_failures: int = 5
    """Failed fetches in a row (timeouts, errors) before a parent is dropped."""
    rate_limit: int = 0
    """Download rate limit in bytes per second over all parents; 0 = unlimited."""
    rate_burst: int | None = None
    client: ClientConfig = field(default_factory=ClientConfig)
    """Heartbeats, liveness and reconnection of each parent session."""

    def __post_init__(self) -> None:
        if self.window < 1 or self.subscribe_attempts < 1 or self.max_transient_failures < 1:
            raise ValueError("window, subscribe_attempts and max_transient_failures must be at least 1")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown piece strategy {self.strategy!r}: use one of {', '.join(STRATEGIES)}")


@dataclass(frozen=True, slots=True)
class PieceDone:
    """A piece verified against its trusted digest and stored."""

    piece: int
    digest: str
    size: int
    cost: float
    """Seconds from sending the request to receiving the piece (rate-limit waits, hashing and writing
    excluded): what the scheduler weighs the parent by."""
    parent: ParentId


@dataclass(frozen=True, slots=True)
class PieceFailure:
    piece: int
    parent: ParentId
    kind: FailureKind
    reason: str


class _Outcome(Enum):
    ATTACHED = "attached"
    BUSY = "busy"
    RETRY = "retry"
    LOST = "lost"


class _BadPiece(Exception):
    """The parent's answer is not the piece asked for (wrong task, index, size or encoding)."""


class ParentFetcher:
    """One parent of a :class:`Downloader`: its client session, subscription and piece requests.

    Started and stopped by the downloader. It subscribes (retrying while the parent has no free upload
    slot), then keeps fetching what the picker assigns it; when the session is lost it takes itself out
    of the picker (its pieces go elsewhere) and subscribes again once the client has reconnected. It
    drops the parent for good (``on_parent_lost``) when the parent dropped the task, does not know it
    after a few tries, stalls, fails too often, or sent a bad piece (which also blocks it).
    """

    def __init__(self, downloader: Downloader, endpoint: ParentId) -> None:
        self.downloader = downloader
        self.endpoint = endpoint
        self.client: Client | None = None
        self.attached = False
        self.lost_reason: str | None = None
        self.pieces = 0
        self.bytes = 0
        self._scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._requests: dict[int, trio.CancelScope] = {}
        self._early: set[int] = set()  # announced before the subscription was answered
        self._early_all = False
        self._session_lost = trio.Event()
        self._on_wire = 0
        self._last_activity = 0.0
        self._failures = 0

    # -- lifetime --

    async def run(self) -> None:
        dl = self.downloader
        cfg = dl.config
        with self._scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                client = self.client = Client(
                    PEER_CATALOGUE,
                    self.endpoint,
                    name=dl.name,
                    config=cfg.client,
                    curve=dl.curve,
                    ctx=dl.ctx,
                    on_state=self._on_state,
                )
                client.on_push(Have, self._on_have)
                client.on_push(TaskState, self._on_task_state)
                await nursery.start(client.run)
                nursery.start_soon(self._watchdog)
                await self._follow()

    def stop(self) -> None:
        """Leave the parent (the downloader's decision): its pieces go back to the pool."""
        self._detach()
        self._scope.cancel()

    async def _follow(self) -> None:
        cfg = self.downloader.config
        attempts = 0
        busy_delay = cfg.busy_retry
        while True:
            self._session_lost = trio.Event()
            outcome = await self._subscribe()
            if outcome is _Outcome.ATTACHED:
                attempts = 0
                busy_delay = cfg.busy_retry
                await self._session_lost.wait()
                self._detach()
            elif outcome is _Outcome.BUSY:
                await trio.sleep(busy_delay * random.uniform(0.5, 1.0))
                busy_delay = min(busy_delay * 2, cfg.busy_retry_max)
            elif outcome is _Outcome.RETRY:
                attempts += 1
                if attempts >= cfg.subscribe_attempts:
                    self._lose(f"no subscription after {attempts} attempts")
                    return
                await trio.sleep(min(cfg.busy_retry_max, cfg.busy_retry * 2 ** (attempts - 1)) * random.uniform(0.5, 1.0))
            else:
                return

    def _lose(self, reason: str) -> None:
        """Give up on this parent (it may be added again by the owner unless it is blocked)."""
        if self.lost_reason is not None:
            return
        self.lost_reason = reason
        self._detach()
        self._scope.cancel()
        self.downloader._parent_lost(self, reason)

    def _detach(self) -> None:
        """Take the parent out of the picker: its pieces in flight go elsewhere."""
        if self.attached:
            self.attached = False
            self.downloader.picker.remove_parent(self.endpoint)
        for scope in self._requests.values():
            scope.cancel()
        self.downloader._pump()

    # -- subscription --

    async def _subscribe(self) -> _Outcome:
        dl = self.downloader
        client = self.client
        assert client is not None
        self._early.clear()
        self._early_all = False
        try:
            ticket, host_id = dl.ticket() if dl.ticket is not None else (b"", "")
            subscribe = Subscribe(task_id=dl.task_id, ticket=ticket, host_id=host_id if ticket else "")
            reply = await client.request(subscribe, timeout=dl.config.subscribe_timeout)
        except RemoteError as e:
            if e.code == PeerErrorCode.NO_UPLOAD_SLOT:
                dl.stats.busy_parents += 1
                return _Outcome.BUSY
            if e.code == PeerErrorCode.TASK_DROPPED:
                self._lose(f"the parent dropped the task: {e.reason}")
                return _Outcome.LOST
            if e.code in (PeerErrorCode.UNKNOWN_TASK, ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE, ErrorCode.INTERNAL):
                return _Outcome.RETRY
            self._lose(f"subscription refused: {e}")
            return _Outcome.LOST
        except (RequestTimeout, ConnectionLost):
            return _Outcome.RETRY
        try:
            msg = reply.expect(Subscribed)
            pieces = self._check_subscription(msg, reply)
        except (ProtocolError, ValueError) as e:
            self._lose(f"bad subscription reply: {e}")
            return _Outcome.LOST
        welcome = client.welcome
        credit = welcome.max_in_flight if welcome is not None else dl.config.window
        picker = dl.picker
        if not picker.add_parent(self.endpoint, window=max(1, min(dl.config.window, credit))):
            self._lose("blocked")
            return _Outcome.LOST
        self.attached = True
        if msg.finished or self._early_all:
            picker.parent_has_all(self.endpoint)
        else:
            picker.parent_has(self.endpoint, [*pieces, *self._early])
        self._early.clear()
        event(log, logging.DEBUG, "download.subscribed", task=dl.task_id, parent=self.endpoint, pieces=len(pieces))
        dl._pump()
        return _Outcome.ATTACHED

    def _check_subscription(self, msg: Subscribed, reply: Reply) -> list[int]:
        layout = self.downloader.layout
        if msg.task_id != self.downloader.task_id:
            raise ValueError(f"answer about task {msg.task_id}")
        if msg.piece_length != layout.piece_length:
            raise ValueError(f"piece length {msg.piece_length}, expected {layout.piece_length}")
        if msg.content_length is not None and msg.content_length != layout.content_length:
            raise ValueError(f"content length {msg.content_length}, expected {layout.content_length}")
        if msg.piece_count is not None and msg.piece_count != layout.count:
            raise ValueError(f"{msg.piece_count} pieces, expected {layout.count}")
        bits = reply.frames[0].buffer
        if msg.content_length is not None:
            return decode_bitmap(bits, layout.count)
        # A parent still streaming from an origin without a length: its bitmap may be shorter.
        if len(bits) > (layout.count + 7) // 8:
            raise ValueError(f"a bitmap of {len(bits)} bytes for {layout.count} pieces")
        pieces = decode_bitmap(bits, 8 * len(bits))
        if pieces and pieces[-1] >= layout.count:
            raise ValueError(f"piece {pieces[-1]} is beyond the content")
        return pieces

    def _on_state(self, state: str) -> None:
        if state == "lost":
            self._session_lost.set()

    def _on_have(self, msg: Have, payload: list[Any]) -> None:
        dl = self.downloader
        if msg.task_id != dl.task_id:
            return
        pieces = [p for p in msg.pieces if p < dl.layout.count]
        if self.attached:
            dl.picker.parent_has(self.endpoint, pieces)
            dl._pump()
        else:
            self._early.update(pieces)

    def _on_task_state(self, msg: TaskState, payload: list[Any]) -> None:
        dl = self.downloader
        if msg.task_id != dl.task_id:
            return
        if msg.state == TaskStatus.DROPPED:
            self._lose(f"the parent dropped the task: {msg.reason}")
        elif msg.state == TaskStatus.SUCCEEDED:
            if self.attached:
                dl.picker.parent_has_all(self.endpoint)
                dl._pump()
            else:
                self._early_all = True

    # -- pieces --

    def start_fetch(self, piece: int) -> None:
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._requests[piece] = scope
        self._nursery.start_soon(self._fetch, piece, scope)

    def cancel_fetch(self, piece: int) -> None:
        scope = self._requests.get(piece)
        if scope is not None:
            scope.cancel()

    async def _fetch(self, piece: int, scope: trio.CancelScope) -> None:
        dl = self.downloader
        size = dl.layout.size(piece)
        session_lost = self._session_lost  # of this subscription: a late failure must not end the next one
        failure: tuple[FailureKind, str] | None = None
        try:
            with scope:
                await dl.limiter.acquire(size)
                sent = trio.current_time()
                reply = await self._request(piece)
                cost = trio.current_time() - sent
                data = self._piece_of(reply, piece, size)
                digest = dl.digests[piece]
                # Not cancellable from here: the piece is written and accounted for, or it is not.
                with trio.CancelScope(shield=True):
                    write = functools.partial(dl.task.write_piece, piece, data, expected_digest=digest, retain=True)
                    await trio.to_thread.run_sync(write)
                    self._failures = 0
                    self.pieces += 1
                    self.bytes += size
                    event(log, logging.DEBUG, "download.piece", task=dl.task_id, piece=piece, parent=self.endpoint, cost=cost)
                    dl._piece_done(self, PieceDone(piece, digest, size, cost, self.endpoint))
                return
        except (_BadPiece, ProtocolError, DigestMismatch, PieceRejected) as e:
            failure = (FailureKind.BAD, str(e))
        except RemoteError as e:
            failure = self._remote_failure(e, session_lost)
        except RequestTimeout as e:  # (a TimeoutError, so an OSError: before the clause for the storage)
            failure = self._transient(str(e))
        except ConnectionLost as e:
            session_lost.set()
            failure = (FailureKind.TRANSIENT, str(e))
        except (StorageError, OSError) as e:
            dl._abort(e)  # our own storage failed (deleted, disk full): no parent is to blame
            return
        finally:
            if self._requests.get(piece) is scope:
                del self._requests[piece]
        if failure is None:  # cancelled: the one who cancelled has put the piece back
            dl._piece_abandoned(self, piece)
            return
        dl._piece_failed(self, PieceFailure(piece, self.endpoint, *failure))

    async def _request(self, piece: int) -> Reply:
        dl = self.downloader
        client = self.client
        assert client is not None
        now = trio.current_time()
        if self._on_wire == 0:
            self._last_activity = now
        self._on_wire += 1
        try:
            return await client.request(GetPiece(task_id=dl.task_id, piece=piece, accept=[RAW]), timeout=dl.config.piece_timeout)
        finally:
            self._on_wire -= 1
            self._last_activity = trio.current_time()

    def _piece_of(self, reply: Reply, piece: int, size: int) -> memoryview:
        msg = reply.expect(PieceData)
        if msg.task_id != self.downloader.task_id or msg.piece != piece:
            raise _BadPiece(f"asked for piece {piece}, got piece {msg.piece} of task {msg.task_id}")
        if msg.encoding != RAW:
            raise _BadPiece(f"piece {piece} in encoding {msg.encoding!r}, which was not accepted")
        data: memoryview = reply.frames[0].buffer
        if msg.size != size or len(data) != size:
            raise _BadPiece(f"piece {piece} has {len(data)} bytes (says {msg.size}), expected {size}")
        return data

    def _remote_failure(self, e: RemoteError, session_lost: trio.Event) -> tuple[FailureKind, str]:
        code = e.code
        if code == PeerErrorCode.PIECE_MISSING:
            return (FailureKind.MISSING, str(e))
        if code in (PeerErrorCode.UNKNOWN_TASK, PeerErrorCode.TASK_DROPPED):
            self._lose(f"the parent does not serve the task any more: {e.reason}")
        elif code in (PeerErrorCode.NOT_SUBSCRIBED, ErrorCode.UNAVAILABLE):
            session_lost.set()  # subscribe again (the parent restarted, or is stopping)
        else:
            return self._transient(str(e))
        return (FailureKind.TRANSIENT, str(e))

    def _transient(self, reason: str) -> tuple[FailureKind, str]:
        self._failures += 1
        if self._failures >= self.downloader.config.max_transient_failures:
            self._lose(f"{self._failures} failed requests in a row, the last: {reason}")
        return (FailureKind.TRANSIENT, reason)

    async def _watchdog(self) -> None:
        timeout = self.downloader.config.stall_timeout
        while True:
            await trio.sleep(timeout / 4)
            idle = trio.current_time() - self._last_activity
            if self._on_wire and idle > timeout:
                self.downloader.stats.stalled_parents += 1
                self._lose(f"stalled: no answer for {idle:.1f}s with {self._on_wire} requests out")
                return


@dataclass
class DownloaderStats:
    pieces: int = 0
    bytes: int = 0
    failures: int = 0
    bad_pieces: int = 0
    busy_parents: int = 0
    """Subscriptions answered ``NO_UPLOAD_SLOT``."""
    stalled_parents: int = 0
    lost_parents: int = 0


class Downloader:
    """Fetches the missing pieces of one task from a changing set of parents, until every piece is stored.

    ``task`` is the task in the local storage (created by the owner with ``layout``); ``digests`` are the
    trusted piece digests known so far (more come with :meth:`add_digests`, as the scheduler forwards
    them; a piece is fetched only once its digest is known). Parents are piece-server endpoints, given
    now or at any time with :meth:`add_parent`, :meth:`remove_parent` or :meth:`set_parents`.

    Run it in a nursery: ``await nursery.start(downloader.run)``; ``run`` returns when every piece is
    stored (the owner then finishes the task). It raises what no parent can fix: the storage's error
    (:class:`~dfz.peer.storage.TaskClosed` when the task was deleted meanwhile, ``OSError`` for a full
    disk), and errors of the callbacks. Network failures never escape: they move pieces to other
    parents. With no parent, or none that has the missing pieces, it waits; the owner bounds it with a
    deadline (or cancels it).

    ``ticket()`` gives the tenant ticket and host id each subscription carries (the daemon's current ones).

    Callbacks, synchronous, from the trio thread: ``on_piece(PieceDone)`` after each stored piece (to
    announce it and report it to the scheduler), ``on_piece_failed(PieceFailure)`` after each failed
    fetch, ``on_parent_lost(parent, reason)`` when a parent is given up (it may be added again) or blocked
    (:attr:`blocked`; it will not be).
    """

    def __init__(
        self,
        task: StoredTask,
        layout: PieceLayout,
        *,
        digests: Mapping[int, str] | None = None,
        parents: Iterable[ParentId] = (),
        config: DownloaderConfig | None = None,
        on_piece: Callable[[PieceDone], None] | None = None,
        on_piece_failed: Callable[[PieceFailure], None] | None = None,
        on_parent_lost: Callable[[ParentId, str], None] | None = None,
        limiter: RateLimiter | None = None,
        name: str = "dfz-downloader",
        curve: CurveClient | None = None,
        ctx: zmq.Context[Any] | None = None,
        rng: random.Random | None = None,
        ticket: Callable[[], tuple[bytes, str]] | None = None,
    ) -> None:
        if task.piece_length != layout.piece_length:
            raise ValueError(f"the task has piece length {task.piece_length}, the layout {layout.piece_length}")
        self.task = task
        self.task_id = task.task_id
        self.layout = layout
        self.config = config or DownloaderConfig()
        self.name = name
        self.curve = curve
        self.ctx = ctx
        self.on_piece = on_piece
        self.on_piece_failed = on_piece_failed
        self.on_parent_lost = on_parent_lost
        self.ticket = ticket
        """The daemon's tenant ticket and host id now (``peer.subscribe`` shows them to each parent); None: no tenant."""
        self.limiter = limiter or RateLimiter(self.config.rate_limit, self.config.rate_burst)
        self.stats = DownloaderStats()
        self.digests: dict[int, str] = {}
        self.picker = PiecePicker(
            layout.count,
            ready=(),
            window=self.config.window,
            strategy=STRATEGIES[self.config.strategy](),
            endgame=self.config.endgame,
            rng=rng,
        )
        self._fetchers: dict[ParentId, ParentFetcher] = {}
        self._wanted: list[ParentId] = []
        self._nursery: trio.Nursery | None = None
        self._finished = trio.Event()
        self._error: BaseException | None = None
        self.add_digests(digests or {})
        for parent in parents:
            self.add_parent(parent)

    @property
    def blocked(self) -> set[ParentId]:
        """Parents that sent a bad piece: never used again by this download."""
        return self.picker.blocked

    @property
    def parents(self) -> list[ParentId]:
        """Parents in use (subscribed or trying to)."""
        return [*self._fetchers, *self._wanted]

    @property
    def done(self) -> bool:
        return self.picker.done

    def add_digests(self, digests: Mapping[int, str]) -> None:
        """Trusted piece digests (from the scheduler); their pieces may now be fetched."""
        for piece, digest in digests.items():
            if not 0 <= piece < self.layout.count or not is_hex_digest(digest):
                raise ValueError(f"bad trusted digest for piece {piece}: {digest!r}")
            known = self.digests.setdefault(piece, digest)
            if known != digest:
                raise ValueError(f"piece {piece} already has trusted digest {known}, not {digest}")
        self.picker.set_ready(digests)
        self._pump()

    def set_wanted(self, pieces: Iterable[int]) -> None:
        """Fetch these pieces before the others (the callers' ranges: :class:`dfz.peer.wanted.WantedPieces`);
        indices beyond the layout are ignored."""
        count = self.layout.count
        self.picker.set_wanted(p for p in pieces if 0 <= p < count)
        self._pump()

    def add_parent(self, parent: ParentId) -> bool:
        """Use ``parent`` too; False when it is blocked."""
        if parent in self.picker.blocked:
            return False
        if parent in self._fetchers or parent in self._wanted:
            return True
        if self._nursery is None:
            self._wanted.append(parent)
        else:
            self._start_fetcher(parent)
        return True

    def remove_parent(self, parent: ParentId) -> None:
        """Stop using ``parent``: its pieces in flight go to the others."""
        if parent in self._wanted:
            self._wanted.remove(parent)
        fetcher = self._fetchers.pop(parent, None)
        if fetcher is not None:
            fetcher.stop()
        self._pump()

    def set_parents(self, parents: Iterable[ParentId]) -> None:
        """Use exactly these parents (the scheduler's latest list), minus blocked ones."""
        want = list(dict.fromkeys(parents))
        for parent in self.parents:
            if parent not in want:
                self.remove_parent(parent)
        for parent in want:
            self.add_parent(parent)

    async def run(self, *, task_status: trio.TaskStatus[Downloader] = trio.TASK_STATUS_IGNORED) -> None:
        if self._nursery is not None or self._finished.is_set():
            raise RuntimeError("a downloader runs once")
        stored = await trio.to_thread.run_sync(self.task.stored_pieces)
        for piece in stored:
            if piece < self.layout.count:
                self.picker.piece_done(None, piece)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for parent in self._wanted:
                    self._start_fetcher(parent)
                self._wanted.clear()
                task_status.started(self)
                if not self.picker.done:
                    self._pump()
                    await self._finished.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._finished.set()
        if self._error is not None:
            raise self._error
        event(log, logging.INFO, "download.done", task=self.task_id, pieces=self.stats.pieces, bytes=self.stats.bytes)

    # -- from the fetchers --

    def _abort(self, error: BaseException) -> None:
        """The download cannot go on (its task was deleted, the disk is full): ``run`` raises ``error``."""
        if self._error is None:
            self._error = error
            event(log, logging.ERROR, "download.aborted", task=self.task_id, error=repr(error))
        self._finished.set()

    def _start_fetcher(self, parent: ParentId) -> None:
        assert self._nursery is not None
        fetcher = self._fetchers[parent] = ParentFetcher(self, parent)
        self._nursery.start_soon(fetcher.run)

    def _pump(self) -> None:
        """Hand out new assignments (called after anything that may have made some possible)."""
        if self._nursery is None or self.picker.done:
            return
        for parent, piece in self.picker.next_assignments():
            fetcher = self._fetchers.get(parent)
            if fetcher is None or not fetcher.attached:  # cannot happen: detached parents leave the picker
                self.picker.remove_parent(parent)
                continue
            fetcher.start_fetch(piece)

    def _piece_done(self, fetcher: ParentFetcher, done: PieceDone) -> None:
        if self.picker.is_stored(done.piece):
            return  # a second copy (the endgame, or a fetch that finished as it was cancelled): reported once
        for other in self.picker.piece_done(fetcher.endpoint, done.piece):
            redundant = self._fetchers.get(other)
            if redundant is not None:
                redundant.cancel_fetch(done.piece)
        self.stats.pieces += 1
        self.stats.bytes += done.size
        if self.on_piece is not None:
            self.on_piece(done)
        if self.picker.done:
            self._finished.set()
        else:
            self._pump()

    def _piece_failed(self, fetcher: ParentFetcher, failure: PieceFailure) -> None:
        self.stats.failures += 1
        if fetcher.attached or failure.kind is FailureKind.BAD:
            self.picker.piece_failed(fetcher.endpoint, failure.piece, failure.kind)
        event(
            log,
            logging.WARNING if failure.kind is FailureKind.BAD else logging.INFO,
            "download.piece_failed",
            task=self.task_id,
            piece=failure.piece,
            parent=failure.parent,
            kind=failure.kind,
            reason=failure.reason,
        )
        if self.on_piece_failed is not None:
            self.on_piece_failed(failure)
        if failure.kind is FailureKind.BAD:
            self.stats.bad_pieces += 1
            self._block(fetcher, failure.reason)
        self._pump()

    def _block(self, fetcher: ParentFetcher, reason: str) -> None:
        """The parent sent a bad piece: never use it again, whichever of its fetchers found out."""
        endpoint = fetcher.endpoint
        self.picker.block_parent(endpoint)
        current = self._fetchers.get(endpoint)
        if current is not None and current is not fetcher:  # a stale fetcher's late answer: stop the new one too
            del self._fetchers[endpoint]
            current.attached = False
            current.stop()
        fetcher.attached = False  # the picker has removed it already
        fetcher._lose(f"blocked: it sent a bad piece ({reason})")

    def _piece_abandoned(self, fetcher: ParentFetcher, piece: int) -> None:
        if self.picker.fetching(fetcher.endpoint, piece):
            self.picker.piece_failed(fetcher.endpoint, piece, FailureKind.TRANSIENT)
            self._pump()

    def _parent_lost(self, fetcher: ParentFetcher, reason: str) -> None:
        if self._fetchers.get(fetcher.endpoint) is fetcher:
            del self._fetchers[fetcher.endpoint]
        self.stats.lost_parents += 1
        event(log, logging.INFO, "download.parent_lost", task=self.task_id, parent=fetcher.endpoint, reason=reason)
        if self.on_parent_lost is not None:
            self.on_parent_lost(fetcher.endpoint, reason)
        self._pump()
