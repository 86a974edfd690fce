"""The registry mirror on the proxy port: ``GET /v2/<name>/blobs/<digest>`` goes P2P, everything else of
the registry API passes through to the upstream registry.

Which upstream
    In this order: the ``X-Dfz-Registry`` request header (``host[:port]`` or ``http(s)://host[:port]``);
    containerd's ``ns`` query parameter (``?ns=host:port``, which containerd adds to every request it sends
    to a mirror named in ``hosts.toml``; ``docker.io`` means ``registry-1.docker.io``); the daemon's
    ``mirror_upstream``. A bare ``host[:port]`` is spoken to over HTTPS, except loopback hosts and the ones in
    ``oci_plain_http`` (plain HTTP, as Docker does). None of them: ``400``. The ``ns`` parameter is removed
    before the request goes upstream.

Blobs (``GET`` and ``HEAD /v2/NAME/blobs/sha256:HEX``)
    First a ``HEAD`` of the blob at the upstream, with the client's ``Authorization``: it proves the client
    may read the blob (a blob in the daemon's cache is never served to a client the registry would refuse),
    gives the real length, and lets the registry's answer reach the client unchanged when it refuses: a
    ``401`` with its ``WWW-Authenticate`` challenge (the client then fetches a token from the realm the
    registry names, directly, not through the mirror, and sends it as ``Authorization: Bearer`` with its next
    requests, which the mirror passes on), a ``403``, a ``404``. A ``HEAD`` is answered from it
    (``Content-Length``, ``Docker-Content-Digest``) without downloading anything. A ``GET`` becomes a dfz
    task named by the blob's digest (:func:`dfz.tasks.digest_task_id`: the same layer from any repository,
    tag, mirror path or upstream is one task, one swarm, stored once per daemon), whose back-to-source URL is
    the blob's URL at the upstream with the client's ``Authorization``; the content is checked against the
    digest, and served by :func:`~dfz.peer.proxy.task.serve_task` (verified pieces only; ``Range`` gets
    ``206``).

Everything else (manifests, tags, ``/v2/``, referrers)
    ``GET`` and ``HEAD`` pass through: the request goes to the upstream with the client's ``Accept``,
    ``Authorization``, ``If-None-Match`` and ``If-Modified-Since`` (redirects followed), and its answer comes
    back with its status, headers (less hop-by-hop ones) and body (at most 16 MiB: a manifest is at most
    4 MiB). Other methods (pushes) are refused with ``405``: the mirror is read-only.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit

from ...log import event, get_logger
from ...ocispec import DIGEST
from ..local import DownloadRequest, DownloadService
from ..source import SourceError
from ..source.http import HTTPAnswer, HTTPBackend
from .server import ErrorSource, Exchange
from .task import TaskStore, serve_task

__all__ = ["REGISTRY_HEADER", "RegistryMirror", "parse_upstream"]

log = get_logger("peer.proxy")

REGISTRY_HEADER = "X-Dfz-Registry"
"""A request header naming the upstream registry (``host[:port]`` or ``http(s)://host[:port]``)."""

MAX_PASS_THROUGH = 16 * 1024 * 1024
"""Largest body of a passed-through answer (manifests are at most 4 MiB)."""

_NAME = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
_BLOB = re.compile(rf"/v2/(?P<name>{_NAME})/blobs/(?P<digest>sha256:[0-9a-f]{{64}})")
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")
_PATH = re.compile(r"/v2(?:/[A-Za-z0-9._\-/:@%+=,~]*)?")
_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "server",
    "date",
}
_REFUSALS = (401, 403, 404, 410)
"""Answers of the upstream to a blob's HEAD that are relayed to the client (others: the download decides)."""
_FORWARDED = ("accept", "authorization", "if-none-match", "if-modified-since")


def parse_upstream(text: str, what: str = "upstream", plain_http: Iterable[str] = ()) -> str:
    """``http(s)://host[:port]`` of a registry given as a URL of that form or a bare ``host[:port]``
    (HTTPS unless loopback or in ``plain_http``); ``ValueError`` names ``what`` and says what is expected."""
    raw = text.strip() if isinstance(text, str) else ""
    bad = ValueError(f"{what} {str(text)[:100]!r}: give a registry as http(s)://HOST[:PORT] or HOST[:PORT]")
    if "://" in raw:
        scheme, _, rest = raw.partition("://")
        rest = rest.rstrip("/")
        if scheme.lower() not in ("http", "https") or not _HOST.fullmatch(rest):
            raise bad
        return f"{scheme.lower()}://{rest}"
    if not _HOST.fullmatch(raw):
        raise bad
    if raw == "docker.io":
        raw = "registry-1.docker.io"
    return f"{'http' if _is_loopback(raw) or raw in set(plain_http) else 'https'}://{raw}"


def _is_loopback(registry: str) -> bool:
    host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RegistryMirror:
    """The mirror's :data:`~dfz.peer.proxy.server.Handler`. ``service`` and ``store`` are the daemon's
    (downloads, and its storage to read them from); ``http`` the back-to-source HTTP client that passes
    requests through; ``default_upstream`` the ``mirror_upstream`` setting; ``plain_http`` registries
    spoken to over plain HTTP."""

    def __init__(
        self,
        service: DownloadService,
        store: TaskStore,
        http: HTTPBackend,
        *,
        default_upstream: str = "",
        plain_http: Iterable[str] = (),
    ) -> None:
        self.service = service
        self.store = store
        self.http = http
        self.plain_http = tuple(plain_http)
        self.default_upstream = parse_upstream(default_upstream, "mirror_upstream", self.plain_http) if default_upstream else ""

    async def __call__(self, exchange: Exchange) -> None:
        path, _, query = exchange.target.partition("?")
        if not _PATH.fullmatch(path) or ".." in path.split("/"):
            await exchange.error(400, ErrorSource.PROXY, f"not a registry API path: {path[:100]!r}")
            return
        try:
            pairs = parse_qsl(query, keep_blank_values=True)
        except ValueError:
            await exchange.error(400, ErrorSource.PROXY, "the query string is malformed")
            return
        ns = [v for k, v in pairs if k == "ns"]
        rest = urlencode([(k, v) for k, v in pairs if k != "ns"])
        try:
            upstream = self._upstream(exchange.header(REGISTRY_HEADER), ns[0] if ns else None)
        except ValueError as e:
            await exchange.error(400, ErrorSource.PROXY, str(e))
            return
        if exchange.method not in ("GET", "HEAD"):
            message = f"the registry mirror is read-only: {exchange.method} is not served"
            await exchange.error(405, ErrorSource.PROXY, message, [("Allow", "GET, HEAD")])
            return
        url = f"{upstream}{path}" + (f"?{rest}" if rest else "")
        blob = _BLOB.fullmatch(path)
        if blob is not None:
            await self._blob(exchange, url, blob["digest"])
        else:
            await self._pass_through(exchange, url)

    def _upstream(self, header: str | None, ns: str | None) -> str:
        if header:
            return parse_upstream(header, REGISTRY_HEADER, self.plain_http)
        if ns:
            return parse_upstream(ns, "ns", self.plain_http)
        if self.default_upstream:
            return self.default_upstream
        raise ValueError(
            f"no upstream registry: send {REGISTRY_HEADER}: HOST[:PORT] (or ?ns=HOST[:PORT]), or set the daemon's "
            "mirror_upstream (--mirror-upstream)"
        )

    def _client_headers(self, exchange: Exchange) -> dict[str, str]:
        out: dict[str, str] = {}
        for name in _FORWARDED:
            value = exchange.header(name)
            if value is not None and not any(c in value for c in "\r\n\0"):
                out[name.title()] = value
        return out

    async def _request(self, exchange: Exchange, url: str, method: str, headers: dict[str, str]) -> HTTPAnswer | None:
        """The upstream's answer, or None after answering the client a 502 (unreachable, or too large)."""
        try:
            return await self.http.request(url, headers, method=method, max_body=MAX_PASS_THROUGH)
        except SourceError as e:
            event(log, logging.INFO, "mirror.upstream_failed", url=url[:200], error=str(e)[:200])
            await exchange.error(502, ErrorSource.ORIGIN, f"the upstream registry failed: {e}")
            return None

    async def _relay(self, exchange: Exchange, answer: HTTPAnswer, *, head: bool) -> None:
        headers = [(n, v) for n, v in answer.headers.items() if n not in _HOP]
        length = answer.headers.get("content-length")
        if answer.status >= 400:
            await exchange.error(
                answer.status, ErrorSource.ORIGIN, f"the upstream registry answered HTTP {answer.status}", headers, answer.body
            )
            return
        if head:
            n = int(length) if length is not None and length.isdigit() else None
            await exchange.start(answer.status, headers, content_length=n)
            await exchange.end()
            return
        exchange.source("passthrough")
        await exchange.respond(answer.status, headers, answer.body)

    async def _pass_through(self, exchange: Exchange, url: str) -> None:
        answer = await self._request(exchange, url, exchange.method, self._client_headers(exchange))
        if answer is not None:
            event(log, logging.DEBUG, "mirror.pass_through", method=exchange.method, url=url[:200], status=answer.status)
            await self._relay(exchange, answer, head=exchange.method == "HEAD")

    async def _blob(self, exchange: Exchange, url: str, digest: str) -> None:
        assert DIGEST.fullmatch(digest)
        exchange.mark("mirror_blob")
        auth = {k: v for k, v in self._client_headers(exchange).items() if k == "Authorization"}
        answer = await self._request(exchange, url, "HEAD", auth)
        if answer is None:
            return
        upstream_host = urlsplit(url).netloc
        said = answer.headers.get("docker-content-digest")
        if answer.status == 200 and said and said != digest:
            await exchange.error(502, ErrorSource.ORIGIN, f"the upstream registry says the blob {digest} has digest {said}")
            return
        if answer.status in _REFUSALS and urlsplit(answer.url).netloc == upstream_host:
            await self._relay(exchange, answer, head=True)  # 401 with its challenge, 403, 404: as the registry said
            return
        length = answer.headers.get("content-length", "")
        known = answer.status == 200 and length.isdigit()
        common = [("Docker-Content-Digest", digest), ("Content-Type", "application/octet-stream")]
        if exchange.method == "HEAD" and known:
            await exchange.start(200, [*common, ("ETag", f'"{digest}"'), ("Accept-Ranges", "bytes")], content_length=int(length))
            await exchange.end()
            return
        # A GET (or a HEAD the upstream did not answer with a length: the task gives it).
        request = DownloadRequest(url=url, output=None, headers=tuple(auth.items()), digest=digest, by_digest=True)
        event(log, logging.INFO, "mirror.blob", digest=digest, upstream=upstream_host, method=exchange.method)
        await serve_task(exchange, self.service, self.store, request, headers=common, etag=f'"{digest}"')
