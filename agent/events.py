"""Events on Pods, as `kubectl describe` and `kubectl get events` show them.

Recording never blocks a Pod's progress: each Event is posted in the background, and a failure
is only logged. Repeats are folded into one Event object the way client-go's EventCorrelator
folds the kubelet's: the same involved object, reason, message, type and source make one Event
whose count and lastTimestamp grow (a patch), instead of a new object each time.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent.kube import ApiError, Kube
from agent.node_status import rfc3339
from common.logfmt import kv

log = logging.getLogger(__name__)

COMPONENT = "kubelet-emu"
CACHE_SIZE = 4096  # client-go's maxLruCacheEntries: the correlator forgets the oldest beyond this


@dataclass
class _Series:
    """One Event object and the repeats recorded for it (client-go's eventLog)."""

    name: str
    first: str
    count: int = 0
    posted: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class EventRecorder:
    def __init__(self, kube: Kube, node_name: str, policy: str = "all"):
        self.kube = kube
        self.node = node_name
        self.policy = policy  # "all", "warnings" or "none" (agent config key `events`)
        self._pending: set[asyncio.Task[None]] = set()
        self._series: OrderedDict[tuple[Any, ...], _Series] = OrderedDict()
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
        # getEventKey: source, involved object (with its uid and field path), type, reason, message.
        key = (COMPONENT, self.node, *involved.values(), event_type, reason, message)
        series = self._series.get(key)
        if series is None:
            series = _Series(name=f"{meta['name']}.{secrets.token_hex(8)}", first=now)
            self._series[key] = series
            if len(self._series) > CACHE_SIZE:
                self._series.popitem(last=False)
        else:
            self._series.move_to_end(key)
        series.count += 1
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": series.name, "namespace": meta["namespace"]},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "type": event_type,
            "source": {"component": COMPONENT, "host": self.node},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.node,
            "firstTimestamp": series.first,
            "lastTimestamp": now,
            "count": series.count,
        }
        task = asyncio.create_task(self._post(series, body))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _post(self, series: _Series, body: dict[str, Any]) -> None:
        namespace = body["metadata"]["namespace"]
        async with series.lock:  # one write at a time per Event, in the order they were recorded
            if body["count"] < series.count and series.posted:
                return  # a later repeat is queued behind this one and carries the newer count
            try:
                if series.posted:
                    patch = {"count": series.count, "lastTimestamp": body["lastTimestamp"], "message": body["message"]}
                    try:
                        await self.kube.patch(f"/api/v1/namespaces/{namespace}/events/{series.name}", patch)
                    except ApiError as exc:
                        if not exc.not_found:
                            raise
                        # Gone (the API server's event TTL): start again as the recorder does.
                        body = {**body, "count": series.count}
                        await self.kube.create(f"/api/v1/namespaces/{namespace}/events", body)
                else:
                    await self.kube.create(f"/api/v1/namespaces/{namespace}/events", {**body, "count": series.count})
                    series.posted = True
                self.posted += 1
            except ApiError as exc:
                log.debug("event not recorded", extra=kv(reason=body["reason"], error=exc.describe()))

    async def flush(self, timeout: float = 2.0) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)
