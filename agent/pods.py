"""The Pod controller: watches the Pods bound to this node and gives each a worker."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Coroutine
from pathlib import Path
from sys import intern
from typing import TYPE_CHECKING, Any

from agent import metrics
from agent.admission import NodeUsage, Rejection
from agent.config import AgentConfig
from agent.events import EventRecorder
from agent.informer import Informer
from agent.interning import shared
from agent.kube import STRATEGIC_MERGE_PATCH, ApiError, Kube
from agent.node_status import allocatable
from agent.pod_worker import PodWorker, Unresolved
from agent.resize import infeasible
from cgroups.manager import CgroupError, CgroupManager
from common.logfmt import kv
from runtimes.base import Backend, BackendContext
from runtimes.registry import backend_class

if TYPE_CHECKING:
    from agent.node import NodeAgent

log = logging.getLogger(__name__)

JSON = dict[str, Any]
FINISHED_MEMORY = 120.0  # seconds to ignore late events about a Pod whose worker is done


SA_TOKEN_VOLUME_PREFIX = "kube-api-access-"


# Status writes in flight at once. Each needs a connection of its own (HTTP/1.1; agent/kube.py
# CONNECTIONS holds them), and each new connection a TLS handshake on both sides. 64 capped a
# 5000-Pod start at ~320 writes a second, below the rate Pods were created.
WRITE_CONCURRENCY = 128
SERVICES_SYNC_WAIT = 30.0  # seconds a container waits for the first list of Services


def slim_pod(pod: JSON, like: JSON | None = None) -> JSON:
    """Drop what the agent never reads, to keep thousands of Pods small in memory:
    managedFields (often a third of a Pod), kubectl's last-applied copy, the tolerations but
    those of NoExecute taints (the rest is the scheduler's business; admission checks these)
    and the service-account token volume the API server adds (no backend here projects tokens)."""
    meta = pod.get("metadata") or {}
    meta.pop("managedFields", None)
    annotations = meta.get("annotations")
    if annotations:
        annotations.pop("kubectl.kubernetes.io/last-applied-configuration", None)
    spec = pod.get("spec") or {}
    tolerations = [t for t in spec.pop("tolerations", None) or () if t.get("effect") in (None, "", "NoExecute")]
    if tolerations:
        spec["tolerations"] = tolerations
    volumes = spec.get("volumes")
    if volumes:
        spec["volumes"] = [v for v in volumes if not v.get("name", "").startswith(SA_TOKEN_VOLUME_PREFIX)]
        if not spec["volumes"]:
            del spec["volumes"]
    for container in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        mounts = container.get("volumeMounts")
        if mounts:
            container["volumeMounts"] = [m for m in mounts if not m.get("name", "").startswith(SA_TOKEN_VOLUME_PREFIX)]
            if not container["volumeMounts"]:
                del container["volumeMounts"]
    # The status is left as decoded: for a running Pod it is our own echo, and the worker keeps
    # only the few conditions others own (shared there), so interning it would be wasted work.
    if like is None:
        return {k: v if k == "status" else shared(v) for k, v in pod.items()}
    return {k: v if k == "status" else _shared_like(v, like.get(k)) for k, v in pod.items()}


def _shared_like(value: Any, old: Any) -> Any:
    """`value` interned, with each entry equal to the one in `old` (the worker's copy of the Pod,
    interned already) taken from there: an update changes little of a Pod, and comparing is far
    cheaper than interning it all again (that was a tenth of an emulated Pod's CPU)."""
    if not isinstance(value, dict) or not isinstance(old, dict):
        return shared(value)
    out = {}
    for k, v in value.items():
        o = old.get(k, _MISSING)
        out[intern(k)] = o if o is not _MISSING and o == v else shared(v)
    return out


_MISSING = object()


def slim_service(service: JSON) -> JSON:
    """What the Service environment variables need of a Service."""
    spec = service.get("spec") or {}
    ports = [{k: p[k] for k in ("name", "port", "protocol") if k in p} for p in spec.get("ports") or []]
    meta = service["metadata"]
    slim_spec = {"clusterIP": spec.get("clusterIP", ""), "type": spec.get("type", "ClusterIP"), "ports": ports}
    slim_meta = {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion") if k in meta}
    return {"metadata": slim_meta, "spec": slim_spec}


def _ignore(_: JSON) -> None:
    pass


def _cgroup_manager(config: AgentConfig) -> CgroupManager | None:
    """The Pod cgroup manager, or None where cgroups cannot be used (not root, no controllers)."""
    if os.geteuid() != 0:
        return None
    try:
        manager = CgroupManager(root=config.node.cgroup_root, driver=config.node.cgroup_driver)
        # A containerized host: the agent at its cgroup namespace's root moves into a leaf first.
        if moved := manager.make_room_for_children():
            log.info("cgroup v2: moved into a leaf", extra=kv(detail=moved))
        return manager
    except CgroupError as exc:
        log.warning("pod cgroups unavailable; the process backend will refuse Pods", extra=kv(error=str(exc)))
        return None


class SharedWatches:
    """What the nodes of a fleet share: one RuntimeClass cache, one Pod watch (routed to the
    nodes by the fleet), one Service cache and one bound on status writes in flight."""

    def __init__(self, runtime_classes: Informer, pods: Informer, services: Informer):
        self.runtime_classes = runtime_classes
        self.pods = pods
        self.services = services
        self.write_slots = asyncio.Semaphore(WRITE_CONCURRENCY)


class PodController:
    def __init__(
        self,
        kube: Kube,
        node: NodeAgent,
        config: AgentConfig,
        state_dir: Path,
        events: EventRecorder,
        shared: SharedWatches | None = None,
    ):
        """With `shared` (fleet mode) the watches are the fleet's: it calls pod_upserted and
        pod_deleted for this node's Pods and wake_all on RuntimeClass changes; run() is not used."""
        self.kube = kube
        self.node = node
        self.config = config
        self.state_dir = state_dir
        self.node_credentials: tuple[str, ...] = ()  # set by the runner: hidden from process containers
        self.events = events
        self.host_ip = node.facts.internal_ip
        self.workers: dict[str, PodWorker] = {}
        self.usage = NodeUsage()
        self._allocatable = allocatable(node.facts)
        self.backends: dict[str, Backend] = {}
        self.status_writes = 0
        self.status_corrections = 0  # writes made because someone else changed a Pod's status
        self._finished: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.images: Any = None  # images.service.ImageService, set by the runner when a handler needs images
        self.network: Any = None  # network.pods.PodNetworks, set by the runner once the pod CIDR is known
        if shared is not None:
            self.cgroups = None  # a fleet runs emulated handlers only
            self.write_slots = shared.write_slots
            self.runtime_classes, self.services, self.pods = shared.runtime_classes, shared.services, shared.pods
            return
        self.cgroups = _cgroup_manager(config)
        self.write_slots = asyncio.Semaphore(WRITE_CONCURRENCY)
        self.runtime_classes = Informer(
            kube,
            "/apis/node.k8s.io/v1/runtimeclasses",
            on_upsert=self._runtime_class_changed,
            on_delete=self._runtime_class_changed,
            name="runtimeclasses",
        )
        # Services for the containers' environment variables (the node authorizer lets a node
        # list and watch them), slimmed to what the variables need.
        self.services = Informer(
            kube,
            "/api/v1/services",
            on_upsert=_ignore,
            on_delete=_ignore,
            name="services",
            transform=slim_service,
        )
        self.pods = Informer(
            kube,
            "/api/v1/pods",
            field_selector=f"spec.nodeName={node.name}",
            on_upsert=self.pod_upserted,
            on_delete=self.pod_deleted,
            name="pods",
            keep_objects=False,  # each worker holds its Pod; one copy per Pod is enough
            transform=self.slim_pod,
        )

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.runtime_classes.run(), name="runtimeclass-watch")
            tg.create_task(self.services.run(), name="service-watch")
            await self.runtime_classes.synced.wait()
            tg.create_task(self.pods.run(), name="pod-watch")

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- watch callbacks -------------------------------------------------------------------------

    def slim_pod(self, pod: JSON) -> JSON:
        """The Pod as its worker keeps it (reusing what the worker already holds of it)."""
        worker = self.workers.get((pod.get("metadata") or {}).get("uid", ""))
        return slim_pod(pod, worker.pod if worker is not None else None)

    def pod_upserted(self, pod: JSON) -> None:
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if worker is not None:
            worker.update(pod)
            return
        if uid in self._finished:
            return
        worker = PodWorker(self, pod)
        worker.update(pod)
        self.workers[uid] = worker
        worker.task = self.spawn(worker.run())

    def pod_deleted(self, pod: JSON) -> None:
        worker = self.workers.get(pod["metadata"]["uid"])
        if worker is not None:
            worker.object_deleted()

    def _runtime_class_changed(self, _: JSON) -> None:
        self.wake_all()

    def wake_all(self) -> None:
        for worker in self.workers.values():
            if worker.wake is not None:
                worker.wake.set()

    async def write_status(self, namespace: str, name: str, body: bytes) -> None:
        """A worker's status patch (a strategic merge patch with the uid precondition in `body`)."""
        async with self.write_slots:
            # The answer is not kept: the watch delivers the same object, and one
            # copy of each Pod is what keeps memory flat at thousands of Pods.
            await self.kube.patch(
                f"/api/v1/namespaces/{namespace}/pods/{name}/status",
                body,
                content_type=STRATEGIC_MERGE_PATCH,
                parse=False,
            )
        self.status_writes += 1

    def release(self, worker: PodWorker) -> None:
        if self.workers.get(worker.uid) is worker:
            del self.workers[worker.uid]
        now = time.monotonic()
        self._finished[worker.uid] = now
        # Insertion order is age order: drop expired entries from the front only.
        while self._finished:
            uid, at = next(iter(self._finished.items()))
            if now - at <= FINISHED_MEMORY:
                break
            del self._finished[uid]

    # --- configuration ---------------------------------------------------------------------------

    def set_config(self, config: AgentConfig) -> None:
        """A reloaded configuration: new handlers serve waiting Pods at once."""
        self.config = config
        self._allocatable = allocatable(self.node.facts)
        for name in list(self.backends):
            if name not in config.handlers or config.handlers[name] != self.backends[name].handler:
                self.backends.pop(name)  # running Pods keep their instance; new Pods get a fresh one
        self.wake_all()

    def backend_for(self, handler_name: str) -> Backend:
        backend = self.backends.get(handler_name)
        if backend is None:
            handler = self.config.handlers[handler_name]
            node = self.config.node
            context = BackendContext(
                node_name=self.node.name,
                state_dir=self.state_dir / "runtimes" / handler_name,
                pods_dir=self.state_dir / "pods",
                host_ip=self.host_ip,
                lookup=self.lookup,
                cgroups=self.cgroups,
                pod_pids_limit=node.pod_pids_limit,
                log_max_size=node.container_log_max_size,
                log_max_files=node.container_log_max_files,
                images=self.images,
                network=self.network,
                node_credentials=self.node_credentials,
                allocatable=lambda: self._allocatable,
                services=self.list_services,
            )
            backend = metrics.instrument_backend(backend_class(handler.backend)(handler, context))
            self.backends[handler_name] = backend
        return backend

    async def lookup(self, kind: str, namespace: str, name: str) -> JSON | None:
        """A ConfigMap or Secret a container refers to (the node authorizer allows exactly those)."""
        resource = {"ConfigMap": "configmaps", "Secret": "secrets"}[kind]
        try:
            return await self.kube.get(f"/api/v1/namespaces/{namespace}/{resource}/{name}")
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    async def list_services(self, namespace: str) -> list[JSON]:
        """The Services of a namespace from the watch's cache. Like the kubelet, no environment
        is built before the Services were read once."""
        if not self.services.synced.is_set():
            try:
                await asyncio.wait_for(self.services.synced.wait(), SERVICES_SYNC_WAIT)
            except TimeoutError:
                raise RuntimeError("services have not yet been read at least once, cannot construct envvars") from None
        prefix = f"{namespace}/"
        return [svc for key, svc in self.services.store.items() if key.startswith(prefix)]

    # --- RuntimeClass resolution -----------------------------------------------------------------

    async def _runtime_class(self, name: str) -> JSON | None:
        rc = self.runtime_classes.store.get(f"/{name}")
        if rc is not None:
            return rc
        try:  # the cache may lag behind a RuntimeClass created a moment ago
            return await self.kube.get(f"/apis/node.k8s.io/v1/runtimeclasses/{name}")
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    async def resolve(self, pod: JSON) -> tuple[str, Backend] | Unresolved:
        """runtimeClassName -> RuntimeClass -> handler -> backend."""
        handlers = self.config.handlers
        have = ", ".join(sorted(handlers)) or "none"
        class_name = pod["spec"].get("runtimeClassName")
        if not class_name:
            default = self.config.default_runtime
            if default and default in handlers:
                return default, self.backend_for(default)
            message = (
                f"the Pod names no RuntimeClass and node {self.node.name} has no default_runtime (handlers: {have})"
            )
            return Unresolved("RuntimeHandlerNotFound", message, f"Failed to create pod sandbox: {message}")
        try:
            rc = await self._runtime_class(class_name)
        except ApiError as exc:
            message = f'cannot read RuntimeClass "{class_name}": {exc.describe()}'
            return Unresolved("RuntimeClassNotFound", message, f"Failed to create pod sandbox: {message}")
        if rc is None:
            message = f'RuntimeClass "{class_name}" not found'
            return Unresolved("RuntimeClassNotFound", message, f"Failed to create pod sandbox: {message}")
        handler = rc.get("handler", "")
        if handler not in handlers:
            message = (
                f'RuntimeClass "{class_name}" names handler "{handler}", which node {self.node.name} does not have '
                f"(its handlers: {have})"
            )
            event = f'Failed to create pod sandbox: no runtime for "{handler}" is configured ({message})'
            return Unresolved("RuntimeHandlerNotFound", message, event)
        return handler, self.backend_for(handler)

    # --- admission -------------------------------------------------------------------------------

    def admit(self, worker: PodWorker) -> Rejection | None:
        """The kubelet's admission; an admitted Pod's requests count until unadmit()."""
        node_obj = self.node.node or {}
        labels = node_obj.get("metadata", {}).get("labels") or {}
        taints = node_obj.get("spec", {}).get("taints") or ()
        rejection = self.usage.admit(worker.pod, self.node.name, labels, self._allocatable, taints)
        if rejection is None:
            self.usage.add(worker.pod)
        return rejection

    async def reread_node(self) -> None:
        """Admission failed on the node's labels: decide again on the Node the API server holds."""
        await self.node.reread()

    def resize_fits(self, worker: PodWorker, desired: JSON) -> tuple[str, str] | None:
        """canResizePod: None when the resized Pod fits (its requests then count), else
        ("Infeasible" | "Deferred", the kubelet's message)."""
        message = infeasible(desired, self._allocatable)
        if message:
            return "Infeasible", message
        node_obj = self.node.node or {}
        labels = node_obj.get("metadata", {}).get("labels") or {}
        rejection = self.usage.admit(desired, self.node.name, labels, self._allocatable)
        if rejection is not None:
            return "Deferred", rejection.message.removeprefix("Pod was rejected: ")
        self.usage.add(desired)
        return None

    def unadmit(self, worker: PodWorker) -> None:
        worker.admitted = False
        self.usage.remove(worker.uid)

    async def close(self) -> None:
        for backend in self.backends.values():
            try:
                await backend.close()
            except Exception:
                log.exception("backend close failed", extra=kv(backend=backend.name))
