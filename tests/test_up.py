"""``dfz up`` and ``make demo`` as a user runs them: real processes, real sockets, an origin that counts bytes.

The origin is ``scripts/demo.py --serve FILE`` (the demo's own origin, a child process): ranges, and a
count of the body bytes it served at ``/_stats``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_helpers import Procs, dfz_cmd, read_line, stop

import dfz
from dfz.cluster import read_cluster, wait_for_cluster

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scripts" / "demo.py"
SIZE = 8 << 20

pytestmark = pytest.mark.timeout(60)


@dataclass
class Origin:
    url: str
    data: bytes

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(self.url.rsplit("/", 1)[0] + "/_stats", timeout=5) as reply:
            stats: dict[str, int] = json.load(reply)
        return stats


@pytest.fixture
def origin(procs: Procs, short_tmp: str) -> Origin:
    data = os.urandom(SIZE)
    path = Path(short_tmp) / "file.bin"
    path.write_bytes(data)
    proc = procs.start([sys.executable, str(DEMO), "--serve", str(path)], stdout=subprocess.PIPE)
    port = read_line(proc, "listening")
    return Origin(f"http://127.0.0.1:{port}/file.bin", data)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_up(procs: Procs, data_dir: Path, log: Path, *args: str) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    with log.open("wb") as out:
        up = procs.start(dfz_cmd("up", "--data-dir", str(data_dir), *args), stdout=out, stderr=subprocess.STDOUT)
    try:
        info = wait_for_cluster(data_dir, 30, alive=lambda: up.poll() is None)
    except Exception:
        print(log.read_text())
        raise
    return up, info


def test_up_runs_a_cluster_that_a_daemon_joins_and_stops_cleanly(procs: Procs, origin: Origin, short_tmp: str) -> None:
    tmp = Path(short_tmp)
    up, info = start_up(procs, tmp / "up", tmp / "up.log")

    # cluster.json tells everything a script needs.
    assert info["format"] == 1 and info["version"] == dfz.__version__ and info["pid"] == up.pid
    assert isinstance(info["scheduler"], str) and info["scheduler"].startswith("tcp://127.0.0.1:")
    assert not info["scheduler"].endswith(":0")
    assert info["schedulers"] == [info["scheduler"]]
    parts = info["parts"]
    assert isinstance(parts, dict) and set(parts) == {"sched", "seed", "daemon"}
    for name in ("seed", "daemon"):
        part = parts[name]
        assert part["piece_server"] and all(not e.endswith(":0") for e in part["piece_server"])
        assert part["api"] and Path(part["data_dir"]) == tmp / "up" / name
        assert alive(part["pid"])
    assert info["endpoint"] == parts["daemon"]["api"][0] == f"ipc://{tmp / 'up' / 'api.sock'}"
    assert info["seed_endpoint"] == parts["seed"]["api"][0]
    assert (tmp / "up" / "cluster.json").stat().st_size > 0
    assert not list((tmp / "up").glob(".cluster.json*"))  # no temporary file left behind
    summary = (tmp / "up.log").read_text()
    assert f"--endpoint {info['endpoint']}" in summary and f"--scheduler {info['scheduler']}" in summary

    # A second dfz up on the same directory refuses to start and leaves the first alone.
    second = subprocess.run(
        dfz_cmd("up", "--data-dir", str(tmp / "up")), capture_output=True, timeout=30, stdin=subprocess.DEVNULL, check=False
    )
    assert second.returncode == 1 and b"another dfz up" in second.stderr
    assert read_cluster(tmp / "up")["pid"] == up.pid

    # Another daemon joins with the scheduler from cluster.json.
    joined = procs.start(
        dfz_cmd("daemon", "--data-dir", str(tmp / "d2"), "--scheduler", str(info["scheduler"])), stdout=subprocess.PIPE
    )
    endpoint = read_line(joined, "api ")

    # dfz get through both daemons at once: digests right, the origin served the file once.
    gets = []
    for i, ep in enumerate([str(info["endpoint"]), endpoint]):
        out = tmp / f"out{i}"
        argv = dfz_cmd("get", origin.url, "-O", str(out), "--endpoint", ep, "--timeout", "30", "--no-progress")
        gets.append((out, procs.start(argv, stderr=subprocess.PIPE)))
    want = hashlib.sha256(origin.data).hexdigest()
    for out, get in gets:
        _, err = get.communicate(timeout=40)
        assert get.returncode == 0, err.decode()
        assert hashlib.sha256(out.read_bytes()).hexdigest() == want
    stats = origin.stats()
    assert stats["bytes"] - stats["probe_bytes"] == SIZE, stats

    # SIGTERM: the daemon, then dfz up, exit 0; cluster.json is gone and so are the parts.
    assert stop(joined) == 0
    part_pids = [parts[name]["pid"] for name in parts]
    assert stop(up) == 0, (tmp / "up.log").read_text()
    assert not (tmp / "up" / "cluster.json").exists()
    assert not any(alive(pid) for pid in part_pids)


def test_up_with_three_schedulers_that_a_daemon_joins_all_of(procs: Procs, origin: Origin, short_tmp: str) -> None:
    """``dfz up --schedulers 3``: three ``dfz sched`` parts, listed in cluster.json; the seed and the daemon
    use them all, and so does a daemon that joins with every ``--scheduler`` from cluster.json."""
    tmp = Path(short_tmp)
    up, info = start_up(procs, tmp / "up", tmp / "up.log", "--schedulers", "3")
    schedulers = info["schedulers"]
    assert isinstance(schedulers, list) and len(set(schedulers)) == 3 and info["scheduler"] == schedulers[0]
    parts = info["parts"]
    assert isinstance(parts, dict) and list(parts) == ["sched", "sched-2", "sched-3", "seed", "daemon"]
    for name, endpoint in zip(["sched", "sched-2", "sched-3"], schedulers, strict=True):
        assert parts[name]["listen"] == [endpoint] and alive(parts[name]["pid"])
        assert Path(parts[name]["data_dir"]) == tmp / "up" / name and (tmp / "up" / "logs" / f"{name}.log").exists()
    for name in ("seed", "daemon"):  # what they printed once they served: one line per scheduler
        log = (tmp / "up" / "logs" / f"{name}.log").read_text()
        assert sorted(re.findall(r"^scheduler (\S+)$", log, re.M)) == sorted(schedulers), log
    summary = (tmp / "up.log").read_text()
    assert " ".join(f"--scheduler {s}" for s in schedulers) in summary, summary

    argv = dfz_cmd("daemon", "--data-dir", str(tmp / "d2"))
    for endpoint in schedulers:
        argv += ["--scheduler", endpoint]
    joined = procs.start(argv, stdout=subprocess.PIPE)
    api = read_line(joined, "api ")
    gets = []
    for i, ep in enumerate([api, str(info["endpoint"])]):
        out = tmp / f"out{i}"
        gets.append(
            (
                out,
                procs.start(
                    dfz_cmd("get", origin.url, "-O", str(out), "--endpoint", ep, "--timeout", "30", "--no-progress"),
                    stderr=subprocess.PIPE,
                ),
            )
        )
    for out, get in gets:
        _, err = get.communicate(timeout=40)
        assert get.returncode == 0, err.decode()
        assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(origin.data).hexdigest()
    stats = origin.stats()
    assert stats["bytes"] - stats["probe_bytes"] == SIZE, stats

    assert stop(joined) == 0
    assert stop(up) == 0, (tmp / "up.log").read_text()
    assert not (tmp / "up" / "cluster.json").exists()
    assert not any(alive(parts[name]["pid"]) for name in parts)


def test_up_stops_everything_when_a_part_dies(procs: Procs, short_tmp: str) -> None:
    tmp = Path(short_tmp)
    up, info = start_up(procs, tmp / "up", tmp / "up.log")
    parts = info["parts"]
    assert isinstance(parts, dict)
    os.kill(parts["seed"]["pid"], signal.SIGKILL)
    assert up.wait(30) == 1
    log = (tmp / "up.log").read_text()
    assert "the seed" in log and "SIGKILL" in log, log
    assert not (tmp / "up" / "cluster.json").exists()
    assert not any(alive(parts[name]["pid"]) for name in parts)


def test_up_sigint_is_a_clean_stop(procs: Procs, short_tmp: str) -> None:
    tmp = Path(short_tmp)
    up, _ = start_up(procs, tmp / "up", tmp / "up.log")
    assert stop(up, signal.SIGINT) == 0, (tmp / "up.log").read_text()
    assert not (tmp / "up" / "cluster.json").exists()


def test_demo_smoke(short_tmp: str) -> None:
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, str(DEMO), "--size-mib", "16", "--peers", "3", "--timeout", "40"],
        capture_output=True,
        timeout=55,
        stdin=subprocess.DEVNULL,
        check=False,
        cwd=short_tmp,
    )
    out = run.stdout.decode()
    assert run.returncode == 0, out + run.stderr.decode()
    rows = [line for line in out.splitlines() if re.match(r"peer \d", line)]
    assert len(rows) == 3 and all(row.endswith("OK") for row in rows), out
    assert "origin egress / file size: 1.000" in out, out
    assert "all downloads OK" in out
    work = re.search(r"work directory (\S+)\)", out)
    assert work is not None and not Path(work[1]).exists(), "the demo left its work directory behind"
    assert time.monotonic() - started < 55
