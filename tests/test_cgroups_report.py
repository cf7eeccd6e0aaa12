"""`kubelet-emu cgroups`: agent.cgroups_report and the CLI command.

The breakdown and the text are unit tested; collect() runs against a fake cgroup tree in a tmp dir;
one test creates a real Pod cgroup (root, cgroup v1 or v2) and runs the real CLI on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ctr, host_cgroup_mode

from agent.cgroups_report import breakdown, collect, format_bytes, format_cpu, format_table
from cgroups.detect import CgroupMode
from cgroups.manager import CgroupManager
from cgroups.resources import pod_resource_config

REPO = Path(__file__).resolve().parent.parent
MI = 1024 * 1024
UID = "0a1b2c3d-4444-5555-6666-777788889999"


HOST = host_cgroup_mode()
requires_root_cgroups = pytest.mark.skipif(
    not (os.geteuid() == 0 and HOST is not None), reason="needs root and usable cgroups (v1 or v2)"
)


def make_pod(
    containers: list[dict],
    init: list[dict] | None = None,
    overhead: dict | None = None,
    name: str = "web",
    uid: str = UID,
) -> dict:
    spec: dict[str, Any] = {"containers": containers}
    if init:
        spec["initContainers"] = init
    if overhead:
        spec["overhead"] = overhead
    return {"metadata": {"namespace": "default", "name": name, "uid": uid}, "spec": spec}


def worked_example(uid: str = UID) -> dict:
    """Two containers (cpu limits 500m/1500m, memory 100Mi each, requests 100m/50Mi each) + overhead 250m/120Mi."""
    return make_pod(
        [
            ctr("app", {"cpu": "100m", "memory": "50Mi"}, {"cpu": "500m", "memory": "100Mi"}),
            ctr("helper", {"cpu": "100m", "memory": "50Mi"}, {"cpu": "1500m", "memory": "100Mi"}),
        ],
        overhead={"cpu": "250m", "memory": "120Mi"},
        uid=uid,
    )


def write_record(state_dir: Path, pod: dict, cgroup: str, handler: str = "procs") -> Path:
    """pod.json exactly as the process backend writes it."""
    meta = pod["metadata"]
    pod_dir = state_dir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
    pod_dir.mkdir(parents=True, exist_ok=True)
    record = {"pod": pod, "handler": handler, "backend": "process", "cgroup": cgroup}
    (pod_dir / "pod.json").write_text(json.dumps(record))
    return pod_dir / "pod.json"


# --- breakdown -----------------------------------------------------------------------------------


def test_breakdown_of_the_worked_example() -> None:
    b = breakdown(worked_example())
    assert b["qos"] == "Burstable"
    assert [(c["name"], c["init"]) for c in b["containers"]] == [("app", False), ("helper", False)]
    assert b["containers"][0]["requests"] == {"cpu": 100, "memory": 50 * MI}
    assert b["containers"][0]["limits"] == {"cpu": 500, "memory": 100 * MI}
    assert b["containers"][1]["limits"] == {"cpu": 1500, "memory": 100 * MI}
    assert b["overhead"] == {"cpu": 250, "memory": 120 * MI}
    assert b["totals"]["requests"] == {"cpu": 450, "memory": 220 * MI}
    assert b["totals"]["limits"] == {"cpu": 2250, "memory": 320 * MI}
    assert b["resource_config"]["memory_limit"] == 335544320
    assert b["resource_config"]["cpu_quota"] == 225000
    assert b["resource_config"]["cpu_period"] == 100000
    assert b["resource_config"]["cpu_shares"] == 460  # 450m * 1024 / 1000
    assert b["expected"]["v1"] == {
        "cpu.shares": "460",
        "cpu.cfs_period_us": "100000",
        "cpu.cfs_quota_us": "225000",
        "memory.limit_in_bytes": "335544320",
        "pids.max": "max",
    }
    assert b["expected"]["v2"]["cpu.max"] == "225000 100000"
    assert b["expected"]["v2"]["memory.max"] == "335544320"
    assert b["notes"] == []


def test_breakdown_without_a_memory_limit_on_one_container() -> None:
    pod = make_pod(
        [
            ctr("app", {"cpu": "100m", "memory": "50Mi"}, {"cpu": "500m", "memory": "100Mi"}),
            ctr("cache", {"cpu": "100m", "memory": "50Mi"}, {"cpu": "500m"}),
        ]
    )
    b = breakdown(pod, pod_pids_limit=256)
    assert b["qos"] == "Burstable"
    assert b["containers"][1]["limits"] == {"cpu": 500, "memory": None}
    assert b["overhead"] == {"cpu": None, "memory": None}
    assert b["resource_config"]["memory_limit"] is None  # one container may use any memory
    assert b["expected"]["v1"]["memory.limit_in_bytes"] == "-1"
    assert b["expected"]["v2"]["memory.max"] == "max"
    assert b["expected"]["v1"]["cpu.cfs_quota_us"] == "100000"  # both containers cap cpu
    assert b["expected"]["v1"]["pids.max"] == "256"
    assert b["notes"] == ["no Pod memory limit: cache sets no memory limit"]


def test_breakdown_marks_init_containers_and_defaults_requests_to_limits() -> None:
    pod = make_pod(
        [ctr("app", limits={"cpu": "1", "memory": "64Mi"})],
        init=[ctr("setup", limits={"cpu": "2", "memory": "32Mi"}), ctr("log", {"cpu": "50m"}, restartPolicy="Always")],
    )
    b = breakdown(pod)
    by_name = {c["name"]: c for c in b["containers"]}
    assert by_name["setup"]["init"] and not by_name["setup"]["sidecar"]
    assert by_name["log"]["init"] and by_name["log"]["sidecar"]
    assert not by_name["app"]["init"]
    assert by_name["app"]["requests"] == {"cpu": 1000, "memory": 64 * MI}
    assert by_name["log"]["limits"] == {"cpu": None, "memory": None}
    # Init containers count by their max: setup's 2 cpu beats app + log.
    assert b["totals"]["requests"]["cpu"] == 2000


def test_best_effort_pod() -> None:
    b = breakdown(make_pod([ctr("app")]))
    assert b["qos"] == "BestEffort"
    assert b["totals"] == {"requests": {"cpu": None, "memory": None}, "limits": {"cpu": None, "memory": None}}
    assert b["expected"]["v1"]["cpu.shares"] == "2"
    assert b["expected"]["v1"]["memory.limit_in_bytes"] == "-1"


def test_units() -> None:
    assert format_cpu(250) == "250m"
    assert format_cpu(2000) == "2"
    assert format_cpu(None) == "-"
    assert format_bytes(120 * MI) == "120Mi"
    assert format_bytes(10**8) == "100M"
    assert format_bytes(1234567) == "1234567"
    assert format_bytes(None) == "-"


# --- collect() and the text on a fake v1 cgroup tree -------------------------------------------------


@pytest.fixture
def fake_v1(tmp_path: Path) -> CgroupManager:
    mounts = {name: str(tmp_path / "cgroup" / name) for name in ("cpu", "memory", "pids")}
    return CgroupManager(mode=CgroupMode(1, mounts), root="kubepods")


def fake_cgroup(manager: CgroupManager, relative: str, values: dict[str, str]) -> None:
    hierarchy = {"cpu.shares": "cpu", "cpu.cfs_quota_us": "cpu", "cpu.cfs_period_us": "cpu"}
    for path in manager.absolute_paths(relative):
        os.makedirs(path)
    for name, value in values.items():
        directory = manager.mode.mounts[hierarchy.get(name, name.split(".")[0])]
        Path(directory, relative, name).write_text(value + "\n")


def test_collect_reads_values_and_marks_differences(tmp_path: Path, fake_v1: CgroupManager) -> None:
    pod = worked_example()
    relative = fake_v1.pod_path(pod)
    write_record(tmp_path / "state", pod, relative)
    fake_cgroup(
        fake_v1,
        relative,
        {
            "cpu.shares": "460",
            "cpu.cfs_quota_us": "200000",  # someone changed it by hand
            "cpu.cfs_period_us": "100000",
            "memory.limit_in_bytes": "335544320",
            "pids.max": "max",
        },
    )
    [report] = collect(tmp_path / "state", fake_v1)
    assert report["handler"] == "procs"
    assert report["cgroup"] == f"kubepods/burstable/pod{UID}"
    assert report["cgroup_path"] == os.path.join(fake_v1.mode.mounts["memory"], relative)
    assert report["values"]["memory.limit_in_bytes"] == "335544320"
    assert report["differs"] == ["cpu.cfs_quota_us"]

    text = format_table([report])
    lines = text.splitlines()
    assert lines[0] == f"default/web  handler=procs  qos=Burstable  cgroup={report['cgroup_path']}"
    assert lines[1].split() == ["CONTAINER", "CPU", "REQ", "CPU", "LIM", "MEM", "REQ", "MEM", "LIM"]
    assert lines[2].split() == ["app", "100m", "500m", "50Mi", "100Mi"]
    assert lines[3].split() == ["helper", "100m", "1500m", "50Mi", "100Mi"]
    assert lines[4].split() == ["overhead", "250m", "250m", "120Mi", "120Mi"]
    assert lines[5].split() == ["total", "450m", "2250m", "220Mi", "320Mi"]
    by_file = {line.split()[0]: line for line in lines[7:]}
    assert by_file["memory.limit_in_bytes"].split() == ["memory.limit_in_bytes", *["335544320", "(320Mi)"] * 2]
    assert by_file["cpu.cfs_quota_us/cpu.cfs_period_us"].split() == [
        "cpu.cfs_quota_us/cpu.cfs_period_us",
        "200000/100000",
        "(2)",
        "225000/100000",
        "(2250m)",
        "<-",
        "differs",
    ]
    assert "differs" not in by_file["cpu.shares"]


def test_unlimited_and_page_rounded_values_match(tmp_path: Path, fake_v1: CgroupManager) -> None:
    pod = make_pod([ctr("app", {"cpu": "100m", "memory": "1000001"})])  # no limits: nothing capped
    relative = fake_v1.pod_path(pod)
    write_record(tmp_path / "state", pod, relative)
    fake_cgroup(
        fake_v1,
        relative,
        {
            "cpu.shares": "102",
            "cpu.cfs_quota_us": "-1",
            "cpu.cfs_period_us": "100000",
            "memory.limit_in_bytes": "9223372036854771712",  # how v1 shows -1
            "pids.max": "max",
        },
    )
    [report] = collect(tmp_path / "state", fake_v1)
    assert report["differs"] == []
    assert "9223372036854771712 (unlimited)" in format_table([report])


def test_collect_notes_a_gone_cgroup_and_filters(tmp_path: Path, fake_v1: CgroupManager) -> None:
    state = tmp_path / "state"
    write_record(state, worked_example(), "kubepods/burstable/pod" + UID)
    other = make_pod([ctr("app")], name="batch", uid=str(uuid.uuid4()))
    write_record(state, other, fake_v1.pod_path(other))
    reports = collect(state, fake_v1)
    assert [r["name"] for r in reports] == ["batch", "web"]
    assert all(r["values"] is None and "cgroup gone" in r["notes"] for r in reports)
    assert "(cgroup gone)" in format_table(reports)
    assert [r["name"] for r in collect(state, fake_v1, only="default/web")] == ["web"]
    assert collect(state, fake_v1, only="default/nope") == []
    assert collect(tmp_path, fake_v1) == []  # no pods/ yet
    with pytest.raises(FileNotFoundError):
        collect(tmp_path / "missing", fake_v1)


def test_collect_reports_a_broken_record(tmp_path: Path, fake_v1: CgroupManager) -> None:
    pod_dir = tmp_path / "pods" / f"default_web_{UID}"
    pod_dir.mkdir(parents=True)
    (pod_dir / "pod.json").write_text("{not json")
    [report] = collect(tmp_path, fake_v1)
    assert (report["namespace"], report["name"]) == ("default", "web")
    assert format_table([report]).startswith("default/web  error: cannot read ")


# --- the CLI -------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "cgroups", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def write_config(path: Path, cgroup_root: str) -> Path:
    path.write_text(f'[node]\ncgroup_root = "{cgroup_root}"\n\n[runtimes.x]\nbackend = "emulated"\n')
    return path


@pytest.fixture
def real_manager() -> Iterator[CgroupManager]:
    manager = CgroupManager(root=f"kubelet-emu-test-{uuid.uuid4().hex[:8]}")
    yield manager
    manager.remove(manager.root_path)
    assert not any(os.path.exists(p) for p in manager.absolute_paths(manager.root_path))


@requires_root_cgroups
def test_cli_on_a_real_pod_cgroup(tmp_path: Path, real_manager: CgroupManager) -> None:
    pod = worked_example(uid=str(uuid.uuid4()))
    real_manager.ensure_pod(pod, pod_resource_config(pod))
    relative = real_manager.pod_path(pod)
    state = tmp_path / "state"
    write_record(state, pod, relative)
    config = write_config(tmp_path / "agent.toml", real_manager.root)

    text = run_cli("--state-dir", str(state), "--config", str(config))
    assert text.returncode == 0, text.stderr
    out = text.stdout
    hierarchy = "unified" if real_manager.mode.version == 2 else "memory"
    header = out.splitlines()[0]
    assert header == (
        f"default/web  handler=procs  qos=Burstable  "
        f"cgroup={os.path.join(real_manager.mode.mounts[hierarchy], relative)}"
    )
    assert "335544320 (320Mi)" in out
    assert "225000" in out
    assert "differs" not in out
    for row in (["overhead", "250m", "250m", "120Mi", "120Mi"], ["total", "450m", "2250m", "220Mi", "320Mi"]):
        assert any(line.split() == row for line in out.splitlines()), out

    result = run_cli("default/web", "--json", "--state-dir", str(state), "--config", str(config))
    assert result.returncode == 0, result.stderr
    [report] = json.loads(result.stdout)
    assert report["cgroup"] == relative
    assert report["differs"] == []
    assert report["totals"]["limits"] == {"cpu": 2250, "memory": 335544320}
    assert [c["name"] for c in report["containers"]] == ["app", "helper"]
    assert report["overhead"] == {"cpu": 250, "memory": 120 * MI}
    if real_manager.mode.version == 1:
        assert report["values"]["memory.limit_in_bytes"] == "335544320"
        assert report["values"]["cpu.cfs_quota_us"] == "225000"
        assert report["values"]["cpu.shares"] == "460"
    else:
        assert report["values"]["memory.max"] == "335544320"
        assert report["values"]["cpu.max"] == "225000 100000"

    # The Pod's cgroup removed (agent gone or not): still shown, values gone.
    real_manager.remove(relative)
    gone = run_cli("--state-dir", str(state), "--config", str(config))
    assert gone.returncode == 0, gone.stderr
    assert "note: cgroup gone" in gone.stdout


requires_cgroups = pytest.mark.skipif(HOST is None, reason="no usable cgroups on this host")


@requires_cgroups
def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    write_record(state, worked_example(), "kubepods/burstable/pod" + UID)

    unknown = run_cli("default/nope", "--state-dir", str(state))
    assert unknown.returncode == 1
    assert unknown.stdout == ""
    assert unknown.stderr.count("\n") == 1
    assert unknown.stderr.startswith("kubelet-emu: no Pod default/nope with a cgroup in ")
    assert "default/web" in unknown.stderr

    missing = run_cli("--state-dir", str(tmp_path / "missing"))
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1
    assert missing.stderr.startswith("kubelet-emu: state dir ")

    bad = run_cli("web", "--state-dir", str(state))
    assert bad.returncode == 1
    assert bad.stderr.startswith("kubelet-emu: 'web' is not a Pod: give it as NAMESPACE/POD")


@requires_cgroups
def test_cli_without_pods(tmp_path: Path) -> None:
    empty = run_cli("--state-dir", str(tmp_path))
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout == f"no Pods with cgroups in {tmp_path}\n"
    as_json = run_cli("--json", "--state-dir", str(tmp_path))
    assert json.loads(as_json.stdout) == []


def test_breakdown_and_table_show_pod_level_resources() -> None:
    pod = make_pod([ctr("a"), ctr("b")], overhead={"cpu": "250m", "memory": "120Mi"})
    pod["spec"]["resources"] = {"limits": {"cpu": "1", "memory": "256Mi"}}
    b = breakdown(pod)
    assert b["pod_level"] == {
        "requests": {"cpu": 1000, "memory": 256 * MI},
        "limits": {"cpu": 1000, "memory": 256 * MI},
    }
    assert b["totals"]["limits"] == {"cpu": 1250, "memory": 376 * MI}
    assert b["expected"]["v1"]["cpu.cfs_quota_us"] == "125000"
    assert b["expected"]["v1"]["memory.limit_in_bytes"] == str(376 * MI)
    assert b["notes"] == []
    b.update(cgroup_path="/sys/fs/cgroup/memory/x", cgroup_version=1, values=None, differs=[], handler="procs")
    text = format_table([b])
    assert "pod-level (spec.resources)  1        1        256Mi    256Mi" in text
    assert "total                       1250m    1250m    376Mi    376Mi" in text
    assert "overhead                    250m     250m     120Mi    120Mi" in text
    assert breakdown(worked_example())["pod_level"] is None
