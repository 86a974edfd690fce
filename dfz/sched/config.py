"""Every setting of the scheduler core, with its default, in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Settings of :class:`~dfz.sched.core.SchedulerCore`. Times are in seconds of the core's clock."""

    candidate_parent_limit: int = 4
    """Parents pushed to a peer at once (Dragonfly's ``candidateParentLimit``)."""
    retry_limit: int = 5
    """Failed scheduling attempts after which a peer goes back to source (when it may) or fails."""
    retry_interval: float = 1.0
    """Time between two scheduling attempts of a peer that has no parent."""
    back_to_source_limit: int = 3
    """Peers of one task fetching from the origin at once. Keeps origin egress near one copy."""
    seed_trigger_timeout: float = 3.0
    """How long a triggered seed host has to register its peer before another source is sought."""
    host_timeout: float = 60.0
    """A host not heard from (announce, heartbeat or any peer event) for this long is removed."""

    def __post_init__(self) -> None:
        if self.candidate_parent_limit < 1:
            raise ValueError("candidate_parent_limit must be at least 1")
        if self.retry_limit < 1:
            raise ValueError("retry_limit must be at least 1")
        if self.back_to_source_limit < 1:
            raise ValueError("back_to_source_limit must be at least 1: somebody has to fetch from the origin")
        for name in ("retry_interval", "seed_trigger_timeout", "host_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds")
