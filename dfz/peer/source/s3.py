"""``s3://bucket/key`` origins: Amazon S3 and the servers that speak its API (MinIO, SeaweedFS, Ceph, ...),
read with boto3/botocore in worker threads under trio.

Why botocore: request signing (SigV4), credential resolution (environment, shared files, profiles, SSO,
instance roles), regions and addressing styles are a moving target best left to the library every AWS
tool uses; dfz only maps its answers onto the :mod:`dfz.peer.source` interface.

* URLs: ``s3://BUCKET/KEY``; the key is the URL's path without its first ``/``, percent-decoded (so a key
  with spaces is written ``%20``). ``?versionId=V`` reads one version of the object; any other query
  string is refused. ``list`` takes ``s3://BUCKET/PREFIX/`` (or ``s3://BUCKET``).
* Where: :class:`S3Options` (the daemon's ``s3_*`` keys and ``--s3-*`` flags): ``endpoint`` (empty: AWS, or
  ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``), ``region`` (empty: the profile's or ``$AWS_REGION``,
  else ``us-east-1``), ``addressing_style`` (``auto``, ``path`` or ``virtual``).
* Credentials, first found wins: ``access_key_id`` + ``secret_access_key`` (+ ``session_token``) given
  explicitly; else botocore's chain (``$AWS_ACCESS_KEY_ID``..., the shared credentials and config files
  with ``profile`` or ``$AWS_PROFILE``, SSO, container and instance roles); else none, and requests are
  sent unsigned (public buckets). A 401/403 is :class:`SourceAuthError` naming the access key id and where
  it came from — never the secret.
* ``stat`` is HeadObject: length, ETag, Last-Modified. Every read passes ``If-Match`` with the ETag that
  ``stat`` saw, so an object overwritten mid-download answers 412 (:class:`SourceChanged`), and the length
  in ``Content-Range`` is checked against the stat's as well.
* ``read_range_into`` is a ranged GetObject whose body is read with ``StreamingBody.readinto`` straight
  into the caller's buffer (urllib3 copies each block once from the socket), in steps between which
  cancellation is polled, so a cancelled read stops within one step (or the read timeout on a stalled
  connection) and the buffer is never touched after the call.
* Retries: botocore's own are turned off (one attempt per call) so that :class:`RetryPolicy` governs, and
  a range read resumes after the bytes already received. 5xx, 408, 429, ``SlowDown`` and network
  failures are transient; other 4xx are final.
"""

from __future__ import annotations

import builtins
import logging
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

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
    SourceError,
    SourceInfo,
    SourceNotFound,
    SourceProtocolError,
    SourceRequestError,
    SourceUnavailable,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["ADDRESSING_STYLES", "S3Backend", "S3Location", "S3Options", "parse_s3_url"]

_log = get_logger("peer.source.s3")
T = TypeVar("T")

ADDRESSING_STYLES = ("auto", "path", "virtual")
DEFAULT_REGION = "us-east-1"
STREAM_CHUNK = 4 * 1024 * 1024
_STEP = 1024 * 1024  # bytes read between two polls of cancellation
# Bucket names as S3 and its clones accept them (legacy US-East names may hold capitals and underscores).
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "Throttling", "503", "500"}
)


@dataclass(frozen=True)
class S3Options:
    """Where S3 is and who dfz is there. Empty strings leave the choice to botocore (environment, files)."""

    endpoint: str = ""
    region: str = ""
    addressing_style: str = "auto"
    access_key_id: str = ""
    secret_access_key: str = field(default="", repr=False)
    session_token: str = field(default="", repr=False)
    profile: str = ""

    def __post_init__(self) -> None:
        if self.endpoint:
            try:
                parts = urlsplit(self.endpoint)
                parts.port  # noqa: B018 - raises ValueError for a port out of range
            except ValueError as e:
                raise ValueError(f"s3_endpoint {self.endpoint!r} is malformed ({e})") from None
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.query:
                raise ValueError(
                    f"s3_endpoint {self.endpoint!r} must be a URL such as https://s3.example.com or http://127.0.0.1:8333"
                )
        if self.addressing_style not in ADDRESSING_STYLES:
            raise ValueError(f"s3_addressing_style must be one of {', '.join(ADDRESSING_STYLES)}, got {self.addressing_style!r}")
        if bool(self.access_key_id) != bool(self.secret_access_key):
            raise ValueError("s3_access_key_id and s3_secret_access_key go together: give both or neither")
        if self.session_token and not self.access_key_id:
            raise ValueError("s3_session_token needs s3_access_key_id and s3_secret_access_key")
        for name in ("region", "access_key_id", "profile"):
            value = getattr(self, name)
            if len(value) > 256 or any(c.isspace() or ord(c) < 0x20 for c in value):
                raise ValueError(f"s3_{name} {value[:40]!r} must be a short string without spaces")


@dataclass(frozen=True, slots=True)
class S3Location:
    bucket: str
    key: str
    version_id: str | None = None


def parse_s3_url(url: str, *, object_needed: bool = True) -> S3Location:
    """Bucket, key and version of an ``s3://`` URL; :class:`MalformedURL` when it has no usable bucket (or,
    with ``object_needed``, no key)."""
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise MalformedURL(url, f"cannot read {url!r}: the URL is malformed ({e})") from None
    if parts.scheme.lower() != "s3":
        raise MalformedURL(url, f"cannot read {url!r} from S3: it is not an s3:// URL")
    bucket = parts.netloc
    if not _BUCKET.fullmatch(bucket):
        raise MalformedURL(
            url,
            f"cannot read {url!r}: {bucket!r} is not a bucket name (expected s3://BUCKET/KEY, the bucket 3-255 letters,"
            " digits, '.', '-' or '_'; the endpoint is set in the daemon's s3_endpoint, not in the URL)",
        )
    try:
        key = unquote(parts.path[1:], errors="strict")
    except UnicodeDecodeError:
        raise MalformedURL(url, f"cannot read {url!r}: the key's percent-encoding is not UTF-8") from None
    if object_needed and (not key or key.endswith("/")):
        raise MalformedURL(url, f"cannot read {url!r}: it names a bucket or a prefix, not an object (s3://BUCKET/KEY)")
    if len(key.encode()) > 1024:
        raise MalformedURL(url, f"cannot read {url[:80]!r}…: an S3 key has at most 1024 bytes")
    version: str | None = None
    if parts.query:
        try:
            pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            pairs = []
        if len(pairs) != 1 or pairs[0][0] != "versionId" or not pairs[0][1]:
            raise MalformedURL(url, f"cannot read {url!r}: the only query an s3:// URL takes is ?versionId=VERSION")
        version = pairs[0][1]
    if parts.fragment:
        raise MalformedURL(url, f"cannot read {url!r}: an s3:// URL has no fragment (percent-encode # as %23)")
    return S3Location(bucket, key, version)


class _Transient(Exception):
    pass


class S3Backend(SourceBackend):
    """``s3://`` origins. ``options``: endpoint, region, addressing style and credentials
    (:class:`S3Options`). ``retry``: attempts and backoff for transient failures. ``connect_timeout``,
    ``read_timeout``: seconds (a connection silent that long fails, and is retried). ``max_connections``:
    the connection pool's size (range reads of all tasks share it).

    The botocore client is made on first use (importing boto3 takes a few hundred milliseconds: a daemon
    that never reads S3 does not pay them)."""

    schemes: ClassVar[tuple[str, ...]] = ("s3",)

    def __init__(
        self,
        options: S3Options | None = None,
        *,
        retry: RetryPolicy | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_connections: int = 32,
    ) -> None:
        if connect_timeout <= 0 or read_timeout <= 0 or max_connections < 1:
            raise ValueError("connect_timeout, read_timeout > 0 and max_connections >= 1 are needed")
        self.options = options or S3Options()
        self.retry = retry or RetryPolicy()
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self._client: S3Client | None = None
        self._credentials = "no credentials (requests are sent unsigned)"

    # --- the interface ---

    async def stat(self, url: str, headers: Headers | None = None) -> SourceInfo:
        where = parse_s3_url(url)

        def once() -> SourceInfo:
            client = self._client_now()
            extra = {"VersionId": where.version_id} if where.version_id else {}
            try:
                head = client.head_object(Bucket=where.bucket, Key=where.key, **extra)  # type: ignore[arg-type]
            except Exception as e:
                raise self._error(url, "HeadObject", e) from None
            modified = head.get("LastModified")
            return SourceInfo(
                url=url,
                content_length=int(head["ContentLength"]),
                supports_ranges=True,
                etag=head.get("ETag") or None,
                last_modified=format_datetime(modified.astimezone(UTC), usegmt=True) if modified is not None else None,
                content_type=head.get("ContentType") or None,
            )

        return await self._retrying(url, "stat", lambda: trio.to_thread.run_sync(once))

    async def read_range_into(
        self,
        url: str,
        start: int,
        buffer: bytearray | memoryview,
        headers: Headers | None = None,
        *,
        expect: SourceInfo | None = None,
    ) -> None:
        where = parse_s3_url(url)
        with memoryview(buffer) as outer, outer.cast("B") as view:
            if view.readonly:
                raise ValueError("read_range_into needs a writable buffer")
            length = view.nbytes
            if start < 0:
                raise ValueError(f"invalid range start {start}")
            if length == 0:
                return
            last = start + length - 1
            if expect is not None and expect.content_length is not None and last >= expect.content_length:
                raise ValueError(f"bytes {start}-{last} are past the end of the object ({expect.content_length} bytes)")
            filled = 0  # kept across attempts: a retry resumes after it
            seen_total: list[int] = []

            def once() -> None:
                nonlocal filled
                first = start + filled
                body = self._get(url, where, f"bytes={first}-{last}", expect, (first, last), seen_total)
                try:
                    while filled < length:
                        trio.from_thread.check_cancelled()
                        end = min(length, filled + _STEP)
                        try:
                            n = body.readinto(view[filled:end])
                        except Exception as e:
                            raise self._error(url, "GetObject", e) from None
                        if not n:
                            raise _Transient(f"the answer ended after {filled} of {length} bytes")
                        filled += n
                finally:
                    body.close()

            await self._retrying(url, f"bytes {start}-{last}", lambda: trio.to_thread.run_sync(once))

    @asynccontextmanager
    async def stream(
        self,
        url: str,
        headers: Headers | None = None,
        *,
        expect: SourceInfo | None = None,
    ) -> AsyncIterator[AsyncIterator[Chunk]]:
        """The whole object in chunks of :data:`STREAM_CHUNK` bytes (S3 always serves ranges, so the
        back-to-source path reads ranges instead; this is for callers that want one pass)."""
        where = parse_s3_url(url)
        holder: list[Any] = []

        def begin() -> None:
            holder.append(self._get(url, where, None, expect, None, []))

        def next_chunk() -> bytearray:
            chunk = bytearray(STREAM_CHUNK)
            filled = 0
            with memoryview(chunk) as view:
                while filled < STREAM_CHUNK:
                    trio.from_thread.check_cancelled()
                    try:
                        n = holder[0].readinto(view[filled:])
                    except Exception as e:
                        raise SourceUnavailable(
                            url, f"GetObject {url}: the transfer broke after a part of the body ({e}); start the download again"
                        ) from None
                    if not n:
                        break
                    filled += n
            del chunk[filled:]
            return chunk

        await self._retrying(url, "stream", lambda: trio.to_thread.run_sync(begin))

        async def chunks() -> AsyncIterator[Chunk]:
            while True:
                chunk = await trio.to_thread.run_sync(next_chunk)
                if not chunk:
                    return
                yield chunk

        body = chunks()
        try:
            yield body
        finally:
            await body.aclose()  # type: ignore[attr-defined]
            await trio.to_thread.run_sync(holder[0].close)

    async def list(self, url: str, headers: Headers | None = None) -> builtins.list[SourceEntry]:
        """The objects whose keys start with the URL's key as a directory (``s3://B/dir`` lists
        ``dir/...``; ``s3://B`` the whole bucket), recursively, in key order (ListObjectsV2, page by page).
        Zero-length "directory marker" keys ending in ``/`` are left out."""
        where = parse_s3_url(url, object_needed=False)
        if where.version_id:
            raise MalformedURL(url, f"cannot list {url!r}: versionId names one object, not a prefix")
        prefix = where.key if not where.key or where.key.endswith("/") else where.key + "/"
        entries: builtins.list[SourceEntry] = []
        token: list[str] = []

        def page() -> bool:
            client = self._client_now()
            extra = {"ContinuationToken": token[0]} if token else {}
            try:
                answer = client.list_objects_v2(Bucket=where.bucket, Prefix=prefix, **extra)  # type: ignore[arg-type]
            except Exception as e:
                raise self._error(url, "ListObjectsV2", e) from None
            for item in answer.get("Contents", []):
                key = item.get("Key", "")
                if not key or key.endswith("/"):
                    continue
                entries.append(SourceEntry(url=f"s3://{where.bucket}/{quote(key)}", content_length=item.get("Size")))
            more = answer.get("IsTruncated", False) and answer.get("NextContinuationToken")
            token[:] = [more] if more else []
            return bool(more)

        while await self._retrying(url, "list", lambda: trio.to_thread.run_sync(page)):
            pass
        return entries

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # --- machinery ---

    def _client_now(self) -> S3Client:
        """The botocore client (made on first use, in a worker thread: it reads files and the environment)."""
        with self._lock:
            if self._client is None:
                self._client, self._credentials = self._make_client()
            return self._client

    def _make_client(self) -> tuple[S3Client, str]:
        import boto3.session
        from botocore import UNSIGNED
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError

        o = self.options
        try:
            session = boto3.session.Session(
                aws_access_key_id=o.access_key_id or None,
                aws_secret_access_key=o.secret_access_key or None,
                aws_session_token=o.session_token or None,
                region_name=o.region or None,
                profile_name=o.profile or None,
            )
            credentials = session.get_credentials()
        except BotoCoreError as e:  # an unknown profile, an unreadable config file
            raise SourceAuthError("s3://", f"cannot set up S3 credentials: {e}") from None
        profile = o.profile or session.profile_name
        if o.access_key_id:
            where = "the daemon's configuration (s3_access_key_id)"
        elif credentials is None:
            where = ""
        else:
            where = {
                "env": "the environment (AWS_ACCESS_KEY_ID)",
                "shared-credentials-file": f"the shared credentials file (profile {profile!r})",
                "config-file": f"the AWS config file (profile {profile!r})",
            }.get(credentials.method, f"botocore's {credentials.method!r} provider")
        described = (
            f"access key id {credentials.access_key!r} from {where}"
            if credentials is not None
            else "no credentials (requests are sent unsigned: set s3_access_key_id and s3_secret_access_key, AWS_ACCESS_KEY_ID"
            " and AWS_SECRET_ACCESS_KEY, or a profile)"
        )
        config = Config(
            region_name=o.region or session.region_name or DEFAULT_REGION,
            signature_version=UNSIGNED if credentials is None else "s3v4",
            s3={"addressing_style": o.addressing_style},  # type: ignore[arg-type]  # checked in S3Options
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            max_pool_connections=self.max_connections,
            user_agent_extra=f"dfz/{__version__}",
            # The pieces are verified with BLAKE3 and the whole object against its ETag: no CRC checksums.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        client = session.client("s3", endpoint_url=o.endpoint or None, config=config)
        return client, described

    def _get(  # noqa: PLR0917 - an internal helper of three call sites
        self,
        url: str,
        where: S3Location,
        byte_range: str | None,
        expect: SourceInfo | None,
        wanted: tuple[int, int] | None,
        seen_total: builtins.list[int],
    ) -> Any:
        """GetObject (blocking); checks the answer against ``expect`` and the range asked for and returns its
        body (a botocore ``StreamingBody``, which the caller closes)."""
        client = self._client_now()
        extra: dict[str, str] = {}
        if byte_range is not None:
            extra["Range"] = byte_range
        if where.version_id:
            extra["VersionId"] = where.version_id
        if expect is not None and expect.etag:
            extra["IfMatch"] = expect.etag
        try:
            answer = client.get_object(Bucket=where.bucket, Key=where.key, **extra)  # type: ignore[arg-type]
        except Exception as e:
            raise self._error(url, "GetObject", e, expect=expect) from None
        body = answer["Body"]
        try:
            expected_total = expect.content_length if expect is not None else (seen_total[0] if seen_total else None)
            if wanted is None:
                total = int(answer.get("ContentLength", -1))
                if expected_total is not None and total != expected_total:
                    raise _length_changed(url, expected_total, total)
                return body
            content_range = answer.get("ContentRange", "")
            m = _CONTENT_RANGE.fullmatch(content_range or "")
            if not m:
                total = int(answer.get("ContentLength", -1))
                if wanted[0] == 0 and total == wanted[1] + 1 and expected_total in (None, total):
                    return body  # the range was the whole object, and the server sent it so
                raise SourceProtocolError(
                    url, f"GetObject {url} {byte_range}: the server answered without a valid Content-Range ({content_range!r})"
                )
            first, last = int(m.group(1)), int(m.group(2))
            if m.group(3) != "*":
                total = int(m.group(3))
                if expected_total is not None and total != expected_total:
                    raise _length_changed(url, expected_total, total)
                seen_total[:] = [total]
            if expect is not None and expect.etag and answer.get("ETag") and answer.get("ETag") != expect.etag:
                now = answer.get("ETag")
                raise SourceChanged(
                    url, f"GetObject {url}: the object changed during the download (ETag {expect.etag} became {now})"
                )
            if (first, last) != wanted:
                raise SourceProtocolError(url, f"GetObject {url}: asked for bytes {wanted[0]}-{wanted[1]}, got {first}-{last}")
            return body
        except BaseException:
            body.close()
            raise

    def _error(self, url: str, operation: str, e: Exception, *, expect: SourceInfo | None = None) -> Exception:
        """The :class:`SourceError` (or ``_Transient``) for what botocore raised."""
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            ConnectTimeoutError,
            HTTPClientError,
            ParamValidationError,
            ReadTimeoutError,
            ResponseStreamingError,
        )
        from urllib3.exceptions import HTTPError as URLLib3Error

        if isinstance(e, SourceError | _Transient):
            return e
        if isinstance(e, ClientError):
            error = e.response.get("Error", {})
            code = str(error.get("Code", ""))
            message = str(error.get("Message", "")) or code
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            said = f"HTTP {status} {code}" + (f": {message}" if message and message != code else "")
            if status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES:
                return _Transient(said)
            if status in (401, 403):
                return SourceAuthError(
                    url,
                    f"{operation} {url}: S3 refused access ({said}) to {self._credentials}: check that these credentials"
                    " are valid and allowed to read the object (s3:GetObject, s3:ListBucket to list), and the region"
                    " and endpoint (the daemon's s3_region, s3_endpoint)",
                )
            if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "NoSuchVersion"):
                what = "bucket" if code == "NoSuchBucket" else "object"
                return SourceNotFound(url, f"{operation} {url}: S3 has no such {what} ({said}): check the URL")
            if status == 412:
                return SourceChanged(
                    url,
                    f"{operation} {url}: the object changed during the download (its ETag is no longer"
                    f" {expect.etag if expect else '?'}): start the download again",
                )
            if status == 301 or code in ("PermanentRedirect", "AuthorizationHeaderMalformed"):
                return SourceRequestError(
                    url, f"{operation} {url}: {said}: wrong region or endpoint: set s3_region, s3_endpoint", status
                )
            return SourceRequestError(url, f"{operation} {url}: S3 rejected the request ({said})", status or None)
        if isinstance(e, ParamValidationError):
            return MalformedURL(url, f"{operation} {url}: {e}")
        if isinstance(e, ConnectionError | ConnectTimeoutError | ReadTimeoutError | HTTPClientError | ResponseStreamingError):
            return _Transient(f"{type(e).__name__}: {e}")
        if isinstance(e, URLLib3Error | OSError):
            return _Transient(f"{type(e).__name__}: {e}")
        return SourceUnavailable(url, f"{operation} {url} failed: {type(e).__name__}: {e}")

    async def _retrying(self, url: str, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        failures = 0
        while True:
            try:
                return await attempt()
            except _Transient as e:
                failures += 1
                if failures >= self.retry.attempts:
                    raise SourceUnavailable(
                        url,
                        f"{url} ({what}) failed {failures} times, last with {e}: S3 or the network is failing;"
                        " try again later, or check the endpoint (s3_endpoint)",
                    ) from e
                delay = self.retry.delay(failures)
                event(
                    _log,
                    logging.INFO,
                    "source.retry",
                    url=url,
                    what=what,
                    failures=failures,
                    reason=str(e),
                    delay=round(delay, 2),
                )
                await trio.sleep(delay)


def _length_changed(url: str, before: int, now: int) -> SourceChanged:
    return SourceChanged(
        url,
        f"GetObject {url}: the object's length changed during the download ({before} bytes at stat, now {now}):"
        " the pieces read so far belong to another version; start the download again",
    )
