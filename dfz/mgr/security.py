"""Secrets and permissions of the manager: password hashes, token secrets, and who may do what.

Passwords are hashed with scrypt (stdlib ``hashlib``, memory-hard; parameters in the stored string so they
can grow). Personal access tokens and session secrets are 256-bit random strings: a fast SHA-256 digest
is enough to store them (nothing to brute-force), and lets a request find its token by an indexed lookup.

Permissions: each of the manager's resources belongs to a **group** (:data:`PERMISSION_GROUPS`). A role
grants a list of ``group`` (read and write), ``group:read`` (read only) or ``*`` (everything); a token's
scopes are in the same words. A request through a token is allowed only when both its user's role and
the token's scopes allow it, so a token never exceeds its user.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from typing import Literal

Action = Literal["read", "write"]

PERMISSION_GROUPS: dict[str, str] = {
    "cluster": "scheduler clusters, seed-peer clusters, schedulers, seed peers and hosts",
    "job": "jobs (preheat, task look-up and deletion)",
    "config": "dynamic configs",
    "application": "applications",
    "tenant": "tenants",
    "user": "users, roles, and other users' tokens",
    "audit": "the audit log (read only)",
    "token": "one's own personal access tokens",
    "daemon": "daemon tokens, which put daemons in a tenant",
}
"""Every permission group and what it covers."""

ALL = "*"
TOKEN_PREFIX = "dfz_"
DAEMON_TOKEN_PREFIX = "dfzd_"
"""Daemon tokens (``/api/v1/daemon-tokens``) start with this, personal access tokens with :data:`TOKEN_PREFIX`."""
SESSION_COOKIE = "dfz_session"

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def valid_permission(word: str) -> bool:
    """Whether ``word`` is ``*``, a group, or ``group:read`` / ``group:write``."""
    if word == ALL:
        return True
    group, _, action = word.partition(":")
    return group in PERMISSION_GROUPS and action in ("", "read", "write")


def allows(granted: Iterable[str], group: str, action: Action) -> bool:
    """Whether the permissions ``granted`` allow ``action`` on ``group``."""
    assert group in PERMISSION_GROUPS, group
    words = set(granted)
    return ALL in words or group in words or f"{group}:{action}" in words


def covers(granted: Iterable[str], wanted: str) -> bool:
    """Whether ``granted`` includes everything the permission word ``wanted`` allows (for tokens: a
    user may only hand out what the user's role has)."""
    words = list(granted)
    if wanted == ALL:
        return ALL in words
    group, _, action = wanted.partition(":")
    if action:
        return allows(words, group, "read" if action == "read" else "write")
    return allows(words, group, "read") and allows(words, group, "write")


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, maxmem=64 * 1024 * 1024)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (a :func:`hash_password` string); constant time."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.urlsafe_b64decode(digest + "==")
        actual = hashlib.scrypt(
            password.encode(),
            salt=base64.urlsafe_b64decode(salt + "=="),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=64 * 1024 * 1024,
            dklen=len(expected),
        )
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def new_secret(prefix: str = TOKEN_PREFIX) -> str:
    """A fresh token or session secret: ``prefix`` and 43 URL-safe characters (256 bits)."""
    return prefix + secrets.token_urlsafe(32)


def secret_digest(secret: str) -> str:
    """What is stored of a secret: its SHA-256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_password() -> str:
    """A generated password for the first root user (shown once)."""
    return secrets.token_urlsafe(18)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")
