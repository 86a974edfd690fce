"""serve_task (dfz/peer/proxy/task.py) with a real Storage and a stand-in for the daemon's downloads whose
pieces land when the test says: the body streams as pieces are stored, a whole body's last bytes wait for
the download's final success (a failure cuts the connection), a Range does not wait for the whole."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
import trio
import trio.testing

from dfz.peer.local import DownloadRequest, DownloadService, DownloadState, Progress
from dfz.peer.proxy.server import Exchange, ProxyServer
from dfz.peer.proxy.task import serve_task
from dfz.peer.storage import Storage

pytestmark = pytest.mark.timeout(30)

PIECE = 64 * 1024
DATA = random.Random(5).randbytes(3 * PIECE + 1000)  # 4 pieces, the last one short
TID = "ab" * 32


class Landing:
    """Downloads whose pieces land in ``storage`` one by one as the test opens ``gates``; the last
    progress is ``final`` once ``finish`` is set."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.gates = [trio.Event() for _ in range(4)]
        self.finish = trio.Event()
        self.final = DownloadState.SUCCEEDED
        self.requests: list[DownloadRequest] = []

    def progress(self, state: DownloadState, done: int) -> Progress:
        failed = state is DownloadState.FAILED
        return Progress(
            TID,
            state,
            content_length=len(DATA),
            piece_count=4,
            pieces_done=done,
            error="the blob does not match its digest" if failed else "",
            error_kind="digest_mismatch" if failed else "",
        )

    async def download(self, request: DownloadRequest) -> AsyncIterator[Progress]:
        self.requests.append(request)
        yield self.progress(DownloadState.PENDING, 0)  # no length yet
        task = await trio.to_thread.run_sync(
            lambda: self.storage.get_or_create(TID, url=request.url, piece_length=PIECE, content_length=len(DATA))
        )
        yield self.progress(DownloadState.RUNNING, 0)
        for i, gate in enumerate(self.gates):
            await gate.wait()
            if not task.has_piece(i):
                await trio.to_thread.run_sync(task.write_piece, i, DATA[i * PIECE : (i + 1) * PIECE])
            yield self.progress(DownloadState.RUNNING, i + 1)
        await self.finish.wait()
        yield self.progress(self.final, 4)


async def start(tmp: Path, nursery: trio.Nursery) -> tuple[Landing, ProxyServer]:
    storage = Storage(tmp / "store", direct_io=False)
    landing = Landing(storage)

    async def mirror(exchange: Exchange) -> None:
        await serve_task(exchange, cast(DownloadService, landing), storage, DownloadRequest(url="http://o/f", output=None))

    server = await nursery.start(ProxyServer("127.0.0.1:0", mirror=mirror).run)
    return landing, server


async def read_until(stream: trio.SocketStream, buf: bytearray, n: int) -> bool:
    """Read until ``buf`` holds ``n`` bytes; False if the connection closed first."""
    while len(buf) < n:
        data = await stream.receive_some(65536)
        if not data:
            return False
        buf += data
    return True


async def request(server: ProxyServer, extra: str = "") -> tuple[trio.SocketStream, bytearray, int]:
    """Send a GET; the stream, what came after the head, and the head's length."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(f"GET /v2/x/blobs/f HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        buf += await stream.receive_some(65536)
    head, _, body = bytes(buf).partition(b"\r\n\r\n")
    return stream, bytearray(body), len(head)


@pytest.mark.parametrize("final", [DownloadState.SUCCEEDED, DownloadState.FAILED])
async def test_body_streams_as_pieces_land_and_the_end_waits_for_success(tmp_path: Path, final: DownloadState) -> None:
    async with trio.open_nursery() as nursery:
        landing, server = await start(tmp_path, nursery)
        landing.final = final
        landing.gates[0].set()
        stream, body, _ = await request(server)
        # piece 0 arrives while pieces 1-3 are not stored yet
        assert await read_until(stream, body, PIECE)
        assert bytes(body) == DATA[:PIECE]
        for gate in landing.gates[1:]:
            gate.set()
        assert await read_until(stream, body, 3 * PIECE)  # pieces 1 and 2; the last one is held back
        landing.finish.set()
        whole = await read_until(stream, body, len(DATA))
        if final is DownloadState.SUCCEEDED:
            assert whole and bytes(body) == DATA
        else:
            assert not whole and bytes(body) == DATA[: 3 * PIECE]  # closed before the end
        await trio.testing.wait_all_tasks_blocked()
        # The proxy's metrics: the body bytes sent came from a task (this test's handler leaves the route as
        # the server set it for a /v2/ path), and no error answer was sent.
        assert dict(server.stats.body_bytes) == {("mirror_passthrough", "p2p"): len(body)}
        assert not server.stats.errors
        nursery.cancel_scope.cancel()


async def test_a_range_is_sent_when_its_pieces_are_stored(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        landing, server = await start(tmp_path, nursery)
        landing.gates[0].set()
        landing.gates[1].set()
        stream, body, _ = await request(server, f"Range: bytes={PIECE - 10}-{PIECE + 9}\r\n")
        assert await read_until(stream, body, 20)  # without the rest of the task, and before the final state
        assert bytes(body) == DATA[PIECE - 10 : PIECE + 10]
        assert not landing.finish.is_set()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("extra", "wanted"),
    [
        (f"Range: bytes={PIECE - 10}-{PIECE + 9}\r\n", (PIECE - 10, PIECE + 10)),
        ("Range: bytes=-1000\r\n", (-1000, None)),
        (f"Range: bytes={3 * PIECE}-\r\n", (3 * PIECE, None)),
        ("", None),
        ("Range: bytes=0-1,5-6\r\n", None),  # several ranges: the whole content
        ('Range: bytes=0-9\r\nIf-Range: "other"\r\n', None),  # an If-Range that does not match: the whole
    ],
)
async def test_the_range_goes_to_the_download_as_its_wanted_range(
    tmp_path: Path, extra: str, wanted: tuple[int, int | None] | None
) -> None:
    async with trio.open_nursery() as nursery:
        landing, server = await start(tmp_path, nursery)
        for gate in landing.gates:
            gate.set()
        landing.finish.set()
        stream, _, _ = await request(server, extra)
        assert [r.priority_range for r in landing.requests] == [wanted]
        assert landing.requests[0].url == "http://o/f"  # the rest of the request as the mirror made it
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_failure_before_the_length_is_an_error_answer(tmp_path: Path) -> None:
    class Failing:
        async def download(self, request: DownloadRequest) -> AsyncIterator[Progress]:
            yield Progress("", DownloadState.FAILED, error="registry said 404", error_kind="origin_not_found")

    storage = Storage(tmp_path / "store", direct_io=False)

    async def mirror(exchange: Exchange) -> None:
        await serve_task(exchange, cast(DownloadService, Failing()), storage, DownloadRequest(url="http://o/f", output=None))

    async with trio.open_nursery() as nursery:
        server = await nursery.start(ProxyServer("127.0.0.1:0", mirror=mirror).run)
        stream, body, _ = await request(server)
        await read_until(stream, body, len(b"registry said 404\n"))
        assert bytes(body) == b"registry said 404\n"
        await trio.testing.wait_all_tasks_blocked()
        assert dict(server.stats.errors) == {"origin": 1}
        assert dict(server.stats.requests) == {("mirror_passthrough", "4xx"): 1}
        assert dict(server.stats.body_bytes) == {("mirror_passthrough", "proxy"): len(body)}
        nursery.cancel_scope.cancel()
