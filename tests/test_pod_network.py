"""Issue 5, pod networking: process-backend Pods get their own namespace and an IP from the node's
pod CIDR; hostNetwork Pods keep the host's; nothing is left behind when Pods go.

Real control plane (its controller-manager allocates the node's podCIDR), real agent, real
namespaces, veths and processes. What is checked is what a user checks: the Pod's IP in kubectl,
an HTTP request to it, `ip netns` / `ip link` on the host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import subprocess
import sys
import urllib.request
import uuid

import pytest
from conftest import Kubectl, delete_node_pods, eventually, ready_node
from helpers import process_config, unique

from agent.pod_network import default_bridge
from cgroups.manager import CgroupManager, detect_mode

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(os.geteuid() != 0, reason="pod networks and the process backend need root"),
]

CGROUP_ROOT = f"kubelet-emu-test-{uuid.uuid4().hex[:6]}"
CONFIG = process_config(
    CGROUP_ROOT,
    runtimes="""[runtimes.hostnet]
backend = "process"
options = { pod_network = false }
""",
)


def pod(name: str, node: str, command: list[str], **spec: object) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "nodeName": node,
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "c", "image": "host", "command": command}],
                # Root: sys.executable may live under /root (pyenv), which the default user cannot enter.
                "securityContext": {"runAsUser": 0},
                **spec,
            },
        }
    )


def host_netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def netns_addresses(netns: str) -> str:
    return subprocess.run(["ip", "-n", netns, "addr", "show", "eth0"], capture_output=True, text=True).stdout


def bridge_ports(bridge: str) -> list[str]:
    out = subprocess.run(["ip", "-j", "link", "show", "master", bridge], capture_output=True, text=True)
    return [link["ifname"] for link in json.loads(out.stdout or "[]")] if out.returncode == 0 else []


async def pod_ip(kubectl: Kubectl, name: str) -> str | None:
    obj = await kubectl.get("pod", name)
    status = (obj or {}).get("status") or {}
    return status.get("podIP") if status.get("phase") == "Running" else None


@pytest.fixture(scope="module", autouse=True)
def cgroup_root():
    yield
    CgroupManager(detect_mode(), root=CGROUP_ROOT).remove(CGROUP_ROOT, kill=True)  # empty by now


@pytest.fixture
async def node(kubectl, start_agent, tmp_path):
    name = unique("emu-net")
    agent = await ready_node(kubectl, start_agent, name, CONFIG, tmp_path / "state")
    yield name, agent
    # This node's Pods only, with a short grace: "--all" also waited for Pods other tests left on
    # nodes that are gone (58 s in CI), and the test's shells ignore SIGTERM.
    await delete_node_pods(kubectl, name)


async def test_process_pods_get_ips_and_reach_each_other(kubectl, node):
    name, _ = node

    async def allocated() -> str | None:
        return ((await kubectl.get("node", name)) or {}).get("spec", {}).get("podCIDR")

    cidr = await eventually(allocated, 30, what="the node's podCIDR from the controller-manager")
    server = [sys.executable, "-m", "http.server", "8080", "--bind", "0.0.0.0"]
    await kubectl.apply(pod("web", name, server))
    ip = await eventually(lambda: pod_ip(kubectl, "web"), 30, what="web Running with an IP")
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(cidr)
    obj = await kubectl.get("pod", "web")
    assert obj["status"]["podIPs"] == [{"ip": ip}]
    assert obj["status"]["hostIP"] != ip

    # The host reaches the Pod by its IP (through the node bridge)...
    async def fetch() -> bytes | None:
        try:
            return await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://{ip}:8080/", timeout=2).read())
        except OSError:
            return None

    assert b"Directory listing" in await eventually(fetch, 20, what=f"HTTP answer from {ip}")
    # ...and so does another Pod, from its own namespace.
    client = [sys.executable, "-c", f"import urllib.request; urllib.request.urlopen('http://{ip}:8080/', timeout=5)"]
    await kubectl.apply(pod("client", name, client, restartPolicy="Never"))

    async def succeeded():
        obj = await kubectl.get("pod", "client")
        return obj if obj and obj["status"].get("phase") in ("Succeeded", "Failed") else None

    done = await eventually(succeeded, 30, what="client finished")
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert done["status"]["podIP"] != ip
    # The process really runs in the Pod's namespace: its eth0 holds the Pod IP.
    netns = f"emu-{obj['metadata']['uid']}"
    assert netns in host_netns()
    assert ip in netns_addresses(netns)


async def test_host_network_pods_report_the_host_ip(kubectl, node):
    """hostNetwork: true, and a handler configured with pod_network = false."""
    name, _ = node
    rc = f"emu-test-{uuid.uuid4().hex[:6]}"
    await kubectl.apply(json.dumps({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                                    "metadata": {"name": rc}, "handler": "hostnet"}))  # fmt: skip
    try:
        await kubectl.apply(pod("hostnet", name, ["sleep", "3600"], hostNetwork=True))
        await kubectl.apply(pod("nonet", name, ["sleep", "3600"], runtimeClassName=rc))
        for pod_name in ("hostnet", "nonet"):
            ip = await eventually(lambda n=pod_name: pod_ip(kubectl, n), 30, what=f"{pod_name} Running")
            obj = await kubectl.get("pod", pod_name)
            assert ip == obj["status"]["hostIP"]
            assert f"emu-{obj['metadata']['uid']}" not in host_netns()
    finally:
        await kubectl.run("delete", "runtimeclass", rc, check=False)


async def test_fifty_pods_leave_nothing_behind(kubectl, node):
    name, agent = node
    before = host_netns()
    names = [f"many-{i}" for i in range(50)]
    await kubectl.apply("\n---\n".join(pod(n, name, ["sleep", "3600"]) for n in names))

    async def all_running():
        out = await kubectl.run("get", "pods", "-o", "json")
        items = json.loads(out[1])["items"]
        ips = [p["status"].get("podIP") for p in items if p["metadata"]["name"].startswith("many-")]
        running = [p for p in items if p["status"].get("phase") == "Running"]
        return ips if len(running) >= 50 and all(ips) else None

    ips = await eventually(all_running, 120, interval=1, what="50 Pods Running")
    assert len(set(ips)) == 50  # no address handed out twice
    bridge = default_bridge(name)
    assert len(bridge_ports(bridge)) >= 50
    await delete_node_pods(kubectl, name)

    left: dict[str, int] = {}

    async def clean():
        state = json.loads((agent.state_dir / "network" / "ipam.json").read_text())
        left.update(
            netns=len({n for n in host_netns() - before if n.startswith("emu-")}),
            veths=len(bridge_ports(bridge)),
            addresses=len(state["allocations"]),
        )
        return not any(left.values())

    # Deletion returns once the Pod objects are gone; on a loaded 2-core machine the last
    # teardowns can trail it by tens of seconds.
    await eventually(clean, 60, what="no namespace, veth or address left")
    assert not any(left.values()), left


async def test_first_process_handler_added_by_sighup_brings_pod_networks(kubectl, start_agent, tmp_path):
    """An emulated-only node never loads the network code; a SIGHUP that adds a process handler
    starts the node's Pod network, and that handler's Pods get their own IPs."""
    name = unique("emu-net-hup")
    agent = await ready_node(kubectl, start_agent, name, '[runtimes.fast]\nbackend = "emulated"\n', tmp_path / "state")
    assert not (tmp_path / "state" / "network").exists()
    agent.reload(CONFIG)
    try:

        async def has_handler():
            node = await kubectl.get("node", name)
            return "procs" in {h.get("name") for h in node["status"].get("runtimeHandlers") or []}

        await eventually(has_handler, 20, what="procs handler advertised after SIGHUP")
        await kubectl.apply(pod("late", name, ["sleep", "3600"]))
        ip = await eventually(lambda: pod_ip(kubectl, "late"), 40, what="late Running with an IP")
        obj = await kubectl.get("pod", "late")
        assert ip != obj["status"]["hostIP"]
    finally:
        await delete_node_pods(kubectl, name)
