"""The scheduler's model: hosts, tasks and peers, and the edges of each task's DAG.

Rules of this file:

* These are plain records. Only :class:`~dfz.sched.core.SchedulerCore` writes to them, one event at a
  time; everyone else (the shell, an evaluator, tests) reads them.
* Records refer to each other directly (a peer holds its task and its host, parents and children hold
  peers), so the core never looks an id up twice. Collections that the core iterates to produce actions
  are dicts, not sets, so that the order of actions is deterministic.
* Memory per peer matters (10,000 peers and more): every class has ``__slots__``, finished pieces are one
  ``int`` used as a bitmap, and rarely used collections (``avoid``) are created on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .state import PeerState, TaskState


class HostType(Enum):
    NORMAL = "normal"
    SEED = "seed"


@dataclass(slots=True, eq=False)
class Host:
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

    @property
    def is_seed(self) -> bool:
        return self.type is HostType.SEED

    @property
    def free_slots(self) -> int:
        return max(0, self.upload_slots - self.uploads)


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
    counts: dict[PeerState, int] = field(default_factory=lambda: dict.fromkeys(PeerState, 0), repr=False)
    """Peers of this task in each state."""
    seed_host: str | None = None
    """The seed host triggered to fetch this task and not registered yet."""
    seed_deadline: float = 0.0
    tried_seed_hosts: set[str] = field(default_factory=set, repr=False)
    bytes_from_origin: int = 0
    bytes_from_peers: int = 0

    @property
    def piece_count(self) -> int | None:
        if self.content_length is None or self.piece_length is None:
            return None
        return -(-self.content_length // self.piece_length)

    @property
    def sources(self) -> int:
        """Peers that feed the swarm without parents: fetching from the origin, or holding everything."""
        return self.counts[PeerState.BACK_TO_SOURCE] + self.counts[PeerState.SUCCEEDED]


@dataclass(slots=True, eq=False)
class Peer:
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
