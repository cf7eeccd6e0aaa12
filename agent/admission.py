"""Pod admission: may a Pod bound to this node start here?

Mirrors the kubelet's predicate admit handler (pkg/kubelet/lifecycle/predicate.go),
which runs scheduler.AdmissionCheck: NodeResourcesFit (pods count, then cpu, memory,
ephemeral-storage, other resources), then NodeAffinity (component-helpers
scheduling/corev1/nodeaffinity), then the node's NoExecute taints (the only effect the kubelet
checks), and reports only the first failure.
Not covered: host ports, the OS checks, critical-pod preemption.
Pure functions over plain API dicts (camelCase keys); no I/O.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cgroups.quantity import cpu_millis, parse_quantity
from cgroups.resources import pod_requests

NODE_AFFINITY = "NodeAffinity"
_AFFINITY_MESSAGE = "Predicate NodeAffinity failed: node(s) didn't match Pod's node affinity/selector"
TAINT_TOLERATION = "TaintToleration"
_TAINT_MESSAGE = "Predicate TaintToleration failed: node(s) had taints that the pod didn't tolerate"
# Upstream checks these in this order, then the rest (a Go map, so any order; sorted here to be stable).
_FIRST_RESOURCES = ("cpu", "memory", "ephemeral-storage")
_INT64 = re.compile(r"[+-]?[0-9]+")  # what strconv.ParseInt(s, 10, 64) accepts, range aside


@dataclass(frozen=True)
class Rejection:
    reason: str  # "OutOfcpu", "OutOfpods", "OutOf<resource>", "NodeAffinity", "TaintToleration"
    message: str


def admit(
    pod: Mapping[str, Any],
    node_name: str,
    node_labels: Mapping[str, str],
    allocatable: Mapping[str, str],
    admitted: Iterable[Mapping[str, Any]],
    node_taints: Iterable[Mapping[str, Any]] = (),
) -> Rejection | None:
    """None if the pod may start; else the first failure, as the kubelet reports it.

    `admitted` are the pods already admitted here and not terminal; `pod` itself is
    skipped if it is among them (re-admission must not count it twice).
    """
    usage = NodeUsage()
    for other in admitted:
        usage.add(other)
    return usage.admit(pod, node_name, node_labels, allocatable, node_taints)


class NodeUsage:
    """The requests of the Pods admitted on this node, kept as running totals so that
    admitting one more Pod does not recompute every other Pod's requests."""

    def __init__(self) -> None:
        self._by_uid: dict[str, dict[str, int]] = {}
        self.totals: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._by_uid)

    def __contains__(self, uid: str) -> bool:
        return uid in self._by_uid

    def add(self, pod: Mapping[str, Any]) -> None:
        uid = (pod.get("metadata") or {}).get("uid") or f"anonymous-{len(self._by_uid)}"
        self.remove(uid)
        requests = pod_requests(pod)
        self._by_uid[uid] = requests
        self.totals.update(requests)

    def remove(self, uid: str) -> None:
        requests = self._by_uid.pop(uid, None)
        if requests:
            self.totals.subtract(requests)

    def admit(
        self,
        pod: Mapping[str, Any],
        node_name: str,
        node_labels: Mapping[str, str],
        allocatable: Mapping[str, str],
        node_taints: Iterable[Mapping[str, Any]] = (),
    ) -> Rejection | None:
        uid = (pod.get("metadata") or {}).get("uid")
        used, count = self.totals, len(self._by_uid)
        if uid in self._by_uid:  # re-admission must not count the pod twice
            used = self.totals.copy()
            used.subtract(self._by_uid[uid])
            count -= 1
        # Resources before affinity: that is AdmissionCheck's order, and the kubelet reports reasons[0].
        rejection = _resource_fit(pod, allocatable, used, count)
        if rejection is None and not matches_node_selector(pod, node_name, node_labels):
            rejection = Rejection(NODE_AFFINITY, f"Pod was rejected: {_AFFINITY_MESSAGE}")
        if rejection is None and untolerated_no_execute(pod, node_taints):
            rejection = Rejection(TAINT_TOLERATION, f"Pod was rejected: {_TAINT_MESSAGE}")
        return rejection


# --- resources -----------------------------------------------------------------


def _amount(name: str, quantity: str) -> int:
    # Same units as pod_requests: cpu in millicores, everything else rounded up like Quantity.Value().
    return cpu_millis(quantity) if name == "cpu" else math.ceil(parse_quantity(quantity))


def _insufficient(name: str, requested: int, used: int, capacity: int) -> Rejection:
    return Rejection(
        f"OutOf{name}",
        f"Pod was rejected: Node didn't have enough resource: {name}, "
        f"requested: {requested}, used: {used}, capacity: {capacity}",
    )


def _resource_fit(
    pod: Mapping[str, Any], allocatable: Mapping[str, str], used: Mapping[str, int], count: int
) -> Rejection | None:
    max_pods = _amount("pods", allocatable.get("pods", "0"))
    if count + 1 > max_pods:
        return _insufficient("pods", 1, count, max_pods)

    requests = pod_requests(pod)
    order = [n for n in _FIRST_RESOURCES if n in requests] + sorted(n for n in requests if n not in _FIRST_RESOURCES)
    for name in order:
        requested = requests[name]
        if requested <= 0:
            continue  # a zero request fits anywhere, even where the node lacks the resource
        # A resource the node does not advertise has capacity 0. Upstream instead drops unknown
        # extended resources (for cluster-level ones); this node has none, so reject early.
        capacity = _amount(name, allocatable[name]) if name in allocatable else 0
        in_use = used.get(name, 0)
        if requested > capacity - in_use:
            return _insufficient(name, requested, in_use, capacity)
    return None


# --- node affinity ---------------------------------------------------------------


def matches_node_selector(pod: Mapping[str, Any], node_name: str, node_labels: Mapping[str, str]) -> bool:
    """spec.nodeSelector AND the required node affinity (GetRequiredNodeAffinity.Match)."""
    spec = pod.get("spec") or {}
    for key, value in (spec.get("nodeSelector") or {}).items():
        if node_labels.get(key) != value:
            return False
    node_affinity = (spec.get("affinity") or {}).get("nodeAffinity") or {}
    required = node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution")
    if required is None:
        return True
    # Terms are ORed, so an empty list matches no node.
    terms = required.get("nodeSelectorTerms") or []
    return any(_term_matches(term, node_name, node_labels) for term in terms)


def _term_matches(term: Mapping[str, Any], node_name: str, labels: Mapping[str, str]) -> bool:
    expressions = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not expressions and not fields:
        return False  # an empty term matches no objects
    return all(_label_matches(r, labels) for r in expressions) and all(_field_matches(r, node_name) for r in fields)


# Upstream turns an invalid requirement into an error that makes its whole term fail;
# since requirements are ANDed, returning False for it has the same effect.


def _label_matches(req: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key, operator, values = req.get("key"), req.get("operator"), req.get("values") or []
    present = key in labels
    if operator == "In":
        return bool(values) and present and labels[key] in values
    if operator == "NotIn":
        return bool(values) and (not present or labels[key] not in values)
    if operator == "Exists":
        return not values and present
    if operator == "DoesNotExist":
        return not values and not present
    if operator in ("Gt", "Lt") and len(values) == 1:
        bound, actual = _int64(values[0]), _int64(labels.get(key))
        if bound is None or actual is None:
            return False  # a missing or non-integer label never compares
        return actual > bound if operator == "Gt" else actual < bound
    return False


def _field_matches(req: Mapping[str, Any], node_name: str) -> bool:
    # Only metadata.name is a valid node field, with In/NotIn and exactly one value.
    values = req.get("values") or []
    if req.get("key") != "metadata.name" or len(values) != 1:
        return False
    if req.get("operator") == "In":
        return node_name == values[0]
    if req.get("operator") == "NotIn":
        return node_name != values[0]
    return False


# --- taints ------------------------------------------------------------------------


def untolerated_no_execute(pod: Mapping[str, Any], taints: Iterable[Mapping[str, Any]]) -> bool:
    """A NoExecute taint of the node that no toleration of the pod tolerates (v1 ToleratesTaint;
    tolerationSeconds does not matter at admission)."""
    tolerations = (pod.get("spec") or {}).get("tolerations") or []
    return any(
        taint.get("effect") == "NoExecute" and not any(_tolerates(t, taint) for t in tolerations) for taint in taints
    )


def _tolerates(toleration: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
        return False
    key = toleration.get("key") or ""
    if key and key != taint.get("key"):
        return False
    operator = toleration.get("operator") or "Equal"
    if operator == "Exists":
        return True  # an empty key with Exists tolerates every taint
    return operator == "Equal" and bool(key) and (toleration.get("value") or "") == (taint.get("value") or "")


def _int64(text: str | None) -> int | None:
    if text is None or not _INT64.fullmatch(text):
        return None
    number = int(text)
    return number if -(2**63) <= number < 2**63 else None
