"""Issue 2: the agent joins the real control plane as a Node and keeps it alive."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import condition, delete_node, eventually

from agent.hostinfo import address_toward

pytestmark = pytest.mark.cluster

CONFIG = """
default_runtime = "fast"
[node]
labels = { "example.com/pool" = "blue" }
taints = [{ key = "example.com/dedicated", value = "emu", effect = "NoSchedule" }]
max_pods = 250
[node.reserved]
cpu = "500m"
memory = "256Mi"
[runtimes.fast]
backend = "emulated"
[runtimes.slow]
backend = "emulated"
"""


async def node_ready(kubectl, name):
    node = await kubectl.get("node", name)
    ready = condition(node, "Ready") if node else None
    return node if ready and ready["status"] == "True" else None


async def test_node_registers_ready_with_labels_capacity_addresses(kubectl, start_agent):
    name = "emu-register"
    await delete_node(kubectl, name)
    agent = await start_agent(name, CONFIG)
    node = await eventually(lambda: node_ready(kubectl, name), 20, what="node Ready")

    labels = node["metadata"]["labels"]
    assert labels["kubernetes.io/hostname"] == name
    assert labels["kubernetes.io/os"] == "linux"
    assert labels["kubernetes.io/arch"] in ("amd64", "arm64")
    assert labels["example.com/pool"] == "blue"
    assert labels["runtime.kubelet-emu.io/fast"] == "true"
    assert labels["runtime.kubelet-emu.io/slow"] == "true"
    assert {"key": "example.com/dedicated", "value": "emu", "effect": "NoSchedule"} in node["spec"]["taints"]

    status = node["status"]
    assert status["capacity"]["pods"] == "250"
    assert int(status["capacity"]["cpu"]) >= 1
    assert status["capacity"]["memory"].endswith("Ki")
    cap_cpu = int(status["capacity"]["cpu"]) * 1000
    assert status["allocatable"]["cpu"] == f"{cap_cpu - 500}m"
    cap_mem = int(status["capacity"]["memory"][:-2])
    assert status["allocatable"]["memory"] == f"{cap_mem - 256 * 1024}Ki"
    addresses = {a["type"]: a["address"] for a in status["addresses"]}
    # The address that routes to this API server; for one on loopback, the host's outgoing address
    # (the API server will not proxy to a loopback node address).
    assert addresses["InternalIP"] == address_toward(kubectl.cluster.server)
    assert addresses["Hostname"]
    info = status["nodeInfo"]
    assert info["kubeletVersion"].startswith("kubelet-emu/")
    assert info["operatingSystem"] == "linux" and info["kernelVersion"]
    assert status["daemonEndpoints"]["kubeletEndpoint"]["Port"] == 10250
    for ctype in ("MemoryPressure", "DiskPressure", "PIDPressure"):
        assert condition(node, ctype)["status"] == "False"
    handlers = {h["name"] for h in status["runtimeHandlers"]}
    assert handlers == {"", "fast", "slow"}

    table = await kubectl("get", "nodes", name, "-o", "wide")
    assert " Ready " in table and "kubelet-emu/" in table
    assert agent.alive


async def test_lease_renewed_at_least_every_10s(kubectl, start_agent):
    name = "emu-lease"
    await delete_node(kubectl, name)
    await start_agent(name)
    await eventually(lambda: node_ready(kubectl, name), 20, what="node Ready")
    lease = await eventually(lambda: kubectl.get("lease", "-n", "kube-node-lease", name), 15, what="lease")
    assert lease["spec"]["holderIdentity"] == name
    assert lease["spec"]["leaseDurationSeconds"] == 40
    assert lease["metadata"]["ownerReferences"][0]["kind"] == "Node"

    seen: list[datetime] = []
    end = time.monotonic() + 32  # three periods and a bit: enough to see the rhythm
    while time.monotonic() < end:
        lease = await kubectl.get("lease", "-n", "kube-node-lease", name)
        renew = datetime.fromisoformat(lease["spec"]["renewTime"].replace("Z", "+00:00"))
        if not seen or renew != seen[-1]:
            seen.append(renew)
        await asyncio.sleep(1)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(seen)]
    assert len(seen) >= 3, seen
    assert max(gaps) <= 11.0, gaps  # 10 s period plus request latency


async def test_sigkill_makes_node_unknown_and_restart_recovers(kubectl, start_agent, tmp_path: Path):
    name = "emu-lifecycle"
    await delete_node(kubectl, name)
    state = tmp_path / "state"
    agent = await start_agent(name, state_dir=state)
    await eventually(lambda: node_ready(kubectl, name), 20, what="node Ready")

    agent.kill(signal.SIGKILL)
    await agent.wait(5)

    async def unknown_and_tainted():
        node = await kubectl.get("node", name)
        ready = condition(node, "Ready")
        # NoSchedule always; NoExecute too unless every node of the zone is down (the
        # controller then enters its "full disruption" mode and stops evicting).
        taints = {t["key"] for t in node["spec"].get("taints") or []}
        if ready["status"] == "Unknown" and "node.kubernetes.io/unreachable" in taints:
            return node
        return None

    # node-monitor-grace-period is 20 s in the test cluster (50 s by default).
    node = await eventually(unknown_and_tainted, 60, interval=1, what="Ready=Unknown and unreachable taint")
    ready = condition(node, "Ready")
    assert ready["reason"] == "NodeStatusUnknown"
    assert "stopped posting node status" in ready["message"]

    await start_agent(name, state_dir=state)

    async def recovered():
        node = await node_ready(kubectl, name)
        if not node:
            return None
        taints = {t["key"] for t in node["spec"].get("taints") or []}
        return node if "node.kubernetes.io/unreachable" not in taints else None

    await eventually(recovered, 40, interval=1, what="node Ready again without the unreachable taint")


async def test_agent_runs_with_node_identity_not_admin(kubectl, start_agent, cluster):
    """NodeRestriction is on: a node identity may not act as another node."""
    name = "emu-identity"
    await delete_node(kubectl, name)
    agent = await start_agent(name)
    await eventually(lambda: node_ready(kubectl, name), 20, what="node Ready")
    # The node identity cannot read Secrets at large, as admin could.
    from devcluster import manage

    kubeconfig = await manage.node_kubeconfig(cluster.dir, name)
    argv, env = manage.kubectl_argv(cluster, ["auth", "can-i", "list", "secrets", "-A"])
    env["KUBECONFIG"] = str(kubeconfig)
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert out.decode().strip().startswith("no")
    assert agent.alive


async def test_wrong_identity_is_forbidden_one_line_and_retries(kubectl, start_agent, cluster):
    from devcluster import manage

    other = await manage.node_kubeconfig(cluster.dir, "emu-someone-else")
    agent = await start_agent("emu-impostor", kubeconfig=other)

    async def said_forbidden():
        return "forbids this for node emu-impostor" in agent.log

    await eventually(said_forbidden, 15, what="the Forbidden line")
    await asyncio.sleep(3)
    assert agent.alive, "the agent must retry, not die"
    assert agent.log.count("forbids this for node") == 1, "said once, not on every retry"
    assert await kubectl.get("node", "emu-impostor") is None


async def test_sigterm_exits_cleanly_within_5s(kubectl, start_agent):
    name = "emu-sigterm"
    agent = await start_agent(name)
    await eventually(lambda: node_ready(kubectl, name), 20, what="node Ready")
    started = time.monotonic()
    agent.kill(signal.SIGTERM)
    code = await agent.wait(5)
    assert code == 0
    assert time.monotonic() - started < 5
    assert "stopping" in agent.log


async def test_unreachable_api_server_retries(start_agent, tmp_path: Path, cluster):
    kubeconfig = tmp_path / "dead.kubeconfig"
    text = cluster.admin_kubeconfig.read_text()
    port = cluster.server.rsplit(":", 1)[1]
    kubeconfig.write_text(text.replace(f"127.0.0.1:{port}", "127.0.0.1:1"))
    agent = await start_agent("emu-unreachable", kubeconfig=kubeconfig)
    await eventually(lambda: asyncio.sleep(0, "API server unreachable" in agent.log), 10, what="unreachable line")
    await asyncio.sleep(3)
    assert agent.alive
    assert agent.log.count("API server unreachable") == 1


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "file not found"),
        ("{{{ not yaml", "kubeconfig"),
        ("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n", "kubeconfig"),
    ],
)
async def test_bad_kubeconfig_one_clear_line(start_agent, tmp_path: Path, content, expected):
    path = tmp_path / "bad.kubeconfig"
    if content is not None:
        path.write_text(content)
    agent = await start_agent("emu-badconfig", kubeconfig=path)
    code = await agent.wait(15)
    assert code == 2
    lines = [line for line in agent.log.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("kubelet-emu: kubeconfig ") and str(path) in lines[0] and expected in lines[0]
