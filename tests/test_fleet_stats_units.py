"""A fleet node's /stats/summary and /metrics/resource (agent/fleet/stats.py): its emulated Pods'
usage summed per Pod and per node, without a cluster."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from agent.fleet import stats as fleet_stats
from agent.fleet.stats import FleetStats, NodeStats
from agent.stats.collector import pod_targets
from agent.stats.summary import summary_json

MiB = 1 << 20
GiB = 1 << 30
STARTED = datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)
T0 = STARTED.timestamp()


def worker(name: str, containers: dict[str, tuple[int, int] | None], annotations: dict | None = None) -> Any:
    """A started emulated Pod; `containers` maps each name to its profile usage (millicores, bytes)."""
    pod = {"metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}", "annotations": annotations or {}}}
    handles = {
        c: SimpleNamespace(
            started_at=STARTED, id=f"emulated://{name}-{c}", image="img", extra={"usage": usage} if usage else {}
        )
        for c, usage in containers.items()
    }
    return SimpleNamespace(
        pod=pod,
        key=f"default/{name}",
        backend=SimpleNamespace(name="emulated"),
        sandbox=SimpleNamespace(netns=None),
        gone=False,
        handles=handles,
        rec=SimpleNamespace(start_time=STARTED),
    )


def controller(name: str, *workers: Any, memory: int = 8 * GiB) -> Any:
    facts = SimpleNamespace(host=SimpleNamespace(memory_bytes=memory))
    return SimpleNamespace(
        node=SimpleNamespace(name=name, facts=facts),
        workers={w.pod["metadata"]["uid"]: w for w in workers},
        cgroups=None,  # a fleet's controllers have none
    )


ANNOTATIONS = {"emulated.kubelet-emu.io/cpu-usage": "1", "emulated.kubelet-emu.io/memory-usage": "64Mi"}


def three_pods() -> Any:
    return controller(
        "f-0",
        worker("web", {"app": (250, 160 * MiB), "side": (50, 20 * MiB)}),
        worker("annotated", {"main": (250, 160 * MiB)}, ANNOTATIONS),
        worker("quiet", {"main": None}),
    )


def by_name(summary: dict) -> dict[str, dict]:
    return {p["podRef"]["name"]: p for p in summary["pods"]}


def test_pods_report_their_plan_and_the_node_their_sum():
    ctl = three_pods()
    snapshot = NodeStats("f-0", T0).build(pod_targets(ctl, Path("/unused")), 8 * GiB, T0 + 10)
    summary = summary_json(snapshot)
    pods = by_name(summary)
    web_ = pods["web"]
    assert web_["cpu"]["usageNanoCores"] == 300_000_000
    assert web_["cpu"]["usageCoreNanoSeconds"] == 3_000_000_000  # 300m for 10 s
    assert web_["memory"]["workingSetBytes"] == 180 * MiB
    assert [c["cpu"]["usageNanoCores"] for c in web_["containers"]] == [250_000_000, 50_000_000]
    # The Pod's annotations override the handler profile.
    assert pods["annotated"]["cpu"]["usageNanoCores"] == 1_000_000_000
    assert pods["annotated"]["memory"]["workingSetBytes"] == 64 * MiB
    # No usage at all: the Pod is listed without cpu/memory, as the kubelet lists one it has no stats for.
    assert "cpu" not in pods["quiet"] and "cpu" not in pods["quiet"]["containers"][0]
    node = summary["node"]
    assert node["nodeName"] == "f-0" and node["startTime"] == "2026-01-01T00:00:00Z"
    assert node["cpu"]["usageNanoCores"] == 1_300_000_000
    assert node["cpu"]["usageCoreNanoSeconds"] == 13_000_000_000
    assert node["memory"]["workingSetBytes"] == node["memory"]["usageBytes"] == 244 * MiB
    assert node["memory"]["availableBytes"] == 8 * GiB - 244 * MiB
    # Nothing of the host: no fs, network, rlimit or systemContainers.
    assert set(node) == {"nodeName", "startTime", "cpu", "memory"}


def test_a_node_without_pods_reports_zero():
    snapshot = NodeStats("f-1", T0).build([], None, T0 + 1)
    node = summary_json(snapshot)["node"]
    assert node["cpu"]["usageNanoCores"] == 0 and node["cpu"]["usageCoreNanoSeconds"] == 0
    assert node["memory"]["workingSetBytes"] == 0 and "availableBytes" not in node["memory"]


def test_node_cpu_counter_never_goes_back_when_pods_leave():
    ctl = three_pods()
    state = NodeStats("f-0", T0)
    first = state.build(pod_targets(ctl, Path()), None, T0 + 10).node.usage
    assert first is not None and first.counters.cpu_usage_ns == 13_000_000_000
    del ctl.workers["uid-web"]  # 3 s of CPU gone with it
    second = state.build(pod_targets(ctl, Path()), None, T0 + 20).node.usage
    assert second is not None
    # The remaining Pod's 1.0 core for 20 s, plus what the gone one had used by the last snapshot.
    assert second.counters.cpu_usage_ns == 20_000_000_000 + 3_000_000_000
    assert second.nanocores == 1_000_000_000
    ctl.workers["uid-annotated"].gone = True
    third = state.build(pod_targets(ctl, Path()), None, T0 + 30).node.usage
    assert third is not None and third.counters.cpu_usage_ns == 23_000_000_000 and third.nanocores == 0


def test_a_snapshot_serves_a_node_for_max_age_and_nodes_are_apart():
    stats = FleetStats(Path("/unused"), max_age=60)
    a, b = three_pods(), controller("f-1", worker("solo", {"main": (100, MiB)}))
    calls: list[int] = []

    def render(snapshot: Any) -> bytes:
        calls.append(1)
        return json.dumps(summary_json(snapshot)).encode()

    first = stats.rendered(a, "summary", render)
    assert stats.rendered(a, "summary", render) is first and len(calls) == 1
    other = json.loads(stats.rendered(b, "summary", render))
    assert other["node"]["nodeName"] == "f-1" and [p["podRef"]["name"] for p in other["pods"]] == ["solo"]
    assert other["node"]["cpu"]["usageNanoCores"] == 100_000_000
    stats.max_age = 0  # stale: a new snapshot, rendered again
    assert json.loads(stats.rendered(a, "summary", render))["node"]["nodeName"] == "f-0" and len(calls) == 3
    stats.forget("f-1")
    assert "f-1" not in stats._nodes


async def test_routes_follow_the_node_asked():
    nodes = {"f-0": three_pods(), "f-1": controller("f-1")}
    ctx = SimpleNamespace(controller=None, node_name="")

    @web.middleware
    async def pick(request: web.Request, handler: Any) -> web.StreamResponse:
        ctx.controller = nodes[request.headers["X-Node"]]  # the fleet routes by local port
        ctx.node_name = ctx.controller.node.name
        return await handler(request)

    app = web.Application(middlewares=[pick])
    stats = FleetStats(Path("/unused"))
    fleet_stats.add_routes(app, ctx, stats)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/stats/summary", headers={"X-Node": "f-0"})
        assert resp.status == 200 and resp.content_type == "application/json"
        summary = await resp.json()
        assert len(summary["pods"]) == 3 and "network" not in summary["pods"][0]
        resp = await client.get("/stats/summary?only_cpu_and_memory=true", headers={"X-Node": "f-1"})
        assert (await resp.json())["node"]["nodeName"] == "f-1"
        resp = await client.get("/metrics/resource", headers={"X-Node": "f-0"})
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    (node_cpu,) = families["node_cpu_usage_seconds"].samples
    assert node_cpu.value > 0 and node_cpu.timestamp is not None
    pods = {s.labels["pod"]: s.value for s in families["pod_memory_working_set_bytes"].samples}
    assert pods == {"web": 180 * MiB, "annotated": 64 * MiB}
    containers = {(s.labels["pod"], s.labels["container"]) for s in families["container_cpu_usage_seconds"].samples}
    assert containers == {("web", "app"), ("web", "side"), ("annotated", "main")}
    assert [s.value for s in families["resource_scrape_error"].samples] == [0]
