"""Side-by-side benchmark: kubelet-emu, KWOK and the null agent on the same dev cluster.

    python3 bench/run.py [--pods 1000] [--pods 5000 ...] [--scheduler] [--process-pods 100]
                         [--json FILE] [--plot FILE.png] [--agents kubelet-emu,kwok,null]

For each N and each agent in turn (same cluster, a fresh namespace and node name per run) it starts
the agent, waits until its node is Ready, creates N Pods (spec.nodeName preset; with --scheduler
also a run per agent where a hostname nodeSelector leaves the binding to the scheduler) as fast as
the API server takes them, and measures: time until all are Running, creation-to-Running latency
(watch: first-seen ADDED to first Running), time until all are gone after deleting them, the
agent's peak RSS and CPU seconds (/proc), and the API requests per Pod by verb taken from the API
server's own `apiserver_request_total` (before/after, minus this client's own requests; cluster-wide,
so in scheduler runs the scheduler's own Pod requests, bindings excepted, count too), split into
the Pod writes from creation to Running and those during an idle wait (--idle-seconds) after it.
--process-pods M adds a kubelet-emu run of M Pods on the `process` backend (sleep 3600; root),
run first, on the fresh cluster.
A benchmark: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.pod_network import remove_node_network
from bench.common import (
    Watcher,
    check_agent,
    cluster_admin_ssl,
    create_pods,
    delete_pods,
    network_helper_rss,
    parse_agents,
    pct,
    pod_body,
    pod_requests,
    proc_stats,
    require_matplotlib,
    rss,
    run_main,
    shim_rss,
    stop_agent,
    wait_for,
)
from devcluster import manage

ROOT = Path(__file__).resolve().parent.parent
AGENTS = ("kubelet-emu", "kwok", "null")
CGROUP_ROOT = "kubelet-emu-benchrun"
MiB = 2**20
MODE_TAG = {"nodeName": "pre", "scheduler": "sch", "process": "proc"}


@dataclass(frozen=True)
class Run:
    agent: str
    pods: int
    mode: str = "nodeName"  # "nodeName" (preset), "scheduler" (nodeSelector) or "process" (kubelet-emu only)

    @property
    def label(self) -> str:
        return f"{self.agent}-{self.pods}-{MODE_TAG[self.mode]}"


WRITE_VERBS = ("POST", "PUT", "PATCH", "PATCH status", "PUT status", "DELETE")


def writes(requests: dict[str, float]) -> float:
    return sum(requests.get(verb, 0.0) for verb in WRITE_VERBS)


@dataclass
class Bench:
    cluster: manage.Cluster
    s: aiohttp.ClientSession
    work: Path
    concurrency: int
    kwok: Any = None  # the bench.kwok module, when KWOK is among the agents
    idle_seconds: float = 5.0
    cprofile: Path | None = None  # run kubelet-emu under cProfile (CPU time), one .prof file per run here
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def server(self) -> str:
        return self.cluster.server

    async def start_agent(self, run: Run, node: str, run_dir: Path) -> asyncio.subprocess.Process:
        log_path = run_dir / "agent.log"
        admin = self.cluster.admin_kubeconfig
        if run.agent == "kwok":
            return await self.kwok.start(admin, node, run.pods + 10, log_path)
        if run.agent == "null":
            argv = [str(ROOT / "bench" / "null_agent.py"), "--kubeconfig", str(admin), "--node-name", node]
            argv += ["--max-pods", str(run.pods + 10)]
        else:
            backend = "process" if run.mode == "process" else "emulated"
            config = run_dir / "agent.toml"
            config.write_text(
                f'default_runtime = "bench"\nevents = "warnings"\n[node]\nmax_pods = {run.pods + 10}\n'
                f'cgroup_root = "{CGROUP_ROOT}"\n[runtimes.bench]\nbackend = "{backend}"\n'
            )
            kubeconfig = await manage.node_kubeconfig(self.cluster.dir, node)
            argv = ["-m", "agent.cli", "run", "--kubeconfig", str(kubeconfig), "--node-name", node]
            argv += ["--config", str(config), "--state-dir", str(run_dir / "state")]
            if self.cprofile is not None:  # written when the agent exits (SIGTERM at the end of the run)
                self.cprofile.mkdir(parents=True, exist_ok=True)
                profiler = str(ROOT / "bench" / "cpu_profile.py")
                argv = [profiler, str(self.cprofile / f"{run.label}.prof"), *argv]
        with open(log_path, "wb") as log:
            return await asyncio.create_subprocess_exec(
                sys.executable, *argv, stdout=log, stderr=asyncio.subprocess.STDOUT, cwd=ROOT
            )

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.s.get(self.server + path) as r:
            return r.status, (await r.json() if r.status == 200 else None)

    async def wait_ready(self, node: str, namespace: str, agent: asyncio.subprocess.Process) -> None:
        """Node Ready and without the not-ready taint, and the namespace's default ServiceAccount."""
        deadline = time.monotonic() + 90
        node_obj: Any = None
        while time.monotonic() < deadline and agent.returncode is None:
            code, node_obj = await self.get(f"/api/v1/nodes/{node}")
            sa, _ = await self.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/default")
            if code == 200 and sa == 200:
                conds = {c["type"]: c["status"] for c in node_obj.get("status", {}).get("conditions", [])}
                taints = [t["key"] for t in node_obj["spec"].get("taints", [])]
                if conds.get("Ready") == "True" and "node.kubernetes.io/not-ready" not in taints:
                    return
            await asyncio.sleep(0.2)
        check_agent(agent, node, self.work / node / "agent.log")  # died at start: its exit code and log
        print(f"warning: node {node} not Ready+untainted within 90 s; going on", file=sys.stderr)

    async def ensure_hostname_label(self, node: str) -> None:
        _, node_obj = await self.get(f"/api/v1/nodes/{node}")
        if node_obj and node_obj["metadata"].get("labels", {}).get("kubernetes.io/hostname") != node:
            patch = {"metadata": {"labels": {"kubernetes.io/hostname": node}}}
            headers = {"Content-Type": "application/merge-patch+json"}
            async with self.s.patch(f"{self.server}/api/v1/nodes/{node}", json=patch, headers=headers) as r:
                await r.read()

    async def cleanup(self, run: Run, node: str, namespace: str, agent: asyncio.subprocess.Process) -> None:
        await stop_agent(agent, 15)
        if run.agent == "kubelet-emu":  # its Pod networks outlive the agent by design
            await remove_node_network(self.work / node / "state", node)
        if run.agent == "kwok":
            await self.kwok.delete_node(self.cluster.admin_kubeconfig, node)
        else:
            async with self.s.delete(f"{self.server}/api/v1/nodes/{node}") as r:
                await r.read()
        lease = f"{self.server}/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node}"
        async with self.s.delete(lease) as r:
            await r.read()
        # Pods the agent left behind (deletionTimestamp set, never removed) would hold the namespace.
        pods = f"{self.server}/api/v1/namespaces/{namespace}/pods"
        async with self.s.delete(pods, json={"gracePeriodSeconds": 0}) as r:
            await r.read()
        async with self.s.delete(f"{self.server}/api/v1/namespaces/{namespace}") as r:
            await r.read()
        for _ in range(600):  # the namespace controller's own requests must not leak into the next run
            if (await self.get(f"/api/v1/namespaces/{namespace}"))[0] == 404:
                break
            await asyncio.sleep(0.2)
        if run.mode == "process":
            from cgroups.manager import CgroupManager

            CgroupManager(root=CGROUP_ROOT).remove(CGROUP_ROOT, kill=True)

    async def run(self, run: Run) -> dict[str, Any]:
        node = f"bench-{run.label}-{secrets.token_hex(2)}"
        namespace = node
        run_dir = self.work / node
        run_dir.mkdir(parents=True)
        async with self.s.post(f"{self.server}/api/v1/namespaces", json={"metadata": {"name": namespace}}) as r:
            await r.read()
        print(f"--- {run.agent}: {run.pods} Pods ({run.mode}), node {node}", file=sys.stderr)
        agent = await self.start_agent(run, node, run_dir)
        try:
            await self.wait_ready(node, namespace, agent)
            if run.mode == "scheduler":
                await self.ensure_hostname_label(node)
            await asyncio.sleep(1)
            check_agent(agent, node, run_dir / "agent.log")
            try:
                row = await self.measure(run, node, namespace, agent)
            except (FileNotFoundError, ProcessLookupError):  # /proc/<pid>/... of an agent that just died
                await asyncio.sleep(0.5)  # let asyncio collect its exit status
                check_agent(agent, node, run_dir / "agent.log")
                raise
        finally:
            await self.cleanup(run, node, namespace, agent)
        row["agent_log"] = str(run_dir / "agent.log")
        self.rows.append(row)
        print(f"    all Running {row['time_to_all_running_s']} s, p99 {row['latency_p99_s']} s", file=sys.stderr)
        return row

    async def measure(self, run: Run, node: str, ns: str, agent: asyncio.subprocess.Process) -> dict[str, Any]:
        n, pid = run.pods, agent.pid
        idle_rss = rss(pid)
        cpu0, _ = proc_stats(pid)
        before = await pod_requests(self.s, self.server)
        watcher = Watcher(self.s, self.server, ns)
        watch_task = asyncio.create_task(watcher.run())
        await watcher.ready.wait()

        command = ["sleep", "3600"] if run.mode == "process" else None
        bodies = [pod_body(i, ns, node, command, schedule=run.mode == "scheduler") for i in range(n)]
        t0 = time.monotonic()
        create_s = await create_pods(self.s, self.server, ns, bodies, self.concurrency)

        def alive() -> bool:
            return agent.returncode is None

        all_running = await wait_for(lambda: len(watcher.running) >= n or not alive(), 120 + n / 10)
        all_running = all_running and len(watcher.running) >= n
        t_running = max(watcher.running.values()) - t0 if watcher.running else float("nan")
        latencies = watcher.latencies()
        cpu1, _ = proc_stats(pid) if alive() else (float("nan"), 0)
        loaded_rss = rss(pid) if alive() else 0
        shims = shim_rss() if run.mode == "process" else 0
        helper = network_helper_rss() if run.mode == "process" else 0
        at_running = await pod_requests(self.s, self.server)
        # Nothing changes now: an agent that writes anyway shows it here.
        await asyncio.sleep(self.idle_seconds)
        after_idle = await pod_requests(self.s, self.server)

        t1 = time.monotonic()
        await delete_pods(self.s, self.server, ns, n, self.concurrency)
        all_gone = await wait_for(lambda: len(watcher.gone) >= n or not alive(), 120 + n / 10)
        all_gone = all_gone and len(watcher.gone) >= n
        t_gone = max(watcher.gone.values()) - t1 if watcher.gone else float("nan")
        cpu2, peak = proc_stats(pid) if alive() else (float("nan"), 0)
        watch_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await watch_task
        # Stop the agent first: the API server counts a watch when it ends.
        agent.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(agent.wait(), 15)
        await asyncio.sleep(1)
        after = await pod_requests(self.s, self.server)
        own = {"POST": n, "DELETE": n, "LIST": watcher.lists, "WATCH": watcher.watches}  # this client's own
        per_verb = {
            k: round(max(0.0, after.get(k, 0) - before.get(k, 0) - own.get(k, 0)) / n, 3)
            for k in sorted(set(after) | set(before))
        }
        per_verb = {k: v for k, v in per_verb.items() if v}
        writes_to_running = (writes(at_running) - writes(before) - n) / n  # minus this client's creates
        idle_writes = writes(after_idle) - writes(at_running)
        return {
            "agent": run.agent,
            "mode": run.mode,
            "pods": n,
            "all_running": all_running,
            "all_gone": all_gone,
            "pods_running": len(watcher.running),
            "pods_gone": len(watcher.gone),
            "create_s": round(create_s, 3),
            "time_to_all_running_s": round(t_running, 3),
            "latency_p50_s": round(pct(latencies, 50), 3),
            "latency_p95_s": round(pct(latencies, 95), 3),
            "latency_p99_s": round(pct(latencies, 99), 3),
            "time_to_all_deleted_s": round(t_gone, 3),
            "agent_idle_rss_mib": round(idle_rss / MiB, 1),
            "agent_rss_with_pods_mib": round(loaded_rss / MiB, 1),
            "agent_peak_rss_mib": round(peak / MiB, 1),
            "shims_pss_with_pods_mib": round(shims / MiB, 1),
            "network_helper_pss_mib": round(helper / MiB, 1),
            "agent_cpu_s_create_to_running": round(cpu1 - cpu0, 2),
            "agent_cpu_s_total": round(cpu2 - cpu0, 2),
            "api_requests_per_pod": per_verb,
            "api_requests_per_pod_total": round(sum(per_verb.values()), 3),
            "pod_writes_per_pod_to_running": round(writes_to_running, 3),
            "pod_writes_while_idle": int(idle_writes),
            "idle_seconds": self.idle_seconds,
            "bench_watches": watcher.watches,
            "bench_lists": watcher.lists,
            "running_curve": [(round(t - t0, 3), count) for t, count in watcher.running_curve],
        }


COLUMNS = [
    ("agent", "agent", "{}"), ("mode", "mode", "{}"), ("N", "pods", "{}"), ("create s", "create_s", "{:.2f}"),
    ("all Running s", "time_to_all_running_s", "{:.2f}"), ("p50 s", "latency_p50_s", "{:.3f}"),
    ("p95 s", "latency_p95_s", "{:.3f}"), ("p99 s", "latency_p99_s", "{:.3f}"),
    ("all gone s", "time_to_all_deleted_s", "{:.2f}"), ("peak RSS MiB", "agent_peak_rss_mib", "{:.1f}"),
    ("RSS w/ Pods MiB", "agent_rss_with_pods_mib", "{:.1f}"), ("CPU s", "agent_cpu_s_total", "{:.2f}"),
    ("req/Pod", "api_requests_per_pod_total", "{:.2f}"),
]  # fmt: skip


def print_report(rows: list[dict[str, Any]]) -> None:
    cells = [[h for h, _, _ in COLUMNS]]
    for row in rows:
        cells.append([fmt.format(row[key]) for _, key, fmt in COLUMNS])
        if not row["all_running"]:  # the time until the last one that made it, and how many did
            cells[-1][4] += f" ({row['pods_running']}/{row['pods']})"
        if not row["all_gone"]:
            cells[-1][8] += f" ({row['pods_gone']}/{row['pods']})"
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    for r in cells:
        print("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    print("\nAPI requests per Pod by verb, creation to gone (apiserver_request_total, this client's own subtracted),")
    print("and Pod writes per Pod from creation to Running, and in all while idle:")
    for row in rows:
        verbs = "  ".join(f"{k}={v:g}" for k, v in row["api_requests_per_pod"].items()) or "-"
        print(f"  {row['agent']:<12} {row['mode']:<10} N={row['pods']:<6} {verbs}   "
              f"| to Running {row['pod_writes_per_pod_to_running']:g}/Pod, "
              f"idle {row['idle_seconds']:g} s: {row['pod_writes_while_idle']}")  # fmt: skip
    extra = [r for r in rows if r["mode"] == "process"]
    for r in extra:
        print(f"\nprocess backend, {r['pods']} Pods: p50 {r['latency_p50_s']} s, p99 {r['latency_p99_s']} s, "
              f"agent RSS with the Pods running {r['agent_rss_with_pods_mib']} MiB "
              f"(+ shims {r['shims_pss_with_pods_mib']} MiB PSS, "
              f"network helper {r['network_helper_pss_mib']} MiB PSS)")  # fmt: skip
    print("\ntime to all Running, ratios:")
    for (mode, n), by_agent in sorted(group(rows).items()):
        emu = by_agent.get("kubelet-emu")
        for other in ("kwok", "null"):
            if emu and other in by_agent:
                mine, theirs = emu["time_to_all_running_s"], by_agent[other]["time_to_all_running_s"]
                print(f"  N={n:<6} {mode:<10} kubelet-emu/{other}: {mine / theirs:.2f}x ({mine:.2f} vs {theirs:.2f} s)")


def group(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, dict[str, Any]]]:
    out: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for row in rows:
        if row["mode"] != "process":
            out.setdefault((row["mode"], row["pods"]), {})[row["agent"]] = row
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["pods"] for r in rows if r["mode"] != "process"})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    colors = {"kubelet-emu": "tab:blue", "kwok": "tab:orange", "null": "tab:green"}
    for ax, n in zip(axes[0], sizes, strict=True):
        for r in rows:
            if r["pods"] != n or r["mode"] == "process" or not r["running_curve"]:
                continue
            xs, ys = zip(*[(0.0, 0), *r["running_curve"]], strict=True)
            style = "--" if r["mode"] == "scheduler" else "-"
            label = r["agent"] + (" (scheduler)" if r["mode"] == "scheduler" else "")
            ax.step(xs, ys, style, where="post", color=colors.get(r["agent"]), label=label)
        ax.set_title(f"{n} Pods")
        ax.set_xlabel("seconds since the first create")
        ax.set_ylabel("Pods Running")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, action="append", help="Pods per run; repeat for several sizes (1000)")
    ap.add_argument("--agents", default=",".join(AGENTS), help="comma-separated, from: " + ", ".join(AGENTS))
    ap.add_argument("--scheduler", action="store_true", help="also runs where the scheduler binds the Pods")
    ap.add_argument("--process-pods", type=int, default=0, help="also M Pods on kubelet-emu's process backend")
    ap.add_argument("--concurrency", type=int, default=64, help="parallel create/delete requests")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "kubelet-emu-benchrun")
    ap.add_argument("--port", type=int, default=16643, help="the bench cluster's API server port")
    ap.add_argument("--idle-seconds", type=float, default=5, help="idle wait with all Running, writes counted")
    ap.add_argument("--keep-cluster", action="store_true", help="leave the dev cluster running at the end")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--plot", type=Path, help="PNG of Pods Running over time, one subplot per N")
    ap.add_argument("--cprofile", type=Path, help="run kubelet-emu under cProfile; a .prof per run in this dir")
    args = ap.parse_args()
    sizes = args.pods or [1000]
    agents = parse_agents(ap, args.agents, AGENTS)
    if args.plot:
        require_matplotlib(ap)
    if args.process_pods and os.geteuid() != 0:
        ap.error("--process-pods needs root (Pod cgroups)")
    kwok = None
    if "kwok" in agents:
        try:
            from bench import kwok
        except ImportError as e:
            ap.error(f"KWOK: cannot import bench/kwok.py ({e}); leave it out with --agents kubelet-emu,null")
        await kwok.build()

    started_here = manage.read_cluster(args.dir) is None
    cluster = await manage.up(args.dir, port=args.port, quiet=False, fresh=True)
    ctx = cluster_admin_ssl(cluster)
    work = Path(tempfile.mkdtemp(prefix="bench-run-"))
    # The process run goes first: it is not compared with the other agents, and after
    # thousands of Pods created and deleted the API server answers slower for a while
    # (a later 100-Pod run measured p99 1.07 s against 0.79-0.92 s on a fresh cluster).
    runs = [Run("kubelet-emu", args.process_pods, "process")] if args.process_pods else []
    runs += [Run(a, n) for n in sizes for a in agents]
    if args.scheduler:
        runs += [Run(a, n, "scheduler") for n in sizes for a in agents]
    connector = aiohttp.TCPConnector(ssl=ctx, limit=args.concurrency + 8)
    try:
        async with aiohttp.ClientSession(connector=connector) as s:
            bench = Bench(
                cluster, s, work, args.concurrency, kwok, idle_seconds=args.idle_seconds, cprofile=args.cprofile
            )
            for run in runs:
                await bench.run(run)
    finally:
        if started_here and not args.keep_cluster:
            await manage.down(args.dir)
    rows = bench.rows
    print_report(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.plot:
        plot(rows, args.plot)
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
