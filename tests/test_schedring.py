"""The scheduler hash ring (``dfz.peer.schedring``): the rule of protocol.md §14.9, stability and balance."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from dfz.peer.schedring import VIRTUAL_NODES, SchedulerRing, point

NODES = ["tcp://10.0.0.1:8002", "tcp://10.0.0.2:8002", "tcp://10.0.0.3:8002"]
KEYS = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20_000)]  # task ids are SHA-256 hex


def test_point_is_the_first_8_bytes_of_sha256_big_endian() -> None:
    assert point("") == 0xE3B0C44298FC1C14
    assert point("abc") == int(hashlib.sha256(b"abc").hexdigest()[:16], 16)


def test_owner_follows_the_rule_written_in_the_protocol() -> None:
    """An independent, naive reading of §14.9: the smallest virtual point at or after the key, else the
    smallest point of all; ties by endpoint."""
    ring = SchedulerRing(NODES)
    points = sorted((point(f"{n}#{i}"), n) for n in NODES for i in range(VIRTUAL_NODES))
    for key in KEYS[:500]:
        k = point(key)
        after = [p for p in points if p[0] >= k]
        assert ring.owner(key) == (after[0] if after else points[0])[1]


@pytest.mark.parametrize(
    ("text", "order"),
    [("a", [1, 2, 3]), ("c", [2, 1, 3]), ("3", [1, 3, 2]), ("4", [3, 2, 1])],
)
def test_the_vectors_of_the_protocol(text: str, order: list[int]) -> None:
    """protocol.md §14.9's test vectors: task id sha256(text) over three schedulers."""
    assert point("tcp://10.0.0.1:8002#0") == 0x4C1790FBA3AE11B9
    ring = SchedulerRing(NODES)
    assert ring.preference(hashlib.sha256(text.encode()).hexdigest()) == [f"tcp://10.0.0.{i}:8002" for i in order]


def test_order_of_the_list_and_duplicates_do_not_matter() -> None:
    a = SchedulerRing(NODES)
    b = SchedulerRing([*reversed(NODES), NODES[0]])
    assert a.nodes == b.nodes and len(b) == 3
    assert all(a.preference(k) == b.preference(k) for k in KEYS[:2000])


def test_preference_lists_every_node_once_owner_first() -> None:
    ring = SchedulerRing(NODES)
    for key in KEYS[:2000]:
        order = ring.preference(key)
        assert sorted(order) == sorted(NODES) and order[0] == ring.owner(key)


def test_removing_a_node_moves_only_its_keys_to_the_next_in_preference() -> None:
    full = SchedulerRing(NODES)
    for dead in NODES:
        rest = SchedulerRing(n for n in NODES if n != dead)
        moved = 0
        for key in KEYS:
            before, after = full.owner(key), rest.owner(key)
            if before != dead:
                assert after == before, "a key of a live scheduler moved"
            else:
                moved += 1
                # failover = the next live scheduler of the preference order = the smaller ring's owner
                assert after == full.preference(key)[1]
                assert full.choose(key, dead.__ne__) == after
        assert moved > 0


def test_adding_a_node_takes_keys_only_for_itself() -> None:
    small = SchedulerRing(NODES)
    big = SchedulerRing([*NODES, "tcp://10.0.0.4:8002"])
    for key in KEYS:
        if big.owner(key) != "tcp://10.0.0.4:8002":
            assert big.owner(key) == small.owner(key)


@pytest.mark.parametrize("count", [2, 3, 5, 8])
def test_keys_spread_evenly(count: int) -> None:
    nodes = [f"tcp://10.0.0.{i}:8002" for i in range(1, count + 1)]
    ring = SchedulerRing(nodes)
    load = Counter(ring.owner(k) for k in KEYS)
    fair = len(KEYS) / count
    assert set(load) == set(nodes)
    assert all(0.75 * fair <= n <= 1.25 * fair for n in load.values()), load
    # a dead node's keys spread over the others too, not onto one neighbour
    dead = nodes[0]
    heirs = Counter(ring.choose(k, lambda n: n != dead) for k in KEYS if ring.owner(k) == dead)
    if count > 2:
        assert len(heirs) == count - 1 and max(heirs.values()) < 0.75 * load[dead], heirs


def test_choose_none_when_nothing_is_up_and_bad_rings() -> None:
    ring = SchedulerRing(NODES)
    assert ring.choose(KEYS[0], lambda n: False) is None
    assert SchedulerRing(["ipc:///a"]).preference(KEYS[0]) == ["ipc:///a"]
    with pytest.raises(ValueError):
        SchedulerRing([])
    with pytest.raises(ValueError):
        SchedulerRing([""])
    with pytest.raises(ValueError):
        SchedulerRing(NODES, virtual_nodes=0)
