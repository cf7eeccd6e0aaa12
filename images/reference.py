"""Image references with docker's normalization: `busybox` is docker.io/library/busybox:latest."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_PREFIX = "library/"
MAX_NAME_LENGTH = 255

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*(?::\d+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}")
_SHA256_HEX = re.compile(r"[a-f0-9]{64}")


class InvalidReferenceError(ValueError):
    """The name is not a valid image reference; the message says what is wrong with it."""


@dataclass(frozen=True)
class Reference:
    domain: str  # registry host[:port], "docker.io" for Docker Hub
    path: str  # repository path inside the registry, "library/busybox"
    tag: str | None = None
    digest: str | None = None  # "sha256:<hex>"
    original: str = field(default="", compare=False)  # the name as the user wrote it

    @property
    def name(self) -> str:
        """The normalized repository name: docker.io/library/busybox."""
        return f"{self.domain}/{self.path}"

    @property
    def locator(self) -> str:
        """What to ask the registry's manifests endpoint for: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if not sep or ("." not in first and ":" not in first and first != "localhost" and first.lower() == first):
        domain, path = DEFAULT_DOMAIN, name
    else:
        domain, path = first, rest
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_PREFIX + path
    return domain, path


def parse_reference(name: str) -> Reference:
    """Parse and normalize an image name as docker and the kubelet do; a name with neither tag
    nor digest gets the tag "latest". Raises InvalidReferenceError for a malformed name."""
    if not name or not name.strip():
        raise InvalidReferenceError("invalid reference format: the image name is empty")
    if name != name.strip():
        raise InvalidReferenceError(f"invalid reference format: {name!r} has surrounding whitespace")
    if _SHA256_HEX.fullmatch(name):
        raise InvalidReferenceError(f"invalid repository name ({name}), cannot specify 64-byte hexadecimal strings")

    rest, at, digest = name.partition("@")
    if at:
        _check_digest(name, digest)
    tag: str | None = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:  # a colon after the last slash starts the tag; before it, it is a port
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidReferenceError(f"invalid reference format: bad tag {tag!r} in {name!r}")
    if not rest:
        raise InvalidReferenceError(f"invalid reference format: {name!r} has no repository name")

    domain, path = _split_domain(rest)
    if path.lower() != path:
        raise InvalidReferenceError(f"invalid reference format: repository name must be lowercase ({name!r})")
    if not _DOMAIN.fullmatch(domain):
        raise InvalidReferenceError(f"invalid reference format: bad registry host {domain!r} in {name!r}")
    if not _PATH.fullmatch(path):
        raise InvalidReferenceError(f"invalid reference format: bad repository path {path!r} in {name!r}")
    if len(f"{domain}/{path}") > MAX_NAME_LENGTH:
        raise InvalidReferenceError(f"repository name must not be more than {MAX_NAME_LENGTH} characters")
    if tag is None and not at:
        tag = "latest"
    return Reference(domain, path, tag, digest or None, name)


def _check_digest(name: str, digest: str) -> None:
    if not _DIGEST.fullmatch(digest):
        raise InvalidReferenceError(f"invalid reference format: bad digest {digest!r} in {name!r}")
    algorithm, _, hex_part = digest.partition(":")
    if algorithm != "sha256":
        raise InvalidReferenceError(f"unsupported digest algorithm {algorithm!r} in {name!r}: only sha256 is")
    if not _SHA256_HEX.fullmatch(hex_part):
        raise InvalidReferenceError(f"invalid checksum digest format in {name!r}: sha256 needs 64 lowercase hex")
