"""Parent choice: the strategies that rank candidate parents for a peer.

Rules of this file:

* The core decides who *may* be a parent (same task, serving state, another host, no cycle, a free upload
  slot, not blocked by the child, not a bad parent) and hands a sample of those candidates to an
  :class:`Evaluator`, which decides who is *best*. An evaluator only reads the model (but for its own
  memo on hosts, below) and returns a subset of the candidates; it cannot break the DAG's rules,
  because the core enforces them around it.
* Every choice is deterministic: equal scores are ordered by peer id, and :class:`RandomEvaluator` draws
  from its own seeded generator. Exact tests and reproducible simulations depend on it.
* A decision costs O(candidates) with small constants and allocates a few short lists of floats: the
  core calls it for every registration and every reschedule. The feature functions below define the
  scores; ``MultiFeatureEvaluator._scores`` is the same arithmetic inlined (a test keeps the two equal),
  and ``_ranked`` lists its scores as ``(-score, peer id, peer)``.
* What an evaluator computed of a host alone may be kept on the host between decisions
  (``Host.scored_by`` and the fields after it): the core resets ``scored_by`` whenever it changes the host,
  and an evaluator's weights are fixed when it is made (a change of weights makes a new evaluator).

Theory of operation. :class:`MultiFeatureEvaluator` (the default) scores each candidate as a weighted sum
of feature scores, each in ``[0, 1]``, larger is better (weights from :class:`SchedulerConfig`):

* **load** (``load_weight``, 0.6): ``0.5 * bandwidth + 0.3 * slots + 0.2 * in_flight`` of the parent's
  host. *bandwidth*: the host's bandwidth share, its free upload bandwidth (announced ``upload_capacity``
  minus the measured ``upload_rate``) but at most ``capacity / (children + 1)``, over the best share
  among the candidates, so a fast idle host scores 1 and a slow, saturated or crowded one near 0 (the
  fair-share cap spreads a flash crowd before rates are measured); a host that announced no capacity
  scores :data:`UNKNOWN`. *slots*: the
  share of upload slots free (the busier of the scheduler's own count and the daemon's report, which
  includes children of other schedulers). *in_flight*: ``1 / (1 + requests in flight / slots)``.
* **idc** (``idc_weight``, 0.2): 1 when parent and child hosts name the same IDC, else 0.
* **location** (``location_weight``, 0.1): 1 for equal locations, else the number of leading
  ``|``-separated elements they share over :data:`~dfz.sched.model.MAX_LOCATION_ELEMENTS`.
* **host type** (``host_type_weight``, 0.1): a seed host 1 while it has capacity (a free slot and, if
  its capacity is known, free bandwidth), 0 once saturated; a normal host 0.5. Before scoring, a seed host
  that feeds its share of children already is left out while other candidates remain
  (:func:`spare_seeds`, ``seed_fanout``): the tree deepens instead of the seed sending every piece to
  every child.
* **progress** (``progress_weight``, 0 by default): the pieces the parent has that the child lacks
  (``popcount(parent & ~child)``) over the pieces the child lacks, or over the best candidate's count
  when the task's size is unknown.
* **reliability** (``reliability_weight``, 0 by default): ``0.5 * success + 0.5 * speed``. *success*: the
  parent's upload success rate (1 before any report: an untried parent gets its chance). *speed*: the
  lowest mean piece cost among the candidates over the parent's (1 before any cost).

The defaults are Dragonfly's weights since v2.4 (load 0.6, IDC 0.2, location 0.1, host type 0.1).
:class:`SimpleEvaluator` (a fixed order: seeds, then the most pieces) and :class:`RandomEvaluator` (the
benchmarks' baseline) are the other strategies; ``SchedulerConfig.evaluator`` names the one to use.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from typing import Final, Protocol

from .config import SchedulerConfig
from .model import MAX_LOCATION_ELEMENTS, Host, HostType, Peer
from .state import SOURCE_STATES

UNKNOWN: Final = 0.5
"""The score of a feature whose measure is unknown (no capacity announced): neither good nor bad."""

LOAD_BANDWIDTH: Final = 0.5
LOAD_SLOTS: Final = 0.3
LOAD_IN_FLIGHT: Final = 0.2
"""How the load score is made of its three measures (Dragonfly v2.4's load quality weighs peak bandwidth
0.5, bandwidth over time 0.3 and concurrency 0.2)."""


class Evaluator(Protocol):
    def choose_parents(self, child: Peer, candidates: Sequence[Peer], limit: int) -> list[Peer]:
        """Return at most ``limit`` of ``candidates``, best first. ``candidates`` is never empty."""
        ...


# --- feature scores: each in [0, 1], larger is better -------------------------------------------------------


def bandwidth_score(host: Host, best_free: int) -> float:
    """The host's bandwidth share (:attr:`Host.bandwidth_share`) over ``best_free`` (the best among the
    candidates)."""
    free = host.bandwidth_share
    if free is None:
        return UNKNOWN
    return free / best_free if best_free > 0 else 0.0


def slots_score(host: Host) -> float:
    """The share of the host's upload slots that are free."""
    slots = host.upload_slots
    if slots <= 0:
        return 0.0
    used = host.uploads if host.uploads > host.upload_peers else host.upload_peers
    return (slots - used) / slots if used < slots else 0.0


def in_flight_score(host: Host) -> float:
    """Lower with more piece requests in flight at the host, relative to its slots."""
    return 1.0 / (1.0 + host.uploads_in_flight / (host.upload_slots or 1))


def load_score(host: Host, best_free: int) -> float:
    bandwidth = bandwidth_score(host, best_free)
    return LOAD_BANDWIDTH * bandwidth + LOAD_SLOTS * slots_score(host) + LOAD_IN_FLIGHT * in_flight_score(host)


def idc_score(parent: Host, child: Host) -> float:
    return 1.0 if parent.idc_key and parent.idc_key == child.idc_key else 0.0


def location_score(parent: Host, child: Host) -> float:
    a, b = parent.location_key, child.location_key
    if not a or not b:
        return 0.0
    if a == b:
        return 1.0  # equal locations; or the first MAX_LOCATION_ELEMENTS agree, which scores 1 as well
    shared = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        shared += 1
    return shared / MAX_LOCATION_ELEMENTS


def host_type_score(parent: Peer) -> float:
    host = parent.host
    if not host.is_seed:
        return 0.5
    free = host.free_bandwidth
    return 1.0 if slots_score(host) > 0 and (free is None or free > 0) else 0.0


def useful_pieces(parent: Peer, child: Peer) -> int:
    """Pieces the parent has that the child lacks."""
    return (parent.finished & ~child.finished).bit_count()


def progress_score(parent: Peer, child: Peer, best_useful: int) -> float:
    useful = useful_pieces(parent, child)
    count = child.task.piece_count
    if count is not None:
        lacking = count - child.finished_count
        return min(1.0, useful / lacking) if lacking > 0 else 0.0
    return useful / best_useful if best_useful > 0 else 0.0


def reliability_score(parent: Peer, best_mean_cost: float | None) -> float:
    rate = parent.upload_success_rate
    success = 1.0 if rate is None else rate
    mean = parent.costs.mean() if parent.costs is not None else None
    speed = 1.0
    if mean is not None and best_mean_cost is not None:
        speed = min(1.0, (best_mean_cost + 1.0) / (mean + 1.0))  # +1 ms: a cost of 0 ms is possible
    return 0.5 * success + 0.5 * speed


# --- the strategies ---------------------------------------------------------------------------------------


class MultiFeatureEvaluator:
    """The default evaluator: the weighted sum of the feature scores above (see the module's theory)."""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        config = config or SchedulerConfig()
        self.load_weight = config.load_weight
        self.idc_weight = config.idc_weight
        self.location_weight = config.location_weight
        self.host_type_weight = config.host_type_weight
        self.progress_weight = config.progress_weight
        self.reliability_weight = config.reliability_weight
        self.seed_fanout = config.seed_fanout

    def __repr__(self) -> str:
        return (
            f"MultiFeatureEvaluator(load={self.load_weight}, idc={self.idc_weight}, location={self.location_weight}, "
            f"host_type={self.host_type_weight}, progress={self.progress_weight}, reliability={self.reliability_weight})"
        )

    def choose_parents(self, child: Peer, candidates: Sequence[Peer], limit: int) -> list[Peer]:
        if self.seed_fanout and len(candidates) > 1:
            candidates = spare_seeds(candidates, self.seed_fanout)
        return best_of(candidates, self._scores(child, candidates), limit)

    def scores(self, child: Peer, candidates: Sequence[Peer]) -> dict[str, float]:
        """Each candidate's score (peer id → score), computed from the feature functions above: the
        definition that :meth:`choose_parents` follows (``tests/test_sched_evaluator.py`` checks that both
        agree). For tests, logs and tools."""
        best_free = max((f for peer in candidates if (f := peer.host.bandwidth_share) is not None), default=0)
        best_useful = max((useful_pieces(peer, child) for peer in candidates), default=0)
        means = [m for peer in candidates if peer.costs is not None and (m := peer.costs.mean()) is not None]
        best_cost = min(means, default=None)
        out: dict[str, float] = {}
        for peer in candidates:
            out[peer.id] = (
                self.load_weight * load_score(peer.host, best_free)
                + self.idc_weight * idc_score(peer.host, child.host)
                + self.location_weight * location_score(peer.host, child.host)
                + self.host_type_weight * host_type_score(peer)
                + self.progress_weight * progress_score(peer, child, best_useful)
                + self.reliability_weight * reliability_score(peer, best_cost)
            )
        return out

    def _ranked(self, child: Peer, candidates: Sequence[Peer]) -> list[tuple[float, str, Peer]]:
        """(-score, peer id, peer) per candidate, from :meth:`_scores`: the smallest tuples are the best."""
        return [(-score, peer.id, peer) for score, peer in zip(self._scores(child, candidates), candidates, strict=True)]

    def _scores(self, child: Peer, candidates: Sequence[Peer]) -> list[float]:
        """Each candidate's score, in the order of ``candidates``.

        The hot path of every decision, so the feature functions are inlined, with features of weight 0
        skipped and the normalisers computed only when needed. What depends on the parent's host alone
        (its free bandwidth; its slots, requests in flight and type, weighted) is kept on the host
        (``Host.scored_*``, see :meth:`host_part`) until the core changes the host; the affinities are added
        per child, and the bandwidth last, once the best free bandwidth among the candidates is known.
        Floats only, no tuple per candidate. Keep it equal to :meth:`scores` (up to rounding: the sum is in
        another order).
        """
        wl, wi, wloc = self.load_weight, self.idc_weight, self.location_weight
        wp, wr = self.progress_weight, self.reliability_weight
        best_useful = 0
        if wp and child.task.piece_count is None:
            best_useful = max(useful_pieces(peer, child) for peer in candidates)
        best_cost: float | None = None
        if wr:
            means = [m for peer in candidates if peer.costs is not None and (m := peer.costs.mean()) is not None]
            best_cost = min(means, default=None)
        child_host = child.host
        idc = child_host.idc_key if wi else ""
        location = child_host.location_key if wloc else ()
        here, depth = (location[0], len(location)) if location else (None, 0)
        w_location = wloc / MAX_LOCATION_ELEMENTS
        out: list[float] = []
        frees: list[int] = []  # free upload bandwidth per candidate, -1 when unknown
        best_free = 0
        for peer in candidates:
            host = peer.host
            if host.scored_by is not self:
                host.scored_free, host.scored_part = self.host_part(host)
                host.scored_by = self
            free, score = host.scored_free, host.scored_part
            best_free = free if free > best_free else best_free  # (no call to max: this is the hot loop)
            frees.append(free)
            if idc and host.idc_key == idc:
                score += wi
            if here is not None:
                theirs = host.location_key
                if theirs is location:  # hosts that announce the same location share its key (network_keys)
                    score += wloc
                elif theirs and theirs[0] == here:
                    shared, most = 1, len(theirs) if len(theirs) < depth else depth
                    while shared < most and theirs[shared] == location[shared]:
                        shared += 1
                    score += wloc if shared == depth == len(theirs) else w_location * shared
            if wp:
                score += wp * progress_score(peer, child, best_useful)
            if wr:
                score += wr * reliability_score(peer, best_cost)
            out.append(score)
        if not wl:
            return out
        w_bandwidth = wl * LOAD_BANDWIDTH
        w_unknown = w_bandwidth * UNKNOWN
        per_free = w_bandwidth / best_free if best_free > 0 else 0.0
        return [score + (w_unknown if free < 0 else free * per_free) for score, free in zip(out, frees, strict=True)]

    def host_part(self, host: Host) -> tuple[int, float]:
        """``(free bandwidth or -1, score of the host's slots, requests in flight and type)``: what
        :meth:`_scores` keeps in ``host.scored_free`` and ``host.scored_part`` for the next decisions (the
        core resets ``host.scored_by`` when it changes the host; ``SchedulerCore.check_invariants`` compares
        them with this)."""
        wl, wh = self.load_weight, self.host_type_weight
        share = host.bandwidth_share
        free = -1 if share is None else share
        slots = host.upload_slots
        used = host.uploads if host.uploads > host.upload_peers else host.upload_peers
        free_slots = (slots - used) / slots if used < slots else 0.0
        score = 0.0
        if wl:
            score = wl * LOAD_SLOTS * free_slots + wl * LOAD_IN_FLIGHT / (1.0 + host.uploads_in_flight / (slots or 1))
        if wh:
            if host.type is not HostType.SEED:
                score += wh * 0.5
            elif free_slots > 0 and free != 0:
                score += wh
        return free, score


def spare_seeds(candidates: Sequence[Peer], fanout: float) -> Sequence[Peer]:
    """The candidates without the seed hosts that feed their share of children already, when others
    remain. A seed's share is ``fanout`` times its announced upload capacity over the best capacity
    among the other candidates, at least 1; its children of this task that upload at less than half that
    best capacity do not count. A seed or a field of candidates with unknown capacities is never left out
    (there is nothing to compare)."""
    reference = 0
    seeds = False
    for peer in candidates:
        host = peer.host
        if host.type is not HostType.SEED:
            reference = max(reference, host.upload_capacity)
        elif host.upload_capacity > 0:
            seeds = True
    if reference <= 0 or not seeds:
        return candidates
    out = []
    weak = reference / 2
    for peer in candidates:
        host = peer.host
        if host.type is HostType.SEED and host.upload_capacity > 0:
            share = max(1, int(fanout * host.upload_capacity / reference))
            used = max(host.uploads, host.upload_peers)
            if used >= share:
                # Children that upload at less than half the reference forward little of what the seed
                # sends them: they do not use up its share (a slow host that registered first and took a
                # place held half the seed's output: 16 s instead of 10 s in bench_swarm --heterogeneous).
                used -= sum(1 for c in peer.children if 0 < c.host.upload_capacity < weak)
                if used >= share:
                    continue
        out.append(peer)
    return out if out else candidates


def best_of(candidates: Sequence[Peer], scores: Sequence[float], limit: int) -> list[Peer]:
    """The ``limit`` candidates with the highest scores (``scores[i]`` is ``candidates[i]``'s), best first;
    equal scores in the order of peer ids.

    The same as the ``limit`` smallest ``(-score, peer id)``, without a tuple per candidate: the
    ``limit``-th best score is a cut below which no candidate can be among the best, so only the few at
    or above it are ordered.
    """
    if len(scores) > limit:
        cut = sorted(scores, reverse=True)[limit - 1]
        top = [(-score, peer.id, peer) for score, peer in zip(scores, candidates, strict=True) if score >= cut]
    else:
        top = [(-score, peer.id, peer) for score, peer in zip(scores, candidates, strict=True)]
    top.sort()
    return [peer for _, _, peer in top[:limit]]


class SimpleEvaluator:
    """Seeds first, then the peers with the most pieces, then sources (they get pieces first), then the
    least loaded hosts. No weights, no measurements: a fixed order that reads well in exact tests.

    The peer id breaks ties, so the choice is deterministic (exact tests, reproducible simulations).
    """

    def choose_parents(self, child: Peer, candidates: Sequence[Peer], limit: int) -> list[Peer]:
        return heapq.nsmallest(limit, candidates, key=_rank)


def _rank(peer: Peer) -> tuple[bool, int, bool, int, str]:
    return (not peer.host.is_seed, -peer.finished_count, peer.state not in SOURCE_STATES, peer.host.uploads, peer.id)


class RandomEvaluator:
    """Parents drawn at random among the candidates: the baseline the benchmarks compare the evaluator
    with. Seeded, so a run is reproducible."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose_parents(self, child: Peer, candidates: Sequence[Peer], limit: int) -> list[Peer]:
        return self._rng.sample(list(candidates), min(limit, len(candidates)))


def evaluator_for(config: SchedulerConfig) -> Evaluator:
    """The evaluator that ``config.evaluator`` names, with the config's weights and seed."""
    match config.evaluator:
        case "simple":
            return SimpleEvaluator()
        case "random":
            return RandomEvaluator(config.seed)
        case _:
            return MultiFeatureEvaluator(config)
