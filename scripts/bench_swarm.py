#!/usr/bin/env python3
"""A flash crowd: N dfz daemons fetch one file at once from an origin capped at U bytes/s, against N plain
clients (curl) fetching it straight from the same capped origin, in one run.

The origin is nginx (Debian package; installed with apt-get when missing) serving ``--size`` random bytes
on 127.0.0.1, with an access log of ``$bytes_sent`` per request (the origin's egress).

**How the origin as a whole is capped at U** (``--cap``). nginx's ``limit_rate`` is per connection (per
request), and a dfz seed opens several Range connections at once (``origin_concurrency``, 4), as do N
direct clients: ``limit_rate U`` alone would let the origin send k x U.

* ``tc`` (default; needs root, ``unshare`` and ``tc``): the script re-executes itself in a private
  network namespace (``unshare --net``: its own loopback, gone when the script exits, nothing on the
  machine's ``lo`` is touched) and puts an HTB class of rate U on everything nginx's port sends. Every
  connection shares one token bucket, so the origin sends at most U in total, however many connections
  ask, and none is refused: it behaves like an origin behind a U link. nginx also has ``limit_rate U``
  (per connection; never the binding limit). The class's byte counter is reported next to the log's.
* ``nginx`` (no root needed): ``limit_conn`` of 1 per server (a zone keyed by ``$server_port``) plus
  ``limit_rate U``: one request at a time at U, the others answered 503 at once. It refuses instead of
  slowing down, so the seed is configured with ``origin_concurrency = 1`` (else its parallel ranges fail)
  and curl retries (``--retry``, 1 s apart: the direct clients are served one after another, whose
  makespan N·F/U equals fair sharing's, plus the retry gaps). And it is not a true cap for Range
  requests: nginx lets each request send ``limit_rate x (seconds since it started + 1)``, i.e. one
  second's worth at once, so pieces smaller than U bytes go out unthrottled and the seed beats F/U.
  Use it only where ``tc`` cannot run.

Then, ``--rounds`` times, alternating which goes first:

* **dfz**: a fresh ``dfz sched``, ``dfz seed`` and N ``dfz daemon`` processes (own data directories;
  started and ready before the clock starts), then N ``dfz get URL -O FILE`` started together, one per
  daemon. Per-peer time is from the start of the crowd to that ``dfz get``'s exit. The origin egress is
  the bytes nginx sent meanwhile; the peak RSS of each daemon (and the seed) is VmHWM from /proc, read
  before the daemons are stopped;
* **direct**: N ``curl -o FILE URL`` started together.

CPU seconds are reported too (from /proc for the daemons, seed and scheduler over the crowd; from
``RUSAGE_CHILDREN`` for the ``dfz get`` and curl processes; nginx in neither): with N+2 Python processes
on a 2-core machine the makespan is often CPU-bound, and ``dfz_cpu_s_per_gb`` (per GB delivered to the
N peers) says how far. Every output's sha256 is checked (untimed). ``floor_s`` = F/U: with peers' links faster than the origin
(loopback), the floor ``max(F/U, F/d, N·F/(U + sum u))`` of DESIGN.md is F/U; with the seed's upload limited
to s it is also at least F/s and, with the daemons' limited too, N·F/(s + sum u). Goals (printed):
``origin_egress_ratio`` <= 1.02, ``makespan_s`` <= 1.3 x ``floor_s``, each daemon's peak RSS <= 256 MiB.
The table shows each round; the JSON's top-level figures are medians over rounds (the worst for egress
and RSS). Progress goes to stderr; the last line of stdout is one JSON object. Every process and the
temporary directory are removed on exit, on error and on Ctrl-C. The machine's 2 cores are shared by N+2
Python processes (and whatever else runs there): figures are for this machine and this load.

    .venv/bin/python scripts/bench_swarm.py [--peers 8] [--size 536870912] [--origin-rate 100000000]
        [--rounds 1] [--cap tc|nginx] [--timeout SECONDS] [--dir /dev/shm]
        [--heterogeneous [--upload-rate 50000000] [--seed-upload-rate 100000000]]

``--heterogeneous`` (the scheduling benchmark): a tenth of the daemons (at least one) upload at a tenth
of the rate of the others (``upload_rate_limit``, announced as ``upload_capacity``), the seed's upload is
limited too, and the crowd runs twice per round, with the scheduler's evaluator and with
``evaluator = "random"``, instead of against curl. Its defaults (10 peers, 256 MiB, origin 400 MB/s,
uploads 50 MB/s, the seed's 100 MB/s) make the swarm's uploads the bottleneck, where the choice of
parents matters: behind a slower origin every strategy waits for the origin. The JSON adds
``random_makespan_s``, ``evaluator_wins`` (the median makespans compared) and ``evaluator_rounds_won``.

Exit status: 0 when every download succeeded with the right digest (goals met or not), 1 otherwise (see
the JSON's ``errors``), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import benchlib
from benchlib import MIB, AccessLog, Processes, Service, dfz_command, mib, progress

NETNS_MARK = "DFZ_BENCH_SWARM_NETNS"
GOAL_EGRESS = 1.02
GOAL_MAKESPAN = 1.3
GOAL_RSS_MIB = 256


@dataclass
class Phase:
    """One crowd of N downloads (dfz or direct)."""

    kind: str
    times: list[float | None] = field(default_factory=list)
    origin_bytes: int = 0
    origin_requests: int = 0
    wire_bytes: int | None = None
    digests_ok: bool = True
    rss_mib: list[float | None] = field(default_factory=list)
    seed_rss_mib: float | None = None
    sched_rss_mib: float | None = None
    clients_cpu_s: float = 0.0
    """CPU seconds of the N `dfz get` or curl processes."""
    daemons_cpu_s: list[float | None] = field(default_factory=list)
    seed_cpu_s: float | None = None
    sched_cpu_s: float | None = None
    seed_memory_kib: dict[str, int] = field(default_factory=dict)
    origin_window_s: tuple[float, float] | None = None
    """Seconds from the crowd's start to the first origin request's start and to the last one's end."""
    errors: list[str] = field(default_factory=list)

    def cpu_s(self) -> float:
        """CPU seconds of everything dfz (or curl) ran during the crowd, nginx left out."""
        parts = [*self.daemons_cpu_s, self.seed_cpu_s, self.sched_cpu_s]
        return self.clients_cpu_s + sum(c for c in parts if c is not None)

    def done(self) -> list[float]:
        return sorted(t for t in self.times if t is not None)

    def stats(self) -> dict[str, float | None]:
        t = self.done()
        ok = len(t) == len(self.times) and bool(t)
        return {
            "makespan_s": round(max(t), 3) if ok else None,
            "p50_s": round(statistics.median(t), 3) if t else None,
            "p90_s": round(t[max(0, math.ceil(0.9 * len(t)) - 1)], 3) if t else None,
            "max_s": round(max(t), 3) if t else None,
        }


# --- the capped origin -----------------------------------------------------------------------------------


def enter_netns() -> None:
    """Re-execute this script inside a new network namespace (``unshare --net``), once."""
    if os.environ.get(NETNS_MARK):
        return
    missing = [tool for tool in ("unshare", "tc", "ip") if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}")]
    if os.geteuid() != 0 or missing:
        sys.exit(f"--cap tc needs root and {', '.join(missing) or 'unshare, tc, ip'}; use --cap nginx instead")
    os.environ[NETNS_MARK] = "1"
    os.execvp("unshare", ["unshare", "--net", "--", sys.executable, os.path.abspath(__file__), *sys.argv[1:]])


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def cap_port(port: int, rate: int) -> None:
    """An HTB class of ``rate`` bytes/s on everything sent from ``port`` over this namespace's loopback."""
    run(["tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "0"])
    htb = ["rate", f"{rate}bps", "ceil", f"{rate}bps", "burst", "256k", "cburst", "256k"]
    run(["tc", "class", "add", "dev", "lo", "parent", "1:", "classid", "1:1", "htb", *htb])
    match = ["match", "ip", "sport", str(port), "0xffff", "flowid", "1:1"]
    run(["tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32", *match])


def wire_bytes() -> int | None:
    """Bytes the HTB class has sent (IP packets: headers included)."""
    out = run(["tc", "-s", "class", "show", "dev", "lo", "classid", "1:1"])
    match = re.search(r"Sent (\d+) bytes", out)
    return int(match[1]) if match else None


# --- the crowds ------------------------------------------------------------------------------------------


def crowd(cmds: list[list[str]], logs: Path, timeout: float) -> tuple[list[float | None], list[str], float]:
    """Start every command at once; each one's seconds from the start to its exit (None: failed or timed
    out, with a line in the errors), and their CPU seconds."""
    logs.mkdir(parents=True, exist_ok=True)
    times: list[float | None] = [None] * len(cmds)
    errors: list[str] = []
    procs: list[subprocess.Popen[bytes]] = []
    cpu0 = benchlib.children_cpu_seconds()
    t0 = time.perf_counter()
    try:
        for i, cmd in enumerate(cmds):
            with (logs / f"{i}.err").open("wb") as err:
                procs.append(
                    subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
                )

        def wait(i: int, proc: subprocess.Popen[bytes]) -> None:
            try:
                code = proc.wait(max(0.0, t0 + timeout - time.perf_counter()))
            except subprocess.TimeoutExpired:
                errors.append(f"client {i}: not done after {timeout:g} s")
                return
            if code == 0:
                times[i] = time.perf_counter() - t0
            else:
                tail = (logs / f"{i}.err").read_text(errors="replace").strip()[-1500:]
                errors.append(f"client {i}: exit {code} after {time.perf_counter() - t0:.1f} s: {tail}")

        threads = [threading.Thread(target=wait, args=(i, p), daemon=True) for i, p in enumerate(procs)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():  # join in slices, so that Ctrl-C is seen
                t.join(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return times, errors, benchlib.children_cpu_seconds() - cpu0


def check_outputs(phase: Phase, outputs: list[Path], expected: str) -> None:
    for i, out in enumerate(outputs):
        if phase.times[i] is None:
            phase.digests_ok = False
        elif benchlib.sha256_file(out) != expected:
            phase.digests_ok = False
            phase.errors.append(f"{phase.kind} client {i}: the output's sha256 differs from the file's")
        out.unlink(missing_ok=True)


def direct_phase(args: argparse.Namespace, url: str, tmp: Path, log: AccessLog, expected: str, *, rnd: int) -> Phase:
    phase = Phase("direct")
    outputs = [tmp / f"direct-{i}" for i in range(args.peers)]
    retry = (
        ["--retry", "100000", "--retry-delay", "1", "--retry-max-time", str(math.ceil(args.timeout))]
        if args.cap == "nginx"
        else []
    )
    cmds = [["curl", "-sS", "--fail", *retry, "-o", str(out), url] for out in outputs]
    wire0, (req0, sent0) = (wire_bytes() if args.cap == "tc" else None), log.settled()
    progress(f"round {rnd}: direct: {args.peers} curl clients from the origin at once ...")
    phase.times, phase.errors, phase.clients_cpu_s = crowd(cmds, tmp / f"logs-direct-{rnd}", args.timeout)
    req1, sent1 = log.settled()
    phase.origin_requests, phase.origin_bytes = req1 - req0, sent1 - sent0
    if wire0 is not None:
        wire1 = wire_bytes()
        phase.wire_bytes = None if wire1 is None else wire1 - wire0
    check_outputs(phase, outputs, expected)
    return phase


def slow_daemons(args: argparse.Namespace) -> int:
    """How many daemons upload at a tenth of the others' rate (--heterogeneous): a tenth, at least one."""
    return max(1, round(args.peers / 10)) if args.heterogeneous else 0


def daemon_config(path: Path, data_dir: Path, *, upload_rate: int = 0, origin_concurrency: int | None = None) -> Path:
    """A daemon's TOML: its data directory, and an upload rate (limit and announced capacity) when given."""
    lines = [f'data_dir = "{data_dir}"']
    if upload_rate:
        lines += [f"upload_rate_limit = {upload_rate}", f"upload_capacity = {upload_rate}"]
    if origin_concurrency is not None:
        lines.append(f"origin_concurrency = {origin_concurrency}")
    path.write_text("\n".join(lines) + "\n")
    return path


def dfz_phase(
    args: argparse.Namespace, url: str, tmp: Path, log: AccessLog, expected: str, *, rnd: int, kind: str = "dfz"
) -> Phase:
    """A dfz crowd. ``kind`` "dfz": the scheduler's default evaluator; "random": parents chosen at random."""
    phase = Phase(kind)
    root = tmp / f"{kind}-{rnd}"
    root.mkdir()
    outputs = [root / f"out-{i}" for i in range(args.peers)]
    with Processes(root / "logs") as procs:
        progress(f"round {rnd}: {kind}: starting dfz sched, dfz seed and {args.peers} dfz daemons ...")
        sched_cmd = dfz_command("sched", "--listen", "tcp://127.0.0.1:0")
        if kind == "random":
            (root / "sched.toml").write_text('[scheduler]\nevaluator = "random"\n')
            sched_cmd += ["--config", str(root / "sched.toml")]
        verbose = ["-vv"] if args.keep else []
        sched = procs.start("sched", sched_cmd + verbose)
        scheduler = sched.wait_for(["listening "])["listening "][0]
        fast = args.upload_rate if args.heterogeneous else 0
        seed_conf = daemon_config(
            root / "seed.toml",
            root / "seed",
            upload_rate=args.seed_upload_rate,
            # one request at a time with --cap nginx: the origin refuses a second one
            origin_concurrency=1 if args.cap == "nginx" else None,
        )
        seed = procs.start("seed", dfz_command("seed", "--config", str(seed_conf), "--scheduler", scheduler, *verbose))
        slow = slow_daemons(args)
        daemons: list[Service] = []
        for i in range(args.peers):
            rate = max(1, fast // 10) if i < slow else fast
            conf = daemon_config(root / f"d{i}.toml", root / f"d{i}", upload_rate=rate)
            daemons.append(
                procs.start(f"daemon-{i}", dfz_command("daemon", "--config", str(conf), "--scheduler", scheduler, *verbose))
            )
        seed.wait_for(["api "], timeout=60)
        apis = [d.wait_for(["api "], timeout=60)["api "][0] for d in daemons]
        cmds = [
            dfz_command("get", url, "-O", str(out), "--no-progress", "--endpoint", api, "--timeout", f"{args.timeout:g}")
            for out, api in zip(outputs, apis, strict=True)
        ]
        wire0, (req0, sent0) = (wire_bytes() if args.cap == "tc" else None), log.settled()
        progress(f"round {rnd}: {kind}: {args.peers} dfz get at once ...")
        cpu0 = [s.cpu_seconds() for s in (*daemons, seed, sched)]
        started = time.time()
        phase.times, phase.errors, phase.clients_cpu_s = crowd(cmds, root / "logs-get", args.timeout)
        cpu = [delta(s.cpu_seconds(), c0) for s, c0 in zip((*daemons, seed, sched), cpu0, strict=True)]
        phase.daemons_cpu_s, phase.seed_cpu_s, phase.sched_cpu_s = cpu[:-2], cpu[-2], cpu[-1]
        phase.seed_memory_kib = seed.memory_kib()
        req1, sent1 = log.settled()
        phase.origin_requests, phase.origin_bytes = req1 - req0, sent1 - sent0
        span = log.span(started)
        if span is not None:
            phase.origin_window_s = (round(span[0] - started, 3), round(span[1] - started, 3))
        if wire0 is not None:
            wire1 = wire_bytes()
            phase.wire_bytes = None if wire1 is None else wire1 - wire0
        phase.rss_mib = [mib(d.peak_rss_kib()) for d in daemons]
        phase.seed_rss_mib = mib(seed.peak_rss_kib())
        phase.sched_rss_mib = mib(sched.peak_rss_kib())
        if phase.errors:
            phase.errors += [f"{s.name} log tail:\n{s.tail()}" for s in (seed, sched, *daemons) if s.stderr.stat().st_size]
        codes = {s.name: procs.stop(s) for s in (*reversed(daemons), seed, sched)}
        phase.errors += [f"{name} exited with {code} on SIGTERM" for name, code in codes.items() if code not in (0, None)]
    check_outputs(phase, outputs, expected)
    if args.keep:
        progress(f"round {rnd}: {kind}: kept {root} (logs in logs/)")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return phase


def delta(now: float | None, before: float | None) -> float | None:
    return None if now is None or before is None else round(now - before, 2)


# --- driver ----------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--peers", type=int, help="daemons (and direct clients) downloading at once (default 8; 10 with --heterogeneous)"
    )
    ap.add_argument("--size", type=int, help="file size in bytes (default 536870912; 268435456 with --heterogeneous)")
    ap.add_argument("--origin-rate", type=int, help="origin cap U in bytes/s (default 100000000; 400000000 with --heterogeneous)")
    ap.add_argument("--rounds", type=int, default=1, help="dfz and direct crowds each, alternating (default 1)")
    ap.add_argument("--cap", choices=("tc", "nginx"), default="tc", help="how the origin is capped (see above)")
    ap.add_argument("--timeout", type=float, help="seconds allowed for a crowd (default 60 + 3 N F / U)")
    ap.add_argument(
        "--heterogeneous",
        action="store_true",
        help="a tenth of the daemons (at least one) upload at a tenth of the others' rate (--upload-rate); the"
        " crowd runs with the scheduler's evaluator and with parents chosen at random, instead of against curl",
    )
    ap.add_argument(
        "--upload-rate",
        type=int,
        help="with --heterogeneous: the upload rate limit (and announced capacity) of the fast daemons,"
        " bytes/s (default 50000000); the slow ones get a tenth",
    )
    ap.add_argument(
        "--seed-upload-rate",
        type=int,
        help="the seed's upload rate limit (and announced capacity), bytes/s; 0: unlimited (the default;"
        " 100000000 with --heterogeneous)",
    )
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (data, logs of every process) and run the dfz processes with -vv",
    )
    ap.add_argument(
        "--dir",
        help="where the temporary directory goes (default: $TMPDIR or /tmp); everything (the origin's file, the"
        " daemons' data, outputs) is on that file system, e.g. /dev/shm to leave the disk's writeback out",
    )
    args = ap.parse_args()
    # --heterogeneous compares parent choices, so its defaults make the swarm's uploads the bottleneck:
    # with an origin slower than the peers every strategy waits for the origin and the comparison measures
    # noise (origin 100 MB/s, uploads 200 MB/s, seed unlimited: both within 0.3 s of F/U).
    hetero = args.heterogeneous
    for name, plain, het in (
        ("peers", 8, 10),
        ("size", 512 * MIB, 256 * MIB),
        ("origin_rate", 100_000_000, 400_000_000),
        ("upload_rate", 200_000_000, 50_000_000),
        ("seed_upload_rate", 0, 100_000_000),
    ):
        if getattr(args, name) is None:
            setattr(args, name, het if hetero else plain)
    if args.peers < 1 or args.size < 1 or args.origin_rate < 1 or args.rounds < 1 or args.upload_rate < 10:
        ap.error("--peers, --size, --origin-rate and --rounds must be positive, --upload-rate at least 10")
    if args.timeout is None:
        args.timeout = 60 + 3 * args.peers * args.size / args.origin_rate
    # Install what is missing before leaving the machine's network (the namespace has no route to apt).
    benchlib.ensure_nginx()
    benchlib.ensure_command("curl", "curl")
    if args.cap == "tc":
        if os.geteuid() == 0:
            benchlib.ensure_command("tc", "iproute2")
        enter_netns()
    else:
        progress("--cap nginx: requests shorter than U bytes are not throttled by nginx (see --help); prefer --cap tc")
    benchlib.stop_on_signals()
    phases: list[tuple[int, Phase]] = []

    workdir: contextlib.AbstractContextManager[str] = (
        contextlib.nullcontext(tempfile.mkdtemp(prefix="dfz-bench-swarm-", dir=args.dir))
        if args.keep
        else tempfile.TemporaryDirectory(prefix="dfz-bench-swarm-", dir=args.dir)
    )
    with workdir as tmp_name:
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o755)  # nginx workers run as nobody
        (tmp / "www").mkdir(mode=0o755)
        with Processes(tmp / "logs") as procs:
            progress(f"writing a file of {args.size} random bytes ...")
            expected = benchlib.make_file(str(tmp / "www" / "blob"), args.size)
            log = AccessLog(str(tmp / "access.log"))
            rate = f"limit_rate {args.origin_rate};"
            if args.cap == "nginx":
                http_extra = "limit_conn_zone $server_port zone=origin:1m;"
                server_extra = f"{rate}\n        limit_conn origin 1;\n        limit_conn_status 503;"
            else:
                http_extra, server_extra = "", rate
                run(["ip", "link", "set", "lo", "up"])  # the namespace's own loopback starts down
            nginx_proc, port = benchlib.start_nginx(
                str(tmp), access_log=log.path, http_extra=http_extra, server_extra=server_extra
            )
            procs.adopt("nginx", nginx_proc, tmp / "error.log", tmp / "error.log")
            if args.cap == "tc":
                cap_port(port, args.origin_rate)
            url = f"http://127.0.0.1:{port}/blob"
            progress(
                f"origin {url}, capped at {args.origin_rate} B/s ({args.cap}); floor F/U = {args.size / args.origin_rate:.2f} s"
            )
            for rnd in range(1, args.rounds + 1):
                other = "random" if args.heterogeneous else "direct"
                for kind in ("dfz", other) if rnd % 2 else (other, "dfz"):
                    try:
                        if kind == "direct":
                            phase = direct_phase(args, url, tmp, log, expected, rnd=rnd)
                        else:
                            phase = dfz_phase(args, url, tmp, log, expected, rnd=rnd, kind=kind)
                    except Exception as error:  # a process that did not start, ...: said in the JSON too
                        why = f"{type(error).__name__}: {error}"
                        phase = Phase(kind, times=[None] * args.peers, digests_ok=False, errors=[why])
                    s = phase.stats()
                    progress(
                        f"round {rnd}: {kind}: makespan {s['makespan_s']} s, p50 {s['p50_s']} s, origin sent"
                        f" {phase.origin_bytes / args.size:.3f} x the file, digests {'ok' if phase.digests_ok else 'NOT ok'}"
                        + (f", peak RSS MiB {phase.rss_mib} (seed {phase.seed_rss_mib})" if kind != "direct" else "")
                        + (
                            f"; origin busy from +{phase.origin_window_s[0]} s to +{phase.origin_window_s[1]} s"
                            if phase.origin_window_s
                            else ""
                        )
                    )
                    for e in phase.errors:
                        progress(f"round {rnd}: {kind}: {e}")
                    phases.append((rnd, phase))
    return report(args, phases)


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present and len(present) == len(values) else None


def upload_rates(args: argparse.Namespace) -> list[int] | None:
    """Every daemon's upload limit, or None when some daemon's is unlimited."""
    fast = args.upload_rate if args.heterogeneous else 0
    if not fast:
        return None
    slow = slow_daemons(args)
    return [max(1, fast // 10) if i < slow else fast for i in range(args.peers)]


def swarm_floor(args: argparse.Namespace) -> float:
    """DESIGN.md's floor ``max(F/U, F/d, N*F/(U + sum u))`` with the seed in U's place when its upload
    is limited (every byte enters the swarm through the seed): ``F/s`` (each piece leaves the seed once)
    and ``N*F/(s + sum u)`` (the N copies are uploaded by the seed and the daemons). Loopback links: no F/d."""
    size: int = args.size
    floor: float = size / args.origin_rate
    uploads = upload_rates(args)
    if args.seed_upload_rate:
        floor = max(floor, size / args.seed_upload_rate)
        if uploads is not None:
            floor = max(floor, args.peers * size / (args.seed_upload_rate + sum(uploads)))
    return float(floor)


def report(args: argparse.Namespace, phases: list[tuple[int, Phase]]) -> int:
    size, rate = args.size, args.origin_rate
    floor = swarm_floor(args)
    dfz = [p for _, p in phases if p.kind == "dfz"]
    direct = [p for _, p in phases if p.kind == "direct"]
    rand = [p for _, p in phases if p.kind == "random"]
    random_makespan = median([p.stats()["makespan_s"] for p in rand])
    errors = [f"round {rnd}: {p.kind}: {e}" for rnd, p in phases for e in p.errors]
    all_ok = all(p.digests_ok for _, p in phases) and not errors
    makespan = median([p.stats()["makespan_s"] for p in dfz])
    egress = max(p.origin_bytes for p in dfz) / size if dfz else None
    rss = [r for p in dfz for r in (*p.rss_mib, p.seed_rss_mib) if r is not None]
    rss_max = max(rss) if rss else None
    goals = {
        "origin_egress_ratio": egress is not None and egress <= GOAL_EGRESS,
        "makespan": makespan is not None and makespan <= GOAL_MAKESPAN * floor,
        "peak_rss": rss_max is not None and rss_max <= GOAL_RSS_MIB,
    }

    print(
        f"{args.peers} peers, {size} bytes ({size / MIB:.0f} MiB), origin capped at {rate} B/s ({args.cap});"
        f" floor = {floor:.2f} s; {args.rounds} round(s); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"{'round':>5s} {'crowd':6s} {'makespan':>9s} {'p50':>7s} {'p90':>7s} {'max':>7s}"
        f" {'x floor':>7s} {'origin/F':>8s} {'digests':>7s}"
    )
    for rnd, p in phases:
        s = p.stats()
        ms = s["makespan_s"]
        print(
            f"{rnd:5d} {p.kind:6s} {'FAILED' if ms is None else f'{ms:.2f}':>9s} {s['p50_s'] or 0:7.2f} {s['p90_s'] or 0:7.2f}"
            f" {s['max_s'] or 0:7.2f} {'-' if ms is None else f'{ms / floor:.2f}':>7s} {p.origin_bytes / size:8.3f}"
            f" {'ok' if p.digests_ok else 'NOT ok':>7s}"
        )
    for p in dfz:
        print(f"dfz peak RSS MiB: daemons {p.rss_mib}, seed {p.seed_rss_mib}, scheduler {p.sched_rss_mib};"
              f" seed at the end (KiB): {p.seed_memory_kib}")  # fmt: skip
        print(f"dfz CPU s during the crowd: daemons {p.daemons_cpu_s}, seed {p.seed_cpu_s}, scheduler {p.sched_cpu_s},"
              f" the {args.peers} `dfz get` {p.clients_cpu_s:.2f}: {p.cpu_s():.1f} s in all")  # fmt: skip
    for p in direct:
        print(f"direct CPU s: the {args.peers} curl {p.clients_cpu_s:.2f} (nginx not counted, in either crowd)")
    evaluator_wins = None
    rounds_won: int | None = None
    if args.heterogeneous:
        evaluator_wins = makespan is not None and (random_makespan is None or makespan < random_makespan)
        by_round: dict[int, dict[str, float | None]] = {}
        for rnd, p in phases:
            by_round.setdefault(rnd, {})[p.kind] = p.stats()["makespan_s"]
        rounds_won = sum(
            1 for r in by_round.values() if (a := r.get("dfz")) is not None and ((b := r.get("random")) is None or a < b)
        )
        print(
            f"heterogeneous: {slow_daemons(args)} of {args.peers} daemons upload at {max(1, args.upload_rate // 10)} B/s,"
            f" the others at {args.upload_rate} B/s; makespan with the evaluator {makespan} s, with random"
            f" parents {random_makespan} s (medians): the evaluator {'wins' if evaluator_wins else 'does NOT win'},"
            f" {rounds_won} of {len(by_round)} rounds"
        )
    delivered_gb = args.peers * size / 1e9
    print(
        f"goals: origin_egress_ratio {egress if egress is None else round(egress, 4)} <= {GOAL_EGRESS}:"
        f" {'met' if goals['origin_egress_ratio'] else 'NOT met'}; makespan {makespan} s <= {GOAL_MAKESPAN} x floor"
        f" = {GOAL_MAKESPAN * floor:.2f} s: {'met' if goals['makespan'] else 'NOT met'}; peak RSS {rss_max} MiB"
        f" <= {GOAL_RSS_MIB}: {'met' if goals['peak_rss'] else 'NOT met'}"
    )
    for e in errors:
        print(f"FAILED: {e}", file=sys.stderr)
    result = {
        "makespan_s": makespan,
        "p50_s": median([p.stats()["p50_s"] for p in dfz]),
        "p90_s": median([p.stats()["p90_s"] for p in dfz]),
        "max_s": median([p.stats()["max_s"] for p in dfz]),
        "origin_egress_ratio": None if egress is None else round(egress, 4),
        "direct_makespan_s": median([p.stats()["makespan_s"] for p in direct]),
        "direct_p50_s": median([p.stats()["p50_s"] for p in direct]),
        "direct_origin_egress_ratio": round(max(p.origin_bytes for p in direct) / size, 4) if direct else None,
        "floor_s": round(floor, 3),
        "heterogeneous": args.heterogeneous,
        "random_makespan_s": random_makespan,
        "random_p50_s": median([p.stats()["p50_s"] for p in rand]),
        "evaluator_wins": evaluator_wins,
        "evaluator_rounds_won": rounds_won,
        "makespan_over_floor": None if makespan is None else round(makespan / floor, 3),
        "all_digests_ok": all_ok,
        "peak_rss_mib_max": rss_max,  # over the N daemons and the seed
        "peak_rss_mib": [p.rss_mib for p in dfz],
        "daemons_peak_rss_mib_max": max((r for p in dfz for r in p.rss_mib if r is not None), default=None),
        "seed_peak_rss_mib": [p.seed_rss_mib for p in dfz],
        "sched_peak_rss_mib": [p.sched_rss_mib for p in dfz],
        "goals_met": goals,
        "dfz_cpu_s": median([round(p.cpu_s(), 2) for p in dfz]),
        "dfz_cpu_s_per_gb": median([round(p.cpu_s() / delivered_gb, 3) for p in dfz]),
        "direct_cpu_s": median([round(p.cpu_s(), 2) for p in direct]),
        "seed_memory_kib_end": [p.seed_memory_kib for p in dfz],
        "peers": args.peers,
        "size_bytes": size,
        "origin_rate": rate,
        "cap": args.cap,
        "rounds": [
            {
                "round": rnd,
                "crowd": p.kind,
                **p.stats(),
                "times_s": [None if t is None else round(t, 3) for t in p.times],
                "origin_bytes": p.origin_bytes,
                "origin_requests": p.origin_requests,
                "origin_wire_bytes": p.wire_bytes,
                "origin_window_s": p.origin_window_s,
                "digests_ok": p.digests_ok,
                "cpu_s": round(p.cpu_s(), 2),
                "daemons_cpu_s": p.daemons_cpu_s,
                "seed_cpu_s": p.seed_cpu_s,
                "clients_cpu_s": round(p.clients_cpu_s, 2),
            }
            for rnd, p in phases
        ],
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "errors": errors,
    }
    print(json.dumps(result))
    return 0 if all_ok else 1


if __name__ == "__main__":
    benchlib.ensure_venv()
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: every process stopped, temporary files removed", file=sys.stderr)
        sys.exit(130)
