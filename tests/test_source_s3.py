"""The ``s3://`` source backend against a real S3 server (SeaweedFS, started once per session on ephemeral
ports: :mod:`s3_server`), and ``dfz up`` + ``dfz get`` fetching ``s3://`` and ``file://`` end to end."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e_helpers import Procs, dfz_cmd
from s3_server import ACCESS_KEY, NOBODY_KEY, NOBODY_SECRET, REGION, SECRET_KEY, S3Server, start_s3_server

from dfz.cluster import wait_for_cluster
from dfz.config import ConfigError
from dfz.peer.config import DaemonConfig
from dfz.peer.daemon import source_registry
from dfz.peer.source import (
    MalformedURL,
    RetryPolicy,
    SourceAuthError,
    SourceChanged,
    SourceEntry,
    SourceNotFound,
    SourceUnavailable,
)
from dfz.peer.source.file import file_url
from dfz.peer.source.s3 import S3Backend, S3Options, parse_s3_url

pytestmark = pytest.mark.timeout(60)

BUCKET = "dfz-test"
DATA = random.Random(5).randbytes(3_000_001)  # over the tiny-file limit: the seed fetches it
FAST_RETRY = RetryPolicy(attempts=2, backoff=0.01, backoff_max=0.02)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with start_s3_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key="data/big.bin", Body=DATA)
        client.put_object(Bucket=BUCKET, Key="data/sub/a b.txt", Body=b"hello")
        client.put_object(Bucket=BUCKET, Key="other.txt", Body=b"x")
        yield server


def options(s3: S3Server, **kw: str) -> S3Options:
    base: dict[str, Any] = {
        "endpoint": s3.endpoint,
        "region": REGION,
        "addressing_style": "path",
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
    }
    return S3Options(**{**base, **kw})


@pytest.fixture
def backend(s3: S3Server) -> Iterator[S3Backend]:
    b = S3Backend(options(s3), retry=FAST_RETRY)
    yield b
    b.close()


async def test_stat_ranges_stream_and_list(backend: S3Backend) -> None:
    url = f"s3://{BUCKET}/data/big.bin"
    info = await backend.stat(url)
    assert info.content_length == len(DATA) and info.supports_ranges and info.etag and info.last_modified
    buffer = bytearray(1_000_000)
    await backend.read_range_into(url, 999_999, buffer, expect=info)
    assert buffer == DATA[999_999:1_999_999]
    pieces = [await backend.read_range(url, s, min(1 << 20, len(DATA) - s), expect=info) for s in range(0, len(DATA), 1 << 20)]
    assert b"".join(pieces) == DATA
    async with backend.stream(url, expect=info) as chunks:
        assert b"".join([bytes(c) async for c in chunks]) == DATA
    assert await backend.read_range(f"s3://{BUCKET}/data/sub/a%20b.txt", 0, 5) == b"hello"

    assert await backend.list(f"s3://{BUCKET}/data") == [
        SourceEntry(url=f"s3://{BUCKET}/data/big.bin", content_length=len(DATA)),
        SourceEntry(url=f"s3://{BUCKET}/data/sub/a%20b.txt", content_length=5),
    ]
    assert len(await backend.list(f"s3://{BUCKET}")) == 3
    assert await backend.list(f"s3://{BUCKET}/nothing/") == []


async def test_missing_objects_and_buckets_are_not_found(backend: S3Backend) -> None:
    with pytest.raises(SourceNotFound, match="no such object"):
        await backend.stat(f"s3://{BUCKET}/nope")
    with pytest.raises(SourceNotFound, match="no such bucket"):
        await backend.read_range("s3://no-such-bucket/x", 0, 10)


async def test_access_refused_names_the_key_and_its_source_never_the_secret(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{BUCKET}/data/big.bin"
    wrong = S3Backend(options(s3, secret_access_key="not-the-secret"), retry=FAST_RETRY)
    with pytest.raises(SourceAuthError) as refused:
        await wrong.read_range(url, 0, 10)
    message = str(refused.value)
    assert f"access key id {ACCESS_KEY!r} from the daemon's configuration (s3_access_key_id)" in message
    assert "not-the-secret" not in message and "HTTP 403" in message

    # From the environment: said so.
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", NOBODY_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", NOBODY_SECRET)
    nobody = S3Backend(S3Options(endpoint=s3.endpoint, region=REGION), retry=FAST_RETRY)
    with pytest.raises(SourceAuthError) as refused:
        await nobody.stat(url)
    message = str(refused.value)
    assert f"access key id {NOBODY_KEY!r} from the environment (AWS_ACCESS_KEY_ID)" in message
    assert NOBODY_SECRET not in message
    assert "SECRET" not in repr(options(s3)).upper()


async def test_an_object_overwritten_mid_download_is_caught(s3: S3Server, backend: S3Backend) -> None:
    client = s3.client()
    url = f"s3://{BUCKET}/changing.bin"
    client.put_object(Bucket=BUCKET, Key="changing.bin", Body=b"a" * 1000)
    info = await backend.stat(url)
    assert await backend.read_range(url, 0, 100, expect=info) == b"a" * 100
    client.put_object(Bucket=BUCKET, Key="changing.bin", Body=b"b" * 1000)  # same length, new ETag
    with pytest.raises(SourceChanged, match="changed during the download"):
        await backend.read_range(url, 100, 100, expect=info)
    client.put_object(Bucket=BUCKET, Key="changing.bin", Body=b"c" * 1500)  # another length
    with pytest.raises(SourceChanged):
        await backend.read_range(url, 100, 100, expect=info)


async def test_an_unreachable_endpoint_fails_after_the_retries(s3: S3Server) -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = S3Backend(options(s3, endpoint=f"http://127.0.0.1:{port}"), retry=FAST_RETRY, connect_timeout=2)
    with pytest.raises(SourceUnavailable, match="failed 2 times"):
        await dead.stat(f"s3://{BUCKET}/data/big.bin")


def test_malformed_urls_and_settings_are_refused() -> None:
    assert parse_s3_url("s3://b.k-t/a/b%3Fc?versionId=v1").key == "a/b?c"
    for url, message in [
        ("s3:///key", "not a bucket name"),
        ("s3://b/key", "not a bucket name"),  # too short
        ("s3://user:pw@bucket/key", "not a bucket name"),
        ("s3://bucket", "names a bucket or a prefix"),
        ("s3://bucket/dir/", "names a bucket or a prefix"),
        ("s3://bucket/key?acl", "only query"),
        ("s3://bucket/key#frag", "no fragment"),
        ("s3://bucket/%ff", "not UTF-8"),
    ]:
        with pytest.raises(MalformedURL, match=message):
            parse_s3_url(url)
    for kw, message in [
        ({"endpoint": "s3.example.com"}, "must be a URL"),
        ({"addressing_style": "dns"}, "auto, path, virtual"),
        ({"access_key_id": "AK"}, "go together"),
        ({"region": "us east"}, "without spaces"),
    ]:
        with pytest.raises(ValueError, match=message):
            S3Options(**kw)


async def test_daemon_config_keys_reach_the_s3_backend(s3: S3Server, tmp_path: Path) -> None:
    path = tmp_path / "daemon.toml"
    path.write_text(
        f'data_dir = "d"\ns3_endpoint = "{s3.endpoint}"\ns3_region = "{REGION}"\ns3_addressing_style = "path"\n'
        f's3_access_key_id = "{ACCESS_KEY}"\ns3_secret_access_key = "{SECRET_KEY}"\n'
    )
    config = DaemonConfig.load(path)
    assert SECRET_KEY not in repr(config)
    backend = source_registry(config).backend_for(f"s3://{BUCKET}/other.txt")
    assert isinstance(backend, S3Backend) and backend.options.endpoint == s3.endpoint
    assert await backend.read_range(f"s3://{BUCKET}/other.txt", 0, 1) == b"x"
    backend.close()
    with pytest.raises(ConfigError, match="s3_addressing_style must be one of"):
        DaemonConfig.from_mapping({"data_dir": "d", "s3_addressing_style": "dns"})
    with pytest.raises(ConfigError, match="s3_region: must be a string"):
        DaemonConfig.from_mapping({"data_dir": "d", "s3_region": 5})


def test_dfz_get_fetches_s3_and_file_urls_through_a_cluster(s3: S3Server, procs: Procs, short_tmp: str) -> None:
    """dfz up with the S3 settings in the environment (AWS_*), as an operator would give them."""
    tmp = Path(short_tmp)
    local = tmp / "local file.bin"
    local.write_bytes(DATA[::-1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_ENDPOINT_URL_S3": s3.endpoint,
        "AWS_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with (tmp / "up.log").open("wb") as log:
        up = procs.start(
            dfz_cmd("up", "--no-manager", "--data-dir", str(tmp / "up")), stdout=log, stderr=subprocess.STDOUT, env=env
        )
    info = wait_for_cluster(tmp / "up", 30, alive=lambda: up.poll() is None)

    def get(url: str, out: Path) -> subprocess.CompletedProcess[bytes]:
        argv = dfz_cmd("get", url, "-O", str(out), "--endpoint", str(info["endpoint"]), "--timeout", "30", "--no-progress")
        return subprocess.run(argv, capture_output=True, timeout=40, stdin=subprocess.DEVNULL, check=False)

    for url, data in [(f"s3://{BUCKET}/data/big.bin", DATA), (file_url(str(local)), DATA[::-1])]:
        out = tmp / "out.bin"
        done = get(url, out)
        assert done.returncode == 0, done.stderr.decode() + (tmp / "up.log").read_text()
        assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
        out.unlink()

    missing = get(f"s3://{BUCKET}/missing.bin", tmp / "out.bin")
    assert missing.returncode == 3 and b"no such object" in missing.stderr, missing.stderr
    unknown = get("ftp://host/x", tmp / "out.bin")
    assert unknown.returncode == 2 and b"supported schemes: file, hdfs, hf, http, https, oci, s3" in unknown.stderr, (
        unknown.stderr
    )
