"""The state machines of tasks and peers, as transition tables.

Rules of this file:

* Everything that decides which state a task or a peer may move to lives here, as a table from
  ``(state, trigger)`` to the next state. A pair that is not in the table is an invalid transition and
  raises :class:`~dfz.sched.errors.InvalidTransition`; there are no other rules hidden in ``if``\\ s.
* This file does not know why a trigger fires (that is ``core.py``) and keeps no state of its own: it
  maps a state and a trigger to a state.
* States and triggers hash by identity (``object.__hash__``, in C), not by name (``Enum.__hash__``, in
  Python): the core looks them up in these tables, in the state groups below and in per-task counts on
  every decision. Members are singletons compared by identity, so the hash agrees with ``==``.

Theory of operation. A **peer** is one daemon's download of one task. It starts ``pending`` (registered,
no parents yet), becomes ``running`` when the scheduler pushes its first parents (``schedule``; pushing
new parents later keeps it running), or ``back_to_source`` when the scheduler sends it to the origin (the
root of the swarm, normally a seed). It ends ``succeeded`` or ``failed``, and ``left`` when the daemon
leaves or its host is removed; ``left`` peers are forgotten at once. A **task** is ``pending`` until one
of its peers starts downloading (``download``), ``succeeded`` once some peer has the whole file, and
``failed`` when the origin failed and no peer can feed the others any more. A new download after a
failure runs the task again; after success it stays ``succeeded`` (the content is known).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Final, TypeVar

from .errors import InvalidTransition


class PeerState(Enum):
    __hash__ = object.__hash__  # by identity, in C (see the rules above)
    PENDING = "pending"
    RUNNING = "running"
    BACK_TO_SOURCE = "back_to_source"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LEFT = "left"


class PeerTrigger(Enum):
    __hash__ = object.__hash__  # by identity, in C (see the rules above)
    SCHEDULE = "schedule"  # parents were pushed to the peer
    BACK_TO_SOURCE = "back_to_source"  # the peer was sent to the origin
    SUCCEED = "succeed"  # the peer has every piece and the whole-file digest
    FAIL = "fail"  # the peer reported a failure, or the scheduler failed it
    LEAVE = "leave"  # the peer left, or its host was removed


class TaskState(Enum):
    __hash__ = object.__hash__  # by identity, in C (see the rules above)
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class TaskTrigger(Enum):
    __hash__ = object.__hash__  # by identity, in C (see the rules above)
    DOWNLOAD = "download"  # a peer of the task started downloading (from parents or from the origin)
    SUCCEED = "succeed"  # a peer of the task has the whole file
    FAIL = "fail"  # the origin failed and no peer of the task can feed the others


_P = PeerState
PEER_TRANSITIONS: Final[Mapping[tuple[PeerState, PeerTrigger], PeerState]] = {
    (_P.PENDING, PeerTrigger.SCHEDULE): _P.RUNNING,
    (_P.RUNNING, PeerTrigger.SCHEDULE): _P.RUNNING,
    (_P.PENDING, PeerTrigger.BACK_TO_SOURCE): _P.BACK_TO_SOURCE,
    (_P.RUNNING, PeerTrigger.BACK_TO_SOURCE): _P.BACK_TO_SOURCE,
    (_P.RUNNING, PeerTrigger.SUCCEED): _P.SUCCEEDED,
    (_P.BACK_TO_SOURCE, PeerTrigger.SUCCEED): _P.SUCCEEDED,
    (_P.PENDING, PeerTrigger.FAIL): _P.FAILED,
    (_P.RUNNING, PeerTrigger.FAIL): _P.FAILED,
    (_P.BACK_TO_SOURCE, PeerTrigger.FAIL): _P.FAILED,
    (_P.PENDING, PeerTrigger.LEAVE): _P.LEFT,
    (_P.RUNNING, PeerTrigger.LEAVE): _P.LEFT,
    (_P.BACK_TO_SOURCE, PeerTrigger.LEAVE): _P.LEFT,
    (_P.SUCCEEDED, PeerTrigger.LEAVE): _P.LEFT,
    (_P.FAILED, PeerTrigger.LEAVE): _P.LEFT,
}

_T = TaskState
TASK_TRANSITIONS: Final[Mapping[tuple[TaskState, TaskTrigger], TaskState]] = {
    (_T.PENDING, TaskTrigger.DOWNLOAD): _T.RUNNING,
    (_T.RUNNING, TaskTrigger.DOWNLOAD): _T.RUNNING,
    (_T.FAILED, TaskTrigger.DOWNLOAD): _T.RUNNING,
    (_T.SUCCEEDED, TaskTrigger.DOWNLOAD): _T.SUCCEEDED,
    (_T.RUNNING, TaskTrigger.SUCCEED): _T.SUCCEEDED,
    (_T.SUCCEEDED, TaskTrigger.SUCCEED): _T.SUCCEEDED,
    (_T.RUNNING, TaskTrigger.FAIL): _T.FAILED,
    (_T.SUCCEEDED, TaskTrigger.FAIL): _T.FAILED,
}

# Groups of peer states the core asks about, named once here.
WAITING_STATES: Final = frozenset({_P.PENDING, _P.RUNNING})
"""States of a peer that downloads from parents (or waits for them): it needs parents and digests."""
DOWNLOADING_STATES: Final = frozenset({_P.RUNNING, _P.BACK_TO_SOURCE})
"""States in which a peer reports pieces."""
PARENT_STATES: Final = frozenset({_P.RUNNING, _P.BACK_TO_SOURCE, _P.SUCCEEDED})
"""States in which a peer can serve children: it has pieces or is fetching them."""
SOURCE_STATES: Final = frozenset({_P.BACK_TO_SOURCE, _P.SUCCEEDED})
"""States of a peer that feeds the swarm without parents: it fetches from the origin or has everything."""

S = TypeVar("S", bound=Enum)
G = TypeVar("G", bound=Enum)


def _next(table: Mapping[tuple[S, G], S], what: str, state: S, trigger: G) -> S:
    try:
        return table[state, trigger]
    except KeyError:
        allowed = tuple(str(s.value) for (s, g) in table if g is trigger)
        raise InvalidTransition(what, str(state.value), str(trigger.value), allowed) from None


def next_peer_state(state: PeerState, trigger: PeerTrigger, peer_id: str = "?") -> PeerState:
    """The state a peer in ``state`` moves to on ``trigger``; raises ``InvalidTransition`` if none."""
    return _next(PEER_TRANSITIONS, f"peer {peer_id}", state, trigger)


def next_task_state(state: TaskState, trigger: TaskTrigger, task_id: str = "?") -> TaskState:
    """The state a task in ``state`` moves to on ``trigger``; raises ``InvalidTransition`` if none."""
    return _next(TASK_TRANSITIONS, f"task {task_id}", state, trigger)
