"""Removing a whole Pod cgroup hierarchy (the `[node] cgroup_root` tree: QoS, Pod and container
cgroups) from every mounted cgroup hierarchy, for `kubelet-emu reset`.

Every hierarchy counts, not only the ones CgroupManager writes to: an OCI runtime (runc with the
cgroupfs driver on v1) makes a container's cgroup and its parents in cpuset, devices, freezer,
blkio, name=systemd and the unified hierarchy too. Processes are killed only in the Pod cgroups
the caller names (the Pods of one agent); a cgroup that still holds other processes (another
agent sharing the root, say) is kept and reported, never emptied.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from cgroups.detect import parse_mounts

KILL_TIMEOUT = 3.0  # seconds for killed processes to leave their cgroups
_POD_DIR = re.compile(r"(?:^pod|-pod)([0-9a-fA-F_-]{8,})(?:\.slice)?$")


def pod_uid_of(name: str) -> str | None:
    """The Pod UID in a Pod cgroup's directory name: `pod<uid>` (cgroupfs) or
    `kubepods-burstable-pod<uid with _>.slice` (systemd names), else None."""
    m = _POD_DIR.search(name)
    return m[1].replace("_", "-") if m else None


def hierarchy_root(root: str, driver: str) -> str:
    """The top cgroup of the Pods, as CgroupManager.root_path names it ("kubepods", "kubepods.slice")."""
    return f"{root.replace('-', '_')}.slice" if driver == "systemd" else root


def cgroup_mount_points(mounts_file: str = "/proc/self/mounts") -> list[str]:
    """Every cgroup (v1) and cgroup2 mount point."""
    try:
        with open(mounts_file) as f:
            entries = parse_mounts(f.read())
    except OSError:
        return []
    return list(dict.fromkeys(entry.mount_point for entry in entries))


@dataclass
class RemovalReport:
    removed: dict[str, list[str]] = field(default_factory=dict)  # relative path -> hierarchies
    killed: list[tuple[int, str]] = field(default_factory=list)  # (pid, relative cgroup)
    kept: dict[str, str] = field(default_factory=dict)  # relative path -> why
    failed: dict[str, str] = field(default_factory=dict)  # relative path -> error


def _procs(directory: str) -> list[int]:
    try:
        with open(os.path.join(directory, "cgroup.procs")) as f:
            return [int(line) for line in f.read().split()]
    except (OSError, ValueError):
        return []


def _tree(top: str) -> list[str]:
    """`top` and the directories below it, deepest first."""
    return [directory for directory, _, _ in os.walk(top, topdown=False)]


def _pod_of(relative: str) -> tuple[str | None, str]:
    """The Pod UID of a cgroup path and the path of its Pod cgroup, or (None, relative)."""
    parts = relative.split("/")
    for i, part in enumerate(parts):
        uid = pod_uid_of(part)
        if uid:
            return uid, "/".join(parts[: i + 1])
    return None, relative


def remove_hierarchy(root: str, kill_pods: Iterable[str], mounts: list[str] | None = None) -> RemovalReport:
    """Remove the cgroup `root` (one name, like "kubepods" or "kubepods.slice") and everything below
    it in every hierarchy. Processes in the Pod cgroups of `kill_pods` (Pod UIDs) are killed first;
    other cgroups holding processes are kept. Idempotent: a gone tree reports nothing."""
    if not root or "/" in root or root in (".", ".."):
        raise ValueError(f"cgroup root {root!r} must be a single name, like 'kubepods'")
    ours = {uid.lower() for uid in kill_pods}
    report = RemovalReport()
    mounts = cgroup_mount_points() if mounts is None else mounts
    tops = [(m, os.path.join(m, root)) for m in mounts if os.path.isdir(os.path.join(m, root))]

    def relative(mount: str, directory: str) -> str:
        return os.path.relpath(directory, mount)

    deadline = time.monotonic() + KILL_TIMEOUT
    while True:  # kill until our Pod cgroups are empty (a process may fork meanwhile)
        left = False
        for mount, top in tops:
            for directory in _tree(top):
                rel = relative(mount, directory)
                uid, _ = _pod_of(rel)
                if uid is None or uid.lower() not in ours:
                    continue
                kill_file = os.path.join(directory, "cgroup.kill")  # v2, Linux 5.14+: the whole subtree
                if os.path.exists(kill_file):
                    with contextlib.suppress(OSError), open(kill_file, "w") as f:
                        f.write("1")
                for pid in _procs(directory):
                    left = True
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        if pid not in {p for p, _ in report.killed}:
                            report.killed.append((pid, rel))
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.02)

    for mount, top in tops:
        hierarchy = os.path.basename(mount.rstrip("/")) or mount
        for directory in _tree(top):
            rel = relative(mount, directory)
            uid, pod_rel = _pod_of(rel)
            if uid is not None and uid.lower() not in ours:
                # Another agent's Pod (a shared root): never touched, even when empty (it may be
                # a Pod being started right now). Its parents stay, being in use.
                report.kept.setdefault(pod_rel, f"Pod {uid} is not one of this agent's Pods")
                continue
            while True:
                try:
                    os.rmdir(directory)
                    report.removed.setdefault(rel, []).append(hierarchy)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    procs = _procs(directory)
                    mine = uid is not None
                    if e.errno == errno.EBUSY and mine and procs and time.monotonic() < deadline:
                        time.sleep(0.02)  # killed processes take a moment to leave
                        continue
                    if e.errno == errno.EBUSY and procs:
                        where = report.failed if mine else report.kept
                        where.setdefault(
                            rel,
                            f"processes {', '.join(map(str, procs[:5]))} did not exit"
                            if mine
                            else f"processes {', '.join(map(str, procs[:5]))} not of this agent's Pods",
                        )
                    elif e.errno == errno.EBUSY and _children(directory):
                        report.kept.setdefault(rel, "holds cgroups that are kept")  # pruned below
                    else:
                        report.failed.setdefault(rel, os.strerror(e.errno or 0))
                    break
    # A parent kept because of a kept or failed child is not worth its own line.
    for rel in list(report.kept):
        if any(other.startswith(rel + "/") for other in [*report.kept, *report.failed]):
            del report.kept[rel]
    return report


def _children(directory: str) -> bool:
    with contextlib.suppress(OSError):
        return any(entry.is_dir() for entry in os.scandir(directory))
    return False
