"""Host facts for the node part of the Summary: interfaces, filesystems, process limits, boot time.

Parsers take the text of the /proc file, so tests feed them fixed strings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Interfaces cadvisor leaves out of a container's network stats.
IGNORED_PREFIXES = ("lo", "veth", "docker")
DEFAULT_INTERFACE = "eth0"  # the kubelet's choice for the inline (default) interface


@dataclass(frozen=True, slots=True)
class InterfaceCounters:
    name: str
    rx_bytes: int
    rx_errors: int
    tx_bytes: int
    tx_errors: int


@dataclass(frozen=True, slots=True)
class FsUsage:
    capacity_bytes: int
    available_bytes: int
    used_bytes: int
    inodes: int
    inodes_free: int
    inodes_used: int


def parse_net_dev(text: str) -> list[InterfaceCounters]:
    """/proc/<pid>/net/dev without the interfaces cadvisor ignores (lo, veth*, docker*)."""
    found = []
    for line in text.splitlines()[2:]:
        name, _, rest = line.partition(":")
        name = name.strip()
        fields = rest.split()
        if len(fields) < 16 or name.startswith(IGNORED_PREFIXES):
            continue
        found.append(InterfaceCounters(name, int(fields[0]), int(fields[2]), int(fields[8]), int(fields[10])))
    return found


def default_route_interface(route_text: str) -> str | None:
    """The interface of the IPv4 default route in /proc/net/route, if any."""
    for line in route_text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 2 and fields[1] == "00000000":
            return fields[0]
    return None


def fs_usage(path: str) -> FsUsage:
    st = os.statvfs(path)
    return FsUsage(
        capacity_bytes=st.f_blocks * st.f_frsize,
        available_bytes=st.f_bavail * st.f_frsize,
        used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
        inodes=st.f_files,
        inodes_free=st.f_ffree,
        inodes_used=st.f_files - st.f_ffree,
    )


def parse_boot_time(stat_text: str) -> int:
    """btime (seconds since the epoch) from /proc/stat."""
    for line in stat_text.splitlines():
        if line.startswith("btime "):
            return int(line.split()[1])
    raise ValueError("no btime line in /proc/stat")


def parse_thread_count(loadavg_text: str) -> int:
    """Scheduling entities on the host ("0.26 0.31 0.47 1/92 28669" -> 92): what sysinfo(2) calls procs."""
    return int(loadavg_text.split()[3].split("/")[1])


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()
