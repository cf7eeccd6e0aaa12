"""A node client certificate through a CertificateSigningRequest, as the kubelet's TLS bootstrap and
certificate manager make it, and the files the kubelet keeps it in.

The request: signer kubernetes.io/kube-apiserver-client-kubelet, CN system:node:<name>,
O system:nodes, usages digital signature + client auth (an ECDSA key: no key encipherment). It is
created with the bootstrap token (approved through `nodeclient`) or with the node's current
certificate (approved through `selfnodeclient`). Storage: <pki>/kubelet-client-<timestamp>.pem
holds the certificate and its key (mode 0600), <pki>/kubelet-client-current.pem links to it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import time
from pathlib import Path

import yaml

from agent.bootstrap import certinfo
from agent.bootstrap.keygen import new_key_and_csr
from agent.kube import ApiError, Kube
from common.logfmt import kv

log = logging.getLogger("agent.bootstrap")

SIGNER = "kubernetes.io/kube-apiserver-client-kubelet"
CSR_PATH = "/apis/certificates.k8s.io/v1/certificatesigningrequests"
CURRENT = "kubelet-client-current.pem"
POLL = 1.0
HINT_AFTER = 5.0  # seconds without approval before the agent says how to approve


class CSRFailed(Exception):
    """Denied, failed, deleted or issued something unusable: ask again later."""


async def request_certificate(kube: Kube, node_name: str, why: str) -> tuple[bytes, bytes, str]:
    """(certificate PEM, key PEM, CSR name); waits as long as it takes for approval and issuance."""
    key_pem, csr_pem = await new_key_and_csr(node_name)
    body = {
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": {"generateName": "csr-"},
        "spec": {
            "request": base64.b64encode(csr_pem).decode(),
            "signerName": SIGNER,
            "usages": ["digital signature", "client auth"],
        },
    }
    created = await kube.create(CSR_PATH, body)
    name = created["metadata"]["name"]
    log.info("client certificate requested", extra=kv(csr=name, signer=SIGNER, node=node_name, why=why))
    started = time.monotonic()
    hinted = False
    while True:
        await asyncio.sleep(POLL)
        try:
            csr = await kube.get(f"{CSR_PATH}/{name}")
        except ApiError as exc:
            if exc.not_found:
                raise CSRFailed(f"certificate signing request {name} was deleted") from exc
            if exc.status in (401, 403):
                raise  # the credentials stopped working meanwhile (an expired token or certificate)
            continue  # the API server is away: keep waiting
        status = csr.get("status") or {}
        approved = False
        for cond in status.get("conditions") or []:
            if cond.get("status", "True") != "True":
                continue
            if cond.get("type") in ("Denied", "Failed"):
                raise CSRFailed(
                    f"certificate signing request {name} {cond['type'].lower()}: "
                    f"{cond.get('reason', '')} {cond.get('message', '')}".strip()
                )
            approved = approved or cond.get("type") == "Approved"
        if status.get("certificate"):
            cert_pem = base64.b64decode(status["certificate"])
            try:
                info = certinfo.first_certificate(cert_pem)
            except certinfo.CertError as exc:
                raise CSRFailed(f"certificate signing request {name} issued no usable certificate: {exc}") from exc
            if info.subject_cn != f"system:node:{node_name}":
                raise CSRFailed(f"certificate signing request {name} issued a certificate for {info.subject_cn!r}")
            return cert_pem, key_pem, name
        if not approved and not hinted and time.monotonic() - started > HINT_AFTER:
            # Said once per request: a cluster without auto-approval needs a person.
            log.warning(
                "client certificate request waits for approval: kubectl certificate approve " + name,
                extra=kv(csr=name, signer=SIGNER),
            )
            hinted = True


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def current_file(pki_dir: Path) -> Path | None:
    """The file kubelet-client-current.pem links to, if any."""
    link = pki_dir / CURRENT
    try:
        return (pki_dir / os.readlink(link)).resolve() if link.is_symlink() else link.resolve(strict=True)
    except OSError:
        return None


def store(pki_dir: Path, cert_pem: bytes, key_pem: bytes) -> Path:
    """Write kubelet-client-<timestamp>.pem and point kubelet-client-current.pem at it (atomically)."""
    pki_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    stamp = time.strftime("%Y-%m-%d-%H-%M-%S")
    path = pki_dir / f"kubelet-client-{stamp}.pem"
    n = 1
    while path.exists():  # two certificates within a second (very short signing durations)
        path = pki_dir / f"kubelet-client-{stamp}-{n}.pem"
        n += 1
    _write_private(path, cert_pem.rstrip(b"\n") + b"\n" + key_pem)
    point_current(pki_dir, path)
    return path


def point_current(pki_dir: Path, target: Path) -> None:
    tmp = pki_dir / f".{CURRENT}.tmp{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target.name, tmp)
    os.replace(tmp, pki_dir / CURRENT)


def prune(pki_dir: Path, keep: set[Path]) -> None:
    """Remove earlier kubelet-client-*.pem files except those in `keep`."""
    keep = {p.resolve() for p in keep}
    for path in pki_dir.glob("kubelet-client-*.pem"):
        if path.name != CURRENT and not path.is_symlink() and path.resolve() not in keep:
            with contextlib.suppress(OSError):
                path.unlink()


def write_kubeconfig(path: Path, server: str, ca_pem: bytes | None, client_file: Path) -> None:
    """The node kubeconfig the kubelet writes after bootstrap: the cluster, and the current pair."""
    cluster: dict[str, object] = {"server": server}
    if ca_pem:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "default-cluster", "cluster": cluster}],
        "contexts": [{"name": "default-context", "context": {"cluster": "default-cluster", "user": "default-auth"}}],
        "current-context": "default-context",
        "users": [
            {"name": "default-auth", "user": {"client-certificate": str(client_file), "client-key": str(client_file)}}
        ],
        "preferences": {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, yaml.safe_dump(doc, sort_keys=False).encode())
