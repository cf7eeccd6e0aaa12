"""Usage counters of one cgroup (CPU time and memory) on cgroup v1 or v2, read the way cadvisor reads them.

The readers are plain functions over directories, so both layouts are tested with files a test writes.

| value        | v1                                        | v2                                   |
|--------------|-------------------------------------------|--------------------------------------|
| cpu time     | cpuacct.usage (ns)                        | cpu.stat usage_usec x 1000           |
| usage        | memory.usage_in_bytes                     | memory.current                       |
| working set  | usage - memory.stat total_inactive_file   | usage - memory.stat inactive_file    |
| rss          | memory.stat total_rss                     | memory.stat anon                     |
| page faults  | memory.stat total_pgfault/total_pgmajfault | memory.stat pgfault/pgmajfault      |
| limit        | memory.limit_in_bytes                     | memory.max                           |

The v2 root cgroup has no memory.current or memory.max: its usage comes from /proc/meminfo
(MemTotal - MemFree), as runc does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from cgroups.detect import CgroupError, CgroupMode
from cgroups.manager import parse_flat_keyed, working_set

# Limits above this mean "no limit" (the kubelet's rule; v1 writes 9223372036854771712 for none).
UNLIMITED_MEMORY = 1 << 62


@dataclass(frozen=True, slots=True)
class CgroupUsage:
    cpu_usage_ns: int
    memory_usage_bytes: int
    working_set_bytes: int
    rss_bytes: int
    page_faults: int
    major_page_faults: int
    memory_limit_bytes: int | None  # None: no limit


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _limit(text: str) -> int | None:
    text = text.strip()
    if text == "max":
        return None
    value = int(text)
    return None if value >= UNLIMITED_MEMORY else value


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo in bytes ("MemTotal: 24684096 kB" -> {"MemTotal": 25276514304})."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[name] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return values


def read_v1(cpuacct_dir: str, memory_dir: str) -> CgroupUsage:
    stat = parse_flat_keyed(_read(os.path.join(memory_dir, "memory.stat")))
    usage = int(_read(os.path.join(memory_dir, "memory.usage_in_bytes")))
    return CgroupUsage(
        cpu_usage_ns=int(_read(os.path.join(cpuacct_dir, "cpuacct.usage"))),
        memory_usage_bytes=usage,
        working_set_bytes=working_set(usage, stat, "total_inactive_file"),
        rss_bytes=stat.get("total_rss", 0),
        page_faults=stat.get("total_pgfault", 0),
        major_page_faults=stat.get("total_pgmajfault", 0),
        memory_limit_bytes=_limit(_read(os.path.join(memory_dir, "memory.limit_in_bytes"))),
    )


def read_v2(directory: str, meminfo: str = "/proc/meminfo") -> CgroupUsage:
    cpu = parse_flat_keyed(_read(os.path.join(directory, "cpu.stat")))
    stat_path = os.path.join(directory, "memory.stat")
    try:
        usage = int(_read(os.path.join(directory, "memory.current")))
        limit = _limit(_read(os.path.join(directory, "memory.max")))
        stat = parse_flat_keyed(_read(stat_path))
    except FileNotFoundError:
        if not os.path.isdir(directory):
            raise
        usage, limit, stat = _v2_root_memory(stat_path, meminfo)
    return CgroupUsage(
        cpu_usage_ns=cpu.get("usage_usec", 0) * 1000,
        memory_usage_bytes=usage,
        working_set_bytes=working_set(usage, stat, "inactive_file"),
        rss_bytes=stat.get("anon", 0),
        page_faults=stat.get("pgfault", 0),
        major_page_faults=stat.get("pgmajfault", 0),
        memory_limit_bytes=limit,
    )


def _v2_root_memory(stat_path: str, meminfo: str) -> tuple[int, int | None, Mapping[str, int]]:
    info = parse_meminfo(_read(meminfo))
    try:
        stat: Mapping[str, int] = parse_flat_keyed(_read(stat_path))
    except FileNotFoundError:  # older kernels have no memory.stat at the root
        stat = {"inactive_file": info.get("Inactive(file)", 0), "anon": info.get("AnonPages", 0)}
    return info.get("MemTotal", 0) - info.get("MemFree", 0), None, stat


class CgroupUsageReader:
    """Reads a cgroup by its path relative to the hierarchies ("" is the root: the whole node)."""

    def __init__(self, mode: CgroupMode, meminfo: str = "/proc/meminfo"):
        self.mode = mode
        self.meminfo = meminfo
        if mode.version == 1 and "memory" not in mode.mounts:
            raise CgroupError("cgroup v1 without a memory hierarchy: no usage to read")

    def read(self, relative: str) -> CgroupUsage:
        """Raises OSError (FileNotFoundError when the cgroup is gone)."""
        mounts = self.mode.mounts
        if self.mode.version == 2:
            return read_v2(os.path.join(mounts["unified"], relative), self.meminfo)
        cpuacct = mounts.get("cpuacct", mounts.get("cpu", ""))
        return read_v1(os.path.join(cpuacct, relative), os.path.join(mounts["memory"], relative))

    def pids(self, relative: str) -> list[int]:
        """The processes directly in the cgroup (not its children)."""
        base = self.mode.mounts["unified" if self.mode.version == 2 else "memory"]
        try:
            return [int(p) for p in _read(os.path.join(base, relative, "cgroup.procs")).split()]
        except OSError:
            return []
