"""What the manager's image preheat (:mod:`dfz.mgr.oci`) and the peers' ``oci://`` source
(:mod:`dfz.peer.source.oci`) both need to know about OCI registries, whatever HTTP client each uses: media
types, ``WWW-Authenticate`` challenges, Basic credentials, docker ``config.json`` auth files, choosing a
platform in an index and the layers of a manifest. Pure functions; errors are :class:`ValueError` whose
message says what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from pathlib import Path

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = frozenset(MANIFEST_TYPES[:2])
MAX_MANIFEST = 4 * 1024 * 1024
MAX_LAYERS = 1000
DEFAULT_PLATFORM = "linux/amd64"
DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")
"""The digests dfz accepts in references (the algorithms the OCI spec registers)."""
ANY_DIGEST = re.compile(r"[a-z0-9]+:[a-f0-9]{32,128}")
"""A digest of any algorithm as an image manifest may give it (`algorithm:hex`)."""


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="..."`` -> (``"bearer"``, {realm, service, ...}) (names lower-cased)."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    return scheme.lower(), params


def basic_authorization(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def auth_file_credentials(path: str | Path, registry: str) -> tuple[str, str] | None:
    """(username, password) for ``registry`` (``host[:port]``) from a docker ``config.json`` (its ``auths``
    entries: ``auth`` = base64 of ``user:password``, or ``username`` + ``password``); None when it has none.
    Keys may be written ``host``, ``https://host`` or ``https://host/v1/``. Credential helpers
    (``credsStore``) are not run. A file that cannot be read or parsed raises :class:`ValueError`
    (naming the file, never its secrets)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the registry auth file {str(path)!r}: {type(e).__name__}") from None
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, Mapping):
        return None
    for key, entry in auths.items():
        host = re.sub(r"^https?://", "", str(key)).split("/", 1)[0]
        if host != registry or not isinstance(entry, Mapping):
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, sep, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                sep = ""
            if not sep:
                raise ValueError(f"the registry auth file {str(path)!r} has an invalid 'auth' for {registry}")
            return user, password
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return entry["username"], entry["password"]
    return None


def _platform_key(platform: str) -> tuple[str, str, str]:
    parts = platform.split("/")
    return parts[0], parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 else ""


def choose_platform(index: Mapping[str, object], platform: str) -> str:
    """The digest of the manifest in ``index`` for ``platform`` (``os/arch[/variant]``)."""
    want_os, want_arch, want_variant = _platform_key(platform or DEFAULT_PLATFORM)
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise ValueError("the index has no manifests")
    seen: list[str] = []
    for entry in manifests:
        if not isinstance(entry, dict):
            continue
        p = entry.get("platform")
        if not isinstance(p, dict):
            continue
        os_, arch, variant = str(p.get("os", "")), str(p.get("architecture", "")), str(p.get("variant", ""))
        seen.append("/".join(x for x in (os_, arch, variant) if x))
        if os_ == want_os and arch == want_arch and (not want_variant or variant == want_variant):
            digest = entry.get("digest")
            if isinstance(digest, str):
                return digest
    raise ValueError(f"the image has no manifest for {platform or DEFAULT_PLATFORM} (it has: {', '.join(seen) or 'none'})")


def is_index(media_type: str, manifest: Mapping[str, object]) -> bool:
    return media_type in INDEX_TYPES or "manifests" in manifest


def media_type(manifest: Mapping[str, object], content_type: str) -> str:
    """The manifest's ``mediaType``, else the answer's Content-Type (without parameters)."""
    media = manifest.get("mediaType")
    if isinstance(media, str) and media:
        return media
    return content_type.split(";", maxsplit=1)[0].strip()


def layers(manifest: Mapping[str, object], where: str) -> list[tuple[str, int]]:
    """(digest, size or -1) of each layer of an image manifest, in order."""
    found = manifest.get("layers")
    if not isinstance(found, list) or not found:
        raise ValueError(f"the manifest of {where} lists no layers")
    if len(found) > MAX_LAYERS:
        raise ValueError(f"the manifest lists {len(found)} layers, over {MAX_LAYERS}")
    out: list[tuple[str, int]] = []
    for layer in found:
        d = layer.get("digest") if isinstance(layer, dict) else None
        if not isinstance(d, str) or not ANY_DIGEST.fullmatch(d):
            raise ValueError(f"the manifest has a layer without a valid digest: {layer!r:.200}")
        size = layer.get("size") if isinstance(layer, dict) else None
        out.append((d, size if isinstance(size, int) and not isinstance(size, bool) else -1))
    return out
