"""The initial schema: clusters, schedulers, seed peers, hosts, tenants, roles, users, tokens, sessions,
applications, jobs, dynamic configs and the audit log; and the built-in roles.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_logs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor_user_id", sa.Integer(), nullable=True),
        sa.Column("actor_name", sa.String(length=64), nullable=False),
        sa.Column("via", sa.String(length=16), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=True),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("resource_type", sa.String(length=64), nullable=False),
        sa.Column("resource_id", sa.String(length=64), nullable=False),
        sa.Column("changes", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("ip", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_logs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_logs_action"), ["action"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_logs_actor_user_id"), ["actor_user_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_logs_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_logs_resource_id"), ["resource_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_logs_resource_type"), ["resource_type"], unique=False)

    op.create_table(
        "roles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("bio", sa.String(length=1024), nullable=False),
        sa.Column("permissions", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("builtin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "scheduler_clusters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("bio", sa.String(length=1024), nullable=False),
        sa.Column("scheduling", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("scopes", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("is_default", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("scheduler_clusters", schema=None) as batch_op:
        batch_op.create_index(
            "uq_scheduler_clusters_default",
            ["is_default"],
            unique=True,
            sqlite_where=sa.text("is_default"),
            postgresql_where=sa.text("is_default"),
        )

    op.create_table(
        "seed_peer_clusters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("bio", sa.String(length=1024), nullable=False),
        sa.Column("config", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("bio", sa.String(length=1024), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "dynamic_configs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("bio", sa.String(length=1024), nullable=False),
        sa.Column("target", sa.String(length=32), nullable=False),
        sa.Column("scheduler_cluster_id", sa.Integer(), nullable=True),
        sa.Column("value", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["scheduler_cluster_id"], ["scheduler_clusters.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("dynamic_configs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_dynamic_configs_scheduler_cluster_id"), ["scheduler_cluster_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_dynamic_configs_target"), ["target"], unique=False)

    op.create_table(
        "hosts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("host_id", sa.String(length=255), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("ip", sa.String(length=64), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("download_port", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("idc", sa.String(length=1024), nullable=False),
        sa.Column("location", sa.String(length=1024), nullable=False),
        sa.Column("os", sa.String(length=64), nullable=False),
        sa.Column("platform", sa.String(length=64), nullable=False),
        sa.Column("arch", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=True),
        sa.Column("scheduler_cluster_id", sa.Integer(), nullable=True),
        sa.Column("last_keepalive_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["scheduler_cluster_id"], ["scheduler_clusters.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("host_id"),
    )
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_hosts_hostname"), ["hostname"], unique=False)
        batch_op.create_index(batch_op.f("ix_hosts_ip"), ["ip"], unique=False)
        batch_op.create_index(batch_op.f("ix_hosts_scheduler_cluster_id"), ["scheduler_cluster_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_hosts_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_hosts_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "schedulers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("ip", sa.String(length=64), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("idc", sa.String(length=1024), nullable=False),
        sa.Column("location", sa.String(length=1024), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("features", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("scheduler_cluster_id", sa.Integer(), nullable=False),
        sa.Column("last_keepalive_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["scheduler_cluster_id"],
            ["scheduler_clusters.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("hostname", "ip", "scheduler_cluster_id"),
    )
    with op.batch_alter_table("schedulers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_schedulers_hostname"), ["hostname"], unique=False)
        batch_op.create_index(batch_op.f("ix_schedulers_scheduler_cluster_id"), ["scheduler_cluster_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_schedulers_state"), ["state"], unique=False)

    op.create_table(
        "seed_peer_cluster_scheduler_clusters",
        sa.Column("seed_peer_cluster_id", sa.Integer(), nullable=False),
        sa.Column("scheduler_cluster_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["scheduler_cluster_id"], ["scheduler_clusters.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["seed_peer_cluster_id"], ["seed_peer_clusters.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("seed_peer_cluster_id", "scheduler_cluster_id"),
    )
    with op.batch_alter_table("seed_peer_cluster_scheduler_clusters", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_seed_peer_cluster_scheduler_clusters_scheduler_cluster_id"), ["scheduler_cluster_id"], unique=False
        )

    op.create_table(
        "seed_peers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("ip", sa.String(length=64), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("download_port", sa.Integer(), nullable=False),
        sa.Column("idc", sa.String(length=1024), nullable=False),
        sa.Column("location", sa.String(length=1024), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("seed_peer_cluster_id", sa.Integer(), nullable=False),
        sa.Column("last_keepalive_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["seed_peer_cluster_id"],
            ["seed_peer_clusters.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("hostname", "ip", "seed_peer_cluster_id"),
    )
    with op.batch_alter_table("seed_peers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_seed_peers_hostname"), ["hostname"], unique=False)
        batch_op.create_index(batch_op.f("ix_seed_peers_seed_peer_cluster_id"), ["seed_peer_cluster_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_seed_peers_state"), ["state"], unique=False)

    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("email", sa.String(length=255), nullable=True),
        sa.Column("bio", sa.String(length=1024), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("role_id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=True),
        sa.Column("last_sign_in_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["role_id"],
            ["roles.id"],
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("email"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_users_role_id"), ["role_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_users_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "applications",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("url", sa.String(length=1024), nullable=False),
        sa.Column("bio", sa.String(length=1024), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("tenant_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
        ),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("applications", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_applications_tenant_id"), ["tenant_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_applications_user_id"), ["user_id"], unique=False)

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("bio", sa.String(length=1024), nullable=False),
        sa.Column("args", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("result", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("error", sa.String(length=1024), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("tenant_id", sa.Integer(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
        ),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_tenant_id"), ["tenant_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_type"), ["type"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_user_id"), ["user_id"], unique=False)

    op.create_table(
        "personal_access_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("bio", sa.String(length=1024), nullable=False),
        sa.Column("prefix", sa.String(length=32), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("scopes", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    with op.batch_alter_table("personal_access_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_personal_access_tokens_user_id"), ["user_id"], unique=False)

    op.create_table(
        "user_sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("ip", sa.String(length=64), nullable=False),
        sa.Column("user_agent", sa.String(length=1024), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    with op.batch_alter_table("user_sessions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_user_sessions_user_id"), ["user_id"], unique=False)

    op.create_table(
        "job_scheduler_clusters",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("scheduler_cluster_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["scheduler_cluster_id"], ["scheduler_clusters.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "scheduler_cluster_id"),
    )
    with op.batch_alter_table("job_scheduler_clusters", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_job_scheduler_clusters_scheduler_cluster_id"), ["scheduler_cluster_id"], unique=False
        )

    # The built-in roles as they were at this revision (later revisions change them with their own rows).
    now = dt.datetime.now(dt.UTC)
    roles = sa.table(
        "roles",
        sa.column("name", sa.String),
        sa.column("bio", sa.String),
        sa.column("permissions", sa.JSON),
        sa.column("builtin", sa.Boolean),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("updated_at", sa.DateTime(timezone=True)),
    )
    builtin = [
        ("root", "everything", ["*"]),
        (
            "operator",
            "manages clusters, jobs, dynamic configs and applications; reads tenants and the audit log",
            ["cluster", "job", "config", "application", "tenant:read", "audit:read", "token"],
        ),
        (
            "guest",
            "reads clusters, jobs, configs, applications and tenants",
            ["cluster:read", "job:read", "config:read", "application:read", "tenant:read", "token"],
        ),
        (
            "tenant-admin",
            "manages the users, applications and jobs of its own tenant",
            ["cluster:read", "job", "application", "tenant:read", "user", "audit:read", "token"],
        ),
    ]
    created = now.replace(tzinfo=None) if op.get_context().dialect.name == "sqlite" else now
    op.bulk_insert(
        roles,
        [
            {"name": n, "bio": b, "permissions": p, "builtin": True, "created_at": created, "updated_at": created}
            for n, b, p in builtin
        ],
    )


def downgrade() -> None:
    with op.batch_alter_table("job_scheduler_clusters", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_scheduler_clusters_scheduler_cluster_id"))

    op.drop_table("job_scheduler_clusters")
    with op.batch_alter_table("user_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_user_sessions_user_id"))

    op.drop_table("user_sessions")
    with op.batch_alter_table("personal_access_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_personal_access_tokens_user_id"))

    op.drop_table("personal_access_tokens")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_user_id"))
        batch_op.drop_index(batch_op.f("ix_jobs_type"))
        batch_op.drop_index(batch_op.f("ix_jobs_tenant_id"))
        batch_op.drop_index(batch_op.f("ix_jobs_state"))

    op.drop_table("jobs")
    with op.batch_alter_table("applications", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_applications_user_id"))
        batch_op.drop_index(batch_op.f("ix_applications_tenant_id"))

    op.drop_table("applications")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_users_tenant_id"))
        batch_op.drop_index(batch_op.f("ix_users_role_id"))

    op.drop_table("users")
    with op.batch_alter_table("seed_peers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_seed_peers_state"))
        batch_op.drop_index(batch_op.f("ix_seed_peers_seed_peer_cluster_id"))
        batch_op.drop_index(batch_op.f("ix_seed_peers_hostname"))

    op.drop_table("seed_peers")
    with op.batch_alter_table("seed_peer_cluster_scheduler_clusters", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_seed_peer_cluster_scheduler_clusters_scheduler_cluster_id"))

    op.drop_table("seed_peer_cluster_scheduler_clusters")
    with op.batch_alter_table("schedulers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_schedulers_state"))
        batch_op.drop_index(batch_op.f("ix_schedulers_scheduler_cluster_id"))
        batch_op.drop_index(batch_op.f("ix_schedulers_hostname"))

    op.drop_table("schedulers")
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_hosts_tenant_id"))
        batch_op.drop_index(batch_op.f("ix_hosts_state"))
        batch_op.drop_index(batch_op.f("ix_hosts_scheduler_cluster_id"))
        batch_op.drop_index(batch_op.f("ix_hosts_ip"))
        batch_op.drop_index(batch_op.f("ix_hosts_hostname"))

    op.drop_table("hosts")
    with op.batch_alter_table("dynamic_configs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dynamic_configs_target"))
        batch_op.drop_index(batch_op.f("ix_dynamic_configs_scheduler_cluster_id"))

    op.drop_table("dynamic_configs")
    op.drop_table("tenants")
    op.drop_table("seed_peer_clusters")
    with op.batch_alter_table("scheduler_clusters", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_scheduler_clusters_default", sqlite_where=sa.text("is_default"), postgresql_where=sa.text("is_default")
        )

    op.drop_table("scheduler_clusters")
    op.drop_table("roles")
    with op.batch_alter_table("audit_logs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_logs_resource_type"))
        batch_op.drop_index(batch_op.f("ix_audit_logs_resource_id"))
        batch_op.drop_index(batch_op.f("ix_audit_logs_at"))
        batch_op.drop_index(batch_op.f("ix_audit_logs_actor_user_id"))
        batch_op.drop_index(batch_op.f("ix_audit_logs_action"))

    op.drop_table("audit_logs")
