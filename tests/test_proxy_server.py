"""The proxy port's HTTP/1.1 server (dfz/peer/proxy/server.py) on real sockets: dispatch by request form,
keep-alive, streamed bodies, HEAD, the error headers, and what it does with garbage and slow clients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import h11
import pytest
import trio
import trio.lowlevel

from dfz.peer.proxy.server import ERROR_HEADER, ERROR_SOURCE_HEADER, ErrorSource, Exchange, ProxyLimits, ProxyServer, parse_listen

pytestmark = pytest.mark.timeout(30)


async def echo(exchange: Exchange) -> None:
    """Answers with what it got: method, target and the body's length (streamed back chunked)."""
    body = await exchange.read_body(1 << 20)
    await exchange.start(200, [("Content-Type", "text/plain")])
    await exchange.send(f"{exchange.method} {exchange.target} {len(body)}".encode())
    await exchange.send(b"!")
    await exchange.end()


async def fixed(exchange: Exchange) -> None:
    await exchange.respond(200, [("X-Kind", "forward")], b"0123456789")


async def broken(exchange: Exchange) -> None:
    raise ValueError("bug in a handler")


async def tunnel(exchange: Exchange) -> None:
    stream, extra = await exchange.tunnel()
    data = extra or await stream.receive_some(100)
    await stream.send_all(data.upper())


@asynccontextmanager
async def server(**kw: object) -> AsyncIterator[ProxyServer]:
    async with trio.open_nursery() as nursery:
        s = ProxyServer("127.0.0.1:0", **kw)  # type: ignore[arg-type]
        await nursery.start(s.run)
        yield s
        nursery.cancel_scope.cancel()


async def read_all(stream: trio.SocketStream) -> bytes:
    out = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return out
        out += data


class Client:
    """A plain HTTP/1.1 client on h11 that keeps its connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self, method: str, target: str, headers: list[tuple[str, str]] | None = None, body: bytes = b""
    ) -> tuple[h11.Response, bytes]:
        hs = [("Host", "x"), *(headers or [])]
        if body:
            hs.append(("Content-Length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=target, headers=hs)) or b""
        if body:
            data += self.conn.send(h11.Data(data=body)) or b""
        data += self.conn.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)
        response: h11.Response | None = None
        out = b""
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
                continue
            if isinstance(ev, h11.Response):
                response = ev
            elif isinstance(ev, h11.Data):
                out += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                assert response is not None
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                return response, out


def header(response: h11.Response, name: str) -> str | None:
    for n, v in response.headers:
        if n.decode().lower() == name.lower():
            return v.decode()
    return None


async def test_dispatch_keep_alive_and_error_headers() -> None:
    async with server(mirror=echo, forward=fixed) as s:
        stream = await trio.open_tcp_stream("127.0.0.1", s.port)
        c = Client(stream)
        r, body = await c.request("GET", "/v2/x/img/manifests/v1")
        assert (r.status_code, body) == (200, b"GET /v2/x/img/manifests/v1 0!")
        assert header(r, "transfer-encoding") == "chunked"
        # the same connection: a POST with a body, then the forward form, then no route, then CONNECT
        r, body = await c.request("POST", "/v2/", body=b"abc" * 1000)
        assert body == b"POST /v2/ 3000!"
        r, body = await c.request("GET", "http://example.com/file")
        assert (r.status_code, body, header(r, "x-kind")) == (200, b"0123456789", "forward")
        r, body = await c.request("GET", "/metrics")
        assert r.status_code == 404
        assert header(r, ERROR_SOURCE_HEADER) == "proxy" and "no route" in (header(r, ERROR_HEADER) or "")
        assert body.startswith(b"no route for GET /metrics")
        r, body = await c.request("HEAD", "/v2/")
        assert (r.status_code, body) == (200, b"")
        r, _ = await c.request("CONNECT", "example.com:443")
        assert r.status_code == 501 and header(r, ERROR_SOURCE_HEADER) == "proxy"
        assert "CONNECT" in (header(r, ERROR_HEADER) or "")
        await stream.aclose()


async def test_unconfigured_forward_and_failing_handler() -> None:
    async with server(mirror=broken) as s:
        c = Client(await trio.open_tcp_stream("127.0.0.1", s.port))
        r, _ = await c.request("GET", "http://example.com/")
        assert r.status_code == 501 and header(r, ERROR_SOURCE_HEADER) == "proxy"
        r, body = await c.request("GET", "/v2/")
        assert r.status_code == 500 and header(r, ERROR_SOURCE_HEADER) == ErrorSource.DAEMON
        assert header(r, ERROR_HEADER) == "internal error: ValueError" and body == b"internal error: ValueError\n"
        # the server is still up for others
        c2 = Client(await trio.open_tcp_stream("127.0.0.1", s.port))
        r, _ = await c2.request("GET", "/nothing")
        assert r.status_code == 404


async def test_connect_tunnel() -> None:
    async with server(connect=tunnel) as s:
        stream = await trio.open_tcp_stream("127.0.0.1", s.port)
        await stream.send_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nhello")
        data = await read_all(stream)
        assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\nHELLO")


@pytest.mark.parametrize(
    ("garbage", "status"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) + b"\r\n\r\n", 400),  # a TLS hello
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
        (b"GET /v2/ HTTP/9.9\r\n\r\n", 505),
        (b"\r\n\r\n\r\n\r\n\x00\x00\x00\xff\xfe junk junk\r\n\r\n", 400),
    ],
)
async def test_garbage_gets_a_clear_error(garbage: bytes, status: int) -> None:
    async with server(mirror=echo) as s:
        stream = await trio.open_tcp_stream("127.0.0.1", s.port)
        try:
            await stream.send_all(garbage)
        except trio.BrokenResourceError:
            pass
        data = await read_all(stream)
        assert data.startswith(f"HTTP/1.1 {status} ".encode()), data[:200]
        assert f"{ERROR_SOURCE_HEADER}: proxy".encode() in data
        assert b"connection: close" in data.lower()
        # and the server still serves
        r, body = await Client(await trio.open_tcp_stream("127.0.0.1", s.port)).request("GET", "/v2/a")
        assert (r.status_code, body) == (200, b"GET /v2/a 0!")


async def test_slow_and_idle_clients_are_disconnected() -> None:
    limits = ProxyLimits(idle_timeout=0.3, read_timeout=0.3)
    async with server(mirror=echo, limits=limits) as s:
        # half a request, then silence: 408
        stream = await trio.open_tcp_stream("127.0.0.1", s.port)
        await stream.send_all(b"GET /v2/ HTTP/1.1\r\nHost:")
        data = await read_all(stream)
        assert data.startswith(b"HTTP/1.1 408 ")
        # a body that stalls: 408 too, before any response
        stream = await trio.open_tcp_stream("127.0.0.1", s.port)
        await stream.send_all(b"POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        data = await read_all(stream)
        assert data.startswith(b"HTTP/1.1 408 ") and b"stalled" in data
        # a kept-alive connection left idle is closed (no response owed)
        stream = await trio.open_tcp_stream("127.0.0.1", s.port)
        c = Client(stream)
        await c.request("GET", "/v2/")
        assert await read_all(stream) == b""


async def test_http10_client_gets_body_until_close() -> None:
    async with server(mirror=echo) as s:
        stream = await trio.open_tcp_stream("127.0.0.1", s.port)
        await stream.send_all(b"GET /v2/old HTTP/1.0\r\n\r\n")
        data = await read_all(stream)
        assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\nGET /v2/old 0!")


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    for bad in ("127.0.0.1", ":80", "host:99999", "http://x:1", ""):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_listen(bad)


async def test_client_gone_mid_stream_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    """A client that disconnects while a handler streams to it from a nursery (as serve_task does) ends
    that exchange only: no error is logged, the server goes on."""
    sent = trio.Event()

    async def endless(exchange: Exchange) -> None:
        await exchange.start(200, [("Content-Type", "application/octet-stream")])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            while True:
                await exchange.send(b"x" * 65536)
                sent.set()
                await trio.lowlevel.checkpoint()

    async def failing_in_nursery(exchange: Exchange) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            raise KeyError("bug")

    caplog.set_level("INFO", logger="dfz")
    async with server(mirror=endless, forward=failing_in_nursery) as s:
        stream = await trio.open_tcp_stream("127.0.0.1", s.port)
        await stream.send_all(b"GET /v2/blob HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await stream.receive_some(100)).startswith(b"HTTP/1.1 200 OK")
        await sent.wait()
        await stream.aclose()
        await trio.sleep(0.2)
        assert not [r for r in caplog.records if "handler_failed" in r.getMessage()]
        r, body = await Client(await trio.open_tcp_stream("127.0.0.1", s.port)).request("GET", "http://example.com/")
        assert r.status_code == 500 and body == b"internal error: KeyError\n"
        assert [r for r in caplog.records if "handler_failed" in r.getMessage()]


async def test_expect_100_continue() -> None:
    async with server(mirror=echo) as s:
        stream = await trio.open_tcp_stream("127.0.0.1", s.port)
        await stream.send_all(b"POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert (await stream.receive_some(100)).startswith(b"HTTP/1.1 100 ")
        await stream.send_all(b"hello")
        data = b""
        while not data.endswith(b"\r\n0\r\n\r\n"):
            data += await stream.receive_some(1000)
        assert data.startswith(b"HTTP/1.1 200 OK") and b"\r\nPOST /v2/ 5\r\n" in data


@pytest.mark.timeout(60)
def test_a_proxy_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [sys.executable, "-m", "dfz.cli", "daemon", "--data-dir", str(tmp_path / "d"), "--scheduler", "tcp://127.0.0.1:9"]
        done = subprocess.run(
            [*argv, "--proxy-listen", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=45,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    assert done.returncode == 1, done.stderr
    assert f"cannot listen on proxy_listen 127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr


async def test_stats_count_routes_statuses_bytes_errors_and_open_connections() -> None:
    """What :class:`ProxyStats` counts: each request by the route its handler marks and its status class,
    body bytes by route and source, error responses by source, open connections and tunnels; ``observe``
    gets each request's route and duration."""
    observed: list[tuple[str, float]] = []
    entered, release = trio.Event(), trio.Event()

    async def mirror(exchange: Exchange) -> None:
        if exchange.target.startswith("/v2/blob"):
            exchange.mark("mirror_blob", "p2p")
            await exchange.respond(200, body=b"b" * 1000)
        elif exchange.target == "/v2/refused":
            await exchange.error(401, ErrorSource.ORIGIN, "upstream says no", body=b"denied")
        else:
            exchange.source("passthrough")  # the route left as the server set it: mirror_passthrough
            await exchange.respond(200, body=b"manifest")

    async def held_tunnel(exchange: Exchange) -> None:
        stream, _ = await exchange.tunnel()
        entered.set()
        await release.wait()
        await stream.send_all(b"bye")

    async with server(mirror=mirror, forward=broken, connect=held_tunnel, observe=lambda r, t: observed.append((r, t))) as s:
        stats = s.stats
        c = Client(await trio.open_tcp_stream("127.0.0.1", s.port))
        for target in ("/v2/blob", "/v2/blob", "/v2/x/manifests/1", "/v2/refused", "/nothing"):
            await c.request("GET", target)
        assert stats.connections == 1
        r, _ = await c.request("GET", "http://example.com/")  # a handler that raises: 500 from the daemon, closed
        assert r.status_code == 500
        # garbage: refused by the server itself (400, route other)
        garbage = await trio.open_tcp_stream("127.0.0.1", s.port)
        await garbage.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        refused = await read_all(garbage)
        tunnel_stream = await trio.open_tcp_stream("127.0.0.1", s.port)
        await tunnel_stream.send_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        await entered.wait()
        assert (stats.tunnels, stats.connections) == (1, 1)  # the 500 and the refusal closed the others
        release.set()
        assert (await read_all(tunnel_stream)).endswith(b"bye")
        await trio.testing.wait_all_tasks_blocked()  # the server's side of the connection ends
        assert (stats.tunnels, stats.connections) == (0, 0)
        # inside an intercepted tunnel every request is "intercepted", whatever its handler marks
        client_side, server_side = trio.testing.memory_stream_pair()

        async def inner(exchange: Exchange) -> None:
            exchange.mark("forward_p2p", "p2p")
            await exchange.respond(206, body=b"12345")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.serve_stream, server_side, "example.com:443 (intercepted)", inner)
            r, body = await Client(client_side).request("GET", "/file")  # type: ignore[arg-type]
            assert (r.status_code, body) == (206, b"12345")
            await client_side.aclose()

    assert dict(stats.requests) == {
        ("mirror_blob", "2xx"): 2,
        ("mirror_passthrough", "2xx"): 1,
        ("mirror_passthrough", "4xx"): 1,
        ("other", "4xx"): 2,  # the 404 and the refused garbage
        ("forward_passthrough", "5xx"): 1,
        ("connect", "2xx"): 1,
        ("intercepted", "2xx"): 1,
    }
    error_body = len(b"no route for GET /nothing\n") + len(b"internal error: ValueError\n")
    refused_body = len(refused.partition(b"\r\n\r\n")[2])
    assert dict(stats.body_bytes) == {
        ("mirror_blob", "p2p"): 2000,
        ("mirror_passthrough", "passthrough"): len(b"manifest") + len(b"denied"),
        ("other", "proxy"): error_body - len(b"internal error: ValueError\n") + refused_body,
        ("forward_passthrough", "proxy"): len(b"internal error: ValueError\n"),
        ("intercepted", "p2p"): 5,
    }
    assert dict(stats.errors) == {"origin": 1, "proxy": 2, "daemon": 1}
    # every request that got an exchange (the refused garbage did not: no request was read)
    routes = "connect forward_passthrough intercepted mirror_blob mirror_blob mirror_passthrough mirror_passthrough other"
    assert sorted(r for r, _ in observed) == routes.split()
    assert all(0 <= t < 10 for _, t in observed)
    with pytest.raises(ValueError, match="unknown route"):
        Exchange.mark(Exchange.__new__(Exchange), "https://example.com/")
