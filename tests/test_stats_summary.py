"""Issue 6 (stats and metrics): cgroup parsing, CPU rates, the Summary shape, /metrics/resource and
the agent's own /metrics.

Unit tests write cgroup v1 and v2 file layouts and /proc files to a temp dir; the integration tests
at the end read a real process Pod's real (v1 on this host) cgroups and compare.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import socket
import ssl
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from agent import metrics
from agent.kubelet_api import metrics as metrics_routes
from agent.kubelet_api import stats as stats_routes
from agent.stats import emulated_usage, host, resource_metrics
from agent.stats.collector import StatsCollector
from agent.stats.rates import CpuRates
from agent.stats.summary import summary_json
from cgroups.detect import CgroupMode, detect_mode
from cgroups.manager import CgroupManager
from cgroups.stats import CgroupUsageReader, parse_meminfo, read_v1, read_v2

pytest_plugins = ["registry_fixture"]  # a local registry with busybox, for the OCI Pod

GiB = 1 << 30
MiB = 1 << 20


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return directory


def v1_files(cpu_ns: int, usage: int, inactive: int, limit: int = 9223372036854771712) -> tuple[dict, dict]:
    cpuacct = {"cpuacct.usage": f"{cpu_ns}\n"}
    memory = {
        "memory.usage_in_bytes": f"{usage}\n",
        "memory.limit_in_bytes": f"{limit}\n",
        # The local (non-total_) keys must not be used: they leave out child cgroups.
        "memory.stat": (
            f"cache 1\nrss 2\ninactive_file 3\npgfault 4\n"
            f"total_cache 100\ntotal_rss {usage // 2}\ntotal_inactive_file {inactive}\n"
            "total_pgfault 777\ntotal_pgmajfault 7\n"
        ),
        "cgroup.procs": "",
    }
    return cpuacct, memory


def v2_files(cpu_us: int, usage: int, inactive: int, limit: str = "max") -> dict:
    return {
        "cpu.stat": f"usage_usec {cpu_us}\nuser_usec 1\nsystem_usec 2\n",
        "memory.current": f"{usage}\n",
        "memory.max": f"{limit}\n",
        "memory.stat": f"anon {usage // 4}\nfile 5\ninactive_file {inactive}\npgfault 900\npgmajfault 9\n",
        "cgroup.procs": "",
    }


# --- cgroup parsing ----------------------------------------------------------------------------


def test_v1_counters_and_working_set(tmp_path):
    cpuacct, memory = v1_files(cpu_ns=5_000_000_000, usage=300 * MiB, inactive=100 * MiB, limit=512 * MiB)
    u = read_v1(str(write(tmp_path / "cpuacct", cpuacct)), str(write(tmp_path / "memory", memory)))
    assert u.cpu_usage_ns == 5_000_000_000
    assert u.memory_usage_bytes == 300 * MiB
    assert u.working_set_bytes == 200 * MiB  # usage - total_inactive_file
    assert (u.rss_bytes, u.page_faults, u.major_page_faults) == (150 * MiB, 777, 7)
    assert u.memory_limit_bytes == 512 * MiB


def test_v1_unlimited_memory_and_inactive_above_usage(tmp_path):
    cpuacct, memory = v1_files(cpu_ns=1, usage=10, inactive=50)
    u = read_v1(str(write(tmp_path / "a", cpuacct)), str(write(tmp_path / "m", memory)))
    assert u.memory_limit_bytes is None  # 9223372036854771712 means none
    assert u.working_set_bytes == 0  # never negative


def test_v2_counters_and_limits(tmp_path):
    u = read_v2(str(write(tmp_path / "pod", v2_files(cpu_us=2_500_000, usage=64 * MiB, inactive=16 * MiB))))
    assert u.cpu_usage_ns == 2_500_000_000  # usage_usec in ns
    assert (u.memory_usage_bytes, u.working_set_bytes) == (64 * MiB, 48 * MiB)
    assert (u.rss_bytes, u.page_faults, u.major_page_faults) == (16 * MiB, 900, 9)
    assert u.memory_limit_bytes is None
    limited = read_v2(str(write(tmp_path / "lim", v2_files(1, 10, 0, limit=str(128 * MiB)))))
    assert limited.memory_limit_bytes == 128 * MiB


def test_v2_root_memory_comes_from_meminfo(tmp_path):
    meminfo = write(tmp_path / "proc", {"meminfo": "MemTotal: 1000 kB\nMemFree: 250 kB\nInactive(file): 100 kB\n"})
    root = write(tmp_path / "unified", {"cpu.stat": "usage_usec 10\n", "memory.stat": "inactive_file 51200\n"})
    u = read_v2(str(root), str(meminfo / "meminfo"))
    assert u.memory_usage_bytes == 750 * 1024  # MemTotal - MemFree
    assert u.working_set_bytes == 750 * 1024 - 51200
    (root / "memory.stat").unlink()  # older kernels: no memory.stat at the root either
    u = read_v2(str(root), str(meminfo / "meminfo"))
    assert u.working_set_bytes == 650 * 1024  # Inactive(file) from meminfo


def test_v2_missing_cgroup_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_v2(str(tmp_path / "gone"))


def test_reader_resolves_paths_per_version(tmp_path):
    cpuacct, memory = v1_files(cpu_ns=42, usage=1000, inactive=10)
    write(tmp_path / "v1" / "cpuacct" / "kubepods" / "podX", cpuacct)
    write(tmp_path / "v1" / "memory" / "kubepods" / "podX", {**memory, "cgroup.procs": "12\n34\n"})
    mode = CgroupMode(1, {"cpu": str(tmp_path / "v1/cpu"), "cpuacct": str(tmp_path / "v1/cpuacct"),
                          "memory": str(tmp_path / "v1/memory")})  # fmt: skip
    reader = CgroupUsageReader(mode)
    assert reader.read("kubepods/podX").cpu_usage_ns == 42
    assert reader.pids("kubepods/podX") == [12, 34]
    assert reader.pids("kubepods/none") == []
    write(tmp_path / "v2" / "kubepods" / "podX", v2_files(7, 100, 0))
    assert (
        CgroupUsageReader(CgroupMode(2, {"unified": str(tmp_path / "v2")})).read("kubepods/podX").cpu_usage_ns == 7000
    )


def test_parse_meminfo():
    assert parse_meminfo("MemTotal:       24684096 kB\nHugePages_Total:       0\n") == {
        "MemTotal": 24684096 * 1024,
        "HugePages_Total": 0,
    }


# --- CPU rates -----------------------------------------------------------------------------------


def test_cpu_rate_needs_two_samples_a_window_apart():
    rates = CpuRates(window=1.0)
    assert rates.observe("pod", 100.0, 0) is None
    assert rates.observe("pod", 100.5, 400_000_000) is None  # too soon: no rate yet
    assert rates.observe("pod", 102.0, 1_000_000_000) == 500_000_000  # 1 s of CPU over 2 s: half a core
    assert rates.observe("pod", 102.2, 1_100_000_000) == 500_000_000  # too soon: the last rate stands
    assert rates.observe("pod", 103.0, 2_000_000_000) == 1_000_000_000  # over [102, 103]


def test_cpu_rate_restarts_when_the_counter_goes_back():
    rates = CpuRates(window=1.0)
    rates.observe("c", 0.0, 5_000_000_000)
    assert rates.observe("c", 2.0, 7_000_000_000) == 1_000_000_000
    assert rates.observe("c", 4.0, 100) is None  # a new cgroup of the same name
    assert rates.observe("c", 5.0, 250_000_100) == 250_000_000


def test_cpu_rates_forget_gone_cgroups():
    rates = CpuRates()
    for key in ("a", "b", "c"):
        rates.observe(key, 0.0, 1)
    rates.keep_only(["b"])
    assert len(rates) == 1


# --- host facts --------------------------------------------------------------------------------

NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes packets errs drop fifo frame compressed multicast|bytes packets errs drop fifo colls carrier compressed
    lo: 1000 10 0 0 0 0 0 0 1000 10 0 0 0 0 0 0
  eth0: 479211078   25355    3    0    0     0   0   0  1938161   19036    4    0    0     0       0          0
vethab12: 5 1 0 0 0 0 0 0 5 1 0 0 0 0 0 0
  ens5: 10 1 0 0 0 0 0 0 20 2 0 0 0 0 0 0
"""


def test_net_dev_skips_loopback_and_veths():
    found = host.parse_net_dev(NET_DEV)
    assert [i.name for i in found] == ["eth0", "ens5"]
    assert found[0] == host.InterfaceCounters("eth0", 479211078, 3, 1938161, 4)


def test_default_route_interface_and_proc_counters():
    route = "Iface\tDestination\tGateway\nens5\t000200C0\t00000000\neth1\t00000000\t010200C0\n"
    assert host.default_route_interface(route) == "eth1"
    assert host.default_route_interface(route.splitlines()[0]) is None
    assert host.parse_thread_count("0.26 0.31 0.47 1/92 28669\n") == 92
    assert host.parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n") == 1700000000


# --- emulated usage from annotations --------------------------------------------------------------


def test_emulated_usage_annotations():
    annotations = {
        "emulated.kubelet-emu.io/cpu-usage": "250m",
        "emulated.kubelet-emu.io/memory-usage": "64Mi",
        "emulated.kubelet-emu.io/memory-usage.side": "1Gi",
    }
    assert emulated_usage.planned_usage(annotations, "main") == (250, 64 * MiB)
    assert emulated_usage.planned_usage(annotations, "side") == (250, GiB)
    assert emulated_usage.planned_usage({}, "main") is None
    assert emulated_usage.planned_usage({"emulated.kubelet-emu.io/cpu-usage": "lots"}, "main") is None
    u = emulated_usage.synthetic_usage((250, 64 * MiB), started=1000.0, now=1010.0)
    assert u.counters.cpu_usage_ns == 2_500_000_000  # a quarter core for 10 s
    assert u.nanocores == 250_000_000
    assert u.counters.working_set_bytes == 64 * MiB


# --- the Summary from a fake node: v2 cgroups and /proc in a temp dir --------------------------


def fake_proc(root: Path) -> Path:
    return write(
        root,
        {
            "stat": "cpu  1 2 3\nbtime 1700000000\n",
            "meminfo": "MemTotal: 4194304 kB\nMemFree: 1048576 kB\n",
            "net/dev": NET_DEV,
            "net/route": "Iface\tDestination\tGateway\neth0\t00000000\t010200C0\n",
            "sys/kernel/pid_max": "4194304\n",
            "loadavg": "0.1 0.2 0.3 2/345 999\n",
        },
    )


def pod_object(name: str, uid: str, annotations: dict | None = None, limits: dict | None = None) -> dict:
    container: dict[str, Any] = {"name": "main", "image": "busybox"}
    if limits:
        container["resources"] = {"limits": limits, "requests": limits}
    return {
        "metadata": {"name": name, "namespace": "default", "uid": uid, "annotations": annotations or {},
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"containers": [container]},
    }  # fmt: skip


def worker_for(pod: dict, backend: str, started: datetime, netns: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        pod=pod,
        uid=pod["metadata"]["uid"],
        backend=SimpleNamespace(name=backend),
        sandbox=SimpleNamespace(netns=netns),
        gone=False,
        handles={
            "main": SimpleNamespace(
                started_at=started, id=f"{backend}-{pod['metadata']['uid']}-main-0", image="busybox"
            )
        },
        rec=SimpleNamespace(start_time=started, compute_phase=lambda: "Running"),
        handler_name=backend,
        _override=None,
    )


@pytest.fixture
def fake_node(tmp_path):
    """A node with one process Pod (v2 cgroups), one annotated emulated Pod and one plain emulated Pod."""
    unified = tmp_path / "cgroup"
    write(unified, {"cpu.stat": "usage_usec 9000000\n", "memory.stat": "inactive_file 0\n"})
    proc = fake_proc(tmp_path / "proc")
    manager = CgroupManager(CgroupMode(2, {"unified": str(unified)}), root="kubepods")
    started = datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC)
    real = pod_object("real", "uid-real", limits={"cpu": "1", "memory": "256Mi"})
    played = pod_object("played", "uid-played", {"emulated.kubelet-emu.io/cpu-usage": "100m",
                                                 "emulated.kubelet-emu.io/memory-usage": "10Mi"})  # fmt: skip
    plain = pod_object("plain", "uid-plain")
    pod_rel = manager.pod_path(real)
    write(unified / pod_rel, v2_files(cpu_us=3_000_000, usage=100 * MiB, inactive=20 * MiB, limit=str(256 * MiB)))
    write(unified / pod_rel / "main", v2_files(cpu_us=2_000_000, usage=90 * MiB, inactive=10 * MiB))
    write(unified / "kubepods", v2_files(cpu_us=4_000_000, usage=120 * MiB, inactive=20 * MiB))
    state = tmp_path / "state"
    logs = write(
        state / "pods" / "default_real_uid-real" / "main", {"0.log": "x" * 10000, "0.log.20260101-000000": "y"}
    )
    write(logs / "0", {"spec.json": "{}"})  # the run directory: not a log
    controller = SimpleNamespace(
        workers={
            w.uid: w
            for w in (
                worker_for(real, "process", started),
                worker_for(played, "emulated", started),
                worker_for(plain, "emulated", started),
            )
        },
        cgroups=manager,
    )
    reader = CgroupUsageReader(manager.mode, meminfo=str(proc / "meminfo"))
    collector = StatsCollector("node-1", controller, state, reader=reader, proc=str(proc))
    return SimpleNamespace(collector=collector, unified=unified, pod_rel=pod_rel, state=state, started=started,
                           controller=controller)  # fmt: skip


def by_name(summary: dict) -> dict[str, dict]:
    return {p["podRef"]["name"]: p for p in summary["pods"]}


def test_summary_shape_and_values(fake_node):
    summary = summary_json(fake_node.collector.build(fake_node.collector.targets()))
    node = summary["node"]
    assert node["nodeName"] == "node-1"
    assert node["startTime"] == "2023-11-14T22:13:20Z"  # btime 1700000000
    assert node["cpu"]["usageCoreNanoSeconds"] == 9_000_000_000
    assert "usageNanoCores" not in node["cpu"]  # one sample: no rate yet
    assert node["memory"]["usageBytes"] == 3 * GiB  # MemTotal - MemFree (v2 root)
    assert node["memory"]["availableBytes"] == 4 * GiB - 3 * GiB  # capacity - working set
    assert node["network"]["name"] == "eth0" and node["network"]["rxBytes"] == 479211078
    assert [i["name"] for i in node["network"]["interfaces"]] == ["eth0", "ens5"]
    assert node["rlimit"]["maxpid"] == 4194304 and node["rlimit"]["curproc"] == 345
    for fs in (node["fs"], node["runtime"]["imageFs"]):
        assert fs["capacityBytes"] >= fs["availableBytes"] > 0 and fs["inodes"] > 0
    assert node["systemContainers"][0]["name"] == "pods"
    assert node["systemContainers"][0]["memory"]["workingSetBytes"] == 100 * MiB

    pods = by_name(summary)
    assert set(pods) == {"real", "played", "plain"}
    real = pods["real"]
    assert real["podRef"] == {"name": "real", "namespace": "default", "uid": "uid-real"}
    assert real["startTime"] == "2026-01-01T00:00:05Z"
    assert real["cpu"]["usageCoreNanoSeconds"] == 3_000_000_000
    assert real["memory"]["workingSetBytes"] == 80 * MiB
    assert real["memory"]["availableBytes"] == 256 * MiB - 80 * MiB  # limit - working set
    (main,) = real["containers"]
    assert main["name"] == "main" and main["startTime"] == "2026-01-01T00:00:05Z"
    assert main["cpu"]["usageCoreNanoSeconds"] == 2_000_000_000
    assert main["memory"]["workingSetBytes"] == 80 * MiB
    assert "availableBytes" not in main["memory"]  # no container limit
    assert main["logs"]["inodesUsed"] == 2  # 0.log and its rotated file, not the run directory
    assert main["logs"]["usedBytes"] >= 10000
    assert real["ephemeral-storage"]["usedBytes"] == main["logs"]["usedBytes"]
    assert "network" not in real  # the host's network: nothing of its own to report

    played = pods["played"]
    assert played["cpu"]["usageNanoCores"] == 100_000_000
    assert played["containers"][0]["memory"]["workingSetBytes"] == 10 * MiB
    assert played["memory"]["workingSetBytes"] == 10 * MiB
    plain = pods["plain"]
    assert "cpu" not in plain and "memory" not in plain  # nothing runs: no usage, as for a pod without stats
    assert plain["containers"] == [{"name": "main", "startTime": "2026-01-01T00:00:05Z"}]


def test_summary_rates_from_successive_samples(fake_node):
    c = fake_node.collector
    c.rates.window = 0.0
    c.build(c.targets())
    write(fake_node.unified / fake_node.pod_rel, {"cpu.stat": "usage_usec 1003000000\n"})  # +1000 s of CPU
    time.sleep(0.05)
    real = by_name(summary_json(c.build(c.targets())))["real"]
    # 1000 CPU-seconds in ~0.05 s: thousands of cores; only the order of magnitude matters here.
    assert real["cpu"]["usageNanoCores"] > 1000 * 1_000_000_000


def test_summary_only_cpu_and_memory(fake_node):
    summary = summary_json(fake_node.collector.build(fake_node.collector.targets()), only_cpu_and_memory=True)
    assert set(summary["node"]) == {"nodeName", "startTime", "cpu", "memory"}
    real = by_name(summary)["real"]
    assert set(real) == {"podRef", "startTime", "containers", "cpu", "memory"}
    assert set(real["containers"][0]) == {"name", "startTime", "cpu", "memory"}


def test_pods_without_sandbox_or_gone_are_left_out(fake_node):
    workers = fake_node.controller.workers
    workers["uid-real"].sandbox = None
    workers["uid-plain"].gone = True
    assert [t.name for t in fake_node.collector.targets()] == ["played"]


def test_pod_cgroup_gone_mid_read(fake_node):
    import shutil

    shutil.rmtree(fake_node.unified / fake_node.pod_rel)
    real = by_name(summary_json(fake_node.collector.build(fake_node.collector.targets())))["real"]
    assert "cpu" not in real and "cpu" not in real["containers"][0]


# --- /metrics/resource ---------------------------------------------------------------------------


def test_go_float_matches_strconv():
    cases = {10.0: "10", 1e6: "1e+06", 999999.0: "999999", 0.0001: "0.0001", 1.5e-07: "1.5e-07", 2e21: "2e+21",
             -1234567.5: "-1.2345675e+06", 100.25: "100.25", 1624396278.302: "1.624396278302e+09", 0.5: "0.5",
             1e-05: "1e-05",
             123456.0: "123456", 10784768.0: "1.0784768e+07", 0.0: "0", -2.5: "-2.5"}  # fmt: skip
    assert {v: resource_metrics.go_float(v) for v in cases} == cases


def test_resource_metrics_text(fake_node):
    snapshot = fake_node.collector.build(fake_node.collector.targets())
    text = resource_metrics.render(snapshot)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # The parser drops a counter's _total from the family name; samples keep it.
    assert set(families) == {
        "container_cpu_usage_seconds", "container_memory_working_set_bytes", "container_start_time_seconds",
        "node_cpu_usage_seconds", "node_memory_working_set_bytes", "pod_cpu_usage_seconds",
        "pod_memory_working_set_bytes", "resource_scrape_error", "scrape_error",
    }  # fmt: skip
    cpu = {s.labels["pod"]: s for s in families["container_cpu_usage_seconds"].samples}
    assert set(cpu) == {"real", "played"}  # the plain emulated Pod has no usage
    assert cpu["real"].name == "container_cpu_usage_seconds_total"
    assert cpu["real"].labels == {"container": "main", "namespace": "default", "pod": "real"}
    assert cpu["real"].value == 2.0
    assert cpu["real"].timestamp == pytest.approx(snapshot.taken, abs=1)
    starts = {s.labels["pod"]: s.value for s in families["container_start_time_seconds"].samples}
    assert starts["plain"] == fake_node.started.timestamp()  # started, even without usage
    assert [s.value for s in families["scrape_error"].samples] == [0]
    # Exactly the kubelet's help texts, stability level included.
    assert (
        "# HELP container_cpu_usage_seconds_total [STABLE] Cumulative cpu time consumed by the container in "
        "core-seconds\n# TYPE container_cpu_usage_seconds_total counter\n"
    ) in text
    assert 'container_memory_working_set_bytes{container="main",namespace="default",pod="real"} 8.388608e+07 ' in text


def test_resource_metrics_escape_label_values(fake_node):
    snapshot = fake_node.collector.build(fake_node.collector.targets())
    snapshot.pods[0].namespace = 'we"ird\\ns'
    (family,) = [
        f
        for f in text_string_to_metric_families(resource_metrics.render(snapshot))
        if f.name == "pod_cpu_usage_seconds"
    ]
    assert 'we"ird\\ns' in {s.labels["namespace"] for s in family.samples}


def test_resource_metrics_when_sampling_failed():
    text = resource_metrics.render(None)
    assert [(f.name, f.samples[0].value) for f in text_string_to_metric_families(text)] == [
        ("resource_scrape_error", 1.0),
        ("scrape_error", 1.0),
    ]


# --- the agent's own metrics ---------------------------------------------------------------------


def sample(name: str, labels: dict[str, str]) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_api_resource_names():
    cases = {
        "/api/v1/namespaces/ns/pods/p/status": "pods/status",
        "/api/v1/pods": "pods",
        "/api/v1/namespaces/ns/events": "events",
        "/api/v1/namespaces/ns": "namespaces",
        "/api/v1/nodes/n": "nodes",
        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n": "leases",
        "/apis/node.k8s.io/v1/runtimeclasses": "runtimeclasses",
    }
    assert {p: metrics.api_resource(p) for p in cases} == cases


def test_api_request_counters():
    labels = {"verb": "PATCH", "resource": "pods/status", "code": "200"}
    before = sample("kubelet_emu_api_requests_total", labels)
    errors = sample("kubelet_emu_api_request_errors_total", {"verb": "PATCH", "resource": "pods/status"})
    metrics.api_request("PATCH", "/api/v1/namespaces/a/pods/b/status", 200)
    metrics.api_request("PATCH", "/api/v1/namespaces/c/pods/d/status", 200)
    metrics.api_request("PATCH", "/api/v1/namespaces/c/pods/d/status", 0)
    assert sample("kubelet_emu_api_requests_total", labels) == before + 2
    assert sample("kubelet_emu_api_requests_total", {**labels, "code": "<error>"}) >= 1
    assert sample("kubelet_emu_api_request_errors_total", {"verb": "PATCH", "resource": "pods/status"}) == errors + 1


async def test_instrumented_backend_times_and_counts_failures():
    class Fake:
        name = "fakebackend"

        async def create_container(self, *args: Any) -> str:
            return "handle"

        async def start_container(self, handle: str) -> None:
            raise RuntimeError("no")

    backend = metrics.instrument_backend(Fake())
    assert await backend.create_container(1, 2) == "handle"
    with pytest.raises(RuntimeError):
        await backend.start_container("h")
    ops = {"backend": "fakebackend", "operation": "create_container"}
    assert sample("kubelet_emu_runtime_operations_duration_seconds_count", ops) == 1
    assert sample("kubelet_emu_runtime_operations_errors_total", {**ops, "operation": "start_container"}) == 1
    assert sample("kubelet_emu_runtime_operations_errors_total", ops) == 0


def test_pod_start_latency_and_state_collector():
    created = datetime.fromtimestamp(time.time() - 3, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    pod = {"metadata": {"creationTimestamp": created}}
    labels = {"handler": "hx"}
    metrics.pod_container_started("hx", pod, SimpleNamespace(compute_phase=lambda: "Pending"))
    assert sample("kubelet_emu_pod_start_duration_seconds_count", labels) == 0  # not Running yet
    metrics.pod_container_started("hx", pod, SimpleNamespace(compute_phase=lambda: "Running"))
    assert sample("kubelet_emu_pod_start_duration_seconds_count", labels) == 1
    assert 2 <= sample("kubelet_emu_pod_start_duration_seconds_sum", labels) <= 6

    def worker(phase: str, handler: str, override: dict | None = None) -> SimpleNamespace:
        return SimpleNamespace(
            rec=SimpleNamespace(compute_phase=lambda: phase), handler_name=handler, _override=override
        )

    informer = SimpleNamespace(name="pods", watch_restarts=3, relists=2)
    controller = SimpleNamespace(
        workers={
            "a": worker("Running", "fast"),
            "b": worker("Running", "fast"),
            "c": worker("Pending", "procs"),
            "d": worker("Pending", "", {"phase": "Failed"}),
        },
        pods=informer,
        runtime_classes=SimpleNamespace(name="runtimeclasses", watch_restarts=0, relists=1),
        node=SimpleNamespace(lease=SimpleNamespace(failures=4)),
        status_writes=10,
    )
    metrics.bind_controller(controller)
    try:
        assert sample("kubelet_emu_pods", {"phase": "Running", "handler": "fast"}) == 2
        assert sample("kubelet_emu_pods", {"phase": "Pending", "handler": "procs"}) == 1
        assert sample("kubelet_emu_pods", {"phase": "Failed", "handler": ""}) == 1
        assert sample("kubelet_emu_watch_restarts_total", {"resource": "pods"}) == 3
        assert sample("kubelet_emu_lease_renew_failures_total", {}) == 4
    finally:
        metrics.bind_controller(None)


# --- the routes, served by a plain aiohttp app (the HTTPS server adds TLS and auth in front) ------


async def test_routes_serve_summary_and_metrics(fake_node):
    ctx = SimpleNamespace(node_name="node-1", controller=fake_node.controller, state_dir=fake_node.state)
    app = web.Application()
    stats_routes.add_routes(app, ctx)  # type: ignore[arg-type]
    metrics_routes.add_routes(app, ctx)  # type: ignore[arg-type]
    app[stats_routes.COLLECTOR].reader = fake_node.collector.reader
    app[stats_routes.COLLECTOR].proc = fake_node.collector.proc
    fake_node.controller.workers["uid-real"].rec.compute_phase = lambda: "Running"
    fake_node.controller.pods = SimpleNamespace(name="pods", watch_restarts=0, relists=1)
    fake_node.controller.runtime_classes = SimpleNamespace(name="runtimeclasses", watch_restarts=0, relists=1)
    fake_node.controller.node = SimpleNamespace(lease=None)
    fake_node.controller.status_writes = 0
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/stats/summary")
        assert resp.status == 200 and resp.content_type == "application/json"
        summary = await resp.json()
        assert set(by_name(summary)) == {"real", "played", "plain"}
        # Within max_age the same sampling answers again.
        assert (await (await client.get("/stats/summary")).json()) == summary
        trimmed = await (await client.get("/stats/summary?only_cpu_and_memory=true")).json()
        assert "fs" not in trimmed["node"]

        resp = await client.get("/metrics/resource")
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert "pod_memory_working_set_bytes" in {f.name for f in text_string_to_metric_families(await resp.text())}

        resp = await client.get("/metrics")
        names = {f.name for f in text_string_to_metric_families(await resp.text())}
        assert {"kubelet_emu_pods", "kubelet_emu_api_requests", "kubelet_emu_pod_start_duration_seconds"} <= names
        resp = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    metrics.bind_controller(None)


async def test_concurrent_requests_share_one_sampling(fake_node):
    c = fake_node.collector
    rounds = 0
    build = c.build

    def counting(targets):
        nonlocal rounds
        rounds += 1
        return build(targets)

    c.build = counting  # type: ignore[method-assign]
    bodies = await asyncio.gather(*(c.rendered("summary", lambda s: json.dumps(summary_json(s)).encode())
                                    for _ in range(20)))  # fmt: skip
    assert rounds == 1 and len(set(bodies)) == 1
    c._cost = 2.0  # an expensive sampling (thousands of Pods) is reused for longer
    assert c.reuse_for == 10.0


async def test_requests_during_a_sampling_get_the_last_answer(fake_node):
    """Only the request that starts a sampling waits for it; others meanwhile get the last answer,
    unless that is too old."""
    c = fake_node.collector
    c.max_age = 0.0  # every request wants a fresh sampling
    render = lambda s: str(s.taken).encode()  # noqa: E731
    first = await c.rendered("k", render)
    release = asyncio.Event()
    build = c.build

    def slow(targets):
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
        return build(targets)

    loop = asyncio.get_running_loop()
    c.build = slow  # type: ignore[method-assign]
    c._cost = c._taken = 0.0  # the last sampling has expired
    starter = asyncio.create_task(c.rendered("k", render))
    await asyncio.sleep(0.05)
    assert c._building is not None
    assert await asyncio.wait_for(c.rendered("k", render), 1) == first  # no waiting behind the sampling
    release.set()
    assert await starter != first
    c._rendered["k"] = (replace(c._rendered["k"][0], taken=time.time() - 60), b"old")
    c.build = slow  # type: ignore[method-assign]
    release.clear()
    c._cost = c._taken = 0.0
    waiting = asyncio.create_task(c.rendered("k", render))
    await asyncio.sleep(0.05)
    later = asyncio.create_task(c.rendered("k", render))
    await asyncio.sleep(0.05)
    assert not later.done()  # a minute-old answer is not served: it waits for the fresh one
    release.set()
    assert await later == await waiting != b"old"


def test_host_fs_usage_of_a_real_directory(tmp_path):
    fs = host.fs_usage(str(tmp_path))
    st = os.statvfs(tmp_path)
    assert fs.capacity_bytes == st.f_blocks * st.f_frsize and fs.inodes_used == st.f_files - st.f_ffree


# --- integration: a real process Pod on a real agent, its real cgroups -------------------------------

CGROUP_ROOT = f"kubelet-emu-stats-{uuid.uuid4().hex[:6]}"
PROCESS_CONFIG = f"""
default_runtime = "procs"
[node]
cgroup_root = "{CGROUP_ROOT}"
[runtimes.procs]
backend = "process"
"""
# Touches 96 MiB (a bytearray built by repetition is written, so it is resident), logs, then spins.
BURNER = """
data = bytearray(b"x") * (96 << 20)
for i in range(200):
    print("burning", i, flush=True)
while True:
    pass
"""


def burner_pod(name: str, node: str) -> str:
    command = json.dumps(["python3", "-c", BURNER])
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  containers:
  - name: burn
    image: busybox
    command: {command}
    resources: {{limits: {{cpu: 500m, memory: 256Mi}}, requests: {{cpu: 500m, memory: 256Mi}}}}
"""


def direct_counters(mode: CgroupMode, relative: str) -> tuple[int, int, int]:
    """(cpu ns, memory usage, working set) read straight from the cgroup files, the test's own way."""

    def read(*parts: str) -> str:
        return Path(*parts).read_text()

    def stat(text: str, key: str) -> int:
        return next(int(line.split()[1]) for line in text.splitlines() if line.split()[0] == key)

    if mode.version == 2:
        base = os.path.join(mode.mounts["unified"], relative)
        cpu = stat(read(base, "cpu.stat"), "usage_usec") * 1000
        usage = int(read(base, "memory.current"))
        return cpu, usage, usage - stat(read(base, "memory.stat"), "inactive_file")
    cpu = int(read(mode.mounts["cpuacct"], relative, "cpuacct.usage"))
    memory = os.path.join(mode.mounts["memory"], relative)
    usage = int(read(memory, "memory.usage_in_bytes"))
    return cpu, usage, usage - stat(read(memory, "memory.stat"), "total_inactive_file")


def netns_of(pid: int) -> str | None:
    """The /run/netns entry the process lives in, if any."""
    want = os.stat(f"/proc/{pid}/ns/net")
    for entry in Path("/run/netns").glob("*") if Path("/run/netns").is_dir() else []:
        with contextlib.suppress(OSError):
            st = entry.stat()
            if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
                return str(entry)
    return None


@pytest.fixture
async def process_node(kubectl, start_agent, tmp_path):
    from conftest import wait_node_ready

    name = f"emu-stats-{uuid.uuid4().hex[:6]}"
    state = tmp_path / "state"
    ip = routable_ip()
    extra = ("--port", "0", *(("--node-ip", ip) if ip else ()))  # a free kubelet port; an IP the API server proxies to
    config = PROCESS_CONFIG
    if RUNC:  # an OCI handler too, for the OCI Pod's stats
        config += (
            f'[runtimes.isolated]\nbackend = "oci"\nruntime_path = "{RUNC}"\nruntime_root = "{tmp_path / "runc"}"\n'
        )
    agent = await start_agent(name, config, state_dir=state, extra=extra)
    obj = await wait_node_ready(kubectl, name)
    port = obj["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
    manager = CgroupManager(detect_mode(), root=CGROUP_ROOT)
    yield SimpleNamespace(name=name, agent=agent, state=state, cgroups=manager, port=port, proxied=ip is not None)
    await kubectl.run(
        "delete", "pods", "--field-selector", f"spec.nodeName={name}", "--grace-period=1",
        "--wait=true", "--timeout=60s", check=False,
    )  # fmt: skip
    # Stop the agent before killing what is left in the cgroups: a running agent would restart a
    # killed container (restartPolicy Always) and that process would outlive the test.
    await agent.stop()
    with contextlib.suppress(Exception):
        manager.remove(CGROUP_ROOT, kill=True)


def routable_ip() -> str | None:
    """This host's outgoing address: the API server does not proxy to a node whose address is loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("8.8.8.8", 9))  # sends nothing: only picks the outgoing address
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(ip).is_loopback else ip


def mirror_controller(
    pod: dict, manager: CgroupManager, netns: str | None, backend: str = "process", container: str = "burn"
) -> SimpleNamespace:
    """What the collector reads of the agent's controller, for the Pod the real agent runs."""
    status = pod["status"]["containerStatuses"][0]
    started = datetime.fromisoformat(status["state"]["running"]["startedAt"].replace("Z", "+00:00"))
    pod_start = datetime.fromisoformat(pod["status"]["startTime"].replace("Z", "+00:00"))
    worker = SimpleNamespace(
        pod=pod,
        backend=SimpleNamespace(name=backend),
        sandbox=SimpleNamespace(netns=netns),
        gone=False,
        handles={
            container: SimpleNamespace(
                started_at=started, id=status["containerID"].split("//")[-1], image=status["image"]
            )
        },
        rec=SimpleNamespace(start_time=pod_start),
    )
    return SimpleNamespace(workers={pod["metadata"]["uid"]: worker}, cgroups=manager)


async def start_burner(kubectl: Any, node: SimpleNamespace) -> tuple[str, dict]:
    """A running burner Pod with its memory resident: (name, Pod object)."""
    from conftest import eventually

    name = f"burner-{uuid.uuid4().hex[:6]}"
    await kubectl.apply(burner_pod(name, node.name))

    async def running() -> dict | None:
        obj = await kubectl.get("pod", name)
        return obj if obj and obj["status"].get("phase") == "Running" else None

    pod = await eventually(running, 30, what=f"{name} Running")
    ctr_rel = node.cgroups.container_path(pod, "burn")

    async def allocated() -> bool:
        with contextlib.suppress(OSError):
            return direct_counters(node.cgroups.mode, ctr_rel)[2] > 90 * MiB
        return False

    await eventually(allocated, 20, what="the burner's 96 MiB resident")
    return name, pod


@pytest.mark.cluster
@pytest.mark.skipif(os.geteuid() != 0, reason="the process backend needs root for pod cgroups")
async def test_summary_matches_a_real_pods_cgroup(kubectl, process_node):
    name, pod = await start_burner(kubectl, process_node)
    manager: CgroupManager = process_node.cgroups
    pod_rel, ctr_rel = manager.pod_path(pod), manager.container_path(pod, "burn")
    pids = manager.pids(ctr_rel)
    netns = netns_of(pids[0]) if pids else None

    collector = StatsCollector(process_node.name, mirror_controller(pod, manager, netns), process_node.state)
    before = direct_counters(manager.mode, pod_rel)
    first = collector.build(collector.targets())
    await asyncio.sleep(2.0)
    mid = direct_counters(manager.mode, pod_rel)
    snapshot = collector.build(collector.targets())
    after = direct_counters(manager.mode, pod_rel)
    ctr_after = direct_counters(manager.mode, ctr_rel)

    summary = by_name(summary_json(snapshot))[name]
    cpu, memory = summary["cpu"], summary["memory"]
    print(  # the deviations, for the record (pytest -s shows them)
        f"\nstats vs cgroup: cpu {cpu['usageCoreNanoSeconds']} in [{mid[0]}, {after[0]}]; "
        f"working set {memory['workingSetBytes']} vs {after[2]} ({memory['workingSetBytes'] / after[2] - 1:+.2%}); "
        f"usage {memory['usageBytes']} vs {after[1]} ({memory['usageBytes'] / after[1] - 1:+.2%}); "
        f"nanocores {cpu.get('usageNanoCores')} vs {(after[0] - before[0]) / (snapshot.taken - first.taken):.0f}; "
        f"netns {netns}: {summary.get('network')}"
    )
    # Cumulative CPU lies between the reads just before and after the sampling (10 % slack).
    assert mid[0] * 0.9 <= cpu["usageCoreNanoSeconds"] <= after[0] * 1.1
    assert abs(memory["usageBytes"] - after[1]) <= 0.1 * after[1]
    assert abs(memory["workingSetBytes"] - after[2]) <= 0.1 * after[2]
    assert memory["workingSetBytes"] > 90 * MiB
    assert memory["availableBytes"] == 256 * MiB - memory["workingSetBytes"]  # the pod's limit
    # The rate over the two samplings against the counter's own rate over the bracketing reads.
    interval = snapshot.pods[0].usage.time - first.pods[0].usage.time  # type: ignore[union-attr]
    measured = (after[0] - before[0]) / (interval + 0.05)
    assert cpu["usageNanoCores"] == pytest.approx(measured, rel=0.15)
    assert 0.1e9 < cpu["usageNanoCores"] < 0.6e9  # a 500m limit on a spinning process

    (container,) = summary["containers"]
    assert container["name"] == "burn"
    assert abs(container["memory"]["workingSetBytes"] - ctr_after[2]) <= 0.1 * ctr_after[2]
    assert container["cpu"]["usageCoreNanoSeconds"] <= ctr_after[0] * 1.1
    assert container["logs"]["usedBytes"] > 0 and container["logs"]["inodesUsed"] >= 1
    assert summary["ephemeral-storage"]["usedBytes"] >= container["logs"]["usedBytes"]
    if netns is not None:  # the process backend's own namespace: its eth0 (lo is left out)
        assert "eth0" in [i["name"] for i in summary["network"]["interfaces"]]
    else:
        assert "network" not in summary

    # The same sampling as /metrics/resource: what metrics-server reads for `kubectl top`.
    families = {f.name: f for f in text_string_to_metric_families(resource_metrics.render(snapshot))}
    (ctr_cpu,) = [s for s in families["container_cpu_usage_seconds"].samples if s.labels["pod"] == name]
    assert ctr_cpu.labels == {"container": "burn", "namespace": "default", "pod": name}
    assert ctr_cpu.value == container["cpu"]["usageCoreNanoSeconds"] / 1e9
    (pod_mem,) = [s for s in families["pod_memory_working_set_bytes"].samples if s.labels["pod"] == name]
    assert pod_mem.value == memory["workingSetBytes"]


RUNC = shutil.which("runc")


@pytest.mark.cluster
@pytest.mark.skipif(os.geteuid() != 0, reason="runc, pod cgroups and pod networks need root")
@pytest.mark.skipif(RUNC is None, reason="runc is not installed (Debian package runc)")
async def test_summary_of_an_oci_pod(kubectl, process_node, busybox_ref):
    """The OCI backend's layout (a pause process and the containers in the Pod cgroup, the Pod's own
    namespace) read by the same collector, against the cgroup files."""
    from conftest import eventually

    runtime_class = f"stats-isolated-{uuid.uuid4().hex[:6]}"
    await kubectl.apply(json.dumps({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                                    "metadata": {"name": runtime_class}, "handler": "isolated"}))  # fmt: skip
    name = f"oci-burner-{uuid.uuid4().hex[:6]}"
    container = {
        "name": "spin",
        "image": busybox_ref,
        "command": ["sh", "-c", "echo spinning; while :; do :; done"],
        # Burstable: a Guaranteed Pod's oom_score_adj (-997) needs CAP_SYS_RESOURCE, which this sandbox may lack.
        "resources": {"requests": {"cpu": "100m", "memory": "32Mi"}, "limits": {"cpu": "300m", "memory": "64Mi"}},
    }
    spec = {"nodeName": process_node.name, "runtimeClassName": runtime_class, "terminationGracePeriodSeconds": 1,
            "containers": [container]}  # fmt: skip
    await kubectl.apply(json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}))
    try:

        async def running() -> dict | None:
            obj = await kubectl.get("pod", name)
            return obj if obj and obj["status"].get("phase") == "Running" else None

        try:
            pod = await eventually(running, 90, what=f"{name} Running")
        except BaseException:
            print((await kubectl.get("pod", name) or {}).get("status"))
            print(await kubectl("get", "events", "--field-selector", f"involvedObject.name={name}"))
            raise
        assert pod["status"]["containerStatuses"][0]["containerID"].startswith("oci://")
        manager: CgroupManager = process_node.cgroups
        pod_rel, ctr_rel = manager.pod_path(pod), manager.container_path(pod, "spin")
        pids = await eventually(lambda: asyncio.sleep(0, manager.pids(ctr_rel)), 10, what="the container's pid")
        netns = netns_of(pids[0])
        collector = StatsCollector(
            process_node.name, mirror_controller(pod, manager, netns, "oci", "spin"), process_node.state
        )
        collector.build(collector.targets())
        await asyncio.sleep(1.5)
        mid = direct_counters(manager.mode, pod_rel)
        snapshot = collector.build(collector.targets())
        after = direct_counters(manager.mode, pod_rel)
        ctr_after = direct_counters(manager.mode, ctr_rel)
        summary = by_name(summary_json(snapshot))[name]
        print(f"\noci: pod cpu {summary['cpu']} vs [{mid[0]}, {after[0]}], memory {summary['memory']} vs {after}")
        assert mid[0] * 0.9 <= summary["cpu"]["usageCoreNanoSeconds"] <= after[0] * 1.1
        assert abs(summary["memory"]["workingSetBytes"] - after[2]) <= 0.1 * after[2] + 1 * MiB
        assert 0.05e9 < summary["cpu"]["usageNanoCores"] < 0.4e9  # the 300m limit
        (ctr,) = summary["containers"]
        assert ctr["cpu"]["usageCoreNanoSeconds"] <= ctr_after[0] * 1.1
        assert ctr["cpu"]["usageCoreNanoSeconds"] >= 0.9 * (mid[0] - (after[0] - ctr_after[0]))  # minus the pause's
        assert ctr["logs"]["usedBytes"] > 0
        assert netns is not None and "eth0" in [i["name"] for i in summary["network"]["interfaces"]]
    finally:
        await kubectl.run("delete", "pod", name, "--wait=true", "--timeout=60s", check=False)
        await kubectl.run("delete", "runtimeclass", runtime_class, check=False)


# --- end to end: the agent's own HTTPS server, reached as metrics-server and kubectl do ----------------


async def kubelet_get(cluster: Any, kubectl: Any, node: SimpleNamespace, path: str, proxy: bool = True) -> str:
    """GET a kubelet API path through the API server's node proxy (as `kubectl get --raw` does), or
    straight to the agent's port with the API server's kubelet client certificate (as metrics-server
    does with its own)."""
    if proxy and node.proxied:
        return await kubectl("get", "--raw", f"/api/v1/nodes/{node.name}/proxy{path}")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the agent's serving certificate is self-signed
    pki = cluster.dir / "pki"
    ctx.load_cert_chain(str(pki / "apiserver-kubelet-client.crt"), str(pki / "apiserver-kubelet-client.key"))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
        session.get(f"https://127.0.0.1:{node.port}{path}") as resp,
    ):
        assert resp.status == 200, await resp.text()
        return await resp.text()


@pytest.mark.cluster
@pytest.mark.skipif(os.geteuid() != 0, reason="the process backend needs root for pod cgroups")
async def test_kubelet_api_serves_stats_and_metrics(cluster, kubectl, process_node):
    name, pod = await start_burner(kubectl, process_node)
    manager: CgroupManager = process_node.cgroups
    pod_rel = manager.pod_path(pod)

    # One sampling serves requests for a while (and a recent answer while a newer one is made), so
    # an answer may predate `before`; within a few seconds one is taken after it.
    for _ in range(20):
        before = direct_counters(manager.mode, pod_rel)
        summary = json.loads(await kubelet_get(cluster, kubectl, process_node, "/stats/summary"))
        after = direct_counters(manager.mode, pod_rel)
        stats = by_name(summary)[name]
        if stats["cpu"]["usageCoreNanoSeconds"] >= before[0] * 0.9:
            break
        await asyncio.sleep(0.5)
    assert summary["node"]["nodeName"] == process_node.name
    assert before[0] * 0.9 <= stats["cpu"]["usageCoreNanoSeconds"] <= after[0] * 1.1
    assert abs(stats["memory"]["workingSetBytes"] - after[2]) <= 0.1 * after[2]

    # What metrics-server read from the Summary: node and container cpu rate and working set, with times.
    await asyncio.sleep(2.0)
    summary = json.loads(await kubelet_get(cluster, kubectl, process_node, "/stats/summary", proxy=False))
    node, stats = summary["node"], by_name(summary)[name]
    for block in (node["cpu"], stats["cpu"], stats["containers"][0]["cpu"]):
        assert block["usageNanoCores"] >= 0 and block["time"].endswith("Z")
    assert 0.1e9 < stats["containers"][0]["cpu"]["usageNanoCores"] < 0.6e9  # the 500m limit
    assert node["memory"]["workingSetBytes"] > stats["memory"]["workingSetBytes"] > 90 * MiB

    # What metrics-server reads now: /metrics/resource, cumulative counters stamped with their time.
    text = await kubelet_get(cluster, kubectl, process_node, "/metrics/resource")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for family in ("node_cpu_usage_seconds", "node_memory_working_set_bytes", "container_cpu_usage_seconds",
                   "container_memory_working_set_bytes", "container_start_time_seconds", "pod_cpu_usage_seconds",
                   "pod_memory_working_set_bytes", "scrape_error", "resource_scrape_error"):  # fmt: skip
        assert family in families, family
    (cpu,) = [s for s in families["container_cpu_usage_seconds"].samples if s.labels["pod"] == name]
    assert cpu.labels == {"container": "burn", "namespace": "default", "pod": name}
    assert cpu.timestamp is not None and abs(float(cpu.timestamp) - time.time()) < 30
    assert cpu.value * 1e9 <= direct_counters(manager.mode, pod_rel)[0] * 1.1
    assert [s.value for s in families["resource_scrape_error"].samples] == [0]

    # The agent's own metrics.
    text = await kubelet_get(cluster, kubectl, process_node, "/metrics")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("kubelet_emu_pods", phase="Running", handler="procs") >= 1
    assert value("kubelet_emu_pod_start_duration_seconds_count", handler="procs") >= 1
    assert value("kubelet_emu_runtime_operations_duration_seconds_count", backend="process",
                 operation="start_container") >= 1  # fmt: skip
    assert value("kubelet_emu_api_requests_total", verb="PATCH", resource="pods/status", code="200") >= 1
    assert value("kubelet_emu_api_requests_total", verb="WATCH", resource="pods", code="200") >= 1
    assert ("kubelet_emu_lease_renew_failures_total", ()) in samples
    assert value("kubelet_emu_watch_relists_total", resource="pods") >= 1
