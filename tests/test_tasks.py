"""Exact tests of the rules in dfz/tasks.py: task id, canonical URL, piece length and layout, digests."""

from __future__ import annotations

import hashlib

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dfz.tasks import (
    DEFAULT_FILTERED_QUERY_PARAMS,
    MAX_PIECE_LENGTH,
    MAX_PIECES,
    MIN_FIXED_PIECE_LENGTH,
    MIN_PIECE_LENGTH,
    TASK_ID_DOMAIN,
    TINY_FILE_LIMIT,
    UNKNOWN_LENGTH_PIECE_LENGTH,
    Digest,
    DigestAlgorithm,
    DigestFormatError,
    DigestMismatch,
    InvalidPieceLength,
    KiB,
    MiB,
    PieceLayout,
    canonical_url,
    content_hasher,
    is_hex_digest,
    is_task_id,
    needs_swarm,
    piece_count,
    piece_digest,
    piece_length_for,
    task_id,
    validate_piece_length,
)

# --- canonical URL and filtered query parameters ----------------------------------------------------------

BRIEF_DEFAULTS = {
    # S3 (SigV2 and SigV4)
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
    # GCS
    "X-Goog-Algorithm",
    "X-Goog-Credential",
    "X-Goog-Date",
    "X-Goog-Expires",
    "X-Goog-SignedHeaders",
    "X-Goog-Signature",
    "GoogleAccessId",
    # Azure SAS
    *("sv", "ss", "srt", "sp", "se", "st", "spr", "sig", "sr", "skoid", "sktid", "skt", "ske", "sks", "skv"),
    # Aliyun OSS
    "OSSAccessKeyId",
    # containerd
    "ns",
}


def test_default_filter_list_is_exactly_the_documented_one() -> None:
    assert set(DEFAULT_FILTERED_QUERY_PARAMS) == BRIEF_DEFAULTS
    assert len(DEFAULT_FILTERED_QUERY_PARAMS) == len(BRIEF_DEFAULTS)  # no duplicates


@pytest.mark.parametrize("name", sorted(BRIEF_DEFAULTS))
def test_every_default_name_is_filtered_in_any_case(name: str) -> None:
    for variant in (name, name.lower(), name.upper()):
        assert canonical_url(f"https://h/f?a=1&{variant}=zz&b=2") == "https://h/f?a=1&b=2"


def test_s3_presigned_urls_with_different_signatures_are_one_task() -> None:
    def signed(date: str, sig: str) -> str:
        return (
            "https://bucket.s3.amazonaws.com/models/llama.bin?versionId=7"
            f"&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20240101%2Fus-east-1%2Fs3%2Faws4_request"
            f"&X-Amz-Date={date}&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature={sig}"
        )

    a, b = signed("20240101T000000Z", "aa" * 32), signed("20240202T000000Z", "bb" * 32)
    assert canonical_url(a) == canonical_url(b) == "https://bucket.s3.amazonaws.com/models/llama.bin?versionId=7"
    assert task_id(a) == task_id(b)


def test_remaining_parameters_keep_their_order_and_bytes() -> None:
    url = "https://h/p?z=1&Signature=s&a=%2F+x&m&k==v&sig=q"
    assert canonical_url(url) == "https://h/p?z=1&a=%2F+x&m&k==v"
    assert canonical_url("https://h/p?b=1&a=2") != canonical_url("https://h/p?a=2&b=1")


def test_names_are_matched_after_form_decoding() -> None:
    assert canonical_url("https://h/p?X%2DAmz%2DDate=1&a=1") == "https://h/p?a=1"
    assert canonical_url("https://h/p?my+ns=1&ns=2") == "https://h/p?my+ns=1"
    assert canonical_url("https://h/p?a=1", ["my ns"]) == "https://h/p?a=1"
    assert canonical_url("https://h/p?my+ns=1&a=1", ["my ns"]) == "https://h/p?a=1"


def test_a_name_without_value_is_filtered_too() -> None:
    assert canonical_url("https://h/p?Signature&a") == "https://h/p?a"


def test_empty_components_fragment_and_empty_query_are_dropped() -> None:
    assert canonical_url("https://h/p?&&a=1&&b=2&") == "https://h/p?a=1&b=2"
    assert canonical_url("https://h/p?") == "https://h/p"
    assert canonical_url("https://h/p?ns=k8s.io") == "https://h/p"
    assert canonical_url("https://h/p?a=1#part?Signature=x") == "https://h/p?a=1"
    assert canonical_url("https://h/p#frag") == "https://h/p"


def test_only_the_scheme_is_lowercased() -> None:
    assert canonical_url("HTTPS://Example.COM/Path/File?A=1") == "https://Example.COM/Path/File?A=1"
    assert canonical_url("HF://Org/Model") == "hf://Org/Model"
    assert canonical_url("not a url: really") == "not a url: really"  # no valid scheme: untouched
    assert canonical_url("/relative/Path") == "/relative/Path"


def test_a_given_filter_list_replaces_the_defaults() -> None:
    url = "https://h/p?Signature=s&token=t&a=1"
    assert canonical_url(url, []) == url
    assert canonical_url(url, ["Token "]) == "https://h/p?Signature=s&a=1"
    assert canonical_url(url, (*DEFAULT_FILTERED_QUERY_PARAMS, "token")) == "https://h/p?a=1"


# --- task id ------------------------------------------------------------------------------------------------


def reference_task_id(*fields: str) -> str:
    """The documented encoding, written out independently of the implementation."""
    data = b""
    for f in (TASK_ID_DOMAIN, *fields):
        raw = f.encode()
        data += len(raw).to_bytes(8, "big") + raw
    return hashlib.sha256(data).hexdigest()


def test_task_id_golden_values() -> None:
    # These are the test vectors protocol.md quotes; a change here is a protocol change.
    assert task_id("https://example.com/a.bin") == "e2f155e4965f0101ac5d615af4ea0693a23281d3a686220fee598472b52d420c"
    assert (
        task_id("https://example.com/a.bin", tag="t", application="app", tenant="acme", piece_length=4 * MiB)
        == "4dab17183f6618e6fcf87a0172113203a0c9ac7ae6e7a03671d686861e0f6e1f"
    )


def test_task_id_follows_the_documented_encoding() -> None:
    url = "HTTPS://h/p?Expires=9&a=1#x"
    assert task_id(url) == reference_task_id("https://h/p?a=1", "", "", "", "")
    assert task_id(url, tag="v1", application="ml", tenant="t0", piece_length=64 * KiB) == reference_task_id(
        "https://h/p?a=1", "v1", "ml", "t0", "65536"
    )
    assert task_id("https://h/é", tag="ü") == reference_task_id("https://h/é", "ü", "", "", "")


def test_every_field_changes_the_id() -> None:
    base = task_id("https://h/p")
    variants = [
        task_id("https://h/q"),
        task_id("https://h/p", tag="x"),
        task_id("https://h/p", application="x"),
        task_id("https://h/p", tenant="x"),
        task_id("https://h/p", piece_length=4 * MiB),
        task_id("https://h/p", piece_length=8 * MiB),
    ]
    assert len({base, *variants}) == 1 + len(variants)


def test_the_encoding_is_unambiguous_across_field_boundaries() -> None:
    assert task_id("u", tag="ab", application="c") != task_id("u", tag="a", application="bc")
    assert task_id("u", application="x") != task_id("u", tenant="x")
    assert task_id("u", tenant="4194304") != task_id("u", piece_length=4 * MiB)


def test_the_filter_list_itself_is_not_in_the_id() -> None:
    assert task_id("https://h/p?a=1", filtered_query_params=["zz"]) == task_id("https://h/p?a=1")
    assert task_id("https://h/p?zz=1&a=1", filtered_query_params=["zz"]) == task_id("https://h/p?a=1")


def test_task_id_form_and_fixed_length_validation() -> None:
    tid = task_id("https://h/p")
    assert is_task_id(tid) and is_hex_digest(tid)
    assert not is_task_id(tid.upper()) and not is_task_id(tid[:-1]) and not is_task_id("../" + tid[3:])
    with pytest.raises(InvalidPieceLength):
        task_id("https://h/p", piece_length=3 * MiB)


# --- piece length ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_length", "expected"),
    [
        (0, 4 * MiB),
        (1, 4 * MiB),
        (129, 4 * MiB),
        (1 * 1024**3, 4 * MiB),
        (2_097_152_499, 4 * MiB),  # 2_097_152_499 // 500 == 4 MiB exactly
        (2_097_152_500, 8 * MiB),  # // 500 == 4 MiB + 1: next power of two
        (4 * 1024**3, 16 * MiB),
        (10 * 10**9, 32 * MiB),
        (16_777_216_499, 32 * MiB),
        (16_777_216_500, 64 * MiB),
        (10**13, 64 * MiB),  # clamped
    ],
)
def test_piece_length_from_content_length(content_length: int, expected: int) -> None:
    assert piece_length_for(content_length) == expected


def test_fixed_piece_length_overrides_the_rule() -> None:
    assert piece_length_for(10**13, 64 * KiB) == 64 * KiB
    assert piece_length_for(0, 64 * MiB) == 64 * MiB
    assert piece_length_for(None, 1 * MiB) == 1 * MiB


def test_unknown_length_uses_the_minimum() -> None:
    assert piece_length_for(None) == UNKNOWN_LENGTH_PIECE_LENGTH == MIN_PIECE_LENGTH == 4 * MiB


@pytest.mark.parametrize("bad", [0, -1, 1, 3 * MiB, 32 * KiB, 64 * KiB - 1, 128 * MiB, 1024**3, True, 1.5, "4194304"])
def test_invalid_fixed_piece_lengths(bad: object) -> None:
    with pytest.raises(InvalidPieceLength, match="power of two from 65536"):
        validate_piece_length(bad)  # type: ignore[arg-type]


def test_valid_fixed_piece_lengths() -> None:
    lengths = [1 << k for k in range(16, 27)]
    assert lengths[0] == MIN_FIXED_PIECE_LENGTH and lengths[-1] == MAX_PIECE_LENGTH
    assert [validate_piece_length(n) for n in lengths] == lengths


def test_negative_content_length_is_rejected() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        piece_length_for(-1)
    with pytest.raises(ValueError, match="non-negative"):
        PieceLayout(-1, 4 * MiB)


# --- layout --------------------------------------------------------------------------------------------------


def test_layout_of_an_empty_file() -> None:
    layout = PieceLayout.for_content(0)
    assert (layout.count, layout.last_size, layout.piece_length) == (0, 0, 4 * MiB)
    with pytest.raises(IndexError):
        layout.span(0)


def test_layout_of_a_tiny_file() -> None:
    layout = PieceLayout.for_content(100)
    assert layout.count == 1
    assert layout.span(0) == (0, 100)
    assert layout.last_size == 100


def test_layout_of_an_exact_multiple() -> None:
    layout = PieceLayout(3 * 64 * KiB, 64 * KiB)
    assert layout.count == 3
    assert [layout.span(i) for i in range(3)] == [(0, 65536), (65536, 131072), (131072, 196608)]
    assert layout.last_size == 64 * KiB


def test_layout_of_a_non_multiple() -> None:
    layout = PieceLayout(10 * MiB + 5, 4 * MiB)
    assert layout.count == 3
    assert [layout.offset(i) for i in range(3)] == [0, 4 * MiB, 8 * MiB]
    assert [layout.size(i) for i in range(3)] == [4 * MiB, 4 * MiB, 2 * MiB + 5]
    assert layout.last_size == 2 * MiB + 5
    assert layout.span(2) == (8 * MiB, 10 * MiB + 5)


@pytest.mark.parametrize("index", [-1, 3, True])
def test_layout_rejects_bad_indices(index: int) -> None:
    with pytest.raises(IndexError, match="out of range"):
        PieceLayout(10 * MiB + 5, 4 * MiB).size(index)


def test_layout_rejects_a_bad_piece_length() -> None:
    with pytest.raises(InvalidPieceLength):
        PieceLayout(10, 1000)


def test_a_task_has_at_most_max_pieces() -> None:
    assert MAX_PIECES == 2**20
    assert PieceLayout(MAX_PIECES * 64 * KiB, 64 * KiB).count == MAX_PIECES
    with pytest.raises(InvalidPieceLength, match="more than 1048576 pieces: use a larger piece length"):
        PieceLayout(MAX_PIECES * 64 * KiB + 1, 64 * KiB)
    assert PieceLayout.for_content(64 * 1024**4).count == MAX_PIECES  # the automatic rule reaches it at 64 TiB


def test_piece_count_when_a_stream_ends() -> None:
    pl = UNKNOWN_LENGTH_PIECE_LENGTH
    assert piece_count(0, pl) == 0  # empty stream: no pieces
    assert piece_count(pl, pl) == 1  # ends on a boundary: no empty trailing piece
    assert piece_count(pl + 1, pl) == 2
    assert piece_count(3 * pl - 1, pl) == 3


@given(st.integers(0, 2**36), st.integers(16, 26))
def test_layout_covers_the_content_exactly(content_length: int, log2: int) -> None:
    layout = PieceLayout(content_length, 1 << log2)
    if layout.count == 0:
        assert content_length == 0
        return
    assert layout.span(0)[0] == 0
    assert layout.span(layout.count - 1)[1] == content_length
    assert 0 < layout.last_size <= layout.piece_length
    i = (content_length // 3) // layout.piece_length  # a piece somewhere in the middle
    if i + 1 < layout.count:
        assert layout.span(i)[1] == layout.span(i + 1)[0]
        assert layout.size(i) == layout.piece_length


def test_swarm_predicate() -> None:
    assert TINY_FILE_LIMIT == 128
    assert not needs_swarm(0)
    assert not needs_swarm(1)
    assert not needs_swarm(128)
    assert needs_swarm(129)
    assert needs_swarm(None)


# --- digests --------------------------------------------------------------------------------------------------


def test_piece_digest_is_blake3_hex() -> None:
    data = bytes(range(256)) * 10
    assert piece_digest(data) == blake3.blake3(data).hexdigest()
    assert piece_digest(memoryview(data)) == piece_digest(bytearray(data))
    assert piece_digest(b"") == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


def test_whole_file_digest_fed_in_piece_order_is_b3sum() -> None:
    content = bytes(range(256)) * 1000
    h = content_hasher()
    for start in range(0, len(content), 4096):
        h.update(content[start : start + 4096])
    assert h.hexdigest() == blake3.blake3(content).hexdigest()


SHA_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize(
    ("text", "algorithm", "hex_value"),
    [
        (f"sha256:{SHA_ABC}", DigestAlgorithm.SHA256, SHA_ABC),
        (f"SHA256:{SHA_ABC.upper()}", DigestAlgorithm.SHA256, SHA_ABC),
        (f"  blake3:{'ab' * 32}\n", DigestAlgorithm.BLAKE3, "ab" * 32),
    ],
)
def test_parse_valid_digests(text: str, algorithm: DigestAlgorithm, hex_value: str) -> None:
    d = Digest.parse(text)
    assert (d.algorithm, d.hex) == (algorithm, hex_value)
    assert str(d) == f"{algorithm}:{hex_value}"
    assert Digest.parse(str(d)) == d


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no ':'"),
        (SHA_ABC, "no ':'"),
        (f"md5:{SHA_ABC}", "unsupported digest algorithm 'md5'"),
        (f"sha512:{SHA_ABC}", "unsupported"),
        (f":{SHA_ABC}", "unsupported"),
        ("sha256:", "0 characters"),
        (f"sha256:{SHA_ABC[:-1]}", "63 characters"),
        (f"sha256:{SHA_ABC}0", "65 characters"),
        (f"sha256:{SHA_ABC[:-1]}g", "malformed digest value"),
        (f"sha256:{SHA_ABC[:10]} {SHA_ABC[11:]}", "malformed digest value"),
        (f"sha256:sha256:{SHA_ABC}", "malformed digest value"),
    ],
)
def test_parse_malformed_digests(text: str, message: str) -> None:
    with pytest.raises(DigestFormatError, match=message) as info:
        Digest.parse(text)
    assert "expected 'sha256:<64 hex digits>' or 'blake3:<64 hex digits>'" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_digest_constructor_requires_normalised_hex() -> None:
    with pytest.raises(DigestFormatError):
        Digest(DigestAlgorithm.SHA256, SHA_ABC.upper())


def test_digest_check() -> None:
    d = Digest.parse(f"sha256:{SHA_ABC}")
    h = d.hasher()
    h.update(b"abc")
    d.check(h.hexdigest(), "file")
    d.check(SHA_ABC.upper(), "file")
    with pytest.raises(DigestMismatch) as info:
        d.check("00" * 32, "file out.bin")
    assert info.value.what == "file out.bin"
    assert info.value.expected == f"sha256:{SHA_ABC}"
    assert info.value.actual == "sha256:" + "00" * 32
    assert "file out.bin: digest mismatch" in str(info.value)


def test_blake3_digest_hasher() -> None:
    d = Digest.parse("blake3:" + blake3.blake3(b"abc").hexdigest())
    h = d.hasher()
    h.update(b"abc")
    d.check(h.hexdigest(), "x")
