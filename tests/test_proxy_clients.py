"""The forward proxy of real daemons with real clients: curl, pip, apt-get and Maven fetch packages from a
local nginx through daemon A's proxy port, then again through daemon B's; the second fetch is served by
peers (the origin's access log shows no new bytes for the package).

One cluster for the module: ``dfz sched``, ``dfz seed`` and two ``dfz daemon`` processes, each daemon with
its own proxy port and the rules ``\\.whl$``, ``\\.deb$``, ``\\.jar$``, ``/p2p/``. The repositories are
built and served by scripts/proxy_testbed.py (its Debian packages installed when missing and root).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_helpers import Procs, dfz_cmd, read_line
from proxy_helpers import CAFiles, curl, make_ca, make_leaf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import proxy_testbed as bed

pytestmark = pytest.mark.timeout(600)  # the first test's setup may install Debian packages (testbed.install)

RULES = (r"\.whl$", r"\.deb$", r"\.jar$", r"/p2p/")


@dataclass
class World:
    root: Path
    repo: bed.RepoServer
    proxies: dict[str, str]
    """Daemon name (``a``, ``b``) -> its proxy port's URL."""
    built: dict[str, Path]
    operator_ca: CAFiles
    """The CA the daemons intercept HTTPS to 127.0.0.1 with (the origin's own CA is another)."""

    def env(self) -> dict[str, str]:
        """The environment of a client: no proxy, pip settings or CA bundle from the outside (requests takes
        ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` over pip's ``--cert``), no pip configuration file."""
        drop = {"http_proxy", "https_proxy", "no_proxy", "all_proxy", "requests_ca_bundle", "curl_ca_bundle"}
        kept = {k: v for k, v in os.environ.items() if k.lower() not in drop and not k.startswith("PIP_")}
        return kept | {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_CACHE_DIR": "1"}


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    try:
        bed.install()
    except bed.TestbedUnavailable as e:
        pytest.skip(f"proxy testbed unavailable: {e}")
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="dfz-px-", dir="/tmp") as d:
        root = Path(d)
        built = bed.build_all(root / "repo")
        origin_ca, operator_ca = make_ca(root / "pki", "origin-ca"), make_ca(root / "pki", "operator-ca")
        leaf = make_leaf(origin_ca, root / "pki")
        (root / "pki").chmod(0o755)
        repo = bed.RepoServer(root / "repo", tls=(leaf.cert, leaf.key)).start()
        try:
            with (root / "sched.log").open("ab") as log:
                sched = procs.start(dfz_cmd("sched", "--listen", "tcp://127.0.0.1:0"), stdout=subprocess.PIPE, stderr=log)
            scheduler = read_line(sched, "listening")
            proxies: dict[str, str] = {}
            for name in ("seed", "a", "b"):
                argv = dfz_cmd("seed" if name == "seed" else "daemon", "--data-dir", str(root / name), "--scheduler", scheduler)
                argv += ["--http-ca-bundle", str(origin_ca.cert)]  # the peers that go to the origin trust it
                if name != "seed":
                    argv += ["--proxy-listen", "127.0.0.1:0", *[x for rule in RULES for x in ("--proxy-rule", rule)]]
                    argv += ["--proxy-connect-allow", r"127\.0\.0\.1:\d+", "--proxy-intercept", r"127\.0\.0\.1"]
                    argv += ["--proxy-ca-cert", str(operator_ca.cert), "--proxy-ca-key", str(operator_ca.key)]
                with (root / f"{name}.log").open("ab") as log:
                    proc = procs.start(argv, stdout=subprocess.PIPE, stderr=log)
                if name == "seed":
                    read_line(proc, "api ")
                else:
                    proxies[name] = read_line(proc, "proxy ")
            yield World(root, repo, proxies, built, operator_ca)
        finally:
            procs.kill_all()
            repo.stop()


def _second_fetch_from_peers(world: World, uri: str, size: int, fetch: Callable[[str], None]) -> tuple[int, int]:
    """Fetch through daemon A then B (``fetch(name)``); the origin's body bytes for ``uri`` during each."""
    before = world.repo.settled(uri)
    began = time.monotonic()
    fetch("a")
    took_a = time.monotonic() - began
    first = world.repo.settled(uri) - before
    assert size <= first <= size + 1024, f"the origin served {first} bytes of {uri} ({size} bytes) for the first fetch"
    began = time.monotonic()
    fetch("b")
    took_b = time.monotonic() - began
    second = world.repo.settled(uri) - before - first
    print(
        f"\n{uri}: {size} bytes; origin body bytes for the fetch via A: {first} ({took_a:.2f} s), "
        f"via B: {second} ({took_b:.2f} s)"
    )
    assert second == 0, f"the second fetch (daemon B) took {second} bytes of {uri} from the origin"
    return first, second


def test_curl_p2p_and_pass_through(world: World) -> None:
    data = os.urandom(3 << 20)
    (world.repo.dir / "www" / "p2p").mkdir(exist_ok=True)
    (world.repo.dir / "www" / "p2p" / "blob.bin").write_bytes(data)
    (world.repo.dir / "www" / "plain.txt").write_bytes(b"plain text, passed through\n" * 10)
    url = f"{world.repo.url}/p2p/blob.bin"

    def fetch(name: str) -> None:
        r = curl(url, proxy=world.proxies[name])
        assert (r.returncode, r.status) == (0, 200), r.stderr
        assert r.body == data

    _second_fetch_from_peers(world, "/p2p/blob.bin", len(data), fetch)
    ranged = curl(url, "-r", "1000-1999", proxy=world.proxies["b"])
    assert (ranged.status, ranged.body) == (206, data[1000:2000])
    plain = curl(f"{world.repo.url}/plain.txt", proxy=world.proxies["b"])
    assert (plain.status, plain.body) == (200, b"plain text, passed through\n" * 10)
    assert [via for uri, _, _, via in world.repo.requests() if uri == "/plain.txt"] == ["1.1 dfz"]
    missing = curl(f"{world.repo.url}/p2p/missing.bin", proxy=world.proxies["a"])
    assert missing.status == 404
    assert missing.headers["x-dfz-error-source"] == "origin"
    down = curl("http://127.0.0.1:9/p2p/x.bin", proxy=world.proxies["a"])
    assert down.status >= 500 and down.headers["x-dfz-error-source"] == "origin", (down.status, down.headers)


def test_pip_installs_from_a_simple_index_through_the_proxy(world: World) -> None:
    wheel = world.built["wheel"]
    with zipfile.ZipFile(wheel) as z:
        payload = z.read(f"{bed.WHEEL_NAME}/data.bin")

    def fetch(name: str) -> None:
        target = world.root / f"pip-{name}"
        done = subprocess.run(
            [
                *[sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-cache-dir"],
                *["--index-url", f"{world.repo.url}/simple/", "--proxy", world.proxies[name], "--target", str(target)],
                bed.WHEEL_NAME,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=world.env(),
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert (target / bed.WHEEL_NAME / "data.bin").read_bytes() == payload

    uri = f"/packages/{bed.WHEEL_FILE}"
    _second_fetch_from_peers(world, uri, wheel.stat().st_size, fetch)
    index = [via for u, _, _, via in world.repo.requests() if u.startswith(f"/simple/{bed.WHEEL_NAME}/")]
    assert index[-2:] == ["1.1 dfz", "1.1 dfz"]  # the index page passed through, once per install


def test_pip_installs_over_https_intercepted_by_the_proxy(world: World) -> None:
    """pip trusts the operator's CA (``--cert``); the daemons decrypt the tunnels to 127.0.0.1 and send the
    https:// wheel P2P like an http:// one, and pass the index through to the origin over TLS."""
    wheel = world.built["wheel"]

    def fetch(name: str) -> None:
        target = world.root / f"pip-tls-{name}"
        done = subprocess.run(
            [
                *[sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-cache-dir"],
                *["--index-url", f"{world.repo.tls_url}/simple/", "--proxy", world.proxies[name]],
                *["--cert", str(world.operator_ca.cert), "--target", str(target), bed.WHEEL_NAME],
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=world.env(),
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert (target / bed.WHEEL_NAME / "__init__.py").exists()

    requests_before = len(world.repo.requests())
    _second_fetch_from_peers(world, f"/packages/{bed.WHEEL_FILE}", wheel.stat().st_size, fetch)
    index = [via for u, _, _, via in world.repo.requests()[requests_before:] if u.startswith(f"/simple/{bed.WHEEL_NAME}/")]
    assert index == ["1.1 dfz", "1.1 dfz"]  # read inside the tunnel by the proxy, which added itself to Via


@pytest.mark.skipif(os.geteuid() != 0, reason="apt-get install needs root")
def test_apt_get_installs_from_a_local_repository_through_the_proxy(world: World) -> None:
    deb = world.built["deb"]
    installed = Path("/usr/share") / bed.DEB_NAME / "data.bin"
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["dpkg-deb", "-x", str(deb), d], check=True)
        payload = (Path(d) / "usr/share" / bed.DEB_NAME / "data.bin").read_bytes()
    env = world.env() | {"DEBIAN_FRONTEND": "noninteractive"}

    def apt(name: str, *args: str) -> None:
        sandbox = world.root / f"apt-{name}"
        for sub in ("lists/partial", "cache/archives/partial"):
            (sandbox / sub).mkdir(parents=True, exist_ok=True)
        (sandbox / "sources.list").write_text(f"deb [trusted=yes] {world.repo.url}/apt ./\n")
        options = {
            "Dir::Etc::sourcelist": sandbox / "sources.list",
            "Dir::Etc::sourceparts": "/dev/null",
            "Dir::State::Lists": sandbox / "lists",
            "Dir::Cache": sandbox / "cache",
            "Acquire::http::Proxy": world.proxies[name],
            "DPkg::Lock::Timeout": 120,
        }
        argv = ["apt-get", *[x for k, v in options.items() for x in ("-o", f"{k}={v}")], *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=150, env=env, check=False)
        assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stdout}\n{done.stderr}"

    def fetch(name: str) -> None:
        apt(name, "update")
        apt(name, "install", "-y", "--no-install-recommends", bed.DEB_NAME)
        try:
            assert installed.read_bytes() == payload
        finally:
            subprocess.run(["dpkg", "--purge", bed.DEB_NAME], capture_output=True, timeout=150, check=False)
        assert not installed.exists()

    try:
        _second_fetch_from_peers(world, f"/apt/{bed.DEB_FILE}", deb.stat().st_size, fetch)
    finally:
        subprocess.run(["dpkg", "--purge", bed.DEB_NAME], capture_output=True, timeout=150, check=False)


def test_maven_fetches_an_artifact_through_the_proxy(world: World) -> None:
    jar = world.built["jar"]
    if shutil.which("mvn") is None:
        pytest.skip("mvn is not installed")

    def fetch(name: str) -> None:
        host, port = world.proxies[name].removeprefix("http://").rsplit(":", 1)
        settings = bed.maven_settings(world.root / f"settings-{name}.xml", host, int(port))
        local = world.root / f"m2-{name}"
        argv = [
            *["mvn", "-B", "-q", "-s", str(settings), f"-Dmaven.repo.local={local}", f"{bed.MAVEN_PLUGIN}:get"],
            f"-Dartifact={bed.MAVEN_GROUP}:{bed.MAVEN_ARTIFACT}:{bed.MAVEN_VERSION}",
            "-Dtransitive=false",
            f"-DremoteRepositories=dfz::default::{world.repo.url}/maven",
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=100, env=world.env(), check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        fetched = local / bed.MAVEN_DIR.removeprefix("maven/") / jar.name
        assert hashlib.sha256(fetched.read_bytes()).digest() == hashlib.sha256(jar.read_bytes()).digest()

    uri = "/" + bed.MAVEN_JAR
    _second_fetch_from_peers(world, uri, jar.stat().st_size, fetch)
    pom = [via for u, _, _, via in world.repo.requests() if u.endswith(".pom")]
    assert pom == ["1.1 dfz", "1.1 dfz"]
