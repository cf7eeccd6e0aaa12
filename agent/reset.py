"""`kubelet-emu reset`: remove what an agent made on this host, as `kubeadm reset` does for a kubelet.

Containers, the Pod network and Pod cgroups outlive the agent by design (a restart adopts them);
once a node is gone for good they are litter, and a later node with the same pod CIDR cannot even
start its network while the old bridge routes it. Reset removes, for one state dir:

1. the containers left in the OCI runtimes' roots (`<runtime> delete --force`), and every process
   the state files name (shims, container processes, Pod namespace holders), killed;
2. the Pod cgroup hierarchy under `[node] cgroup_root` in every mounted hierarchy (v1 and v2),
   killing what is left in this node's Pod cgroups (cgroups holding other processes are kept);
3. mounts under the state dir (overlay roots, /dev/shm and memory volumes);
4. the Pod network: veths, network namespaces, addresses, the bridge and its iptables rules;
5. the state dir's contents except the image store `images/` (a cache, as `kubeadm reset` leaves
   the container runtime's images) and `node.json` (below); `--all` removes those and the state
   dir too.

What it needs comes from `<state-dir>/node.json`, which the agent writes at start (node name,
bridge, cgroup root and driver, OCI runtimes), or from --config and --node-name. It refuses while
an agent holds the state dir's lock (`<state-dir>/agent.pid`); `--force` stops that agent first.
Each thing removed is one line; a second run finds nothing and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import itertools
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import state_lock
from agent.config import AgentConfig
from agent.pod_network import default_bridge, remove_node_network

NODE_RECORD = "node.json"
# Kept unless --all: the image store (a cache) and the node record (so a second reset finds the
# same bridge and cgroups, not the defaults).
KEEP = ("images", NODE_RECORD)
AGENT_STOP_TIMEOUT = 10.0
HELPER_EXIT_WAIT = 3.0  # the network helper of an agent that just stopped exits on its own
_PID_KEYS = (("shim_pid", "shim_start_ticks", "shim"), ("pause_pid", "pause_start_ticks", "pod holder"),
             ("pid", "start_ticks", "container process"))  # fmt: skip
_STATE_FILES = ("state.json", "agent.json", "pause.json", "sandbox.json")
_UID_SUFFIX = re.compile(r"_([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")
MNT_DETACH = 2


@dataclass(frozen=True)
class OciRuntime:
    handler: str
    argv: tuple[str, ...]  # runtime_path and runtime_args
    root: str


@dataclass(frozen=True)
class NodeRecord:
    """What reset needs to find one agent's things on the host."""

    node_name: str
    bridge: str
    cgroup_root: str = "kubepods"
    cgroup_driver: str = "cgroupfs"
    oci_runtimes: tuple[OciRuntime, ...] = ()

    @classmethod
    def of(cls, node_name: str, config: AgentConfig, state_dir: Path) -> NodeRecord:
        runtimes = tuple(
            OciRuntime(
                name,
                (h.runtime_path, *h.runtime_args),
                h.runtime_root or str(state_dir / "runtimes" / name / "runtime"),  # the oci backend's default
            )
            for name, h in sorted(config.handlers.items())
            if h.backend == "oci" and h.runtime_path
        )
        return cls(
            node_name=node_name,
            bridge=config.network.bridge or default_bridge(node_name),
            cgroup_root=config.node.cgroup_root,
            cgroup_driver=config.node.cgroup_driver,
            oci_runtimes=runtimes,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "node_name": self.node_name,
            "bridge": self.bridge,
            "cgroup_root": self.cgroup_root,
            "cgroup_driver": self.cgroup_driver,
            "oci_runtimes": [{"handler": r.handler, "argv": list(r.argv), "root": r.root} for r in self.oci_runtimes],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeRecord:
        return cls(
            node_name=data["node_name"],
            bridge=data["bridge"],
            cgroup_root=data.get("cgroup_root", "kubepods"),
            cgroup_driver=data.get("cgroup_driver", "cgroupfs"),
            oci_runtimes=tuple(
                OciRuntime(r["handler"], tuple(r["argv"]), r["root"]) for r in data.get("oci_runtimes", [])
            ),
        )


def write_node_record(state_dir: Path, node_name: str, config: AgentConfig) -> None:
    """Called by the agent at start and on SIGHUP; OCI runtimes of earlier configs are kept, since
    their containers may still be there."""
    record = NodeRecord.of(node_name, config, state_dir)
    old = read_node_record(state_dir)
    if old is not None and old.node_name == node_name:
        known = {(r.argv, r.root) for r in record.oci_runtimes}
        extra = tuple(r for r in old.oci_runtimes if (r.argv, r.root) not in known)
        record = NodeRecord(**{**record.__dict__, "oci_runtimes": record.oci_runtimes + extra})
    path = state_dir / NODE_RECORD
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record.to_json(), indent=1))
    os.replace(tmp, path)


def read_node_record(state_dir: Path) -> NodeRecord | None:
    try:
        return NodeRecord.from_json(json.loads((state_dir / NODE_RECORD).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_targets(
    state_dir: Path, config: AgentConfig | None, node_name: str | None, default_node: str
) -> NodeRecord:
    """--config and --node-name win; then what the agent recorded; then the defaults of `run`."""
    recorded = read_node_record(state_dir)
    if config is not None:
        record = NodeRecord.of(node_name or (recorded.node_name if recorded else default_node), config, state_dir)
        if recorded:  # containers of runtimes the config no longer names
            extra = tuple(r for r in recorded.oci_runtimes if r not in record.oci_runtimes)
            record = NodeRecord(**{**record.__dict__, "oci_runtimes": record.oci_runtimes + extra})
        return record
    if recorded is not None:
        if node_name and node_name != recorded.node_name:
            return NodeRecord(**{**recorded.__dict__, "node_name": node_name, "bridge": default_bridge(node_name)})
        return recorded
    name = node_name or default_node
    return NodeRecord(node_name=name, bridge=default_bridge(name))


# --- processes ------------------------------------------------------------------------------------


def _start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _walk_state(state_dir: Path) -> list[Path]:
    """The state files under `state_dir` that may name processes (image store, container roots and
    mount points are not entered)."""
    found: list[Path] = []
    for directory, dirs, files in os.walk(state_dir):
        here = Path(directory)
        dirs[:] = [
            d for d in dirs if not (here == state_dir and d in KEEP) and d != "rootfs" and not os.path.ismount(here / d)
        ]
        found += [here / f for f in files if f in _STATE_FILES]
    return sorted(found)


def recorded_processes(state_dir: Path) -> list[tuple[int, int, str, Path]]:
    """(pid, start ticks, what, state file) for every process the state files name."""
    procs: list[tuple[int, int, str, Path]] = []
    seen: set[int] = set()
    for path in _walk_state(state_dir):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        for pid_key, ticks_key, what in _PID_KEYS:
            pid, ticks = data.get(pid_key), data.get(ticks_key)
            if path.name == "pause.json" and pid_key == "pid":
                what = "pod holder"
            if isinstance(pid, int) and isinstance(ticks, int) and pid > 1 and pid not in seen:
                seen.add(pid)
                procs.append((pid, ticks, what, path))
    return procs


def pod_uids(state_dir: Path, ipam_owners: list[str]) -> set[str]:
    """The UIDs of the Pods this state dir knows: its Pod directories (`<ns>_<name>_<uid>`) and
    the owners of Pod addresses."""
    uids = set(ipam_owners)
    for directory, dirs, _ in os.walk(state_dir):
        depth = len(Path(directory).relative_to(state_dir).parts)
        for d in dirs:
            m = _UID_SUFFIX.search(d)
            if m:
                uids.add(m[1])
        dirs[:] = [] if depth >= 3 else [d for d in dirs if not (depth == 0 and d in KEEP)]
    return uids


def _ipam_owners(state_dir: Path) -> list[str]:
    try:
        return list(json.loads((state_dir / "network" / "ipam.json").read_text())["allocations"].values())
    except (OSError, ValueError, KeyError, AttributeError):
        return []


def bridge_user(bridge: str) -> int | None:
    """The pid of a live network helper serving `bridge` (`python -m network.helper ... --bridge B`),
    the sign that some agent still uses it, whatever its state dir."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"network.helper" in argv and any(
            a == b"--bridge" and b == bridge.encode() for a, b in itertools.pairwise(argv)
        ):
            return int(entry)
    return None


# --- mounts ---------------------------------------------------------------------------------------


def mounts_under(path: Path, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points below `path`, deepest first."""
    prefix = str(path).rstrip("/") + "/"
    points = []
    with open(mountinfo) as f:
        for line in f:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
            if point.startswith(prefix):
                points.append(point)
    return sorted(set(points), key=lambda p: (-p.count("/"), p))


def _unmount(point: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.umount2(point.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (22, 2):  # EINVAL: not a mount (any more); ENOENT: gone
            raise OSError(err, f"unmount {point}: {os.strerror(err)}")


# --- the reset ------------------------------------------------------------------------------------


@dataclass
class Reset:
    state_dir: Path
    targets: NodeRecord
    say: Callable[[str], None] = print
    warn: Callable[[str], None] = print
    remove_all: bool = False
    removed: int = 0
    errors: list[str] = field(default_factory=list)

    def done(self, line: str) -> None:
        self.removed += 1
        self.say(line)

    def error(self, line: str) -> None:
        self.errors.append(line)
        self.warn(line)

    async def run(self) -> None:
        uids = pod_uids(self.state_dir, _ipam_owners(self.state_dir)) if self.state_dir.is_dir() else set()
        await self.runtime_containers()
        self.processes()
        await asyncio.to_thread(self.cgroups, uids)
        await self.systemd_units(uids)
        self.mounts()
        await self.network()
        self.state()

    async def runtime_containers(self) -> None:
        for runtime in self.targets.oci_runtimes:
            root = Path(runtime.root)
            if not root.is_dir():
                continue
            if not shutil.which(runtime.argv[0]):
                self.error(f"cannot remove the containers in {root}: {runtime.argv[0]} is not installed")
                continue
            for entry in sorted(root.iterdir()):
                if not entry.is_dir():
                    continue
                argv = [*runtime.argv, "--root", str(root), "delete", "--force", entry.name]
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
                )
                _, err = await proc.communicate()
                runtime_name = os.path.basename(runtime.argv[0])
                if proc.returncode == 0:
                    self.done(f"removed container {entry.name} ({runtime.handler}: {runtime_name})")
                elif entry.exists():
                    message = err.decode(errors="replace").strip()
                    self.error(f"cannot remove container {entry.name} in {root} with {runtime_name}: {message}")

    def processes(self) -> None:
        if not self.state_dir.is_dir():
            return
        killed = []
        for pid, ticks, what, path in recorded_processes(self.state_dir):
            if _start_ticks(pid) != ticks:
                continue  # gone, or the pid names another process now
            with contextlib.suppress(ProcessLookupError):
                with contextlib.suppress(OSError):
                    if os.getpgid(pid) == pid:  # container processes lead their own process group
                        os.killpg(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, ticks))
                self.done(f"killed {what} {pid} ({path.parent.relative_to(self.state_dir)})")
        deadline = time.monotonic() + 3.0
        while any(_start_ticks(pid) == ticks for pid, ticks in killed) and time.monotonic() < deadline:
            time.sleep(0.02)

    def cgroups(self, uids: set[str]) -> None:
        from cgroups.cleanup import hierarchy_root, remove_hierarchy

        root = hierarchy_root(self.targets.cgroup_root, self.targets.cgroup_driver)
        try:
            report = remove_hierarchy(root, uids)
        except (OSError, ValueError) as exc:
            self.error(f"cannot remove cgroup {root}: {exc}")
            return
        for pid, rel in report.killed:
            self.done(f"killed process {pid} (cgroup {rel})")
        for rel, hierarchies in report.removed.items():
            self.done(f"removed cgroup {rel} ({', '.join(hierarchies)})")
        for rel, why in report.kept.items():
            self.warn(f"kept cgroup {rel}: {why}")
        for rel, why in report.failed.items():
            self.error(f"cannot remove cgroup {rel}: {why}")

    async def systemd_units(self, uids: set[str]) -> None:
        """cgroup_driver = "systemd": stop the Pods' slices and scopes, so systemd forgets them too."""
        if self.targets.cgroup_driver != "systemd" or not os.path.isdir("/run/systemd/system"):
            return
        from cgroups.systemd_bus import Systemd, SystemdError
        from cgroups.systemd_units import escape, scope_for

        root = escape(self.targets.cgroup_root)
        bus = Systemd()
        try:
            for uid in sorted(uids):
                for tier in ("", "burstable-", "besteffort-"):  # the QoS is not recorded: try each
                    pod_slice = f"{root}-{tier}pod{escape(uid)}.slice"
                    for unit in (scope_for(pod_slice), pod_slice):
                        if await bus.unit_state(unit) == "active":
                            await bus.stop_unit(unit)
                            self.done(f"stopped systemd unit {unit}")
        except SystemdError as exc:
            self.error(f"cannot stop the Pods' systemd units: {exc}")
        finally:
            await bus.close()

    def mounts(self) -> None:
        if not self.state_dir.is_dir():
            return
        for point in mounts_under(self.state_dir):
            try:
                _unmount(point)
                self.done(f"unmounted {point}")
            except OSError as exc:
                self.error(str(exc))

    async def network(self) -> None:
        user = bridge_user(self.targets.bridge)
        deadline = time.monotonic() + HELPER_EXIT_WAIT
        while user is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            user = bridge_user(self.targets.bridge)
        if user is not None:
            self.error(
                f"kept the Pod network of bridge {self.targets.bridge}: a running agent's network helper (pid {user}) "
                "uses it (an agent with the same node name on another state dir?); stop that agent first"
            )
            return
        try:
            lines = await remove_node_network(self.state_dir, self.targets.node_name, self.targets.bridge)
        except Exception as exc:  # netlink, iptables, a broken state file: say so, go on with the rest
            self.error(f"cannot remove the Pod network of bridge {self.targets.bridge}: {exc}")
            return
        for line in lines:
            self.done(f"removed {line}")

    def state(self) -> None:
        if not self.state_dir.is_dir():
            return
        left = mounts_under(self.state_dir)
        for entry in sorted(self.state_dir.iterdir()):
            if entry.name in KEEP and not self.remove_all:
                continue
            if entry.name == state_lock.PID_FILE:
                continue  # last: it is our lock meanwhile
            if any(p == str(entry) or p.startswith(f"{entry}/") for p in left):
                self.error(f"kept {entry}: something is still mounted below it")
                continue
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                self.done(f"removed {entry}")
            except OSError as exc:
                self.error(f"cannot remove {entry}: {exc}")


async def stop_agent(state_dir: Path, pid: int, say: Callable[[str], None]) -> bool:
    """SIGTERM the agent holding the state dir, SIGKILL after AGENT_STOP_TIMEOUT; True when it let go."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + AGENT_STOP_TIMEOUT
    while state_lock.holder(state_dir) is not None:
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.5)
            break
        await asyncio.sleep(0.1)
    if state_lock.holder(state_dir) is not None:
        return False
    say(f"stopped agent {pid}")
    return True


async def reset(
    state_dir: Path,
    config: AgentConfig | None = None,
    node_name: str | None = None,
    default_node: str = "",
    force: bool = False,
    remove_all: bool = False,
    say: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
) -> int:
    """0 when everything of the state dir's agent is gone from the host (or was already), 1 when
    something could not be removed, 2 when an agent still runs there (and not `force`)."""
    state_dir = Path(state_dir).absolute()
    lock_fd = None
    if state_dir.is_dir():
        pid = state_lock.holder(state_dir)
        if pid is not None:
            if not force:
                warn(
                    f"an agent (pid {pid}) is running with state dir {state_dir}: stop it first "
                    "(delete its Pods, then SIGTERM), or pass --force to stop it and reset anyway"
                )
                return 2
            if not pid or not await stop_agent(state_dir, pid, say):
                warn(f"the agent (pid {pid}) holding {state_dir} did not stop")
                return 2
        try:
            lock_fd = state_lock.acquire(state_dir)
        except state_lock.StateDirBusyError as exc:
            warn(str(exc))
            return 2
        except OSError:
            lock_fd = None  # a read-only state dir: reset what can be reset
    targets = resolve_targets(state_dir, config, node_name, default_node)
    job = Reset(state_dir, targets, say=say, warn=warn, remove_all=remove_all)
    try:
        await job.run()
    finally:
        if lock_fd is not None:
            (state_dir / state_lock.PID_FILE).unlink(missing_ok=True)
            os.close(lock_fd)
    if remove_all and state_dir.is_dir() and not job.errors:
        with contextlib.suppress(OSError):
            state_dir.rmdir()
            job.done(f"removed {state_dir}")
    if job.removed == 0 and not job.errors:
        say(f"nothing to remove for state dir {state_dir} (node {targets.node_name}, bridge {targets.bridge})")
    return 1 if job.errors else 0
