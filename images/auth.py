"""Registry credentials from kubernetes.io/dockerconfigjson Secrets, matched to images the way the
kubelet's credential keyring does, and the parsing of WWW-Authenticate challenges."""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from images.reference import DEFAULT_DOMAIN, Reference

# Keys in a docker config that mean Docker Hub.
_DOCKER_HUB_KEYS = {"index.docker.io", "docker.io", "registry-1.docker.io"}


@dataclass(frozen=True)
class Credential:
    """One username/password (or identity token) for the registries `pattern` matches."""

    pattern: str  # the docker config key as written: "registry.example.com:5000", "*.gcr.io", "host/path"
    username: str = ""
    password: str = ""
    identity_token: str = ""  # an OAuth2 refresh token ("identitytoken" in docker config)

    def __repr__(self) -> str:  # never print secrets
        return f"Credential(pattern={self.pattern!r}, username={self.username!r})"

    def matches(self, host: str, path: str = "") -> bool:
        key_host, key_path = _split_key(self.pattern)
        return _host_matches(key_host, host) and _path_matches(key_path, path)

    @property
    def specificity(self) -> tuple[int, int]:
        key_host, key_path = _split_key(self.pattern)
        return (len(key_path), len(key_host) - key_host.count("*") * 100)


def _split_key(key: str) -> tuple[str, str]:
    raw = key if "://" in key else "//" + key
    parts = urlsplit(raw)
    host = (parts.netloc or "").lower()
    path = parts.path.strip("/")
    if host in _DOCKER_HUB_KEYS or host == DEFAULT_DOMAIN:
        host, path = DEFAULT_DOMAIN, "" if path in ("v1", "v2") else path
    return host, path


def _host_matches(pattern: str, host: str) -> bool:
    """Globs per dot-separated label, as the kubelet matches (*.example.com does not match example.com);
    ports must be equal."""
    host = host.lower()
    if host in _DOCKER_HUB_KEYS:
        host = DEFAULT_DOMAIN
    pattern_name, _, pattern_port = pattern.partition(":")
    host_name, _, host_port = host.partition(":")
    if pattern_port != host_port:
        return False
    want, have = pattern_name.split("."), host_name.split(".")
    return len(want) == len(have) and all(fnmatch.fnmatchcase(h, w) for w, h in zip(want, have, strict=True))


def _path_matches(prefix: str, path: str) -> bool:
    if not prefix:
        return True
    return path == prefix or path.startswith(prefix + "/")


def _decode_entry(key: str, entry: Mapping[str, Any]) -> Credential | None:
    username, password = entry.get("username") or "", entry.get("password") or ""
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(entry["auth"]).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        username, _, password = decoded.partition(":")
    token = entry.get("identitytoken") or ""
    if not (username or password or token):
        return None
    return Credential(key, username, password, token)


def credentials_from_dockerconfigjson(secret_data: Mapping[str, Any]) -> list[Credential]:
    """Credentials from a docker config: the decoded `.dockerconfigjson` ({"auths": {...}}), the older
    `.dockercfg` map (host -> entry), or a Secret's `data` holding either key base64-encoded.
    Entries without usable credentials are skipped."""
    data: Any = secret_data
    for key in (".dockerconfigjson", ".dockercfg"):
        if key in data:
            raw = data[key]
            try:
                data = json.loads(base64.b64decode(raw) if isinstance(raw, str) else raw)
            except (binascii.Error, ValueError):
                return []
            break
    auths = data.get("auths", data) if isinstance(data, Mapping) else {}
    if not isinstance(auths, Mapping):
        return []
    found = []
    for key, entry in auths.items():
        if isinstance(entry, Mapping) and (cred := _decode_entry(str(key), entry)) is not None:
            found.append(cred)
    return found


def matching_credentials(credentials: Iterable[Credential], host: str, path: str = "") -> list[Credential]:
    """The credentials that apply to host/path, most specific first, as the kubelet's keyring orders them."""
    matched = [c for c in credentials if c.matches(host, path)]
    return sorted(matched, key=lambda c: c.specificity, reverse=True)


def credentials_for(credentials: Iterable[Credential], ref: Reference) -> list[Credential]:
    return matching_credentials(credentials, ref.domain, ref.path)


_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """WWW-Authenticate: 'Bearer realm="...",service="...",scope="..."' -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for m in _CHALLENGE_PARAM.finditer(rest):
        params[m.group(1).lower()] = m.group(2) if m.group(2) is not None else m.group(3)
    return scheme.lower(), params
