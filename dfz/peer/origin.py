"""Back-to-source: fetch a task's missing pieces from its origin into the local storage.

The peer the scheduler sends to the origin (normally a seed) calls :func:`fetch_from_origin`. It

1. ``stat``-s the URL with the scheme's :class:`~dfz.peer.source.SourceBackend` and chooses the piece
   length by the rule of :mod:`dfz.tasks` (or takes the fixed one asked for);
2. opens the task in the storage (resuming the pieces stored already; a task stored with another layout
   belongs to an older version of the file and is thrown away) and tells the caller, who makes it
   servable to children *before* it reports the metadata, so that no child asks for an unknown task;
3. fetches the missing pieces: with a known length and working ranges, ``origin_concurrency`` range
   requests in flight, each into its own page-aligned piece buffer (:func:`~dfz.peer.storage.piece_buffer`,
   which the storage writes with ``O_DIRECT`` without a copy), in the order of :class:`OriginOrder`: the
   pieces the callers want first (their byte ranges, ``wanted``, which may grow while the fetch runs), then
   the rest by index; otherwise one stream, cut into pieces in order (the length of a stream without
   Content-Length is known when it ends; wanted pieces cannot go first there);
4. writes each piece with :meth:`StoredTask.write_piece` (in a worker thread; it computes the piece's
   BLAKE3, which is what the scheduler forwards to children) and hands ``(index, digest, size, cost)`` to
   the caller, who announces it to children and reports it. With ranges, a piece is stored by a task of
   its own while its reader goes on with the next range (at most ``origin_concurrency`` pieces being
   stored), so the requests in flight do not wait for hashing and the disk.

Failures reach the caller as :class:`OriginError`, whose ``kind`` is one of the ``error_kind`` values of
:class:`dfz.peer.local.Progress` and whose ``origin_error`` says whether the origin itself failed (the
scheduler then fails every peer waiting on it) rather than the request being unusable.
"""

from __future__ import annotations

import functools
import heapq
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from ..tasks import InvalidPieceLength, PieceLayout, piece_length_for
from .source import (
    LARGE_BUFFER,
    Headers,
    MalformedURL,
    SourceAuthError,
    SourceBackend,
    SourceChanged,
    SourceError,
    SourceInfo,
    SourceNotFound,
    SourceProtocolError,
    SourceRangeNotSupported,
    SourceRequestError,
    SourceTLSError,
    SourceUnavailable,
    UnsupportedScheme,
)
from .storage import LayoutConflict, Storage, StoredTask, piece_buffer
from .wanted import WantedPieces


class OriginError(Exception):
    """Back-to-source failed. ``kind`` classifies it for the user (``origin_not_found``, ...);
    ``origin_error`` is True when the origin itself failed (404, 5xx, reset, changed length)."""

    def __init__(self, kind: str, message: str, *, origin_error: bool = True) -> None:
        super().__init__(message)
        self.kind = kind
        self.origin_error = origin_error


_KINDS: tuple[tuple[type[SourceError], str, bool], ...] = (
    (SourceNotFound, "origin_not_found", True),
    (SourceAuthError, "origin_auth", True),
    (SourceChanged, "origin_changed", True),
    (SourceRangeNotSupported, "origin_protocol", True),
    (SourceProtocolError, "origin_protocol", True),
    (SourceUnavailable, "origin_unavailable", True),
    (SourceTLSError, "origin_tls", True),
    (SourceRequestError, "origin_rejected", True),
    (UnsupportedScheme, "bad_request", False),
    (MalformedURL, "bad_request", False),
)


def origin_error_of(e: SourceError) -> OriginError:
    """The :class:`OriginError` for a backend's error."""
    for cls, kind, from_origin in _KINDS:
        if isinstance(e, cls):
            return OriginError(kind, str(e), origin_error=from_origin)
    return OriginError("origin_error", str(e))


class OriginOrder:
    """The order in which the missing pieces are read from the origin: the wanted ones first (by index),
    then the others by index. Each piece is taken once. Sans-I/O."""

    def __init__(self, missing: Iterable[int], wanted: Iterable[int] = ()) -> None:
        self._todo = sorted(set(missing))
        self._left = set(self._todo)
        self._cursor = 0
        self._first: list[int] = []
        self.set_wanted(wanted)

    def __len__(self) -> int:
        """Pieces not taken yet."""
        return len(self._left)

    def set_wanted(self, pieces: Iterable[int]) -> None:
        """The wanted pieces now (it replaces the previous set; pieces taken already stay taken)."""
        self._first = sorted(p for p in set(pieces) if p in self._left)  # a sorted list is a heap

    def take(self) -> int | None:
        """The next piece to read; None when every piece was taken."""
        while self._first:
            piece = heapq.heappop(self._first)
            if piece in self._left:
                self._left.discard(piece)
                return piece
        while self._cursor < len(self._todo):
            piece = self._todo[self._cursor]
            self._cursor += 1
            if piece in self._left:
                self._left.discard(piece)
                return piece
        return None


@dataclass(frozen=True, slots=True)
class OriginPiece:
    """A piece stored from the origin, or found stored already (``fetched`` False, ``cost`` 0)."""

    index: int
    digest: str
    size: int
    cost: float
    fetched: bool = True


async def fetch_from_origin(
    backend: SourceBackend,
    url: str,
    headers: Headers,
    *,
    storage: Storage,
    task_id: str,
    fixed_piece_length: int | None,
    concurrency: int,
    on_task: Callable[[StoredTask], None],
    on_metadata: Callable[[int, int | None], None],
    on_piece: Callable[[OriginPiece], None],
    tenant: str = "",
    wanted: WantedPieces | None = None,
) -> StoredTask:
    """Store every piece of ``url`` in ``storage`` as task ``task_id`` (of ``tenant``); return the task (not finished:
    the caller finishes it, which computes the whole-file digest).

    Callbacks, synchronous, on the trio thread, in this order: ``on_task(task)`` once the task is open,
    ``on_metadata(piece_length, content_length)`` (again with the length when a stream of unknown length
    ends), ``on_piece(OriginPiece)`` for each piece (those stored already first). ``wanted``: the pieces the
    callers need first (read first when ranges work; watched while the fetch runs). Raises
    :class:`OriginError`; ``trio.Cancelled`` leaves the pieces stored so far for a later resume.
    """
    try:
        info = await backend.stat(url, headers)
        try:
            piece_length = piece_length_for(info.content_length, fixed_piece_length)
            if info.content_length is not None:
                PieceLayout(info.content_length, piece_length)
        except InvalidPieceLength as e:
            raise OriginError("bad_request", str(e), origin_error=False) from None
        length = info.content_length
        task = await trio.to_thread.run_sync(lambda: _open(storage, task_id, url, piece_length, length, tenant=tenant))
        on_task(task)
        on_metadata(piece_length, info.content_length)
        digests = await trio.to_thread.run_sync(task.piece_digests)
        for index, digest in enumerate(digests):
            if digest is not None:
                size = layout.size(index) if (layout := task.layout()) is not None else piece_length
                on_piece(OriginPiece(index, digest, size, 0.0, fetched=False))
        if info.content_length is not None and info.supports_ranges:
            if wanted is not None:
                wanted.set_layout(PieceLayout(info.content_length, piece_length))
            await _fetch_ranges(
                backend, url, headers, info=info, task=task, concurrency=concurrency, on_piece=on_piece, wanted=wanted
            )
        else:
            await _fetch_stream(backend, url, headers, info=info, task=task, on_metadata=on_metadata, on_piece=on_piece)
        return task
    except SourceError as e:
        raise origin_error_of(e) from None
    except LayoutConflict as e:
        raise OriginError("origin_changed", f"the file changed at the origin during the download: {e}") from None


def _open(storage: Storage, task_id: str, url: str, piece_length: int, content_length: int | None, *, tenant: str) -> StoredTask:
    try:
        return storage.get_or_create(task_id, url=url, piece_length=piece_length, content_length=content_length, tenant=tenant)
    except LayoutConflict:
        # Stored with another layout: an older version of the file. Start over.
        storage.delete(task_id)
        return storage.get_or_create(task_id, url=url, piece_length=piece_length, content_length=content_length, tenant=tenant)


async def _buffer(size: int) -> memoryview:
    """A page-aligned piece buffer (so that the storage writes it with ``O_DIRECT`` without a copy)."""
    return piece_buffer(size) if size < LARGE_BUFFER else await trio.to_thread.run_sync(piece_buffer, size)


async def _fetch_ranges(
    backend: SourceBackend,
    url: str,
    headers: Headers,
    *,
    info: SourceInfo,
    task: StoredTask,
    concurrency: int,
    on_piece: Callable[[OriginPiece], None],
    wanted: WantedPieces | None = None,
) -> None:
    layout = task.layout()
    assert layout is not None
    missing = await trio.to_thread.run_sync(task.missing_pieces)
    order = OriginOrder(missing)
    unwatch = wanted.watch(order.set_wanted) if wanted is not None else None

    # Pieces read and not yet stored, at most: a reader hands its piece to a task of its own to be hashed and
    # written and starts its next range at once, so that ``concurrency`` ranges stay in flight while the
    # storage works (an O_DIRECT write waits for the disk). Memory: up to 2 * concurrency piece buffers.
    storing = trio.Semaphore(concurrency)

    async def store(index: int, buffer: memoryview, began: float) -> None:
        try:
            write = functools.partial(task.write_piece, index, buffer, retain=True)  # a new buffer per piece
            digest = await trio.to_thread.run_sync(write)
        finally:
            storing.release()
        on_piece(OriginPiece(index, digest, len(buffer), time.monotonic() - began))

    async def worker(nursery: trio.Nursery) -> None:
        while (index := order.take()) is not None:
            start, end = layout.span(index)
            began = time.monotonic()
            buffer = await _buffer(end - start)
            await backend.read_range_into(url, start, buffer, headers, expect=info)
            await storing.acquire()
            nursery.start_soon(store, index, buffer, began)

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(min(concurrency, len(missing))):
                nursery.start_soon(worker, nursery)
    except BaseExceptionGroup as group:
        # A worker's SourceError (or StorageError) reaches the caller as itself, not wrapped in the
        # nursery's group; a group with a cancellation in it stays as it is.
        matched, rest = group.split(Exception)
        if matched is None or rest is not None:
            raise
        first: BaseException = matched
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    finally:
        if unwatch is not None:
            unwatch()


async def _fetch_stream(
    backend: SourceBackend,
    url: str,
    headers: Headers,
    *,
    info: SourceInfo,
    task: StoredTask,
    on_metadata: Callable[[int, int | None], None],
    on_piece: Callable[[OriginPiece], None],
) -> None:
    piece_length = task.piece_length
    buffer = await _buffer(piece_length)
    filled = 0
    index = 0
    total = 0
    began = time.monotonic()

    async def land(size: int) -> None:
        nonlocal began
        if not task.has_piece(index):
            digest = await trio.to_thread.run_sync(task.write_piece, index, memoryview(buffer)[:size])
            on_piece(OriginPiece(index, digest, size, time.monotonic() - began))
        began = time.monotonic()

    async with backend.stream(url, headers, expect=info) as chunks:
        async for chunk in chunks:
            view = memoryview(chunk)
            total += len(view)
            while view:
                take = min(len(view), piece_length - filled)
                buffer[filled : filled + take] = view[:take]
                filled += take
                view = view[take:]
                if filled == piece_length:
                    await land(filled)
                    index += 1
                    filled = 0
    if info.content_length is not None and total != info.content_length:
        raise OriginError(
            "origin_changed", f"the origin sent {total} bytes of {url}, but announced {info.content_length}: did the file change?"
        )
    if filled:
        await land(filled)  # the short last piece: it fixes the length of a stream that had none
    if task.content_length is None:
        await trio.to_thread.run_sync(task.set_content_length, total)
    if info.content_length is None:
        on_metadata(piece_length, total)
