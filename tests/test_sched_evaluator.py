"""Scheduling intelligence in the sans-I/O core (issue 4): the multi-feature evaluator and each of its
feature scores, measured host load, bad-parent detection, jittered retries, slot caps in a flash crowd,
garbage collection and the cap of peers per task. Exact tests on a fake clock, and Hypothesis over random
event sequences for the DAG's invariants with all of it switched on."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest
from blake3 import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dfz.sched import (
    Action,
    AnnounceHost,
    AnnounceTask,
    BackToSource,
    Event,
    FailPeer,
    Host,
    HostHeartbeat,
    HostLeft,
    HostLoad,
    HostRemoved,
    HostType,
    InvalidEvent,
    MultiFeatureEvaluator,
    Peer,
    PeerFailed,
    PeerFinished,
    PeerLeft,
    PeerState,
    PieceCosts,
    PieceFailed,
    PieceFinished,
    PushParents,
    RandomEvaluator,
    RegisterPeer,
    RescheduleRequest,
    SchedulerConfig,
    SchedulerCore,
    SchedulerError,
    SimpleEvaluator,
    Task,
    TaskFull,
    TaskMetadataKnown,
    Tick,
    TriggerSeed,
    UnknownHost,
)
from dfz.sched.evaluator import (
    UNKNOWN,
    bandwidth_score,
    host_type_score,
    idc_score,
    in_flight_score,
    load_score,
    location_score,
    progress_score,
    reliability_score,
    slots_score,
    spare_seeds,
    useful_pieces,
)
from dfz.sched.model import network_keys

URL = "http://origin.example/file.bin"
PIECE = 4


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def piece_digest(task_id: str, piece: int) -> str:
    return blake3(f"{task_id}/{piece}".encode()).hexdigest()


def file_digest(task_id: str) -> str:
    return blake3(task_id.encode()).hexdigest()


def pushes(actions: Sequence[Action]) -> dict[str, list[str]]:
    return {a.peer_id: [c.peer_id for c in a.parents] for a in actions if isinstance(a, PushParents)}


class Harness:
    """A core with the default evaluator and a fake clock; the invariants are checked after every event."""

    def __init__(self, *, seed: int = 0, **config: Any) -> None:
        self.clock = FakeClock()
        self.core = SchedulerCore(SchedulerConfig(seed=seed, **config), clock=self.clock)

    def apply(self, event: Event) -> list[Action]:
        actions = self.core.apply(event)
        self.core.check_invariants()
        return actions

    def host(
        self, host_id: str, *, seed: bool = False, slots: int = 4, capacity: int = 0, idc: str = "", location: str = ""
    ) -> None:
        kind = HostType.SEED if seed else HostType.NORMAL
        self.apply(AnnounceHost(host_id, host_id, "10.0.0.1", 4000, kind, idc, location, capacity, slots))

    def register(self, peer_id: str, host: str, task: str = "t", **kw: Any) -> list[Action]:
        return self.apply(RegisterPeer(peer_id, task, host, URL, **kw))

    def tick(self, seconds: float) -> list[Action]:
        self.clock.now += seconds
        return self.apply(Tick())

    def source(self, peer_id: str, pieces: int, task: str = "t") -> None:
        """``peer_id`` (sent to the origin) learns the size and fetches ``pieces`` pieces."""
        self.apply(TaskMetadataKnown(peer_id, pieces * PIECE, PIECE))
        for k in range(pieces):
            self.apply(PieceFinished(peer_id, k, piece_digest(task, k), PIECE, 0.01, None))

    def got(self, peer_id: str, piece: int, parent: str, cost: float = 0.01, task: str = "t") -> list[Action]:
        return self.apply(PieceFinished(peer_id, piece, piece_digest(task, piece), PIECE, cost, parent))

    def peer(self, peer_id: str) -> Peer:
        return self.core.peers[peer_id]

    def parents(self, peer_id: str) -> list[str]:
        return [p.id for p in self.peer(peer_id).parents]


# --- records for the feature functions -------------------------------------------------------------------


def make_host(
    host_id: str = "h",
    *,
    seed: bool = False,
    slots: int = 4,
    capacity: int = 0,
    idc: str = "",
    location: str = "",
    uploads: int = 0,
    rate: int = 0,
    in_flight: int = 0,
    upload_peers: int = 0,
) -> Host:
    idc_key, location_key = network_keys(idc, location)
    return Host(
        id=host_id,
        hostname=host_id,
        ip="10.0.0.1",
        port=4000,
        type=HostType.SEED if seed else HostType.NORMAL,
        idc=idc,
        location=location,
        upload_capacity=capacity,
        upload_slots=slots,
        last_seen=0.0,
        uploads=uploads,
        upload_rate=rate,
        uploads_in_flight=in_flight,
        upload_peers=upload_peers,
        idc_key=idc_key,
        location_key=location_key,
    )


def make_task(piece_count: int | None = None) -> Task:
    task = Task(id="t", url=URL, tag="", application="", headers=(), created_at=0.0)
    if piece_count is not None:
        task.piece_length, task.content_length = PIECE, piece_count * PIECE
    return task


def make_peer(peer_id: str, host: Host, task: Task, *, pieces: Sequence[int] = (), state: PeerState = PeerState.RUNNING) -> Peer:
    peer = Peer(id=peer_id, task=task, host=host, back_to_source_allowed=True, created_at=0.0, updated_at=0.0, state=state)
    for k in pieces:
        peer.finished |= 1 << k
    peer.finished_count = peer.finished.bit_count()
    return peer


# --- the feature scores ------------------------------------------------------------------------------------


def test_bandwidth_is_announced_capacity_minus_measured_rate_over_the_best_candidates() -> None:
    assert make_host(capacity=1000, rate=250).free_bandwidth == 750
    assert make_host(capacity=1000, rate=5000).free_bandwidth == 0  # measured above what it announced
    assert make_host(capacity=0, rate=10).free_bandwidth is None  # nothing announced: unknown
    assert bandwidth_score(make_host(capacity=1000, rate=250), best_free=1500) == 0.5
    assert bandwidth_score(make_host(capacity=1000, rate=1000), best_free=1500) == 0.0
    assert bandwidth_score(make_host(capacity=0), best_free=1500) == UNKNOWN == 0.5
    assert bandwidth_score(make_host(capacity=10, rate=10), best_free=0) == 0.0


def test_the_bandwidth_share_is_the_free_bandwidth_capped_by_a_fair_share_among_children() -> None:
    assert make_host(capacity=1000).bandwidth_share == 1000  # idle: all of it for the first child
    assert make_host(capacity=1000, uploads=3).bandwidth_share == 250  # a fourth child gets a fourth
    assert make_host(capacity=1000, upload_peers=4).bandwidth_share == 200  # children of other schedulers too
    assert make_host(capacity=1000, rate=900, uploads=1).bandwidth_share == 100  # measured: only 100 free
    assert make_host(capacity=0, uploads=1).bandwidth_share is None
    # Before any rate is measured, a crowded seed scores below an idle peer of the same capacity.
    crowded, idle = make_host(capacity=1000, uploads=4), make_host(capacity=1000)
    assert bandwidth_score(crowded, best_free=1000) == 0.2 < bandwidth_score(idle, best_free=1000) == 1.0


def test_free_slots_count_the_busier_of_the_schedulers_edges_and_the_daemons_report() -> None:
    assert slots_score(make_host(slots=4)) == 1.0
    assert slots_score(make_host(slots=4, uploads=1)) == 0.75
    assert slots_score(make_host(slots=4, uploads=1, upload_peers=3)) == 0.25  # children of other schedulers
    assert slots_score(make_host(slots=4, upload_peers=9)) == 0.0
    assert slots_score(make_host(slots=0)) == 0.0


def test_requests_in_flight_lower_the_load_score() -> None:
    assert in_flight_score(make_host(slots=4)) == 1.0
    assert in_flight_score(make_host(slots=4, in_flight=4)) == 0.5
    assert in_flight_score(make_host(slots=4, in_flight=12)) == 0.25
    assert in_flight_score(make_host(slots=0, in_flight=1)) == 0.5


def test_the_load_score_weighs_bandwidth_slots_and_requests_in_flight() -> None:
    idle = make_host(slots=4, capacity=1000)
    assert load_score(idle, best_free=1000) == pytest.approx(1.0)
    busy = make_host(slots=4, capacity=1000, rate=500, uploads=2, in_flight=4)
    # bandwidth share: min(1000 - 500 free, 1000 // 3 fair) = 333
    assert load_score(busy, best_free=1000) == pytest.approx(0.5 * 0.333 + 0.3 * 0.5 + 0.2 * 0.5)


def test_idc_affinity_is_the_same_data_centre_case_insensitively() -> None:
    assert idc_score(make_host(idc="eu-1"), make_host(idc="EU-1")) == 1.0
    assert idc_score(make_host(idc="eu-1"), make_host(idc="eu-2")) == 0.0
    assert idc_score(make_host(idc=""), make_host(idc="")) == 0.0  # unknown is not an affinity


def test_location_affinity_is_the_longest_common_prefix_of_its_elements() -> None:
    def score(a: str, b: str) -> float:
        return location_score(make_host(location=a), make_host(location=b))

    assert score("eu|fr|paris", "eu|fr|paris") == 1.0
    assert score("eu|FR|paris", "EU|fr|lyon") == pytest.approx(2 / 5)
    assert score("eu|fr", "eu|de") == pytest.approx(1 / 5)
    assert score("eu|fr", "us|fr") == 0.0  # a prefix, not any shared element
    assert score("eu", "eu|fr|paris") == pytest.approx(1 / 5)
    assert score("", "eu") == 0.0
    assert score("a|b|c|d|e|f", "a|b|c|d|e|g") == 1.0  # five elements are compared at most


def test_a_seed_host_is_preferred_while_it_has_capacity() -> None:
    task = make_task()
    assert host_type_score(make_peer("n", make_host(), task)) == 0.5
    assert host_type_score(make_peer("s", make_host(seed=True, slots=8, uploads=7), task)) == 1.0
    assert host_type_score(make_peer("s", make_host(seed=True, slots=8, uploads=8), task)) == 0.0
    assert host_type_score(make_peer("s", make_host(seed=True, capacity=100, rate=100), task)) == 0.0
    assert host_type_score(make_peer("s", make_host(seed=True, capacity=100, rate=40), task)) == 1.0


def test_progress_counts_the_pieces_the_parent_has_and_the_child_lacks() -> None:
    task = make_task(piece_count=8)
    child = make_peer("c", make_host("c"), task, pieces=[0, 1])
    parent = make_peer("p", make_host("p"), task, pieces=[0, 1, 2, 3, 5])
    assert useful_pieces(parent, child) == 3
    assert progress_score(parent, child, best_useful=0) == pytest.approx(3 / 6)  # of the 6 the child lacks
    done = make_peer("d", make_host("d"), task, pieces=range(8), state=PeerState.SUCCEEDED)
    assert progress_score(done, child, best_useful=0) == 1.0
    unknown = make_task()  # size unknown: relative to the best candidate
    child, parent = make_peer("c", make_host("c"), unknown, pieces=[0]), make_peer("p", make_host("p"), unknown, pieces=[0, 1, 2])
    assert progress_score(parent, child, best_useful=4) == 0.5
    assert progress_score(parent, child, best_useful=0) == 0.0


def test_reliability_is_upload_success_and_piece_costs() -> None:
    task = make_task()
    fresh = make_peer("f", make_host("f"), task)
    assert fresh.upload_success_rate is None
    assert reliability_score(fresh, best_mean_cost=10.0) == 1.0  # untried: it gets its chance
    flaky = make_peer("x", make_host("x"), task)
    flaky.uploaded, flaky.upload_failures = 3, 1
    assert flaky.upload_success_rate == 0.75
    assert reliability_score(flaky, best_mean_cost=None) == pytest.approx(0.5 * 0.75 + 0.5)
    slow = make_peer("s", make_host("s"), task)
    slow.costs = PieceCosts(30)
    for cost in (99, 99, 99):
        slow.costs.add(cost)
    assert reliability_score(slow, best_mean_cost=9.0) == pytest.approx(0.5 + 0.5 * 10 / 100)


# --- the evaluator through the core ------------------------------------------------------------------------


def swarm_with_candidates(**config: Any) -> Harness:
    """A seed-less swarm: p0 on host o goes to the origin and has all three pieces; x and y are idle hosts
    whose peers px and py download from p0. Tests change one feature of x or y and see who a new peer on
    c gets first."""
    h = Harness(**config)
    h.host("o", slots=3)
    h.host("x", capacity=1000)
    h.host("y", capacity=1000)
    h.host("c")
    h.register("p0", "o")
    h.source("p0", 3)
    h.register("px", "x")
    h.peer("px").task.hungry.clear()  # px and py keep p0 alone (no top-up): these tests
    h.host("x", slots=0, capacity=1000)  # are about a new peer's first choice. x has no slot for a moment,
    h.register("py", "y")  # so that py does not take px as a parent
    h.peer("py").task.hungry.clear()
    h.host("x", capacity=1000)
    assert h.parents("px") == h.parents("py") == ["p0"]
    return h


def first_parent_of_new_peer(h: Harness) -> list[str]:
    return pushes(h.register("pc", "c"))["pc"]


def test_with_equal_features_the_peer_id_breaks_the_tie() -> None:
    h = swarm_with_candidates()
    assert first_parent_of_new_peer(h)[:2] == ["px", "py"]


def test_measured_upload_rate_steers_children_to_the_host_with_free_bandwidth() -> None:
    h = swarm_with_candidates()
    h.apply(HostLoad("x", upload_rate=900, uploads_in_flight=0, upload_peers=0))
    assert h.core.hosts["x"].upload_rate == 900
    order = first_parent_of_new_peer(h)
    assert order[0] == "py" and order.index("px") > 0


def test_what_the_evaluator_keeps_of_a_host_is_dropped_whenever_the_host_changes() -> None:
    """The evaluator keeps each host's own part of the score between decisions (``Host.scored_*``); the
    core drops it on a load report, a new edge and a new announcement, and a new evaluator (new weights)
    does not use another's. ``check_invariants`` (after every event here) compares what is kept with a
    fresh computation."""
    h = swarm_with_candidates()
    evaluator = h.core.evaluator
    assert isinstance(evaluator, MultiFeatureEvaluator)
    child = h.peer("px")
    candidates = [h.peer("p0"), h.peer("py")]

    def fresh() -> None:
        assert dict(zip([p.id for p in candidates], evaluator._scores(child, candidates), strict=True)) == pytest.approx(
            evaluator.scores(child, candidates), abs=1e-12
        )

    fresh()
    y = h.core.hosts["y"]
    assert y.scored_by is evaluator
    h.apply(HostLoad("y", upload_rate=900, uploads_in_flight=8, upload_peers=2))
    assert y.scored_by is None
    fresh()
    h.host("y", capacity=5000, slots=2)
    assert y.scored_by is None
    fresh()
    h.register("pc", "c")  # links parents on o, x or y: their hosts' uploads change
    assert all(p.host.scored_by is None for p in h.peer("pc").parents)
    fresh()
    other = MultiFeatureEvaluator(SchedulerConfig(load_weight=0.1, host_type_weight=0.9))
    assert dict(zip([p.id for p in candidates], other._scores(child, candidates), strict=True)) == pytest.approx(
        other.scores(child, candidates), abs=1e-12
    )
    assert y.scored_by is other


def test_requests_in_flight_steer_children_away() -> None:
    h = swarm_with_candidates()
    h.apply(HostLoad("x", upload_rate=0, uploads_in_flight=8, upload_peers=0))
    assert first_parent_of_new_peer(h)[:2] == ["py", "px"]


def test_same_idc_comes_first() -> None:
    h = swarm_with_candidates()
    h.host("y", capacity=1000, idc="dc-2")
    h.host("c", idc="DC-2")
    assert first_parent_of_new_peer(h)[0] == "py"


def test_a_longer_common_location_prefix_comes_first() -> None:
    h = swarm_with_candidates()
    h.host("x", capacity=1000, location="eu|fr|lyon")
    h.host("y", capacity=1000, location="eu|fr|paris|r1")
    h.host("c", location="eu|fr|paris|r2")
    assert first_parent_of_new_peer(h)[0] == "py"


def test_a_seed_host_comes_first_at_equal_load() -> None:
    h = swarm_with_candidates()
    h.host("y", seed=True, capacity=1000)
    assert first_parent_of_new_peer(h)[0] == "py"


def test_progress_and_reliability_count_when_weighted() -> None:
    h = swarm_with_candidates(load_weight=0.0, host_type_weight=0.0, progress_weight=1.0)
    h.got("py", 0, "p0")
    h.got("py", 1, "p0")
    h.apply(PieceFailed("px", 0, "p0"))  # px blocks p0; py is below px: px waits, with nothing
    assert first_parent_of_new_peer(h) == ["p0", "py", "px"]  # 3 of 3 pieces, 2 of 3, none
    h = swarm_with_candidates(load_weight=0.0, host_type_weight=0.0, reliability_weight=1.0)
    h.register("pz", "c")
    h.got("pz", 0, "px", cost=0.5)  # px served slowly, py quickly
    h.got("pz", 1, "py", cost=0.01)
    h.host("d")
    assert pushes(h.register("pd", "d"))["pd"] == ["py", "pz", "px"]  # (p0 has no slot left) untried pz scores 1


def test_the_weights_come_from_the_config() -> None:
    config = SchedulerConfig(load_weight=0.0, idc_weight=1.0, location_weight=0.0, host_type_weight=0.0)
    evaluator = MultiFeatureEvaluator(config)
    assert (evaluator.load_weight, evaluator.idc_weight, evaluator.progress_weight) == (0.0, 1.0, 0.0)
    default = MultiFeatureEvaluator()
    assert (default.load_weight, default.idc_weight, default.location_weight, default.host_type_weight) == (0.6, 0.2, 0.1, 0.1)
    assert isinstance(SchedulerCore().evaluator, MultiFeatureEvaluator)
    assert isinstance(SchedulerCore(SchedulerConfig(evaluator="simple")).evaluator, SimpleEvaluator)
    chosen = SchedulerCore(SchedulerConfig(evaluator="random", seed=9)).evaluator
    assert isinstance(chosen, RandomEvaluator)
    with pytest.raises(ValueError, match="evaluator must be one of multi_feature, simple, random"):
        SchedulerConfig(evaluator="best")


@settings(max_examples=150, deadline=None)
@given(data=st.data(), weights=st.lists(st.sampled_from([0.0, 0.1, 0.35, 1.0]), min_size=6, max_size=6), known=st.booleans())
def test_the_fast_ranking_follows_the_feature_functions(data: st.DataObject, weights: list[float], known: bool) -> None:
    """``choose_parents`` ranks by the inlined arithmetic; ``scores`` by the feature functions: the same."""
    if not any(weights):
        weights[0] = 1.0
    load, idc, location, host_type, progress, reliability = weights
    config = SchedulerConfig(
        load_weight=load,
        idc_weight=idc,
        location_weight=location,
        host_type_weight=host_type,
        progress_weight=progress,
        reliability_weight=reliability,
    )
    evaluator = MultiFeatureEvaluator(config)
    task = make_task(piece_count=8 if known else None)
    places = st.sampled_from(["", "eu", "eu|fr", "eu|fr|paris", "EU|fr|lyon", "us|ca"])

    def host(name: str) -> Host:
        return make_host(
            name,
            seed=data.draw(st.booleans()),
            slots=data.draw(st.integers(0, 6)),
            capacity=data.draw(st.sampled_from([0, 100, 1000])),
            rate=data.draw(st.integers(0, 1500)),
            uploads=data.draw(st.integers(0, 6)),
            in_flight=data.draw(st.integers(0, 30)),
            upload_peers=data.draw(st.integers(0, 6)),
            idc=data.draw(st.sampled_from(["", "a", "A", "b"])),
            location=data.draw(places),
        )

    child = make_peer("child", host("hc"), task, pieces=data.draw(st.lists(st.integers(0, 7), max_size=8)))
    candidates = []
    for i in range(data.draw(st.integers(1, 6))):
        peer = make_peer(f"p{i}", host(f"h{i}"), task, pieces=data.draw(st.lists(st.integers(0, 7), max_size=8)))
        peer.uploaded, peer.upload_failures = data.draw(st.integers(0, 5)), data.draw(st.integers(0, 5))
        if data.draw(st.booleans()):
            peer.costs = PieceCosts(5)
            for cost in data.draw(st.lists(st.integers(0, 500), min_size=1, max_size=8)):
                peer.costs.add(cost)
        candidates.append(peer)
    expected = evaluator.scores(child, candidates)
    fast = {peer.id: -neg for neg, _, peer in evaluator._ranked(child, candidates)}
    assert fast == pytest.approx(expected, abs=1e-9)
    # The choice is among the candidates left after spare_seeds, scored among themselves (the normalisers
    # are the best values among the candidates).
    spared = spare_seeds(candidates, config.seed_fanout)
    among = evaluator.scores(child, spared)
    best = sorted(spared, key=lambda p: (-among[p.id], p.id))
    chosen = evaluator.choose_parents(child, candidates, 3)
    assert [among[p.id] for p in chosen] == pytest.approx([among[p.id] for p in best[:3]], abs=1e-9)


def test_the_random_evaluator_is_a_seeded_subset() -> None:
    task = make_task()
    child = make_peer("c", make_host("c"), task)
    candidates = [make_peer(f"p{i}", make_host(f"h{i}"), task) for i in range(10)]
    first = [[p.id for p in RandomEvaluator(seed=7).choose_parents(child, candidates, 4)] for _ in range(2)]
    assert first[0] == first[1] and len(set(first[0])) == 4
    assert {p.id for p in RandomEvaluator(seed=7).choose_parents(child, candidates[:2], 4)} == {"p0", "p1"}
    draws = RandomEvaluator(seed=7)
    assert len({tuple(p.id for p in draws.choose_parents(child, candidates, 4)) for _ in range(5)}) > 1


def test_the_candidates_are_a_sample_of_the_open_peers() -> None:
    h = Harness(candidate_parent_sample=5, candidate_parent_limit=2)
    h.host("o", slots=100)
    h.register("p0", "o")
    h.source("p0", 1)
    for i in range(1, 30):
        h.host(f"h{i}")
        h.register(f"p{i}", f"h{i}")
    task = h.core.tasks["t"]
    assert len(task.open) > 5  # most peers can take a child
    h.host("late")
    h.register("pl", "late")
    late = h.peer("pl")
    sampled = h.core._candidates(late)
    assert len(sampled) == 5 and len({p.id for p in sampled}) == 5
    # The same seed makes the same decisions.
    again = Harness(candidate_parent_sample=5, candidate_parent_limit=2)
    again.host("o", slots=100)
    again.register("p0", "o")
    again.source("p0", 1)
    for i in range(1, 30):
        again.host(f"h{i}")
        again.register(f"p{i}", f"h{i}")
    again.host("late")
    assert pushes(again.register("pl", "late"))["pl"] == h.parents("pl")


# --- measured load ------------------------------------------------------------------------------------------


def test_a_load_report_updates_the_host_and_counts_as_a_heartbeat() -> None:
    h = Harness(host_timeout=10.0)
    h.host("a")
    h.clock.now += 8
    assert h.apply(HostLoad("a", upload_rate=12_500_000, uploads_in_flight=7, upload_peers=3)) == []
    host = h.core.hosts["a"]
    assert (host.upload_rate, host.uploads_in_flight, host.upload_peers, host.last_seen) == (12_500_000, 7, 3, 1008.0)
    assert h.tick(5.0) == []  # not silent: the report was 5 s ago
    with pytest.raises(UnknownHost):
        h.core.apply(HostLoad("nobody", 0, 0, 0))
    with pytest.raises(InvalidEvent, match="cannot be negative"):
        h.core.apply(HostLoad("a", -1, 0, 0))
    assert h.core.hosts["a"].upload_rate == 12_500_000


# --- bad parents -------------------------------------------------------------------------------------------


def test_piece_costs_keep_a_bounded_window_with_exact_statistics() -> None:
    costs = PieceCosts(window=4)
    assert costs.samples == 0 and costs.mean() is None and costs.earlier_mean() is None
    for cost in (10, 20, 30, 40, 50, 60):
        costs.add(cost)
    assert (costs.count, costs.samples, costs.last) == (6, 4, 60)
    assert costs.earlier_mean() == 40.0  # 30, 40, 50
    assert costs.earlier_stdev() == pytest.approx((200 / 3) ** 0.5)
    assert costs.mean() == 45.0
    assert costs.window_full


def test_the_latest_cost_far_outside_the_others_marks_an_outlier() -> None:
    few = PieceCosts(window=30)
    few.add(100)
    assert not few.latest_is_outlier(20, 3, 0)  # one cost: nothing to compare with
    few.add(2001)
    assert few.latest_is_outlier(20, 3, 0)  # > 20x the mean while the window fills
    few.add(100)
    assert not few.latest_is_outlier(20, 3, 0)
    tiny = PieceCosts(window=30)
    tiny.add(1)
    tiny.add(40)  # 40x, but 39 ms above the mean: noise under the floor
    assert not tiny.latest_is_outlier(20, 3, 100)
    full = PieceCosts(window=5)
    for cost in (100, 110, 90, 100):
        full.add(cost)
    full.add(130)  # mean 100, sigma ~7.1: 3 sigma is 121
    assert full.window_full and full.latest_is_outlier(20, 3, 0)
    full.add(110)
    assert not full.latest_is_outlier(20, 3, 0)


def test_a_bad_parent_is_not_chosen_until_its_time_is_over_or_a_normal_cost_clears_it() -> None:
    h = swarm_with_candidates(bad_parent_timeout=30.0, bad_parent_cost_floor=0.05, candidate_parent_limit=8)
    h.register("pz", "c")
    h.got("pz", 0, "px", cost=0.01)
    h.got("pz", 1, "px", cost=2.0)  # 200x the mean
    costs = h.peer("px").costs
    assert costs is not None and costs.bad_until == 1030.0
    h.host("d")
    assert "px" not in pushes(h.register("pd", "d"))["pd"]
    h.clock.now += 31
    h.host("e")
    assert "px" in pushes(h.register("pe", "e"))["pe"]
    h = swarm_with_candidates(bad_parent_cost_floor=0.05, candidate_parent_limit=8)
    h.register("pz", "c")
    h.got("pz", 0, "px", cost=0.01)
    h.got("pz", 1, "px", cost=2.0)
    h.got("pz", 2, "px", cost=0.02)  # normal again
    costs = h.peer("px").costs
    assert costs is not None and costs.bad_until == 0.0
    h.host("d")
    assert "px" in pushes(h.register("pd", "d"))["pd"]


def test_a_failed_piece_blocks_that_parent_for_the_child_and_counts_against_its_success_rate() -> None:
    h = swarm_with_candidates()
    h.register("pz", "c")
    assert "px" in h.parents("pz")
    h.got("pz", 0, "px")
    actions = h.apply(PieceFailed("pz", 1, "px", "timeout"))
    assert "px" not in pushes(actions)["pz"] and "px" not in h.parents("pz")
    assert h.peer("px").upload_success_rate == 0.5
    assert "px" not in pushes(h.apply(RescheduleRequest("pz")))["pz"]  # blocked for good, for this task


# --- retries with jitter, back to source ---------------------------------------------------------------------


def unschedulable(config: dict[str, Any], seed: int = 0, peers: int = 5) -> Harness:
    """p0 on a host without upload slots is the only source; the peers on b* (no slots either) find no
    parent."""
    h = Harness(seed=seed, **config)
    h.host("a", slots=0)
    h.register("p0", "a")
    for i in range(peers):
        h.host(f"b{i}", slots=0)
        h.register(f"q{i}", f"b{i}")
    return h


def test_retries_are_spread_by_a_seeded_jitter() -> None:
    h = unschedulable({"retry_interval": 2.0, "retry_jitter": 0.25})
    times = [h.peer(f"q{i}").retry_at - 1000.0 for i in range(5)]
    assert all(1.5 <= t < 2.5 for t in times) and len(set(times)) == 5
    assert [unschedulable({"retry_interval": 2.0, "retry_jitter": 0.25}).peer(f"q{i}").retry_at for i in range(5)] == [
        1000.0 + t for t in times
    ]
    other = unschedulable({"retry_interval": 2.0, "retry_jitter": 0.25}, seed=1)
    assert [other.peer(f"q{i}").retry_at for i in range(5)] != [1000.0 + t for t in times]
    exact = unschedulable({"retry_interval": 2.0, "retry_jitter": 0.0})
    assert {exact.peer(f"q{i}").retry_at for i in range(5)} == {1002.0}


def test_after_the_retry_limit_peers_go_to_the_origin_up_to_the_cap_and_the_others_fail_saying_why() -> None:
    h = unschedulable({"retry_limit": 3, "retry_interval": 1.0, "retry_jitter": 0.3, "back_to_source_limit": 2}, peers=4)
    h.apply(RegisterPeer("q9", "t", "b0", URL, back_to_source_allowed=False))
    sent: list[str] = []
    failed: dict[str, str] = {}
    for _ in range(10):
        for action in h.tick(0.5):
            if isinstance(action, BackToSource):
                sent.append(action.peer_id)
            elif isinstance(action, FailPeer):
                failed[action.peer_id] = action.reason
    assert len(sent) == 1  # p0 is at the origin already: one more fits under back_to_source_limit
    assert set(sent) | set(failed) == {"q0", "q1", "q2", "q3", "q9"} and not set(sent) & set(failed)
    assert "back-to-source is disabled" in failed["q9"]
    assert all("back_to_source_limit" in why for peer, why in failed.items() if peer != "q9")
    assert all("after 3 attempts" in why for why in failed.values())


# --- slot caps in a flash crowd ------------------------------------------------------------------------------


def depths(peers: Sequence[Peer]) -> dict[Peer, int]:
    """Each peer's longest path up to a root, in edges."""
    memo: dict[Peer, int] = {}

    def depth(peer: Peer) -> int:
        if peer not in memo:
            memo[peer] = 0 if not peer.parents else 1 + max(depth(p) for p in peer.parents)
        return memo[peer]

    return {peer: depth(peer) for peer in peers}


def test_a_flash_crowd_never_overloads_the_seed_and_children_of_children_serve() -> None:
    h = Harness(candidate_parent_limit=2)
    h.host("seed", seed=True, slots=4, capacity=10_000)
    crowd = 80
    for i in range(crowd):
        h.host(f"h{i}", slots=2, capacity=1000)
    assert isinstance(h.register("p0", "h0")[0], TriggerSeed)
    h.register("s", "seed")
    for i in range(1, crowd):
        h.register(f"p{i}", f"h{i}")
    seed_host = h.core.hosts["seed"]
    assert seed_host.uploads == 4 == len(h.peer("s").children)
    for host in h.core.hosts.values():
        assert host.uploads <= host.upload_slots
    scheduled = [p for p in h.core.peers.values() if p.parents]
    assert len(scheduled) == crowd  # everybody has a parent at once: the tree grew below the seed
    assert max(depths(scheduled).values()) >= 3


# --- garbage collection and caps ------------------------------------------------------------------------------


def test_failed_and_idle_succeeded_peers_are_forgotten_after_their_ttl() -> None:
    h = Harness(failed_peer_ttl=60.0, peer_ttl=600.0, host_timeout=10_000.0)
    for name in "abcd":
        h.host(name)
    h.register("p1", "a")
    h.source("p1", 2)
    h.apply(PeerFinished("p1", file_digest("t"), 2 * PIECE))
    h.register("p2", "b")
    h.register("p3", "c")
    h.apply(PeerFailed("p3", "disk full"))
    assert h.tick(59.0) == [] and "p3" in h.core.peers
    h.tick(1.0)
    assert "p3" not in h.core.peers
    # p1 serves p2: not idle while it does.
    h.tick(700.0)
    assert "p1" in h.core.peers and h.parents("p2") == ["p1"]
    h.got("p2", 0, "p1")
    h.got("p2", 1, "p1")
    h.apply(PeerFinished("p2", file_digest("t"), 2 * PIECE))  # p1's last child left at 1760
    h.tick(599.0)
    assert {"p1", "p2"} <= set(h.core.peers)
    h.tick(1.0)
    assert not h.core.peers and not h.core.tasks  # both idle for 600 s


def test_a_task_without_peers_is_kept_for_its_ttl_with_what_it_knows() -> None:
    h = Harness(task_ttl=120.0, host_timeout=10_000.0)
    h.host("a")
    h.host("b")
    h.register("p1", "a")
    h.source("p1", 2)
    h.apply(PeerLeft("p1"))
    task = h.core.tasks["t"]
    assert task.emptied_at == 1000.0 and task.digests
    h.tick(60.0)
    actions = h.register("p2", "b")  # the task's facts come with the assignment
    assert any(isinstance(a, BackToSource) for a in actions)
    assert h.core.tasks["t"] is task and task.emptied_at is None
    h.apply(PeerLeft("p2"))
    h.tick(119.0)
    assert "t" in h.core.tasks
    h.tick(1.0)
    assert "t" not in h.core.tasks
    assert Harness().core.config.task_ttl == 0.0  # the default: forgotten at once


def test_a_removed_host_takes_its_peers_and_their_children_get_new_parents_at_once() -> None:
    h = Harness(host_timeout=10.0, candidate_parent_limit=1)
    h.host("a", slots=1)
    for name in "bcd":
        h.host(name)
    h.register("p1", "a")
    h.register("p2", "b")
    h.register("p3", "c")  # a is full: p3 downloads from p2
    h.register("p4", "d")
    orphans = [p.id for p in h.peer("p2").children]
    assert "p3" in orphans
    h.clock.now += 6
    for name in "acd":
        h.apply(HostHeartbeat(name))
    actions = h.tick(5.0)
    assert HostRemoved("b", "no heartbeat for 10 s") in actions
    assert "p2" not in h.core.peers
    for orphan in orphans:
        assert orphan in pushes(actions) and "p2" not in h.parents(orphan)


def test_the_peer_cap_evicts_failed_peers_then_idle_finished_leaves_and_keeps_a_source() -> None:
    h = Harness(max_peers_per_task=4)
    for name in "abcdefg":
        h.host(name)
    h.register("p1", "a")
    h.source("p1", 1)
    h.register("p2", "b")
    h.got("p2", 0, "p1")
    h.apply(PeerFinished("p2", file_digest("t"), PIECE))
    h.apply(PeerFinished("p1", file_digest("t"), PIECE))
    h.register("p3", "c")
    h.apply(PeerFailed("p3", "disk full"))
    h.clock.now += 1
    h.register("p4", "d")  # 4 peers: p1, p2 succeeded; p3 failed; p4 downloading from them
    h.register("p5", "e")
    assert "p3" not in h.core.peers  # failed first
    assert set(h.core.tasks["t"].peers) == {"p1", "p2", "p4", "p5"}
    h.got("p4", 0, next(iter(h.parents("p4"))))
    h.apply(PeerFinished("p4", file_digest("t"), PIECE))
    h.got("p5", 0, next(iter(h.parents("p5"))))
    h.apply(PeerFinished("p5", file_digest("t"), PIECE))
    h.register("p6", "f")  # the longest idle succeeded leaf goes: p1 or p2 finished first
    assert len(h.core.tasks["t"].peers) == 4 and "p6" in h.core.peers
    assert {"p1", "p2"} - set(h.core.peers)


def test_a_full_task_of_busy_peers_refuses_a_registration_with_the_reason() -> None:
    h = Harness(max_peers_per_task=3)
    for name in "abcd":
        h.host(name)
    h.register("p1", "a")
    h.register("p2", "b")
    h.register("p3", "c")
    with pytest.raises(TaskFull, match="max_peers_per_task"):
        h.core.apply(RegisterPeer("p4", "t", "d", URL))
    assert "p4" not in h.core.peers
    h.core.check_invariants()
    with pytest.raises(TaskFull):
        h.core.apply(AnnounceTask("p4", "t", "d", URL, "", "", PIECE, PIECE, file_digest("t"), ((0, piece_digest("t", 0)),)))


# --- config --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"load_weight": -0.1}, "load_weight must be 0 or more"),
        (dict.fromkeys(("load_weight", "idc_weight", "location_weight", "host_type_weight"), 0.0), "at least one must be"),
        ({"candidate_parent_sample": 3}, "candidate_parent_sample must be at least candidate_parent_limit"),
        ({"retry_jitter": 1.0}, "retry_jitter must be from 0 to below 1"),
        ({"bad_parent_window": 2}, "bad_parent_window must be at least 3"),
        ({"bad_parent_ratio": 1.0}, "bad_parent_ratio must be more than 1"),
        ({"bad_parent_sigmas": 0.0}, "bad_parent_sigmas must be positive"),
        ({"task_ttl": -1.0}, "task_ttl must be a number of seconds, 0 or more"),
        ({"peer_ttl": 0.0}, "peer_ttl must be a positive number of seconds"),
        ({"max_peers_per_task": 1}, "max_peers_per_task must be at least 2"),
        ({"load_weight": float("nan")}, "load_weight must be a finite number"),
        ({"candidate_parent_sample": 4.5}, "candidate_parent_sample must be an integer"),
    ],
)
def test_the_config_refuses_nonsense_with_the_key_in_the_message(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**values)


# --- Hypothesis: the invariants with every feature of issue 4 switched on --------------------------------------

TASKS = {"ta": 3 * PIECE, "tb": 2 * PIECE}


class FeatureEvents(RuleBasedStateMachine):
    """Random hosts (some seeds, 0-3 slots, load reports), peers, piece reports with wildly varying costs
    (bad parents come and go), failures, reschedules, GC with short TTLs, a small peer cap and a candidate
    sample smaller than the swarm. After every step: no cycle, no parent on its child's host, no host with
    more children than slots, and every other rule of ``check_invariants``."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        config = SchedulerConfig(
            candidate_parent_limit=2,
            candidate_parent_sample=3,
            retry_limit=3,
            back_to_source_limit=2,
            seed_trigger_timeout=2.0,
            host_timeout=6.0,
            failed_peer_ttl=3.0,
            peer_ttl=5.0,
            task_ttl=2.0,
            max_peers_per_task=6,
            bad_parent_window=4,
            bad_parent_cost_floor=0.0,
            bad_parent_timeout=2.0,
            progress_weight=0.2,
            reliability_weight=0.2,
            seed=3,
        )
        self.core = SchedulerCore(config, clock=self.clock)
        self.serial = 0
        self.triggers: list[TriggerSeed] = []

    def apply(self, event: Event) -> None:
        try:
            actions = self.core.apply(event)
        except SchedulerError:
            return
        for action in actions:
            if isinstance(action, TriggerSeed):
                self.triggers.append(action)

    def pick(self, data: st.DataObject, states: frozenset[PeerState] | None = None) -> str:
        ids = sorted(p.id for p in self.core.peers.values() if states is None or p.state in states)
        return data.draw(st.sampled_from(ids)) if ids else "nobody"

    @initialize(slots=st.lists(st.integers(0, 3), min_size=5, max_size=5))
    def hosts(self, slots: list[int]) -> None:
        for n, k in enumerate(slots):
            self.announce(n, n == 0, k, n % 2)

    @rule(n=st.integers(0, 5), seed=st.booleans(), slots=st.integers(0, 3), idc=st.integers(0, 1))
    def announce(self, n: int, seed: bool, slots: int, idc: int) -> None:
        kind = HostType.SEED if seed else HostType.NORMAL
        self.apply(AnnounceHost(f"h{n}", f"h{n}", "10.0.0.1", 4000, kind, f"dc{idc}", f"eu|z{n % 3}", 1000, slots))

    @rule(n=st.integers(0, 5), rate=st.integers(0, 2000), in_flight=st.integers(0, 9), peers=st.integers(0, 4))
    def load(self, n: int, rate: int, in_flight: int, peers: int) -> None:
        self.apply(HostLoad(f"h{n}", rate, in_flight, peers))

    @rule(data=st.data(), task=st.sampled_from(sorted(TASKS)), allowed=st.sampled_from([True, True, False]))
    def register(self, data: st.DataObject, task: str, allowed: bool) -> None:
        host = data.draw(st.sampled_from(sorted(self.core.hosts) or ["nowhere"]))
        self.serial += 1
        self.apply(RegisterPeer(f"p{self.serial}", task, host, URL, back_to_source_allowed=allowed))

    @precondition(lambda self: bool(self.triggers))
    @rule(data=st.data())
    def seed_answers(self, data: st.DataObject) -> None:
        trigger = self.triggers.pop(data.draw(st.integers(0, len(self.triggers) - 1)))
        self.serial += 1
        self.apply(RegisterPeer(f"s{self.serial}", trigger.task_id, trigger.host_id, trigger.url))

    @precondition(lambda self: bool(self.core.peers))
    @rule(data=st.data(), cost=st.sampled_from([0.001, 0.01, 0.02, 0.5, 3.0]))
    def piece(self, data: st.DataObject, cost: float) -> None:
        peer = self.core.peers.get(self.pick(data, frozenset({PeerState.RUNNING, PeerState.BACK_TO_SOURCE})))
        if peer is None:
            return
        task = peer.task.id
        if peer.state is PeerState.BACK_TO_SOURCE:
            if peer.task.piece_length is None:
                self.apply(TaskMetadataKnown(peer.id, TASKS[task], PIECE))
            k = data.draw(st.integers(0, TASKS[task] // PIECE - 1))
            self.apply(PieceFinished(peer.id, k, piece_digest(task, k), PIECE, cost, None))
            return
        parent = data.draw(st.sampled_from([p.id for p in peer.parents] + ["gone"]))
        known = sorted(peer.task.digests)
        if known:
            k = data.draw(st.sampled_from(known))
            self.apply(PieceFinished(peer.id, k, piece_digest(task, k), PIECE, cost, parent))

    @precondition(lambda self: bool(self.core.peers))
    @rule(data=st.data())
    def piece_failed(self, data: st.DataObject) -> None:
        peer = self.core.peers.get(self.pick(data, frozenset({PeerState.RUNNING})))
        if peer is not None and peer.parents:
            self.apply(PieceFailed(peer.id, 0, data.draw(st.sampled_from([p.id for p in peer.parents])), "timeout"))

    @precondition(lambda self: bool(self.core.peers))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        peer = self.core.peers.get(self.pick(data, frozenset({PeerState.RUNNING, PeerState.BACK_TO_SOURCE})))
        if peer is None:
            return
        task = peer.task.id
        if peer.state is PeerState.BACK_TO_SOURCE and peer.task.piece_length is None:
            self.apply(TaskMetadataKnown(peer.id, TASKS[task], PIECE))
        for k in range(TASKS[task] // PIECE):
            parent = next(iter(peer.parents), None)
            if peer.state is not PeerState.BACK_TO_SOURCE and parent is None:
                break
            self.apply(PieceFinished(peer.id, k, piece_digest(task, k), PIECE, 0.01, parent.id if parent else None))
        self.apply(PeerFinished(peer.id, file_digest(task), TASKS[task]))

    @precondition(lambda self: bool(self.core.peers))
    @rule(data=st.data(), leave=st.booleans())
    def fail_or_leave(self, data: st.DataObject, leave: bool) -> None:
        peer_id = self.pick(data)
        self.apply(PeerLeft(peer_id) if leave else PeerFailed(peer_id, "boom"))

    @precondition(lambda self: bool(self.core.peers))
    @rule(data=st.data())
    def reschedule(self, data: st.DataObject) -> None:
        self.apply(RescheduleRequest(self.pick(data, frozenset({PeerState.PENDING, PeerState.RUNNING}))))

    @rule(n=st.integers(0, 5), leaves=st.sampled_from([False, False, False, True]))
    def host_heartbeat_or_leave(self, n: int, leaves: bool) -> None:
        self.apply(HostLeft(f"h{n}") if leaves else HostHeartbeat(f"h{n}"))

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 2.5]))
    def tick(self, seconds: float) -> None:
        self.clock.now += seconds
        self.apply(Tick())

    @invariant()
    def dag_rules_hold(self) -> None:
        for task in self.core.tasks.values():
            # Cycle-free: a topological order exists.
            order = {p: len(p.parents) for p in task.peers.values()}
            ready = [p for p, n in order.items() if n == 0]
            seen = 0
            while ready:
                node = ready.pop()
                seen += 1
                for child in node.children:
                    order[child] -= 1
                    if order[child] == 0:
                        ready.append(child)
            assert seen == len(order), f"task {task.id}: a cycle"
            for peer in task.peers.values():
                assert all(parent.host is not peer.host for parent in peer.parents), f"{peer.id}: parent on its host"
        for host in self.core.hosts.values():
            children = sum(len(p.children) for p in host.peers.values())
            assert children <= host.upload_slots, f"host {host.id}: {children} children > {host.upload_slots} slots"
        self.core.check_invariants()


TestFeatureEvents = FeatureEvents.TestCase
TestFeatureEvents.settings = settings(
    max_examples=120, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_a_seeded_random_simulation_is_reproducible() -> None:
    def run(seed: int) -> list[tuple[str, tuple[str, ...]]]:
        clock = FakeClock()
        core = SchedulerCore(SchedulerConfig(candidate_parent_sample=4, retry_jitter=0.3, seed=seed), clock=clock)
        rng = random.Random(5)
        for i in range(30):
            core.apply(AnnounceHost(f"h{i}", f"h{i}", "10.0.0.1", 4000, upload_slots=rng.randint(0, 3), upload_capacity=1000))
        out: list[tuple[str, tuple[str, ...]]] = []
        for i in range(60):
            clock.now += rng.random()
            for action in core.apply(RegisterPeer(f"p{i}", "t", f"h{rng.randrange(30)}", URL)) + core.apply(Tick()):
                if isinstance(action, PushParents):
                    out.append((action.peer_id, tuple(c.peer_id for c in action.parents)))
        core.check_invariants()
        return out

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_a_seed_that_feeds_its_share_is_spared_while_others_can_serve() -> None:
    task = make_task(piece_count=8)
    child = make_peer("child", make_host("hc"), task)
    seed = make_peer("seed", make_host("hs", seed=True, slots=32, capacity=100, uploads=2), task, pieces=range(8))
    peers = [make_peer(f"p{i}", make_host(f"h{i}", slots=32, capacity=50), task) for i in range(3)]
    evaluator = MultiFeatureEvaluator(SchedulerConfig())
    # Capacity 100 against the others' best 50: a share of 2 children, and it has 2: left out.
    assert seed not in evaluator.choose_parents(child, [seed, *peers], 4)
    assert spare_seeds([seed, *peers], 1.0) == peers
    # Alone, it is chosen all the same: somebody has to serve.
    assert evaluator.choose_parents(child, [seed], 4) == [seed]
    # With a child less it has room; a larger fanout widens its share; 0 switches the rule off.
    seed.host.uploads = 1
    assert seed in evaluator.choose_parents(child, [seed, *peers], 4)
    seed.host.uploads = 2
    assert seed in spare_seeds([seed, *peers], 1.5)
    assert seed in MultiFeatureEvaluator(SchedulerConfig(seed_fanout=0)).choose_parents(child, [seed, *peers], 4)
    # The daemon's own count of children (other schedulers' included) counts too.
    seed.host.uploads, seed.host.upload_peers = 0, 2
    assert seed not in spare_seeds([seed, *peers], 1.0)
    # Unknown capacities: nothing to compare, nobody is left out.
    seed.host.upload_capacity = 0
    assert seed in spare_seeds([seed, *peers], 1.0)
    with pytest.raises(ValueError, match="seed_fanout"):
        SchedulerConfig(seed_fanout=-1)
