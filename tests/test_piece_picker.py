"""The piece picker, without I/O: assignments, windows, strategies, failures, blocking and the endgame."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dfz.peer.download import FailureKind, InOrder, PiecePicker, RarestFirst


def picker(n: int, **kw: object) -> PiecePicker:
    return PiecePicker(n, rng=random.Random(7), **kw)  # type: ignore[arg-type]


def drain(p: PiecePicker) -> list[tuple[str, int]]:
    """Complete every assignment as it comes, until nothing is left to assign; return them in order."""
    done: list[tuple[str, int]] = []
    while True:
        batch = p.next_assignments()
        if not batch:
            return done
        for parent, piece in batch:
            p.piece_done(parent, piece)
            done.append((parent, piece))


def test_one_full_parent_gets_every_piece_once_within_its_window() -> None:
    p = picker(10, window=3)
    p.add_parent("a")
    p.parent_has_all("a")
    first = p.next_assignments()
    assert len(first) == 3 and {parent for parent, _ in first} == {"a"}
    assert p.next_assignments() == []  # the window is full
    assert p.in_flight("a") == {piece for _, piece in first}
    for _, piece in first:
        p.piece_done("a", piece)
    rest = drain(p)
    pieces = [piece for _, piece in first + rest]
    assert sorted(pieces) == list(range(10))
    assert p.done and p.missing == 0


def test_pieces_go_only_to_parents_that_have_them() -> None:
    p = picker(8, window=8)
    p.add_parent("a")
    p.add_parent("b")
    p.parent_has("a", [0, 1, 2])
    p.parent_has("b", [5, 6])
    got = p.next_assignments()
    assert sorted(got) == [("a", 0), ("a", 1), ("a", 2), ("b", 5), ("b", 6)]
    for parent, piece in got:
        p.piece_done(parent, piece)
    assert p.next_assignments() == []  # 3, 4, 7: nobody has them
    assert not p.done and p.missing == 3
    p.parent_has("b", [3, 4, 7])  # announced later
    assert sorted(p.next_assignments()) == [("b", 3), ("b", 4), ("b", 7)]


def test_rarest_first_takes_the_rarest_piece_first() -> None:
    p = picker(6, window=1)
    for parent in "abc":
        p.add_parent(parent)
        p.parent_has(parent, range(6))
    p.parent_lacks("b", 4)
    p.parent_lacks("c", 4)  # piece 4: only "a" has it
    p.parent_lacks("c", 2)  # piece 2: "a" and "b"
    assert p.availability(4) == 1 and p.availability(2) == 2 and p.availability(0) == 3
    got = dict(p.next_assignments())  # window 1: one piece each, the rarest each parent has
    assert got["a"] == 4 and got["b"] == 2 and got["c"] in {0, 1, 3, 5}


def test_rarest_first_ties_are_broken_at_random_per_child() -> None:
    # Children of one full parent do not all start with the same pieces (they could not trade them).
    starts = set()
    for seed in range(8):
        p = PiecePicker(64, window=4, rng=random.Random(seed))
        p.add_parent("seed")
        p.parent_has_all("seed")
        starts.add(tuple(piece for _, piece in p.next_assignments()))
    assert len(starts) > 4


def test_in_order_goes_front_to_back_over_every_parent() -> None:
    p = picker(8, window=2, strategy=InOrder())
    p.add_parent("a")
    p.add_parent("b")
    p.parent_has("a", [1, 3, 5, 7])
    p.parent_has("b", range(8))
    got = p.next_assignments()
    assert sorted(piece for _, piece in got) == [0, 1, 2, 3]
    assert all(parent == "b" for parent, piece in got if piece in (0, 2))
    order = [piece for _, piece in got + drain_in_order(p, got)]
    assert sorted(order) == list(range(8))


def drain_in_order(p: PiecePicker, pending: list[tuple[str, int]]) -> list[tuple[str, int]]:
    for parent, piece in pending:
        p.piece_done(parent, piece)
    return drain(p)


def test_pieces_without_a_trusted_digest_wait_until_it_comes() -> None:
    p = picker(4, ready=[0], window=4)
    p.add_parent("a")
    p.parent_has_all("a")
    assert p.next_assignments() == [("a", 0)]
    p.set_ready([2, 3])
    assert sorted(p.next_assignments()) == [("a", 2), ("a", 3)]
    p.set_ready([1])
    assert p.next_assignments() == [("a", 1)]


def test_stored_pieces_are_never_assigned() -> None:
    p = picker(5, stored=[0, 2, 4])
    p.add_parent("a")
    p.parent_has_all("a")
    assert sorted(piece for _, piece in drain(p)) == [1, 3]
    assert p.done


def test_a_removed_parent_gives_its_pieces_back() -> None:
    p = picker(6, window=3, endgame=False)
    p.add_parent("a")
    p.add_parent("b")
    p.parent_has_all("a")
    p.parent_has_all("b")
    got = p.next_assignments()
    a_pieces = sorted(piece for parent, piece in got if parent == "a")
    assert len(a_pieces) == 3
    assert p.remove_parent("a") == a_pieces
    assert p.in_flight("a") == frozenset() and not p.has_parent("a")
    assert p.availability(a_pieces[0]) == 1
    for _, piece in got:
        if piece not in a_pieces:
            p.piece_done("b", piece)
    assert sorted(piece for _, piece in drain(p)) == a_pieces  # "b" takes them over
    assert p.remove_parent("nobody") == []


def test_failures_missing_transient_and_bad() -> None:
    p = picker(4, window=1, strategy=InOrder(), endgame=False)
    for parent in "ab":
        p.add_parent(parent)
        p.parent_has_all(parent)
    got = dict(p.next_assignments())
    assert got == {"a": 0, "b": 1}

    # MISSING: "a" lacks piece 0 after all; the piece goes back, "a" is not asked for it again.
    assert p.piece_failed("a", 0, FailureKind.MISSING) == [0]
    assert p.availability(0) == 1
    assert p.next_assignments() == [("a", 2)]
    p.piece_done("a", 2)

    # TRANSIENT: the piece goes back, the parent stays.
    assert p.piece_failed("b", 1, FailureKind.TRANSIENT) == [1]
    assert p.has_parent("b")

    # BAD: "b" is blocked; every piece it had in flight goes back.
    assert sorted(p.next_assignments()) == [("a", 1), ("b", 0)]
    assert p.piece_failed("b", 0, FailureKind.BAD) == [0]
    assert "b" in p.blocked and not p.has_parent("b")
    assert not p.add_parent("b")
    p.piece_done("a", 1)
    assert p.next_assignments() == [("a", 3)]  # "a" never had piece 0 (MISSING); 3 is left
    p.piece_done("a", 3)
    assert p.next_assignments() == []
    assert p.missing == 1  # piece 0: nobody left has it
    p.add_parent("c")
    p.parent_has("c", [0])
    assert p.next_assignments() == [("c", 0)]


def test_a_bad_parent_with_several_pieces_in_flight_frees_them_all() -> None:
    p = picker(8, window=4, endgame=False)
    p.add_parent("liar")
    p.parent_has_all("liar")
    got = sorted(piece for _, piece in p.next_assignments())
    freed = p.piece_failed("liar", got[0], FailureKind.BAD)
    assert sorted(freed) == got
    assert p.in_flight() == frozenset()
    # A late answer from the blocked parent changes nothing.
    assert p.piece_failed("liar", got[1], FailureKind.TRANSIENT) == []


def test_windows_are_per_parent() -> None:
    p = picker(20, window=2)
    p.add_parent("a", window=5)
    p.add_parent("b")
    p.parent_has_all("a")
    p.parent_has_all("b")
    counts = Counter(parent for parent, _ in p.next_assignments())
    assert counts == {"a": 5, "b": 2}
    p.set_window("b", 4)
    assert Counter(parent for parent, _ in p.next_assignments()) == {"b": 2}
    assert p.window_of("b") == 4


def test_endgame_asks_a_second_parent_and_names_the_redundant_fetch() -> None:
    p = picker(3, window=2)
    p.add_parent("slow")
    p.parent_has_all("slow")
    first = p.next_assignments()  # two pieces to "slow"
    p.add_parent("fast")
    p.parent_has_all("fast")
    second = p.next_assignments()
    # One candidate is left for "fast"; then, all pieces being in flight, it doubles one of "slow"'s.
    assert len(second) == 2
    doubled = [piece for _, piece in second if piece in {q for _, q in first}]
    assert len(doubled) == 1
    assert p.piece_done("fast", doubled[0]) == ["slow"]  # the shell cancels "slow"'s fetch
    assert doubled[0] not in p.in_flight("slow")
    # Never more than two fetches of one piece, never two from one parent.
    p.add_parent("third")
    p.parent_has_all("third")
    third = p.next_assignments()
    assert third and all(parent == "third" for parent, _ in third)
    for piece in range(3):
        assert len(p.fetchers(piece)) <= 2
    assert any(len(p.fetchers(piece)) == 2 for _, piece in third)


def test_no_endgame_while_pieces_that_no_parent_has_are_missing() -> None:
    """A child at the frontier of a swarm (its parents have nothing more yet) does not double fetches."""
    p = picker(4, window=2)
    p.add_parent("a")
    p.parent_has("a", [0, 1])
    assert sorted(piece for _, piece in p.next_assignments()) == [0, 1]
    p.add_parent("b")
    p.parent_has("b", [0, 1])
    assert p.next_assignments() == []  # pieces 2 and 3 exist nowhere yet: not the endgame
    p.parent_has("a", [2, 3])
    assert p.next_assignments() == []  # a's window is full; b lacks 2 and 3
    p.piece_done("a", 0)
    assert [piece for _, piece in p.next_assignments()] in ([2], [3])
    p.parent_has("b", [2, 3])
    # b takes the last piece nobody fetches; then every missing piece is in flight: b doubles one of a's.
    second = p.next_assignments()
    assert len(second) == 2 and all(parent == "b" for parent, _ in second)
    assert sorted(len(p.fetchers(piece)) for piece in (1, 2, 3)) == [1, 1, 2]


def test_without_endgame_nothing_is_doubled() -> None:
    p = picker(2, window=2, endgame=False)
    p.add_parent("a")
    p.parent_has_all("a")
    p.next_assignments()
    p.add_parent("b")
    p.parent_has_all("b")
    assert p.next_assignments() == []


def test_a_parent_that_loses_a_piece_it_had_all_of() -> None:
    p = picker(4)
    p.add_parent("a")
    p.parent_has_all("a")
    p.parent_lacks("a", 2)
    assert p.availability(2) == 0 and p.availability(1) == 1
    assert sorted(piece for _, piece in drain(p)) == [0, 1, 3]


def test_bitmap_of_everything_counts_as_all() -> None:
    p = picker(3)
    p.add_parent("a")
    p.parent_has("a", [0, 1])
    p.parent_has("a", [2, 2])
    assert [p.availability(i) for i in range(3)] == [1, 1, 1]
    p.parent_has_all("a")
    assert [p.availability(i) for i in range(3)] == [1, 1, 1]


def test_out_of_range_pieces_are_refused() -> None:
    p = picker(3)
    p.add_parent("a")
    with pytest.raises(IndexError):
        p.parent_has("a", [3])
    with pytest.raises(IndexError):
        p.set_ready([-1])
    with pytest.raises(ValueError):
        PiecePicker(3, window=0)


def test_an_empty_task_is_done_at_once() -> None:
    p = picker(0)
    p.add_parent("a")
    p.parent_has_all("a")
    assert p.done and p.next_assignments() == []


@pytest.mark.parametrize("strategy", [RarestFirst, InOrder])
def test_random_histories_keep_the_invariants(strategy: type[RarestFirst] | type[InOrder]) -> None:
    """Random events; after each: assignments respect holdings and windows, no piece is fetched twice
    outside the endgame, stored pieces are never assigned, a parent is given another piece only when it has
    no wanted candidate left, and the download completes."""
    rng = random.Random(11)
    n = 40
    p = PiecePicker(n, window=3, strategy=strategy(), rng=random.Random(3), endgame=False)
    holdings: dict[str, set[int]] = {}
    for step in range(2000):
        roll = rng.random()
        if roll < 0.03:
            p.set_wanted(rng.sample(range(n), rng.randrange(6)))
        elif roll < 0.1 and len(holdings) < 4:
            name = f"p{step}"
            if p.add_parent(name):
                holdings[name] = set()
        elif roll < 0.3 and holdings:
            name = rng.choice(sorted(holdings))
            pieces = set(rng.sample(range(n), 5))
            holdings[name] |= pieces
            p.parent_has(name, pieces)
        elif roll < 0.35 and holdings:
            name = rng.choice(sorted(holdings))
            p.remove_parent(name)
            del holdings[name]
        elif roll < 0.4 and holdings:
            name = rng.choice(sorted(holdings))
            flying = sorted(p.in_flight(name))
            if flying:
                kind = rng.choice([FailureKind.MISSING, FailureKind.TRANSIENT, FailureKind.BAD])
                p.piece_failed(name, flying[0], kind)
                if kind is FailureKind.MISSING:
                    holdings[name].discard(flying[0])
                if kind is FailureKind.BAD:
                    del holdings[name]
        else:
            batch = p.next_assignments()
            for parent, piece in batch:
                assert piece in holdings[parent]
                assert not p.is_stored(piece)
                assert len(p.in_flight(parent)) <= p.window_of(parent)
                if piece not in p.wanted:
                    left = [w for w in p.wanted if w in holdings[parent] and not p.is_stored(w) and not p.fetchers(w)]
                    assert not left, f"{parent} was given {piece} before the wanted {left}"
            everywhere = [piece for name in holdings for piece in p.in_flight(name)]
            assert len(everywhere) == len(set(everywhere))
            for name in list(holdings):
                for piece in sorted(p.in_flight(name))[:1]:
                    p.piece_done(name, piece)
    p.add_parent("final")
    p.parent_has_all("final")
    for name in list(holdings):
        p.remove_parent(name)
    drain(p)
    assert p.done


def test_in_order_with_nothing_to_pick_picks_nothing() -> None:
    strategy = InOrder()
    assert strategy.pick(None, 3) == []
    strategy.add(5, 0)
    strategy.add(2, 0)
    assert strategy.pick(None, 3) == [2, 5]
    strategy.remove(2, 0)
    strategy.remove(5, 0)
    assert strategy.pick(None, 3) == []
    strategy.add(1, 0)
    assert strategy.pick({1}, 3) == [1]


def test_a_large_task_is_picked_quickly() -> None:
    """2**15 pieces, two parents: every pick is cheap whatever the strategy (no quadratic scans)."""
    for strategy in (RarestFirst(), InOrder()):
        p = PiecePicker(2**15, window=8, strategy=strategy, rng=random.Random(1))
        for parent in ("a", "b"):
            p.add_parent(parent)
            p.parent_has_all(parent)
        assert len(drain(p)) == 2**15 and p.done


# --- wanted pieces first ---------------------------------------------------------------------------------


def test_wanted_pieces_come_first_from_a_full_parent() -> None:
    p = picker(64, window=4)
    p.add_parent("seed")
    p.parent_has_all("seed")
    p.set_wanted([62, 63])
    first = [piece for _, piece in p.next_assignments()]
    assert len(first) == 4 and set(first[:2]) == {62, 63} and not {62, 63} & set(first[2:])
    assert p.wanted == {62, 63}


def test_rarest_first_among_wanted_pieces_then_the_rest() -> None:
    p = picker(10, window=1)
    for parent in "abc":
        p.add_parent(parent)
        p.parent_has(parent, range(10))
    p.parent_lacks("b", 0)
    p.parent_lacks("c", 0)  # piece 0: only "a", the rarest of all, but not wanted
    p.parent_lacks("c", 7)  # piece 7: "a" and "b"; 8 and 9: everyone
    p.set_wanted([7, 8, 9])
    got = dict(p.next_assignments())
    assert got["a"] == 7 or got["b"] == 7  # the rarest wanted piece goes first to one who has it
    assert set(got.values()) <= {7, 8, 9}  # window 1 each: wanted pieces only, piece 0 waits
    for parent, piece in got.items():
        p.piece_done(parent, piece)
    assert [piece for _, piece in p.next_assignments() if piece == 0] == [0]  # then rarest first as before


def test_wanted_pieces_a_parent_lacks_do_not_hold_it_up() -> None:
    p = picker(8, window=2)
    p.add_parent("a")
    p.parent_has("a", [0, 1, 2])
    p.set_wanted([6, 7])  # nobody has them yet
    assert sorted(piece for _, piece in p.next_assignments()) in ([0, 1], [0, 2], [1, 2])
    p.add_parent("b")
    p.parent_has("b", [7])
    assert p.next_assignments() == [("b", 7)]


def test_changing_the_wanted_set_moves_candidates_and_keeps_flights() -> None:
    p = picker(20, window=2, strategy=InOrder())
    p.add_parent("a")
    p.parent_has_all("a")
    p.set_wanted([10, 11, 12])
    assert p.next_assignments() == [("a", 10), ("a", 11)]
    p.set_wanted([15])  # another caller's range replaces the union: 12 is an ordinary candidate again
    p.piece_done("a", 10)
    assert p.next_assignments() == [("a", 15)]
    p.piece_done("a", 11)
    p.set_wanted([])
    assert p.next_assignments() == [("a", 0)]  # in order from the start, as without wanted pieces
    with pytest.raises(IndexError):
        p.set_wanted([20])


def test_stored_wanted_pieces_are_not_fetched_and_drain_completes() -> None:
    p = picker(12, window=3, stored=[11], wanted=[10, 11])
    p.add_parent("a")
    p.parent_has_all("a")
    got = drain(p)
    assert got[0] == ("a", 10) and sorted(piece for _, piece in got) == list(range(11))
    assert p.done


def test_endgame_doubles_wanted_pieces_first() -> None:
    p = picker(4, window=4)
    p.add_parent("slow")
    p.parent_has_all("slow")
    assert len(p.next_assignments()) == 4  # everything in flight from "slow"
    p.set_wanted([3])
    p.add_parent("fast")
    p.parent_has_all("fast")
    p.set_window("fast", 1)
    assert p.next_assignments() == [("fast", 3)]
