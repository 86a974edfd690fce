"""The scheduler's wire protocol: the ``sched.*`` message types and the scheduler's error codes.

Rules of this file:

* One message type per thing a daemon tells the scheduler and per thing the scheduler tells a daemon.
  ``protocol.md`` ("Scheduler protocol (sched.*)") documents each of them; the two must agree.
* Every field has a bound: ids are short visible ASCII, task ids and digests are exactly 64 lowercase hex
  digits (the rules of ``dfz/tasks.py``), lists and maps have a maximum length, and the largest message
  the scheduler builds fits the fabric's 64 KiB header frame (``tests/test_sched_service.py`` checks it).
* A daemon's host is its fabric session: no message after ``sched.announce_host`` names the sender's
  host, and a message that names a peer is refused unless the peer is on the sender's host.
* Only joining is a request (``sched.announce_host``, ``sched.register_peer``, ``sched.announce_task``): a
  daemon waits for their answer before it says anything more about that host or peer, so the requests'
  answers and the reports that follow are applied in the order they were sent. Every report after that is a client push, applied
  in arrival order; one that cannot be applied is answered by the push ``sched.refused``.
* ``sched.inspect`` (1.12) is the one request that only reads: a snapshot for people watching the cluster,
  from any session (``inspect.py`` builds it).
* This file does no I/O; ``service.py`` turns these messages into core events and actions into these.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta

from ..broker import U16, U32, U63, Catalogue, Kind, Message, Name, Text
from ..tasks import MAX_PIECE_LENGTH, MAX_PIECES, MIN_FIXED_PIECE_LENGTH

# --- field types ----------------------------------------------------------------------------------------

Id = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[!-~]+$")]
"""A host id, boot id or peer id: 1 to 128 visible ASCII characters (no spaces; they go into logs)."""

Hex64 = Annotated[str, Meta(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")]
"""A task id or a BLAKE3 digest: exactly 64 lowercase hex digits (``dfz/tasks.py``)."""

Url = Annotated[str, Meta(min_length=1, max_length=8192)]
PieceIndex = Annotated[int, Meta(ge=0, lt=MAX_PIECES)]
PieceLength = Annotated[int, Meta(ge=MIN_FIXED_PIECE_LENGTH, le=MAX_PIECE_LENGTH)]
"""A piece length on the wire; it must also be a power of two (checked by the scheduler)."""
PieceSize = Annotated[int, Meta(ge=0, le=MAX_PIECE_LENGTH)]
ShortText = Annotated[str, Meta(max_length=256)]
HeaderName = Annotated[str, Meta(min_length=1, max_length=256)]
Headers = Annotated[list[tuple[HeaderName, Text]], Meta(max_length=64)]
ByteStart = Annotated[int, Meta(ge=-(1 << 62), le=1 << 62)]
MAX_WANTED_RANGES = 16
WantedRanges = Annotated[list[tuple[ByteStart, U63 | None]], Meta(max_length=MAX_WANTED_RANGES)]
"""Byte ranges a peer's callers need first (:data:`dfz.peer.wanted.ByteRange`): ``[start, end]`` for bytes
``[start, end)``, ``end`` nil to the end, ``[-N, nil]`` for the last N bytes."""
"""Request headers for the origin, as ``[name, value]`` pairs in order (a name may repeat)."""

MAX_PARENTS = 16
"""Most parents in one assignment; the scheduler's ``candidate_parent_limit`` may not exceed it."""
MAX_FINISHED_PER_REPORT = 128
MAX_FAILED_PER_REPORT = 32
MAX_DIGESTS_PER_MESSAGE = 512
MAX_PEERS_PER_MESSAGE = 64
MAX_AVOID = 64

DigestList = Annotated[list[tuple[PieceIndex, Hex64]], Meta(max_length=MAX_DIGESTS_PER_MESSAGE)]
"""Piece digests as ``[piece, digest]`` pairs in piece order (the header's map keys must be strings)."""
PeerIds = Annotated[list[Id], Meta(min_length=1, max_length=MAX_PEERS_PER_MESSAGE)]


class SchedErrorCode(IntEnum):
    """Error codes of the scheduler (range 1100-1199), in ``error`` replies and ``sched.refused`` pushes."""

    NOT_ANNOUNCED = 1100  # this session has not announced a host (or its host was removed): announce it
    HOST_MISMATCH = 1101  # this session is another host (or boot): one session announces one host
    HOST_TAKEN = 1102  # the host id is held by a live session of another authenticated client
    NOT_YOUR_PEER = 1103  # the peer is registered on another host than this session's
    UNKNOWN_PEER = 1104  # the peer is not registered (never, or it left, or its host was removed)
    WRONG_STATE = 1105  # the peer's or task's state does not allow this report
    REFUSED = 1106  # the report does not fit what the scheduler knows (see the reason)
    WRONG_TENANT = 1107  # the task (or the host) is of another tenant than this session's host: tenants never meet
    BAD_TICKET = 1108  # the tenant ticket is malformed, not the manager's, expired, or another host's: announce again
    NOT_ALLOWED = 1109  # (1.12) this scheduler does not answer sched.inspect (its ``inspect`` setting is off)
    INSPECT_BUSY = 1110  # (1.12) inspections took their share of the scheduler's time: ask again in a second


# --- nested records -------------------------------------------------------------------------------------


class SchedParent(msgspec.Struct, kw_only=True):
    """One parent to download from: its peer id and where its host's piece server listens."""

    peer_id: Id
    host_id: Id
    ip: Name
    port: U16


class FinishedPiece(msgspec.Struct, kw_only=True):
    """A piece the peer has, verified: from ``parent`` (a peer id), or from the origin when ``None``."""

    piece: PieceIndex
    digest: Hex64
    size: PieceSize
    cost_ms: U32 = 0
    parent: Id | None = None


class FailedPiece(msgspec.Struct, kw_only=True):
    """A piece the peer could not get from ``parent`` (timeout, refused, digest mismatch, ...)."""

    piece: PieceIndex
    parent: Id
    reason: ShortText = ""


# --- requests and their replies -------------------------------------------------------------------------


class SchedAnnounceHost(Message, tag="sched.announce_host"):
    """A daemon's first message: binds this session to the host. Answered by :class:`SchedHostAnnounced`.

    Announcing again on the same session updates the host's values. A new session with the same host id
    and ``boot`` takes the host over with its peers (a reconnect); with another ``boot`` the old host
    leaves first, with its peers (the daemon restarted).
    """

    KIND: ClassVar[Kind] = Kind.REQUEST
    VERSION: ClassVar[int] = 2
    host_id: Id
    boot: Id
    """Unique per start of the daemon's process."""
    hostname: Name
    ip: Name
    """Where the host's piece server is reached (an address, or a name that resolves)."""
    port: U16
    type: Literal["normal", "seed"] = "normal"
    idc: Name = ""
    location: Name = ""
    upload_capacity: U63 = 0
    """Upload bandwidth in bytes/s (0: unknown)."""
    upload_slots: U16 = 4
    """Children the host serves at once, over all its peers."""
    ticket: Annotated[bytes, Meta(max_length=1024)] = b""
    """(1.9) The host's tenant ticket from the manager (``dfz/tickets.py``); empty: the host is in no tenant."""


class SchedHostAnnounced(Message, tag="sched.host_announced"):
    """Reply to :class:`SchedAnnounceHost`."""

    KIND: ClassVar[Kind] = Kind.REPLY
    VERSION: ClassVar[int] = 2
    host_id: Id
    session: Annotated[str, Meta(max_length=64)]
    """The fabric session the host is bound to (its ``welcome.session``)."""
    scheduler: Name
    resumed: bool = False
    """True when the host was kept from an earlier session (same boot): its peers are still registered."""
    peers: U32 = 0
    """Peers of this host the scheduler holds; 0 after a fresh announce (register your downloads again)."""
    tenant: Annotated[str, Meta(max_length=64)] = ""
    """(1.9) The tenant the host's ticket proved ("" for none)."""


class SchedRegisterPeer(Message, tag="sched.register_peer"):
    """A daemon starts downloading a task on this session's host. Answered by :class:`SchedPeerRegistered`.

    Registering the same peer id again (a retry) answers with the peer's current assignment.
    """

    KIND: ClassVar[Kind] = Kind.REQUEST
    VERSION: ClassVar[int] = 2
    peer_id: Id
    task_id: Hex64
    url: Url
    tag: Name = ""
    application: Name = ""
    piece_length: PieceLength | None = None
    """The fixed piece length asked for (part of the task id), or absent for the automatic rule."""
    back_to_source: bool = True
    """Whether this download may fetch from the origin."""
    headers: Headers = []
    wanted: WantedRanges = []
    """(revision 2) Byte ranges this download's callers need first: a seed fetching the task from the origin
    for the swarm is told them (:class:`SchedSeed`) and reads their pieces first."""


Assignment = Literal["parents", "back_to_source", "wait", "failed"]


class SchedPeerRegistered(Message, tag="sched.peer_registered"):
    """Reply to :class:`SchedRegisterPeer`: the peer's assignment and what is known of the task.

    ``assignment``: ``parents`` (download from ``parents``), ``back_to_source`` (fetch from the origin
    and report the digests), ``wait`` (parents will be pushed), ``failed`` (see ``reason``). When the task
    has more digests than fit, ``more_digests`` is set and the rest follow as ``sched.digests`` pushes.
    """

    KIND: ClassVar[Kind] = Kind.REPLY
    peer_id: Id
    task_id: Hex64
    assignment: Assignment
    parents: Annotated[list[SchedParent], Meta(max_length=MAX_PARENTS)] = []
    reason: Text = ""
    content_length: U63 | None = None
    piece_length: U32 | None = None
    piece_count: U32 | None = None
    digest: Hex64 | None = None
    digests: DigestList = []
    more_digests: bool = False


class SchedAnnounceTask(Message, tag="sched.announce_task"):
    """A daemon offers a task it holds whole already (stored before a restart): the peer is registered as
    ``succeeded`` and serves the swarm. Answered by :class:`SchedTaskAnnounced`. Every piece digest is
    given; they and the lengths must agree with what the scheduler knows of the task (``REFUSED``
    otherwise: the daemon's copy is stale). A task of more than 512 pieces is announced in parts
    (revision 2): every part but the last says ``more``, all carry the same fields but ``digests``."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    VERSION: ClassVar[int] = 2
    peer_id: Id
    task_id: Hex64
    url: Url
    piece_length: PieceLength
    """The task's piece length (fixed or chosen by the rule of ``dfz/tasks.py``)."""
    content_length: U63
    digest: Hex64
    """The whole-file BLAKE3 digest."""
    digests: DigestList
    """Every piece's digest, in piece order (over all the parts of an announcement)."""
    tag: Name = ""
    application: Name = ""
    more: bool = False
    """More parts of this announcement follow (same ``peer_id`` and fields, the next digests)."""


class SchedTaskAnnounced(Message, tag="sched.task_announced"):
    """Reply to :class:`SchedAnnounceTask`: the peer is registered, ``succeeded``; or, with ``pending``, a
    part was taken and the announcement waits for the next."""

    KIND: ClassVar[Kind] = Kind.REPLY
    VERSION: ClassVar[int] = 2
    peer_id: Id
    task_id: Hex64
    pending: bool = False


# --- client pushes: reports ------------------------------------------------------------------------------


class SchedTaskMetadata(Message, tag="sched.task_metadata"):
    """The peer fetching from the origin learned the file's size (absent: the origin does not say) and
    chose the piece length (the rule of ``dfz/tasks.py``)."""

    KIND: ClassVar[Kind] = Kind.CLIENT_PUSH
    peer_id: Id
    piece_length: PieceLength
    content_length: U63 | None = None


class SchedPieces(Message, tag="sched.pieces"):
    """A batch of piece results of one peer, applied in order: ``finished`` first, then ``failed``. The
    batch is applied up to the first report that is refused (``sched.refused`` names its piece)."""

    KIND: ClassVar[Kind] = Kind.CLIENT_PUSH
    peer_id: Id
    finished: Annotated[list[FinishedPiece], Meta(max_length=MAX_FINISHED_PER_REPORT)] = []
    failed: Annotated[list[FailedPiece], Meta(max_length=MAX_FAILED_PER_REPORT)] = []


class SchedPeerFinished(Message, tag="sched.peer_finished"):
    """The peer has every piece: its whole-file BLAKE3 digest and size."""

    KIND: ClassVar[Kind] = Kind.CLIENT_PUSH
    peer_id: Id
    content_length: U63
    digest: Hex64


class SchedPeerFailed(Message, tag="sched.peer_failed"):
    """The peer gave up. ``origin_error``: the origin itself failed (404, 500, reset, wrong length)."""

    KIND: ClassVar[Kind] = Kind.CLIENT_PUSH
    peer_id: Id
    reason: Text
    origin_error: bool = False


class SchedPeerLeft(Message, tag="sched.peer_left"):
    """The peer is gone: cancelled, finished and no longer serving, or its data was evicted."""

    KIND: ClassVar[Kind] = Kind.CLIENT_PUSH
    peer_id: Id


class SchedReschedule(Message, tag="sched.reschedule"):
    """The peer asks for new parents, and never again the peers in ``avoid``."""

    KIND: ClassVar[Kind] = Kind.CLIENT_PUSH
    peer_id: Id
    avoid: Annotated[list[Id], Meta(max_length=MAX_AVOID)] = []


class SchedHostLoad(Message, tag="sched.host_load"):
    """The host's measured upload load, sent about once per second on the host's bound session. The
    evaluator prefers hosts with free upload bandwidth (``upload_capacity`` announced minus this rate)
    and few requests in flight. Also keeps the host alive, like any message of its session."""

    KIND: ClassVar[Kind] = Kind.CLIENT_PUSH
    upload_rate: U63
    """Bytes/s uploaded, measured over the last few seconds."""
    uploads_in_flight: U32
    """Piece requests being served now."""
    upload_peers: U32
    """Children being served now (of every scheduler the daemon talks to)."""


# --- server pushes: the scheduler's decisions ------------------------------------------------------------


class SchedParents(Message, tag="sched.parents"):
    """The peer's parents, best first; they replace the previous ones."""

    KIND: ClassVar[Kind] = Kind.SERVER_PUSH
    peer_id: Id
    task_id: Hex64
    parents: Annotated[list[SchedParent], Meta(min_length=1, max_length=MAX_PARENTS)]


class SchedSeed(Message, tag="sched.seed"):
    """To a seed host: fetch this task from the origin. The seed daemon answers by registering a peer of
    its own for ``task_id`` (with these values), which the scheduler sends back to source.

    ``wanted`` (revision 2): byte ranges peers of the task need first; the seed reads their pieces from the
    origin first. Sent again, with a new peer's ranges, while the seed fetches the task: the seed adds them
    to its download (a trigger for a task it is downloading starts nothing else)."""

    KIND: ClassVar[Kind] = Kind.SERVER_PUSH
    VERSION: ClassVar[int] = 2
    task_id: Hex64
    url: Url
    tag: Name = ""
    application: Name = ""
    piece_length: PieceLength | None = None
    headers: Headers = []
    wanted: WantedRanges = []


class SchedBackToSource(Message, tag="sched.back_to_source"):
    """The peer fetches its missing pieces from the origin and reports their digests."""

    KIND: ClassVar[Kind] = Kind.SERVER_PUSH
    peer_id: Id
    task_id: Hex64
    reason: Text = ""


class SchedFail(Message, tag="sched.fail"):
    """The peer's download failed; the daemon stops it and reports ``reason`` to its user."""

    KIND: ClassVar[Kind] = Kind.SERVER_PUSH
    peer_id: Id
    task_id: Hex64
    reason: Text


class SchedDigests(Message, tag="sched.digests"):
    """Piece digests from the peer that fetched the pieces from the origin, for the listed peers of this
    host: they verify every piece from a parent against these."""

    KIND: ClassVar[Kind] = Kind.SERVER_PUSH
    task_id: Hex64
    peer_ids: PeerIds
    digests: DigestList


class SchedTaskInfo(Message, tag="sched.task_info"):
    """What is known of the task's file, for the listed peers of this host. Absent fields are unknown."""

    KIND: ClassVar[Kind] = Kind.SERVER_PUSH
    task_id: Hex64
    peer_ids: PeerIds
    content_length: U63 | None = None
    piece_length: U32 | None = None
    piece_count: U32 | None = None
    digest: Hex64 | None = None


class SchedRefused(Message, tag="sched.refused"):
    """A client push the scheduler could not apply: its type, the peer and piece it was about, and why."""

    KIND: ClassVar[Kind] = Kind.SERVER_PUSH
    type: Name
    """The wire name of the refused message."""
    code: U32
    reason: Text = ""
    peer_id: Annotated[str, Meta(max_length=128)] = ""
    piece: PieceIndex | None = None


class SchedDeleteTask(Message, tag="sched.delete_task"):
    """To a host that has a peer of the task (1.8): delete the task from the daemon's cache (a manager's
    ``delete_task`` job). The daemon stops its download of it, stops serving it (its children are told the
    task was dropped and go to other parents), removes it from its storage, and answers with the client
    push :class:`SchedTaskDeleted` repeating ``request``."""

    KIND: ClassVar[Kind] = Kind.SERVER_PUSH
    task_id: Hex64
    request: U32


class SchedTaskDeleted(Message, tag="sched.task_deleted"):
    """A daemon's answer to :class:`SchedDeleteTask` (1.8). ``error`` empty: the task is not in its cache any
    more; ``held``: it was there."""

    KIND: ClassVar[Kind] = Kind.CLIENT_PUSH
    task_id: Hex64
    request: U32
    held: bool = False
    error: ShortText = ""


# --- inspection: a bounded snapshot of the scheduler's state (1.12) ----------------------------------------

MAX_INSPECT_HOSTS = 256
"""Most hosts one ``sched.snapshot`` holds (fewer when the header frame's budget runs out first)."""
MAX_INSPECT_TASKS = 64
MAX_INSPECT_PEERS = 256
INSPECT_BUDGET = 56 * 1024
"""Bytes of records (hosts, tasks, peers, encoded) the scheduler puts in one ``sched.snapshot``, so that the
reply, with its envelope and totals, fits the fabric's 64 KiB header frame whatever the ids' lengths."""

HostSort = Literal["upload_rate", "bytes_uploaded", "bytes_downloaded", "uploads", "peers", "id"]
"""Orders of hosts in a snapshot: every numeric one largest first, ties by host id; ``id`` ascending."""
TaskSort = Literal["active", "peers", "bytes", "created", "id"]
"""Orders of tasks: ``active`` most downloading peers first (then most peers), ``peers`` most peers,
``bytes`` most bytes reported, ``created`` newest first; ties by task id; ``id`` ascending."""
PeerStateName = Literal["pending", "running", "back_to_source", "succeeded", "failed", "left"]
TaskStateName = Literal["pending", "running", "succeeded", "failed"]
Tenant = Annotated[str, Meta(max_length=64)]


class InspectHost(msgspec.Struct, kw_only=True):
    """One host in a snapshot: what it announced, what it reported of its load, and what its peers reported."""

    host_id: Id
    hostname: Name
    ip: Name
    port: U16
    type: Literal["normal", "seed"]
    idc: Name = ""
    location: Name = ""
    tenant: Tenant = ""
    upload_capacity: U63 = 0
    upload_slots: U32 = 0
    uploads: U32 = 0
    """Upload slots in use: parent→child edges from the host's peers, as the scheduler assigned them."""
    upload_rate: U63 = 0
    """Bytes/s uploaded, as the daemon last measured it (``sched.host_load``)."""
    uploads_in_flight: U32 = 0
    upload_peers: U32 = 0
    peers: U32 = 0
    """Peers (downloads and cached tasks) on the host."""
    bytes_uploaded: U63 = 0
    """Bytes children reported having got from the host's peers since the host was announced (a counter:
    rates are its differences between snapshots)."""
    bytes_downloaded: U63 = 0
    """Bytes the host's peers reported having got, from parents or the origin, since it was announced."""


class InspectTask(msgspec.Struct, kw_only=True):
    """One task in a snapshot: its file, its peers by state and where its bytes came from."""

    task_id: Hex64
    url: Url
    tag: Name = ""
    application: Name = ""
    tenant: Tenant = ""
    state: TaskStateName
    content_length: U63 | None = None
    piece_length: U32 | None = None
    piece_count: U32 | None = None
    peers: U32 = 0
    pending: U32 = 0
    running: U32 = 0
    back_to_source: U32 = 0
    succeeded: U32 = 0
    failed: U32 = 0
    finished_pieces: U63 = 0
    """Pieces the task's peers have, over all its peers (progress: this / (``piece_count`` * ``peers``))."""
    bytes_from_origin: U63 = 0
    bytes_from_peers: U63 = 0
    age_ms: U63 = 0
    """Milliseconds since the scheduler made the task."""


class InspectPeer(msgspec.Struct, kw_only=True):
    """One peer of the inspected task, with the edges of the swarm: the parents the scheduler gave it."""

    peer_id: Id
    host_id: Id
    hostname: Name
    state: PeerStateName
    finished_pieces: U32 = 0
    parents: Annotated[list[Id], Meta(max_length=MAX_PARENTS)] = []
    """Its parents, as last pushed (best first)."""
    children: U32 = 0
    uploaded: U32 = 0
    """Pieces children reported having got from it."""
    depth: U16 = 0
    """Hops from a root of the swarm (a peer without parents: the seed, a peer at the origin, a waiting one)."""


class SchedInspect(Message, tag="sched.inspect"):
    """(1.12) A bounded snapshot of the scheduler's state, for ``dfz top`` and the manager's console:
    totals, one page of hosts and of tasks in a chosen order, and the swarm of one task (``task_id``).
    Answered by :class:`SchedSnapshot`. Any session may ask (it need not announce a host); a session whose
    host, or whose CURVE key's host, is in a tenant sees only that tenant (protocol.md §14.3)."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    hosts: Annotated[int, Meta(ge=0, le=MAX_INSPECT_HOSTS)] = 50
    host_offset: U32 = 0
    """Hosts to skip in ``host_sort`` order (paging: the previous page's offset plus its length)."""
    host_sort: HostSort = "upload_rate"
    tasks: Annotated[int, Meta(ge=0, le=MAX_INSPECT_TASKS)] = 20
    task_offset: U32 = 0
    task_sort: TaskSort = "active"
    task_id: Hex64 | None = None
    """The task whose peers (the swarm) the snapshot holds; none: no peers."""
    peers: Annotated[int, Meta(ge=0, le=MAX_INSPECT_PEERS)] = 100
    """Most peers of ``task_id``, in breadth-first order from its roots (parents before their children)."""


class SchedSnapshot(Message, tag="sched.snapshot"):
    """Reply to :class:`SchedInspect` (1.12). Totals cover everything the asker may see; the lists are the
    pages asked for, cut short (``truncated``) when the header frame's budget ran out."""

    KIND: ClassVar[Kind] = Kind.REPLY
    scheduler: Name
    clock_ms: U63
    """The scheduler's monotonic clock (milliseconds, arbitrary origin): divide counter differences by it."""
    tenant: Tenant = ""
    """The tenant the view is limited to ("" for none: every tenant)."""
    hosts_total: U32 = 0
    seed_hosts: U32 = 0
    tasks_total: U32 = 0
    peers_total: U32 = 0
    downloading: U32 = 0
    """Peers downloading now (from parents or from the origin)."""
    upload_rate: U63 = 0
    """Sum of the hosts' measured upload rates (bytes/s)."""
    bytes_from_origin: U63 = 0
    bytes_from_peers: U63 = 0
    """Bytes the tasks known now got, by source, as their peers reported (counters)."""
    events: U63 = 0
    pushes: U63 = 0
    refused: U63 = 0
    hosts: Annotated[list[InspectHost], Meta(max_length=MAX_INSPECT_HOSTS)] = []
    tasks: Annotated[list[InspectTask], Meta(max_length=MAX_INSPECT_TASKS)] = []
    task: InspectTask | None = None
    """The task named by ``task_id``, whether or not it is in ``tasks``; none: unknown (or not visible)."""
    peers: Annotated[list[InspectPeer], Meta(max_length=MAX_INSPECT_PEERS)] = []
    truncated: bool = False
    """A list holds fewer records than asked and available, to fit the header frame: ask again from there."""


SCHED_TYPES: tuple[type[Message], ...] = (
    SchedAnnounceHost,
    SchedHostAnnounced,
    SchedRegisterPeer,
    SchedPeerRegistered,
    SchedAnnounceTask,
    SchedTaskAnnounced,
    SchedTaskMetadata,
    SchedPieces,
    SchedPeerFinished,
    SchedPeerFailed,
    SchedPeerLeft,
    SchedReschedule,
    SchedHostLoad,
    SchedParents,
    SchedSeed,
    SchedBackToSource,
    SchedFail,
    SchedDigests,
    SchedTaskInfo,
    SchedRefused,
    SchedDeleteTask,
    SchedTaskDeleted,
    SchedInspect,
    SchedSnapshot,
)
"""Every ``sched.*`` type; a daemon's catalogue for its scheduler session includes them all."""

SCHED_CATALOGUE = Catalogue(SCHED_TYPES, max_payload=0)
"""The scheduler's catalogue. No ``sched.*`` type carries payload frames, so none is accepted."""
