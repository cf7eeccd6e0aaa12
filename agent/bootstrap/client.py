"""Before the agent connects: a usable client certificate, as the kubelet's LoadClientCert.

- The kubeconfig's certificate is valid: use it.
- Else, with --bootstrap-kubeconfig: a valid <pki>/kubelet-client-current.pem is reused (the
  kubeconfig is written for it); otherwise a new certificate is requested with the bootstrap
  credentials (TLS bootstrap), stored, and the kubeconfig written pointing at it.
- Else (expired, no bootstrap credentials): one clear line, then the agent waits and checks the
  kubeconfig again every RECHECK seconds: a replaced certificate is picked up, and nothing
  crash-loops against the API server meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from agent import kubeconfig
from agent.bootstrap import certinfo, csr_client
from agent.bootstrap.keygen import KeygenError
from agent.kube import ApiError, Kube
from common.logfmt import kv

log = logging.getLogger("agent.bootstrap")

RECHECK = 10.0
RETRY_CAP = 60.0


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def certificate_problem(path: str) -> str | None:
    """Why the kubeconfig's client certificate cannot be used, or None (fine, or not a certificate user)."""
    try:
        pem, file = kubeconfig.client_certificate(path)
    except OSError:
        return None
    if pem is None:
        return f"its client certificate {file} cannot be read" if file else None
    try:
        info = certinfo.first_certificate(pem)
    except certinfo.CertError as exc:
        return f"its client certificate {file or '(inline)'} is not usable: {exc}"
    if info.expired():
        return f"its client certificate {file or '(inline)'} expired at {_iso(info.not_after)}"
    if info.not_before > time.time() + 60:
        return f"its client certificate {file or '(inline)'} is not valid before {_iso(info.not_before)}"
    return None


def _valid_current(pki_dir: Path) -> Path | None:
    link = pki_dir / csr_client.CURRENT
    try:
        info = certinfo.first_certificate(link.read_bytes())
    except (OSError, certinfo.CertError):
        return None
    return link if not info.expired() and info.not_after - time.time() > 60 else None


async def ensure_client_certificate(kubeconfig_path: str, bootstrap: str | None, node_name: str, pki_dir: Path) -> None:
    exists = Path(kubeconfig_path).is_file()
    problem = certificate_problem(kubeconfig_path) if exists else "it does not exist"
    if problem is None:
        return
    if bootstrap is None:
        if not exists:
            return  # the usual "file not found" error, from Kube.from_kubeconfig
        await _wait_for_renewed(kubeconfig_path, problem)
        return
    boot = kubeconfig.load(bootstrap)  # a broken bootstrap kubeconfig is a KubeconfigError: no retry helps
    ca = kubeconfig.cluster_ca(bootstrap)
    current = _valid_current(pki_dir)
    if current is not None:
        csr_client.write_kubeconfig(Path(kubeconfig_path), boot.server, ca, current)
        log.info("kubeconfig written for the current client certificate", extra=kv(kubeconfig=kubeconfig_path))
        return
    log.info(
        "TLS bootstrap: requesting a client certificate with the bootstrap credentials",
        extra=kv(kubeconfig=kubeconfig_path, reason=problem, server=boot.server),
    )
    kube = Kube(boot.server, boot.ssl, boot)
    try:
        attempt = 0
        last_error = ""
        while True:
            try:
                cert_pem, key_pem, name = await csr_client.request_certificate(kube, node_name, why="bootstrap")
                break
            except (ApiError, csr_client.CSRFailed, KeygenError) as exc:
                error = _bootstrap_error(exc)
                if error != last_error:  # the same cause is said once, not every retry
                    log.error("TLS bootstrap failed; retrying", extra=kv(error=error))
                    last_error = error
            attempt += 1
            await asyncio.sleep(min(RETRY_CAP, 2.0 * 2 ** min(attempt, 6)))
    finally:
        await kube.close()
    path = csr_client.store(pki_dir, cert_pem, key_pem)
    csr_client.write_kubeconfig(Path(kubeconfig_path), boot.server, ca, pki_dir / csr_client.CURRENT)
    info = certinfo.first_certificate(cert_pem)
    log.info(
        "TLS bootstrap done: client certificate issued",
        extra=kv(csr=name, file=str(path), subject=info.subject_cn, issuer=info.issuer_cn,
                 not_after=_iso(info.not_after), kubeconfig=kubeconfig_path),
    )  # fmt: skip


def _bootstrap_error(exc: Exception) -> str:
    if isinstance(exc, ApiError) and exc.status == 401:
        return (
            "the API server rejected the bootstrap credentials (401 Unauthorized): the bootstrap token "
            "is unknown or expired; make a new one (kubeadm token create --print-join-command) and join again"
        )
    if isinstance(exc, ApiError) and exc.forbidden:
        return (
            "the bootstrap credentials may not create certificate signing requests (403): bind the ClusterRole "
            "system:node-bootstrapper to the group system:bootstrappers, as kubeadm does; " + exc.message
        )
    return exc.describe() if isinstance(exc, ApiError) else str(exc)


async def _wait_for_renewed(kubeconfig_path: str, problem: str) -> None:
    log.error(
        f"cannot connect: kubeconfig {kubeconfig_path}: {problem}, and there is no --bootstrap-kubeconfig to "
        f"request a new one; renew it (or pass --bootstrap-kubeconfig); checking again every {RECHECK:.0f}s",
        extra=kv(kubeconfig=kubeconfig_path),
    )
    while True:
        await asyncio.sleep(RECHECK)
        if certificate_problem(kubeconfig_path) is None:
            log.info("the kubeconfig's client certificate is valid again", extra=kv(kubeconfig=kubeconfig_path))
            return
