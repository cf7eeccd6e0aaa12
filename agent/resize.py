"""In-place Pod resize, the kubelet's allocation manager and status in small (pkg/kubelet/allocation).

A resize is a change of spec.containers[*].resources through the `resize` subresource. The agent
admits it against allocatable with admission's accounting (overhead included): `Infeasible` when
the Pod alone exceeds allocatable, `Deferred` when it does not fit beside the others (retried),
then records it as allocated (a checkpoint file per Pod in <state>/resize, so an agent restart
neither loses nor repeats it) and has the backend apply it (actuated). Restarting containers
whose resizePolicy says RestartContainer for a changed resource. Status: allocatedResources,
resources, PodResizePending / PodResizeInProgress and observedGeneration.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.node_status import rfc3339
from cgroups.quantity import cpu_millis, parse_quantity
from cgroups.resources import pod_requests
from runtimes.base import BackendError

PodWorker = Any  # agent.pod_worker.PodWorker (not imported: it imports this module)

log = logging.getLogger(__name__)
JSON = dict[str, Any]

PENDING = "PodResizePending"
IN_PROGRESS = "PodResizeInProgress"
CONDITIONS = (PENDING, IN_PROGRESS)
RESIZE_RESOURCES = ("cpu", "memory")
RETRY = 1.0  # seconds between attempts while deferred or failing


def resources_of(pod: JSON) -> dict[str, JSON]:
    """Each app container's cpu/memory requests and limits, as given in the spec."""
    out: dict[str, JSON] = {}
    for c in pod["spec"].get("containers") or []:
        res = c.get("resources") or {}
        out[c["name"]] = {
            kind: {n: str(q) for n, q in (res.get(kind) or {}).items() if n in RESIZE_RESOURCES}
            for kind in ("requests", "limits")
        }
    return out


def _equal(a: dict[str, JSON], b: dict[str, JSON]) -> bool:
    def norm(r: dict[str, JSON]) -> Any:
        return {
            name: {
                kind: {n: cpu_millis(q) if n == "cpu" else parse_quantity(q) for n, q in (v.get(kind) or {}).items()}
                for kind in ("requests", "limits")
            }
            for name, v in r.items()
        }

    return norm(a) == norm(b)


def with_resources(pod: JSON, resources: dict[str, JSON]) -> JSON:
    """A copy of `pod` whose containers carry `resources` (cpu/memory), the rest as in the spec."""
    out = {"metadata": pod["metadata"], "spec": copy.deepcopy(pod["spec"]), "status": pod.get("status") or {}}
    for c in out["spec"].get("containers") or []:
        wanted = resources.get(c["name"])
        if wanted is None:
            continue
        res = c.setdefault("resources", {})
        for kind in ("requests", "limits"):
            other = {n: q for n, q in (res.get(kind) or {}).items() if n not in RESIZE_RESOURCES}
            merged = {**other, **wanted.get(kind, {})}
            if merged:
                res[kind] = merged
            else:
                res.pop(kind, None)
    return out


def _restart_needed(container: JSON, old: JSON, new: JSON) -> bool:
    policies = {p.get("resourceName"): p.get("restartPolicy") for p in container.get("resizePolicy") or []}
    for resource in RESIZE_RESOURCES:
        if policies.get(resource) != "RestartContainer":
            continue
        if any((old.get(k) or {}).get(resource) != (new.get(k) or {}).get(resource) for k in ("requests", "limits")):
            return True
    return False


def infeasible(pod: JSON, allocatable: dict[str, str]) -> str | None:
    """canResizePod's first check: the Pod alone against allocatable (memory reported first)."""
    requests = pod_requests(pod)
    cpu_available = cpu_millis(allocatable.get("cpu", "0"))
    mem_available = int(parse_quantity(allocatable.get("memory", "0")))
    cpu, mem = requests.get("cpu", 0), requests.get("memory", 0)
    if mem > mem_available:
        return f"Node didn't have enough capacity: memory, requested: {mem}, capacity: {mem_available}"
    if cpu > cpu_available:
        return f"Node didn't have enough capacity: cpu, requested: {cpu}, capacity: {cpu_available}"
    return None


class Resizer:
    """One per Pod that has been resized (made lazily: most Pods never are)."""

    def __init__(self, worker: PodWorker, state_dir: Path | None, baseline: dict[str, JSON]):
        self.worker = worker
        self.path = state_dir / "resize" / f"{worker.uid}.json" if state_dir else None
        saved = self._load()
        self.allocated: dict[str, JSON] = saved.get("allocated") or baseline
        self.actuated: dict[str, JSON] = saved.get("actuated") or self.allocated
        self.generation: int | None = saved.get("generation")
        self.pending: tuple[str, str] | None = None
        self.error: tuple[str, str] | None = None
        self.since: dict[str, datetime] = {}
        self.task: asyncio.Task[None] | None = None
        self.kick = asyncio.Event()
        self.timings: list[float] = []

    # --- checkpoint

    def _load(self) -> JSON:
        if self.path is None:
            return {}
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"allocated": self.allocated, "actuated": self.actuated, "generation": self.generation})
        )
        os.replace(tmp, self.path)

    def forget(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()

    # --- the loop

    def poke(self) -> None:
        self.kick.set()
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run(), name=f"resize:{self.worker.key}")

    async def _run(self) -> None:
        while True:
            self.kick.clear()
            try:
                again = await self.step()
            except Exception:
                log.exception("resize step failed", extra={"pod": self.worker.key})
                again = True
            self.worker.mark_dirty()
            if not again:
                await self.kick.wait()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.kick.wait(), RETRY)

    async def step(self) -> bool:
        """One pass: allocate what fits, apply what is allocated. True while something waits."""
        worker = self.worker
        pod = worker.pod
        desired = resources_of(pod)
        waiting = False
        if not _equal(desired, self.allocated):
            decision = worker.host.resize_fits(worker, with_resources(pod, desired))
            if decision is None:
                self.allocated = desired
                self.pending = None
                self.error = None
                self._save()
                self._event("Normal", "ResizeStarted", "Pod resize started")
                # PodResizeInProgress goes out now, while the backend applies it (as the kubelet's).
                worker.mark_dirty()
            else:
                self.pending = decision
                waiting = decision[0] == "Deferred"
        else:
            self.pending = None
        self.generation = (pod.get("metadata") or {}).get("generation", self.generation)
        if not _equal(self.allocated, self.actuated):
            waiting |= not await self._actuate()
        return waiting

    async def _actuate(self) -> bool:
        worker = self.worker
        backend, sandbox = worker.backend, worker.sandbox
        if backend is None or sandbox is None:
            return False
        before = with_resources(worker.pod, self.actuated)
        after = with_resources(worker.pod, self.allocated)
        specs = {c["name"]: c for c in worker.pod["spec"].get("containers") or []}
        restart = [
            n
            for n in self.allocated
            if n in specs and _restart_needed(specs[n], self.actuated.get(n) or {}, self.allocated[n])
        ]
        in_place = {n: h for n, h in worker.handles.items() if n in self.allocated and n not in restart}
        try:
            await backend.resize(sandbox, before, after, in_place)
        except BackendError as exc:
            if self.error is None:  # once per attempt, not per retry (the usage in it changes)
                self._event("Warning", "ResizeError", "Pod resize error", str(exc))
            self.error = ("Error", str(exc))
            return False
        # Recorded before the restarts: the new containers start with the allocated values,
        # so an agent restart in between must not restart them again.
        self.actuated = self.allocated
        self.error = None
        self._save()
        self._event("Normal", "ResizeCompleted", "Pod resize completed")
        for name in restart:
            handle = worker.handles.get(name)
            if handle is not None:
                await backend.stop_container(handle, 0)
        return True

    def _event(self, kind: str, reason: str, what: str, error: str | None = None) -> None:
        """The kubelet's resize Events: what was allocated, as JSON after `what`."""
        containers = [{"name": n, "resources": {k: v for k, v in r.items() if v}} for n, r in self.allocated.items()]
        details: JSON = {"containers": containers, "generation": self.worker.pod["metadata"].get("generation")}
        if error:
            details["error"] = error
        events = getattr(self.worker.host, "events", None)
        if events is not None:
            events.pod_event(self.worker.pod, kind, reason, f"{what}: {json.dumps(details, separators=(',', ':'))}")

    def container_spec(self, spec: JSON) -> JSON:
        """`spec` with the allocated cpu/memory, for a container about to be (re)created."""
        if spec.get("name") not in self.allocated:
            return spec
        pod = {"metadata": {}, "spec": {"containers": [spec]}}
        return with_resources(pod, self.allocated)["spec"]["containers"][0]

    # --- status

    def _condition(self, ctype: str, reason: str | None, message: str | None, now: datetime) -> JSON:
        since = self.since.setdefault(ctype, now)
        out: JSON = {"type": ctype, "status": "True", "lastProbeTime": None, "lastTransitionTime": rfc3339(since)}
        if reason:
            out["reason"] = reason
        if message:
            out["message"] = message
        return out

    def decorate(self, status: JSON, now: datetime) -> JSON:
        """allocatedResources, resources, the two conditions and observedGeneration on `status`."""
        for cs in status.get("containerStatuses") or []:
            name = cs.get("name")
            if name in self.allocated:
                cs["allocatedResources"] = dict(self.allocated[name].get("requests") or {})
                if "running" in (cs.get("state") or {}):
                    cs["resources"] = {k: dict(v) for k, v in self.actuated[name].items() if v}
        conditions = [c for c in status.get("conditions") or [] if c.get("type") not in CONDITIONS]
        if self.pending:
            conditions.append(self._condition(PENDING, *self.pending, now))
        else:
            self.since.pop(PENDING, None)
        if not _equal(self.allocated, self.actuated):
            reason, message = self.error or (None, None)
            conditions.append(self._condition(IN_PROGRESS, reason, message, now))
        else:
            self.since.pop(IN_PROGRESS, None)
        status["conditions"] = conditions
        if self.generation is not None:
            status["observedGeneration"] = self.generation
        return status


# --- hooks for the pod worker --------------------------------------------------------------------


def _state_dir(worker: PodWorker) -> Path | None:
    state = getattr(worker.host, "state_dir", None)
    return Path(state) if state else None


def resize_after_restart(worker: PodWorker) -> Resizer | None:
    """A Resizer for a Pod with a checkpoint: a resize was in flight or done before a restart."""
    state = _state_dir(worker)
    if state is None or not (state / "resize" / f"{worker.uid}.json").exists():
        return None
    resizer = Resizer(worker, state, resources_of(worker.pod))
    resizer.poke()
    return resizer


def resize_on_update(worker: PodWorker, previous: JSON, resizer: Resizer | None) -> Resizer | None:
    """Called with each new version of the Pod: a resize bumps metadata.generation."""
    if resizer is None:
        if previous["metadata"].get("generation") == worker.pod["metadata"].get("generation"):
            return None
        old = resources_of(previous)
        if _equal(old, resources_of(worker.pod)):
            return None
        resizer = Resizer(worker, _state_dir(worker), old)
    if not worker.pod["metadata"].get("deletionTimestamp"):
        resizer.poke()
    return resizer


def decorate_unresized(status: JSON, pod: JSON) -> JSON:
    """allocatedResources and resources (= the spec's) for a Pod never resized: the API server
    refuses a resize of a running Pod whose statuses lack `resources` (a node without support)."""
    specs = resources_of(pod)
    for cs in status.get("containerStatuses") or []:
        res = specs.get(cs.get("name"))
        if res is None:
            continue
        cs["allocatedResources"] = dict(res.get("requests") or {})
        if "running" in (cs.get("state") or {}):
            cs["resources"] = {k: dict(v) for k, v in res.items() if v}
    return status
