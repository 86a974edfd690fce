"""The scheduler's side of the manager's ``get_task`` and ``delete_task`` jobs (``protocol.md`` §17.9).

The manager is a fabric server and the scheduler one of its clients (``dfz.mgr.agent``), so the manager asks
with a server push and the scheduler answers with requests:

* ``mgr.get_task`` → the peers of the task this scheduler knows (:meth:`SchedulerService.task_peers`), sent
  as ``mgr.task_peers`` requests of at most ``MAX_JOB_RECORDS`` peers each, the last one with ``more`` false;
* ``mgr.delete_task`` → :meth:`SchedulerService.delete_task` (``sched.delete_task`` to every host of the task,
  their answers, then the task forgotten), then ``mgr.task_deleted`` requests the same way.

An answer that cannot be delivered (the manager's session is gone) is dropped: the manager pushes the question
again on the next session if its job still waits. At most :data:`MAX_IN_FLIGHT` questions are worked on at
once; more are refused by being ignored (the manager's job times out on them, saying so).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import trio

from ..log import event, get_logger
from ..mgr.agent import ManagerAgent
from ..mgr.messages import (
    MAX_JOB_RECORDS,
    MgrDeletedHost,
    MgrDeleteTask,
    MgrGetTask,
    MgrTaskDeleted,
    MgrTaskPeer,
    MgrTaskPeers,
    PeerState,
)
from .service import HostDeletion, SchedulerService, TaskPeerView

log = get_logger("sched.mgrjobs")

T = TypeVar("T")

MAX_IN_FLIGHT = 64
"""Questions from the manager worked on at once."""


class ManagerJobs:
    """Answers the manager's job pushes for ``service`` over ``agent``: built before ``agent`` runs (it
    registers the push handlers), then ``await nursery.start(jobs.run)``."""

    def __init__(self, service: SchedulerService, agent: ManagerAgent) -> None:
        self.service = service
        self.agent = agent
        self._nursery: trio.Nursery | None = None
        self._in_flight = 0
        agent.on_push(MgrGetTask, self._on_get)
        agent.on_push(MgrDeleteTask, self._on_delete)

    async def run(self, *, task_status: trio.TaskStatus[ManagerJobs] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            await trio.sleep_forever()

    def _start(self, what: str, fn: Callable[[Any], Awaitable[None]], msg: MgrGetTask | MgrDeleteTask) -> None:
        if self._nursery is None or self._in_flight >= MAX_IN_FLIGHT:
            event(log, logging.WARNING, "sched_job_dropped", what=what, job=msg.job_id, task=msg.task_id)
            return
        self._in_flight += 1
        self._nursery.start_soon(fn, msg)

    def _on_get(self, msg: MgrGetTask) -> None:
        self._start("get_task", self._get, msg)

    def _on_delete(self, msg: MgrDeleteTask) -> None:
        self._start("delete_task", self._delete, msg)

    async def _get(self, msg: MgrGetTask) -> None:
        try:
            peers = [_peer(p) for p in self.service.task_peers(msg.task_id)]
            event(log, logging.INFO, "sched_task_looked_up", job=msg.job_id, task=msg.task_id, peers=len(peers))
            for chunk, more in _chunks(peers):
                reply = MgrTaskPeers(job_id=msg.job_id, request=msg.request, task_id=msg.task_id, peers=chunk, more=more)
                if not await self.agent.answer(reply):
                    return
        finally:
            self._in_flight -= 1

    async def _delete(self, msg: MgrDeleteTask) -> None:
        try:
            outcomes = [_host(o) for o in await self.service.delete_task(msg.task_id, msg.timeout_ms / 1000)]
            for chunk, more in _chunks(outcomes):
                reply = MgrTaskDeleted(job_id=msg.job_id, request=msg.request, task_id=msg.task_id, hosts=chunk, more=more)
                if not await self.agent.answer(reply):
                    return
        finally:
            self._in_flight -= 1


def _chunks(items: Sequence[T]) -> list[tuple[list[T], bool]]:
    """``items`` in messages of at most MAX_JOB_RECORDS, each with whether more follow (one empty if none)."""
    parts = [list(items[i : i + MAX_JOB_RECORDS]) for i in range(0, len(items), MAX_JOB_RECORDS)] or [[]]
    return [(part, n < len(parts) - 1) for n, part in enumerate(parts)]


def _peer(p: TaskPeerView) -> MgrTaskPeer:
    return MgrTaskPeer(
        peer_id=p.peer_id,
        host_id=p.host_id,
        hostname=p.hostname,
        ip=p.ip,
        host_type="seed" if p.host_type == "seed" else "normal",
        state=cast("PeerState", p.state),  # the core's peer states are the wire's (state.py; left peers are gone)
        finished_pieces=min(p.finished_pieces, 0xFFFF_FFFF),
        piece_count=p.piece_count,
        content_length=p.content_length,
    )


def _host(o: HostDeletion) -> MgrDeletedHost:
    return MgrDeletedHost(
        host_id=o.host_id,
        hostname=o.hostname,
        ip=o.ip,
        host_type="seed" if o.host_type == "seed" else "normal",
        ok=o.ok,
        held=o.held,
        error=o.error[:256],
    )
