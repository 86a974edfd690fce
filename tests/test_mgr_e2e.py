"""The manager's fabric side end to end: real ``dfz mgr``, ``dfz sched``, ``dfz seed``, ``dfz daemon``,
``dfz get`` and ``dfz up`` processes on 127.0.0.1 (ephemeral ports), the manager's REST API as the
observer, and an HTTP origin in the test that counts the bytes it serves.

* a scheduler and a seed peer register and show up active; a scheduler killed with SIGKILL is inactive
  within the keepalive bound; started again, the same instance is active again;
* daemons configured with only ``--manager`` get their schedulers from it (the cluster their address
  matches by CIDR, not the default one) and download a file P2P (sha256 right, the origin served it once);
* a dynamic config made through the REST API reaches the running seed and daemons (their logs, and the
  upload rate limit slows the next transfer) and the scheduler (its evaluator settings), without restart;
* ``dfz up`` runs the manager: cluster.json has its URL and fabric endpoint, and its scheduler and seed
  are registered there.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_helpers import Procs, Route, dfz_cmd, read_line, serve_origin, stop

from dfz.cluster import wait_for_cluster
from dfz.mgr.service import ROOT_PASSWORD_ENV

pytestmark = pytest.mark.timeout(60)

PASSWORD = "root-password-for-tests"
KEEPALIVE, LIVENESS = 0.3, 3
BOUND = KEEPALIVE * LIVENESS


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


@dataclass
class Mgr:
    proc: subprocess.Popen[bytes]
    url: str
    fabric: str
    api: httpx.Client

    def items(self, path: str, **params: Any) -> list[dict[str, Any]]:
        answer = self.api.get(path, params={"per_page": 100, **params})
        assert answer.status_code == 200, answer.text
        return list(answer.json()["items"])


@pytest.fixture
def mgr(procs: Procs, tmp_path: Path) -> Iterator[Mgr]:
    yield from run_mgr(procs, tmp_path)


def run_mgr(procs: Procs, tmp_path: Path) -> Iterator[Mgr]:
    """A ``dfz mgr`` process (SQLite in ``tmp_path``) and a REST client signed in as root, until the end."""
    config = tmp_path / "mgr.toml"
    config.write_text(f"keepalive = {KEEPALIVE}\nliveness = {LIVENESS}\nrefresh = 2\nconfig_poll = 0.2\n")
    argv = dfz_cmd("mgr", "--config", str(config), "--database", f"sqlite:///{tmp_path / 'm.db'}", "--listen", "127.0.0.1:0")
    argv += ["--fabric", "tcp://127.0.0.1:0", "-v"]
    with (tmp_path / "mgr.log").open("ab") as log:
        proc = procs.start(argv, stdout=subprocess.PIPE, stderr=log, env={**os.environ, ROOT_PASSWORD_ENV: PASSWORD})
    fabric = read_line(proc, "fabric")
    url = read_line(proc, "listening")
    api = httpx.Client(base_url=url + "/api/v1", timeout=10)
    assert api.post("/sessions", json={"name": "root", "password": PASSWORD}).status_code == 201
    yield Mgr(proc, url, fabric, api)
    api.close()


def start(procs: Procs, log: Path, *args: str, ready: str) -> tuple[subprocess.Popen[bytes], str]:
    with log.open("ab") as err:
        proc = procs.start(dfz_cmd(*args, "-v"), stdout=subprocess.PIPE, stderr=err)
    try:
        return proc, read_line(proc, ready)
    except AssertionError:
        raise AssertionError(f"{args[0]} did not start: {log.read_text()}") from None


def sched(procs: Procs, log: Path, manager: str, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    return start(procs, log, "sched", "--manager", manager, *args, ready="listening")


def test_scheduler_and_seed_register_die_and_come_back(procs: Procs, mgr: Mgr, tmp_path: Path) -> None:
    proc, endpoint = sched(procs, tmp_path / "sched.log", mgr.fabric, "--listen", "tcp://127.0.0.1:0", "--hostname", "sched-1")
    port = int(endpoint.rsplit(":", 1)[1])
    start(
        procs,
        tmp_path / "seed.log",
        "seed",
        "--data-dir",
        str(tmp_path / "seed"),
        "--scheduler",
        endpoint,
        "--manager",
        mgr.fabric,
        ready="api",
    )

    def active(path: str) -> list[dict[str, Any]]:
        return [row for row in mgr.items(path) if row["state"] == "active"]

    rows = wait_for(lambda: active("/schedulers"), 10, "scheduler active")
    assert [(r["hostname"], r["ip"], r["port"]) for r in rows] == [("sched-1", "127.0.0.1", port)]
    sched_id = rows[0]["id"]
    seeds = wait_for(lambda: active("/seed-peers"), 10, "seed peer active")
    assert len(seeds) == 1 and seeds[0]["ip"] == "127.0.0.1" and seeds[0]["type"] == "super"
    assert seeds[0]["last_keepalive_at"] is not None

    # SIGKILL: no bye; the manager hears nothing more and marks it inactive within the bound.
    proc.send_signal(signal.SIGKILL)
    proc.wait(5)
    killed = time.monotonic()
    wait_for(lambda: not active("/schedulers"), BOUND + 3, "scheduler inactive after SIGKILL")
    took = time.monotonic() - killed
    assert took < BOUND + 2, took
    assert active("/seed-peers")  # the seed keeps alive

    # Back on the same port: the same instance, active again. The flips are not audited; the first
    # registration is (by the fabric).
    sched(procs, tmp_path / "sched.log", mgr.fabric, "--listen", f"tcp://127.0.0.1:{port}", "--hostname", "sched-1")
    rows = wait_for(lambda: active("/schedulers"), 10, "scheduler active again")
    assert [r["id"] for r in rows] == [sched_id]
    audit = mgr.items("/audit-logs", resource_type="scheduler")
    assert [(a["action"], a["actor_name"], a["via"]) for a in audit] == [("create", "fabric", "fabric")]


def test_daemons_get_schedulers_from_the_manager_and_take_dynamic_config(procs: Procs, mgr: Mgr, tmp_path: Path) -> None:
    size = 6 << 20
    small = 3 << 20
    data, later = os.urandom(size), os.urandom(small)
    with serve_origin({"/file.bin": Route(data), "/later.bin": Route(later)}) as origin:
        # Two clusters: `near` serves 127.0.0.0/8, `far` is the default. The daemons are on 127.0.0.1: near.
        near = mgr.api.post("/scheduler-clusters", json={"name": "near", "scopes": {"cidrs": ["127.0.0.0/8"]}})
        far = mgr.api.post("/scheduler-clusters", json={"name": "far", "is_default": True})
        assert near.status_code == far.status_code == 201, (near.text, far.text)
        near_id = near.json()["id"]
        sched_near, ep_near = sched(
            procs, tmp_path / "near.log", mgr.fabric, "--listen", "tcp://127.0.0.1:0", "--cluster", "near"
        )
        _, ep_far = sched(
            procs, tmp_path / "far.log", mgr.fabric, "--listen", "tcp://127.0.0.1:0", "--cluster", "far", "--hostname", "far-1"
        )
        wait_for(lambda: len([r for r in mgr.items("/schedulers") if r["state"] == "active"]) == 2, 10, "both schedulers active")

        # The seed and two daemons are given only the manager.
        nodes = []
        for name in ("seed", "d1", "d2"):
            args = ("seed" if name == "seed" else "daemon", "--data-dir", str(tmp_path / name), "--manager", mgr.fabric)
            proc, api = start(procs, tmp_path / f"{name}.log", *args, ready="api")
            nodes.append((name, proc, api))
        for name, _, _ in nodes:
            log = tmp_path / f"{name}.log"
            wait_for(lambda log=log: f"new={ep_near}" in log.read_text(), 10, f"{name} got the near scheduler")  # type: ignore[misc]
            assert ep_far not in log.read_text()

        def get(api: str, url: str, out: Path) -> subprocess.Popen[bytes]:
            argv = dfz_cmd("get", url, "-O", str(out), "--endpoint", api, "--timeout", "30", "--no-progress")
            return procs.start(argv, stderr=subprocess.PIPE)

        gets = [
            (tmp_path / f"out-{name}", get(api, origin.url + "/file.bin", tmp_path / f"out-{name}")) for name, _, api in nodes[1:]
        ]
        for out, proc in gets:
            _, err = proc.communicate(timeout=40)
            assert proc.returncode == 0, err.decode()
            assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
        assert origin.served["/file.bin"] == size  # one copy from the origin: the rest went peer to peer
        assert "sched.announce_host" not in (tmp_path / "far.log").read_text()

        # A dynamic config through the REST API reaches the running seed and daemons ...
        rate = 1 << 20
        made = mgr.api.post("/configs", json={"name": "slow", "target": "daemon", "value": {"upload_rate_limit": rate}})
        assert made.status_code == 201, made.text
        slow_id = made.json()["id"]
        for name, _, _ in nodes:
            log = tmp_path / f"{name}.log"
            wait_for(lambda log=log: f"upload_rate_limit={rate} " in log.read_text(), 5, f"{name} took the setting")  # type: ignore[misc]
        # ... and shows in what they do: the next file comes from the seed at 1 MiB/s.
        began = time.monotonic()
        out = tmp_path / "out-later"
        proc = get(nodes[1][2], origin.url + "/later.bin", out)
        _, err = proc.communicate(timeout=40)
        took = time.monotonic() - began
        assert proc.returncode == 0, err.decode()
        assert out.read_bytes() == later
        assert origin.served["/later.bin"] == small
        assert took >= 0.8 * (small - (rate // 10)) / rate, took

        # A scheduler setting for the near cluster reaches its scheduler while it runs.
        made = mgr.api.post(
            "/configs",
            json={"name": "idc-first", "target": "scheduler", "scheduler_cluster_id": near_id, "value": {"idc_weight": 0.7}},
        )
        assert made.status_code == 201, made.text
        wait_for(
            lambda: re.search(r"sched_reconfigured taken=\S*idc_weight", (tmp_path / "near.log").read_text()), 5, "reconfigured"
        )
        # The far one took its cluster's settings at registration only.
        assert (tmp_path / "far.log").read_text().count("sched_reconfigured") == 1
        # Withdrawn: the daemons go back to their own (unlimited) setting.
        assert mgr.api.delete(f"/configs/{slow_id}").status_code == 204
        log = tmp_path / "d1.log"
        wait_for(lambda: "upload_rate_limit=0 " in log.read_text(), 5, "setting withdrawn")
        assert stop(sched_near) == 0


def test_up_runs_the_manager(procs: Procs, short_tmp: str) -> None:
    tmp = Path(short_tmp)
    with (tmp / "up.log").open("wb") as out:
        up = procs.start(dfz_cmd("up", "--data-dir", str(tmp / "up")), stdout=out, stderr=subprocess.STDOUT)
    info = wait_for_cluster(tmp / "up", 40, alive=lambda: up.poll() is None)
    manager = info["manager"]
    assert manager["url"].startswith("http://127.0.0.1:") and manager["fabric"].startswith("tcp://127.0.0.1:")
    assert Path(manager["data_dir"]) == tmp / "up" / "mgr" and (tmp / "up" / "mgr" / "manager.db").exists()
    assert set(info["parts"]) == {"sched", "seed", "daemon"}
    password = re.search(r"^root-password (\S+)$", Path(manager["log"]).read_text(), re.M)
    assert password is not None
    with httpx.Client(base_url=manager["url"] + "/api/v1", timeout=10) as api:
        assert api.post("/sessions", json={"name": "root", "password": password[1]}).status_code == 201

        def active(path: str) -> list[dict[str, Any]]:
            return [r for r in api.get(path).json()["items"] if r["state"] == "active"]

        rows = wait_for(lambda: active("/schedulers"), 10, "the scheduler registered")
        assert [f"tcp://{r['ip']}:{r['port']}" for r in rows] == info["schedulers"]
        seeds = wait_for(lambda: active("/seed-peers"), 10, "the seed registered")
        assert seeds[0]["port"] == int(info["parts"]["seed"]["announce"].rsplit(":", 1)[1])
    assert f"manager    {manager['url']}" in (tmp / "up.log").read_text()
    assert stop(up) == 0, (tmp / "up.log").read_text()
    assert not (tmp / "up" / "cluster.json").exists()
