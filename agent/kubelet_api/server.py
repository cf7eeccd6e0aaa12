"""The kubelet HTTPS API server: TLS, authentication and authorization around the route modules.

Every path needs an authenticated and authorized user, /healthz included, as on the kubelet's
secure port. Route modules (`add_routes(app, ctx)`) are this package's own plus, when installed,
streaming (exec/attach/portForward), stats and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import importlib.util
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from agent.config import KubeletAPISettings
from agent.kube import Kube
from agent.kubeconfig import cluster_ca
from agent.kubelet_api import csr, tls
from agent.kubelet_api.authn import AuthenticationError, Authenticator
from agent.kubelet_api.authz import AuthorizationError, Authorizer
from agent.kubelet_api.context import KubeletAPIContext
from agent.kubelet_api.slow_clients import GuardedSockSite, server_logger
from common.logfmt import kv

log = logging.getLogger(__name__)

DEFAULT_PORT = 10250
OWN_ROUTES = (
    "agent.kubelet_api.pods_route",
    "agent.kubelet_api.logs_route",
    "agent.kubelet_api.configz",
    "agent.kubelet_api.node_logs",
)
OPTIONAL_ROUTES = ("agent.kubelet_api.streaming", "agent.kubelet_api.stats", "agent.kubelet_api.metrics")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class KubeletAPIError(Exception):
    """The server cannot start; the message names the setting or file and the fix."""


PORT_FILE = "kubelet-api-port"  # in the state dir: the port `port = 0` picked, reused at the next start


def bind(settings: KubeletAPISettings, cli_port: int | None = None, state_dir: Path | None = None) -> socket.socket:
    """Bind the listening socket early, so the Node can advertise the port actually bound.

    An explicit port (config or --port) that is taken is an error. The default 10250, when taken
    (another agent on this host), falls back to a free port with a warning. Port 0 picks a free
    port once and keeps it across restarts (remembered in the state dir) while it stays free,
    so static scrape targets keep working.
    """
    explicit = cli_port if cli_port is not None else settings.port
    port = DEFAULT_PORT if explicit is None else explicit
    if port == 0 and state_dir is not None:
        return _bind_remembered(settings.address, state_dir / PORT_FILE)
    try:
        return _listen(settings.address, port)
    except OSError as exc:
        if explicit is None and exc.errno == errno.EADDRINUSE:
            sock = _listen(settings.address, 0)
            log.warning(
                "kubelet API port 10250 is in use; serving on a free port instead (set [kubelet_api] port to choose)",
                extra=kv(port=sock.getsockname()[1]),
            )
            return sock
        raise KubeletAPIError(
            f"cannot listen on {settings.address}:{port} for the kubelet API: {exc.strerror or exc}; "
            "free the port or set [kubelet_api] port (0 picks a free one)"
        ) from exc


def _bind_remembered(address: str, record: Path) -> socket.socket:
    remembered = _read_port(record)
    sock: socket.socket | None = None
    if remembered:
        try:
            sock = _listen(address, remembered)
        except OSError as exc:
            log.warning(
                "the kubelet API port used before is taken now; serving on a new free port",
                extra=kv(previous=remembered, error=exc.strerror or str(exc), file=str(record)),
            )
    if sock is None:
        sock = _listen(address, 0)
    port = sock.getsockname()[1]
    if port != remembered:
        try:
            record.write_text(f"{port}\n")
        except OSError as exc:
            log.warning("cannot remember the kubelet API port", extra=kv(file=str(record), error=str(exc)))
    return sock


def _read_port(record: Path) -> int | None:
    try:
        text = record.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read the remembered kubelet API port", extra=kv(file=str(record), error=str(exc)))
        return None
    if text.isdigit() and 0 < int(text) < 65536:
        return int(text)
    log.warning("ignoring a malformed kubelet API port record", extra=kv(file=str(record), content=text[:20]))
    return None


def _listen(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def auth_middleware(authenticator: Authenticator, authorizer: Authorizer) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        peercert = request.transport.get_extra_info("peercert") if request.transport else None
        try:
            user = await authenticator.authenticate(peercert, request.headers.get("Authorization"))
        except AuthenticationError:
            user = None
        if user is None:
            return web.Response(status=401, text="Unauthorized")
        try:
            decision = await authorizer.authorize(user, request.method, request.path)
        except AuthorizationError as exc:
            return web.Response(status=500, text=str(exc))
        if not decision.allowed:
            return web.Response(status=403, text=decision.message)
        request["user"] = user
        return await handler(request)

    return middleware


def route_modules() -> list[str]:
    """Ours, and the optional ones that are installed (their branches may not be merged yet)."""
    return [*OWN_ROUTES, *(name for name in OPTIONAL_ROUTES if importlib.util.find_spec(name) is not None)]


def build_app(ctx: KubeletAPIContext, authenticator: Authenticator, authorizer: Authorizer) -> web.Application:
    app = web.Application(middlewares=[auth_middleware(authenticator, authorizer)])
    app["ctx"] = ctx
    for name in route_modules():
        importlib.import_module(name).add_routes(app, ctx)
    return app


async def serving_files(
    settings: KubeletAPISettings, state_dir: Path, names: tls.ServingNames
) -> tuple[str, str, bool]:
    """(certificate, key, whether to ask the cluster for a certificate meanwhile)."""
    if settings.tls_cert_file and settings.tls_key_file:
        return settings.tls_cert_file, settings.tls_key_file, False
    if settings.serving_cert == "csr":
        issued = csr.issued_files(state_dir / "pki", names)
        if issued is not None:
            return str(issued[0]), str(issued[1]), False
    cert, key = await tls.self_signed(state_dir / "pki", names)
    return str(cert), str(key), settings.serving_cert == "csr"


def client_ca(settings: KubeletAPISettings, kubeconfig: str) -> bytes | None:
    if settings.client_ca_file:
        try:
            return Path(settings.client_ca_file).read_bytes()
        except OSError as exc:
            raise KubeletAPIError(f"cannot read [kubelet_api] client_ca_file {settings.client_ca_file}: {exc}") from exc
    ca = cluster_ca(kubeconfig)
    if ca is None:
        log.warning(
            "no client CA: the node kubeconfig names no certificate-authority; client certificates "
            "(the API server's) will not be accepted; set [kubelet_api] client_ca_file"
        )
    return ca


class KubeletAPIServer:
    """Owns the listening socket and the aiohttp runner."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.runner: web.AppRunner | None = None
        self.authenticator: Authenticator | None = None
        self.authorizer: Authorizer | None = None
        self.cert_request: asyncio.Task[None] | None = None

    async def start(
        self,
        ctx: KubeletAPIContext,
        settings: KubeletAPISettings,
        kube: Kube,
        kubeconfig: str,
        names: tls.ServingNames,
    ) -> None:
        try:
            cert, key, request_cert = await serving_files(settings, ctx.state_dir, names)
        except tls.TLSConfigError as exc:
            raise KubeletAPIError(str(exc)) from exc
        except OSError as exc:
            raise KubeletAPIError(
                f"cannot write the self-signed serving certificate under {ctx.state_dir / 'pki'}: {exc}; "
                "make the state dir writable or set [kubelet_api] tls_cert_file and tls_key_file"
            ) from exc
        try:
            ssl_context = tls.server_context(cert, key, client_ca(settings, kubeconfig))
        except tls.TLSConfigError as exc:
            raise KubeletAPIError(str(exc)) from exc
        if request_cert:
            # New connections get the issued certificate once it is loaded into the live context.
            def install(cert_file: Path, key_file: Path) -> None:
                ssl_context.load_cert_chain(str(cert_file), str(key_file))

            requester = csr.ServingCertRequester(kube, ctx.node_name, names, ctx.state_dir / "pki", install)
            self.cert_request = asyncio.create_task(requester.run(), name="serving-csr")
        self.authenticator = Authenticator(kube, settings.anonymous)
        self.authorizer = Authorizer(kube, ctx.node_name, settings.authorization_mode)
        app = build_app(ctx, self.authenticator, self.authorizer)
        self.runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0, logger=server_logger()
        )
        await self.runner.setup()
        # Header read and TLS handshake timeouts: a client dribbling its headers is let go.
        site = GuardedSockSite(self.runner, self.sock, ssl_context=ssl_context)
        await site.start()
        log.info(
            "kubelet API serving",
            extra=kv(address=settings.address, port=self.port, authorization=settings.authorization_mode),
        )

    async def close(self) -> None:
        if self.cert_request is not None:
            self.cert_request.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.cert_request
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        self.sock.close()
