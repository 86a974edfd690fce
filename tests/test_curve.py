"""CurveZMQ end to end over tcp: the ZAP handler admits the allowed client keys only, a refused or
mismatched client gets nothing at all (its requests time out), and ``dfz keygen`` files work as keys."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest
import trio
from conftest import CATALOGUE, Echo, EchoOk

from dfz.broker import (
    Client,
    ClientConfig,
    CurveClient,
    CurveServer,
    KeyPair,
    PeerEvent,
    Request,
    RequestTimeout,
    Server,
    ServerConfig,
    load_public_key,
)


def client_config() -> ClientConfig:
    return ClientConfig(heartbeat=0.1, liveness=3, reconnect_max=0.5)


class Recorder:
    """The server's view: who joined, and the CURVE identity each request came with."""

    def __init__(self) -> None:
        self.joined: list[tuple[str, str | None]] = []
        self.user_ids: list[str | None] = []

    def on_peer_event(self, ev: PeerEvent) -> None:
        if ev.kind == "joined":
            self.joined.append((ev.peer.name, ev.peer.user_id))

    async def echo(self, req: Request) -> EchoOk:
        assert isinstance(req.msg, Echo)
        self.user_ids.append(req.peer.user_id)
        return EchoOk(n=req.msg.n)


def curve_server(keys: KeyPair, allowed: frozenset[bytes], recorder: Recorder) -> Server:
    server = Server(
        CATALOGUE,
        ["tcp://127.0.0.1:0"],
        config=ServerConfig(heartbeat=0.1, liveness=3),
        curve=CurveServer(keys, allowed),
        on_peer_event=recorder.on_peer_event,
    )
    server.handle(Echo, recorder.echo)
    return server


async def shut_out(endpoint: str, name: str, curve: CurveClient | None) -> None:
    """A client the server must not admit: it never gets a session, so its request times out."""
    async with trio.open_nursery() as nursery:
        client = await nursery.start(Client(CATALOGUE, endpoint, name=name, config=client_config(), curve=curve).run)
        with pytest.raises(RequestTimeout):
            await client.request(Echo(n=1), timeout=1.0)
        assert client.stats.sessions == 0 and client.welcome is None
        nursery.cancel_scope.cancel()


async def test_curve_admits_allowed_keys_and_nobody_else() -> None:
    server_keys, alice, mallory = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    recorder = Recorder()
    server = curve_server(server_keys, frozenset({alice.public}), recorder)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            endpoint = server.endpoints[0]
            assert endpoint.startswith("tcp://127.0.0.1:")
            good = Client(CATALOGUE, endpoint, name="alice", config=client_config(), curve=CurveClient(alice, server_keys.public))
            await nursery.start(good.run)
            assert (await good.request(Echo(n=1))).expect(EchoOk).n == 1
            [session] = server.peers.values()
            assert session.user_id == alice.public.decode()
            assert recorder.user_ids == [alice.public.decode()]

            async with trio.open_nursery() as strangers:
                # A key pair the server does not know: ZAP refuses the handshake.
                strangers.start_soon(shut_out, endpoint, "mallory", CurveClient(mallory, server_keys.public))
                # An allowed key pair that expects another server's key: the handshake cannot complete.
                strangers.start_soon(shut_out, endpoint, "misled", CurveClient(alice, mallory.public))
                # No encryption at all against an encrypted server.
                strangers.start_soon(shut_out, endpoint, "plain", None)

            assert recorder.joined == [("alice", alice.public.decode())]
            assert list(server.peers.values()) == [session]
            assert server.zap is not None
            assert server.zap.refused > 0 and server.zap.admitted >= 1
            # The admitted client was not disturbed by the others.
            assert (await good.request(Echo(n=2))).expect(EchoOk).n == 2
            assert good.stats.sessions == 1
            nursery.cancel_scope.cancel()


async def test_an_empty_allowed_set_admits_nobody() -> None:
    server_keys, alice = KeyPair.generate(), KeyPair.generate()
    recorder = Recorder()
    server = curve_server(server_keys, frozenset(), recorder)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await shut_out(server.endpoints[0], "alice", CurveClient(alice, server_keys.public))
            assert recorder.joined == [] and server.peers == {}
            assert server.zap is not None and server.zap.refused > 0 and server.zap.admitted == 0
            nursery.cancel_scope.cancel()


async def keygen(directory: Path, name: str) -> str:
    """Run ``dfz keygen`` as the operator would; return its output."""
    done = await trio.run_process([sys.executable, "-m", "dfz.cli", "keygen", "-d", str(directory), name], capture_stdout=True)
    return done.stdout.decode()


async def test_keygen_files_load_and_secure_a_session(tmp_path: Path) -> None:
    with trio.fail_after(15):
        server_out = await keygen(tmp_path, "sched")
        await keygen(tmp_path, "host-1")
        server_keys = KeyPair.load(tmp_path / "sched.key_secret")
        client_keys = KeyPair.load(tmp_path / "host-1.key_secret")
        assert server_keys.public.decode() in server_out
        assert server_keys.secret.decode() not in server_out
        assert load_public_key(tmp_path / "sched.key") == server_keys.public
        assert load_public_key(tmp_path / "host-1.key") == client_keys.public
        assert len(server_keys.public) == len(server_keys.secret) == 40
        assert stat.S_IMODE((tmp_path / "sched.key_secret").stat().st_mode) == 0o600
        with pytest.raises(ValueError, match="key_secret"):
            KeyPair.load(tmp_path / "sched.key")  # a public certificate is not a key pair

        # What an operator deploys: the server gets its secret file and the clients' public files; a
        # client gets its own secret file and the server's public file.
        recorder = Recorder()
        server = curve_server(
            KeyPair.load(tmp_path / "sched.key_secret"), frozenset({load_public_key(tmp_path / "host-1.key")}), recorder
        )
        curve = CurveClient(KeyPair.load(tmp_path / "host-1.key_secret"), load_public_key(tmp_path / "sched.key"))
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client = await nursery.start(
                Client(CATALOGUE, server.endpoints[0], name="host-1", config=client_config(), curve=curve).run
            )
            assert (await client.request(Echo(n=5))).expect(EchoOk).n == 5
            assert recorder.joined == [("host-1", client_keys.public.decode())]
            nursery.cancel_scope.cancel()


def test_saved_key_pairs_round_trip(tmp_path: Path) -> None:
    keys = KeyPair.generate()
    public, secret = keys.save(tmp_path, "node")
    assert KeyPair.load(secret) == keys
    assert load_public_key(public) == keys.public
    assert keys.secret.decode() not in repr(keys)  # secrets stay out of logs and tracebacks
