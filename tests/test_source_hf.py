"""The ``hf://`` source backend against a Hub-like origin (``tests/stub_origin.py``, a real process on
127.0.0.1 serving real files in the Hub's resolve layout and tree API, honouring Range, requiring a token,
and sending large files to a "CDN" on another host name that refuses an Authorization header), and
``dfz up`` + ``dfz get hf://...`` end to end with ``HF_ENDPOINT`` and ``HF_TOKEN``."""

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
from dfz.peer.source import MalformedURL, RetryPolicy, SourceAuthError, SourceEntry, SourceNotFound
from dfz.peer.source.hf import HFBackend, HFLocation, HFOptions, parse_hf_url
from dfz.peer.source.http import HTTPBackend

pytestmark = pytest.mark.timeout(60)

TOKEN = "hf_test_token_0123456789"
WEIGHTS = random.Random(11).randbytes(3_000_001)  # over the tiny-file limit, and redirected to the "CDN"
FAST_RETRY = RetryPolicy(attempts=2, backoff=0.01, backoff_max=0.02)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("hub")
    repo = root / "hub" / "acme" / "tiny-model"
    (repo / "main" / "sub").mkdir(parents=True)
    (repo / "main" / "model.safetensors").write_bytes(WEIGHTS)
    (repo / "main" / "config.json").write_bytes(b'{"layers": 2}')
    (repo / "main" / "sub" / "a b.txt").write_bytes(b"spaces")
    (repo / "v1.0").mkdir()
    (repo / "v1.0" / "config.json").write_bytes(b'{"layers": 1}')
    with running(root, "--hub-token", TOKEN) as url:
        yield url


def backend(hub: str, token: str = TOKEN) -> HFBackend:
    return HFBackend(HFOptions(hub, token), http=HTTPBackend(retry=FAST_RETRY))


def test_parse_hf_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_hf_url("hf://acme/m/model.safetensors") == HFLocation("acme/m", "model.safetensors", "main")
    assert parse_hf_url("hf://acme/m/dir/a%20b.txt@v1.0") == HFLocation("acme/m", "dir/a b.txt", "v1.0")
    assert parse_hf_url("hf://acme/m/x.bin@refs%2Fpr%2F1").revision == "refs/pr/1"
    assert parse_hf_url("hf://datasets/acme/d/train.parquet").kind == "datasets"
    assert parse_hf_url("hf://acme/m@v2", file_needed=False) == HFLocation("acme/m", "", "v2")
    for bad, why in [
        ("hf://acme/m", "names a repository, not a file"),
        ("hf://acme", "no OWNER/REPO"),
        ("hf://acme/m/../x", "'..' part"),
        ("hf://acme/m/x@..", "not a revision"),
        ("hf://acme/m/x?download=1", "no query string"),
        ("hf://-bad/m/x", "no OWNER/REPO"),
    ]:
        with pytest.raises(MalformedURL, match=why):
            parse_hf_url(bad)
    b = HFBackend(HFOptions("https://hub.example/", "t"))
    assert b.resolve_url(parse_hf_url("hf://acme/m/dir/a%20b.txt@refs%2Fpr%2F1")) == (
        "https://hub.example/acme/m/resolve/refs%2Fpr%2F1/dir/a%20b.txt"
    )
    assert b.resolve_url(parse_hf_url("hf://datasets/acme/d/t.csv")) == "https://hub.example/datasets/acme/d/resolve/main/t.csv"
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "from-env")
    assert HFBackend().options == HFOptions("http://127.0.0.1:9", "from-env")
    with pytest.raises(ConfigError, match="hf_endpoint"):
        DaemonConfig.from_mapping({"data_dir": "d", "hf_endpoint": "ftp://x"})
    assert "secret-token" not in repr(DaemonConfig.from_mapping({"data_dir": "d", "hf_token": "secret-token"}))


async def test_files_ranges_and_tree_through_the_hub(hub: str) -> None:
    b = backend(hub)
    try:
        url = "hf://acme/tiny-model/model.safetensors"
        info = await b.stat(url)
        assert info.url == url and info.content_length == len(WEIGHTS) and info.supports_ranges and info.etag
        # Through the redirect to the "CDN" (another host name), which refuses Authorization: dropped on the way.
        assert await b.read_range(url, 1_000_000, 12345, expect=info) == WEIGHTS[1_000_000:1_012_345]
        got = bytearray()
        async with b.stream(url, expect=info) as chunks:
            async for chunk in chunks:
                got += chunk
        assert got == WEIGHTS
        assert await b.read_range("hf://acme/tiny-model/config.json@v1.0", 0, 13) == b'{"layers": 1}'
        assert await b.read_range("hf://acme/tiny-model/sub/a%20b.txt", 0, 6) == b"spaces"
        listed = await b.list("hf://acme/tiny-model")  # three pages of two: the Link rel="next" is followed
        assert sorted(listed, key=lambda e: e.url) == [
            SourceEntry("hf://acme/tiny-model/config.json", 13),
            SourceEntry("hf://acme/tiny-model/model.safetensors", len(WEIGHTS)),
            SourceEntry("hf://acme/tiny-model/sub/a%20b.txt", 6),
        ]
        assert await b.list("hf://acme/tiny-model/sub@main") == [SourceEntry("hf://acme/tiny-model/sub/a%20b.txt", 6)]
        assert await b.list("hf://acme/tiny-model@v1.0") == [SourceEntry("hf://acme/tiny-model/config.json@v1.0", 13)]
        with pytest.raises(SourceNotFound, match=r"the Hub has no 'nope\.bin' in model acme/tiny-model at revision 'main'"):
            await b.stat("hf://acme/tiny-model/nope.bin")
        with pytest.raises(SourceNotFound, match="no model acme/tiny-model at revision 'v9'"):
            await b.list("hf://acme/tiny-model@v9")
    finally:
        b.close()
    for token in ("wrong-token", ""):
        refused = backend(hub, token)
        try:
            with pytest.raises(SourceAuthError, match="the Hub refused access to model acme/tiny-model") as e:
                await refused.stat("hf://acme/tiny-model/config.json")
            assert "wrong-token" not in str(e.value)
            with pytest.raises(SourceAuthError, match="HTTP 401"):
                await refused.list("hf://acme/tiny-model")
        finally:
            refused.close()


def test_dfz_get_fetches_a_model_file_through_a_cluster(hub: str, procs: Procs, short_tmp: str) -> None:
    tmp = Path(short_tmp)
    env = {**os.environ, "HF_ENDPOINT": hub, "HF_TOKEN": TOKEN}
    with (tmp / "up.log").open("wb") as log:
        up = procs.start(
            dfz_cmd("up", "--no-manager", "--data-dir", str(tmp / "up")), stdout=log, stderr=subprocess.STDOUT, env=env
        )
    info = wait_for_cluster(tmp / "up", 30, alive=lambda: up.poll() is None)
    out = tmp / "model.safetensors"
    digest = "sha256:" + hashlib.sha256(WEIGHTS).hexdigest()
    argv = dfz_cmd("get", "hf://acme/tiny-model/model.safetensors", "-O", str(out), "--endpoint", str(info["endpoint"]))
    argv += ["--digest", digest, "--timeout", "30", "--no-progress"]
    done = subprocess.run(argv, capture_output=True, timeout=40, check=False)
    assert done.returncode == 0, done.stderr.decode() + (tmp / "up.log").read_text()
    assert out.read_bytes() == WEIGHTS
