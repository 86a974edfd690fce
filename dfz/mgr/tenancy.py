"""Which tenant a daemon is in: its daemon token, checked against the database, and the tenant string the rest
of the system compares (task ids, the scheduler, piece servers: ``protocol.md`` §17.10).

Synchronous (the fabric runs these in worker threads), like ``registry.py``.

* :func:`check_token` finds a daemon token by the SHA-256 of its secret and says whether it may be used: not
  revoked, not expired, its tenant enabled. Its ``last_used_at`` is written at most every
  :data:`TOUCH_INTERVAL` (a thousand daemons refreshing tickets must not each write a row every time).
* :func:`recheck` does the same by the token's row id, for a ticket refresh (the manager keeps no secret).
* :func:`tenant_string` is what a tenant is called on the wire: its row id in decimal. Ids never change (a
  rename keeps a tenant's tasks, its daemons' tickets and its caches), and two tenants never share one.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlmodel import col, select

from .db import Database
from .models import DaemonToken, Tenant, utcnow
from .security import secret_digest

TOUCH_INTERVAL = dt.timedelta(seconds=60)


class TokenRefused(Exception):
    """The daemon token cannot be used (unknown, revoked, expired, or its tenant is disabled or gone). The
    reason names the token by its prefix only, never by its secret."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Grant:
    """What a valid daemon token gives: its tenant."""

    token_id: int
    prefix: str
    tenant_id: int
    tenant_name: str

    @property
    def tenant(self) -> str:
        return tenant_string(self.tenant_id)


def tenant_string(tenant_id: int) -> str:
    return str(tenant_id)


def check_token(db: Database, secret: str) -> Grant:
    """The grant of the daemon token whose secret is ``secret``; :class:`TokenRefused` otherwise."""
    return _check(db, DaemonToken.token_hash == secret_digest(secret), "unknown daemon token")


def recheck(db: Database, token_id: int) -> Grant:
    """The grant of the daemon token ``token_id`` now (it may have been revoked since); :class:`TokenRefused`."""
    return _check(db, col(DaemonToken.id) == token_id, f"daemon token {token_id} was deleted")


def _check(db: Database, where: object, unknown: str) -> Grant:
    now = utcnow()
    with db.reading() as session:
        found = session.exec(
            select(DaemonToken, Tenant).join(Tenant, col(Tenant.id) == DaemonToken.tenant_id).where(where)  # type: ignore[arg-type]
        ).first()
        if found is None:
            raise TokenRefused(unknown)
        token, tenant = found
        if token.revoked_at is not None:
            raise TokenRefused(f"daemon token {token.prefix}… was revoked")
        if token.expires_at <= now:
            raise TokenRefused(f"daemon token {token.prefix}… expired at {token.expires_at.isoformat()}")
        if tenant.state != "enabled":
            raise TokenRefused(f"tenant {tenant.name!r} of daemon token {token.prefix}… is {tenant.state}")
        assert token.id is not None and tenant.id is not None
        grant = Grant(token.id, token.prefix, tenant.id, tenant.name)
        stale = token.last_used_at is None or now - token.last_used_at >= TOUCH_INTERVAL
    if stale:
        with db.writing() as session:
            fresh = session.get(DaemonToken, grant.token_id)
            if fresh is not None:
                fresh.last_used_at = now
    return grant
