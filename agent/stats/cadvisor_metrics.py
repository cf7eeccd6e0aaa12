"""/metrics/cadvisor: the kubelet's cAdvisor endpoint in the Prometheus text format (0.0.4).

Family names, types and labels are the ones the kubelet serves there (cAdvisor's collector with the
kubelet's label function), so stock scrape jobs and dashboards work: every container series has
`container`, `id` (the cgroup), `image`, `name` (the runtime's container ID), `namespace` and `pod`;
the Pod's own cgroup has them empty but for id/namespace/pod, the node's root cgroup has only
`id="/"`. Network counters are on the Pod's cgroup (its sandbox) and on the root, with `interface`.
Filesystem families are given for the node's filesystem (the agent's state dir), the one usage the
agent knows as cAdvisor would; a container's writable layer is not measured, so it has none.

Only cgroups are reported: emulated containers run nothing and have no cgroup, so they appear in
/metrics/resource (their annotated usage) but not here, as a cAdvisor would not see them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from agent.stats.host import FsUsage, read_text
from agent.stats.model import Network, Snapshot, Usage
from agent.stats.resource_metrics import CONTENT_TYPE, NANOS, go_float

__all__ = ["CONTENT_TYPE", "MachineInfo", "machine_info", "render"]

CONTAINER_LABELS = ("container", "id", "image", "name", "namespace", "pod")
NO_CONTAINER_LABELS = frozenset({"container_scrape_error", "machine_cpu_cores", "machine_memory_bytes"})

# name -> (type, help, extra label names after the container labels)
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "container_cpu_usage_seconds_total": ("counter", "Cumulative cpu time consumed in seconds.", ("cpu",)),
    "container_memory_usage_bytes": (
        "gauge",
        "Current memory usage in bytes, including all memory regardless of when it was accessed",
        (),
    ),
    "container_memory_working_set_bytes": ("gauge", "Current working set in bytes.", ()),
    "container_memory_rss": ("gauge", "Size of RSS in bytes.", ()),
    "container_memory_failures_total": (
        "counter",
        "Cumulative count of memory allocation failures.",
        ("failure_type", "scope"),
    ),
    "container_spec_memory_limit_bytes": ("gauge", "Memory limit for the container.", ()),
    "container_start_time_seconds": ("gauge", "Start time of the container since unix epoch in seconds.", ()),
    "container_last_seen": ("gauge", "Last time a container was seen by the exporter", ()),
    "container_network_receive_bytes_total": ("counter", "Cumulative count of bytes received", ("interface",)),
    "container_network_receive_errors_total": (
        "counter",
        "Cumulative count of errors encountered while receiving",
        ("interface",),
    ),
    "container_network_transmit_bytes_total": ("counter", "Cumulative count of bytes transmitted", ("interface",)),
    "container_network_transmit_errors_total": (
        "counter",
        "Cumulative count of errors encountered while transmitting",
        ("interface",),
    ),
    "container_fs_usage_bytes": (
        "gauge",
        "Number of bytes that are consumed by the container on this filesystem.",
        ("device",),
    ),
    "container_fs_limit_bytes": (
        "gauge",
        "Number of bytes that can be consumed by the container on this filesystem.",
        ("device",),
    ),
    "container_fs_inodes_total": ("gauge", "Number of Inodes", ("device",)),
    "container_fs_inodes_free": ("gauge", "Number of available Inodes", ("device",)),
    "container_scrape_error": ("gauge", "1 if there was an error while getting container metrics, 0 otherwise", ()),
    "machine_cpu_cores": ("gauge", "Number of logical CPU cores.", ("boot_id", "machine_id", "system_uuid")),
    "machine_memory_bytes": (
        "gauge",
        "Amount of memory installed on the machine.",
        ("boot_id", "machine_id", "system_uuid"),
    ),
}


@dataclass(frozen=True, slots=True)
class MachineInfo:
    """What cAdvisor's machine families report; read once, it does not change while the agent runs."""

    cpu_cores: int
    memory_bytes: int
    boot_id: str
    machine_id: str
    system_uuid: str
    fs_device: str  # the device of the node filesystem (the agent's state dir), e.g. "/dev/vda1"


def _first_line(path: str) -> str:
    try:
        return read_text(path).strip()
    except OSError:
        return ""


def fs_device(path: str, mountinfo: str = "/proc/self/mountinfo") -> str:
    """The mount source of the filesystem holding `path` ("/dev/vda1", "overlay"), as cAdvisor
    names a filesystem's device; "" when it cannot be found."""
    try:
        st = os.stat(path)
        text = read_text(mountinfo)
    except OSError:
        return ""
    want = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    found = ""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10 or fields[2] != want or " - " not in line:
            continue
        after = line.split(" - ", 1)[1].split()
        if len(after) >= 2:
            found = after[1]  # the last matching mount wins, as the one on top
    return found


def machine_info(state_dir: str, meminfo: str = "/proc/meminfo") -> MachineInfo:
    memory = 0
    try:
        for line in read_text(meminfo).splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    return MachineInfo(
        cpu_cores=os.cpu_count() or 0,
        memory_bytes=memory,
        boot_id=_first_line("/proc/sys/kernel/random/boot_id"),
        machine_id=_first_line("/etc/machine-id"),
        system_uuid=_first_line("/sys/class/dmi/id/product_uuid"),  # readable by root only
        fs_device=fs_device(state_dir),
    )


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


Line = tuple[tuple[str, ...], str]


class _Out:
    def __init__(self) -> None:
        self.lines: dict[str, list[Line]] = {name: [] for name in FAMILIES}

    def add(self, family: str, labels: tuple[str, ...], value: float, at: float | None) -> None:
        extra = FAMILIES[family][2]
        names = extra if family in NO_CONTAINER_LABELS else CONTAINER_LABELS + extra
        pairs = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, labels, strict=True))
        stamp = f" {int(at * 1000)}" if at is not None else ""
        text = f"{family}{{{pairs}}} {go_float(value)}{stamp}\n" if pairs else f"{family} {go_float(value)}{stamp}\n"
        self.lines[family].append((labels, text))

    def usage(self, key: tuple[str, ...], u: Usage) -> None:
        c, at = u.counters, u.time
        self.add("container_cpu_usage_seconds_total", (*key, "total"), c.cpu_usage_ns / NANOS, at)
        self.add("container_memory_usage_bytes", key, float(c.memory_usage_bytes), at)
        self.add("container_memory_working_set_bytes", key, float(c.working_set_bytes), at)
        self.add("container_memory_rss", key, float(c.rss_bytes), at)
        # The counters read are the cgroup's and its children's (v1 total_pgfault; v2 is hierarchical).
        self.add("container_memory_failures_total", (*key, "pgfault", "hierarchy"), float(c.page_faults), at)
        self.add("container_memory_failures_total", (*key, "pgmajfault", "hierarchy"), float(c.major_page_faults), at)
        self.add("container_spec_memory_limit_bytes", key, float(c.memory_limit_bytes or 0), None)
        self.add("container_last_seen", key, float(int(at)), None)

    def network(self, key: tuple[str, ...], n: Network) -> None:
        for i in n.interfaces:
            labels = (*key, i.name)
            self.add("container_network_receive_bytes_total", labels, float(i.rx_bytes), n.time)
            self.add("container_network_receive_errors_total", labels, float(i.rx_errors), n.time)
            self.add("container_network_transmit_bytes_total", labels, float(i.tx_bytes), n.time)
            self.add("container_network_transmit_errors_total", labels, float(i.tx_errors), n.time)

    def fs(self, key: tuple[str, ...], device: str, f: FsUsage, at: float) -> None:
        labels = (*key, device)
        self.add("container_fs_usage_bytes", labels, float(f.used_bytes), at)
        self.add("container_fs_limit_bytes", labels, float(f.capacity_bytes), at)
        self.add("container_fs_inodes_total", labels, float(f.inodes), at)
        self.add("container_fs_inodes_free", labels, float(f.inodes_free), at)


def _cgroup_id(relative: str) -> str:
    return "/" + relative.strip("/")


def render(snapshot: Snapshot | None, machine: MachineInfo) -> str:
    """The exposition text; `None` stands for a failed sampling (container_scrape_error 1)."""
    out = _Out()
    out.add("container_scrape_error", (), 1.0 if snapshot is None else 0.0, None)
    ids = (machine.boot_id, machine.machine_id, machine.system_uuid)
    out.add("machine_cpu_cores", ids, float(machine.cpu_cores), None)
    out.add("machine_memory_bytes", ids, float(machine.memory_bytes), None)
    if snapshot is not None:
        node = snapshot.node
        root = ("", "/", "", "", "", "")
        if node.usage is not None:
            out.usage(root, node.usage)
            out.add("container_start_time_seconds", root, node.start_time, None)
        if node.network is not None:
            out.network(root, node.network)
        if node.fs is not None and machine.fs_device:
            out.fs(root, machine.fs_device, node.fs.usage, node.fs.time)
        if node.pods_cgroup is not None and node.pods_cgroup_path:
            key = ("", _cgroup_id(node.pods_cgroup_path), "", "", "", "")
            out.usage(key, node.pods_cgroup)
            out.add("container_start_time_seconds", key, node.pods_cgroup_start, None)
        for pod in snapshot.pods:
            if pod.cgroup is None:
                continue  # not measured: no cgroup a cAdvisor could see
            key = ("", _cgroup_id(pod.cgroup), "", "", pod.namespace, pod.name)
            if pod.usage is not None:
                out.usage(key, pod.usage)
                out.add("container_start_time_seconds", key, pod.start_time, None)
            if pod.network is not None:
                out.network(key, pod.network)
            for c in pod.containers:
                if c.cgroup is None or c.usage is None:
                    continue
                ckey = (c.name, _cgroup_id(c.cgroup), c.image, c.container_id, pod.namespace, pod.name)
                out.usage(ckey, c.usage)
                out.add("container_start_time_seconds", ckey, c.start_time, None)
    parts = []
    for name, lines in sorted(out.lines.items()):
        if not lines:
            continue
        kind, help_text, _ = FAMILIES[name]
        parts.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
        lines.sort(key=lambda line: line[0])
        parts.extend(line for _, line in lines)
    return "".join(parts)
