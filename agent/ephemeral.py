"""Ephemeral containers (`kubectl debug`), as the kubelet runs them.

The ephemeralcontainers subresource appends to spec.ephemeralContainers of a running Pod; the
watch brings the new spec to the Pod's worker, which reports each new one waiting and starts it
once the Pod's sandbox runs (before init containers, as the kubelet does, so a Pod stuck in its
init containers can be debugged). The backend places it in its target container's namespaces
(targetContainerName) as far as it can (Backend.create_ephemeral_container). An ephemeral
container is never restarted, not even after an agent restart, never ready, and stops with the
Pod. Its status goes to status.ephemeralContainerStatuses (agent/pod_status.py).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from agent.image_pull import ImageGate
from agent.pod_status import ContainerRecord
from runtimes.base import BackendError, ContainerHandle, CreateContainerError, NotSupportedError

PodWorker = Any  # agent.pod_worker.PodWorker (not imported: it imports this module)
JSON = dict[str, Any]
# Container name -> the task running it (None: it ran before an agent restart and is over).
Tasks = dict[str, "asyncio.Task[None] | None"]

BACKOFF_INITIAL = 10.0  # a failed creation is tried again after this, doubling...
BACKOFF_MAX = 300.0  # ...up to this (the kubelet's container back-off)
CLOSED: Tasks = {}  # a worker's tasks once no ephemeral container may start (never written to)


def _now() -> datetime:
    return datetime.now(UTC)


def _parse_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def added(worker: PodWorker) -> None:
    """spec.ephemeralContainers may have grown: the new ones are reported waiting, and started
    when the Pod's sandbox runs."""
    if worker.rec.add_ephemeral(worker.pod["spec"]):
        worker.mark_dirty()
    start_pending(worker)


def start_pending(worker: PodWorker) -> None:
    """Start each ephemeral container not started yet: only in a running sandbox, after what ran
    before an agent restart was adopted, never in a Pod that is over or going away."""
    if worker.ephemeral_tasks is CLOSED or not worker.rec.ephemeral:
        return
    if worker.backend is None or worker.sandbox is None or not worker.adopted.done():
        return
    if worker.deletion_requested.done() or worker.rec.terminal or worker.pod["metadata"].get("deletionTimestamp"):
        return
    specs = {c["name"]: c for c in worker.pod["spec"].get("ephemeralContainers") or ()}
    for rec in worker.rec.ephemeral:
        if worker.ephemeral_tasks is None:
            worker.ephemeral_tasks = {}
        if rec.name in worker.ephemeral_tasks or rec.name not in specs:
            continue
        worker.ephemeral_tasks[rec.name] = asyncio.create_task(
            _run(worker, specs[rec.name], rec), name=f"ephemeral:{worker.key}:{rec.name}"
        )


async def adopt(worker: PodWorker, on_disk: dict[str, int]) -> None:
    """After an agent restart. One the API status or the backend's records know of is taken over
    if it runs, shown terminated if it is over; only the others are started (start_pending)."""
    backend, sandbox = worker.backend, worker.sandbox
    assert backend is not None and sandbox is not None
    if worker.ephemeral_tasks is CLOSED:
        return
    specs = {c["name"]: c for c in worker.pod["spec"].get("ephemeralContainers") or ()}
    statuses = {s.get("name"): s for s in (worker.pod.get("status") or {}).get("ephemeralContainerStatuses") or ()}
    for name, spec in specs.items():
        status = statuses.get(name) or {}
        state = status.get("state") or {}
        ours = str(status.get("containerID", "")).startswith(f"{backend.name}://")
        if not (ours and ("running" in state or "terminated" in state)) and name not in on_disk:
            continue  # never started
        if worker.ephemeral_tasks is None:
            worker.ephemeral_tasks = {}
        worker.ephemeral_tasks[name] = None
        rec = worker.rec.container(name)
        handle = await backend.adopt_container(sandbox, worker.pod, spec, {**status, "restartCount": 0})
        if handle is not None:  # running, or exited while the agent was away: _run records how
            worker.ephemeral_tasks[name] = asyncio.create_task(
                _run(worker, spec, rec, handle), name=f"ephemeral:{worker.key}:{name}"
            )
            continue
        done = state.get("terminated")
        if done:
            rec.terminated(done.get("exitCode", 0), _parse_time(done.get("finishedAt")) or _now(),
                           done.get("reason"), done.get("message"), done.get("signal"))  # fmt: skip
            rec.started_at = _parse_time(done.get("startedAt"))
            rec.container_id = done.get("containerID") or status.get("containerID", "")
        else:  # it ran, and nothing is left to read its end from
            rec.terminated(
                137, _now(), "ContainerStatusUnknown", "the container could not be located after an agent restart"
            )
        worker.mark_dirty()


async def _run(worker: PodWorker, spec: JSON, rec: ContainerRecord, handle: ContainerHandle | None = None) -> None:
    """One ephemeral container from its image to its exit. Until it starts, a failure is shown as
    its waiting reason and tried again with back-off (the kubelet retries until the runtime has the
    container); a backend that cannot run one says so in the waiting message, once."""
    backend, name, events = worker.backend, spec["name"], worker.host.events
    assert backend is not None
    backoff = BACKOFF_INITIAL
    while handle is None:
        sandbox = worker.sandbox
        if sandbox is None:
            return
        made = None
        try:
            if backend.uses_images and worker.host.images is not None:
                if worker.gates is None:
                    worker.gates = {}
                gate = worker.gates.setdefault(name, ImageGate())
                rec.image_id = (await gate.ensure(worker.host, worker, spec, rec)).image_id
            target_name = spec.get("targetContainerName")
            target = worker.handles.get(target_name) if target_name else None
            if target_name and target is None:
                raise CreateContainerError(f"target container {target_name!r} is not running")
            made = await backend.create_ephemeral_container(sandbox, worker.pod, spec, target)
            events.pod_event(worker.pod, "Normal", "Created", f"Created container {name}", name)
            await backend.start_container(made)
            handle = made
        except NotSupportedError as exc:
            rec.waiting(CreateContainerError.reason, str(exc))
            events.pod_event(worker.pod, "Warning", "Failed", f"Error: {exc}", name)
            worker.mark_dirty()
            return
        except BackendError as exc:
            if made is not None:
                await backend.remove_container(made)
            rec.waiting(exc.reason, str(exc))
            events.pod_event(worker.pod, "Warning", "Failed", f"Error: {exc}", name)
            worker.mark_dirty()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            continue
        events.pod_event(worker.pod, "Normal", "Started", f"Started container {name}", name)
    worker.handles[name] = handle
    if rec.state != "running":
        rec.running(backend.container_id(handle), handle.started_at or _now(), handle.image_id or rec.image_id)
        worker.mark_dirty()
    exit_ = await backend.wait_container(handle)
    if worker.handles.get(name) is handle:
        del worker.handles[name]
    rec.terminated(exit_.exit_code, exit_.finished_at, exit_.reason, exit_.message, exit_.signal)
    await backend.remove_container(handle)
    worker.mark_dirty()


async def stop(worker: PodWorker, grace: float) -> None:
    """The Pod is over or going away: no ephemeral container starts any more; the running ones are
    stopped and their exits recorded (by their own tasks)."""
    tasks = {n: t for n, t in (worker.ephemeral_tasks or {}).items() if t is not None and not t.done()}
    worker.ephemeral_tasks = CLOSED
    running = [(n, h) for n, h in list(worker.handles.items()) if n in tasks]
    for name in tasks.keys() - {n for n, _ in running}:
        tasks.pop(name).cancel()  # not started yet (pulling, backing off): nothing to stop
    if running:
        await asyncio.gather(*(worker._kill(n, h, grace) for n, h in running))
    if tasks:
        await asyncio.wait(tasks.values(), timeout=grace + 5)
        for task in tasks.values():
            task.cancel()
