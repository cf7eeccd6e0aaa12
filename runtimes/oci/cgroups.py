"""Cgroup directories an OCI runtime leaves behind.

runc (cgroupfs driver, cgroup v1) creates a container's cgroup in every mounted hierarchy
(cpuset, devices, freezer, blkio, name=systemd, ...), parents included, while the agent's
CgroupManager only manages cpu, cpuacct, memory and pids. `runtime delete` removes the
container's own directories; the Pod's parents in the other hierarchies are removed here.
"""

from __future__ import annotations

import contextlib
import os


def cgroup_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points of every cgroup (v1) and cgroup2 filesystem."""
    points: list[str] = []
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            try:
                fs_type = fields[fields.index("-") + 1]
            except (ValueError, IndexError):
                continue
            if fs_type in ("cgroup", "cgroup2"):
                points.append(fields[4].replace("\\040", " "))
    return points


def remove_everywhere(relative: str) -> list[str]:
    """rmdir `relative` and its children (deepest first) in every hierarchy; returns what is left
    (directories that still hold processes)."""
    parts = relative.strip("/").split("/")
    if not relative.strip("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid relative cgroup path {relative!r}")
    left: list[str] = []
    for mount in cgroup_mounts():
        top = os.path.join(mount, *parts)
        if not os.path.isdir(top):
            continue
        for directory, _, _ in os.walk(top, topdown=False):
            with contextlib.suppress(FileNotFoundError):
                try:
                    os.rmdir(directory)
                except OSError:
                    left.append(directory)
    return left
