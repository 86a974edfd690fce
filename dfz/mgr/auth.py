"""Who is asking, and may they: personal access tokens (``Authorization: Bearer dfz_...``) for programs,
sign-in sessions (the ``dfz_session`` cookie) for people.

A request is authenticated once, by :func:`authenticate`, into a :class:`Principal`; endpoints declare
what they need with ``Depends(requires(group, action))``. Failures: 401 (no credentials, or an unknown,
expired or revoked token or session, or a disabled user) with ``WWW-Authenticate: Bearer``; 403 (the role
or the token's scopes do not allow it, saying which permission is missing).

Tenants: a principal of a tenant (and any tenant admin) is :attr:`Principal.confined`: the rows that carry a
tenant (hosts, applications, jobs, users, and through them tokens and audit entries) are, for it, only its
own tenant's: others' are not listed and answer 404, and what it makes or changes stays in its tenant
(``crud.py``). Roles are global: a confined principal reads them but changes none.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import HTTPException, Request, status
from sqlmodel import col, select
from starlette.requests import HTTPConnection

from .audit import Actor
from .db import Database
from .models import PersonalAccessToken, Role, User, UserSession, utcnow
from .security import PERMISSION_GROUPS, SESSION_COOKIE, Action, allows, secret_digest

TENANT_ADMIN = "tenant-admin"
"""The built-in role of a tenant's administrator: always confined (see :attr:`Principal.confined`)."""
TOKEN_TOUCH_INTERVAL = dt.timedelta(seconds=60)
"""``last_used_at`` of a token is written at most this often (a read must not become a write each time)."""


@dataclass(frozen=True)
class Principal:
    """An authenticated user, with the role's permissions and, through a token, the token's scopes."""

    user_id: int
    name: str
    role: str
    permissions: tuple[str, ...]
    tenant_id: int | None
    via: str
    """``session`` or ``token``."""
    token_id: int | None = None
    scopes: tuple[str, ...] | None = None
    ip: str = ""

    @property
    def confined(self) -> bool:
        """Whether this principal sees and changes only its tenant's rows: a user of a tenant (whatever the
        role), and a tenant admin always (one without a tenant sees no tenant's rows at all)."""
        return self.tenant_id is not None or self.role == TENANT_ADMIN

    @property
    def tenant(self) -> int:
        """The tenant a :attr:`confined` principal is confined to; 0 (no row has it) for a tenant admin in none."""
        return self.tenant_id or 0

    def may(self, group: str, action: Action) -> bool:
        if not allows(self.permissions, group, action):
            return False
        return self.scopes is None or allows(self.scopes, group, action)

    def missing(self, group: str, action: Action) -> str:
        """Why :meth:`may` said no, for the 403's message."""
        if not allows(self.permissions, group, action):
            return f"role {self.role!r} does not allow {group}:{action}"
        return f"the token's scopes ({', '.join(self.scopes or ())}) do not allow {group}:{action}"

    @property
    def actor(self) -> Actor:
        return Actor(user_id=self.user_id, name=self.name, via=self.via, token_id=self.token_id, ip=self.ip)


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def same_origin(request: HTTPConnection) -> bool:
    """Whether the request's ``Origin`` (browsers send it; other programs mostly do not) is this server's own,
    or absent."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return bool(host) and origin in (f"http://{host}", f"https://{host}")


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


def client_ip(request: HTTPConnection) -> str:
    return request.client.host if request.client is not None else ""


def _principal(user: User, role: Role, via: str, ip: str, token: PersonalAccessToken | None = None) -> Principal:
    if user.state != "enabled":
        raise unauthorized(f"user {user.name!r} is disabled")
    assert user.id is not None
    return Principal(
        user_id=user.id,
        name=user.name,
        role=role.name,
        permissions=tuple(role.permissions),
        tenant_id=user.tenant_id,
        via=via,
        token_id=None if token is None else token.id,
        scopes=None if token is None else tuple(token.scopes),
        ip=ip,
    )


def authenticate(db: Database, request: HTTPConnection) -> Principal:
    """The :class:`Principal` of ``request`` (an HTTP request or a websocket's handshake); 401 when it has no
    valid credentials. A bearer token wins over a session cookie. A request that changes something, made with
    the session cookie and an ``Origin`` header of another site, is refused (403): the cookie is
    ``SameSite=Strict`` already, this is the second lock of the door (cross-site request forgery)."""
    header = request.headers.get("authorization")
    ip = client_ip(request)
    now = utcnow()
    if header is not None:
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise unauthorized("Authorization must be 'Bearer <personal access token>'")
        with db.reading() as session:
            # One query for the token, its user and the user's role: every request through a token makes it.
            found = session.exec(
                select(PersonalAccessToken, User, Role)
                .join(User, col(User.id) == PersonalAccessToken.user_id)
                .join(Role, col(Role.id) == User.role_id)
                .where(PersonalAccessToken.token_hash == secret_digest(secret.strip()))
            ).first()
            if found is None:
                raise unauthorized("unknown token")
            token, user, role = found
            if token.revoked_at is not None:
                raise unauthorized(f"token {token.prefix}… was revoked")
            if token.expires_at <= now:
                raise unauthorized(f"token {token.prefix}… expired at {token.expires_at.isoformat()}")
            principal = _principal(user, role, "token", ip, token)
            stale = token.last_used_at is None or now - token.last_used_at >= TOKEN_TOUCH_INTERVAL
        if stale:
            with db.writing() as session:
                fresh = session.get(PersonalAccessToken, token.id)
                if fresh is not None:
                    fresh.last_used_at = now
        return principal
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        if request.scope["type"] == "http" and request.scope.get("method") not in SAFE_METHODS and not same_origin(request):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "a request with the session cookie must come from this site's pages")
        with db.reading() as session:
            row = session.exec(
                select(UserSession, User, Role)
                .join(User, col(User.id) == UserSession.user_id)
                .join(Role, col(Role.id) == User.role_id)
                .where(UserSession.token_hash == secret_digest(cookie))
            ).first()
            if row is None or row[0].revoked_at is not None or row[0].expires_at <= now:
                raise unauthorized("the session has ended: sign in again (POST /api/v1/sessions)")
            return _principal(row[1], row[2], "session", ip)
    raise unauthorized("sign in (POST /api/v1/sessions) or send 'Authorization: Bearer <personal access token>'")


def requires(group: str, action: Action) -> Callable[[Request], Principal]:
    """A FastAPI dependency: the request's principal, who must be allowed ``action`` on ``group``."""
    assert group in PERMISSION_GROUPS, group

    def dependency(request: Request) -> Principal:
        principal = authenticate(request.app.state.db, request)
        if not principal.may(group, action):
            raise HTTPException(status.HTTP_403_FORBIDDEN, principal.missing(group, action))
        return principal

    dependency.__name__ = f"requires_{group}_{action}"
    return dependency


def signed_in(request: Request) -> Principal:
    """A FastAPI dependency: any authenticated principal (for endpoints about oneself)."""
    return authenticate(request.app.state.db, request)
