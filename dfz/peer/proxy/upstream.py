"""The forward proxy's client side: one HTTP/1.1 exchange with an origin, streamed both ways (h11 on trio).

Requests that do not go P2P are relayed to their origin as they came (method, target, end-to-end headers,
body), and the answer is relayed back as it arrives: nothing is buffered beyond one read.

Connections to origins are kept alive between exchanges (:class:`OriginPool`, per scheme, host and port:
a TLS handshake with a distant origin costs more than the small requests a package manager sends). A
connection goes back to the pool only after an exchange that both sides finished cleanly without closing
it; one idle for :data:`POOL_IDLE` seconds is closed when next looked at. An origin may close an idle
connection at any moment: an exchange on a reused connection that fails before any byte of the answer
arrived raises :class:`StaleConnection`, and the caller sends the request again on a new connection (only
requests without a body are sent on a reused connection, so they can be sent again).

What can go wrong, as :class:`UpstreamError` with the HTTP status the proxy answers and who failed:
the name does not resolve or the connection is refused (502, origin), the origin does not connect or answer
within :data:`CONNECT_TIMEOUT` / :data:`HEADERS_TIMEOUT` (504, origin), TLS fails (502, origin), the origin
breaks HTTP (502, origin). A body that stalls for :data:`IDLE_TIMEOUT` or ends early once the answer has
started can only be cut: :meth:`OriginExchange.body` raises and the caller closes the client's connection.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType

import h11
import trio

from ...log import event, get_logger

log = get_logger("peer.proxy.upstream")

CONNECT_TIMEOUT = 10.0
"""Seconds to resolve and connect to an origin (or a CONNECT target)."""
HEADERS_TIMEOUT = 60.0
"""Seconds from the end of the request to the origin's status line and headers."""
IDLE_TIMEOUT = 120.0
"""Seconds a body (either way) may stall before the exchange is cut."""
POOL_IDLE = 30.0
"""Seconds an idle kept-alive connection to an origin is kept for reuse."""
POOL_PER_ORIGIN = 8
"""Idle connections kept per origin."""
POOL_ORIGINS = 256
"""Origins with idle connections kept at once; past that, connections are closed after use."""
READ_SIZE = 256 * 1024
MAX_HEADERS = 64 * 1024
"""Largest response head accepted from an origin."""


class UpstreamError(Exception):
    """The origin could not be reached or broke HTTP: ``status`` is what the proxy answers the client,
    ``source`` who failed (``origin`` or ``proxy``)."""

    def __init__(self, status: int, message: str, source: str = "origin") -> None:
        super().__init__(message)
        self.status = status
        self.source = source


@dataclass(frozen=True)
class Target:
    """Where an absolute-form request goes: ``scheme://host:port`` and the origin-form target to send."""

    scheme: str
    host: str
    port: int
    target: bytes

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}{self.target.decode('ascii')}"


def origin_ssl_context(ca_bundle: str = "", insecure: bool = False) -> ssl.SSLContext:
    """The client TLS context for ``https`` origins, with the trust of the daemon's back-to-source client:
    the system's CAs, or the PEM file ``ca_bundle`` (``http_ca_bundle``); no verification when ``insecure``."""
    context = ssl.create_default_context(cafile=ca_bundle or None)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


async def connect(host: str, port: int) -> trio.SocketStream:
    """A TCP connection to ``host:port``, or :class:`UpstreamError` (502 unreachable, 504 slow after
    :data:`CONNECT_TIMEOUT`)."""
    timeout = CONNECT_TIMEOUT
    try:
        with trio.fail_after(timeout):
            return await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise UpstreamError(504, f"{host}:{port} did not accept a connection within {timeout:g} s") from None
    except socket.gaierror as e:
        raise UpstreamError(502, f"cannot resolve {host}: {e.strerror or e}") from None
    except OSError as e:
        raise UpstreamError(502, f"cannot connect to {host}:{port}: {e.strerror or e}") from None


class StaleConnection(UpstreamError):
    """A reused kept-alive connection failed before the origin answered anything: it had been closed by the
    origin while idle. Send the request again on a new connection."""


_Key = tuple[str, str, int]


class OriginPool:
    """Idle kept-alive connections to origins, by (scheme, host, port); see the module docstring."""

    def __init__(self, *, idle: float = POOL_IDLE, per_origin: int = POOL_PER_ORIGIN, origins: int = POOL_ORIGINS) -> None:
        self.idle = idle
        self.per_origin = per_origin
        self.origins = origins
        self._idle: dict[_Key, list[tuple[float, trio.abc.Stream]]] = {}

    async def take(self, key: _Key) -> trio.abc.Stream | None:
        """An idle connection to ``key`` (the most recently used), or None; expired ones are closed."""
        entries = self._idle.get(key)
        found: trio.abc.Stream | None = None
        while entries and found is None:
            since, stream = entries.pop()
            if trio.current_time() - since <= self.idle:
                found = stream
            else:
                await trio.aclose_forcefully(stream)
        if not entries:
            self._idle.pop(key, None)
        return found

    def give(self, key: _Key, stream: trio.abc.Stream) -> bool:
        """Keep ``stream`` for reuse; False (the caller closes it) when the pool is full."""
        entries = self._idle.get(key)
        if entries is None:
            if len(self._idle) >= self.origins:
                return False
            entries = self._idle[key] = []
        if len(entries) >= self.per_origin:
            return False
        entries.append((trio.current_time(), stream))
        return True

    @property
    def idle_connections(self) -> int:
        return sum(len(entries) for entries in self._idle.values())


class OriginExchange:
    """One request to an origin and its answer. Use as ``async with await OriginExchange.open(...) as x:``;
    on leaving, the connection goes back to the pool if the exchange ended cleanly and both sides keep it
    alive, and is closed otherwise."""

    def __init__(self, stream: trio.abc.Stream, target: Target, *, pool: OriginPool | None = None, reused: bool = False) -> None:
        self.stream = stream
        self.target = target
        self.pool = pool
        self.reused = reused
        self.answered = False
        """Some of the origin's answer arrived (a failure after that is not a stale connection)."""
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADERS)

    @property
    def key(self) -> _Key:
        return (self.target.scheme, self.target.host, self.target.port)

    @classmethod
    async def open(
        cls, target: Target, *, ssl_context: ssl.SSLContext | None = None, pool: OriginPool | None = None, fresh: bool = False
    ) -> OriginExchange:
        """An idle connection from ``pool`` (unless ``fresh``), else a new one (for ``https`` with the TLS
        handshake done, verified with ``ssl_context``)."""
        if pool is not None and not fresh:
            idle = await pool.take((target.scheme, target.host, target.port))
            if idle is not None:
                return cls(idle, target, pool=pool, reused=True)
        stream: trio.abc.Stream = await connect(target.host, target.port)
        if target.scheme == "https":
            assert ssl_context is not None, "https needs an SSL context"
            tls = trio.SSLStream(stream, ssl_context, server_hostname=target.host, https_compatible=True)
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    await tls.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError, trio.TooSlowError) as e:
                await trio.aclose_forcefully(stream)
                cause = e.__cause__ if isinstance(e, trio.BrokenResourceError) and e.__cause__ else e
                raise UpstreamError(502, f"TLS with {target.authority} failed: {cause}") from None
            stream = tls
        return cls(stream, target, pool=pool)

    async def __aenter__(self) -> OriginExchange:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        clean = kind is None and self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE
        if clean and self.pool is not None and self.pool.give(self.key, self.stream):
            return
        await trio.aclose_forcefully(self.stream)

    def _failed(self, status: int, message: str) -> UpstreamError:
        """The error of a failure: :class:`StaleConnection` on a reused connection that got no answer yet."""
        if self.reused and not self.answered:
            return StaleConnection(status, message)
        return UpstreamError(status, message)

    async def _send(self, ev: h11.Event) -> None:
        data = self.conn.send(ev)
        if data:
            try:
                with trio.fail_after(IDLE_TIMEOUT):
                    await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as e:
                raise self._failed(502, f"{self.target.authority} closed the connection during the request: {e}") from None

    async def send_request(
        self, method: bytes, headers: Sequence[tuple[bytes, bytes]], body: AsyncIterator[bytes] | None
    ) -> None:
        """Send the request: ``headers`` are the end-to-end ones (``Host`` and framing are set here).
        ``body`` is streamed; with no ``Content-Length`` among ``headers`` it is sent chunked."""
        out = [(n, v) for n, v in headers if n.lower() not in (b"host", b"content-length", b"connection")]
        length = [v for n, v in headers if n.lower() == b"content-length"]
        framing: list[tuple[bytes, bytes]] = []
        if length:
            framing = [(b"content-length", length[0])]
        elif body is not None:
            framing = [(b"transfer-encoding", b"chunked")]
        keep = [] if self.pool is not None else [(b"connection", b"close")]
        request = h11.Request(
            method=method,
            target=self.target.target,
            headers=[(b"host", self.target.authority.encode("ascii")), *out, *framing, *keep],
        )
        try:
            await self._send(request)
            if body is not None:
                async for chunk in body:
                    await self._send(h11.Data(data=chunk))
            await self._send(h11.EndOfMessage())
        except h11.LocalProtocolError as e:
            raise UpstreamError(400, f"the request cannot be relayed: {e}", source="proxy") from None

    async def _next_event(self, wait: float) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        while True:
            try:
                ev = self.conn.next_event()
            except h11.RemoteProtocolError as e:
                raise self._failed(502, f"{self.target.authority} broke HTTP/1.1: {e}") from None
            if ev is not h11.NEED_DATA:
                return ev
            try:
                with trio.fail_after(wait):
                    data = await self.stream.receive_some(READ_SIZE)
            except trio.TooSlowError:
                raise UpstreamError(504, f"{self.target.authority} sent nothing for {wait:g} s") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as e:
                raise self._failed(502, f"{self.target.authority} reset the connection: {e}") from None
            if data:
                self.answered = True
            self.conn.receive_data(bytes(data))

    async def response(self) -> h11.Response:
        """The origin's final answer head (interim 1xx answers are skipped)."""
        while True:
            ev = await self._next_event(HEADERS_TIMEOUT)
            if isinstance(ev, h11.Response):
                return ev
            if isinstance(ev, h11.InformationalResponse):
                continue
            if isinstance(ev, h11.ConnectionClosed):
                raise self._failed(502, f"{self.target.authority} closed the connection without an answer")
            raise UpstreamError(502, f"{self.target.authority} sent {type(ev).__name__} before an answer")

    async def body(self) -> AsyncIterator[bytes]:
        """The answer's body as it arrives; raises :class:`UpstreamError` when it stalls or is cut short."""
        while True:
            ev = await self._next_event(IDLE_TIMEOUT)
            if isinstance(ev, h11.Data):
                yield bytes(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                return
            else:
                event(log, logging.DEBUG, "proxy.origin_cut", origin=self.target.authority, got=type(ev).__name__)
                raise UpstreamError(502, f"{self.target.authority} ended the answer early")
