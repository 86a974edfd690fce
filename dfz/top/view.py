"""What ``dfz top`` shows, computed from the schedulers' snapshots: the view model, without I/O.

Rules of this file:

* :class:`TopView` takes snapshots (``sched.snapshot``, one scheduler at a time) and what the manager said,
  and answers rows to draw: hosts, tasks, the selected task's swarm as a tree, the schedulers' health, the
  errors. It does no I/O and reads no clock of its own: the caller passes the time (Unix seconds, what
  the errors panel shows) with each update.
* Rates are differences of the schedulers' counters between two snapshots of the same scheduler, divided
  by the difference of the scheduler's own clock (``clock_ms``), so that a slow poll does not inflate
  them. A counter that went down (a host announced again, a task forgotten) gives no rate for that round.
* A host is announced to every scheduler of a cluster, and each scheduler counts only the bytes of its own
  tasks: rows of the same host id are merged (byte rates and slots in use summed; the measured upload rate
  the daemon reports is the host's, the largest is kept).
* Work per update and per frame is O(hosts + tasks + peers of the selected task); what is drawn is cut to
  the rows the terminal has (``limit`` arguments), so that 1,000 hosts cost a sort, not a wall of text.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from ..sched.messages import InspectHost, InspectPeer, InspectTask, SchedSnapshot

HostSortKey = Literal["down", "up", "slots", "peers", "name"]
HOST_SORTS: tuple[HostSortKey, ...] = ("down", "up", "slots", "peers", "name")
"""Orders of the hosts table, in the order the ``s`` key cycles through them."""

MAX_ERRORS = 50


@dataclass
class HostRow:
    host_id: str
    hostname: str
    ip: str
    type: str
    tenant: str
    download_rate: float = 0.0
    """Bytes/s its peers reported getting, from the schedulers' counters."""
    upload_rate: float = 0.0
    """Bytes/s children reported getting from it, from the schedulers' counters."""
    measured_upload_rate: int = 0
    """Bytes/s the daemon measured itself (``sched.host_load``)."""
    uploads: int = 0
    upload_slots: int = 0
    peers: int = 0


@dataclass
class TaskRow:
    task_id: str
    url: str
    scheduler: str
    """The endpoint of the scheduler that holds the task."""
    state: str
    peers: int
    downloading: int
    succeeded: int
    failed: int
    progress: float | None
    """Pieces held over pieces wanted, over all the task's peers (None while the size is unknown)."""
    content_length: int | None
    bytes_from_origin: int
    bytes_from_peers: int
    rate: float = 0.0
    """Bytes/s the swarm got (from the origin and peers), from the task's counters."""
    age: float = 0.0


@dataclass
class SwarmNode:
    """One peer in the drawn tree: under its first parent that came before it (breadth first)."""

    peer_id: str
    hostname: str
    state: str
    progress: float | None
    rate: float
    other_parents: int
    """Parents it has besides the one it is drawn under."""
    depth: int
    children: list[SwarmNode] = field(default_factory=list)


@dataclass
class Swarm:
    task: TaskRow | None
    roots: list[SwarmNode]
    shown: int
    total: int
    """Peers of the task in all (``shown`` of them in the tree)."""


@dataclass
class SchedulerHealth:
    endpoint: str
    name: str = ""
    ok: bool = False
    error: str = ""
    latency_ms: float = 0.0
    last_ok: float | None = None
    hosts: int = 0
    tasks: int = 0
    peers: int = 0
    seed_hosts: int = 0
    downloading: int = 0
    upload_rate: int = 0
    bytes_from_origin: int = 0
    bytes_from_peers: int = 0
    tenant: str = ""
    truncated: bool = False
    hosts_seen: int = 0
    """Hosts in the last snapshot (fewer than ``hosts`` when ``--max-hosts`` cut them)."""


@dataclass
class ManagerInfo:
    """What the manager's REST API said last (rows as it gives them, already checked by the caller)."""

    url: str
    schedulers: list[dict[str, object]] = field(default_factory=list)
    seed_peers: list[dict[str, object]] = field(default_factory=list)
    jobs: list[dict[str, object]] = field(default_factory=list)
    error: str = ""
    notice: str = ""
    """Why nothing is asked (no token): not an error."""
    updated: float | None = None


@dataclass
class _Previous:
    clock_ms: int
    hosts: dict[str, tuple[int, int]]
    tasks: dict[str, int]
    peers: dict[str, int]


@dataclass
class _Polled:
    """The last snapshot of one scheduler, with the rates computed against the one before."""

    snapshot: SchedSnapshot
    host_rates: dict[str, tuple[float, float]]
    task_rates: dict[str, float]
    peer_rates: dict[str, float]


class TopView:
    """The state of ``dfz top`` between frames. See the rules above."""

    def __init__(self, endpoints: Iterable[str], *, host_sort: HostSortKey = "down") -> None:
        self.health: dict[str, SchedulerHealth] = {e: SchedulerHealth(e) for e in endpoints}
        self.host_sort: HostSortKey = host_sort
        self.selected: str | None = None
        """The selected task's id (kept while the task is listed; the first task when it goes)."""
        self.manager: ManagerInfo | None = None
        self.errors: list[tuple[float, str, str]] = []
        """(time, source, message), oldest first; at most :data:`MAX_ERRORS`."""
        self._polled: dict[str, _Polled] = {}
        self._previous: dict[str, _Previous] = {}
        self._tasks: list[TaskRow] = []
        self._task_index: dict[str, int] = {}
        self._hosts_sorted: dict[str, list[HostRow]] = {}

    # --- updates --------------------------------------------------------------------------------------------

    def update(self, endpoint: str, snap: SchedSnapshot, *, now: float, latency: float = 0.0) -> None:
        """A new snapshot of the scheduler at ``endpoint``, received at ``now`` (seconds, any clock)."""
        health = self.health.setdefault(endpoint, SchedulerHealth(endpoint))
        was_ok = health.ok
        health.name, health.ok, health.error = snap.scheduler, True, ""
        health.latency_ms, health.last_ok = latency * 1000, now
        health.hosts, health.tasks, health.peers = snap.hosts_total, snap.tasks_total, snap.peers_total
        health.seed_hosts, health.downloading, health.upload_rate = snap.seed_hosts, snap.downloading, snap.upload_rate
        health.bytes_from_origin, health.bytes_from_peers = snap.bytes_from_origin, snap.bytes_from_peers
        health.tenant, health.truncated, health.hosts_seen = snap.tenant, snap.truncated, len(snap.hosts)
        if not was_ok and health.last_ok is not None and any(src == endpoint for _, src, _ in self.errors[-1:]):
            self.note(now, endpoint, "answers again")

        prev = self._previous.get(endpoint)
        dt = (snap.clock_ms - prev.clock_ms) / 1000 if prev is not None else 0.0
        host_rates: dict[str, tuple[float, float]] = {}
        task_rates: dict[str, float] = {}
        peer_rates: dict[str, float] = {}
        if prev is not None and dt > 0:
            for h in snap.hosts:
                before = prev.hosts.get(h.host_id)
                if before is not None and h.bytes_downloaded >= before[0] and h.bytes_uploaded >= before[1]:
                    host_rates[h.host_id] = ((h.bytes_downloaded - before[0]) / dt, (h.bytes_uploaded - before[1]) / dt)
            for t in snap.tasks:
                got = t.bytes_from_origin + t.bytes_from_peers
                before_t = prev.tasks.get(t.task_id)
                if before_t is not None and got >= before_t:
                    task_rates[t.task_id] = (got - before_t) / dt
            piece_length = snap.task.piece_length if snap.task is not None and snap.task.piece_length else 0
            for p in snap.peers:
                before_p = prev.peers.get(p.peer_id)
                if before_p is not None and p.finished_pieces >= before_p:
                    peer_rates[p.peer_id] = (p.finished_pieces - before_p) * piece_length / dt
        if prev is None or dt > 0:  # a snapshot with the same clock (a retry) keeps the older base
            self._previous[endpoint] = _Previous(
                clock_ms=snap.clock_ms,
                hosts={h.host_id: (h.bytes_downloaded, h.bytes_uploaded) for h in snap.hosts},
                tasks={t.task_id: t.bytes_from_origin + t.bytes_from_peers for t in snap.tasks},
                peers={p.peer_id: p.finished_pieces for p in snap.peers},
            )
        self._polled[endpoint] = _Polled(snap, host_rates, task_rates, peer_rates)
        self._hosts_sorted.clear()
        self._rebuild_tasks()

    def failed(self, endpoint: str, error: str, *, now: float) -> None:
        """The scheduler at ``endpoint`` did not answer (or refused): its health and an error line."""
        health = self.health.setdefault(endpoint, SchedulerHealth(endpoint))
        if health.ok or health.error != error:
            self.note(now, endpoint, error)
        health.ok, health.error = False, error

    def note(self, now: float, source: str, message: str) -> None:
        self.errors.append((now, source, message))
        del self.errors[:-MAX_ERRORS]

    def set_manager(self, info: ManagerInfo, *, now: float) -> None:
        if info.error and (self.manager is None or self.manager.error != info.error):
            self.note(now, "manager", info.error)
        self.manager = info

    # --- keys -------------------------------------------------------------------------------------------------

    def cycle_sort(self) -> HostSortKey:
        self.host_sort = HOST_SORTS[(HOST_SORTS.index(self.host_sort) + 1) % len(HOST_SORTS)]
        return self.host_sort

    def move(self, step: int) -> str | None:
        """Select the task ``step`` rows below (negative: above) the selected one, within the list."""
        if not self._tasks:
            self.selected = None
            return None
        index = self._task_index.get(self.selected, 0) if self.selected is not None else 0
        index = min(max(index + step, 0), len(self._tasks) - 1)
        self.selected = self._tasks[index].task_id
        return self.selected

    def wanted_task(self, endpoint: str) -> str | None:
        """The task id to ask the scheduler at ``endpoint`` for (its swarm), if it holds the selected task.
        Before a task is selected, or when no scheduler is known to hold it, every scheduler is asked."""
        if self.selected is None:
            return None
        row = self._task_row(self.selected)
        if row is None or row.scheduler == endpoint:
            return self.selected
        return None

    # --- rows -----------------------------------------------------------------------------------------------

    def hosts(self, limit: int | None = None) -> list[HostRow]:
        """Hosts of every scheduler, merged by host id, in ``host_sort`` order; the first ``limit``. Merged
        and sorted once per update and order (a frame asks more than once)."""
        rows = self._hosts_sorted.get(self.host_sort)
        if rows is None:
            rows = self._hosts_sorted[self.host_sort] = self._merge_hosts()
        return list(rows) if limit is None else rows[: max(0, limit)]

    def _merge_hosts(self) -> list[HostRow]:
        merged: dict[str, HostRow] = {}
        for polled in self._polled.values():
            for h in polled.snapshot.hosts:
                down, up = polled.host_rates.get(h.host_id, (0.0, 0.0))
                row = merged.get(h.host_id)
                if row is None:
                    merged[h.host_id] = _host_row(h, down, up)
                    continue
                row.download_rate += down
                row.upload_rate += up
                row.uploads += h.uploads
                row.peers += h.peers
                row.measured_upload_rate = max(row.measured_upload_rate, h.upload_rate)
                row.upload_slots = max(row.upload_slots, h.upload_slots)
        rows = list(merged.values())
        rows.sort(key=_HOST_ORDER[self.host_sort])
        return rows

    def hosts_count(self) -> int:
        return len(self.hosts())

    def tasks(self, limit: int | None = None, *, around_selected: bool = True) -> tuple[list[TaskRow], int]:
        """Tasks of every scheduler, most active first, and the index of the selected one in the list
        returned (-1 when none). With ``limit``, a window of rows that keeps the selected one visible."""
        rows = self._tasks
        selected = self._task_index.get(self.selected, -1) if self.selected is not None else -1
        if limit is None or len(rows) <= limit:
            return list(rows), selected
        limit = max(1, limit)
        start = 0
        if around_selected and selected >= limit:
            start = selected - limit + 1
        return rows[start : start + limit], selected - start if selected >= 0 else -1

    def selected_task(self) -> TaskRow | None:
        return self._task_row(self.selected) if self.selected is not None else None

    def swarm(self, limit: int | None = None) -> Swarm:
        """The selected task's peers as a tree, seed (roots) first, each peer under its first parent listed
        before it; at most ``limit`` peers (breadth first, so the top of the tree is what is kept)."""
        task = self.selected_task()
        if task is None:
            return Swarm(None, [], 0, 0)
        polled = self._polled.get(task.scheduler)
        if polled is None or polled.snapshot.task is None or polled.snapshot.task.task_id != task.task_id:
            return Swarm(task, [], 0, task.peers)
        peers = polled.snapshot.peers
        if limit is not None:
            peers = peers[: max(0, limit)]
        return Swarm(task, build_tree(peers, polled.snapshot.task, polled.peer_rates), len(peers), task.peers)

    # --- internals ------------------------------------------------------------------------------------------

    def _task_row(self, task_id: str) -> TaskRow | None:
        index = self._task_index.get(task_id)
        return self._tasks[index] if index is not None else None

    def _rebuild_tasks(self) -> None:
        rows: dict[str, TaskRow] = {}
        for endpoint, polled in self._polled.items():
            listed = list(polled.snapshot.tasks)
            if polled.snapshot.task is not None and all(t.task_id != polled.snapshot.task.task_id for t in listed):
                listed.append(polled.snapshot.task)  # the selected task, out of the page: keep it listed
            for t in listed:
                if t.task_id not in rows:
                    rows[t.task_id] = _task_row(t, endpoint, polled.task_rates.get(t.task_id, 0.0))
        ordered = sorted(rows.values(), key=lambda r: (-r.downloading, -r.rate, -r.peers, r.task_id))
        self._tasks = ordered
        self._task_index = {r.task_id: i for i, r in enumerate(ordered)}
        if self.selected not in self._task_index:
            self.selected = ordered[0].task_id if ordered else None


def _host_row(h: InspectHost, down: float, up: float) -> HostRow:
    return HostRow(
        host_id=h.host_id,
        hostname=h.hostname,
        ip=h.ip,
        type=h.type,
        tenant=h.tenant,
        download_rate=down,
        upload_rate=up,
        measured_upload_rate=h.upload_rate,
        uploads=h.uploads,
        upload_slots=h.upload_slots,
        peers=h.peers,
    )


_HOST_ORDER = {
    "down": lambda r: (-r.download_rate, -r.upload_rate, r.hostname, r.host_id),
    "up": lambda r: (-max(r.upload_rate, r.measured_upload_rate), -r.download_rate, r.hostname, r.host_id),
    "slots": lambda r: (-r.uploads, r.hostname, r.host_id),
    "peers": lambda r: (-r.peers, r.hostname, r.host_id),
    "name": lambda r: (r.hostname, r.host_id),
}


def _task_row(t: InspectTask, endpoint: str, rate: float) -> TaskRow:
    progress = None
    if t.piece_count and t.peers:
        progress = min(1.0, t.finished_pieces / (t.piece_count * t.peers))
    return TaskRow(
        task_id=t.task_id,
        url=t.url,
        scheduler=endpoint,
        state=t.state,
        peers=t.peers,
        downloading=t.running + t.back_to_source,
        succeeded=t.succeeded,
        failed=t.failed,
        progress=progress,
        content_length=t.content_length,
        bytes_from_origin=t.bytes_from_origin,
        bytes_from_peers=t.bytes_from_peers,
        rate=rate,
        age=t.age_ms / 1000,
    )


def build_tree(peers: list[InspectPeer], task: InspectTask, rates: dict[str, float] | None = None) -> list[SwarmNode]:
    """The roots of the swarm's tree: ``peers`` in breadth-first order (``sched.snapshot``), each one under
    the first of its parents that comes before it in that order; a peer with no such parent (a root, or
    one whose parents were cut off) is a root. The DAG's other edges are counted in ``other_parents``."""
    rates = rates or {}
    nodes: dict[str, SwarmNode] = {}
    roots: list[SwarmNode] = []
    count = task.piece_count or 0
    for p in peers:
        node = SwarmNode(
            peer_id=p.peer_id,
            hostname=p.hostname,
            state=p.state,
            progress=min(1.0, p.finished_pieces / count) if count else None,
            rate=rates.get(p.peer_id, 0.0),
            other_parents=max(0, len(p.parents) - 1),
            depth=p.depth,
        )
        parent = next((nodes[q] for q in p.parents if q in nodes), None)
        if parent is None:
            node.other_parents = len(p.parents)
            roots.append(node)
        else:
            parent.children.append(node)
        nodes.setdefault(p.peer_id, node)
    return roots


def human_rate(rate: float) -> str:
    """Bytes/s as a short figure: ``0``, ``512 B/s``, ``1.5 MB/s`` (powers of 1000, as network rates go)."""
    if rate < 1:
        return "0"
    return f"{human_bytes(rate)}/s"


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # not reached
