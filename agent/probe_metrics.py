"""prober_probe_total, served at /metrics/probes: every probe attempt, by container and result.

The kubelet's family (pkg/kubelet/prober): a counter labelled probe_type (Liveness, Readiness,
Startup), result (successful, failed, unknown: the probe could not be run), container, pod,
namespace and pod_uid. A container's series go away when its probe worker stops (the container
ended or was restarted), as the kubelet deletes them. Kept in a plain dict and exported through a
collector, so an attempt costs one dict update and the output has no *_created series.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

LABELS = ("probe_type", "result", "container", "pod", "namespace", "pod_uid")
PROBE_TYPES = {"liveness": "Liveness", "readiness": "Readiness", "startup": "Startup"}
HELP = "[BETA] Cumulative number of a liveness, readiness or startup probe for a container by result."

# (container, pod, namespace, pod_uid): who is probed.
Target = tuple[str, str, str, str]


class ProbeCounts(Collector):
    def __init__(self) -> None:
        self._counts: dict[tuple[str, ...], int] = {}

    def record(self, kind: str, target: Target, result: str) -> None:
        key = (PROBE_TYPES.get(kind, kind), result, *target)
        self._counts[key] = self._counts.get(key, 0) + 1

    def forget(self, kind: str, target: Target) -> None:
        probe_type = PROBE_TYPES.get(kind, kind)
        for key in [k for k in self._counts if k[0] == probe_type and k[2:] == target]:
            del self._counts[key]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("prober_probe", HELP, labels=LABELS)
        for key, count in sorted(self._counts.items()):
            family.add_metric(key, count)
        yield family


REGISTRY = CollectorRegistry(auto_describe=False)
COUNTS = ProbeCounts()
REGISTRY.register(COUNTS)
