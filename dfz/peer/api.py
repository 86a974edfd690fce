"""The daemon's local API server: ``dfz get`` and other programs on the machine start downloads, follow
their progress, cancel them, and list and delete cached tasks (``api.*``, ``protocol.md`` "Local API").

Theory of operation:

* :class:`ApiServer` is a fabric :class:`~dfz.broker.Server` on an ipc socket (and tcp if configured) in
  front of a :class:`~dfz.peer.local.DownloadService` (the daemon). It knows nothing of the daemon's
  internals: it checks requests (:func:`~dfz.peer.api_messages.check_request`), calls the service, and
  turns the service's progress into pushes.
* Each download is one task in the server's nursery with two halves: a *reader* that iterates the
  service's progress (keeping only the latest snapshot) and a *sender* that pushes the latest snapshot to
  the requesting session at most once per ``progress_interval`` (10 per second by default). The final
  state is always pushed, at once, and is the last push of that download.
* A download ends with the service's final state, or when the server stops following it: ``api.cancel``
  (a last push with state ``cancelled``), the requesting session's end (bye, silence, unreachable: nobody
  to tell), or the request's timeout plus a grace second (a last push ``failed`` / ``timeout``, for a
  service that did not enforce the timeout itself). Stopping closes the service's iterator, which is how
  the contract cancels this caller's interest; the daemon may keep the task in its cache.
* ``api.list_source`` lists a directory or prefix at the origin through the service (the daemon's source
  backends and settings), checks every entry (:func:`dfz.peer.source.listing.relative_path`: below the
  URL, a safe relative path, no duplicates) and keeps the listing for the session that asked, for
  ``listing_ttl`` seconds, to answer it page by page (48 KiB of entries a page).
* Who may connect: the ipc socket is made ``0600`` in a directory the server creates ``0700``, so only
  the daemon's user reaches it (a download writes wherever the request says, as the daemon's user). A tcp
  endpoint reaches everyone who can reach the port: bind it to 127.0.0.1 or use CurveZMQ.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import math
import os
import socket as pysocket
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio
import zmq

from ..broker import CurveServer, PeerEvent, PeerGone, RemoteError, Request, Server, ServerConfig
from ..log import event, get_logger
from .api_messages import (
    API_CATALOGUE,
    FINAL_STATES,
    MAX_ENTRIES_PER_PAGE,
    MAX_URL,
    ApiCancel,
    ApiCancelled,
    ApiDelete,
    ApiDeleted,
    ApiDownload,
    ApiDownloadStarted,
    ApiErrorCode,
    ApiInputError,
    ApiList,
    ApiListSource,
    ApiSourceEntry,
    ApiSourceListing,
    ApiTask,
    ApiTasks,
    check_header,
    check_request,
    check_url,
    progress_to_wire,
    request_from_wire,
    task_to_wire,
)
from .endpoints import API_SOCKET_NAME as API_SOCKET_NAME
from .endpoints import DATA_DIR_ENV as DATA_DIR_ENV
from .endpoints import ENDPOINT_ENV as ENDPOINT_ENV
from .endpoints import builtin_schemes as builtin_schemes
from .endpoints import default_data_dir as default_data_dir
from .endpoints import default_endpoint as default_endpoint
from .local import DownloadRequest, DownloadService, DownloadState, Progress, TenantError
from .source import MalformedURL, SourceError, UnsupportedScheme, display_url
from .source.listing import UnsafePath, relative_path

log = get_logger("peer.api")

PAGE_BUDGET = 48 * 1024
"""Encoded bytes of tasks an ``api.tasks`` reply holds at most: well inside the 64 KiB header frame."""


MAX_LISTINGS = 8
"""Listings kept at once for ``api.list_source`` pages (the oldest is dropped beyond)."""


@dataclass(eq=False)
class _Listing:
    session: str
    entries: list[ApiSourceEntry]
    truncated: bool
    expires: float


class EndpointInUse(Exception):
    """Another live process serves the ipc endpoint (libzmq would silently take its socket file over)."""


@dataclass(eq=False)
class _Download:
    id: str
    routing_id: bytes
    session: str
    request: DownloadRequest
    task_id: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    latest: Progress | None = None
    changed: trio.Event = field(default_factory=trio.Event)
    finished: trio.Event = field(default_factory=trio.Event)
    cancel_reason: str = ""
    client_gone: bool = False

    def publish(self, progress: Progress, *, final: bool = False) -> None:
        self.latest = progress
        self.changed.set()
        if final:
            self.finished.set()


class ApiServer:
    """The local API in front of a :class:`DownloadService`. Run it in a nursery:
    ``api = await nursery.start(ApiServer(daemon, ["ipc:///var/lib/dfz/api.sock"]).run)``; its bound
    endpoints are then in :attr:`endpoints`. Cancel to stop: every download it follows is closed.

    ``schemes`` are the URL schemes the daemon fetches (default: the built-in backends'). Raises
    :class:`EndpointInUse` at start when a live process already serves one of the ipc endpoints, and
    ``zmq.ZMQError`` when an endpoint cannot be bound.
    """

    def __init__(
        self,
        service: DownloadService,
        endpoints: Sequence[str],
        *,
        schemes: Iterable[str] | None = None,
        name: str = "dfz-api",
        progress_interval: float = 0.1,
        timeout_grace: float = 1.0,
        max_downloads_per_session: int = 256,
        listing_ttl: float = 120.0,
        config: ServerConfig | None = None,
        curve: CurveServer | None = None,
        ctx: zmq.Context[Any] | None = None,
    ) -> None:
        self.service = service
        self.schemes = sorted(schemes) if schemes is not None else builtin_schemes()
        self.progress_interval = progress_interval
        self.timeout_grace = timeout_grace
        self.max_downloads_per_session = max_downloads_per_session
        self.listing_ttl = listing_ttl
        self._listings: dict[str, _Listing] = {}
        self._want_endpoints = list(endpoints)
        self.server = Server(
            API_CATALOGUE, endpoints, name=name, config=config, curve=curve, ctx=ctx, on_peer_event=self._peer_event
        )
        self.server.handle(ApiDownload, self._download)
        self.server.handle(ApiCancel, self._cancel)
        self.server.handle(ApiList, self._list)
        self.server.handle(ApiDelete, self._delete)
        self.server.handle(ApiListSource, self._list_source)
        self.downloads: dict[str, _Download] = {}
        self._by_session: dict[str, set[str]] = {}
        self._ids = itertools.count(1)
        self._boot = os.urandom(4).hex()
        self._nursery: trio.Nursery | None = None

    @property
    def endpoints(self) -> list[str]:
        return self.server.endpoints

    async def run(self, *, task_status: trio.TaskStatus[ApiServer] = trio.TASK_STATUS_IGNORED) -> None:
        for endpoint in self._want_endpoints:
            if endpoint.startswith("ipc://"):
                _prepare_ipc(endpoint[len("ipc://") :])
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await nursery.start(self.server.run)
                for endpoint in self.endpoints:
                    if endpoint.startswith("ipc://"):
                        os.chmod(endpoint[len("ipc://") :], 0o600)
                event(log, 20, "api_listening", endpoints=",".join(self.endpoints))
                task_status.started(self)
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # -- requests -------------------------------------------------------------------------------------

    async def _download(self, req: Request) -> ApiDownloadStarted:
        msg = req.msg
        assert isinstance(msg, ApiDownload)
        try:
            request = check_request(request_from_wire(msg), self.schemes)
        except ApiInputError as e:
            raise RemoteError(e.code, e.message) from None
        try:
            # The daemon's tenant, never the client's choice, makes the task id (protocol.md §16.1).
            request = await self.service.resolve(request)
        except TenantError as e:
            raise RemoteError(ApiErrorCode.BAD_TENANT if e.wrong else 503, str(e)[:4096]) from None
        peer = req.peer
        running = self._by_session.setdefault(peer.session, set())
        if len(running) >= self.max_downloads_per_session:
            raise RemoteError(
                ApiErrorCode.TOO_MANY_DOWNLOADS,
                f"this session follows {len(running)} downloads already (at most {self.max_downloads_per_session}): "
                "wait for one to end",
            )
        nursery = self._nursery
        if nursery is None:
            raise RemoteError(503, "the API server is stopping")
        tid = request.task_id()
        d = _Download(f"{self._boot}-{next(self._ids)}", peer.routing_id, peer.session, request, tid)
        self.downloads[d.id] = d
        running.add(d.id)
        event(log, 20, "api_download", id=d.id, task=tid[:16], client=peer.name)
        nursery.start_soon(self._follow, d)
        # A progress push may overtake this reply on the wire; clients keep pushes of ids they do not
        # know yet (protocol.md, Local API rules).
        return ApiDownloadStarted(download_id=d.id, task_id=tid)

    async def _cancel(self, req: Request) -> ApiCancelled:
        msg = req.msg
        assert isinstance(msg, ApiCancel)
        d = self.downloads.get(msg.download_id)
        if d is None or d.finished.is_set():
            raise RemoteError(
                ApiErrorCode.UNKNOWN_DOWNLOAD, f"no download {msg.download_id!r} is running here (it may have ended)"
            )
        d.cancel_reason = "cancelled by the user" if req.peer.session == d.session else f"cancelled by {req.peer.name}"
        d.scope.cancel()
        return ApiCancelled(download_id=d.id)

    async def _list(self, req: Request) -> ApiTasks:
        msg = req.msg
        assert isinstance(msg, ApiList)
        tasks = sorted((t for t in self.service.list_tasks() if t.task_id > msg.after), key=lambda t: t.task_id)
        page: list[ApiTask] = []
        size = 0
        for task in tasks:
            wire = task_to_wire(task)
            n = len(msgspec.msgpack.encode(wire))
            if len(page) >= msg.limit or (page and size + n > PAGE_BUDGET):
                return ApiTasks(tasks=page, more=True)
            page.append(wire)
            size += n
        return ApiTasks(tasks=page, more=False)

    async def _delete(self, req: Request) -> ApiDeleted:
        msg = req.msg
        assert isinstance(msg, ApiDelete)
        deleted = await self.service.delete_task(msg.task_id)
        event(log, 20, "api_delete", task=msg.task_id[:16], deleted=deleted)
        return ApiDeleted(task_id=msg.task_id, deleted=deleted)

    async def _list_source(self, req: Request) -> ApiSourceListing:
        msg = req.msg
        assert isinstance(msg, ApiListSource)
        now = trio.current_time()
        for key in [k for k, v in self._listings.items() if v.expires < now]:
            del self._listings[key]
        if msg.cursor:
            key, _, offset_text = msg.cursor.rpartition(":")
            listing = self._listings.get(key)
            if listing is None or listing.session != req.peer.session or not offset_text.isdigit():
                raise RemoteError(
                    ApiErrorCode.UNKNOWN_LISTING,
                    f"cursor {msg.cursor[:64]!r} names no listing held here (expired?): list again",
                )
            return self._listing_page(key, listing, int(offset_text))
        try:
            check_url(msg.url, self.schemes)
            for name, value in msg.headers:
                check_header(name, value)
        except ApiInputError as e:
            raise RemoteError(e.code, e.message) from None
        try:
            found = await self.service.list_source(msg.url, tuple((n, v) for n, v in msg.headers))
        except NotImplementedError as e:
            raise RemoteError(ApiErrorCode.NOT_LISTABLE, str(e)[:4096] or f"{msg.url[:80]!r} cannot be listed") from None
        except (MalformedURL, UnsupportedScheme) as e:
            raise RemoteError(ApiErrorCode.BAD_URL, str(e)[:4096]) from None
        except SourceError as e:
            raise RemoteError(ApiErrorCode.LISTING_FAILED, f"{type(e).__name__}: {e}"[:4096]) from None
        entries: list[ApiSourceEntry] = []
        paths: set[str] = set()
        try:
            for entry in found:
                path = relative_path(msg.url, entry.url)
                if path in paths:
                    raise UnsafePath(f"two listed entries have the path {path[:200]!r}")
                if len(entry.url) > MAX_URL:
                    raise UnsafePath(f"a listed URL is over {MAX_URL} characters")
                paths.add(path)
                if len(entries) < msg.max_entries:
                    size = entry.content_length
                    known = size is not None and 0 <= size < 2**63
                    entries.append(ApiSourceEntry(path=path, url=entry.url, size=size if known else None))
        except UnsafePath as e:
            raise RemoteError(ApiErrorCode.BAD_LISTING, f"refusing the listing of {display_url(msg.url)}: {e}"[:4096]) from None
        entries.sort(key=lambda e: e.path)
        key = f"{self._boot}-l{next(self._ids)}"
        listing = _Listing(req.peer.session, entries, len(found) > msg.max_entries, now + self.listing_ttl)
        self._listings[key] = listing
        while len(self._listings) > MAX_LISTINGS:
            del self._listings[next(iter(self._listings))]
        event(log, 20, "api_list_source", entries=len(entries), truncated=listing.truncated, client=req.peer.name)
        return self._listing_page(key, listing, 0)

    def _listing_page(self, key: str, listing: _Listing, offset: int) -> ApiSourceListing:
        page: list[ApiSourceEntry] = []
        size = 0
        end = offset
        for entry in listing.entries[offset:]:
            n = len(msgspec.msgpack.encode(entry))
            if len(page) >= MAX_ENTRIES_PER_PAGE or (page and size + n > PAGE_BUDGET):
                break
            page.append(entry)
            size += n
            end += 1
        more = end < len(listing.entries)
        if not more:
            self._listings.pop(key, None)
        return ApiSourceListing(
            entries=page, total=len(listing.entries), truncated=listing.truncated, cursor=f"{key}:{end}" if more else ""
        )

    # -- following a download -------------------------------------------------------------------------

    async def _follow(self, d: _Download) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, d)
                await self._send(d)
        except Exception as e:  # a bug here must not take the API server (and every download) down
            event(log, 40, "api_follow_failed", id=d.id, error=repr(e))
        finally:
            self.downloads.pop(d.id, None)
            running = self._by_session.get(d.session)
            if running is not None:
                running.discard(d.id)
                if not running:
                    del self._by_session[d.session]

    async def _read(self, d: _Download) -> None:
        """Iterate the service's progress until a final state or until the server stops following."""
        final: Progress | None = None
        timeout = d.request.timeout
        limit = timeout + self.timeout_grace if timeout is not None else math.inf
        with d.scope:
            with trio.move_on_after(limit) as deadline:
                try:
                    progress = self.service.download(d.request)
                except Exception as e:
                    final = self._crashed(d, e)
                else:
                    try:
                        async for p in progress:
                            if p.state in FINAL_STATES:
                                final = p
                                break
                            d.publish(p)
                    except Exception as e:
                        final = self._crashed(d, e)
                    finally:
                        await _close(progress)
                if final is None:
                    final = self._failed(d, "internal", "the daemon ended the download without a final state")
            if deadline.cancelled_caught:
                final = self._failed(d, "timeout", f"the download did not finish within {timeout:g} s")
        if d.scope.cancelled_caught:
            final = self._ended(d, DownloadState.CANCELLED, d.cancel_reason or "cancelled", "cancelled")
        assert final is not None
        event(log, 20, "api_download_ended", id=d.id, state=final.state, kind=final.error_kind or "-")
        d.publish(final, final=True)

    def _ended(self, d: _Download, state: DownloadState, error: str, kind: str) -> Progress:
        last = d.latest or Progress(task_id=d.task_id, state=DownloadState.PENDING)
        return Progress(
            task_id=last.task_id,
            state=state,
            content_length=last.content_length,
            piece_count=last.piece_count,
            pieces_done=last.pieces_done,
            bytes_done=last.bytes_done,
            bytes_from_peers=last.bytes_from_peers,
            bytes_from_origin=last.bytes_from_origin,
            bytes_from_cache=last.bytes_from_cache,
            error=error,
            error_kind=kind,
        )

    def _failed(self, d: _Download, kind: str, error: str) -> Progress:
        return self._ended(d, DownloadState.FAILED, error, kind)

    def _crashed(self, d: _Download, e: Exception) -> Progress:
        event(log, 40, "download_failed_in_service", id=d.id, error=repr(e))
        return self._failed(d, "internal", f"the daemon failed: {type(e).__name__}: {e}")

    async def _send(self, d: _Download) -> None:
        """Push the latest snapshot at most once per interval; the final one at once, and last."""
        last_push = -math.inf
        while True:
            await d.changed.wait()
            if not d.finished.is_set():
                with trio.move_on_at(last_push + self.progress_interval):
                    await d.finished.wait()
            d.changed = trio.Event()
            snapshot = d.latest
            assert snapshot is not None
            final = d.finished.is_set() and snapshot.state in FINAL_STATES
            if d.client_gone:
                return
            try:
                await self.server.push(d.routing_id, progress_to_wire(d.id, snapshot))
            except (PeerGone, trio.ClosedResourceError):
                # Nobody follows this download any more: stop it.
                d.client_gone = True
                d.scope.cancel()
                return
            last_push = trio.current_time()
            if final:
                return

    def _peer_event(self, ev: PeerEvent) -> None:
        if ev.kind != "gone":
            return
        for download_id in list(self._by_session.get(ev.peer.session, ())):
            d = self.downloads.get(download_id)
            if d is not None:
                d.client_gone = True
                d.cancel_reason = f"the client left ({ev.reason})"
                d.scope.cancel()


async def _close(progress: AsyncIterator[Progress]) -> None:
    """Close the service's iterator (its ``finally`` blocks run), shielded from a cancellation that
    is stopping us, but bounded so a stuck service cannot hold the API server."""
    aclose = getattr(progress, "aclose", None)
    if aclose is None:
        return
    with trio.CancelScope(shield=True, deadline=trio.current_time() + 5.0):
        try:
            await aclose()
        except Exception as e:
            event(log, 30, "download_close_failed", error=repr(e))


def _prepare_ipc(path: str) -> None:
    """Make the socket's directory (0700) and refuse to take over a socket that a live process serves."""
    directory = os.path.dirname(path) or "."
    with contextlib.suppress(FileExistsError):
        os.makedirs(directory, mode=0o700)
    if not os.path.exists(path):
        return
    probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return  # a socket file left behind by a process that is gone: libzmq replaces it
        raise EndpointInUse(f"cannot use ipc://{path}: {e.strerror}") from None
    finally:
        probe.close()
    raise EndpointInUse(
        f"another process serves ipc://{path} (a daemon with the same data directory?): stop it, or give this one "
        "another data directory or API endpoint"
    )
