"""Fleet benchmark: kubelet-emu fleet, KWOK and a null-agent fleet running N nodes each, side by side.

    python3 bench/fleet.py [--nodes 100] [--nodes 1000 ...] [--pods-per-node 10] [--scheduler-qps 500]
                           [--agents kubelet-emu,kwok,null] [--idle-seconds 60] [--json F] [--plot F.png]

One dev cluster (started here with kube-scheduler's client QPS raised to --scheduler-qps) serves
every run, one agent at a time:
  - kubelet-emu: `kubelet-emu fleet --count N` with its fleet credential;
  - kwok: one kwok controller managing the N Nodes by label (--manage-nodes-with-label-selector,
    the release's fast stages; bench/kwok.py), the Nodes created by this script at 64 at a time;
  - null: bench/null_agent.py --count N (creates its Nodes, a Lease loop each, one Pod watch).
For each: time until all N nodes are Ready (the curve goes to the plot), then --idle-seconds with
all nodes up: the agent's CPU per second and the API server's writes per minute on nodes, leases
and pods (apiserver_request_total), RSS; then --pods-per-node Pods per node through the scheduler
(a nodeSelector on the fleet's label) and again with spec.nodeName preset: time until all are
Running, creation-to-Running p50/p99, time until all are gone after deletion, the agent's CPU.
A benchmark: it prints numbers and writes JSON; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Watcher,
    check_agent,
    cluster_admin_ssl,
    create_pods,
    delete_pods,
    parse_agents,
    pct,
    pod_body,
    proc_stats,
    request_totals,
    require_matplotlib,
    rss,
    run_main,
    stop_agent,
    wait_for,
)
from devcluster import manage
from devcluster.fleet_credential import fleet_kubeconfig

ROOT = Path(__file__).resolve().parent.parent
# kubelet-emu-scale: the same fleet with `final_status = false` (no terminated status write before
# a deletion, for scale runs; the kubelet, and kubelet-emu by default, write it).
AGENTS = ("kubelet-emu", "kubelet-emu-scale", "kwok", "null")
LABEL = "bench.kubelet-emu.io/fleet"
MiB = 2**20
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE", "APPLY")

FLEET_CONFIG = """
default_runtime = "bench"
events = "warnings"
[node]
max_pods = {max_pods}
[runtimes.bench]
backend = "emulated"
[runtimes.bench.options]
final_status = {final_status}
[fleet]
name = "{name}"
node_name = "{name}-{{index}}"
count = {count}
[fleet.labels]
"{label}" = "{name}"
"""


@dataclass(frozen=True)
class Run:
    agent: str
    nodes: int

    def names(self, prefix: str) -> list[str]:
        return [f"{prefix}-{i}" for i in range(self.nodes)]


async def writes_by_resource(s: aiohttp.ClientSession, server: str) -> dict[str, float]:
    """apiserver_request_total's write verbs, summed per resource (nodes, leases, pods, events...)."""
    totals: dict[str, float] = {}
    for labels, value in await request_totals(s, server):
        if labels.get("verb") in WRITE_VERBS:
            key = labels.get("resource", "") + ("/" + labels["subresource"] if labels.get("subresource") else "")
            totals[key] = totals.get(key, 0.0) + value
    return totals


class FleetBench:
    def __init__(self, cluster: manage.Cluster, s: aiohttp.ClientSession, work: Path, args: argparse.Namespace):
        self.cluster, self.s, self.work, self.args = cluster, s, work, args
        self.server = cluster.server
        self.rows: list[dict[str, Any]] = []

    async def start(self, run: Run, prefix: str, run_dir: Path) -> asyncio.subprocess.Process:
        log_path = run_dir / "agent.log"
        admin = self.cluster.admin_kubeconfig
        max_pods = self.args.pods_per_node + 10
        if run.agent == "kwok":
            from bench import kwok

            return await kwok.start_fleet(admin, run.names(prefix), {LABEL: prefix}, max_pods, log_path)
        if run.agent == "null":
            argv = [str(ROOT / "bench" / "null_agent.py"), "--kubeconfig", str(admin), "--node-name", prefix]
            argv += ["--count", str(run.nodes), "--max-pods", str(max_pods), "--label", f"{LABEL}={prefix}"]
        else:
            config = run_dir / "fleet.toml"
            final_status = "false" if run.agent == "kubelet-emu-scale" else "true"
            config.write_text(
                FLEET_CONFIG.format(
                    name=prefix, count=run.nodes, label=LABEL, max_pods=max_pods, final_status=final_status
                )
            )
            kubeconfig = await fleet_kubeconfig(self.cluster, "bench")
            argv = ["-m", "agent.cli", "fleet", "--config", str(config), "--kubeconfig", str(kubeconfig)]
            argv += ["--count", str(run.nodes), "--state-dir", str(run_dir / "state")]
        with open(log_path, "wb") as log:
            return await asyncio.create_subprocess_exec(
                sys.executable, *argv, stdout=log, stderr=asyncio.subprocess.STDOUT, cwd=ROOT
            )

    async def ready_nodes(self, prefix: str) -> int:
        async with self.s.get(f"{self.server}/api/v1/nodes", params={"labelSelector": f"{LABEL}={prefix}"}) as r:
            items = (await r.json()).get("items") or []
        return sum(
            1
            for n in items
            if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions") or ())
            and not any(t["key"] == "node.kubernetes.io/not-ready" for t in n["spec"].get("taints") or ())
        )

    async def run(self, run: Run) -> dict[str, Any]:
        prefix = f"bf{run.agent[:3].replace('-', '')}{run.nodes}-{secrets.token_hex(2)}"
        run_dir = self.work / prefix
        run_dir.mkdir(parents=True)
        row: dict[str, Any] = {"agent": run.agent, "nodes": run.nodes, "pods_per_node": self.args.pods_per_node}
        print(f"--- {run.agent}: {run.nodes} nodes ({prefix})", file=sys.stderr)
        t0 = time.monotonic()
        agent = await self.start(run, prefix, run_dir)
        curve: list[tuple[float, int]] = []
        try:
            deadline = t0 + 120 + run.nodes * 0.5
            ready = 0
            while ready < run.nodes and time.monotonic() < deadline:
                check_agent(agent, run.agent, run_dir / "agent.log")
                ready = await self.ready_nodes(prefix)
                curve.append((round(time.monotonic() - t0, 2), ready))
                await asyncio.sleep(0.5)
            row["all_ready"] = ready >= run.nodes
            row["time_to_all_ready_s"] = curve[-1][0] if ready >= run.nodes else None
            row["ready_curve"] = curve
            print(f"    {ready}/{run.nodes} Ready after {curve[-1][0]} s", file=sys.stderr)
            await asyncio.sleep(self.args.settle_seconds)  # the registration's writes settle
            await self.idle(row, agent.pid)
            names = run.names(prefix)
            if self.args.pods_per_node:
                for mode in ("scheduler", "nodeName"):
                    await self.pods(row, agent, names, prefix, mode)
            row["rss_end_mib"] = round(rss(agent.pid) / MiB, 1)
            row["peak_rss_mib"] = round(proc_stats(agent.pid)[1] / MiB, 1)
        finally:
            await self.cleanup(agent, prefix)
        row["agent_log"] = str(run_dir / "agent.log")
        self.rows.append(row)
        return row

    async def idle(self, row: dict[str, Any], pid: int) -> None:
        seconds = self.args.idle_seconds
        row["idle_rss_mib"] = round(rss(pid) / MiB, 1)
        before = await writes_by_resource(self.s, self.server)
        cpu0, _ = proc_stats(pid)
        await asyncio.sleep(seconds)
        cpu1, _ = proc_stats(pid)
        after = await writes_by_resource(self.s, self.server)
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        per_min = {k: round(v * 60 / seconds, 1) for k, v in delta.items() if v}
        row["idle_cpu_s_per_s"] = round((cpu1 - cpu0) / seconds, 4)
        row["idle_writes_per_min"] = per_min
        row["idle_writes_per_min_total"] = round(sum(per_min.values()), 1)
        row["idle_writes_per_node_per_min"] = round(sum(per_min.values()) / row["nodes"], 2)
        print(
            f"    idle: {row['idle_cpu_s_per_s']} CPU s/s, {row['idle_writes_per_min_total']} writes/min "
            f"({per_min}), RSS {row['idle_rss_mib']} MiB",
            file=sys.stderr,
        )

    async def pods(
        self, row: dict[str, Any], agent: asyncio.subprocess.Process, names: list[str], prefix: str, mode: str
    ) -> None:
        n = len(names) * self.args.pods_per_node
        ns = f"{prefix}-{mode.lower()}"
        async with self.s.post(f"{self.server}/api/v1/namespaces", json={"metadata": {"name": ns}}) as r:
            await r.read()
        for _ in range(100):  # the default ServiceAccount, or Pod creation is refused
            async with self.s.get(f"{self.server}/api/v1/namespaces/{ns}/serviceaccounts/default") as r:
                if r.status == 200:
                    break
            await asyncio.sleep(0.2)
        watcher = Watcher(self.s, self.server, ns)
        task = asyncio.create_task(watcher.run())
        await watcher.ready.wait()
        bodies = []
        for i in range(n):
            body = pod_body(i, ns, names[i % len(names)], schedule=mode == "scheduler")
            if mode == "scheduler":
                body["spec"]["nodeSelector"] = {LABEL: prefix}
            bodies.append(body)
        writes0 = await writes_by_resource(self.s, self.server)
        cpu0, _ = proc_stats(agent.pid)
        t0 = time.monotonic()
        create_s = await create_pods(self.s, self.server, ns, bodies, self.args.concurrency)
        done = await wait_for(lambda: len(watcher.running) >= n or agent.returncode is not None, 120 + n / 20)
        t_running = max(watcher.running.values()) - t0 if watcher.running else float("nan")
        latencies = watcher.latencies()
        cpu1, _ = proc_stats(agent.pid)
        t1 = time.monotonic()
        await delete_pods(self.s, self.server, ns, n, self.args.concurrency)
        gone = await wait_for(lambda: len(watcher.gone) >= n or agent.returncode is not None, 120 + n / 20)
        t_gone = max(watcher.gone.values()) - t1 if watcher.gone else float("nan")
        cpu2, _ = proc_stats(agent.pid)
        writes1 = await writes_by_resource(self.s, self.server)
        # Every write the cluster took in the phase (the creates and deletes included), per Pod.
        per_pod = {k: round((writes1.get(k, 0) - writes0.get(k, 0)) / n, 2) for k in writes1}
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await task
        async with self.s.delete(f"{self.server}/api/v1/namespaces/{ns}") as r:
            await r.read()
        tag = "sch" if mode == "scheduler" else "pre"
        row.update(
            {
                f"{tag}_pods": n,
                f"{tag}_all_running": bool(done and len(watcher.running) >= n),
                f"{tag}_pods_running": len(watcher.running),
                f"{tag}_create_s": round(create_s, 2),
                f"{tag}_time_to_all_running_s": round(t_running, 2),
                f"{tag}_p50_s": round(pct(latencies, 50), 3),
                f"{tag}_p99_s": round(pct(latencies, 99), 3),
                f"{tag}_all_gone": bool(gone and len(watcher.gone) >= n),
                f"{tag}_time_to_all_gone_s": round(t_gone, 2),
                f"{tag}_cpu_s": round(cpu2 - cpu0, 2),
                f"{tag}_cpu_s_to_running": round(cpu1 - cpu0, 2),
                f"{tag}_writes_per_pod": {k: v for k, v in per_pod.items() if v},
                f"{tag}_running_curve": [(round(t - t0, 3), c) for t, c in watcher.running_curve],
            }
        )
        print(
            f"    {mode}: {len(watcher.running)}/{n} Running in {t_running:.2f} s (create {create_s:.2f} s), "
            f"p50 {pct(latencies, 50):.3f} p99 {pct(latencies, 99):.3f}, gone in {t_gone:.2f} s, "
            f"CPU {cpu2 - cpu0:.2f} s, writes per Pod {row[f'{tag}_writes_per_pod']}",
            file=sys.stderr,
        )

    async def cleanup(self, agent: asyncio.subprocess.Process, prefix: str) -> None:
        await stop_agent(agent, 30)
        params = {"labelSelector": f"{LABEL}={prefix}"}
        async with self.s.delete(f"{self.server}/api/v1/nodes", params=params) as r:
            await r.read()
        # This cluster is the benchmark's own: every node Lease left is one of the run's.
        async with self.s.delete(f"{self.server}/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases") as r:
            await r.read()
        await asyncio.sleep(2)


COLUMNS = [
    ("agent", "agent", "{}"), ("nodes", "nodes", "{}"), ("Ready s", "time_to_all_ready_s", "{:.1f}"),
    ("idle CPU s/s", "idle_cpu_s_per_s", "{:.4f}"), ("idle writes/min", "idle_writes_per_min_total", "{:.0f}"),
    ("writes/node/min", "idle_writes_per_node_per_min", "{:.2f}"), ("idle RSS MiB", "idle_rss_mib", "{:.1f}"),
    ("sch Running s", "sch_time_to_all_running_s", "{:.2f}"), ("sch p50", "sch_p50_s", "{:.3f}"),
    ("sch p99", "sch_p99_s", "{:.3f}"), ("pre Running s", "pre_time_to_all_running_s", "{:.2f}"),
    ("pre p50", "pre_p50_s", "{:.3f}"), ("pre p99", "pre_p99_s", "{:.3f}"),
    ("pre gone s", "pre_time_to_all_gone_s", "{:.2f}"),
    ("pre CPU s", "pre_cpu_s", "{:.2f}"), ("peak RSS MiB", "peak_rss_mib", "{:.1f}"),
]  # fmt: skip
RATIO_KEYS = [
    "time_to_all_ready_s", "idle_cpu_s_per_s", "idle_writes_per_min_total", "idle_rss_mib",
    "sch_time_to_all_running_s", "sch_p99_s", "pre_time_to_all_running_s", "pre_p99_s", "pre_time_to_all_gone_s",
    "pre_cpu_s", "peak_rss_mib",
]  # fmt: skip


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def print_report(rows: list[dict[str, Any]]) -> None:
    table = [[title for title, _, _ in COLUMNS]] + [[_cell(r, k, f) for _, k, f in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    for line in table:
        cells = zip(line, widths, strict=True)
        print("  ".join(cell.rjust(w) if i > 0 else cell.ljust(w) for i, (cell, w) in enumerate(cells)))
    print("\nkubelet-emu / other (below 1: kubelet-emu is faster or smaller):")
    for nodes in sorted({r["nodes"] for r in rows}):
        by_agent = {r["agent"]: r for r in rows if r["nodes"] == nodes}
        for mine, emu in by_agent.items():
            if not mine.startswith("kubelet-emu"):
                continue
            for other, r in by_agent.items():
                if other.startswith("kubelet-emu"):
                    continue
                parts = []
                for key in RATIO_KEYS:
                    a, b = emu.get(key), r.get(key)
                    if isinstance(a, int | float) and isinstance(b, int | float) and b:
                        parts.append(f"{key} {a / b:.2f}")
                print(f"  N={nodes} {mine} vs {other}: " + ", ".join(parts))


COLORS = {"kubelet-emu": "C0", "kwok": "C1", "null": "C2", "kubelet-emu-scale": "C3"}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["nodes"] for r in rows})
    fig, axes = plt.subplots(len(sizes), 2, figsize=(12, 4 * len(sizes)), squeeze=False)
    for row_axes, nodes in zip(axes, sizes, strict=True):
        ready_ax, pods_ax = row_axes
        for r in (r for r in rows if r["nodes"] == nodes):
            color = COLORS.get(r["agent"])
            if r.get("ready_curve"):
                t, c = zip(*r["ready_curve"], strict=True)
                ready_ax.plot(t, c, label=r["agent"], color=color)
            for tag, style in (("sch", "-"), ("pre", "--")):
                if r.get(f"{tag}_running_curve"):
                    t, c = zip(*r[f"{tag}_running_curve"], strict=True)
                    mode = "scheduler" if tag == "sch" else "nodeName"
                    pods_ax.plot(t, c, style, color=color, label=f"{r['agent']} ({mode})")
        ready_ax.set(title=f"{nodes} nodes: nodes Ready", xlabel="seconds since the agent started", ylabel="Ready")
        pods_ax.set(title=f"{nodes} nodes: Pods Running", xlabel="seconds since the first create", ylabel="Running")
        ready_ax.legend()
        pods_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, action="append", help="nodes per run; repeat for several sizes (100)")
    ap.add_argument("--agents", default=",".join(AGENTS), help="comma-separated, from: " + ", ".join(AGENTS))
    ap.add_argument("--pods-per-node", type=int, default=10, help="Pods per node in each Pod phase (0: none)")
    ap.add_argument("--scheduler-qps", type=float, default=500, help="kube-scheduler's client QPS (burst twice)")
    ap.add_argument("--idle-seconds", type=float, default=60, help="idle window: CPU and API writes with all Ready")
    ap.add_argument("--settle-seconds", type=float, default=10, help="wait after all Ready before the idle window")
    ap.add_argument("--concurrency", type=int, default=64, help="parallel create/delete requests")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "kubelet-emu-benchfleet")
    ap.add_argument("--port", type=int, default=16644, help="the bench cluster's API server port")
    ap.add_argument("--keep-cluster", action="store_true", help="leave the dev cluster running at the end")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--plot", type=Path, help="PNG: nodes Ready and Pods Running over time, a row per N")
    args = ap.parse_args()
    sizes = args.nodes or [100]
    agents = parse_agents(ap, args.agents, AGENTS)
    if args.plot:
        require_matplotlib(ap)
    if "kwok" in agents:
        from bench import kwok

        await kwok.build()
    started_here = manage.read_cluster(args.dir) is None
    cluster = await manage.up(args.dir, port=args.port, quiet=False, fresh=True, scheduler_qps=args.scheduler_qps)
    ctx = cluster_admin_ssl(cluster)
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    rows: list[dict[str, Any]] = []
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=args.concurrency + 8)) as s:
            bench = FleetBench(cluster, s, work, args)
            for nodes in sizes:
                for agent in agents:
                    try:
                        await bench.run(Run(agent, nodes))
                    except Exception as exc:  # one agent failing at a size must not lose the others' numbers
                        print(f"    {agent} at {nodes} nodes failed: {exc!r}", file=sys.stderr)
                        bench.rows.append({"agent": agent, "nodes": nodes, "error": repr(exc)})
                    if args.json:  # after every run: a later failure keeps what was measured
                        args.json.write_text(json.dumps(bench.rows, indent=2))
            rows = bench.rows
    finally:
        if started_here and not args.keep_cluster:
            await manage.down(args.dir)
    print(f"\nscheduler client QPS {args.scheduler_qps:g} (burst {int(2 * args.scheduler_qps)})")
    print_report(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.plot:
        plot(rows, args.plot)
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
