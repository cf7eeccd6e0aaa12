"""The monitoring stack against a real node: metrics-server v0.8.0 and `kubectl top` through the dev
cluster's aggregation layer, and the kubelet endpoints Prometheus scrapes (/metrics/cadvisor,
/metrics/probes, /metrics), plus /configz and /logs/, through the API server's node proxy.

Numbers for the record (pytest -s): `kubectl top pod` against the cgroup's own CPU rate, and each
endpoint's response time measured on the kubelet port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import ssl
import statistics
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from agent.kubelet_api.configz import SECRET_NAME
from cgroups.detect import detect_mode
from cgroups.manager import CgroupManager
from devcluster import manage
from devcluster import metrics_server as ms

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(os.geteuid() != 0, reason="the process backend needs root for pod cgroups"),
]

CGROUP_ROOT = f"kubelet-emu-mon-{uuid.uuid4().hex[:6]}"
CONFIG = f"""
default_runtime = "procs"
[node]
cgroup_root = "{CGROUP_ROOT}"
[runtimes.procs]
backend = "process"
"""
LIMIT_MILLICORES = 200


def host_ip() -> str | None:
    try:
        return ms.host_address()
    except ms.MetricsServerError:
        return None


@pytest.fixture(scope="module")
async def metrics_api(cluster: manage.Cluster) -> manage.Cluster:
    if host_ip() is None:
        pytest.skip("this host has no non-loopback address: the API server cannot reach an aggregated API")
    await ms.start(cluster)
    return cluster


@pytest.fixture
async def node(kubectl, start_agent, tmp_path):
    from conftest import wait_node_ready

    name = f"mon-{uuid.uuid4().hex[:6]}"
    state = tmp_path / "state"
    ip = host_ip()
    extra = ("--port", "0", *(("--node-ip", ip) if ip else ()))
    agent = await start_agent(name, CONFIG, state_dir=state, extra=extra)
    obj = await wait_node_ready(kubectl, name)
    port = obj["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
    manager = CgroupManager(detect_mode(), root=CGROUP_ROOT)
    yield SimpleNamespace(name=name, agent=agent, state=state, cgroups=manager, port=port, ip=ip or "127.0.0.1")
    await kubectl.run(
        "delete", "pods", "--field-selector", f"spec.nodeName={name}", "--grace-period=1",
        "--wait=true", "--timeout=60s", check=False,
    )  # fmt: skip
    await agent.stop()
    with contextlib.suppress(Exception):
        manager.remove(CGROUP_ROOT, kill=True)


def burner(name: str, node: str) -> str:
    """A Pod spinning a CPU at its 200m limit, with a readiness probe run every second."""
    spec = {
        "nodeName": node,
        "terminationGracePeriodSeconds": 1,
        "containers": [
            {
                "name": "burn",
                "image": "busybox",
                "command": ["python3", "-c", "while True: pass"],
                "resources": {"limits": {"cpu": f"{LIMIT_MILLICORES}m", "memory": "64Mi"}},
                "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1},
            }
        ],
    }
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})


async def running_pod(kubectl, node: SimpleNamespace) -> dict:
    from conftest import eventually

    name = f"burn-{uuid.uuid4().hex[:6]}"
    await kubectl.apply(burner(name, node.name))

    async def ready() -> dict | None:
        obj = await kubectl.get("pod", name)
        statuses = (obj or {}).get("status", {}).get("containerStatuses") or []
        return obj if statuses and statuses[0].get("ready") else None

    return await eventually(ready, 60, what=f"{name} Running and Ready")


def cpu_ns(manager: CgroupManager, relative: str) -> int:
    mode = manager.mode
    if mode.version == 2:
        text = Path(mode.mounts["unified"], relative, "cpu.stat").read_text()
        return next(int(line.split()[1]) for line in text.splitlines() if line.startswith("usage_usec ")) * 1000
    return int(Path(mode.mounts["cpuacct"], relative, "cpuacct.usage").read_text())


def millicores(text: str) -> int:
    m = re.fullmatch(r"(\d+)m", text)
    return int(m.group(1)) if m else int(float(text) * 1000)


async def test_kubectl_top_pod_and_node(kubectl, metrics_api, node):
    from conftest import eventually

    pod = await running_pod(kubectl, node)
    name = pod["metadata"]["name"]

    async def top_pod() -> list[str] | None:
        code, out, _ = await kubectl.run("top", "pod", name, "--no-headers", check=False)
        return out.split() if code == 0 and out.strip() else None

    await eventually(top_pod, 120, interval=2, what="kubectl top pod")  # two scrapes, 15 s apart
    # The cgroup's rate over one scrape interval, read just before `kubectl top`: the burner is held
    # at its limit, so the windows need not line up exactly.
    relative = node.cgroups.container_path(pod, "burn")
    t0, c0 = time.monotonic(), cpu_ns(node.cgroups, relative)
    await asyncio.sleep(15)
    c1, t1 = cpu_ns(node.cgroups, relative), time.monotonic()
    fields = await top_pod()
    assert fields is not None and fields[0] == name
    cgroup_m = (c1 - c0) / (t1 - t0) / 1e6
    top_m = millicores(fields[1])
    print(f"\nkubectl top pod: {fields[1]} CPU, {fields[2]} memory; cgroup rate {cgroup_m:.1f}m "
          f"({top_m / cgroup_m - 1:+.1%})")  # fmt: skip
    assert abs(top_m - cgroup_m) <= 0.10 * cgroup_m
    assert fields[2].endswith("Mi")

    code, out, err = await kubectl.run("top", "node", node.name, "--no-headers", check=False)
    print(f"kubectl top node: {out.strip() or err.strip()}")
    row = out.split()
    assert code == 0 and row[0] == node.name, err
    assert millicores(row[1]) >= LIMIT_MILLICORES * 0.5  # the burner at least
    assert row[3].endswith(("Mi", "Gi"))


def kubelet_client(cluster: manage.Cluster) -> aiohttp.ClientSession:
    """The admin identity straight to the kubelet port (its certificate is self-signed)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.load_cert_chain(str(cluster.dir / "pki" / "admin.crt"), str(cluster.dir / "pki" / "admin.key"))
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))


async def timed(session: aiohttp.ClientSession, url: str, n: int = 3) -> tuple[float, float]:
    """Median response time of a fresh answer (the stats sampling is reused for 1 s, so 1.2 s apart)
    and of an immediate repeat (what concurrent scrapers get)."""
    fresh, repeat = [], []
    for _ in range(n):
        await asyncio.sleep(1.2)
        for times in (fresh, repeat):
            start = time.monotonic()
            async with session.get(url) as resp:
                body = await resp.text()
                assert resp.status == 200, (url, resp.status, body[:200])
            times.append(time.monotonic() - start)
    return statistics.median(fresh), statistics.median(repeat)


async def test_monitoring_endpoints(kubectl, cluster, node):
    pod = await running_pod(kubectl, node)
    name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
    proxy = f"/api/v1/nodes/{node.name}/proxy"

    # /metrics/cadvisor, as Prometheus' kubelet cAdvisor job scrapes it (through the API server).
    text = await kubectl("get", "--raw", f"{proxy}/metrics/cadvisor")
    fams = {f.name: f.samples for f in text_string_to_metric_families(text)}
    ours = [s for s in fams["container_cpu_usage_seconds"] if s.labels["pod"] == name and s.labels["container"]]
    (cpu,) = ours
    status = pod["status"]["containerStatuses"][0]
    assert cpu.labels["container"] == "burn" and cpu.labels["namespace"] == "default" and cpu.labels["cpu"] == "total"
    assert cpu.labels["id"] == "/" + node.cgroups.container_path(pod, "burn")
    assert cpu.labels["name"] == status["containerID"].split("://")[-1] and cpu.labels["image"] == "busybox"
    for family in ("container_memory_working_set_bytes", "container_memory_rss", "container_memory_usage_bytes"):
        assert any(s.labels["pod"] == name and s.labels["container"] == "burn" for s in fams[family]), family
    assert any(s.labels["pod"] == name and s.labels["container"] == "" for s in fams["container_network_receive_bytes"])
    assert fams["machine_cpu_cores"][0].value == os.cpu_count()
    assert fams["machine_memory_bytes"][0].value > 0
    assert any(s.labels["id"] == "/" for s in fams["container_fs_usage_bytes"])

    # /metrics/probes: the readiness probe's attempts, by result.
    text = await kubectl("get", "--raw", f"{proxy}/metrics/probes")
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "prober_probe"]
    (sample,) = [s for s in family.samples if s.labels["pod"] == name]
    assert sample.name == "prober_probe_total" and sample.value >= 1
    assert sample.labels == {"probe_type": "Readiness", "result": "successful", "container": "burn", "pod": name,
                             "namespace": "default", "pod_uid": uid}  # fmt: skip

    # /metrics: the agent's own families and the standard process_* and python_* ones.
    text = await kubectl("get", "--raw", f"{proxy}/metrics")
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info", "kubelet_emu_pods"} <= names

    # /configz: JSON, nothing secret (the serving key is in the state dir, its path and bytes stay out).
    body = await kubectl("get", "--raw", f"{proxy}/configz")
    config = json.loads(body)
    assert config["kubeletconfig"]["port"] == node.port and config["kubeletEmu"]["handlers"]["procs"]
    assert "PRIVATE KEY" not in body and "kubelet.key" not in body

    def names(value: object) -> list[str]:
        if isinstance(value, dict):
            return [*value, *(n for v in value.values() for n in names(v))]
        return [n for v in value for n in names(v)] if isinstance(value, list) else []

    assert not [n for n in names(config) if SECRET_NAME.search(n)]

    # /logs/: the agent's own log, and nothing outside its directory.
    listing = await kubectl("get", "--raw", f"{proxy}/logs/")
    assert "kubelet-emu.log" in listing
    log = await kubectl("get", "--raw", f"{proxy}/logs/kubelet-emu.log")
    assert "kubelet API serving" in log
    base = f"https://{node.ip}:{node.port}"
    async with kubelet_client(cluster) as session:
        for path in (
            "/logs/..%2f..%2f..%2fetc%2fpasswd",
            "/logs/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
            "/logs/../../etc/passwd",
        ):
            async with session.get(URL(base + path, encoded=True), allow_redirects=False) as resp:
                assert resp.status == 404 and "root:" not in await resp.text(), path
        async with (
            aiohttp.ClientSession() as anonymous,
            anonymous.get(base + "/logs/", ssl=False) as resp,
        ):  # no credentials: refused, as every kubelet path
            assert resp.status == 401

        # Response times on the kubelet port, for the record: fresh / repeated within the second.
        times = {}
        for path in ("/metrics/cadvisor", "/metrics/probes", "/metrics", "/metrics/resource", "/configz",
                     "/logs/", "/logs/kubelet-emu.log"):  # fmt: skip
            times[path] = await timed(session, base + path)
        print("\nresponse times, ms (median of 3, fresh/repeat): "
              + ", ".join(f"{p} {a * 1000:.1f}/{b * 1000:.1f}" for p, (a, b) in times.items()))  # fmt: skip


PROMETHEUS = shutil.which("prometheus")


@pytest.mark.skipif(PROMETHEUS is None, reason="Prometheus is not installed (Debian package prometheus)")
async def test_prometheus_scrapes_cadvisor_and_probes(kubectl, cluster, node, tmp_path):
    """Debian's Prometheus scraping the node as its kubelet cAdvisor and probes jobs do."""
    from conftest import eventually, free_port

    pod = await running_pod(kubectl, node)
    name = pod["metadata"]["name"]
    pki = cluster.dir / "pki"
    tls = {"cert_file": str(pki / "admin.crt"), "key_file": str(pki / "admin.key"), "insecure_skip_verify": True}
    jobs = [
        {"job_name": job, "scheme": "https", "metrics_path": path, "tls_config": tls,
         "static_configs": [{"targets": [f"{node.ip}:{node.port}"]}]}
        for job, path in (("kubelet-cadvisor", "/metrics/cadvisor"), ("kubelet-probes", "/metrics/probes"))
    ]  # fmt: skip
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({"global": {"scrape_interval": "1s", "scrape_timeout": "1s"}, "scrape_configs": jobs}))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - the child's
    proc = await asyncio.create_subprocess_exec(
        str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}", stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
    )  # fmt: skip
    log.close()
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        async with aiohttp.ClientSession() as session:

            async def get(path: str, **params: str) -> dict | None:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(api + path, params=params) as resp:
                        return (await resp.json())["data"]
                return None

            async def healthy() -> list | None:
                data = await get("/targets")
                targets = (data or {}).get("activeTargets") or []
                done = len(targets) == 2 and all(t["health"] == "up" for t in targets)
                return targets if done else None

            try:
                targets = await eventually(healthy, 60, interval=1, what="both scrape targets up")
            except BaseException:
                print((await get("/targets")) or (tmp_path / "prometheus.log").read_text()[-3000:])
                raise
            assert all(t["lastError"] == "" for t in targets), targets

            async def series(query: str) -> list | None:
                data = await get("/query", query=query)
                return (data or {}).get("result") or None

            cpu = await eventually(
                lambda: series(f'rate(container_cpu_usage_seconds_total{{pod="{name}",container="burn"}}[5s])'),
                30, interval=1, what="the burner's CPU rate in Prometheus",
            )  # fmt: skip
            probes = await eventually(
                lambda: series(f'prober_probe_total{{pod="{name}",probe_type="Readiness"}}'), 30, interval=1,
                what="the burner's probes in Prometheus",
            )  # fmt: skip
        rate = float(cpu[0]["value"][1])
        print(f"\nPrometheus: rate(container_cpu_usage_seconds_total[5s]) = {rate * 1000:.0f}m; "
              f"prober_probe_total = {probes[0]['value'][1]}")  # fmt: skip
        assert 0 < rate <= LIMIT_MILLICORES / 1000 * 1.2
        assert cpu[0]["metric"]["namespace"] == "default" and cpu[0]["metric"]["id"].endswith("/burn")
    finally:
        proc.terminate()
        await proc.wait()
