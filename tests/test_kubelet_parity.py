"""Issue 17 (a): where Pods can tell kubelet-emu from the kubelet, on the emulated backend.

Admission against the Node the API server holds, init container statuses, readiness gates,
activeDeadlineSeconds, and the order of a rejection's status and event. The wording is the
kubelet's (pkg/kubelet/status/generate.go, pkg/kubelet/active_deadline.go).
"""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import (
    Kubectl,
    condition,
    delete_node_pods,
    events_for,
    eventually,
    pod_phase,
    ready_node,
)
from helpers import EMULATED_HANDLERS, pod, runtime_class, unique

pytestmark = pytest.mark.cluster


@pytest.fixture
async def node(kubectl, start_agent):
    """A fresh node with three emulated handlers; yields (name, agent)."""
    name = unique("emu-parity")
    agent = await ready_node(kubectl, start_agent, name, EMULATED_HANDLERS)
    yield name, agent
    await delete_node_pods(kubectl, name, wait=False)


async def _settled(kubectl: Kubectl, name: str) -> None:
    """Wait until the agent's first status posts are over, so that nothing but the Node watch (or
    admission's own re-read) can bring it a label or taint added from now on."""

    seen: list[str] = []

    async def quiet() -> bool:
        rv = (await kubectl.get("node", name))["metadata"]["resourceVersion"]
        seen.append(rv)
        return len(seen) > 1 and seen[-2] == rv

    await eventually(quiet, 30, interval=1.5, what="the node's status settled")


async def test_admission_sees_labels_an_admin_added(kubectl: Kubectl, node):
    """Item 1: a label or taint added with kubectl counts at admission at once, not after the next
    status post. Pods are created with nodeName preset right after `kubectl label`/`taint`, so only
    the Node watch (labels: or admission's re-read of the Node, as predicate.go does) can know."""
    name, _ = node
    await _settled(kubectl, name)
    pods = []
    for i in range(3):
        key = f"team{i}"
        await kubectl("label", "node", name, f"{key}=a")
        p = unique(f"p-label{i}")
        pods.append(p)
        await kubectl.apply(pod(p, name, extra_spec=f"  nodeSelector: {{{key}: a}}"))
    for p in pods:
        obj = await eventually(lambda p=p: pod_phase(kubectl, p, "Running"), 10, what=f"{p} Running")
        assert obj["status"].get("reason") != "NodeAffinity"
    # A label the node does not have is still refused.
    other = unique("p-nolabel")
    await kubectl.apply(pod(other, name, extra_spec="  nodeSelector: {team9: a}"))
    obj = await eventually(lambda: pod_phase(kubectl, other, "Failed"), 10, what="NodeAffinity")
    assert obj["status"]["reason"] == "NodeAffinity"


TAINT_REJECTION = "Pod was rejected: Predicate TaintToleration failed: node(s) had taints that the pod didn't tolerate"


async def test_admission_sees_a_no_execute_taint_an_admin_added(kubectl: Kubectl, node):
    """Item 1, taints: the kubelet refuses a Pod that does not tolerate one of the node's NoExecute
    taints (TaintToleration), with the taint as the API server holds it a moment after it was set.
    The taint-eviction controller deletes such Pods too, racing the agent: a Pod it deleted before
    the agent saw it is never admitted. So: none of them may start, and those the agent decided on
    carry its Warning (an agent that missed the taint starts most of them)."""
    name, _ = node
    await _settled(kubectl, name)
    await kubectl("taint", "node", name, "emu-dedicated=db:NoExecute")
    try:
        plain = [unique("p-untolerated") for _ in range(5)]
        tolerant = unique("p-tolerant")
        toleration = "  tolerations: [{key: emu-dedicated, operator: Equal, value: db, effect: NoExecute}]"
        docs = [pod(p, name) for p in plain] + [pod(tolerant, name, extra_spec=toleration)]
        await kubectl.apply("---\n".join(docs))
        await eventually(lambda: pod_phase(kubectl, tolerant, "Running"), 10, what="the tolerant Pod Running")
        await asyncio.sleep(2)
        refused = 0
        for p in plain:
            reasons = {e["reason"]: e for e in await events_for(kubectl, p)}
            assert "Started" not in reasons, f"{p} ran: {sorted(reasons)}"
            if "TaintToleration" in reasons:
                refused += 1
                assert reasons["TaintToleration"]["type"] == "Warning"
                assert reasons["TaintToleration"]["message"] == TAINT_REJECTION
            else:
                assert "TaintManagerEviction" in reasons, f"{p}: neither refused nor evicted: {sorted(reasons)}"
        print(f"refused by the agent: {refused} of {len(plain)}, the rest evicted first")
    finally:
        await kubectl("taint", "node", name, "emu-dedicated=db:NoExecute-")


async def _waiting_reason(kubectl: Kubectl, p: str, key: str, container: str) -> str | None:
    obj = await kubectl.get("pod", p)
    for s in (obj or {}).get("status", {}).get(key) or []:
        if s["name"] == container:
            return (s.get("state", {}).get("waiting") or {}).get("reason")
    return None


async def test_init_container_statuses_as_the_kubelet_reports_them(kubectl: Kubectl, node):
    """Item 4: PodInitializing while waiting, ready once finished, ContainersNotInitialized on failure."""
    name, _ = node
    p = unique("p-init")
    annotations = {"emulated.kubelet-emu.io/exit-after.first": "3s"}
    inits = "  initContainers: [{name: first, image: busybox}, {name: second, image: busybox}]"
    await kubectl.apply(pod(p, name, annotations=annotations, extra_spec=inits))

    async def first_running():
        obj = await kubectl.get("pod", p)
        statuses = (obj or {}).get("status", {}).get("initContainerStatuses") or []
        return obj if statuses and "running" in statuses[0]["state"] else None

    obj = await eventually(first_running, 10, interval=0.2, what="first init container running")
    inits_s = {s["name"]: s for s in obj["status"]["initContainerStatuses"]}
    assert inits_s["first"]["ready"] is False
    assert inits_s["second"]["state"]["waiting"]["reason"] == "PodInitializing"
    assert obj["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "PodInitializing"
    init_cond = condition(obj, "Initialized")
    assert init_cond["status"] == "False" and init_cond["reason"] == "ContainersNotInitialized"
    assert init_cond["message"] == "containers with incomplete status: [first second]"

    obj = await eventually(lambda: pod_phase(kubectl, p, "Running"), 15, what="Running")
    for s in obj["status"]["initContainerStatuses"]:
        assert s["state"].get("terminated", {}).get("reason") == "Completed", obj["status"]
        assert s["ready"] is True, s
    assert condition(obj, "Initialized")["status"] == "True"

    failing = unique("p-initfail")
    annotations = {"emulated.kubelet-emu.io/exit-code.first": "2"}
    await kubectl.apply(pod(failing, name, annotations=annotations, restart_policy="Never", extra_spec=inits))
    obj = await eventually(lambda: pod_phase(kubectl, failing, "Failed"), 10, what="Failed")
    first, second = obj["status"]["initContainerStatuses"]
    assert first["state"]["terminated"]["exitCode"] == 2 and first["ready"] is False
    assert second["state"]["waiting"]["reason"] == "PodInitializing"
    init_cond = condition(obj, "Initialized")
    assert init_cond["status"] == "False"
    assert init_cond["reason"] == "ContainersNotInitialized"
    assert init_cond["message"] == "containers with incomplete status: [first second]"
    assert condition(obj, "Ready")["reason"] == "PodFailed"


async def test_readiness_gates_hold_ready_until_their_condition_is_true(kubectl: Kubectl, node):
    """Item 5: an unmet gate keeps Ready False in the kubelet's words; the owner's condition is kept."""
    name, _ = node
    p = unique("p-gate")
    gate = "example.com/lb-ready"
    await kubectl.apply(pod(p, name, extra_spec=f'  readinessGates: [{{conditionType: "{gate}"}}]'))
    obj = await eventually(lambda: pod_phase(kubectl, p, "Running"), 10, what="Running")
    await asyncio.sleep(1)
    obj = await kubectl.get("pod", p)
    assert condition(obj, "ContainersReady")["status"] == "True"
    ready = condition(obj, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "ReadinessGatesNotReady"
    assert ready["message"] == f'corresponding condition of pod readiness gate "{gate}" does not exist.'

    async def set_gate(status: str) -> None:
        patch = {"status": {"conditions": [{"type": gate, "status": status}]}}
        await kubectl("patch", "pod", p, "--subresource", "status", "--type", "strategic", "-p", json.dumps(patch))

    async def ready_is(status: str, reason: str | None = None):
        obj = await kubectl.get("pod", p)
        c = condition(obj, "Ready")
        return obj if c["status"] == status and (reason is None or c.get("reason") == reason) else None

    await set_gate("False")
    obj = await eventually(lambda: ready_is("False", "ReadinessGatesNotReady"), 10, what="gate False")
    assert condition(obj, "Ready")["message"] == f'the status of pod readiness gate "{gate}" is not "True", but False'
    await set_gate("True")
    await eventually(lambda: ready_is("True"), 10, what="Ready once the gate is True")
    await asyncio.sleep(2)  # the agent keeps the owner's condition and does not fight over it
    obj = await kubectl.get("pod", p)
    assert condition(obj, gate)["status"] == "True"
    assert condition(obj, "Ready")["status"] == "True"
    await set_gate("False")
    await eventually(lambda: ready_is("False", "ReadinessGatesNotReady"), 10, what="not Ready again")


async def test_active_deadline_fails_the_pod(kubectl: Kubectl, node):
    """Item 6: past activeDeadlineSeconds the containers are killed and the Pod Failed/DeadlineExceeded."""
    name, _ = node
    p = unique("p-deadline")
    await kubectl.apply(pod(p, name, extra_spec="  activeDeadlineSeconds: 3\n  terminationGracePeriodSeconds: 1"))
    await eventually(lambda: pod_phase(kubectl, p, "Running"), 10, what="Running")
    obj = await eventually(lambda: pod_phase(kubectl, p, "Failed"), 15, what="Failed past the deadline")
    assert obj["status"]["reason"] == "DeadlineExceeded"
    assert obj["status"]["message"] == "Pod was active on the node longer than the specified deadline"
    assert "terminated" in obj["status"]["containerStatuses"][0]["state"]
    assert condition(obj, "Ready")["reason"] == "PodFailed"

    async def deadline_event():
        return [e for e in await events_for(kubectl, p) if e["reason"] == "DeadlineExceeded"]

    event = (await eventually(deadline_event, 5, what="DeadlineExceeded event"))[0]
    assert event["type"] == "Normal"
    assert event["message"] == "Pod was active on the node longer than the specified deadline"


async def test_rejection_status_is_written_before_its_event(kubectl: Kubectl, node):
    """Item 12: whoever saw the Warning event sees the Pod Failed (etcd revisions order the writes)."""
    name, _ = node
    rc = unique("rc-ghost")
    await kubectl.apply(runtime_class(rc, "ghost"))
    cases = {unique(f"p-nohandler{i}"): rc for i in range(4)}
    await kubectl.apply("\n---\n".join(pod(p, name, c) for p, c in cases.items()))
    for p in cases:
        obj = await eventually(lambda p=p: pod_phase(kubectl, p, "Failed"), 10, what=f"{p} Failed")

        async def warning(p=p):
            return [e for e in await events_for(kubectl, p) if e["reason"] == "FailedCreatePodSandBox"]

        event = (await eventually(warning, 5, what="Warning event"))[0]
        obj = await kubectl.get("pod", p)
        assert int(obj["metadata"]["resourceVersion"]) < int(event["metadata"]["resourceVersion"]), (
            "the Warning event was recorded before the Failed status"
        )
