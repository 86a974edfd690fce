"""The manager's tables (SQLModel): everything the manager stores, in one place.

Rules of this file:

* It is the schema. Alembic's revisions in ``migrations/versions/`` create and change it; a test compares
  the migrated database with these classes, so a change here without a revision fails the suite.
* Rows are plain records. What a value may be (an IDC's length, a CIDR, a scope, the state machine of a
  job) is checked by the API schemas (``schemas.py``) before a row is written; the database adds the
  constraints it can keep itself: keys, uniqueness, foreign keys, one default scheduler cluster.
* Times are timezone-aware UTC (:class:`UTCDateTime`), on SQLite as on PostgreSQL.
* Structured settings (a cluster's scheduling config and scopes, a job's arguments and result, a dynamic
  config's value) are JSON documents: their shape is owned by the schemas and may grow without a
  migration; what is filtered or joined on is a column.
* Secrets are never stored: passwords as scrypt hashes, tokens as SHA-256 digests (``security.py``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(sa.types.TypeDecorator[dt.datetime]):
    """A timezone-aware UTC timestamp on every backend: SQLite keeps no zone, so values are stored as naive
    UTC there and given their zone back when read; PostgreSQL stores ``timestamptz``."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: the manager stores timezone-aware UTC times only")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


JSONDoc = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
"""A JSON document column: JSONB on PostgreSQL, JSON text on SQLite."""

NAME_LENGTH = 255
TEXT_LENGTH = 1024


def _created() -> Any:
    return Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)


def _time(*, index: bool = False) -> Any:
    return Field(default=None, sa_type=UTCDateTime, nullable=True, index=index)


def _json(default: type[dict[str, Any]] | type[list[Any]] = dict) -> Any:
    return Field(default_factory=default, sa_type=JSONDoc, nullable=False)


def _str(length: int = NAME_LENGTH, *, default: str | None = "", index: bool = False, unique: bool = False) -> Any:
    return Field(default=default, max_length=length, sa_type=sa.String(length), nullable=False, index=index, unique=unique)


def _fk(target: str, *, nullable: bool, ondelete: Literal["CASCADE", "SET NULL"] | None = None) -> Any:
    if ondelete is None:
        return Field(default=None, foreign_key=target, nullable=nullable, index=True)
    return Field(default=None, foreign_key=target, nullable=nullable, index=True, ondelete=ondelete)


# --- clusters -------------------------------------------------------------------------------------------


class SchedulerCluster(SQLModel, table=True):
    """A set of schedulers that serve the daemons its scopes match (or every daemon, when it is the
    default). ``scheduling`` is the scheduler settings pushed to its schedulers (evaluator and weights,
    candidate parent limit and sample); ``scopes`` is ``{idc, location, cidrs, hostnames}``."""

    __tablename__ = "scheduler_clusters"
    __table_args__ = (
        # At most one default cluster: a partial unique index on both backends.
        sa.Index(
            "uq_scheduler_clusters_default",
            "is_default",
            unique=True,
            sqlite_where=sa.text("is_default"),
            postgresql_where=sa.text("is_default"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    name: str = _str(unique=True, default=None)
    bio: str = _str(TEXT_LENGTH)
    scheduling: dict[str, Any] = _json()
    scopes: dict[str, Any] = _json()
    is_default: bool = Field(default=False, nullable=False)
    created_at: dt.datetime = _created()
    updated_at: dt.datetime = _created()


class SeedPeerCluster(SQLModel, table=True):
    """A set of seed peers; it serves the scheduler clusters it is linked to (many to many)."""

    __tablename__ = "seed_peer_clusters"

    id: int | None = Field(default=None, primary_key=True)
    name: str = _str(unique=True, default=None)
    bio: str = _str(TEXT_LENGTH)
    config: dict[str, Any] = _json()
    created_at: dt.datetime = _created()
    updated_at: dt.datetime = _created()


class SeedPeerClusterLink(SQLModel, table=True):
    """Which seed-peer clusters serve which scheduler clusters."""

    __tablename__ = "seed_peer_cluster_scheduler_clusters"

    seed_peer_cluster_id: int = Field(foreign_key="seed_peer_clusters.id", primary_key=True, ondelete="CASCADE")
    scheduler_cluster_id: int = Field(foreign_key="scheduler_clusters.id", primary_key=True, ondelete="CASCADE", index=True)


class Scheduler(SQLModel, table=True):
    """A scheduler instance of a cluster; ``state`` is ``active`` while it keeps alive."""

    __tablename__ = "schedulers"
    __table_args__ = (sa.UniqueConstraint("hostname", "ip", "scheduler_cluster_id"),)

    id: int | None = Field(default=None, primary_key=True)
    hostname: str = _str(default=None, index=True)
    ip: str = _str(64, default=None)
    port: int = Field(nullable=False)
    idc: str = _str(TEXT_LENGTH)
    location: str = _str(TEXT_LENGTH)
    state: str = _str(32, default="inactive", index=True)
    features: list[str] = _json(list)
    scheduler_cluster_id: int = _fk("scheduler_clusters.id", nullable=False)
    last_keepalive_at: dt.datetime | None = _time()
    created_at: dt.datetime = _created()
    updated_at: dt.datetime = _created()


class SeedPeer(SQLModel, table=True):
    """A seed peer instance of a seed-peer cluster."""

    __tablename__ = "seed_peers"
    __table_args__ = (sa.UniqueConstraint("hostname", "ip", "seed_peer_cluster_id"),)

    id: int | None = Field(default=None, primary_key=True)
    hostname: str = _str(default=None, index=True)
    type: str = _str(32, default="super")
    ip: str = _str(64, default=None)
    port: int = Field(nullable=False)
    download_port: int = Field(nullable=False)
    idc: str = _str(TEXT_LENGTH)
    location: str = _str(TEXT_LENGTH)
    state: str = _str(32, default="inactive", index=True)
    seed_peer_cluster_id: int = _fk("seed_peer_clusters.id", nullable=False)
    last_keepalive_at: dt.datetime | None = _time()
    created_at: dt.datetime = _created()
    updated_at: dt.datetime = _created()


class Host(SQLModel, table=True):
    """A registered daemon (a host of the P2P network), of a tenant, served by a scheduler cluster."""

    __tablename__ = "hosts"

    id: int | None = Field(default=None, primary_key=True)
    host_id: str = _str(default=None, unique=True)
    hostname: str = _str(default=None, index=True)
    ip: str = _str(64, default=None, index=True)
    port: int = Field(nullable=False)
    download_port: int = Field(default=0, nullable=False)
    type: str = _str(32, default="normal")
    idc: str = _str(TEXT_LENGTH)
    location: str = _str(TEXT_LENGTH)
    os: str = _str(64)
    platform: str = _str(64)
    arch: str = _str(64)
    state: str = _str(32, default="inactive", index=True)
    tenant_id: int | None = _fk("tenants.id", nullable=True)
    scheduler_cluster_id: int | None = _fk("scheduler_clusters.id", nullable=True, ondelete="SET NULL")
    last_keepalive_at: dt.datetime | None = _time()
    created_at: dt.datetime = _created()
    updated_at: dt.datetime = _created()


# --- people and programs ----------------------------------------------------------------------------------


class Tenant(SQLModel, table=True):
    """A tenant: its daemons, users and applications are isolated from other tenants'."""

    __tablename__ = "tenants"

    id: int | None = Field(default=None, primary_key=True)
    name: str = _str(unique=True, default=None)
    bio: str = _str(TEXT_LENGTH)
    state: str = _str(32, default="enabled")
    created_at: dt.datetime = _created()
    updated_at: dt.datetime = _created()


class Role(SQLModel, table=True):
    """A role: a list of permissions (``security.PERMISSION_GROUPS``, ``group`` or ``group:read``, or ``*``).
    Built-in roles (``root``, ``operator``, ``guest``, ``tenant-admin``) come with the first migration
    and cannot be renamed or deleted."""

    __tablename__ = "roles"

    id: int | None = Field(default=None, primary_key=True)
    name: str = _str(64, unique=True, default=None)
    bio: str = _str(TEXT_LENGTH)
    permissions: list[str] = _json(list)
    builtin: bool = Field(default=False, nullable=False)
    created_at: dt.datetime = _created()
    updated_at: dt.datetime = _created()


class User(SQLModel, table=True):
    """A person (or a service account) with one role, optionally confined to a tenant."""

    __tablename__ = "users"

    id: int | None = Field(default=None, primary_key=True)
    name: str = _str(64, unique=True, default=None)
    email: str | None = Field(default=None, max_length=NAME_LENGTH, sa_type=sa.String(NAME_LENGTH), unique=True)
    bio: str = _str(TEXT_LENGTH)
    password_hash: str = _str(NAME_LENGTH, default=None)
    state: str = _str(32, default="enabled")
    role_id: int = _fk("roles.id", nullable=False)
    tenant_id: int | None = _fk("tenants.id", nullable=True)
    last_sign_in_at: dt.datetime | None = _time()
    created_at: dt.datetime = _created()
    updated_at: dt.datetime = _created()


class PersonalAccessToken(SQLModel, table=True):
    """A token a program presents as ``Authorization: Bearer ...``. Only the SHA-256 of the secret is
    kept (the secret is shown once, at creation); ``prefix`` identifies it in lists and logs. A token
    acts for its user, within both its scopes and the user's role."""

    __tablename__ = "personal_access_tokens"

    id: int | None = Field(default=None, primary_key=True)
    name: str = _str(default=None)
    bio: str = _str(TEXT_LENGTH)
    prefix: str = _str(32, default=None)
    token_hash: str = _str(64, default=None, unique=True)
    scopes: list[str] = _json(list)
    user_id: int = _fk("users.id", nullable=False, ondelete="CASCADE")
    expires_at: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)
    revoked_at: dt.datetime | None = _time()
    last_used_at: dt.datetime | None = _time()
    created_at: dt.datetime = _created()
    updated_at: dt.datetime = _created()


class DaemonToken(SQLModel, table=True):
    """A token that puts the daemons (and seed peers) configured with it in a tenant: a daemon shows it to
    the manager when it registers (``mgr.register``) and gets a signed tenant ticket back
    (``dfz/tickets.py``). Like personal access tokens, only the secret's SHA-256 is kept; it expires and can
    be revoked (a revoked or expired token makes the daemons that use it stop at their next registration or
    ticket refresh)."""

    __tablename__ = "daemon_tokens"

    id: int | None = Field(default=None, primary_key=True)
    name: str = _str(default=None)
    bio: str = _str(TEXT_LENGTH)
    prefix: str = _str(32, default=None)
    token_hash: str = _str(64, default=None, unique=True)
    tenant_id: int = _fk("tenants.id", nullable=False)
    user_id: int | None = _fk("users.id", nullable=True, ondelete="SET NULL")
    """Who made it."""
    expires_at: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)
    revoked_at: dt.datetime | None = _time()
    last_used_at: dt.datetime | None = _time()
    created_at: dt.datetime = _created()
    updated_at: dt.datetime = _created()


class UserSession(SQLModel, table=True):
    """A person's sign-in session (the console's cookie); like tokens, only the secret's digest is kept."""

    __tablename__ = "user_sessions"

    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = _str(64, default=None, unique=True)
    user_id: int = _fk("users.id", nullable=False, ondelete="CASCADE")
    ip: str = _str(64)
    user_agent: str = _str(TEXT_LENGTH)
    expires_at: dt.datetime = Field(sa_type=UTCDateTime, nullable=False)
    revoked_at: dt.datetime | None = _time()
    created_at: dt.datetime = _created()


class Application(SQLModel, table=True):
    """A named application (``dfz get --application``) with its download priority and an owner."""

    __tablename__ = "applications"

    id: int | None = Field(default=None, primary_key=True)
    name: str = _str(unique=True, default=None)
    url: str = _str(TEXT_LENGTH)
    bio: str = _str(TEXT_LENGTH)
    priority: int = Field(default=0, nullable=False)
    user_id: int | None = _fk("users.id", nullable=True, ondelete="SET NULL")
    tenant_id: int | None = _fk("tenants.id", nullable=True)
    created_at: dt.datetime = _created()
    updated_at: dt.datetime = _created()


# --- work and settings ------------------------------------------------------------------------------------


class Job(SQLModel, table=True):
    """A job (preheat, look up a task, delete a task) over some scheduler clusters: its arguments, its state
    (``pending`` → ``running`` → ``succeeded`` / ``failed``, or ``cancelled``) and its result."""

    __tablename__ = "jobs"

    id: int | None = Field(default=None, primary_key=True)
    type: str = _str(32, default=None, index=True)
    state: str = _str(32, default="pending", index=True)
    bio: str = _str(TEXT_LENGTH)
    args: dict[str, Any] = _json()
    result: dict[str, Any] = _json()
    error: str = _str(TEXT_LENGTH)
    user_id: int | None = _fk("users.id", nullable=True, ondelete="SET NULL")
    tenant_id: int | None = _fk("tenants.id", nullable=True)
    started_at: dt.datetime | None = _time()
    finished_at: dt.datetime | None = _time()
    created_at: dt.datetime = _created()
    updated_at: dt.datetime = _created()


class JobSchedulerCluster(SQLModel, table=True):
    """Which scheduler clusters a job runs in."""

    __tablename__ = "job_scheduler_clusters"

    job_id: int = Field(foreign_key="jobs.id", primary_key=True, ondelete="CASCADE")
    scheduler_cluster_id: int = Field(foreign_key="scheduler_clusters.id", primary_key=True, ondelete="CASCADE", index=True)


class DynamicConfig(SQLModel, table=True):
    """Settings pushed to running schedulers or daemons without a restart. ``target`` says which kind of
    process reads it, ``scheduler_cluster_id`` narrows it to one cluster (none: all), ``version`` grows
    with every change so that a process applies each version once."""

    __tablename__ = "dynamic_configs"

    id: int | None = Field(default=None, primary_key=True)
    name: str = _str(unique=True, default=None)
    bio: str = _str(TEXT_LENGTH)
    target: str = _str(32, default=None, index=True)
    scheduler_cluster_id: int | None = _fk("scheduler_clusters.id", nullable=True, ondelete="CASCADE")
    value: dict[str, Any] = _json()
    version: int = Field(default=1, nullable=False)
    created_at: dt.datetime = _created()
    updated_at: dt.datetime = _created()


class AuditLog(SQLModel, table=True):
    """One change: who (user, and through which token or session), what (action, resource type and id),
    the fields before and after (secrets redacted), from where, and when. Written in the transaction of
    the change itself, so a change and its entry exist together or not at all."""

    __tablename__ = "audit_logs"

    id: int | None = Field(default=None, primary_key=True)
    at: dt.datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False, index=True)
    actor_user_id: int | None = Field(default=None, index=True)
    actor_name: str = _str(64)
    via: str = _str(16)
    token_id: int | None = Field(default=None)
    action: str = _str(32, default=None, index=True)
    resource_type: str = _str(64, default=None, index=True)
    resource_id: str = _str(64, index=True)
    changes: dict[str, Any] = _json()
    ip: str = _str(64)
