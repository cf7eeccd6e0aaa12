"""`kubelet-emu cgroups`: the limits in force for each Pod's cgroup, beside the breakdown behind them.

Reads only the state dir (the `pods/*/pod.json` records the process backend writes when it creates a
Pod's cgroup) and the cgroup files, so it works with or without a running agent. The arithmetic is
cgroups/resources.py's: this module only lays it out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cgroups.detect import CgroupError
from cgroups.manager import CgroupManager, v1_settings, v2_settings
from cgroups.resources import pod_level_values, pod_limits, pod_requests, pod_resource_config, qos_class

RESOURCES = ("cpu", "memory")
# The files shown, in order; the CFS pair is one line on v1 as it is one file (cpu.max) on v2.
V1_FILES = ("cpu.shares", "cpu.cfs_quota_us", "cpu.cfs_period_us", "memory.limit_in_bytes", "pids.max")
V2_FILES = ("cpu.weight", "cpu.max", "memory.max", "pids.max")
_MEMORY_FILES = ("memory.limit_in_bytes", "memory.max")
# cgroup v1 shows an unlimited memory.limit_in_bytes as a huge page-aligned number, not -1.
_V1_UNLIMITED_MEMORY = 2**62
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# --- the breakdown (pure) ----------------------------------------------------------------------


def _cpu_memory(values: Mapping[str, int]) -> dict[str, int | None]:
    return {name: values.get(name) for name in RESOURCES}


def _own(container: Mapping[str, Any]) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """One container's (requests, limits), requests defaulted to limits as the API server does."""
    alone = {"spec": {"containers": [container]}}
    return _cpu_memory(pod_requests(alone)), _cpu_memory(pod_limits(alone))


def breakdown(pod: Mapping[str, Any], pod_pids_limit: int = -1) -> dict[str, Any]:
    """Per-container requests/limits, overhead, pod totals, QoS and the Pod cgroup values they give.

    cpu in millicores, memory in bytes, None when unset. `expected` holds the file values for
    both cgroup versions (as written: "-1"/"max" mean unlimited).
    """
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    containers = []
    for kind, items in (("init", spec.get("initContainers") or []), ("app", spec.get("containers") or [])):
        for container in items:
            requests, limits = _own(container)
            containers.append(
                {
                    "name": container.get("name", ""),
                    "init": kind == "init",
                    "sidecar": kind == "init" and container.get("restartPolicy") == "Always",
                    "requests": requests,
                    "limits": limits,
                }
            )
    overhead = _cpu_memory(pod_requests({"spec": {"overhead": spec.get("overhead") or {}}}))
    level_requests, level_limits = pod_level_values(pod)
    # spec.resources: replaces the containers' sum for the resources it sets (overhead still added).
    pod_level = (
        {"requests": _cpu_memory(level_requests), "limits": _cpu_memory(level_limits)}
        if level_requests or level_limits
        else None
    )
    config = pod_resource_config(pod, pod_pids_limit)
    totals = {"requests": _cpu_memory(pod_requests(pod)), "limits": _cpu_memory(pod_limits(pod))}
    return {
        "namespace": meta.get("namespace", ""),
        "name": meta.get("name", ""),
        "uid": meta.get("uid", ""),
        "qos": qos_class(pod),
        "containers": containers,
        "overhead": overhead,
        "pod_level": pod_level,
        "totals": totals,
        "resource_config": {**asdict(config), "cpu_weight": config.cpu_weight},
        "expected": {"v1": v1_settings(config), "v2": v2_settings(config)},
        "notes": _uncapped_notes(containers, totals["limits"], config.cpu_quota, config.memory_limit),
    }


def _uncapped_notes(
    containers: list[dict[str, Any]], limits: Mapping[str, int | None], quota: int | None, memory: int | None
) -> list[str]:
    """Why a limit some containers declare is not on the Pod cgroup: one container may run unbounded."""
    notes = []
    for resource, applied in (("cpu", quota), ("memory", memory)):
        if applied is not None or not limits.get(resource):
            continue
        unlimited = [c["name"] for c in containers if not c["limits"][resource]]
        who = ", ".join(unlimited) if unlimited else "a container"
        notes.append(f"no Pod {resource} limit: {who} set{'s' if len(unlimited) <= 1 else ''} no {resource} limit")
    return notes


# --- live values -------------------------------------------------------------------------------


def _number(value: str | None, name: str) -> int | str | None:
    """A file value for comparison: an int, or "max" for every spelling of unlimited."""
    if value is None:
        return None
    text = value.strip()
    if text in ("max", "-1"):
        return "max"
    try:
        number = int(text)
    except ValueError:
        return text
    if name == "memory.limit_in_bytes" and number >= _V1_UNLIMITED_MEMORY:
        return "max"
    return number


def _same(name: str, live: str | None, expected: str) -> bool:
    if live is None:
        return expected in ("max", "-1")  # an absent file (no pids hierarchy) limits nothing
    if name == "cpu.max":
        live_parts, expected_parts = live.split(), expected.split()
        return len(live_parts) == len(expected_parts) and all(
            _number(a, name) == _number(b, name) for a, b in zip(live_parts, expected_parts, strict=True)
        )
    got, want = _number(live, name), _number(expected, name)
    if name in _MEMORY_FILES and isinstance(got, int) and isinstance(want, int):
        return got == want - want % _PAGE_SIZE  # the kernel rounds memory limits down to a page
    return got == want


def _display_path(manager: CgroupManager, relative: str) -> str:
    hierarchy = "unified" if manager.mode.version == 2 else "memory"
    mount = manager.mode.mounts.get(hierarchy)
    return os.path.join(mount, relative) if mount else relative


def _dir_identity(directory: str) -> dict[str, str]:
    # <ns>_<pod>_<uid>: none of the three may contain "_".
    parts = directory.split("_")
    if len(parts) == 3:
        return {"namespace": parts[0], "name": parts[1], "uid": parts[2]}
    return {"namespace": "", "name": directory, "uid": ""}


def _report(record_file: Path, manager: CgroupManager, pod_pids_limit: int) -> dict[str, Any]:
    try:
        record = json.loads(record_file.read_text())
        pod, relative = record["pod"], record["cgroup"]
        report = breakdown(pod, pod_pids_limit)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return {
            **_dir_identity(record_file.parent.name),
            "file": str(record_file),
            "error": f"cannot read {record_file}: {exc}",
        }
    version = manager.mode.version
    report.update(
        file=str(record_file),
        handler=record.get("handler"),
        backend=record.get("backend"),
        cgroup=relative,
        cgroup_path=_display_path(manager, relative),
        units=manager.unit_names(relative),  # systemd driver: the Pod's slice and container scope
        cgroup_version=version,
        values=None,
        differs=[],
    )
    try:
        if not all(os.path.isdir(path) for path in manager.absolute_paths(relative)):
            report["notes"].append("cgroup gone")
            return report
        values = manager.read_values(relative)
    except (CgroupError, ValueError) as exc:
        report["notes"].append(f"cannot read the cgroup: {exc}")
        return report
    expected = report["expected"][f"v{version}"]
    report["values"] = values
    report["differs"] = [name for name, want in expected.items() if not _same(name, values.get(name), want)]
    return report


def collect(
    state_dir: str | os.PathLike[str],
    manager: CgroupManager,
    only: str | None = None,
    pod_pids_limit: int = -1,
) -> list[dict[str, Any]]:
    """One report per `<state_dir>/pods/*/pod.json`, sorted by namespace/name; `only` = "NAMESPACE/POD".

    Raises FileNotFoundError when the state dir does not exist; a state dir without pods/ has no Pods.
    """
    state = Path(state_dir)
    if not state.is_dir():
        raise FileNotFoundError(f"state dir {state} does not exist")
    pods = state / "pods"
    records = sorted(pods.glob("*/pod.json")) if pods.is_dir() else []
    reports = [_report(record, manager, pod_pids_limit) for record in records]
    if only is not None:
        reports = [r for r in reports if pod_key(r) == only]
    return sorted(reports, key=lambda r: (r["namespace"], r["name"], r["uid"]))


def pod_key(report: Mapping[str, Any]) -> str:
    return f"{report['namespace']}/{report['name']}"


# --- text --------------------------------------------------------------------------------------

_BINARY = (("Ei", 2**60), ("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10))
_DECIMAL = (("E", 10**18), ("P", 10**15), ("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3))


def format_cpu(millis: int | None) -> str:
    """250 -> "250m", 2000 -> "2", None -> "-"."""
    if millis is None:
        return "-"
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def format_bytes(value: int | None) -> str:
    """As a Quantity would print it when exact (120Mi, 100M), else bytes; None -> "-"."""
    if value is None:
        return "-"
    for table in (_BINARY, _DECIMAL):
        for suffix, size in table:
            if value and value % size == 0:
                return f"{value // size}{suffix}"
    return str(value)


def _approx_bytes(value: int) -> str:
    exact = format_bytes(value)
    if exact != str(value):
        return exact
    for suffix, size in _BINARY:
        if value >= size:
            return f"~{value / size:.1f}{suffix}"
    return f"{value}B"


def format_value(name: str, value: str | None) -> str:
    """A file value with its meaning: "335544320 (320Mi)", "225000 100000 (2250m)", "-1 (unlimited)"."""
    if value is None:
        return "(missing)"
    parsed = _number(value, name)
    if parsed == "max" and value.strip() != "max":
        return f"{value} (unlimited)"
    if name in _MEMORY_FILES and isinstance(parsed, int):
        return f"{value} ({_approx_bytes(parsed)})"
    if name == "cpu.max":
        fields = value.split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit() and int(fields[1]) > 0:
            return f"{value} ({format_cpu(-(-int(fields[0]) * 1000 // int(fields[1])))})"
    return value


def format_cfs(values: Mapping[str, str | None]) -> str | None:
    quota, period = values.get("cpu.cfs_quota_us"), values.get("cpu.cfs_period_us")
    if quota is None and period is None:
        return None
    text = f"{quota or '?'}/{period or '?'}"
    q, p = _number(quota, "cpu.cfs_quota_us"), _number(period, "cpu.cfs_period_us")
    if q == "max":
        return f"{text} (unlimited)"
    if isinstance(q, int) and isinstance(p, int) and p > 0:
        return f"{text} ({format_cpu(-(-q * 1000 // p))})"
    return text


def _table(rows: Iterable[list[str]], indent: str = "  ") -> list[str]:
    rows = list(rows)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _resource_row(label: str, requests: Mapping[str, Any], limits: Mapping[str, Any]) -> list[str]:
    return [
        label,
        format_cpu(requests.get("cpu")),
        format_cpu(limits.get("cpu")),
        format_bytes(requests.get("memory")),
        format_bytes(limits.get("memory")),
    ]


def _value_rows(report: Mapping[str, Any]) -> list[list[str]]:
    version = report["cgroup_version"]
    expected: Mapping[str, str] = report["expected"][f"v{version}"]
    values: Mapping[str, str] | None = report["values"]
    differs = set(report["differs"])
    live_of = (lambda name: "(cgroup gone)") if values is None else (lambda name: format_value(name, values.get(name)))
    rows = [["FILE", "IN FORCE", "EXPECTED", ""]]
    names: list[tuple[str, tuple[str, ...]]]
    if version == 2:
        names = [(name, (name,)) for name in V2_FILES]
    else:
        names = [
            ("cpu.shares", ("cpu.shares",)),
            ("cpu.cfs_quota_us/cpu.cfs_period_us", ("cpu.cfs_quota_us", "cpu.cfs_period_us")),
            ("memory.limit_in_bytes", ("memory.limit_in_bytes",)),
            ("pids.max", ("pids.max",)),
        ]
    for label, files in names:
        if len(files) == 2:
            live = "(cgroup gone)" if values is None else (format_cfs(values) or "(missing)")
            want = format_cfs(expected) or "-"
        else:
            live, want = live_of(files[0]), format_value(files[0], expected.get(files[0]))
        marker = "<- differs" if differs.intersection(files) else ""
        rows.append([label, live, want, marker])
    return rows


def format_table(reports: Iterable[Mapping[str, Any]]) -> str:
    """A text block per Pod: header, containers, overhead, total, then each cgroup file beside its expected value."""
    blocks = []
    for report in reports:
        if "error" in report:
            blocks.append(f"{pod_key(report)}  error: {report['error']}")
            continue
        lines = [
            f"{pod_key(report)}  handler={report.get('handler')}  qos={report['qos']}  cgroup={report['cgroup_path']}"
        ]
        if report.get("units"):
            lines.append("  units: " + "  ".join(report["units"]))
        rows = [["CONTAINER", "CPU REQ", "CPU LIM", "MEM REQ", "MEM LIM"]]
        for c in report["containers"]:
            label = c["name"] + (" (sidecar)" if c["sidecar"] else " (init)" if c["init"] else "")
            rows.append(_resource_row(label, c["requests"], c["limits"]))
        totals = report["totals"]
        if report.get("pod_level"):
            rows.append(
                _resource_row(
                    "pod-level (spec.resources)", report["pod_level"]["requests"], report["pod_level"]["limits"]
                )
            )
        # Overhead is added to a limit only where the containers' limits add up to one.
        overhead = report["overhead"]
        overhead_limits = {r: overhead[r] if totals["limits"].get(r) else None for r in RESOURCES}
        rows.append(_resource_row("overhead", overhead, overhead_limits))
        rows.append(_resource_row("total", totals["requests"], totals["limits"]))
        lines += _table(rows)
        lines += _table(_value_rows(report))
        lines += [f"  note: {note}" for note in report["notes"]]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
