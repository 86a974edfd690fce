"""An image preheat's first step: resolve an image's manifest URL into the URLs of its layer and config
blobs, with the headers the registry wants for them.

``https://HOST/v2/NAME/manifests/REFERENCE`` is fetched (accepting OCI and Docker manifests and indexes);
an index (manifest list) is narrowed to the requested platform (``os/arch[/variant]``, default
``linux/amd64``) and that manifest fetched by digest. Its layers, then its config blob, become
``https://HOST/v2/NAME/blobs/DIGEST``, each with its digest (what the preheat names the task by, as the
registry mirror does, so that a pull through a daemon's mirror finds the preheated blobs).

Authentication follows the registry's ``WWW-Authenticate`` challenge on a 401: ``Basic`` is answered with
the username and password; ``Bearer realm=...,service=...,scope=...`` by asking the realm for a token
(with basic auth when a username is given, anonymously otherwise) and sending ``Authorization: Bearer``.
The ``Authorization`` header that worked for the manifest is the one handed on for the blobs (a token for
``repository:NAME:pull`` covers them). Headers the caller gave are sent too (and win over ours, except
``Authorization`` when a challenge was answered).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import httpx

from dfz.ocispec import (
    ANY_DIGEST,
    DEFAULT_PLATFORM,
    MANIFEST_TYPES,
    MAX_MANIFEST,
    basic_authorization,
    is_index,
    layers,
    media_type,
)
from dfz.ocispec import choose_platform as _choose_platform
from dfz.ocispec import parse_challenge as _challenge

__all__ = ["DEFAULT_PLATFORM", "ImageError", "ImageRef", "ResolvedImage", "choose_platform", "resolve_image"]


class ImageError(Exception):
    """The image cannot be resolved: the message says why (for the job's result)."""


@dataclass(frozen=True)
class ImageRef:
    base: str
    """``scheme://host``."""
    name: str
    reference: str

    def manifest_url(self, reference: str | None = None) -> str:
        return f"{self.base}/v2/{self.name}/manifests/{reference or self.reference}"

    def blob_url(self, digest: str) -> str:
        return f"{self.base}/v2/{self.name}/blobs/{digest}"


@dataclass
class ResolvedImage:
    ref: ImageRef
    manifest_digest: str
    blobs: list[str] = field(default_factory=list)
    """Blob URLs: the layers in the manifest's order, then the config blob."""
    digests: list[str] = field(default_factory=list)
    """The digest of each blob of :attr:`blobs` (as the manifest gives it)."""
    sizes: list[int] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    """What to send with each blob request (the caller's headers and the registry's Authorization)."""


def parse_manifest_url(url: str) -> ImageRef:
    parts = urlsplit(url)
    match = re.fullmatch(r"/v2/(.+)/manifests/([^/]+)", parts.path)
    if parts.scheme not in ("http", "https") or not parts.netloc or match is None:
        raise ImageError(f"{url!r} is not an image manifest URL such as https://HOST/v2/NAME/manifests/TAG")
    return ImageRef(urlunsplit((parts.scheme, parts.netloc, "", "", "")), match[1], match[2])


class _Fetcher:
    def __init__(self, client: httpx.AsyncClient, headers: dict[str, str], username: str, password: str) -> None:
        self.client = client
        self.headers = dict(headers)
        self.username = username
        self.password = password
        self.authorization: str | None = next((v for k, v in headers.items() if k.lower() == "authorization"), None)

    async def get(self, url: str) -> httpx.Response:
        answer = await self._get(url)
        if answer.status_code == 401 and "www-authenticate" in answer.headers:
            self.authorization = await self._answer(answer.headers["www-authenticate"])
            answer = await self._get(url)
        if answer.status_code in (401, 403):
            raise ImageError(f"the registry refused {url} ({answer.status_code}): check username and password")
        if answer.status_code == 404:
            raise ImageError(f"the registry has no {url} (404)")
        if answer.status_code != 200:
            raise ImageError(f"the registry answered {answer.status_code} for {url}")
        if len(answer.content) > MAX_MANIFEST:
            raise ImageError(f"the manifest at {url} is over {MAX_MANIFEST} bytes")
        return answer

    async def _get(self, url: str) -> httpx.Response:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("authorization", "accept")}
        headers["Accept"] = ", ".join(MANIFEST_TYPES)
        if self.authorization:
            headers["Authorization"] = self.authorization
        try:
            return await self.client.get(url, headers=headers)
        except httpx.HTTPError as e:
            raise ImageError(f"cannot reach the registry for {url}: {e!r}") from None

    async def _answer(self, header: str) -> str:
        scheme, params = _challenge(header)
        if scheme == "basic":
            if not self.username:
                raise ImageError("the registry wants basic authentication: give username and password")
            return basic_authorization(self.username, self.password)
        if scheme != "bearer" or "realm" not in params:
            raise ImageError(f"the registry wants an authentication dfz does not speak: {header[:200]}")
        query = {k: params[k] for k in ("service", "scope") if params.get(k)}
        auth = {"Authorization": basic_authorization(self.username, self.password)} if self.username else {}
        try:
            answer = await self.client.get(params["realm"], params=query, headers=auth)
        except httpx.HTTPError as e:
            raise ImageError(f"cannot reach the registry's token service {params['realm']}: {e!r}") from None
        if answer.status_code != 200:
            raise ImageError(f"the registry's token service answered {answer.status_code}: check username and password")
        try:
            body = answer.json()
            token = body.get("token") or body.get("access_token")
        except ValueError:
            token = None
        if not isinstance(token, str) or not token:
            raise ImageError("the registry's token service gave no token")
        return f"Bearer {token}"


def choose_platform(index: dict[str, object], platform: str) -> str:
    """The digest of the manifest in ``index`` for ``platform`` (``os/arch[/variant]``)."""
    try:
        return _choose_platform(index, platform)
    except ValueError as e:
        raise ImageError(str(e)) from None


async def resolve_image(
    url: str,
    *,
    headers: dict[str, str] | None = None,
    username: str = "",
    password: str = "",
    platform: str = "",
    request_timeout: float = 30.0,
) -> ResolvedImage:
    """The layer blobs of the image at manifest ``url`` (see the module's docstring). Raises :class:`ImageError`."""
    ref = parse_manifest_url(url)
    async with httpx.AsyncClient(timeout=request_timeout, follow_redirects=True) as client:
        fetch = _Fetcher(client, headers or {}, username, password)
        answer = await fetch.get(ref.manifest_url())
        manifest = _json(answer)
        media = media_type(manifest, str(answer.headers.get("content-type", "")))
        digest = answer.headers.get("docker-content-digest", "")
        if is_index(media, manifest):
            digest = choose_platform(manifest, platform)
            answer = await fetch.get(ref.manifest_url(digest))
            manifest = _json(answer)
        try:
            found = layers(manifest, url)
        except ValueError as e:
            raise ImageError(str(e)) from None
        config = _config_blob(manifest)
        resolved = ResolvedImage(ref, digest)
        for d, size in [*found, *([config] if config is not None else [])]:
            if d in resolved.digests:
                continue  # a blob listed twice (the same layer twice): one task
            resolved.blobs.append(ref.blob_url(d))
            resolved.digests.append(d)
            resolved.sizes.append(size)
        blob_headers = {k: v for k, v in (headers or {}).items() if k.lower() != "authorization"}
        if fetch.authorization:
            blob_headers["Authorization"] = fetch.authorization
        resolved.headers = blob_headers
        return resolved


def _config_blob(manifest: dict[str, object]) -> tuple[str, int] | None:
    """(digest, size or -1) of the manifest's config blob; None when it names none (or not validly)."""
    config = manifest.get("config")
    d = config.get("digest") if isinstance(config, dict) else None
    if not isinstance(config, dict) or not isinstance(d, str) or not ANY_DIGEST.fullmatch(d):
        return None
    size = config.get("size")
    return d, size if isinstance(size, int) and not isinstance(size, bool) else -1


def _json(answer: httpx.Response) -> dict[str, object]:
    try:
        body = answer.json()
    except ValueError:
        raise ImageError(f"the manifest at {answer.request.url} is not JSON") from None
    if not isinstance(body, dict):
        raise ImageError(f"the manifest at {answer.request.url} is not a JSON object")
    return body
