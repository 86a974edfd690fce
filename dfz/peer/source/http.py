"""HTTP and HTTPS origins, read with libcurl (pycurl) in worker threads under trio.

Why libcurl: measured on this machine (2 vCPUs shared with other sessions' benchmarks: load average 2-5
during the runs), with ``.venv/bin/python scripts/bench_http_clients.py --rounds 5 [--tls]``. A 1 GiB file
from a local nginx (Debian 1.22; for HTTPS a self-signed certificate that every client verifies), read as
4 MiB ranges with 4 in flight and as one stream, every client under trio, candidates interleaved, medians
of 5 rounds. GB/s = 1e9 B/s; CPU = user+system seconds per GB of the client's process (nginx not counted).

                    plain HTTP                              HTTPS
              ranges            stream            ranges            stream
    client    GB/s  CPU s/GB    GB/s  CPU s/GB    GB/s  CPU s/GB    GB/s  CPU s/GB
    curl      1.53  0.41        1.71  0.52        0.66  0.80        0.64  0.82    (the reference)
    dfz       1.37  0.55        1.47  0.55        0.62  0.91        0.66  0.81    (this module)
    pycurl    1.21  0.53        1.33  0.56        0.53  0.95        0.59  0.83    (plain use, in threads)
    urllib3   1.53  0.45        1.70  0.39        0.53  1.10        0.50  1.19    (in threads)
    requests  0.56  1.67        1.84  0.40        0.33  2.19        0.58  1.02    (in threads)
    httpx     0.48  1.96        0.72  1.28        0.19  4.07        0.25  3.34    (AsyncClient)

Two earlier rounds of both runs, on a busier machine (load 4-6), ranked the clients the same way: over
TLS urllib3 spent 20-45% more CPU per GB than libcurl (1.1-1.3 against 0.83-1.0), httpx 4-6x curl's.
libcurl is the client that keeps up with ``curl`` over TLS, where real origins (object stores, registries,
the Hub) live: Python's ``ssl`` module hands urllib3 and requests one 16 KiB TLS record per call, and httpx
parses HTTP in pure Python. Over plain HTTP urllib3 is as fast as curl and a little cheaper than libcurl,
but one client for both schemes is simpler. pycurl is a maintained binding (7.49: memoryview callbacks,
type stubs in typeshed, manylinux wheels that bundle libcurl 8 and OpenSSL 3).

How a transfer runs:

* A range read runs ``Curl.perform()`` in ``trio.to_thread.run_sync`` (pycurl releases the GIL while libcurl
  waits). A pool of idle ``Curl`` handles keeps connections (and TLS sessions) alive from piece to piece.
* libcurl hands the body to a Python callback in blocks of at most 16 KiB, as memoryviews of its own buffer
  (``use_memoryview``): each is copied once, straight into the caller's piece buffer at its offset. No
  other copy is made. ``read_range`` allocates its new buffer in the worker thread: zero-filling 4 MiB in
  the event loop's thread cost about 15% of the throughput of 4 concurrent reads.
* Cancellation: libcurl's progress callback (called many times a second, even on a stalled connection)
  polls ``trio.from_thread.check_cancelled``; a cancelled read aborts within about a second, and the
  thread is waited for, so the caller's buffer is never written after ``read_range_into`` returns.
* ``stream`` runs the transfer in a thread of its own that hands 4 MiB chunks to the consumer through a
  memory channel, one chunk ahead, so the network keeps flowing while the consumer hashes and writes
  (a design that read only when asked for the next chunk was 15-20% slower). Leaving the ``async with``
  stops that thread and waits for it.
* The final response is checked before any body byte is accepted (status, Content-Range, length and ETag
  against ``stat``), so an error page or a whole-file answer never lands in a piece buffer.
* Retries: 5xx (but 501 and 505), 408, 429 and network failures (refused, reset, timeout, stall, truncated
  body) are retried with :class:`RetryPolicy`; a range read resumes after the bytes already received.
  4xx answers are final (404/410 -> :class:`SourceNotFound`, 401/403 -> :class:`SourceAuthError`).
* Redirects are followed by libcurl (``max_redirects``, http and https only); it does not send a custom
  ``Authorization`` header on to another host. A user's ``Range`` header is not passed: ranges are dfz's.

Listing (``list``, for recursive downloads) reads directory pages as web servers make them: nginx's
``autoindex on;`` (or Apache's, or Python's ``http.server``). The URL is taken as a directory (a ``/`` is
added; a query string or fragment is refused: it would name one page, not carry to the others). A page
answered as ``application/json`` is nginx's ``autoindex_format json`` (an array of ``{"name", "type",
"size"}``: names must be single path components, and files come with their sizes);
``text/html`` is parsed with the standard library's :class:`html.parser.HTMLParser` for ``<a href>`` links
(no sizes). Links to the page itself or to its parent directories, and links with a query (sorting links),
are skipped; a link ending in ``/`` is a subdirectory, listed in turn (breadth first). A link or a name that
leads outside the listed URL (another host or scheme, an absolute path elsewhere, ``../`` that climbs out,
an encoded ``/`` or ``..``) makes the whole listing fail with :class:`SourceProtocolError`: a listing page is
outside input. Bounds: ``list_max_entries`` files, ``list_max_depth`` levels of subdirectories,
``list_max_pages`` pages, ``list_max_page_bytes`` per page (:class:`SourceRequestError` beyond them).
Entries' URLs are built on the URL as given (not on where a redirect led), so downloads go the same way.
"""

from __future__ import annotations

import builtins
import email.utils
import http
import json
import logging
import os
import re
import ssl
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from html.parser import HTMLParser
from typing import ClassVar, TypeVar
from urllib.parse import quote, unquote, urljoin, urlsplit

import pycurl  # type: ignore[import-untyped,unused-ignore]
import trio

from dfz import __version__
from dfz.log import event, get_logger
from dfz.peer.source import (
    Chunk,
    Headers,
    MalformedURL,
    RetryPolicy,
    SourceAuthError,
    SourceBackend,
    SourceChanged,
    SourceEntry,
    SourceInfo,
    SourceNotFound,
    SourceProtocolError,
    SourceRangeNotSupported,
    SourceRequestError,
    SourceTLSError,
    SourceUnavailable,
    display_url,
)
from dfz.peer.source.listing import UnsafePath, check_relative_path, directory_url

__all__ = ["HTTPAnswer", "HTTPBackend", "parse_listing"]

_log = get_logger("peer.source.http")
T = TypeVar("T")

MIB = 1024 * 1024
STREAM_CHUNK = 4 * MIB  # default size of the chunks ``stream`` yields
# libcurl's receive buffer (one per handle with a transfer): its default, 16 KiB, cost ~25% more CPU per GB
# here, and 128 KiB ~10% more than 1 MiB on a stream.
_RECV_BUFFER = 1024 * 1024
_ERROR_SNIPPET = 512  # bytes of an error page kept for the message
_ERROR_BODY_MAX = 64 * 1024  # an error page is read to its end (keeping the connection) up to this size

# libcurl error codes (CURLE_*) by what they mean for dfz. Some have no pycurl constant.
_E_WEIRD_SERVER_REPLY = 8
_E_HTTP2_STREAM = 92
_TRANSIENT_CURL = frozenset(
    {
        pycurl.E_COULDNT_RESOLVE_HOST,
        pycurl.E_COULDNT_CONNECT,
        _E_WEIRD_SERVER_REPLY,
        pycurl.E_HTTP2,
        pycurl.E_PARTIAL_FILE,
        pycurl.E_OPERATION_TIMEDOUT,
        pycurl.E_SSL_CONNECT_ERROR,
        pycurl.E_GOT_NOTHING,
        pycurl.E_SEND_ERROR,
        pycurl.E_RECV_ERROR,
        _E_HTTP2_STREAM,
    }
)
_TLS_CURL = frozenset(
    {
        pycurl.E_SSL_CERTPROBLEM,
        pycurl.E_PEER_FAILED_VERIFICATION,
        pycurl.E_SSL_CACERT_BADFILE,
        pycurl.E_SSL_PINNEDPUBKEYNOTMATCH,
    }
)
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)


# --- one exchange, in a worker thread --------------------------------------------------------------------


class _Transient(Exception):
    """A failure worth another attempt (network, 5xx). ``reason`` says what happened; ``retry_after`` the
    seconds the origin asked to wait (``Retry-After`` of a 429 or 503), if it said."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


RETRY_AFTER_MAX = 60.0
"""Longest ``Retry-After`` honoured (seconds); an origin asking for more is given up on at once."""


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _wait_before_retry(policy: RetryPolicy, failures: int, e: _Transient) -> float | None:
    """Seconds to wait before the next attempt: the policy's backoff, or longer when the origin asked; None
    when the origin asked for more than :data:`RETRY_AFTER_MAX` (give up now rather than hang)."""
    delay = policy.delay(failures)
    if e.retry_after is not None:
        if e.retry_after > RETRY_AFTER_MAX:
            return None
        delay = max(delay, e.retry_after)
    return delay


class _TransientAnswer(_Transient):
    def __init__(self, reason: str, answer: HTTPAnswer) -> None:
        super().__init__(reason)
        self.answer = answer


@dataclass(frozen=True)
class HTTPAnswer:
    """The final answer to :meth:`HTTPBackend.request`: status, headers (lower-case names; repeated ones
    joined by ", "), body and the URL that answered (after redirects)."""

    status: int
    headers: dict[str, str]
    body: bytes
    url: str


class _StopBody(Exception):
    """Raised by a response check that has learnt all it wanted from the headers."""


@dataclass
class _Response:
    """The final response of an exchange (after redirects)."""

    status: int = 0
    reason: str = ""
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names; repeated headers joined by ", "
    url: str = ""
    error_body: bytearray = field(default_factory=bytearray)

    def content_length(self, url: str) -> int | None:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            return None
        value = self.headers.get("content-length")
        if value is None:
            return None
        try:
            length = int(value)
        except ValueError:
            length = -1
        if length < 0:
            raise SourceProtocolError(url, f"GET {display_url(url)}: the origin sent an invalid Content-Length {value!r}")
        return length

    def phrase(self) -> str:
        if self.reason:
            return self.reason
        try:
            return http.HTTPStatus(self.status).phrase
        except ValueError:
            return ""


class _Exchange:
    """One request on one ``Curl`` handle.

    ``on_response(response)`` sees the final response before its first body byte: it returns True to
    accept the body, False to treat the answer as an error (its body is kept as a snippet for the
    message), or raises to abort (:class:`_StopBody` to stop quietly). An accepted body goes straight into
    ``into[filled:]`` (``filled`` counts on); a block that does not fit goes to ``on_body``, which may
    point ``into`` and ``filled`` at a new buffer (streams) — without ``on_body``, more bytes than ``into``
    holds abort with :class:`SourceProtocolError`. What the callbacks raise, and what ``abort_check``
    raises (polled from libcurl's progress callback, many times a second; by default it raises
    ``trio.Cancelled`` when the calling task was cancelled), aborts the transfer and is re-raised by
    :meth:`finish`.
    """

    def __init__(
        self,
        curl: pycurl.Curl,
        url: str,
        on_response: Callable[[_Response], bool],
        on_body: Callable[[memoryview], None] | None = None,
        *,
        into: memoryview | None = None,
        filled: int = 0,
        abort_check: Callable[[], None] = trio.from_thread.check_cancelled,
    ) -> None:
        self.curl = curl
        self.url = url  # as asked for (the response's url is where it ended after redirects)
        self.response = _Response(url=url)
        self.accepted = False
        self.into = into
        self.filled = filled
        self._on_response = on_response
        self._on_body = on_body
        self._abort_check = abort_check
        self._checked = False
        self._stopped = False
        self._error_bytes = 0
        self._failure: BaseException | None = None

    def install(self) -> None:
        c = self.curl
        c.setopt(pycurl.HEADERFUNCTION, self._header)
        c.setopt(pycurl.WRITEFUNCTION, self._write, use_memoryview=True)
        c.setopt(pycurl.NOPROGRESS, 0)
        c.setopt(pycurl.XFERINFOFUNCTION, self._progress)

    def run(self) -> _Response:
        """Perform the exchange (blocking) and return its final response."""
        try:
            self.curl.perform()
        except pycurl.error as e:
            self.finish(int(e.args[0]), str(e.args[1]) if len(e.args) > 1 else str(e))
        else:
            self.finish(0, "")
        return self.response

    def finish(self, code: int, message: str) -> None:
        """Settle the exchange after libcurl finished it with ``code`` (0 for success)."""
        try:
            self.response.url = str(self.curl.getinfo(pycurl.EFFECTIVE_URL)) or self.response.url
        except pycurl.error:
            pass  # libcurl rejected the URL before it had one
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        if code and not self._stopped:
            raise _curl_error(self.url, code, message)
        if not self._checked:  # an answer without a body
            try:
                self._check()
            except _StopBody:
                pass

    def _check(self) -> None:
        self._checked = True
        self.accepted = self._on_response(self.response)

    def _header(self, line: bytes) -> None:
        # pycurl forbids getinfo() while perform() runs, so the status and the URL (through redirects) of
        # the response are followed here, from the headers of each response in turn.
        text = line.decode("latin-1").rstrip("\r\n")
        r = self.response
        if text.startswith("HTTP/"):  # a new response (the previous one was a redirect or 1xx)
            location = r.headers.get("location")
            if 300 <= r.status < 400 and location:
                r.url = urljoin(r.url, location)
            _, _, rest = text.partition(" ")
            code, _, reason = rest.partition(" ")
            r.status = int(code) if code.isdigit() else 0
            r.reason = reason.strip()
            r.headers.clear()
        elif ":" in text:
            name, _, value = text.partition(":")
            name, value = name.strip().lower(), value.strip()
            headers = self.response.headers
            headers[name] = f"{headers[name]}, {value}" if name in headers else value

    def _write(self, data: memoryview) -> int | None:
        # The hot path (once per 16 KiB of body): one copy, from libcurl's buffer into the caller's.
        if self.accepted and self.into is not None:
            end = self.filled + len(data)
            if end <= len(self.into):
                self.into[self.filled : end] = data
                self.filled = end
                return None
        try:
            if not self._checked:
                self._check()
            if self.accepted:
                end = self.filled + len(data)
                if self.into is not None and end <= len(self.into):
                    self.into[self.filled : end] = data
                    self.filled = end
                elif self._on_body is not None:
                    self._on_body(data)
                else:
                    raise SourceProtocolError(
                        self.url, f"GET {display_url(self.url)}: the origin sent more bytes than it announced"
                    )
                return None
            room = _ERROR_SNIPPET - len(self.response.error_body)
            if room > 0:
                self.response.error_body += data[:room]
            self._error_bytes += len(data)
            if self._error_bytes <= _ERROR_BODY_MAX:
                return None
            self._stopped = True
        except _StopBody:
            self._stopped = True
        except BaseException as e:
            self._failure = e
        return 0  # abort the transfer

    def _progress(self, _dltotal: int, _dlnow: int, _ultotal: int, _ulnow: int) -> int:
        try:
            self._abort_check()
        except BaseException as e:
            self._failure = e
            return 1  # abort the transfer
        return 0


def _curl_error(url: str, code: int, message: str) -> Exception:
    shown = display_url(url)
    if code in _TRANSIENT_CURL:
        return _Transient(f"{message} (libcurl error {code})")
    if code in _TLS_CURL:
        return SourceTLSError(
            url,
            f"GET {shown}: TLS verification failed: {message}. If the origin's certificate comes from a private CA,"
            " give its CA bundle to the HTTP source (ca_bundle); skipping verification (insecure) is for tests only",
        )
    if code == pycurl.E_TOO_MANY_REDIRECTS:
        return SourceRequestError(
            url, f"GET {shown}: {message}: the origin redirects in a loop, or the redirect limit is too low"
        )
    if code == pycurl.E_URL_MALFORMAT:
        return MalformedURL(url, f"GET {shown}: {message}: check the URL")
    if code == pycurl.E_UNSUPPORTED_PROTOCOL:
        return SourceRequestError(url, f"GET {shown}: {message}: check the URL (only http:// and https:// are followed)")
    return SourceUnavailable(url, f"GET {shown}: {message} (libcurl error {code})")


def _status_error(url: str, r: _Response) -> Exception:
    """The exception for a final answer that is not a success."""
    shown = display_url(url)
    status = f"HTTP {r.status} {r.phrase()}".rstrip()
    snippet = " ".join(bytes(r.error_body).decode("utf-8", "replace").split())[:200]
    said = f": {snippet!r}" if snippet else ""
    if (r.status >= 500 and r.status not in (501, 505)) or r.status in (408, 429):
        after = _retry_after(r.headers.get("retry-after")) if r.status in (429, 503) else None
        return _Transient(status + said + (f" (retry after {after:.0f} s)" if after is not None else ""), after)
    if r.status in (404, 410):
        return SourceNotFound(url, f"GET {shown}: the origin has no such object ({status}): check the URL")
    if r.status in (401, 403):
        return SourceAuthError(
            url,
            f"GET {shown}: the origin refused access ({status}{said}): pass credentials as request headers"
            " (for example 'Authorization: Bearer ...'), or check that the token or the URL's signature is valid and not expired",
        )
    if r.status == 304:
        return SourceRequestError(
            url,
            f"GET {shown}: the origin answered {status}: leave conditional headers (If-None-Match, If-Modified-Since) out",
            304,
        )
    if 300 <= r.status < 400:
        return SourceRequestError(url, f"GET {shown}: the origin answered {status} without a usable Location", r.status)
    return SourceRequestError(
        url, f"GET {shown}: the origin rejected the request ({status}{said}): check the URL and the request headers", r.status
    )


def _gave_up(url: str, what: str, failures: int, reason: str) -> str:
    return (
        f"GET {display_url(url)} ({what}) failed {failures} times, last with {reason}: the origin or the network is"
        " failing; try again later, or check the origin"
    )


def _check_validators(url: str, r: _Response, expect: SourceInfo | None) -> None:
    """:class:`SourceChanged` when the answer's ETag (or, lacking ETags, Last-Modified) differs from ``expect``."""
    if expect is None:
        return
    etag, modified = r.headers.get("etag"), r.headers.get("last-modified")
    if expect.etag and etag and etag != expect.etag:
        raise SourceChanged(
            url,
            f"GET {display_url(url)}: the object changed at the origin during the download (ETag {expect.etag} became {etag}):"
            " start the download again",
        )
    if not (expect.etag and etag) and expect.last_modified and modified and modified != expect.last_modified:
        raise SourceChanged(
            url,
            f"GET {display_url(url)}: the object changed at the origin during the download (Last-Modified {expect.last_modified}"
            f" became {modified}): start the download again",
        )


def _length_changed(url: str, before: int, now: int) -> SourceChanged:
    return SourceChanged(
        url,
        f"GET {display_url(url)}: the object's length changed at the origin during the download ({before} bytes at stat,"
        f" now {now}): the pieces read so far belong to another version; start the download again",
    )


def _parse_content_range(url: str, r: _Response) -> tuple[int | None, int | None, int | None]:
    """(first, last, total) of the answer's Content-Range; None for ``*`` parts."""
    value = r.headers.get("content-range", "")
    m = _CONTENT_RANGE.fullmatch(value.strip())
    if not m:
        raise SourceProtocolError(
            url, f"GET {display_url(url)}: the origin answered {r.status} with an invalid Content-Range {value!r}"
        )
    first, last, total = m.groups()
    return (
        int(first) if first is not None else None,
        int(last) if last is not None else None,
        int(total) if total != "*" else None,
    )


def _check_range_answer(
    url: str, r: _Response, first: int, last: int, *, expect: SourceInfo | None, seen_total: list[int]
) -> bool:
    """Whether the answer to ``Range: bytes=first-last`` carries exactly those bytes of the expected object.
    False for error statuses (mapped by :func:`_status_error`); raises for wrong answers. ``seen_total``
    holds the object length seen by earlier answers of the same read (to catch a change without ``expect``)."""
    shown = display_url(url)
    expected_total = expect.content_length if expect is not None else (seen_total[0] if seen_total else None)
    if r.status == 206:
        a, b, total = _parse_content_range(url, r)
        if total is not None:
            if expected_total is not None and total != expected_total:
                raise _length_changed(url, expected_total, total)
            seen_total[:] = [total]
        _check_validators(url, r, expect)
        if (a, b) != (first, last):
            past = f" (past the object's end: it has {total} bytes)" if total is not None and last >= total else ""
            raise SourceProtocolError(url, f"GET {shown}: asked for bytes {first}-{last}, the origin sent {a}-{b}{past}")
        return True
    if r.status == 200:
        length = r.content_length(url)
        if first == 0 and length == last + 1 and expected_total in (None, length):
            _check_validators(url, r, expect)
            return True  # the range is the whole object: a 200 is a fine answer
        if expected_total is not None and length is not None and length != expected_total:
            raise _length_changed(url, expected_total, length)
        raise SourceRangeNotSupported(
            url,
            f"GET {shown}: asked for bytes {first}-{last}, the origin sent the whole object (HTTP 200): it ignores Range"
            " requests, so read it with stream() instead",
        )
    if r.status == 416:
        total = _parse_content_range(url, r)[2] if "content-range" in r.headers else None
        if expected_total is not None and total is not None and total != expected_total:
            raise _length_changed(url, expected_total, total)
        raise SourceProtocolError(
            url, f"GET {shown}: bytes {first}-{last} are not in the object (HTTP 416; it has {total} bytes)"
        )
    if 200 <= r.status < 300:
        raise SourceProtocolError(
            url, f"GET {shown}: asked for bytes {first}-{last}, the origin answered HTTP {r.status} {r.phrase()}"
        )
    return False


def _header_lines(headers: Headers | None) -> list[str]:
    lines = []
    for name, value in (headers or {}).items():
        if not name or any(c in name for c in ":\r\n\0 ") or any(c in value for c in "\r\n\0"):
            raise ValueError(f"invalid request header {name!r}: names need no ':' or spaces, and neither part may hold a newline")
        if name.lower() == "range":
            continue  # dfz asks for the ranges it needs
        lines.append(f"{name}: {value}" if value else f"{name};")  # "Name;" is how libcurl sends an empty header
    return lines


# --- the backend -----------------------------------------------------------------------------------------


class HTTPBackend(SourceBackend):
    """``http://`` and ``https://`` origins.

    ``ca_bundle``: a PEM file of the CAs to trust instead of the system's (which are found the way Python's
    ``ssl`` finds them, so ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` apply). ``insecure``: skip TLS
    verification altogether (tests only). ``max_redirects``: redirects followed per request.
    ``retry``: attempts and backoff for transient failures. ``connect_timeout``: seconds to connect.
    ``stall_timeout``: a transfer slower than ``stall_speed`` bytes/s for that many seconds fails (and is
    retried). ``proxy``: a proxy URL, ``""`` for none; ``None`` follows libcurl's environment variables
    (``http_proxy``, ``https_proxy``, ``no_proxy``).
    """

    schemes: ClassVar[tuple[str, ...]] = ("http", "https")

    def __init__(
        self,
        *,
        ca_bundle: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        max_redirects: int = 10,
        retry: RetryPolicy | None = None,
        connect_timeout: float = 30.0,
        stall_timeout: float = 60.0,
        stall_speed: int = 1024,
        proxy: str | None = None,
        user_agent: str = f"dfz/{__version__}",
        max_idle_handles: int = 8,
        list_max_entries: int = 100_000,
        list_max_depth: int = 32,
        list_max_pages: int = 10_000,
        list_max_page_bytes: int = 16 * MIB,
    ) -> None:
        if insecure and ca_bundle is not None:
            raise ValueError("ca_bundle and insecure exclude each other: a CA bundle is only used to verify")
        if ca_bundle is not None and not os.path.isfile(ca_bundle):
            raise ValueError(f"CA bundle {os.fspath(ca_bundle)!r} is not a file: give a PEM file of CA certificates")
        if max_redirects < 0 or connect_timeout <= 0 or stall_timeout <= 0 or stall_speed < 0:
            raise ValueError("max_redirects, stall_speed >= 0 and connect_timeout, stall_timeout > 0 are needed")
        self.insecure = insecure
        self.max_redirects = max_redirects
        self.retry = retry or RetryPolicy()
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout
        self.stall_speed = stall_speed
        self.proxy = proxy
        self.user_agent = user_agent
        if ca_bundle is not None:
            self._cafile: str | None = os.fspath(ca_bundle)
            self._capath: str | None = None
        else:
            # pycurl's wheel bundles a libcurl whose default CA file is a Red Hat path; use the system's.
            paths = ssl.get_default_verify_paths()
            self._cafile, self._capath = paths.cafile, paths.capath
        if min(list_max_entries, list_max_depth, list_max_pages, list_max_page_bytes) < 1:
            raise ValueError("the list_max_* bounds must be positive")
        self.list_max_entries = list_max_entries
        self.list_max_depth = list_max_depth
        self.list_max_pages = list_max_pages
        self.list_max_page_bytes = list_max_page_bytes
        self._max_idle = max_idle_handles
        self._idle: list[pycurl.Curl] = []
        self._closed = False

    # --- the interface ---

    async def stat(self, url: str, headers: Headers | None = None) -> SourceInfo:
        """Asks for the first byte (``Range: bytes=0-0``) rather than HEAD: signed URLs often allow GET
        only, and the answer shows whether ranges really work. A 200 answer is cut after its headers."""
        lines = _header_lines(headers)

        def once(curl: pycurl.Curl) -> SourceInfo:
            found: list[tuple[int | None, bool]] = []  # (length, ranges work)

            def on_response(r: _Response) -> bool:
                if r.status == 206:
                    found.append((_parse_content_range(url, r)[2], True))
                    return True
                if r.status == 416:  # an empty object has no byte 0
                    if _parse_content_range(url, r)[2] != 0:
                        raise SourceProtocolError(url, f"GET {display_url(url)}: the origin refused the range 0-0 (HTTP 416)")
                    found.append((0, True))
                    return True
                if 200 <= r.status < 300:
                    found.append((r.content_length(url), False))
                    raise _StopBody  # do not read a whole object to learn its length
                return False

            exchange = self._exchange(curl, url, lines, on_response, lambda _data: None, byte_range="0-0")
            r = exchange.run()
            if not found:
                raise _status_error(url, r)
            length, ranges = found[0]
            return SourceInfo(
                url=r.url,
                content_length=length,
                supports_ranges=ranges,
                etag=r.headers.get("etag"),
                last_modified=r.headers.get("last-modified"),
                content_type=r.headers.get("content-type"),
            )

        return await self._retrying(url, "stat", lambda: self._in_thread(once))

    async def read_range_into(
        self,
        url: str,
        start: int,
        buffer: bytearray | memoryview,
        headers: Headers | None = None,
        *,
        expect: SourceInfo | None = None,
    ) -> None:
        with memoryview(buffer) as outer, outer.cast("B") as view:
            if view.readonly:
                raise ValueError("read_range_into needs a writable buffer")
            await self._read(url, start, view.nbytes, lambda: view, headers=headers, expect=expect)

    async def read_range(
        self,
        url: str,
        start: int,
        length: int,
        headers: Headers | None = None,
        *,
        expect: SourceInfo | None = None,
    ) -> bytearray:
        """As :meth:`SourceBackend.read_range`; the new buffer is allocated (zero-filled, about a
        millisecond for 4 MiB) by the worker thread that fills it, not by the event loop's thread."""
        made: list[bytearray] = []

        def make() -> memoryview:
            made.append(bytearray(length))
            return memoryview(made[0])

        if length < 0:
            raise ValueError(f"invalid range length {length}")
        await self._read(url, start, length, make, headers=headers, expect=expect)
        return made[0] if made else bytearray()

    async def _read(
        self,
        url: str,
        start: int,
        length: int,
        make_view: Callable[[], memoryview],
        *,
        headers: Headers | None,
        expect: SourceInfo | None,
    ) -> None:
        """Fill ``make_view()`` (called once, in the worker thread) with ``length`` bytes from ``start``."""
        if start < 0:
            raise ValueError(f"invalid range start {start}")
        if length == 0:
            return
        last = start + length - 1
        if expect is not None and expect.content_length is not None and last >= expect.content_length:
            raise ValueError(f"bytes {start}-{last} are past the end of the object ({expect.content_length} bytes)")
        lines = _header_lines(headers)
        view: memoryview | None = None
        filled = 0  # bytes of the buffer written, kept across attempts: a retry resumes after them
        seen_total: list[int] = []

        def once(curl: pycurl.Curl) -> None:
            nonlocal filled, view
            if view is None:
                view = make_view()
            first = start + filled
            exchange = self._exchange(
                curl,
                url,
                lines,
                lambda r: _check_range_answer(url, r, first, last, expect=expect, seen_total=seen_total),
                into=view,
                filled=filled,
                byte_range=f"{first}-{last}",
            )
            try:
                response = exchange.run()
            finally:
                filled = exchange.filled
            if not exchange.accepted:
                raise _status_error(url, response)
            if filled != length:
                raise _Transient(f"the answer ended after {filled} of {length} bytes")

        try:
            await self._retrying(url, f"bytes {start}-{last}", lambda: self._in_thread(once))
        finally:
            if view is not None:
                view.release()

    @asynccontextmanager
    async def stream(
        self,
        url: str,
        headers: Headers | None = None,
        *,
        expect: SourceInfo | None = None,
        chunk_size: int = STREAM_CHUNK,
    ) -> AsyncIterator[AsyncIterator[Chunk]]:
        """See :meth:`SourceBackend.stream`; chunks are ``chunk_size`` bytes (the last may be shorter)."""
        if chunk_size <= 0:
            raise ValueError(f"invalid chunk size {chunk_size}")
        body = _HTTPStream(self, url, _header_lines(headers), expect, chunk_size)
        body.start()
        try:
            yield body
        finally:
            await body.aclose()

    async def request(
        self, url: str, headers: Headers | None = None, *, method: str = "GET", max_body: int = 4 * MIB
    ) -> HTTPAnswer:
        """One small request (an API call, a token, a manifest) whose final answer is returned whatever its
        status (after redirects, which drop ``Authorization`` on the way to another host), with at most
        ``max_body`` bytes of body (a longer one raises :class:`SourceProtocolError`). Network failures and
        5xx, 408, 429 answers are retried like every other request; their last one is returned as it is."""
        if method not in ("GET", "HEAD"):
            raise ValueError(f"unsupported method {method!r}")
        lines = _header_lines(headers)

        def once(curl: pycurl.Curl) -> HTTPAnswer:
            body = bytearray()

            def on_body(data: memoryview) -> None:
                if len(body) + len(data) > max_body:
                    raise SourceProtocolError(url, f"{method} {display_url(url)}: the answer is over {max_body} bytes")
                body.extend(data)

            exchange = self._exchange(curl, url, lines, lambda _r: True, on_body)
            if method == "HEAD":
                curl.setopt(pycurl.NOBODY, 1)
            r = exchange.run()
            answer = HTTPAnswer(r.status, dict(r.headers), bytes(body), r.url)
            if (r.status >= 500 and r.status not in (501, 505)) or r.status in (408, 429):
                raise _TransientAnswer(f"HTTP {r.status} {r.phrase()}".rstrip(), answer)
            return answer

        last: list[HTTPAnswer] = []

        async def attempt() -> HTTPAnswer:
            try:
                return await self._in_thread(once)
            except _TransientAnswer as e:
                last[:] = [e.answer]
                raise

        try:
            return await self._retrying(url, method, attempt)
        except SourceUnavailable:
            if last:
                return last[0]
            raise

    async def read_body_into(
        self, url_at: Callable[[int], str], buffer: bytearray | memoryview, headers: Headers | None = None
    ) -> None:
        """Fill ``buffer`` with the whole body of a GET of ``url_at(0)`` — for APIs that take the range in
        the query string (WebHDFS's ``op=OPEN&offset=&length=``) and answer 200. A retry asks for
        ``url_at(received)`` (the rest); an answer of another length than asked for is refused."""
        lines = _header_lines(headers)
        with memoryview(buffer) as outer, outer.cast("B") as view:
            if view.readonly:
                raise ValueError("read_body_into needs a writable buffer")
            length = view.nbytes
            filled = 0

            def once(curl: pycurl.Curl) -> None:
                nonlocal filled
                url = url_at(filled)
                want = length - filled

                def on_response(r: _Response) -> bool:
                    if r.status != 200:
                        return False
                    got = r.content_length(url)
                    if got is not None and got != want:
                        raise SourceProtocolError(
                            url, f"GET {display_url(url)}: asked for {want} bytes, the origin announced {got}"
                        )
                    return True

                exchange = self._exchange(curl, url, lines, on_response, into=view, filled=filled)
                try:
                    response = exchange.run()
                finally:
                    filled = exchange.filled
                if not exchange.accepted:
                    raise _status_error(url, response)
                if filled != length:
                    raise _Transient(f"the answer ended after {filled} of {length} bytes")

            if length:
                await self._retrying(url_at(0), f"{length} bytes", lambda: self._in_thread(once))

    async def list(self, url: str, headers: Headers | None = None) -> builtins.list[SourceEntry]:
        """The files below the directory ``url`` from its index pages, recursively (module docstring),
        sorted by URL."""
        try:
            parts = urlsplit(url)
        except ValueError as e:
            raise MalformedURL(url, f"cannot list {url[:80]!r}: the URL is malformed ({e})") from None
        if parts.query or parts.fragment:
            raise MalformedURL(
                url, f"cannot list {display_url(url)}: a directory to list takes no query string or fragment (they name one page)"
            )
        base = directory_url(url)
        lines = _header_lines(headers)
        files: dict[str, int | None] = {}
        queue: deque[tuple[str, int]] = deque([("", 0)])  # (directory below base, percent-encoded; depth)
        seen = {""}
        pages = 0
        while queue:
            below, depth = queue.popleft()
            pages += 1
            if pages > self.list_max_pages:
                raise SourceRequestError(
                    url, f"listing {display_url(base)}: over {self.list_max_pages} directory pages; list a narrower directory"
                )
            page_url = base + below
            fetch = partial(self._in_thread, partial(self._fetch_page, url=page_url, lines=lines))
            page = await self._retrying(page_url, "list", fetch)
            for name, is_dir, size in parse_listing(page_url, *page):
                if is_dir:
                    if below + name in seen:
                        continue
                    if depth + 1 > self.list_max_depth:
                        raise SourceRequestError(
                            url,
                            f"listing {display_url(base)}: {display_url(page_url + name)} is over {self.list_max_depth}"
                            " directories deep",
                        )
                    seen.add(below + name)
                    queue.append((below + name, depth + 1))
                    continue
                files[base + below + name] = size
                if len(files) > self.list_max_entries:
                    raise SourceRequestError(
                        url,
                        f"listing {display_url(base)}: over {self.list_max_entries} files; list a narrower directory",
                    )
        return [SourceEntry(url=u, content_length=files[u]) for u in sorted(files)]

    def _fetch_page(self, curl: pycurl.Curl, *, url: str, lines: builtins.list[str]) -> tuple[str, bytes, str]:
        """(final URL, body, Content-Type) of a GET of ``url``; at most ``list_max_page_bytes`` of body."""
        body = bytearray()
        limit = self.list_max_page_bytes

        def on_body(data: memoryview) -> None:
            if len(body) + len(data) > limit:
                raise SourceRequestError(url, f"GET {display_url(url)}: a directory page over {limit} bytes")
            body.extend(data)

        exchange = self._exchange(curl, url, lines, lambda r: 200 <= r.status < 300, on_body)
        r = exchange.run()
        if not exchange.accepted:
            raise _status_error(url, r)
        return r.url or url, bytes(body), r.headers.get("content-type", "")

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()

    # --- machinery ---

    def _exchange(
        self,
        curl: pycurl.Curl,
        url: str,
        lines: builtins.list[str],
        on_response: Callable[[_Response], bool],
        on_body: Callable[[memoryview], None] | None = None,
        *,
        into: memoryview | None = None,
        filled: int = 0,
        byte_range: str | None = None,
        abort_check: Callable[[], None] = trio.from_thread.check_cancelled,
    ) -> _Exchange:
        """A configured exchange on ``curl`` (reset first: options do not leak from the last use, while its
        connections, DNS and TLS session caches survive)."""
        c = curl
        c.reset()
        c.setopt(pycurl.URL, url)
        c.setopt(pycurl.NOSIGNAL, 1)  # libcurl in threads: no SIGALRM for DNS timeouts
        c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.FOLLOWLOCATION, 1)
        c.setopt(pycurl.MAXREDIRS, self.max_redirects)
        # HTTP/1.1: each request in flight has a connection of its own, as measured (HTTP/2 would multiplex
        # them on one connection, in 16 KiB frames; not measured here).
        c.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        c.setopt(pycurl.CONNECTTIMEOUT_MS, int(self.connect_timeout * 1000))
        c.setopt(pycurl.LOW_SPEED_LIMIT, self.stall_speed)
        c.setopt(pycurl.LOW_SPEED_TIME, max(1, round(self.stall_timeout)))
        c.setopt(pycurl.BUFFERSIZE, _RECV_BUFFER)
        c.setopt(pycurl.USERAGENT, self.user_agent)
        c.setopt(pycurl.HTTPHEADER, lines)
        if byte_range is not None:
            c.setopt(pycurl.RANGE, byte_range)
        if self.insecure:
            c.setopt(pycurl.SSL_VERIFYPEER, 0)
            c.setopt(pycurl.SSL_VERIFYHOST, 0)
        else:
            if self._cafile:
                c.setopt(pycurl.CAINFO, self._cafile)
            if self._capath:
                c.setopt(pycurl.CAPATH, self._capath)
        if self.proxy is not None:
            c.setopt(pycurl.PROXY, self.proxy)
        exchange = _Exchange(c, url, on_response, on_body, into=into, filled=filled, abort_check=abort_check)
        exchange.install()
        return exchange

    def _take_handle(self) -> pycurl.Curl:
        if self._closed:
            raise RuntimeError("this HTTPBackend is closed")
        return self._idle.pop() if self._idle else pycurl.Curl()

    def _give_back(self, curl: pycurl.Curl) -> None:
        if self._closed or len(self._idle) >= self._max_idle:
            curl.close()
        else:
            self._idle.append(curl)

    async def _in_thread(self, fn: Callable[[pycurl.Curl], T]) -> T:
        """Run ``fn(curl)`` in a worker thread with a pooled handle. Not abandoned on cancellation: the
        thread notices it (progress callback) and returns first, so no buffer is written afterwards."""
        curl = self._take_handle()
        try:
            return await trio.to_thread.run_sync(fn, curl)
        finally:
            self._give_back(curl)

    async def _retrying(self, url: str, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        failures = 0
        while True:
            try:
                return await attempt()
            except _Transient as e:
                failures += 1
                wait = _wait_before_retry(self.retry, failures, e)
                if failures >= self.retry.attempts or wait is None:
                    raise SourceUnavailable(url, _gave_up(url, what, failures, e.reason)) from e
                delay = wait
                event(
                    _log,
                    logging.INFO,
                    "source.retry",
                    url=display_url(url),
                    what=what,
                    failures=failures,
                    reason=e.reason,
                    delay=f"{delay:.2f}",
                )
                await trio.sleep(delay)


class _Aborted(Exception):
    """The consumer of a stream went away: its producer thread stops."""


class _HTTPStream:
    """The chunks of one GET, produced by a worker thread and consumed by a trio task.

    The thread runs the blocking transfer (retrying until the first chunk is handed over) and hands each
    full chunk to the consumer through a memory channel (one chunk of read-ahead besides the one being
    filled), so the network keeps flowing while the consumer hashes and writes. It is a thread from
    ``trio.lowlevel.start_thread_soon``, not a task in a nursery, so errors reach the consumer as the plain
    exceptions of ``__anext__`` (a nursery would wrap them, and the consumer's own, in ExceptionGroups);
    :meth:`aclose` stops it and waits for it, which keeps its lifetime inside the ``async with``.
    Once it has raised, a stream stays failed: it never silently starts the body again.
    """

    _ABANDON_AFTER = 10.0  # seconds aclose waits for the thread (it notices an abort within about one)

    def __init__(self, backend: HTTPBackend, url: str, lines: list[str], expect: SourceInfo | None, chunk_size: int) -> None:
        self._backend = backend
        self._url = url
        self._lines = lines
        self._expect = expect
        self._chunk_size = chunk_size
        self._send, self._receive = trio.open_memory_channel[Chunk | BaseException | None](1)
        self._token = trio.lowlevel.current_trio_token()
        self._abort = threading.Event()
        self._finished = trio.Event()
        self._curl: pycurl.Curl | None = None
        self._exchange: _Exchange | None = None
        self._chunk = bytearray()  # being filled by the exchange (its `into`)
        self._queued = 0  # bytes of full chunks of the current attempt
        self._delivered = 0  # bytes handed to the consumer
        self._ended = False
        self._failed: BaseException | None = None

    # --- the consumer's side (trio) ---

    def start(self) -> None:
        self._curl = self._backend._take_handle()
        trio.lowlevel.start_thread_soon(self._produce, self._produced, name=f"dfz stream {display_url(self._url)}")

    def __aiter__(self) -> _HTTPStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._ended:
            raise StopAsyncIteration
        if self._failed is not None:
            raise RuntimeError(f"this stream of {display_url(self._url)} already failed ({self._failed!r})")
        item = await self._receive.receive()
        if item is None:
            self._ended = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._failed = item
            raise item
        return item

    async def aclose(self) -> None:
        """Stop the producer (if it still runs) and wait until it has let go of its handle."""
        self._abort.set()
        self._receive.close()  # a producer blocked handing over a chunk gets BrokenResourceError
        with trio.CancelScope(shield=True), trio.move_on_after(self._ABANDON_AFTER):
            await self._finished.wait()
        if self._finished.is_set() and self._curl is not None:
            self._backend._give_back(self._curl)
        elif not self._finished.is_set():
            event(_log, logging.WARNING, "source.stream_abandoned", url=display_url(self._url))
        self._curl = None

    # --- the producer's side (its own thread) ---

    def _produced(self, _result: object) -> None:
        try:
            self._token.run_sync_soon(self._finished.set)
        except trio.RunFinishedError:
            pass

    def _hand_over(self, item: Chunk | BaseException | None) -> None:
        try:
            trio.from_thread.run(self._send.send, item, trio_token=self._token)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError, trio.Cancelled):
            raise _Aborted from None

    def _check_abort(self) -> None:
        if self._abort.is_set():
            raise _Aborted

    def _produce(self) -> None:
        try:
            self._transfer()
            last: Chunk | BaseException | None = None
        except _Aborted:
            return
        except BaseException as e:
            last = e
        try:
            self._hand_over(last)
        except _Aborted:
            pass

    def _transfer(self) -> None:
        failures = 0
        while True:
            try:
                self._attempt()
                return
            except _Transient as e:
                if self._delivered:
                    raise SourceUnavailable(
                        self._url,
                        f"GET {display_url(self._url)}: the transfer broke after {self._delivered} bytes ({e.reason}); a stream"
                        " cannot resume, so the download must start again",
                    ) from e
                failures += 1
                wait = _wait_before_retry(self._backend.retry, failures, e)
                if failures >= self._backend.retry.attempts or wait is None:
                    raise SourceUnavailable(self._url, _gave_up(self._url, "stream", failures, e.reason)) from e
                delay = wait
                event(
                    _log,
                    logging.INFO,
                    "source.retry",
                    url=display_url(self._url),
                    what="stream",
                    failures=failures,
                    reason=e.reason,
                )
                if self._abort.wait(delay):
                    raise _Aborted from None

    def _attempt(self) -> None:
        assert self._curl is not None
        self._queued = 0
        self._chunk = bytearray(self._chunk_size)
        exchange = self._exchange = self._backend._exchange(
            self._curl,
            self._url,
            self._lines,
            self._on_response,
            self._spill,
            into=memoryview(self._chunk),
            abort_check=self._check_abort,
        )
        try:
            response = exchange.run()
            if not exchange.accepted:
                raise _status_error(self._url, response)
            received = self._queued + exchange.filled
            expected = self._expect.content_length if self._expect is not None else None
            if expected is not None and received != expected:
                raise _length_changed(self._url, expected, received)
        finally:
            assert exchange.into is not None
            exchange.into.release()  # so that the consumer's chunk can be resized
        if exchange.filled:
            del self._chunk[exchange.filled :]
            self._deliver(self._chunk)

    def _deliver(self, chunk: bytearray) -> None:
        self._hand_over(chunk)
        self._delivered += len(chunk)

    def _on_response(self, r: _Response) -> bool:
        if not 200 <= r.status < 300:
            return False
        if r.status == 206:
            raise SourceProtocolError(
                self._url, f"GET {display_url(self._url)}: the origin answered 206 to a request without Range"
            )
        length = r.content_length(self._url)
        expected = self._expect.content_length if self._expect is not None else None
        if expected is not None and length is not None and length != expected:
            raise _length_changed(self._url, expected, length)
        _check_validators(self._url, r, self._expect)
        return True

    def _spill(self, data: memoryview) -> None:
        """A block that does not fit in the chunk being filled: complete it, hand it over (waiting while the
        consumer is a chunk behind), go on in a new one."""
        exchange = self._exchange
        assert exchange is not None and exchange.into is not None
        while True:
            room = self._chunk_size - exchange.filled
            if len(data) < room:
                exchange.into[exchange.filled : exchange.filled + len(data)] = data
                exchange.filled += len(data)
                return
            exchange.into[exchange.filled :] = data[:room]
            data = data[room:]
            exchange.into.release()
            full, self._chunk = self._chunk, bytearray(self._chunk_size)
            exchange.into, exchange.filled = memoryview(self._chunk), 0
            self._queued += self._chunk_size
            self._deliver(full)


# --- directory listings -----------------------------------------------------------------------------------


class _Anchors(HTMLParser):
    """The ``href`` of every ``<a>`` of a page, in order."""

    def __init__(self, limit: int) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []
        self.limit = limit

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag != "a" or len(self.hrefs) >= self.limit:
            return
        for name, value in attrs:
            if name == "href" and value is not None:
                self.hrefs.append(value.strip())
                return


def _unsafe(url: str, page_url: str, what: str) -> SourceProtocolError:
    return SourceProtocolError(
        url, f"the directory listing at {display_url(page_url)} {what}: refusing it (a listing must stay below its URL)"
    )


def parse_listing(page_url: str, final_url: str, body: bytes, content_type: str) -> list[tuple[str, bool, int | None]]:
    """The entries of one directory page: ``(name, is_dir, size)``, ``name`` percent-encoded and relative
    to the page's directory (ending in ``/`` for a directory). ``final_url`` is where the page was read
    (after redirects); links are resolved against it. Raises :class:`SourceProtocolError` for a page that
    leads outside its directory, :class:`SourceRequestError` for one that is no directory listing."""
    kind = content_type.split(";", maxsplit=1)[0].strip().lower()
    charset = "utf-8"
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "charset" and value:
            charset = value.strip('"').lower()
    try:
        text = body.decode(charset, errors="replace")
    except LookupError:
        text = body.decode("utf-8", errors="replace")
    if kind == "application/json" or (not kind and text.lstrip().startswith("[")):
        return _parse_json_listing(page_url, text)
    if kind in ("text/html", "application/xhtml+xml"):
        return _parse_html_listing(page_url, final_url, text)
    raise SourceRequestError(
        page_url,
        f"GET {display_url(page_url)} answered {kind or 'no Content-Type'}, not a directory listing (an HTML index"
        " such as nginx's autoindex, or its JSON format): is the URL a directory?",
    )


def _parse_json_listing(page_url: str, text: str) -> list[tuple[str, bool, int | None]]:
    try:
        items = json.loads(text)
    except ValueError as e:
        raise SourceProtocolError(page_url, f"the JSON directory listing at {display_url(page_url)} is not JSON: {e}") from None
    if not isinstance(items, list):
        raise SourceProtocolError(page_url, f"the JSON directory listing at {display_url(page_url)} is not an array")
    out: list[tuple[str, bool, int | None]] = []
    for item in items:
        name = item.get("name") if isinstance(item, dict) else None
        kind = item.get("type", "file") if isinstance(item, dict) else None
        if not isinstance(name, str) or not isinstance(kind, str):
            raise SourceProtocolError(
                page_url, f"the JSON directory listing at {display_url(page_url)} has an entry without a name"
            )
        try:
            if "/" in name:
                raise UnsafePath(f"name {name[:120]!r} holds a '/'")
            check_relative_path(name)
        except UnsafePath as e:
            raise _unsafe(page_url, page_url, f"has an unsafe entry ({e})") from None
        if kind == "directory":
            out.append((quote(name, safe="") + "/", True, None))
        elif kind == "file":
            size = item.get("size")
            ok = isinstance(size, int) and not isinstance(size, bool) and 0 <= size < 2**63
            out.append((quote(name, safe=""), False, size if ok else None))
        # "other" (devices, sockets...): not downloadable, left out
    return out


def _parse_html_listing(page_url: str, final_url: str, text: str) -> list[tuple[str, bool, int | None]]:
    parser = _Anchors(limit=1_000_000)
    parser.feed(text)
    parser.close()
    final = urlsplit(final_url)
    directory = final.path if final.path.endswith("/") else final.path.rsplit("/", 1)[0] + "/"
    out: list[tuple[str, bool, int | None]] = []
    for href in parser.hrefs:
        if not href or href.startswith(("?", "#")):
            continue  # sorting links, anchors
        try:
            target = urlsplit(urljoin(final._replace(path=directory, query="", fragment="").geturl(), href))
        except ValueError:
            raise _unsafe(page_url, page_url, f"has a malformed link {href[:120]!r}") from None
        if target.scheme.lower() != final.scheme.lower() or target.netloc.lower() != final.netloc.lower():
            raise _unsafe(page_url, page_url, f"links to another host or scheme ({href[:120]!r})")
        if target.query:
            continue  # not a plain file (sorting and navigation links)
        if target.path.endswith("/") and directory.startswith(target.path):
            continue  # the page itself or one of its parents ("../", "Parent Directory")
        if not target.path.startswith(directory):
            raise _unsafe(page_url, page_url, f"links outside it ({href[:120]!r})")
        name = target.path[len(directory) :]
        is_dir = name.endswith("/")
        try:
            parts = name.rstrip("/").split("/")
            decoded = [unquote(part, errors="strict") for part in parts]
            if any("/" in part for part in decoded):
                raise UnsafePath(f"link {href[:120]!r} holds an encoded '/'")
            check_relative_path("/".join(decoded))
        except (UnsafePath, UnicodeDecodeError) as e:
            raise _unsafe(page_url, page_url, f"has an unsafe link ({e})") from None
        # Re-encode from the decoded names, so that the entry's URL and its path agree whatever the page's encoding.
        out.append(("/".join(quote(part, safe="") for part in decoded) + ("/" if is_dir else ""), is_dir, None))
    return out
