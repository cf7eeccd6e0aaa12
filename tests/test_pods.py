"""Issue 3: Pods resolved through their RuntimeClass and run by the handler's backend.

Everything here runs against the real control plane with real agent processes;
the user-visible outcome is checked with kubectl.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from conftest import (
    condition,
    delete_node_pods,
    events_for,
    eventually,
    pod_phase,
    ready_node,
    wait_node_ready,
)
from helpers import EMULATED_HANDLERS, pod, runtime_class, unique

from agent.hostinfo import address_toward

pytestmark = pytest.mark.cluster


@pytest.fixture
async def node(kubectl, start_agent):
    """A fresh node with three emulated handlers; yields (name, agent)."""
    name = unique("emu-pods")
    agent = await ready_node(kubectl, start_agent, name, EMULATED_HANDLERS)
    yield name, agent
    await delete_node_pods(kubectl, name, wait=False)


async def test_three_runtime_classes_each_pod_runs_on_its_handler(kubectl, node):
    name, _ = node
    classes = {h: unique(f"rc-{h}") for h in ("alpha", "beta", "gamma")}
    await kubectl.apply("\n---\n".join(runtime_class(rc, h) for h, rc in classes.items()))
    pods = {h: unique(f"p-{h}") for h in classes}
    await kubectl.apply("\n---\n".join(pod(p, name, classes[h]) for h, p in pods.items()))
    for handler, pod_name in pods.items():
        obj = await eventually(lambda p=pod_name: pod_phase(kubectl, p, "Running"), 10, what=f"{pod_name} Running")
        status = obj["status"]["containerStatuses"][0]
        assert status["containerID"].startswith(f"emulated://{handler}-")
        assert status["ready"] is True and status["state"]["running"]["startedAt"]
        assert condition(obj, "Ready")["status"] == "True"
        assert condition(obj, "PodScheduled")["status"] == "True"
        assert obj["status"]["podIP"] == obj["status"]["hostIP"] == address_toward(kubectl.cluster.server)
        assert obj["status"]["startTime"] and obj["status"]["qosClass"] == "BestEffort"
    reasons = {e["reason"] for e in await events_for(kubectl, pods["alpha"])}
    assert {"Created", "Started"} <= reasons


async def test_pod_without_runtime_class_uses_default_handler(kubectl, node):
    name, _ = node
    p = unique("p-default")
    await kubectl.apply(pod(p, name))
    obj = await eventually(lambda: pod_phase(kubectl, p, "Running"), 10, what="Running")
    assert obj["status"]["containerStatuses"][0]["containerID"].startswith("emulated://alpha-")


async def test_missing_handler_fails_fast_with_reason_and_event(kubectl, node):
    name, _ = node
    rc = unique("rc-ghost")
    await kubectl.apply(runtime_class(rc, "ghost"))
    p = unique("p-ghost")
    await kubectl.apply(pod(p, name, rc))
    created = time.monotonic()
    obj = await eventually(lambda: pod_phase(kubectl, p, "Failed"), 2, interval=0.1, what="Failed within 2 s")
    assert time.monotonic() - created <= 2
    assert obj["status"]["reason"] == "RuntimeHandlerNotFound"
    message = obj["status"]["message"]
    assert '"ghost"' in message and rc in message and "alpha, beta, gamma" in message

    async def warning():
        events = await events_for(kubectl, p)
        return [e for e in events if e["reason"] == "FailedCreatePodSandBox" and e["type"] == "Warning"]

    event = (await eventually(warning, 2, interval=0.1, what="Warning event"))[0]
    assert 'no runtime for "ghost" is configured' in event["message"]
    described = await kubectl("describe", "pod", p)
    assert "RuntimeHandlerNotFound" in described and "FailedCreatePodSandBox" in described
    table = await kubectl("get", "pod", p)
    assert "RuntimeHandlerNotFound" in table


async def test_runtime_class_deleted_after_pod_created(kubectl, start_agent):
    name = unique("emu-norc")
    rc = unique("rc-gone")
    await kubectl.apply(runtime_class(rc, "alpha"))
    p = unique("p-norc")
    await kubectl.apply(pod(p, name, rc))  # bound to a node whose agent has not started yet
    await kubectl("delete", "runtimeclass", rc)
    await start_agent(name, EMULATED_HANDLERS)
    obj = await eventually(lambda: pod_phase(kubectl, p, "Failed"), 15, what="Failed")
    assert obj["status"]["reason"] == "RuntimeClassNotFound"
    assert rc in obj["status"]["message"]
    events = await events_for(kubectl, p)
    assert any(e["reason"] == "FailedCreatePodSandBox" and e["type"] == "Warning" for e in events)
    await kubectl("delete", "pod", p, "--wait=false")


async def test_retry_mode_waits_pending_then_runs_after_reload(kubectl, start_agent):
    name = unique("emu-retry")
    config = 'missing_handler = "retry"\n' + EMULATED_HANDLERS
    agent = await start_agent(name, config)
    await wait_node_ready(kubectl, name)
    rc = unique("rc-late")
    await kubectl.apply(runtime_class(rc, "late"))
    p = unique("p-late")
    await kubectl.apply(pod(p, name, rc))

    async def pending_with_event():
        obj = await kubectl.get("pod", p)
        events = [e for e in await events_for(kubectl, p) if e["reason"] == "FailedCreatePodSandBox"]
        waiting = (obj["status"].get("containerStatuses") or [{}])[0].get("state", {}).get("waiting", {})
        return obj["status"]["phase"] == "Pending" and waiting.get("reason") == "ContainerCreating" and events

    await eventually(pending_with_event, 5, what="Pending with FailedCreatePodSandBox")
    await asyncio.sleep(2)
    assert (await kubectl.get("pod", p))["status"]["phase"] == "Pending"

    agent.reload(config + '[runtimes.late]\nbackend = "emulated"\n')
    obj = await eventually(lambda: pod_phase(kubectl, p, "Running"), 10, what="Running after reload")
    assert obj["status"]["containerStatuses"][0]["containerID"].startswith("emulated://late-")
    node_obj = await kubectl.get("node", name)
    assert node_obj["metadata"]["labels"]["runtime.kubelet-emu.io/late"] == "true"
    assert "late" in {h["name"] for h in node_obj["status"]["runtimeHandlers"]}
    await kubectl("delete", "pod", p, "--wait=false")


async def test_scheduler_follows_runtime_class_node_selector_and_overhead(kubectl, start_agent):
    special, plain = unique("emu-special"), unique("emu-plain")
    await start_agent(special, EMULATED_HANDLERS + '[runtimes.special]\nbackend = "emulated"\n')
    await start_agent(plain, EMULATED_HANDLERS)
    await wait_node_ready(kubectl, special)
    await wait_node_ready(kubectl, plain)
    rc = unique("rc-special")
    await kubectl.apply(
        runtime_class(
            rc,
            "special",
            "overhead: {podFixed: {cpu: 250m, memory: 120Mi}}\n"
            "scheduling: {nodeSelector: {runtime.kubelet-emu.io/special: 'true'}}\n",
        )
    )
    pods = [unique("p-sched") for _ in range(3)]
    await kubectl.apply("\n---\n".join(pod(p, None, rc) for p in pods))
    for p in pods:
        obj = await eventually(lambda p=p: pod_phase(kubectl, p, "Running"), 20, what=f"{p} Running")
        assert obj["spec"]["nodeName"] == special
        assert obj["spec"]["overhead"] == {"cpu": "250m", "memory": "120Mi"}
        assert obj["spec"]["nodeSelector"] == {"runtime.kubelet-emu.io/special": "true"}
        assert obj["status"]["containerStatuses"][0]["containerID"].startswith("emulated://special-")
    await kubectl("delete", "pod", *pods, "--wait=false")


async def test_admission_counts_overhead_and_node_selector(kubectl, start_agent):
    name = unique("emu-admit")
    await start_agent(name, EMULATED_HANDLERS + "[node]\nmax_pods = 3\n")
    node_obj = await wait_node_ready(kubectl, name)
    cpu_milli = int(node_obj["status"]["allocatable"]["cpu"]) * 1000
    rc = unique("rc-heavy")
    await kubectl.apply(runtime_class(rc, "beta", "overhead: {podFixed: {cpu: 250m}}\n"))
    # Fits without the overhead, not with it: the agent must count spec.overhead.
    big = unique("p-big")
    request = cpu_milli - 100
    await kubectl.apply(
        pod(big, name, rc, containers=f"[{{name: main, image: busybox, resources: {{requests: {{cpu: {request}m}}}}}}]")
    )
    obj = await eventually(lambda: pod_phase(kubectl, big, "Failed"), 10, what="OutOfcpu")
    assert obj["status"]["reason"] == "OutOfcpu"
    assert obj["status"]["message"].startswith("Pod was rejected:")

    misplaced = unique("p-selector")
    await kubectl.apply(pod(misplaced, name, extra_spec="  nodeSelector: {disktype: ssd}"))
    obj = await eventually(lambda: pod_phase(kubectl, misplaced, "Failed"), 10, what="NodeAffinity")
    assert obj["status"]["reason"] == "NodeAffinity"

    fillers = [unique("p-fill") for _ in range(4)]
    for p in fillers:
        await kubectl.apply(pod(p, name))
    await asyncio.sleep(2)
    phases = [(await kubectl.get("pod", p))["status"] for p in fillers]
    assert sum(s["phase"] == "Running" for s in phases) == 3
    rejected = [s for s in phases if s["phase"] == "Failed"]
    assert len(rejected) == 1 and rejected[0]["reason"] == "OutOfpods"
    await kubectl("delete", "pod", big, misplaced, *fillers, "--wait=false")


async def test_graceful_delete_within_grace_period(kubectl, node):
    name, _ = node
    p = unique("p-delete")
    await kubectl.apply(pod(p, name, extra_spec="  terminationGracePeriodSeconds: 5"))
    await eventually(lambda: pod_phase(kubectl, p, "Running"), 10, what="Running")
    started = time.monotonic()
    await kubectl("delete", "pod", p, "--wait=true", "--timeout=20s")
    assert time.monotonic() - started < 5
    assert await kubectl.get("pod", p) is None
    reasons = {e["reason"] for e in await events_for(kubectl, p)}
    assert "Killing" in reasons


async def test_job_like_pod_succeeds_after_init_container(kubectl, node):
    name, _ = node
    p = unique("p-job")
    await kubectl.apply(
        pod(
            p,
            name,
            annotations={"emulated.kubelet-emu.io/exit-after": "1s"},
            restart_policy="Never",
            extra_spec="  initContainers: [{name: setup, image: busybox}]",
        )
    )
    obj = await eventually(lambda: pod_phase(kubectl, p, "Succeeded"), 15, what="Succeeded")
    init = obj["status"]["initContainerStatuses"][0]["state"]["terminated"]
    main = obj["status"]["containerStatuses"][0]["state"]["terminated"]
    assert init["reason"] == main["reason"] == "Completed" and main["exitCode"] == 0
    assert init["finishedAt"] <= main["startedAt"]
    assert condition(obj, "Ready")["reason"] == "PodCompleted"


async def test_never_restart_failure_is_failed(kubectl, node):
    name, _ = node
    p = unique("p-fail")
    annotations = {"emulated.kubelet-emu.io/exit-after": "0.2s", "emulated.kubelet-emu.io/exit-code": "3"}
    await kubectl.apply(pod(p, name, annotations=annotations, restart_policy="Never"))
    obj = await eventually(lambda: pod_phase(kubectl, p, "Failed"), 10, what="Failed")
    term = obj["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 3 and term["reason"] == "Error"


async def test_on_failure_crash_loop_backs_off_with_growing_delays(kubectl, node):
    name, _ = node
    p = unique("p-crash")
    annotations = {"emulated.kubelet-emu.io/exit-after": "0.2s", "emulated.kubelet-emu.io/exit-code": "1"}
    await kubectl.apply(pod(p, name, annotations=annotations, restart_policy="OnFailure"))

    async def crash_looping():
        obj = await kubectl.get("pod", p)
        statuses = obj["status"].get("containerStatuses") or [{}]
        waiting = statuses[0].get("state", {}).get("waiting", {})
        return obj if waiting.get("reason") == "CrashLoopBackOff" else None

    obj = await eventually(crash_looping, 10, what="CrashLoopBackOff")
    status = obj["status"]["containerStatuses"][0]
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert obj["status"]["phase"] == "Running"  # OnFailure: it will be restarted

    assert "back-off 10s restarting failed container=main" in status["state"]["waiting"]["message"]

    async def second_backoff():
        obj = await kubectl.get("pod", p)
        waiting = obj["status"]["containerStatuses"][0].get("state", {}).get("waiting", {})
        return obj if "back-off 20s" in waiting.get("message", "") else None

    await eventually(second_backoff, 20, what="the second, longer back-off")

    # The kubelet's BackOff event names no delay: one Event, counted (client-go's correlator).
    async def counted():
        found = [e for e in await events_for(kubectl, p) if e["reason"] == "BackOff"]
        return found if found and found[0]["count"] >= 2 else None

    backoffs = await eventually(counted, 5, what="one BackOff event counted twice")
    assert len(backoffs) == 1, backoffs
    assert backoffs[0]["message"].startswith("Back-off restarting failed container main in pod ")
    restarts = (await kubectl.get("pod", p))["status"]["containerStatuses"][0]["restartCount"]
    assert restarts >= 2


async def test_agent_restart_keeps_running_pods(kubectl, start_agent, tmp_path):
    name = unique("emu-restart")
    state = tmp_path / "state"
    agent = await start_agent(name, EMULATED_HANDLERS, state_dir=state)
    await wait_node_ready(kubectl, name)
    p = unique("p-keep")
    await kubectl.apply(pod(p, name))
    before = await eventually(lambda: pod_phase(kubectl, p, "Running"), 10, what="Running")
    agent.kill(signal.SIGKILL)
    await agent.wait(5)
    await start_agent(name, EMULATED_HANDLERS, state_dir=state)
    await asyncio.sleep(3)
    after = await kubectl.get("pod", p)
    assert after["status"]["phase"] == "Running"
    b, a = before["status"]["containerStatuses"][0], after["status"]["containerStatuses"][0]
    assert a["restartCount"] == b["restartCount"] == 0
    assert a["containerID"] == b["containerID"]
    await kubectl("delete", "pod", p, "--wait=true", "--timeout=20s")


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ('[runtimes.Bad_Name]\nbackend = "emulated"\n', "[runtimes.Bad_Name]"),
        ('[runtimes.x]\nbackend = "warp"\n', "warp"),
        ('[runtimes.x]\nbackend = "emulated"\nruntime_path = "/no/such/runtime"\n', "/no/such/runtime"),
        ('default_runtime = "nope"\n[runtimes.x]\nbackend = "emulated"\n', "nope"),
        ("[runtimes.x\nbackend = 1\n", "TOML"),
    ],
)
async def test_bad_config_refuses_to_start_with_one_line(start_agent, config, expected):
    agent = await start_agent(unique("emu-badcfg"), config)
    assert await agent.wait(15) == 2
    lines = [line for line in agent.log.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert str(agent.config_path) in lines[0] and expected in lines[0]
