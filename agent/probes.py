"""Liveness, readiness and startup probes with the kubelet's semantics.

One attempt (run_probe) follows pkg/probe and pkg/kubelet/prober/prober.go: exec, httpGet, tcpSocket
and grpc (the standard health checking protocol), with the kubelet's success rules and failure
wording. ProbeWorker follows prober/worker.go: the initial delay, the period, and the success/failure
thresholds that turn attempts into a result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from agent import probe_metrics
from runtimes.container_env import expand

if TYPE_CHECKING:
    from grpclib.const import Status

log = logging.getLogger(__name__)

JSON = dict[str, Any]
Exec = Callable[[list[str], float], Awaitable[tuple[int, bytes]]]  # (command, timeout) -> (exit code, output)

KINDS = ("liveness", "readiness", "startup")
USER_AGENT = "kube-probe/1.36"  # the kubelet sends kube-probe/<major>.<minor>; some apps key on it
MAX_OUTPUT = 10 * 1024  # pkg/probe keeps at most 10 KiB of exec output or response body
MAX_RETRIES = 3  # prober.go retries an attempt that errored (not one that failed)
MAX_REDIRECTS = 10
EXEC_GRACE = 1.0  # the backend enforces the exec timeout; this only guards against one that does not
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass
class ProbeResult:
    success: bool
    message: str = ""
    # The probe could not be run at all (unknown port name, no exec support...). The kubelet throws
    # such results away: they count neither as success nor as failure.
    error: bool = False
    # A success with a warning (probe.Warning: an httpGet probe redirected to another host). It counts
    # as a success, and the kubelet posts a ProbeWarning event for every such attempt.
    warning: bool = False


class _ProbeError(Exception):
    pass


async def run_probe(probe: JSON, container: JSON, pod_ip: str, exec_: Exec | None) -> ProbeResult:
    """One probe attempt, with the kubelet's retries of attempts that could not run."""
    result = ProbeResult(False, "no attempt", error=True)
    for _ in range(MAX_RETRIES):
        try:
            result = await _attempt(probe, container, pod_ip, exec_)
        except _ProbeError as e:
            result = ProbeResult(False, str(e), error=True)
        if not result.error:
            break
    return result


async def _attempt(probe: JSON, container: JSON, pod_ip: str, exec_: Exec | None) -> ProbeResult:
    timeout = float(probe.get("timeoutSeconds") or 1)
    if (action := probe.get("exec")) is not None:
        return await _exec(action, container, timeout, exec_)
    if (action := probe.get("httpGet")) is not None:
        return await _http_get(action, container, pod_ip, timeout)
    if (action := probe.get("tcpSocket")) is not None:
        return await _tcp(action, container, pod_ip, timeout)
    if (action := probe.get("grpc")) is not None:
        return await _grpc(action, pod_ip, timeout)
    raise _ProbeError(f"missing probe handler for container {container.get('name')}")


# --- exec ------------------------------------------------------------------------------------------


async def _exec(action: JSON, container: JSON, timeout: float, exec_: Exec | None) -> ProbeResult:
    if exec_ is None:
        raise _ProbeError("exec probes are not supported by this runtime")
    # Like the kubelet, expand $(VAR) with the container's literal env values only (valueFrom -> "").
    static_env = {e["name"]: e.get("value") or "" for e in container.get("env") or []}
    command = [expand(arg, static_env) for arg in action.get("command") or []]
    try:
        code, output = await asyncio.wait_for(exec_(command, timeout), timeout + EXEC_GRACE)
    except TimeoutError:
        joined = " ".join(command).replace("\\", "\\\\").replace('"', '\\"')
        return ProbeResult(False, f'command "{joined}" timed out')
    except _ProbeError:
        raise
    except Exception as e:  # the runtime could not exec: an error, not a failure
        raise _ProbeError(str(e) or type(e).__name__) from e
    # The message is the command's output, as in "Liveness probe failed: <output>".
    return ProbeResult(code == 0, output[:MAX_OUTPUT].decode("utf-8", "replace"))


# --- httpGet and tcpSocket ---------------------------------------------------------------------------


def resolve_port(port: Any, container: JSON) -> int:
    """An IntOrString port: a number, a named container port, or a number in a string."""
    if isinstance(port, bool) or port is None:
        raise _ProbeError(f"intOrString had no kind: {port!r}")
    if isinstance(port, int):
        number = port
    else:
        named = [p.get("containerPort", 0) for p in container.get("ports") or [] if p.get("name") == port]
        if named:
            number = int(named[0])
        else:
            try:
                number = int(str(port), 10)
            except ValueError:
                raise _ProbeError(f'strconv.Atoi: parsing "{port}": invalid syntax') from None
    if not 0 < number < 65536:
        raise _ProbeError(f"invalid port number: {number}")
    return number


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # net.JoinHostPort


def _dial_error(address: str, host: str, e: OSError) -> str:
    """Go's wording for a failed dial: 'dial tcp 10.0.0.1:81: connect: connection refused'."""
    if isinstance(e, socket.gaierror):
        return f"dial tcp: lookup {host}: no such host"
    if e.errno:
        text = os.strerror(e.errno)
        text = text[:1].lower() + text[1:]
        return f"dial tcp {address}: connect: {text}"
    return f"dial tcp {address}: {e}"


async def _tcp(action: JSON, container: JSON, pod_ip: str, timeout: float) -> ProbeResult:
    host = action.get("host") or pod_ip
    port = resolve_port(action.get("port"), container)
    address = _host_port(host, port)
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return ProbeResult(False, f"dial tcp {address}: i/o timeout")
    except OSError as e:
        return ProbeResult(False, _dial_error(address, host, e))
    writer.close()  # the probe only needs the handshake
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return ProbeResult(True)


def _headers(action: JSON, user_agent: str = USER_AGENT) -> tuple[CIMultiDict[str], set[str]]:
    headers: CIMultiDict[str] = CIMultiDict()
    for h in action.get("httpHeaders") or []:
        headers.add(h.get("name", ""), h.get("value", ""))
    skip: set[str] = set()
    for name, default in (("User-Agent", user_agent), ("Accept", "*/*")):
        if name not in headers:
            headers[name] = default
        elif not any(headers.getall(name)):
            # An explicitly empty header means "send none" (the kubelet deletes an empty Accept).
            del headers[name]
            skip.add(name)
    return headers, skip


def http_request(
    action: JSON, container: JSON, pod_ip: str, user_agent: str = USER_AGENT
) -> tuple[str, CIMultiDict[str], set[str]]:
    """The URL, headers and headers not to send of an HTTPGetAction (probes and lifecycle hooks)."""
    scheme = (action.get("scheme") or "HTTP").lower()
    host = action.get("host") or pod_ip
    port = resolve_port(action.get("port"), container)
    path = action.get("path") or ""
    if path and not path.startswith("/"):
        path = "/" + path
    headers, skip = _headers(action, user_agent)
    return f"{scheme}://{_host_port(host, port)}{path}", headers, skip


def http_error(url: str, e: BaseException) -> str:
    """Go's wording for a failed GET: 'Get "http://...": dial tcp ...: connect: connection refused'."""
    if isinstance(e, TimeoutError):
        return f'Get "{url}": context deadline exceeded (Client.Timeout exceeded while awaiting headers)'
    if isinstance(e, aiohttp.ClientConnectorError):
        return f'Get "{url}": {_dial_error(_host_port(e.host, e.port), e.host, e.os_error)}'
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return f'Get "{url}": EOF'
    return f'Get "{url}": {e}'


async def _http_get(action: JSON, container: JSON, pod_ip: str, timeout: float) -> ProbeResult:
    url, headers, skip = http_request(action, container, pod_ip)
    current = url
    # No keep-alive and no certificate checks, as the kubelet's prober transport.
    connector = aiohttp.TCPConnector(ssl=False, force_close=True)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session,
            asyncio.timeout(timeout),
        ):
            for _ in range(MAX_REDIRECTS + 1):
                async with session.get(
                    URL(current), headers=headers, skip_auto_headers=skip, allow_redirects=False
                ) as resp:
                    location = resp.headers.get("Location")
                    if resp.status in _REDIRECTS and location:
                        target = URL(current).join(URL(location))
                        # Redirects are followed only on the same host; any other ends the probe
                        # with the redirect response itself (a success with a warning).
                        if target.host == URL(url).host:
                            current = str(target)
                            continue
                    body = await resp.content.read(MAX_OUTPUT)
                    return _http_result(resp.status, body)
            return ProbeResult(False, f'Get "{current}": stopped after {MAX_REDIRECTS} redirects')
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
        return ProbeResult(False, http_error(current, e))


def _http_result(status: int, body: bytes) -> ProbeResult:
    if 200 <= status < 300:
        return ProbeResult(True, body.decode("utf-8", "replace"))
    if 300 <= status < 400:
        text = body.decode("utf-8", "replace")
        return ProbeResult(True, f"Probe terminated redirects, Response body: {text}", warning=True)
    # Never the body: the kubelet keeps response bodies out of events (kubernetes issue 99425).
    return ProbeResult(False, f"HTTP probe failed with statuscode: {status}")


# --- grpc ----------------------------------------------------------------------------------------------


def _go_duration(seconds: float) -> str:
    return f"{seconds:g}s"


async def _grpc(action: JSON, pod_ip: str, timeout: float) -> ProbeResult:
    """grpc.health.v1.Health/Check on the Pod's IP, as pkg/probe/grpc: SERVING is a success, any other
    answer or error a failure, in the kubelet's wording. No TLS (the kubelet's probe has none either)."""
    # Imported on first use: grpclib and protobuf are ~10 MiB that a node (or a fleet of emulated
    # nodes) without gRPC probes never needs.
    from grpclib.client import Channel
    from grpclib.const import Status
    from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
    from grpclib.health.v1.health_grpc import HealthStub
    from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

    port = action.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise _ProbeError(f"invalid port number: {port}")
    service = action.get("service") or ""
    address = _host_port(pod_ip, port)
    channel = Channel(pod_ip, port)
    within = _go_duration(timeout)
    try:
        async with asyncio.timeout(timeout):
            reply = await HealthStub(channel).Check(HealthCheckRequest(service=service))
    except TimeoutError:
        return ProbeResult(False, f"timeout: health rpc did not complete within {within}")
    except GRPCError as e:
        if e.status == Status.UNIMPLEMENTED:
            return ProbeResult(
                False,
                "error: this server does not implement the grpc health protocol (grpc.health.v1.Health): "
                f"{e.message or ''}",
            )
        if e.status == Status.DEADLINE_EXCEEDED:
            return ProbeResult(False, f"timeout: health rpc did not complete within {within}")
        code = _grpc_code(e.status)
        return ProbeResult(False, f"error: health rpc probe failed: rpc error: code = {code} desc = {e.message}")
    except OSError as e:
        # The kubelet dials with WithBlock: a refused address is retried until the timeout, and what
        # it reports then is a failure to connect within it (here at once, with the cause).
        detail = _dial_error(address, pod_ip, e)
        return ProbeResult(False, f'timeout: failed to connect service "{address}" within {within}: {detail}')
    except (StreamTerminatedError, ProtocolError) as e:
        return ProbeResult(False, f"error: health rpc probe failed: {e}")
    finally:
        channel.close()
    if reply.status != HealthCheckResponse.SERVING:
        name = HealthCheckResponse.ServingStatus.Name(reply.status)
        return ProbeResult(False, f'service unhealthy (responded with "{name}")')
    return ProbeResult(True, "service healthy")


def _grpc_code(status: Status) -> str:
    """Go's codes.Code.String(): DEADLINE_EXCEEDED -> DeadlineExceeded (OK, Canceled as in grpc-go)."""
    from grpclib.const import Status

    if status == Status.CANCELLED:
        return "Canceled"
    return "".join(part.capitalize() for part in status.name.split("_"))


# --- the worker ----------------------------------------------------------------------------------


class ProbeWorker:
    """Probes one container (one instance of it: make a new worker for a restarted container).

    The thresholded result starts as the kubelet's: readiness False until a success, liveness True
    until failureThreshold failures in a row, startup unknown (None) until either threshold is met.
    on_change(kind, ok, message) is called when that result changes; on_attempt(kind, reason,
    message) for an attempt that failed (Unhealthy) or succeeded with a warning (ProbeWarning).
    After a liveness or startup failure the worker stops probing (the container is going to be
    restarted), and a startup probe stops once it has succeeded; run() then idles until cancelled.
    The caller starts liveness and readiness workers only once the startup probe, if any, has
    succeeded, as the kubelet does.
    """

    def __init__(
        self,
        kind: str,
        probe: JSON,
        container: JSON,
        pod_ip: str,
        exec_: Exec | None,
        on_change: Callable[[str, bool, str], None],
        on_attempt: Callable[[str, str, str], None] | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"probe kind must be one of {', '.join(KINDS)}, not {kind!r}")
        self.kind, self.probe, self.container, self.pod_ip = kind, probe, container, pod_ip
        self.exec_, self.on_change, self.on_attempt = exec_, on_change, on_attempt
        self.initial_delay = float(probe.get("initialDelaySeconds") or 0)
        self.period = float(probe.get("periodSeconds") or 10)
        self.failure_threshold = int(probe.get("failureThreshold") or 3)
        # API validation requires 1 for liveness and startup probes.
        self.success_threshold = int(probe.get("successThreshold") or 1) if kind == "readiness" else 1
        self.result: bool | None = {"readiness": False, "liveness": True, "startup": None}[kind]
        self.last: ProbeResult | None = None  # the latest attempt, whatever its effect
        self._last_success: bool | None = None
        self._run_length = 0  # attempts in a row with the same outcome
        self.target: probe_metrics.Target | None = None  # set: attempts are counted in prober_probe_total

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if self.target is not None:
                probe_metrics.COUNTS.forget(self.kind, self.target)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self.initial_delay)
        next_at = loop.time()
        while await self.probe_once():
            # A ticker: attempts start every period, whatever each took; missed ticks are dropped.
            next_at += self.period
            now = loop.time()
            if next_at < now:
                next_at = now
            await asyncio.sleep(next_at - now)
        await asyncio.Future()  # nothing more to do for this container: wait to be cancelled

    def _report(self, reason: str, message: str) -> None:
        """prober.go posts an event for every failed attempt (Unhealthy) and every success with a
        warning (ProbeWarning); the event recorder folds the repeats into one Event's count."""
        if self.on_attempt is None:
            return
        try:
            self.on_attempt(self.kind, reason, message)
        except Exception:
            log.exception("%s probe event callback failed", self.kind)

    async def probe_once(self) -> bool:
        """One attempt and its effect on the result; False when this worker should stop probing."""
        result = await run_probe(self.probe, self.container, self.pod_ip, self.exec_)
        self.last = result
        if self.target is not None:
            outcome = "unknown" if result.error else "successful" if result.success else "failed"
            probe_metrics.COUNTS.record(self.kind, self.target, outcome)
        if result.error:
            log.debug("%s probe of %s errored: %s", self.kind, self.container.get("name"), result.message)
            return True
        if result.warning:
            self._report("ProbeWarning", f"{self.kind.capitalize()} probe warning: {result.message}")
        elif not result.success:
            self._report("Unhealthy", f"{self.kind.capitalize()} probe failed: {result.message}")
        if result.success == self._last_success:
            self._run_length += 1
        else:
            self._last_success, self._run_length = result.success, 1
        threshold = self.success_threshold if result.success else self.failure_threshold
        if self._run_length < threshold:
            return True
        if self.result != result.success:
            self.result = result.success
            message = "" if result.success else f"{self.kind.capitalize()} probe failed: {result.message}"
            try:
                self.on_change(self.kind, result.success, message)
            except Exception:
                log.exception("%s probe callback failed", self.kind)
        if self.kind == "startup" and result.success:
            return False  # started: the kubelet stops running the startup probe
        if self.kind != "readiness" and not result.success:
            self._run_length = 0
            return False  # on hold until a new container, as worker.go does
        return True
