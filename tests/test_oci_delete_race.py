"""A Pod deleted while its runc container is being created leaves nothing behind: no runc
container (`runc --root R list`), no shim or container process, no mount, no cgroup.

The handler's runtime is runc behind a wrapper that waits 1.5 s before `create` (as a slow
runtime, kata or a loaded host, would), so that deletions sent at varied moments land while
`runc create` runs. Real control plane, real runc."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import Kubectl, eventually, wait_node_ready

from cgroups.manager import CgroupManager, detect_mode

pytest_plugins = ["registry_fixture"]
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(os.geteuid() != 0, reason="runc, pod cgroups and pod networks need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed (Debian package runc)"),
]

CGROUP_ROOT = f"kubelet-emu-test-{uuid.uuid4().hex[:6]}"
CLASS = f"race-oci-{uuid.uuid4().hex[:6]}"
PODS = 16


@pytest.fixture
def cgroups():
    manager = CgroupManager(detect_mode(), root=CGROUP_ROOT)
    yield manager
    manager.remove(CGROUP_ROOT, kill=True)


@pytest.fixture
async def node(kubectl, start_agent, tmp_path, cgroups):
    await kubectl.apply(
        json.dumps(
            {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": CLASS}, "handler": "boxed"}
        )
    )
    name = f"emu-race-{uuid.uuid4().hex[:6]}"
    runc_root = tmp_path / "runc"
    slow_runc = tmp_path / "slow-runc"
    wait = 'for a in "$@"; do [ "$a" = create ] && sleep 1.5 && break; done'
    slow_runc.write_text(f'#!/bin/sh\n{wait}\nexec {shutil.which("runc")} "$@"\n')
    slow_runc.chmod(0o755)
    config = f"""
[node]
cgroup_root = "{CGROUP_ROOT}"
[runtimes.boxed]
backend = "oci"
runtime_path = "{slow_runc}"
runtime_root = "{runc_root}"
"""
    state = tmp_path / "state"
    agent = await start_agent(name, config, state_dir=state)
    await wait_node_ready(kubectl, name)
    yield name, agent, state, runc_root
    await kubectl.run(
        "delete", "pods", "--field-selector", f"spec.nodeName={name}", "--wait=true", "--timeout=90s",
        check=False,
    )  # fmt: skip
    await kubectl.run("delete", "runtimeclass", CLASS, check=False)


def pod(name: str, node: str, image: str) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "nodeName": node, "runtimeClassName": CLASS, "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "c", "image": image, "command": ["sleep", "3600"]}],
        },
    })  # fmt: skip


def runc_containers(root: Path) -> list[str]:
    out = subprocess.run(["runc", "--root", str(root), "list", "--format", "json"], capture_output=True, text=True)
    return [c["id"] for c in json.loads(out.stdout or "null") or []]


def holders_of(directory: Path, exclude: set[int]) -> list[str]:
    """Processes with a file, a working directory or a root under `directory` (shims keep their
    log open; a container's root is its rootfs), with their command lines."""
    found = []
    prefix = str(directory)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) in exclude:
            continue
        try:
            links = [os.readlink(f"/proc/{pid}/{n}") for n in ("cwd", "root")]
            links += [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            if any(link.startswith(prefix) for link in links):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{pid}: {cmdline.strip()}")
        except OSError:
            continue  # gone meanwhile, or a kernel thread
    return found


def cgroup_dirs(cgroups: CgroupManager) -> list[str]:
    found = []
    for path in cgroups.absolute_paths(CGROUP_ROOT):
        for top, dirs, _ in os.walk(path):
            found += [os.path.join(top, d) for d in dirs]
    return found


async def test_pods_deleted_while_their_container_is_created_leave_nothing(
    kubectl: Kubectl, node, busybox_ref, cgroups
):
    name, agent, state, runc_root = node
    # One Pod first, so the image is present and every later create is quick.
    warm = f"race-warm-{uuid.uuid4().hex[:4]}"
    await kubectl.apply(pod(warm, name, busybox_ref))

    async def running() -> bool:
        obj = await kubectl.get("pod", warm)
        return bool(obj and obj["status"].get("phase") == "Running")

    await eventually(running, 90, what="the first runc Pod Running")
    await kubectl("delete", "pod", warm, "--wait=true", "--timeout=60s")

    names = [f"race-{i}-{uuid.uuid4().hex[:4]}" for i in range(PODS)]
    for i, p in enumerate(names):
        await kubectl.apply(pod(p, name, busybox_ref))
        await asyncio.sleep(0.15 * i)  # from before the sandbox to after `runc create`
        await kubectl.run("delete", "pod", p, "--wait=false")
    await kubectl.run("delete", "pod", *names, "--ignore-not-found", "--wait=true", "--timeout=120s")

    def left() -> dict[str, list[str]]:
        found = {
            "runc containers": runc_containers(runc_root),
            "processes": holders_of(state, {agent.proc.pid}),
            "pod cgroups": [d for d in cgroup_dirs(cgroups) if "pod" in os.path.basename(d)],
            "mounts": [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if str(state) in ln],
        }
        return {k: v for k, v in found.items() if v}

    async def clean() -> bool:
        return not left()

    try:
        await eventually(clean, 30, interval=1, what="nothing left of the deleted Pods")
    except BaseException:
        print("left behind:", left())
        raise
    assert agent.alive
    # The deletions did land while containers were being made (else this test proved nothing).
    assert "removed a container made for a deleted pod" in agent.log
