"""The manager's other jobs and the loose ends of preheat (issue 5, section 4), in one process on real sockets:

* job arguments are checked (422 with a clear reason): ``timeout`` in nanoseconds (1 s to 24 h, Go's
  ``time.Duration``) on the REST and the open API, a task's id or URL for ``get_task`` / ``delete_task``;
* a registry password is sealed at rest (no byte of it in the database files or the audit log), opened when
  the job runs; a manager with another key fails the job saying so, and its runner goes on;
* cancelling: a pending job at once, a running one (its preheat tasks stop; the result says what finished),
  an ended one is 409;
* malformed ``mgr.task_peers`` / ``mgr.task_deleted`` and ``sched.task_deleted`` messages are refused and
  counted, and both servers keep serving;
* the scheduler deletes a task through its daemons' sessions and forgets it (``sched.delete_task``), the
  core's ``ForgetTask`` keeps its invariants, and the new messages fit the header frame at their bounds.

The whole flow across real processes is in ``test_mgr_task_jobs.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

import httpx
import msgpack  # type: ignore[import-untyped]
import pytest
import trio
import zmq
from cryptography.fernet import Fernet
from e2e_helpers import Route, serve_origin
from test_mgr_fabric import rest, until
from test_sched_service import TASK, URL, RawSession, announce_msg, service_config

from dfz.broker import Client, ErrorCode, FabricError, Hello, Message
from dfz.broker.messages import MAX_HEADER_BYTES, Catalogue
from dfz.config import ConfigError
from dfz.mgr.messages import (
    MAX_JOB_RECORDS,
    MGR_CATALOGUE,
    MgrAlive,
    MgrDeletedHost,
    MgrKeepalive,
    MgrNoted,
    MgrPreheat,
    MgrRegister,
    MgrRegistered,
    MgrTaskDeleted,
    MgrTaskPeer,
    MgrTaskPeers,
    MgrTaskReport,
)
from dfz.mgr.sealing import KEY_ENV, Sealer, SealError, load_key, open_args, seal_args
from dfz.mgr.service import ROOT_PASSWORD_ENV, Manager, ManagerConfig
from dfz.sched import (
    AnnounceHost,
    ForgetTask,
    HostType,
    PeerFinished,
    PieceFinished,
    RegisterPeer,
    SchedulerCore,
    TaskMetadataKnown,
)
from dfz.sched.messages import (
    SCHED_CATALOGUE,
    SchedDeleteTask,
    SchedHostAnnounced,
    SchedPeerRegistered,
    SchedRefused,
    SchedRegisterPeer,
    SchedTaskDeleted,
    SchedTaskMetadata,
)
from dfz.sched.service import SchedulerService
from dfz.tasks import task_id

pytestmark = pytest.mark.timeout(60)
PASSWORD = "root-password-for-tests"
SECOND = 1_000_000_000


async def start(nursery: trio.Nursery, tmp: Path, environ: dict[str, str] | None = None, **settings: Any) -> Manager:
    config = ManagerConfig(
        database=f"sqlite:///{tmp / 'manager.db'}",
        listen="127.0.0.1:0",
        **{"keepalive": 0.2, "liveness": 3, "config_poll": 0.1, "job_poll": 0.05, **settings},
    )
    manager = Manager(config, environ={ROOT_PASSWORD_ENV: PASSWORD, **(environ or {})})
    await nursery.start(manager.run)
    return manager


async def job_of(api: Any, job_id: int) -> dict[str, Any]:
    answer = await api.get(f"/jobs/{job_id}")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


async def ended(api: Any, job_id: int, within: float = 15) -> dict[str, Any]:
    async def done() -> bool:
        return (await job_of(api, job_id))["state"] not in ("pending", "running")

    await until(done, within, f"job {job_id} ended")
    return await job_of(api, job_id)


# --- arguments --------------------------------------------------------------------------------------------


async def test_job_arguments_are_checked_and_timeouts_are_nanoseconds(nursery: trio.Nursery, tmp_path: Path) -> None:
    manager = await start(nursery, tmp_path, seed_wait=30)
    api = await rest(manager)
    file = {"type": "file", "url": "https://origin.test/f.bin"}
    bad: list[tuple[dict[str, Any], str]] = [
        ({"type": "preheat", "args": {**file, "timeout": 3600}}, "did you mean 3600 s = 3600000000000"),
        ({"type": "preheat", "args": {**file, "timeout": 25 * 3600 * SECOND}}, "nanoseconds"),
        ({"type": "preheat", "args": {**file, "timeout": -SECOND}}, "nanoseconds"),
        ({"type": "preheat", "args": {**file, "timeout": 0}}, "nanoseconds"),  # REST: no Go zero-value leniency
        ({"type": "preheat", "args": {**file, "timeout": 1.5e9}}, "integer"),
        ({"type": "get_task", "args": {}}, "task_id or url"),
        ({"type": "get_task", "args": {"task_id": "ab12"}}, "task_id"),
        ({"type": "get_task", "args": {"task_id": "AB" * 32}}, "task_id"),
        ({"type": "delete_task", "args": {"task_id": "ab" * 32, "url": file["url"]}}, "not both"),
        ({"type": "delete_task", "args": {"url": file["url"], "piece_length": 100_000}}, "power of two"),
        ({"type": "delete_task", "args": {"url": "ftp://x/y"}}, "http"),
        ({"type": "get_task", "args": {"task_id": "ab" * 32, "timeout": 10}}, "nanoseconds"),
        ({"type": "get_task", "args": {"task_id": "ab" * 32, "colour": "red"}}, "colour"),
        ({"type": "get_task", "args": {"digest": "sha256:" + "ab" * 31}}, "digest"),
        ({"type": "get_task", "args": {"digest": "sha512:" + "ab" * 64}}, "digest"),
        ({"type": "get_task", "args": {"digest": "sha256:" + "AB" * 32}}, "digest"),
        ({"type": "get_task", "args": {"digest": "sha256:" + "ab" * 32, "task_id": "ab" * 32}}, "not both"),
        ({"type": "delete_task", "args": {"digest": "sha256:" + "ab" * 32, "url": file["url"]}}, "not both"),
        ({"type": "delete_task", "args": {"digest": "sha256:" + "ab" * 32, "filtered_query_params": "X"}}, "no query"),
    ]
    for body, why in bad:
        answer = await api.post("/jobs", json=body)
        assert answer.status_code == 422 and why in answer.text, (body, answer.status_code, answer.text)
    made = await api.post("/jobs", json={"type": "preheat", "args": {**file, "timeout": 3600 * SECOND}})
    assert made.status_code == 201 and made.json()["args"]["timeout"] == 3600 * SECOND, made.text
    made = await api.post("/jobs", json={"type": "get_task", "args": {"url": file["url"], "tag": "t", "timeout": SECOND}})
    assert made.status_code == 201, made.text
    made = await api.post("/jobs", json={"type": "delete_task", "args": {"digest": "sha256:" + "ef" * 32, "tag": "t"}})
    assert made.status_code == 201 and made.json()["args"]["digest"] == "sha256:" + "ef" * 32, made.text

    # The open API: the same rules, Go's zero value and null as absent, camel-case names, the task job types.
    token = (await api.post("/personal-access-tokens", json={"name": "oapi", "scopes": ["job"]})).json()["token"]
    headers = {"Authorization": f"Bearer {token}"}
    oapi = manager.urls[0] + "/oapi/v1/jobs"
    async with httpx.AsyncClient(timeout=10, headers=headers) as client:
        answer = await client.post(oapi, json={"type": "preheat", "args": {**file, "timeout": 30}})
        assert answer.status_code == 422 and "nanoseconds" in answer.text, answer.text
        answer = await client.post(oapi, json={"type": "preheat", "args": {**file, "timeout": 0, "pieceLength": None}})
        assert answer.status_code == 200 and "timeout" not in answer.json()["args"], answer.text
        answer = await client.post(oapi, json={"type": "get_task", "args": {"taskID": "cd" * 32, "timeout": 5 * SECOND}})
        assert answer.status_code == 200 and answer.json()["args"] == {"task_id": "cd" * 32, "timeout": 5 * SECOND}
        answer = await client.post(oapi, json={"type": "delete_task", "args": {"filteredQueryParams": "X-Sig"}})
        assert answer.status_code == 422 and "task_id or url" in answer.text, answer.text
    document = (await api.get("/openapi.json")).json()
    cancel = document["paths"]["/api/v1/jobs/{row_id}/cancel"]["post"]
    assert "409" in cancel["responses"] and "nanoseconds" in str(document["components"]["schemas"]["JobCreate"])
    await api.aclose()
    manager.stop()


# --- the registry password at rest ------------------------------------------------------------------------


def test_sealing_and_the_key_file(tmp_path: Path) -> None:
    path = tmp_path / "mgr" / "secret.key"
    key, source = load_key(path, environ={})
    assert source == str(path) and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(path, environ={}) == (key, str(path))  # made once, then read
    other = Fernet.generate_key()
    assert load_key(path, environ={KEY_ENV: other.decode()}) == (other, f"${KEY_ENV}")
    sealer = Sealer(key)
    sealed = seal_args({"type": "image", "password": "s3cret", "username": "u"}, sealer)
    assert "password" not in sealed and "s3cret" not in str(sealed) and sealed["username"] == "u"
    assert open_args(sealed, sealer)["password"] == "s3cret"
    assert seal_args({"password": ""}, sealer) == {}  # nothing to keep
    with pytest.raises(SealError):
        open_args(sealed, Sealer(other))
    with pytest.raises(SealError):
        open_args(sealed, None)
    with pytest.raises(ConfigError, match="Fernet key"):
        Sealer(b"not a key")


async def test_registry_password_is_sealed_at_rest(nursery: trio.Nursery, tmp_path: Path) -> None:
    secret = "hunter2-the-registry-password"
    # A long seed_wait with no seed peer anywhere: the preheat stays pending while this manager runs.
    first = await start(nursery, tmp_path, seed_wait=60)
    api = await rest(first)
    # Nothing listens on port 9: resolving the image fails at once, after the password was opened.
    args = {"type": "image", "url": "https://127.0.0.1:9/v2/x/manifests/v1", "username": "u", "password": secret}
    job = (await api.post("/jobs", json={"type": "preheat", "args": args})).json()
    assert job["args"]["password"] == "***" and job["state"] == "pending"
    assert secret not in (await api.get("/audit-logs", params={"per_page": 1000})).text
    await api.aclose()
    first.stop()
    await trio.sleep(0.2)
    # No byte of it in the database's files; the row holds it sealed.
    for name in os.listdir(tmp_path):
        if name.startswith("manager.db"):
            assert secret.encode() not in (tmp_path / name).read_bytes(), name
    with sqlite3.connect(tmp_path / "manager.db") as db:
        (raw,) = db.execute("SELECT args FROM jobs WHERE id = ?", (job["id"],)).fetchone()
    assert "password_sealed" in raw and 'password"' not in raw.replace("password_sealed", "")
    key = (tmp_path / "secret.key").read_bytes().strip()
    assert stat.S_IMODE((tmp_path / "secret.key").stat().st_mode) == 0o600

    # Another manager on the same database with another key: the job fails saying why; the runner goes on.
    second = await start(nursery, tmp_path, environ={KEY_ENV: Fernet.generate_key().decode()}, seed_wait=0.05)
    api = await rest(second)
    failed = await ended(api, job["id"])
    assert failed["state"] == "failed" and "cannot open the job's registry password" in failed["error"], failed
    other = (await api.post("/jobs", json={"type": "get_task", "args": {"task_id": "ab" * 32}})).json()
    assert (await ended(api, other["id"]))["error"].startswith("no scheduler cluster to ask"), other
    await api.aclose()
    second.stop()
    await trio.sleep(0.2)
    # With the right key the password opens (the runner gets as far as the registry, which does not exist).
    third = await start(nursery, tmp_path, environ={KEY_ENV: key.decode()}, seed_wait=0.05)
    api = await rest(third)
    assert (await api.post("/scheduler-clusters", json={"name": "c", "is_default": True})).status_code == 201
    again = (await api.post("/jobs", json={"type": "preheat", "args": args})).json()
    done = await ended(api, again["id"], within=30)
    assert done["state"] == "failed" and "cannot resolve the image" in done["error"], done
    await api.aclose()
    third.stop()


# --- cancelling ---------------------------------------------------------------------------------------------


class _Catalogue113(Catalogue):
    """The manager's catalogue as a 1.13 peer lists it: ``mgr.preheat`` at revision 1 (no ``digest``)."""

    def versions(self) -> dict[str, int]:
        return {**super().versions(), MgrPreheat.wire_name(): 1}


class FakeSeed:
    """A seed peer that registers with the manager, keeps the ``mgr.preheat`` pushes it gets and reports
    what the test tells it to. ``old``: it lists ``mgr.preheat`` at revision 1, as a 1.13 peer does."""

    def __init__(self, endpoint: str, hostname: str = "fake-seed", *, old: bool = False) -> None:
        catalogue = _Catalogue113(MGR_CATALOGUE.types.values(), max_payload=0) if old else MGR_CATALOGUE
        self.client = Client(catalogue, endpoint, name=hostname)
        self.hostname = hostname
        self.pushes: list[MgrPreheat] = []
        self.client.on_push(MgrPreheat, lambda msg, _payload: self.pushes.append(msg))

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.client.run)
        reg = MgrRegister(kind="seed_peer", hostname=self.hostname, ip="127.0.0.1", port=5000)
        (await self.client.request(reg)).expect(MgrRegistered)
        nursery.start_soon(self._keepalive)

    async def _keepalive(self) -> None:
        """Keep the registration alive as a real seed does (the tests' manager marks an instance inactive
        after 3 missed keepalives of 0.2 s: without these, a test slower than that lost its seed)."""
        while True:
            await trio.sleep(0.1)
            with contextlib.suppress(FabricError):
                (await self.client.request(MgrKeepalive(), timeout=2)).expect(MgrAlive)

    async def report(self, push: MgrPreheat, state: str) -> bool:
        msg = MgrTaskReport(job_id=push.job_id, task=push.task, state=state, bytes_done=1)  # type: ignore[arg-type]
        return (await self.client.request(msg)).expect(MgrNoted).wanted


async def test_cancel_pending_running_and_ended_jobs(nursery: trio.Nursery, tmp_path: Path) -> None:
    manager = await start(nursery, tmp_path, seed_wait=5)
    api = await rest(manager)
    cluster = (await api.post("/scheduler-clusters", json={"name": "c", "is_default": True})).json()
    empty = (await api.post("/scheduler-clusters", json={"name": "empty"})).json()
    seed = FakeSeed(manager.fabric_endpoints[0])
    await seed.start(nursery)
    file = {"type": "file", "url": "https://origin.test/f.bin"}

    # Pending (its cluster has no seed peer: it waits for one): cancelled at once, never run.
    pending = (await api.post("/jobs", json={"type": "preheat", "args": file, "scheduler_cluster_ids": [empty["id"]]})).json()
    answer = await api.post(f"/jobs/{pending['id']}/cancel")
    assert answer.status_code == 200 and answer.json()["state"] == "cancelled", answer.text
    assert answer.json()["error"] == "cancelled by root"
    await trio.sleep(0.3)
    row = await job_of(api, pending["id"])
    assert row["state"] == "cancelled" and row["started_at"] is None

    # Running: its task was pushed to the seed; cancelled, the runner stops and records what finished.
    running = (await api.post("/jobs", json={"type": "preheat", "args": file, "scheduler_cluster_ids": [cluster["id"]]})).json()
    await until(lambda: _true(bool(seed.pushes)), 30, "the preheat pushed to the seed")
    push = seed.pushes.pop()
    assert await seed.report(push, "running")
    assert (await api.delete(f"/jobs/{running['id']}")).status_code == 409  # running: cancel it first
    answer = await api.post(f"/jobs/{running['id']}/cancel")
    assert answer.status_code == 200 and answer.json()["state"] == "cancelled", answer.text

    async def recorded() -> bool:
        result = (await job_of(api, running["id"]))["result"]
        return bool(result.get("tasks")) and result["tasks"][0]["state"] == "cancelled"

    await until(recorded, 30, "the cancelled job's result recorded")
    job = await job_of(api, running["id"])
    assert job["state"] == "cancelled" and job["result"]["state"] == "FAILURE"
    assert not await seed.report(push, "running")  # the manager no longer wants it: the peer may stop
    assert (await api.post(f"/jobs/{running['id']}/cancel")).status_code == 409
    assert (await api.delete(f"/jobs/{running['id']}")).status_code == 204

    # Ended: succeeded, then 409.
    done = (await api.post("/jobs", json={"type": "preheat", "args": file, "scheduler_cluster_ids": [cluster["id"]]})).json()
    await until(lambda: _true(bool(seed.pushes)), 30, "the second preheat pushed")
    assert not await seed.report(seed.pushes.pop(), "succeeded")
    assert (await ended(api, done["id"]))["state"] == "succeeded"
    answer = await api.post(f"/jobs/{done['id']}/cancel")
    assert answer.status_code == 409 and "succeeded" in answer.json()["detail"], answer.text
    assert (await api.post("/jobs/999999/cancel")).status_code == 404
    audit = (await api.get("/audit-logs", params={"action": "cancel", "per_page": 100})).json()["items"]
    assert sorted(a["resource_id"] for a in audit) == sorted(str(i) for i in (pending["id"], running["id"]))
    await api.aclose()
    manager.stop()


async def _true(value: bool) -> bool:
    return value


# --- an image's blobs by digest -------------------------------------------------------------------------------


async def test_image_preheat_names_sha256_blobs_by_digest_for_peers_that_know_it(nursery: trio.Nursery, tmp_path: Path) -> None:
    """An image's blobs (layers, then the config blob) go with their ``sha256`` digest to a peer that lists
    ``mgr.preheat`` revision 2, so it names the task by the digest (§13); a peer at revision 1 gets the push
    without it (it would not know the field), and a blob of another algorithm always goes by URL."""
    layer, config = "sha256:" + "1a" * 32, "sha256:" + "2b" * 32
    other = "sha512:" + "3c" * 64
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 600},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 1000},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": other, "size": 2000},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 1000},  # listed twice
        ],
    }
    manager = await start(nursery, tmp_path, seed_wait=5)
    api = await rest(manager)
    (await api.post("/scheduler-clusters", json={"name": "c", "is_default": True})).json()
    new, old = FakeSeed(manager.fabric_endpoints[0], "seed-new"), FakeSeed(manager.fabric_endpoints[0], "seed-old", old=True)
    await new.start(nursery)
    await old.start(nursery)
    with serve_origin({"/v2/x/img/manifests/v1": Route(json.dumps(manifest).encode())}) as registry:
        args = {"type": "image", "url": f"{registry.url}/v2/x/img/manifests/v1", "scope": "all_seed_peers"}
        job = (await api.post("/jobs", json={"type": "preheat", "args": args})).json()
        # At most 4 tasks run at once per cluster: each push is answered as it comes.
        got: dict[str, list[MgrPreheat]] = {"new": [], "old": []}
        with trio.fail_after(30):
            while len(got["new"]) + len(got["old"]) < 6:
                for key, seed in (("new", new), ("old", old)):
                    while seed.pushes:
                        push = seed.pushes.pop(0)
                        got[key].append(push)
                        await seed.report(push, "succeeded")
                await trio.sleep(0.05)
        done = await ended(api, job["id"])
        blob = f"{registry.url}/v2/x/img/blobs/"
        new_pushes = sorted((p.url, p.digest) for p in got["new"])
        assert new_pushes == sorted([(blob + layer, layer), (blob + other, ""), (blob + config, config)])
        assert sorted((p.url, p.digest) for p in got["old"]) == sorted((blob + d, "") for d in (layer, other, config))
    assert done["state"] == "succeeded", done
    image = done["result"]["image"]
    assert image["digests"] == [layer, other, config] and image["blobs"] == [blob + d for d in (layer, other, config)]
    # The job's own record of each task: the digest it names the task by (whichever peer it went to).
    assert sorted((t["url"], t["digest"]) for t in done["result"]["tasks"]) == sorted(
        [(blob + layer, layer), (blob + other, ""), (blob + config, config)] * 2
    )
    await api.aclose()
    manager.stop()


# --- malformed messages ------------------------------------------------------------------------------------------


def _raw(header: dict[str, Any]) -> bytes:
    return msgpack.packb({"v": 1, "dl": 0, **header})  # type: ignore[no-any-return]


async def test_malformed_job_answers_never_stop_the_manager(nursery: trio.Nursery, tmp_path: Path) -> None:
    manager = await start(nursery, tmp_path)
    assert manager.fabric is not None
    before = sum(manager.fabric.server.stats.bad_frames.values())
    peer = {"peer_id": "p", "host_id": "h", "hostname": "h", "ip": "1.2.3.4", "host_type": "normal", "state": "running"}
    host = {"host_id": "h", "hostname": "h", "ip": "1.2.3.4", "host_type": "seed", "ok": True}
    good = {"job_id": 1, "request": 1, "task_id": TASK}
    bad: list[dict[str, Any]] = [
        {"t": "mgr.task_peers", "id": 2, **good, "task_id": "x" * 64},
        {"t": "mgr.task_peers", "id": 3, **good, "peers": [{**peer, "state": "dancing", "finished_pieces": 1}]},
        {"t": "mgr.task_peers", "id": 4, **good, "peers": [{**peer, "finished_pieces": 1}] * (MAX_JOB_RECORDS + 1)},
        {"t": "mgr.task_peers", "id": 5, **good, "peers": [{**peer, "peer_id": "has space", "finished_pieces": 1}]},
        {"t": "mgr.task_deleted", "id": 6, **good, "hosts": [{**host, "error": "e" * 257}]},
        {"t": "mgr.task_deleted", "id": 7, **good, "request": -1},
        {"t": "mgr.get_task", "id": 8, **good},  # a server push, sent to the server
    ]
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(manager.fabric_endpoints[0])

    def exchange() -> dict[int, int]:
        sock.send_multipart([_raw({"t": "hello", "id": 1, "name": "fuzz"})])
        assert sock.poll(5000), "no welcome"
        sock.recv_multipart()
        for header in bad:
            sock.send_multipart([_raw(header)])
        codes: dict[int, int] = {}
        while sock.poll(1000):
            head = msgpack.unpackb(sock.recv_multipart()[0])
            if head.get("t") == "error":
                codes[head["id"]] = head["code"]
        return codes

    codes = await trio.to_thread.run_sync(exchange)
    sock.close()
    assert codes == {2: 422, 3: 422, 4: 422, 5: 422, 6: 422, 7: 422, 8: ErrorCode.UNEXPECTED}, codes
    assert sum(manager.fabric.server.stats.bad_frames.values()) >= before + 6
    # Well-formed answers to no question: not wanted; the manager still serves.
    client = Client(MGR_CATALOGUE, manager.fabric_endpoints[0], name="stray")
    await nursery.start(client.run)
    answer = MgrTaskPeers(job_id=77, request=1, task_id=TASK, peers=[], more=True)
    assert (await client.request(answer)).expect(MgrNoted).wanted is False
    reg = MgrRegister(kind="scheduler", hostname="s", ip="127.0.0.1", port=1)
    assert (await client.request(reg)).expect(MgrRegistered).instance_id >= 1
    manager.stop()


# --- the scheduler's side ---------------------------------------------------------------------------------


async def test_scheduler_deletes_a_task_through_its_daemons_and_forgets_it() -> None:
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            service: SchedulerService = await nursery.start(SchedulerService(service_config(heartbeat=1.0)).run)
            # Host a holds the task whole; host b has a peer of it but a 1.7 daemon's catalogue.
            a, b = RawSession(service.endpoints[0]), RawSession(service.endpoints[0])
            try:
                assert (await a.call(Hello(name="a", types=SCHED_CATALOGUE.versions()))).wire_name() == "welcome"
                old = {k: v for k, v in SCHED_CATALOGUE.versions().items() if k != "sched.delete_task"}
                assert (await b.call(Hello(name="b", types=old))).wire_name() == "welcome"
                for session, host in ((a, "host-a"), (b, "host-b")):
                    assert isinstance(await session.call(announce_msg(host)), SchedHostAnnounced)
                reg = await a.call(SchedRegisterPeer(peer_id="a-1", task_id=TASK, url=URL))
                assert isinstance(reg, SchedPeerRegistered) and reg.assignment == "back_to_source"
                await a.send(SchedTaskMetadata(peer_id="a-1", content_length=10, piece_length=65536))
                assert isinstance(await b.call(SchedRegisterPeer(peer_id="b-1", task_id=TASK, url=URL)), SchedPeerRegistered)
                await until(lambda: _true(service.task_peers(TASK)[0].content_length == 10), 5, "metadata applied")
                peers = service.task_peers(TASK)
                assert [(p.peer_id, p.host_id, p.state) for p in peers] == [
                    ("a-1", "host-a", "back_to_source"),
                    ("b-1", "host-b", "running"),
                ]
                assert peers[0].piece_count == 1 and service.task_peers("f" * 64) == []

                outcomes: list[Any] = []

                async def delete() -> None:
                    outcomes.extend(await service.delete_task(TASK, wait=5))

                nursery.start_soon(delete)
                push = await _next(a, SchedDeleteTask)
                assert push.task_id == TASK
                # A stray answer (wrong request) is refused; the right one is taken.
                await a.send(SchedTaskDeleted(task_id=TASK, request=push.request + 1, held=True))
                refusal = await _next(a, SchedRefused)
                assert refusal.code == 1105 and refusal.type == "sched.task_deleted"
                await a.send(SchedTaskDeleted(task_id=TASK, request=push.request, held=True))
                await until(lambda: _true(bool(outcomes)), 5, "the deletion ended")
                by_host = {o.host_id: o for o in outcomes}
                assert by_host["host-a"].ok and by_host["host-a"].held
                assert not by_host["host-b"].ok and "does not know sched.delete_task" in by_host["host-b"].error
                assert TASK not in service.core.tasks and not service.core.peers  # forgotten, peers and all
                service.core.check_invariants()
                # A malformed answer (a push: no id to answer) is dropped and counted; the service serves on.
                bad_before = service.server.stats.bad_frames["invalid"]
                await a.send_raw({"t": "sched.task_deleted", "id": 0, "task_id": TASK, "request": "x"})
                await until(lambda: _true(service.server.stats.bad_frames["invalid"] > bad_before), 5, "counted")
                assert isinstance(await a.call(SchedRegisterPeer(peer_id="a-2", task_id=TASK, url=URL)), SchedPeerRegistered)
                # A deletion of a task nobody has: nothing to do.
                assert await service.delete_task("e" * 64, wait=1) == []
            finally:
                a.kill()
                b.kill()
            nursery.cancel_scope.cancel()


async def _next(session: RawSession, kind: type[Any]) -> Any:
    while True:
        msg = await session.next_push()
        if isinstance(msg, kind):
            return msg


def test_forget_task_in_the_core() -> None:
    now = [1000.0]
    core = SchedulerCore(clock=lambda: now[0])
    core.apply(AnnounceHost("s", "s", "10.0.0.1", 4000, HostType.SEED))
    core.apply(AnnounceHost("h", "h", "10.0.0.2", 4000))
    other = task_id(URL + "?other")
    core.apply(RegisterPeer("s-1", TASK, "s", URL))
    core.apply(TaskMetadataKnown("s-1", 10, 65536))
    core.apply(PieceFinished("s-1", 0, "d" * 64, 10, 0.01, None))
    core.apply(PeerFinished("s-1", "d" * 64, 10))
    core.apply(RegisterPeer("h-1", TASK, "h", URL))  # a child of s-1
    core.apply(RegisterPeer("h-2", other, "h", URL + "?other"))
    actions = core.apply(ForgetTask(TASK))
    assert actions == []  # nothing pushed: the daemons were asked to delete it, nobody is rescheduled
    assert TASK not in core.tasks and set(core.peers) == {"h-2"} and other in core.tasks
    assert core.hosts["s"].uploads == 0 and not core.hosts["s"].peers
    core.check_invariants()
    assert core.apply(ForgetTask(TASK)) == []  # an unknown task: nothing to forget
    now[0] += 10_000  # no stale expiry of the forgotten task trips later ticks
    core.apply(AnnounceHost("s", "s", "10.0.0.1", 4000, HostType.SEED))
    core.check_invariants()


def test_job_messages_fit_the_header_frame_at_their_bounds() -> None:
    long_id, name = "i" * 128, "n" * 256
    peer = MgrTaskPeer(
        peer_id=long_id,
        host_id=long_id,
        hostname=name,
        ip=name,
        host_type="normal",
        state="back_to_source",
        finished_pieces=2**32 - 1,
        piece_count=2**32 - 1,
        content_length=2**63 - 1,
    )
    host = MgrDeletedHost(host_id=long_id, hostname=name, ip=name, host_type="normal", ok=False, held=True, error="e" * 256)
    largest: list[Message] = [
        MgrTaskPeers(job_id=2**63 - 1, request=2**32 - 1, task_id=TASK, peers=[peer] * MAX_JOB_RECORDS, more=True),
        MgrTaskDeleted(job_id=2**63 - 1, request=2**32 - 1, task_id=TASK, hosts=[host] * MAX_JOB_RECORDS, more=True),
    ]
    for msg in largest:
        frames = MGR_CATALOGUE.encode(msg)
        assert len(frames[0]) < MAX_HEADER_BYTES, msg.wire_name()
        assert MGR_CATALOGUE.decode(frames)[0] == msg
