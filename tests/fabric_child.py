"""A fabric server or client in a child process, for tests that kill (SIGKILL) or restart one side.

    python tests/fabric_child.py server ENDPOINT [--heartbeat S] [--liveness N]
    python tests/fabric_child.py client ENDPOINT NAME [--count N] [--sleep-ms MS] [--heartbeat S] [--liveness N]

The child reports on stdout, one flushed line per event:

* server: ``ready <endpoint>`` once bound (it retries a bind that finds the address in use for a few
  seconds, as a restart on the port of a killed server may), ``busy <n>`` when a handler starts an Echo
  that sleeps.
* client: ``connected`` on every new session, ``reply <n>`` for each answered Echo, ``idle`` once it has
  made ``--count`` requests (it keeps its session, heartbeating); ``--count -1`` asks forever.

It leaves cleanly (cancelling its nursery, so a client says ``bye``) on ``stop`` on stdin or at the end
of its input, so a child never outlives the test that started it.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import os
import sys

import trio
import zmq
from conftest import CATALOGUE, Echo, EchoOk

from dfz.broker import Client, ClientConfig, Request, Server, ServerConfig, default_context


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def stop_on_stdin(scope: trio.CancelScope) -> None:
    """Cancel ``scope`` when stdin says ``stop`` or ends (the parent went away)."""
    seen = b""
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
        while b"stop" not in seen:
            chunk = await stdin.receive_some(1024)
            if not chunk:
                break
            seen = seen[-8:] + chunk
    scope.cancel()


async def echo(req: Request) -> EchoOk:
    assert isinstance(req.msg, Echo)
    if req.msg.sleep_ms:
        say(f"busy {req.msg.n}")
        await trio.sleep(req.msg.sleep_ms / 1000)
    return EchoOk(n=req.msg.n)


async def run_server(args: argparse.Namespace) -> None:
    config = ServerConfig(heartbeat=args.heartbeat, liveness=args.liveness)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            for attempt in itertools.count():
                server = Server(CATALOGUE, [args.endpoint], name="child-server", config=config)
                server.handle(Echo, echo)
                try:
                    await nursery.start(server.run)
                    break
                except zmq.ZMQError as e:
                    if e.errno != errno.EADDRINUSE or attempt >= 100:
                        raise
                    await trio.sleep(0.05)
        say(f"ready {server.endpoints[0]}")
        nursery.start_soon(stop_on_stdin, nursery.cancel_scope)


async def run_client(args: argparse.Namespace) -> None:
    config = ClientConfig(heartbeat=args.heartbeat, liveness=args.liveness, timeout=30)

    def on_state(state: str) -> None:
        if state == "connected":
            say("connected")

    client = Client(CATALOGUE, args.endpoint, name=args.name, config=config, on_state=on_state)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        nursery.start_soon(stop_on_stdin, nursery.cancel_scope)
        for n in itertools.count() if args.count < 0 else range(args.count):
            reply = await client.request(Echo(n=n, sleep_ms=args.sleep_ms))
            say(f"reply {reply.expect(EchoOk).n}")
        say("idle")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("endpoint")
    parser.add_argument("name", nargs="?", default="child-client")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--sleep-ms", type=int, default=0)
    parser.add_argument("--heartbeat", type=float, default=0.1)
    parser.add_argument("--liveness", type=int, default=3)
    args = parser.parse_args()
    trio.run(run_server if args.role == "server" else run_client, args)
    # Let a client's last `bye` leave: sockets linger briefly, and only terminating the context waits.
    default_context().term()


if __name__ == "__main__":
    main()
