"""Usage an emulated container reports, played from annotations like its exits are:

    emulated.kubelet-emu.io/cpu-usage: "250m"              each app container uses a quarter core
    emulated.kubelet-emu.io/memory-usage: "64Mi"           ... and 64 MiB (working set = usage = RSS)
    emulated.kubelet-emu.io/cpu-usage.<container>          per-container overrides
    emulated.kubelet-emu.io/memory-usage.<container>

Without them an emulated container has no usage and the Summary leaves its cpu/memory out, as the
kubelet does for a container it has no stats for: so metrics-server and `kubectl top` skip it.
Cumulative CPU is the rate times the time since the container started.
"""

from __future__ import annotations

import functools
from typing import Any

from agent.stats.model import Usage
from agent.stats.rates import nanocores_from_millis
from cgroups.quantity import cpu_millis, memory_bytes
from cgroups.stats import CgroupUsage

PREFIX = "emulated.kubelet-emu.io/"
NANOS = 1_000_000_000


def planned_usage(annotations: dict[str, Any] | None, container: str) -> tuple[int, int] | None:
    """(millicores, bytes) the annotations ask of this container, or None when they ask nothing
    (or something unreadable: stats never fail a Pod)."""
    if not annotations:
        return None
    cpu = annotations.get(f"{PREFIX}cpu-usage.{container}", annotations.get(PREFIX + "cpu-usage"))
    memory = annotations.get(f"{PREFIX}memory-usage.{container}", annotations.get(PREFIX + "memory-usage"))
    if cpu is None and memory is None:
        return None
    return _parse_plan(str(cpu) if cpu is not None else None, str(memory) if memory is not None else None)


@functools.lru_cache(maxsize=256)  # thousands of Pods made from one template share a few values
def _parse_plan(cpu: str | None, memory: str | None) -> tuple[int, int] | None:
    try:
        return (cpu_millis(cpu) if cpu is not None else 0, memory_bytes(memory) if memory is not None else 0)
    except (ValueError, ArithmeticError):
        return None


def synthetic_usage(plan: tuple[int, int], started: float, now: float) -> Usage:
    millicores, memory = plan
    cpu_ns = max(0, int(millicores * (now - started) * NANOS / 1000))
    counters = CgroupUsage(
        cpu_usage_ns=cpu_ns,
        memory_usage_bytes=memory,
        working_set_bytes=memory,
        rss_bytes=memory,
        page_faults=0,
        major_page_faults=0,
        memory_limit_bytes=None,
    )
    return Usage(now, counters, nanocores_from_millis(millicores))


def add_usages(usages: list[Usage], now: float) -> Usage | None:
    """A Pod's usage as the sum of its containers' (for Pods without a cgroup of their own)."""
    if not usages:
        return None
    counters = CgroupUsage(
        cpu_usage_ns=sum(u.counters.cpu_usage_ns for u in usages),
        memory_usage_bytes=sum(u.counters.memory_usage_bytes for u in usages),
        working_set_bytes=sum(u.counters.working_set_bytes for u in usages),
        rss_bytes=sum(u.counters.rss_bytes for u in usages),
        page_faults=0,
        major_page_faults=0,
        memory_limit_bytes=None,
    )
    return Usage(now, counters, sum(u.nanocores or 0 for u in usages))
