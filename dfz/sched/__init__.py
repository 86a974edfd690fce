"""The scheduler (``dfz sched``): hosts, tasks and peers in memory, the scheduling DAG per task, the
evaluator that picks parents, and parent assignments pushed to peers over the fabric."""

from .actions import (
    Action,
    BackToSource,
    FailPeer,
    ForwardDigests,
    ForwardTaskInfo,
    HostRemoved,
    ParentCandidate,
    PushParents,
    TriggerSeed,
)
from .config import SchedulerConfig
from .core import Clock, InvariantViolation, SchedulerCore
from .errors import InvalidEvent, InvalidTransition, SchedulerError, UnknownHost, UnknownPeer
from .evaluator import Evaluator, SimpleEvaluator
from .events import (
    AnnounceHost,
    Event,
    HostHeartbeat,
    HostLeft,
    PeerFailed,
    PeerFinished,
    PeerLeft,
    PieceFailed,
    PieceFinished,
    RegisterPeer,
    RescheduleRequest,
    TaskMetadataKnown,
    Tick,
)
from .model import Host, HostType, Peer, Task
from .state import PeerState, PeerTrigger, TaskState, TaskTrigger

__all__ = [
    "Action",
    "AnnounceHost",
    "BackToSource",
    "Clock",
    "Evaluator",
    "Event",
    "FailPeer",
    "ForwardDigests",
    "ForwardTaskInfo",
    "Host",
    "HostHeartbeat",
    "HostLeft",
    "HostRemoved",
    "HostType",
    "InvalidEvent",
    "InvalidTransition",
    "InvariantViolation",
    "ParentCandidate",
    "Peer",
    "PeerFailed",
    "PeerFinished",
    "PeerLeft",
    "PeerState",
    "PeerTrigger",
    "PieceFailed",
    "PieceFinished",
    "PushParents",
    "RegisterPeer",
    "RescheduleRequest",
    "SchedulerConfig",
    "SchedulerCore",
    "SchedulerError",
    "SimpleEvaluator",
    "Task",
    "TaskMetadataKnown",
    "TaskState",
    "TaskTrigger",
    "Tick",
    "TriggerSeed",
    "UnknownHost",
    "UnknownPeer",
]
