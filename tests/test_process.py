"""Issue 4: Pods as real host processes in real cgroups whose limits include the RuntimeClass overhead.

Runs against the real control plane, the real cgroup filesystem and real processes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import pytest
from conftest import Kubectl, condition, delete_node_pods, eventually, ready_node
from helpers import needs_root, process_config, unique

from cgroups.manager import CgroupManager

pytestmark = [pytest.mark.cluster, needs_root]

CGROUP_ROOT = f"kubelet-emu-test-{uuid.uuid4().hex[:6]}"
CONFIG = process_config(CGROUP_ROOT, node="pod_pids_limit = 256\n", runtimes='[runtimes.fake]\nbackend = "emulated"\n')


async def phase(kubectl: Kubectl, name: str, want: str):
    obj = await kubectl.get("pod", name)
    return obj if obj and obj["status"].get("phase") == want else None


async def container_state(kubectl: Kubectl, name: str, key: str, reason: str | None = None):
    obj = await kubectl.get("pod", name)
    for status in (obj or {}).get("status", {}).get("containerStatuses") or []:
        state = status.get("state", {}).get(key)
        if state is not None and (reason is None or state.get("reason") == reason):
            return obj
    return None


@pytest.fixture
async def node(kubectl, start_agent, tmp_path):
    name = unique("emu-proc")
    state = tmp_path / "state"
    agent = await ready_node(kubectl, start_agent, name, CONFIG, state)
    yield name, agent, state
    # Wait for the deletion: process containers outlive a stopped agent by design.
    await delete_node_pods(kubectl, name)


def pod_yaml(
    name: str, node: str, command: str, *, extra_spec: str = "", container_extra: str = "", meta: str = ""
) -> str:
    return f"""
apiVersion: v1
kind: Pod
metadata:
  name: {name}
{meta}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 3
{extra_spec}
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", {command!r}]
{container_extra}
"""


def pids_in(cgroups: CgroupManager, relative: str) -> list[int]:
    try:
        return cgroups.pids(relative)
    except Exception:
        return []


def running(pid: int) -> bool:
    """Exists and is not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


async def test_process_runs_in_its_cgroup_and_logs_in_cri_format(kubectl, node, cgroups):
    name, _, state = node
    p = unique("p-run")
    env = "    env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]"
    command = "echo hello from $(POD_NAME); echo oops >&2; exec sleep 3600"
    await kubectl.apply(pod_yaml(p, name, command, container_extra=env))
    obj = await eventually(lambda: phase(kubectl, p, "Running"), 15, what="Running")
    status = obj["status"]["containerStatuses"][0]
    assert status["containerID"].startswith("process://")
    assert status["image"] == "busybox"

    rel = cgroups.container_path(obj, "main")
    pids = await eventually(lambda: asyncio.sleep(0, pids_in(cgroups, rel)), 5, what="a pid in the container cgroup")
    assert any("sleep 3600" in cmdline(pid) for pid in pids)

    meta = obj["metadata"]
    log = state / "pods" / f"{meta['namespace']}_{p}_{meta['uid']}" / "main" / "0.log"
    text = await eventually(lambda: asyncio.sleep(0, log.exists() and log.read_text()), 5, what="log file")
    lines = text.splitlines()
    assert any(line.split(" ", 3)[1:] == ["stdout", "F", f"hello from {p}"] for line in lines), lines
    assert any(line.split(" ", 3)[1:] == ["stderr", "F", "oops"] for line in lines), lines


def expect_limits(values: dict[str, str], memory: int | None, quota: int | None, shares: int, weight: int) -> None:
    """The kubelet's values as the cgroup files show them, on v1 or v2 (None: unlimited)."""
    if "cpu.max" in values:  # v2
        assert values["memory.max"] == ("max" if memory is None else str(memory))
        assert values["cpu.max"] == f"{'max' if quota is None else quota} 100000"
        assert values["cpu.weight"] == str(weight)
        return
    if memory is None:
        assert int(values["memory.limit_in_bytes"]) >= 2**62  # the v1 "unlimited" value
    else:
        assert values["memory.limit_in_bytes"] == str(memory)
    assert values["cpu.cfs_quota_us"] == ("-1" if quota is None else str(quota))
    assert values["cpu.cfs_period_us"] == "100000"
    assert values["cpu.shares"] == str(shares)


def two_container_pod(name: str, node: str, runtime_class: str | None) -> str:
    """The acceptance Pod: limits (500m, 100Mi) and (1500m, 100Mi), requests (100m, 50Mi) each."""
    rc_line = f"  runtimeClassName: {runtime_class}\n" if runtime_class else ""
    res = "resources: {{requests: {{cpu: 100m, memory: 50Mi}}, limits: {{cpu: {cpu}, memory: 100Mi}}}}"
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  nodeName: {node}
{rc_line}  terminationGracePeriodSeconds: 1
  containers:
  - {{name: a, image: busybox, command: [sleep, "3600"], {res.format(cpu="500m")}}}
  - {{name: b, image: busybox, command: [sleep, "3600"], {res.format(cpu="1500m")}}}
"""


async def test_pod_cgroup_enforces_runtime_class_overhead(kubectl, node, cgroups):
    """Limits 500m+1500m, 100Mi+100Mi; overhead 250m/120Mi -> 335544320 bytes, 225000/100000 us."""
    name, _, _ = node
    rc = unique("rc-procs")
    await kubectl.apply(
        f"apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {{name: {rc}}}\nhandler: procs\n"
        "overhead: {podFixed: {cpu: 250m, memory: 120Mi}}\n"
    )
    with_rc, without_rc = unique("p-overhead"), unique("p-plain")
    await kubectl.apply(two_container_pod(with_rc, name, rc) + "---\n" + two_container_pod(without_rc, name, None))
    obj = await eventually(lambda: phase(kubectl, with_rc, "Running"), 15, what="Running")
    assert obj["spec"]["overhead"] == {"cpu": "250m", "memory": "120Mi"}
    assert obj["status"]["qosClass"] == "Burstable"
    pod_rel = cgroups.pod_path(obj)
    assert pod_rel == f"{CGROUP_ROOT}/burstable/pod{obj['metadata']['uid']}"
    # requests 100m + 100m + overhead 250m -> 460 shares (cpu.weight 18 on v2)
    expect_limits(cgroups.read_values(pod_rel), memory=335544320, quota=225000, shares=450 * 1024 // 1000, weight=18)
    assert cgroups.read_values(pod_rel)["pids.max"] == "256"
    a = cgroups.read_values(cgroups.container_path(obj, "a"))
    expect_limits(a, memory=100 * 2**20, quota=50000, shares=102, weight=4)
    b = cgroups.read_values(cgroups.container_path(obj, "b"))
    expect_limits(b, memory=100 * 2**20, quota=150000, shares=102, weight=4)
    if cgroups.mode.version == 2:  # NoSwap: over memory.max a container is OOM-killed, never swapped
        for container in ("a", "b"):
            swap = Path(cgroups.absolute_paths(cgroups.container_path(obj, container))[0], "memory.swap.max")
            assert not swap.exists() or swap.read_text().strip() == "0"

    plain = await eventually(lambda: phase(kubectl, without_rc, "Running"), 15, what="Running")
    expect_limits(cgroups.read_values(cgroups.pod_path(plain)), memory=209715200, quota=200000, shares=204, weight=8)

    await kubectl("delete", "pod", with_rc, without_rc, "--wait=true", "--timeout=20s")
    for path in cgroups.absolute_paths(pod_rel):
        assert not os.path.exists(path), f"{path} left behind"


async def test_burstable_without_memory_limit_has_no_pod_memory_limit(kubectl, node, cgroups):
    name, _, _ = node
    rc = unique("rc-burst")
    await kubectl.apply(
        f"apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {{name: {rc}}}\nhandler: procs\n"
        "overhead: {podFixed: {cpu: 250m, memory: 120Mi}}\n"
    )
    p = unique("p-burst")
    await kubectl.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: {p}}}
spec:
  nodeName: {name}
  runtimeClassName: {rc}
  terminationGracePeriodSeconds: 1
  containers:
  - name: a
    image: busybox
    command: [sleep, "3600"]
    resources: {{requests: {{cpu: 200m, memory: 64Mi}}, limits: {{memory: 128Mi}}}}
  - {{name: b, image: busybox, command: [sleep, "3600"], resources: {{requests: {{cpu: 300m}}}}}}
""")
    obj = await eventually(lambda: phase(kubectl, p, "Running"), 15, what="Running")
    values = cgroups.read_values(cgroups.pod_path(obj))
    expect_limits(values, memory=None, quota=None, shares=750 * 1024 // 1000, weight=30)  # 200m + 300m + 250m
    a = cgroups.read_values(cgroups.container_path(obj, "a"))
    assert a.get("memory.limit_in_bytes", a.get("memory.max")) == str(128 * 2**20)
    await kubectl("delete", "pod", p, "--wait=false")


async def test_cpu_limit_throttles(kubectl, node, cgroups):
    name, _, _ = node
    p = unique("p-spin")
    await kubectl.apply(
        pod_yaml(p, name, "while :; do :; done", container_extra="    resources: {limits: {cpu: 100m}}")
    )
    obj = await eventually(lambda: phase(kubectl, p, "Running"), 15, what="Running")
    rel = cgroups.container_path(obj, "main")
    await asyncio.sleep(1)
    before, t0 = cgroups.usage(rel)["cpu_usage_ns"], asyncio.get_running_loop().time()
    throttled_before = throttled(cgroups, rel)
    await asyncio.sleep(4)
    after, t1 = cgroups.usage(rel)["cpu_usage_ns"], asyncio.get_running_loop().time()
    cpus = (after - before) / 1e9 / (t1 - t0)
    assert 0.05 <= cpus <= 0.15, f"used {cpus:.3f} CPU with a 100m limit"
    print(f"cpu use under a 100m limit: {cpus:.3f} CPU, cpu files {cgroups.read_values(rel)}")
    assert throttled(cgroups, rel) > throttled_before
    await kubectl("delete", "pod", p, "--wait=false")


def throttled(cgroups: CgroupManager, relative: str) -> int:
    """nr_throttled from cpu.stat (v1 and v2 both have it)."""
    for path in cgroups.absolute_paths(relative):
        stat = Path(path) / "cpu.stat"
        if stat.exists():
            for line in stat.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "nr_throttled":
                    return int(value)
    raise AssertionError(f"no cpu.stat for {relative}")


async def test_oom_with_restart_always_crash_loops(kubectl, node):
    name, _, _ = node
    p = unique("p-oomloop")
    hog = "python3 -c 'b = bytearray(200 * 1024 * 1024)'"
    await kubectl.apply(pod_yaml(p, name, hog, container_extra="    resources: {limits: {memory: 48Mi}}"))

    async def looping():
        obj = await kubectl.get("pod", p)
        status = (obj["status"].get("containerStatuses") or [{}])[0]
        last = (status.get("lastState") or {}).get("terminated") or {}
        waiting = (status.get("state") or {}).get("waiting") or {}
        if last.get("reason") == "OOMKilled" and waiting.get("reason") == "CrashLoopBackOff":
            return status
        return None

    status = await eventually(looping, 30, what="OOMKilled then CrashLoopBackOff")
    assert status["restartCount"] >= 1
    assert "back-off 10s" in status["state"]["waiting"]["message"]
    messages = [
        e["message"]
        for e in (await kubectl.json("get", "events", "--field-selector", f"involvedObject.name={p}"))["items"]
        if e["reason"] == "BackOff"
    ]
    assert any(m.startswith("Back-off restarting failed container") for m in messages)
    await kubectl("delete", "pod", p, "--wait=false")


async def test_no_cgroup_leaks_after_100_pods(kubectl, node, cgroups):
    name, _, _ = node
    root_paths = cgroups.absolute_paths(CGROUP_ROOT)

    def count() -> int:
        return sum(sum(len(dirs) for _, dirs, _ in os.walk(path)) for path in root_paths if os.path.isdir(path))

    baseline = count()
    for batch in range(5):
        pods = [f"p-cycle-{batch}-{i}-{uuid.uuid4().hex[:4]}" for i in range(20)]
        await kubectl.apply("---\n".join(pod_yaml(p, name, "exec sleep 3600") for p in pods))
        for p in pods:
            await eventually(lambda p=p: phase(kubectl, p, "Running"), 30, what=f"{p} Running")
        await kubectl("delete", "pod", *pods, "--wait=true", "--timeout=60s")
    assert count() == baseline, "cgroup directories leaked"


async def test_exit_codes_and_oom(kubectl, node):
    name, _, _ = node
    failing, oom = unique("p-exit"), unique("p-oom")
    await kubectl.apply(pod_yaml(failing, name, "exit 3", extra_spec="  restartPolicy: Never"))
    hog = "python3 -c 'import time; b = bytearray(200 * 1024 * 1024); time.sleep(5)'"
    await kubectl.apply(pod_yaml(oom, name, hog, extra_spec="  restartPolicy: Never",
                                 container_extra="    resources: {limits: {memory: 48Mi}}"))  # fmt: skip
    obj = await eventually(lambda: phase(kubectl, failing, "Failed"), 15, what="Failed")
    term = obj["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 3 and term["reason"] == "Error"
    obj = await eventually(lambda: phase(kubectl, oom, "Failed"), 20, what="OOMKilled")
    term = obj["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["reason"] == "OOMKilled" and term["exitCode"] == 137


async def test_env_from_config_map_secret_and_missing_secret(kubectl, node, tmp_path):
    name, _, state = node
    cm, secret = unique("cm"), unique("sec")
    await kubectl("create", "configmap", cm, "--from-literal=greeting=hi")
    await kubectl("create", "secret", "generic", secret, "--from-literal=password=s3cret")
    p = unique("p-env")
    env = (
        f"    env:\n"
        f"    - {{name: GREETING, valueFrom: {{configMapKeyRef: {{name: {cm}, key: greeting}}}}}}\n"
        f"    - {{name: PASSWORD, valueFrom: {{secretKeyRef: {{name: {secret}, key: password}}}}}}\n"
        f"    - {{name: BOTH, value: '$(GREETING)-$(PASSWORD)'}}\n"
        f"    - {{name: NODE, valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}}}"
    )
    extra = env + "\n    workingDir: /tmp\n    securityContext: {runAsUser: 1234}"
    command = "echo $BOTH on $NODE; id -u; pwd"
    await kubectl.apply(pod_yaml(p, name, command, extra_spec="  restartPolicy: Never", container_extra=extra))
    obj = await eventually(lambda: phase(kubectl, p, "Succeeded"), 15, what="Succeeded")
    meta = obj["metadata"]
    log = (state / "pods" / f"{meta['namespace']}_{p}_{meta['uid']}" / "main" / "0.log").read_text()
    messages = [line.split(" ", 3)[3] for line in log.splitlines()]
    assert messages == [f"hi-s3cret on {name}", "1234", "/tmp"]

    broken = unique("p-nosecret")
    missing = "    env: [{name: X, valueFrom: {secretKeyRef: {name: no-such-secret, key: k}}}]"
    await kubectl.apply(pod_yaml(broken, name, "true", container_extra=missing))
    obj = await eventually(
        lambda: container_state(kubectl, broken, "waiting", "CreateContainerConfigError"), 15, what="config error"
    )
    assert "no-such-secret" in obj["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
    assert obj["status"]["phase"] == "Pending"
    await kubectl("delete", "configmap", cm)
    await kubectl("delete", "secret", secret)


async def test_delete_stops_every_process_even_one_ignoring_sigterm(kubectl, node, cgroups):
    name, _, _ = node
    p = unique("p-stubborn")
    # The shell ignores TERM; its background child too: only SIGKILL after the grace period ends them.
    await kubectl.apply(pod_yaml(p, name, "trap '' TERM; sleep 3600 & sleep 3600 & wait"))
    obj = await eventually(lambda: phase(kubectl, p, "Running"), 15, what="Running")
    rel = cgroups.container_path(obj, "main")
    pids = await eventually(lambda: asyncio.sleep(0, len(pids_in(cgroups, rel)) >= 3 and pids_in(cgroups, rel)),
                            5, what="three processes")  # fmt: skip
    await kubectl("delete", "pod", p, "--wait=true", "--timeout=30s")
    for pid in pids:
        assert not running(pid), f"process {pid} ({cmdline(pid)}) survived"
    events = (await kubectl.json("get", "events", "--field-selector", f"involvedObject.name={p}"))["items"]
    assert any(e["reason"] == "Killing" for e in events)


async def test_probes_drive_ready_and_restart(kubectl, node):
    name, _, _ = node
    port = 20000 + int(uuid.uuid4().int % 20000)
    web = unique("p-ready")
    probe = f"    readinessProbe: {{httpGet: {{port: {port}, path: /}}, periodSeconds: 1}}"
    gate = Path(f"/tmp/kubelet-emu-ready-{web}")  # the server starts once the test creates it
    command = f"while [ ! -e {gate} ]; do sleep 0.2; done; exec python3 -m http.server {port} --bind 0.0.0.0"
    await kubectl.apply(pod_yaml(web, name, command, container_extra=probe))

    async def ready():
        obj = await kubectl.get("pod", web)
        c = condition(obj, "Ready")
        return obj if c and c["status"] == "True" else None

    obj = await eventually(lambda: phase(kubectl, web, "Running"), 15, what="Running")
    await asyncio.sleep(2)  # a few failed probes
    obj = await kubectl.get("pod", web)
    assert condition(obj, "Ready")["status"] == "False"
    assert obj["status"]["containerStatuses"][0]["ready"] is False
    gate.touch()
    try:
        await eventually(ready, 20, what="Ready from the readiness probe")
    finally:
        gate.unlink()

    sick = unique("p-liveness")
    marker = f"/tmp/kubelet-emu-liveness-{sick}"
    live = f"    livenessProbe: {{exec: {{command: [test, '!', -e, {marker}]}}, periodSeconds: 1, failureThreshold: 1}}"
    await kubectl.apply(pod_yaml(sick, name, f"touch {marker}; exec sleep 3600", container_extra=live))

    async def restarted():
        obj = await kubectl.get("pod", sick)
        statuses = obj["status"].get("containerStatuses") or [{}]
        return obj if statuses[0].get("restartCount", 0) >= 1 else None

    await eventually(restarted, 30, what="a restart after the liveness probe failed")
    events = (await kubectl.json("get", "events", "--field-selector", f"involvedObject.name={sick}"))["items"]
    reasons = {e["reason"] for e in events}
    assert {"Unhealthy", "Killing"} <= reasons
    os.unlink(marker)


async def test_processes_survive_agent_restart_and_are_adopted(kubectl, node, start_agent, cgroups):
    name, agent, state = node
    p = unique("p-survive")
    await kubectl.apply(pod_yaml(p, name, "exec sleep 3600"))
    before = await eventually(lambda: phase(kubectl, p, "Running"), 15, what="Running")
    rel = cgroups.container_path(before, "main")
    pids = await eventually(lambda: asyncio.sleep(0, pids_in(cgroups, rel)), 5, what="pid")
    agent.kill(signal.SIGKILL)
    await agent.wait(5)
    await asyncio.sleep(1)
    assert all(running(pid) for pid in pids), "the container died with the agent"
    await start_agent(name, CONFIG, state_dir=state)
    await asyncio.sleep(4)
    after = await kubectl.get("pod", p)
    assert after["status"]["phase"] == "Running"
    assert after["status"]["containerStatuses"][0]["restartCount"] == 0
    assert pids_in(cgroups, rel) == pids
    await kubectl("delete", "pod", p, "--wait=true", "--timeout=30s")
    assert not any(running(pid) for pid in pids)


async def test_init_container_statuses_as_the_kubelet_reports_them(kubectl, node):
    """Issue 17 item 4 on real processes: PodInitializing while waiting, ready once finished,
    ContainersNotInitialized when an init container fails with restartPolicy Never."""
    name, _, _ = node
    p = unique("p-init")
    inits = (
        "  initContainers:\n"
        "  - {name: first, image: busybox, command: [sh, -c, 'sleep 3']}\n"
        "  - {name: second, image: busybox, command: [sh, -c, 'exit 0']}"
    )
    await kubectl.apply(pod_yaml(p, name, "exec sleep 3600", extra_spec=inits))

    async def first_running():
        obj = await kubectl.get("pod", p)
        statuses = (obj or {}).get("status", {}).get("initContainerStatuses") or []
        return obj if statuses and "running" in statuses[0]["state"] else None

    obj = await eventually(first_running, 15, interval=0.2, what="first init container running")
    first, second = obj["status"]["initContainerStatuses"]
    assert first["ready"] is False
    assert second["state"]["waiting"]["reason"] == "PodInitializing"
    assert obj["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "PodInitializing"
    assert condition(obj, "Initialized")["reason"] == "ContainersNotInitialized"
    obj = await eventually(lambda: phase(kubectl, p, "Running"), 20, what="Running")
    assert [s["ready"] for s in obj["status"]["initContainerStatuses"]] == [True, True]

    failing = unique("p-initfail")
    inits = "  restartPolicy: Never\n  initContainers:\n  - {name: first, image: busybox, command: [sh, -c, 'exit 2']}"
    await kubectl.apply(pod_yaml(failing, name, "exec sleep 3600", extra_spec=inits))
    obj = await eventually(lambda: phase(kubectl, failing, "Failed"), 15, what="Failed")
    assert obj["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 2
    assert obj["status"]["initContainerStatuses"][0]["ready"] is False
    initialized = condition(obj, "Initialized")
    assert initialized["status"] == "False" and initialized["reason"] == "ContainersNotInitialized"
    assert initialized["message"] == "containers with incomplete status: [first]"


async def test_active_deadline_kills_the_processes_and_fails_the_pod(kubectl, node, cgroups):
    """Issue 17 item 6 on real processes: past activeDeadlineSeconds the process is killed, the Pod
    is Failed with reason DeadlineExceeded and a DeadlineExceeded event."""
    name, _, _ = node
    p = unique("p-deadline")
    await kubectl.apply(pod_yaml(p, name, "exec sleep 3600", extra_spec="  activeDeadlineSeconds: 4"))
    obj = await eventually(lambda: phase(kubectl, p, "Running"), 15, what="Running")
    rel = cgroups.container_path(obj, "main")
    pids = await eventually(lambda: asyncio.sleep(0, pids_in(cgroups, rel)), 5, what="the process")
    obj = await eventually(lambda: phase(kubectl, p, "Failed"), 20, what="Failed past the deadline")
    assert obj["status"]["reason"] == "DeadlineExceeded"
    assert obj["status"]["message"] == "Pod was active on the node longer than the specified deadline"
    assert "terminated" in obj["status"]["containerStatuses"][0]["state"]
    for pid in pids:
        assert not running(pid), f"process {pid} survived the deadline"
    events = (await kubectl.json("get", "events", "--field-selector", f"involvedObject.name={p}"))["items"]
    assert any(e["reason"] == "DeadlineExceeded" and e["type"] == "Normal" for e in events)
