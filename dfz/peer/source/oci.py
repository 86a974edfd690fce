"""``oci://`` origins: blobs of OCI / Docker registries (distribution's HTTP API v2), read over HTTP(S) with
the :class:`~dfz.peer.source.http.HTTPBackend` (libcurl) underneath.

URL forms (``REGISTRY`` is ``host[:port]``, ``NAME`` a repository such as ``library/ubuntu``):

* ``oci://REGISTRY/NAME@sha256:HEX`` — the blob with that digest (a layer, a config, any blob). The digest is
  the content's sha256, so ``dfz get`` can check it (``--digest sha256:HEX``).
* ``oci://REGISTRY/NAME:TAG?layer=N`` or ``oci://REGISTRY/NAME@sha256:MANIFEST?layer=N`` — layer ``N``
  (0-based) of that image; an index (multi-platform image) is narrowed to ``platform=os/arch[/variant]``
  (default ``linux/amd64``), e.g. ``?layer=0&platform=linux/arm64``.
* ``oci://REGISTRY/NAME:TAG`` without ``layer=`` names a whole image, which is not one file: it is refused
  with a :class:`~dfz.peer.source.SourceRequestError` whose message lists the image's layer blob URLs and
  sizes (download them one by one, or preheat the image through the manager).

Registries on a loopback address (``localhost``, ``127.0.0.0/8``, ``[::1]``) and the ones listed in
``plain_http`` are spoken to over plain HTTP, as Docker does; every other one over HTTPS.

Authentication follows the registry's ``WWW-Authenticate`` challenge on a 401: ``Basic`` is answered with
the username and password; ``Bearer realm=...,service=...`` by asking the realm for a token with scope
``repository:NAME:pull`` (with basic auth when there are credentials, anonymously otherwise). The
``Authorization`` that worked is kept per registry and repository (a token until its ``expires_in``) and
sent with every read; a read refused later (an expired token) authenticates again once. Credentials come
from :class:`OCIOptions` (the daemon's ``oci_username`` / ``oci_password``, for every registry), else the
docker ``config.json`` at ``oci_auth_file`` (default ``$DOCKER_CONFIG/config.json``, else
``~/.docker/config.json``), per registry. Errors name the user, never the password or the token.

``stat`` is a HEAD of the blob: its length, and ``Docker-Content-Digest`` checked against the URL's digest
(a registry that serves HEAD by redirect to a storage that refuses HEAD is asked for byte 0 instead).
Reads are Range GETs; registries often redirect blobs to a storage service: libcurl follows, and does not
send the ``Authorization`` header on to another host. A blob is immutable (its name is its digest), so
the ETag reported is the digest.
"""

from __future__ import annotations

import builtins
import ipaddress
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import ClassVar, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

from dfz.ocispec import (
    DEFAULT_PLATFORM,
    DIGEST,
    MANIFEST_TYPES,
    MAX_MANIFEST,
    auth_file_credentials,
    basic_authorization,
    choose_platform,
    is_index,
    layers,
    media_type,
    parse_challenge,
)
from dfz.peer.source import (
    Chunk,
    Headers,
    MalformedURL,
    RetryPolicy,
    SourceAuthError,
    SourceBackend,
    SourceEntry,
    SourceInfo,
    SourceNotFound,
    SourceProtocolError,
    SourceRequestError,
)
from dfz.peer.source.http import HTTPAnswer, HTTPBackend

__all__ = ["OCIBackend", "OCIOptions", "OCIReference", "parse_oci_url"]

T = TypeVar("T")

# Repository names and tags as the distribution spec defines them.
_NAME = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")
_PLATFORM = re.compile(r"[a-z0-9_]+/[a-z0-9_]+(?:/[a-z0-9_]+)?")
_TOKEN_LIFETIME = 60.0  # seconds a token lives when the token service does not say (the spec's default)


@dataclass(frozen=True)
class OCIOptions:
    """Who dfz is at registries. ``username``/``password`` apply to every registry; without them the docker
    auth file ``auth_file`` (empty: ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``) is
    looked up per registry. ``plain_http``: ``host[:port]`` of registries spoken to over plain HTTP (besides
    the loopback ones)."""

    username: str = ""
    password: str = field(default="", repr=False)
    auth_file: str = ""
    plain_http: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if bool(self.username) != bool(self.password):
            raise ValueError("oci_username and oci_password go together: give both or neither")
        if len(self.username) > 256 or any(c in self.username for c in ":\r\n\0"):
            raise ValueError("oci_username must be a short name without ':' or newlines")
        for host in self.plain_http:
            if not _HOST.fullmatch(host):
                raise ValueError(f"oci_plain_http: {host!r} is not a registry host[:port]")

    def credentials(self, registry: str) -> tuple[str, str, str] | None:
        """(username, password, where they came from) for ``registry``."""
        if self.username:
            return self.username, self.password, "oci_username"
        path = self.auth_file or os.path.join(os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker"), "config.json")
        if not self.auth_file and not os.path.exists(path):
            return None
        found = auth_file_credentials(path, registry)
        return (found[0], found[1], f"auth file {path}") if found else None


@dataclass(frozen=True, slots=True)
class OCIReference:
    registry: str
    """``host[:port]`` as written."""
    name: str
    tag: str | None = None
    digest: str | None = None
    layer: int | None = None
    platform: str = ""

    @property
    def is_blob(self) -> bool:
        return self.digest is not None and self.layer is None

    def url(self, digest: str | None = None) -> str:
        """The ``oci://`` URL of a blob of this repository (``digest``), or of this reference."""
        if digest is not None:
            return f"oci://{self.registry}/{self.name}@{digest}"
        at = f"@{self.digest}" if self.digest else f":{self.tag}"
        query = {k: v for k, v in (("layer", self.layer), ("platform", self.platform)) if v not in (None, "")}
        return f"oci://{self.registry}/{self.name}{at}" + (f"?{urlencode(query)}" if query else "")


def parse_oci_url(url: str) -> OCIReference:
    """The parts of an ``oci://`` URL (see the module's docstring); :class:`MalformedURL` when it is not one."""

    def bad(why: str) -> MalformedURL:
        return MalformedURL(
            url,
            f"cannot read {url[:200]!r}: {why} (expected oci://REGISTRY/NAME@sha256:HEX for a blob, or"
            " oci://REGISTRY/NAME:TAG?layer=N[&platform=os/arch] for a layer of an image)",
        )

    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise bad(f"the URL is malformed ({e})") from None
    if parts.scheme.lower() != "oci":
        raise bad("it is not an oci:// URL")
    if not _HOST.fullmatch(parts.netloc):
        raise bad(f"{parts.netloc!r} is not a registry host[:port]")
    if parts.fragment:
        raise bad("an oci:// URL has no fragment")
    path = parts.path[1:]
    tag = digest = None
    if "@" in path:
        path, _, digest = path.partition("@")
        if not DIGEST.fullmatch(digest):
            raise bad(f"{digest[:80]!r} is not a digest such as sha256:<64 hex digits>")
    else:
        head, sep, last = path.rpartition("/")
        name_part, colon, tag = last.partition(":")
        if not colon:
            raise bad("it names no tag and no digest")
        path = f"{head}{sep}{name_part}"
        if not _TAG.fullmatch(tag):
            raise bad(f"{tag[:80]!r} is not a tag")
    if not _NAME.fullmatch(path) or len(path) > 255:
        raise bad(f"{path[:80]!r} is not a repository name (lower-case letters, digits, '.', '_', '-' and '/')")
    layer: int | None = None
    platform = ""
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True) if parts.query else []
    except ValueError:
        raise bad("the query string is malformed") from None
    for key, value in query:
        if key == "layer" and layer is None and value.isdigit() and len(value) < 5:
            layer = int(value)
        elif key == "platform" and not platform and _PLATFORM.fullmatch(value):
            platform = value
        else:
            raise bad(f"the query may only hold layer=N (N from 0) and platform=os/arch[/variant], not {key}={value[:40]!r}")
    if platform and layer is None:
        raise bad("platform= chooses the image of a layer: give layer=N too")
    return OCIReference(parts.netloc, path, tag, digest, layer, platform)


def _is_loopback(registry: str) -> bool:
    host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class _Authorization:
    value: str
    expires: float  # time.monotonic() after which it is renewed


class OCIBackend(SourceBackend):
    """``oci://`` origins. ``options``: credentials and plain-HTTP registries (:class:`OCIOptions`);
    ``http``: the HTTP backend that carries the requests (default: a new one with ``retry``)."""

    schemes: ClassVar[tuple[str, ...]] = ("oci",)

    def __init__(
        self, options: OCIOptions | None = None, *, http: HTTPBackend | None = None, retry: RetryPolicy | None = None
    ) -> None:
        self.options = options or OCIOptions()
        self.http = http or HTTPBackend(retry=retry)
        self._auth: dict[tuple[str, str], _Authorization] = {}

    # --- the interface ---

    async def stat(self, url: str, headers: Headers | None = None) -> SourceInfo:
        ref = await self._blob(url, headers)
        assert ref.digest is not None
        blob = self._blob_url(ref, ref.digest)
        answer = await self._send(ref, blob, headers, method="HEAD")
        self._check(ref, blob, answer, f"blob {ref.digest}")
        if answer.status == 200 and "content-length" in answer.headers:
            said = answer.headers.get("docker-content-digest")
            if said and said != ref.digest:
                raise SourceProtocolError(url, f"HEAD {blob}: the registry says the blob's digest is {said}, not {ref.digest}")
            try:
                length = int(answer.headers["content-length"])
            except ValueError:
                length = -1
            if length < 0:
                raise SourceProtocolError(url, f"HEAD {blob}: invalid Content-Length {answer.headers['content-length']!r}")
            return SourceInfo(url, length, True, etag=ref.digest, content_type=answer.headers.get("content-type"))
        # A HEAD the storage behind a redirect does not answer: ask for byte 0.
        info = await self._authorized(ref, lambda h: self.http.stat(blob, h), headers)
        return SourceInfo(url, info.content_length, info.supports_ranges, etag=ref.digest, content_type=info.content_type)

    async def read_range_into(
        self,
        url: str,
        start: int,
        buffer: bytearray | memoryview,
        headers: Headers | None = None,
        *,
        expect: SourceInfo | None = None,
    ) -> None:
        ref = await self._blob(url, headers)
        assert ref.digest is not None
        blob = self._blob_url(ref, ref.digest)
        inner = _inner(expect)
        await self._authorized(ref, lambda h: self.http.read_range_into(blob, start, buffer, h, expect=inner), headers)

    @asynccontextmanager
    async def stream(
        self, url: str, headers: Headers | None = None, *, expect: SourceInfo | None = None
    ) -> AsyncIterator[AsyncIterator[Chunk]]:
        ref = await self._blob(url, headers)
        assert ref.digest is not None
        blob = self._blob_url(ref, ref.digest)
        authorization = await self._authorization(ref, headers)
        async with self.http.stream(blob, _with(headers, authorization), expect=_inner(expect)) as chunks:
            yield chunks

    async def list(self, url: str, headers: Headers | None = None) -> builtins.list[SourceEntry]:
        """The layers of an image (``oci://REGISTRY/NAME:TAG`` or ``@sha256:MANIFEST``) as blob URLs."""
        ref = parse_oci_url(url)
        if ref.layer is not None:
            raise MalformedURL(url, f"cannot list {url!r}: it names one layer; list the image without ?layer=")
        return [SourceEntry(ref.url(d), size if size >= 0 else None) for d, size in await self._layers(ref, url, headers)]

    def close(self) -> None:
        self.http.close()

    # --- references ---

    async def _blob(self, url: str, headers: Headers | None) -> OCIReference:
        """The blob reference ``url`` stands for (resolving ``?layer=N`` through the manifest)."""
        ref = parse_oci_url(url)
        if ref.is_blob:
            return ref
        found = await self._layers(ref, url, headers)
        if ref.layer is None:
            listed = "; ".join(f"{ref.url(d)} ({size} bytes)" for d, size in found[:20])
            more = f"; and {len(found) - 20} more" if len(found) > 20 else ""
            raise SourceRequestError(
                url,
                f"{url} names a whole image ({len(found)} layers), not one file: download its layers one by one"
                f" ({listed}{more}), or one of them as {ref.url()}?layer=N",
            )
        if ref.layer >= len(found):
            raise SourceNotFound(url, f"{url}: the image has {len(found)} layers (0 to {len(found) - 1}), no layer {ref.layer}")
        return OCIReference(ref.registry, ref.name, digest=found[ref.layer][0])

    async def _layers(self, ref: OCIReference, url: str, headers: Headers | None) -> builtins.list[tuple[str, int]]:
        reference = ref.digest or ref.tag
        assert reference is not None
        manifest, media = await self._manifest(ref, reference, headers)
        try:
            if is_index(media, manifest):
                chosen = choose_platform(manifest, ref.platform or DEFAULT_PLATFORM)
                if not DIGEST.fullmatch(chosen):
                    raise ValueError(f"the index names an invalid manifest digest {chosen[:80]!r}")
                manifest, media = await self._manifest(ref, chosen, headers)
            return layers(manifest, url)
        except ValueError as e:
            raise SourceRequestError(url, f"{url}: {e}") from None

    async def _manifest(self, ref: OCIReference, reference: str, headers: Headers | None) -> tuple[dict[str, object], str]:
        target = f"{self._base(ref)}/v2/{ref.name}/manifests/{reference}"
        mine = {k: v for k, v in (headers or {}).items() if k.lower() != "accept"}
        mine["Accept"] = ", ".join(MANIFEST_TYPES)
        answer = await self._send(ref, target, mine)
        self._check(ref, target, answer, f"manifest {ref.name}:{reference}" if ":" not in reference else f"manifest {reference}")
        if answer.status != 200:
            raise SourceRequestError(ref.url(), f"GET {target}: the registry answered HTTP {answer.status}", answer.status)
        try:
            body = json.loads(answer.body)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise SourceProtocolError(ref.url(), f"GET {target}: the manifest is not a JSON object")
        return body, media_type(body, answer.headers.get("content-type", ""))

    # --- authentication ---

    def _base(self, ref: OCIReference) -> str:
        plain = _is_loopback(ref.registry) or ref.registry in self.options.plain_http
        return f"{'http' if plain else 'https'}://{ref.registry}"

    def _blob_url(self, ref: OCIReference, digest: str) -> str:
        return f"{self._base(ref)}/v2/{ref.name}/blobs/{digest}"

    async def _send(self, ref: OCIReference, url: str, headers: Headers | None, *, method: str = "GET") -> HTTPAnswer:
        """One request with the repository's current Authorization, answering one 401 challenge."""
        key = (ref.registry, ref.name)
        current = self._auth.get(key)
        if current is not None and current.expires <= time.monotonic():
            current = None
        authorization = current.value if current else None
        answer = await self.http.request(url, _with(headers, authorization), method=method, max_body=MAX_MANIFEST)
        if answer.status == 401 and "www-authenticate" in answer.headers:
            refused = authorization is not None
            self._auth.pop(key, None)
            authorization = await self._answer(ref, answer.headers["www-authenticate"], refused=refused)
            answer = await self.http.request(url, _with(headers, authorization), method=method, max_body=MAX_MANIFEST)
        return answer

    async def _authorization(self, ref: OCIReference, headers: Headers | None) -> str | None:
        """The Authorization to send for ``ref`` (authenticating first when none is known yet)."""
        current = self._auth.get((ref.registry, ref.name))
        if current is not None and current.expires > time.monotonic():
            return current.value
        if any(k.lower() == "authorization" for k in headers or {}):
            return None
        answer = await self._send(ref, f"{self._base(ref)}/v2/", headers)
        if answer.status in (401, 403):
            self._check(ref, f"{self._base(ref)}/v2/", answer, "API")
        current = self._auth.get((ref.registry, ref.name))
        return current.value if current else None

    async def _authorized(self, ref: OCIReference, call: Callable[[Headers], Awaitable[T]], headers: Headers | None) -> T:
        """``call(headers with Authorization)``, authenticating again once if the registry refuses it."""
        authorization = await self._authorization(ref, headers)
        try:
            return await call(_with(headers, authorization))
        except SourceAuthError:
            if authorization is None:
                raise
            self._auth.pop((ref.registry, ref.name), None)
            authorization = await self._authorization(ref, headers)
            return await call(_with(headers, authorization))

    async def _answer(self, ref: OCIReference, challenge: str, *, refused: bool) -> str:
        """The Authorization that answers ``challenge`` (kept for the repository)."""
        scheme, params = parse_challenge(challenge)
        try:
            creds = self.options.credentials(ref.registry)
        except ValueError as e:
            raise SourceAuthError(ref.url(), f"registry {ref.registry}: {e}") from None
        who = f"user {creds[0]!r} ({creds[2]})" if creds else "no credentials"
        if scheme == "basic":
            if creds is None:
                raise SourceAuthError(
                    ref.url(),
                    f"registry {ref.registry} wants a username and password for {ref.name}, and none is configured for it:"
                    " set oci_username and oci_password, or log in to it in the docker auth file (oci_auth_file)",
                )
            value, lifetime = basic_authorization(creds[0], creds[1]), float("inf")
        elif scheme == "bearer" and params.get("realm", "").startswith(("http://", "https://")):
            query = {"scope": f"repository:{ref.name}:pull"}
            if params.get("service"):
                query["service"] = params["service"]
            token_url = f"{params['realm']}{'&' if '?' in params['realm'] else '?'}{urlencode(query)}"
            auth = {"Authorization": basic_authorization(creds[0], creds[1])} if creds else {}
            answer = await self.http.request(token_url, auth, max_body=1024 * 1024)
            if answer.status in (401, 403):
                raise SourceAuthError(
                    ref.url(),
                    f"registry {ref.registry}: its token service refused {who} for repository:{ref.name}:pull"
                    f" (HTTP {answer.status}): check the username and password",
                )
            if answer.status != 200:
                raise SourceRequestError(
                    ref.url(), f"registry {ref.registry}: its token service answered HTTP {answer.status}", answer.status
                )
            try:
                body = json.loads(answer.body)
                token = body.get("token") or body.get("access_token")
                lifetime = float(body.get("expires_in") or _TOKEN_LIFETIME)
            except (ValueError, TypeError, AttributeError):
                token, lifetime = None, 0.0
            if not isinstance(token, str) or not token or any(c in token for c in "\r\n\0"):
                raise SourceProtocolError(ref.url(), f"registry {ref.registry}: its token service gave no usable token")
            value = f"Bearer {token}"
            lifetime = max(1.0, min(lifetime, 3600.0) - 10.0)
        else:
            raise SourceAuthError(
                ref.url(), f"registry {ref.registry} wants an authentication dfz does not speak: {challenge[:100]!r}"
            )
        if refused and scheme == "basic":
            raise self._refused(ref, who, 401)
        self._auth[(ref.registry, ref.name)] = _Authorization(value, time.monotonic() + lifetime)
        return value

    def _refused(self, ref: OCIReference, who: str, status: int) -> SourceAuthError:
        return SourceAuthError(
            ref.url(),
            f"registry {ref.registry} refused {who} for {ref.name} (HTTP {status}): check oci_username and oci_password"
            " (or the docker auth file), and that the user may pull this repository",
        )

    def _check(self, ref: OCIReference, target: str, answer: HTTPAnswer, what: str) -> None:
        """Raise for the answers that mean no access, or no such object."""
        if answer.status in (401, 403):
            try:
                creds = self.options.credentials(ref.registry)
            except ValueError:
                creds = None
            raise self._refused(ref, f"user {creds[0]!r} ({creds[2]})" if creds else "anonymous access", answer.status)
        if answer.status in (404, 410):
            raise SourceNotFound(ref.url(), f"registry {ref.registry} has no {what} in {ref.name} (HTTP {answer.status})")
        if answer.status >= 400:
            raise SourceRequestError(ref.url(), f"{target}: the registry answered HTTP {answer.status}", answer.status)


def _with(headers: Headers | None, authorization: str | None) -> dict[str, str]:
    out = dict(headers or {})
    if authorization is not None:
        out = {k: v for k, v in out.items() if k.lower() != "authorization"}
        out["Authorization"] = authorization
    return out


def _inner(expect: SourceInfo | None) -> SourceInfo | None:
    """What the HTTP reads check: the length only (a blob's ETag is its digest, registries quote it)."""
    return None if expect is None else replace(expect, etag=None, last_modified=None)
