"""The manager's wire protocol: the ``mgr.*`` message types and the manager's error codes.

Rules of this file:

* ``protocol.md`` ("Manager protocol (mgr.*)", §17) documents every type; the two must agree.
* Every field has a bound. What the codec cannot check (an IP address, a hostname's characters, a
  setting's range) the manager checks in ``fabric.py`` and answers ``MgrErrorCode.BAD_VALUE``; a daemon or
  scheduler checks the settings it is pushed the same way (``agent.py``) and ignores a bad one.
* A session is one registration: ``mgr.register`` binds the session to one scheduler or seed-peer
  instance, and ``mgr.keepalive`` on it keeps that instance active. ``mgr.list_schedulers`` binds the
  session to the scheduler cluster it was answered with, for ``mgr.config`` pushes.
* This file does no I/O.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta

from ..broker import U16, U32, U63, Catalogue, Kind, Message, Name

MAX_SCHEDULERS = 256
"""Most schedulers in one ``mgr.schedulers`` reply."""
MAX_CONFIG_KEYS = 64
"""Most settings in one ``mgr.config`` (or in the ``config`` of a reply)."""

Hostname = Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")]
"""A host name as the REST API takes it: letters, digits, ``.``, ``_``, ``-``."""
Address = Annotated[str, Meta(min_length=1, max_length=64)]
"""An IPv4 or IPv6 address (checked by the manager)."""
Scope = Annotated[str, Meta(max_length=1024)]
"""An IDC or a ``|``-separated location."""
ConfigKey = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]
ConfigValue = bool | int | float | Annotated[str, Meta(max_length=256)]
Settings = Annotated[dict[ConfigKey, ConfigValue], Meta(max_length=MAX_CONFIG_KEYS)]
"""Settings by name: a snapshot of every dynamic setting that applies (absent: the process's own value)."""
InstanceKind = Literal["scheduler", "seed_peer"]


class MgrErrorCode(IntEnum):
    """Error codes of the manager (range 1400-1499), in ``error`` replies."""

    NOT_REGISTERED = 1400  # keepalive on a session that has not registered (or the manager forgot it): register
    UNKNOWN_CLUSTER = 1401  # the cluster named (or the id given) does not exist; no default cluster to fall back to
    BAD_VALUE = 1402  # a field the codec cannot check is wrong (ip not an address, ...): the reason says which
    STORE_FAILED = 1403  # the database could not be written or read: try again later


# --- nested records ---------------------------------------------------------------------------------------


class MgrScheduler(msgspec.Struct, kw_only=True):
    """One active scheduler of a cluster: where its fabric endpoint is."""

    id: U63
    hostname: Name
    ip: Address
    port: U16
    endpoint: Annotated[str, Meta(max_length=300)]
    """``tcp://IP:PORT`` (``tcp://[IP]:PORT`` for IPv6): what a daemon connects to and hashes (§14.9)."""
    idc: Scope = ""
    location: Scope = ""


# --- requests and their replies ------------------------------------------------------------------------


class MgrRegister(Message, tag="mgr.register"):
    """A scheduler or a seed peer registers; answered by :class:`MgrRegistered`. The instance is named by
    ``hostname``, ``ip`` and its cluster (one instance per host and cluster); registering again (a new
    session, a restart) takes the same instance over and updates its values."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    kind: InstanceKind
    hostname: Hostname
    ip: Address
    port: Annotated[int, Meta(ge=1, le=0xFFFF)]
    """A scheduler's fabric port; a seed peer's piece-server port."""
    download_port: U16 = 0
    """A seed peer's download port (0: ``port``)."""
    cluster: Annotated[str, Meta(max_length=255)] = ""
    """The cluster's name (a scheduler cluster for a scheduler, a seed-peer cluster for a seed peer); empty: by
    ``cluster_id``, or the default cluster."""
    cluster_id: U63 = 0
    idc: Scope = ""
    location: Scope = ""
    seed_type: Literal["super", "strong", "weak"] = "super"


class MgrRegistered(Message, tag="mgr.registered"):
    """Reply to :class:`MgrRegister`: the instance's id, its cluster, how often to keep alive, and the
    dynamic settings that apply to it now (a scheduler's: its cluster's scheduling settings and the
    ``scheduler`` dynamic configs; a seed peer's: the ``daemon`` dynamic configs)."""

    KIND: ClassVar[Kind] = Kind.REPLY
    instance_id: U63
    cluster_id: U63
    cluster: Name
    keepalive_ms: Annotated[int, Meta(ge=10, le=3_600_000)]
    config: Settings = {}


class MgrKeepalive(Message, tag="mgr.keepalive"):
    """The registered instance of this session is alive; answered by :class:`MgrAlive`."""

    KIND: ClassVar[Kind] = Kind.REQUEST


class MgrAlive(Message, tag="mgr.alive"):
    """Reply to :class:`MgrKeepalive`."""

    KIND: ClassVar[Kind] = Kind.REPLY
    instance_id: U63


class MgrListSchedulers(Message, tag="mgr.list_schedulers"):
    """A daemon asks which scheduler cluster serves it; answered by :class:`MgrSchedulers`."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    host_id: Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[!-~]+$")]
    hostname: Annotated[str, Meta(max_length=255)]
    ip: Annotated[str, Meta(max_length=64)] = ""
    """The daemon's address (matched against the clusters' CIDRs when it is an IP address)."""
    idc: Scope = ""
    location: Scope = ""


MatchedBy = Literal["cidr", "hostname", "idc", "location", "default", "none"]


class MgrSchedulers(Message, tag="mgr.schedulers"):
    """Reply to :class:`MgrListSchedulers`: the cluster that serves the daemon (``matched_by`` says by which
    rule; ``none``: no cluster, ``cluster_id`` 0 and no schedulers), its active schedulers, the dynamic
    settings of daemons of that cluster, and when to ask again."""

    KIND: ClassVar[Kind] = Kind.REPLY
    cluster_id: U63
    cluster: Annotated[str, Meta(max_length=255)]
    matched_by: MatchedBy
    schedulers: Annotated[list[MgrScheduler], Meta(max_length=MAX_SCHEDULERS)] = []
    config: Settings = {}
    refresh_ms: Annotated[int, Meta(ge=100, le=86_400_000)] = 30_000


# --- server pushes ----------------------------------------------------------------------------------------


class MgrConfig(Message, tag="mgr.config"):
    """The dynamic settings of the receiving session changed: a whole snapshot (``target`` ``scheduler`` to a
    registered scheduler, ``daemon`` to a daemon or seed peer); a setting absent from it returns to the
    process's own value."""

    KIND: ClassVar[Kind] = Kind.SERVER_PUSH
    target: Literal["scheduler", "daemon"]
    config: Settings
    serial: U32 = 0
    """Grows with every push to this session (pushes arrive in order; informational)."""


MGR_TYPES: tuple[type[Message], ...] = (
    MgrRegister,
    MgrRegistered,
    MgrKeepalive,
    MgrAlive,
    MgrListSchedulers,
    MgrSchedulers,
    MgrConfig,
)

MGR_CATALOGUE = Catalogue(MGR_TYPES, max_payload=0)
"""The manager's catalogue: no ``mgr.*`` type carries payload frames, so none is accepted."""
