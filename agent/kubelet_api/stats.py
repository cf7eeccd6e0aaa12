"""GET /stats/summary: the kubelet's Summary API (what metrics-server and `kubectl top` once read).

`?only_cpu_and_memory=true` trims it to the node's and Pods' cpu and memory, as the kubelet does.
The collector is shared with /metrics/resource (agent/kubelet_api/metrics.py) through the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from aiohttp import web

from agent.kubelet_api.context import KubeletAPIContext
from agent.stats.collector import StatsCollector
from agent.stats.model import Snapshot
from agent.stats.summary import summary_json

COLLECTOR = web.AppKey("stats_collector", StatsCollector)


def collector_for(app: web.Application, ctx: KubeletAPIContext) -> StatsCollector:
    """The app's one collector, created on first use, its housekeeping running while the app serves."""
    if COLLECTOR in app:
        return app[COLLECTOR]
    collector = StatsCollector(ctx.node_name, ctx.controller, ctx.state_dir)
    app[COLLECTOR] = collector

    async def housekeeping(_: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(collector.housekeeping(), name="stats-housekeeping")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(housekeeping)
    return collector


def _summary_bytes(snapshot: Snapshot) -> bytes:
    return json.dumps(summary_json(snapshot), separators=(",", ":")).encode()


def _cpu_and_memory_bytes(snapshot: Snapshot) -> bytes:
    return json.dumps(summary_json(snapshot, only_cpu_and_memory=True), separators=(",", ":")).encode()


def add_routes(app: web.Application, ctx: KubeletAPIContext) -> None:
    collector = collector_for(app, ctx)

    async def summary(request: web.Request) -> web.Response:
        only = request.query.get("only_cpu_and_memory", "").lower() == "true"
        if only:
            body = await collector.rendered("summary-cpu-memory", _cpu_and_memory_bytes)
        else:
            body = await collector.rendered("summary", _summary_bytes)
        return web.Response(body=body, content_type="application/json")

    app.router.add_get("/stats/summary", summary)
