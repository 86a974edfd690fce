"""Every setting of the scheduler core, with its default, in one place.

``dfz sched`` reads them from the ``[scheduler]`` table of its TOML file (``service.py``); each key is a
field of :class:`SchedulerConfig` and is checked here, so a bad value fails at start with a message that
names the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

EVALUATORS = ("multi_feature", "simple", "random")
"""The parent-choice strategies ``evaluator`` may name (see ``evaluator.py``)."""

WEIGHT_KEYS = ("load_weight", "idc_weight", "location_weight", "host_type_weight", "progress_weight", "reliability_weight")
"""The evaluator's feature weights (see ``evaluator.py``)."""


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Settings of :class:`~dfz.sched.core.SchedulerCore`. Times are in seconds of the core's clock."""

    # --- parent choice -----------------------------------------------------------------------------------
    evaluator: str = "multi_feature"
    """How parents are ranked: ``multi_feature`` (the weights below), ``simple`` (seeds, then the most
    pieces) or ``random`` (a baseline for benchmarks)."""
    seed: int = 0
    """Seed of the scheduler's random choices: candidate samples, retry jitter, the random evaluator."""
    candidate_parent_limit: int = 4
    """Parents pushed to a peer at once (Dragonfly's ``candidateParentLimit``)."""
    candidate_parent_sample: int = 40
    """Possible parents looked at per decision, drawn at random among the task's peers that can serve
    (Dragonfly's ``filterParentLimit``): the cost of a decision does not grow with the swarm."""
    load_weight: float = 0.6
    """Weight of the parent host's load: free upload bandwidth, free upload slots, requests in flight."""
    idc_weight: float = 0.2
    """Weight of IDC affinity: parent and child in the same data centre."""
    location_weight: float = 0.1
    """Weight of location affinity: the common prefix of the ``|``-separated locations."""
    host_type_weight: float = 0.1
    """Weight of the host type: a seed host with capacity left is preferred."""
    progress_weight: float = 0.0
    """Weight of progress: the share of the pieces the child lacks that the parent has."""
    reliability_weight: float = 0.0
    """Weight of reliability: the parent's upload success rate and its piece costs. (The four weights
    above are Dragonfly's since v2.4; progress and reliability are off by default, and unreliable parents
    are excluded anyway, by the bad-parent rule and by each child's blocked parents.)"""
    seed_fanout: float = 1.0
    """How many children a seed host with a known upload capacity feeds while other candidates exist: this
    many times its capacity over the best capacity among the other candidates (at least 1). Beyond it the
    seed is left out of the choice and the tree deepens: a seed that fed every child of a flash crowd sent
    the same pieces to each, and its upload, not the swarm's, set the pace (bench_swarm --heterogeneous
    with the seed's upload limited). 0: no limit."""

    # --- bad parents ---------------------------------------------------------------------------------------
    bad_parent_window: int = 30
    """Piece costs kept per parent (the latest ones, as its children report them)."""
    bad_parent_ratio: float = 20.0
    """While a parent has fewer costs than the window, a latest cost above this many times the mean of the
    others makes it a bad parent (Dragonfly's rule)."""
    bad_parent_sigmas: float = 3.0
    """Once the window is full, a latest cost above mean + this many standard deviations does."""
    bad_parent_cost_floor: float = 0.1
    """A latest cost less than this many seconds above the mean is never an outlier (1 ms to 30 ms on a
    fast link is noise, not a bad parent)."""
    bad_parent_timeout: float = 30.0
    """How long a bad parent is not chosen, unless a newer cost clears it first."""

    # --- retries and the origin ----------------------------------------------------------------------------
    retry_limit: int = 5
    """Failed scheduling attempts after which a peer goes back to source (when it may) or fails."""
    retry_interval: float = 1.0
    """Time between two scheduling attempts of a peer that has no parent (give or take the jitter)."""
    retry_jitter: float = 0.2
    """Each retry comes ``retry_interval`` times a factor drawn in ``[1 - jitter, 1 + jitter)``, so that the
    peers of a flash crowd do not all retry in the same instant. 0 for exact intervals."""
    back_to_source_limit: int = 3
    """Peers of one task fetching from the origin at once. Keeps origin egress near one copy."""
    seed_trigger_timeout: float = 3.0
    """How long a triggered seed host has to register its peer before another source is sought."""

    # --- garbage collection --------------------------------------------------------------------------------
    host_timeout: float = 60.0
    """A host not heard from (announce, heartbeat, load report or any peer event) for this long is removed
    with its peers."""
    peer_ttl: float = 86400.0
    """A succeeded peer that has served no child for this long is forgotten (its daemon may announce the
    task again)."""
    failed_peer_ttl: float = 300.0
    """A failed peer is forgotten this long after its last event."""
    task_ttl: float = 0.0
    """A task without peers is forgotten after this long. 0: at once (the file at the origin may change;
    a longer TTL keeps its digests and size for the next download)."""
    max_peers_per_task: int = 20000
    """Peers one task holds. A registration beyond it first evicts finished leaves (failed peers, then the
    longest idle succeeded ones without children); when none can go, it is refused."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("str", str):
                if not isinstance(value, str):
                    raise ValueError(f"{f.name} must be a string, got {value!r}")
            elif f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{f.name} must be an integer, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        if self.evaluator not in EVALUATORS:
            raise ValueError(f"evaluator must be one of {', '.join(EVALUATORS)}, got {self.evaluator!r}")
        if self.candidate_parent_limit < 1:
            raise ValueError("candidate_parent_limit must be at least 1")
        if self.candidate_parent_sample < self.candidate_parent_limit:
            raise ValueError(
                f"candidate_parent_sample must be at least candidate_parent_limit ({self.candidate_parent_limit}): "
                "the best parents are chosen among the ones sampled"
            )
        if self.retry_limit < 1:
            raise ValueError("retry_limit must be at least 1")
        if self.back_to_source_limit < 1:
            raise ValueError("back_to_source_limit must be at least 1: somebody has to fetch from the origin")
        for name in ("retry_interval", "seed_trigger_timeout", "host_timeout", "peer_ttl", "failed_peer_ttl"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds")
        for name in ("task_ttl", "bad_parent_cost_floor", "bad_parent_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be a number of seconds, 0 or more")
        if not 0 <= self.retry_jitter < 1:
            raise ValueError(f"retry_jitter must be from 0 to below 1 (a fraction of retry_interval), got {self.retry_jitter}")
        for name in WEIGHT_KEYS:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more (weights are relative: 0 switches a feature off)")
        if self.seed_fanout < 0:
            raise ValueError("seed_fanout must be 0 (no limit) or more")
        if not any(getattr(self, name) > 0 for name in WEIGHT_KEYS):
            raise ValueError(f"weights ({', '.join(WEIGHT_KEYS)}) are all 0: at least one must be positive")
        if self.bad_parent_window < 3:
            raise ValueError("bad_parent_window must be at least 3 (costs kept per parent)")
        if self.bad_parent_ratio <= 1:
            raise ValueError("bad_parent_ratio must be more than 1 (times the mean cost)")
        if self.bad_parent_sigmas <= 0:
            raise ValueError("bad_parent_sigmas must be positive (standard deviations above the mean)")
        if self.max_peers_per_task < 2:
            raise ValueError("max_peers_per_task must be at least 2 (a source and a downloader)")
