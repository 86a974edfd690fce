"""dfz/peer/storage.py on real files: concurrent writes, restarts and crashes, exports, corruption, deletes.

Pieces are 64 KiB (the smallest allowed) so that every test stays in the millisecond range.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import pytest
import trio

from dfz.peer.storage import (
    ExportError,
    ExportMethod,
    InvalidTaskId,
    LayoutConflict,
    PieceMissing,
    PieceRejected,
    Storage,
    StorageError,
    StorageLocked,
    StoredTask,
    TaskClosed,
    TaskExists,
    TaskIncomplete,
    TaskState,
    piece_buffer,
)
from dfz.tasks import Digest, DigestMismatch, InvalidPieceLength, KiB, PieceLayout, piece_digest, task_id

PL = 64 * KiB
SIZE = 7 * PL + 1234  # eight pieces, the last one short
URL = "https://origin.example/model.bin"
TID = task_id(URL)


def content_of(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def pieces_of(content: bytes, pl: int = PL) -> list[bytes]:
    return [content[i : i + pl] for i in range(0, len(content), pl)]


@pytest.fixture
def content() -> bytes:
    return content_of(SIZE)


@pytest.fixture(params=[True, False], ids=["direct_io", "buffered"])
def storage(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Storage]:
    with Storage(tmp_path / "store", direct_io=request.param) as s:
        yield s


def new_task(storage: Storage, size: int | None = SIZE, tid: str = TID, *, hash_content: bool = True) -> StoredTask:
    return storage.create(tid, url=URL, piece_length=PL, content_length=size, hash_content=hash_content)


def write_all(task: StoredTask, content: bytes, order: list[int] | None = None) -> None:
    parts = pieces_of(content)
    for i in order if order is not None else range(len(parts)):
        task.write_piece(i, parts[i])


def finished(storage: Storage, content: bytes, tid: str = TID) -> StoredTask:
    task = new_task(storage, len(content), tid)
    write_all(task, content)
    task.finish()
    return task


# --- writing and finishing ----------------------------------------------------------------------------------


def test_pieces_written_out_of_order_from_several_threads(storage: Storage, content: bytes) -> None:
    task = new_task(storage)
    parts = pieces_of(content)
    order = list(range(len(parts)))
    random.Random(7).shuffle(order)
    with ThreadPoolExecutor(4) as pool:
        digests = list(pool.map(lambda i: task.write_piece(i, parts[i], expected_digest=piece_digest(parts[i])), order))
    assert digests == [piece_digest(parts[i]) for i in order]
    assert task.missing_pieces() == []
    info = task.finish()
    assert info.state is TaskState.SUCCEEDED
    assert info.content_digest == blake3.blake3(content).hexdigest()
    assert (info.pieces_stored, info.piece_count, info.bytes_stored) == (8, 8, SIZE)
    assert task.data_path.read_bytes() == content
    assert task.piece_digests() == [piece_digest(p) for p in parts]
    assert task._hashed == len(parts)  # the incremental whole-file pass kept up: finish read nothing back


def test_concurrent_writers_with_a_checkpoint_per_piece(tmp_path: Path) -> None:
    data = content_of(40 * PL + 7, seed=3)
    parts = pieces_of(data)
    order = list(range(len(parts)))
    random.Random(11).shuffle(order)
    with Storage(tmp_path / "s", checkpoint_pieces=1) as s:
        task = new_task(s, len(data))
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: task.write_piece(i, parts[i]), order))
        # no flush or close: every piece reached a snapshot, and snapshots reached the disk in order
        on_disk = json.loads(task.data_path.with_name("meta.json").read_bytes())["digests"]
        assert on_disk == [piece_digest(p) for p in parts]
        assert task.finish().content_digest == blake3.blake3(data).hexdigest()


def test_too_many_pieces_is_refused(storage: Storage) -> None:
    with pytest.raises(InvalidPieceLength, match="use a larger piece length"):
        storage.create(TID, url=URL, piece_length=PL, content_length=PL * 2**20 + 1)
    assert storage.get(TID) is None


async def test_writes_from_trio_worker_threads(storage: Storage, content: bytes) -> None:
    task = new_task(storage)
    parts = pieces_of(content)

    async def put(i: int) -> None:
        await trio.to_thread.run_sync(task.write_piece, i, parts[i])

    async with trio.open_nursery() as nursery:
        for i in reversed(range(len(parts))):
            nursery.start_soon(put, i)
    info = await trio.to_thread.run_sync(task.finish)
    assert info.content_digest == blake3.blake3(content).hexdigest()


def test_a_piece_with_a_wrong_digest_is_rejected_and_not_written(storage: Storage, content: bytes) -> None:
    task = new_task(storage)
    good = pieces_of(content)[3]
    bad = bytes([good[0] ^ 1]) + good[1:]
    with pytest.raises(DigestMismatch, match=f"piece 3 of task {TID}") as info:
        task.write_piece(3, bad, expected_digest=piece_digest(good))
    assert info.value.expected == piece_digest(good)
    assert info.value.actual == piece_digest(bad)
    assert not task.has_piece(3)
    assert task.data_path.read_bytes()[3 * PL : 4 * PL] == bytes(PL)  # nothing reached the file
    task.write_piece(3, good, expected_digest=piece_digest(good))
    assert task.has_piece(3)


def test_pieces_that_do_not_fit_the_layout_are_rejected(storage: Storage, content: bytes) -> None:
    task = new_task(storage)
    with pytest.raises(PieceRejected, match="has 100 bytes, expected 65536"):
        task.write_piece(0, b"x" * 100)
    with pytest.raises(PieceRejected, match="has 65536 bytes, expected 1234"):
        task.write_piece(7, b"x" * PL)
    with pytest.raises(PieceRejected, match="out of range"):
        task.write_piece(8, b"x" * 10)
    with pytest.raises(PieceRejected, match="out of range"):
        task.write_piece(-1, b"x" * PL)
    assert task.stored_pieces() == []


def test_a_stored_piece_is_never_rewritten(storage: Storage, content: bytes) -> None:
    task = new_task(storage)
    part = pieces_of(content)[0]
    assert task.write_piece(0, part) == piece_digest(part)
    assert task.write_piece(0, part) == piece_digest(part)  # same bytes: nothing to do
    with pytest.raises(DigestMismatch):
        task.write_piece(0, b"y" * PL)
    assert task.read_piece(0) == part


def test_finish_needs_every_piece(storage: Storage, content: bytes) -> None:
    task = new_task(storage)
    write_all(task, content, order=[0, 1, 2])
    with pytest.raises(TaskIncomplete, match="5 of 8 pieces are missing"):
        task.finish()
    assert task.state is TaskState.RUNNING


def test_finish_checks_the_reported_content_digest(storage: Storage, content: bytes) -> None:
    task = new_task(storage)
    write_all(task, content)
    with pytest.raises(DigestMismatch, match="content of task"):
        task.finish(content_digest="00" * 32)
    assert task.state is TaskState.RUNNING
    expected = blake3.blake3(content).hexdigest()
    assert task.finish(content_digest=expected).content_digest == expected
    assert task.finish().state is TaskState.SUCCEEDED  # idempotent


def test_a_task_that_does_not_hash_adopts_the_reported_digest(storage: Storage, content: bytes) -> None:
    task = new_task(storage, hash_content=False)
    write_all(task, content, order=[3, 1, 0, 2, 7, 5, 6, 4])
    reported = blake3.blake3(content).hexdigest()
    assert task.finish(content_digest=reported).content_digest == reported


def test_a_task_that_does_not_hash_computes_the_digest_when_none_was_reported(storage: Storage, content: bytes) -> None:
    task = new_task(storage, hash_content=False)
    write_all(task, content, order=[3, 1, 0, 2, 7, 5, 6, 4])
    assert task.finish().content_digest == blake3.blake3(content).hexdigest()


def test_empty_file(storage: Storage, tmp_path: Path) -> None:
    task = new_task(storage, 0)
    assert task.layout() == PieceLayout(0, PL)
    info = task.finish()
    assert info.content_digest == blake3.blake3(b"").hexdigest()
    assert info.piece_count == 0
    task.export(tmp_path / "empty")
    assert (tmp_path / "empty").read_bytes() == b""


def test_tiny_file(storage: Storage, tmp_path: Path) -> None:
    data = b"tiny" * 32  # 128 bytes
    task = new_task(storage, len(data))
    task.write_piece(0, data)
    task.finish()
    task.export(tmp_path / "tiny", digest=Digest.parse("blake3:" + blake3.blake3(data).hexdigest()))
    assert (tmp_path / "tiny").read_bytes() == data


# --- unknown content length -----------------------------------------------------------------------------------


def test_stream_of_unknown_length_ended_by_a_short_piece(storage: Storage, content: bytes, tmp_path: Path) -> None:
    task = new_task(storage, None)
    assert task.layout() is None and task.info().piece_count is None
    parts = pieces_of(content)
    for i, part in enumerate(parts[:-1]):
        task.write_piece(i, part)
    with pytest.raises(TaskIncomplete, match="length is unknown"):
        task.finish()
    with pytest.raises(PieceRejected, match=r"a piece has 1\.\.65536"):
        task.write_piece(9, b"x" * (PL + 1))
    task.write_piece(7, parts[7])  # short: the end of the stream
    assert task.content_length == SIZE
    assert task.finish().content_digest == blake3.blake3(content).hexdigest()
    task.export(tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == content


def test_stream_ending_on_a_piece_boundary(storage: Storage) -> None:
    data = content_of(3 * PL)
    task = new_task(storage, None)
    write_all(task, data)
    task.set_content_length(3 * PL)
    assert task.layout() == PieceLayout(3 * PL, PL)
    assert task.finish().content_digest == blake3.blake3(data).hexdigest()


def test_empty_stream(storage: Storage) -> None:
    task = new_task(storage, None)
    task.set_content_length(0)
    assert task.finish().content_digest == blake3.blake3(b"").hexdigest()


def test_a_stream_cannot_end_before_stored_pieces(storage: Storage) -> None:
    task = new_task(storage, None)
    write_all(task, content_of(3 * PL))
    with pytest.raises(LayoutConflict, match="stored piece 2 does not fit"):
        task.set_content_length(2 * PL + 5)
    task.set_content_length(3 * PL)
    with pytest.raises(LayoutConflict):
        task.set_content_length(4 * PL)


def test_unknown_length_stream_resumes_after_restart(tmp_path: Path, content: bytes) -> None:
    root = tmp_path / "store"
    parts = pieces_of(content)
    with Storage(root) as s:
        first = new_task(s, None)
        for i in range(4):
            first.write_piece(i, parts[i])
    with Storage(root) as s:
        task = s.get(TID)
        assert task is not None and task.content_length is None
        assert task.stored_pieces() == [0, 1, 2, 3]
        for i in range(4, 8):
            task.write_piece(i, parts[i])
        assert task.finish().content_digest == blake3.blake3(content).hexdigest()


# --- restarts and crashes --------------------------------------------------------------------------------------


def test_a_finished_task_survives_a_restart(tmp_path: Path, content: bytes) -> None:
    root = tmp_path / "store"
    with Storage(root) as s:
        finished(s, content)
    with Storage(root) as s:
        task = s.get(TID)
        assert task is not None
        assert task.state is TaskState.SUCCEEDED
        assert task.content_digest == blake3.blake3(content).hexdigest()
        assert task.read_piece(7, verify=True) == content[7 * PL :]
        assert task.export(tmp_path / "out") is ExportMethod.LINK
        assert (tmp_path / "out").read_bytes() == content


def test_an_unfinished_task_resumes_after_a_restart(tmp_path: Path, content: bytes) -> None:
    root = tmp_path / "store"
    parts = pieces_of(content)
    with Storage(root) as s:
        write_all(new_task(s), content, order=[6, 1, 4])
    with Storage(root) as s:
        task = s.get_or_create(TID, url=URL, piece_length=PL, content_length=SIZE)
        assert task.state is TaskState.RUNNING
        assert task.stored_pieces() == [1, 4, 6]
        assert task.missing_pieces() == [0, 2, 3, 5, 7]
        assert task.info().bytes_stored == 3 * PL
        for i in task.missing_pieces():
            task.write_piece(i, parts[i])
        # the whole-file digest is computed from pieces read back from disk as well as new ones
        assert task.finish().content_digest == blake3.blake3(content).hexdigest()


def test_a_crash_loses_only_pieces_recorded_after_the_last_checkpoint(tmp_path: Path, content: bytes) -> None:
    root, crashed = tmp_path / "store", tmp_path / "crashed"
    parts = pieces_of(content)
    with Storage(root, checkpoint_pieces=3, checkpoint_seconds=1e9) as s:
        write_all(new_task(s), content, order=[7, 0, 5, 2, 3, 1, 6])
        # What the disk holds at this moment is what a crash would leave: copy it while still open.
        shutil.copytree(root, crashed)
    with Storage(crashed) as s:
        task = s.get(TID)
        assert task is not None
        assert task.stored_pieces() == [0, 1, 2, 3, 5, 7]  # two checkpoints; piece 6 is fetched again
        for i in task.missing_pieces():
            task.write_piece(i, parts[i])
        assert task.finish().content_digest == blake3.blake3(content).hexdigest()


def test_a_time_checkpoint_with_an_injected_clock(tmp_path: Path, content: bytes) -> None:
    now = [100.0]
    parts = pieces_of(content)
    with Storage(tmp_path / "s", checkpoint_pieces=1000, checkpoint_seconds=5.0, clock=lambda: now[0]) as s:
        task = new_task(s)
        meta_path = task.data_path.with_name("meta.json")

        def on_disk() -> int:
            return sum(d is not None for d in json.loads(meta_path.read_bytes())["digests"])

        task.write_piece(0, parts[0])
        now[0] += 4.9
        task.write_piece(1, parts[1])
        assert on_disk() == 0
        now[0] += 0.1  # the oldest unrecorded piece is now 5 s old
        task.write_piece(2, parts[2])
        assert on_disk() == 3
        task.write_piece(3, parts[3])
        assert on_disk() == 3
        task.flush()
        assert on_disk() == 4


def _meta_doc(task: StoredTask) -> dict[str, object]:
    doc: dict[str, object] = json.loads(task.data_path.with_name("meta.json").read_bytes())
    return doc


def test_snapshots_say_whether_the_data_was_synced(tmp_path: Path, content: bytes) -> None:
    root = tmp_path / "store"
    parts = pieces_of(content)
    with Storage(root, checkpoint_pieces=2) as s:
        task = new_task(s)
        assert _meta_doc(task)["synced"] is True  # nothing written yet
        task.write_piece(0, parts[0])
        task.write_piece(1, parts[1])  # a checkpoint: recorded, not synced
        assert _meta_doc(task)["synced"] is False
        s.sync()
        assert _meta_doc(task)["synced"] is True
        task.write_piece(2, parts[2])
        task.flush()
        assert _meta_doc(task)["synced"] is False
    assert json.loads((root / "tasks" / TID / "meta.json").read_bytes())["synced"] is True  # close syncs


def _zero(root: Path, index: int) -> None:
    """What a power loss can leave: a recorded piece whose bytes never reached the disk."""
    fd = os.open(root / "tasks" / TID / "data", os.O_WRONLY)
    os.pwrite(fd, bytes(PL), index * PL)
    os.close(fd)


@pytest.mark.parametrize("finish", [False, True])
def test_after_a_power_loss_unsynced_pieces_are_verified_before_use(
    tmp_path: Path, content: bytes, finish: bool, caplog: pytest.LogCaptureFixture
) -> None:
    root, crashed = tmp_path / "store", tmp_path / "crashed"
    parts = pieces_of(content)
    with Storage(root, checkpoint_pieces=2) as s:
        task = new_task(s)
        write_all(task, content if finish else content[: 6 * PL])
        if finish:
            task.finish()
        shutil.copytree(root, crashed)
    _zero(crashed, 1)
    with caplog.at_level(logging.WARNING, logger="dfz"), Storage(crashed) as s:
        got = s.get(TID)
        assert got is not None
        assert any("storage.verifying" in r.getMessage() for r in caplog.records)
        assert got.state is TaskState.RUNNING
        assert got.missing_pieces() == ([1] if finish else [1, 6, 7])
        assert _meta_doc(got)["synced"] is True  # verified and synced: trusted from now on
        for i in got.missing_pieces():
            got.write_piece(i, parts[i])
        assert got.finish().content_digest == blake3.blake3(content).hexdigest()


def test_a_synced_task_is_trusted_without_rereading(tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "store"
    with Storage(root) as s:
        write_all(new_task(s), content, order=[0, 1])
    with caplog.at_level(logging.WARNING, logger="dfz"), Storage(root) as s:
        assert s.get(TID) is not None
    assert not any("storage.verifying" in r.getMessage() for r in caplog.records)


CRASHER = textwrap.dedent(
    """
    import os, sys
    from dfz.peer.storage import Storage
    root, tid, url, pl, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    content = sys.stdin.buffer.read()
    s = Storage(root, checkpoint_pieces=2, checkpoint_seconds=1e9)
    task = s.create(tid, url=url, piece_length=pl, content_length=size)
    for i in (0, 1, 2, 3, 4):
        task.write_piece(i, content[i * pl : (i + 1) * pl])
    os._exit(0)  # no close, no flush: as if killed
    """
)


def test_a_real_crash_of_the_process(tmp_path: Path, content: bytes) -> None:
    root = tmp_path / "store"
    subprocess.run(
        [sys.executable, "-c", CRASHER, str(root), TID, URL, str(PL), str(SIZE)], input=content, check=True, timeout=60
    )
    with Storage(root) as s:  # the dead process's lock is gone with it
        task = s.get(TID)
        assert task is not None
        assert task.stored_pieces() == [0, 1, 2, 3]  # piece 4 was written after the last checkpoint
        write_all(task, content, order=task.missing_pieces())
        assert task.finish().content_digest == blake3.blake3(content).hexdigest()


def test_one_process_per_storage_directory(tmp_path: Path) -> None:
    with Storage(tmp_path / "s"), pytest.raises(StorageLocked, match=f"in use by another dfz process \\(pid {os.getpid()}\\)"):
        Storage(tmp_path / "s")
    Storage(tmp_path / "s").close()


# --- reading and verifying ------------------------------------------------------------------------------------


def test_read_piece(storage: Storage, content: bytes) -> None:
    task = new_task(storage)
    write_all(task, content, order=[2, 7])
    assert task.read_piece(2) == pieces_of(content)[2]
    assert task.read_piece(7, verify=True) == pieces_of(content)[7]
    with pytest.raises(PieceMissing, match="piece 3 of task"):
        task.read_piece(3)
    with pytest.raises(PieceMissing):
        task.read_piece(99)


def test_a_damaged_stored_piece_is_detected_and_dropped(storage: Storage, content: bytes) -> None:
    task = finished(storage, content)
    st = task.data_path.stat()
    fd = os.open(task.data_path, os.O_WRONLY)
    os.pwrite(fd, b"\xff\xff", 5 * PL + 10)
    os.close(fd)
    os.utime(task.data_path, ns=(st.st_atime_ns, st.st_mtime_ns))  # bit rot: no trace in the mtime
    assert task.read_piece(5) != pieces_of(content)[5]  # unverified reads do not notice
    with pytest.raises(DigestMismatch, match="piece 5"):
        task.read_piece(5, verify=True)
    assert task.state is TaskState.RUNNING
    assert task.missing_pieces() == [5]
    task.write_piece(5, pieces_of(content)[5])
    assert task.finish().content_digest == blake3.blake3(content).hexdigest()


def test_a_running_task_with_a_data_file_of_the_wrong_size_is_absent(tmp_path: Path, content: bytes) -> None:
    root = tmp_path / "store"
    with Storage(root) as s:
        write_all(new_task(s), content, order=[0, 1])
    os.truncate(root / "tasks" / TID / "data", SIZE - 1)
    with Storage(root) as s:
        assert s.get(TID) is None


def test_a_finished_data_file_cut_short_while_stopped_loses_only_its_tail(tmp_path: Path, content: bytes) -> None:
    root = tmp_path / "store"
    with Storage(root) as s:
        finished(s, content)
    os.truncate(root / "tasks" / TID / "data", 6 * PL + 5)
    with Storage(root) as s:
        task = s.get(TID)
        assert task is not None
        assert task.state is TaskState.RUNNING
        assert task.missing_pieces() == [6, 7]
        assert task.data_path.stat().st_size == SIZE
        write_all(task, content, order=[6, 7])
        assert task.finish().content_digest == blake3.blake3(content).hexdigest()


def test_data_modified_while_stopped_is_reverified_on_load(tmp_path: Path, content: bytes) -> None:
    root = tmp_path / "store"
    with Storage(root) as s:
        data_path = finished(s, content).data_path
    with open(data_path, "r+b") as f:
        f.seek(PL + 1)
        f.write(b"!")
    with Storage(root) as s:
        task = s.get(TID)
        assert task is not None
        assert task.state is TaskState.RUNNING
        assert task.missing_pieces() == [1]


def test_a_touched_but_unchanged_data_file_stays_finished(storage: Storage, content: bytes, tmp_path: Path) -> None:
    task = finished(storage, content)
    st = task.data_path.stat()
    os.utime(task.data_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert task.read_piece(0) == content[:PL]  # re-verified as a whole, found intact
    assert task.state is TaskState.SUCCEEDED
    assert task.export(tmp_path / "out") is ExportMethod.LINK


# --- export -----------------------------------------------------------------------------------------------------


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_export_by_hard_link(storage: Storage, content: bytes, tmp_path: Path) -> None:
    task = finished(storage, content)
    out = tmp_path / "out" / "model.bin"
    out.parent.mkdir()
    assert task.export(out) is ExportMethod.LINK
    assert out.read_bytes() == content
    assert out.stat().st_ino == task.data_path.stat().st_ino
    assert leftovers(out.parent) == []


def test_export_by_copy_when_asked(storage: Storage, content: bytes, tmp_path: Path) -> None:
    task = finished(storage, content)
    out = tmp_path / "copy.bin"
    assert task.export(out, allow_link=False) is ExportMethod.COPY
    assert out.read_bytes() == content
    assert out.stat().st_ino != task.data_path.stat().st_ino


def test_export_copies_across_filesystems(
    storage: Storage, content: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = finished(storage, content)

    def cross_device(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    out = tmp_path / "other-fs.bin"
    assert task.export(out) is ExportMethod.COPY
    assert out.read_bytes() == content
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("allow_link", [True, False])
def test_durable_export(storage: Storage, content: bytes, tmp_path: Path, allow_link: bool) -> None:
    task = finished(storage, content)
    task.export(tmp_path / "out", durable=True, allow_link=allow_link)
    assert (tmp_path / "out").read_bytes() == content
    assert leftovers(tmp_path) == []


def test_export_replaces_an_existing_file(storage: Storage, content: bytes, tmp_path: Path) -> None:
    task = finished(storage, content)
    out = tmp_path / "out"
    out.write_bytes(b"old")
    task.export(out)
    assert out.read_bytes() == content


def test_a_repeat_export_by_link_leaves_no_temporary_file(storage: Storage, content: bytes, tmp_path: Path) -> None:
    """The second export links the same file again: rename(2) of two links to one file does nothing, so the
    temporary name must be removed explicitly."""
    task = finished(storage, content)
    out = tmp_path / "twice" / "out"
    out.parent.mkdir()
    assert task.export(out) is ExportMethod.LINK
    assert task.export(out) is ExportMethod.LINK
    assert out.read_bytes() == content and leftovers(out.parent) == []


@pytest.mark.parametrize("algorithm", ["sha256", "blake3"])
def test_export_verifies_the_users_digest(storage: Storage, content: bytes, tmp_path: Path, algorithm: str) -> None:
    task = finished(storage, content)
    good = (hashlib.sha256 if algorithm == "sha256" else blake3.blake3)(content).hexdigest()
    task.export(tmp_path / "ok", digest=Digest.parse(f"{algorithm}:{good}"))
    assert (tmp_path / "ok").read_bytes() == content
    out = tmp_path / "bad"
    out.write_bytes(b"previous")
    with pytest.raises(DigestMismatch, match=f"expected {algorithm}:{'0' * 64}"):
        task.export(out, digest=Digest.parse(f"{algorithm}:{'0' * 64}"))
    assert out.read_bytes() == b"previous"
    assert leftovers(tmp_path) == []


def test_export_of_an_unfinished_task_leaves_nothing(storage: Storage, content: bytes, tmp_path: Path) -> None:
    task = new_task(storage)
    write_all(task, content, order=[0, 1])
    with pytest.raises(TaskIncomplete, match="6 pieces missing"):
        task.export(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_export_errors_say_what_to_do(storage: Storage, content: bytes, tmp_path: Path) -> None:
    task = finished(storage, content)
    with pytest.raises(ExportError, match="does not exist"):
        task.export(tmp_path / "missing" / "out")
    with pytest.raises(ExportError, match="is a directory; give a file name"):
        task.export(tmp_path)


def test_editing_a_hard_linked_output_does_not_poison_the_cache(storage: Storage, content: bytes, tmp_path: Path) -> None:
    task = finished(storage, content)
    out = tmp_path / "out"
    task.export(out)
    with open(out, "r+b") as f:  # the user edits the output in place: the same inode as the cache
        f.seek(2 * PL)
        f.write(b"edited")
        f.seek(0, os.SEEK_END)
        f.write(b"appended")
    edited = out.read_bytes()
    with pytest.raises(TaskIncomplete):
        task.export(tmp_path / "again")
    assert task.missing_pieces() == [2]
    with pytest.raises(PieceMissing):
        task.read_piece(2)  # never served
    assert task.data_path.stat().st_ino != out.stat().st_ino  # the cache broke away from the output
    task.write_piece(2, pieces_of(content)[2])
    task.finish()
    task.export(tmp_path / "again")
    assert (tmp_path / "again").read_bytes() == content
    assert out.read_bytes() == edited  # the repair did not undo the user's edit


# --- corrupt metadata -----------------------------------------------------------------------------------------


def _meta(root: Path) -> Path:
    return root / "tasks" / TID / "meta.json"


def _edit(field: str, value: object) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        doc = json.loads(_meta(root).read_bytes())
        doc[field] = value
        _meta(root).write_text(json.dumps(doc))

    return edit


def _write(data: bytes) -> Callable[[Path], None]:
    def write(root: Path) -> None:
        _meta(root).write_bytes(data)

    return write


def _remove(name: str) -> Callable[[Path], None]:
    return lambda root: (root / "tasks" / TID / name).unlink()


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "garbage": _write(b"\x00\x01garbage"),
    "truncated json": _write(b'{"format": 1, "task_id": "'),
    "empty file": _write(b""),
    "not an object": _write(b"[1, 2, 3]"),
    "unknown format": _edit("format", 2),
    "wrong type": _edit("piece_length", "65536"),
    "other task": _edit("task_id", "0" * 64),
    "bad piece length": _edit("piece_length", 1000),
    "wrong piece count": _edit("digests", [None] * 3),
    "bad digest": _edit("digests", ["zz"] * 8),
    "bad state": _edit("state", "exploded"),
    "negative length": _edit("content_length", -5),
    "finished without content digest": _edit("content_digest", None),
    "finished with a missing piece": _edit("digests", [None] * 8),
    "data file missing": _remove("data"),
    "metadata missing": _remove("meta.json"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_metadata_means_absent(tmp_path: Path, content: bytes, corruption: str, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "store"
    with Storage(root) as s:
        finished(s, content)
    CORRUPTIONS[corruption](root)
    with caplog.at_level(logging.ERROR, logger="dfz"), Storage(root) as s:
        assert s.get(TID) is None
        assert s.list_tasks() == []
        if corruption != "metadata missing":
            assert any("storage.corrupt" in r.getMessage() and TID in r.getMessage() for r in caplog.records)
        task = new_task(s)  # a corrupt task is replaced by a fresh one
        assert task.stored_pieces() == []
        write_all(task, content)
        task.finish()
    with Storage(root) as s:
        got = s.get(TID)
        assert got is not None and got.state is TaskState.SUCCEEDED


# --- listing and deleting ------------------------------------------------------------------------------------


def test_list_tasks(storage: Storage, content: bytes) -> None:
    other = task_id(URL, tag="other")
    done = finished(storage, content)
    running = storage.create(other, url=URL + "?v=2", piece_length=PL, content_length=3 * PL)
    running.write_piece(1, content[:PL])
    (storage.root / "tasks" / "not-a-task").mkdir()
    infos = {i.task_id: i for i in storage.list_tasks()}
    assert sorted(infos) == sorted([done.task_id, other])
    assert infos[TID].state is TaskState.SUCCEEDED and infos[TID].bytes_stored == SIZE
    assert infos[other].state is TaskState.RUNNING and infos[other].pieces_stored == 1
    assert infos[other].url == URL + "?v=2" and infos[other].piece_count == 3


def test_list_tasks_after_restart_does_not_need_to_open_them(tmp_path: Path, content: bytes) -> None:
    root = tmp_path / "store"
    with Storage(root) as s:
        finished(s, content)
    with Storage(root) as s:
        [info] = s.list_tasks()
        assert (info.task_id, info.state, info.content_length) == (TID, TaskState.SUCCEEDED, SIZE)


def test_delete(storage: Storage, content: bytes, tmp_path: Path) -> None:
    task = finished(storage, content)
    out = tmp_path / "out"
    task.export(out)
    assert storage.delete(TID) is True
    assert storage.get(TID) is None
    assert not (storage.root / "tasks" / TID).exists()
    assert storage.list_tasks() == []
    assert storage.delete(TID) is False
    assert out.read_bytes() == content  # the exported hard link keeps the bytes
    with pytest.raises(TaskClosed):
        task.read_piece(0)


def test_delete_while_a_download_is_writing(storage: Storage, content: bytes) -> None:
    task = new_task(storage)
    write_all(task, content, order=[0])
    assert storage.delete(TID)
    with pytest.raises(TaskClosed):
        task.write_piece(1, pieces_of(content)[1])
    assert not (storage.root / "tasks" / TID).exists()


def test_delete_of_a_task_that_was_never_opened(tmp_path: Path, content: bytes) -> None:
    root = tmp_path / "store"
    with Storage(root) as s:
        finished(s, content)
    with Storage(root) as s:
        assert s.delete(TID)
        assert s.list_tasks() == []


# --- creation rules -----------------------------------------------------------------------------------------------


def test_create_twice_and_get_or_create(storage: Storage, content: bytes) -> None:
    task = new_task(storage)
    with pytest.raises(TaskExists):
        new_task(storage)
    assert storage.get_or_create(TID, url=URL, piece_length=PL, content_length=SIZE) is task
    with pytest.raises(LayoutConflict, match="piece length"):
        storage.get_or_create(TID, url=URL, piece_length=2 * PL, content_length=SIZE)
    with pytest.raises(LayoutConflict, match=f"has {SIZE} bytes, not 5"):
        storage.get_or_create(TID, url=URL, piece_length=PL, content_length=5)


def test_get_or_create_fixes_the_length_of_a_stream(storage: Storage) -> None:
    task = new_task(storage, None)
    assert storage.get_or_create(TID, url=URL, piece_length=PL, content_length=SIZE) is task
    assert task.content_length == SIZE


def test_task_ids_are_checked_before_touching_the_disk(storage: Storage) -> None:
    for bad in ["../../etc", TID.upper(), TID[:-1], ""]:
        with pytest.raises(InvalidTaskId):
            storage.get(bad)
        with pytest.raises(InvalidTaskId):
            storage.create(bad, url=URL, piece_length=PL, content_length=1)
        with pytest.raises(InvalidTaskId):
            storage.delete(bad)


def test_a_closed_storage_refuses_work(tmp_path: Path, content: bytes) -> None:
    s = Storage(tmp_path / "s")
    task = new_task(s)
    s.close()
    s.close()
    with pytest.raises(StorageError, match="is closed"):
        s.get(TID)
    with pytest.raises(TaskClosed):
        task.write_piece(0, pieces_of(content)[0])


# --- O_DIRECT ---------------------------------------------------------------------------------------------


def _fd_flags(fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError("no flags in fdinfo")


def test_direct_io_bypasses_the_page_cache_where_the_filesystem_allows(tmp_path: Path, content: bytes) -> None:
    with Storage(tmp_path / "store") as storage:
        task = new_task(storage)
        if task._dfd is None:
            pytest.skip("this filesystem refuses O_DIRECT")
        assert _fd_flags(task._dfd) & os.O_DIRECT
        assert not _fd_flags(task._fd) & os.O_DIRECT
        write_all(task, content, order=[7, 3, 0, 1, 2, 4, 6, 5])  # the last piece (unaligned tail) early
        info = task.finish()
        assert info.content_digest == blake3.blake3(content).hexdigest()
        assert (tmp_path / "store" / "tasks" / TID / "data").read_bytes() == content
        for i, part in enumerate(pieces_of(content)):
            assert task.read_piece(i, verify=True) == part
        task.export(tmp_path / "out", digest=Digest.parse("sha256:" + hashlib.sha256(content).hexdigest()))
        assert (tmp_path / "out").read_bytes() == content


def test_direct_io_refused_at_the_first_write_falls_back_to_buffered(
    tmp_path: Path, content: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Storage(tmp_path / "store") as storage:
        task = new_task(storage)
        if task._dfd is None:
            pytest.skip("this filesystem refuses O_DIRECT")
        dfd = task._dfd
        real_pwrite = os.pwrite

        def pwrite(fd: int, data: bytes, offset: int) -> int:
            if fd == dfd:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)
        write_all(task, content)
        assert task._dfd is None
        monkeypatch.undo()
        assert task.finish().content_digest == blake3.blake3(content).hexdigest()
        assert [task.read_piece(i) for i in range(8)] == pieces_of(content)
    assert (tmp_path / "store" / "tasks" / TID / "data").read_bytes() == content


# --- the piece cache ----------------------------------------------------------------------------------------


def test_retained_pieces_are_served_from_memory_up_to_the_budget(tmp_path: Path, content: bytes) -> None:
    with Storage(tmp_path / "store", piece_cache_bytes=3 * PL) as storage:
        task = new_task(storage)
        parts = pieces_of(content)
        for i, part in enumerate(parts):
            task.write_piece(i, part, retain=True)
        # The last three pieces written are in memory (the very objects handed over); older ones come
        # from the file, and a read puts them in the cache.
        assert task.read_piece(7).obj is parts[7]  # type: ignore[union-attr]
        assert task.read_piece(6).obj is parts[6]  # type: ignore[union-attr]
        first = task.read_piece(0)
        assert bytes(first) == parts[0]
        assert task.read_piece(0) is first
        assert [bytes(task.read_piece(i)) for i in range(8)] == parts


def test_a_piece_written_without_retain_replaces_what_the_cache_held(tmp_path: Path, content: bytes) -> None:
    other = content_of(SIZE, seed=2)
    with Storage(tmp_path / "store") as storage:
        task = new_task(storage)
        write_all(task, content)
        assert bytes(task.read_piece(0)) == content[:PL]  # now cached
        storage.delete(TID)
        # The same task id with other content (the origin changed it), written from a reused buffer.
        task = new_task(storage)
        buffer = bytearray(other[:PL])
        task.write_piece(0, buffer)
        buffer[:] = bytes(PL)  # the writer reuses its buffer
        assert bytes(task.read_piece(0)) == other[:PL]


def test_damaged_pieces_leave_the_cache(tmp_path: Path, content: bytes) -> None:
    with Storage(tmp_path / "store") as storage:
        task = new_task(storage)
        parts = pieces_of(content)
        for i, part in enumerate(parts):
            task.write_piece(i, part, retain=True)
        data_path = tmp_path / "store" / "tasks" / TID / "data"
        with open(data_path, "r+b") as f:
            f.seek(2 * PL)
            f.write(b"\xff" * 16)
        assert task.verify_all() == [2]
        with pytest.raises(PieceMissing):
            task.read_piece(2)
        task.write_piece(2, parts[2])
        assert bytes(task.read_piece(2, verify=True)) == parts[2]


def test_the_piece_cache_budget_must_not_be_negative(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="piece_cache_bytes"):
        Storage(tmp_path / "store", piece_cache_bytes=-1)


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_a_piece_buffer_is_written_direct_without_a_copy(tmp_path: Path, content: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    with Storage(tmp_path / "store") as storage:
        task = new_task(storage)
        if task._dfd is None:
            pytest.skip("this filesystem refuses O_DIRECT")
        dfd = task._dfd
        written_from: list[int] = []
        real_pwrite = os.pwrite

        def pwrite(fd: int, data: memoryview, offset: int) -> int:
            if fd == dfd:
                written_from.append(_address(data))
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)
        buffers = []
        for i, part in enumerate(pieces_of(content)):
            buffer = piece_buffer(len(part))
            assert len(buffer) == len(part) and not buffer.readonly and _address(buffer) % 4096 == 0
            assert bytes(buffer) == bytes(len(part))
            buffer[:] = part
            buffers.append(buffer)
            task.write_piece(i, buffer, retain=True)
        # Whole pages straight from the caller's buffers; the last piece (1234 bytes) is written buffered.
        assert written_from == [_address(b) for b in buffers[:7]]
        # Any other buffer is copied into an aligned one first.
        unaligned = memoryview(bytearray(PL + 1))[1:]
        unaligned[:] = content[:PL]
        storage.delete(TID)
        task = new_task(storage)
        assert task._dfd is not None
        dfd = task._dfd
        written_from.clear()
        task.write_piece(0, unaligned)
        assert len(written_from) == 1 and written_from[0] != _address(unaligned) and written_from[0] % 4096 == 0
        monkeypatch.undo()
        write_all(task, content)
        assert task.finish().content_digest == blake3.blake3(content).hexdigest()
    assert (tmp_path / "store" / "tasks" / TID / "data").read_bytes() == content
