"""What the manager's fabric endpoint (``fabric.py``) reads from and writes to the database, and the rule
that picks a daemon's scheduler cluster. Synchronous: the fabric runs these in worker threads.

Rules of this file:

* **Writes go through** :class:`~dfz.mgr.db.Database` ``writing()`` sessions, like the REST API's.
* **Audit.** A change of the inventory is audited, with the actor ``fabric`` (via ``fabric``): an instance
  registered for the first time (``create``), one whose values changed when it registered again
  (``update``, the fields that changed), a cluster made because an instance named none and there was no
  default one (``create``). **State flips are not audited**: ``active``/``inactive`` and
  ``last_keepalive_at`` are the instance's liveness, not anybody's change; they are in the row itself and
  in the manager's log (``mgr_instance_active`` / ``mgr_instance_inactive``), and auditing them would
  flood the audit log with one entry per restart and per missed keepalive.
* **Liveness is in the database**: the manager holding an instance's session refreshes its
  ``last_keepalive_at``; any manager on the same database marks an active instance whose
  ``last_keepalive_at`` is older than the bound inactive (:func:`sweep`). So several managers can share
  one database, and an instance whose manager died goes inactive too. An instance that never registered
  (made through the REST API) has no ``last_keepalive_at`` and keeps the state it was given.
* :func:`match_cluster` is pure: the precedence of ``protocol.md`` §17.4.
* **Hosts (daemons) are many**: a thousand of them keeping alive must cost the database little, so the
  liveness writes (:func:`set_state`, :func:`touch`, :func:`sweep`) are set-wise ``UPDATE`` statements,
  never a row loaded per instance.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa
from sqlmodel import Session, col, select

from ..log import event, get_logger
from . import audit
from .db import Database
from .messages import MAX_CONFIG_KEYS, MAX_SCHEDULERS, MatchedBy, MgrRegister, MgrScheduler
from .models import (
    DynamicConfig,
    Host,
    Scheduler,
    SchedulerCluster,
    SeedPeer,
    SeedPeerCluster,
    SeedPeerClusterLink,
    utcnow,
)

log = get_logger("mgr.registry")

FABRIC = audit.Actor(user_id=None, name="fabric", via="fabric")
"""Who the fabric's changes are audited as."""
DEFAULT_CLUSTER = "default"
"""The name of the cluster made when an instance names none and there is no default one."""

Kind = Literal["scheduler", "seed_peer", "host"]
"""What registers: a scheduler, a seed peer, or a daemon (a host, in the ``hosts`` table)."""
Instance = Scheduler | SeedPeer | Host
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class RegistryError(Exception):
    """A registration that cannot be done; ``code`` is a :class:`~dfz.mgr.messages.MgrErrorCode`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def endpoint_of(ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"tcp://{host}:{port}"


def check_ip(value: str) -> str:
    """The address normalised; ``ValueError`` when it is not an IPv4 or IPv6 address."""
    return str(ipaddress.ip_address(value.strip()))


# --- registration -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registered:
    kind: Kind
    instance_id: int
    cluster_id: int
    cluster: str
    config_cluster_id: int | None
    """The scheduler cluster whose dynamic configs apply to the instance (a seed peer's: the lowest of the
    scheduler clusters its seed-peer cluster serves; None: only the global ones)."""


def _default_scheduler_cluster(session: Session) -> SchedulerCluster:
    found = session.exec(select(SchedulerCluster).where(col(SchedulerCluster.is_default).is_(True))).first()
    if found is not None:
        return found
    if session.exec(select(SchedulerCluster).where(SchedulerCluster.name == DEFAULT_CLUSTER)).first() is not None:
        raise RegistryError(
            1401,
            f"no default scheduler cluster (the cluster {DEFAULT_CLUSTER!r} is not the default): "
            "name a cluster or make one the default",
        )
    # Empty scheduling: the schedulers keep their own settings until somebody sets the cluster's.
    row = SchedulerCluster(name=DEFAULT_CLUSTER, bio="made by the manager: an instance named no cluster", is_default=True)
    session.add(row)
    session.flush()
    audit.record(session, FABRIC, "create", "scheduler_cluster", row.id, {"name": row.name, "is_default": True})
    event(log, 20, "mgr_cluster_created", kind="scheduler_cluster", name=row.name, id=row.id)
    return row


def _scheduler_cluster(session: Session, name: str, cluster_id: int) -> SchedulerCluster:
    if name:
        row = session.exec(select(SchedulerCluster).where(SchedulerCluster.name == name)).first()
        if row is None:
            raise RegistryError(1401, f"there is no scheduler cluster named {name!r}")
    elif cluster_id:
        row = session.get(SchedulerCluster, cluster_id)
        if row is None:
            raise RegistryError(1401, f"there is no scheduler cluster with id {cluster_id}")
    else:
        return _default_scheduler_cluster(session)
    if cluster_id and row.id != cluster_id:
        raise RegistryError(1401, f"the scheduler cluster {name!r} has id {row.id}, not {cluster_id}")
    return row


def _seed_peer_cluster(session: Session, name: str, cluster_id: int) -> SeedPeerCluster:
    if name or cluster_id:
        row = (
            session.exec(select(SeedPeerCluster).where(SeedPeerCluster.name == name)).first()
            if name
            else session.get(SeedPeerCluster, cluster_id)
        )
        if row is None:
            raise RegistryError(
                1401, f"there is no seed-peer cluster {'named ' + repr(name) if name else f'with id {cluster_id}'}"
            )
        if cluster_id and row.id != cluster_id:
            raise RegistryError(1401, f"the seed-peer cluster {name!r} has id {row.id}, not {cluster_id}")
        return row
    row = session.exec(select(SeedPeerCluster).where(SeedPeerCluster.name == DEFAULT_CLUSTER)).first()
    if row is not None:
        return row
    serves = _default_scheduler_cluster(session)
    row = SeedPeerCluster(name=DEFAULT_CLUSTER, bio="made by the manager: a seed peer named no cluster")
    session.add(row)
    session.flush()
    assert row.id is not None and serves.id is not None
    session.add(SeedPeerClusterLink(seed_peer_cluster_id=row.id, scheduler_cluster_id=serves.id))
    session.flush()
    audit.record(session, FABRIC, "create", "seed_peer_cluster", row.id, {"name": row.name, "scheduler_cluster_ids": [serves.id]})
    event(log, 20, "mgr_cluster_created", kind="seed_peer_cluster", name=row.name, id=row.id)
    return row


def register(db: Database, msg: MgrRegister, *, serving: ClusterView | None = None, tenant_id: int | None = None) -> Registered:
    """Create or take over the instance ``msg`` names, active from now. ``serving``: for a host, the
    scheduler cluster that serves it (:func:`match_cluster`; None: none does); ``tenant_id``: a host's
    tenant, from its daemon token (None: none; the REST API's value is replaced). Raises :class:`RegistryError`."""
    try:
        ip = check_ip(msg.ip)
    except ValueError:
        raise RegistryError(1402, f"ip: {msg.ip!r} is not an IPv4 or IPv6 address") from None
    if msg.kind == "host" and not msg.host_id:
        raise RegistryError(1402, "host_id: a host registers with its host id")
    now = utcnow()
    with db.writing() as session:
        row: Instance | None
        values: dict[str, Any]
        if msg.kind == "host":
            serving_id = serving.id if serving is not None and session.get(SchedulerCluster, serving.id) is not None else None
            row = session.exec(select(Host).where(Host.host_id == msg.host_id)).first()
            values = {
                "hostname": msg.hostname,
                "ip": ip,
                "port": msg.port,
                "download_port": msg.download_port or msg.port,
                "idc": msg.idc,
                "location": msg.location,
                "os": msg.os,
                "platform": msg.platform,
                "arch": msg.arch,
                "scheduler_cluster_id": serving_id,
                "tenant_id": tenant_id,
            }
            if row is None:
                row = Host(host_id=msg.host_id, **values)
            config_cluster: int | None = serving_id
            cluster_id, cluster_name = serving_id or 0, serving.name if serving is not None and serving_id else ""
        elif msg.kind == "scheduler":
            cluster = _scheduler_cluster(session, msg.cluster, msg.cluster_id)
            assert cluster.id is not None
            row = session.exec(
                select(Scheduler).where(
                    Scheduler.hostname == msg.hostname, Scheduler.ip == ip, Scheduler.scheduler_cluster_id == cluster.id
                )
            ).first()
            values = {"port": msg.port, "idc": msg.idc, "location": msg.location}
            if row is None:
                row = Scheduler(
                    hostname=msg.hostname, ip=ip, scheduler_cluster_id=cluster.id, features=["schedule", "preheat"], **values
                )
            config_cluster = cluster.id
            cluster_id, cluster_name = cluster.id, cluster.name
        else:
            seed_cluster = _seed_peer_cluster(session, msg.cluster, msg.cluster_id)
            assert seed_cluster.id is not None
            row = session.exec(
                select(SeedPeer).where(
                    SeedPeer.hostname == msg.hostname, SeedPeer.ip == ip, SeedPeer.seed_peer_cluster_id == seed_cluster.id
                )
            ).first()
            values = {
                "port": msg.port,
                "download_port": msg.download_port or msg.port,
                "idc": msg.idc,
                "location": msg.location,
                "type": msg.seed_type,
            }
            if row is None:
                row = SeedPeer(hostname=msg.hostname, ip=ip, seed_peer_cluster_id=seed_cluster.id, **values)
            served = session.exec(
                select(SeedPeerClusterLink.scheduler_cluster_id)
                .where(SeedPeerClusterLink.seed_peer_cluster_id == seed_cluster.id)
                .order_by(col(SeedPeerClusterLink.scheduler_cluster_id))
            ).first()
            config_cluster = served
            cluster_id, cluster_name = seed_cluster.id, seed_cluster.name
        created = row.id is None
        changed = {} if created else {k: {"from": getattr(row, k), "to": v} for k, v in values.items() if getattr(row, k) != v}
        for key, value in values.items():
            setattr(row, key, value)
        row.state = "active"
        row.last_keepalive_at = now
        if created or changed:
            row.updated_at = now
        session.add(row)
        session.flush()
        if created:
            identity = {"host_id": msg.host_id} if msg.kind == "host" else {"hostname": row.hostname, "ip": ip}
            audit.record(session, FABRIC, "create", msg.kind, row.id, {**identity, "cluster_id": cluster_id, **values})
        elif changed:
            audit.record(session, FABRIC, "update", msg.kind, row.id, changed)
        assert row.id is not None
        return Registered(msg.kind, row.id, cluster_id, cluster_name, config_cluster)


TABLES: dict[Kind, type[Instance]] = {"scheduler": Scheduler, "seed_peer": SeedPeer, "host": Host}
KINDS: tuple[Kind, ...] = ("scheduler", "seed_peer", "host")
_CHUNK = 500
"""Most ids in one ``IN (...)`` (SQLite's bound on variables is far above; a statement stays small)."""


_BULK = {"synchronize_session": False}
"""Set-wise updates: no object of the session is kept in step (none is loaded)."""


def _chunks(ids: Sequence[int]) -> Iterable[Sequence[int]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i : i + _CHUNK]


def set_state(db: Database, kind: Kind, ids: Iterable[int], state: Literal["active", "inactive"]) -> list[int]:
    """Set these instances' state (``active`` also refreshes ``last_keepalive_at``); the ids whose state flipped."""
    wanted = sorted(set(ids))
    if not wanted:
        return []
    table = TABLES[kind]
    id_col, state_col = col(table.id), col(table.state)
    now = utcnow()
    flipped: list[int | None] = []
    with db.writing() as session:
        for chunk in _chunks(wanted):
            flipped += session.exec(select(id_col).where(id_col.in_(chunk), state_col != state)).all()
            values: dict[str, Any] = {"state": state}
            if state == "active":
                values["last_keepalive_at"] = now
            session.execute(sa.update(table).where(id_col.in_(chunk)).values(**values), execution_options=_BULK)
    return sorted(i for i in flipped if i is not None)


def touch(db: Database, instances: Mapping[Kind, Sequence[int]]) -> None:
    """These instances are alive (kept alive on a session of this manager): ``active``, and
    ``last_keepalive_at`` now. One ``UPDATE`` per kind (and per :data:`_CHUNK` ids), in one transaction."""
    if not any(instances.values()):
        return
    now = utcnow()
    with db.writing() as session:
        for kind, ids in instances.items():
            table = TABLES[kind]
            for chunk in _chunks(sorted(set(ids))):
                session.execute(
                    sa.update(table).where(col(table.id).in_(chunk)).values(state="active", last_keepalive_at=now),
                    execution_options=_BULK,
                )


def sweep(db: Database, older_than: dt.datetime, held: Mapping[Kind, set[int]]) -> dict[Kind, list[int]]:
    """Mark inactive every active instance not ``held`` here whose last keepalive is older than ``older_than``;
    the ids marked, by kind. An instance that never kept alive (made through the REST API, its state set by
    hand) is left alone: the fabric manages the liveness of the instances that registered over it."""
    out: dict[Kind, list[int]] = {}
    with db.writing() as session:
        for kind in KINDS:
            table = TABLES[kind]
            id_col, kept = col(table.id), col(table.last_keepalive_at)
            stale = session.exec(select(id_col).where(table.state == "active", kept.is_not(None), kept < older_than)).all()
            mine = held.get(kind, set())
            marked = sorted(i for i in stale if i is not None and i not in mine)
            for chunk in _chunks(marked):
                session.execute(sa.update(table).where(id_col.in_(chunk)).values(state="inactive"), execution_options=_BULK)
            if marked:
                out[kind] = marked
    return out


# --- what daemons and schedulers are told -------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterView:
    """A scheduler cluster as the matching rule sees it, with its active schedulers."""

    id: int
    name: str
    is_default: bool = False
    idcs: tuple[str, ...] = ()
    location: tuple[str, ...] = ()
    cidrs: tuple[Network, ...] = ()
    hostnames: tuple[re.Pattern[str], ...] = ()
    scheduling: Mapping[str, Any] = field(default_factory=dict)
    schedulers: tuple[MgrScheduler, ...] = ()


def _location(text: str) -> tuple[str, ...]:
    return tuple(part.strip().lower() for part in text.split("|")) if text.strip() else ()


def cluster_view(row: SchedulerCluster, schedulers: Sequence[MgrScheduler] = ()) -> ClusterView:
    """A cluster's row as a :class:`ClusterView`; scopes that do not parse are left out (and logged)."""
    scopes = row.scopes if isinstance(row.scopes, dict) else {}
    cidrs: list[Network] = []
    for text in scopes.get("cidrs") or []:
        try:
            cidrs.append(ipaddress.ip_network(str(text), strict=False))
        except ValueError:
            event(log, 30, "mgr_bad_scope", cluster=row.id, cidr=text)
    patterns: list[re.Pattern[str]] = []
    for text in scopes.get("hostnames") or []:
        try:
            patterns.append(re.compile(str(text)))
        except re.error:
            event(log, 30, "mgr_bad_scope", cluster=row.id, hostname=text)
    idc = str(scopes.get("idc") or "")
    assert row.id is not None
    return ClusterView(
        id=row.id,
        name=row.name,
        is_default=row.is_default,
        idcs=tuple(i.strip().lower() for i in idc.split("|") if i.strip()),
        location=_location(str(scopes.get("location") or "")),
        cidrs=tuple(cidrs),
        hostnames=tuple(patterns),
        scheduling=dict(row.scheduling) if isinstance(row.scheduling, dict) else {},
        schedulers=tuple(schedulers[:MAX_SCHEDULERS]),
    )


def match_cluster(
    clusters: Sequence[ClusterView], *, ip: str = "", hostname: str = "", idc: str = "", location: str = ""
) -> tuple[ClusterView | None, MatchedBy]:
    """The cluster that serves a daemon, and the rule that chose it (``protocol.md`` §17.4).

    Rules in order, each among the clusters that have an active scheduler; the first rule that matches a
    cluster decides, ties going to the lowest cluster id: ``cidr`` (the daemon's IP in one of the cluster's
    CIDRs; the longest prefix wins), ``hostname`` (one of the cluster's regular expressions matches the
    daemon's host name, ``re.search``), ``idc`` (the daemon's IDC is one of the cluster's ``|``-separated
    IDCs, case-insensitive), ``location`` (the cluster's ``|``-separated location is a prefix of the
    daemon's, element by element, case-insensitive; the longest wins), ``default`` (the default cluster,
    even without an active scheduler), else ``none``.
    """
    live = sorted((c for c in clusters if c.schedulers), key=lambda c: c.id)
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    try:
        address = ipaddress.ip_address(ip.strip()) if ip else None
    except ValueError:
        address = None
    if address is not None:
        best: tuple[int, int, ClusterView] | None = None
        for c in live:
            for net in c.cidrs:
                if address.version == net.version and address in net:
                    key = (-net.prefixlen, c.id)
                    if best is None or key < best[:2]:
                        best = (*key, c)
        if best is not None:
            return best[2], "cidr"
    if hostname:
        for c in live:
            if any(p.search(hostname) for p in c.hostnames):
                return c, "hostname"
    wanted_idc = idc.strip().lower()
    if wanted_idc:
        for c in live:
            if wanted_idc in c.idcs:
                return c, "idc"
    mine = _location(location)
    if mine:
        best_loc: tuple[int, int, ClusterView] | None = None
        for c in live:
            n = len(c.location)
            if n and mine[:n] == c.location:
                key = (-n, c.id)
                if best_loc is None or key < best_loc[:2]:
                    best_loc = (*key, c)
        if best_loc is not None:
            return best_loc[2], "location"
    for c in sorted(clusters, key=lambda c: c.id):
        if c.is_default:
            return c, "default"
    return None, "none"


@dataclass(frozen=True)
class Snapshot:
    """What the fabric answers from without reading the database: the clusters with their active
    schedulers, and the dynamic configs, as of :attr:`taken`."""

    clusters: tuple[ClusterView, ...] = ()
    configs: tuple[tuple[int, str, int | None, Mapping[str, Any]], ...] = ()
    """``(id, target, scheduler_cluster_id, value)`` of every dynamic config, in id order."""

    def cluster(self, cluster_id: int | None) -> ClusterView | None:
        for c in self.clusters:
            if c.id == cluster_id:
                return c
        return None

    def settings(self, target: Literal["scheduler", "daemon"], cluster_id: int | None) -> dict[str, Any]:
        """The dynamic settings of ``target`` processes of the cluster: for a scheduler its cluster's
        scheduling settings first; then the configs for every cluster (in id order), then the cluster's own
        (in id order); a later one wins a key. Only values that fit the wire (``mgr.config``) are kept."""
        out: dict[str, Any] = {}
        if target == "scheduler":
            c = self.cluster(cluster_id)
            if c is not None:
                out.update(c.scheduling)
        for scoped in (False, True):
            for _id, t, cid, value in self.configs:
                if t == target and (cid is not None) == scoped and (not scoped or cid == cluster_id):
                    out.update(value)
        return wire_settings(out)


_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def wire_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` without what ``mgr.config`` cannot carry (bad keys, nested values, long strings, huge ints)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not _KEY.match(key):
            continue
        if (
            isinstance(value, bool | float)
            or (isinstance(value, int) and -(2**63) <= value < 2**63)
            or (isinstance(value, str) and len(value) <= 256)
        ):
            out[key] = value
        if len(out) >= MAX_CONFIG_KEYS:
            break
    return out


def load_snapshot(db: Database) -> Snapshot:
    with db.reading() as session:
        active: dict[int, list[MgrScheduler]] = {}
        stmt = select(Scheduler).where(Scheduler.state == "active").order_by(col(Scheduler.id))
        for s in session.exec(stmt).all():
            assert s.id is not None
            active.setdefault(s.scheduler_cluster_id, []).append(
                MgrScheduler(
                    id=s.id,
                    hostname=s.hostname[:256],
                    ip=s.ip,
                    port=s.port,
                    endpoint=endpoint_of(s.ip, s.port),
                    idc=s.idc,
                    location=s.location,
                )
            )
        clusters = tuple(
            cluster_view(row, active.get(row.id or 0, ()))
            for row in session.exec(select(SchedulerCluster).order_by(col(SchedulerCluster.id))).all()
        )
        configs = tuple(
            (row.id or 0, row.target, row.scheduler_cluster_id, dict(row.value) if isinstance(row.value, dict) else {})
            for row in session.exec(select(DynamicConfig).order_by(col(DynamicConfig.id))).all()
        )
    return Snapshot(clusters, configs)


def timeout_before(seconds: float) -> dt.datetime:
    return utcnow() - dt.timedelta(seconds=seconds)
