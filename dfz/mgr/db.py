"""The manager's database: an engine per URL, sessions for reading and for writing, and migrations.

SQLite (a file, in WAL mode) is the embedded default; a ``postgresql://`` URL selects PostgreSQL through
psycopg 3. The schema is Alembic's (``migrations/``): :meth:`Database.upgrade` brings any database, empty
or older, to the latest revision, and does nothing when it is there already.

Why two kinds of session. Requests run in worker threads, each with its own connection. On SQLite a
transaction that starts reading and then writes can fail at once with ``SQLITE_BUSY`` (another
connection wrote in between, and no busy timeout helps a deferred transaction upgrade its lock).
:meth:`Database.writing` therefore opens ``BEGIN IMMEDIATE`` transactions: writers queue for the lock
(busy timeout), readers in WAL never wait. On PostgreSQL both are ordinary transactions.
In-memory SQLite is refused: each connection would see its own empty database (``MEASURED.md``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError
from sqlmodel import Session

from ..config import ConfigError

MIGRATIONS = Path(__file__).with_name("migrations")
_WRITE = "dfz_write"
SQLITE_BUSY_TIMEOUT_MS = 30_000
_MIGRATION_LOCK_ID = 0x0D1F2A7E
"""PostgreSQL advisory lock held while migrating, so that managers starting together migrate once."""
_ALEMBIC = threading.Lock()
"""Alembic keeps the running migration in module globals: one migration at a time per process."""


def parse_url(text: str) -> URL:
    """A database URL the manager can use; :class:`ConfigError` saying what is wrong otherwise.

    ``postgresql://`` (or ``postgres://``) means psycopg 3; ``sqlite:///PATH`` a file (relative paths are
    relative to the current directory, ``sqlite:////abs/path`` for an absolute one).
    """
    try:
        url = make_url(text)
    except ArgumentError:
        raise ConfigError(f"database: {text!r} is not a database URL (sqlite:///PATH or postgresql://USER@HOST/DB)") from None
    backend = url.get_backend_name()
    if backend == "postgres":
        url = url.set(drivername="postgresql")
        backend = "postgresql"
    if backend == "postgresql":
        if url.get_driver_name() not in ("psycopg", "psycopg2") or "+" not in url.drivername:
            url = url.set(drivername="postgresql+psycopg")
        if not url.database:
            raise ConfigError(f"database: {url.render_as_string(hide_password=True)} names no database")
        return url
    if backend == "sqlite":
        if not url.database or url.database == ":memory:" or url.query.get("mode") == "memory":
            raise ConfigError(
                "database: in-memory SQLite is not supported (each connection would see its own empty database); "
                "give a file, e.g. sqlite:///manager.db"
            )
        return url
    raise ConfigError(f"database: unsupported backend {backend!r}: use sqlite:///PATH or postgresql://...")


def display_url(url: URL | str) -> str:
    """The URL with its password hidden, for logs and the console."""
    return (make_url(url) if isinstance(url, str) else url).render_as_string(hide_password=True)


def _sqlite_engine(url: URL) -> Engine:
    assert url.database is not None
    Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        pool_size=8,
        max_overflow=16,
        pool_timeout=30,
    )

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below emit BEGIN, instead of the driver's implicit one.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE" if connection.get_execution_options().get(_WRITE) else "BEGIN")

    return engine


class Database:
    """The manager's database at ``url``: :meth:`reading` and :meth:`writing` sessions, :meth:`upgrade`.

    Thread-safe (sessions are not: one per request or per task). :meth:`close` releases the connections.
    """

    def __init__(self, url: str | URL) -> None:
        self.url = parse_url(url) if isinstance(url, str) else url
        self.backend = self.url.get_backend_name()
        if self.backend == "sqlite":
            self.engine = _sqlite_engine(self.url)
        else:
            self.engine = sa.create_engine(self.url, pool_pre_ping=True, pool_size=10, max_overflow=20)
        self._write_engine = self.engine.execution_options(**{_WRITE: True})
        self.sealer: Any = None
        """The manager's :class:`~dfz.mgr.sealing.Sealer` (secrets at rest), or None; sessions carry it in
        ``session.info["sealer"]`` for the rules that seal a value before it is stored."""

    def __repr__(self) -> str:
        return f"Database({display_url(self.url)!r})"

    @contextlib.contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reads; it is rolled back at the end (never commit in it)."""
        with Session(self.engine, expire_on_commit=False, info={"sealer": self.sealer}) as session:
            yield session

    @contextlib.contextmanager
    def writing(self) -> Iterator[Session]:
        """A session that may write: committed when the block ends normally, rolled back on an exception.
        On SQLite it holds the write lock from its first statement to its end: keep it short."""
        with Session(self._write_engine, expire_on_commit=False, info={"sealer": self.sealer}) as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def upgrade(self, revision: str = "head") -> None:
        """Migrate the schema to ``revision`` (the latest by default). Safe to run at every start and from
        several managers at once: the first migrates, the others find nothing to do."""
        from alembic import command

        with _ALEMBIC, self._write_engine.connect() as connection:
            if self.backend == "postgresql":
                with connection.begin():
                    connection.execute(sa.text("SELECT pg_advisory_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
            try:
                command.upgrade(alembic_config(connection), revision)
            finally:
                if self.backend == "postgresql":
                    with connection.begin():
                        connection.execute(sa.text("SELECT pg_advisory_unlock(:id)"), {"id": _MIGRATION_LOCK_ID})

    def current_revision(self) -> str | None:
        """The revision the database is at (None: not migrated at all)."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def close(self) -> None:
        self.engine.dispose()


def alembic_config(connection: sa.Connection | None = None) -> Any:
    """Alembic's configuration for the manager's migrations (no alembic.ini: the script directory is the
    package's ``migrations/``). With ``connection``, commands run on it."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config
