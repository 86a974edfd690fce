"""Where a daemon's local API is found, and the URL schemes it serves: what clients (``dfz get``) need
before they talk to a daemon, kept free of heavy imports so that a short command starts fast."""

from __future__ import annotations

import os
from pathlib import Path

API_SOCKET_NAME = "api.sock"
"""The local API's ipc socket, in the daemon's data directory."""

ENDPOINT_ENV = "DFZ_ENDPOINT"
DATA_DIR_ENV = "DFZ_DATA_DIR"


def default_data_dir() -> Path:
    """The daemon's default data directory: ``$DFZ_DATA_DIR``, else ``$XDG_DATA_HOME/dfz``, else
    ``~/.local/share/dfz``."""
    explicit = os.environ.get(DATA_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "dfz"


def default_endpoint(data_dir: Path | None = None) -> str:
    """Where clients find a daemon's API by default: ``$DFZ_ENDPOINT``, else the ipc socket
    ``api.sock`` in the data directory (``data_dir`` or :func:`default_data_dir`)."""
    if data_dir is None:
        explicit = os.environ.get(ENDPOINT_ENV)
        if explicit:
            return explicit
        data_dir = default_data_dir()
    return f"ipc://{(data_dir / API_SOCKET_NAME).absolute()}"


def builtin_schemes() -> list[str]:
    """The URL schemes of the built-in source backends (without importing any client library)."""
    from .source import BUILTIN_BACKENDS

    return sorted(BUILTIN_BACKENDS)
