"""Role-based access to the manager's REST API (issue 5, section 5): every endpoint, with every built-in role
(``root``, ``operator``, ``guest``, ``tenant-admin``) and without credentials, against the permission matrix
written out below; and tenant admins confined to their own tenant.

The endpoints are enumerated from the FastAPI application itself (its routes, the same ones its OpenAPI
document describes), so an endpoint added without a row in :data:`MATRIX` fails
:func:`test_every_endpoint_with_every_role`. A real manager (SQLite, 127.0.0.1, ephemeral ports) serves;
people sign in with sessions, as the console does."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import trio
from fastapi.routing import iter_route_contexts

from dfz.mgr.api import create_app
from dfz.mgr.db import Database
from dfz.mgr.service import ROOT_PASSWORD_ENV, Manager, ManagerConfig

pytestmark = pytest.mark.timeout(120)

PASSWORD = "rbac-root-password"
ROLES = ("root", "operator", "guest", "tenant-admin")
NONE = "none"
"""No credentials at all."""
EVERYONE = frozenset(ROLES)
PUBLIC = frozenset((*ROLES, NONE))
ROOT = frozenset({"root"})
OPS = frozenset({"root", "operator"})
TENANT_ADMIN_TOO = frozenset({"root", "tenant-admin"})
JOB_WRITERS = frozenset({"root", "operator", "tenant-admin"})
CONFIG_READERS = frozenset({"root", "operator", "guest"})
AUDIT_READERS = frozenset({"root", "operator", "tenant-admin"})
DAEMON_TOKENS = frozenset({"root", "operator", "tenant-admin"})

V1 = "/api/v1"


def _crud(path: str, read: frozenset[str], write: frozenset[str], *, writable: bool = True) -> dict[str, frozenset[str]]:
    rows = {f"GET {V1}/{path}": read, f"GET {V1}/{path}/{{row_id}}": read}
    if writable:
        rows |= {f"POST {V1}/{path}": write, f"PATCH {V1}/{path}/{{row_id}}": write, f"DELETE {V1}/{path}/{{row_id}}": write}
    return rows


MATRIX: dict[str, frozenset[str]] = {
    # Public: health, the API's description, signing in.
    "GET /healthy": PUBLIC,
    f"GET {V1}/openapi.json": PUBLIC,
    f"GET {V1}/docs": PUBLIC,
    "GET /docs/oauth2-redirect": PUBLIC,
    f"POST {V1}/sessions": PUBLIC,
    # The web console's files (they hold no data: the page reads everything through the API).
    "GET /console": PUBLIC,
    "GET /console/": PUBLIC,
    "GET /console/{name:path}": PUBLIC,
    # Oneself: anyone signed in.
    f"DELETE {V1}/sessions/current": EVERYONE,
    f"GET {V1}/users/me": EVERYONE,
    f"GET {V1}/users/me/permissions": EVERYONE,
    f"GET {V1}/task-id": EVERYONE,
    f"POST {V1}/users/me/password": EVERYONE,
    # One's own tokens: every role has the token permission.
    f"GET {V1}/personal-access-tokens": EVERYONE,
    f"POST {V1}/personal-access-tokens": EVERYONE,
    f"GET {V1}/personal-access-tokens/{{row_id}}": EVERYONE,
    f"PATCH {V1}/personal-access-tokens/{{row_id}}": EVERYONE,
    f"DELETE {V1}/personal-access-tokens/{{row_id}}": EVERYONE,
    # Daemon tokens (which tenant daemons join): operators for any tenant, a tenant admin for its own; the guest none.
    **_crud("daemon-tokens", DAEMON_TOKENS, DAEMON_TOKENS),
    # Clusters and their instances: everybody reads, operators manage.
    **_crud("scheduler-clusters", EVERYONE, OPS),
    **_crud("seed-peer-clusters", EVERYONE, OPS),
    **_crud("schedulers", EVERYONE, OPS),
    **_crud("seed-peers", EVERYONE, OPS),
    **_crud("hosts", EVERYONE, OPS),
    # Applications and jobs: a tenant admin manages its tenant's.
    **_crud("applications", EVERYONE, JOB_WRITERS),
    **_crud("jobs", EVERYONE, JOB_WRITERS),
    f"POST {V1}/jobs/{{row_id}}/cancel": JOB_WRITERS,
    # Tenants: everybody reads (a tenant admin its own), only root changes them.
    **_crud("tenants", EVERYONE, ROOT),
    # Users: root, and a tenant admin for its tenant's; roles are global: a tenant admin only reads them.
    **_crud("users", TENANT_ADMIN_TOO, TENANT_ADMIN_TOO),
    **_crud("roles", TENANT_ADMIN_TOO, ROOT),
    # Dynamic configs: operators; the guest reads.
    **_crud("configs", CONFIG_READERS, OPS),
    # The audit log: read only.
    **_crud("audit-logs", AUDIT_READERS, frozenset(), writable=False),
    # The open API (Dragonfly's shape) over the same jobs.
    "GET /oapi/v1/jobs": EVERYONE,
    "GET /oapi/v1/jobs/{row_id}": EVERYONE,
    "POST /oapi/v1/jobs": JOB_WRITERS,
}
"""``METHOD path`` -> the roles allowed (``none``: without credentials). Every other role is refused: 403
for a signed-in role, 401 without credentials."""


def endpoints() -> set[str]:
    """Every endpoint of the manager's application: ``METHOD path``, from its routes."""
    app = create_app(cast(Database, None))  # listing the routes touches no database
    found: set[str] = set()
    for route in iter_route_contexts(app.routes):  # the routes of included routers too
        for method in route.methods or ():
            if method != "HEAD":
                found.add(f"{method} {route.path}")
    documented = {f"{m.upper()} {p}" for p, ops in app.openapi()["paths"].items() for m in ops}
    assert documented <= found, documented - found
    return found


def test_the_matrix_covers_every_endpoint() -> None:
    found = endpoints()
    missing, stale = sorted(found - MATRIX.keys()), sorted(MATRIX.keys() - found)
    assert not missing, f"endpoints without a row in MATRIX (say who may call them): {missing}"
    assert not stale, f"MATRIX rows of endpoints that do not exist: {stale}"


# --- the manager and its people ------------------------------------------------------------------------------


@dataclass
class World:
    manager: Manager
    clients: dict[str, httpx.AsyncClient]
    """By role (and ``none``): signed-in session clients."""
    users: dict[str, dict[str, Any]]
    passwords: dict[str, str]
    tenant: int
    """The tenant admin's tenant."""
    other_tenant: int
    roles: dict[str, int]
    scheduler_cluster: int
    seed_peer_cluster: int
    names: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def root(self) -> httpx.AsyncClient:
        return self.clients["root"]

    def name(self, prefix: str) -> str:
        return f"{prefix}-{next(self.names)}"

    async def ok(self, method: str, path: str, status: int = 200, *, client: httpx.AsyncClient | None = None, **kw: Any) -> Any:
        answer = await (client or self.root).request(method, V1 + path, **kw)
        assert answer.status_code == status, (method, path, answer.status_code, answer.text)
        return answer.json() if answer.content and answer.headers.get("content-type", "").startswith("application/json") else None

    async def sign_in(self, name: str, password: str) -> httpx.AsyncClient:
        client = httpx.AsyncClient(base_url=self.manager.urls[0], timeout=20)
        answer = await client.post(f"{V1}/sessions", json={"name": name, "password": password})
        assert answer.status_code == 201, answer.text
        return client


async def make_world(nursery: trio.Nursery, tmp: Path) -> World:
    config = ManagerConfig(database=f"sqlite:///{tmp / 'manager.db'}", listen="127.0.0.1:0")
    manager = Manager(config, environ={ROOT_PASSWORD_ENV: PASSWORD})
    await nursery.start(manager.run)
    world = World(manager, {}, {}, {"root": PASSWORD}, 0, 0, {}, 0, 0)
    world.clients["root"] = await world.sign_in("root", PASSWORD)
    world.clients[NONE] = httpx.AsyncClient(base_url=manager.urls[0], timeout=20)
    world.roles = {r["name"]: r["id"] for r in (await world.ok("GET", "/roles"))["items"]}
    world.tenant = (await world.ok("POST", "/tenants", 201, json={"name": "tenant-a"}))["id"]
    world.other_tenant = (await world.ok("POST", "/tenants", 201, json={"name": "tenant-b"}))["id"]
    world.scheduler_cluster = (await world.ok("POST", "/scheduler-clusters", 201, json={"name": "base"}))["id"]
    world.seed_peer_cluster = (await world.ok("POST", "/seed-peer-clusters", 201, json={"name": "base"}))["id"]
    for role in ROLES[1:]:
        password = f"{role}-password"
        body = {"name": role, "password": password, "role_id": world.roles[role]}
        if role == "tenant-admin":
            body["tenant_id"] = world.tenant
        world.users[role] = await world.ok("POST", "/users", 201, json=body)
        world.passwords[role] = password
        world.clients[role] = await world.sign_in(role, password)
    world.users["root"] = await world.ok("GET", "/users/me")
    return world


async def close(world: World) -> None:
    for client in world.clients.values():
        await client.aclose()
    world.manager.stop()


# --- what each endpoint is called with ------------------------------------------------------------------------

Call = tuple[str, dict[str, Any]]
"""A URL (the path with its id filled in) and httpx keyword arguments."""


def _bodies(w: World) -> dict[str, Callable[[], dict[str, Any]]]:
    """A valid new row of each resource (in the tenant admin's tenant, for those of a tenant)."""
    return {
        "scheduler-clusters": lambda: {"name": w.name("sc")},
        "seed-peer-clusters": lambda: {"name": w.name("spc")},
        "schedulers": lambda: {
            "hostname": w.name("s"),
            "ip": "10.0.0.1",
            "port": 8002,
            "scheduler_cluster_id": w.scheduler_cluster,
        },
        "seed-peers": lambda: {
            "hostname": w.name("sp"),
            "ip": "10.0.0.2",
            "port": 65000,
            "download_port": 65001,
            "seed_peer_cluster_id": w.seed_peer_cluster,
        },
        "hosts": lambda: {
            "host_id": w.name("h"),
            "hostname": w.name("h"),
            "ip": "10.0.0.3",
            "port": 65000,
            "tenant_id": w.tenant,
        },
        "applications": lambda: {"name": w.name("app"), "tenant_id": w.tenant},
        "tenants": lambda: {"name": w.name("t")},
        "users": lambda: {
            "name": w.name("u"),
            "password": "a-user-password",
            "role_id": w.roles["tenant-admin"],
            "tenant_id": w.tenant,
        },
        "roles": lambda: {"name": w.name("r"), "permissions": ["cluster:read"]},
        "configs": lambda: {"name": w.name("cfg"), "target": "daemon", "value": {"upload_slots": 8}},
        "jobs": lambda: {"type": "get_task", "args": {"task_id": "ab" * 32}},
        "daemon-tokens": lambda: {"name": w.name("dt"), "tenant_id": w.tenant},
    }


PATCHES: dict[str, dict[str, Any]] = {
    "scheduler-clusters": {"bio": "changed"},
    "seed-peer-clusters": {"bio": "changed"},
    "schedulers": {"idc": "changed"},
    "seed-peers": {"idc": "changed"},
    "hosts": {"idc": "changed"},
    "applications": {"bio": "changed"},
    "tenants": {"bio": "changed"},
    "users": {"bio": "changed"},
    "roles": {"bio": "changed"},
    "configs": {"bio": "changed"},
    "jobs": {"bio": "changed"},
    "personal-access-tokens": {"name": "renamed"},
    "daemon-tokens": {"bio": "changed"},
}


async def _target(w: World, resource: str, role: str) -> int:
    """A fresh row that ``role`` acts on (a tenant admin's: in its tenant)."""
    if resource == "personal-access-tokens":
        client = w.clients[role] if role in ROLES else w.root  # one's own token; without credentials, root's
        return int(
            (await w.ok("POST", "/personal-access-tokens", 201, client=client, json={"name": "t", "scopes": ["token"]}))["id"]
        )
    if resource == "audit-logs":
        # An entry of the tenant admin's tenant (its own sign-in), which every reader may see.
        entries = await w.ok("GET", "/audit-logs", params={"actor_user_id": w.users["tenant-admin"]["id"], "per_page": 1})
        return int(entries["items"][0]["id"])
    if resource == "tenants":
        return (
            w.tenant if role == "tenant-admin" else int((await w.ok("POST", "/tenants", 201, json=_bodies(w)["tenants"]()))["id"])
        )
    # Jobs are made by the tenant admin, so that they are of its tenant (root's have none).
    client = w.clients["tenant-admin"] if resource == "jobs" else w.root
    return int((await w.ok("POST", f"/{resource}", 201, client=client, json=_bodies(w)[resource]()))["id"])


async def call_for(w: World, endpoint: str, role: str) -> Call:
    method, path = endpoint.split(" ", 1)
    if path == f"{V1}/sessions":
        user = role if role in ROLES else "guest"
        return path, {"json": {"name": user, "password": w.passwords[user]}}
    if path == f"{V1}/users/me/password":
        password = w.passwords.get(role, "not-a-password")
        return path, {"json": {"current_password": password, "new_password": password}}
    if path.startswith("/console"):
        return path.replace("{name:path}", "app.js"), {"follow_redirects": True}
    if path == f"{V1}/task-id":
        return path, {"params": {"url": "http://127.0.0.1:9/file"}}
    if path.startswith("/oapi/v1/jobs"):
        if method == "POST":
            return path, {"json": {"type": "preheat", "args": {"type": "file", "url": "http://127.0.0.1:9/file"}}}
        return path.replace("{row_id}", str(await _target(w, "jobs", role))), {}
    if not path.startswith(V1 + "/") or path in (
        f"{V1}/openapi.json",
        f"{V1}/users/me",
        f"{V1}/users/me/permissions",
        f"{V1}/sessions/current",
    ):
        return path, {}
    resource = path[len(V1) + 1 :].split("/")[0]
    if "{row_id}" in path:
        url = path.replace("{row_id}", str(await _target(w, resource, role)))
        return url, {"json": PATCHES[resource]} if method == "PATCH" else {}
    if method == "POST":
        return path, {
            "json": _bodies(w)[resource]() if resource != "personal-access-tokens" else {"name": "t", "scopes": ["token"]}
        }
    return path, {}


async def attempt(w: World, endpoint: str, role: str) -> httpx.Response:
    method = endpoint.split(" ", 1)[0]
    url, kw = await call_for(w, endpoint, role)
    if endpoint == f"DELETE {V1}/sessions/current" and role in ROLES:
        # Signing out ends the session: do it with a session of its own.
        password = w.passwords[role]
        client = await w.sign_in(role, password)
        try:
            return await client.request(method, url, **kw)
        finally:
            await client.aclose()
    client = w.clients[role]
    try:
        return await client.request(method, url, **kw)
    finally:
        if role == NONE:
            client.cookies.clear()  # signing in must not make the anonymous client someone


async def test_every_endpoint_with_every_role(nursery: trio.Nursery, tmp_path: Path) -> None:
    w = await make_world(nursery, tmp_path)
    try:
        wrong: list[str] = []
        for endpoint in sorted(endpoints()):
            allowed = MATRIX[endpoint]
            for role in (*ROLES, NONE):
                answer = await attempt(w, endpoint, role)
                code = answer.status_code
                good = 200 <= code < 300 if role in allowed else code == (401 if role == NONE else 403)
                if not good:
                    want = "allowed (2xx)" if role in allowed else ("401" if role == NONE else "403")
                    wrong.append(f"{endpoint} as {role}: {code}, want {want}: {answer.text[:200]}")
        assert not wrong, "\n".join(wrong)
    finally:
        await close(w)


# --- tenants -----------------------------------------------------------------------------------------------------


async def test_tenant_admin_is_confined_to_its_tenant(nursery: trio.Nursery, tmp_path: Path) -> None:
    w = await make_world(nursery, tmp_path)
    ta = w.clients["tenant-admin"]
    mine, theirs = w.tenant, w.other_tenant
    ok = w.ok
    try:
        # Rows of both tenants, made by root; and another tenant's admin, with a token and a change of its own.
        rows: dict[str, dict[str, int]] = {}
        for resource in ("hosts", "applications", "users"):
            made = []
            for tenant in (mine, theirs):
                body = {**_bodies(w)[resource](), "tenant_id": tenant}
                made.append((await ok("POST", f"/{resource}", 201, json=body))["id"])
            rows[resource] = {"mine": made[0], "theirs": made[1]}
        other_admin = await w.sign_in(*(await _user_in(w, theirs)))
        try:
            their_job = (
                await ok("POST", "/jobs", 201, client=other_admin, json={"type": "get_task", "args": {"task_id": "cd" * 32}})
            )["id"]
            their_token = (
                await ok("POST", "/personal-access-tokens", 201, client=other_admin, json={"name": "x", "scopes": ["token"]})
            )["id"]
        finally:
            await other_admin.aclose()
        my_job = (await ok("POST", "/jobs", 201, client=ta, json={"type": "get_task", "args": {"task_id": "ab" * 32}}))["id"]
        rows["jobs"] = {"mine": my_job, "theirs": their_job}
        root_job = (await ok("POST", "/jobs", 201, json={"type": "get_task", "args": {"task_id": "ef" * 32}}))["id"]

        # Lists hold only its tenant's rows, whatever the filter says; root sees all.
        for resource, ids in rows.items():
            listed = {r["id"] for r in (await ok("GET", f"/{resource}", client=ta, params={"per_page": 1000}))["items"]}
            assert ids["mine"] in listed and ids["theirs"] not in listed, resource
            assert all(r["tenant_id"] == mine for r in (await ok("GET", f"/{resource}", client=ta))["items"]), resource
            filtered = await ok("GET", f"/{resource}", client=ta, params={"tenant_id": theirs} if resource != "jobs" else {})
            assert ids["theirs"] not in {r["id"] for r in filtered["items"]}
            everything = {r["id"] for r in (await ok("GET", f"/{resource}", params={"per_page": 1000}))["items"]}
            assert {ids["mine"], ids["theirs"]} <= everything
            # Another tenant's row is not found: not read, changed or deleted.
            await ok("GET", f"/{resource}/{ids['theirs']}", 404, client=ta)
            write = 403 if resource == "hosts" else 404  # hosts are read only to it (cluster:read) anyway
            await ok("PATCH", f"/{resource}/{ids['theirs']}", write, client=ta, json=PATCHES[resource])
            await ok("DELETE", f"/{resource}/{ids['theirs']}", write, client=ta)
            await ok("GET", f"/{resource}/{ids['mine']}", client=ta)
        await ok("GET", f"/jobs/{root_job}", 404, client=ta)  # root's job is of no tenant: not the admin's
        # Hosts are read-only to it (cluster:read); a row it makes is in its tenant, never in another.
        app = await ok("POST", "/applications", 201, client=ta, json={"name": w.name("app")})
        assert app["tenant_id"] == mine
        await ok("POST", "/applications", 403, client=ta, json={"name": w.name("app"), "tenant_id": theirs})
        await ok("PATCH", f"/applications/{app['id']}", 403, client=ta, json={"tenant_id": theirs})
        await ok("PATCH", f"/applications/{app['id']}", 403, client=ta, json={"tenant_id": None})
        user = {"name": w.name("u"), "password": "a-user-password", "role_id": w.roles["tenant-admin"]}
        assert (await ok("POST", "/users", 201, client=ta, json=user))["tenant_id"] == mine
        await ok("POST", "/users", 403, client=ta, json={**user, "name": w.name("u"), "tenant_id": theirs})
        await ok("PATCH", f"/users/{rows['users']['mine']}", 403, client=ta, json={"tenant_id": theirs})
        await ok("PATCH", "/users/1", 404, client=ta, json={"bio": "root is not of the tenant"})
        # No handing out more than it has, and roles are global: read, never changed by it.
        await ok("POST", "/users", 403, client=ta, json={**user, "name": w.name("u"), "role_id": w.roles["operator"]})
        await ok("POST", "/roles", 403, client=ta, json={"name": "mine", "permissions": ["token"]})
        await ok("PATCH", f"/roles/{w.roles['guest']}", 403, client=ta, json={"bio": "x"})
        assert len((await ok("GET", "/roles", client=ta))["items"]) == 4
        # A tenant admin needs a tenant.
        await ok(
            "POST", "/users", 422, json={"name": w.name("u"), "password": "a-user-password", "role_id": w.roles["tenant-admin"]}
        )
        # Tenants: only its own is there.
        assert [t["id"] for t in (await ok("GET", "/tenants", client=ta))["items"]] == [mine]
        await ok("GET", f"/tenants/{theirs}", 404, client=ta)
        # Tokens: its tenant's users' (user:read), never another tenant's.
        listed_tokens = await ok("GET", "/personal-access-tokens", 200, client=ta, params={"user_id": w.users["root"]["id"]})
        assert listed_tokens["items"] == []
        await ok("GET", f"/personal-access-tokens/{their_token}", 404, client=ta)
        await ok("DELETE", f"/personal-access-tokens/{their_token}", 404, client=ta)
        assert (await ok("GET", f"/personal-access-tokens/{their_token}"))["state"] == "active"
        # The audit log: the changes of its tenant's users only.
        entries = (await ok("GET", "/audit-logs", client=ta, params={"per_page": 1000}))["items"]
        tenant_users = {u["id"] for u in (await ok("GET", "/users", client=ta, params={"per_page": 1000}))["items"]}
        assert entries and {e["actor_user_id"] for e in entries} <= tenant_users
        assert len((await ok("GET", "/audit-logs", params={"per_page": 1000}))["items"]) > len(entries)
    finally:
        await close(w)


async def _user_in(w: World, tenant: int) -> tuple[str, str]:
    name = w.name("admin")
    body = {"name": name, "password": "other-admin-password", "role_id": w.roles["tenant-admin"], "tenant_id": tenant}
    await w.ok("POST", "/users", 201, json=body)
    return name, "other-admin-password"
