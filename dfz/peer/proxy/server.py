"""The daemon's proxy port: an HTTP/1.1 server (trio + h11) that dispatches each request by its form.

Theory of operation
    One trio task per connection drives an :class:`h11.Connection` (the sans-I/O HTTP/1.1 state machine:
    bytes in, events out; this file owns the socket). Each request becomes an :class:`Exchange` handed to
    one handler, chosen by the request target's form (RFC 9112 §3.2):

    ========================================  ==========================================================
    request                                   handler
    ========================================  ==========================================================
    ``CONNECT host:port``                     ``connect`` (a tunnel: :meth:`Exchange.tunnel`)
    absolute form, ``http://host/path``       ``forward`` (a forward proxy request)
    origin form ``/v2`` or ``/v2/...``        ``mirror`` (the registry mirror)
    anything else                             404, from the proxy
    ========================================  ==========================================================

    A handler not configured answers 501 (the proxy does not do that). Connections are kept alive
    between requests; a request body the handler did not read is drained (up to
    :attr:`ProxyLimits.drain_bytes`, else the connection closes). Request bodies are streamed to the
    handler (:meth:`Exchange.body`); responses are streamed by the handler (:meth:`Exchange.start` then
    :meth:`Exchange.send` and :meth:`Exchange.end`), with ``Content-Length`` when the handler gives one,
    chunked otherwise (HTTP/1.0 clients: until the connection closes).

Rules
    * Nothing a client sends crashes the server: a malformed request, oversized headers (over
      :attr:`ProxyLimits.max_header_bytes`) or a protocol violation gets a 400 (431 for headers too large)
      if a response can still be sent, and the connection is closed. A client idle for
      :attr:`ProxyLimits.idle_timeout` between requests, or slower than :attr:`ProxyLimits.read_timeout`
      to send a request's headers or the next part of its body, is disconnected.
    * A handler that raises is logged; the client gets a 500 from the daemon if nothing was sent yet,
      else the connection is closed (a response cut short is the only honest signal then).
    * Every error response carries two headers, set by :meth:`Exchange.error`:
      ``X-Dfz-Error-Source: origin|proxy|daemon`` (who failed: the origin or upstream registry answered
      an error or could not be reached; the proxy refused the request itself; the daemon's P2P download
      failed) and ``X-Dfz-Error: <short message>`` (one line of visible ASCII, at most 300 characters).
      An error status relayed unchanged from an origin (a 401 with its ``WWW-Authenticate``, a 404) carries
      ``X-Dfz-Error-Source: origin`` too.

Metrics
    The server counts what it serves in :class:`ProxyStats` (:attr:`ProxyServer.stats`; the daemon's
    Prometheus collector reads it at scrape time): requests by route and status class, response body
    bytes by route and by where they came from, error responses by their ``X-Dfz-Error-Source``, the
    connections and tunnels open now. Each request's route (:data:`ROUTES`) is set by the server from the
    request's form and refined by the handler (:meth:`Exchange.mark`); the body's source
    (:data:`BODY_SOURCES`) by the handler that sends it. ``observe(route, seconds)``, when given, gets
    each request's duration: from its head read to its response ended (a tunnel: to its ``200``).

Public API (kept small and stable: the forward proxy builds on it)
    :class:`ProxyServer` (``await nursery.start(server.run)`` returns it; :attr:`ProxyServer.url`),
    :class:`ProxyListenError`, :class:`ProxyLimits`, :class:`Exchange`, :data:`Handler`, :class:`ErrorSource`,
    :data:`ERROR_SOURCE_HEADER`, :data:`ERROR_HEADER`, :class:`ProxyStats`, :data:`ROUTES`, :data:`BODY_SOURCES`.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from http import HTTPStatus
from typing import cast

import h11
import trio

from ...log import event, get_logger

__all__ = [
    "BODY_SOURCES",
    "ERROR_HEADER",
    "ERROR_SOURCE_HEADER",
    "ROUTES",
    "ErrorSource",
    "Exchange",
    "Handler",
    "ProxyLimits",
    "ProxyListenError",
    "ProxyServer",
    "ProxyStats",
    "parse_listen",
]

log = get_logger("peer.proxy")

ERROR_SOURCE_HEADER = "X-Dfz-Error-Source"
"""On every error response: who failed (:class:`ErrorSource`)."""
ERROR_HEADER = "X-Dfz-Error"
"""On every error response: a short message (one line, visible ASCII, at most 300 characters)."""
SERVER_NAME = "dfz-proxy"

ROUTES = ("mirror_blob", "mirror_passthrough", "forward_p2p", "forward_passthrough", "connect", "intercepted", "other")
"""The routes a request can take, the ``route`` label of the proxy's metrics: a registry blob served by a task,
another registry request passed through, an absolute-form request served by a task or passed through, a
``CONNECT``, a request inside an intercepted tunnel, anything else (404s, malformed requests)."""
BODY_SOURCES = ("p2p", "passthrough", "proxy")
"""Where a response body came from: a dfz task, the origin (or upstream registry), the proxy itself (its
error messages)."""

_ERROR_LENGTH = 300
_CHUNK = 256 * 1024


class ErrorSource(StrEnum):
    ORIGIN = "origin"
    """The origin (or upstream registry) answered an error, or could not be reached."""
    PROXY = "proxy"
    """The proxy refused the request (malformed, not allowed, no such route)."""
    DAEMON = "daemon"
    """The daemon failed: its P2P download, its scheduler, its storage, or a bug."""


_ERROR_SOURCES = frozenset(e.value for e in ErrorSource)


@dataclass(frozen=True)
class ProxyLimits:
    """Bounds that protect the server from its clients."""

    max_header_bytes: int = 64 * 1024
    """Largest request head (request line and headers); more: 431."""
    idle_timeout: float = 60.0
    """Seconds a kept-alive connection may wait for its next request."""
    read_timeout: float = 30.0
    """Seconds for a request's head to arrive once it started, and between parts of its body."""
    drain_bytes: int = 1024 * 1024
    """Request body bytes read and thrown away after a handler that did not read them, to keep the
    connection; a longer unread body closes it."""
    max_connections: int = 1024
    """Connections served at once; more wait to be accepted."""

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "drain_bytes", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("idle_timeout", "read_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


@dataclass
class ProxyStats:
    """What the proxy port served since it started (read by the daemon's metrics collector)."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Requests by (route, status class: ``2xx``... or ``none`` when no response could be sent)."""
    body_bytes: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Response body bytes sent, by (route, source: one of :data:`BODY_SOURCES`)."""
    errors: Counter[str] = field(default_factory=Counter)
    """Error responses by their ``X-Dfz-Error-Source`` (:class:`ErrorSource` values)."""
    tunnel_bytes: int = 0
    """Bytes carried by CONNECT tunnels that were not intercepted (both ways), counted when they close."""
    connections: int = 0
    """Client connections open now."""
    tunnels: int = 0
    """CONNECT tunnels open now (intercepted ones included)."""


def status_class(status: int | None) -> str:
    """``2xx`` for 200..299 and so on; ``none`` when no response was sent."""
    return f"{status // 100}xx" if status is not None and 100 <= status < 600 else "none"


class ProxyListenError(OSError):
    """The proxy port cannot be bound (in use, no such address, no permission)."""


class _ClientGone(Exception):
    """The client closed the connection, or broke the protocol; ``status`` is what to answer (if anything
    can still be answered)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


Handler = Callable[["Exchange"], Awaitable[None]]
"""A handler serves one request: it reads what it needs of the request, and sends one whole response
(:meth:`Exchange.respond`, :meth:`Exchange.error`, or :meth:`Exchange.start`/:meth:`Exchange.send`/
:meth:`Exchange.end`), or takes the connection over with :meth:`Exchange.tunnel` (CONNECT only). When
the client goes away, the exchange's methods raise and the handler is cancelled with the connection."""


def _clean(message: str) -> str:
    """A header-safe one-line version of ``message``."""
    text = "".join(c if 0x20 <= ord(c) < 0x7F else " " for c in message)
    text = " ".join(text.split())
    return text[:_ERROR_LENGTH] or "error"


class Exchange:
    """One request and its response, for a :data:`Handler`.

    ``method`` (``GET``, ``CONNECT``, ...), ``target`` (the request target as sent: ``/v2/...``,
    ``http://host/path``, ``host:port``), ``headers`` (names lowercased, values as sent, decoded as
    Latin-1, in order), ``http_version`` (``1.1`` or ``1.0``), ``client`` (``host:port`` of the peer).
    """

    def __init__(self, conn: _Connection, request: h11.Request) -> None:
        self._conn = conn
        self.method = request.method.decode("ascii", "replace")
        self.target = request.target.decode("latin-1")
        self.headers: list[tuple[str, str]] = [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in request.headers]
        self.http_version = request.http_version.decode("ascii", "replace")
        self.client = conn.peer
        self.status: int | None = None
        """The status sent, once :meth:`start` (or :meth:`respond`, :meth:`error`) was called."""
        self.body_done = False
        self.ended = False
        self.tunnelled = False
        self.route = "intercepted" if conn.handler is not None else "other"
        """The route taken (one of :data:`ROUTES`): set by the server, refined by the handler (:meth:`mark`)."""
        self.body_source = "proxy"
        """Where the body being sent comes from (one of :data:`BODY_SOURCES`): set by the handler."""
        self.started_at = trio.current_time()
        self.finished_at: float | None = None
        """When the response ended (a tunnel: its ``200`` was sent); None while it has not."""

    def mark(self, route: str, body_source: str | None = None) -> None:
        """Say which route this request took (a request inside an intercepted tunnel stays ``intercepted``)
        and, optionally, where its body comes from."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}")
        if self.route != "intercepted":
            self.route = route
        if body_source is not None:
            self.source(body_source)

    def source(self, body_source: str) -> None:
        """Say where the body about to be sent comes from."""
        if body_source not in BODY_SOURCES:
            raise ValueError(f"unknown body source {body_source!r}")
        self.body_source = body_source

    # -- the request --

    def header(self, name: str) -> str | None:
        """The value of the first header ``name`` (case-insensitive), or None."""
        lname = name.lower()
        for n, v in self.headers:
            if n == lname:
                return v
        return None

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name``, in order."""
        lname = name.lower()
        return [v for n, v in self.headers if n == lname]

    async def body(self) -> AsyncIterator[bytes]:
        """The request body, part by part as it arrives (nothing for a request without one). Raises
        :class:`trio.TooSlowError` when the client stalls for ``read_timeout``."""
        if self._conn.h11.client_is_waiting_for_100_continue and not self.started:
            await self._conn.send(h11.InformationalResponse(status_code=100, headers=[]))
        while not self.body_done:
            with trio.fail_after(self._conn.limits.read_timeout):
                ev = await self._conn.next_event()
            if isinstance(ev, h11.Data):
                yield bytes(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                self.body_done = True
            else:  # pragma: no cover - h11 yields only these between Request and EndOfMessage
                raise _ClientGone(f"unexpected {type(ev).__name__} in a request body")

    async def read_body(self, limit: int) -> bytes:
        """The whole request body, at most ``limit`` bytes (more raises ``ValueError``)."""
        out = bytearray()
        async for part in self.body():
            out += part
            if len(out) > limit:
                raise ValueError(f"the request body is over {limit} bytes")
        return bytes(out)

    # -- the response --

    @property
    def started(self) -> bool:
        return self.status is not None

    async def start(self, status: int, headers: Iterable[tuple[str, str]] = (), *, content_length: int | None = None) -> None:
        """Send the status line and headers. With ``content_length`` the body must be exactly that long
        (a HEAD request: no body is sent, the length describes the GET); without, it is chunked."""
        if self.started:
            raise RuntimeError("the response was started already")
        out = [(n, v) for n, v in headers if n.lower() not in ("content-length", "transfer-encoding", "connection")]
        if content_length is not None:
            out.append(("Content-Length", str(content_length)))
        if not any(n.lower() == "server" for n, _ in out):
            out.append(("Server", SERVER_NAME))
        said = next((v for n, v in out if n.lower() == ERROR_SOURCE_HEADER.lower()), None)
        if said is not None:
            self._conn.stats.errors[said if said in _ERROR_SOURCES else ErrorSource.PROXY.value] += 1
        self.status = status
        raw = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in out]
        await self._conn.send(h11.Response(status_code=status, headers=raw, reason=_reason(status)))

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send part of the body (ignored, and not sent, for a HEAD request)."""
        if self.method == "HEAD" or not len(data):
            return
        view = memoryview(data)
        for start in range(0, len(view), _CHUNK):
            part = view[start : start + _CHUNK]
            await self._conn.send(h11.Data(data=cast(bytes, part)))
            self._conn.stats.body_bytes[self.route, self.body_source] += len(part)

    async def end(self) -> None:
        """Finish the response."""
        if not self.ended:
            self.ended = True
            await self._conn.send(h11.EndOfMessage())
            self.finished_at = trio.current_time()

    async def respond(self, status: int, headers: Iterable[tuple[str, str]] = (), body: bytes = b"") -> None:
        """A whole response at once."""
        await self.start(status, headers, content_length=len(body))
        await self.send(body)
        await self.end()

    async def error(
        self, status: int, source: ErrorSource, message: str, headers: Iterable[tuple[str, str]] = (), body: bytes | None = None
    ) -> None:
        """An error response with the :data:`ERROR_SOURCE_HEADER` and :data:`ERROR_HEADER` headers; the
        body is ``body`` as given (a relayed origin answer) or the message and a newline (text/plain)."""
        text = _clean(message)
        out = [(n, v) for n, v in headers if n.lower() not in (ERROR_SOURCE_HEADER.lower(), ERROR_HEADER.lower())]
        self.source("passthrough" if body is not None and source is ErrorSource.ORIGIN else "proxy")
        if body is None:
            body = f"{text}\n".encode()
            out = [(n, v) for n, v in out if n.lower() != "content-type"] + [("Content-Type", "text/plain; charset=utf-8")]
        out += [(ERROR_SOURCE_HEADER, source.value), (ERROR_HEADER, text)]
        await self.respond(status, out, body)

    async def tunnel(self, headers: Iterable[tuple[str, str]] = ()) -> tuple[trio.abc.Stream, bytes]:
        """Answer a CONNECT with 200 and hand the connection over: the stream, and the bytes the client
        sent after its request that h11 had already read. The server closes the stream after the handler
        returns; the connection serves no other request."""
        if self.method != "CONNECT":
            raise RuntimeError("only a CONNECT request can be tunnelled")
        await self.start(200, headers)
        self.tunnelled = True
        self.ended = True
        self.finished_at = trio.current_time()
        self._conn.stats.tunnels += 1
        return self._conn.stream, bytes(self._conn.h11.trailing_data[0])

    def tunnel_closed(self, moved: int) -> None:
        """Count the bytes a tunnel (not intercepted) carried, both ways, once it closed."""
        if moved > 0:
            self._conn.stats.tunnel_bytes += moved


class _Connection:
    """One client connection: the h11 state machine and its stream."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        limits: ProxyLimits,
        *,
        peer: str = "",
        handler: Handler | None = None,
        stats: ProxyStats | None = None,
    ) -> None:
        self.stream = stream
        self.limits = limits
        self.stats = stats if stats is not None else ProxyStats()
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.handler = handler
        """Every request of this connection goes to it (inside an intercepted tunnel); None: dispatch by form."""
        self.peer = peer or "?"
        if not peer and isinstance(stream, trio.SocketStream):
            try:
                host, port = stream.socket.getpeername()[:2]
                self.peer = f"{host}:{port}"
            except OSError:
                pass

    async def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """The next event from the client, reading as needed (callers bound the wait with
        ``trio.fail_after``); :class:`_ClientGone` when the client broke the protocol or vanished."""
        while True:
            try:
                ev = self.h11.next_event()
            except h11.RemoteProtocolError as e:
                raise _ClientGone(f"malformed request: {e}", e.error_status_hint) from None
            if ev is not h11.NEED_DATA:
                return ev
            try:
                data = await self.stream.receive_some(_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise _ClientGone(f"connection lost: {e}") from None
            try:
                self.h11.receive_data(bytes(data))  # a no-op on bytes; a TLS stream's type allows bytearray
            except h11.RemoteProtocolError as e:
                raise _ClientGone(f"malformed request: {e}", e.error_status_hint) from None

    async def send(self, ev: h11.Event) -> None:
        try:
            data = self.h11.send(ev)
        except h11.LocalProtocolError as e:
            raise RuntimeError(f"the handler broke HTTP: {e}") from None
        if data:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise _ClientGone(f"connection lost: {e}") from None


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) of the proxy port; ``ValueError`` says what is wrong."""
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})", text.strip()) if isinstance(text, str) else None
    if match is None or int(match[2]) > 65535:
        raise ValueError(f"proxy_listen {text!r}: give HOST:PORT, e.g. 127.0.0.1:65001 (port 0: any free port)")
    return match[1].strip("[]"), int(match[2])


class ProxyServer:
    """The proxy port on ``listen`` (``HOST:PORT``; port 0: a free one). ``mirror``, ``forward`` and
    ``connect`` are the :data:`Handler` of each request form (see the module docstring); None: 501.

    ``await nursery.start(server.run)`` returns the server once it listens (:attr:`url` is then its
    ``http://HOST:PORT``); cancel to stop (connections in progress are closed). :attr:`stats` counts what
    it served; ``observe(route, seconds)`` gets each request's duration (see the module docstring).
    """

    def __init__(
        self,
        listen: str,
        *,
        mirror: Handler | None = None,
        forward: Handler | None = None,
        connect: Handler | None = None,
        limits: ProxyLimits | None = None,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.host, self.port = parse_listen(listen)
        self.mirror = mirror
        self.forward = forward
        self.connect = connect
        self.limits = limits or ProxyLimits()
        self.stats = ProxyStats()
        self.observe = observe
        self.url = ""
        self._slots = trio.Semaphore(self.limits.max_connections)

    async def run(self, *, task_status: trio.TaskStatus[ProxyServer] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. Raises :class:`ProxyListenError` when the address cannot be bound."""
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        except OSError as e:
            raise ProxyListenError(f"cannot listen on proxy_listen {self.host}:{self.port}: {e.strerror or e}") from None
        sockname = listeners[0].socket.getsockname()
        self.port = int(sockname[1])
        host = sockname[0]
        self.url = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        event(log, logging.INFO, "proxy.listening", url=self.url)
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            for listener in listeners:
                nursery.start_soon(self._accept, listener, nursery)

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                await self._slots.acquire()
                try:
                    stream = await listener.accept()
                except BaseException:
                    self._slots.release()
                    raise
                nursery.start_soon(self._serve, stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.stats.connections += 1
        try:
            async with stream:
                await self._connection(_Connection(stream, self.limits, stats=self.stats))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.stats.connections -= 1
            self._slots.release()

    async def serve_stream(self, stream: trio.abc.Stream, peer: str, handler: Handler) -> None:
        """Serve HTTP/1.1 on a stream that is already open (the TLS stream of an intercepted CONNECT tunnel),
        with this server's limits and error handling, every request handed to ``handler``; returns when the
        connection ends. The caller closes the stream."""
        try:
            await self._connection(_Connection(stream, self.limits, peer=peer, handler=handler, stats=self.stats))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def _connection(self, conn: _Connection) -> None:
        first = True
        while True:
            try:
                with trio.fail_after(self.limits.read_timeout if first else self.limits.idle_timeout):
                    ev = await conn.next_event()
            except trio.TooSlowError:
                if conn.h11.trailing_data[0]:  # part of a request came, then nothing: say so
                    await self._refuse(conn, 408, "the request did not arrive in time")
                return
            except _ClientGone as e:
                await self._refuse(conn, e.status, str(e))
                return
            first = False
            if isinstance(ev, h11.ConnectionClosed) or ev is h11.PAUSED:
                return
            if not isinstance(ev, h11.Request):  # pragma: no cover - h11 starts each cycle with a Request
                return
            if ev.http_version not in (b"1.0", b"1.1"):
                await self._refuse(conn, 505, f"HTTP/{ev.http_version.decode('ascii', 'replace')} is not served: use HTTP/1.1")
                return
            size = len(ev.target) + sum(len(n) + len(v) + 4 for n, v in ev.headers)
            if size > self.limits.max_header_bytes:
                await self._refuse(conn, 431, f"the request head is over {self.limits.max_header_bytes} bytes")
                return
            exchange = Exchange(conn, ev)
            try:
                keep = await self._dispatch(exchange)
            finally:
                self._count(exchange)
            if not keep:
                return
            if exchange.tunnelled:
                return
            if not await self._finish_cycle(conn, exchange):
                return

    def _count(self, exchange: Exchange) -> None:
        """Count a request that was served (or failed): its route and status class, its duration."""
        if exchange.tunnelled:
            self.stats.tunnels -= 1
        self.stats.requests[exchange.route, status_class(exchange.status)] += 1
        if self.observe is not None:
            ended = exchange.finished_at if exchange.finished_at is not None else trio.current_time()
            self.observe(exchange.route, max(0.0, ended - exchange.started_at))

    async def _dispatch(self, exchange: Exchange) -> bool:
        """Run the handler of ``exchange``; False when the connection must close."""
        handler, what = (exchange._conn.handler, "") if exchange._conn.handler else self._handler_for(exchange)
        try:
            if handler is None:
                if what == "none":
                    await exchange.error(404, ErrorSource.PROXY, f"no route for {exchange.method} {exchange.target[:100]}")
                else:
                    await exchange.error(501, ErrorSource.PROXY, f"this proxy port does not serve {what} requests")
            else:
                await handler(exchange)
        except _ClientGone:
            return False
        except trio.TooSlowError:
            if not exchange.started:
                await self._error_safely(exchange, 408, ErrorSource.PROXY, "the request body stalled")
            return False
        except BaseExceptionGroup as group:  # from a handler's nursery
            _, other = group.split((_ClientGone, trio.TooSlowError))
            if other is None:  # the client went away (or stalled) while a handler's tasks served it
                return False
            leaves = _leaves(other)
            if not all(isinstance(e, Exception) for e in leaves):
                raise
            await self._handler_failed(exchange, leaves[0])
            return False
        except Exception as e:
            await self._handler_failed(exchange, e)
            return False
        if not exchange.started:
            await self._error_safely(exchange, 500, ErrorSource.DAEMON, "internal error: the handler sent no response")
            return False
        return exchange.ended or exchange.tunnelled  # a response cut short: closing says so

    async def _handler_failed(self, exchange: Exchange, e: BaseException) -> None:
        event(log, logging.ERROR, "proxy.handler_failed", method=exchange.method, target=exchange.target[:200], error=repr(e))
        if not exchange.started:
            await self._error_safely(exchange, 500, ErrorSource.DAEMON, f"internal error: {type(e).__name__}")

    def _handler_for(self, exchange: Exchange) -> tuple[Handler | None, str]:
        """The handler of ``exchange``'s form and its name; sets the route the handler may refine."""
        target = exchange.target
        if exchange.method == "CONNECT":
            exchange.mark("connect")
            return self.connect, "CONNECT"
        if re.match(r"(?i)https?://", target):
            exchange.mark("forward_passthrough")
            return self.forward, "forward-proxy (absolute-form)"
        if target == "/v2" or target.startswith(("/v2/", "/v2?")):
            exchange.mark("mirror_passthrough")
            return self.mirror, "registry mirror"
        return None, "none"

    async def _error_safely(self, exchange: Exchange, status: int, source: ErrorSource, message: str) -> None:
        try:
            await exchange.error(status, source, message)
        except (_ClientGone, RuntimeError):
            pass

    async def _finish_cycle(self, conn: _Connection, exchange: Exchange) -> bool:
        """Drain what the handler left of the request body; start the next cycle. False: close."""
        h = conn.h11
        if h.their_state is h11.SEND_BODY:
            left = self.limits.drain_bytes
            try:
                async for part in exchange.body():
                    left -= len(part)
                    if left < 0:
                        return False
            except (_ClientGone, trio.TooSlowError):
                return False
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            try:
                h.start_next_cycle()
            except h11.LocalProtocolError:
                return False
            return True
        return False

    async def _refuse(self, conn: _Connection, status: int, message: str) -> None:
        """Answer a request that could not be read (if an answer can still be sent), before closing."""
        if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        text = _clean(message)
        body = f"{text}\n".encode()
        headers = [
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", str(len(body)).encode()),
            (b"Connection", b"close"),
            (b"Server", SERVER_NAME.encode()),
            (ERROR_SOURCE_HEADER.encode(), ErrorSource.PROXY.value.encode()),
            (ERROR_HEADER.encode(), text.encode()),
        ]
        try:
            # h11 refuses to send a response after a protocol error; build the bytes with a fresh machine.
            writer = h11.Connection(h11.SERVER)
            writer.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            writer.next_event()
            data = writer.send(h11.Response(status_code=status, headers=headers, reason=_reason(status))) or b""
            data += writer.send(h11.Data(data=body)) or b""
            data += writer.send(h11.EndOfMessage()) or b""
            with trio.move_on_after(5):
                await conn.stream.send_all(data)
                # Counted once sent: a client that reset its connection between requests asked nothing.
                route = "intercepted" if conn.handler is not None else "other"
                self.stats.requests[route, status_class(status)] += 1
                self.stats.errors[ErrorSource.PROXY.value] += 1
                self.stats.body_bytes[route, "proxy"] += len(body)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError):
            pass
