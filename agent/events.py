"""Events on Pods, as `kubectl describe` and `kubectl get events` show them.

Recording never blocks a Pod's progress: each Event is posted in the
background, and a failure is only logged.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from datetime import UTC, datetime
from typing import Any

from agent.kube import ApiError, Kube
from agent.node_status import rfc3339
from common.logfmt import kv

log = logging.getLogger(__name__)

COMPONENT = "kubelet-emu"


class EventRecorder:
    def __init__(self, kube: Kube, node_name: str, policy: str = "all"):
        self.kube = kube
        self.node = node_name
        self.policy = policy  # "all", "warnings" or "none" (agent config key `events`)
        self._pending: set[asyncio.Task[None]] = set()
        self.posted = 0

    def pod_event(
        self, pod: dict[str, Any], event_type: str, reason: str, message: str, container: str | None = None
    ) -> None:
        if self.policy == "none" or (self.policy == "warnings" and event_type != "Warning"):
            return
        meta = pod["metadata"]
        involved = {
            "apiVersion": "v1",
            "kind": "Pod",
            "namespace": meta["namespace"],
            "name": meta["name"],
            "uid": meta["uid"],
        }
        if container:
            involved["fieldPath"] = f"spec.containers{{{container}}}"
        now = rfc3339(datetime.now(UTC))
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": meta["namespace"]},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "type": event_type,
            "source": {"component": COMPONENT, "host": self.node},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.node,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        task = asyncio.create_task(self._post(meta["namespace"], body))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _post(self, namespace: str, body: dict[str, Any]) -> None:
        try:
            await self.kube.create(f"/api/v1/namespaces/{namespace}/events", body)
            self.posted += 1
        except ApiError as exc:
            log.debug("event not recorded", extra=kv(reason=body["reason"], error=exc.describe()))

    async def flush(self, timeout: float = 2.0) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)
