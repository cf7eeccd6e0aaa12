"""The kubelet API's streaming routes: /exec, /attach and /portForward.

In Kubernetes v1.36 the API server reaches these over SPDY/3.1 for every client: kubectl speaks
WebSocket (v5.channel.k8s.io, or SPDY/3.1+portforward.k8s.io tunnelled in WebSocket) to the API
server, which translates exec/attach to SPDY (StreamTranslatorHandler) and tunnels port-forward's
SPDY (TunnelingHandler) toward the kubelet, unless the Node declares the ExtendWebSocketsToKubelet
feature in status.declaredFeatures, which this agent does not. Clients of the older WebSocket
subprotocols (channel.k8s.io, base64.channel.k8s.io, v4...) are proxied to the node as they are:
exec and attach serve those over WebSocket (wsstream.py).

Paths and queries as the API server builds them (pkg/registry/core/pod/strategy.go):
    /exec/{namespace}/{pod}[/{uid}]/{container}?command=..&command=..&input=1&output=1&error=1&tty=1
    /attach/{namespace}/{pod}[/{uid}]/{container}?input=1&output=1&error=1&tty=1
    /portForward/{namespace}/{pod}[/{uid}]?port=..
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from agent.kubelet_api import portforward, remotecommand, wsstream
from agent.kubelet_api.remotecommand import StreamOptions

if TYPE_CHECKING:
    from agent.kubelet_api.context import KubeletAPIContext
    from agent.pod_worker import PodWorker
    from runtimes.base import ContainerHandle

log = logging.getLogger(__name__)


def add_routes(app: web.Application, ctx: KubeletAPIContext) -> None:
    routes = StreamingRoutes(ctx)
    for method in ("GET", "POST"):
        for path in ("/exec/{namespace}/{pod}/{container}", "/exec/{namespace}/{pod}/{uid}/{container}"):
            app.router.add_route(method, path, routes.exec)
        for path in ("/attach/{namespace}/{pod}/{container}", "/attach/{namespace}/{pod}/{uid}/{container}"):
            app.router.add_route(method, path, routes.attach)
        for path in ("/portForward/{namespace}/{pod}", "/portForward/{namespace}/{pod}/{uid}"):
            app.router.add_route(method, path, routes.port_forward)


class StreamingRoutes:
    def __init__(self, ctx: KubeletAPIContext):
        self.ctx = ctx

    def _pod(self, request: web.Request) -> PodWorker:
        ns, name = request.match_info["namespace"], request.match_info["pod"]
        worker = self.ctx.find_pod(ns, name)
        uid = request.match_info.get("uid")
        if worker is None or (uid and worker.uid != uid):
            raise web.HTTPNotFound(text=f"pod {ns}/{name} does not exist on node {self.ctx.node_name}\n")
        if worker.backend is None or worker.sandbox is None:
            raise web.HTTPBadRequest(text=f"pod {ns}/{name} is not running (no sandbox yet, or already stopped)\n")
        return worker

    def _container(self, worker: PodWorker, name: str) -> ContainerHandle:
        spec = worker.pod["spec"]
        known = [
            c["name"] for key in ("initContainers", "containers", "ephemeralContainers") for c in spec.get(key) or []
        ]
        if name not in known:
            raise web.HTTPNotFound(
                text=f"container {name!r} not found in pod {worker.key}; it has: {', '.join(known)}\n"
            )
        handle = worker.handles.get(name)
        if handle is None:
            raise web.HTTPBadRequest(
                text=f"container {name!r} in pod {worker.key} is not running; wait until it runs, then try again\n"
            )
        return handle

    def _options(self, request: web.Request) -> StreamOptions:
        try:
            return StreamOptions.from_query(dict(request.query))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from exc

    async def exec(self, request: web.Request) -> web.StreamResponse:
        worker = self._pod(request)
        container = request.match_info["container"]
        handle = self._container(worker, container)
        opts = self._options(request)
        command = request.query.getall("command", [])
        if not command:
            raise web.HTTPBadRequest(text="exec needs a command (the `command` query parameter)\n")
        backend, sandbox = worker.backend, worker.sandbox
        assert backend is not None and sandbox is not None
        what = f"exec in {worker.key}/{container}"
        log.info("%s: %s (tty=%s stdin=%s)", what, command, opts.tty, opts.stdin)
        serve = wsstream.serve if wsstream.is_websocket(request) else remotecommand.serve
        return await serve(
            request, opts, lambda: backend.exec_stream(sandbox, handle, command, opts.tty, opts.stdin), what
        )

    async def attach(self, request: web.Request) -> web.StreamResponse:
        worker = self._pod(request)
        container = request.match_info["container"]
        handle = self._container(worker, container)
        opts = self._options(request)
        backend, sandbox = worker.backend, worker.sandbox
        assert backend is not None and sandbox is not None
        what = f"attach to {worker.key}/{container}"
        serve = wsstream.serve if wsstream.is_websocket(request) else remotecommand.serve
        return await serve(request, opts, lambda: backend.attach(sandbox, handle, opts.tty, opts.stdin), what)

    async def port_forward(self, request: web.Request) -> web.StreamResponse:
        worker = self._pod(request)
        backend, sandbox, pod = worker.backend, worker.sandbox, worker.pod
        assert backend is not None and sandbox is not None

        async def connect(port: int) -> tuple[Any, Any]:
            return await backend.port_forward(sandbox, pod, port)

        return await portforward.serve(request, connect, f"pod {worker.key}")
