#!/usr/bin/env python3
"""Which HTTP client should dfz's back-to-source path use? Candidates against ``curl``, under trio.

A local nginx (Debian package; installed with apt-get when missing and this runs as root) serves a
file of ``--size-mib`` MiB of random bytes from a temporary directory on 127.0.0.1 and a free port.
Each candidate reads the whole file two ways, the two ways a seed peer reads an origin:

* **ranges**: ``--piece-mib`` MiB Range requests, ``--concurrency`` of them in flight (trio tasks; the
  thread-based clients run each request in ``trio.to_thread.run_sync``). Each piece arrives as one
  buffer, checked for length and 206 status.
* **stream**: one GET of the whole file, chunks handed to a trio task (the thread-based clients hand
  ~4 MiB chunks across with ``trio.from_thread.run``, or the trio task pulls them with
  ``trio.to_thread.run_sync``).

Candidates: ``curl`` (the reference: one process per run; ranges with ``--parallel``), ``dfz`` (the
chosen back-to-source backend, :class:`dfz.peer.source.http.HTTPBackend`: ``read_range`` with ``expect``
and ``stream``), ``pycurl`` (libcurl in threads, bodies as memoryviews copied into the piece buffer),
``urllib3`` and ``requests`` (in threads), ``httpx`` (``AsyncClient`` under trio). With ``--tls`` nginx
serves https with a self-signed certificate that every client verifies.

Rounds interleave the candidates in a rotating order, so a neighbour's load on a shared machine spreads
over all of them; the table shows medians (and min-max) of ``--rounds`` runs. CPU is user+system seconds
of this process (``RUSAGE_SELF``; of the child for curl) per GB, not counting nginx: on a busy machine it
is steadier than throughput. GB/s = 1e9 bytes/s. The last line of stdout is one JSON object with every
figure.

    .venv/bin/python scripts/bench_http_clients.py [--size-mib 1024] [--rounds 5] [--piece-mib 4]
        [--concurrency 4] [--clients curl,dfz,pycurl,urllib3,requests,httpx] [--tls]
        [--url URL --size-bytes N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from benchlib import make_file, start_nginx

from dfz.peer.source.http import HTTPBackend

MIB = 1024 * 1024
STREAM_CHUNK = 4 * MIB
MODES = ("ranges", "stream")
ALL_CLIENTS = ("curl", "dfz", "pycurl", "urllib3", "requests", "httpx")


@dataclass(frozen=True)
class Job:
    url: str
    size: int
    piece: int
    concurrency: int
    cafile: str | None = None  # for https: the origin's self-signed certificate, verified by every client

    def ranges(self) -> list[tuple[int, int]]:
        return [(start, min(self.piece, self.size - start)) for start in range(0, self.size, self.piece)]


# --- the origin ------------------------------------------------------------------------------------------


# free_port, wait_port, ensure_nginx, make_file, make_certificate and start_nginx: scripts/benchlib.py


# --- candidates ------------------------------------------------------------------------------------------
# Each takes a Job and returns the number of bytes it received; the driver times it and takes the CPU.


async def run_ranges(job: Job, fetch: Callable[[int, int], Awaitable[int]]) -> int:
    """``job.concurrency`` trio tasks take the next range until none is left."""
    todo = iter(job.ranges())
    total = 0

    async def worker() -> None:
        nonlocal total
        for start, length in todo:
            n = await fetch(start, length)  # not `total += await ...`: that reads total before awaiting
            total += n

    async with trio.open_nursery() as nursery:
        for _ in range(job.concurrency):
            nursery.start_soon(worker)
    return total


def range_header(start: int, length: int) -> str:
    return f"bytes={start}-{start + length - 1}"


def check(status: int, expected: int, got: int, length: int) -> None:
    if status != expected or got != length:
        raise RuntimeError(f"status {status} (expected {expected}), {got} bytes (expected {length})")


async def pycurl_ranges(job: Job) -> int:
    import pycurl  # type: ignore[import-untyped,import-not-found,unused-ignore]  # candidates are not dependencies of dfz

    handles = [pycurl.Curl() for _ in range(job.concurrency)]
    free = list(handles)

    def get(c: pycurl.Curl, start: int, length: int) -> int:
        buf = bytearray(length)
        view = memoryview(buf)
        pos = 0

        def write(data: memoryview) -> None:
            nonlocal pos
            view[pos : pos + len(data)] = data
            pos += len(data)

        c.setopt(pycurl.URL, job.url)
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.BUFFERSIZE, 1 * MIB)
        if job.cafile:
            c.setopt(pycurl.CAINFO, job.cafile)
        c.setopt(pycurl.RANGE, f"{start}-{start + length - 1}")
        c.setopt(pycurl.WRITEFUNCTION, write, use_memoryview=True)
        c.perform()
        check(c.getinfo(pycurl.RESPONSE_CODE), 206, pos, length)
        return pos

    async def fetch(start: int, length: int) -> int:
        c = free.pop()
        try:
            return await trio.to_thread.run_sync(get, c, start, length)
        finally:
            free.append(c)

    try:
        return await run_ranges(job, fetch)
    finally:
        for c in handles:
            c.close()


async def pycurl_stream(job: Job) -> int:
    import pycurl  # type: ignore[import-untyped,import-not-found,unused-ignore]  # candidates are not dependencies of dfz

    send, recv = trio.open_memory_channel[bytearray](2)

    def get() -> None:
        c = pycurl.Curl()
        buf = bytearray(STREAM_CHUNK)
        view = memoryview(buf)
        pos = 0

        def write(data: memoryview) -> None:
            nonlocal buf, view, pos
            n = min(len(data), STREAM_CHUNK - pos)
            view[pos : pos + n] = data[:n] if n < len(data) else data
            pos += n
            if pos == STREAM_CHUNK:
                trio.from_thread.run(send.send, buf)
                buf = bytearray(STREAM_CHUNK)
                view = memoryview(buf)
                pos = len(data) - n
                view[:pos] = data[n:]

        try:
            c.setopt(pycurl.URL, job.url)
            c.setopt(pycurl.NOSIGNAL, 1)
            c.setopt(pycurl.BUFFERSIZE, 1 * MIB)
            if job.cafile:
                c.setopt(pycurl.CAINFO, job.cafile)
            c.setopt(pycurl.WRITEFUNCTION, write, use_memoryview=True)
            c.perform()
            if pos:
                trio.from_thread.run(send.send, buf[:pos])
        finally:
            c.close()
            trio.from_thread.run_sync(send.close)

    total = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, get)
        async for chunk in recv:
            total += len(chunk)
    return total


async def urllib3_ranges(job: Job) -> int:
    import urllib3  # type: ignore[import-untyped,import-not-found,unused-ignore]  # candidates are not dependencies of dfz

    pool = urllib3.PoolManager(maxsize=job.concurrency, ca_certs=job.cafile)

    def get(start: int, length: int) -> int:
        r = pool.request(
            "GET", job.url, headers={"Range": range_header(start, length)}, preload_content=False, decode_content=False
        )
        data = r.read()
        r.release_conn()
        check(r.status, 206, len(data), length)
        return len(data)

    async def fetch(start: int, length: int) -> int:
        return await trio.to_thread.run_sync(get, start, length)

    try:
        return await run_ranges(job, fetch)
    finally:
        pool.clear()


async def urllib3_stream(job: Job) -> int:
    import urllib3  # type: ignore[import-untyped,import-not-found,unused-ignore]  # candidates are not dependencies of dfz

    pool = urllib3.PoolManager(ca_certs=job.cafile)
    r = await trio.to_thread.run_sync(lambda: pool.request("GET", job.url, preload_content=False, decode_content=False))
    total = 0
    while chunk := await trio.to_thread.run_sync(r.read, STREAM_CHUNK):
        total += len(chunk)
    r.release_conn()
    pool.clear()
    return total


async def requests_ranges(job: Job) -> int:
    import requests  # type: ignore[import-untyped,import-not-found,unused-ignore]  # candidates are not dependencies of dfz
    import requests.adapters  # type: ignore[import-untyped,import-not-found,unused-ignore]  # candidates are not dependencies of dfz

    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=job.concurrency))
    session.mount("https://", requests.adapters.HTTPAdapter(pool_maxsize=job.concurrency))

    def get(start: int, length: int) -> int:
        r = session.get(job.url, headers={"Range": range_header(start, length)}, verify=job.cafile or True)
        check(r.status_code, 206, len(r.content), length)
        return len(r.content)

    async def fetch(start: int, length: int) -> int:
        return await trio.to_thread.run_sync(get, start, length)

    try:
        return await run_ranges(job, fetch)
    finally:
        session.close()


async def requests_stream(job: Job) -> int:
    import requests  # type: ignore[import-untyped,import-not-found,unused-ignore]  # candidates are not dependencies of dfz

    with requests.Session() as session:
        r = await trio.to_thread.run_sync(lambda: session.get(job.url, stream=True, verify=job.cafile or True))
        chunks = r.iter_content(STREAM_CHUNK)
        total = 0
        while chunk := await trio.to_thread.run_sync(next, chunks, b""):
            total += len(chunk)
        r.close()
        return total


def httpx_verify(job: Job) -> ssl.SSLContext | bool:
    # requests' session.verify loses to REQUESTS_CA_BUNDLE in the environment, hence verify= per request above.
    return ssl.create_default_context(cafile=job.cafile) if job.cafile else True


async def httpx_ranges(job: Job) -> int:
    import httpx  # type: ignore[import-untyped,import-not-found,unused-ignore]  # candidates are not dependencies of dfz

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=job.concurrency), verify=httpx_verify(job)) as client:

        async def fetch(start: int, length: int) -> int:
            r = await client.get(job.url, headers={"Range": range_header(start, length)})
            check(r.status_code, 206, len(r.content), length)
            return len(r.content)

        return await run_ranges(job, fetch)


async def httpx_stream(job: Job) -> int:
    import httpx  # type: ignore[import-untyped,import-not-found,unused-ignore]  # candidates are not dependencies of dfz

    total = 0
    async with httpx.AsyncClient(verify=httpx_verify(job)) as client, client.stream("GET", job.url) as r:
        async for chunk in r.aiter_raw():
            total += len(chunk)
    return total


def dfz_backend(job: Job) -> HTTPBackend:
    return HTTPBackend(ca_bundle=job.cafile)


async def dfz_ranges(job: Job) -> int:
    backend = dfz_backend(job)
    info = await backend.stat(job.url)

    async def fetch(start: int, length: int) -> int:
        return len(await backend.read_range(job.url, start, length, expect=info))

    try:
        return await run_ranges(job, fetch)
    finally:
        backend.close()


async def dfz_stream(job: Job) -> int:
    backend = dfz_backend(job)
    total = 0
    try:
        async with backend.stream(job.url) as chunks:
            async for chunk in chunks:
                total += len(chunk)
    finally:
        backend.close()
    return total


IN_PROCESS: dict[tuple[str, str], Callable[[Job], Awaitable[int]]] = {
    ("dfz", "ranges"): dfz_ranges,
    ("dfz", "stream"): dfz_stream,
    ("pycurl", "ranges"): pycurl_ranges,
    ("pycurl", "stream"): pycurl_stream,
    ("urllib3", "ranges"): urllib3_ranges,
    ("urllib3", "stream"): urllib3_stream,
    ("requests", "ranges"): requests_ranges,
    ("requests", "stream"): requests_stream,
    ("httpx", "ranges"): httpx_ranges,
    ("httpx", "stream"): httpx_stream,
}


def curl_command(job: Job, mode: str, tmp: str) -> list[str]:
    tls = ["--cacert", job.cafile] if job.cafile else []
    if mode == "stream":
        return ["curl", "-sS", "--fail", *tls, "-o", "/dev/null", job.url]
    config = os.path.join(tmp, "curl-ranges.conf")
    with open(config, "w") as f:
        f.write(f"parallel\nparallel-max = {job.concurrency}\nno-progress-meter\n")
        for i, (start, length) in enumerate(job.ranges()):
            if i:
                f.write("next\n")
            f.write(f'url = "{job.url}"\nrange = "{start}-{start + length - 1}"\noutput = "/dev/null"\nfail\n')
            if job.cafile:  # per transfer: `next` resets it
                f.write(f'cacert = "{job.cafile}"\n')
    return ["curl", "-sS", "-K", config]


# --- driver ----------------------------------------------------------------------------------------------


def cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def measure(client: str, mode: str, job: Job, tmp: str) -> tuple[float, float]:
    """One run: (seconds, CPU seconds)."""
    if client == "curl":
        cmd = curl_command(job, mode, tmp)
        c0, t0 = cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
        subprocess.run(cmd, check=True)
        return time.perf_counter() - t0, cpu(resource.RUSAGE_CHILDREN) - c0
    fn = IN_PROCESS[(client, mode)]
    c0, t0 = cpu(resource.RUSAGE_SELF), time.perf_counter()
    got = trio.run(fn, job)
    seconds, cpu_s = time.perf_counter() - t0, cpu(resource.RUSAGE_SELF) - c0
    if got != job.size:
        raise RuntimeError(f"{client} {mode}: {got} bytes, expected {job.size}")
    return seconds, cpu_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--piece-mib", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--clients", default=",".join(ALL_CLIENTS))
    ap.add_argument("--tls", action="store_true", help="serve https (self-signed certificate, verified)")
    ap.add_argument("--url", help="use this origin instead of starting nginx (needs --size-bytes)")
    ap.add_argument("--size-bytes", type=int, help="the size of --url's content")
    args = ap.parse_args()
    clients = [c for c in args.clients.split(",") if c]
    for c in clients:
        if c not in ALL_CLIENTS:
            sys.exit(f"unknown client {c!r}; known: {', '.join(ALL_CLIENTS)}")
        if c in ("pycurl", "urllib3", "requests", "httpx") and importlib.util.find_spec(c) is None:
            sys.exit(f"{c} is not installed: `.venv/bin/pip install {c}`, or leave it out of --clients")

    with tempfile.TemporaryDirectory(prefix="dfz-bench-http-") as tmp:
        os.chmod(tmp, 0o755)  # nginx workers run as nobody
        nginx: subprocess.Popen[bytes] | None = None
        cafile = None
        if args.url:
            if not args.size_bytes:
                sys.exit("--url needs --size-bytes")
            url, size = args.url, args.size_bytes
        else:
            size = args.size_mib * MIB
            os.mkdir(os.path.join(tmp, "www"))
            os.chmod(os.path.join(tmp, "www"), 0o755)
            print(f"writing a {args.size_mib} MiB file ...", file=sys.stderr)
            make_file(os.path.join(tmp, "www", "blob"), size)
            nginx, port = start_nginx(tmp, args.tls)
            url = f"{'https' if args.tls else 'http'}://127.0.0.1:{port}/blob"
            cafile = os.path.join(tmp, "cert.pem") if args.tls else None
        job = Job(url=url, size=size, piece=args.piece_mib * MIB, concurrency=args.concurrency, cafile=cafile)
        try:
            # Warm the page cache and the connection path once, untimed.
            subprocess.run(curl_command(job, "stream", tmp), check=True)
            results: dict[str, dict[str, list[tuple[float, float]]]] = {c: {m: [] for m in MODES} for c in clients}
            pairs = [(c, m) for c in clients for m in MODES]
            for rnd in range(args.rounds):
                shift = rnd % len(pairs)
                for client, mode in pairs[shift:] + pairs[:shift]:
                    s, c = measure(client, mode, job, tmp)
                    results[client][mode].append((s, c))
                    print(f"round {rnd + 1}: {client:9s} {mode:6s} {size / s / 1e9:5.2f} GB/s  cpu {c:5.2f} s", file=sys.stderr)
        finally:
            if nginx is not None:
                nginx.terminate()
                nginx.wait(10)

    report(results, job, args, clients)


def report(
    results: dict[str, dict[str, list[tuple[float, float]]]], job: Job, args: argparse.Namespace, clients: list[str]
) -> None:
    gb = job.size / 1e9
    summary: dict[str, dict[str, dict[str, float | None]]] = {}
    for client in clients:
        summary[client] = {}
        for mode in MODES:
            runs = results[client][mode]
            rates = [gb / s for s, _ in runs]
            cpus = [c / gb for _, c in runs]
            summary[client][mode] = {
                "gbps_median": round(statistics.median(rates), 3),
                "gbps_min": round(min(rates), 3),
                "gbps_max": round(max(rates), 3),
                "cpu_s_per_gb_median": round(statistics.median(cpus), 3),
            }
    median_gbps = {c: {m: statistics.median(job.size / s / 1e9 for s, _ in results[c][m]) for m in MODES} for c in clients}
    print(
        f"{job.size // MIB} MiB from {job.url}; {args.piece_mib} MiB ranges x {job.concurrency} in flight;"
        f" medians of {args.rounds} rounds; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"{'client':10s} {'mode':7s} {'GB/s':>6s} {'(min-max)':>13s} {'CPU s/GB':>9s} {'vs curl':>8s}")
    for client in clients:
        for mode in MODES:
            s = summary[client][mode]
            ratio = round(median_gbps[client][mode] / median_gbps["curl"][mode], 3) if "curl" in median_gbps else None
            s["ratio_to_curl"] = ratio
            print(
                f"{client:10s} {mode:7s} {s['gbps_median']:6.2f} {s['gbps_min']:6.2f}-{s['gbps_max']:<6.2f}"
                f" {s['cpu_s_per_gb_median']:9.2f} {'-' if ratio is None else f'{ratio:.2f}':>8s}"
            )
    print(
        json.dumps(
            {
                "size_bytes": job.size,
                "piece_bytes": job.piece,
                "concurrency": job.concurrency,
                "rounds": args.rounds,
                "cpus": os.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "results": summary,
            }
        )
    )


if __name__ == "__main__":
    main()
