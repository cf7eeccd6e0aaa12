"""Build the Node object and its status, as the kubelet reports them (pure functions)."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent import __version__
from agent.config import AgentConfig
from agent.hostinfo import HostInfo

HANDLER_LABEL_PREFIX = "runtime.kubelet-emu.io/"
KUBELET_VERSION = f"kubelet-emu/{__version__}"


@dataclass(frozen=True)
class NodeFacts:
    """Everything the Node's status is computed from, apart from the clock."""

    name: str
    host: HostInfo
    config: AgentConfig
    internal_ip: str
    kubelet_port: int


def rfc3339(t: datetime) -> str:
    return _rfc3339_second(math.floor(t.timestamp()))


@functools.lru_cache(maxsize=512)
def _rfc3339_second(seconds: int) -> str:
    """Every status write formats the same few seconds again (each condition's transition, each
    container's start): strftime was 5 % of an emulated Pod's CPU before this cache."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_labels(facts: NodeFacts) -> dict[str, str]:
    labels = {
        "kubernetes.io/hostname": facts.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": facts.host.arch,
        "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": facts.host.arch,
    }
    if facts.config.node.handler_labels:
        for name in facts.config.handlers:
            labels[HANDLER_LABEL_PREFIX + name] = "true"
    labels.update(facts.config.node.labels)
    return labels


def node_taints(facts: NodeFacts) -> list[dict[str, str]]:
    return [
        {"key": t.key, "value": t.value, "effect": t.effect} if t.value else {"key": t.key, "effect": t.effect}
        for t in facts.config.node.taints
    ]


def capacity(facts: NodeFacts) -> dict[str, str]:
    return {
        "cpu": str(facts.host.cpus),
        "memory": f"{facts.host.memory_bytes // 1024}Ki",
        "ephemeral-storage": f"{facts.host.ephemeral_storage_bytes // 1024}Ki",
        "pods": str(facts.config.node.max_pods),
    }


def allocatable(facts: NodeFacts) -> dict[str, str]:
    node = facts.config.node
    cpu_milli = max(0, facts.host.cpus * 1000 - node.reserved_cpu_millis)
    memory = max(0, facts.host.memory_bytes - node.reserved_memory_bytes)
    alloc = capacity(facts)
    alloc["cpu"] = f"{cpu_milli // 1000}" if cpu_milli % 1000 == 0 else f"{cpu_milli}m"
    alloc["memory"] = f"{memory // 1024}Ki"
    return alloc


def reservation_warnings(facts: NodeFacts) -> list[str]:
    """[node.reserved] beyond what the host has: allocatable is 0, so no Pod with requests fits."""
    node, host = facts.config.node, facts.host
    out = []
    if node.reserved_cpu_millis > host.cpus * 1000:
        out.append(
            f"[node.reserved] cpu ({node.reserved_cpu_millis}m) is more than the node's capacity "
            f"({host.cpus * 1000}m, {host.cpus} cpus): allocatable cpu is 0, so no Pod that requests cpu fits"
        )
    if node.reserved_memory_bytes > host.memory_bytes:
        out.append(
            f"[node.reserved] memory ({node.reserved_memory_bytes // 1024}Ki) is more than the node's capacity "
            f"({host.memory_bytes // 1024}Ki): allocatable memory is 0, so no Pod that requests memory fits"
        )
    return out


def runtime_handlers(config: AgentConfig) -> list[dict[str, Any]]:
    """status.runtimeHandlers: every configured handler; "" stands for the default."""

    def entry(name: str, handler: Any) -> dict[str, Any]:
        return {
            "name": name,
            "features": {
                "recursiveReadOnlyMounts": handler.recursive_read_only_mounts,
                "userNamespaces": handler.user_namespaces,
            },
        }

    out = []
    if config.default_runtime and config.default_runtime in config.handlers:
        out.append(entry("", config.handlers[config.default_runtime]))
    out.extend(entry(name, h) for name, h in sorted(config.handlers.items()))
    return out


_CONDITIONS = (
    # type, status when healthy, reason, message
    ("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
    ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
    ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
    ("Ready", "True", "KubeletReady", "kubelet-emu is posting ready status"),
)
# Ready=False on purpose (`kubelet-emu fleet ctl NODE not-ready`), for failure-handling tests.
_NOT_READY = ("Ready", "False", "KubeletNotReady", "made NotReady on purpose by kubelet-emu fleet ctl")


def conditions(now: datetime, previous: Sequence[Mapping[str, Any]] = (), ready: bool = True) -> list[dict[str, str]]:
    """Healthy conditions; a transition time is kept when the status did not change."""
    before = {c.get("type"): c for c in previous}
    stamp = rfc3339(now)
    out = []
    for ctype, status, reason, message in _CONDITIONS if ready else (*_CONDITIONS[:-1], _NOT_READY):
        old = before.get(ctype)
        transition = old.get("lastTransitionTime") if old and old.get("status") == status else None
        out.append(
            {
                "type": ctype,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": transition or stamp,
            }
        )
    return out


def node_status(
    facts: NodeFacts, now: datetime, previous_conditions: Sequence[Mapping[str, Any]] = (), ready: bool = True
) -> dict[str, Any]:
    host = facts.host
    return {
        "capacity": capacity(facts),
        "allocatable": allocatable(facts),
        "conditions": conditions(now, previous_conditions, ready),
        "addresses": [
            {"type": "InternalIP", "address": facts.internal_ip},
            {"type": "Hostname", "address": host.hostname},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": facts.kubelet_port}},
        "nodeInfo": {
            "machineID": host.machine_id,
            "systemUUID": host.system_uuid,
            "bootID": host.boot_id,
            "kernelVersion": host.kernel,
            "osImage": host.os_image,
            "containerRuntimeVersion": f"kubelet-emu://{__version__}",
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": host.arch,
            # NodeSwap (GA in 1.34): the node's swap size; the API server rejects a capacity of 0
            # ("must be greater than zero"), so a node without swap leaves the field out.
            **({"swap": {"capacity": host.swap_bytes}} if host.swap_bytes > 0 else {}),
        },
        "runtimeHandlers": runtime_handlers(facts.config),
    }


def node_object(facts: NodeFacts, now: datetime) -> dict[str, Any]:
    """The Node as first created: labels and taints can only be set here under NodeRestriction."""
    spec: dict[str, Any] = {}
    taints = node_taints(facts)
    if taints:
        spec["taints"] = taints
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": facts.name,
            "labels": node_labels(facts),
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": spec,
        "status": node_status(facts, now),
    }


def status_fingerprint(status: Mapping[str, Any]) -> Any:
    """What counts as a change worth posting: everything except heartbeat times. The rest of the
    status is kept as a hash of its text, not the text (a fleet keeps one per node)."""
    conds = tuple((c["type"], c["status"], c["reason"], c.get("lastTransitionTime")) for c in status["conditions"])
    rest = {k: v for k, v in status.items() if k != "conditions"}
    return (conds, hash(repr(sorted(rest.items()))))


def slim_node(node: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a Node the agent reads again: identity, labels and annotations, the spec
    (taints, unschedulable, podCIDR) and the conditions."""
    meta = node.get("metadata") or {}
    return {
        "metadata": {k: meta[k] for k in SLIM_NODE_METADATA if k in meta},
        "spec": node.get("spec") or {},
        "status": {"conditions": (node.get("status") or {}).get("conditions") or []},
    }


SLIM_NODE_METADATA = ("name", "uid", "resourceVersion", "creationTimestamp", "labels", "annotations")
