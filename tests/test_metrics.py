"""Prometheus metrics (``dfz/metrics.py``): every process serves them, and ``promtool check metrics``
(Debian's ``prometheus`` package, installed by the test when missing) accepts what each serves.

Real processes: ``dfz mgr``, ``dfz sched``, ``dfz seed`` and ``dfz daemon`` with ``--metrics-listen``, an
HTTP origin, and a ``dfz get`` through the daemon, so that the counters that matter have moved.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from e2e_helpers import Procs, Route, dfz_cmd, read_line, serve_origin, stop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import benchlib

SIZE = 6 * 1024 * 1024 + 11


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        body: bytes = answer.read()
        return body.decode()


def value(text: str, name: str, **labels: str) -> float:
    """The sample ``name{labels}`` of a scrape (labels in any order); fails when absent."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if m is None or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    raise AssertionError(f"{name}{labels} is not in the scrape")


def promtool_check(promtool: str, text: str) -> None:
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"promtool check metrics failed:\n{done.stdout}{done.stderr}"


@pytest.fixture(scope="module")
def promtool() -> str:
    if os.geteuid() != 0 and not any(os.path.exists(f"{d}/promtool") for d in ("/usr/bin", "/usr/local/bin")):
        pytest.fail("promtool is missing and this is not root: apt-get install -y prometheus")
    return benchlib.ensure_command("promtool", "prometheus")


def test_every_process_serves_metrics_that_promtool_accepts(procs: Procs, tmp_path: Path, promtool: str) -> None:
    data = random.Random(7).randbytes(SIZE)
    env = dict(os.environ, DFZ_MGR_ROOT_PASSWORD="metrics-root-pass-1")
    with serve_origin({"/file": Route(data)}) as origin:
        mgr = procs.start(
            dfz_cmd("mgr", "--database", f"sqlite:///{tmp_path / 'mgr.db'}", "--listen", "127.0.0.1:0",
                    "--metrics-listen", "127.0.0.1:0"),
            stdout=subprocess.PIPE, env=env,
        )  # fmt: skip
        mgr_http = read_line(mgr, "listening")
        mgr_metrics = read_line(mgr, "metrics")
        sched = procs.start(
            dfz_cmd("sched", "--listen", "tcp://127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"), stdout=subprocess.PIPE
        )
        endpoint = read_line(sched, "listening")
        sched_metrics = read_line(sched, "metrics")
        urls: dict[str, str] = {}
        apis: dict[str, str] = {}
        for name in ("seed", "daemon"):
            proc = procs.start(
                dfz_cmd(name, "--data-dir", str(tmp_path / name), "--scheduler", endpoint, "--listen", "tcp://127.0.0.1:0",
                        "--api", f"ipc://{tmp_path / name}.sock", "--metrics-listen", "127.0.0.1:0"),
                stdout=subprocess.PIPE,
            )  # fmt: skip
            apis[name] = read_line(proc, "api")
            urls[name] = read_line(proc, "metrics")
        out = tmp_path / "out"
        got = subprocess.run(
            dfz_cmd("get", f"{origin.url}/file", "-O", str(out), "--no-progress", "--endpoint", apis["daemon"]),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert got.returncode == 0, got.stderr
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
        with urllib.request.urlopen(mgr_http.rstrip("/") + "/healthy", timeout=10) as answer:
            assert answer.status == 200

        scrapes = {"mgr": scrape(mgr_metrics), "sched": scrape(sched_metrics)}
        scrapes |= {name: scrape(url) for name, url in urls.items()}
        for text in scrapes.values():
            promtool_check(promtool, text)

        # The daemon got the file from its parent (the seed), which got it from the origin.
        assert value(scrapes["daemon"], "dfz_download_bytes_total", source="peer") == SIZE
        assert value(scrapes["daemon"], "dfz_download_bytes_total", source="origin") == 0
        assert value(scrapes["daemon"], "dfz_downloads_ended_total", state="succeeded", kind="") == 1
        assert value(scrapes["daemon"], "dfz_piece_fetch_seconds_count") >= 1
        assert value(scrapes["seed"], "dfz_download_bytes_total", source="origin") == SIZE
        assert value(scrapes["seed"], "dfz_upload_bytes_total") == SIZE
        assert value(scrapes["seed"], "dfz_fabric_requests_total") >= 2  # subscribe and pieces
        # The scheduler knew both hosts and decided about both peers.
        assert value(scrapes["sched"], "dfz_sched_hosts") == 2
        assert value(scrapes["sched"], "dfz_sched_event_seconds_count", event="RegisterPeer") >= 2
        assert value(scrapes["sched"], "dfz_fabric_sessions") == 2
        # The manager timed the REST request.
        assert value(scrapes["mgr"], "dfz_http_request_seconds_count", method="GET", status="2xx") >= 1
        for proc in (mgr, sched):
            assert stop(proc) == 0


def test_a_bad_metrics_address_is_a_clear_error(tmp_path: Path) -> None:
    for argv in (
        dfz_cmd("sched", "--listen", "tcp://127.0.0.1:0", "--metrics-listen", "nowhere"),
        dfz_cmd(
            "daemon", "--data-dir", str(tmp_path / "d"), "--scheduler", "tcp://127.0.0.1:1", "--metrics-listen", "1.2.3.4:99999"
        ),
    ):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode != 0
        assert "metrics_listen" in done.stderr and "HOST:PORT" in done.stderr, done.stderr
