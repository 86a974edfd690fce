"""Tenants end to end (issue 5 §5): real ``dfz mgr``, ``dfz sched``, ``dfz seed``, ``dfz daemon`` and ``dfz get``
processes on 127.0.0.1 (ephemeral ports), an HTTP origin in the test that counts the bytes it serves.

* Two tenants, each with a seed peer and three daemons joined by a daemon token of the manager's, fetch the
  same URL at the same time: two tasks (their ids differ by the tenant, which only the ticket sets), two
  swarms at the scheduler (every registration of a task is of its tenant), every file right, and the bytes
  counted per parent at every daemon: none from a host of the other tenant. The origin served one copy per
  tenant. No piece server saw a request from the other tenant (nothing was refused: the scheduler never
  paired them).
* A daemon whose token is unknown, or revoked, stops with a clear error instead of running in no tenant.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import Procs, Route, dfz_cmd, read_line, serve_origin
from test_mgr_e2e import Mgr, run_mgr, sched, wait_for

from dfz.peer.api_client import open_api_client
from dfz.tasks import task_id

pytestmark = pytest.mark.timeout(90)

SIZE = 6 << 20
PIECE_LENGTH = 256 << 10
PER_TENANT = 3


@pytest.fixture
def mgr(procs: Procs, tmp_path: Path) -> Iterator[Mgr]:
    yield from run_mgr(procs, tmp_path)


def token_for(mgr: Mgr, tenant: int, name: str) -> dict[str, Any]:
    made = mgr.api.post("/daemon-tokens", json={"name": name, "tenant_id": tenant})
    assert made.status_code == 201, made.text
    body: dict[str, Any] = made.json()
    assert body["token"].startswith("dfzd_") and body["state"] == "active"
    return body


def peer(
    procs: Procs, tmp: Path, name: str, *, scheduler: str, manager: str, token: str
) -> tuple[subprocess.Popen[bytes], str, str]:
    """A seed (``name`` starting with ``seed``) or daemon with ``token`` in $DFZ_TENANT_TOKEN: its host id and API."""
    kind = "seed" if name.startswith("seed") else "daemon"
    argv = dfz_cmd(kind, "--data-dir", str(tmp / name), "--scheduler", scheduler, "--manager", manager, "-v")
    with (tmp / f"{name}.log").open("ab") as err:
        proc = procs.start(argv, stdout=subprocess.PIPE, stderr=err, env={**os.environ, "DFZ_TENANT_TOKEN": token})
    try:
        host = read_line(proc, "host").split(" ")[0]
        api = read_line(proc, "api")
    except AssertionError:
        raise AssertionError(f"{name} did not start: {(tmp / f'{name}.log').read_text()}") from None
    return proc, host, api


async def tasks_of(api: str) -> list[Any]:
    async with open_api_client(api) as client:
        return list(await client.list_tasks())


async def test_two_tenants_fetch_one_url_in_two_swarms_and_no_byte_crosses(procs: Procs, mgr: Mgr, short_tmp: str) -> None:
    tmp = Path(short_tmp)
    data = os.urandom(SIZE)
    tenants = {}
    for name in ("acme", "globex"):
        made = mgr.api.post("/tenants", json={"name": name})
        assert made.status_code == 201, made.text
        tenants[name] = made.json()["id"]
    tokens = {name: token_for(mgr, tenant, f"{name}-daemons")["token"] for name, tenant in tenants.items()}

    _, scheduler = sched(procs, tmp / "sched.log", mgr.fabric, "--listen", "tcp://127.0.0.1:0")
    hosts: dict[str, str] = {}  # host id -> tenant name
    apis: dict[str, tuple[str, str]] = {}  # daemon name -> (tenant name, api endpoint)
    for tenant in tenants:
        for i in range(PER_TENANT + 1):
            name = f"seed-{tenant}" if i == 0 else f"{tenant}-{i}"
            _, host, api = peer(procs, tmp, name, scheduler=scheduler, manager=mgr.fabric, token=tokens[tenant])
            hosts[host] = tenant
            if i:
                apis[name] = (tenant, api)
    # Every host is registered at the manager, in its token's tenant.
    rows = wait_for(lambda: len(mgr.items("/hosts")) == 2 * PER_TENANT and mgr.items("/hosts"), 10, "hosts registered")
    assert {r["host_id"]: r["tenant_id"] for r in rows} == {
        h: tenants[t] for h, t in hosts.items() if h in {r["host_id"] for r in rows}
    }

    with serve_origin({"/model.bin": Route(data)}) as origin:
        url = origin.url + "/model.bin"
        gets = []
        for name, (_, api) in apis.items():  # both tenants at once
            out = tmp / f"out-{name}"
            argv = dfz_cmd("get", url, "-O", str(out), "--endpoint", api, "--timeout", "60", "--no-progress")
            gets.append((name, out, procs.start([*argv, "--piece-length", str(PIECE_LENGTH)], stderr=subprocess.PIPE)))
        for name, out, proc in gets:
            _, err = proc.communicate(timeout=75)
            assert proc.returncode == 0, (name, err.decode())
            assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest(), name
        served = origin.served.get("/model.bin", 0)

    # Two tasks: each tenant's, with the id only its ticket's tenant gives.
    want = {t: task_id(url, tenant=str(tenant_id), piece_length=PIECE_LENGTH) for t, tenant_id in tenants.items()}
    assert len(set(want.values())) == 2 and task_id(url, piece_length=PIECE_LENGTH) not in want.values()
    crossed: dict[str, int] = {}
    from_peers: dict[str, int] = {}
    for name, (tenant, api) in apis.items():
        listed = await tasks_of(api)
        assert [t.task_id for t in listed] == [want[tenant]], name
        extra = listed[0].extra
        assert extra["tenant"] == str(tenants[tenant])
        counts: dict[str, int] = json.loads(extra["from_hosts"])
        assert sum(counts.values()) == SIZE, (name, counts)
        assert set(counts) <= {h for h, t in hosts.items() if t == tenant} | {"origin"}, (name, counts)
        crossed[name] = sum(n for h, n in counts.items() if h in hosts and hosts[h] != tenant)
        from_peers[name] = sum(n for h, n in counts.items() if h != "origin")
    assert crossed == dict.fromkeys(apis, 0)
    assert sum(from_peers.values()) >= SIZE  # peer to peer did happen
    print(f"bytes from the other tenant per daemon: {crossed}; from peers: {from_peers}; origin served {served}")

    # Two swarms at the scheduler: every registration of a task came from a host of the task's tenant.
    log = (tmp / "sched.log").read_text()
    registered = re.findall(r"peer_registered peer=\S+ task=(\w+) tenant=(\S+) host=(\S+)", log)
    assert registered
    swarms: dict[str, set[str]] = {}
    for task, tenant, host in registered:
        swarms.setdefault(task, set()).add(tenant)
        assert hosts[host] == next(t for t, tid in want.items() if tid == task)
    assert swarms == {want[t]: {str(tenants[t])} for t in tenants}
    # No piece server refused anybody, and no ticket was refused anywhere.
    for name in [*apis, *(f"seed-{t}" for t in tenants)]:
        text = (tmp / f"{name}.log").read_text()
        assert "upload.wrong_tenant" not in text and "ticket_refused" not in text, name
    assert "ticket_refused" not in log
    # The origin served one copy per tenant: each tenant's seed fetched it once.
    assert 2 * SIZE <= served <= 2 * SIZE + SIZE // 2, served


def test_a_daemon_with_a_refused_token_stops(procs: Procs, mgr: Mgr, short_tmp: str) -> None:
    tmp = Path(short_tmp)
    tenant = mgr.api.post("/tenants", json={"name": "initech"}).json()["id"]
    revoked = token_for(mgr, tenant, "old")
    assert mgr.api.delete(f"/daemon-tokens/{revoked['id']}").status_code == 204
    for name, token, why in (
        ("d-unknown", "dfzd_" + "x" * 43, "unknown daemon token"),
        ("d-revoked", revoked["token"], "revoked"),
    ):
        argv = dfz_cmd("daemon", "--data-dir", str(tmp / name), "--scheduler", "tcp://127.0.0.1:9", "--manager", mgr.fabric)
        proc = procs.start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "DFZ_TENANT_TOKEN": token})
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 1, err.decode()
        message = err.decode()
        assert "refused this daemon's tenant token" in message and why in message, message
        assert token not in message  # the secret is never printed
    assert [r["state"] for r in mgr.items("/daemon-tokens")] == ["revoked"]
