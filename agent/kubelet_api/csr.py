"""A serving certificate signed by the cluster: a CertificateSigningRequest for kubernetes.io/kubelet-serving.

As the kubelet's serverTLSBootstrap: the key stays on the node, the request names the node
(CN system:node:<name>, O system:nodes) with its hostnames and IPs as SANs, and someone (an admin
with `kubectl certificate approve`, or an approver controller) approves it; the controller-manager
signs it. Until then the server keeps its self-signed certificate, and swaps in the issued one
without a restart. The issued pair is kept in <state>/pki/kubelet-server.{crt,key} and reused.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from agent.kube import ApiError, Kube
from agent.kubelet_api.tls import RENEW_BEFORE, ServingNames
from common.logfmt import kv

log = logging.getLogger(__name__)

SIGNER = "kubernetes.io/kubelet-serving"
POLL = 2.0
CSR_PATH = "/apis/certificates.k8s.io/v1/certificatesigningrequests"


def issued_files(pki_dir: Path, names: ServingNames) -> tuple[Path, Path] | None:
    """The issued pair when it covers these names and is not close to expiring, else None."""
    cert, key, note = pki_dir / "kubelet-server.crt", pki_dir / "kubelet-server.key", pki_dir / "kubelet-server.json"
    try:
        meta = json.loads(note.read_text())
        fresh = float(meta["not_after"]) - time.time() > RENEW_BEFORE
        if fresh and meta["dns"] == list(names.dns) and meta["ips"] == list(names.ips) and cert.is_file():
            return cert, key
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def make_request(node_name: str, names: ServingNames) -> tuple[bytes, bytes]:
    """(key PEM, CSR PEM) for this node's serving certificate, or with no names its client certificate."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"system:node:{node_name}"),
        ]
    )
    alt = [x509.DNSName(n) for n in names.dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in names.ips]
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if alt:  # a client certificate (agent/bootstrap) names no hosts
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def _not_after(cert_pem: bytes) -> float:
    from cryptography import x509

    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc.timestamp()


class ServingCertRequester:
    """Requests the certificate, waits for it, stores it and hands it to `install`."""

    def __init__(
        self, kube: Kube, node_name: str, names: ServingNames, pki_dir: Path, install: Callable[[Path, Path], None]
    ):
        self.kube = kube
        self.node_name = node_name
        self.names = names
        self.pki_dir = pki_dir
        self.install = install
        self.csr_name: str | None = None

    async def run(self) -> None:
        """Until a certificate is issued (a denied or deleted request is made again, after a pause)."""
        attempt = 0
        while True:
            try:
                if await self._request_once():
                    return
            except ApiError as exc:
                log.warning("serving certificate request failed; will retry", extra=kv(error=exc.describe()))
            attempt += 1
            await asyncio.sleep(min(300.0, 10.0 * attempt))

    async def _request_once(self) -> bool:
        key_pem, csr_pem = make_request(self.node_name, self.names)
        body = {
            "apiVersion": "certificates.k8s.io/v1",
            "kind": "CertificateSigningRequest",
            "metadata": {"generateName": "csr-"},
            "spec": {
                "request": base64.b64encode(csr_pem).decode(),
                "signerName": SIGNER,
                "usages": ["digital signature", "server auth"],  # an EC key: no key encipherment
            },
        }
        created = await self.kube.create(CSR_PATH, body)
        self.csr_name = created["metadata"]["name"]
        log.warning(
            "serving certificate requested; it needs an approval: kubectl certificate approve " + self.csr_name,
            extra=kv(csr=self.csr_name, signer=SIGNER),
        )
        while True:
            await asyncio.sleep(POLL)
            try:
                csr = await self.kube.get(f"{CSR_PATH}/{self.csr_name}")
            except ApiError as exc:
                if exc.not_found:
                    log.warning("serving certificate request was deleted; asking again", extra=kv(csr=self.csr_name))
                    return False
                continue  # the API server is away: keep waiting
            status = csr.get("status") or {}
            for cond in status.get("conditions") or []:
                if cond.get("type") in ("Denied", "Failed") and cond.get("status", "True") == "True":
                    log.error(
                        "serving certificate request " + cond["type"].lower(),
                        extra=kv(csr=self.csr_name, reason=cond.get("reason", ""), message=cond.get("message", "")),
                    )
                    return False
            if status.get("certificate"):
                self._store(key_pem, base64.b64decode(status["certificate"]))
                return True

    def _store(self, key_pem: bytes, cert_pem: bytes) -> None:
        self.pki_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cert, key = self.pki_dir / "kubelet-server.crt", self.pki_dir / "kubelet-server.key"
        tmp = key.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        os.replace(tmp, key)
        cert.write_bytes(cert_pem)
        meta = {"dns": list(self.names.dns), "ips": list(self.names.ips), "not_after": _not_after(cert_pem)}
        (self.pki_dir / "kubelet-server.json").write_text(json.dumps(meta))
        try:
            self.install(cert, key)
        except (OSError, ssl.SSLError) as exc:
            log.error("cannot use the issued serving certificate", extra=kv(file=str(cert), error=str(exc)))
            return
        log.info("serving certificate issued by the cluster is in use", extra=kv(csr=self.csr_name, file=str(cert)))
