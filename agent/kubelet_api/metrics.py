"""GET /metrics (the agent's own metrics, with the standard process_* and python_* families),
/metrics/resource (the kubelet's resource metrics, what metrics-server scrapes for `kubectl top`),
/metrics/cadvisor (cAdvisor's container families, for Prometheus' kubelet cAdvisor scrape jobs) and
/metrics/probes (prober_probe_total). All are authorized as nodes/metrics."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from agent import metrics, probe_metrics
from agent.kubelet_api.context import KubeletAPIContext
from agent.kubelet_api.stats import collector_for
from agent.stats import cadvisor_metrics, resource_metrics
from agent.stats.model import Snapshot

log = logging.getLogger(__name__)


def _resource_bytes(snapshot: Snapshot) -> bytes:
    return resource_metrics.render(snapshot).encode()


def add_routes(app: web.Application, ctx: KubeletAPIContext) -> None:
    collector = collector_for(app, ctx)
    metrics.bind_controller(ctx.controller)

    async def agent_metrics(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept"))
        return web.Response(body=encoder(metrics.REGISTRY), headers={"Content-Type": content_type})

    async def resource(request: web.Request) -> web.Response:
        try:
            body = await collector.rendered("metrics-resource", _resource_bytes)
        except Exception:
            # The kubelet answers with its scrape error gauges set to 1, not with an error status.
            log.exception("resource metrics: sampling failed")
            body = resource_metrics.render(None).encode()
        return web.Response(body=body, headers={"Content-Type": resource_metrics.CONTENT_TYPE})

    machine: list[cadvisor_metrics.MachineInfo] = []  # read once, on the first scrape

    async def cadvisor(request: web.Request) -> web.Response:
        if not machine:
            machine.append(await asyncio.to_thread(cadvisor_metrics.machine_info, str(ctx.state_dir)))
        info = machine[0]

        def render(snapshot: Snapshot) -> bytes:
            return cadvisor_metrics.render(snapshot, info).encode()

        try:
            body = await collector.rendered("metrics-cadvisor", render)
        except Exception:
            log.exception("cadvisor metrics: sampling failed")
            body = cadvisor_metrics.render(None, info).encode()
        return web.Response(body=body, headers={"Content-Type": cadvisor_metrics.CONTENT_TYPE})

    async def probes(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept"))
        return web.Response(body=encoder(probe_metrics.REGISTRY), headers={"Content-Type": content_type})

    app.router.add_get("/metrics", agent_metrics)
    app.router.add_get("/metrics/resource", resource)
    app.router.add_get("/metrics/cadvisor", cadvisor)
    app.router.add_get("/metrics/probes", probes)
