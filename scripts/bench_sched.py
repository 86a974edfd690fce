#!/usr/bin/env python3
"""Benchmark of the scheduler's sans-I/O core (``dfz/sched``): a simulated swarm on a fake clock.

The simulation. ``--hosts`` hosts announce themselves (default 2,000): a few seed hosts (one per 500
hosts, at least 2: 10 Gbit/s, 32 upload slots), the rest normal daemons spread over 3 regions x 3 zones x
8 racks (``location`` ``"region|zone|rack"``) in 6 IDCs, uploading at 1 or 10 Gbit/s with 4 to 8 slots;
a tenth of the normal hosts are slow (a tenth of that rate) and 3% are flaky (30% of the pieces they serve
fail). ``--peers`` peers (default 10,000) download ``--tasks`` tasks (default 200) of 1 to 64 pieces of
4 MiB; task popularity is Zipf-like (the hottest task gets about a sixth of the peers, as a flash crowd),
each task's peers arrive over its own window within the first 300 simulated seconds, a host holds at
most one peer per task. What the simulated daemons do, all on the fake clock:

* register (``RegisterPeer``); carry out what the core answers: download from the pushed parents (one
  piece at a time per parent, at the parent host's per-slot rate), fetch from the origin when sent back
  to source (``TaskMetadataKnown``, then every piece with its digest), register a peer on a seed host
  that is triggered (``TriggerSeed``);
* report every piece (``PieceFinished`` with its cost and parent, or the origin); 0.5% of the pieces from
  normal parents fail and 30% from flaky ones (``PieceFailed``); a parent that fell silent makes the
  piece time out after 2 s; a peer whose parents have had nothing new for 5 s asks for others
  (``RescheduleRequest``), as does one whose parents all left;
* finish (``PeerFinished``), or give up midway (2% of the peers: ``PeerFailed``); 1% of the tasks have a
  broken origin (their source fails with ``origin_error``); 5% of the peers may not go back to source;
* a host that uploaded reports its load every 5 s (``HostLoad``: rate, uploads in flight); an idle one
  heartbeats every 20 s (``HostHeartbeat``); 1% of the normal hosts crash after their peers
  registered (they stop talking; the core times them out) and 0.5% leave cleanly (``HostLeft``); a fifth
  of the finished peers and every failed one leave later (``PeerLeft``); a ``Tick`` every 0.5 s.

**What counts as a scheduling decision**: one ``apply()`` of an event that makes the core choose parents:
every ``RegisterPeer`` (the normal peers' and the triggered seeds'), every ``RescheduleRequest``, every
``PieceFailed`` (the core reschedules the reporter), a ``PeerFailed`` / ``PeerLeft`` of a peer that had
children (they are rescheduled), and any other event (``Tick``, ``HostLeft``, ``PeerFinished``, ...)
whose actions include a ``PushParents``, ``BackToSource`` or ``FailPeer``. Each ``apply()`` is timed with
``time.perf_counter_ns`` (the simulation's own work is outside the timings); ``decisions_per_s`` is the
number of decisions divided by the time spent inside their ``apply()`` calls, and ``p50_ms`` / ``p99_ms``
are percentiles of those calls. ``parent_choices`` counts the ``PushParents`` actions of all events.
``--trials`` timing passes (default 3) replay the same events (the plan and the core are seeded); the
figures reported are the medians over them. After each pass the core's ``check_invariants()`` must hold.

**Memory**: a second pass (same seed, same events) with ``tracemalloc`` runs until the last peer has
registered, then drops everything but the core; the memory still allocated since the pass started is the
core's, and ``bytes_per_peer`` divides it by the peers the core holds then (``peers_held``). It is a
separate pass because tracemalloc slows everything down. ``--profile N`` adds a third pass under
``cProfile``, switched on only around the decisions' ``apply()`` calls, and prints the N top functions.

Goals (printed with pass/fail): ``decisions_per_s`` >= 10,000, ``p99_ms`` <= 5, ``bytes_per_peer``
<= 4096. Progress goes to stderr, a table to stdout, and the last line of stdout is one JSON object.

    .venv/bin/python scripts/bench_sched.py [--peers 10000] [--hosts 2000] [--tasks 200] [--seed 1]
                                            [--trials 3] [--quick] [--profile N] [--profile-out FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import heapq
import io
import json
import math
import os
import pstats
import random
import statistics
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import benchlib

benchlib.ensure_venv()

from dfz.sched import (  # noqa: E402 - after ensure_venv, which may re-execute with the venv's interpreter
    Action,
    AnnounceHost,
    BackToSource,
    Event,
    FailPeer,
    HostHeartbeat,
    HostLeft,
    HostLoad,
    HostRemoved,
    HostType,
    InvariantViolation,
    PeerFailed,
    PeerFinished,
    PeerLeft,
    PieceFailed,
    PieceFinished,
    PushParents,
    RegisterPeer,
    RescheduleRequest,
    SchedulerConfig,
    SchedulerCore,
    SchedulerError,
    TaskMetadataKnown,
    Tick,
    TriggerSeed,
)

GOAL_DECISIONS_PER_S = 10_000
GOAL_P99_MS = 5.0
GOAL_BYTES_PER_PEER = 4096

MIB = 1024 * 1024
PIECE_LENGTH = 4 * MIB
GBIT = 125_000_000  # bytes/s
ORIGIN_RATE = 50_000_000  # bytes/s per origin connection
ORIGIN_CONNECTIONS = 4
ARRIVAL_WINDOW = 300.0  # seconds of simulated time over which tasks start
HEARTBEAT = 20.0  # an idle host says it is alive this often
LOAD_REPORT = 5.0  # a host that uploaded since its last report reports its load this often
TICK = 0.5
POLL = 0.5  # a worker whose parent has nothing new looks again after this
STALL = 5.0  # no progress for this long: ask for other parents
PIECE_TIMEOUT = 2.0  # a piece from a parent that fell silent fails after this
FAILED_LEAVE_AFTER = 5.0
FINISHED_LEAVE_FRACTION = 0.2
FINISHED_LEAVE_MEAN = 120.0
SIM_LIMIT = ARRIVAL_WINDOW + 900.0  # simulated seconds; peers still unresolved then are reported

# Peer states in the simulation (what the simulated daemon believes).
NEW, WAITING, RUNNING, SOURCE, DONE, FAILED, GONE = range(7)
STATE_NAMES = ("new", "waiting", "running", "source", "done", "failed", "gone")

# Kinds of simulated happenings, in the heap as (time, seq, kind, a, b, c).
(ARRIVE, SEED_REGISTER, FETCH, PIECE, METADATA, ORIGIN_FETCH, ORIGIN_PIECE, HEARTBEAT_DUE, TICK_DUE, CRASH, HOST_LEAVE, LEAVE) = (
    range(12)
)


class FakeClock:
    """The core's clock: the simulation sets ``now`` before each event."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SimHost:
    __slots__ = (
        "alive",
        "capacity",
        "crash_at",
        "fail_rate",
        "id",
        "idc",
        "inflight",
        "ip",
        "last_report",
        "leave_at",
        "location",
        "seed",
        "served",
        "slots",
        "slow",
    )

    def __init__(self, host_id: str, ip: str, *, seed: bool, idc: str, location: str, capacity: int, slots: int) -> None:
        self.id = host_id
        self.ip = ip
        self.seed = seed
        self.idc = idc
        self.location = location
        self.capacity = capacity
        self.slots = slots
        self.slow = False
        self.fail_rate = 0.0
        self.crash_at: float | None = None
        self.leave_at: float | None = None
        self.alive = True
        self.inflight = 0  # pieces being uploaded now
        self.served = 0  # bytes uploaded since the last load report
        self.last_report = 0.0


class SimTask:
    __slots__ = ("broken", "content_length", "digest", "digests", "full", "id", "pieces", "url")

    def __init__(self, n: int, pieces: int, rng: random.Random, broken: bool) -> None:
        self.url = f"https://artifacts.example.com/builds/{n:04d}/image-{rng.getrandbits(32):08x}.tar"
        self.id = hashlib.sha256(self.url.encode()).hexdigest()
        self.pieces = pieces
        self.content_length = (pieces - 1) * PIECE_LENGTH + rng.randint(1, PIECE_LENGTH)
        self.full = (1 << pieces) - 1
        self.digests = [hashlib.blake2b(f"{self.id}/{k}".encode(), digest_size=32).hexdigest() for k in range(pieces)]
        self.digest = hashlib.blake2b(self.id.encode(), digest_size=32).hexdigest()
        self.broken = broken

    def size(self, piece: int) -> int:
        return PIECE_LENGTH if piece < self.pieces - 1 else self.content_length - (self.pieces - 1) * PIECE_LENGTH


class SimPeer:
    __slots__ = (
        "arrive_at",
        "bts_allowed",
        "count",
        "fail_at",
        "first_parent_at",
        "gen",
        "have",
        "host",
        "id",
        "inflight",
        "last_progress",
        "lost",
        "parents",
        "registered_at",
        "seed",
        "state",
        "task",
        "workers",
    )

    def __init__(self, peer_id: str, task: SimTask, host: SimHost, *, seed: bool) -> None:
        self.id = peer_id
        self.task = task
        self.host = host
        self.seed = seed
        self.state = NEW
        self.have = 0
        self.count = 0
        self.inflight = 0
        self.gen = 0
        self.parents: tuple[str, ...] = ()
        self.workers = 0
        self.lost = 0
        self.fail_at: int | None = None
        self.bts_allowed = True
        self.arrive_at = 0.0
        self.registered_at = -1.0
        self.first_parent_at = -1.0
        self.last_progress = 0.0


@dataclass
class Timings:
    """``apply()`` durations in nanoseconds, by event type and for the decisions."""

    by_type: dict[str, list[int]] = field(default_factory=dict)
    decisions: list[int] = field(default_factory=list)
    decisions_by_type: Counter[str] = field(default_factory=Counter)


@dataclass
class Plan:
    hosts: list[SimHost]
    tasks: list[SimTask]
    peers: list[SimPeer]  # the normal peers, in arrival order


def hex_id(rng: random.Random, nbytes: int) -> str:
    return f"{rng.getrandbits(8 * nbytes):0{2 * nbytes}x}"


def make_plan(n_peers: int, n_hosts: int, n_tasks: int, seed: int) -> Plan:
    """Hosts, tasks and peers (with arrival times and fates), all from one RNG seed."""
    rng = random.Random(seed)
    n_seeds = max(2, n_hosts // 500)
    if n_hosts <= n_seeds:
        raise ValueError(f"--hosts must be more than the {n_seeds} seed hosts")
    regions = ("eu", "us", "ap")
    hosts: list[SimHost] = []
    for i in range(n_hosts):
        region = regions[i % 3]
        zone = f"{region}-{rng.randrange(3) + 1}"
        location = f"{region}|{zone}|rack{rng.randrange(8):02d}"
        idc = f"idc-{zone}" if rng.random() < 0.7 else f"idc-{region}-edge"  # 6 IDCs (2 per region) and edges
        host_id = f"node-{i:05d}-{hex_id(rng, 6)}"
        ip = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        if i < n_seeds:
            hosts.append(SimHost(host_id, ip, seed=True, idc=idc, location=location, capacity=10 * GBIT, slots=32))
            continue
        host = SimHost(
            host_id,
            ip,
            seed=False,
            idc=idc,
            location=location,
            capacity=rng.choice((GBIT, GBIT, 10 * GBIT)),
            slots=rng.randint(4, 8),
        )
        if rng.random() < 0.1:
            host.slow = True
            host.capacity //= 10
        host.fail_rate = 0.3 if rng.random() < 0.03 else 0.005
        hosts.append(host)
    normal = hosts[n_seeds:]

    tasks: list[SimTask] = []
    for n in range(n_tasks):
        pieces = max(1, min(64, round(math.exp(rng.gauss(2.5, 1.0)))))
        tasks.append(SimTask(n, pieces, rng, broken=rng.random() < 0.01))
    weights = [1.0 / (rank + 1) for rank in range(n_tasks)]
    releases = [rng.uniform(0, ARRIVAL_WINDOW * 0.8) for _ in tasks]
    spreads = [math.exp(rng.uniform(math.log(2), math.log(120))) for _ in tasks]
    holders: list[set[int]] = [set() for _ in tasks]
    if n_peers > len(normal) * n_tasks:
        raise ValueError(
            f"{n_peers} peers do not fit on {len(normal)} normal hosts x {n_tasks} tasks (one peer per host and task)"
        )

    peers: list[SimPeer] = []
    while len(peers) < n_peers:
        t = rng.choices(range(n_tasks), weights)[0]
        if len(holders[t]) >= len(normal):
            weights[t] = 0.0  # every host has this task
            continue
        while True:
            h = rng.randrange(len(normal))
            if h not in holders[t]:
                break
        holders[t].add(h)
        task, host = tasks[t], normal[h]
        peer = SimPeer(f"{host.id}.{task.id[:12]}.{hex_id(rng, 4)}", task, host, seed=False)
        peer.arrive_at = min(releases[t] + rng.expovariate(1 / spreads[t]), ARRIVAL_WINDOW)
        peer.bts_allowed = rng.random() >= 0.05
        if rng.random() < 0.02:
            peer.fail_at = rng.randint(0, task.pieces - 1)  # gives up after this many pieces
        peers.append(peer)
    peers.sort(key=lambda p: p.arrive_at)

    last_arrival: dict[SimHost, float] = {}
    for peer in peers:
        last_arrival[peer.host] = peer.arrive_at
    for host in normal:
        fate = rng.random()
        if fate < 0.01:
            host.crash_at = last_arrival.get(host, 0.0) + rng.uniform(1, 60)
        elif fate < 0.015:
            host.leave_at = last_arrival.get(host, 0.0) + rng.uniform(1, 60)
    return Plan(hosts, tasks, peers)


def nearest_rank(sorted_values: Sequence[int], q: float) -> int:
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


class Sim:
    """The simulated swarm around one :class:`SchedulerCore`. ``run`` plays the plan to its end (or, with
    ``stop_after_registrations``, until every planned peer has registered)."""

    def __init__(self, plan: Plan, seed: int, *, profiler: cProfile.Profile | None = None) -> None:
        self.plan = plan
        self.rng = random.Random(seed + 1)
        self.clock = FakeClock()
        self.core = SchedulerCore(SchedulerConfig(), clock=self.clock, seed=seed)
        self.profiler = profiler
        self.now = 0.0
        self.heap: list[tuple[float, int, int, Any, Any, Any]] = []
        self.seq = 0
        self.peers: dict[str, SimPeer] = {}
        self.hosts = {h.id: h for h in plan.hosts}
        self.tasks = {t.id: t for t in plan.tasks}
        self.seed_hosts = [h for h in plan.hosts if h.seed]
        self.timings = Timings()
        self.refused: Counter[str] = Counter()
        self.refusal_examples: list[str] = []
        self.actions: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.registered = 0
        self.seed_peers = 0
        self.unresolved = len(plan.peers)
        self.events = 0
        self.unexpected_removals = 0
        self.rescheduled_by_sim = 0
        self.invariant_violation = ""

    # --- the event loop ---------------------------------------------------------------------------------

    def at(self, when: float, kind: int, a: Any = None, b: Any = None, c: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (when, self.seq, kind, a, b, c))

    def run(self, *, stop_after_registrations: bool = False, report: Callable[[Sim], None] | None = None) -> None:
        for host in self.plan.hosts:
            self.at(self.rng.uniform(0, 2), HEARTBEAT_DUE, host, True)  # the first "heartbeat" announces
            if host.crash_at is not None:
                self.at(host.crash_at, CRASH, host)
            if host.leave_at is not None:
                self.at(host.leave_at, HOST_LEAVE, host)
        for peer in self.plan.peers:
            self.at(2.0 + peer.arrive_at, ARRIVE, peer)
        self.at(TICK, TICK_DUE)
        next_report = time.monotonic() + 2.0
        handlers: dict[int, Callable[[Any, Any, Any], None]] = {
            ARRIVE: self.on_arrive,
            SEED_REGISTER: self.on_seed_register,
            FETCH: self.on_fetch,
            PIECE: self.on_piece,
            METADATA: self.on_metadata,
            ORIGIN_FETCH: self.on_origin_fetch,
            ORIGIN_PIECE: self.on_origin_piece,
            HEARTBEAT_DUE: self.on_heartbeat,
            TICK_DUE: self.on_tick,
            CRASH: self.on_crash,
            HOST_LEAVE: self.on_host_leave,
            LEAVE: self.on_leave,
        }
        total = len(self.plan.peers)
        while self.heap:
            when, _, kind, a, b, c = heapq.heappop(self.heap)
            self.now = when
            handlers[kind](a, b, c)
            if stop_after_registrations and self.registered == total:
                break
            if self.unresolved == 0 or when > SIM_LIMIT:
                break
            if report is not None and time.monotonic() >= next_report:
                next_report = time.monotonic() + 2.0
                report(self)

    # --- applying events ----------------------------------------------------------------------------------

    def apply(self, ev: Event, decision: bool | None) -> list[Action] | None:
        """Apply one event at the simulated time and time it; ``decision``: whether it counts as one
        (``None``: decided by its actions). The actions are carried out after the timing. Returns them, or
        None when the core refused the event. The profiler (``--profile``) runs only around events known to
        be decisions beforehand (``decision=True``)."""
        self.clock.now = self.now
        name = type(ev).__name__
        profiler = self.profiler if decision else None
        if profiler is not None:
            profiler.enable()
        t0 = time.perf_counter_ns()
        try:
            actions = self.core.apply(ev)
        except SchedulerError as e:
            dt = time.perf_counter_ns() - t0
            if profiler is not None:
                profiler.disable()
            self.refused[f"{name}: {type(e).__name__}"] += 1
            if len(self.refusal_examples) < 5:
                self.refusal_examples.append(f"{name} at {self.now:.2f}: {e}")
            self.timings.by_type.setdefault(name, []).append(dt)
            return None
        dt = time.perf_counter_ns() - t0
        if profiler is not None:
            profiler.disable()
        self.events += 1
        self.timings.by_type.setdefault(name, []).append(dt)
        if decision is None:
            decision = any(isinstance(a, PushParents | BackToSource | FailPeer) for a in actions)
        if decision:
            self.timings.decisions.append(dt)
            self.timings.decisions_by_type[name] += 1
        self.carry_out(actions)
        return actions

    def has_children(self, peer_id: str) -> bool | None:
        """True when the core's peer has children (its loss reschedules them); None: let the actions say."""
        peer = self.core.peers.get(peer_id)
        return True if peer is not None and peer.children else None

    def carry_out(self, actions: list[Action]) -> None:
        for action in actions:
            self.actions[type(action).__name__] += 1
            match action:
                case PushParents():
                    peer = self.peers.get(action.peer_id)
                    if peer is None or peer.state not in (WAITING, RUNNING):
                        continue
                    if peer.first_parent_at < 0:
                        peer.first_parent_at = self.now
                    peer.state = RUNNING
                    peer.gen += 1
                    peer.inflight = 0
                    peer.lost = 0
                    peer.parents = tuple(p.peer_id for p in action.parents)
                    peer.workers = len(peer.parents)
                    peer.last_progress = self.now
                    for parent_id in peer.parents:
                        self.at(self.now + 0.001, FETCH, peer, parent_id, peer.gen)
                case BackToSource():
                    peer = self.peers.get(action.peer_id)
                    if peer is None or peer.state in (DONE, FAILED, GONE):
                        continue
                    peer.state = SOURCE
                    peer.gen += 1
                    peer.inflight = 0
                    peer.parents = ()
                    self.at(self.now + 0.02, METADATA, peer, peer.gen)
                case FailPeer():
                    peer = self.peers.get(action.peer_id)
                    if peer is None or peer.state in (FAILED, GONE):
                        continue
                    self.resolve(peer, "failed by the scheduler")
                    peer.state = FAILED
                    peer.gen += 1
                    self.at(self.now + FAILED_LEAVE_AFTER, LEAVE, peer)
                case TriggerSeed():
                    self.at(self.now + 0.05, SEED_REGISTER, self.hosts[action.host_id], action.task_id)
                case HostRemoved():
                    host = self.hosts.get(action.host_id)
                    if host is not None and host.alive:
                        self.unexpected_removals += 1
                        self.host_gone(host)
                case _:
                    pass  # digests and task info: the simulated daemons know them already

    def resolve(self, peer: SimPeer, outcome: str) -> None:
        """A planned peer reached its end (finished, failed, gone); seed peers are not counted."""
        if not peer.seed and peer.state not in (DONE, FAILED, GONE):
            self.unresolved -= 1
            self.outcomes[outcome] += 1

    def host_gone(self, host: SimHost) -> None:
        host.alive = False
        for peer in list(self.peers.values()):
            if peer.host is host and peer.state != GONE:
                self.resolve(peer, "its host crashed or left")
                peer.state = GONE
                peer.gen += 1

    # --- hosts and time -------------------------------------------------------------------------------

    def on_heartbeat(self, host: SimHost, announce: bool, _: Any) -> None:
        """Every ``LOAD_REPORT`` s: a host that uploaded since its last report sends ``HostLoad``; an idle
        one a ``HostHeartbeat`` every ``HEARTBEAT`` s; the first time, ``AnnounceHost``."""
        if not host.alive:
            return
        if announce:
            host.last_report = self.now
            self.apply(
                AnnounceHost(
                    host_id=host.id,
                    hostname=host.id.rsplit("-", 1)[0],
                    ip=host.ip,
                    port=65001,
                    type=HostType.SEED if host.seed else HostType.NORMAL,
                    idc=host.idc,
                    location=host.location,
                    upload_capacity=host.capacity,
                    upload_slots=host.slots,
                ),
                None,
            )
        elif host.served or host.inflight:
            rate = round(host.served / max(1e-3, self.now - host.last_report))
            self.apply(
                HostLoad(host_id=host.id, upload_rate=rate, uploads_in_flight=host.inflight, upload_peers=host.inflight), None
            )
            host.served, host.last_report = 0, self.now
        elif self.now - host.last_report >= HEARTBEAT:
            self.apply(HostHeartbeat(host_id=host.id), None)
            host.last_report = self.now
        self.at(self.now + LOAD_REPORT * self.rng.uniform(0.9, 1.1), HEARTBEAT_DUE, host, False)

    def on_tick(self, *_: Any) -> None:
        self.apply(Tick(), None)
        self.at(self.now + TICK, TICK_DUE)

    def on_crash(self, host: SimHost, *_: Any) -> None:
        if host.alive:
            self.host_gone(host)  # silent: its children time out, the core removes it after host_timeout

    def on_host_leave(self, host: SimHost, *_: Any) -> None:
        if host.alive:
            self.host_gone(host)
            self.apply(HostLeft(host_id=host.id, reason="daemon stopped"), None)

    # --- peers ----------------------------------------------------------------------------------------

    def register(self, peer: SimPeer) -> None:
        self.peers[peer.id] = peer
        peer.state = WAITING
        peer.registered_at = self.now
        task = peer.task
        actions = self.apply(
            RegisterPeer(
                peer_id=peer.id,
                task_id=task.id,
                host_id=peer.host.id,
                url=task.url,
                tag="",
                application="bench",
                piece_length=None,
                back_to_source_allowed=peer.bts_allowed,
            ),
            True,
        )
        if actions is None:
            self.resolve(peer, "registration refused")
            peer.state = FAILED

    def on_arrive(self, peer: SimPeer, *_: Any) -> None:
        self.registered += 1
        if not peer.host.alive:
            self.resolve(peer, "its host crashed or left")
            peer.state = GONE
            return
        self.register(peer)

    def on_seed_register(self, host: SimHost, task_id: str, _: Any) -> None:
        if not host.alive:
            return
        task = self.tasks[task_id]
        peer = SimPeer(f"{host.id}.{task_id[:12]}.{hex_id(self.rng, 4)}", task, host, seed=True)
        self.seed_peers += 1
        self.register(peer)

    def on_metadata(self, peer: SimPeer, gen: int, _: Any) -> None:
        if peer.gen != gen or peer.state != SOURCE:
            return
        task = peer.task
        if task.broken:
            self.resolve(peer, "failed: origin error")
            peer.state = FAILED
            peer.gen += 1
            self.apply(PeerFailed(peer_id=peer.id, reason="origin answered 404", origin_error=True), self.has_children(peer.id))
            self.at(self.now + FAILED_LEAVE_AFTER, LEAVE, peer)
            return
        self.apply(TaskMetadataKnown(peer_id=peer.id, content_length=task.content_length, piece_length=PIECE_LENGTH), None)
        for _ in range(ORIGIN_CONNECTIONS):
            self.at(self.now, ORIGIN_FETCH, peer, gen)

    def on_origin_fetch(self, peer: SimPeer, gen: int, _: Any) -> None:
        if peer.gen != gen or peer.state != SOURCE:
            return
        lacking = peer.task.full & ~peer.have & ~peer.inflight
        if not lacking:
            return
        piece = (lacking & -lacking).bit_length() - 1
        peer.inflight |= 1 << piece
        cost = peer.task.size(piece) / ORIGIN_RATE * self.rng.uniform(0.8, 1.5)
        self.at(self.now + cost, ORIGIN_PIECE, peer, piece, (gen, cost))

    def on_origin_piece(self, peer: SimPeer, piece: int, gen_cost: tuple[int, float]) -> None:
        gen, cost = gen_cost
        if peer.gen != gen or peer.state != SOURCE:
            return
        task = peer.task
        peer.inflight &= ~(1 << piece)
        peer.have |= 1 << piece
        peer.count += 1
        self.apply(
            PieceFinished(
                peer_id=peer.id, piece=piece, digest=task.digests[piece], size=task.size(piece), cost=cost, parent_id=None
            ),
            None,
        )
        if self.after_piece(peer):
            self.at(self.now, ORIGIN_FETCH, peer, gen)

    def after_piece(self, peer: SimPeer) -> bool:
        """Finish or give up when it is time; True when the peer goes on downloading."""
        if peer.state not in (RUNNING, SOURCE):
            return False
        if peer.fail_at is not None and peer.count >= peer.fail_at and peer.count < peer.task.pieces:
            decision = self.has_children(peer.id)
            self.resolve(peer, "failed: gave up")
            peer.state = FAILED
            peer.gen += 1
            self.apply(PeerFailed(peer_id=peer.id, reason="no space left on device"), decision)
            self.at(self.now + FAILED_LEAVE_AFTER, LEAVE, peer)
            return False
        if peer.have == peer.task.full:
            self.resolve(peer, "succeeded" if peer.state == RUNNING else "succeeded from the origin")
            peer.state = DONE
            peer.gen += 1
            self.apply(PeerFinished(peer_id=peer.id, digest=peer.task.digest, content_length=peer.task.content_length), None)
            if self.rng.random() < FINISHED_LEAVE_FRACTION:
                self.at(self.now + self.rng.expovariate(1 / FINISHED_LEAVE_MEAN), LEAVE, peer)
            return False
        return True

    def on_fetch(self, peer: SimPeer, parent_id: str, gen: int) -> None:
        if peer.gen != gen or peer.state != RUNNING:
            return
        lacking = peer.task.full & ~peer.have & ~peer.inflight
        if not lacking:
            return  # the other workers hold the last pieces
        parent = self.peers.get(parent_id)
        if parent is None or (parent.state == GONE and not parent.host.alive):
            # The parent's host fell silent: the request times out.
            piece = (lacking & -lacking).bit_length() - 1
            peer.inflight |= 1 << piece
            self.at(self.now + PIECE_TIMEOUT, PIECE, peer, parent_id, (gen, piece, PIECE_TIMEOUT, "timeout"))
            return
        if parent.state in (FAILED, GONE):
            # It left or failed and the scheduler knows: this worker stops; with none left, ask again.
            peer.workers -= 1
            peer.lost += 1
            if peer.workers <= 0:
                self.reschedule(peer)
            return
        available = lacking & parent.have
        if not available:
            if self.now - peer.last_progress >= STALL:
                self.reschedule(peer)
            else:
                self.at(self.now + POLL, FETCH, peer, parent_id, gen)
            return
        piece = (available & -available).bit_length() - 1
        peer.inflight |= 1 << piece
        host = parent.host
        host.inflight += 1
        cost = peer.task.size(piece) / (host.capacity / host.slots) * self.rng.uniform(0.8, 1.3)
        reason = "refused" if self.rng.random() < host.fail_rate else ""
        self.at(self.now + cost, PIECE, peer, parent_id, (gen, piece, cost, reason))

    def on_piece(self, peer: SimPeer, parent_id: str, gcr: tuple[int, int, float, str]) -> None:
        gen, piece, cost, reason = gcr
        if reason != "timeout":  # the upload ended at the parent's host (a silent host counts nothing)
            host = self.peers[parent_id].host
            host.inflight -= 1
            if not reason:
                host.served += peer.task.size(piece)
        if peer.gen != gen or peer.state != RUNNING:
            return
        bit = 1 << piece
        peer.inflight &= ~bit
        if reason:
            self.apply(PieceFailed(peer_id=peer.id, piece=piece, parent_id=parent_id, reason=reason), True)
            if peer.gen == gen and peer.state == RUNNING:
                # The core took its parents and found none: it waits for a push.
                peer.state = WAITING
                peer.gen += 1
            return
        peer.have |= bit
        peer.count += 1
        peer.last_progress = self.now
        task = peer.task
        self.apply(
            PieceFinished(
                peer_id=peer.id, piece=piece, digest=task.digests[piece], size=task.size(piece), cost=cost, parent_id=parent_id
            ),
            None,
        )
        if self.after_piece(peer) and peer.gen == gen:
            self.at(self.now, FETCH, peer, parent_id, gen)

    def reschedule(self, peer: SimPeer) -> None:
        gen = peer.gen
        peer.last_progress = self.now
        self.rescheduled_by_sim += 1
        self.apply(RescheduleRequest(peer_id=peer.id), True)
        if peer.gen == gen and peer.state == RUNNING:
            peer.state = WAITING
            peer.gen += 1

    def on_leave(self, peer: SimPeer, *_: Any) -> None:
        if peer.state not in (DONE, FAILED) or not peer.host.alive:
            return
        decision = self.has_children(peer.id)
        peer.state = GONE
        peer.gen += 1
        self.apply(PeerLeft(peer_id=peer.id), decision)


# --- passes -----------------------------------------------------------------------------------------------


def progress_reporter(label: str, total: int) -> Callable[[Sim], None]:
    started = time.monotonic()

    def report(sim: Sim) -> None:
        benchlib.progress(
            f"{label}: simulated {sim.now:6.1f} s, {sim.registered:,}/{total:,} peers registered, "
            f"{total - sim.unresolved:,} resolved, {sim.events:,} events, {len(sim.timings.decisions):,} decisions "
            f"[{time.monotonic() - started:.0f} s]"
        )

    return report


def timing_pass(args: argparse.Namespace) -> tuple[Sim, float]:
    plan = make_plan(args.peers, args.hosts, args.tasks, args.seed)
    sim = Sim(plan, args.seed)
    t0 = time.perf_counter()
    sim.run(report=progress_reporter("timing", args.peers))
    wall = time.perf_counter() - t0
    try:
        sim.core.check_invariants()
    except InvariantViolation as e:
        sim.invariant_violation = str(e)
        benchlib.progress(f"the core's invariants do not hold at the end: {e}")
    return sim, wall


def memory_pass(args: argparse.Namespace) -> dict[str, Any]:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    plan = make_plan(args.peers, args.hosts, args.tasks, args.seed)
    sim = Sim(plan, args.seed)
    sim.run(stop_after_registrations=True, report=progress_reporter("memory", args.peers))
    with_sim = tracemalloc.get_traced_memory()[0] - base
    core = sim.core
    hosts, tasks, peers = len(core.hosts), len(core.tasks), len(core.peers)
    del sim, plan
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del core
    return {
        "core_bytes": held,
        "bytes_per_peer": round(held / max(1, peers), 1),
        "peers_held": peers,
        "hosts_held": hosts,
        "tasks_held": tasks,
        "with_simulation_bytes": with_sim,
        "traced_peak_bytes": peak,
    }


def profile_pass(args: argparse.Namespace) -> tuple[str, list[dict[str, Any]]]:
    plan = make_plan(args.peers, args.hosts, args.tasks, args.seed)
    profiler = cProfile.Profile()
    sim = Sim(plan, args.seed, profiler=profiler)
    sim.run(report=progress_reporter("profile", args.peers))
    if args.profile_out:
        profiler.dump_stats(args.profile_out)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(args.profile)
    top: list[dict[str, Any]] = []
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in sorted(raw.items(), key=lambda kv: -kv[1][2])[
        : args.profile
    ]:
        where = filename.split("/dfz/", 1)[-1] if "/dfz/" in filename else os.path.basename(filename)
        top.append(
            {
                "function": f"{where}:{line}({name})",
                "calls": ncalls,
                "tottime_s": round(tottime, 3),
                "cumtime_s": round(cumtime, 3),
            }
        )
    return out.getvalue(), top


# --- report -------------------------------------------------------------------------------------------------


def summarize(values: list[int]) -> dict[str, float]:
    s = sorted(values)
    total = sum(s)
    return {
        "count": len(s),
        "total_ms": total / 1e6,
        "mean_us": total / len(s) / 1e3 if s else 0.0,
        "p50_us": nearest_rank(s, 0.5) / 1e3,
        "p99_us": nearest_rank(s, 0.99) / 1e3,
        "max_us": (s[-1] if s else 0) / 1e3,
    }


def decisions_per_s(sim: Sim) -> float:
    total_ns = sum(sim.timings.decisions)
    return len(sim.timings.decisions) / (total_ns / 1e9) if total_ns else 0.0


def report(
    args: argparse.Namespace, trials: list[tuple[Sim, float]], memory: dict[str, Any], profile: list[dict[str, Any]] | None
) -> int:
    # The same seed makes the same events in every trial; only the timings differ. The headline figures
    # are medians over the trials; the table shows the trial with the median decisions/s.
    per_trial = [(decisions_per_s(sim), summarize(sim.timings.decisions)) for sim, _ in trials]
    rate = statistics.median(r for r, _ in per_trial)
    p50_ms = statistics.median(d["p50_us"] for _, d in per_trial) / 1e3
    p99_ms = statistics.median(d["p99_us"] for _, d in per_trial) / 1e3
    order = sorted(range(len(trials)), key=lambda i: per_trial[i][0])
    sim, wall = trials[order[len(order) // 2]]
    t = sim.timings
    d = summarize(t.decisions)
    all_ns = [x for v in t.by_type.values() for x in v]
    events_per_s = len(all_ns) / (sum(all_ns) / 1e9) if all_ns else 0.0
    first_parent = sorted(
        round((p.first_parent_at - p.registered_at) * 1000)
        for p in sim.peers.values()
        if not p.seed and p.first_parent_at >= 0 and p.registered_at >= 0
    )
    goals = {
        "decisions_per_s": rate >= GOAL_DECISIONS_PER_S,
        "p99_ms": p99_ms <= GOAL_P99_MS,
        "bytes_per_peer": memory["bytes_per_peer"] <= GOAL_BYTES_PER_PEER,
    }

    print(
        f"scheduler core, {args.peers:,} peers ({sim.seed_peers} seed peers triggered) on {args.hosts:,} hosts over "
        f"{args.tasks} tasks, seed {args.seed}; evaluator {type(sim.core.evaluator).__name__}; simulated {sim.now:.0f} s "
        f"in {wall:.1f} s wall; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    heads = ("count", "decisions", "total ms", "mean us", "p50 us", "p99 us", "max us")
    widths = (9, 9, 10, 8, 8, 8, 9)
    print(f"{'apply() of':22s} " + " ".join(f"{h:>{w}s}" for h, w in zip(heads, widths, strict=True)))
    rows = sorted(t.by_type.items(), key=lambda kv: -sum(kv[1]))
    for name, values in rows:
        s = summarize(values)
        print(
            f"{name:22s} {s['count']:9,d} {t.decisions_by_type.get(name, 0):9,d} {s['total_ms']:10.1f} {s['mean_us']:8.1f}"
            f" {s['p50_us']:8.1f} {s['p99_us']:8.1f} {s['max_us']:9.1f}"
        )
    print(
        f"{'decisions':22s} {d['count']:9,d} {d['count']:9,d} {d['total_ms']:10.1f} {d['mean_us']:8.1f} {d['p50_us']:8.1f}"
        f" {d['p99_us']:8.1f} {d['max_us']:9.1f}"
    )
    print(
        f"{len(trials)} timing pass(es), same events (the table is the median one): decisions/s "
        + ", ".join(f"{r:,.0f}" for r, _ in per_trial)
        + "; p99 ms "
        + ", ".join(f"{x['p99_us'] / 1e3:.3f}" for _, x in per_trial)
    )
    print(f"actions: {dict(sorted(sim.actions.items()))}")
    print(f"peers: {dict(sorted(sim.outcomes.items()))}; unresolved at the end: {sim.unresolved}")
    if first_parent:
        print(
            f"simulated time from registration to the first parent: p50 {nearest_rank(first_parent, 0.5)} ms, "
            f"p99 {nearest_rank(first_parent, 0.99)} ms ({len(first_parent):,} peers got parents)"
        )
    if sim.invariant_violation:
        print(f"INVARIANT VIOLATED at the end (check_invariants): {sim.invariant_violation}")
    if sim.refused:
        print(f"events refused by the core (a simulation bug or a change in the core): {dict(sim.refused)}")
        for example in sim.refusal_examples:
            print(f"  {example}")
    print(
        f"memory held by the core after the last registration: {memory['core_bytes'] / MIB:.1f} MiB for "
        f"{memory['peers_held']:,} peers, {memory['hosts_held']:,} hosts, {memory['tasks_held']} tasks"
    )
    verdict = {k: "pass" if v else "FAIL" for k, v in goals.items()}
    print(
        f"goals: decisions_per_s {rate:,.0f} >= {GOAL_DECISIONS_PER_S:,}: {verdict['decisions_per_s']}; "
        f"p99_ms {p99_ms:.3f} <= {GOAL_P99_MS:g}: {verdict['p99_ms']}; "
        f"bytes_per_peer {memory['bytes_per_peer']:,.0f} <= {GOAL_BYTES_PER_PEER}: {verdict['bytes_per_peer']}"
    )
    result: dict[str, Any] = {
        "decisions_per_s": round(rate, 1),
        "p50_ms": round(p50_ms, 4),
        "p99_ms": round(p99_ms, 4),
        "max_ms": round(d["max_us"] / 1e3, 3),
        "bytes_per_peer": memory["bytes_per_peer"],
        "goals_met": goals,
        "decisions": d["count"],
        "decisions_by_event": dict(t.decisions_by_type),
        "parent_choices": sim.actions.get("PushParents", 0),
        "events": sum(len(v) for v in t.by_type.values()),
        "events_per_s": round(events_per_s, 1),
        "events_by_type": {name: len(v) for name, v in t.by_type.items()},
        "peers": args.peers,
        "peers_registered": sum(1 for p in sim.peers.values() if not p.seed),
        "seed_peers": sim.seed_peers,
        "hosts": args.hosts,
        "seed_hosts": len(sim.seed_hosts),
        "tasks": args.tasks,
        "outcomes": dict(sim.outcomes),
        "unresolved": sim.unresolved,
        "refused": sum(sim.refused.values()),
        "invariants_ok": not sim.invariant_violation,
        "unexpected_host_removals": sim.unexpected_removals,
        "first_parent_sim_p50_ms": nearest_rank(first_parent, 0.5),
        "first_parent_sim_p99_ms": nearest_rank(first_parent, 0.99),
        "simulated_s": round(sim.now, 1),
        "wall_s": round(wall, 2),
        "memory": memory,
        "trials": [
            {
                "decisions_per_s": round(r, 1),
                "p50_ms": round(x["p50_us"] / 1e3, 4),
                "p99_ms": round(x["p99_us"] / 1e3, 4),
                "decisions": x["count"],
            }
            for r, x in per_trial
        ],
        "evaluator": type(sim.core.evaluator).__name__,
        "seed": args.seed,
        "quick": args.quick,
        "python": sys.version.split()[0],
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if profile is not None:
        result["profile_top"] = profile
    sys.stdout.flush()
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 1 if sim.invariant_violation else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke test: 500 peers on 100 hosts over 20 tasks (unless given)")
    ap.add_argument("--peers", type=int, help="peers to register (default 10000; 500 quick)")
    ap.add_argument("--hosts", type=int, help="hosts, seeds included (default 2000; 100 quick)")
    ap.add_argument("--tasks", type=int, help="tasks (default 200; 20 quick)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random generator (default 1)")
    ap.add_argument("--trials", type=int, help="timing passes, same events each time; medians reported (default 3; 1 quick)")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="a third pass under cProfile: print the N top functions")
    ap.add_argument("--profile-out", metavar="FILE", help="with --profile: also write the raw profile (pstats) to FILE")
    args = ap.parse_args(argv)
    args.peers = args.peers if args.peers is not None else 500 if args.quick else 10_000
    args.hosts = args.hosts if args.hosts is not None else 100 if args.quick else 2_000
    args.tasks = args.tasks if args.tasks is not None else 20 if args.quick else 200
    args.trials = args.trials if args.trials is not None else 1 if args.quick else 3
    if args.peers < 1 or args.hosts < 3 or args.tasks < 1 or args.trials < 1 or args.profile < 0:
        ap.error("--peers, --tasks and --trials must be positive, --hosts at least 3")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    benchlib.stop_on_signals()
    try:
        make_plan(args.peers, args.hosts, args.tasks, args.seed)
    except ValueError as e:
        print(f"bench_sched: {e}", file=sys.stderr)
        return 2
    trials: list[tuple[Sim, float]] = []
    for i in range(args.trials):
        benchlib.progress(
            f"timing pass {i + 1}/{args.trials}: {args.peers:,} peers, {args.hosts:,} hosts, {args.tasks} tasks, seed {args.seed}"
        )
        sim, wall = timing_pass(args)
        trials.append((sim, wall))
        d = summarize(sim.timings.decisions)
        benchlib.progress(
            f"timing pass {i + 1}/{args.trials} done in {wall:.1f} s: {decisions_per_s(sim):,.0f} decisions/s, "
            f"p50 {d['p50_us'] / 1e3:.3f} ms, p99 {d['p99_us'] / 1e3:.3f} ms"
        )
    benchlib.progress("memory pass (tracemalloc) ...")
    memory = memory_pass(args)
    top = None
    if args.profile:
        benchlib.progress("profile pass (cProfile around the decisions) ...")
        text, top = profile_pass(args)
        print(text, file=sys.stderr)
    return report(args, trials, memory, top)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
