"""A client of a daemon's local API (``api.*``): what ``dfz get`` uses, and what programs use to
download through the local daemon.

Usage::

    from dfz.peer.api_client import open_api_client
    from dfz.peer.local import DownloadRequest

    async with open_api_client() as api:  # the default endpoint, see dfz.peer.endpoints.default_endpoint
        async with api.download(DownloadRequest(url, output="/abs/path")) as download:
            async for progress in download:
                print(progress.state, progress.bytes_done)
        # the last progress has a final state: succeeded, failed (see error/error_kind) or cancelled

What can go wrong: :class:`DaemonUnreachable` (no daemon answered within ``connect_timeout``),
:class:`DaemonLost` (the session to the daemon ended during a download: the daemon stops following it),
:class:`ApiRequestError` (the daemon refused a request: bad input, with a code from
:class:`~dfz.peer.api_messages.ApiErrorCode`). A download that fails is not an exception: its last
progress says ``failed``, why (``error``) and what class of failure (``error_kind``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import trio

from ..broker import Client, ClientConfig, ConnectionLost, CurveClient, FabricError, RemoteError, RequestTimeout
from .api_messages import (
    API_CATALOGUE,
    FINAL_STATES,
    ApiCancel,
    ApiDelete,
    ApiDeleted,
    ApiDownloadStarted,
    ApiErrorCode,
    ApiList,
    ApiListSource,
    ApiProgress,
    ApiSourceListing,
    ApiTasks,
    progress_from_wire,
    request_to_wire,
    task_from_wire,
)
from .endpoints import default_endpoint
from .local import CachedTask, DownloadRequest, Progress
from .source.listing import UnsafePath, check_relative_path

__all__ = [
    "ApiClient",
    "ApiRequestError",
    "DaemonLost",
    "DaemonUnreachable",
    "Download",
    "ListedObject",
    "SourceListing",
    "open_api_client",
]

EARLY_PUSHES = 64
"""Progress pushes of download ids not known yet (they overtook their reply) kept, one per id."""


class DaemonUnreachable(Exception):
    """No daemon answered at the endpoint in time."""


class DaemonLost(DaemonUnreachable):
    """The session to the daemon ended while a download was followed; the daemon stopped following it."""


class ApiRequestError(Exception):
    """The daemon refused a request. ``code`` is an :class:`ApiErrorCode` (or a fabric code)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ListedObject:
    """An object of a listing: ``path`` below the listed URL (checked safe), its ``url``, its ``size`` if known."""

    path: str
    url: str
    size: int | None


@dataclass(frozen=True, slots=True)
class SourceListing:
    entries: list[ListedObject]
    truncated: bool
    """The origin holds more objects than were asked for."""


class _Watch:
    __slots__ = ("changed", "latest", "lost")

    def __init__(self) -> None:
        self.latest: ApiProgress | None = None
        self.changed = trio.Event()
        self.lost = False

    def update(self, msg: ApiProgress) -> None:
        self.latest = msg
        self.changed.set()


class ApiClient:
    """One session to a daemon's local API. Run it in a nursery (``await nursery.start(api.run)``),
    which returns once connected and raises :class:`DaemonUnreachable` when no daemon answered within
    ``connect_timeout``; or use :func:`open_api_client`. Cancel to leave: the daemon then stops
    following this session's downloads."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        connect_timeout: float = 5.0,
        request_timeout: float = 10.0,
        name: str = "dfz-api-client",
        curve: CurveClient | None = None,
    ) -> None:
        self.endpoint = endpoint or default_endpoint()
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._client = Client(
            API_CATALOGUE,
            self.endpoint,
            name=name,
            config=ClientConfig(timeout=request_timeout),
            curve=curve,
            on_state=self._on_state,
        )
        self._client.on_push(ApiProgress, self._on_progress)
        self._watches: dict[str, _Watch] = {}
        self._early: OrderedDict[str, ApiProgress] = OrderedDict()

    async def run(self, *, task_status: trio.TaskStatus[ApiClient] = trio.TASK_STATUS_IGNORED) -> None:
        unreachable = False
        async with trio.open_nursery() as nursery:
            await nursery.start(self._client.run)
            with trio.move_on_after(self.connect_timeout):
                await self._client.wait_connected()
            if self._client.connected:
                task_status.started(self)
            else:
                unreachable = True
                nursery.cancel_scope.cancel()
        if unreachable:
            why = f"within {self.connect_timeout:g} s"
            if self.endpoint.startswith("ipc://") and not await trio.Path(self.endpoint[len("ipc://") :]).exists():
                why += " (its socket does not exist: no daemon runs with that data directory)"
            raise DaemonUnreachable(f"no dfz daemon answered at {self.endpoint} {why}")

    # -- operations -----------------------------------------------------------------------------------

    def download(self, request: DownloadRequest) -> Download:
        """The download of ``request``: iterate it for progress (the request is sent on first use).
        Use it as ``async with`` (or call :meth:`Download.aclose`) so that leaving early cancels it."""
        return Download(self, request)

    async def cancel(self, download_id: str) -> bool:
        """Ask the daemon to stop a download; False if it had ended already."""
        try:
            await self._request(ApiCancel(download_id=download_id))
        except ApiRequestError as e:
            if e.code == ApiErrorCode.UNKNOWN_DOWNLOAD:
                return False
            raise
        return True

    async def list_tasks(self) -> list[CachedTask]:
        """Every task in the daemon's cache, in task-id order (fetched page by page)."""
        tasks: list[CachedTask] = []
        after = ""
        while True:
            reply = await self._request(ApiList(after=after, limit=1000))
            assert isinstance(reply, ApiTasks)
            tasks.extend(task_from_wire(t) for t in reply.tasks)
            if not reply.more or not reply.tasks:
                return tasks
            after = reply.tasks[-1].task_id

    async def list_source(
        self,
        url: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        max_entries: int = 10_000,
        timeout: float = 300.0,  # noqa: ASYNC109
    ) -> SourceListing:
        """The objects below ``url`` (a directory or prefix), listed by the daemon with its source settings,
        in path order (fetched page by page). ``timeout`` bounds the daemon's listing. Raises
        :class:`ApiRequestError` (``NOT_LISTABLE``, ``LISTING_FAILED``, ``BAD_LISTING``, a bad URL or
        header) and :class:`DaemonUnreachable`; every path is checked again here
        (:func:`~dfz.peer.source.listing.check_relative_path`: ``BAD_LISTING`` when one is unsafe)."""
        entries: list[ListedObject] = []
        reply = await self._request(ApiListSource(url=url, headers=list(headers), max_entries=max_entries), timeout=timeout)
        while True:
            assert isinstance(reply, ApiSourceListing)
            for e in reply.entries:
                try:
                    check_relative_path(e.path)
                except UnsafePath as error:
                    raise ApiRequestError(ApiErrorCode.BAD_LISTING, f"the daemon listed an unsafe path: {error}") from None
                entries.append(ListedObject(e.path, e.url, e.size))
            if not reply.cursor:
                return SourceListing(entries, reply.truncated)
            reply = await self._request(ApiListSource(url=url, cursor=reply.cursor))

    async def delete_task(self, task_id: str) -> bool:
        """Remove a task from the daemon's cache; False if it was not there."""
        reply = await self._request(ApiDelete(task_id=task_id))
        assert isinstance(reply, ApiDeleted)
        return reply.deleted

    # -- plumbing -------------------------------------------------------------------------------------

    async def _request(self, msg: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - travels on the wire
        try:
            reply = await self._client.request(msg, timeout=timeout or self.request_timeout)
        except RemoteError as e:
            raise ApiRequestError(e.code, e.reason) from None
        except (RequestTimeout, ConnectionLost) as e:
            raise DaemonUnreachable(f"the dfz daemon at {self.endpoint} did not answer: {e}") from None
        return reply.msg

    def _on_progress(self, msg: ApiProgress, payload: list[Any]) -> None:
        watch = self._watches.get(msg.download_id)
        if watch is not None:
            watch.update(msg)
            return
        self._early[msg.download_id] = msg
        self._early.move_to_end(msg.download_id)
        while len(self._early) > EARLY_PUSHES:
            self._early.popitem(last=False)

    def _on_state(self, state: str) -> None:
        if state == "lost":
            for watch in self._watches.values():
                watch.lost = True
                watch.changed.set()

    def _watch(self, download_id: str) -> _Watch:
        watch = self._watches[download_id] = _Watch()
        early = self._early.pop(download_id, None)
        if early is not None:
            watch.update(early)
        return watch

    def _unwatch(self, download_id: str) -> None:
        self._watches.pop(download_id, None)


class Download:
    """One download through the daemon: an async iterator of :class:`Progress` whose last item has a
    final state, and an async context manager that cancels the download if it is left before then."""

    def __init__(self, api: ApiClient, request: DownloadRequest) -> None:
        self.api = api
        self.request = request
        self.download_id: str | None = None
        self.task_id: str | None = None
        self.last: Progress | None = None
        self._watch: _Watch | None = None
        self._done = False

    async def start(self) -> None:
        """Send the request (once). Raises :class:`ApiRequestError` for a request the daemon refuses."""
        if self.download_id is not None:
            return
        reply = await self.api._request(request_to_wire(self.request))
        assert isinstance(reply, ApiDownloadStarted)
        self.download_id = reply.download_id
        self.task_id = reply.task_id
        self._watch = self.api._watch(reply.download_id)

    def __aiter__(self) -> Download:
        return self

    async def __anext__(self) -> Progress:
        if self._done:
            raise StopAsyncIteration
        await self.start()
        watch = self._watch
        assert watch is not None and self.download_id is not None
        await watch.changed.wait()
        watch.changed = trio.Event()
        if watch.lost:
            self._finish()
            raise DaemonLost(f"lost the session to the dfz daemon at {self.api.endpoint} during the download; it was stopped")
        msg = watch.latest
        assert msg is not None
        progress = progress_from_wire(msg)
        self.last = progress
        if progress.state in FINAL_STATES:
            self._finish()
        return progress

    async def cancel(self) -> None:
        """Ask the daemon to stop; the iteration then ends with a ``cancelled`` (or another final) state."""
        if self.download_id is not None and not self._done:
            await self.api.cancel(self.download_id)

    async def aclose(self) -> None:
        """Cancel the download unless it ended, and stop following it."""
        if self.download_id is not None and not self._done:
            self._finish()
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                try:
                    await self.api.cancel(self.download_id)
                except (ApiRequestError, DaemonUnreachable, FabricError):
                    pass  # the session ending stops it too
        self._done = True

    def _finish(self) -> None:
        self._done = True
        if self.download_id is not None:
            self.api._unwatch(self.download_id)

    async def __aenter__(self) -> Download:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()


@asynccontextmanager
async def open_api_client(
    endpoint: str | None = None,
    *,
    connect_timeout: float = 5.0,
    request_timeout: float = 10.0,
    name: str = "dfz-api-client",
    curve: CurveClient | None = None,
) -> AsyncIterator[ApiClient]:
    """An :class:`ApiClient` connected for the duration of the block (see the module docstring).
    Raises :class:`DaemonUnreachable` when no daemon answers within ``connect_timeout``. An exception
    from the block comes out as it was raised (not wrapped in an exception group)."""
    api = ApiClient(endpoint, connect_timeout=connect_timeout, request_timeout=request_timeout, name=name, curve=curve)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(api.run)
            try:
                yield api
            except BaseException as e:
                body_error = e
                raise
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery wraps whatever leaves it; give back the body's own exception (or the client's).
        if len(group.exceptions) == 1 and (body_error is None or group.exceptions[0] is body_error):
            raise group.exceptions[0] from None
        raise
