"""The node heartbeat Lease in kube-node-lease, renewed like the kubelet's."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from agent.kube import ApiError, Kube
from common.logfmt import kv

log = logging.getLogger(__name__)

LEASE_DURATION_SECONDS = 40
RENEW_INTERVAL = 10.0
# As the kubelet's heartbeat client: a request that takes longer than the renew interval is
# given up, so a renewal stuck on a dead connection never holds the heartbeat for long.
RENEW_TIMEOUT = 10.0
RETRY_FIRST = 0.5  # after a failure: 0.5 s, 1 s, then every 2 s, well inside the lease duration
RETRY_MAX = 2.0


def micro_time(t: datetime) -> str:
    # MicroTime needs exactly six fractional digits (isoformat drops them at .000000).
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class NodeLease:
    def __init__(
        self,
        kube: Kube,
        node_name: str,
        node_uid: str,
        on_recovered: Callable[[], None] | None = None,
        spread: bool = False,
    ):
        self.kube = kube
        self.spread = spread  # renew at a random phase of the interval (a fleet's nodes spread out)
        self.paused: Callable[[], bool] = lambda: False  # True: skip renewals (a node made silent on purpose)
        self.on_recovered = on_recovered  # called when a renewal works again after failures
        self.node = node_name
        self.node_uid = node_uid
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node_name}"
        self._lease: dict[str, Any] | None = None
        self.renewals = 0
        self.failures = 0

    def _body(self, now: datetime) -> dict[str, Any]:
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.node,
                "namespace": "kube-node-lease",
                # Owned by the Node, so deleting the Node removes its Lease.
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": self.node_uid}],
            },
            "spec": {
                "holderIdentity": self.node,
                "leaseDurationSeconds": LEASE_DURATION_SECONDS,
                "renewTime": micro_time(now),
            },
        }

    async def renew(self) -> None:
        now = datetime.now(UTC)
        if self._lease is None:
            try:
                self._lease = kept(await self.kube.request("GET", self.path, timeout=RENEW_TIMEOUT))
            except ApiError as exc:
                if not exc.not_found:
                    raise
                self._lease = kept(
                    await self.kube.request(
                        "POST",
                        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                        body=self._body(now),
                        timeout=RENEW_TIMEOUT,
                    )
                )
                self.renewals += 1
                return
        lease = self._lease
        lease["spec"].update(
            holderIdentity=self.node, leaseDurationSeconds=LEASE_DURATION_SECONDS, renewTime=micro_time(now)
        )
        try:
            self._lease = kept(await self.kube.request("PUT", self.path, body=lease, timeout=RENEW_TIMEOUT))
        except ApiError as exc:
            self._lease = None  # re-read on the next try (conflict, deleted, ...)
            if exc.conflict or exc.not_found:
                await self.renew()
                return
            raise
        self.renewals += 1

    async def run(self) -> None:
        failures = 0  # in a row
        first = True
        while True:
            if self.paused():
                await asyncio.sleep(RENEW_INTERVAL)
                continue
            try:
                await self.renew()
                if failures:
                    log.info("lease renewed again", extra=kv(node=self.node, failed_attempts=failures))
                    if self.on_recovered is not None:
                        self.on_recovered()  # the node status goes out with it, at once
                failures = 0
                delay = RENEW_INTERVAL
                if first and self.spread:
                    delay = random.uniform(0, RENEW_INTERVAL)
                first = False
            except ApiError as exc:
                self.failures += 1
                if not failures:
                    log.warning("cannot renew node lease; retrying", extra=kv(node=self.node, error=exc.describe()))
                # Retry soon, not after the period: the heartbeat resumes as soon as the API server answers.
                delay = min(RETRY_MAX, RETRY_FIRST * 2**failures)
                failures += 1
            await asyncio.sleep(delay)


def kept(lease: dict[str, Any]) -> dict[str, Any]:
    """The Lease as held until the next renewal, without its managedFields: an update that omits
    them keeps the server's, and a fleet holds one Lease per node."""
    lease.get("metadata", {}).pop("managedFields", None)
    return lease
