"""The order of cgroup writes for an in-place resize, as the kubelet does it
(kuberuntime doPodResizeAction): per resource, an increase goes to the Pod cgroup first, then
the containers; a decrease to the containers first, then the Pod cgroup. A memory limit is never
set below what the cgroup already uses.

resize_steps() returns the writes as (cgroup, ResourceConfig) in order; plan_resize() makes
them for a Pod, checking memory usage first. The caller (a backend) writes them: the process
backend into the files, the oci backend the containers' through `runc update`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from cgroups.detect import CgroupError
from cgroups.manager import CgroupManager
from cgroups.resources import ResourceConfig, container_resource_config, pod_resource_config

POD = ""  # the Pod cgroup's key in the steps; containers are keyed by name


def _unbounded(value: int | None) -> float:
    return float("inf") if value is None else value


def _grows(before: ResourceConfig, after: ResourceConfig, resource: str) -> bool:
    if resource == "cpu":
        return _unbounded(after.cpu_quota) >= _unbounded(before.cpu_quota) and (after.cpu_shares or 0) >= (
            before.cpu_shares or 0
        )
    return _unbounded(after.memory_limit) >= _unbounded(before.memory_limit)


def _mix(before: ResourceConfig, after: ResourceConfig, take_cpu: bool, take_memory: bool) -> ResourceConfig:
    config = before
    if take_cpu:
        config = replace(config, cpu_shares=after.cpu_shares, cpu_quota=after.cpu_quota, cpu_period=after.cpu_period)
    if take_memory:
        config = replace(config, memory_limit=after.memory_limit)
    return config


def resize_steps(
    pod_before: ResourceConfig,
    pod_after: ResourceConfig,
    containers_after: Mapping[str, ResourceConfig],
) -> list[tuple[str, ResourceConfig]]:
    """Pod cgroup with the growing resources, then each container, then the Pod cgroup in full.

    Growing resources reach the Pod before its containers, shrinking ones reach the containers
    before the Pod: both orders in one sequence, as no write ever leaves a child above its parent.
    """
    grow_cpu, grow_memory = _grows(pod_before, pod_after, "cpu"), _grows(pod_before, pod_after, "memory")
    steps: list[tuple[str, ResourceConfig]] = []
    if grow_cpu or grow_memory:
        steps.append((POD, _mix(pod_before, pod_after, grow_cpu, grow_memory)))
    steps += list(containers_after.items())
    steps.append((POD, pod_after))
    return steps


def memory_below_usage(limit: int | None, usage: int) -> bool:
    """A new memory limit the cgroup already exceeds (the kubelet refuses to write it)."""
    return limit is not None and limit < usage


class MemoryBelowUsageError(Exception):
    """A memory decrease the cgroups cannot take yet; the message is the kubelet's."""


def plan_resize(
    manager: CgroupManager,
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    containers: Iterable[str],
    pod_pids_limit: int = -1,
) -> list[tuple[str, ResourceConfig]]:
    """The writes of a resize from Pod `before` to Pod `after` (each with its resources in the
    spec), for the running `containers`, in the kubelet's order. Only containers whose values
    change are written. Raises MemoryBelowUsageError, naming every cgroup whose usage is above
    its new limit (the kubelet checks the Pod and each container, and writes none of them)."""
    specs = {c["name"]: c for c in after["spec"].get("containers") or []}
    old_specs = {c["name"]: c for c in before["spec"].get("containers") or []}
    pod_before, pod_after = pod_resource_config(before, pod_pids_limit), pod_resource_config(after, pod_pids_limit)
    errors = _below_usage(manager, manager.pod_path(after), "pod", pod_before.memory_limit, pod_after.memory_limit)
    targets: dict[str, ResourceConfig] = {}
    for name in containers:
        new = container_resource_config(specs[name], pod=after)
        old = container_resource_config(old_specs.get(name, specs[name]), pod=before)
        if new == old:
            continue
        rel = manager.container_path(after, name)
        errors += _below_usage(manager, rel, f'container "{name}"', old.memory_limit, new.memory_limit)
        targets[name] = new
    if errors:
        listed = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
        raise MemoryBelowUsageError(f"cannot decrease memory limits: {listed}")
    return resize_steps(pod_before, pod_after, targets)


def _below_usage(manager: CgroupManager, rel: str, what: str, old: int | None, new: int | None) -> list[str]:
    if new is None or (old is not None and new >= old):
        return []  # not a decrease
    try:
        usage = manager.usage(rel)["memory_usage_bytes"]
    except (CgroupError, OSError, KeyError):
        return []
    if memory_below_usage(new, usage):
        return [f"attempting to set {what} memory limit ({new}) below current usage ({usage})"]
    return []
