"""Which requests of the forward proxy go P2P, and what a proxy does to the headers it relays.

Rules of this file (no I/O; the proxy's handlers in ``forward.py``, ``tunnel.py`` and ``intercept.py`` ask it):

* A **rule** is a regular expression searched (``re.search``) in the request's absolute URL
  (``http://host[:port]/path?query``, or ``https://...`` for a request read inside an intercepted
  tunnel) and a ``direct`` flag, as Dragonfly's proxy rules are. The rules are tried in order and the
  **first match wins**: a match with ``direct = false`` sends the request through the daemon (P2P), a match
  with ``direct = true`` passes it through to the origin. A URL no rule matches passes through: nothing
  goes P2P unless a rule says so (a proxy in front of pip or apt sees index pages and metadata that change,
  and only the operator knows which URLs name immutable content).
* Only ``GET`` goes P2P. Every other method (``HEAD`` included: it is cheap at the origin and must give
  the origin's own answer) passes through, whatever the rules say.
* A ``GET`` with a body (``Content-Length`` > 0 or chunked) passes through: a P2P task is the URL's content.
* CONNECT targets are ``host:port``; the operator's ``proxy_connect_allow`` expression must match the whole
  of it (default: any host, port 443). Intercepted hosts are those whose name (no port) one of
  ``proxy_intercept``'s expressions matches whole.

Hop-by-hop headers (RFC 9110 §7.6.1) are never relayed, in either direction: ``Connection`` and every
header it names, ``Keep-Alive``, ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade`` and every
``Proxy-*`` header (``Proxy-Authorization``, ``Proxy-Connection``, ...). The proxy adds itself to ``Via``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

MAX_RULES = 1000
"""Most rules (and intercept expressions) a config may hold: every request is matched against them."""
MAX_PATTERN = 4096
"""Longest regular expression accepted, in characters."""

DEFAULT_CONNECT_ALLOW = r".+:443"
"""CONNECT is allowed to any host on port 443 unless the operator says otherwise."""

HOP_BY_HOP = frozenset({"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"})
"""Headers that belong to one connection (RFC 9110 §7.6.1); every ``proxy-*`` header is also one."""

VIA_PSEUDONYM = "dfz"
"""What the proxy writes in ``Via`` (``1.1 dfz``); a request that already carries it came round in a loop."""


class RuleError(ValueError):
    """A proxy rule or expression in the config or on the command line that cannot be used."""


class Route(StrEnum):
    P2P = "p2p"  # through the daemon: a task, served from peers or fetched once from the origin
    DIRECT = "direct"  # passed through to the origin as it is


def compile_pattern(what: str, pattern: object) -> re.Pattern[str]:
    """``pattern`` compiled, or :class:`RuleError` naming ``what`` and saying what is wrong with it."""
    if not isinstance(pattern, str) or not pattern:
        raise RuleError(f"{what}: must be a non-empty regular expression, got {pattern!r}")
    if len(pattern) > MAX_PATTERN:
        raise RuleError(f"{what}: a regular expression of at most {MAX_PATTERN} characters, got {len(pattern)}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise RuleError(f"{what}: {pattern!r} is not a valid regular expression: {e}") from None


@dataclass(frozen=True)
class ProxyRule:
    """One rule: URLs ``regex`` is found in go P2P, or pass through when ``direct``."""

    regex: str
    direct: bool = False
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)
    """``regex`` compiled (once: a config may hold more rules than ``re``'s cache)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", compile_pattern("proxy_rules: regex", self.regex))
        if not isinstance(self.direct, bool):
            raise RuleError(f"proxy_rules: direct must be true or false, got {self.direct!r}")

    @classmethod
    def from_value(cls, value: Any, index: int) -> ProxyRule:
        """A rule from the config: a table ``{regex = "...", direct = false}`` or a bare expression string."""
        if isinstance(value, str):
            try:
                return cls(value)
            except RuleError as e:
                raise RuleError(str(e).replace("proxy_rules:", f"proxy_rules[{index}]:", 1)) from None
        if not isinstance(value, Mapping):
            raise RuleError(f"proxy_rules[{index}]: a table {{regex = '...', direct = false}} or a string, got {value!r}")
        unknown = set(value) - {"regex", "direct"}
        if unknown:
            raise RuleError(f"proxy_rules[{index}]: unknown key(s) {', '.join(sorted(unknown))} (known: regex, direct)")
        if "regex" not in value:
            raise RuleError(f"proxy_rules[{index}]: regex missing")
        try:
            return cls(value["regex"], value.get("direct", False))
        except RuleError as e:
            raise RuleError(str(e).replace("proxy_rules:", f"proxy_rules[{index}]:", 1)) from None


@dataclass(frozen=True)
class ProxyPolicy:
    """The decisions of the forward proxy, from the daemon's config (``proxy_rules``, ``proxy_connect_allow``,
    ``proxy_intercept``)."""

    rules: tuple[ProxyRule, ...] = ()
    connect_allow: str = DEFAULT_CONNECT_ALLOW
    intercept: tuple[str, ...] = ()

    _connect: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _intercept: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.rules) > MAX_RULES or len(self.intercept) > MAX_RULES:
            raise RuleError(f"proxy_rules and proxy_intercept: at most {MAX_RULES} each")
        object.__setattr__(self, "_connect", compile_pattern("proxy_connect_allow", self.connect_allow))
        compiled = tuple(compile_pattern(f"proxy_intercept[{i}]", p) for i, p in enumerate(self.intercept))
        object.__setattr__(self, "_intercept", compiled)

    def route(self, method: str, url: str, *, has_body: bool = False) -> Route:
        """Where a request goes: P2P only for a ``GET`` without a body whose URL a non-direct rule matches
        first."""
        if method != "GET" or has_body:
            return Route.DIRECT
        for rule in self.rules:
            if rule.pattern.search(url):
                return Route.DIRECT if rule.direct else Route.P2P
        return Route.DIRECT

    def connect_allowed(self, host: str, port: int) -> bool:
        return self._connect.fullmatch(f"{host}:{port}") is not None

    def intercepted(self, host: str) -> bool:
        return any(pattern.fullmatch(host) for pattern in self._intercept)


def rules_from_config(value: Any) -> tuple[ProxyRule, ...]:
    """``proxy_rules`` from a config file (a list of tables or strings) or flags (strings)."""
    items: Sequence[Any] = value if isinstance(value, list | tuple) else [value]
    return tuple(r if isinstance(r, ProxyRule) else ProxyRule.from_value(r, i) for i, r in enumerate(items))


# --- headers ------------------------------------------------------------------------------------------------


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """The header names (lowercase) that ``Connection`` headers name: hop-by-hop too."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return named


def is_hop_by_hop(name: bytes, named: Collection[bytes] = frozenset()) -> bool:
    lower = name.lower()
    return lower.decode("latin-1") in HOP_BY_HOP or lower.startswith(b"proxy-") or lower in named


def end_to_end(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` without the hop-by-hop ones (those of :data:`HOP_BY_HOP`, ``Proxy-*``, and every one that
    ``Connection`` names), in their order."""
    headers = list(headers)
    named = connection_tokens(headers)
    return [(n, v) for n, v in headers if not is_hop_by_hop(n, named)]


def with_via(headers: list[tuple[bytes, bytes]], version: bytes = b"1.1") -> list[tuple[bytes, bytes]]:
    """``headers`` with this proxy appended to ``Via`` (one ``Via`` header, comma-joined as RFC 9110 allows)."""
    ours = version + b" " + VIA_PSEUDONYM.encode()
    previous = [v for n, v in headers if n.lower() == b"via"]
    rest = [(n, v) for n, v in headers if n.lower() != b"via"]
    return [*rest, (b"via", b", ".join([*previous, ours]))]


def looped(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """True when ``Via`` already names this proxy: the request came back to it (a proxy loop)."""
    for name, value in headers:
        if name.lower() == b"via":
            for hop in value.split(b","):
                parts = hop.strip().split()
                if len(parts) >= 2 and parts[1].decode("latin-1").lower() == VIA_PSEUDONYM:
                    return True
    return False


P2P_DROPPED = frozenset(
    {
        b"host",
        b"range",
        b"if-range",
        b"if-match",
        b"if-none-match",
        b"if-modified-since",
        b"if-unmodified-since",
        b"accept-encoding",
        b"content-length",
        b"expect",
        b"cache-control",
        b"pragma",
        b"via",
    }
)
"""Request headers not handed to a P2P download: the task is the URL's whole, identity-encoded content
(ranges and conditionals are answered by the proxy from the task; a compressed answer would be stored as
if it were the content), and caching directives are the proxy's business."""


MAX_TASK_HEADERS = 64
MAX_TASK_HEADER_NAME = 256
MAX_TASK_HEADER_VALUE = 4096
"""The bounds of a task's request headers on the fabric (protocol.md §14.3): a request whose headers for the
task exceed them cannot go P2P."""


def fits_a_task(headers: Sequence[tuple[str, str]]) -> bool:
    """True when ``headers`` (from :func:`p2p_headers`) can travel with a task over the fabric."""
    return len(headers) <= MAX_TASK_HEADERS and all(
        len(n) <= MAX_TASK_HEADER_NAME and len(v) <= MAX_TASK_HEADER_VALUE for n, v in headers
    )


def p2p_headers(headers: Iterable[tuple[bytes, bytes]]) -> tuple[tuple[str, str], ...]:
    """The request headers a P2P download takes to the origin (``Authorization``, ``Accept``, ``User-Agent``,
    cookies, ...): the end-to-end ones less :data:`P2P_DROPPED`."""
    return tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in end_to_end(headers) if n.lower() not in P2P_DROPPED)
