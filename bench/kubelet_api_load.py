"""Benchmark: the kubelet API under load on one kubelet-emu node with N process Pods.

    sudo python3 bench/kubelet_api_load.py [--pods 50] [--streams 200] [--rate 50] [--seconds 60]
                                           [--via direct|proxy] [--json out.json]

Starts the dev cluster and an agent (process backend), creates N Pods that log a line a second,
then for `--seconds`: keeps `--streams` `follow` log streams open (containerLogs, spread over the
Pods) and sends `--rate` requests a second to /stats/summary, straight to the agent's HTTPS port
with the API server's kubelet client certificate (`--via direct`) or through the API server's node
proxy (`--via proxy`). It measures Pod start latency (creation to Running through a watch) for
`--start-pods` Pods created without load and again during the load, the Summary latencies and
errors, log bytes received, and the agent's RSS and CPU. The load runs in a process of its own, so
its CPU use does not stall the watch that timestamps Pod starts. Prints a table; --json writes it too.
A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.pod_network import remove_node_network
from bench.common import (
    Watcher,
    admin_ssl,
    check_agent,
    cluster_admin_ssl,
    create_namespace,
    create_pods,
    pct,
    pod_body,
    print_results,
    proc_stats,
    rss,
    run_main,
    start_node_agent,
    wait_for,
)
from devcluster import manage

NODE = "bench-api"
CGROUP_ROOT = "kubelet-emu-bench-api"
TICKER = ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done"]


def kubelet_client_ssl(pki: Path) -> ssl.SSLContext:
    """The API server's own client identity toward kubelets; the agent's serving certificate is not
    checked (this measures load, not trust)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(pki / "apiserver-kubelet-client.crt"), str(pki / "apiserver-kubelet-client.key"))
    return ctx


def routable_ip() -> str | None:
    """This host's outgoing address: the API server's node proxy refuses loopback node addresses."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("8.8.8.8", 9))  # sends nothing: only picks the outgoing address
            return s.getsockname()[0]
        except OSError:
            return None


class AgentSampler:
    """The agent's RSS and CPU, sampled every second."""

    def __init__(self, pid: int):
        self.pid = pid
        self.rss: list[int] = []

    async def run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.rss.append(rss(self.pid))
            await asyncio.sleep(1.0)


async def start_latencies(
    s: aiohttp.ClientSession, server: str, namespace: str, watcher: Watcher, first: int, count: int, timeout: float
) -> list[float]:
    """Create `count` Pods (indices first..) and return their creation-to-Running latencies."""
    bodies = [pod_body(i, namespace, NODE, TICKER) for i in range(first, first + count)]
    names = {b["metadata"]["name"] for b in bodies}
    await create_pods(s, server, namespace, bodies, 20)
    await wait_for(lambda: names <= watcher.running.keys(), timeout)
    return [watcher.running[n] - watcher.seen[n] for n in names if n in watcher.running and n in watcher.seen]


async def follow_stream(s: aiohttp.ClientSession, url: str, stop: asyncio.Event, counters: dict[str, int]) -> None:
    try:
        async with s.get(url, timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as r:
            if r.status != 200:
                counters["stream_errors"] += 1
                return
            counters["streams_open"] += 1
            async for chunk in r.content.iter_any():
                counters["log_bytes"] += len(chunk)
                if stop.is_set():
                    break
    except (aiohttp.ClientError, TimeoutError):
        counters["stream_errors"] += 1


async def summary_load(
    s: aiohttp.ClientSession, url: str, rate: float, stop: asyncio.Event, latencies: list[float], counters: dict
) -> None:
    async def one() -> None:
        t0 = time.monotonic()
        try:
            async with s.get(url) as r:
                body = await r.read()
                if r.status != 200:
                    counters["summary_errors"] += 1
                    return
                counters["summary_bytes"] = len(body)
            latencies.append(time.monotonic() - t0)
        except (aiohttp.ClientError, TimeoutError):
            counters["summary_errors"] += 1

    tasks: set[asyncio.Task[None]] = set()
    next_at = time.monotonic()
    while not stop.is_set():
        task = asyncio.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        next_at += 1.0 / rate
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await asyncio.gather(*tasks, return_exceptions=True)


def summarize(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    return {
        "n": len(values),
        "p50": round(pct(values, 50) * scale, 1),
        "p95": round(pct(values, 95) * scale, 1),
        "p99": round(pct(values, 99) * scale, 1),
        "max": round(max(values) * scale, 1),
    }


async def load_worker(spec_path: Path) -> int:
    """The load, in its own process: follow streams and Summary requests; prints JSON results."""
    spec = json.loads(spec_path.read_text())
    pki = Path(spec["pki"])
    if spec["via"] == "proxy":
        api_ssl = admin_ssl(Path(spec["ca"]), pki / "admin.crt", pki / "admin.key")
    else:
        api_ssl = kubelet_client_ssl(pki)
    base, namespace = spec["base"], spec["namespace"]
    limit = len(spec["pods"]) + 2 * int(spec["rate"]) + 50
    counters = {"streams_open": 0, "stream_errors": 0, "log_bytes": 0, "summary_errors": 0, "summary_bytes": 0}
    summary_latencies: list[float] = []
    stop = asyncio.Event()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=api_ssl, limit=limit)) as api:
        streams = [
            asyncio.create_task(
                follow_stream(api, f"{base}/containerLogs/{namespace}/{name}/main?follow=true", stop, counters)
            )
            for name in spec["pods"]
        ]
        load = asyncio.create_task(
            summary_load(api, f"{base}/stats/summary", spec["rate"], stop, summary_latencies, counters)
        )
        t0 = time.monotonic()
        await asyncio.sleep(spec["seconds"])
        elapsed = time.monotonic() - t0
        stop.set()
        await load
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    print(json.dumps({"counters": counters, "summary_latencies": summary_latencies, "elapsed": elapsed}))
    return 0


async def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--load-worker":
        return await load_worker(Path(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=50, help="process Pods running during the load")
    ap.add_argument("--streams", type=int, default=200, help="concurrent follow log streams")
    ap.add_argument("--rate", type=float, default=50, help="/stats/summary requests per second")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--start-pods", type=int, default=20, help="Pods created to measure start latency")
    ap.add_argument("--via", choices=["direct", "proxy"], default="direct")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "kubelet-emu-bench-api")
    ap.add_argument("--port", type=int, default=16553, help="the bench cluster's API server port")
    ap.add_argument("--kubelet-port", type=int, default=16250)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    cluster = await manage.up(args.dir, port=args.port, quiet=False, fresh=True)
    pki = cluster.dir / "pki"
    work = Path(tempfile.mkdtemp(prefix="bench-api-agent-"))
    config = work / "agent.toml"
    cidr = f"10.{random.randrange(100, 250)}.{random.randrange(0, 255)}.0/24"
    config.write_text(
        f'default_runtime = "procs"\nevents = "warnings"\n[node]\nmax_pods = {args.pods + 2 * args.start_pods + 10}\n'
        f'cgroup_root = "{CGROUP_ROOT}"\n[network]\npod_cidr = "{cidr}"\n[runtimes.procs]\nbackend = "process"\n'
    )
    node_ip = ["--node-ip", ip] if (ip := routable_ip()) and args.via == "proxy" else []
    agent = await start_node_agent(cluster, NODE, config, work, "--port", str(args.kubelet_port), *node_ip)

    admin = cluster_admin_ssl(cluster)
    server = cluster.server
    namespace = f"bench-api-{int(time.time())}"
    results: dict[str, Any] = {"pods": args.pods, "streams": args.streams, "rate": args.rate, "via": args.via}
    sampler = AgentSampler(agent.pid)
    sampler_task = asyncio.create_task(sampler.run())
    base = f"{server}/api/v1/nodes/{NODE}/proxy" if args.via == "proxy" else f"https://127.0.0.1:{args.kubelet_port}"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=admin, limit=64)) as s:
            await create_namespace(s, server, namespace, NODE, tries=300)
            check_agent(agent, NODE, work / "agent.log")  # died at start: its exit code and log
            watcher = Watcher(s, server, namespace)
            watch_task = asyncio.create_task(watcher.run())
            await watcher.ready.wait()

            bodies = [pod_body(i, namespace, NODE, TICKER) for i in range(args.pods)]
            await create_pods(s, server, namespace, bodies, 32)
            all_running = await wait_for(lambda: len(watcher.running) >= args.pods, 300)
            results["all_running"] = all_running
            await asyncio.sleep(3)
            results["agent_rss_idle_mib"] = round(rss(agent.pid) / 2**20, 1)

            quiet = await start_latencies(s, server, namespace, watcher, args.pods, args.start_pods, 120)
            cpu0, _ = proc_stats(agent.pid)
            # The load comes from a process of its own, so that its CPU use does not delay this
            # process's watch (which timestamps the Pod starts) more than the machine's load does.
            names = [bodies[i % args.pods]["metadata"]["name"] for i in range(args.streams)]
            spec = {"base": base, "namespace": namespace, "pods": names, "rate": args.rate,
                    "seconds": args.seconds, "via": args.via, "pki": str(pki), "ca": str(cluster.ca_cert)}  # fmt: skip
            (work / "load.json").write_text(json.dumps(spec))
            worker = await asyncio.create_subprocess_exec(
                sys.executable,
                str(Path(__file__).resolve()),
                "--load-worker",
                str(work / "load.json"),
                stdout=asyncio.subprocess.PIPE,
            )
            t0 = time.monotonic()
            await asyncio.sleep(min(5.0, args.seconds / 4))  # the load settles before Pods are created
            loaded = await start_latencies(s, server, namespace, watcher, args.pods + args.start_pods,
                                           args.start_pods, 120)  # fmt: skip
            out, _ = await worker.communicate()
            elapsed = time.monotonic() - t0
            cpu1, peak = proc_stats(agent.pid)
            load = json.loads(out)
            counters, summary_latencies = load["counters"], load["summary_latencies"]
            elapsed = load["elapsed"]
            watch_task.cancel()
            async with s.delete(f"{server}/api/v1/namespaces/{namespace}") as r:
                await r.read()
            load_rss = sampler.rss[-int(elapsed) :] if sampler.rss else [0]
            results.update(
                load_seconds=round(elapsed, 1),
                summary_requests_ok=len(summary_latencies),
                summary_requests_per_s=round(len(summary_latencies) / elapsed, 1),
                summary_errors=counters["summary_errors"],
                summary_bytes=counters["summary_bytes"],
                summary_latency_ms=summarize(summary_latencies),
                streams_opened=counters["streams_open"],
                stream_errors=counters["stream_errors"],
                log_bytes_received=counters["log_bytes"],
                pod_start_without_load_ms=summarize(quiet),
                pod_start_with_load_ms=summarize(loaded),
                agent_cpu_s_during_load=round(cpu1 - cpu0, 2),
                agent_cpu_percent_during_load=round(100 * (cpu1 - cpu0) / elapsed, 1),
                agent_rss_during_load_mib=round(max(load_rss) / 2**20, 1),
                agent_peak_rss_mib=round(peak / 2**20, 1),
            )
            # Wait for the Pods to go (process containers outlive a stopped agent by design).
            await wait_for(lambda: len(watcher.gone) >= len(watcher.seen), 120)
    finally:
        sampler_task.cancel()
        agent.terminate()
        await agent.wait()
        await remove_node_network(work / "state", NODE)
        with contextlib.suppress(Exception):
            from cgroups.manager import CgroupManager

            CgroupManager(root=CGROUP_ROOT).remove(CGROUP_ROOT, kill=True)
    print_results(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
