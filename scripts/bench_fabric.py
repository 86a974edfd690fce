#!/usr/bin/env python3
"""Benchmark of dfz's message fabric (``dfz/broker``) against blocking pyzmq, between two processes.

What it measures, each a few times with dfz and pyzmq alternating (machines here vary ±20-30% from one
launch to the next, so medians of interleaved trials are reported):

* **Bulk transfer**: ``--size-mib`` MiB in ``--piece-mib`` MiB pieces with ``--in-flight`` requests open.
  dfz: a :class:`dfz.broker.Server` in a subprocess answers ``bench.get`` with ``bench.piece`` carrying one
  payload frame (a preallocated immutable ``bytes``, sent zero-copy); a :class:`dfz.broker.Client` in this
  process fetches with ``--in-flight`` concurrent tasks. pyzmq: the same with a blocking ROUTER in a
  subprocess and a blocking DEALER here (``copy=False``, same sizes, same number in flight).
* **Round trips**: small request/reply round trips per second, one request at a time. A dfz server and a
  pyzmq server run side by side, and one client process alternates blocks of ``--rtt-block`` round trips
  with each (dfz first in one block pair, pyzmq first in the next): both see the same moments of a
  machine whose load comes and goes, which separate runs seconds apart did not (blocking pyzmq's round
  trips get ~2x faster when the cores are kept busy by other work, as idle vCPUs wake slowly). Reported:
  the median block rate of each and the median of the per-pair ratios.

Each server is a fresh subprocess (this script with the hidden ``--serve`` mode) that prints
``READY <endpoint> <blake3 of its piece>``; the client checks the byte count, every piece index once, and
the content of the first and last piece. Progress goes to stderr, a table to stdout, and the last line of
stdout is one JSON object with the figures (GB/s = 1e9 bytes/s).

    python scripts/bench_fabric.py [--quick] [--size-mib N] [--piece-mib 4] [--in-flight 4]
                                   [--rtt-count N] [--rtt-block N] [--transport tcp|ipc] [--trials N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import blake3
import trio
import zmq

from dfz.broker import U63, Catalogue, Client, ClientConfig, Kind, Message, Request, Server, ServerConfig
from dfz.broker.socket import Buffer, tune_malloc

MIB = 1024 * 1024
GOAL_THROUGHPUT_RATIO = 0.85
GOAL_RTT_RATIO = 0.6
BUSY_LOAD = 1.0  # 1-minute load average above which the machine is busy with other work (warned)
HWM = 64  # the fabric's default high-water mark (ServerConfig.hwm / ClientConfig.hwm), used for pyzmq too


# --- the bench's message types ------------------------------------------------------------------------


class BenchGet(Message, tag="bench.get"):
    """Request piece ``n``; answered with :class:`BenchPiece`."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    n: U63 = 0


class BenchPiece(Message, tag="bench.piece"):
    """Piece ``n``: one payload frame of the piece size."""

    KIND: ClassVar[Kind] = Kind.REPLY
    PAYLOAD_FRAMES: ClassVar[int] = 1
    n: U63 = 0


class BenchPing(Message, tag="bench.ping"):
    """A small request, answered with :class:`BenchPong` carrying the same ``n``."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    n: U63 = 0


class BenchPong(Message, tag="bench.pong"):
    KIND: ClassVar[Kind] = Kind.REPLY
    n: U63 = 0


def bench_catalogue(piece_bytes: int) -> Catalogue:
    return Catalogue([BenchGet, BenchPiece, BenchPing, BenchPong], max_payload=piece_bytes)


# The pyzmq baseline's wire: one request frame (kind, n), answered by that frame (and the piece for "G").
_REQ = struct.Struct("<cQ")
_GET = b"G"
_PING = b"P"


# --- servers (subprocesses) -----------------------------------------------------------------------------


def make_piece(piece_bytes: int) -> tuple[bytes, str]:
    """The one immutable piece a server sends for every request, and its BLAKE3 hex digest."""
    piece = os.urandom(piece_bytes)
    return piece, blake3.blake3(piece).hexdigest()


def announce(endpoint: str, digest: str) -> None:
    sys.stdout.write(f"READY {endpoint} {digest}\n")
    sys.stdout.flush()


async def serve_dfz(endpoint: str, piece_bytes: int, in_flight: int) -> None:
    piece, digest = make_piece(piece_bytes)
    payload: tuple[Buffer, ...] = (piece,)

    # The piece is in memory, so the handlers answer at once in the receive loop (Server.handle_now).
    def get(req: Request) -> tuple[Message, Sequence[Buffer]]:
        assert isinstance(req.msg, BenchGet)
        return BenchPiece(n=req.msg.n), payload

    def ping(req: Request) -> Message:
        assert isinstance(req.msg, BenchPing)
        return BenchPong(n=req.msg.n)

    config = ServerConfig(max_in_flight=max(16, in_flight), send_timeout=30.0)  # max payload: the catalogue's
    server = Server(bench_catalogue(piece_bytes), [endpoint], name="bench-server", config=config)
    server.handle_now(BenchGet, get)
    server.handle_now(BenchPing, ping)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        announce(server.endpoints[0], digest)
        await trio.sleep_forever()


def serve_pyzmq(endpoint: str, piece_bytes: int) -> None:
    piece, digest = make_piece(piece_bytes)
    ctx: zmq.Context[Any] = zmq.Context(io_threads=1)
    sock: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.bind(endpoint)
    announce(str(sock.getsockopt_string(zmq.LAST_ENDPOINT)), digest)
    while True:
        rid, req = sock.recv_multipart(copy=False)
        if req.bytes[:1] == _GET:
            sock.send_multipart([rid, req, piece], copy=False)
        else:
            sock.send_multipart([rid, req], copy=False)


class ServerProcess:
    """A server subprocess (this script in ``--serve`` mode), up once it has announced its endpoint."""

    def __init__(self, kind: str, endpoint: str, args: argparse.Namespace) -> None:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--serve",
            kind,
            "--endpoint",
            endpoint,
            "--piece-bytes",
            str(args.piece_bytes),
            "--in-flight",
            str(args.in_flight),
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if len(line) != 3 or line[0] != "READY":
            self.stop()
            raise RuntimeError(f"{kind} server did not start (said {line!r})")
        self.endpoint = line[1]
        self.digest = line[2]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (threads included)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# --- clients (this process) -----------------------------------------------------------------------------


@dataclass
class Trial:
    """One bulk transfer against one server launch."""

    gbps: float
    client_cpu_s_per_gb: float
    server_cpu_s_per_gb: float


class Ticker:
    """Progress for one measurement, refreshed at most four times a second (no refresh thread)."""

    def __init__(self, progress: Any, description: str, total: int) -> None:
        self.progress = progress
        self.task = progress.add_task(description, total=total) if progress is not None else None
        self.done = 0
        self.next_refresh = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now >= self.next_refresh and self.progress is not None:
            self.next_refresh = now + 0.25
            self.progress.update(self.task, completed=self.done)
            self.progress.refresh()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.remove_task(self.task)


class PieceCheck:
    """Checks that every piece arrived once, with the right size, and the first and last pieces' content."""

    def __init__(self, count: int, piece_bytes: int, digest: str) -> None:
        self.count = count
        self.piece_bytes = piece_bytes
        self.digest = digest
        self.seen = bytearray(count)
        self.received = 0
        self.hashed = 0

    def piece(self, n: int, frame: zmq.Frame) -> int:
        size = len(frame)
        if not 0 <= n < self.count or self.seen[n]:
            raise AssertionError(f"piece {n} unexpected or duplicated")
        if size != self.piece_bytes:
            raise AssertionError(f"piece {n} has {size} bytes, expected {self.piece_bytes}")
        self.seen[n] = 1
        self.received += size
        if n in (0, self.count - 1):
            got = blake3.blake3(frame.buffer).hexdigest()
            if got != self.digest:
                raise AssertionError(f"piece {n} content differs: blake3 {got} != {self.digest}")
            self.hashed += 1
        return size

    def finish(self) -> None:
        expected = self.count * self.piece_bytes
        if self.received != expected or not all(self.seen):
            raise AssertionError(f"received {self.received} bytes of {expected}")
        if self.hashed != min(2, self.count):
            raise AssertionError("first or last piece not checked")


def client_cpu() -> float:
    t = os.times()
    return t.user + t.system


def measure(
    server: ServerProcess, run: Callable[[], float], nbytes: int
) -> tuple[float, float, float]:  # seconds, client CPU s/GB, server CPU s/GB
    c0, s0 = client_cpu(), server.cpu_seconds()
    seconds = run()
    c1, s1 = client_cpu(), server.cpu_seconds()
    return seconds, (c1 - c0) / (nbytes / 1e9), (s1 - s0) / (nbytes / 1e9)


def dfz_trial(server: ServerProcess, args: argparse.Namespace, progress: Any, label: str) -> Trial:
    piece_bytes: int = args.piece_bytes
    count: int = args.pieces
    catalogue = bench_catalogue(piece_bytes)
    config = ClientConfig(max_in_flight=args.in_flight, timeout=60.0)
    result: dict[str, float] = {}

    async def bulk(client: Client) -> None:
        check = PieceCheck(count, piece_bytes, server.digest)
        ticker = Ticker(progress, f"{label} dfz bulk", count * piece_bytes)
        next_n = 0

        async def worker() -> None:
            nonlocal next_n
            while next_n < count:
                n = next_n
                next_n += 1
                reply = await client.request(BenchGet(n=n))
                msg = reply.expect(BenchPiece)
                if msg.n != n:
                    raise AssertionError(f"asked for piece {n}, got {msg.n}")
                ticker.advance(check.piece(n, reply.frames[0]))

        c0, s0 = client_cpu(), server.cpu_seconds()
        t0 = time.perf_counter()
        async with trio.open_nursery() as workers:
            for _ in range(args.in_flight):
                workers.start_soon(worker)
        seconds = time.perf_counter() - t0
        c1, s1 = client_cpu(), server.cpu_seconds()
        ticker.close()
        check.finish()
        gb = count * piece_bytes / 1e9
        result.update(gbps=gb / seconds, ccpu=(c1 - c0) / gb, scpu=(s1 - s0) / gb)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            client: Client = await nursery.start(Client(catalogue, server.endpoint, name="bench", config=config).run)
            await client.wait_connected()
            await client.request(BenchPing(n=0))
            await bulk(client)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return Trial(result["gbps"], result["ccpu"], result["scpu"])


def pyzmq_trial(server: ServerProcess, args: argparse.Namespace, progress: Any, label: str) -> Trial:
    piece_bytes: int = args.piece_bytes
    count: int = args.pieces
    ctx: zmq.Context[Any] = zmq.Context(io_threads=1)
    sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.setsockopt(zmq.RCVHWM, HWM)
        sock.setsockopt(zmq.MAXMSGSIZE, piece_bytes + 65536)
        sock.connect(server.endpoint)
        sock.send(_REQ.pack(_PING, 0))
        sock.recv_multipart()

        def bulk() -> float:
            check = PieceCheck(count, piece_bytes, server.digest)
            ticker = Ticker(progress, f"{label} pyzmq bulk", count * piece_bytes)
            t0 = time.perf_counter()
            sent = 0
            for _ in range(min(args.in_flight, count)):
                sock.send(_REQ.pack(_GET, sent), copy=False)
                sent += 1
            for _ in range(count):
                head, data = sock.recv_multipart(copy=False)
                if sent < count:
                    sock.send(_REQ.pack(_GET, sent), copy=False)
                    sent += 1
                _, n = _REQ.unpack(head.bytes)
                ticker.advance(check.piece(n, data))
            seconds = time.perf_counter() - t0
            ticker.close()
            check.finish()
            return seconds

        seconds, ccpu, scpu = measure(server, bulk, count * piece_bytes)

    finally:
        sock.close(linger=0)
        ctx.term()
    return Trial(count * piece_bytes / 1e9 / seconds, ccpu, scpu)


@dataclass
class RoundTrips:
    """Round trips per second of each block, dfz and pyzmq in alternating blocks of one run."""

    dfz: list[float] = field(default_factory=list)
    pyzmq: list[float] = field(default_factory=list)

    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.dfz, self.pyzmq, strict=True)]


def round_trips(args: argparse.Namespace, endpoints: dict[str, str], progress: Any) -> RoundTrips:
    """``args.rtt_count * args.trials`` round trips with each, in alternating blocks of ``args.rtt_block``."""
    result = RoundTrips()
    blocks = max(1, args.rtt_count * args.trials // args.rtt_block)
    catalogue = bench_catalogue(args.piece_bytes)
    ctx: zmq.Context[Any] = zmq.Context(io_threads=1)
    sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.connect(endpoints["pyzmq"])
    ticker = Ticker(progress, "round trips, dfz and pyzmq alternating", 2 * blocks * args.rtt_block)

    def pyzmq_block(n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            sock.send(_REQ.pack(_PING, i))
            (answer,) = sock.recv_multipart()
            if _REQ.unpack(answer)[1] != i:
                raise AssertionError("pong out of order")
        return n / (time.perf_counter() - t0)

    async def dfz_block(client: Client, n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            reply = await client.request(BenchPing(n=i))
            if reply.expect(BenchPong).n != i:
                raise AssertionError("pong out of order")
        return n / (time.perf_counter() - t0)

    async def main() -> None:
        config = ClientConfig(timeout=60.0)
        async with trio.open_nursery() as nursery:
            client: Client = await nursery.start(Client(catalogue, endpoints["dfz"], name="bench", config=config).run)
            await client.wait_connected()
            # Warm-up: connections, caches, the allocator.
            pyzmq_block(min(200, args.rtt_block))
            await dfz_block(client, min(200, args.rtt_block))
            for b in range(blocks):
                # The pyzmq calls block this trio loop for a block (tens of ms): nothing else runs meanwhile.
                if b % 2 == 0:
                    result.dfz.append(await dfz_block(client, args.rtt_block))
                    result.pyzmq.append(pyzmq_block(args.rtt_block))
                else:
                    result.pyzmq.append(pyzmq_block(args.rtt_block))
                    result.dfz.append(await dfz_block(client, args.rtt_block))
                ticker.advance(2 * args.rtt_block)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        ticker.close()
        sock.close(linger=0)
        ctx.term()
    return result


# --- orchestration --------------------------------------------------------------------------------------


@dataclass
class Runs:
    dfz: list[Trial] = field(default_factory=list)
    pyzmq: list[Trial] = field(default_factory=list)


def run_trial(kind: str, args: argparse.Namespace, endpoint: str, progress: Any, label: str) -> Trial:
    server = ServerProcess(kind, endpoint, args)
    try:
        if kind == "dfz":
            return dfz_trial(server, args, progress, label)
        return pyzmq_trial(server, args, progress, label)
    finally:
        server.stop()


def rounded(t: Trial) -> dict[str, float]:
    return {k: round(v, 3) for k, v in asdict(t).items()}


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    """min / median / max of many block figures."""
    return f"{min(values):,.0f} / {med(values):,.0f} / {max(values):,.0f} (min/med/max of {len(values)})"


def report(args: argparse.Namespace, runs: Runs, rtts: RoundTrips) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    d, p = runs.dfz, runs.pyzmq
    gbps_dfz, gbps_pyzmq = med([t.gbps for t in d]), med([t.gbps for t in p])
    rtt_dfz, rtt_pyzmq = med(rtts.dfz), med(rtts.pyzmq)
    ratio = gbps_dfz / gbps_pyzmq
    rtt_ratio = rtt_dfz / rtt_pyzmq
    paired = med([a.gbps / b.gbps for a, b in zip(d, p, strict=True)])
    rtt_paired = med(rtts.ratios())
    throughput_met = ratio >= GOAL_THROUGHPUT_RATIO
    rtt_met = rtt_ratio >= GOAL_RTT_RATIO

    console = Console() if sys.stdout.isatty() else Console(width=140)
    table = Table(
        title=(
            f"dfz fabric vs blocking pyzmq: {args.size_mib} MiB in {args.piece_mib:g} MiB pieces, "
            f"{args.in_flight} in flight, {args.transport}, {args.trials} trials (medians; round trips in "
            f"alternating blocks of {args.rtt_block})"
        )
    )
    for col in ("measure", "dfz", "pyzmq", "ratio (paired)", "goal", "met", "dfz runs", "pyzmq runs"):
        table.add_column(col, justify="left" if col in ("measure", "dfz runs", "pyzmq runs") else "right")

    def runs_of(ts: Sequence[Trial], pick: Callable[[Trial], float], fmt: str) -> str:
        return " ".join(format(pick(t), fmt) for t in ts)

    table.add_row(
        "throughput GB/s",
        f"{gbps_dfz:.2f}",
        f"{gbps_pyzmq:.2f}",
        f"{ratio:.2f} ({paired:.2f})",
        f"≥ {GOAL_THROUGHPUT_RATIO}",
        "yes" if throughput_met else "NO",
        runs_of(d, lambda t: t.gbps, ".2f"),
        runs_of(p, lambda t: t.gbps, ".2f"),
    )
    table.add_row(
        "round trips /s",
        f"{rtt_dfz:,.0f}",
        f"{rtt_pyzmq:,.0f}",
        f"{rtt_ratio:.2f} ({rtt_paired:.2f})",
        f"≥ {GOAL_RTT_RATIO}",
        "yes" if rtt_met else "NO",
        spread(rtts.dfz),
        spread(rtts.pyzmq),
    )

    def client_cpu_of(t: Trial) -> float:
        return t.client_cpu_s_per_gb

    def server_cpu_of(t: Trial) -> float:
        return t.server_cpu_s_per_gb

    cpu_rows: list[tuple[str, Callable[[Trial], float]]] = [
        ("client CPU s/GB", client_cpu_of),
        ("server CPU s/GB", server_cpu_of),
    ]
    for name, pick in cpu_rows:
        a, b = med([pick(t) for t in d]), med([pick(t) for t in p])
        table.add_row(name, f"{a:.2f}", f"{b:.2f}", f"{a / b:.2f}", "", "", runs_of(d, pick, ".2f"), runs_of(p, pick, ".2f"))
    console.print(table)
    console.print(
        f"goal throughput ratio ≥ {GOAL_THROUGHPUT_RATIO}: {'met' if throughput_met else 'NOT met'}; "
        f"goal round-trip ratio ≥ {GOAL_RTT_RATIO}: {'met' if rtt_met else 'NOT met'}"
    )
    return {
        "gbps_dfz": round(gbps_dfz, 4),
        "gbps_pyzmq": round(gbps_pyzmq, 4),
        "ratio_vs_pyzmq": round(ratio, 4),
        "ratio_vs_pyzmq_paired": round(paired, 4),
        "rtt_per_s_dfz": round(rtt_dfz, 1),
        "rtt_per_s_pyzmq": round(rtt_pyzmq, 1),
        "rtt_ratio": round(rtt_ratio, 4),
        "rtt_ratio_paired": round(rtt_paired, 4),
        "goal_throughput_met": throughput_met,
        "goal_rtt_met": rtt_met,
        "bytes": args.pieces * args.piece_bytes,
        "piece_bytes": args.piece_bytes,
        "in_flight": args.in_flight,
        "transport": args.transport,
        "trials": args.trials,
        "rtt_count": args.rtt_count,
        "rtt_block": args.rtt_block,
        "rtt_blocks": len(rtts.dfz),
        "rtt_pair_ratio_min_max": [round(min(rtts.ratios()), 4), round(max(rtts.ratios()), 4)],
        "runs": {"dfz": [rounded(t) for t in d], "pyzmq": [rounded(t) for t in p]},
    }


def bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    tmp = tempfile.mkdtemp(prefix="dfzb-", dir="/tmp")  # ipc paths are limited to 107 characters
    runs = Runs()
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=140)
    if load_before > BUSY_LOAD:
        err.print(
            f"[yellow]warning[/]: load average {load_before:.1f} on {os.cpu_count()} CPUs: other work is running, "
            "figures will be low and noisy"
        )
    err.print(
        f"[bold]bench_fabric[/]: {args.trials} trials x (dfz, pyzmq) alternating; each moves "
        f"{args.pieces * args.piece_bytes / MIB:,.0f} MiB in {args.piece_mib:g} MiB pieces ({args.in_flight} in flight) "
        f"over {args.transport}; then {args.rtt_count * args.trials:,} round trips with each, in alternating blocks"
    )
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        auto_refresh=False,  # no refresh thread competing for the GIL and the two cores
        transient=True,
    )
    try:
        with progress:
            for i in range(args.trials):
                order = ("dfz", "pyzmq") if i % 2 == 0 else ("pyzmq", "dfz")
                for kind in order:
                    endpoint = f"ipc://{tmp}/{kind}{i}" if args.transport == "ipc" else "tcp://127.0.0.1:0"
                    label = f"trial {i + 1}/{args.trials}"
                    trial = run_trial(kind, args, endpoint, progress, label)
                    getattr(runs, kind).append(trial)
                    progress.console.print(
                        f"{label} {kind:>5}: {trial.gbps:5.2f} GB/s, "
                        f"CPU s/GB client {trial.client_cpu_s_per_gb:.2f} server {trial.server_cpu_s_per_gb:.2f} "
                        f"[{time.perf_counter() - started:5.1f}s]"
                    )
            servers = {
                kind: ServerProcess(kind, f"ipc://{tmp}/{kind}-rtt" if args.transport == "ipc" else "tcp://127.0.0.1:0", args)
                for kind in ("dfz", "pyzmq")
            }
            try:
                rtts = round_trips(args, {kind: server.endpoint for kind, server in servers.items()}, progress)
            finally:
                for server in servers.values():
                    server.stop()
            progress.console.print(
                f"round trips/s: dfz {med(rtts.dfz):,.0f}, pyzmq {med(rtts.pyzmq):,.0f} (medians of "
                f"{len(rtts.dfz)} blocks of {args.rtt_block}) [{time.perf_counter() - started:5.1f}s]"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = report(args, runs, rtts)
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    summary["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # before, after
    summary["versions"] = {
        "python": sys.version.split()[0],
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "trio": trio.__version__,
    }
    sys.stdout.flush()
    print(json.dumps(summary, separators=(",", ":")), flush=True)
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="512 MiB, fewer trials and round trips (~15 s)")
    ap.add_argument("--size-mib", type=int, default=None, help="MiB per bulk transfer (default 2048; 512 quick)")
    ap.add_argument("--piece-mib", type=float, default=4.0, help="piece size in MiB (default 4)")
    ap.add_argument("--in-flight", type=int, default=4, help="requests in flight (default 4)")
    ap.add_argument("--rtt-count", type=int, default=None, help="round trips per trial and side (default 5000; 2000 quick)")
    ap.add_argument("--rtt-block", type=int, default=250, help="round trips per block, alternating sides (250)")
    ap.add_argument("--trials", type=int, default=None, help="trials per side, alternating (default 7; 5 quick)")
    ap.add_argument("--transport", choices=("tcp", "ipc"), default="tcp")
    ap.add_argument("--serve", choices=("dfz", "pyzmq"), help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--piece-bytes", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        return args
    if args.size_mib is None:
        args.size_mib = 512 if args.quick else 2048
    if args.rtt_count is None:
        args.rtt_count = 2000 if args.quick else 5000
    if args.trials is None:
        args.trials = 5 if args.quick else 7
    args.piece_bytes = round(args.piece_mib * MIB)
    if args.piece_bytes < 1 or args.in_flight < 1 or args.trials < 1 or args.rtt_count < 1 or args.rtt_block < 1:
        ap.error("sizes and counts must be positive")
    args.pieces = max(1, args.size_mib * MIB // args.piece_bytes)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The same allocator settings for both contestants in every process (dfz's sockets apply them on
    # first use; the blocking pyzmq baseline must not be measured with different ones).
    tune_malloc()
    if args.serve == "dfz":
        trio.run(serve_dfz, args.endpoint, args.piece_bytes, args.in_flight)
        return 0
    if args.serve == "pyzmq":
        serve_pyzmq(args.endpoint, args.piece_bytes)
        return 0
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
