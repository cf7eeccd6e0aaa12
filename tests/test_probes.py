"""Probes against real servers, real sockets and real processes."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.probes import USER_AGENT, ProbeResult, ProbeWorker, run_probe

HOST = "127.0.0.1"


async def real_exec(command: list[str], timeout: float) -> tuple[int, bytes]:
    """What a process backend would do: run it, combined output, killed at the timeout."""
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out


class CountingExec:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, command: list[str], timeout: float) -> tuple[int, bytes]:
        self.calls.append(time.monotonic())
        return await real_exec(command, timeout)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]  # nobody listens once it is closed


class Server:
    """An aiohttp app whose /healthz answers with the statuses queued in `statuses`."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.default = 200
        self.requests: list[web.Request] = []
        self.port = 0

    async def healthz(self, request: web.Request) -> web.Response:
        self.requests.append(request)
        status = self.statuses.pop(0) if self.statuses else self.default
        return web.Response(status=status, text=f"status {status}")

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.Response(text="late")

    async def redirect(self, request: web.Request) -> web.Response:
        where = request.query["to"]
        raise web.HTTPFound(where)

    async def loop(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/redirect", self.redirect)
        app.router.add_get("/loop", self.loop)
        return app


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    runner = web.AppRunner(srv.app(), shutdown_timeout=0.1)  # do not wait for /slow
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    srv.port = runner.addresses[0][1]
    yield srv
    await runner.cleanup()


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[Server]:
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    args = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1"]
    openssl = await asyncio.create_subprocess_exec(
        "openssl", *args, "-subj", "/CN=not-this-host", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    assert await openssl.wait() == 0
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    srv = Server()
    runner = web.AppRunner(srv.app(), shutdown_timeout=0.1)  # do not wait for /slow
    await runner.setup()
    await web.TCPSite(runner, HOST, 0, ssl_context=ctx).start()
    srv.port = runner.addresses[0][1]
    yield srv
    await runner.cleanup()


def http(port: int | str, path: str = "/healthz", **extra: Any) -> dict[str, Any]:
    return {"httpGet": {"port": port, "path": path, **extra}, "timeoutSeconds": 1}


CONTAINER: dict[str, Any] = {"name": "app", "ports": [{"name": "web", "containerPort": 0}]}


# --- single attempts ---------------------------------------------------------------------------------


async def test_http_success_failure_and_headers(server: Server) -> None:
    server.statuses = [200, 302, 399, 404, 500]
    results = [await run_probe(http(server.port), CONTAINER, HOST, None) for _ in range(5)]
    assert [r.success for r in results] == [True, True, True, False, False]
    assert results[0].message == "status 200"
    assert results[3].message == "HTTP probe failed with statuscode: 404"
    assert results[4].message == "HTTP probe failed with statuscode: 500"
    request = server.requests[0]
    assert request.headers["User-Agent"] == USER_AGENT
    assert request.headers["Accept"] == "*/*"

    probe = http(
        server.port,
        "healthz?verbose=1",
        httpHeaders=[
            {"name": "X-Custom", "value": "a"},
            {"name": "X-Custom", "value": "b"},
            {"name": "Host", "value": "example.com"},
            {"name": "User-Agent", "value": "mine"},
        ],
    )
    assert (await run_probe(probe, CONTAINER, HOST, None)).success
    request = server.requests[-1]
    assert request.path == "/healthz" and request.query["verbose"] == "1"
    assert request.headers.getall("X-Custom") == ["a", "b"]
    assert request.headers["Host"] == "example.com"
    assert request.headers["User-Agent"] == "mine"


async def test_http_named_port_host_and_scheme(server: Server) -> None:
    container = {"name": "app", "ports": [{"name": "web", "containerPort": server.port}]}
    unreachable = {**http("web"), "timeoutSeconds": 0.3}
    assert (await run_probe(unreachable, container, "192.0.2.1", None)).success is False  # pod IP unreachable...
    assert (await run_probe(http("web", host=HOST), container, "192.0.2.1", None)).success  # ...host wins
    assert (await run_probe(http(str(server.port), scheme="HTTP"), container, HOST, None)).success
    bad = await run_probe(http("nope"), container, HOST, None)
    assert bad.error and bad.message == 'strconv.Atoi: parsing "nope": invalid syntax'
    assert (await run_probe(http(70000), container, HOST, None)).message == "invalid port number: 70000"


async def test_https_skips_certificate_checks(tls_server: Server) -> None:
    result = await run_probe(http(tls_server.port, scheme="HTTPS"), CONTAINER, HOST, None)
    assert result == ProbeResult(True, "status 200")


async def test_http_connection_refused_timeout_and_redirects(server: Server) -> None:
    port = closed_port()
    refused = await run_probe(http(port), CONTAINER, HOST, None)
    assert refused == ProbeResult(
        False, f'Get "http://{HOST}:{port}/healthz": dial tcp {HOST}:{port}: connect: connection refused'
    )

    started = time.monotonic()
    slow = await run_probe({**http(server.port, "/slow"), "timeoutSeconds": 0.3}, CONTAINER, HOST, None)
    assert time.monotonic() - started < 2
    assert not slow.success and "Client.Timeout exceeded" in slow.message

    local = await run_probe(http(server.port, "/redirect?to=/healthz"), CONTAINER, HOST, None)
    assert local == ProbeResult(True, "status 200")  # followed on the same host
    remote = await run_probe(http(server.port, "/redirect?to=http://192.0.2.1/"), CONTAINER, HOST, None)
    assert remote.success and remote.warning  # not followed: a success with a warning
    assert remote.message.startswith("Probe terminated redirects, Response body: ")
    assert not local.warning
    looping = await run_probe(http(server.port, "/loop"), CONTAINER, HOST, None)
    assert not looping.success and looping.message.endswith("stopped after 10 redirects")


async def test_tcp() -> None:
    connections = 0

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    srv = await asyncio.start_server(accept, HOST, 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        ok = await run_probe({"tcpSocket": {"port": port}}, CONTAINER, HOST, None)
        assert ok == ProbeResult(True)
        container = {"name": "db", "ports": [{"name": "sql", "containerPort": port}]}
        assert (await run_probe({"tcpSocket": {"port": "sql"}}, container, HOST, None)).success
        await asyncio.sleep(0.05)
        assert connections == 2
    finally:
        srv.close()
        await srv.wait_closed()
    closed = closed_port()
    refused = await run_probe({"tcpSocket": {"port": closed}}, CONTAINER, HOST, None)
    assert refused == ProbeResult(False, f"dial tcp {HOST}:{closed}: connect: connection refused")


async def test_exec() -> None:
    assert await run_probe({"exec": {"command": ["true"]}}, CONTAINER, HOST, real_exec) == ProbeResult(True, "")
    assert await run_probe({"exec": {"command": ["false"]}}, CONTAINER, HOST, real_exec) == ProbeResult(False, "")
    out = await run_probe({"exec": {"command": ["sh", "-c", "echo not ok; exit 3"]}}, CONTAINER, HOST, real_exec)
    assert out == ProbeResult(False, "not ok\n")

    started = time.monotonic()
    slow = await run_probe({"exec": {"command": ["sleep", "5"]}, "timeoutSeconds": 0.3}, CONTAINER, HOST, real_exec)
    assert time.monotonic() - started < 2
    assert slow == ProbeResult(False, 'command "sleep 5" timed out')

    container = {
        "name": "app",
        "env": [{"name": "FILE", "value": "/"}, {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "s"}}}],
    }
    probe = {"exec": {"command": ["echo", "$(FILE)", "[$(SECRET)]", "$(NONE)", "$$(FILE)"]}}
    assert await run_probe(probe, container, HOST, real_exec) == ProbeResult(True, "/ [] $(NONE) $(FILE)\n")

    unsupported = await run_probe({"exec": {"command": ["true"]}}, CONTAINER, HOST, None)
    assert unsupported.error and not unsupported.success


async def test_grpc_and_missing_handler() -> None:
    from grpclib.health.v1.health_grpc import HealthBase
    from grpclib.health.v1.health_pb2 import HealthCheckResponse
    from grpclib.server import Server as GrpcServer

    class Health(HealthBase):
        async def Check(self, stream: Any) -> None:
            request = await stream.recv_message()
            serving = HealthCheckResponse.SERVING if request.service in ("", "up") else HealthCheckResponse.NOT_SERVING
            await stream.send_message(HealthCheckResponse(status=serving))

        async def Watch(self, stream: Any) -> None:
            raise NotImplementedError

    server = GrpcServer([Health()])
    await server.start(HOST, 0)
    port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        assert await run_probe({"grpc": {"port": port}}, CONTAINER, HOST, None) == ProbeResult(True, "service healthy")
        down = await run_probe({"grpc": {"port": port, "service": "down"}}, CONTAINER, HOST, None)
        assert down == ProbeResult(False, 'service unhealthy (responded with "NOT_SERVING")')
    finally:
        server.close()
        await server.wait_closed()
    closed = closed_port()
    refused = await run_probe({"grpc": {"port": closed}}, CONTAINER, HOST, None)
    assert not refused.success and not refused.error
    assert refused.message.startswith(f'timeout: failed to connect service "{HOST}:{closed}" within 1s')
    assert (await run_probe({}, CONTAINER, HOST, None)).error


# --- the worker -----------------------------------------------------------------------------------


class Changes(list[tuple[str, bool, str]]):
    def __call__(self, kind: str, ok: bool, message: str) -> None:
        self.append((kind, ok, message))


async def until(check: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.01)


async def running(worker: ProbeWorker, body: Callable[[], Awaitable[None]]) -> None:
    task = asyncio.create_task(worker.run())
    try:
        await body()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_readiness_flips_with_thresholds(server: Server) -> None:
    server.statuses = [500, 200, 200, 200, 500, 200, 500, 500]
    server.default = 500
    changes = Changes()
    probe = {**http(server.port), "periodSeconds": 0.03, "successThreshold": 2, "failureThreshold": 2}
    worker = ProbeWorker("readiness", probe, CONTAINER, HOST, None, changes)
    assert worker.result is False

    async def body() -> None:
        await until(lambda: len(changes) == 2)
        await asyncio.sleep(0.1)

    await running(worker, body)
    # Ready after two successes in a row; the single 500 in between does not count; then two 500s.
    assert changes == [
        ("readiness", True, ""),
        ("readiness", False, "Readiness probe failed: HTTP probe failed with statuscode: 500"),
    ]
    assert worker.result is False


async def test_readiness_connection_refused_message() -> None:
    port = closed_port()
    changes = Changes()
    probe = {"tcpSocket": {"port": port}, "periodSeconds": 0.02, "failureThreshold": 1}
    worker = ProbeWorker("readiness", probe, CONTAINER, HOST, None, changes)
    await running(worker, lambda: asyncio.sleep(0.15))
    assert changes == []  # readiness starts False: failures change nothing
    assert worker.last == ProbeResult(False, f"dial tcp {HOST}:{port}: connect: connection refused")


async def test_liveness_fails_after_threshold_then_holds(tmp_path: Path) -> None:
    healthy = tmp_path / "healthy"
    healthy.touch()
    calls = CountingExec()
    changes = Changes()
    probe = {
        "exec": {"command": ["sh", "-c", f"test -e {healthy} || {{ echo unhealthy; exit 1; }}"]},
        "periodSeconds": 0.03,
        "failureThreshold": 3,
    }
    worker = ProbeWorker("liveness", probe, CONTAINER, HOST, calls, changes)
    assert worker.result is True

    async def body() -> None:
        await until(lambda: len(calls.calls) >= 3)
        assert changes == []  # passing from the start: no change to report
        healthy.unlink()
        await until(lambda: bool(changes))
        held_at = len(calls.calls)
        await asyncio.sleep(0.2)
        assert len(calls.calls) == held_at  # no more probing of a container about to be restarted

    await running(worker, body)
    assert changes == [("liveness", False, "Liveness probe failed: unhealthy\n")]


async def test_liveness_tolerates_failures_below_threshold(server: Server) -> None:
    server.statuses = [500, 500, 200, 500, 500, 200, 500, 500, 200]
    changes = Changes()
    probe = {**http(server.port), "periodSeconds": 0.02, "failureThreshold": 3}
    worker = ProbeWorker("liveness", probe, CONTAINER, HOST, None, changes)

    async def body() -> None:
        await until(lambda: len(server.requests) >= 10)

    await running(worker, body)
    assert changes == [] and worker.result is True


async def test_liveness_http_failure_message(server: Server) -> None:
    server.default = 500
    changes = Changes()
    worker = ProbeWorker("liveness", {**http(server.port), "periodSeconds": 0.02}, CONTAINER, HOST, None, changes)
    await running(worker, lambda: until(lambda: bool(changes)))
    assert changes == [("liveness", False, "Liveness probe failed: HTTP probe failed with statuscode: 500")]
    assert len(server.requests) == 3  # default failureThreshold


async def test_startup_reports_both_ways() -> None:
    changes = Changes()
    calls = CountingExec()
    ok = ProbeWorker("startup", {"exec": {"command": ["true"]}, "periodSeconds": 0.02}, CONTAINER, HOST, calls, changes)
    assert ok.result is None

    async def body() -> None:
        await until(lambda: bool(changes))
        await asyncio.sleep(0.1)

    await running(ok, body)
    assert changes == [("startup", True, "")]
    assert len(calls.calls) == 1  # started: no more startup probing

    changes.clear()
    probe = {"exec": {"command": ["false"]}, "periodSeconds": 0.02, "failureThreshold": 2}
    failing = ProbeWorker("startup", probe, CONTAINER, HOST, real_exec, changes)
    await running(failing, lambda: until(lambda: bool(changes)))
    assert changes == [("startup", False, "Startup probe failed: ")]


async def test_initial_delay_and_period() -> None:
    calls = CountingExec()
    probe = {"exec": {"command": ["true"]}, "initialDelaySeconds": 0.3, "periodSeconds": 0.1}
    worker = ProbeWorker("readiness", probe, CONTAINER, HOST, calls, Changes())
    started = time.monotonic()
    await running(worker, lambda: until(lambda: len(calls.calls) >= 4))
    assert calls.calls[0] - started >= 0.3
    gaps = [b - a for a, b in zip(calls.calls, calls.calls[1:], strict=False)]
    assert all(0.05 < g < 0.3 for g in gaps), gaps


async def test_errors_are_discarded_and_timeouts_fail() -> None:
    changes = Changes()
    bad_port = {"httpGet": {"port": "missing"}, "periodSeconds": 0.02, "failureThreshold": 1}
    worker = ProbeWorker("liveness", bad_port, CONTAINER, HOST, None, changes)
    await running(worker, lambda: asyncio.sleep(0.1))
    assert changes == [] and worker.result is True and worker.last is not None and worker.last.error

    probe = {"exec": {"command": ["sleep", "5"]}, "timeoutSeconds": 0.2, "periodSeconds": 0.05, "failureThreshold": 1}
    worker = ProbeWorker("liveness", probe, CONTAINER, HOST, real_exec, changes)
    await running(worker, lambda: until(lambda: bool(changes)))
    assert changes == [("liveness", False, 'Liveness probe failed: command "sleep 5" timed out')]

    with pytest.raises(ValueError):
        ProbeWorker("sideways", probe, CONTAINER, HOST, real_exec, changes)
