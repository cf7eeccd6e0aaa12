"""The null agent: the smallest client that runs a node, as a baseline for benchmarks.

    python bench/null_agent.py --kubeconfig ADMIN --node-name NAME [--max-pods N]
                               [--count N --label KEY=VALUE ...]

It creates the Node (Ready) if missing, renews its Lease every 10 s, lists and watches the Pods
bound to it, patches each Pod that is not Running straight to Running (one merge patch on
pods/status), and deletes each Pod that has a deletionTimestamp with grace period 0. No other
logic: how close an agent can get to the API server's own limit. aiohttp only; SIGTERM exits.
With --count N it is a null fleet: nodes NAME-0 .. NAME-(N-1), one Pod watch for all of them
(every Pod, filtered by nodeName), a Lease loop per node started at a random offset.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import ssl
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml

IN_FLIGHT = 64
LEASE_SECONDS = 40
RENEW_EVERY = 10.0
MERGE = {"Content-Type": "application/merge-patch+json"}


def load_kubeconfig(path: Path) -> tuple[str, ssl.SSLContext]:
    """Server URL and a TLS context with the client certificate of the current context."""
    cfg = yaml.safe_load(path.read_text())
    ctx_name = cfg.get("current-context") or cfg["contexts"][0]["name"]
    context = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
    cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == context["cluster"])
    user = next(u["user"] for u in cfg["users"] if u["name"] == context["user"])
    base = path.resolve().parent

    def file(key: str, where: dict[str, Any]) -> str:
        if key not in where:
            raise SystemExit(f"null-agent: {path}: {key} (a file path) is required")
        return str(base / where[key])

    tls = ssl.create_default_context(cafile=file("certificate-authority", cluster))
    tls.load_cert_chain(file("client-certificate", user), file("client-key", user))
    return cluster["server"].rstrip("/"), tls


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def running_status(pod: dict[str, Any]) -> dict[str, Any]:
    t = now()
    spec = pod["spec"]
    conditions = [
        {"type": kind, "status": "True", "lastTransitionTime": t}
        for kind in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
    ]

    def status(c: dict[str, Any], state: dict[str, Any], ready: bool) -> dict[str, Any]:
        return {
            "name": c["name"], "image": c.get("image", ""), "imageID": "", "containerID": f"null://{c['name']}",
            "ready": ready, "started": ready, "restartCount": 0, "state": state,
        }  # fmt: skip

    done = {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": t, "finishedAt": t}}
    return {
        "status": {
            "phase": "Running",
            "conditions": conditions,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": t,
            "initContainerStatuses": [status(c, done, False) for c in spec.get("initContainers", [])],
            "containerStatuses": [status(c, {"running": {"startedAt": t}}, True) for c in spec["containers"]],
        }
    }


class NullAgent:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        server: str,
        node: str,
        max_pods: int,
        labels: dict[str, str] | None = None,
        fleet: frozenset[str] | None = None,
    ):
        self.s, self.server, self.node, self.max_pods = session, server, node, max_pods
        self.labels = labels or {}
        self.fleet = fleet  # the nodes of a null fleet: the Pod watch takes every Pod and keeps theirs
        self.sem = asyncio.Semaphore(IN_FLIGHT)
        self.handled: set[str] = set()  # UIDs patched to Running
        self.deleting: set[str] = set()  # UIDs deleted
        self.tasks: set[asyncio.Task[None]] = set()

    async def request(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.s.request(method, self.server + path, **kw) as r:
            body = await r.read()
            return r.status, (json.loads(body) if body else None)

    async def ensure_node(self) -> str:
        path = f"/api/v1/nodes/{self.node}"
        status = {
            "capacity": {"cpu": "1000", "memory": "4Ti", "pods": str(self.max_pods)},
            "allocatable": {"cpu": "1000", "memory": "4Ti", "pods": str(self.max_pods)},
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "NullAgentReady", "message": "null agent",
                 "lastHeartbeatTime": now(), "lastTransitionTime": now()},
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "nodeInfo": {"kubeletVersion": "null-agent", "operatingSystem": "linux", "architecture": "amd64"},
        }  # fmt: skip
        code, node = await self.request("GET", path)
        if code == 404:
            labels = {"kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux", "type": "null-agent"}
            labels.update(self.labels)
            body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node, "labels": labels}}
            code, node = await self.request("POST", "/api/v1/nodes", json={**body, "status": status})
            if code >= 300:
                raise SystemExit(f"null-agent: cannot create node {self.node}: {code} {node}")
        # Status on create is kept by some versions and not others: set it in any case.
        code, node = await self.request("PATCH", path + "/status", json={"status": status}, headers=MERGE)
        if code >= 300:
            raise SystemExit(f"null-agent: cannot set node status: {code} {node}")
        return str(node["metadata"]["uid"])

    async def lease_loop(self, node_uid: str, offset: float = 0.0) -> None:
        await asyncio.sleep(offset)
        ns_path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
        owner = {"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": node_uid}
        while True:
            spec = {"holderIdentity": self.node, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro_now()}
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                code, _ = await self.request("PATCH", f"{ns_path}/{self.node}", json={"spec": spec}, headers=MERGE)
                if code == 404:
                    meta = {"name": self.node, "namespace": "kube-node-lease", "ownerReferences": [owner]}
                    await self.request("POST", ns_path, json={"metadata": meta, "spec": spec})
            await asyncio.sleep(RENEW_EVERY)

    def handle(self, pod: dict[str, Any]) -> None:
        if self.fleet is not None and pod.get("spec", {}).get("nodeName") not in self.fleet:
            return
        meta = pod["metadata"]
        uid = meta["uid"]
        if meta.get("deletionTimestamp"):
            if uid not in self.deleting:
                self.deleting.add(uid)
                self.spawn(self.delete(meta["namespace"], meta["name"], uid))
        elif uid not in self.handled and pod.get("status", {}).get("phase") not in ("Running", "Succeeded", "Failed"):
            self.handled.add(uid)
            self.spawn(self.patch(meta["namespace"], meta["name"], pod))

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def patch(self, namespace: str, name: str, pod: dict[str, Any]) -> None:
        async with self.sem:
            path = f"/api/v1/namespaces/{namespace}/pods/{name}/status"
            code, body = await self.request("PATCH", path, json=running_status(pod), headers=MERGE)
        if code >= 300 and code != 404:
            print(f"null-agent: patch {namespace}/{name}: {code} {body}", file=sys.stderr)

    async def delete(self, namespace: str, name: str, uid: str) -> None:
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        async with self.sem:
            await self.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", json=body)

    async def pods_loop(self) -> None:
        path = "/api/v1/pods"
        selector = {"fieldSelector": f"spec.nodeName={self.node}"} if self.fleet is None else {}
        while True:
            try:
                code, listed = await self.request("GET", path, params=selector)
                if code == 200:
                    for pod in listed["items"]:
                        self.handle(pod)
                    await self.watch(path, {**selector, "resourceVersion": listed["metadata"]["resourceVersion"]})
                    continue
            except (aiohttp.ClientError, TimeoutError) as e:
                print(f"null-agent: pod watch: {e!r}", file=sys.stderr)
            await asyncio.sleep(1)

    async def watch(self, path: str, params: dict[str, str]) -> None:
        """Watch until the stream ends or says 410 Gone (then the caller relists)."""
        params = {**params, "watch": "1", "allowWatchBookmarks": "true"}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        while True:
            async with self.s.get(self.server + path, params=params, timeout=timeout) as r:
                if r.status != 200:
                    return
                buf = b""
                async for chunk in r.content.iter_any():
                    *lines, buf = (buf + chunk).split(b"\n")
                    for line in lines:
                        if line.strip() and not self.event(json.loads(line), params):
                            return

    def event(self, event: dict[str, Any], params: dict[str, str]) -> bool:
        """Handle one watch event; False when the watch must restart with a relist."""
        obj = event["object"]
        if event["type"] == "ERROR":
            return False
        params["resourceVersion"] = obj["metadata"]["resourceVersion"]
        if event["type"] in ("ADDED", "MODIFIED"):
            self.handle(obj)
        elif event["type"] == "DELETED":
            self.handled.discard(obj["metadata"]["uid"])
            self.deleting.discard(obj["metadata"]["uid"])
        return True


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kubeconfig", type=Path, required=True, help="admin kubeconfig (client certificate files)")
    ap.add_argument("--node-name", required=True)
    ap.add_argument("--max-pods", type=int, default=110)
    ap.add_argument("--count", type=int, default=0, help="a null fleet of this many nodes, NAME-0 ...")
    ap.add_argument("--label", action="append", default=[], help="KEY=VALUE on every node (repeatable)")
    args = ap.parse_args()
    labels = dict(item.split("=", 1) for item in args.label)

    server, tls = load_kubeconfig(args.kubeconfig)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    connector = aiohttp.TCPConnector(ssl=tls, limit=IN_FLIGHT + 4)
    async with aiohttp.ClientSession(connector=connector) as session:
        if args.count:
            names = [f"{args.node_name}-{i}" for i in range(args.count)]
            fleet = frozenset(names)
            nodes = [NullAgent(session, server, n, args.max_pods, labels, fleet) for n in names]
        else:
            nodes = [NullAgent(session, server, args.node_name, args.max_pods, labels)]
        agent = nodes[0]  # its Pod watch serves the fleet
        sem = asyncio.Semaphore(IN_FLIGHT)

        async def register(node: NullAgent) -> str:
            async with sem:
                return await node.ensure_node()

        uids = await asyncio.gather(*(register(n) for n in nodes))
        spread = RENEW_EVERY if args.count else 0.0
        workers = [
            asyncio.create_task(n.lease_loop(uid, random.uniform(0, spread)))
            for n, uid in zip(nodes, uids, strict=True)
        ]
        workers.append(asyncio.create_task(agent.pods_loop()))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([*workers, stopper], return_when=asyncio.FIRST_COMPLETED)
        for task in [*workers, stopper, *agent.tasks]:
            task.cancel()
        await asyncio.gather(*workers, *agent.tasks, return_exceptions=True)
        for task in workers:  # a crash (not a cancellation) is an error
            if task.done() and not task.cancelled() and task.exception():
                print(f"null-agent: {task.exception()!r}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
