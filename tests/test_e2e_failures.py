"""Failures end to end, as a user meets them: real ``dfz sched``, ``dfz seed``, ``dfz daemon`` and ``dfz get``
processes on 127.0.0.1 (ephemeral ports), and an HTTP origin in the test that counts the bytes it serves
per path and plays faults (:func:`e2e_helpers.serve_origin`).

* A parent killed with SIGKILL while it serves children: they finish from the others.
* A daemon killed with SIGKILL mid-download and restarted on the same data directory: it resumes.
* A daemon restarted after a success serves the task to a new peer, the seed gone.
* Origin 404, 500, reset, changed length; unreachable scheduler; bad URL; ``--digest`` mismatch: the
  documented exit code of ``dfz get``, a message saying what happened, and nothing left in the output
  directory (not even a temporary file).
* Empty, tiny, not a multiple of the piece length, unknown length (chunked).

Most tests share one cluster (a scheduler, a seed and a daemon) and one origin, each on paths of its own;
those that kill or restart processes start their own.
"""

from __future__ import annotations

import hashlib
import random
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_helpers import Origin, Procs, Route, dfz_cmd, read_line, serve_origin, stop

MiB = 1024 * 1024

pytestmark = pytest.mark.timeout(60)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


# --- processes -------------------------------------------------------------------------------------------


@dataclass
class Node:
    """A running ``dfz daemon`` or ``dfz seed``."""

    proc: subprocess.Popen[bytes]
    data_dir: Path
    api: str
    pieces: str
    """Its piece server's endpoint (``tcp://127.0.0.1:PORT``)."""
    log: Path


def start_sched(procs: Procs, root: Path) -> str:
    """A ``dfz sched`` on a free port; its endpoint."""
    with (root / "sched.log").open("ab") as log:
        proc = procs.start(dfz_cmd("sched", "--listen", "tcp://127.0.0.1:0"), stdout=subprocess.PIPE, stderr=log)
    return read_line(proc, "listening")


def start_node(procs: Procs, root: Path, name: str, scheduler: str, *args: str, seed: bool = False) -> Node:
    """A ``dfz seed`` or ``dfz daemon`` with data directory ``root/name`` (its log appended to
    ``root/name.log``), once it serves."""
    data_dir, log_path = root / name, root / f"{name}.log"
    argv = dfz_cmd("seed" if seed else "daemon", "--data-dir", str(data_dir), "--scheduler", scheduler, *args)
    with log_path.open("ab") as log:
        proc = procs.start(argv, stdout=subprocess.PIPE, stderr=log)
    try:
        pieces = read_line(proc, "piece-server")
        api = read_line(proc, "api ")
    except AssertionError:
        raise AssertionError(f"{name} did not start: {log_path.read_text()}") from None
    return Node(proc, data_dir, api, pieces, log_path)


def get_argv(node: Node, url: str, out: Path, *args: str, timeout: float = 30) -> list[str]:
    return dfz_cmd("get", url, "-O", str(out), "--endpoint", node.api, "--no-progress", "--timeout", f"{timeout:g}", *args)


def get(node: Node, url: str, out: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``dfz get`` through ``node``, to its end."""
    return subprocess.run(
        get_argv(node, url, out, *args, timeout=timeout),
        capture_output=True,
        text=True,
        timeout=timeout + 15,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def finish(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, str]:
    """Exit status and stderr of a ``dfz get`` started with ``stderr=PIPE``."""
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode()


# --- the shared cluster ----------------------------------------------------------------------------------


@dataclass
class Swarm:
    origin: Origin
    scheduler: str
    seed: Node
    daemon: Node
    root: Path

    def serve(self, path: str, route: Route) -> str:
        """Serve ``route`` at ``path`` (a path of the caller's own); its URL."""
        assert path not in self.origin.routes
        self.origin.routes[path] = route
        return self.origin.url + path


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="dfz-", dir="/tmp") as d, serve_origin({}) as origin:
        try:
            root = Path(d)
            scheduler = start_sched(procs, root)
            seed = start_node(procs, root, "seed", scheduler, seed=True)
            daemon = start_node(procs, root, "daemon", scheduler)
            yield Swarm(origin, scheduler, seed, daemon, root)
        finally:
            procs.kill_all()


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """An empty directory for outputs: a failed ``dfz get`` must leave it empty."""
    d = tmp_path / "out"
    d.mkdir()
    return d


# --- a parent killed, a daemon killed, a daemon restarted ------------------------------------------------


def test_parent_killed_mid_transfer_its_children_finish_from_others(procs: Procs, short_tmp: str, out_dir: Path) -> None:
    """Seed + 3 daemons. The seed's upload is throttled, so the daemons trade pieces; d0 asks first, so
    the scheduler makes it a parent of d1 and d2. d0 is killed with SIGKILL while they download: they
    finish from the seed and each other, with the right bytes."""
    root = Path(short_tmp)
    data = random.Random(1).randbytes(16 * MiB + 4321)
    with serve_origin({"/f": Route(data)}) as origin:
        url = origin.url + "/f"
        scheduler = start_sched(procs, root)
        start_node(procs, root, "seed", scheduler, "--upload-rate", "4000000", seed=True)
        nodes = [start_node(procs, root, f"d{i}", scheduler, "-vv") for i in range(3)]
        outs = [out_dir / f"out{i}" for i in range(3)]
        gets = [procs.start(get_argv(nodes[0], url, outs[0], "--piece-length", "512KiB"), stderr=subprocess.PIPE)]
        wait_for(lambda: origin.served.get("/f", 0) > 0, 15, "the seed fetches from the origin")
        for i in (1, 2):
            gets.append(procs.start(get_argv(nodes[i], url, outs[i], "--piece-length", "512KiB"), stderr=subprocess.PIPE))
        wait_for(lambda: origin.served.get("/f", 0) >= len(data), 15, "the seed has the whole file")
        time.sleep(1.0)  # about 4 MB of the 16.8 MB left the seed: nobody is done
        assert all(g.poll() is None for g in gets), "a download ended before the parent was killed"
        nodes[0].proc.send_signal(signal.SIGKILL)
        nodes[0].proc.wait(5)

        want = sha256(data)
        for i in (1, 2):
            code, err = finish(gets[i], 40)
            assert code == 0, f"d{i}: {err}\n{nodes[i].log.read_text()[-3000:]}"
            assert sha256(outs[i].read_bytes()) == want
        code, err = finish(gets[0], 20)
        assert code == 6 and "lost the session to the dfz daemon" in err, (code, err)
        assert not outs[0].exists()
        # d0 was a parent: a survivor subscribed to its piece server (and d0 had pieces to offer).
        subscribed = [
            int(m[1])
            for i in (1, 2)
            for m in re.finditer(
                rf"download\.subscribed .*parent={re.escape(nodes[0].pieces)} pieces=(\d+)", nodes[i].log.read_text()
            )
        ]
        assert subscribed, "neither d1 nor d2 had d0 as a parent"
        assert origin.served["/f"] == len(data), "the origin served the file more than once"


def test_daemon_killed_mid_download_resumes_after_restart(procs: Procs, short_tmp: str, out_dir: Path) -> None:
    """No seed: the daemon fetches from a slow origin itself. SIGKILL half-way, restart on the same data
    directory, ``dfz get`` again: the pieces it had recorded are not fetched again."""
    root = Path(short_tmp)
    data = random.Random(2).randbytes(16 * MiB + 99)
    with serve_origin({"/f": Route(data, rate=700_000)}) as origin:  # 4 requests in flight: ~2.8 MB/s
        url = origin.url + "/f"
        scheduler = start_sched(procs, root)
        node = start_node(procs, root, "d", scheduler)
        out = out_dir / "out"
        first = procs.start(get_argv(node, url, out, "--piece-length", "256KiB"), stderr=subprocess.PIPE)
        wait_for(lambda: origin.served.get("/f", 0) >= len(data) // 2, 20, "half the file served")
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(5)
        first_life = origin.served["/f"]

        assert first_life < len(data)
        assert list(out_dir.iterdir()) == []

        node = start_node(procs, root, "d", scheduler)
        again = procs.start(
            get_argv(node, url, out, "--piece-length", "256KiB", "--digest", f"sha256:{sha256(data)}"), stderr=subprocess.PIPE
        )
        code, err = finish(first, 20)  # the first dfz get saw its daemon go
        assert code == 6 and "lost the session" in err, (code, err)
        code, err = finish(again, 40)
        assert code == 0, err + node.log.read_text()[-3000:]
        assert sha256(out.read_bytes()) == sha256(data)
        second_life = origin.served["/f"] - first_life
        # Pieces are recorded at checkpoints (about every second): what was fetched in the last second
        # before the kill, and the pieces in flight, may be fetched again; the rest must not be.
        assert second_life <= len(data) - 2 * MiB, (first_life, second_life)
        assert list(out_dir.iterdir()) == [out]


def test_restarted_daemon_serves_its_finished_task_without_the_seed(procs: Procs, short_tmp: str, out_dir: Path) -> None:
    """A fetches a file through the seed. The seed stops, A restarts on the same data directory, and a new
    daemon B (not allowed to go to the origin) gets the file from A; the origin served it once."""
    root = Path(short_tmp)
    data = random.Random(3).randbytes(6 * MiB + 5)
    with serve_origin({"/f": Route(data)}) as origin:
        url = origin.url + "/f"
        digest = f"sha256:{sha256(data)}"
        scheduler = start_sched(procs, root)
        seed = start_node(procs, root, "seed", scheduler, seed=True)
        a = start_node(procs, root, "a", scheduler)
        first = get(a, url, out_dir / "a", "--digest", digest)
        assert first.returncode == 0, first.stderr
        assert origin.served["/f"] == len(data)

        assert stop(seed.proc) == 0
        assert stop(a.proc) == 0
        a = start_node(procs, root, "a", scheduler)
        b = start_node(procs, root, "b", scheduler)
        second = get(b, url, out_dir / "b", "--digest", digest, "--no-back-to-source")
        assert second.returncode == 0, second.stderr + a.log.read_text()[-3000:]
        assert sha256((out_dir / "b").read_bytes()) == sha256(data)
        assert origin.served["/f"] == len(data), "the origin served the file again"


# --- dfz get's failures ----------------------------------------------------------------------------------

SMALL = random.Random(4).randbytes(MiB + 17)


@dataclass(frozen=True)
class OriginFault:
    route: Route
    kind: str
    """The ``error_kind`` dfz get reports."""
    said: str
    """Part of the message."""


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(OriginFault(Route(status=404), "origin_not_found", "no such object"), id="404"),
        pytest.param(OriginFault(Route(status=500), "origin_unavailable", "failed 5 times, last with HTTP 500"), id="500"),
        pytest.param(OriginFault(Route(SMALL, reset=True), "origin_unavailable", "failed 5 times"), id="reset"),
        pytest.param(OriginFault(Route(SMALL, grow=1000), "origin_changed", "length changed"), id="length-changed"),
    ],
)
def test_origin_failure(swarm: Swarm, out_dir: Path, request: pytest.FixtureRequest, fault: OriginFault) -> None:
    """The seed meets the failure (after retries where it is transient); the daemon's ``dfz get`` exits 3
    and says what happened; the output directory stays empty."""
    path = f"/fail/{request.node.callspec.id}"
    url = swarm.serve(path, fault.route)
    result = get(swarm.daemon, url, out_dir / "f")
    assert result.returncode == 3, result.stderr
    assert f"dfz get: download failed ({fault.kind})" in result.stderr and fault.said in result.stderr, result.stderr
    assert "what to do:" in result.stderr
    assert list(out_dir.iterdir()) == []
    # Only the seed went to the origin (a stat, and at most 5 attempts of what failed): the scheduler
    # failed the daemon's download with the seed's reason rather than sending it to the origin too.
    assert swarm.origin.requests[path] <= 6, swarm.origin.requests


def test_unreachable_scheduler(procs: Procs, short_tmp: str, out_dir: Path, swarm: Swarm) -> None:
    root = Path(short_tmp)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    config = root / "daemon.toml"
    config.write_text("scheduler_wait = 1.0\n")
    node = start_node(procs, root, "lonely", dead, "--config", str(config))
    result = get(node, swarm.serve("/lonely", Route(SMALL)), out_dir / "f")
    assert result.returncode == 7, result.stderr
    assert "scheduler_unreachable" in result.stderr and dead in result.stderr, result.stderr
    assert list(out_dir.iterdir()) == []
    assert swarm.origin.requests.get("/lonely", 0) == 0


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("ftp://127.0.0.1/file", "scheme 'ftp' is not supported"),
        ("http:///file", "has no host"),
        ("http://127.0.0.1:99999/file", "malformed"),
        ("no-scheme", "the URL has no scheme"),
    ],
)
def test_bad_url(swarm: Swarm, out_dir: Path, url: str, said: str) -> None:
    result = get(swarm.daemon, url, out_dir / "f")
    assert result.returncode == 2, result.stderr
    assert said in result.stderr, result.stderr
    assert list(out_dir.iterdir()) == []


def test_digest_mismatch_then_the_right_digest(swarm: Swarm, out_dir: Path) -> None:
    url = swarm.serve("/digest", Route(SMALL))
    out = out_dir / "f"
    wrong = get(swarm.daemon, url, out, "--digest", "sha256:" + "0" * 64)
    assert wrong.returncode == 4, wrong.stderr
    assert "download failed (digest_mismatch)" in wrong.stderr and "no output was written" in wrong.stderr, wrong.stderr
    assert list(out_dir.iterdir()) == []
    right = get(swarm.daemon, url, out, "--digest", f"sha256:{sha256(SMALL)}")  # a local hit now
    assert right.returncode == 0, right.stderr
    assert out.read_bytes() == SMALL
    assert list(out_dir.iterdir()) == [out]
    assert swarm.origin.served["/digest"] == len(SMALL)


# --- sizes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "args"),
    [
        pytest.param(Route(b""), (), id="empty"),
        pytest.param(Route(random.Random(5).randbytes(100)), (), id="tiny"),
        pytest.param(Route(b"x"), (), id="one-byte"),
        pytest.param(Route(random.Random(6).randbytes(9 * MiB + 12345)), (), id="not-a-multiple"),  # 4 MiB pieces
        pytest.param(Route(random.Random(7).randbytes(3 * MiB + 3), chunked=True), ("--piece-length", "1MiB"), id="chunked"),
    ],
)
def test_sizes(swarm: Swarm, out_dir: Path, request: pytest.FixtureRequest, route: Route, args: tuple[str, ...]) -> None:
    """Through the daemon, checked against ``--digest``; a file big enough for a swarm was served by the
    origin once (to the seed). A tiny one (128 bytes or less) needs no swarm: the daemon reads it from the
    origin itself (and the seed, triggered before its size was known, may have read it too)."""
    path = f"/size/{request.node.callspec.id}"
    url = swarm.serve(path, route)
    out = out_dir / "f"
    result = get(swarm.daemon, url, out, "--digest", f"sha256:{sha256(route.data)}", *args)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == route.data
    if len(route.data) > 128:
        assert swarm.origin.served.get(path, 0) == len(route.data)
    assert list(out_dir.iterdir()) == [out]
