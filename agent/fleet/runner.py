"""`kubelet-emu fleet`: N emulated nodes in one process.

Each node is the single-node agent's own NodeAgent (registration, Lease, status) and PodController
(admission, Pod workers, the emulated backend). What would cost per node is shared:

- one Pod watch for the whole fleet: every Pod with spec.nodeName set (a field selector cannot say
  "nodeName in this set", and fleet Pods carry no label to select on), routed here by nodeName;
  Pods of other nodes are dropped before they are slimmed or kept;
- one Node watch (label kubelet-emu.io/fleet=<name>), routed by name;
- one RuntimeClass cache, one API client with one connection pool, one bound on status writes;
- Lease renewals at a random phase of their 10 s and periodic status posts at a random point of
  their 5 min, so the API server sees a steady rate, not the burst of a fleet registered at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import state_lock
from agent.config import AgentConfig, ConfigError, load_config
from agent.config.fleet import FLEET_LABEL, FleetNode, FleetSettings, fleet_nodes
from agent.events import EventRecorder
from agent.fleet.ctl import read_health
from agent.fleet.identity import IdentityError, check_identity
from agent.fleet.kubelet_api import FleetKubeletAPI
from agent.fleet.shape import check_fleet_config, node_facts
from agent.hostinfo import HostInfo, address_toward, read_host_info
from agent.informer import Informer
from agent.kube import ApiError, Kube
from agent.kubelet_api.server import DEFAULT_PORT
from agent.kubelet_api.tls import ServingNames, TLSConfigError
from agent.node import NodeAgent
from agent.pods import PodController, SharedWatches, slim_service
from agent.tls_memory import shrink_tls_read_buffers
from common.logfmt import kv
from runtimes.registry import known_backends

log = logging.getLogger("agent.fleet")

JSON = dict[str, Any]
DRAIN_TIMEOUT = 60.0  # seconds a removed node waits for its Pods to go before it leaves anyway
STOP_TIMEOUT = 4.0
HEARTBEAT_CONNECTIONS = 8  # 100 renewals a second for 1000 nodes need 1 or 2 at a time
RECOVERY_DEBOUNCE = 30.0  # seconds between two renewals of the shared connections and watches
LEASES = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"


@dataclasses.dataclass(eq=False)
class Member:
    """One node of the fleet."""

    spec: FleetNode
    node: NodeAgent
    pods: PodController
    task: asyncio.Task[None] | None = None
    leaving: bool = False
    sock: socket.socket | None = None  # its kubelet API port, until served


def with_count(settings: FleetSettings, count: int | None) -> FleetSettings:
    """--count: the size of a fleet of one group."""
    if count is None:
        return settings
    if len(settings.groups) != 1:
        raise ConfigError(f"{settings.source}: [fleet] has groups; set each group's count instead of --count")
    return dataclasses.replace(settings, groups=(dataclasses.replace(settings.groups[0], count=count),))


class Fleet:
    def __init__(
        self,
        kube: Kube,
        config: AgentConfig,
        state_dir: Path,
        host: HostInfo,
        ip: str,
        api: FleetKubeletAPI | None = None,
    ):
        assert config.fleet is not None
        self.api = api
        self.kube = kube
        self.heartbeat = kube.sibling(HEARTBEAT_CONNECTIONS)  # Leases and status posts: see Kube.sibling
        self.config = config
        self.settings: FleetSettings = config.fleet
        self.state_dir = state_dir
        self.host, self.ip = host, ip
        self.members: dict[str, Member] = {}
        self._route: dict[str, str] = {}  # Pod uid -> node name, for deletions seen after a relist
        self._tasks: set[asyncio.Task[Any]] = set()
        self._recovered_at = -RECOVERY_DEBOUNCE
        self.runtime_classes = Informer(
            kube,
            "/apis/node.k8s.io/v1/runtimeclasses",
            on_upsert=self._runtime_class_changed,
            on_delete=self._runtime_class_changed,
            name="runtimeclasses",
        )
        self.pods = Informer(
            kube,
            "/api/v1/pods",
            field_selector="spec.nodeName!=",
            on_upsert=self._pod_upserted,
            on_delete=self._pod_deleted,
            name="pods",
            keep_objects=False,
            transform=self._slim_ours,
        )
        self.nodes = Informer(
            kube,
            "/api/v1/nodes",
            label_selector=f"{FLEET_LABEL}={self.settings.name}",
            on_upsert=self._node_seen,
            on_delete=self._node_deleted,
            name="nodes",
            keep_objects=False,
        )
        # Only the process backend reads Services (for environment variables); a fleet never
        # starts this watch.
        services = Informer(kube, "/api/v1/services", on_upsert=_ignore, on_delete=_ignore, transform=slim_service)
        self.shared = SharedWatches(self.runtime_classes, self.pods, services)

    # --- routing of the shared watches ------------------------------------------------------------

    def _slim_ours(self, pod: JSON) -> JSON:
        member = self.members.get(pod.get("spec", {}).get("nodeName"))
        return member.pods.slim_pod(pod) if member is not None else pod

    def _pod_upserted(self, pod: JSON) -> None:
        name = pod["spec"].get("nodeName")
        member = self.members.get(name)
        if member is None:
            return
        self._route[pod["metadata"]["uid"]] = name
        if member.node.registered.is_set():
            member.pods.pod_upserted(pod)
        else:  # admission reads the Node's labels: wait until it is registered
            self.spawn(_after(member.node.registered.wait(), member.pods.pod_upserted, pod))

    def _pod_deleted(self, pod: JSON) -> None:
        uid = pod["metadata"]["uid"]
        name = self._route.pop(uid, None) or pod.get("spec", {}).get("nodeName")
        member = self.members.get(name or "")
        if member is not None:
            member.pods.pod_deleted(pod)

    def _node_seen(self, node: JSON) -> None:
        member = self.members.get(node["metadata"]["name"])
        if member is not None and member.node.registered.is_set():
            member.node.node_seen(node)

    def _node_deleted(self, node: JSON) -> None:
        member = self.members.get(node["metadata"]["name"])
        if member is not None and not member.leaving:
            member.node.node_deleted(node)

    def _runtime_class_changed(self, _: JSON) -> None:
        for member in self.members.values():
            member.pods.wake_all()

    def _api_recovered(self) -> None:
        """A node's heartbeat works again after failing. A thousand nodes say so at once after an
        outage: the shared connections and watches are renewed once, not once per node."""
        now = time.monotonic()
        if now - self._recovered_at < RECOVERY_DEBOUNCE:
            return
        self._recovered_at = now
        self.kube.reset_connections()
        self.heartbeat.reset_connections()
        for informer in (self.pods, self.nodes, self.runtime_classes):
            informer.retry_now()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- members ----------------------------------------------------------------------------------

    def _member(self, spec: FleetNode) -> Member:
        sock = self.api.bind() if self.api is not None else None
        port = sock.getsockname()[1] if sock is not None else DEFAULT_PORT
        facts = node_facts(self.config, spec, self.settings.name, self.host, self.ip, port)
        node = NodeAgent(self.kube, facts, own_watch=False, spread=True, heartbeat=self.heartbeat)
        node.shared_recovery = self._api_recovered
        events = EventRecorder(self.kube, spec.name, policy=self.config.events)
        pods = PodController(self.kube, node, facts.config, self.state_dir, events, shared=self.shared)
        return Member(spec, node, pods, sock=sock)

    def _start(self, spec: FleetNode) -> Member:
        member = self._member(spec)
        self.members[spec.name] = member
        member.task = asyncio.create_task(self._member_main(member), name=f"node:{spec.name}")
        return member

    async def _member_main(self, member: Member) -> None:
        if self.api is not None and member.sock is not None:
            sock, member.sock = member.sock, None
            await self.api.serve(member.pods, sock)
        await member.node.register()
        await member.node.run()

    async def remove(self, member: Member) -> None:
        """Drain and leave: cordon, delete the node's Pods, wait for them to go, then delete the
        Lease and the Node."""
        member.leaving = True
        name = member.spec.name
        path = f"/api/v1/nodes/{name}"
        with contextlib.suppress(ApiError):
            await self.kube.patch(path, {"spec": {"unschedulable": True}})
        for worker in list(member.pods.workers.values()):
            namespace, pod = worker.key.split("/", 1)
            with contextlib.suppress(ApiError):
                await self.kube.delete(f"/api/v1/namespaces/{namespace}/pods/{pod}")
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while member.pods.workers and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        if member.pods.workers:
            log.warning("node left with Pods still running", extra=kv(node=name, pods=len(member.pods.workers)))
        if member.task is not None:
            member.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await member.task
        await member.pods.close()
        if self.api is not None:
            await self.api.stop_serving(name)
        for gone in (f"{LEASES}/{name}", path):
            try:
                await self.kube.delete(gone)
            except ApiError as exc:
                if not exc.not_found:
                    log.warning("cannot delete", extra=kv(node=name, path=gone, error=exc.describe()))
        if self.members.get(name) is member:
            del self.members[name]
        log.info("node removed", extra=kv(node=name))

    async def start(self) -> None:
        """Register every node, then start the shared Pod watch (admission needs the Nodes)."""
        self.spawn(self.runtime_classes.run())
        await self.runtime_classes.synced.wait()
        for spec in fleet_nodes(self.settings):
            self._start(spec)
        self.spawn(self.nodes.run())
        await asyncio.gather(*(m.node.registered.wait() for m in self.members.values()))
        log.info("fleet registered", extra=kv(fleet=self.settings.name, nodes=len(self.members)))
        self.apply_health()
        self.spawn(self.pods.run())

    # --- signals ----------------------------------------------------------------------------------

    def reload(self, config_path: str, count: int | None) -> None:
        """SIGHUP: re-read the config; nodes added, removed (drained) or reshaped."""
        try:
            config = load_config(config_path, known_backends())
            check_fleet_config(config)
            assert config.fleet is not None
            settings = with_count(config.fleet, count)
            specs = {s.name: s for s in fleet_nodes(settings)}
        except ConfigError as exc:
            log.error("configuration not reloaded: " + str(exc))
            return
        if settings.name != self.settings.name:
            log.error("configuration not reloaded: [fleet] name cannot change while the fleet runs; restart it")
            return
        self.config = dataclasses.replace(config, fleet=settings)
        self.settings = settings
        added = removed = reshaped = 0
        for name, member in list(self.members.items()):
            if member.leaving:
                continue
            spec = specs.get(name)
            if spec is None:
                self.spawn(self.remove(member))
                removed += 1
            elif spec != member.spec:
                port = member.node.facts.kubelet_port
                facts = node_facts(self.config, spec, settings.name, self.host, self.ip, port)
                member.spec = spec
                member.node.facts = facts
                member.node.set_config(facts.config)
                member.pods.set_config(facts.config)
                reshaped += 1
        for name, spec in specs.items():
            if name not in self.members:
                self._start(spec)
                added += 1
        log.info("configuration reloaded", extra=kv(nodes=len(specs), added=added, removed=removed, reshaped=reshaped))

    def apply_health(self) -> None:
        """SIGUSR2 (from `kubelet-emu fleet ctl`): the wanted health of each node."""
        wanted = read_health(self.state_dir)
        for name, member in self.members.items():
            health = wanted.get(name)
            member.node.set_health(None if health in (None, "ready") else health)

    def stats(self) -> JSON:
        members = list(self.members.values())
        traced = _heap_profile() if tracemalloc.is_tracing() else {}
        return traced | {
            "nodes": len(members),
            "requests_by_verb": self.kube.requests_by_verb,
            "lease_renewals": sum(m.node.lease.renewals for m in members if m.node.lease),
            "status_writes": sum(m.pods.status_writes for m in members),
            "events_posted": sum(m.pods.events.posted for m in members),
            "pods": sum(len(m.pods.workers) for m in members),
            "pod_watch_relists": self.pods.relists,
            "pod_watch_restarts": self.pods.watch_restarts,
        }

    async def close(self) -> None:
        for member in self.members.values():
            if member.task is not None:
                member.task.cancel()
        for task in self._tasks:
            task.cancel()
        pending = [m.task for m in self.members.values() if m.task is not None] + list(self._tasks)
        if pending:
            await asyncio.wait(pending, timeout=STOP_TIMEOUT)
        for member in self.members.values():
            await member.pods.close()
            if member.sock is not None:
                member.sock.close()
        if self.api is not None:
            await self.api.close()
        await self.heartbeat.close()


def _ignore(_: JSON) -> None:
    pass


def _heap_profile(top: int = 40) -> JSON:
    """Under tracemalloc (bench/fleet_idle.py --trace): the heap held and where it was allocated,
    the largest sites first, to see what each idle node costs."""
    snapshot = tracemalloc.take_snapshot().filter_traces((tracemalloc.Filter(False, tracemalloc.__file__),))
    sites = snapshot.statistics("lineno")[:top]
    return {
        "traced_bytes": tracemalloc.get_traced_memory()[0],
        "top_allocations": [
            {"site": f"{s.traceback[0].filename}:{s.traceback[0].lineno}", "bytes": s.size, "blocks": s.count}
            for s in sites
        ],
    }


async def _after(wait: Any, then: Callable[[JSON], None], pod: JSON) -> None:
    await wait
    then(pod)


@dataclasses.dataclass(frozen=True)
class FleetOptions:
    kubeconfig: str
    config_path: str
    state_dir: Path
    count: int | None = None
    node_ip: str | None = None
    allow_admin: bool = False


def write_stats(path: Path, fleet: Fleet) -> None:
    with contextlib.suppress(OSError):
        path.write_text(json.dumps(fleet.stats(), indent=2))


async def run(opts: FleetOptions) -> int:
    try:
        config = load_config(opts.config_path, known_backends())
        check_fleet_config(config)
        assert config.fleet is not None
        config = dataclasses.replace(config, fleet=with_count(config.fleet, opts.count))
        assert config.fleet is not None
        fleet_nodes(config.fleet)  # a bad --count template fails here
    except ConfigError as exc:
        log.error(str(exc))
        return 2
    for warning in config.warnings:
        log.warning(warning)
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        state_lock.acquire(opts.state_dir)  # held until the process exits; `fleet ctl` finds the pid here
    except (state_lock.StateDirBusyError, OSError) as exc:
        log.error(str(exc))
        return 2
    shrink_tls_read_buffers()
    kube = await Kube.from_kubeconfig(opts.kubeconfig)
    try:
        await check_identity(kube, opts.allow_admin)
    except IdentityError as exc:
        log.error(str(exc))
        await kube.close()
        return 2
    host = read_host_info(str(opts.state_dir))
    ip = opts.node_ip or address_toward(kube.host)
    api: FleetKubeletAPI | None = None
    if config.kubelet_api.enabled:
        api = FleetKubeletAPI(config.kubelet_api, kube, opts.kubeconfig, opts.state_dir)
        try:
            await api.start(ServingNames.of(config.fleet.name, host.hostname, ip))
        except (TLSConfigError, OSError) as exc:
            log.error(
                f"kubelet API not started: {exc}; set [kubelet_api] tls_cert_file/tls_key_file or enabled = false"
            )
            await kube.close()
            return 2
    fleet = Fleet(kube, config, opts.state_dir, host, ip, api)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, fleet.reload, opts.config_path, opts.count)
    loop.add_signal_handler(signal.SIGUSR2, fleet.apply_health)
    stats_path = opts.state_dir / "agent-stats.json"
    loop.add_signal_handler(signal.SIGUSR1, write_stats, stats_path, fleet)
    log.info(
        "kubelet-emu fleet starting",
        extra=kv(fleet=config.fleet.name, nodes=config.fleet.count, server=kube.host, pid=os.getpid()),
    )
    starter = asyncio.create_task(fleet.start(), name="fleet-start")
    try:
        await stop.wait()
        log.info("stopping", extra=kv(fleet=config.fleet.name))
        return 0
    finally:
        starter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starter
        await fleet.close()
        write_stats(stats_path, fleet)
        await kube.close()
