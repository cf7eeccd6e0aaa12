"""Shared parts of the benchmarks: /proc readings, starting and stopping the agent under test, Pod
bodies, bulk create/delete, the admin watch, API server request counters and the printed results."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from devcluster import manage

ROOT = Path(__file__).resolve().parent.parent
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"


class AgentExitedError(RuntimeError):
    """The agent under test is gone (it died at start, say): no /proc readings to take."""


def agent_exit_message(name: str, returncode: int | None, log_path: Path, lines: int = 20) -> str:
    """One paragraph for the report: the exit code and the tail of the agent's log."""
    try:
        tail = log_path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as exc:
        tail = [f"(no log: {exc})"]
    code = (
        "was killed by signal " + str(-returncode)
        if returncode and returncode < 0
        else f"exited with code {returncode}"
    )
    return f"the agent under test ({name}) {code}; last lines of {log_path}:\n" + "\n".join(
        "    " + line for line in tail
    )


def check_agent(agent: asyncio.subprocess.Process, name: str, log_path: Path) -> None:
    """Raise AgentExitedError (exit code and log tail) when the agent process has exited."""
    if agent.returncode is not None:
        raise AgentExitedError(agent_exit_message(name, agent.returncode, log_path))


async def start_node_agent(
    cluster: manage.Cluster, node: str, config: Path, work: Path, *extra_args: str
) -> asyncio.subprocess.Process:
    """`kubelet-emu run` as `node` with `config`: state in work/state, output in work/agent.log."""
    kubeconfig = await manage.node_kubeconfig(cluster.dir, node)
    with open(work / "agent.log", "wb") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.cli", "run", "--kubeconfig", str(kubeconfig), "--node-name", node,
            "--config", str(config), "--state-dir", str(work / "state"), *extra_args,
            stdout=log, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip


async def stop_agent(agent: asyncio.subprocess.Process, timeout: float) -> None:
    """SIGTERM, and SIGKILL if it is still there after `timeout` seconds."""
    if agent.returncode is None:
        agent.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(agent.wait(), timeout)
        except TimeoutError:
            agent.kill()
            await agent.wait()


def run_main(main: Callable[[], Any]) -> int:
    """asyncio.run(main()), with an agent that died reported in a few lines instead of a traceback."""
    try:
        return asyncio.run(main())
    except AgentExitedError as exc:
        print(f"benchmark stopped: {exc}", file=sys.stderr)
        return 1


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


def _kib_field(path: str, key: str) -> int:
    """A "Key:  N kB" line of a /proc file, in bytes (0 when absent)."""
    with open(path) as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def rss(pid: int) -> int:
    return _kib_field(f"/proc/{pid}/status", "VmRSS:")


def pss(pid: int) -> int:
    """Proportional set size: pages shared with other processes count by their share, so the
    sum over many forked shims is what they really cost (their RSS counts shared pages again each)."""
    return _kib_field(f"/proc/{pid}/smaps_rollup", "Pss:")


def pss_of(marker: bytes) -> int:
    """Total PSS of the processes whose command line contains `marker`."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                total += pss(int(entry))
        except OSError:
            continue
    return total


def shim_rss() -> int:
    """Total PSS of the process backend's shims (one per running container) and their launcher."""
    return pss_of(b"runtimes.process.shim")


def network_helper_rss() -> int:
    """PSS of the Pod network helper process(es)."""
    return pss_of(b"network.helper")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def admin_ssl(ca_cert: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_cert))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def cluster_admin_ssl(cluster: manage.Cluster) -> ssl.SSLContext:
    """The dev cluster's admin client identity (pki/admin.crt), trusting its CA."""
    pki = cluster.dir / "pki"
    return admin_ssl(cluster.ca_cert, pki / "admin.crt", pki / "admin.key")


async def create_namespace(s: aiohttp.ClientSession, server: str, namespace: str, node: str, tries: int) -> None:
    """Create `namespace`, then wait (`tries` times 0.1 s at most) until `node` is registered and
    the namespace has its default ServiceAccount, without which Pod creation is refused."""
    async with s.post(f"{server}/api/v1/namespaces", json={"metadata": {"name": namespace}}) as r:
        assert r.status < 300, await r.text()
    for _ in range(tries):
        async with s.get(f"{server}/api/v1/nodes/{node}") as r:
            node_ok = r.status == 200
        async with s.get(f"{server}/api/v1/namespaces/{namespace}/serviceaccounts/default") as r:
            if node_ok and r.status == 200:
                return
        await asyncio.sleep(0.1)


def pod_name(i: int) -> str:
    return f"bench-{i:06d}"


def pod_body(
    i: int, namespace: str, node: str, command: list[str] | None = None, schedule: bool = False
) -> dict[str, Any]:
    """A one-container Pod bound to `node`: spec.nodeName preset, or (schedule=True) a hostname
    nodeSelector that leaves the binding to the scheduler."""
    container: dict[str, Any] = {"name": "main", "image": PAUSE_IMAGE}
    if command:
        container["command"] = command
    spec: dict[str, Any] = {"containers": [container], "terminationGracePeriodSeconds": 1}
    if schedule:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    else:
        spec["nodeName"] = node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod_name(i), "namespace": namespace, "labels": {"app": "bench"}},
        "spec": spec,
    }


async def create_pods(
    s: aiohttp.ClientSession, server: str, namespace: str, bodies: list[dict[str, Any]], concurrency: int
) -> float:
    """POST the Pods with at most `concurrency` requests in flight; returns the seconds it took."""
    sem = asyncio.Semaphore(concurrency)
    url = f"{server}/api/v1/namespaces/{namespace}/pods"

    async def create(body: dict[str, Any]) -> None:
        async with sem, s.post(url, json=body) as r:
            if r.status >= 300:
                print("create failed:", r.status, await r.text(), file=sys.stderr)

    t0 = time.monotonic()
    await asyncio.gather(*(create(b) for b in bodies))
    return time.monotonic() - t0


async def delete_pods(s: aiohttp.ClientSession, server: str, namespace: str, count: int, concurrency: int) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def delete(i: int) -> None:
        async with sem, s.delete(f"{server}/api/v1/namespaces/{namespace}/pods/{pod_name(i)}") as r:
            await r.read()

    await asyncio.gather(*(delete(i) for i in range(count)))


class Watcher:
    """Admin-side watch of the benchmark namespace: first-seen and Running times per Pod.

    It resumes from the last resourceVersion when the stream ends and relists after an ERROR
    event (410 Gone); `lists` and `watches` count its own requests."""

    def __init__(self, session: aiohttp.ClientSession, server: str, namespace: str):
        self.session, self.server, self.namespace = session, server, namespace
        self.url = f"{server}/api/v1/namespaces/{namespace}/pods"
        self.seen: dict[str, float] = {}
        self.running: dict[str, float] = {}
        self.gone: dict[str, float] = {}
        self.running_curve: list[tuple[float, int]] = []  # (monotonic time, Pods Running so far)
        self.ready = asyncio.Event()
        self.lists = self.watches = 0

    async def run(self) -> None:
        rv = await self._list()
        while True:
            params = {"watch": "1", "resourceVersion": rv, "allowWatchBookmarks": "true"}
            self.watches += 1
            try:
                rv = await self._watch(params) or await self._list()
            except (aiohttp.ClientError, TimeoutError) as e:
                print(f"bench watch of {self.namespace}: {e!r}; resuming", file=sys.stderr)
                await asyncio.sleep(0.2)

    async def _list(self) -> str:
        self.lists += 1
        async with self.session.get(self.url) as r:
            listed = await r.json()
        now = time.monotonic()
        names = set()
        for pod in listed["items"]:
            names.add(pod["metadata"]["name"])
            self._event({"type": "ADDED", "object": pod}, now)
        for name in self.seen.keys() - names - self.gone.keys():
            self.gone[name] = now
        return str(listed["metadata"]["resourceVersion"])

    async def _watch(self, params: dict[str, str]) -> str | None:
        """Watch from params' resourceVersion: the one to resume from, or None to relist."""
        rv = params["resourceVersion"]
        async with self.session.get(self.url, params=params, timeout=aiohttp.ClientTimeout(total=None)) as resp:
            if resp.status != 200:
                return None
            self.ready.set()
            buf = b""
            async for chunk in resp.content.iter_any():
                *lines, buf = (buf + chunk).split(b"\n")
                now = time.monotonic()
                for line in lines:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event["type"] == "ERROR":
                        return None
                    rv = event["object"]["metadata"]["resourceVersion"]
                    self._event(event, now)
        return rv

    def _event(self, event: dict[str, Any], now: float) -> None:
        if event["type"] == "BOOKMARK":
            return
        obj = event["object"]
        name = obj["metadata"]["name"]
        self.seen.setdefault(name, now)
        if event["type"] == "DELETED":
            self.gone[name] = now
        elif obj.get("status", {}).get("phase") == "Running" and name not in self.running:
            self.running[name] = now
            self.running_curve.append((now, len(self.running)))

    def latencies(self) -> list[float]:
        """First-seen ADDED to first Running, per Pod."""
        return [self.running[n] - self.seen[n] for n in self.running if n in self.seen]


async def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


async def request_totals(s: aiohttp.ClientSession, server: str) -> list[tuple[dict[str, str], float]]:
    """The API server's `apiserver_request_total` samples: (labels, value) each."""
    async with s.get(f"{server}/metrics") as r:
        text = await r.text()
    samples = []
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{"):
            labels_text, _, value = line.rpartition("} ")
            samples.append((dict(_LABEL.findall(labels_text)), float(value)))
    return samples


async def pod_requests(s: aiohttp.ClientSession, server: str) -> dict[str, float]:
    """The API server's `apiserver_request_total` for Pods, summed by verb: "PATCH" for pods,
    "PATCH status" for pods/status (other subresources, like binding, are left out)."""
    totals: dict[str, float] = {}
    for labels, value in await request_totals(s, server):
        if labels.get("resource") != "pods" or labels.get("subresource") not in ("", "status"):
            continue
        key = labels["verb"] + (" status" if labels["subresource"] else "")
        totals[key] = totals.get(key, 0.0) + value
    return totals


def parse_agents(ap: argparse.ArgumentParser, text: str, known: tuple[str, ...]) -> list[str]:
    """The comma-separated --agents, each one of `known` (else an argparse error)."""
    agents = [a.strip() for a in text.split(",") if a.strip()]
    if unknown := set(agents) - set(known):
        ap.error(f"unknown agents: {', '.join(sorted(unknown))}")
    return agents


def require_matplotlib(ap: argparse.ArgumentParser) -> None:
    """--plot's check, made before the runs rather than after minutes of them."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        ap.error("--plot needs matplotlib: pip install -e '.[bench]'")


def print_results(results: dict[str, Any], json_path: Path | None) -> None:
    """One `key  value` line per result, and the same as JSON in `json_path` when given."""
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    if json_path:
        json_path.write_text(json.dumps(results, indent=2))
