"""Wanted pieces without I/O: byte ranges to pieces (dfz/peer/wanted.py), the union of several callers', the
order of the origin's range requests (dfz/peer/origin.py ``OriginOrder``) and the proxy's ``Range`` header as
a download's ``priority_range`` (dfz/peer/proxy/task.py ``wanted_range``)."""

from __future__ import annotations

import random

import pytest

from dfz.peer.origin import OriginOrder
from dfz.peer.proxy.task import parse_range, wanted_range
from dfz.peer.wanted import WantedPieces, check_byte_range, pieces_of, resolve_byte_range
from dfz.tasks import PieceLayout

K = 64 * 1024
L = 9 * K + 784
LAYOUT = PieceLayout(L, K)  # 10 pieces, the last one 784 bytes


def test_byte_ranges_become_the_pieces_that_hold_them() -> None:
    assert list(pieces_of((0, 1), LAYOUT)) == [0]
    assert list(pieces_of((K - 1, K + 1), LAYOUT)) == [0, 1]
    assert list(pieces_of((K, 2 * K), LAYOUT)) == [1]
    assert list(pieces_of((L - 1, None), LAYOUT)) == [9]
    assert list(pieces_of((-100, None), LAYOUT)) == [9]
    assert list(pieces_of((-1000, None), LAYOUT)) == [8, 9]  # the last piece is 784 bytes
    assert list(pieces_of((-(L + 1), None), LAYOUT)) == list(range(10))  # more than the content: all of it
    assert list(pieces_of((5 * K, 1 << 40), LAYOUT)) == [5, 6, 7, 8, 9]  # an end past the content is cut
    assert list(pieces_of((L, None), LAYOUT)) == []  # at the end: nothing (the proxy answers 416)
    assert resolve_byte_range((-100, None), L) == (L - 100, L)
    assert resolve_byte_range((0, None), 0) is None


@pytest.mark.parametrize("bad", [(5, 5), (7, 3), (-3, 10)])
def test_malformed_byte_ranges_are_refused(bad: tuple[int, int | None]) -> None:
    with pytest.raises(ValueError):
        check_byte_range(bad)
    with pytest.raises(ValueError):
        WantedPieces().add(bad)


def test_the_union_of_the_callers_ranges_once_the_layout_is_known() -> None:
    wanted = WantedPieces()
    seen: list[frozenset[int]] = []
    unwatch = wanted.watch(seen.append)
    a = wanted.add((0, 100))
    b = wanted.add((-10, None))
    assert wanted.pieces == frozenset() and seen == [frozenset()]  # no layout yet: no pieces
    wanted.set_layout(LAYOUT)
    assert wanted.pieces == {0, 9} and seen[-1] == {0, 9}
    c = wanted.add((50, K + 2000))  # overlaps a's piece 0, adds piece 1
    assert wanted.pieces == {0, 1, 9}
    wanted.remove(a)
    assert wanted.pieces == {0, 1, 9}  # c still wants piece 0
    wanted.remove(c)
    wanted.remove(c)  # twice: nothing
    assert wanted.pieces == {9}
    unwatch()
    wanted.remove(b)
    assert wanted.pieces == frozenset() and seen[-1] == {9}  # no longer watched
    assert len(seen) == len(set(seen))  # told of changes only


def test_origin_order_takes_wanted_pieces_first_then_the_rest_by_index() -> None:
    order = OriginOrder([1, 2, 3, 5, 8, 9], wanted=[9, 4])  # 4 is stored already: not missing
    assert [order.take() for _ in range(3)] == [9, 1, 2]
    order.set_wanted([8, 2])  # a new caller's range, while the fetch runs: 2 was taken already
    assert [order.take() for _ in range(4)] == [8, 3, 5, None]
    assert len(order) == 0


def test_origin_order_takes_each_piece_once_whatever_the_wanted_changes() -> None:
    rng = random.Random(5)
    missing = rng.sample(range(200), 120)
    order = OriginOrder(missing)
    taken: list[int] = []
    while (piece := order.take()) is not None:
        taken.append(piece)
        if rng.random() < 0.2:
            wanted = rng.sample(range(200), 8)
            order.set_wanted(wanted)
            nxt = order.take()
            left = [w for w in wanted if w in missing and w not in taken]
            if left:
                assert nxt == min(left)
            if nxt is not None:
                taken.append(nxt)
    assert sorted(taken) == sorted(missing)


@pytest.mark.parametrize(
    "header",
    [
        "bytes=0-0",
        "bytes=100-",
        "bytes=-100",
        "bytes=9000-20000",
        "bytes=9999-",
        "bytes= 5 - 7",
        "bytes=-20000",
        f"bytes=-{L + 5}",
        f"bytes={K}-{10 * L}",
    ],
)
def test_the_range_header_as_a_priority_covers_what_is_served(header: str) -> None:
    served = parse_range(header, LAYOUT.content_length)
    priority = wanted_range(header)
    assert isinstance(served, tuple) and priority is not None
    assert resolve_byte_range(priority, LAYOUT.content_length) == served


@pytest.mark.parametrize("header", [None, "bytes=5-3", "bytes=-0", "bytes=-", "bytes=0-1,5-6", "items=0-5", "bytes=x-"])
def test_headers_served_whole_give_no_priority(header: str | None) -> None:
    assert wanted_range(header) is None
    assert parse_range(header, LAYOUT.content_length) in (None, False)
