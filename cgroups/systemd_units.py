"""The systemd cgroup driver's pure half: unit names and the unit properties sent over D-Bus.

The kubelet's systemd driver (pkg/kubelet/cm/cgroup_manager_linux.go) hands each QoS and Pod
cgroup to runc's libcontainer systemd manager as a transient slice: Apply(-1) starts it with
Description, Wants=<parent slice>, the four *Accounting=yes and DefaultDependencies=no, and Set()
sends the resources with SetUnitProperties: CPUWeight (v2) or CPUShares (v1), CPUQuotaPerSecUSec
(plus CPUQuotaPeriodUSec on systemd >= 242), MemoryMax (v2) or MemoryLimit (v1) and TasksMax.
systemd itself gives a slice Requires= and After= on its parent slice.

Slices cannot be delegated (systemd's cgroup delegation rules), so the containers of a Pod live in
one transient scope per Pod under the Pod's slice, with Delegate=yes, as runc's scopes do: the
agent owns the cgroups below that scope and systemd owns everything above.

A property is (name, D-Bus signature, value); cgroups/systemd_bus.py wraps them into variants.
"""

from __future__ import annotations

from typing import Any

from cgroups.resources import QUOTA_PERIOD, ResourceConfig

Property = tuple[str, str, Any]

# systemd's USEC_INFINITY / CGROUP_LIMIT_MAX: "no limit" for quota, memory and tasks.
INFINITY = 2**64 - 1
# CPUQuotaPeriodUSec= exists since systemd 242; older ones keep the kernel's 100 ms period.
QUOTA_PERIOD_SINCE = 242
# systemd keeps CPUQuota as a percentage of one CPU, so a quota is rounded up to 10 ms per second.
_QUOTA_STEP = 10_000
_SCOPE_SUFFIX = "-containers.scope"


def escape(part: str) -> str:
    """A cgroup name part as the kubelet puts it into a slice name: "-" means nesting, so "_"."""
    return part.replace("-", "_")


def expand_slice(unit: str) -> str:
    """ "a-b-c.slice" -> "a.slice/a-b.slice/a-b-c.slice", its cgroup path (runc's ExpandSlice)."""
    stem = unit.removesuffix(".slice")
    if not unit.endswith(".slice") or "/" in unit or not stem:
        raise ValueError(f"invalid slice name {unit!r}: want e.g. 'kubepods-burstable.slice'")
    parts = stem.split("-")
    if "" in parts:
        raise ValueError(f"invalid slice name {unit!r}: empty part between dashes")
    return "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def parent_slice(unit: str) -> str:
    """The slice a slice sits in: "kubepods-burstable.slice" -> "kubepods.slice", top level "-.slice"."""
    stem = unit.removesuffix(".slice")
    return f"{stem.rsplit('-', 1)[0]}.slice" if "-" in stem else "-.slice"


def slice_of_path(relative: str) -> str:
    """The unit of a slice cgroup path: "kubepods.slice/kubepods-pod1.slice" -> "kubepods-pod1.slice"."""
    unit = relative.rstrip("/").rsplit("/", 1)[-1]
    if not unit.endswith(".slice") or expand_slice(unit) != relative.strip("/"):
        raise ValueError(f"cgroup path {relative!r} is not a slice path like 'kubepods.slice/kubepods-pod<uid>.slice'")
    return unit


def scope_for(pod_slice: str) -> str:
    """The delegated scope that holds a Pod's container cgroups: "<pod slice stem>-containers.scope"."""
    return pod_slice.removesuffix(".slice") + _SCOPE_SUFFIX


def _accounting(cgroup_version: int) -> list[Property]:
    # Always on, as runc does: the controllers are then enabled down to the unit.
    io = "IOAccounting" if cgroup_version == 2 else "BlockIOAccounting"
    return [(name, "b", True) for name in ("MemoryAccounting", "CPUAccounting", io, "TasksAccounting")]


def slice_properties(unit: str, description: str, cgroup_version: int) -> list[Property]:
    """What a transient slice starts with (no resources: those come with resource_properties)."""
    return [
        ("Description", "s", description),
        ("Wants", "as", [parent_slice(unit)]),
        *_accounting(cgroup_version),
        ("DefaultDependencies", "b", False),
    ]


def scope_properties(pod_slice: str, description: str, pid: int, cgroup_version: int) -> list[Property]:
    """The Pod's container scope: in the Pod's slice, delegated, started around one process."""
    return [
        ("Description", "s", description),
        ("Slice", "s", pod_slice),
        ("Delegate", "b", True),
        ("PIDs", "au", [pid]),
        *_accounting(cgroup_version),
        ("DefaultDependencies", "b", False),
    ]


def quota_per_sec(quota: int | None, period: int | None) -> int:
    """CFS quota (us per period) as CPUQuotaPerSecUSec, rounded up to 10 ms; None -> infinity."""
    if quota is None or quota <= 0:
        return INFINITY
    per_sec = quota * 1_000_000 // (period or QUOTA_PERIOD)
    return -(-per_sec // _QUOTA_STEP) * _QUOTA_STEP


def resource_properties(config: ResourceConfig, cgroup_version: int, systemd_version: int) -> list[Property]:
    """A ResourceConfig as unit properties. Unset limits are sent as infinity, so that an update
    (in-place resize) that drops a limit drops it in systemd too; an unset weight is left alone."""
    props: list[Property] = []
    if config.cpu_shares is not None:
        if cgroup_version == 2:
            props.append(("CPUWeight", "t", config.cpu_weight))
        else:
            props.append(("CPUShares", "t", config.cpu_shares))
    if config.cpu_quota is not None and systemd_version >= QUOTA_PERIOD_SINCE:
        props.append(("CPUQuotaPeriodUSec", "t", config.cpu_period or QUOTA_PERIOD))
    props.append(("CPUQuotaPerSecUSec", "t", quota_per_sec(config.cpu_quota, config.cpu_period)))
    memory = INFINITY if config.memory_limit is None else config.memory_limit
    props.append(("MemoryMax" if cgroup_version == 2 else "MemoryLimit", "t", memory))
    props.append(("TasksMax", "t", INFINITY if config.pids_limit is None else config.pids_limit))
    return props


def parse_version(text: str) -> int:
    """systemd's Version property ("252.38-1~deb12u1", "v245.4-1.fc32") -> 252; -1 if unreadable."""
    digits = ""
    for char in text.strip().strip('"').lstrip("v"):
        if not char.isdigit():
            break
        digits += char
    return int(digits) if digits else -1
