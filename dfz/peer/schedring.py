"""Which scheduler a task belongs to: consistent hashing of the task id over the schedulers (a hash ring).

A daemon configured with several schedulers sends everything about a task (``sched.register_peer``, its
reports, ``sched.announce_task``) to one of them, the same one every daemon picks, so that the peers of a
task meet in one scheduling tree. ``protocol.md`` (§14.9) specifies the rule so that another
implementation picks the same scheduler; this module is its reference and knows nothing else (no
sockets, no clock).

Theory of operation:

* A scheduler is named by its endpoint exactly as configured (``tcp://10.0.0.1:8002``): every daemon of a
  cluster lists the same endpoint strings (their order does not matter).
* ``point(s)`` is the first 8 bytes of SHA-256 of ``s`` (UTF-8), a big-endian unsigned 64-bit integer.
  Each scheduler has :data:`VIRTUAL_NODES` points on the ring, ``point(f"{endpoint}#{i}")`` for ``i`` in
  ``0 .. VIRTUAL_NODES-1``; points are ordered by value, equal values by endpoint.
* A task's key is ``point(task_id)``. Its **preference order** is the schedulers in the order their
  points are met walking the ring upwards from the key (the first point ``>= key``, wrapping around after
  the largest), each scheduler counted at its first point. The task's scheduler is the first of that
  order that is up; when it goes down, the next one takes the task (exactly the scheduler the key would
  map to on a ring without the dead one), and only the dead scheduler's tasks move.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Iterable

VIRTUAL_NODES = 128
"""Points per scheduler on the ring. Part of the rule (§14.9): every daemon must use the same number."""


def point(text: str) -> int:
    """The ring position of ``text``: the first 8 bytes of its SHA-256, big-endian."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


class SchedulerRing:
    """The hash ring of a set of schedulers (their endpoints). Immutable; build a new one to change the set.

    Raises ``ValueError`` for an empty set or an empty endpoint; duplicates count once.
    """

    def __init__(self, nodes: Iterable[str], *, virtual_nodes: int = VIRTUAL_NODES) -> None:
        self.nodes: tuple[str, ...] = tuple(sorted(set(nodes)))
        if not self.nodes or not all(self.nodes):
            raise ValueError("a scheduler ring needs at least one scheduler endpoint, and no empty one")
        if virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be at least 1, got {virtual_nodes}")
        ring = sorted((point(f"{node}#{i}"), node) for node in self.nodes for i in range(virtual_nodes))
        self._points = [p for p, _ in ring]
        self._owners = [node for _, node in ring]

    def __len__(self) -> int:
        return len(self.nodes)

    def _start(self, key: str) -> int:
        """Index of the first ring point at or after the key's (wrapping to 0)."""
        i = bisect.bisect_left(self._points, point(key))
        return 0 if i == len(self._points) else i

    def owner(self, key: str) -> str:
        """The scheduler of ``key`` when every scheduler is up."""
        return self._owners[self._start(key)]

    def preference(self, key: str) -> list[str]:
        """Every scheduler, in the order ``key`` falls over to them: the owner first."""
        order: list[str] = []
        seen: set[str] = set()
        start, n = self._start(key), len(self._owners)
        for k in range(n):
            node = self._owners[(start + k) % n]
            if node not in seen:
                seen.add(node)
                order.append(node)
                if len(order) == len(self.nodes):
                    break
        return order

    def choose(self, key: str, up: Callable[[str], bool]) -> str | None:
        """The first scheduler of ``key``'s preference order for which ``up(endpoint)``; None if none is."""
        for node in self.preference(key):
            if up(node):
                return node
        return None


__all__ = ["VIRTUAL_NODES", "SchedulerRing", "point"]
