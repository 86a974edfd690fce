"""The manager (``dfz/mgr``) against real databases: SQLite files and a PostgreSQL server that the test
session starts itself (``scripts/pg_testdb.py``: Debian's package, installed when missing). Each test gets
a fresh database migrated by Alembic, a real hypercorn server on 127.0.0.1 with an ephemeral port, and an
HTTP client; ``dfz mgr`` itself is run as a process at the end.

``DFZ_TEST_POSTGRES_URL`` points the PostgreSQL runs at an existing server instead (a superuser URL)."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import trio
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import SQLModel, select

from dfz.mgr.db import Database, alembic_config
from dfz.mgr.models import PersonalAccessToken, Role
from dfz.mgr.service import ROOT_PASSWORD_ENV, Manager, ManagerConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import pg_testdb  # noqa: E402

# The first test that needs PostgreSQL may install it (apt-get) and make its cluster: give it room.
pytestmark = pytest.mark.timeout(300)

ROOT_PASSWORD = "root-password-for-tests"
BACKENDS = ["sqlite", "postgresql"]
_names = itertools.count()


# --- databases -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str | None]:
    """The URL of a PostgreSQL server for this session (None, with the reason kept, when it cannot be had)."""
    given = os.environ.get("DFZ_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    directory = tempfile.mkdtemp(prefix="dfz-pg-")
    server = pg_testdb.PostgresServer(directory)
    _PG_DIRS.append(directory)
    try:
        url = server.start()
    except pg_testdb.PostgresUnavailable as e:
        _PG_UNAVAILABLE.append(str(e))
        yield None
        shutil.rmtree(directory, ignore_errors=True)
        return
    try:
        yield url
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


_PG_UNAVAILABLE: list[str] = []
_PG_DIRS: list[str] = []


def test_postgres_server_start_is_idempotent(pg_server: str | None) -> None:
    """Starting the test server's directory again finds it running and gives the same URL."""
    if pg_server is None or not _PG_DIRS:
        pytest.skip("no PostgreSQL server of our own in this run" + (f": {_PG_UNAVAILABLE[0]}" if _PG_UNAVAILABLE else ""))
    again = pg_testdb.PostgresServer(_PG_DIRS[0])
    assert again.start() == pg_server
    assert again.running()


@pytest.fixture(scope="session")
def templates(pg_server: str | None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A migrated database per backend, copied for each test (migrating once is the slow part)."""
    found: dict[str, str] = {}
    path = tmp_path_factory.mktemp("mgr-template") / "template.db"
    db = Database(f"sqlite:///{path}")
    db.upgrade()
    db.close()
    found["sqlite"] = str(path)
    if pg_server is not None:
        name = f"dfz_template_{os.getpid()}"
        pg_testdb.drop_database(pg_server, name)
        db = Database(pg_testdb.create_database(pg_server, name))
        db.upgrade()
        db.close()
        found["postgresql"] = name
    return found


@pytest.fixture
def empty_url(request: pytest.FixtureRequest, pg_server: str | None, tmp_path: Path) -> Iterator[str]:
    """An empty database of the backend the test is parametrized with."""
    backend = request.param
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'manager.db'}"
        return
    if pg_server is None:
        pytest.skip(f"PostgreSQL cannot be installed or started here: {_PG_UNAVAILABLE[0]}")
    name = f"dfz_test_{os.getpid()}_{next(_names)}"
    url = pg_testdb.create_database(pg_server, name)
    yield url
    pg_testdb.drop_database(pg_server, name)


@pytest.fixture
def db_url(request: pytest.FixtureRequest, pg_server: str | None, templates: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database of the backend the test is parametrized with."""
    backend = request.param
    if backend == "sqlite":
        path = tmp_path / "manager.db"
        shutil.copyfile(templates["sqlite"], path)
        yield f"sqlite:///{path}"
        return
    if pg_server is None:
        pytest.skip(f"PostgreSQL cannot be installed or started here: {_PG_UNAVAILABLE[0]}")
    name = f"dfz_test_{os.getpid()}_{next(_names)}"
    url = pg_testdb.create_database(pg_server, name, template=templates["postgresql"])
    yield url
    pg_testdb.drop_database(pg_server, name)


both = pytest.mark.parametrize("db_url", BACKENDS, indirect=True)


# --- a running manager and a client ----------------------------------------------------------------------------


class Api:
    """An HTTP client of a running manager, signed in as ``root`` unless told otherwise."""

    def __init__(self, manager: Manager, client: httpx.AsyncClient) -> None:
        self.manager = manager
        self.client = client

    @property
    def db(self) -> Database:
        assert self.manager.db is not None
        return self.manager.db

    async def sign_in(self, name: str = "root", password: str = ROOT_PASSWORD) -> httpx.AsyncClient:
        client = httpx.AsyncClient(base_url=self.manager.urls[0], timeout=10)
        answer = await client.post("/api/v1/sessions", json={"name": name, "password": password})
        assert answer.status_code == 201, answer.text
        return client

    def bearer(self, token: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.manager.urls[0], timeout=10, headers={"Authorization": f"Bearer {token}"})

    async def ok(self, method: str, path: str, expect: int = 200, client: httpx.AsyncClient | None = None, **kw: Any) -> Any:
        answer = await (client or self.client).request(method, f"/api/v1{path}", **kw)
        assert answer.status_code == expect, f"{method} {path}: {answer.status_code} {answer.text}"
        return answer.json() if answer.content else None

    async def audit(self, **filters: Any) -> list[dict[str, Any]]:
        page = await self.ok("GET", "/audit-logs", params={"per_page": 1000, **filters})
        return list(page["items"])


@pytest.fixture
async def api(db_url: str, nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Api]:
    config = ManagerConfig(database=db_url, listen="127.0.0.1:0", secret_key_file=tmp_path / "secret.key")
    manager = Manager(config, environ={ROOT_PASSWORD_ENV: ROOT_PASSWORD})
    await nursery.start(manager.run)
    assert manager.root_password is None  # it came from the environment
    client = httpx.AsyncClient(base_url=manager.urls[0], timeout=10)
    answer = await client.post("/api/v1/sessions", json={"name": "root", "password": ROOT_PASSWORD})
    assert answer.status_code == 201, answer.text
    yield Api(manager, client)
    await client.aclose()
    manager.stop()


# --- migrations ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("empty_url", BACKENDS, indirect=True)
def test_migrations_upgrade_an_empty_database_and_are_idempotent(empty_url: str) -> None:
    db = Database(empty_url)
    try:
        assert db.current_revision() is None
        db.upgrade()
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert head is not None and db.current_revision() == head
        db.upgrade()  # again: nothing to do, nothing duplicated
        assert db.current_revision() == head
        with db.reading() as session:
            roles = {r.name: r.permissions for r in session.exec(select(Role)).all()}
        assert roles.keys() == {"root", "operator", "guest", "tenant-admin"}
        assert roles["root"] == ["*"]
        # The migrated schema is exactly the models': a model change without a revision fails here.
        with db.engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), SQLModel.metadata)
        assert differences == []
        if db.backend == "sqlite":
            with db.engine.connect() as connection:
                assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        db.close()


@pytest.mark.parametrize("empty_url", BACKENDS, indirect=True)
def test_managers_starting_together_migrate_once(empty_url: str) -> None:
    """Several managers on one empty database (processes here): one migrates, the others wait (PostgreSQL
    advisory lock; SQLite's write lock) and find nothing left to do."""
    code = "import sys; from dfz.mgr.db import Database; d = Database(sys.argv[1]); d.upgrade(); d.close()"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, empty_url], cwd=ROOT, stderr=subprocess.PIPE, text=True) for _ in range(4)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    db = Database(empty_url)
    try:
        with db.reading() as session:
            assert len(session.exec(select(Role)).all()) == 4
        # The first revision also goes down cleanly, and up again.
        from alembic import command

        with db.engine.connect() as connection:
            command.downgrade(alembic_config(connection), "base")
            connection.commit()
        assert db.current_revision() is None
        db.upgrade()
        assert db.current_revision() is not None
    finally:
        db.close()


def test_database_urls_are_checked() -> None:
    from dfz.config import ConfigError
    from dfz.mgr.db import parse_url

    for bad in ("sqlite://", "sqlite:///:memory:", "mysql://x@y/z", "not a url", "postgresql://u@h"):
        with pytest.raises(ConfigError):
            parse_url(bad)
    assert parse_url("postgres://u:p@h:5/db").drivername == "postgresql+psycopg"


# --- every resource through HTTP ----------------------------------------------------------------------------------


@both
async def test_crud_of_every_resource_with_filters_and_audit(api: Api) -> None:
    ok = api.ok
    sc = await ok(
        "POST",
        "/scheduler-clusters",
        201,
        json={
            "name": "sc-1",
            "bio": "first",
            "is_default": True,
            "scheduling": {"evaluator": "simple", "candidate_parent_limit": 3, "candidate_parent_sample": 30},
            "scopes": {"idc": "idc-a|idc-b", "location": "cn|hz", "cidrs": ["10.1.2.3/16"], "hostnames": ["^web-\\d+$"]},
        },
    )
    assert sc["scopes"]["cidrs"] == ["10.1.0.0/16"] and sc["scheduling"]["candidate_parent_limit"] == 3
    assert sc["scheduling"]["load_weight"] == 0.6  # defaults from dfz.sched.config
    spc = await ok("POST", "/seed-peer-clusters", 201, json={"name": "spc-1", "scheduler_cluster_ids": [sc["id"]]})
    assert spc["scheduler_cluster_ids"] == [sc["id"]]
    assert (await ok("GET", f"/scheduler-clusters/{sc['id']}"))["seed_peer_cluster_ids"] == [spc["id"]]
    tenant = await ok("POST", "/tenants", 201, json={"name": "acme"})
    roles = {r["name"]: r for r in (await ok("GET", "/roles"))["items"]}

    # resource path, body to create, change to make, a filter that must find it
    cases: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = [
        ("/scheduler-clusters", {"name": "sc-2"}, {"bio": "second", "scopes": {"cidrs": ["fd00::/8"]}}, {"name": "sc-2"}),
        (
            "/seed-peer-clusters",
            {"name": "spc-2"},
            {"scheduler_cluster_ids": [sc["id"]]},
            {"scheduler_cluster_id": sc["id"], "name": "spc-2"},
        ),
        (
            "/schedulers",
            {"hostname": "sched-1", "ip": "10.1.0.5", "port": 8002, "scheduler_cluster_id": sc["id"], "idc": "idc-a"},
            {"state": "active", "port": 8003},
            {"scheduler_cluster_id": sc["id"], "state": "active"},
        ),
        (
            "/seed-peers",
            {"hostname": "seed-1", "ip": "10.1.0.6", "port": 65000, "download_port": 65002, "seed_peer_cluster_id": spc["id"]},
            {"type": "strong"},
            {"seed_peer_cluster_id": spc["id"], "type": "strong"},
        ),
        (
            "/hosts",
            {"host_id": "host-abc", "hostname": "web-1", "ip": "10.1.0.7", "port": 65100, "tenant_id": tenant["id"]},
            {"scheduler_cluster_id": sc["id"], "os": "linux", "arch": "x86_64"},
            {"tenant_id": tenant["id"], "ip": "10.1.0.7"},
        ),
        (
            "/applications",
            {"name": "app-1", "url": "https://example.test/app", "priority": 2},
            {"priority": 5},
            {"name": "app-1"},
        ),
        ("/tenants", {"name": "tenant-2"}, {"state": "disabled"}, {"state": "disabled"}),
        (
            "/users",
            {"name": "alice", "email": "Alice@Example.test", "password": "alice-password", "role_id": roles["operator"]["id"]},
            {"bio": "ops", "tenant_id": tenant["id"]},
            {"email": "alice@example.test"},
        ),
        (
            "/roles",
            {"name": "viewer", "permissions": ["cluster:read"]},
            {"permissions": ["cluster:read", "job:read"]},
            {"name": "viewer"},
        ),
        (
            "/jobs",
            {
                "type": "preheat",
                "args": {"type": "file", "url": "https://origin.test/f.bin"},
                "scheduler_cluster_ids": [sc["id"]],
            },
            {"bio": "warm it"},
            {"type": "preheat", "scheduler_cluster_id": sc["id"]},
        ),
        (
            "/configs",
            {"name": "limits", "target": "daemon", "value": {"upload_rate_limit": 1000}},
            {"value": {"upload_rate_limit": 2000, "upload_slots": 8}},
            {"target": "daemon"},
        ),
    ]
    created: list[tuple[str, dict[str, Any]]] = []
    for path, body, change, filters in cases:
        item = await ok("POST", path, 201, json=body)
        assert await ok("GET", f"{path}/{item['id']}") == item
        changed = await ok("PATCH", f"{path}/{item['id']}", json=change)
        for key, value in change.items():
            if isinstance(value, dict):
                assert {k: changed[key][k] for k in value} == value, (path, key)
            else:
                assert changed[key] == value, (path, key)
        assert changed["updated_at"] > item["updated_at"]
        found = await ok("GET", path, params=filters)
        assert [i["id"] for i in found["items"]] == [item["id"]], (path, filters, found)
        created.append((path, changed))
        assert "password" not in changed and "password_hash" not in changed

    config = dict(created)["/configs"]
    assert config["version"] == 2 and config["value"] == {"upload_rate_limit": 2000, "upload_slots": 8}

    for path, item in reversed(created):
        await ok("DELETE", f"{path}/{item['id']}", 204)
        await ok("GET", f"{path}/{item['id']}", 404)

    # Every change left an audit entry: create, update and delete of each resource, by root over a session.
    entries = await api.audit()
    kinds = {
        "/scheduler-clusters": "scheduler_cluster",
        "/seed-peer-clusters": "seed_peer_cluster",
        "/schedulers": "scheduler",
        "/seed-peers": "seed_peer",
        "/hosts": "host",
        "/applications": "application",
        "/tenants": "tenant",
        "/users": "user",
        "/roles": "role",
        "/jobs": "job",
        "/configs": "dynamic_config",
    }
    for path, item in created:
        actions = [e["action"] for e in entries if e["resource_type"] == kinds[path] and e["resource_id"] == str(item["id"])]
        assert actions == ["create", "update", "delete"], (path, actions)
    assert all(
        e["actor_name"] == "root" and e["via"] == "session" and e["ip"] == "127.0.0.1" for e in entries if e["actor_user_id"]
    )
    user_created = next(e for e in entries if e["resource_type"] == "user" and e["action"] == "create" and e["actor_user_id"])
    assert "password" not in user_created["changes"] and "password_hash" not in user_created["changes"]
    host_update = next(e for e in entries if e["resource_type"] == "host" and e["action"] == "update")
    assert host_update["changes"]["os"] == {"from": "", "to": "linux"}


@both
async def test_pagination_and_filters(api: Api) -> None:
    ids = [
        (await api.ok("POST", "/tenants", 201, json={"name": f"t-{i:02d}", "state": "disabled" if i % 3 == 0 else "enabled"}))[
            "id"
        ]
        for i in range(10)
    ]
    pages = [await api.ok("GET", "/tenants", params={"page": p, "per_page": 4}) for p in (1, 2, 3, 4)]
    assert [p["total"] for p in pages] == [10, 10, 10, 10]
    assert [i["id"] for p in pages for i in p["items"]] == ids
    assert [len(p["items"]) for p in pages] == [4, 4, 2, 0]
    disabled = await api.ok("GET", "/tenants", params={"state": "disabled", "per_page": 2, "page": 2})
    assert disabled["total"] == 4 and [i["name"] for i in disabled["items"]] == ["t-06", "t-09"]
    assert (await api.ok("GET", "/tenants", params={"name": "t-05"}))["items"][0]["id"] == ids[5]
    since = (await api.audit())[-1]["at"]
    late = await api.ok("GET", "/audit-logs", params={"since": since, "resource_type": "tenant"})
    assert late["total"] == 1


@both
async def test_bad_input_gets_clear_4xx(api: Api) -> None:
    ok = api.ok
    sc = await ok("POST", "/scheduler-clusters", 201, json={"name": "sc"})
    # Validation (422), naming the field.
    for path, body, word in [
        ("/scheduler-clusters", {"name": "sc-x", "scopes": {"cidrs": ["10.0.0.300/8"]}}, "CIDR"),
        ("/scheduler-clusters", {"name": "sc-x", "scopes": {"hostnames": ["(unclosed"]}}, "regular expression"),
        (
            "/scheduler-clusters",
            {"name": "sc-x", "scheduling": {"candidate_parent_limit": 10, "candidate_parent_sample": 5}},
            "candidate_parent_sample",
        ),
        ("/scheduler-clusters", {"name": "sc-x", "unknown": 1}, "unknown"),
        ("/scheduler-clusters", {"name": "bad name!"}, "name"),
        ("/schedulers", {"hostname": "s", "ip": "not-an-ip", "port": 1, "scheduler_cluster_id": sc["id"]}, "IPv4"),
        ("/schedulers", {"hostname": "s", "ip": "10.0.0.1", "port": 70000, "scheduler_cluster_id": sc["id"]}, "port"),
        ("/jobs", {"type": "preheat", "args": {"type": "file"}}, "url or urls"),
        ("/jobs", {"type": "preheat", "args": {"type": "image", "urls": ["https://a.test/x", "https://a.test/y"]}}, "one url"),
        ("/jobs", {"type": "preheat", "args": {"type": "file", "url": "ftp://a.test/x"}}, "http"),
        ("/jobs", {"type": "wipe", "args": {}}, "type"),
        ("/configs", {"name": "c", "target": "scheduler", "value": {"no_such_setting": 1}}, "no_such_setting"),
        ("/configs", {"name": "c", "target": "scheduler", "value": {"retry_limit": 0}}, "retry_limit"),
        ("/configs", {"name": "c", "target": "daemon", "value": {"upload_slots": 0}}, "upload_slots"),
        ("/users", {"name": "bob", "password": "short", "role_id": 1}, "password"),
        ("/roles", {"name": "r", "permissions": ["everything"]}, "permission"),
    ]:
        answer = await api.client.post(f"/api/v1{path}", json=body)
        assert answer.status_code == 422, (path, body, answer.text)
        assert word.lower() in answer.text.lower(), (word, answer.text)
    # References to rows that do not exist (422), duplicates and rows in use (409), unknown ids (404).
    answer = await api.client.post(
        "/api/v1/schedulers", json={"hostname": "s", "ip": "10.0.0.1", "port": 1, "scheduler_cluster_id": 999}
    )
    assert answer.status_code == 422 and "no scheduler cluster with id 999" in answer.text
    answer = await api.client.post("/api/v1/seed-peer-clusters", json={"name": "spc", "scheduler_cluster_ids": [sc["id"], 998]})
    assert answer.status_code == 422 and "998" in answer.text
    answer = await api.client.post("/api/v1/scheduler-clusters", json={"name": "sc"})
    assert answer.status_code == 409 and "exists already" in answer.text
    await ok("POST", "/schedulers", 201, json={"hostname": "s", "ip": "10.0.0.1", "port": 1, "scheduler_cluster_id": sc["id"]})
    answer = await api.client.delete(f"/api/v1/scheduler-clusters/{sc['id']}")
    assert answer.status_code == 409 and "still used by 1 scheduler" in answer.text
    await ok("GET", "/tenants/12345", 404)
    await ok("GET", "/tenants/0", 422)
    await ok("PATCH", f"/scheduler-clusters/{sc['id']}", 422, json={"name": None})
    # Query strings: unknown filters and out-of-range pages are refused, not ignored.
    await ok("GET", "/tenants", 422, params={"colour": "red"})
    await ok("GET", "/tenants", 422, params={"per_page": 0})
    await ok("GET", "/tenants", 422, params={"per_page": 1001})
    # Bodies: not JSON, not an object, too large.
    answer = await api.client.post("/api/v1/tenants", content=b"{nope", headers={"content-type": "application/json"})
    assert answer.status_code == 422
    answer = await api.client.post("/api/v1/tenants", json=["a"])
    assert answer.status_code == 422
    answer = await api.client.post("/api/v1/tenants", json={"name": "t", "bio": "x" * (2 * 1024 * 1024)})
    assert answer.status_code == 413
    await ok("GET", "/no-such-thing", 404)
    # None of the refused requests left an audit entry; the two changes did.
    assert [(e["action"], e["resource_type"]) for e in await api.audit() if e["actor_user_id"]] == [
        ("sign_in", "session"),
        ("create", "scheduler_cluster"),
        ("create", "scheduler"),
    ]


@both
async def test_one_default_cluster_and_built_in_rules(api: Api) -> None:
    ok = api.ok
    a = await ok("POST", "/scheduler-clusters", 201, json={"name": "a", "is_default": True})
    b = await ok("POST", "/scheduler-clusters", 201, json={"name": "b", "is_default": True})
    defaults = await ok("GET", "/scheduler-clusters", params={"is_default": True})
    assert [c["id"] for c in defaults["items"]] == [b["id"]]
    moved = [e for e in await api.audit(resource_type="scheduler_cluster", action="update")]
    assert [(e["resource_id"], e["changes"]) for e in moved] == [(str(a["id"]), {"is_default": {"from": True, "to": False}})]
    roles = {r["name"]: r for r in (await ok("GET", "/roles"))["items"]}
    assert all(r["builtin"] for r in roles.values())
    await ok("DELETE", f"/roles/{roles['guest']['id']}", 409)
    await ok("PATCH", f"/roles/{roles['guest']['id']}", 409, json={"name": "visitor"})
    await ok("PATCH", f"/roles/{roles['root']['id']}", 409, json={"permissions": ["cluster"]})
    await ok("DELETE", "/users/1", 409)  # oneself, and the last root user
    await ok("PATCH", "/users/1", 409, json={"role_id": roles["guest"]["id"]})


# --- authentication: tokens and sessions -------------------------------------------------------------------------------


@both
async def test_token_scopes_expiry_and_revocation(api: Api) -> None:
    ok = api.ok
    created = await ok("POST", "/personal-access-tokens", 201, json={"name": "ci", "scopes": ["cluster:read", "job"]})
    secret = created["token"]
    assert secret.startswith("dfz_") and created["prefix"] == secret[:10] and created["state"] == "active"
    expires = dt.datetime.fromisoformat(created["expires_at"])
    assert dt.timedelta(days=29) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(days=30)
    with api.db.reading() as session:
        row = session.get(PersonalAccessToken, created["id"])
        assert row is not None and secret not in row.token_hash and row.token_hash != secret and len(row.token_hash) == 64
    program = api.bearer(secret)
    try:
        await ok("GET", "/scheduler-clusters", client=program)
        answer = await program.post("/api/v1/scheduler-clusters", json={"name": "x"})
        assert answer.status_code == 403 and "scopes" in answer.text
        await ok("POST", "/jobs", 201, client=program, json={"type": "get_task", "args": {"task_id": "ab" * 32}})
        await ok("GET", "/tenants", 403, client=program)
        await ok("GET", "/audit-logs", 403, client=program)
        # A token creates no token beyond its own scopes.
        await ok("POST", "/personal-access-tokens", 403, client=program, json={"name": "more", "scopes": ["user"]})
        job_entry = (await api.audit(resource_type="job"))[-1]
        assert job_entry["via"] == "token" and job_entry["token_id"] == created["id"] and job_entry["actor_name"] == "root"
        token = await ok("GET", f"/personal-access-tokens/{created['id']}")
        assert token["last_used_at"] is not None and "token" not in token and "token_hash" not in token

        # Expiry: the same token, once its time passed, is refused and listed as expired.
        with api.db.writing() as session:
            row = session.get(PersonalAccessToken, created["id"])
            assert row is not None
            row.expires_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        answer = await program.get("/api/v1/scheduler-clusters")
        assert answer.status_code == 401 and "expired" in answer.text and answer.headers["www-authenticate"] == "Bearer"
        assert [t["id"] for t in (await ok("GET", "/personal-access-tokens", params={"state": "expired"}))["items"]] == [
            created["id"]
        ]
    finally:
        await program.aclose()

    second = await ok("POST", "/personal-access-tokens", 201, json={"name": "other", "scopes": ["*"]})
    program = api.bearer(second["token"])
    try:
        await ok("GET", "/tenants", client=program)
        await ok("DELETE", f"/personal-access-tokens/{second['id']}", 204)
        answer = await program.get("/api/v1/tenants")
        assert answer.status_code == 401 and "revoked" in answer.text
    finally:
        await program.aclose()
    listed = await ok("GET", "/personal-access-tokens", params={"state": "revoked"})
    assert [t["id"] for t in listed["items"]] == [second["id"]]
    entries = await api.audit(resource_type="personal_access_token")
    assert [e["action"] for e in entries] == ["create", "create", "revoke"]
    assert all(secret not in str(e) and second["token"] not in str(e) for e in await api.audit())

    # Malformed credentials and bad token requests.
    for header in ("Basic cm9vdDp4", "Bearer", "Bearer dfz_unknown"):
        answer = await api.client.get("/api/v1/tenants", headers={"Authorization": header})
        assert answer.status_code == 401, header
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).isoformat()
    await ok("POST", "/personal-access-tokens", 422, json={"name": "t", "scopes": ["job"], "expires_at": past})
    await ok("POST", "/personal-access-tokens", 422, json={"name": "t", "scopes": ["job"], "expires_at": "2030-01-01T00:00:00"})
    await ok("POST", "/personal-access-tokens", 422, json={"name": "t", "scopes": []})
    await ok("POST", "/personal-access-tokens", 422, json={"name": "t", "scopes": ["jobs"]})


@both
async def test_sessions_roles_and_no_escalation(api: Api) -> None:
    ok = api.ok
    roles = {r["name"]: r["id"] for r in (await ok("GET", "/roles"))["items"]}
    await ok("POST", "/users", 201, json={"name": "olga", "password": "olga-password", "role_id": roles["operator"]})
    await ok("POST", "/users", 201, json={"name": "gus", "password": "gus-password!", "role_id": roles["guest"]})

    anonymous = httpx.AsyncClient(base_url=api.manager.urls[0], timeout=10)
    try:
        answer = await anonymous.get("/api/v1/tenants")
        assert answer.status_code == 401 and "sign in" in answer.text
        answer = await anonymous.post("/api/v1/sessions", json={"name": "olga", "password": "wrong-password"})
        assert answer.status_code == 401
        assert (await anonymous.get("/healthy")).json()["status"] == "ok"
    finally:
        await anonymous.aclose()
    failed = await api.audit(action="sign_in_failed")
    assert len(failed) == 1 and failed[0]["actor_name"] == "olga" and "wrong-password" not in str(failed[0])

    olga = await api.sign_in("olga", "olga-password")
    gus = await api.sign_in("gus", "gus-password!")
    try:
        cookie = olga.cookies.get("dfz_session")
        assert cookie
        me = await ok("GET", "/users/me", client=olga)
        assert me["name"] == "olga" and me["last_sign_in_at"] is not None
        await ok("POST", "/scheduler-clusters", 201, client=olga, json={"name": "ops"})
        await ok("GET", "/users", 403, client=olga)
        # No handing out more than one has: a root user, a role with "*", a token with user scope.
        await ok("POST", "/users", 403, client=olga, json={"name": "x", "password": "12345678", "role_id": roles["root"]})
        await ok("POST", "/personal-access-tokens", 403, client=olga, json={"name": "t", "scopes": ["user"]})
        await ok("POST", "/personal-access-tokens", 201, client=olga, json={"name": "t", "scopes": ["cluster"]})
        # Root lists olga's tokens; olga sees only her own.
        olga_id = me["id"]
        assert (await ok("GET", "/personal-access-tokens", params={"user_id": olga_id}))["total"] == 1
        assert (await ok("GET", "/personal-access-tokens", client=gus))["total"] == 0
        await ok("GET", "/personal-access-tokens", 403, client=gus, params={"user_id": olga_id})
        # The guest reads, and writes nothing.
        await ok("GET", "/scheduler-clusters", client=gus)
        answer = await gus.post("/api/v1/scheduler-clusters", json={"name": "g"})
        assert answer.status_code == 403 and "role 'guest' does not allow cluster:write" in answer.text
        # Password change, then sign out: the old cookie no longer works.
        await ok(
            "POST", "/users/me/password", 400, client=olga, json={"current_password": "nope", "new_password": "olga-password-2"}
        )
        await ok(
            "POST",
            "/users/me/password",
            204,
            client=olga,
            json={"current_password": "olga-password", "new_password": "olga-password-2"},
        )
        await ok("DELETE", "/sessions/current", 204, client=olga)
        async with httpx.AsyncClient(base_url=api.manager.urls[0], cookies={"dfz_session": cookie}) as replay:
            answer = await replay.get("/api/v1/users/me")
            assert answer.status_code == 401 and "session has ended" in answer.text
        again = await api.sign_in("olga", "olga-password-2")
        # A disabled user is refused at once: a live session stops working, and signing in fails.
        await ok("PATCH", f"/users/{olga_id}", json={"state": "disabled"})
        answer = await again.get("/api/v1/users/me")
        assert answer.status_code == 401 and "disabled" in answer.text
        await again.aclose()
        answer = await api.client.post("/api/v1/sessions", json={"name": "olga", "password": "olga-password-2"})
        assert answer.status_code == 401
    finally:
        await olga.aclose()
        await gus.aclose()
    actions = [e["action"] for e in await api.audit(actor_user_id=olga_id)]
    assert actions == ["sign_in_failed", "sign_in", "create", "create", "update", "sign_out", "sign_in", "sign_in_failed"]


@both
async def test_job_secrets_are_not_shown(api: Api) -> None:
    args = {
        "type": "image",
        "url": "https://registry.test/v2/x/manifests/v1",
        "username": "u",
        "password": "hunter2",
        "platform": "linux/amd64",
    }
    job = await api.ok("POST", "/jobs", 201, json={"type": "preheat", "args": args})
    assert job["args"]["password"] == "***" and job["args"]["username"] == "u" and job["state"] == "pending"
    assert job["user_id"] == 1 and job["scheduler_cluster_ids"] == []
    assert "hunter2" not in str(await api.audit())
    assert "hunter2" not in (await api.client.get(f"/api/v1/jobs/{job['id']}")).text


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_openapi_document(api: Api) -> None:
    document = (await api.client.get("/api/v1/openapi.json")).json()
    assert document["info"]["title"] == "dfz manager"
    paths = document["paths"]
    for resource in (
        "scheduler-clusters",
        "seed-peer-clusters",
        "schedulers",
        "seed-peers",
        "hosts",
        "applications",
        "tenants",
        "users",
        "roles",
        "personal-access-tokens",
        "jobs",
        "configs",
        "audit-logs",
    ):
        assert f"/api/v1/{resource}" in paths and f"/api/v1/{resource}/{{row_id}}" in paths, resource
    assert {"get", "post"} <= paths["/api/v1/jobs"].keys()
    assert "SchedulerClusterCreate" in document["components"]["schemas"]


@both
async def test_concurrent_writes(api: Api) -> None:
    """Requests run in worker threads: 60 creates at once all land (SQLite serialises them with BEGIN
    IMMEDIATE and a busy timeout instead of failing with 'database is locked')."""
    results: list[int] = []

    async def one(i: int) -> None:
        answer = await api.client.post(
            "/api/v1/hosts", json={"host_id": f"h-{i}", "hostname": f"h{i}", "ip": "10.0.0.1", "port": 1000 + i}
        )
        results.append(answer.status_code)

    async with trio.open_nursery() as nursery:
        for i in range(60):
            nursery.start_soon(one, i)
    assert results == [201] * 60
    assert (await api.ok("GET", "/hosts"))["total"] == 60
    assert len(await api.audit(resource_type="host")) == 60


# --- `dfz mgr` as a process ---------------------------------------------------------------------------------------


class MgrProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dfz.cli", "mgr", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
            env=env if env is not None else dict(os.environ),
        )
        self.lines: dict[str, str] = {}
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            key, _, value = line.strip().partition(" ")
            self.lines[key] = value
            if key == "listening":
                break
        else:
            raise AssertionError(f"dfz mgr exited ({self.proc.wait()}): {self.proc.stderr.read() if self.proc.stderr else ''}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=15)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code


@pytest.mark.parametrize("empty_url", BACKENDS, indirect=True)
def test_dfz_mgr_process(empty_url: str, tmp_path: Path) -> None:
    config = tmp_path / "mgr.toml"
    config.write_text(f'database = "{empty_url}"\nlisten = "127.0.0.1:1"\nsession_ttl = 600\n')
    env = {k: v for k, v in os.environ.items() if k != ROOT_PASSWORD_ENV}
    first = MgrProcess("--config", str(config), "--listen", "127.0.0.1:0", env=env)
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", first.lines["listening"])
        assert "root-password" in first.lines and "database" in first.lines
        assert first.lines["console"] == first.lines["listening"] + "/console/"
        password = first.lines["root-password"]
        with httpx.Client(base_url=first.lines["listening"], timeout=10) as client:
            answer = client.post("/api/v1/sessions", json={"name": "root", "password": password})
            assert answer.status_code == 201
            assert client.post("/api/v1/tenants", json={"name": "kept"}).status_code == 201
    finally:
        assert first.stop() == 0
    # A second start: the schema is up to date (nothing to migrate), no new root password, data kept.
    second = MgrProcess("--config", str(config), "--listen", "127.0.0.1:0", env=env)
    try:
        assert "root-password" not in second.lines
        with httpx.Client(base_url=second.lines["listening"], timeout=10) as client:
            assert client.post("/api/v1/sessions", json={"name": "root", "password": password}).status_code == 201
            assert [t["name"] for t in client.get("/api/v1/tenants").json()["items"]] == ["kept"]
    finally:
        assert second.stop() == 0
    db = Database(empty_url)
    try:
        with db.reading() as session:
            assert session.exec(sa.text("SELECT count(*) FROM alembic_version")).one()[0] == 1  # type: ignore[call-overload]
    finally:
        db.close()


def test_dfz_mgr_refuses_bad_settings(tmp_path: Path) -> None:
    for args, message in [
        (["--database", "sqlite://"], "in-memory SQLite"),
        (["--database", f"sqlite:///{tmp_path / 'm.db'}", "--listen", "nowhere"], "HOST:PORT"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "dfz.cli", "mgr", *args], capture_output=True, text=True, timeout=30, cwd=ROOT, check=False
        )
        assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
    (tmp_path / "bad.toml").write_text('listen = "127.0.0.1:0"\ncolour = "red"\n')
    done = subprocess.run(
        [sys.executable, "-m", "dfz.cli", "mgr", "--config", str(tmp_path / "bad.toml")],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 1 and "unknown key 'colour'" in done.stderr
    with socket_in_use() as port:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "dfz.cli",
                "mgr",
                "--database",
                f"sqlite:///{tmp_path / 'm.db'}",
                "--listen",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            check=False,
        )
    assert done.returncode == 1 and "cannot listen on" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "m.db").exists()  # nothing was created by a manager that could not serve
    done = subprocess.run(
        [sys.executable, "-m", "dfz.cli", "mgr", "--database", f"sqlite:///{tmp_path / 'm.db'}", "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
        env={**os.environ, ROOT_PASSWORD_ENV: "short"},
    )
    assert done.returncode == 1 and "must be 8 to 256 characters" in done.stderr and "Traceback" not in done.stderr, done.stderr


@contextlib.contextmanager
def socket_in_use() -> Iterator[int]:
    """A port that something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])
