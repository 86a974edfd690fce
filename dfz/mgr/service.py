"""``dfz mgr``: the manager as a process: its settings, the first root user, and the HTTP server.

:class:`Manager` is a trio component: ``await nursery.start(Manager(config).run)`` migrates the database
(Alembic, to the latest revision: an empty database gets the whole schema, an up-to-date one is left
alone), creates the first root user when there are no users, and serves the API with hypercorn's trio
worker; it returns once the server listens (``manager.urls``). :meth:`Manager.stop` shuts down gracefully
(requests in progress finish, up to ``graceful_timeout``); cancelling stops at once.

The manager's tenant-ticket key (Ed25519, ``dfz/tickets.py``) is read from ``ticket_key_file``, made there on
first start (mode 0600) when missing; by default ``ticket.key`` next to the SQLite database (or in
``data_dir``). Managers sharing one database must share this file (``ticket_key_file``), or the schedulers
and daemons must trust each one's public key. ``dfz mgr`` prints the public key as ``ticket-key HEX``.

The first root user is ``root``, with the password in ``$DFZ_MGR_ROOT_PASSWORD`` when it is set, or else a
generated one that :func:`serve` prints once (``root-password ...``): it is stored only as a hash.

The manager's secret key (``sealing.py``: a job's registry password is sealed with it in the database) is
``$DFZ_MGR_SECRET_KEY``, else the file ``secret_key_file`` (default ``secret.key`` in ``data_dir``, or beside
an SQLite database), made with mode 0600 at the first start.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import zmq
from sqlalchemy.exc import IntegrityError
from sqlmodel import func, select

from ..config import ConfigError, read_toml
from ..log import event, get_logger
from ..metrics import ListenError as MetricsListenError
from ..metrics import Metrics, counter, fabric_metrics, gauge
from ..metrics import serve as serve_metrics
from ..tickets import TicketSigner
from . import audit
from .db import Database, display_url, parse_url
from .fabric import FabricSettings, ManagerFabric
from .jobs import JobRunner, JobSettings
from .models import Role, User
from .sealing import KEY_FILE, Sealer, load_key
from .security import hash_password, new_password
from .swarm import SwarmInspector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = get_logger("mgr")

ROOT_USER = "root"
ROOT_PASSWORD_ENV = "DFZ_MGR_ROOT_PASSWORD"
DEFAULT_LISTEN = "127.0.0.1:8080"
DATABASE_FILE = "manager.db"
TICKET_KEY_FILE = "ticket.key"


class ListenError(Exception):
    """The HTTP server could not bind its address (in use, bad address, no permission)."""


@dataclass(frozen=True)
class ManagerConfig:
    """Settings of ``dfz mgr``; a TOML file's top-level keys are these fields."""

    database: str = ""
    """Database URL: ``sqlite:///PATH`` (WAL) or ``postgresql://USER:PASSWORD@HOST:PORT/DB``. Empty: SQLite in
    ``data_dir/manager.db``."""
    data_dir: Path | None = None
    """Where the embedded SQLite database lives; default ``$DFZ_DATA_DIR/mgr`` (``~/.local/share/dfz/mgr``)."""
    listen: str = DEFAULT_LISTEN
    """HTTP address, ``HOST:PORT`` (``[::1]:PORT`` for IPv6); port 0 picks a free one."""
    metrics_listen: str = ""
    """``HOST:PORT`` to serve Prometheus metrics on (``GET /metrics``, ``dfz/metrics.py``); empty: none."""
    session_ttl: float = 12 * 3600.0
    """Seconds a sign-in session lasts."""
    cookie_secure: bool = False
    """Mark the session cookie Secure (HTTPS only): set it when a TLS proxy fronts the manager."""
    graceful_timeout: float = 5.0
    """Seconds requests in progress get to finish at shutdown."""
    fabric: str = ""
    """The fabric endpoint schedulers, seed peers and daemons talk to (``mgr.*``, ``protocol.md`` §17), e.g.
    ``tcp://0.0.0.0:8003``. Empty: ``listen``'s host on port 8003 (on a free port when ``listen``'s port is 0)."""
    keepalive: float = 1.0
    """Seconds between the keepalives of a registered scheduler or seed peer."""
    liveness: int = 3
    """Keepalives an instance may miss before it is marked inactive (the bound is ``keepalive * liveness``)."""
    refresh: float = 30.0
    """Seconds after which a daemon asks again which schedulers serve it."""
    config_poll: float = 1.0
    """Seconds between two looks at the database for changed clusters and dynamic configs to push."""
    job_poll: float = 0.5
    """Seconds between two looks at the database for pending jobs (preheat, ``jobs.py``)."""
    preheat_concurrency: int = 4
    """Preheat tasks (one URL on one peer) running at once per scheduler cluster, across jobs."""
    seed_wait: float = 10.0
    """Seconds a job waits for a cluster's seed peers to be connected (after a restart they register again)."""
    task_timeout: float = 60.0
    """Seconds a ``get_task`` or ``delete_task`` job may take when it gives no ``timeout``."""
    secret_key_file: Path | None = None
    """The manager's secret key (seals registry passwords at rest); default ``secret.key`` in ``data_dir``, or
    beside the SQLite database (``$DFZ_MGR_SECRET_KEY``, when set, is the key instead)."""
    ticket_key_file: Path | None = None
    """The Ed25519 key that signs tenant tickets (PEM, made on first start, mode 0600). Default: ``ticket.key`` in
    ``data_dir``, else next to the SQLite database, else in ``$DFZ_DATA_DIR/mgr``."""
    ticket_ttl: float = 600.0
    """Seconds a tenant ticket is valid (a revoked daemon token stops being honoured within about this long)."""

    def __post_init__(self) -> None:
        if self.database:
            parse_url(self.database)
        if self.metrics_listen:
            from ..metrics import parse_listen

            try:
                parse_listen(self.metrics_listen)
            except ValueError as bad:
                raise ConfigError(str(bad)) from None
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"listen: {self.listen!r} is not HOST:PORT (e.g. 127.0.0.1:8080, 0.0.0.0:8080, [::1]:8080)")
        if not self.session_ttl > 0:
            raise ConfigError("session_ttl: must be a positive number of seconds")
        if self.graceful_timeout < 0:
            raise ConfigError("graceful_timeout: must be 0 or more seconds")
        if self.fabric:
            scheme, sep, rest = self.fabric.partition("://")
            if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest:
                raise ConfigError(f"fabric: {self.fabric!r} is not an endpoint such as tcp://0.0.0.0:8003")
        if not (isinstance(self.ticket_ttl, int | float) and 10 <= self.ticket_ttl <= 86400):
            raise ConfigError(f"ticket_ttl: must be from 10 to 86400 seconds, got {self.ticket_ttl!r}")
        for key in ("keepalive", "refresh", "config_poll", "job_poll", "seed_wait", "task_timeout"):
            value = getattr(self, key)
            if not (isinstance(value, int | float) and 0.01 <= value <= 86400):
                raise ConfigError(f"{key}: must be from 0.01 to 86400 seconds, got {value!r}")
        if isinstance(self.liveness, bool) or not isinstance(self.liveness, int) or not 1 <= self.liveness <= 1000:
            raise ConfigError(f"liveness: must be an integer from 1 to 1000, got {self.liveness!r}")
        concurrency = self.preheat_concurrency
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= 10_000:
            raise ConfigError(f"preheat_concurrency: must be an integer from 1 to 10000, got {concurrency!r}")

    def fabric_listen(self) -> str:
        from .fabric import default_fabric_listen

        return self.fabric or default_fabric_listen(self.listen)

    def fabric_settings(self) -> FabricSettings:
        return FabricSettings(
            listen=(self.fabric_listen(),),
            keepalive=self.keepalive,
            liveness=self.liveness,
            refresh=self.refresh,
            config_poll=self.config_poll,
            ticket_ttl=self.ticket_ttl,
        )

    def ticket_key_path(self) -> Path:
        if self.ticket_key_file is not None:
            return self.ticket_key_file.expanduser()
        if self.data_dir is not None:
            return self.data_dir.expanduser() / TICKET_KEY_FILE
        url = parse_url(self.database_url())
        if url.get_backend_name() == "sqlite" and url.database:
            return Path(url.database).expanduser().resolve().parent / TICKET_KEY_FILE
        from ..peer.api import default_data_dir

        return default_data_dir() / "mgr" / TICKET_KEY_FILE

    def job_settings(self) -> JobSettings:
        return JobSettings(
            poll=self.job_poll,
            cluster_concurrency=self.preheat_concurrency,
            seed_wait=self.seed_wait,
            task_timeout=self.task_timeout,
        )

    def secret_key_path(self) -> Path:
        """Where the secret key is kept (see ``secret_key_file``)."""
        if self.secret_key_file is not None:
            return self.secret_key_file.expanduser()
        if self.data_dir is not None:
            return self.data_dir.expanduser() / KEY_FILE
        url = parse_url(self.database_url())
        if url.get_backend_name() == "sqlite" and url.database:
            return Path(url.database).expanduser().resolve().parent / KEY_FILE
        from ..peer.api import default_data_dir

        return default_data_dir() / "mgr" / KEY_FILE

    def database_url(self) -> str:
        if self.database:
            return self.database
        if self.data_dir is not None:
            base = self.data_dir
        else:
            from ..peer.api import default_data_dir

            base = default_data_dir() / "mgr"
        return f"sqlite:///{base.expanduser().resolve() / DATABASE_FILE}"

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> ManagerConfig:
        """Read a TOML file (relative ``data_dir`` is relative to the file), then apply ``overrides``."""
        path = Path(path)
        return cls.from_mapping({**read_toml(path), **overrides}, source=str(path), base=path.parent)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "config", base: Path | None = None) -> ManagerConfig:
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown key {key!r} (known keys: {', '.join(sorted(known))})")
            if key in ("database", "listen", "fabric", "metrics_listen"):
                if not isinstance(value, str):
                    raise ConfigError(f"{source}: {key} must be a string")
                values[key] = value
            elif key in ("data_dir", "secret_key_file", "ticket_key_file"):
                if not isinstance(value, str | Path):
                    raise ConfigError(f"{source}: {key} must be a {'directory' if key == 'data_dir' else 'file'} name")
                path = Path(value).expanduser()
                values[key] = base / path if base is not None and not path.is_absolute() else path
            elif key == "cookie_secure":
                if not isinstance(value, bool):
                    raise ConfigError(f"{source}: cookie_secure must be true or false")
                values[key] = value
            elif key in ("liveness", "preheat_concurrency"):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"{source}: {key} must be an integer")
                values[key] = value
            else:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ConfigError(f"{source}: {key} must be a number of seconds")
                values[key] = float(value)
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def check_root_password(environ: Mapping[str, str]) -> None:
    given = environ.get(ROOT_PASSWORD_ENV)
    if given is not None and not 8 <= len(given) <= 256:
        raise ConfigError(f"${ROOT_PASSWORD_ENV} must be 8 to 256 characters")


def ensure_root(db: Database, environ: Mapping[str, str] = os.environ) -> str | None:
    """Create the root user when there are no users at all. Returns the password when it was generated
    (the caller shows it once), None when it came from ``$DFZ_MGR_ROOT_PASSWORD`` or users exist."""
    check_root_password(environ)
    with db.reading() as session:
        if session.exec(select(func.count()).select_from(User)).one():
            return None
    given = environ.get(ROOT_PASSWORD_ENV)
    password = given or new_password()
    try:
        with db.writing() as session:
            if session.exec(select(func.count()).select_from(User)).one():
                return None
            role = session.exec(select(Role).where(Role.name == "root")).one()
            user = User(name=ROOT_USER, password_hash=hash_password(password), role_id=role.id, bio="created at the first start")  # type: ignore[arg-type]
            session.add(user)
            session.flush()
            audit.record(session, audit.SYSTEM, "create", "user", user.id, {"name": ROOT_USER, "role": "root"})
    except IntegrityError:
        return None  # another manager on the same database created it first
    event(log, logging.WARNING, "mgr_root_user_created", password_from=ROOT_PASSWORD_ENV if given else "generated")
    return None if given else password


class Manager:
    """The manager (see the module's docstring). ``urls`` holds the HTTP addresses once it serves;
    ``root_password`` the generated first password, if one was generated at this start."""

    def __init__(self, config: ManagerConfig | None = None, *, environ: Mapping[str, str] = os.environ) -> None:
        self.config = config or ManagerConfig()
        self.environ = environ
        self.urls: list[str] = []
        self.root_password: str | None = None
        self.db: Database | None = None
        self.fabric: ManagerFabric | None = None
        self.fabric_endpoints: list[str] = []
        self.signer: TicketSigner | None = None
        """Signs tenant tickets (loaded or made at start)."""
        self.jobs: JobRunner | None = None
        """Runs the jobs (preheat) once the database is open."""
        """Where the fabric endpoint listens (``mgr.*``), once it serves."""
        self._shutdown = trio.Event()
        self.metrics: Metrics | None = None
        """The Prometheus metrics, when ``metrics_listen`` is set; ``metrics_url`` where they are served."""
        self.metrics_url = ""

    def _collect_metrics(self) -> Iterable[Metric]:
        fabric = self.fabric
        if fabric is not None:
            yield from fabric_metrics(fabric.server.stats, len(fabric.server.peers))
            st = fabric.stats
            yield counter("mgr_registrations", "Registrations of schedulers, seed peers and daemons.", st.registrations)
            yield counter("mgr_keepalives", "Keepalives received.", st.keepalives)
            yield counter("mgr_lookups", "Scheduler lookups answered.", st.lookups)
            yield counter("mgr_refused", "Fabric requests refused.", st.refused)
            yield counter("mgr_went_inactive", "Instances marked inactive for missed keepalives.", st.inactive)
            yield counter("mgr_tickets_issued", "Tenant tickets issued.", st.tickets)
            yield counter("mgr_tokens_refused", "Daemon tokens refused.", st.tokens_refused)
        if self.jobs is not None:
            yield gauge("mgr_jobs_running", "Jobs running now.", self.jobs.running)

    def stop(self) -> None:
        """Stop serving gracefully: :meth:`run` returns once requests in progress finished."""
        self._shutdown.set()

    async def run(self, *, task_status: trio.TaskStatus[Manager] = trio.TASK_STATUS_IGNORED) -> None:
        from hypercorn.config import Config as HypercornConfig
        from hypercorn.trio.run import worker_serve
        from hypercorn.utils import wrap_app

        from .api import ApiSettings, create_app

        check_root_password(self.environ)
        http_config = HypercornConfig()
        http_config.bind = [self.config.listen]
        http_config.errorlog = get_logger("mgr.http")
        http_config.accesslog = None
        http_config.graceful_timeout = self.config.graceful_timeout
        try:
            # Bound first, before the database is touched: a bad or busy address is a clear error, and a
            # generated root password is never made by a manager that then cannot serve.
            sockets = http_config.create_sockets()
            for sock in sockets.insecure_sockets:
                sock.listen(http_config.backlog)
        except OSError as e:
            raise ListenError(f"cannot listen on {self.config.listen}: {e.strerror or e}") from None
        key_path = self.config.ticket_key_path()
        try:
            signer = self.signer = await trio.to_thread.run_sync(TicketSigner.load_or_create, key_path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"ticket_key_file: cannot use {key_path}: {e}") from None
        fabric = self.fabric = ManagerFabric(None, self.config.fabric_settings(), signer=signer)
        db: Database | None = None
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await nursery.start(fabric.run)  # bound before the database is touched, like the HTTP socket
                except zmq.ZMQError as e:
                    raise ListenError(f"cannot listen on {self.config.fabric_listen()} (fabric): {e}") from None
                self.fabric_endpoints = fabric.endpoints
                key, key_source = await trio.to_thread.run_sync(load_key, self.config.secret_key_path(), self.environ)
                sealer = Sealer(key)
                db = Database(self.config.database_url())
                db.sealer = sealer
                self.db = db
                await trio.to_thread.run_sync(db.upgrade)
                self.root_password = await trio.to_thread.run_sync(ensure_root, db, self.environ)
                fabric.attach(db)
                self.jobs = await nursery.start(JobRunner(db, fabric, self.config.job_settings()).run)
                inspector = await nursery.start(SwarmInspector(fabric).run)
                app = create_app(
                    db,
                    ApiSettings(session_ttl=self.config.session_ttl, cookie_secure=self.config.cookie_secure),
                    swarm_source=inspector,
                )
                if self.config.metrics_listen:
                    metrics = self.metrics = Metrics("mgr")
                    metrics.collector(self._collect_metrics)
                    app = _timed(app, metrics)
                    self.metrics_url = await nursery.start(serve_metrics, metrics, self.config.metrics_listen)

                async def http(*, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
                    await worker_serve(
                        wrap_app(app, http_config.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
                        http_config,
                        sockets=sockets,
                        shutdown_trigger=self._shutdown.wait,
                        task_status=task_status,
                    )
                    nursery.cancel_scope.cancel()  # the HTTP server stopped (gracefully): so does the fabric

                self.urls = await nursery.start(http)
                # A full collection walks every live object: 80-112 ms here once the app, SQLAlchemy and
                # pydantic are loaded (bench_mgr, gc callbacks), stalling every request in flight. What
                # exists once the manager serves lives as long as the process: keep it out of those walks
                # (5-40 ms after).
                gc.freeze()
                event(
                    log,
                    logging.INFO,
                    "mgr_listening",
                    urls=",".join(self.urls),
                    fabric=",".join(fabric.endpoints),
                    database=display_url(db.url),
                    secret_key=key_source,
                )
                task_status.started(self)
        finally:
            for sock in sockets.insecure_sockets:
                sock.close()
            if db is not None:
                db.close()


def _timed(app: Any, metrics: Metrics) -> Any:
    """``app`` with each HTTP request's time observed, by method and status class."""
    seconds = metrics.histogram("http_request_seconds", "REST and open API requests: time to the response's end.",
                                ["method", "status"])  # fmt: skip

    async def timed(scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [0]

        async def sending(message: Any) -> None:
            if message.get("type") == "http.response.start":
                status[0] = int(message.get("status", 0))
            await send(message)

        try:
            await app(scope, receive, sending)
        finally:
            seconds.labels(scope.get("method", "?"), f"{status[0] // 100}xx").observe(time.perf_counter() - started)

    return timed


async def serve(
    config: ManagerConfig,
    *,
    on_ready: Callable[[Manager], None] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> None:
    """Run the manager until SIGTERM or SIGINT, then shut down gracefully. ``on_ready`` is called once it
    listens. Raises :class:`ListenError` or :class:`ConfigError` when it cannot start."""
    manager = Manager(config, environ=environ)
    started = False
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(manager.run)
                started = True
                if on_ready is not None:
                    on_ready(manager)
                async for signum in signals:
                    event(log, logging.INFO, "mgr_stopping", signal=signal.Signals(signum).name)
                    break
                manager.stop()
    except BaseExceptionGroup as group:
        causes = group.subgroup((ConfigError, ListenError, MetricsListenError))
        if started or causes is None:
            raise
        cause: BaseException = causes
        while isinstance(cause, BaseExceptionGroup):
            cause = cause.exceptions[0]
        raise cause from None


def with_overrides(config: ManagerConfig, **overrides: Any) -> ManagerConfig:
    """``config`` with the given fields replaced (None: keep), checked again."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
