"""Smoke test of the manager benchmark (``scripts/bench_mgr.py``): ``--quick`` runs a real ``dfz mgr``, a few
dozen simulated daemons in two worker processes and a few REST clients; its last line is one JSON object
whose figures must be there and consistent. Nothing here asserts how fast anything is."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(120)


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_bench_mgr_quick() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_mgr.py"), "--quick"],
        check=False,
        capture_output=True,
        text=True,
        timeout=100,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"bench_mgr.py exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) > 1, "a table comes before the JSON line"
    r = json.loads(lines[-1])
    assert any(line.startswith("goal: ") and line.endswith(("PASS", "FAIL")) for line in lines)
    for key in ("keepalives_per_s", "api_p99_ms", "manager_cpu_percent", "api_p50_ms", "keepalive_p99_ms", "lookups_per_s"):
        assert positive(r[key]), (key, r[key])
    # Every simulated daemon registered, is an active host in the REST API, and was answered with the
    # cluster's two schedulers; the REST clients got answers.
    assert r["daemons"] == r["registered"] == r["hosts_registered"] == r["hosts_active"] == 60
    assert r["schedulers_in_answer"] == 2
    assert r["keepalives"] > 0 and r["api_requests"] > 0 and r["api_p50_ms"] <= r["api_p99_ms"] <= r["api_max_ms"]
    assert set(r["goals_met"]) | set(r["goals_failed"]) == {"daemons_hold", "manager_cpu_percent", "api_p99_ms"}
