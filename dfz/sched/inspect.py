"""Inspection of a scheduler: the bounded snapshot that ``sched.inspect`` answers, and the client side.

Rules of this file:

* :func:`build_snapshot` reads the scheduler's model and never writes to it; it runs on the trio thread
  between two events like everything that reads the core, so it sees one consistent state. It does no I/O.
* It must stay cheap for a scheduler that serves 10,000 peers: the work is one pass over the hosts and one
  over the tasks the asker may see (totals, and a partial sort that keeps only the page asked for), plus
  the peers of the pages' tasks (their progress) and of the one inspected task (breadth-first, stopping
  at the page's size). Nothing is kept between snapshots.
* A snapshot fits the fabric's 64 KiB header frame: records are counted as they are encoded, and a list
  stops (``truncated``) when :data:`~dfz.sched.messages.INSPECT_BUDGET` is used up. The budget goes to the
  inspected task, the tasks, the swarm's peers, and last the hosts (the one list a client pages through
  with an offset, however long it is).
* Tenants: a snapshot limited to a tenant holds only that tenant's hosts and tasks, and its totals count
  only them; an inspected task of another tenant is answered as unknown (its existence is not told).
* :func:`inspect` and :func:`inspect_hosts` are the client side (``dfz top``, the manager's console): one
  request, or as many pages as it takes to read every host.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import msgspec
import trio

from ..broker import Client, ClientConfig, CurveClient
from .messages import (
    INSPECT_BUDGET,
    MAX_INSPECT_HOSTS,
    MAX_PARENTS,
    SCHED_CATALOGUE,
    HostSort,
    InspectHost,
    InspectPeer,
    InspectTask,
    SchedInspect,
    SchedSnapshot,
    TaskSort,
)
from .model import Host, Peer, Task
from .state import PeerState

__all__ = [
    "SnapshotCounters",
    "build_snapshot",
    "connect",
    "inspect",
    "inspect_hosts",
]

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()
_SOURCE_STATES = (PeerState.BACK_TO_SOURCE, PeerState.SUCCEEDED)


class SnapshotCounters(msgspec.Struct, frozen=True):
    """The service's own counters a snapshot reports (``ServiceStats``)."""

    events: int = 0
    pushes: int = 0
    refused: int = 0


# --- the scheduler side ------------------------------------------------------------------------------------


def build_snapshot(
    hosts: Iterable[Host],
    tasks: Iterable[Task],
    req: SchedInspect,
    *,
    scheduler: str,
    now: float,
    tenant: str = "",
    counters: SnapshotCounters | None = None,
    find_task: Callable[[str], Task | None] | None = None,
) -> SchedSnapshot:
    """The answer to ``req`` from the scheduler's ``hosts`` and ``tasks`` (``core.hosts.values()`` and
    ``core.tasks.values()``) at clock time ``now``, limited to ``tenant`` when it is not empty.
    ``find_task`` looks a task up by id (``core.tasks.get``); without it the tasks are searched."""
    budget = _Budget(INSPECT_BUDGET)
    snap = SchedSnapshot(scheduler=scheduler[:256], clock_ms=max(0, int(now * 1000)), tenant=tenant[:64])
    counters = counters or SnapshotCounters()
    snap.events, snap.pushes, snap.refused = (_u(n) for n in (counters.events, counters.pushes, counters.refused))

    visible_hosts: list[Host] = []
    seeds = rate = 0
    for host in hosts:
        if tenant and host.tenant != tenant:
            continue
        visible_hosts.append(host)
        seeds += host.is_seed
        rate += host.upload_rate
    snap.hosts_total, snap.seed_hosts, snap.upload_rate = len(visible_hosts), seeds, rate

    visible_tasks: list[Task] = []
    peers = downloading = origin = from_peers = 0
    for task in tasks:
        if tenant and task.tenant != tenant:
            continue
        visible_tasks.append(task)
        peers += len(task.peers)
        downloading += task.counts[PeerState.RUNNING] + task.counts[PeerState.BACK_TO_SOURCE]
        origin += task.bytes_from_origin
        from_peers += task.bytes_from_peers
    snap.tasks_total, snap.peers_total, snap.downloading = len(visible_tasks), peers, downloading
    snap.bytes_from_origin, snap.bytes_from_peers = origin, from_peers

    inspected: Task | None = None
    if req.task_id is not None:
        if find_task is not None:
            inspected = find_task(req.task_id)
        else:
            inspected = next((t for t in visible_tasks if t.id == req.task_id), None)
        if inspected is not None and tenant and inspected.tenant != tenant:
            inspected = None
    if inspected is not None:
        record = _task_record(inspected, now)
        if budget.take(record):
            snap.task = record
        else:
            snap.truncated = True

    for task in _page(visible_tasks, _TASK_KEYS[req.task_sort], req.task_offset, req.tasks):
        record = snap.task if task is inspected and snap.task is not None else _task_record(task, now)
        if not budget.take(record):
            snap.truncated = True
            break
        snap.tasks.append(record)

    if inspected is not None and snap.task is not None and req.peers:
        for peer, depth in _breadth_first(inspected):
            if len(snap.peers) >= req.peers:
                break
            peer_record = _peer_record(peer, depth)
            if not budget.take(peer_record):
                snap.truncated = True
                break
            snap.peers.append(peer_record)

    # Hosts last: they are the list that pages (host_offset), so what the budget leaves them is a page.
    for host in _page(visible_hosts, _HOST_KEYS[req.host_sort], req.host_offset, req.hosts):
        host_record = _host_record(host)
        if not budget.take(host_record):
            snap.truncated = True
            break
        snap.hosts.append(host_record)
    return snap


class _Budget:
    """Bytes left for records in one snapshot."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self, record: msgspec.Struct) -> bool:
        size = len(_encoder.encode(record))
        if size > self.left:
            self.left = 0  # a later, smaller record must not jump the queue: lists stay prefixes of the order
            return False
        self.left -= size
        return True


def _page(items: list[T], key: Callable[[T], Any], offset: int, limit: int) -> list[T]:
    """Items ``offset`` to ``offset + limit`` in ``key`` order, by a partial sort (O(n log(offset + limit)))."""
    if limit <= 0 or offset >= len(items):
        return []
    wanted = offset + limit
    ordered = sorted(items, key=key) if wanted >= len(items) else heapq.nsmallest(wanted, items, key=key)
    return ordered[offset:wanted]


_HOST_KEYS: dict[str, Callable[[Host], Any]] = {
    "upload_rate": lambda h: (-h.upload_rate, h.id),
    "bytes_uploaded": lambda h: (-h.bytes_uploaded, h.id),
    "bytes_downloaded": lambda h: (-h.bytes_downloaded, h.id),
    "uploads": lambda h: (-h.uploads, h.id),
    "peers": lambda h: (-len(h.peers), h.id),
    "id": lambda h: h.id,
}


def _downloading(task: Task) -> int:
    return task.counts[PeerState.RUNNING] + task.counts[PeerState.BACK_TO_SOURCE]


_TASK_KEYS: dict[str, Callable[[Task], Any]] = {
    "active": lambda t: (-_downloading(t), -len(t.peers), t.id),
    "peers": lambda t: (-len(t.peers), t.id),
    "bytes": lambda t: (-(t.bytes_from_origin + t.bytes_from_peers), t.id),
    "created": lambda t: (-t.created_at, t.id),
    "id": lambda t: t.id,
}


def _u(value: int, bits: int = 63) -> int:
    return min(max(0, value), (1 << bits) - 1)


def _host_record(host: Host) -> InspectHost:
    return InspectHost(
        host_id=host.id,
        hostname=host.hostname[:256],
        ip=host.ip[:256],
        port=host.port,
        type=host.type.value,
        idc=host.idc[:256],
        location=host.location[:256],
        tenant=host.tenant[:64],
        upload_capacity=_u(host.upload_capacity),
        upload_slots=_u(host.upload_slots, 32),
        uploads=_u(host.uploads, 32),
        upload_rate=_u(host.upload_rate),
        uploads_in_flight=_u(host.uploads_in_flight, 32),
        upload_peers=_u(host.upload_peers, 32),
        peers=_u(len(host.peers), 32),
        bytes_uploaded=_u(host.bytes_uploaded),
        bytes_downloaded=_u(host.bytes_downloaded),
    )


def _task_record(task: Task, now: float) -> InspectTask:
    counts = task.counts
    return InspectTask(
        task_id=task.id,
        url=task.url[:8192],
        tag=task.tag[:256],
        application=task.application[:256],
        tenant=task.tenant[:64],
        state=task.state.value,
        content_length=None if task.content_length is None else _u(task.content_length),
        piece_length=None if task.piece_length is None else _u(task.piece_length, 32),
        piece_count=None if task.piece_count is None else _u(task.piece_count, 32),
        peers=_u(len(task.peers), 32),
        pending=_u(counts[PeerState.PENDING], 32),
        running=_u(counts[PeerState.RUNNING], 32),
        back_to_source=_u(counts[PeerState.BACK_TO_SOURCE], 32),
        succeeded=_u(counts[PeerState.SUCCEEDED], 32),
        failed=_u(counts[PeerState.FAILED], 32),
        finished_pieces=_u(sum(p.finished_count for p in task.peers.values())),
        bytes_from_origin=_u(task.bytes_from_origin),
        bytes_from_peers=_u(task.bytes_from_peers),
        age_ms=_u(int((now - task.created_at) * 1000)),
    )


def _peer_record(peer: Peer, depth: int) -> InspectPeer:
    return InspectPeer(
        peer_id=peer.id,
        host_id=peer.host.id,
        hostname=peer.host.hostname[:256],
        state=peer.state.value,
        finished_pieces=_u(peer.finished_count, 32),
        parents=[p.id for p in peer.parents][:MAX_PARENTS],
        children=_u(len(peer.children), 32),
        uploaded=_u(peer.uploaded, 32),
        depth=min(depth, 0xFFFF),
    )


def _breadth_first(task: Task) -> Iterable[tuple[Peer, int]]:
    """The task's peers with their depth, parents before children: from the roots (peers without parents;
    those that feed the swarm first, then by id), each peer once, at the depth it is first reached. The
    caller stops when it has enough; peers a child of another task would lead to are never followed."""
    roots = [p for p in task.peers.values() if not p.parents]
    roots.sort(key=lambda p: (p.state not in _SOURCE_STATES, p.id))
    seen: set[str] = set()
    queue: deque[tuple[Peer, int]] = deque((p, 0) for p in roots)
    while queue:
        peer, depth = queue.popleft()
        if peer.id in seen:
            continue
        seen.add(peer.id)
        yield peer, depth
        for child in peer.children:
            if child.id not in seen and child.task is task:
                queue.append((child, depth + 1))
    if len(seen) < len(task.peers):  # not reachable from a root: only if the model broke its invariants
        for peer in sorted(task.peers.values(), key=lambda p: p.id):
            if peer.id not in seen:
                yield peer, 0


# --- the client side -----------------------------------------------------------------------------------------


@asynccontextmanager
async def connect(
    endpoint: str,
    *,
    curve: CurveClient | None = None,
    name: str = "dfz-inspect",
    timeout: float = 5.0,  # noqa: ASYNC109 - the requests' default deadline, which travels on the wire
) -> AsyncIterator[Client]:
    """A fabric client of the scheduler at ``endpoint`` for :func:`inspect`, closed (``bye``) on exit. It
    announces no host: the scheduler sees it as an observer. An exception from the block comes out as it
    was raised (not wrapped in an exception group)."""
    client = Client(SCHED_CATALOGUE, endpoint, name=name, config=ClientConfig(timeout=timeout, reconnect_max=1.0), curve=curve)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            try:
                yield client
            except BaseException as e:
                body_error = e
                raise
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery wraps whatever leaves it; give back the block's own exception (or the client's).
        if len(group.exceptions) == 1 and (body_error is None or group.exceptions[0] is body_error):
            raise group.exceptions[0] from None
        raise


async def inspect(
    client_or_endpoint: Client | str,
    *,
    hosts: int = 50,
    host_offset: int = 0,
    host_sort: HostSort = "upload_rate",
    tasks: int = 20,
    task_offset: int = 0,
    task_sort: TaskSort = "active",
    task_id: str | None = None,
    peers: int = 100,
    timeout: float = 5.0,  # noqa: ASYNC109 - the deadline travels on the wire (`dl`)
    curve: CurveClient | None = None,
) -> SchedSnapshot:
    """One ``sched.inspect``: the scheduler's snapshot. ``client_or_endpoint`` is a running fabric client of
    the scheduler (kept open by the caller: the way to poll) or an endpoint (a client is opened for this
    one request). Raises ``ValueError`` for arguments out of the protocol's bounds (the message is
    validated before it is sent), and what :meth:`Client.request` raises (``RequestTimeout``,
    ``RemoteError`` with ``NOT_ALLOWED`` when the scheduler does not answer inspections, ``ConnectionLost``).
    """
    fields: dict[str, Any] = {
        "hosts": hosts,
        "host_offset": host_offset,
        "host_sort": host_sort,
        "tasks": tasks,
        "task_offset": task_offset,
        "task_sort": task_sort,
        "task_id": task_id,
        "peers": peers,
    }
    try:
        req = msgspec.convert(fields, SchedInspect)
    except msgspec.ValidationError as e:
        raise ValueError(f"sched.inspect: {e}") from None
    if isinstance(client_or_endpoint, str):
        async with connect(client_or_endpoint, curve=curve, timeout=timeout) as client:
            return (await client.request(req, timeout=timeout)).expect(SchedSnapshot)
    return (await client_or_endpoint.request(req, timeout=timeout)).expect(SchedSnapshot)


async def inspect_hosts(
    client: Client,
    *,
    max_hosts: int = 2000,
    host_sort: HostSort = "upload_rate",
    timeout: float = 5.0,  # noqa: ASYNC109 - each request's deadline travels on the wire
    **first: Any,
) -> SchedSnapshot:
    """A snapshot with up to ``max_hosts`` hosts, read page by page (each page as many as fit a header
    frame): the first request also carries ``first`` (tasks, ``task_id``, peers: see :func:`inspect`), the
    others ask for hosts only and their hosts are appended (so the result may hold more hosts than one
    ``sched.snapshot`` on the wire may). Hosts that move between pages while they are read (their sort key
    changed) may appear twice or not at all: they are kept once, by id; ``host_sort="id"`` reads every
    host exactly once (hosts that come or go meanwhile aside)."""
    snap = await inspect(client, hosts=min(max_hosts, MAX_INSPECT_HOSTS), host_sort=host_sort, timeout=timeout, **first)
    seen = {h.host_id for h in snap.hosts}
    offset = len(snap.hosts)
    while offset < min(snap.hosts_total, max_hosts):
        page = await inspect(
            client, hosts=min(max_hosts - offset, MAX_INSPECT_HOSTS), host_offset=offset, host_sort=host_sort,
            tasks=0, peers=0, timeout=timeout,
        )  # fmt: skip
        if not page.hosts:
            break
        offset += len(page.hosts)
        for host in page.hosts:
            if host.host_id not in seen:
                seen.add(host.host_id)
                snap.hosts.append(host)
        snap.hosts_total = page.hosts_total
    return snap
