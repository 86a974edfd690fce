#!/usr/bin/env python3
"""Back-to-source must not cap the swarm: a seed fetching a file from nginx (``dfz get`` on the seed's own
local API, so the seed reads the origin with its HTTP source backend) against ``curl -o FILE`` of the same
file, alternating in one run.

The script starts, on 127.0.0.1 and free ports, in a temporary directory: nginx (installed with apt-get
when missing and this runs as root) serving ``--size-mib`` MiB of random bytes, ``dfz sched`` and
``dfz seed``. Then, ``--rounds`` times, in alternating order:

* **seed**: the seed's cache is emptied through its local API (untimed), then ``dfz get URL -O FILE`` on
  the seed is timed, wall clock, process start to exit: ``origin_concurrency`` range requests in flight,
  every piece BLAKE3-hashed and written to the seed's storage, the whole-file digest computed, the file
  exported to FILE. nginx's access log must show the whole file sent once per round;
* **curl**: ``curl -sS --fail -o FILE URL``, timed the same way.

Each output's sha256 is checked (untimed). ``ratio`` is curl_s / seed_s of the medians (goal >= 0.7).
Progress goes to stderr; the last line of stdout is one JSON object with ``seed_s``, ``curl_s`` and
``ratio``. The machine is shared and noisy: compare the two columns of one run, not different runs.

    .venv/bin/python scripts/bench_source.py [--size-mib 1024] [--rounds 3] [--timeout 600] [--dir /dev/shm]

Exit status: 0 when every transfer succeeded with the right digest (goal met or not), 1 otherwise, 130 on
Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import benchlib
from bench_get import clear_cache, dfz_get, failure, timed
from benchlib import MIB, AccessLog, Processes, dfz_command, mib, progress

GOAL_RATIO = 0.7


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="size of the file (MiB), default 1024")
    ap.add_argument("--rounds", type=int, default=3, help="timed downloads of each kind, alternating (default 3)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for each download (default 600)")
    ap.add_argument("--dir", help="where the temporary directory goes (default: $TMPDIR or /tmp)")
    args = ap.parse_args()
    if args.size_mib < 1 or args.rounds < 1:
        ap.error("--size-mib and --rounds must be at least 1")
    benchlib.stop_on_signals()
    benchlib.ensure_nginx()
    benchlib.ensure_command("curl", "curl")
    size = args.size_mib * MIB
    errors: list[str] = []
    runs: dict[str, list[float]] = {"seed": [], "curl": []}
    cpu: dict[str, list[float]] = {"seed": [], "curl": []}
    origin_bytes: list[int] = []
    rss: float | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="dfz-bench-source-", dir=args.dir) as tmp_name:
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
                sched = procs.start("sched", dfz_command("sched", "--listen", "tcp://127.0.0.1:0"))
                scheduler = sched.wait_for(["listening "])["listening "][0]
                seed = procs.start("seed", dfz_command("seed", "--data-dir", str(tmp / "seed"), "--scheduler", scheduler))
                seed_api = seed.wait_for(["api "])["api "][0]
                progress(f"nginx serves {url}; scheduler {scheduler}; seed api {seed_api}")
                for rnd in range(args.rounds):
                    for kind in ("seed", "curl") if rnd % 2 == 0 else ("curl", "seed"):
                        out = tmp / f"out-{kind}"
                        if kind == "seed":
                            clear_cache(seed_api)
                            before = log.settled()
                            seconds, cpu_s, done = dfz_get(url, out, seed_api, args.timeout, seed, sched)
                            origin_bytes.append(log.settled()[1] - before[1])
                        else:
                            seconds, cpu_s, done = timed(["curl", "-sS", "--fail", "-o", str(out), url], args.timeout)
                        if done.returncode != 0:
                            errors.append(failure(f"round {rnd + 1}: {kind}", done, *((seed, sched) if kind == "seed" else ())))
                            out.unlink(missing_ok=True)
                            continue
                        ok = benchlib.sha256_file(out) == expected
                        out.unlink()
                        if not ok:
                            errors.append(f"round {rnd + 1}: {kind}: the output's sha256 differs from the file's")
                            continue
                        runs[kind].append(seconds)
                        cpu[kind].append(cpu_s)
                        progress(
                            f"round {rnd + 1}: {kind:4s} {seconds:6.2f} s  {size / seconds / 1e9:5.2f} GB/s  CPU {cpu_s:.2f} s"
                        )
                rss = mib(seed.peak_rss_kib())
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}")

    seed_s = round(statistics.median(runs["seed"]), 3) if runs["seed"] else None
    curl_s = round(statistics.median(runs["curl"]), 3) if runs["curl"] else None
    ratio = round(curl_s / seed_s, 3) if seed_s and curl_s else None
    met = ratio is not None and ratio >= GOAL_RATIO and not errors
    for message in errors:
        print(f"FAILED: {message}", file=sys.stderr)
    cpu_median = {k: round(statistics.median(v), 2) if v else None for k, v in cpu.items()}
    print(
        f"{size // MIB} MiB from nginx on loopback: dfz seed back-to-source vs curl; {args.rounds} alternating rounds;"
        f" load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    for kind, median in (("seed", seed_s), ("curl", curl_s)):
        if median:
            print(
                f"  {kind:5s} median {median:7.2f} s  {size / median / 1e9:5.2f} GB/s  CPU {cpu_median[kind]} s runs {runs[kind]}"
            )
    print(f"  origin bytes per seed round: {origin_bytes}; seed peak RSS {rss} MiB (CPU: seed, scheduler, dfz get)")
    print(f"  ratio curl_s / seed_s = {ratio} (goal >= {GOAL_RATIO}: {'met' if met else 'NOT met'})")
    print(
        json.dumps(
            {
                "seed_s": seed_s,
                "curl_s": curl_s,
                "ratio": ratio,
                "goal_ratio": GOAL_RATIO,
                "goal_met": met,
                "size_bytes": size,
                "rounds": args.rounds,
                "seed_runs_s": [round(s, 3) for s in runs["seed"]],
                "curl_runs_s": [round(s, 3) for s in runs["curl"]],
                "seed_cpu_s": cpu_median["seed"],
                "curl_cpu_s": cpu_median["curl"],
                "origin_bytes_per_seed_round": origin_bytes,
                "seed_peak_rss_mib": rss,
                "cpus": os.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "errors": errors,
            }
        )
    )
    return 0 if not errors else 1


if __name__ == "__main__":
    benchlib.ensure_venv()
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: every process stopped, temporary files removed", file=sys.stderr)
        sys.exit(130)
