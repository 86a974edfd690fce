#!/usr/bin/env python3
"""``make demo``: five machines' worth of dfz on this one fetch a 256 MiB file at once; the origin serves it once.

What it does, every part a real process on loopback:

1. generates a deterministic pseudo-random file (BLAKE3 XOF) in a temporary directory and starts an HTTP
   origin for it (this script with ``--serve FILE``: ranges, and a count of the bytes it served at
   ``/_stats``);
2. starts ``dfz up`` (scheduler, seed peer, daemon) and reads its ``cluster.json``;
3. starts ``--peers - 1`` more ``dfz daemon`` processes joining that scheduler, each with its own data
   directory and free ports;
4. runs ``dfz get URL -O FILE --endpoint ...`` against every daemon at once, showing each daemon's progress
   (from its local API) and the origin's egress while they run;
5. prints a table: per-peer time, bytes from peers and from the origin, whether the output's sha256 is
   right; and the origin's egress / the file's size (about 1.0: only the seed touched the origin).

Everything it started is stopped, and the temporary directory removed, on exit and on Ctrl-C. The exit
status is 0 only when every download succeeded with the right digest.

    python scripts/demo.py [--size-mib 256] [--peers 5] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import trio  # imported where used: `--serve` (the origin) runs without it

FILE_NAME = "demo.bin"
STATS_PATH = "/_stats"
_CHUNK = 8 << 20

# --- the origin (runs as `demo.py --serve FILE`) ------------------------------------------------------------


class _Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes = 0
        """Body bytes sent (every request, probes included)."""
        self.probe_bytes = 0
        """Of which, bytes of 1-byte probes (``Range: bytes=0-0``)."""
        self.requests = 0

    def add(self, nbytes: int, probe: bool = False) -> None:
        with self.lock:
            self.bytes += nbytes
            if probe:
                self.probe_bytes += nbytes

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {"bytes": self.bytes, "probe_bytes": self.probe_bytes, "requests": self.requests}


def _parse_range(header: str, size: int) -> tuple[int, int] | bool | None:
    """``(start, end)`` inclusive for a single ``bytes=`` range; None for no (or an unusable) header;
    False when unsatisfiable."""
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if match is None or not (match[1] or match[2]):
        return None
    if not match[1]:  # suffix: the last N bytes
        n = int(match[2])
        return (max(size - n, 0), size - 1) if n > 0 and size > 0 else False
    start = int(match[1])
    end = min(int(match[2]), size - 1) if match[2] else size - 1
    if start >= size or end < start:
        return False
    return start, end


def _origin_handler(path: Path, counter: _Counter) -> type[BaseHTTPRequestHandler]:
    size = path.stat().st_size

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _plain(self, status: int, text: bytes, ctype: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

        def _serve(self, body: bool) -> None:
            with counter.lock:
                counter.requests += 1
            if self.path == STATS_PATH:
                self._plain(200, json.dumps(counter.snapshot()).encode(), "application/json")
                return
            if self.path.split("?")[0] != f"/{path.name}":
                self._plain(404, b"not found\n")
                return
            wanted = _parse_range(self.headers.get("Range", ""), size)
            if wanted is False:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = wanted if isinstance(wanted, tuple) else (0, size - 1)
            length = end - start + 1 if size else 0
            self.send_response(206 if isinstance(wanted, tuple) else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(length))
            self.send_header("ETag", '"dfz-demo"')
            if isinstance(wanted, tuple):
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if not body or not length:
                return
            probe = (start, end) == (0, 0)
            out = self.connection.fileno()
            with path.open("rb") as f:
                offset, left = start, length
                try:
                    while left > 0:
                        sent = os.sendfile(out, f.fileno(), offset, min(left, _CHUNK))
                        if sent == 0:
                            break
                        counter.add(sent, probe)
                        offset += sent
                        left -= sent
                except OSError:
                    self.close_connection = True

    return Handler


def serve_origin(path: Path) -> int:
    """Serve ``path`` at ``/NAME`` on a free loopback port (printed as ``listening PORT``) until SIGTERM."""
    counter = _Counter()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _origin_handler(path, counter))
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"listening {server.server_address[1]}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


def origin_stats(url: str) -> dict[str, int]:
    """The origin's counters (``bytes``, ``probe_bytes``, ``requests``) from its ``/_stats``."""
    base = url.rsplit("/", 1)[0]
    with urllib.request.urlopen(base + STATS_PATH, timeout=5) as reply:
        stats: dict[str, int] = json.load(reply)
    return stats


def make_file(path: Path, size: int, seed: bytes = b"dfz demo") -> str:
    """Write ``size`` deterministic pseudo-random bytes (BLAKE3 XOF of ``seed``); their sha256 hex."""
    import blake3

    xof = blake3.blake3(seed)
    sha = hashlib.sha256()
    with path.open("wb") as f:
        for offset in range(0, size, _CHUNK):
            chunk = xof.digest(length=min(_CHUNK, size - offset), seek=offset)
            f.write(chunk)
            sha.update(chunk)
    return sha.hexdigest()


def sha256_of(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


# --- the demo ----------------------------------------------------------------------------------------------


class DemoError(Exception):
    pass


@dataclass
class Peer:
    name: str
    endpoint: str
    output: Path
    log: Path
    get: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    ended: float | None = None
    code: int | None = None
    sha_ok: bool | None = None
    summary: dict[str, str] = field(default_factory=dict)
    done_fraction: float = 0.0


@dataclass
class Processes:
    """Everything the demo started, in start order (stopped in reverse order)."""

    started: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def spawn(
        self, name: str, argv: list[str], *, stdout: Any = subprocess.DEVNULL, stderr: Any = None
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True)
        self.started.append((name, proc))
        return proc

    def stop(self, grace: float = 15.0) -> dict[str, int | None]:
        """SIGTERM every live one (newest first), wait up to ``grace`` seconds, then SIGKILL their groups."""
        for _, proc in reversed(self.started):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        codes: dict[str, int | None] = {}
        for name, proc in reversed(self.started):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(deadline - time.monotonic(), 0.01))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            codes[name] = proc.returncode
        return codes


def _dfz(*args: str) -> list[str]:
    return [sys.executable, "-m", "dfz.cli", *args]


def _read_line(proc: subprocess.Popen[bytes], prefix: str, timeout: float, what: str, log: Path | None = None) -> str:
    """The rest of the first stdout line of ``proc`` starting with ``prefix``."""
    assert proc.stdout is not None
    result: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith(prefix):
                result.append(line[len(prefix) :].strip())
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        tail = ""
        if log is not None and log.exists():
            tail = "\n    " + "\n    ".join(log.read_text(errors="replace").splitlines()[-10:])
        state = "exited" if proc.poll() is not None else f"did not say '{prefix.strip()}' within {timeout:g} s"
        raise DemoError(f"{what} {state}{tail}")
    return result[0]


_SUMMARY = re.compile(
    r"saved .*?: (?P<total>[^,]+), (?P<peers>[^,]+) from peers, (?P<origin>[^,]+?) from the origin.* in [\d.]+ s"
)


def _parse_summary(log: Path) -> dict[str, str]:
    with contextlib.suppress(OSError):
        for line in reversed(log.read_text(errors="replace").splitlines()):
            match = _SUMMARY.search(line)
            if match:
                return match.groupdict()
    return {}


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


class _Progress:
    """Progress while the downloads run: redrawn lines on a terminal, a line every few seconds otherwise."""

    def __init__(self, peers: list[Peer], size: int) -> None:
        self.peers = peers
        self.size = size
        self.tty = sys.stdout.isatty()
        self.drawn = 0
        self.last_plain = 0.0

    def show(self, elapsed: float, origin_bytes: int | None, seed_fraction: float | None) -> None:
        egress = "?" if origin_bytes is None else f"{_mb(origin_bytes)} ({origin_bytes / max(self.size, 1):.2f}x the file)"
        if not self.tty:
            if elapsed - self.last_plain >= 2.0:
                self.last_plain = elapsed
                done = sum(p.ended is not None for p in self.peers)
                avg = sum(p.done_fraction for p in self.peers) / len(self.peers)
                print(
                    f"  [{elapsed:5.1f} s] {done}/{len(self.peers)} done, {avg:4.0%} on average; origin egress {egress}",
                    flush=True,
                )
            return
        lines = []
        rows: list[tuple[str, float | None, Peer | None]] = [("seed", seed_fraction, None)] if seed_fraction is not None else []
        rows += [(p.name, p.done_fraction, p) for p in self.peers]
        for name, fraction, peer in rows:
            f = fraction or 0.0
            bar = "#" * int(f * 30) + "-" * (30 - int(f * 30))
            state = ""
            if peer is not None and peer.ended is not None:
                state = f"done in {peer.ended - peer.started:.1f} s" if peer.code == 0 else f"FAILED (exit {peer.code})"
            lines.append(f"  {name:<8} [{bar}] {f:4.0%}  {state}")
        lines.append(f"  {elapsed:5.1f} s   origin egress {egress}")
        out = ("\x1b[F" * self.drawn) + "".join(f"\x1b[2K{line}\n" for line in lines)
        sys.stdout.write(out)
        sys.stdout.flush()
        self.drawn = len(lines)


async def _fractions(endpoints: list[str], url: str, fractions: list[float | None], stop: trio.Event) -> None:
    """Poll each daemon's local API for the task's pieces done, into ``fractions`` (best effort)."""
    import trio

    from dfz.peer.api_client import open_api_client

    async def one(i: int, endpoint: str) -> None:
        with contextlib.suppress(Exception):
            async with open_api_client(endpoint, connect_timeout=5.0, name=f"dfz-demo-{i}") as api:
                while True:
                    for task in await api.list_tasks():
                        if task.url == url and task.piece_count:
                            fractions[i] = 1.0 if task.complete else task.pieces_done / task.piece_count
                    await trio.sleep(0.25)

    async with trio.open_nursery() as nursery:
        for i, endpoint in enumerate(endpoints):
            nursery.start_soon(one, i, endpoint)
        await stop.wait()
        nursery.cancel_scope.cancel()


@dataclass
class GetRun:
    procs: Processes
    peers: list[Peer]
    url: str
    size: int
    want: str
    """The file's sha256 hex."""
    seed_endpoint: str | None
    limit: float
    """``dfz get --timeout``."""


async def _run_gets(run: GetRun) -> None:
    import trio

    peers, url, seed_endpoint = run.peers, run.url, run.seed_endpoint
    progress = _Progress(peers, run.size)
    endpoints = [p.endpoint for p in peers] + ([seed_endpoint] if seed_endpoint else [])
    fractions: list[float | None] = [None] * len(endpoints)
    stop = trio.Event()
    t0 = time.monotonic()
    for peer in peers:
        peer.log.parent.mkdir(parents=True, exist_ok=True)
        with peer.log.open("wb") as log:
            argv = _dfz("get", url, "-O", str(peer.output), "--endpoint", peer.endpoint, "--timeout", f"{run.limit:g}")
            peer.get = run.procs.spawn(f"get {peer.name}", argv, stderr=log)
        peer.started = time.monotonic()

    async def follow(peer: Peer) -> None:
        assert peer.get is not None
        code = await trio.to_thread.run_sync(peer.get.wait, abandon_on_cancel=True)
        peer.ended, peer.code = time.monotonic(), code
        if code == 0:
            peer.done_fraction = 1.0
            peer.sha_ok = await trio.to_thread.run_sync(sha256_of, peer.output) == run.want
        peer.summary = _parse_summary(peer.log)

    async def show() -> None:
        while True:
            for i, peer in enumerate(peers):
                if peer.ended is None and fractions[i] is not None:
                    peer.done_fraction = fractions[i] or 0.0
            try:
                egress: int | None = (await trio.to_thread.run_sync(origin_stats, url))["bytes"]
            except (OSError, ValueError, KeyError):
                egress = None
            progress.show(time.monotonic() - t0, egress, fractions[-1] if seed_endpoint else None)
            if stop.is_set():
                return
            await trio.sleep(0.5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_fractions, endpoints, url, fractions, stop)
        nursery.start_soon(show)
        async with trio.open_nursery() as gets:
            for peer in peers:
                gets.start_soon(follow, peer)
        stop.set()


def run_demo(args: argparse.Namespace, work: Path, procs: Processes) -> int:
    import trio

    size = args.size_mib << 20
    n = args.peers
    print(f"dfz demo: {n} daemons fetch one {args.size_mib} MiB file at once (work directory {work})", flush=True)

    t = time.monotonic()
    origin_dir = work / "origin"
    origin_dir.mkdir()
    origin_file = origin_dir / FILE_NAME
    want = make_file(origin_file, size)
    print(
        f"  generated {origin_file.name}: {args.size_mib} MiB, sha256 {want[:16]}... in {time.monotonic() - t:.1f} s", flush=True
    )

    logs = work / "logs"
    logs.mkdir()
    with (logs / "origin.log").open("wb") as log:
        origin = procs.spawn(
            "origin", [sys.executable, __file__, "--serve", str(origin_file)], stdout=subprocess.PIPE, stderr=log
        )
    port = _read_line(origin, "listening", 20, "the HTTP origin", logs / "origin.log")
    url = f"http://127.0.0.1:{port}/{FILE_NAME}"
    print(f"  origin   {url} (counts the bytes it serves)", flush=True)

    t = time.monotonic()
    up_dir = work / "up"
    with (logs / "up.log").open("wb") as log:
        up = procs.spawn("dfz up", _dfz("up", "--data-dir", str(up_dir)), stdout=log, stderr=subprocess.STDOUT)
    from dfz.cluster import UpError, wait_for_cluster

    try:
        cluster = wait_for_cluster(up_dir, 60, alive=lambda: up.poll() is None)
    except UpError as e:
        tail = "\n    ".join((logs / "up.log").read_text(errors="replace").splitlines()[-15:])
        raise DemoError(f"{e}\n    {tail}") from None
    print(f"  dfz up   scheduler {cluster['scheduler']}, seed and daemon ready in {time.monotonic() - t:.1f} s", flush=True)

    t = time.monotonic()
    peers = [Peer("peer 1", cluster["endpoint"], work / "out" / "peer1.bin", logs / "get1.log")]
    daemons: list[tuple[int, subprocess.Popen[bytes], Path]] = []
    for i in range(2, n + 1):
        data = work / f"daemon{i}"
        log_path = logs / f"daemon{i}.log"
        with log_path.open("wb") as log:
            argv = _dfz("daemon", "--data-dir", str(data), "--scheduler", cluster["scheduler"])
            daemons.append((i, procs.spawn(f"daemon {i}", argv, stdout=subprocess.PIPE, stderr=log), log_path))
    for i, proc, log_path in daemons:
        endpoint = _read_line(proc, "api ", 30, f"daemon {i}", log_path)
        peers.append(Peer(f"peer {i}", endpoint, work / "out" / f"peer{i}.bin", logs / f"get{i}.log"))
    (work / "out").mkdir()
    if daemons:
        print(f"  {len(daemons)} more daemons joined in {time.monotonic() - t:.1f} s", flush=True)

    print(f"\nrunning `dfz get {url} -O ... --endpoint ...` on {n} daemons at once:", flush=True)
    try:
        trio.run(_run_gets, GetRun(procs, peers, url, size, want, cluster.get("seed_endpoint"), args.timeout))
    except BaseExceptionGroup as group:
        if group.subgroup(KeyboardInterrupt) is not None:
            raise KeyboardInterrupt from None
        raise
    makespan = max((p.ended or math.inf) for p in peers) - min(p.started for p in peers)
    stats = origin_stats(url)

    print()
    header = f"{'peer':<8} {'daemon':<16} {'time':>8} {'from peers':>12} {'from origin':>12} {'total':>12}  sha256"
    print(header)
    print("-" * len(header))
    for i, peer in enumerate(peers):
        who = "dfz up's daemon" if i == 0 else f"dfz daemon #{i + 1}"
        took = f"{peer.ended - peer.started:.1f} s" if peer.ended is not None else "-"
        s = peer.summary
        verdict = "OK" if peer.sha_ok else ("MISMATCH" if peer.sha_ok is False else f"FAILED (exit {peer.code}, see {peer.log})")
        print(
            f"{peer.name:<8} {who:<16} {took:>8} {s.get('peers', '?'):>12} {s.get('origin', '?'):>12} "
            f"{s.get('total', '?'):>12}  {verdict}"
        )
    ratio = stats["bytes"] / size if size else 0.0
    print("-" * len(header))
    print(
        f"origin egress / file size: {ratio:.3f}  ({stats['bytes']:,} bytes in {stats['requests']} requests "
        f"for a {size:,}-byte file, {size / 1e6:.1f} MB)"
    )
    ok = all(p.code == 0 and p.sha_ok for p in peers)
    total = sum(size for p in peers if p.code == 0)
    print(
        f"delivered: {total / 1e6:.1f} MB to {sum(p.code == 0 for p in peers)} of {n} peers in {makespan:.1f} s "
        f"(from the first `dfz get` to the last exit), {total / max(makespan, 1e-9) / 1e6:.0f} MB/s"
    )
    if peers and all(p.summary.get("origin") == "0 bytes" for p in peers):
        print("the seed alone fetched from the origin; every peer got its bytes from other peers")
    print("all downloads OK, every sha256 right" if ok else "SOME DOWNLOADS FAILED (see above)")
    return 0 if ok else 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=256, help="size of the file (MiB, default 256)")
    parser.add_argument("--peers", type=int, default=5, help="daemons that download it: dfz up's and N-1 more (default 5)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds each download may take (default 300)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, caches) for a look")
    parser.add_argument("--serve", type=Path, metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        return serve_origin(args.serve)
    if args.size_mib < 1 or args.peers < 1:
        parser.error("--size-mib and --peers must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="dfz-demo-", dir="/tmp" if os.path.isdir("/tmp") else None))
    procs = Processes()
    code = 1
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` cleans up like Ctrl-C
    try:
        code = run_demo(args, work, procs)
    except DemoError as e:
        print(f"demo failed: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave processes behind
        codes = procs.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if codes.get("dfz up") not in (None, 0) and code == 0:
            print(f"warning: dfz up exited with {codes['dfz up']} when stopped (see its log)", file=sys.stderr)
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
