"""Structured logs: one event a line, ``event key=value ...``, quiet (WARNING) unless asked for more.

Every dfz module logs through :func:`event`, so the format and the quiet default live here only.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

_ROOT = "dfz"


def _fmt(value: Any) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def event(logger: logging.Logger, level: int, name: str, /, **fields: Any) -> None:
    """Log the event ``name`` with its fields, formatted only when the level is enabled."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", " ".join([name, *(f"{k}={_fmt(v)}" for k, v in fields.items())]))


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{_ROOT}.{name}")


def setup(verbosity: int = 0) -> None:
    """Configure the ``dfz`` loggers for a process: WARNING by default, INFO with -v, DEBUG with -vv."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger(_ROOT)
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
