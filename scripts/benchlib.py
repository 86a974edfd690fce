"""Shared pieces of the benchmark scripts: a local nginx origin (installed with apt-get when missing),
ports, test files, and the processes a benchmark starts (``dfz sched``/``daemon``/``seed``, nginx), all
stopped when the benchmark ends, fails or is interrupted (Ctrl-C, SIGTERM).

Not a test helper and not part of dfz: only ``scripts/bench_*.py`` import it (run them with the
repository's ``.venv/bin/python``; :func:`ensure_venv` re-executes with it when dfz is not importable).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent


def ensure_venv() -> None:
    """Re-execute this script with the repository's virtualenv interpreter when dfz is not importable
    (``./scripts/bench_x.py`` run by a system or pyenv ``python3``)."""
    venv_python = REPO / ".venv" / "bin" / "python"
    if importlib.util.find_spec("dfz") is None and venv_python.exists() and Path(sys.executable) != venv_python:
        os.execv(venv_python, [str(venv_python), *sys.argv])


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C (KeyboardInterrupt), so ``finally`` blocks stop every process;
    SIGINT does too even when the shell started this in the background with SIGINT ignored."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


# --- the origin ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


_apt_updated = False


def ensure_command(command: str, package: str) -> str:
    """The path of ``command``, installing Debian's ``package`` with apt-get first when it is missing (as
    root; otherwise exit with the command to run)."""
    global _apt_updated
    path = shutil.which(command) or next((p for d in ("/usr/sbin", "/sbin") if os.path.exists(p := f"{d}/{command}")), None)
    if path:
        return path
    if os.geteuid() != 0:
        sys.exit(f"{command} is not installed: run `apt-get update && apt-get install -y {package}` as root")
    print(f"installing {package} with apt-get ...", file=sys.stderr)
    if not _apt_updated:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        _apt_updated = True
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, stdout=subprocess.DEVNULL)
    return shutil.which(command) or f"/usr/sbin/{command}"


def ensure_nginx() -> str:
    return ensure_command("nginx", "nginx-light")


def make_file(path: str, size: int) -> str:
    """Write ``size`` random bytes to ``path`` (world-readable, for nginx's workers); their sha256 hex."""
    block = os.urandom(16 * MIB)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            digest.update(block[:n])
            left -= n
    os.chmod(path, 0o644)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def make_certificate(root: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (its own CA): (certificate, key)."""
    cert, key = os.path.join(root, "cert.pem"), os.path.join(root, "key.pem")
    subprocess.run(
        [
            *["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"],
            *["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", key, "-out", cert],
        ],
        check=True,
        capture_output=True,
    )
    os.chmod(key, 0o644)
    return cert, key


ACCESS_LOG_FORMAT = "$status $bytes_sent $body_bytes_sent $request_time $msec"
"""What :class:`AccessLog` parses: one line per request, logged when the request ends."""


def start_nginx(
    root: str, tls: bool = False, *, access_log: str | None = None, http_extra: str = "", server_extra: str = ""
) -> tuple[subprocess.Popen[bytes], int]:
    """nginx (one worker, not daemonized) serving ``root/www`` on 127.0.0.1 and a free port; returns once
    the port accepts connections. ``access_log``: a file for :class:`AccessLog`; the ``*_extra`` strings
    are added to the ``http`` and ``server`` blocks (e.g. ``limit_rate``)."""
    nginx = ensure_nginx()
    port = free_port()
    listen = f"127.0.0.1:{port}"
    if tls:
        cert, key = make_certificate(root)
        listen += f" ssl;\n        ssl_certificate {cert};\n        ssl_certificate_key {key}"
    log = f"log_format bench '{ACCESS_LOG_FORMAT}';\n    access_log {access_log} bench" if access_log else "access_log off"
    conf = os.path.join(root, "nginx.conf")
    with open(conf, "w") as f:
        f.write(
            f"""
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 256; }}
http {{
    {log};
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {root}/tmp-body;
    proxy_temp_path {root}/tmp-proxy;
    fastcgi_temp_path {root}/tmp-fastcgi;
    uwsgi_temp_path {root}/tmp-uwsgi;
    scgi_temp_path {root}/tmp-scgi;
    {http_extra}
    server {{
        listen {listen};
        root {root}/www;
        {server_extra}
    }}
}}
"""
        )
    proc = subprocess.Popen([nginx, "-p", root, "-c", conf, "-e", f"{root}/error.log"])
    try:
        wait_port(port)
    except BaseException:
        proc.terminate()
        proc.wait(10)
        raise
    return proc, port


@dataclass
class AccessLog:
    """Bytes nginx sent (``$bytes_sent``: headers and body) according to its access log."""

    path: str

    def totals(self) -> tuple[int, int]:
        """(requests, bytes sent) over the whole log so far."""
        requests = sent = 0
        try:
            with open(self.path) as f:
                for line in f:
                    fields = line.split()
                    if len(fields) >= 2 and fields[1].isdigit():
                        requests += 1
                        sent += int(fields[1])
        except FileNotFoundError:
            pass
        return requests, sent

    def span(self, since: float) -> tuple[float, float] | None:
        """(first request's start, last request's end), Unix seconds, over requests that ended after
        ``since``; None when there are none. From ``$msec`` (the end, to the millisecond) and
        ``$request_time`` (the duration)."""
        first = last = None
        try:
            with open(self.path) as f:
                for line in f:
                    fields = line.split()
                    if len(fields) < 5:
                        continue
                    try:
                        end, took = float(fields[4]), float(fields[3])
                    except ValueError:
                        continue
                    if end >= since:
                        first = end - took if first is None else min(first, end - took)
                        last = end if last is None else max(last, end)
        except FileNotFoundError:
            pass
        return None if first is None or last is None else (first, last)

    def settled(self, quiet: float = 0.3, timeout: float = 5.0) -> tuple[int, int]:
        """:meth:`totals` once the log stopped growing for ``quiet`` seconds (nginx logs a request when it
        has sent the last byte, a moment after the client has it)."""
        last = self.totals()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = self.totals()
            if now == last:
                return now
            last = now
        return last


# --- processes -------------------------------------------------------------------------------------------


@dataclass
class Service:
    """A process started by :class:`Processes`; its stdout and stderr go to files in the run's directory."""

    name: str
    proc: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def lines(self) -> list[str]:
        try:
            return self.stdout.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def tail(self, n: int = 15) -> str:
        try:
            text = self.stderr.read_text(errors="replace").splitlines()[-n:]
        except FileNotFoundError:
            text = []
        return "\n".join(f"    {line}" for line in (*self.lines()[-5:], *text))

    def wait_for(self, prefixes: Sequence[str], timeout: float = 30.0) -> dict[str, list[str]]:
        """Wait until the process printed a line starting with each of ``prefixes`` (e.g. ``"api "``);
        returns the rest of those lines by prefix. Raises RuntimeError (with its log) if it exits first."""
        deadline = time.monotonic() + timeout
        while True:
            found: dict[str, list[str]] = {p: [] for p in prefixes}
            for line in self.lines():
                for p in prefixes:
                    if line.startswith(p):
                        found[p].append(line[len(p) :].strip())
            if all(found.values()):
                return found
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not print {list(prefixes)} within {timeout:g} s:\n{self.tail()}")
            time.sleep(0.05)

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds so far (/proc/PID/stat), while the process still runs."""
        return cpu_seconds(self.pid)

    def memory_kib(self) -> dict[str, int]:
        """VmHWM, VmRSS, RssAnon, RssFile (KiB) from /proc/PID/status, while the process still runs."""
        found: dict[str, int] = {}
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    found[key] = int(value.split()[0])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        return found

    def peak_rss_kib(self) -> int | None:
        """VmHWM (peak resident set) from /proc, while the process still runs."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        return None


@dataclass
class Processes:
    """Every process a benchmark started; :meth:`close` (or leaving the ``with`` block, also on Ctrl-C)
    stops them newest first: SIGTERM, then SIGKILL after ``grace`` seconds. Each runs in its own session,
    so a Ctrl-C in the terminal reaches only the benchmark, which then stops them in order."""

    logs: Path
    grace: float = 10.0
    services: list[Service] = field(default_factory=list)

    def start(self, name: str, cmd: Sequence[str], *, cwd: str | Path | None = None) -> Service:
        self.logs.mkdir(parents=True, exist_ok=True)
        stdout, stderr = self.logs / f"{name}.out", self.logs / f"{name}.err"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True)
        service = Service(name, proc, stdout, stderr)
        self.services.append(service)
        return service

    def adopt(self, name: str, proc: subprocess.Popen[bytes], stdout: Path, stderr: Path) -> Service:
        """Take charge of a process started elsewhere (e.g. by :func:`start_nginx`)."""
        service = Service(name, proc, stdout, stderr)
        self.services.append(service)
        return service

    def stop(self, service: Service) -> int | None:
        """Stop one service (SIGTERM, then SIGKILL); its exit code."""
        proc = service.proc
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(self.grace)
            except subprocess.TimeoutExpired:
                progress(f"{service.name} (pid {proc.pid}) ignored SIGTERM for {self.grace:g} s: SIGKILL")
                proc.kill()
                proc.wait()
        if service in self.services:
            self.services.remove(service)
        return proc.returncode

    def close(self) -> None:
        for service in reversed(list(self.services)):
            if service.proc.poll() is None:  # first SIGTERM to all, so they stop in parallel
                service.proc.send_signal(signal.SIGTERM)
        for service in reversed(list(self.services)):
            self.stop(service)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process (/proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15 of stat


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's children that have ended and were waited for."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def dfz_command(*args: str) -> list[str]:
    """``dfz ARGS`` run by this interpreter (the venv's: the process id is the daemon's own)."""
    return [sys.executable, "-m", "dfz.cli", *args]


def mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)
