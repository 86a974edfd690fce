"""Package repositories for the forward-proxy tests: nginx serving a PEP 503 simple index (pip), a flat apt
repository (apt-get) and a Maven repository layout (``mvn dependency:get``), each with one small package
built here, offline.

* the wheel ``dfzprobe-1.0-py3-none-any.whl`` is written with :mod:`zipfile` (METADATA, WHEEL, RECORD
  with sha256 digests, as the wheel format says), with a module and a data file of random bytes;
* the Debian package ``dfz-probe_1.0_all.deb`` is built with ``dpkg-deb --build`` (one data file under
  ``/usr/share/dfz-probe``, no dependencies, no maintainer scripts) and indexed with ``dpkg-scanpackages``
  into ``apt/Packages``, with a ``Release`` file made here (checksums of ``Packages``): a flat repository
  used as ``deb [trusted=yes] URL/apt ./``;
* the Maven artifact ``org.dfz.probe:dfz-probe:1.0`` is a ``.pom`` and a ``.jar`` with their ``.sha1`` and
  ``.md5`` files, under ``maven/org/dfz/probe/dfz-probe/1.0/``.

Maven itself needs its dependency plugin, which this machine cannot fetch (no Maven registry is reached):
Debian packages it (``libmaven-dependency-plugin-java``, in ``/usr/share/maven-repo``; it also needs
``junit4``'s entry there), and :func:`maven_settings` points Maven's ``central`` at that directory, so
only the artifact under test travels over HTTP (through the proxy).

Debian packages used: ``nginx-light``, ``dpkg-dev`` (``dpkg-scanpackages``), ``maven``,
``libmaven-dependency-plugin-java``, ``junit4``; installed with apt-get when missing and root
(:func:`install`). nginx logs every request as ``URI STATUS BODY_BYTES "VIA"`` (:meth:`RepoServer.served`;
``VIA`` is the request's ``Via`` header: the proxy adds ``1.1 dfz``).

    python scripts/proxy_testbed.py start DIR   # builds the repositories, prints the URLs, serves until Ctrl-C
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

WHEEL_NAME = "dfzprobe"
WHEEL_VERSION = "1.0"
WHEEL_FILE = f"{WHEEL_NAME}-{WHEEL_VERSION}-py3-none-any.whl"
DEB_NAME = "dfz-probe"
DEB_FILE = f"{DEB_NAME}_1.0_all.deb"
MAVEN_GROUP, MAVEN_ARTIFACT, MAVEN_VERSION = "org.dfz.probe", "dfz-probe", "1.0"
MAVEN_DIR = f"maven/{MAVEN_GROUP.replace('.', '/')}/{MAVEN_ARTIFACT}/{MAVEN_VERSION}"
MAVEN_JAR = f"{MAVEN_DIR}/{MAVEN_ARTIFACT}-{MAVEN_VERSION}.jar"
MAVEN_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.5.0"
DEBIAN_MAVEN_REPO = Path("/usr/share/maven-repo")
APT_TIMEOUT = 500
"""Seconds for one apt-get run (Maven and its plugin bring Java libraries with them)."""

PACKAGES = {
    "nginx": "nginx-light",
    "dpkg-scanpackages": "dpkg-dev",
    "mvn": "maven",
    str(DEBIAN_MAVEN_REPO / "org/apache/maven/plugins/maven-dependency-plugin/3.5.0"): "libmaven-dependency-plugin-java",
    str(DEBIAN_MAVEN_REPO / "junit/junit/4.x"): "junit4",
}
"""A command (or a path) -> the Debian package that provides it."""


class TestbedUnavailable(Exception):
    """The testbed cannot be installed or built here; the message says why."""


def _present(what: str) -> bool:
    return os.path.exists(what) if what.startswith("/") else shutil.which(what) is not None


def install() -> None:
    """Install the Debian packages of :data:`PACKAGES` that are missing (root only; ``apt-get update`` when
    an install fails on stale lists)."""
    missing = sorted({pkg for what, pkg in PACKAGES.items() if not _present(what)})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise TestbedUnavailable(f"missing Debian packages {', '.join(missing)} (apt-get install -y them as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=120", *missing]
    try:
        if subprocess.run(command, env=env, capture_output=True, timeout=APT_TIMEOUT, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=APT_TIMEOUT, check=False)
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT, check=False)
        else:
            done = subprocess.CompletedProcess(command, 0, "", "")
    except subprocess.TimeoutExpired:
        raise TestbedUnavailable(f"apt-get install {' '.join(missing)} took more than {APT_TIMEOUT} s") from None
    if done.returncode != 0:
        raise TestbedUnavailable(f"apt-get install {' '.join(missing)} failed: {done.stderr.strip()[-500:]}")
    still = sorted(what for what in PACKAGES if not _present(what))
    if still:
        raise TestbedUnavailable(f"installed, but {', '.join(still)} still missing")


# --- the packages -----------------------------------------------------------------------------------------


def _sha256_b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(directory: Path, payload: bytes) -> Path:
    """A pure-Python wheel of :data:`WHEEL_NAME` whose package holds ``payload`` as ``data.bin``."""
    dist = f"{WHEEL_NAME}-{WHEEL_VERSION}.dist-info"
    files = {
        f"{WHEEL_NAME}/__init__.py": b'"""A package built by the dfz proxy tests."""\n\nVERSION = "1.0"\n',
        f"{WHEEL_NAME}/data.bin": payload,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {WHEEL_NAME}\nVersion: {WHEEL_VERSION}\nSummary: dfz test\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: dfz-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}/top_level.txt": f"{WHEEL_NAME}\n".encode(),
    }
    record = "".join(f"{name},sha256={_sha256_b64(data)},{len(data)}\n" for name, data in files.items()) + f"{dist}/RECORD,,\n"
    path = directory / WHEEL_FILE
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr(f"{dist}/RECORD", record)
    return path


def build_simple_index(www: Path, payload: bytes) -> Path:
    """``www/simple/`` (PEP 503) listing the wheel in ``www/packages/``; returns the wheel."""
    wheel = build_wheel(www / "packages", payload)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (www / "simple" / WHEEL_NAME).mkdir(parents=True, exist_ok=True)
    (www / "simple" / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="{WHEEL_NAME}/">{WHEEL_NAME}</a></body></html>\n'
    )
    (www / "simple" / WHEEL_NAME / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="../../packages/{WHEEL_FILE}#sha256={digest}">{WHEEL_FILE}</a></body></html>\n'
    )
    return wheel


def build_apt_repo(www: Path, payload: bytes, work: Path) -> Path:
    """``www/apt/``: :data:`DEB_FILE` (built with dpkg-deb), ``Packages`` (dpkg-scanpackages), ``Release``."""
    root = work / "deb-root"
    (root / "DEBIAN").mkdir(parents=True, exist_ok=True)
    (root / "usr/share" / DEB_NAME).mkdir(parents=True, exist_ok=True)
    (root / "usr/share" / DEB_NAME / "data.bin").write_bytes(payload)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {DEB_NAME}\nVersion: 1.0\nArchitecture: all\nMaintainer: dfz tests <dfz@localhost>\n"
        "Section: misc\nPriority: optional\nDescription: dfz proxy test package\n"
        " A data file, installed and removed by the dfz proxy tests.\n"
    )
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    repo = www / "apt"
    repo.mkdir(parents=True, exist_ok=True)
    deb = repo / DEB_FILE
    done = subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise TestbedUnavailable(f"dpkg-deb --build failed: {done.stderr.strip()[-300:]}")
    scan = subprocess.run(["dpkg-scanpackages", "-m", ".", "/dev/null"], cwd=repo, capture_output=True, check=False)
    if scan.returncode != 0:
        raise TestbedUnavailable(f"dpkg-scanpackages failed: {scan.stderr.decode(errors='replace')[-300:]}")
    (repo / "Packages").write_bytes(scan.stdout)
    packages = scan.stdout
    date = time.strftime("%a, %d %b %Y %H:%M:%S UTC", time.gmtime())
    (repo / "Release").write_text(
        f"Origin: dfz-tests\nLabel: dfz-tests\nSuite: local\nCodename: local\nDate: {date}\nArchitectures: all amd64\n"
        f"MD5Sum:\n {hashlib.md5(packages).hexdigest()} {len(packages)} Packages\n"
        f"SHA256:\n {hashlib.sha256(packages).hexdigest()} {len(packages)} Packages\n"
    )
    return deb


def build_maven_repo(www: Path, payload: bytes) -> Path:
    """``www/maven/``: the artifact's ``.pom`` and ``.jar`` with ``.sha1`` and ``.md5`` checksum files."""
    directory = www / MAVEN_DIR
    directory.mkdir(parents=True, exist_ok=True)
    pom = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
        f"  <modelVersion>4.0.0</modelVersion>\n  <groupId>{MAVEN_GROUP}</groupId>\n"
        f"  <artifactId>{MAVEN_ARTIFACT}</artifactId>\n  <version>{MAVEN_VERSION}</version>\n"
        "  <packaging>jar</packaging>\n</project>\n"
    ).encode()
    jar = io.BytesIO()
    with zipfile.ZipFile(jar, "w", zipfile.ZIP_STORED) as z:
        z.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\nCreated-By: dfz-tests\n")
        z.writestr("org/dfz/probe/data.bin", payload)
    base = f"{MAVEN_ARTIFACT}-{MAVEN_VERSION}"
    for name, data in ((f"{base}.pom", pom), (f"{base}.jar", jar.getvalue())):
        (directory / name).write_bytes(data)
        (directory / f"{name}.sha1").write_text(hashlib.sha1(data).hexdigest())
        (directory / f"{name}.md5").write_text(hashlib.md5(data).hexdigest())
    return directory / f"{base}.jar"


def maven_settings(path: Path, proxy_host: str, proxy_port: int) -> Path:
    """A ``settings.xml``: HTTP through the proxy at ``proxy_host:proxy_port`` (every host, loopback
    included), and ``central`` mirrored by Debian's ``/usr/share/maven-repo`` (the dependency plugin)."""
    path.write_text(
        f"""<settings xmlns="http://maven.apache.org/SETTINGS/1.0.0">
  <proxies>
    <proxy><id>dfz</id><active>true</active><protocol>http</protocol>
      <host>{proxy_host}</host><port>{proxy_port}</port><nonProxyHosts>dfz-none.invalid</nonProxyHosts></proxy>
  </proxies>
  <mirrors>
    <mirror><id>debian</id><mirrorOf>central</mirrorOf><url>file://{DEBIAN_MAVEN_REPO}</url></mirror>
  </mirrors>
</settings>
"""
    )
    return path


# --- nginx --------------------------------------------------------------------------------------------


@dataclass
class RepoServer:
    """nginx on a free port of 127.0.0.1 serving ``DIR/www``, logging ``URI STATUS BODY_BYTES "VIA"`` per request."""

    dir: Path
    tls: tuple[Path, Path] | None = None
    """A certificate and its key (PEM) for 127.0.0.1: nginx also serves HTTPS, on :attr:`tls_port`."""
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    tls_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"https://127.0.0.1:{self.tls_port}"

    @property
    def log(self) -> Path:
        return self.dir / "access.log"

    def start(self) -> RepoServer:
        nginx = benchlib.ensure_nginx()
        self.port = benchlib.free_port()
        root = self.dir
        tls = ""
        if self.tls is not None:
            self.tls_port = benchlib.free_port()
            cert, key = self.tls
            tls = f"listen 127.0.0.1:{self.tls_port} ssl;\n        ssl_certificate {cert};\n        ssl_certificate_key {key};"
        (root / "www").mkdir(parents=True, exist_ok=True)
        conf = root / "nginx.conf"
        conf.write_text(
            f"""
worker_processes 1;
daemon off;
user root;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 256; }}
http {{
    types {{ text/html html; application/octet-stream whl deb jar; text/xml pom; }}
    log_format paths '$uri $status $body_bytes_sent "$http_via"';
    access_log {self.log} paths;
    client_body_temp_path {root}/tmp-body;
    proxy_temp_path {root}/tmp-proxy;
    fastcgi_temp_path {root}/tmp-fastcgi;
    uwsgi_temp_path {root}/tmp-uwsgi;
    scgi_temp_path {root}/tmp-scgi;
    server {{
        listen 127.0.0.1:{self.port};
        {tls}
        root {root}/www;
        autoindex on;
    }}
}}
"""
        )
        self.proc = subprocess.Popen([nginx, "-p", str(root), "-c", str(conf), "-e", f"{root}/error.log"])
        try:
            benchlib.wait_port(self.port)
            if self.tls_port:
                benchlib.wait_port(self.tls_port)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def requests(self) -> list[tuple[str, int, int, str]]:
        """Every request logged so far: (URI, status, body bytes sent, Via header or "")."""
        try:
            lines = self.log.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            parts = line.split(" ", 3)
            if len(parts) == 4 and parts[1].isdigit() and parts[2].isdigit():
                via = parts[3].strip().strip('"')
                out.append((parts[0], int(parts[1]), int(parts[2]), "" if via == "-" else via))
        return out

    def served(self, path: str | None = None) -> dict[str, int]:
        """Body bytes nginx sent per URI (only ``path`` when given), from its access log so far."""
        out: dict[str, int] = {}
        for uri, _status, sent, _via in self.requests():
            if path is None or uri == path:
                out[uri] = out.get(uri, 0) + sent
        return out

    def settled(self, path: str, quiet: float = 0.3, timeout: float = 5.0) -> int:
        """Bytes served for ``path`` once the log stopped growing for ``quiet`` s (nginx logs a request
        after its last byte, a moment after the client has it)."""
        last = self.served(path).get(path, 0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = self.served(path).get(path, 0)
            if now == last:
                return now
            last = now
        return last


def build_all(root: Path, size: int = 256 * 1024) -> dict[str, Path]:
    """Every repository under ``root/www``, each package carrying ``size`` random bytes of its own."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    www = root / "www"
    return {
        "wheel": build_simple_index(www, os.urandom(size)),
        "deb": build_apt_repo(www, os.urandom(size), root),
        "jar": build_maven_repo(www, os.urandom(size)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["start"])
    ap.add_argument("dir", type=Path)
    args = ap.parse_args()
    install()
    built = build_all(args.dir)
    server = RepoServer(args.dir).start()
    print(f"pip    --index-url {server.url}/simple/ {WHEEL_NAME}   ({built['wheel'].stat().st_size} bytes)")
    print(f"apt    deb [trusted=yes] {server.url}/apt ./   ({DEB_NAME}, {built['deb'].stat().st_size} bytes)")
    print(f"maven  {server.url}/maven  {MAVEN_GROUP}:{MAVEN_ARTIFACT}:{MAVEN_VERSION}   ({built['jar'].stat().st_size} bytes)")
    print(f"log    {server.log}", flush=True)
    try:
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
