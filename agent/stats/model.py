"""One sampling round of the node and its Pods: what /stats/summary and /metrics/resource render.

Times are float seconds since the epoch; the renderers format them (RFC 3339 seconds in the
Summary, milliseconds in the Prometheus text).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.stats.host import FsUsage, InterfaceCounters
from cgroups.stats import CgroupUsage


@dataclass(frozen=True, slots=True)
class Usage:
    """CPU and memory of one cgroup (or of an emulated container's annotations) at `time`."""

    time: float
    counters: CgroupUsage
    nanocores: int | None  # None until a second sample gives a rate

    @property
    def available_bytes(self) -> int | None:
        limit = self.counters.memory_limit_bytes
        return None if limit is None else max(0, limit - self.counters.working_set_bytes)


@dataclass(frozen=True, slots=True)
class Network:
    time: float
    interfaces: list[InterfaceCounters]
    default: str | None  # the interface reported inline (the kubelet's "eth0")


@dataclass(frozen=True, slots=True)
class Fs:
    """A filesystem's size, with used bytes/inodes meaning what the field reports (logs, volumes or the fs)."""

    time: float
    usage: FsUsage


@dataclass(slots=True)
class ContainerSnapshot:
    name: str
    start_time: float
    usage: Usage | None = None
    logs: Fs | None = None
    # For /metrics/cadvisor's labels: the runtime's container ID, the image, the cgroup read.
    container_id: str = ""
    image: str = ""
    cgroup: str | None = None


@dataclass(slots=True)
class PodSnapshot:
    name: str
    namespace: str
    uid: str
    start_time: float
    containers: list[ContainerSnapshot] = field(default_factory=list)
    usage: Usage | None = None
    network: Network | None = None
    ephemeral_storage: Fs | None = None
    cgroup: str | None = None  # relative to the hierarchies; None: not measured (emulated)


@dataclass(frozen=True, slots=True)
class Rlimit:
    time: float
    max_pid: int | None
    processes: int | None


@dataclass(slots=True)
class NodeSnapshot:
    name: str
    start_time: float
    usage: Usage | None = None
    network: Network | None = None
    fs: Fs | None = None
    image_fs: Fs | None = None
    rlimit: Rlimit | None = None
    pods_cgroup: Usage | None = None  # systemContainers "pods": every Pod's cgroup together
    pods_cgroup_start: float = 0.0
    pods_cgroup_path: str | None = None


@dataclass(slots=True)
class Snapshot:
    taken: float
    node: NodeSnapshot
    pods: list[PodSnapshot]
