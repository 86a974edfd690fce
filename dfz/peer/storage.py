"""Local storage of tasks and pieces: one data file per task, crash-safe metadata, export to a target path.

Layout on disk::

    <root>/LOCK                        held (flock) by the one Storage using the directory
    <root>/tasks/<task id>/data        the content; piece i at offset i * piece_length, written with pwrite
    <root>/tasks/<task id>/meta.json   the metadata (below); replaced whole, never edited in place

The metadata is a JSON object: ``format`` (1), ``task_id``, ``url``, ``piece_length``, ``content_length``
(null while a stream of unknown length is still arriving), ``state`` (``running`` or ``succeeded``),
``digests`` (one entry per piece: its BLAKE3 hex digest, or null when the piece is not stored: this is
the piece bitmap), ``content_digest`` (BLAKE3 of the whole content, hex), ``hash_content`` (whether this
peer computes the whole-file digest itself), ``data_mtime_ns`` (the data file's mtime when the task
succeeded), ``synced`` (the data file was fdatasync-ed after the last piece recorded here was written),
``created_at`` and ``updated_at`` (Unix seconds), and ``tenant`` (the tenant the task was stored for, ""
for none; absent in files written before tenants: "").

Crash safety: snapshots at checkpoints, not a journal; data verified after a crash, not synced per piece.
    The metadata is rewritten whole: written to ``meta.json.tmp``, fsynced, renamed over ``meta.json``,
    and the directory fsynced, so a reader finds the old snapshot or the new one, never a mix.
    Snapshots are taken at checkpoints (every ``checkpoint_pieces`` new pieces, or when the oldest
    unrecorded piece is ``checkpoint_seconds`` old, and always on create, at the end of a stream, on
    finish and on close), not per piece: a crash loses the pieces recorded since the last checkpoint,
    which are simply fetched again, like pieces written but never recorded.

    The data file is not ``fdatasync``-ed on the download path: forcing write-back every checkpoint
    holds a download to the disk's write speed (on the development machine, syncing every 128 MiB
    made writing 256 MiB take 0.16-0.82 s instead of 0.08-0.12 s), while curl writes to the page
    cache. Instead each snapshot says whether the data had been synced before it (``synced``);
    :meth:`StoredTask.sync` (called on close, and by the daemon now and then) makes it so. A task
    loaded from a snapshot that is not synced was left by a process or a machine that stopped: every
    stored piece is re-read and checked against its digest before the task is used, the damaged ones
    are dropped, and the data is synced. So a piece is trusted without re-reading only if its bytes
    were durable when its record was.

    A snapshot was chosen over an append-only journal because the metadata is small (about 70 bytes per
    piece: 35 KB for a 2 GB file, 70 MiB at the :data:`dfz.tasks.MAX_PIECES` limit), so rewriting it
    once a checkpoint costs little, while a journal would need torn-tail detection, replay and
    compaction. A reader validates the snapshot as a whole; one that fails validation (bad JSON, wrong
    types, inconsistent fields, a missing data file or, for a running task, one of the wrong size) is
    reported in the log and the task is treated as absent: it is downloaded again.

Concurrency: the API is synchronous and thread-safe; call it from trio with ``trio.to_thread.run_sync``.
    Several threads may write different pieces of one task at once: pwrite at distinct offsets needs no
    lock, and a stored piece is never rewritten. Each task has a lock for its in-memory metadata, a lock
    that orders snapshots, a lock held by the one thread feeding the whole-file hasher, and a lock for
    re-verification; they are taken in the order verify → hash → snapshot → metadata. Closing or deleting a
    task waits for the reads and writes in progress and then fails later ones with :class:`TaskClosed`,
    so a file descriptor is never used after it is closed (and possibly reused).

Typical use, each call in a worker thread (``trio.to_thread.run_sync``)::

    storage = Storage(data_dir)
    task = storage.get_or_create(tid, url=url, piece_length=piece_length, content_length=length)
    task.write_piece(i, data, expected_digest=digest)     # from several threads; children pass digests
    task.finish()                                         # or finish(content_digest=...) if not hashing
    task.export(output, digest=Digest.parse(user_digest))
    task.read_piece(i)                                    # serving children, while running or after
    storage.sync()                                        # now and then; storage.close() at the end

Whole-file digest: BLAKE3 of the content (:mod:`dfz.tasks`), fed in piece order as pieces land; a piece
that lands ahead of the cursor is read back from the page cache when the cursor reaches it. A peer that
verifies every piece against the scheduler's digests may instead skip this pass (``hash_content=False``)
and adopt the reported whole-file digest at :meth:`StoredTask.finish`: equal piece digests mean equal
bytes.

Pieces are written with ``O_DIRECT`` where the filesystem allows it (``direct_io``, on by default): whole
pages through a page-aligned buffer (the caller's own when it is aligned, as a :func:`piece_buffer` is;
otherwise a copy), the unaligned tail of the last piece through the ordinary descriptor; a filesystem
that refuses ``O_DIRECT`` (when the descriptor is opened, or on the first I/O) gets buffered writes,
silently. On the development machine (a VM) every page of memory touched for the
first time costs a hypervisor fault, so writing a new file through the page cache cost 1.2-2.5
CPU-seconds per GB, against 0.05 with ``O_DIRECT`` (``pwrite`` of 4 MiB pieces, 1 GiB), and a swarm of
8 daemons on one machine spent 40% of its CPU there: most of what a daemon writes is never read back
by it. What is read back is served from a small cache of pieces in memory (``piece_cache_bytes``, least
recently used first out; a piece that just landed, from a zero-copy buffer handed over by the writer,
is what children ask for), then from the page cache (a seed serving one finished task to many children
reads each page from the disk once). One-pass reads (the whole-file hash, re-verification, a sha256
export check) read direct, so they do not fill the page cache with what is read once.

Exports never show a half-written file: the output is made under a temporary name in the target's
directory and renamed over the target. It is a hard link to the cached data file when both are on one
filesystem, a copy otherwise. A hard link shares the inode, so an edit of the output edits the cache.
The data file's mtime and size are recorded when a task succeeds; when the next load, read or export
finds them changed, the task first gets a private copy of the data (if the inode has other names, so
that repairing the cache never undoes the user's edit), then every piece is re-verified and the
damaged ones are dropped: the task runs again and only those pieces are fetched again.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

import msgspec

from ..log import event, get_logger
from ..tasks import (
    MAX_PIECES,
    BytesLike,
    Digest,
    DigestAlgorithm,
    DigestMismatch,
    InvalidPieceLength,
    PieceLayout,
    content_hasher,
    is_hex_digest,
    is_task_id,
    piece_digest,
    validate_piece_length,
)

log = get_logger("peer.storage")

META_FORMAT: Literal[1] = 1
MAX_META_BYTES = 128 * 1024 * 1024
"""Larger metadata files are treated as corrupt: :data:`dfz.tasks.MAX_PIECES` pieces need about half of this."""

_COPY_INSTEAD_OF_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOSYS}


# --- errors ----------------------------------------------------------------------------------------------


class StorageError(Exception):
    """Base of the errors of this module. Digest failures raise :class:`dfz.tasks.DigestMismatch`."""


class StorageLocked(StorageError):
    """Another process uses the storage directory."""


class InvalidTaskId(StorageError, ValueError):
    """A task id that is not 64 lowercase hex digits (it would name a directory: never trusted)."""


class TaskExists(StorageError):
    """:meth:`Storage.create` for a task that is already stored."""


class TaskClosed(StorageError):
    """The task was deleted, or the storage closed, while it was in use."""


class LayoutConflict(StorageError):
    """The stored task has another piece length or content length than the one asked for."""


class PieceRejected(StorageError, ValueError):
    """A piece with an index or a size that does not fit the task's layout."""


class PieceMissing(StorageError):
    """A read of a piece that is not stored."""


class TaskIncomplete(StorageError):
    """Finish or export of a task that still misses pieces (or whose cached data was damaged)."""


class ExportError(StorageError):
    """The output file could not be written; the message says where and why."""


class CorruptMetadata(StorageError):
    """A metadata file that fails validation. Reported in the log; the task is treated as absent."""


# --- metadata --------------------------------------------------------------------------------------------


class TaskState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"


class ExportMethod(StrEnum):
    LINK = "link"
    COPY = "copy"


class _Meta(msgspec.Struct, kw_only=True):
    format: Literal[1]
    task_id: str
    url: str
    piece_length: int
    content_length: int | None
    state: TaskState
    digests: list[str | None]
    content_digest: str | None
    hash_content: bool
    data_mtime_ns: int | None
    synced: bool
    created_at: float
    updated_at: float
    tenant: str = ""


_decoder = msgspec.json.Decoder(_Meta)


def _validate(meta: _Meta, task_id: str, data_size: int) -> None:
    """Raise :class:`CorruptMetadata` unless ``meta`` is a consistent description of task ``task_id``."""

    def bad(reason: str) -> CorruptMetadata:
        return CorruptMetadata(f"task {task_id}: {reason}")

    if meta.task_id != task_id:
        raise bad(f"metadata names task {meta.task_id!r}")
    try:
        validate_piece_length(meta.piece_length)
    except InvalidPieceLength as e:
        raise bad(str(e)) from None
    for i, digest in enumerate(meta.digests):
        if digest is not None and not is_hex_digest(digest):
            raise bad(f"digest of piece {i} is malformed")
    if meta.content_digest is not None and not is_hex_digest(meta.content_digest):
        raise bad("content digest is malformed")
    if meta.content_length is None:
        if meta.state is not TaskState.RUNNING:
            raise bad("a finished task has no content length")
        if len(meta.digests) > MAX_PIECES:
            raise bad(f"more than {MAX_PIECES} pieces")
        stored = [i for i, d in enumerate(meta.digests) if d is not None]
        if meta.synced and stored and data_size < (stored[-1] + 1) * meta.piece_length:
            raise bad(f"data file has {data_size} bytes, too few for piece {stored[-1]}")
        return
    try:
        layout = PieceLayout(meta.content_length, meta.piece_length)
    except ValueError as e:
        raise bad(str(e)) from None
    if len(meta.digests) != layout.count:
        raise bad(f"{len(meta.digests)} piece entries for {layout.count} pieces")
    if meta.state is TaskState.SUCCEEDED:
        if None in meta.digests or meta.content_digest is None or meta.data_mtime_ns is None:
            raise bad("a finished task misses pieces or digests")
        # A size change of a finished task's data file is an edit through an exported hard link: the
        # task is re-verified on load (StoredTask._ensure_intact) rather than thrown away.
    elif meta.synced and data_size != meta.content_length:
        # (not synced: the size may not have reached the disk; the task is re-verified on load)
        raise bad(f"data file has {data_size} bytes, expected {meta.content_length}")


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """A snapshot of a stored task, for listing and progress."""

    task_id: str
    url: str
    state: TaskState
    piece_length: int
    content_length: int | None
    piece_count: int | None
    """None while the content length is unknown."""
    pieces_stored: int
    bytes_stored: int
    content_digest: str | None
    data_path: Path
    created_at: float
    updated_at: float
    tenant: str = ""
    """The tenant the task was stored for (its task id is of that tenant); "" for none."""


def _info_of(meta: _Meta, data_path: Path) -> TaskInfo:
    stored = [i for i, d in enumerate(meta.digests) if d is not None]
    if meta.content_length is None:
        count = None
        nbytes = len(stored) * meta.piece_length
    else:
        layout = PieceLayout(meta.content_length, meta.piece_length)
        count = layout.count
        nbytes = sum(layout.size(i) for i in stored)
    return TaskInfo(
        task_id=meta.task_id,
        url=meta.url,
        state=meta.state,
        piece_length=meta.piece_length,
        content_length=meta.content_length,
        piece_count=count,
        pieces_stored=len(stored),
        bytes_stored=nbytes,
        content_digest=meta.content_digest,
        data_path=data_path,
        created_at=meta.created_at,
        updated_at=meta.updated_at,
        tenant=meta.tenant,
    )


# --- file helpers ----------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temporary file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


AHEAD_LIMIT = 16
"""Pieces that landed past the whole-file hash's cursor (with ``retain``) kept in memory until it
reaches them, at most: an origin fetch with a few ranges in flight lands a few pieces out of order."""

PAGE = 4096
"""Alignment of ``O_DIRECT`` I/O: offsets, lengths and buffer addresses (the largest logical block size)."""


def _aligned(size: int) -> memoryview:
    """A writable, page-aligned view of ``size`` bytes of a new heap buffer.

    From the heap (``bytearray``), not a fresh ``mmap``: malloc hands back memory already touched, which
    costs a fraction of new pages here (see the module docstring). The view keeps the buffer alive.
    """
    raw = bytearray(size + PAGE)
    skip = -ctypes.addressof(ctypes.c_char.from_buffer(raw)) % PAGE
    return memoryview(raw)[skip : skip + size]


def piece_buffer(size: int) -> memoryview:
    """A new zero-filled, writable, page-aligned buffer of ``size`` bytes to receive a piece in.

    :meth:`StoredTask.write_piece` writes a page-aligned piece with ``O_DIRECT`` straight from the
    caller's buffer; any other buffer is first copied into an aligned one (on the development machine
    that allocation and copy cost about 0.25 CPU-seconds per GB, a sixth of a seed's back-to-source
    CPU). Allocating 4 MiB takes about a millisecond: do it in a worker thread.
    """
    return _aligned(size)


def _is_aligned(data: memoryview) -> bool:
    """Whether ``data`` (a contiguous byte view) starts on a page boundary (False when that cannot be told:
    the address of a read-only buffer is not available without a copy)."""
    if data.readonly or not data.nbytes:
        return False
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(data)) % PAGE == 0
    except (TypeError, ValueError):
        return False


class _PieceCache:
    """Pieces in memory by (task id, index), up to ``budget`` bytes; the least recently used go first.

    Holds only buffers that nobody modifies (handed over by a writer, or read by the storage itself)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._items: OrderedDict[tuple[str, int], BytesLike] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, task_id: str, index: int) -> BytesLike | None:
        with self._lock:
            data = self._items.get((task_id, index))
            if data is not None:
                self._items.move_to_end((task_id, index))
            return data

    def put(self, task_id: str, index: int, data: BytesLike) -> None:
        size = len(data)
        if size > self.budget:
            return
        with self._lock:
            old = self._items.pop((task_id, index), None)
            if old is not None:
                self._bytes -= len(old)
            self._items[(task_id, index)] = data
            self._bytes += size
            while self._bytes > self.budget:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)

    def drop(self, task_id: str, indices: Iterable[int] | None = None) -> None:
        """Forget pieces of a task (all of them when ``indices`` is None)."""
        with self._lock:
            keys = [k for k in self._items if k[0] == task_id] if indices is None else [(task_id, i) for i in indices]
            for k in keys:
                data = self._items.pop(k, None)
                if data is not None:
                    self._bytes -= len(data)


def _open_direct(path: Path) -> int | None:
    """A second descriptor of ``path`` with ``O_DIRECT``, or None where the filesystem refuses it."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_RDWR | flag)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return None
        raise


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) == size:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            raise StorageError(f"data file ends at {offset + got}, before the end of the piece at {offset + size}")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


# --- one task --------------------------------------------------------------------------------------------


class StoredTask:
    """One task in the storage: its data file and its metadata. Obtain it from :class:`Storage`.

    Thread-safe; every method may block on disk I/O or hashing, so call them from a worker thread.
    """

    def __init__(self, storage: Storage, meta: _Meta, fd: int) -> None:
        self._storage = storage
        self._meta = meta
        self._fd = fd
        self._dir = storage.task_dir(meta.task_id)
        self._dfd = _open_direct(self._dir / "data") if storage.direct_io else None
        """The data file opened with ``O_DIRECT`` (None: buffered I/O only); replaced with ``_fd``."""
        self._retired: list[int] = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._flush_lock = threading.Lock()
        self._hash_lock = threading.Lock()
        self._verify_lock = threading.Lock()
        self._io_users = 0
        self._swapping = False  # the data file is being replaced: I/O sections wait
        self._closed = False
        self._dirty = False
        self._unsynced = not meta.synced  # pieces were written since the data file was last fdatasync-ed
        self._needs_recovery = not meta.synced  # loaded from a snapshot whose data may not be on disk
        self._pending = 0
        self._first_pending_at = 0.0
        self._stored = sum(d is not None for d in meta.digests)
        self._hasher = content_hasher()
        self._hashed = 0  # pieces [0, _hashed) have been fed to _hasher
        self._ahead: dict[int, BytesLike] = {}  # retained pieces past the hash cursor, kept until hashed

    # -- state, read under the lock --

    @property
    def task_id(self) -> str:
        return self._meta.task_id

    @property
    def url(self) -> str:
        return self._meta.url

    @property
    def piece_length(self) -> int:
        return self._meta.piece_length

    @property
    def content_length(self) -> int | None:
        with self._lock:
            return self._meta.content_length

    @property
    def state(self) -> TaskState:
        with self._lock:
            return self._meta.state

    @property
    def tenant(self) -> str:
        """The tenant the task was stored for ("" for none)."""
        return self._meta.tenant

    @property
    def content_digest(self) -> str | None:
        with self._lock:
            return self._meta.content_digest

    @property
    def hashes_content(self) -> bool:
        """Whether this peer computes the whole-file digest itself (else it adopts a reported one)."""
        return self._meta.hash_content

    @property
    def data_path(self) -> Path:
        return self._dir / "data"

    def layout(self) -> PieceLayout | None:
        """The piece layout, or None while the content length is unknown."""
        with self._lock:
            cl = self._meta.content_length
        return None if cl is None else PieceLayout(cl, self._meta.piece_length)

    def info(self) -> TaskInfo:
        with self._lock:
            return _info_of(self._meta, self.data_path)

    def has_piece(self, index: int) -> bool:
        with self._lock:
            return 0 <= index < len(self._meta.digests) and self._meta.digests[index] is not None

    def piece_digests(self) -> list[str | None]:
        """The digest of each piece, None where the piece is not stored (the piece bitmap)."""
        with self._lock:
            return list(self._meta.digests)

    def stored_pieces(self) -> list[int]:
        with self._lock:
            return [i for i, d in enumerate(self._meta.digests) if d is not None]

    def missing_pieces(self) -> list[int]:
        """Pieces not stored; while the length is unknown, only the gaps below the highest stored piece."""
        with self._lock:
            return [i for i, d in enumerate(self._meta.digests) if d is None]

    # -- I/O sections --

    def _write_at(self, fd: int, data: memoryview, offset: int) -> None:
        """Write ``data`` at ``offset`` (inside an I/O section): whole pages direct, the rest buffered."""
        dfd = self._dfd
        head = len(data) & ~(PAGE - 1) if offset % PAGE == 0 else 0
        if head and dfd is not None:
            if _is_aligned(data):  # a piece_buffer(): no copy
                buf = data[:head]
            else:
                buf = _aligned(head)
                buf[:] = data[:head]
            try:
                _pwrite_all(dfd, buf, offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._no_direct()
                head = 0
        else:
            head = 0
        if head < len(data):
            _pwrite_all(fd, data[head:], offset + head)

    def _read_at(self, fd: int, size: int, offset: int, *, direct: bool) -> BytesLike:
        """Read ``size`` bytes at ``offset`` (inside an I/O section); with ``direct``, past the page cache
        where the range and the filesystem allow."""
        dfd = self._dfd
        if not direct or dfd is None or offset % PAGE or size < PAGE:
            return _pread_all(fd, size, offset)
        buf = _aligned((size + PAGE - 1) & ~(PAGE - 1))
        try:
            got = os.preadv(dfd, [buf], offset)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._no_direct()
            return _pread_all(fd, size, offset)
        if got < size:  # the tail page was written buffered and not yet flushed, or the file is short
            head = got & ~(PAGE - 1)
            buf[head:size] = _pread_all(fd, size - head, offset + head)
        return buf[:size]

    def _no_direct(self) -> None:
        """The filesystem opened the file with ``O_DIRECT`` but refuses its I/O: buffered from now on."""
        with self._lock:
            dfd, self._dfd = self._dfd, None
            if dfd is not None:  # other threads may be using it: closed with the task
                self._retired.append(dfd)
        if dfd is not None:
            event(log, logging.INFO, "storage.direct_io_off", task=self.task_id)

    @contextlib.contextmanager
    def _io(self) -> Iterator[int]:
        """Use the data file descriptor; close() waits for every section to end."""
        with self._lock:
            while self._swapping:
                self._idle.wait()
            if self._closed:
                raise TaskClosed(f"task {self.task_id} was deleted or its storage closed")
            self._io_users += 1
        try:
            yield self._fd
        finally:
            with self._lock:
                self._io_users -= 1
                if self._io_users == 0:
                    self._idle.notify_all()

    def _piece_size(self, index: int) -> int:
        """Size of a piece (lock held). While the length is unknown every stored piece is a full one."""
        cl = self._meta.content_length
        if cl is None:
            return self._meta.piece_length
        return PieceLayout(cl, self._meta.piece_length).size(index)

    # -- writing --

    def write_piece(self, index: int, data: BytesLike, *, expected_digest: str | None = None, retain: bool = False) -> str:
        """Verify, write and record piece ``index``; return its BLAKE3 digest.

        ``expected_digest`` is the digest the scheduler reported for this piece (children pass it; the
        peer that fetched from the origin does not). Raises :class:`dfz.tasks.DigestMismatch` (nothing is
        written) when it differs, :class:`PieceRejected` when the index or size does not fit the layout,
        :class:`TaskClosed` after a delete. Writing a piece that is already stored with the same digest
        does nothing. Two threads writing one index at the same time must write the same bytes (they do
        when both pass the expected digest, as when one piece is asked of two parents).

        While the content length is unknown, every piece must be a full piece except the last one of the
        stream, which ends it: its size fixes the content length.

        ``retain``: the caller hands ``data`` over and never modifies it again, so the storage may keep it
        in its piece cache to serve reads (a received message's buffer; not a buffer that is reused).
        """
        view = memoryview(data).cast("B")
        size = len(view)
        pl = self._meta.piece_length
        with self._lock:
            cl = self._meta.content_length
            if cl is None:
                if not isinstance(index, int) or not 0 <= index < MAX_PIECES or not 0 < size <= pl:
                    raise PieceRejected(f"piece {index} of task {self.task_id}: {size} bytes (a piece has 1..{pl})")
            else:
                try:
                    want = PieceLayout(cl, pl).size(index)
                except IndexError as e:
                    raise PieceRejected(f"task {self.task_id}: {e}") from None
                if size != want:
                    raise PieceRejected(f"piece {index} of task {self.task_id} has {size} bytes, expected {want}")
        digest = piece_digest(view)
        what = f"piece {index} of task {self.task_id}"
        if expected_digest is not None and digest != expected_digest:
            raise DigestMismatch(what, expected_digest, digest)
        with self._lock:
            stored = self._meta.digests[index] if index < len(self._meta.digests) else None
        if stored is not None:
            if stored != digest:
                raise DigestMismatch(what, stored, digest)
            return digest
        if cl is None and size < pl:
            self.set_content_length(index * pl + size)
        with self._io() as fd:
            self._write_at(fd, view, index * pl)
        if retain:
            self._storage._cache.put(self.task_id, index, view)
            if self._meta.hash_content:
                with self._lock:
                    if index > self._hashed and len(self._ahead) < AHEAD_LIMIT:
                        self._ahead[index] = view
        else:
            self._storage._cache.drop(self.task_id, (index,))
        if self._record(index, digest):
            self.flush()
        self._advance_hash(index, view)
        return digest

    def _record(self, index: int, digest: str) -> bool:
        """Mark a written piece as stored; True when a checkpoint is due."""
        now = self._storage.clock()
        with self._lock:
            if self._closed:
                raise TaskClosed(f"task {self.task_id} was deleted or its storage closed")
            digests = self._meta.digests
            if index >= len(digests):  # only while the content length is unknown
                digests.extend([None] * (index + 1 - len(digests)))
            if digests[index] is not None:
                if digests[index] != digest:
                    raise DigestMismatch(f"piece {index} of task {self.task_id}", digests[index] or "", digest)
                return False
            digests[index] = digest
            self._stored += 1
            self._dirty = True
            self._unsynced = True
            self._pending += 1
            if self._pending == 1:
                self._first_pending_at = now
            return (
                self._pending >= self._storage.checkpoint_pieces
                or now - self._first_pending_at >= self._storage.checkpoint_seconds
            )

    def set_content_length(self, content_length: int) -> None:
        """Fix the length of a stream that had none, when it ends (possibly on a piece boundary, or empty).

        Raises :class:`LayoutConflict` if a different length is already known or the stored pieces do not
        fit the new layout (a stream that ends earlier than pieces already stored).
        """
        with self._lock:
            known = self._meta.content_length
            if known is not None:
                if known != content_length:
                    raise LayoutConflict(f"task {self.task_id} has {known} bytes, not {content_length}")
                return
            layout = PieceLayout(content_length, self._meta.piece_length)
            digests = self._meta.digests
            for i, d in enumerate(digests):
                if d is not None and (i >= layout.count or layout.size(i) != self._meta.piece_length):
                    raise LayoutConflict(f"task {self.task_id}: stored piece {i} does not fit {content_length} bytes")
            del digests[layout.count :]
            digests.extend([None] * (layout.count - len(digests)))
            self._meta.content_length = content_length
            self._dirty = True
            self._unsynced = True
        with self._io() as fd:
            os.ftruncate(fd, content_length)
        self.flush()

    # -- the whole-file digest --

    def _advance_hash(self, index: int | None, view: memoryview | None) -> None:
        """Feed the hasher the pieces that follow its cursor, if no other thread is doing it.

        The re-check after releasing the hash lock closes the race in which another thread stored the
        next piece while this one held the lock and so skipped hashing it.
        """
        if not self._meta.hash_content:
            return
        while self._hash_lock.acquire(blocking=False):
            try:
                self._hash_stored(index, view)
            except TaskClosed:
                return
            except (StorageError, OSError) as e:  # the piece is stored; finish() retries and reports
                event(log, logging.WARNING, "storage.hash_deferred", task=self.task_id, error=e)
                return
            finally:
                self._hash_lock.release()
            with self._lock:
                nxt = self._hashed
                if nxt >= len(self._meta.digests) or self._meta.digests[nxt] is None:
                    return

    def _hash_stored(self, index: int | None, view: memoryview | None) -> None:
        """Hash lock held: feed every consecutive stored piece from the cursor on."""
        while True:
            with self._lock:
                i = self._hashed
                if i >= len(self._meta.digests) or self._meta.digests[i] is None:
                    return
                size = self._piece_size(i)
            with self._lock:
                ahead = self._ahead.pop(i, None)
            if i == index and view is not None:
                data: BytesLike = view
            elif ahead is not None:
                data = ahead
            else:
                cached = self._storage._cache.get(self.task_id, i)
                if cached is not None:
                    data = cached
                else:
                    with self._io() as fd:
                        data = self._read_at(fd, size, i * self._meta.piece_length, direct=True)
            self._hasher.update(data)
            with self._lock:
                self._hashed = i + 1

    def _hash_all(self) -> str:
        """The whole-file digest, computed in one pass over the stored pieces (read direct)."""
        hasher = content_hasher()
        layout = self.layout()
        assert layout is not None
        with self._io() as fd:
            for i in range(layout.count):
                data = self._storage._cache.get(self.task_id, i)
                if data is None:
                    data = self._read_at(fd, layout.size(i), i * self._meta.piece_length, direct=True)
                hasher.update(data)
        return str(hasher.hexdigest())

    def _drop_pieces(self, indices: list[int]) -> None:
        """Forget damaged pieces: the task runs again and they are fetched again."""
        self._storage._cache.drop(self.task_id, indices)
        with self._hash_lock, self._lock:
            for i in indices:
                self._ahead.pop(i, None)
            for i in indices:
                if self._meta.digests[i] is not None:
                    self._meta.digests[i] = None
                    self._stored -= 1
            if indices and min(indices) < self._hashed:
                self._hasher = content_hasher()
                self._hashed = 0
            self._meta.state = TaskState.RUNNING
            if self._meta.hash_content:
                self._meta.content_digest = None
            self._meta.data_mtime_ns = None
            self._dirty = True
        event(log, logging.WARNING, "storage.pieces_dropped", task=self.task_id, pieces=len(indices))
        self.flush()

    # -- finishing --

    def finish(self, *, content_digest: str | None = None) -> TaskInfo:
        """Mark the task succeeded once every piece is stored, and make that durable.

        With ``hash_content`` (the default) the whole-file digest is computed here (completing the
        incremental pass) and, if ``content_digest`` is given, compared with it: a mismatch raises
        :class:`dfz.tasks.DigestMismatch` and the task stays running. Without it, ``content_digest`` (the
        digest the scheduler reported) is recorded; when none is given, the digest is computed here in one
        pass over the data. Raises :class:`TaskIncomplete` while pieces are missing or the length is
        unknown. Finishing a finished task returns its info.
        """
        with self._lock:
            meta = self._meta
            if meta.state is TaskState.SUCCEEDED:
                if content_digest is not None and content_digest != meta.content_digest:
                    raise DigestMismatch(f"content of task {self.task_id}", content_digest, meta.content_digest or "")
                return _info_of(meta, self.data_path)
            if meta.content_length is None:
                raise TaskIncomplete(f"task {self.task_id}: the content length is unknown until the stream ends")
            missing = len(meta.digests) - self._stored
            if missing:
                raise TaskIncomplete(f"task {self.task_id}: {missing} of {len(meta.digests)} pieces are missing")
        if meta.hash_content:
            with self._hash_lock:
                self._hash_stored(None, None)
                with self._lock:
                    if self._hashed != len(meta.digests):  # a piece was dropped meanwhile
                        raise TaskIncomplete(f"task {self.task_id}: pieces were dropped while finishing")
                    actual = self._hasher.hexdigest()
            if content_digest is not None and content_digest != actual:
                raise DigestMismatch(f"content of task {self.task_id}", content_digest, actual)
        else:
            adopted = content_digest or meta.content_digest or self._hash_all()
            if not is_hex_digest(adopted):
                raise ValueError(f"content digest {adopted!r} is not 64 lowercase hex digits")
            actual = adopted
        with self._io() as fd:
            mtime = os.fstat(fd).st_mtime_ns  # every piece is written: the data file changes no more
        with self._lock:
            if self._stored != len(meta.digests):  # a damaged piece was dropped meanwhile
                raise TaskIncomplete(f"task {self.task_id}: pieces were dropped while finishing")
            meta.content_digest = actual
            meta.data_mtime_ns = mtime
            meta.state = TaskState.SUCCEEDED
            self._dirty = True
        self.flush()
        event(log, logging.INFO, "storage.succeeded", task=self.task_id, bytes=meta.content_length)
        return self.info()

    # -- reading --

    def read_piece(self, index: int, *, verify: bool = False) -> BytesLike:
        """The bytes of a stored piece (for serving). Raises :class:`PieceMissing` if it is not stored.

        With ``verify``, a piece whose bytes no longer match its digest is dropped (the task runs again)
        and :class:`dfz.tasks.DigestMismatch` is raised. A finished task whose data file was modified
        since it finished is re-verified as a whole first (see the module docstring).
        """
        self._ensure_intact()
        with self._lock:
            digests = self._meta.digests
            digest = digests[index] if 0 <= index < len(digests) else None
            if digest is None:
                raise PieceMissing(f"piece {index} of task {self.task_id} is not stored")
            size = self._piece_size(index)
        cache = self._storage._cache
        data = cache.get(self.task_id, index)
        if data is None:
            with self._io() as fd:
                data = self._read_at(fd, size, index * self._meta.piece_length, direct=False)
            cache.put(self.task_id, index, data)
        if verify:
            actual = piece_digest(data)
            if actual != digest:
                self._drop_pieces([index])
                raise DigestMismatch(f"stored piece {index} of task {self.task_id}", digest, actual)
        return data

    def verify_all(self) -> list[int]:
        """Re-read and check every stored piece; drop and return the damaged ones."""
        bad: list[int] = []
        for i in self.stored_pieces():
            with self._lock:
                digest = self._meta.digests[i]
                size = self._piece_size(i)
            with self._io() as fd:
                try:
                    data = self._read_at(fd, size, i * self._meta.piece_length, direct=True)
                except StorageError:
                    data = b""
            if piece_digest(data) != digest:
                bad.append(i)
        if bad:
            self._drop_pieces(bad)
        return bad

    def _ensure_intact(self) -> None:
        """Re-verify the task before use when its data cannot be trusted as it is.

        That is when it was loaded from a snapshot that was not synced (the process or the machine
        stopped before the data surely reached the disk), or when a finished task's data file changed
        since it finished (an edit through an exported hard link). Damaged pieces are dropped; then the
        data is synced, so the verdict holds after another crash. Cheap when there is nothing to do.
        """
        with self._lock:
            recover = self._needs_recovery
            finished = self._meta.state is TaskState.SUCCEEDED
            recorded = self._meta.data_mtime_ns
        if not recover:
            if not finished:
                return
            with self._io() as fd:
                st = os.fstat(fd)
            if st.st_mtime_ns == recorded and st.st_size == self._meta.content_length:
                return
        with self._verify_lock:
            with self._io() as fd:
                st = os.fstat(fd)
            with self._lock:
                recover = self._needs_recovery
                finished = self._meta.state is TaskState.SUCCEEDED
                modified = finished and (st.st_mtime_ns != self._meta.data_mtime_ns or st.st_size != self._meta.content_length)
            if not (modified or recover):
                return  # another thread verified it meanwhile
            event(log, logging.WARNING, "storage.verifying", task=self.task_id, modified=modified, unsynced=recover)
            if modified and st.st_nlink > 1:
                self._break_link()
            length = self._meta.content_length
            if length is not None:
                with self._io() as fd:
                    if os.fstat(fd).st_size != length:
                        os.ftruncate(fd, length)
            bad = self.verify_all()
            with self._io() as fd:
                mtime = os.fstat(fd).st_mtime_ns
            with self._lock:
                if not bad and self._meta.state is TaskState.SUCCEEDED:
                    self._meta.data_mtime_ns = mtime
                self._needs_recovery = False
                self._dirty = True
                self._unsynced = True
            self.sync()

    def _break_link(self) -> None:
        """Give the task a private copy of its data file. The old inode's other names (an exported
        output that its owner edited) are left exactly as they are: repairing the cache must not undo
        the user's edit."""
        tmp = self._dir / "data.tmp"
        old_dfd_wanted = self._storage.direct_io
        try:
            with self._io():
                shutil.copyfile(self.data_path, tmp)
            new_fd = os.open(tmp, os.O_RDWR)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        try:
            os.fsync(new_fd)
            with self._lock:
                self._swapping = True
                try:
                    while self._io_users:
                        self._idle.wait()
                    os.replace(tmp, self.data_path)
                    old_fd, self._fd = self._fd, new_fd
                    old_dfd, self._dfd = self._dfd, (_open_direct(self.data_path) if old_dfd_wanted else None)
                finally:
                    self._swapping = False
                    self._idle.notify_all()
        except BaseException:
            os.close(new_fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(old_fd)
        if old_dfd is not None:
            os.close(old_dfd)
        _fsync_dir(self._dir)
        event(log, logging.WARNING, "storage.link_broken", task=self.task_id)

    # -- export --

    def export(
        self,
        target: str | os.PathLike[str],
        *,
        digest: Digest | None = None,
        allow_link: bool = True,
        durable: bool = False,
    ) -> ExportMethod:
        """Put the finished content at ``target``; return how (hard link or copy).

        ``digest`` is the user's expected digest of the whole file: a ``blake3`` one is compared with the
        task's whole-file digest, a ``sha256`` one is computed by reading the data once. On any error
        nothing appears at ``target`` (an existing file there is left as it was): :class:`TaskIncomplete`
        when the task has not succeeded (or its cached data turned out damaged),
        :class:`dfz.tasks.DigestMismatch`, or :class:`ExportError`. ``allow_link=False`` forces a copy.

        The file appears atomically (nobody sees it half-written). Like curl's output it is not synced
        to disk unless ``durable`` is set: then its data and its directory entry are, before returning.
        """
        self._ensure_intact()
        with self._lock:
            if self._meta.state is not TaskState.SUCCEEDED:
                raise TaskIncomplete(
                    f"task {self.task_id} has not finished: {len(self._meta.digests) - self._stored} pieces missing"
                )
            content = self._meta.content_digest or ""
        if digest is not None:
            self._check_digest(digest, content, target)
        target = Path(target)
        if target.is_dir():
            raise ExportError(f"cannot write {target}: it is a directory; give a file name")
        parent = target.parent
        if not parent.is_dir():
            raise ExportError(f"cannot write {target}: directory {parent} does not exist")
        tmp = parent / f".{target.name}.dfz-{secrets.token_hex(6)}.tmp"
        method = ExportMethod.LINK if allow_link else ExportMethod.COPY
        try:
            with self._io():
                if method is ExportMethod.LINK:
                    try:
                        os.link(self.data_path, tmp)
                    except OSError as e:
                        if e.errno not in _COPY_INSTEAD_OF_LINK:
                            raise
                        method = ExportMethod.COPY
                if method is ExportMethod.COPY:
                    shutil.copyfile(self.data_path, tmp)
                if durable:
                    fd = os.open(tmp, os.O_RDONLY)
                    try:
                        os.fdatasync(fd)
                    finally:
                        os.close(fd)
            os.replace(tmp, target)
            # rename(2) does nothing when both names are links to one file (a repeat export of a linked
            # task to the same place): the target is already right, and the temporary name must go.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if durable:
                _fsync_dir(parent)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise ExportError(f"cannot write {target}: {e.strerror or e}") from e
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        event(log, logging.INFO, "storage.exported", task=self.task_id, target=target, method=method)
        return method

    def _check_digest(self, digest: Digest, content_digest: str, target: str | os.PathLike[str]) -> None:
        what = f"content of task {self.task_id} (for {os.fspath(target)})"
        if digest.algorithm is DigestAlgorithm.BLAKE3:
            digest.check(content_digest, what)
            return
        hasher = digest.hasher()
        chunk = self._meta.piece_length
        length = self._meta.content_length or 0
        with self._io() as fd:
            for offset in range(0, length, chunk):
                hasher.update(self._read_at(fd, min(chunk, length - offset), offset, direct=True))
        digest.check(hasher.hexdigest(), what)

    # -- persistence --

    def flush(self) -> None:
        """Checkpoint now: write the metadata snapshot if anything changed (the data is not synced)."""
        with self._flush_lock:
            self._snapshot(force=False)

    def sync(self) -> None:
        """Make the data and the metadata durable: ``fdatasync`` the data file, then a snapshot that says
        so (``synced``). A task whose last snapshot is not synced is re-verified when next loaded."""
        with self._flush_lock:
            with self._lock:
                if self._closed or not (self._unsynced or self._dirty):
                    return
                # A piece recorded from now on sets the flag again: its bytes may miss this fdatasync.
                self._unsynced = False
            try:
                with self._io() as fd:
                    os.fdatasync(fd)
            except BaseException:
                with self._lock:
                    self._unsynced = True
                raise
            self._snapshot(force=True)

    def _snapshot(self, *, force: bool) -> None:
        """Flush lock held: write the metadata as it is now, atomically and durably."""
        with self._lock:
            if self._closed or not (self._dirty or force):
                return
            self._meta.updated_at = time.time()
            self._meta.synced = not self._unsynced
            data = msgspec.json.encode(self._meta)
            self._dirty = False
            self._pending = 0
        try:
            _write_atomic(self._dir / "meta.json", data)
        except BaseException:
            with self._lock:
                self._dirty = True
            raise

    def close(self, *, sync: bool = True) -> None:
        """Sync (unless told not to), wait for the reads and writes in progress, close the data file.

        Later calls raise :class:`TaskClosed`. Called by :class:`Storage` on delete and close.
        """
        if sync:
            with contextlib.suppress(TaskClosed):
                self.sync()
        with self._flush_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            while self._io_users or self._swapping:
                self._idle.wait()
            os.close(self._fd)
            self._storage._cache.drop(self.task_id)
            for dfd in (self._dfd, *self._retired):
                if dfd is not None:
                    os.close(dfd)


# --- the storage directory ------------------------------------------------------------------------------


class Storage:
    """The tasks stored under one directory. Thread-safe; one process at a time per directory.

    ``checkpoint_pieces`` and ``checkpoint_seconds`` bound what a crash can lose (see the module
    docstring); ``clock`` is a monotonic clock in seconds, injectable for tests; ``direct_io`` uses
    ``O_DIRECT`` to write piece data where the filesystem allows it, and ``piece_cache_bytes`` bounds the
    pieces kept in memory to serve reads (see the module docstring).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        checkpoint_pieces: int = 32,
        checkpoint_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        direct_io: bool = True,
        piece_cache_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        if piece_cache_bytes < 0:
            raise ValueError("piece_cache_bytes must not be negative")
        if checkpoint_pieces < 1 or checkpoint_seconds < 0:
            raise ValueError("checkpoint_pieces must be at least 1 and checkpoint_seconds not negative")
        self.root = Path(root)
        self.checkpoint_pieces = checkpoint_pieces
        self.checkpoint_seconds = checkpoint_seconds
        self.clock = clock
        self.direct_io = direct_io
        self._cache = _PieceCache(piece_cache_bytes)
        self._tasks_dir = self.root / "tasks"
        self._tasks_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.root / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._lock_fd)
            raise StorageLocked(
                f"storage directory {self.root} is in use by another dfz process (pid {holder}); "
                "stop it or give this one another data directory"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        self._lock = threading.Lock()
        self._open: dict[str, StoredTask] = {}
        self._closed = False

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def task_dir(self, task_id: str) -> Path:
        if not isinstance(task_id, str) or not is_task_id(task_id):
            raise InvalidTaskId(f"{task_id!r} is not a task id (64 lowercase hex digits)")
        return self._tasks_dir / task_id

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"storage {self.root} is closed")

    def _read_meta(self, task_id: str) -> _Meta | None:
        """The validated metadata of a task, None when absent or corrupt (corruption is logged)."""
        d = self.task_dir(task_id)
        try:
            with open(d / "meta.json", "rb") as f:
                raw = f.read(MAX_META_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            event(log, logging.ERROR, "storage.corrupt", task=task_id, reason=f"unreadable metadata: {e}")
            return None
        try:
            if len(raw) > MAX_META_BYTES:
                raise CorruptMetadata(f"task {task_id}: metadata larger than {MAX_META_BYTES} bytes")
            try:
                meta = _decoder.decode(raw)
            except msgspec.DecodeError as e:
                raise CorruptMetadata(f"task {task_id}: {e}") from None
            try:
                size = os.stat(d / "data").st_size
            except OSError as e:
                raise CorruptMetadata(f"task {task_id}: data file: {e.strerror}") from None
            _validate(meta, task_id, size)
        except CorruptMetadata as e:
            event(log, logging.ERROR, "storage.corrupt", task=task_id, reason=str(e))
            return None
        return meta

    def get(self, task_id: str) -> StoredTask | None:
        """The stored task, or None when it is absent (or its metadata is corrupt: then it is logged).

        Loading a task left by a crash (its snapshot not synced) or whose finished data was modified
        re-reads and checks its stored pieces first, which takes as long as hashing them."""
        self.task_dir(task_id)
        with self._lock:
            self._check_open()
            task = self._open.get(task_id)
            if task is None:
                meta = self._read_meta(task_id)
                if meta is None:
                    return None
                fd = os.open(self.task_dir(task_id) / "data", os.O_RDWR)
                task = self._open[task_id] = StoredTask(self, meta, fd)
        task._ensure_intact()
        return task

    def create(
        self,
        task_id: str,
        *,
        url: str,
        piece_length: int,
        content_length: int | None,
        hash_content: bool = True,
        tenant: str = "",
    ) -> StoredTask:
        """Start storing a task. ``piece_length`` comes from :func:`dfz.tasks.piece_length_for` (or the
        scheduler); ``content_length`` is None for a stream of unknown length; ``tenant`` is the tenant it is
        stored for (only peers of that tenant are served it). Raises :class:`TaskExists` if it is already
        stored; a corrupt or half-created one in its place is replaced."""
        d = self.task_dir(task_id)
        validate_piece_length(piece_length)
        if content_length is not None:
            PieceLayout(content_length, piece_length)  # InvalidPieceLength for a bad length or too many pieces
        with self._lock:
            self._check_open()
            if task_id in self._open or self._read_meta(task_id) is not None:
                raise TaskExists(f"task {task_id} is already stored")
            self._cache.drop(task_id)
            if d.exists():
                shutil.rmtree(d)
            d.mkdir()
            fd = os.open(d / "data", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.ftruncate(fd, content_length or 0)
                os.fsync(fd)  # the size, so that a synced snapshot and the file agree after a power loss
                now = time.time()
                count = 0 if content_length is None else PieceLayout(content_length, piece_length).count
                meta = _Meta(
                    format=META_FORMAT,
                    task_id=task_id,
                    url=url,
                    piece_length=piece_length,
                    content_length=content_length,
                    state=TaskState.RUNNING,
                    digests=[None] * count,
                    content_digest=None,
                    hash_content=hash_content,
                    data_mtime_ns=None,
                    synced=True,
                    created_at=now,
                    updated_at=now,
                    tenant=tenant,
                )
                task = StoredTask(self, meta, fd)
                task._dirty = True
                task.flush()  # an empty data file: nothing to sync
                _fsync_dir(self._tasks_dir)
            except BaseException:
                os.close(fd)
                shutil.rmtree(d, ignore_errors=True)
                raise
            self._open[task_id] = task
        event(log, logging.INFO, "storage.created", task=task_id, piece_length=piece_length, content_length=content_length)
        return task

    def get_or_create(
        self,
        task_id: str,
        *,
        url: str,
        piece_length: int,
        content_length: int | None,
        hash_content: bool = True,
        tenant: str = "",
    ) -> StoredTask:
        """The stored task if its layout fits (resuming it), else a new one. Raises
        :class:`LayoutConflict` when a stored task has another piece length or content length: the
        origin's file changed, or the scheduler disagrees; delete it first to start over."""
        while True:
            task = self.get(task_id)
            if task is None:
                try:
                    return self.create(
                        task_id,
                        url=url,
                        piece_length=piece_length,
                        content_length=content_length,
                        hash_content=hash_content,
                        tenant=tenant,
                    )
                except TaskExists:
                    continue  # another thread created it meanwhile
            if task.piece_length != piece_length:
                raise LayoutConflict(f"task {task_id} is stored with piece length {task.piece_length}, not {piece_length}")
            if content_length is not None:
                task.set_content_length(content_length)
            return task

    def list_tasks(self) -> list[TaskInfo]:
        """Every valid stored task, sorted by task id (corrupt ones are logged and left out). Tasks not
        loaded yet are described by their metadata, without the checks :meth:`get` makes."""
        with self._lock:
            self._check_open()
            open_tasks = dict(self._open)
        infos: list[TaskInfo] = []
        for d in sorted(self._tasks_dir.iterdir()):
            if not is_task_id(d.name):
                continue
            task = open_tasks.get(d.name)
            if task is not None:
                with contextlib.suppress(TaskClosed):
                    infos.append(task.info())
                continue
            meta = self._read_meta(d.name)
            if meta is not None:
                infos.append(_info_of(meta, d / "data"))
        return infos

    def delete(self, task_id: str) -> bool:
        """Remove a task (finished, running or corrupt); False if there was nothing to remove. A writer
        still using it gets :class:`TaskClosed`. Exported hard links keep their content."""
        d = self.task_dir(task_id)
        with self._lock:
            self._check_open()
            task = self._open.pop(task_id, None)
            if task is not None:
                task.close(sync=False)
            if not d.exists():
                return task is not None
            # The metadata goes first: from then on the task is absent, whatever a crash leaves behind.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d / "meta.json")
            _fsync_dir(d)
            shutil.rmtree(d)
        event(log, logging.INFO, "storage.deleted", task=task_id)
        return True

    def sync(self) -> None:
        """Sync every open task (see :meth:`StoredTask.sync`). A daemon calls it now and then, from a
        thread, so that tasks finished long ago are not re-verified after a crash."""
        with self._lock:
            tasks = list(self._open.values())
        for task in tasks:
            with contextlib.suppress(TaskClosed):
                task.sync()

    def close(self) -> None:
        """Sync and close every task and release the directory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            tasks = list(self._open.values())
            self._open.clear()
        try:
            for task in tasks:
                task.close()
        finally:
            os.close(self._lock_fd)
