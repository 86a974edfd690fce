"""Helpers shared by the end-to-end tests (``test_daemon.py``, ``test_up.py``, ``test_e2e_failures.py``).

* :func:`serve_origin`: an HTTP origin (``http.server`` in a thread) that serves byte ranges (and ``HEAD``),
  counts the body bytes it served per path, and plays the faults a test asks for (:class:`Route`).
* :class:`Procs` and friends: real ``dfz`` processes (``sys.executable -m dfz.cli ...``), their ready
  lines, and a cleanup that stops whatever still runs.
"""

from __future__ import annotations

import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# --- the origin ------------------------------------------------------------------------------------------

_WRITE_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Route:
    """What the origin serves at one path, faults included."""

    data: bytes = b""
    status: int = 200
    """Not 200: every request is answered with this status and an empty body (404, 500, ...)."""
    chunked: bool = False
    """No ranges and no length: the whole body in chunked transfer encoding."""
    delay: float = 0.0
    """Seconds every range answer of more than one byte waits before it starts."""
    rate: int = 0
    """Bytes per second each answer's body is sent at; 0: as fast as the socket takes it."""
    reset: bool = False
    """Every answer but the 1-byte probe sends half its body and resets the connection (RST)."""
    grow: int = 0
    """Bytes the object has more for every request but the 1-byte probe of ``stat``: its length changes
    between ``stat`` and the reads."""


@dataclass
class Origin:
    url: str
    routes: dict[str, Route]
    """Path -> what is served there; a test may add routes while the origin runs."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    served: dict[str, int] = field(default_factory=dict)
    """Body bytes served per path (written to the socket), the probes of ``stat`` left out: answers to
    ``Range: bytes=0-0`` (one byte, or a chunked body that ``stat`` stops reading after the headers)."""
    probes: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    headers: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    """Path -> the headers of the last request for it, as received."""
    active: int = 0
    """GET answers being written now (one whose client went away ends at its next write)."""

    def count(self, path: str, nbytes: int, probe: bool) -> None:
        with self.lock:
            if probe:
                self.probes[path] = self.probes.get(path, 0) + 1
            else:
                self.served[path] = self.served.get(path, 0) + nbytes

    def request(self, path: str) -> None:
        with self.lock:
            self.requests[path] = self.requests.get(path, 0) + 1


def _handler(origin: Origin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            """Echoes the request body (Content-Length framed only)."""
            origin.request(self.path)
            origin.headers[self.path] = list(self.headers.items())
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_HEAD(self) -> None:
            """The length of what a GET serves (as a registry answers a HEAD of a blob), no body."""
            origin.request(self.path)
            origin.headers[self.path] = list(self.headers.items())
            route = origin.routes.get(self.path)
            if route is None or route.status != 200:
                self.send_response(404 if route is None else route.status)
                self.send_header("Content-Length", "0")
            elif route.chunked:
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(route.data)))
                self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

        def do_GET(self) -> None:
            with origin.lock:
                origin.active += 1
            try:
                self._get()
            finally:
                with origin.lock:
                    origin.active -= 1

        def _get(self) -> None:
            path = self.path
            origin.request(path)
            origin.headers[path] = list(self.headers.items())
            route = origin.routes.get(path)
            if route is None or route.status != 200:
                self.send_response(404 if route is None else route.status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                origin.count(path, 0, False)
                return
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
            probe = match is not None and match.group(0) == "bytes=0-0"
            if route.chunked:
                self._chunked(path, route, probe)
                return
            data = route.data if probe or not route.grow else route.data + bytes(route.grow)
            if match is None:
                body, status, start, end = data, 200, 0, len(data) - 1
            else:
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else len(data) - 1
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    origin.count(path, 0, True)
                    return
                end = min(end, len(data) - 1)
                body, status = data[start : end + 1], 206
            if route.delay and status == 206 and len(body) > 1:
                time.sleep(route.delay)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.end_headers()
            if route.reset and not probe:
                self._send(path, body[: len(body) // 2], route.rate, probe)
                time.sleep(0.05)  # let the client read it: an RST drops what is still unread in its socket
                self.close_connection = True
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                return
            self._send(path, body, route.rate, probe)

        def _chunked(self, path: str, route: Route, probe: bool) -> None:
            """The whole body, whatever was asked; for a probe (which stops reading after the headers) only
            the probe is counted."""
            if probe:
                origin.count(path, 0, True)
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            data = route.data
            try:
                for start in range(0, len(data), _WRITE_CHUNK):
                    chunk = data[start : start + _WRITE_CHUNK]
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    if not probe:
                        origin.count(path, len(chunk), False)
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass

        def _send(self, path: str, body: bytes, rate: int, probe: bool) -> None:
            """Write ``body`` (at ``rate`` bytes/s if set), counting what the socket took."""
            step = min(_WRITE_CHUNK, max(1, rate // 20)) if rate else _WRITE_CHUNK
            began = time.monotonic()
            sent = 0
            if not body:
                origin.count(path, 0, probe)
            try:
                for start in range(0, len(body), step):
                    if rate:
                        wait = began + sent / rate - time.monotonic()
                        if wait > 0:
                            time.sleep(wait)
                    chunk = body[start : start + step]
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    origin.count(path, len(chunk), probe)
            except OSError:
                pass

    return Handler


@contextmanager
def serve_origin(routes: dict[str, Route], *, tls: ssl.SSLContext | None = None) -> Iterator[Origin]:
    """An origin on 127.0.0.1 (an ephemeral port) serving ``routes`` until the block ends; HTTPS with the
    server context ``tls``."""
    origin = Origin("", routes)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(origin))
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    origin.url = f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield origin
    finally:
        server.shutdown()
        server.server_close()


# --- dfz processes ---------------------------------------------------------------------------------------


def dfz_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dfz.cli", *args]


class Procs:
    """Every process a test starts; whatever still runs at the end is killed."""

    def __init__(self) -> None:
        self.all: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
        self.all.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in reversed(self.all):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.all):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def read_line(proc: subprocess.Popen[bytes], prefix: str, timeout: float = 20.0) -> str:
    """The rest of the first stdout line starting with ``prefix`` (fails the test after ``timeout``)."""
    found: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode().strip()
            if line.startswith(prefix):
                found.append(line[len(prefix) :].strip())
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    assert found, f"no '{prefix}' line within {timeout} s (exit status {proc.poll()})"
    return found[0]


def stop(proc: subprocess.Popen[bytes], signum: int = signal.SIGTERM, timeout: float = 20) -> int:
    proc.send_signal(signum)
    return proc.wait(timeout)
