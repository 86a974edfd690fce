"""Parent choice: the strategy that ranks candidate parents for a peer.

The core decides who *may* be a parent (same task, serving state, another host, no cycle, a free upload
slot, not avoided) and hands those candidates to an :class:`Evaluator`, which decides who is *best*. An
evaluator only reads the model and returns a subset of the candidates; it cannot break the DAG's rules,
because the core enforces them around it. Issue 4's multi-feature evaluator replaces
:class:`SimpleEvaluator` through the ``evaluator`` argument of ``SchedulerCore``.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Protocol

from .model import Peer
from .state import SOURCE_STATES


class Evaluator(Protocol):
    def choose_parents(self, child: Peer, candidates: Sequence[Peer], limit: int) -> list[Peer]:
        """Return at most ``limit`` of ``candidates``, best first. ``candidates`` is never empty."""
        ...


class SimpleEvaluator:
    """Seeds first, then the peers with the most pieces, then sources (they get pieces first), then the
    least loaded hosts.

    The peer id breaks ties, so the choice is deterministic (exact tests, reproducible simulations).
    """

    def choose_parents(self, child: Peer, candidates: Sequence[Peer], limit: int) -> list[Peer]:
        return heapq.nsmallest(limit, candidates, key=_rank)


def _rank(peer: Peer) -> tuple[bool, int, bool, int, str]:
    return (not peer.host.is_seed, -peer.finished_count, peer.state not in SOURCE_STATES, peer.host.uploads, peer.id)
