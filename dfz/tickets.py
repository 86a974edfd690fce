"""Tenant tickets: how a daemon proves its tenant to schedulers and to other daemons' piece servers.

A daemon joins a tenant with a *daemon token* the manager issued (``/api/v1/daemon-tokens``). It shows the
token to the manager only (``mgr.register``); the manager answers with a **ticket**: a short statement,
signed with the manager's Ed25519 key, that says "host H is in tenant T until E". Schedulers and piece
servers check the signature with the manager's public key (which they get over their own manager session,
or from their configuration), so they need neither the token nor the database, and a daemon cannot claim a
tenant it was not given. ``protocol.md`` §17.10 is the normative description; this module is the
reference.

Wire form (``bytes``, at most :data:`MAX_TICKET_BYTES`): the claims, a MessagePack map, followed by the
64-byte Ed25519 signature of :data:`SIGNING_DOMAIN` + the claims. The claims:

======== ============== =====================================================================================
``v``    uint           1
``tenant`` str 1..64    the tenant, as task ids (§13) and the scheduler compare it (the manager: its row id)
``name`` str ≤255       the tenant's name, for logs
``host`` str 1..128     the host id the ticket was issued to
``iat``  uint           issued at (Unix seconds)
``exp``  uint           expires at (Unix seconds), after ``iat``
======== ============== =====================================================================================

Checks, in :meth:`TicketVerifier.verify`: the length, the signature against every trusted key, the claims'
types and bounds, ``v``, the host id, and the time (``iat`` at most :data:`CLOCK_SKEW` in the future,
``exp`` at most :data:`CLOCK_SKEW` in the past: the manager's and the verifier's clocks may differ a
little). Every failure is a :class:`TicketError` with a short ``kind`` (for counters) and a reason that
never contains the ticket itself.

No I/O here but :meth:`TicketSigner.load_or_create` (the manager's key file); time is passed in.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from msgspec import Meta

SIGNING_DOMAIN = b"dfz-tenant-ticket-v1\x00"
"""Prefixed to the claims before signing, so that a signature made for anything else never verifies."""
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
MAX_TICKET_BYTES = 1024
"""Largest ticket accepted (the claims take about 100-500 bytes)."""
CLOCK_SKEW = 30.0
"""Seconds the clocks of the manager and of a verifier may differ."""
TICKET_VERSION = 1


class TicketError(ValueError):
    """A ticket that cannot be accepted. ``kind``: ``malformed``, ``signature`` (no trusted key signed
    it), ``expired``, ``not_yet_valid``, ``wrong_host``, ``no_key`` (nothing to verify it with)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class _Claims(msgspec.Struct, forbid_unknown_fields=False):
    v: Annotated[int, Meta(ge=0, le=255)]
    tenant: Annotated[str, Meta(min_length=1, max_length=64)]
    host: Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[!-~]+$")]
    iat: Annotated[int, Meta(ge=0, le=2**63 - 1)]
    exp: Annotated[int, Meta(ge=0, le=2**63 - 1)]
    name: Annotated[str, Meta(max_length=255)] = ""


_decode_claims = msgspec.msgpack.Decoder(_Claims).decode
_encode = msgspec.msgpack.Encoder().encode


@dataclass(frozen=True, slots=True)
class Ticket:
    """A verified ticket's claims."""

    tenant: str
    tenant_name: str
    host_id: str
    issued_at: int
    expires_at: int


def public_key_hex(key: bytes) -> str:
    return key.hex()


def parse_public_key(text: str) -> bytes:
    """A public key from its 64 hex digits (how configurations and ``dfz mgr`` write it); ``ValueError``
    otherwise."""
    text = text.strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"a ticket key is {2 * PUBLIC_KEY_BYTES} hex digits, got {text[:80]!r}") from None
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"a ticket key is {2 * PUBLIC_KEY_BYTES} hex digits, got {len(text)} characters")
    return raw


class TicketSigner:
    """The manager's signing key. ``public_key`` (32 bytes) is what verifiers are given."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_key = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @classmethod
    def generate(cls) -> TicketSigner:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> TicketSigner:
        """The key in ``path`` (PKCS#8 PEM); made on first use, with mode 0600 (its directory 0700 when it
        is made here). ``ValueError`` for a file that is not such a key, ``OSError`` when it cannot be read
        or written."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            signer = cls.generate()
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            pem = signer._private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            tmp = path.with_name(path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # never replaces a key another manager made meanwhile
            except FileExistsError:
                os.unlink(tmp)
                return cls.load_or_create(path)
            os.unlink(tmp)
            return signer
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: not an unencrypted PEM private key ({e})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return cls(key)

    def issue(self, *, tenant: str, tenant_name: str, host_id: str, now: float, ttl: float) -> bytes:
        """A ticket for ``host_id`` in ``tenant``, valid from ``now`` for ``ttl`` seconds."""
        issued = int(now)
        claims = _Claims(
            v=TICKET_VERSION, tenant=tenant, host=host_id, iat=issued, exp=issued + max(1, int(ttl)), name=tenant_name[:255]
        )
        body = _encode(claims)
        return body + self._private.sign(SIGNING_DOMAIN + body)


class TicketVerifier:
    """Checks tickets against a set of trusted manager keys (every one that a process was configured with
    or told by its manager; several managers sharing a database may each have their own)."""

    def __init__(self, keys: Iterable[bytes] = ()) -> None:
        self._keys: dict[bytes, Ed25519PublicKey] = {}
        for key in keys:
            self.trust(key)

    def trust(self, key: bytes) -> bool:
        """Trust ``key`` (32 raw bytes) from now on; False when it was trusted already. ``ValueError`` for
        bytes that are not a key."""
        if key in self._keys:
            return False
        if len(key) != PUBLIC_KEY_BYTES:
            raise ValueError(f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, not {len(key)}")
        self._keys[bytes(key)] = Ed25519PublicKey.from_public_bytes(key)
        return True

    @property
    def keys(self) -> list[bytes]:
        return list(self._keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def verify(self, ticket: bytes, *, now: float, host_id: str | None = None) -> Ticket:
        """The claims of ``ticket`` if a trusted key signed it, it is valid at ``now`` and (when
        ``host_id`` is given) it was issued to that host; :class:`TicketError` otherwise."""
        if not self._keys:
            raise TicketError("no_key", "this process has no manager key to verify tenant tickets with")
        if not SIGNATURE_BYTES < len(ticket) <= MAX_TICKET_BYTES:
            raise TicketError("malformed", f"a ticket has {SIGNATURE_BYTES + 1} to {MAX_TICKET_BYTES} bytes, not {len(ticket)}")
        body, signature = bytes(ticket[:-SIGNATURE_BYTES]), bytes(ticket[-SIGNATURE_BYTES:])
        signed = SIGNING_DOMAIN + body
        for key in self._keys.values():
            try:
                key.verify(signature, signed)
                break
            except InvalidSignature:
                continue
        else:
            raise TicketError("signature", "the ticket is not signed by a manager this process trusts")
        try:
            claims = _decode_claims(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise TicketError("malformed", f"the ticket's claims are malformed: {e}") from None
        if claims.v != TICKET_VERSION:
            raise TicketError("malformed", f"ticket version {claims.v} is not {TICKET_VERSION}")
        if claims.exp <= claims.iat:
            raise TicketError("malformed", "the ticket expires before it was issued")
        if claims.iat > now + CLOCK_SKEW:
            raise TicketError("not_yet_valid", f"the ticket was issued {claims.iat - now:.0f} s in the future")
        if claims.exp < now - CLOCK_SKEW:
            raise TicketError("expired", f"the ticket of host {claims.host} expired {now - claims.exp:.0f} s ago")
        if host_id is not None and claims.host != host_id:
            raise TicketError("wrong_host", f"the ticket was issued to host {claims.host!r}, not {host_id!r}")
        return Ticket(claims.tenant, claims.name, claims.host, claims.iat, claims.exp)


def expired(ticket: Ticket, now: float) -> bool:
    """Whether a ticket accepted earlier has expired by ``now`` (with the same allowance for clocks)."""
    return ticket.expires_at < now - CLOCK_SKEW
