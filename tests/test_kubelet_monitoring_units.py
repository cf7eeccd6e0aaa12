"""The monitoring endpoints' pure parts: cAdvisor text, probe counts, /configz scrubbing, /logs/ paths.

The same endpoints against a real agent, cluster and metrics-server: test_kubelet_monitoring.py.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from agent import probe_metrics
from agent.config import load_config
from agent.kubelet_api import configz, node_logs
from agent.stats import cadvisor_metrics
from agent.stats.host import FsUsage, InterfaceCounters
from agent.stats.model import ContainerSnapshot, Fs, Network, NodeSnapshot, PodSnapshot, Snapshot, Usage
from cgroups.stats import CgroupUsage

MACHINE = cadvisor_metrics.MachineInfo(4, 8 << 30, "boot", "machine", "", "/dev/vda1")


def usage(at: float, cpu_ns: int, ws: int) -> Usage:
    return Usage(at, CgroupUsage(cpu_ns, ws + 100, ws, ws // 2, 7, 1, 256 << 20), None)


def snapshot() -> Snapshot:
    now = 1_800_000_000.0
    net = Network(now, [InterfaceCounters("eth0", 10, 1, 20, 2)], "eth0")
    node = NodeSnapshot("n", 1_700_000_000.0, usage=usage(now, 9_000_000_000, 1 << 30), network=net)
    node.fs = Fs(now, FsUsage(100, 40, 60, 10, 4, 6))
    node.pods_cgroup, node.pods_cgroup_path = usage(now, 5_000_000_000, 1 << 20), "kubepods"
    c = ContainerSnapshot("burn", now - 5, usage(now, 2_500_000_000, 4096), container_id="abc", image="busybox",
                          cgroup="kubepods/podu1/burn")  # fmt: skip
    played = ContainerSnapshot("main", now - 5, usage(now, 1, 1))  # emulated: no cgroup
    pods = [
        PodSnapshot(
            "web", "default", "u1", now - 6, [c], usage(now, 3_000_000_000, 8192), net, cgroup="kubepods/podu1"
        ),
        PodSnapshot("fake", "default", "u2", now - 6, [played], usage(now, 1, 1)),
    ]
    return Snapshot(now, node, pods)


def families(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_cadvisor_text_has_the_kubelet_families_and_labels():
    fams = families(cadvisor_metrics.render(snapshot(), MACHINE))
    cpu = {s.labels["id"]: s for s in fams["container_cpu_usage_seconds"]}
    assert set(cpu) == {"/", "/kubepods", "/kubepods/podu1", "/kubepods/podu1/burn"}  # not the emulated Pod
    assert cpu["/kubepods/podu1/burn"].labels == {
        "container": "burn", "cpu": "total", "id": "/kubepods/podu1/burn", "image": "busybox", "name": "abc",
        "namespace": "default", "pod": "web",
    }  # fmt: skip
    assert cpu["/kubepods/podu1/burn"].value == 2.5 and cpu["/kubepods/podu1/burn"].timestamp == 1_800_000_000
    assert cpu["/kubepods/podu1"].labels["container"] == "" and cpu["/kubepods/podu1"].labels["pod"] == "web"
    ws = {s.labels["id"]: s.value for s in fams["container_memory_working_set_bytes"]}
    assert ws["/kubepods/podu1/burn"] == 4096 and ws["/"] == 1 << 30
    assert {s.labels["id"] for s in fams["container_memory_rss"]} == set(cpu)
    rx = [s for s in fams["container_network_receive_bytes"] if s.labels["pod"] == "web"]
    assert rx and rx[0].labels["interface"] == "eth0" and rx[0].labels["container"] == "" and rx[0].value == 10
    (fs,) = fams["container_fs_usage_bytes"]
    assert fs.labels["device"] == "/dev/vda1" and fs.labels["id"] == "/" and fs.value == 60
    (cores,) = fams["machine_cpu_cores"]
    assert cores.value == 4 and cores.labels == {"boot_id": "boot", "machine_id": "machine", "system_uuid": ""}
    assert fams["machine_memory_bytes"][0].value == 8 << 30
    assert fams["container_scrape_error"][0].value == 0
    failures = {(s.labels["failure_type"], s.labels["scope"]) for s in fams["container_memory_failures"]}
    assert failures == {("pgfault", "hierarchy"), ("pgmajfault", "hierarchy")}


def test_cadvisor_text_after_a_failed_sampling():
    fams = families(cadvisor_metrics.render(None, MACHINE))
    assert fams["container_scrape_error"][0].value == 1 and "container_cpu_usage_seconds" not in fams


def test_fs_device_from_mountinfo(tmp_path):
    st = os.stat(tmp_path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"1 0 {dev} / / rw - ext4 /dev/old rw\n2 1 {dev} / /x rw shared:1 - ext4 /dev/sdz9 rw\n")
    assert cadvisor_metrics.fs_device(str(tmp_path), str(mountinfo)) == "/dev/sdz9"
    assert cadvisor_metrics.fs_device(str(tmp_path / "missing"), str(mountinfo)) == ""


def test_probe_counts_by_result_and_forgotten_with_the_worker():
    counts = probe_metrics.ProbeCounts()
    target = ("app", "web", "default", "uid-1")
    counts.record("readiness", target, "successful")
    counts.record("readiness", target, "successful")
    counts.record("liveness", target, "failed")
    (family,) = counts.collect()
    got = {(s.labels["probe_type"], s.labels["result"]): s.value for s in family.samples}
    assert got == {("Readiness", "successful"): 2, ("Liveness", "failed"): 1}
    assert family.samples[0].name == "prober_probe_total"
    assert set(family.samples[0].labels) == set(probe_metrics.LABELS)
    counts.forget("readiness", target)
    (family,) = counts.collect()
    assert [s.labels["probe_type"] for s in family.samples] == ["Liveness"]


def test_configz_leaves_secrets_out(tmp_path):
    cfg = tmp_path / "agent.toml"
    (tmp_path / "tls.crt").write_text("cert")
    (tmp_path / "tls.key").write_text("key")
    cfg.write_text(
        '[kubelet_api]\ntls_cert_file = "tls.crt"\ntls_key_file = "tls.key"\n[runtimes.procs]\nbackend = "process"\n'
        '[node]\ntaints = [{key = "dedicated", value = "emu", effect = "NoSchedule"}]\n'
    )
    ctx = SimpleNamespace(config=load_config(cfg, check_paths=False))
    body = json.loads(configz.render(ctx, 10250))  # type: ignore[arg-type]
    assert body["kubeletconfig"]["kind"] == "KubeletConfiguration" and body["kubeletconfig"]["port"] == 10250
    assert body["kubeletconfig"]["tlsCertFile"] == str(tmp_path / "tls.crt")
    assert body["kubeletEmu"]["handlers"]["procs"]["backend"] == "process"
    assert "tls.key" not in json.dumps(body) and "tls_key_file" not in body["kubeletEmu"]["kubelet_api"]
    assert body["kubeletconfig"]["registerWithTaints"] == [{"key": "dedicated", "value": "emu", "effect": "NoSchedule"}]
    secrets = {"token": "t", "api_key": "k", "key_data": "d", "nested": [{"password": "p", "monkey": 1, "key": "x"}]}
    assert configz.scrub(secrets) == {"nested": [{"monkey": 1, "key": "x"}]}


def test_log_paths_stay_in_the_directory(tmp_path):
    root = tmp_path / "logs"
    root.mkdir()
    (root / "kubelet-emu.log").write_text("hello\n")
    (root / "out").symlink_to("/etc")
    assert node_logs.resolve(root, "kubelet-emu.log") == root / "kubelet-emu.log"
    assert node_logs.resolve(root, "") == root
    for bad in ("../x", "a/../../x", "out/passwd", "out", "x\x00"):
        with pytest.raises(node_logs.Refused):
            node_logs.resolve(root, bad)


async def test_logs_route_serves_files_and_refuses_traversal(tmp_path):
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    (state / "logs" / "kubelet-emu.log").write_text("level=info msg=hello\n")
    (tmp_path / "secret").write_text("no")
    app = web.Application()
    node_logs.add_routes(app, SimpleNamespace(state_dir=state))  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as client:
        listing = await client.get("/logs/")
        assert listing.status == 200 and 'href="kubelet-emu.log"' in await listing.text()
        log = await client.get("/logs/kubelet-emu.log")
        assert log.status == 200 and await log.text() == "level=info msg=hello\n"
        for path in ("/logs/..%2f..%2fsecret", "/logs/%2e%2e/%2e%2e/secret", "/logs/../../secret"):
            resp = await client.get(URL(path, encoded=True), allow_redirects=False)
            assert resp.status == 404, path
        assert (await client.get("/logs", allow_redirects=False)).status == 301
        assert (await client.get("/logs/nothing-here")).status == 404


def test_metrics_server_is_reached_at_this_hosts_address_never_a_cluster_ip():
    import yaml

    from devcluster import metrics_server

    docs = {d["kind"]: d for d in yaml.safe_load_all(metrics_server.manifest("192.0.2.2", 4443, b"CA"))}
    assert docs["Service"]["spec"]["clusterIP"] == "None" and "selector" not in docs["Service"]["spec"]
    slice_ = docs["EndpointSlice"]
    assert slice_["metadata"]["labels"]["kubernetes.io/service-name"] == "metrics-server"
    assert slice_["endpoints"][0]["addresses"] == ["192.0.2.2"] and slice_["ports"][0]["port"] == 4443
    # The aggregator matches the slice's port to the Service's by name.
    assert slice_["ports"][0]["name"] == docs["Service"]["spec"]["ports"][0]["name"]
    spec = docs["APIService"]["spec"]
    assert (spec["group"], spec["version"], spec["service"]["name"]) == ("metrics.k8s.io", "v1beta1", "metrics-server")
    assert spec["caBundle"] == "Q0E="
    try:
        address = metrics_server.host_address()
    except metrics_server.MetricsServerError:
        return  # no non-loopback address on this host: start() says so
    assert not address.startswith("127.")
