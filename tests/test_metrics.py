"""Prometheus metrics (``dfz/metrics.py``): every process serves them, and ``promtool check metrics``
(Debian's ``prometheus`` package, installed by the test when missing) accepts what each serves.

Real processes: ``dfz mgr``, ``dfz sched``, ``dfz seed`` and ``dfz daemon`` with ``--metrics-listen``, an
HTTP origin, and a ``dfz get`` through the daemon, so that the counters that matter have moved. The daemon
has a proxy port too (``--proxy-listen``): forward-proxy requests through it (one P2P, pass-through ones,
an origin's 404, a refused mirror request, a CONNECT tunnel) move the ``dfz_proxy_*`` metrics by known
amounts.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from e2e_helpers import Procs, Route, dfz_cmd, read_line, serve_origin, stop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import benchlib

SIZE = 6 * 1024 * 1024 + 11
SMALL = random.Random(8).randbytes(1000)


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


def eventually(url: str, check: Callable[[str], bool], timeout: float = 10.0) -> str:
    """A scrape of ``url`` for which ``check`` holds (scraped again until it does, up to ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        text = scrape(url)
        if check(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


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
    routes = {"/file": Route(data), "/small": Route(SMALL), "/missing": Route(status=404)}
    with serve_origin(routes) as origin:
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
            proxy = ["--proxy-listen", "127.0.0.1:0", "--proxy-rule", "/file$", "--proxy-connect-allow", r"127\.0\.0\.1:\d+"]
            proc = procs.start(
                dfz_cmd(name, "--data-dir", str(tmp_path / name), "--scheduler", endpoint, "--listen", "tcp://127.0.0.1:0",
                        "--api", f"ipc://{tmp_path / name}.sock", "--metrics-listen", "127.0.0.1:0",
                        *(proxy if name == "daemon" else [])),
                stdout=subprocess.PIPE,
            )  # fmt: skip
            apis[name] = read_line(proc, "api")
            urls[name] = read_line(proc, "metrics")
            if name == "daemon":
                proxy_url = read_line(proc, "proxy")
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
        # The seed has no proxy port: no proxy metrics.
        assert "dfz_proxy_" not in scrapes["seed"]
        assert value(scrapes["daemon"], "dfz_proxy_connections") == 0

        proxied = exercise_proxy(proxy_url, origin.url, data, urls["daemon"])
        # The tunnel is counted once it closed, and the connection it was after that.
        closed = ("dfz_proxy_tunnels", "dfz_proxy_connections")
        text = eventually(
            urls["daemon"], lambda t: value(t, "dfz_proxy_tunnel_bytes_total") > 0 and not any(value(t, m) for m in closed)
        )
        promtool_check(promtool, text)
        requests = {
            ("forward_p2p", "2xx"): 1,
            ("forward_passthrough", "2xx"): 1,
            ("forward_passthrough", "4xx"): 1,
            ("mirror_passthrough", "4xx"): 1,
            ("connect", "2xx"): 1,
        }
        for (route, status), n in requests.items():
            assert value(text, "dfz_proxy_requests_total", route=route, status=status) == n, (route, status)
            assert value(text, "dfz_proxy_request_seconds_count", route=route) == sum(
                v for (r, _), v in requests.items() if r == route
            )
        assert value(text, "dfz_proxy_response_bytes_total", route="forward_p2p", source="p2p") == SIZE
        assert value(text, "dfz_proxy_response_bytes_total", route="forward_passthrough", source="passthrough") == len(SMALL)
        assert value(text, "dfz_proxy_response_bytes_total", route="mirror_passthrough", source="proxy") == proxied["refused"]
        assert value(text, "dfz_proxy_errors_total", source="origin") == 1
        assert value(text, "dfz_proxy_errors_total", source="proxy") == 1
        assert value(text, "dfz_proxy_errors_total", source="daemon") == 0
        assert value(text, "dfz_proxy_tunnel_bytes_total") == proxied["tunnel"]
        assert value(text, "dfz_proxy_connections") == 0
        assert value(text, "dfz_proxy_tunnels") == 0
        assert proxied["connections_open"] == 1 and proxied["tunnels_open"] == 1
        # No URL or host in any proxy label.
        for line in text.splitlines():
            if line.startswith("dfz_proxy_"):
                assert "127.0.0.1" not in line and "/file" not in line, line
        for proc in (mgr, sched):
            assert stop(proc) == 0


def exercise_proxy(proxy_url: str, origin_url: str, data: bytes, metrics_url: str) -> dict[str, int]:
    """Requests through the daemon's proxy port: a P2P GET of ``/file``, a pass-through GET of ``/small``, a
    pass-through 404, a mirror request with no upstream (400 from the proxy), a CONNECT tunnel to the origin
    carrying one HTTP/1.0 exchange. Returns the refused answer's body length, the tunnel's bytes (both ways),
    and the proxy's open connections and tunnels scraped while one of each was open."""
    proxy = urlsplit(proxy_url)
    origin = urlsplit(origin_url)
    assert proxy.hostname is not None and proxy.port is not None and origin.port is not None
    out: dict[str, int] = {}
    conn = http.client.HTTPConnection(proxy.hostname, proxy.port, timeout=30)
    try:
        for path, status, body in (("/file", 200, data), ("/small", 200, SMALL), ("/missing", 404, b"")):
            conn.request("GET", f"{origin_url}{path}")
            answer = conn.getresponse()
            got = answer.read()
            assert answer.status == status, (path, answer.status, got[:200])
            assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest(), path
            if status == 404:
                assert answer.headers["X-Dfz-Error-Source"] == "origin"
        conn.request("GET", "/v2/")
        answer = conn.getresponse()
        refused = answer.read()
        assert answer.status == 400 and answer.headers["X-Dfz-Error-Source"] == "proxy", refused
        out["refused"] = len(refused)
        out["connections_open"] = int(value(scrape(metrics_url), "dfz_proxy_connections"))
    finally:
        conn.close()
    with socket.create_connection((proxy.hostname, proxy.port), timeout=30) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            part = sock.recv(4096)
            assert part, head
            head += part
        assert head.startswith(b"HTTP/1.1 200"), head
        head, _, early = head.partition(b"\r\n\r\n")
        assert early == b""  # nothing comes through the tunnel before the client speaks
        out["tunnels_open"] = int(value(scrape(metrics_url), "dfz_proxy_tunnels"))
        request = f"GET /small HTTP/1.0\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode()
        sock.sendall(request)
        reply = b""
        while part := sock.recv(65536):  # the origin closes after an HTTP/1.0 answer
            reply += part
        assert reply.startswith(b"HTTP/1.") and b" 200 " in reply[:20] and reply.endswith(SMALL), reply[:200]
        out["tunnel"] = len(request) + len(reply)
    return out


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
