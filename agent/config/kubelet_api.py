"""The [kubelet_api] table: the HTTPS server on the kubelet port."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.config.tables import _q, _Table

_KUBELET_API_KEYS = {
    "enabled",
    "address",
    "port",
    "tls_cert_file",
    "tls_key_file",
    "client_ca_file",
    "anonymous",
    "authorization_mode",
    "serving_cert",
}


AUTHORIZATION_MODES = ("Webhook", "AlwaysAllow")


SERVING_CERT_SOURCES = ("self-signed", "csr")


@dataclass(frozen=True)
class KubeletAPISettings:
    """[kubelet_api]: the HTTPS server on the kubelet port (logs, pods, health)."""

    enabled: bool = True
    address: str = "0.0.0.0"
    port: int | None = None  # None: 10250, or a free port when 10250 is taken; 0: always a free port
    tls_cert_file: str | None = None  # None: a self-signed certificate kept in the state dir
    tls_key_file: str | None = None
    client_ca_file: str | None = None  # None: the cluster CA from the node kubeconfig
    anonymous: bool = False
    authorization_mode: str = "Webhook"  # "Webhook" (SubjectAccessReview) | "AlwaysAllow"
    serving_cert: str = "self-signed"  # without tls_cert_file: "self-signed" | "csr" (signed by the cluster)


def _parse_kubelet_api(t: _Table, base: Path, warnings: list[str]) -> KubeletAPISettings:
    t.warn_unknown(_KUBELET_API_KEYS, warnings)
    port = t.data.get("port")
    if port is not None:
        port = t.int_("port", 0)
        if not 0 <= port <= 65535:
            raise t.error(f"port must be between 0 (any free port) and 65535, not {port}")
    mode = t.str_("authorization_mode", "Webhook")
    if mode not in AUTHORIZATION_MODES:
        raise t.error(f'authorization_mode must be "Webhook" or "AlwaysAllow", not {_q(str(mode))}')

    def path(key: str) -> str | None:
        value = t.str_(key)
        if not value:
            return None
        full = base / value  # relative to the config file, like import
        if not full.is_file():
            raise t.error(f"{key} {_q(value)} does not exist or is not a file; fix the path or remove the key")
        return str(full)

    serving_cert = t.str_("serving_cert", "self-signed")
    if serving_cert not in SERVING_CERT_SOURCES:
        raise t.error(f'serving_cert must be "self-signed" or "csr", not {_q(str(serving_cert))}')
    cert, key = path("tls_cert_file"), path("tls_key_file")
    if bool(cert) != bool(key):
        raise t.error("tls_cert_file and tls_key_file go together; set both, or neither for a self-signed certificate")
    return KubeletAPISettings(
        enabled=t.bool_("enabled", True),
        address=t.str_("address", "0.0.0.0") or "0.0.0.0",
        port=port,
        tls_cert_file=cert,
        tls_key_file=key,
        client_ca_file=path("client_ca_file"),
        anonymous=t.bool_("anonymous", False),
        authorization_mode=mode or "Webhook",
        serving_cert=serving_cert or "self-signed",
    )
