"""The [node] table: labels, taints, limits, reservations, cgroups and container logs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.config.tables import _kind, _q, _Table
from cgroups.quantity import cpu_millis, memory_bytes

TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


_NODE_KEYS = {
    "labels",
    "taints",
    "max_pods",
    "handler_labels",
    "pod_pids_limit",
    "reserved",
    "cgroup_root",
    "cgroup_driver",
    "container_log_max_size",
    "container_log_max_files",
}


CGROUP_DRIVERS = ("cgroupfs", "systemd")


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str


@dataclass(frozen=True)
class NodeSettings:
    labels: Mapping[str, str] = field(hash=False)
    taints: tuple[Taint, ...]
    max_pods: int = 110
    handler_labels: bool = True
    pod_pids_limit: int = -1
    reserved_cpu_millis: int = 0
    reserved_memory_bytes: int = 0
    cgroup_root: str = "kubepods"  # the Pod cgroups' parent in every hierarchy
    cgroup_driver: str = "cgroupfs"  # "systemd": the kubelet's systemd slice naming
    container_log_max_size: int = 10 * 1024 * 1024
    container_log_max_files: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", dict(self.labels))
        object.__setattr__(self, "taints", tuple(self.taints))


def _parse_node(t: _Table, warnings: list[str]) -> NodeSettings:
    t.warn_unknown(_NODE_KEYS, warnings)
    labels = t.table("labels")
    for key, value in labels.data.items():
        if not isinstance(value, str):
            raise labels.error(f"label {_q(key)} must be a string, not {_kind(value)}; quote it")
    taints = tuple(_parse_taint(t, i, item, warnings) for i, item in enumerate(t.list_("taints")))
    max_pods = t.int_("max_pods", 110)
    if max_pods <= 0:
        raise t.error(f"max_pods must be a positive integer, not {max_pods}")
    pids = t.int_("pod_pids_limit", -1)
    if pids == 0 or pids < -1:
        raise t.error(f"pod_pids_limit must be -1 (unlimited) or a positive integer, not {pids}")
    reserved = t.table("reserved")
    reserved.warn_unknown({"cpu", "memory"}, warnings)
    cgroup_root = t.str_("cgroup_root", "kubepods")
    if not cgroup_root or cgroup_root.startswith("/") or ".." in cgroup_root.split("/"):
        raise t.error(f'cgroup_root must be a relative path such as "kubepods", not {_q(cgroup_root)}')
    driver = t.str_("cgroup_driver", "cgroupfs")
    if driver not in CGROUP_DRIVERS:
        raise t.error(f'cgroup_driver must be "cgroupfs" or "systemd", not {_q(driver)}')
    log_files = t.int_("container_log_max_files", 5)
    if log_files < 2:
        raise t.error(f"container_log_max_files must be at least 2, not {log_files}")
    raw_size = t.data.get("container_log_max_size", "10Mi")
    try:
        log_size = memory_bytes(raw_size)
    except (ValueError, TypeError, ArithmeticError):
        raise t.error(f'container_log_max_size {_q(str(raw_size))} is not a size such as "10Mi"') from None
    if log_size <= 0:  # would turn rotation off: the log of a chatty container would fill the disk
        raise t.error(f'container_log_max_size {_q(str(raw_size))} must be a positive size such as "10Mi"')
    return NodeSettings(
        cgroup_root=cgroup_root,
        cgroup_driver=driver,
        container_log_max_size=log_size,
        container_log_max_files=log_files,
        labels=labels.data,
        taints=taints,
        max_pods=max_pods,
        handler_labels=t.bool_("handler_labels", True),
        pod_pids_limit=pids,
        reserved_cpu_millis=_reserved(reserved, "cpu", cpu_millis, '"100m" or "0.5"'),
        reserved_memory_bytes=_reserved(reserved, "memory", memory_bytes, '"256Mi" or "1G"'),
    )


def _parse_taint(node: _Table, index: int, item: Any, warnings: list[str]) -> Taint:
    t = _Table(item, node.file, f"node.taints[{index}]")
    if not isinstance(item, dict):
        raise t.error(f"a taint must be a table like {{ key = ..., effect = ... }}, not {_kind(item)}")
    t.warn_unknown({"key", "value", "effect"}, warnings)
    key, effect = t.str_("key"), t.str_("effect")
    if not key:
        raise t.error('taint key is missing; set key, e.g. key = "example.com/dedicated"')
    if effect not in TAINT_EFFECTS:
        got = f"is {_q(effect)}" if effect is not None else "is missing"
        raise t.error(f"taint effect {got}; use one of: {', '.join(TAINT_EFFECTS)}")
    return Taint(key=key, value=t.str_("value", "") or "", effect=effect)


def _reserved(t: _Table, key: str, convert: Any, example: str) -> int:
    if key not in t.data:
        return 0
    value = t.data[key]
    try:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError
        amount = convert(value)
    except ValueError:
        raise t.error(f"{key} = {_q(str(value))} is not a Kubernetes quantity; use e.g. {example}") from None
    if amount < 0:
        raise t.error(f"{key} = {_q(str(value))} is negative; reserve zero or more")
    return amount
