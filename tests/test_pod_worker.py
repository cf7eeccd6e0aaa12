"""A Pod worker on its own: it sees the node only through PodHost, so a small fake will do."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any

from agent.config import AgentConfig, NodeSettings
from agent.pod_worker import PodHost, PodWorker, Unresolved

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
