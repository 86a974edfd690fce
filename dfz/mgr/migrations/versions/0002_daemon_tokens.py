"""Daemon tokens (a daemon's tenant, proven by a token the manager issues), and the ``daemon`` permission
for the built-in ``operator`` and ``tenant-admin`` roles.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PERMISSION = "daemon"
ROLES = ("operator", "tenant-admin")


def _permissions(value: Any) -> list[str]:
    if isinstance(value, str):
        value = json.loads(value)
    return [str(p) for p in value] if isinstance(value, list) else []


def _change_roles(add: bool) -> None:
    roles = sa.table("roles", sa.column("id", sa.Integer), sa.column("name", sa.String), sa.column("permissions", sa.JSON))
    connection = op.get_bind()
    for row in connection.execute(sa.select(roles.c.id, roles.c.permissions).where(roles.c.name.in_(ROLES))).all():
        permissions = _permissions(row.permissions)
        if add and PERMISSION not in permissions:
            permissions.append(PERMISSION)
        elif not add:
            permissions = [p for p in permissions if p not in (PERMISSION, f"{PERMISSION}:read", f"{PERMISSION}:write")]
        connection.execute(sa.update(roles).where(roles.c.id == row.id).values(permissions=permissions))


def upgrade() -> None:
    op.create_table(
        "daemon_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("bio", sa.String(length=1024), nullable=False),
        sa.Column("prefix", sa.String(length=32), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    with op.batch_alter_table("daemon_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_daemon_tokens_tenant_id"), ["tenant_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_daemon_tokens_user_id"), ["user_id"], unique=False)
    _change_roles(add=True)


def downgrade() -> None:
    _change_roles(add=False)
    with op.batch_alter_table("daemon_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_daemon_tokens_user_id"))
        batch_op.drop_index(batch_op.f("ix_daemon_tokens_tenant_id"))
    op.drop_table("daemon_tokens")
