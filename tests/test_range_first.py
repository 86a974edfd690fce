"""A Range request on the proxy port fetches the pieces it covers first, end to end on real sockets: an HTTP
origin serving a blob like a registry (:func:`e2e_helpers.serve_origin`, counting the body bytes it writes),
an in-process :class:`SchedulerService`, daemons with their proxy port (the registry mirror) and an HTTP
client. Progress is measured in bytes (at the origin, or received by the daemon), never in time."""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
from collections.abc import Callable
from pathlib import Path

import httpx
import trio
from e2e_helpers import Route, serve_origin

from dfz.peer.config import DaemonConfig
from dfz.peer.daemon import Daemon
from dfz.peer.download import DownloaderConfig
from dfz.peer.local import DownloadRequest, DownloadState
from dfz.sched.service import SchedulerService, ServiceConfig
from dfz.tasks import PieceLayout

MiB = 1 << 20
BLOB = random.Random(21).randbytes(64 * MiB - 1234)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
PATH = f"/v2/x/img/blobs/{DIGEST}"
LAYOUT = PieceLayout.for_content(len(BLOB))  # the piece length the daemon chooses: 16 pieces of 4 MiB
LAST = LAYOUT.count - 1
TAIL = f"bytes={len(BLOB) - 1000}-"  # the last 1000 bytes: all in the last piece


def _get(url: str, headers: dict[str, str]) -> httpx.Response:
    with httpx.Client(timeout=60) as client:
        return client.get(url, headers=headers)


async def http_get(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return await trio.to_thread.run_sync(functools.partial(_get, url, headers or {}))


async def until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (the caller bounds the wait with ``trio.fail_after``)."""
    for _ in itertools.count():
        if condition():
            return
        await trio.sleep(0.01)


def task_id(daemon: Daemon) -> str:
    return DownloadRequest(url="", output=None, digest=DIGEST, by_digest=True, tenant=daemon.tenant or "").task_id()


def stored_pieces(daemon: Daemon) -> list[int]:
    stored = daemon.storage.get(task_id(daemon))
    assert stored is not None
    return stored.stored_pieces()


def idle(daemon: Daemon) -> Callable[[], bool]:
    """The daemon runs no download of the blob's task (it ended, or stopped)."""
    return lambda: task_id(daemon) not in daemon._downloads


def mirror_config(tmp: Path, name: str, scheduler: str, upstream: str, **kw: object) -> DaemonConfig:
    return DaemonConfig(
        data_dir=tmp / name,
        scheduler=scheduler,
        proxy_listen="127.0.0.1:0",
        mirror_upstream=upstream,
        report_interval=0.02,
        **kw,  # type: ignore[arg-type]
    )


async def test_a_range_of_the_last_piece_is_read_from_the_origin_first(tmp_path: Path) -> None:
    """One daemon, no seed: it fetches from the (rate-limited) origin itself. The 206 of the last 1000
    bytes comes after the origin served a few pieces (the ranges in flight), not the file; the download then
    stops, keeping its pieces, and a whole GET afterwards resumes from them."""
    assert LAYOUT.count == 16
    with serve_origin({PATH: Route(BLOB, rate=8 * MiB)}) as origin, trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            sched = await nursery.start(SchedulerService(ServiceConfig(listen=("tcp://127.0.0.1:0",))).run)
            config = mirror_config(tmp_path, "d", sched.endpoints[0], origin.url, origin_concurrency=4)
            daemon = await nursery.start(Daemon(config).run)
            url = daemon.proxy_url + PATH

            r = await http_get(url, {"Range": TAIL})
            served_at_206 = origin.served.get(PATH, 0)
            assert r.status_code == 206, r.text
            assert r.headers["content-range"] == f"bytes {len(BLOB) - 1000}-{len(BLOB) - 1}/{len(BLOB)}"
            assert r.content == BLOB[-1000:]
            # The last piece was among the first 4 ranges asked (origin_concurrency): at most those 4 pieces and
            # the start of the next ones were served, where reading in order serves the whole file first.
            assert served_at_206 <= 6 * LAYOUT.piece_length, f"{served_at_206} bytes of {len(BLOB)} before the 206"

            # Nobody else wants the task: the download stops, and the pieces stored so far stay.
            await until(idle(daemon))
            kept = stored_pieces(daemon)
            assert LAST in kept and len(kept) < LAYOUT.count
            await until(lambda: origin.active == 0)  # the ranges the stop cut short are over at the origin
            before, from_origin = origin.served[PATH], daemon.totals.bytes_from_origin

            # A whole GET later: the content, resumed (the kept pieces are not fetched again).
            r = await http_get(url)
            assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == DIGEST.split(":")[1]
            again = origin.served[PATH] - before
            missing = sum(LAYOUT.size(i) for i in range(LAYOUT.count) if i not in kept)
            assert again == missing == daemon.totals.bytes_from_origin - from_origin, (again, missing)
            nursery.cancel_scope.cancel()


async def test_a_range_through_the_swarm_takes_its_pieces_first(tmp_path: Path) -> None:
    """A seed has the blob, daemon A part of it (a range of its first bytes, its download stopped after);
    daemon B (one piece in flight per parent, its download rate-limited) asks for the last 1000 bytes: the
    last piece is among the first it fetches, and B received at most 3 pieces of 16 when the 206 is
    complete (its download then stops, as nobody else wants the task)."""
    with serve_origin({PATH: Route(BLOB)}) as origin, trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            sched = await nursery.start(SchedulerService(ServiceConfig(listen=("tcp://127.0.0.1:0",))).run)
            endpoint = sched.endpoints[0]
            seed = await nursery.start(
                Daemon(DaemonConfig(data_dir=tmp_path / "seed", scheduler=endpoint, seed=True, report_interval=0.02)).run
            )
            a = await nursery.start(Daemon(mirror_config(tmp_path, "a", endpoint, origin.url)).run)
            b = await nursery.start(
                Daemon(
                    mirror_config(tmp_path, "b", endpoint, origin.url, download_rate_limit=16 * MiB),
                    downloader_config=DownloaderConfig(window=1),
                ).run
            )
            request = DownloadRequest(url=origin.url + PATH, output=None, digest=DIGEST, by_digest=True)
            results = [p async for p in seed.download(request)]
            assert results[-1].state is DownloadState.SUCCEEDED, results[-1]

            r = await http_get(a.proxy_url + PATH, {"Range": "bytes=0-99"})
            assert r.status_code == 206 and r.content == BLOB[:100]
            await until(idle(a))
            a_kept = stored_pieces(a)
            assert 0 in a_kept and len(a_kept) < LAYOUT.count

            r = await http_get(b.proxy_url + PATH, {"Range": TAIL})
            received_at_206 = b.totals.bytes_from_peers
            assert r.status_code == 206 and r.content == BLOB[-1000:]
            # One piece in flight per parent: the last piece is in B's first assignment; the other parent's
            # fetches share the rate meanwhile (rarest first, the last piece is one of 16: about 8 pieces).
            assert received_at_206 <= 3 * LAYOUT.piece_length, f"B received {received_at_206} bytes before the 206"
            await until(idle(b))
            b_kept = stored_pieces(b)
            assert LAST in b_kept and len(b_kept) <= 4, b_kept
            assert origin.served[PATH] == len(BLOB)  # only the seed went to the origin
            nursery.cancel_scope.cancel()


async def test_concurrent_range_readers_are_all_served_first(tmp_path: Path) -> None:
    """Three readers of one blob at once (its start, its middle, its end) on one daemon that fetches from the
    rate-limited origin: the union of their ranges is read first, so all three 206s are complete before
    the origin served half the file."""
    ranges = [(0, 99), (8 * LAYOUT.piece_length + 5, 8 * LAYOUT.piece_length + 4004), (len(BLOB) - 1000, len(BLOB) - 1)]
    with serve_origin({PATH: Route(BLOB, rate=8 * MiB)}) as origin, trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            sched = await nursery.start(SchedulerService(ServiceConfig(listen=("tcp://127.0.0.1:0",))).run)
            config = mirror_config(tmp_path, "d", sched.endpoints[0], origin.url, origin_concurrency=4)
            daemon = await nursery.start(Daemon(config).run)
            answers: dict[int, httpx.Response] = {}

            async def read(i: int) -> None:
                start, last = ranges[i]
                answers[i] = await http_get(daemon.proxy_url + PATH, {"Range": f"bytes={start}-{last}"})

            async with trio.open_nursery() as readers:
                for i in range(len(ranges)):
                    readers.start_soon(read, i)
            served = origin.served.get(PATH, 0)
            for i, (start, last) in enumerate(ranges):
                assert answers[i].status_code == 206 and answers[i].content == BLOB[start : last + 1]
            assert served <= 8 * LAYOUT.piece_length, f"{served} bytes of {len(BLOB)} before the three 206s"
            await until(idle(daemon))  # all three served, nobody else: the download stops
            kept = stored_pieces(daemon)
            assert {0, 8, LAST} <= set(kept) and len(kept) < LAYOUT.count
            nursery.cancel_scope.cancel()


async def test_a_malformed_wanted_range_is_a_bad_request(tmp_path: Path) -> None:
    with serve_origin({PATH: Route(BLOB)}) as origin, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            sched = await nursery.start(SchedulerService(ServiceConfig(listen=("tcp://127.0.0.1:0",))).run)
            daemon = await nursery.start(Daemon(DaemonConfig(data_dir=tmp_path / "d", scheduler=sched.endpoints[0])).run)
            for bad in [(10, 10), (10, 3), (-5, 100)]:
                request = DownloadRequest(url=origin.url + PATH, output=None, priority_range=bad)
                results = [p async for p in daemon.download(request)]
                assert len(results) == 1 and results[0].state is DownloadState.FAILED
                assert results[0].error_kind == "bad_request", results[0]
            assert origin.requests.get(PATH, 0) == 0
            nursery.cancel_scope.cancel()


async def test_a_range_reader_beside_a_whole_reader_comes_first_and_the_download_goes_on(tmp_path: Path) -> None:
    """A whole GET and a Range of the last bytes of one blob at once: the range's piece is read first (its
    206 is complete after a few pieces), and its reader leaving does not stop the download, which the whole
    reader still follows to the end (the origin serves the blob once)."""
    with serve_origin({PATH: Route(BLOB, rate=8 * MiB)}) as origin, trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            sched = await nursery.start(SchedulerService(ServiceConfig(listen=("tcp://127.0.0.1:0",))).run)
            config = mirror_config(tmp_path, "d", sched.endpoints[0], origin.url, origin_concurrency=4)
            daemon = await nursery.start(Daemon(config).run)
            url = daemon.proxy_url + PATH
            whole: list[httpx.Response] = []
            served_at_206: list[int] = []

            async def read_whole() -> None:
                whole.append(await http_get(url))

            async def read_tail() -> None:
                r = await http_get(url, {"Range": TAIL})
                served_at_206.append(origin.served.get(PATH, 0))
                assert r.status_code == 206 and r.content == BLOB[-1000:]

            async with trio.open_nursery() as readers:
                readers.start_soon(read_whole)
                readers.start_soon(read_tail)
            assert served_at_206[0] <= 8 * LAYOUT.piece_length, f"{served_at_206[0]} bytes of {len(BLOB)} before the 206"
            assert whole[0].status_code == 200 and whole[0].content == BLOB
            assert origin.served[PATH] == len(BLOB)
            assert stored_pieces(daemon) == list(range(LAYOUT.count))
            nursery.cancel_scope.cancel()


async def test_a_seed_sent_to_the_origin_reads_the_range_first(tmp_path: Path) -> None:
    """With a seed host, the seed fetches the blob from the (rate-limited) origin for the swarm: the range's
    bytes travel with the daemon's registration to the seed's trigger (``sched.register_peer`` and
    ``sched.seed`` ``wanted``), so the seed reads the last piece among its first ranges and the daemon's 206
    is complete long before the origin served the file; the seed goes on to the end (it fetches for the
    swarm)."""
    with serve_origin({PATH: Route(BLOB, rate=8 * MiB)}) as origin, trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            sched = await nursery.start(SchedulerService(ServiceConfig(listen=("tcp://127.0.0.1:0",))).run)
            endpoint = sched.endpoints[0]
            seed = await nursery.start(
                Daemon(
                    DaemonConfig(
                        data_dir=tmp_path / "seed", scheduler=endpoint, seed=True, report_interval=0.02, origin_concurrency=4
                    )
                ).run
            )
            daemon = await nursery.start(Daemon(mirror_config(tmp_path, "d", endpoint, origin.url)).run)
            await until(lambda: len(sched.core.hosts) == 2)
            r = await http_get(daemon.proxy_url + PATH, {"Range": TAIL})
            served_at_206 = origin.served.get(PATH, 0)
            assert r.status_code == 206 and r.content == BLOB[-1000:]
            assert served_at_206 <= 6 * LAYOUT.piece_length, f"{served_at_206} bytes of {len(BLOB)} before the 206"
            assert daemon.totals.bytes_from_origin == 0  # from the seed, not the origin
            await until(lambda: not seed._downloads)  # the seed's download is pinned: it finishes the blob
            assert stored_pieces(seed) == list(range(LAYOUT.count))
            assert origin.served[PATH] == len(BLOB)
            nursery.cancel_scope.cancel()
