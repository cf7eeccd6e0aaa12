"""The systemd cgroup driver's pure parts: unit names, slice parents and the D-Bus properties a
ResourceConfig becomes (no systemd needed; the driver against a real systemd is in
tests/test_systemd_driver.py)."""

from __future__ import annotations

import pytest
from dbus_fast import Variant

from cgroups.detect import CgroupMode
from cgroups.manager import CgroupManager
from cgroups.resources import ResourceConfig, pod_resource_config, shares_to_weight
from cgroups.systemd_bus import variants
from cgroups.systemd_units import (
    INFINITY,
    escape,
    expand_slice,
    parent_slice,
    parse_version,
    quota_per_sec,
    resource_properties,
    scope_for,
    scope_properties,
    slice_of_path,
    slice_properties,
)

V2 = CgroupMode(2, {"unified": "/sys/fs/cgroup"})
UID = "0f6c1d5a-1b2c-4d3e-8f90-123456789abc"
UID_ = "0f6c1d5a_1b2c_4d3e_8f90_123456789abc"


def _pod(resources: dict | None = None) -> dict:
    container = {"name": "app", **({"resources": resources} if resources else {})}
    return {"metadata": {"uid": UID, "name": "p", "namespace": "ns"}, "spec": {"containers": [container]}}


def _props(props: list) -> dict:
    return {name: (signature, value) for name, signature, value in props}


def test_unit_names_escape_the_uid_and_nest_by_dashes() -> None:
    manager = CgroupManager(mode=V2, driver="systemd")
    burstable = _pod({"requests": {"cpu": "100m"}})
    relative = manager.pod_path(burstable)
    assert relative == f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
    assert slice_of_path(relative) == f"kubepods-burstable-pod{UID_}.slice"
    assert expand_slice(slice_of_path(relative)) == relative
    scope = f"kubepods-burstable-pod{UID_}-containers.scope"
    assert manager.unit_names(relative) == [f"kubepods-burstable-pod{UID_}.slice", scope]
    assert manager.container_path(burstable, "app") == f"{relative}/{scope}/app"
    guaranteed = _pod({"limits": {"cpu": "1", "memory": "64Mi"}})
    assert manager.pod_path(guaranteed) == f"kubepods.slice/kubepods-pod{UID_}.slice"
    best_effort = _pod()
    assert slice_of_path(manager.pod_path(best_effort)) == f"kubepods-besteffort-pod{UID_}.slice"
    # A custom root with "-" is escaped like the uid; the cgroupfs driver keeps plain paths.
    custom = CgroupManager(mode=V2, root="x19b-pods", driver="systemd")
    assert custom.pod_path(best_effort).startswith("x19b_pods.slice/x19b_pods-besteffort.slice/")
    plain = CgroupManager(mode=V2, driver="cgroupfs")
    assert plain.container_path(best_effort, "app") == f"kubepods/besteffort/pod{UID}/app"
    assert plain.unit_names(plain.pod_path(best_effort)) == []
    assert escape("a-b-c") == "a_b_c"


def test_slice_parents_and_expansion() -> None:
    assert parent_slice("kubepods.slice") == "-.slice"
    assert parent_slice("kubepods-burstable.slice") == "kubepods.slice"
    assert parent_slice(f"kubepods-burstable-pod{UID_}.slice") == "kubepods-burstable.slice"
    assert expand_slice("a-b-c.slice") == "a.slice/a-b.slice/a-b-c.slice"
    for bad in ("a--b.slice", "-a.slice", "a.scope", ".slice", "a/b.slice"):
        with pytest.raises(ValueError, match="invalid slice name"):
            expand_slice(bad)
    with pytest.raises(ValueError, match="not a slice path"):
        slice_of_path("kubepods/burstable/pod1")
    assert scope_for("kubepods-pod1.slice") == "kubepods-pod1-containers.scope"


def test_slice_and_scope_properties_are_the_kubelets() -> None:
    unit = f"kubepods-burstable-pod{UID_}.slice"
    props = _props(slice_properties(unit, "kubelet-emu: Pod ns/p", 2))
    assert props["Wants"] == ("as", ["kubepods-burstable.slice"])
    assert props["DefaultDependencies"] == ("b", False)
    for name in ("MemoryAccounting", "CPUAccounting", "IOAccounting", "TasksAccounting"):
        assert props[name] == ("b", True)
    assert "Delegate" not in props  # systemd refuses delegation of slices
    assert "BlockIOAccounting" in _props(slice_properties(unit, "d", 1))  # v1 spelling
    scope = _props(scope_properties(unit, "containers", 4242, 2))
    assert scope["Slice"] == ("s", unit)
    assert scope["Delegate"] == ("b", True)
    assert scope["PIDs"] == ("au", [4242])
    assert scope["DefaultDependencies"] == ("b", False)


def test_v2_resources_become_weight_quota_memory_max_tasks_max() -> None:
    # 250m request, 500m/128Mi limits: shares 256, quota 50000 us per 100000 us.
    pod = _pod({"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"cpu": "500m", "memory": "128Mi"}})
    config = pod_resource_config(pod, pod_pids_limit=100)
    props = _props(resource_properties(config, cgroup_version=2, systemd_version=252))
    assert props["CPUWeight"] == ("t", shares_to_weight(256)) == ("t", 10)
    assert props["CPUQuotaPerSecUSec"] == ("t", 500_000)  # systemctl show: CPUQuotaPerSecUSec=500ms
    assert props["CPUQuotaPeriodUSec"] == ("t", 100_000)
    assert props["MemoryMax"] == ("t", 128 * 2**20)
    assert props["TasksMax"] == ("t", 100)
    assert "CPUShares" not in props and "MemoryLimit" not in props


def test_v1_resources_become_shares_and_memory_limit() -> None:
    config = ResourceConfig(cpu_shares=512, cpu_quota=150_000, cpu_period=100_000, memory_limit=2**30, pids_limit=50)
    props = _props(resource_properties(config, cgroup_version=1, systemd_version=252))
    assert props["CPUShares"] == ("t", 512)
    assert props["CPUQuotaPerSecUSec"] == ("t", 1_500_000)
    assert props["MemoryLimit"] == ("t", 2**30)
    assert props["TasksMax"] == ("t", 50)
    assert "CPUWeight" not in props and "MemoryMax" not in props


def test_unset_limits_are_infinity_so_an_update_drops_them() -> None:
    best_effort = pod_resource_config(_pod())  # shares 2, nothing else
    props = _props(resource_properties(best_effort, cgroup_version=2, systemd_version=252))
    assert props["CPUWeight"] == ("t", 1)
    assert props["CPUQuotaPerSecUSec"] == ("t", INFINITY)
    assert props["MemoryMax"] == ("t", INFINITY)
    assert props["TasksMax"] == ("t", INFINITY)
    assert "CPUQuotaPeriodUSec" not in props
    assert "CPUWeight" not in _props(resource_properties(ResourceConfig(), 2, 252))


def test_quota_per_second_rounds_up_to_10ms_and_old_systemd_gets_no_period() -> None:
    assert quota_per_sec(50_000, 100_000) == 500_000
    assert quota_per_sec(1_000, 100_000) == 10_000  # the kubelet's 1 ms minimum: 1 % of a CPU
    assert quota_per_sec(1_234, 100_000) == 20_000  # 12340 us/s rounded up to the next 10 ms
    assert quota_per_sec(25_000, 50_000) == 500_000
    assert quota_per_sec(None, None) == INFINITY
    old = _props(resource_properties(ResourceConfig(cpu_quota=50_000, cpu_period=100_000), 2, 241))
    assert "CPUQuotaPeriodUSec" not in old and old["CPUQuotaPerSecUSec"] == ("t", 500_000)


def test_properties_marshal_to_dbus_variants() -> None:
    body = variants(resource_properties(ResourceConfig(cpu_shares=1024, memory_limit=2**20), 2, 252))
    assert body[0] == ["CPUWeight", Variant("t", 39)]
    assert ["MemoryMax", Variant("t", 2**20)] in body
    scope = variants(scope_properties("a.slice", "d", 7, 2))
    assert ["PIDs", Variant("au", [7])] in scope


@pytest.mark.parametrize(
    ("text", "version"), [("252.38-1~deb12u1", 252), ('"v245.4-1.fc32"', 245), ("257", 257), ("", -1)]
)
def test_systemd_version(text: str, version: int) -> None:
    assert parse_version(text) == version
