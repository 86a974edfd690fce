"""The manager's web console: static files served at ``/console/`` from the package (``dfz/mgr/console/``),
with a strict Content-Security-Policy, and the live swarm websocket ``/api/v1/ws/swarm``.

The page is plain JavaScript modules (no build step, nothing fetched from elsewhere at run time). It calls the
REST API of the same origin with the sign-in session: the ``dfz_session`` cookie, ``HttpOnly`` (no script can
read it, an injected one included) and ``SameSite=Strict`` (no other site's page sends it). The API takes
JSON bodies only, and the console's responses forbid framing; see ``protocol.md`` §17.11.

The websocket (``protocol.md`` §17.11): authenticated at the handshake, by the session cookie (a browser sends
it with the upgrade request of its own origin; a handshake whose ``Origin`` is another site's is refused) or
by ``Authorization: Bearer <personal access token>`` (programs). No secret travels in the URL or a message.
The client sends ``{"type": "watch", "task_id": HEX}``; every ``interval`` seconds the manager asks the task's
scheduler for the swarm (``SwarmSource``) and pushes ``{"type": "swarm", ...}``; or ``{"type": "overview"}``,
and the manager pushes every scheduler's totals and rates (``{"type": "cluster", ...}``). A bad message is answered
with ``{"type": "error", ...}`` and the socket stays open.
"""

from __future__ import annotations

import json
import logging
import re
from importlib import resources
from typing import Any, Protocol

import trio
from fastapi import APIRouter, FastAPI, HTTPException, WebSocket, status
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from ..log import event, get_logger
from ..tasks import is_task_id
from .auth import Principal, authenticate, same_origin

log = get_logger("mgr.console")

CONSOLE_PATH = "/console"
WS_SWARM_PATH = "/api/v1/ws/swarm"

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
"""Scripts, styles and connections from the manager only; no inline script or style, no framing."""
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",
}
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")

MAX_WS_MESSAGE = 4096
"""Largest websocket message a client may send (characters); the only one it needs is a few dozen."""
MIN_INTERVAL, MAX_INTERVAL = 0.25, 10.0
"""Bounds of the push interval a client may ask for (seconds)."""
REAUTH_INTERVAL = 30.0
"""Seconds between two checks that an open websocket's credentials still hold (a session signed out or
expired, a token revoked, a user disabled or a role changed ends or refuses the stream)."""
MAX_SOCKETS = 100
"""Swarm websockets open at once in one manager; beyond, a new one is refused (each polls a scheduler)."""


def console_files() -> dict[str, tuple[bytes, str]]:
    """The console's files, by name: their bytes and content type (read once, at start)."""
    found: dict[str, tuple[bytes, str]] = {}
    for item in resources.files("dfz.mgr").joinpath("console").iterdir():
        name = item.name
        suffix = name[name.rfind(".") :] if "." in name else ""
        if item.is_file() and _NAME.match(name) and suffix in _TYPES:
            found[name] = (item.read_bytes(), _TYPES[suffix])
    if "index.html" not in found:
        raise RuntimeError("the console's files are missing from the package (dfz/mgr/console/index.html)")
    return found


def _file(files: dict[str, tuple[bytes, str]], name: str) -> Response:
    got = files.get(name)
    if got is None:
        return Response(b"not found\n", status.HTTP_404_NOT_FOUND, headers=SECURITY_HEADERS, media_type="text/plain")
    return Response(got[0], headers=SECURITY_HEADERS, media_type=got[1])


def router() -> APIRouter:
    """``GET /console/`` (the page) and ``GET /console/{name}`` (its scripts and styles). Public: the files
    hold no data; everything the page shows comes from the authenticated API."""
    api = APIRouter(include_in_schema=False)
    files = console_files()

    @api.get(CONSOLE_PATH)
    def console_root() -> Response:
        return RedirectResponse(f"{CONSOLE_PATH}/", status.HTTP_308_PERMANENT_REDIRECT, headers=SECURITY_HEADERS)

    @api.get(f"{CONSOLE_PATH}/")
    def console_index() -> Response:
        return _file(files, "index.html")

    @api.get(f"{CONSOLE_PATH}/{{name:path}}")
    def console_file(name: str) -> Response:
        return _file(files, name)  # only the package's files, by exact name: anything else (a path, ..) is 404

    return api


# --- the live swarm websocket -----------------------------------------------------------------------------------


class SwarmWatch(Protocol):
    """What one websocket watches (``swarm.py``): it keeps what it needs between snapshots (rates)."""

    async def snapshot(self, task_id: str, principal: Principal) -> dict[str, Any]:
        """The swarm of ``task_id`` as ``principal`` may see it (JSON-able); raises :class:`SwarmUnavailable`
        when it cannot be had now (no scheduler knows the task, or none answers)."""
        ...

    async def overview(self, principal: Principal) -> dict[str, Any]:
        """Every scheduler's totals, rates and most active tasks; :class:`SwarmUnavailable` when the principal
        may not see them."""
        ...


class SwarmSource(Protocol):
    """Where the swarms come from (``swarm.SwarmInspector``)."""

    def watch(self) -> SwarmWatch: ...


class SwarmUnavailable(Exception):
    """The swarm cannot be shown now; the message says why (sent to the client, which keeps watching)."""


class _BadMessage(Exception):
    pass


def _parse(text: str | None) -> dict[str, Any]:
    if text is None:
        raise _BadMessage("send text messages: JSON objects")
    if len(text) > MAX_WS_MESSAGE:
        raise _BadMessage(f"a message is at most {MAX_WS_MESSAGE} characters")
    try:
        msg = json.loads(text)
    except ValueError:
        raise _BadMessage('not JSON: send {"type": "watch", "task_id": "<64 hex digits>"}') from None
    if not isinstance(msg, dict):
        raise _BadMessage("a message is a JSON object")
    kind = msg.get("type")
    if kind in ("watch", "overview"):
        interval = msg.get("interval", 1.0)
        if isinstance(interval, bool) or not isinstance(interval, int | float) or not MIN_INTERVAL <= interval <= MAX_INTERVAL:
            raise _BadMessage(f"interval: seconds from {MIN_INTERVAL} to {MAX_INTERVAL}")
    if kind == "overview":
        return {"type": "overview", "interval": float(interval)}
    if kind == "watch":
        task_id = msg.get("task_id")
        if not isinstance(task_id, str) or not is_task_id(task_id):
            raise _BadMessage("task_id: 64 lowercase hex digits")
        return {"type": "watch", "task_id": task_id, "interval": float(interval)}
    if kind == "stop":
        return {"type": "stop"}
    raise _BadMessage("type: 'watch', 'overview' or 'stop'")


async def _authenticate(ws: WebSocket) -> Principal:
    """The handshake's principal; :class:`HTTPException` 401 (no valid credentials) or 503 (the database)."""
    try:
        return await trio.to_thread.run_sync(authenticate, ws.app.state.db, ws)
    except SQLAlchemyError:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the database is unavailable; try again") from None


async def serve_swarm(ws: WebSocket) -> None:
    """The ``/api/v1/ws/swarm`` endpoint (see the module's docstring and ``protocol.md`` §17.11)."""
    if not same_origin(ws):
        # Before accepting: the server answers the handshake with 403, and no other site's page learns anything.
        await ws.close(code=status.WS_1008_POLICY_VIOLATION)
        return
    app = ws.app
    try:
        principal = await _authenticate(ws)
    except HTTPException as e:
        await ws.accept()
        await ws.send_json({"type": "error", "status": e.status_code, "detail": e.detail})
        await ws.close(code=4000 + e.status_code)
        return
    await ws.accept()
    if not principal.may("cluster", "read"):
        await ws.send_json({"type": "error", "status": 403, "detail": principal.missing("cluster", "read")})
        await ws.close(code=4403)
        return
    open_sockets: list[WebSocket] = app.state.swarm_sockets
    if len(open_sockets) >= MAX_SOCKETS:
        detail = f"{MAX_SOCKETS} live views are open on this manager already: close one, or try again later"
        await ws.send_json({"type": "error", "status": 503, "detail": detail})
        await ws.close(code=4503)
        return
    open_sockets.append(ws)
    try:
        await _serve_swarm(ws, principal)
    finally:
        open_sockets.remove(ws)


async def _serve_swarm(ws: WebSocket, principal: Principal) -> None:
    app = ws.app
    source: SwarmSource | None = getattr(app.state, "swarm_source", None)
    watch = source.watch() if source is not None else None
    event(log, logging.INFO, "mgr_ws_opened", user=principal.name, via=principal.via)
    watching: dict[str, Any] = {}
    changed = trio.Event()
    send_lock = trio.Lock()

    async def send(message: dict[str, Any]) -> None:
        async with send_lock:
            if ws.application_state == WebSocketState.CONNECTED:
                await ws.send_json(message)

    async def still_allowed(nursery: trio.Nursery) -> None:
        nonlocal principal
        while True:
            await trio.sleep(REAUTH_INTERVAL)
            try:
                fresh = await _authenticate(ws)
            except HTTPException as e:
                if e.status_code == status.HTTP_503_SERVICE_UNAVAILABLE:
                    continue  # the database, not the credentials: look again at the next check
                status_code, detail = e.status_code, str(e.detail)
            else:
                if fresh.may("cluster", "read"):
                    principal = fresh
                    continue
                status_code, detail = 403, fresh.missing("cluster", "read")
            await send({"type": "error", "status": status_code, "detail": detail})
            await ws.close(code=4000 + status_code)
            event(log, logging.INFO, "mgr_ws_ended", user=principal.name, status=status_code)
            nursery.cancel_scope.cancel()
            return

    async def pusher() -> None:
        nonlocal changed
        while True:
            if not watching:
                await changed.wait()
                changed = trio.Event()
                continue
            task_id, interval = watching.get("task_id", ""), watching["interval"]
            started = trio.current_time()
            if watch is None:
                await send({"type": "error", "status": 503, "detail": "this manager has no fabric: no swarm to show"})
            elif not task_id:
                try:
                    await send({"type": "cluster", **(await watch.overview(principal))})
                except SwarmUnavailable as e:
                    await send({"type": "error", "status": 403, "detail": str(e)})
                    watching.clear()
            else:
                try:
                    swarm = await watch.snapshot(task_id, principal)
                except SwarmUnavailable as e:
                    await send({"type": "unavailable", "task_id": task_id, "detail": str(e)})
                else:
                    await send({"type": "swarm", "task_id": task_id, **swarm})
            with trio.move_on_at(started + interval):
                await changed.wait()
            if changed.is_set():
                changed = trio.Event()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pusher)
            nursery.start_soon(still_allowed, nursery)
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                try:
                    msg = _parse(message.get("text"))
                except _BadMessage as e:
                    await send({"type": "error", "status": 400, "detail": str(e)})
                    continue
                watching.clear()
                if msg["type"] == "watch":
                    watching.update(task_id=msg["task_id"], interval=msg["interval"])
                elif msg["type"] == "overview":
                    watching.update(interval=msg["interval"])
                changed.set()
            nursery.cancel_scope.cancel()
    except WebSocketDisconnect:
        pass
    event(log, logging.INFO, "mgr_ws_closed", user=principal.name)


def install(app: FastAPI) -> None:
    """Add the console's routes and the swarm websocket to the manager's application."""
    app.include_router(router())
    app.state.swarm_sockets = []
    app.add_api_websocket_route(WS_SWARM_PATH, serve_swarm)
