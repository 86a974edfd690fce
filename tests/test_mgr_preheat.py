"""Preheat jobs end to end: real ``dfz mgr``, ``dfz sched``, ``dfz seed``, ``dfz daemon``, ``dfz get`` and
``dfz preheat`` processes on 127.0.0.1 (ephemeral ports), driven through the open API
(``/oapi/v1/jobs``, Dragonfly's shape) with a personal access token, against an HTTP origin in the test
that counts the bytes it serves.

* a file preheat succeeds (the seed fetched it once), and a fresh daemon then gets the file from the seed:
  the origin serves no more bytes; a URL the origin does not have fails the job with the error recorded;
* bad requests are 422, no token 401, a token without the ``job`` scope 403;
* ``dfz preheat`` drives a job and exits 0 (1 when the job fails);
* a manager killed in the middle of a job resumes it when it starts again: the job succeeds and the origin
  served the file once;
* an image preheat (a real registry with htpasswd auth, ``scripts/registry_testbed.py``) names each blob's
  task by its digest, as the registry mirror does: ``skopeo copy`` through a fresh daemon's mirror then takes
  every blob from the seed (the registry's log: each blob's bytes served once in total, by the preheat),
  and ``get_task`` / ``delete_task`` jobs by digest find and delete the blob's task; a seed peer in a tenant
  preheats its tenant's tasks: a daemon of that tenant pulls from it, one of another tenant from the registry.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_helpers import Procs, Route, dfz_cmd, read_line, serve_origin

from dfz.mgr.service import ROOT_PASSWORD_ENV
from dfz.tasks import digest_task_id

pytestmark = pytest.mark.timeout(60)

PASSWORD = "root-password-for-tests"


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    procs: Procs
    tmp: Path
    db: str
    fabric: str
    url: str = ""
    mgr: subprocess.Popen[bytes] | None = None
    api: httpx.Client | None = None

    def start_mgr(self) -> None:
        config = self.tmp / "mgr.toml"
        config.write_text("keepalive = 0.3\nliveness = 3\nrefresh = 2\nconfig_poll = 0.2\njob_poll = 0.1\nseed_wait = 5\n")
        argv = dfz_cmd("mgr", "--config", str(config), "--database", self.db, "--listen", "127.0.0.1:0", "--fabric", self.fabric)
        with (self.tmp / "mgr.log").open("ab") as log:
            env = {**os.environ, ROOT_PASSWORD_ENV: PASSWORD}
            self.mgr = self.procs.start([*argv, "-v"], stdout=subprocess.PIPE, stderr=log, env=env)
        self.url = read_line(self.mgr, "listening")
        if self.api is not None:
            self.api.close()
        self.api = httpx.Client(base_url=self.url, timeout=10)
        assert self.api.post("/api/v1/sessions", json={"name": "root", "password": PASSWORD}).status_code == 201

    def start(self, *args: str, name: str) -> str:
        with (self.tmp / f"{name}.log").open("ab") as err:
            proc = self.procs.start(dfz_cmd(*args, "-v"), stdout=subprocess.PIPE, stderr=err)
        ready = "listening" if args[0] == "sched" else "api"
        return read_line(proc, ready)

    def token(self, scopes: list[str]) -> str:
        assert self.api is not None
        made = self.api.post(
            "/api/v1/personal-access-tokens", json={"name": f"t-{len(scopes)}-{time.monotonic_ns()}", "scopes": scopes}
        )
        assert made.status_code == 201, made.text
        return str(made.json()["token"])

    def active(self, path: str) -> list[dict[str, Any]]:
        assert self.api is not None
        return [r for r in self.api.get(f"/api/v1/{path}", params={"per_page": 100}).json()["items"] if r["state"] == "active"]


@pytest.fixture
def stack(procs: Procs, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(procs, tmp_path, f"sqlite:///{tmp_path / 'm.db'}", f"tcp://127.0.0.1:{free_port()}")
    s.start_mgr()
    s.start("sched", "--manager", s.fabric, "--listen", "tcp://127.0.0.1:0", name="sched")
    s.start("seed", "--data-dir", str(tmp_path / "seed"), "--manager", s.fabric, name="seed")
    wait_for(lambda: s.active("seed-peers") and s.active("schedulers"), 10, "scheduler and seed peer active")
    yield s
    if s.api is not None:
        s.api.close()


def job_done(oapi: httpx.Client, job_id: int, timeout: float = 30) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        answer = oapi.get(f"/oapi/v1/jobs/{job_id}")
        assert answer.status_code == 200, answer.text
        job: dict[str, Any] = answer.json()
        return job if job["state"] != "PENDING" else None

    result: dict[str, Any] = wait_for(done, timeout, f"job {job_id} finished")
    return result


def test_file_preheat_failures_and_auth(stack: Stack, tmp_path: Path) -> None:
    size = 5 << 20
    data = os.urandom(size)
    with serve_origin({"/file.bin": Route(data), "/cli.bin": Route(data[: 1 << 20])}) as origin:
        token = stack.token(["job"])
        oapi = httpx.Client(base_url=stack.url, timeout=10, headers={"Authorization": f"Bearer {token}"})
        body = {"type": "preheat", "args": {"type": "file", "url": origin.url + "/file.bin", "headers": None}}
        made = oapi.post("/oapi/v1/jobs", json=body)
        assert made.status_code == 200, made.text
        created = made.json()
        assert created["state"] == "PENDING" and created["type"] == "preheat" and created["args"]["type"] == "file"
        job = job_done(oapi, created["id"])
        assert job["state"] == "SUCCESS", job
        tasks = job["result"]["tasks"]
        assert len(tasks) == 1 and tasks[0]["state"] == "succeeded" and tasks[0]["content_length"] == size
        assert job["result"]["job_states"][0]["results"][0]["success_tasks"][0]["url"] == origin.url + "/file.bin"
        assert origin.served["/file.bin"] == size  # the seed fetched it, once

        # A fresh daemon gets it from the seed: the origin serves nothing more.
        api = stack.start("daemon", "--data-dir", str(tmp_path / "fresh"), "--manager", stack.fabric, name="fresh")
        out = tmp_path / "out.bin"
        got = subprocess.run(
            dfz_cmd("get", origin.url + "/file.bin", "-O", str(out), "--endpoint", api, "--timeout", "30", "--no-progress"),
            capture_output=True,
            timeout=40,
            check=False,
        )
        assert got.returncode == 0, got.stderr.decode()
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
        assert origin.served["/file.bin"] == size

        # A URL the origin does not have: the job fails, its error recorded.
        made = oapi.post("/oapi/v1/jobs", json={"type": "preheat", "args": {"type": "file", "url": origin.url + "/missing"}})
        assert made.status_code == 200, made.text
        job = job_done(oapi, made.json()["id"])
        assert job["state"] == "FAILURE" and job["dfz_state"] == "failed"
        assert "404" in job["error"] or "not found" in job["error"].lower(), job["error"]
        failure = job["result"]["job_states"][0]["results"][0]["failure_tasks"][0]
        assert failure["url"] == origin.url + "/missing" and failure["description"]
        assert job["result"]["tasks"][0]["error_kind"] == "origin_not_found"

        # Bad requests, no token, a token without the job scope.
        bad: list[dict[str, Any]] = [
            {"type": "preheat", "args": {"type": "file"}},
            {"type": "preheat", "args": {"type": "disk", "url": origin.url + "/file.bin"}},
            {"type": "preheat", "args": {"type": "file", "url": "ftp://x/y"}},
            {"type": "preheat", "args": {"type": "file", "url": origin.url + "/a", "scope": "everywhere"}},
            {"type": "preheat", "args": {"type": "file", "url": origin.url + "/a", "piece_length": 1000}},
            {"type": "preheat", "args": {"type": "file", "url": origin.url + "/a"}, "scheduler_cluster_ids": [999]},
            {"type": "sweep", "args": {}},
            {"args": {"type": "file", "url": origin.url + "/a"}},
        ]
        for request in bad:
            answer = oapi.post("/oapi/v1/jobs", json=request)
            assert 400 <= answer.status_code < 500 and answer.status_code not in (401, 403), (request, answer.text)
        assert oapi.get("/oapi/v1/jobs/999999").status_code == 404
        assert httpx.post(stack.url + "/oapi/v1/jobs", json=body).status_code == 401
        other = stack.token(["cluster:read"])
        refused = httpx.post(stack.url + "/oapi/v1/jobs", json=body, headers={"Authorization": f"Bearer {other}"})
        assert refused.status_code == 403, refused.text
        listed = oapi.get("/oapi/v1/jobs", params={"per_page": 5})
        assert listed.status_code == 200 and [j["state"] for j in listed.json()] == ["FAILURE", "SUCCESS"]

        # The CLI: a job that succeeds (exit 0) and one that fails (exit 1).
        cli = ["--manager", stack.url, "--token", token, "--no-progress"]
        done = subprocess.run(dfz_cmd("preheat", origin.url + "/cli.bin", *cli), capture_output=True, timeout=40, check=False)
        assert done.returncode == 0, done.stderr.decode()
        assert b"SUCCESS" in done.stdout
        assert origin.served["/cli.bin"] == 1 << 20
        done = subprocess.run(dfz_cmd("preheat", origin.url + "/nope", *cli), capture_output=True, timeout=40, check=False)
        assert done.returncode == 1, done.stderr.decode()
        oapi.close()


def test_job_resumes_after_a_manager_restart(stack: Stack) -> None:
    size = 4 << 20
    data = os.urandom(size)
    with serve_origin({"/slow.bin": Route(data, rate=2 << 20)}) as origin:
        token = stack.token(["job"])
        oapi = httpx.Client(base_url=stack.url, timeout=10, headers={"Authorization": f"Bearer {token}"})
        made = oapi.post("/oapi/v1/jobs", json={"type": "preheat", "args": {"type": "file", "url": origin.url + "/slow.bin"}})
        assert made.status_code == 200, made.text
        job_id = made.json()["id"]
        wait_for(lambda: origin.served.get("/slow.bin", 0) > 0, 10, "the seed started fetching")
        assert stack.mgr is not None
        stack.mgr.send_signal(signal.SIGKILL)  # no goodbye: the job stays running in the database
        stack.mgr.wait(5)
        stack.start_mgr()  # same database, same fabric endpoint: the seed registers again
        oapi.base_url = httpx.URL(stack.url)
        job = job_done(oapi, job_id, timeout=30)
        assert job["state"] == "SUCCESS", job
        assert job["result"]["tasks"][0]["state"] == "succeeded"
        assert origin.served["/slow.bin"] == size  # the seed's download went on: fetched once
        assert "mgr_job_resumed" in (stack.tmp / "mgr.log").read_text()
        oapi.close()


def _registry(tmp: Path) -> Any:
    """The registry testbed (``scripts/registry_testbed.py``), or a skip saying why it cannot run here."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import registry_testbed as rt

    server = rt.RegistryServer(tmp / "registry")
    try:
        server.start()
    except rt.RegistryUnavailable as e:
        pytest.skip(f"no registry testbed: {e}")
    return rt, server


def _blob_bytes(registry: Any) -> dict[str, int]:
    """Body bytes the registry wrote per blob digest (GET answers of any repository), less the 1-byte answers
    to the back-to-source client's length probe (``Range: bytes=0-0``, once per task)."""
    out: dict[str, int] = {}
    for r in registry.responses():
        uri = str(r["uri"]).split("?")[0]
        written = int(str(r["written"]))
        if r["method"] == "GET" and "/blobs/sha256:" in uri and written > 1:
            digest = uri.rsplit("/", 1)[1]
            out[digest] = out.get(digest, 0) + written
    return out


def _start_mirror_daemon(stack: Stack, data_dir: Path, registry_url: str) -> tuple[str, str]:
    """A fresh ``dfz daemon`` with the manager's cluster and a registry mirror for ``registry_url``: its API
    endpoint and its proxy URL."""
    argv = dfz_cmd(
        "daemon",
        "--data-dir",
        str(data_dir),
        "--manager",
        stack.fabric,
        "--proxy-listen",
        "127.0.0.1:0",
        "--mirror-upstream",
        registry_url,
        "-v",
    )
    with (stack.tmp / "mirror-daemon.log").open("ab") as err:
        proc = stack.procs.start(argv, stdout=subprocess.PIPE, stderr=err)
    return read_line(proc, "api"), read_line(proc, "proxy ")


def test_image_preheat_then_a_pull_through_a_mirror_takes_no_blob_byte_from_the_registry(stack: Stack, tmp_path: Path) -> None:
    """An image preheat names each blob's task by its digest (§13), as the registry mirror does: skopeo then
    copies the image through a fresh daemon's mirror with every blob from the seed, the registry serving
    each blob's bytes once in total (to the preheat). A ``get_task`` job by digest finds the seed's copy."""
    rt, registry = _registry(tmp_path)
    try:
        layers = {"a.bin": os.urandom(3 << 20), "b.bin": os.urandom(2 << 20)}
        rt.build_image(tmp_path / "layout", layers)
        rt.push_image(tmp_path / "layout", registry.url, "x/img")
        # A second platform and an index over both: the job must pick the platform asked for.
        rt.build_image(tmp_path / "arm", {"c.bin": os.urandom(1 << 20)}, tag="arm", arch="arm64")
        rt.push_image(tmp_path / "arm", registry.url, "x/img", tag="arm")
        auth = (rt.USER, rt.PASSWORD)
        accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
        entries = []
        manifests: dict[str, dict[str, Any]] = {}
        for tag, arch in (("v1", "amd64"), ("arm", "arm64")):
            got = httpx.get(f"{registry.url}/v2/x/img/manifests/{tag}", auth=auth, headers=accept)
            assert got.status_code == 200, got.text
            manifests[tag] = got.json()
            entries.append(
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": got.headers["docker-content-digest"],
                    "size": len(got.content),
                    "platform": {"os": "linux", "architecture": arch},
                }
            )
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}
        put = httpx.put(
            f"{registry.url}/v2/x/img/manifests/multi",
            auth=auth,
            json=index,
            headers={"Content-Type": "application/vnd.oci.image.index.v1+json"},
        )
        assert put.status_code == 201, put.text
        amd64 = manifests["v1"]
        sizes = {layer["digest"]: layer["size"] for layer in amd64["layers"]}
        sizes[amd64["config"]["digest"]] = amd64["config"]["size"]
        assert len(sizes) == 3 and not _blob_bytes(registry)

        token = stack.token(["job"])
        oapi = httpx.Client(base_url=stack.url, timeout=10, headers={"Authorization": f"Bearer {token}"})
        args = {"type": "image", "url": f"{registry.url}/v2/x/img/manifests/multi", "platform": "linux/amd64"}
        made = oapi.post(
            "/oapi/v1/jobs", json={"type": "preheat", "args": {**args, "username": rt.USER, "password": rt.PASSWORD}}
        )
        assert made.status_code == 200, made.text
        assert made.json()["args"]["password"] == "***"
        job = job_done(oapi, made.json()["id"])
        assert job["state"] == "SUCCESS", job
        image = job["result"]["image"]
        # The layers in the manifest's order, then the config blob, each with its digest.
        assert image["digests"] == [layer["digest"] for layer in amd64["layers"]] + [amd64["config"]["digest"]]
        assert image["blobs"] == [f"{registry.url}/v2/x/img/blobs/{d}" for d in image["digests"]]
        tasks = job["result"]["tasks"]
        assert [t["digest"] for t in tasks] == image["digests"]
        # Each task is the one named by the blob's digest (this cluster has no tenant), as the mirror names it.
        assert [t["task_id"] for t in tasks] == [digest_task_id(d) for d in image["digests"]]
        assert all(t["state"] == "succeeded" and t["content_length"] == sizes[t["digest"]] for t in tasks), tasks
        assert _blob_bytes(registry) == sizes  # the seed fetched each blob once
        seed_log = (stack.tmp / "seed.log").read_text()
        assert all(f"digest={d}" in seed_log for d in sizes), "the seed was not told the digests"

        # skopeo copies the amd64 image through a fresh daemon's mirror: every blob from the seed.
        _, proxy = _start_mirror_daemon(stack, tmp_path / "fresh", registry.url)
        mirror = proxy.split("://", 1)[1]
        conf = tmp_path / "registries.conf"
        conf.write_text(
            '[[registry]]\nlocation = "registry.invalid:5000"\ninsecure = true\n'
            f'[[registry.mirror]]\nlocation = "{mirror}"\ninsecure = true\n'
        )
        login = base64.b64encode(f"{rt.USER}:{rt.PASSWORD}".encode()).decode()
        authfile = tmp_path / "auth.json"
        authfile.write_text(json.dumps({"auths": {mirror: {"auth": login}}}))
        out = tmp_path / "copy"
        argv = ["skopeo", "--registries-conf", str(conf), "copy", "--authfile", str(authfile)]
        argv += ["docker://registry.invalid:5000/x/img:v1", f"oci:{out}:v1"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=40, check=False)
        assert done.returncode == 0, done.stderr + (stack.tmp / "mirror-daemon.log").read_text()[-3000:]
        for digest, size in sizes.items():
            data = (out / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == digest and len(data) == size
        mirror_log = (stack.tmp / "mirror-daemon.log").read_text()
        assert all(f"mirror.blob digest={d} " in mirror_log for d in sizes), "skopeo did not go through the mirror"
        assert _blob_bytes(registry) == sizes  # nothing more: the pull took every blob from the seed

        # A get_task job by digest finds the task on the seed and on the fresh daemon; by the blob's URL it
        # is another task (named by the URL), which no one holds.
        layer = image["digests"][0]
        made = oapi.post("/oapi/v1/jobs", json={"type": "get_task", "args": {"digest": layer}})
        assert made.status_code == 200, made.text
        job = job_done(oapi, made.json()["id"])
        assert job["state"] == "SUCCESS" and job["result"]["task_id"] == digest_task_id(layer), job
        peers = job["result"]["job_states"][0]["results"][0]["peers"]
        assert {p["host_type"] for p in peers if p["state"] == "succeeded"} == {"seed", "normal"}, peers
        made = oapi.post("/oapi/v1/jobs", json={"type": "get_task", "args": {"url": image["blobs"][0]}})
        job = job_done(oapi, made.json()["id"])
        assert job["state"] == "SUCCESS" and job["result"]["job_states"][0]["results"][0]["peers"] == [], job
        for bad in ({"digest": "sha256:abc"}, {"digest": layer, "url": image["blobs"][0]}, {"digest": "md5:" + "0" * 32}):
            answer = oapi.post("/oapi/v1/jobs", json={"type": "get_task", "args": bad})
            assert answer.status_code == 422, (bad, answer.text)
        # A delete_task job by digest removes it from both caches.
        made = oapi.post("/oapi/v1/jobs", json={"type": "delete_task", "args": {"digest": layer}})
        job = job_done(oapi, made.json()["id"])
        assert job["state"] == "SUCCESS", job
        deleted = job["result"]["job_states"][0]["results"][0]["success_tasks"]
        assert sorted((t["host_type"], t["held"], t["task_id"]) for t in deleted) == [
            ("normal", True, digest_task_id(layer)),
            ("seed", True, digest_task_id(layer)),
        ], deleted

        # The other platform: its own layer; a platform the index lacks fails the job, saying so.
        made = oapi.post(
            "/oapi/v1/jobs",
            json={"type": "preheat", "args": {**args, "platform": "linux/s390x", "username": rt.USER, "password": rt.PASSWORD}},
        )
        job = job_done(oapi, made.json()["id"])
        assert job["state"] == "FAILURE" and "linux/s390x" in job["error"] and "linux/arm64" in job["error"], job
        made = oapi.post("/oapi/v1/jobs", json={"type": "preheat", "args": {**args, "username": rt.USER, "password": "wrong"}})
        job = job_done(oapi, made.json()["id"])
        assert job["state"] == "FAILURE" and "401" in job["error"], job
        oapi.close()
    finally:
        registry.stop()


def test_image_preheat_in_a_tenant_serves_that_tenants_mirror_pulls_only(procs: Procs, tmp_path: Path) -> None:
    """A seed peer in a tenant preheats an image's blobs as the tasks named by their digests in its tenant
    (§13, §17.10): a daemon of that tenant pulls them through its mirror from the seed (the registry serves
    nothing more), a daemon of another tenant does not see them (its task ids differ: the registry serves
    each blob once more, to it)."""
    s = Stack(procs, tmp_path, f"sqlite:///{tmp_path / 'm.db'}", f"tcp://127.0.0.1:{free_port()}")
    s.start_mgr()
    assert s.api is not None
    tenants: dict[str, int] = {}
    tokens: dict[str, str] = {}
    for name in ("acme", "globex"):
        made = s.api.post("/api/v1/tenants", json={"name": name})
        assert made.status_code == 201, made.text
        tenants[name] = made.json()["id"]
        made = s.api.post("/api/v1/daemon-tokens", json={"name": f"{name}-hosts", "tenant_id": tenants[name]})
        assert made.status_code == 201, made.text
        tokens[name] = made.json()["token"]
    s.start("sched", "--manager", s.fabric, "--listen", "tcp://127.0.0.1:0", name="sched")
    with (tmp_path / "seed.log").open("ab") as err:
        seed = procs.start(
            dfz_cmd("seed", "--data-dir", str(tmp_path / "seed"), "--manager", s.fabric, "-v"),
            stdout=subprocess.PIPE,
            stderr=err,
            env={**os.environ, "DFZ_TENANT_TOKEN": tokens["acme"]},
        )
    read_line(seed, "api")
    wait_for(lambda: s.active("seed-peers") and s.active("schedulers"), 10, "scheduler and seed peer active")
    rt, registry = _registry(tmp_path)
    try:
        rt.build_image(tmp_path / "layout", {"a.bin": os.urandom(2 << 20), "b.bin": os.urandom(1 << 20)})
        rt.push_image(tmp_path / "layout", registry.url, "t/img")
        token = s.token(["job"])
        oapi = httpx.Client(base_url=s.url, timeout=10, headers={"Authorization": f"Bearer {token}"})
        args = {"type": "image", "url": f"{registry.url}/v2/t/img/manifests/v1", "username": rt.USER, "password": rt.PASSWORD}
        made = oapi.post("/oapi/v1/jobs", json={"type": "preheat", "args": args})
        assert made.status_code == 200, made.text
        job = job_done(oapi, made.json()["id"])
        assert job["state"] == "SUCCESS", job
        digests = job["result"]["image"]["digests"]
        sizes = {t["digest"]: t["content_length"] for t in job["result"]["tasks"]}
        assert set(sizes) == set(digests) and len(digests) == 3
        # The seed's tasks are its tenant's: the ids the mirror of a daemon of that tenant computes.
        acme = str(tenants["acme"])
        assert [t["task_id"] for t in job["result"]["tasks"]] == [digest_task_id(d, tenant=acme) for d in digests]
        assert _blob_bytes(registry) == sizes
        oapi.close()

        login = (rt.USER, rt.PASSWORD)
        for name, expected in (("acme", sizes), ("globex", {d: 2 * n for d, n in sizes.items()})):
            with (tmp_path / f"{name}.log").open("ab") as err:
                proc = procs.start(
                    dfz_cmd(
                        "daemon",
                        "--data-dir",
                        str(tmp_path / name),
                        "--manager",
                        s.fabric,
                        "--proxy-listen",
                        "127.0.0.1:0",
                        "--mirror-upstream",
                        registry.url,
                        "-v",
                    ),
                    stdout=subprocess.PIPE,
                    stderr=err,
                    env={**os.environ, "DFZ_TENANT_TOKEN": tokens[name]},
                )
            proxy = read_line(proc, "proxy ")
            with httpx.Client(base_url=proxy, timeout=30, auth=login) as client:
                for digest, size in sizes.items():
                    got = client.get(f"/v2/t/img/blobs/{digest}")
                    assert got.status_code == 200, (name, got.status_code, got.text[:300])
                    assert "sha256:" + hashlib.sha256(got.content).hexdigest() == digest and len(got.content) == size
            # acme's daemon took every blob from its tenant's seed; globex's could not, and went to the registry.
            assert _blob_bytes(registry) == expected, name
    finally:
        registry.stop()
