"""The ``hdfs://`` source backend against a WebHDFS namenode and datanode (``tests/stub_origin.py``, a real
process on 127.0.0.1 serving real files: GETFILESTATUS, LISTSTATUS, and OPEN answered with a 307 to a
"datanode" URL as a namenode does, requiring ``user.name`` and ``delegation``), and ``dfz up`` +
``dfz get hdfs://...`` end to end with the user in ``$HADOOP_USER_NAME``."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import Procs, dfz_cmd
from stub_origin import running

from dfz.cluster import wait_for_cluster
from dfz.config import ConfigError
from dfz.peer.config import DaemonConfig
from dfz.peer.source import MalformedURL, RetryPolicy, SourceAuthError, SourceEntry, SourceNotFound, SourceRequestError
from dfz.peer.source.hdfs import HDFSBackend, HDFSLocation, HDFSOptions, parse_hdfs_url
from dfz.peer.source.http import HTTPBackend

pytestmark = pytest.mark.timeout(60)

USER = "etl"
TOKEN = "KAAJaGRmcy10b2tlbgA"
DATA = random.Random(13).randbytes(3_000_001)
FAST_RETRY = RetryPolicy(attempts=2, backoff=0.01, backoff_max=0.02)


@pytest.fixture(scope="module")
def namenode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("hdfs")
    (root / "hdfs" / "data" / "part 1").mkdir(parents=True)
    (root / "hdfs" / "data" / "big.bin").write_bytes(DATA)
    (root / "hdfs" / "data" / "part 1" / "x.csv").write_bytes(b"a,b\n1,2\n")
    with running(root, "--hdfs-user", USER, "--hdfs-delegation", TOKEN) as url:
        yield url.split("://", 1)[1]


def backend(user: str = USER, token: str = TOKEN) -> HDFSBackend:
    return HDFSBackend(HDFSOptions(user, token), http=HTTPBackend(retry=FAST_RETRY))


def test_parse_hdfs_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_hdfs_url("hdfs://nn.example:9870/data/a%20b.bin") == HDFSLocation("nn.example:9870", "/data/a b.bin")
    assert parse_hdfs_url("hdfs://nn/data/") == HDFSLocation(f"nn:{9870}", "/data")
    for bad, why in [
        ("hdfs:///data/x", "is not a namenode"),
        ("hdfs://nn/data/../etc", "'..' parts"),
        ("hdfs://nn/data/x?user.name=root", "no query string"),
        ("hdfs://nn:99999/x", "malformed"),
    ]:
        with pytest.raises(MalformedURL, match=why):
            parse_hdfs_url(bad)
    b = HDFSBackend(HDFSOptions("u", "tok"))
    assert b.api_url(parse_hdfs_url("hdfs://nn:50070/a b"), "OPEN", offset=5, length=7) == (
        "http://nn:50070/webhdfs/v1/a%20b?op=OPEN&offset=5&length=7&user.name=u&delegation=tok"
    )
    monkeypatch.setenv("HADOOP_USER_NAME", "from-env")
    assert HDFSBackend().options.user == "from-env"
    with pytest.raises(ConfigError, match="hdfs_user"):
        DaemonConfig.from_mapping({"data_dir": "d", "hdfs_user": "a b"})
    config = DaemonConfig.from_mapping({"data_dir": "d", "hdfs_delegation_token": "secret-tok", "hdfs_https": True})
    assert config.hdfs_options() == HDFSOptions("", "secret-tok", True) and "secret-tok" not in repr(config)


async def test_stat_read_stream_and_list_over_webhdfs(namenode: str) -> None:
    b = backend()
    try:
        url = f"hdfs://{namenode}/data/big.bin"
        info = await b.stat(url)
        assert info.url == url and info.content_length == len(DATA) and info.supports_ranges and info.last_modified
        # OPEN with offset and length, through the namenode's 307 to the datanode.
        assert await b.read_range(url, 1_234_567, 100_000, expect=info) == DATA[1_234_567:1_334_567]
        got = bytearray()
        async with b.stream(url, expect=info) as chunks:
            async for chunk in chunks:
                got += chunk
        assert got == DATA
        assert await b.list(f"hdfs://{namenode}/data") == [
            SourceEntry(f"hdfs://{namenode}/data/big.bin", len(DATA)),
            SourceEntry(f"hdfs://{namenode}/data/part%201/x.csv", 8),
        ]
        assert await b.read_range(f"hdfs://{namenode}/data/part%201/x.csv", 0, 8) == b"a,b\n1,2\n"
        with pytest.raises(SourceNotFound, match=r"has no /data/nope\.bin \(FileNotFoundException"):
            await b.stat(f"hdfs://{namenode}/data/nope.bin")
        with pytest.raises(SourceRequestError, match="is a directory, not a file"):
            await b.stat(f"hdfs://{namenode}/data")
    finally:
        b.close()
    wrong = backend(user="mallory", token="")
    try:
        with pytest.raises(SourceAuthError, match="as user 'mallory'") as e:
            await wrong.stat(f"hdfs://{namenode}/data/big.bin")
        assert "HTTP 401" in str(e.value)
    finally:
        wrong.close()
    no_token = backend(token="wrong-token")
    try:
        with pytest.raises(SourceAuthError, match="with a delegation token") as e:
            await no_token.read_range(f"hdfs://{namenode}/data/big.bin", 0, 10)
        assert "wrong-token" not in str(e.value)
    finally:
        no_token.close()


def test_dfz_get_fetches_an_hdfs_file_through_a_cluster(procs: Procs, short_tmp: str, tmp_path: Path) -> None:
    """A namenode without delegation tokens (simple authentication): the user from $HADOOP_USER_NAME."""
    root = tmp_path / "root"
    (root / "hdfs" / "d").mkdir(parents=True)
    (root / "hdfs" / "d" / "big.bin").write_bytes(DATA)
    tmp = Path(short_tmp)
    with running(root, "--hdfs-user", USER) as url:
        env = {**os.environ, "HADOOP_USER_NAME": USER}
        with (tmp / "up.log").open("wb") as log:
            up = procs.start(
                dfz_cmd("up", "--no-manager", "--data-dir", str(tmp / "up")), stdout=log, stderr=subprocess.STDOUT, env=env
            )
        info = wait_for_cluster(tmp / "up", 30, alive=lambda: up.poll() is None)
        out = tmp / "out.bin"
        source = f"hdfs://{url.split('://', 1)[1]}/d/big.bin"
        argv = dfz_cmd("get", source, "-O", str(out), "--endpoint", str(info["endpoint"]), "--timeout", "30", "--no-progress")
        argv += ["--digest", "sha256:" + hashlib.sha256(DATA).hexdigest()]
        done = subprocess.run(argv, capture_output=True, timeout=40, check=False)
        assert done.returncode == 0, done.stderr.decode() + (tmp / "up.log").read_text()
        assert out.read_bytes() == DATA
