"""The ``dfz`` command: one click program with a subcommand per working feature."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import __version__
from .log import setup

if TYPE_CHECKING:
    from rich.console import Console

    from .peer.local import DownloadRequest, Progress


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
@click.option(
    "--manager",
    metavar="ENDPOINT",
    help="Register with the manager at this fabric endpoint (dfz mgr prints it), keep alive, and take its settings.",
)
@click.option("--cluster", help="The scheduler cluster to register in (its name) [default: the manager's default cluster].")
@click.option(
    "--hostname",
    help="The name to register with [default: this machine's]; two schedulers of a cluster on one machine need two.",
)
@click.option(
    "--ticket-key",
    "ticket_keys",
    multiple=True,
    metavar="HEX",
    help="A manager's public key (dfz mgr prints it as ticket-key) whose tenant tickets to accept, besides the one "
    "--manager gives (repeatable; adds to the config's ticket_keys).",
)
@click.option(
    "--metrics-listen",
    metavar="HOST:PORT",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any free port; prints `metrics URL`).",
)
@click.option("-v", "--verbose", count=True, help="More logs: -v info, -vv debug.")
def sched(  # noqa: PLR0917 - click passes every option as an argument
    config_file: Path | None,
    listen: tuple[str, ...],
    manager: str | None,
    cluster: str | None,
    hostname: str | None,
    ticket_keys: tuple[str, ...],
    metrics_listen: str | None,
    verbose: int,
) -> None:
    """Run the scheduler until SIGTERM or SIGINT.

    Prints one line `listening ENDPOINT` per bound endpoint once it serves, then exits 0 when stopped. With
    --manager it registers there (its first tcp endpoint) and takes its cluster's settings while running.
    """
    import dataclasses
    import functools

    import trio

    from .broker import default_context
    from .config import ConfigError
    from .metrics import ListenError as MetricsListenError
    from .sched.service import ListenError, ServiceConfig, serve

    def listening(endpoints: list[str]) -> None:
        for endpoint in endpoints:
            click.echo(f"listening {endpoint}")

    if verbose:
        setup(verbose)
    try:
        config = ServiceConfig.load(config_file) if config_file is not None else ServiceConfig()
        if listen:
            config = dataclasses.replace(config, listen=listen)
        given: dict[str, Any] = {"manager": manager, "cluster": cluster, "hostname": hostname, "metrics_listen": metrics_listen}
        if ticket_keys:
            given["ticket_keys"] = (*config.ticket_keys, *ticket_keys)
        config = dataclasses.replace(config, **{k: v for k, v in given.items() if v is not None})
        trio.run(functools.partial(serve, config, on_listening=listening, on_metrics=lambda url: click.echo(f"metrics {url}")))
    except (ConfigError, ListenError, MetricsListenError) as e:
        raise click.ClickException(str(e)) from None
    default_context().term()


# --- dfz mgr ---------------------------------------------------------------------------------------------


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML file of settings: database, data_dir, listen, session_ttl, cookie_secure, ticket_key_file, ticket_ttl "
    "(see dfz/mgr/service.py).",
)
@click.option(
    "--database",
    metavar="URL",
    envvar="DFZ_MGR_DATABASE",
    help="sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB [default: $DFZ_MGR_DATABASE, else the config's, "
    "else SQLite in DATA_DIR/manager.db].",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the embedded SQLite database lives [default: $DFZ_DATA_DIR/mgr, else ~/.local/share/dfz/mgr].",
)
@click.option("--listen", metavar="HOST:PORT", help="HTTP address [default: 127.0.0.1:8080]; port 0 picks a free one.")
@click.option(
    "--fabric",
    metavar="ENDPOINT",
    help="Fabric endpoint for schedulers, seed peers and daemons (mgr.*), e.g. tcp://0.0.0.0:8003 "
    "[default: the --listen host, port 8003; a free port when --listen's port is 0].",
)
@click.option(
    "--metrics-listen",
    metavar="HOST:PORT",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any free port; prints `metrics URL`).",
)
@click.option("-v", "--verbose", count=True, help="More logs: -v info, -vv debug.")
def mgr(  # noqa: PLR0917 - click passes every option as an argument
    config_file: Path | None,
    database: str | None,
    data_dir: Path | None,
    listen: str | None,
    fabric: str | None,
    metrics_listen: str | None,
    verbose: int,
) -> None:
    """Run the manager until SIGTERM or SIGINT (then exit 0): the REST API under /api/v1 (OpenAPI at
    /api/v1/openapi.json) over its database, migrated to the latest schema at start.

    Schedulers and seed peers register with it and keep alive, and daemons ask it for their schedulers, on
    its fabric endpoint (--fabric); dynamic configs reach them from there without a restart.

    Prints `database URL` (password hidden), at the very first start when $DFZ_MGR_ROOT_PASSWORD is not set
    `root-password PASSWORD` for the user `root` (shown this once), `ticket-key HEX` (the public key tenant
    tickets are signed with: schedulers and daemons may be configured to trust it), `fabric ENDPOINT`,
    `console http://HOST:PORT/console/` (the web console) and, last, `listening http://HOST:PORT` once it serves.
    """
    import functools

    import trio

    from .config import ConfigError
    from .metrics import ListenError as MetricsListenError
    from .mgr.db import display_url
    from .mgr.service import ListenError, Manager, ManagerConfig, serve, with_overrides

    def ready(manager: Manager) -> None:
        if manager.db is not None:
            click.echo(f"database {display_url(manager.db.url)}")
        if manager.root_password is not None:
            click.echo(f"root-password {manager.root_password}")
        if manager.signer is not None:
            click.echo(f"ticket-key {manager.signer.public_key.hex()}")
        for endpoint in manager.fabric_endpoints:
            click.echo(f"fabric {endpoint}")
        for url in manager.urls:
            click.echo(f"console {url}/console/")
        for url in manager.urls:
            click.echo(f"listening {url}")
        if manager.metrics_url:
            click.echo(f"metrics {manager.metrics_url}")
        sys.stdout.flush()

    if verbose:
        setup(verbose)
    try:
        config = ManagerConfig.load(config_file) if config_file is not None else ManagerConfig()
        config = with_overrides(
            config, database=database, data_dir=data_dir, listen=listen, fabric=fabric, metrics_listen=metrics_listen
        )
        trio.run(functools.partial(serve, config, on_ready=ready))
    except (ConfigError, ListenError, MetricsListenError) as e:
        raise click.ClickException(str(e)) from None


# --- dfz get ---------------------------------------------------------------------------------------------

GET_EXIT_CODES = """\b
Exit codes:
  0    the file is at FILE, verified (and matches --digest if given)
  1    another failure (the message says what happened)
  2    bad usage or input: URL, -O, --digest, -H, --piece-length ...
  3    the origin failed (not found, refused, 5xx, reset, wrong length)
  4    the content does not match --digest
  5    --timeout passed before the download finished
  6    no dfz daemon at --endpoint (or it went away mid-download)
  7    the daemon cannot reach its scheduler
  130  interrupted (Ctrl-C): the download was cancelled
  With -r: 2 also for more files than --max-files (nothing downloaded), 3 when
  the listing fails or is unsafe, 1 when nothing matches; failed files: the code
  they share, else 1.
"""


class GetExit(IntEnum):
    """Exit codes of ``dfz get`` (also in its help and the README)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    ORIGIN = 3
    DIGEST = 4
    TIMEOUT = 5
    DAEMON = 6
    SCHEDULER = 7
    INTERRUPTED = 130


def _exit_for(error_kind: str) -> GetExit:
    """The exit code for a failed download's ``error_kind`` (:class:`dfz.peer.local.Progress`)."""
    if error_kind.startswith("origin"):
        return GetExit.ORIGIN
    if error_kind == "digest_mismatch":
        return GetExit.DIGEST
    if error_kind == "timeout":
        return GetExit.TIMEOUT
    if error_kind == "scheduler_unreachable":
        return GetExit.SCHEDULER
    if error_kind == "bad_request":
        return GetExit.USAGE
    return GetExit.FAILED


_GET_HINTS = {
    GetExit.ORIGIN: "check the URL and any -H headers (credentials); the origin must serve the file",
    GetExit.DIGEST: "no file was written; check the --digest value, or whether the file at the origin changed",
    GetExit.TIMEOUT: "no file was written; raise --timeout, or check the daemon's logs for a stalled origin or swarm",
    GetExit.SCHEDULER: "check the daemon's scheduler address (its config) and that `dfz sched` runs there",
    GetExit.USAGE: "fix the request (see `dfz get --help`)",
    GetExit.FAILED: "see the message above; the daemon's log (`dfz daemon -v`) has details",
}


def _parse_size(text: str) -> int:
    """``65536``, ``64K``/``64KiB``, ``4M``/``4MiB`` (binary units) as a number of bytes."""
    import re

    match = re.fullmatch(r"(\d+)\s*(|k|kib|m|mib)", text.strip().lower())
    if match is None:
        raise click.BadParameter(f"{text!r} is not a size such as 4MiB, 64K or 1048576", param_hint="--piece-length")
    return int(match[1]) * {"": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2}[match[2]]


def _fail(code: GetExit, what: str, hint: str | None = None) -> GetExit:
    click.echo(f"dfz get: {what}", err=True)
    hint = hint if hint is not None else _GET_HINTS.get(code)
    if hint:
        click.echo(f"  what to do: {hint}", err=True)
    return code


@main.command(epilog=GET_EXIT_CODES)
@click.argument("url")
@click.option(
    "-O",
    "--output",
    required=True,
    metavar="FILE",
    help="Where to write the file (with -r: the directory to fill), relative to the current directory; `-` is not supported.",
)
@click.option(
    "--digest",
    metavar="ALGO:HEX",
    help="Expected digest of the whole file, sha256:<64 hex> or blake3:<64 hex> [default for an oci:// blob URL "
    "(oci://REGISTRY/NAME@sha256:HEX): its digest].",
)
@click.option(
    "-H", "--header", "headers", multiple=True, metavar="'NAME: VALUE'", help="Request header for the origin (repeatable)."
)
@click.option("--tag", default="", help="Tag: downloads of one URL with different tags are different tasks.")
@click.option("--application", default="", help="Application name: part of the task's identity, like --tag.")
@click.option(
    "--filter-query-param",
    "filter_params",
    multiple=True,
    metavar="NAME",
    help="Query parameter to ignore when identifying the task (repeatable); added to the defaults "
    "(S3, GCS, Azure and OSS signatures, containerd's ns).",
)
@click.option("--no-default-filters", is_flag=True, help="Ignore only the --filter-query-param names, not the defaults.")
@click.option(
    "--piece-length", metavar="SIZE", help="Fixed piece length, a power of two from 64KiB to 64MiB (default: from the file size)."
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Give up after this long (default: no limit).",
)
@click.option("--no-back-to-source", is_flag=True, help="Fetch only from peers: never let this daemon go to the origin itself.")
@click.option("--no-progress", is_flag=True, help="No progress bar and no summary; errors are still printed.")
@click.option(
    "--endpoint",
    envvar="DFZ_ENDPOINT",
    metavar="ENDPOINT",
    help="The daemon's local API [default: $DFZ_ENDPOINT, else ipc://$DFZ_DATA_DIR/api.sock, "
    "$DFZ_DATA_DIR defaulting to ~/.local/share/dfz].",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the daemon to answer.",
)
@click.option(
    "-r",
    "--recursive",
    is_flag=True,
    help="URL is a directory or prefix (an S3 prefix, a web server's directory index, a file:// directory...): "
    "the daemon lists it and every file is downloaded into the directory -O, keeping the layout.",
)
@click.option(
    "--include",
    "includes",
    multiple=True,
    metavar="GLOB",
    help="With -r: only files whose path below URL matches GLOB (fnmatch: * also matches /; repeatable).",
)
@click.option(
    "--exclude", "excludes", multiple=True, metavar="GLOB", help="With -r: skip files whose path matches GLOB (repeatable)."
)
@click.option(
    "--max-files",
    type=click.IntRange(min=1, max=100_000),
    default=1000,
    show_default=True,
    help="With -r: refuse, before downloading anything, when more files than this are selected.",
)
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=1, max=64),
    default=4,
    show_default=True,
    help="With -r: files downloaded at once.",
)
def get(  # noqa: PLR0917 - click passes every option as an argument
    url: str,
    output: str,
    digest: str | None,
    headers: tuple[str, ...],
    tag: str,
    application: str,
    filter_params: tuple[str, ...],
    no_default_filters: bool,
    piece_length: str | None,
    timeout: float | None,
    no_back_to_source: bool,
    no_progress: bool,
    endpoint: str | None,
    connect_timeout: float,
    recursive: bool,
    includes: tuple[str, ...],
    excludes: tuple[str, ...],
    max_files: int,
    jobs: int,
) -> None:
    """Download URL to FILE through the local dfz daemon: from peers that have it, else from the origin.

    The daemon (`dfz daemon`, or `dfz up`) does the work and keeps the file in its cache; FILE appears only
    once every piece and the whole file are verified. A progress bar on stderr shows bytes, rate, ETA and
    how much came from peers, from the origin or from the daemon's cache.

    With -r, URL is a directory or prefix and -O a directory (made if missing): the daemon lists URL with
    its source settings, the files matching --include/--exclude are counted (more than --max-files: nothing
    is downloaded), then each is downloaded as above to its path below the directory; --timeout applies to
    each file. Paths that would leave the directory (absolute, `..`) refuse the whole listing. Files
    already there are downloaded again (a repeat is a hit in the daemon's cache), since a listing gives no
    digest to verify them with.
    """
    import os

    import trio

    from .peer.api_messages import ApiInputError, check_request, parse_header
    from .peer.endpoints import builtin_schemes, default_endpoint
    from .peer.local import DownloadRequest
    from .tasks import DEFAULT_FILTERED_QUERY_PARAMS, Digest, DigestFormatError

    if output == "-":
        raise click.BadParameter("writing to stdout is not supported (yet): give a file path", param_hint="-O")
    path = os.path.abspath(os.path.expanduser(output))
    if not recursive and (includes or excludes):
        raise click.UsageError("--include and --exclude select files of a recursive download: add -r")
    if recursive:
        if digest is not None:
            raise click.UsageError("--digest names one file's content: it does not go with -r")
        if os.path.exists(path) and not os.path.isdir(path):
            raise click.BadParameter(f"{path} is not a directory: with -r, -O names the directory to fill", param_hint="-O")
        if not os.path.isdir(os.path.dirname(path)):
            raise click.BadParameter(f"directory {os.path.dirname(path)} does not exist: create it first", param_hint="-O")
    elif os.path.isdir(path):
        raise click.BadParameter(
            f"{path} is a directory: give the file's path, e.g. -O {os.path.join(output, 'FILE')}", param_hint="-O"
        )
    if not os.path.isdir(os.path.dirname(path)):
        raise click.BadParameter(f"directory {os.path.dirname(path)} does not exist: create it first", param_hint="-O")
    if digest is None:
        digest = _oci_blob_digest(url)
    if digest is not None:
        try:
            digest = str(Digest.parse(digest))
        except DigestFormatError as e:
            raise click.BadParameter(str(e), param_hint="--digest") from None
    pairs: list[tuple[str, str]] = []
    for header in headers:
        try:
            pairs.append(parse_header(header))
        except ApiInputError as e:
            raise click.BadParameter(e.message, param_hint="-H") from None
    filters = tuple(filter_params) if no_default_filters else DEFAULT_FILTERED_QUERY_PARAMS + tuple(filter_params)
    request = DownloadRequest(
        url=url,
        output=path,
        headers=tuple(pairs),
        tag=tag,
        application=application,
        filtered_query_params=None if not filter_params and not no_default_filters else filters,
        digest=digest,
        piece_length=None if piece_length is None else _parse_size(piece_length),
        timeout=timeout,
        back_to_source=not no_back_to_source,
    )
    try:
        check_request(request, builtin_schemes())
    except ApiInputError as e:
        raise click.UsageError(e.message) from None
    code = GetExit.INTERRUPTED
    try:
        if recursive:
            selection = _Selection(includes, excludes, max_files, jobs)
            code = trio.run(_get_recursive, request, selection, endpoint or default_endpoint(), connect_timeout, not no_progress)
        else:
            code = trio.run(_get, request, endpoint or default_endpoint(), connect_timeout, not no_progress)
    except* KeyboardInterrupt:
        # Leaving the session (bye) makes the daemon stop following the download.
        _fail(GetExit.INTERRUPTED, "interrupted: the download was cancelled", "")
    sys.exit(int(code))


async def _get(request: DownloadRequest, endpoint: str, connect_timeout: float, show_progress: bool) -> GetExit:
    import math
    import os

    import trio

    from .peer.api_client import ApiRequestError, DaemonLost, DaemonUnreachable, open_api_client
    from .peer.api_messages import ApiErrorCode
    from .peer.local import DownloadState

    started = trio.current_time()
    last: Progress | None = None
    # The daemon enforces --timeout; this guard only covers a daemon that does not answer at all.
    guard = request.timeout + 5.0 if request.timeout is not None else math.inf
    try:
        async with open_api_client(endpoint, connect_timeout=connect_timeout, name=f"dfz-get-{os.getpid()}") as api:
            with trio.move_on_after(guard) as guarded:
                async with api.download(request) as download:
                    with _progress_display(os.path.basename(request.output or request.url), show_progress) as bar:
                        async for progress in download:
                            last = progress
                            bar.update(progress)
            if guarded.cancelled_caught:
                return _fail(
                    GetExit.TIMEOUT, f"the download did not finish within {request.timeout:g} s (the daemon did not say why)"
                )
    except DaemonLost as e:
        return _fail(GetExit.DAEMON, str(e), "check the daemon (it may have stopped or restarted), then run the command again")
    except DaemonUnreachable as e:
        return _fail(
            GetExit.DAEMON,
            str(e),
            "start one with `dfz daemon --data-dir DIR --scheduler ENDPOINT` (or `dfz up`), or point --endpoint / "
            "DFZ_ENDPOINT at a running daemon's API (it prints where it listens)",
        )
    except ApiRequestError as e:
        if ApiErrorCode.BAD_URL <= e.code <= ApiErrorCode.BAD_TIMEOUT or e.code == 422:
            return _fail(GetExit.USAGE, f"the daemon refused the request: {e.reason}")
        return _fail(GetExit.FAILED, f"the daemon refused the request ({e.code}): {e.reason}")
    if last is None:
        return _fail(GetExit.FAILED, "the daemon sent no final state")
    if last.state is DownloadState.SUCCEEDED:
        if show_progress:
            from rich.console import Console

            elapsed = max(trio.current_time() - started, 1e-6)
            saved = f"saved {request.output}: {_summary(last)} in {elapsed:.1f} s"
            Console(stderr=True).print(saved, soft_wrap=True, highlight=False)
        return GetExit.OK
    if last.state is DownloadState.CANCELLED:
        return _fail(GetExit.FAILED, f"the download was cancelled: {last.error or 'by the daemon'}", "run the command again")
    code = _exit_for(last.error_kind)
    return _fail(code, f"download failed ({last.error_kind or 'unknown'}): {last.error or 'no reason given'}")


@dataclass(frozen=True)
class _Selection:
    includes: tuple[str, ...]
    excludes: tuple[str, ...]
    max_files: int
    jobs: int

    def wants(self, path: str) -> bool:
        from fnmatch import fnmatchcase

        if self.includes and not any(fnmatchcase(path, glob) for glob in self.includes):
            return False
        return not any(fnmatchcase(path, glob) for glob in self.excludes)


def _target(root: str, path: str) -> str:
    """Where the file at ``path`` (below the listed URL) goes below ``root``, its directories made; ValueError
    when it could land outside ``root`` (an unsafe path, or a symbolic link on the way)."""
    import contextlib
    import os
    import stat

    from .peer.source.listing import check_relative_path

    parts = check_relative_path(path).split("/")
    directory = root
    for part in parts[:-1]:  # made one level at a time, never through a symbolic link
        directory = os.path.join(directory, part)
        with contextlib.suppress(FileExistsError):  # made now, or before, or by another file's task
            os.mkdir(directory)
        mode = os.lstat(directory).st_mode
        if stat.S_ISLNK(mode):
            raise ValueError(f"{directory} is a symbolic link: refusing to write {path!r} through it")
        if not stat.S_ISDIR(mode):
            raise ValueError(f"{directory} is not a directory")
    return os.path.join(directory, parts[-1])


async def _get_recursive(
    template: DownloadRequest, selection: _Selection, endpoint: str, connect_timeout: float, show_progress: bool
) -> GetExit:
    import dataclasses
    import os

    import trio

    from .peer.api_client import ApiRequestError, DaemonLost, DaemonUnreachable, ListedObject, open_api_client
    from .peer.api_messages import MAX_LISTED, ApiErrorCode
    from .peer.local import DownloadState
    from .peer.source import display_url

    root = template.output
    assert root is not None
    url = template.url
    shown = display_url(url)  # without a query string (signatures) or credentials
    started = trio.current_time()
    failures: list[tuple[str, GetExit, str]] = []
    try:
        async with open_api_client(endpoint, connect_timeout=connect_timeout, name=f"dfz-get-{os.getpid()}") as api:
            try:
                listing = await api.list_source(url, template.headers, max_entries=MAX_LISTED)
            except ApiRequestError as e:
                if e.code in (ApiErrorCode.LISTING_FAILED, ApiErrorCode.BAD_LISTING):
                    return _fail(GetExit.ORIGIN, f"cannot list {shown}: {e.reason}")
                if e.code == ApiErrorCode.NOT_LISTABLE:
                    return _fail(GetExit.USAGE, e.reason, "this scheme has no directory listing: download its files one by one")
                if ApiErrorCode.BAD_URL <= e.code <= ApiErrorCode.BAD_TIMEOUT or e.code == 422:
                    return _fail(GetExit.USAGE, f"the daemon refused the listing: {e.reason}")
                return _fail(GetExit.FAILED, f"the daemon refused the listing ({e.code}): {e.reason}")
            if listing.truncated:
                what = f"{shown} holds more than {MAX_LISTED} objects: nothing was downloaded"
                return _fail(GetExit.USAGE, what, "list a narrower prefix")
            chosen = [e for e in listing.entries if selection.wants(e.path)]
            if len(chosen) > selection.max_files:
                return _fail(
                    GetExit.USAGE,
                    f"{len(chosen)} files selected under {shown} (of {len(listing.entries)} listed), more than --max-files"
                    f" {selection.max_files}: nothing was downloaded",
                    "narrow the selection with --include/--exclude, or raise --max-files",
                )
            if not chosen:
                what = "no files" if not listing.entries else f"none of its {len(listing.entries)} files match the globs"
                return _fail(GetExit.FAILED, f"nothing to download: {shown} has {what}", "check the URL and --include/--exclude")
            os.makedirs(root, exist_ok=True)
            sizes = [e.size for e in chosen]
            total_bytes = sum(s for s in sizes if s is not None) if all(s is not None for s in sizes) else None
            done_bytes: dict[str, int] = {}
            finished = [0]
            bar = _overall_display(len(chosen), total_bytes, show_progress)
            limiter = trio.CapacityLimiter(selection.jobs)

            async def fetch(entry: ListedObject) -> None:
                async with limiter:
                    try:
                        target = await trio.to_thread.run_sync(_target, root, entry.path)
                    except (ValueError, OSError) as e:
                        failures.append((entry.path, GetExit.FAILED, f"cannot write it: {e}"))
                        return
                    request = dataclasses.replace(template, url=entry.url, output=target)
                    last: Progress | None = None
                    try:
                        async with api.download(request) as download:
                            async for progress in download:
                                last = progress
                                done_bytes[entry.path] = progress.bytes_done
                                bar.update(finished[0], sum(done_bytes.values()))
                    except ApiRequestError as e:
                        failures.append((entry.path, GetExit.FAILED, f"refused ({e.code}): {e.reason}"))
                        return
                    if last is None or last.state is not DownloadState.SUCCEEDED:
                        kind = last.error_kind if last is not None else ""
                        error = last.error if last is not None else "no final state"
                        code = GetExit.FAILED if last is None or last.state is DownloadState.CANCELLED else _exit_for(kind)
                        failures.append((entry.path, code, f"{kind or 'failed'}: {error}"))
                        return
                    finished[0] += 1
                    bar.update(finished[0], sum(done_bytes.values()))

            with bar:
                try:
                    async with trio.open_nursery() as nursery:
                        for entry in chosen:
                            nursery.start_soon(fetch, entry)
                except BaseExceptionGroup as group:
                    lost = group.subgroup(DaemonUnreachable)
                    if lost is None:
                        raise
                    first: BaseException = lost
                    while isinstance(first, BaseExceptionGroup):
                        first = first.exceptions[0]
                    raise first from None
    except DaemonLost as e:
        return _fail(GetExit.DAEMON, str(e), "check the daemon, then run the command again")
    except DaemonUnreachable as e:
        return _fail(
            GetExit.DAEMON,
            str(e),
            "start one with `dfz daemon --data-dir DIR --scheduler ENDPOINT` (or `dfz up`), or point --endpoint / "
            "DFZ_ENDPOINT at a running daemon's API (it prints where it listens)",
        )
    elapsed = max(trio.current_time() - started, 1e-6)
    ok = len(chosen) - len(failures)
    if not failures:
        if show_progress:
            from rich.filesize import decimal

            click.echo(f"saved {ok} files ({decimal(sum(done_bytes.values()))}) under {root} in {elapsed:.1f} s", err=True)
        return GetExit.OK
    failures.sort()
    lines = [f"  {path}: {why}" for path, _, why in failures[:20]]
    if len(failures) > 20:
        lines.append(f"  ... and {len(failures) - 20} more")
    codes = {code for _, code, _ in failures}
    code = codes.pop() if len(codes) == 1 else GetExit.FAILED
    return _fail(code, f"{len(failures)} of {len(chosen)} files failed ({ok} saved under {root}):\n" + "\n".join(lines))


class _Overall:
    """The one progress line of ``dfz get -r`` (rich, on stderr): files done of total, bytes, rate."""

    def __init__(self, files: int, total_bytes: int | None, enabled: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, TextColumn, TransferSpeedColumn
        from rich.progress import Progress as Bar

        self.files = files
        self.bar = Bar(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self.task = self.bar.add_task(f"files 0/{files}", total=total_bytes)

    def __enter__(self) -> _Overall:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)

    def update(self, done: int, nbytes: int) -> None:
        self.bar.update(self.task, completed=nbytes, description=f"files {done}/{self.files}")


class _NoOverall:
    def __enter__(self) -> _NoOverall:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, done: int, nbytes: int) -> None:
        pass


def _overall_display(files: int, total_bytes: int | None, enabled: bool) -> _Overall | _NoOverall:
    return _Overall(files, total_bytes, enabled) if enabled else _NoOverall()


def _summary(p: Progress) -> str:
    from rich.filesize import decimal

    if p.bytes_from_cache and not (p.bytes_from_peers or p.bytes_from_origin):
        return f"{decimal(p.bytes_done)}, a cache hit"
    parts = [
        f"{decimal(p.bytes_done)}",
        f"{decimal(p.bytes_from_peers)} from peers",
        f"{decimal(p.bytes_from_origin)} from the origin",
    ]
    if p.bytes_from_cache:
        parts.append(f"{decimal(p.bytes_from_cache)} from the cache")
    return ", ".join(parts)


class _NoProgress:
    """What ``dfz get --no-progress`` shows while it waits: nothing (and rich is not even imported)."""

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, p: Progress) -> None:
        pass


def _progress_display(name: str, enabled: bool) -> _GetProgress | _NoProgress:
    if not enabled:
        return _NoProgress()
    from rich.console import Console

    return _GetProgress(Console(stderr=True), name, enabled)


class _GetProgress:
    """The progress bar of ``dfz get`` (rich, on stderr): bytes, rate, ETA, and where bytes came from."""

    def __init__(self, console: Console, name: str, enabled: bool) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as Bar

        self.enabled = enabled
        self.bar = Bar(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[source]}"),
            console=console,
            disable=not enabled,
        )
        self.task = self.bar.add_task(name if len(name) <= 24 else name[:23] + "…", total=None, source="")

    def __enter__(self) -> _GetProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)

    def update(self, p: Progress) -> None:
        from rich.filesize import decimal

        if p.bytes_from_cache and not (p.bytes_from_peers or p.bytes_from_origin):
            source = "cache hit"
        else:
            source = f"peers {decimal(p.bytes_from_peers)} · origin {decimal(p.bytes_from_origin)}"
            if p.bytes_from_cache:
                source += f" · cache {decimal(p.bytes_from_cache)}"
        self.bar.update(self.task, completed=p.bytes_done, total=p.content_length, source=source)


# --- dfz preheat -------------------------------------------------------------------------------------------

PREHEAT_EXIT_CODES = """\b
Exit codes:
  0    the job succeeded: every chosen peer has every URL in its cache
  1    the job failed (the message lists the tasks that failed and why)
  2    bad usage or a request the manager refused as invalid (422)
  3    the manager cannot be reached, or answered an unexpected error
  4    the token is missing, unknown, expired (401) or lacks the `job` scope (403)
  5    --wait-timeout passed before the job ended (the job goes on in the manager)
  130  interrupted (Ctrl-C): the job goes on in the manager
"""


class PreheatExit(IntEnum):
    """Exit codes of ``dfz preheat`` (also in its help)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    MANAGER = 3
    AUTH = 4
    TIMEOUT = 5
    INTERRUPTED = 130


@main.command(epilog=PREHEAT_EXIT_CODES)
@click.argument("url")
@click.option(
    "--image",
    is_flag=True,
    help="URL is an image manifest (https://HOST/v2/NAME/manifests/TAG): preheat its layers and config blob "
    "(as tasks named by their digests, which a daemon's registry mirror then finds).",
)
@click.option(
    "--platform", default="", metavar="OS/ARCH", help="The image's platform in an index, e.g. linux/arm64 [default: linux/amd64]."
)
@click.option(
    "--scope",
    type=click.Choice(["single_seed_peer", "all_seed_peers", "all_peers"]),
    default="single_seed_peer",
    show_default=True,
    help="Which peers of each cluster fetch it.",
)
@click.option(
    "-H", "--header", "headers", multiple=True, metavar="'NAME: VALUE'", help="Request header for the origin (repeatable)."
)
@click.option("--username", default="", help="Registry user name (an image's basic or bearer-token authentication).")
@click.option(
    "--password", default="", envvar="DFZ_REGISTRY_PASSWORD", help="Registry password [default: $DFZ_REGISTRY_PASSWORD]."
)
@click.option("--tag", default="", help="Tag of the task (as `dfz get --tag`).")
@click.option("--application", default="", help="Application of the task (as `dfz get --application`).")
@click.option(
    "--cluster",
    "clusters",
    multiple=True,
    type=click.IntRange(min=1),
    metavar="ID",
    help="Scheduler cluster id (repeatable) [default: all].",
)
@click.option(
    "--timeout", type=click.IntRange(1, 86400), metavar="SECONDS", help="The job's timeout in the manager (sent in nanoseconds)."
)
@click.option(
    "--manager", required=True, envvar="DFZ_MANAGER", metavar="URL", help="The manager's HTTP address [default: $DFZ_MANAGER]."
)
@click.option(
    "--token",
    required=True,
    envvar="DFZ_TOKEN",
    metavar="TOKEN",
    help="Personal access token with the `job` scope [default: $DFZ_TOKEN].",
)
@click.option("--no-wait", is_flag=True, help="Print the job's id and return at once.")
@click.option(
    "--wait-timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS", help="Stop waiting after this long."
)
@click.option("--no-progress", is_flag=True, help="No progress bar; the final line is still printed.")
def preheat(  # noqa: PLR0917 - click passes every option as an argument
    url: str,
    image: bool,
    platform: str,
    scope: str,
    headers: tuple[str, ...],
    username: str,
    password: str,
    tag: str,
    application: str,
    clusters: tuple[int, ...],
    timeout: int | None,
    manager: str,
    token: str,
    no_wait: bool,
    wait_timeout: float | None,
    no_progress: bool,
) -> None:
    """Preheat URL (a file, or with --image an image's layers and config blob) into the cluster's seed peers through the
    manager's open API (POST /oapi/v1/jobs), then follow the job until it ends.

    Prints `job ID` once the manager took it, a progress bar on stderr (tasks done, bytes fetched), and
    last `SUCCESS` or `FAILURE` with the job's error.
    """
    from .peer.api_messages import ApiInputError, parse_header

    args: dict[str, Any] = {"type": "image" if image else "file", "url": url, "scope": scope}
    pairs: dict[str, str] = {}
    for header in headers:
        try:
            name, value = parse_header(header)
        except ApiInputError as e:
            raise click.BadParameter(e.message, param_hint="-H") from None
        pairs[name] = value
    optional = {"headers": pairs, "username": username, "password": password, "platform": platform, "tag": tag}
    # The open API takes Dragonfly's timeout: Go's time.Duration, in nanoseconds.
    timeout_ns = timeout * 1_000_000_000 if timeout else None
    args.update({k: v for k, v in {**optional, "application": application, "timeout": timeout_ns}.items() if v})
    body: dict[str, Any] = {"type": "preheat", "args": args}
    if clusters:
        body["scheduler_cluster_ids"] = list(clusters)
    try:
        code = _preheat(manager.rstrip("/"), token, body, no_wait=no_wait, wait_timeout=wait_timeout, show=not no_progress)
    except KeyboardInterrupt:
        click.echo("dfz preheat: interrupted; the job goes on in the manager", err=True)
        code = PreheatExit.INTERRUPTED
    sys.exit(int(code))


def _preheat(
    manager: str, token: str, body: dict[str, Any], *, no_wait: bool, wait_timeout: float | None, show: bool
) -> PreheatExit:
    import time

    import httpx

    def fail(code: PreheatExit, what: str) -> PreheatExit:
        click.echo(f"dfz preheat: {what}", err=True)
        return code

    def refused(answer: httpx.Response) -> PreheatExit:
        try:
            detail = answer.json().get("detail", answer.text)
        except ValueError:
            detail = answer.text
        if answer.status_code in (401, 403):
            return fail(PreheatExit.AUTH, f"the manager refused the token ({answer.status_code}): {detail}")
        if answer.status_code in (400, 404, 409, 422):
            return fail(PreheatExit.USAGE, f"the manager refused the request ({answer.status_code}): {detail}")
        return fail(PreheatExit.MANAGER, f"the manager answered {answer.status_code}: {detail}")

    headers = {"Authorization": f"Bearer {token}"}
    try:
        with httpx.Client(base_url=manager, headers=headers, timeout=10) as client:
            answer = client.post("/oapi/v1/jobs", json=body)
            if answer.status_code != 200:
                return refused(answer)
            job = answer.json()
            click.echo(f"job {job['id']}")
            if no_wait:
                return PreheatExit.OK
            deadline = math.inf if wait_timeout is None else time.monotonic() + wait_timeout
            with _job_display(show) as display:
                while job["state"] == "PENDING":
                    if time.monotonic() >= deadline:
                        return fail(PreheatExit.TIMEOUT, f"job {job['id']} did not end within {wait_timeout:g} s (it goes on)")
                    time.sleep(0.3)
                    answer = client.get(f"/oapi/v1/jobs/{job['id']}")
                    if answer.status_code != 200:
                        return refused(answer)
                    job = answer.json()
                    display.update(job)
    except httpx.HTTPError as e:
        return fail(PreheatExit.MANAGER, f"cannot reach the manager at {manager}: {e}")
    tasks = job.get("result", {}).get("tasks", [])
    done = sum(1 for t in tasks if t.get("state") == "succeeded")
    if job["state"] == "SUCCESS":
        click.echo(f"SUCCESS job {job['id']}: {done} of {len(tasks)} tasks")
        return PreheatExit.OK
    click.echo(f"FAILURE job {job['id']}: {job.get('error') or 'no reason given'}")
    return PreheatExit.FAILED


class _JobDisplay:
    """A rich progress bar of a job's tasks and bytes, on stderr."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.progress: Any = None
        self.bar: Any = None

    def __enter__(self) -> _JobDisplay:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TextColumn("{task.fields[tasks]}"),
                console=Console(stderr=True),
                transient=True,
            )
            self.progress.__enter__()
            self.bar = self.progress.add_task("preheat", total=None, tasks="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)

    def update(self, job: dict[str, Any]) -> None:
        if self.progress is None:
            return
        tasks = job.get("result", {}).get("tasks", [])
        total = sum(max(0, int(t.get("content_length", -1))) for t in tasks) or None
        done = sum(int(t.get("bytes_done", 0)) for t in tasks)
        ended = sum(1 for t in tasks if t.get("state") in ("succeeded", "failed"))
        self.progress.update(
            self.bar, total=total, completed=done, tasks=f"{ended}/{len(tasks)} tasks", description=f"job {job['id']}"
        )


def _job_display(enabled: bool) -> _JobDisplay:
    return _JobDisplay(enabled)


# --- dfz daemon, dfz seed --------------------------------------------------------------------------------


def _daemon_options(f: Any) -> Any:
    """The options `dfz daemon` and `dfz seed` share (flags replace the config file's keys)."""
    options = [
        click.option(
            "--data-dir",
            type=click.Path(file_okay=False, path_type=Path),
            help="Where tasks are stored (required unless the config file sets data_dir).",
        ),
        click.option(
            "--scheduler",
            "schedulers",
            multiple=True,
            metavar="ENDPOINT",
            help="A scheduler's endpoint, e.g. tcp://10.0.0.1:8002 (repeatable: several schedulers share the tasks by "
            "consistent hashing, and take over those of one that goes down; list the same ones on every daemon).",
        ),
        click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False, path_type=Path),
            help="TOML file of settings (keys of dfz.peer.config.DaemonConfig: data_dir, scheduler or schedulers, listen, "
            "upload_slots, ...).",
        ),
        click.option(
            "--listen",
            multiple=True,
            metavar="ENDPOINT",
            help="Piece server endpoint (repeatable), default tcp://127.0.0.1:0 (a free port). Bind tcp://0.0.0.0:PORT "
            "for peers on other machines.",
        ),
        click.option(
            "--api",
            multiple=True,
            metavar="ENDPOINT",
            help="Local API endpoint (repeatable), default ipc://DATA_DIR/api.sock.",
        ),
        click.option("--advertise-ip", help="Address other peers reach the piece server at (default: from --listen)."),
        click.option("--upload-slots", type=click.IntRange(1, 65535), help="Children served at once (default 32)."),
        click.option(
            "--metrics-listen",
            metavar="HOST:PORT",
            help="Serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any free port; prints `metrics URL`).",
        ),
        click.option(
            "--proxy-listen",
            metavar="HOST:PORT",
            help="Serve the proxy port there: the registry mirror (/v2/...) and the HTTP proxy (port 0: any free port; "
            "prints `proxy URL`). No authentication: bind loopback or a trusted network.",
        ),
        click.option(
            "--mirror-upstream",
            metavar="URL",
            help="The registry the mirror reads from when a request names none (no X-Dfz-Registry header, no ?ns=), "
            "e.g. https://registry-1.docker.io or http://127.0.0.1:5000.",
        ),
        click.option(
            "--http-ca-bundle",
            type=click.Path(dir_okay=False),
            help="PEM file of the CAs trusted for https:// origins (and oci://, hf://, hdfs://) [default: the system's].",
        ),
        click.option(
            "--http-insecure",
            is_flag=True,
            default=None,
            help="Do not verify origins' TLS certificates (tests only).",
        ),
        click.option("--upload-rate", type=click.IntRange(0), help="Upload limit in bytes/s over all children (0: none)."),
        click.option("--download-rate", type=click.IntRange(0), help="Download limit in bytes/s from parents (0: none)."),
        click.option(
            "--manager",
            metavar="ENDPOINT",
            help="The manager's fabric endpoint (dfz mgr prints it): without --scheduler the schedulers come from it; "
            "its dynamic settings (rate limits, upload slots) apply while running; a seed peer registers there.",
        ),
        click.option("--cluster", help="dfz seed: the seed-peer cluster to register in at the manager (default: its default)."),
        click.option(
            "--tenant-token",
            envvar="DFZ_TENANT_TOKEN",
            metavar="TOKEN",
            help="A daemon token from the manager (POST /api/v1/daemon-tokens): the daemon joins that token's tenant "
            "(needs --manager) [default: $DFZ_TENANT_TOKEN; none: no tenant]. Prefer the variable or the config file's "
            "tenant_token: a flag shows in the process list.",
        ),
        click.option(
            "--s3-endpoint",
            metavar="URL",
            help="S3 endpoint for s3:// URLs, e.g. http://127.0.0.1:8333 (default: AWS, or $AWS_ENDPOINT_URL_S3).",
        ),
        click.option("--s3-region", help="S3 region (default: the profile's, $AWS_REGION, else us-east-1)."),
        click.option(
            "--s3-addressing-style", type=click.Choice(["auto", "path", "virtual"]), help="S3 bucket addressing (default auto)."
        ),
        click.option(
            "--s3-profile",
            help="AWS profile whose credentials and settings to use (default: $AWS_PROFILE). Credentials otherwise come "
            "from the config file (s3_access_key_id, s3_secret_access_key) or $AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY.",
        ),
        click.option(
            "--proxy-rule",
            "proxy_rules",
            multiple=True,
            metavar="REGEX",
            help="Forward proxy: GET requests whose URL REGEX is found in go P2P (repeatable; the first match wins; "
            "replaces the config file's proxy_rules, whose tables can also say direct = true). Others pass through.",
        ),
        click.option(
            "--proxy-connect-allow",
            metavar="REGEX",
            help="Forward proxy: CONNECT targets (the whole host:port) allowed [default: .+:443].",
        ),
        click.option(
            "--proxy-intercept",
            multiple=True,
            metavar="REGEX",
            help="Forward proxy: hosts (whole name) whose CONNECT tunnels are decrypted with --proxy-ca-cert so that "
            "the rules apply to the HTTPS requests inside (repeatable).",
        ),
        click.option(
            "--proxy-ca-cert",
            type=click.Path(dir_okay=False),
            help="Forward proxy: the CA certificate (PEM) that signs intercepted hosts' certificates (clients trust it).",
        ),
        click.option(
            "--proxy-ca-key",
            type=click.Path(dir_okay=False),
            help="Forward proxy: the private key (unencrypted PEM) of --proxy-ca-cert.",
        ),
        click.option("-v", "--verbose", count=True, help="More logs: -v info, -vv debug."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _run_daemon(seed: bool, config_file: Path | None, verbose: int, flags: dict[str, Any]) -> None:
    import functools

    import trio

    from .broker import default_context
    from .config import ConfigError
    from .peer.config import DaemonConfig
    from .peer.daemon import Daemon, ListenError, TenantRefused, serve
    from .peer.storage import StorageError

    if verbose:
        setup(verbose)
    overrides: dict[str, Any] = {k: v for k, v in flags.items() if v not in (None, ())}
    if seed:
        overrides["seed"] = True

    def ready(daemon: Daemon, api: list[str]) -> None:
        click.echo(f"host {daemon.host_id} {'seed' if daemon.config.seed else 'normal'}")
        for endpoint in daemon.piece_endpoints:
            click.echo(f"piece-server {endpoint}")
        click.echo(f"announce {daemon.ip}:{daemon.port}")
        for endpoint in daemon.config.scheduler_endpoints:
            click.echo(f"scheduler {endpoint}")
        if daemon.config.manager:
            click.echo(f"manager {daemon.config.manager}")
        for endpoint in api:
            click.echo(f"api {endpoint}")
        if daemon.metrics_url:
            click.echo(f"metrics {daemon.metrics_url}")
        if daemon.proxy_url:
            click.echo(f"proxy {daemon.proxy_url}")
        sys.stdout.flush()

    from .metrics import ListenError as MetricsListenError

    try:
        if config_file is not None:
            config = DaemonConfig.load(config_file, **overrides)
        else:
            config = DaemonConfig.from_mapping(overrides, source="command line")
        trio.run(functools.partial(serve, config, on_ready=ready))
    except (ConfigError, ListenError, StorageError, TenantRefused, MetricsListenError) as e:
        raise click.ClickException(str(e)) from None
    default_context().term()


@main.command()
@_daemon_options
def daemon(config_file: Path | None, verbose: int, **flags: Any) -> None:
    """Run a peer daemon until SIGTERM or SIGINT (then exit 0).

    It stores tasks in --data-dir, serves pieces to other peers, downloads through --scheduler, and
    serves the local API that `dfz get` uses. Prints `host ID TYPE`, `piece-server ENDPOINT`,
    `announce IP:PORT`, `scheduler ENDPOINT` (one per scheduler) and `api ENDPOINT` lines once it serves
    (and `metrics URL`, `proxy URL` with --metrics-listen, --proxy-listen).
    """
    _run_daemon(False, config_file, verbose, _daemon_flags(flags))


@main.command()
@_daemon_options
def seed(config_file: Path | None, verbose: int, **flags: Any) -> None:
    """Run a seed peer: a daemon the scheduler triggers to fetch tasks nobody has from their origin.

    Same options and output as `dfz daemon`; the host is announced as a seed.
    """
    _run_daemon(True, config_file, verbose, _daemon_flags(flags))


def _daemon_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """Command-line names to config keys."""
    names = {"upload_rate": "upload_rate_limit", "download_rate": "download_rate_limit"}
    return {names.get(k, k): v for k, v in flags.items()}


def _oci_blob_digest(url: str) -> str | None:
    """The sha256 digest an ``oci://REGISTRY/NAME@sha256:HEX`` blob URL names (the content's own digest, so
    the download is checked against it), else None."""
    import re

    match = re.fullmatch(r"oci://[^/?#]+/[^?#@]+@(sha256:[0-9a-f]{64})", url)
    return match[1] if match else None


# --- dfz top ---------------------------------------------------------------------------------------------


@main.command()
@click.option(
    "--cluster",
    type=click.Path(path_type=Path),
    metavar="DIR|FILE",
    help="A `dfz up` data directory or its cluster.json [default: $DFZ_DATA_DIR, else ~/.local/share/dfz, "
    "when neither --scheduler nor --manager is given].",
)
@click.option(
    "--manager",
    metavar="URL",
    envvar="DFZ_MANAGER",
    help="The manager's HTTP address: its schedulers, seed peers and jobs [default: $DFZ_MANAGER].",
)
@click.option(
    "--token",
    envvar="DFZ_TOKEN",
    metavar="TOKEN",
    help="Personal access token for the manager's REST API, with the cluster:read and job:read scopes [default: $DFZ_TOKEN].",
)
@click.option("--scheduler", "schedulers", multiple=True, metavar="ENDPOINT", help="A scheduler's fabric endpoint (repeatable).")
@click.option(
    "--interval",
    type=click.FloatRange(0.1, 3600),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds between two polls of each scheduler.",
)
@click.option(
    "--sort",
    "host_sort",
    type=click.Choice(["down", "up", "slots", "peers", "name"]),
    default="down",
    show_default=True,
    help="First order of the hosts table (the `s` key cycles).",
)
@click.option(
    "--max-hosts",
    type=click.IntRange(1, 100_000),
    default=2000,
    show_default=True,
    metavar="N",
    help="Most hosts read from each scheduler per poll (in pages).",
)
@click.option("--once", is_flag=True, help="Print one frame and exit (polls twice, --interval apart, for the rates).")
@click.option("--json", "as_json", is_flag=True, help="With --once: print the view as JSON instead.")
def top(  # noqa: PLR0917 - click passes every option as an argument
    cluster: Path | None,
    manager: str | None,
    token: str | None,
    schedulers: tuple[str, ...],
    interval: float,
    host_sort: str,
    max_hosts: int,
    once: bool,
    as_json: bool,
) -> None:
    """A live view of a cluster: schedulers and seed peers with their health, hosts with upload and
    download rates and slots in use, tasks with progress and bytes from peers vs the origin, the selected
    task's swarm as a tree (who feeds whom), recent jobs (with a manager) and errors.

    Sources: --scheduler ENDPOINT (repeatable), or --manager URL (its active schedulers; needs --token),
    or the cluster.json of `dfz up` (--cluster, else the default data directory). Keys: up/down or j/k
    select a task, s cycles the hosts' order, q quits (Ctrl-C too, with exit status 130). Without a terminal
    use --once (or --once --json), which exits 1 when no scheduler answered.
    """
    import os

    import trio

    from .peer.endpoints import default_data_dir
    from .top.app import (
        TopError,
        TopOptions,
        dumps,
        host_sort_choice,
        print_once,
        resolve_sources,
        run_top,
        snapshot_once,
    )
    from .top.app import as_json as view_json

    if as_json and not once:
        raise click.UsageError("--json prints one view: use it with --once")
    try:
        sources = resolve_sources(
            cluster=cluster, manager=manager, schedulers=schedulers, token=token, default_dir=default_data_dir()
        )
        options = TopOptions(interval=interval, max_hosts=max_hosts, host_sort=host_sort_choice(host_sort))
    except TopError as e:
        raise click.ClickException(str(e)) from None
    if not once and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise click.UsageError("the live view needs a terminal: use --once (or --once --json) in scripts")
    if once:
        view = trio.run(snapshot_once, sources, options)
        if as_json:
            click.echo(dumps(view_json(view)))
        else:
            size = os.get_terminal_size(sys.stdout.fileno()) if sys.stdout.isatty() else None
            width = size.columns if size else _env_int("COLUMNS", 160)
            height = size.lines if size else _env_int("LINES", 48)
            print_once(view, out=sys.stdout, width=max(40, width), height=max(12, height))
        if not any(h.ok for h in view.health.values()):
            raise click.ClickException("no scheduler answered")
        return
    interrupted = False
    try:
        trio.run(run_top, sources, options)
    except* KeyboardInterrupt:  # bare, or out of run_top's nursery in a group
        interrupted = True  # the terminal is restored already (run_top's way out)
    if interrupted:
        sys.exit(130)


def _env_int(name: str, default: int) -> int:
    import os

    value = os.environ.get(name, "")
    return int(value) if value.isdigit() and 0 < int(value) < 10_000 else default


# --- dfz up ----------------------------------------------------------------------------------------------


@main.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the cluster keeps its parts (sched/, seed/, daemon/, logs/) and cluster.json "
    "[default: $DFZ_DATA_DIR, else ~/.local/share/dfz: then `dfz get` finds the daemon with no --endpoint].",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address the scheduler and piece servers bind, on free ports. 0.0.0.0 lets other machines join "
    "(unauthenticated: trusted networks only).",
)
@click.option("--no-seed", is_flag=True, help="No seed peer: the first daemon to want a file fetches it from the origin.")
@click.option("--no-manager", is_flag=True, help="No manager (dfz mgr): the schedulers and peers run on their own settings.")
@click.option(
    "--schedulers",
    "scheduler_count",
    type=click.IntRange(1, 16),
    default=1,
    show_default=True,
    metavar="N",
    help="Schedulers to run: the peers use them all, each task on one of them by consistent hashing, and move the "
    "tasks of one that stops to the next.",
)
@click.option(
    "--start-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long each part may take to start.",
)
@click.option(
    "--tenant-token",
    envvar="DFZ_TENANT_TOKEN",
    metavar="TOKEN",
    help="A daemon token of the manager's (made through its REST API at an earlier run): the seed and the daemon join "
    "its tenant [default: $DFZ_TENANT_TOKEN; none: no tenant].",
)
@click.option("-v", "--verbose", count=True, help="More logs from the parts (in DATA_DIR/logs/): -v info, -vv debug.")
def up(  # noqa: PLR0917 - click passes every option as an argument
    data_dir: Path | None,
    host: str,
    no_seed: bool,
    no_manager: bool,
    scheduler_count: int,
    start_timeout: float,
    tenant_token: str | None,
    verbose: int,
) -> None:
    """Run a whole cluster on this machine: a manager, a scheduler (or --schedulers N), a seed peer and a
    daemon, until SIGTERM or SIGINT.

    Each part is a child process (`dfz mgr`, `dfz sched`, `dfz seed`, `dfz daemon`) on free ports, with its
    own subdirectory of --data-dir (the manager's SQLite database in DATA_DIR/mgr); the schedulers and the
    seed register with the manager. Once all serve, it writes DATA_DIR/cluster.json (every endpoint, the
    manager's URL and fabric endpoint, the pids, the version) and prints how to use it:
    `dfz get URL -O FILE --endpoint ...`, or `dfz daemon --scheduler ...` (once per scheduler) or
    `dfz daemon --manager ...` to add daemons. Stopping removes cluster.json, stops the daemons, then the
    schedulers, then the manager, and exits 0 when all stopped cleanly (1 if a part failed).
    """
    import functools

    import trio

    from .cluster import UpConfig, run_up
    from .peer.endpoints import default_data_dir

    if tenant_token and no_manager:
        raise click.UsageError("--tenant-token (or $DFZ_TENANT_TOKEN) needs the manager: leave out --no-manager")
    config = UpConfig(
        data_dir=data_dir if data_dir is not None else default_data_dir(),
        host=host,
        seed=not no_seed,
        manager=not no_manager,
        schedulers=scheduler_count,
        verbose=verbose,
        start_timeout=start_timeout,
        tenant_token=tenant_token or "",
    )
    code = trio.run(functools.partial(run_up, config, echo=click.echo, error=functools.partial(click.echo, err=True)))
    sys.exit(code)


if __name__ == "__main__":
    main()
