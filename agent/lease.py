"""The node heartbeat Lease in kube-node-lease, renewed like the kubelet's."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from agent.kube import ApiError, Kube
from common.logfmt import kv

log = logging.getLogger(__name__)

LEASE_DURATION_SECONDS = 40
RENEW_INTERVAL = 10.0


def micro_time(t: datetime) -> str:
    # MicroTime needs exactly six fractional digits (isoformat drops them at .000000).
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class NodeLease:
    def __init__(self, kube: Kube, node_name: str, node_uid: str):
        self.kube = kube
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
                self._lease = await self.kube.get(self.path)
            except ApiError as exc:
                if not exc.not_found:
                    raise
                self._lease = await self.kube.create(
                    "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", self._body(now)
                )
                self.renewals += 1
                return
        lease = self._lease
        lease["spec"].update(
            holderIdentity=self.node, leaseDurationSeconds=LEASE_DURATION_SECONDS, renewTime=micro_time(now)
        )
        try:
            self._lease = await self.kube.replace(self.path, lease)
        except ApiError as exc:
            self._lease = None  # re-read on the next try (conflict, deleted, ...)
            if exc.conflict or exc.not_found:
                await self.renew()
                return
            raise
        self.renewals += 1

    async def run(self) -> None:
        failing = False
        while True:
            try:
                await self.renew()
                if failing:
                    log.info("lease renewed again", extra=kv(node=self.node))
                failing = False
                delay = RENEW_INTERVAL
            except ApiError as exc:
                self.failures += 1
                if not failing:
                    log.warning("cannot renew node lease; retrying", extra=kv(node=self.node, error=exc.describe()))
                failing = True
                delay = 2.0  # retry sooner than the period so the lease does not expire
            await asyncio.sleep(delay)
