"""Pod and container cgroup settings, computed the way the kubelet does.

Mirrors pkg/kubelet/cm/helpers_linux.go (ResourceConfigForPod, MilliCPUToShares,
MilliCPUToQuota, CpuSharesToCpuWeight), component-helpers resource/helpers.go
(PodRequests, PodLimits) and pkg/apis/core/v1/helper/qos (GetPodQOS).
Pods are plain dicts as the API server serves them (camelCase keys).
Pod-level resources (spec.resources, PodLevelResources gate, on by default since 1.34) replace
the containers' aggregate for cpu and memory (IsSupportedPodLevelResource), before overhead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

GUARANTEED = "Guaranteed"
BURSTABLE = "Burstable"
BEST_EFFORT = "BestEffort"

MIN_SHARES = 2
MAX_SHARES = 262144
SHARES_PER_CPU = 1024
MILLI_CPU_TO_CPU = 1000
QUOTA_PERIOD = 100000  # us
MIN_QUOTA_PERIOD = 1000  # us
MAX_WEIGHT = 10000

# Only these count for QoS, exactly as upstream (hugepages, ephemeral-storage are ignored).
_QOS_RESOURCES = ("cpu", "memory")
# What spec.resources may set (component-helpers IsSupportedPodLevelResource; hugepages aside).
POD_LEVEL_RESOURCES = ("cpu", "memory")

Resources = dict[str, Fraction]  # exact quantities in base units (cores, bytes, ...)


# --- quantities --------------------------------------------------------------
# kubernetes_asyncio (36.x) ships no utils.quantity, so parse here. Exact
# fractions keep sums exact; rounding up happens once at the end, like
# Quantity.MilliValue()/Value() do on the summed quantity.

_SUFFIXES = {
    "": Fraction(1),
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 10**3),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
    "Ki": Fraction(2**10),
    "Mi": Fraction(2**20),
    "Gi": Fraction(2**30),
    "Ti": Fraction(2**40),
    "Pi": Fraction(2**50),
    "Ei": Fraction(2**60),
}
_QUANTITY_RE = re.compile(r"([+-]?)(\d*)(?:\.(\d*))?(.*)")
_EXPONENT_RE = re.compile(r"[eE]([+-]?\d+)")


def _parse_quantity(value: Any) -> Fraction:
    """Parse a Kubernetes quantity ("250m", "1Gi", "0.5", "1e3") exactly."""
    if isinstance(value, bool):
        raise ValueError(f"invalid quantity: {value!r}")
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        return Fraction(str(value))  # str() avoids binary-float noise
    if not isinstance(value, str):
        raise ValueError(f"invalid quantity: {value!r}")
    match = _QUANTITY_RE.fullmatch(value.strip())
    if not match or not (match[2] or match[3]):
        raise ValueError(f"invalid quantity: {value!r}")
    sign, whole, frac, suffix = match.groups()
    frac = frac or ""
    number = Fraction(int(whole or "0") * 10 ** len(frac) + int(frac or "0"), 10 ** len(frac))
    if suffix in _SUFFIXES:  # checked first so a bare "E" means exa, not an exponent
        number *= _SUFFIXES[suffix]
    elif exp := _EXPONENT_RE.fullmatch(suffix):
        number *= Fraction(10) ** int(exp[1])
    else:
        raise ValueError(f"invalid quantity: {value!r}")
    return -number if sign == "-" else number


def _parse_list(resources: Mapping[str, Any] | None) -> Resources:
    return {name: _parse_quantity(q) for name, q in (resources or {}).items()}


def _container_resources(container: Mapping[str, Any]) -> tuple[Resources, Resources]:
    """(requests, limits) of one container, requests defaulted to limits.

    The API server does this defaulting on create; repeating it keeps raw dicts correct.
    """
    resources = container.get("resources") or {}
    limits = _parse_list(resources.get("limits"))
    requests = _parse_list(resources.get("requests"))
    for name, quantity in limits.items():
        requests.setdefault(name, quantity)
    return requests, limits


def _to_ints(resources: Resources) -> dict[str, int]:
    # cpu is reported in millicores; everything else in its base unit. Round up like Quantity does.
    return {name: math.ceil(q * MILLI_CPU_TO_CPU) if name == "cpu" else math.ceil(q) for name, q in resources.items()}


def _add(total: Resources, extra: Mapping[str, Fraction]) -> None:
    for name, quantity in extra.items():
        total[name] = total.get(name, Fraction(0)) + quantity


def _max_into(total: Resources, other: Mapping[str, Fraction]) -> None:
    for name, quantity in other.items():
        if name not in total or quantity > total[name]:
            total[name] = quantity


def _spec(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return pod.get("spec") or {}


def _is_sidecar(container: Mapping[str, Any]) -> bool:
    return container.get("restartPolicy") == "Always"


# --- pod totals --------------------------------------------------------------


def _aggregate(pod: Mapping[str, Any], index: int) -> tuple[Resources, list[Resources]]:
    """Sum/max of requests (index 0) or limits (index 1) over all containers.

    Also returns each container's effective list as upstream hands it to ContainerFn:
    app containers their own, sidecars the running sidecar total, regular init
    containers their own plus the sidecars started before them.
    """
    spec = _spec(pod)
    total: Resources = {}
    seen: list[Resources] = []
    for container in spec.get("containers") or []:
        own = _container_resources(container)[index]
        _add(total, own)
        seen.append(own)

    sidecars: Resources = {}
    init_peak: Resources = {}
    for container in spec.get("initContainers") or []:
        own = _container_resources(container)[index]
        if _is_sidecar(container):
            _add(total, own)  # keeps running next to the app containers
            _add(sidecars, own)
            in_use = dict(sidecars)
        else:
            in_use = dict(own)
            _add(in_use, sidecars)
        seen.append(in_use)
        _max_into(init_peak, in_use)

    # Init containers run before the app containers, so they need the max, not the sum.
    _max_into(total, init_peak)
    return total, seen


def pod_level(pod: Mapping[str, Any]) -> tuple[Resources, Resources]:
    """spec.resources (requests, limits), supported resources only; requests defaulted as the
    API server does (defaultPodRequests): to the limit when no container requests that resource."""
    resources = _spec(pod).get("resources") or {}
    requests = {n: q for n, q in _parse_list(resources.get("requests")).items() if n in POD_LEVEL_RESOURCES}
    limits = {n: q for n, q in _parse_list(resources.get("limits")).items() if n in POD_LEVEL_RESOURCES}
    if limits:
        containers = [*(_spec(pod).get("containers") or []), *(_spec(pod).get("initContainers") or [])]
        for name, quantity in limits.items():
            if name not in requests and not any(name in _container_resources(c)[0] for c in containers):
                requests[name] = quantity
    return requests, limits


def pod_level_values(pod: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, int]]:
    """pod_level() in reporting units (cpu millicores, memory bytes)."""
    requests, limits = pod_level(pod)
    return _to_ints(requests), _to_ints(limits)


def has_pod_level_resources(pod: Mapping[str, Any]) -> bool:
    """IsPodLevelResourcesSet: spec.resources sets a supported request or limit."""
    requests, limits = pod_level(pod)
    return bool(requests or limits)


def _overhead(pod: Mapping[str, Any]) -> Resources:
    return _parse_list(_spec(pod).get("overhead"))


def _pod_requests_exact(pod: Mapping[str, Any]) -> Resources:
    total, _ = _aggregate(pod, 0)
    total.update(pod_level(pod)[0])  # pod-level values replace the aggregate, overhead still on top
    _add(total, _overhead(pod))
    return total


def _pod_limits_exact(pod: Mapping[str, Any]) -> tuple[Resources, list[Resources]]:
    total, seen = _aggregate(pod, 1)
    total.update(pod_level(pod)[1])
    for name, quantity in _overhead(pod).items():
        # A zero/absent limit means "unlimited"; adding overhead would invent a limit.
        if total.get(name):
            total[name] += quantity
    return total, seen


def pod_requests(pod: Mapping[str, Any]) -> dict[str, int]:
    """PodRequests: cpu in millicores, memory in bytes, others in their own units."""
    return _to_ints(_pod_requests_exact(pod))


def pod_limits(pod: Mapping[str, Any]) -> dict[str, int]:
    """PodLimits: like pod_requests, overhead only added to non-zero limits."""
    return _to_ints(_pod_limits_exact(pod)[0])


# --- QoS ---------------------------------------------------------------------


def qos_class(pod: Mapping[str, Any]) -> str:
    """GetPodQOS: status.qosClass when the API server has set it, else computed."""
    status_qos = (pod.get("status") or {}).get("qosClass")
    if status_qos:
        return status_qos  # immutable once set, so the kubelet trusts it

    spec = _spec(pod)
    requests: Resources = {}
    limits: Resources = {}
    guaranteed = True
    if has_pod_level_resources(pod):
        # ComputePodQOS: the pod-level values alone decide when they are set.
        level_requests, level_limits = pod_level(pod)
        requests = {n: q for n, q in level_requests.items() if n in _QOS_RESOURCES and q > 0}
        limits = {n: q for n, q in level_limits.items() if n in _QOS_RESOURCES and q > 0}
        if level_limits and len(limits) != len(_QOS_RESOURCES):
            guaranteed = False
        if not requests and not limits:
            return BEST_EFFORT
        return GUARANTEED if guaranteed and requests == limits else BURSTABLE
    containers: Iterable[Mapping[str, Any]] = [
        *(spec.get("containers") or []),
        *(spec.get("initContainers") or []),
    ]
    for container in containers:
        reqs, lims = _container_resources(container)
        _add(requests, {n: reqs[n] for n in _QOS_RESOURCES if reqs.get(n, 0) > 0})
        limited = {n: lims[n] for n in _QOS_RESOURCES if lims.get(n, 0) > 0}
        _add(limits, limited)
        if len(limited) != len(_QOS_RESOURCES):
            guaranteed = False

    if not requests and not limits:
        return BEST_EFFORT
    # Upstream compares the pod-wide sums, not each container.
    if guaranteed and requests == limits:
        return GUARANTEED
    return BURSTABLE


# --- conversions -------------------------------------------------------------


def milli_cpu_to_shares(milli: int) -> int:
    """MilliCPUToShares: cgroup v1 cpu.shares, clamped to [2, 262144]."""
    if milli <= 0:
        return MIN_SHARES  # kernel minimum; unset would mean 1024
    return max(MIN_SHARES, min(MAX_SHARES, milli * SHARES_PER_CPU // MILLI_CPU_TO_CPU))


def milli_cpu_to_quota(milli: int, period: int = QUOTA_PERIOD) -> int:
    """MilliCPUToQuota: CFS quota in us; 0 for no limit, else at least 1000 us."""
    if milli <= 0:
        return 0
    return max(MIN_QUOTA_PERIOD, milli * period // MILLI_CPU_TO_CPU)


def shares_to_weight(shares: int) -> int:
    """CpuSharesToCpuWeight: map [2, 262144] linearly onto cgroup v2 [1, 10000]."""
    if shares >= MAX_SHARES:
        return MAX_WEIGHT
    shares = max(shares, MIN_SHARES)
    return 1 + ((shares - MIN_SHARES) * 9999) // (MAX_SHARES - MIN_SHARES)


# --- cgroup settings ---------------------------------------------------------


@dataclass(frozen=True)
class ResourceConfig:
    """What goes into a cgroup; None means leave unset / unlimited."""

    cpu_shares: int | None = None
    cpu_quota: int | None = None  # us; None = no CFS limit
    cpu_period: int | None = None  # us; set together with cpu_quota
    memory_limit: int | None = None  # bytes
    pids_limit: int | None = None
    # memory.swap.max (v2 only); None leaves the file alone. The kubelet's NoSwap (the default
    # swap behaviour) gives every container 0 and leaves the Pod level unset.
    swap_limit: int | None = None

    @property
    def cpu_weight(self) -> int | None:
        return None if self.cpu_shares is None else shares_to_weight(self.cpu_shares)

    def v1_files(self) -> dict[str, str]:
        files: dict[str, str] = {}
        if self.cpu_shares is not None:
            files["cpu.shares"] = str(self.cpu_shares)
        if self.cpu_quota is not None:
            files["cpu.cfs_quota_us"] = str(self.cpu_quota)
        if self.cpu_period is not None:
            files["cpu.cfs_period_us"] = str(self.cpu_period)
        if self.memory_limit is not None:
            files["memory.limit_in_bytes"] = str(self.memory_limit)
        if self.pids_limit is not None:
            files["pids.max"] = str(self.pids_limit)
        return files

    def v2_files(self) -> dict[str, str]:
        # v2 spells "unlimited" as "max", so unset limits are written explicitly.
        period = self.cpu_period or QUOTA_PERIOD
        quota = "max" if self.cpu_quota is None else str(self.cpu_quota)
        files: dict[str, str] = {}
        if self.cpu_shares is not None:
            files["cpu.weight"] = str(self.cpu_weight)
        files["cpu.max"] = f"{quota} {period}"
        files["memory.max"] = "max" if self.memory_limit is None else str(self.memory_limit)
        files["pids.max"] = "max" if self.pids_limit is None else str(self.pids_limit)
        if self.swap_limit is not None:
            files["memory.swap.max"] = str(self.swap_limit)
        return files


def pod_resource_config(
    pod: Mapping[str, Any], pod_pids_limit: int = -1, enforce_cpu_limits: bool = True
) -> ResourceConfig:
    """ResourceConfigForPod: settings for the pod-level cgroup."""
    pids = pod_pids_limit if pod_pids_limit > 0 else None
    qos = qos_class(pod)
    if qos == BEST_EFFORT:
        return ResourceConfig(cpu_shares=MIN_SHARES, pids_limit=pids)

    requests = _to_ints(_pod_requests_exact(pod))
    exact_limits, seen = _pod_limits_exact(pod)
    limits = _to_ints(exact_limits)
    # A pod is only capped if no container may run unbounded; upstream checks each
    # container's effective limits (init containers include earlier sidecars).
    guaranteed = qos == GUARANTEED
    cpu_declared = guaranteed or all(lims.get("cpu", 0) > 0 for lims in seen)
    memory_declared = guaranteed or all(lims.get("memory", 0) > 0 for lims in seen)
    # A pod-level limit caps the Pod cgroup whatever its containers declare.
    level_limits = pod_level(pod)[1]
    cpu_declared = cpu_declared or level_limits.get("cpu", 0) > 0
    memory_declared = memory_declared or level_limits.get("memory", 0) > 0

    quota = period = memory = None
    cpu_limit = limits.get("cpu", 0)
    if cpu_declared and enforce_cpu_limits and cpu_limit > 0:
        quota, period = milli_cpu_to_quota(cpu_limit), QUOTA_PERIOD
    if memory_declared and limits.get("memory", 0) > 0:
        memory = limits["memory"]
    return ResourceConfig(
        cpu_shares=milli_cpu_to_shares(requests.get("cpu", 0)),
        cpu_quota=quota,
        cpu_period=period,
        memory_limit=memory,
        pids_limit=pids,
    )


def container_resource_config(
    container: Mapping[str, Any], enforce_cpu_limits: bool = True, pod: Mapping[str, Any] | None = None
) -> ResourceConfig:
    """One container's own cgroup settings (kuberuntime calculateLinuxResources).

    With `pod` and pod-level limits, a container without its own cpu/memory limit gets the
    Pod-level one (kuberuntime getCPULimit/getMemoryLimit): it shares the Pod's budget.
    """
    requests, limits = map(_to_ints, _container_resources(container))
    if pod is not None:
        for name, quantity in _to_ints(pod_level(pod)[1]).items():
            if not limits.get(name):
                limits[name] = quantity
    cpu_request, cpu_limit = requests.get("cpu", 0), limits.get("cpu", 0)
    # An explicit zero request with a limit still gets shares from the limit, as upstream.
    shares = milli_cpu_to_shares(cpu_request if cpu_request > 0 else cpu_limit)
    quota = period = None
    if enforce_cpu_limits and cpu_limit > 0:
        quota, period = milli_cpu_to_quota(cpu_limit), QUOTA_PERIOD
    memory = limits.get("memory", 0)
    return ResourceConfig(
        cpu_shares=shares,
        cpu_quota=quota,
        cpu_period=period,
        memory_limit=memory if memory > 0 else None,
        swap_limit=0,  # NoSwap: over memory.max a container is OOM-killed, never swapped out
    )


# --- cgroup names ------------------------------------------------------------


def pod_cgroup_parent(pod: Mapping[str, Any], driver: str = "cgroupfs") -> str:
    """The pod's cgroup path relative to the cgroup root, per QoS class and driver."""
    uid = (pod.get("metadata") or {}).get("uid")
    if not uid:
        raise ValueError("pod has no metadata.uid")
    qos = qos_class(pod)
    tier = {GUARANTEED: None, BURSTABLE: "burstable", BEST_EFFORT: "besteffort"}[qos]
    if driver == "cgroupfs":
        parts = ["kubepods", *([tier] if tier else []), f"pod{uid}"]
        return "/".join(parts)
    if driver == "systemd":
        # systemd treats "-" as the slice hierarchy separator, so the kubelet escapes it.
        uid = uid.replace("-", "_")
        if tier is None:
            return f"kubepods.slice/kubepods-pod{uid}.slice"
        return f"kubepods.slice/kubepods-{tier}.slice/kubepods-{tier}-pod{uid}.slice"
    raise ValueError(f"unknown cgroup driver: {driver!r}")
