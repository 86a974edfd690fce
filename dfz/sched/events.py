"""What happens to the scheduler: one small immutable class per kind of event.

The shell turns each fabric message (and the passing of time) into one of these and hands it to
:meth:`SchedulerCore.apply <dfz.sched.core.SchedulerCore.apply>`. Events carry ids, never model objects;
the core looks them up and raises :class:`~dfz.sched.errors.UnknownPeer` / ``UnknownHost`` for ids it does
not know. An event that names a peer does not name its host: the shell checks that the session sending
it is the peer's host (``core.peers[peer_id].host.id``) before applying it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import HostType


@dataclass(frozen=True, slots=True)
class AnnounceHost:
    """A host joins, or re-announces itself with new values (same id): address, type and capacity."""

    host_id: str
    hostname: str
    ip: str
    port: int
    type: HostType = HostType.NORMAL
    idc: str = ""
    location: str = ""
    upload_capacity: int = 0
    upload_slots: int = 4
    tenant: str = ""
    """The tenant the shell verified (a ticket); "" for none. A host's tenant never changes (refused)."""


@dataclass(frozen=True, slots=True)
class HostHeartbeat:
    """The host is alive. (Any event from a host's peers counts as well.)"""

    host_id: str


@dataclass(frozen=True, slots=True)
class HostLoad:
    """The host's daemon measured its upload load (``sched.host_load``, about once per second): the
    evaluator weighs it. Counts as a heartbeat too."""

    host_id: str
    upload_rate: int
    """Bytes/s uploaded, over the last few seconds."""
    uploads_in_flight: int
    """Piece requests being served now."""
    upload_peers: int
    """Children being served now."""


@dataclass(frozen=True, slots=True)
class HostLeft:
    """The host leaves (its daemon stops, or its session ended): its peers leave with it."""

    host_id: str
    reason: str = "left"


@dataclass(frozen=True, slots=True)
class RegisterPeer:
    """A daemon starts downloading a task. Registering the same peer id again for the same task and host
    is harmless: the peer gets its current assignment again (for a shell that retries a request)."""

    peer_id: str
    task_id: str
    host_id: str
    url: str
    tag: str = ""
    application: str = ""
    piece_length: int | None = None
    """The piece length the download asked for (part of the task id), or ``None`` for the default rule."""
    back_to_source_allowed: bool = True
    headers: tuple[tuple[str, str], ...] = ()
    """Request headers for the origin; handed to a seed host triggered for this task."""
    wanted: tuple[tuple[int, int | None], ...] = ()
    """Byte ranges the download needs first; handed to the seed host that fetches the task."""


@dataclass(frozen=True, slots=True)
class AnnounceTask:
    """A daemon holds the whole file of a task already (it finished it before a restart) and offers it to
    the swarm: the peer is registered as ``succeeded``, a source and a parent for the others. The file's
    facts (lengths, whole-file and piece digests, all of them) must agree with what the task knows; they
    were verified when the daemon stored the pieces, so they are trusted like an origin-fetching peer's."""

    peer_id: str
    task_id: str
    host_id: str
    url: str
    tag: str
    application: str
    piece_length: int
    content_length: int
    digest: str
    digests: tuple[tuple[int, str], ...]


@dataclass(frozen=True, slots=True)
class TaskMetadataKnown:
    """The peer fetching from the origin learned the file's size (``None``: the origin does not say,
    e.g. a chunked response) and chose the piece length."""

    peer_id: str
    content_length: int | None
    piece_length: int


@dataclass(frozen=True, slots=True)
class PieceFinished:
    """The peer has piece ``piece`` (verified). ``parent_id`` is the peer it came from, ``None`` for the
    origin; ``cost`` is the seconds it took."""

    peer_id: str
    piece: int
    digest: str
    size: int
    cost: float
    parent_id: str | None


@dataclass(frozen=True, slots=True)
class PieceFailed:
    """The peer could not get ``piece`` from ``parent_id`` (timeout, refused, digest mismatch, ...)."""

    peer_id: str
    piece: int
    parent_id: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class PeerFinished:
    """The peer has every piece; ``digest`` is its whole-file digest, ``content_length`` its size."""

    peer_id: str
    digest: str
    content_length: int


@dataclass(frozen=True, slots=True)
class PeerFailed:
    """The peer gave up. ``origin_error`` says the origin itself failed (404, 500, reset, wrong length):
    when the last peer fetching from the origin fails so, the task fails for everyone waiting on it."""

    peer_id: str
    reason: str
    origin_error: bool = False


@dataclass(frozen=True, slots=True)
class PeerLeft:
    """The peer is gone (finished and no longer serving, cancelled, or its data was evicted)."""

    peer_id: str


@dataclass(frozen=True, slots=True)
class RescheduleRequest:
    """The peer asks for new parents, and never again the ones in ``avoid`` (peer ids)."""

    peer_id: str
    avoid: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ForgetTask:
    """The task is deleted (a manager's ``delete_task`` job): every peer of it leaves, and the task is
    forgotten at once. Nothing is pushed to the peers (their daemons were asked to delete it); a daemon that
    still reports about one of them is refused (``UNKNOWN_PEER``) and registers again. An unknown task is
    not an error (nothing to forget)."""

    task_id: str


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: the core reads its clock and handles what is due: retries, host timeouts, and the
    peers and tasks whose time to live ran out."""


Event = (
    AnnounceHost
    | HostHeartbeat
    | HostLoad
    | HostLeft
    | RegisterPeer
    | AnnounceTask
    | TaskMetadataKnown
    | PieceFinished
    | PieceFailed
    | PeerFinished
    | PeerFailed
    | PeerLeft
    | RescheduleRequest
    | ForgetTask
    | Tick
)
