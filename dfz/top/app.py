"""``dfz top``: where the schedulers are, polling them and the manager, keys, and the live screen.

Theory of operation. :func:`resolve_sources` turns the command's options into scheduler endpoints and an
optional manager (``cluster.json`` of ``dfz up``, the manager's REST API, or ``--scheduler`` endpoints),
checking everything it reads. :func:`run_top` then runs, in one trio nursery: one poller per scheduler
(a fabric session that announces no host, a ``sched.inspect`` every ``interval`` seconds, paging through
the hosts), a manager poller (its REST API in a worker thread, every few seconds), a key reader (the
terminal in cbreak mode, fd 0 watched with ``trio.lowlevel.wait_readable``: no thread, nothing blocks
trio) and the painter, which draws a frame with ``rich.live.Live`` when something changed, at most
:data:`MAX_FPS` times a second. ``q`` cancels the nursery; the terminal's mode is restored on every way
out (``q``, Ctrl-C, an error). Without a terminal, ``--once`` polls twice (rates need two snapshots),
prints one frame (or ``--json``) and returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import math
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import msgspec
import trio
from rich.console import Console

from ..broker import FabricError, RemoteError
from ..log import event, get_logger
from ..sched.inspect import connect, inspect_hosts
from ..sched.messages import MAX_INSPECT_PEERS, MAX_INSPECT_TASKS
from .render import render
from .view import HOST_SORTS, HostSortKey, ManagerInfo, TopView

log = get_logger("top")

MAX_FPS = 10
MANAGER_EVERY = 3.0
"""Seconds between two polls of the manager's REST API (its lists change slowly)."""
RECENT_JOBS = 10
_ENDPOINT_SCHEMES = ("tcp", "ipc", "inproc")


class TopError(Exception):
    """``dfz top`` cannot start: no source, a bad ``cluster.json``, a manager that refuses. The message
    says what to do."""


@dataclass(frozen=True)
class Sources:
    schedulers: tuple[str, ...]
    manager: str | None = None
    """The manager's REST URL, when known (for its schedulers, seed peers and jobs)."""
    token: str | None = None


@dataclass(frozen=True)
class TopOptions:
    interval: float = 1.0
    max_hosts: int = 2000
    host_sort: HostSortKey = "down"
    timeout: float = 5.0
    """Seconds a scheduler has to answer one inspection (each page)."""


# --- sources ----------------------------------------------------------------------------------------------


def check_endpoint(endpoint: str) -> str:
    """``endpoint`` if it is a fabric endpoint (``tcp://HOST:PORT``, ``ipc://PATH``); else :class:`TopError`."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in _ENDPOINT_SCHEMES or not rest or len(endpoint) > 1024 or any(c.isspace() for c in endpoint):
        raise TopError(f"{endpoint!r} is not a scheduler endpoint such as tcp://127.0.0.1:8002")
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise TopError(f"{endpoint!r}: a tcp endpoint needs a host and a port, e.g. tcp://127.0.0.1:8002")
    return endpoint


def read_cluster_json(path: Path) -> tuple[tuple[str, ...], str | None]:
    """The scheduler endpoints and the manager's URL in a ``cluster.json`` (or a ``dfz up`` data directory
    holding one). Every value is checked: a file that is not what ``dfz up`` writes is a :class:`TopError`."""
    file = path / "cluster.json" if path.is_dir() else path
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise TopError(f"no {file}: is `dfz up` running there? (or pass --scheduler ENDPOINT or --manager URL)") from None
    except OSError as e:
        raise TopError(f"cannot read {file}: {e.strerror or e}") from None
    if len(raw) > 1 << 20:
        raise TopError(f"{file} is larger than 1 MiB: not a cluster.json of dfz up")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise TopError(f"{file} is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise TopError(f"{file}: expected a JSON object (the cluster.json of dfz up)")
    schedulers = data.get("schedulers")
    if schedulers is None and isinstance(data.get("scheduler"), str):
        schedulers = [data["scheduler"]]
    if not isinstance(schedulers, list) or not schedulers or not all(isinstance(s, str) for s in schedulers):
        raise TopError(f"{file}: `schedulers` must be a non-empty list of endpoints")
    if len(schedulers) > 64:
        raise TopError(f"{file}: more than 64 schedulers")
    endpoints = tuple(check_endpoint(s) for s in schedulers)
    manager = data.get("manager")
    url: str | None = None
    if manager is not None:
        if not isinstance(manager, dict) or not isinstance(manager.get("url"), str):
            raise TopError(f"{file}: `manager` must be null or an object with a `url`")
        url = check_url(manager["url"])
    return endpoints, url


def check_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or len(url) > 2048:
        raise TopError(f"{url!r} is not the manager's HTTP address, such as http://127.0.0.1:8080")
    return url.rstrip("/")


def resolve_sources(
    *, cluster: Path | None, manager: str | None, schedulers: tuple[str, ...], token: str | None, default_dir: Path
) -> Sources:
    """The schedulers to watch and the manager to ask, from the options (see ``dfz top --help``): explicit
    ``--scheduler`` endpoints win, else the manager's registered schedulers, else ``cluster.json``
    (``--cluster``, else the default data directory's)."""
    url = check_url(manager) if manager else None
    endpoints = tuple(check_endpoint(s) for s in schedulers)
    if (not endpoints and url is None) or cluster is not None:
        found, cluster_manager = read_cluster_json(cluster if cluster is not None else default_dir)
        endpoints = endpoints or found
        url = url or cluster_manager
    if not endpoints:
        assert url is not None
        if not token:
            raise TopError("--manager needs --token (or $DFZ_TOKEN): a personal access token to read its schedulers")
        endpoints = manager_schedulers(url, token)
        if not endpoints:
            raise TopError(f"the manager at {url} knows no active scheduler")
    return Sources(tuple(dict.fromkeys(endpoints)), url, token or None)


def _get_json(url: str, path: str, token: str, timeout: float = 5.0) -> Any:
    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            body = answer.read(8 << 20)
    except urllib.error.HTTPError as e:
        detail = ""
        with contextlib.suppress(Exception):
            detail = str(json.loads(e.read(65536)).get("detail", ""))
        if e.code in (401, 403):
            raise TopError(f"the manager refused the token ({e.code}): {detail or e.reason}") from None
        raise TopError(f"the manager answered {e.code} to GET {path}: {detail or e.reason}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise TopError(f"cannot reach the manager at {url}: {reason}") from None
    try:
        return json.loads(body)
    except ValueError:
        raise TopError(f"the manager's answer to GET {path} is not JSON") from None


def _items(page: Any, path: str) -> list[dict[str, Any]]:
    if not isinstance(page, dict) or not isinstance(page.get("items"), list):
        raise TopError(f"the manager's answer to GET {path} is not a page of items")
    return [item for item in page["items"] if isinstance(item, dict)]


def _tcp(ip: Any, port: Any) -> str | None:
    if not isinstance(ip, str) or isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        return None
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return f"tcp://[{address}]:{port}" if address.version == 6 else f"tcp://{address}:{port}"


def manager_schedulers(url: str, token: str) -> tuple[str, ...]:
    """The fabric endpoints of the schedulers the manager lists as active (``GET /api/v1/schedulers``)."""
    path = "/api/v1/schedulers?per_page=1000"
    rows = _items(_get_json(url, path, token), path)
    active = [r for r in rows if r.get("state") == "active"] or rows
    return tuple(e for e in (_tcp(r.get("ip"), r.get("port")) for r in active) if e is not None)


def read_manager(url: str, token: str | None) -> ManagerInfo:
    """The manager's schedulers, seed peers and latest jobs (each row checked to be an object)."""
    info = ManagerInfo(url)
    if not token:
        info.notice = "no token (--token or $DFZ_TOKEN): the manager's seed peers and jobs are not shown"
        return info
    try:
        path = "/api/v1/schedulers?per_page=1000"
        info.schedulers = _items(_get_json(url, path, token), path)
        path = "/api/v1/seed-peers?per_page=1000"
        info.seed_peers = _items(_get_json(url, path, token), path)
        path = "/api/v1/jobs?per_page=1"
        first = _get_json(url, path, token)
        total = first.get("total") if isinstance(first, dict) else None
        if not isinstance(total, int) or isinstance(total, bool) or total < 0:
            raise TopError("the manager's job list has no total")
        jobs: list[dict[str, Any]] = []
        last = max(1, math.ceil(total / RECENT_JOBS))
        for page in (last, last - 1):  # pages are in id order: the newest jobs are on the last ones
            if page >= 1 and len(jobs) < RECENT_JOBS:
                path = f"/api/v1/jobs?per_page={RECENT_JOBS}&page={page}"
                jobs.extend(_items(_get_json(url, path, token), path))
        jobs.sort(key=lambda j: j["id"] if isinstance(j.get("id"), int) else 0, reverse=True)
        info.jobs = jobs[:RECENT_JOBS]
    except TopError as e:
        info.error = str(e)
    return info


# --- polling ----------------------------------------------------------------------------------------------


class _Changed:
    """Wakes the painter when the view changed."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


def _describe(error: BaseException) -> str:
    if isinstance(error, RemoteError):
        return f"refused: {error.code} {error.reason}"
    if isinstance(error, trio.TooSlowError | TimeoutError):
        return "no answer (timeout)"
    return f"{type(error).__name__}: {error}"


async def _poll_once(client: Any, endpoint: str, view: TopView, options: TopOptions) -> bool:
    started = trio.current_time()
    try:
        with trio.fail_after(options.timeout * 2):
            snap = await inspect_hosts(
                client,
                max_hosts=options.max_hosts,
                host_sort="upload_rate",
                timeout=options.timeout,
                tasks=MAX_INSPECT_TASKS,
                task_id=view.wanted_task(endpoint),
                peers=MAX_INSPECT_PEERS,
            )
    except (FabricError, trio.TooSlowError) as e:
        view.failed(endpoint, _describe(e), now=time.time())
        event(log, 10, "top_poll_failed", scheduler=endpoint, error=_describe(e))
        return False
    view.update(endpoint, snap, now=time.time(), latency=trio.current_time() - started)
    return True


async def _poll_scheduler(endpoint: str, view: TopView, options: TopOptions, changed: _Changed, rounds: int | None) -> None:
    async with connect(endpoint, name="dfz-top", timeout=options.timeout) as client:
        done = 0
        while rounds is None or done < rounds:
            started = trio.current_time()
            ok = await _poll_once(client, endpoint, view, options)
            changed.set()
            done += 1
            if not ok and rounds is not None:
                return  # --once: a scheduler that did not answer is shown as such, not waited for again
            if rounds is None or done < rounds:
                await trio.sleep_until(started + options.interval)


async def _poll_manager(sources: Sources, view: TopView, changed: _Changed, once: bool) -> None:
    assert sources.manager is not None
    while True:
        info = await trio.to_thread.run_sync(read_manager, sources.manager, sources.token, abandon_on_cancel=True)
        info.updated = time.time()
        view.set_manager(info, now=time.time())
        changed.set()
        if once:
            return
        await trio.sleep(MANAGER_EVERY)


# --- keys -------------------------------------------------------------------------------------------------


def parse_keys(data: bytes) -> list[str]:
    """Key names in what the terminal sent: ``up``, ``down``, ``escape``, or the character (``q``, ``s``,
    ``j``, ``k``, ...). Other escape sequences (CSI ``ESC [ params final``, SS3 ``ESC O x``) are skipped whole."""
    keys: list[str] = []
    i, n = 0, len(data)
    while i < n:
        if data[i] != 0x1B:
            keys.append(chr(data[i]))
            i += 1
            continue
        if i + 1 >= n or data[i + 1] not in b"[O":
            keys.append("escape")
            i += 1
            continue
        j = i + 2
        while j < n and 0x30 <= data[j] <= 0x3F:  # parameter bytes of a CSI sequence
            j += 1
        final = data[j : j + 1]
        if j == i + 2 and final in (b"A", b"B"):
            keys.append("up" if final == b"A" else "down")
        i = j + 1
    return keys


def apply_key(view: TopView, key: str) -> bool:
    """Apply one key to the view; False for a key that quits."""
    if key in ("q", "Q"):
        return False
    if key in ("up", "k"):
        view.move(-1)
    elif key in ("down", "j"):
        view.move(1)
    elif key in ("s", "S"):
        view.cycle_sort()
    return True


@contextlib.contextmanager
def cbreak(fd: int) -> Iterator[None]:
    """The terminal at ``fd`` in cbreak mode (keys arrive one by one, not echoed; Ctrl-C still interrupts),
    its mode restored on the way out, however it is left."""
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _read_keys(fd: int, view: TopView, changed: _Changed, quit_scope: trio.CancelScope) -> None:
    while True:
        await trio.lowlevel.wait_readable(fd)
        data = os.read(fd, 64)
        if not data:  # end of input: keys are over, the view goes on
            return
        for key in parse_keys(data):
            if not apply_key(view, key):
                quit_scope.cancel()
                return
        changed.set()


# --- running ----------------------------------------------------------------------------------------------


async def run_top(sources: Sources, options: TopOptions, *, console: Console | None = None) -> None:
    """The live view until ``q`` (or Ctrl-C, which raises ``KeyboardInterrupt`` after the terminal is restored)."""
    from rich.live import Live

    console = console or Console()
    view = TopView(sources.schedulers, host_sort=options.host_sort)
    changed = _Changed()
    fd = sys.stdin.fileno()
    keys = sys.stdin.isatty()
    with contextlib.ExitStack() as stack:
        if keys:
            stack.enter_context(cbreak(fd))
        live = stack.enter_context(Live(console=console, screen=True, auto_refresh=False, transient=True))
        async with trio.open_nursery() as nursery:
            for endpoint in sources.schedulers:
                nursery.start_soon(_poll_scheduler, endpoint, view, options, changed, None)
            if sources.manager is not None:
                nursery.start_soon(_poll_manager, sources, view, changed, False)
            if keys:
                nursery.start_soon(_read_keys, fd, view, changed, nursery.cancel_scope)
            frame_times: list[float] = []
            while True:
                started = time.perf_counter()
                with contextlib.suppress(OSError):  # the terminal's own size wins over $COLUMNS and $LINES, resized or not
                    size = os.get_terminal_size(sys.stdout.fileno())
                    console.size = (size.columns, size.lines)
                live.update(render(view, height=console.size.height, now=time.time()), refresh=True)
                frame_times.append(time.perf_counter() - started)
                if len(frame_times) >= 100:
                    event(log, 10, "top_frames", frames=len(frame_times), worst_ms=round(max(frame_times) * 1000, 1))
                    frame_times.clear()
                with trio.move_on_after(1.0):  # the clock in the header moves even when nothing else does
                    await changed.wait()
                await trio.sleep(1 / MAX_FPS)


async def snapshot_once(sources: Sources, options: TopOptions) -> TopView:
    """Poll every scheduler twice, ``interval`` apart (rates need two snapshots), and the manager once."""
    view = TopView(sources.schedulers, host_sort=options.host_sort)
    changed = _Changed()
    async with trio.open_nursery() as nursery:
        for endpoint in sources.schedulers:
            nursery.start_soon(_poll_scheduler, endpoint, view, options, changed, 2)
        if sources.manager is not None:
            nursery.start_soon(_poll_manager, sources, view, changed, True)
    return view


def print_once(view: TopView, *, out: TextIO, width: int, height: int) -> None:
    console = Console(file=out, width=width, height=height, force_terminal=False, color_system=None, legacy_windows=False)
    console.print(render(view, height=height, now=time.time()))


def as_json(view: TopView) -> dict[str, Any]:
    """What ``--json`` prints: the schedulers' health, every host and task with rates, and the swarm."""
    swarm = view.swarm()
    return {
        "schedulers": [dataclasses.asdict(h) for h in view.health.values()],
        "hosts": [dataclasses.asdict(h) for h in view.hosts()],
        "tasks": [dataclasses.asdict(t) for t in view.tasks()[0]],
        "selected": view.selected,
        "swarm": [dataclasses.asdict(n) for n in swarm.roots],
        "manager": None if view.manager is None else dataclasses.asdict(view.manager),
        "errors": [{"time": at, "source": source, "message": message} for at, source, message in view.errors],
    }


def dumps(data: Any) -> str:
    return msgspec.json.encode(data).decode()


def host_sort_choice(value: str) -> HostSortKey:
    for key in HOST_SORTS:
        if key == value:
            return key
    raise TopError(f"--sort: one of {', '.join(HOST_SORTS)}")
