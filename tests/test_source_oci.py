"""The ``oci://`` source backend against a real registry (Debian's ``docker-registry`` with htpasswd basic
auth, an image built with ``umoci`` and pushed with ``skopeo``: ``scripts/registry_testbed.py``), and
``dfz up`` + ``dfz get oci://...`` end to end with the login in a docker ``config.json``."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import Procs, dfz_cmd

from dfz.cli import _oci_blob_digest
from dfz.cluster import wait_for_cluster
from dfz.config import ConfigError
from dfz.peer.config import DaemonConfig
from dfz.peer.source import MalformedURL, RetryPolicy, SourceAuthError, SourceNotFound, SourceRequestError
from dfz.peer.source.http import HTTPBackend
from dfz.peer.source.oci import OCIBackend, OCIOptions, OCIReference, parse_oci_url

pytestmark = pytest.mark.timeout(60)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import registry_testbed as rt  # noqa: E402

FAST_RETRY = RetryPolicy(attempts=2, backoff=0.01, backoff_max=0.02)
FILES = {"a.bin": random.Random(7).randbytes(3 << 20), "b.txt": b"hello\n" * 1000}
MISSING = "sha256:" + "0" * 64


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("oci")
    server = rt.RegistryServer(tmp / "registry")
    try:
        server.start()
        rt.build_image(tmp / "layout", FILES)
        rt.push_image(tmp / "layout", server.url, "x/img")
    except rt.RegistryUnavailable as e:
        server.stop()
        pytest.skip(f"no registry testbed: {e}")
    try:
        yield server
    finally:
        server.stop()


def host(registry: Any) -> str:
    return str(registry.url).split("://", 1)[1]


def backend(**options: Any) -> OCIBackend:
    opts = {"username": rt.USER, "password": rt.PASSWORD, **options}
    return OCIBackend(OCIOptions(**opts), http=HTTPBackend(retry=FAST_RETRY))


def test_parse_oci_urls() -> None:
    d = "sha256:" + "ab" * 32
    assert parse_oci_url(f"oci://127.0.0.1:5000/x/img@{d}") == OCIReference("127.0.0.1:5000", "x/img", digest=d)
    assert parse_oci_url("oci://reg.example/library/ubuntu:22.04?layer=2&platform=linux/arm64/v8") == OCIReference(
        "reg.example", "library/ubuntu", tag="22.04", layer=2, platform="linux/arm64/v8"
    )
    assert parse_oci_url(f"oci://[::1]:5000/a@{d}?layer=0").layer == 0
    for bad, why in [
        ("oci://reg/x/img", "no tag and no digest"),
        ("oci://reg/x/img@sha256:abc", "not a digest"),
        ("oci://reg/X/Img:v1", "not a repository name"),
        ("oci://reg/x/img:v1?layer=-1", "the query may only hold"),
        ("oci://reg/x/img:v1?platform=linux/amd64", "give layer=N too"),
        ("oci://reg/x/img:v1?token=secret", "the query may only hold"),
        ("oci://user:pw@reg/x/img:v1", "is not a registry host"),
        ("oci:///x/img:v1", "is not a registry host"),
        ("oci://reg/x/img:v1#frag", "no fragment"),
    ]:
        with pytest.raises(MalformedURL, match=why):
            parse_oci_url(bad)
    with pytest.raises(ValueError, match="go together"):
        OCIOptions(username="u")
    assert _oci_blob_digest(f"oci://127.0.0.1:5000/x/img@{d}") == d
    assert _oci_blob_digest(f"oci://127.0.0.1:5000/x/img@{d}?layer=0") is None
    assert _oci_blob_digest("oci://r/x/img:v1?layer=0") is None
    with pytest.raises(ConfigError, match="oci_plain_http"):
        DaemonConfig.from_mapping({"data_dir": "d", "oci_plain_http": ["not a host!"]})
    config = DaemonConfig.from_mapping({"data_dir": "d", "oci_username": "u", "oci_password": "p", "oci_plain_http": "r:5000"})
    assert config.oci_options() == OCIOptions("u", "p", "", ("r:5000",)) and "'p'" not in repr(config)


async def test_blobs_layers_and_images_from_a_registry_with_basic_auth(registry: Any) -> None:
    b = backend()
    try:
        entries = await b.list(f"oci://{host(registry)}/x/img:v1")
        assert len(entries) == 2 and all(e.content_length for e in entries)
        big = max(entries, key=lambda e: e.content_length or 0)
        info = await b.stat(big.url)
        digest = big.url.rsplit("@", 1)[1]
        assert info.content_length == big.content_length and info.supports_ranges and info.etag == digest
        assert info.url == big.url  # reads go through this backend, not to http:// without auth
        assert info.content_length is not None
        whole = await b.read_range(big.url, 0, info.content_length, expect=info)
        assert "sha256:" + hashlib.sha256(whole).hexdigest() == digest
        part = await b.read_range(big.url, 1000, 5000, expect=info)
        assert part == whole[1000:6000]
        streamed = bytearray()
        async with b.stream(big.url, expect=info) as chunks:
            async for chunk in chunks:
                streamed += chunk
        assert streamed == whole
        # A layer by its index in the image: the same blob as the list said.
        index = entries.index(big)
        by_layer = await b.stat(f"oci://{host(registry)}/x/img:v1?layer={index}")
        assert by_layer.etag == digest and by_layer.content_length == info.content_length
        with pytest.raises(SourceNotFound, match="no layer 5"):
            await b.stat(f"oci://{host(registry)}/x/img:v1?layer=5")
        # A whole image is not one file: the error lists the layer URLs.
        with pytest.raises(SourceRequestError, match="names a whole image") as e:
            await b.stat(f"oci://{host(registry)}/x/img:v1")
        assert all(entry.url in str(e.value) for entry in entries)
        with pytest.raises(SourceNotFound, match=f"no blob {MISSING} in x/img"):
            await b.stat(f"oci://{host(registry)}/x/img@{MISSING}")
        with pytest.raises(SourceNotFound, match="no manifest x/img:nope"):
            await b.stat(f"oci://{host(registry)}/x/img:nope?layer=0")
    finally:
        b.close()


async def test_wrong_password_names_the_user_and_no_credentials_says_what_to_set(registry: Any, tmp_path: Path) -> None:
    url = f"oci://{host(registry)}/x/img:v1?layer=0"
    b = backend(password="wrong-password-123")
    try:
        with pytest.raises(SourceAuthError, match=f"refused user '{rt.USER}'") as e:
            await b.stat(url)
        assert "wrong-password-123" not in str(e.value)
    finally:
        b.close()
    anonymous = OCIBackend(OCIOptions(auth_file=str(tmp_path / "none.json")), http=HTTPBackend(retry=FAST_RETRY))
    (tmp_path / "none.json").write_text("{}")
    try:
        with pytest.raises(SourceAuthError, match="none is configured for it: set oci_username"):
            await anonymous.stat(url)
    finally:
        anonymous.close()
    # The login of a docker config.json, per registry.
    auth = base64.b64encode(f"{rt.USER}:{rt.PASSWORD}".encode()).decode()
    (tmp_path / "config.json").write_text(json.dumps({"auths": {host(registry): {"auth": auth}}}))
    from_file = OCIBackend(OCIOptions(auth_file=str(tmp_path / "config.json")), http=HTTPBackend(retry=FAST_RETRY))
    try:
        assert (await from_file.stat(url)).content_length
    finally:
        from_file.close()


def test_dfz_get_fetches_a_layer_blob_through_a_cluster(registry: Any, procs: Procs, short_tmp: str) -> None:
    """dfz up with the registry login in a docker config.json ($DOCKER_CONFIG), as `docker login` leaves it."""
    tmp = Path(short_tmp)
    auth = base64.b64encode(f"{rt.USER}:{rt.PASSWORD}".encode()).decode()
    (tmp / "docker").mkdir()
    (tmp / "docker" / "config.json").write_text(json.dumps({"auths": {host(registry): {"auth": auth}}}))
    env = {**os.environ, "DOCKER_CONFIG": str(tmp / "docker")}
    with (tmp / "up.log").open("wb") as log:
        up = procs.start(
            dfz_cmd("up", "--no-manager", "--data-dir", str(tmp / "up")), stdout=log, stderr=subprocess.STDOUT, env=env
        )
    info = wait_for_cluster(tmp / "up", 30, alive=lambda: up.poll() is None)

    def get(url: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
        out = tmp / "out.bin"
        argv = dfz_cmd("get", url, "-O", str(out), "--endpoint", str(info["endpoint"]), "--timeout", "30", "--no-progress")
        return subprocess.run([*argv, *extra], capture_output=True, timeout=40, stdin=subprocess.DEVNULL, check=False)

    # The layer's digest, from the manifest (through the backend, with the same login).
    b = backend()
    try:
        import trio

        entries = trio.run(b.list, f"oci://{host(registry)}/x/img:v1")
    finally:
        b.close()
    big = max(entries, key=lambda e: e.content_length or 0)
    digest = big.url.rsplit("@", 1)[1]
    done = get(big.url)  # the URL's digest is the expected one (dfz get's default for oci:// blobs)
    assert done.returncode == 0, done.stderr.decode() + (tmp / "up.log").read_text()
    assert "sha256:" + hashlib.sha256((tmp / "out.bin").read_bytes()).hexdigest() == digest
    (tmp / "out.bin").unlink()
    missing = get(f"oci://{host(registry)}/x/img@{MISSING}")
    assert missing.returncode == 3 and b"no blob" in missing.stderr, missing.stderr


async def test_bearer_tokens_and_a_redirect_to_storage(tmp_path: Path) -> None:
    """A registry with token auth (tests/stub_origin.py, a real process): the challenge's realm gives a
    repository:NAME:pull token for the user's Basic login; the blob redirects to storage on another host
    name that refuses an Authorization header (so it must be dropped on the way)."""
    from stub_origin import running

    blob = random.Random(17).randbytes(200_000)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / digest).write_bytes(blob)
    with running(tmp_path, "--registry-login", "alice:s3cret") as base:
        url = base.replace("http://", "oci://") + f"/team/app@{digest}"
        b = backend(username="alice", password="s3cret")
        try:
            info = await b.stat(url)
            assert info.content_length == len(blob) and info.etag == digest
            assert await b.read_range(url, 10_000, 5000, expect=info) == blob[10_000:15_000]
            with pytest.raises(SourceNotFound, match="no blob"):
                await b.stat(url.replace(digest, MISSING))
        finally:
            b.close()
        wrong = backend(username="alice", password="guess")
        try:
            with pytest.raises(SourceAuthError, match="token service refused user 'alice'") as e:
                await wrong.stat(url)
            assert "guess" not in str(e.value)
        finally:
            wrong.close()
    log = (tmp_path / "origin.log").read_text()
    assert "GET /token?scope=repository%3Ateam%2Fapp%3Apull" in log and "/storage/" in log
