"""Recursive downloads: where each listed object goes, checked so that a hostile listing cannot write outside
the chosen directory. Pure functions, no I/O; used by the daemon (``api.list_source``) and by ``dfz get -r``.

* :func:`relative_path` turns a listed entry's URL into its path below the listed URL, for any backend: the
  entry must have the listed URL's scheme and host (``file://localhost`` and ``file://`` are one host) and a
  path that starts with the listed URL's path taken as a directory. Entries elsewhere raise
  :class:`UnsafePath`: a backend must never list outside the prefix it was asked for.
* :func:`check_relative_path` is the rule every relative path obeys: ``/``-separated, not empty, not
  absolute, no empty, ``.`` or ``..`` component, no NUL or other control character, no backslash, at most
  :data:`MAX_RELATIVE_PATH` characters and :data:`MAX_COMPONENT` characters per component.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from dfz.peer.source import display_url

__all__ = ["MAX_COMPONENT", "MAX_RELATIVE_PATH", "UnsafePath", "check_relative_path", "directory_url", "relative_path"]

MAX_RELATIVE_PATH = 4096
MAX_COMPONENT = 255


class UnsafePath(ValueError):
    """A listed entry whose path is outside the listed URL, or unfit for a file below a directory."""


def check_relative_path(path: str) -> str:
    """``path`` when it is a safe relative path (module docstring); :class:`UnsafePath` otherwise."""
    shown = repr(path[:120])
    if not path:
        raise UnsafePath("an empty relative path")
    if len(path) > MAX_RELATIVE_PATH:
        raise UnsafePath(f"relative path {shown}… is over {MAX_RELATIVE_PATH} characters")
    if path.startswith("/"):
        raise UnsafePath(f"relative path {shown} is absolute")
    if any(ord(c) < 0x20 or c == "\x7f" for c in path):
        raise UnsafePath(f"relative path {shown} holds a NUL or another control character")
    if "\\" in path:
        raise UnsafePath(f"relative path {shown} holds a backslash")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePath(f"relative path {shown} has an empty, '.' or '..' component")
        if len(part) > MAX_COMPONENT:
            raise UnsafePath(f"relative path {shown} has a component over {MAX_COMPONENT} characters")
    return path


def directory_url(url: str) -> str:
    """``url`` with its path ending in ``/`` (a listed URL names a directory or a prefix)."""
    parts = urlsplit(url)
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return parts._replace(path=path).geturl()


def _host(scheme: str, netloc: str) -> str:
    host = netloc.lower()
    return "" if scheme == "file" and host == "localhost" else host


def relative_path(base_url: str, entry_url: str) -> str:
    """The path of ``entry_url`` below ``base_url`` (percent-decoded, ``/``-separated), checked with
    :func:`check_relative_path`; :class:`UnsafePath` when the entry is not below the base.

    A revision written after the path (``hf://OWNER/REPO@REV``, whose entries are
    ``hf://OWNER/REPO/PATH@REV``, or none for the default revision) is left out of both when the plain rule
    does not place the entry: the last component of the base's path holds ``@`` and the rest follows it."""
    try:
        return _below(base_url, entry_url)
    except UnsafePath:
        base, entry = urlsplit(base_url), urlsplit(entry_url)  # parsed fine by _below
        head, at, revision = base.path.rpartition("@")
        if not at or not head or "/" in revision:
            raise
        entry_path = entry.path.removesuffix(at + revision)
        return _below(base._replace(path=head).geturl(), entry._replace(path=entry_path).geturl())


def _below(base_url: str, entry_url: str) -> str:
    try:
        base, entry = urlsplit(base_url), urlsplit(entry_url)
    except ValueError as e:
        raise UnsafePath(f"a listed URL is malformed ({e})") from None
    scheme = base.scheme.lower()
    if entry.scheme.lower() != scheme or _host(scheme, entry.netloc) != _host(scheme, base.netloc):
        raise UnsafePath(f"listed entry {display_url(entry_url)} is on another scheme or host than {display_url(base_url)}")
    try:
        prefix = unquote(base.path, errors="strict")
        path = unquote(entry.path, errors="strict")
    except UnicodeDecodeError:
        raise UnsafePath(f"listed entry {display_url(entry_url)}: its percent-encoding is not UTF-8") from None
    if not prefix.endswith("/"):
        prefix += "/"
    if not path.startswith(prefix):
        raise UnsafePath(f"listed entry {display_url(entry_url)} is not below {display_url(base_url)}")
    return check_relative_path(path[len(prefix) :])
