"""Find out which cgroup version this host runs and where the hierarchies are mounted.

Pure v2: /sys/fs/cgroup is cgroup2 and its cgroup.controllers lists cpu, memory and pids.
v1 (also "hybrid", where an empty cgroup2 sits at /sys/fs/cgroup/unified): one
cgroup mount per controller or per group of comounted controllers ("cpu,cpuacct").
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

# Controllers a v2 root must offer before we use v2 for pods.
V2_CONTROLLERS = ("cpu", "memory", "pids")
# v1 hierarchies we cannot run pods without.
V1_REQUIRED = ("cpu", "memory")
# Names of v1 controllers, to tell them apart from mount options like "rw" or "name=systemd".
V1_CONTROLLERS = frozenset(
    {
        "blkio",
        "cpu",
        "cpuacct",
        "cpuset",
        "devices",
        "freezer",
        "hugetlb",
        "memory",
        "misc",
        "net_cls",
        "net_prio",
        "perf_event",
        "pids",
        "rdma",
    }
)


class CgroupError(Exception):
    """A cgroup could not be set up or read; the message names the path and a way out."""


@dataclass(frozen=True)
class CgroupMode:
    """version 1: controller -> mount point ("cpu" and "cpuacct" may share one); version 2: {"unified": path}."""

    version: int
    mounts: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    fstype: str
    options: tuple[str, ...]


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(path: str) -> str:
    # The kernel writes space, tab, newline and backslash in mount points as \040 style octal.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m[1], 8)), path)


def parse_mounts(text: str) -> list[MountEntry]:
    """The cgroup and cgroup2 lines of a /proc/self/mounts text."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[2] not in ("cgroup", "cgroup2"):
            continue
        entries.append(MountEntry(_unescape(fields[1]), fields[2], tuple(fields[3].split(","))))
    return entries


def v1_mounts(entries: list[MountEntry]) -> dict[str, str]:
    """controller -> mount point; the first mount wins when a hierarchy is mounted twice (bind mounts)."""
    mounts: dict[str, str] = {}
    for entry in entries:
        if entry.fstype != "cgroup":
            continue
        for option in entry.options:
            if option in V1_CONTROLLERS:
                mounts.setdefault(option, entry.mount_point)
    return mounts


def parse_controllers(text: str) -> set[str]:
    """The names in a cgroup.controllers or cgroup.subtree_control file."""
    return {name.lstrip("+") for name in text.split()}


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _v2_candidates(entries: list[MountEntry]) -> list[str]:
    # /sys/fs/cgroup first: on a pure v2 host that is the unified hierarchy.
    points = [e.mount_point for e in entries if e.fstype == "cgroup2"]
    return sorted(points, key=lambda p: (p.rstrip("/") != "/sys/fs/cgroup", points.index(p)))


def detect_mode(mounts_file: str = "/proc/self/mounts", root: str = "/") -> CgroupMode:
    """Decide between v2 and v1 from a mounts file.

    `root` is the filesystem root the mount points are read under (like a sysroot):
    "/" normally, a directory holding `<mount point>/cgroup.controllers` in tests.
    """
    try:
        with open(mounts_file) as f:
            entries = parse_mounts(f.read())
    except OSError as e:
        raise CgroupError(f"cannot read {mounts_file} to find the cgroup mounts: {e}") from e

    for mount_point in _v2_candidates(entries):
        controllers_file = os.path.join(root, mount_point.lstrip("/"), "cgroup.controllers")
        text = _read(controllers_file)
        if text is not None and parse_controllers(text).issuperset(V2_CONTROLLERS):
            return CgroupMode(2, {"unified": mount_point})

    mounts = v1_mounts(entries)
    if all(c in mounts for c in V1_REQUIRED):
        return CgroupMode(1, mounts)

    v2_points = ", ".join(_v2_candidates(entries)) or "none"
    raise CgroupError(
        f"no usable cgroups in {mounts_file}: cgroup2 mounts ({v2_points}) do not offer "
        f"{'+'.join(V2_CONTROLLERS)} in cgroup.controllers, and cgroup v1 hierarchies for "
        f"{' and '.join(V1_REQUIRED)} are not mounted (found: {', '.join(sorted(mounts)) or 'none'}). "
        "Mount cgroup2 at /sys/fs/cgroup (systemd.unified_cgroup_hierarchy=1) or the v1 cpu and memory controllers."
    )
