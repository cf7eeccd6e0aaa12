"""Request paths: what the kubelet authorizes them as, and which names they may carry.

The subresource mapping is the kubelet's (pkg/kubelet/server/auth.go, v1.36, where the fine-grained
authorization is GA): a request is allowed when any of its attributes is. /containerLogs is `proxy`,
not `log` (only /logs/, the node's own log directory, is `log`).
"""

from __future__ import annotations

import re

VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}

# Namespaces and container names are DNS labels; Pod names are DNS subdomains.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def is_subpath(path: str, prefix: str) -> bool:
    """The kubelet's isSubpath: `path` is `prefix` or below it."""
    prefix = prefix.rstrip("/")
    return path == prefix or (path.startswith(prefix) and path[len(prefix)] == "/")


def subresources(path: str) -> list[str]:
    """The nodes/<subresource>s a request on `path` is authorized as, in the kubelet's order."""
    out: list[str] = []
    if is_subpath(path, "/pods") or is_subpath(path, "/runningpods/"):
        out.append("pods")
    elif is_subpath(path, "/healthz"):
        out.append("healthz")
    elif is_subpath(path, "/configz"):
        out.append("configz")
    for prefix, sub in (
        ("/stats/", "stats"),
        ("/metrics", "metrics"),
        ("/logs/", "log"),
        ("/checkpoint/", "checkpoint"),
        ("/statusz", "statusz"),
        ("/flagz", "configz"),
    ):
        if is_subpath(path, prefix):
            out.append(sub)
            return out
    out.append("proxy")
    return out


def verb(method: str) -> str:
    """The API verb for an HTTP method ("" for others, as the kubelet leaves it)."""
    return VERBS.get(method.upper(), "")


def is_namespace(name: str) -> bool:
    return len(name) <= 63 and _DNS_LABEL.fullmatch(name) is not None


def is_pod_name(name: str) -> bool:
    return len(name) <= 253 and _DNS_SUBDOMAIN.fullmatch(name) is not None


def is_container_name(name: str) -> bool:
    return len(name) <= 63 and _DNS_LABEL.fullmatch(name) is not None


def invalid_name(namespace: str, pod: str, container: str | None = None) -> str | None:
    """Why these names cannot be a Pod's (a message), or None when they can. Rejects `..`, `/`
    and everything else a path could be steered with, before any file is touched."""
    if not is_namespace(namespace):
        return f"invalid namespace {namespace!r}: must be a DNS label"
    if not is_pod_name(pod):
        return f"invalid pod name {pod!r}: must be a DNS subdomain"
    if container is not None and not is_container_name(container):
        return f"invalid container name {container!r}: must be a DNS label"
    return None
