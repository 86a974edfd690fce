"""``dfz top`` end to end: the live view in a real terminal (tmux) against a live swarm of real processes
(``dfz sched``, ``dfz seed``, ``dfz daemon``s, ``dfz get``s and a rate-limited HTTP origin), read back with
``tmux capture-pane -p``; and ``dfz top --once`` against a scheduler holding 1,000 simulated hosts.

tmux (Debian ``tmux``) is installed with apt-get when missing and this is root; otherwise the live test is
skipped with the command to run. Each test uses its own tmux server (``-L``), killed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from e2e_helpers import Procs, Route, dfz_cmd, serve_origin
from test_bench_sched import run_script
from test_e2e_failures import get_argv, start_node, start_sched
from test_mgr_e2e import run_mgr, start

MiB = 1024 * 1024


def ensure_tmux() -> str:
    """The tmux command, installed from Debian when missing (root only; apt-get update when the lists are stale)."""
    found = shutil.which("tmux")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "tmux"]
    if subprocess.run(command, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"apt-get install tmux failed: {done.stderr.strip()[-300:]}")
    found = shutil.which("tmux")
    if not found:
        pytest.skip("tmux installed but not found on PATH")
    return found


class Tmux:
    """One tmux server of this test (its own socket) with one session of 160 x 48."""

    def __init__(self, tmux: str, name: str) -> None:
        self.base = [tmux, "-L", name]
        self.session = "top"

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=10, check=False)

    def start(self, command: str) -> None:
        done = self.run("new-session", "-d", "-s", self.session, "-x", "160", "-y", "48", command)
        assert done.returncode == 0, done.stderr

    def capture(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.session).stdout

    def alive(self) -> bool:
        return self.run("has-session", "-t", self.session).returncode == 0

    def keys(self, *keys: str) -> None:
        assert self.run("send-keys", "-t", self.session, *keys).returncode == 0

    def kill(self) -> None:
        self.run("kill-server")


@pytest.fixture
def tmux(short_tmp: str) -> Iterator[Tmux]:
    server = Tmux(ensure_tmux(), f"dfz-top-{os.getpid()}-{Path(short_tmp).name}")
    try:
        yield server
    finally:
        server.kill()


def wait_for(what: str, check: Callable[[], str | None], timeout: float, last: Callable[[], str]) -> str:
    """Poll ``check`` until it returns a string (what was found), or fail with ``last()`` (the screen)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found is not None:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{what}: not seen within {timeout} s; the screen:\n{last()}")


RATE = re.compile(r"\b\d+\.\d [kMG]B/s")
NESTED = re.compile(r"(│   |    )[├└]── \S+")
"""A tree node at depth two or more: a guide column before the branch, i.e. a peer under a peer."""


def swarm_part(screen: str) -> str:
    """The right-hand column of the frame (the swarm panel): what follows the last '││' or '│╭' on each line."""
    out = []
    for line in screen.splitlines():
        for sep in ("││", "│╭", "│╰"):
            if sep in line:
                out.append(line.rsplit(sep, 1)[1])
                break
    return "\n".join(out)


def test_the_live_view_under_tmux_draws_the_swarm_tree_and_its_rates_as_they_change(
    procs: Procs, short_tmp: str, tmux: Tmux
) -> None:
    root = Path(short_tmp)
    data = os.urandom(12 * MiB)
    # The origin sends 3 MB/s: the seed takes about 4 s, and the daemons (2 MB/s each at most) longer.
    with serve_origin({"/model.bin": Route(data=data, rate=3_000_000)}) as origin:
        sched = start_sched(procs, root)
        # One upload slot at the seed: one daemon feeds from it, the others from daemons: a deeper tree.
        seed = start_node(procs, root, "seed", sched, "--upload-slots", "1", seed=True)
        daemons = [start_node(procs, root, f"d{k}", sched, "--upload-slots", "2", "--download-rate", "2000000") for k in range(3)]
        assert seed.proc.poll() is None
        rc_file, stty_file = root / "rc", root / "stty"
        top = shlex.join(dfz_cmd("top", "--scheduler", sched, "--interval", "0.3"))
        tmux.start(f"{top}; echo $? > {rc_file}; stty -a > {stty_file}")
        wait_for("the first frame", lambda: "dfz-sched" if "dfz-sched" in tmux.capture() else None, 20, tmux.capture)

        url = f"{origin.url}/model.bin"
        gets = [
            procs.start(get_argv(d, url, root / f"out{k}", "--piece-length", "256KiB", timeout=60), stdout=subprocess.PIPE)
            for k, d in enumerate(daemons)
        ]

        def tree_and_rates() -> str | None:
            screen = tmux.capture()
            if NESTED.search(swarm_part(screen)) and RATE.search(screen):
                return screen
            return None

        first = wait_for("a peer under a peer in the swarm, and a non-zero rate", tree_and_rates, 40, tmux.capture)
        assert "swarm of" in first and "running" in first + "back_to_source"

        def changed() -> str | None:
            screen = tree_and_rates()
            if screen is None:
                return None
            before = (RATE.findall(first), re.findall(r"\d+%", first))
            after = (RATE.findall(screen), re.findall(r"\d+%", screen))
            return screen if after != before else None

        wait_for("the rates or the progress changing", changed, 20, tmux.capture)

        # Keys: s cycles the hosts' order (shown in the header), j/k move the selection, q quits.
        tmux.keys("s")
        wait_for("sort by up", lambda: "x" if "sort hosts: up" in tmux.capture() else None, 10, tmux.capture)
        tmux.keys("j", "k", "q")
        wait_for("dfz top to exit", lambda: None if tmux.alive() and not rc_file.exists() else "gone", 15, tmux.capture)
        wait_for("its exit status", lambda: rc_file.read_text() if rc_file.exists() else None, 10, lambda: "")
        assert rc_file.read_text().strip() == "0"
        wait_for("the terminal's mode", lambda: stty_file.read_text() if stty_file.exists() else None, 10, lambda: "")
        modes = stty_file.read_text().split()
        assert "icanon" in modes and "echo" in modes, modes  # cbreak mode was undone

        # Ctrl-C quits too (exit status 130), and the terminal is restored as well.
        rc_file.unlink()
        stty_file.unlink()
        tmux.start(f"{top}; echo $? > {rc_file}; stty -a > {stty_file}")
        wait_for("the view again", lambda: "dfz-sched" if "dfz-sched" in tmux.capture() else None, 20, tmux.capture)
        tmux.keys("C-c")
        wait_for("its exit status", lambda: rc_file.read_text() if rc_file.exists() else None, 15, tmux.capture)
        assert rc_file.read_text().strip() == "130"
        wait_for("the terminal's mode", lambda: stty_file.read_text() if stty_file.exists() else None, 10, lambda: "")
        modes = stty_file.read_text().split()
        assert "icanon" in modes and "echo" in modes, modes

        for k, get in enumerate(gets):
            assert get.wait(90) == 0, k
            assert (root / f"out{k}").read_bytes() == data


def test_top_once_renders_a_scheduler_of_1000_simulated_hosts() -> None:
    """scripts/bench_top.py with 1,000 simulated hosts (real fabric sessions) against a real dfz sched:
    ``dfz top --once`` reads every host (in pages) and draws a frame within the time bound; the frame
    time it measures is printed by the script (never asserted on: only that it finished)."""
    r = run_script("bench_top.py", "--hosts", "1000", "--quick", timeout=150)
    assert (r["hosts"], r["hosts_seen"], r["pages_min"] >= 2) == (1000, 1000, True), r
    assert r["once_exit"] == 0 and "of 1000, by down" in r["once_frame"], r["once_frame"]
    assert r["once_lines"] == 48
    for key in ("frame_ms_p50", "frame_ms_max", "inspect_ms_p50", "once_s", "snapshot_ms_p50", "snapshot_all_ms_p50"):
        assert isinstance(r[key], float) and r[key] > 0, (key, r[key])
    assert r["core_peers"] >= 2000 and r["largest_task_peers"] > 0
    assert r["sched_exit"] == 0


def test_dfz_top_refuses_bad_sources_with_a_clear_error(tmp_path: Path) -> None:
    def top(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "DFZ_DATA_DIR": str(tmp_path / "none")}
        return subprocess.run(dfz_cmd("top", *args), capture_output=True, text=True, timeout=30, env=env, check=False)

    missing = top("--once")
    assert missing.returncode != 0 and "is `dfz up` running there" in missing.stderr
    (tmp_path / "cluster.json").write_text(json.dumps({"schedulers": ["udp://x"]}))
    bad = top("--once", "--cluster", str(tmp_path))
    assert bad.returncode != 0 and "is not a scheduler endpoint" in bad.stderr
    assert "needs a terminal" in top("--scheduler", "tcp://127.0.0.1:9").stderr
    assert "use it with --once" in top("--json", "--scheduler", "tcp://127.0.0.1:9").stderr
    assert top("--once", "--interval", "0").returncode == 2


def test_top_once_takes_the_schedulers_seed_peers_and_jobs_from_the_manager(procs: Procs, tmp_path: Path) -> None:
    """A real ``dfz mgr`` with a scheduler and a seed peer registered, and a job: ``dfz top --manager URL
    --token T`` finds the scheduler through the REST API, polls it, and shows the seed peer and the job."""
    with contextlib.contextmanager(run_mgr)(procs, tmp_path) as mgr:
        _, sched = start(procs, tmp_path / "sched.log", "sched", "--manager", mgr.fabric, "--listen", "tcp://127.0.0.1:0",
                         "--hostname", "sched-top", ready="listening")  # fmt: skip
        start(procs, tmp_path / "seed.log", "seed", "--data-dir", str(tmp_path / "seed"), "--scheduler", sched,
              "--manager", mgr.fabric, ready="api")  # fmt: skip
        made = mgr.api.post("/personal-access-tokens", json={"name": "top", "scopes": ["cluster:read", "job:read"]})
        assert made.status_code == 201, made.text
        token = str(made.json()["token"])
        job = mgr.api.post("/jobs", json={"type": "get_task", "args": {"url": "http://origin.example/x", "timeout": 10**9}})
        assert job.status_code == 201, job.text

        def seen() -> bool:
            return bool([s for s in mgr.items("/schedulers") if s["state"] == "active"]) and bool(mgr.items("/seed-peers"))

        deadline = time.monotonic() + 20
        while not seen():
            assert time.monotonic() < deadline, "the scheduler and the seed peer did not register"
            time.sleep(0.1)

        env = {**os.environ, "COLUMNS": "160", "LINES": "48"}
        argv = dfz_cmd("top", "--once", "--manager", mgr.url, "--interval", "0.2")
        done = subprocess.run([*argv, "--token", token], capture_output=True, text=True, timeout=60, env=env, check=False)
        assert done.returncode == 0, done.stderr
        frame = done.stdout
        assert sched.rsplit(":", 1)[1] in frame and "hosts 1 (seeds 1)" in frame, frame  # polled through the manager
        assert "recent jobs" in frame and "get_task" in frame and "seeds: ●" in frame, frame
        assert "schedulers 1/1 active" in frame and "seed peers 1/1 active" in frame, frame
        as_json = subprocess.run([*argv, "--token", token, "--json"], capture_output=True, text=True, timeout=60, env=env,
                                 check=False)  # fmt: skip
        view = json.loads(as_json.stdout)
        assert view["manager"]["jobs"][0]["id"] == job.json()["id"] and view["manager"]["seed_peers"][0]["state"] == "active"
        assert view["schedulers"][0]["ok"] and view["schedulers"][0]["seed_hosts"] == 1

        refused = subprocess.run([*argv, "--token", "dfz_wrong"], capture_output=True, text=True, timeout=60, check=False)
        assert refused.returncode != 0 and "refused the token (401)" in refused.stderr, refused.stderr
