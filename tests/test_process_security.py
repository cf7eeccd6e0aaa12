"""Issue 16: the process handler enforces a Pod's securityContext and refuses what it cannot, and
its containers see neither the node's credentials nor the agent's state; Secrets stay private.

Real control plane, real agent, real processes: the checks read /proc/<pid>/status of the
container's own process and run `kubectl exec` as a user would.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from conftest import Kubectl, delete_node_pods, eventually, ready_node
from helpers import exposed_files, needs_root, process_config, unique

from cgroups.manager import CgroupManager

pytestmark = [pytest.mark.cluster, needs_root]

CGROUP_ROOT = f"kubelet-emu-sec-{uuid.uuid4().hex[:6]}"
ROOT_CLASS = f"rootprocs-{uuid.uuid4().hex[:6]}"
CONFIG = process_config(
    CGROUP_ROOT,
    runtimes="""[runtimes.rootprocs]
backend = "process"
default_run_as_user = 0
default_run_as_group = 0
allow_privileged = true
allow_host_path = true
""",
)


@pytest.fixture
async def node(kubectl, start_agent, tmp_path):
    name = unique("emu-sec")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)  # private, as it should be on a node
    await kubectl.apply(f"apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {{name: {ROOT_CLASS}}}\n"
                        "handler: rootprocs\n")  # fmt: skip
    agent = await ready_node(kubectl, start_agent, name, CONFIG, state)
    yield name, agent, state
    await delete_node_pods(kubectl, name)


def pod_yaml(name: str, node: str, command: str, *, spec: str = "", container: str = "") -> str:
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
{spec}
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", {command!r}]
{container}
"""


RESTRICTED_SPEC = "  securityContext: {runAsNonRoot: true, runAsUser: 1000, seccompProfile: {type: RuntimeDefault}}"
RESTRICTED_CONTAINER = "    securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}"


async def pod_phase(kubectl: Kubectl, name: str, want: str):
    obj = await kubectl.get("pod", name)
    return obj if obj and obj["status"].get("phase") == want else None


async def waiting(kubectl: Kubectl, name: str, reason: str):
    obj = await kubectl.get("pod", name)
    for status in (obj or {}).get("status", {}).get("containerStatuses") or []:
        state = status.get("state", {}).get("waiting") or {}
        if state.get("reason") == reason:
            return state
    return None


def status_fields(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


async def container_pid(cgroups: CgroupManager, pod: dict, command_part: str) -> int:
    rel = cgroups.container_path(pod, "main")

    async def find():
        for pid in cgroups.pids(rel):
            try:
                if command_part in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                    return pid
            except OSError:
                continue
        return None

    return await eventually(find, 10, interval=0.2, what=f"the process {command_part!r}")


async def test_restricted_pod_runs_as_its_user_without_capabilities(kubectl, node, cgroups):
    name, _, _ = node
    p = unique("restricted")
    await kubectl.apply(pod_yaml(p, name, "exec sleep 3600", spec=RESTRICTED_SPEC, container=RESTRICTED_CONTAINER))
    obj = await eventually(lambda: pod_phase(kubectl, p, "Running"), 20, what="Running")
    fields = status_fields(await container_pid(cgroups, obj, "sleep 3600"))
    assert fields["Uid"].split() == ["1000"] * 4
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0 and int(fields["CapBnd"], 16) == 0
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"
    assert obj["status"]["containerStatuses"][0]["restartCount"] == 0

    # kubectl exec gets the same: user, capabilities, no_new_privs, seccomp.
    out = await kubectl("exec", p, "--", "grep", "-E", "^(Uid|CapEff|CapBnd|NoNewPrivs|Seccomp):", "/proc/self/status")
    seen = dict(line.split(":\t", 1) for line in out.strip().splitlines())
    assert seen["Uid"].split() == ["1000"] * 4
    assert int(seen["CapEff"], 16) == 0 and int(seen["CapBnd"], 16) == 0
    assert seen["NoNewPrivs"] == "1" and seen["Seccomp"] == "2"


async def test_default_user_is_not_root_and_root_gets_the_runtime_default_capabilities(kubectl, node, cgroups):
    name, _, _ = node
    plain, root = unique("nobody"), unique("root")
    await kubectl.apply(pod_yaml(plain, name, "exec sleep 3601"))
    await kubectl.apply(pod_yaml(root, name, "exec sleep 3602", spec="  securityContext: {runAsUser: 0}"))
    obj = await eventually(lambda: pod_phase(kubectl, plain, "Running"), 20, what="Running")
    fields = status_fields(await container_pid(cgroups, obj, "sleep 3601"))
    assert fields["Uid"].split() == ["65534"] * 4 and int(fields["CapEff"], 16) == 0
    obj = await eventually(lambda: pod_phase(kubectl, root, "Running"), 20, what="Running")
    fields = status_fields(await container_pid(cgroups, obj, "sleep 3602"))
    assert fields["Uid"].split() == ["0"] * 4
    # containerd's 14 default capabilities: CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP
    # NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP, and not CAP_SYS_ADMIN (21).
    assert int(fields["CapBnd"], 16) == 0xA80425FB
    assert int(fields["CapEff"], 16) == 0xA80425FB


async def test_run_as_non_root_refuses_root(kubectl, node):
    name, _, _ = node
    explicit, implicit = unique("nonroot-explicit"), unique("nonroot-image")
    await kubectl.apply(
        pod_yaml(explicit, name, "sleep 1", spec="  securityContext: {runAsNonRoot: true, runAsUser: 0}")
    )
    await kubectl.apply(
        pod_yaml(
            implicit,
            name,
            "sleep 1",
            spec=f"  runtimeClassName: {ROOT_CLASS}\n  securityContext: {{runAsNonRoot: true}}",
        )
    )
    state = await eventually(lambda: waiting(kubectl, explicit, "CreateContainerConfigError"), 20, what="refused")
    assert state["message"].startswith("container's runAsUser breaks non-root policy (pod: \"" + explicit + "_default(")
    state = await eventually(lambda: waiting(kubectl, implicit, "CreateContainerConfigError"), 20, what="refused")
    assert state["message"].startswith('container has runAsNonRoot and image will run as root (pod: "' + implicit)
    assert state["message"].endswith("container: main)")
    described = await kubectl("describe", "pod", implicit)
    assert "CreateContainerConfigError" in described and "image will run as root" in described


async def test_privileged_and_host_path_only_where_the_handler_allows(kubectl, node, cgroups):
    name, _, _ = node
    priv = "    securityContext: {privileged: true}"
    host = ("  volumes: [{name: host, hostPath: {path: /etc}}]", "    volumeMounts: [{name: host, mountPath: /host}]")
    refused_priv, refused_host = unique("priv-no"), unique("host-no")
    await kubectl.apply(pod_yaml(refused_priv, name, "sleep 3600", container=priv))
    await kubectl.apply(pod_yaml(refused_host, name, "sleep 3600", spec=host[0], container=host[1]))
    state = await eventually(lambda: waiting(kubectl, refused_priv, "CreateContainerConfigError"), 20, what="refused")
    assert "privileged containers are not allowed on runtime handler 'procs'" in state["message"]
    state = await eventually(lambda: waiting(kubectl, refused_host, "CreateContainerConfigError"), 20, what="refused")
    assert "volume 'host' is a hostPath, which runtime handler 'procs' does not allow" in state["message"]
    events = (await kubectl.json("get", "events", "--field-selector", f"involvedObject.name={refused_priv}"))["items"]
    assert any(e["reason"] == "Failed" and "privileged" in e["message"] for e in events)

    allowed_priv, allowed_host = unique("priv-yes"), unique("host-yes")
    rc = f"  runtimeClassName: {ROOT_CLASS}"
    await kubectl.apply(pod_yaml(allowed_priv, name, "exec sleep 3603", spec=rc, container=priv))
    await kubectl.apply(pod_yaml(allowed_host, name, "exec sleep 3604", spec=rc + "\n" + host[0], container=host[1]))
    obj = await eventually(lambda: pod_phase(kubectl, allowed_priv, "Running"), 20, what="privileged Running")
    fields = status_fields(await container_pid(cgroups, obj, "sleep 3603"))
    assert int(fields["CapBnd"], 16) == int(Path("/proc/self/status").read_text().split("CapBnd:")[1].split()[0], 16)
    await eventually(lambda: pod_phase(kubectl, allowed_host, "Running"), 20, what="hostPath Running")


async def test_exec_shell_cannot_read_node_credentials_or_agent_state(kubectl, node, cluster):
    name, _, state = node
    p = unique("snoop")
    # Root in the container, with CAP_DAC_OVERRIDE: file modes alone would not stop it.
    await kubectl.apply(pod_yaml(p, name, "exec sleep 3600", spec="  securityContext: {runAsUser: 0}"))
    await eventually(lambda: pod_phase(kubectl, p, "Running"), 20, what="Running")
    kubeconfig = cluster.dir / "nodes" / f"{name}.kubeconfig"
    targets = {
        "kubeconfig": kubeconfig,
        "ca.crt": cluster.dir / "pki" / "ca.crt",
        "ca.key": cluster.dir / "pki" / "ca.key",
        "state": state / "pods",
    }
    for what, path in targets.items():
        assert path.exists(), path  # there on the host
        code, out, _ = await kubectl.run("exec", p, "--", "sh", "-c", f"cat {path} || ls -A {path}", check=False)
        assert code != 0 or not out.strip(), f"{what} readable from the container: {out[:200]!r}"
    code, out, _ = await kubectl.run("exec", p, "--", "sh", "-c", f"ls -A {state}", check=False)
    assert out.strip() == "", f"the agent's state dir is visible: {out!r}"
    # The container's own view: no host disks in /dev, /proc/sys read-only.
    code, out, _ = await kubectl.run(
        "exec", p, "--", "sh", "-c", "ls /dev; echo x > /proc/sys/kernel/domainname", check=False
    )
    assert code != 0 and "null" in out and "sda" not in out and "vda" not in out


async def test_non_root_user_runs_with_a_private_state_dir(kubectl, node, cgroups):
    name, _, state = node
    assert state.stat().st_mode & 0o777 == 0o700
    p = unique("uid1000")
    await kubectl.apply(pod_yaml(p, name, "exec sleep 3600", spec="  securityContext: {runAsUser: 1000}"))
    obj = await eventually(lambda: pod_phase(kubectl, p, "Running"), 20, what="Running")
    await asyncio.sleep(3)
    obj = await kubectl.get("pod", p)
    status = obj["status"]["containerStatuses"][0]
    assert status["restartCount"] == 0 and "running" in status["state"], status
    out = await kubectl("exec", p, "--", "pwd")
    assert out.strip() == "/"


async def test_secret_values_stay_private_and_go_with_the_pod(kubectl, node):
    name, _, state = node
    value = f"s3cret-{uuid.uuid4().hex}"
    secret = unique("sec")
    await kubectl("create", "secret", "generic", secret, f"--from-literal=password={value}")
    p = unique("secret-user")
    env = f"    env: [{{name: PASSWORD, valueFrom: {{secretKeyRef: {{name: {secret}, key: password}}}}}}]"
    await kubectl.apply(pod_yaml(p, name, "exec sleep 3600", container=env))
    obj = await eventually(lambda: pod_phase(kubectl, p, "Running"), 20, what="Running")
    pod_dir = state / "pods" / f"default_{p}_{obj['metadata']['uid']}"
    holders = [f for f in state.rglob("*") if f.is_file() and value.encode() in f.read_bytes()]
    assert holders, "the secret is expected in the container's spec"
    for f in holders:
        assert f.stat().st_mode & 0o077 == 0, f"{f} is {oct(f.stat().st_mode)}"
        for parent in f.parents:
            if parent == state.parent:
                break
            if parent.is_relative_to(pod_dir):
                assert parent.stat().st_mode & 0o077 == 0, f"{parent} is {oct(parent.stat().st_mode)}"
    assert exposed_files(state, value) == []

    await kubectl("delete", "pod", p, "--wait=true", "--timeout=30s")
    await eventually(lambda: asyncio.sleep(0, not pod_dir.exists()), 10, what="the Pod's state dir removed")
    assert not [f for f in state.rglob("*") if f.is_file() and value.encode() in f.read_bytes()]
    await kubectl("delete", "secret", secret)
