"""What every dfz component's configuration file has in common: TOML, and one error class whose
message names the file and the key. Each component keeps its own settings dataclass."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value (or file) that cannot be used; the message names the key and the source."""


def read_toml(path: str | Path) -> dict[str, Any]:
    """The TOML file at ``path`` as a dict; :class:`ConfigError` when it cannot be read or parsed."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
