"""The contract between the daemon and its local API: what a download request is, what progress a
caller sees, and the operations the daemon offers to programs on the same machine.

The daemon (``dfz/peer/daemon.py``) implements :class:`DownloadService`; the local API server
(``dfz/peer/api.py``) exposes it on an ipc (and optionally tcp) fabric socket to ``dfz get`` and other
programs. Neither side knows the other's internals; this file is all they share.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from ..tasks import DEFAULT_FILTERED_QUERY_PARAMS, DigestFormatError, digest_task_id, task_id
from .source import SourceEntry


class DownloadState(StrEnum):
    PENDING = "pending"  # registered, waiting for parents or the origin
    RUNNING = "running"  # pieces are arriving
    SUCCEEDED = "succeeded"  # every piece and the whole-file digest verified; output in place
    FAILED = "failed"  # ``Progress.error`` says why; no output file was left behind
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class DownloadRequest:
    url: str
    output: str | None
    """Absolute path of the file to produce, or None to only fill the cache (preheat, warm-up)."""
    headers: tuple[tuple[str, str], ...] = ()
    tag: str = ""
    application: str = ""
    tenant: str = ""
    filtered_query_params: tuple[str, ...] | None = None
    """None: the defaults of dfz/tasks.py; otherwise replaces them."""
    digest: str | None = None
    """``sha256:<hex>`` or ``blake3:<hex>``: the output must match or the download fails."""
    piece_length: int | None = None
    timeout: float | None = None
    """Seconds for the whole download; None for no limit."""
    back_to_source: bool = True
    """Whether this daemon may fetch from the origin itself when the scheduler says so."""
    priority_range: tuple[int, int | None] | None = None
    """Bytes this caller needs before the rest (:data:`dfz.peer.wanted.ByteRange`: ``(start, end)`` for
    ``[start, end)``, ``end`` None to the end, ``(-N, None)`` for the last N bytes), turned into pieces once
    the layout is known. The pieces of every caller's range of the task are fetched first, from parents and
    from the origin; the download still fetches the whole task for as long as a caller follows it. Set by
    the proxy port for a ``Range`` request; not on the local API's wire."""
    by_digest: bool = False
    """Name the task by :attr:`digest` (required then) instead of the URL (dfz/tasks.py,
    :func:`~dfz.tasks.digest_task_id`): the same content reached through other URLs is the same task. The
    content is checked against the digest as always. Set by the registry mirror for blobs; not on the local
    API's wire."""

    def task_id(self) -> str:
        """The task this request downloads, by the task-id rule of dfz/tasks.py. ``ValueError`` (a
        :class:`~dfz.tasks.DigestFormatError`) when :attr:`by_digest` is set without a valid digest."""
        if self.by_digest:
            if not self.digest:
                raise DigestFormatError("a download named by its digest needs the digest (sha256:<hex> or blake3:<hex>)")
            return digest_task_id(
                self.digest,
                tag=self.tag,
                application=self.application,
                tenant=self.tenant,
                piece_length=self.piece_length,
            )
        filtered = DEFAULT_FILTERED_QUERY_PARAMS if self.filtered_query_params is None else self.filtered_query_params
        return task_id(
            self.url,
            tag=self.tag,
            application=self.application,
            tenant=self.tenant,
            piece_length=self.piece_length,
            filtered_query_params=filtered,
        )


@dataclass(frozen=True, slots=True)
class Progress:
    task_id: str
    state: DownloadState
    content_length: int | None = None
    piece_count: int | None = None
    pieces_done: int = 0
    bytes_done: int = 0
    bytes_from_peers: int = 0
    bytes_from_origin: int = 0
    bytes_from_cache: int = 0
    """A local hit: the task was already complete in this daemon's cache."""
    error: str = ""
    error_kind: str = ""
    """A short machine-readable class of failure (e.g. ``origin_not_found``, ``digest_mismatch``,
    ``scheduler_unreachable``, ``timeout``, ``bad_request``) for exit codes; empty on success.

    The daemon's kinds: ``bad_request`` (URL, output path, digest or piece length unusable);
    ``origin_not_found``, ``origin_auth``, ``origin_rejected`` (another 4xx), ``origin_unavailable``
    (5xx, reset, timeouts after retries), ``origin_changed`` (length or ETag changed mid-download),
    ``origin_protocol``, ``origin_tls`` (all ``origin_*``: the origin failed); ``digest_mismatch``
    (``--digest``, or the whole file against the origin's digest); ``timeout``;
    ``scheduler_unreachable``, ``scheduler_refused``, ``scheduler_failed`` (the scheduler failed the
    download, e.g. no parent and no back-to-source allowed); ``output_error`` (cannot write the output);
    ``storage_error`` (the local cache); ``cancelled``; ``no_tenant`` (the daemon has a tenant token but no
    ticket for it: the manager refused the token, or has not answered); ``internal`` (a bug)."""


@dataclass(frozen=True, slots=True)
class CachedTask:
    task_id: str
    url: str
    content_length: int | None
    complete: bool
    pieces_done: int
    piece_count: int | None
    extra: dict[str, str] = field(default_factory=dict)


class TenantError(ValueError):
    """A request the daemon cannot scope to its tenant: ``wrong`` when it names another tenant than the
    daemon's; otherwise the daemon has no tenant ticket (yet)."""

    def __init__(self, message: str, *, wrong: bool) -> None:
        super().__init__(message)
        self.wrong = wrong


class DownloadService(Protocol):
    async def resolve(self, request: DownloadRequest) -> DownloadRequest:
        """The request as the daemon runs it: in the daemon's tenant, which alone decides the task id (a client
        never chooses it). Raises :class:`TenantError` for a request naming another tenant, or when the daemon
        does not know its tenant yet."""
        ...

    def download(self, request: DownloadRequest) -> AsyncIterator[Progress]:
        """Start (or join) the download and yield progress until a final state (SUCCEEDED, FAILED,
        CANCELLED), which is always the last item. Closing the iterator early cancels this caller's
        interest; the daemon may keep the task in its cache."""
        ...

    def list_tasks(self) -> list[CachedTask]: ...

    async def delete_task(self, task_id: str) -> bool:
        """Remove a task from the cache (and tell the scheduler); False if it was not there."""
        ...

    async def list_source(self, url: str, headers: tuple[tuple[str, str], ...]) -> list[SourceEntry]:
        """The objects below ``url`` (a directory or prefix) as the daemon's source backend for its scheme
        lists them, with the daemon's source settings (credentials, endpoints). Raises
        :class:`~dfz.peer.source.SourceError` (the origin failed or refused) or ``NotImplementedError``
        (the scheme cannot be listed)."""
        ...
