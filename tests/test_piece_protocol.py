"""The piece protocol end to end: PieceServer and Downloader on real sockets (tcp on 127.0.0.1) and real
storage in tmp_path.

Pieces are 64 KiB (the smallest fixed piece length) so that files of a few MiB have dozens of pieces and
every test stays well under a second or two. Timing assertions are generous bounds, never tight; the
token bucket itself is tested exactly in ``test_ratelimit.py``.
"""

from __future__ import annotations

import functools
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import msgspec
import pytest
import trio
import zmq

from dfz.broker import (
    Client,
    ClientConfig,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    Message,
    RemoteError,
    ServerConfig,
    Socket,
    Welcome,
    default_context,
)
from dfz.peer.download import Downloader, DownloaderConfig, FailureKind, PieceDone, PieceFailure
from dfz.peer.messages import (
    PEER_CATALOGUE,
    GetPiece,
    Have,
    PeerErrorCode,
    PieceData,
    Subscribe,
    Subscribed,
    TaskState,
    TaskStatus,
    Unsubscribe,
    Unsubscribed,
    decode_bitmap,
    encode_bitmap,
)
from dfz.peer.storage import Storage, StoredTask, TaskClosed
from dfz.peer.upload import PieceServer, PieceServerConfig
from dfz.tasks import KiB, MiB, PieceLayout, piece_digest, task_id
from dfz.tickets import TicketSigner, TicketVerifier

PL = 64 * KiB
URL = "https://origin.example/piece-protocol.bin"
TID = task_id(URL)
HB = 0.5
"""Heartbeat of every session: no test here relies on silence detection, so a loaded machine gets slack."""
TCP = "tcp://127.0.0.1:0"


def content_of(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def pieces_of(content: bytes) -> list[bytes]:
    return [content[i : i + PL] for i in range(0, len(content), PL)]


def trusted(content: bytes) -> dict[int, str]:
    return {i: piece_digest(p) for i, p in enumerate(pieces_of(content))}


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Callable[[str], Storage]]:
    """Makes one storage directory per peer; closes them all at the end."""
    opened: list[Storage] = []

    def make(name: str) -> Storage:
        storage = Storage(tmp_path / name)
        opened.append(storage)
        return storage

    yield make
    for storage in opened:
        storage.close()


def stored_task(storage: Storage, content: bytes, pieces: list[int] | None = None) -> StoredTask:
    """A task holding ``pieces`` of ``content`` (all of them, finished, by default)."""
    task = storage.create(TID, url=URL, piece_length=PL, content_length=len(content))
    parts = pieces_of(content)
    for i in range(len(parts)) if pieces is None else pieces:
        task.write_piece(i, parts[i])
    if pieces is None:
        task.finish()
    return task


def empty_task(storage: Storage, content: bytes) -> tuple[StoredTask, PieceLayout]:
    layout = PieceLayout(len(content), PL)
    return storage.create(TID, url=URL, piece_length=PL, content_length=len(content), hash_content=True), layout


def server_config(**kw: Any) -> PieceServerConfig:
    return PieceServerConfig(fabric=ServerConfig(heartbeat=HB, liveness=3), **kw)


def downloader_config(**kw: Any) -> DownloaderConfig:
    defaults: dict[str, Any] = {
        "client": ClientConfig(heartbeat=HB, liveness=3, reconnect_min=0.02, reconnect_max=0.2),
        "stall_timeout": 2.0,
        "subscribe_timeout": 1.0,
        "busy_retry": 0.05,
        "busy_retry_max": 0.2,
    }
    return DownloaderConfig(**{**defaults, **kw})


@dataclass
class Recorder:
    """The downloader's callbacks, recorded."""

    done: list[PieceDone] = field(default_factory=list)
    failed: list[PieceFailure] = field(default_factory=list)
    lost: list[tuple[str, str]] = field(default_factory=list)
    then: Callable[[PieceDone], None] | None = None

    def on_piece(self, done: PieceDone) -> None:
        self.done.append(done)
        if self.then is not None:
            self.then(done)

    def on_parent_lost(self, parent: str, reason: str) -> None:
        self.lost.append((parent, reason))

    def by_parent(self) -> Counter[str]:
        return Counter(d.parent for d in self.done)

    def downloader(self, task: StoredTask, layout: PieceLayout, content: bytes, parents: list[str], **kw: Any) -> Downloader:
        return Downloader(
            task,
            layout,
            digests=kw.pop("digests", trusted(content)),
            parents=parents,
            config=kw.pop("config", downloader_config()),
            on_piece=self.on_piece,
            on_piece_failed=self.failed.append,
            on_parent_lost=self.on_parent_lost,
            **kw,
        )


async def start_stoppable(nursery: trio.Nursery, run: Callable[..., Awaitable[None]]) -> tuple[trio.CancelScope, Any]:
    """Start a component in its own cancel scope, so that a test can stop it alone; return the scope and
    what the component passed to ``task_status.started``."""
    scope = trio.CancelScope()

    async def runner(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await run(task_status=task_status)

    started = await nursery.start(runner)
    return scope, started


async def assert_output(task: StoredTask, content: bytes) -> None:
    info = await trio.to_thread.run_sync(task.finish)
    assert info.content_digest == blake3.blake3(content).hexdigest()
    assert task.data_path.read_bytes() == content


async def eventually(check: Callable[[], bool], what: str) -> None:
    """Poll ``check`` until it holds (5 s at most): for state that has no event to wait on."""
    for _ in range(500):
        if check():
            return
        await trio.sleep(0.01)
    assert check(), what


# -- one parent, and parents with some pieces -------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["rarest_first", "in_order"])
async def test_one_parent_serves_a_whole_file(stores: Callable[[str], Storage], strategy: str) -> None:
    content = content_of(10 * MiB - 1000)  # 160 pieces, the last one short
    parent = stores("parent")
    stored_task(parent, content)
    child, layout = empty_task(stores("child"), content)
    assert layout.count == 160
    digests = trusted(content)
    rec = Recorder()
    config = downloader_config(strategy=strategy, window=1 if strategy == "in_order" else 4)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(PieceServer(parent, [TCP], config=server_config()).run)
            endpoint = server.endpoints[0]
            downloader = rec.downloader(child, layout, content, [endpoint], config=config)
            await downloader.run()
            assert downloader.done
            assert sorted(d.piece for d in rec.done) == list(range(160))
            if strategy == "in_order":
                assert [d.piece for d in rec.done] == list(range(160))  # front to back
            assert rec.by_parent() == {endpoint: 160}
            assert all(d.digest == digests[d.piece] and d.size == layout.size(d.piece) and d.cost >= 0 for d in rec.done)
            assert not rec.failed and not rec.lost
            assert (server.stats.pieces_served, server.stats.bytes_served) == (160, len(content))
            await eventually(lambda: server.children == 0, "the child's upload slot is given back when it leaves")
            nursery.cancel_scope.cancel()
    await assert_output(child, content)


async def test_a_resumed_download_fetches_only_the_missing_pieces(stores: Callable[[str], Storage]) -> None:
    content = content_of(10 * PL)
    parent = stores("parent")
    stored_task(parent, content)
    child = stored_task(stores("child"), content, [0, 1, 2, 3, 4])  # left by an earlier run
    layout = PieceLayout(len(content), PL)
    rec = Recorder()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(PieceServer(parent, [TCP], config=server_config()).run)
            await rec.downloader(child, layout, content, server.endpoints).run()
            nursery.cancel_scope.cancel()
    assert sorted(d.piece for d in rec.done) == [5, 6, 7, 8, 9]
    assert server.stats.pieces_served == 5
    await assert_output(child, content)


async def test_a_download_whose_task_is_deleted_raises_the_storage_error(stores: Callable[[str], Storage]) -> None:
    content = content_of(1 * MiB)
    parent = stores("parent")
    stored_task(parent, content)
    child_store = stores("child")
    child, layout = empty_task(child_store, content)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            slow = server_config(rate_limit=2 * MiB, rate_burst=PL)
            server = await nursery.start(PieceServer(parent, [TCP], config=slow).run)

            def delete_after_two(done: PieceDone) -> None:
                if len(rec.done) == 2:
                    child_store.delete(TID)  # the user deletes the task while it downloads

            rec = Recorder(then=delete_after_two)
            downloader = rec.downloader(child, layout, content, server.endpoints)
            with pytest.raises(TaskClosed):
                await downloader.run()
            assert not rec.failed  # the parents are not to blame
            nursery.cancel_scope.cancel()


async def test_parents_with_some_pieces_and_pieces_announced_later(stores: Callable[[str], Storage]) -> None:
    content = content_of(10 * PL)
    parts = pieces_of(content)
    a_store, b_store = stores("a"), stores("b")
    stored_task(a_store, content, [0, 1, 2, 3, 4])
    b_task = stored_task(b_store, content, [5, 6, 7])  # b is still receiving pieces
    child, layout = empty_task(stores("child"), content)
    eight = trio.Event()
    rec = Recorder(then=lambda _: eight.set() if len(rec.done) == 8 else None)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            a = await nursery.start(PieceServer(a_store, [TCP], config=server_config()).run)
            b = await nursery.start(PieceServer(b_store, [TCP], config=server_config()).run)
            a_ep, b_ep = a.endpoints[0], b.endpoints[0]
            downloader = rec.downloader(child, layout, content, [a_ep, b_ep])

            async def b_receives_the_rest() -> None:
                await eight.wait()  # everything the parents had is here; 8 and 9 exist nowhere yet
                await trio.sleep(0.05)
                assert not downloader.done and not rec.failed
                for i in (8, 9):
                    await trio.to_thread.run_sync(b_task.write_piece, i, parts[i])
                    b.announce(TID, i)

            nursery.start_soon(b_receives_the_rest)
            await downloader.run()
            nursery.cancel_scope.cancel()
    from_a = sorted(d.piece for d in rec.done if d.parent == a_ep)
    from_b = sorted(d.piece for d in rec.done if d.parent == b_ep)
    assert (from_a, from_b) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    assert [d.piece for d in rec.done][-2:] in ([8, 9], [9, 8])
    assert b.stats.haves_pushed >= 1 and not rec.failed
    await assert_output(child, content)


async def test_a_child_downloads_from_a_parent_that_is_still_downloading(stores: Callable[[str], Storage]) -> None:
    """seed -> mid -> leaf: mid announces each piece as it lands, and the leaf gets each trusted digest
    only then (as the scheduler would forward it). The leaf is served by mid before mid has finished."""
    content = content_of(2 * MiB)
    seed_store, mid_store = stores("seed"), stores("mid")
    stored_task(seed_store, content)
    mid_task, layout = empty_task(mid_store, content)
    leaf_task, _ = empty_task(stores("leaf"), content)
    mid_rec, leaf_rec = Recorder(), Recorder()
    times: dict[str, float] = {}
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            slow = server_config(rate_limit=4 * MiB, rate_burst=PL)  # about half a second for mid
            seed = await nursery.start(PieceServer(seed_store, [TCP], config=slow).run)
            mid_server = await nursery.start(PieceServer(mid_store, [TCP], config=server_config()).run)
            mid_server.add_task(mid_task)
            leaf = leaf_rec.downloader(leaf_task, layout, content, [mid_server.endpoints[0]], digests={})
            mid = mid_rec.downloader(mid_task, layout, content, [seed.endpoints[0]])

            def mid_has(done: PieceDone) -> None:
                mid_server.announce(TID, done.piece)
                leaf.add_digests({done.piece: done.digest})

            mid_rec.then = mid_has

            def leaf_has(done: PieceDone) -> None:
                times.setdefault("leaf_first", trio.current_time())

            leaf_rec.then = leaf_has

            async def run_mid() -> None:
                await mid.run()
                times["mid_done"] = trio.current_time()
                await trio.to_thread.run_sync(mid_task.finish)
                mid_server.task_finished(TID)

            nursery.start_soon(run_mid)
            await leaf.run()
            nursery.cancel_scope.cancel()
    assert times["leaf_first"] < times["mid_done"]
    assert leaf_rec.by_parent() == {mid_server.endpoints[0]: layout.count}
    await assert_output(leaf_task, content)


# -- parents that fail ------------------------------------------------------------------------------------


async def test_a_parent_stopped_mid_transfer_leaves_the_rest_to_the_other(stores: Callable[[str], Storage]) -> None:
    content = content_of(4 * MiB)  # 64 pieces
    a_store, b_store = stores("a"), stores("b")
    stored_task(a_store, content)
    stored_task(b_store, content)
    child, layout = empty_task(stores("child"), content)
    rec = Recorder()
    window = 4
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            limited = server_config(rate_limit=4 * MiB, rate_burst=PL)  # so that the transfer takes a while
            a_scope, a = await start_stoppable(nursery, PieceServer(a_store, [TCP], config=limited).run)
            b = await nursery.start(PieceServer(b_store, [TCP], config=limited).run)
            a_ep, b_ep = a.endpoints[0], b.endpoints[0]

            def stop_a(done: PieceDone) -> None:
                if done.parent == a_ep and rec.by_parent()[a_ep] == 4:
                    a_scope.cancel()

            rec.then = stop_a
            downloader = rec.downloader(child, layout, content, [a_ep, b_ep], config=downloader_config(window=window))
            await downloader.run()
            nursery.cancel_scope.cancel()
    counts = rec.by_parent()
    assert 4 <= counts[a_ep] <= 4 + window  # what was being written when it stopped may still land
    assert counts[a_ep] + counts[b_ep] == 64
    assert all(f.parent == a_ep and f.kind is FailureKind.TRANSIENT for f in rec.failed)
    await assert_output(child, content)


async def test_a_parent_that_corrupts_pieces_is_detected_reported_and_avoided(stores: Callable[[str], Storage]) -> None:
    content = content_of(2 * MiB)
    liar_store, good_store = stores("liar"), stores("good")
    stored_task(liar_store, content)
    stored_task(good_store, content)
    child, layout = empty_task(stores("child"), content)
    rec = Recorder()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            liar = await nursery.start(PieceServer(liar_store, [TCP], config=server_config(corrupt_pieces_for_tests=True)).run)
            good = await nursery.start(PieceServer(good_store, [TCP], config=server_config()).run)
            liar_ep, good_ep = liar.endpoints[0], good.endpoints[0]
            downloader = rec.downloader(child, layout, content, [liar_ep])  # the liar alone, at first

            async def then_a_good_parent() -> None:
                await eventually(lambda: liar_ep in downloader.blocked, "the liar is blocked")
                assert not downloader.add_parent(liar_ep)  # blocked for good
                assert downloader.add_parent(good_ep)

            nursery.start_soon(then_a_good_parent)
            await downloader.run()
            nursery.cancel_scope.cancel()
    assert rec.failed, "the bad piece is reported"
    for failure in rec.failed:
        assert failure.parent == liar_ep and failure.kind is FailureKind.BAD
        assert "digest mismatch" in failure.reason
    assert any(parent == liar_ep and "bad piece" in reason for parent, reason in rec.lost)
    assert rec.by_parent() == {good_ep: layout.count}  # every piece fetched again from the good one
    assert downloader.stats.bad_pieces == len(rec.failed) >= 1
    await assert_output(child, content)


@pytest.mark.parametrize("endgame", [False, True])
async def test_a_stalled_parent_is_dropped_or_outrun(stores: Callable[[str], Storage], endgame: bool) -> None:
    """A parent that accepts requests and never answers: without the endgame, the stall detector drops it
    and its pieces move; with it, the last pieces are also asked of the other parent, which wins."""
    content = content_of(1 * MiB)
    stuck_store, good_store = stores("stuck"), stores("good")
    stored_task(stuck_store, content)
    stored_task(good_store, content)
    child, layout = empty_task(stores("child"), content)
    rec = Recorder()
    config = downloader_config(endgame=endgame, stall_timeout=60.0 if endgame else 0.5)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            # One byte a second: every piece waits for hours in the parent's rate limiter.
            stuck = await nursery.start(PieceServer(stuck_store, [TCP], config=server_config(rate_limit=1, rate_burst=1)).run)
            good = await nursery.start(PieceServer(good_store, [TCP], config=server_config()).run)
            stuck_ep, good_ep = stuck.endpoints[0], good.endpoints[0]
            downloader = rec.downloader(child, layout, content, [stuck_ep, good_ep], config=config)
            await downloader.run()
            nursery.cancel_scope.cancel()
    assert rec.by_parent() == {good_ep: layout.count}
    if endgame:
        assert downloader.stats.stalled_parents == 0
    else:
        assert downloader.stats.stalled_parents == 1
        assert [parent for parent, reason in rec.lost if reason.startswith("stalled")] == [stuck_ep]
    await assert_output(child, content)


# -- limits -----------------------------------------------------------------------------------------------


async def test_upload_slots_and_requests_per_child_are_respected(stores: Callable[[str], Storage]) -> None:
    content = content_of(1 * MiB)
    parent = stores("parent")
    stored_task(parent, content)
    children = [empty_task(stores(f"child{i}"), content) for i in range(2)]
    # 16 pieces at 4 MiB/s: the first child holds the only slot for about a quarter of a second.
    config = server_config(upload_slots=1, max_requests_per_child=2, rate_limit=4 * MiB, rate_burst=PL)
    first_piece = trio.Event()
    recs = [Recorder(then=lambda _: first_piece.set()), Recorder()]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(PieceServer(parent, [TCP], config=config).run)
            downloaders = [
                rec.downloader(task, layout, content, server.endpoints, config=downloader_config(window=8))
                for rec, (task, layout) in zip(recs, children, strict=True)
            ]
            async with trio.open_nursery() as both:
                both.start_soon(downloaders[0].run)
                await first_piece.wait()  # the first child holds the slot: the second has to wait for it
                both.start_soon(downloaders[1].run)
            nursery.cancel_scope.cancel()
    stats = server.stats
    assert stats.peak_children_serving == 1  # one slot: one child at a time
    assert stats.peak_requests_per_child == 2  # the window of 8 is capped by the parent's credit
    assert stats.refused_no_slot >= 1
    assert downloaders[1].stats.busy_parents == stats.refused_no_slot
    assert stats.pieces_served == 2 * 16
    for task, _ in children:
        await assert_output(task, content)


@pytest.mark.parametrize("side", ["upload", "download"])
async def test_rate_limits_slow_the_transfer_down(stores: Callable[[str], Storage], side: str) -> None:
    content = content_of(1 * MiB)  # 16 pieces
    rate = 4 * MiB
    parent = stores("parent")
    stored_task(parent, content)
    child, layout = empty_task(stores("child"), content)
    up = server_config(rate_limit=rate, rate_burst=PL) if side == "upload" else server_config()
    down = downloader_config(rate_limit=rate, rate_burst=PL) if side == "download" else downloader_config()
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(PieceServer(parent, [TCP], config=up).run)
            downloader = Recorder().downloader(child, layout, content, server.endpoints, config=down)
            start = trio.current_time()
            await downloader.run()
            elapsed = trio.current_time() - start
            nursery.cancel_scope.cancel()
    floor = (len(content) - PL) / rate  # the first piece fits the burst; the others pay
    assert floor * 0.9 <= elapsed < 10
    await assert_output(child, content)


# -- the protocol by hand ---------------------------------------------------------------------------------


async def test_subscriptions_slots_announcements_and_error_codes(stores: Callable[[str], Storage]) -> None:
    content = content_of(4 * PL)
    parts = pieces_of(content)
    store = stores("parent")
    task = stored_task(store, content, [0, 2])  # still downloading: pieces 0 and 2
    other = task_id(URL + "?other")
    one_pushes: list[Message] = []
    two_pushes: list[Message] = []

    async def code_of(client: Client, msg: Message) -> int:
        with pytest.raises(RemoteError) as e:
            await client.request(msg)
        return e.value.code

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(PieceServer(store, [TCP], config=server_config(upload_slots=1)).run)
            ep = server.endpoints[0]
            clients = []
            for name, pushes in (("one", one_pushes), ("two", two_pushes)):
                client = Client(PEER_CATALOGUE, ep, name=name, config=ClientConfig(heartbeat=HB))
                record = functools.partial(_record, pushes)
                client.on_push(Have, record)
                client.on_push(TaskState, record)
                clients.append(await start_stoppable(nursery, client.run))
            (_, one), (two_scope, two) = clients

            assert await code_of(one, GetPiece(task_id=TID, piece=0)) == PeerErrorCode.NOT_SUBSCRIBED
            assert await code_of(one, Subscribe(task_id=other)) == PeerErrorCode.UNKNOWN_TASK
            reply = await one.request(Subscribe(task_id=TID))
            sub = reply.expect(Subscribed)
            assert (sub.task_id, sub.piece_length, sub.content_length, sub.piece_count, sub.finished) == (
                TID,
                PL,
                len(content),
                4,
                False,
            )
            assert decode_bitmap(reply.frames[0].buffer, 4) == [0, 2]
            assert bytes(reply.frames[0].buffer) == encode_bitmap([0, 2], 4) == b"\xa0"

            # One slot: the second child is sent elsewhere at once.
            assert await code_of(two, Subscribe(task_id=TID)) == PeerErrorCode.NO_UPLOAD_SLOT
            assert server.stats.refused_no_slot == 1

            assert await code_of(one, GetPiece(task_id=TID, piece=1)) == PeerErrorCode.PIECE_MISSING
            got = await one.request(GetPiece(task_id=TID, piece=2))
            piece = got.expect(PieceData)
            assert (piece.piece, piece.size, piece.encoding) == (2, PL, "raw")
            assert bytes(got.frames[0].buffer) == parts[2]

            # Pieces that land are announced in one batch; then the end of the task.
            for i in (1, 3):
                await trio.to_thread.run_sync(task.write_piece, i, parts[i])
            server.announce(TID, 1)
            server.announce(TID, 3)
            await trio.to_thread.run_sync(task.finish)
            server.task_finished(TID)
            await eventually(lambda: any(isinstance(m, TaskState) for m in one_pushes), "the end of the task is pushed")
            haves = [m for m in one_pushes if isinstance(m, Have)]
            assert len(haves) == 1 and haves[0].pieces == [1, 3]
            state = one_pushes[-1]
            assert isinstance(state, TaskState)
            assert (state.state, state.content_length) == (TaskStatus.SUCCEEDED, len(content))
            assert not two_pushes  # not subscribed

            # Unsubscribing gives the slot back; the other child takes it.
            assert (await one.request(Unsubscribe(task_id=TID))).expect(Unsubscribed).task_id == TID
            assert server.children == 0
            assert (await two.request(Subscribe(task_id=TID))).expect(Subscribed).finished

            # Dropping the task ends the subscriptions with a push; later requests get TASK_DROPPED.
            server.drop_task(TID, "deleted for the test")
            assert server.children == 0
            await eventually(lambda: bool(two_pushes), "the drop is pushed")
            dropped = two_pushes[-1]
            assert isinstance(dropped, TaskState) and dropped.state == TaskStatus.DROPPED
            assert dropped.reason == "deleted for the test"
            assert await code_of(two, GetPiece(task_id=TID, piece=0)) == PeerErrorCode.TASK_DROPPED
            assert await code_of(two, Subscribe(task_id=TID)) == PeerErrorCode.TASK_DROPPED

            # Served again once the owner says so; a session that ends gives its slot back.
            server.add_task(task)
            await two.request(Subscribe(task_id=TID))
            assert server.children == 1
            two_scope.cancel()
            await eventually(lambda: server.children == 0, "the slot of a child that left is free")
            await one.request(Subscribe(task_id=TID))
            nursery.cancel_scope.cancel()


def _record(pushes: list[Message], msg: Message, payload: list[Any]) -> None:
    pushes.append(msg)


async def _recv(sock: Socket) -> tuple[Message, list[Any]]:
    while True:
        msg, payload = PEER_CATALOGUE.decode(await sock.recv())
        if not isinstance(msg, Heartbeat):
            return msg, payload


async def test_malformed_peer_messages_get_invalid_and_the_server_keeps_serving(stores: Callable[[str], Storage]) -> None:
    content = content_of(3 * PL)
    store = stores("parent")
    stored_task(store, content)
    count = 3

    def header(n: int, fields: dict[str, Any]) -> bytes:
        return msgspec.msgpack.encode({"v": 1, "id": n, "dl": 0, **fields})

    get = {"t": "peer.get_piece", "task_id": TID}
    bad: list[tuple[dict[str, Any], list[bytes]]] = [
        ({"t": "peer.subscribe", "task_id": "not-a-task-id"}, []),
        ({"t": "peer.subscribe", "task_id": TID.upper()}, []),
        ({"t": "peer.subscribe"}, []),
        ({"t": "peer.subscribe", "task_id": TID}, [b"a payload it does not carry"]),
        ({"t": "peer.unsubscribe", "task_id": 7}, []),
        ({**get, "piece": -1}, []),
        ({**get, "piece": 2**20}, []),
        ({**get, "piece": "0"}, []),
        ({**get, "piece": True}, []),
        ({**get, "piece": 0, "accept": []}, []),
        ({**get, "piece": 0, "accept": ["x" * 17]}, []),
        ({**get, "piece": 0, "accept": ["raw"] * 9}, []),
        ({**get, "piece": 0, "accept": "raw"}, []),
        # Well-formed, but wrong here: a piece beyond the content, no encoding this server can send.
        ({**get, "piece": count}, []),
        ({**get, "piece": 0, "accept": ["zstd"]}, []),
    ]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(PieceServer(store, [TCP], config=PieceServerConfig()).run)
            sock = Socket.create(default_context(), zmq.DEALER)
            try:
                sock.connect(server.endpoints[0])
                await sock.send(PEER_CATALOGUE.encode(Hello(id=1, name="raw")))
                assert isinstance((await _recv(sock))[0], Welcome)
                await sock.send([header(2, {"t": "peer.subscribe", "task_id": TID})])
                assert isinstance((await _recv(sock))[0], Subscribed)
                for n, (fields, payload) in enumerate(bad, start=10):
                    await sock.send([header(n, fields), *payload])
                    answer, _ = await _recv(sock)
                    assert isinstance(answer, Error), fields
                    assert (answer.id, answer.code) == (n, ErrorCode.INVALID), (fields, answer)
                # ...and it goes on serving this very session.
                await sock.send([header(99, {**get, "piece": 1})])
                answer, frames = await _recv(sock)
                assert isinstance(answer, PieceData) and answer.id == 99
                assert bytes(frames[0].buffer) == pieces_of(content)[1]
            finally:
                sock.close()
            assert server.server.stats.bad_frames["invalid"] == len(bad) - 2  # two were refused by the handler
            nursery.cancel_scope.cancel()


# -- tenants: a piece server serves a tenant's task to that tenant only -------------------------------------


async def test_a_piece_server_refuses_other_tenants_and_forged_tickets_and_serves_everyone_else(
    stores: Callable[[str], Storage],
) -> None:
    signer, stranger = TicketSigner.generate(), TicketSigner.generate()
    now = time.time()

    def ticket(host: str, tenant: str = "7", *, by: TicketSigner = signer, at: float = now, ttl: float = 600) -> bytes:
        return by.issue(tenant=tenant, tenant_name=f"tenant-{tenant}", host_id=host, now=at, ttl=ttl)

    content = content_of(20 * PL)
    public_url = URL + "?public"
    public = task_id(public_url)
    parent = stores("parent")
    mine = parent.create(TID, url=URL, piece_length=PL, content_length=len(content), tenant="7")
    for i, part in enumerate(pieces_of(content)):
        mine.write_piece(i, part)
    mine.finish()
    shared = parent.create(public, url=public_url, piece_length=PL, content_length=PL)
    shared.write_piece(0, content[:PL])
    shared.finish()
    child, layout = empty_task(stores("child"), content)
    rec = Recorder()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                PieceServer(parent, [TCP], config=server_config(), tickets=TicketVerifier([signer.public_key])).run
            )
            endpoint = server.endpoints[0]
            forger = Client(PEER_CATALOGUE, endpoint, name="forger", config=ClientConfig(heartbeat=HB))
            await nursery.start(forger.run)

            async def refused(msg: Message) -> RemoteError:
                with pytest.raises(RemoteError) as e:
                    await forger.request(msg)
                return e.value

            # Straight for a piece: no subscription. Subscribing needs a ticket of the task's tenant.
            assert (await refused(GetPiece(task_id=TID, piece=0))).code == PeerErrorCode.NOT_SUBSCRIBED
            attempts = {
                "no ticket": (Subscribe(task_id=TID), PeerErrorCode.WRONG_TENANT),
                "another tenant's ticket": (
                    Subscribe(task_id=TID, ticket=ticket("x", "8"), host_id="x"),
                    PeerErrorCode.WRONG_TENANT,
                ),
                "another key": (Subscribe(task_id=TID, ticket=ticket("x", by=stranger), host_id="x"), PeerErrorCode.BAD_TICKET),
                "garbage": (Subscribe(task_id=TID, ticket=b"\x81\xa1v\x01" + bytes(64), host_id="x"), PeerErrorCode.BAD_TICKET),
                "expired": (
                    Subscribe(task_id=TID, ticket=ticket("x", at=now - 3600, ttl=60), host_id="x"),
                    PeerErrorCode.BAD_TICKET,
                ),
                "someone else's": (Subscribe(task_id=TID, ticket=ticket("host-c"), host_id="x"), PeerErrorCode.BAD_TICKET),
                "no host id": (Subscribe(task_id=TID, ticket=ticket("host-c")), PeerErrorCode.BAD_TICKET),
                "a tenant's ticket for a task of none": (
                    Subscribe(task_id=public, ticket=ticket("x"), host_id="x"),
                    PeerErrorCode.WRONG_TENANT,
                ),
            }
            for what, (msg, code) in attempts.items():
                e = await refused(msg)
                assert e.code == code, (what, e)
                assert "tenant '7'" not in e.reason, (what, e.reason)  # the task's tenant is not told
            assert (await refused(GetPiece(task_id=TID, piece=0))).code == PeerErrorCode.NOT_SUBSCRIBED
            assert server.stats.errors["WRONG_TENANT"] == 3 and server.stats.errors["BAD_TICKET"] == 5
            assert server.stats.tickets_refused == {"signature": 2, "expired": 1, "wrong_host": 2}
            assert server.stats.pieces_served == 0 and server.children == 0

            # The forger's session still works for what it may have: a task of no tenant, without a ticket.
            (await forger.request(Subscribe(task_id=public))).expect(Subscribed)
            reply = await forger.request(GetPiece(task_id=public, piece=0))
            assert reply.expect(PieceData).piece == 0 and bytes(reply.frames[0].buffer) == content[:PL]

            # A child of the tenant, whose ticket names its host, downloads the tenant's task whole.
            downloader = rec.downloader(child, layout, content, [endpoint], ticket=lambda: (ticket("host-c"), "host-c"))
            await downloader.run()
            assert downloader.done and not rec.lost
            assert server.stats.pieces_served == 1 + layout.count
            nursery.cancel_scope.cancel()
    await assert_output(child, content)
