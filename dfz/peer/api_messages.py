"""The local API's wire protocol (``api.*``): message types, error codes and the checks of a request.

Rules of this file:

* ``dfz get`` and other programs on the daemon's machine talk to the daemon's :class:`~dfz.peer.api.ApiServer`
  with these messages; ``protocol.md`` ("Local API (api.*)") documents the same catalogue, flows and codes.
  The two change together.
* Every field is bounded (the codec refuses anything else with ``INVALID``, 422). What the schema cannot
  say (an absolute output path, a known URL scheme, the digest and piece-length rules, header names and
  values fit for HTTP) is checked by :func:`check_request`, the one place for it: the server answers a
  failed check with a code from :class:`ApiErrorCode`, and ``dfz get`` runs the same check before it
  contacts the daemon, so bad input fails at once with exit code 2.
* Progress is a snapshot, not a delta: every ``api.progress`` carries the whole state of a download, so a
  client that keeps only the latest one per download loses nothing when pushes are throttled or coalesced.
* This file does no I/O.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from enum import IntEnum
from typing import Annotated, ClassVar
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from ..broker import U32, U63, Catalogue, Kind, Message, Text
from ..tasks import MAX_PIECE_LENGTH, MIN_FIXED_PIECE_LENGTH, Digest, DigestFormatError, InvalidPieceLength, validate_piece_length
from .local import CachedTask, DownloadRequest, DownloadState, Progress

# --- field types ----------------------------------------------------------------------------------------

MAX_URL = 8192
MAX_PATH = 4096
MAX_HEADERS = 64
MAX_FILTERED_PARAMS = 256
MAX_TASKS_PER_PAGE = 1000
MAX_EXTRA = 32
MAX_LISTED = 100_000
"""Objects one ``api.list_source`` may ask for (``max_entries``)."""
MAX_ENTRIES_PER_PAGE = 1000

Url = Annotated[str, Meta(min_length=1, max_length=MAX_URL)]
Path = Annotated[str, Meta(min_length=1, max_length=MAX_PATH)]
ShortText = Annotated[str, Meta(max_length=256)]
HeaderName = Annotated[str, Meta(min_length=1, max_length=256)]
Headers = Annotated[list[tuple[HeaderName, Text]], Meta(max_length=MAX_HEADERS)]
"""Request headers for the origin as ``[name, value]`` pairs, in order (a name may repeat)."""
DownloadId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[!-~]+$")]
"""A download's id, chosen by the server: 1 to 64 visible ASCII characters, unique for its lifetime."""
TaskIdText = Annotated[str, Meta(min_length=1, max_length=128)]
"""A task id (64 lowercase hex digits from ``dfz/tasks.py``; bounded more loosely so a client never
drops a progress push because of it)."""
PieceLength = Annotated[int, Meta(ge=MIN_FIXED_PIECE_LENGTH, le=MAX_PIECE_LENGTH)]
"""A fixed piece length; it must also be a power of two (:func:`check_request`)."""
TimeoutMs = Annotated[int, Meta(ge=1, le=0xFFFF_FFFF)]
DigestText = Annotated[str, Meta(min_length=1, max_length=128)]
StateText = Annotated[str, Meta(min_length=1, max_length=32)]
Extra = Annotated[dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=1024)]], Meta(max_length=MAX_EXTRA)]

FINAL_STATES = frozenset({DownloadState.SUCCEEDED, DownloadState.FAILED, DownloadState.CANCELLED})
"""States after which a download sends no more progress; its last ``api.progress`` has one of them."""


class ApiErrorCode(IntEnum):
    """Error codes of the local API (range 1300-1399; the fabric's own codes stay below 1000)."""

    BAD_URL = 1300  # the URL is empty, too long, malformed, or lacks a host its scheme needs
    UNSUPPORTED_SCHEME = 1301  # no source backend serves the URL's scheme: the reason lists those that do
    BAD_OUTPUT = 1302  # the output path is not absolute (or holds a NUL character)
    BAD_DIGEST = 1303  # the expected digest is not sha256:<64 hex> or blake3:<64 hex>
    BAD_PIECE_LENGTH = 1304  # a fixed piece length that is not a power of two from 64 KiB to 64 MiB
    BAD_HEADER = 1305  # a header name that is not an HTTP token, or a value with CR, LF or NUL
    BAD_TIMEOUT = 1306  # a timeout that is not a positive number of milliseconds
    BAD_TENANT = 1307  # the request names another tenant than the daemon's (a download is in the daemon's tenant)
    UNKNOWN_DOWNLOAD = 1310  # `api.cancel` names a download this server does not run (any more)
    TOO_MANY_DOWNLOADS = 1311  # the session has as many downloads running as the server allows
    NOT_LISTABLE = 1320  # `api.list_source`: the URL's scheme has no listing (its backend cannot list)
    LISTING_FAILED = 1321  # `api.list_source`: the origin failed or refused the listing (the reason says how)
    BAD_LISTING = 1322  # `api.list_source`: the listing names an object outside the URL, or an unsafe path
    UNKNOWN_LISTING = 1323  # `api.list_source`: the cursor names a listing the server no longer holds


class ApiInputError(ValueError):
    """A download request that :func:`check_request` refuses; ``code`` is what the server answers."""

    def __init__(self, code: ApiErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- requests and their replies -------------------------------------------------------------------------


class ApiDownload(Message, tag="api.download"):
    """Start a download (or join one of the same task) and follow its progress. Answered by
    :class:`ApiDownloadStarted`; then the server pushes :class:`ApiProgress` for it to this session."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    url: Url
    output: Path | None = None
    """Absolute path of the file to produce; None to only fill the daemon's cache."""
    headers: Headers = []
    tag: ShortText = ""
    application: ShortText = ""
    tenant: ShortText = ""
    filtered_query_params: Annotated[list[ShortText], Meta(max_length=MAX_FILTERED_PARAMS)] | None = None
    """None: the default list of ``dfz/tasks.py``; a list replaces it."""
    digest: DigestText | None = None
    piece_length: PieceLength | None = None
    timeout_ms: TimeoutMs | None = None
    back_to_source: bool = True


class ApiDownloadStarted(Message, tag="api.download_started"):
    """Reply to :class:`ApiDownload`: the download's id (for ``api.cancel`` and in every progress push)."""

    KIND: ClassVar[Kind] = Kind.REPLY
    download_id: DownloadId
    task_id: TaskIdText


class ApiProgress(Message, tag="api.progress"):
    """Server push: the whole state of a download now (a snapshot). Throttled per download (the
    reference sends at most one every 100 ms); the one with a final state is always sent, last."""

    KIND: ClassVar[Kind] = Kind.SERVER_PUSH
    download_id: DownloadId
    task_id: TaskIdText
    state: StateText
    """``pending``, ``running``, ``succeeded``, ``failed`` or ``cancelled``; a state a client does not
    know is not final."""
    content_length: U63 | None = None
    piece_count: U32 | None = None
    pieces_done: U32 = 0
    bytes_done: U63 = 0
    bytes_from_peers: U63 = 0
    bytes_from_origin: U63 = 0
    bytes_from_cache: U63 = 0
    error: Text = ""
    error_kind: Annotated[str, Meta(max_length=64)] = ""


class ApiCancel(Message, tag="api.cancel"):
    """Stop following a download: the server closes its interest in it (the daemon may keep the task
    in its cache) and pushes a last ``api.progress`` with state ``cancelled`` to the session that
    started it. Answered by :class:`ApiCancelled`; ``UNKNOWN_DOWNLOAD`` when it has ended already."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    download_id: DownloadId


class ApiCancelled(Message, tag="api.cancelled"):
    KIND: ClassVar[Kind] = Kind.REPLY
    download_id: DownloadId


class ApiTask(msgspec.Struct, kw_only=True):
    """A task in the daemon's cache (:class:`dfz.peer.local.CachedTask`)."""

    task_id: TaskIdText
    url: Annotated[str, Meta(max_length=MAX_URL)]
    content_length: U63 | None = None
    complete: bool = False
    pieces_done: U32 = 0
    piece_count: U32 | None = None
    extra: Extra = {}


class ApiList(Message, tag="api.list"):
    """List the daemon's cached tasks in task-id order, one page at a time: those whose id sorts after
    ``after``, at most ``limit``, and fewer when the reply would grow past 48 KiB. Answered by
    :class:`ApiTasks`."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    after: Annotated[str, Meta(max_length=128)] = ""
    limit: Annotated[int, Meta(ge=1, le=MAX_TASKS_PER_PAGE)] = 100


class ApiTasks(Message, tag="api.tasks"):
    KIND: ClassVar[Kind] = Kind.REPLY
    tasks: Annotated[list[ApiTask], Meta(max_length=MAX_TASKS_PER_PAGE)] = []
    more: bool = False
    """More tasks follow: ask again with ``after`` = the last task id of this page."""


class ApiDelete(Message, tag="api.delete"):
    """Remove a task from the daemon's cache (the daemon tells the scheduler). Answered by :class:`ApiDeleted`."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    task_id: TaskIdText


class ApiDeleted(Message, tag="api.deleted"):
    KIND: ClassVar[Kind] = Kind.REPLY
    task_id: TaskIdText
    deleted: bool
    """False: the cache held no such task (deleting is idempotent)."""


class ApiListSource(Message, tag="api.list_source"):
    """List the objects below ``url`` (a directory or prefix) at the origin, with the daemon's source
    settings, for a recursive download. The first request (``cursor`` empty) lists; the server keeps the
    listing for the session a while and answers it page by page (:class:`ApiSourceListing`): ask again
    with the reply's ``cursor`` until it is empty."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    url: Url
    headers: Headers = []
    max_entries: Annotated[int, Meta(ge=1, le=MAX_LISTED)] = 10_000
    cursor: Annotated[str, Meta(max_length=128)] = ""


class ApiSourceEntry(msgspec.Struct, kw_only=True):
    """One object of a listing: its path below the listed URL, its URL and its size when known."""

    path: Path
    url: Url
    size: U63 | None = None


class ApiSourceListing(Message, tag="api.source_listing"):
    KIND: ClassVar[Kind] = Kind.REPLY
    entries: Annotated[list[ApiSourceEntry], Meta(max_length=MAX_ENTRIES_PER_PAGE)] = []
    total: Annotated[int, Meta(ge=0, le=MAX_LISTED)] = 0
    """Entries of the whole listing (at most ``max_entries``)."""
    truncated: bool = False
    """The origin holds more objects than ``max_entries``: the listing was cut."""
    cursor: Annotated[str, Meta(max_length=128)] = ""
    """Non-empty: more entries follow; ask with this cursor."""


API_TYPES: tuple[type[Message], ...] = (
    ApiDownload,
    ApiDownloadStarted,
    ApiProgress,
    ApiCancel,
    ApiCancelled,
    ApiList,
    ApiTasks,
    ApiDelete,
    ApiDeleted,
    ApiListSource,
    ApiSourceListing,
)

API_CATALOGUE = Catalogue(API_TYPES, max_payload=0)
"""What a local API server and its clients speak: the fabric's types and ``api.*``; no payload frames."""


# --- checks and conversions -----------------------------------------------------------------------------

_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""An HTTP field name is a token (RFC 9110 §5.1)."""
_BAD_VALUE_CHARS = ("\r", "\n", "\0")
_NEEDS_HOST = frozenset({"http", "https", "s3", "oci", "hdfs", "gs"})


def check_header(name: str, value: str) -> None:
    """Raise :class:`ApiInputError` (``BAD_HEADER``) unless ``name: value`` can go to an origin as it is."""
    if not _HEADER_NAME.fullmatch(name) or len(name) > 256:
        raise ApiInputError(
            ApiErrorCode.BAD_HEADER,
            f"header name {name[:64]!r} is not valid: use letters, digits and !#$%&'*+-.^_`|~ only (e.g. 'Authorization')",
        )
    if any(c in value for c in _BAD_VALUE_CHARS) or len(value) > 4096:
        raise ApiInputError(
            ApiErrorCode.BAD_HEADER,
            f"the value of header {name!r} contains a line break or NUL (or is over 4096 characters): give it on one line",
        )


def parse_header(text: str) -> tuple[str, str]:
    """``"Name: value"`` as ``(name, value)`` (surrounding blanks of the value removed), checked with
    :func:`check_header`; :class:`ApiInputError` when it has no ``:`` or fails the check."""
    name, colon, value = text.partition(":")
    if not colon or not name:
        raise ApiInputError(ApiErrorCode.BAD_HEADER, f"header {text[:64]!r} is not 'Name: value'")
    value = value.strip(" \t")
    check_header(name, value)
    return name, value


def check_url(url: str, schemes: Iterable[str]) -> None:
    """Raise :class:`ApiInputError` (``BAD_URL``, ``UNSUPPORTED_SCHEME``) unless ``url`` is one the daemon
    can fetch: not empty, within bounds, parseable, of a supported scheme, with a host when it needs one."""
    supported = sorted(s.lower() for s in schemes)
    if not url or len(url) > MAX_URL or any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in url):
        raise ApiInputError(
            ApiErrorCode.BAD_URL, f"URL {url[:80]!r} is empty, over {MAX_URL} characters, or has spaces or control characters"
        )
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as e:
        raise ApiInputError(ApiErrorCode.BAD_URL, f"URL {url[:80]!r} is malformed: {e}") from None
    if scheme not in supported:
        what = f"scheme {scheme!r} is not supported" if scheme else "the URL has no scheme"
        raise ApiInputError(
            ApiErrorCode.UNSUPPORTED_SCHEME, f"cannot download {url[:80]!r}: {what}; supported schemes: {', '.join(supported)}"
        )
    if scheme in _NEEDS_HOST and not host:
        raise ApiInputError(ApiErrorCode.BAD_URL, f"URL {url[:80]!r} has no host (expected {scheme}://HOST/...)")


def check_request(request: DownloadRequest, schemes: Iterable[str]) -> DownloadRequest:
    """Check everything about ``request`` that the wire schema cannot, and return it with its digest
    normalised. ``schemes`` are the URL schemes the daemon can fetch from (its source registry's).
    Raises :class:`ApiInputError` whose message says what is wrong and what is expected."""
    check_url(request.url, schemes)
    output = request.output
    if output is not None and (not os.path.isabs(output) or "\0" in output or len(output) > MAX_PATH):
        raise ApiInputError(
            ApiErrorCode.BAD_OUTPUT,
            f"output {output[:80]!r} is not an absolute path: the daemon does not know your working directory",
        )
    digest = request.digest
    if digest is not None:
        try:
            digest = str(Digest.parse(digest))
        except DigestFormatError as e:
            raise ApiInputError(ApiErrorCode.BAD_DIGEST, str(e)) from None
    if request.piece_length is not None:
        try:
            validate_piece_length(request.piece_length)
        except InvalidPieceLength as e:
            raise ApiInputError(ApiErrorCode.BAD_PIECE_LENGTH, str(e)) from None
    if len(request.headers) > MAX_HEADERS:
        raise ApiInputError(ApiErrorCode.BAD_HEADER, f"{len(request.headers)} headers: at most {MAX_HEADERS} are allowed")
    for name, value in request.headers:
        check_header(name, value)
    if request.timeout is not None and not 0 < request.timeout <= 0xFFFF_FFFF / 1000:
        raise ApiInputError(ApiErrorCode.BAD_TIMEOUT, f"timeout {request.timeout!r} is not a positive number of seconds")
    for what, text in (("tag", request.tag), ("application", request.application), ("tenant", request.tenant)):
        if len(text) > 256:
            raise ApiInputError(ApiErrorCode.BAD_URL, f"{what} is over 256 characters")
    if request.filtered_query_params is not None and (
        len(request.filtered_query_params) > MAX_FILTERED_PARAMS or any(len(p) > 256 for p in request.filtered_query_params)
    ):
        raise ApiInputError(
            ApiErrorCode.BAD_URL, f"at most {MAX_FILTERED_PARAMS} filtered query parameters of 256 characters each"
        )
    if digest == request.digest:
        return request
    return DownloadRequest(
        url=request.url,
        output=request.output,
        headers=request.headers,
        tag=request.tag,
        application=request.application,
        tenant=request.tenant,
        filtered_query_params=request.filtered_query_params,
        digest=digest,
        piece_length=request.piece_length,
        timeout=request.timeout,
        back_to_source=request.back_to_source,
    )


def request_to_wire(request: DownloadRequest) -> ApiDownload:
    return ApiDownload(
        url=request.url,
        output=request.output,
        headers=[(name, value) for name, value in request.headers],
        tag=request.tag,
        application=request.application,
        tenant=request.tenant,
        filtered_query_params=None if request.filtered_query_params is None else list(request.filtered_query_params),
        digest=request.digest,
        piece_length=request.piece_length,
        timeout_ms=None if request.timeout is None else max(1, round(request.timeout * 1000)),
        back_to_source=request.back_to_source,
    )


def request_from_wire(msg: ApiDownload) -> DownloadRequest:
    return DownloadRequest(
        url=msg.url,
        output=msg.output,
        headers=tuple((name, value) for name, value in msg.headers),
        tag=msg.tag,
        application=msg.application,
        tenant=msg.tenant,
        filtered_query_params=None if msg.filtered_query_params is None else tuple(msg.filtered_query_params),
        digest=msg.digest,
        piece_length=msg.piece_length,
        timeout=None if msg.timeout_ms is None else msg.timeout_ms / 1000,
        back_to_source=msg.back_to_source,
    )


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _u63(n: int | None) -> int | None:
    return None if n is None else min(max(n, 0), 2**63 - 1)


def _u32(n: int | None) -> int | None:
    return None if n is None else min(max(n, 0), 0xFFFF_FFFF)


def progress_to_wire(download_id: str, progress: Progress) -> ApiProgress:
    """The push for ``progress``, with every value brought within its wire bound (the encoder does not
    check bounds; a client would drop a push that breaks one)."""
    return ApiProgress(
        download_id=download_id,
        task_id=_clip(progress.task_id, 128) or "-",
        state=str(progress.state),
        content_length=_u63(progress.content_length),
        piece_count=_u32(progress.piece_count),
        pieces_done=_u32(progress.pieces_done) or 0,
        bytes_done=_u63(progress.bytes_done) or 0,
        bytes_from_peers=_u63(progress.bytes_from_peers) or 0,
        bytes_from_origin=_u63(progress.bytes_from_origin) or 0,
        bytes_from_cache=_u63(progress.bytes_from_cache) or 0,
        error=_clip(progress.error, 4096),
        error_kind=_clip(progress.error_kind, 64),
    )


def progress_from_wire(msg: ApiProgress) -> Progress:
    try:
        state = DownloadState(msg.state)
    except ValueError:
        state = DownloadState.RUNNING  # a state this client does not know is not final
    return Progress(
        task_id=msg.task_id,
        state=state,
        content_length=msg.content_length,
        piece_count=msg.piece_count,
        pieces_done=msg.pieces_done,
        bytes_done=msg.bytes_done,
        bytes_from_peers=msg.bytes_from_peers,
        bytes_from_origin=msg.bytes_from_origin,
        bytes_from_cache=msg.bytes_from_cache,
        error=msg.error,
        error_kind=msg.error_kind,
    )


def task_to_wire(task: CachedTask) -> ApiTask:
    extra = {_clip(k, 64): _clip(v, 1024) for k, v in list(task.extra.items())[:MAX_EXTRA]}
    return ApiTask(
        task_id=_clip(task.task_id, 128) or "-",
        url=_clip(task.url, MAX_URL),
        content_length=_u63(task.content_length),
        complete=task.complete,
        pieces_done=_u32(task.pieces_done) or 0,
        piece_count=_u32(task.piece_count),
        extra=extra,
    )


def task_from_wire(task: ApiTask) -> CachedTask:
    return CachedTask(
        task_id=task.task_id,
        url=task.url,
        content_length=task.content_length,
        complete=task.complete,
        pieces_done=task.pieces_done,
        piece_count=task.piece_count,
        extra=dict(task.extra),
    )
