#!/usr/bin/env python3
"""Install, before the tests run, every Debian package the test suite's testbeds use, in one apt-get run.

Each testbed also installs what it misses when a test first needs it (``registry_testbed.install``,
``proxy_testbed.install``, ``browser_testbed.install``, ...), but inside that test's time limit: on a fresh
machine the browser alone takes a minute or two to download and unpack. ``make test`` runs this first, so
the downloads happen once, outside any test's bound, and the tests find everything in place.

Idempotent and quick when everything is there (it only looks for commands and paths). Without root or
apt-get it says what is missing and exits 0: the tests that need a package then skip or fail saying so.
An apt-get failure is printed and also exits 0, for the same reason: the tests report it where it matters.

    python scripts/testbeds.py            # install what is missing
    python scripts/testbeds.py --check    # only list what is missing (exit 1 if anything is)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import browser_testbed  # scripts/ is sys.path[0] when this runs as a script
import pg_testdb
import proxy_testbed
import registry_testbed

APT_TIMEOUT = 1200
"""Seconds for one apt-get run (the browser, a JDK for Maven and PostgreSQL come with many libraries)."""

WANTED: dict[str, str] = {
    **registry_testbed.PACKAGES,  # docker-registry, umoci, skopeo, htpasswd (tests of oci://, preheat, the mirror)
    **proxy_testbed.PACKAGES,  # nginx, dpkg-dev, maven and its dependency plugin (the forward proxy's clients)
    "chromium": browser_testbed.PACKAGE,  # the console's browser test
    "containerd": "containerd",  # two containerd instances through the mirror
    "ctr": "containerd",
    "runc": "runc",
    "tmux": "tmux",  # dfz top's live view
    "promtool": "prometheus",  # the metrics format check
    "curl": "curl",
}
"""A command (or an absolute path) -> the Debian package that provides it."""


def _present(what: str) -> bool:
    if what.startswith("/"):
        return os.path.exists(what)
    return shutil.which(what) is not None or any(os.path.exists(f"{d}/{what}") for d in ("/usr/sbin", "/sbin"))


def missing_packages() -> list[str]:
    missing = {pkg for what, pkg in WANTED.items() if not _present(what)}
    if pg_testdb.find_bindir() is None:
        missing.add("postgresql")
    return sorted(missing)


def install(missing: list[str]) -> str | None:
    """apt-get install ``missing`` (``apt-get update`` first when the lists are stale). None on success,
    else why it failed."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=120", *missing]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT, check=False)
        if done.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=APT_TIMEOUT, check=False)
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return f"apt-get took more than {APT_TIMEOUT} s"
    if done.returncode != 0:
        return f"apt-get install failed: {done.stderr.strip()[-800:]}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="only list the missing packages (exit 1 if any)")
    args = parser.parse_args(argv)
    missing = missing_packages()
    if not missing:
        print("testbeds: every Debian package the tests use is installed", file=sys.stderr)
        return 0
    if args.check:
        print(f"testbeds: missing {' '.join(missing)}", file=sys.stderr)
        return 1
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        print(
            f"testbeds: missing {' '.join(missing)}; not root or no apt-get, so the tests that need them will "
            f"skip or fail (as root: apt-get install -y {' '.join(missing)})",
            file=sys.stderr,
        )
        return 0
    print(f"testbeds: installing {len(missing)} Debian packages for the tests: {' '.join(missing)} ...", file=sys.stderr)
    error = install(missing)
    if error is not None:
        print(f"testbeds: {error}", file=sys.stderr)
        return 0
    still = missing_packages()
    if still:
        print(f"testbeds: installed, but still missing {' '.join(still)}", file=sys.stderr)
    else:
        print("testbeds: done", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
