"""Fleet mode at rest: time until N nodes are Ready, RSS, bytes per node, API writes per idle node.

    python -m bench.fleet_idle --dir /tmp/cluster --count 100 --idle 60 [--trace]

Starts `kubelet-emu fleet --count N` against a running dev cluster (with its fleet credential),
polls the Nodes until all N are Ready, then counts the fleet's own API requests over --idle
seconds (SIGUSR1 writes them to <state>/agent-stats.json). --trace runs the fleet under
tracemalloc and reports the Python heap it holds and its largest allocation sites (divide the
difference of two counts by the difference of the counts for bytes per node); --cprofile FILE
runs it under cProfile (CPU time, bench/cpu_profile.py). Prints one JSON line; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import admin_ssl, check_agent, proc_stats, rss, run_main
from devcluster import manage
from devcluster.fleet_credential import fleet_kubeconfig

WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE")
CONFIG = """
default_runtime = "fast"
events = "warnings"
[runtimes.fast]
backend = "emulated"
[fleet]
name = "{name}"
node_name = "{name}-{{index}}"
count = 1
[fleet.labels]
"topology.kubernetes.io/zone" = "zone-{{index % 3}}"
"""


async def ready_count(s: aiohttp.ClientSession, server: str, selector: str) -> tuple[int, int]:
    async with s.get(f"{server}/api/v1/nodes", params={"labelSelector": selector}) as r:
        items = (await r.json())["items"]
    ready = sum(
        1
        for n in items
        if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions") or ())
    )
    return len(items), ready


async def read_stats(proc: asyncio.subprocess.Process, path: Path) -> dict[str, Any]:
    path.unlink(missing_ok=True)
    proc.send_signal(signal.SIGUSR1)
    for _ in range(600):  # a heap snapshot of 1000 nodes under tracemalloc takes a while
        if path.exists():
            try:
                return json.loads(path.read_text())
            except ValueError:
                pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the fleet wrote no {path}")


def writes(stats: dict[str, Any]) -> int:
    return sum(stats["requests_by_verb"].get(v, 0) for v in WRITE_VERBS)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="a running dev cluster's directory")
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--idle", type=float, default=60.0, help="seconds of idle API traffic to count (0: skip)")
    ap.add_argument("--trace", action="store_true", help="run the fleet under tracemalloc (slower start)")
    ap.add_argument("--cprofile", type=Path, help="run the fleet under cProfile (CPU time); the .prof is written here")
    # A fresh prefix by default: the Leases of an earlier run's Nodes are deleted by the garbage
    # collector some time after their Nodes, under new nodes of the same names.
    ap.add_argument("--name", default=f"bf{secrets.token_hex(2)}", help="node name prefix")
    args = ap.parse_args()
    cluster = manage.read_cluster(args.dir)
    if cluster is None:
        print(f"no dev cluster runs in {args.dir}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fleet-idle-"))
    (work / "fleet.toml").write_text(CONFIG.format(name=args.name))
    kubeconfig = await fleet_kubeconfig(cluster, "bench")
    pki = cluster.dir / "pki"
    ssl_ctx = admin_ssl(cluster.ca_cert, pki / "admin.crt", pki / "admin.key")
    argv = [sys.executable, *(["-X", "tracemalloc=1"] if args.trace else [])]
    if args.cprofile is not None:  # written when the fleet exits (SIGTERM at the end)
        argv += [str(Path(__file__).with_name("cpu_profile.py")), str(args.cprofile)]
    argv += ["-m", "agent.cli", "fleet"]
    argv += ["--config", str(work / "fleet.toml"), "--kubeconfig", str(kubeconfig), "--count", str(args.count)]
    argv += ["--state-dir", str(work / "state")]
    log_path = work / "fleet.log"
    result: dict[str, Any] = {"nodes": args.count, "trace": args.trace}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_ctx)) as s:
        selector = f"kubelet-emu.io/fleet={args.name}"
        t0 = time.monotonic()
        with open(log_path, "wb") as log:
            proc = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=log, env=dict(os.environ))
        try:
            marks: dict[int, float] = {}
            while True:
                check_agent(proc, "kubelet-emu fleet", log_path)
                _, ready = await ready_count(s, cluster.server, selector)
                for share in (0.5, 0.9, 1.0):
                    if ready >= share * args.count and share not in marks:
                        marks[share] = round(time.monotonic() - t0, 2)  # type: ignore[index]
                if ready >= args.count:
                    break
                await asyncio.sleep(0.5)
            result["seconds_to_ready"] = {f"{int(k * 100)}%": v for k, v in marks.items()}
            await asyncio.sleep(15)  # the start's writes settle
            stats_path = work / "state" / "agent-stats.json"
            before = await read_stats(proc, stats_path)
            cpu0, _ = proc_stats(proc.pid)
            result["rss_mib"] = round(rss(proc.pid) / 2**20, 1)
            if "traced_bytes" in before:
                result["traced_mib"] = round(before["traced_bytes"] / 2**20, 1)
                result["top_allocations"] = before.get("top_allocations", [])
            if args.idle > 0:
                await asyncio.sleep(args.idle)
                after = await read_stats(proc, stats_path)
                cpu1, peak = proc_stats(proc.pid)
                minutes = args.idle / 60
                result["idle_writes_per_node_per_min"] = round(
                    (writes(after) - writes(before)) / args.count / minutes, 2
                )
                delta = {
                    v: after["requests_by_verb"].get(v, 0) - before["requests_by_verb"].get(v, 0)
                    for v in after["requests_by_verb"]
                }
                result["idle_requests_by_verb"] = {k: v for k, v in delta.items() if v}
                result["idle_cpu_percent"] = round((cpu1 - cpu0) / args.idle * 100, 2)
                result["peak_rss_mib"] = round(peak / 2**20, 1)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await proc.wait()
            async with s.delete(
                f"{cluster.server}/api/v1/nodes", params={"labelSelector": selector}
            ) as r:  # deletecollection: the Leases go with their owner
                await r.read()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
