#!/usr/bin/env python3
"""One download from one parent on loopback: ``dfz get`` (P2P, from a seed that holds the file) against
``curl -o FILE`` of the same file from nginx, alternating in one run.

The script starts, on 127.0.0.1 and free ports, in a temporary directory:

* nginx (Debian package; installed with apt-get when missing and this runs as root) serving a file of
  ``--size-mib`` MiB of random bytes, logging ``$bytes_sent`` of every request to an access log;
* ``dfz sched``; ``dfz seed`` (the parent), which first downloads the file from nginx with ``dfz get``
  (untimed), so that it holds it; ``dfz daemon`` (the child).

Then, ``--rounds`` times, in alternating order (dfz first in odd rounds, curl first in even ones):

* **dfz**: the child's cache is emptied through its local API (untimed), then ``dfz get URL -O FILE``
  on the child is timed, wall clock, process start to exit (the CLI's start-up included, as a user sees
  it). The child must fetch every piece from the seed: the bytes nginx sent during the get (from the
  access log) are reported, and should be about 0;
* **curl**: ``curl -sS --fail -o FILE URL`` from nginx, timed the same way.

Each output's sha256 is checked against the file's (untimed). The CPU column is curl's own for curl, and
for dfz that of the ``dfz get`` process, the child, the seed and the scheduler during the get (nginx in
neither); ``cli_import_s`` is how long Python takes to start and import what ``dfz get`` imports, a
fixed part of ``dfz_s`` that matters for small files. The table shows every round and the
medians; ``ratio`` is curl_s / dfz_s of the medians (goal >= 0.7: dfz verifies every piece's BLAKE3,
curl checks nothing). Progress goes to stderr; the last line of stdout is one JSON object. Every process
and the temporary directory are removed on exit, on error and on Ctrl-C. The machine is shared and noisy:
compare the two columns of one run, not figures of different runs.

    .venv/bin/python scripts/bench_get.py [--size-mib 1024] [--rounds 5] [--timeout 600] [--dir /dev/shm]

Exit status: 0 when every transfer succeeded with the right digest (whether or not the goal was met), 1
otherwise (the JSON's ``errors`` says what failed), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from benchlib import MIB, AccessLog, Processes, Service, dfz_command, mib, progress

GOAL_RATIO = 0.7
P2P_SLACK = 64 * 1024
"""Origin bytes during a timed get still counted as "about 0" (probes, headers)."""


def clear_cache(api: str) -> int:
    """Delete every task in a daemon's cache through its local API; how many there were."""
    import trio

    from dfz.peer.api_client import open_api_client

    async def run() -> int:
        async with open_api_client(api, connect_timeout=10.0) as client:
            deleted = 0
            for task in await client.list_tasks():
                deleted += await client.delete_task(task.task_id)
            return deleted

    return trio.run(run)


def timed(cmd: list[str], timeout: float, *daemons: Service) -> tuple[float, float, subprocess.CompletedProcess[bytes]]:
    """Run ``cmd``: (seconds, CPU seconds of it and of ``daemons`` meanwhile, the outcome)."""
    cpu0 = benchlib.children_cpu_seconds() + sum(d.cpu_seconds() or 0.0 for d in daemons)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    seconds = time.perf_counter() - t0
    return seconds, benchlib.children_cpu_seconds() + sum(d.cpu_seconds() or 0.0 for d in daemons) - cpu0, done


def failure(what: str, done: subprocess.CompletedProcess[bytes], *services: Service) -> str:
    text = f"{what}: exit {done.returncode}: {done.stderr.decode(errors='replace').strip()[-2000:]}"
    for s in services:
        text += f"\n  {s.name} log tail:\n{s.tail()}"
    return text


IMPORTS = "import dfz.cli, dfz.peer.api, dfz.peer.api_client, dfz.peer.local, dfz.tasks, rich.console, rich.progress, trio"
"""What ``dfz get`` imports before it talks to the daemon: timed alone (``cli_import_s``), to show how much of
``dfz_s`` is Python start-up rather than transfer."""


def cli_import_seconds() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORTS], check=True)
    return time.perf_counter() - t0


def dfz_get(
    url: str, out: Path, api: str, timeout: float, *daemons: Service
) -> tuple[float, float, subprocess.CompletedProcess[bytes]]:
    cmd = dfz_command("get", url, "-O", str(out), "--no-progress", "--endpoint", api, "--timeout", f"{timeout:g}")
    return timed(cmd, timeout + 30, *daemons)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="size of the file (MiB), default 1024")
    ap.add_argument("--rounds", type=int, default=5, help="timed downloads of each kind, alternating (default 5)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for each download (default 600)")
    ap.add_argument(
        "--dir",
        help="where the temporary directory goes (default: $TMPDIR or /tmp); everything (the origin's file, the"
        " daemons' data, outputs) is on that file system, e.g. /dev/shm to leave the disk's writeback out",
    )
    args = ap.parse_args()
    if args.size_mib < 1 or args.rounds < 1:
        ap.error("--size-mib and --rounds must be at least 1")
    benchlib.stop_on_signals()
    benchlib.ensure_nginx()
    benchlib.ensure_command("curl", "curl")
    size = args.size_mib * MIB
    errors: list[str] = []
    runs: dict[str, list[float]] = {"dfz": [], "curl": []}
    cpu: dict[str, list[float]] = {"dfz": [], "curl": []}
    origin_during_get: list[int] = []
    digests_ok = True
    rows: list[tuple[int, str, float, float, int | None, bool]] = []
    seed_fetch: dict[str, object] = {}
    rss: dict[str, float | None] = {}
    imports: list[float] = []

    try:
        with tempfile.TemporaryDirectory(prefix="dfz-bench-get-", dir=args.dir) as tmp_name:
            tmp = Path(tmp_name)
            os.chmod(tmp, 0o755)  # nginx workers run as nobody
            (tmp / "www").mkdir(mode=0o755)
            with Processes(tmp / "logs") as procs:
                progress(f"writing a {args.size_mib} MiB file of random bytes ...")
                expected = benchlib.make_file(str(tmp / "www" / "blob"), size)
                log = AccessLog(str(tmp / "access.log"))
                nginx_proc, port = benchlib.start_nginx(str(tmp), access_log=log.path)
                procs.adopt("nginx", nginx_proc, tmp / "error.log", tmp / "error.log")
                url = f"http://127.0.0.1:{port}/blob"
                progress(f"nginx serves {url}; starting dfz sched, dfz seed and dfz daemon ...")

                sched = procs.start("sched", dfz_command("sched", "--listen", "tcp://127.0.0.1:0"))
                scheduler = sched.wait_for(["listening "])["listening "][0]
                seed = procs.start("seed", dfz_command("seed", "--data-dir", str(tmp / "seed"), "--scheduler", scheduler))
                child = procs.start("child", dfz_command("daemon", "--data-dir", str(tmp / "child"), "--scheduler", scheduler))
                seed_api = seed.wait_for(["api "])["api "][0]
                child_api = child.wait_for(["api "])["api "][0]
                progress(f"scheduler {scheduler}; seed api {seed_api}; child api {child_api}")

                # The parent gets the file from the origin first (untimed for the comparison, but reported).
                before = log.settled()
                out = tmp / "seed-copy"
                seconds, _, done = dfz_get(url, out, seed_api, args.timeout)
                after = log.settled()
                seed_fetch = {"seconds": round(seconds, 3), "origin_bytes": after[1] - before[1], "exit": done.returncode}
                if done.returncode != 0:
                    errors.append(failure("dfz get on the seed (from the origin)", done, seed, sched))
                else:
                    ok = benchlib.sha256_file(out) == expected
                    seed_fetch["digest_ok"] = ok
                    digests_ok &= ok
                    out.unlink()
                    progress(
                        f"the seed holds the file: {seconds:.2f} s from the origin, {after[1] - before[1]} bytes sent by nginx"
                    )

                for rnd in range(args.rounds if not errors else 0):
                    for kind in ("dfz", "curl") if rnd % 2 == 0 else ("curl", "dfz"):
                        out = tmp / f"out-{kind}"
                        if kind == "dfz":
                            imports.append(cli_import_seconds())
                            deleted = clear_cache(child_api)
                            if deleted:
                                progress(f"round {rnd + 1}: deleted {deleted} task(s) from the child's cache")
                            before = log.settled()
                            seconds, cpu_s, done = dfz_get(url, out, child_api, args.timeout, child, seed, sched)
                            after = log.settled()
                            origin: int | None = after[1] - before[1]
                        else:
                            seconds, cpu_s, done = timed(["curl", "-sS", "--fail", "-o", str(out), url], args.timeout)
                            origin = None
                        if done.returncode != 0:
                            errors.append(
                                failure(f"round {rnd + 1}: {kind}", done, *((child, seed, sched) if kind == "dfz" else ()))
                            )
                            out.unlink(missing_ok=True)
                            continue
                        ok = benchlib.sha256_file(out) == expected
                        out.unlink()
                        digests_ok &= ok
                        if not ok:
                            errors.append(f"round {rnd + 1}: {kind}: the output's sha256 differs from the file's")
                        runs[kind].append(seconds)
                        cpu[kind].append(cpu_s)
                        if origin is not None:
                            origin_during_get.append(origin)
                        rows.append((rnd + 1, kind, seconds, cpu_s, origin, ok))
                        origin_text = f", origin sent {origin} bytes" if origin is not None else ""
                        progress(
                            f"round {rnd + 1}: {kind:4s} {seconds:6.2f} s  {size / seconds / 1e9:5.2f} GB/s{origin_text},"
                            f" digest {'ok' if ok else 'WRONG'}"
                        )

                for s in (seed, child):  # VmHWM before they stop
                    rss[s.name] = mib(s.peak_rss_kib())
    except Exception as e:  # a process that did not start, an API error: said in the JSON too
        errors.append(f"{type(e).__name__}: {e}")

    cli_import_s = round(statistics.median(imports), 3) if imports else None
    return report(
        args=args,
        size=size,
        runs=runs,
        cpu=cpu,
        rows=rows,
        origin_during_get=origin_during_get,
        digests_ok=digests_ok,
        seed_fetch=seed_fetch,
        rss=rss,
        cli_import_s=cli_import_s,
        errors=errors,
    )


def report(
    *,
    args: argparse.Namespace,
    size: int,
    runs: dict[str, list[float]],
    rows: list[tuple[int, str, float, float, int | None, bool]],
    cpu: dict[str, list[float]],
    origin_during_get: list[int],
    digests_ok: bool,
    seed_fetch: dict[str, object],
    rss: dict[str, float | None],
    cli_import_s: float | None,
    errors: list[str],
) -> int:
    dfz_s = round(statistics.median(runs["dfz"]), 3) if runs["dfz"] else None
    curl_s = round(statistics.median(runs["curl"]), 3) if runs["curl"] else None
    ratio = round(curl_s / dfz_s, 3) if dfz_s and curl_s else None
    met = ratio is not None and ratio >= GOAL_RATIO and digests_ok and not errors
    # "About 0": a probe's headers at most; a child that went back to source shows the file's size.
    p2p_only = bool(origin_during_get) and max(origin_during_get) <= P2P_SLACK
    for e in errors:
        print(f"FAILED: {e}", file=sys.stderr)
    print(
        f"{size // MIB} MiB, one parent (dfz seed) -> one child (dfz daemon) on loopback vs curl from nginx;"
        f" {args.rounds} alternating rounds; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    cpu_s = {k: round(statistics.median(v), 2) if v else None for k, v in cpu.items()}
    print(f"{'round':>6s} {'client':6s} {'seconds':>8s} {'GB/s':>6s} {'CPU s':>6s} {'origin bytes':>13s} {'digest':>6s}")
    for rnd, kind, seconds, cpu_seconds, origin, ok in rows:
        print(
            f"{rnd:6d} {kind:6s} {seconds:8.2f} {size / seconds / 1e9:6.2f} {cpu_seconds:6.2f}"
            f" {'-' if origin is None else origin:>13} {'ok' if ok else 'WRONG':>6s}"
        )
    for kind, median in (("dfz", dfz_s), ("curl", curl_s)):
        if median:
            print(f"{'median':>6s} {kind:6s} {median:8.2f} {size / median / 1e9:6.2f} {cpu_s[kind] or 0:6.2f}")
    print("CPU s: dfz = the child, the seed, the scheduler and the `dfz get` process during the get; curl = curl's own")
    print(f"seed's fetch from the origin (untimed): {seed_fetch}; peak RSS MiB: {rss}")
    print(f"python start-up and the imports of `dfz get` alone (part of dfz_s): {cli_import_s} s (median)")
    print(
        f"ratio curl_s / dfz_s = {ratio if ratio is not None else 'n/a'} (goal >= {GOAL_RATIO}: {'met' if met else 'NOT met'});"
        f" origin bytes during the timed gets: {origin_during_get or 'n/a'}"
        f" ({'P2P only' if p2p_only else 'NOT P2P only: the child fetched from the origin'})"
    )
    print(
        json.dumps(
            {
                "dfz_s": dfz_s,
                "curl_s": curl_s,
                "ratio": ratio,
                "goal_ratio": GOAL_RATIO,
                "goal_met": met,
                "origin_bytes_during_get": max(origin_during_get) if origin_during_get else None,
                "origin_bytes_during_get_runs": origin_during_get,
                "p2p_only": p2p_only,
                "size_bytes": size,
                "rounds": args.rounds,
                "dfz_runs_s": [round(s, 3) for s in runs["dfz"]],
                "curl_runs_s": [round(s, 3) for s in runs["curl"]],
                "dfz_cpu_s": cpu_s["dfz"],
                "curl_cpu_s": cpu_s["curl"],
                "all_digests_ok": digests_ok and not errors,
                "seed_fetch": seed_fetch,
                "peak_rss_mib": rss,
                "cli_import_s": cli_import_s,
                "cpus": os.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "errors": errors,
            }
        )
    )
    return 0 if not errors and digests_ok else 1


if __name__ == "__main__":
    benchlib.ensure_venv()
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: every process stopped, temporary files removed", file=sys.stderr)
        sys.exit(130)
