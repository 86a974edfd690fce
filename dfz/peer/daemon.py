"""The peer daemon (``dfz daemon``, ``dfz seed``): storage, piece server, scheduler link and downloads.

One :class:`Daemon` owns, for its lifetime (``run``):

* the :class:`~dfz.peer.storage.Storage` of its data directory (tasks survive restarts);
* a :class:`~dfz.peer.upload.PieceServer` that serves every stored task, finished or still arriving;
* the **scheduler links**: one :class:`dfz.broker.Client` session to each scheduler (``sched.*``, see
  ``protocol.md`` §14). On every new session it announces its host (same ``boot`` for the whole process
  and every scheduler, so a reconnect resumes the host); an announce that is not ``resumed`` makes the
  downloads registered there register again. Each task has one scheduler, by consistent hashing of its
  id over the schedulers that are up (:mod:`dfz.peer.schedring`, ``protocol.md`` §14.9): its peer
  registers there and every report about that peer goes there. A scheduler whose session is lost while
  another is up is **failed over**: its downloads register again on the next scheduler of the ring
  (keeping their pieces) and its finished tasks are announced there. Pushes from every scheduler are
  routed by peer id to the download they are about, in arrival order. Every second each scheduler hears
  the host's upload load (``sched.host_load``);
* the **downloads**: one :class:`_Download` per task, shared by every caller of :meth:`Daemon.download`
  for that task (and by a seed trigger). It registers a peer for the task and follows the scheduler:
  ``parents`` → a :class:`~dfz.peer.download.Downloader` verifying every piece against the digests the
  scheduler forwards; ``back_to_source`` → :func:`~dfz.peer.origin.fetch_from_origin`, reporting the
  task's metadata and each piece's digest; ``wait`` → wait for pushes; ``fail`` → fail with the reason.
* the **tenant** (``protocol.md`` §17.10): with a ``tenant_token`` the daemon registers with the manager
  showing it and gets a signed ticket; until then it announces nothing and starts no download. Its task ids
  are computed with the ticket's tenant (never with one a client asks for), every scheduler announce and
  every subscription to a parent carries the ticket, and its piece server serves a task stored for a tenant
  only to children whose ticket proves that tenant. A fresh ticket (the manager refreshes it on keepalives)
  is announced again to every scheduler. A token the manager refuses stops the daemon
  (:class:`TenantRefused`): it never falls back to no tenant. Without a token the daemon is in no tenant
  ("") and all of this is inert;
* the **reporters**, one per scheduler: piece reports are collected per peer and sent to the peer's
  scheduler as one ``sched.pieces`` every ``report_interval`` (or when a batch is full); any other report
  about a peer first flushes that peer's batch, so the scheduler always sees a peer's pieces before its
  ``peer_finished``.

A scheduler's ``sched.delete_task`` (a manager's ``delete_task`` job) deletes a task as the local API's
``api.delete`` does (:meth:`Daemon._delete_task`: download cancelled, serving stopped, peers left, storage
removed) and is answered with ``sched.task_deleted``.

Rules of this file:

* Every background task lives in the daemon's nursery; push callbacks are synchronous and only hand
  messages to the download they name (an unbounded inbox: the scheduler bounds what it pushes).
* An output file appears only after every piece was verified (against the scheduler's digests, or
  computed from the origin), the whole-file BLAKE3 digest was computed (and matched the scheduler's when
  it knows one) and the caller's ``--digest`` matched: :meth:`StoredTask.export` writes a temporary name
  and renames it.
* Failures a user can meet end the download with ``FAILED`` and an ``error_kind`` (see
  :mod:`dfz.peer.local`). The origin-fetching peer puts the kind at the start of the reason it reports
  (``[origin_not_found] ...``), so that peers failed by the scheduler for the same reason tell their users
  the same kind.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import signal
import socket
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from contextlib import aclosing, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import trio
import zmq

from ..broker import ClientConfig, ConnectionLost, Message, RemoteError, RequestTimeout
from ..broker.client import Client
from ..log import event, get_logger
from ..metrics import PROXY_BUCKETS, Metrics, counter, fabric_metrics, gauge, proxy_metrics
from ..metrics import serve as serve_metrics
from ..mgr.agent import ManagerAgent, host_labels, local_hostname
from ..mgr.messages import MgrListSchedulers, MgrPreheat, MgrRegister, MgrSchedulers, MgrTaskReport
from ..sched.messages import (
    MAX_AVOID,
    MAX_DIGESTS_PER_MESSAGE,
    MAX_FAILED_PER_REPORT,
    MAX_FINISHED_PER_REPORT,
    MAX_WANTED_RANGES,
    SCHED_CATALOGUE,
    FailedPiece,
    FinishedPiece,
    SchedAnnounceHost,
    SchedAnnounceTask,
    SchedBackToSource,
    SchedDeleteTask,
    SchedDigests,
    SchedErrorCode,
    SchedFail,
    SchedHostAnnounced,
    SchedHostLoad,
    SchedParent,
    SchedParents,
    SchedPeerFailed,
    SchedPeerFinished,
    SchedPeerLeft,
    SchedPeerRegistered,
    SchedPieces,
    SchedRefused,
    SchedRegisterPeer,
    SchedReschedule,
    SchedSeed,
    SchedTaskAnnounced,
    SchedTaskDeleted,
    SchedTaskInfo,
    SchedTaskMetadata,
)
from ..tasks import (
    Digest,
    DigestFormatError,
    DigestMismatch,
    InvalidPieceLength,
    PieceLayout,
    digest_task_id,
    needs_swarm,
    validate_piece_length,
)
from ..tickets import TicketError, TicketVerifier
from .config import DaemonConfig
from .download import Downloader, DownloaderConfig, FailureKind, PieceDone, PieceFailure
from .local import CachedTask, DownloadRequest, DownloadState, Progress, TenantError
from .origin import OriginError, OriginPiece, fetch_from_origin, origin_error_of
from .proxy.forward import ForwardProxy
from .proxy.intercept import CertificateAuthority
from .proxy.mirror import RegistryMirror
from .proxy.server import Exchange, ProxyListenError, ProxyServer
from .proxy.task import serve_task
from .proxy.upstream import origin_ssl_context
from .ratelimit import RateLimiter
from .schedring import SchedulerRing
from .source import SourceBackend, SourceEntry, SourceError, SourceRegistry, default_registry
from .source.hdfs import HDFSBackend, HDFSOptions
from .source.hf import HFBackend, HFOptions
from .source.http import HTTPBackend
from .source.oci import OCIBackend, OCIOptions
from .source.s3 import S3Backend, S3Options
from .storage import ExportError, LayoutConflict, Storage, StorageError, StoredTask, TaskIncomplete
from .storage import TaskState as StoredState
from .upload import PieceServer, PieceServerConfig
from .wanted import WantedPieces, check_byte_range

if TYPE_CHECKING:
    from prometheus_client import Histogram
    from prometheus_client.metrics_core import Metric

log = get_logger("peer.daemon")

_SYNC_INTERVAL = 60.0
"""Seconds between two syncs of the storage."""
_LOAD_INTERVAL = 1.0
"""Seconds between two ``sched.host_load`` pushes to each scheduler."""
_LOAD_WINDOW = 5.0
"""Seconds the upload rate of ``sched.host_load`` is measured over."""
_KIND_IN_REASON = re.compile(r"\[([a-z_]{1,40})\]")


DIGEST_WAIT = 2.0
"""Seconds a download that has every piece waits for the whole-file digest before computing it."""
_PARENT_STATS_TASKS = 4096
"""Tasks whose bytes per parent host are kept for ``api.list`` (the oldest are forgotten first)."""
_EXTRA_VALUE = 1024
"""Longest value of an ``api.list`` task's ``extra`` entry (protocol.md §16.2)."""


class TenantRefused(Exception):
    """The manager refused the daemon's tenant token (unknown, revoked, expired, or its tenant disabled): the
    daemon stops rather than run in no tenant."""


class _Failed(Exception):
    """A download ends: ``kind`` is the :attr:`Progress.error_kind`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _failed(reason: str, default_kind: str) -> _Failed:
    """The failure for a reason from the scheduler: of the kind the reason names (``[origin_not_found]
    ...``, put there by the peer that met it), else ``default_kind``; the tag is left out of the message."""
    found = _KIND_IN_REASON.search(reason)
    if found is None:
        return _Failed(default_kind, reason)
    return _Failed(found.group(1), reason[: found.start()] + reason[found.end() :].lstrip())


def _leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception that ended a download from inside a nursery: a :class:`_Failed` if there is one,
    else the first leaf that is not a cancellation (cancellations only if there is nothing else)."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        e = stack.pop(0)
        if isinstance(e, BaseExceptionGroup):
            stack.extend(e.exceptions)
        else:
            leaves.append(e)
    for wanted in (_Failed, Exception):
        for leaf in leaves:
            if isinstance(leaf, wanted):
                return leaf
    return leaves[0] if leaves else group


def _endpoint_of(parent: SchedParent) -> str:
    host = f"[{parent.ip}]" if ":" in parent.ip else parent.ip
    return f"tcp://{host}:{parent.port}"


@dataclass
class _Outcome:
    done: bool = False
    state: DownloadState = DownloadState.PENDING
    error: str = ""
    error_kind: str = ""


class _Download:
    """One task being fetched by this daemon, shared by every caller that asks for it.

    ``run`` registers a peer and follows the scheduler's assignment until every piece is stored and the
    task finished (``outcome.state`` SUCCEEDED), or fails (FAILED with a kind) or is cancelled. A
    re-announce that is not ``resumed`` (the scheduler forgot this host) cancels the current attempt and
    registers a new peer; the pieces stored so far are kept.
    """

    def __init__(
        self,
        daemon: Daemon,
        task_id: str,
        *,
        url: str,
        headers: tuple[tuple[str, str], ...],
        tag: str,
        application: str,
        piece_length: int | None,
        back_to_source: bool,
        named_digest: str | None = None,
    ) -> None:
        self.daemon = daemon
        self.task_id = task_id
        self.url = url
        self.headers = headers
        self.tag = tag
        self.application = application
        self.fixed_piece_length = piece_length
        self.back_to_source_allowed = back_to_source
        self.outcome = _Outcome()
        self.changed = trio.Event()
        self.finished = trio.Event()
        self.scope = trio.CancelScope()
        self.peer_id = ""
        self.stored: StoredTask | None = None
        # what is known of the task (from the scheduler, or from the origin)
        self.content_length: int | None = None
        self.piece_length: int | None = None
        self.digest: str | None = None
        self.digest_known = trio.Event()
        self.digests: dict[int, str] = {}
        self.parents: list[SchedParent] = []
        self.peer_of_endpoint: dict[str, str] = {}
        self.host_of_endpoint: dict[str, str] = {}
        self.tenant = daemon.tenant or ""
        """The daemon's tenant when the download started (the task id is of it; its storage records it)."""
        self.named_digest = named_digest or _digest_naming(self)
        """The content digest the task id is made of (a task named by its digest, dfz/tasks.py), when this
        peer knows it (the request said so, or the URL holds the digest that gives the id): the whole content
        is checked against it before the task is finished, so that no peer serves or keeps wrong bytes under
        the digest's name."""
        self.verified: str | None = None
        """``named_digest`` once the content matched it."""
        self.link: _SchedLink | None = None
        """The scheduler the current peer registers with (the task's on the ring, :meth:`Daemon._link_for`)."""
        self.home: _SchedLink | None = None
        """The scheduler that triggered this seed download: registered with while it is up."""
        # progress
        self.pieces_done = 0
        self.bytes_done = 0
        self.bytes_from_peers = 0
        self.bytes_from_origin = 0
        self._attempt_scope: trio.CancelScope | None = None
        self._inbox_send, self._inbox = trio.open_memory_channel[Message | str](math.inf)
        self._downloader: Downloader | None = None
        self._starting = False
        self._resumed: dict[int, str] = {}
        """Pieces stored before this peer registered, not reported yet (their digests as stored)."""
        self._ended_at_scheduler = False
        """The scheduler knows this peer ended (it failed it, or was told): no ``peer_left`` needed."""
        self.interest = 0
        """Callers of :meth:`Daemon.download` following this download."""
        self.wanted = WantedPieces()
        """The byte ranges its callers need first (``DownloadRequest.priority_range``), as pieces once the
        layout is known: the downloader and the origin fetch take them first."""
        self.pinned = False
        """Kept running with no caller (a seed trigger)."""

    # -- progress --

    def progress(self) -> Progress:
        count = None
        if self.content_length is not None and self.piece_length is not None:
            count = PieceLayout(self.content_length, self.piece_length).count
        return Progress(
            task_id=self.task_id,
            state=self.outcome.state,
            content_length=self.content_length,
            piece_count=count,
            pieces_done=self.pieces_done,
            bytes_done=self.bytes_done,
            bytes_from_peers=self.bytes_from_peers,
            bytes_from_origin=self.bytes_from_origin,
            error=self.outcome.error,
            error_kind=self.outcome.error_kind,
        )

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _piece_landed(self, size: int, *, peers: int = 0, origin: int = 0) -> None:
        self.pieces_done += 1
        self.bytes_done += size
        self.bytes_from_peers += peers
        self.bytes_from_origin += origin
        totals = self.daemon.totals
        totals.bytes_from_peers += peers
        totals.bytes_from_origin += origin
        if self.outcome.state is DownloadState.PENDING:
            self.outcome.state = DownloadState.RUNNING
        self._changed()

    # -- from the daemon --

    def deliver(self, msg: Message | str) -> None:
        if isinstance(msg, SchedTaskInfo) and msg.digest is not None and self.digest is None:
            # Also wanted after the inbox's loop has ended (every piece stored, _finish waiting for it).
            self.digest = msg.digest
            self.digest_known.set()
        self._inbox_send.send_nowait(msg)

    def relink(self) -> None:
        """The scheduler forgot this peer, or went down while another is up: register again (on the
        scheduler the ring gives the task now)."""
        if self.home is not None and not self.home.up:
            self.home = None  # the seed trigger's scheduler is gone: from now on, the ring decides
        if self._attempt_scope is not None:
            self._attempt_scope.cancel()

    def cancel(self) -> None:
        self.scope.cancel()

    # -- the download --

    async def run(self) -> None:
        daemon = self.daemon
        try:
            with self.scope:
                try:
                    await self._run()
                except BaseExceptionGroup as group:
                    raise _leaf(group) from None
                self.outcome.state = DownloadState.SUCCEEDED
            if self.scope.cancelled_caught:
                self.outcome.state = DownloadState.CANCELLED
                self.outcome.error = "the download was cancelled (its task was deleted, or the daemon stops)"
                self.outcome.error_kind = "cancelled"
        except _Failed as e:
            self.outcome.state = DownloadState.FAILED
            self.outcome.error, self.outcome.error_kind = str(e), e.kind
        except (StorageError, OSError) as e:
            self.outcome.state = DownloadState.FAILED
            self.outcome.error, self.outcome.error_kind = f"local storage failed: {e}", "storage_error"
        except Exception as e:  # a bug: the callers must hear of it, the daemon goes on
            event(log, logging.ERROR, "daemon.download_crashed", task=self.task_id, error=repr(e))
            self.outcome.state = DownloadState.FAILED
            self.outcome.error, self.outcome.error_kind = f"internal error: {e!r}", "internal"
        finally:
            if self.outcome.state is not DownloadState.SUCCEEDED and self.peer_id and not self._ended_at_scheduler:
                daemon._report(SchedPeerLeft(peer_id=self.peer_id))  # its children get other parents
            self.outcome.done = True
            daemon.totals.downloads[(self.outcome.state.value, self.outcome.error_kind or "")] += 1
            daemon._download_ended(self)
            self.finished.set()
            self._changed()
        event(
            log,
            logging.INFO,
            "daemon.download_ended",
            task=self.task_id,
            state=self.outcome.state,
            kind=self.outcome.error_kind,
            error=self.outcome.error,
        )

    async def _run(self) -> None:
        while True:
            with trio.CancelScope() as attempt:
                self._attempt_scope = attempt
                await self._attempt()
                return
            event(log, logging.INFO, "daemon.reregister", task=self.task_id, old_peer=self.peer_id)

    def _new_peer(self) -> str:
        daemon = self.daemon
        daemon._peers.pop(self.peer_id, None)
        daemon._peer_links.pop(self.peer_id, None)  # the scheduler forgot it, or it is an orphan of a dead one
        daemon._batches.pop(self.peer_id, None)
        self.peer_id = f"{daemon.host_id}.{self.task_id[:12]}.{secrets.token_hex(4)}"
        self._ended_at_scheduler = False
        daemon._peers[self.peer_id] = self
        while True:  # pushes about the previous peer are stale
            try:
                self._inbox.receive_nowait()
            except trio.WouldBlock:
                break
        return self.peer_id

    async def _register(self, peer_id: str) -> SchedPeerRegistered:
        daemon = self.daemon
        endpoint = ""
        for _ in range(5):
            # The task's scheduler now: a try that fails because it went down goes to the next on the ring.
            link = self.link = await daemon._wait_for_link(self.task_id, self.home)
            endpoint = link.endpoint
            daemon._peer_links[peer_id] = link
            welcome = link.client.welcome
            wants = welcome is not None and welcome.types.get(SchedRegisterPeer.wire_name(), 1) >= 2
            msg = SchedRegisterPeer(
                peer_id=peer_id,
                task_id=self.task_id,
                url=self.url,
                tag=self.tag,
                application=self.application,
                piece_length=self.fixed_piece_length,
                back_to_source=self.back_to_source_allowed,
                headers=list(self.headers),
                wanted=self.wanted.ranges[-MAX_WANTED_RANGES:] if wants else [],  # a 1.12 scheduler knows no `wanted`
            )
            try:
                reply = await link.client.request(msg, timeout=daemon.config.register_timeout)
                return reply.expect(SchedPeerRegistered)
            except (ConnectionLost, RequestTimeout):
                continue
            except RemoteError as e:
                if e.code == SchedErrorCode.NOT_ANNOUNCED:
                    await trio.sleep(0.1)
                    continue
                if e.code == SchedErrorCode.BAD_TICKET:  # the ticket the scheduler holds expired: show the fresh one
                    link.need_announce.set()
                    await trio.sleep(0.5)
                    continue
                raise _Failed("scheduler_refused", f"the scheduler refused the download: {e}") from None
        raise _Failed("scheduler_unreachable", f"the scheduler at {endpoint} did not answer the registration; try again")

    def _learn(
        self,
        *,
        content_length: int | None = None,
        piece_length: int | None = None,
        digest: str | None = None,
        digests: Iterable[tuple[int, str]] = (),
    ) -> None:
        if content_length is not None:
            self.content_length = content_length
        if piece_length is not None:
            self.piece_length = piece_length
        if digest is not None:
            self.digest = digest
            self.digest_known.set()
        if (layout := self._layout()) is not None:
            self.wanted.set_layout(layout)
        fresh = {k: d for k, d in digests if k not in self.digests}
        self.digests.update(fresh)
        if fresh and self._downloader is not None:
            self._downloader.add_digests(fresh)
            self._report_resumed()
        self._changed()

    def _report_resumed(self) -> None:
        """Report the pieces this peer found stored (a resumed download) once the scheduler's digest of
        each is known, naming the host's cache as their parent (``protocol.md`` §14.4)."""
        layout = self._layout()
        if not self._resumed or layout is None:
            return
        cache = f"{self.daemon.host_id}.cache"
        for piece in [k for k in self._resumed if k in self.digests]:
            digest = self._resumed.pop(piece)
            if piece < layout.count:
                size = layout.size(piece)
                self.daemon._report_piece(self.peer_id, FinishedPiece(piece=piece, digest=digest, size=size, parent=cache))

    async def _attempt(self) -> None:
        daemon = self.daemon
        # What an earlier attempt left (it was cancelled by a relink): its parents were the old peer's.
        self._downloader, self._starting, self.parents = None, False, []
        peer_id = self._new_peer()
        reply = await self._register(peer_id)
        self._learn(
            content_length=reply.content_length, piece_length=reply.piece_length, digest=reply.digest, digests=reply.digests
        )
        if reply.assignment == "failed":
            self._ended_at_scheduler = True
            raise _failed(reply.reason or "the scheduler failed the download", "scheduler_failed")
        if reply.assignment == "back_to_source":
            self.daemon.totals.back_to_source += 1
            await self._back_to_source(peer_id)
            return
        if reply.assignment == "parents":
            self._set_parents(reply.parents)
        go_to_origin = downloaded = False
        failure: _Failed | None = None
        async with trio.open_nursery() as nursery:
            while True:
                if self._tiny():
                    break
                if self._downloader is None and self._layout() is not None and self.parents and not self._starting:
                    self._starting = True
                    nursery.start_soon(self._download_from_parents, peer_id)
                msg = await self._inbox.receive()
                if isinstance(msg, str):  # "downloaded": every piece is stored
                    downloaded = True
                    break
                match msg:
                    case SchedParents():
                        self._set_parents(msg.parents)
                    case SchedDigests():
                        self._learn(digests=msg.digests)
                    case SchedTaskInfo():
                        self._learn(content_length=msg.content_length, piece_length=msg.piece_length, digest=msg.digest)
                    case SchedBackToSource():
                        go_to_origin = True
                        break
                    case SchedFail():
                        self._ended_at_scheduler = True
                        failure = _failed(msg.reason, "scheduler_failed")
                        break
                    case SchedRefused() if msg.code == SchedErrorCode.UNKNOWN_PEER:
                        self.relink()
                        await trio.sleep_forever()
                    case _:
                        pass
            nursery.cancel_scope.cancel()
        self._downloader = None
        self._starting = False
        if failure is not None:
            raise failure
        if go_to_origin:
            await self._back_to_source(peer_id)
            return
        if not downloaded:  # an empty or tiny file
            daemon._report(SchedPeerLeft(peer_id=peer_id))
            self._ended_at_scheduler = True
            await self._fetch_direct()
            return
        await self._finish(peer_id)

    def _tiny(self) -> bool:
        return self.content_length is not None and not needs_swarm(self.content_length) and self.back_to_source_allowed

    def _layout(self) -> PieceLayout | None:
        if self.content_length is None or self.piece_length is None:
            return None
        return PieceLayout(self.content_length, self.piece_length)

    def _set_parents(self, parents: list[SchedParent]) -> None:
        self.parents = list(parents)
        for p in parents:
            self.peer_of_endpoint[_endpoint_of(p)] = p.peer_id
            self.host_of_endpoint[_endpoint_of(p)] = p.host_id
        if self._downloader is not None:
            self._downloader.set_parents(_endpoint_of(p) for p in parents)

    async def _open_task(self, layout: PieceLayout) -> StoredTask:
        storage = self.daemon.storage
        try:
            # Every piece is checked against the scheduler's digests, so the whole-file digest needs no
            # second pass over the data: the one the origin's fetcher reported is adopted (see _finish).
            task = await trio.to_thread.run_sync(
                lambda: storage.get_or_create(
                    self.task_id,
                    url=self.url,
                    piece_length=layout.piece_length,
                    content_length=layout.content_length,
                    hash_content=False,
                    tenant=self.tenant,
                )
            )
        except LayoutConflict:
            await trio.to_thread.run_sync(storage.delete, self.task_id)
            task = await trio.to_thread.run_sync(
                lambda: storage.create(
                    self.task_id,
                    url=self.url,
                    piece_length=layout.piece_length,
                    content_length=layout.content_length,
                    hash_content=False,
                    tenant=self.tenant,
                )
            )
        self.stored = task
        self.daemon.piece_server.add_task(task)
        info = await trio.to_thread.run_sync(task.info)
        self.pieces_done, self.bytes_done = info.pieces_stored, info.bytes_stored
        return task

    async def _download_from_parents(self, peer_id: str) -> None:
        daemon = self.daemon
        layout = self._layout()
        assert layout is not None
        task = await self._open_task(layout)
        stored = await trio.to_thread.run_sync(task.piece_digests)
        self._resumed = {k: d for k, d in enumerate(stored) if d is not None}
        if self._resumed:
            link = self.link.endpoint if self.link is not None else ""
            event(log, logging.INFO, "daemon.resumed", task=self.task_id, peer=peer_id, pieces=len(self._resumed), scheduler=link)

        def on_piece(done: PieceDone) -> None:
            daemon.piece_server.announce(self.task_id, done.piece)
            if daemon.piece_seconds is not None:
                daemon.piece_seconds.observe(done.cost)
            daemon._report_piece(
                peer_id,
                FinishedPiece(
                    piece=done.piece,
                    digest=done.digest,
                    size=done.size,
                    cost_ms=min(int(done.cost * 1000), 0xFFFF_FFFF),
                    parent=self.peer_of_endpoint.get(done.parent),
                ),
            )
            daemon._count_from(self.task_id, self.host_of_endpoint.get(done.parent, done.parent), done.size)
            self._piece_landed(done.size, peers=done.size)

        def on_failed(failure: PieceFailure) -> None:
            parent = self.peer_of_endpoint.get(failure.parent)
            if failure.kind is FailureKind.BAD and parent is not None:
                daemon._report_failed(peer_id, FailedPiece(piece=failure.piece, parent=parent, reason=failure.reason[:256]))

        def on_parent_lost(endpoint: str, reason: str) -> None:
            dl = self._downloader
            if dl is not None and not dl.parents and not dl.done:
                avoid = [self.peer_of_endpoint[e] for e in dl.blocked if e in self.peer_of_endpoint]
                daemon._report(SchedReschedule(peer_id=peer_id, avoid=avoid[:MAX_AVOID]))

        downloader = Downloader(
            task,
            layout,
            digests={k: d for k, d in self.digests.items() if k < layout.count},
            parents=[_endpoint_of(p) for p in self.parents],
            config=daemon.downloader_config,
            on_piece=on_piece,
            on_piece_failed=on_failed,
            on_parent_lost=on_parent_lost,
            limiter=daemon.download_limiter,
            name=f"dfz-daemon-{daemon.host_id}",
            ctx=daemon.ctx,
            ticket=daemon.current_ticket,
        )
        self._downloader = downloader
        self._report_resumed()
        unwatch = self.wanted.watch(downloader.set_wanted)
        try:
            await downloader.run()
        finally:
            unwatch()
        self.deliver("downloaded")

    async def _finish(self, peer_id: str) -> None:
        """Every piece is stored: compute the whole-file digest (it must match the scheduler's, when it
        knows one), report success, and tell the children this parent has everything."""
        task = self.stored
        assert task is not None
        if self.digest is None and not task.hashes_content:
            # The last piece may come a moment before the whole-file digest its fetcher reports; without
            # it, finish() computes the digest from the data (one pass).
            with trio.move_on_after(DIGEST_WAIT):
                await self.digest_known.wait()
        try:
            await self._check_named_digest(task)
            info = await trio.to_thread.run_sync(lambda: task.finish(content_digest=self.digest))
        except DigestMismatch as e:
            self.daemon._report(SchedPeerFailed(peer_id=peer_id, reason=f"[digest_mismatch] {e}"[:4096]))
            self._ended_at_scheduler = True
            await trio.to_thread.run_sync(self.daemon.storage.delete, self.task_id)
            raise _Failed("digest_mismatch", f"the downloaded file does not match the origin's digest: {e}") from None
        assert info.content_length is not None and info.content_digest is not None
        self.daemon._report(SchedPeerFinished(peer_id=peer_id, content_length=info.content_length, digest=info.content_digest))
        link = self.daemon._peer_links.get(peer_id)
        if link is not None:
            self.daemon._served.setdefault(self.task_id, {})[link] = peer_id
        self.daemon.piece_server.task_finished(self.task_id)

    async def _back_to_source(self, peer_id: str) -> None:
        daemon = self.daemon
        stored = await trio.to_thread.run_sync(daemon.storage.get, self.task_id)
        if stored is not None and stored.state is StoredState.SUCCEEDED:
            await self._report_stored(peer_id, stored)
            return
        report = daemon._report

        def on_task(task: StoredTask) -> None:
            self.stored = task
            daemon.piece_server.add_task(task)

        def on_metadata(piece_length: int, content_length: int | None) -> None:
            report(SchedTaskMetadata(peer_id=peer_id, piece_length=piece_length, content_length=content_length))
            self._learn(content_length=content_length, piece_length=piece_length)

        def on_piece(piece: OriginPiece) -> None:
            daemon.piece_server.announce(self.task_id, piece.index)
            daemon._report_piece(
                peer_id,
                FinishedPiece(piece=piece.index, digest=piece.digest, size=piece.size, cost_ms=int(piece.cost * 1000)),
            )
            self._piece_landed(piece.size, origin=piece.size if piece.fetched else 0)
            if piece.fetched:
                daemon._count_from(self.task_id, "origin", piece.size)

        try:
            backend = daemon.sources.backend_for(self.url)
            self.pieces_done = self.bytes_done = 0
            await fetch_from_origin(
                backend,
                self.url,
                dict(self.headers),
                storage=daemon.storage,
                task_id=self.task_id,
                fixed_piece_length=self.fixed_piece_length,
                concurrency=daemon.config.origin_concurrency,
                on_task=on_task,
                on_metadata=on_metadata,
                on_piece=on_piece,
                tenant=self.tenant,
                wanted=self.wanted,
            )
        except (OriginError, SourceError) as e:
            err = e if isinstance(e, OriginError) else origin_error_of(e)
            report(SchedPeerFailed(peer_id=peer_id, reason=f"[{err.kind}] {err}"[:4096], origin_error=err.origin_error))
            self._ended_at_scheduler = True
            raise _Failed(err.kind, str(err)) from None
        await self._finish(peer_id)

    async def _report_stored(self, peer_id: str, task: StoredTask) -> None:
        """Sent to the origin for a task this daemon has whole already (a restarted seed): report it from
        the storage, without touching the origin."""
        daemon = self.daemon
        self.stored = task
        daemon.piece_server.add_task(task)
        layout = task.layout()
        assert layout is not None
        daemon._report(SchedTaskMetadata(peer_id=peer_id, piece_length=task.piece_length, content_length=layout.content_length))
        self._learn(content_length=layout.content_length, piece_length=task.piece_length)
        for index, digest in enumerate(task.piece_digests()):
            assert digest is not None
            daemon._report_piece(peer_id, FinishedPiece(piece=index, digest=digest, size=layout.size(index)))
            self._piece_landed(layout.size(index))
        await self._finish(peer_id)

    async def _fetch_direct(self) -> None:
        """An empty or tiny file: no swarm, straight from the origin (nothing to report)."""
        daemon = self.daemon
        self.pieces_done = self.bytes_done = 0

        def on_piece(piece: OriginPiece) -> None:
            self._piece_landed(piece.size, origin=piece.size if piece.fetched else 0)

        try:
            task = await fetch_from_origin(
                daemon.sources.backend_for(self.url),
                self.url,
                dict(self.headers),
                storage=daemon.storage,
                task_id=self.task_id,
                fixed_piece_length=self.fixed_piece_length,
                concurrency=1,
                on_task=lambda t: None,
                on_metadata=lambda pl, cl: self._learn(content_length=cl, piece_length=pl),
                on_piece=on_piece,
                tenant=self.tenant,
            )
        except SourceError as e:
            err = origin_error_of(e)
            raise _Failed(err.kind, str(err)) from None
        except OriginError as e:
            raise _Failed(e.kind, str(e)) from None
        self.stored = task
        try:
            await self._check_named_digest(task)
        except DigestMismatch as e:
            await trio.to_thread.run_sync(self.daemon.storage.delete, self.task_id)
            raise _Failed("digest_mismatch", f"the downloaded file does not match the origin's digest: {e}") from None
        await trio.to_thread.run_sync(task.finish)

    async def _check_named_digest(self, task: StoredTask) -> None:
        """For a task named by its digest: the stored content (every piece stored) must match it, else
        :class:`DigestMismatch`. One pass over the data, in a worker thread."""
        if self.named_digest is None:
            return
        expected = Digest.parse(self.named_digest)

        def check() -> None:
            h = expected.hasher()
            for i in range(len(task.piece_digests())):
                h.update(task.read_piece(i))
            expected.check(h.hexdigest(), f"task {self.task_id} (named by {expected})")

        await trio.to_thread.run_sync(check)
        self.verified = str(expected)


_URL_DIGEST = re.compile(r"/blobs/(sha256:[0-9a-f]{64})(?:[?#]|$)")


def _digest_naming(download: _Download) -> str | None:
    """The digest a task is named by, when its URL holds a registry blob's digest (``.../blobs/sha256:HEX``)
    whose digest task id (:func:`dfz.tasks.digest_task_id`) is the task's id: how a seed peer, triggered
    with only the task id and the URL, knows to check the content against it."""
    match = _URL_DIGEST.search(download.url)
    if match is None:
        return None
    try:
        named = digest_task_id(
            match[1],
            tag=download.tag,
            application=download.application,
            tenant=download.tenant,
            piece_length=download.fixed_piece_length,
        )
    except (DigestFormatError, InvalidPieceLength):
        return None
    return match[1] if named == download.task_id else None


class _UploadMeter:
    """The upload rate over the last :data:`_LOAD_WINDOW` seconds, from samples of the piece server's
    counter of bytes served."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()

    def rate(self, now: float, total: int) -> int:
        """Bytes/s between the oldest sample still in the window and this one (``now``, ``total``)."""
        samples = self._samples
        samples.append((now, total))
        while len(samples) > 2 and now - samples[1][0] >= _LOAD_WINDOW:
            samples.popleft()
        then, before = samples[0]
        return 0 if now <= then else max(0, round((total - before) / (now - then)))


class _SchedLink:
    """The daemon's session with one scheduler: its fabric client, whether this host is announced on it
    (``announced`` is replaced by a new, unset event when the session is lost), and the reports waiting
    for it, sent in order by the link's reporter."""

    def __init__(self, endpoint: str, client: Client) -> None:
        self.endpoint = endpoint
        self.client = client
        self.scope = trio.CancelScope()
        """Around the link's tasks: cancelled when the manager no longer lists this scheduler."""
        self.announced = trio.Event()
        self.need_announce = trio.Event()
        self.outbox: deque[Message] = deque()
        self.wake = trio.Event()
        self.orphans: set[str] = set()
        """Peers left registered here when the daemon moved their tasks to another scheduler (this one was
        down): if it comes back with this host ``resumed``, they are told ``sched.peer_left``."""

    @property
    def up(self) -> bool:
        return self.announced.is_set()

    def __repr__(self) -> str:
        return f"<scheduler {self.endpoint} {'up' if self.up else 'down'}>"


@dataclass
class DaemonTotals:
    """What the daemon did since it started, for its metrics."""

    bytes_from_peers: int = 0
    bytes_from_origin: int = 0
    downloads: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Downloads ended, by (state, error kind)."""
    back_to_source: int = 0


def source_registry(config: DaemonConfig) -> SourceRegistry:
    """The source backends for ``config``: the built-in ones, with the ``http_*`` (TLS: every HTTP-based
    backend shares that client), ``s3_*``, ``oci_*``, ``hf_*`` and ``hdfs_*`` settings."""
    configured: list[SourceBackend] = []
    http: HTTPBackend | None = None
    if config.http_ca_bundle or config.http_insecure:
        http = HTTPBackend(ca_bundle=config.http_ca_bundle or None, insecure=config.http_insecure)
        configured.append(http)
    if (s3 := config.s3_options()) != S3Options():
        configured.append(S3Backend(s3))
    if (oci := config.oci_options()) != OCIOptions() or http is not None:
        configured.append(OCIBackend(oci, http=http))
    if (hf := config.hf_options()) != HFOptions() or http is not None:
        configured.append(HFBackend(hf, http=http))
    if (hdfs := config.hdfs_options()) != HDFSOptions() or http is not None:
        configured.append(HDFSBackend(hdfs, http=http))
    if not configured:
        return default_registry()
    registry = SourceRegistry.builtin()
    for backend in configured:
        registry.register(backend)
    return registry


class Daemon:
    """The peer daemon. ``await nursery.start(Daemon(config).run)`` returns it once its piece server
    listens and its scheduler clients run (no scheduler may be reachable yet: downloads wait for one
    up to ``scheduler_wait``); cancel to stop (the schedulers hear ``bye`` and forget this host).

    Implements :class:`dfz.peer.local.DownloadService`. ``sources`` replaces the default source
    backends (tests pass one with fast retries); ``downloader_config`` and ``piece_server_config`` tune
    the piece protocol (the daemon sets their rate limits and upload slots from ``config``).
    """

    def __init__(
        self,
        config: DaemonConfig,
        *,
        sources: SourceRegistry | None = None,
        downloader_config: DownloaderConfig | None = None,
        piece_server_config: PieceServerConfig | None = None,
        ctx: zmq.Context[Any] | None = None,
    ) -> None:
        self.config = config
        self.sources = sources or source_registry(config)
        self.downloader_config = downloader_config or DownloaderConfig()
        self.piece_server_config = replace(
            piece_server_config or PieceServerConfig(),
            upload_slots=config.upload_slots,
            rate_limit=config.upload_rate_limit,
        )
        self.tickets = TicketVerifier()
        """The manager keys tenant tickets are checked with (its own, and its children's, by its piece server)."""
        self.ticket = b""
        """This host's tenant ticket from the manager; empty without a tenant token."""
        self.tenant: str | None = None if config.tenant_token else ""
        """This daemon's tenant: "" for none; None while a tenant token waits for its first ticket."""
        self.ticket_expires = 0.0
        self._tenant_known = trio.Event()
        if not config.tenant_token:
            self._tenant_known.set()
        self._refused = trio.Event()
        self._refused_reason = ""
        self._from_hosts: OrderedDict[str, Counter[str]] = OrderedDict()
        """Task id -> verified bytes received per parent host id (and ``origin``), for ``api.list``."""
        self.ctx = ctx
        self.boot = secrets.token_hex(8)
        self.host_id = config.host_id
        self.download_limiter = RateLimiter(config.download_rate_limit)
        endpoints = config.scheduler_endpoints
        self.ring: SchedulerRing | None = SchedulerRing(endpoints) if endpoints else None
        """The schedulers' hash ring; None while the manager has given none (``config.from_manager``)."""
        self.manager: ManagerAgent | None = None
        """The link to the manager when ``config.manager`` is set."""
        self.settings: dict[str, int] = {}
        """The dynamic settings in force that came from the manager (:meth:`apply_settings`)."""
        self._storage: Storage | None = None
        self._piece_server: PieceServer | None = None
        self._links: dict[str, _SchedLink] = {}
        self._links_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._downloads: dict[str, _Download] = {}
        self.totals = DaemonTotals()
        self.metrics: Metrics | None = None
        """The Prometheus metrics, when ``metrics_listen`` is set; ``metrics_url`` where they are served."""
        self.metrics_url = ""
        self.proxy: ProxyServer | None = None
        """The proxy port (registry mirror), when ``proxy_listen`` is set; ``proxy_url`` where it listens."""
        self.proxy_url = ""
        self.piece_seconds: Histogram | None = None
        self.proxy_seconds: Histogram | None = None
        if config.metrics_listen:
            self.metrics = Metrics("daemon")
            self.metrics.collector(self._collect_metrics)
            self.piece_seconds = self.metrics.histogram(
                "piece_fetch_seconds", "Time from asking a parent for a piece to having it verified and stored."
            )
            if config.proxy_listen:
                self.proxy_seconds = self.metrics.histogram(
                    "proxy_request_seconds",
                    "Time from a proxy request's head to its response's end (a CONNECT: to its 200), by route.",
                    ["route"],
                    buckets=PROXY_BUCKETS,
                )
        self._peers: dict[str, _Download] = {}
        self._peer_links: dict[str, _SchedLink] = {}
        """Peer id -> the scheduler it is registered with (until it leaves, fails, or that scheduler
        forgets it): where every report about it goes."""
        self._served: dict[str, dict[_SchedLink, str]] = {}
        """Task id -> the finished peer that serves it, per scheduler it is known to."""
        self._batches: dict[str, tuple[list[FinishedPiece], list[FailedPiece]]] = {}
        self._cache_wake = trio.Event()
        self._preheats: set[tuple[int, int]] = set()
        """The manager's preheat tasks (job id, task number) being worked on."""
        self.ip = ""
        self.port = 0

    # -- parts, once running --

    @property
    def storage(self) -> Storage:
        assert self._storage is not None, "the daemon is not running"
        return self._storage

    @property
    def piece_server(self) -> PieceServer:
        assert self._piece_server is not None, "the daemon is not running"
        return self._piece_server

    @property
    def piece_endpoints(self) -> list[str]:
        """Where the piece server listens (``tcp://...:0`` resolved to its port)."""
        return self.piece_server.endpoints

    @property
    def scheduler_connected(self) -> bool:
        """This host is announced to at least one scheduler."""
        return any(link.up for link in self._links.values())

    @property
    def schedulers_up(self) -> list[str]:
        """The schedulers this host is announced to now."""
        return [link.endpoint for link in self._links.values() if link.up]

    # -- lifetime --

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        data_dir = Path(cfg.data_dir)
        open_storage = functools.partial(
            Storage, data_dir, direct_io=self.config.direct_io, piece_cache_bytes=self.config.piece_cache_bytes
        )
        self._storage = await trio.to_thread.run_sync(open_storage)
        try:
            if not self.host_id:
                self.host_id = await trio.to_thread.run_sync(_host_id, data_dir)
            self._piece_server = PieceServer(
                self._storage,
                cfg.listen,
                config=self.piece_server_config,
                name=f"dfz-pieces-{self.host_id}",
                ctx=self.ctx,
                tickets=self.tickets,
            )
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self._piece_server.run)
                self.ip, self.port = _advertised(cfg, self._piece_server.endpoints)
                for endpoint in cfg.scheduler_endpoints:
                    await self._open_link(nursery, endpoint)
                if cfg.manager:
                    self.manager = await nursery.start(self._manager_agent().run)
                if self.metrics is not None:
                    self.metrics_url = await nursery.start(serve_metrics, self.metrics, cfg.metrics_listen)
                if cfg.proxy_listen:
                    self.proxy = await nursery.start(self._proxy_server().run)
                    self.proxy_url = self.proxy.url
                nursery.start_soon(self._tenant_guard)
                nursery.start_soon(self._cache_announcer)
                nursery.start_soon(self._load_reporter)
                nursery.start_soon(self._syncer)
                event(
                    log,
                    logging.INFO,
                    "daemon.started",
                    host=self.host_id,
                    seed=cfg.seed,
                    pieces=",".join(self._piece_server.endpoints),
                    scheduler=",".join(cfg.scheduler_endpoints) or f"from the manager at {cfg.manager}",
                )
                task_status.started(self)
        finally:
            self._nursery = None
            self._storage.close()

    def _proxy_server(self) -> ProxyServer:
        """The proxy port: the registry mirror on ``/v2/...`` (pass-through requests go by the ``http``
        backend, with this daemon's TLS settings); the forward proxy for absolute-form requests and CONNECT
        (:mod:`dfz.peer.proxy.forward`: the ``proxy_*`` rules, P2P through :func:`serve_task`)."""
        http = self.sources.backend_for("http://proxy")
        if not isinstance(http, HTTPBackend):  # a test's stand-in for the http scheme
            http = HTTPBackend(ca_bundle=self.config.http_ca_bundle or None, insecure=self.config.http_insecure)
        mirror = RegistryMirror(
            self,
            self.storage,
            http,
            default_upstream=self.config.mirror_upstream,
            plain_http=self.config.oci_plain_http,
        )
        ca = CertificateAuthority.load(cfg.proxy_ca_cert, cfg.proxy_ca_key) if (cfg := self.config).proxy_ca_cert else None

        async def from_task(exchange: Exchange, request: DownloadRequest) -> None:
            await serve_task(exchange, self, self.storage, request)

        forward = ForwardProxy(
            cfg.proxy_policy(),
            tasks=from_task,
            origin_tls=origin_ssl_context(cfg.http_ca_bundle, cfg.http_insecure),
            ca=ca,
        )
        observe: Callable[[str, float], None] | None = None
        if (histogram := self.proxy_seconds) is not None:

            def observe(route: str, seconds: float) -> None:
                histogram.labels(route).observe(seconds)

        server = ProxyServer(cfg.proxy_listen, mirror=mirror, forward=forward.forward, connect=forward.connect, observe=observe)
        forward.serve_stream = server.serve_stream
        return server

    def _collect_metrics(self) -> Iterable[Metric]:
        totals, server = self.totals, self.piece_server.stats
        yield from fabric_metrics(self.piece_server.server.stats, len(self.piece_server.server.peers))
        yield counter("download_bytes", "Bytes downloaded, by source.",
                      {("peer",): totals.bytes_from_peers, ("origin",): totals.bytes_from_origin}, ["source"])  # fmt: skip
        yield counter("upload_bytes", "Bytes served to children.", server.bytes_served)
        yield counter("upload_pieces", "Pieces served to children.", server.pieces_served)
        yield gauge("upload_requests_in_flight", "Piece requests being served now.", server.serving)
        yield gauge("upload_children", "Children holding an upload slot now.", self.piece_server.children)
        errors = {(code,): n for code, n in server.errors.items()} or {("none",): 0}
        yield counter("upload_errors", "Piece requests refused, by error code.", errors, ["code"])
        yield counter("upload_refused_no_slot", "Subscriptions refused for want of a free upload slot.", server.refused_no_slot)
        yield gauge("downloads_active", "Downloads running now.", len(self._downloads))
        ended = {key: n for key, n in totals.downloads.items()} or {("succeeded", ""): 0}
        yield counter("downloads_ended", "Downloads ended, by state and error kind.", ended, ["state", "kind"])
        yield counter("back_to_source", "Downloads the scheduler sent to the origin.", totals.back_to_source)
        if self.proxy is not None:
            yield from proxy_metrics(self.proxy.stats)

    async def _open_link(self, nursery: trio.Nursery, endpoint: str) -> None:
        """Start the session with one scheduler: its client, announcer and reporter."""
        link: _SchedLink

        def on_state(state: str) -> None:
            self._on_sched_state(link, state)

        client = Client(
            SCHED_CATALOGUE,
            endpoint,
            name=f"dfz-{'seed' if self.config.seed else 'daemon'}-{self.host_id}",
            config=ClientConfig(heartbeat=self.config.heartbeat, timeout=self.config.register_timeout),
            ctx=self.ctx,
            on_state=on_state,
        )
        link = self._links[endpoint] = _SchedLink(endpoint, client)
        self._install_push_handlers(link)
        await nursery.start(self._run_link, link)

    async def _run_link(self, link: _SchedLink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with link.scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(link.client.run)
                nursery.start_soon(self._announcer, link)
                nursery.start_soon(self._reporter, link)
                task_status.started()

    # -- the manager --

    def _manager_agent(self) -> ManagerAgent:
        """The link to the manager: a seed peer registers as a seed peer, a daemon as a host (both keep
        alive); a daemon without configured schedulers asks for them; both take the ``daemon`` settings
        (:meth:`apply_settings`)."""
        cfg = self.config
        os_name, distro, arch = host_labels()

        def registration() -> MgrRegister:
            if not cfg.seed:
                return MgrRegister(
                    kind="host",
                    host_id=self.host_id,
                    hostname=local_hostname(),
                    ip=self.ip,
                    port=self.port,
                    download_port=self.port,
                    idc=cfg.idc,
                    location=cfg.location,
                    os=os_name,
                    platform=distro,
                    arch=arch,
                    tenant_token=cfg.tenant_token,
                )
            return MgrRegister(
                kind="seed_peer",
                hostname=local_hostname(),
                ip=self.ip,
                port=self.port,
                download_port=self.port,
                cluster=cfg.cluster,
                idc=cfg.idc,
                location=cfg.location,
                host_id=self.host_id if cfg.tenant_token else "",
                tenant_token=cfg.tenant_token,
            )

        def lookup() -> MgrListSchedulers:
            return MgrListSchedulers(
                host_id=self.host_id, hostname=socket.gethostname()[:255], ip=self.ip, idc=cfg.idc, location=cfg.location
            )

        async def on_schedulers(reply: MgrSchedulers) -> None:
            endpoints = []
            for s in reply.schedulers:  # made here from the address and port, never taken as given
                try:
                    ip = str(ipaddress.ip_address(s.ip))
                except ValueError:
                    event(log, logging.WARNING, "daemon.bad_scheduler", ip=s.ip, port=s.port)
                    continue
                if s.port > 0:
                    endpoints.append(f"tcp://[{ip}]:{s.port}" if ":" in ip else f"tcp://{ip}:{s.port}")
            await self.set_schedulers(endpoints)

        def on_config(target: str, settings: dict[str, Any]) -> None:
            if target == "daemon":
                self.apply_settings(settings)

        return ManagerAgent(
            cfg.manager,
            name=f"dfz-{'seed' if cfg.seed else 'daemon'}-{self.host_id}",
            on_config=on_config,
            registration=registration,
            lookup=lookup if cfg.from_manager else None,
            on_schedulers=on_schedulers if cfg.from_manager else None,
            on_preheat=self._on_preheat,
            on_ticket=self._on_ticket,
            on_token_refused=self._on_token_refused,
            heartbeat=cfg.heartbeat,
            ctx=self.ctx,
        )

    # -- the tenant --

    def current_ticket(self) -> tuple[bytes, str]:
        """This host's tenant ticket and host id, as subscriptions to parents show them."""
        return self.ticket, self.host_id

    def _on_ticket(self, ticket: bytes, key: bytes) -> None:
        """The manager's key and, with a tenant token, this host's (fresh) ticket."""
        if key:
            try:
                self.tickets.trust(key)
            except ValueError as e:
                event(log, logging.WARNING, "daemon.ticket_key_refused", error=str(e))
        if not ticket:
            return
        if not self.config.tenant_token:
            event(log, logging.WARNING, "daemon.ticket_unasked", manager=self.config.manager)
            return
        try:
            got = self.tickets.verify(ticket, now=time.time(), host_id=self.host_id)
        except TicketError as e:  # the manager's own ticket does not verify: keep what we have, say it loudly
            event(log, logging.ERROR, "daemon.ticket_bad", kind=e.kind, error=e.reason)
            return
        if self.tenant is not None and self.tenant != got.tenant:
            self._on_token_refused(f"the manager moved this host from tenant {self.tenant!r} to {got.tenant!r}")
            return
        first = self.tenant is None
        self.ticket, self.tenant, self.ticket_expires = ticket, got.tenant, float(got.expires_at)
        event(
            log,
            logging.INFO,
            "daemon.ticket",
            tenant=got.tenant,
            tenant_name=got.tenant_name,
            expires_in=round(got.expires_at - time.time()),
            first=first,
        )
        self._tenant_known.set()
        if not first:
            for link in self._links.values():
                if link.up:
                    link.need_announce.set()  # the schedulers hold the ticket's expiry: show them the fresh one

    def _on_token_refused(self, reason: str) -> None:
        if self._refused.is_set():
            return
        self._refused_reason = reason
        event(log, logging.ERROR, "daemon.tenant_refused", manager=self.config.manager, error=reason)
        self._refused.set()

    async def _tenant_guard(self) -> None:
        """Stop the daemon when the manager refuses its tenant token (see :class:`TenantRefused`)."""
        await self._refused.wait()
        raise TenantRefused(
            f"the manager at {self.config.manager} refused this daemon's tenant token: {self._refused_reason}; "
            "the daemon stops rather than run in no tenant (ask for a new token: /api/v1/daemon-tokens)"
        )

    async def resolve(self, request: DownloadRequest) -> DownloadRequest:
        """See :meth:`dfz.peer.local.DownloadService.resolve`: the daemon's tenant, waited for up to
        ``scheduler_wait`` while a tenant token has no ticket yet."""
        if self.tenant is None:
            with trio.move_on_after(self.config.scheduler_wait):
                await self._tenant_known.wait()
        tenant = self.tenant
        if tenant is None:
            why = self._refused_reason or f"no answer from the manager at {self.config.manager} yet"
            raise TenantError(f"this daemon has a tenant token but no tenant ticket ({why})", wrong=False)
        if request.tenant and request.tenant != tenant:
            raise TenantError(
                f"tenant {request.tenant!r}: this daemon is in tenant {tenant or '(none)'!r}, and a download is always in "
                "the daemon's tenant (leave tenant empty)",
                wrong=True,
            )
        return request if request.tenant == tenant else replace(request, tenant=tenant)

    def _count_from(self, task_id: str, source: str, nbytes: int) -> None:
        counts = self._from_hosts.get(task_id)
        if counts is None:
            counts = self._from_hosts[task_id] = Counter()
            while len(self._from_hosts) > _PARENT_STATS_TASKS:
                self._from_hosts.popitem(last=False)
        counts[source] += nbytes

    def _on_preheat(self, msg: MgrPreheat) -> None:
        """The manager's ``mgr.preheat`` (a preheat job's task): download the URL into the cache, reporting
        to the manager. With a ``digest`` (an image's blob), the task is the one named by the digest in this
        daemon's tenant, the registry mirror's task for the blob, and the content is checked against it. A
        task already being worked on is not started twice (a restarted manager sends it again): its next
        report reaches the new session."""
        key = (msg.job_id, msg.task)
        if self._nursery is None or key in self._preheats:
            return
        self._preheats.add(key)
        self._nursery.start_soon(self._preheat, msg)

    async def _preheat(self, msg: MgrPreheat) -> None:
        request = DownloadRequest(
            url=msg.url,
            output=None,
            headers=tuple(msg.headers.items()),
            tag=msg.tag,
            application=msg.application,
            filtered_query_params=None if msg.filtered_query_params is None else tuple(msg.filtered_query_params),
            piece_length=msg.piece_length or None,
            timeout=msg.timeout_ms / 1000 if msg.timeout_ms else None,
            digest=msg.digest or None,
            by_digest=bool(msg.digest),
        )
        event(log, logging.INFO, "daemon.preheat", job=msg.job_id, task=msg.task, url=msg.url, digest=msg.digest or "-")

        def report(p: Progress, state: Any) -> MgrTaskReport:
            return MgrTaskReport(
                job_id=msg.job_id,
                task=msg.task,
                state=state,
                task_id=p.task_id,
                content_length=-1 if p.content_length is None else p.content_length,
                bytes_done=p.bytes_done,
                bytes_from_origin=p.bytes_from_origin,
                bytes_from_peers=p.bytes_from_peers,
                error=p.error[:1024],
                error_kind=p.error_kind[:64],
            )

        try:
            last: Progress | None = None
            sent = -math.inf
            async with aclosing(cast("AsyncGenerator[Progress, None]", self.download(request))) as progress:
                async for p in progress:
                    last = p
                    manager = self.manager
                    live = p.state in (DownloadState.PENDING, DownloadState.RUNNING)
                    if live and manager is not None and trio.current_time() - sent >= 1.0:
                        sent = trio.current_time()
                        if not await manager.report(report(p, "running")):
                            return  # the manager no longer wants it: leaving stops the download
            if last is None:
                last = Progress(task_id="", state=DownloadState.FAILED, error="no progress", error_kind="internal")
            state = "succeeded" if last.state is DownloadState.SUCCEEDED else "failed"
            if state == "failed" and not last.error:
                last = replace(last, error=f"the download ended {last.state.value}")
            event(log, logging.INFO, "daemon.preheat_done", job=msg.job_id, task=msg.task, state=state, error=last.error or "-")
            # The manager may be restarting: the final report is tried until a session takes it.
            while self.manager is not None:
                if self.manager.connected:
                    await self.manager.report(report(last, state))
                    break
                await trio.sleep(0.2)
        finally:
            self._preheats.discard((msg.job_id, msg.task))

    def apply_settings(self, settings: dict[str, Any]) -> dict[str, int]:
        """Take the manager's dynamic settings now: ``upload_rate_limit``, ``download_rate_limit`` (bytes/s,
        0 unlimited) and ``upload_slots``. ``settings`` is a whole snapshot: a setting absent (or of a wrong
        type or range, which is logged) is the daemon's own configured value. Upload slots are announced
        again to every scheduler. Returns the settings in force that came from the manager."""
        cfg = self.config
        bounds = {"upload_rate_limit": (0, 1 << 62), "download_rate_limit": (0, 1 << 62), "upload_slots": (1, 65535)}
        taken: dict[str, int] = {}
        for key, value in settings.items():
            if key not in bounds:
                continue  # a setting for another kind of process, or a newer one: not this daemon's
            low, high = bounds[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                event(log, logging.WARNING, "daemon.setting_refused", key=key, value=value)
                continue
            taken[key] = value
        upload = taken.get("upload_rate_limit", cfg.upload_rate_limit)
        download = taken.get("download_rate_limit", cfg.download_rate_limit)
        slots = taken.get("upload_slots", cfg.upload_slots)
        server = self.piece_server
        if server.limiter.bucket.rate != upload:
            server.limiter.bucket.configure(upload)
        if self.download_limiter.bucket.rate != download:
            self.download_limiter.bucket.configure(download)
        if server.config.upload_slots != slots:
            server.config.upload_slots = slots  # new subscriptions count against it; children served stay
            for link in self._links.values():
                if link.up:
                    link.need_announce.set()  # the schedulers weigh hosts by their upload slots
        self.settings = taken
        event(
            log,
            logging.INFO,
            "daemon.settings",
            upload_rate_limit=upload,
            download_rate_limit=download,
            upload_slots=slots,
            from_manager=",".join(sorted(taken)) or "-",
        )
        return taken

    async def set_schedulers(self, endpoints: list[str]) -> None:
        """Use these schedulers from now on (the manager's answer). New ones are connected; the tasks of
        those gone move to the others, like a fail-over. An empty list changes nothing: the daemon keeps
        trying the schedulers it has (the manager knows of none up just now)."""
        wanted = list(dict.fromkeys(endpoints))
        if not wanted or set(wanted) == set(self._links) or self._nursery is None:
            return
        event(log, logging.INFO, "daemon.schedulers", old=",".join(sorted(self._links)) or "-", new=",".join(sorted(wanted)))
        gone = [self._links[e] for e in self._links if e not in wanted]
        for endpoint in wanted:
            if endpoint not in self._links:
                await self._open_link(self._nursery, endpoint)
        self.ring = SchedulerRing(wanted)
        for link in gone:
            del self._links[link.endpoint]
            link.announced = trio.Event()
            link.scope.cancel()  # the client says bye: that scheduler forgets this host
            self._fail_over(link)
            self._forget_served(link)
        self._links_moved()
        self._cache_wake.set()

    async def _syncer(self) -> None:
        """Make the stored data durable now and then (``Storage.sync``), so that a crash does not make
        the next start re-verify tasks that finished long ago."""
        while True:
            await trio.sleep(_SYNC_INTERVAL)
            await trio.to_thread.run_sync(self.storage.sync)

    # -- the scheduler links --

    def _links_moved(self) -> None:
        """Wake whoever waits for a scheduler to come up (:meth:`_wait_for_link`)."""
        self._links_changed.set()
        self._links_changed = trio.Event()

    def _on_sched_state(self, link: _SchedLink, state: str) -> None:
        if state == "connected":
            link.need_announce.set()
        elif state == "lost" and link.up:
            if self.manager is not None:
                self.manager.wake_lookup()  # the manager may know of other schedulers
            link.announced = trio.Event()
            event(log, logging.WARNING, "daemon.scheduler_lost", scheduler=link.endpoint, up=",".join(self.schedulers_up))
            self._links_moved()
            if self.scheduler_connected:
                self._fail_over(link)
            # else: nowhere to go; the tasks wait for it (a reconnect may resume them) or for another one

    def _fail_over(self, link: _SchedLink) -> None:
        """``link`` is down and another scheduler is up: move its tasks. Its peers become orphans; the
        downloads register again (on the next scheduler of the ring, keeping their pieces); the finished
        tasks it knew are announced again where the ring puts them now."""
        mine = [peer_id for peer_id, on in self._peer_links.items() if on is link]
        if not mine:
            return
        event(log, logging.INFO, "daemon.fail_over", scheduler=link.endpoint, peers=len(mine))
        for peer_id in mine:
            del self._peer_links[peer_id]
            self._batches.pop(peer_id, None)
            link.orphans.add(peer_id)
        link.outbox.clear()  # reports about orphans: the scheduler hears peer_left instead, if ever back
        self._relink(mine)
        self._forget_served(link)
        self._cache_wake.set()

    def _relink(self, peer_ids: Iterable[str]) -> None:
        """Make the downloads of these peers register again."""
        for peer_id in peer_ids:
            download = self._peers.get(peer_id)
            if download is not None and download.peer_id == peer_id:
                download.relink()

    def _forget_served(self, link: _SchedLink) -> None:
        for task_id, on in list(self._served.items()):
            if on.pop(link, None) is not None and not on:
                del self._served[task_id]

    def _link_for(self, task_id: str, home: _SchedLink | None = None) -> _SchedLink | None:
        """The scheduler of ``task_id`` now: ``home`` while it is up, else the first scheduler of the
        task's preference order on the ring that is up (None: none is)."""
        if home is not None and home.up:
            return home
        if self.ring is None:
            return None
        links = self._links
        endpoint = self.ring.choose(task_id, lambda e: e in links and links[e].up)
        return None if endpoint is None else links[endpoint]

    async def _wait_for_link(self, task_id: str, home: _SchedLink | None = None) -> _SchedLink:
        """The scheduler of ``task_id``, waiting up to ``scheduler_wait`` for one to be up; else the
        download fails (``scheduler_unreachable``)."""
        with trio.move_on_after(self.config.scheduler_wait):
            while True:
                link = self._link_for(task_id, home)
                if link is not None:
                    return link
                if self.manager is not None:
                    self.manager.wake_lookup()
                await self._links_changed.wait()
        if self.config.from_manager:
            raise _Failed(
                "scheduler_unreachable",
                f"no scheduler up among those the manager at {self.config.manager} gives "
                f"({', '.join(self._links) or 'none yet'}; waited {self.config.scheduler_wait:g} s): "
                "check `dfz mgr` and that its cluster has active schedulers",
            )
        endpoints = self.config.scheduler_endpoints
        where = f"the scheduler at {endpoints[0]}" if len(endpoints) == 1 else f"any scheduler of {', '.join(endpoints)}"
        raise _Failed(
            "scheduler_unreachable",
            f"cannot reach {where} (waited {self.config.scheduler_wait:g} s): "
            "check that `dfz sched` runs there and that --scheduler names its endpoint",
        )

    def _host_announcement(self) -> SchedAnnounceHost:
        cfg = self.config
        return SchedAnnounceHost(
            host_id=self.host_id,
            boot=self.boot,
            hostname=socket.gethostname()[:256],
            ip=self.ip,
            port=self.port,
            type="seed" if cfg.seed else "normal",
            idc=cfg.idc,
            location=cfg.location,
            upload_capacity=cfg.upload_capacity,
            upload_slots=self.piece_server_config.upload_slots,
            ticket=self.ticket,
        )

    async def _announcer(self, link: _SchedLink) -> None:
        """Announce this host on every new session with ``link``'s scheduler (every scheduler must know
        every host: any of them may pick it as a parent, or trigger it as a seed)."""
        cfg = self.config
        while True:
            await link.need_announce.wait()
            await self._tenant_known.wait()  # a host with a tenant token is announced with its ticket only
            link.need_announce = trio.Event()
            try:
                reply = (await link.client.request(self._host_announcement(), timeout=cfg.register_timeout)).expect(
                    SchedHostAnnounced
                )
            except (ConnectionLost, RequestTimeout) as e:
                event(log, logging.WARNING, "daemon.announce_failed", scheduler=link.endpoint, error=str(e))
                if link.client.connected:
                    link.need_announce.set()
                    await trio.sleep(0.5)
                continue
            except RemoteError as e:
                # HOST_TAKEN and the like: a configuration error; downloads fail by timeout with the log saying why.
                event(log, logging.ERROR, "daemon.announce_refused", scheduler=link.endpoint, code=e.code, error=str(e))
                await trio.sleep(5)
                link.need_announce.set()
                continue
            event(
                log,
                logging.INFO,
                "daemon.announced",
                host=self.host_id,
                scheduler=link.endpoint,
                resumed=reply.resumed,
                session=reply.session,
                tenant=reply.tenant or "-",
            )
            if reply.resumed:
                for peer_id in sorted(link.orphans):  # moved elsewhere while it was down
                    link.outbox.append(SchedPeerLeft(peer_id=peer_id))
            else:
                # The scheduler forgot this host with its peers: what was registered there registers again.
                forgotten = [p for p, on in self._peer_links.items() if on is link]
                for peer_id in forgotten:
                    del self._peer_links[peer_id]
                    self._batches.pop(peer_id, None)
                link.outbox.clear()
                self._relink(forgotten)
                self._forget_served(link)
            link.orphans.clear()
            link.announced.set()
            link.wake.set()
            self._links_moved()
            for other in self._links.values():
                if not other.up:
                    self._fail_over(other)  # tasks stuck on a scheduler that is down come here (or on)
            self._cache_wake.set()

    async def _load_reporter(self) -> None:
        """Tell every scheduler this host is announced to how busy its uploads are (``sched.host_load``),
        every :data:`_LOAD_INTERVAL`; a scheduler that does not know the message (an older one, by its
        ``welcome``) is not sent it. A scheduler that is slow to take it delays only its own."""
        meter = _UploadMeter()
        name = SchedHostLoad.wire_name()
        while True:
            await trio.sleep(_LOAD_INTERVAL)
            server = self.piece_server
            msg = SchedHostLoad(
                upload_rate=meter.rate(trio.current_time(), server.stats.bytes_served),
                uploads_in_flight=server.stats.serving,
                upload_peers=server.children,
            )
            async with trio.open_nursery() as nursery:
                for link in list(self._links.values()):
                    welcome = link.client.welcome
                    if link.up and welcome is not None and name in welcome.types:
                        nursery.start_soon(self._push_load, link, msg)

    @staticmethod
    async def _push_load(link: _SchedLink, msg: SchedHostLoad) -> None:
        with trio.move_on_after(_LOAD_INTERVAL):
            try:
                await link.client.push(msg)
            except ConnectionLost:
                pass  # the next one goes to the next session

    async def _cache_announcer(self) -> None:
        """Keep every finished task in the storage offered to the swarm (``sched.announce_task``), at the
        scheduler the ring gives it now: after a start, when a scheduler forgot this host, or when tasks
        moved off a scheduler that went down; so that this host's cache keeps serving others. A task
        stays announced where it was (until that scheduler forgets this host)."""
        while True:
            await self._cache_wake.wait()
            self._cache_wake = trio.Event()
            await self._announce_stored()

    async def _announce_stored(self) -> None:
        infos = await trio.to_thread.run_sync(self.storage.list_tasks)
        for info in infos:
            tid = info.task_id
            if info.state is not StoredState.SUCCEEDED or tid in self._downloads or info.tenant != self.tenant:
                continue  # (a task stored for another tenant than this daemon's now stays out of every swarm)
            if info.piece_count is None:
                continue
            link = self._link_for(tid)
            if link is None:
                return  # no scheduler up: the next announce tries again
            welcome = link.client.welcome
            in_parts = welcome is not None and welcome.types.get(SchedAnnounceTask.wire_name(), 1) >= 2
            if info.piece_count > MAX_DIGESTS_PER_MESSAGE and not in_parts:
                continue  # a scheduler older than 1.10 takes 512 digests at most: served once requested again
            if link in self._served.get(tid, {}):
                continue
            stored = await trio.to_thread.run_sync(self.storage.get, tid)
            if stored is None or stored.state is not StoredState.SUCCEEDED or stored.content_digest is None:
                continue
            digests = [(i, d) for i, d in enumerate(stored.piece_digests()) if d is not None]
            assert stored.content_length is not None
            peer_id = f"{self.host_id}.{tid[:12]}.{secrets.token_hex(4)}"
            parts = [digests[i : i + MAX_DIGESTS_PER_MESSAGE] for i in range(0, len(digests), MAX_DIGESTS_PER_MESSAGE)]
            self._peer_links[peer_id] = link
            try:
                for n, part in enumerate(parts or [[]]):
                    msg = SchedAnnounceTask(
                        peer_id=peer_id,
                        task_id=tid,
                        url=stored.url,
                        piece_length=stored.piece_length,
                        content_length=stored.content_length,
                        digest=stored.content_digest,
                        digests=part,
                        more=n < len(parts) - 1,
                    )
                    (await link.client.request(msg, timeout=self.config.register_timeout)).expect(SchedTaskAnnounced)
            except (ConnectionLost, RequestTimeout):
                self._peer_links.pop(peer_id, None)
                continue  # that scheduler went down: its announce (or the fail-over) wakes this again
            except RemoteError as e:
                self._peer_links.pop(peer_id, None)
                event(log, logging.WARNING, "daemon.task_not_announced", task=tid, code=e.code, error=str(e))
                continue
            if self._peer_links.get(peer_id) is not link:
                continue  # the scheduler forgot this host meanwhile
            self._served.setdefault(tid, {})[link] = peer_id
            self.piece_server.add_task(stored)
            event(log, logging.INFO, "daemon.task_announced", task=tid, peer=peer_id, scheduler=link.endpoint)

    def _install_push_handlers(self, link: _SchedLink) -> None:
        def to_peer(msg: SchedParents | SchedBackToSource | SchedFail, _payload: list[Any]) -> None:
            self._route(msg.peer_id, msg)

        def to_peers(msg: SchedDigests | SchedTaskInfo, _payload: list[Any]) -> None:
            for peer_id in msg.peer_ids:
                self._route(peer_id, msg)

        def refused(msg: SchedRefused, _payload: list[Any]) -> None:
            event(
                log,
                logging.WARNING,
                "daemon.report_refused",
                scheduler=link.endpoint,
                type=msg.type,
                code=msg.code,
                peer=msg.peer_id,
                reason=msg.reason,
            )
            if msg.peer_id:
                self._route(msg.peer_id, msg)

        client = link.client
        client.on_push(SchedParents, to_peer)
        client.on_push(SchedBackToSource, to_peer)
        client.on_push(SchedFail, to_peer)
        client.on_push(SchedDigests, to_peers)
        client.on_push(SchedTaskInfo, to_peers)
        client.on_push(SchedRefused, refused)
        client.on_push(SchedSeed, lambda msg, _payload: self._on_seed(msg, link))
        client.on_push(SchedDeleteTask, lambda msg, _payload: self._on_delete_push(msg, link))

    def _route(self, peer_id: str, msg: Message) -> None:
        download = self._peers.get(peer_id)
        if download is not None:
            download.deliver(msg)

    def _on_seed(self, msg: SchedSeed, link: _SchedLink) -> None:
        """A seed trigger: fetch the task for the swarm (unless it is being fetched already), registering
        with the scheduler that asked while it is up, whatever the ring says. Its ``wanted`` byte ranges (the
        peers' callers need them first) are added to the download, new or running: their pieces are read
        from the origin first."""
        event(log, logging.INFO, "daemon.seed_trigger", task=msg.task_id, scheduler=link.endpoint, wanted=len(msg.wanted))
        if self._nursery is None:
            return
        running = self._downloads.get(msg.task_id)
        if running is not None:
            _add_wanted(running, msg.wanted)
            return
        download = _Download(
            self,
            msg.task_id,
            url=msg.url,
            headers=tuple((name, value) for name, value in msg.headers),
            tag=msg.tag,
            application=msg.application,
            piece_length=msg.piece_length,
            back_to_source=True,
        )
        download.pinned = True
        download.home = link
        _add_wanted(download, msg.wanted)
        self._start(download)

    def _on_delete_push(self, msg: SchedDeleteTask, link: _SchedLink) -> None:
        """The scheduler asks this host to delete a task from its cache (a manager's ``delete_task`` job):
        done in a task of its own, answered with ``sched.task_deleted`` on the same session."""
        if self._nursery is not None:
            self._nursery.start_soon(self._delete_for_scheduler, msg, link)

    async def _delete_for_scheduler(self, msg: SchedDeleteTask, link: _SchedLink) -> None:
        event(log, logging.INFO, "daemon.delete_asked", task=msg.task_id, scheduler=link.endpoint)
        held, error = False, ""
        try:
            held = await self._delete_task(msg.task_id)
        except (StorageError, OSError) as e:
            error = f"cannot delete the task from the cache: {e}"
            event(log, logging.WARNING, "daemon.delete_failed", task=msg.task_id, error=error)
        # Queued behind the peer_left reports the deletion made, so the scheduler hears those first.
        link.outbox.append(SchedTaskDeleted(task_id=msg.task_id, request=msg.request, held=held, error=error[:256]))
        link.wake.set()

    # -- reports --

    def _report_piece(self, peer_id: str, piece: FinishedPiece) -> None:
        finished, _ = self._batches.setdefault(peer_id, ([], []))
        finished.append(piece)
        # A piece from the origin brings its digest, which children wait for before they may fetch it:
        # told at once. Pieces from parents are batched (every report_interval).
        if piece.parent is None or len(finished) >= MAX_FINISHED_PER_REPORT:
            self._flush(peer_id)

    def _report_failed(self, peer_id: str, piece: FailedPiece) -> None:
        _, failed = self._batches.setdefault(peer_id, ([], []))
        failed.append(piece)
        self._flush(peer_id)  # failures are worth telling at once: the scheduler finds other parents

    def _report(self, msg: SchedTaskMetadata | SchedPeerFinished | SchedPeerFailed | SchedPeerLeft | SchedReschedule) -> None:
        """Queue a report about a peer for its scheduler, after the pieces of that peer collected so far.
        A peer no scheduler knows any more (forgotten, or left on one that went down) has nobody to tell."""
        self._flush(msg.peer_id)
        link = self._peer_links.get(msg.peer_id)
        if link is None:
            return
        if isinstance(msg, SchedPeerLeft | SchedPeerFailed):
            del self._peer_links[msg.peer_id]
        link.outbox.append(msg)
        link.wake.set()

    def _flush(self, peer_id: str) -> None:
        batch = self._batches.pop(peer_id, None)
        link = self._peer_links.get(peer_id)
        if batch is None or link is None:
            return
        finished, failed = batch
        while finished or failed:
            link.outbox.append(
                SchedPieces(peer_id=peer_id, finished=finished[:MAX_FINISHED_PER_REPORT], failed=failed[:MAX_FAILED_PER_REPORT])
            )
            finished, failed = finished[MAX_FINISHED_PER_REPORT:], failed[MAX_FAILED_PER_REPORT:]
        link.wake.set()

    async def _reporter(self, link: _SchedLink) -> None:
        """Send the reports queued for ``link`` in order, and the piece batches every ``report_interval``."""
        while True:
            with trio.move_on_after(self.config.report_interval):
                await link.wake.wait()
            for peer_id in [p for p in self._batches if self._peer_links.get(p) is link]:
                self._flush(peer_id)
            link.wake = trio.Event()  # what is queued now is sent below
            while link.outbox:
                if not link.up:
                    await link.announced.wait()
                    continue
                msg = link.outbox[0]
                try:
                    await link.client.push(msg)
                except ConnectionLost:
                    continue  # the announce after the reconnect decides what is still worth sending
                if link.outbox and link.outbox[0] is msg:
                    link.outbox.popleft()

    # -- downloads --

    def _start(self, download: _Download) -> None:
        assert self._nursery is not None, "the daemon is not running"
        self._downloads[download.task_id] = download
        self._nursery.start_soon(download.run)

    def _download_ended(self, download: _Download) -> None:
        if self._downloads.get(download.task_id) is download:
            del self._downloads[download.task_id]
        self._peers.pop(download.peer_id, None)
        if download.outcome.state is not DownloadState.SUCCEEDED:  # a finished peer stays: it serves the task
            self._peer_links.pop(download.peer_id, None)
            self._batches.pop(download.peer_id, None)

    async def download(self, request: DownloadRequest) -> AsyncIterator[Progress]:
        """Start (or join) the download of ``request`` and yield its progress; the last item is final.

        See :class:`dfz.peer.local.DownloadService`. The task is shared with every other caller asking
        for the same task id; each caller has its own output, ``--digest`` and timeout.
        """
        deadline = math.inf if request.timeout is None else trio.current_time() + request.timeout
        try:
            request = await self.resolve(request)
        except TenantError as e:
            kind = "bad_request" if e.wrong else "no_tenant"
            yield Progress(task_id="", state=DownloadState.FAILED, error=str(e), error_kind=kind)
            return
        try:
            tid, expected = _check_request(request)
        except (ValueError, DigestFormatError) as e:
            yield Progress(task_id="", state=DownloadState.FAILED, error=str(e), error_kind="bad_request")
            return
        download = self._downloads.get(tid)
        if download is None:
            stored = await trio.to_thread.run_sync(self.storage.get, tid)
            if stored is not None and stored.state is StoredState.SUCCEEDED and tid not in self._downloads:
                yield await self._local_hit(stored, request, expected)
                return
            download = self._downloads.get(tid)
            if download is None:
                download = _Download(
                    self,
                    tid,
                    url=request.url,
                    headers=request.headers,
                    tag=request.tag,
                    application=request.application,
                    piece_length=request.piece_length,
                    back_to_source=request.back_to_source,
                    named_digest=str(expected) if request.by_digest and expected is not None else None,
                )
                self._start(download)
        last: Progress | None = None
        download.interest += 1
        wanted: int | None = None
        if request.priority_range is not None:
            wanted = download.wanted.add(request.priority_range)
            start, end = request.priority_range
            event(log, logging.DEBUG, "daemon.wanted_range", task=tid[:16], start=start, end="" if end is None else end)
        try:
            while not download.finished.is_set():
                changed = download.changed
                current = download.progress()
                if current != last:
                    last = current
                    yield current
                with trio.move_on_at(deadline):
                    await changed.wait()
                if trio.current_time() >= deadline and not download.finished.is_set():
                    yield replace(
                        download.progress(),
                        state=DownloadState.FAILED,
                        error=f"the download did not finish within {request.timeout:g} s",
                        error_kind="timeout",
                    )
                    return
        finally:
            # The last caller gone (timeout, cancel, closed iterator): stop; the pieces stay for a resume.
            download.interest -= 1
            if wanted is not None:
                download.wanted.remove(wanted)
            if download.interest == 0 and not download.pinned and not download.finished.is_set():
                download.cancel()
        final = download.progress()
        if final.state is not DownloadState.SUCCEEDED:
            yield final
            return
        if request.output is None and expected is not None and download.verified == str(expected):
            yield final  # the content was checked against this digest as the task finished
            return
        yield await self._deliver(download.stored, final, request, expected)

    async def _local_hit(self, stored: StoredTask, request: DownloadRequest, expected: Digest | None) -> Progress:
        if request.by_digest and request.output is None:
            # A task named by its digest was checked whole against it before it finished (_check_named_digest),
            # and the storage re-verifies pieces whose data changed since: no second pass per cache hit.
            expected = None
        info = await trio.to_thread.run_sync(stored.info)
        hit = Progress(
            task_id=stored.task_id,
            state=DownloadState.SUCCEEDED,
            content_length=info.content_length,
            piece_count=info.piece_count,
            pieces_done=info.pieces_stored,
            bytes_done=info.bytes_stored,
            bytes_from_cache=info.bytes_stored,
        )
        return await self._deliver(stored, hit, request, expected)

    async def _deliver(
        self, stored: StoredTask | None, done: Progress, request: DownloadRequest, expected: Digest | None
    ) -> Progress:
        """Export the finished task to the caller's output (checking its digest); the final progress."""
        if request.output is None:
            if expected is not None and stored is not None:
                return await self._check_only(stored, done, expected)
            return done
        if stored is None:
            return replace(done, state=DownloadState.FAILED, error="internal error: no stored task", error_kind="internal")
        output = request.output
        try:
            await trio.to_thread.run_sync(lambda: stored.export(output, digest=expected))
        except DigestMismatch as e:
            return replace(
                done,
                state=DownloadState.FAILED,
                error=f"the file does not match --digest {expected}: {e.actual}; no output was written",
                error_kind="digest_mismatch",
            )
        except ExportError as e:
            return replace(done, state=DownloadState.FAILED, error=str(e), error_kind="output_error")
        except (TaskIncomplete, StorageError) as e:
            return replace(
                done, state=DownloadState.FAILED, error=f"the cached task is damaged: {e}; try again", error_kind="storage_error"
            )
        return done

    async def _check_only(self, stored: StoredTask, done: Progress, expected: Digest) -> Progress:
        def check() -> None:
            if expected.algorithm == "blake3":
                expected.check(stored.content_digest or "", f"task {stored.task_id}")
                return
            h = expected.hasher()
            layout = stored.layout()
            assert layout is not None
            for i in range(layout.count):
                h.update(stored.read_piece(i))
            expected.check(h.hexdigest(), f"task {stored.task_id}")

        try:
            await trio.to_thread.run_sync(check)
        except DigestMismatch as e:
            return replace(done, state=DownloadState.FAILED, error=str(e), error_kind="digest_mismatch")
        return done

    def list_tasks(self) -> list[CachedTask]:
        """The stored tasks. ``extra``: ``running`` (``yes`` while downloading), ``tenant`` (when it has one) and
        ``from_hosts``, the verified bytes this process received for the task by source, a JSON object of
        parent host id (and ``origin``) -> bytes, the largest first (those that fit 1024 characters)."""
        out: list[CachedTask] = []
        for info in self.storage.list_tasks():
            extra = {"running": "yes"} if info.task_id in self._downloads else {}
            if info.tenant:
                extra["tenant"] = info.tenant[:_EXTRA_VALUE]
            counts = self._from_hosts.get(info.task_id)
            if counts:
                extra["from_hosts"] = _from_hosts_text(counts)
            out.append(
                CachedTask(
                    task_id=info.task_id,
                    url=info.url,
                    content_length=info.content_length,
                    complete=info.state is StoredState.SUCCEEDED,
                    pieces_done=info.pieces_stored,
                    piece_count=info.piece_count,
                    extra=extra,
                )
            )
        return out

    async def list_source(self, url: str, headers: tuple[tuple[str, str], ...]) -> list[SourceEntry]:
        """See :meth:`dfz.peer.local.DownloadService.list_source`: this daemon's backend for the scheme lists."""
        return await self.sources.backend_for(url).list(url, dict(headers) if headers else None)

    async def delete_task(self, task_id: str) -> bool:
        try:
            return await self._delete_task(task_id)
        except StorageError:
            return False

    async def _delete_task(self, task_id: str) -> bool:
        """Remove a task from this daemon, cleanly for everyone using it: its download (if one runs) is
        cancelled and ends first; the piece server stops serving it (its children get a ``dropped`` task
        state and other parents; a piece being read goes out whole, since the storage waits for reads in
        progress before it closes the task); the schedulers hear its peers left; then the storage deletes it.
        Whether the storage held it; raises :class:`StorageError` (or ``OSError``) when it cannot delete."""
        download = self._downloads.get(task_id)
        if download is not None:
            download.cancel()
            await download.finished.wait()
        self.piece_server.drop_task(task_id, "deleted")
        self._from_hosts.pop(task_id, None)
        for peer_id in self._served.pop(task_id, {}).values():
            self._peers.pop(peer_id, None)
            self._report(SchedPeerLeft(peer_id=peer_id))
        return await trio.to_thread.run_sync(self.storage.delete, task_id)


def _from_hosts_text(counts: Counter[str]) -> str:
    """``{"host": bytes, ...}``, largest first, as many as fit :data:`_EXTRA_VALUE` characters."""
    shown: dict[str, int] = {}
    for source, nbytes in counts.most_common():
        text = json.dumps({**shown, source: nbytes}, separators=(",", ":"))
        if len(text) > _EXTRA_VALUE:
            break
        shown[source] = nbytes
    return json.dumps(shown, separators=(",", ":"))


def _add_wanted(download: _Download, ranges: Iterable[tuple[int, int | None]]) -> None:
    """Add a seed trigger's wanted byte ranges to ``download`` (kept until it ends; malformed ones left out)."""
    for byte_range in ranges:
        with suppress(ValueError):
            download.wanted.add(byte_range)


def _check_request(request: DownloadRequest) -> tuple[str, Digest | None]:
    """The task id and the expected digest of a request; ``ValueError`` says what is wrong with it."""
    if not request.url:
        raise ValueError("no URL given")
    if request.output is not None and not os.path.isabs(request.output):
        raise ValueError(f"output {request.output!r} must be an absolute path")
    if request.timeout is not None and not request.timeout > 0:
        raise ValueError(f"timeout {request.timeout!r} must be a positive number of seconds")
    expected = Digest.parse(request.digest) if request.digest else None
    if request.priority_range is not None:
        check_byte_range(request.priority_range)
    if request.piece_length is not None:
        try:
            validate_piece_length(request.piece_length)
        except InvalidPieceLength as e:
            raise ValueError(str(e)) from None
    return request.task_id(), expected


def _host_id(data_dir: Path) -> str:
    """The host id kept in the data directory, made on first start."""
    path = data_dir / "host_id"
    try:
        text = path.read_text().strip()
        if text and len(text) <= 100 and all(0x21 <= ord(c) <= 0x7E for c in text):
            return text
    except FileNotFoundError:
        pass
    name = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-_.")[:60] or "host"
    text = f"{name}-{secrets.token_hex(6)}"
    tmp = path.with_name("host_id.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
    return text


def _advertised(config: DaemonConfig, endpoints: list[str]) -> tuple[str, int]:
    """The ip and port the scheduler hands to children: the first tcp endpoint's."""
    for endpoint in endpoints:
        if endpoint.startswith("tcp://"):
            host, _, port = endpoint[len("tcp://") :].rpartition(":")
            host = host.strip("[]")
            if config.advertise_ip:
                host = config.advertise_ip
            elif host in ("0.0.0.0", "*", "::", ""):
                host = socket.gethostbyname(socket.gethostname())
            return host, int(port)
    raise ValueError(f"the piece server needs a tcp endpoint that other peers can reach; it listens on {endpoints}")


# --- running it as a program -----------------------------------------------------------------------------


class ListenError(Exception):
    """The daemon could not bind its piece server or its local API (in use, bad address, no permission)."""


async def serve(config: DaemonConfig, *, on_ready: Callable[[Daemon, list[str]], None] | None = None) -> None:
    """Run a :class:`Daemon` and its local API (:class:`dfz.peer.api.ApiServer`) until SIGTERM or SIGINT,
    then stop both cleanly and return.

    ``on_ready(daemon, api_endpoints)`` is called once both serve. Raises :class:`ListenError` when an
    endpoint cannot be bound, :class:`~dfz.peer.config.ConfigError` for an unusable API endpoint, and
    :class:`~dfz.peer.storage.StorageLocked` when another process uses the data directory.
    """
    from .api import ApiServer, EndpointInUse

    api_endpoints = config.api_endpoints()
    started = False
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                daemon = await nursery.start(Daemon(config).run)
                api = await nursery.start(ApiServer(daemon, api_endpoints, name=f"dfz-api-{daemon.host_id}").run)
                started = True
                if on_ready is not None:
                    on_ready(daemon, api.endpoints)
                async for signum in signals:
                    event(log, logging.INFO, "daemon.stopping", signal=signal.Signals(signum).name)
                    break
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        refused = group.subgroup(TenantRefused)
        if refused is not None:
            raise _leaf(refused) from None
        if started:
            raise
        leaf = _leaf(group)
        if isinstance(leaf, ProxyListenError):
            raise ListenError(str(leaf)) from None
        if isinstance(leaf, zmq.ZMQError | EndpointInUse):
            raise ListenError(f"cannot listen on {', '.join([*config.listen, *api_endpoints])}: {leaf}") from None
        if isinstance(leaf, Exception):
            raise leaf from None
        raise
