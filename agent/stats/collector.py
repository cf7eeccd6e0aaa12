"""Samples the node and its Pods for /stats/summary and /metrics/resource.

The Pods and their cgroup paths are listed on the event loop (that reads the controller's workers);
the files are read and the snapshot assembled in a worker thread, so a node with many process Pods
does not stall the loop. One sampling serves every request for `max_age` seconds (longer on a
node with thousands of Pods: 5x what the sampling cost) and concurrent requests share it, so 50
requests a second cost one round a second. A background round every 10 s
(cadvisor's housekeeping interval) reads only the cgroups, keeping a recent base for each CPU rate:
the first request after a quiet spell already has usageNanoCores.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.stats import emulated_usage, host
from agent.stats.model import (
    ContainerSnapshot,
    Fs,
    Network,
    NodeSnapshot,
    PodSnapshot,
    Rlimit,
    Snapshot,
    Usage,
)
from agent.stats.rates import CpuRates
from cgroups.detect import CgroupError, detect_mode
from cgroups.stats import CgroupUsageReader, parse_meminfo
from common.logfmt import kv

log = logging.getLogger(__name__)

MAX_AGE = 1.0  # seconds one sampling serves requests
HOUSEKEEPING_INTERVAL = 10.0
COST_FACTOR = 5.0  # a sampling is reused for at least 5x what it cost
STALE_GRACE = 2.0  # how much older than its reuse time an answer may be while a newer one is made
NO_CGROUP_BACKENDS = frozenset({"emulated"})  # nothing runs: no cgroup, no logs (annotations may play usage)


@dataclass(slots=True)
class ContainerTarget:
    name: str
    start_time: float
    cgroup: str | None  # relative to the hierarchies; None: no cgroup to read
    log_dir: str | None
    plan: tuple[int, int] | None = None  # emulated: (millicores, bytes) from annotations
    container_id: str = ""
    image: str = ""


@dataclass(slots=True)
class PodTarget:
    name: str
    namespace: str
    uid: str
    start_time: float
    cgroup: str | None
    netns: str | None
    containers: list[ContainerTarget]


def _timestamp(t: datetime | None) -> float | None:
    return t.timestamp() if t is not None else None


def pod_targets(controller: Any, pods_dir: Path, only_cgroups: bool = False) -> list[PodTarget]:
    """What to sample of a PodController's started Pods (on the loop: it reads the workers)."""
    cgroups = getattr(controller, "cgroups", None)
    found = []
    for worker in list(controller.workers.values()):
        backend, sandbox = worker.backend, worker.sandbox
        if backend is None or sandbox is None or worker.gone:
            continue  # not started, or over: the kubelet reports neither
        measured = cgroups is not None and backend.name not in NO_CGROUP_BACKENDS
        if only_cgroups and not measured:
            continue
        pod = worker.pod
        meta = pod["metadata"]
        annotations = meta.get("annotations") if backend.name == "emulated" else None
        pod_dir = f"{pods_dir}/{meta['namespace']}_{meta['name']}_{meta['uid']}/" if measured else ""
        containers = []
        for name, handle in list(worker.handles.items()):
            started = _timestamp(handle.started_at)
            if started is None:
                continue  # created, not started
            containers.append(
                ContainerTarget(
                    name=name,
                    start_time=started,
                    cgroup=cgroups.container_path(pod, name) if measured else None,
                    log_dir=pod_dir + name if measured else None,
                    # The Pod's annotations first, then the handler profile's usage.
                    plan=(emulated_usage.planned_usage(annotations, name) if annotations else None)
                    or (getattr(handle, "extra", None) or {}).get("usage"),
                    container_id=handle.id,
                    image=handle.image,
                )
            )
        start = _timestamp(worker.rec.start_time) or min((c.start_time for c in containers), default=time.time())
        found.append(
            PodTarget(
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta["uid"],
                start_time=start,
                cgroup=cgroups.pod_path(pod) if measured else None,
                netns=sandbox.netns,
                containers=containers,
            )
        )
    return found


def _host_reader() -> CgroupUsageReader | None:
    try:
        return CgroupUsageReader(detect_mode())
    except CgroupError as exc:
        log.warning("no cgroups to read node and pod usage from", extra=kv(error=str(exc)))
        return None


class StatsCollector:
    def __init__(
        self,
        node_name: str,
        controller: Any,  # agent.pods.PodController: .workers, .cgroups
        state_dir: Path,
        *,
        reader: CgroupUsageReader | None = None,
        max_age: float = MAX_AGE,
        proc: str = "/proc",
    ):
        self.node_name = node_name
        self.controller = controller
        self.state_dir = state_dir
        self.pods_dir = state_dir / "pods"
        self.reader = reader if reader is not None else _host_reader()
        self.rates = CpuRates()
        self.max_age = max_age
        self.proc = proc
        self._boot_time: float | None = None
        self._snapshot: Snapshot | None = None
        self._taken = 0.0  # monotonic time of the snapshot
        self._cost = 0.0  # seconds spent sampling and rendering the current snapshot
        self._building: asyncio.Task[Snapshot] | None = None
        self._rendered: dict[str, tuple[Snapshot, bytes]] = {}
        self._rendering: dict[str, asyncio.Task[bytes]] = {}
        self._io = asyncio.Lock()  # one sampling thread at a time: the CPU rates are not shared safely

    # --- on the loop: what to sample ------------------------------------------------------------

    def targets(self, only_cgroups: bool = False) -> list[PodTarget]:
        return pod_targets(self.controller, self.pods_dir, only_cgroups)

    # --- shared, cached sampling ------------------------------------------------------------------

    @property
    def reuse_for(self) -> float:
        """How long one sampling serves: `max_age`, or longer when sampling and rendering cost much
        (thousands of Pods), so that stats never take more than a fifth of a core."""
        return max(self.max_age, COST_FACTOR * self._cost)

    async def snapshot(self) -> Snapshot:
        if self._snapshot is not None and time.monotonic() - self._taken < self.reuse_for:
            return self._snapshot
        if self._building is None:
            self._building = asyncio.create_task(self._refresh(), name="stats-sampling")
        # Shielded: a client that goes away must not cancel the round others wait for.
        return await asyncio.shield(self._building)

    async def _refresh(self) -> Snapshot:
        try:
            start = time.monotonic()
            targets = self.targets()
            async with self._io:
                snapshot = await asyncio.to_thread(self.build, targets)
        finally:
            self._building = None
        self._snapshot, self._taken = snapshot, time.monotonic()
        self._cost = self._taken - start
        return snapshot

    async def rendered(self, kind: str, render: Callable[[Snapshot], bytes]) -> bytes:
        """The snapshot rendered as `kind` (summary JSON, metrics text...), once per snapshot.

        While a newer sampling or rendering is under way, the last answer serves if it is recent:
        requests that arrive meanwhile do not queue behind it (only the one that started it waits)."""
        cached = self._rendered.get(kind)
        busy = self._building is not None or kind in self._rendering
        if busy and cached is not None and time.time() - cached[0].taken < self.reuse_for + STALE_GRACE:
            return cached[1]
        snapshot = await self.snapshot()
        cached = self._rendered.get(kind)
        if cached is not None and cached[0] is snapshot:
            return cached[1]
        task = self._rendering.get(kind)
        if task is None:
            task = asyncio.create_task(self._render(kind, snapshot, render), name=f"stats-render-{kind}")
            self._rendering[kind] = task
        return await asyncio.shield(task)

    async def _render(self, kind: str, snapshot: Snapshot, render: Callable[[Snapshot], bytes]) -> bytes:
        try:
            start = time.monotonic()
            body = await asyncio.to_thread(render, snapshot)
            self._cost += time.monotonic() - start
        finally:
            self._rendering.pop(kind, None)
        self._rendered[kind] = (snapshot, body)
        return body

    async def housekeeping(self, interval: float = HOUSEKEEPING_INTERVAL) -> None:
        """Read every cgroup now and then, so CPU rates have a base when a request comes."""
        while True:
            await asyncio.sleep(interval)
            try:
                targets = self.targets(only_cgroups=True)
                async with self._io:
                    await asyncio.to_thread(self.sample_cgroups, targets)
            except Exception:
                log.exception("stats housekeeping failed")

    # --- in a thread: reading --------------------------------------------------------------------

    def sample_cgroups(self, targets: list[PodTarget]) -> None:
        seen: list[str] = []
        self._cgroup_usage("", seen)
        for t in targets:
            self._cgroup_usage(t.cgroup, seen)
            for c in t.containers:
                self._cgroup_usage(c.cgroup, seen)
        self.rates.keep_only(seen)

    def build(self, targets: list[PodTarget]) -> Snapshot:
        now = time.time()
        seen: list[str] = []
        node = self._node(now, seen)
        logs_fs = self._fs(self.pods_dir if self.pods_dir.is_dir() else self.state_dir)
        pods = [self._pod(t, now, logs_fs, seen) for t in targets]
        self.rates.keep_only(seen)
        return Snapshot(taken=now, node=node, pods=pods)

    def _cgroup_usage(self, relative: str | None, seen: list[str]) -> Usage | None:
        if relative is None or self.reader is None:
            return None
        try:
            counters = self.reader.read(relative)
        except (OSError, ValueError):
            return None  # gone meanwhile, or a controller missing: no usage rather than an error
        at = time.time()
        key = relative or "/"
        seen.append(key)
        return Usage(at, counters, self.rates.observe(key, at, counters.cpu_usage_ns))

    def _read(self, name: str) -> str:
        return host.read_text(os.path.join(self.proc, name))

    def _fs(self, path: Path) -> host.FsUsage | None:
        try:
            return host.fs_usage(str(path))
        except OSError:
            return None

    def _node(self, now: float, seen: list[str]) -> NodeSnapshot:
        if self._boot_time is None:
            with contextlib.suppress(OSError, ValueError):
                self._boot_time = float(host.parse_boot_time(self._read("stat")))
        node = NodeSnapshot(name=self.node_name, start_time=self._boot_time or 0.0)
        usage = self._cgroup_usage("", seen)
        if usage is not None:
            with contextlib.suppress(OSError):
                # The root cgroup's limit is the machine's memory (cadvisor's root spec).
                total = parse_meminfo(self._read("meminfo")).get("MemTotal")
                usage = replace(usage, counters=replace(usage.counters, memory_limit_bytes=total))
        node.usage = usage
        with contextlib.suppress(OSError, ValueError, IndexError):
            default = host.default_route_interface(self._read("net/route")) or host.DEFAULT_INTERFACE
            node.network = Network(now, host.parse_net_dev(self._read("net/dev")), default)
        fs = self._fs(self.state_dir)
        if fs is not None:
            node.fs = node.image_fs = Fs(now, fs)
        max_pid = processes = None
        with contextlib.suppress(OSError, ValueError):
            max_pid = int(self._read("sys/kernel/pid_max"))
        with contextlib.suppress(OSError, ValueError, IndexError):
            processes = host.parse_thread_count(self._read("loadavg"))
        node.rlimit = Rlimit(now, max_pid, processes)
        cgroups = getattr(self.controller, "cgroups", None)
        if cgroups is not None:
            node.pods_cgroup = self._cgroup_usage(cgroups.root_path, seen)
            node.pods_cgroup_start = node.start_time
            node.pods_cgroup_path = cgroups.root_path
        return node

    def _pod(self, t: PodTarget, now: float, logs_fs: host.FsUsage | None, seen: list[str]) -> PodSnapshot:
        pod = PodSnapshot(name=t.name, namespace=t.namespace, uid=t.uid, start_time=t.start_time, cgroup=t.cgroup)
        log_used = log_files = 0
        any_logs = False
        for c in t.containers:
            snap = ContainerSnapshot(
                name=c.name, start_time=c.start_time, container_id=c.container_id, image=c.image, cgroup=c.cgroup
            )
            if c.plan is not None:
                snap.usage = emulated_usage.synthetic_usage(c.plan, c.start_time, now)
            else:
                snap.usage = self._cgroup_usage(c.cgroup, seen)
            if c.log_dir is not None and logs_fs is not None:
                used = _log_usage(c.log_dir)
                if used is not None:
                    any_logs = True
                    log_used += used[0]
                    log_files += used[1]
                    snap.logs = Fs(now, replace(logs_fs, used_bytes=used[0], inodes_used=used[1]))
            pod.containers.append(snap)
        if t.cgroup is not None:
            pod.usage = self._cgroup_usage(t.cgroup, seen)
        else:
            pod.usage = emulated_usage.add_usages([c.usage for c in pod.containers if c.usage], now)
        if any_logs and logs_fs is not None:
            pod.ephemeral_storage = Fs(now, replace(logs_fs, used_bytes=log_used, inodes_used=log_files))
        pod.network = self._pod_network(t, now)
        return pod

    def _pod_network(self, t: PodTarget, now: float) -> Network | None:
        """Counters of the Pod's own network namespace, read through a process inside it (as cadvisor
        does): no namespace switching. Pods on the host's network report none."""
        if not t.netns or self.reader is None:
            return None
        try:
            want = os.stat(t.netns)
        except OSError:
            return None
        for c in t.containers:
            for pid in self.reader.pids(c.cgroup) if c.cgroup else []:
                try:
                    ns = os.stat(os.path.join(self.proc, str(pid), "ns", "net"))
                    if (ns.st_dev, ns.st_ino) != (want.st_dev, want.st_ino):
                        continue
                    text = self._read(f"{pid}/net/dev")
                except OSError:
                    continue
                return Network(now, host.parse_net_dev(text), host.DEFAULT_INTERFACE)
        return None


def _log_usage(directory: str) -> tuple[int, int] | None:
    """(bytes on disk, files) of a container's CRI logs, rotated ones included; None: no log directory."""
    used = files = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if ".log" in entry.name and entry.is_file(follow_symlinks=False):
                    used += entry.stat(follow_symlinks=False).st_blocks * 512  # disk usage, as du counts
                    files += 1
    except OSError:
        return None
    return used, files
