"""The ``dfz`` command: one click program with a subcommand per working feature."""

from __future__ import annotations

from pathlib import Path

import click

from . import __version__
from .log import setup


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dfz")
@click.option("-v", "--verbose", count=True, help="More logs: -v info, -vv debug (default: warnings only).")
def main(verbose: int) -> None:
    """dfz: peer-to-peer distribution of files, container images and AI model weights."""
    setup(verbose)


@main.command()
@click.argument("name")
@click.option(
    "-d",
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Where to write NAME.key (public) and NAME.key_secret (private, mode 0600).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing key pair of that name.")
def keygen(name: str, directory: Path, force: bool) -> None:
    """Make a CurveZMQ key pair for an encrypted fabric.

    Give a server its NAME.key_secret; give each client its own key pair and the server's NAME.key;
    list the clients' public keys in the server's allowed set.
    """
    from .broker.curve import KeyPair

    if not name or "/" in name or name.startswith("."):
        raise click.BadParameter("a plain file name such as 'sched' or 'host-17'", param_hint="NAME")
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if not force and (public.exists() or secret.exists()):
        raise click.ClickException(f"{public} or {secret} exists already; pass --force to replace it")
    keys = KeyPair.generate()
    keys.save(directory, name)
    click.echo(f"public key {keys.public.decode()}")
    click.echo(f"wrote {public} and {secret} (keep {secret.name} private)")


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML file of settings: name, listen, heartbeat, ... and a [scheduler] table (see dfz/sched/service.py).",
)
@click.option(
    "--listen",
    multiple=True,
    metavar="ENDPOINT",
    help="Endpoint to bind, e.g. tcp://0.0.0.0:8002 (repeatable; replaces the config's `listen`). Port 0 picks a free one.",
)
@click.option("-v", "--verbose", count=True, help="More logs: -v info, -vv debug.")
def sched(config_file: Path | None, listen: tuple[str, ...], verbose: int) -> None:
    """Run the scheduler until SIGTERM or SIGINT.

    Prints one line `listening ENDPOINT` per bound endpoint once it serves, then exits 0 when stopped.
    """
    import dataclasses
    import functools

    import trio

    from .broker import default_context
    from .sched.service import ConfigError, ListenError, ServiceConfig, serve

    def listening(endpoints: list[str]) -> None:
        for endpoint in endpoints:
            click.echo(f"listening {endpoint}")

    if verbose:
        setup(verbose)
    try:
        config = ServiceConfig.load(config_file) if config_file is not None else ServiceConfig()
        if listen:
            config = dataclasses.replace(config, listen=listen)
        trio.run(functools.partial(serve, config, on_listening=listening))
    except (ConfigError, ListenError) as e:
        raise click.ClickException(str(e)) from None
    default_context().term()


if __name__ == "__main__":
    main()
