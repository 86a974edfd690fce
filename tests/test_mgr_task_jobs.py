"""``get_task``, ``delete_task`` and cancelling across real processes: ``dfz mgr``, ``dfz sched``, ``dfz seed``,
``dfz daemon``, ``dfz get`` and ``dfz preheat`` on 127.0.0.1 (ephemeral ports; the stack of
``test_mgr_preheat.py``), with an HTTP origin in the test that counts the bytes it serves.

* after a ``dfz get``, a ``get_task`` job (open API, by URL; REST, by task id) finds the task on the seed peer
  and the daemon, both finished, with their pieces;
* a ``delete_task`` job removes it from both caches (their storage directories) and from the scheduler (a
  ``get_task`` then finds nobody), and the next ``dfz get`` fetches it from the origin again;
* a ``delete_task`` while a ``dfz get`` downloads the task cancels that download cleanly (no output file),
  and the file is then downloaded whole and right;
* a running preheat cancelled through the REST API ends ``cancelled`` with its result recorded; ``dfz
  preheat --timeout`` (seconds) reaches the manager as nanoseconds.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_helpers import Procs, Route, dfz_cmd, serve_origin
from test_mgr_preheat import Stack, free_port, job_done, wait_for

from dfz.tasks import task_id

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def stack(procs: Procs, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(procs, tmp_path, f"sqlite:///{tmp_path / 'm.db'}", f"tcp://127.0.0.1:{free_port()}")
    s.start_mgr()
    s.start("sched", "--manager", s.fabric, "--listen", "tcp://127.0.0.1:0", name="sched")
    s.start("seed", "--data-dir", str(tmp_path / "seed"), "--manager", s.fabric, name="seed")
    wait_for(lambda: s.active("seed-peers") and s.active("schedulers"), 10, "scheduler and seed peer active")
    yield s
    if s.api is not None:
        s.api.close()


def get(url: str, out: Path, api: str) -> subprocess.CompletedProcess[bytes]:
    argv = dfz_cmd("get", url, "-O", str(out), "--endpoint", api, "--timeout", "30", "--no-progress")
    return subprocess.run(argv, capture_output=True, timeout=40, check=False)


def rest_job(stack: Stack, body: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    assert stack.api is not None
    made = stack.api.post("/api/v1/jobs", json=body)
    assert made.status_code == 201, made.text
    job_id = made.json()["id"]

    def done() -> dict[str, Any] | None:
        job: dict[str, Any] = stack.api.get(f"/api/v1/jobs/{job_id}").json()  # type: ignore[union-attr]
        return job if job["state"] not in ("pending", "running") else None

    result: dict[str, Any] = wait_for(done, timeout, f"job {job_id} ended")
    return result


def test_get_and_delete_a_task(stack: Stack, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    with serve_origin({"/f.bin": Route(data), "/slow.bin": Route(data, rate=2 << 20)}) as origin:
        api = stack.start("daemon", "--data-dir", str(tmp_path / "d"), "--manager", stack.fabric, name="d")
        url = origin.url + "/f.bin"
        got = get(url, tmp_path / "out.bin", api)
        assert got.returncode == 0, got.stderr.decode()
        assert origin.served["/f.bin"] == len(data)  # the seed fetched it; the daemon got it from the seed
        tid = task_id(url)
        seed_dir, daemon_dir = tmp_path / "seed" / "tasks" / tid, tmp_path / "d" / "tasks" / tid
        assert seed_dir.exists() and daemon_dir.exists()

        # Where is it cached? The open API, by URL (Dragonfly's shape), and the REST API, by task id.
        token = stack.token(["job"])
        oapi = httpx.Client(base_url=stack.url, timeout=10, headers={"Authorization": f"Bearer {token}"})
        made = oapi.post("/oapi/v1/jobs", json={"type": "get_task", "args": {"url": url, "filteredQueryParams": None}})
        assert made.status_code == 200, made.text
        job = job_done(oapi, made.json()["id"])
        assert job["state"] == "SUCCESS", job
        [cluster] = job["result"]["job_states"][0]["results"]
        peers = cluster["peers"]
        assert job["result"]["task_id"] == tid and cluster["scheduler_cluster_id"] >= 1
        assert sorted(p["host_type"] for p in peers) == ["normal", "seed"], peers
        assert all(p["state"] == "succeeded" and p["finished_pieces"] == p["piece_count"] >= 1 for p in peers), peers
        assert all(p["content_length"] == len(data) and p["ip"] == "127.0.0.1" and p["hostname"] for p in peers), peers
        by_id = rest_job(stack, {"type": "get_task", "args": {"task_id": tid}})
        assert by_id["state"] == "succeeded", by_id
        assert {p["id"] for p in by_id["result"]["job_states"][0]["results"][0]["peers"]} == {p["id"] for p in peers}

        # Delete it everywhere: both caches, then the scheduler; the next get goes to the origin again.
        deleted = rest_job(stack, {"type": "delete_task", "args": {"url": url}})
        assert deleted["state"] == "succeeded", deleted
        [result] = deleted["result"]["job_states"][0]["results"]
        assert sorted(h["host_type"] for h in result["success_tasks"]) == ["normal", "seed"], result
        assert all(h["held"] and h["task_id"] == tid for h in result["success_tasks"]) and result["failure_tasks"] == []
        assert not seed_dir.exists() and not daemon_dir.exists()
        again = job_done(oapi, oapi.post("/oapi/v1/jobs", json={"type": "get_task", "args": {"taskID": tid}}).json()["id"])
        assert again["state"] == "SUCCESS" and again["result"]["job_states"][0]["results"][0]["peers"] == [], again
        got = get(url, tmp_path / "again.bin", api)
        assert got.returncode == 0, got.stderr.decode()
        assert origin.served["/f.bin"] == 2 * len(data)
        assert hashlib.sha256((tmp_path / "again.bin").read_bytes()).digest() == hashlib.sha256(data).digest()

        # Deleted while it downloads: the download is cancelled cleanly (no output), then it comes whole.
        slow = origin.url + "/slow.bin"
        out = tmp_path / "slow.bin"
        argv = dfz_cmd("get", slow, "-O", str(out), "--endpoint", api, "--timeout", "30", "--no-progress")
        running = stack.procs.start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(lambda: origin.served.get("/slow.bin", 0) > 0, 15, "the slow download started")
        deleted = rest_job(stack, {"type": "delete_task", "args": {"url": slow}})
        assert deleted["state"] == "succeeded", deleted
        assert running.wait(30) != 0 and not out.exists()
        assert not (tmp_path / "d" / "tasks" / task_id(slow)).exists()
        got = get(slow, out, api)
        assert got.returncode == 0, got.stderr.decode()
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
        oapi.close()


def test_cancel_a_running_preheat(stack: Stack, tmp_path: Path) -> None:
    data = os.urandom(4 << 20)
    with serve_origin({"/slow.bin": Route(data, rate=1 << 20)}) as origin:
        token = stack.token(["job"])
        cli = ["--manager", stack.url, "--token", token, "--no-progress", "--no-wait", "--timeout", "120"]
        done = subprocess.run(dfz_cmd("preheat", origin.url + "/slow.bin", *cli), capture_output=True, timeout=40, check=False)
        assert done.returncode == 0, done.stderr.decode()
        job_id = int(done.stdout.split()[1])
        assert stack.api is not None
        job = stack.api.get(f"/api/v1/jobs/{job_id}").json()
        assert job["args"]["timeout"] == 120 * 1_000_000_000  # seconds on the command line, nanoseconds on the wire
        wait_for(lambda: origin.served.get("/slow.bin", 0) > 0, 15, "the seed started fetching")
        answer = stack.api.post(f"/api/v1/jobs/{job_id}/cancel")
        assert answer.status_code == 200 and answer.json()["state"] == "cancelled", answer.text

        def recorded() -> dict[str, Any] | None:
            job: dict[str, Any] = stack.api.get(f"/api/v1/jobs/{job_id}").json()  # type: ignore[union-attr]
            tasks = job["result"].get("tasks", [])
            return job if tasks and tasks[0]["state"] == "cancelled" else None

        job = wait_for(recorded, 10, "the cancelled preheat's result")
        assert job["state"] == "cancelled" and job["finished_at"] and job["error"] == "cancelled by root", job
        assert stack.api.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 409
        oapi = httpx.Client(base_url=stack.url, timeout=10, headers={"Authorization": f"Bearer {token}"})
        shown = oapi.get(f"/oapi/v1/jobs/{job_id}").json()
        assert shown["state"] == "FAILURE" and shown["dfz_state"] == "cancelled"
        oapi.close()
