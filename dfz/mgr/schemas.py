"""What the REST API accepts and returns: one ``…Create``, ``…Update``, ``…Read`` and ``…Filter`` model per
resource, validated by pydantic before anything reaches the database.

Rules: every field has a type, a bound and a reason to exist; unknown fields are refused (``extra=forbid``)
so a typo is a 422, not a silently ignored setting; ``…Update`` models are partial (only the fields sent
change) and refuse ``null`` for a field that cannot be empty; ``…Filter`` models are the list endpoints'
query strings (pagination included), so an unknown filter is a 422 too.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from .security import PERMISSION_GROUPS, valid_permission

T = TypeVar("T")

# --- field types ------------------------------------------------------------------------------------------

Name = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
"""A resource's name: letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit."""
ShortName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
Bio = Annotated[str, StringConstraints(max_length=1024)]
Hostname = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")]
Idc = Annotated[str, StringConstraints(max_length=1024)]
Location = Annotated[str, StringConstraints(max_length=1024)]
"""``|``-separated, from the widest to the narrowest: ``country|region|zone``."""
Port = Annotated[int, Field(ge=1, le=65535)]
Id = Annotated[int, Field(ge=1, le=2**63 - 1)]
Label = Annotated[str, StringConstraints(max_length=64)]


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None


def _cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ValueError(f"{value!r} is not a CIDR such as 10.0.0.0/8 or fd00::/8") from None


def _pattern(value: str) -> str:
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"{value!r} is not a regular expression: {e}") from None
    return value


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    return value


def _email(value: str) -> str:
    if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", value):
        raise ValueError(f"{value!r} is not an e-mail address")
    return value.lower()


def _permission(value: str) -> str:
    if not valid_permission(value):
        raise ValueError(
            f"{value!r} is not a permission: use '*', a group, or group:read / group:write "
            f"(groups: {', '.join(PERMISSION_GROUPS)})"
        )
    return value


def _unique(values: list[Any]) -> list[Any]:
    if len(set(values)) != len(values):
        raise ValueError("has duplicates")
    return values


IP = Annotated[str, StringConstraints(max_length=64), AfterValidator(_ip)]
CIDR = Annotated[str, StringConstraints(max_length=64), AfterValidator(_cidr)]
HostnamePattern = Annotated[str, StringConstraints(min_length=1, max_length=255), AfterValidator(_pattern)]
HttpUrl = Annotated[str, StringConstraints(max_length=1024), AfterValidator(_http_url)]
Email = Annotated[str, StringConstraints(max_length=255), AfterValidator(_email)]
Permission = Annotated[str, StringConstraints(max_length=64), AfterValidator(_permission)]
IdList = Annotated[list[Id], Field(max_length=1000), AfterValidator(_unique)]
Password = Annotated[str, StringConstraints(min_length=8, max_length=256)]
InstanceState = Literal["active", "inactive"]
EnabledState = Literal["enabled", "disabled"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Partial(Strict):
    """An update: only the fields sent change. ``null`` is refused except for the fields in ``NULLABLE``."""

    NULLABLE: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="after")
    def _no_null(self) -> Partial:
        for name in self.model_fields_set:
            if getattr(self, name) is None and name not in self.NULLABLE:
                raise ValueError(f"{name} cannot be null (leave it out to keep its value)")
        return self

    def changes(self) -> dict[str, Any]:
        """The fields sent, as plain values (nested models as dicts)."""
        return self.model_dump(include=set(self.model_fields_set))


class Read(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ListQuery(Strict):
    """Pagination, common to every list: ``page`` from 1, ``per_page`` items (at most 1000)."""

    page: int = Field(default=1, ge=1, le=1_000_000)
    per_page: int = Field(default=50, ge=1, le=1000)


class Page(BaseModel, Generic[T]):
    """One page of a list: ``items`` in id order, and the ``total`` number that match the filters."""

    items: list[T]
    total: int
    page: int
    per_page: int


class Problem(BaseModel):
    """An error: ``detail`` says what is wrong and what to do."""

    detail: str


# --- scheduler clusters ----------------------------------------------------------------------------------


def _scheduler_defaults() -> Any:
    from ..sched.config import SchedulerConfig

    return SchedulerConfig()


_SCHED = _scheduler_defaults()


class SchedulingConfig(Strict):
    """The scheduler settings of a cluster's schedulers (the fields of ``dfz.sched.config.SchedulerConfig``
    that are per cluster): how parents are ranked and how many are looked at and pushed."""

    evaluator: Literal["multi_feature", "simple", "random"] = _SCHED.evaluator
    candidate_parent_limit: int = Field(default=_SCHED.candidate_parent_limit, ge=1, le=64)
    candidate_parent_sample: int = Field(default=_SCHED.candidate_parent_sample, ge=1, le=10_000)
    load_weight: float = Field(default=_SCHED.load_weight, ge=0, le=1000)
    idc_weight: float = Field(default=_SCHED.idc_weight, ge=0, le=1000)
    location_weight: float = Field(default=_SCHED.location_weight, ge=0, le=1000)
    host_type_weight: float = Field(default=_SCHED.host_type_weight, ge=0, le=1000)
    progress_weight: float = Field(default=_SCHED.progress_weight, ge=0, le=1000)
    reliability_weight: float = Field(default=_SCHED.reliability_weight, ge=0, le=1000)
    seed_fanout: float = Field(default=_SCHED.seed_fanout, ge=0, le=1000)

    @model_validator(mode="after")
    def _as_scheduler_config(self) -> SchedulingConfig:
        from ..sched.config import SchedulerConfig

        SchedulerConfig(**self.model_dump())  # the scheduler's own rules (sample >= limit, a positive weight)
        return self


class ClusterScopes(Strict):
    """Which daemons a scheduler cluster serves: by IDC (``|``-separated alternatives), location (prefix),
    network (CIDRs) and hostname (regular expressions). Empty scopes match nothing; the default cluster
    serves the daemons no cluster matches."""

    idc: Idc = ""
    location: Location = ""
    cidrs: Annotated[list[CIDR], Field(max_length=1000)] = []
    hostnames: Annotated[list[HostnamePattern], Field(max_length=1000)] = []


class SchedulerClusterCreate(Strict):
    name: Name
    bio: Bio = ""
    scheduling: SchedulingConfig = SchedulingConfig()
    scopes: ClusterScopes = ClusterScopes()
    is_default: bool = False


class SchedulerClusterUpdate(Partial):
    name: Name | None = None
    bio: Bio | None = None
    scheduling: SchedulingConfig | None = None
    scopes: ClusterScopes | None = None
    is_default: bool | None = None


class SchedulerClusterRead(Read):
    id: int
    name: str
    bio: str
    scheduling: dict[str, Any]
    scopes: dict[str, Any]
    is_default: bool
    seed_peer_cluster_ids: list[int] = []
    created_at: dt.datetime
    updated_at: dt.datetime


class SchedulerClusterFilter(ListQuery):
    name: Name | None = None
    is_default: bool | None = None


# --- seed-peer clusters ------------------------------------------------------------------------------------


class SeedPeerClusterConfig(Strict):
    load_limit: int = Field(default=300, ge=1, le=100_000)
    """Children a seed peer of the cluster serves at once."""


class SeedPeerClusterCreate(Strict):
    name: Name
    bio: Bio = ""
    config: SeedPeerClusterConfig = SeedPeerClusterConfig()
    scheduler_cluster_ids: IdList = []


class SeedPeerClusterUpdate(Partial):
    name: Name | None = None
    bio: Bio | None = None
    config: SeedPeerClusterConfig | None = None
    scheduler_cluster_ids: IdList | None = None


class SeedPeerClusterRead(Read):
    id: int
    name: str
    bio: str
    config: dict[str, Any]
    scheduler_cluster_ids: list[int] = []
    created_at: dt.datetime
    updated_at: dt.datetime


class SeedPeerClusterFilter(ListQuery):
    name: Name | None = None
    scheduler_cluster_id: Id | None = None


# --- schedulers and seed peers ------------------------------------------------------------------------------

SchedulerFeature = Literal["schedule", "preheat"]


class SchedulerCreate(Strict):
    hostname: Hostname
    ip: IP
    port: Port
    idc: Idc = ""
    location: Location = ""
    features: Annotated[list[SchedulerFeature], AfterValidator(_unique)] = ["schedule", "preheat"]
    scheduler_cluster_id: Id
    state: InstanceState = "inactive"


class SchedulerUpdate(Partial):
    hostname: Hostname | None = None
    ip: IP | None = None
    port: Port | None = None
    idc: Idc | None = None
    location: Location | None = None
    features: Annotated[list[SchedulerFeature], AfterValidator(_unique)] | None = None
    scheduler_cluster_id: Id | None = None
    state: InstanceState | None = None


class SchedulerRead(Read):
    id: int
    hostname: str
    ip: str
    port: int
    idc: str
    location: str
    features: list[str]
    scheduler_cluster_id: int
    state: str
    last_keepalive_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime


class SchedulerFilter(ListQuery):
    hostname: Hostname | None = None
    ip: IP | None = None
    idc: Idc | None = None
    state: InstanceState | None = None
    scheduler_cluster_id: Id | None = None


SeedPeerType = Literal["super", "strong", "weak"]


class SeedPeerCreate(Strict):
    hostname: Hostname
    type: SeedPeerType = "super"
    ip: IP
    port: Port
    download_port: Port
    idc: Idc = ""
    location: Location = ""
    seed_peer_cluster_id: Id
    state: InstanceState = "inactive"


class SeedPeerUpdate(Partial):
    hostname: Hostname | None = None
    type: SeedPeerType | None = None
    ip: IP | None = None
    port: Port | None = None
    download_port: Port | None = None
    idc: Idc | None = None
    location: Location | None = None
    seed_peer_cluster_id: Id | None = None
    state: InstanceState | None = None


class SeedPeerRead(Read):
    id: int
    hostname: str
    type: str
    ip: str
    port: int
    download_port: int
    idc: str
    location: str
    seed_peer_cluster_id: int
    state: str
    last_keepalive_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime


class SeedPeerFilter(ListQuery):
    hostname: Hostname | None = None
    ip: IP | None = None
    type: SeedPeerType | None = None
    state: InstanceState | None = None
    seed_peer_cluster_id: Id | None = None


# --- hosts (registered daemons) -------------------------------------------------------------------------------

HostType = Literal["normal", "super", "strong", "weak"]
HostId = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]


class HostCreate(Strict):
    host_id: HostId
    hostname: Hostname
    ip: IP
    port: Port
    download_port: Annotated[int, Field(ge=0, le=65535)] = 0
    type: HostType = "normal"
    idc: Idc = ""
    location: Location = ""
    os: Label = ""
    platform: Label = ""
    arch: Label = ""
    state: InstanceState = "inactive"
    tenant_id: Id | None = None
    scheduler_cluster_id: Id | None = None


class HostUpdate(Partial):
    NULLABLE: ClassVar[frozenset[str]] = frozenset({"tenant_id", "scheduler_cluster_id"})
    hostname: Hostname | None = None
    ip: IP | None = None
    port: Port | None = None
    download_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    type: HostType | None = None
    idc: Idc | None = None
    location: Location | None = None
    os: Label | None = None
    platform: Label | None = None
    arch: Label | None = None
    state: InstanceState | None = None
    tenant_id: Id | None = None
    scheduler_cluster_id: Id | None = None


class HostRead(Read):
    id: int
    host_id: str
    hostname: str
    ip: str
    port: int
    download_port: int
    type: str
    idc: str
    location: str
    os: str
    platform: str
    arch: str
    state: str
    tenant_id: int | None
    scheduler_cluster_id: int | None
    last_keepalive_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime


class HostFilter(ListQuery):
    host_id: HostId | None = None
    hostname: Hostname | None = None
    ip: IP | None = None
    idc: Idc | None = None
    type: HostType | None = None
    state: InstanceState | None = None
    tenant_id: Id | None = None
    scheduler_cluster_id: Id | None = None


# --- tenants, roles, users, tokens ---------------------------------------------------------------------------


class TenantCreate(Strict):
    name: Name
    bio: Bio = ""
    state: EnabledState = "enabled"


class TenantUpdate(Partial):
    name: Name | None = None
    bio: Bio | None = None
    state: EnabledState | None = None


class TenantRead(Read):
    id: int
    name: str
    bio: str
    state: str
    created_at: dt.datetime
    updated_at: dt.datetime


class TenantFilter(ListQuery):
    name: Name | None = None
    state: EnabledState | None = None


Permissions = Annotated[list[Permission], Field(max_length=64), AfterValidator(_unique)]


class RoleCreate(Strict):
    name: ShortName
    bio: Bio = ""
    permissions: Permissions


class RoleUpdate(Partial):
    name: ShortName | None = None
    bio: Bio | None = None
    permissions: Permissions | None = None


class RoleRead(Read):
    id: int
    name: str
    bio: str
    permissions: list[str]
    builtin: bool
    created_at: dt.datetime
    updated_at: dt.datetime


class RoleFilter(ListQuery):
    name: ShortName | None = None
    builtin: bool | None = None


class UserCreate(Strict):
    name: ShortName
    email: Email | None = None
    bio: Bio = ""
    password: Password
    role_id: Id
    tenant_id: Id | None = None
    state: EnabledState = "enabled"


class UserUpdate(Partial):
    NULLABLE: ClassVar[frozenset[str]] = frozenset({"email", "tenant_id"})
    name: ShortName | None = None
    email: Email | None = None
    bio: Bio | None = None
    password: Password | None = None
    role_id: Id | None = None
    tenant_id: Id | None = None
    state: EnabledState | None = None


class UserRead(Read):
    id: int
    name: str
    email: str | None
    bio: str
    state: str
    role_id: int
    tenant_id: int | None
    last_sign_in_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime


class UserFilter(ListQuery):
    name: ShortName | None = None
    email: Email | None = None
    state: EnabledState | None = None
    role_id: Id | None = None
    tenant_id: Id | None = None


class PasswordChange(Strict):
    current_password: Annotated[str, StringConstraints(max_length=256)]
    new_password: Password


class SignIn(Strict):
    name: ShortName
    password: Annotated[str, StringConstraints(min_length=1, max_length=256)]


class SignedIn(BaseModel):
    user: UserRead
    expires_at: dt.datetime


class MyPermissions(BaseModel):
    """What the caller may do: its role's permissions and, through a token, the token's scopes (both must
    allow an action). The console shows what these allow; the API enforces them on every request."""

    user_id: int
    name: str
    role: str
    permissions: list[str]
    scopes: list[str] | None
    tenant_id: int | None
    confined: bool
    via: str
    groups: dict[str, str]
    """Every permission group and what it covers (for choosing a token's scopes)."""


TOKEN_MAX_DAYS = 366
TokenState = Literal["active", "expired", "revoked"]


class TokenCreate(Strict):
    name: Name
    bio: Bio = ""
    scopes: Annotated[Permissions, Field(min_length=1)]
    expires_at: dt.datetime | None = None
    """When it stops working (timezone-aware, within a year); default: in 30 days."""

    @model_validator(mode="after")
    def _expiry(self) -> TokenCreate:
        check_expiry(self.expires_at)
        return self


def check_expiry(expires_at: dt.datetime | None) -> None:
    """A token's expiry: timezone-aware, in the future, within :data:`TOKEN_MAX_DAYS`."""
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise ValueError("expires_at needs a timezone, e.g. 2030-01-01T00:00:00Z")
        now = dt.datetime.now(dt.UTC)
        if expires_at <= now:
            raise ValueError("expires_at is in the past")
        if expires_at > now + dt.timedelta(days=TOKEN_MAX_DAYS):
            raise ValueError(f"expires_at is more than {TOKEN_MAX_DAYS} days away")


class TokenUpdate(Partial):
    name: Name | None = None
    bio: Bio | None = None


class TokenRead(Read):
    id: int
    name: str
    bio: str
    prefix: str
    scopes: list[str]
    user_id: int
    state: TokenState
    expires_at: dt.datetime
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime


class TokenCreated(TokenRead):
    token: str
    """The secret: shown this once, never again (only its digest is kept)."""


class TokenFilter(ListQuery):
    name: Name | None = None
    user_id: Id | None = None
    state: TokenState | None = None


# --- daemon tokens ----------------------------------------------------------------------------------------------

DAEMON_TOKEN_DAYS = 365
"""A daemon token's default lifetime."""


class DaemonTokenCreate(Strict):
    name: Name
    bio: Bio = ""
    tenant_id: Id | None = None
    """The tenant the daemons configured with it join (a tenant admin's own when left out; others must name one)."""
    expires_at: dt.datetime | None = None
    """When it stops working (timezone-aware, within a year); default: in 365 days."""

    @model_validator(mode="after")
    def _expiry(self) -> DaemonTokenCreate:
        check_expiry(self.expires_at)
        return self


class DaemonTokenUpdate(Partial):
    name: Name | None = None
    bio: Bio | None = None


class DaemonTokenRead(Read):
    id: int
    name: str
    bio: str
    prefix: str
    tenant_id: int
    user_id: int | None
    state: TokenState
    expires_at: dt.datetime
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime


class DaemonTokenCreated(DaemonTokenRead):
    token: str
    """The secret, for ``dfz daemon --tenant-token`` (or ``$DFZ_TENANT_TOKEN``): shown this once, never again."""


class DaemonTokenFilter(ListQuery):
    name: Name | None = None
    tenant_id: Id | None = None
    state: TokenState | None = None


# --- applications ---------------------------------------------------------------------------------------------


class ApplicationCreate(Strict):
    name: Name
    url: HttpUrl | Literal[""] = ""
    bio: Bio = ""
    priority: int = Field(default=0, ge=0, le=6)
    """Download priority, 0 (lowest) to 6, as Dragonfly's levels."""
    tenant_id: Id | None = None


class ApplicationUpdate(Partial):
    NULLABLE: ClassVar[frozenset[str]] = frozenset({"tenant_id"})
    name: Name | None = None
    url: HttpUrl | Literal[""] | None = None
    bio: Bio | None = None
    priority: int | None = Field(default=None, ge=0, le=6)
    tenant_id: Id | None = None


class ApplicationRead(Read):
    id: int
    name: str
    url: str
    bio: str
    priority: int
    user_id: int | None
    tenant_id: int | None
    created_at: dt.datetime
    updated_at: dt.datetime


class ApplicationFilter(ListQuery):
    name: Name | None = None
    user_id: Id | None = None
    tenant_id: Id | None = None


# --- jobs -----------------------------------------------------------------------------------------------------

JobType = Literal["preheat", "get_task", "delete_task"]
JobState = Literal["pending", "running", "succeeded", "failed", "cancelled"]
Header = Annotated[str, StringConstraints(max_length=8192)]

NS_PER_SECOND = 1_000_000_000
MAX_JOB_TIMEOUT_NS = 24 * 3600 * NS_PER_SECOND


def _timeout_ns(value: int) -> int:
    if not NS_PER_SECOND <= value <= MAX_JOB_TIMEOUT_NS:
        hint = f" (did you mean {value} s = {value * NS_PER_SECOND}?)" if 1 <= value <= 86400 else ""
        raise ValueError(
            f"timeout is in nanoseconds (Go's time.Duration, as Dragonfly takes it): from {NS_PER_SECOND} (1 s) "
            f"to {MAX_JOB_TIMEOUT_NS} (24 h), got {value}{hint}"
        )
    return value


TimeoutNs = Annotated[
    int, Field(strict=True, description="Nanoseconds (Go's time.Duration), 1 s to 24 h"), AfterValidator(_timeout_ns)
]
"""A job's timeout in nanoseconds (Dragonfly's ``time.Duration``): 1 s to 24 h."""


class PreheatArgs(Strict):
    """A preheat's arguments, the shape of Dragonfly's ``POST /oapi/v1/jobs`` ``args``."""

    type: Literal["file", "image"]
    url: HttpUrl | None = None
    urls: Annotated[list[HttpUrl], Field(max_length=1000)] = []
    scope: Literal["single_seed_peer", "all_seed_peers", "all_peers"] = "single_seed_peer"
    ips: Annotated[list[IP], Field(max_length=10_000)] = []
    count: int | None = Field(default=None, ge=1, le=1_000_000)
    percentage: int | None = Field(default=None, ge=1, le=100)
    headers: Annotated[dict[Annotated[str, StringConstraints(min_length=1, max_length=256)], Header], Field(max_length=100)] = {}
    username: Annotated[str, StringConstraints(max_length=256)] = ""
    password: Annotated[str, StringConstraints(max_length=4096)] = ""
    platform: Annotated[str, StringConstraints(max_length=64, pattern=r"^$|^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$")] = ""
    tag: Annotated[str, StringConstraints(max_length=1024)] = ""
    application: Annotated[str, StringConstraints(max_length=1024)] = ""
    filtered_query_params: Annotated[str, StringConstraints(max_length=4096)] = ""
    piece_length: int | None = Field(default=None, ge=65536, le=64 * 1024 * 1024)
    timeout: TimeoutNs | None = None
    """Nanoseconds (Go's ``time.Duration``); none: the manager's default (an hour)."""

    @model_validator(mode="after")
    def _targets(self) -> PreheatArgs:
        if self.url is None and not self.urls:
            raise ValueError("give url or urls")
        if self.url is not None and self.urls:
            raise ValueError("give url or urls, not both")
        if self.type == "image" and self.urls:
            raise ValueError("an image preheat takes one url (the manifest)")
        chosen = [name for name in ("ips", "count", "percentage") if getattr(self, name)]
        if len(chosen) > 1:
            raise ValueError(f"{' and '.join(chosen)} exclude each other: give one")
        if chosen and self.scope == "single_seed_peer":
            raise ValueError(f"{chosen[0]} needs scope all_seed_peers or all_peers")
        if self.piece_length is not None and self.piece_length & (self.piece_length - 1):
            raise ValueError("piece_length must be a power of two")
        return self


class TaskArgs(Strict):
    """Which task a ``get_task`` or ``delete_task`` job is about (Dragonfly's ``GetTaskArgs`` and
    ``DeleteTaskArgs``): its id, or the URL and what identifies the task with it (tag, application, filtered
    query parameters, a fixed piece length), from which the manager computes the id as a daemon does
    (``dfz/tasks.py``), or (dfz's own) a registry blob's ``digest``: the task named by it (§13), as the
    registry mirror and an image preheat download the blob."""

    task_id: Annotated[str, StringConstraints(pattern=r"^$|^[0-9a-f]{64}$")] = ""
    """64 lowercase hex digits (``protocol.md`` §13)."""
    url: HttpUrl | None = None
    digest: Annotated[str, StringConstraints(pattern=r"^$|^sha256:[0-9a-f]{64}$")] = ""
    """``sha256:<64 lowercase hex>``: the task named by this digest (with ``tag``, ``application`` and
    ``piece_length``; ``filtered_query_params`` does not apply)."""
    tag: Annotated[str, StringConstraints(max_length=1024)] = ""
    application: Annotated[str, StringConstraints(max_length=1024)] = ""
    filtered_query_params: Annotated[str, StringConstraints(max_length=4096)] = ""
    """``&``-separated query parameter names left out of the task id; empty: the defaults."""
    piece_length: int | None = Field(default=None, ge=65536, le=64 * 1024 * 1024)
    timeout: TimeoutNs | None = None
    """Nanoseconds; none: the manager's default (a minute)."""

    @model_validator(mode="after")
    def _target(self) -> TaskArgs:
        given = [name for name in ("task_id", "url", "digest") if getattr(self, name)]
        if not given:
            raise ValueError("give task_id or url (or a blob's digest)")
        if len(given) > 1:
            raise ValueError(f"give task_id or url (or a blob's digest), not both: {' and '.join(given)} given")
        if self.digest and self.filtered_query_params:
            raise ValueError("filtered_query_params is for a url: a task named by its digest has no query")
        if self.piece_length is not None and self.piece_length & (self.piece_length - 1):
            raise ValueError("piece_length must be a power of two")
        return self

    def the_task_id(self) -> str:
        """The task's id: given, or computed from the URL or the digest like a daemon computes it."""
        if self.task_id:
            return self.task_id
        from ..tasks import DEFAULT_FILTERED_QUERY_PARAMS, digest_task_id, task_id

        if self.digest:
            return digest_task_id(self.digest, tag=self.tag, application=self.application, piece_length=self.piece_length)

        assert self.url is not None
        names = [n.strip() for n in self.filtered_query_params.split("&") if n.strip()]
        return task_id(
            str(self.url),
            tag=self.tag,
            application=self.application,
            piece_length=self.piece_length,
            filtered_query_params=names[:64] or DEFAULT_FILTERED_QUERY_PARAMS,  # as a preheat's (jobs._filters)
        )


class TaskIdQuery(Strict):
    """A URL and what identifies a task with it, for ``GET /api/v1/task-id``."""

    url: HttpUrl
    tag: Annotated[str, StringConstraints(max_length=1024)] = ""
    application: Annotated[str, StringConstraints(max_length=1024)] = ""
    filtered_query_params: Annotated[str, StringConstraints(max_length=4096)] = ""
    piece_length: int | None = Field(default=None, ge=65536, le=64 * 1024 * 1024)

    def args(self) -> TaskArgs:
        return TaskArgs.model_validate(self.model_dump(mode="json", exclude_defaults=True))


class TaskIdRead(BaseModel):
    task_id: str
    url: str


JOB_ARGS: dict[str, type[Strict]] = {"preheat": PreheatArgs, "get_task": TaskArgs, "delete_task": TaskArgs}


class JobCreate(Strict):
    type: JobType
    args: dict[str, Any] = Field(
        description="A preheat's: type (file, image), url or urls, scope, ips/count/percentage, headers, username, "
        "password (sealed at rest, shown as ***), platform, tag, application, filtered_query_params, piece_length, "
        "timeout. A get_task's or delete_task's: task_id, or url with tag, application, filtered_query_params and "
        "piece_length, or a registry blob's digest (sha256:HEX, the task an image preheat and the registry mirror "
        "name by it) with tag, application and piece_length; timeout. timeout is in nanoseconds (Go's time.Duration, "
        "as Dragonfly): 1 s to 24 h."
    )
    bio: Bio = ""
    scheduler_cluster_ids: IdList = []
    """Clusters to run in; none: every scheduler cluster."""

    @model_validator(mode="after")
    def _args(self) -> JobCreate:
        self.args = JOB_ARGS[self.type].model_validate(self.args).model_dump(mode="json", exclude_defaults=True)
        return self


class JobUpdate(Partial):
    bio: Bio | None = None


class JobRead(Read):
    id: int
    type: str
    state: str
    bio: str
    args: dict[str, Any]
    result: dict[str, Any]
    error: str
    user_id: int | None
    tenant_id: int | None
    scheduler_cluster_ids: list[int] = []
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime


class JobFilter(ListQuery):
    type: JobType | None = None
    state: JobState | None = None
    user_id: Id | None = None
    scheduler_cluster_id: Id | None = None


# --- dynamic configs ------------------------------------------------------------------------------------------

ConfigTarget = Literal["scheduler", "daemon"]


class DaemonDynamicConfig(Strict):
    """What a daemon (and a seed peer) takes without a restart."""

    upload_slots: int | None = Field(default=None, ge=1, le=65535)
    upload_rate_limit: int | None = Field(default=None, ge=0, le=1 << 62)
    """Bytes/s to children over all tasks; 0: unlimited."""
    download_rate_limit: int | None = Field(default=None, ge=0, le=1 << 62)
    """Bytes/s from parents over all downloads; 0: unlimited."""


def _scheduler_dynamic(value: dict[str, Any]) -> dict[str, Any]:
    """A scheduler's dynamic settings: any fields of ``SchedulerConfig`` (checked by its own rules)."""
    from dataclasses import fields

    from ..sched.config import SchedulerConfig

    known = {f.name for f in fields(SchedulerConfig)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown scheduler settings {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    try:
        SchedulerConfig(**value)
    except (TypeError, ValueError) as e:
        raise ValueError(str(e)) from None
    return value


class DynamicConfigCreate(Strict):
    name: Name
    bio: Bio = ""
    target: ConfigTarget
    scheduler_cluster_id: Id | None = None
    """Only the processes of this cluster take it; none: all."""
    value: dict[str, Any]

    @model_validator(mode="after")
    def _value(self) -> DynamicConfigCreate:
        self.value = check_config_value(self.target, self.value)
        return self


def check_config_value(target: str, value: dict[str, Any]) -> dict[str, Any]:
    """``value`` checked for ``target`` (ValueError saying what is wrong)."""
    if target == "daemon":
        return DaemonDynamicConfig.model_validate(value).model_dump(exclude_none=True)
    return _scheduler_dynamic(value)


class DynamicConfigUpdate(Partial):
    NULLABLE: ClassVar[frozenset[str]] = frozenset({"scheduler_cluster_id"})
    name: Name | None = None
    bio: Bio | None = None
    scheduler_cluster_id: Id | None = None
    value: dict[str, Any] | None = None


class DynamicConfigRead(Read):
    id: int
    name: str
    bio: str
    target: str
    scheduler_cluster_id: int | None
    value: dict[str, Any]
    version: int
    created_at: dt.datetime
    updated_at: dt.datetime


class DynamicConfigFilter(ListQuery):
    name: Name | None = None
    target: ConfigTarget | None = None
    scheduler_cluster_id: Id | None = None


# --- audit log ------------------------------------------------------------------------------------------------


class AuditLogRead(Read):
    id: int
    at: dt.datetime
    actor_user_id: int | None
    actor_name: str
    via: str
    token_id: int | None
    action: str
    resource_type: str
    resource_id: str
    changes: dict[str, Any]
    ip: str


class AuditLogFilter(ListQuery):
    actor_user_id: Id | None = None
    action: Annotated[str, StringConstraints(max_length=32)] | None = None
    resource_type: Annotated[str, StringConstraints(max_length=64)] | None = None
    resource_id: Annotated[str, StringConstraints(max_length=64)] | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
