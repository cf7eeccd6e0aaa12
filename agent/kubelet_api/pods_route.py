"""/healthz, /pods and /runningpods/: the node's own view of its Pods."""

from __future__ import annotations

import copy
import json
from typing import Any

from aiohttp import web

from agent.kubelet_api.context import KubeletAPIContext

JSON = dict[str, Any]


def add_routes(app: web.Application, ctx: KubeletAPIContext) -> None:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok", content_type="text/plain")

    async def pods(_: web.Request) -> web.Response:
        return _json(pod_list([_with_status(w.pod, w.current_status()) for w in _workers(ctx)]))

    async def running_pods(_: web.Request) -> web.Response:
        return _json(pod_list([running_pod(w.pod, w.handles) for w in _workers(ctx) if w.handles]))

    # The kubelet's health checks: ping, log and syncloop; all trivially fine while we answer.
    for path in ("/healthz", "/healthz/ping", "/healthz/log", "/healthz/syncloop"):
        app.router.add_get(path, healthz, allow_head=False)
    app.router.add_get("/pods", pods, allow_head=False)
    app.router.add_get("/pods/", pods, allow_head=False)
    app.router.add_get("/runningpods/", running_pods, allow_head=False)


def _workers(ctx: KubeletAPIContext) -> list[Any]:
    return sorted((w for w in ctx.controller.workers.values() if not w.gone), key=lambda w: w.key)


def pod_list(items: list[JSON]) -> JSON:
    return {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}


def _with_status(pod: JSON, status: JSON) -> JSON:
    out = copy.copy(pod)  # shallow: only status is replaced, the worker's own object is untouched
    out["status"] = status
    out.setdefault("kind", "Pod")
    out.setdefault("apiVersion", "v1")
    return out


def running_pod(pod: JSON, handles: dict[str, Any]) -> JSON:
    """What the kubelet's runtime Pod becomes (kubecontainer.Pod.ToAPIPod): names, UID and the
    running containers with their images, nothing else."""
    meta = pod["metadata"]
    return {
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "creationTimestamp": None,
        },
        "spec": {"containers": [{"name": name, "image": h.image, "resources": {}} for name, h in handles.items()]},
        "status": {},
    }


def _json(body: JSON) -> web.Response:
    return web.Response(text=json.dumps(body), content_type="application/json")
