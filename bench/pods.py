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
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.pod_network import remove_node_network
from bench.common import (
    Watcher,
    check_agent,
    cluster_admin_ssl,
    create_namespace,
    create_pods,
    delete_pods,
    network_helper_rss,
    pct,
    pod_body,
    print_results,
    proc_stats,
    rss,
    run_main,
    shim_rss,
    start_node_agent,
    wait_for,
)
from devcluster import manage

NODE = "bench-emu"


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=1000)
    ap.add_argument("--backend", default="emulated", choices=["emulated", "process"])
    ap.add_argument("--events", default="warnings", choices=["all", "warnings", "none"], help="agent `events` policy")
    ap.add_argument("--concurrency", type=int, default=64, help="parallel create/delete requests")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "kubelet-emu-bench")
    ap.add_argument("--idle-seconds", type=float, default=30, help="idle time with all Pods Running (0: skip)")
    ap.add_argument("--port", type=int, default=16543, help="the bench cluster's API server port")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--no-pod-network", action="store_true", help="process Pods share the host's network")
    ap.add_argument(
        "--extra-config", default="", help='TOML appended to the agent config, e.g. "[kubelet_api]\\nenabled = false"'
    )
    args = ap.parse_args()

    cluster = await manage.up(args.dir, port=args.port, quiet=False, fresh=True)
    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    config = work / "agent.toml"
    config.write_text(
        f'default_runtime = "bench"\nevents = "{args.events}"\n[node]\nmax_pods = {args.pods + 10}\n'
        f'cgroup_root = "kubelet-emu-bench"\n[runtimes.bench]\nbackend = "{args.backend}"\n'
        f"[network]\nenabled = {str(not args.no_pod_network).lower()}\n" + args.extra_config.replace("\\n", "\n") + "\n"
    )
    agent = await start_node_agent(cluster, NODE, config, work)

    ctx = cluster_admin_ssl(cluster)
    namespace = f"bench-{int(time.time())}"
    results: dict = {"pods": args.pods, "backend": args.backend, "events": args.events}
    results["pod_network"] = not args.no_pod_network
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=args.concurrency)) as s:
        server = cluster.server
        # Wait for the node, its default ServiceAccount, and an idle agent.
        await create_namespace(s, server, namespace, NODE, tries=200)
        await asyncio.sleep(2)
        check_agent(agent, NODE, work / "agent.log")  # died at start: its exit code and log
        idle_rss = rss(agent.pid)
        cpu0, _ = proc_stats(agent.pid)

        watcher = Watcher(s, server, namespace)
        watch_task = asyncio.create_task(watcher.run())
        await watcher.ready.wait()

        command = ["sleep", "3600"] if args.backend == "process" else None
        bodies = [pod_body(i, namespace, NODE, command) for i in range(args.pods)]
        t0 = time.monotonic()
        created = await create_pods(s, server, namespace, bodies, args.concurrency)
        all_running = await wait_for(lambda: len(watcher.running) >= args.pods, 600)
        t_running = (max(watcher.running.values()) - t0) if watcher.running else float("nan")
        latencies = watcher.latencies()
        cpu1, _ = proc_stats(agent.pid)
        loaded_rss = rss(agent.pid)
        shims = shim_rss()
        helper = network_helper_rss()

        # Ask the agent for its request counters now, to split creation from deletion.
        agent.send_signal(signal.SIGUSR1)
        await asyncio.sleep(0.5)
        at_running = json.loads((work / "state" / "agent-stats.json").read_text())
        # Then stay idle: with nothing changing, the agent should write nothing per Pod.
        idle_writes = None
        if args.idle_seconds > 0:
            await asyncio.sleep(args.idle_seconds)
            agent.send_signal(signal.SIGUSR1)
            await asyncio.sleep(0.5)
            after_idle = json.loads((work / "state" / "agent-stats.json").read_text())
            idle_writes = after_idle["status_writes"] - at_running["status_writes"]
        t1 = time.monotonic()

        await delete_pods(s, server, namespace, args.pods, args.concurrency)
        all_gone = await wait_for(lambda: len(watcher.gone) >= args.pods, 600)
        t_gone = (max(watcher.gone.values()) - t1) if watcher.gone else float("nan")
        cpu2, peak = proc_stats(agent.pid)
        watch_task.cancel()
        async with s.delete(f"{server}/api/v1/namespaces/{namespace}") as r:
            await r.read()

    agent.terminate()
    await agent.wait()
    await remove_node_network(work / "state", NODE)
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
        shims_pss_with_pods_mib=round(shims / 2**20, 1),
        network_helper_pss_mib=round(helper / 2**20, 1),
        agent_cpu_s_create_to_running=round(cpu1 - cpu0, 2),
        agent_cpu_s_total_run=round(cpu2 - cpu0, 2),
        agent_requests_by_verb=requests,
        agent_status_writes=stats["status_writes"],
        agent_writes_per_pod_to_running=round(writes_to_running / args.pods, 3),
        agent_writes_per_pod_total=round(writes / args.pods, 3),
        agent_status_writes_per_pod=round(stats["status_writes"] / args.pods, 2),
        agent_events_posted=stats["events_posted"],
        pod_status_writes_while_idle=idle_writes,
    )
    print_results(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
