"""The peer daemon end to end, in one process on real sockets: an HTTP origin (``http.server`` in a thread,
byte ranges, counting what it serves: :func:`e2e_helpers.serve_origin`), an in-process
:class:`SchedulerService`, a seed daemon and normal daemons, each with its own storage directory, all
driven through :meth:`Daemon.download`."""

from __future__ import annotations

import hashlib
import itertools
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner
from e2e_helpers import Origin, Route, serve_origin

from dfz.cli import main as cli_main
from dfz.peer import daemon as daemon_module
from dfz.peer.config import ConfigError, DaemonConfig
from dfz.peer.daemon import Daemon
from dfz.peer.local import DownloadRequest, DownloadState, Progress
from dfz.peer.upload import PieceServerConfig
from dfz.sched.actions import ForwardDigests, PushParents
from dfz.sched.config import SchedulerConfig
from dfz.sched.core import SchedulerCore
from dfz.sched.errors import SchedulerError
from dfz.sched.events import AnnounceHost, AnnounceTask, RegisterPeer
from dfz.sched.service import SchedulerService, ServiceConfig
from dfz.sched.state import PeerState

MiB = 1024 * 1024
BIG = random.Random(11).randbytes(24 * MiB + 12345)  # not a multiple of the piece length
PIECE = 2 * MiB
FILES: dict[str, bytes] = {
    "/big": BIG,
    "/small": random.Random(3).randbytes(3 * MiB + 7),
    "/tiny": b"tiny file\n",
    "/empty": b"",
    "/chunked": random.Random(5).randbytes(5 * MiB + 3),
    "/slow": BIG,  # every range request waits a little: a download can be stopped half-way
}


# --- the origin ------------------------------------------------------------------------------------------

ROUTES: dict[str, Route] = {
    path: Route(data, chunked=path == "/chunked", delay=0.1 if path == "/slow" else 0.0) for path, data in FILES.items()
}
"""``/chunked``: no ranges, no length; ``/slow``: every range request waits a little."""


@pytest.fixture
def origin() -> Iterator[Origin]:
    with serve_origin(dict(ROUTES)) as o:
        yield o


# --- the cluster -----------------------------------------------------------------------------------------


@dataclass
class Cluster:
    sched: SchedulerService
    seed: Daemon
    daemons: list[Daemon]


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with trio.open_nursery() as nursery:
        sched = await nursery.start(SchedulerService(ServiceConfig(listen=("tcp://127.0.0.1:0",))).run)
        endpoint = sched.endpoints[0]
        seed = await nursery.start(
            Daemon(DaemonConfig(data_dir=tmp_path / "seed", scheduler=endpoint, seed=True, report_interval=0.02)).run
        )
        daemons = [
            await nursery.start(Daemon(DaemonConfig(data_dir=tmp_path / f"d{i}", scheduler=endpoint, report_interval=0.02)).run)
            for i in range(3)
        ]
        yield Cluster(sched, seed, daemons)
        nursery.cancel_scope.cancel()


async def fetch(daemon: Daemon, request: DownloadRequest) -> Progress:
    """Run a download to its end; the final progress (checked to be the last and final item)."""
    items = [p async for p in daemon.download(request)]
    assert items, "no progress at all"
    for p in items[:-1]:
        assert p.state in (DownloadState.PENDING, DownloadState.RUNNING), p
    return items[-1]


async def until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (the caller bounds the wait with ``trio.fail_after``)."""
    for _ in itertools.count():
        if condition():
            return
        await trio.sleep(0.01)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- tests -----------------------------------------------------------------------------------------------


async def test_swarm_serves_the_origin_once_and_then_hits_the_cache(cluster: Cluster, origin: Origin, tmp_path: Path) -> None:
    url = f"{origin.url}/big"
    everyone = [cluster.seed, *cluster.daemons]
    outputs = [tmp_path / f"out{i}" for i in range(len(everyone))]
    results: list[Progress | None] = [None] * len(everyone)

    async def one(i: int) -> None:
        results[i] = await fetch(everyone[i], DownloadRequest(url=url, output=str(outputs[i]), piece_length=PIECE))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(len(everyone)):
                nursery.start_soon(one, i)

    want = sha256(BIG)
    for i, result in enumerate(results):
        assert result is not None and result.state is DownloadState.SUCCEEDED, result
        assert result.content_length == len(BIG)
        assert sha256(outputs[i].read_bytes()) == want
    assert origin.served["/big"] == len(BIG), "the origin served the file's bytes more than once"
    assert origin.probes["/big"] == 1
    assert sum(r.bytes_from_origin for r in results if r is not None) == len(BIG)
    for r in results[1:]:
        assert r is not None and r.bytes_from_peers == len(BIG) and r.bytes_from_origin == 0

    # A second download of the same URL on one daemon: a local hit, nothing from anywhere.
    requests_before = dict(origin.requests)
    again = tmp_path / "again"
    with trio.fail_after(10):
        hit = await fetch(cluster.daemons[0], DownloadRequest(url=url, output=str(again), piece_length=PIECE))
    assert hit.state is DownloadState.SUCCEEDED
    assert (hit.bytes_from_cache, hit.bytes_from_peers, hit.bytes_from_origin) == (len(BIG), 0, 0)
    assert sha256(again.read_bytes()) == want
    assert origin.requests == requests_before
    listed = {t.task_id: t for t in cluster.daemons[0].list_tasks()}
    assert listed[hit.task_id].complete


async def test_joined_downloads_share_one_task(cluster: Cluster, origin: Origin, tmp_path: Path) -> None:
    url = f"{origin.url}/small"
    daemon = cluster.daemons[1]
    outs = [tmp_path / "a", tmp_path / "b"]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for out in outs:
                nursery.start_soon(fetch, daemon, DownloadRequest(url=url, output=str(out)))
    for out in outs:
        assert out.read_bytes() == FILES["/small"]
    assert origin.served["/small"] == len(FILES["/small"])


async def test_origin_404_fails_with_origin_not_found(cluster: Cluster, origin: Origin, tmp_path: Path) -> None:
    out = tmp_path / "missing"
    with trio.fail_after(20):
        result = await fetch(cluster.daemons[0], DownloadRequest(url=f"{origin.url}/nope", output=str(out)))
    assert result.state is DownloadState.FAILED
    assert result.error_kind == "origin_not_found", result
    assert not out.exists()


async def test_digest_mismatch_fails_and_leaves_no_output(cluster: Cluster, origin: Origin, tmp_path: Path) -> None:
    out = tmp_path / "wrong"
    url = f"{origin.url}/small"
    with trio.fail_after(20):
        bad = await fetch(cluster.daemons[2], DownloadRequest(url=url, output=str(out), digest="sha256:" + "0" * 64))
    assert bad.state is DownloadState.FAILED and bad.error_kind == "digest_mismatch", bad
    assert not out.exists()
    with trio.fail_after(10):
        good = await fetch(
            cluster.daemons[2], DownloadRequest(url=url, output=str(out), digest="sha256:" + sha256(FILES["/small"]))
        )
    assert good.state is DownloadState.SUCCEEDED and good.bytes_from_cache == len(FILES["/small"])
    assert out.read_bytes() == FILES["/small"]


@pytest.mark.parametrize("path", ["/empty", "/tiny"])
async def test_empty_and_tiny_files(cluster: Cluster, origin: Origin, tmp_path: Path, path: str) -> None:
    outs = [tmp_path / f"o{i}" for i in range(2)]
    with trio.fail_after(20):
        for daemon, out in zip(cluster.daemons, outs, strict=False):
            result = await fetch(daemon, DownloadRequest(url=origin.url + path, output=str(out)))
            assert result.state is DownloadState.SUCCEEDED, result
            assert result.content_length == len(FILES[path])
    for out in outs:
        assert out.read_bytes() == FILES[path]


async def test_unknown_content_length(cluster: Cluster, origin: Origin, tmp_path: Path) -> None:
    url = f"{origin.url}/chunked"
    outs = [tmp_path / f"c{i}" for i in range(2)]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for daemon, out in zip(cluster.daemons, outs, strict=False):
                nursery.start_soon(fetch, daemon, DownloadRequest(url=url, output=str(out), piece_length=MiB))
    for out in outs:
        assert out.read_bytes() == FILES["/chunked"]


async def test_unreachable_scheduler_fails_clearly(tmp_path: Path, origin: Origin) -> None:
    config = DaemonConfig(data_dir=tmp_path / "lonely", scheduler="tcp://127.0.0.1:1", scheduler_wait=0.5)
    out = tmp_path / "never"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            daemon = await nursery.start(Daemon(config).run)
            result = await fetch(daemon, DownloadRequest(url=f"{origin.url}/small", output=str(out)))
            nursery.cancel_scope.cancel()
    assert result.state is DownloadState.FAILED and result.error_kind == "scheduler_unreachable"
    assert "tcp://127.0.0.1:1" in result.error
    assert not out.exists()


async def test_bad_requests_and_timeout(cluster: Cluster, origin: Origin, tmp_path: Path) -> None:
    daemon = cluster.daemons[0]
    bad = await fetch(daemon, DownloadRequest(url=f"{origin.url}/small", output="relative/path"))
    assert bad.error_kind == "bad_request"
    bad = await fetch(daemon, DownloadRequest(url=f"{origin.url}/small", output=None, digest="md5:abc"))
    assert bad.error_kind == "bad_request"
    with trio.fail_after(10):
        slow = await fetch(daemon, DownloadRequest(url=f"{origin.url}/big", output=str(tmp_path / "t"), timeout=0.001))
    assert slow.state is DownloadState.FAILED and slow.error_kind == "timeout"
    assert not (tmp_path / "t").exists()


def test_config_from_toml(tmp_path: Path) -> None:
    f = tmp_path / "daemon.toml"
    f.write_text('data_dir = "data"\nscheduler = "tcp://10.0.0.1:8002"\nupload_slots = 8\nseed = true\n')
    config = DaemonConfig.load(f)
    assert config.data_dir == tmp_path / "data" and config.upload_slots == 8 and config.seed
    f.write_text('data_dir = "data"\nupload_slot = 8\n')
    with pytest.raises(ConfigError, match="upload_slot"):
        DaemonConfig.load(f)
    f.write_text('data_dir = "data"\nupload_slots = "many"\n')
    with pytest.raises(ConfigError, match="upload_slots"):
        DaemonConfig.load(f)


def test_config_tenant_token(tmp_path: Path) -> None:
    f = tmp_path / "daemon.toml"
    f.write_text('data_dir = "data"\nmanager = "tcp://10.0.0.1:8003"\ntenant_token = "dfzd_secret"\n')
    config = DaemonConfig.load(f)
    assert config.tenant_token == "dfzd_secret" and "dfzd_secret" not in repr(config)  # never shown
    f.write_text('data_dir = "data"\ntenant_token = "dfzd_secret"\n')
    with pytest.raises(ConfigError, match="tenant_token: the manager checks it"):
        DaemonConfig.load(f)
    with pytest.raises(ConfigError, match="tenant_token"):
        DaemonConfig(data_dir=tmp_path, manager="tcp://10.0.0.1:8003", tenant_token="two words")
    # dfz up refuses a token without its manager, before starting anything.
    result = CliRunner().invoke(
        cli_main, ["up", "--data-dir", str(tmp_path / "up"), "--no-manager"], env={"DFZ_TENANT_TOKEN": "t"}
    )
    assert result.exit_code == 2 and "needs the manager" in result.output


def test_config_with_several_schedulers(tmp_path: Path) -> None:
    f = tmp_path / "daemon.toml"
    assert DaemonConfig(data_dir=tmp_path).scheduler_endpoints == ("tcp://127.0.0.1:8002",)
    assert DaemonConfig(data_dir=tmp_path, scheduler="ipc:///s").scheduler_endpoints == ("ipc:///s",)
    two = ("tcp://10.0.0.1:8002", "tcp://10.0.0.2:8002")
    for text in (f"schedulers = {list(two)!r}", f"scheduler = {list(two)!r}"):
        f.write_text(f'data_dir = "data"\n{text}\n'.replace("'", '"'))
        assert DaemonConfig.load(f).scheduler_endpoints == two
        # the command line (--scheduler, repeatable) replaces the file's list
        assert DaemonConfig.load(f, schedulers=("ipc:///x",)).scheduler_endpoints == ("ipc:///x",)
    f.write_text('data_dir = "data"\nschedulers = ["tcp://10.0.0.1:8002", "tcp://10.0.0.1:8002"]\n')
    with pytest.raises(ConfigError, match="listed twice"):
        DaemonConfig.load(f)
    f.write_text('data_dir = "data"\nschedulers = ["10.0.0.1:8002"]\n')
    with pytest.raises(ConfigError, match="schedulers"):
        DaemonConfig.load(f)


@pytest.mark.parametrize("case", [("/small", None, None), ("/big", 64 * 1024, 100)], ids=["whole", "in-parts"])
async def test_restarted_daemon_serves_its_finished_tasks(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: tuple[str, int | None, int | None]
) -> None:
    """A daemon restarted with the same data directory announces its finished tasks, and a new peer gets
    them from it while the seed that fetched them from the origin is gone. The second case announces 385
    pieces in parts of 100 (as a task of more than 512 pieces is, in parts of 512)."""
    path, piece_length, per_part = case
    if per_part is not None:
        monkeypatch.setattr(daemon_module, "MAX_DIGESTS_PER_MESSAGE", per_part)
    url = f"{origin.url}{path}"
    data = FILES[path]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            sched = await nursery.start(SchedulerService(ServiceConfig(listen=("tcp://127.0.0.1:0",))).run)
            endpoint = sched.endpoints[0]

            async def start(name: str, seed: bool = False) -> tuple[Daemon, trio.CancelScope]:
                scope = trio.CancelScope()

                async def run(task_status: trio.TaskStatus[Daemon]) -> None:
                    with scope:
                        config = DaemonConfig(data_dir=tmp_path / name, scheduler=endpoint, seed=seed, report_interval=0.02)
                        await Daemon(config).run(task_status=task_status)

                daemon: Daemon = await nursery.start(run)
                return daemon, scope

            _, seed_scope = await start("seed", seed=True)
            first, first_scope = await start("first")
            done = await fetch(first, DownloadRequest(url=url, output=str(tmp_path / "one"), piece_length=piece_length))
            assert done.state is DownloadState.SUCCEEDED and done.bytes_from_peers == len(data)
            host_id = first.host_id
            seed_scope.cancel()
            first_scope.cancel()
            await until(lambda: not sched.core.tasks)  # both hosts left: the scheduler forgot the task

            again, _ = await start("first")
            assert again.host_id == host_id
            await until(lambda: bool(sched.core.tasks))  # the restarted daemon announced it
            other, _ = await start("other")
            got = await fetch(other, DownloadRequest(url=url, output=str(tmp_path / "two"), piece_length=piece_length))
            assert got.state is DownloadState.SUCCEEDED and got.bytes_from_peers == len(data), got
            nursery.cancel_scope.cancel()
    assert (tmp_path / "two").read_bytes() == data
    assert origin.served[path] == len(data)


async def test_bad_pieces_from_a_parent_are_reported_and_the_parent_avoided(origin: Origin, tmp_path: Path) -> None:
    """A parent that sends corrupted pieces (the test-only switch of the piece server) is blocked and
    reported; the scheduler avoids it, and the child ends up with the right bytes from elsewhere (here: the
    origin, as it has no other parent)."""
    url = f"{origin.url}/small"
    data = FILES["/small"]
    config = ServiceConfig(listen=("tcp://127.0.0.1:0",), scheduler=SchedulerConfig(retry_interval=0.1))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            sched = await nursery.start(SchedulerService(config).run)
            endpoint = sched.endpoints[0]
            liar = Daemon(
                DaemonConfig(data_dir=tmp_path / "liar", scheduler=endpoint, seed=True, report_interval=0.02),
                piece_server_config=PieceServerConfig(corrupt_pieces_for_tests=True),
            )
            await nursery.start(liar.run)
            child = await nursery.start(Daemon(DaemonConfig(data_dir=tmp_path / "child", scheduler=endpoint)).run)
            result = await fetch(child, DownloadRequest(url=url, output=str(tmp_path / "out")))
            assert result.state is DownloadState.SUCCEEDED, result
            liar_peers = [p for p in sched.core.peers.values() if p.host.id == liar.host_id]
            assert liar_peers and liar_peers[0].upload_failures > 0
            nursery.cancel_scope.cancel()
    assert (tmp_path / "out").read_bytes() == data
    assert result.bytes_from_peers == 0 and result.bytes_from_origin == len(data)


async def test_an_interrupted_download_resumes(origin: Origin, tmp_path: Path) -> None:
    """A daemon stopped half-way through a task keeps the pieces it stored; asked again after a restart,
    it fetches only the missing ones."""
    url = f"{origin.url}/slow"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            sched = await nursery.start(SchedulerService(ServiceConfig(listen=("tcp://127.0.0.1:0",))).run)
            config = DaemonConfig(data_dir=tmp_path / "seed", scheduler=sched.endpoints[0], seed=True, origin_concurrency=1)
            async with trio.open_nursery() as first_life:
                daemon = await first_life.start(Daemon(config).run)
                async for progress in daemon.download(DownloadRequest(url=url, output=None, piece_length=PIECE)):
                    if progress.pieces_done >= 4:
                        break
                first_life.cancel_scope.cancel()
            first_bytes = origin.served["/slow"]
            assert PIECE * 4 <= first_bytes < len(BIG)
            daemon = await nursery.start(Daemon(config).run)
            out = tmp_path / "resumed"
            result = await fetch(daemon, DownloadRequest(url=url, output=str(out), piece_length=PIECE))
            nursery.cancel_scope.cancel()
    assert result.state is DownloadState.SUCCEEDED, result
    assert sha256(out.read_bytes()) == sha256(BIG)
    assert result.bytes_from_origin < len(BIG)
    assert origin.served["/slow"] < len(BIG) + 2 * PIECE  # at most the piece in flight was fetched twice


async def test_scheduler_restart_mid_download(origin: Origin, tmp_path: Path, short_tmp: str) -> None:
    """The scheduler restarts while a swarm is busy: the daemons reconnect, announce again (not resumed),
    register their downloads again and finish them, resuming the pieces they stored."""
    url = f"{origin.url}/slow"
    endpoint = f"ipc://{short_tmp}/sched"
    sched_config = ServiceConfig(listen=(endpoint,), heartbeat=0.2)
    outs = [tmp_path / "seed-out", tmp_path / "d-out"]
    results: list[Progress] = []
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as first_life:
                await first_life.start(SchedulerService(sched_config).run)
                seed = await nursery.start(
                    Daemon(DaemonConfig(data_dir=tmp_path / "seed", scheduler=endpoint, seed=True, origin_concurrency=1)).run
                )
                daemon = await nursery.start(Daemon(DaemonConfig(data_dir=tmp_path / "d", scheduler=endpoint)).run)

                async def one(d: Daemon, out: Path) -> None:
                    results.append(await fetch(d, DownloadRequest(url=url, output=str(out), piece_length=PIECE)))

                nursery.start_soon(one, seed, outs[0])
                nursery.start_soon(one, daemon, outs[1])
                await until(lambda: origin.served.get("/slow", 0) >= 3 * PIECE)
                first_life.cancel_scope.cancel()
            await trio.sleep(0.3)
            await nursery.start(SchedulerService(sched_config).run)
            await until(lambda: len(results) == 2)
            nursery.cancel_scope.cancel()
    for result, out in zip(results, outs, strict=True):
        assert result.state is DownloadState.SUCCEEDED, result
        assert sha256(out.read_bytes()) == sha256(BIG)
    # Whoever registers first with the new scheduler may be sent to the origin before the seed host is back
    # (no seed host known: back to source); stored pieces are never fetched again by the same daemon.
    assert origin.served["/slow"] < 2 * len(BIG)


async def test_dfz_daemon_command_prints_where_it_listens_and_stops_on_sigterm(tmp_path: Path, short_tmp: str) -> None:
    """`dfz daemon` as a real process: machine-readable lines, an announced host, exit 0 on SIGTERM."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            sched = await nursery.start(SchedulerService(ServiceConfig(listen=("tcp://127.0.0.1:0",))).run)
            command = [
                sys.executable,
                "-m",
                "dfz.cli",
                "daemon",
                "--data-dir",
                str(tmp_path / "data"),
                "--scheduler",
                sched.endpoints[0],
                "--api",
                f"ipc://{short_tmp}/api",
            ]
            process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
            assert process.stdout is not None
            lines: list[str] = []
            buffer = b""
            while not any(line.startswith("api ") for line in lines):
                chunk = await process.stdout.receive_some()
                assert chunk, f"dfz daemon ended early: {lines}"
                buffer += chunk
                *done, buffer = buffer.split(b"\n")
                lines.extend(line.decode() for line in done)
            await until(lambda: len(sched.core.hosts) == 1)
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
            nursery.cancel_scope.cancel()
    fields = dict(line.split(" ", 1) for line in lines)
    assert fields["piece-server"].startswith("tcp://127.0.0.1:") and fields["api"] == f"ipc://{short_tmp}/api"
    assert fields["scheduler"] == sched.endpoints[0]


def test_scheduler_core_takes_an_announced_task_as_a_source() -> None:
    """``AnnounceTask`` (the core event behind ``sched.announce_task``): the peer is born succeeded, its
    digests are forwarded to waiting peers, which get it as a parent; a contradicting copy is refused."""
    clock = [0.0]
    core = SchedulerCore(clock=lambda: clock[0])
    for host in ("k", "b"):
        core.apply(AnnounceHost(host_id=host, hostname=host, ip="127.0.0.1", port=1))
    tid, digest = "a" * 64, "d" * 64
    pieces = ((0, "1" * 64), (1, "2" * 64))
    announce = AnnounceTask("k-1", tid, "k", "http://o/f", "", "", 4 * MiB, 5 * MiB, digest, pieces)
    core.apply(announce)
    actions = core.apply(RegisterPeer(peer_id="b-1", task_id=tid, host_id="b", url="http://o/f"))
    assert any(isinstance(a, PushParents) and [p.peer_id for p in a.parents] == ["k-1"] for a in actions)
    assert any(isinstance(a, ForwardDigests) and dict(a.digests) == dict(pieces) for a in actions)
    assert core.peers["k-1"].state is PeerState.SUCCEEDED
    core.check_invariants()
    with pytest.raises(SchedulerError):  # another version of the file
        core.apply(AnnounceTask("k-2", tid, "k", "http://o/f", "", "", 4 * MiB, 5 * MiB, digest, ((0, "3" * 64), (1, "2" * 64))))
    with pytest.raises(SchedulerError):  # a digest missing
        core.apply(AnnounceTask("k-3", "b" * 64, "k", "http://o/g", "", "", 4 * MiB, 5 * MiB, digest, pieces[:1]))
    core.check_invariants()
