"""One Pod's life on this node: resolve, admit, start, restart, stop, delete.

Each Pod has its own worker task, so one Pod's slow start never holds up
another, and the updates for one Pod are applied in order. Status changes
are coalesced: the worker marks the Pod dirty and a single in-flight writer
patches the newest status; nothing is written when nothing changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from agent import ephemeral, metrics
from agent.admission import NODE_AFFINITY, Rejection
from agent.config import AgentConfig
from agent.hooks import Exec as HookExec
from agent.hooks import run_hook
from agent.image_pull import ImageGate, PullSite
from agent.interning import shared
from agent.kube import ApiError, Kube
from agent.pod_status import (
    OWNED_CONDITIONS,
    ContainerRecord,
    PodRecord,
    build_status,
    gate_conditions,
    rejected_status,
    status_patch,
)
from agent.probes import ProbeWorker
from agent.resize import Resizer, decorate_unresized, resize_after_restart, resize_on_update
from agent.status_reconcile import corrections, pod_status_drifted, pod_status_summary, remember_write
from cgroups.resources import qos_class
from common.logfmt import kv
from runtimes.base import Backend, BackendError, ContainerHandle, Sandbox, SandboxRecord

log = logging.getLogger(__name__)

JSON = dict[str, Any]

BACKOFF_INITIAL = 10.0
BACKOFF_MAX = 300.0
BACKOFF_RESET_AFTER = 600.0  # a container that ran this long starts its back-off afresh
RETRY_MISSING_HANDLER = 10.0
DEFAULT_GRACE = 30
MIN_GRACE_AFTER_PRE_STOP = 2.0  # the kubelet's minimumGracePeriodInSeconds, left after a preStop hook
PASSING_STATUS_SETTLE = 1.0  # seconds a "sandbox ready, containers creating" status waits for the next
STATUS_CORRECTION_SETTLE = 0.5  # seconds before a status changed by someone else is written again
STATUS_CORRECTION_WINDOW = 10.0  # ...or this long when it was corrected within the last this long
# pkg/kubelet/active_deadline.go
DEADLINE_REASON = "DeadlineExceeded"
DEADLINE_MESSAGE = "Pod was active on the node longer than the specified deadline"


@dataclass(frozen=True)
class Unresolved:
    reason: str  # RuntimeClassNotFound | RuntimeHandlerNotFound
    message: str  # for the Pod status
    event: str  # for the Warning Event, in the kubelet's wording


def now() -> datetime:
    return datetime.now(UTC)


class PodHost(PullSite, Protocol):
    """What a Pod worker needs from the node around it, and all it sees of it: the API client,
    the event recorder, the image service and Secret lookup (PullSite), resolution to a backend,
    admission, a status sink and a place for its tasks. The Pod controller (agent/pods.py) is one;
    a test can pass a small fake."""

    host_ip: str
    kube: Kube
    config: AgentConfig  # read when needed: a reload replaces it
    status_corrections: int  # writes made because someone else changed a Pod's status

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]: ...
    async def resolve(self, pod: JSON) -> tuple[str, Backend] | Unresolved: ...
    def admit(self, worker: PodWorker) -> Rejection | None: ...
    async def reread_node(self) -> None: ...
    def unadmit(self, worker: PodWorker) -> None: ...
    async def write_status(self, namespace: str, name: str, body: bytes) -> None: ...
    def release(self, worker: PodWorker) -> None: ...


class PodWorker:
    # Slots: thousands of workers live at once on a scale node.
    __slots__ = (
        "_corrected_at", "_deadline", "_flush_pending", "_last_written", "_override", "_recent_writes",
        "_spent_sandbox", "_write_lock", "admitted", "adopted", "backend", "deletion_requested", "ephemeral_tasks",
        "gates", "gone", "handler_name", "handles", "host", "key", "pod", "rec", "resizer", "sandbox", "task", "uid",
        "wake",
    )  # fmt: skip

    def __init__(self, host: PodHost, pod: JSON):
        self.host = host
        self.pod = pod
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.key = f"{meta['namespace']}/{meta['name']}"
        self.rec = PodRecord.for_pod(pod, host.host_ip, qos_class(pod))
        self.backend: Backend | None = None
        self.handler_name = ""
        self.sandbox: Sandbox | None = None
        self._spent_sandbox: Sandbox | None = None  # released when the Pod finished; removed for good at deletion
        self.handles: dict[str, ContainerHandle] = {}
        self.admitted = False
        # A future, not an asyncio.Event: an Event carries a deque (~0.7 kB), times thousands of Pods.
        self.deletion_requested: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Done once the worker took over what already runs for the Pod (or found there is nothing
        # to take over): a deletion waits for it, else it would stop nothing and leave it running.
        self.adopted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.gone = False  # the Pod object no longer exists
        self.gates: dict[str, ImageGate] | None = None  # per container, only for backends that use images
        self.wake: asyncio.Event | None = None  # set while waiting for a missing handler to appear
        self._write_lock = asyncio.Lock()
        self._flush_pending = False
        self._last_written: int | None = None  # hash of the last status written
        self._recent_writes: tuple[int, ...] = ()  # summaries of the last writes, to tell our echo from drift
        self._corrected_at = -STATUS_CORRECTION_WINDOW  # loop time of the last correction
        self._override: JSON | None = None  # a rejected Pod's fixed status
        self._deadline: asyncio.Timeout | None = None  # activeDeadlineSeconds, while the Pod runs
        self.task: asyncio.Task[None] | None = None
        self.resizer: Resizer | None = resize_after_restart(self)
        self.ephemeral_tasks: ephemeral.Tasks | None = None  # agent/ephemeral.py: None until the first one

    # --- inputs from the controller ------------------------------------------------------------

    def update(self, pod: JSON) -> None:
        status = pod.get("status")
        if pod_status_drifted(status, self._recent_writes) and not pod["metadata"].get("deletionTimestamp"):
            self._correct_status(status)
        gates_before = gate_conditions(self.pod)
        if status and self.rec.start_time is not None:
            # Once running, the status in the API is our own echo: only the conditions others
            # own are still read from it, so the rest (most of it) is not kept for every Pod.
            foreign = [shared(c) for c in status.get("conditions") or () if c.get("type") not in OWNED_CONDITIONS]
            pod["status"] = {"phase": status.get("phase"), "conditions": foreign}
        previous, self.pod = self.pod, pod
        if pod["spec"].get("ephemeralContainers"):
            ephemeral.added(self)
        self.resizer = resize_on_update(self, previous, self.resizer)
        if gate_conditions(pod) != gates_before:
            self.mark_dirty()  # a readiness gate's condition changed: Ready follows it
        if self._deadline is not None:
            self._deadline.reschedule(self._deadline_at())  # activeDeadlineSeconds may be changed
        if pod["metadata"].get("deletionTimestamp"):
            self._request_deletion()

    def _correct_status(self, seen: JSON) -> None:
        """Someone else changed what this agent owns (the node lifecycle controller marked the Pod
        NotReady during an outage, an admin patched it): write ours again, as the kubelet's status
        manager does. Settled, so a write in flight lands first; a Pod corrected again soon after
        waits longer, so nothing can make two writers fight at full speed."""
        if seen.get("phase") in ("Succeeded", "Failed") and not self.rec.terminal and self._override is None:
            return  # a terminal phase set by others cannot be undone (the API server refuses it)
        t = asyncio.get_running_loop().time()
        again = t - self._corrected_at < STATUS_CORRECTION_WINDOW
        self._corrected_at = t
        corrections.corrected(self.key, again)
        self.host.status_corrections += 1
        self._last_written = None
        self.mark_dirty(settle=STATUS_CORRECTION_WINDOW if again else STATUS_CORRECTION_SETTLE)

    def object_deleted(self) -> None:
        self.gone = True
        self._request_deletion()

    def _request_deletion(self) -> None:
        if not self.deletion_requested.done():
            self.deletion_requested.set_result(None)

    def current_status(self) -> JSON:
        """The status as the agent sees it now (what the next write would say)."""
        return self._override or self._status()

    def _status(self) -> JSON:
        status = build_status(self.pod, self.rec, now())
        return self.resizer.decorate(status, now()) if self.resizer else decorate_unresized(status, self.pod)

    # --- status writing --------------------------------------------------------------------------

    def mark_dirty(self, settle: float = 0.0) -> None:
        """Write the status soon. With `settle`, wait that long first: a passing state (the
        sandbox made, the containers about to start) is left out when the next one comes sooner,
        which halves the writes of Pods that start quickly; the kubelet API shows it meanwhile."""
        if settle:
            asyncio.get_running_loop().call_later(settle, self.mark_dirty)
            return
        if not self._flush_pending and not self.gone:
            self._flush_pending = True
            # Scheduled, not immediate: every change made before the loop comes round again
            # (a whole emulated start) goes out as one write.
            asyncio.get_running_loop().call_soon(self._spawn_flush)

    def _spawn_flush(self) -> None:
        self.host.spawn(self.flush())

    async def flush(self) -> None:
        async with self._write_lock:
            self._flush_pending = False
            if self.gone:
                return
            status = status_patch(self._override or self._status(), self.pod)
            encoded = orjson.dumps(status, option=orjson.OPT_SORT_KEYS)
            fingerprint = hash(encoded)  # a hash, not a copy: memory per Pod
            if fingerprint == self._last_written:
                return
            ns, name = self.key.split("/", 1)
            # Encoded once: the fingerprint's text is the body's (uid: never patch a namesake).
            body = b'{"metadata":{"uid":' + orjson.dumps(self.uid) + b'},"status":' + encoded + b"}"
            try:
                await self.host.write_status(ns, name, body)
                self._last_written = fingerprint
                self._recent_writes = remember_write(self._recent_writes, pod_status_summary(status))
            except ApiError as exc:
                if exc.not_found or exc.conflict:
                    return  # deleted or replaced meanwhile: the watch will tell
                log.warning("cannot update pod status; will retry", extra=kv(pod=self.key, error=exc.describe()))
                await asyncio.sleep(1)
                self.host.spawn(self._retry_flush())

    async def _retry_flush(self) -> None:
        self.mark_dirty()

    # --- the life of the Pod -------------------------------------------------------------------

    async def run(self) -> None:
        life = asyncio.create_task(self._lifecycle(), name=f"pod-life:{self.key}")
        life.add_done_callback(self._report_crash)
        try:
            await asyncio.shield(self.deletion_requested)  # a finished Pod stays until it is deleted
            if not life.done():  # adopt the running containers first: termination must find them
                await asyncio.wait({life, self.adopted}, return_when=asyncio.FIRST_COMPLETED)
            life.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await life
            await self._terminate()
            if self.resizer:
                self.resizer.forget()
        finally:
            life.cancel()
            self.host.release(self)

    def _adoption_done(self) -> None:
        if not self.adopted.done():
            self.adopted.set_result(None)

    def _report_crash(self, life: asyncio.Task[None]) -> None:
        self._adoption_done()
        if not life.cancelled() and life.exception():
            log.error("pod lifecycle crashed", exc_info=life.exception(), extra=kv(pod=self.key))

    async def _lifecycle(self) -> None:
        status = self.pod.get("status") or {}
        if status.get("phase") in ("Succeeded", "Failed"):
            self.rec.phase = status["phase"]  # over before we (re)started: nothing to run
            return
        backend = await self._resolve()
        if backend is None:
            return
        if self.deletion_requested.done() and not await backend.has_sandbox(self.pod):
            return  # deleted before anything of it ran here: nothing to adopt, nothing to start
        rejection = self.host.admit(self)
        if rejection and rejection.reason == NODE_AFFINITY:
            # The Node's labels may have changed a moment ago (the scheduler saw the change, the
            # watch has not brought it yet): decide on the Node as the API server holds it now.
            await self.host.reread_node()
            rejection = self.host.admit(self)
        if rejection:
            await self._reject(rejection.reason, rejection.message, event_reason=rejection.reason)
            return
        self.admitted = True
        self.backend = backend
        self.rec.start_time = _parse_time(status.get("startTime")) or now()
        self._deadline = asyncio.timeout_at(self._deadline_at())
        try:
            async with self._deadline:
                await self._run_pod(backend)
            return
        except TimeoutError:
            if not self._deadline.expired():
                raise
        finally:
            self._deadline = None
        await self._deadline_exceeded()

    def _deadline_at(self) -> float | None:
        """activeDeadlineSeconds as a loop time, counted from the Pod's startTime (the kubelet's)."""
        seconds = self.pod["spec"].get("activeDeadlineSeconds")
        if seconds is None or self.rec.start_time is None:
            return None
        left = (self.rec.start_time - now()).total_seconds() + float(seconds)
        return asyncio.get_running_loop().time() + left

    async def _deadline_exceeded(self) -> None:
        """The kubelet's active deadline handler: a Normal event, the Pod Failed, its containers killed."""
        log.info("pod past its active deadline", extra=kv(pod=self.key))
        self.host.events.pod_event(self.pod, "Normal", DEADLINE_REASON, DEADLINE_MESSAGE)
        self.rec.phase, self.rec.reason, self.rec.message = "Failed", DEADLINE_REASON, DEADLINE_MESSAGE
        for c in self.rec.init_containers + self.rec.containers:
            if c.state == "running":
                c.ready = False
        self.mark_dirty()
        self._adoption_done()
        await self._stop_and_collect(self._grace())
        await self._release_sandbox()
        self.host.unadmit(self)
        self.mark_dirty()

    async def _run_pod(self, backend: Backend) -> None:
        """From the sandbox to the end of the Pod's last container."""
        try:
            self.sandbox = await backend.create_sandbox(self.pod)
        except BackendError as exc:
            await self._reject(
                "FailedCreatePodSandBox", str(exc), "FailedCreatePodSandBox", f"Failed to create pod sandbox: {exc}"
            )
            return
        self.rec.sandbox_ready = True
        self.rec.pod_ips = self.sandbox.ips
        for c in self.rec.containers:
            c.waiting("PodInitializing" if self.rec.init_containers else "ContainerCreating")
        self.mark_dirty(settle=PASSING_STATUS_SETTLE)
        await self._adopt_running()
        self._adoption_done()
        if self.deletion_requested.done():
            return  # run() stops what was adopted; nothing new starts for a Pod being deleted
        # The kubelet starts ephemeral containers before init containers, so that a Pod whose init
        # containers fail can be debugged too.
        ephemeral.start_pending(self)

        background: list[asyncio.Task[Any]] = []
        try:
            for spec in self.pod["spec"].get("initContainers") or []:
                rec = self.rec.container(spec["name"])
                if rec.sidecar:
                    background.append(asyncio.create_task(self._run_container(spec, rec)))
                    while not rec.has_started:  # the next init container waits for the sidecar's start
                        await asyncio.sleep(0.05)
                    continue
                if rec.succeeded:
                    continue
                code = await self._run_container(spec, rec)
                if code != 0:  # restartPolicy Never: the Pod fails
                    return
            for c in self.rec.containers:
                if c.state == "waiting" and not c.last_terminated:
                    c.waiting("ContainerCreating")
            specs = self.pod["spec"]["containers"]
            if len(specs) == 1:  # the common case needs no extra task
                await self._run_container(specs[0], self.rec.container(specs[0]["name"]))
            else:
                mains = [asyncio.create_task(self._run_container(s, self.rec.container(s["name"]))) for s in specs]
                try:
                    await asyncio.gather(*mains)
                finally:
                    for task in mains:
                        task.cancel()
            # Every app container is done for good: stop the sidecars, free the sandbox.
        finally:
            for task in background:
                task.cancel()
        await ephemeral.stop(self, self._grace())
        await self._stop_all(self._grace())
        self.rec.phase = self.rec.compute_phase()
        await self._release_sandbox()
        self.host.unadmit(self)
        self.mark_dirty()

    async def _resolve(self) -> Backend | None:
        while True:
            outcome = await self.host.resolve(self.pod)
            if not isinstance(outcome, Unresolved):
                self.handler_name, backend = outcome
                return backend
            if self.host.config.missing_handler != "retry":
                await self._reject(outcome.reason, outcome.message, "FailedCreatePodSandBox", outcome.event)
                return None
            self.host.events.pod_event(self.pod, "Warning", "FailedCreatePodSandBox", outcome.event)
            # The upstream behaviour, on request: stay Pending and try again (nothing runs to adopt).
            self._adoption_done()
            for c in self.rec.init_containers + self.rec.containers:
                c.waiting("PodInitializing" if self.rec.init_containers else "ContainerCreating")
            self.mark_dirty()
            self.wake = asyncio.Event()  # created only here: most Pods never wait
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), RETRY_MISSING_HANDLER)
            self.wake = None

    async def _reject(self, reason: str, message: str, event_reason: str, event_message: str | None = None) -> None:
        """Fail the Pod: the Failed status is written first, then the Warning event, so whoever
        saw the event finds the Pod Failed."""
        self._override = rejected_status(self.pod, self.rec, reason, message, now())
        log.info("pod rejected", extra=kv(pod=self.key, reason=reason))
        await self.flush()
        self.host.events.pod_event(self.pod, "Warning", event_reason, event_message or message)

    async def _adopt_running(self) -> None:
        """After an agent restart, carry on with the containers that run. The backend's records on
        disk are the truth: a container the agent started just before it died may be missing from
        the API status (or show an older restart), and must never be started a second time."""
        assert self.backend and self.sandbox
        statuses = (self.pod.get("status") or {}).get("containerStatuses") or []
        inits = (self.pod.get("status") or {}).get("initContainerStatuses") or []
        prefix = f"{self.backend.name}://"
        specs = {c["name"]: c for c in (self.pod["spec"].get("initContainers") or []) + self.pod["spec"]["containers"]}
        on_disk = await self.backend.recorded_containers(self.pod)
        for status in inits + statuses:
            name = status.get("name")
            if name not in specs or not str(status.get("containerID", "")).startswith(prefix):
                continue
            if on_disk.get(name, -1) <= status.get("restartCount", 0):
                on_disk.pop(name, None)  # the status is up to date: adopted from it below
            rec = self.rec.container(name)
            rec.restart_count = status.get("restartCount", 0)
            last = (status.get("lastState") or {}).get("terminated")
            rec.last_terminated = last
            terminated = (status.get("state") or {}).get("terminated")
            if rec.init and terminated and terminated.get("exitCode") == 0 and name not in on_disk:
                rec.terminated(0, _parse_time(terminated.get("finishedAt")) or now())
                rec.container_id = status["containerID"]
                continue
            if name in on_disk:
                continue  # a newer container than the status shows: adopted from the records below
            handle = await self.backend.adopt_container(self.sandbox, self.pod, specs[name], status)
            if handle is not None:
                self.handles[name] = handle
                rec.running(status["containerID"], handle.started_at or now(), status.get("imageID", ""))
                rec.ready = bool(status.get("ready"))  # probes take over from what was last reported
                rec.startup_passed = bool(status.get("started", True))
        for name, restart_count in on_disk.items():
            if name not in specs:
                continue
            rec = self.rec.container(name)
            rec.restart_count = restart_count  # a new start, if one is needed, gets the next count
            recorded = {"name": name, "restartCount": restart_count}
            handle = await self.backend.adopt_container(self.sandbox, self.pod, specs[name], recorded)
            if handle is None:
                continue  # made but never started (or its process is gone): started as usual
            self.handles[name] = handle
            spec = specs[name]
            rec.running(
                self.backend.container_id(handle), handle.started_at or now(), handle.image_id,
                readiness_probe=self._probes_run(spec, "readiness"), startup_probe=self._probes_run(spec, "startup"),
            )  # fmt: skip
            log.info(
                "adopted a container the pod status did not show",
                extra=kv(pod=self.key, container=name, restart_count=restart_count),
            )
            self.mark_dirty()
        await ephemeral.adopt(self, on_disk)

    async def _run_container(self, spec: JSON, rec: ContainerRecord) -> int:
        """Run one container until it is done for good; returns its last exit code."""
        assert self.backend and self.sandbox
        backend, name = self.backend, spec["name"]
        backoff = BACKOFF_INITIAL
        first_failure = True
        while True:
            handle = self.handles.get(name)
            if handle is None:
                if backend.uses_images and self.host.images is not None:
                    if self.gates is None:
                        self.gates = {}
                    gate = self.gates.setdefault(name, ImageGate())
                    rec.image_id = (await gate.ensure(self.host, self, spec, rec)).image_id
                if self.resizer:  # a (re)start takes the allocated resources, resized or not
                    spec = self.resizer.container_spec(spec)
                try:
                    handle = await backend.create_container(self.sandbox, self.pod, spec, rec.restart_count)
                    self.host.events.pod_event(self.pod, "Normal", "Created", f"Created container {name}", name)
                    await backend.start_container(handle)
                except BackendError as exc:
                    rec.waiting(exc.reason, str(exc))
                    self.host.events.pod_event(self.pod, "Warning", "Failed", f"Error: {exc}", name)
                    self.mark_dirty()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                self.handles[name] = handle
                self.host.events.pod_event(self.pod, "Normal", "Started", f"Started container {name}", name)
                # The kubelet runs postStart before it reports the container (its sync is blocked in
                # startContainer meanwhile): until the hook returns, the container is not Running.
                hook_error = await self._post_start(spec, handle)
                if hook_error is None:
                    rec.running(
                        backend.container_id(handle),
                        handle.started_at or now(),
                        handle.image_id,
                        readiness_probe=self._probes_run(spec, "readiness"),
                        startup_probe=self._probes_run(spec, "startup"),
                    )
                    if rec.restart_count == 0:
                        metrics.pod_container_started(self.handler_name, self.pod, self.rec)
                    self.mark_dirty()
                else:
                    rec.container_id, rec.started_at = backend.container_id(handle), handle.started_at or now()
            else:
                hook_error = None
            probes = self._start_probes(spec, rec, handle) if hook_error is None else []
            try:
                exit_ = await backend.wait_container(handle)
            finally:
                for task in probes:
                    task.cancel()
            del self.handles[name]
            rec.terminated(exit_.exit_code, exit_.finished_at, exit_.reason, exit_.message, exit_.signal)
            await backend.remove_container(handle)
            self.mark_dirty()
            if not self._restarts(rec, exit_.exit_code):
                return exit_.exit_code
            ran = (exit_.finished_at - (rec.started_at or exit_.finished_at)).total_seconds()
            if ran >= BACKOFF_RESET_AFTER:
                backoff, first_failure = BACKOFF_INITIAL, True
            rec.last_terminated = rec.terminated_json()
            if hook_error is not None:  # the kubelet's reason cache: waiting with the start error
                rec.waiting("PostStartHookError", hook_error)
            if first_failure:
                first_failure = False  # the kubelet restarts at once the first time
            else:
                pod_ref = f"{self.pod['metadata']['name']}_{self.pod['metadata']['namespace']}({self.uid})"
                message = f"back-off {backoff:.0f}s restarting failed container={name} pod={pod_ref}"
                rec.waiting("CrashLoopBackOff", message)
                # doBackOff's event names no delay, so the recorder counts one Event per container.
                event = f"Back-off restarting failed container {name} in pod {pod_ref}"
                self.host.events.pod_event(self.pod, "Warning", "BackOff", event, name)
                self.mark_dirty()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            rec.restart_count += 1

    # --- probes ------------------------------------------------------------------------------------

    def _probes_run(self, spec: JSON, kind: str) -> bool:
        return bool(spec.get(f"{kind}Probe")) and self.backend is not None and self.backend.runs_probes

    def _start_probes(self, spec: JSON, rec: ContainerRecord, handle: ContainerHandle) -> list[asyncio.Task[None]]:
        """Startup first; readiness and liveness once it passed (or at once without one)."""
        backend = self.backend
        assert backend is not None
        kinds = [k for k in ("startup", "readiness", "liveness") if self._probes_run(spec, k)]
        if not kinds:
            return []
        pod_ip = (self.rec.pod_ips or (self.rec.host_ip,))[0]
        tasks: list[asyncio.Task[None]] = []
        name = spec["name"]

        async def exec_(command: list[str], timeout: float) -> tuple[int, bytes]:
            return await backend.exec(handle, command, timeout)

        def launch(kind: str) -> None:
            worker = ProbeWorker(kind, spec[f"{kind}Probe"], spec, pod_ip, exec_, on_change, on_attempt)
            meta = self.pod["metadata"]
            worker.target = (name, meta["name"], meta["namespace"], self.uid)
            tasks.append(asyncio.create_task(worker.run(), name=f"probe:{self.key}:{name}:{kind}"))

        def on_attempt(kind: str, reason: str, message: str) -> None:  # Unhealthy or ProbeWarning
            self.host.events.pod_event(self.pod, "Warning", reason, message, name)

        def on_change(kind: str, ok: bool, message: str) -> None:
            if kind == "readiness":
                rec.ready = ok and rec.startup_passed
            elif kind == "startup" and ok:
                rec.startup_passed = True
                rec.ready = "readiness" not in kinds
                for later in ("readiness", "liveness"):
                    if later in kinds:
                        launch(later)
            elif not ok:  # a failed liveness or startup probe: the container is restarted
                probe = spec[f"{kind}Probe"]
                grace = float(probe.get("terminationGracePeriodSeconds") or self._grace())
                message = f"Container {name} failed {kind} probe, will be restarted"
                self.host.spawn(self._kill(name, handle, grace, message))
            self.mark_dirty()

        if "startup" in kinds:
            launch("startup")
        else:
            for kind in kinds:
                launch(kind)
        return tasks

    def _restarts(self, rec: ContainerRecord, exit_code: int) -> bool:
        if rec.sidecar:
            return True
        policy = self.rec.restart_policy
        return (policy == "Always" and not rec.init) or (policy in ("Always", "OnFailure") and exit_code != 0)

    def _grace(self) -> float:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE)
        return float(grace)

    async def _stop_all(self, grace: float) -> None:
        if not self.backend or not self.handles:
            return
        await asyncio.gather(*(self._kill(n, h, grace) for n, h in list(self.handles.items())))

    # --- lifecycle hooks -------------------------------------------------------------------------------

    def _spec_of(self, name: str) -> JSON:
        spec = self.pod["spec"]
        return next((c for c in (spec.get("initContainers") or []) + spec["containers"] if c["name"] == name), {})

    def _hook_exec(self, handle: ContainerHandle) -> HookExec:
        backend = self.backend
        assert backend is not None

        async def exec_(command: list[str]) -> tuple[int, bytes]:
            return await backend.exec(handle, command)

        return exec_

    async def _post_start(self, spec: JSON, handle: ContainerHandle) -> str | None:
        """Run the postStart hook; on failure kill the container as the kubelet does and return its message."""
        hook = (spec.get("lifecycle") or {}).get("postStart")
        if not hook or self.backend is None or not self.backend.runs_probes:
            return None
        name = spec["name"]
        pod_ip = (self.rec.pod_ips or (self.rec.host_ip,))[0]
        error = await run_hook(hook, spec, self.pod, pod_ip, self._hook_exec(handle))
        if error is None:
            return None
        log.info("postStart hook failed", extra=kv(pod=self.key, container=name, error=error))
        # No message in the event, so that no secret leaks from the server (the kubelet's words).
        self.host.events.pod_event(self.pod, "Warning", "FailedPostStartHook", "PostStartHook failed", name)
        await self._kill(name, handle, self._grace(), "FailedPostStartHook", running=True)
        return error

    async def _kill(
        self, name: str, handle: ContainerHandle, grace: float, message: str | None = None, running: bool = False
    ) -> None:
        """killContainer: the Killing event, the preStop hook within the grace period, then the stop
        with what is left of it (at least MIN_GRACE_AFTER_PRE_STOP once a hook ran)."""
        backend = self.backend
        assert backend is not None
        self.host.events.pod_event(self.pod, "Normal", "Killing", message or f"Stopping container {name}", name)
        spec = self._spec_of(name)
        hook = (spec.get("lifecycle") or {}).get("preStop")
        rec = self.rec.container(name) if spec else None
        if hook and grace > 0 and backend.runs_probes and (running or (rec is not None and rec.state == "running")):
            loop = asyncio.get_running_loop()
            started = loop.time()
            pod_ip = (self.rec.pod_ips or (self.rec.host_ip,))[0]
            try:
                error = await asyncio.wait_for(run_hook(hook, spec, self.pod, pod_ip, self._hook_exec(handle)), grace)
            except TimeoutError:
                error = None  # not completed in the grace period: the stop goes on
                log.info("preStop hook not completed in grace period", extra=kv(pod=self.key, container=name))
            if error is not None:
                log.info("preStop hook failed", extra=kv(pod=self.key, container=name, error=error))
                self.host.events.pod_event(self.pod, "Warning", "FailedPreStopHook", "PreStopHook failed", name)
            grace = max(grace - int(loop.time() - started), MIN_GRACE_AFTER_PRE_STOP)
        await backend.stop_container(handle, grace)

    async def _release_sandbox(self, deleting: bool = False) -> None:
        """Free the sandbox; the Pod's files (logs) stay until the Pod is deleted: backends see that
        by the deletionTimestamp of the Pod they are given."""
        sandbox = self.sandbox or (self._spent_sandbox if deleting else None)
        if self.backend and sandbox:
            self.sandbox, self._spent_sandbox = None, (None if deleting else sandbox)
            pod = self.pod
            if deleting and not pod["metadata"].get("deletionTimestamp"):  # gone without one: deleted all the same
                pod = {**pod, "metadata": {**pod["metadata"], "deletionTimestamp": now().isoformat()}}
            try:
                await self.backend.remove_sandbox(sandbox, pod)
            except Exception:  # a leftover must never keep a deleted Pod from going away
                log.exception("removing the pod sandbox failed; leftovers are cleaned up later", extra=kv(pod=self.key))
            self.rec.sandbox_ready = False

    async def _purge(self) -> None:
        """The Pod is going away: nothing it owned stays on disk (its logs included, as the kubelet
        removes a deleted Pod's log directory)."""
        if self.backend is None:
            return  # never ran here in this agent's life: housekeeping removes what an earlier one left
        ns, name = self.key.split("/", 1)
        try:
            await self.backend.purge_sandbox(SandboxRecord(self.uid, ns, name, self.handler_name))
        except Exception:
            log.exception("removing the pod's state failed; housekeeping retries", extra=kv(pod=self.key))

    async def _stop_and_collect(self, grace: float) -> None:
        """Stop every container, wait for its exit and record it."""
        await ephemeral.stop(self, grace)
        handles = dict(self.handles)
        await self._stop_all(grace)
        if self.backend:
            for name, handle in handles.items():
                rec = self.rec.container(name)
                if rec.state == "running":
                    try:
                        exit_ = await asyncio.wait_for(self.backend.wait_container(handle), grace + 5)
                        rec.terminated(exit_.exit_code, exit_.finished_at, exit_.reason, exit_.message, exit_.signal)
                    except TimeoutError:
                        rec.terminated(137, now(), "Error", "did not stop in time")
                await self.backend.remove_container(handle)
        self.handles.clear()

    async def _terminate(self) -> None:
        """Graceful deletion: stop with the Pod's grace period, release, delete the object."""
        await self._stop_and_collect(self._grace() if not self.gone else 0.0)
        await self._release_sandbox(deleting=True)
        await self._purge()
        self.host.unadmit(self)
        for c in self.rec.init_containers + self.rec.containers:
            if c.state == "waiting":
                c.ready = False
        if self.gone:
            return
        if not self.rec.terminal and self._override is None:
            # A deleted Pod ends terminal: Succeeded only if every container exited 0.
            self.rec.phase = "Succeeded" if all(c.succeeded for c in self.rec.containers) else "Failed"
        if self.backend is None or self.backend.final_status_write:
            await self.flush()
        ns, name = self.key.split("/", 1)
        try:
            await self.host.kube.delete(
                f"/api/v1/namespaces/{ns}/pods/{name}",
                {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}},
                parse=False,  # the answer is the Pod again; the watch brings its removal
            )
        except ApiError as exc:
            if not (exc.not_found or exc.conflict):
                log.warning("cannot delete pod", extra=kv(pod=self.key, error=exc.describe()))


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
