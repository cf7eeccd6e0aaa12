"""Create, configure, inspect and remove pod and container cgroups on cgroup v1 or v2.

Layout as the kubelet's (pkg/kubelet/cm): <root>/[burstable|besteffort/]pod<uid>/<container>
with the cgroupfs driver, <root>.slice/<root>-burstable.slice/<root>-burstable-pod<uid_>.slice/...
with the systemd driver, where systemd makes the slices (transient units over D-Bus, see
cgroups/systemd_driver.py) and the containers' cgroups sit in the Pod's delegated scope:
<pod slice>/<pod slice stem>-containers.scope/<container>.

v1: the same relative path is created in the cpu, cpuacct, memory and pids hierarchies
(once per mount point, so comounted "cpu,cpuacct" counts once). Knobs cgroupspy knows are set
through it; pids.max is a plain file write.
v2: one directory in the unified hierarchy; controllers are enabled in every ancestor's
cgroup.subtree_control, so processes must only ever be put in leaves (container cgroups).

Pod cgroups are set up, resized and removed with the async setup_pod/update_pod/teardown_pod,
which talk to systemd with that driver. The other methods are synchronous: cgroupfs operations
are fast. Call them via run_in_executor from async code where a blocking moment matters
(remove() may wait up to ~2 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import time
from collections.abc import Iterator, Mapping
from typing import Any

from cgroupspy.controllers import CpuController, MemoryController
from cgroupspy.nodes import Node

from cgroups.detect import CgroupError, CgroupMode, detect_mode, parse_controllers
from cgroups.resources import QUOTA_PERIOD, ResourceConfig, pod_cgroup_parent
from cgroups.systemd_driver import SystemdDriver
from cgroups.systemd_units import scope_for

__all__ = [
    "CgroupError",
    "CgroupManager",
    "CgroupMode",
    "detect_mode",
    "missing_controllers",
    "parse_flat_keyed",
    "subtree_control_files",
    "v1_settings",
    "v2_settings",
]

# v1 hierarchies a pod lives in, in the order a new process is written to them.
V1_HIERARCHIES = ("cpu", "cpuacct", "memory", "pids")
# v2 controllers enabled for children of every ancestor.
V2_ENABLE = ("cpu", "memory", "pids")

V1_DEFAULT_SHARES = 1024  # kernel default for cpu.shares
V2_DEFAULT_WEIGHT = 100  # kernel default for cpu.weight
REMOVE_TIMEOUT = 2.0  # seconds to wait for killed processes to leave before giving up
DRIVERS = ("cgroupfs", "systemd")
# Where processes of a top cgroup go so it can enable controllers (kind's and the kubelet's name).
LEAF_NAME = "init"

# Which v1 hierarchy holds each limit file.
_V1_FILE_HIERARCHY = {
    "cpu.shares": "cpu",
    "cpu.cfs_quota_us": "cpu",
    "cpu.cfs_period_us": "cpu",
    "memory.limit_in_bytes": "memory",
    "pids.max": "pids",
}
_V2_FILES = ("cpu.weight", "cpu.max", "memory.max", "pids.max")
# Written only when the config sets it and the kernel accounts swap (CONFIG_MEMCG_SWAP).
_V2_SWAP = "memory.swap.max"


# --- pure helpers (unit tested without a cgroup fs) ---------------------------


def v1_settings(config: ResourceConfig) -> dict[str, str]:
    """Every v1 limit file with its value; unset limits become the kernel's "unlimited"/default."""
    return {
        "cpu.shares": str(config.cpu_shares if config.cpu_shares is not None else V1_DEFAULT_SHARES),
        "cpu.cfs_period_us": str(config.cpu_period or QUOTA_PERIOD),
        "cpu.cfs_quota_us": str(config.cpu_quota if config.cpu_quota is not None else -1),
        "memory.limit_in_bytes": str(config.memory_limit if config.memory_limit is not None else -1),
        "pids.max": str(config.pids_limit) if config.pids_limit is not None else "max",
    }


def v2_settings(config: ResourceConfig) -> dict[str, str]:
    """Every v2 limit file with its value; unset limits become "max" (weight: the default 100)."""
    files = {"cpu.weight": str(V2_DEFAULT_WEIGHT), **config.v2_files()}
    return {name: files[name] for name in (*_V2_FILES, _V2_SWAP) if name in files}


def subtree_control_files(unified: str, relative: str) -> list[str]:
    """The cgroup.subtree_control of each ancestor of `relative`, unified root first.

    The cgroup itself is left out: on v2 a cgroup with controllers enabled for its
    children may hold no processes, and pods' leaves are where processes go.
    """
    parts = relative.split("/")
    dirs = [os.path.join(unified, *parts[:depth]) for depth in range(len(parts))]
    return [os.path.join(d, "cgroup.subtree_control") for d in dirs]


def missing_controllers(subtree_control: str, wanted: tuple[str, ...] = V2_ENABLE) -> str:
    """The line to write to cgroup.subtree_control ("+cpu +pids"), "" when all are enabled."""
    enabled = parse_controllers(subtree_control)
    return " ".join(f"+{name}" for name in wanted if name not in enabled)


def parse_flat_keyed(text: str) -> dict[str, int]:
    """Parse "key value" lines (cpu.stat, memory.stat, memory.events, memory.oom_control)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("-").isdigit():
            values[fields[0]] = int(fields[1])
    return values


def working_set(usage: int, stat: Mapping[str, int], inactive_key: str) -> int:
    """Memory the kernel cannot easily reclaim: usage minus inactive page cache (cadvisor's definition)."""
    return max(0, usage - stat.get(inactive_key, 0))


def _systemd_escape(name: str) -> str:
    # systemd reads "-" in a slice name as nesting, so the kubelet turns it into "_".
    return name.replace("-", "_")


def _check_relative(relative: str) -> str:
    # remove() kills and rmdirs, so never let a path escape the cgroup mounts.
    parts = relative.split("/")
    if not relative or relative.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid relative cgroup path {relative!r}: want e.g. 'kubepods/burstable/pod<uid>'")
    return relative


# --- file access with helpful errors -------------------------------------------

_HINTS = {
    errno.EACCES: "run the agent as root or delegate this cgroup subtree to its user",
    errno.EPERM: "run the agent as root or delegate this cgroup subtree to its user",
    errno.ENOENT: "check that the controller is mounted/enabled and the cgroup exists (ensure_pod first)",
    errno.EBUSY: "the cgroup still has processes or child cgroups",
    errno.EINVAL: "the kernel rejected the value",
    errno.EROFS: "/sys/fs/cgroup is mounted read-only (in a container, mount it read-write)",
}


@contextlib.contextmanager
def _errors(action: str, path: str, hints: Mapping[int, str] | None = None) -> Iterator[None]:
    """Turn OSError into CgroupError naming the path and what to do about it."""
    try:
        yield
    except OSError as e:
        hint = (hints or {}).get(e.errno or 0) or _HINTS.get(e.errno or 0, "")
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise CgroupError(f"cannot {action} {path}: {reason}" + (f"; {hint}" if hint else "")) from e


def _read(path: str) -> str:
    with _errors("read", path), open(path) as f:
        return f.read()


def _write(path: str, value: str, hints: Mapping[int, str] | None = None) -> None:
    # One write() per value: cgroup files take exactly one value (one pid) per write.
    with _errors(f"write {value!r} to", path, hints):
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)


def _cgroupspy_node(path: str) -> Node:
    # A parentless Node stands for an absolute directory; its controller is chosen by us.
    return Node(path.encode())


# --- the manager ---------------------------------------------------------------


class CgroupManager:
    """Pod and container cgroups under a configurable root, on cgroup v1 or v2."""

    def __init__(self, mode: CgroupMode | None = None, root: str = "kubepods", driver: str = "cgroupfs"):
        if driver not in DRIVERS:
            raise ValueError(f"unknown cgroup driver {driver!r}: use one of {', '.join(DRIVERS)}")
        if "/" in root:
            raise ValueError(f"cgroup root {root!r} must be a single name, like 'kubepods'")
        _check_relative(root)
        self.mode = mode or detect_mode()
        self.root = root
        self.driver = driver
        if self.mode.version == 2:
            self._dirs = {"unified": self.mode.mounts["unified"]}
        else:
            self._dirs = self._v1_dirs(self.mode.mounts)
        # Talks to systemd on first use only: naming and file access work without it.
        self.systemd = SystemdDriver(self) if driver == "systemd" else None

    @staticmethod
    def _v1_dirs(mounts: Mapping[str, str]) -> dict[str, str]:
        """hierarchy name -> mount point, one entry per mount ("cpu,cpuacct" appears once, as cpu)."""
        dirs: dict[str, str] = {}
        for name in V1_HIERARCHIES:
            if name in mounts and mounts[name] not in dirs.values():
                dirs[name] = mounts[name]
        return dirs

    # -- names

    @property
    def root_path(self) -> str:
        """The top-level cgroup all pods live under ("kubepods" or "kubepods.slice")."""
        return f"{_systemd_escape(self.root)}.slice" if self.driver == "systemd" else self.root

    def pod_path(self, pod: Mapping[str, Any]) -> str:
        """e.g. "kubepods/burstable/pod<uid>", with the configured root name instead of kubepods."""
        parts = pod_cgroup_parent(pod, self.driver).split("/")
        if self.driver == "cgroupfs":
            return "/".join([self.root, *parts[1:]])
        # Every systemd slice name repeats the full prefix: kubepods-burstable-pod<uid>.slice.
        prefix = _systemd_escape(self.root)
        return "/".join(prefix + part.removeprefix("kubepods") for part in parts)

    def container_path(self, pod: Mapping[str, Any], container_name: str) -> str:
        if not container_name or "/" in container_name or container_name in (".", ".."):
            raise ValueError(f"invalid container name {container_name!r}")
        return f"{self.containers_parent(pod)}/{container_name}"

    def containers_parent(self, pod: Mapping[str, Any]) -> str:
        """Where the containers' cgroups go: the Pod cgroup, or with systemd the Pod's delegated scope."""
        relative = self.pod_path(pod)
        if self.driver == "systemd":
            return f"{relative}/{scope_for(relative.rsplit('/', 1)[-1])}"
        return relative

    def unit_names(self, relative: str) -> list[str]:
        """The systemd units behind a Pod cgroup (slice, container scope); [] with cgroupfs."""
        if self.systemd is None:
            return []
        try:
            return self.systemd.unit_names(relative)
        except ValueError:
            return []

    def absolute_paths(self, relative: str) -> list[str]:
        """The directory of `relative` in every hierarchy we manage."""
        _check_relative(relative)
        return [os.path.join(d, relative) for d in self._dirs.values()]

    def procs_paths(self, relative: str) -> list[str]:
        """The cgroup.procs files a new process must be written to, in order (one per hierarchy)."""
        return [os.path.join(d, "cgroup.procs") for d in self.absolute_paths(relative)]

    # -- Pod lifecycle (async: with the systemd driver these are D-Bus calls)

    async def setup_pod(self, pod: Mapping[str, Any], config: ResourceConfig) -> None:
        """Create the Pod's cgroup (and parents) with its limits. Idempotent."""
        if self.systemd is not None:
            await self.systemd.setup_pod(pod, config)
        else:
            await asyncio.to_thread(self.ensure_pod, pod, config)

    async def update_pod(self, pod: Mapping[str, Any], config: ResourceConfig) -> None:
        """New limits for the Pod's existing cgroup (in-place resize)."""
        if self.systemd is not None:
            await self.systemd.update_pod(pod, config)
        else:
            await asyncio.to_thread(self.ensure_pod, pod, config)

    async def teardown_pod(self, relative: str) -> None:
        """Kill what is inside and remove the Pod's cgroup (`relative` = pod_path, as recorded)."""
        if self.systemd is not None and self.unit_names(relative):
            await self.systemd.remove_pod(relative)
        else:
            await asyncio.to_thread(self.remove, relative)

    async def close(self) -> None:
        if self.systemd is not None:
            await self.systemd.close()

    # -- setup (cgroupfs; with systemd, only below the Pod's delegated scope)

    def make_room_for_children(self) -> str:
        """On v2, let the top cgroup enable controllers for the Pods' root; "" or what was done.

        v2 forbids a cgroup that holds processes from enabling controllers for its children
        (EBUSY), except the real root. The agent's top cgroup holds processes when it runs at
        the root of its own cgroup namespace (a kind node, any container): then, as kind's
        entrypoint and the kubelet do, every process there moves into the leaf `<top>/init`.
        Raises CgroupError (one line: what and why) where that cannot be done.
        """
        if self.mode.version != 2:
            return ""
        top = self._dirs["unified"]
        control = os.path.join(top, "cgroup.subtree_control")
        line = missing_controllers(_read(control))
        if not line:
            return ""
        try:
            _write(control, line)
            return ""
        except CgroupError as e:
            if not isinstance(e.__cause__, OSError) or e.__cause__.errno != errno.EBUSY:
                raise
        leaf = os.path.join(top, LEAF_NAME)
        with _errors("create the leaf cgroup", leaf):
            os.makedirs(leaf, exist_ok=True)
        moved: set[int] = set()
        for _ in range(10):  # a process may fork while the others move
            left = self._procs_in(top)
            if not left:
                break
            for pid in left:
                try:
                    _write(os.path.join(leaf, "cgroup.procs"), str(pid))
                    moved.add(pid)
                except CgroupError as e:
                    if not isinstance(e.__cause__, OSError) or e.__cause__.errno != errno.ESRCH:
                        raise CgroupError(
                            f"cannot enable {line} in {control}: {top} holds processes and moving "
                            f"process {pid} into {leaf} failed ({e}); start the agent in a leaf cgroup"
                        ) from e
        _write(
            control, line, {errno.EBUSY: f"processes keep appearing in {top}/cgroup.procs; start the agent in a leaf"}
        )
        return f"moved {len(moved)} processes from {top} into {leaf} to enable {line} for Pods"

    def ensure_pod(self, pod: Mapping[str, Any], config: ResourceConfig) -> None:
        """Create root, QoS and pod cgroups and write the pod's limits. Idempotent."""
        relative = self.pod_path(pod)
        self._create(relative)
        self._apply(relative, config)

    def ensure_container(self, pod: Mapping[str, Any], container_name: str, config: ResourceConfig) -> str:
        """Create the container's cgroup under its pod with the container's own limits."""
        relative = self.container_path(pod, container_name)
        self._create(relative)
        self._apply(relative, config)
        return relative

    def _create(self, relative: str) -> None:
        _check_relative(relative)
        if self.mode.version == 2:
            self._create_v2(relative)
            return
        for path in self.absolute_paths(relative):
            with _errors("create cgroup", path):
                os.makedirs(path, exist_ok=True)

    def _create_v2(self, relative: str) -> None:
        # Enable the controllers in each parent before making the child, top-down.
        current = self._dirs["unified"]
        for control_file, part in zip(subtree_control_files(current, relative), relative.split("/"), strict=True):
            self._enable_controllers(control_file)
            current = os.path.join(current, part)
            with _errors("create cgroup", current):
                os.makedirs(current, exist_ok=True)

    def _enable_controllers(self, control_file: str) -> None:
        line = missing_controllers(_read(control_file))
        if not line:
            return
        directory = os.path.dirname(control_file)
        _write(
            control_file,
            line,
            {
                errno.EBUSY: f"cgroup v2 lets only leaf cgroups hold processes: move the processes in "
                f"{directory}/cgroup.procs into a child cgroup first",
                errno.ENOENT: f"{directory}/cgroup.controllers lacks one of {', '.join(V2_ENABLE)}: enable it in "
                "the parent's cgroup.subtree_control (at the root it may be bound to a cgroup v1 hierarchy)",
            },
        )

    def write_limits(self, relative: str, config: ResourceConfig) -> None:
        """Write every limit file of an existing cgroup."""
        self._apply(relative, config)

    def _apply(self, relative: str, config: ResourceConfig) -> None:
        if self.mode.version == 2:
            directory = self._dirs["unified"]
            for name, value in v2_settings(config).items():
                path = os.path.join(directory, relative, name)
                if name == _V2_SWAP and not os.path.exists(path):
                    continue  # no swap accounting in this kernel: nothing can swap past memory.max
                _write(path, value)
            return
        settings = v1_settings(config)
        self._apply_v1_cpu(os.path.join(self._dirs["cpu"], relative), settings)
        self._apply_v1_memory(os.path.join(self._dirs["memory"], relative), settings)
        self._apply_v1_pids(relative, settings, config.pids_limit is not None)

    @staticmethod
    def _apply_v1_cpu(path: str, settings: Mapping[str, str]) -> None:
        cpu = CpuController(_cgroupspy_node(path))
        hints = {errno.EINVAL: "on cgroup v1 a child's CFS quota may not exceed its parent's; raise the pod's limit"}
        with _errors("write cpu.shares in", path):
            cpu.shares = int(settings["cpu.shares"])
        period, quota = int(settings["cpu.cfs_period_us"]), int(settings["cpu.cfs_quota_us"])
        with _errors(f"set cfs quota {quota} / period {period} in", path, hints):
            try:
                cpu.cfs_period_us = period
                cpu.cfs_quota_us = quota
            except OSError as e:
                # The kernel checks quota/period as a pair; shrinking the period under an old
                # quota can be refused, so retry in the other order, as runc does.
                if e.errno != errno.EINVAL:
                    raise
                cpu.cfs_quota_us = quota
                cpu.cfs_period_us = period

    @staticmethod
    def _apply_v1_memory(path: str, settings: Mapping[str, str]) -> None:
        memory = MemoryController(_cgroupspy_node(path))
        limit = int(settings["memory.limit_in_bytes"])
        hints = {errno.EBUSY: "the cgroup already uses more memory than the new limit and the kernel could not reclaim"}
        with _errors(f"write memory.limit_in_bytes {limit} in", path, hints):
            memory.limit_in_bytes = None if limit < 0 else limit  # cgroupspy writes None as -1

    def _apply_v1_pids(self, relative: str, settings: Mapping[str, str], required: bool) -> None:
        if "pids" not in self._dirs:
            if required:
                raise CgroupError(
                    f"cannot set pids.max for {relative}: the v1 pids controller is not mounted; "
                    "mount it at /sys/fs/cgroup/pids or drop podPidsLimit"
                )
            return
        _write(os.path.join(self._dirs["pids"], relative, "pids.max"), settings["pids.max"])

    # -- processes

    def add_process(self, relative: str, pid: int) -> None:
        """Move `pid` into the cgroup in every hierarchy."""
        for procs in self.procs_paths(relative):
            _write(procs, str(pid), {errno.ESRCH: f"process {pid} has exited"})

    def pids(self, relative: str) -> list[int]:
        """Every pid in the cgroup and its descendants, over all hierarchies."""
        found: set[int] = set()
        for top in self.absolute_paths(relative):
            for directory, _, _ in os.walk(top):
                # A child may be removed while we walk.
                with contextlib.suppress(FileNotFoundError), open(os.path.join(directory, "cgroup.procs")) as f:
                    found.update(int(line) for line in f.read().split())
        return sorted(found)

    # -- inspection

    def read_values(self, relative: str) -> dict[str, str]:
        """The limit files as `cat` shows them; files a hierarchy lacks are left out."""
        if self.mode.version == 2:
            directory = os.path.join(self._dirs["unified"], relative)
            paths = {name: os.path.join(directory, name) for name in _V2_FILES}
        else:
            paths = {
                name: os.path.join(self._dirs[hierarchy], relative, name)
                for name, hierarchy in _V1_FILE_HIERARCHY.items()
                if hierarchy in self._dirs
            }
        self._require_exists(relative)
        return {name: _read(path).strip() for name, path in paths.items() if os.path.exists(path)}

    def oom_kills(self, relative: str) -> int:
        """Processes the OOM killer killed in this cgroup and its descendants."""
        self._require_exists(relative)
        if self.mode.version == 2:
            # memory.events counts the whole subtree already (unless mounted with memory_localevents).
            events = os.path.join(self._dirs["unified"], relative, "memory.events")
            return parse_flat_keyed(_read(events)).get("oom_kill", 0) if os.path.exists(events) else 0
        # v1 counts a kill only in the victim's own cgroup, so add up the subtree to match v2.
        total = 0
        for directory, _, _ in os.walk(os.path.join(self._dirs["memory"], relative)):
            with contextlib.suppress(FileNotFoundError), open(os.path.join(directory, "memory.oom_control")) as f:
                total += parse_flat_keyed(f.read()).get("oom_kill", 0)
        return total

    def usage(self, relative: str) -> dict[str, int]:
        """cpu_usage_ns, memory_usage_bytes and memory_working_set_bytes of the cgroup (subtree included)."""
        self._require_exists(relative)
        if self.mode.version == 2:
            directory = os.path.join(self._dirs["unified"], relative)
            cpu_ns = parse_flat_keyed(_read(os.path.join(directory, "cpu.stat"))).get("usage_usec", 0) * 1000
            memory = int(_read(os.path.join(directory, "memory.current")))
            stat = parse_flat_keyed(_read(os.path.join(directory, "memory.stat")))
            inactive_key = "inactive_file"
        else:
            acct = os.path.join(self._dirs.get("cpuacct", self._dirs["cpu"]), relative)
            cpu_ns = int(_read(os.path.join(acct, "cpuacct.usage")))
            directory = os.path.join(self._dirs["memory"], relative)
            memory = int(_read(os.path.join(directory, "memory.usage_in_bytes")))
            stat = parse_flat_keyed(_read(os.path.join(directory, "memory.stat")))
            inactive_key = "total_inactive_file"
        return {
            "cpu_usage_ns": cpu_ns,
            "memory_usage_bytes": memory,
            "memory_working_set_bytes": working_set(memory, stat, inactive_key),
        }

    def _require_exists(self, relative: str) -> None:
        for path in self.absolute_paths(relative):
            if not os.path.isdir(path):
                raise CgroupError(f"cgroup {path} does not exist; create it with ensure_pod/ensure_container first")

    # -- teardown

    def remove(self, relative: str, kill: bool = True) -> None:
        """Kill what is left inside (when `kill`), then remove the cgroup and its children everywhere."""
        deadline = time.monotonic() + REMOVE_TIMEOUT
        if kill:
            self._kill_all(relative, deadline)
        for path in self.absolute_paths(relative):
            self._rmdir_tree(path, deadline if kill else time.monotonic())

    def kill(self, relative: str) -> None:
        """Kill every process in the cgroup and its descendants (waits up to REMOVE_TIMEOUT)."""
        self._kill_all(relative, time.monotonic() + REMOVE_TIMEOUT)

    def _kill_all(self, relative: str, deadline: float) -> None:
        if os.getpid() in self.pids(relative):
            raise CgroupError(f"refusing to kill cgroup {relative}: the agent itself (pid {os.getpid()}) runs in it")
        if self.mode.version == 2:
            # cgroup.kill (Linux 5.14+) kills the whole subtree, forks included, in one go.
            kill_file = os.path.join(self._dirs["unified"], relative, "cgroup.kill")
            if os.path.exists(kill_file):
                _write(kill_file, "1")
        # Repeat: a process may fork between reading cgroup.procs and the kill.
        while pids := self.pids(relative):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                return  # rmdir below reports what is left
            time.sleep(0.01)

    def _rmdir_tree(self, top: str, deadline: float) -> None:
        if not os.path.isdir(top):
            return  # already gone: removal is idempotent
        # Deepest first: a cgroup with children cannot be removed.
        for directory, _, _ in os.walk(top, topdown=False):
            while True:
                try:
                    os.rmdir(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    # Killed processes take a moment to leave the cgroup.
                    if e.errno == errno.EBUSY and time.monotonic() < deadline:
                        time.sleep(0.01)
                        continue
                    left = self._procs_in(directory)
                    hint = f"processes {left} are still inside; stop them or remove with kill=True" if left else ""
                    with _errors("remove cgroup", directory, {errno.EBUSY: hint} if hint else None):
                        raise

    @staticmethod
    def _procs_in(directory: str) -> list[int]:
        try:
            with open(os.path.join(directory, "cgroup.procs")) as f:
                return [int(line) for line in f.read().split()]
        except OSError:
            return []
