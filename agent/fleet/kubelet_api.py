"""The kubelet API of a fleet: one server, one listening socket per node, routed by the local port.

Why a port per node: the API server reaches a node's kubelet at the InternalIP and
daemonEndpoints port of its Node, and paths such as /pods carry no node name, so a single socket
shared by all nodes could not tell which node is asked. A port per node works with any InternalIP
(addresses per node would need loopback aliases, and an API server on this host). Everything else
is shared: one aiohttp application and router, one TLS context with one self-signed certificate,
one TokenReview cache; authorization keeps one SubjectAccessReview cache per node that was asked.
The per-node cost is a socket and its asyncio server.

The route modules are the single node's own: they read the node from the context, which here
follows the connection (a ContextVar set by the first middleware). /stats/summary and
/metrics/resource are the fleet's own (agent/fleet/stats.py): a node's emulated Pods and their sum,
made when that node is asked, since the single node's collector samples the host. /metrics,
/metrics/cadvisor and /metrics/probes are not served: they describe the process or the host, not
a node of the fleet.
"""

from __future__ import annotations

import contextvars
import importlib
import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from agent.config import KubeletAPISettings
from agent.fleet import stats as fleet_stats
from agent.kube import Kube
from agent.kubelet_api import tls
from agent.kubelet_api.authn import Authenticator
from agent.kubelet_api.authz import Authorizer, Decision
from agent.kubelet_api.context import find_pod
from agent.kubelet_api.server import OWN_ROUTES, Handler, auth_middleware, client_ca
from agent.kubelet_api.slow_clients import GuardedSockSite, server_logger
from common.logfmt import kv

if TYPE_CHECKING:
    from agent.kubelet_api.authn import User
    from agent.pod_worker import PodWorker
    from agent.pods import PodController

log = logging.getLogger(__name__)

ROUTES = (*OWN_ROUTES, "agent.kubelet_api.streaming")
_node: contextvars.ContextVar[PodController] = contextvars.ContextVar("fleet_node")


class FleetAPIContext:
    """KubeletAPIContext for the node the current request was sent to."""

    def __init__(self, kube: Kube, state_dir: Path):
        self.kube = kube
        self.state_dir = state_dir

    @property
    def controller(self) -> PodController:
        return _node.get()

    @property
    def node_name(self) -> str:
        return _node.get().node.name

    @property
    def config(self) -> Any:
        return _node.get().config

    @property
    def pods_dir(self) -> Path:
        return self.state_dir / "pods"

    def find_pod(self, namespace: str, name: str) -> PodWorker | None:
        return find_pod(self.controller, namespace, name)


class FleetAuthorizer:
    """The node's own SubjectAccessReviews (resource nodes, name = the node asked)."""

    def __init__(self, kube: Kube, mode: str):
        self.kube, self.mode = kube, mode
        self._by_node: dict[str, Authorizer] = {}

    @property
    def reviews(self) -> int:
        return sum(a.reviews for a in self._by_node.values())

    async def authorize(self, user: User, method: str, path: str) -> Decision:
        name = _node.get().node.name
        authorizer = self._by_node.get(name)
        if authorizer is None:
            authorizer = self._by_node[name] = Authorizer(self.kube, name, self.mode)
        return await authorizer.authorize(user, method, path)

    def forget(self, name: str) -> None:
        self._by_node.pop(name, None)


class FleetKubeletAPI:
    def __init__(self, settings: KubeletAPISettings, kube: Kube, kubeconfig: str, state_dir: Path):
        self.settings, self.kube, self.kubeconfig, self.state_dir = settings, kube, kubeconfig, state_dir
        self._by_port: dict[int, PodController] = {}
        self._sites: dict[str, tuple[int, GuardedSockSite]] = {}
        self.runner: web.AppRunner | None = None
        self.ssl_context: Any = None
        self.authorizer = FleetAuthorizer(kube, settings.authorization_mode)
        self.stats = fleet_stats.FleetStats(state_dir / "pods")

    async def start(self, names: tls.ServingNames) -> None:
        """Raises tls.TLSConfigError or OSError (the caller says which file or setting)."""
        s = self.settings
        if s.tls_cert_file and s.tls_key_file:
            cert, key = s.tls_cert_file, s.tls_key_file
        else:
            cert_path, key_path = await tls.self_signed(self.state_dir / "pki", names)
            cert, key = str(cert_path), str(key_path)
        self.ssl_context = tls.server_context(cert, key, client_ca(s, self.kubeconfig))
        app = web.Application(
            middlewares=[self._route, auth_middleware(Authenticator(self.kube, s.anonymous), self.authorizer)]
        )
        ctx = FleetAPIContext(self.kube, self.state_dir)
        for name in ROUTES:
            importlib.import_module(name).add_routes(app, ctx)  # type: ignore[arg-type]
        fleet_stats.add_routes(app, ctx, self.stats)
        self.runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0, logger=server_logger()
        )
        await self.runner.setup()
        log.info("kubelet API serving", extra=kv(address=s.address, ports="one per node"))

    @web.middleware
    async def _route(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        controller = self._by_port.get(sockname[1]) if sockname else None
        if controller is None:
            return web.Response(status=404, text="no node serves this port (it left the fleet)\n")
        _node.set(controller)
        return await handler(request)

    def bind(self) -> socket.socket:
        """A socket for a new node, bound at once so its Node can advertise the port."""
        family = socket.AF_INET6 if ":" in self.settings.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind((self.settings.address, 0))
            sock.listen(64)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    async def serve(self, controller: PodController, sock: socket.socket) -> None:
        assert self.runner is not None
        port = sock.getsockname()[1]
        self._by_port[port] = controller
        site = GuardedSockSite(self.runner, sock, ssl_context=self.ssl_context)
        await site.start()
        self._sites[controller.node.name] = (port, site)
        self.stats.serving(controller.node.name)

    async def stop_serving(self, name: str) -> None:
        entry = self._sites.pop(name, None)
        if entry is not None:
            port, site = entry
            self._by_port.pop(port, None)
            await site.stop()
        self.authorizer.forget(name)
        self.stats.forget(name)

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
