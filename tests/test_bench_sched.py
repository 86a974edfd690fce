"""Smoke tests of the scheduler benchmarks (``scripts/bench_sched.py``, ``scripts/bench_sched_wire.py``):
each runs with ``--quick`` as a subprocess and its last line of output is one JSON object with the
figures, which must be there and sane. Nothing here asserts how fast anything is."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def run_script(name: str, *args: str, timeout: float) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{name} printed nothing:\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert isinstance(result, dict)
    assert len(lines) > 1, "a table comes before the JSON line"
    return result


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_bench_sched_quick_reports_decisions_latency_and_memory() -> None:
    r = run_script("bench_sched.py", "--quick", "--peers", "400", "--hosts", "80", "--tasks", "16", "--seed", "7", timeout=90)
    for key in ("decisions_per_s", "p50_ms", "p99_ms", "bytes_per_peer", "events_per_s"):
        assert positive(r[key]), (key, r[key])
    assert r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert (r["peers"], r["peers_registered"], r["hosts"], r["tasks"]) == (400, 400, 80, 16)
    # Every planned peer registered, and a registration is a decision; the triggered seeds' too.
    assert r["decisions_by_event"]["RegisterPeer"] == 400 + r["seed_peers"]
    assert r["decisions"] >= r["decisions_by_event"]["RegisterPeer"]
    assert r["parent_choices"] > 0 and r["events"] > r["decisions"]
    assert r["refused"] == 0 and r["unresolved"] == 0 and r["invariants_ok"] is True, r
    assert sum(r["outcomes"].values()) == 400
    assert r["outcomes"].get("succeeded", 0) > 0
    memory = r["memory"]
    assert memory["peers_held"] > 0 and positive(memory["core_bytes"])
    assert memory["bytes_per_peer"] == round(memory["core_bytes"] / memory["peers_held"], 1)
    assert set(r["goals_met"]) == {"decisions_per_s", "p99_ms", "bytes_per_peer"}


def test_bench_sched_wire_quick_talks_to_a_real_dfz_sched() -> None:
    r = run_script("bench_sched_wire.py", "--quick", "--sessions", "12", "--peers-per-session", "4", timeout=120)
    for key in ("msgs_per_s", "first_parent_p50_ms", "first_parent_p99_ms", "window_s", "messages"):
        assert positive(r[key]), (key, r[key])
    assert r["first_parent_p50_ms"] <= r["first_parent_p99_ms"] <= r["first_parent_max_ms"]
    peers = 12 * 4
    assert (r["sessions"], r["peers"], r["peers_registered"]) == (12, peers, peers)
    # Every peer ends: it finishes, or the scheduler fails it (no parent in time on a loaded machine); no
    # peer is left unfinished, and none failed on an error of the client or the wire.
    assert sum(r["outcomes"].values()) == peers and "unfinished" not in r["outcomes"], r["outcomes"]
    assert all(k.startswith(("finished", "failed: ")) for k in r["outcomes"]), r["outcomes"]
    assert 0 < r["peers_finished"] <= peers
    assert r["peers_with_parents"] + r["peers_back_to_source"] >= r["peers_finished"]
    assert r["seed_peers"] >= 1 and r["seed_peers"] <= r["tasks"]
    assert r["refused"] == 0 and r["errors"] == [] and r["sessions_lost"] == 0
    assert r["sched_exit"] == 0 and r["ok"] is True and r["timed_out"] is False
    assert r["messages_sent"] + r["messages_received"] >= r["messages"]
