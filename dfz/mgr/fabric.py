"""The manager's fabric endpoint: a :class:`dfz.broker.Server` speaking ``mgr.*`` (``messages.py``,
``protocol.md`` §17) to schedulers, seed peers and daemons.

Theory of operation:

* **Registration is a session.** ``mgr.register`` (a scheduler, a seed peer or a daemon: a host) creates or takes over the
  instance row (``registry.register``: active, ``last_keepalive_at`` now) and binds the fabric session to
  it. ``mgr.keepalive`` on the session keeps it active; a session that sends none for ``keepalive *
  liveness`` seconds, or that ends (``bye``, fabric silence, unreachable), makes its instance
  ``inactive``, unless another session has registered it since. A keepalive after that (the instance was
  only slow) makes it active again; a new session (a restart) registers again.
* **The database is the truth for other managers**: the instances held here have their
  ``last_keepalive_at`` refreshed every ``keepalive * liveness / 3`` at most; every sweep also marks
  inactive the active instances held by nobody here whose ``last_keepalive_at`` is older than the bound
  (a manager that died, or instances active in the database when this manager started).
* **Daemons are answered from memory.** A :class:`~dfz.mgr.registry.Snapshot` of the clusters, their
  active schedulers and the dynamic configs is reloaded every ``config_poll`` seconds and at once after
  any registration or state flip; ``mgr.list_schedulers`` is answered from it without touching the
  database (a thousand daemons re-asking cost no query).
* **Dynamic config is pushed on change.** After each reload every session's settings (a scheduler's
  ``scheduler`` settings, a daemon's or seed peer's ``daemon`` settings) are computed again; a session
  whose settings differ from the last ones it was sent gets the new snapshot as ``mgr.config``. The
  registration and ``mgr.list_schedulers`` replies carry the settings too, so nothing is missed between
  a start and the first push. Changes made through the REST API reach processes within ``config_poll``.
* **Jobs.** The job runner (``jobs.py``) pushes ``mgr.preheat`` to seed peers and daemons and
  ``mgr.get_task`` / ``mgr.delete_task`` to schedulers through :meth:`ManagerFabric.push_to`; their answers
  (``mgr.task_report``, ``mgr.task_peers``, ``mgr.task_deleted``) go to the runner's callbacks, which say
  whether more is wanted (``mgr.noted``).
* **Tenants.** A daemon or seed peer that registers with a daemon token (``tenant_token``) is checked
  (``tenancy.check_token``: known, not revoked or expired, its tenant enabled) and answered with a tenant
  ticket signed with the manager's key (``dfz/tickets.py``), valid ``ticket_ttl`` seconds; a keepalive past
  half of that checks the token again (by its id) and carries a fresh ticket. A token refused answers
  ``TOKEN_REFUSED``. Every registration reply carries the manager's public key, for the schedulers and
  daemons that check tickets. The token's secret is never kept, logged or written anywhere.
* **Nothing from the wire is trusted.** The codec checks types and bounds; the rest (addresses,
  clusters) answers ``BAD_VALUE`` or ``UNKNOWN_CLUSTER``; a database failure answers ``STORE_FAILED``;
  a handler bug answers ``INTERNAL``. None of them stops the server.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import trio
from sqlalchemy.exc import SQLAlchemyError

from ..broker import ErrorCode, Message, PeerEvent, PeerGone, PeerSession, RemoteError, Request, Server, ServerConfig
from ..log import event, get_logger
from ..tickets import TicketSigner
from . import registry, tenancy
from .db import Database
from .messages import (
    MGR_CATALOGUE,
    MgrAlive,
    MgrConfig,
    MgrErrorCode,
    MgrKeepalive,
    MgrListSchedulers,
    MgrNoted,
    MgrRegister,
    MgrRegistered,
    MgrSchedulers,
    MgrTaskDeleted,
    MgrTaskPeers,
    MgrTaskReport,
)
from .registry import Kind, RegistryError, Snapshot

log = get_logger("mgr.fabric")

Target = Literal["scheduler", "daemon"]


@dataclass(frozen=True)
class FabricSettings:
    listen: tuple[str, ...] = ("tcp://127.0.0.1:8003",)
    keepalive: float = 1.0
    """Seconds between an instance's keepalives (told to it at registration); also the fabric heartbeat."""
    liveness: int = 3
    """Keepalives an instance may miss before it is marked inactive."""
    refresh: float = 30.0
    """Seconds after which a daemon asks again which schedulers serve it."""
    config_poll: float = 1.0
    """Seconds between two looks at the database for changed clusters and dynamic configs."""
    ticket_ttl: float = 600.0
    """Seconds a tenant ticket is valid; refreshed on a keepalive after half of it."""

    @property
    def bound(self) -> float:
        """Seconds without a keepalive after which an instance is inactive."""
        return self.keepalive * self.liveness


@dataclass(eq=False)
class _Session:
    rid: bytes
    name: str
    instance: tuple[Kind, int] | None = None
    last_keepalive: float = 0.0
    touched: float = 0.0
    """When ``last_keepalive_at`` was last written for it."""
    active: bool = False
    config_cluster: int | None = None
    """The scheduler cluster whose dynamic configs apply (by registration, or by ``mgr.list_schedulers``)."""
    grant: tenancy.Grant | None = None
    """The tenant of a daemon registered with a daemon token (its ticket is refreshed on keepalives)."""
    ticket_host: str = ""
    ticket_issued: float = 0.0
    """Wall-clock time the session's latest ticket was issued at."""
    targets: set[Target] = field(default_factory=set)
    sent: dict[Target, dict[str, Any]] = field(default_factory=dict)
    serial: int = 0
    host: tuple[str, str, str] | None = None
    """A daemon's ``(host_id, hostname, ip)`` from its last ``mgr.list_schedulers`` (for jobs that reach
    every peer)."""


@dataclass
class FabricStats:
    registrations: int = 0
    keepalives: int = 0
    lookups: int = 0
    pushes: int = 0
    refused: int = 0
    inactive: int = 0
    tickets: int = 0
    """Tenant tickets issued (at registration and refreshed)."""
    tokens_refused: int = 0


class ManagerFabric:
    """The fabric endpoint of a manager over ``db``. ``await nursery.start(fabric.run)`` binds (raising
    ``zmq.ZMQError`` when it cannot) and serves until cancelled; ``endpoints`` are the bound addresses."""

    def __init__(
        self,
        db: Database | None,
        settings: FabricSettings | None = None,
        *,
        name: str = "dfz-mgr",
        signer: TicketSigner | None = None,
    ) -> None:
        self.db = db
        self.signer = signer
        """Signs tenant tickets; None: this manager issues none (a tenant token is refused as unavailable)."""
        self.settings = settings or FabricSettings()
        s = self.settings
        self.server = Server(
            MGR_CATALOGUE,
            s.listen,
            name=name,
            config=ServerConfig(heartbeat=s.keepalive, liveness=max(s.liveness, 2)),
            on_peer_event=self._on_peer_event,
        )
        self.server.handle(MgrRegister, self._on_register)
        self.server.handle(MgrKeepalive, self._on_keepalive)
        self.server.handle_now(MgrListSchedulers, self._on_list)
        self.server.handle_now(MgrTaskReport, self._on_task_report)
        self.server.handle_now(MgrTaskPeers, self._on_task_answer)
        self.server.handle_now(MgrTaskDeleted, self._on_task_answer)
        self.on_task_report: Callable[[bytes, MgrTaskReport], bool] | None = None
        """The job runner's (``jobs.py``): takes a report, says whether the task is still wanted."""
        self.on_task_answer: Callable[[bytes, MgrTaskPeers | MgrTaskDeleted], bool] | None = None
        """The job runner's: takes a scheduler's answer to ``mgr.get_task`` / ``mgr.delete_task``, says whether
        more is wanted."""
        self.snapshot = Snapshot()
        self.stats = FabricStats()
        self._sessions: dict[bytes, _Session] = {}
        self._holders: dict[tuple[Kind, int], bytes] = {}
        self._reload = trio.Event()
        self._pushed_from: Snapshot | None = None
        """The snapshot every session's settings were last compared with (None: compare at the next look)."""
        self._nursery: trio.Nursery | None = None

    @property
    def endpoints(self) -> list[str]:
        return self.server.endpoints

    async def run(self, *, task_status: trio.TaskStatus[ManagerFabric] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.server.run)
            nursery.start_soon(self._poll_loop)
            nursery.start_soon(self._sweep_loop)
            event(log, logging.INFO, "mgr_fabric_listening", endpoints=",".join(self.endpoints))
            task_status.started(self)

    def attach(self, db: Database) -> None:
        """Serve from ``db`` (a manager binds its fabric before it opens its database)."""
        self.db = db
        self._reload.set()

    # --- sessions ------------------------------------------------------------------------------------------

    def _session(self, peer: PeerSession) -> _Session:
        s = self._sessions.get(peer.routing_id)
        if s is None:
            s = self._sessions[peer.routing_id] = _Session(peer.routing_id, peer.name)
        return s

    def _on_peer_event(self, ev: PeerEvent) -> None:
        if ev.kind == "gone":
            self._drop(ev.peer.routing_id, ev.reason)

    def _drop(self, rid: bytes, reason: str) -> None:
        s = self._sessions.pop(rid, None)
        if s is None or s.instance is None:
            return
        if self._holders.get(s.instance) == rid:
            del self._holders[s.instance]
            if s.active:
                self._go_inactive(s.instance, f"session ended ({reason})")

    def _db(self) -> Database:
        if self.db is None:
            raise RemoteError(ErrorCode.UNAVAILABLE, "the manager is starting: try again")
        return self.db

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        try:
            return await trio.to_thread.run_sync(fn, *args)
        except RegistryError as e:
            self.stats.refused += 1
            raise RemoteError(e.code, e.reason) from None
        except SQLAlchemyError as e:
            self.stats.refused += 1
            event(log, logging.ERROR, "mgr_store_failed", error=repr(e)[:500])
            raise RemoteError(MgrErrorCode.STORE_FAILED, "the manager's database failed: try again later") from None

    # --- requests ------------------------------------------------------------------------------------------

    async def _check_token(self, db: Database, check: Callable[[], tenancy.Grant], host: str) -> tenancy.Grant:
        try:
            return await self._in_thread(check)  # type: ignore[no-any-return]
        except tenancy.TokenRefused as e:
            self.stats.refused += 1
            self.stats.tokens_refused += 1
            event(log, logging.WARNING, "mgr_token_refused", host=host, reason=e.reason)
            raise RemoteError(MgrErrorCode.TOKEN_REFUSED, f"the tenant token is refused: {e.reason}") from None

    def _issue(self, s: _Session, grant: tenancy.Grant, host_id: str) -> bytes:
        assert self.signer is not None
        now = time.time()
        ticket = self.signer.issue(
            tenant=grant.tenant, tenant_name=grant.tenant_name, host_id=host_id, now=now, ttl=self.settings.ticket_ttl
        )
        s.grant, s.ticket_host, s.ticket_issued = grant, host_id, now
        self.stats.tickets += 1
        event(
            log,
            logging.INFO,
            "mgr_ticket_issued",
            host=host_id,
            tenant=grant.tenant,
            tenant_name=grant.tenant_name,
            token=grant.prefix,
        )
        return ticket

    async def _on_register(self, req: Request) -> MgrRegistered:
        msg = req.msg
        assert isinstance(msg, MgrRegister)
        db = self._db()

        grant: tenancy.Grant | None = None
        if msg.tenant_token:
            if msg.kind == "scheduler":
                self.stats.refused += 1
                raise RemoteError(MgrErrorCode.BAD_VALUE, "tenant_token: a scheduler serves every tenant; only daemons join one")
            if not msg.host_id:
                self.stats.refused += 1
                raise RemoteError(MgrErrorCode.BAD_VALUE, "host_id: a daemon with a tenant token registers with its host id")
            if self.signer is None:
                raise RemoteError(ErrorCode.UNAVAILABLE, "this manager has no ticket key: it cannot put daemons in tenants")
            token = msg.tenant_token
            grant = await self._check_token(db, lambda: tenancy.check_token(db, token), msg.host_id)

        host = msg.kind == "host"
        serving = None
        if host:  # a daemon: in the cluster that serves it (§17.4), as mgr.list_schedulers would answer
            serving, _ = registry.match_cluster(
                self.snapshot.clusters, ip=msg.ip, hostname=msg.hostname, idc=msg.idc, location=msg.location
            )

        tenant_id = grant.tenant_id if grant is not None else None

        def work() -> tuple[registry.Registered, Snapshot]:
            done = registry.register(db, msg, serving=serving, tenant_id=tenant_id)
            # A host changes nothing daemons are told: no snapshot to reload (a thousand of them start at once).
            return done, self.snapshot if host else registry.load_snapshot(db)

        done, snapshot = await self._in_thread(work)
        if snapshot is not self.snapshot:
            self.snapshot, self._pushed_from = snapshot, None
        if self.server.peers.get(req.peer.routing_id) is not req.peer:  # it ended while the database was written
            self._go_inactive((done.kind, done.instance_id), "session ended while registering")
            raise RemoteError(ErrorCode.UNAVAILABLE, "session ended")
        s = self._session(req.peer)
        key: tuple[Kind, int] = (done.kind, done.instance_id)
        if s.instance is not None and s.instance != key and self._holders.get(s.instance) == s.rid:
            del self._holders[s.instance]  # one session, one instance: the old one is not kept alive by it
            self._go_inactive(s.instance, "its session registered another instance")
        old = self._holders.get(key)
        if old is not None and old != s.rid and old in self._sessions:
            self._sessions[old].instance = None  # taken over: a restarted process, or a second one by mistake
        self._holders[key] = s.rid
        now = trio.current_time()
        s.instance, s.last_keepalive, s.touched, s.active = key, now, now, True
        target: Target = "scheduler" if done.kind == "scheduler" else "daemon"
        s.targets.add(target)
        if s.config_cluster is None or target == "scheduler":
            s.config_cluster = done.config_cluster_id
        config = snapshot.settings(target, s.config_cluster)
        s.sent[target] = config
        ticket = self._issue(s, grant, msg.host_id) if grant is not None else b""
        if grant is None:
            s.grant = None
        self.stats.registrations += 1
        event(
            log,
            logging.INFO,
            "mgr_instance_active",
            kind=done.kind,
            id=done.instance_id,
            cluster=done.cluster,
            hostname=msg.hostname,
            ip=msg.ip,
            port=msg.port,
            why="registered",
        )
        if not host:
            self._reload.set()
        return MgrRegistered(
            instance_id=done.instance_id,
            cluster_id=done.cluster_id,
            cluster=done.cluster[:256],
            keepalive_ms=max(10, round(self.settings.keepalive * 1000)),
            config=config,
            ticket=ticket,
            ticket_key=self.signer.public_key if self.signer is not None else b"",
        )

    async def _on_keepalive(self, req: Request) -> MgrAlive:
        s = self._sessions.get(req.peer.routing_id)
        if s is None or s.instance is None or self._holders.get(s.instance) != s.rid:
            self.stats.refused += 1
            raise RemoteError(MgrErrorCode.NOT_REGISTERED, "this session holds no instance: send mgr.register")
        self.stats.keepalives += 1
        now = trio.current_time()
        s.last_keepalive = now
        if not s.active:
            s.active = True
            s.touched = now
            instance = s.instance
            await self._in_thread(registry.set_state, self._db(), instance[0], [instance[1]], "active")
            event(log, logging.INFO, "mgr_instance_active", kind=instance[0], id=instance[1], why="keepalive again")
            if instance[0] != "host":
                self._reload.set()
        ticket = b""
        grant = s.grant
        if grant is not None and time.time() >= s.ticket_issued + self.settings.ticket_ttl / 2:
            db = self._db()
            token_id = grant.token_id
            try:
                fresh = await self._check_token(db, lambda: tenancy.recheck(db, token_id), s.ticket_host)
            except RemoteError:
                s.grant = None  # the next keepalives carry no ticket; the daemon stops on this answer
                raise
            ticket = self._issue(s, fresh, s.ticket_host)
        return MgrAlive(instance_id=s.instance[1], ticket=ticket)

    def _on_list(self, req: Request) -> MgrSchedulers:
        msg = req.msg
        assert isinstance(msg, MgrListSchedulers)
        self.stats.lookups += 1
        cluster, matched_by = registry.match_cluster(
            self.snapshot.clusters, ip=msg.ip, hostname=msg.hostname, idc=msg.idc, location=msg.location
        )
        s = self._session(req.peer)
        s.targets.add("daemon")
        s.config_cluster = cluster.id if cluster is not None else None
        s.host = (msg.host_id, msg.hostname, msg.ip)
        config = self.snapshot.settings("daemon", s.config_cluster)
        s.sent["daemon"] = config
        return MgrSchedulers(
            cluster_id=cluster.id if cluster is not None else 0,
            cluster=cluster.name[:255] if cluster is not None else "",
            matched_by=matched_by,
            schedulers=list(cluster.schedulers) if cluster is not None else [],
            config=config,
            refresh_ms=min(86_400_000, max(100, round(self.settings.refresh * 1000))),
        )

    def _on_task_report(self, req: Request) -> MgrNoted:
        msg = req.msg
        assert isinstance(msg, MgrTaskReport)
        wanted = self.on_task_report(req.peer.routing_id, msg) if self.on_task_report is not None else False
        return MgrNoted(wanted=wanted)

    def _on_task_answer(self, req: Request) -> MgrNoted:
        msg = req.msg
        assert isinstance(msg, MgrTaskPeers | MgrTaskDeleted)
        wanted = self.on_task_answer(req.peer.routing_id, msg) if self.on_task_answer is not None else False
        return MgrNoted(wanted=wanted)

    # --- jobs ------------------------------------------------------------------------------------------------

    def session_of(self, key: str) -> bytes | None:
        """The session a job's peer is reached on now: ``seed_peer:ID`` or ``scheduler:ID`` (the session that
        holds that instance, while it is active) or ``host:HOST_ID`` (a daemon's session); None when not
        connected."""
        kind, _, ident = key.partition(":")
        if kind in ("seed_peer", "scheduler") and ident.isdigit():
            rid = self._holders.get(("seed_peer" if kind == "seed_peer" else "scheduler", int(ident)))
            s = self._sessions.get(rid) if rid is not None else None
            return rid if s is not None and s.active and rid in self.server.peers else None
        if kind == "host":
            for s in self._sessions.values():
                if s.host is not None and s.host[0] == ident and s.rid in self.server.peers:
                    return s.rid
        return None

    def daemons_of(self, cluster_id: int) -> list[tuple[str, str, str]]:
        """``(host_id, hostname, ip)`` of the daemons (not seed peers) whose sessions ``cluster_id`` serves."""
        return sorted(
            s.host
            for s in self._sessions.values()
            if s.host is not None
            and (s.instance is None or s.instance[0] not in ("seed_peer", "scheduler"))
            and s.config_cluster == cluster_id
            and s.rid in self.server.peers
        )

    def schedulers_of(self, cluster_id: int) -> list[tuple[int, str, str]]:
        """``(instance id, hostname, ip)`` of the active schedulers of ``cluster_id`` (the snapshot's), by id."""
        cluster = self.snapshot.cluster(cluster_id)
        return [] if cluster is None else sorted((s.id, s.hostname, s.ip) for s in cluster.schedulers)

    def understands(self, rid: bytes, msg_type: type[Message]) -> bool:
        """Whether the client of session ``rid`` listed ``msg_type`` in its ``hello`` (it knows the type)."""
        peer = self.server.peers.get(rid)
        return peer is not None and msg_type.wire_name() in peer.types

    def revision(self, rid: bytes, msg_type: type[Message]) -> int:
        """The revision of ``msg_type`` the client of session ``rid`` listed in its ``hello`` (0: none)."""
        peer = self.server.peers.get(rid)
        return 0 if peer is None else int(peer.types.get(msg_type.wire_name(), 0))

    async def push_to(self, rid: bytes, msg: Message) -> bool:
        """Push a job's message to a session; False when it is gone."""
        try:
            await self.server.push(rid, msg)
        except (PeerGone, trio.ClosedResourceError):
            return False
        return True

    # --- liveness ------------------------------------------------------------------------------------------

    def _go_inactive(self, instance: tuple[Kind, int], why: str) -> None:
        self.stats.inactive += 1
        event(log, logging.INFO, "mgr_instance_inactive", kind=instance[0], id=instance[1], why=why)
        if self._nursery is not None and self.db is not None:
            self._nursery.start_soon(self._write_inactive, instance)

    async def _write_inactive(self, instance: tuple[Kind, int]) -> None:
        db = self.db
        if db is None:
            return
        try:
            await trio.to_thread.run_sync(registry.set_state, db, instance[0], [instance[1]], "inactive")
        except SQLAlchemyError as e:
            event(log, logging.ERROR, "mgr_store_failed", error=repr(e)[:500])
        if instance[0] != "host":
            self._reload.set()

    async def _sweep_loop(self) -> None:
        cfg = self.settings
        touch_every = cfg.bound / 3
        while True:
            await trio.sleep(cfg.keepalive / 2)
            now = trio.current_time()
            touch: dict[Kind, list[int]] = {kind: [] for kind in registry.KINDS}
            for s in list(self._sessions.values()):
                if s.instance is None or self._holders.get(s.instance) != s.rid:
                    continue
                if s.active and now - s.last_keepalive > cfg.bound:
                    s.active = False
                    self._go_inactive(s.instance, f"no keepalive for {now - s.last_keepalive:.1f} s")
                elif s.active and now - s.touched >= touch_every:
                    s.touched = now
                    touch[s.instance[0]].append(s.instance[1])
            db = self.db
            if db is None:
                continue
            held: dict[Kind, set[int]] = {kind: set() for kind in registry.KINDS}
            for kind, instance_id in self._holders:
                held[kind].add(instance_id)
            # Rows nobody here holds: stale beyond the bound plus one touch period (another manager's throttle).
            older_than = registry.timeout_before(cfg.bound + touch_every)

            try:
                marked = await trio.to_thread.run_sync(_touch_and_sweep, db, touch, older_than, held)
            except SQLAlchemyError as e:
                event(log, logging.ERROR, "mgr_store_failed", error=repr(e)[:500])
                continue
            for kind, ids in marked.items():
                for instance_id in ids:
                    event(log, logging.INFO, "mgr_instance_inactive", kind=kind, id=instance_id, why="stale keepalive")
            if set(marked) - {"host"}:
                self._reload.set()

    # --- dynamic config -------------------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        while True:
            with trio.move_on_after(self.settings.config_poll):
                await self._reload.wait()
            self._reload = trio.Event()
            db = self.db
            if db is None:
                continue
            try:
                snapshot = self.snapshot = await trio.to_thread.run_sync(registry.load_snapshot, db)
            except SQLAlchemyError as e:
                event(log, logging.ERROR, "mgr_store_failed", error=repr(e)[:500])
                await trio.sleep(self.settings.config_poll)
                continue
            # Nothing changed since the last look: no session's settings can have (a thousand daemons'
            # settings are not computed again every config_poll for nothing).
            if snapshot != self._pushed_from:
                self._push_changes()
                self._pushed_from = snapshot

    def _push_changes(self) -> None:
        nursery = self._nursery
        if nursery is None:
            return
        for s in list(self._sessions.values()):
            for target in sorted(s.targets):
                config = self.snapshot.settings(target, s.config_cluster)
                if s.sent.get(target) == config:
                    continue
                s.sent[target] = config
                s.serial = (s.serial + 1) % 2**32
                nursery.start_soon(self._push, s.rid, MgrConfig(target=target, config=config, serial=s.serial))

    async def _push(self, rid: bytes, msg: MgrConfig) -> None:
        try:
            await self.server.push(rid, msg)
            self.stats.pushes += 1
            event(
                log,
                logging.INFO,
                "mgr_config_pushed",
                to=self._sessions[rid].name if rid in self._sessions else "-",
                target=msg.target,
            )
        except (PeerGone, trio.ClosedResourceError):
            pass


def _touch_and_sweep(
    db: Database, touch: dict[Kind, list[int]], older_than: dt.datetime, held: dict[Kind, set[int]]
) -> dict[Kind, list[int]]:
    registry.touch(db, touch)
    return registry.sweep(db, older_than, held)


def default_fabric_listen(http_listen: str) -> str:
    """The fabric endpoint when none is configured: the HTTP address's host, port 8003; port 0 (a free one)
    when the HTTP port is 0."""
    host, _, port = http_listen.rpartition(":")
    return f"tcp://{host}:{0 if port == '0' else 8003}"


def first_error(group: BaseException) -> BaseException:
    leaf = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


__all__ = ["FabricSettings", "FabricStats", "ManagerFabric", "default_fabric_listen", "first_error"]
