"""Shared test vocabulary: a small catalogue of test-only message types, and helpers that start real
fabric components on real sockets (inproc, ipc under a short temporary directory, tcp on 127.0.0.1
with an ephemeral port)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import ClassVar

import pytest
from e2e_helpers import Procs

from dfz.broker import U32, Catalogue, Kind, Message


class Echo(Message, tag="test.echo"):
    """Request: answered with EchoOk carrying the same n and, if payload_size > 0, a payload frame."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    n: int = 0
    sleep_ms: U32 = 0


class EchoOk(Message, tag="test.echo_ok"):
    KIND: ClassVar[Kind] = Kind.REPLY
    n: int = 0


class Upload(Message, tag="test.upload"):
    """Request with one payload frame; the reply tells its length."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    PAYLOAD_FRAMES: ClassVar[int] = 1


class Note(Message, tag="test.note"):
    """A server push."""

    KIND: ClassVar[Kind] = Kind.SERVER_PUSH
    seq: int = 0


class Tick(Message, tag="test.tick"):
    """A client push."""

    KIND: ClassVar[Kind] = Kind.CLIENT_PUSH
    seq: int = 0


CATALOGUE = Catalogue([Echo, EchoOk, Upload, Note, Tick], max_payload=8 * 1024 * 1024)


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A directory with a short path, for ipc endpoints (limited to 107 characters)."""
    with tempfile.TemporaryDirectory(prefix="dfz-", dir="/tmp") as d:
        yield d


@pytest.fixture(params=["inproc", "ipc", "tcp"])
def endpoint(request: pytest.FixtureRequest, short_tmp: str) -> str:
    """One bindable endpoint per transport."""
    kind = request.param
    if kind == "inproc":
        return f"inproc://test-{os.getpid()}-{id(request)}"
    if kind == "ipc":
        return f"ipc://{short_tmp}/s"
    return "tcp://127.0.0.1:0"


@pytest.fixture
def procs() -> Iterator[Procs]:
    """Processes a test starts (:class:`e2e_helpers.Procs`); whatever still runs at the end is stopped."""
    p = Procs()
    try:
        yield p
    finally:
        p.kill_all()
