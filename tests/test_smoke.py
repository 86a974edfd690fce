from __future__ import annotations

import trio
from click.testing import CliRunner
from conftest import CATALOGUE, Echo, EchoOk

from dfz.broker import Client, Request, Server
from dfz.broker.curve import KeyPair
from dfz.cli import main


async def test_request_reply_over_every_transport(endpoint: str) -> None:
    async def echo(req: Request) -> EchoOk:
        assert isinstance(req.msg, Echo)
        return EchoOk(n=req.msg.n)

    server = Server(CATALOGUE, [endpoint])
    server.handle(Echo, echo)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client = await nursery.start(Client(CATALOGUE, server.endpoints[0]).run)
            for n in range(50):
                reply = await client.request(Echo(n=n))
                assert reply.expect(EchoOk).n == n
            nursery.cancel_scope.cancel()


def test_keygen_writes_a_loadable_pair(tmp_path: object) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["keygen", "-d", str(tmp_path), "sched"])
    assert result.exit_code == 0, result.output
    keys = KeyPair.load(f"{tmp_path}/sched.key_secret")
    assert keys.public.decode() in result.output
    again = runner.invoke(main, ["keygen", "-d", str(tmp_path), "sched"])
    assert again.exit_code != 0 and "--force" in again.output
