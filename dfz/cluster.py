"""``dfz up``: a whole dfz cluster on one machine (scheduler, seed peer, daemon), for trying dfz and for tests.

With ``--schedulers N`` it runs N schedulers (``sched``, ``sched-2``, ...); the peers are given all of them
(each task goes to one by consistent hashing of its id, see :mod:`dfz.peer.schedring`) and ``cluster.json``
lists them all under ``schedulers``, for daemons that join.

It runs the parts as **child processes** of the very commands a real deployment runs (``dfz mgr``,
``dfz sched``, ``dfz seed``, ``dfz daemon``), each with its own subdirectory of the data directory and free
ports, then
writes ``DIR/cluster.json`` (:func:`read_cluster`) with every endpoint so that scripts, ``dfz get`` and
other daemons (``dfz daemon --scheduler ...``) can join it. SIGTERM or SIGINT stops it: the daemons first
(they say ``bye`` to the scheduler), then the scheduler, then the manager; ``cluster.json`` is removed first
of all. The manager comes first: the schedulers and the seed register with it (``--manager``) and every
peer takes its dynamic settings; ``cluster.json`` has its HTTP URL and its fabric endpoint.

Why child processes rather than three trio components in one nursery:

* **Isolation.** The seed is the busiest process of a swarm (origin fetches, BLAKE3, serving every
  child); in one process it would share one GIL and one trio loop with the scheduler, whose heartbeats and
  pushes would wait behind it. Separate processes use every core and keep the scheduler responsive.
* **Same code path as a deployment.** Each part runs exactly as it does when deployed alone, from its
  command line; ``dfz up`` depends only on the lines those commands print once they serve (``listening``,
  ``piece-server``, ``announce``, ``api``, ``host``), not on their internals.
* **Failure is contained and visible.** A part that crashes or exits is noticed (its exit status and the
  end of its log are printed), the rest are stopped in order, and ``dfz up`` exits non-zero.
* **No orphans.** Each child runs in its own process group (a terminal's Ctrl-C reaches only ``dfz up``,
  which stops the parts in order) and, on Linux, gets SIGTERM from the kernel if ``dfz up`` dies, even
  by SIGKILL (``PR_SET_PDEATHSIG``; the children are forked from the main thread for that reason).

Layout of ``DIR``::

    cluster.json      endpoints, pids, version (only while the cluster runs)
    api.sock          the daemon's local API (so ``DFZ_DATA_DIR=DIR dfz get ...`` needs no --endpoint)
    mgr/              the manager's SQLite database (manager.db); not with --no-manager
    sched/            the scheduler (nothing but its log today); sched-2/, ... with --schedulers N
    seed/             the seed peer's data directory (its tasks, host id, api.sock)
    daemon/           the daemon's data directory
    logs/             sched.log (sched-2.log, ...), seed.log, daemon.log: each part's stdout and stderr
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import trio

from . import __version__

CLUSTER_FILE = "cluster.json"
CLUSTER_FORMAT = 1
"""Version of the layout of ``cluster.json``; bumped when a key changes meaning or goes away."""
API_SOCKET = "api.sock"
IPC_PATH_LIMIT = 107
_PR_SET_PDEATHSIG = 1
_LOG_TAIL_LINES = 15


class UpError(Exception):
    """``dfz up`` could not start (or a part failed); the message says which part and why."""


@dataclass(frozen=True)
class UpConfig:
    """Settings of ``dfz up``."""

    data_dir: Path
    host: str = "127.0.0.1"
    """Address the scheduler and the piece servers bind (port 0: free ports). ``0.0.0.0`` lets daemons on
    other machines join (the fabric is unauthenticated: only on a trusted network)."""
    seed: bool = True
    """Run a seed peer (the root of every swarm); without one the first peer fetches from the origin."""
    schedulers: int = 1
    """Schedulers to run; the peers use them all (a task goes to one of them by consistent hashing)."""
    manager: bool = True
    """Run the manager (``dfz mgr``, SQLite in ``DIR/mgr``): the schedulers and the seed register with it,
    and the peers take its dynamic settings."""
    verbose: int = 0
    """Log level of the parts (``-v`` info, ``-vv`` debug), into ``DIR/logs/*.log``."""
    start_timeout: float = 30.0
    """Seconds each part has to start serving."""
    stop_timeout: float = 10.0
    """Seconds each part has to stop after SIGTERM before it is killed."""
    python: str = sys.executable
    """The interpreter that runs the parts (``python -m dfz.cli ...``): the one running ``dfz up``."""
    tenant_token: str = field(default="", repr=False)
    """A daemon token of the manager's: the seed and the daemon join its tenant (given to them in
    ``$DFZ_TENANT_TOKEN``, never on a command line). Needs :attr:`manager`."""


@dataclass
class Part:
    """One running part of the cluster: its process and what it printed once it served."""

    name: str
    pid: int
    data_dir: Path
    log: Path
    lines: dict[str, list[str]] = field(default_factory=dict)
    """``key value`` lines it printed (``listening``, ``piece-server``, ``api``, ...), by key."""

    def first(self, key: str) -> str:
        values = self.lines.get(key) or [""]
        return values[0]

    def describe(self) -> dict[str, Any]:
        if _is_sched(self.name):
            return {"pid": self.pid, "data_dir": str(self.data_dir), "log": str(self.log), "listen": self.lines["listening"]}
        return {
            "pid": self.pid,
            "host_id": self.first("host").split(" ")[0],
            "data_dir": str(self.data_dir),
            "log": str(self.log),
            "piece_server": self.lines.get("piece-server", []),
            "announce": self.first("announce"),
            "api": self.lines.get("api", []),
        }


# --- cluster.json ------------------------------------------------------------------------------------------


def _is_sched(name: str) -> bool:
    return name == "sched" or name.startswith("sched-")


def _sched_names(count: int) -> list[str]:
    """The parts' names of ``count`` schedulers: ``sched`` (as with one), ``sched-2``, ``sched-3``, ..."""
    return ["sched" if i == 1 else f"sched-{i}" for i in range(1, count + 1)]


def cluster_file(data_dir: Path) -> Path:
    return Path(data_dir) / CLUSTER_FILE


def read_cluster(data_dir: Path) -> dict[str, Any]:
    """The ``cluster.json`` of a running ``dfz up`` (``FileNotFoundError`` when none runs there). Keys:
    ``format``, ``version`` (dfz's), ``pid`` (of ``dfz up``), ``data_dir``, ``started``, ``schedulers``
    (every scheduler's endpoint: a daemon joins with one ``--scheduler`` for each), ``scheduler`` (the
    first of them), ``endpoint`` (the daemon's local API, for ``dfz get --endpoint`` or
    ``DFZ_ENDPOINT``), ``seed_endpoint`` (the seed's local API, or null) and ``parts``: ``sched`` (and
    ``sched-2``, ... with several; pid, listen), ``seed`` and ``daemon`` (pid, host_id, piece_server,
    announce, api, data_dir, log); ``manager`` (null with ``--no-manager``): ``url`` (the REST API),
    ``fabric`` (for ``--manager``), pid, data_dir, log. (The password of its user ``root``, generated at its
    first start, is in its log only: the ``root-password`` line.)"""
    with cluster_file(data_dir).open() as f:
        data: dict[str, Any] = json.load(f)
    return data


def _write_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(data_dir: Path) -> None:
    """Refuse a data directory that a live ``dfz up`` uses; remove the ``cluster.json`` of a dead one."""
    path = cluster_file(data_dir)
    try:
        pid = int(read_cluster(data_dir).get("pid", 0))
    except FileNotFoundError:
        return
    except (OSError, ValueError, TypeError, AttributeError):
        pid = 0
    if pid > 0 and pid != os.getpid() and _alive(pid):
        raise UpError(f"another dfz up (pid {pid}) runs in {data_dir}: stop it (kill -TERM {pid}) or use another --data-dir")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# --- child processes -----------------------------------------------------------------------------------------


def _pdeathsig() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel send the child SIGTERM when this process dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: nothing to load in the child
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody would stop this child
            os._exit(1)

    return setup


class _Child:
    """A child process started from the main thread (for PR_SET_PDEATHSIG), its stdout read by trio."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log
        self._log: TextIO = log.open("a", buffering=1)
        read, write = os.pipe()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        try:
            self.popen = subprocess.Popen(  # forked from the main thread: see _pdeathsig
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=write,
                stderr=self._log,
                env=env,
                process_group=0,
                preexec_fn=_pdeathsig(),  # noqa: PLW1509 - only prctl, with libc resolved before the fork
                close_fds=True,
            )
        except BaseException:
            os.close(read)
            self._log.close()
            raise
        finally:
            os.close(write)
        self.pid = self.popen.pid
        self.stdout = trio.lowlevel.FdStream(read)
        self._buffer = b""
        self.signalled = False

    async def lines_until(self, done: Callable[[dict[str, list[str]]], bool], within: float) -> dict[str, list[str]]:
        """Read ``key value`` lines from its stdout (copying them to its log) until ``done(lines)``."""
        lines: dict[str, list[str]] = {}
        with trio.move_on_after(within):
            while not done(lines):
                line = await self._readline()
                if line is None:
                    code = await self.wait()
                    raise UpError(f"the {self.name} exited with {_status(code)} before it served{self.tail()}")
                key, _, value = line.partition(" ")
                lines.setdefault(key, []).append(value.strip())
            return lines
        raise UpError(f"the {self.name} did not start serving within {within:g} s{self.tail()}")

    async def _readline(self) -> str | None:
        while b"\n" not in self._buffer:
            chunk = await self.stdout.receive_some(65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        text = line.decode(errors="replace").rstrip("\r")
        self._log.write(text + "\n")
        return text

    async def drain(self) -> None:
        """Copy whatever else it prints on stdout to its log, until it closes stdout."""
        while await self._readline() is not None:
            pass

    async def wait(self) -> int:
        """Its exit status (``-N`` for signal N)."""
        code = self.popen.poll()
        if code is not None:
            return code
        pidfd = -1
        with contextlib.suppress(AttributeError, OSError):
            pidfd = os.pidfd_open(self.pid)
        try:
            while (code := self.popen.poll()) is None:
                if pidfd >= 0:
                    await trio.lowlevel.wait_readable(pidfd)
                else:
                    await trio.sleep(0.05)
            return code
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signum)

    async def stop(self, grace: float) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; the exit status."""
        self.signalled = True
        self.signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            return await self.wait()
        self.signal(signal.SIGKILL)
        code = await self.wait()
        self._log.write(f"[dfz up] killed: it did not stop within {grace:g} s of SIGTERM\n")
        return code

    def tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace").rstrip("\n").splitlines()[-lines:]
        except OSError:
            return ""
        if not text:
            return f" (its log {self.log_path} is empty)"
        return f"; the end of its log {self.log_path}:\n" + "\n".join(f"    {line}" for line in text)

    def close(self) -> None:
        self.stdout.close()
        self._log.close()


def _status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"code {code}"


# --- the cluster -------------------------------------------------------------------------------------------


def _api_endpoint(socket_path: Path, host: str) -> str:
    path = socket_path.absolute().as_posix()
    if len(path) <= IPC_PATH_LIMIT:
        return f"ipc://{path}"
    return f"tcp://{'127.0.0.1' if host in ('0.0.0.0', '::', '*') else host}:0"  # too long for ipc: a free port


class Cluster:
    """A running ``dfz up``: start its parts with :meth:`start`, stop them with :meth:`stop`."""

    def __init__(self, config: UpConfig) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir).expanduser().absolute()
        self.children: dict[str, _Child] = {}
        self.parts: dict[str, Part] = {}
        self.manager: Part | None = None
        """The manager, when it runs (not among :attr:`parts`: it is no peer and no scheduler)."""
        self.wrote = False
        """Whether this process wrote ``cluster.json`` (and so removes it)."""

    def _cli(self, *args: str) -> list[str]:
        verbose = ["-" + "v" * self.config.verbose] if self.config.verbose > 0 else []
        return [self.config.python, "-m", "dfz.cli", *args, *verbose]

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> _Child:
        child = _Child(name, argv, self.data_dir / "logs" / f"{name}.log", env)
        self.children[name] = child
        return child

    async def start(self) -> dict[str, Any]:
        """Start the parts (the schedulers at once, then the seed and the daemon at once), write
        ``cluster.json`` and return what it says. Raises :class:`UpError`, leaving the started children
        to :meth:`stop`."""
        cfg = self.config
        d = self.data_dir
        sched_names = _sched_names(cfg.schedulers)
        for sub in (*sched_names, "seed", "daemon", "logs", *(["mgr"] if cfg.manager else [])):
            (d / sub).mkdir(parents=True, exist_ok=True)
        _claim(d)
        manager: list[str] = []
        if cfg.manager:  # first of all: the schedulers and the seed register with it
            mgr = self._spawn(
                "mgr",
                self._cli("mgr", "--data-dir", str(d / "mgr"), "--listen", f"{cfg.host}:0", "--fabric", f"tcp://{cfg.host}:0"),
            )
            got = await mgr.lines_until(lambda got: bool(got.get("listening")), cfg.start_timeout)
            self.manager = Part("mgr", mgr.pid, d / "mgr", mgr.log_path, got)
            manager = ["--manager", _connectable(self.manager.first("fabric"))]
        # The schedulers next: the peers need their addresses.
        hostname = _hostname()
        for name in sched_names:
            # The manager knows one scheduler per host name and cluster: each gets a name of its own.
            named = ["--hostname", hostname if name == "sched" else f"{hostname}-{name}"] if manager else []
            self._spawn(name, self._cli("sched", "--listen", f"tcp://{cfg.host}:0", *manager, *named))

        async def sched_ready(name: str) -> None:
            child = self.children[name]
            got = await child.lines_until(lambda got: bool(got.get("listening")), cfg.start_timeout)
            self.parts[name] = Part(name, child.pid, d / name, child.log_path, got)

        await _all_ready(sched_ready, sched_names)
        schedulers = [_connectable(self.parts[name].first("listening")) for name in sched_names]
        peers = [("daemon", d / "daemon", _api_endpoint(d / API_SOCKET, cfg.host))]
        if cfg.seed:
            peers.insert(0, ("seed", d / "seed", _api_endpoint(d / "seed" / API_SOCKET, cfg.host)))
        for name, data_dir, api in peers:
            argv = ["seed" if name == "seed" else "daemon", "--data-dir", str(data_dir)]
            for scheduler in schedulers:
                argv += ["--scheduler", scheduler]
            argv += ["--listen", f"tcp://{cfg.host}:0", "--api", api, *manager]
            self._spawn(name, self._cli(*argv), {"DFZ_TENANT_TOKEN": cfg.tenant_token} if cfg.tenant_token else None)
        dirs = {name: data_dir for name, data_dir, _ in peers}

        async def ready(name: str) -> None:
            child = self.children[name]
            got = await child.lines_until(lambda got: bool(got.get("api")), cfg.start_timeout)
            self.parts[name] = Part(name, child.pid, dirs[name], child.log_path, got)

        await _all_ready(ready, list(dirs))
        info = self.describe(schedulers)
        _write_atomically(cluster_file(d), info)
        self.wrote = True
        return info

    def describe(self, schedulers: list[str]) -> dict[str, Any]:
        seed = self.parts.get("seed")
        return {
            "format": CLUSTER_FORMAT,
            "version": __version__,
            "pid": os.getpid(),
            "data_dir": str(self.data_dir),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "scheduler": schedulers[0],
            "schedulers": schedulers,
            "endpoint": self.parts["daemon"].first("api"),
            "seed_endpoint": seed.first("api") if seed is not None else None,
            "manager": self._describe_manager(),
            "parts": {name: self.parts[name].describe() for name in self.children if name in self.parts},  # in start order
        }

    def _describe_manager(self) -> dict[str, Any] | None:
        m = self.manager
        if m is None:
            return None
        return {
            "url": m.first("listening"),
            "fabric": _connectable(m.first("fabric")),
            "pid": m.pid,
            "data_dir": str(m.data_dir),
            "log": str(m.log),
        }

    async def watch(self) -> str:
        """Wait until a part exits on its own; a message saying which and how."""
        result: list[str] = []
        async with trio.open_nursery() as nursery:

            async def one(child: _Child) -> None:
                code = await child.wait()
                if not child.signalled:
                    result.append(f"the {child.name} (pid {child.pid}) exited with {_status(code)}{child.tail()}")
                    nursery.cancel_scope.cancel()

            for child in self.children.values():
                nursery.start_soon(child.drain)
                nursery.start_soon(one, child)
        return result[0] if result else "stopped"

    async def stop(self) -> list[str]:
        """Remove ``cluster.json``, stop the peers (at once), then the schedulers (at once); what went wrong,
        if anything."""
        if self.wrote:
            with contextlib.suppress(FileNotFoundError):
                cluster_file(self.data_dir).unlink()
        problems: list[str] = []

        async def stop(child: _Child) -> None:
            running = child.popen.poll() is None
            code = await child.stop(self.config.stop_timeout)
            if running and code not in (0, -signal.SIGTERM):
                problems.append(f"the {child.name} (pid {child.pid}) stopped with {_status(code)}{child.tail(5)}")

        def rank(name: str) -> int:  # the peers, then the schedulers, then the manager
            return 2 if name == "mgr" else 1 if _is_sched(name) else 0

        with trio.CancelScope(shield=True):
            for round_ in (0, 1, 2):
                async with trio.open_nursery() as nursery:
                    for name, child in self.children.items():
                        if rank(name) == round_:
                            nursery.start_soon(stop, child)
        for child in self.children.values():
            child.close()
        return problems

    def kill(self) -> None:
        """SIGKILL every part that still runs (a second Ctrl-C while stopping)."""
        for child in self.children.values():
            child.signal(signal.SIGKILL)


async def _all_ready(ready: Callable[[str], Awaitable[None]], names: list[str]) -> None:
    """Run ``ready(name)`` for every part at once; the first :class:`UpError` if any failed (the others'
    are in their logs)."""
    try:
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(ready, name)
    except BaseExceptionGroup as group:
        failed = group.subgroup(UpError)
        if failed is None:
            raise
        raise _leaf(failed) from None


def _leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


def _connectable(endpoint: str) -> str:
    """A bound endpoint as others connect to it: a wildcard host becomes this machine's address."""
    scheme, _, rest = endpoint.partition("://")
    host, sep, port = rest.rpartition(":")
    if scheme == "tcp" and sep and host in ("0.0.0.0", "*", "[::]", "::"):
        try:  # what the daemons advertise for a wildcard too (dfz.peer.daemon): this machine's address by name
            address = socket.gethostbyname(socket.gethostname())
        except OSError:
            address = "127.0.0.1"
        return f"tcp://{address}:{port}"
    return endpoint


def _hostname() -> str:
    from .mgr.agent import local_hostname

    return local_hostname()


def summary(info: dict[str, Any]) -> str:
    """What ``dfz up`` prints once the cluster serves: where things are and how to use them."""
    parts = info["parts"]
    lines = [f"dfz {info['version']} up in {info['data_dir']} (pid {info['pid']})"]
    schedulers: list[str] = info["schedulers"]
    manager = info.get("manager")
    if manager:
        lines.append(
            f"  manager    {manager['url']}  fabric {manager['fabric']}  (user root: see root-password in {manager['log']})"
        )
        lines.append(f"  console    {manager['url']}/console/")
    lines.append(f"  scheduler  {', '.join(schedulers)}")
    for name in ("seed", "daemon"):
        if name in parts:
            p = parts[name]
            lines.append(f"  {name:<9}  pieces {', '.join(p['piece_server'])}  api {', '.join(p['api'])}")
    lines += [
        f"  state      {cluster_file(Path(info['data_dir']))} (endpoints, pids); logs in {Path(info['data_dir']) / 'logs'}",
        "",
        "Download through it:",
        f"  dfz get URL -O FILE --endpoint {info['endpoint']}",
        f"  (or export DFZ_ENDPOINT={info['endpoint']} and run dfz get URL -O FILE)",
        "Join it with another daemon:",
        "  dfz daemon --data-dir DIR " + " ".join(f"--scheduler {s}" for s in schedulers),
        *(
            [f"  (or dfz daemon --data-dir DIR --manager {manager['fabric']}: the manager gives the schedulers)"]
            if manager
            else []
        ),
        f"Stop it with Ctrl-C or kill -TERM {info['pid']}.",
    ]
    return "\n".join(lines)


async def run_up(config: UpConfig, *, echo: Callable[[str], None] = print, error: Callable[[str], None] | None = None) -> int:
    """Run ``dfz up`` until SIGTERM, SIGINT or SIGHUP (or until a part fails); the exit status: 0 when every part
    started and stopped cleanly, 1 otherwise. A second signal while stopping kills what still runs."""

    def say_error(text: str) -> None:
        (error or (lambda t: print(t, file=sys.stderr, flush=True)))(f"dfz up: {text}")

    cluster = Cluster(config)
    code = 0
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:  # HUP: its terminal closed

        async def on_signal(then: Callable[[], None]) -> None:
            async for _ in signals:
                then()
                return

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(on_signal, nursery.cancel_scope.cancel)
                try:
                    info = await cluster.start()
                    echo(summary(info))
                    why = await cluster.watch()
                    say_error(f"{why}\nstopping the cluster")
                except (UpError, OSError) as e:
                    say_error(str(e) if isinstance(e, UpError) else f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}")
                code = 1
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(on_signal, cluster.kill)
                    problems = await cluster.stop()
                    nursery.cancel_scope.cancel()
    for problem in problems:
        say_error(problem)
    return 1 if problems else code


def wait_for_cluster(data_dir: Path, timeout: float = 30.0, *, alive: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Block until ``DIR/cluster.json`` exists (a ``dfz up`` serves there) and return it; for scripts.
    ``alive()`` returning False (the ``dfz up`` process died) or the timeout raises :class:`UpError`."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            return read_cluster(data_dir)
        except FileNotFoundError:
            pass
        except json.JSONDecodeError:  # written atomically, so only a foreign or corrupt file
            raise UpError(f"{cluster_file(data_dir)} is not valid JSON") from None
        if alive is not None and not alive():
            raise UpError(f"dfz up exited before it wrote {cluster_file(data_dir)}")
        if time.monotonic() > deadline:
            raise UpError(f"no {cluster_file(data_dir)} within {timeout:g} s")
        time.sleep(0.05)


__all__ = [
    "CLUSTER_FILE",
    "CLUSTER_FORMAT",
    "Cluster",
    "Part",
    "UpConfig",
    "UpError",
    "cluster_file",
    "read_cluster",
    "run_up",
    "summary",
    "wait_for_cluster",
]
