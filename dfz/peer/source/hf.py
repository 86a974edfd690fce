"""``hf://`` origins: files of Hugging Face Hub repositories (models by default, datasets and spaces too),
read over HTTP(S) with the :class:`~dfz.peer.source.http.HTTPBackend` (libcurl) underneath.

* URLs: ``hf://OWNER/REPO/PATH[@REVISION]`` (a model), ``hf://datasets/OWNER/REPO/PATH[@REVISION]``,
  ``hf://spaces/OWNER/REPO/PATH[@REVISION]``. The revision (a branch, tag or commit; default ``main``) follows
  the last ``@``; one with a ``/`` (``refs/pr/1``) is written percent-encoded (``refs%2Fpr%2F1``). ``PATH``
  is percent-decoded. The file is read from ``{endpoint}/{[datasets/|spaces/]OWNER/REPO}/resolve/{REVISION}/{PATH}``.
* Where and who: :class:`HFOptions` (the daemon's ``hf_endpoint`` and ``hf_token``); empty, ``$HF_ENDPOINT``
  (else ``https://huggingface.co``) and ``$HF_TOKEN``. The token is sent as ``Authorization: Bearer`` to the
  endpoint only: the Hub redirects large (LFS / Xet) files to a CDN, and libcurl does not send the header
  on to another host. Errors never show the token.
* ``stat`` and reads are those of the HTTP backend on the resolve URL (ranges, ETag checks, retries), the
  ``url`` reported staying the ``hf://`` one. ``list`` takes ``hf://OWNER/REPO[/DIR][@REVISION]`` and
  returns every file under it, from the Hub's tree API
  (``GET {endpoint}/api/models/OWNER/REPO/tree/REVISION[/DIR]?recursive=1``, following its ``Link: rel="next"``
  pages on the same endpoint), as ``hf://`` URLs at the same revision.
"""

from __future__ import annotations

import builtins
import json
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar
from urllib.parse import quote, unquote, urlsplit

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
from dfz.peer.source.http import HTTPBackend

__all__ = ["DEFAULT_ENDPOINT", "HFBackend", "HFLocation", "HFOptions", "parse_hf_url"]

T = TypeVar("T")

DEFAULT_ENDPOINT = "https://huggingface.co"
MAX_LIST_PAGES = 1000
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_REVISION = re.compile(r"[A-Za-z0-9._-][A-Za-z0-9._/-]{0,255}")
_KINDS = {"datasets": "datasets", "spaces": "spaces"}
_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


@dataclass(frozen=True)
class HFOptions:
    """The Hub's endpoint and the token sent to it (empty: ``$HF_ENDPOINT`` / ``$HF_TOKEN``, read when the
    backend is made)."""

    endpoint: str = ""
    token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.endpoint:
            try:
                parts = urlsplit(self.endpoint)
                parts.port  # noqa: B018 - raises ValueError for a port out of range
            except ValueError as e:
                raise ValueError(f"hf_endpoint {self.endpoint!r} is malformed ({e})") from None
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.query or parts.fragment:
                raise ValueError(f"hf_endpoint {self.endpoint!r} must be a URL such as https://huggingface.co")
        if len(self.token) > 4096 or any(c.isspace() or ord(c) < 0x20 for c in self.token):
            raise ValueError("hf_token must be a token without spaces or newlines")

    def resolved(self) -> HFOptions:
        """These options with the environment's defaults filled in."""
        endpoint = self.endpoint or os.environ.get("HF_ENDPOINT", "") or DEFAULT_ENDPOINT
        token = self.token or os.environ.get("HF_TOKEN", "") or os.environ.get("HUGGING_FACE_HUB_TOKEN", "")
        return HFOptions(endpoint.rstrip("/"), token)


@dataclass(frozen=True, slots=True)
class HFLocation:
    repo: str
    """``OWNER/REPO``, or ``datasets/OWNER/REPO``, ``spaces/OWNER/REPO``."""
    path: str
    revision: str = "main"

    @property
    def kind(self) -> str:
        return self.repo.split("/", 1)[0] if self.repo.split("/", 1)[0] in _KINDS else "models"

    @property
    def repo_id(self) -> str:
        return self.repo.split("/", 1)[1] if self.kind != "models" else self.repo

    def url(self, path: str | None = None) -> str:
        p = self.path if path is None else path
        rev = "" if self.revision == "main" else f"@{quote(self.revision, safe='')}"
        return f"hf://{self.repo}{'/' + quote(p) if p else ''}{rev}"


def parse_hf_url(url: str, *, file_needed: bool = True) -> HFLocation:
    """The repository, path and revision of an ``hf://`` URL; :class:`MalformedURL` when it is not one."""

    def bad(why: str) -> MalformedURL:
        return MalformedURL(
            url, f"cannot read {url[:200]!r}: {why} (expected hf://OWNER/REPO/PATH[@REVISION], or hf://datasets/OWNER/REPO/PATH)"
        )

    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise bad(f"the URL is malformed ({e})") from None
    if parts.scheme.lower() != "hf":
        raise bad("it is not an hf:// URL")
    if parts.query or parts.fragment:
        raise bad("an hf:// URL has no query string or fragment (percent-encode '?' and '#')")
    whole = parts.netloc + parts.path
    body, at, revision_text = whole.rpartition("@")
    if not at or "/" in revision_text:
        body, revision_text = whole, ""
    try:
        revision = unquote(revision_text, errors="strict") if revision_text else "main"
        segments = [unquote(s, errors="strict") for s in body.split("/")]
    except UnicodeDecodeError:
        raise bad("its percent-encoding is not UTF-8") from None
    if not _REVISION.fullmatch(revision) or ".." in revision:
        raise bad(f"{revision[:80]!r} is not a revision (a branch, tag or commit)")
    prefix = [segments.pop(0)] if segments and segments[0] in _KINDS else []
    if len(segments) < 2 or not _NAME.fullmatch(segments[0]) or not _NAME.fullmatch(segments[1]):
        raise bad("it names no OWNER/REPO (letters, digits, '.', '_' and '-')")
    rest = segments[2:]
    if rest and rest[-1] == "":
        rest.pop()  # hf://owner/repo/dir/ lists dir
    if any(s in ("", ".", "..") or "\0" in s for s in rest):
        raise bad("its path has an empty, '.' or '..' part")
    path = "/".join(rest)
    if file_needed and not path:
        raise bad("it names a repository, not a file")
    return HFLocation("/".join([*prefix, *segments[:2]]), path, revision)


class HFBackend(SourceBackend):
    """``hf://`` origins. ``options``: endpoint and token (:class:`HFOptions`, defaults from the environment);
    ``http``: the HTTP backend that carries the requests (default: a new one with ``retry``)."""

    schemes: ClassVar[tuple[str, ...]] = ("hf",)

    def __init__(
        self, options: HFOptions | None = None, *, http: HTTPBackend | None = None, retry: RetryPolicy | None = None
    ) -> None:
        self.options = (options or HFOptions()).resolved()
        self.http = http or HTTPBackend(retry=retry)

    def resolve_url(self, where: HFLocation) -> str:
        repo = where.repo if where.kind == "models" else f"{where.kind}/{where.repo_id}"
        return f"{self.options.endpoint}/{repo}/resolve/{quote(where.revision, safe='')}/{quote(where.path)}"

    async def stat(self, url: str, headers: Headers | None = None) -> SourceInfo:
        where = parse_hf_url(url)
        info = await self._mapped(url, where, lambda: self.http.stat(self.resolve_url(where), self._headers(headers)))
        return SourceInfo(url, info.content_length, info.supports_ranges, info.etag, info.last_modified, info.content_type)

    async def read_range_into(
        self,
        url: str,
        start: int,
        buffer: bytearray | memoryview,
        headers: Headers | None = None,
        *,
        expect: SourceInfo | None = None,
    ) -> None:
        where = parse_hf_url(url)
        target = self.resolve_url(where)
        await self._mapped(
            url, where, lambda: self.http.read_range_into(target, start, buffer, self._headers(headers), expect=expect)
        )

    @asynccontextmanager
    async def stream(
        self, url: str, headers: Headers | None = None, *, expect: SourceInfo | None = None
    ) -> AsyncIterator[AsyncIterator[Chunk]]:
        where = parse_hf_url(url)
        async with self.http.stream(self.resolve_url(where), self._headers(headers), expect=expect) as chunks:
            yield chunks

    async def list(self, url: str, headers: Headers | None = None) -> builtins.list[SourceEntry]:
        where = parse_hf_url(url, file_needed=False)
        base = self.options.endpoint
        sub = f"/{quote(where.path)}" if where.path else ""
        page_url: str | None = f"{base}/api/{where.kind}/{where.repo_id}/tree/{quote(where.revision, safe='')}{sub}?recursive=1"
        out: builtins.list[SourceEntry] = []
        pages = 0
        while page_url is not None:
            pages += 1
            if pages > MAX_LIST_PAGES:
                raise SourceProtocolError(url, f"listing {url}: more than {MAX_LIST_PAGES} pages")
            answer = await self.http.request(page_url, self._headers(headers))
            if answer.status in (401, 403):
                raise self._auth_error(url, where, answer.status)
            if answer.status == 404:
                raise SourceNotFound(
                    url,
                    f"the Hub has no {where.kind[:-1]} {where.repo_id} at revision {where.revision!r}"
                    f" (or no {where.path!r} in it)",
                )
            if answer.status != 200:
                raise SourceRequestError(url, f"listing {url}: the Hub answered HTTP {answer.status}", answer.status)
            try:
                entries = json.loads(answer.body)
            except ValueError:
                entries = None
            if not isinstance(entries, builtins.list):
                raise SourceProtocolError(url, f"listing {url}: the Hub's tree API did not answer a JSON list")
            for entry in entries:
                if not isinstance(entry, dict) or entry.get("type") != "file" or not isinstance(entry.get("path"), str):
                    continue
                size = entry.get("size")
                out.append(SourceEntry(where.url(entry["path"]), size if isinstance(size, int) and size >= 0 else None))
            link = _LINK_NEXT.search(answer.headers.get("link", ""))
            page_url = None
            if link:
                following = link[1]
                if urlsplit(following).netloc != urlsplit(base).netloc:
                    raise SourceProtocolError(url, f"listing {url}: the Hub's next page is on another host")
                page_url = following
        return out

    def close(self) -> None:
        self.http.close()

    # --- machinery ---

    def _headers(self, headers: Headers | None) -> dict[str, str]:
        out = dict(headers or {})
        if self.options.token and not any(k.lower() == "authorization" for k in out):
            out["Authorization"] = f"Bearer {self.options.token}"
        return out

    def _auth_error(self, url: str, where: HFLocation, status: int | None = None) -> SourceAuthError:
        who = "with the configured token (hf_token or $HF_TOKEN)" if self.options.token else "without a token"
        if status:
            who += f" (HTTP {status})"
        return SourceAuthError(
            url,
            f"the Hub refused access to {where.kind[:-1]} {where.repo_id} {who}: a private or gated"
            " repository needs a token (hf_token or $HF_TOKEN) of an account that may read it",
        )

    async def _mapped(self, url: str, where: HFLocation, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except SourceAuthError:
            raise self._auth_error(url, where) from None
        except SourceNotFound:
            raise SourceNotFound(
                url, f"the Hub has no {where.path!r} in {where.kind[:-1]} {where.repo_id} at revision {where.revision!r}"
            ) from None
