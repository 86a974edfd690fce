"""The manager's wire protocol: the ``mgr.*`` message types and the manager's error codes.

Rules of this file:

* ``protocol.md`` ("Manager protocol (mgr.*)", §17) documents every type; the two must agree.
* Every field has a bound. What the codec cannot check (an IP address, a hostname's characters, a
  setting's range) the manager checks in ``fabric.py`` and answers ``MgrErrorCode.BAD_VALUE``; a daemon or
  scheduler checks the settings it is pushed the same way (``agent.py``) and ignores a bad one.
* A session is one registration: ``mgr.register`` binds the session to one scheduler, seed-peer or host
  instance, and ``mgr.keepalive`` on it keeps that instance active. ``mgr.list_schedulers`` binds the
  session to the scheduler cluster it was answered with, for ``mgr.config`` pushes.
* This file does no I/O.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta

from ..broker import U16, U32, U63, Catalogue, Kind, Message, Name

MAX_SCHEDULERS = 256
"""Most schedulers in one ``mgr.schedulers`` reply."""
MAX_CONFIG_KEYS = 64
"""Most settings in one ``mgr.config`` (or in the ``config`` of a reply)."""

Hostname = Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")]
"""A host name as the REST API takes it: letters, digits, ``.``, ``_``, ``-``."""
Address = Annotated[str, Meta(min_length=1, max_length=64)]
"""An IPv4 or IPv6 address (checked by the manager)."""
Scope = Annotated[str, Meta(max_length=1024)]
"""An IDC or a ``|``-separated location."""
ConfigKey = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]
ConfigValue = bool | int | float | Annotated[str, Meta(max_length=256)]
Settings = Annotated[dict[ConfigKey, ConfigValue], Meta(max_length=MAX_CONFIG_KEYS)]
"""Settings by name: a snapshot of every dynamic setting that applies (absent: the process's own value)."""
InstanceKind = Literal["scheduler", "seed_peer", "host"]
"""``host``: a daemon (a host of the P2P network), a row of the manager's ``hosts`` table."""
HostId = Annotated[str, Meta(max_length=128, pattern=r"^[!-~]*$")]
Label = Annotated[str, Meta(max_length=64)]
Ticket = Annotated[bytes, Meta(max_length=1024)]
"""A tenant ticket (``dfz/tickets.py``, ``protocol.md`` §17.10); empty: none."""
TicketKey = Annotated[bytes, Meta(max_length=32)]
"""The manager's Ed25519 public key (32 bytes) that tenant tickets are checked with; empty: none."""


class MgrErrorCode(IntEnum):
    """Error codes of the manager (range 1400-1499), in ``error`` replies."""

    NOT_REGISTERED = 1400  # keepalive on a session that has not registered (or the manager forgot it): register
    UNKNOWN_CLUSTER = 1401  # the cluster named (or the id given) does not exist; no default cluster to fall back to
    BAD_VALUE = 1402  # a field the codec cannot check is wrong (ip not an address, ...): the reason says which
    STORE_FAILED = 1403  # the database could not be written or read: try again later
    TOKEN_REFUSED = 1404  # the tenant token is unknown, revoked or expired, or its tenant is disabled: the daemon stops


# --- nested records ---------------------------------------------------------------------------------------


class MgrScheduler(msgspec.Struct, kw_only=True):
    """One active scheduler of a cluster: where its fabric endpoint is."""

    id: U63
    hostname: Name
    ip: Address
    port: U16
    endpoint: Annotated[str, Meta(max_length=300)]
    """``tcp://IP:PORT`` (``tcp://[IP]:PORT`` for IPv6): what a daemon connects to and hashes (§14.9)."""
    idc: Scope = ""
    location: Scope = ""


# --- requests and their replies ------------------------------------------------------------------------


class MgrRegister(Message, tag="mgr.register"):
    """A scheduler, a seed peer or a daemon (``host``) registers; answered by :class:`MgrRegistered`. A
    scheduler or seed peer is named by ``hostname``, ``ip`` and its cluster (one instance per host and
    cluster), a host by ``host_id``; registering again (a new session, a restart) takes the same instance
    over and updates its values. A host's scheduler cluster is the one §17.4 picks (``cluster`` and
    ``cluster_id`` are not used)."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    VERSION: ClassVar[int] = 2
    kind: InstanceKind
    hostname: Hostname
    ip: Address
    port: Annotated[int, Meta(ge=1, le=0xFFFF)]
    """A scheduler's fabric port; a seed peer's piece-server port."""
    download_port: U16 = 0
    """A seed peer's download port (0: ``port``)."""
    cluster: Annotated[str, Meta(max_length=255)] = ""
    """The cluster's name (a scheduler cluster for a scheduler, a seed-peer cluster for a seed peer); empty: by
    ``cluster_id``, or the default cluster."""
    cluster_id: U63 = 0
    idc: Scope = ""
    location: Scope = ""
    seed_type: Literal["super", "strong", "weak"] = "super"
    host_id: HostId = ""
    """A host's id (required for ``host``: 1..128 visible ASCII); ignored for the other kinds."""
    os: Label = ""
    """A host's operating system (``linux``)."""
    platform: Label = ""
    """A host's platform (its distribution, when known)."""
    arch: Label = ""
    """A host's machine architecture (``x86_64``)."""
    tenant_token: Annotated[str, Meta(max_length=256)] = ""
    """(1.9) A daemon's or seed peer's daemon token: the manager puts it in the token's tenant and answers with a
    signed ticket (``host_id`` required); empty: no tenant. Refused with ``TOKEN_REFUSED``."""


class MgrRegistered(Message, tag="mgr.registered"):
    """Reply to :class:`MgrRegister`: the instance's id, its cluster, how often to keep alive, and the
    dynamic settings that apply to it now (a scheduler's: its cluster's scheduling settings and the
    ``scheduler`` dynamic configs; a seed peer's and a host's: the ``daemon`` dynamic configs). A host's
    cluster is the scheduler cluster that serves it (0 and "" when none does)."""

    KIND: ClassVar[Kind] = Kind.REPLY
    VERSION: ClassVar[int] = 2
    instance_id: U63
    cluster_id: U63
    cluster: Name
    keepalive_ms: Annotated[int, Meta(ge=10, le=3_600_000)]
    config: Settings = {}
    ticket: Ticket = b""
    """(1.9) With a ``tenant_token``: the tenant ticket to show schedulers and parents."""
    ticket_key: TicketKey = b""
    """(1.9) The key tenant tickets are checked with (schedulers and piece servers trust it)."""


class MgrKeepalive(Message, tag="mgr.keepalive"):
    """The registered instance of this session is alive; answered by :class:`MgrAlive`."""

    KIND: ClassVar[Kind] = Kind.REQUEST


class MgrAlive(Message, tag="mgr.alive"):
    """Reply to :class:`MgrKeepalive`."""

    KIND: ClassVar[Kind] = Kind.REPLY
    VERSION: ClassVar[int] = 2
    instance_id: U63
    ticket: Ticket = b""
    """(1.9) A fresh tenant ticket, when the one the instance holds is past half its life; empty: keep it."""


class MgrListSchedulers(Message, tag="mgr.list_schedulers"):
    """A daemon asks which scheduler cluster serves it; answered by :class:`MgrSchedulers`."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    host_id: Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[!-~]+$")]
    hostname: Annotated[str, Meta(max_length=255)]
    ip: Annotated[str, Meta(max_length=64)] = ""
    """The daemon's address (matched against the clusters' CIDRs when it is an IP address)."""
    idc: Scope = ""
    location: Scope = ""


MatchedBy = Literal["cidr", "hostname", "idc", "location", "default", "none"]


class MgrSchedulers(Message, tag="mgr.schedulers"):
    """Reply to :class:`MgrListSchedulers`: the cluster that serves the daemon (``matched_by`` says by which
    rule; ``none``: no cluster, ``cluster_id`` 0 and no schedulers), its active schedulers, the dynamic
    settings of daemons of that cluster, and when to ask again."""

    KIND: ClassVar[Kind] = Kind.REPLY
    cluster_id: U63
    cluster: Annotated[str, Meta(max_length=255)]
    matched_by: MatchedBy
    schedulers: Annotated[list[MgrScheduler], Meta(max_length=MAX_SCHEDULERS)] = []
    config: Settings = {}
    refresh_ms: Annotated[int, Meta(ge=100, le=86_400_000)] = 30_000


# --- server pushes ----------------------------------------------------------------------------------------


class MgrConfig(Message, tag="mgr.config"):
    """The dynamic settings of the receiving session changed: a whole snapshot (``target`` ``scheduler`` to a
    registered scheduler, ``daemon`` to a daemon or seed peer); a setting absent from it returns to the
    process's own value."""

    KIND: ClassVar[Kind] = Kind.SERVER_PUSH
    target: Literal["scheduler", "daemon"]
    config: Settings
    serial: U32 = 0
    """Grows with every push to this session (pushes arrive in order; informational)."""


# --- jobs (1.7) ---------------------------------------------------------------------------------------------

MAX_HEADERS = 100
"""Most request headers in one ``mgr.preheat``."""
JobTaskState = Literal["running", "succeeded", "failed"]
HeaderName = Annotated[str, Meta(min_length=1, max_length=256)]
Headers = Annotated[dict[HeaderName, Annotated[str, Meta(max_length=8192)]], Meta(max_length=MAX_HEADERS)]


class MgrPreheat(Message, tag="mgr.preheat"):
    """The manager asks the receiving seed peer (or daemon) to download ``url`` into its cache, through its
    schedulers, like ``dfz get`` without an output. The receiver answers with :class:`MgrTaskReport`
    requests about ``(job_id, task)``: ``running`` while it downloads (at most about once a second), then
    ``succeeded`` or ``failed``. A second push for a ``(job_id, task)`` it is already working on (a manager
    that restarted) is not started twice: the receiver reports its state again.

    Revision 2 (1.14) adds ``digest``: a registry blob (an image preheat's layer or config) downloaded as the
    task named by its digest, the registry mirror's task (``protocol.md`` §13, §17.9)."""

    VERSION: ClassVar[int] = 2
    KIND: ClassVar[Kind] = Kind.SERVER_PUSH
    job_id: U63
    task: U32
    """The task's number within the job (the job's result lists them)."""
    url: Annotated[str, Meta(min_length=1, max_length=4096)]
    headers: Headers = {}
    tag: Annotated[str, Meta(max_length=1024)] = ""
    application: Annotated[str, Meta(max_length=1024)] = ""
    filtered_query_params: Annotated[list[Annotated[str, Meta(max_length=256)]], Meta(max_length=64)] | None = None
    """None: the receiver's default list (dfz/tasks.py); otherwise replaces it."""
    piece_length: Annotated[int, Meta(ge=0, le=64 * 1024 * 1024)] = 0
    """0: chosen from the file's length."""
    timeout_ms: Annotated[int, Meta(ge=0, le=86_400_000)] = 0
    """0: no limit."""
    digest: Annotated[str, Meta(max_length=71, pattern=r"^(sha256:[0-9a-f]{64})?$")] = ""
    """(revision 2) ``sha256:<hex>``: ``url`` is a registry blob with this digest; the receiver downloads it as
    the task named by the digest (:func:`dfz.tasks.digest_task_id`, its own tenant, ``tag``,
    ``application`` and ``piece_length``: the task its registry mirror makes for the blob) and checks the
    content against it; ``filtered_query_params`` is then unused. Empty: the task is named by the URL."""


class MgrTaskReport(Message, tag="mgr.task_report"):
    """A seed peer (or daemon) reports on a job's task it was pushed; answered by :class:`MgrNoted`."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    job_id: U63
    task: U32
    state: JobTaskState
    task_id: Annotated[str, Meta(max_length=64, pattern=r"^[0-9a-f]*$")] = ""
    content_length: Annotated[int, Meta(ge=-1, le=2**63 - 1)] = -1
    """-1: not known yet."""
    bytes_done: U63 = 0
    bytes_from_origin: U63 = 0
    bytes_from_peers: U63 = 0
    error: Annotated[str, Meta(max_length=1024)] = ""
    error_kind: Annotated[str, Meta(max_length=64)] = ""


class MgrNoted(Message, tag="mgr.noted"):
    """Reply to :class:`MgrTaskReport`. ``wanted`` false: the manager no longer waits for this task (the
    job ended or was cancelled); the receiver may stop working on it."""

    KIND: ClassVar[Kind] = Kind.REPLY
    wanted: bool = True


# --- get_task and delete_task jobs (1.8) ------------------------------------------------------------------

MAX_JOB_RECORDS = 48
"""Most peers (or hosts) in one ``mgr.task_peers`` or ``mgr.task_deleted``: the largest fits the 64 KiB header
frame; a scheduler with more sends several messages (``more``)."""
TaskId = Annotated[str, Meta(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")]
"""A task id (``protocol.md`` §13): 64 lowercase hex digits."""
VisibleId = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[!-~]+$")]
"""A host id or peer id as the scheduler knows it (§14.2)."""
Why = Annotated[str, Meta(max_length=256)]
PeerState = Literal["pending", "running", "back_to_source", "succeeded", "failed"]
"""A peer's state at its scheduler (§14.1): ``succeeded`` holds the whole task; ``running`` and
``back_to_source`` are downloading it; ``pending`` waits for parents; ``failed`` gave up (forgotten soon)."""
HostType = Literal["normal", "seed"]


class MgrGetTask(Message, tag="mgr.get_task"):
    """The manager asks the receiving scheduler which peers of task ``task_id`` it knows (a ``get_task`` job).
    The scheduler answers with :class:`MgrTaskPeers` requests about ``(job_id, request)``, the last one with
    ``more`` false."""

    KIND: ClassVar[Kind] = Kind.SERVER_PUSH
    job_id: U63
    request: U32
    """The manager's number for this question (one per scheduler and job run); the answers repeat it."""
    task_id: TaskId


class MgrDeleteTask(Message, tag="mgr.delete_task"):
    """The manager asks the receiving scheduler to delete task ``task_id`` from every daemon (and seed peer)
    that holds a peer of it, then to forget the task (a ``delete_task`` job). The scheduler waits up to
    ``timeout_ms`` for its daemons and answers with :class:`MgrTaskDeleted` requests, the last one with
    ``more`` false."""

    KIND: ClassVar[Kind] = Kind.SERVER_PUSH
    job_id: U63
    request: U32
    task_id: TaskId
    timeout_ms: Annotated[int, Meta(ge=1, le=3_600_000)] = 60_000


class MgrTaskPeer(msgspec.Struct, kw_only=True):
    """One peer of a task at a scheduler."""

    peer_id: VisibleId
    host_id: VisibleId
    hostname: Name
    ip: Name
    """Where the host's piece server is reached (an address, or a name)."""
    host_type: HostType
    state: PeerState
    finished_pieces: U32
    """Pieces the peer holds (verified)."""
    piece_count: Annotated[int, Meta(ge=-1, le=0xFFFF_FFFF)] = -1
    """The task's piece count; -1: not known yet."""
    content_length: Annotated[int, Meta(ge=-1, le=2**63 - 1)] = -1
    """The task's length in bytes; -1: not known yet."""


class MgrTaskPeers(Message, tag="mgr.task_peers"):
    """A scheduler answers :class:`MgrGetTask`: some of the task's peers (at most :data:`MAX_JOB_RECORDS`);
    ``more`` true: more messages follow for this ``(job_id, request)``. Answered by :class:`MgrNoted`
    (``wanted`` false: send no more)."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    job_id: U63
    request: U32
    task_id: TaskId
    peers: Annotated[list[MgrTaskPeer], Meta(max_length=MAX_JOB_RECORDS)] = []
    more: bool = False


class MgrDeletedHost(msgspec.Struct, kw_only=True):
    """What one daemon (or seed peer) did about a task it was asked to delete."""

    host_id: VisibleId
    hostname: Name
    ip: Name
    host_type: HostType
    ok: bool
    """The task is not in its cache any more (deleted now, or it held nothing)."""
    held: bool = False
    """Its cache held the task (or part of it)."""
    error: Why = ""
    """Why not ``ok``: the daemon's error, ``no answer within ...``, ``the host left``, ``the daemon does not
    know sched.delete_task``."""


class MgrTaskDeleted(Message, tag="mgr.task_deleted"):
    """A scheduler answers :class:`MgrDeleteTask`: what each host of the task did (at most
    :data:`MAX_JOB_RECORDS` per message; ``more`` true: more follow). Sent once every host answered or
    ``timeout_ms`` passed, after the scheduler forgot the task. Answered by :class:`MgrNoted`."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    job_id: U63
    request: U32
    task_id: TaskId
    hosts: Annotated[list[MgrDeletedHost], Meta(max_length=MAX_JOB_RECORDS)] = []
    more: bool = False


MGR_TYPES: tuple[type[Message], ...] = (
    MgrRegister,
    MgrRegistered,
    MgrKeepalive,
    MgrAlive,
    MgrListSchedulers,
    MgrSchedulers,
    MgrConfig,
    MgrPreheat,
    MgrTaskReport,
    MgrNoted,
    MgrGetTask,
    MgrDeleteTask,
    MgrTaskPeers,
    MgrTaskDeleted,
)

MGR_CATALOGUE = Catalogue(MGR_TYPES, max_payload=0)
"""The manager's catalogue: no ``mgr.*`` type carries payload frames, so none is accepted."""
