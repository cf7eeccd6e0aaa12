"""Unit tests for agent.admission (no cluster needed)."""

from __future__ import annotations

from typing import Any

import pytest

from agent.admission import Rejection, admit, matches_node_selector

NODE = "node-a"
LABELS = {"kubernetes.io/hostname": "host-label", "zone": "z1", "disk": "ssd", "cores": "8"}
ALLOCATABLE = {"cpu": "1", "memory": "1Gi", "ephemeral-storage": "10Gi", "pods": "110"}
AFFINITY_MESSAGE = "Pod was rejected: Predicate NodeAffinity failed: node(s) didn't match Pod's node affinity/selector"


def pod(uid: str = "p1", requests: dict | None = None, **spec: Any) -> dict:
    container: dict[str, Any] = {"name": "c", "image": "busybox"}
    if requests is not None:
        container["resources"] = {"requests": requests}
    return {"metadata": {"name": uid, "uid": uid}, "spec": {"containers": [container], **spec}}


def required(*terms: dict) -> dict:
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": list(terms)}}}


def expr(key: str, operator: str, *values: str) -> dict:
    req: dict[str, Any] = {"key": key, "operator": operator}
    if values:
        req["values"] = list(values)
    return req


def run(p: dict, admitted: list[dict] | None = None, allocatable: dict | None = None) -> Rejection | None:
    return admit(p, NODE, LABELS, allocatable or ALLOCATABLE, admitted or [])


def affinity(*terms: dict) -> bool:
    return matches_node_selector(pod(affinity=required(*terms)), NODE, LABELS)


# --- resources -----------------------------------------------------------------


def test_fits() -> None:
    others = [pod("o1", {"cpu": "300m", "memory": "256Mi"})]
    assert run(pod(requests={"cpu": "700m", "memory": "768Mi"}), others) is None


def test_overhead_makes_cpu_not_fit() -> None:
    assert run(pod(requests={"cpu": "900m"})) is None
    rejection = run(pod(requests={"cpu": "900m"}, overhead={"cpu": "200m"}))
    assert rejection == Rejection(
        "OutOfcpu",
        "Pod was rejected: Node didn't have enough resource: cpu, requested: 1100, used: 0, capacity: 1000",
    )


def test_cpu_message_counts_admitted_pods() -> None:
    rejection = run(pod(requests={"cpu": "2"}), [pod("o1", {"cpu": "500m"})], {**ALLOCATABLE, "cpu": "1900m"})
    assert rejection is not None
    assert rejection.message == (
        "Pod was rejected: Node didn't have enough resource: cpu, requested: 2000, used: 500, capacity: 1900"
    )


def test_out_of_memory() -> None:
    rejection = run(pod(requests={"memory": "600Mi"}), [pod("o1", {"memory": "500Mi"})])
    assert rejection is not None
    assert rejection.reason == "OutOfmemory"
    assert rejection.message.endswith(f"memory, requested: {600 * 2**20}, used: {500 * 2**20}, capacity: {2**30}")


def test_out_of_ephemeral_storage() -> None:
    rejection = run(pod(requests={"ephemeral-storage": "11Gi"}))
    assert rejection is not None and rejection.reason == "OutOfephemeral-storage"


def test_out_of_pods() -> None:
    rejection = run(pod(), [pod("o1"), pod("o2")], {**ALLOCATABLE, "pods": "2"})
    assert rejection == Rejection(
        "OutOfpods", "Pod was rejected: Node didn't have enough resource: pods, requested: 1, used: 2, capacity: 2"
    )
    assert run(pod(), [pod("o1")], {**ALLOCATABLE, "pods": "2"}) is None


def test_pods_checked_before_cpu_and_cpu_before_memory() -> None:
    greedy = pod(requests={"cpu": "2", "memory": "2Gi"})
    assert run(greedy, [pod("o1")], {**ALLOCATABLE, "pods": "1"}).reason == "OutOfpods"
    assert run(greedy).reason == "OutOfcpu"


def test_extended_resource_missing_on_node() -> None:
    rejection = run(pod(requests={"example.com/gpu": "1"}))
    assert rejection == Rejection(
        "OutOfexample.com/gpu",
        "Pod was rejected: Node didn't have enough resource: example.com/gpu, requested: 1, used: 0, capacity: 0",
    )


def test_extended_resource_exhausted_and_sorted_after_native() -> None:
    allocatable = {**ALLOCATABLE, "example.com/gpu": "2", "acme.io/fpga": "1"}
    others = [pod("o1", {"example.com/gpu": "1"})]
    assert run(pod(requests={"example.com/gpu": "1"}), others, allocatable) is None
    both = pod(requests={"example.com/gpu": "2", "acme.io/fpga": "2"})
    assert run(both, others, allocatable).reason == "OutOfacme.io/fpga"
    assert run(pod(requests={"example.com/gpu": "2"}), others, allocatable).reason == "OutOfexample.com/gpu"


def test_zero_request_fits_even_if_node_lacks_resource() -> None:
    assert run(pod(requests={"example.com/gpu": "0", "cpu": "0"}), [pod("o1", {"cpu": "1"})]) is None


def test_best_effort_fits_on_full_node() -> None:
    full = [pod("o1", {"cpu": "1", "memory": "1Gi", "ephemeral-storage": "10Gi"})]
    assert run(pod(), full) is None


def test_pod_itself_in_admitted_not_double_counted() -> None:
    me = pod("me", {"cpu": "600m"})
    assert run(me, [me]) is None
    assert run(me, [me, pod("o1")], {**ALLOCATABLE, "pods": "2"}) is None
    # A different pod with the same request is counted.
    assert run(me, [pod("o1", {"cpu": "600m"})]).reason == "OutOfcpu"


def test_resources_reported_before_affinity() -> None:
    # scheduler.AdmissionCheck runs NodeResourcesFit first; the kubelet reports the first reason.
    p = pod(requests={"cpu": "2"}, nodeSelector={"zone": "z2"})
    assert run(p).reason == "OutOfcpu"


# --- node selector / affinity ------------------------------------------------------


def test_node_selector_mismatch_rejected() -> None:
    rejection = run(pod(nodeSelector={"zone": "z2"}))
    assert rejection == Rejection("NodeAffinity", AFFINITY_MESSAGE)
    assert run(pod(nodeSelector={"zone": "z1", "disk": "ssd"})) is None
    assert run(pod(nodeSelector={"missing": ""})) is not None


def test_node_selector_and_affinity_both_required() -> None:
    p = pod(nodeSelector={"zone": "z1"}, affinity=required({"matchExpressions": [expr("disk", "In", "hdd")]}))
    assert run(p) == Rejection("NodeAffinity", AFFINITY_MESSAGE)


@pytest.mark.parametrize(
    ("requirement", "expected"),
    [
        (expr("zone", "In", "z0", "z1"), True),
        (expr("zone", "In", "z2"), False),
        (expr("missing", "In", "z1"), False),
        (expr("zone", "NotIn", "z2"), True),
        (expr("zone", "NotIn", "z1"), False),
        (expr("missing", "NotIn", "z1"), True),
        (expr("zone", "Exists"), True),
        (expr("missing", "Exists"), False),
        (expr("missing", "DoesNotExist"), True),
        (expr("zone", "DoesNotExist"), False),
        (expr("cores", "Gt", "4"), True),
        (expr("cores", "Gt", "8"), False),
        (expr("cores", "Lt", "16"), True),
        (expr("cores", "Lt", "8"), False),
        (expr("cores", "Gt", "-1"), True),
        (expr("zone", "Gt", "1"), False),  # non-integer label
        (expr("missing", "Lt", "100"), False),
        (expr("cores", "Gt", "x"), False),  # invalid bound
        (expr("cores", "Gt", "1", "2"), False),  # Gt takes exactly one value
        (expr("zone", "In"), False),  # In needs values
        (expr("zone", "Exists", "z1"), False),  # Exists takes none
        (expr("zone", "Matches", "z1"), False),  # unknown operator
    ],
)
def test_affinity_operators(requirement: dict, expected: bool) -> None:
    assert affinity({"matchExpressions": [requirement]}) is expected


def test_expressions_anded_terms_ored() -> None:
    good, bad = expr("zone", "In", "z1"), expr("disk", "In", "hdd")
    assert affinity({"matchExpressions": [good, bad]}) is False
    assert affinity({"matchExpressions": [bad]}, {"matchExpressions": [good]}) is True


def test_empty_terms_and_absent_affinity() -> None:
    assert affinity() is False  # empty nodeSelectorTerms matches nothing
    assert affinity({}) is False  # so does an empty term
    assert matches_node_selector(pod(), NODE, LABELS) is True
    assert matches_node_selector(pod(affinity={"nodeAffinity": {}}), NODE, LABELS) is True


@pytest.mark.parametrize(
    ("requirement", "expected"),
    [
        (expr("metadata.name", "In", NODE), True),
        (expr("metadata.name", "In", "host-label"), False),  # the name, not the hostname label
        (expr("metadata.name", "In", "node-b"), False),
        (expr("metadata.name", "NotIn", "node-b"), True),
        (expr("metadata.name", "NotIn", NODE), False),
        (expr("metadata.name", "In", NODE, "node-b"), False),  # exactly one value allowed
        (expr("metadata.name", "Exists"), False),
        (expr("metadata.uid", "In", NODE), False),
    ],
)
def test_match_fields_metadata_name(requirement: dict, expected: bool) -> None:
    assert affinity({"matchFields": [requirement]}) is expected


def test_match_fields_and_expressions_in_one_term_anded() -> None:
    name = expr("metadata.name", "In", NODE)
    assert affinity({"matchFields": [name], "matchExpressions": [expr("zone", "In", "z1")]}) is True
    assert affinity({"matchFields": [name], "matchExpressions": [expr("zone", "In", "z2")]}) is False


def test_no_execute_taints_are_checked_after_affinity() -> None:
    """predicate.go: only NoExecute taints count at the kubelet; tolerationSeconds does not matter."""
    taints = [{"key": "dedicated", "value": "db", "effect": "NoExecute"}, {"key": "x", "effect": "NoSchedule"}]
    plain = pod("p", {"cpu": "100m"})
    rejection = admit(plain, NODE, LABELS, ALLOCATABLE, [], taints)
    assert rejection == Rejection(
        "TaintToleration",
        "Pod was rejected: Predicate TaintToleration failed: node(s) had taints that the pod didn't tolerate",
    )
    for toleration in (
        {"key": "dedicated", "value": "db", "effect": "NoExecute", "tolerationSeconds": 5},
        {"key": "dedicated", "operator": "Exists"},
        {"operator": "Exists"},
    ):
        tolerant = {**plain, "spec": {**plain["spec"], "tolerations": [toleration]}}
        assert admit(tolerant, NODE, LABELS, ALLOCATABLE, [], taints) is None, toleration
    wrong = {**plain, "spec": {**plain["spec"], "tolerations": [{"key": "dedicated", "value": "web"}]}}
    assert admit(wrong, NODE, LABELS, ALLOCATABLE, [], taints).reason == "TaintToleration"
    assert admit(plain, NODE, LABELS, ALLOCATABLE, [], taints[1:]) is None  # NoSchedule: the scheduler's
