"""The scheduler core: hosts, tasks and peers in memory, driven by events, answering with actions.

Rules of this file:

* One writer. :meth:`SchedulerCore.apply` is the only entry point that changes the model. It applies one
  event completely and returns the actions decided, in order. No sockets, no trio, no wall clock: time
  comes from the injected clock, read once per event, so a fake clock makes every test exact.
* An event is refused whole or applied whole. Handlers check everything that can make them raise
  (unknown ids, invalid transitions, malformed values) before they change anything, so a
  :class:`~dfz.sched.errors.SchedulerError` leaves the model as it was.
* A report that contradicts what the task already knows from the origin-fetching peer (a piece digest,
  the content length, the piece length, the whole-file digest) is the reporter's fault: the reporter is
  failed (``FailPeer``) and the task's facts stay as they were.
* The DAG rules hold after every event and are enforced here, in one place (``_candidates``, ``_link``):
  parent and child download the same task; a parent is never on the child's host; there is never a
  cycle; a host never serves more children than its upload slots, counted over all its peers and tasks.
  Only ``running`` peers have parents; only ``running``, ``back_to_source`` and ``succeeded`` peers have
  children. A bad parent (below) and a parent the child blocked are never chosen. Which of the allowed
  candidates are best is the evaluator's decision (``evaluator.py``).
* Deterministic. Randomness (the candidate sample, the retry jitter) comes from one generator seeded at
  construction, and every iteration that decides something runs over dicts or lists in a known order.
* A decision costs O(``candidate_parent_sample``), not O(peers of the task): candidates are sampled from
  ``Task.open``, the task's peers that can take a child now, which ``_link``, ``_unlink`` and
  ``_set_state`` keep current.
* State transitions go through the tables of ``state.py`` (``_set_state`` / ``_set_task_state``).
* Tenants never meet. A task is of the tenant of the host that made it; a host of another tenant is refused
  its peers (``TenantMismatch``), a candidate parent is always of the child's tenant (checked again in
  ``_candidates``, although task ids already differ between tenants), only a seed host of the task's tenant
  is triggered, and a host's tenant never changes.

Theory of operation.

* **Register.** When the task has a *source* (a peer fetching from the origin, or holding the whole
  file), the new peer gets parents (``PushParents``) or waits. When it has none, the core finds one: a
  peer of the task on a seed host goes to the origin itself; otherwise a seed host is triggered
  (``TriggerSeed``: its daemon registers a peer, which becomes the root) and everybody waits for it; with
  no seed host left to try, the first peer that may fetch from the origin is sent there (``BackToSource``).
* **Waiting.** A peer that needs parents and has none is retried at the end of any event after which its
  task has a new possible parent (free of charge), and every ``retry_interval`` give or take
  ``retry_jitter`` (an attempt). After ``retry_limit`` attempts without a parent it goes back to source if
  it may and the task's cap of peers at the origin allows; otherwise it fails with a reason that says
  which.
* **Bad parents.** Children report what each piece cost them and from which parent; each parent keeps its
  latest ``bad_parent_window`` costs (``PieceCosts``). A parent whose latest cost is far outside the others
  (more than ``bad_parent_ratio`` times their mean while the window fills, more than mean +
  ``bad_parent_sigmas`` standard deviations once it is full, and at least ``bad_parent_cost_floor`` above
  the mean) is a bad parent for ``bad_parent_timeout``, or until a newer cost is normal again. A child that
  reports a failed piece from a parent never gets that parent again (``Peer.avoid``) and gets new parents.
* **Load.** Daemons report their measured upload rate, requests in flight and children served
  (``HostLoad``, about once per second); the evaluator weighs them.
* **Losing a peer** (it failed, left, or its host went away or fell silent): its edges are cut; if its
  task lost its last source, a new one is found as at registration; then its children get new parents
  pushed at once. When the peer was the last source and the *origin* failed, the task fails, and so does
  every peer waiting on it, with the origin's reason.
* **Digests.** The peer fetching from the origin reports each piece's BLAKE3 digest; the core records it
  and forwards it to every peer that downloads from parents (``ForwardDigests``). A peer that registers
  later receives every digest known so far. A peer reporting a piece from a parent for which no digest is
  known cannot have verified it: the report is refused.
* **Time.** ``Tick`` removes hosts silent for ``host_timeout`` with their peers (their children get new
  parents at once), runs the retries that are due, forgets failed peers after ``failed_peer_ttl`` and
  succeeded ones that served nobody for ``peer_ttl``, and tasks without peers after ``task_ttl``.
* **Caps.** A task holds at most ``max_peers_per_task`` peers: a registration beyond it evicts finished
  leaves (failed peers first, then the longest idle succeeded peers without children, keeping a source)
  or, when there are none, is refused (``TaskFull``).
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from math import gcd
from typing import assert_never

from ..tasks import MAX_PIECES  # one limit, dfz/tasks.py's: it also bounds what a bad report could grow
from .actions import (
    Action,
    BackToSource,
    FailPeer,
    ForwardDigests,
    ForwardTaskInfo,
    HostRemoved,
    ParentCandidate,
    PushParents,
    TriggerSeed,
)
from .config import SchedulerConfig
from .errors import InvalidEvent, TaskFull, TenantMismatch, UnknownHost, UnknownPeer
from .evaluator import Evaluator, MultiFeatureEvaluator, evaluator_for
from .events import (
    AnnounceHost,
    AnnounceTask,
    Event,
    ForgetTask,
    HostHeartbeat,
    HostLeft,
    HostLoad,
    PeerFailed,
    PeerFinished,
    PeerLeft,
    PieceFailed,
    PieceFinished,
    RegisterPeer,
    RescheduleRequest,
    TaskMetadataKnown,
    Tick,
)
from .model import Host, Peer, PieceCosts, Task, network_keys
from .state import (
    DOWNLOADING_STATES,
    PARENT_STATES,
    PEER_TRANSITIONS,
    SOURCE_STATES,
    TASK_TRANSITIONS,
    WAITING_STATES,
    PeerState,
    PeerTrigger,
    TaskTrigger,
    next_peer_state,
    next_task_state,
)

MAX_WANTED_RANGES = 16
"""Wanted byte ranges a task remembers for its seed (as many as ``sched.register_peer`` carries)."""

Clock = Callable[[], float]

TOP_UPS_PER_EVENT = 4
"""Running peers short of parents that take a new serving peer as a parent in one event, at most."""
TOP_UP_ANCESTORS = 64
"""A new serving peer with more peers above it than this tops nobody up (the look for a cycle is bounded)."""
TOP_UP_CHECKS = 16
"""Running peers short of parents looked at per new serving peer, at most (the cost of an event stays bounded)."""


_HEX = frozenset("0123456789abcdef")


class InvariantViolation(AssertionError):
    """:meth:`SchedulerCore.check_invariants` found the model inconsistent (a bug in the core)."""


class SchedulerCore:
    """The sans-I/O scheduler. Feed it events with :meth:`apply`; carry out the actions it returns.

    How a shell drives it: one trio task owns the core and applies events one at a time, in arrival
    order. Each fabric message becomes one event (after checking that the session sending it is the host
    of the peer it names); a refused event (:class:`~dfz.sched.errors.SchedulerError`) becomes an error
    reply. The returned actions are carried out in order: peer-directed ones over the session of the
    peer's host, ``TriggerSeed`` over the seed host's. A ``Tick`` is applied at :meth:`next_deadline`
    (or at a fixed rate well under ``retry_interval``). A push that cannot be delivered is reported back
    as ``PeerLeft`` or ``HostLeft``.

    ``hosts``, ``tasks`` and ``peers`` (id → record) are readable by the shell and by evaluators; only
    :meth:`apply` writes them. ``evaluator`` defaults to the one the config names (normally a
    :class:`~dfz.sched.evaluator.MultiFeatureEvaluator` with the config's weights). ``seed`` (by default
    ``config.seed``) seeds the core's random choices: candidate samples, retry jitter.
    """

    def __init__(
        self,
        config: SchedulerConfig | None = None,
        *,
        clock: Clock = time.monotonic,
        evaluator: Evaluator | None = None,
        seed: int | None = None,
    ) -> None:
        self.config = config or SchedulerConfig()
        self.clock = clock
        self.evaluator: Evaluator = evaluator or evaluator_for(self.config)
        self.hosts: dict[str, Host] = {}
        self.tasks: dict[str, Task] = {}
        self.peers: dict[str, Peer] = {}
        self._rng = random.Random(self.config.seed if seed is None else seed)
        self._seed_hosts: dict[str, Host] = {}
        self._by_last_seen: OrderedDict[str, Host] = OrderedDict()
        self._retries: list[tuple[float, int, Peer]] = []
        self._expiries: list[tuple[float, int, Peer | Task]] = []
        """Failed and succeeded peers, and tasks without peers, by the time they may be forgotten. An entry
        may be stale (the peer served a child since, the task got peers): ``_collect`` checks again."""
        self._seq = itertools.count()
        self._dirty: dict[Task, None] = {}
        self._grown: dict[Task, list[Peer]] = {}  # peers that began to serve in this event, by task
        self._out: list[Action] = []
        self._now = 0.0

    # --- the entry point --------------------------------------------------------------------------------

    def apply(self, event: Event) -> list[Action]:
        """Apply one event and return the actions to carry out, in order.

        Raises a :class:`~dfz.sched.errors.SchedulerError` subclass, with nothing changed, when the event
        names an unknown host or peer, asks for a transition the state tables forbid, or carries values
        that do not fit the model.
        """
        self._now = self.clock()
        self._out = []
        self._dirty = {}
        self._grown = {}
        match event:
            case AnnounceHost():
                self._announce_host(event)
            case HostHeartbeat():
                self._touch(self._host(event.host_id))
            case HostLoad():
                self._host_load(event)
            case HostLeft():
                self._remove_hosts([self._host(event.host_id)], event.reason)
            case RegisterPeer():
                self._register(event)
            case AnnounceTask():
                self._announce_task(event)
            case TaskMetadataKnown():
                self._metadata_known(event)
            case PieceFinished():
                self._piece_finished(event)
            case PieceFailed():
                self._piece_failed(event)
            case PeerFinished():
                self._peer_finished(event)
            case PeerFailed():
                self._peer_failed(event)
            case PeerLeft():
                peer = self._peer(event.peer_id)
                self._touch(peer.host)
                self._drop_peers([peer], PeerTrigger.LEAVE)
            case RescheduleRequest():
                self._reschedule_request(event)
            case ForgetTask():
                self._forget_task(event)
            case Tick():
                self._tick()
            case _:
                assert_never(event)
        self._retry_dirty_tasks()
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float | None:
        """The clock time at which a ``Tick`` may have work to do (a retry, a host timeout, a peer or task
        to forget), or None.

        The shell may sleep until then instead of ticking at a fixed rate; an earlier tick is harmless.
        """
        deadlines = []
        if self._retries:
            deadlines.append(self._retries[0][0])
        if self._expiries:
            deadlines.append(self._expiries[0][0])
        for host in self._by_last_seen.values():
            deadlines.append(host.last_seen + self.config.host_timeout)
            break
        return min(deadlines, default=None)

    # --- hosts ------------------------------------------------------------------------------------------

    def _announce_host(self, ev: AnnounceHost) -> None:
        if not ev.host_id:
            raise InvalidEvent("a host needs a non-empty id")
        if not 0 <= ev.port <= 0xFFFF:
            raise InvalidEvent(f"host {ev.host_id}: port {ev.port} is not a TCP port")
        if ev.upload_slots < 0 or ev.upload_capacity < 0:
            raise InvalidEvent(f"host {ev.host_id}: upload slots and capacity cannot be negative")
        idc_key, location_key = network_keys(ev.idc, ev.location)
        host = self.hosts.get(ev.host_id)
        if host is not None and host.tenant != ev.tenant:
            raise TenantMismatch(f"host {host.id}", ev.tenant, host.tenant)
        if host is None:
            host = Host(
                id=ev.host_id,
                hostname=ev.hostname,
                ip=ev.ip,
                port=ev.port,
                type=ev.type,
                idc=ev.idc,
                location=ev.location,
                upload_capacity=ev.upload_capacity,
                upload_slots=ev.upload_slots,
                last_seen=self._now,
                idc_key=idc_key,
                location_key=location_key,
                tenant=ev.tenant,
            )
            self.hosts[host.id] = host
            self._by_last_seen[host.id] = host
        else:
            if ev.upload_slots > host.upload_slots:
                for peer in host.peers.values():
                    self._dirty[peer.task] = None  # more slots: waiting peers may use them now
            if ev.ip != host.ip or ev.port != host.port:
                for peer in host.peers.values():
                    peer.candidate = None  # pushes name the new address from now on
            host.hostname, host.ip, host.port, host.type = ev.hostname, ev.ip, ev.port, ev.type
            host.idc, host.location = ev.idc, ev.location
            host.idc_key, host.location_key = idc_key, location_key
            host.upload_capacity, host.upload_slots = ev.upload_capacity, ev.upload_slots
            host.scored_by = None
        if host.is_seed:
            self._seed_hosts[host.id] = host
        else:
            self._seed_hosts.pop(host.id, None)
        self._touch(host)
        self._refresh_open(host)
        if host.uploads > host.upload_slots:
            self._shed_children(host)

    def _host_load(self, ev: HostLoad) -> None:
        host = self._host(ev.host_id)
        if ev.upload_rate < 0 or ev.uploads_in_flight < 0 or ev.upload_peers < 0:
            raise InvalidEvent(f"host {host.id}: a load report cannot be negative")
        host.upload_rate = ev.upload_rate
        host.uploads_in_flight = ev.uploads_in_flight
        host.upload_peers = ev.upload_peers
        host.scored_by = None
        self._touch(host)

    def _shed_children(self, host: Host) -> None:
        """The host announced fewer slots than it uses: its newest children get other parents."""
        edges = [(parent, child) for parent in host.peers.values() for child in parent.children]
        excess = host.uploads - host.upload_slots
        orphans: dict[Peer, None] = {}
        for parent, child in edges[len(edges) - excess :]:
            self._unlink(parent, child)
            orphans[child] = None
        for child in orphans:
            self._reschedule(child)

    def _remove_hosts(self, hosts: list[Host], reason: str) -> None:
        # All out of the registries first, so that nothing decided below (a new parent, a seed trigger)
        # points at a host that is going too.
        for host in hosts:
            del self.hosts[host.id]
            del self._by_last_seen[host.id]
            self._seed_hosts.pop(host.id, None)
            self._out.append(HostRemoved(host.id, reason))
        self._drop_peers([peer for host in hosts for peer in host.peers.values()], PeerTrigger.LEAVE)

    def _touch(self, host: Host) -> None:
        host.last_seen = self._now
        self._by_last_seen.move_to_end(host.id)

    def _touch_peer(self, peer: Peer) -> None:
        peer.updated_at = self._now
        self._touch(peer.host)

    # --- registration -----------------------------------------------------------------------------------

    def _register(self, ev: RegisterPeer) -> None:
        host = self._host(ev.host_id)
        if not ev.peer_id or not ev.task_id:
            raise InvalidEvent("a peer registration needs a non-empty peer id and task id")
        if ev.piece_length is not None and ev.piece_length <= 0:
            raise InvalidEvent(f"peer {ev.peer_id}: piece length {ev.piece_length} is not positive")
        existing = self.peers.get(ev.peer_id)
        if existing is not None:
            if existing.task.id != ev.task_id or existing.host is not host:
                raise InvalidEvent(
                    f"peer id {ev.peer_id!r} is already registered for task {existing.task.id} "
                    f"on host {existing.host.id}: peer ids must be unique"
                )
            if existing.state not in WAITING_STATES | DOWNLOADING_STATES:
                raise InvalidEvent(f"peer {ev.peer_id} is {existing.state.value}: register a new peer id to download again")
            self._touch_peer(existing)
            self._resend(existing)
            return
        task = self.tasks.get(ev.task_id)
        if task is not None and task.tenant != host.tenant:
            raise TenantMismatch(f"task {task.id}", host.tenant, task.tenant)
        if task is not None and None not in (ev.piece_length, task.piece_length) and ev.piece_length != task.piece_length:
            raise InvalidEvent(
                f"peer {ev.peer_id} asks piece length {ev.piece_length} for task {task.id}, "
                f"which has piece length {task.piece_length}: the task id should differ"
            )
        evicted = self._make_room(task)

        if task is None:
            task = Task(
                id=ev.task_id,
                url=ev.url,
                tag=ev.tag,
                application=ev.application,
                headers=ev.headers,
                created_at=self._now,
                piece_length=ev.piece_length,
                tenant=host.tenant,
            )
            self.tasks[task.id] = task
        task.emptied_at = None
        if evicted:
            self._drop_peers(evicted, PeerTrigger.LEAVE)
        peer = Peer(
            id=ev.peer_id,
            task=task,
            host=host,
            back_to_source_allowed=ev.back_to_source_allowed,
            created_at=self._now,
            updated_at=self._now,
        )
        self.peers[peer.id] = peer
        task.peers[peer.id] = peer
        task.counts[PeerState.PENDING] += 1
        host.peers[peer.id] = peer
        self._touch(host)
        if task.seed_host == host.id:
            task.seed_host = None  # the triggered seed answered
        self._send_known(peer)
        if ev.wanted:
            self._want(task, ev.wanted)
        if task.sources == 0:
            self._ensure_source(task)
            if peer.state is not PeerState.PENDING:
                return
        self._reschedule(peer)

    def _announce_task(self, ev: AnnounceTask) -> None:
        """A peer born ``succeeded``: the daemon holds the whole file (see :class:`AnnounceTask`)."""
        host = self._host(ev.host_id)
        if not ev.peer_id or not ev.task_id:
            raise InvalidEvent("a task announcement needs a non-empty peer id and task id")
        if ev.peer_id in self.peers:
            raise InvalidEvent(f"peer id {ev.peer_id!r} is already registered: peer ids must be unique")
        if ev.piece_length <= 0 or ev.content_length < 0:
            raise InvalidEvent(f"peer {ev.peer_id}: content length {ev.content_length}, piece length {ev.piece_length}")
        count = -(-ev.content_length // ev.piece_length)
        if count > MAX_PIECES:
            raise InvalidEvent(f"peer {ev.peer_id}: more than {MAX_PIECES} pieces; use a larger piece length")
        digests = dict(ev.digests)
        if sorted(digests) != list(range(count)) or not all(_is_hex(d) for d in digests.values()) or not _is_hex(ev.digest):
            raise InvalidEvent(f"peer {ev.peer_id}: a whole task is announced with one digest for each of its {count} pieces")
        task = self.tasks.get(ev.task_id)
        if task is not None and task.tenant != host.tenant:
            raise TenantMismatch(f"task {task.id}", host.tenant, task.tenant)
        if task is not None:
            conflict = _metadata_conflict(task, ev.content_length, ev.piece_length)
            if conflict is None and task.digest is not None and task.digest != ev.digest:
                conflict = f"whole-file digest {ev.digest} differs from {task.digest}"
            if conflict is None:
                wrong = [k for k, d in task.digests.items() if digests.get(k) != d]
                if wrong:
                    conflict = f"piece {wrong[0]} has another digest than the one reported from the origin"
            if conflict is not None:
                raise InvalidEvent(f"peer {ev.peer_id} announces task {task.id}, but {conflict} (the file changed?)")
            evicted = self._make_room(task)
            task.emptied_at = None
            if evicted:
                self._drop_peers(evicted, PeerTrigger.LEAVE)
        else:
            task = Task(
                id=ev.task_id,
                url=ev.url,
                tag=ev.tag,
                application=ev.application,
                headers=(),
                created_at=self._now,
                tenant=host.tenant,
            )
            self.tasks[task.id] = task

        new_info = task.content_length is None or task.piece_length is None or task.digest is None
        task.piece_length, task.content_length = ev.piece_length, ev.content_length
        if task.digest is None:
            task.digest = ev.digest
        fresh = {k: d for k, d in digests.items() if k not in task.digests}
        task.digests.update(fresh)
        # Born succeeded: no transition of the peer table applies to a peer that did not download here.
        peer = Peer(
            id=ev.peer_id,
            task=task,
            host=host,
            back_to_source_allowed=False,
            created_at=self._now,
            updated_at=self._now,
            state=PeerState.SUCCEEDED,
            finished=(1 << count) - 1,
            finished_count=count,
        )
        self.peers[peer.id] = peer
        task.peers[peer.id] = peer
        task.counts[PeerState.SUCCEEDED] += 1
        host.peers[peer.id] = peer
        self._open(peer)
        self._expire_later(peer)
        self._touch(host)
        if task.seed_host == host.id:
            task.seed_host = None
        self._set_task_state(task, TaskTrigger.DOWNLOAD)
        self._set_task_state(task, TaskTrigger.SUCCEED)
        to = self._downloaders(task)
        if to and new_info:
            self._out.append(_task_info(task, to))
        if to and fresh:
            self._out.append(ForwardDigests(task.id, to, fresh))
        self._dirty[task] = None  # a new possible parent for the peers waiting

    def _make_room(self, task: Task | None) -> list[Peer]:
        """The peers to evict so that one more fits in the task (see *Caps*); changes nothing.

        Raises ``TaskFull`` when the task is full of peers that cannot go.
        """
        limit = self.config.max_peers_per_task
        if task is None or len(task.peers) < limit:
            return []
        need = len(task.peers) - limit + 1
        out = [p for p in task.peers.values() if p.state is PeerState.FAILED][:need]
        if len(out) < need:
            spare = task.sources - 1  # evicting the last source would send somebody to the origin again
            leaves = [p for p in task.peers.values() if p.state is PeerState.SUCCEEDED and not p.children]
            leaves.sort(key=lambda p: (p.updated_at, p.id))
            out.extend(leaves[: max(0, min(need - len(out), spare))])
        if len(out) < need:
            raise TaskFull(task.id, limit)
        return out

    def _resend(self, peer: Peer) -> None:
        """A peer registered again (a retried request): tell it what it was told already."""
        self._send_known(peer)
        if peer.state is PeerState.BACK_TO_SOURCE:
            self._out.append(BackToSource(peer.id, peer.task.id, "fetch the task from the origin (as assigned before)"))
        elif peer.parents:
            self._out.append(PushParents(peer.id, peer.task.id, _candidates_of(peer.parents)))

    def _send_known(self, peer: Peer) -> None:
        task = peer.task
        if task.piece_length is not None or task.content_length is not None or task.digest is not None:
            self._out.append(_task_info(task, (peer.id,)))
        if task.digests:
            self._out.append(ForwardDigests(task.id, (peer.id,), dict(task.digests)))

    # --- reports --------------------------------------------------------------------------------------

    def _metadata_known(self, ev: TaskMetadataKnown) -> None:
        peer = self._peer(ev.peer_id)
        if peer.state is not PeerState.BACK_TO_SOURCE:
            raise InvalidEvent(
                f"peer {peer.id} reported task metadata but is {peer.state.value}: "
                "only a peer fetching from the origin reports it"
            )
        if ev.piece_length <= 0 or (ev.content_length is not None and ev.content_length < 0):
            raise InvalidEvent(f"peer {peer.id}: content length {ev.content_length}, piece length {ev.piece_length}")
        if ev.content_length is not None and -(-ev.content_length // ev.piece_length) > MAX_PIECES:
            raise InvalidEvent(f"peer {peer.id}: more than {MAX_PIECES} pieces; use a larger piece length")
        task = peer.task
        self._touch_peer(peer)
        conflict = _metadata_conflict(task, ev.content_length, ev.piece_length)
        if conflict is not None:
            self._fail(peer, conflict)
            return
        changed = task.piece_length is None or (task.content_length is None and ev.content_length is not None)
        task.piece_length = ev.piece_length
        if ev.content_length is not None:
            task.content_length = ev.content_length
        if changed:
            self._forward_task_info(task)

    def _piece_finished(self, ev: PieceFinished) -> None:
        peer = self._peer(ev.peer_id)
        task = peer.task
        if peer.state not in DOWNLOADING_STATES:
            raise InvalidEvent(f"peer {peer.id} reported piece {ev.piece} but is {peer.state.value}")
        count = task.piece_count
        if not 0 <= ev.piece < (MAX_PIECES if count is None else count):
            raise InvalidEvent(f"peer {peer.id}: piece {ev.piece} is out of range (task has {count} pieces)")
        if not _is_hex(ev.digest):
            raise InvalidEvent(f"peer {peer.id}: piece digest {ev.digest!r} is not a lowercase hex string")
        if ev.size < 0 or ev.cost < 0:
            raise InvalidEvent(f"peer {peer.id}: piece size and cost cannot be negative")
        known = task.digests.get(ev.piece)
        if ev.parent_id is None:
            if peer.state is not PeerState.BACK_TO_SOURCE:
                raise InvalidEvent(
                    f"peer {peer.id} reported piece {ev.piece} from the origin, but it was not sent back to source"
                )
        elif ev.parent_id == peer.id:
            raise InvalidEvent(f"peer {peer.id} reported piece {ev.piece} from itself")
        elif known is None:
            raise InvalidEvent(
                f"peer {peer.id} reported piece {ev.piece} from parent {ev.parent_id}, but no digest from the "
                "origin is known for it yet: verify every piece against the scheduler's digests before reporting it"
            )

        self._touch_peer(peer)
        if known is not None and known != ev.digest:
            self._fail(
                peer,
                f"piece {ev.piece} has digest {ev.digest}, but the peer that fetched it from the origin reported "
                f"{known}: the data is corrupt, or the file changed at the origin",
            )
            return
        if not peer.has_piece(ev.piece):
            peer.finished |= 1 << ev.piece
            peer.finished_count += 1
        peer.host.bytes_downloaded += ev.size
        if ev.parent_id is None:
            task.bytes_from_origin += ev.size
            if known is None:
                task.digests[ev.piece] = ev.digest
                to = self._downloaders(task)
                if to:
                    self._out.append(ForwardDigests(task.id, to, {ev.piece: ev.digest}))
        else:
            task.bytes_from_peers += ev.size
            parent = self.peers.get(ev.parent_id)
            if parent is not None and parent.task is task:
                parent.uploaded += 1
                parent.host.bytes_uploaded += ev.size
                self._record_cost(parent, ev.cost)

    def _record_cost(self, parent: Peer, cost: float) -> None:
        """A child got a piece from ``parent`` in ``cost`` seconds: judge the parent (see *Bad parents*)."""
        cfg = self.config
        costs = parent.costs
        if costs is None:
            costs = parent.costs = PieceCosts(cfg.bad_parent_window)
        costs.add(round(cost * 1000))
        if costs.latest_is_outlier(cfg.bad_parent_ratio, cfg.bad_parent_sigmas, cfg.bad_parent_cost_floor * 1000):
            costs.bad_until = parent.task.bad[parent] = self._now + cfg.bad_parent_timeout
        else:
            costs.bad_until = 0.0
            parent.task.bad.pop(parent, None)

    def _piece_failed(self, ev: PieceFailed) -> None:
        peer = self._peer(ev.peer_id)
        if peer.state not in DOWNLOADING_STATES:
            raise InvalidEvent(f"peer {peer.id} reported a failed piece but is {peer.state.value}")
        if ev.parent_id == peer.id:
            raise InvalidEvent(f"peer {peer.id} reported a failed piece from itself")
        self._touch_peer(peer)
        _avoid(peer, ev.parent_id)
        parent = self.peers.get(ev.parent_id)
        if parent is not None and parent.task is peer.task:
            parent.upload_failures += 1
        if peer.state is PeerState.RUNNING:
            self._reschedule(peer)

    def _peer_finished(self, ev: PeerFinished) -> None:
        peer = self._peer(ev.peer_id)
        next_peer_state(peer.state, PeerTrigger.SUCCEED, peer.id)
        task = peer.task
        if ev.content_length < 0 or not ev.digest:
            raise InvalidEvent(f"peer {peer.id}: a finished download needs a digest and a content length")
        from_origin = peer.state is PeerState.BACK_TO_SOURCE
        if task.content_length is None:
            if not from_origin:
                raise InvalidEvent(f"peer {peer.id} finished before the origin-fetching peer reported the file's size")
            if task.piece_length is None:
                raise InvalidEvent(f"peer {peer.id} finished without reporting the piece length (TaskMetadataKnown)")
            conflict = _metadata_conflict(task, ev.content_length, task.piece_length)
        elif ev.content_length != task.content_length:
            conflict = f"finished with {ev.content_length} bytes, but the file has {task.content_length}"
        else:
            conflict = None
        if conflict is None and task.digest is not None and ev.digest != task.digest:
            conflict = f"whole-file digest {ev.digest} differs from {task.digest}, reported from the origin"
        if conflict is None:
            assert task.piece_length is not None
            count = -(-ev.content_length // task.piece_length)
            if peer.finished != (1 << count) - 1:
                raise InvalidEvent(f"peer {peer.id} reported finished but reported only {peer.finished_count} of {count} pieces")

        self._touch_peer(peer)
        if conflict is not None:
            self._fail(peer, conflict)
            return
        new_info = task.content_length is None or (from_origin and task.digest is None)
        task.content_length = ev.content_length
        if from_origin and task.digest is None:
            task.digest = ev.digest
        task.tried_seed_hosts.discard(peer.host.id)  # a seed that delivered may be asked again
        for parent in list(peer.parents):
            self._unlink(parent, peer)
        self._set_state(peer, PeerTrigger.SUCCEED)
        self._set_task_state(task, TaskTrigger.SUCCEED)
        if new_info:
            self._forward_task_info(task)

    def _peer_failed(self, ev: PeerFailed) -> None:
        peer = self._peer(ev.peer_id)
        next_peer_state(peer.state, PeerTrigger.FAIL, peer.id)
        self._touch_peer(peer)
        origin_failure = ev.reason if ev.origin_error and peer.state is PeerState.BACK_TO_SOURCE else None
        self._drop_peers([peer], PeerTrigger.FAIL, origin_failure)

    def _reschedule_request(self, ev: RescheduleRequest) -> None:
        peer = self._peer(ev.peer_id)
        if peer.state not in WAITING_STATES:
            raise InvalidEvent(f"peer {peer.id} is {peer.state.value}: only a peer downloading from parents asks for new ones")
        self._touch_peer(peer)
        for avoided in ev.avoid:
            if avoided != peer.id:
                _avoid(peer, avoided)
        if peer.task.sources == 0:
            self._ensure_source(peer.task)
            if peer.state not in WAITING_STATES:
                return
        self._reschedule(peer)

    def _forget_task(self, ev: ForgetTask) -> None:
        task = self.tasks.get(ev.task_id)
        if task is None:
            return
        peers = list(task.peers.values())
        # Every peer leaves: nobody is left to need a source (no seed trigger, no back-to-source) or new parents.
        self._drop_peers(peers, PeerTrigger.LEAVE)
        if self.tasks.get(task.id) is task:
            del self.tasks[task.id]  # at once, even with a task_ttl (a stale expiry entry is skipped)
        task.emptied_at = None

    # --- time -------------------------------------------------------------------------------------------

    def _tick(self) -> None:
        horizon = self._now - self.config.host_timeout
        silent: list[Host] = []
        for host in self._by_last_seen.values():
            if host.last_seen > horizon:
                break
            silent.append(host)
        if silent:
            self._remove_hosts(silent, f"no heartbeat for {self.config.host_timeout:g} s")
        while self._retries and self._retries[0][0] <= self._now:
            due, _, peer = heapq.heappop(self._retries)
            if peer.retry_at != due or peer not in peer.task.waiting:
                continue  # scheduled, gone, or re-queued since
            if peer.task.sources == 0:
                self._ensure_source(peer.task)
                if peer not in peer.task.waiting:
                    continue
            self._reschedule(peer)
        self._collect()

    def _collect(self) -> None:
        """Forget the peers and tasks whose time to live ran out (see *Time*)."""
        cfg, now = self.config, self._now
        expired: list[Peer] = []
        while self._expiries and self._expiries[0][0] <= now:
            _, _, item = heapq.heappop(self._expiries)
            if isinstance(item, Task):
                task = item
                if self.tasks.get(task.id) is task and task.emptied_at is not None and task.emptied_at + cfg.task_ttl <= now:
                    del self.tasks[task.id]
                continue  # else it has peers again, or emptied again later (with an entry of its own)
            peer = item
            if self.peers.get(peer.id) is not peer:
                continue
            if peer.state is PeerState.FAILED:
                due = peer.updated_at + cfg.failed_peer_ttl
            elif peer.children:
                due = now + cfg.peer_ttl  # serving: not idle
            else:
                due = peer.updated_at + cfg.peer_ttl
            if due <= now:
                expired.append(peer)
            else:
                heapq.heappush(self._expiries, (due, next(self._seq), peer))
        if expired:
            self._drop_peers(expired, PeerTrigger.LEAVE)

    def _expire_later(self, item: Peer | Task) -> None:
        if isinstance(item, Task):
            due = self._now + self.config.task_ttl
        elif item.state is PeerState.FAILED:
            due = self._now + self.config.failed_peer_ttl
        else:
            due = self._now + self.config.peer_ttl
        heapq.heappush(self._expiries, (due, next(self._seq), item))

    # --- scheduling -------------------------------------------------------------------------------------

    def _reschedule(self, peer: Peer) -> None:
        """Give the peer new parents, or count an attempt and let it wait."""
        if self._try_schedule(peer):
            return
        peer.attempts += 1
        if peer.attempts >= self.config.retry_limit:
            self._give_up(peer)
            return
        peer.task.waiting[peer] = None
        delay, jitter = self.config.retry_interval, self.config.retry_jitter
        if jitter:
            delay *= 1.0 + jitter * (2.0 * self._rng.random() - 1.0)
        peer.retry_at = self._now + delay
        heapq.heappush(self._retries, (peer.retry_at, next(self._seq), peer))

    def _try_schedule(self, peer: Peer) -> bool:
        """Replace the peer's parents by the evaluator's choice among the allowed candidates and push them.
        With no candidate the peer is left without parents and False is returned."""
        for parent in list(peer.parents):
            self._unlink(parent, peer)
        candidates = self._candidates(peer)
        if not candidates:
            return False
        limit = self.config.candidate_parent_limit
        chosen = self.evaluator.choose_parents(peer, candidates, limit)
        linked: list[Peer] = []
        for parent in chosen[:limit]:
            if parent not in candidates:  # by identity (peers compare by identity): a short list
                raise RuntimeError(f"evaluator {self.evaluator!r} chose {parent.id}, which is not a candidate")
            host = parent.host
            if host.uploads < host.upload_slots and parent not in peer.parents:
                self._link(parent, peer)
                linked.append(parent)
        if not linked:
            return False
        self._set_state(peer, PeerTrigger.SCHEDULE)
        self._set_task_state(peer.task, TaskTrigger.DOWNLOAD)
        peer.task.waiting.pop(peer, None)
        if len(peer.parents) < limit:
            peer.task.hungry[peer] = None
        peer.attempts = 0
        peer.retry_at = 0.0
        self._out.append(PushParents(peer.id, peer.task.id, _candidates_of(linked)))
        return True

    def _candidates(self, child: Peer) -> list[Peer]:
        """Peers allowed to be the child's parents, among a sample of at most ``candidate_parent_sample``
        of the task's open peers (serving, on a host with a free upload slot): on another host, not
        blocked by the child, not a bad parent, not below the child in the DAG, and with something the
        child lacks."""
        task = child.task
        pool = task.open
        n, k = len(pool), self.config.candidate_parent_sample
        host = child.host
        # The filters read only the first fields of each peer (see model._PeerLayout): one memory read per
        # candidate. A peer has something the child lacks unless it is a succeeded peer (its pieces are all
        # it will have) with no more pieces than the child, none of them missing at the child (rare: the
        # bitmaps are compared only then).
        mine, lacking, succeeded = child.finished_count, ~child.finished, PeerState.SUCCEEDED
        tenant = host.tenant
        if n > k:
            # A random arithmetic progression modulo n: k distinct peers for two draws of the generator
            # (a step coprime with n never revisits an index before n steps).
            rand = self._rng.random
            start, step = int(rand() * n), 1 + int(rand() * (n - 1))
            while gcd(step, n) != 1:
                step -= 1
            sample = [pool[i % n] for i in range(start, start + k * step, step)]
        else:
            sample = pool
        out = [
            peer
            for peer in sample
            if peer.host is not host
            and peer.host.tenant == tenant
            and (peer.finished_count > mine or peer.state is not succeeded or peer.finished & lacking)
        ]
        bad = task.bad
        if bad and out:
            now = self._now
            out = [peer for peer in out if (until := bad.get(peer)) is None or until <= now]
        avoid = child.avoid
        if avoid and out:
            out = [peer for peer in out if peer.id not in avoid]
        if child.children and any(peer.parents for peer in out):  # only a peer with parents can be below
            below = self._descendants(child)
            out = [peer for peer in out if peer not in below]
        return out

    @staticmethod
    def _descendants(peer: Peer) -> set[Peer]:
        seen: set[Peer] = set()
        stack = list(peer.children)
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                stack.extend(node.children)
        return seen

    def _retry_dirty_tasks(self) -> None:
        """Free retries for waiting peers of tasks that gained a possible parent during this event, then
        more parents for a few running peers that have fewer than ``candidate_parent_limit``.

        One pass per task, oldest waiter first; a peer scheduled in the pass is already a candidate for
        the ones after it, which is what lets a flash crowd form a tree in one event. The top-up matters
        in a flash crowd too: the first children register when nobody else is there, and kept only the
        seed (and each other) as parents for the whole download.
        """
        dirty, self._dirty = self._dirty, {}
        grown, self._grown = self._grown, {}
        for task in dirty:
            if self.tasks.get(task.id) is not task:
                continue
            for peer in list(task.waiting):
                if not task.open:
                    break  # no host of the task has a free slot: nobody can be scheduled now
                if peer in task.waiting:
                    self._try_schedule(peer)
            if task.hungry and task in grown:
                for parent in grown[task]:
                    self._top_up_with(parent)
        self._dirty = {}
        self._grown = {}

    def _top_up_with(self, parent: Peer) -> None:
        """Offer a peer that began to serve to the task's running peers short of parents, oldest first:
        at most ``TOP_UPS_PER_EVENT`` take it, after at most ``TOP_UP_CHECKS`` looks. The peer is checked
        against the DAG's rules directly (no candidate sample, no ranking: it is one new peer, and it
        costs a few comparisons per look). A seed host's peer is left to the evaluator's choice."""
        task = parent.task
        host = parent.host
        if host.is_seed or parent.state not in PARENT_STATES:
            return
        hungry = task.hungry
        limit = self.config.candidate_parent_limit
        ancestors: set[Peer] | None = None
        bad_until = task.bad.get(parent)
        if bad_until is not None and bad_until > self._now:
            return
        taken = 0
        for child in list(itertools.islice(hungry, TOP_UP_CHECKS)):
            if host.uploads >= host.upload_slots or taken >= TOP_UPS_PER_EVENT:
                break
            have = len(child.parents)
            if child.state is not PeerState.RUNNING or not have or have >= limit or self.peers.get(child.id) is not child:
                hungry.pop(child, None)
                continue
            if (
                child is parent
                or child.host is host
                or parent in child.parents
                or (child.avoid is not None and parent.id in child.avoid)
                or child.host.tenant != host.tenant  # a task has one tenant: defence in depth
            ):
                continue
            if ancestors is None:
                ancestors = self._ancestors(parent, TOP_UP_ANCESTORS)
                if ancestors is None:
                    return  # too many to look at: no top-up with this peer (a cycle must never be risked)
            if child in ancestors:
                continue  # the child is above the new peer: taking it as a parent would make a cycle
            self._link(parent, child)
            taken += 1
            self._out.append(PushParents(child.id, task.id, _candidates_of(child.parents)))
            if len(child.parents) >= limit:
                hungry.pop(child, None)
            else:
                hungry[child] = hungry.pop(child)  # to the back: the others get the next one first

    @staticmethod
    def _ancestors(peer: Peer, budget: int) -> set[Peer] | None:
        """The peers above ``peer`` in the DAG, or None when there are more than ``budget``."""
        seen: set[Peer] = set(peer.parents)
        stack = list(seen)
        while stack:
            for above in stack.pop().parents:
                if above not in seen:
                    seen.add(above)
                    stack.append(above)
            if len(seen) > budget:
                return None
        return seen

    def _give_up(self, peer: Peer) -> None:
        task, n = peer.task, peer.attempts
        if self._may_back_to_source(peer):
            self._back_to_source(peer, f"no parent found after {n} attempts: fetch the task from the origin")
            return
        if not peer.back_to_source_allowed:
            why = "and this download may not fetch from the origin (back-to-source is disabled for it)"
        else:
            why = (
                f"and the task already has {self.config.back_to_source_limit} peers fetching from the origin "
                "(back_to_source_limit)"
            )
        self._fail(peer, f"no parent found for task {task.id} after {n} attempts, {why}; try again later")

    def _want(self, task: Task, wanted: tuple[tuple[int, int | None], ...]) -> None:
        """A peer's callers need these byte ranges first: remember them for a seed triggered later, and tell
        the seed host fetching the task from the origin now (or triggered and not registered yet)."""
        fresh = [r for r in wanted if r not in task.wanted]
        task.wanted = (task.wanted + fresh)[-MAX_WANTED_RANGES:]
        if not fresh:
            return
        hosts = {p.host.id for p in task.peers.values() if p.state is PeerState.BACK_TO_SOURCE and p.host.is_seed}
        if task.seed_host is not None:
            hosts.add(task.seed_host)
        for host_id in sorted(hosts):
            self._out.append(
                TriggerSeed(
                    host_id,
                    task.id,
                    task.url,
                    task.tag,
                    task.application,
                    task.piece_length,
                    task.headers,
                    wanted=tuple(fresh),
                    again=True,
                )
            )

    def _may_back_to_source(self, peer: Peer) -> bool:
        return peer.back_to_source_allowed and peer.task.counts[PeerState.BACK_TO_SOURCE] < self.config.back_to_source_limit

    def _back_to_source(self, peer: Peer, reason: str) -> None:
        for parent in list(peer.parents):
            self._unlink(parent, peer)
        self._set_state(peer, PeerTrigger.BACK_TO_SOURCE)
        self._set_task_state(peer.task, TaskTrigger.DOWNLOAD)
        if peer.task.seed_host == peer.host.id:
            peer.task.seed_host = None
        peer.attempts = 0
        self._out.append(BackToSource(peer.id, peer.task.id, reason))

    def _ensure_source(self, task: Task) -> None:
        """The task has no source: find one (see the theory of operation), unless nobody needs it."""
        downloaders = [p for p in task.peers.values() if p.state in WAITING_STATES]
        if task.sources or not downloaders:
            return
        for peer in downloaders:
            if peer.host.is_seed and self._may_back_to_source(peer):
                self._back_to_source(peer, "a seed peer fetches the task from the origin for the swarm")
                return
        if task.seed_host is not None:
            if task.seed_host in self._seed_hosts and self._now < task.seed_deadline:
                return  # the triggered seed has time left to register
            task.seed_host = None
        seed = self._pick_seed_host(task)
        if seed is not None:
            task.seed_host = seed.id
            task.seed_deadline = self._now + self.config.seed_trigger_timeout
            task.tried_seed_hosts.add(seed.id)
            self._out.append(
                TriggerSeed(
                    seed.id,
                    task.id,
                    task.url,
                    task.tag,
                    task.application,
                    task.piece_length,
                    task.headers,
                    wanted=tuple(task.wanted),
                )
            )
            return
        allowed = [p for p in downloaders if self._may_back_to_source(p)]
        if allowed:
            # The peer with the most pieces has least to fetch; among equals, the first registered.
            first = max(allowed, key=lambda p: p.finished_count)
            self._back_to_source(first, "no peer has this task and no seed peer can fetch it: fetch it from the origin")

    def _pick_seed_host(self, task: Task) -> Host | None:
        """Rendezvous hashing over the seed hosts not tried for this task: the same task goes to the same
        seed (whose cache may hold it) for as long as that seed is there."""
        untried = [h for h in self._seed_hosts.values() if h.id not in task.tried_seed_hosts and h.tenant == task.tenant]
        if not untried:
            return None
        return max(untried, key=lambda h: (zlib.crc32(f"{task.id}\n{h.id}".encode()), h.id))

    # --- losing peers -----------------------------------------------------------------------------------

    def _fail(self, peer: Peer, reason: str) -> None:
        """The scheduler fails the peer: tell it why, then drop it like a peer that failed by itself."""
        self._out.append(FailPeer(peer.id, peer.task.id, reason))
        self._drop_peers([peer], PeerTrigger.FAIL)

    def _drop_peers(self, peers: Iterable[Peer], trigger: PeerTrigger, origin_failure: str | None = None) -> None:
        """Peers fail or leave: cut their edges, give their tasks a source if they lost the last one (or
        fail the tasks when the origin failed), then push new parents to their children."""
        orphans: dict[Peer, None] = {}
        tasks: dict[Task, None] = {}
        for peer in peers:
            orphans.update(dict.fromkeys(self._detach(peer)))
            self._set_state(peer, trigger)
            tasks[peer.task] = None
            if trigger is PeerTrigger.LEAVE:
                del self.peers[peer.id]
                del peer.task.peers[peer.id]
                peer.task.bad.pop(peer, None)
                del peer.host.peers[peer.id]
        for task in tasks:
            if task.sources == 0:
                if origin_failure is not None:
                    self._fail_task(task, origin_failure)
                else:
                    self._ensure_source(task)
        for child in orphans:
            if child.state is PeerState.RUNNING:
                self._reschedule(child)
        for task in tasks:
            if not task.peers and self.tasks.get(task.id) is task:
                if self.config.task_ttl > 0:
                    task.emptied_at = self._now
                    self._expire_later(task)
                else:
                    del self.tasks[task.id]

    def _fail_task(self, task: Task, reason: str) -> None:
        victims = [p for p in task.peers.values() if p.state in WAITING_STATES]
        if not victims:
            return
        self._set_task_state(task, TaskTrigger.FAIL)
        task.tried_seed_hosts.clear()  # the origin failed, not the seeds: a new download may ask them again
        for peer in victims:
            self._out.append(FailPeer(peer.id, task.id, f"the origin failed for task {task.id}: {reason}"))
            self._detach(peer)
            self._set_state(peer, PeerTrigger.FAIL)

    def _detach(self, peer: Peer) -> list[Peer]:
        """Cut every edge of the peer; return its former children."""
        for parent in list(peer.parents):
            self._unlink(parent, peer)
        children = list(peer.children)
        for child in children:
            self._unlink(peer, child)
        return children

    # --- the only writers of edges and states -----------------------------------------------------------

    def _link(self, parent: Peer, child: Peer) -> None:
        parent.children[child] = None
        child.parents[parent] = None
        parent.updated_at = self._now
        host = parent.host
        host.uploads += 1
        host.scored_by = None
        if host.uploads == host.upload_slots:  # its last free slot: none of its peers can take a child now
            for peer in host.peers.values():
                self._close(peer)

    def _unlink(self, parent: Peer, child: Peer) -> None:
        del parent.children[child]
        del child.parents[parent]
        parent.updated_at = self._now
        host = parent.host
        host.uploads -= 1
        host.scored_by = None
        if host.uploads == host.upload_slots - 1:  # a slot is free again
            self._refresh_open(host)
        self._dirty[parent.task] = None  # an upload slot is free: waiting peers may use it
        if child.state is PeerState.RUNNING:
            child.task.hungry[child] = None  # one parent less

    def _set_state(self, peer: Peer, trigger: PeerTrigger) -> None:
        old = peer.state
        new = PEER_TRANSITIONS.get((old, trigger))  # the table itself: this runs in every decision
        if new is None:
            new = next_peer_state(old, trigger, peer.id)  # raises InvalidTransition, saying why
        counts = peer.task.counts
        counts[old] -= 1
        if new is not PeerState.LEFT:  # left peers are forgotten at once
            counts[new] += 1
        peer.state = new
        peer.updated_at = self._now
        if new not in WAITING_STATES:
            peer.task.waiting.pop(peer, None)
            peer.retry_at = 0.0
        if new is not PeerState.RUNNING:
            peer.task.hungry.pop(peer, None)
        if new in PARENT_STATES and old not in PARENT_STATES:
            self._open(peer)
            self._dirty[peer.task] = None  # a new possible parent
            self._grown.setdefault(peer.task, []).append(peer)  # for the top-ups too
        elif old in PARENT_STATES and new not in PARENT_STATES:
            self._close(peer)
        if new is PeerState.SUCCEEDED or new is PeerState.FAILED:
            self._expire_later(peer)

    # --- the task's open peers (possible parents now) ---------------------------------------------------

    @staticmethod
    def _open(peer: Peer) -> None:
        """Put the peer in its task's open list if it can take a child now."""
        host = peer.host
        if peer.open_at < 0 and peer.state in PARENT_STATES and host.uploads < host.upload_slots:
            pool = peer.task.open
            peer.open_at = len(pool)
            pool.append(peer)

    @staticmethod
    def _close(peer: Peer) -> None:
        """Take the peer out of its task's open list (swap with the last: O(1))."""
        i = peer.open_at
        if i >= 0:
            pool = peer.task.open
            last = pool.pop()
            if last is not peer:
                pool[i] = last
                last.open_at = i
            peer.open_at = -1

    def _refresh_open(self, host: Host) -> None:
        """The host's free slots changed: every one of its peers is open or not accordingly."""
        free = host.uploads < host.upload_slots
        for peer in host.peers.values():
            if free:
                self._open(peer)
            else:
                self._close(peer)

    def _set_task_state(self, task: Task, trigger: TaskTrigger) -> None:
        new = TASK_TRANSITIONS.get((task.state, trigger))
        task.state = new if new is not None else next_task_state(task.state, trigger, task.id)

    # --- helpers ------------------------------------------------------------------------------------------

    def _host(self, host_id: str) -> Host:
        host = self.hosts.get(host_id)
        if host is None:
            raise UnknownHost(host_id)
        return host

    def _peer(self, peer_id: str) -> Peer:
        peer = self.peers.get(peer_id)
        if peer is None:
            raise UnknownPeer(peer_id)
        return peer

    @staticmethod
    def _downloaders(task: Task) -> tuple[str, ...]:
        """Peers that download from parents: they need the digests and the file's metadata."""
        return tuple(p.id for p in task.peers.values() if p.state in WAITING_STATES)

    def _forward_task_info(self, task: Task) -> None:
        to = self._downloaders(task)
        if to:
            self._out.append(_task_info(task, to))

    # --- checking -----------------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise :class:`InvariantViolation` if the model breaks a rule it must always keep.

        For tests and simulations; it walks the whole model (linear in peers and edges).
        """

        def check(cond: bool, what: str) -> None:
            if not cond:
                raise InvariantViolation(what)

        for host_id, host in self.hosts.items():
            check(host.id == host_id, f"host {host_id} filed under another id")
            used = sum(len(p.children) for p in host.peers.values())
            check(host.uploads == used, f"host {host.id}: uploads {host.uploads} != children {used}")
            check(used <= host.upload_slots, f"host {host.id}: {used} children > {host.upload_slots} slots")
            check((host.id in self._seed_hosts) == host.is_seed, f"host {host.id}: seed index")
            evaluator = self.evaluator
            if host.scored_by is not None and host.scored_by is evaluator and isinstance(evaluator, MultiFeatureEvaluator):
                memo = (host.scored_free, host.scored_part)
                check(memo == evaluator.host_part(host), f"host {host.id}: stale evaluator memo {memo}")
        check(self._by_last_seen.keys() == self.hosts.keys(), "last-seen index != hosts")
        seen_peers = 0
        for task_id, task in self.tasks.items():
            check(task.id == task_id, f"task {task_id} filed under another id")
            check(
                bool(task.peers) != (task.emptied_at is not None),
                f"task {task.id}: {len(task.peers)} peers, emptied at {task.emptied_at}",
            )
            check(task.emptied_at is None or self.config.task_ttl > 0, f"task {task.id} has no peers but was kept")
            check(len(task.peers) <= self.config.max_peers_per_task, f"task {task.id}: more peers than max_peers_per_task")
            for i, peer in enumerate(task.open):
                check(peer.open_at == i and peer.task is task, f"task {task.id}: open peer {peer.id} at {i} says {peer.open_at}")
            counts = dict.fromkeys(PeerState, 0)
            for peer in task.peers.values():
                seen_peers += 1
                counts[peer.state] += 1
                self._check_peer(peer, check)
            check(counts == task.counts, f"task {task.id}: state counts {task.counts} != {counts}")
            check(
                counts[PeerState.BACK_TO_SOURCE] <= self.config.back_to_source_limit,
                f"task {task.id}: more than {self.config.back_to_source_limit} peers back to source",
            )
            count = task.piece_count
            check(count is None or all(k < count for k in task.digests), f"task {task.id}: digest beyond the end")
            check(set(task.waiting) <= set(task.peers.values()), f"task {task.id}: waiting peer not in the task")
            check(set(task.hungry) <= set(task.peers.values()), f"task {task.id}: hungry peer not in the task")
            check(_acyclic(task), f"task {task.id}: the DAG has a cycle")
        check(seen_peers == len(self.peers), "peers index != peers of tasks")

    def _check_peer(self, peer: Peer, check: Callable[[bool, str], None]) -> None:
        what = f"peer {peer.id}"
        check(self.peers.get(peer.id) is peer, f"{what}: not in the peers index")
        check(self.hosts.get(peer.host.id) is peer.host, f"{what}: its host is gone")
        check(peer.host.peers.get(peer.id) is peer, f"{what}: not among its host's peers")
        check(peer.host.tenant == peer.task.tenant, f"{what}: its host's tenant is not its task's")
        check(peer.finished_count == peer.finished.bit_count(), f"{what}: finished count")
        check(not peer.parents or peer.state is PeerState.RUNNING, f"{what}: {peer.state.value} with parents")
        check(not peer.children or peer.state in PARENT_STATES, f"{what}: {peer.state.value} with children")
        for parent in peer.parents:
            check(peer in parent.children, f"{what}: parent {parent.id} does not list it as a child")
            check(parent.task is peer.task, f"{what}: parent {parent.id} is in another task")
            check(parent.host is not peer.host, f"{what}: parent {parent.id} is on its own host")
            check(parent.host.tenant == peer.host.tenant, f"{what}: parent {parent.id} is of another tenant")
            check(parent.state in PARENT_STATES, f"{what}: parent {parent.id} is {parent.state.value}")
        for child in peer.children:
            check(peer in child.parents, f"{what}: child {child.id} does not list it as a parent")
        waiting = peer in peer.task.waiting
        needs = peer.state in WAITING_STATES and not peer.parents
        check(waiting == needs, f"{what}: {peer.state.value}, {len(peer.parents)} parents, waiting={waiting}")
        check(not waiting or peer.retry_at > 0, f"{what}: waiting without a retry time")
        check(peer.state not in SOURCE_STATES or not peer.parents, f"{what}: a source with parents")
        can_serve = peer.state in PARENT_STATES and peer.host.uploads < peer.host.upload_slots
        is_open = 0 <= peer.open_at < len(peer.task.open) and peer.task.open[peer.open_at] is peer
        check(can_serve == is_open, f"{what}: {peer.state.value}, host free={peer.host.free_slots}, open_at={peer.open_at}")
        check(is_open or peer.open_at == -1, f"{what}: stale open index {peer.open_at}")
        bad_until = peer.costs.bad_until if peer.costs is not None else 0.0
        check(peer.task.bad.get(peer, 0.0) == bad_until, f"{what}: bad-parent index {peer.task.bad.get(peer)} != {bad_until}")
        host = peer.host
        check(
            peer.candidate is None or peer.candidate == ParentCandidate(peer.id, host.id, host.ip, host.port),
            f"{what}: stale parent address {peer.candidate}",
        )


def _metadata_conflict(task: Task, content_length: int | None, piece_length: int) -> str | None:
    """Why reported file metadata contradicts what the task knows, or None if it does not."""
    if task.piece_length is not None and piece_length != task.piece_length:
        return f"piece length {piece_length} differs from the task's piece length {task.piece_length}"
    if content_length is None:
        return None
    if task.content_length is not None and content_length != task.content_length:
        return (
            f"content length {content_length} differs from {task.content_length}, reported by the first peer that "
            "fetched the file from the origin (did the file change at the origin?)"
        )
    count = -(-content_length // piece_length)
    if task.digests and max(task.digests) >= count:
        return f"content length {content_length} leaves no room for piece {max(task.digests)}, reported before"
    return None


def _task_info(task: Task, to: tuple[str, ...]) -> ForwardTaskInfo:
    return ForwardTaskInfo(task.id, to, task.content_length, task.piece_length, task.piece_count, task.digest)


def _candidates_of(parents: Iterable[Peer]) -> tuple[ParentCandidate, ...]:
    out: list[ParentCandidate] = []
    for parent in parents:
        candidate = parent.candidate
        if candidate is None:
            host = parent.host
            candidate = parent.candidate = ParentCandidate(parent.id, host.id, host.ip, host.port)
        out.append(candidate)
    return tuple(out)


def _avoid(peer: Peer, peer_id: str) -> None:
    if peer.avoid is None:
        peer.avoid = set()
    peer.avoid.add(peer_id)


def _is_hex(digest: str) -> bool:
    return 0 < len(digest) <= 128 and _HEX.issuperset(digest)


def _acyclic(task: Task) -> bool:
    """Kahn's algorithm over the task's peers."""
    indegree = {p: len(p.parents) for p in task.peers.values()}
    ready = [p for p, d in indegree.items() if d == 0]
    done = 0
    while ready:
        node = ready.pop()
        done += 1
        for child in node.children:
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    return done == len(indegree)
