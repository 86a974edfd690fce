"""dfz/peer/origin.py against a real HTTP origin (:func:`e2e_helpers.serve_origin`) and a real storage:
the range fetch keeps reading while pieces are being stored, and what it stores is the origin's file."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import blake3
from e2e_helpers import Route, serve_origin

from dfz.peer.origin import OriginPiece, fetch_from_origin
from dfz.peer.source.http import HTTPBackend
from dfz.peer.storage import Storage, StoredTask
from dfz.tasks import KiB, piece_digest, task_id

PL = 64 * KiB
CONTENT = random.Random(7).randbytes(5 * PL + 1000)  # six pieces, the last one short


async def test_the_next_range_is_read_while_a_piece_is_being_stored(tmp_path: Path) -> None:
    """One range in flight: while piece 0 waits to be stored (a slow disk), piece 1 is read all the same."""
    with serve_origin({"/f": Route(CONTENT)}) as origin, Storage(tmp_path / "store") as storage:
        url = f"{origin.url}/f"
        served_while_storing: list[int] = []

        def on_task(task: StoredTask) -> None:
            real = task.write_piece

            def slow_write(index: int, data: Any, **kwargs: Any) -> str:
                if index == 0:
                    deadline = time.monotonic() + 10.0
                    while origin.served.get("/f", 0) < 2 * PL and time.monotonic() < deadline:
                        time.sleep(0.005)
                    served_while_storing.append(origin.served.get("/f", 0))
                return real(index, data, **kwargs)

            task.write_piece = slow_write  # type: ignore[method-assign]

        pieces: list[OriginPiece] = []
        backend = HTTPBackend()
        try:
            task = await fetch_from_origin(
                backend,
                url,
                {},
                storage=storage,
                task_id=task_id(url),
                fixed_piece_length=PL,
                concurrency=1,
                on_task=on_task,
                on_metadata=lambda pl, cl: None,
                on_piece=pieces.append,
            )
        finally:
            backend.close()
        assert served_while_storing and served_while_storing[0] >= 2 * PL, "piece 1 was not read while piece 0 was stored"
        assert sorted(p.index for p in pieces) == list(range(6))
        for p in pieces:
            assert p.digest == piece_digest(CONTENT[p.index * PL : (p.index + 1) * PL])
        assert task.finish().content_digest == blake3.blake3(CONTENT).hexdigest()
        assert task.data_path.read_bytes() == CONTENT
        assert origin.served["/f"] == len(CONTENT)
