"""Client certificate rotation, as the kubelet's certificate manager does it.

At a jittered 70-90 % of the current certificate's lifetime the agent asks for a new one with its
current identity (the csrapproving controller approves it through `selfnodeclient`), stores it
beside the current one, points kubelet-client-current.pem at it and switches the agent's API
client: new requests go out on new connections with the new certificate, the previous
connections are closed a few seconds later (watches resume from their resourceVersion). The
previous file is kept until a request made with the new certificate succeeded; if none does, the
agent goes back to the previous one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from pathlib import Path

from agent import kubeconfig
from agent.bootstrap import certinfo, csr_client
from agent.bootstrap.keygen import KeygenError
from agent.kube import ApiError, Kube
from common.logfmt import kv

log = logging.getLogger("agent.bootstrap")

OLD_CONNECTIONS_GRACE = 5.0  # seconds the previous connections may finish their requests


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def rotation_deadline(info: certinfo.CertInfo, issued: float | None = None, rng: random.Random | None = None) -> float:
    """The kubelet's nextRotationDeadline: start + lifetime x uniform(0.7, 0.9), lifetime = notAfter - start.

    The kubelet starts at notBefore. The CSR signer backdates notBefore by 5 minutes and, for
    lifetimes under 8 hours, does not take them off notAfter: a 3-minute certificate spans 8 minutes
    and the kubelet renews it at once, over and over. Starting at `issued` (when the agent stored
    it) when that is later keeps the 70-90 % rule for short certificates; for long ones the two
    differ by 5 minutes.
    """
    start = max(info.not_before, min(issued, info.not_after)) if issued is not None else info.not_before
    return start + (info.not_after - start) * (rng or random).uniform(0.7, 0.9)


def managed_pki_dir(kubeconfig_path: str) -> Path | None:
    """The pki dir when the kubeconfig's client certificate is a kubelet-client-current.pem (ours to rotate)."""
    _, file = kubeconfig.client_certificate(kubeconfig_path)
    if file and Path(file).name == csr_client.CURRENT:
        return Path(file).parent
    return None


class ClientCertRotator:
    def __init__(self, kube: Kube, kubeconfig_path: str, node_name: str, pki_dir: Path, bootstrap: str | None = None):
        self.kube = kube
        self.kubeconfig_path = kubeconfig_path
        self.node_name = node_name
        self.pki_dir = pki_dir
        self.bootstrap = bootstrap
        self.rotations = 0
        self._closing: set[asyncio.Task[None]] = set()

    def _current(self) -> tuple[certinfo.CertInfo, float]:
        """The current certificate and when it was stored."""
        path = self.pki_dir / csr_client.CURRENT
        return certinfo.first_certificate(path.read_bytes()), path.stat().st_mtime

    async def run(self) -> None:
        while True:
            try:
                info, issued = self._current()
            except (OSError, certinfo.CertError) as exc:
                log.error("cannot read the current client certificate; rotation paused", extra=kv(error=str(exc)))
                await asyncio.sleep(60)
                continue
            deadline = rotation_deadline(info, issued)
            log.info(
                "client certificate rotation scheduled",
                extra=kv(serial=f"{info.serial:x}", not_after=_iso(info.not_after), rotate_at=_iso(deadline)),
            )
            await asyncio.sleep(max(0.0, deadline - time.time()))
            attempt = 0
            while not await self._try_rotate(info):
                attempt += 1
                left = info.not_after - time.time()
                # Sooner while there is time left, never a busy loop once the certificate expired.
                await asyncio.sleep(min(60.0, max(2.0, left / 10 if left > 0 else 2.0 * 2 ** min(attempt, 5))))

    async def _try_rotate(self, previous: certinfo.CertInfo) -> bool:
        """One attempt; a failure of any kind is logged and retried, never the end of the agent."""
        try:
            return await self._rotate_once(previous)
        except (OSError, kubeconfig.KubeconfigError, certinfo.CertError) as exc:
            log.warning("client certificate rotation failed; retrying", extra=kv(error=str(exc)))
            return False

    async def _rotate_once(self, previous: certinfo.CertInfo) -> bool:
        expired = previous.expired()
        kube = self.kube
        if expired and self.bootstrap:
            boot = kubeconfig.load(self.bootstrap)
            kube = Kube(boot.server, boot.ssl, boot)  # the kubelet falls back to bootstrap credentials too
        try:
            cert_pem, key_pem, name = await csr_client.request_certificate(kube, self.node_name, why="rotation")
        except (ApiError, csr_client.CSRFailed, KeygenError, OSError) as exc:
            error = exc.describe() if isinstance(exc, ApiError) else str(exc)
            log.warning(
                "client certificate rotation failed; retrying",
                extra=kv(error=error, expires=_iso(previous.not_after), expired=expired),
            )
            return False
        finally:
            if kube is not self.kube:
                await kube.close()
        return await self._switch(cert_pem, key_pem, name, previous)

    async def _switch(self, cert_pem: bytes, key_pem: bytes, name: str, previous: certinfo.CertInfo) -> bool:
        old_file = csr_client.current_file(self.pki_dir)
        new_file = csr_client.store(self.pki_dir, cert_pem, key_pem)
        try:
            context = kubeconfig.load(self.kubeconfig_path).ssl
        except kubeconfig.KubeconfigError as exc:
            log.error("the new client certificate cannot be loaded; keeping the previous", extra=kv(error=str(exc)))
            self._revert(old_file, new_file)
            return False
        previous_tls = self.kube.switch_tls(context)
        try:
            await self.kube.get(f"/api/v1/nodes/{self.node_name}")
        except ApiError as exc:
            if exc.status in (401, 403):
                log.error(
                    "the API server refuses the new client certificate; going back to the previous",
                    extra=kv(csr=name, error=exc.describe()),
                )
                made = self.kube.switch_back(previous_tls)
                if made is not None:
                    await made.close()
                self._revert(old_file, new_file)
                return False
            # Unreachable: the certificate is not the problem; keep it.
        self._close_later(previous_tls[1])
        self.rotations += 1
        info = certinfo.first_certificate(cert_pem)
        log.info(
            "client certificate rotated",
            extra=kv(csr=name, file=new_file.name, serial=f"{info.serial:x}", not_after=_iso(info.not_after),
                     previous_serial=f"{previous.serial:x}", previous_not_after=_iso(previous.not_after)),
        )  # fmt: skip
        csr_client.prune(self.pki_dir, {new_file, *([old_file] if old_file else [])})
        return True

    def _revert(self, old_file: Path | None, new_file: Path) -> None:
        if old_file is not None:
            csr_client.point_current(self.pki_dir, old_file)
        with contextlib.suppress(OSError):
            new_file.unlink()

    def _close_later(self, session: object) -> None:
        if session is None:
            return

        async def close() -> None:
            await asyncio.sleep(OLD_CONNECTIONS_GRACE)
            await session.close()  # type: ignore[attr-defined]

        task = asyncio.get_running_loop().create_task(close(), name="close-old-connections")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
