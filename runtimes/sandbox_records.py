"""The on-disk records of the backends that keep Pods in <state>/pods (process, oci), and the
removal of what a Pod left behind, given only such a record.

Each Pod directory gets an `owner.json` before anything else of the Pod exists (cgroup, network,
processes), and it stays until the directory is purged: so whatever a crash or a deletion while
the agent was down leaves behind is found again and can be removed without the Pod object.

    owner.json  {"uid", "namespace", "name", "backend", "handler", "cgroup"}

Container state files (written by the shims, runtimes/process/shim.py and runtimes/oci/shim.py) name the
processes to stop: `pid`/`start_ticks` (the container's process group leader) and
`shim_pid`/`shim_start_ticks`. A pid is only signalled while its start time still matches, so a
recycled pid is never hit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

from runtimes.base import SandboxRecord
from runtimes.shimlib import proc_start_ticks

OWNER_FILE = "owner.json"
LEGACY_RECORD = "pod.json"  # written by create_sandbox since the first releases; removed with the sandbox
_RESTART_DIR = re.compile(r"^\d+$")


def write_owner(pod_dir: Path, pod: dict[str, Any], backend: str, handler: str, cgroup: str | None) -> None:
    """Record who owns `pod_dir`, atomically, before the sandbox takes anything else."""
    meta = pod["metadata"]
    record = {
        "uid": meta["uid"],
        "namespace": meta.get("namespace", ""),
        "name": meta.get("name", ""),
        "backend": backend,
        "handler": handler,
        "cgroup": cgroup,
    }
    pod_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # what lies below can hold Secret values
    path = pod_dir / OWNER_FILE
    if path.exists():
        return
    tmp = pod_dir / f".{OWNER_FILE}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_owner(pod_dir: Path) -> dict[str, Any] | None:
    """The owner record of a Pod directory: owner.json, else (directories made before it existed)
    what pod.json says."""
    owner = _read_json(pod_dir / OWNER_FILE)
    if owner is not None:
        return owner
    legacy = _read_json(pod_dir / LEGACY_RECORD)
    if legacy is None:
        return None
    meta = (legacy.get("pod") or {}).get("metadata") or {}
    if not meta.get("uid"):
        return None
    return {
        "uid": meta["uid"],
        "namespace": meta.get("namespace", ""),
        "name": meta.get("name", ""),
        "backend": legacy.get("backend"),
        "handler": legacy.get("handler"),
        "cgroup": legacy.get("cgroup"),
    }


def scan(pods_dir: Path, backend: str, handler: str) -> list[SandboxRecord]:
    """The Pod directories under `pods_dir` that belong to `handler` of `backend` (blocking: run
    it in a thread)."""
    records = []
    try:
        entries = list(os.scandir(pods_dir))
    except OSError:
        return []
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        owner = read_owner(Path(entry.path))
        if owner is None or owner.get("backend") != backend or owner.get("handler") != handler:
            continue
        records.append(
            SandboxRecord(
                pod_uid=owner["uid"],
                namespace=owner.get("namespace", ""),
                name=owner.get("name", ""),
                handler=handler,
                path=entry.path,
                cgroup=owner.get("cgroup"),
            )
        )
    return records


def recorded_containers(pod_dir: Path) -> dict[str, int]:
    """Container name -> highest restart count with a state directory (<name>/<n>/)."""
    found: dict[str, int] = {}
    try:
        containers = list(os.scandir(pod_dir))
    except OSError:
        return {}
    for entry in containers:
        if not entry.is_dir(follow_symlinks=False) or entry.name in ("etc", "shm", "volumes"):
            continue
        with contextlib.suppress(OSError):
            counts = [int(run.name) for run in os.scandir(entry.path) if run.is_dir() and _RESTART_DIR.match(run.name)]
            if counts:
                found[entry.name] = max(counts)
    return found


def _alive(pid: Any, ticks: Any) -> bool:
    if not isinstance(pid, int) or pid <= 1:
        return False
    try:
        return proc_start_ticks(pid) == ticks
    except (OSError, ValueError, IndexError):
        return False


def kill_recorded_processes(pod_dir: Path) -> int:
    """SIGKILL every container process group and shim the state files under `pod_dir` name and
    that still run; returns how many were signalled (blocking)."""
    killed = 0
    for state_name in ("state.json", "agent.json"):
        for path in pod_dir.glob(f"*/*/{state_name}"):
            state = _read_json(path) or {}
            if _alive(state.get("pid"), state.get("start_ticks")):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(state["pid"], signal.SIGKILL)
                    killed += 1
            if _alive(state.get("shim_pid"), state.get("shim_start_ticks")):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(state["shim_pid"], signal.SIGKILL)
                    killed += 1
    return killed


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` (from /proc/self/mountinfo)."""
    top = os.path.realpath(path)
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                point = fields[4].replace("\\040", " ")
                if point == top or point.startswith(top + "/"):
                    found.append(point)
    return found


def remove_pod_dir(pod_dir: Path) -> bool:
    """Delete the Pod directory, unless something is still mounted inside (a volume or a rootfs
    whose removal failed): deleting through a bind mount would delete the host's files. Returns
    whether the directory is gone."""
    if not pod_dir.exists():
        return True
    if mounts_under(pod_dir):
        return False
    shutil.rmtree(pod_dir, ignore_errors=True)
    return not pod_dir.exists()
