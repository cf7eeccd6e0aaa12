"""Reads a kubeconfig into what one HTTPS session needs: server URL, TLS context, credentials.

Covers what node kubeconfigs use (client certificate and key, as files or
inline data; bearer token or token file; basic auth). Importing
kubernetes_asyncio for this would cost about 60 MiB of RSS in an agent
that otherwise idles near 45 MiB, so it is only the fallback for
kubeconfigs that need its exec or auth-provider plugins (see kube.py).
"""

from __future__ import annotations

import base64
import contextlib
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class KubeconfigError(Exception):
    """The kubeconfig cannot be read or names no usable cluster: not worth retrying."""


class NeedsPlugin(Exception):
    """The user entry needs an exec or auth-provider plugin."""


@dataclass(frozen=True)
class ClientConfig:
    server: str
    ssl: ssl.SSLContext | bool  # False for plain http
    token: str | None = None
    token_file: str | None = None
    basic_auth: tuple[str, str] | None = None

    def auth_header(self) -> str | None:
        if self.token_file:
            # Re-read each time: projected tokens are rotated on disk.
            with contextlib.suppress(OSError):
                return "Bearer " + Path(self.token_file).read_text().strip()
        if self.token:
            return "Bearer " + self.token
        if self.basic_auth:
            raw = f"{self.basic_auth[0]}:{self.basic_auth[1]}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        return None


def _named(entries: Any, name: str, kind: str, path: str) -> dict[str, Any]:
    for entry in entries or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry.get(kind) or {}
    raise KubeconfigError(f"kubeconfig {path}: no {kind} named {name!r}")


def _resolve(base: Path, value: str) -> str:
    return value if os.path.isabs(value) else str(base / value)


@contextlib.contextmanager
def _material(base: Path, entry: dict[str, Any], file_key: str, data_key: str):
    """A file path for a certificate or key given as a path or as inline base64 data.
    Inline data goes to a private temporary file deleted as soon as it is loaded."""
    if entry.get(file_key):
        yield _resolve(base, entry[file_key])
        return
    if not entry.get(data_key):
        yield None
        return
    fd, tmp = tempfile.mkstemp(prefix="kubelet-emu-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64decode(entry[data_key]))
        yield tmp
    finally:
        os.unlink(tmp)


def load(path: str) -> ClientConfig:
    """Raises KubeconfigError (unusable) or NeedsPlugin (use kubernetes_asyncio instead)."""
    if not os.path.isfile(path):
        raise KubeconfigError(f"kubeconfig {path}: file not found")
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())  # YAML errors span lines; keep one
        raise KubeconfigError(f"kubeconfig {path}: {detail}") from exc
    if not isinstance(doc, dict):
        raise KubeconfigError(f"kubeconfig {path}: not a kubeconfig (expected a YAML mapping)")
    current = doc.get("current-context")
    if not current:
        raise KubeconfigError(f"kubeconfig {path}: no current-context is set")
    context = _named(doc.get("contexts"), current, "context", path)
    cluster = _named(doc.get("clusters"), context.get("cluster", ""), "cluster", path)
    user = _named(doc.get("users"), context.get("user", ""), "user", path) if context.get("user") else {}
    if user.get("exec") or user.get("auth-provider"):
        raise NeedsPlugin()
    server = str(cluster.get("server") or "").rstrip("/")
    if not server.startswith(("https://", "http://")):
        raise KubeconfigError(f"kubeconfig {path}: cluster {context.get('cluster')!r} has no https:// server URL")
    base = Path(path).resolve().parent
    context_ssl: ssl.SSLContext | bool = False
    if server.startswith("https://"):
        try:
            with _material(base, cluster, "certificate-authority", "certificate-authority-data") as ca:
                context_ssl = ssl.create_default_context(cafile=ca)
            with (
                _material(base, user, "client-certificate", "client-certificate-data") as cert,
                _material(base, user, "client-key", "client-key-data") as key,
            ):
                if cert:
                    context_ssl.load_cert_chain(cert, keyfile=key)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise KubeconfigError(f"kubeconfig {path}: cannot load its certificates: {exc}") from exc
        if cluster.get("insecure-skip-tls-verify"):
            context_ssl.check_hostname = False
            context_ssl.verify_mode = ssl.CERT_NONE
    token_file = user.get("tokenFile")
    basic = (user["username"], user.get("password", "")) if user.get("username") else None
    return ClientConfig(
        server=server,
        ssl=context_ssl,
        token=user.get("token"),
        token_file=_resolve(base, token_file) if token_file else None,
        basic_auth=basic,
    )


def cluster_ca(path: str) -> bytes | None:
    """The PEM of the current cluster's certificate-authority (file or inline data), or None.

    The kubelet API trusts it for client certificates by default: it is the CA that signs the
    API server's kubelet client certificate in a kubeadm-style cluster (and in the dev cluster).
    """
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
        context = _named(doc.get("contexts"), doc.get("current-context", ""), "context", path)
        cluster = _named(doc.get("clusters"), context.get("cluster", ""), "cluster", path)
    except (OSError, yaml.YAMLError, AttributeError, KubeconfigError):
        return None
    if cluster.get("certificate-authority-data"):
        try:
            return base64.b64decode(cluster["certificate-authority-data"])
        except ValueError:
            return None
    if cluster.get("certificate-authority"):
        try:
            return Path(_resolve(Path(path).resolve().parent, cluster["certificate-authority"])).read_bytes()
        except OSError:
            return None
    return None


def client_certificate(path: str) -> tuple[bytes | None, str | None]:
    """(PEM, file path or None for inline data) of the current user's client certificate;
    (None, path) when the kubeconfig names a file that cannot be read, (None, None) when the user
    has no client certificate (or the kubeconfig cannot be read: load() reports that)."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
        context = _named(doc.get("contexts"), doc.get("current-context", ""), "context", path)
        user = _named(doc.get("users"), context.get("user", ""), "user", path) if context.get("user") else {}
    except (OSError, yaml.YAMLError, AttributeError, KubeconfigError):
        return None, None
    if user.get("client-certificate"):
        file = _resolve(Path(path).resolve().parent, user["client-certificate"])
        try:
            return Path(file).read_bytes(), file
        except OSError:
            return None, file
    if user.get("client-certificate-data"):
        try:
            return base64.b64decode(user["client-certificate-data"]), None
        except ValueError:
            return None, None
    return None, None
