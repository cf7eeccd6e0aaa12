"""Benchmark: N emulated Pods on one kubelet-emu node of the real dev cluster.

    python3 bench/pods.py [--pods 1000] [--events warnings] [--json out.json]

Creates the Pods with spec.nodeName preset (this measures the agent, not the
scheduler) as fast as the API server takes them, and reports: time until all
are Running, creation-to-Running latency (both ends seen through a watch),
time until all are gone after deletion, the agent's peak RSS and CPU seconds,
and the API requests per Pod the agent made. A benchmark, not a test: it
prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devcluster import manage

NODE = "bench-emu"


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS bytes) of a live process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    peak = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cpu, peak


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def pod_body(i: int, namespace: str, backend: str) -> dict:
    container = {"name": "main", "image": "registry.k8s.io/pause:3.10"}
    if backend == "process":
        container["command"] = ["sleep", "3600"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"bench-{i:06d}", "namespace": namespace, "labels": {"app": "bench"}},
        "spec": {"nodeName": NODE, "containers": [container], "terminationGracePeriodSeconds": 1},
    }


def shim_rss(agent_pid: int) -> int:
    """Total RSS of the process backend's shims (one per running container)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"runtimes.shim" in cmd:
            total += rss(int(entry))
    return total


class Watcher:
    """Admin-side watch of the benchmark namespace: first-seen and Running times per Pod."""

    def __init__(self, session: aiohttp.ClientSession, server: str, namespace: str):
        self.session, self.server, self.namespace = session, server, namespace
        self.seen: dict[str, float] = {}
        self.running: dict[str, float] = {}
        self.gone: dict[str, float] = {}
        self.running_curve: list[tuple[float, int]] = []
        self.ready = asyncio.Event()

    async def run(self) -> None:
        url = f"{self.server}/api/v1/namespaces/{self.namespace}/pods"
        async with self.session.get(url, params={"limit": "1"}) as r:
            rv = (await r.json())["metadata"]["resourceVersion"]
        params = {"watch": "1", "resourceVersion": rv, "allowWatchBookmarks": "true"}
        async with self.session.get(url, params=params, timeout=aiohttp.ClientTimeout(total=None)) as resp:
            self.ready.set()
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                *lines, buf = buf.split(b"\n")
                now = time.monotonic()
                for line in lines:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    obj = event["object"]
                    name = obj.get("metadata", {}).get("name")
                    if event["type"] == "ADDED":
                        self.seen.setdefault(name, now)
                    if event["type"] == "DELETED":
                        self.gone[name] = now
                    elif obj.get("status", {}).get("phase") == "Running" and name not in self.running:
                        self.running[name] = now
                        self.running_curve.append((now, len(self.running)))


async def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=1000)
    ap.add_argument("--backend", default="emulated", choices=["emulated", "process"])
    ap.add_argument("--events", default="warnings", choices=["all", "warnings", "none"], help="agent `events` policy")
    ap.add_argument("--concurrency", type=int, default=64, help="parallel create/delete requests")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "kubelet-emu-bench")
    ap.add_argument("--port", type=int, default=16543, help="the bench cluster's API server port")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    cluster = await manage.up(args.dir, port=args.port, quiet=False)
    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    config = work / "agent.toml"
    config.write_text(
        f'default_runtime = "bench"\nevents = "{args.events}"\n[node]\nmax_pods = {args.pods + 10}\n'
        f'cgroup_root = "kubelet-emu-bench"\n[runtimes.bench]\nbackend = "{args.backend}"\n'
    )
    kubeconfig = await manage.node_kubeconfig(cluster.dir, NODE)
    with open(work / "agent.log", "wb") as log:
        agent = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.cli", "run", "--kubeconfig", str(kubeconfig), "--node-name", NODE,
            "--config", str(config), "--state-dir", str(work / "state"),
            stdout=log, stderr=asyncio.subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent,
        )  # fmt: skip

    ctx = ssl.create_default_context(cafile=str(cluster.ca_cert))
    ctx.load_cert_chain(str(cluster.dir / "pki" / "admin.crt"), str(cluster.dir / "pki" / "admin.key"))
    namespace = f"bench-{int(time.time())}"
    results: dict = {"pods": args.pods, "backend": args.backend, "events": args.events}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=args.concurrency)) as s:
        server = cluster.server
        async with s.post(f"{server}/api/v1/namespaces", json={"metadata": {"name": namespace}}) as r:
            assert r.status < 300, await r.text()
        # Wait for the node, its default ServiceAccount, and an idle agent.
        for _ in range(200):
            async with s.get(f"{server}/api/v1/nodes/{NODE}") as r:
                node_ok = r.status == 200
            async with s.get(f"{server}/api/v1/namespaces/{namespace}/serviceaccounts/default") as r:
                if node_ok and r.status == 200:
                    break
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)
        idle_rss = rss(agent.pid)
        cpu0, _ = proc_stats(agent.pid)

        watcher = Watcher(s, server, namespace)
        watch_task = asyncio.create_task(watcher.run())
        await watcher.ready.wait()

        sem = asyncio.Semaphore(args.concurrency)

        async def create(i: int) -> None:
            url = f"{server}/api/v1/namespaces/{namespace}/pods"
            async with sem, s.post(url, json=pod_body(i, namespace, args.backend)) as r:
                if r.status >= 300:
                    print("create failed:", r.status, await r.text(), file=sys.stderr)

        t0 = time.monotonic()
        await asyncio.gather(*(create(i) for i in range(args.pods)))
        created = time.monotonic() - t0
        all_running = await wait_for(lambda: len(watcher.running) >= args.pods, 600)
        t_running = (max(watcher.running.values()) - t0) if watcher.running else float("nan")
        latencies = [watcher.running[n] - watcher.seen[n] for n in watcher.running if n in watcher.seen]
        cpu1, _ = proc_stats(agent.pid)
        loaded_rss = rss(agent.pid)
        shims = shim_rss(agent.pid)

        # Ask the agent for its request counters now, to split creation from deletion.
        agent.send_signal(signal.SIGUSR1)
        await asyncio.sleep(0.5)
        at_running = json.loads((work / "state" / "agent-stats.json").read_text())
        t1 = time.monotonic()

        async def delete(i: int) -> None:
            url = f"{server}/api/v1/namespaces/{namespace}/pods/bench-{i:06d}"
            async with sem, s.delete(url) as r:
                await r.read()

        await asyncio.gather(*(delete(i) for i in range(args.pods)))
        all_gone = await wait_for(lambda: len(watcher.gone) >= args.pods, 600)
        t_gone = (max(watcher.gone.values()) - t1) if watcher.gone else float("nan")
        cpu2, peak = proc_stats(agent.pid)
        watch_task.cancel()
        async with s.delete(f"{server}/api/v1/namespaces/{namespace}") as r:
            await r.read()

    agent.terminate()
    await agent.wait()
    if args.backend == "process":  # the bench's own cgroup root, now empty
        from cgroups.manager import CgroupManager

        CgroupManager(root="kubelet-emu-bench").remove("kubelet-emu-bench", kill=True)
    stats = json.loads((work / "state" / "agent-stats.json").read_text())
    requests = stats["requests_by_verb"]
    write_verbs = ("POST", "PUT", "PATCH", "DELETE")
    writes = sum(v for k, v in requests.items() if k in write_verbs)
    early = at_running["requests_by_verb"]
    # Node status and lease writes are per node, not per Pod; they are a handful over a run.
    writes_to_running = sum(v for k, v in early.items() if k in write_verbs)
    results.update(
        all_running=all_running,
        all_gone=all_gone,
        create_seconds=round(created, 3),
        time_to_all_running_s=round(t_running, 3),
        latency_p50_s=round(pct(latencies, 50), 3),
        latency_p95_s=round(pct(latencies, 95), 3),
        latency_p99_s=round(pct(latencies, 99), 3),
        latency_mean_s=round(statistics.fmean(latencies), 3) if latencies else None,
        time_to_all_deleted_s=round(t_gone, 3),
        agent_idle_rss_mib=round(idle_rss / 2**20, 1),
        agent_rss_with_pods_mib=round(loaded_rss / 2**20, 1),
        agent_peak_rss_mib=round(peak / 2**20, 1),
        shims_rss_with_pods_mib=round(shims / 2**20, 1),
        agent_cpu_s_create_to_running=round(cpu1 - cpu0, 2),
        agent_cpu_s_total_run=round(cpu2 - cpu0, 2),
        agent_requests_by_verb=requests,
        agent_status_writes=stats["status_writes"],
        agent_writes_per_pod_to_running=round(writes_to_running / args.pods, 3),
        agent_writes_per_pod_total=round(writes / args.pods, 3),
        agent_status_writes_per_pod=round(stats["status_writes"] / args.pods, 2),
        agent_events_posted=stats["events_posted"],
    )
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
