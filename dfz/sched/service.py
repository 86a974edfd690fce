"""The scheduler's I/O shell: ``SchedulerService`` runs a fabric server, feeds the sans-I/O core with the
daemons' messages and carries out the core's actions as pushes.

Rules of this file:

* **One writer, no locks, no queue in front of the core.** Every ``core.apply`` call is synchronous and
  runs on the trio thread with no ``await`` between reading state (session bindings, the core's model)
  and applying the event: client pushes and session events are applied inside the fabric server's
  receive loop (its callbacks are plain functions), requests at the very start of their handler task,
  ticks in the tick task. trio runs one task at a time, so events are applied one at a time, each
  completely, in the order the service receives them, and none can be lost to a full queue. A request
  is applied when its handler task starts, just after it arrived; that is why only ``announce_host``,
  ``register_peer`` and ``announce_task`` are requests: a daemon waits for their answer before it
  reports about that host or peer, so nothing it sends later can overtake them.
* **A host is a session.** Each fabric session (routing id) is bound to the one host it announced.
  Messages never name the sender's host; a report about a peer is applied only if the peer is on the
  session's host (else ``NOT_YOUR_PEER``). A session that ends (``bye``, silence, unreachable) makes its
  host leave with its peers (``HostLeft``), and so does a push to it that fails (``PeerGone``) or an
  outbox it does not drain. While a host's session is alive the host is alive: the service refreshes
  every bound host (``HostHeartbeat``) a few times per ``host_timeout``, so the fabric's heartbeats are
  the hosts' heartbeats.
* **Pushes go through one outbox per host**: a bounded queue drained by one sender task, so the pushes
  to a host keep the order the core decided them in, and a slow or stuck daemon delays nobody else.
  Senders never touch the core's model; a sender whose push fails reports ``HostLeft``, applied the same
  synchronous way.

Theory of operation.

* ``sched.announce_host`` binds the session to the host (or re-announces it); a new session with the
  same host id and boot id takes the host over with its peers (a daemon that reconnected), with another
  boot id the old host leaves first (the daemon restarted).
* ``sched.register_peer`` applies ``RegisterPeer``; the actions about the new peer itself (its parents,
  back-to-source or failure, the task's facts and digests) are folded into the reply; everything else is
  pushed. The fabric server sends the reply as soon as the handler returns, without yielding first, so
  before any sender task runs again: pushes decided later reach the daemon after it (unless its queue is
  full, which protocol.md tells daemons not to rely on); digests beyond what fits the reply follow it.
* Reports (``sched.pieces`` and the other client pushes) become one event each (one per piece); a report
  the core refuses is answered with ``sched.refused`` through the host's outbox. ``sched.host_load``
  names no peer: it becomes ``HostLoad`` for the session's host.
* The manager's jobs (``mgrjobs.py``): :meth:`SchedulerService.task_peers` reads a task's peers from the
  core; :meth:`SchedulerService.delete_task` pushes ``sched.delete_task`` through the outboxes of the hosts
  with a peer of the task, collects their ``sched.task_deleted`` (a host that leaves counts as failed), then
  applies ``ForgetTask``.
* **Tenants.** ``sched.announce_host`` may carry a tenant ticket; the service verifies it (a trusted manager
  key, the announced host id, not expired: ``dfz/tickets.py``) and binds the host to its tenant, or refuses
  the announce (``BAD_TICKET``). Registrations and task announcements of a host whose ticket expired are
  refused (``BAD_TICKET``: announce again with a fresh one); the core keeps tenants apart (``WRONG_TENANT``).
  The keys come from the configuration (``ticket_keys``) and from the manager session.
* ``sched.inspect`` (``inspect.py``) reads the core and applies nothing: its snapshot is built at the start
  of its handler task, between two events, from one consistent state, bounded in work and in size; any
  session may ask (``_viewer_tenant`` limits a tenant's sessions to their tenant), unless ``inspect`` is off.
* The tick task applies ``Tick`` at ``core.next_deadline()`` (woken early when an event brings the
  deadline closer) and refreshes the bound hosts.
"""

from __future__ import annotations

import math
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, assert_never

import trio
import zmq

from ..broker import (
    CurveServer,
    ErrorCode,
    KeyPair,
    Message,
    PeerEvent,
    PeerGone,
    PeerSession,
    RemoteError,
    Request,
    Server,
    ServerConfig,
)
from ..broker import load_public_key as _load_public_key
from ..config import ConfigError as ConfigError  # re-exported: the error of this module's loader
from ..config import read_toml
from ..log import event, get_logger
from ..metrics import ListenError as MetricsListenError
from ..metrics import Metrics, counter, fabric_metrics, gauge, parse_listen
from ..metrics import serve as serve_metrics
from ..tasks import InvalidPieceLength, PieceLayout, validate_piece_length
from ..tickets import CLOCK_SKEW, TicketError, TicketVerifier, parse_public_key
from .actions import (
    Action,
    BackToSource,
    FailPeer,
    ForwardDigests,
    ForwardTaskInfo,
    HostRemoved,
    ParentCandidate,
    PushParents,
    TriggerSeed,
)
from .config import WEIGHT_KEYS, SchedulerConfig
from .core import SchedulerCore
from .errors import InvalidTransition, SchedulerError, TenantMismatch, UnknownHost, UnknownPeer
from .evaluator import Evaluator, evaluator_for
from .events import (
    AnnounceHost,
    AnnounceTask,
    Event,
    ForgetTask,
    HostHeartbeat,
    HostLeft,
    HostLoad,
    PeerFailed,
    PeerFinished,
    PeerLeft,
    PieceFailed,
    PieceFinished,
    RegisterPeer,
    RescheduleRequest,
    TaskMetadataKnown,
    Tick,
)
from .inspect import SnapshotCounters, build_snapshot
from .messages import (
    MAX_DIGESTS_PER_MESSAGE,
    MAX_PARENTS,
    MAX_PEERS_PER_MESSAGE,
    SCHED_CATALOGUE,
    SchedAnnounceHost,
    SchedAnnounceTask,
    SchedBackToSource,
    SchedDeleteTask,
    SchedDigests,
    SchedErrorCode,
    SchedFail,
    SchedHostAnnounced,
    SchedHostLoad,
    SchedInspect,
    SchedParent,
    SchedParents,
    SchedPeerFailed,
    SchedPeerFinished,
    SchedPeerLeft,
    SchedPeerRegistered,
    SchedPieces,
    SchedRefused,
    SchedRegisterPeer,
    SchedReschedule,
    SchedSeed,
    SchedSnapshot,
    SchedTaskAnnounced,
    SchedTaskDeleted,
    SchedTaskInfo,
    SchedTaskMetadata,
)
from .model import HostType
from .state import PeerState

if TYPE_CHECKING:
    from prometheus_client import Histogram
    from prometheus_client.metrics_core import Metric

log = get_logger("sched.service")

T = TypeVar("T")

DEFAULT_LISTEN = "tcp://127.0.0.1:8002"
"""Where ``dfz sched`` listens unless told otherwise: loopback, since the fabric is unauthenticated
unless CURVE is configured. Bind ``tcp://0.0.0.0:8002`` (or an interface) for daemons on other machines."""

_MAX_TICK_SLEEP = 1.0
"""The tick task wakes at least this often, whatever ``next_deadline`` says (a guard, not a need)."""
_MAX_STRAY_PUSHES = 64
"""Refusals in flight to sessions that have no host (and so no outbox); more are dropped."""
_MAX_TEXT = 4096
INSPECT_BURST = 5.0
"""Seconds over which ``inspect_share`` is averaged: observers may use up to ``5 * inspect_share`` seconds at once."""

RUNTIME_SETTINGS = frozenset(
    (
        "evaluator",
        *WEIGHT_KEYS,
        "seed_fanout",
        "candidate_parent_limit",
        "candidate_parent_sample",
        "bad_parent_ratio",
        "bad_parent_sigmas",
        "bad_parent_cost_floor",
        "bad_parent_timeout",
        "retry_interval",
        "retry_jitter",
        "seed_trigger_timeout",
    )
)
"""Settings :meth:`SchedulerService.reconfigure` takes while running: they are read afresh at every decision.
The others need a restart, because the core's state was built or is checked against them: ``host_timeout``
(the tick loop's period), ``task_ttl``, ``max_peers_per_task`` and ``back_to_source_limit`` (bounds the
core's invariants hold what it has against), ``bad_parent_window`` (the parents' cost windows),
``retry_limit`` (attempts counted so far) and ``seed`` (the random generator)."""

Report = SchedTaskMetadata | SchedPieces | SchedPeerFinished | SchedPeerFailed | SchedPeerLeft | SchedReschedule
_REPORT_TYPES: tuple[type[Report], ...] = (
    SchedTaskMetadata,
    SchedPieces,
    SchedPeerFinished,
    SchedPeerFailed,
    SchedPeerLeft,
    SchedReschedule,
)


# --- configuration ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceConfig:
    """Settings of ``dfz sched``, with defaults. :meth:`load` reads them from a TOML file whose top-level
    keys are these fields and whose ``[scheduler]`` table holds the fields of :class:`SchedulerConfig`."""

    name: str = "dfz-sched"
    """The server's name in ``welcome`` and in logs."""
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    """Endpoints to bind (``tcp://host:port``, ``ipc://path``, ``inproc://name``); port 0 picks a free one."""
    heartbeat: float = 1.0
    """Seconds between fabric heartbeats; a daemon silent for ``heartbeat * liveness`` leaves."""
    liveness: int = 3
    max_in_flight: int = 16
    """Requests a daemon may have open at once (its credit)."""
    send_timeout: float = 2.0
    """Seconds a push waits for room at a daemon that does not read; then its host leaves."""
    outbox_limit: int = 1024
    """Pushes that may wait for one host; a host with more is declared gone."""
    curve_secret_key: Path | None = None
    """The scheduler's CURVE key pair (``NAME.key_secret`` from ``dfz keygen``); unset: no encryption."""
    curve_allowed_keys: tuple[Path, ...] = ()
    """Public key files (``*.key``) of the daemons allowed to connect, or directories of them."""
    manager: str = ""
    """The manager's fabric endpoint (``dfz mgr`` prints it): register there, keep alive, and take the
    cluster's scheduling settings and dynamic configs while running (:data:`RUNTIME_SETTINGS`). Empty: none."""
    cluster: str = ""
    """The scheduler cluster to register in (its name); empty: the manager's default cluster."""
    hostname: str = ""
    """The name registered with the manager; empty: this machine's host name. The manager knows one scheduler
    per host name, address and cluster: two schedulers of a cluster on one machine need two names."""
    advertise_ip: str = ""
    """The address daemons reach this scheduler at, as registered; empty: the first tcp endpoint's host."""
    ticket_keys: tuple[str, ...] = ()
    """Public keys (64 hex digits, as ``dfz mgr`` prints ``ticket-key``) of managers whose tenant tickets this
    scheduler accepts, besides the key its own manager session gives. None at all: a host with a ticket is refused."""
    metrics_listen: str = ""
    """``HOST:PORT`` to serve Prometheus metrics on (``GET /metrics``, ``dfz/metrics.py``); empty: none."""
    inspect: bool = True
    """Answer ``sched.inspect`` (``dfz top``, the manager's console); off: every inspection is refused
    (``NOT_ALLOWED``). Who may see what is in protocol.md (§14.3, ``sched.inspect``)."""
    inspect_share: float = 0.1
    """The share of the scheduler's time that building snapshots may take, averaged over
    :data:`INSPECT_BURST` seconds: beyond it, inspections are refused (``INSPECT_BUSY``) until the share is
    back, so that observers can never starve the daemons' events."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 256:
            raise ConfigError("name: must be 1 to 256 characters")
        if self.metrics_listen:
            try:
                parse_listen(self.metrics_listen)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if not self.listen:
            raise ConfigError("listen: needs at least one endpoint")
        for endpoint in self.listen:
            scheme, sep, rest = endpoint.partition("://")
            if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest:
                raise ConfigError(f"listen: {endpoint!r} is not an endpoint such as tcp://127.0.0.1:8002 or ipc:///run/dfz/sched")
        for key in ("heartbeat", "send_timeout"):
            value = getattr(self, key)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{key}: must be a positive number of seconds, got {value!r}")
        if not 0.01 <= self.heartbeat <= 3600:
            raise ConfigError(f"heartbeat: must be between 0.01 and 3600 seconds, got {self.heartbeat!r}")
        for key, low, high in (("liveness", 1, 1000), ("max_in_flight", 1, 65536), ("outbox_limit", 1, 1 << 20)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{key}: must be an integer from {low} to {high}, got {value!r}")
        if self.scheduler.candidate_parent_limit > MAX_PARENTS:
            raise ConfigError(f"scheduler.candidate_parent_limit: at most {MAX_PARENTS} (parents in one sched.parents push)")
        share = self.inspect_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
            raise ConfigError(f"inspect_share: must be a number in (0, 1], got {share!r}")
        if self.curve_allowed_keys and self.curve_secret_key is None:
            raise ConfigError("curve_allowed_keys: set curve_secret_key too (the scheduler's own key pair)")
        if self.manager:
            scheme, sep, rest = self.manager.partition("://")
            if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest:
                raise ConfigError(f"manager: {self.manager!r} is not an endpoint such as tcp://10.0.0.1:8003")
            if not any(e.startswith("tcp://") for e in self.listen):
                raise ConfigError("manager: registering needs a tcp listen endpoint (daemons connect to what is registered)")
        if len(self.cluster) > 255 or len(self.hostname) > 255 or len(self.advertise_ip) > 64:
            raise ConfigError("cluster and hostname: at most 255 characters; advertise_ip: at most 64")
        for key in self.ticket_keys:
            try:
                parse_public_key(key)
            except (ValueError, AttributeError) as e:
                raise ConfigError(f"ticket_keys: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> ServiceConfig:
        """Read a TOML file. Relative key paths are relative to the file's directory."""
        path = Path(path)
        data = read_toml(path)
        return cls.from_mapping(data, source=str(path), base=path.parent)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "config", base: Path | None = None) -> ServiceConfig:
        """Build and validate a config from a mapping (a parsed TOML document). Errors name the key."""
        top: dict[str, Any] = {}
        known = {f.name for f in fields(cls)}
        for key, value in data.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown key {key!r} (known keys: {', '.join(sorted(known))})")
            top[key] = value
        values: dict[str, Any] = {}
        try:
            for key, value in top.items():
                if key == "scheduler":
                    values[key] = _scheduler_config(value)
                elif key == "listen":
                    values[key] = _endpoints(value)
                elif key == "ticket_keys":
                    items = value if isinstance(value, list) else [value]
                    values[key] = tuple(_typed(key, v, str, "64 hex digits or a list of them") for v in items)
                elif key in ("name", "manager", "cluster", "hostname", "advertise_ip"):
                    values[key] = _typed(key, value, str, "a string")
                elif key in ("heartbeat", "send_timeout"):
                    values[key] = float(_typed(key, value, int | float, "a number of seconds"))
                elif key in ("liveness", "max_in_flight", "outbox_limit"):
                    values[key] = _typed(key, value, int, "an integer")
                elif key == "inspect":
                    if not isinstance(value, bool):
                        raise ConfigError(f"inspect: must be true or false, got {value!r}")
                    values[key] = value
                elif key == "inspect_share":
                    values[key] = float(_typed(key, value, int | float, "a number in (0, 1]"))
                elif key == "curve_secret_key":
                    values[key] = _path(base, _typed(key, value, str, "a file name"))
                elif key == "curve_allowed_keys":
                    names = value if isinstance(value, list) else [value]
                    values[key] = tuple(_path(base, _typed(key, v, str, "a file or directory name")) for v in names)
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def server_config(self) -> ServerConfig:
        return ServerConfig(
            heartbeat=self.heartbeat,
            liveness=self.liveness,
            max_in_flight=self.max_in_flight,
            send_timeout=self.send_timeout,
        )

    def curve(self) -> CurveServer | None:
        """The CURVE settings of the server, reading the key files; ``None`` for a plain fabric."""
        if self.curve_secret_key is None:
            return None
        try:
            keys = KeyPair.load(self.curve_secret_key)
            allowed: set[bytes] = set()
            for entry in self.curve_allowed_keys:
                files = sorted(entry.glob("*.key")) if entry.is_dir() else [entry]
                allowed.update(_load_public_key(f) for f in files)
        except (OSError, ValueError) as e:
            raise ConfigError(f"curve: cannot load the keys: {e}") from None
        return CurveServer(keys, frozenset(allowed))


def _typed(key: str, value: Any, kind: Any, what: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{key}: must be {what}, got {value!r}")
    return value


def _endpoints(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    return tuple(_typed("listen", v, str, "an endpoint or a list of endpoints") for v in items)


def _path(base: Path | None, name: str) -> Path:
    p = Path(name).expanduser()
    return p if p.is_absolute() or base is None else base / p


_PLAIN_NUMBERS = ("_weight", "_ratio", "_sigmas", "_jitter")
"""Endings of the ``[scheduler]`` keys whose numbers are not seconds."""


def _scheduler_config(table: Any) -> SchedulerConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"scheduler: must be a table ([scheduler]), got {table!r}")
    kinds = {f.name: f.type for f in fields(SchedulerConfig)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        kind = kinds.get(key)
        if kind is None:
            raise ConfigError(f"unknown key 'scheduler.{key}' (known keys: {', '.join(sorted(kinds))})")
        if kind in ("str", str):
            values[key] = _typed(f"scheduler.{key}", value, str, "a string")
        elif kind in ("int", int):
            values[key] = _typed(f"scheduler.{key}", value, int, "an integer")
        else:
            what = "a number" if key.endswith(_PLAIN_NUMBERS) else "a number of seconds"
            values[key] = float(_typed(f"scheduler.{key}", value, int | float, what))
    try:
        return SchedulerConfig(**values)
    except ValueError as e:
        raise ConfigError(f"scheduler.{e}") from None


# --- the service ------------------------------------------------------------------------------------------


@dataclass
class ServiceStats:
    events: int = 0
    """Events applied to the core."""
    refused: Counter[str] = field(default_factory=Counter)
    """Requests and reports refused, by error code name."""
    pushes: int = 0
    """Pushes delivered to daemons."""
    undeliverable: int = 0
    """Actions for a peer or host that was gone by the time they were decided."""
    hosts_lost: int = 0
    """Hosts removed because a push to them failed or their outbox overflowed."""
    tickets_refused: Counter[str] = field(default_factory=Counter)
    """Tenant tickets refused, by kind (``malformed``, ``signature``, ``expired``, ``wrong_host``, ...)."""
    inspections: int = 0
    """``sched.inspect`` requests answered with a snapshot."""
    inspect_seconds: float = 0.0
    """Time spent building those snapshots (the scheduler's loop did nothing else meanwhile)."""


@dataclass(eq=False)
class _Binding:
    """A host and the session it announced on, with the outbox of pushes to it."""

    host_id: str
    boot: str
    rid: bytes
    user_id: str | None
    tenant: str = ""
    ticket_expires: float | None = None
    """When the host's ticket expires (Unix seconds); None: no ticket (no tenant)."""
    queue: deque[Message] = field(default_factory=deque)
    wakeup: trio.Event = field(default_factory=trio.Event)
    closed: bool = False
    overflow: bool = False
    sending: trio.CancelScope = field(default_factory=trio.CancelScope)
    """Around the push in progress: cancelled when the host is unbound or its outbox overflows."""
    announcing: _Announcing | None = None
    """A task announcement in parts this session has begun."""


@dataclass(frozen=True)
class TaskPeerView:
    """One peer of a task, as a ``get_task`` job reports it (``protocol.md`` §17.9)."""

    peer_id: str
    host_id: str
    hostname: str
    ip: str
    host_type: str
    state: str
    finished_pieces: int
    piece_count: int
    """-1: not known."""
    content_length: int
    """-1: not known."""


@dataclass
class HostDeletion:
    """What one host did about a task it was asked to delete (``delete_task`` job)."""

    host_id: str
    hostname: str
    ip: str
    host_type: str
    ok: bool = False
    held: bool = False
    error: str = ""


@dataclass(eq=False)
class _Deletion:
    task_id: str
    hosts: dict[str, HostDeletion]
    waiting: set[str]
    done: trio.Event = field(default_factory=trio.Event)

    def answer(self, host_id: str, *, ok: bool, held: bool = False, error: str = "") -> None:
        if host_id not in self.waiting:
            return
        self.waiting.discard(host_id)
        outcome = self.hosts[host_id]
        outcome.ok, outcome.held, outcome.error = ok, held, error[:256]
        if not self.waiting:
            self.done.set()


_PART_TIMEOUT = 30.0
"""Seconds a task announcement in parts waits for its next part before it is dropped."""


@dataclass
class _Announcing:
    """A task announcement in parts (``sched.announce_task`` with ``more``), as far as it came."""

    fields: tuple[object, ...]
    digests: list[tuple[int, str]] = field(default_factory=list)
    expires: float = 0.0


class _Refused(RemoteError):
    """A request or report the scheduler will not apply; ``piece`` is the piece report it stopped at."""

    def __init__(self, code: int, reason: str, piece: int | None = None) -> None:
        super().__init__(code, reason[:_MAX_TEXT])
        self.piece = piece


class ListenError(Exception):
    """The service could not bind one of its endpoints (in use, bad address, no permission)."""


class SchedulerService:
    """The scheduler as a fabric server. ``await nursery.start(SchedulerService(config).run)`` returns the
    service once it listens (``endpoints`` holds the bound addresses); cancel to stop.

    ``core`` is the :class:`SchedulerCore` it drives (on trio's clock); read it, never apply to it from
    outside. ``stats`` counts what happened, for metrics and tests.
    """

    def __init__(
        self,
        config: ServiceConfig | None = None,
        *,
        evaluator: Evaluator | None = None,
        ctx: zmq.Context[Any] | None = None,
    ) -> None:
        self.config = config or ServiceConfig()
        self.core = SchedulerCore(self.config.scheduler, clock=trio.current_time, evaluator=evaluator)
        self._own_evaluator = evaluator is None
        self.server = Server(
            SCHED_CATALOGUE,
            self.config.listen,
            name=self.config.name,
            config=self.config.server_config(),
            curve=self.config.curve(),
            ctx=ctx,
            on_peer_event=self._on_peer_event,
        )
        self.server.handle(SchedAnnounceHost, self._on_announce)
        self.server.handle(SchedRegisterPeer, self._on_register)
        self.server.handle(SchedAnnounceTask, self._on_announce_task)
        for report in _REPORT_TYPES:
            self.server.on_push(report, self._on_report)
        self.server.on_push(SchedHostLoad, self._on_host_load)
        self.server.on_push(SchedTaskDeleted, self._on_task_deleted)
        self.server.handle(SchedInspect, self._on_inspect)
        self.stats = ServiceStats()
        self.metrics: Metrics | None = None
        """The Prometheus metrics, when ``metrics_listen`` is set; ``metrics_url`` where they are served."""
        self.metrics_url = ""
        self._decision_seconds: Histogram | None = None
        if self.config.metrics_listen:
            self.metrics = Metrics("sched")
            self.metrics.collector(self._collect_metrics)
            self._decision_seconds = self.metrics.histogram(
                "sched_event_seconds", "Time the scheduler core took to apply an event, by event type.", ["event"]
            )
        self.tickets = TicketVerifier(parse_public_key(k) for k in self.config.ticket_keys)
        """The manager keys tenant tickets are checked with (:meth:`trust_key` adds the manager session's)."""
        self._hosts: dict[str, _Binding] = {}
        self._sessions: dict[bytes, _Binding] = {}
        self._nursery: trio.Nursery | None = None
        self._tick_wakeup = trio.Event()
        self._tick_at = math.inf
        self._strays = 0
        self._deletions: dict[int, _Deletion] = {}
        self._deletion_serial = 0
        self._inspect_credit = INSPECT_BURST * self.config.inspect_share
        """Seconds of snapshot building allowed now (a token bucket refilled at ``inspect_share``)."""
        self._inspect_refilled = 0.0

    @property
    def endpoints(self) -> list[str]:
        """The bound endpoints (a ``tcp://...:0`` resolved to its port), once started."""
        return self.server.endpoints

    def reconfigure(self, settings: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        """Take new settings while running (the manager's ``mgr.config``): ``settings`` is a whole snapshot
        over the start configuration (``config.scheduler``; a key absent returns to its start value). Only
        :data:`RUNTIME_SETTINGS` are taken; the others are returned as ignored. The core's config object is
        replaced whole, between two events (this runs on the trio thread, like every ``apply``), and the
        evaluator is rebuilt when its settings changed unless the service was given one of its own.
        Raises ``ValueError`` (nothing changes) when the result breaks a rule of :class:`SchedulerConfig`.
        Returns ``(taken, ignored)`` key names."""
        taken = {k: v for k, v in settings.items() if k in RUNTIME_SETTINGS}
        ignored = sorted(k for k in settings if k not in RUNTIME_SETTINGS)
        try:
            new = replace(self.config.scheduler, **taken)
        except (TypeError, ValueError) as e:
            raise ValueError(f"scheduler settings refused: {e}") from None
        if new.candidate_parent_limit > MAX_PARENTS:
            raise ValueError(f"candidate_parent_limit: at most {MAX_PARENTS} (parents in one sched.parents push)")
        old = self.core.config
        self.core.config = new
        if self._own_evaluator and any(getattr(old, k) != getattr(new, k) for k in ("evaluator", "seed_fanout", *WEIGHT_KEYS)):
            self.core.evaluator = evaluator_for(new)
        event(log, 20, "sched_reconfigured", taken=",".join(sorted(taken)) or "-", ignored=",".join(ignored) or "-")
        return sorted(taken), ignored

    def trust_key(self, key: bytes) -> None:
        """Accept tenant tickets signed with ``key`` (a manager's public key) from now on."""
        try:
            if self.tickets.trust(key):
                event(log, 20, "sched_ticket_key", key=key.hex()[:16])
        except ValueError as e:
            event(log, 30, "sched_ticket_key_refused", error=str(e))

    def host_of(self, routing_id: bytes) -> str | None:
        """The host a session announced, if any."""
        binding = self._sessions.get(routing_id)
        return binding.host_id if binding is not None else None

    def session_of(self, host_id: str) -> bytes | None:
        """The routing id of the session a host is bound to, if any."""
        binding = self._hosts.get(host_id)
        return binding.rid if binding is not None else None

    # --- the manager's jobs (get_task, delete_task: protocol.md §17.9) ---------------------------------------

    def task_peers(self, task_id: str) -> list[TaskPeerView]:
        """The peers of ``task_id`` this scheduler knows now (none for an unknown task), by peer id."""
        task = self.core.tasks.get(task_id)
        if task is None:
            return []
        count = task.piece_count
        length = task.content_length
        return [
            TaskPeerView(
                peer_id=peer.id,
                host_id=peer.host.id,
                hostname=peer.host.hostname[:256],
                ip=peer.host.ip[:256],
                host_type=peer.host.type.value,
                state=peer.state.value,
                finished_pieces=peer.finished_count,
                piece_count=-1 if count is None else count,
                content_length=-1 if length is None else length,
            )
            for peer in sorted(task.peers.values(), key=lambda p: p.id)
        ]

    async def delete_task(self, task_id: str, wait: float) -> list[HostDeletion]:
        """Ask every host that has a peer of ``task_id`` to delete it from its cache (``sched.delete_task``),
        wait until each answered (``sched.task_deleted``), left, or ``wait`` seconds passed, then forget
        the task (every peer of it leaves). Returns what each host did, by host id; none for an unknown task."""
        task = self.core.tasks.get(task_id)
        if task is None:
            return []
        self._deletion_serial = (self._deletion_serial + 1) % 2**32
        request = self._deletion_serial
        hosts = {p.host.id: p.host for p in task.peers.values()}
        outcomes = {hid: HostDeletion(hid, h.hostname[:256], h.ip[:256], h.type.value) for hid, h in sorted(hosts.items())}
        deletion = _Deletion(task_id, outcomes, set(outcomes))
        self._deletions[request] = deletion
        try:
            for host_id in sorted(outcomes):
                binding = self._hosts.get(host_id)
                session = self.server.peers.get(binding.rid) if binding is not None else None
                if binding is None or session is None:
                    deletion.answer(host_id, ok=False, error="the host is not connected to this scheduler")
                elif SchedDeleteTask.wire_name() not in session.types:
                    deletion.answer(host_id, ok=False, error="the daemon does not know sched.delete_task (protocol < 1.8)")
                else:
                    self._enqueue(binding, SchedDeleteTask(task_id=task_id, request=request))
            event(log, 20, "task_delete_asked", task=task_id, hosts=len(outcomes), waiting=len(deletion.waiting))
            if deletion.waiting:
                with trio.move_on_after(wait):
                    await deletion.done.wait()
            for host_id in sorted(deletion.waiting):
                deletion.answer(host_id, ok=False, error=f"no answer within {wait:g} s")
        finally:
            del self._deletions[request]
        self._execute(self._apply(ForgetTask(task_id)))
        failed = sum(1 for o in outcomes.values() if not o.ok)
        event(log, 20, "task_deleted", task=task_id, hosts=len(outcomes), failed=failed)
        return list(outcomes.values())

    def _on_task_deleted(self, session: PeerSession, msg: Message, payload: list[Any]) -> None:
        assert isinstance(msg, SchedTaskDeleted)
        binding = self._sessions.get(session.routing_id)
        deletion = self._deletions.get(msg.request)
        if binding is None or deletion is None or deletion.task_id != msg.task_id or binding.host_id not in deletion.waiting:
            why = f"no deletion of task {msg.task_id} (request {msg.request}) waits for this session's answer"
            self._refuse_report(session, msg, _Refused(SchedErrorCode.WRONG_STATE, why))
            return
        deletion.answer(binding.host_id, ok=not msg.error, held=msg.held, error=msg.error)

    async def run(self, *, task_status: trio.TaskStatus[SchedulerService] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled. Raises what binding raises (``zmq.ZMQError``) before starting."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.server.run)
                if self.metrics is not None:
                    self.metrics_url = await nursery.start(serve_metrics, self.metrics, self.config.metrics_listen)
                nursery.start_soon(self._tick_loop)
                event(log, 20, "sched_started", name=self.config.name, endpoints=",".join(self.endpoints))
                task_status.started(self)
        finally:
            self._nursery = None
            for binding in list(self._hosts.values()):
                self._unbind(binding)

    # --- applying events (synchronous: see the rules above) -------------------------------------------------

    def _apply(self, ev: Event) -> list[Action]:
        if self._decision_seconds is None:
            actions = self.core.apply(ev)
        else:
            started = time.perf_counter()
            try:
                actions = self.core.apply(ev)
            finally:
                self._decision_seconds.labels(type(ev).__name__).observe(time.perf_counter() - started)
        self.stats.events += 1
        deadline = self.core.next_deadline()
        if deadline is not None and deadline < self._tick_at < math.inf:
            self._tick_wakeup.set()  # the tick task sleeps past the new deadline: wake it
        return actions

    def _collect_metrics(self) -> Iterable[Metric]:
        core, stats = self.core, self.stats
        yield from fabric_metrics(self.server.stats, len(self.server.peers))
        yield gauge("sched_hosts", "Hosts the scheduler knows.", len(core.hosts))
        yield gauge("sched_tasks", "Tasks the scheduler knows.", len(core.tasks))
        states: dict[tuple[str, ...], float] = {(state.value,): 0 for state in PeerState if state is not PeerState.LEFT}
        for task in core.tasks.values():
            for state, n in task.counts.items():
                if (state.value,) in states:
                    states[(state.value,)] += n
        yield gauge("sched_peers", "Peers the scheduler knows, by state.", states, ["state"])
        yield counter("sched_events", "Events applied to the scheduler core.", stats.events)
        yield counter("sched_pushes", "Pushes delivered to daemons.", stats.pushes)
        refused = {(code,): n for code, n in stats.refused.items()} or {("none",): 0}
        yield counter("sched_refused", "Requests and reports refused, by error code.", refused, ["code"])
        yield counter("sched_hosts_lost", "Hosts removed because a push to them failed.", stats.hosts_lost)
        yield counter("sched_inspections", "sched.inspect requests answered with a snapshot.", stats.inspections)
        yield counter("sched_inspect_seconds", "Time spent building sched.inspect snapshots.", stats.inspect_seconds)
        tickets = {(kind,): n for kind, n in stats.tickets_refused.items()} or {("none",): 0}
        yield counter("sched_tickets_refused", "Tenant tickets refused, by kind.", tickets, ["kind"])
        origin = sum(task.bytes_from_origin for task in core.tasks.values())
        peers = sum(task.bytes_from_peers for task in core.tasks.values())
        yield gauge("sched_task_bytes", "Bytes the tasks known now got, by source (as peers reported).",
                    {("origin",): origin, ("peer",): peers}, ["source"])  # fmt: skip
        back = sum(task.counts.get(PeerState.BACK_TO_SOURCE, 0) for task in core.tasks.values())
        yield gauge("sched_back_to_source_peers", "Peers fetching from the origin now.", back)

    def _apply_or_refuse(self, ev: Event, piece: int | None = None) -> list[Action]:
        try:
            return self._apply(ev)
        except SchedulerError as e:
            raise _Refused(_code_of(e), str(e), piece) from None

    def _binding(self, session: PeerSession) -> _Binding:
        binding = self._sessions.get(session.routing_id)
        if binding is None:
            raise _Refused(SchedErrorCode.NOT_ANNOUNCED, "this session has not announced a host: send sched.announce_host first")
        return binding

    def _check_peer(self, binding: _Binding, peer_id: str) -> None:
        peer = self.core.peers.get(peer_id)
        if peer is None:
            raise _Refused(SchedErrorCode.UNKNOWN_PEER, f"unknown peer {peer_id!r}: register it first (it may have left)")
        if peer.host.id != binding.host_id:
            raise _Refused(
                SchedErrorCode.NOT_YOUR_PEER,
                f"peer {peer_id!r} is registered on another host than this session's ({binding.host_id!r})",
            )

    # --- requests ---------------------------------------------------------------------------------------------

    async def _on_announce(self, req: Request) -> SchedHostAnnounced:
        assert isinstance(req.msg, SchedAnnounceHost)
        return self._announce(req.peer, req.msg)  # no await before: applied in arrival order

    async def _on_register(self, req: Request) -> SchedPeerRegistered:
        assert isinstance(req.msg, SchedRegisterPeer)
        return self._register(req.peer, req.msg)  # no await before: applied in arrival order

    async def _on_announce_task(self, req: Request) -> SchedTaskAnnounced:
        assert isinstance(req.msg, SchedAnnounceTask)
        return self._announce_task(req.peer, req.msg)  # no await before: applied in arrival order

    async def _on_inspect(self, req: Request) -> SchedSnapshot:
        assert isinstance(req.msg, SchedInspect)
        return self._inspect(req.peer, req.msg)  # no await: built between two events, from one state

    def _inspect(self, session: PeerSession, msg: SchedInspect) -> SchedSnapshot:
        if not self.config.inspect:
            raise self._refused(SchedErrorCode.NOT_ALLOWED, "this scheduler does not answer sched.inspect (inspect = false)")
        tenant = self._viewer_tenant(session)
        started = trio.current_time()
        share = self.config.inspect_share
        credit = self._inspect_credit + (started - self._inspect_refilled) * share
        self._inspect_credit, self._inspect_refilled = min(credit, INSPECT_BURST * share), started
        if self._inspect_credit <= 0:
            raise self._refused(
                SchedErrorCode.INSPECT_BUSY,
                f"inspections take more than their share ({share:.0%}) of the scheduler's time: ask again in a second",
            )
        stats = self.stats
        snapshot = build_snapshot(
            self.core.hosts.values(),
            self.core.tasks.values(),
            msg,
            scheduler=self.config.name,
            now=trio.current_time(),
            tenant=tenant,
            # The service's counters are over every tenant: a view limited to one does not get them.
            counters=None if tenant else SnapshotCounters(stats.events, stats.pushes, sum(stats.refused.values())),
            find_task=self.core.tasks.get,
        )
        spent = trio.current_time() - started
        self._inspect_credit -= spent
        self.stats.inspections += 1
        self.stats.inspect_seconds += spent
        return snapshot

    def _viewer_tenant(self, session: PeerSession) -> str:
        """The tenant an inspecting session is limited to: its own host's, else that of a host held by the
        same CURVE key (a tenant's daemon cannot see more by opening a session that announces nothing);
        "" (everything) for a session of no tenant. A key holding hosts of two tenants is refused."""
        binding = self._sessions.get(session.routing_id)
        if binding is not None and binding.tenant:
            return binding.tenant
        if session.user_id is None:
            return ""
        tenants = {b.tenant for b in self._hosts.values() if b.user_id == session.user_id and b.tenant}
        if len(tenants) > 1:
            raise self._refused(
                SchedErrorCode.NOT_ALLOWED, "this client's key holds hosts of several tenants: inspect from one of their sessions"
            )
        return tenants.pop() if tenants else ""

    def _announce_task(self, session: PeerSession, msg: SchedAnnounceTask) -> SchedTaskAnnounced:
        try:
            _check_piece_length(msg.piece_length)
            binding = self._binding(session)
            self._check_ticket(binding)
            digests = self._announcement_digests(binding, msg)
            if digests is None:
                return SchedTaskAnnounced(peer_id=msg.peer_id, task_id=msg.task_id, pending=True)
            actions = self._apply_or_refuse(
                AnnounceTask(
                    peer_id=msg.peer_id,
                    task_id=msg.task_id,
                    host_id=binding.host_id,
                    url=msg.url,
                    tag=msg.tag,
                    application=msg.application,
                    piece_length=msg.piece_length,
                    content_length=msg.content_length,
                    digest=msg.digest,
                    digests=digests,
                )
            )
        except _Refused as e:
            self.stats.refused[_code_name(e.code)] += 1
            raise
        self._execute(actions)
        event(log, 20, "task_announced", peer=msg.peer_id, task=msg.task_id, tenant=binding.tenant or "-", host=binding.host_id)
        return SchedTaskAnnounced(peer_id=msg.peer_id, task_id=msg.task_id)

    def _announcement_digests(self, binding: _Binding, msg: SchedAnnounceTask) -> tuple[tuple[int, str], ...] | None:
        """The digests of a whole announcement, or None when ``msg`` is a part and more are to come. A
        session has one announcement in parts at a time; its parts carry the same fields; it is dropped
        when a part comes late (``_PART_TIMEOUT``) or the session ends."""
        key = (msg.peer_id, msg.task_id, msg.url, msg.piece_length, msg.content_length, msg.digest, msg.tag, msg.application)
        now = time.monotonic()
        partial = binding.announcing
        if partial is not None and partial.expires < now:
            partial = binding.announcing = None
        if partial is None and not msg.more:
            return tuple((piece, digest) for piece, digest in msg.digests)
        if partial is None:
            partial = binding.announcing = _Announcing(key)
        elif partial.fields != key:
            binding.announcing = None
            raise _Refused(
                ErrorCode.INVALID,
                f"sched.announce_task for {msg.peer_id}: the parts of an announcement carry the same fields "
                f"(and one announcement in parts at a time per session); {partial.fields[0]}'s is dropped",
            )
        count = -(-msg.content_length // msg.piece_length)
        if len(partial.digests) + len(msg.digests) > count:
            binding.announcing = None
            raise _Refused(
                ErrorCode.INVALID, f"sched.announce_task for {msg.peer_id}: more digests than the task's {count} pieces"
            )
        partial.digests.extend((piece, digest) for piece, digest in msg.digests)
        partial.expires = now + _PART_TIMEOUT
        if msg.more:
            return None
        binding.announcing = None
        return tuple(partial.digests)

    def _check_ticket(self, binding: _Binding) -> None:
        if binding.ticket_expires is not None and binding.ticket_expires < time.time() - CLOCK_SKEW:
            self.stats.tickets_refused["expired"] += 1
            raise _Refused(
                SchedErrorCode.BAD_TICKET,
                f"the tenant ticket of host {binding.host_id!r} expired: announce the host again with a fresh one",
            )

    def _verify_ticket(self, msg: SchedAnnounceHost) -> tuple[str, float | None]:
        """The tenant the announce's ticket proves, and when it expires; ("", None) without a ticket."""
        if not msg.ticket:
            return "", None
        try:
            ticket = self.tickets.verify(msg.ticket, now=time.time(), host_id=msg.host_id)
        except TicketError as e:
            self.stats.tickets_refused[e.kind] += 1
            event(log, 30, "ticket_refused", host=msg.host_id, kind=e.kind, reason=e.reason)
            raise self._refused(SchedErrorCode.BAD_TICKET, f"the tenant ticket is refused ({e.kind}): {e.reason}") from None
        return ticket.tenant, float(ticket.expires_at)

    def _announce(self, session: PeerSession, msg: SchedAnnounceHost) -> SchedHostAnnounced:
        tenant, expires = self._verify_ticket(msg)
        rid = session.routing_id
        mine = self._sessions.get(rid)
        if mine is not None and (mine.host_id != msg.host_id or mine.boot != msg.boot):
            raise self._refused(
                SchedErrorCode.HOST_MISMATCH,
                f"this session announced host {mine.host_id!r} (boot {mine.boot!r}); one session is one host: "
                f"open another session for host {msg.host_id!r}",
            )
        held = self._hosts.get(msg.host_id)
        if held is not None and held.rid != rid:
            if held.user_id != session.user_id:
                raise self._refused(
                    SchedErrorCode.HOST_TAKEN, f"host {msg.host_id!r} is held by a session of another client (CURVE key)"
                )
            if held.boot != msg.boot:
                self._host_left(held, "the daemon restarted (new boot id)")
                held = None
        resumed = held is not None
        host_event = AnnounceHost(
            host_id=msg.host_id,
            hostname=msg.hostname,
            ip=msg.ip,
            port=msg.port,
            type=HostType(msg.type),
            idc=msg.idc,
            location=msg.location,
            upload_capacity=msg.upload_capacity,
            upload_slots=msg.upload_slots,
            tenant=tenant,
        )
        try:
            actions = self._apply(host_event)
        except SchedulerError as e:
            raise self._refused(_code_of(e), str(e)) from None
        if held is None:
            binding = _Binding(msg.host_id, msg.boot, rid, session.user_id)
            self._hosts[msg.host_id] = binding
            self._sessions[rid] = binding
            assert self._nursery is not None
            self._nursery.start_soon(self._send_loop, binding)
        elif held.rid != rid:
            if self._sessions.get(held.rid) is held:
                del self._sessions[held.rid]
            held.rid = rid
            self._sessions[rid] = held
            held.sending.cancel()  # a push stuck on the old session is sent again on this one
            held.wakeup.set()
        binding = self._hosts[msg.host_id]
        binding.tenant, binding.ticket_expires = tenant, expires
        event(
            log,
            20,
            "host_announced",
            host=msg.host_id,
            type=msg.type,
            session=session.session,
            resumed=resumed,
            tenant=tenant or "-",
        )
        self._execute(actions)
        host = self.core.hosts[msg.host_id]
        return SchedHostAnnounced(
            host_id=msg.host_id,
            session=session.session,
            scheduler=self.config.name,
            resumed=resumed,
            peers=len(host.peers),
            tenant=tenant,
        )

    def _register(self, session: PeerSession, msg: SchedRegisterPeer) -> SchedPeerRegistered:
        try:
            if msg.piece_length is not None:
                _check_piece_length(msg.piece_length)  # the message itself first, then the session's state
            binding = self._binding(session)
            self._check_ticket(binding)
            existing = self.core.peers.get(msg.peer_id)
            if existing is not None and existing.host.id != binding.host_id:
                raise _Refused(SchedErrorCode.NOT_YOUR_PEER, f"peer id {msg.peer_id!r} is registered on another host")
            actions = self._apply_or_refuse(
                RegisterPeer(
                    peer_id=msg.peer_id,
                    task_id=msg.task_id,
                    host_id=binding.host_id,
                    url=msg.url,
                    tag=msg.tag,
                    application=msg.application,
                    piece_length=msg.piece_length,
                    back_to_source_allowed=msg.back_to_source,
                    headers=tuple((name, value) for name, value in msg.headers),
                    wanted=tuple((start, end) for start, end in msg.wanted if _wanted_range_ok(start, end)),
                )
            )
        except _Refused as e:
            self.stats.refused[_code_name(e.code)] += 1
            raise
        event(log, 20, "peer_registered", peer=msg.peer_id, task=msg.task_id, tenant=binding.tenant or "-", host=binding.host_id)
        reply, rest, later = _fold_registration(msg.peer_id, msg.task_id, actions)
        self._execute(rest)
        for push in later:
            # Queued now, sent by the host's sender task after this handler returned and the reply left.
            self._enqueue(binding, push)
        return reply

    def _refused(self, code: int, reason: str) -> _Refused:
        self.stats.refused[_code_name(code)] += 1
        return _Refused(code, reason)

    # --- reports (client pushes) --------------------------------------------------------------------------

    def _on_report(self, session: PeerSession, msg: Message, payload: list[Any]) -> None:
        assert isinstance(msg, _REPORT_TYPES)
        actions: list[Action] = []
        try:
            binding = self._binding(session)
            self._check_peer(binding, msg.peer_id)
            for ev, piece in _events_of(msg):
                actions.extend(self._apply_or_refuse(ev, piece))
        except _Refused as e:
            self._execute(_coalesce(actions))  # what the reports before the refused one decided
            self._refuse_report(session, msg, e)
            return
        self._execute(_coalesce(actions))

    def _on_host_load(self, session: PeerSession, msg: Message, payload: list[Any]) -> None:
        assert isinstance(msg, SchedHostLoad)
        try:
            binding = self._binding(session)
            actions = self._apply_or_refuse(HostLoad(binding.host_id, msg.upload_rate, msg.uploads_in_flight, msg.upload_peers))
        except _Refused as e:
            self._refuse_report(session, msg, e)
            return
        self._execute(actions)

    def _refuse_report(self, session: PeerSession, msg: Report | SchedHostLoad | SchedTaskDeleted, err: _Refused) -> None:
        name = _code_name(err.code)
        self.stats.refused[name] += 1
        peer_id = "" if isinstance(msg, SchedHostLoad | SchedTaskDeleted) else msg.peer_id
        event(log, 20, "report_refused", type=msg.wire_name(), peer=peer_id, code=name, reason=err.reason)
        refusal = SchedRefused(type=msg.wire_name(), code=err.code, reason=err.reason, peer_id=peer_id, piece=err.piece)
        binding = self._sessions.get(session.routing_id)
        if binding is not None:
            self._enqueue(binding, refusal)
        elif self._nursery is not None and self._strays < _MAX_STRAY_PUSHES:
            self._strays += 1
            self._nursery.start_soon(self._push_stray, session.routing_id, refusal)

    async def _push_stray(self, rid: bytes, msg: Message) -> None:
        try:
            await self.server.push(rid, msg)
        except PeerGone:
            pass
        finally:
            self._strays -= 1

    # --- sessions -----------------------------------------------------------------------------------------

    def _on_peer_event(self, ev: PeerEvent) -> None:
        if ev.kind != "gone":
            return
        binding = self._sessions.get(ev.peer.routing_id)
        if binding is not None:
            self._host_left(binding, f"its session ended ({ev.reason})")

    def _host_left(self, binding: _Binding, reason: str) -> None:
        if self._hosts.get(binding.host_id) is not binding:
            return
        event(log, 20, "host_left", host=binding.host_id, reason=reason)
        try:
            actions = self._apply(HostLeft(binding.host_id, reason))
        except UnknownHost:
            actions = []  # the core removed it already (timed out)
        self._unbind(binding)
        self._execute(actions)

    def _unbind(self, binding: _Binding) -> None:
        for deletion in self._deletions.values():
            deletion.answer(binding.host_id, ok=False, error="the host left before it answered")
        if self._hosts.get(binding.host_id) is binding:
            del self._hosts[binding.host_id]
        if self._sessions.get(binding.rid) is binding:
            del self._sessions[binding.rid]
        binding.closed = True
        binding.queue.clear()
        binding.wakeup.set()
        binding.sending.cancel()

    # --- carrying out actions -----------------------------------------------------------------------------

    def _execute(self, actions: Iterable[Action]) -> None:
        """Turn actions into pushes, queued in order in the outboxes of the hosts they go to."""
        for action in actions:
            match action:
                case PushParents():
                    parents = [_parent(c) for c in action.parents]
                    self._to_peer(action.peer_id, SchedParents(peer_id=action.peer_id, task_id=action.task_id, parents=parents))
                case TriggerSeed():
                    wants = self._speaks(action.host_id, SchedSeed) >= 2  # older seeds know no `wanted`
                    if action.again and not wants:
                        continue
                    self._to_host(
                        action.host_id,
                        SchedSeed(
                            task_id=action.task_id,
                            url=action.url,
                            tag=action.tag,
                            application=action.application,
                            piece_length=action.piece_length,
                            headers=[(name, value) for name, value in action.headers],
                            wanted=[(start, end) for start, end in action.wanted] if wants else [],
                        ),
                    )
                case BackToSource():
                    back = SchedBackToSource(peer_id=action.peer_id, task_id=action.task_id, reason=_text(action.reason))
                    self._to_peer(action.peer_id, back)
                case FailPeer():
                    fail = SchedFail(peer_id=action.peer_id, task_id=action.task_id, reason=_text(action.reason))
                    self._to_peer(action.peer_id, fail)
                case ForwardDigests():
                    pairs = sorted(action.digests.items())
                    for host_id, peer_ids in self._by_host(action.peer_ids):
                        for chunk in _chunks(pairs, MAX_DIGESTS_PER_MESSAGE):
                            self._to_host(host_id, SchedDigests(task_id=action.task_id, peer_ids=peer_ids, digests=chunk))
                case ForwardTaskInfo():
                    for host_id, peer_ids in self._by_host(action.peer_ids):
                        info = SchedTaskInfo(
                            task_id=action.task_id,
                            peer_ids=peer_ids,
                            content_length=action.content_length,
                            piece_length=action.piece_length,
                            piece_count=action.piece_count,
                            digest=action.digest,
                        )
                        self._to_host(host_id, info)
                case HostRemoved():
                    binding = self._hosts.get(action.host_id)
                    if binding is not None:
                        event(log, 30, "host_removed", host=action.host_id, reason=action.reason)
                        self._unbind(binding)
                case _:
                    assert_never(action)

    def _by_host(self, peer_ids: Iterable[str]) -> Iterator[tuple[str, list[str]]]:
        """The peers' ids grouped by host, at most MAX_PEERS_PER_MESSAGE per group."""
        groups: dict[str, list[str]] = {}
        for peer_id in peer_ids:
            peer = self.core.peers.get(peer_id)
            if peer is None:
                self.stats.undeliverable += 1
                continue
            groups.setdefault(peer.host.id, []).append(peer_id)
        for host_id, ids in groups.items():
            for chunk in _chunks(ids, MAX_PEERS_PER_MESSAGE):
                yield host_id, chunk

    def _to_peer(self, peer_id: str, msg: Message) -> None:
        peer = self.core.peers.get(peer_id)
        if peer is None:
            self.stats.undeliverable += 1
            return
        self._to_host(peer.host.id, msg)

    def _speaks(self, host_id: str, kind: type[Message]) -> int:
        """The revision of ``kind`` the host's session said it speaks (0: none, or no session)."""
        binding = self._hosts.get(host_id)
        session = self.server.peers.get(binding.rid) if binding is not None else None
        return session.types.get(kind.wire_name(), 0) if session is not None else 0

    def _to_host(self, host_id: str, msg: Message) -> None:
        binding = self._hosts.get(host_id)
        if binding is None:
            self.stats.undeliverable += 1
            return
        self._enqueue(binding, msg)

    def _enqueue(self, binding: _Binding, msg: Message) -> None:
        if binding.closed:
            return
        if len(binding.queue) >= self.config.outbox_limit:
            # Its sender makes the host leave (not from here, in the middle of a list of actions), at once
            # even if it is waiting for room at the daemon: cancelling a send sends nothing.
            binding.overflow = True
            binding.sending.cancel()
        else:
            binding.queue.append(msg)
        binding.wakeup.set()

    async def _send_loop(self, binding: _Binding) -> None:
        """Send one host's pushes in order until the host is unbound; a failed push makes it leave."""
        while not binding.closed:
            if binding.overflow:
                self._lose(binding, f"more than {self.config.outbox_limit} pushes waiting: the daemon does not read them")
                return
            if not binding.queue:
                await binding.wakeup.wait()
                binding.wakeup = trio.Event()
                continue
            rid = binding.rid
            binding.sending = trio.CancelScope()
            try:
                with binding.sending:
                    await self.server.push(rid, binding.queue[0])
            except PeerGone as e:
                if binding.closed:
                    return
                if binding.rid != rid:
                    continue  # taken over by a new session of the same daemon: send it there
                self._lose(binding, f"a push failed: {e}")
                return
            if binding.sending.cancelled_caught or binding.overflow or binding.closed:
                continue  # not sent: the loop's top says why
            binding.queue.popleft()
            self.stats.pushes += 1

    def _lose(self, binding: _Binding, reason: str) -> None:
        if self._hosts.get(binding.host_id) is binding:
            self.stats.hosts_lost += 1
            self._host_left(binding, reason)

    # --- time ---------------------------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        """Apply ``Tick`` when the core has something due, and keep the hosts of live sessions alive."""
        core = self.core
        refresh_every = core.config.host_timeout / 4
        next_refresh = core.clock() + refresh_every
        while True:
            now = core.clock()
            deadline = core.next_deadline()
            wake_at = min(next_refresh, now + _MAX_TICK_SLEEP, math.inf if deadline is None else deadline)
            self._tick_at = wake_at
            with trio.move_on_after(max(0.0, wake_at - now)):
                await self._tick_wakeup.wait()
            self._tick_wakeup = trio.Event()
            self._tick_at = math.inf
            now = core.clock()
            if now >= next_refresh:
                next_refresh = now + refresh_every
                for binding in list(self._hosts.values()):
                    if self._hosts.get(binding.host_id) is binding:
                        try:
                            self._execute(self._apply(HostHeartbeat(binding.host_id)))
                        except UnknownHost:
                            self._unbind(binding)  # not expected: HostRemoved unbinds; never keep a dead binding
            deadline = core.next_deadline()
            if deadline is not None and deadline <= now:
                self._execute(self._apply(Tick()))


# --- translation between messages and events/actions -----------------------------------------------------


def _events_of(msg: Report) -> list[tuple[Event, int | None]]:
    """The core events a report stands for, each with the piece it is about (for a refusal)."""
    match msg:
        case SchedTaskMetadata():
            _check_piece_length(msg.piece_length)
            if msg.content_length is not None:
                try:
                    PieceLayout(msg.content_length, msg.piece_length)
                except InvalidPieceLength as e:
                    raise _Refused(ErrorCode.INVALID, str(e)) from None
            return [(TaskMetadataKnown(msg.peer_id, msg.content_length, msg.piece_length), None)]
        case SchedPieces():
            out: list[tuple[Event, int | None]] = [
                (PieceFinished(msg.peer_id, p.piece, p.digest, p.size, p.cost_ms / 1000, p.parent), p.piece) for p in msg.finished
            ]
            out.extend((PieceFailed(msg.peer_id, p.piece, p.parent, p.reason), p.piece) for p in msg.failed)
            return out
        case SchedPeerFinished():
            return [(PeerFinished(msg.peer_id, msg.digest, msg.content_length), None)]
        case SchedPeerFailed():
            return [(PeerFailed(msg.peer_id, msg.reason, msg.origin_error), None)]
        case SchedPeerLeft():
            return [(PeerLeft(msg.peer_id), None)]
        case SchedReschedule():
            return [(RescheduleRequest(msg.peer_id, frozenset(msg.avoid)), None)]
        case _:
            assert_never(msg)


def _coalesce(actions: list[Action]) -> list[Action]:
    """Merge runs of digest forwards to the same peers (a batch of piece reports makes one per piece) so
    that a batch becomes one ``sched.digests`` push per host, not one per piece."""
    out: list[Action] = []
    merged: dict[int, str] | None = None
    for action in actions:
        prev = out[-1] if out else None
        if (
            isinstance(action, ForwardDigests)
            and isinstance(prev, ForwardDigests)
            and (prev.task_id, prev.peer_ids) == (action.task_id, action.peer_ids)
        ):
            if merged is None:
                merged = dict(prev.digests)
                out[-1] = replace(prev, digests=merged)
            merged.update(action.digests)
        else:
            out.append(action)
            merged = None
    return out


def _fold_registration(
    peer_id: str, task_id: str, actions: Sequence[Action]
) -> tuple[SchedPeerRegistered, list[Action], list[Message]]:
    """Split the actions of a registration into the reply to the registering peer, the actions for
    everybody else, and the digest pushes that did not fit the reply (to send after it)."""
    reply = SchedPeerRegistered(peer_id=peer_id, task_id=task_id, assignment="wait")
    digests: dict[int, str] = {}
    rest: list[Action] = []
    for action in actions:
        match action:
            case PushParents() if action.peer_id == peer_id:
                reply.assignment, reply.reason = "parents", ""
                reply.parents = [_parent(c) for c in action.parents]
            case BackToSource() if action.peer_id == peer_id:
                reply.assignment, reply.parents, reply.reason = "back_to_source", [], _text(action.reason)
            case FailPeer() if action.peer_id == peer_id:
                reply.assignment, reply.parents, reply.reason = "failed", [], _text(action.reason)
            case ForwardTaskInfo() if peer_id in action.peer_ids:
                reply.content_length, reply.piece_length = action.content_length, action.piece_length
                reply.piece_count, reply.digest = action.piece_count, action.digest
                others = tuple(p for p in action.peer_ids if p != peer_id)
                if others:
                    rest.append(replace(action, peer_ids=others))
            case ForwardDigests() if peer_id in action.peer_ids:
                digests.update(action.digests)
                others = tuple(p for p in action.peer_ids if p != peer_id)
                if others:
                    rest.append(replace(action, peer_ids=others))
            case _:
                rest.append(action)
    pairs = sorted(digests.items())
    reply.digests = pairs[:MAX_DIGESTS_PER_MESSAGE]
    later: list[Message] = [
        SchedDigests(task_id=task_id, peer_ids=[peer_id], digests=chunk)
        for chunk in _chunks(pairs[MAX_DIGESTS_PER_MESSAGE:], MAX_DIGESTS_PER_MESSAGE)
    ]
    reply.more_digests = bool(later)
    return reply, rest, later


def _parent(candidate: ParentCandidate) -> SchedParent:
    return SchedParent(peer_id=candidate.peer_id, host_id=candidate.host_id, ip=candidate.ip, port=candidate.port)


def _wanted_range_ok(start: int, end: int | None) -> bool:
    """A wanted byte range of ``sched.register_peer`` in one of its forms (others are left out)."""
    return end is None if start < 0 else end is None or end > start


def _check_piece_length(piece_length: int) -> None:
    try:
        validate_piece_length(piece_length)
    except InvalidPieceLength as e:
        raise _Refused(ErrorCode.INVALID, str(e)) from None


def _code_of(error: SchedulerError) -> int:
    if isinstance(error, UnknownHost):
        return SchedErrorCode.NOT_ANNOUNCED
    if isinstance(error, UnknownPeer):
        return SchedErrorCode.UNKNOWN_PEER
    if isinstance(error, InvalidTransition):
        return SchedErrorCode.WRONG_STATE
    if isinstance(error, TenantMismatch):
        return SchedErrorCode.WRONG_TENANT
    return SchedErrorCode.REFUSED


def _code_name(code: int) -> str:
    for enum in (SchedErrorCode, ErrorCode):
        if code in enum._value2member_map_:
            return enum(code).name
    return str(code)


def _text(reason: str) -> str:
    return reason if len(reason) <= _MAX_TEXT else reason[: _MAX_TEXT - 1] + "…"


def _chunks(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


# --- running it as a program -----------------------------------------------------------------------------


async def serve(
    config: ServiceConfig,
    *,
    on_listening: Callable[[list[str]], None] | None = None,
    on_metrics: Callable[[str], None] | None = None,
) -> None:
    """Run a :class:`SchedulerService` until SIGTERM or SIGINT, then stop it cleanly and return.

    ``on_listening`` gets the bound endpoints once the service serves. A failure to bind raises
    :class:`ListenError` with the endpoints and the reason.
    """
    service = SchedulerService(config)  # raises ConfigError (unreadable keys) before anything runs
    started = False
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                started = True
                if config.manager:
                    from .mgrjobs import ManagerJobs

                    agent = _manager_agent(service)
                    jobs = ManagerJobs(service, agent)  # its push handlers, before the agent's session starts
                    await nursery.start(agent.run)
                    await nursery.start(jobs.run)
                if on_listening is not None:
                    on_listening(service.endpoints)
                if on_metrics is not None and service.metrics_url:
                    on_metrics(service.metrics_url)
                async for signum in signals:
                    event(log, 20, "sched_stopping", signal=signal.Signals(signum).name)
                    break
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        metrics_bind = group.subgroup(MetricsListenError)
        if not started and metrics_bind is not None:
            raise ListenError(str(_first(metrics_bind))) from None
        bind = group.subgroup(zmq.ZMQError)
        if started or bind is None:
            raise
        raise ListenError(f"cannot listen on {', '.join(config.listen)}: {_first(bind)}") from None


def _manager_agent(service: SchedulerService) -> Any:
    """The scheduler's link to its manager (``dfz.mgr.agent``): registers the first tcp endpoint, keeps
    alive, and hands ``scheduler`` settings to :meth:`SchedulerService.reconfigure`."""
    from ..mgr.agent import ManagerAgent, local_hostname, tcp_address
    from ..mgr.messages import MgrRegister

    config = service.config
    address = tcp_address(service.endpoints, config.advertise_ip)
    assert address is not None  # ServiceConfig requires a tcp endpoint with a manager

    def on_ticket(_ticket: bytes, key: bytes) -> None:
        if key:
            service.trust_key(key)

    def registration() -> MgrRegister:
        return MgrRegister(
            kind="scheduler",
            hostname=config.hostname or local_hostname(),
            ip=address[0],
            port=address[1],
            cluster=config.cluster,
        )

    def on_config(target: str, settings: dict[str, Any]) -> None:
        if target != "scheduler":
            return
        try:
            service.reconfigure(settings)
        except ValueError as e:
            event(log, 30, "sched_settings_refused", error=str(e))

    return ManagerAgent(
        config.manager,
        name=f"{config.name}-{address[0]}:{address[1]}",
        on_config=on_config,
        registration=registration,
        on_ticket=on_ticket,
    )


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf
