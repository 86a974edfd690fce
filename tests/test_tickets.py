"""Tenant tickets (dfz/tickets.py): what the manager signs, and every way a verifier refuses one."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dfz.tickets import (
    CLOCK_SKEW,
    SIGNATURE_BYTES,
    SIGNING_DOMAIN,
    TicketError,
    TicketSigner,
    TicketVerifier,
    expired,
    parse_public_key,
)

NOW = 1_800_000_000.0


def issue(signer: TicketSigner, host: str = "host-a", ttl: float = 600, now: float = NOW) -> bytes:
    return signer.issue(tenant="7", tenant_name="acme", host_id=host, now=now, ttl=ttl)


def refusal(verifier: TicketVerifier, ticket: bytes, **kw: object) -> str:
    with pytest.raises(TicketError) as e:
        verifier.verify(ticket, now=kw.pop("now", NOW), **kw)  # type: ignore[arg-type]
    return e.value.kind


def test_a_ticket_verifies_with_its_managers_key() -> None:
    signer = TicketSigner.generate()
    ticket = issue(signer)
    got = TicketVerifier([signer.public_key]).verify(ticket, now=NOW + 10, host_id="host-a")
    assert (got.tenant, got.tenant_name, got.host_id, got.expires_at - got.issued_at) == ("7", "acme", "host-a", 600)
    assert not expired(got, NOW + 600)
    assert expired(got, NOW + 600 + CLOCK_SKEW + 1)


def test_every_bad_ticket_is_refused_with_its_kind() -> None:
    signer, other = TicketSigner.generate(), TicketSigner.generate()
    verifier = TicketVerifier([signer.public_key])
    good = issue(signer)
    assert refusal(TicketVerifier(), good) == "no_key"
    assert refusal(verifier, issue(other)) == "signature"
    assert refusal(verifier, good[:-1] + bytes([good[-1] ^ 1])) == "signature"
    assert refusal(verifier, bytes([good[0] ^ 1]) + good[1:]) == "signature"
    assert refusal(verifier, b"") == "malformed"
    assert refusal(verifier, b"x" * SIGNATURE_BYTES) == "malformed"
    assert refusal(verifier, b"x" * 2000) == "malformed"
    assert refusal(verifier, good, now=NOW + 600 + CLOCK_SKEW + 1) == "expired"
    assert refusal(verifier, good, now=NOW - CLOCK_SKEW - 5) == "not_yet_valid"
    assert refusal(verifier, good, host_id="host-b") == "wrong_host"
    # Claims signed by the right key but not claims: refused after the signature, as malformed.
    private = signer._private
    for body in (b"\xc1", msgspec.msgpack.encode({"v": 1}), msgspec.msgpack.encode([1, 2, 3])):
        forged = body + private.sign(SIGNING_DOMAIN + body)
        assert refusal(verifier, forged) == "malformed"
    wrong_version = msgspec.msgpack.encode({"v": 2, "tenant": "7", "host": "h", "iat": int(NOW), "exp": int(NOW) + 5})
    assert refusal(verifier, wrong_version + private.sign(SIGNING_DOMAIN + wrong_version)) == "malformed"
    # A signature over the claims without the domain (a signature made for something else) does not verify.
    body = good[:-SIGNATURE_BYTES]
    assert refusal(verifier, body + private.sign(body)) == "signature"


def test_several_trusted_keys() -> None:
    a, b = TicketSigner.generate(), TicketSigner.generate()
    verifier = TicketVerifier([a.public_key])
    assert verifier.trust(b.public_key) and not verifier.trust(b.public_key)
    assert verifier.verify(issue(b), now=NOW).tenant == "7"
    with pytest.raises(ValueError):
        verifier.trust(b"short")


def test_the_key_file_is_made_once_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "mgr" / "ticket.key"
    first = TicketSigner.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = TicketSigner.load_or_create(path)
    assert again.public_key == first.public_key
    path.write_text("not a key")
    with pytest.raises(ValueError):
        TicketSigner.load_or_create(path)
    assert parse_public_key(first.public_key.hex()) == first.public_key
    for text in ("zz", "ab" * 31, "ab" * 33):
        with pytest.raises(ValueError):
            parse_public_key(text)


@given(st.binary(max_size=1200))
def test_random_bytes_never_crash_the_verifier(data: bytes) -> None:
    verifier = TicketVerifier([TicketSigner.generate().public_key])
    with pytest.raises(TicketError):
        verifier.verify(data, now=NOW)
