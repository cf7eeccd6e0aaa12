"""The Summary API document (k8s.io/kubelet/pkg/apis/stats/v1alpha1) from a Snapshot.

Fields without a value are left out, as the kubelet's omitempty pointers are; `time` fields are
metav1.Time, which the API writes as RFC 3339 with whole seconds.
"""

from __future__ import annotations

import time
from typing import Any

from agent.stats.model import ContainerSnapshot, Fs, Network, NodeSnapshot, PodSnapshot, Snapshot, Usage

JSON = dict[str, Any]


_formatted: dict[int, str] = {}  # most times of one sampling fall in the same second or two


def rfc3339(t: float) -> str:
    second = int(t)
    text = _formatted.get(second)
    if text is None:
        if len(_formatted) > 1024:
            _formatted.clear()
        text = _formatted[second] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
    return text


def cpu_json(usage: Usage) -> JSON:
    out: JSON = {"time": rfc3339(usage.time)}
    if usage.nanocores is not None:
        out["usageNanoCores"] = usage.nanocores
    out["usageCoreNanoSeconds"] = usage.counters.cpu_usage_ns
    return out


def memory_json(usage: Usage) -> JSON:
    c = usage.counters
    out: JSON = {"time": rfc3339(usage.time)}
    available = usage.available_bytes
    if available is not None:
        out["availableBytes"] = available
    out.update(
        usageBytes=c.memory_usage_bytes,
        workingSetBytes=c.working_set_bytes,
        rssBytes=c.rss_bytes,
        pageFaults=c.page_faults,
        majorPageFaults=c.major_page_faults,
    )
    return out


def fs_json(fs: Fs) -> JSON:
    u = fs.usage
    return {
        "time": rfc3339(fs.time),
        "availableBytes": u.available_bytes,
        "capacityBytes": u.capacity_bytes,
        "usedBytes": u.used_bytes,
        "inodesFree": u.inodes_free,
        "inodes": u.inodes,
        "inodesUsed": u.inodes_used,
    }


def network_json(net: Network) -> JSON:
    interfaces = [
        {"name": i.name, "rxBytes": i.rx_bytes, "rxErrors": i.rx_errors, "txBytes": i.tx_bytes, "txErrors": i.tx_errors}
        for i in net.interfaces
    ]
    out: JSON = {"time": rfc3339(net.time)}
    for entry in interfaces:  # the default interface's counters sit inline, as in the kubelet
        if entry["name"] == net.default:
            out.update(entry)
    if interfaces:
        out["interfaces"] = interfaces
    return out


def _usage_fields(out: JSON, usage: Usage | None) -> None:
    if usage is not None:
        out["cpu"] = cpu_json(usage)
        out["memory"] = memory_json(usage)


def container_json(c: ContainerSnapshot, only_cpu_and_memory: bool) -> JSON:
    out: JSON = {"name": c.name, "startTime": rfc3339(c.start_time)}
    _usage_fields(out, c.usage)
    if c.logs is not None and not only_cpu_and_memory:
        out["logs"] = fs_json(c.logs)
    return out


def pod_json(p: PodSnapshot, only_cpu_and_memory: bool) -> JSON:
    out: JSON = {
        "podRef": {"name": p.name, "namespace": p.namespace, "uid": p.uid},
        "startTime": rfc3339(p.start_time),
        "containers": [container_json(c, only_cpu_and_memory) for c in p.containers],
    }
    _usage_fields(out, p.usage)
    if only_cpu_and_memory:
        return out
    if p.network is not None:
        out["network"] = network_json(p.network)
    if p.ephemeral_storage is not None:
        out["ephemeral-storage"] = fs_json(p.ephemeral_storage)
    return out


def node_json(n: NodeSnapshot, only_cpu_and_memory: bool) -> JSON:
    out: JSON = {"nodeName": n.name, "startTime": rfc3339(n.start_time)}
    _usage_fields(out, n.usage)
    if only_cpu_and_memory:
        return out
    if n.pods_cgroup is not None:
        pods: JSON = {"name": "pods", "startTime": rfc3339(n.pods_cgroup_start)}
        _usage_fields(pods, n.pods_cgroup)
        out["systemContainers"] = [pods]
    if n.network is not None:
        out["network"] = network_json(n.network)
    if n.fs is not None:
        out["fs"] = fs_json(n.fs)
    if n.image_fs is not None:
        # One filesystem holds images and containers' writable layers here, as when the kubelet's are not split.
        out["runtime"] = {"imageFs": fs_json(n.image_fs), "containerFs": fs_json(n.image_fs)}
    if n.rlimit is not None:
        rlimit: JSON = {"time": rfc3339(n.rlimit.time)}
        if n.rlimit.max_pid is not None:
            rlimit["maxpid"] = n.rlimit.max_pid
        if n.rlimit.processes is not None:
            rlimit["curproc"] = n.rlimit.processes
        out["rlimit"] = rlimit
    return out


def summary_json(snapshot: Snapshot, only_cpu_and_memory: bool = False) -> JSON:
    return {
        "node": node_json(snapshot.node, only_cpu_and_memory),
        "pods": [pod_json(p, only_cpu_and_memory) for p in snapshot.pods],
    }
