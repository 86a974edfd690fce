"""Serving a dfz task as an HTTP response: what the registry mirror does for a blob, and the forward proxy
for a URL that goes P2P.

:func:`serve_task` starts (or joins) the download through the daemon's
:meth:`~dfz.peer.local.DownloadService.download` and streams the task's bytes to the client as its
pieces land in the daemon's storage, in order. Only stored pieces are read, and a piece is stored only
after it was verified (against the digests the origin-fetching peer reported: dfz/peer/storage.py), so
no unverified byte is ever sent. The last bytes of the body are held back until the download succeeded
as a whole (with the request's ``digest`` checked over the whole content): if it fails, the connection is
closed before the body is complete, so a client never takes a wrong or partial body for a whole one.

Range requests (``Range: bytes=A-B``, ``bytes=A-``, ``bytes=-N``; one range) are answered ``206`` with
``Content-Range`` as soon as the pieces covering the range are stored (each verified), without waiting for
the whole content's digest, which a part cannot be checked against (a registry client checks the blob it
assembles; a small range of a large file, such as a model file's header, is not held up by the rest). The
range goes to the download as the request's ``priority_range`` (:func:`wanted_range`): the pieces it
covers are fetched before the others (from parents, rarest first among them; from the origin, when this
daemon fetches it, by index; the seed that fetches it for the swarm is told the range through the
scheduler when this daemon registers), whatever other callers of the task ask; once the range is sent and nobody
else waits for the task, the download stops and the pieces stored so far stay in the cache for the next
request, which resumes from them. A range
that starts at or after the end is ``416`` (``Content-Range: bytes */LENGTH``). Several ranges, or an
``If-Range`` that does not match the ETag given, get the whole content (``200``), as RFC 9110 allows.

Errors before the response starts are mapped from the download's ``error_kind`` to a status and an
:class:`~dfz.peer.proxy.server.ErrorSource` (:func:`status_of`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol

import trio

from ...log import event, get_logger
from ..local import DownloadRequest, DownloadService, DownloadState, Progress
from ..storage import StorageError, StoredTask
from .server import ErrorSource, Exchange

__all__ = ["TaskStore", "parse_range", "serve_task", "status_of", "wanted_range"]

log = get_logger("peer.proxy")

_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")


class TaskStore(Protocol):
    """Where the daemon keeps tasks (:class:`dfz.peer.storage.Storage`): read in a worker thread."""

    def get(self, task_id: str) -> StoredTask | None: ...


def status_of(error_kind: str) -> tuple[int, ErrorSource]:
    """The HTTP status and error source of a failed download's ``error_kind`` (see
    :class:`dfz.peer.local.Progress`)."""
    if error_kind == "bad_request":
        return 400, ErrorSource.PROXY
    if error_kind == "origin_not_found":
        return 404, ErrorSource.ORIGIN
    if error_kind == "origin_auth":
        return 403, ErrorSource.ORIGIN
    if error_kind.startswith("origin_") or error_kind == "digest_mismatch":
        return 502, ErrorSource.ORIGIN
    if error_kind == "timeout":
        return 504, ErrorSource.DAEMON
    if error_kind.startswith("scheduler_") or error_kind in ("no_tenant", "cancelled"):
        return 503, ErrorSource.DAEMON
    return 500, ErrorSource.DAEMON


def parse_range(value: str | None, length: int) -> tuple[int, int] | bool | None:
    """The byte range ``[start, end)`` that a ``Range`` header asks of ``length`` bytes; None to serve the
    whole content (no header, several ranges, or one this does not parse, which RFC 9110 lets a server
    ignore); False when it is unsatisfiable (416)."""
    if value is None:
        return None
    match = _RANGE.fullmatch(value.strip().replace(" ", ""))
    if match is None:
        return None
    first, last = match[1], match[2]
    if not first and not last:
        return None
    if not first:  # the last N bytes
        n = int(last)
        if n == 0:
            return False
        return (max(0, length - n), length) if length else False
    start = int(first)
    end = length if not last else int(last) + 1
    if last and end <= start:
        return None  # invalid: ignored
    if start >= length:
        return False
    return start, min(end, length)


def wanted_range(value: str | None) -> tuple[int, int | None] | None:
    """The byte range a ``Range`` header asks for, before the length is known, as a download's
    ``priority_range`` (:data:`dfz.peer.wanted.ByteRange`); None when :func:`parse_range` would serve the
    whole content whatever the length (no header, several ranges, unparsable or invalid ones)."""
    if value is None:
        return None
    match = _RANGE.fullmatch(value.strip().replace(" ", ""))
    if match is None:
        return None
    first, last = match[1], match[2]
    if not first and not last:
        return None
    if not first:
        n = int(last)
        return (-n, None) if n > 0 else None
    start = int(first)
    if not last:
        return start, None
    end = int(last) + 1
    return (start, end) if end > start else None


@dataclass
class _Follower:
    """The latest progress of a download, and an event that fires when it changes."""

    progress: Progress | None = None
    done: bool = False
    changed: trio.Event = field(default_factory=trio.Event)

    def update(self, progress: Progress | None, *, done: bool = False) -> None:
        """A new progress; ``done`` when the download's iterator ended (its last item is the final state:
        a SUCCEEDED seen before that may still turn into a digest mismatch)."""
        if progress is not None:
            self.progress = progress
        self.done = self.done or done
        self.changed.set()
        self.changed = trio.Event()

    @property
    def failed(self) -> Progress | None:
        p = self.progress
        if p is not None and p.state in (DownloadState.FAILED, DownloadState.CANCELLED):
            return p
        if self.done and (p is None or p.state is not DownloadState.SUCCEEDED):
            return p or Progress(task_id="", state=DownloadState.FAILED, error="the download ended", error_kind="internal")
        return None

    @property
    def succeeded(self) -> bool:
        return self.done and self.progress is not None and self.progress.state is DownloadState.SUCCEEDED


async def serve_task(
    exchange: Exchange,
    service: DownloadService,
    store: TaskStore,
    request: DownloadRequest,
    *,
    headers: Iterable[tuple[str, str]] = (),
    etag: str | None = None,
) -> None:
    """Answer ``exchange`` (a GET or HEAD) with the content of the task ``request`` names.

    ``request.output`` should be None (the bytes go to the client, the task stays in the cache);
    ``headers`` are added to a successful response (``Content-Type``, ``Docker-Content-Digest``, ...),
    ``etag`` is sent as ``ETag`` and compared with ``If-Range``. Returns once the response is complete;
    a download that fails after the response started leaves it unfinished (the server closes the
    connection). A HEAD waits only for the content's length.
    """
    exchange.source("p2p")
    follower = _Follower()
    if_range = exchange.header("if-range")
    if exchange.method == "GET" and (if_range is None or if_range == etag):
        priority = wanted_range(exchange.header("range"))
        if priority is not None:
            request = replace(request, priority_range=priority)

    async def follow() -> None:
        progress = service.download(request)
        try:
            async for p in progress:
                follower.update(p)
        finally:
            follower.update(None, done=True)
            aclose = getattr(progress, "aclose", None)  # closing it says this caller lost interest
            if aclose is not None:
                await aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        try:
            await _answer(exchange, follower, store, list(headers), etag)
        finally:
            nursery.cancel_scope.cancel()


async def _answer(
    exchange: Exchange, follower: _Follower, store: TaskStore, headers: list[tuple[str, str]], etag: str | None
) -> None:
    # 1. the content's length (or the download's failure)
    while True:
        failed = follower.failed
        if failed is not None:
            status, source = status_of(failed.error_kind)
            await exchange.error(status, source, failed.error or f"the download failed ({failed.error_kind})")
            return
        p = follower.progress
        if p is not None and p.content_length is not None and p.task_id:
            break
        await follower.changed.wait()
    length = p.content_length
    assert length is not None
    tid = p.task_id
    base = [*headers, ("Accept-Ranges", "bytes")]
    if etag:
        base.append(("ETag", etag))
    if_range = exchange.header("if-range")
    wanted = parse_range(exchange.header("range"), length) if if_range is None or if_range == etag else None
    if wanted is False:
        await exchange.error(
            416, ErrorSource.PROXY, f"the range is not within the {length} bytes", [("Content-Range", f"bytes */{length}")]
        )
        return
    start, end = wanted if isinstance(wanted, tuple) else (0, length)
    if exchange.method == "HEAD":
        if isinstance(wanted, tuple):
            await exchange.start(206, [*base, ("Content-Range", f"bytes {start}-{end - 1}/{length}")], content_length=end - start)
        else:
            await exchange.start(200, base, content_length=length)
        await exchange.end()
        return
    # 2. the task in storage, once the daemon made it and knows its layout
    stored: StoredTask | None = None
    while True:
        failed = follower.failed
        if failed is not None:
            status, source = status_of(failed.error_kind)
            await exchange.error(status, source, failed.error or "the download failed")
            return
        if stored is None:
            stored = await trio.to_thread.run_sync(store.get, tid)
        layout = stored.layout() if stored is not None else None
        if stored is not None and layout is not None:
            break
        if follower.done:
            await exchange.error(500, ErrorSource.DAEMON, "the finished task is not in the daemon's storage")
            return
        await follower.changed.wait()
    if layout.content_length != length:
        await exchange.error(500, ErrorSource.DAEMON, "the stored task's length is not the download's")
        return
    ranged = isinstance(wanted, tuple)
    if ranged:
        await exchange.start(206, [*base, ("Content-Range", f"bytes {start}-{end - 1}/{length}")], content_length=end - start)
    else:
        await exchange.start(200, base, content_length=length)
    if end == start:
        await _until_final(follower)
        if follower.succeeded:
            await exchange.end()
        return
    # 3. the pieces, in order, as they are stored; the last part of a whole body only once the whole
    # download succeeded (its digest checked): a complete 200 claims the content is whole and right
    first, last = start // layout.piece_length, (end - 1) // layout.piece_length
    for index in range(first, last + 1):
        while not stored.has_piece(index):
            if follower.failed is not None:
                _cut_short(tid, follower)
                return
            if follower.done and follower.succeeded:
                break  # finished: the piece is there (has_piece races the final progress only)
            await follower.changed.wait()
        try:
            data = await trio.to_thread.run_sync(stored.read_piece, index)
        except StorageError as e:
            event(log, logging.WARNING, "proxy.read_failed", task=tid[:16], piece=index, error=str(e))
            return
        p_start, p_end = layout.span(index)
        view = memoryview(data)[max(start, p_start) - p_start : min(end, p_end) - p_start]
        if index == last and not ranged:
            await _until_final(follower)
            if not follower.succeeded:
                _cut_short(tid, follower)
                return
        await exchange.send(view)
    await exchange.end()


async def _until_final(follower: _Follower) -> None:
    while not follower.done:
        await follower.changed.wait()


def _cut_short(tid: str, follower: _Follower) -> None:
    p = follower.progress
    event(
        log,
        logging.WARNING,
        "proxy.download_failed_midway",
        task=tid[:16],
        kind=p.error_kind if p else "",
        error=(p.error if p else "")[:200],
    )
