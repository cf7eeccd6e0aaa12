"""/metrics/resource: the kubelet's resource metrics in the Prometheus text format (0.0.4).

Names, labels and help texts (stability prefix included) are the kubelet's
(pkg/kubelet/metrics/collectors/resource_metrics.go); so is the output shape: families sorted by
name, label pairs sorted by name, usage samples stamped with the time they were read (milliseconds),
numbers formatted as Go's strconv 'g' does ("1.2345e+06"). Written by hand rather than through
prometheus_client, which names a counter family without its _total suffix.
"""

from __future__ import annotations

import math

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


def go_float(value: float) -> str:
    """A float as Go's strconv.FormatFloat(v, 'g', -1, 64) writes it (what expfmt uses): the shortest
    digits that round-trip, in %e form when the exponent is below -4 or at least 6."""
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    text = repr(float(value))  # Python's repr is the shortest round-trip form too
    sign = ""
    if text[0] == "-":
        sign, text = "-", text[1:]
    mantissa, _, exp_text = text.partition("e")
    whole, _, fraction = mantissa.partition(".")
    all_digits = whole + fraction
    digits = all_digits.lstrip("0")
    point = len(whole) + int(exp_text or 0) - (len(all_digits) - len(digits))  # digits before the point
    digits = digits.rstrip("0")
    exp = point - 1
    if exp < -4 or exp >= 6:
        body = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{body}e{'+' if exp >= 0 else '-'}{abs(exp):02d}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return sign + digits + "0" * (point - len(digits))
    return f"{sign}{digits[:point]}.{digits[point:]}"


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


Line = tuple[tuple[str, ...], str]  # (label values in label-name order, for sorting; the sample line)


def _sample(name: str, labels: str, value: float, at: float | None) -> str:
    stamp = f" {int(at * 1000)}" if at is not None else ""
    return f"{name}{{{labels}}} {go_float(value)}{stamp}\n" if labels else f"{name} {go_float(value)}{stamp}\n"


def _lines(snapshot: Snapshot | None) -> dict[str, list[Line]]:
    out: dict[str, list[Line]] = {name: [] for name in FAMILIES}
    error = 1.0 if snapshot is None else 0.0
    for name in ("scrape_error", "resource_scrape_error"):
        out[name].append(((), _sample(name, "", error, None)))
    if snapshot is None:
        return out

    def usage(kind: str, key: tuple[str, ...], labels: str, u: Usage | None) -> None:
        if u is None:
            return
        cpu, memory = f"{kind}_cpu_usage_seconds_total", f"{kind}_memory_working_set_bytes"
        out[cpu].append((key, _sample(cpu, labels, u.counters.cpu_usage_ns / NANOS, u.time)))
        out[memory].append((key, _sample(memory, labels, float(u.counters.working_set_bytes), u.time)))

    usage("node", (), "", snapshot.node.usage)
    for pod in snapshot.pods:
        pod_labels = f'namespace="{_escape(pod.namespace)}",pod="{_escape(pod.name)}"'
        for c in pod.containers:
            key = (c.name, pod.namespace, pod.name)
            labels = f'container="{_escape(c.name)}",{pod_labels}'
            if c.start_time > 0:
                out["container_start_time_seconds"].append(
                    (key, _sample("container_start_time_seconds", labels, c.start_time, None))
                )
            usage("container", key, labels, c.usage)
        usage("pod", (pod.namespace, pod.name), pod_labels, pod.usage)
    return out


def render(snapshot: Snapshot | None) -> str:
    """The exposition text; `None` stands for a failed sampling (only the scrape error gauges, set to 1)."""
    parts = []
    for name, lines in sorted(_lines(snapshot).items()):
        if not lines:
            continue  # as the kubelet: a family without samples is not written at all
        kind, help_text = FAMILIES[name]
        parts.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
        lines.sort(key=lambda line: line[0])
        parts.extend(line for _, line in lines)
    return "".join(parts)
