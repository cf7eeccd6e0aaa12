"""Issue 17 (items 2, 3, 11): gRPC probes, lifecycle hooks and probe redirects, the kubelet's way.

Through the real agent, the real control plane and kubectl, on the process backend.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import Kubectl, condition, delete_node_pods, eventually, free_port, ready_node
from helpers import needs_root, process_config, unique

pytestmark = [pytest.mark.cluster, needs_root]

CGROUP_ROOT = f"kubelet-emu-test-{uuid.uuid4().hex[:6]}"
CONFIG = process_config(CGROUP_ROOT)

# A gRPC server with the standard health service: SERVING for the service "" when started with
# "serving", NOT_SERVING otherwise. Run by the container with this venv's python.
GRPC_SERVER = """
import asyncio, sys
from grpclib.health.v1.health_grpc import HealthBase
from grpclib.health.v1.health_pb2 import HealthCheckResponse
from grpclib.server import Server

class Health(HealthBase):
    async def Check(self, stream):
        request = await stream.recv_message()
        ok = sys.argv[2] == "serving" and request.service == ""
        await stream.send_message(HealthCheckResponse(
            status=HealthCheckResponse.SERVING if ok else HealthCheckResponse.NOT_SERVING))

    async def Watch(self, stream):
        raise NotImplementedError

async def main():
    server = Server([Health()])
    await server.start("0.0.0.0", int(sys.argv[1]))
    await server.wait_closed()

asyncio.run(main())
"""


@pytest.fixture
async def node(kubectl, start_agent, tmp_path):
    name = unique("emu-17b")
    await ready_node(kubectl, start_agent, name, CONFIG, tmp_path / "state")
    yield name
    await delete_node_pods(kubectl, name)


def pod_yaml(name: str, node: str, command: str, container_extra: str = "", grace: int = 5) -> str:
    return f"""
apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: {grace}
  securityContext: {{runAsUser: 0}}
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", {command!r}]
{container_extra}
"""


async def events_of(kubectl: Kubectl, name: str) -> list[dict[str, Any]]:
    return (await kubectl.json("get", "events", "--field-selector", f"involvedObject.name={name}"))["items"]


async def ready(kubectl: Kubectl, name: str) -> dict[str, Any] | None:
    obj = await kubectl.get("pod", name)
    c = condition(obj, "Ready") if obj else None
    return obj if c and c["status"] == "True" else None


def main_status(obj: dict[str, Any]) -> dict[str, Any]:
    return (obj["status"].get("containerStatuses") or [{}])[0]


class HookServer:
    """An HTTP server on the host that records what lifecycle hooks and probes ask of it."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, float]] = []
        self.port = free_port()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.path, request.headers.get("User-Agent", ""), time.time()))
        if request.path == "/moved":
            return web.Response(status=302, headers={"Location": "http://192.0.2.1/elsewhere"}, text="gone away")
        return web.Response(text="ok")

    def paths(self) -> list[str]:
        return [p for p, _, _ in self.requests]


@pytest.fixture
async def hook_server():
    server = HookServer()
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", server.port).start()
    yield server
    await runner.cleanup()


# --- item 2: gRPC probes -------------------------------------------------------------------------


async def test_grpc_probes_use_the_health_protocol(kubectl, node):
    script = Path(f"/tmp/kubelet-emu-grpc-health-{uuid.uuid4().hex[:8]}.py")
    script.write_text(GRPC_SERVER)
    script.chmod(0o644)
    try:
        good, bad = unique("grpc-ok"), unique("grpc-down")
        good_port, bad_port = free_port(), free_port()
        probes = (
            "    livenessProbe: {{grpc: {{port: {p}}}, initialDelaySeconds: 3, periodSeconds: 1}}\n"
            "    readinessProbe: {{grpc: {{port: {p}}}, periodSeconds: 1}}"
        )
        await kubectl.apply(
            pod_yaml(good, node, f"exec {sys.executable} {script} {good_port} serving", probes.format(p=good_port))
        )
        readiness_only = probes.split("\n")[1].format(p=bad_port)
        await kubectl.apply(pod_yaml(bad, node, f"exec {sys.executable} {script} {bad_port} down", readiness_only))
        await eventually(lambda: ready(kubectl, good), 30, what="Ready from a SERVING gRPC health check")
        await asyncio.sleep(5)  # liveness probed every second: a healthy server is never restarted
        obj = await kubectl.get("pod", good)
        assert condition(obj, "Ready")["status"] == "True"
        assert main_status(obj).get("restartCount") == 0
        assert "Killing" not in {e["reason"] for e in await events_of(kubectl, good)}

        obj = await kubectl.get("pod", bad)
        assert obj["status"]["phase"] == "Running"
        assert condition(obj, "Ready")["status"] == "False"

        async def unhealthy() -> list[str] | None:
            messages = [e["message"] for e in await events_of(kubectl, bad) if e["reason"] == "Unhealthy"]
            return messages or None

        messages = await eventually(unhealthy, 20, what="an Unhealthy event for NOT_SERVING")
        assert 'Readiness probe failed: service unhealthy (responded with "NOT_SERVING")' in messages
    finally:
        script.unlink()


# --- item 3: lifecycle hooks -----------------------------------------------------------------------


async def test_lifecycle_hooks_post_start_pre_stop_and_sleep(kubectl, node, hook_server):
    marker = Path(f"/tmp/kubelet-emu-poststart-{uuid.uuid4().hex[:8]}")
    term = Path(f"/tmp/kubelet-emu-term-{uuid.uuid4().hex[:8]}")
    try:
        # postStart exec: the container is not Running until the hook returned.
        hooked = unique("hooks-exec")
        hooks = f"""    lifecycle:
      postStart: {{exec: {{command: [sh, -c, "touch {marker}; sleep 3"]}}}}
      preStop: {{httpGet: {{host: 127.0.0.1, port: {hook_server.port}, path: /pre-stop}}}}"""
        await kubectl.apply(pod_yaml(hooked, node, "exec sleep 3600", hooks))
        await eventually(lambda: exists(marker), 20, what="the postStart hook running")
        obj = await kubectl.get("pod", hooked)
        assert "running" not in main_status(obj).get("state", {}), "Running while postStart still runs"
        obj = await eventually(lambda: _running(kubectl, hooked), 20, what="Running once the postStart hook returned")
        started_at = obj["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
        assert started_at

        # preStop httpGet is sent on deletion, with the kubelet's user agent.
        await kubectl.run("delete", "pod", hooked, "--wait=true", "--timeout=60s")
        assert ("/pre-stop", "kube-lifecycle/1.36") in [(p, ua) for p, ua, _ in hook_server.requests]

        # postStart httpGet and a preStop sleep: SIGTERM comes only after the sleep.
        sleeper = unique("hooks-sleep")
        hooks = f"""    lifecycle:
      postStart: {{httpGet: {{host: 127.0.0.1, port: {hook_server.port}, path: /post-start}}}}
      preStop: {{sleep: {{seconds: 3}}}}"""
        command = f"trap 'date +%s.%N > {term}; exit 0' TERM; while true; do sleep 0.1; done"
        await kubectl.apply(pod_yaml(sleeper, node, command, hooks, grace=20))
        await eventually(lambda: _running(kubectl, sleeper), 20, what="Running after the postStart httpGet")
        assert "/post-start" in hook_server.paths()
        deleted_at = time.time()
        await kubectl.run("delete", "pod", sleeper, "--wait=false")
        # Written by the trap: the file exists a moment before its line does.
        await eventually(lambda: written(term), 30, what="SIGTERM after the preStop sleep")
        assert float(term.read_text()) - deleted_at >= 2.5, "SIGTERM came before the preStop sleep ended"

        # A failing postStart: FailedPostStartHook, the container killed and restarted per policy.
        failing = unique("hooks-fail")
        hooks = """    lifecycle:
      postStart: {exec: {command: [sh, -c, "echo nope; exit 3"]}}"""
        await kubectl.apply(pod_yaml(failing, node, "exec sleep 3600", hooks, grace=1))

        async def restarted() -> dict[str, Any] | None:
            obj = await kubectl.get("pod", failing)
            return obj if obj and main_status(obj).get("restartCount", 0) >= 1 else None

        obj = await eventually(restarted, 40, what="a restart after the failed postStart hook")
        status = main_status(obj)
        assert "running" not in status.get("state", {})
        assert status["lastState"]["terminated"]["exitCode"] != 0
        events = await events_of(kubectl, failing)
        failed = [e for e in events if e["reason"] == "FailedPostStartHook"]
        assert failed and failed[0]["message"] == "PostStartHook failed" and failed[0]["type"] == "Warning"
        assert any(e["reason"] == "Killing" and e["message"] == "FailedPostStartHook" for e in events)
        waiting = status.get("state", {}).get("waiting", {})
        assert waiting.get("reason") in ("PostStartHookError", "CrashLoopBackOff"), waiting
    finally:
        marker.unlink(missing_ok=True)
        term.unlink(missing_ok=True)


async def exists(path: Path) -> bool:
    return path.exists()


async def written(path: Path) -> bool:
    return path.exists() and path.read_text().strip() != ""


async def _running(kubectl: Kubectl, name: str) -> dict[str, Any] | None:
    obj = await kubectl.get("pod", name)
    return obj if obj and "running" in main_status(obj).get("state", {}) else None


# --- item 11: probe redirects ----------------------------------------------------------------------


async def test_probe_redirect_to_another_host_is_a_success_with_a_warning(kubectl, node, hook_server):
    name = unique("redirect")
    action = f"httpGet: {{host: 127.0.0.1, port: {hook_server.port}, path: /moved}}"
    probe = f"    readinessProbe: {{{action}, periodSeconds: 1}}"
    await kubectl.apply(pod_yaml(name, node, "exec sleep 3600", probe))
    await eventually(lambda: ready(kubectl, name), 20, what="Ready despite the redirect")

    async def warned() -> list[dict[str, Any]] | None:
        found = [e for e in await events_of(kubectl, name) if e["reason"] == "ProbeWarning"]
        return found or None

    found = await eventually(warned, 20, what="a ProbeWarning event")
    assert found[0]["type"] == "Warning"
    assert found[0]["message"] == "Readiness probe warning: Probe terminated redirects, Response body: gone away"
