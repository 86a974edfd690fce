"""A throw-away OCI registry for the preheat tests: Debian's ``docker-registry`` (distribution 2.8) with
htpasswd basic auth, and an image built offline with ``umoci`` and pushed with ``skopeo``.

The Debian packages ``docker-registry``, ``umoci``, ``skopeo`` and ``apache2-utils`` (its ``htpasswd``
makes the bcrypt password file the registry wants) are installed with ``apt-get`` when missing and we are
root (``apt-get update`` first when the package lists are stale). The registry runs on a free port of
127.0.0.1 with a filesystem root in a directory of ours; its access log (one line per request, with the
bytes written) is its stderr, in ``DIR/registry.log``.

    python scripts/registry_testbed.py start DIR   # prints http://127.0.0.1:PORT user password, then waits

As a library: ``RegistryServer(DIR).start()``, ``.stop()``, ``.blob_bytes_served()``; :func:`build_image`,
:func:`push_image`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = {"docker-registry": "docker-registry", "umoci": "umoci", "skopeo": "skopeo", "htpasswd": "apache2-utils"}
"""Command -> the Debian package that has it."""
USER = "dfz"
PASSWORD = "registry-secret"


class RegistryUnavailable(Exception):
    """The registry testbed cannot be installed or started here; the message says why."""


def install() -> None:
    """Make sure every command of :data:`PACKAGES` exists, installing the missing packages (root only)."""
    missing = sorted({pkg for cmd, pkg in PACKAGES.items() if shutil.which(cmd) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise RegistryUnavailable(
            f"{', '.join(missing)} not installed and this is not root: apt-get install -y {' '.join(missing)}"
        )
    if shutil.which("apt-get") is None:
        raise RegistryUnavailable(f"{', '.join(missing)} not installed and there is no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(command, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RegistryUnavailable(f"apt-get install {' '.join(missing)} failed: {done.stderr.strip()[-500:]}")
    still = sorted(cmd for cmd in PACKAGES if shutil.which(cmd) is None)
    if still:
        raise RegistryUnavailable(f"installed, but {', '.join(still)} still not found")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RegistryServer:
    """``docker-registry serve`` on 127.0.0.1 with basic auth (:data:`USER` / :data:`PASSWORD`)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.dir / "registry.log"

    def start(self, timeout: float = 20.0) -> str:
        install()
        self.dir.mkdir(parents=True, exist_ok=True)
        htpasswd = self.dir / "htpasswd"
        made = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], capture_output=True, text=True, check=False)
        if made.returncode != 0:
            raise RegistryUnavailable(f"htpasswd failed: {made.stderr.strip()}")
        htpasswd.write_text(made.stdout)
        self.port = _free_port()
        config = self.dir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  formatter: json\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.dir / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n"
            f"auth:\n  htpasswd:\n    realm: dfz-test\n    path: {htpasswd}\n"
        )
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["docker-registry", "serve", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RegistryUnavailable(f"docker-registry exited ({self.proc.returncode}): {self.log.read_text()[-1000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self.url
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RegistryUnavailable(f"docker-registry did not listen on port {self.port} within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def responses(self) -> list[dict[str, object]]:
        """Every request the registry finished, from its log: method, uri, status and bytes written."""
        out: list[dict[str, object]] = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict) or entry.get("msg") != "response completed":
                continue
            out.append(
                {
                    "method": entry.get("http.request.method"),
                    "uri": entry.get("http.request.uri"),
                    "status": entry.get("http.response.status"),
                    "written": int(entry.get("http.response.written") or 0),
                }
            )
        return out

    def blob_bytes_served(self) -> int:
        """Body bytes the registry wrote in answers to blob requests (``/v2/<name>/blobs/<digest>``)."""
        return sum(int(str(r["written"])) for r in self.responses() if re.search(r"/blobs/sha256:", str(r["uri"])))


def build_image(layout: Path, files: dict[str, bytes], tag: str = "v1", arch: str = "amd64") -> None:
    """An OCI image layout at ``layout`` (tag ``tag``): one layer per file (``/data/NAME``), linux/``arch``."""
    install()
    work = layout.parent / f"{layout.name}-rootfs"

    def run(*argv: str) -> None:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RegistryUnavailable(f"{' '.join(argv[:3])} failed: {done.stderr.strip()[-500:]}")

    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", f"{layout}:{tag}")
    for name, data in files.items():
        src = work / name
        src.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
        run("umoci", "insert", "--image", f"{layout}:{tag}", str(src), f"/data/{name}")
    run("umoci", "config", "--image", f"{layout}:{tag}", "--architecture", arch, "--os", "linux")


def push_image(layout: Path, registry_url: str, name: str, tag: str = "v1") -> None:
    """Push ``layout:tag`` to ``registry_url`` as ``name:tag`` with skopeo (plain HTTP, basic auth)."""
    host = registry_url.split("://", 1)[1]
    argv = ["skopeo", "copy", "--dest-tls-verify=false", "--dest-creds", f"{USER}:{PASSWORD}"]
    argv += [f"oci:{layout}:{tag}", f"docker://{host}/{name}:{tag}"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RegistryUnavailable(f"skopeo copy failed: {done.stderr.strip()[-500:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start"])
    parser.add_argument("dir")
    args = parser.parse_args()
    server = RegistryServer(args.dir)
    try:
        url = server.start()
    except RegistryUnavailable as e:
        print(f"registry unavailable: {e}", file=sys.stderr)
        return 1
    print(url, USER, PASSWORD, flush=True)
    try:
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
