"""Small origins that tests start as real processes on 127.0.0.1 (an ephemeral port, printed as the first
line of stdout): the Hugging Face Hub's file layout and tree API, and a WebHDFS namenode with its datanode.
They serve the real files of a directory, honour Range, and require the token / user they are given.

    python tests/stub_origin.py ROOT [--hub-token T] [--hdfs-user U] [--hdfs-delegation D]

* Hub (``ROOT/hub/OWNER/REPO/REVISION/PATH``): ``GET /OWNER/REPO/resolve/REVISION/PATH`` serves the file;
  a file over 64 KiB is answered, like the Hub's LFS files, with a 302 to ``http://localhost:PORT/cdn/...``
  (another host name), which refuses requests that carry an Authorization header (as signed storage URLs
  do). ``GET /api/models/OWNER/REPO/tree/REVISION[/PATH]?recursive=1`` lists files, two per page, with a
  ``Link: <...>; rel="next"`` header. With ``--hub-token``, the resolve and tree calls want
  ``Authorization: Bearer T`` (401 otherwise).
* WebHDFS (``ROOT/hdfs/PATH``): ``GET /webhdfs/v1/PATH?op=GETFILESTATUS|LISTSTATUS`` and ``op=OPEN`` (a 307
  to ``http://localhost:PORT/datanode/webhdfs/v1/PATH?op=OPEN&offset=&length=``, as a namenode sends a
  client to a datanode); errors are ``RemoteException`` JSON. ``--hdfs-user`` / ``--hdfs-delegation``:
  the namenode wants ``user.name=U`` / ``delegation=D`` (401 otherwise).
* A registry with token auth (``ROOT/registry/DIGEST``): ``/v2/NAME/blobs/DIGEST`` wants
  ``Authorization: Bearer`` with a token for ``repository:NAME:pull`` from ``/token`` (which wants the
  ``--registry-login`` ``user:password`` as Basic auth), else 401 with a ``WWW-Authenticate: Bearer``
  challenge; with it, a 307 to ``http://localhost:PORT/storage/DIGEST`` (another host name, refusing
  Authorization, honouring Range), as registries send blobs to their storage.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

LFS_FROM = 64 * 1024
PAGE = 2


class Handler(BaseHTTPRequestHandler):
    server: Origin
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else ''}\n")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if ".." in path.split("/"):
            return self.send_json(400, {"error": "bad path"})
        if path.startswith("/webhdfs/v1/"):
            return self.namenode(path[len("/webhdfs/v1") :], query)
        if path.startswith("/datanode/webhdfs/v1/"):
            return self.datanode(path[len("/datanode/webhdfs/v1") :], query)
        if path == "/token" or path.startswith(("/v2/", "/storage/")):
            return self.registry(path, query)
        if path.startswith("/cdn/"):
            if self.headers.get("Authorization"):
                return self.send_json(400, {"error": "a signed URL takes no Authorization header"})
            return self.send_file(self.server.root / "hub" / path[len("/cdn/") :])
        if not self.hub_authorized():
            return self.send_json(401, {"error": "Invalid credentials in Authorization header"})
        if path.startswith("/api/models/"):
            return self.tree(path[len("/api/models/") :], query)
        bits = path.strip("/").split("/")
        if len(bits) >= 5 and bits[2] == "resolve":
            owner, repo, _, revision, *rest = bits
            file = self.server.root / "hub" / owner / repo / revision / "/".join(rest)
            if file.is_file() and file.stat().st_size > LFS_FROM:
                location = f"http://localhost:{self.server.server_port}/cdn/{quote('/'.join([owner, repo, revision, *rest]))}"
                return self.send_empty(302, {"Location": location})
            return self.send_file(file)
        return self.send_json(404, {"error": "Entry not found"})

    # --- the Hub ---

    def hub_authorized(self) -> bool:
        token = self.server.hub_token
        return not token or self.headers.get("Authorization") == f"Bearer {token}"

    def tree(self, rest: str, query: dict[str, str]) -> None:
        bits = rest.strip("/").split("/")
        if len(bits) < 4 or bits[2] != "tree":
            return self.send_json(404, {"error": "not found"})
        owner, repo, _, revision, *sub = bits
        top = self.server.root / "hub" / owner / repo / revision
        if not top.is_dir():
            return self.send_json(404, {"error": "Revision not found"})
        start = top.joinpath(*sub)
        walk = sorted(start.rglob("*")) if query.get("recursive") in ("1", "true") else sorted(start.iterdir())
        entries = [
            {
                "type": "directory" if p.is_dir() else "file",
                "path": str(p.relative_to(top)),
                "size": 0 if p.is_dir() else p.stat().st_size,
                "oid": "0" * 40,
            }
            for p in walk
        ]
        cursor = int(query.get("cursor", "0"))
        page = entries[cursor : cursor + PAGE]
        headers = {}
        if cursor + PAGE < len(entries):
            next_query = urlencode({**query, "cursor": cursor + PAGE})
            headers["Link"] = f'<http://127.0.0.1:{self.server.server_port}{urlsplit(self.path).path}?{next_query}>; rel="next"'
        self.send_json(200, page, headers)

    # --- a registry with token auth ---

    def registry(self, path: str, query: dict[str, str]) -> None:
        port = self.server.server_port
        if path == "/token":
            want = "Basic " + base64.b64encode(self.server.registry_login.encode()).decode()
            if self.headers.get("Authorization") != want:
                return self.send_json(401, {"errors": [{"code": "UNAUTHORIZED"}]})
            scope = query.get("scope", "")
            if query.get("service") != "stub-registry" or not scope.endswith(":pull"):
                return self.send_json(400, {"error": "bad scope or service"})
            return self.send_json(200, {"token": f"tok.{scope.replace(':', '.')}", "expires_in": 300})
        if path.startswith("/storage/"):
            if self.headers.get("Authorization"):
                return self.send_json(400, {"error": "a signed URL takes no Authorization header"})
            return self.send_file(self.server.root / "registry" / path[len("/storage/") :])
        bits = path[len("/v2/") :].rsplit("/blobs/", 1)
        scope = f"repository:{bits[0]}:pull" if len(bits) == 2 else ""
        if self.headers.get("Authorization") != f"Bearer tok.{scope.replace(':', '.')}" or not scope:
            challenge = f'Bearer realm="http://127.0.0.1:{port}/token",service="stub-registry"'
            if scope:
                challenge += f',scope="{scope}"'
            return self.send_json(401, {"errors": [{"code": "UNAUTHORIZED"}]}, {"WWW-Authenticate": challenge})
        blob = self.server.root / "registry" / bits[1]
        if not blob.is_file():
            return self.send_json(404, {"errors": [{"code": "BLOB_UNKNOWN"}]})
        location = f"http://localhost:{port}/storage/{bits[1]}"
        return self.send_empty(307, {"Location": location, "Docker-Content-Digest": bits[1]})

    # --- WebHDFS ---

    def remote_exception(self, status: int, exception: str, message: str) -> None:
        self.send_json(
            status, {"RemoteException": {"exception": exception, "javaClassName": f"java.io.{exception}", "message": message}}
        )

    def namenode(self, path: str, query: dict[str, str]) -> None:
        if self.server.hdfs_user and query.get("user.name") != self.server.hdfs_user:
            return self.remote_exception(401, "SecurityException", "Failed to obtain user group information")
        if self.server.hdfs_delegation and query.get("delegation") != self.server.hdfs_delegation:
            return self.remote_exception(403, "SecurityException", "invalid delegation token")
        target = self.server.root / "hdfs" / path.strip("/")
        op = query.get("op", "").upper()
        if not target.exists():
            return self.remote_exception(404, "FileNotFoundException", f"File does not exist: {path}")
        if op == "GETFILESTATUS":
            return self.send_json(200, {"FileStatus": status(target, "")})
        if op == "LISTSTATUS":
            children = sorted(target.iterdir()) if target.is_dir() else [target]
            statuses = [status(c, c.name if target.is_dir() else "") for c in children]
            return self.send_json(200, {"FileStatuses": {"FileStatus": statuses}})
        if op == "OPEN":
            if target.is_dir():
                return self.remote_exception(404, "FileNotFoundException", f"Path is not a file: {path}")
            forward = {k: v for k, v in query.items() if k in ("offset", "length")}
            forward |= {"op": "OPEN", "namenoderpcaddress": "namenode:8020"}
            location = f"http://localhost:{self.server.server_port}/datanode/webhdfs/v1{quote(path)}?{urlencode(forward)}"
            return self.send_empty(307, {"Location": location})
        return self.remote_exception(400, "IllegalArgumentException", f'Invalid value for webhdfs parameter "op": {op}')

    def datanode(self, path: str, query: dict[str, str]) -> None:
        target = self.server.root / "hdfs" / path.strip("/")
        if not target.is_file():
            return self.remote_exception(404, "FileNotFoundException", f"File does not exist: {path}")
        data = target.read_bytes()
        offset = int(query.get("offset", "0"))
        length = int(query["length"]) if "length" in query else len(data) - offset
        if offset > len(data):
            return self.remote_exception(403, "IOException", f"Offset={offset} out of the range [0, {len(data)})")
        self.send_body(200, data[offset : offset + length], {"Content-Type": "application/octet-stream"})

    # --- answers ---

    def send_file(self, file: Path) -> None:
        if not file.is_file():
            return self.send_json(404, {"error": "Entry not found"})
        data = file.read_bytes()
        headers = {"ETag": f'"{os.stat(file).st_mtime_ns:x}-{len(data):x}"', "Accept-Ranges": "bytes"}
        spec = self.headers.get("Range", "")
        if spec.startswith("bytes=") and "," not in spec:
            first_text, _, last_text = spec[6:].partition("-")
            first = int(first_text) if first_text else 0
            last = min(int(last_text), len(data) - 1) if last_text else len(data) - 1
            if first >= len(data):
                return self.send_empty(416, {"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
            return self.send_body(206, data[first : last + 1], headers)
        self.send_body(200, data, headers)

    def send_json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        self.send_body(status, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})})

    def send_empty(self, status: int, headers: dict[str, str]) -> None:
        self.send_body(status, b"", headers)

    def send_body(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def status(p: Path, suffix: str) -> dict[str, object]:
    st = p.stat()
    return {
        "pathSuffix": suffix,
        "type": "DIRECTORY" if p.is_dir() else "FILE",
        "length": 0 if p.is_dir() else st.st_size,
        "modificationTime": st.st_mtime_ns // 1_000_000,
        "blockSize": 134217728,
        "replication": 3,
        "owner": "hdfs",
        "group": "supergroup",
        "permission": "644",
    }


class Origin(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, hub_token: str, hdfs_user: str, hdfs_delegation: str, registry_login: str) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.registry_login = registry_login
        self.root = root
        self.hub_token = hub_token
        self.hdfs_user = hdfs_user
        self.hdfs_delegation = hdfs_delegation


@contextmanager
def running(root: Path, *flags: str) -> Iterator[str]:
    """This origin as a child process (this interpreter) serving ``root``: yields its base URL."""
    proc = subprocess.Popen(
        [sys.executable, __file__, str(root), *flags], stdout=subprocess.PIPE, stderr=(root / "origin.log").open("ab")
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if not line.startswith("http://"):
            raise RuntimeError(f"the stub origin did not start: {(root / 'origin.log').read_text()[-2000:]}")
        yield line
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--hub-token", default="")
    parser.add_argument("--hdfs-user", default="")
    parser.add_argument("--hdfs-delegation", default="")
    parser.add_argument("--registry-login", default="user:password")
    args = parser.parse_args()
    server = Origin(args.root, args.hub_token, args.hdfs_user, args.hdfs_delegation, args.registry_login)
    print(f"http://127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
