"""The registry mirror on the daemon's proxy port (dfz/peer/proxy/mirror.py, task.py) against a real registry
(Debian's ``docker-registry`` with htpasswd basic auth, images built with ``umoci`` and pushed with
``skopeo``: scripts/registry_testbed.py) and a real cluster (``dfz sched``, ``dfz seed``, two ``dfz daemon``
with ``--proxy-listen``), with real clients: an HTTP client, ``skopeo`` and two ``containerd`` instances.

The registry's log counts the body bytes it wrote for blob requests: the mirrors of two daemons fetching the
same image must make it serve each blob once in total (the second daemon is served by peers)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_helpers import Procs, dfz_cmd, read_line
from prometheus_client.parser import text_string_to_metric_families

from dfz.config import ConfigError
from dfz.peer.config import DaemonConfig
from dfz.peer.local import DownloadRequest
from dfz.peer.proxy.mirror import parse_upstream
from dfz.peer.proxy.server import ERROR_HEADER, ERROR_SOURCE_HEADER
from dfz.peer.proxy.task import parse_range, status_of
from dfz.tasks import DigestFormatError, digest_task_id, task_id

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import registry_testbed as rt

BIG = random.Random(11).randbytes(6 << 20)
FILES = {"big.bin": BIG, "small.txt": b"mirror\n" * 3000}
FILES2 = {"other.bin": random.Random(12).randbytes(5 << 20), "note.txt": b"containerd\n" * 2000}
AUTH = (rt.USER, rt.PASSWORD)


# --- rules without a network --------------------------------------------------------------------------


def test_digest_task_ids() -> None:
    d = "sha256:" + "ab" * 32
    a = digest_task_id(d)
    assert a == digest_task_id("SHA256:" + "AB" * 32) and len(a) == 64
    assert a != digest_task_id(d, tenant="t1") != digest_task_id(d, tenant="t2")
    assert a != task_id(d)  # another domain tag: never a URL's id
    req = DownloadRequest(url="http://r1/v2/x/blobs/" + d, output=None, digest=d, by_digest=True)
    other = DownloadRequest(url="https://r2:5000/v2/y/z/blobs/" + d, output=None, digest=d, by_digest=True)
    assert req.task_id() == other.task_id() == a
    with pytest.raises(DigestFormatError):
        DownloadRequest(url="http://r1/x", output=None, by_digest=True).task_id()
    with pytest.raises(DigestFormatError):
        digest_task_id("sha256:abc")


def test_ranges_statuses_and_upstreams() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 10)
    assert parse_range("bytes=90-", 100) == (90, 100)
    assert parse_range("bytes=-10", 100) == (90, 100)
    assert parse_range("bytes=-500", 100) == (0, 100)
    assert parse_range("bytes=50-5000", 100) == (50, 100)
    assert parse_range("bytes=100-", 100) is False
    assert parse_range("bytes=-0", 100) is False
    assert parse_range("bytes=0-1,5-6", 100) is None  # several ranges: the whole content
    assert parse_range("items=0-1", 100) is None
    assert parse_range("bytes=9-3", 100) is None
    assert status_of("origin_not_found") == (404, "origin")
    assert status_of("origin_unavailable") == (502, "origin")
    assert status_of("scheduler_unreachable") == (503, "daemon")
    assert status_of("timeout") == (504, "daemon")
    assert status_of("internal") == (500, "daemon")
    assert parse_upstream("127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert parse_upstream("registry.example:443") == "https://registry.example:443"
    assert parse_upstream("docker.io") == "https://registry-1.docker.io"
    assert parse_upstream("reg.lan:5000", plain_http=["reg.lan:5000"]) == "http://reg.lan:5000"
    assert parse_upstream("HTTPS://reg.example/") == "https://reg.example"
    for bad in ("ftp://x", "http://x/path", "a b", "", "http://user@x"):
        with pytest.raises(ValueError, match="HOST"):
            parse_upstream(bad)
    with pytest.raises(ConfigError, match="proxy_listen"):
        DaemonConfig.from_mapping({"data_dir": "/tmp/x", "proxy_listen": "nowhere"})
    with pytest.raises(ConfigError, match="mirror_upstream"):
        DaemonConfig.from_mapping({"data_dir": "/tmp/x", "mirror_upstream": "ftp://x"})
    assert DaemonConfig.from_mapping({"data_dir": "/tmp/x", "proxy_listen": "127.0.0.1:0"}).proxy_listen == "127.0.0.1:0"


# --- a registry and a cluster ---------------------------------------------------------------------------


@dataclass
class Image:
    name: str
    layout: Path
    blobs: dict[str, int]
    """Digest -> size of every blob of the image (config and layers)."""


@dataclass
class Cluster:
    registry: Any
    images: dict[str, Image]
    mirrors: list[str]
    """The proxy URLs of the two daemons."""
    logs: list[Path]
    """The logs of the seed and the two daemons."""
    data_dirs: list[Path]
    """The data directories of the seed and the two daemons."""
    metrics: list[str]
    """The metrics URLs of the two daemons."""

    def mirrored(self, n: int, digest: str) -> bool:
        """Daemon ``n``'s mirror served a GET of blob ``digest``."""
        lines = self.logs[1 + n].read_text().splitlines()
        return any(f"mirror.blob digest={digest} " in line and "method=GET" in line for line in lines)


def _blobs_of(layout: Path) -> dict[str, int]:
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest.split(":")[1]).read_text())
    found = {manifest["config"]["digest"]: manifest["config"]["size"]}
    for layer in manifest["layers"]:
        found[layer["digest"]] = layer["size"]
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = Path(tmp_path_factory.mktemp("mirror"))
    registry = rt.RegistryServer(tmp / "registry")
    images: dict[str, Image] = {}
    try:
        registry.start()
        for name, files in (("x/img", FILES), ("x/ctrd", FILES2)):
            layout = tmp / name.replace("/", "-")
            rt.build_image(layout, files)
            rt.push_image(layout, registry.url, name)
            images[name] = Image(name, layout, _blobs_of(layout))
    except rt.RegistryUnavailable as e:
        registry.stop()
        pytest.skip(f"no registry testbed: {e}")
    procs = Procs()
    try:
        with (tmp / "sched.log").open("ab") as log:
            sched = procs.start(
                dfz_cmd("sched", "--listen", "tcp://127.0.0.1:0", "-v"), stdout=subprocess.PIPE, stderr=log
            )  # -v: host_announced
        scheduler = read_line(sched, "listening")
        mirrors, logs, data_dirs, metrics = [], [], [], []
        for name, seed in (("seed", True), ("d1", False), ("d2", False)):
            argv = dfz_cmd(
                "seed" if seed else "daemon",
                "--data-dir",
                str(tmp / name),
                "--scheduler",
                scheduler,
                "--api",
                f"tcp://127.0.0.1:{rt._free_port()}",
                "--proxy-listen",
                "127.0.0.1:0",
                "--mirror-upstream",
                registry.url,
                "--metrics-listen",
                "127.0.0.1:0",
                "-v",  # info events: the mirror logs each blob it serves (mirror.blob)
            )
            log_path = tmp / f"{name}.log"
            logs.append(log_path)
            data_dirs.append(tmp / name)
            with log_path.open("ab") as log:
                proc = procs.start(argv, stdout=subprocess.PIPE, stderr=log)
            try:
                metrics_url = read_line(proc, "metrics ")
                url = read_line(proc, "proxy ")
            except AssertionError:
                raise AssertionError(f"{name} did not start: {log_path.read_text()}") from None
            if not seed:
                mirrors.append(url)
                metrics.append(metrics_url)
        # Every host announced to the scheduler (its -v log says so): the seed is there from the first request.
        deadline = time.monotonic() + 20
        while (tmp / "sched.log").read_text().count("host_announced") < 3:
            assert time.monotonic() < deadline, (tmp / "sched.log").read_text()
            time.sleep(0.05)
        yield Cluster(registry, images, mirrors, logs, data_dirs, metrics)
    finally:
        procs.kill_all()
        registry.stop()


def blob_bytes(registry: Any, name: str, *, probes: bool = False) -> dict[str, int]:
    """Body bytes the registry wrote per blob digest of repository ``name`` (GET answers), less the 1-byte
    answers to the back-to-source client's length probe (``Range: bytes=0-0``, once per task) unless ``probes``."""
    out: dict[str, int] = {}
    for r in registry.responses():
        uri = str(r["uri"]).split("?")[0]
        prefix = f"/v2/{name}/blobs/"
        if uri.startswith(prefix) and r["method"] == "GET" and (probes or int(str(r["written"])) > 1):
            digest = uri[len(prefix) :]
            out[digest] = out.get(digest, 0) + int(str(r["written"]))
    return out


def proxy_samples(url: str) -> Counter[tuple[str, ...]]:
    """The ``dfz_proxy_*`` counters of a daemon's metrics: (name, label values in label order) -> value."""
    out: Counter[tuple[str, ...]] = Counter()
    text = httpx.get(url, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("dfz_proxy_") and sample.name.endswith("_total"):
                out[(sample.name, *sample.labels.values())] = int(sample.value)
    return out


# --- HTTP through the mirror ------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_mirror_http_blobs_manifests_ranges_and_errors(cluster: Cluster) -> None:
    image = cluster.images["x/img"]
    big = next(d for d, size in image.blobs.items() if size > 1 << 20)
    size = image.blobs[big]
    m1, m2 = cluster.mirrors
    before = proxy_samples(cluster.metrics[0])
    with httpx.Client(base_url=m1, timeout=30) as c:
        # The API probe without a login: the registry's own challenge, unchanged, marked as the origin's.
        r = c.get("/v2/")
        challenge = len(r.content)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic realm=")
        assert r.headers[ERROR_SOURCE_HEADER] == "origin"
        # A blob without a login is refused by the registry too, even when it is cached (checked below).
        # With the login: the manifest passes through (HEAD with its real length first, as containerd does).
        accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
        h = c.head("/v2/x/img/manifests/v1", auth=AUTH, headers=accept)
        r = c.get("/v2/x/img/manifests/v1", auth=AUTH, headers=accept)
        manifest = len(r.content)
        assert r.status_code == 200 and int(h.headers["content-length"]) == len(r.content) > 0
        assert json.loads(r.content)["layers"]
        # HEAD of a blob: its real length and digest, nothing downloaded.
        h = c.head(f"/v2/x/img/blobs/{big}", auth=AUTH)
        assert h.status_code == 200 and int(h.headers["content-length"]) == size
        assert h.headers["docker-content-digest"] == big
        assert blob_bytes(cluster.registry, "x/img").get(big, 0) == 0
        # A range of a blob: 206 with only those bytes (the task fills the cache meanwhile).
        r = c.get(f"/v2/x/img/blobs/{big}", auth=AUTH, headers={"Range": "bytes=1000-2999"})
        assert r.status_code == 206 and r.headers["content-range"] == f"bytes 1000-2999/{size}"
        layer = r.content
        assert len(layer) == 2000
        # The whole blob: its sha256 is its name.
        r = c.get(f"/v2/x/img/blobs/{big}", auth=AUTH)
        assert r.status_code == 200 and "sha256:" + hashlib.sha256(r.content).hexdigest() == big
        assert r.content[1000:3000] == layer and r.headers["docker-content-digest"] == big
        assert c.get(f"/v2/x/img/blobs/{big}", auth=AUTH, headers={"Range": f"bytes={size}-"}).status_code == 416
        # Cached, but a client without the login is still refused (the registry says so).
        r = c.get(f"/v2/x/img/blobs/{big}")
        assert r.status_code == 401 and r.headers[ERROR_SOURCE_HEADER] == "origin"
        # Errors: no such blob (the registry's 404), a push (the mirror is read-only), an unreachable upstream.
        r = c.get("/v2/x/img/blobs/sha256:" + "0" * 64, auth=AUTH)
        assert r.status_code == 404 and r.headers[ERROR_SOURCE_HEADER] == "origin"
        r = c.put("/v2/x/img/manifests/v2", auth=AUTH, content=b"{}")
        assert r.status_code == 405 and r.headers[ERROR_SOURCE_HEADER] == "proxy" and ERROR_HEADER.lower() in r.headers
        r = c.get("/v2/x/img/manifests/v1", headers={"X-Dfz-Registry": "127.0.0.1:9"})
        assert r.status_code == 502 and r.headers[ERROR_SOURCE_HEADER] == "origin"
        r = c.get("/v2/x/img/manifests/v1", headers={"X-Dfz-Registry": "not a host"})
        assert r.status_code == 400 and r.headers[ERROR_SOURCE_HEADER] == "proxy"
    served = blob_bytes(cluster.registry, "x/img").get(big, 0)
    assert served == size, f"the registry served {served} bytes of a {size}-byte blob"
    # The daemon's proxy metrics moved by these requests: blobs (HEAD, range, whole; 416, 401, 404) by route
    # mirror_blob, the rest (/v2/, HEAD and GET of the manifest; 405, 502, 400) by mirror_passthrough.
    moved = proxy_samples(cluster.metrics[0])
    moved.subtract(before)
    requests = "dfz_proxy_requests_total"
    assert {k: v for k, v in moved.items() if k[0] == requests and v} == {
        (requests, "mirror_blob", "2xx"): 3,
        (requests, "mirror_blob", "4xx"): 3,
        (requests, "mirror_passthrough", "2xx"): 2,
        (requests, "mirror_passthrough", "4xx"): 3,
        (requests, "mirror_passthrough", "5xx"): 1,
    }
    assert moved["dfz_proxy_response_bytes_total", "mirror_blob", "p2p"] == 2000 + size
    assert moved["dfz_proxy_response_bytes_total", "mirror_passthrough", "passthrough"] == challenge + manifest
    errors = "dfz_proxy_errors_total"
    assert (moved[errors, "origin"], moved[errors, "proxy"], moved[errors, "daemon"]) == (4, 3, 0)
    # The other daemon, asked through containerd's ?ns= form: from peers, not from the registry.
    host = cluster.registry.url.split("://", 1)[1]
    with httpx.Client(base_url=m2, timeout=30) as c:
        r = c.get(f"/v2/x/img/blobs/{big}", params={"ns": host}, auth=AUTH)
        assert r.status_code == 200 and "sha256:" + hashlib.sha256(r.content).hexdigest() == big
    assert blob_bytes(cluster.registry, "x/img").get(big, 0) == size


# --- skopeo ----------------------------------------------------------------------------------------------


def _oci_manifest_digest(layout: Path) -> str:
    return str(json.loads((layout / "index.json").read_text())["manifests"][0]["digest"])


@pytest.mark.timeout(120)
def test_skopeo_copies_an_image_through_the_mirror(cluster: Cluster, tmp_path: Path) -> None:
    """skopeo reads `registry.invalid:5000/x/img:v1`, a name that does not resolve, whose only mirror is the
    daemon's proxy port: a copy that works was served by the mirror. Then through the other daemon."""
    image = cluster.images["x/img"]
    for n, mirror in enumerate(cluster.mirrors):
        conf = tmp_path / f"registries-{n}.conf"
        conf.write_text(
            '[[registry]]\nlocation = "registry.invalid:5000"\ninsecure = true\n'
            f'[[registry.mirror]]\nlocation = "{mirror.split("://", 1)[1]}"\ninsecure = true\n'
        )
        # skopeo looks up a mirror's login by the mirror's host name (--src-creds is the registry's only).
        login = base64.b64encode(f"{rt.USER}:{rt.PASSWORD}".encode()).decode()
        auth = tmp_path / f"auth-{n}.json"
        auth.write_text(json.dumps({"auths": {mirror.split("://", 1)[1]: {"auth": login}}}))
        out = tmp_path / f"copy-{n}"
        argv = ["skopeo", "--registries-conf", str(conf), "copy", "--authfile", str(auth)]
        argv += ["docker://registry.invalid:5000/x/img:v1", f"oci:{out}:v1"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
        assert done.returncode == 0, done.stderr + "".join(p.read_text()[-3000:] for p in cluster.logs)
        assert _oci_manifest_digest(out) == _oci_manifest_digest(image.layout)
        assert _blobs_of(out) == image.blobs
        for digest in image.blobs:
            data = (out / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
            assert cluster.mirrored(n, digest)
    served = blob_bytes(cluster.registry, "x/img")
    # Each blob once in total over both copies (and the HTTP test before, if it ran).
    assert served == image.blobs, f"registry served {served}, blobs are {image.blobs}"


# --- containerd ------------------------------------------------------------------------------------------


def _install_containerd() -> None:
    missing = [
        pkg for cmd, pkg in (("containerd", "containerd"), ("ctr", "containerd"), ("runc", "runc")) if not shutil.which(cmd)
    ]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"containerd is not installed and cannot be here: apt-get install {' '.join(set(missing))}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *sorted(set(missing))]
    if subprocess.run(command, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"apt-get install containerd runc failed: {done.stderr[-300:]}")


def _start_containerd(procs: Procs, root: Path) -> str:
    """A containerd of its own (root, state, socket), with only what pulling an image needs."""
    root.mkdir(parents=True)
    sock = root / "c.sock"
    config = root / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{root / "root"}"\nstate = "{root / "state"}"\n'
        f'[grpc]\n  address = "{sock}"\n'
        f'[ttrpc]\n  address = "{sock}.ttrpc"\n'
        '[debug]\n  level = "warn"\n'
        '[metrics]\n  address = ""\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", '
        '"io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",'
        ' "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]\n'
    )
    # disabled_plugins is a top-level key: it must come before the first table.
    text = config.read_text()
    line = next(x for x in text.splitlines() if x.startswith("disabled_plugins"))
    config.write_text(line + "\n" + text.replace(line + "\n", ""))
    with (root / "containerd.log").open("ab") as log:
        proc = procs.start(["containerd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"containerd exited: {(root / 'containerd.log').read_text()[-2000:]}")
        if sock.exists():
            ok = subprocess.run(["ctr", "-a", str(sock), "version"], capture_output=True, timeout=10, check=False)
            if ok.returncode == 0:
                return str(sock)
        time.sleep(0.1)
    raise AssertionError(f"containerd did not serve: {(root / 'containerd.log').read_text()[-2000:]}")


@pytest.mark.timeout(150)
def test_two_containerd_pull_through_two_daemons(cluster: Cluster, short_tmp: str) -> None:
    """Two containerd instances pull the same image through the mirrors of two daemons of one cluster
    (hosts.toml names the mirror; containerd sends ?ns=REGISTRY): the registry serves each blob once in
    total."""
    _install_containerd()
    image = cluster.images["x/ctrd"]
    host = cluster.registry.url.split("://", 1)[1]
    procs = Procs()
    try:
        for n, mirror in enumerate(cluster.mirrors):
            root = Path(short_tmp) / f"c{n}"
            sock = _start_containerd(procs, root)
            certs = root / "certs.d" / host
            certs.mkdir(parents=True)
            (certs / "hosts.toml").write_text(
                f'server = "{cluster.registry.url}"\n\n[host."{mirror}"]\n  capabilities = ["pull", "resolve"]\n'
            )
            argv = ["ctr", "-a", sock, "-n", f"dfz{n}", "images", "pull", "--plain-http", "--hosts-dir", str(root / "certs.d")]
            argv += ["--user", f"{rt.USER}:{rt.PASSWORD}", f"{host}/x/ctrd:v1"]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + (root / "containerd.log").read_text()[-2000:]
            listed = subprocess.run(
                ["ctr", "-a", sock, "-n", f"dfz{n}", "images", "ls"], capture_output=True, text=True, timeout=30, check=False
            )
            assert f"{host}/x/ctrd:v1" in listed.stdout
            assert _oci_manifest_digest(image.layout) in listed.stdout
            assert all(cluster.mirrored(n, digest) for digest in image.blobs), "containerd did not pull through the mirror"
            served = blob_bytes(cluster.registry, "x/ctrd", probes=True)
            print(f"after containerd {n}: registry blob bytes (probes included) {served}; blob sizes {image.blobs}")
        # Both pulls: every blob's bytes once in total (the second containerd was served by peers).
        assert blob_bytes(cluster.registry, "x/ctrd") == image.blobs
    finally:
        procs.kill_all()


@pytest.mark.timeout(60)
def test_a_blob_that_does_not_match_its_digest_is_never_delivered_whole(cluster: Cluster) -> None:
    """An upstream (a plain HTTP origin, named by X-Dfz-Registry) that serves other bytes under a blob's digest:
    the client gets verified pieces but never the whole body (the connection closes before its end), or a
    502 from the origin; neither the seed nor the daemon keeps the wrong bytes under the digest's task."""
    from e2e_helpers import Route, serve_origin

    data = random.Random(13).randbytes(5 << 20)
    digest = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    path = f"/v2/x/bad/blobs/{digest}"
    with serve_origin({path: Route(data)}) as origin:
        registry = {"X-Dfz-Registry": origin.url}
        with httpx.Client(base_url=cluster.mirrors[0], timeout=30) as c:
            for _ in range(2):  # and again: nothing wrong was kept to be served from the cache
                got = b""
                with pytest.raises(httpx.HTTPError), c.stream("GET", path, headers=registry) as r:
                    assert r.status_code in (200, 502)
                    if r.status_code == 502:
                        assert r.headers[ERROR_SOURCE_HEADER] == "origin" and "digest" in r.headers[ERROR_HEADER]
                        raise httpx.HTTPError(r.headers[ERROR_HEADER])
                    for part in r.iter_bytes():
                        got += part
                assert len(got) < len(data) and data.startswith(got)
    tid = digest_task_id(digest)
    for data_dir in cluster.data_dirs:
        assert not (data_dir / "tasks" / tid).exists(), f"{data_dir.name} kept the wrong bytes"
    # The seed fetched it (triggered with the URL and the task id only) and checked it all the same.
    assert f"task={tid} state=failed kind=digest_mismatch" in cluster.logs[0].read_text()


@pytest.mark.timeout(60)
def test_bearer_token_auth_through_the_mirror(cluster: Cluster, tmp_path: Path) -> None:
    """A registry with a token service (tests/stub_origin.py): the mirror relays its Bearer challenge, the
    client fetches a token from the realm itself and sends it through the mirror, which uses it upstream
    (for the blob's HEAD, and for the download, whose redirect to storage on another host drops it)."""
    from stub_origin import running

    blob = random.Random(19).randbytes(300_000)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / digest).write_bytes(blob)
    with running(tmp_path, "--registry-login", "alice:s3cret") as base:
        registry = {"X-Dfz-Registry": base}
        gets: list[int] = []
        for mirror in cluster.mirrors:
            with httpx.Client(base_url=mirror, timeout=30) as c:
                r = c.get(f"/v2/team/app/blobs/{digest}", headers=registry)
                assert r.status_code == 401 and r.headers[ERROR_SOURCE_HEADER] == "origin"
                challenge = r.headers["www-authenticate"]
                assert challenge.startswith("Bearer realm=") and 'scope="repository:team/app:pull"' in challenge
                realm = challenge.split('realm="', 1)[1].split('"', 1)[0]
                token = httpx.get(
                    realm, params={"service": "stub-registry", "scope": "repository:team/app:pull"}, auth=("alice", "s3cret")
                ).json()["token"]
                bearer = {**registry, "Authorization": f"Bearer {token}"}
                h = c.head(f"/v2/team/app/blobs/{digest}", headers=bearer)
                assert h.status_code == 200 and int(h.headers["content-length"]) == len(blob)
                r = c.get(f"/v2/team/app/blobs/{digest}", headers=bearer)
                assert r.status_code == 200 and r.content == blob
                r = c.get(f"/v2/team/app/blobs/{digest}", headers={**registry, "Authorization": "Bearer forged"})
                assert r.status_code == 401
                gets.append(storage_gets(tmp_path / "origin.log", digest))
    # The first daemon's seed read the blob from storage; the second daemon got it from peers.
    assert gets[0] > 0 and gets[1] == gets[0], (tmp_path / "origin.log").read_text()


def storage_gets(log: Path, digest: str) -> int:
    return sum(1 for line in log.read_text().splitlines() if line.startswith(f"GET /storage/{digest}"))
