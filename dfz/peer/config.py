"""Settings of the peer daemon (``dfz daemon``, ``dfz seed``), with their defaults, in one place.

A TOML file holds the fields of :class:`DaemonConfig` as top-level keys (``data_dir``, ``scheduler``,
``listen``, ``upload_slots``, ...); command-line flags replace what the file says. Several schedulers are
``schedulers = ["tcp://...", ...]`` (or ``scheduler`` given a list); one is ``scheduler = "tcp://..."``; none,
with ``manager = "tcp://..."``, means the manager tells which ones. An unknown key, or a
value of the wrong type or range, is a :class:`ConfigError` whose message names the key and the file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import ConfigError as ConfigError  # re-exported: the error of this module's loader
from ..config import read_toml
from .proxy.rules import DEFAULT_CONNECT_ALLOW, ProxyPolicy, ProxyRule, RuleError, rules_from_config
from .source.hdfs import HDFSOptions
from .source.hf import HFOptions
from .source.oci import OCIOptions
from .source.s3 import S3Options

DEFAULT_SCHEDULER = "tcp://127.0.0.1:8002"
DEFAULT_LISTEN = "tcp://127.0.0.1:0"
"""The piece server binds loopback on a free port unless told otherwise (the fabric is unauthenticated)."""
IPC_PATH_LIMIT = 107
"""Longest ipc:// path ZeroMQ accepts (the size of ``sun_path``, less the terminating NUL)."""


@dataclass(frozen=True)
class DaemonConfig:
    """Settings of one daemon. Only ``data_dir`` has no default."""

    data_dir: Path
    """Where tasks are stored (``<data_dir>/tasks``), the host id kept, and the API socket made."""
    scheduler: str = ""
    """The scheduler's endpoint (``dfz sched`` prints it), when there is one; see :attr:`schedulers`. Empty
    and no :attr:`schedulers`: the manager's schedulers when :attr:`manager` is set, else
    ``tcp://127.0.0.1:8002``."""
    schedulers: tuple[str, ...] = ()
    """Several schedulers' endpoints; when given, :attr:`scheduler` is ignored. Each task goes to one of
    them by consistent hashing of its id (:mod:`dfz.peer.schedring`): every daemon of a cluster must list
    the same endpoint strings (in any order)."""
    manager: str = ""
    """The manager's fabric endpoint (``dfz mgr`` prints it). With no scheduler configured, the daemon asks
    it which schedulers serve it (and again now and then, and when they fail); in any case it takes the
    manager's dynamic settings (rate limits, upload slots) while running. A seed peer registers there too."""
    cluster: str = ""
    """A seed peer's seed-peer cluster at the manager (its name); empty: the manager's default one."""
    tenant_token: str = field(default="", repr=False)
    """A daemon token from the manager (``/api/v1/daemon-tokens``; ``--tenant-token`` or ``$DFZ_TENANT_TOKEN``): the
    daemon is in that token's tenant (its task ids, its swarms, who its piece server serves). Needs ``manager``.
    Empty: no tenant. A token the manager refuses stops the daemon; it never falls back to no tenant."""
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    """Endpoints of the piece server; the first tcp one is announced to the scheduler."""
    advertise_ip: str = ""
    """The address other peers reach the piece server at; empty: the host of the first tcp endpoint (or,
    when that is a wildcard, this machine's address by its host name)."""
    api: tuple[str, ...] = ()
    """Endpoints of the local API; empty: ``ipc://<data_dir>/api.sock`` (when the path fits)."""
    seed: bool = False
    """Announce as a seed host: the scheduler triggers it to fetch tasks nobody has."""
    host_id: str = ""
    """The host's stable id; empty: made once and kept in ``<data_dir>/host_id``."""
    idc: str = ""
    location: str = ""
    upload_slots: int = 32
    """Children served at once over all tasks."""
    metrics_listen: str = ""
    """``HOST:PORT`` to serve Prometheus metrics on (``GET /metrics``, ``dfz/metrics.py``); empty: none."""
    proxy_listen: str = ""
    """``HOST:PORT`` of the proxy port (the registry mirror and the HTTP proxy, :mod:`dfz.peer.proxy`; port 0:
    a free one); empty: none. It has no authentication: bind loopback, or a network you trust."""
    mirror_upstream: str = ""
    """The registry the mirror reads from when a request names none (no ``X-Dfz-Registry`` header, no
    ``?ns=``): ``http://HOST[:PORT]`` or ``https://HOST[:PORT]``; empty: such requests are refused (400)."""
    http_ca_bundle: str = ""
    """A PEM file of the CAs the back-to-source HTTPS client trusts instead of the system's (also for
    ``oci://``, ``hf://`` and ``hdfs://``, which are HTTP underneath); empty: the system's."""
    http_insecure: bool = False
    """Skip TLS verification of origins altogether (for tests; never with ``http_ca_bundle``)."""
    upload_rate_limit: int = 0
    """Bytes/s served to children over all tasks; 0 = unlimited."""
    download_rate_limit: int = 0
    """Bytes/s fetched from parents over all downloads; 0 = unlimited."""
    upload_capacity: int = 0
    """Upload bandwidth announced to the scheduler (bytes/s; 0 = unknown)."""
    origin_concurrency: int = 4
    """Range requests in flight to the origin per task when fetching back-to-source."""
    scheduler_wait: float = 10.0
    """Seconds a download waits for the scheduler session before it fails (``scheduler_unreachable``)."""
    register_timeout: float = 10.0
    """Seconds for the scheduler to answer ``sched.register_peer``."""
    report_interval: float = 0.1
    """Seconds piece reports are collected before they are sent in one ``sched.pieces``."""
    heartbeat: float = 1.0
    """Fabric heartbeat of the scheduler session (seconds); silent for ``heartbeat * 3``: reconnect."""
    direct_io: bool = True
    """Write piece data with ``O_DIRECT`` where the filesystem allows it (see :mod:`dfz.peer.storage`)."""
    piece_cache_bytes: int = 64 * 1024 * 1024
    """Memory for pieces kept to serve children (the ones that just landed, and the ones read)."""
    s3_endpoint: str = ""
    """``s3://`` origins: the S3 endpoint URL (``http://127.0.0.1:8333``, ``https://minio.example.com``); empty:
    AWS itself, or ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``."""
    s3_region: str = ""
    """The S3 region; empty: the profile's or ``$AWS_REGION``, else ``us-east-1``."""
    s3_addressing_style: str = "auto"
    """``auto``, ``path`` (``ENDPOINT/BUCKET/KEY``) or ``virtual`` (``BUCKET.ENDPOINT/KEY``)."""
    s3_profile: str = ""
    """A profile of the AWS shared config and credentials files; empty: ``$AWS_PROFILE`` or ``default``."""
    s3_access_key_id: str = ""
    """Explicit S3 credentials (with :attr:`s3_secret_access_key`); empty: the environment
    (``AWS_ACCESS_KEY_ID``, ...), then the profile's files, then instance roles; none found: unsigned requests."""
    s3_secret_access_key: str = field(default="", repr=False)
    """The secret of :attr:`s3_access_key_id` (never printed; keep the config file private)."""
    s3_session_token: str = field(default="", repr=False)
    """A session token for temporary credentials (with :attr:`s3_access_key_id`)."""
    oci_username: str = ""
    """``oci://`` origins: the registry user (with :attr:`oci_password`), for every registry; empty: the docker
    auth file :attr:`oci_auth_file`, per registry, else anonymous."""
    oci_password: str = field(default="", repr=False)
    """The password (or access token) of :attr:`oci_username` (never printed; keep the config file private)."""
    oci_auth_file: str = ""
    """A docker ``config.json`` with registry logins (``auths``); empty: ``$DOCKER_CONFIG/config.json``, else
    ``~/.docker/config.json`` when it exists."""
    oci_plain_http: tuple[str, ...] = ()
    """Registries (``host[:port]``) spoken to over plain HTTP; loopback ones always are."""
    hf_endpoint: str = ""
    """``hf://`` origins: the Hub's URL; empty: ``$HF_ENDPOINT``, else ``https://huggingface.co``."""
    hf_token: str = field(default="", repr=False)
    """The Hub token (sent as ``Authorization: Bearer``; never printed); empty: ``$HF_TOKEN``."""
    hdfs_user: str = ""
    """``hdfs://`` origins (WebHDFS): the user sent as ``user.name=``; empty: ``$HADOOP_USER_NAME``, else none."""
    hdfs_delegation_token: str = field(default="", repr=False)
    """A delegation token sent as ``delegation=`` (secure clusters; never printed)."""
    hdfs_https: bool = False
    """Speak WebHDFS over HTTPS (``swebhdfs``) rather than HTTP."""
    proxy_rules: tuple[ProxyRule, ...] = ()
    """The forward proxy's rules (``[[proxy_rules]]`` tables ``regex = "..."``, ``direct = false``; or
    ``--proxy-rule REGEX``): the first whose expression is found in a ``GET``'s URL decides, P2P unless
    ``direct``; a URL none matches passes through (:mod:`dfz.peer.proxy.rules`)."""
    proxy_connect_allow: str = DEFAULT_CONNECT_ALLOW
    """A regular expression the whole ``host:port`` of a ``CONNECT`` must match; default: any host, port 443."""
    proxy_intercept: tuple[str, ...] = ()
    """Hosts (regular expressions matching the whole name) whose ``CONNECT`` tunnels the proxy terminates
    with certificates of :attr:`proxy_ca_cert`, to apply the rules to the HTTPS requests inside."""
    proxy_ca_cert: str = ""
    """The operator's CA certificate (PEM) that signs the intercepted hosts' certificates; clients trust it."""
    proxy_ca_key: str = field(default="", repr=False)
    """The private key (unencrypted PEM) of :attr:`proxy_ca_cert` (keep the file private)."""

    def __post_init__(self) -> None:
        if not str(self.data_dir):
            raise ConfigError("data_dir: must be a directory name")
        if self.http_ca_bundle and self.http_insecure:
            raise ConfigError("http_ca_bundle and http_insecure exclude each other: a CA bundle is used to verify")
        if self.http_ca_bundle and not os.path.isfile(self.http_ca_bundle):
            raise ConfigError(f"http_ca_bundle: {self.http_ca_bundle!r} is not a file (give a PEM file of CA certificates)")
        if self.metrics_listen:
            from ..metrics import parse_listen

            try:
                parse_listen(self.metrics_listen)
            except ValueError as bad:
                raise ConfigError(str(bad)) from None
        if self.proxy_listen or self.mirror_upstream:
            from .proxy.mirror import parse_upstream
            from .proxy.server import parse_listen as parse_proxy_listen

            try:
                if self.proxy_listen:
                    parse_proxy_listen(self.proxy_listen)
                if self.mirror_upstream:
                    parse_upstream(self.mirror_upstream, "mirror_upstream")
            except ValueError as bad:
                raise ConfigError(str(bad)) from None
        if self.scheduler:
            _endpoint("scheduler", self.scheduler)
        if self.manager:
            _endpoint("manager", self.manager)
        if len(self.cluster) > 255:
            raise ConfigError("cluster: at most 255 characters")
        if self.tenant_token and not self.manager:
            raise ConfigError("tenant_token: the manager checks it: set manager (--manager) too")
        if len(self.tenant_token) > 256 or not all(0x21 <= ord(c) <= 0x7E for c in self.tenant_token):
            raise ConfigError("tenant_token: at most 256 visible ASCII characters (a token from /api/v1/daemon-tokens)")
        for e in self.schedulers:
            _endpoint("schedulers", e)
        if len(set(self.schedulers)) != len(self.schedulers):
            raise ConfigError(f"schedulers: an endpoint is listed twice in {list(self.schedulers)}")
        if not self.listen:
            raise ConfigError("listen: needs at least one endpoint")
        for e in self.listen:
            _endpoint("listen", e)
        for e in self.api:
            _endpoint("api", e)
        for key, low, high in (
            ("upload_slots", 1, 65535),
            ("upload_rate_limit", 0, 1 << 62),
            ("download_rate_limit", 0, 1 << 62),
            ("upload_capacity", 0, 1 << 62),
            ("origin_concurrency", 1, 64),
            ("piece_cache_bytes", 0, 1 << 40),
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{key}: must be an integer from {low} to {high}, got {value!r}")
        for key in ("scheduler_wait", "register_timeout", "report_interval", "heartbeat"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{key}: must be a positive number of seconds, got {value!r}")
        try:
            self.s3_options()
            self.oci_options()
            self.hf_options()
            self.hdfs_options()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        try:
            self.proxy_policy()
        except RuleError as e:
            raise ConfigError(str(e)) from None
        if self.proxy_intercept and not (self.proxy_ca_cert and self.proxy_ca_key):
            raise ConfigError("proxy_intercept: needs proxy_ca_cert and proxy_ca_key (the CA that signs the hosts' certificates)")
        if bool(self.proxy_ca_cert) != bool(self.proxy_ca_key):
            raise ConfigError("proxy_ca_cert and proxy_ca_key go together: give both PEM files")
        if self.proxy_ca_cert:
            from .proxy.intercept import CAError, CertificateAuthority

            try:
                CertificateAuthority.load(self.proxy_ca_cert, self.proxy_ca_key)
            except CAError as e:
                raise ConfigError(str(e)) from None
        if not self.proxy_listen:
            # Settings of the proxy port without the port are a mistake (a flag forgotten, a key misplaced):
            # said at start rather than ignored, as tenant_token without manager is.
            unused = [
                key
                for key, given in (
                    ("mirror_upstream", bool(self.mirror_upstream)),
                    ("proxy_rules", bool(self.proxy_rules)),
                    ("proxy_connect_allow", self.proxy_connect_allow != DEFAULT_CONNECT_ALLOW),
                    ("proxy_intercept", bool(self.proxy_intercept)),
                    ("proxy_ca_cert", bool(self.proxy_ca_cert)),
                    ("proxy_ca_key", bool(self.proxy_ca_key)),
                )
                if given
            ]
            if unused:
                raise ConfigError(
                    f"{', '.join(unused)}: settings of the proxy port, which is off: set proxy_listen (--proxy-listen "
                    "HOST:PORT) too, or remove them"
                )
        if self.host_id and (len(self.host_id) > 100 or not all(0x21 <= ord(c) <= 0x7E for c in self.host_id)):
            raise ConfigError(f"host_id: 1 to 100 visible ASCII characters without spaces, got {self.host_id!r}")

    def proxy_policy(self) -> ProxyPolicy:
        """The forward proxy's decisions (:class:`~dfz.peer.proxy.rules.ProxyPolicy`); raises ``RuleError``."""
        return ProxyPolicy(self.proxy_rules, self.proxy_connect_allow, self.proxy_intercept)

    def oci_options(self) -> OCIOptions:
        """The settings of the ``oci://`` source backend (:class:`~dfz.peer.source.oci.OCIOptions`)."""
        return OCIOptions(self.oci_username, self.oci_password, self.oci_auth_file, self.oci_plain_http)

    def hf_options(self) -> HFOptions:
        """The settings of the ``hf://`` source backend (:class:`~dfz.peer.source.hf.HFOptions`)."""
        return HFOptions(self.hf_endpoint, self.hf_token)

    def hdfs_options(self) -> HDFSOptions:
        """The settings of the ``hdfs://`` source backend (:class:`~dfz.peer.source.hdfs.HDFSOptions`)."""
        return HDFSOptions(self.hdfs_user, self.hdfs_delegation_token, self.hdfs_https)

    def s3_options(self) -> S3Options:
        """The settings of the ``s3://`` source backend (:class:`~dfz.peer.source.s3.S3Options`)."""
        return S3Options(
            endpoint=self.s3_endpoint,
            region=self.s3_region,
            addressing_style=self.s3_addressing_style,
            access_key_id=self.s3_access_key_id,
            secret_access_key=self.s3_secret_access_key,
            session_token=self.s3_session_token,
            profile=self.s3_profile,
        )

    @property
    def scheduler_endpoints(self) -> tuple[str, ...]:
        """Every scheduler configured: :attr:`schedulers`, else :attr:`scheduler` alone; none when the
        manager gives them (:attr:`from_manager`)."""
        if self.schedulers:
            return self.schedulers
        if self.scheduler:
            return (self.scheduler,)
        return () if self.manager else (DEFAULT_SCHEDULER,)

    @property
    def from_manager(self) -> bool:
        """The schedulers come from the manager (it is set, and no scheduler is configured)."""
        return not self.scheduler_endpoints

    def api_endpoints(self) -> list[str]:
        """The local API's endpoints: :attr:`api`, or the default ipc socket in the data directory.
        Raises :class:`ConfigError` when the default path is longer than ZeroMQ allows."""
        if self.api:
            return list(self.api)
        path = (Path(self.data_dir).absolute() / "api.sock").as_posix()
        if len(path) > IPC_PATH_LIMIT:
            raise ConfigError(
                f"api: the default socket {path} is longer than the {IPC_PATH_LIMIT} characters ipc allows; "
                "pass --api ipc:///short/path or --api tcp://127.0.0.1:PORT"
            )
        return [f"ipc://{path}"]

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> DaemonConfig:
        """Read a TOML file; ``overrides`` (non-None values, e.g. from flags) replace its keys. Relative
        ``data_dir`` paths in the file are relative to the file's directory."""
        path = Path(path)
        data = read_toml(path)
        if "data_dir" in data and isinstance(data["data_dir"], str):
            p = Path(data["data_dir"]).expanduser()
            data["data_dir"] = str(p if p.is_absolute() else path.parent / p)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "config") -> DaemonConfig:
        """Build and validate a config from a mapping (a parsed TOML document). Errors name the key."""
        kinds = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        try:
            for key, value in data.items():
                if key not in kinds:
                    raise ConfigError(f"unknown key {key!r} (known keys: {', '.join(sorted(kinds))})")
                if key == "data_dir":
                    values[key] = Path(_typed(key, value, str | Path, "a directory name")).expanduser()
                elif key == "proxy_rules":
                    try:
                        values[key] = rules_from_config(value)
                    except RuleError as e:
                        raise ConfigError(str(e)) from None
                elif key == "proxy_intercept":
                    items = value if isinstance(value, list | tuple) else [value]
                    values[key] = tuple(_typed(key, v, str, "a regular expression or a list of them") for v in items)
                elif key in ("proxy_connect_allow", "proxy_ca_cert", "proxy_ca_key"):
                    values[key] = _typed(key, value, str, "a string")
                elif key == "oci_plain_http":
                    items = value if isinstance(value, list | tuple) else [value]
                    values[key] = tuple(_typed(key, v, str, "a host[:port] or a list of them") for v in items)
                elif key in ("listen", "api", "schedulers") or (key == "scheduler" and isinstance(value, list | tuple)):
                    items = value if isinstance(value, list | tuple) else [value]
                    name = "schedulers" if key == "scheduler" else key
                    values[name] = tuple(_typed(key, v, str, "an endpoint or a list of endpoints") for v in items)
                elif key in ("seed", "direct_io", "hdfs_https", "http_insecure"):
                    values[key] = _typed(key, value, bool, "true or false", allow_bool=True)
                elif key in (
                    "scheduler",
                    "advertise_ip",
                    "host_id",
                    "idc",
                    "location",
                    "manager",
                    "cluster",
                    "tenant_token",
                    "metrics_listen",
                    "proxy_listen",
                    "mirror_upstream",
                    "http_ca_bundle",
                ) or key.startswith(("s3_", "oci_", "hf_", "hdfs_")):
                    values[key] = _typed(key, value, str, "a string")
                elif key in ("scheduler_wait", "register_timeout", "report_interval", "heartbeat"):
                    values[key] = float(_typed(key, value, int | float, "a number of seconds"))
                else:
                    values[key] = _typed(key, value, int, "an integer")
            if "data_dir" not in values:
                raise ConfigError("data_dir: missing (the directory where the daemon stores tasks)")
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _typed(key: str, value: Any, kind: Any, what: str, *, allow_bool: bool = False) -> Any:
    if (isinstance(value, bool) and not allow_bool) or not isinstance(value, kind):
        raise ConfigError(f"{key}: must be {what}, got {value!r}")
    return value


def _endpoint(key: str, endpoint: str) -> None:
    scheme, sep, rest = endpoint.partition("://") if isinstance(endpoint, str) else ("", "", "")
    if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest:
        raise ConfigError(f"{key}: {endpoint!r} is not an endpoint such as tcp://127.0.0.1:8002 or ipc:///run/dfz/api")
    if scheme == "ipc" and len(rest) > IPC_PATH_LIMIT:
        raise ConfigError(f"{key}: the ipc path of {endpoint!r} is longer than {IPC_PATH_LIMIT} characters")
