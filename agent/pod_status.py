"""What the agent knows about a Pod, and the status it writes for it (pure functions).

The phase and condition rules follow the kubelet's (pkg/kubelet/kubelet_pods.go
getPhase, pkg/kubelet/status generate.go).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent.node_status import rfc3339

JSON = dict[str, Any]

# Conditions this agent owns; any other (PodScheduled, readiness gates, DisruptionTarget) is kept.
# The resize conditions are the agent's too (agent/resize.py adds them).
RESIZE_CONDITIONS = ("PodResizePending", "PodResizeInProgress")
OWNED_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready", *RESIZE_CONDITIONS)


@dataclass(slots=True)
class ContainerRecord:
    name: str
    image: str
    init: bool = False
    sidecar: bool = False  # an init container with restartPolicy Always
    ephemeral: bool = False  # a spec.ephemeralContainers entry (kubectl debug): never restarted, never ready
    state: str = "waiting"  # waiting | running | terminated
    reason: str | None = "ContainerCreating"
    message: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    signal: int | None = None
    container_id: str = ""
    image_id: str = ""
    restart_count: int = 0
    last_terminated: JSON | None = None
    ready: bool = False
    has_started: bool = False  # ran at least once: a sidecar then counts as initialized
    startup_passed: bool = True  # false while a startup probe has not succeeded yet

    @property
    def started(self) -> bool:
        return self.state == "running" and self.startup_passed

    def waiting(self, reason: str, message: str | None = None) -> None:
        self.state, self.reason, self.message = "waiting", reason, message

    def running(
        self, container_id: str, started_at: datetime, image_id: str = "", *,
        readiness_probe: bool = False, startup_probe: bool = False,
    ) -> None:  # fmt: skip
        self.state, self.reason, self.message = "running", None, None
        self.container_id, self.started_at, self.image_id = container_id, started_at, image_id or self.image_id
        self.finished_at = self.exit_code = self.signal = None
        # With probes, ready/started wait for their first success, as the kubelet does.
        self.startup_passed = not startup_probe
        # A regular init container is ready only once it has succeeded (the kubelet's prober
        # manager); a sidecar is ready like an app container.
        self.ready = not (readiness_probe or startup_probe or self.ephemeral or (self.init and not self.sidecar))
        self.has_started = True

    def terminated(
        self, exit_code: int, finished_at: datetime, reason: str | None = None, message: str | None = None,
        signal: int | None = None,
    ) -> None:  # fmt: skip
        self.state = "terminated"
        self.exit_code, self.finished_at, self.signal = exit_code, finished_at, signal
        self.reason = reason or ("Completed" if exit_code == 0 else "Error")
        self.message = message
        self.ready = self.init and not self.sidecar and exit_code == 0  # a finished init container is ready

    def terminated_json(self) -> JSON:
        out: JSON = {"exitCode": self.exit_code, "reason": self.reason}
        if self.signal:
            out["signal"] = self.signal
        if self.message:
            out["message"] = self.message
        if self.started_at:
            out["startedAt"] = rfc3339(self.started_at)
        if self.finished_at:
            out["finishedAt"] = rfc3339(self.finished_at)
        if self.container_id:
            out["containerID"] = self.container_id
        return out

    def to_json(self) -> JSON:
        if self.state == "running":
            state: JSON = {"running": {"startedAt": rfc3339(self.started_at)}} if self.started_at else {"running": {}}
        elif self.state == "terminated":
            state = {"terminated": self.terminated_json()}
        else:
            waiting: JSON = {"reason": self.reason} if self.reason else {}
            if self.message:
                waiting["message"] = self.message
            state = {"waiting": waiting}
        out: JSON = {
            "name": self.name,
            "image": self.image,
            "imageID": self.image_id,
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {"terminated": self.last_terminated} if self.last_terminated else {},
        }
        if self.ephemeral:
            del out["started"]  # the kubelet's prober sets it for init and app containers only
        if self.container_id:
            out["containerID"] = self.container_id
        return out

    @property
    def succeeded(self) -> bool:
        return self.state == "terminated" and self.exit_code == 0


@dataclass(slots=True)
class PodRecord:
    uid: str
    host_ip: str
    qos_class: str
    init_containers: list[ContainerRecord]
    containers: list[ContainerRecord]
    restart_policy: str = "Always"
    phase: str = "Pending"  # set to Failed/Succeeded once the Pod is over; Pending/Running are computed
    reason: str | None = None
    message: str | None = None
    start_time: datetime | None = None
    sandbox_ready: bool = False
    pod_ips: tuple[str, ...] = ()
    transitions: dict[str, tuple[str, datetime]] = field(default_factory=dict)
    # One per spec.ephemeralContainers entry; a tuple, as almost every Pod has none.
    ephemeral: tuple[ContainerRecord, ...] = ()

    @classmethod
    def for_pod(cls, pod: JSON, host_ip: str, qos_class: str) -> PodRecord:
        spec = pod["spec"]
        # The kubelet's default waiting reason, for init and app containers alike
        # (kubelet_pods.go convertToAPIContainerStatuses).
        waiting = "PodInitializing" if spec.get("initContainers") else "ContainerCreating"
        inits = [
            ContainerRecord(
                name=c["name"],
                image=c.get("image", ""),
                init=True,
                sidecar=c.get("restartPolicy") == "Always",
                reason=waiting,
            )
            for c in spec.get("initContainers") or []
        ]
        apps = [
            ContainerRecord(name=c["name"], image=c.get("image", ""), reason=waiting)
            for c in spec.get("containers") or []
        ]
        record = cls(
            uid=pod["metadata"]["uid"],
            host_ip=host_ip,
            qos_class=qos_class,
            init_containers=inits,
            containers=apps,
            restart_policy=spec.get("restartPolicy", "Always"),
        )
        record.add_ephemeral(spec)
        return record

    def add_ephemeral(self, spec: JSON) -> list[ContainerRecord]:
        """Records for the spec's ephemeral containers not known yet (the list only grows: the
        API server refuses removals); returns the new ones."""
        known = {c.name for c in self.ephemeral}
        # convertToAPIContainerStatuses' default waiting reason, as for the other containers.
        waiting = "PodInitializing" if spec.get("initContainers") else "ContainerCreating"
        new = [
            ContainerRecord(name=c["name"], image=c.get("image", ""), ephemeral=True, reason=waiting)
            for c in spec.get("ephemeralContainers") or ()
            if c["name"] not in known
        ]
        if new:
            self.ephemeral = (*self.ephemeral, *new)
        return new

    def container(self, name: str) -> ContainerRecord:
        for rec in self.init_containers + self.containers:
            if rec.name == name:
                return rec
        for rec in self.ephemeral:
            if rec.name == name:
                return rec
        raise KeyError(name)

    @property
    def terminal(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    @property
    def initialized(self) -> bool:
        return all(c.has_started if c.sidecar else c.succeeded for c in self.init_containers)

    def compute_phase(self) -> str:
        """The kubelet's getPhase for a Pod that is not over."""
        if self.terminal:
            return self.phase
        if not self.initialized:
            failed_init = any(
                c.state == "terminated" and c.exit_code != 0 and not c.sidecar for c in self.init_containers
            )
            if failed_init and self.restart_policy == "Never":
                return "Failed"
            return "Pending"
        running = waiting = stopped = succeeded = 0
        for c in self.containers:
            if c.state == "running":
                running += 1
            elif c.state == "terminated":
                stopped += 1
                succeeded += c.exit_code == 0
            elif c.last_terminated:  # waiting to restart: it has run
                stopped += 1
            else:
                waiting += 1
        if waiting:
            return "Pending"
        if running:
            return "Running"
        if stopped:
            if self.restart_policy == "Always":
                return "Running"
            if stopped == succeeded:
                return "Succeeded"
            if self.restart_policy == "Never":
                return "Failed"
            return "Running"
        return "Pending"


def _condition(
    rec: PodRecord, ctype: str, ok: bool, now: datetime, reason: str | None, message: str | None,
    true_reason: str | None = None,
) -> JSON:  # fmt: skip
    status = "True" if ok else "False"
    previous = rec.transitions.get(ctype)
    if previous is None or previous[0] != status:
        rec.transitions[ctype] = (status, now)
    out: JSON = {
        "type": ctype,
        "status": status,
        "lastProbeTime": None,
        "lastTransitionTime": rfc3339(rec.transitions[ctype][1]),
    }
    if ok and true_reason:
        out["reason"] = true_reason
    if not ok and reason:
        out["reason"] = reason
    if not ok and message:
        out["message"] = message
    return out


def _foreign_conditions(pod: JSON, rec: PodRecord, now: datetime) -> list[JSON]:
    """Conditions others own, kept as they are; PodScheduled added when the Pod was bound
    directly (nodeName preset), as the kubelet does."""
    kept = [c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") not in OWNED_CONDITIONS]
    if not any(c.get("type") == "PodScheduled" for c in kept):
        since = rec.transitions.setdefault("PodScheduled", ("True", now))[1]
        kept.insert(
            0, {"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": rfc3339(since)}
        )
    return kept


def readiness_gates_message(pod: JSON, held: Sequence[JSON]) -> str | None:
    """Why the Pod's readiness gates keep it from Ready, in the kubelet's words
    (status/generate.go GeneratePodReadyCondition); None when every gate is met."""
    gates = (pod.get("spec") or {}).get("readinessGates") or ()
    if not gates:
        return None
    by_type = {c.get("type"): c for c in held}
    unmet = []
    for gate in gates:
        ctype = gate.get("conditionType", "")
        found = by_type.get(ctype)
        if found is None:
            unmet.append(f'corresponding condition of pod readiness gate "{ctype}" does not exist.')
        elif found.get("status") != "True":
            unmet.append(f'the status of pod readiness gate "{ctype}" is not "True", but {found.get("status", "")}')
    return ", ".join(unmet) or None


def gate_conditions(pod: JSON) -> tuple[tuple[str, str], ...]:
    """The statuses of the conditions the Pod's readiness gates name (what a change must be noticed of)."""
    gates = {g.get("conditionType") for g in (pod.get("spec") or {}).get("readinessGates") or ()}
    if not gates:
        return ()
    held = (pod.get("status") or {}).get("conditions") or ()
    return tuple(sorted((c.get("type", ""), c.get("status", "")) for c in held if c.get("type") in gates))


def conditions(
    rec: PodRecord, phase: str, now: datetime, pod: JSON | None = None, held: Sequence[JSON] = ()
) -> list[JSON]:
    """The conditions the kubelet owns (status/generate.go); `held` are the others' conditions,
    read for the Pod's readiness gates."""
    incomplete_init = [c.name for c in rec.init_containers if not (c.has_started if c.sidecar else c.succeeded)]
    unready = [c.name for c in rec.containers if not c.ready]
    if phase == "Succeeded":
        ready_reason, ready_message = "PodCompleted", None
    elif phase == "Failed":
        ready_reason, ready_message = "PodFailed", None
    elif incomplete_init:
        ready_reason, ready_message = (
            "ContainersNotInitialized",
            f"containers with incomplete status: [{' '.join(incomplete_init)}]",
        )
    else:
        ready_reason, ready_message = "ContainersNotReady", f"containers with unready status: [{' '.join(unready)}]"
    containers_ready = not unready and phase == "Running"
    pod_ready, pod_reason, pod_message = containers_ready, ready_reason, ready_message
    if containers_ready and pod is not None:
        gates_message = readiness_gates_message(pod, held)
        if gates_message:
            pod_ready, pod_reason, pod_message = False, "ReadinessGatesNotReady", gates_message
    # Initialized: True once every init container succeeded (or a sidecar started), once an app
    # container ran (a restarting sidecar does not undo it), and for a Succeeded Pod (PodCompleted);
    # otherwise ContainersNotInitialized, a Failed Pod included.
    app_started = any(c.has_started for c in rec.containers)
    init_ok = not incomplete_init or phase == "Succeeded" or app_started
    init_true_reason = "PodCompleted" if phase == "Succeeded" and rec.init_containers else None
    init_message = f"containers with incomplete status: [{' '.join(incomplete_init)}]"
    return [
        _condition(rec, "PodReadyToStartContainers", rec.sandbox_ready, now, None, None),
        _condition(rec, "Initialized", init_ok, now, "ContainersNotInitialized", init_message, init_true_reason),
        _condition(rec, "ContainersReady", containers_ready, now, ready_reason, ready_message),
        _condition(rec, "Ready", pod_ready, now, pod_reason, pod_message),
    ]


def build_status(pod: JSON, rec: PodRecord, now: datetime) -> JSON:
    """The whole status the agent owns, for a merge patch on pods/status."""
    phase = rec.compute_phase()
    foreign = _foreign_conditions(pod, rec, now)
    status: JSON = {
        "phase": phase,
        "conditions": foreign + conditions(rec, phase, now, pod, foreign),
        "hostIP": rec.host_ip,
        "hostIPs": [{"ip": rec.host_ip}],
        "qosClass": rec.qos_class,
        "containerStatuses": [c.to_json() for c in rec.containers],
    }
    if rec.init_containers:
        status["initContainerStatuses"] = [c.to_json() for c in rec.init_containers]
    if rec.ephemeral:
        status["ephemeralContainerStatuses"] = [c.to_json() for c in rec.ephemeral]
    if rec.start_time:
        status["startTime"] = rfc3339(rec.start_time)
    ips = rec.pod_ips or ((rec.host_ip,) if rec.sandbox_ready else ())
    if ips:
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": ip} for ip in ips]
    if rec.reason:
        status["reason"] = rec.reason
    if rec.message:
        status["message"] = rec.message
    return status


def rejected_status(pod: JSON, rec: PodRecord, reason: str, message: str, now: datetime) -> JSON:
    """A Pod the node will not run (missing handler, admission): Failed with a reason, no containers."""
    rec.phase, rec.reason, rec.message = "Failed", reason, message
    foreign = _foreign_conditions(pod, rec, now)
    return {
        "phase": "Failed",
        "reason": reason,
        "message": message,
        "hostIP": rec.host_ip,
        "hostIPs": [{"ip": rec.host_ip}],
        "qosClass": rec.qos_class,
        "startTime": rfc3339(rec.start_time or now),
        "conditions": foreign + conditions(rec, "Failed", now, pod, foreign),
    }


def status_patch(status: JSON, pod: JSON) -> JSON:
    """`status` as a strategic merge patch that touches only what the agent owns.

    Conditions merge by type, so a condition someone else owns (a readiness gate's, set by its
    controller while this write was on its way) is never overwritten with an older copy; the
    agent's own conditions name every field (null clears a reason that no longer applies). The
    container status lists are atomic lists (no merge key): a patch replaces them whole.
    """
    held = {c.get("type") for c in (pod.get("status") or {}).get("conditions") or ()}
    out = dict(status)
    conds = []
    for c in status.get("conditions") or ():
        if c.get("type") in OWNED_CONDITIONS:
            conds.append({"reason": None, "message": None, **c})
        elif c.get("type") not in held:
            conds.append(c)  # added by the agent: PodScheduled of a Pod bound by its nodeName
    if (pod.get("metadata") or {}).get("generation", 1) > 1:
        # A resized Pod (its spec changed): a resize condition that no longer applies must be
        # deleted, as a merge by type would keep it. A no-op where the API holds none.
        present = {c.get("type") for c in conds}
        conds += [{"type": t, "$patch": "delete"} for t in RESIZE_CONDITIONS if t not in present]
    out["conditions"] = conds
    return out
