"""/stats/summary and /metrics/resource of a fleet node: its emulated Pods' usage, and their sum.

A fleet node is not the host, so nothing is read from /proc or cgroups: each container reports what
its handler profile or its Pod's annotations play (agent/stats/emulated_usage.py), a Pod the sum of
its containers, the node the sum of its Pods, with the node's memory capacity as its limit (so
availableBytes is what the Pods leave). The node's cumulative CPU also keeps what Pods that are gone
used, so that it never goes back between two scrapes (metrics-server would drop the rate).

No task runs per node: a snapshot is made when the node is asked, on the loop (a few microseconds
per Pod, nothing blocks), and serves that node's requests for MAX_AGE seconds, each rendering made
once. The per-node state is its start time, the last snapshot and renderings, and one integer per
Pod (its last cumulative CPU).

The renderers are the single node's (agent/stats/summary.py, resource_metrics.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from agent.stats import emulated_usage, resource_metrics
from agent.stats.collector import PodTarget, pod_targets
from agent.stats.model import ContainerSnapshot, NodeSnapshot, PodSnapshot, Snapshot, Usage
from agent.stats.summary import summary_json
from cgroups.stats import CgroupUsage
from common.logfmt import kv

log = logging.getLogger(__name__)

MAX_AGE = 1.0  # seconds one snapshot serves a node's requests


def pod_snapshot(t: PodTarget, now: float) -> PodSnapshot:
    pod = PodSnapshot(name=t.name, namespace=t.namespace, uid=t.uid, start_time=t.start_time)
    for c in t.containers:
        snap = ContainerSnapshot(name=c.name, start_time=c.start_time, container_id=c.container_id, image=c.image)
        if c.plan is not None:
            snap.usage = emulated_usage.synthetic_usage(c.plan, c.start_time, now)
        pod.containers.append(snap)
    pod.usage = emulated_usage.add_usages([c.usage for c in pod.containers if c.usage], now)
    return pod


def node_usage(pods: list[PodSnapshot], cpu_ns: int, memory_capacity: int | None, now: float) -> Usage:
    """The node's usage as the sum of its Pods', with `cpu_ns` as its cumulative CPU. Always a value
    (zero without Pods): metrics-server needs a node's usage to list it."""
    usages = [p.usage for p in pods if p.usage is not None]
    memory = sum(u.counters.memory_usage_bytes for u in usages)
    working_set = sum(u.counters.working_set_bytes for u in usages)
    counters = CgroupUsage(
        cpu_usage_ns=cpu_ns,
        memory_usage_bytes=memory,
        working_set_bytes=working_set,
        rss_bytes=sum(u.counters.rss_bytes for u in usages),
        page_faults=0,
        major_page_faults=0,
        memory_limit_bytes=memory_capacity,
    )
    return Usage(now, counters, sum(u.nanocores or 0 for u in usages))


@dataclass(slots=True)
class NodeStats:
    """What one fleet node keeps between requests."""

    name: str
    start_time: float
    retired_ns: int = 0  # CPU of Pods gone (or of containers restarted) since the node started
    last_ns: dict[str, int] = field(default_factory=dict)  # Pod uid -> its cumulative CPU at the last snapshot
    snapshot: Snapshot | None = None
    taken: float = 0.0  # monotonic time of the snapshot
    rendered: dict[str, bytes] = field(default_factory=dict)

    def build(self, targets: list[PodTarget], memory_capacity: int | None, now: float) -> Snapshot:
        pods = [pod_snapshot(t, now) for t in targets]
        current = {p.uid: p.usage.counters.cpu_usage_ns for p in pods if p.usage is not None}
        for uid, before in self.last_ns.items():
            after = current.get(uid, 0)
            if after < before:  # the Pod is gone, or a container restarted with a fresh counter
                self.retired_ns += before - after
        self.last_ns = current
        node = NodeSnapshot(name=self.name, start_time=self.start_time)
        node.usage = node_usage(pods, self.retired_ns + sum(current.values()), memory_capacity, now)
        return Snapshot(taken=now, node=node, pods=pods)


def _memory_capacity(controller: Any) -> int | None:
    facts = getattr(controller.node, "facts", None)
    return facts.host.memory_bytes if facts is not None else None


class FleetStats:
    """The stats of every node of a fleet, made on request."""

    def __init__(self, pods_dir: Path, max_age: float = MAX_AGE):
        self.pods_dir = pods_dir  # unread: emulated Pods have no logs on disk
        self.max_age = max_age
        self._nodes: dict[str, NodeStats] = {}

    def serving(self, name: str) -> None:
        """The node started serving: its startTime."""
        self._nodes[name] = NodeStats(name, time.time())

    def forget(self, name: str) -> None:
        self._nodes.pop(name, None)

    def snapshot(self, controller: Any) -> Snapshot:
        name = controller.node.name
        state = self._nodes.get(name)
        if state is None:
            state = self._nodes[name] = NodeStats(name, time.time())
        if state.snapshot is None or time.monotonic() - state.taken >= self.max_age:
            targets = pod_targets(controller, self.pods_dir)
            state.snapshot = state.build(targets, _memory_capacity(controller), time.time())
            state.taken = time.monotonic()
            state.rendered.clear()
        return state.snapshot

    def rendered(self, controller: Any, kind: str, render: Callable[[Snapshot], bytes]) -> bytes:
        snapshot = self.snapshot(controller)
        state = self._nodes[controller.node.name]
        body = state.rendered.get(kind)
        if body is None:
            body = state.rendered[kind] = render(snapshot)
        return body


def _summary_bytes(snapshot: Snapshot) -> bytes:
    return json.dumps(summary_json(snapshot), separators=(",", ":")).encode()


def _cpu_and_memory_bytes(snapshot: Snapshot) -> bytes:
    return json.dumps(summary_json(snapshot, only_cpu_and_memory=True), separators=(",", ":")).encode()


def _resource_bytes(snapshot: Snapshot) -> bytes:
    return resource_metrics.render(snapshot).encode()


def add_routes(app: web.Application, ctx: Any, stats: FleetStats) -> None:
    """`ctx` is the fleet's FleetAPIContext: its controller is the node the request was sent to."""

    async def summary(request: web.Request) -> web.Response:
        if request.query.get("only_cpu_and_memory", "").lower() == "true":
            body = stats.rendered(ctx.controller, "summary-cpu-memory", _cpu_and_memory_bytes)
        else:
            body = stats.rendered(ctx.controller, "summary", _summary_bytes)
        return web.Response(body=body, content_type="application/json")

    async def resource(request: web.Request) -> web.Response:
        try:
            body = stats.rendered(ctx.controller, "metrics-resource", _resource_bytes)
        except Exception:
            # The kubelet answers with its scrape error gauges set to 1, not with an error status.
            log.exception("resource metrics failed", extra=kv(node=ctx.node_name))
            body = resource_metrics.render(None).encode()
        return web.Response(body=body, headers={"Content-Type": resource_metrics.CONTENT_TYPE})

    app.router.add_get("/stats/summary", summary)
    app.router.add_get("/metrics/resource", resource)
