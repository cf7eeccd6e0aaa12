"""Issue 21: in-place resize of a Pod run by real runc (real cluster, registry, cgroups).

The container's cgroup is changed through `runc update` (runc's own record of the container
follows), the Pod cgroup through the agent, in the kubelet's order, overhead included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import Kubectl, condition, delete_node_pods, eventually, ready_node
from helpers import unique

from devcluster import manage

pytest_plugins = ["registry_fixture"]
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(os.geteuid() != 0, reason="runc and pod cgroups need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed (Debian package runc)"),
]

CGROUP_ROOT = f"kubelet-emu-test-{uuid.uuid4().hex[:6]}"
MI = 2**20
REPO = Path(__file__).resolve().parent.parent


def config(runc_root: Path) -> str:
    return f"""
[node]
cgroup_root = "{CGROUP_ROOT}"
[runtimes.isolated]
backend = "oci"
runtime_path = "{shutil.which("runc")}"
runtime_root = "{runc_root}"
"""


@pytest.fixture(scope="module")
async def runtime_class(cluster):
    name = unique("rc-rsz-oci")
    kubectl = Kubectl(cluster)
    await kubectl.apply(
        f"apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {{name: {name}}}\nhandler: isolated\n"
        "overhead: {podFixed: {cpu: 250m, memory: 120Mi}}\n"
    )
    yield name
    await kubectl.run("delete", "runtimeclass", name, check=False)


@pytest.fixture
async def node(kubectl, start_agent, tmp_path, cgroups, runtime_class):
    name = unique("emu-rszo")
    runc_root = tmp_path / "runc"
    (tmp_path / "agent.toml").write_text(config(runc_root))
    agent = await ready_node(kubectl, start_agent, name, config(runc_root), tmp_path / "state")
    yield name, runc_root
    await delete_node_pods(kubectl, name)
    await agent.stop()


def resize_pod(name: str, node: str, rc: str, image: str, policy: str = "NotRequired") -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "nodeName": node, "runtimeClassName": rc, "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main", "image": image, "command": ["sleep", "3600"],
                "resizePolicy": [{"resourceName": "cpu", "restartPolicy": "NotRequired"},
                                 {"resourceName": "memory", "restartPolicy": policy}],
                "resources": {"requests": {"cpu": "500m", "memory": "128Mi"},
                              "limits": {"cpu": "500m", "memory": "128Mi"}},
            }],
        },
    })  # fmt: skip


async def running(kubectl, name):
    obj = await kubectl.get("pod", name)
    return obj if obj and obj["status"].get("phase") == "Running" else None


async def patch_resize(kubectl, name: str, cpu: str, memory: str) -> float:
    res = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}
    body = json.dumps({"spec": {"containers": [{"name": "main", "resources": res}]}})
    start = time.monotonic()
    await kubectl("patch", "pod", name, "--subresource", "resize", "--type", "strategic", "-p", body)
    return start


class ConditionWatch:
    """`kubectl get pod -w -o json`: the condition types of each version of the Pod."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc

    async def stop(self) -> list[str]:
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        out, _ = await self.proc.communicate()
        text, seen, decoder, at = out.decode(), [], json.JSONDecoder(), 0
        while (at := text.find("{", at)) >= 0:  # a stream of JSON objects, one per version
            obj, at = decoder.raw_decode(text, at)
            seen.append(" ".join(c["type"] for c in obj["status"].get("conditions") or []))
        return seen


async def watch_conditions(kubectl: Kubectl, name: str) -> ConditionWatch:
    argv, env = manage.kubectl_argv(kubectl.cluster, ["get", "pod", name, "-w", "-o", "json"])
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.PIPE)
    await asyncio.sleep(1)  # the watch is established (the first object is the current Pod)
    return ConditionWatch(proc)


def runc_state(runc_root: Path, container_id: str) -> dict:
    """runc's own record of the container (what `runc update` changes besides the files)."""
    return json.loads((runc_root / container_id / "state.json").read_text())


async def test_runc_cpu_and_memory_increase_in_place(kubectl, node, cgroups, runtime_class, busybox_ref):
    name, runc_root = node
    p = unique("rsz-runc")
    await kubectl.apply(resize_pod(p, name, runtime_class, busybox_ref))
    before = await eventually(lambda: running(kubectl, p), 60, what="Running")
    pod_rel, ctr_rel = cgroups.pod_path(before), cgroups.container_path(before, "main")
    assert cgroups.read_values(pod_rel)["cpu.cfs_quota_us"] == "75000"  # 500m + 250m overhead
    assert cgroups.read_values(ctr_rel)["cpu.cfs_quota_us"] == "50000"
    pids = cgroups.pids(ctr_rel)
    assert pids, "no process in the runc container's cgroup"
    cs = before["status"]["containerStatuses"][0]
    started, container_id = cs["state"]["running"]["startedAt"], cs["containerID"].removeprefix("oci://")

    # A watch from before the patch: the conditions the agent writes while it applies the resize.
    watch = await watch_conditions(kubectl, p)
    # ...and `kubelet-emu cgroups --watch`, as a user would follow it.
    tmp = runc_root.parent
    cgroups_watch = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "cgroups", "--watch", f"default/{p}", "--state-dir", str(tmp / "state"),
        "--config", str(tmp / "agent.toml"), stdout=asyncio.subprocess.PIPE, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert cgroups_watch.stdout is not None
    printed = [(await asyncio.wait_for(cgroups_watch.stdout.readline(), 20)).decode() for _ in range(2)]
    start = await patch_resize(kubectl, p, "1", "256Mi")

    async def applied():
        return cgroups.read_values(ctr_rel)["cpu.cfs_quota_us"] == "100000" or None

    await eventually(applied, 15, interval=0.02, what="the new container quota")
    print(f"\nrunc: resize patch -> container cgroup cpu quota: {(time.monotonic() - start) * 1000:.0f} ms")
    values = cgroups.read_values(pod_rel)
    assert values["cpu.cfs_quota_us"] == "125000"  # 1 + 250m overhead
    assert values["memory.limit_in_bytes"] == str(376 * MI)  # 256Mi + 120Mi
    ctr = cgroups.read_values(ctr_rel)
    assert ctr["memory.limit_in_bytes"] == str(256 * MI)
    resources = runc_state(runc_root, container_id)["config"]["cgroups"]
    assert resources["memory"] == 256 * MI and resources["cpu_quota"] == 100000

    async def settled():
        obj = await kubectl.get("pod", p)
        if condition(obj, "PodResizeInProgress") or condition(obj, "PodResizePending"):
            return None
        return obj if obj["status"].get("observedGeneration") == obj["metadata"]["generation"] else None

    after = await eventually(settled, 15, what="conditions cleared, observedGeneration")
    cs = after["status"]["containerStatuses"][0]
    assert cs["allocatedResources"] == {"cpu": "1", "memory": "256Mi"}
    assert cs["resources"] == {"requests": {"cpu": "1", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}}
    assert cs["restartCount"] == 0 and cs["state"]["running"]["startedAt"] == started
    assert cs["containerID"] == f"oci://{container_id}"
    assert cgroups.pids(ctr_rel) == pids  # the same process: nothing restarted
    cgroups_watch.terminate()
    printed += (await cgroups_watch.communicate())[0].decode().splitlines(keepends=True)
    print("kubelet-emu cgroups --watch:\n" + "".join(printed))
    assert "main  cpu.shares=512 cfs=50000/100000 (500m) memory=134217728 (128Mi)" in printed[1], printed
    assert "cfs=100000/100000 (1) memory=268435456 (256Mi)" in printed[-1], printed
    seen = await watch.stop()
    print("conditions seen by a watch:", *seen, sep="\n  ")
    assert any("PodResizeInProgress" in line for line in seen), seen  # appeared, then cleared
    assert "PodResizeInProgress" not in seen[-1]


async def test_runc_memory_increase_with_restart_container(kubectl, node, cgroups, runtime_class, busybox_ref):
    name, runc_root = node
    p = unique("rsz-runc-rst")
    await kubectl.apply(resize_pod(p, name, runtime_class, busybox_ref, policy="RestartContainer"))
    before = await eventually(lambda: running(kubectl, p), 60, what="Running")
    ctr_rel = cgroups.container_path(before, "main")
    old_id = before["status"]["containerStatuses"][0]["containerID"]
    await patch_resize(kubectl, p, "500m", "256Mi")

    async def restarted():
        obj = await kubectl.get("pod", p)
        cs = obj["status"]["containerStatuses"][0]
        if cs["restartCount"] == 1 and "running" in cs["state"] and not condition(obj, "PodResizeInProgress"):
            return cs
        return None

    cs = await eventually(restarted, 30, what="restartCount 1, running")
    assert cs["containerID"] != old_id  # a new runc container, created with the allocated values
    assert cgroups.read_values(ctr_rel)["memory.limit_in_bytes"] == str(256 * MI)
    assert runc_state(runc_root, cs["containerID"].removeprefix("oci://"))["config"]["cgroups"]["memory"] == 256 * MI
    assert cgroups.read_values(cgroups.pod_path(before))["memory.limit_in_bytes"] == str(376 * MI)
    assert cs["resources"]["limits"] == {"cpu": "500m", "memory": "256Mi"}
