"""The HTTP/HTTPS source backend against a real origin: a ``http.server`` on 127.0.0.1 in a thread of
this process, which serves one object in many ways (ranges or not, chunked, failing, changing, redirecting,
stalling) chosen by the request path; and the scheme registry.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio

from dfz.peer.source import (
    MalformedURL,
    RetryPolicy,
    SourceAuthError,
    SourceBackend,
    SourceChanged,
    SourceEntry,
    SourceInfo,
    SourceNotFound,
    SourceProtocolError,
    SourceRangeNotSupported,
    SourceRegistry,
    SourceRequestError,
    SourceTLSError,
    SourceUnavailable,
    UnsupportedScheme,
    backend_for,
    display_url,
)
from dfz.peer.source.http import HTTPBackend

SIZE = 300_001  # not a multiple of any piece size used here
DATA = random.Random(7).randbytes(SIZE)
ETAG = '"v1"'
LAST_MODIFIED = "Sat, 01 Jun 2024 10:00:00 GMT"
FAST_RETRY = RetryPolicy(attempts=3, backoff=0.01, backoff_max=0.05)


# --- the origin ------------------------------------------------------------------------------------------


@dataclass
class OriginState:
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    hits: dict[str, int] = field(default_factory=dict)  # requests per path
    release: threading.Event = field(default_factory=threading.Event)  # ends /stall
    lock: threading.Lock = field(default_factory=threading.Lock)


class OriginHandler(BaseHTTPRequestHandler):
    """``/file``: the object with Range, ETag and Last-Modified. Other paths (N = a count):

    ``/empty`` a zero-length object; ``/chunked`` chunked encoding, no length, no ranges; ``/norange``
    ignores Range (200 with the whole object); ``/missing`` 404; ``/forbidden`` 403; ``/unauthorized`` 401;
    ``/teapot`` 418; ``/flaky/N`` 500 to the first N requests, then ``/file``; ``/busy/N?after=S`` 503 with
    ``Retry-After: S`` to the first N requests, then ``/file``; ``/reset/N`` the first N
    answers send half their body and reset the connection; ``/grow`` the object gets 1000 bytes longer
    after the first request; ``/retag`` its ETag changes after the first request; ``/badrange`` answers
    206 with another range than asked; ``/redirect/N`` a chain of N relative 302s ending at ``/file``;
    ``/loop`` redirects to itself; ``/away?to=URL`` redirects to URL; ``/needs-token`` is ``/file`` for
    ``Authorization: Bearer t0k``, else 401; ``/echo`` the request headers as JSON; ``/stall`` sends
    headers and 10 bytes, then nothing.
    """

    protocol_version = "HTTP/1.1"
    state: ClassVar[OriginState]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        st = self.state
        path = self.path.split("?", 1)[0]
        with st.lock:
            st.requests.append((path, self.headers.get("Range")))
            st.hits[path] = hits = st.hits.get(path, 0) + 1
        parts = path.strip("/").split("/")
        kind, arg = parts[0], int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if kind == "file":
            self.serve(DATA)
        elif kind == "empty":
            self.serve(b"")
        elif kind == "chunked":
            self.serve_chunked(DATA)
        elif kind == "norange":
            self.serve(DATA, ranges=False)
        elif kind == "missing":
            self.error(404, b"no such key")
        elif kind == "forbidden":
            self.error(403, b"<Error><Code>AccessDenied</Code></Error>")
        elif kind == "unauthorized":
            self.error(401, b"login first")
        elif kind == "teapot":
            self.error(418, b"short and stout")
        elif kind == "flaky":
            if hits <= arg:
                self.error(500, b"try later")
            else:
                self.serve(DATA)
        elif kind == "busy":  # 503 with Retry-After (the query's `after`) to the first N requests
            if hits <= arg:
                after = self.path.split("after=", 1)[1] if "after=" in self.path else "1"
                self.send_response(503)
                self.send_header("Retry-After", after)
                self.send_header("Content-Length", "4")
                self.end_headers()
                self.wfile.write(b"busy")
            else:
                self.serve(DATA)
        elif kind == "reset":
            self.serve(DATA, reset=hits <= arg)
        elif kind == "grow":
            self.serve(DATA if hits == 1 else DATA + b"x" * 1000)
        elif kind == "retag":
            self.serve(DATA, etag=ETAG if hits == 1 else '"v2"')
        elif kind == "badrange":
            self.serve(DATA, shift=1)
        elif kind == "redirect":
            self.redirect("/file" if arg <= 1 else f"/redirect/{arg - 1}")
        elif kind == "loop":
            self.redirect("/loop")
        elif kind == "away":  # to another origin, named by the query
            self.redirect(self.path.split("?to=", 1)[1])
        elif kind == "needs-token":
            if self.headers.get("Authorization") == "Bearer t0k":
                self.serve(DATA)
            else:
                self.error(401, b"token needed")
        elif kind == "echo":
            self.serve(json.dumps(dict(self.headers.items())).encode(), ranges=False)
        elif kind == "stall":
            first, last = self.asked(SIZE)
            self.send_response(206 if self.headers.get("Range") else 200)
            if self.headers.get("Range"):
                self.send_header("Content-Range", f"bytes {first}-{last}/{SIZE}")
            self.send_header("Content-Length", str(last - first + 1))
            self.end_headers()
            self.wfile.write(DATA[:10])
            st.release.wait(10)
            self.close_connection = True
        else:
            self.error(404, b"unknown path")

    def serve(self, body: bytes, *, ranges: bool = True, reset: bool = False, etag: str = ETAG, shift: int = 0) -> None:
        size = len(body)
        spec = self.headers.get("Range") if ranges else None
        status, first, last = 200, 0, size - 1
        if spec:
            first, last = self.asked(size)
            if first >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        chunk = body[first : last + 1]
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {first + shift}-{last + shift}/{size}")
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("Accept-Ranges", "bytes" if ranges else "none")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", LAST_MODIFIED)
        self.end_headers()
        if reset:
            self.wfile.write(chunk[: len(chunk) // 2])
            time.sleep(0.05)  # let the client read it: an RST drops what is still unread in its socket
            self.reset()
        else:
            self.wfile.write(chunk)

    def asked(self, size: int) -> tuple[int, int]:
        """First and last byte of the request's ``Range: bytes=a-b`` (or ``a-``), the whole object without one."""
        spec = self.headers.get("Range")
        if not spec:
            return 0, size - 1
        a, _, b = spec.removeprefix("bytes=").partition("-")
        return int(a), min(int(b) if b else size - 1, size - 1)

    def serve_chunked(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(0, len(body), 65536):
            piece = body[i : i + 65536]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def error(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def reset(self) -> None:
        """Close with an RST (SO_LINGER 0), as a crashed origin or a middlebox does."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True


@dataclass
class Origin:
    base: str
    state: OriginState

    def url(self, path: str) -> str:
        return self.base + path

    def ranges_asked(self, path: str) -> list[str | None]:
        return [r for p, r in self.state.requests if p == path]


class OriginServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up early (stat cuts a 200 answer after its headers) are expected here


def start_origin(tls: ssl.SSLContext | None = None) -> tuple[ThreadingHTTPServer, Origin]:
    state = OriginState()
    handler = type("Handler", (OriginHandler,), {"state": state})
    server = OriginServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    scheme = "https" if tls else "http"
    return server, Origin(f"{scheme}://127.0.0.1:{server.server_address[1]}", state)


@pytest.fixture
def origin() -> Iterator[Origin]:
    server, o = start_origin()
    yield o
    o.state.release.set()
    server.shutdown()
    server.server_close()


def make_backend(*, retry: RetryPolicy = FAST_RETRY, **options: Any) -> HTTPBackend:
    """A backend that retries fast and ignores proxy settings in the environment (the origin is local)."""
    return HTTPBackend(retry=retry, proxy="", **options)


@pytest.fixture
def backend() -> Iterator[HTTPBackend]:
    b = make_backend()
    yield b
    b.close()


async def read_all(b: SourceBackend, url: str, **kw: object) -> bytes:
    out = bytearray()
    async with b.stream(url, **kw) as chunks:  # type: ignore[arg-type]
        async for chunk in chunks:
            out += chunk
    return bytes(out)


# --- the happy paths -------------------------------------------------------------------------------------


async def test_stat_of_a_range_origin(origin: Origin, backend: HTTPBackend) -> None:
    info = await backend.stat(origin.url("/file"))
    assert info == SourceInfo(
        url=origin.url("/file"),
        content_length=SIZE,
        supports_ranges=True,
        etag=ETAG,
        last_modified=LAST_MODIFIED,
        content_type=None,
    )
    assert origin.ranges_asked("/file") == ["bytes=0-0"]


async def test_pieces_read_concurrently_make_the_object(origin: Origin, backend: HTTPBackend) -> None:
    url = origin.url("/file")
    info = await backend.stat(url)
    piece = 64 * 1024
    out = bytearray(SIZE)
    view = memoryview(out)

    async def fetch(start: int) -> None:
        await backend.read_range_into(url, start, view[start : start + piece], expect=info)

    async with trio.open_nursery() as nursery:
        for start in range(0, SIZE, piece):
            nursery.start_soon(fetch, start)
    assert out == DATA
    assert await backend.read_range(url, SIZE - 5, 5, expect=info) == DATA[-5:]
    assert await backend.read_range(url, 0, 0) == b""


async def test_a_range_past_the_end_is_refused(origin: Origin, backend: HTTPBackend) -> None:
    url = origin.url("/file")
    info = await backend.stat(url)
    with pytest.raises(ValueError, match="past the end"):
        await backend.read_range(url, SIZE - 1, 2, expect=info)
    with pytest.raises(SourceProtocolError, match="300001 bytes"):  # without expect, the origin's answer tells
        await backend.read_range(url, SIZE - 1, 2)


async def test_stream_yields_the_object_in_chunks(origin: Origin, backend: HTTPBackend) -> None:
    url = origin.url("/file")
    sizes = []
    out = bytearray()
    async with backend.stream(url, expect=await backend.stat(url), chunk_size=100_000) as chunks:
        async for chunk in chunks:
            sizes.append(len(chunk))
            out += chunk
    assert out == DATA
    assert sizes == [100_000, 100_000, 100_000, 1]


async def test_leaving_a_stream_early_stops_it(origin: Origin, backend: HTTPBackend) -> None:
    url = origin.url("/file")
    async with backend.stream(url, chunk_size=1000) as chunks:
        async for chunk in chunks:
            assert chunk == DATA[:1000]
            break
    # The handle went back to the pool and works for the next request.
    assert await backend.read_range(url, 0, 10) == DATA[:10]


async def test_a_failed_stream_does_not_start_over(origin: Origin, backend: HTTPBackend) -> None:
    async with backend.stream(origin.url("/missing")) as chunks:
        with pytest.raises(SourceNotFound):
            await chunks.__anext__()
        with pytest.raises(RuntimeError, match="already failed"):
            await chunks.__anext__()


async def test_chunked_origin_without_length(origin: Origin, backend: HTTPBackend) -> None:
    url = origin.url("/chunked")
    info = await backend.stat(url)
    assert (info.content_length, info.supports_ranges) == (None, False)
    assert await read_all(backend, url, expect=info) == DATA
    with pytest.raises(SourceRangeNotSupported, match=r"stream\(\)"):
        await backend.read_range(url, 0, 100)


async def test_origin_without_ranges(origin: Origin, backend: HTTPBackend) -> None:
    url = origin.url("/norange")
    info = await backend.stat(url)
    assert (info.content_length, info.supports_ranges) == (SIZE, False)
    with pytest.raises(SourceRangeNotSupported, match="ignores Range"):
        await backend.read_range(url, 100, 100, expect=info)
    # A "range" that is the whole object may come back as a 200.
    assert await backend.read_range(url, 0, SIZE, expect=info) == DATA
    assert await read_all(backend, url, expect=info) == DATA


async def test_empty_object(origin: Origin, backend: HTTPBackend) -> None:
    url = origin.url("/empty")
    info = await backend.stat(url)
    assert (info.content_length, info.supports_ranges) == (0, True)
    assert await read_all(backend, url, expect=info) == b""


async def test_redirect_chain_is_followed(origin: Origin, backend: HTTPBackend) -> None:
    url = origin.url("/redirect/3")
    info = await backend.stat(url)
    assert info.url == origin.url("/file")
    assert info.content_length == SIZE
    assert await backend.read_range(url, 10, 20, expect=info) == DATA[10:30]
    assert await read_all(backend, url) == DATA


async def test_credentials_do_not_follow_a_redirect_to_another_origin(origin: Origin, backend: HTTPBackend) -> None:
    server, other = start_origin()
    try:
        url = origin.url(f"/away?to={other.url('/echo')}")
        echoed = json.loads(await read_all(backend, url, headers={"Authorization": "Bearer t0k", "X-Tag": "kept"}))
        assert echoed["X-Tag"] == "kept"
        assert "Authorization" not in echoed
    finally:
        server.shutdown()
        server.server_close()


async def test_request_headers_are_passed_through(origin: Origin, backend: HTTPBackend) -> None:
    url = origin.url("/needs-token")
    with pytest.raises(SourceAuthError):
        await backend.stat(url)
    token = {"Authorization": "Bearer t0k"}
    info = await backend.stat(url, token)
    assert await backend.read_range(url, 5, 5, token, expect=info) == DATA[5:10]
    echoed = json.loads(await read_all(backend, origin.url("/echo"), headers={"X-Tag": "a b", "Range": "bytes=0-1"}))
    assert echoed["X-Tag"] == "a b"
    assert echoed["User-Agent"].startswith("dfz/")
    assert "Range" not in echoed  # ranges are dfz's business
    with pytest.raises(ValueError, match="invalid request header"):
        await backend.stat(url, {"X-Evil": "a\r\nHost: elsewhere"})


# --- failures --------------------------------------------------------------------------------------------


async def test_not_found(origin: Origin, backend: HTTPBackend) -> None:
    url = origin.url("/missing")
    with pytest.raises(SourceNotFound, match="404") as e:
        await backend.stat(url)
    assert e.value.url == url
    with pytest.raises(SourceNotFound):
        await backend.read_range(url, 0, 10)
    with pytest.raises(SourceNotFound):
        await read_all(backend, url)
    assert origin.state.hits["/missing"] == 3  # never retried


@pytest.mark.parametrize("path, status", [("/forbidden", 403), ("/unauthorized", 401)])
async def test_refused_access(origin: Origin, backend: HTTPBackend, path: str, status: int) -> None:
    with pytest.raises(SourceAuthError, match=f"{status}.*Authorization") as e:
        await backend.read_range(origin.url(path), 0, 10)
    if status == 403:
        assert "AccessDenied" in str(e.value)  # what the origin said is in the message
    assert origin.state.hits[path] == 1


async def test_other_client_errors(origin: Origin, backend: HTTPBackend) -> None:
    with pytest.raises(SourceRequestError, match="418") as e:
        await backend.stat(origin.url("/teapot"))
    assert e.value.status == 418


async def test_server_errors_are_retried(origin: Origin, backend: HTTPBackend) -> None:
    info = await backend.stat(origin.url("/flaky/2"))
    assert info.content_length == SIZE
    assert origin.state.hits["/flaky/2"] == 3
    assert await backend.read_range(origin.url("/flaky/1"), 0, 100) == DATA[:100]
    assert await read_all(backend, origin.url("/flaky/2")) == DATA
    with pytest.raises(SourceUnavailable, match=r"failed 3 times, last with HTTP 500.*'try later'"):
        await backend.stat(origin.url("/flaky/9"))
    assert origin.state.hits["/flaky/9"] == FAST_RETRY.attempts


async def test_reset_mid_body_resumes_the_range(origin: Origin, backend: HTTPBackend) -> None:
    url = origin.url("/reset/1")
    assert await backend.read_range(url, 1000, SIZE - 1000) == DATA[1000:]
    asked = origin.ranges_asked("/reset/1")
    assert asked[0] == f"bytes=1000-{SIZE - 1}"
    assert len(asked) == 2 and asked[1] is not None
    resumed_at = int(asked[1].removeprefix("bytes=").split("-")[0])
    assert 1000 < resumed_at < SIZE  # the second request asked only for what was missing


async def test_reset_on_every_attempt_gives_up(origin: Origin, backend: HTTPBackend) -> None:
    with pytest.raises(SourceUnavailable, match="failed 3 times"):
        await backend.read_range(origin.url("/reset/99"), 0, SIZE)


async def test_stream_retries_before_its_first_chunk_only(origin: Origin, backend: HTTPBackend) -> None:
    assert await read_all(backend, origin.url("/reset/1")) == DATA  # nothing was delivered: start again
    with pytest.raises(SourceUnavailable, match=r"broke after \d+ bytes"):
        await read_all(backend, origin.url("/reset/2"), chunk_size=16384)


async def test_connection_refused(backend: HTTPBackend) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(SourceUnavailable, match="failed 3 times"):
            await backend.stat(f"http://127.0.0.1:{port}/x")


async def test_length_change_mid_download(origin: Origin, backend: HTTPBackend) -> None:
    url = origin.url("/grow")
    info = await backend.stat(url)
    assert info.content_length == SIZE
    with pytest.raises(SourceChanged, match=f"{SIZE} bytes at stat, now {SIZE + 1000}"):
        await backend.read_range(url, 0, 1000, expect=info)
    with pytest.raises(SourceChanged, match="length changed"):
        await read_all(backend, url, expect=info)


async def test_etag_change_mid_download(origin: Origin, backend: HTTPBackend) -> None:
    url = origin.url("/retag")
    info = await backend.stat(url)
    with pytest.raises(SourceChanged, match='ETag "v1" became "v2"'):
        await backend.read_range(url, 0, 1000, expect=info)


async def test_wrong_content_range(origin: Origin, backend: HTTPBackend) -> None:
    with pytest.raises(SourceProtocolError, match="asked for bytes 10-19, the origin sent 11-20"):
        await backend.read_range(origin.url("/badrange"), 10, 10)


async def test_redirect_loop_and_limit(origin: Origin) -> None:
    b = make_backend(max_redirects=2)
    try:
        with pytest.raises(SourceRequestError, match="redirect"):
            await b.stat(origin.url("/loop"))
        with pytest.raises(SourceRequestError, match="redirect"):
            await b.stat(origin.url("/redirect/3"))
        assert (await b.stat(origin.url("/redirect/2"))).content_length == SIZE
    finally:
        b.close()


async def test_cancellation_stops_a_stalled_transfer(origin: Origin, backend: HTTPBackend) -> None:
    url = origin.url("/stall")
    buffer = bytearray(SIZE)
    t0 = time.monotonic()
    with trio.move_on_after(0.3):
        await backend.read_range_into(url, 0, buffer)
    with trio.move_on_after(0.3):
        await read_all(backend, url)
    assert time.monotonic() - t0 < 4  # each transfer noticed its cancellation within ~1 s


async def test_a_stalled_origin_times_out(origin: Origin) -> None:
    b = make_backend(stall_timeout=1, retry=RetryPolicy(attempts=1))
    try:
        with pytest.raises(SourceUnavailable, match=r"failed 1 times.*too slow"):
            await b.read_range(origin.url("/stall"), 0, 100)
    finally:
        b.close()


async def test_messages_hide_credentials_and_signatures(origin: Origin, backend: HTTPBackend) -> None:
    url = origin.url("/missing").replace("://", "://user:hunter2@") + "?X-Amz-Signature=s3cr3t"
    with pytest.raises(SourceNotFound) as e:
        await backend.stat(url)
    assert "hunter2" not in str(e.value) and "s3cr3t" not in str(e.value)
    assert display_url("https://u:p@h:8443/a/b?sig=1") == "https://h:8443/a/b?…"


def test_retry_after_is_read_as_seconds_or_a_date() -> None:
    from email.utils import format_datetime

    from dfz.peer.source.http import _retry_after, _Transient, _wait_before_retry

    assert _retry_after("7") == 7.0 and _retry_after(None) is None and _retry_after("soon") is None
    later = format_datetime(datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=30), usegmt=True)
    assert 25 <= (_retry_after(later) or 0) <= 31
    policy = RetryPolicy(attempts=3, backoff=0.01, backoff_max=0.02)
    assert _wait_before_retry(policy, 1, _Transient("503", 5.0)) == 5.0  # the origin's wait, not the backoff
    assert (_wait_before_retry(policy, 1, _Transient("500")) or 1) <= 0.02
    assert _wait_before_retry(policy, 1, _Transient("503", 3600.0)) is None  # too long: give up now


async def test_an_origin_that_asks_to_wait_is_waited_for_or_given_up_on(origin: Origin, backend: HTTPBackend) -> None:
    assert await read_all(backend, origin.url("/busy/1?after=1")) == DATA  # waited a second, then served
    with pytest.raises(SourceUnavailable, match="retry after 3600 s"):
        await backend.stat(origin.url("/busy/9?after=3600"))
    assert origin.state.hits["/busy/9"] == 1  # not asked again: it said an hour


# --- TLS -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(
        [
            *["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"],
            *["-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            *["-keyout", key, "-out", cert],
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_origin(certificate: tuple[str, str]) -> Iterator[Origin]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    server, o = start_origin(context)
    yield o
    server.shutdown()
    server.server_close()


async def test_tls_is_verified_by_default(tls_origin: Origin, certificate: tuple[str, str]) -> None:
    url = tls_origin.url("/file")
    default = make_backend()
    with pytest.raises(SourceTLSError, match="ca_bundle"):
        await default.stat(url)
    custom = make_backend(ca_bundle=certificate[0])
    info = await custom.stat(url)
    assert await custom.read_range(url, 7, 9, expect=info) == DATA[7:16]
    assert await read_all(custom, url, expect=info) == DATA
    insecure = make_backend(insecure=True)
    assert (await insecure.stat(url)).content_length == SIZE
    for b in (default, custom, insecure):
        b.close()


def test_tls_options_are_checked(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(ValueError, match="is not a file"):
        HTTPBackend(ca_bundle=os.path.join(tmp_path, "nope.pem"))
    with pytest.raises(ValueError, match="exclude each other"):
        HTTPBackend(ca_bundle=__file__, insecure=True)


async def test_the_daemons_tls_settings_reach_every_http_based_backend(
    tls_origin: Origin, certificate: tuple[str, str], tmp_path: Path
) -> None:
    """``http_ca_bundle`` / ``http_insecure`` (``dfz daemon --http-ca-bundle``): the daemon's source registry
    verifies origins with that CA, and ``oci://``, ``hf://`` and ``hdfs://`` share the same client."""
    from dfz.config import ConfigError
    from dfz.peer.config import DaemonConfig
    from dfz.peer.daemon import source_registry

    url = tls_origin.url("/file")
    registry = source_registry(DaemonConfig(data_dir=tmp_path / "d", http_ca_bundle=certificate[0]))
    backend = registry.backend_for(url)
    assert isinstance(backend, HTTPBackend)
    assert (await backend.stat(url)).content_length == SIZE
    for other in ("oci://127.0.0.1:5000/r@sha256:" + "0" * 64, "hf://o/r/f.bin", "hdfs://nn:9870/f"):
        assert getattr(registry.backend_for(other), "http", None) is backend, other
    insecure = source_registry(DaemonConfig(data_dir=tmp_path / "d", http_insecure=True)).backend_for(url)
    assert (await insecure.stat(url)).content_length == SIZE
    with pytest.raises(SourceTLSError):
        await source_registry(DaemonConfig(data_dir=tmp_path / "d")).backend_for(url).stat(url)
    with pytest.raises(ConfigError, match="exclude each other"):
        DaemonConfig(data_dir=tmp_path / "d", http_ca_bundle=certificate[0], http_insecure=True)
    with pytest.raises(ConfigError, match="is not a file"):
        DaemonConfig(data_dir=tmp_path / "d", http_ca_bundle=str(tmp_path / "nope.pem"))
    toml = tmp_path / "d.toml"
    toml.write_text(f'data_dir = "d"\nhttp_ca_bundle = "{certificate[0]}"\nhttp_insecure = false\n')
    assert DaemonConfig.load(toml).http_ca_bundle == certificate[0]
    for b in (backend, insecure):
        b.close()


# --- the registry ----------------------------------------------------------------------------------------


def test_backend_for_finds_http_and_lists_schemes_otherwise() -> None:
    assert isinstance(backend_for("http://example.com/a"), HTTPBackend)
    assert backend_for("HTTPS://example.com/a") is backend_for("http://example.com/b")
    with pytest.raises(
        UnsupportedScheme, match=r"'ftp' is not supported; supported schemes: file, hdfs, hf, http, https, oci, s3"
    ):
        backend_for("ftp://example.com/a")
    with pytest.raises(UnsupportedScheme, match="has no scheme"):
        backend_for("example.com/a")
    with pytest.raises(MalformedURL, match="malformed"):
        backend_for("http://[::1/a")


async def test_malformed_urls_are_not_retried(backend: HTTPBackend) -> None:
    for url in ("http://:80/no-host", "http://127.0.0.1:99999/port"):
        with pytest.raises(MalformedURL, match=r"URL rejected.*check the URL"):
            await backend.stat(url)


async def test_a_scheme_is_one_class_and_one_registration() -> None:
    class Memory(SourceBackend):
        schemes = ("mem",)

        async def stat(self, url: str, headers: object = None) -> SourceInfo:
            return SourceInfo(url=url, content_length=3, supports_ranges=True)

        async def read_range_into(
            self, url: str, start: int, buffer: bytearray | memoryview, headers: object = None, **_: object
        ) -> None:
            buffer[:] = b"abc"[start : start + len(buffer)]

        def stream(self, url: str, headers: object = None, **_: object) -> object:  # type: ignore[override]
            raise NotImplementedError

    registry = SourceRegistry([HTTPBackend(), Memory()])
    assert registry.schemes == ["http", "https", "mem"]
    b = registry.backend_for("mem://x")
    assert await b.read_range("mem://x", 1, 2) == b"bc"
    with pytest.raises(NotImplementedError, match="cannot list"):
        await b.list("mem://x")
    assert SourceEntry(url="mem://x").is_dir is False
    registry.close()
