"""Headless Chromium for the console's tests: Debian's ``chromium``, driven by PyPI ``playwright`` (its Python
package carries its driver) through ``executable_path``: Playwright's own browser downloads are never used.

:func:`install` installs the Debian package when the binary is missing (as root, ``apt-get install``, then
``apt-get update`` and again when the first attempt fails); :func:`launch` starts a headless browser with a
fresh profile and the flags of TESTBEDS.md (no sandbox: tests run as root; no network beyond 127.0.0.1).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Playwright

PACKAGE = "chromium"
BINARIES = ("chromium", "chromium-browser")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


class BrowserUnavailable(Exception):
    """Chromium (or Playwright) cannot be had on this machine; the message says why and what to do."""


def executable() -> str | None:
    for name in BINARIES:
        found = shutil.which(name)
        if found:
            return found
    return None


def install() -> str:
    """The path of the chromium binary, installing Debian's package first when it is missing (root only)."""
    found = executable()
    if found:
        return found
    if os.geteuid() != 0:
        raise BrowserUnavailable(f"chromium is not installed and this is not root: apt-get install -y {PACKAGE}")
    if shutil.which("apt-get") is None:
        raise BrowserUnavailable("chromium is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", PACKAGE]
    if subprocess.run(command, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BrowserUnavailable(f"apt-get install {PACKAGE} failed: {done.stderr.strip()[-500:]}")
    found = executable()
    if not found:
        raise BrowserUnavailable(f"installed {PACKAGE}, but no chromium binary is on PATH")
    return found


def launch(playwright: Playwright) -> Browser:
    """A headless Chromium (Debian's). Playwright gives it a fresh profile directory of its own (it refuses
    ``--user-data-dir`` with ``launch``), removed when the browser closes."""
    return playwright.chromium.launch(executable_path=install(), headless=True, args=list(FLAGS))
