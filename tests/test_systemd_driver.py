"""cgroup_driver = "systemd" against a real systemd: the Pod's slice is a systemd unit whose
properties carry the Pod's limits (`systemctl show`), its containers live in the Pod's delegated
scope, and slice and scope disappear with the Pod.

Needs a host booted with systemd (PID 1) and its system D-Bus, as root. This machine's PID 1 is
not systemd, so here these tests skip; the systemd variant of the cgroup v2 lane boots Debian's
systemd in a VM and runs them there (tests/v2lane/lane.py systemd).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest
from conftest import REPO, Kubectl, agent_env, eventually, wait_node_ready

from cgroups.detect import CgroupError, detect_mode
from cgroups.manager import CgroupManager
from cgroups.resources import ResourceConfig, container_resource_config, pod_resource_config

MI = 2**20


def _no_systemd_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: systemd only creates transient slices for root"
    if not os.path.isdir("/run/systemd/system"):
        try:
            init = Path("/proc/1/comm").read_text().strip()
        except OSError:
            init = "unknown"
        return (
            f"this host is not booted with systemd (PID 1 is {init!r}); the systemd variant of the "
            "cgroup v2 lane runs these tests: tests/v2lane/lane.py systemd"
        )
    if not os.path.exists("/run/dbus/system_bus_socket"):
        return "systemd runs but the system D-Bus does not (/run/dbus/system_bus_socket): start dbus.service"
    if shutil.which("systemctl") is None:
        return "systemctl is not installed"
    return None


pytestmark = pytest.mark.skipif(_no_systemd_reason() is not None, reason=str(_no_systemd_reason()))


async def systemctl(*args: str, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        "systemctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if check and proc.returncode != 0:
        raise AssertionError(f"systemctl {' '.join(args)}: exit {proc.returncode}: {out.decode().strip()}")
    return out.decode()


async def show(unit: str, *properties: str) -> dict[str, str]:
    """`systemctl show UNIT -p P ...` as a dict, what a user would run."""
    out = await systemctl("show", unit, *(f"--property={p}" for p in properties))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


async def loaded_units(pattern: str) -> set[str]:
    """`systemctl list-units --all PATTERN`: the units systemd has loaded, whatever their state.
    (Not `systemctl show`: asking for a slice by name loads one, file or not.)"""
    out = await systemctl("list-units", "--all", "--plain", "--no-legend", "--no-pager", pattern)
    return {line.split()[0] for line in out.splitlines() if line.strip()}


async def wait_unloaded(*units: str) -> None:
    async def unloaded():
        left = {u for u in units if u in await loaded_units(u)}
        return None if left else True

    await eventually(unloaded, 15, what=f"systemd forgets {', '.join(units)}")


def _pod(name: str, containers: list[dict]) -> dict:
    return {
        "metadata": {"uid": str(uuid.uuid4()), "name": name, "namespace": "default"},
        "spec": {"containers": containers},
    }


def _in_cgroup(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text().strip().split("::", 1)[-1]


async def test_driver_creates_updates_and_removes_the_pods_units() -> None:
    manager = CgroupManager(detect_mode(), root=f"sd{uuid.uuid4().hex[:6]}", driver="systemd")
    limits = {"cpu": "500m", "memory": "128Mi"}
    pod = _pod("drv", [{"name": "app", "resources": {"requests": {"cpu": "250m"}, "limits": limits}}])
    relative = manager.pod_path(pod)
    pod_slice, scope = manager.unit_names(relative)
    sleeper: asyncio.subprocess.Process | None = None
    try:
        await manager.setup_pod(pod, pod_resource_config(pod, pod_pids_limit=100))
        got = await show(pod_slice, "ActiveState", "CPUWeight", "CPUQuotaPerSecUSec", "MemoryMax", "TasksMax", "Wants")
        print("systemctl show", pod_slice, got)
        assert got["ActiveState"] == "active"
        assert got["CPUQuotaPerSecUSec"] == "500ms"
        assert got["MemoryMax"] == str(128 * MI)
        assert got["TasksMax"] == "100"
        assert got["CPUWeight"] == "10"  # 250m -> 256 shares -> weight 10
        assert got["Wants"] == f"{manager.root}-burstable.slice"
        assert await show(scope, "Delegate", "ActiveState") == {"Delegate": "yes", "ActiveState": "active"}
        if manager.mode.version == 2:
            values = manager.read_values(relative)
            assert values["cpu.max"] == "50000 100000" and values["memory.max"] == str(128 * MI)
            assert values["pids.max"] == "100" and values["cpu.weight"] == "10"

        container = pod["spec"]["containers"][0]
        rel = await asyncio.to_thread(manager.ensure_container, pod, "app", container_resource_config(container))
        assert rel == f"{relative}/{scope}/app"
        sleeper = await asyncio.create_subprocess_exec("sleep", "600")
        manager.add_process(rel, sleeper.pid)
        assert _in_cgroup(sleeper.pid).endswith(f"/{pod_slice}/{scope}/app")

        # In-place resize: new limits through SetUnitProperties, no limit on memory any more.
        await manager.update_pod(pod, ResourceConfig(cpu_shares=512, cpu_quota=150_000, cpu_period=100_000))
        got = await show(pod_slice, "CPUQuotaPerSecUSec", "MemoryMax", "TasksMax")
        assert got == {"CPUQuotaPerSecUSec": "1.500000s", "MemoryMax": "infinity", "TasksMax": "infinity"}

        await manager.teardown_pod(relative)
        assert await asyncio.wait_for(sleeper.wait(), 10) == -9
        await wait_unloaded(pod_slice, scope)
        for path in manager.absolute_paths(relative):
            assert not os.path.exists(path), f"{path} left behind"
    finally:
        if sleeper is not None and sleeper.returncode is None:
            sleeper.kill()
        with contextlib.suppress(CgroupError):
            await manager.teardown_pod(relative)
        for unit in (f"{manager.root}-burstable.slice", f"{manager.root}.slice"):
            await systemctl("stop", unit, check=False)
        await manager.close()


# --- the agent as a systemd service ------------------------------------------------------------

SERVICE_EXAMPLE = REPO / "examples" / "systemd" / "kubelet-emu.service"


@pytest.fixture
async def agent_service(cluster, kubectl: Kubectl, tmp_path: Path):
    """examples/systemd/kubelet-emu.service, run by systemd under its own name with a drop-in that
    points it at this checkout, the dev cluster and a config with cgroup_driver = "systemd"."""
    from devcluster import manage

    node = f"sd-{uuid.uuid4().hex[:6]}"
    unit = f"kubelet-emu-{node}.service"
    kubeconfig = await manage.node_kubeconfig(cluster.dir, node)
    root = f"sdpods{uuid.uuid4().hex[:4]}"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'default_runtime = "procs"\n[node]\ncgroup_root = "{root}"\ncgroup_driver = "systemd"\n'
        'pod_pids_limit = 256\n[runtimes.procs]\nbackend = "process"\n'
    )
    log = tmp_path / "agent.log"
    unit_dir = Path("/run/systemd/system")
    shutil.copy(SERVICE_EXAMPLE, unit_dir / unit)
    dropin = unit_dir / f"{unit}.d"
    dropin.mkdir(exist_ok=True)
    argv = [sys.executable, "-m", "agent.cli", "run", "--kubeconfig", str(kubeconfig), "--node-name", node,
            "--state-dir", str(tmp_path / "state"), "--config", str(config)]  # fmt: skip
    env = agent_env()
    (dropin / "test.conf").write_text(
        "[Service]\nExecStart=\n"
        f"ExecStart={' '.join(argv)}\n"
        f"Environment=PYTHONPATH={env['PYTHONPATH']} PATH={os.environ.get('PATH', '/usr/bin:/bin')}\n"
        f"WorkingDirectory={REPO}\nStandardOutput=append:{log}\nStandardError=append:{log}\n"
        "Restart=no\n"
    )
    await systemctl("daemon-reload")
    await systemctl("start", unit)
    try:
        await wait_node_ready(kubectl, node, timeout=120)
        yield node, unit, root, log
    finally:
        await kubectl.run("delete", "pods", "--field-selector", f"spec.nodeName={node}", "--grace-period=1",
                          "--wait=true", "--timeout=120s", check=False)  # fmt: skip
        await systemctl("stop", unit, check=False)
        shutil.rmtree(dropin, ignore_errors=True)
        (unit_dir / unit).unlink(missing_ok=True)
        await systemctl("daemon-reload", check=False)
        await kubectl.run("delete", "node", node, "--ignore-not-found", "--wait=false", check=False)
        for slice_unit in (f"{root}-burstable.slice", f"{root}-besteffort.slice", f"{root}.slice"):
            await systemctl("stop", slice_unit, check=False)


@pytest.mark.cluster
async def test_agent_service_pod_slice_is_a_systemd_unit(kubectl: Kubectl, agent_service) -> None:
    """The acceptance Pod's two containers (limits 500m+1500m, 100Mi+100Mi; requests 100m+100m,
    50Mi+50Mi) under an agent run by systemd with the systemd driver."""
    node, unit, root, log = agent_service
    assert (await show(unit, "ActiveState"))["ActiveState"] == "active"
    name = f"sd-{uuid.uuid4().hex[:6]}"
    res = "resources: {{requests: {{cpu: 100m, memory: 50Mi}}, limits: {{cpu: {cpu}, memory: 100Mi}}}}"
    await kubectl.apply(
        f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  containers:
  - {{name: a, image: busybox, command: [sleep, "3600"], {res.format(cpu="500m")}}}
  - {{name: b, image: busybox, command: [sleep, "3600"], {res.format(cpu="1500m")}}}
"""
    )

    async def running():
        obj = await kubectl.get("pod", name)
        return obj if obj and obj["status"].get("phase") == "Running" else None

    try:
        obj = await eventually(running, 120, what=f"Pod {name} Running")
    except pytest.fail.Exception:
        raise AssertionError(f"Pod not Running; agent log:\n{log.read_text(errors='replace')[-4000:]}") from None
    uid_ = obj["metadata"]["uid"].replace("-", "_")
    pod_slice = f"{root}-burstable-pod{uid_}.slice"
    wanted = ("ActiveState", "CPUQuotaPerSecUSec", "MemoryMax", "TasksMax", "CPUWeight", "ControlGroup")
    got = await show(pod_slice, *wanted)
    print("systemctl show", pod_slice, got)
    assert got["ActiveState"] == "active"
    assert got["CPUQuotaPerSecUSec"] == "2s"  # 500m + 1500m
    assert got["MemoryMax"] == str(200 * MI)
    assert got["TasksMax"] == "256"
    assert got["CPUWeight"] == "8"  # requests 200m -> 204 shares -> weight 8
    assert got["ControlGroup"] == f"/{root}.slice/{root}-burstable.slice/{pod_slice}"
    scope = f"{root}-burstable-pod{uid_}-containers.scope"
    assert (await show(scope, "Delegate"))["Delegate"] == "yes"
    cgroup_dir = Path("/sys/fs/cgroup") / got["ControlGroup"].lstrip("/")
    for container, quota in (("a", "50000 100000"), ("b", "150000 100000")):
        directory = cgroup_dir / scope / container
        if detect_mode().version == 2:
            assert (directory / "cpu.max").read_text().strip() == quota
            assert (directory / "memory.max").read_text().strip() == str(100 * MI)
        assert (directory / "cgroup.procs").read_text().split(), f"no process in {directory}"

    await kubectl("delete", "pod", name, "--wait=true", "--timeout=60s")

    await wait_unloaded(pod_slice, scope)
    assert not cgroup_dir.exists(), f"{cgroup_dir} left behind"
