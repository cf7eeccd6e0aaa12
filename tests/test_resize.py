"""Issue 21: Pod-level resources and in-place resize on the process backend (real cluster, cgroups, processes)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import condition, delete_node_pods, eventually, ready_node
from helpers import needs_root, process_config, unique

from cgroups.quantity import cpu_millis

pytestmark = [pytest.mark.cluster, needs_root]

CGROUP_ROOT = f"kubelet-emu-test-{uuid.uuid4().hex[:6]}"
CONFIG = process_config(CGROUP_ROOT)
MI = 2**20
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
async def node(kubectl, start_agent, tmp_path):
    name = unique("emu-rsz")
    state = tmp_path / "state"
    agent = await ready_node(kubectl, start_agent, name, CONFIG, state)
    yield name, agent, state
    await delete_node_pods(kubectl, name)


async def running(kubectl, name):
    obj = await kubectl.get("pod", name)
    return obj if obj and obj["status"].get("phase") == "Running" else None


async def overhead_class(kubectl) -> str:
    rc = unique("rc-rsz")
    await kubectl.apply(
        f"apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {{name: {rc}}}\nhandler: procs\n"
        "overhead: {podFixed: {cpu: 250m, memory: 120Mi}}\n"
    )
    return rc


async def test_pod_level_resources_worked_example(kubectl, node, cgroups):
    name, _, state = node
    rc = await overhead_class(kubectl)
    p = unique("p-level")
    await kubectl.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: {p}}}
spec:
  nodeName: {name}
  runtimeClassName: {rc}
  terminationGracePeriodSeconds: 1
  resources: {{limits: {{cpu: "1", memory: 256Mi}}}}
  containers:
  - {{name: a, image: busybox, command: [sleep, "3600"]}}
  - {{name: b, image: busybox, command: [sleep, "3600"]}}
""")
    obj = await eventually(lambda: running(kubectl, p), 20, what="Running")
    values = cgroups.read_values(cgroups.pod_path(obj))
    assert values["cpu.cfs_quota_us"] == "125000" and values["cpu.cfs_period_us"] == "100000"
    assert values["memory.limit_in_bytes"] == str(376 * MI)
    a = cgroups.read_values(cgroups.container_path(obj, "a"))
    assert a["cpu.cfs_quota_us"] == "100000" and a["memory.limit_in_bytes"] == str(256 * MI)
    assert obj["status"]["qosClass"] in ("Guaranteed", "Burstable")  # as the API server computed it
    config = state.parent / "cgroups.toml"
    config.write_text(CONFIG)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "cgroups", "--state-dir", str(state), "--config", str(config),
        stdout=asyncio.subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    out = (await proc.communicate())[0].decode()
    print("\n" + out)
    assert "pod-level (spec.resources)" in out and "376Mi" in out and "differs" not in out, out


def resize_pod(name: str, node: str, rc: str, policy: str = "NotRequired", command: str = "sleep 3600") -> str:
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  nodeName: {node}
  runtimeClassName: {rc}
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", {command!r}]
    resizePolicy: [{{resourceName: cpu, restartPolicy: NotRequired}}, {{resourceName: memory, restartPolicy: {policy}}}]
    resources: {{requests: {{cpu: 500m, memory: 128Mi}}, limits: {{cpu: 500m, memory: 128Mi}}}}
"""


async def patch_resize(kubectl, name: str, cpu: str, memory: str) -> float:
    res = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}
    body = json.dumps({"spec": {"containers": [{"name": "main", "resources": res}]}})
    start = time.monotonic()
    await kubectl("patch", "pod", name, "--subresource", "resize", "--type", "strategic", "-p", body)
    return start


async def test_cpu_and_memory_increase_in_place(kubectl, node, cgroups):
    name, _, _ = node
    rc = await overhead_class(kubectl)
    p = unique("p-cpu")
    await kubectl.apply(resize_pod(p, name, rc))
    before = await eventually(lambda: running(kubectl, p), 20, what="Running")
    pod_rel, ctr_rel = cgroups.pod_path(before), cgroups.container_path(before, "main")
    assert cgroups.read_values(pod_rel)["cpu.cfs_quota_us"] == "75000"
    pids = cgroups.pids(ctr_rel)
    started = before["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]

    start = await patch_resize(kubectl, p, "1", "256Mi")

    async def applied():
        return cgroups.read_values(ctr_rel)["cpu.cfs_quota_us"] == "100000" or None

    await eventually(applied, 10, interval=0.02, what="the new container quota")
    elapsed = time.monotonic() - start
    print(f"\nresize patch -> container cgroup cpu quota: {elapsed * 1000:.0f} ms")
    values = cgroups.read_values(pod_rel)
    assert values["cpu.cfs_quota_us"] == "125000"  # 1 + 250m overhead
    assert values["memory.limit_in_bytes"] == str(376 * MI)  # 256Mi + 120Mi

    async def settled():
        obj = await kubectl.get("pod", p)
        st = obj["status"]
        if condition(obj, "PodResizeInProgress") or condition(obj, "PodResizePending"):
            return None
        if st.get("observedGeneration") != obj["metadata"]["generation"]:
            return None
        return obj

    after = await eventually(settled, 15, what="conditions cleared, observedGeneration")
    cs = after["status"]["containerStatuses"][0]
    assert cs["allocatedResources"] == {"cpu": "1", "memory": "256Mi"}
    assert cs["resources"] == {"requests": {"cpu": "1", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}}
    assert cs["restartCount"] == 0 and cs["state"]["running"]["startedAt"] == started
    assert cgroups.pids(ctr_rel) == pids


async def test_resize_beyond_allocatable_is_infeasible(kubectl, node, cgroups):
    name, _, _ = node
    rc = await overhead_class(kubectl)
    p = unique("p-inf")
    await kubectl.apply(resize_pod(p, name, rc))
    await eventually(lambda: running(kubectl, p), 20, what="Running")
    # The v1.36 API server already refuses a resize beyond the node's allocatable (Forbidden), so
    # the node's own Infeasible check (agent/resize.py infeasible(), unit-tested) is a backstop.
    res = {"requests": {"cpu": "1000"}, "limits": {"cpu": "1000"}}
    body = json.dumps({"spec": {"containers": [{"name": "main", "resources": res}]}})
    code, _, err = await kubectl.run("patch", "pod", p, "--subresource", "resize", "-p", body, check=False)
    assert code != 0 and "didn't have enough allocatable resources: cpu" in err
    return

    async def pending():
        obj = await kubectl.get("pod", p)
        return condition(obj, "PodResizePending")

    cond = await eventually(pending, 15, what="PodResizePending")
    assert cond["reason"] == "Infeasible"
    assert cond["message"].startswith("Node didn't have enough capacity: cpu, requested: 1000250, capacity: ")


# Holds ~90Mi of touched memory (charged to its cgroup) until SIGUSR1, then frees it (a block
# this large is an mmap of its own: free() returns it to the kernel) and sleeps.
HOG = """
import signal, time
freed = []
signal.signal(signal.SIGUSR1, lambda *_: freed.append(1))
block = bytearray(b"x") * (90 * 2**20)
while not freed:
    time.sleep(0.1)
del block
time.sleep(3600)
"""


def hog_pod(name: str, node: str, rc: str) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "nodeName": node, "runtimeClassName": rc, "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main", "image": "host", "command": [sys.executable, "-c", HOG],
                # Root: sys.executable may live under /root, which the default user cannot enter.
                "securityContext": {"runAsUser": 0},
                "resizePolicy": [{"resourceName": "cpu", "restartPolicy": "NotRequired"},
                                 {"resourceName": "memory", "restartPolicy": "NotRequired"}],
                "resources": {"requests": {"cpu": "500m", "memory": "128Mi"},
                              "limits": {"cpu": "500m", "memory": "128Mi"}},
            }],
        },
    })  # fmt: skip


async def start_hog(kubectl, cgroups, name: str, node: str, rc: str) -> tuple[dict, str]:
    await kubectl.apply(hog_pod(name, node, rc))
    obj = await eventually(lambda: running(kubectl, name), 20, what="Running")
    ctr_rel = cgroups.container_path(obj, "main")

    async def filled():
        return cgroups.usage(ctr_rel)["memory_usage_bytes"] > 80 * MI or None

    await eventually(filled, 15, what="90Mi in use")
    return obj, ctr_rel


async def below_usage_error(kubectl, name: str) -> dict:
    async def in_progress():
        obj = await kubectl.get("pod", name)
        c = condition(obj, "PodResizeInProgress")
        return c if c and c.get("reason") == "Error" else None

    return await eventually(in_progress, 15, what="PodResizeInProgress with an error")


def free_memory(cgroups, ctr_rel: str) -> None:
    for pid in cgroups.pids(ctr_rel):
        os.kill(pid, signal.SIGUSR1)


async def resize_events(kubectl, name: str) -> dict[str, int]:
    items = (await kubectl.json("get", "events", "--field-selector", f"involvedObject.name={name}"))["items"]
    counts: dict[str, int] = {}
    for e in items:
        if e["reason"].startswith("Resize"):
            counts[e["reason"]] = counts.get(e["reason"], 0) + e.get("count", 1)
    return counts


async def test_memory_decrease_below_usage_waits(kubectl, node, cgroups):
    name, _, _ = node
    rc = await overhead_class(kubectl)
    p = unique("p-mem")
    obj, ctr_rel = await start_hog(kubectl, cgroups, p, name, rc)
    pids = cgroups.pids(ctr_rel)
    await patch_resize(kubectl, p, "500m", "64Mi")

    cond = await below_usage_error(kubectl, p)
    # The kubelet's message (kuberuntime): the container's new limit and what it uses now.
    assert cond["message"].startswith(
        f'cannot decrease memory limits: attempting to set container "main" memory limit ({64 * MI}) '
        "below current usage ("
    ), cond
    assert cgroups.read_values(ctr_rel)["memory.limit_in_bytes"] == str(128 * MI)  # nothing written
    pod_status = (await kubectl.get("pod", p))["status"]["containerStatuses"][0]
    assert pod_status["allocatedResources"]["memory"] == "64Mi"  # admitted, not yet in force
    assert pod_status["resources"]["limits"]["memory"] == "128Mi"

    free_memory(cgroups, ctr_rel)

    async def applied():
        return cgroups.read_values(ctr_rel)["memory.limit_in_bytes"] == str(64 * MI) or None

    await eventually(applied, 15, what="the lower limit once usage dropped")
    assert cgroups.read_values(cgroups.pod_path(obj))["memory.limit_in_bytes"] == str(184 * MI)  # 64Mi + 120Mi

    async def cleared():
        obj = await kubectl.get("pod", p)
        return None if condition(obj, "PodResizeInProgress") else obj

    after = await eventually(cleared, 15, what="PodResizeInProgress cleared")
    cs = after["status"]["containerStatuses"][0]
    assert cs["resources"]["limits"]["memory"] == "64Mi" and cs["restartCount"] == 0
    assert cgroups.pids(ctr_rel) == pids
    events = await eventually(lambda: resize_events(kubectl, p), 10, what="resize events")
    assert {"ResizeStarted", "ResizeError", "ResizeCompleted"} <= set(events), events


async def test_resize_deferred_until_another_pod_leaves(kubectl, node, cgroups):
    name, _, _ = node
    rc = await overhead_class(kubectl)
    allocatable = cpu_millis((await kubectl.get("node", name))["status"]["allocatable"]["cpu"])
    p = unique("p-def")
    await kubectl.apply(resize_pod(p, name, rc))  # 500m + 250m overhead
    obj = await eventually(lambda: running(kubectl, p), 20, what="Running")
    # A second Pod takes the rest of the node's cpu: 750m + filler + 250m = allocatable.
    filler = unique("p-fill")
    await kubectl.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: {filler}}}
spec:
  nodeName: {name}
  runtimeClassName: {rc}
  terminationGracePeriodSeconds: 1
  containers:
  - {{name: main, image: busybox, command: [sleep, "3600"], resources: {{requests: {{cpu: {allocatable - 1000}m}}}}}}
""")
    await eventually(lambda: running(kubectl, filler), 20, what="the filler Running")
    await patch_resize(kubectl, p, "1", "128Mi")  # +500m: fits the node, not beside the filler

    async def deferred():
        return condition(await kubectl.get("pod", p), "PodResizePending")

    cond = await eventually(deferred, 15, what="PodResizePending")
    print(f"\nPodResizePending: {cond.get('reason')}: {cond.get('message')}")
    assert cond["reason"] == "Deferred" and "cpu" in cond["message"]
    ctr_rel = cgroups.container_path(obj, "main")
    assert cgroups.read_values(ctr_rel)["cpu.cfs_quota_us"] == "50000"  # not applied

    await kubectl("delete", "pod", filler, "--grace-period=1", "--wait=false")

    async def applied():
        return cgroups.read_values(ctr_rel)["cpu.cfs_quota_us"] == "100000" or None

    await eventually(applied, 30, what="the resize once the filler left")
    assert cgroups.read_values(cgroups.pod_path(obj))["cpu.cfs_quota_us"] == "125000"

    async def settled():
        obj = await kubectl.get("pod", p)
        pending = condition(obj, "PodResizePending") or condition(obj, "PodResizeInProgress")
        return None if pending else obj

    cs = (await eventually(settled, 15, what="conditions cleared"))["status"]["containerStatuses"][0]
    assert cs["allocatedResources"]["cpu"] == "1" and cs["restartCount"] == 0


async def test_agent_killed_during_a_resize_completes_it_once(kubectl, node, cgroups, start_agent):
    name, agent, state = node
    rc = await overhead_class(kubectl)
    p = unique("p-kill")
    obj, ctr_rel = await start_hog(kubectl, cgroups, p, name, rc)
    pids = cgroups.pids(ctr_rel)
    started = (await kubectl.get("pod", p))["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
    await patch_resize(kubectl, p, "700m", "64Mi")
    await below_usage_error(kubectl, p)  # admitted and checkpointed, held up by the usage
    # Partly applied before the kill? cpu and memory go together: nothing is in force yet.
    assert cgroups.read_values(ctr_rel)["cpu.cfs_quota_us"] == "50000"

    agent.kill(signal.SIGKILL)
    await agent.wait(10)
    free_memory(cgroups, ctr_rel)  # meanwhile the usage drops
    restarted = await ready_node(kubectl, start_agent, name, CONFIG, state)

    async def applied():
        values = cgroups.read_values(ctr_rel)
        return (values["memory.limit_in_bytes"] == str(64 * MI) and values["cpu.cfs_quota_us"] == "70000") or None

    await eventually(applied, 30, what="the resize completed by the restarted agent")
    assert cgroups.read_values(cgroups.pod_path(obj))["cpu.cfs_quota_us"] == "95000"  # 700m + 250m

    async def settled():
        obj = await kubectl.get("pod", p)
        return None if condition(obj, "PodResizeInProgress") else obj

    cs = (await eventually(settled, 15, what="PodResizeInProgress cleared"))["status"]["containerStatuses"][0]
    assert cs["restartCount"] == 0 and cs["state"]["running"]["startedAt"] == started
    assert cgroups.pids(ctr_rel) == pids  # the same process: not restarted
    assert cs["resources"]["limits"] == {"cpu": "700m", "memory": "64Mi"}

    async def completed():
        events = await resize_events(kubectl, p)
        return events if events.get("ResizeCompleted") else None

    events = await eventually(completed, 10, what="ResizeCompleted")
    await asyncio.sleep(2)  # a repeat would come within a retry (1 s)
    events = await resize_events(kubectl, p)
    assert events.get("ResizeStarted") == 1 and events.get("ResizeCompleted") == 1, events
    assert restarted.alive


async def test_memory_increase_with_restart_container(kubectl, node, cgroups):
    name, _, _ = node
    rc = await overhead_class(kubectl)
    p = unique("p-rst")
    await kubectl.apply(resize_pod(p, name, rc, policy="RestartContainer"))
    before = await eventually(lambda: running(kubectl, p), 20, what="Running")
    ctr_rel = cgroups.container_path(before, "main")
    await patch_resize(kubectl, p, "500m", "256Mi")

    async def restarted():
        obj = await kubectl.get("pod", p)
        cs = obj["status"]["containerStatuses"][0]
        if cs["restartCount"] == 1 and "running" in cs["state"] and not condition(obj, "PodResizeInProgress"):
            return obj
        return None

    await eventually(restarted, 20, what="restartCount 1, running")
    assert cgroups.read_values(ctr_rel)["memory.limit_in_bytes"] == str(256 * MI)
    assert cgroups.read_values(cgroups.pod_path(before))["memory.limit_in_bytes"] == str(376 * MI)


async def test_cgroups_watch_shows_a_resize(kubectl, node, cgroups):
    name, _, state = node
    rc = await overhead_class(kubectl)
    p = unique("p-watch")
    await kubectl.apply(resize_pod(p, name, rc))
    await eventually(lambda: running(kubectl, p), 20, what="Running")
    config = state.parent / "watch.toml"
    config.write_text(CONFIG)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "cgroups", "--watch", f"default/{p}",
        "--state-dir", str(state), "--config", str(config),
        stdout=asyncio.subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []

    async def read_until(text: str) -> str:
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().rstrip()
            assert line, "the watch ended"
            lines.append(line)
            if text in line:
                return line

    try:
        first = await read_until(" main ")  # after the Pod cgroup's line
        assert " (pod) " in lines[0] and "cfs=75000/100000 (750m)" in lines[0]  # 500m + 250m
        assert "cfs=50000/100000 (500m)" in first and "memory=134217728 (128Mi)" in first
        await patch_resize(kubectl, p, "1", "256Mi")
        await read_until("cfs=125000/100000")  # the Pod cgroup, overhead included
        await read_until("cfs=100000/100000")  # the container
    finally:
        proc.terminate()
        await proc.wait()
    print("\n" + "\n".join(lines))
    changed = [line for line in lines[2:] if f"default/{p} " in line]
    assert changed and all(re.match(r"\d\d:\d\d:\d\d\.\d{3}  ", line) for line in lines)
    assert any("(pod)" in line and "memory=394264576 (376Mi)" in line for line in changed)  # 256Mi + 120Mi
