"""The order of cgroup writes for an in-place resize, as the kubelet does it
(kuberuntime doPodResizeAction): per resource, an increase goes to the Pod cgroup first, then
the containers; a decrease to the containers first, then the Pod cgroup. A memory limit is never
set below what the cgroup already uses.

resize_steps() returns the writes as (cgroup, ResourceConfig) in order; the caller writes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from cgroups.resources import ResourceConfig

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
