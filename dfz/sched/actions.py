"""What the scheduler asks the shell to do: one small immutable class per kind of action.

:meth:`SchedulerCore.apply <dfz.sched.core.SchedulerCore.apply>` returns a list of these, in the order
they were decided; the shell carries them out in that order (a push to a peer, a trigger to a seed host).
The core has already updated its model as if each action succeeded. A push that cannot be delivered
means the peer or host is gone: the shell reports that back as ``PeerLeft`` / ``HostLeft``.

Peer-directed actions name the peer; the shell sends them over the session of the peer's host (the one
that registered it, or ``core.peers[peer_id].host.id``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ParentCandidate:
    """One parent to download from: its peer id and where its host's piece server listens."""

    peer_id: str
    host_id: str
    ip: str
    port: int


@dataclass(frozen=True, slots=True)
class PushParents:
    """Tell ``peer_id`` its parents: this list replaces the previous one (best first)."""

    peer_id: str
    task_id: str
    parents: tuple[ParentCandidate, ...]


@dataclass(frozen=True, slots=True)
class TriggerSeed:
    """Ask the seed host ``host_id`` to download the task from the origin; it answers by registering a
    peer for ``task_id`` (and then becomes the root of the swarm)."""

    host_id: str
    task_id: str
    url: str
    tag: str
    application: str
    piece_length: int | None
    headers: tuple[tuple[str, str], ...]
    wanted: tuple[tuple[int, int | None], ...] = ()
    """Byte ranges peers of the task need first (read from the origin first)."""
    again: bool = False
    """Only new ``wanted`` ranges for a seed that fetches the task already (nothing to start)."""


@dataclass(frozen=True, slots=True)
class BackToSource:
    """Tell ``peer_id`` to fetch the task from the origin (its missing pieces), and report their digests."""

    peer_id: str
    task_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class FailPeer:
    """Tell ``peer_id`` that its download failed and why; the daemon stops it and reports the reason."""

    peer_id: str
    task_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class ForwardDigests:
    """Send piece digests (piece → BLAKE3 hex, as the origin-fetching peer computed them) to peers that
    download from parents: they verify every piece against these, never against a parent's claim."""

    task_id: str
    peer_ids: tuple[str, ...]
    digests: Mapping[int, str]


@dataclass(frozen=True, slots=True)
class ForwardTaskInfo:
    """Send what is known of the task's file (from the origin-fetching peer) to peers that download it."""

    task_id: str
    peer_ids: tuple[str, ...]
    content_length: int | None
    piece_length: int | None
    piece_count: int | None
    digest: str | None


@dataclass(frozen=True, slots=True)
class HostRemoved:
    """The host is no longer in the model (it left or fell silent), with all its peers."""

    host_id: str
    reason: str


Action = PushParents | TriggerSeed | BackToSource | FailPeer | ForwardDigests | ForwardTaskInfo | HostRemoved
