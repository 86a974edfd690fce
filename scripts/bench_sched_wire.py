#!/usr/bin/env python3
"""Benchmark of a real ``dfz sched`` process over real sockets: simulated daemons register peers, receive
their parents and report pieces, all from one process.

What runs. ``dfz sched --listen tcp://127.0.0.1:0`` is a child process (its config file sets ``liveness``
to 10 heartbeats, so that a client process saturating a CPU is not mistaken for dead daemons; everything
else is the default). This process runs ``--sessions`` simulated hosts (default 200), each one fabric
:class:`dfz.broker.Client` (a DEALER session, as a daemon has), with ``--peers-per-session`` peers each
(default 10: 2,000 peers), all in one trio loop: a peer is a trio task, not a socket, which is what keeps
2,000 of them light (200 sessions keep this process's sockets well under a default context's 1,024).
Besides them, ``--seeds`` seed hosts (default one per 100 sessions, at least one) answer ``sched.seed``.
Each normal host downloads distinct tasks of ``--pieces`` 4 MiB pieces (default 16) out of ``--tasks``
(default 20; Zipf-like popularity).

What a simulated daemon does, as protocol.md says a daemon does, but moving no data:

* ``sched.announce_host`` once per session (before the clock starts);
* per peer, after a random delay within ``--ramp`` seconds: ``sched.register_peer``. The answer is
  ``parents`` (the first parents), ``wait`` (they come later as a ``sched.parents`` push),
  ``back_to_source`` or ``failed``;
* downloading from parents: every ``--piece-ms`` ms, the next ``--batch`` pieces whose digests the
  scheduler has sent (in the reply and ``sched.digests`` pushes) are reported in one ``sched.pieces``
  (``cost_ms``, each from one of the current parents in turn); then ``sched.peer_finished``;
* fetching from the origin (``back_to_source``, or the peer a seed host registers when it receives
  ``sched.seed``): ``sched.task_metadata``, then the pieces in batches with their digests (no parent),
  then ``sched.peer_finished``;
* every host: ``sched.host_load`` once a second (the rate of the pieces its peers served).

Measured, from the first registration to the last ``sched.peer_finished``: **messages/s**, every sched.*
message that crossed the wire in either direction (requests, replies, client pushes, server pushes; not
the fabric's hello/heartbeats) over that window; **time to the first parent**, per peer from sending
``sched.register_peer`` to the reply with parents or the first ``sched.parents`` push for it (peers sent
to the origin get no parent and are counted apart); the CPU seconds of ``dfz sched`` and of this process
in the window (a scheduler near 1.0 CPU-s per second is saturated: the rate is its capacity). Progress
goes to stderr, a table to stdout, and the last line of stdout is one JSON object. ``dfz sched`` is
stopped with SIGTERM at the end (its exit status is checked), on error and on Ctrl-C.

    .venv/bin/python scripts/bench_sched_wire.py [--sessions 200] [--peers-per-session 10] [--tasks 20]
        [--pieces 16] [--ramp 5] [--piece-ms 20] [--batch 4] [--timeout 180] [--seed 1] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib

benchlib.ensure_venv()

import trio  # noqa: E402 - after ensure_venv, which may re-execute with the venv's interpreter

from dfz.broker import Client, ClientConfig, ConnectionLost, Message, RemoteError, RequestTimeout  # noqa: E402
from dfz.sched import (  # noqa: E402
    SCHED_CATALOGUE,
    FinishedPiece,
    SchedAnnounceHost,
    SchedBackToSource,
    SchedDigests,
    SchedFail,
    SchedHostAnnounced,
    SchedHostLoad,
    SchedParents,
    SchedPeerFinished,
    SchedPeerRegistered,
    SchedPieces,
    SchedRefused,
    SchedRegisterPeer,
    SchedSeed,
    SchedTaskInfo,
    SchedTaskMetadata,
)

MIB = 1024 * 1024
PIECE_LENGTH = 4 * MIB
LIVENESS = 10

# Peer modes, as the simulated daemon sees them.
WAITING, CHILD, SOURCE, FINISHED, FAILED = "waiting", "child", "source", "finished", "failed"


@dataclass
class TaskSpec:
    id: str
    url: str
    pieces: int
    content_length: int
    digests: list[str]
    digest: str

    def size(self, piece: int) -> int:
        return PIECE_LENGTH if piece < self.pieces - 1 else self.content_length - (self.pieces - 1) * PIECE_LENGTH


def make_task(n: int, pieces: int, rng: random.Random) -> TaskSpec:
    url = f"https://artifacts.example.com/wire/{n:04d}/layer-{rng.getrandbits(32):08x}.tar"
    task_id = hashlib.sha256(url.encode()).hexdigest()
    content_length = (pieces - 1) * PIECE_LENGTH + rng.randint(1, PIECE_LENGTH)
    digests = [hashlib.blake2b(f"{task_id}/{k}".encode(), digest_size=32).hexdigest() for k in range(pieces)]
    return TaskSpec(task_id, url, pieces, content_length, digests, hashlib.blake2b(task_id.encode(), digest_size=32).hexdigest())


def failure(reason: str) -> str:
    """An outcome for the table: the scheduler's reason without the task id, so that failures group."""
    return "failed: " + re.sub(r"\b[0-9a-f]{64}\b", "<task>", reason)[:100]


@dataclass(eq=False)
class PeerSim:
    id: str
    task: TaskSpec
    host: HostSim
    seed: bool
    start_delay: float = 0.0
    mode: str = WAITING
    parents: list[str] = field(default_factory=list)
    have: set[int] = field(default_factory=set)
    wake: trio.Event = field(default_factory=trio.Event)
    sent_at: float = -1.0
    replied_at: float = -1.0
    first_parent_at: float = -1.0
    finished_at: float = -1.0
    outcome: str = ""

    def poke(self) -> None:
        self.wake.set()
        self.wake = trio.Event()


@dataclass
class Counts:
    sent: Counter[str] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)

    def total(self) -> int:
        return sum(self.sent.values()) + sum(self.received.values())


class HostSim:
    """One simulated daemon: a fabric session bound to one host, and the peers it runs."""

    def __init__(self, bench: Bench, index: int, *, seed: bool) -> None:
        self.bench = bench
        self.index = index
        self.seed = seed
        self.id = f"{'seed' if seed else 'node'}-{index:04d}-{bench.rng.getrandbits(48):012x}"
        config = ClientConfig(heartbeat=1.0, liveness=LIVENESS, timeout=60.0, reconnect_max=1.0)
        self.client = Client(SCHED_CATALOGUE, bench.endpoint, name=self.id, config=config)
        self.peers: dict[str, PeerSim] = {}
        self.digests: dict[str, dict[int, str]] = {}
        for kind in (SchedParents, SchedBackToSource, SchedFail, SchedDigests, SchedTaskInfo, SchedRefused, SchedSeed):
            self.client.on_push(kind, self.on_push)
        self.nursery: trio.Nursery | None = None
        self.served = 0  # pieces children reported from this host's peers since the last load report
        self.children: set[str] = set()

    def new_peer(self, task: TaskSpec, *, seed: bool) -> PeerSim:
        peer = PeerSim(f"{self.id}.{task.id[:12]}.{self.bench.rng.getrandbits(32):08x}", task, self, seed)
        self.peers[peer.id] = peer
        return peer

    async def request(self, msg: Message) -> Message:
        self.bench.counts.sent[msg.wire_name()] += 1
        reply = await self.client.request(msg)
        self.bench.counts.received[reply.msg.wire_name()] += 1
        return reply.msg

    async def push(self, msg: Message) -> None:
        self.bench.counts.sent[msg.wire_name()] += 1
        await self.client.push(msg)

    def on_push(self, msg: Message, _payload: list[Any]) -> None:
        bench = self.bench
        bench.counts.received[msg.wire_name()] += 1
        now = trio.current_time()
        match msg:
            case SchedParents():
                peer = self.peers.get(msg.peer_id)
                if peer is not None and peer.mode in (WAITING, CHILD):
                    if peer.first_parent_at < 0:
                        peer.first_parent_at = now
                    peer.mode = CHILD
                    peer.parents = [p.peer_id for p in msg.parents]
                    peer.poke()
            case SchedBackToSource():
                peer = self.peers.get(msg.peer_id)
                if peer is not None and peer.mode in (WAITING, CHILD):
                    peer.mode = SOURCE
                    peer.poke()
            case SchedFail():
                peer = self.peers.get(msg.peer_id)
                if peer is not None and peer.mode not in (FINISHED, FAILED):
                    peer.mode = FAILED
                    peer.outcome = failure(msg.reason)
                    peer.poke()
            case SchedDigests():
                known = self.digests.setdefault(msg.task_id, {})
                known.update(msg.digests)
                for peer_id in msg.peer_ids:
                    peer = self.peers.get(peer_id)
                    if peer is not None:
                        peer.poke()
            case SchedRefused():
                bench.counts.refused[f"{msg.type}: {msg.code}"] += 1
                if len(bench.counts.errors) < 10:
                    bench.counts.errors.append(f"refused {msg.type} for {msg.peer_id} (piece {msg.piece}): {msg.reason[:200]}")
            case SchedSeed():
                task = bench.tasks_by_id.get(msg.task_id)
                if task is not None and self.nursery is not None:
                    self.nursery.start_soon(self.run_peer, self.new_peer(task, seed=True))
            case _:
                pass  # sched.task_info: the simulated daemons know the file's facts

    async def announce(self, failures: list[str]) -> None:
        msg = SchedAnnounceHost(
            host_id=self.id,
            boot=f"boot-{self.id}",
            hostname=self.id,
            ip="127.0.0.1",
            port=65001,
            type="seed" if self.seed else "normal",
            idc=f"idc-{self.index % 3}",
            location=f"eu|eu-{self.index % 3}|rack{self.index // 3 % 8:02d}",
            upload_capacity=125_000_000 * (10 if self.seed else 1),
            upload_slots=32 if self.seed else 6,
        )
        try:
            reply = await self.request(msg)
        except (RemoteError, RequestTimeout, ConnectionLost) as e:
            failures.append(f"host {self.id}: {type(e).__name__}: {e}")
            return
        assert isinstance(reply, SchedHostAnnounced), reply

    async def report_load(self) -> None:
        """``sched.host_load`` about once per second, as a daemon does: the pieces its peers served (as
        their children reported them) turned into a rate; no data moves here, so nothing is in flight."""
        await trio.sleep(self.bench.rng.uniform(0, 1))
        last = trio.current_time()
        while True:
            now = trio.current_time()
            rate = round(self.served * PIECE_LENGTH / max(1e-3, now - last))
            await self.push(SchedHostLoad(upload_rate=rate, uploads_in_flight=0, upload_peers=len(self.children)))
            self.served, last = 0, now
            self.children.clear()
            await trio.sleep(1.0)

    async def run_peer(self, peer: PeerSim) -> None:
        bench = self.bench
        try:
            await self._run_peer(peer)
        except (RemoteError, RequestTimeout, ConnectionLost) as e:
            peer.mode = FAILED
            peer.outcome = f"error: {type(e).__name__}"
            if len(bench.counts.errors) < 10:
                bench.counts.errors.append(f"peer {peer.id}: {type(e).__name__}: {e}")
        finally:
            if peer.finished_at < 0:
                peer.finished_at = trio.current_time()
            if not peer.seed:
                bench.peer_done()

    async def _run_peer(self, peer: PeerSim) -> None:
        bench = self.bench
        task = peer.task
        await trio.sleep(peer.start_delay)
        peer.sent_at = trio.current_time()
        bench.first_message_at = min(bench.first_message_at, peer.sent_at)
        reply = await self.request(SchedRegisterPeer(peer_id=peer.id, task_id=task.id, url=task.url, application="bench-wire"))
        assert isinstance(reply, SchedPeerRegistered), reply
        peer.replied_at = trio.current_time()
        if reply.digests:
            self.digests.setdefault(task.id, {}).update(reply.digests)
        match reply.assignment:
            case "parents" if peer.mode in (WAITING, CHILD):
                if peer.first_parent_at < 0:
                    peer.first_parent_at = peer.replied_at
                if peer.mode == WAITING:
                    peer.mode = CHILD
                    peer.parents = [p.peer_id for p in reply.parents]
            case "back_to_source" if peer.mode == WAITING:
                peer.mode = SOURCE
            case "failed":
                peer.mode = FAILED
                peer.outcome = failure(reply.reason)
            case _:
                pass  # wait: parents (or the origin) come as a push
        sent_metadata = False
        while peer.mode not in (FINISHED, FAILED):
            if peer.mode == WAITING or (peer.mode == CHILD and not peer.parents):
                await peer.wake.wait()
                continue
            if peer.mode == SOURCE:
                if not sent_metadata:
                    sent_metadata = True
                    await self.push(
                        SchedTaskMetadata(peer_id=peer.id, piece_length=PIECE_LENGTH, content_length=task.content_length)
                    )
                batch = [k for k in range(task.pieces) if k not in peer.have][: bench.args.batch]
                parents: list[str | None] = [None]
            else:
                known = self.digests.get(task.id, {})
                batch = [k for k in range(task.pieces) if k not in peer.have and k in known][: bench.args.batch]
                parents = list(peer.parents)
                if not batch:
                    await peer.wake.wait()  # digests (or a new assignment) will come
                    continue
            if batch:
                await trio.sleep(bench.args.piece_ms / 1000)
                if peer.mode in (FAILED, WAITING):
                    continue
                cost = max(1, bench.args.piece_ms)
                finished = [
                    FinishedPiece(
                        piece=k, digest=task.digests[k], size=task.size(k), cost_ms=cost, parent=parents[i % len(parents)]
                    )
                    for i, k in enumerate(batch)
                ]
                await self.push(SchedPieces(peer_id=peer.id, finished=finished))
                for p in finished:
                    parent_host = bench.hosts_by_id.get(p.parent.split(".", 1)[0]) if p.parent else None
                    if parent_host is not None:
                        parent_host.served += 1
                        parent_host.children.add(peer.id)
                peer.have.update(batch)
            if len(peer.have) == task.pieces:
                await self.push(SchedPeerFinished(peer_id=peer.id, content_length=task.content_length, digest=task.digest))
                peer.outcome = "finished from the origin" if peer.mode == SOURCE else "finished from parents"
                peer.mode = FINISHED
                peer.finished_at = trio.current_time()


class Bench:
    def __init__(self, args: argparse.Namespace, endpoint: str) -> None:
        self.args = args
        self.endpoint = endpoint
        self.rng = random.Random(args.seed)
        self.tasks = [make_task(n, args.pieces, self.rng) for n in range(args.tasks)]
        self.tasks_by_id = {t.id: t for t in self.tasks}
        self.counts = Counts()
        self.first_message_at = math.inf
        self.last_message_at = 0.0
        self.left = 0
        self.all_done = trio.Event()
        n_seeds = args.seeds
        self.hosts = [HostSim(self, i, seed=i < n_seeds) for i in range(n_seeds + args.sessions)]
        self.hosts_by_id = {h.id: h for h in self.hosts}
        self.peers: list[PeerSim] = []
        weights = [1.0 / (rank + 1) for rank in range(args.tasks)]
        for host in self.hosts:
            if host.seed:
                continue
            chosen: list[TaskSpec] = []
            w = list(weights)
            for _ in range(args.peers_per_session):
                i = self.rng.choices(range(len(self.tasks)), w)[0]
                w[i] = 0.0  # one peer per host and task
                chosen.append(self.tasks[i])
            for task in chosen:
                peer = host.new_peer(task, seed=False)
                peer.start_delay = self.rng.uniform(0, args.ramp)
                self.peers.append(peer)
        self.left = len(self.peers)

    def peer_done(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.last_message_at = trio.current_time()
            self.all_done.set()


class BenchError(Exception):
    """The benchmark cannot go on (the scheduler refused the hosts, ...): said in one line, not a traceback."""


@dataclass
class Window:
    wall_s: float = 0.0
    sched_cpu_s: float | None = None
    client_cpu_s: float = 0.0
    messages: int = 0
    timed_out: bool = False
    sessions_lost: int = 0


async def run_bench(bench: Bench, sched_pid: int) -> Window:
    args = bench.args
    window = Window()
    async with trio.open_nursery() as nursery:
        for host in bench.hosts:
            host.nursery = nursery
            await nursery.start(host.client.run)
        failures: list[str] = []
        with trio.fail_after(60):
            async with trio.open_nursery() as announcing:
                for host in bench.hosts:
                    announcing.start_soon(host.announce, failures)
        if failures:
            raise BenchError(f"{len(failures)} of {len(bench.hosts)} hosts could not announce themselves; first: {failures[0]}")
        benchlib.progress(
            f"{len(bench.hosts)} hosts announced ({sum(h.seed for h in bench.hosts)} seeds); starting {len(bench.peers):,} peers"
        )
        before = bench.counts.total()
        cpu0 = os.times()
        sched0 = benchlib.cpu_seconds(sched_pid)
        t0 = trio.current_time()
        for host in bench.hosts:
            nursery.start_soon(host.report_load)
        for peer in bench.peers:
            nursery.start_soon(peer.host.run_peer, peer)
        next_report = t0 + 2.0
        with trio.move_on_after(args.timeout) as scope:
            while not bench.all_done.is_set():
                with trio.move_on_at(next_report):
                    await bench.all_done.wait()
                if trio.current_time() >= next_report:
                    next_report += 2.0
                    got = sum(1 for p in bench.peers if p.first_parent_at >= 0)
                    benchlib.progress(
                        f"{len(bench.peers) - bench.left:,}/{len(bench.peers):,} peers done, {got:,} got parents, "
                        f"{bench.counts.total() - before:,} messages [{trio.current_time() - t0:.0f} s]"
                    )
        window.timed_out = scope.cancelled_caught
        cpu1 = os.times()
        sched1 = benchlib.cpu_seconds(sched_pid)
        end = bench.last_message_at if not window.timed_out else trio.current_time()
        window.wall_s = max(1e-9, end - (bench.first_message_at if math.isfinite(bench.first_message_at) else t0))
        window.messages = bench.counts.total() - before
        window.client_cpu_s = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        window.sched_cpu_s = None if sched0 is None or sched1 is None else sched1 - sched0
        window.sessions_lost = sum(max(0, h.client.stats.sessions - 1) for h in bench.hosts)
        nursery.cancel_scope.cancel()  # every client says bye
    return window


def nearest_rank(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def report(args: argparse.Namespace, bench: Bench, window: Window, sched_exit: int | None) -> int:
    peers = bench.peers
    first = sorted((p.first_parent_at - p.sent_at) * 1000 for p in peers if p.first_parent_at >= 0 and p.sent_at >= 0)
    register_rtt = sorted((p.replied_at - p.sent_at) * 1000 for p in peers if p.replied_at >= 0)
    outcomes = Counter(p.outcome or "unfinished" for p in peers)
    seed_peers = sum(1 for h in bench.hosts for p in h.peers.values() if p.seed)
    msgs_per_s = window.messages / window.wall_s
    ok = not window.timed_out and outcomes.get("unfinished", 0) == 0 and not bench.counts.refused and sched_exit == 0

    print(
        f"dfz sched over tcp loopback: {args.sessions} host sessions x {args.peers_per_session} peers = {len(peers):,} peers, "
        f"{args.seeds} seed host sessions ({seed_peers} seed peers triggered), {args.tasks} tasks of {args.pieces} pieces, "
        f"ramp {args.ramp:g} s, "
        f"a batch of {args.batch} pieces every {args.piece_ms} ms; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"{'measure':34s} {'value':>12s}")
    rows: list[tuple[str, str]] = [
        ("window (first register → last finish)", f"{window.wall_s:.2f} s"),
        ("sched.* messages in the window", f"{window.messages:,}"),
        ("messages/s (both directions)", f"{msgs_per_s:,.0f}"),
        ("first parent p50", f"{nearest_rank(first, 0.5):.1f} ms"),
        ("first parent p99", f"{nearest_rank(first, 0.99):.1f} ms"),
        ("first parent max", f"{(first[-1] if first else 0):.1f} ms"),
        ("register round trip p50 / p99", f"{nearest_rank(register_rtt, 0.5):.1f} / {nearest_rank(register_rtt, 0.99):.1f} ms"),
        ("dfz sched CPU in the window", "?" if window.sched_cpu_s is None else f"{window.sched_cpu_s:.2f} s"),
        ("this process's CPU in the window", f"{window.client_cpu_s:.2f} s"),
    ]
    for name, value in rows:
        print(f"{name:34s} {value:>12s}")
    print(f"messages sent: {dict(sorted(bench.counts.sent.items()))}")
    print(f"messages received: {dict(sorted(bench.counts.received.items()))}")
    print(f"peers: {dict(sorted(outcomes.items()))}")
    if window.timed_out:
        print(f"TIMED OUT after {args.timeout:g} s with {bench.left} peers unfinished")
    for e in bench.counts.errors:
        print(f"error: {e}")
    result: dict[str, Any] = {
        "msgs_per_s": round(msgs_per_s, 1),
        "first_parent_p50_ms": round(nearest_rank(first, 0.5), 2),
        "first_parent_p99_ms": round(nearest_rank(first, 0.99), 2),
        "first_parent_max_ms": round(first[-1], 2) if first else 0.0,
        "register_rtt_p50_ms": round(nearest_rank(register_rtt, 0.5), 2),
        "register_rtt_p99_ms": round(nearest_rank(register_rtt, 0.99), 2),
        "messages": window.messages,
        "messages_sent": sum(bench.counts.sent.values()),
        "messages_received": sum(bench.counts.received.values()),
        "messages_by_type": {
            **{f"sent {k}": v for k, v in bench.counts.sent.items()},
            **{f"received {k}": v for k, v in bench.counts.received.items()},
        },
        "window_s": round(window.wall_s, 3),
        "peers": len(peers),
        "peers_registered": sum(1 for p in peers if p.replied_at >= 0),
        "peers_finished": sum(1 for p in peers if p.mode == FINISHED),
        "peers_with_parents": len(first),
        "peers_back_to_source": sum(1 for p in peers if p.outcome == "finished from the origin"),
        "seed_peers": seed_peers,
        "sessions": args.sessions,
        "seed_sessions": args.seeds,
        "peers_per_session": args.peers_per_session,
        "tasks": args.tasks,
        "pieces": args.pieces,
        "outcomes": dict(outcomes),
        "refused": sum(bench.counts.refused.values()),
        "sessions_lost": window.sessions_lost,
        "sched_cpu_s": None if window.sched_cpu_s is None else round(window.sched_cpu_s, 2),
        "sched_cpu_share": None if window.sched_cpu_s is None else round(window.sched_cpu_s / window.wall_s, 3),
        "client_cpu_s": round(window.client_cpu_s, 2),
        "sched_exit": sched_exit,
        "timed_out": window.timed_out,
        "ok": ok,
        "ramp_s": args.ramp,
        "piece_ms": args.piece_ms,
        "batch": args.batch,
        "quick": args.quick,
        "errors": bench.counts.errors,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    sys.stdout.flush()
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0 if ok else 1


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="a smoke test: 20 sessions x 5 peers, 5 tasks of 4 pieces (unless given)"
    )
    ap.add_argument("--sessions", type=int, help="simulated normal hosts, one fabric session each (default 200; 20 quick)")
    ap.add_argument(
        "--seeds", type=int, help="simulated seed hosts, a session each besides (default: one per 100 sessions, at least 1)"
    )
    ap.add_argument("--peers-per-session", type=int, help="peers per normal host (default 10; 5 quick)")
    ap.add_argument("--tasks", type=int, help="tasks (default 20; 5 quick); at least --peers-per-session")
    ap.add_argument("--pieces", type=int, help="pieces per task (default 16; 4 quick)")
    ap.add_argument("--ramp", type=float, help="seconds over which the peers start (default 5; 1 quick)")
    ap.add_argument("--piece-ms", type=int, default=20, help="ms between two piece reports of a peer (default 20)")
    ap.add_argument("--batch", type=int, default=4, help="pieces per sched.pieces report (default 4)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds allowed for the peers to finish (default 180)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random generator (default 1)")
    args = ap.parse_args(argv)
    q = args.quick
    args.sessions = args.sessions if args.sessions is not None else 20 if q else 200
    args.peers_per_session = args.peers_per_session if args.peers_per_session is not None else 5 if q else 10
    args.tasks = args.tasks if args.tasks is not None else 5 if q else 20
    args.pieces = args.pieces if args.pieces is not None else 4 if q else 16
    args.ramp = args.ramp if args.ramp is not None else 1.0 if q else 5.0
    args.seeds = args.seeds if args.seeds is not None else max(1, args.sessions // 100)
    if (
        args.sessions < 1
        or args.seeds < 0
        or args.peers_per_session < 1
        or args.pieces < 1
        or args.batch < 1
        or args.piece_ms < 0
    ):
        ap.error("--sessions, --peers-per-session, --pieces and --batch must be positive, --seeds not negative")
    if args.tasks < args.peers_per_session:
        ap.error("--tasks must be at least --peers-per-session (a host has one peer per task)")
    if not 1 <= args.batch <= 128:
        ap.error("--batch must be from 1 to 128 (sched.pieces carries at most 128)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    benchlib.stop_on_signals()
    with tempfile.TemporaryDirectory(prefix="dfz-bench-sched-wire-") as tmp_name:
        tmp = Path(tmp_name)
        config = tmp / "sched.toml"
        config.write_text(f'name = "bench-sched"\nliveness = {LIVENESS}\n')
        with benchlib.Processes(tmp / "logs") as procs:
            sched = procs.start("sched", benchlib.dfz_command("sched", "--config", str(config), "--listen", "tcp://127.0.0.1:0"))
            endpoint = sched.wait_for(["listening "])["listening "][0]
            benchlib.progress(f"dfz sched (pid {sched.pid}) listens on {endpoint}")
            bench = Bench(args, endpoint)
            try:
                window = trio.run(run_bench, bench, sched.pid)
            except BaseExceptionGroup as group:
                errors = group.subgroup(BenchError)
                if errors is None:
                    raise
                print(f"bench_sched_wire: {_first(errors)}\ndfz sched's log:\n{sched.tail()}", file=sys.stderr)
                return 1
            sched_exit = procs.stop(sched)
            if sched_exit != 0:
                benchlib.progress(f"dfz sched exited with {sched_exit}:\n{sched.tail()}")
    return report(args, bench, window, sched_exit)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: dfz sched stopped", file=sys.stderr)
        sys.exit(130)
