"""The live swarm of a task for the console (``console.py``'s websocket): asked of the task's scheduler with
``sched.inspect`` (``dfz/sched/inspect.py``, ``protocol.md`` §14), shaped for the page, with rates.

Theory of operation:

* **Which scheduler.** The manager knows every cluster's active schedulers and their fabric endpoints (its
  fabric's snapshot, the same ``mgr.schedulers`` answer daemons hash). A task's peers meet at the first
  scheduler of the task's preference order on the hash ring of their cluster's endpoints
  (``dfz/peer/schedring.py``, §14.9); the task may be in any cluster. So a watch asks, cluster by cluster,
  the schedulers in the task's preference order until one knows the task, and keeps asking that one; when
  it no longer knows the task (it moved, or ended) the search starts again.
* **Clients.** :class:`SwarmInspector` keeps one fabric client per scheduler endpoint it was asked about, in
  its own nursery, and closes those unused for ``idle`` seconds: a console polling every second does not
  make a session a second. The client announces no host: the scheduler sees an observer (it answers every
  tenant's tasks; the manager filters for confined principals, below).
* **Rates.** A snapshot carries counters (the task's bytes from the origin and from peers, each peer's
  finished pieces) and the scheduler's clock; a :class:`SwarmWatch` (one per websocket) keeps the previous
  snapshot and divides the differences by the clock's. The first snapshot has no rates (``None``).
* **Tenants.** A principal confined to a tenant sees a task only when the task is of its tenant (the
  scheduler's ``tenant`` is the tenant's row id); another tenant's task is answered as unknown.
* **The overview** (:meth:`SwarmWatch.overview`) asks every active scheduler at once for its totals and most
  active tasks, and computes each one's rates the same way; it covers every tenant, so a confined principal
  is refused.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from ..broker import Client, ClientConfig, FabricError, RemoteError
from ..log import event, get_logger
from ..peer.schedring import SchedulerRing
from ..sched.inspect import inspect
from ..sched.messages import SCHED_CATALOGUE, InspectTask, SchedErrorCode, SchedSnapshot
from .auth import Principal
from .console import SwarmUnavailable
from .fabric import ManagerFabric

log = get_logger("mgr.swarm")

PEERS_SHOWN = 256
"""Most peers of a swarm asked for (the scheduler may send fewer to fit a frame: ``truncated``)."""
HOSTS_ASKED = 64
"""Hosts asked for with each snapshot (busiest uploaders first): their type, address and upload rate."""
OVERVIEW_TASKS = 10
"""Most active tasks the cluster overview lists (asked of each scheduler, the busiest kept)."""


@dataclass
class _Link:
    client: Client
    scope: trio.CancelScope
    last_used: float


class SwarmInspector:
    """Fabric clients of the schedulers, for :class:`SwarmWatch` (a ``SwarmSource`` of ``console.py``).
    ``await nursery.start(inspector.run)``; cancelling closes every client."""

    def __init__(self, fabric: ManagerFabric, *, timeout: float = 2.0, idle: float = 30.0) -> None:
        self.fabric = fabric
        self.timeout = timeout
        self.idle = idle
        self._links: dict[str, _Link] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[SwarmInspector] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            while True:
                await trio.sleep(self.idle / 3)
                now = trio.current_time()
                for endpoint, link in list(self._links.items()):
                    if now - link.last_used > self.idle:
                        del self._links[endpoint]
                        link.scope.cancel()

    def watch(self) -> SwarmWatch:
        return SwarmWatch(self)

    def schedulers_for(self, task_id: str) -> list[tuple[int, str, str]]:
        """``(cluster id, scheduler hostname, endpoint)`` to ask about ``task_id``, in the order to ask them:
        cluster by cluster (in id order), each cluster's schedulers in the task's preference order."""
        order: list[tuple[int, str, str]] = []
        for cluster in sorted(self.fabric.snapshot.clusters, key=lambda c: c.id):
            names = {s.endpoint: s.hostname for s in cluster.schedulers}
            if names:
                order.extend((cluster.id, names[e], e) for e in SchedulerRing(names).preference(task_id))
        return order

    async def _client(self, endpoint: str) -> Client:
        link = self._links.get(endpoint)
        if link is None:
            if self._nursery is None:
                raise SwarmUnavailable("the manager is starting: try again")
            client = Client(
                SCHED_CATALOGUE, endpoint, name="dfz-mgr-console", config=ClientConfig(timeout=self.timeout, reconnect_max=1.0)
            )
            scope = trio.CancelScope()

            async def serve(*, task_status: trio.TaskStatus[Client] = trio.TASK_STATUS_IGNORED) -> None:
                with scope:
                    await client.run(task_status=task_status)

            await self._nursery.start(serve)
            link = self._links[endpoint] = _Link(client, scope, trio.current_time())
        link.last_used = trio.current_time()
        return link.client

    def _forget(self, endpoint: str) -> None:
        link = self._links.pop(endpoint, None)
        if link is not None:
            link.scope.cancel()

    def schedulers(self) -> list[tuple[int, str, str]]:
        """``(cluster id, hostname, endpoint)`` of every active scheduler, by cluster and endpoint."""
        return sorted((c.id, s.hostname, s.endpoint) for c in self.fabric.snapshot.clusters for s in c.schedulers)

    async def snapshot(self, endpoint: str, task_id: str | None, *, tasks: int = 0) -> SchedSnapshot:
        """``sched.inspect`` at ``endpoint``: the swarm of ``task_id`` (with the busiest hosts), or with none the
        totals and the ``tasks`` most active tasks; :class:`SwarmUnavailable` when it cannot be had."""
        client = await self._client(endpoint)
        try:
            with trio.fail_after(self.timeout * 2):
                await client.wait_connected()
            if task_id is None:
                return await inspect(client, hosts=0, tasks=tasks, task_sort="active", peers=0, timeout=self.timeout)
            return await inspect(client, hosts=HOSTS_ASKED, tasks=0, task_id=task_id, peers=PEERS_SHOWN, timeout=self.timeout)
        except RemoteError as e:
            if e.code == SchedErrorCode.NOT_ALLOWED:
                raise SwarmUnavailable(
                    f"scheduler {endpoint} does not answer inspections (its setting 'inspect' is off)"
                ) from None
            raise SwarmUnavailable(f"scheduler {endpoint} refused: {e}") from None
        except trio.TooSlowError:
            self._forget(endpoint)
            raise SwarmUnavailable(f"scheduler {endpoint} is not reachable (no session within {self.timeout * 2:g} s)") from None
        except FabricError as e:  # no answer in time, the session ended, an answer of the wrong type
            self._forget(endpoint)
            raise SwarmUnavailable(f"scheduler {endpoint}: {e}") from None


@dataclass
class SwarmWatch:
    """What one websocket watches: the scheduler that knows its task, and the previous snapshot (for rates)."""

    inspector: SwarmInspector
    task_id: str = ""
    endpoint: str = ""
    hostname: str = ""
    cluster_id: int = 0
    previous: SchedSnapshot | None = None
    errors: list[str] = field(default_factory=list)
    totals_before: dict[str, SchedSnapshot] = field(default_factory=dict)
    """The previous overview snapshot of each scheduler (endpoint), for the cluster's rates."""

    async def overview(self, principal: Principal) -> dict[str, Any]:
        """Every active scheduler's totals, rates and most active tasks (``protocol.md`` §17.11). They cover
        every tenant: a confined principal is refused (:class:`SwarmUnavailable`)."""
        if principal.confined:
            raise SwarmUnavailable("the cluster's throughput covers every tenant: watch your tasks' swarms instead")
        schedulers = self.inspector.schedulers()
        answers: dict[str, SchedSnapshot | str] = {}

        async def ask(endpoint: str) -> None:
            try:
                answers[endpoint] = await self.inspector.snapshot(endpoint, None, tasks=OVERVIEW_TASKS)
            except SwarmUnavailable as e:
                answers[endpoint] = str(e)

        async with trio.open_nursery() as nursery:
            for _, _, endpoint in schedulers:
                nursery.start_soon(ask, endpoint)
        shown: list[dict[str, Any]] = []
        tasks: list[dict[str, Any]] = []
        total: dict[str, float | None] = {"from_origin": 0, "from_peers": 0}
        for cluster_id, hostname, endpoint in schedulers:
            entry: dict[str, Any] = {"hostname": hostname, "endpoint": endpoint, "scheduler_cluster_id": cluster_id}
            got = answers.get(endpoint, "not asked")
            if isinstance(got, str):
                shown.append({**entry, "ok": False, "error": got})
                self.totals_before.pop(endpoint, None)
                continue
            before = self.totals_before.get(endpoint)
            ms = got.clock_ms - before.clock_ms if before is not None else 0
            rates = {
                "from_origin": None if before is None else _rate(got.bytes_from_origin, before.bytes_from_origin, ms),
                "from_peers": None if before is None else _rate(got.bytes_from_peers, before.bytes_from_peers, ms),
            }
            for key, value in rates.items():
                known = total[key]
                total[key] = None if value is None or known is None else known + value
            self.totals_before[endpoint] = got
            shown.append(
                {
                    **entry,
                    "ok": True,
                    "hosts": got.hosts_total,
                    "seed_hosts": got.seed_hosts,
                    "tasks": got.tasks_total,
                    "peers": got.peers_total,
                    "downloading": got.downloading,
                    "upload_rate": got.upload_rate,
                    "bytes_from_origin": got.bytes_from_origin,
                    "bytes_from_peers": got.bytes_from_peers,
                    "rates": {k: None if v is None else round(v) for k, v in rates.items()},
                }
            )
            tasks.extend({**_task_fields(t), "task_id": t.task_id, "scheduler": hostname} for t in got.tasks)
        tasks.sort(key=lambda t: (-(t["running"] + t["back_to_source"]), -t["peers"], t["task_id"]))
        if not any(s["ok"] for s in shown):
            total = {"from_origin": None, "from_peers": None}
        return {
            "at": round(time.time() * 1000),
            "schedulers": shown,
            "rates": {k: None if v is None else round(v) for k, v in total.items()},
            "tasks": tasks[:OVERVIEW_TASKS],
        }

    async def snapshot(self, task_id: str, principal: Principal) -> dict[str, Any]:
        """The swarm of ``task_id`` as the page draws it (``protocol.md`` §17.11); :class:`SwarmUnavailable`
        when no scheduler knows it (or none answers)."""
        if task_id != self.task_id:
            self.task_id, self.endpoint, self.previous = task_id, "", None
        snap = await self._find(task_id) if not self.endpoint else await self._ask_known(task_id)
        if snap is None or snap.task is None or not _visible(snap, principal):
            self.previous = None
            raise SwarmUnavailable(self._why_not())
        shown = shape(snap, self.previous)
        shown["scheduler"] = {"hostname": self.hostname, "endpoint": self.endpoint, "scheduler_cluster_id": self.cluster_id}
        self.previous = snap
        return shown

    async def _ask_known(self, task_id: str) -> SchedSnapshot | None:
        try:
            snap = await self.inspector.snapshot(self.endpoint, task_id)
        except SwarmUnavailable:
            snap = None
        if snap is not None and snap.task is not None:
            return snap
        self.endpoint, self.previous = "", None  # moved, ended, or its scheduler went away: look again
        return await self._find(task_id)

    async def _find(self, task_id: str) -> SchedSnapshot | None:
        self.errors = []
        candidates = self.inspector.schedulers_for(task_id)
        if not candidates:
            self.errors.append("no scheduler is active")
        for cluster_id, hostname, endpoint in candidates:
            try:
                snap = await self.inspector.snapshot(endpoint, task_id)
            except SwarmUnavailable as e:
                self.errors.append(str(e))
                continue
            if snap.task is not None:
                self.endpoint, self.hostname, self.cluster_id = endpoint, hostname, cluster_id
                event(log, logging.DEBUG, "mgr_swarm_found", task=task_id, scheduler=endpoint)
                return snap
        return None

    def _why_not(self) -> str:
        if self.errors:
            return "; ".join(self.errors[:4])
        return "no scheduler knows this task now (no peer is downloading it or holds it)"


def _visible(snap: SchedSnapshot, principal: Principal) -> bool:
    assert snap.task is not None
    return not principal.confined or snap.task.tenant == str(principal.tenant)


def _rate(now: int, before: int, ms: int) -> float | None:
    if ms <= 0 or now < before:
        return None
    return (now - before) * 1000.0 / ms


def _task_fields(task: InspectTask) -> dict[str, Any]:
    return {
        "url": task.url,
        "tag": task.tag,
        "application": task.application,
        "tenant": task.tenant,
        "state": task.state,
        "content_length": task.content_length,
        "piece_length": task.piece_length,
        "piece_count": task.piece_count,
        "peers": task.peers,
        "pending": task.pending,
        "running": task.running,
        "back_to_source": task.back_to_source,
        "succeeded": task.succeeded,
        "failed": task.failed,
        "finished_pieces": task.finished_pieces,
        "bytes_from_origin": task.bytes_from_origin,
        "bytes_from_peers": task.bytes_from_peers,
        "age_ms": task.age_ms,
    }


def shape(snap: SchedSnapshot, previous: SchedSnapshot | None) -> dict[str, Any]:
    """A ``sched.snapshot`` of one task as the console's ``swarm`` message (``protocol.md`` §17.11), with rates
    from ``previous`` (a snapshot of the same task from the same scheduler, or None)."""
    task = snap.task
    assert task is not None
    ms = snap.clock_ms - previous.clock_ms if previous is not None else 0
    before_task = previous.task if previous is not None and previous.task is not None else None
    before_peers = {p.peer_id: p.finished_pieces for p in previous.peers} if previous is not None else {}
    hosts = {h.host_id: h for h in snap.hosts}
    piece = task.piece_length or 0
    peers = []
    for p in snap.peers:
        host = hosts.get(p.host_id)
        done_before = before_peers.get(p.peer_id)
        rate = None
        if done_before is not None and piece:
            pieces_rate = _rate(p.finished_pieces, done_before, ms)
            rate = None if pieces_rate is None else pieces_rate * piece
        peers.append(
            {
                "peer_id": p.peer_id,
                "host_id": p.host_id,
                "hostname": p.hostname,
                "ip": host.ip if host is not None else "",
                "host_type": host.type if host is not None else "",
                "state": p.state,
                "finished_pieces": p.finished_pieces,
                "parents": list(p.parents),
                "children": p.children,
                "uploaded_pieces": p.uploaded,
                "depth": p.depth,
                "rate": None if rate is None or not math.isfinite(rate) else round(rate),
                "host_upload_rate": host.upload_rate if host is not None else None,
            }
        )
    rates: dict[str, float | None] = {"from_origin": None, "from_peers": None}
    if before_task is not None:
        rates["from_origin"] = _rate(task.bytes_from_origin, before_task.bytes_from_origin, ms)
        rates["from_peers"] = _rate(task.bytes_from_peers, before_task.bytes_from_peers, ms)
    return {
        "at": round(time.time() * 1000),
        "task": _task_fields(task),
        "peers": peers,
        "rates": {k: None if v is None else round(v) for k, v in rates.items()},
        "truncated": snap.truncated,
    }
