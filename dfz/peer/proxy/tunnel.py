"""CONNECT tunnels: ``CONNECT host:port`` opens a TCP connection to the target and splices it to the client.

Theory of operation
    The target is checked first (an authority ``host:port``; the operator's ``proxy_connect_allow``
    must match it), then connected to (:data:`~dfz.peer.proxy.upstream.CONNECT_TIMEOUT`); only then does the
    client get its ``200`` (so a refused or unreachable target is an HTTP error with the
    ``X-Dfz-Error-Source`` header, not a dead tunnel). Bytes the client sent after its request (h11 may
    have read them already) go to the target first. Then two trio tasks copy each direction; when one side
    ends its half (EOF), the other side's write half is shut and the other direction goes on until it ends
    too. A tunnel in which nothing moved either way for :data:`TUNNEL_IDLE_TIMEOUT` is closed, and so is
    one whose side breaks (reset). Nothing in a tunnel is read by the proxy: it is TLS, end to end.
"""

from __future__ import annotations

import ipaddress
import logging
import re

import trio

from ...log import event, get_logger

log = get_logger("peer.proxy.tunnel")

TUNNEL_IDLE_TIMEOUT = 300.0
"""Seconds a tunnel may carry nothing, either way, before it is closed."""
_READ = 64 * 1024
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-_.]{0,252})")


class BadAuthority(ValueError):
    """A CONNECT target that is not ``host:port``."""


def parse_authority(target: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) of a CONNECT request, validated: a DNS name or an IP address, a port
    from 1 to 65535. The host is lowercased (names are case-insensitive; rules match the lowercase form)."""
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]/@\s]+):(\d{1,5})", target)
    if match is None:
        raise BadAuthority(f"CONNECT needs host:port, got {target[:100]!r}")
    host, port = match[1], int(match[2])
    if host.startswith("["):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise BadAuthority(f"{host!r} is not an IPv6 address") from None
    elif not _HOST.fullmatch(host) or len(host) > 253:
        raise BadAuthority(f"{host[:100]!r} is not a host name or an IP address")
    if not 1 <= port <= 65535:
        raise BadAuthority(f"port {port} is out of range")
    return host.lower(), port


class _Idle:
    """The idle deadline of a tunnel, pushed back whenever a byte moves."""

    def __init__(self, scope: trio.CancelScope, timeout: float) -> None:
        self.scope = scope
        self.timeout = timeout
        self.moved = 0

    def touch(self, nbytes: int) -> None:
        self.moved += nbytes
        self.scope.deadline = trio.current_time() + self.timeout


async def _copy(source: trio.abc.ReceiveStream, sink: trio.abc.Stream, idle: _Idle) -> None:
    while True:
        data = await source.receive_some(_READ)
        if not data:
            break
        await sink.send_all(data)
        idle.touch(len(data))
    # Half-close: the other direction may still be answering.
    if isinstance(sink, trio.abc.HalfCloseableStream):
        try:
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


async def splice(client: trio.abc.Stream, target: trio.abc.Stream, *, idle_timeout: float = TUNNEL_IDLE_TIMEOUT) -> int:
    """Copy bytes both ways until both sides ended, one broke, or nothing moved for ``idle_timeout`` s.
    Returns the bytes moved (both ways). Never raises for a side that breaks or goes quiet."""
    with trio.CancelScope() as scope:
        idle = _Idle(scope, idle_timeout)
        idle.touch(0)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_copy, client, target, idle)
                nursery.start_soon(_copy, target, client, idle)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
            event(log, logging.DEBUG, "proxy.tunnel_broken", error=repr(group.exceptions[0]))
    if scope.cancelled_caught:
        event(log, logging.DEBUG, "proxy.tunnel_idle", seconds=idle_timeout)
    return idle.moved
