"""A Pod worker on its own: it sees the node only through PodHost, so a small fake will do."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from agent.admission import NODE_AFFINITY, Rejection
from agent.config import AgentConfig, NodeSettings
from agent.pod_worker import PodHost, PodWorker, Unresolved
from runtimes.base import Backend, BackendContext
from runtimes.emulated.backend import EmulatedBackend
from runtimes.handler import Handler

JSON = dict[str, Any]


class FakeEvents:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def pod_event(self, pod: JSON, type_: str, reason: str, message: str, container: str | None = None) -> None:
        self.seen.append((type_, reason, message))


class FakeHost:
    host_ip = "10.0.0.1"
    kube: Any = None
    images: Any = None

    def __init__(self) -> None:
        self.config = AgentConfig(
            handlers={},
            default_runtime=None,
            missing_handler="fail",
            node=NodeSettings({}, ()),
            source=None,
            warnings=(),
        )
        self.events: Any = FakeEvents()
        self.statuses: list[JSON] = []
        self.written = asyncio.Event()
        self.admitted: list[PodWorker] = []
        self.released: list[PodWorker] = []
        self.node_rereads = 0
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        return task

    async def resolve(self, pod: JSON) -> Unresolved:
        return Unresolved("RuntimeClassNotFound", 'RuntimeClass "gpu" not found', "Failed to create pod sandbox: x")

    def admit(self, worker: PodWorker) -> None:
        self.admitted.append(worker)

    def unadmit(self, worker: PodWorker) -> None:
        pass

    async def reread_node(self) -> None:
        self.node_rereads += 1

    async def write_status(self, namespace: str, name: str, body: bytes) -> None:
        self.statuses.append(json.loads(body))
        self.written.set()

    def release(self, worker: PodWorker) -> None:
        self.released.append(worker)

    async def lookup(self, kind: str, namespace: str, name: str) -> JSON | None:
        return None


POD = {
    "metadata": {"name": "p", "namespace": "ns", "uid": "u-1"},
    "spec": {"runtimeClassName": "gpu", "containers": [{"name": "c", "image": "busybox"}]},
    "status": {"phase": "Pending"},
}


async def test_an_unresolved_pod_fails_through_the_host_alone() -> None:
    host = FakeHost()
    _: PodHost = host  # what the worker asks of its host, and no more
    worker = PodWorker(host, json.loads(json.dumps(POD)))
    worker.task = asyncio.create_task(worker.run())
    await asyncio.wait_for(host.written.wait(), 5)

    (patch,) = host.statuses
    assert patch["metadata"] == {"uid": "u-1"}
    assert patch["status"]["phase"] == "Failed" and patch["status"]["reason"] == "RuntimeClassNotFound"
    assert ("Warning", "FailedCreatePodSandBox", "Failed to create pod sandbox: x") in host.events.seen
    assert host.admitted == []  # never admitted: nothing to run it on

    worker.object_deleted()
    await asyncio.wait_for(worker.task, 5)
    assert host.released == [worker]


async def test_a_rejection_writes_the_failed_status_before_the_event() -> None:
    """Issue 17 item 12: whoever saw the Warning event must find the Pod Failed."""
    host = FakeHost()
    order: list[str] = []
    post = host.events.pod_event
    host.events.pod_event = lambda *a, **k: (order.append("event"), post(*a, **k))
    write = host.write_status

    async def write_status(namespace: str, name: str, body: bytes) -> None:
        order.append("status")
        await write(namespace, name, body)

    host.write_status = write_status  # type: ignore[method-assign]
    worker = PodWorker(host, json.loads(json.dumps(POD)))
    worker.task = asyncio.create_task(worker.run())
    await asyncio.wait_for(host.written.wait(), 5)
    await asyncio.sleep(0.05)
    assert order == ["status", "event"]
    worker.object_deleted()
    await asyncio.wait_for(worker.task, 5)


class NodeLabelsLagHost(FakeHost):
    """Admission refuses on the node's labels until the Node is read again from the API server."""

    async def resolve(self, pod: JSON) -> Any:
        return "h", object()

    def admit(self, worker: PodWorker) -> Any:
        if self.node_rereads == 0:
            return Rejection(NODE_AFFINITY, "stale labels")
        return Rejection("OutOfcpu", "fresh labels, no room")


async def test_a_node_affinity_refusal_is_decided_again_on_the_node_read_afresh() -> None:
    """Issue 17 item 1: the watch of the Node may lag behind a label the scheduler already saw."""
    host = NodeLabelsLagHost()
    worker = PodWorker(host, json.loads(json.dumps(POD)))
    worker.task = asyncio.create_task(worker.run())
    await asyncio.wait_for(host.written.wait(), 5)
    assert host.node_rereads == 1
    assert host.statuses[-1]["status"]["reason"] == "OutOfcpu"
    worker.object_deleted()
    await asyncio.wait_for(worker.task, 5)


# --- ephemeral containers (issue 20): the worker's part, on the emulated backend ------------------


class EmulatedHost(FakeHost):
    status_corrections = 0

    def __init__(self, backend: Any) -> None:
        super().__init__()
        self.backend = backend

    async def resolve(self, pod: JSON) -> Any:
        return "h", self.backend


class NoDebugBackend(EmulatedBackend):
    """A backend that never learnt ephemeral containers: the base class's answer."""

    create_ephemeral_container = Backend.create_ephemeral_container  # type: ignore[assignment]


def emulated_backend(cls: type[EmulatedBackend] = EmulatedBackend) -> EmulatedBackend:
    return cls(Handler("h", "emulated"), BackendContext(node_name="n", state_dir=Path("/nonexistent"),
                                                        pods_dir=Path("/nonexistent")))  # fmt: skip


async def _status_where(host: FakeHost, check: Any, timeout: float = 5) -> JSON:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        for patch in reversed(host.statuses):
            if check(patch["status"]):
                return patch["status"]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no status written matches; last: {host.statuses[-1:]}")


def _debugged(host: FakeHost, pod: JSON, **extra: Any) -> JSON:
    """The Pod as the watch brings it once an ephemeral container was added: our last status echoed."""
    pod = json.loads(json.dumps(pod))
    pod["status"] = host.statuses[-1]["status"]
    pod["spec"]["ephemeralContainers"] = [{"name": "dbg", "image": "busybox", "targetContainerName": "c", **extra}]
    return pod


def _ephemeral(status: JSON) -> JSON | None:
    return next(iter(status.get("ephemeralContainerStatuses") or []), None)


async def test_an_ephemeral_container_runs_once_and_is_never_restarted() -> None:
    pod = json.loads(json.dumps(POD))
    pod["metadata"]["annotations"] = {
        "emulated.kubelet-emu.io/exit-after.dbg": "100ms",
        "emulated.kubelet-emu.io/exit-code.dbg": "2",
    }
    host = EmulatedHost(emulated_backend())
    worker = PodWorker(host, pod)
    worker.task = asyncio.create_task(worker.run())
    await _status_where(host, lambda s: s.get("phase") == "Running")

    worker.update(_debugged(host, pod))  # what the ephemeralcontainers subresource does to the spec
    running = await _status_where(host, lambda s: "running" in (_ephemeral(s) or {}).get("state", {}))
    assert _ephemeral(running)["ready"] is False and "started" not in _ephemeral(running)
    done = await _status_where(host, lambda s: "terminated" in (_ephemeral(s) or {}).get("state", {}))
    assert _ephemeral(done)["state"]["terminated"]["exitCode"] == 2 and _ephemeral(done)["restartCount"] == 0
    assert done["phase"] == "Running" and done["containerStatuses"][0]["ready"] is True  # the Pod is not touched

    writes = len(host.statuses)
    worker.update(_debugged(host, pod))  # more updates of the same spec: nothing starts again
    await asyncio.sleep(0.3)
    assert [s for s in host.statuses[writes:] if "running" in (_ephemeral(s["status"]) or {}).get("state", {})] == []
    assert [r for t, r, m in host.events.seen if r == "Started" and "dbg" in m] == ["Started"]
    worker.object_deleted()
    await asyncio.wait_for(worker.task, 5)


async def test_a_backend_that_cannot_run_ephemeral_containers_says_so() -> None:
    host = EmulatedHost(emulated_backend(NoDebugBackend))
    worker = PodWorker(host, json.loads(json.dumps(POD)))
    worker.task = asyncio.create_task(worker.run())
    await _status_where(host, lambda s: s.get("phase") == "Running")
    worker.update(_debugged(host, POD))
    status = await _status_where(
        host, lambda s: ((_ephemeral(s) or {}).get("state", {}).get("waiting") or {}).get("message")
    )
    waiting = _ephemeral(status)["state"]["waiting"]
    assert waiting["reason"] == "CreateContainerError"
    assert waiting["message"] == "the emulated backend of handler 'h' cannot run ephemeral containers"
    worker.object_deleted()
    await asyncio.wait_for(worker.task, 5)


async def test_an_ephemeral_container_whose_target_is_not_running_waits_with_the_reason() -> None:
    host = EmulatedHost(emulated_backend())
    worker = PodWorker(host, json.loads(json.dumps(POD)))
    worker.task = asyncio.create_task(worker.run())
    await _status_where(host, lambda s: s.get("phase") == "Running")
    worker.update(_debugged(host, POD, targetContainerName="gone"))
    status = await _status_where(
        host, lambda s: ((_ephemeral(s) or {}).get("state", {}).get("waiting") or {}).get("message")
    )
    assert _ephemeral(status)["state"]["waiting"] == {
        "reason": "CreateContainerError", "message": "target container 'gone' is not running",
    }  # fmt: skip
    worker.object_deleted()
    await asyncio.wait_for(worker.task, 5)
