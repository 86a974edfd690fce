"""Several schedulers, end to end: real ``dfz sched``, ``dfz seed``, ``dfz daemon`` and ``dfz get`` processes
on 127.0.0.1 (ephemeral ports) and an HTTP origin in the test that counts the bytes it serves
(:func:`e2e_helpers.serve_origin`).

Three schedulers share the tasks by consistent hashing of the task id (``dfz.peer.schedring``); one is
killed with SIGKILL while a swarm of a seed and three daemons downloads six files (two on each scheduler,
the transfer slowed by upload rate limits). The daemons move its tasks to the next scheduler on the ring
and every download completes, with the right bytes, keeping the pieces it had.
"""

from __future__ import annotations

import hashlib
import random
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import pytest
import trio
from e2e_helpers import Procs, Route, dfz_cmd, read_line, serve_origin

from dfz.broker import Catalogue, Message, Request, Server, ServerConfig
from dfz.peer.config import DaemonConfig
from dfz.peer.daemon import Daemon
from dfz.peer.local import DownloadRequest, DownloadState
from dfz.peer.schedring import SchedulerRing
from dfz.sched.messages import SCHED_TYPES, SchedAnnounceHost, SchedHostAnnounced, SchedHostLoad
from dfz.sched.service import SchedulerService, ServiceConfig

KiB = 1024
MiB = 1024 * KiB
PIECE = 256 * KiB

pytestmark = pytest.mark.timeout(90)


@dataclass
class Node:
    proc: subprocess.Popen[bytes]
    api: str
    log: Path


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


def start_sched(procs: Procs, root: Path, name: str) -> tuple[subprocess.Popen[bytes], str]:
    with (root / f"{name}.log").open("ab") as log:
        proc = procs.start(dfz_cmd("sched", "--listen", "tcp://127.0.0.1:0", "-v"), stdout=subprocess.PIPE, stderr=log)
    return proc, read_line(proc, "listening")


def start_node(procs: Procs, root: Path, name: str, schedulers: list[str], *args: str, seed: bool = False) -> Node:
    log = root / f"{name}.log"
    argv = dfz_cmd("seed" if seed else "daemon", "--data-dir", str(root / name), *args, "-v")
    for endpoint in schedulers:
        argv += ["--scheduler", endpoint]
    with log.open("ab") as err:
        proc = procs.start(argv, stdout=subprocess.PIPE, stderr=err)
    try:
        lines = [read_line(proc, "scheduler") for _ in schedulers]
        api = read_line(proc, "api ")
    except AssertionError:
        raise AssertionError(f"{name} did not start: {log.read_text()}") from None
    assert sorted(lines) == sorted(schedulers)
    return Node(proc, api, log)


def task_id(url: str) -> str:
    """The id of the task ``dfz get URL --piece-length 256KiB`` downloads."""
    return DownloadRequest(url=url, output=None, piece_length=PIECE).task_id()


def pick_files(base: str, ring: SchedulerRing, per_scheduler: int) -> list[str]:
    """Paths whose tasks fall ``per_scheduler`` on each scheduler (the port in ``base`` changes the task
    ids from run to run, so they are chosen here, by the rule the daemons follow)."""
    load: Counter[str] = Counter()
    paths: list[str] = []
    for i in count():
        path = f"/f{i}"
        owner = ring.owner(task_id(base + path))
        if load[owner] < per_scheduler:
            load[owner] += 1
            paths.append(path)
        if len(paths) == per_scheduler * len(ring):
            return paths
    raise AssertionError("unreachable")


def test_a_scheduler_killed_mid_swarm_its_tasks_move_and_every_download_completes(procs: Procs, short_tmp: str) -> None:
    root = Path(short_tmp)
    rng = random.Random(7)
    with serve_origin({}) as origin:
        scheds = [start_sched(procs, root, f"sched{i}") for i in range(3)]
        endpoints = [endpoint for _, endpoint in scheds]
        ring = SchedulerRing(endpoints)
        paths = pick_files(origin.url, ring, 2)
        files = {path: rng.randbytes(4 * MiB + rng.randrange(1, PIECE)) for path in paths}
        for path, data in files.items():
            origin.routes[path] = Route(data)

        # Uploads throttled, so that the swarm is still busy when the scheduler dies (~24 MiB from the
        # seed at 3 MB/s); the daemons list the schedulers in different orders (it does not matter).
        rate = ["--upload-rate", "3000000"]
        start_node(procs, root, "seed", endpoints, *rate, seed=True)
        daemons = [start_node(procs, root, f"d{i}", endpoints[i:] + endpoints[:i], *rate) for i in range(3)]

        gets: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
        for i, daemon in enumerate(daemons):
            for path in paths:
                out = root / f"out-d{i}{path.replace('/', '-')}"
                argv = dfz_cmd(
                    "get", origin.url + path, "-O", str(out), "--endpoint", daemon.api, "--no-progress", "--timeout", "60"
                )
                gets.append((path, out, procs.start([*argv, "--piece-length", "256KiB"], stderr=subprocess.PIPE)))

        total = sum(len(d) for d in files.values())
        wait_for(lambda: sum(origin.served.values()) >= total, 20, "the seed fetches every file from the origin")
        time.sleep(0.7)  # the daemons store a few pieces (the throttled swarm needs ~6 s in all)
        victim, dead = scheds[0][0], endpoints[0]
        # Meaningful only if downloads of the victim's tasks are under way (not if all of them ended, which a
        # loaded machine could make happen: then the rest of the test would prove nothing).
        on_victim = [get for path, _, get in gets if ring.owner(task_id(origin.url + path)) == dead]
        assert any(get.poll() is None for get in on_victim), "every download of the victim's tasks ended before the kill"
        victim.send_signal(signal.SIGKILL)
        victim.wait(5)

        for path, out, get in gets:
            _, err = get.communicate(timeout=70)
            assert get.returncode == 0, f"{path}: {err.decode()}"
            assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(files[path]).hexdigest(), path

    logs = [d.log.read_text() for d in daemons]
    # Every daemon moved the tasks it had on the dead scheduler (its peers there) to the next one ...
    for log in logs:
        assert re.search(rf"daemon\.fail_over .*scheduler={re.escape(dead)}", log), log[-3000:]
    # ... registered them there, and carried on from the pieces it had stored, reporting them.
    moved = {task_id(origin.url + p) for p in paths if ring.owner(task_id(origin.url + p)) == dead}
    resumed = [
        (m["task"], int(m["pieces"]), m["scheduler"])
        for log in logs
        for m in re.finditer(
            r"daemon\.resumed task=(?P<task>\w+) peer=\S+ pieces=(?P<pieces>\d+) scheduler=(?P<scheduler>\S+)", log
        )
    ]
    assert any(task in moved and pieces > 0 and where != dead for task, pieces, where in resumed), resumed
    # No download started over from the origin: each file left it once (the seed's fetch).
    assert all(origin.served[path] == len(data) for path, data in files.items()), origin.served


# --- in one process: a scheduler that comes back, and the host load ------------------------------------


async def _until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (the caller bounds the wait with ``trio.fail_after``)."""
    for _ in count():
        if condition():
            return
        await trio.sleep(0.01)


async def test_a_scheduler_that_comes_back_gets_new_tasks_again(tmp_path: Path, short_tmp: str) -> None:
    """Scheduler A of {A, B} is down: a task of A's goes to B. A comes back: the next task of A's goes to A
    (and the one on B stays there)."""
    data = random.Random(3).randbytes(2 * MiB + 5)
    endpoints = [f"ipc://{short_tmp}/a", f"ipc://{short_tmp}/b"]
    ring = SchedulerRing(endpoints)
    configs = [ServiceConfig(listen=(e,), heartbeat=0.2) for e in endpoints]
    with serve_origin({}) as origin:
        first, second = [p for p in (f"/g{i}" for i in range(200)) if ring.owner(task_id(origin.url + p)) == endpoints[0]][:2]
        for path in (first, second):
            origin.routes[path] = Route(data)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                a_scope = trio.CancelScope()

                async def run_a(task_status: trio.TaskStatus[SchedulerService]) -> None:
                    with a_scope:
                        await SchedulerService(configs[0]).run(task_status=task_status)

                sched_a = await nursery.start(run_a)
                sched_b = await nursery.start(SchedulerService(configs[1]).run)

                def daemon_config(name: str, seed: bool = False) -> DaemonConfig:
                    return DaemonConfig(data_dir=tmp_path / name, schedulers=tuple(endpoints), seed=seed, report_interval=0.02)

                await nursery.start(Daemon(daemon_config("seed", seed=True)).run)
                daemon = await nursery.start(Daemon(daemon_config("d")).run)
                await _until(lambda: len(daemon.schedulers_up) == 2)

                a_scope.cancel()
                await _until(lambda: daemon.schedulers_up == [endpoints[1]])
                request = DownloadRequest(url=origin.url + first, output=str(tmp_path / "one"), piece_length=PIECE)
                result = [p async for p in daemon.download(request)][-1]
                assert result.state is DownloadState.SUCCEEDED and result.bytes_from_peers == len(data), result
                assert task_id(origin.url + first) in sched_b.core.tasks

                sched_a = await nursery.start(SchedulerService(configs[0]).run)
                await _until(lambda: len(daemon.schedulers_up) == 2 and len(sched_a.core.hosts) == 2)  # the seed too
                request = DownloadRequest(url=origin.url + second, output=str(tmp_path / "two"), piece_length=PIECE)
                result = [p async for p in daemon.download(request)][-1]
                assert result.state is DownloadState.SUCCEEDED and result.bytes_from_peers == len(data), result
                assert task_id(origin.url + second) in sched_a.core.tasks
                assert task_id(origin.url + second) not in sched_b.core.tasks
                assert task_id(origin.url + first) in sched_b.core.tasks  # finished there: it stays
                nursery.cancel_scope.cancel()
    assert (tmp_path / "one").read_bytes() == data and (tmp_path / "two").read_bytes() == data


class _FakeScheduler:
    """A fabric server that answers ``sched.announce_host`` and records ``sched.host_load`` pushes; with
    ``old=True`` its catalogue predates ``sched.host_load``."""

    def __init__(self, endpoint: str, *, old: bool = False) -> None:
        types = [t for t in SCHED_TYPES if not (old and t is SchedHostLoad)]
        self.server = Server(Catalogue(types, max_payload=0), [endpoint], name="fake-sched", config=ServerConfig())
        self.loads: list[SchedHostLoad] = []
        self.server.handle(SchedAnnounceHost, self._announce)
        if not old:
            self.server.on_push(SchedHostLoad, lambda _session, msg, _payload: self.loads.append(msg))  # type: ignore[arg-type]

    async def _announce(self, req: Request) -> Message:
        assert isinstance(req.msg, SchedAnnounceHost)
        return SchedHostAnnounced(host_id=req.msg.host_id, session=req.peer.session, scheduler="fake-sched")


async def test_the_host_load_goes_to_every_scheduler_that_knows_it(tmp_path: Path, short_tmp: str) -> None:
    new = [_FakeScheduler(f"ipc://{short_tmp}/n{i}") for i in range(2)]
    old = _FakeScheduler(f"ipc://{short_tmp}/old", old=True)
    everyone = [*new, old]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for fake in everyone:
                await nursery.start(fake.server.run)
            endpoints = tuple(f.server.endpoints[0] for f in everyone)
            daemon = await nursery.start(Daemon(DaemonConfig(data_dir=tmp_path / "d", schedulers=endpoints)).run)
            await _until(lambda: all(len(f.loads) >= 2 for f in new))
            assert len(daemon.schedulers_up) == 3
            assert not old.server.stats.bad_frames, old.server.stats.bad_frames  # it was never sent one
            nursery.cancel_scope.cancel()
    for fake in new:
        assert all(m.upload_rate == m.uploads_in_flight == m.upload_peers == 0 for m in fake.loads)  # nothing uploaded


def test_upload_meter_measures_over_the_window() -> None:
    from dfz.peer.daemon import _UploadMeter

    meter = _UploadMeter()
    assert meter.rate(0.0, 0) == 0
    assert meter.rate(1.0, 1000) == 1000
    assert meter.rate(2.0, 3000) == 1500
    for t in range(3, 12):
        rate = meter.rate(float(t), 3000)  # idle from t=2 on
    assert rate == 0
    assert meter.rate(12.0, 8000) == 1000  # over the last 5 s
