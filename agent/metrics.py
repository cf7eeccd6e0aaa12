"""The agent's own Prometheus metrics (served at /metrics), in a registry of their own.

Cheap on the hot path: recording is a plain call (no await), label children are looked up once and
kept, and labels come from small fixed sets (verb, resource kind, code, backend, operation,
handler, phase); never Pod names. Counters the agent already keeps (watch restarts and relists,
lease renewal failures, status writes) and Pods by phase are read when scraped, not recorded.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from functools import wraps
from typing import Any

from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=False)
# The standard process_* (CPU, memory, open files of this process) and python_* (interpreter, GC)
# families every Prometheus client library exports, as the kubelet exports Go's process_* and go_*.
ProcessCollector(registry=REGISTRY)
REGISTRY.register(PLATFORM_COLLECTOR)
REGISTRY.register(GC_COLLECTOR)

POD_START_DURATION = Histogram(
    "kubelet_emu_pod_start_duration_seconds",
    "Time from a Pod's creation to the agent seeing it Running, by runtime handler",
    ["handler"],
    buckets=(0.25, 0.5, 1, 2, 3, 5, 8, 10, 15, 20, 30, 45, 60, 120, 300, 600),
    registry=REGISTRY,
)
RUNTIME_OPERATION_DURATION = Histogram(
    "kubelet_emu_runtime_operations_duration_seconds",
    "Duration of runtime backend operations, by backend and operation",
    ["backend", "operation"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
RUNTIME_OPERATION_ERRORS = Counter(
    "kubelet_emu_runtime_operations_errors",
    "Runtime backend operations that failed, by backend and operation",
    ["backend", "operation"],
    registry=REGISTRY,
)
API_REQUESTS = Counter(
    "kubelet_emu_api_requests",
    "Requests to the API server by verb, resource and HTTP code (code <error>: no answer)",
    ["verb", "resource", "code"],
    registry=REGISTRY,
)
API_REQUEST_ERRORS = Counter(
    "kubelet_emu_api_request_errors",
    "Requests to the API server that got no answer or a code of 400 or more, by verb and resource",
    ["verb", "resource"],
    registry=REGISTRY,
)

# Backend methods timed by instrument_backend (wait_container and exec run as long as the container
# or command does: no latency to speak of).
TIMED_OPERATIONS = (
    "create_sandbox",
    "remove_sandbox",
    "create_container",
    "start_container",
    "stop_container",
    "remove_container",
    "adopt_container",
)


# --- API requests (agent/kube.py) -------------------------------------------------------------


def api_resource(path: str) -> str:
    """The resource a request path names, with its subresource: "pods/status", "leases", "nodes".
    /api/v1/namespaces/ns/pods/name/status -> pods/status; /apis/g/v/tokenreviews -> tokenreviews."""
    parts = path.split("?", 1)[0].strip("/").split("/")
    rest = parts[2:] if parts[0] == "api" else parts[3:]
    if len(rest) > 2 and rest[0] == "namespaces":
        rest = rest[2:]
    if not rest:
        return ""
    return f"{rest[0]}/{rest[2]}" if len(rest) > 2 else rest[0]


_api_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def api_request(verb: str, path: str, status: int) -> None:
    """Count one request; `status` 0 means no answer came (unreachable, timeout)."""
    key = (verb, api_resource(path), status)
    children = _api_children.get(key)
    if children is None:
        code = str(status) if status else "<error>"
        failed = API_REQUEST_ERRORS.labels(verb, key[1]) if not status or status >= 400 else None
        children = _api_children[key] = (API_REQUESTS.labels(verb, key[1], code), failed)
    children[0].inc()
    if children[1] is not None:
        children[1].inc()


# --- runtime operations (agent/pods.py wraps each backend it creates) ----------------------------


def instrument_backend(backend: Any) -> Any:
    """Time the backend's lifecycle operations and count their failures (on this instance only)."""
    for operation in TIMED_OPERATIONS:
        method = getattr(backend, operation, None)
        if method is not None:
            setattr(backend, operation, _timed(method, backend.name, operation))
    return backend


def _timed(method: Callable[..., Awaitable[Any]], backend: str, operation: str) -> Callable[..., Awaitable[Any]]:
    duration = RUNTIME_OPERATION_DURATION.labels(backend, operation)
    errors = RUNTIME_OPERATION_ERRORS.labels(backend, operation)

    @wraps(method)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await method(*args, **kwargs)
        except Exception:
            errors.inc()
            raise
        finally:
            duration.observe(time.perf_counter() - start)

    return timed


# --- Pod start latency (agent/pod_worker.py) ---------------------------------------------------

_start_children: dict[str, Any] = {}


def pod_container_started(handler: str, pod: dict[str, Any], rec: Any) -> None:
    """A container started for the first time: if that made the Pod Running, observe how long
    it took since the Pod was created. `rec` is the worker's PodRecord."""
    if rec.compute_phase() != "Running":
        return
    created = (pod.get("metadata") or {}).get("creationTimestamp")
    if not created:
        return
    seconds = time.time() - datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
    child = _start_children.get(handler)
    if child is None:
        child = _start_children[handler] = POD_START_DURATION.labels(handler)
    child.observe(max(0.0, seconds))


# --- read at scrape time --------------------------------------------------------------------------


class AgentStateCollector(Collector):
    """Pods by phase and handler, and counters the agent keeps anyway, from the running controller."""

    def __init__(self) -> None:
        self.controller: Any = None  # agent.pods.PodController

    def describe(self) -> list[Metric]:
        return []  # computed at scrape: nothing to check for name clashes up front

    def collect(self) -> Iterator[Metric]:
        controller = self.controller
        if controller is None:
            return
        pods = GaugeMetricFamily(
            "kubelet_emu_pods", "Pods on this node by phase and runtime handler", labels=["phase", "handler"]
        )
        counts: dict[tuple[str, str], int] = {}
        for worker in list(controller.workers.values()):
            override = getattr(worker, "_override", None)  # a rejected Pod's fixed status
            phase = override.get("phase", "Failed") if override else worker.rec.compute_phase()
            key = (phase, worker.handler_name)
            counts[key] = counts.get(key, 0) + 1
        for (phase, handler), count in sorted(counts.items()):
            pods.add_metric([phase, handler], count)
        yield pods

        restarts = CounterMetricFamily(
            "kubelet_emu_watch_restarts", "Watches that ended with an error and were restarted", labels=["resource"]
        )
        relists = CounterMetricFamily(
            "kubelet_emu_watch_relists", "Full lists of a watched resource, the first included", labels=["resource"]
        )
        for informer in (controller.pods, controller.runtime_classes):
            restarts.add_metric([informer.name], informer.watch_restarts)
            relists.add_metric([informer.name], informer.relists)
        yield restarts
        yield relists

        lease = getattr(controller.node, "lease", None)
        failures = CounterMetricFamily("kubelet_emu_lease_renew_failures", "Node Lease renewals that failed")
        failures.add_metric([], lease.failures if lease is not None else 0)
        yield failures
        writes = CounterMetricFamily("kubelet_emu_pod_status_writes", "Pod status patches written")
        writes.add_metric([], controller.status_writes)
        yield writes


AGENT_STATE = AgentStateCollector()
REGISTRY.register(AGENT_STATE)


def bind_controller(controller: Any) -> None:
    """Point the scrape-time metrics at the running agent's Pod controller."""
    AGENT_STATE.controller = controller
