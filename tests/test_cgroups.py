"""cgroups.manager and cgroups.detect.

Integration tests use the real cgroup filesystem of this host (as root) under a unique
root cgroup that is removed afterwards. The parts of the v2 logic that are pure (file
names and values, subtree_control lines, parsing, mode detection) have unit tests with
sample text, so they also run on a v1/hybrid host.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import host_cgroup_mode

from cgroups.detect import CgroupError, CgroupMode, detect_mode
from cgroups.manager import (
    CgroupManager,
    missing_controllers,
    parse_flat_keyed,
    subtree_control_files,
    v1_settings,
    v2_settings,
    working_set,
)
from cgroups.resources import (
    ResourceConfig,
    container_resource_config,
    pod_cgroup_parent,
    pod_resource_config,
)

MI = 1024 * 1024
UNLIMITED_V1_MEMORY = 2**62  # "-1" reads back as a huge page-aligned number


HOST = host_cgroup_mode()
IS_ROOT = os.geteuid() == 0

requires_v1 = pytest.mark.skipif(
    not (IS_ROOT and HOST and HOST.version == 1), reason="needs root and cgroup v1 cpu/memory hierarchies"
)
_V2_SKIP_REASON = (
    "cgroup v2 controllers are not available here (hybrid cgroup v1 host); covered by unit tests"
    if HOST is None or HOST.version == 1
    else "needs root to create cgroups"
)
requires_v2 = pytest.mark.skipif(not (IS_ROOT and HOST and HOST.version == 2), reason=_V2_SKIP_REASON)


# --- sample pods -------------------------------------------------------------


def ctr(name: str, limits: dict | None = None, requests: dict | None = None) -> dict:
    resources: dict = {}
    if limits is not None:
        resources["limits"] = limits
    if requests is not None:
        resources["requests"] = requests
    return {"name": name, "image": "busybox", "resources": resources}


def make_pod(containers: list[dict], overhead: dict | None = None) -> dict:
    spec: dict = {"containers": containers}
    if overhead:
        spec["overhead"] = overhead
    return {"metadata": {"name": "p", "namespace": "default", "uid": str(uuid.uuid4())}, "spec": spec}


def guaranteed_pod() -> dict:
    """The pod-overhead docs example: 2250m / 320Mi as the scheduler sees it."""
    return make_pod(
        [
            ctr("a", limits={"cpu": "500m", "memory": "100Mi"}),
            ctr("b", limits={"cpu": "1500m", "memory": "100Mi"}),
        ],
        overhead={"cpu": "250m", "memory": "120Mi"},
    )


def burstable_pod() -> dict:
    # "b" has no cpu limit, so the pod gets no CFS quota.
    return make_pod(
        [
            ctr("a", limits={"cpu": "500m", "memory": "64Mi"}),
            ctr("b", requests={"cpu": "100m", "memory": "32Mi"}),
        ]
    )


def best_effort_pod() -> dict:
    return make_pod([ctr("a")])


def read(path: str | Path) -> str:
    return Path(path).read_text().strip()


# --- fixtures ----------------------------------------------------------------


@pytest.fixture
def make_manager() -> Iterator[Callable[..., CgroupManager]]:
    """Managers under a unique root like "kubelet-emu-test-1a2b3c4d"; the whole root goes afterwards."""
    made: list[CgroupManager] = []

    def make(driver: str = "cgroupfs", mode: CgroupMode | None = None) -> CgroupManager:
        manager = CgroupManager(mode=mode or HOST, root=f"kubelet-emu-test-{uuid.uuid4().hex[:8]}", driver=driver)
        if mode is None:
            # What the agent does at start (at a cgroup namespace root it moves into a leaf);
            # where even that cannot work, these tests cannot either.
            try:
                manager.make_room_for_children()
            except CgroupError as e:
                pytest.skip(f"Pod cgroups cannot be made here: {e}")
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.remove(manager.root_path)
        assert not any(os.path.exists(p) for p in manager.absolute_paths(manager.root_path))


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; killed afterwards if a test failed half-way."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def start_in_cgroup(manager: CgroupManager, relative: str, code: str) -> subprocess.Popen:
    """Run Python code that is in the cgroup before it execs, so all its memory is charged there."""
    return subprocess.Popen(
        [sys.executable, "-c", code],
        preexec_fn=lambda: manager.add_process(relative, os.getpid()),  # runs in the child
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


# --- unit: detection ---------------------------------------------------------

V1_MOUNTS = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/freezer cgroup rw,relatime,freezer 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
"""

COMOUNT_MOUNTS = """\
tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,nosuid,nodev,noexec,relatime,xattr,name=systemd 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,nosuid,nodev,noexec,relatime,pids 0 0
cgroup /sys/fs/cgroup/net_cls,net_prio cgroup rw,nosuid,nodev,noexec,relatime,net_cls,net_prio 0 0
"""

V2_MOUNTS = """\
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot 0 0
"""


def write_sample(tmp_path: Path, mounts: str, controllers: dict[str, str] | None = None) -> tuple[str, str]:
    """A mounts file plus a sysroot holding <mount point>/cgroup.controllers."""
    tmp_path.mkdir(exist_ok=True)
    mounts_file = tmp_path / "mounts"
    mounts_file.write_text(mounts)
    sysroot = tmp_path / "root"
    for mount_point, text in (controllers or {}).items():
        directory = sysroot / mount_point.lstrip("/")
        directory.mkdir(parents=True)
        (directory / "cgroup.controllers").write_text(text)
    sysroot.mkdir(exist_ok=True)
    return str(mounts_file), str(sysroot)


def test_detect_v1_separate_hierarchies(tmp_path: Path) -> None:
    mounts, root = write_sample(tmp_path, V1_MOUNTS)
    mode = detect_mode(mounts, root=root)
    assert mode.version == 1
    assert mode.mounts["cpu"] == "/sys/fs/cgroup/cpu"
    assert mode.mounts["cpuacct"] == "/sys/fs/cgroup/cpuacct"
    assert mode.mounts["freezer"] == "/sys/fs/cgroup/freezer"
    assert "systemd" not in mode.mounts and "name=systemd" not in mode.mounts


def test_detect_hybrid_with_comounted_cpu_cpuacct(tmp_path: Path) -> None:
    # The cgroup2 mount is there but empty: its controllers are bound to the v1 hierarchies.
    mounts, root = write_sample(tmp_path, COMOUNT_MOUNTS, {"/sys/fs/cgroup/unified": "\n"})
    mode = detect_mode(mounts, root=root)
    assert mode.version == 1
    assert mode.mounts["cpu"] == mode.mounts["cpuacct"] == "/sys/fs/cgroup/cpu,cpuacct"
    assert mode.mounts["net_prio"] == "/sys/fs/cgroup/net_cls,net_prio"

    # The comounted hierarchy is used once: a process is written to it once.
    manager = CgroupManager(mode=mode)
    assert manager.procs_paths("kubepods/podx") == [
        "/sys/fs/cgroup/cpu,cpuacct/kubepods/podx/cgroup.procs",
        "/sys/fs/cgroup/memory/kubepods/podx/cgroup.procs",
        "/sys/fs/cgroup/pids/kubepods/podx/cgroup.procs",
    ]


def test_detect_v2(tmp_path: Path) -> None:
    controllers = {"/sys/fs/cgroup": "cpuset cpu io memory hugetlb pids rdma misc\n"}
    mounts, root = write_sample(tmp_path, V2_MOUNTS, controllers)
    assert detect_mode(mounts, root=root) == CgroupMode(2, {"unified": "/sys/fs/cgroup"})


def test_detect_prefers_a_v2_mount_with_controllers_over_v1(tmp_path: Path) -> None:
    # Hybrid host that has moved cpu/memory/pids to the unified mount.
    mounts_text = "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\ncgroup /sys/fs/cgroup/cpuset cgroup rw,cpuset 0 0\n"
    mounts, root = write_sample(tmp_path, mounts_text, {"/sys/fs/cgroup/unified": "cpu memory pids io\n"})
    assert detect_mode(mounts, root=root) == CgroupMode(2, {"unified": "/sys/fs/cgroup/unified"})


def test_detect_fails_without_usable_controllers(tmp_path: Path) -> None:
    # v2 without pids and no v1 hierarchies.
    mounts, root = write_sample(tmp_path, V2_MOUNTS, {"/sys/fs/cgroup": "cpu memory io\n"})
    with pytest.raises(CgroupError, match=r"/sys/fs/cgroup.*cpu\+memory\+pids"):
        detect_mode(mounts, root=root)
    mounts, root = write_sample(tmp_path / "none", "proc /proc proc rw 0 0\n")
    with pytest.raises(CgroupError, match="not mounted"):
        detect_mode(mounts, root=root)
    with pytest.raises(CgroupError, match="cannot read"):
        detect_mode(str(tmp_path / "missing"))


def test_detect_unescapes_mount_points(tmp_path: Path) -> None:
    mounts_text = "cgroup /cg\\040root/cpu cgroup rw,cpu 0 0\ncgroup /cg\\040root/memory cgroup rw,memory 0 0\n"
    mounts, root = write_sample(tmp_path, mounts_text)
    assert detect_mode(mounts, root=root).mounts == {"cpu": "/cg root/cpu", "memory": "/cg root/memory"}


# --- unit: names, files and values --------------------------------------------

V2_MODE = CgroupMode(2, {"unified": "/sys/fs/cgroup"})


def test_pod_paths_honour_the_root_name() -> None:
    pod = guaranteed_pod()
    uid = pod["metadata"]["uid"]
    manager = CgroupManager(mode=V2_MODE, root="emu")
    assert manager.pod_path(pod) == f"emu/pod{uid}"
    assert manager.pod_path(burstable_pod()).startswith("emu/burstable/pod")
    assert manager.pod_path(best_effort_pod()).startswith("emu/besteffort/pod")
    assert manager.container_path(pod, "a") == f"emu/pod{uid}/a"
    with pytest.raises(ValueError):
        manager.container_path(pod, "../escape")


def test_systemd_names() -> None:
    pod = burstable_pod()
    uid_ = pod["metadata"]["uid"].replace("-", "_")
    default = CgroupManager(mode=V2_MODE, driver="systemd")
    expected = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice"
    assert default.pod_path(pod) == expected == pod_cgroup_parent(pod, "systemd")
    assert default.root_path == "kubepods.slice"
    # "-" would mean nesting to systemd, so a custom root is escaped like every other part.
    custom = CgroupManager(mode=V2_MODE, root="my-pods", driver="systemd")
    assert custom.pod_path(pod) == f"my_pods.slice/my_pods-burstable.slice/my_pods-burstable-pod{uid_}.slice"
    assert (
        CgroupManager(mode=V2_MODE, driver="systemd")
        .pod_path(guaranteed_pod())
        .startswith("kubepods.slice/kubepods-pod")
    )


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="driver"):
        CgroupManager(mode=V2_MODE, driver="launchd")
    with pytest.raises(ValueError, match="single name"):
        CgroupManager(mode=V2_MODE, root="a/b")
    manager = CgroupManager(mode=V2_MODE)
    for bad in ("", "/kubepods", "kubepods/../etc", "kubepods//x"):
        with pytest.raises(ValueError):
            manager.absolute_paths(bad)


def test_v2_paths() -> None:
    manager = CgroupManager(mode=V2_MODE)
    assert manager.absolute_paths("kubepods/podx/c") == ["/sys/fs/cgroup/kubepods/podx/c"]
    assert manager.procs_paths("kubepods/podx/c") == ["/sys/fs/cgroup/kubepods/podx/c/cgroup.procs"]


def test_v2_settings_for_the_overhead_example() -> None:
    config = pod_resource_config(guaranteed_pod())
    assert v2_settings(config) == {
        "cpu.weight": "88",  # 1 + (2304-2)*9999/262142
        "cpu.max": "225000 100000",
        "memory.max": "335544320",
        "pids.max": "max",
    }


def test_unset_values_reset_to_unlimited() -> None:
    assert v2_settings(ResourceConfig()) == {
        "cpu.weight": "100",
        "cpu.max": "max 100000",
        "memory.max": "max",
        "pids.max": "max",
    }
    assert v1_settings(ResourceConfig()) == {
        "cpu.shares": "1024",
        "cpu.cfs_period_us": "100000",
        "cpu.cfs_quota_us": "-1",
        "memory.limit_in_bytes": "-1",
        "pids.max": "max",
    }
    assert v2_settings(ResourceConfig(cpu_shares=2, pids_limit=64))["pids.max"] == "64"
    # Swap only when asked for (containers under NoSwap): 0, so memory.max means an OOM kill.
    assert v2_settings(ResourceConfig(swap_limit=0))["memory.swap.max"] == "0"


def test_subtree_control_files_cover_every_ancestor() -> None:
    assert subtree_control_files("/sys/fs/cgroup", "kubepods/burstable/podx/c") == [
        "/sys/fs/cgroup/cgroup.subtree_control",
        "/sys/fs/cgroup/kubepods/cgroup.subtree_control",
        "/sys/fs/cgroup/kubepods/burstable/cgroup.subtree_control",
        "/sys/fs/cgroup/kubepods/burstable/podx/cgroup.subtree_control",
    ]


def test_missing_controllers_line() -> None:
    assert missing_controllers("") == "+cpu +memory +pids"
    assert missing_controllers("\n") == "+cpu +memory +pids"
    assert missing_controllers("cpuset cpu io memory\n") == "+pids"
    assert missing_controllers("cpu io memory hugetlb pids rdma\n") == ""


def test_parse_v2_stat_files() -> None:
    events = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n"
    assert parse_flat_keyed(events)["oom_kill"] == 2
    cpu_stat = "usage_usec 1534\nuser_usec 1000\nsystem_usec 534\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n"
    assert parse_flat_keyed(cpu_stat)["usage_usec"] * 1000 == 1534000
    memory_stat = "anon 1048576\nfile 8192\ninactive_file 4096\nactive_file 4096\n"
    assert working_set(2 * MI, parse_flat_keyed(memory_stat), "inactive_file") == 2 * MI - 4096
    assert working_set(100, {"inactive_file": 4096}, "inactive_file") == 0


def test_parse_v1_oom_control() -> None:
    assert parse_flat_keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 4\n")["oom_kill"] == 4
    assert parse_flat_keyed("oom_kill_disable 0\nunder_oom 0\n").get("oom_kill", 0) == 0  # older kernels


# --- integration: cgroup v1 (this host) -----------------------------------------


def v1_dir(hierarchy: str, relative: str) -> Path:
    assert HOST is not None
    return Path(HOST.mounts[hierarchy]) / relative


@requires_v1
def test_v1_guaranteed_pod(make_manager: Callable[..., CgroupManager]) -> None:
    manager = make_manager()
    pod = guaranteed_pod()
    manager.ensure_pod(pod, pod_resource_config(pod))
    manager.ensure_pod(pod, pod_resource_config(pod))  # idempotent
    relative = manager.pod_path(pod)
    assert relative == f"{manager.root}/pod{pod['metadata']['uid']}"

    cpu, memory = v1_dir("cpu", relative), v1_dir("memory", relative)
    assert read(memory / "memory.limit_in_bytes") == "335544320"
    assert read(cpu / "cpu.cfs_quota_us") == "225000"
    assert read(cpu / "cpu.cfs_period_us") == "100000"
    assert read(cpu / "cpu.shares") == "2304"
    assert read(v1_dir("pids", relative) / "pids.max") == "max"
    assert v1_dir("cpuacct", relative).is_dir()
    assert manager.read_values(relative) == {
        "cpu.shares": "2304",
        "cpu.cfs_quota_us": "225000",
        "cpu.cfs_period_us": "100000",
        "memory.limit_in_bytes": "335544320",
        "pids.max": "max",
    }


@requires_v1
def test_v1_burstable_pod_without_cpu_limit_has_no_quota(make_manager: Callable[..., CgroupManager]) -> None:
    manager = make_manager()
    pod = burstable_pod()
    manager.ensure_pod(pod, pod_resource_config(pod))
    relative = manager.pod_path(pod)
    assert relative.startswith(f"{manager.root}/burstable/pod")
    assert read(v1_dir("cpu", relative) / "cpu.cfs_quota_us") == "-1"
    assert read(v1_dir("cpu", relative) / "cpu.shares") == str((500 + 100) * 1024 // 1000)
    # "b" has no memory limit either, so the pod's memory stays unlimited.
    assert int(read(v1_dir("memory", relative) / "memory.limit_in_bytes")) > UNLIMITED_V1_MEMORY


@requires_v1
def test_v1_best_effort_pod_and_pids_limit(make_manager: Callable[..., CgroupManager]) -> None:
    manager = make_manager()
    pod = best_effort_pod()
    manager.ensure_pod(pod, pod_resource_config(pod, pod_pids_limit=128))
    relative = manager.pod_path(pod)
    assert relative.startswith(f"{manager.root}/besteffort/pod")
    assert read(v1_dir("cpu", relative) / "cpu.shares") == "2"
    assert read(v1_dir("pids", relative) / "pids.max") == "128"


@requires_v1
def test_v1_reapplying_without_limits_resets_them(make_manager: Callable[..., CgroupManager]) -> None:
    manager = make_manager()
    pod = guaranteed_pod()
    manager.ensure_pod(
        pod, ResourceConfig(cpu_shares=512, cpu_quota=50000, cpu_period=100000, memory_limit=64 * MI, pids_limit=10)
    )
    manager.ensure_pod(pod, ResourceConfig())
    values = manager.read_values(manager.pod_path(pod))
    assert values["cpu.shares"] == "1024"
    assert values["cpu.cfs_quota_us"] == "-1"
    assert int(values["memory.limit_in_bytes"]) > UNLIMITED_V1_MEMORY
    assert values["pids.max"] == "max"


@requires_v1
def test_v1_container_cgroup_limits(make_manager: Callable[..., CgroupManager]) -> None:
    manager = make_manager()
    pod = guaranteed_pod()
    manager.ensure_pod(pod, pod_resource_config(pod))
    container = pod["spec"]["containers"][1]
    relative = manager.ensure_container(pod, "b", container_resource_config(container))
    assert relative == manager.pod_path(pod) + "/b"
    assert read(v1_dir("cpu", relative) / "cpu.cfs_quota_us") == "150000"
    assert read(v1_dir("cpu", relative) / "cpu.shares") == "1536"
    assert read(v1_dir("memory", relative) / "memory.limit_in_bytes") == str(100 * MI)
    for path in manager.absolute_paths(relative):
        assert os.path.isdir(path)


@requires_v1
def test_v1_child_quota_above_parent_is_explained(make_manager: Callable[..., CgroupManager]) -> None:
    manager = make_manager()
    pod = guaranteed_pod()
    manager.ensure_pod(pod, pod_resource_config(pod))
    with pytest.raises(CgroupError, match=r"cpu/.*/greedy.*may not exceed its parent"):
        manager.ensure_container(pod, "greedy", ResourceConfig(cpu_quota=400000, cpu_period=100000))


@requires_v1
def test_v1_process_placement_and_removal(
    make_manager: Callable[..., CgroupManager], processes: list[subprocess.Popen]
) -> None:
    manager = make_manager()
    pod = guaranteed_pod()
    manager.ensure_pod(pod, pod_resource_config(pod))
    relative = manager.ensure_container(pod, "a", container_resource_config(pod["spec"]["containers"][0]))
    sleeper = subprocess.Popen(["sleep", "30"])
    processes.append(sleeper)
    manager.add_process(relative, sleeper.pid)

    procs_files = manager.procs_paths(relative)
    assert [Path(p).parent.parent.parent.parent for p in procs_files] == [
        Path(HOST.mounts[h]) for h in ("cpu", "cpuacct", "memory", "pids")
    ]
    for procs in procs_files:
        assert str(sleeper.pid) in read(procs).split()
    assert manager.pids(manager.pod_path(pod)) == [sleeper.pid]
    assert manager.pids(manager.root_path) == [sleeper.pid]

    manager.remove(manager.pod_path(pod))
    assert sleeper.wait(timeout=5) == -9
    for path in [*manager.absolute_paths(relative), *manager.absolute_paths(manager.pod_path(pod))]:
        assert not os.path.exists(path)
    manager.remove(manager.pod_path(pod))  # already gone: fine
    assert os.path.isdir(v1_dir("memory", manager.root_path))  # the root stays for other pods


@requires_v1
def test_v1_remove_without_kill_reports_the_processes(
    make_manager: Callable[..., CgroupManager], processes: list[subprocess.Popen]
) -> None:
    manager = make_manager()
    pod = best_effort_pod()
    manager.ensure_pod(pod, pod_resource_config(pod))
    relative = manager.ensure_container(pod, "a", ResourceConfig(cpu_shares=2))
    sleeper = subprocess.Popen(["sleep", "30"])
    processes.append(sleeper)
    manager.add_process(relative, sleeper.pid)
    with pytest.raises(CgroupError, match=rf"{relative}.*processes \[{sleeper.pid}\].*kill=True"):
        manager.remove(relative, kill=False)
    assert sleeper.poll() is None
    manager.remove(relative)
    assert sleeper.wait(timeout=5) == -9


@requires_v1
def test_v1_errors_name_the_cgroup(make_manager: Callable[..., CgroupManager]) -> None:
    manager = make_manager()
    with pytest.raises(CgroupError, match=rf"{manager.root}/nope does not exist.*ensure_pod"):
        manager.read_values(f"{manager.root}/nope")
    with pytest.raises(CgroupError, match="No such file"):
        manager.add_process(f"{manager.root}/nope", os.getpid())


@requires_v1
def test_v1_systemd_naming_creates_slices(processes: list[subprocess.Popen]) -> None:
    # Real kubepods.slice names; only what this test created is removed afterwards.
    manager = CgroupManager(mode=HOST, driver="systemd")
    pod = burstable_pod()
    uid_ = pod["metadata"]["uid"].replace("-", "_")
    relative = manager.pod_path(pod)
    parents = ["kubepods.slice/kubepods-burstable.slice", "kubepods.slice"]
    existed = {p: os.path.exists(v1_dir("memory", p)) for p in parents}
    try:
        manager.ensure_pod(pod, pod_resource_config(pod))
        expected = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice"
        assert relative == expected
        for hierarchy in ("cpu", "cpuacct", "memory", "pids"):
            assert v1_dir(hierarchy, expected).is_dir()
        container = manager.ensure_container(pod, "a", ResourceConfig(cpu_shares=512))
        assert read(v1_dir("cpu", container) / "cpu.shares") == "512"
    finally:
        manager.remove(relative)
        for parent in parents:
            if not existed[parent]:
                for path in manager.absolute_paths(parent):
                    with contextlib.suppress(OSError):  # someone else's pod arrived meanwhile
                        os.rmdir(path)


@requires_v1
def test_v1_oom_kill_is_counted(make_manager: Callable[..., CgroupManager], processes: list[subprocess.Popen]) -> None:
    manager = make_manager()
    pod = make_pod([ctr("hog", limits={"cpu": "500m", "memory": "32Mi"})])
    manager.ensure_pod(pod, pod_resource_config(pod))
    relative = manager.ensure_container(pod, "hog", container_resource_config(pod["spec"]["containers"][0]))
    assert read(v1_dir("memory", relative) / "memory.limit_in_bytes") == str(32 * MI)
    assert manager.oom_kills(relative) == 0

    hog = start_in_cgroup(manager, relative, "b = bytearray(100*1024*1024); import time; time.sleep(1)")
    processes.append(hog)
    assert hog.wait(timeout=30) == -9
    assert manager.oom_kills(relative) >= 1
    assert manager.oom_kills(manager.pod_path(pod)) >= 1  # counted for the pod too, as v2 does


@requires_v1
def test_v1_usage(make_manager: Callable[..., CgroupManager], processes: list[subprocess.Popen]) -> None:
    manager = make_manager()
    pod = best_effort_pod()
    manager.ensure_pod(pod, pod_resource_config(pod))
    relative = manager.ensure_container(pod, "a", ResourceConfig(cpu_shares=2))
    code = "b = bytearray(40*1024*1024); sum(range(3_000_000)); import time; time.sleep(30)"
    worker = start_in_cgroup(manager, relative, code)
    processes.append(worker)

    deadline = time.monotonic() + 10
    while (usage := manager.usage(relative))["memory_working_set_bytes"] < 40 * MI and time.monotonic() < deadline:
        time.sleep(0.1)
    assert usage["memory_working_set_bytes"] >= 40 * MI
    assert usage["memory_usage_bytes"] >= usage["memory_working_set_bytes"]
    assert usage["cpu_usage_ns"] > 0
    pod_usage = manager.usage(manager.pod_path(pod))  # hierarchical
    assert pod_usage["memory_usage_bytes"] >= 40 * MI


# --- integration: cgroup v2 -------------------------------------------------------


def unified() -> Path:
    assert HOST is not None
    return Path(HOST.mounts["unified"])


@requires_v2
def test_v2_guaranteed_pod_and_container(make_manager: Callable[..., CgroupManager]) -> None:
    manager = make_manager()
    pod = guaranteed_pod()
    manager.ensure_pod(pod, pod_resource_config(pod))
    manager.ensure_pod(pod, pod_resource_config(pod))  # idempotent
    relative = manager.pod_path(pod)
    directory = unified() / relative
    assert read(directory / "memory.max") == "335544320"
    assert read(directory / "cpu.max") == "225000 100000"
    assert read(directory / "cpu.weight") == "88"
    assert read(directory / "pids.max") == "max"
    for control in subtree_control_files(str(unified()), relative):
        assert {"cpu", "memory", "pids"} <= set(read(control).split())

    container = manager.ensure_container(pod, "b", container_resource_config(pod["spec"]["containers"][1]))
    assert {"cpu", "memory", "pids"} <= set(read(directory / "cgroup.subtree_control").split())
    assert manager.read_values(container) == {
        "cpu.weight": "59",
        "cpu.max": "150000 100000",
        "memory.max": str(100 * MI),
        "pids.max": "max",
    }
    manager.ensure_pod(pod, ResourceConfig())
    assert manager.read_values(relative)["memory.max"] == "max"
    assert manager.read_values(relative)["cpu.max"] == "max 100000"


@requires_v2
def test_v2_process_placement_removal_and_oom(
    make_manager: Callable[..., CgroupManager], processes: list[subprocess.Popen]
) -> None:
    manager = make_manager()
    pod = make_pod([ctr("hog", limits={"cpu": "500m", "memory": "32Mi"}), ctr("s")])
    manager.ensure_pod(pod, pod_resource_config(pod, pod_pids_limit=64))
    assert read(unified() / manager.pod_path(pod) / "pids.max") == "64"
    sleep_cgroup = manager.ensure_container(pod, "s", ResourceConfig(cpu_shares=2))
    sleeper = subprocess.Popen(["sleep", "30"])
    processes.append(sleeper)
    manager.add_process(sleep_cgroup, sleeper.pid)
    assert manager.procs_paths(sleep_cgroup) == [str(unified() / sleep_cgroup / "cgroup.procs")]
    assert str(sleeper.pid) in read(unified() / sleep_cgroup / "cgroup.procs").split()

    hog_cgroup = manager.ensure_container(pod, "hog", container_resource_config(pod["spec"]["containers"][0]))
    hog = start_in_cgroup(manager, hog_cgroup, "b = bytearray(100*1024*1024); import time; time.sleep(1)")
    processes.append(hog)
    assert hog.wait(timeout=30) == -9
    assert manager.oom_kills(hog_cgroup) >= 1
    assert manager.oom_kills(manager.pod_path(pod)) >= 1
    events = parse_flat_keyed(read(unified() / hog_cgroup / "memory.events"))
    assert events["oom"] >= 1 and events["oom_kill"] >= 1
    swap_max = unified() / hog_cgroup / "memory.swap.max"
    if swap_max.exists():  # with swap on, anything else swaps the hog out instead (no OOM kill)
        assert read(swap_max) == "0"
    print(f"v2 OOM: exit {hog.returncode}, memory.events {events}, memory.swap.max {read(swap_max)}")
    assert manager.usage(sleep_cgroup)["cpu_usage_ns"] >= 0

    manager.remove(manager.pod_path(pod))
    assert sleeper.wait(timeout=5) == -9
    assert not (unified() / manager.pod_path(pod)).exists()


@requires_v2
def test_v2_top_cgroup_with_processes_moves_them_into_a_leaf(
    make_manager: Callable[..., CgroupManager], processes: list[subprocess.Popen]
) -> None:
    """A containerized host: the cgroup the agent sees as its root holds processes (EBUSY)."""
    top = unified() / f"kubelet-emu-test-ns-{uuid.uuid4().hex[:8]}"
    top.mkdir()
    try:
        sleeper = subprocess.Popen(["sleep", "30"])
        processes.append(sleeper)
        (top / "cgroup.procs").write_text(str(sleeper.pid))
        # Seen from inside, `top` is the mount root of its own cgroup namespace.
        manager = make_manager(mode=CgroupMode(2, {"unified": str(top)}))
        done = manager.make_room_for_children()
        assert done == f"moved 1 processes from {top} into {top}/init to enable +cpu +memory +pids for Pods"
        assert read(top / "init" / "cgroup.procs").split() == [str(sleeper.pid)]
        assert read(top / "cgroup.procs") == ""
        assert {"cpu", "memory", "pids"} <= set(read(top / "cgroup.subtree_control").split())
        assert manager.make_room_for_children() == ""  # idempotent
        pod = guaranteed_pod()
        manager.ensure_pod(pod, pod_resource_config(pod))
        assert read(top / manager.pod_path(pod) / "memory.max") == "335544320"
        manager.remove(manager.root_path)
    finally:
        sleeper.kill()
        sleeper.wait()
        for leftover in (top / "init", top):
            with contextlib.suppress(FileNotFoundError):
                leftover.rmdir()


# The hybrid host's cgroup2 mount has no controllers, but process placement, cgroup.kill
# and rmdir on it are real v2 behaviour, so that part of the v2 path is tested for real here.
_HYBRID_UNIFIED = "/sys/fs/cgroup/unified"


@pytest.mark.skipif(
    not (IS_ROOT and HOST and HOST.version == 1 and os.path.exists(f"{_HYBRID_UNIFIED}/cgroup.procs")),
    reason="needs root on a hybrid host with cgroup2 at /sys/fs/cgroup/unified",
)
def test_v2_processes_on_the_hybrid_unified_mount(
    make_manager: Callable[..., CgroupManager], processes: list[subprocess.Popen]
) -> None:
    manager = make_manager(mode=CgroupMode(2, {"unified": _HYBRID_UNIFIED}))
    pod = best_effort_pod()
    # Enabling cpu/memory/pids must fail with a message that says why.
    with pytest.raises(CgroupError, match=r"unified/cgroup.subtree_control.*bound to a cgroup v1"):
        manager.ensure_pod(pod, ResourceConfig())
    relative = manager.container_path(pod, "a")
    os.makedirs(manager.absolute_paths(relative)[0])  # plain directories, no controllers needed
    sleeper = subprocess.Popen(["sleep", "30"])
    processes.append(sleeper)
    manager.add_process(relative, sleeper.pid)
    assert manager.pids(manager.root_path) == [sleeper.pid]
    manager.remove(manager.pod_path(pod))  # cgroup.kill, then rmdir deepest first
    assert sleeper.wait(timeout=5) == -9
    assert not os.path.exists(manager.absolute_paths(manager.pod_path(pod))[0])
