"""The ``file://`` source backend on real files: stat, ranges read into the caller's buffer, streams,
directory listing, changes caught mid-download, and the URLs it refuses."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from dfz.peer.source import (
    MalformedURL,
    SourceChanged,
    SourceEntry,
    SourceNotFound,
    SourceRegistry,
    SourceRequestError,
    UnsupportedScheme,
)
from dfz.peer.source.file import FileBackend, file_url, path_of

DATA = random.Random(11).randbytes(300_001)


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


@pytest.fixture
def backend() -> FileBackend:
    return FileBackend()


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "a file.bin"  # a space: percent-encoded in the URL
    path.write_bytes(DATA)
    return path


async def test_stat_and_ranges_read_the_file(backend: FileBackend, data_file: Path) -> None:
    url = file_url(str(data_file))
    assert "%20" in url and path_of(url) == str(data_file)
    info = await backend.stat(url)
    assert info.content_length == len(DATA) and info.supports_ranges and info.etag and info.last_modified
    buffer = bytearray(100_000)
    await backend.read_range_into(url, 12_345, buffer, expect=info)
    assert buffer == DATA[12_345:112_345]
    assert await backend.read_range(url, len(DATA) - 1, 1, expect=info) == DATA[-1:]
    assert await backend.read_range(f"file://localhost{data_file}".replace(" ", "%20"), 0, 10) == DATA[:10]
    with pytest.raises(ValueError, match="past the end"):
        await backend.read_range(url, len(DATA) - 5, 10, expect=info)
    async with backend.stream(url, expect=info) as chunks:
        assert b"".join([bytes(c) async for c in chunks]) == DATA


async def test_a_file_that_changes_mid_download_is_caught(backend: FileBackend, data_file: Path) -> None:
    url = file_url(str(data_file))
    info = await backend.stat(url)
    with data_file.open("ab") as f:  # grows
        f.write(b"more")
    with pytest.raises(SourceChanged, match=r"length was 300001 bytes at stat, now 300005"):
        await backend.read_range(url, 0, 1000, expect=info)
    _write(data_file, DATA)  # same length, rewritten: another modification time
    os.utime(data_file, ns=(1, 1))
    with pytest.raises(SourceChanged, match="rewritten or replaced"):
        await backend.read_range(url, 0, 1000, expect=info)
    _write(data_file, DATA[:1000])  # shrank, read without expect: the read runs out
    with pytest.raises(SourceChanged, match="ended at byte 1000"):
        await backend.read_range(url, 0, 2000)


async def test_list_walks_a_directory(backend: FileBackend, tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "x").write_bytes(b"12345")
    (tmp_path / "d" / "sub" / "y").write_bytes(b"")
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d")  # not followed
    entries = await backend.list(file_url(str(tmp_path / "d")))
    assert entries == [
        SourceEntry(url=file_url(str(tmp_path / "d" / "sub" / "y")), content_length=0),
        SourceEntry(url=file_url(str(tmp_path / "d" / "x")), content_length=5),
    ]
    with pytest.raises(SourceRequestError, match="not a directory"):
        await backend.list(file_url(str(tmp_path / "d" / "x")))
    with pytest.raises(SourceNotFound):
        await backend.list(file_url(str(tmp_path / "nope")))


async def test_missing_files_directories_and_bad_urls_are_clear_errors(backend: FileBackend, tmp_path: Path) -> None:
    with pytest.raises(SourceNotFound, match="does not exist"):
        await backend.stat(file_url(str(tmp_path / "nope")))
    with pytest.raises(SourceRequestError, match="is a directory"):
        await backend.stat(file_url(str(tmp_path)))
    with pytest.raises(SourceRequestError, match="not a regular file"):
        await backend.stat("file:///dev/null")
    for url, message in [
        ("file://server/share/x", "not on host 'server'.*file:///server/share/x"),
        ("file:relative/path", "must be absolute"),
        ("file:///etc/passwd?x=1", "no query string"),
        ("file:///a%00b", "NUL"),
    ]:
        with pytest.raises(MalformedURL, match=message):
            await backend.stat(url)


def test_the_registry_serves_file_and_s3_and_lists_them_for_an_unknown_scheme() -> None:
    registry = SourceRegistry.builtin()
    assert {"file", "s3", "http", "https"} <= set(registry.schemes)
    assert isinstance(registry.backend_for("FILE:///x"), FileBackend)
    with pytest.raises(
        UnsupportedScheme, match="scheme 'ftp' is not supported; supported schemes: file, hdfs, hf, http, https, oci, s3"
    ):
        registry.backend_for("ftp://host/x")
