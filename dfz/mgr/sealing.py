"""Secrets at rest: what the manager must keep to use later but nobody may read in its database (a preheat
job's registry password, needed again when the job resumes after a restart) is sealed with the manager's
secret key.

* **The key** is a Fernet key (32 random bytes, URL-safe base64): ``$DFZ_MGR_SECRET_KEY`` when set, else the
  file ``secret_key_file`` (default ``secret.key`` in the manager's data directory, beside its SQLite
  database), made on the first start with mode 0600. Managers sharing one database must share the key.
* **Sealing** is Fernet (``cryptography``): AES-128-CBC with a random IV and an HMAC-SHA256 over it all, so a
  sealed value cannot be read, nor changed unnoticed, without the key.
* **In a job's arguments** the ``password`` is replaced by ``password_sealed`` when the job is stored
  (:func:`seal_args`) and put back only in the runner's memory when the job runs (:func:`open_args`). A
  value sealed with another key (the key file was lost or replaced) raises :class:`SealError`: the job fails
  saying so, and the runner goes on.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from ..config import ConfigError
from ..log import event, get_logger

log = get_logger("mgr.sealing")

KEY_ENV = "DFZ_MGR_SECRET_KEY"
KEY_FILE = "secret.key"
SEALED_SUFFIX = "_sealed"
SEALED_FIELDS = ("password",)
"""The job arguments kept sealed at rest."""


class SealError(Exception):
    """A sealed value cannot be opened: another key sealed it, or it was damaged."""


class Sealer:
    """Seals and opens short secrets with one key."""

    def __init__(self, key: bytes | str) -> None:
        try:
            self._fernet = Fernet(key)
        except (ValueError, TypeError):
            raise ConfigError(
                "the manager's secret key is not a Fernet key (32 random bytes in URL-safe base64, 44 characters); "
                'make one with: python -c "import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())"'
            ) from None

    def seal(self, text: str) -> str:
        return self._fernet.encrypt(text.encode()).decode("ascii")

    def open(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode("ascii")).decode()
        except (InvalidToken, UnicodeError, ValueError):
            raise SealError("it was sealed with another secret key than this manager's, or it is damaged") from None


def load_key(path: Path, environ: Mapping[str, str] = os.environ) -> tuple[bytes, str]:
    """The manager's key and where it came from: ``$DFZ_MGR_SECRET_KEY``, else ``path``, made (mode 0600) when
    it does not exist. Raises :class:`ConfigError` when the file cannot be read or made."""
    given = environ.get(KEY_ENV, "").strip()
    if given:
        return given.encode(), f"${KEY_ENV}"
    try:
        return path.read_bytes().strip(), str(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ConfigError(f"cannot read the manager's secret key {path}: {e.strerror or e}") from None
    key = Fernet.generate_key()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    except FileExistsError:
        return path.read_bytes().strip(), str(path)  # another manager made it meanwhile
    except OSError as e:
        raise ConfigError(f"cannot make the manager's secret key {path}: {e.strerror or e}") from None
    try:
        os.write(fd, key + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    event(log, logging.WARNING, "mgr_secret_key_created", path=str(path))
    return key, str(path)


def seal_args(args: Mapping[str, Any], sealer: Sealer) -> dict[str, Any]:
    """``args`` with every non-empty secret field replaced by its sealed form (``password`` →
    ``password_sealed``)."""
    out = dict(args)
    for name in SEALED_FIELDS:
        value = out.pop(name, None)
        if isinstance(value, str) and value:
            out[name + SEALED_SUFFIX] = sealer.seal(value)
    return out


def open_args(args: Mapping[str, Any], sealer: Sealer | None) -> dict[str, Any]:
    """``args`` with the sealed fields opened (for the runner, in memory only). Raises :class:`SealError`."""
    out = dict(args)
    for name in SEALED_FIELDS:
        sealed = out.pop(name + SEALED_SUFFIX, None)
        if sealed is None:
            continue
        if sealer is None or not isinstance(sealed, str):
            raise SealError("this manager has no secret key to open it with")
        out[name] = sealer.open(sealed)
    return out


def shown_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` as the API shows them: a sealed field is shown as its plain name with ``***``."""
    out = dict(args)
    for name in SEALED_FIELDS:
        if out.pop(name + SEALED_SUFFIX, None) is not None:
            out[name] = "***"
    return out
