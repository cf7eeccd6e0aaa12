"""A fleet's nodes serve /stats/summary and /metrics/resource, so metrics-server and `kubectl top`
work on a fleet: a 3-node fleet whose handler profile plays 250m and 160Mi per container, against
the real control plane, read through the API server's node proxy as metrics-server does.

Numbers for the record (pytest -s): a fleet node's /stats/summary response time and size, on its
kubelet port.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from conftest import eventually
from prometheus_client.parser import text_string_to_metric_families
from test_fleet import Fleet, ready_status

from devcluster import manage
from devcluster import metrics_server as ms
from devcluster.fleet_credential import fleet_kubeconfig

pytestmark = pytest.mark.cluster

FLEET = "tfs"
NODES = [f"{FLEET}-{i}" for i in range(3)]
MiB = 1 << 20
GiB = 1 << 30
CONFIG = f"""
default_runtime = "busy"
events = "warnings"

[runtimes.busy]
backend = "emulated"

[runtimes.busy.options]
cpu_usage = "250m"
memory_usage = "160Mi"

[fleet]
name = "{FLEET}"
count = 3
node_name = "{FLEET}-{{index}}"
capacity = {{ cpu = "4", memory = "8Gi" }}
"""

# name -> (node, containers, annotations); what each Pod and node should report (millicores, bytes).
PODS: dict[str, tuple[str, list[str], dict[str, str]]] = {
    f"{FLEET}-web": (NODES[0], ["app", "side"], {}),
    f"{FLEET}-one": (NODES[0], ["main"], {}),
    f"{FLEET}-big": (
        NODES[1],
        ["main"],
        {"emulated.kubelet-emu.io/cpu-usage": "1", "emulated.kubelet-emu.io/memory-usage": "64Mi"},
    ),
}
POD_USAGE = {f"{FLEET}-web": (500, 320 * MiB), f"{FLEET}-one": (250, 160 * MiB), f"{FLEET}-big": (1000, 64 * MiB)}
NODE_USAGE = {NODES[0]: (750, 480 * MiB), NODES[1]: (1000, 64 * MiB), NODES[2]: (0, 0)}


def host_ip() -> str | None:
    try:
        return ms.host_address()
    except ms.MetricsServerError:
        return None


def pod_manifest(name: str, node: str, containers: list[str], annotations: dict[str, str]) -> str:
    meta = {"name": name, "labels": {"fleet-stats": FLEET}, "annotations": annotations}
    spec = {
        "nodeName": node,
        "terminationGracePeriodSeconds": 0,
        "containers": [{"name": c, "image": "registry.invalid/app"} for c in containers],
    }
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec})


@pytest.fixture(scope="module")
async def fleet(cluster: manage.Cluster, kubectl, tmp_path_factory) -> AsyncIterator[Fleet]:
    ip = host_ip()
    if ip is None:
        pytest.skip("this host has no non-loopback address: the API server will not proxy to a loopback node")
    f = Fleet(tmp_path_factory.mktemp("fleet-stats"), await fleet_kubeconfig(cluster, "stats"))
    f.config.write_text(CONFIG)
    await f.start("--node-ip", ip)

    async def ready() -> bool:
        nodes = (await kubectl.json("get", "nodes", "-l", f"kubelet-emu.io/fleet={FLEET}"))["items"]
        return len(nodes) == len(NODES) and all(ready_status(n) == "True" for n in nodes)

    try:
        await eventually(ready, 60, interval=1, what="3 fleet nodes Ready")
        for name, (node, containers, annotations) in PODS.items():
            await kubectl.apply(pod_manifest(name, node, containers, annotations))

        async def running() -> bool:
            pods = (await kubectl.json("get", "pods", "-l", f"fleet-stats={FLEET}"))["items"]
            return len(pods) == len(PODS) and all(p["status"].get("phase") == "Running" for p in pods)

        await eventually(running, 60, interval=1, what="the Pods Running")
        yield f
    finally:
        await kubectl.run("delete", "pods", "-l", f"fleet-stats={FLEET}", "--force", "--grace-period=0", check=False)
        await f.stop()
        await kubectl.run("delete", "nodes", "-l", f"kubelet-emu.io/fleet={FLEET}", "--wait=false", check=False)


async def proxy_get(kubectl, node: str, path: str) -> str:
    return await kubectl("get", "--raw", f"/api/v1/nodes/{node}/proxy{path}")


def by_name(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["podRef"]["name"]: p for p in summary["pods"]}


def close(value: float, want: float, within: float = 0.02) -> bool:
    return abs(value - want) <= within * want


async def test_summary_through_the_api_server_reports_the_pods_and_their_sum(fleet, kubectl):
    first = json.loads(await proxy_get(kubectl, NODES[0], "/stats/summary"))
    assert first["node"]["nodeName"] == NODES[0]
    pods = by_name(first)
    assert set(pods) == {f"{FLEET}-web", f"{FLEET}-one"}  # only this node's
    for name, pod in pods.items():
        millis, memory = POD_USAGE[name]
        assert pod["cpu"]["usageNanoCores"] == millis * 1_000_000
        assert pod["memory"]["workingSetBytes"] == memory
        for c in pod["containers"]:
            assert c["cpu"]["usageNanoCores"] == 250_000_000 and c["memory"]["workingSetBytes"] == 160 * MiB
    node = first["node"]
    assert node["cpu"]["usageNanoCores"] == 750_000_000
    assert node["memory"]["workingSetBytes"] == 480 * MiB
    assert node["memory"]["availableBytes"] == 8 * GiB - 480 * MiB  # the node's capacity, not the host's
    assert node["cpu"]["usageCoreNanoSeconds"] == sum(p["cpu"]["usageCoreNanoSeconds"] for p in pods.values())
    assert "fs" not in node and "network" not in node  # nothing read from the host

    # Cumulative CPU grows at the played rate.
    await asyncio.sleep(2.5)
    second = json.loads(await proxy_get(kubectl, NODES[0], "/stats/summary?only_cpu_and_memory=true"))
    grown = second["node"]["cpu"]["usageCoreNanoSeconds"] - node["cpu"]["usageCoreNanoSeconds"]
    assert 0.75e9 * 1.0 <= grown <= 0.75e9 * 6  # at least the 2.5 s slept, at most 1 s snapshot reuse + slack
    assert set(second["node"]) == {"nodeName", "startTime", "cpu", "memory"}

    other = json.loads(await proxy_get(kubectl, NODES[1], "/stats/summary"))
    assert [p["podRef"]["name"] for p in other["pods"]] == [f"{FLEET}-big"]  # the annotations win over the profile
    assert other["node"]["cpu"]["usageNanoCores"] == 1_000_000_000
    assert other["node"]["memory"]["workingSetBytes"] == 64 * MiB
    empty = json.loads(await proxy_get(kubectl, NODES[2], "/stats/summary"))
    assert empty["pods"] == [] and empty["node"]["cpu"]["usageNanoCores"] == 0


async def test_metrics_resource_through_the_api_server(fleet, kubectl):
    text = await proxy_get(kubectl, NODES[0], "/metrics/resource")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    (node_cpu,) = families["node_cpu_usage_seconds"].samples
    (node_memory,) = families["node_memory_working_set_bytes"].samples
    assert node_cpu.value > 0 and node_cpu.timestamp is not None and abs(float(node_cpu.timestamp) - time.time()) < 30
    assert node_memory.value == 480 * MiB
    pod_memory = {s.labels["pod"]: s.value for s in families["pod_memory_working_set_bytes"].samples}
    assert pod_memory == {f"{FLEET}-web": 320 * MiB, f"{FLEET}-one": 160 * MiB}
    pod_cpu = {s.labels["pod"] for s in families["pod_cpu_usage_seconds"].samples}
    assert pod_cpu == {f"{FLEET}-web", f"{FLEET}-one"}
    containers = {(s.labels["pod"], s.labels["container"]) for s in families["container_start_time_seconds"].samples}
    assert containers == {(f"{FLEET}-web", "app"), (f"{FLEET}-web", "side"), (f"{FLEET}-one", "main")}
    assert [s.value for s in families["resource_scrape_error"].samples] == [0]


def kubelet_client(cluster: manage.Cluster) -> aiohttp.ClientSession:
    """The admin identity straight to a fleet node's port (its certificate is self-signed)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.load_cert_chain(str(cluster.dir / "pki" / "admin.crt"), str(cluster.dir / "pki" / "admin.key"))
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))


async def test_summary_response_time_on_the_kubelet_port(fleet, kubectl, cluster):
    node = await kubectl.get("node", NODES[0])
    address = next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")
    port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
    fresh, repeat = [], []
    async with kubelet_client(cluster) as session:
        for path in ("/stats/summary", "/metrics/resource"):
            url = f"https://{address}:{port}{path}"
            for _ in range(3):
                await asyncio.sleep(1.1)  # a snapshot serves a node for 1 s: the next one is fresh
                for times in (fresh, repeat):
                    start = time.monotonic()
                    async with session.get(url) as resp:
                        body = await resp.read()
                        assert resp.status == 200, body[:200]
                    times.append(time.monotonic() - start)
            print(f"\nfleet node {path}: {len(body)} bytes, fresh {statistics.median(fresh) * 1000:.1f} ms, "
                  f"repeat {statistics.median(repeat) * 1000:.1f} ms (3 Pods)")  # fmt: skip
            fresh.clear()
            repeat.clear()


async def test_kubectl_top_shows_the_fleets_numbers(fleet, kubectl, cluster):
    await ms.start(cluster)

    said: list[str] = []

    async def top(kind: str, selector: str, names: Any) -> dict[str, list[str]] | None:
        """Rows by name, once every one of `names` has one (`kubectl top` takes one name at most)."""
        code, out, err = await kubectl.run("top", kind, "-l", selector, "--no-headers", check=False)
        said[:] = [err.strip()]
        rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
        return rows if code == 0 and all(n in rows for n in names) else None

    def log_tail() -> str:
        lines = (cluster.dir / "metrics-server.log").read_text(errors="replace").splitlines()
        return "\n".join(lines[-15:])

    try:
        pods = await eventually(
            lambda: top("pod", f"fleet-stats={FLEET}", PODS), 120, interval=2, what="kubectl top pod"
        )  # two scrapes
    except BaseException:
        print(f"\nkubectl top said: {said}\nmetrics-server log:\n{log_tail()}")
        raise
    for name, (millis, memory) in POD_USAGE.items():
        cpu, mem = pods[name]
        assert close(int(cpu.removesuffix("m")), millis), (name, pods[name])
        assert mem == f"{memory // MiB}Mi", (name, pods[name])
    nodes = await eventually(
        lambda: top("node", f"kubelet-emu.io/fleet={FLEET}", NODES), 60, interval=2, what="kubectl top node"
    )
    print(f"\nkubectl top node: {nodes}")
    # metrics-server drops a node that reports zero CPU or memory (decode.go: "Failed getting complete
    # node metric"): a fleet node without Pods has no numbers in `kubectl top`.
    assert nodes[NODES[2]][0] == "<unknown>", nodes
    for name, (millis, memory) in NODE_USAGE.items():
        if not millis:
            continue
        cpu, _, mem, _ = nodes[name]
        assert abs(int(cpu.removesuffix("m")) - millis) <= 0.02 * millis + 1, (name, nodes[name])
        assert mem == f"{memory // MiB}Mi", (name, nodes[name])
