"""`kubelet-emu reset`: what an agent left on the host goes, one line per thing, and a second run
finds nothing.

The unit tests use real processes, real locks and throwaway directories standing in for cgroup
mounts; the integration test runs a real agent with a process Pod against the real control plane,
then the real `kubelet-emu reset`, and checks the host as a user would (`ip link`, `iptables -S`,
the cgroup filesystem, the state dir).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import Kubectl, agent_argv, agent_env, eventually, wait_node_ready

from agent import state_lock
from agent.config import load_config
from agent.pod_network import default_bridge
from agent.reset import (
    NodeRecord,
    OciRuntime,
    Reset,
    bridge_user,
    read_node_record,
    recorded_processes,
    reset,
    resolve_targets,
    write_node_record,
)
from cgroups.cleanup import cgroup_mount_points, hierarchy_root, pod_uid_of, remove_hierarchy
from network.iptables import Rule, parse_rules

UID_A = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
UID_B = "11111111-2222-3333-4444-555555555555"


# --- unit tests -----------------------------------------------------------------------------------


def test_state_lock_is_held_while_the_holder_lives(tmp_path):
    assert state_lock.holder(tmp_path) is None  # no file
    fd = state_lock.acquire(tmp_path)
    try:
        assert state_lock.holder(tmp_path) == os.getpid()
        with pytest.raises(state_lock.StateDirBusyError, match=f"in use by pid {os.getpid()}"):
            state_lock.acquire(tmp_path)
    finally:
        os.close(fd)
    assert state_lock.holder(tmp_path) is None  # the file stays, the lock is gone
    os.close(state_lock.acquire(tmp_path))


def test_iptables_rules_of_a_bridge_are_found_by_their_comment():
    listing = "\n".join([
        "-P FORWARD DROP",
        '-A FORWARD -i emu-aaaa -m comment --comment "kubelet-emu pods on emu-aaaa" -j ACCEPT',
        '-A FORWARD -o emu-bbbb -m comment --comment "kubelet-emu pods on emu-bbbb" -j ACCEPT',
        '-A POSTROUTING -s 10.9.0.0/24 ! -o emu-aaaa -m comment --comment "kubelet-emu pods on emu-aaaa" -j MASQUERADE',
    ])  # fmt: skip
    rules = parse_rules("filter", listing, "emu-aaaa")
    comment = ("-m", "comment", "--comment", "kubelet-emu pods on emu-aaaa")
    assert rules == [
        Rule("filter", "FORWARD", ("-i", "emu-aaaa", *comment, "-j", "ACCEPT")),
        Rule("filter", "POSTROUTING", ("-s", "10.9.0.0/24", "!", "-o", "emu-aaaa", *comment, "-j", "MASQUERADE")),
    ]
    assert parse_rules("filter", listing, "emu-cccc") == []


def test_pod_uids_in_cgroup_names():
    assert pod_uid_of(f"pod{UID_A}") == UID_A
    assert pod_uid_of(f"kubepods-burstable-pod{UID_A.replace('-', '_')}.slice") == UID_A
    assert pod_uid_of("burstable") is None
    assert pod_uid_of("kubepods.slice") is None
    assert hierarchy_root("kube-pods", "systemd") == "kube_pods.slice"
    assert hierarchy_root("kubepods", "cgroupfs") == "kubepods"


def test_cgroup_hierarchy_goes_from_every_mount_but_other_agents_pods_stay(tmp_path):
    mounts = [str(tmp_path / "cpu"), str(tmp_path / "devices")]
    for m in mounts:
        (Path(m) / "kp" / "burstable" / f"pod{UID_A}" / "c").mkdir(parents=True)
        (Path(m) / "kp" / "besteffort").mkdir(parents=True)
    (tmp_path / "cpu" / "kp" / f"pod{UID_B}" / "c").mkdir(parents=True)  # another agent's Pod
    report = remove_hierarchy("kp", {UID_A}, mounts)
    assert report.removed[f"kp/burstable/pod{UID_A}/c"] == ["cpu", "devices"]
    assert "kp/besteffort" in report.removed
    assert report.kept == {f"kp/pod{UID_B}": f"Pod {UID_B} is not one of this agent's Pods"}
    assert not (tmp_path / "devices" / "kp").exists()
    assert (tmp_path / "cpu" / "kp" / f"pod{UID_B}" / "c").is_dir()
    assert remove_hierarchy("kp", {UID_A, UID_B}, mounts).removed  # now it goes
    again = remove_hierarchy("kp", {UID_A}, mounts)
    assert (again.removed, again.kept, again.failed) == ({}, {}, {})
    with pytest.raises(ValueError):
        remove_hierarchy("../etc", set(), mounts)


def test_cgroup_mount_points_lists_every_hierarchy(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n"
        "cgroup /sys/fs/cgroup/devices cgroup rw,relatime,devices 0 0\n"
        "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
        "proc /proc proc rw 0 0\n"
    )
    assert cgroup_mount_points(str(mounts)) == [
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/devices",
        "/sys/fs/cgroup/unified",
    ]


def test_node_record_round_trip_and_precedence(tmp_path):
    config_file = tmp_path / "agent.toml"
    config_file.write_text(
        '[node]\ncgroup_root = "emu-x"\n[runtimes.box]\nbackend = "oci"\nruntime_path = "/bin/true"\n'
        '[runtimes.e]\nbackend = "emulated"\n'
    )
    from runtimes.registry import known_backends

    config = load_config(str(config_file), known_backends())
    write_node_record(tmp_path, "node-a", config)
    record = read_node_record(tmp_path)
    assert record == NodeRecord(
        "node-a", default_bridge("node-a"), "emu-x", "cgroupfs",
        (OciRuntime("box", ("/bin/true",), str(tmp_path / "runtimes" / "box" / "runtime")),),
    )  # fmt: skip
    assert resolve_targets(tmp_path, None, None, "host") == record  # what the agent recorded
    renamed = resolve_targets(tmp_path, None, "node-b", "host")
    assert (renamed.node_name, renamed.bridge, renamed.cgroup_root) == ("node-b", default_bridge("node-b"), "emu-x")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_targets(empty, None, None, "host") == NodeRecord("host", default_bridge("host"))


def test_reset_kills_the_processes_the_state_files_name(tmp_path):
    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        with open(f"/proc/{sleeper.pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        run_dir = tmp_path / "pods" / f"default_web_{UID_A}" / "c" / "0"
        run_dir.mkdir(parents=True)
        (run_dir / "state.json").write_text(json.dumps({"pid": sleeper.pid, "start_ticks": ticks}))
        (run_dir / "exit.json").write_text("{}")
        # A recorded pid whose start time does not match is another process now: left alone.
        (tmp_path / "pods" / "agent.json").write_text(json.dumps({"shim_pid": os.getpid(), "shim_start_ticks": 1}))
        assert [(p, w) for p, _, w, _ in recorded_processes(tmp_path)] == [
            (os.getpid(), "shim"),
            (sleeper.pid, "container process"),
        ]
        lines: list[str] = []
        job = Reset(tmp_path, NodeRecord("n", "emu-none"), say=lines.append)
        job.processes()
        assert lines == [f"killed container process {sleeper.pid} (pods/default_web_{UID_A}/c/0)"]
        assert sleeper.wait(5) == -signal.SIGKILL
    finally:
        sleeper.kill()
        sleeper.wait()


async def test_reset_refuses_while_an_agent_holds_the_state_dir_and_force_stops_it(tmp_path):
    (tmp_path / "pods").mkdir()
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import sys, time; sys.path.insert(0, sys.argv[1]); from agent import state_lock; "
        "state_lock.acquire(sys.argv[2]); print('locked', flush=True); time.sleep(300)",
        str(Path(__file__).resolve().parent.parent), str(tmp_path), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and await holder.stdout.readline() == b"locked\n"
        said: list[str] = []
        record = NodeRecord("reset-unit", "emu-none", cgroup_root=f"kubelet-emu-test-{uuid.uuid4().hex[:6]}")
        (tmp_path / "node.json").write_text(json.dumps(record.to_json()))
        assert await reset(tmp_path, say=said.append, warn=said.append) == 2
        assert f"an agent (pid {holder.pid}) is running" in said[0] and "--force" in said[0]
        assert (tmp_path / "pods").is_dir()

        said.clear()
        assert await reset(tmp_path, force=True, say=said.append, warn=said.append) == 0
        assert await asyncio.wait_for(holder.wait(), 5) == -signal.SIGTERM
        assert said == [f"stopped agent {holder.pid}", f"removed {tmp_path / 'pods'}"]
        assert os.listdir(tmp_path) == ["node.json"]
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


async def test_reset_keeps_the_image_store_unless_all(tmp_path):
    record = NodeRecord("reset-unit", "emu-none", cgroup_root=f"kubelet-emu-test-{uuid.uuid4().hex[:6]}")
    (tmp_path / "node.json").write_text(json.dumps(record.to_json()))
    (tmp_path / "images" / "blobs").mkdir(parents=True)
    (tmp_path / "pki").mkdir()
    (tmp_path / "agent-stats.json").write_text("{}")
    said: list[str] = []
    assert await reset(tmp_path, say=said.append, warn=said.append) == 0
    assert said == [f"removed {tmp_path / name}" for name in ("agent-stats.json", "pki")]
    assert sorted(os.listdir(tmp_path)) == ["images", "node.json"]
    said.clear()
    assert await reset(tmp_path, say=said.append, warn=said.append) == 0
    assert len(said) == 1 and said[0].startswith(f"nothing to remove for state dir {tmp_path}")
    said.clear()
    assert await reset(tmp_path, remove_all=True, say=said.append, warn=said.append) == 0
    assert said == [f"removed {tmp_path / 'images'}", f"removed {tmp_path / 'node.json'}", f"removed {tmp_path}"]
    assert not tmp_path.exists()


# --- against the real cluster ---------------------------------------------------------------------

CGROUP_ROOT = f"kubelet-emu-test-{uuid.uuid4().hex[:6]}"
CONFIG = f"""
default_runtime = "procs"
[node]
cgroup_root = "{CGROUP_ROOT}"
[runtimes.procs]
backend = "process"
"""


def pod(name: str, node: str) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "c", "image": "host", "command": ["sleep", "3600"]}]},
    })  # fmt: skip


async def running_uid(kubectl: Kubectl, name: str) -> str | None:
    obj = await kubectl.get("pod", name)
    status = (obj or {}).get("status") or {}
    return obj["metadata"]["uid"] if status.get("phase") == "Running" and status.get("podIP") else None


async def kubelet_emu(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *agent_argv(), *args, env=agent_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


def host(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True)


@pytest.mark.cluster
@pytest.mark.skipif(os.geteuid() != 0, reason="process Pods, their cgroups and networks need root")
async def test_reset_removes_what_a_stopped_agent_left(kubectl, start_agent, tmp_path):
    name = f"emu-reset-{uuid.uuid4().hex[:6]}"
    state = tmp_path / "state"
    agent = await start_agent(name, CONFIG, state_dir=state)
    await wait_node_ready(kubectl, name)
    bridge = default_bridge(name)
    try:
        await kubectl.apply(pod("gone", name))
        await kubectl.apply(pod("left", name))  # still running when the agent stops
        await eventually(lambda: running_uid(kubectl, "gone"), 60, what="gone Running with an IP")
        left_uid = await eventually(lambda: running_uid(kubectl, "left"), 60, what="left Running with an IP")
        await kubectl("delete", "pod", "gone", "--wait=true", "--timeout=60s")

        code, out, err = await kubelet_emu("reset", "--state-dir", str(state))
        assert code == 2, out + err
        assert f"an agent (pid {agent.proc.pid}) is running with state dir {state}" in err
        await agent.stop()

        # What the stopped agent left on the host, by design (a restart adopts it).
        assert host("ip", "link", "show", bridge).returncode == 0
        assert f"kubelet-emu pods on {bridge}" in host("iptables", "-S", "FORWARD").stdout
        cgroup_dirs = [Path(m) / CGROUP_ROOT for m in cgroup_mount_points()]
        assert any(d.is_dir() for d in cgroup_dirs)
        assert f"emu-{left_uid}" in host("ip", "netns", "list").stdout

        code, out, err = await kubelet_emu("reset", "--state-dir", str(state))
        assert code == 0, out + err
        assert err == ""
        lines = out.splitlines()
        killed = [line for line in lines if line.startswith("killed container process ")]
        assert len(killed) == 1 and f"_left_{left_uid}/" in killed[0], out
        assert any(line.startswith("killed shim ") for line in lines), out
        assert f"removed network namespace emu-{left_uid}" in lines, out
        assert f"removed bridge {bridge}" in lines, out
        assert sum("removed iptables rule -t filter FORWARD" in line for line in lines) == 2, out
        assert any(line.startswith(f"removed cgroup {CGROUP_ROOT} (") for line in lines), out
        assert f"removed {state / 'pods'}" in lines, out

        # The host as a user checks it.
        assert host("ip", "link", "show", bridge).returncode != 0
        assert bridge not in host("iptables", "-S", "FORWARD").stdout
        assert bridge not in host("iptables", "-t", "nat", "-S", "POSTROUTING").stdout
        assert f"emu-{left_uid}" not in host("ip", "netns", "list").stdout
        assert not [d for d in cgroup_dirs if d.exists()]
        assert os.listdir(state) == ["node.json"]
        pid = int(killed[0].split()[3])
        assert not Path(f"/proc/{pid}").exists() or "sleep" not in Path(f"/proc/{pid}/cmdline").read_text()

        code, out, err = await kubelet_emu("reset", "--state-dir", str(state))
        assert (code, err) == (0, ""), out + err
        assert out.startswith(f"nothing to remove for state dir {state} (node {name}, bridge {bridge})"), out
    finally:
        await kubectl.run("delete", "pod", "gone", "left", "--force", "--grace-period=0", check=False)


async def test_a_bridge_a_running_network_helper_serves_is_kept(tmp_path, monkeypatch):
    """Another agent with the same node name (so the same bridge) on another state dir is running."""
    bridge = f"emu-t{uuid.uuid4().hex[:6]}"
    helper = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)", "network.helper", "--bridge", bridge
    )
    try:
        assert bridge_user(bridge) == helper.pid
        assert bridge_user(bridge + "x") is None
        monkeypatch.setattr("agent.reset.HELPER_EXIT_WAIT", 0.2)
        said: list[str] = []
        job = Reset(tmp_path, NodeRecord("n", bridge), say=said.append, warn=said.append)
        await job.network()
        assert said == [
            f"kept the Pod network of bridge {bridge}: a running agent's network helper (pid {helper.pid}) uses it "
            "(an agent with the same node name on another state dir?); stop that agent first"
        ]
        assert job.errors == said
    finally:
        helper.kill()
        await helper.wait()
