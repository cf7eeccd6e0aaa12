"""/metrics/resource: the kubelet's resource metrics in the Prometheus text format (0.0.4).

Names, labels and help texts (stability prefix included) are the kubelet's
(pkg/kubelet/metrics/collectors/resource_metrics.go); so is the output shape: families sorted by
name, label pairs sorted by name, usage samples stamped with the time they were read (milliseconds),
numbers formatted as Go's strconv 'g' does ("1.2345e+06"). Written by hand rather than through
prometheus_client, which names a counter family without its _total suffix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from decimal import Decimal

from agent.stats.model import Snapshot, Usage

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

NANOS = 1e9

# name -> (type, help)
FAMILIES = {
    "container_cpu_usage_seconds_total": (
        "counter",
        "[STABLE] Cumulative cpu time consumed by the container in core-seconds",
    ),
    "container_memory_working_set_bytes": ("gauge", "[STABLE] Current working set of the container in bytes"),
    "container_start_time_seconds": ("gauge", "[STABLE] Start time of the container since unix epoch in seconds"),
    "node_cpu_usage_seconds_total": ("counter", "[STABLE] Cumulative cpu time consumed by the node in core-seconds"),
    "node_memory_working_set_bytes": ("gauge", "[STABLE] Current working set of the node in bytes"),
    "pod_cpu_usage_seconds_total": ("counter", "[STABLE] Cumulative cpu time consumed by the pod in core-seconds"),
    "pod_memory_working_set_bytes": ("gauge", "[STABLE] Current working set of the pod in bytes"),
    "resource_scrape_error": (
        "gauge",
        "[STABLE] 1 if there was an error while getting container metrics, 0 otherwise",
    ),
    "scrape_error": ("gauge", "[ALPHA] 1 if there was an error while getting container metrics, 0 otherwise"),
}

Sample = tuple[tuple[tuple[str, str], ...], float, float | None]  # (sorted label pairs, value, time)


def go_float(value: float) -> str:
    """A float as Go's strconv.FormatFloat(v, 'g', -1, 64) writes it (what expfmt uses)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    sign, digit_tuple, exponent = Decimal(repr(float(value))).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    point = len(digits) + int(exponent)  # digits before the decimal point
    exp = point - 1
    prefix = "-" if sign else ""
    if exp < -4 or exp >= 6:  # shortest formatting decides with precision 6
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{prefix}{mantissa}e{'+' if exp >= 0 else '-'}{abs(exp):02d}"
    if point <= 0:
        return f"{prefix}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return prefix + digits + "0" * (point - len(digits))
    return f"{prefix}{digits[:point]}.{digits[point:]}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _samples(snapshot: Snapshot | None) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {name: [] for name in FAMILIES}
    error = 1.0 if snapshot is None else 0.0
    out["scrape_error"].append(((), error, None))
    out["resource_scrape_error"].append(((), error, None))
    if snapshot is None:
        return out

    def usage(cpu: str, memory: str, labels: tuple[tuple[str, str], ...], u: Usage | None) -> None:
        if u is None:
            return
        out[cpu].append((labels, u.counters.cpu_usage_ns / NANOS, u.time))
        out[memory].append((labels, float(u.counters.working_set_bytes), u.time))

    usage("node_cpu_usage_seconds_total", "node_memory_working_set_bytes", (), snapshot.node.usage)
    for pod in snapshot.pods:
        for c in pod.containers:
            labels = (("container", c.name), ("namespace", pod.namespace), ("pod", pod.name))
            if c.start_time > 0:
                out["container_start_time_seconds"].append((labels, c.start_time, None))
            usage("container_cpu_usage_seconds_total", "container_memory_working_set_bytes", labels, c.usage)
        labels = (("namespace", pod.namespace), ("pod", pod.name))
        usage("pod_cpu_usage_seconds_total", "pod_memory_working_set_bytes", labels, pod.usage)
    return out


def _lines(snapshot: Snapshot | None) -> Iterator[str]:
    for name, samples in sorted(_samples(snapshot).items()):
        if not samples:
            continue  # as the kubelet: a family without samples is not written at all
        kind, help_text = FAMILIES[name]
        yield f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"
        for labels, value, at in sorted(samples, key=lambda s: s[0]):
            label_text = "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}" if labels else ""
            stamp = f" {int(at * 1000)}" if at is not None else ""
            yield f"{name}{label_text} {go_float(value)}{stamp}\n"


def render(snapshot: Snapshot | None) -> str:
    """The exposition text; `None` stands for a failed sampling (only the scrape error gauges, set to 1)."""
    return "".join(_lines(snapshot))
