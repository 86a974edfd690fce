"""Back-to-source: one interface for every origin (HTTP, S3, OCI, Hub, WebHDFS, files), found by URL scheme.

A peer that must fetch a task from its origin (normally the seed peer) asks :func:`backend_for` for the
:class:`SourceBackend` of the URL's scheme, then:

1. ``stat`` the URL: length (or ``None`` when the origin does not say), whether byte ranges work, the
   validators (ETag, Last-Modified) and the final URL after redirects;
2. with a known length and ranges: ``read_range_into`` each piece into a buffer the caller owns (so the
   piece can be hashed and ``os.pwrite``-n from that same buffer in a thread, no copy in between), several
   pieces concurrently, passing the ``stat`` result as ``expect`` so that a change of the origin mid-download
   is caught (:class:`SourceChanged`) instead of mixing two versions of a file;
3. otherwise ``stream`` the whole body once, in chunks, in order.

Rules for backends (one small module per scheme, like Dragonfly's Rust client; adding a scheme is one
module and one line in :data:`BUILTIN_BACKENDS`):

* The API is async for trio callers. Blocking client libraries run in ``trio.to_thread``; a backend must
  stop promptly when its caller is cancelled (poll ``trio.from_thread.check_cancelled``) and must not
  touch the caller's buffer after it returns or raises.
* Transient failures (5xx, connection resets, timeouts) are retried inside the backend with bounded
  exponential backoff (:class:`RetryPolicy`); what reaches the caller is final and is a
  :class:`SourceError` subclass whose message says what happened and what to do.
* Request headers given by the user are passed to the origin unchanged (a backend drops only what it
  must control itself, such as HTTP's ``Range``).
"""

from __future__ import annotations

import builtins
import importlib
import random
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import ClassVar, TypeAlias
from urllib.parse import urlsplit

import trio

__all__ = [
    "BUILTIN_BACKENDS",
    "Chunk",
    "Headers",
    "MalformedURL",
    "RetryPolicy",
    "SourceAuthError",
    "SourceBackend",
    "SourceChanged",
    "SourceEntry",
    "SourceError",
    "SourceInfo",
    "SourceNotFound",
    "SourceProtocolError",
    "SourceRangeNotSupported",
    "SourceRegistry",
    "SourceRequestError",
    "SourceTLSError",
    "SourceUnavailable",
    "UnsupportedScheme",
    "backend_for",
    "default_registry",
    "display_url",
    "scheme_of",
]

LARGE_BUFFER = 256 * 1024
"""Buffers from this size up are allocated in a worker thread, off the event loop."""

Headers: TypeAlias = Mapping[str, str]
"""Request headers passed through to the origin (names as given; values must not contain newlines)."""

Chunk: TypeAlias = bytes | bytearray
"""A piece of body handed to the caller, who owns it from then on (the backend keeps no reference)."""

# scheme -> "module:Class" of its backend, imported when the default registry is first built (so that
# importing this package loads no client library).
BUILTIN_BACKENDS: dict[str, str] = {
    "http": "dfz.peer.source.http:HTTPBackend",
    "https": "dfz.peer.source.http:HTTPBackend",
    "s3": "dfz.peer.source.s3:S3Backend",
    "file": "dfz.peer.source.file:FileBackend",
    "oci": "dfz.peer.source.oci:OCIBackend",
    "hf": "dfz.peer.source.hf:HFBackend",
    "hdfs": "dfz.peer.source.hdfs:HDFSBackend",
}


# --- what a backend reports ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What ``stat`` learnt about an origin object.

    ``url`` is the URL that finally answered, after redirects (reading it directly skips the redirect
    round trips, but a signed redirect target may expire: reading the original URL is always safe).
    ``content_length`` is ``None`` when the origin did not tell (chunked transfer): then only
    :meth:`SourceBackend.stream` can read it, and the length is known at the end.
    """

    url: str
    content_length: int | None
    supports_ranges: bool
    etag: str | None = None
    last_modified: str | None = None
    content_type: str | None = None


@dataclass(frozen=True, slots=True)
class SourceEntry:
    """One object found by :meth:`SourceBackend.list` (for recursive downloads)."""

    url: str
    content_length: int | None = None
    is_dir: bool = False


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a backend retries transient failures: at most ``attempts`` tries in all, sleeping
    ``backoff * 2**n`` seconds (capped at ``backoff_max``, with jitter down to half) between them."""

    attempts: int = 5
    backoff: float = 0.25
    backoff_max: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff < 0 or self.backoff_max < 0:
            raise ValueError(f"invalid retry policy {self}: attempts >= 1 and non-negative delays are needed")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure (1-based)."""
        base = min(self.backoff_max, self.backoff * 2.0 ** (failures - 1))
        return base * random.uniform(0.5, 1.0)


# --- errors ----------------------------------------------------------------------------------------------


class SourceError(Exception):
    """Base of every error a source backend raises. ``url`` is the URL that was asked for."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(message)
        self.url = url


class UnsupportedScheme(SourceError, ValueError):
    """No backend serves the URL's scheme (or the URL has none)."""


class MalformedURL(SourceError, ValueError):
    """The URL cannot be parsed, or lacks a part its scheme needs (such as a host)."""


class SourceNotFound(SourceError):
    """The origin says the object does not exist (HTTP 404 or 410, S3 NoSuchKey, ...)."""


class SourceAuthError(SourceError):
    """The origin refused access (HTTP 401 or 403): credentials are missing, wrong or expired."""


class SourceRequestError(SourceError):
    """The origin rejected the request for another reason (another 4xx, too many redirects).
    ``status`` is the HTTP status when there was one."""

    def __init__(self, url: str, message: str, status: int | None = None) -> None:
        super().__init__(url, message)
        self.status = status


class SourceUnavailable(SourceError):
    """The origin failed transiently (5xx, connection refused or reset, timeout) on every attempt, or a
    stream broke after part of the body was delivered (which cannot be resumed)."""


class SourceTLSError(SourceError):
    """The TLS connection failed, most often because the origin's certificate could not be verified."""


class SourceChanged(SourceError):
    """The object changed at the origin during the download (another length or ETag than ``stat`` saw).
    The pieces read so far belong to another version: the download must restart from ``stat``."""


class SourceProtocolError(SourceError):
    """The origin's answer broke HTTP's rules for what was asked (a wrong Content-Range, more or fewer
    bytes than announced)."""


class SourceRangeNotSupported(SourceProtocolError):
    """A byte range was asked for but the origin sent the whole object: read it with ``stream``."""


# --- the interface ---------------------------------------------------------------------------------------


class SourceBackend(ABC):
    """How dfz reads one family of origins (one or more URL schemes).

    Every method may raise :class:`SourceError` subclasses only (besides ``trio.Cancelled``). A backend
    instance holds its configuration and its connection pools; it is shared by all tasks of a daemon and
    safe to use from many trio tasks at once. ``close`` releases its connections.
    """

    schemes: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    async def stat(self, url: str, headers: Headers | None = None) -> SourceInfo:
        """Length, range support, validators and final URL of ``url``, without reading its body."""

    @abstractmethod
    async def read_range_into(
        self,
        url: str,
        start: int,
        buffer: bytearray | memoryview,
        headers: Headers | None = None,
        *,
        expect: SourceInfo | None = None,
    ) -> None:
        """Fill all of ``buffer`` with the object's bytes from offset ``start``.

        ``expect`` is what ``stat`` said: when given, an origin whose length or ETag now differs raises
        :class:`SourceChanged`. Transient failures are retried (resuming after the bytes already
        received). On return every byte of ``buffer`` is written; on an exception its content is
        undefined, and in both cases the backend no longer touches it.
        """

    async def read_range(
        self,
        url: str,
        start: int,
        length: int,
        headers: Headers | None = None,
        *,
        expect: SourceInfo | None = None,
    ) -> bytearray:
        """``length`` bytes from offset ``start`` in a new buffer (see :meth:`read_range_into`). A caller
        that reads many pieces does better to reuse its buffers with :meth:`read_range_into`."""
        if length < 0 or start < 0:
            raise ValueError(f"invalid range: start {start}, length {length}")
        # Zero-filling a new 4 MiB buffer (and faulting its pages in) takes about a millisecond with the
        # GIL held: not in the event loop's thread (which the piece server and the fabric share).
        buffer = bytearray(length) if length < LARGE_BUFFER else await trio.to_thread.run_sync(bytearray, length)
        if length:
            await self.read_range_into(url, start, buffer, headers, expect=expect)
        return buffer

    @abstractmethod
    def stream(
        self,
        url: str,
        headers: Headers | None = None,
        *,
        expect: SourceInfo | None = None,
    ) -> AbstractAsyncContextManager[AsyncIterator[Chunk]]:
        """The whole body in order, for origins without ranges or without a known length::

            async with backend.stream(url, headers) as chunks:
                async for chunk in chunks:
                    ...

        Failures before the first chunk are retried; a failure after it raises
        :class:`SourceUnavailable` (the caller must restart, since a stream cannot resume). Leaving the
        ``async with`` early stops the transfer.
        """

    async def list(self, url: str, headers: Headers | None = None) -> builtins.list[SourceEntry]:
        """The objects under ``url`` (a prefix or directory), for recursive downloads."""
        raise NotImplementedError(f"{type(self).__name__} cannot list {url}: its scheme has no directory listing")

    def close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing to release
        """Release connections and other resources; the backend must not be used afterwards."""


# --- the registry ----------------------------------------------------------------------------------------


def scheme_of(url: str) -> str:
    return urlsplit(url).scheme.lower()


def display_url(url: str) -> str:
    """``url`` fit for messages and logs: without user:password and without the query string, which
    often carries a signature or a token (``https://host/path?…``)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<malformed URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    return f"{parts.scheme}://{netloc}{parts.path}{'?…' if parts.query else ''}"


class SourceRegistry:
    """Backends by URL scheme. A daemon builds one from its configuration; :func:`backend_for` uses a
    default one whose backends have default settings (TLS verification on, default retries)."""

    def __init__(self, backends: Iterable[SourceBackend] = ()) -> None:
        self._by_scheme: dict[str, SourceBackend] = {}
        for backend in backends:
            self.register(backend)

    def register(self, backend: SourceBackend) -> None:
        """Serve ``backend.schemes`` with ``backend`` (replacing what served them before)."""
        if not backend.schemes:
            raise ValueError(f"{type(backend).__name__} declares no URL schemes")
        for scheme in backend.schemes:
            self._by_scheme[scheme.lower()] = backend

    @property
    def schemes(self) -> list[str]:
        return sorted(self._by_scheme)

    def backend_for(self, url: str) -> SourceBackend:
        """The backend for ``url``'s scheme; :class:`UnsupportedScheme` (which lists the supported
        schemes) when there is none."""
        try:
            scheme = scheme_of(url)
        except ValueError as e:
            raise MalformedURL(url, f"cannot download {url!r}: the URL is malformed ({e})") from None
        backend = self._by_scheme.get(scheme)
        if backend is None:
            supported = ", ".join(self.schemes)
            if not scheme:
                raise UnsupportedScheme(url, f"cannot download {url!r}: the URL has no scheme; supported schemes: {supported}")
            raise UnsupportedScheme(
                url, f"cannot download {url!r}: scheme {scheme!r} is not supported; supported schemes: {supported}"
            )
        return backend

    def close(self) -> None:
        for backend in {id(b): b for b in self._by_scheme.values()}.values():
            backend.close()

    @classmethod
    def builtin(cls) -> SourceRegistry:
        """A registry with every built-in backend in its default configuration."""
        instances: dict[str, SourceBackend] = {}
        for target in BUILTIN_BACKENDS.values():
            if target not in instances:
                module, _, name = target.partition(":")
                instances[target] = getattr(importlib.import_module(module), name)()
        return cls(instances.values())


_default: SourceRegistry | None = None


def default_registry() -> SourceRegistry:
    """The process-wide registry of built-in backends with default settings, built on first use."""
    global _default
    if _default is None:
        _default = SourceRegistry.builtin()
    return _default


def backend_for(url: str) -> SourceBackend:
    """The default backend for ``url``'s scheme (see :meth:`SourceRegistry.backend_for`)."""
    return default_registry().backend_for(url)
