"""The manager's side of tenants (issue 5 §5): daemon tokens through the REST API, and tenant tickets over the
fabric (``mgr.register`` with ``tenant_token``, refreshed on ``mgr.keepalive``), with a real manager in this
process (SQLite, 127.0.0.1, ephemeral ports) and a real fabric client playing the daemon."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from test_mgr_fabric import rest, start_manager

from dfz.broker import Client, RemoteError
from dfz.mgr.messages import MGR_CATALOGUE, MgrAlive, MgrErrorCode, MgrKeepalive, MgrRegister, MgrRegistered
from dfz.mgr.models import DaemonToken
from dfz.tickets import TicketVerifier

pytestmark = pytest.mark.timeout(60)


async def test_daemon_tokens_through_the_rest_api(nursery: trio.Nursery, tmp_path: Path) -> None:
    manager = await start_manager(nursery, tmp_path)
    root = await rest(manager)
    a = (await root.post("/tenants", json={"name": "a"})).json()["id"]
    b = (await root.post("/tenants", json={"name": "b"})).json()["id"]
    roles = {r["name"]: r["id"] for r in (await root.get("/roles")).json()["items"]}
    assert "daemon" in next(r for r in (await root.get("/roles")).json()["items"] if r["name"] == "operator")["permissions"]
    made = await root.post(
        "/users", json={"name": "admin-a", "password": "admin-a-password", "role_id": roles["tenant-admin"], "tenant_id": a}
    )
    assert made.status_code == 201, made.text
    admin = httpx.AsyncClient(base_url=manager.urls[0] + "/api/v1", timeout=10)
    assert (await admin.post("/sessions", json={"name": "admin-a", "password": "admin-a-password"})).status_code == 201

    # Root names the tenant; without one it is refused, an unknown one too.
    assert (await root.post("/daemon-tokens", json={"name": "x"})).status_code == 422
    assert (await root.post("/daemon-tokens", json={"name": "x", "tenant_id": 999})).status_code == 422
    created = await root.post("/daemon-tokens", json={"name": "b-fleet", "tenant_id": b})
    assert created.status_code == 201, created.text
    token_b = created.json()
    assert token_b["token"].startswith("dfzd_") and token_b["prefix"] == token_b["token"][:11]
    shown = (await root.get(f"/daemon-tokens/{token_b['id']}")).json()
    assert "token" not in shown and shown["state"] == "active" and shown["tenant_id"] == b
    # A tenant admin: its own tenant only, by default and by force.
    mine = await admin.post("/daemon-tokens", json={"name": "a-fleet"})
    assert mine.status_code == 201 and mine.json()["tenant_id"] == a
    assert (await admin.post("/daemon-tokens", json={"name": "x", "tenant_id": b})).status_code == 403
    assert [t["tenant_id"] for t in (await admin.get("/daemon-tokens")).json()["items"]] == [a]
    assert (await admin.get(f"/daemon-tokens/{token_b['id']}")).status_code == 404
    assert (await admin.delete(f"/daemon-tokens/{token_b['id']}")).status_code == 404
    # Revoked: still listed, as revoked; audited without the secret.
    assert (await root.delete(f"/daemon-tokens/{token_b['id']}")).status_code == 204
    assert (await root.get("/daemon-tokens", params={"state": "revoked"})).json()["total"] == 1
    audit = (await root.get("/audit-logs", params={"resource_type": "daemon_token", "per_page": 100})).json()["items"]
    assert [e["action"] for e in audit] == ["create", "create", "revoke"]
    assert token_b["token"] not in str(audit)
    for client in (root, admin):
        await client.aclose()
    manager.stop()


async def register(client: Client, token: str = "", *, kind: Any = "host", host_id: str = "host-1") -> MgrRegistered:
    msg = MgrRegister(kind=kind, hostname="h1", ip="127.0.0.1", port=4000, host_id=host_id, tenant_token=token)
    return (await client.request(msg)).expect(MgrRegistered)


async def refused(client: Client, request: Any) -> tuple[int, str]:
    with pytest.raises(RemoteError) as e:
        await request
    return e.value.code, e.value.reason


async def test_tickets_over_the_fabric(nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dfz")
    manager = await start_manager(nursery, tmp_path)
    key_file = manager.config.ticket_key_path()
    assert key_file == tmp_path / "ticket.key" and stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    root = await rest(manager)
    tenant = (await root.post("/tenants", json={"name": "acme"})).json()["id"]
    other = (await root.post("/tenants", json={"name": "off"})).json()["id"]
    token = (await root.post("/daemon-tokens", json={"name": "fleet", "tenant_id": tenant})).json()
    off_token = (await root.post("/daemon-tokens", json={"name": "off", "tenant_id": other})).json()["token"]
    assert (await root.patch(f"/tenants/{other}", json={"state": "disabled"})).status_code == 200
    client = Client(MGR_CATALOGUE, manager.fabric_endpoints[0], name="fake-daemon")
    await nursery.start(client.run)

    # With a token: a ticket of the tenant for this host, checked with the key of the same reply.
    reply = await register(client, token["token"])
    assert manager.signer is not None and reply.ticket_key == manager.signer.public_key
    ticket = TicketVerifier([reply.ticket_key]).verify(reply.ticket, now=time.time(), host_id="host-1")
    assert (ticket.tenant, ticket.tenant_name, ticket.expires_at - ticket.issued_at) == (str(tenant), "acme", 600)
    hosts = (await root.get("/hosts")).json()["items"]
    assert [(h["host_id"], h["tenant_id"]) for h in hosts] == [("host-1", tenant)]
    # Without one: no ticket, the key all the same, and the host in no tenant.
    plain = await register(client)
    assert plain.ticket == b"" and plain.ticket_key == reply.ticket_key
    assert [h["tenant_id"] for h in (await root.get("/hosts")).json()["items"]] == [None]
    # Refused: unknown, a disabled tenant's, a scheduler with a token, a token without a host id.
    code, why = await refused(client, register(client, "dfzd_" + "n" * 43))
    assert code == MgrErrorCode.TOKEN_REFUSED and "unknown daemon token" in why
    code, why = await refused(client, register(client, off_token))
    assert code == MgrErrorCode.TOKEN_REFUSED and "disabled" in why
    assert (await refused(client, register(client, token["token"], kind="scheduler")))[0] == MgrErrorCode.BAD_VALUE
    assert (await refused(client, register(client, token["token"], kind="seed_peer", host_id="")))[0] == MgrErrorCode.BAD_VALUE
    # Expired (in the database): refused.
    db = manager.db
    assert db is not None
    with db.writing() as session:
        row = session.get(DaemonToken, token["id"])
        assert row is not None
        row.expires_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    code, why = await refused(client, register(client, token["token"]))
    assert code == MgrErrorCode.TOKEN_REFUSED and "expired" in why

    # Refreshed on a keepalive after half its life; once the token is revoked, the keepalive is refused.
    fresh = (await root.post("/daemon-tokens", json={"name": "fleet-2", "tenant_id": tenant})).json()
    fabric = manager.fabric
    assert fabric is not None
    fabric.settings = dataclasses.replace(fabric.settings, ticket_ttl=2.0)  # refreshed after 1 s
    seed = await register(client, fresh["token"], kind="seed_peer", host_id="seed-1")
    assert TicketVerifier([seed.ticket_key]).verify(seed.ticket, now=time.time(), host_id="seed-1").tenant == str(tenant)
    alive = (await client.request(MgrKeepalive())).expect(MgrAlive)
    assert alive.ticket == b""  # still young
    await trio.sleep(1.05)
    alive = (await client.request(MgrKeepalive())).expect(MgrAlive)
    assert TicketVerifier([seed.ticket_key]).verify(alive.ticket, now=time.time(), host_id="seed-1").tenant == str(tenant)
    assert (await root.delete(f"/daemon-tokens/{fresh['id']}")).status_code == 204
    await trio.sleep(1.05)
    code, why = await refused(client, client.request(MgrKeepalive()))
    assert code == MgrErrorCode.TOKEN_REFUSED and "revoked" in why
    # No secret in the manager's logs.
    for secret in (token["token"], fresh["token"], off_token):
        assert secret not in caplog.text
    assert "mgr_ticket_issued" in caplog.text and "mgr_token_refused" in caplog.text
    await root.aclose()
    manager.stop()
