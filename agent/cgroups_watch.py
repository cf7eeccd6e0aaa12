"""`kubelet-emu cgroups --watch`: the values in force in each Pod's cgroup and its containers'
cgroups, printed again, with a timestamp, whenever one changes (an in-place resize as it happens).

A poll of the cgroup files (they offer no change notification); the Pods and containers come
from the same `pods/*/pod.json` records as `kubelet-emu cgroups`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.cgroups_report import format_cfs, format_value
from cgroups.detect import CgroupError
from cgroups.manager import CgroupManager

POD = "(pod)"  # the Pod cgroup's label; containers are labelled by name


def values_line(values: Mapping[str, str], version: int) -> str:
    """The files in force, each with its meaning: `cpu.shares=1280 cfs=125000/100000 (1250m) ...`."""
    if version == 2:
        names = ("cpu.weight", "cpu.max", "memory.max", "pids.max")
        return " ".join(f"{n}={format_value(n, values.get(n))}" for n in names if n in values)
    parts = [f"cpu.shares={values.get('cpu.shares', '(missing)')}"]
    parts.append(f"cfs={format_cfs(values) or '(missing)'}")
    parts.append(f"memory={format_value('memory.limit_in_bytes', values.get('memory.limit_in_bytes'))}")
    return " ".join(parts)


def _cgroups_of(record: Mapping[str, Any], manager: CgroupManager) -> Iterable[tuple[str, str]]:
    pod = record["pod"]
    yield POD, record["cgroup"]
    spec = pod.get("spec") or {}
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        yield container["name"], manager.container_path(pod, container["name"])


def snapshot(state_dir: str | os.PathLike[str], manager: CgroupManager, only: str | None = None) -> dict[str, str]:
    """{"NAMESPACE/POD CGROUP": values in force} for every Pod cgroup and container cgroup there is."""
    out: dict[str, str] = {}
    for record_file in sorted((Path(state_dir) / "pods").glob("*/pod.json")):
        try:
            record = json.loads(record_file.read_text())
            meta = record["pod"]["metadata"]
            key = f"{meta.get('namespace')}/{meta.get('name')}"
            cgroups = list(_cgroups_of(record, manager))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written or removed: the next poll sees it
        if only is not None and key != only:
            continue
        for label, relative in cgroups:
            try:
                if all(os.path.isdir(p) for p in manager.absolute_paths(relative)):
                    out[f"{key} {label}"] = values_line(manager.read_values(relative), manager.mode.version)
            except (CgroupError, OSError, ValueError):
                continue
    return out


def changes(before: Mapping[str, str], after: Mapping[str, str], stamp: str) -> list[str]:
    """One line per cgroup that appeared, changed or went away between two snapshots."""
    lines = [f"{stamp}  {key}  {value}" for key, value in after.items() if before.get(key) != value]
    lines += [f"{stamp}  {key}  (gone)" for key in before if key not in after]
    return lines


def watch(
    state_dir: str | os.PathLike[str],
    manager: CgroupManager,
    only: str | None = None,
    interval: float = 0.1,
    emit: Callable[[str], None] = print,
    polls: int | None = None,
) -> None:
    """Print every cgroup's values, then each change, until interrupted (or after `polls` polls)."""
    seen: dict[str, str] = {}
    done = 0
    while polls is None or done < polls:
        current = snapshot(state_dir, manager, only)
        stamp = datetime.now().astimezone().strftime("%H:%M:%S.%f")[:-3]
        for line in changes(seen, current, stamp):
            emit(line)
        seen = current
        done += 1
        time.sleep(interval)
