"""``file://`` origins: files on this machine (or on a filesystem it mounts), read with ``os.preadv``.

The peer that goes back to the source (normally the seed peer) is the one that reads the file, so a
``file://`` URL names a path on *that* machine: on one host (``dfz up``) or on a shared mount.

* URLs: ``file:///absolute/path`` or ``file://localhost/absolute/path``, percent-decoded (``%20`` is a
  space). A relative path or another host (``file://server/share/x``: a UNC-style name this backend cannot
  reach) is a :class:`MalformedURL` that says so; so are a query string or a fragment.
* ``stat`` is ``os.stat``: the length, and a validator made of the inode, size and modification time in
  nanoseconds (as ``etag``), so that a file replaced or rewritten during the download is caught.
* ``read_range_into`` opens the file, checks it against ``expect`` (``fstat``), reads with ``os.preadv``
  straight into the caller's buffer (no copy), in steps of :data:`_STEP` between which cancellation is
  polled, and checks ``fstat`` again at the end: a file that grew, shrank or was rewritten meanwhile is
  :class:`SourceChanged`, never a piece mixing two versions.
* ``list`` walks a directory (symbolic links to directories are not followed, so a loop cannot trap it)
  and returns its regular files, sorted by path.
* Transient errors (``EIO``, ``ESTALE`` of a network filesystem, ``EINTR``, ``EAGAIN``) are retried with
  :class:`RetryPolicy`; a missing file is :class:`SourceNotFound`, a permission error
  :class:`SourceAuthError` naming the daemon's user.
"""

from __future__ import annotations

import builtins
import errno
import logging
import os
import stat as stat_mod
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from email.utils import formatdate
from typing import ClassVar, TypeVar
from urllib.parse import quote, unquote, urlsplit

import trio

from dfz.log import event, get_logger
from dfz.peer.source import (
    Chunk,
    Headers,
    MalformedURL,
    RetryPolicy,
    SourceAuthError,
    SourceBackend,
    SourceChanged,
    SourceEntry,
    SourceError,
    SourceInfo,
    SourceNotFound,
    SourceRequestError,
    SourceUnavailable,
)

__all__ = ["FileBackend", "file_url", "path_of"]

_log = get_logger("peer.source.file")
T = TypeVar("T")

_STEP = 8 * 1024 * 1024  # bytes read between two polls of cancellation
STREAM_CHUNK = 4 * 1024 * 1024
_TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.EINTR, errno.EAGAIN, errno.ETIMEDOUT})


class _Transient(Exception):
    pass


def path_of(url: str) -> str:
    """The local path a ``file://`` URL names; :class:`MalformedURL` for anything but an absolute local path."""
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise MalformedURL(url, f"cannot read {url!r}: the URL is malformed ({e})") from None
    if parts.scheme.lower() != "file":
        raise MalformedURL(url, f"cannot read {url!r} as a file: it is not a file:// URL")
    host = parts.netloc
    if host not in ("", "localhost"):
        raise MalformedURL(
            url,
            f"cannot read {url!r}: file:// URLs name files on this machine, not on host {host!r};"
            f" for an absolute path write file:///{host}{parts.path} (three slashes)",
        )
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise MalformedURL(
            url, f"cannot read {url!r}: a file:// URL has no query string or fragment (percent-encode ? as %3F and # as %23)"
        )
    path = unquote(parts.path, errors="strict") if parts.path else ""
    if not path.startswith("/"):
        raise MalformedURL(url, f"cannot read {url!r}: the path must be absolute (file:///absolute/path)")
    if "\0" in path:
        raise MalformedURL(url, f"cannot read {url!r}: the path holds a NUL character")
    return path


def file_url(path: str) -> str:
    """The ``file://`` URL of an absolute path (percent-encoded)."""
    return "file://" + quote(path)


def _validator(st: os.stat_result) -> str:
    return f'"{st.st_dev:x}-{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'


class FileBackend(SourceBackend):
    """``file://`` origins. ``retry``: attempts and backoff for transient I/O errors."""

    schemes: ClassVar[tuple[str, ...]] = ("file",)

    def __init__(self, *, retry: RetryPolicy | None = None) -> None:
        self.retry = retry or RetryPolicy()

    # --- the interface ---

    async def stat(self, url: str, headers: Headers | None = None) -> SourceInfo:
        path = path_of(url)

        def once() -> SourceInfo:
            st = self._os(url, "stat", lambda: os.stat(path))
            if stat_mod.S_ISDIR(st.st_mode):
                raise SourceRequestError(url, f"{path} is a directory: download it recursively (its files are listed with list)")
            if not stat_mod.S_ISREG(st.st_mode):
                raise SourceRequestError(url, f"{path} is not a regular file (a device, a FIFO or a socket cannot be downloaded)")
            return SourceInfo(
                url=url,
                content_length=st.st_size,
                supports_ranges=True,
                etag=_validator(st),
                last_modified=formatdate(st.st_mtime, usegmt=True),
            )

        return await self._retrying(url, "stat", lambda: trio.to_thread.run_sync(once))

    async def read_range_into(
        self,
        url: str,
        start: int,
        buffer: bytearray | memoryview,
        headers: Headers | None = None,
        *,
        expect: SourceInfo | None = None,
    ) -> None:
        path = path_of(url)
        with memoryview(buffer) as outer, outer.cast("B") as view:
            if view.readonly:
                raise ValueError("read_range_into needs a writable buffer")
            length = view.nbytes
            if start < 0:
                raise ValueError(f"invalid range start {start}")
            if length == 0:
                return
            if expect is not None and expect.content_length is not None and start + length > expect.content_length:
                raise ValueError(
                    f"bytes {start}-{start + length - 1} are past the end of the object ({expect.content_length} bytes)"
                )
            filled = 0  # kept across attempts: a retry resumes after it

            def once() -> None:
                nonlocal filled
                fd = self._os(url, "open", lambda: os.open(path, os.O_RDONLY | os.O_CLOEXEC))
                try:
                    before = os.fstat(fd)
                    self._check(url, path, before, expect)
                    while filled < length:
                        trio.from_thread.check_cancelled()
                        part = view[filled : min(length, filled + _STEP)]
                        offset = start + filled
                        n = self._os(url, "read", lambda: os.preadv(fd, [part], offset))  # noqa: B023 - called at once
                        if n == 0:
                            raise _changed(url, path, f"it ended at byte {start + filled}, before byte {start + length - 1}")
                        filled += n
                    self._check(url, path, os.fstat(fd), expect or _info_of(url, before))
                finally:
                    os.close(fd)

            await self._retrying(url, f"bytes {start}-{start + length - 1}", lambda: trio.to_thread.run_sync(once))

    @asynccontextmanager
    async def stream(
        self,
        url: str,
        headers: Headers | None = None,
        *,
        expect: SourceInfo | None = None,
    ) -> AsyncIterator[AsyncIterator[Chunk]]:
        info = expect or await self.stat(url, headers)
        total = info.content_length or 0

        async def chunks() -> AsyncIterator[Chunk]:
            offset = 0
            while offset < total:
                chunk = await self.read_range(url, offset, min(STREAM_CHUNK, total - offset), headers, expect=info)
                offset += len(chunk)
                yield chunk

        body = chunks()
        try:
            yield body
        finally:
            await body.aclose()  # type: ignore[attr-defined]

    async def list(self, url: str, headers: Headers | None = None) -> builtins.list[SourceEntry]:
        """Every regular file under the directory ``url`` names (recursively, symbolic links to directories
        not followed), sorted by path."""
        root = path_of(url)

        def walk() -> builtins.list[SourceEntry]:
            st = self._os(url, "stat", lambda: os.stat(root))
            if not stat_mod.S_ISDIR(st.st_mode):
                raise SourceRequestError(url, f"{root} is not a directory: download it as a file")
            entries: builtins.list[SourceEntry] = []
            failures: builtins.list[OSError] = []
            for directory, _dirs, files in os.walk(root, onerror=failures.append):
                trio.from_thread.check_cancelled()
                for name in files:
                    path = os.path.join(directory, name)
                    try:
                        fst = os.stat(path)
                    except FileNotFoundError:
                        continue  # removed while walking
                    except OSError as e:
                        failures.append(e)
                        continue
                    if stat_mod.S_ISREG(fst.st_mode):
                        entries.append(SourceEntry(url=file_url(path), content_length=fst.st_size))
            if failures:
                first = failures[0]
                raise _os_error(url, first.filename or root, "list", first)
            entries.sort(key=lambda entry: entry.url)
            return entries

        return await self._retrying(url, "list", lambda: trio.to_thread.run_sync(walk))

    # --- machinery ---

    @staticmethod
    def _check(url: str, path: str, st: os.stat_result, expect: SourceInfo | None) -> None:
        if expect is None:
            return
        if expect.content_length is not None and st.st_size != expect.content_length:
            raise _changed(url, path, f"its length was {expect.content_length} bytes at stat, now {st.st_size}")
        if expect.etag and _validator(st) != expect.etag:
            raise _changed(url, path, "it was rewritten or replaced (another inode or modification time)")

    @staticmethod
    def _os(url: str, what: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except OSError as e:
            if e.errno in _TRANSIENT_ERRNOS:
                raise _Transient(f"{what}: {e.strerror} ({errno.errorcode.get(e.errno or 0, e.errno)})") from e
            raise _os_error(url, e.filename or path_of(url), what, e) from None

    async def _retrying(self, url: str, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        failures = 0
        while True:
            try:
                return await attempt()
            except _Transient as e:
                failures += 1
                if failures >= self.retry.attempts:
                    raise SourceUnavailable(
                        url, f"reading {path_of(url)} ({what}) failed {failures} times, last with {e}: check the filesystem"
                    ) from e
                delay = self.retry.delay(failures)
                event(
                    _log,
                    logging.INFO,
                    "source.retry",
                    url=url,
                    what=what,
                    failures=failures,
                    reason=str(e),
                    delay=round(delay, 2),
                )
                await trio.sleep(delay)


def _info_of(url: str, st: os.stat_result) -> SourceInfo:
    return SourceInfo(url=url, content_length=st.st_size, supports_ranges=True, etag=_validator(st))


def _changed(url: str, path: str, how: str) -> SourceChanged:
    return SourceChanged(
        url, f"{path} changed during the download ({how}): the pieces read so far belong to another version; start again"
    )


def _os_error(url: str, path: str | bytes | int, what: str, e: OSError) -> SourceError:
    shown = os.fsdecode(path) if isinstance(path, str | bytes) else path_of(url)
    if isinstance(e, FileNotFoundError | NotADirectoryError):
        return SourceNotFound(url, f"{shown} does not exist ({what}: {e.strerror}): check the path")
    if isinstance(e, PermissionError):
        user = _user()
        return SourceAuthError(
            url,
            f"{shown}: permission denied ({what}): the daemon runs as {user}, which cannot read it;"
            " make the file readable by that user (the peer that goes back to the source, normally the seed, reads it)",
        )
    if e.errno == errno.EISDIR:
        return SourceRequestError(url, f"{shown} is a directory: download it recursively")
    return SourceUnavailable(url, f"{shown}: {what} failed: {e.strerror or e}")


def _user() -> str:
    uid = os.geteuid()
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name!r} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"
