"""The scheduler's model: hosts, tasks and peers, and the edges of each task's DAG.

Rules of this file:

* These are plain records. Only :class:`~dfz.sched.core.SchedulerCore` writes to them, one event at a
  time; everyone else (the shell, an evaluator, tests) reads them.
* Records refer to each other directly (a peer holds its task and its host, parents and children hold
  peers), so the core never looks an id up twice. Collections that the core iterates to produce actions
  are dicts, not sets, so that the order of actions is deterministic.
* Memory per peer matters (10,000 peers and more): every class has ``__slots__``, finished pieces are one
  ``int`` used as a bitmap, and rarely used records (``avoid``, ``costs``) are created on first use.
"""

from __future__ import annotations

import functools
import math
import sys
from array import array
from dataclasses import dataclass, field
from enum import Enum

from .actions import ParentCandidate
from .state import PeerState, TaskState

MAX_LOCATION_ELEMENTS = 5
"""Elements of a ``|``-separated location compared for affinity (Dragonfly's ``maxElementLen``)."""

MAX_COST_MS = 0xFFFF_FFFF


class HostType(Enum):
    __hash__ = object.__hash__  # by identity, in C, like the states (see state.py)
    NORMAL = "normal"
    SEED = "seed"


class _HostLayout:
    """The fields of a host that decisions read of each candidate parent, first in the object (see
    :class:`_PeerLayout`): those read every time (the affinity keys, the evaluator's memo) share the first
    64-byte cache line with the object's header, the load read when the memo is stale the second."""

    __slots__ = (
        "idc_key",
        "location_key",
        "scored_by",
        "scored_free",
        "scored_part",
        "tenant",
        "type",
        "upload_capacity",
        "upload_peers",
        "upload_rate",
        "upload_slots",
        "uploads",
        "uploads_in_flight",
    )


@dataclass(slots=True, eq=False)
class Host(_HostLayout):
    """A machine running a daemon. Its upload slots are shared by all its peers, over all tasks."""

    id: str
    hostname: str
    ip: str
    port: int
    """Where the host's piece server listens (children connect to ``ip:port``)."""
    type: HostType
    idc: str
    location: str
    """``|``-separated, most general first (e.g. ``"eu|fr|paris"``)."""
    upload_capacity: int
    """Announced upload bandwidth in bytes/s (used by the evaluator of issue 4)."""
    upload_slots: int
    """Children this host serves at once, over all its peers."""
    last_seen: float
    uploads: int = 0
    """Parent→child edges from this host's peers: the upload slots in use."""
    peers: dict[str, Peer] = field(default_factory=dict, repr=False)
    upload_rate: int = 0
    """Measured upload bandwidth in bytes/s (``sched.host_load``; 0 until the daemon reports it)."""
    uploads_in_flight: int = 0
    """Piece requests the host's daemon is serving now, as it last reported."""
    upload_peers: int = 0
    """Children the host's daemon is serving now, as it last reported (over every scheduler)."""
    idc_key: str = field(default="", repr=False)
    """``idc`` compared case-insensitively (set with the announced values, see :func:`network_keys`)."""
    location_key: tuple[str, ...] = field(default=(), repr=False)
    """``location`` split at ``|``, case-folded, its first :data:`MAX_LOCATION_ELEMENTS` elements."""
    scored_by: object = field(default=None, repr=False)
    """The evaluator whose ``scored_free`` and ``scored_part`` below are current (see
    ``MultiFeatureEvaluator.host_part``), kept between decisions; the core resets it to None whenever it
    changes the host's slots, uploads, load or announcement."""
    scored_free: int = field(default=-1, repr=False)
    scored_part: float = field(default=0.0, repr=False)
    bytes_uploaded: int = 0
    """Bytes children reported having got from this host's peers (a counter, for ``sched.inspect``)."""
    bytes_downloaded: int = 0
    """Bytes this host's peers reported having got, from parents or the origin (a counter)."""
    tenant: str = ""
    """The tenant the host proved it is in (its verified ticket, ``protocol.md`` §17.10); "" for none. It does
    not change while the host lives: its peers join only tasks of that tenant, and have parents of it only."""

    @property
    def is_seed(self) -> bool:
        return self.type is HostType.SEED

    @property
    def free_slots(self) -> int:
        return max(0, self.upload_slots - self.uploads)

    @property
    def free_bandwidth(self) -> int | None:
        """Announced upload capacity minus the measured upload rate (bytes/s); None when unknown."""
        if self.upload_capacity <= 0:
            return None
        return max(0, self.upload_capacity - self.upload_rate)

    @property
    def bandwidth_share(self) -> int | None:
        """What one more child can expect of this host's upload (bytes/s): its free bandwidth, and at most
        a fair share of its capacity among its children and that one, ``capacity / (children + 1)``.
        None when no capacity was announced.

        The share is what spreads a flash crowd: rates are measured a second late, so before they are,
        free bandwidth alone would send every newcomer to the same idle seed."""
        if self.upload_capacity <= 0:
            return None
        children = self.uploads if self.uploads > self.upload_peers else self.upload_peers
        free = self.upload_capacity - self.upload_rate if self.upload_capacity > self.upload_rate else 0
        fair = self.upload_capacity // (children + 1)
        return free if free < fair else fair


def network_keys(idc: str, location: str) -> tuple[str, tuple[str, ...]]:
    """What affinity compares of a host's ``idc`` and ``location`` (computed once per announce).

    Hosts that announce the same values share the same key objects (while they are among the latest
    :data:`_SHARED_KEYS` seen), so that comparing them is mostly comparing identities, and the few objects
    compared stay in the CPU's cache."""
    return _idc_key(idc), _location_key(location)


_SHARED_KEYS = 4096


@functools.lru_cache(maxsize=_SHARED_KEYS)
def _idc_key(idc: str) -> str:
    return idc.casefold()


@functools.lru_cache(maxsize=_SHARED_KEYS)
def _location_key(location: str) -> tuple[str, ...]:
    if not location:
        return ()
    return tuple(sys.intern(e.casefold()) for e in location.split("|")[:MAX_LOCATION_ELEMENTS])


@dataclass(slots=True, eq=False)
class Task:
    """One file (one task id) and every peer that downloads or holds it."""

    id: str
    url: str
    tag: str
    application: str
    headers: tuple[tuple[str, str], ...] = field(repr=False)
    """Request headers for the origin, from the first registration (handed to a triggered seed)."""
    created_at: float
    wanted: list[tuple[int, int | None]] = field(default_factory=list, repr=False)
    """Byte ranges registering peers need first, the latest 16 (handed to a triggered seed)."""
    piece_length: int | None = None
    content_length: int | None = None
    """``None`` until the peer fetching from the origin knows it (a chunked origin tells it at the end)."""
    digests: dict[int, str] = field(default_factory=dict, repr=False)
    """Piece number → BLAKE3 hex digest, as reported by the peer that fetched the piece from the origin."""
    digest: str | None = None
    """The whole-file digest reported by the first peer that fetched the whole file from the origin."""
    state: TaskState = TaskState.PENDING
    peers: dict[str, Peer] = field(default_factory=dict, repr=False)
    waiting: dict[Peer, None] = field(default_factory=dict, repr=False)
    """Peers that need parents and have none, oldest first."""
    hungry: dict[Peer, None] = field(default_factory=dict, repr=False)
    """Running peers that may have fewer parents than ``candidate_parent_limit``, oldest first: they get
    more when the task gains a possible parent (the core checks each entry when it comes to it)."""
    counts: dict[PeerState, int] = field(default_factory=lambda: dict.fromkeys(PeerState, 0), repr=False)
    """Peers of this task in each state."""
    seed_host: str | None = None
    """The seed host triggered to fetch this task and not registered yet."""
    seed_deadline: float = 0.0
    tried_seed_hosts: set[str] = field(default_factory=set, repr=False)
    bytes_from_origin: int = 0
    bytes_from_peers: int = 0
    open: list[Peer] = field(default_factory=list, repr=False)
    """Peers that can take a child now: in a serving state, on a host with a free upload slot. The core
    keeps it current (``Peer.open_at`` is each one's index) and samples parent candidates from it."""
    bad: dict[Peer, float] = field(default_factory=dict, repr=False)
    """Peers of this task that were judged bad parents, and until when (``PieceCosts.bad_until``, which the
    core mirrors here): candidates are checked against this short index, not each one's ``costs``."""
    emptied_at: float | None = None
    """When the task's last peer went (kept for ``task_ttl``), or None while it has peers."""
    tenant: str = ""
    """The tenant of the host whose peer made the task: only peers on hosts of this tenant join it."""

    @property
    def piece_count(self) -> int | None:
        if self.content_length is None or self.piece_length is None:
            return None
        return -(-self.content_length // self.piece_length)

    @property
    def sources(self) -> int:
        """Peers that feed the swarm without parents: fetching from the origin, or holding everything."""
        return self.counts[PeerState.BACK_TO_SOURCE] + self.counts[PeerState.SUCCEEDED]


class _PeerLayout:
    """The fields of a peer that every decision reads of each sampled candidate, first in the object: with
    the object's header they share its first 64-byte cache line, so that a candidate costs one memory read
    where it cost three. (CPython lays out the slots of a class after its base's, each class's in sorted
    order: this base sets which come first. The dataclass below declares them as fields as usual.)"""

    __slots__ = ("costs", "finished", "finished_count", "host", "id", "state")


@dataclass(slots=True, eq=False)
class Peer(_PeerLayout):
    """One daemon's download of one task, and its place in the task's DAG."""

    id: str
    task: Task = field(repr=False)
    host: Host = field(repr=False)
    back_to_source_allowed: bool
    created_at: float
    updated_at: float
    state: PeerState = PeerState.PENDING
    finished: int = 0
    """Bitmap of finished pieces: bit ``k`` is piece ``k``."""
    finished_count: int = 0
    parents: dict[Peer, None] = field(default_factory=dict, repr=False)
    children: dict[Peer, None] = field(default_factory=dict, repr=False)
    attempts: int = 0
    """Scheduling attempts that found no parent since the last one that did."""
    retry_at: float = 0.0
    avoid: set[str] | None = field(default=None, repr=False)
    """Peer ids this peer asked not to be given as parents (failed pieces, reschedule requests)."""
    uploaded: int = 0
    """Pieces children reported having received from this peer."""
    upload_failures: int = 0
    """Pieces children reported failing to get from this peer."""
    costs: PieceCosts | None = field(default=None, repr=False)
    """What the pieces it served cost its children (created with the first report)."""
    open_at: int = -1
    """Index in ``task.open``, or -1 when the peer cannot take a child now."""
    candidate: ParentCandidate | None = field(default=None, repr=False)
    """How a ``PushParents`` names this peer as a parent (made on first use, shared by every push; the core
    clears it when its host announces another address)."""

    @property
    def upload_success_rate(self) -> float | None:
        """Pieces served / pieces children tried to get from it; None before any report."""
        tried = self.uploaded + self.upload_failures
        return self.uploaded / tried if tried else None

    def has_piece(self, piece: int) -> bool:
        return bool(self.finished >> piece & 1)

    def finished_pieces(self) -> list[int]:
        out: list[int] = []
        bits, k = self.finished, 0
        while bits:
            if bits & 1:
                out.append(k)
            bits >>= 1
            k += 1
        return out


class PieceCosts:
    """The latest costs (milliseconds) of pieces one parent served, as its children reported them: the
    latest cost and a ring of up to ``window - 1`` costs before it, with running integer sums so that the
    mean and the standard deviation of the earlier ones cost O(1) and never drift.

    Memory: one small object and ``4 * (window - 1)`` bytes, only for peers that served a piece.
    """

    __slots__ = ("_filled", "_next", "_ring", "_sq", "_sum", "bad_until", "count", "last")

    def __init__(self, window: int) -> None:
        self._ring = array("I", bytes(4 * (window - 1)))
        self._next = 0
        self._filled = 0
        self._sum = 0
        self._sq = 0
        self.count = 0
        """Costs reported so far (not bounded by the window)."""
        self.last = 0
        """The latest cost in milliseconds."""
        self.bad_until = 0.0
        """Clock time until which the peer is a bad parent (see ``SchedulerCore``); 0: not bad."""

    def add(self, cost_ms: int) -> None:
        cost_ms = min(max(cost_ms, 0), MAX_COST_MS)
        if self.count:
            ring, i = self._ring, self._next
            if self._filled == len(ring):
                old = ring[i]
                self._sum -= old
                self._sq -= old * old
            else:
                self._filled += 1
            prev = self.last
            ring[i] = prev
            self._sum += prev
            self._sq += prev * prev
            self._next = (i + 1) % len(ring)
        self.last = cost_ms
        self.count += 1

    @property
    def samples(self) -> int:
        """Costs in the window, the latest included."""
        return self._filled + (1 if self.count else 0)

    @property
    def window_full(self) -> bool:
        return self._filled == len(self._ring)

    def earlier_mean(self) -> float | None:
        """Mean of the costs before the latest one (None with fewer than two costs)."""
        return self._sum / self._filled if self._filled else None

    def earlier_stdev(self) -> float:
        """Population standard deviation of the costs before the latest one (0 with fewer than two)."""
        n = self._filled
        if not n:
            return 0.0
        return math.sqrt(max(0, n * self._sq - self._sum * self._sum)) / n

    def mean(self) -> float | None:
        """Mean of every cost in the window, the latest included (None before any)."""
        if not self.count:
            return None
        return (self._sum + self.last) / (self._filled + 1)

    def latest_is_outlier(self, ratio: float, sigmas: float, floor_ms: float) -> bool:
        """Whether the latest cost is far outside the earlier ones: more than ``ratio`` times their mean
        while the window is not full, more than mean + ``sigmas`` standard deviations once it is, and in
        both cases at least ``floor_ms`` above the mean. Two costs at least are needed."""
        mean = self.earlier_mean()
        if mean is None or self.last - mean < floor_ms:
            return False
        if not self.window_full:
            return self.last > ratio * mean
        return self.last > mean + sigmas * self.earlier_stdev()
