"""A thin raw-JSON client for the Kubernetes API.

kubernetes_asyncio reads the kubeconfig (certificates, tokens, exec plugins);
requests then go through one shared aiohttp session as plain dicts, because
deserialising into generated model objects is many times slower (see
shared/LIBRARIES.md) and the agent only needs a handful of verbs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson
import yarl

from agent import __version__, kubeconfig, metrics
from agent.kubeconfig import KubeconfigError

__all__ = ["ApiError", "Kube", "KubeconfigError"]

USER_AGENT = f"kubelet-emu/{__version__}"
JSON = dict[str, Any]
# Connections to the API server at most: the Pod status writes in flight (128, see
# agent/pods.py), the watches, and room for the rest (lease, node status, events).
CONNECTIONS = 160
URL_CACHE_SIZE = 8192
RESET_GRACE = 40.0  # seconds a replaced pool lives on: longer than any request's timeout (30 s)

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class ApiError(Exception):
    """An answer from the API server other than 2xx, or no answer at all."""

    def __init__(self, status: int, reason: str, message: str, method: str = "", path: str = ""):
        self.status = status
        self.reason = reason
        self.message = message
        self.method = method
        self.path = path
        super().__init__(self.describe())

    def describe(self) -> str:
        where = f"{self.method} {self.path}: " if self.path else ""
        if self.status == 0:
            return f"{where}API server unreachable: {self.message}"
        return f"{where}{self.status} {self.reason}: {self.message}"

    @property
    def unreachable(self) -> bool:
        return self.status == 0

    @property
    def forbidden(self) -> bool:
        return self.status == 403

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def gone(self) -> bool:
        return self.status == 410


class Kube:
    """One connection pool to one API server, authenticated as the kubeconfig says."""

    def __init__(
        self, host: str, ssl_context: ssl.SSLContext | bool, auth: Any | None = None, connections: int = CONNECTIONS
    ):
        self.host = host.rstrip("/")
        self.connections = connections
        self._ssl = ssl_context
        self._auth = auth  # kubeconfig.ClientConfig, or _PluginAuth for exec/auth-provider users
        self._session: aiohttp.ClientSession | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.requests_by_verb: dict[str, int] = {}
        # Parsed once per path and timeout: a fleet renews 1000 Leases on the same paths, and
        # parsing the URL again was ~5 % of its idle CPU.
        self._urls: dict[str, yarl.URL] = {}
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _url(self, path: str) -> yarl.URL:
        url = self._urls.get(path)
        if url is None:
            if len(self._urls) >= URL_CACHE_SIZE:  # Pod paths come and go; Lease and Node paths stay
                self._urls.clear()
            url = self._urls[path] = yarl.URL(self.host + path)
        return url

    def _timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(seconds)
        if timeout is None:
            timeout = self._timeouts[seconds] = aiohttp.ClientTimeout(total=seconds)
        return timeout

    def sibling(self, connections: int) -> Kube:
        """The same server and credentials over a pool of its own, at most `connections` wide.

        aiohttp hands out its idle connections in turn, so a steady trickle of requests keeps every
        connection a burst ever opened alive: a fleet's heartbeats (100 a second for 1000 nodes)
        held 160 TLS connections open forever. Heartbeats get a small pool of their own; the big
        one then idles out after a burst, and a burst of Pod writes never queues a Lease renewal.
        Requests are counted in the same `requests_by_verb`."""
        other = Kube(self.host, self._ssl, self._auth, connections=connections)
        other.requests_by_verb = self.requests_by_verb
        return other

    @classmethod
    async def from_kubeconfig(cls, path: str) -> Kube:
        try:
            cfg = kubeconfig.load(path)
            return cls(cfg.server, cfg.ssl, cfg)
        except kubeconfig.NeedsPlugin:
            return await cls._from_kubeconfig_with_plugins(path)

    @classmethod
    async def _from_kubeconfig_with_plugins(cls, path: str) -> Kube:
        """exec and auth-provider users: kubernetes_asyncio knows how to run those plugins."""
        from kubernetes_asyncio.client import Configuration
        from kubernetes_asyncio.config import ConfigException, load_kube_config

        cfg = Configuration()
        try:
            await load_kube_config(config_file=path, client_configuration=cfg, persist_config=False)
        except (ConfigException, OSError, ValueError, TypeError, KeyError) as exc:
            detail = " ".join(str(exc).split())
            raise KubeconfigError(f"kubeconfig {path}: {detail}") from exc
        context: ssl.SSLContext | bool = False
        if cfg.host.startswith("https://"):
            try:
                context = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
                if cfg.cert_file:
                    context.load_cert_chain(cfg.cert_file, keyfile=cfg.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise KubeconfigError(f"kubeconfig {path}: cannot load its certificates: {exc}") from exc
            if not cfg.verify_ssl:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        return cls(cfg.host, context, _PluginAuth(cfg))

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Idle connections are kept 60 s (aiohttp's default is 15 s; the API
            # server closes them after 90 s), so a burst after a quiet minute
            # reuses them instead of paying a TLS handshake each.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=self.connections, keepalive_timeout=60),
                headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
                json_serialize=json.dumps,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        for task in list(self._closing):
            task.cancel()  # closes its session now
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def reset_connections(self) -> None:
        """New requests get new connections. After an outage, a pooled connection made before it
        may be half dead (a dropped network never says so) and hold a request until its timeout.
        The old pool is closed once the requests still on it are answered or timed out (aiohttp
        closing a connection under a streamed answer would leave its reader waiting for good);
        watches are restarted by their informers, see Informer.retry_now."""
        old, self._session = self._session, None
        if old is not None and not old.closed:
            task = asyncio.get_running_loop().create_task(_close_later(old, RESET_GRACE))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def switch_tls(self, ssl_context: ssl.SSLContext | bool) -> tuple[ssl.SSLContext | bool, Any]:
        """New requests go out on new connections made with `ssl_context` (a rotated client
        certificate, agent/bootstrap/rotation.py). Returns the TLS context and session in use
        until now: close that session once its requests are done, or give both back to
        switch_back()."""
        previous = (self._ssl, self._session)
        self._ssl, self._session = ssl_context, None
        return previous

    def switch_back(self, previous: tuple[ssl.SSLContext | bool, Any]) -> aiohttp.ClientSession | None:
        """Undo switch_tls(); returns the session made meanwhile, for the caller to close."""
        made = self._session
        self._ssl, self._session = previous
        return made

    async def _headers(self) -> dict[str, str]:
        if self._auth is None:
            return {}
        header = await self._auth.header() if isinstance(self._auth, _PluginAuth) else self._auth.auth_header()
        return {"Authorization": header} if header else {}

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float = 30,
        parse: bool = True,
    ) -> JSON:
        """One request; the answer as a dict, or {} with parse=False (no decoding cost)."""
        headers = await self._headers()
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = body if isinstance(body, bytes) else orjson.dumps(body)  # bytes: encoded already
        self.requests_by_verb[method] = self.requests_by_verb.get(method, 0) + 1
        status = 0  # none: no answer came
        try:
            async with self.session.request(
                method,
                self._url(path),
                params=_query(query),
                data=data,
                headers=headers,
                timeout=self._timeout(timeout),
            ) as resp:
                status = resp.status
                raw = await resp.read()
                if resp.status >= 300:
                    raise _error_from(resp.status, resp.reason or "", raw, method, path)
                # orjson: decoding the answers and watch events was a tenth of a Pod's CPU with json.
                return orjson.loads(raw) if raw and parse else {}
        except aiohttp.ClientError as exc:
            raise ApiError(0, "Unreachable", str(exc) or type(exc).__name__, method, path) from exc
        except TimeoutError as exc:
            raise ApiError(0, "Timeout", f"no answer within {timeout:g}s", method, path) from exc
        finally:
            metrics.api_request(method, path, status)

    async def get(self, path: str, **query: Any) -> JSON:
        return await self.request("GET", path, query=query)

    async def create(self, path: str, body: JSON) -> JSON:
        return await self.request("POST", path, body=body)

    async def replace(self, path: str, body: JSON) -> JSON:
        return await self.request("PUT", path, body=body)

    async def patch(self, path: str, body: Any, content_type: str = STRATEGIC_MERGE_PATCH, parse: bool = True) -> JSON:
        return await self.request("PATCH", path, body=body, content_type=content_type, parse=parse)

    async def delete(self, path: str, body: JSON | None = None, parse: bool = True) -> JSON:
        return await self.request("DELETE", path, body=body, parse=parse)

    async def watch(
        self, path: str, resource_version: str, *, timeout_seconds: int = 300, **query: Any
    ) -> AsyncIterator[JSON]:
        """Yield watch events ({"type", "object"}) from one watch request.

        Ends when the server closes the stream. An ERROR event (such as 410
        Gone) is raised as ApiError so the caller can relist.
        """
        params = dict(query)
        params.update(
            watch="true",
            resourceVersion=resource_version,
            allowWatchBookmarks="true",
            timeoutSeconds=str(timeout_seconds),
        )
        headers = await self._headers()
        self.requests_by_verb["WATCH"] = self.requests_by_verb.get("WATCH", 0) + 1
        status = 0
        try:
            async with self.session.get(
                self.host + path,
                params=_query(params),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout_seconds + 30),
            ) as resp:
                status = resp.status
                metrics.api_request("WATCH", path, status)  # counted when the answer starts, like a list
                if resp.status >= 300:
                    raise _error_from(resp.status, resp.reason or "", await resp.read(), "WATCH", path)
                async for line in _lines(resp.content):
                    event = orjson.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object") or {}
                        raise ApiError(
                            int(status.get("code") or 500),
                            status.get("reason", "Error"),
                            status.get("message", ""),
                            "WATCH",
                            path,
                        )
                    yield event
        except aiohttp.ClientError as exc:
            raise ApiError(0, "Unreachable", str(exc) or type(exc).__name__, "WATCH", path) from exc
        except TimeoutError as exc:
            raise ApiError(0, "Timeout", "watch stalled", "WATCH", path) from exc
        finally:
            if not status:
                metrics.api_request("WATCH", path, 0)


async def _close_later(session: aiohttp.ClientSession, delay: float) -> None:
    try:
        await asyncio.sleep(delay)
    finally:
        await session.close()


class _PluginAuth:
    """Bearer tokens from kubernetes_asyncio's exec/auth-provider support, refreshed when it says so."""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    async def header(self) -> str | None:
        if self.cfg.refresh_api_key_hook is not None:
            await self.cfg.refresh_api_key_hook(self.cfg)
        return self.cfg.get_api_key_with_prefix("BearerToken") if self.cfg.api_key else None


async def _lines(stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    # readline() caps a line at the read buffer size; Pod objects can be large,
    # so assemble lines from chunks instead.
    buf = b""
    async for chunk in stream.iter_any():
        if b"\n" not in chunk:
            buf += chunk
            continue
        *lines, rest = (buf + chunk).split(b"\n")  # one split, not a copy of the rest per line
        buf = rest
        for line in lines:
            if line.strip():
                yield line
    if buf.strip():
        yield buf


def _query(query: Mapping[str, Any] | None) -> dict[str, str] | None:
    if not query:
        return None
    out: dict[str, str] = {}
    for key, value in query.items():
        if value is None:
            continue
        out[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


def _error_from(status: int, reason: str, raw: bytes, method: str, path: str) -> ApiError:
    message = raw.decode(errors="replace").strip()
    try:
        body = json.loads(raw)
        if isinstance(body, dict):
            message = body.get("message", message)
            reason = body.get("reason", reason)
    except ValueError:
        pass
    return ApiError(status, reason, message, method, path)


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    return min(cap, base * (2 ** min(attempt, 10)))


async def sleep_backoff(attempt: int, base: float = 0.5, cap: float = 30.0) -> None:
    """Exponential backoff with a cap, for retrying while the API server is down."""
    await asyncio.sleep(backoff_delay(attempt, base, cap))
