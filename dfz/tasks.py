"""Tasks and pieces: the task-id rule, the piece-length rule, the piece layout and the digest rules.

Every peer, the scheduler and the CLI use these rules from here and nowhere else; ``protocol.md`` quotes
them. This file does no I/O.

Task id
    ``task_id = sha256(F).hexdigest()`` (64 lowercase hex digits), where ``F`` is the concatenation, in
    this order, of six fields, each written as its length in bytes (8-byte unsigned big-endian) followed
    by its bytes::

        1. the domain tag   "dfz-task-v1" (ASCII)
        2. the canonical URL (UTF-8, see below)
        3. the tag           (UTF-8, "" when none)
        4. the application   (UTF-8, "" when none)
        5. the tenant        (UTF-8, "" when none)
        6. the piece length  (ASCII decimal, no sign or leading zeros; "" unless a fixed length was asked for)

    The length prefixes make the encoding injective: no two different field tuples give the same ``F``.
    Request headers, the user's ``--digest`` and the filter list itself are not part of the id; two
    downloads of one URL that differ only in those share a task (each still verifies its own digest).

Task id of content named by its digest
    A download that names its content by the content's own digest (a registry blob through the mirror:
    ``/v2/NAME/blobs/sha256:HEX``) may ask for a task id that does not depend on the URL, so that the
    same bytes reached through any repository, tag, mirror path or upstream registry are one task and one
    swarm (:func:`digest_task_id`). It is the rule above with the domain tag ``"dfz-digest-task-v1"``
    and, as field 2, the digest in its normal form ``<algorithm>:<64 lowercase hex digits>``
    (:class:`Digest`) instead of the canonical URL. The other fields (tag, application, tenant, piece
    length) are the same, so tenants stay apart. The other domain tag keeps these ids apart from every
    URL's. Such a download must check its content against that digest (the daemon does).

Canonical URL
    1. Everything from the first ``#`` on (the fragment, never sent to an origin) is removed.
    2. The text before the first ``:`` (the scheme) is lowercased when it is a valid RFC 3986 scheme.
       Nothing else is normalised (host case, ports, percent-encoding and path are kept as given: for
       ``hf://`` or ``s3://`` the "host" may be case-sensitive, and a false merge would be a wrong file).
    3. The query (after the first ``?``) is split on ``&``. Empty components are dropped. A component's
       *name* is the text before its first ``=`` (all of it when there is none), decoded like a form
       field (``+`` is a space, then ``%XX`` escapes) and lowercased. A component whose name equals a
       filtered name (also lowercased, surrounding whitespace stripped) is dropped. The other
       components are kept verbatim, in their order, joined with ``&``.
    4. The URL is the part before ``?``, then ``?`` and the kept components if any remain.

    The filtered names are a configurable list; the caller's list replaces
    :data:`DEFAULT_FILTERED_QUERY_PARAMS` (pass ``DEFAULT_FILTERED_QUERY_PARAMS + extra`` to extend it).
    The defaults remove the parameters of pre-signed URLs (S3 SigV2 and SigV4, GCS V4, Azure SAS, Aliyun
    OSS) and containerd's ``ns``. Caution: Azure's short names (``sv``, ``sp``, ``st``, ``se`` ...) are
    filtered on every URL; an origin that uses them for something else needs its own list.

Piece length
    With a fixed piece length asked for: it must be a power of two from 64 KiB to 64 MiB
    (:func:`validate_piece_length`). 64 MiB is also the most the automatic rule picks and the fabric's
    default ``max_payload`` (``MAXMSGSIZE`` is that plus 64 KiB), so one piece always fits one payload
    frame, and a handful of pieces in flight stays within a daemon's memory budget.

    Otherwise, with the content length ``L`` known (Dragonfly's rule): ``p = L // 500``, rounded up to a
    power of two (``0`` and ``1`` give ``1``), then clamped to 4 MiB..64 MiB. So files of up to
    2,097,152,499 bytes have 4 MiB pieces (at most 501 of them), 8 MiB starts at 2,097,152,500 bytes,
    and 64 MiB at 16,777,216,500 bytes; between the clamps a file has 251 to 501 pieces.

    With the content length unknown (an origin that sends no Content-Length): 4 MiB. The stream is cut
    into consecutive pieces of exactly the piece length; when it ends after ``L`` bytes the layout is
    that of a known length ``L``: ``ceil(L / piece_length)`` pieces, the last one holding the remainder.
    A stream that ends on a piece boundary has no empty trailing piece; an empty stream has no pieces.

    The piece length is chosen once per task, by the peer that fetches from the origin, with this rule;
    the scheduler records it and every other peer takes it from there.

Piece layout
    Piece ``i`` (``0 <= i < count``) holds bytes ``[i * piece_length, min((i + 1) * piece_length, L))``;
    ``count = ceil(L / piece_length)`` (0 for an empty file); all pieces are full except possibly the last.
    A task has at most 2**20 pieces (:data:`MAX_PIECES`); a fixed piece length that gives more is refused.

Swarm or not
    An empty file or a tiny one (``L <= 128`` bytes) needs no swarm (:func:`needs_swarm`): fetching it
    from the origin or carrying it in a reply costs less than scheduling it. Unknown length needs one.

Digests
    A piece digest is the BLAKE3 hash (32 bytes, default mode, unkeyed) of the piece's bytes, as 64
    lowercase hex digits. The whole-file digest is the BLAKE3 hash of the whole content (what ``b3sum``
    prints), computed incrementally in piece order. A user's expected digest is ``<algorithm>:<hex>`` with
    algorithm ``sha256`` or ``blake3`` (lowercase or not) and exactly 64 hex digits (either case,
    normalised to lowercase), surrounding whitespace ignored; anything else is :class:`DigestFormatError`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol
from urllib.parse import unquote_plus

import blake3

KiB = 1024
MiB = 1024 * KiB

# --- task id ---------------------------------------------------------------------------------------------

TASK_ID_DOMAIN = "dfz-task-v1"
"""The first field of every task id's hash input; a new rule gets a new tag."""
DIGEST_TASK_ID_DOMAIN = "dfz-digest-task-v1"
"""The first field of the hash input of a task named by its content's digest (:func:`digest_task_id`)."""

_S3 = (
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
    "AWSAccessKeyId",
    "Signature",
    "Expires",
)
_GCS = (
    "X-Goog-Algorithm",
    "X-Goog-Credential",
    "X-Goog-Date",
    "X-Goog-Expires",
    "X-Goog-SignedHeaders",
    "X-Goog-Signature",
    "GoogleAccessId",
)
_AZURE_SAS = ("sv", "ss", "srt", "sp", "se", "st", "spr", "sig", "sr", "skoid", "sktid", "skt", "ske", "sks", "skv")
_ALIYUN_OSS = ("OSSAccessKeyId", "Expires", "Signature")
_CONTAINERD = ("ns",)

DEFAULT_FILTERED_QUERY_PARAMS: tuple[str, ...] = tuple(dict.fromkeys((*_S3, *_GCS, *_AZURE_SAS, *_ALIYUN_OSS, *_CONTAINERD)))
"""Query parameters removed from a URL before it is hashed into a task id (names compared case-insensitively)."""

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def canonical_url(url: str, filtered_query_params: Iterable[str] = DEFAULT_FILTERED_QUERY_PARAMS) -> str:
    """The URL as it enters the task id: fragment removed, scheme lowercased, filtered query parameters
    removed (names matched case-insensitively), the other parameters kept verbatim and in order."""
    filtered = {name.strip().lower() for name in filtered_query_params}
    url = url.partition("#")[0]
    base, _, query = url.partition("?")
    scheme, colon, rest = base.partition(":")
    if colon and _SCHEME.fullmatch(scheme):
        base = scheme.lower() + ":" + rest
    kept = [part for part in query.split("&") if part and unquote_plus(part.partition("=")[0]).lower() not in filtered]
    return base + "?" + "&".join(kept) if kept else base


def task_id(
    url: str,
    *,
    tag: str = "",
    application: str = "",
    tenant: str = "",
    piece_length: int | None = None,
    filtered_query_params: Iterable[str] = DEFAULT_FILTERED_QUERY_PARAMS,
) -> str:
    """The task id of a download (64 lowercase hex digits); see the module docstring for the exact rule.

    ``piece_length`` is the fixed piece length the user asked for, if any; it is validated
    (:class:`InvalidPieceLength`) because it becomes part of the id.
    """
    fixed = "" if piece_length is None else str(validate_piece_length(piece_length))
    return _hash_fields((TASK_ID_DOMAIN, canonical_url(url, filtered_query_params), tag, application, tenant, fixed))


def digest_task_id(
    digest: str, *, tag: str = "", application: str = "", tenant: str = "", piece_length: int | None = None
) -> str:
    """The task id of content named by its own digest (``sha256:<hex>`` or ``blake3:<hex>``, parsed with
    :meth:`Digest.parse`, so :class:`DigestFormatError` when malformed); see the module docstring."""
    fixed = "" if piece_length is None else str(validate_piece_length(piece_length))
    return _hash_fields((DIGEST_TASK_ID_DOMAIN, str(Digest.parse(digest)), tag, application, tenant, fixed))


def _hash_fields(fields: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for field in fields:
        raw = field.encode("utf-8")
        h.update(len(raw).to_bytes(8, "big"))
        h.update(raw)
    return h.hexdigest()


def is_task_id(text: str) -> bool:
    """True when ``text`` has the form of a task id (64 lowercase hex digits). Task ids name directories
    and arrive from the wire, so everyone checks them with this before use."""
    return _HEX64.fullmatch(text) is not None


# --- piece length and layout ---------------------------------------------------------------------------

MIN_PIECE_LENGTH = 4 * MiB
"""Smallest piece length the automatic rule picks, and the piece length of a stream of unknown length."""

MAX_PIECE_LENGTH = 64 * MiB
"""Largest piece length, automatic or asked for: one piece must fit one fabric message."""

MIN_FIXED_PIECE_LENGTH = 64 * KiB
"""Smallest piece length a user may ask for; below it per-piece overhead dominates."""

PIECES_TARGET = 500
"""The automatic rule aims at about this many pieces (Dragonfly's divisor)."""

UNKNOWN_LENGTH_PIECE_LENGTH = MIN_PIECE_LENGTH

MAX_PIECES = 2**20
"""Most pieces of one task. The automatic rule stays below it up to 64 TiB; a fixed 64 KiB piece length
reaches it at 64 GiB. It bounds a task's metadata and piece bitmap (about 70 MiB of digests)."""

TINY_FILE_LIMIT = 128
"""Files of at most this many bytes need no swarm."""


class InvalidPieceLength(ValueError):
    """A piece length that is not a power of two between 64 KiB and 64 MiB."""


def validate_piece_length(piece_length: int) -> int:
    """Return ``piece_length`` if it is a power of two from 64 KiB to 64 MiB, else raise :class:`InvalidPieceLength`."""
    if (
        not isinstance(piece_length, int)
        or isinstance(piece_length, bool)
        or not MIN_FIXED_PIECE_LENGTH <= piece_length <= MAX_PIECE_LENGTH
        or piece_length & (piece_length - 1)
    ):
        raise InvalidPieceLength(
            f"piece length {piece_length!r} is not allowed: use a power of two from {MIN_FIXED_PIECE_LENGTH} "
            f"(64 KiB) to {MAX_PIECE_LENGTH} (64 MiB), or leave it out to have one chosen from the file's size"
        )
    return piece_length


def piece_length_for(content_length: int | None, fixed: int | None = None) -> int:
    """The piece length of a task: ``fixed`` if given (validated), else Dragonfly's rule on
    ``content_length``, else (length unknown) :data:`UNKNOWN_LENGTH_PIECE_LENGTH`."""
    if fixed is not None:
        return validate_piece_length(fixed)
    if content_length is None:
        return UNKNOWN_LENGTH_PIECE_LENGTH
    _check_content_length(content_length)
    raw = content_length // PIECES_TARGET
    power = 1 if raw <= 1 else 1 << (raw - 1).bit_length()
    return min(max(power, MIN_PIECE_LENGTH), MAX_PIECE_LENGTH)


def _check_content_length(content_length: int) -> None:
    if not isinstance(content_length, int) or isinstance(content_length, bool) or content_length < 0:
        raise ValueError(f"content length must be a non-negative integer, got {content_length!r}")


def piece_count(content_length: int, piece_length: int) -> int:
    """``ceil(content_length / piece_length)``: 0 for an empty file."""
    _check_content_length(content_length)
    return -(-content_length // piece_length)


def needs_swarm(content_length: int | None) -> bool:
    """False for an empty or tiny file (at most :data:`TINY_FILE_LIMIT` bytes); True otherwise,
    including when the length is unknown."""
    return content_length is None or content_length > TINY_FILE_LIMIT


@dataclass(frozen=True, slots=True)
class PieceLayout:
    """How a content of ``content_length`` bytes is cut into pieces of ``piece_length`` bytes."""

    content_length: int
    piece_length: int

    def __post_init__(self) -> None:
        _check_content_length(self.content_length)
        validate_piece_length(self.piece_length)
        if self.count > MAX_PIECES:
            raise InvalidPieceLength(
                f"{self.content_length} bytes in pieces of {self.piece_length} bytes are more than {MAX_PIECES} "
                "pieces: use a larger piece length"
            )

    @classmethod
    def for_content(cls, content_length: int, fixed_piece_length: int | None = None) -> PieceLayout:
        """The layout with the piece length from :func:`piece_length_for`."""
        return cls(content_length, piece_length_for(content_length, fixed_piece_length))

    @property
    def count(self) -> int:
        return piece_count(self.content_length, self.piece_length)

    @property
    def last_size(self) -> int:
        """Size of the last piece (0 when there are no pieces)."""
        return 0 if self.count == 0 else self.content_length - (self.count - 1) * self.piece_length

    def _check(self, index: int) -> None:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < self.count:
            raise IndexError(f"piece index {index!r} out of range: the content has {self.count} pieces")

    def offset(self, index: int) -> int:
        """Offset in the content of the first byte of piece ``index``."""
        self._check(index)
        return index * self.piece_length

    def size(self, index: int) -> int:
        """Number of bytes in piece ``index``."""
        self._check(index)
        return min(self.piece_length, self.content_length - index * self.piece_length)

    def span(self, index: int) -> tuple[int, int]:
        """``(start, end)`` of piece ``index``: bytes ``start <= b < end`` (an HTTP Range is ``start-(end-1)``)."""
        start = self.offset(index)
        return start, start + self.size(index)


# --- digests ---------------------------------------------------------------------------------------------

BytesLike = bytes | bytearray | memoryview


class Hasher(Protocol):
    """What hashlib's and blake3's hash objects have in common."""

    def update(self, data: BytesLike, /) -> object: ...

    def hexdigest(self) -> str: ...


def piece_digest(data: BytesLike) -> str:
    """The BLAKE3 digest of a piece, 64 lowercase hex digits. Releases the GIL: run it in a thread."""
    return blake3.blake3(data).hexdigest()


def content_hasher() -> blake3.blake3:
    """A fresh hasher for the whole-file digest: feed it the pieces in index order, then ``hexdigest()``."""
    return blake3.blake3()


def is_hex_digest(text: str) -> bool:
    """True for 64 lowercase hex digits (a piece digest, a whole-file digest or a task id)."""
    return _HEX64.fullmatch(text) is not None


class DigestAlgorithm(StrEnum):
    SHA256 = "sha256"
    BLAKE3 = "blake3"

    def hasher(self) -> Hasher:
        if self is DigestAlgorithm.SHA256:
            return hashlib.sha256()
        return blake3.blake3()


class DigestFormatError(ValueError):
    """A digest string that is not ``sha256:<64 hex digits>`` or ``blake3:<64 hex digits>``."""


class DigestMismatch(Exception):
    """Bytes whose digest is not the expected one. ``what`` names them (a piece, a file)."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"{what}: digest mismatch: expected {expected}, got {actual}")
        self.what = what
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True, slots=True)
class Digest:
    """An expected digest of a whole content, as a user gives it (``--digest sha256:<hex>``)."""

    algorithm: DigestAlgorithm
    hex: str

    def __post_init__(self) -> None:
        if not is_hex_digest(self.hex):
            raise DigestFormatError(f"digest value {self.hex!r} is not 64 lowercase hex digits")

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``<algorithm>:<hex>``; raise :class:`DigestFormatError` saying what is expected."""
        algorithm, colon, value = text.strip().partition(":")
        expected = "expected 'sha256:<64 hex digits>' or 'blake3:<64 hex digits>'"
        if not colon:
            raise DigestFormatError(f"malformed digest {text!r}: no ':' between algorithm and value; {expected}")
        try:
            algo = DigestAlgorithm(algorithm.lower())
        except ValueError:
            raise DigestFormatError(f"unsupported digest algorithm {algorithm!r} in {text!r}; {expected}") from None
        if not re.fullmatch(r"[0-9A-Fa-f]{64}", value):
            raise DigestFormatError(f"malformed digest value in {text!r}: {len(value)} characters; {expected}")
        return cls(algo, value.lower())

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> Hasher:
        return self.algorithm.hasher()

    def check(self, actual_hex: str, what: str) -> None:
        """Raise :class:`DigestMismatch` unless ``actual_hex`` (from :meth:`hasher`) is this digest."""
        if actual_hex.lower() != self.hex:
            raise DigestMismatch(what, str(self), f"{self.algorithm}:{actual_hex.lower()}")
