#!/usr/bin/env python3
"""Load on one manager: many daemons keeping alive and asking for schedulers over the fabric, plus
concurrent REST clients (issue 5, section 6).

What runs:

* **One real ``dfz mgr``** process on SQLite (WAL) in a temporary directory, its keepalive interval set to
  ``--keepalive`` (5 s) and its other settings at their defaults (daemons re-ask for schedulers every
  ``--refresh`` seconds, the manager's default 30 s).
* **Simulated daemons**: ``--daemons`` fabric sessions, spread over ``--workers`` worker processes (this
  script with ``--worker``), each session one ``dfz/broker`` client (its own ZeroMQ socket and TCP
  connection, as a real daemon has): no multiplexing of several daemons on one session, because the
  manager's cost is per session (heartbeats, session table, liveness) and that is what is measured. Each
  daemon does what ``dfz daemon --manager`` does (``dfz/mgr/agent.py``): ``mgr.register`` as a host,
  ``mgr.list_schedulers``, then ``mgr.keepalive`` every ``keepalive_ms`` the manager said and
  ``mgr.list_schedulers`` again every ``refresh_ms``. Registrations are spread over ``--ramp`` seconds and
  keepalives over the interval (daemons do not start in the same millisecond).
* **REST clients**: ``--api-clients`` concurrent HTTP clients (each its own connection, a personal access
  token), each in a closed loop with ``--api-think`` seconds between requests on average (exponentially
  distributed, so that the clients stay independent; default 1 s: a console
  or a program polling, about 50 requests/s in all; 0 sends back to back): list hosts (a page of 50), get
  a host, list active schedulers, list clusters, ``/users/me``, and now and then change an application.
  They run in this process (``rest_clients_cpu_percent`` says how busy it was: on a small machine the
  clients compete with the manager for the CPUs, and their latencies include that).

Phases: ramp (all daemons register), settle, **A** daemons only for ``--duration`` seconds (the manager's
CPU there is ``manager_cpu_percent``), **B** daemons and REST clients for ``--duration`` seconds (latencies
there are ``api_*``; ``manager_cpu_percent_with_api``). Then the hosts are counted through the REST API
(``hosts_active``: every daemon must be a registered, active host).

Goals (issue 5 §6): the daemons at a 5 s keepalive hold (every keepalive answered, none failed, every host
active) with the manager under half a core (``manager_cpu_percent`` < 50), and ``api_p99_ms`` <= 100.
Printed as PASS/FAIL; ``--quick`` (a small run for the smoke test) prints them too but they mean nothing
there. The last line of output is one JSON object with the figures.

Run with the repository's virtualenv: ``.venv/bin/python scripts/bench_mgr.py`` (full size, about 2.5
minutes) or ``--quick``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import random
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

benchlib.ensure_venv()

import httpx  # noqa: E402
import trio  # noqa: E402

ROOT_PASSWORD = "bench-root-password"


# --- the simulated daemons (a worker process) -------------------------------------------------------------


@dataclass
class WorkerCounts:
    registered: int = 0
    register_failed: int = 0
    keepalives: int = 0
    """Keepalives answered within the measured window."""
    keepalive_failed: int = 0
    lookups: int = 0
    lookup_failed: int = 0
    schedulers_seen: int = 0
    """Schedulers in the last answer of the last daemon (all answers are of the same cluster)."""
    latencies_ms: list[float] = field(default_factory=list)


async def _one_daemon(
    index: int, args: argparse.Namespace, ctx: Any, counts: WorkerCounts, *, register_at: float, window: tuple[float, float]
) -> None:
    from dfz.broker import Client, ClientConfig, ConnectionLost, RemoteError, RequestTimeout
    from dfz.mgr.messages import (
        MGR_CATALOGUE,
        MgrAlive,
        MgrKeepalive,
        MgrListSchedulers,
        MgrRegister,
        MgrRegistered,
        MgrSchedulers,
    )

    failures = (ConnectionLost, RequestTimeout, RemoteError)
    host_id = f"bench-{args.worker_index}-{index}"
    n = args.worker_index * 100_000 + index
    ip = f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255 or 1}"
    hostname = f"bench-host-{args.worker_index}-{index}"
    await trio.sleep_until(register_at)
    client = Client(
        MGR_CATALOGUE,
        args.fabric,
        name=f"bench-daemon-{host_id}",
        config=ClientConfig(heartbeat=args.keepalive, timeout=30.0, reconnect_max=2.0),
        ctx=ctx,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        register = MgrRegister(
            kind="host", host_id=host_id, hostname=hostname, ip=ip, port=65000, os="linux", platform="bench", arch="x86_64"
        )
        lookup = MgrListSchedulers(host_id=host_id, hostname=hostname, ip=ip)
        while True:
            try:
                registered = (await client.request(register, timeout=30.0)).expect(MgrRegistered)
                break
            except failures:
                counts.register_failed += 1
                await trio.sleep(1.0)
        counts.registered += 1
        interval = registered.keepalive_ms / 1000
        refresh = 30.0
        next_lookup = trio.current_time()
        # Keepalives spread over the interval: this daemon's phase is its registration time.
        tick = trio.current_time() + interval
        while True:
            now = trio.current_time()
            if now >= next_lookup:
                try:
                    answer = (await client.request(lookup, timeout=30.0)).expect(MgrSchedulers)
                    refresh = answer.refresh_ms / 1000
                    if window[0] <= trio.current_time() <= window[1]:
                        counts.lookups += 1
                    counts.schedulers_seen = len(answer.schedulers)
                except failures:
                    counts.lookup_failed += 1
                next_lookup = trio.current_time() + refresh
            await trio.sleep_until(tick)
            tick += interval
            sent = trio.current_time()
            try:
                (await client.request(MgrKeepalive(), timeout=max(3 * interval, 1.0))).expect(MgrAlive)
            except failures:
                if window[0] <= sent <= window[1]:
                    counts.keepalive_failed += 1
                continue
            done = trio.current_time()
            if window[0] <= done <= window[1]:
                counts.keepalives += 1
                counts.latencies_ms.append((done - sent) * 1000)


async def _worker_main(args: argparse.Namespace) -> None:
    import zmq

    from dfz.broker import default_context

    ctx: zmq.Context[Any] = default_context()
    counts = WorkerCounts()
    # Wall-clock instants from the parent, in this process's trio clock.
    offset = trio.current_time() - time.time()
    start, window = args.start_at + offset, (args.window_from + offset, args.window_until + offset)
    with trio.move_on_at(args.stop_at + offset):
        async with trio.open_nursery() as nursery:
            for i in range(args.count):
                at = start + args.ramp * (i * args.workers + args.worker_index) / max(1, args.count * args.workers)
                nursery.start_soon(functools.partial(_one_daemon, i, args, ctx, counts, register_at=at, window=window))
    latencies = sorted(counts.latencies_ms)
    out = {k: v for k, v in counts.__dict__.items() if k != "latencies_ms"}
    # Enough of the distribution for the parent's percentiles, at bounded size.
    step = max(1, len(latencies) // 20_000)
    out["latencies_ms"] = [round(x, 3) for x in latencies[::step]]
    out["latency_weight"] = step
    print(json.dumps(out), flush=True)


# --- the REST clients -------------------------------------------------------------------------------------


@dataclass
class ApiCounts:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    by_kind: dict[str, list[float]] = field(default_factory=dict)
    cpu_start: float = 0.0
    cpu_end: float = 0.0
    t_start: float = 0.0
    t_end: float = 0.0
    own_cpu: float = 0.0
    """CPU seconds of this process (the REST clients) in the window."""


async def _api_client(  # noqa: PLR0917 - one client's whole setup
    client: httpx.AsyncClient,
    host_ids: list[int],
    app_ids: list[int],
    think: float,
    start: float,
    until: float,
    counts: ApiCounts,
    seed: int,
) -> None:
    rng = random.Random(seed)
    await trio.sleep_until(start + rng.uniform(0, max(think, 0.05)))
    while trio.current_time() < until:
        r = rng.random()
        if r < 0.35:
            kind, request = "list_hosts", client.get("/hosts", params={"page": rng.randint(1, 20), "per_page": 50})
        elif r < 0.55:
            kind, request = "get_host", client.get(f"/hosts/{rng.choice(host_ids)}")
        elif r < 0.70:
            kind, request = "list_schedulers", client.get("/schedulers", params={"state": "active"})
        elif r < 0.82:
            kind, request = "list_clusters", client.get("/scheduler-clusters")
        elif r < 0.95:
            kind, request = "me", client.get("/users/me")
        else:
            body = {"priority": rng.randint(0, 6)}
            kind, request = "patch_application", client.patch(f"/applications/{rng.choice(app_ids)}", json=body)
        started = time.perf_counter()
        try:
            answer = await request
            ok = answer.status_code < 400
        except httpx.HTTPError:
            ok = False
        took = (time.perf_counter() - started) * 1000
        if ok:
            counts.latencies_ms.append(took)
            counts.by_kind.setdefault(kind, []).append(took)
        else:
            counts.errors += 1
        if think > 0:
            # Exponential think times: independent clients, which a fixed pause would soon line up
            # into bursts of all 50 at once (each burst's stall delaying the next in step).
            await trio.sleep(rng.expovariate(1 / think))


# --- the parent -------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


async def _setup(base: str, args: argparse.Namespace) -> tuple[str, list[int]]:
    """Root signs in; a default cluster with two active schedulers; a token for the REST clients; applications."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as root:
        answer = await root.post("/sessions", json={"name": "root", "password": ROOT_PASSWORD})
        answer.raise_for_status()
        cluster = (await root.post("/scheduler-clusters", json={"name": "bench", "is_default": True})).json()
        for i in range(2):
            body = {"hostname": f"sched-{i}", "ip": f"127.0.0.{i + 1}", "port": 8002, "state": "active"}
            (await root.post("/schedulers", json={**body, "scheduler_cluster_id": cluster["id"]})).raise_for_status()
        apps = []
        for i in range(20):
            created = await root.post("/applications", json={"name": f"app-{i}", "priority": i % 7})
            created.raise_for_status()
            apps.append(created.json()["id"])
        token = (await root.post("/personal-access-tokens", json={"name": "bench", "scopes": ["*"]})).json()["token"]
    return token, apps


async def _rest(base: str, token: str, path: str, **params: Any) -> Any:
    async with httpx.AsyncClient(base_url=base, timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
        answer = await client.get(path, params=params)
        answer.raise_for_status()
        return answer.json()


async def _api_phase(base: str, token: str, args: argparse.Namespace, apps: list[int], mgr: benchlib.Service) -> ApiCounts:
    """The measured REST load. Everything a client does once is done before the window opens, so that
    the window measures the steady state: the host list is fetched, the clients are made (each httpx
    client loads the CA bundle, tens of ms of CPU) and each opens its connection with one untimed request.
    Made at the start of the window instead, that burst stalled the first second's requests (bench_mgr's
    p99 was set by them)."""
    hosts = await _rest(base, token, "/hosts", per_page=1000)
    host_ids = [h["id"] for h in hosts["items"]] or [1]
    counts = ApiCounts()
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for _ in range(args.api_clients):
            client = httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)
            clients.append(await stack.enter_async_context(client))
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(client.get, "/users/me")
        await trio.sleep(1.0)  # let the manager settle after the warm-up
        start = trio.current_time()
        until = start + args.duration
        counts.cpu_start, counts.t_start, own0 = _cpu(mgr), time.monotonic(), _own_cpu()
        async with trio.open_nursery() as nursery:
            for i, client in enumerate(clients):
                nursery.start_soon(_api_client, client, host_ids, apps, args.api_think, start, until, counts, i)
        counts.cpu_end, counts.t_end, counts.own_cpu = _cpu(mgr), time.monotonic(), _own_cpu() - own0
    return counts


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _sleep_until(at: float) -> None:
    time.sleep(max(0.0, at - time.time()))


def _cpu(service: benchlib.Service) -> float:
    value = service.cpu_seconds()
    if value is None:
        raise RuntimeError(f"the manager exited:\n{service.tail()}")
    return value


def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="dfz-bench-mgr-"))
    config = tmp / "mgr.toml"
    config.write_text(
        f'database = "sqlite:///{tmp / "manager.db"}"\nlisten = "127.0.0.1:0"\n'
        f"keepalive = {args.keepalive}\nrefresh = {args.refresh}\n"
    )
    with benchlib.Processes(tmp / "logs") as procs:
        os.environ["DFZ_MGR_ROOT_PASSWORD"] = ROOT_PASSWORD
        try:
            mgr = procs.start("mgr", benchlib.dfz_command("mgr", "--config", str(config)))
        finally:
            os.environ.pop("DFZ_MGR_ROOT_PASSWORD", None)
        ready = mgr.wait_for(["listening ", "fabric "], timeout=60)
        base, fabric = ready["listening "][0] + "/api/v1", ready["fabric "][0]
        benchlib.progress(f"manager at {base}, fabric {fabric}")
        token, apps = trio.run(_setup, base, args)

        now = time.time()
        start_at = now + 2.0
        window_from = start_at + args.ramp + args.settle
        window_until = window_from + 2 * args.duration
        stop_at = window_until + 15.0  # after the hosts are counted through the REST API
        per_worker = [args.daemons // args.workers + (1 if w < args.daemons % args.workers else 0) for w in range(args.workers)]
        workers = []
        for w, count in enumerate(per_worker):
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                *("--fabric", fabric, "--worker-index", str(w), "--workers", str(args.workers), "--count", str(count)),
                *("--keepalive", str(args.keepalive), "--ramp", str(args.ramp)),
                *("--start-at", repr(start_at), "--window-from", repr(window_from), "--window-until", repr(window_until)),
                *("--stop-at", repr(stop_at)),
            ]
            workers.append(procs.start(f"worker-{w}", cmd))
        benchlib.progress(f"{args.daemons} daemons in {args.workers} workers: ramp {args.ramp:g} s, settle {args.settle:g} s")

        _sleep_until(window_from)
        benchlib.progress(f"phase A: daemons only, {args.duration:g} s")
        cpu0, t0 = _cpu(mgr), time.monotonic()
        _sleep_until(window_from + args.duration)
        cpu1, t1 = _cpu(mgr), time.monotonic()
        benchlib.progress(f"phase B: daemons and {args.api_clients} REST clients, {args.duration:g} s")
        api = trio.run(_api_phase, base, token, args, apps, mgr)
        client_cpu = api.own_cpu / (api.t_end - api.t_start) * 100
        active = trio.run(functools.partial(_rest, base, token, "/hosts", state="active", per_page=1))["total"]
        hosts_total = trio.run(functools.partial(_rest, base, token, "/hosts", per_page=1))["total"]
        memory = mgr.memory_kib()

        results = []
        for worker in workers:
            try:
                worker.proc.wait(timeout=max(30.0, stop_at - time.time() + 30))
            except Exception:
                raise RuntimeError(f"{worker.name} did not finish:\n{worker.tail()}") from None
            lines = worker.lines()
            if worker.proc.returncode != 0 or not lines:
                raise RuntimeError(f"{worker.name} failed ({worker.proc.returncode}):\n{worker.tail()}")
            results.append(json.loads(lines[-1]))

    latencies: list[float] = []
    for r in results:
        latencies += [x for x in r["latencies_ms"] for _ in range(r["latency_weight"])]
    window = window_until - window_from
    totals = {
        key: sum(r[key] for r in results)
        for key in ("registered", "register_failed", "keepalives", "keepalive_failed", "lookups", "lookup_failed")
    }
    cpu_a = (cpu1 - cpu0) / (t1 - t0) * 100
    cpu_b = (api.cpu_end - api.cpu_start) / (api.t_end - api.t_start) * 100
    api_done = len(api.latencies_ms)
    expected = args.daemons * window / args.keepalive
    return {
        "daemons": args.daemons,
        "workers": args.workers,
        "keepalive_s": args.keepalive,
        "refresh_s": args.refresh,
        "api_clients": args.api_clients,
        "api_think_s": args.api_think,
        "duration_s": args.duration,
        **totals,
        "keepalives_per_s": round(totals["keepalives"] / window, 1),
        "keepalives_expected_per_s": round(expected / window, 1),
        "keepalive_p50_ms": round(percentile(latencies, 50), 2),
        "keepalive_p99_ms": round(percentile(latencies, 99), 2),
        "lookups_per_s": round(totals["lookups"] / window, 2),
        "schedulers_in_answer": min((r["schedulers_seen"] for r in results), default=0),
        "hosts_registered": hosts_total,
        "hosts_active": active,
        "manager_cpu_percent": round(cpu_a, 1),
        "manager_cpu_percent_with_api": round(cpu_b, 1),
        "manager_rss_mib": benchlib.mib(memory.get("VmRSS")),
        "rest_clients_cpu_percent": round(client_cpu, 1),
        "cpus": os.cpu_count(),
        "api_requests": api_done,
        "api_requests_per_s": round(api_done / args.duration, 1),
        "api_errors": api.errors,
        "api_p50_ms": round(percentile(api.latencies_ms, 50), 2),
        "api_p99_ms": round(percentile(api.latencies_ms, 99), 2),
        "api_max_ms": round(max(api.latencies_ms, default=math.nan), 2),
        "api_by_kind": {k: len(v) for k, v in sorted(api.by_kind.items())},
        "api_p99_by_kind_ms": {k: round(percentile(v, 99), 2) for k, v in sorted(api.by_kind.items())},
    }


def goals(r: dict[str, Any]) -> dict[str, bool]:
    held = (
        r["keepalive_failed"] == 0
        and r["register_failed"] == 0
        and r["hosts_active"] == r["daemons"]
        and r["keepalives_per_s"] >= 0.95 * r["keepalives_expected_per_s"]
    )
    return {
        "daemons_hold": held,
        "manager_cpu_percent": r["manager_cpu_percent"] < 50,
        "api_p99_ms": r["api_p99_ms"] <= 100 and r["api_errors"] == 0,
    }


def table(r: dict[str, Any], met: dict[str, bool]) -> str:
    rows = [
        ("daemons (sessions) / workers", f"{r['daemons']} / {r['workers']}"),
        ("keepalive interval, refresh", f"{r['keepalive_s']:g} s, {r['refresh_s']:g} s"),
        ("registered / failed", f"{r['registered']} / {r['register_failed']}"),
        ("hosts in REST (active / all)", f"{r['hosts_active']} / {r['hosts_registered']}"),
        ("keepalives/s (expected)", f"{r['keepalives_per_s']} ({r['keepalives_expected_per_s']})"),
        ("keepalive failed", r["keepalive_failed"]),
        ("keepalive p50 / p99 ms", f"{r['keepalive_p50_ms']} / {r['keepalive_p99_ms']}"),
        ("lookups/s (failed)", f"{r['lookups_per_s']} ({r['lookup_failed']})"),
        ("manager CPU %, daemons only", r["manager_cpu_percent"]),
        ("manager CPU %, with REST", r["manager_cpu_percent_with_api"]),
        ("manager RSS MiB", r["manager_rss_mib"]),
        ("REST clients, think s", f"{r['api_clients']}, {r['api_think_s']:g}"),
        ("REST clients' own CPU % (CPUs)", f"{r['rest_clients_cpu_percent']} ({r['cpus']})"),
        ("REST requests/s (errors)", f"{r['api_requests_per_s']} ({r['api_errors']})"),
        ("REST p50 / p99 / max ms", f"{r['api_p50_ms']} / {r['api_p99_ms']} / {r['api_max_ms']}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    lines.append(
        f"goal: {r['daemons']} daemons at {r['keepalive_s']:g} s keepalive hold: {'PASS' if met['daemons_hold'] else 'FAIL'}"
    )
    lines.append(
        f"goal: manager under half a core (< 50 %): {r['manager_cpu_percent']} % "
        f"{'PASS' if met['manager_cpu_percent'] else 'FAIL'}"
    )
    lines.append(f"goal: api_p99_ms <= 100 (no errors): {r['api_p99_ms']} {'PASS' if met['api_p99_ms'] else 'FAIL'}")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small, short run (the smoke test): 60 daemons, 1 s keepalive")
    p.add_argument("--daemons", type=int, default=1000)
    p.add_argument("--workers", type=int, default=4, help="processes the simulated daemons run in")
    p.add_argument("--keepalive", type=float, default=5.0, help="the manager's keepalive interval, seconds")
    p.add_argument("--refresh", type=float, default=30.0, help="seconds between a daemon's mgr.list_schedulers")
    p.add_argument("--ramp", type=float, default=20.0, help="seconds over which the daemons register")
    p.add_argument("--settle", type=float, default=10.0, help="seconds after the ramp before measuring")
    p.add_argument("--duration", type=float, default=45.0, help="seconds of each measured phase")
    p.add_argument("--api-clients", type=int, default=50)
    p.add_argument(
        "--api-think", type=float, default=1.0, help="seconds a REST client waits between its requests (0: back to back)"
    )
    # A worker's (internal) arguments.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fabric", help=argparse.SUPPRESS)
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    for name in ("--start-at", "--window-from", "--window-until", "--stop-at"):
        p.add_argument(name, type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and not args.worker:
        args.daemons, args.workers, args.keepalive, args.refresh = 60, 2, 1.0, 3.0
        args.ramp, args.settle, args.duration, args.api_clients = 2.0, 2.0, 3.0, 5
    return args


def main() -> None:
    args = parse()
    if args.worker:
        trio.run(_worker_main, args)
        return
    benchlib.stop_on_signals()
    r = run(args)
    met = goals(r)
    r["goals_met"] = sorted(k for k, v in met.items() if v)
    r["goals_failed"] = sorted(k for k, v in met.items() if not v)
    print(table(r, met))
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
