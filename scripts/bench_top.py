#!/usr/bin/env python3
"""Benchmark of ``dfz top`` against a real ``dfz sched`` holding many simulated hosts: how long the
scheduler takes to answer ``sched.inspect`` for every host (in pages), how long ``dfz top`` takes to turn a
snapshot into a frame, and that ``dfz top --once`` draws one within its time.

What runs. ``dfz sched --listen tcp://127.0.0.1:0`` is a child process (heartbeats every 5 s and a liveness
of 10, so that 1,000 sessions in one busy client process are not taken for dead daemons). This process
runs ``--hosts`` simulated hosts (default 1,000), each one fabric :class:`dfz.broker.Client` (a DEALER
session, as a daemon has), in one trio loop with a ZeroMQ context allowed that many sockets. The first
``--seeds`` hosts (default 4) are seed hosts; each task of ``--tasks`` (default 20) of ``--pieces`` 4 MiB
pieces is fetched "from the origin" by a seed peer (``sched.task_metadata``, every piece with its digest),
then every normal host registers one peer of a task and, for ``--duration`` seconds, reports a piece from
one of its parents every ``--piece-ms`` ms, and every host sends ``sched.host_load`` each second: the
counters that ``dfz top`` turns into rates move all along. No data moves.

Measured during that activity, from a separate observer session (as ``dfz top`` polls): **inspect_ms**,
the time to read every host (``inspect_hosts``: the pages it takes), and **frame_ms**, the time to update
``dfz top``'s view with that snapshot and render a 160 x 48 frame into memory (rich, as the live view
does); p50 and max of ``--frames`` rounds. Then ``dfz top --once --scheduler ...`` runs as a process
(**once_s**: wall time, polls twice); its frame is checked to list the hosts. Progress goes to stderr, a
table to stdout, and the last line of stdout is one JSON object.

What the scheduler spends, without sockets: a :class:`SchedulerCore` in this process is given
``--core-peers`` peers (default 10,000) over the same hosts and tasks, each with parents and some pieces,
and :func:`dfz.sched.inspect.build_snapshot` is timed for what ``dfz top`` asks each second (**snapshot_ms**:
the first page of hosts and tasks with the largest task's swarm; **snapshot_all_ms**: every page of
hosts, as the hosts table needs), p50 and max of 20 (the scheduler's event loop does nothing else
meanwhile: this is how long an inspection holds it).

    .venv/bin/python scripts/bench_top.py [--hosts 1000] [--tasks 20] [--pieces 16] [--duration 8]
        [--frames 20] [--core-peers 10000] [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib

benchlib.ensure_venv()

import trio  # noqa: E402 - after ensure_venv, which may re-execute with the venv's interpreter
import zmq  # noqa: E402
from blake3 import blake3  # noqa: E402

from dfz.broker import Client, ClientConfig, FabricError  # noqa: E402
from dfz.sched import (  # noqa: E402  # noqa: E402
    SCHED_CATALOGUE,
    AnnounceHost,
    FinishedPiece,
    HostType,
    PieceFinished,
    RegisterPeer,
    SchedAnnounceHost,
    SchedHostAnnounced,
    SchedHostLoad,
    SchedInspect,
    SchedParents,
    SchedPeerRegistered,
    SchedPieces,
    SchedRegisterPeer,
    SchedTaskMetadata,
    SchedulerConfig,
    SchedulerCore,
    TaskMetadataKnown,
)
from dfz.sched.inspect import build_snapshot, connect, inspect, inspect_hosts  # noqa: E402
from dfz.sched.messages import MAX_INSPECT_HOSTS  # noqa: E402
from dfz.tasks import task_id  # noqa: E402
from dfz.top.app import print_once  # noqa: E402
from dfz.top.view import TopView  # noqa: E402

PIECE = 4 * benchlib.MIB
HEARTBEAT, LIVENESS = 5.0, 10


@dataclass
class Sim:
    args: argparse.Namespace
    endpoint: str
    ctx: zmq.Context[Any]
    rng: random.Random
    clients: list[Client] = field(default_factory=list)
    seed_peers: dict[str, str] = field(default_factory=dict)
    """Task id -> the seed peer that fetched it."""
    reports: int = 0
    errors: list[str] = field(default_factory=list)


def digest(task: str, piece: int) -> str:
    return blake3(f"{task}:{piece}".encode()).hexdigest()


def host_name(k: int) -> str:
    return f"bench-host-{k:05d}"


async def announce(sim: Sim, client: Client, k: int, seed: bool) -> None:
    msg = SchedAnnounceHost(
        host_id=host_name(k), boot="boot-1", hostname=host_name(k), ip="127.0.0.1", port=10000 + k % 50000,
        type="seed" if seed else "normal", upload_capacity=100_000_000, upload_slots=8,
    )  # fmt: skip
    (await client.request(msg)).expect(SchedHostAnnounced)


async def seed_task(sim: Sim, client: Client, url: str) -> None:
    """A seed peer fetches the task from the origin: metadata, then every piece with its digest."""
    tid = task_id(url)
    peer = f"seed-{tid[:12]}"
    reply = (await client.request(SchedRegisterPeer(peer_id=peer, task_id=tid, url=url))).expect(SchedPeerRegistered)
    if reply.assignment != "back_to_source":
        raise RuntimeError(f"the seed peer of {url} got {reply.assignment}, not back_to_source")
    pieces = sim.args.pieces
    await client.push(SchedTaskMetadata(peer_id=peer, piece_length=PIECE, content_length=pieces * PIECE))
    finished = [FinishedPiece(piece=p, digest=digest(tid, p), size=PIECE, cost_ms=5) for p in range(pieces)]
    await client.push(SchedPieces(peer_id=peer, finished=finished))
    sim.seed_peers[tid] = peer


async def download(sim: Sim, client: Client, k: int, url: str, until: float) -> None:
    """One normal host's peer: register, then report a piece from a parent every ``piece_ms`` ms."""
    tid = task_id(url)
    peer = f"p-{k:05d}"
    parents: list[str] = []

    def on_parents(msg: SchedParents, _payload: list[Any]) -> None:
        if msg.peer_id == peer:
            parents[:] = [p.peer_id for p in msg.parents]

    client.on_push(SchedParents, on_parents)
    reply = (await client.request(SchedRegisterPeer(peer_id=peer, task_id=tid, url=url))).expect(SchedPeerRegistered)
    parents[:] = [p.peer_id for p in reply.parents]
    await trio.sleep(sim.rng.uniform(0, sim.args.piece_ms / 1000))
    for piece in range(sim.args.pieces - 1):  # never the last: every peer stays downloading, its rate visible
        if trio.current_time() >= until:
            return
        parent = parents[piece % len(parents)] if parents else sim.seed_peers[tid]
        done = FinishedPiece(piece=piece, digest=digest(tid, piece), size=PIECE, cost_ms=20, parent=parent)
        await client.push(SchedPieces(peer_id=peer, finished=[done]))
        sim.reports += 1
        await trio.sleep(sim.args.piece_ms / 1000)


async def host_load(sim: Sim, client: Client, until: float) -> None:
    while trio.current_time() < until:
        rate = sim.rng.randrange(0, 50_000_000)
        await client.push(SchedHostLoad(upload_rate=rate, uploads_in_flight=rate % 7, upload_peers=rate % 5))
        await trio.sleep(1.0)


async def observe(sim: Sim) -> dict[str, Any]:
    """What ``dfz top`` does each round, timed: read every host, update the view, render a frame."""
    view = TopView([sim.endpoint])
    inspect_ms: list[float] = []
    frame_ms: list[float] = []
    pages: list[int] = []
    seen = 0
    async with connect(sim.endpoint, name="bench-top", timeout=30) as observer:
        # How many host records one snapshot holds (the 56 KiB budget decides, not the 256 asked for).
        first = await inspect(observer, hosts=MAX_INSPECT_HOSTS, tasks=0, peers=0, timeout=30)
        per_page = max(1, len(first.hosts))
        rounds = 0
        while rounds < sim.args.frames:  # also after the reports end (a slow machine): then rates are 0
            started = time.perf_counter()
            snap = await inspect_hosts(observer, max_hosts=100_000, host_sort="upload_rate", timeout=30, tasks=64, peers=256,
                                       task_id=view.selected)  # fmt: skip
            inspected = time.perf_counter()
            view.update(sim.endpoint, snap, now=time.time())
            print_once(view, out=io.StringIO(), width=160, height=48)
            framed = time.perf_counter()
            inspect_ms.append((inspected - started) * 1000)
            frame_ms.append((framed - inspected) * 1000)
            seen = len(snap.hosts)
            pages.append(-(-len(snap.hosts) // per_page))
            rounds += 1
            await trio.sleep(0.5)
    return {"inspect_ms": inspect_ms, "frame_ms": frame_ms, "hosts_seen": seen, "pages": pages}


async def run(sim: Sim) -> dict[str, Any]:
    args = sim.args
    config = ClientConfig(heartbeat=HEARTBEAT, liveness=LIVENESS, timeout=60.0, reconnect_max=1.0)
    urls = [f"http://origin.bench/file-{n}.bin" for n in range(args.tasks)]
    async with trio.open_nursery() as nursery:
        benchlib.progress(f"starting {args.hosts} host sessions")
        limiter = trio.CapacityLimiter(64)

        async def start_host(k: int) -> None:
            async with limiter:
                client = Client(SCHED_CATALOGUE, sim.endpoint, name=host_name(k), config=config, ctx=sim.ctx)
                await nursery.start(client.run)
                await announce(sim, client, k, seed=k < args.seeds)
                sim.clients[k] = client

        sim.clients = [None] * args.hosts  # type: ignore[list-item]  # filled by start_host
        started = time.perf_counter()
        async with trio.open_nursery() as hosts:
            for k in range(args.hosts):
                hosts.start_soon(start_host, k)
        announce_s = time.perf_counter() - started
        benchlib.progress(f"{args.hosts} hosts announced in {announce_s:.1f} s; seeding {args.tasks} tasks")
        async with trio.open_nursery() as seeding:
            for n, url in enumerate(urls):
                seeding.start_soon(seed_task, sim, sim.clients[n % args.seeds], url)
        until = trio.current_time() + args.duration
        for k in range(args.seeds, args.hosts):
            nursery.start_soon(download, sim, sim.clients[k], k, urls[k % len(urls)], until)
        for client in sim.clients:
            nursery.start_soon(host_load, sim, client, until)
        benchlib.progress(f"{args.hosts - args.seeds} peers downloading for {args.duration:g} s; observing")
        await trio.sleep(min(2.0, args.duration / 3))  # let registrations land and counters move
        observed = await observe(sim)
        benchlib.progress("running dfz top --once")
        once = await trio.to_thread.run_sync(top_once, sim.endpoint)
        nursery.cancel_scope.cancel()
    return {**observed, **once, "announce_s": round(announce_s, 2), "reports": sim.reports}


def top_once(endpoint: str) -> dict[str, Any]:
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    done = subprocess.run(
        benchlib.dfz_command("top", "--once", "--scheduler", endpoint, "--interval", "1", "--max-hosts", "100000"),
        capture_output=True, text=True, timeout=120, env={**env, "COLUMNS": "160", "LINES": "48"}, stdin=subprocess.DEVNULL,
        check=False,
    )  # fmt: skip
    return {
        "once_s": round(time.perf_counter() - started, 3),
        "once_exit": done.returncode,
        "once_frame": done.stdout[-20000:] or done.stderr[-2000:],
        "once_lines": len(done.stdout.splitlines()),
    }


def core_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Time ``build_snapshot`` over a core of ``core_peers`` peers (no sockets: the scheduler's own cost)."""
    now = [0.0]
    core = SchedulerCore(SchedulerConfig(max_peers_per_task=100_000), clock=lambda: now[0])
    for k in range(args.hosts):
        core.apply(AnnounceHost(host_id=host_name(k), hostname=host_name(k), ip="127.0.0.1", port=10000 + k,
                                type=HostType.SEED if k < args.seeds else HostType.NORMAL, upload_slots=8,
                                upload_capacity=100_000_000))  # fmt: skip
    urls = [f"http://origin.bench/file-{n}.bin" for n in range(args.tasks)]
    for n, url in enumerate(urls):
        tid, peer = task_id(url), f"seed-{n}"
        core.apply(RegisterPeer(peer_id=peer, task_id=tid, host_id=host_name(n % args.seeds), url=url))
        core.apply(TaskMetadataKnown(peer_id=peer, content_length=args.pieces * PIECE, piece_length=PIECE))
        for p in range(args.pieces):
            core.apply(PieceFinished(peer_id=peer, piece=p, digest=digest(tid, p), size=PIECE, cost=0.01, parent_id=None))
    normal = args.hosts - args.seeds
    per_host = -(-args.core_peers // normal)
    if per_host > args.tasks:
        raise RuntimeError(f"--core-peers {args.core_peers}: at most {normal * args.tasks} (one peer per host and task)")
    made = 0
    for j in range(per_host):
        for k in range(args.seeds, args.hosts):
            if made == args.core_peers:
                break
            n = (k + j) % args.tasks
            tid, peer = task_id(urls[n]), f"p-{k}-{j}"
            core.apply(RegisterPeer(peer_id=peer, task_id=tid, host_id=host_name(k), url=urls[n]))
            parents = list(core.peers[peer].parents)
            for p in range(made % 3 if parents else 0):  # pending peers (no free slot yet) report nothing
                parent = parents[p % len(parents)].id if parents else f"seed-{n}"
                core.apply(PieceFinished(peer_id=peer, piece=p, digest=digest(tid, p), size=PIECE, cost=0.02, parent_id=parent))
            made += 1
    now[0] = 1.0
    biggest = max(core.tasks.values(), key=lambda t: len(t.peers))
    asks = {
        "snapshot_ms": [SchedInspect(task_id=biggest.id, peers=256, tasks=64)],
        "snapshot_all_ms": [SchedInspect(hosts=256, host_offset=o, tasks=0, peers=0) for o in range(0, args.hosts, 200)],
    }
    out: dict[str, Any] = {"core_peers": len(core.peers), "core_tasks": len(core.tasks), "largest_task_peers": len(biggest.peers)}
    for name, requests in asks.items():
        times = []
        for _ in range(20):
            started = time.perf_counter()
            for req in requests:
                snap = build_snapshot(core.hosts.values(), core.tasks.values(), req, scheduler="bench", now=now[0],
                                      find_task=core.tasks.get)  # fmt: skip
            times.append((time.perf_counter() - started) * 1000)
            assert snap.hosts_total == args.hosts
        out[f"{name}_p50"], out[f"{name}_max"] = summary(times)
    return out


def summary(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    return round(statistics.median(values), 2), round(max(values), 2)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--pieces", type=int, default=16)
    p.add_argument("--duration", type=float, default=8.0, help="seconds of reporting")
    p.add_argument("--piece-ms", type=int, default=500)
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--core-peers", type=int, default=10_000, help="peers of the in-process core whose snapshots are timed")
    p.add_argument("--quick", action="store_true", help="a short run (the test suite's): 4 s, 6 frames, 2,000 core peers")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.frames, args.core_peers = 4.0, 6, min(args.core_peers, 2000)
    if not 1 <= args.seeds < args.hosts or args.tasks < 1 or args.pieces < 2:
        p.error("need 1 <= seeds < hosts, tasks >= 1, pieces >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    benchlib.stop_on_signals()
    benchlib.progress(f"timing snapshots of an in-process core of {args.core_peers} peers")
    core = core_cost(args)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * args.hosts + 256  # a socket per session here and at the scheduler, and ZeroMQ's own
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    ctx: zmq.Context[Any] = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, args.hosts + 256)
    with tempfile.TemporaryDirectory(prefix="dfz-bench-top-") as tmp_name:
        tmp = Path(tmp_name)
        config = tmp / "sched.toml"
        config.write_text(f'name = "bench-sched"\nheartbeat = {HEARTBEAT}\nliveness = {LIVENESS}\n')
        with benchlib.Processes(tmp / "logs") as procs:
            sched = procs.start("sched", benchlib.dfz_command("sched", "--config", str(config), "--listen", "tcp://127.0.0.1:0"))
            endpoint = sched.wait_for(["listening "])["listening "][0]
            benchlib.progress(f"dfz sched (pid {sched.pid}) listens on {endpoint}")
            sim = Sim(args, endpoint, ctx, random.Random(args.seed))
            try:
                result = trio.run(run, sim)
            except (FabricError, RuntimeError) as e:
                print(f"bench_top: {e}\ndfz sched's log:\n{sched.tail()}", file=sys.stderr)
                return 1
            sched_cpu = benchlib.cpu_seconds(sched.pid)
            sched_exit = procs.stop(sched)
    ctx.destroy(linger=0)
    inspect_p50, inspect_max = summary(result["inspect_ms"])
    frame_p50, frame_max = summary(result["frame_ms"])
    out = {
        "hosts": args.hosts,
        "hosts_seen": result["hosts_seen"],
        "pages_min": min(result["pages"], default=0),
        "rounds": len(result["frame_ms"]),
        "inspect_ms_p50": inspect_p50,
        "inspect_ms_max": inspect_max,
        "frame_ms_p50": frame_p50,
        "frame_ms_max": frame_max,
        "once_s": result["once_s"],
        "once_exit": result["once_exit"],
        "once_lines": result["once_lines"],
        "once_frame": result["once_frame"],
        "announce_s": result["announce_s"],
        "reports": result["reports"],
        "sched_cpu_s": sched_cpu,
        "sched_exit": sched_exit,
        **core,
    }
    print(f"{'hosts':>24} {args.hosts}")
    for key in ("hosts_seen", "pages_min", "rounds", "inspect_ms_p50", "inspect_ms_max", "frame_ms_p50", "frame_ms_max",
                "once_s", "announce_s", "reports", "sched_cpu_s", "core_peers", "largest_task_peers", "snapshot_ms_p50",
                "snapshot_ms_max", "snapshot_all_ms_p50", "snapshot_all_ms_max"):  # fmt: skip
        print(f"{key:>24} {out[key]}")
    print(json.dumps(out))
    return 0 if sched_exit == 0 and result["once_exit"] == 0 else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: dfz sched stopped", file=sys.stderr)
        sys.exit(130)
