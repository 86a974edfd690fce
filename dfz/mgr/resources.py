"""The REST API's resources (:class:`~dfz.mgr.crud.Resource`) and the rules particular to each: one
default scheduler cluster, built-in roles that stay, no handing out more than one holds, the last root
user, a job's arguments shown without its password, a dynamic config's version; and which tenant a row
belongs to, for confined principals (hosts, applications, jobs and users by their ``tenant_id``, a tenant
by its id, an audit entry by its actor's tenant; roles are global: a confined principal changes none)."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, status
from sqlmodel import Session, col, select

from . import audit, sealing
from .auth import TENANT_ADMIN, Principal
from .crud import Link, Resource, Values
from .models import (
    Application,
    AuditLog,
    DynamicConfig,
    Host,
    Job,
    JobSchedulerCluster,
    Role,
    Scheduler,
    SchedulerCluster,
    SeedPeer,
    SeedPeerCluster,
    SeedPeerClusterLink,
    Tenant,
    User,
    utcnow,
)
from .schemas import (
    ApplicationCreate,
    ApplicationFilter,
    ApplicationRead,
    ApplicationUpdate,
    AuditLogFilter,
    AuditLogRead,
    DynamicConfigCreate,
    DynamicConfigFilter,
    DynamicConfigRead,
    DynamicConfigUpdate,
    HostCreate,
    HostFilter,
    HostRead,
    HostUpdate,
    JobCreate,
    JobFilter,
    JobRead,
    JobUpdate,
    RoleCreate,
    RoleFilter,
    RoleRead,
    RoleUpdate,
    SchedulerClusterCreate,
    SchedulerClusterFilter,
    SchedulerClusterRead,
    SchedulerClusterUpdate,
    SchedulerCreate,
    SchedulerFilter,
    SchedulerRead,
    SchedulerUpdate,
    SeedPeerClusterCreate,
    SeedPeerClusterFilter,
    SeedPeerClusterRead,
    SeedPeerClusterUpdate,
    SeedPeerCreate,
    SeedPeerFilter,
    SeedPeerRead,
    SeedPeerUpdate,
    TenantCreate,
    TenantFilter,
    TenantRead,
    TenantUpdate,
    UserCreate,
    UserFilter,
    UserRead,
    UserUpdate,
    check_config_value,
)
from .security import ALL, covers, hash_password

ROOT_ROLE = "root"


def _refuse(code: int, detail: str) -> HTTPException:
    return HTTPException(code, detail)


def _touch(values: Values, row: Any) -> None:
    if row is not None:
        values["updated_at"] = utcnow()


# --- scheduler clusters ------------------------------------------------------------------------------------


def _scheduler_cluster(session: Session, principal: Principal, values: Values, row: SchedulerCluster | None) -> None:
    _touch(values, row)
    if values.get("is_default"):
        # One default cluster: the new one takes the flag from the old (an audited change of its own).
        stmt = select(SchedulerCluster).where(col(SchedulerCluster.is_default).is_(True))
        for other in session.exec(stmt).all():
            if row is None or other.id != row.id:
                other.is_default = False
                other.updated_at = utcnow()
                session.add(other)
                session.flush()
                audit.record(
                    session, principal.actor, "update", "scheduler_cluster", other.id, {"is_default": {"from": True, "to": False}}
                )


_SEED_PEER_LINK = Link(
    "seed_peer_cluster_ids", SeedPeerClusterLink, "scheduler_cluster_id", "seed_peer_cluster_id", SeedPeerCluster
)

SCHEDULER_CLUSTERS = Resource(
    path="scheduler-clusters",
    kind="scheduler_cluster",
    title="scheduler cluster",
    table=SchedulerCluster,
    group="cluster",
    create=SchedulerClusterCreate,
    update=SchedulerClusterUpdate,
    read=SchedulerClusterRead,
    filter=SchedulerClusterFilter,
    links=(_SEED_PEER_LINK,),
    prepare=_scheduler_cluster,
)

SEED_PEER_CLUSTERS = Resource(
    path="seed-peer-clusters",
    kind="seed_peer_cluster",
    title="seed-peer cluster",
    table=SeedPeerCluster,
    group="cluster",
    create=SeedPeerClusterCreate,
    update=SeedPeerClusterUpdate,
    read=SeedPeerClusterRead,
    filter=SeedPeerClusterFilter,
    links=(Link("scheduler_cluster_ids", SeedPeerClusterLink, "seed_peer_cluster_id", "scheduler_cluster_id", SchedulerCluster),),
    prepare=lambda session, principal, values, row: _touch(values, row),
    filters={
        "scheduler_cluster_id": lambda value: col(SeedPeerCluster.id).in_(
            select(SeedPeerClusterLink.seed_peer_cluster_id).where(SeedPeerClusterLink.scheduler_cluster_id == value)
        )
    },
)


def _plain(values: Values, row: Any) -> None:
    _touch(values, row)


SCHEDULERS = Resource(
    path="schedulers",
    kind="scheduler",
    title="scheduler",
    table=Scheduler,
    group="cluster",
    create=SchedulerCreate,
    update=SchedulerUpdate,
    read=SchedulerRead,
    filter=SchedulerFilter,
    prepare=lambda session, principal, values, row: _plain(values, row),
)

SEED_PEERS = Resource(
    path="seed-peers",
    kind="seed_peer",
    title="seed peer",
    table=SeedPeer,
    group="cluster",
    create=SeedPeerCreate,
    update=SeedPeerUpdate,
    read=SeedPeerRead,
    filter=SeedPeerFilter,
    prepare=lambda session, principal, values, row: _plain(values, row),
)

HOSTS = Resource(
    path="hosts",
    kind="host",
    title="host",
    table=Host,
    group="cluster",
    create=HostCreate,
    update=HostUpdate,
    read=HostRead,
    filter=HostFilter,
    prepare=lambda session, principal, values, row: _plain(values, row),
    tenant_field="tenant_id",
)

TENANTS = Resource(
    path="tenants",
    kind="tenant",
    title="tenant",
    table=Tenant,
    group="tenant",
    create=TenantCreate,
    update=TenantUpdate,
    read=TenantRead,
    filter=TenantFilter,
    prepare=lambda session, principal, values, row: _plain(values, row),
    confine=lambda principal: col(Tenant.id) == principal.tenant,
)


# --- roles and users -------------------------------------------------------------------------------------------


def _no_escalation(principal: Principal, permissions: list[str], what: str) -> None:
    beyond = [p for p in permissions if not covers(principal.permissions, p)]
    if beyond:
        raise _refuse(status.HTTP_403_FORBIDDEN, f"{what} {', '.join(beyond)}, which your role does not have")


def _not_confined(principal: Principal) -> None:
    if principal.confined:
        raise _refuse(status.HTTP_403_FORBIDDEN, "roles are global: a user confined to a tenant cannot change them")


def _role(session: Session, principal: Principal, values: Values, row: Role | None) -> None:
    _not_confined(principal)
    _touch(values, row)
    if "permissions" in values:
        _no_escalation(principal, values["permissions"], "the role would grant")
    if row is not None and row.builtin:
        if "name" in values and values["name"] != row.name:
            raise _refuse(status.HTTP_409_CONFLICT, f"role {row.name!r} is built in: it cannot be renamed")
        if row.name == ROOT_ROLE and "permissions" in values and values["permissions"] != [ALL]:
            raise _refuse(status.HTTP_409_CONFLICT, "role 'root' is built in: its permissions stay ['*']")


def _role_delete(session: Session, principal: Principal, row: Role) -> None:
    _not_confined(principal)
    if row.builtin:
        raise _refuse(status.HTTP_409_CONFLICT, f"role {row.name!r} is built in: it cannot be deleted")


ROLES = Resource(
    path="roles",
    kind="role",
    title="role",
    table=Role,
    group="user",
    create=RoleCreate,
    update=RoleUpdate,
    read=RoleRead,
    filter=RoleFilter,
    prepare=_role,
    before_delete=_role_delete,
)


def _root_users(session: Session) -> list[int]:
    """Ids of the enabled users whose role is root."""
    stmt = select(User.id).join(Role, col(Role.id) == User.role_id).where(Role.name == ROOT_ROLE, User.state == "enabled")
    return [i for i in session.exec(stmt).all() if i is not None]


def _user(session: Session, principal: Principal, values: Values, row: User | None) -> None:
    _touch(values, row)
    if "password" in values:
        values["password_hash"] = hash_password(values.pop("password"))
    if values.get("role_id") is not None:
        role = session.get(Role, values["role_id"])
        if role is None:
            raise _refuse(422, f"role_id: there is no role with id {values['role_id']}")
        _no_escalation(principal, role.permissions, f"role {role.name!r} grants")
    role_id = values.get("role_id", row.role_id if row is not None else None)
    tenant_id = values.get("tenant_id", row.tenant_id if row is not None else None)
    if tenant_id is None and role_id is not None and ("role_id" in values or "tenant_id" in values):
        role = session.get(Role, role_id)
        if role is not None and role.name == TENANT_ADMIN:
            raise _refuse(422, f"tenant_id: a user with role {TENANT_ADMIN!r} administers a tenant: give it one")
    if row is not None and row.id in _root_users(session):
        demoted = "role_id" in values and values["role_id"] != row.role_id
        disabled = values.get("state", "enabled") != "enabled"
        if (demoted or disabled) and len(_root_users(session)) == 1:
            raise _refuse(status.HTTP_409_CONFLICT, f"{row.name!r} is the last enabled root user: it must stay root and enabled")


def _user_delete(session: Session, principal: Principal, row: User) -> None:
    if row.id == principal.user_id:
        raise _refuse(status.HTTP_409_CONFLICT, "you cannot delete yourself")
    if row.id in _root_users(session) and len(_root_users(session)) == 1:
        raise _refuse(status.HTTP_409_CONFLICT, f"{row.name!r} is the last enabled root user")


USERS = Resource(
    path="users",
    kind="user",
    title="user",
    table=User,
    group="user",
    create=UserCreate,
    update=UserUpdate,
    read=UserRead,
    filter=UserFilter,
    prepare=_user,
    before_delete=_user_delete,
    tenant_field="tenant_id",
)


# --- applications, jobs, dynamic configs, audit -------------------------------------------------------------------


def _owned(session: Session, principal: Principal, values: Values, row: Any) -> None:
    _touch(values, row)
    if row is None:
        values["user_id"] = principal.user_id
        values.setdefault("tenant_id", principal.tenant_id)


APPLICATIONS = Resource(
    path="applications",
    kind="application",
    title="application",
    table=Application,
    group="application",
    create=ApplicationCreate,
    update=ApplicationUpdate,
    read=ApplicationRead,
    filter=ApplicationFilter,
    prepare=_owned,
    tenant_field="tenant_id",
)


def _job_delete(session: Session, principal: Principal, row: Job) -> None:
    if row.state == "running":
        raise _refuse(status.HTTP_409_CONFLICT, f"job {row.id} is running: cancel it first")


def _job_present(values: Values) -> Values:
    return {**values, "args": audit.redact(sealing.shown_args(values["args"]))}


def _job(session: Session, principal: Principal, values: Values, row: Job | None) -> None:
    _touch(values, row)
    if row is None:
        values["user_id"] = principal.user_id
        values["tenant_id"] = principal.tenant_id
        # A registry password is kept to run (or resume) the job, sealed with the manager's key (sealing.py).
        if any(values["args"].get(name) for name in sealing.SEALED_FIELDS):
            sealer = session.info.get("sealer")
            if sealer is None:
                raise _refuse(status.HTTP_503_SERVICE_UNAVAILABLE, "the manager has no secret key to keep the password with")
            values["args"] = sealing.seal_args(values["args"], sealer)


JOBS = Resource(
    path="jobs",
    kind="job",
    title="job",
    table=Job,
    group="job",
    create=JobCreate,
    update=JobUpdate,
    read=JobRead,
    filter=JobFilter,
    links=(Link("scheduler_cluster_ids", JobSchedulerCluster, "job_id", "scheduler_cluster_id", SchedulerCluster),),
    prepare=_job,
    before_delete=_job_delete,
    present=_job_present,
    tenant_field="tenant_id",
    filters={
        "scheduler_cluster_id": lambda value: col(Job.id).in_(
            select(JobSchedulerCluster.job_id).where(JobSchedulerCluster.scheduler_cluster_id == value)
        )
    },
)


def _dynamic_config(session: Session, principal: Principal, values: Values, row: DynamicConfig | None) -> None:
    _touch(values, row)
    if row is None:
        return
    if "value" in values:
        try:
            values["value"] = check_config_value(row.target, values["value"])
        except ValueError as e:
            raise _refuse(422, f"value: {e}") from None
    if any(k in values and values[k] != getattr(row, k) for k in ("value", "scheduler_cluster_id")):
        values["version"] = row.version + 1


DYNAMIC_CONFIGS = Resource(
    path="configs",
    kind="dynamic_config",
    title="dynamic config",
    table=DynamicConfig,
    group="config",
    create=DynamicConfigCreate,
    update=DynamicConfigUpdate,
    read=DynamicConfigRead,
    filter=DynamicConfigFilter,
    prepare=_dynamic_config,
)


AUDIT_LOGS = Resource(
    path="audit-logs",
    kind="audit_log",
    title="audit log entry",
    table=AuditLog,
    group="audit",
    read=AuditLogRead,
    filter=AuditLogFilter,
    deletable=False,
    filters={
        "since": lambda value: col(AuditLog.at) >= value,
        "until": lambda value: col(AuditLog.at) < value,
    },
    # An entry is of the tenant of the user who made the change.
    confine=lambda principal: col(AuditLog.actor_user_id).in_(select(User.id).where(User.tenant_id == principal.tenant)),
)

RESOURCES: tuple[Resource, ...] = (
    SCHEDULER_CLUSTERS,
    SEED_PEER_CLUSTERS,
    SCHEDULERS,
    SEED_PEERS,
    HOSTS,
    APPLICATIONS,
    TENANTS,
    USERS,
    ROLES,
    JOBS,
    DYNAMIC_CONFIGS,
    AUDIT_LOGS,
)
"""Every resource served by the generic endpoints (tokens and sessions have their own, in ``api.py``)."""
