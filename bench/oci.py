"""Benchmark: Pods from images through the OCI backend (real runc), and cold image pulls.

    python3 bench/oci.py [--pods 20] [--pulls 3] [--json out.json]

1. Cold pull: a ~5 MB image (busybox plus 5 MiB of random bytes) pulled from a docker-registry on
   127.0.0.1 into an empty image store (pull, digest checks, unpack), --pulls times, fresh store
   each time.
2. Pod start with a cached image: kubelet-emu with a runc handler on the dev cluster; one warm-up
   Pod pulls the image, then N Pods are created at once (spec.nodeName preset) and timed from
   creation to Running through a watch; then N Pods one after the other (each waits for the
   previous), which is the latency without queueing. Deletion time too.
A benchmark: it prints numbers, writes JSON with --json, and asserts nothing. Needs root and runc.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
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
    pct,
    pod_body,
    print_results,
    rss,
    run_main,
    start_node_agent,
    wait_for,
)
from devcluster import manage
from images.build import BUSYBOX_PATH, busybox_files, push_image, random_files
from images.local_registry import start_registry
from images.reference import parse_reference
from images.service import ImageService

NODE = "bench-oci"
CONFIG = {"Cmd": ["sh"], "Env": [f"PATH={BUSYBOX_PATH}"]}


async def cold_pulls(image: str, times: int, work: Path) -> list[float]:
    seconds = []
    for i in range(times):
        store = ImageService(work / f"store-{i}")
        t0 = time.monotonic()
        await store.pull(parse_reference(image))
        seconds.append(time.monotonic() - t0)
        await store.close()
        shutil.rmtree(work / f"store-{i}", ignore_errors=True)
    return seconds


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=20)
    ap.add_argument("--pulls", type=int, default=3, help="cold pulls of the 5 MB image")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "kubelet-emu-bench")
    ap.add_argument("--port", type=int, default=16543, help="the bench cluster's API server port")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    runc = shutil.which("runc")
    if runc is None:
        print("runc is not installed (Debian package runc)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="bench-oci-"))
    registry = await start_registry(work / "registry")
    results: dict = {"pods": args.pods}
    try:
        await push_image(registry.url, "busybox", "1", busybox_files(), config=CONFIG)
        layers = [busybox_files(), random_files(5 << 20)]
        await push_image(registry.url, "big", "5mb", layers=layers, config=CONFIG)
        pulls = await cold_pulls(f"{registry.host}/big:5mb", args.pulls, work)
        results.update(
            cold_pull_5mb_s=[round(p, 3) for p in pulls], cold_pull_5mb_median_s=round(statistics.median(pulls), 3)
        )

        cluster = await manage.up(args.dir, port=args.port, quiet=False, fresh=True)
        config = work / "agent.toml"
        config.write_text(
            f'default_runtime = "runc"\nevents = "warnings"\n[node]\nmax_pods = {args.pods * 2 + 10}\n'
            f'cgroup_root = "kubelet-emu-bench"\n[runtimes.runc]\nbackend = "oci"\nruntime_path = "{runc}"\n'
            f'runtime_root = "{work / "runc"}"\n'
        )
        agent = await start_node_agent(cluster, NODE, config, work)
        ctx = cluster_admin_ssl(cluster)
        namespace = f"bench-oci-{int(time.time())}"
        image = f"{registry.host}/busybox:1"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=32)) as s:
            server = cluster.server
            await create_namespace(s, server, namespace, NODE, tries=300)
            check_agent(agent, NODE, work / "agent.log")  # died at start: its exit code and log
            watcher = Watcher(s, server, namespace)
            watch_task = asyncio.create_task(watcher.run())
            await watcher.ready.wait()

            def body(i: int) -> dict:
                b = pod_body(i, namespace, NODE, ["sleep", "3600"])
                b["spec"]["containers"][0].update(image=image, imagePullPolicy="IfNotPresent")
                return b

            # Warm-up: pulls the image into the agent's store (and starts its shim launcher).
            await create_pods(s, server, namespace, [body(0)], 1)
            await wait_for(lambda: len(watcher.running) >= 1, 120)
            warm = watcher.latencies()[0]

            # N at once.
            t0 = time.monotonic()
            await create_pods(s, server, namespace, [body(i) for i in range(1, args.pods + 1)], 32)
            ok = await wait_for(lambda: len(watcher.running) >= args.pods + 1, 300)
            burst_all = max(watcher.running.values()) - t0
            burst = [watcher.running[n] - watcher.seen[n] for n in watcher.running if n != "bench-000000"]
            rss_with_pods = rss(agent.pid)

            # N one after the other.
            serial = []
            for i in range(args.pods + 1, 2 * args.pods + 1):
                await create_pods(s, server, namespace, [body(i)], 1)
                name = f"bench-{i:06d}"
                await wait_for(lambda n=name: n in watcher.running, 60)
                if name in watcher.running:
                    serial.append(watcher.running[name] - watcher.seen[name])
            t1 = time.monotonic()
            total = 2 * args.pods + 1
            await delete_pods(s, server, namespace, total, 32)
            gone = await wait_for(lambda: len(watcher.gone) >= total, 300)
            t_gone = max(watcher.gone.values()) - t1 if watcher.gone else float("nan")
            watch_task.cancel()
            async with s.delete(f"{server}/api/v1/namespaces/{namespace}") as r:
                await r.read()
        agent.terminate()
        await agent.wait()
        await remove_node_network(work / "state", NODE)
        results.update(
            all_running=ok,
            all_gone=gone,
            warmup_pod_with_pull_s=round(warm, 3),
            burst_time_to_all_running_s=round(burst_all, 3),
            burst_latency_p50_s=round(pct(burst, 50), 3),
            burst_latency_p99_s=round(pct(burst, 99), 3),
            serial_latency_p50_s=round(pct(serial, 50), 3),
            serial_latency_p99_s=round(pct(serial, 99), 3),
            time_to_all_deleted_s=round(t_gone, 3),
            agent_rss_with_pods_mib=round(rss_with_pods / 2**20, 1),
        )
    finally:
        await registry.stop()
        from cgroups.manager import CgroupManager

        CgroupManager(root="kubelet-emu-bench").remove("kubelet-emu-bench", kill=True)
    print_results(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
