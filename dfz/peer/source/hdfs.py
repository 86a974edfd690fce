"""``hdfs://`` origins: files of HDFS read over WebHDFS, its REST API, with the
:class:`~dfz.peer.source.http.HTTPBackend` (libcurl) underneath (no Hadoop client or JVM needed).

* URLs: ``hdfs://NAMENODE[:PORT]/PATH`` — the namenode's WebHDFS HTTP address (``PORT`` default 9870, the
  namenode's HTTP port since Hadoop 3), ``PATH`` absolute and percent-decoded. No query string.
* Calls: ``GET http(s)://NAMENODE:PORT/webhdfs/v1/PATH?op=GETFILESTATUS`` (``stat``: the length, and the
  modification time as Last-Modified), ``op=OPEN&offset=O&length=L`` (reads: the namenode answers 307 with
  a datanode's URL, which libcurl follows; a retry asks for the rest only), ``op=OPEN`` without a range
  (``stream``) and ``op=LISTSTATUS`` (``list``: every file under a directory, recursively).
* Who: :class:`HDFSOptions` (the daemon's ``hdfs_user``, default ``$HADOOP_USER_NAME``, sent as
  ``user.name=``, for clusters with simple authentication; ``hdfs_delegation_token``, sent as
  ``delegation=``, for secure ones; ``hdfs_https`` for ``https://``). Messages never show the query string,
  so the delegation token stays out of them.
* WebHDFS has no ETag: a file rewritten mid-download is caught only when its length changed.
"""

from __future__ import annotations

import builtins
import json
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import ClassVar
from urllib.parse import quote, unquote, urlencode, urlsplit

from dfz.peer.source import (
    Chunk,
    Headers,
    MalformedURL,
    RetryPolicy,
    SourceAuthError,
    SourceBackend,
    SourceEntry,
    SourceInfo,
    SourceNotFound,
    SourceProtocolError,
    SourceRequestError,
)
from dfz.peer.source.http import HTTPAnswer, HTTPBackend

__all__ = ["DEFAULT_PORT", "HDFSBackend", "HDFSLocation", "HDFSOptions", "parse_hdfs_url"]

DEFAULT_PORT = 9870
MAX_LIST = 100_000
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")
_USER = re.compile(r"[A-Za-z0-9._@$-]{1,256}")


@dataclass(frozen=True)
class HDFSOptions:
    """Who dfz is at the namenode; empty ``user``: ``$HADOOP_USER_NAME`` (read when the backend is made)."""

    user: str = ""
    delegation_token: str = field(default="", repr=False)
    https: bool = False

    def __post_init__(self) -> None:
        if self.user and not _USER.fullmatch(self.user):
            raise ValueError(f"hdfs_user {self.user[:40]!r} must be a user name (letters, digits, '.', '_', '-', '@', '$')")
        if len(self.delegation_token) > 8192 or any(c.isspace() or ord(c) < 0x20 for c in self.delegation_token):
            raise ValueError("hdfs_delegation_token must be a token without spaces or newlines")

    def resolved(self) -> HDFSOptions:
        user = self.user or os.environ.get("HADOOP_USER_NAME", "")
        return HDFSOptions(user if _USER.fullmatch(user or "-") and user else "", self.delegation_token, self.https)


@dataclass(frozen=True, slots=True)
class HDFSLocation:
    namenode: str
    """``host:port``."""
    path: str
    """Absolute, decoded."""

    def url(self, path: str | None = None) -> str:
        return f"hdfs://{self.namenode}{quote(self.path if path is None else path)}"


def parse_hdfs_url(url: str) -> HDFSLocation:
    """The namenode and path of an ``hdfs://`` URL; :class:`MalformedURL` when it is not one."""

    def bad(why: str) -> MalformedURL:
        return MalformedURL(url, f"cannot read {url[:200]!r}: {why} (expected hdfs://NAMENODE[:PORT]/PATH)")

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise bad(f"the URL is malformed ({e})") from None
    if parts.scheme.lower() != "hdfs":
        raise bad("it is not an hdfs:// URL")
    if not parts.hostname or not _HOST.fullmatch(parts.netloc):
        raise bad(f"{parts.netloc!r} is not a namenode host[:port]")
    if parts.query or parts.fragment:
        raise bad("an hdfs:// URL has no query string or fragment (give the user and token in the daemon's config)")
    try:
        path = unquote(parts.path, errors="strict")
    except UnicodeDecodeError:
        raise bad("its percent-encoding is not UTF-8") from None
    segments = path.split("/")[1:]
    if segments and segments[-1] == "":
        segments.pop()
    if not path.startswith("/") or any(s in ("", ".", "..") or "\0" in s for s in segments):
        raise bad("its path must be absolute, without empty, '.' or '..' parts")
    host = parts.netloc.rsplit(":", 1)[0] if port is not None else parts.netloc
    return HDFSLocation(f"{host}:{port or DEFAULT_PORT}", "/" + "/".join(segments))


class HDFSBackend(SourceBackend):
    """``hdfs://`` origins over WebHDFS. ``options``: user, delegation token, HTTPS (:class:`HDFSOptions`);
    ``http``: the HTTP backend that carries the requests (default: a new one with ``retry``)."""

    schemes: ClassVar[tuple[str, ...]] = ("hdfs",)

    def __init__(
        self, options: HDFSOptions | None = None, *, http: HTTPBackend | None = None, retry: RetryPolicy | None = None
    ) -> None:
        self.options = (options or HDFSOptions()).resolved()
        self.http = http or HTTPBackend(retry=retry)

    def api_url(self, where: HDFSLocation, op: str, path: str | None = None, **params: int) -> str:
        query: dict[str, str | int] = {"op": op, **params}
        if self.options.user:
            query["user.name"] = self.options.user
        if self.options.delegation_token:
            query["delegation"] = self.options.delegation_token
        scheme = "https" if self.options.https else "http"
        return f"{scheme}://{where.namenode}/webhdfs/v1{quote(where.path if path is None else path)}?{urlencode(query)}"

    async def stat(self, url: str, headers: Headers | None = None) -> SourceInfo:
        where = parse_hdfs_url(url)
        status = (await self._json(url, where, "GETFILESTATUS", headers)).get("FileStatus")
        if not isinstance(status, dict):
            raise SourceProtocolError(url, f"{url}: the namenode's GETFILESTATUS answer has no FileStatus")
        if status.get("type") != "FILE":
            raise SourceRequestError(
                url, f"{url} is a {str(status.get('type', '?')).lower()}, not a file: download the files in it"
            )
        length = status.get("length")
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise SourceProtocolError(url, f"{url}: the namenode gave an invalid length {length!r}")
        return SourceInfo(url, length, True, last_modified=_http_date(status.get("modificationTime")))

    async def read_range_into(
        self,
        url: str,
        start: int,
        buffer: bytearray | memoryview,
        headers: Headers | None = None,
        *,
        expect: SourceInfo | None = None,
    ) -> None:
        where = parse_hdfs_url(url)
        length = memoryview(buffer).nbytes
        if start < 0:
            raise ValueError(f"invalid range start {start}")
        if expect is not None and expect.content_length is not None and start + length > expect.content_length:
            raise ValueError(f"bytes {start}-{start + length - 1} are past the end of the file ({expect.content_length} bytes)")
        try:
            await self.http.read_body_into(
                lambda done: self.api_url(where, "OPEN", offset=start + done, length=length - done), buffer, headers
            )
        except (SourceNotFound, SourceAuthError) as e:
            raise self._mapped(url, where, e) from None

    @asynccontextmanager
    async def stream(
        self, url: str, headers: Headers | None = None, *, expect: SourceInfo | None = None
    ) -> AsyncIterator[AsyncIterator[Chunk]]:
        where = parse_hdfs_url(url)
        async with self.http.stream(self.api_url(where, "OPEN"), headers, expect=expect) as chunks:
            yield chunks

    async def list(self, url: str, headers: Headers | None = None) -> builtins.list[SourceEntry]:
        """Every file under ``url`` (a directory, walked recursively; a file lists itself)."""
        where = parse_hdfs_url(url)
        out: builtins.list[SourceEntry] = []
        pending = [where.path]
        while pending:
            directory = pending.pop()
            answer = await self._json(url, HDFSLocation(where.namenode, directory), "LISTSTATUS", headers)
            holder = answer.get("FileStatuses")
            statuses = holder.get("FileStatus") if isinstance(holder, dict) else None
            if not isinstance(statuses, builtins.list):
                raise SourceProtocolError(url, f"{url}: the namenode's LISTSTATUS answer has no FileStatuses")
            for status in statuses:
                if not isinstance(status, dict) or not isinstance(status.get("pathSuffix"), str):
                    continue
                suffix = status["pathSuffix"]
                if "/" in suffix or suffix in (".", ".."):
                    raise SourceProtocolError(url, f"{url}: the namenode listed an invalid name {suffix[:80]!r}")
                path = f"{directory.rstrip('/')}/{suffix}" if suffix else directory
                if status.get("type") == "DIRECTORY":
                    if suffix:
                        pending.append(path)
                    continue
                length = status.get("length")
                out.append(SourceEntry(where.url(path), length if isinstance(length, int) and length >= 0 else None))
                if len(out) > MAX_LIST:
                    raise SourceRequestError(url, f"{url} holds more than {MAX_LIST} files: list a smaller directory")
        return sorted(out, key=lambda e: e.url)

    def close(self) -> None:
        self.http.close()

    # --- machinery ---

    async def _json(self, url: str, where: HDFSLocation, op: str, headers: Headers | None) -> dict[str, object]:
        answer = await self.http.request(self.api_url(where, op), headers)
        if answer.status != 200:
            raise self._error(url, where, answer)
        try:
            body = json.loads(answer.body)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise SourceProtocolError(url, f"{url}: the namenode's {op} answer is not a JSON object")
        return body

    def _who(self) -> str:
        user = f"as user {self.options.user!r}" if self.options.user else "without a user (hdfs_user or $HADOOP_USER_NAME)"
        return user + (" with a delegation token" if self.options.delegation_token else "")

    def _error(self, url: str, where: HDFSLocation, answer: HTTPAnswer) -> Exception:
        exception, message = _remote_exception(answer.body)
        said = f" ({exception}: {message})" if exception else ""
        if answer.status == 404 or exception == "FileNotFoundException":
            return SourceNotFound(url, f"the namenode {where.namenode} has no {where.path}{said}")
        if answer.status in (401, 403):
            return SourceAuthError(
                url,
                f"the namenode {where.namenode} refused access to {where.path} {self._who()} (HTTP {answer.status}{said}):"
                " check hdfs_user / hdfs_delegation_token and the file's permissions",
            )
        return SourceRequestError(
            url, f"the namenode {where.namenode} answered HTTP {answer.status} for {where.path}{said}", answer.status
        )

    def _mapped(self, url: str, where: HDFSLocation, e: SourceNotFound | SourceAuthError) -> Exception:
        if isinstance(e, SourceNotFound):
            return SourceNotFound(url, f"the namenode {where.namenode} (or its datanode) has no {where.path}")
        return SourceAuthError(
            url,
            f"HDFS refused to read {where.path} {self._who()}: check hdfs_user / hdfs_delegation_token"
            " and the file's permissions",
        )


def _remote_exception(body: bytes) -> tuple[str, str]:
    """(exception, message) of a WebHDFS ``RemoteException`` answer; empty strings when it is not one."""
    try:
        data = json.loads(body)
    except ValueError:
        return "", ""
    remote = data.get("RemoteException") if isinstance(data, dict) else None
    if not isinstance(remote, dict):
        return "", ""
    exception, message = remote.get("exception"), remote.get("message")
    return str(exception)[:100] if exception else "", " ".join(str(message or "").split())[:300]


def _http_date(milliseconds: object) -> str | None:
    if not isinstance(milliseconds, int) or isinstance(milliseconds, bool) or milliseconds <= 0:
        return None
    try:
        return format_datetime(datetime.fromtimestamp(milliseconds / 1000, UTC), usegmt=True)
    except (OverflowError, OSError, ValueError):
        return None
