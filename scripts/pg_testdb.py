"""A throw-away PostgreSQL server for the manager's tests (and for trying ``dfz mgr`` on PostgreSQL).

Debian's ``postgresql`` package provides the binaries: when they are missing and we are root, it is
installed with ``apt-get`` (``apt-get update`` first when the package lists are stale). The server is a
cluster of our own, made by ``initdb`` in a directory of ours and started by ``pg_ctl`` on a free port of
127.0.0.1 with trust authentication (loopback only, for tests), durability switched off for speed. As
root it runs as the unprivileged ``postgres`` user (``nobody`` if that user does not exist): PostgreSQL
refuses to run as root.

``start`` is idempotent: on a directory that holds a running server it returns that server's URL.

    python scripts/pg_testdb.py start DIR     # prints postgresql://dfz@127.0.0.1:PORT/postgres
    python scripts/pg_testdb.py stop DIR

As a library: ``PostgresServer(DIR).start()`` → URL; ``.stop()``; :func:`create_database`.
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

USER = "dfz"
"""The database superuser the cluster is made with (trust authentication on 127.0.0.1)."""


class PostgresUnavailable(Exception):
    """PostgreSQL cannot be installed or started here; the message says why."""


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path))


def find_bindir() -> Path | None:
    """The directory of Debian's ``initdb`` and ``pg_ctl`` (the newest version), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def install() -> Path:
    """The binaries' directory, installing Debian's ``postgresql`` when it is missing (root only)."""
    bindir = find_bindir()
    if bindir is not None:
        return bindir
    if os.geteuid() != 0:
        raise PostgresUnavailable("PostgreSQL is not installed and this is not root: run `apt-get install -y postgresql` as root")
    if shutil.which("apt-get") is None:
        raise PostgresUnavailable("PostgreSQL is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"]
    if subprocess.run(command, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise PostgresUnavailable(f"apt-get install postgresql failed: {done.stderr.strip()[-500:]}")
    bindir = find_bindir()
    if bindir is None:
        raise PostgresUnavailable("the postgresql package installed, but no initdb was found under /usr/lib/postgresql")
    return bindir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """A PostgreSQL cluster in ``directory`` (``data/``, ``socket/``, ``port``, ``server.log``)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).resolve()
        self.data = self.directory / "data"
        self.sockets = self.directory / "socket"
        self.log = self.directory / "server.log"
        self._port_file = self.directory / "port"
        self.bindir: Path | None = None
        self.run_as: str | None = None
        if os.geteuid() == 0:
            self.run_as = "postgres" if _user_exists("postgres") else "nobody"

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self._port_file.read_text().strip()}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.bindir is not None
        command = [str(self.bindir / args[0]), *args[1:]]
        kwargs: dict[str, object] = {}
        if self.run_as is not None:
            kwargs = {"user": self.run_as, "group": pwd.getpwnam(self.run_as).pw_gid, "extra_groups": []}
        done = subprocess.run(
            command, capture_output=True, text=True, check=False, cwd=self.directory, stdin=subprocess.DEVNULL, **kwargs
        )  # type: ignore[call-overload]
        if check and done.returncode != 0:
            tail = self.log.read_text(errors="replace")[-1500:] if self.log.exists() else ""
            raise PostgresUnavailable(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()[-800:]}\n{tail}")
        assert isinstance(done, subprocess.CompletedProcess)
        return done

    def running(self) -> bool:
        if self.bindir is None or not (self.data / "PG_VERSION").exists() or not self._port_file.exists():
            return False
        return self._run("pg_ctl", "status", "-D", str(self.data), check=False).returncode == 0

    def start(self, timeout: float = 60.0) -> str:
        """Start the server (installing PostgreSQL first if needed) and return its URL; reuse a running one."""
        self.bindir = install()
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.running():
            return self.url
        self.sockets.mkdir(exist_ok=True)
        if self.run_as is not None:
            entry = pwd.getpwnam(self.run_as)
            for path in (self.directory, self.sockets, *([self.data] if self.data.exists() else [])):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions")
        for attempt in range(3):
            port = _free_port()
            options = (
                f"-p {port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=200"
            )
            started = self._run(
                "pg_ctl",
                "start",
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-w",
                "-t",
                str(int(timeout)),
                "-o",
                options,
                check=False,
            )
            if started.returncode == 0:
                self._port_file.write_text(f"{port}\n")
                _wait_for_port(port, timeout)
                return self.url
            if attempt == 2:
                tail = self.log.read_text(errors="replace")[-1500:] if self.log.exists() else ""
                raise PostgresUnavailable(f"pg_ctl start failed: {started.stderr.strip()[-800:]}\n{tail}")
        raise AssertionError("unreachable")

    def stop(self) -> None:
        if self.bindir is None:
            self.bindir = find_bindir()
        if self.bindir is not None and (self.data / "PG_VERSION").exists():
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", check=False)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise PostgresUnavailable(f"PostgreSQL did not accept connections on port {port}") from None
            time.sleep(0.05)


def create_database(server_url: str, name: str, template: str | None = None) -> str:
    """Create database ``name`` (from ``template`` if given) on the server; return its URL."""
    import psycopg
    from psycopg import sql

    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"{name!r} is not a plain database name")
    with psycopg.connect(_libpq(server_url), autocommit=True) as conn:
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            statement = sql.SQL("{} TEMPLATE {}").format(statement, sql.Identifier(template))
        conn.execute(statement)
    return server_url.rsplit("/", 1)[0] + "/" + name


def drop_database(server_url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(_libpq(server_url), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop", "url"))
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    server = PostgresServer(args.directory)
    try:
        if args.action == "start":
            print(server.start())
        elif args.action == "stop":
            server.stop()
        else:
            print(server.url)
    except PostgresUnavailable as e:
        print(f"pg_testdb: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
