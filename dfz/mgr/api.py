"""The manager's HTTP API (FastAPI): ``/api/v1/...`` over every resource, sign-in sessions, personal access
tokens, and the OpenAPI document at ``/api/v1/openapi.json`` (browsable at ``/api/v1/docs``).

Endpoints are plain functions: FastAPI runs them in worker threads (under trio, through anyio), where
they use the synchronous SQLAlchemy sessions of :class:`~dfz.mgr.db.Database`. SQLAlchemy's asyncio layer
needs asyncio, so threads are how the database is reached from a trio program.

No ``from __future__ import annotations``: FastAPI reads the annotations at run time.
"""

import datetime as dt
from dataclasses import dataclass
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response, status
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlmodel import col, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from . import audit, console, crud, oapi
from .auth import Principal, client_ip, requires, signed_in, unauthorized
from .db import Database
from .models import DaemonToken, Job, PersonalAccessToken, User, UserSession, utcnow
from .resources import JOBS, RESOURCES, USERS
from .schemas import (
    DAEMON_TOKEN_DAYS,
    DaemonTokenCreate,
    DaemonTokenCreated,
    DaemonTokenFilter,
    DaemonTokenRead,
    DaemonTokenUpdate,
    JobRead,
    MyPermissions,
    Page,
    PasswordChange,
    Problem,
    SignedIn,
    SignIn,
    TaskIdQuery,
    TaskIdRead,
    TokenCreate,
    TokenCreated,
    TokenFilter,
    TokenRead,
    TokenUpdate,
    UserRead,
)
from .security import (
    DAEMON_TOKEN_PREFIX,
    PERMISSION_GROUPS,
    SESSION_COOKIE,
    TOKEN_PREFIX,
    covers,
    hash_password,
    new_secret,
    secret_digest,
    verify_password,
)

API_PREFIX = "/api/v1"
_UNKNOWN_USER_HASH = hash_password(new_secret(""))
DEFAULT_TOKEN_DAYS = 30


@dataclass(frozen=True)
class ApiSettings:
    session_ttl: float = 12 * 3600.0
    """Seconds a sign-in lasts."""
    cookie_secure: bool = False
    """Send the session cookie over HTTPS only (set it when the manager is behind TLS)."""
    max_body: int = 1024 * 1024
    """Largest request body accepted, in bytes (413 beyond)."""


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await self._too_large(send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, f"the request body is over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)

    async def _too_large(self, send: Send) -> None:
        response = JSONResponse({"detail": f"the request body is over {self.limit} bytes"}, 413)
        await response({"type": "http"}, _nothing, send)


async def _nothing() -> Message:
    return {"type": "http.disconnect"}


def create_app(db: Database, settings: ApiSettings | None = None, *, swarm_source: console.SwarmSource | None = None) -> FastAPI:
    """The ASGI application over ``db`` (already migrated). ``swarm_source`` feeds the console's live swarm
    view (``swarm.py``); without one the websocket says there is none."""
    settings = settings or ApiSettings()
    app = FastAPI(
        title="dfz manager",
        version=__version__,
        description="Clusters, schedulers, seed peers, hosts, tenants, users, roles, tokens, jobs, dynamic configs "
        "and the audit log of a dfz deployment. Programs authenticate with `Authorization: Bearer <personal access "
        "token>`; people sign in (`POST /api/v1/sessions`) and get a session cookie.",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=None,
    )
    app.state.db = db
    app.state.settings = settings
    app.state.swarm_source = swarm_source

    @app.exception_handler(OperationalError)
    async def _database_down(request: Request, exc: OperationalError) -> JSONResponse:
        return JSONResponse({"detail": "the database is unavailable; try again"}, status.HTTP_503_SERVICE_UNAVAILABLE)

    @app.get("/healthy", tags=["health"], summary="Liveness (no authentication)")
    def healthy() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    v1 = APIRouter(prefix=API_PREFIX)
    v1.include_router(_sessions(settings))
    v1.include_router(_me())
    v1.include_router(_tokens())
    v1.include_router(_daemon_tokens())
    for spec in RESOURCES:
        v1.include_router(crud.router(spec))
    v1.include_router(_job_actions())
    v1.include_router(_task_ids())
    app.include_router(v1)
    app.include_router(oapi.router())
    console.install(app)
    app.add_middleware(BodyLimit, limit=settings.max_body)
    return app


# --- sessions ----------------------------------------------------------------------------------------------


def _sessions(settings: ApiSettings) -> APIRouter:
    api = APIRouter(prefix="/sessions", tags=["sessions"])

    @api.post(
        "",
        status_code=status.HTTP_201_CREATED,
        response_model=SignedIn,
        summary="Sign in: sets the session cookie",
        responses={401: {"model": Problem}},
    )
    def sign_in(request: Request, response: Response, body: SignIn) -> SignedIn:
        db = crud.database(request)
        ip = client_ip(request)
        with db.reading() as session:
            user = session.exec(select(User).where(User.name == body.name)).first()
            # An unknown name costs the same scrypt as a known one: timing does not tell which names exist.
            stored = user.password_hash if user is not None else _UNKNOWN_USER_HASH
            valid = verify_password(body.password, stored) and user is not None and user.state == "enabled"
        if not valid or user is None:
            with db.writing() as session:
                actor = audit.Actor(user_id=None if user is None else user.id, name=body.name, via="session", ip=ip)
                audit.record(session, actor, "sign_in_failed", "session", "", {"name": body.name})
            raise unauthorized("wrong name or password, or the user is disabled")
        secret = new_secret("dfzs_")
        expires = utcnow() + dt.timedelta(seconds=settings.session_ttl)
        with db.writing() as session:
            row = UserSession(
                token_hash=secret_digest(secret),
                user_id=user.id,  # type: ignore[arg-type]
                ip=ip,
                user_agent=request.headers.get("user-agent", "")[:1024],
                expires_at=expires,
            )
            session.add(row)
            fresh = session.get(User, user.id)
            assert fresh is not None
            fresh.last_sign_in_at = utcnow()
            session.flush()
            actor = audit.Actor(user_id=user.id, name=user.name, via="session", ip=ip)
            audit.record(session, actor, "sign_in", "session", row.id, {"expires_at": expires})
            shown = UserRead.model_validate(fresh)
        response.set_cookie(
            SESSION_COOKIE,
            secret,
            max_age=int(settings.session_ttl),
            httponly=True,
            samesite="strict",
            secure=settings.cookie_secure,
            path="/",
        )
        return SignedIn(user=shown, expires_at=expires)

    @api.delete("/current", status_code=status.HTTP_204_NO_CONTENT, response_class=Response, summary="Sign out")
    def sign_out(request: Request, principal: Annotated[Principal, Depends(signed_in)]) -> Response:
        cookie = request.cookies.get(SESSION_COOKIE)
        if principal.via != "session" or not cookie:
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST,
                "not signed in with a session (a token is revoked with DELETE /api/v1/personal-access-tokens/{id})",
            )
        with crud.database(request).writing() as session:
            row = session.exec(select(UserSession).where(UserSession.token_hash == secret_digest(cookie))).first()
            if row is not None:
                row.revoked_at = utcnow()
                audit.record(session, principal.actor, "sign_out", "session", row.id)
        response = Response(status_code=status.HTTP_204_NO_CONTENT)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=settings.cookie_secure)
        return response

    return api


# --- oneself -----------------------------------------------------------------------------------------------


def _me() -> APIRouter:
    api = APIRouter(prefix="/users/me", tags=["users"])

    @api.get("", response_model=UserRead, summary="The signed-in user (or the token's)", responses=crud.ERRORS)
    def me(request: Request, principal: Annotated[Principal, Depends(signed_in)]) -> Any:
        with crud.database(request).reading() as session:
            return crud.to_read(session, USERS, [crud.get_or_404(session, USERS, principal.user_id)])[0]

    @api.get(
        "/permissions",
        response_model=MyPermissions,
        summary="What the signed-in user (or the token) may do",
        responses=crud.ERRORS,
    )
    def my_permissions(principal: Annotated[Principal, Depends(signed_in)]) -> MyPermissions:
        return MyPermissions(
            user_id=principal.user_id,
            name=principal.name,
            role=principal.role,
            permissions=list(principal.permissions),
            scopes=None if principal.scopes is None else list(principal.scopes),
            tenant_id=principal.tenant_id,
            confined=principal.confined,
            via=principal.via,
            groups=PERMISSION_GROUPS,
        )

    @api.post(
        "/password",
        status_code=status.HTTP_204_NO_CONTENT,
        response_class=Response,
        summary="Change one's own password (signed in with a session)",
        responses={**crud.ERRORS, 400: {"model": Problem}},
    )
    def change_password(request: Request, body: PasswordChange, principal: Annotated[Principal, Depends(signed_in)]) -> Response:
        if principal.via != "session":
            raise HTTPException(status.HTTP_403_FORBIDDEN, "a password is changed by its person, signed in, not through a token")
        with crud.database(request).writing() as session:
            user = session.get(User, principal.user_id)
            assert user is not None
            if not verify_password(body.current_password, user.password_hash):
                raise HTTPException(status.HTTP_400_BAD_REQUEST, "current_password is wrong")
            user.password_hash = hash_password(body.new_password)
            user.updated_at = utcnow()
            audit.record(session, principal.actor, "update", "user", user.id, {"password": {"from": "***", "to": "***"}})
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    return api


# --- task ids ------------------------------------------------------------------------------------------------


def _task_ids() -> APIRouter:
    api = APIRouter(prefix="/task-id", tags=["jobs"])

    @api.get(
        "",
        response_model=TaskIdRead,
        summary="The task id of a URL",
        description="Computed as a daemon computes it (`dfz/tasks.py`, `protocol.md` §13): the URL with the "
        "filtered query parameters left out, the tag, the application and a fixed piece length, as a "
        "`get_task` or `delete_task` job computes it from the same arguments.",
        responses={**crud.ERRORS, 422: {"model": Problem}},
    )
    def task_id_of(query: Annotated[TaskIdQuery, Query()], principal: Annotated[Principal, Depends(signed_in)]) -> TaskIdRead:
        return TaskIdRead(task_id=query.args().the_task_id(), url=str(query.url))

    return api


# --- jobs: cancel ---------------------------------------------------------------------------------------------

CANCELLABLE = ("pending", "running")


def _job_actions() -> APIRouter:
    api = APIRouter(prefix="/jobs", tags=["jobs"])
    writer = requires("job", "write")

    @api.post(
        "/{row_id}/cancel",
        response_model=JobRead,
        summary="Cancel a job",
        description="A pending job is cancelled at once. A running job is cancelled in the database at once and its "
        "runner stops its tasks within a poll (`job_poll`); its result then says which tasks had finished (work "
        "already handed to peers may still finish there). A job that ended (succeeded, failed, cancelled) "
        "answers 409. The job keeps its row: `DELETE /api/v1/jobs/{id}` removes it.",
        responses={**crud.ERRORS, 404: {"model": Problem}, 409: {"model": Problem}},
    )
    def cancel_job(request: Request, row_id: crud.RowId, principal: Annotated[Principal, Depends(writer)]) -> Any:
        with crud.database(request).writing() as session:
            row = crud.get_or_404(session, JOBS, row_id, principal)
            before = row.state
            now = utcnow()
            # Conditional: a runner that finishes the job at this moment, or another manager, wins or loses whole.
            done = session.execute(
                sa.update(Job)
                .where(col(Job.id) == row_id, col(Job.state).in_(CANCELLABLE))
                .values(state="cancelled", error=f"cancelled by {principal.name}"[:1024], finished_at=now, updated_at=now)
            )
            if done.rowcount != 1:  # type: ignore[attr-defined]
                session.refresh(row)
                raise HTTPException(
                    status.HTTP_409_CONFLICT, f"job {row_id} is {row.state}: only a pending or running job can be cancelled"
                )
            audit.record(session, principal.actor, "cancel", JOBS.kind, row_id, {"state": {"from": before, "to": "cancelled"}})
            session.refresh(row)
            return crud.to_read(session, JOBS, [row])[0]

    return api


# --- personal access tokens ------------------------------------------------------------------------------------


def _token_present(values: dict[str, Any]) -> dict[str, Any]:
    if values["revoked_at"] is not None:
        state = "revoked"
    elif values["expires_at"] <= utcnow():
        state = "expired"
    else:
        state = "active"
    return {**values, "state": state}


def _token_state(value: str, table: Any = PersonalAccessToken) -> Any:
    now = utcnow()
    revoked = col(table.revoked_at)
    if value == "revoked":
        return revoked.is_not(None)
    if value == "expired":
        return revoked.is_(None) & (col(table.expires_at) <= now)
    return revoked.is_(None) & (col(table.expires_at) > now)


TOKENS = crud.Resource(
    path="personal-access-tokens",
    kind="personal_access_token",
    title="personal access token",
    table=PersonalAccessToken,
    group="token",
    read=TokenRead,
    filter=TokenFilter,
    present=_token_present,
    filters={"state": _token_state},
    # A confined principal: its own tokens, and (with user:read) those of its tenant's users.
    confine=lambda principal: (
        (col(PersonalAccessToken.user_id) == principal.user_id)
        | col(PersonalAccessToken.user_id).in_(select(User.id).where(User.tenant_id == principal.tenant))
    ),
)


def _token_of(session: Any, principal: Principal, token_id: int, action: str) -> PersonalAccessToken:
    token: PersonalAccessToken = crud.get_or_404(session, TOKENS, token_id, principal)
    if token.user_id != principal.user_id and not principal.may("user", "write" if action == "write" else "read"):
        # Other users' tokens are theirs: say "not found" rather than confirm they exist.
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no personal access token with id {token_id}")
    return token


def _tokens() -> APIRouter:
    api = APIRouter(prefix="/personal-access-tokens", tags=["personal-access-tokens"])
    crud.TITLES[str(PersonalAccessToken.__tablename__)] = TOKENS.title
    reader = requires("token", "read")
    writer = requires("token", "write")

    @api.get(
        "",
        response_model=Page[TokenRead],
        summary="List tokens (one's own; user_id=N needs user:read)",
        responses=crud.ERRORS,
    )
    def list_tokens(
        request: Request, query: Annotated[TokenFilter, Query()], principal: Annotated[Principal, Depends(reader)]
    ) -> Any:
        if query.user_id is None:
            query = query.model_copy(update={"user_id": principal.user_id})
        elif query.user_id != principal.user_id and not principal.may("user", "read"):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "listing another user's tokens needs user:read")
        with crud.database(request).reading() as session:
            return crud.list_page(session, TOKENS, query, principal)

    @api.post(
        "",
        status_code=status.HTTP_201_CREATED,
        response_model=TokenCreated,
        summary="Create a token for oneself; the secret is in the answer, once",
        responses=crud.ERRORS,
    )
    def create_token(request: Request, body: TokenCreate, principal: Annotated[Principal, Depends(writer)]) -> Any:
        for scope in body.scopes:
            if not covers(principal.permissions, scope) or (principal.scopes is not None and not covers(principal.scopes, scope)):
                raise HTTPException(status.HTTP_403_FORBIDDEN, f"scope {scope!r} is beyond what you may do yourself")
        secret = new_secret(TOKEN_PREFIX)
        expires = body.expires_at or utcnow() + dt.timedelta(days=DEFAULT_TOKEN_DAYS)
        with crud.database(request).writing() as session:
            row = PersonalAccessToken(
                name=body.name,
                bio=body.bio,
                prefix=secret[: len(TOKEN_PREFIX) + 6],
                token_hash=secret_digest(secret),
                scopes=list(body.scopes),
                user_id=principal.user_id,
                expires_at=expires,
            )
            session.add(row)
            session.flush()
            shown = crud.to_read(session, TOKENS, [row])[0]
            audit.record(session, principal.actor, "create", TOKENS.kind, row.id, shown.model_dump())
        return TokenCreated(**shown.model_dump(), token=secret)

    @api.get("/{row_id}", response_model=TokenRead, summary="Get a token", responses={**crud.ERRORS, 404: {"model": Problem}})
    def get_token(request: Request, row_id: crud.RowId, principal: Annotated[Principal, Depends(reader)]) -> Any:
        with crud.database(request).reading() as session:
            return crud.to_read(session, TOKENS, [_token_of(session, principal, row_id, "read")])[0]

    @api.patch(
        "/{row_id}", response_model=TokenRead, summary="Rename a token", responses={**crud.ERRORS, 404: {"model": Problem}}
    )
    def update_token(
        request: Request, row_id: crud.RowId, body: TokenUpdate, principal: Annotated[Principal, Depends(writer)]
    ) -> Any:
        with crud.database(request).writing() as session:
            _token_of(session, principal, row_id, "write")
            return crud.update(session, TOKENS, principal, row_id, body)

    @api.delete(
        "/{row_id}",
        status_code=status.HTTP_204_NO_CONTENT,
        response_class=Response,
        summary="Revoke a token (it stays listed, as revoked)",
        responses={**crud.ERRORS, 404: {"model": Problem}},
    )
    def revoke_token(request: Request, row_id: crud.RowId, principal: Annotated[Principal, Depends(writer)]) -> Response:
        with crud.database(request).writing() as session:
            token = _token_of(session, principal, row_id, "write")
            if token.revoked_at is None:
                token.revoked_at = token.updated_at = utcnow()
                session.add(token)
                audit.record(session, principal.actor, "revoke", TOKENS.kind, row_id, {"prefix": token.prefix})
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    return api


# --- daemon tokens -----------------------------------------------------------------------------------------

DAEMON_TOKENS = crud.Resource(
    path="daemon-tokens",
    kind="daemon_token",
    title="daemon token",
    table=DaemonToken,
    group="daemon",
    read=DaemonTokenRead,
    filter=DaemonTokenFilter,
    present=_token_present,
    filters={"state": lambda value: _token_state(value, DaemonToken)},
    tenant_field="tenant_id",
)


def _daemon_tokens() -> APIRouter:
    """Daemon tokens: a daemon (``dfz daemon --tenant-token``) or seed peer configured with one is in its tenant
    (the manager checks it at every registration and ticket refresh, ``protocol.md`` §17.10). Root and
    operators make them for any tenant, a tenant admin for its own; the secret is in the creation's answer
    only; revoking one keeps it listed (as revoked) and stops the daemons that use it."""
    api = APIRouter(prefix=f"/{DAEMON_TOKENS.path}", tags=[DAEMON_TOKENS.path])
    crud.TITLES[str(DaemonToken.__tablename__)] = DAEMON_TOKENS.title
    reader = requires("daemon", "read")
    writer = requires("daemon", "write")

    @api.get(
        "",
        response_model=Page[DaemonTokenRead],
        summary="List daemon tokens (a tenant admin: its tenant's)",
        responses=crud.ERRORS,
    )
    def list_daemon_tokens(
        request: Request, query: Annotated[DaemonTokenFilter, Query()], principal: Annotated[Principal, Depends(reader)]
    ) -> Any:
        with crud.database(request).reading() as session:
            return crud.list_page(session, DAEMON_TOKENS, query, principal)

    @api.post(
        "",
        status_code=status.HTTP_201_CREATED,
        response_model=DaemonTokenCreated,
        summary="Create a daemon token for a tenant; the secret is in the answer, once",
        responses={**crud.ERRORS, 422: {"model": Problem}},
    )
    def create_daemon_token(request: Request, body: DaemonTokenCreate, principal: Annotated[Principal, Depends(writer)]) -> Any:
        tenant_id = body.tenant_id
        if principal.confined:
            if principal.tenant_id is None:
                raise HTTPException(status.HTTP_403_FORBIDDEN, f"role {principal.role!r} without a tenant makes no daemon token")
            if tenant_id is not None and tenant_id != principal.tenant_id:
                raise HTTPException(
                    status.HTTP_403_FORBIDDEN, f"tenant_id: you are confined to tenant {principal.tenant_id}, not {tenant_id}"
                )
            tenant_id = principal.tenant_id
        elif tenant_id is None:
            raise HTTPException(422, "tenant_id: name the tenant whose daemons will use the token")
        secret = new_secret(DAEMON_TOKEN_PREFIX)
        expires = body.expires_at or utcnow() + dt.timedelta(days=DAEMON_TOKEN_DAYS)
        with crud.database(request).writing() as session:
            crud.check_references(session, DaemonToken, {"tenant_id": tenant_id})
            row = DaemonToken(
                name=body.name,
                bio=body.bio,
                prefix=secret[: len(DAEMON_TOKEN_PREFIX) + 6],
                token_hash=secret_digest(secret),
                tenant_id=tenant_id,
                user_id=principal.user_id,
                expires_at=expires,
            )
            session.add(row)
            session.flush()
            shown = crud.to_read(session, DAEMON_TOKENS, [row])[0]
            audit.record(session, principal.actor, "create", DAEMON_TOKENS.kind, row.id, shown.model_dump())
        return DaemonTokenCreated(**shown.model_dump(), token=secret)

    @api.get(
        "/{row_id}",
        response_model=DaemonTokenRead,
        summary="Get a daemon token",
        responses={**crud.ERRORS, 404: {"model": Problem}},
    )
    def get_daemon_token(request: Request, row_id: crud.RowId, principal: Annotated[Principal, Depends(reader)]) -> Any:
        with crud.database(request).reading() as session:
            return crud.to_read(session, DAEMON_TOKENS, [crud.get_or_404(session, DAEMON_TOKENS, row_id, principal)])[0]

    @api.patch(
        "/{row_id}",
        response_model=DaemonTokenRead,
        summary="Rename a daemon token",
        responses={**crud.ERRORS, 404: {"model": Problem}},
    )
    def update_daemon_token(
        request: Request, row_id: crud.RowId, body: DaemonTokenUpdate, principal: Annotated[Principal, Depends(writer)]
    ) -> Any:
        with crud.database(request).writing() as session:
            return crud.update(session, DAEMON_TOKENS, principal, row_id, body)

    @api.delete(
        "/{row_id}",
        status_code=status.HTTP_204_NO_CONTENT,
        response_class=Response,
        summary="Revoke a daemon token (it stays listed, as revoked; its daemons stop at their next ticket refresh)",
        responses={**crud.ERRORS, 404: {"model": Problem}},
    )
    def revoke_daemon_token(request: Request, row_id: crud.RowId, principal: Annotated[Principal, Depends(writer)]) -> Response:
        with crud.database(request).writing() as session:
            token: DaemonToken = crud.get_or_404(session, DAEMON_TOKENS, row_id, principal)
            if token.revoked_at is None:
                token.revoked_at = token.updated_at = utcnow()
                session.add(token)
                audit.record(session, principal.actor, "revoke", DAEMON_TOKENS.kind, row_id, {"prefix": token.prefix})
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    return api
