"""Unit tests for cgroups.resources (no cluster needed)."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import ctr

from cgroups.resources import (
    ResourceConfig,
    container_resource_config,
    milli_cpu_to_quota,
    milli_cpu_to_shares,
    pod_cgroup_parent,
    pod_limits,
    pod_requests,
    pod_resource_config,
    qos_class,
    shares_to_weight,
)

MI = 1024 * 1024
UID = "1f2e3d4c-0000-1111-2222-333344445555"


def sidecar(name: str, requests: dict | None = None, limits: dict | None = None) -> dict:
    return ctr(name, requests, limits, restartPolicy="Always")


def pod(containers: list[dict], init: list[dict] | None = None, overhead: dict | None = None, **status: Any) -> dict:
    spec: dict[str, Any] = {"containers": containers}
    if init is not None:
        spec["initContainers"] = init
    if overhead is not None:
        spec["overhead"] = overhead
    return {"metadata": {"name": "p", "namespace": "default", "uid": UID}, "spec": spec, "status": status}


def worked_example() -> dict:
    # REFERENCE / k8s docs pod-overhead example: limits only, so requests default to them.
    return pod(
        [
            ctr("a", limits={"cpu": "500m", "memory": "100Mi"}),
            ctr("b", limits={"cpu": "1500m", "memory": "100Mi"}),
        ],
        overhead={"cpu": "250m", "memory": "120Mi"},
    )


# --- worked example ------------------------------------------------------------


def test_worked_example_totals() -> None:
    p = worked_example()
    assert qos_class(p) == "Guaranteed"
    assert pod_requests(p) == {"cpu": 2250, "memory": 320 * MI}
    assert pod_limits(p) == {"cpu": 2250, "memory": 320 * MI}


def test_worked_example_cgroup() -> None:
    cfg = pod_resource_config(worked_example())
    assert cfg == ResourceConfig(cpu_shares=2304, cpu_quota=225000, cpu_period=100000, memory_limit=335544320)
    assert cfg.cpu_weight == 88
    assert cfg.v1_files() == {
        "cpu.shares": "2304",
        "cpu.cfs_quota_us": "225000",
        "cpu.cfs_period_us": "100000",
        "memory.limit_in_bytes": "335544320",
    }
    assert cfg.v2_files() == {
        "cpu.weight": "88",
        "cpu.max": "225000 100000",
        "memory.max": "335544320",
        "pids.max": "max",
    }


def test_pids_limit_and_cfs_quota_disabled() -> None:
    cfg = pod_resource_config(worked_example(), pod_pids_limit=1024, enforce_cpu_limits=False)
    assert cfg.pids_limit == 1024
    assert cfg.cpu_quota is None and cfg.cpu_period is None
    assert cfg.memory_limit == 335544320
    assert "cpu.cfs_quota_us" not in cfg.v1_files()
    assert cfg.v1_files()["pids.max"] == "1024"
    assert cfg.v2_files()["cpu.max"] == "max 100000"
    assert pod_resource_config(worked_example(), pod_pids_limit=0).pids_limit is None


# --- init containers and sidecars ----------------------------------------------


def test_init_containers_are_max_not_sum() -> None:
    p = pod(
        [ctr("app", requests={"cpu": "100m", "memory": "64Mi"})],
        init=[
            ctr("i1", requests={"cpu": "500m", "memory": "32Mi"}),
            ctr("i2", requests={"cpu": "200m", "memory": "128Mi"}),
        ],
    )
    assert pod_requests(p) == {"cpu": 500, "memory": 128 * MI}


def test_sidecar_counts_with_app_and_later_init_containers() -> None:
    p = pod(
        [ctr("app", requests={"cpu": "300m", "memory": "100Mi"})],
        init=[
            ctr("before", requests={"cpu": "400m", "memory": "10Mi"}),  # runs before the sidecar
            sidecar("proxy", requests={"cpu": "200m", "memory": "50Mi"}),
            ctr("after", requests={"cpu": "500m", "memory": "10Mi"}),  # runs next to the sidecar
        ],
    )
    # app+sidecar = 500m/150Mi; "after" needs 500m+200m = 700m; "before" alone 400m.
    assert pod_requests(p) == {"cpu": 700, "memory": 150 * MI}


def test_sidecar_limits_and_quota() -> None:
    p = pod(
        [ctr("app", limits={"cpu": "1", "memory": "1Gi"})],
        init=[sidecar("proxy", limits={"cpu": "500m", "memory": "256Mi"})],
    )
    assert qos_class(p) == "Guaranteed"
    assert pod_limits(p) == {"cpu": 1500, "memory": 1280 * MI}
    cfg = pod_resource_config(p)
    assert (cfg.cpu_quota, cfg.memory_limit) == (150000, 1280 * MI)


def test_init_container_without_cpu_limit_prevents_quota() -> None:
    p = pod(
        [ctr("app", limits={"cpu": "1", "memory": "1Gi"})],
        init=[ctr("init", limits={"memory": "1Gi"})],
    )
    assert qos_class(p) == "Burstable"
    cfg = pod_resource_config(p)
    assert cfg.cpu_quota is None and cfg.cpu_period is None
    assert cfg.memory_limit == 1024 * MI


def test_init_container_after_limited_sidecar_counts_as_limited() -> None:
    # Upstream checks an init container's effective limits (own + earlier sidecars).
    p = pod(
        [ctr("app", limits={"cpu": "1", "memory": "1Gi"})],
        init=[
            sidecar("proxy", limits={"cpu": "500m", "memory": "64Mi"}),
            ctr("init", requests={"cpu": "100m"}, limits={"memory": "64Mi"}),
        ],
    )
    assert pod_resource_config(p).cpu_quota == 150000


# --- QoS and pod cgroup config -------------------------------------------------


def test_best_effort_gets_min_shares_only() -> None:
    p = pod([ctr("a"), ctr("b", requests={}, limits={})], overhead={"cpu": "250m"})
    assert qos_class(p) == "BestEffort"
    cfg = pod_resource_config(p, pod_pids_limit=4096)
    assert cfg == ResourceConfig(cpu_shares=2, pids_limit=4096)
    assert cfg.v1_files() == {"cpu.shares": "2", "pids.max": "4096"}
    assert cfg.v2_files() == {"cpu.weight": "1", "cpu.max": "max 100000", "memory.max": "max", "pids.max": "4096"}


def test_burstable_container_without_cpu_limit_has_no_quota() -> None:
    p = pod(
        [
            ctr("a", requests={"cpu": "100m"}, limits={"cpu": "200m", "memory": "128Mi"}),
            ctr("b", requests={"cpu": "100m"}, limits={"memory": "64Mi"}),
        ]
    )
    assert qos_class(p) == "Burstable"
    cfg = pod_resource_config(p)
    assert cfg == ResourceConfig(cpu_shares=204, memory_limit=192 * MI)
    assert cfg.v1_files() == {"cpu.shares": "204", "memory.limit_in_bytes": str(192 * MI)}
    assert cfg.v2_files()["cpu.max"] == "max 100000"


def test_burstable_container_without_memory_limit_has_no_memory_limit() -> None:
    p = pod([ctr("a", limits={"cpu": "1"}), ctr("b", limits={"cpu": "1", "memory": "1Gi"})])
    cfg = pod_resource_config(p)
    assert (cfg.cpu_quota, cfg.cpu_period, cfg.memory_limit) == (200000, 100000, None)
    assert cfg.v2_files()["memory.max"] == "max"


def test_overhead_not_added_to_unset_limits() -> None:
    p = pod(
        [ctr("a", requests={"cpu": "100m", "memory": "64Mi"}, limits={"memory": "128Mi"})],
        overhead={"cpu": "250m", "memory": "120Mi"},
    )
    assert pod_requests(p) == {"cpu": 350, "memory": 184 * MI}
    assert pod_limits(p) == {"memory": 248 * MI}  # no cpu limit invented from overhead
    cfg = pod_resource_config(p)
    assert cfg == ResourceConfig(cpu_shares=358, memory_limit=248 * MI)


def test_overhead_with_no_limits_at_all() -> None:
    p = pod([ctr("a", requests={"cpu": "100m"})], overhead={"cpu": "250m", "memory": "120Mi"})
    assert pod_limits(p) == {}
    assert pod_requests(p) == {"cpu": 350, "memory": 120 * MI}


def test_qos_guaranteed_burstable_besteffort() -> None:
    both = {"cpu": "1", "memory": "1Gi"}
    assert qos_class(pod([ctr("a", requests=both, limits=both)])) == "Guaranteed"
    # Limits only: requests default to limits.
    assert qos_class(pod([ctr("a", limits=both)])) == "Guaranteed"
    # Requests != limits.
    unequal = ctr("a", requests={"cpu": "500m", "memory": "1Gi"}, limits=both)
    assert qos_class(pod([unequal])) == "Burstable"
    assert qos_class(pod([ctr("a", requests={"cpu": "100m"})])) == "Burstable"
    # One container unlimited spoils Guaranteed, init containers included.
    assert qos_class(pod([ctr("a", limits=both), ctr("b")])) == "Burstable"
    assert qos_class(pod([ctr("a", limits=both)], init=[ctr("i")])) == "Burstable"
    assert qos_class(pod([ctr("a")])) == "BestEffort"
    # Zero quantities and non-QoS resources do not count.
    assert qos_class(pod([ctr("a", requests={"cpu": "0", "ephemeral-storage": "1Gi"})])) == "BestEffort"


def test_qos_uses_status_when_set() -> None:
    p = pod([ctr("a", requests={"cpu": "100m"})], qosClass="Burstable")
    assert qos_class(p) == "Burstable"
    assert qos_class(pod([ctr("a")], qosClass="Guaranteed")) == "Guaranteed"


# --- quantities ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpu", "milli"),
    [("0.5", 500), ("1", 1000), ("250m", 250), ("1e3", 1_000_000), ("2.5", 2500), (".1", 100), (2, 2000)],
)
def test_cpu_quantities(cpu: str | int, milli: int) -> None:
    assert pod_requests(pod([ctr("a", requests={"cpu": cpu})])) == {"cpu": milli}


@pytest.mark.parametrize(
    ("memory", "num_bytes"),
    [("1Gi", 2**30), ("128Mi", 128 * MI), ("1e3", 1000), ("1k", 1000), ("1.5Gi", 3 * 2**29), ("1", 1), ("1M", 10**6)],
)
def test_memory_quantities(memory: str, num_bytes: int) -> None:
    assert pod_limits(pod([ctr("a", limits={"memory": memory})])) == {"memory": num_bytes}


def test_fractions_are_summed_exactly_then_rounded_up() -> None:
    halves = pod([ctr("a", requests={"cpu": "0.5m"}), ctr("b", requests={"cpu": "0.5m"})])
    assert pod_requests(halves) == {"cpu": 1}
    assert pod_requests(pod([ctr("a", requests={"cpu": "100u", "memory": "0.5"})])) == {"cpu": 1, "memory": 1}


def test_other_resources_in_their_units() -> None:
    p = pod([ctr("a", limits={"nvidia.com/gpu": "2", "hugepages-2Mi": "4Mi"})])
    assert pod_limits(p) == {"nvidia.com/gpu": 2, "hugepages-2Mi": 4 * MI}


@pytest.mark.parametrize("bad", ["", "abc", "1x", "1 Gi", "E", ".", "1e"])
def test_invalid_quantity_raises(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid quantity"):
        pod_requests(pod([ctr("a", requests={"cpu": bad})]))


# --- formulas ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("milli", "shares"),
    [(0, 2), (1, 2), (2, 2), (3, 3), (10, 10), (250, 256), (1000, 1024), (256000, 262144), (10**6, 262144)],
)
def test_milli_cpu_to_shares(milli: int, shares: int) -> None:
    assert milli_cpu_to_shares(milli) == shares


def test_milli_cpu_to_quota() -> None:
    assert milli_cpu_to_quota(0) == 0
    assert milli_cpu_to_quota(1) == 1000  # floor of 1 ms
    assert milli_cpu_to_quota(10) == 1000
    assert milli_cpu_to_quota(11) == 1100
    assert milli_cpu_to_quota(2250) == 225000
    assert milli_cpu_to_quota(500, period=50000) == 25000


@pytest.mark.parametrize(
    ("shares", "weight"),
    [(2, 1), (1, 1), (1024, 39), (2304, 88), (262143, 9999), (262144, 10000), (10**6, 10000)],
)
def test_shares_to_weight(shares: int, weight: int) -> None:
    assert shares_to_weight(shares) == weight
    assert ResourceConfig(cpu_shares=shares).cpu_weight == weight


def test_unset_config_writes_nothing_on_v1() -> None:
    cfg = ResourceConfig()
    assert cfg.cpu_weight is None
    assert cfg.v1_files() == {}
    assert cfg.v2_files() == {"cpu.max": "max 100000", "memory.max": "max", "pids.max": "max"}


# --- container config ----------------------------------------------------------


def test_container_config_from_request() -> None:
    cfg = container_resource_config(ctr("a", requests={"cpu": "250m", "memory": "64Mi"}))
    assert cfg == ResourceConfig(cpu_shares=256, swap_limit=0)


def test_container_config_from_limits() -> None:
    cfg = container_resource_config(ctr("a", limits={"cpu": "500m", "memory": "256Mi"}))
    assert cfg == ResourceConfig(
        cpu_shares=512, cpu_quota=50000, cpu_period=100000, memory_limit=256 * MI, swap_limit=0
    )
    assert container_resource_config(ctr("a", limits={"cpu": "500m"}), enforce_cpu_limits=False) == (
        ResourceConfig(cpu_shares=512, swap_limit=0)
    )


def test_container_config_request_and_limit() -> None:
    cfg = container_resource_config(ctr("a", requests={"cpu": "100m"}, limits={"cpu": "2"}))
    assert (cfg.cpu_shares, cfg.cpu_quota) == (102, 200000)
    # An explicit zero request still takes shares from the limit, as the kubelet does.
    zero = container_resource_config(ctr("a", requests={"cpu": "0"}, limits={"cpu": "1"}))
    assert zero.cpu_shares == 1024
    assert container_resource_config(ctr("a")) == ResourceConfig(cpu_shares=2, swap_limit=0)
    assert container_resource_config({"name": "bare"}) == ResourceConfig(cpu_shares=2, swap_limit=0)


def test_no_swap_for_containers_pod_level_left_alone() -> None:
    """NoSwap, the kubelet's default: memory.swap.max 0 for each container, unset for the Pod."""
    p = pod([ctr("a", limits={"cpu": "500m", "memory": "100Mi"})])
    container = container_resource_config(p["spec"]["containers"][0])
    assert container.v2_files()["memory.swap.max"] == "0"
    assert "memory.swap.max" not in pod_resource_config(p).v2_files()
    assert "memory.swap.max" not in container.v1_files()  # v1 has no such file


# --- cgroup names --------------------------------------------------------------


def test_pod_cgroup_parent() -> None:
    guaranteed = worked_example()
    burstable = pod([ctr("a", requests={"cpu": "100m"})])
    best_effort = pod([ctr("a")])
    escaped = UID.replace("-", "_")

    assert pod_cgroup_parent(guaranteed) == f"kubepods/pod{UID}"
    assert pod_cgroup_parent(burstable) == f"kubepods/burstable/pod{UID}"
    assert pod_cgroup_parent(best_effort) == f"kubepods/besteffort/pod{UID}"

    assert pod_cgroup_parent(guaranteed, "systemd") == f"kubepods.slice/kubepods-pod{escaped}.slice"
    assert pod_cgroup_parent(burstable, "systemd") == (
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{escaped}.slice"
    )
    assert pod_cgroup_parent(best_effort, "systemd") == (
        f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{escaped}.slice"
    )


def test_pod_cgroup_parent_errors() -> None:
    with pytest.raises(ValueError, match="driver"):
        pod_cgroup_parent(worked_example(), "lxc")
    with pytest.raises(ValueError, match="uid"):
        pod_cgroup_parent({"spec": {"containers": []}})


# --- pod-level resources (spec.resources) -------------------------------------------------


def pod_level_example() -> dict:
    """The issue's worked example: Pod-level limits 1 CPU / 256Mi, two containers without limits,
    RuntimeClass overhead 250m/120Mi."""
    p = pod([ctr("a"), ctr("b")], overhead={"cpu": "250m", "memory": "120Mi"})
    p["spec"]["resources"] = {"limits": {"cpu": "1", "memory": "256Mi"}}
    return p


def test_pod_level_limits_replace_the_aggregate_and_keep_the_overhead() -> None:
    p = pod_level_example()
    assert pod_limits(p) == {"cpu": 1250, "memory": 376 * MI}
    # Requests default to the pod-level limits (no container requests anything), overhead on top.
    assert pod_requests(p) == {"cpu": 1250, "memory": 376 * MI}
    config = pod_resource_config(p)
    assert (config.cpu_quota, config.cpu_period, config.memory_limit) == (125000, 100000, 376 * MI)
    assert config.cpu_shares == 1280
    assert config.v1_files()["memory.limit_in_bytes"] == str(394264576)
    assert config.v2_files() == {
        "cpu.weight": "49",
        "cpu.max": "125000 100000",
        "memory.max": "394264576",
        "pids.max": "max",
    }


def test_pod_level_qos() -> None:
    assert qos_class(pod_level_example()) == "Guaranteed"  # requests defaulted to the limits
    p = pod_level_example()
    p["spec"]["resources"]["requests"] = {"cpu": "500m", "memory": "256Mi"}
    assert qos_class(p) == "Burstable"
    only_cpu = pod([ctr("a", {"cpu": "1", "memory": "1Gi"}, {"cpu": "1", "memory": "1Gi"})])
    only_cpu["spec"]["resources"] = {"limits": {"cpu": "1"}, "requests": {"cpu": "1"}}
    assert qos_class(only_cpu) == "Burstable"  # pod-level values alone decide: no memory limit
    p = pod_level_example()
    p["status"] = {"qosClass": "Burstable"}
    assert qos_class(p) == "Burstable"  # the API server's answer wins


def test_pod_level_requests_replace_only_what_they_set() -> None:
    p = pod([ctr("a", {"cpu": "100m", "memory": "64Mi"}), ctr("b", {"cpu": "200m"})])
    p["spec"]["resources"] = {"requests": {"cpu": "1"}}
    assert pod_requests(p) == {"cpu": 1000, "memory": 64 * MI}
    # No limits anywhere: no quota, no memory cap.
    config = pod_resource_config(p)
    assert config.cpu_quota is None and config.memory_limit is None and config.cpu_shares == 1024


def test_containers_without_limits_share_the_pod_level_budget() -> None:
    p = pod_level_example()
    p["spec"]["containers"][1]["resources"] = {"limits": {"cpu": "300m"}}
    a = container_resource_config(p["spec"]["containers"][0], pod=p)
    b = container_resource_config(p["spec"]["containers"][1], pod=p)
    assert (a.cpu_quota, a.memory_limit, a.cpu_shares) == (100000, 256 * MI, 1024)
    assert (b.cpu_quota, b.memory_limit) == (30000, 256 * MI)
    # Without the pod, the container's own values only (as before).
    assert container_resource_config(p["spec"]["containers"][0]).memory_limit is None


def test_resize_order_and_infeasible_message() -> None:
    from agent.resize import infeasible
    from cgroups.resize import POD, resize_steps

    small, big = (
        ResourceConfig(cpu_shares=512, cpu_quota=75000, cpu_period=100000, memory_limit=100),
        ResourceConfig(cpu_shares=1024, cpu_quota=125000, cpu_period=100000, memory_limit=50),
    )
    steps = resize_steps(small, big, {"main": ResourceConfig(cpu_quota=100000)})
    # cpu grows: the Pod first with the new cpu but the old memory; memory shrinks: containers first.
    assert [k for k, _ in steps] == [POD, "main", POD]
    assert (steps[0][1].cpu_quota, steps[0][1].memory_limit) == (125000, 100)
    assert steps[-1][1] == big
    p = pod([ctr("a", {"cpu": "3"}, {"cpu": "3"})], overhead={"cpu": "250m"})
    assert (
        infeasible(p, {"cpu": "2", "memory": "1Gi"})
        == "Node didn't have enough capacity: cpu, requested: 3250, capacity: 2000"
    )
