"""The forward proxy: the proxy port's handlers for absolute-form requests (``GET http://host/path``) and
``CONNECT host:port`` (:class:`ForwardProxy`).

Theory of operation
    An absolute-form request is checked (scheme ``http`` or ``https``, a host, no credentials in the URL,
    no loop through this proxy), then routed by :class:`~dfz.peer.proxy.rules.ProxyPolicy`:

    * **P2P**: a ``GET`` whose URL a rule sends through the daemon becomes a dfz task (the task id from the
      URL as ``dfz get`` computes it; the request's end-to-end headers such as ``Authorization`` go with it,
      see :func:`~dfz.peer.proxy.rules.p2p_headers`) and is answered from it, ``Range`` included, by the
      proxy port's task responder. Its failures are answered with the status and error headers it chooses.
    * **pass-through**: anything else is relayed to the origin (:mod:`.upstream`), body streamed both ways,
      hop-by-hop headers dropped both ways (:func:`~dfz.peer.proxy.rules.end_to_end`), the proxy added to
      ``Via``. An answer the origin gives is relayed as it is, error statuses included (those carry
      ``X-Dfz-Error-Source: origin``); an origin that cannot be reached is a 502 (504 when it is slow) from
      the proxy with ``X-Dfz-Error-Source: origin``.

    ``CONNECT`` is a tunnel (:mod:`.tunnel`) to an allowed target, or, for a host the operator intercepts,
    TLS terminated here (:mod:`.intercept`) and the requests inside served as ``https://host...`` URLs by
    the same routing.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import h11
import trio

from ...log import event, get_logger
from ..local import DownloadRequest
from . import upstream
from .intercept import CertificateAuthority, PrefixedStream
from .rules import ProxyPolicy, Route, end_to_end, fits_a_task, looped, p2p_headers, with_via
from .server import ErrorSource, Exchange
from .tunnel import BadAuthority, parse_authority, splice

log = get_logger("peer.proxy.forward")

TaskResponder = Callable[[Exchange, DownloadRequest], Awaitable[None]]
"""Answers an exchange from a dfz task: downloads (or joins) it through the daemon, then sends its bytes
(``Range`` honoured) or the error response of its failure."""

TLS_HANDSHAKE_TIMEOUT = 15.0
"""Seconds for a client to complete the TLS handshake of an intercepted tunnel."""

_NO_BODY_STATUS = (204, 304)


class BadTarget(ValueError):
    """An absolute-form target the proxy will not relay."""


def parse_target(target: str) -> upstream.Target:
    """The origin and origin-form target of an absolute URL ``http(s)://host[:port]/path?query``."""
    if len(target) > 8192:
        raise BadTarget("the URL is over 8192 characters")
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in target):
        raise BadTarget("the URL has spaces or characters outside visible ASCII")
    try:
        parts = urlsplit(target)
        port = parts.port
    except ValueError as e:
        raise BadTarget(f"malformed URL {target[:100]!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise BadTarget(f"only http:// and https:// URLs are proxied, got {scheme}://")
    if parts.username is not None or parts.password is not None:
        raise BadTarget("credentials in the URL are refused: send an Authorization header")
    host = parts.hostname
    if not host:
        raise BadTarget(f"no host in {target[:100]!r}")
    path = parts.path or "/"
    if not path.startswith("/"):
        raise BadTarget(f"the path of {target[:100]!r} must start with /")
    origin_form = path + (f"?{parts.query}" if parts.query else "")
    if port == 0:
        raise BadTarget("port 0 is not a port")
    return upstream.Target(scheme, host, port or (443 if scheme == "https" else 80), origin_form.encode("ascii"))


def _raw(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]


def _text(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]


def _visible(raw: bytes) -> str:
    """An origin's reason phrase, as visible ASCII for a header value (at most 100 characters)."""
    return "".join(chr(b) if 0x20 <= b < 0x7F else "?" for b in raw[:100])


def _has_body(exchange: Exchange) -> bool:
    length = exchange.header("content-length")
    if exchange.header("transfer-encoding") is not None:
        return True
    return length is not None and length.strip() not in ("", "0")


class ForwardProxy:
    """The ``forward`` and ``connect`` handlers of the proxy port.

    ``policy`` decides P2P or pass-through and which CONNECT targets are allowed or intercepted;
    ``tasks`` answers P2P requests (None: nothing goes P2P, every request passes through); ``origin_tls`` is
    the client TLS context for ``https`` origins (the daemon's back-to-source trust: ``http_ca_bundle``,
    ``http_insecure``); ``ca`` the operator's CA for interception (None: no interception).
    ``serve_stream(stream, peer, handler)`` serves the HTTP requests of an intercepted tunnel with a handler
    (:meth:`ProxyServer.serve_stream <dfz.peer.proxy.server.ProxyServer.serve_stream>`, the proxy port's
    connection loop); interception needs it as well as ``ca``.
    """

    def __init__(
        self,
        policy: ProxyPolicy,
        *,
        tasks: TaskResponder | None,
        origin_tls: ssl.SSLContext,
        ca: CertificateAuthority | None = None,
        serve_stream: Callable[[trio.abc.Stream, str, Callable[[Exchange], Awaitable[None]]], Awaitable[None]] | None = None,
    ) -> None:
        self.policy = policy
        self.tasks = tasks
        self.origin_tls = origin_tls
        self.ca = ca
        self.serve_stream = serve_stream
        self.pool = upstream.OriginPool()
        """Kept-alive connections to origins, for pass-through requests."""

    # -- absolute-form requests --

    async def forward(self, exchange: Exchange) -> None:
        """The handler of absolute-form requests."""
        try:
            target = parse_target(exchange.target)
        except BadTarget as e:
            await exchange.error(400, ErrorSource.PROXY, str(e))
            return
        await self.serve(exchange, target)

    async def serve(self, exchange: Exchange, target: upstream.Target) -> None:
        """Route one request for ``target`` (absolute form, or read inside an intercepted tunnel)."""
        raw = _raw(exchange.headers)
        if looped(raw):
            await exchange.error(508, ErrorSource.PROXY, "the request came back to this proxy (Via): a proxy loop")
            return
        url = target.url
        route = self.policy.route(exchange.method, url, has_body=_has_body(exchange))
        event(log, logging.DEBUG, "proxy.request", method=exchange.method, url=url, route=route.value)
        if route is Route.P2P and self.tasks is not None:
            task_headers = p2p_headers(raw)
            if fits_a_task(task_headers):
                exchange.mark("forward_p2p")
                await self.tasks(exchange, DownloadRequest(url=url, output=None, headers=task_headers))
                return
            event(log, logging.INFO, "proxy.p2p_headers_too_large", url=url, headers=len(task_headers))
        await self.pass_through(exchange, target, raw)

    async def pass_through(self, exchange: Exchange, target: upstream.Target, raw: list[tuple[bytes, bytes]]) -> None:
        """Relay the request to the origin and its answer back, streamed."""
        headers = with_via([(n, v) for n, v in end_to_end(raw) if n != b"expect"])
        body: AsyncIterator[bytes] | None = exchange.body() if _has_body(exchange) else None
        if body is None and exchange.header("content-length") is not None:
            headers = [(n, v) for n, v in headers if n != b"content-length"] + [(b"content-length", b"0")]
        tls = self.origin_tls if target.scheme == "https" else None
        method = exchange.method.encode("ascii")
        for attempt in range(2):
            try:
                # A request with a body is sent once, on a new connection: it could not be sent again.
                fresh = body is not None or attempt > 0
                async with await upstream.OriginExchange.open(target, ssl_context=tls, pool=self.pool, fresh=fresh) as origin:
                    await origin.send_request(method, headers, body)
                    response = await origin.response()
                    await self._relay(exchange, origin, response)
                return
            except upstream.StaleConnection as e:
                event(log, logging.DEBUG, "proxy.origin_stale", url=target.url, error=str(e))
            except upstream.UpstreamError as e:
                event(log, logging.INFO, "proxy.origin_failed", url=target.url, status=e.status, error=str(e))
                if not exchange.started:
                    await exchange.error(e.status, ErrorSource(e.source), str(e))
                # Otherwise the answer is cut short: the server closes the client's connection, which says so.
                return

    async def _relay(self, exchange: Exchange, origin: upstream.OriginExchange, response: h11.Response) -> None:
        # The error headers are the proxy's to say; an origin's own are not relayed.
        headers = [(n, v) for n, v in end_to_end(response.headers) if not n.lower().startswith(b"x-dfz-error")]
        length_values = [v for n, v in headers if n == b"content-length"]
        headers = with_via([(n, v) for n, v in headers if n != b"content-length"])
        content_length: int | None = None
        if length_values and response.status_code not in _NO_BODY_STATUS:
            try:
                content_length = int(length_values[0])
            except ValueError:
                content_length = None
        out = _text(headers)
        if response.status_code >= 400:
            out += [
                ("X-Dfz-Error-Source", ErrorSource.ORIGIN.value),
                (
                    "X-Dfz-Error",
                    f"the origin answered {response.status_code} {_visible(response.reason)}",
                ),
            ]
        exchange.mark("forward_passthrough", "passthrough")
        await exchange.start(response.status_code, out, content_length=content_length)
        async for chunk in origin.body():
            await exchange.send(chunk)
        await exchange.end()

    # -- CONNECT --

    async def connect(self, exchange: Exchange) -> None:
        """The handler of CONNECT requests: a tunnel, or TLS interception for the operator's hosts."""
        try:
            host, port = parse_authority(exchange.target)
        except BadAuthority as e:
            await exchange.error(400, ErrorSource.PROXY, str(e))
            return
        if not self.policy.connect_allowed(host, port):
            await exchange.error(
                403,
                ErrorSource.PROXY,
                f"CONNECT to {host}:{port} is not allowed (proxy_connect_allow {self.policy.connect_allow!r})",
            )
            return
        if self.ca is not None and self.serve_stream is not None and self.policy.intercepted(host):
            await self._intercept(exchange, host, port)
            return
        try:
            remote = await upstream.connect(host, port)
        except upstream.UpstreamError as e:
            await exchange.error(e.status, ErrorSource.ORIGIN, str(e))
            return
        async with remote:
            client, extra = await exchange.tunnel()
            if extra:
                try:
                    await remote.send_all(extra)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            moved = await splice(client, remote)
            exchange.tunnel_closed(moved)
        event(log, logging.DEBUG, "proxy.tunnel_closed", target=f"{host}:{port}", bytes=moved)

    async def _intercept(self, exchange: Exchange, host: str, port: int) -> None:
        assert self.ca is not None and self.serve_stream is not None
        context = await self.ca.server_context_async(host)
        client, extra = await exchange.tunnel()
        tls = trio.SSLStream(PrefixedStream(client, extra), context, server_side=True, https_compatible=True)
        try:
            with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
                await tls.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError) as e:
            cause = e.__cause__ if e.__cause__ is not None else e
            event(log, logging.INFO, "proxy.intercept_handshake_failed", host=host, error=str(cause))
            return
        authority = host if port == 443 else f"{host}:{port}"
        if ":" in host:
            authority = f"[{host}]" if port == 443 else f"[{host}]:{port}"

        async def inner(inner_exchange: Exchange) -> None:
            target = inner_exchange.target
            if inner_exchange.method == "CONNECT":
                await inner_exchange.error(400, ErrorSource.PROXY, "CONNECT inside an intercepted tunnel")
                return
            if not target.startswith("/"):
                # An absolute URL inside the tunnel must name the tunnel's own host.
                try:
                    parsed = parse_target(target)
                except BadTarget as e:
                    await inner_exchange.error(400, ErrorSource.PROXY, str(e))
                    return
                if (parsed.host, parsed.port) != (host, port) or parsed.scheme != "https":
                    await inner_exchange.error(
                        400, ErrorSource.PROXY, f"a request for {parsed.url} inside the tunnel to {authority}"
                    )
                    return
                target = parsed.target.decode("ascii")
            if not re.fullmatch(r"/[\x21-\x7e]*", target):
                await inner_exchange.error(400, ErrorSource.PROXY, "the request target is not an origin-form path")
                return
            await self.serve(inner_exchange, upstream.Target("https", host, port, target.encode("ascii")))

        try:
            await self.serve_stream(tls, f"{host}:{port} (intercepted)", inner)
        finally:
            await trio.aclose_forcefully(tls)
