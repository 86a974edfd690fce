"""Errors the scheduler core raises when an event cannot be applied.

The core raises only *before* it changes anything, so an event that raises leaves the model exactly as it
was. The shell answers the request that carried the event with an error (or logs a push it cannot use)
and goes on with the next event. Conflicts with facts the task already knows from the origin (a piece
digest, the content length) are not raised: they fail the reporting peer (see ``core.py``).
"""

from __future__ import annotations


class SchedulerError(Exception):
    """Base of every error the scheduler core raises for an event it refuses."""


class UnknownHost(SchedulerError):
    """An event names a host that has not announced itself (or was removed): announce the host first."""

    def __init__(self, host_id: str) -> None:
        super().__init__(f"unknown host {host_id!r}: the host must announce itself before registering peers")
        self.host_id = host_id


class UnknownPeer(SchedulerError):
    """An event names a peer the scheduler does not know (never registered, or already left)."""

    def __init__(self, peer_id: str) -> None:
        super().__init__(f"unknown peer {peer_id!r}: register the peer first (it may have left or its host timed out)")
        self.peer_id = peer_id


class InvalidTransition(SchedulerError):
    """A state machine was asked for a transition its table does not allow (see ``state.py``)."""

    def __init__(self, what: str, state: str, trigger: str, allowed_from: tuple[str, ...]) -> None:
        allowed = ", ".join(allowed_from) or "nowhere"
        super().__init__(f"cannot {trigger} {what}: it is {state} (allowed from: {allowed})")
        self.what = what
        self.state = state
        self.trigger = trigger


class InvalidEvent(SchedulerError):
    """An event's data does not fit the model: a bad value, a report from a peer in the wrong state, or
    a piece that cannot have been verified."""


class TaskFull(SchedulerError):
    """A peer registers for a task that holds ``max_peers_per_task`` peers, none of which can be evicted
    (every one is downloading or serving children)."""

    def __init__(self, task_id: str, limit: int) -> None:
        super().__init__(
            f"task {task_id} has {limit} peers, the most one task may hold (max_peers_per_task), and each of them "
            "is downloading or serving: try again later, or raise the limit"
        )
        self.task_id = task_id


class TenantMismatch(SchedulerError):
    """A host of one tenant asks for a task of another (or announces itself in another tenant than it is in):
    tenants never share a task, a parent or a host."""

    def __init__(self, what: str, tenant: str, other: str) -> None:
        super().__init__(f"{what} is of tenant {other or '(none)'!r}, and this host of tenant {tenant or '(none)'!r}")
        self.tenant = tenant
        self.other = other
