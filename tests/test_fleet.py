"""Issue 22: `kubelet-emu fleet`, 50 emulated nodes from one process, against the real control plane."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import agent_argv, agent_env, condition, eventually

from devcluster import manage
from devcluster.fleet_credential import fleet_kubeconfig

pytestmark = pytest.mark.cluster

FLEET = "t22"
SMALL, LARGE = 40, 10

CONFIG = f"""
default_runtime = "fast"
events = "warnings"

[runtimes.fast]
backend = "emulated"

[runtimes.kata]
backend = "emulated"

[fleet]
name = "{FLEET}"

[fleet.labels]
"topology.kubernetes.io/zone" = "zone-{{index % 3}}"

[fleet.groups.small]
count = {SMALL}
node_name = "{FLEET}-{{index}}"
handlers = ["fast"]
capacity = {{ cpu = "4", memory = "8Gi" }}

[fleet.groups.large]
count = {LARGE}
node_name = "{FLEET}-large-{{index}}"
capacity = {{ cpu = "32", memory = "128Gi", pods = "250" }}
labels = {{ "node.kubernetes.io/instance-type" = "large" }}
"""

RUNTIME_CLASSES = f"""
apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata: {{name: {FLEET}-kata}}
handler: kata
scheduling:
  nodeSelector: {{runtime.kubelet-emu.io/kata: "true", kubelet-emu.io/fleet: {FLEET}}}
---
apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata: {{name: {FLEET}-gvisor}}
handler: gvisor
scheduling:
  nodeSelector: {{kubelet-emu.io/fleet: {FLEET}}}
"""


class Fleet:
    """A real `kubelet-emu fleet` process."""

    def __init__(self, tmp: Path, kubeconfig: Path):
        self.tmp, self.kubeconfig = tmp, kubeconfig
        self.config = tmp / "fleet.toml"
        self.state = tmp / "state"
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self, *extra: str) -> None:
        self.starts += 1
        args = [*agent_argv(), "fleet", "--config", str(self.config), "--kubeconfig", str(self.kubeconfig)]
        args += ["--state-dir", str(self.state), *extra]
        with open(self.tmp / f"fleet-{self.starts}.log", "wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=agent_env()
            )

    @property
    def log(self) -> str:
        return (self.tmp / f"fleet-{self.starts}.log").read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None and self.proc.returncode is None, self.log
        self.proc.send_signal(sig)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def fleet_nodes(kubectl) -> list[dict[str, Any]]:
    return (await kubectl.json("get", "nodes", "-l", f"kubelet-emu.io/fleet={FLEET}"))["items"]


def ready_status(node: dict[str, Any]) -> str:
    c = condition(node, "Ready")
    return c["status"] if c else "?"


async def all_ready(kubectl, count: int) -> list[dict[str, Any]] | None:
    nodes = await fleet_nodes(kubectl)
    return nodes if len(nodes) == count and all(ready_status(n) == "True" for n in nodes) else None


@pytest.fixture(scope="module")
async def fleet(cluster: manage.Cluster, kubectl, tmp_path_factory) -> AsyncIterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    f = Fleet(tmp, await fleet_kubeconfig(cluster, "test"))
    f.config.write_text(CONFIG)
    await kubectl.apply(RUNTIME_CLASSES)
    await f.start()
    await eventually(lambda: all_ready(kubectl, SMALL + LARGE), 90, interval=1, what="50 fleet nodes Ready")
    yield f
    await f.stop()
    await kubectl.run("delete", "deployment", f"{FLEET}-web", "--ignore-not-found", "--wait=false", check=False)
    await kubectl.run("delete", "pods", "-l", f"fleet-test={FLEET}", "--force", "--grace-period=0", check=False)
    await kubectl.run("delete", "nodes", "-l", f"kubelet-emu.io/fleet={FLEET}", "--wait=false", check=False)
    await kubectl.run("delete", "runtimeclass", f"{FLEET}-kata", f"{FLEET}-gvisor", "--ignore-not-found", check=False)


async def test_fifty_nodes_ready_with_labels_handlers_and_shapes(fleet, kubectl):
    nodes = {n["metadata"]["name"]: n for n in await fleet_nodes(kubectl)}
    assert len(nodes) == SMALL + LARGE
    small, large = nodes[f"{FLEET}-7"], nodes[f"{FLEET}-large-2"]
    assert small["metadata"]["labels"]["topology.kubernetes.io/zone"] == "zone-1"  # 7 % 3
    assert large["metadata"]["labels"]["topology.kubernetes.io/zone"] == "zone-2"
    assert large["metadata"]["labels"]["node.kubernetes.io/instance-type"] == "large"
    assert "runtime.kubelet-emu.io/kata" not in small["metadata"]["labels"]
    assert small["metadata"]["labels"]["runtime.kubelet-emu.io/fast"] == "true"
    assert large["metadata"]["labels"]["runtime.kubelet-emu.io/kata"] == "true"
    assert [h["name"] for h in small["status"]["runtimeHandlers"]] == ["", "fast"]
    assert [h["name"] for h in large["status"]["runtimeHandlers"]] == ["", "fast", "kata"]
    assert small["status"]["capacity"]["cpu"] == "4" and large["status"]["capacity"]["cpu"] == "32"
    assert large["status"]["capacity"]["pods"] == "250"
    # Each node has its own Lease, renewed by the one process.
    leases = json.loads(await kubectl("get", "leases", "-n", "kube-node-lease", "-o", "json"))["items"]
    held = {lease["spec"]["holderIdentity"] for lease in leases}
    assert set(nodes) <= held
    zones = {n["metadata"]["labels"]["topology.kubernetes.io/zone"] for n in nodes.values()}
    assert zones == {"zone-0", "zone-1", "zone-2"}


async def test_deployment_spread_honours_the_runtime_class_node_selector(fleet, kubectl):
    await kubectl.apply(f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {FLEET}-web}}
spec:
  replicas: 30
  selector: {{matchLabels: {{app: {FLEET}-web}}}}
  template:
    metadata: {{labels: {{app: {FLEET}-web}}}}
    spec:
      runtimeClassName: {FLEET}-kata
      containers: [{{name: web, image: registry.invalid/web, resources: {{requests: {{cpu: '4'}}}}}}]
""")

    async def running() -> list[dict[str, Any]] | None:
        pods = (await kubectl.json("get", "pods", "-l", f"app={FLEET}-web"))["items"]
        ok = [p for p in pods if p["status"].get("phase") == "Running"]
        return ok if len(ok) == 30 else None

    pods = await eventually(running, 60, interval=1, what="30 kata Pods Running")
    used = {p["spec"]["nodeName"] for p in pods}
    # Only the large nodes have the kata handler, so only they match the RuntimeClass's nodeSelector;
    # 30 Pods of 4 CPUs need 120 CPUs: at least four of the 32-CPU large nodes, whatever the scoring.
    assert used <= {f"{FLEET}-large-{i}" for i in range(LARGE)}
    assert len(used) >= 4
    assert all(p["status"]["containerStatuses"][0]["containerID"].startswith("emulated://kata-") for p in pods)


async def test_pod_of_a_missing_handler_fails_where_it_lands(fleet, kubectl):
    await kubectl.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: {FLEET}-sandboxed, labels: {{fleet-test: {FLEET}}}}}
spec:
  runtimeClassName: {FLEET}-gvisor
  containers: [{{name: c, image: registry.invalid/c}}]
""")

    async def failed() -> dict[str, Any] | None:
        pod = await kubectl.get("pod", f"{FLEET}-sandboxed")
        return pod if pod and pod["status"].get("phase") == "Failed" else None

    pod = await eventually(failed, 30, what="Pod Failed")
    assert pod["status"]["reason"] == "RuntimeHandlerNotFound"
    node = pod["spec"]["nodeName"]
    assert node.startswith(f"{FLEET}-")
    assert f'names handler "gvisor", which node {node} does not have' in pod["status"]["message"]


async def test_a_node_made_not_ready_on_purpose(fleet, kubectl):
    node = f"{FLEET}-5"
    argv = [*agent_argv(), "fleet", "ctl", "--state-dir", str(fleet.state), "--health", "not-ready", node]
    proc = await asyncio.create_subprocess_exec(*argv, env=agent_env())
    assert await proc.wait() == 0

    async def ready_is(status: str) -> dict[str, Any] | None:
        n = await kubectl.get("node", node)
        return n if n and ready_status(n) == status else None

    n = await eventually(lambda: ready_is("False"), 20, what="node NotReady")
    assert condition(n, "Ready")["reason"] == "KubeletNotReady"
    argv[-2] = "ready"
    proc = await asyncio.create_subprocess_exec(*argv, env=agent_env())
    assert await proc.wait() == 0
    await eventually(lambda: ready_is("True"), 20, what="node Ready again")


async def test_sigkill_makes_every_node_unknown_and_a_restart_recovers_them(fleet, kubectl):
    fleet.signal(signal.SIGKILL)
    await fleet.proc.wait()

    async def all_unknown() -> list[dict[str, Any]] | None:
        nodes = await fleet_nodes(kubectl)
        return nodes if len(nodes) == SMALL + LARGE and all(ready_status(n) == "Unknown" for n in nodes) else None

    # node_monitor_grace_period is 20 s in the test cluster; the controller checks every 5 s.
    await eventually(all_unknown, 90, interval=2, what="all 50 nodes Unknown")
    await fleet.start()
    await eventually(lambda: all_ready(kubectl, SMALL + LARGE), 60, interval=1, what="all 50 Ready again")

    async def running() -> bool:
        pods = (await kubectl.json("get", "pods", "-l", f"app={FLEET}-web"))["items"]
        return len(pods) == 30 and all(p["status"].get("phase") == "Running" for p in pods)

    await eventually(running, 60, interval=1, what="the Deployment's Pods Running again")


async def test_sighup_with_a_smaller_count_drains_and_removes_nodes(fleet, kubectl):
    # A Pod on a node that is going away: drained (deleted) before the node leaves.
    await kubectl.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: {FLEET}-doomed, labels: {{fleet-test: {FLEET}}}}}
spec:
  nodeName: {FLEET}-39
  containers: [{{name: c, image: registry.invalid/c}}]
""")

    async def running() -> bool:
        pod = await kubectl.get("pod", f"{FLEET}-doomed")
        return bool(pod and pod["status"].get("phase") == "Running")

    await eventually(running, 30, what="Pod Running on the node to remove")
    fleet.config.write_text(CONFIG.replace(f"count = {SMALL}", f"count = {SMALL - 5}"))
    fleet.signal(signal.SIGHUP)
    await eventually(lambda: all_ready(kubectl, SMALL + LARGE - 5), 60, interval=1, what="45 nodes left, all Ready")
    names = {n["metadata"]["name"] for n in await fleet_nodes(kubectl)}
    assert not names & {f"{FLEET}-{i}" for i in range(SMALL - 5, SMALL)}
    assert await kubectl.get("pod", f"{FLEET}-doomed") is None
    for i in range(SMALL - 5, SMALL):
        assert await kubectl.get("lease", "-n", "kube-node-lease", f"{FLEET}-{i}") is None
    assert "node removed" in fleet.log
