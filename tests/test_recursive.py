"""``dfz get -r``: listings by the HTTP backend (nginx ``autoindex``, HTML and JSON, and crafted hostile pages
from a small test server), the relative-path rules, and recursive downloads through a real ``dfz up`` of an
nginx directory, an S3 prefix (SeaweedFS) and a ``file://`` directory, each file's sha256 checked."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import dfz_cmd
from s3_server import ACCESS_KEY, REGION, SECRET_KEY, start_s3_server

from dfz.cluster import wait_for_cluster
from dfz.peer.api_client import open_api_client
from dfz.peer.source import MalformedURL, RetryPolicy, SourceProtocolError, SourceRequestError
from dfz.peer.source.file import file_url
from dfz.peer.source.http import HTTPBackend
from dfz.peer.source.listing import UnsafePath, check_relative_path, relative_path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import benchlib

pytestmark = pytest.mark.timeout(60)

RNG = random.Random(6)
# The tree served by nginx, SeaweedFS and file://: path -> content (one file over the tiny-file limit).
TREE = {
    "a.txt": b"alpha\n",
    "sp ace.txt": b"with a space",
    "sub/b.bin": RNG.randbytes(1_200_000),
    "sub/deep/c.json": b'{"c": 1}',
    "sub/deep/d.bin": RNG.randbytes(70_000),
}
BUCKET = "dfz-rec"
FAST = RetryPolicy(attempts=2, backoff=0.01, backoff_max=0.02)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_tree(root: Path) -> None:
    for path, data in TREE.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        target.chmod(0o644)
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        directory.chmod(0o755)


# --- a server of crafted (hostile) listings ---------------------------------------------------------------

PAGES: dict[str, tuple[str, str]] = {
    # path -> (content type, body)
    "/benign/": (
        "text/html",
        '<a href="../">../</a><a href="?C=N;O=D">Name</a><a href="/">home</a><a href="/benign/">.</a>'
        '<a href="x%20y.txt">x y.txt</a><a href="sub/">sub/</a><a href="#top">top</a>',
    ),
    "/benign/sub/": ("text/html", '<a href="../">../</a><a href="z.bin">z.bin</a>'),
    "/climb/": ("text/html", '<a href="../">../</a><a href="../secret/passwd">passwd</a>'),
    "/absolute/": ("text/html", '<a href="/etc/passwd">passwd</a>'),
    "/host/": ("text/html", '<a href="http://other.example/x">x</a>'),
    "/encoded/": ("text/html", '<a href="%2e%2e/x">x</a>'),
    "/slash/": ("text/html", '<a href="a%2Fb">a/b</a>'),
    "/json-climb/": ("application/json", json.dumps([{"name": "../escape", "type": "file", "size": 1}])),
    "/json-abs/": ("application/json", json.dumps([{"name": "/etc/passwd", "type": "file", "size": 1}])),
    "/json-nul/": ("application/json", json.dumps([{"name": "a\u0000b", "type": "file", "size": 1}])),
    "/loop/": ("text/html", '<a href="loop/">loop/</a>'),
    "/plain/": ("text/plain", "hello"),
}


def _page(path: str) -> tuple[str, str] | None:
    if path in PAGES:
        return PAGES[path]
    if path.startswith("/loop/"):  # an endless chain of subdirectories
        return PAGES["/loop/"]
    return None


class _Crafted(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        page = _page(self.path)
        if page is None:
            self.send_error(404)
            return
        body = page[1].encode()
        self.send_response(200)
        self.send_header("Content-Type", page[0])
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def crafted() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Crafted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --- nginx, SeaweedFS and a dfz cluster, once for the module ------------------------------------------------


@dataclass
class World:
    tmp: Path
    nginx: str  # base URL
    tree: Path  # the file:// tree
    endpoint: str  # dfz up's local API
    log: Path


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with tempfile.TemporaryDirectory(prefix="dfz-r-", dir="/tmp") as d:
        tmp = Path(d)
        tmp.chmod(0o755)  # nginx's workers may run as another user
        write_tree(tmp / "www" / "tree")
        (tmp / "www").chmod(0o755)
        extra = (
            "location /tree/ { autoindex on; }\n"
            f"        location /json/ {{ alias {tmp}/www/tree/; autoindex on; autoindex_format json; }}"
        )
        nginx, port = benchlib.start_nginx(str(tmp), server_extra=extra)
        procs: list[subprocess.Popen[bytes]] = [nginx]
        try:
            with start_s3_server(tmp / "seaweedfs") as s3:
                client = s3.client()
                client.create_bucket(Bucket=BUCKET)
                for path, data in TREE.items():
                    client.put_object(Bucket=BUCKET, Key=f"pre/{path}", Body=data)
                client.put_object(Bucket=BUCKET, Key="prefix-sibling.txt", Body=b"not below pre/")
                env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
                env |= {
                    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                    "AWS_ENDPOINT_URL_S3": s3.endpoint,
                    "AWS_REGION": REGION,
                    "AWS_EC2_METADATA_DISABLED": "true",
                }
                log = tmp / "up.log"
                with log.open("wb") as out:
                    up = subprocess.Popen(
                        dfz_cmd("up", "--no-manager", "--data-dir", str(tmp / "up")),
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                procs.append(up)
                info = wait_for_cluster(tmp / "up", 30, alive=lambda: up.poll() is None)
                yield World(tmp, f"http://127.0.0.1:{port}", tmp / "www" / "tree", str(info["endpoint"]), log)
        finally:
            for proc in reversed(procs):
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def get_r(world: World, url: str, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = dfz_cmd("get", "-r", url, "-O", str(out), "--endpoint", world.endpoint, "--timeout", "30", *args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=50, stdin=subprocess.DEVNULL, check=False)


def tree_of(root: Path) -> dict[str, str]:
    """path -> sha256 of every file below ``root`` (temporary files of an export would show here too)."""
    return {p.relative_to(root).as_posix(): sha(p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def expected(paths: list[str] | None = None) -> dict[str, str]:
    return {p: sha(d) for p, d in TREE.items() if paths is None or p in paths}


# --- pure rules --------------------------------------------------------------------------------------------


def test_relative_paths_stay_below_the_listed_url() -> None:
    assert relative_path("s3://b/pre", "s3://b/pre/sub/a%20b.txt") == "sub/a b.txt"
    assert relative_path("s3://b", "s3://b/x/y") == "x/y"
    assert relative_path("file://localhost/srv/d/", "file:///srv/d/x") == "x"
    assert relative_path("https://h:8/d/", "https://H:8/d/e/f") == "e/f"
    # hf:// writes a revision after the path (none for main)
    assert relative_path("hf://o/r@v1", "hf://o/r/dir/w.bin@v1") == "dir/w.bin"
    assert relative_path("hf://o/r@main", "hf://o/r/w.bin") == "w.bin"
    assert relative_path("hf://o/r", "hf://o/r/sub/w.bin") == "sub/w.bin"
    for base, entry in [
        ("s3://b/pre", "s3://b/prefix-sibling.txt"),  # a key prefix is not a directory
        ("s3://b/pre/", "s3://other/pre/x"),
        ("https://h/d/", "http://h/d/x"),
        ("https://h/d/", "https://h/d/%2e%2e/x"),
        ("https://h/d/", "https://h/d/a%00b"),
        ("https://h/d/", "https://h/d/"),
        ("https://h/d/", "https://h/d//x"),
        ("hf://o/r@v1", "hf://o/other/x@v1"),
        ("hf://o/r@v1", "hf://o/r/../x@v1"),
    ]:
        with pytest.raises(UnsafePath):
            relative_path(base, entry)
    for bad in ["", "/etc/passwd", "a/../../b", "..", "a/./b", "a\\b", "a\nb", "x" * 256]:
        with pytest.raises(UnsafePath):
            check_relative_path(bad)


# --- the HTTP backend's listing ------------------------------------------------------------------------------


async def test_nginx_autoindex_html_and_json_are_listed_recursively(world: World) -> None:
    backend = HTTPBackend(retry=FAST)
    try:
        html = await backend.list(world.nginx + "/tree")  # no trailing slash: taken as a directory
        assert [(e.url, e.content_length) for e in html] == sorted(
            (world.nginx + "/tree/" + p.replace(" ", "%20"), None) for p in TREE
        )
        js = await backend.list(world.nginx + "/json/")
        assert sorted((e.url, e.content_length) for e in js) == sorted(
            (world.nginx + "/json/" + p.replace(" ", "%20"), len(d)) for p, d in TREE.items()
        )
    finally:
        backend.close()


async def test_hostile_or_endless_listings_are_refused(crafted: str) -> None:
    backend = HTTPBackend(retry=FAST, list_max_depth=5)
    try:
        benign = await backend.list(crafted + "/benign/")
        assert [e.url for e in benign] == [crafted + "/benign/sub/z.bin", crafted + "/benign/x%20y.txt"]
        for path in ["/climb/", "/absolute/", "/host/", "/encoded/", "/slash/", "/json-climb/", "/json-abs/", "/json-nul/"]:
            with pytest.raises(SourceProtocolError, match="refusing it"):
                await backend.list(crafted + path)
        with pytest.raises(SourceRequestError, match="over 5 directories deep"):
            await backend.list(crafted + "/loop/")
        with pytest.raises(SourceRequestError, match="not a directory listing"):
            await backend.list(crafted + "/plain/")
        with pytest.raises(MalformedURL, match="no query string") as caught:
            await backend.list(crafted + "/benign/?signature=SECRET")
        assert "SECRET" not in str(caught.value)
    finally:
        backend.close()


# --- dfz get -r end to end -----------------------------------------------------------------------------------


def test_get_r_of_an_nginx_directory_with_globs(world: World) -> None:
    out = world.tmp / "out-nginx"
    done = get_r(world, world.nginx + "/tree/", out)
    assert done.returncode == 0, done.stderr + world.log.read_text()
    assert tree_of(out) == expected()
    assert "saved 5 files" in done.stderr
    picked = world.tmp / "out-globs"
    done = get_r(world, world.nginx + "/json/", picked, "--include", "*.bin", "--include", "*.txt", "--exclude", "sub/deep/*")
    assert done.returncode == 0, done.stderr
    assert tree_of(picked) == expected(["a.txt", "sp ace.txt", "sub/b.bin"])
    again = get_r(world, world.nginx + "/json/", picked, "--no-progress", "--include", "a.txt")  # already there
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert tree_of(picked) == expected(["a.txt", "sp ace.txt", "sub/b.bin"])


def test_get_r_of_an_s3_prefix_and_a_file_directory(world: World) -> None:
    out = world.tmp / "out-s3"
    done = get_r(world, f"s3://{BUCKET}/pre", out, "--no-progress")
    assert done.returncode == 0, done.stderr + world.log.read_text()
    assert tree_of(out) == expected()  # not prefix-sibling.txt: a prefix is listed as a directory
    out = world.tmp / "out-file"
    done = get_r(world, file_url(str(world.tree)), out, "--no-progress", "--exclude", "*.json")
    assert done.returncode == 0, done.stderr
    assert tree_of(out) == expected([p for p in TREE if not p.endswith(".json")])


def test_get_r_refuses_too_many_files_and_hostile_listings_before_downloading(world: World, crafted: str) -> None:
    out = world.tmp / "out-refused"
    many = get_r(world, world.nginx + "/tree/", out, "--max-files", "4")
    assert many.returncode == 2 and "5 files selected" in many.stderr and "nothing was downloaded" in many.stderr
    assert not out.exists()
    for path in ["/climb/", "/json-climb/", "/absolute/"]:
        hostile = get_r(world, crafted + path, out)
        assert hostile.returncode == 3 and "refusing" in hostile.stderr, hostile.stderr
    assert not out.exists() and not (world.tmp / "secret").exists() and not (world.tmp / "escape").exists()
    none = get_r(world, world.nginx + "/tree/", out, "--include", "*.nothing")
    assert none.returncode == 1 and "nothing to download" in none.stderr
    missing = get_r(world, world.nginx + "/no-such-dir/", out)
    assert missing.returncode == 3 and "cannot list" in missing.stderr, missing.stderr


def test_get_r_reports_files_that_fail_and_exits_non_zero(world: World) -> None:
    """Files that cannot be written (a directory in the way, a symbolic link on the way) fail alone: the
    others are saved, the summary names them and the exit code is non-zero."""
    out = world.tmp / "out-partial"
    (out / "a.txt").mkdir(parents=True)
    elsewhere = world.tmp / "elsewhere"
    elsewhere.mkdir()
    (out / "sub").symlink_to(elsewhere)  # a link in DIR is not followed out of it
    done = get_r(world, world.nginx + "/tree/", out, "--no-progress")
    assert done.returncode != 0 and "4 of 5 files failed" in done.stderr and "a.txt" in done.stderr, done.stderr
    assert "symbolic link" in done.stderr
    assert tree_of(out) == expected(["sp ace.txt"]) and list(elsewhere.iterdir()) == []


async def test_a_big_listing_comes_in_pages_through_the_daemon(world: World) -> None:
    big = world.tmp / "big"
    big.mkdir()
    for i in range(700):
        (big / f"file-with-a-longish-name-{i:04}.dat").write_bytes(b"")
    async with open_api_client(world.endpoint) as api:
        listing = await api.list_source(file_url(str(big)))
        assert len(listing.entries) == 700 and not listing.truncated
        assert listing.entries[0].path == "file-with-a-longish-name-0000.dat" and listing.entries[0].size == 0
        cut = await api.list_source(file_url(str(big)), max_entries=3)
        assert len(cut.entries) == 3 and cut.truncated
