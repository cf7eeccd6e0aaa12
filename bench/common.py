"""Shared parts of the benchmarks: /proc readings, Pod bodies, bulk create/delete and the admin watch."""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

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
    return pss_of(b"runtimes.shim")


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


async def pod_requests(s: aiohttp.ClientSession, server: str) -> dict[str, float]:
    """The API server's `apiserver_request_total` for Pods, summed by verb: "PATCH" for pods,
    "PATCH status" for pods/status (other subresources, like binding, are left out)."""
    async with s.get(f"{server}/metrics") as r:
        text = await r.text()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels_text, _, value = line.rpartition("} ")
        labels = dict(_LABEL.findall(labels_text))
        if labels.get("resource") != "pods" or labels.get("subresource") not in ("", "status"):
            continue
        key = labels["verb"] + (" status" if labels["subresource"] else "")
        totals[key] = totals.get(key, 0.0) + float(value)
    return totals
