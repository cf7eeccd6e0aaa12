"""Issue 5 acceptance: Pods run through an OCI runtime (real runc) from images pulled from a real
registry on 127.0.0.1, with pod IPs; image errors the kubelet's way; the same Pod cgroup values
as the process backend.

Real control plane, real registry (Debian's docker-registry), real runc, real cgroups; what is
checked is what a user would check: kubectl, the CRI log file, /proc and the cgroup files.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import Kubectl, eventually, free_port, ready_node
from helpers import check_exec_tty_and_resize, exposed_files

from agent.pod_network import default_bridge
from cgroups.quantity import parse_quantity
from devcluster import manage
from images.build import BUSYBOX_PATH, busybox_files, push_image
from images.local_registry import start_registry

pytest_plugins = ["registry_fixture"]
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(os.geteuid() != 0, reason="runc, pod cgroups and pod networks need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed (Debian package runc)"),
]

CGROUP_ROOT = f"kubelet-emu-test-{uuid.uuid4().hex[:6]}"
SUFFIX = uuid.uuid4().hex[:6]
ISOLATED = f"isolated-{SUFFIX}"  # RuntimeClass names are cluster-wide: one set per test session
PROCS = f"procs-{SUFFIX}"
LIGHT = f"light-{SUFFIX}"  # the isolated handler without overhead: 50 Pods fit on 2 cores
OVERHEAD = {"cpu": "250m", "memory": "120Mi"}
IMAGE_CONFIG = {"Cmd": ["sh"], "Env": [f"PATH={BUSYBOX_PATH}"]}


def config(runc_root: Path) -> str:
    return f"""
[node]
cgroup_root = "{CGROUP_ROOT}"
[runtimes.isolated]
backend = "oci"
runtime_path = "{shutil.which("runc")}"
runtime_root = "{runc_root}"
allow_privileged = true
[runtimes.procs]
backend = "process"
allow_privileged = true
"""


def pod(name: str, node: str, runtime_class: str, container: dict, **spec: object) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "nodeName": node,
                "runtimeClassName": runtime_class,
                "terminationGracePeriodSeconds": 2,
                "containers": [{"name": "c", **container}],
                **spec,
            },
        }
    )


async def running(kubectl: Kubectl, name: str) -> dict | None:
    obj = await kubectl.get("pod", name)
    return obj if obj and obj["status"].get("phase") == "Running" and obj["status"].get("podIP") else None


async def waiting_reason(kubectl: Kubectl, name: str, reason: str) -> dict | None:
    obj = await kubectl.get("pod", name)
    for status in (obj or {}).get("status", {}).get("containerStatuses") or []:
        if (status.get("state", {}).get("waiting") or {}).get("reason") == reason:
            return status
    return None


async def event_reasons(kubectl: Kubectl, name: str) -> dict[str, list[str]]:
    items = (await kubectl.json("get", "events", "--field-selector", f"involvedObject.name={name}"))["items"]
    found: dict[str, list[str]] = {}
    for e in items:
        found.setdefault(e["reason"], []).append(e["message"])
    return found


def bridge_ports(bridge: str) -> str:
    return subprocess.run(["ip", "-o", "link", "show", "master", bridge], capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
async def runtime_classes(cluster):
    kubectl = Kubectl(cluster)
    for name, handler in ((ISOLATED, "isolated"), (PROCS, "procs")):
        await kubectl.apply(json.dumps({
            "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": name},
            "handler": handler, "overhead": {"podFixed": OVERHEAD},
        }))  # fmt: skip
    await kubectl.apply(json.dumps({
        "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": LIGHT}, "handler": "isolated",
    }))  # fmt: skip
    yield
    await kubectl.run("delete", "runtimeclass", ISOLATED, PROCS, LIGHT, check=False)


@pytest.fixture
async def node(kubectl, start_agent, tmp_path, runtime_classes, cgroups):
    name = f"emu-oci-{uuid.uuid4().hex[:6]}"
    state = tmp_path / "state"
    agent = await ready_node(kubectl, start_agent, name, config(tmp_path / "runc"), state)
    yield name, agent, state
    await kubectl.run("delete", "pods", "--all", "--wait=true", "--timeout=90s", check=False)


async def test_isolated_pod_runs_an_image_from_the_local_registry(kubectl, node, busybox_ref, cgroups):
    name, _, state = node
    script = "echo hello from $(hostname); echo pid1=$(cat /proc/1/comm); sleep 3600"
    container = {
        "image": busybox_ref,
        "command": ["sh", "-c", script],
        "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}},
    }
    await kubectl.apply(pod("boxed", name, ISOLATED, container))
    obj = await eventually(lambda: running(kubectl, "boxed"), 60, what="boxed Running with an IP")
    status = obj["status"]["containerStatuses"][0]
    assert status["containerID"].startswith("oci://")
    assert "@sha256:" in status["imageID"]

    events = await event_reasons(kubectl, "boxed")
    assert any(m.startswith(f'Pulling image "{busybox_ref}"') for m in events.get("Pulling", []))
    assert any("Successfully pulled image" in m and "Image size:" in m for m in events.get("Pulled", []))

    # The CRI log file the kubelet API will serve.
    uid = obj["metadata"]["uid"]
    log_file = state / "pods" / f"default_boxed_{uid}" / "c" / "0.log"
    text = await eventually(lambda: asyncio.sleep(0, log_file.exists() and log_file.read_text()), 10, what="log")
    assert " stdout F hello from boxed" in text
    # Its own pid namespace: the shell that runs the script is pid 1 there (or the runtime's init).
    # kubectl logs, through the API server and the agent's kubelet API.
    assert "hello from boxed" in await kubectl("logs", "boxed")
    pid1 = next(line for line in text.splitlines() if "pid1=" in line).split("pid1=")[1]
    assert pid1 in ("sh", "sleep")

    # In the Pod's cgroup, whose limits include the RuntimeClass overhead.
    pod_cgroup = cgroups.pod_path(obj)
    values = cgroups.read_values(pod_cgroup)
    assert values["memory.limit_in_bytes"] == str((64 + 120) * 1024 * 1024)
    assert values["cpu.cfs_quota_us"] == "75000"  # (500m + 250m) of a 100000 us period
    pids = cgroups.pids(pod_cgroup)
    assert pids, "no process in the Pod's cgroup"
    comms = {Path(f"/proc/{p}/comm").read_text().strip() for p in pids if Path(f"/proc/{p}").exists()}
    assert "sleep" in comms
    # A different pid namespace than the host's.
    sleeper = next(p for p in pids if Path(f"/proc/{p}/comm").read_text().strip() == "sleep")
    assert os.readlink(f"/proc/{sleeper}/ns/pid") != os.readlink("/proc/self/ns/pid")


async def test_image_errors_and_other_pods_keep_running(kubectl, node, busybox_ref, registry):
    name, agent, _ = node
    await kubectl.apply(pod("nosuchtag", name, ISOLATED, {"image": f"{registry.host}/busybox:nope"}))
    await kubectl.apply(pod("never", name, ISOLATED, {"image": f"{registry.host}/never:1", "imagePullPolicy": "Never"}))
    await kubectl.apply(pod("badname", name, ISOLATED, {"image": "Bad Name!"}))
    await kubectl.apply(pod("fine", name, ISOLATED, {"image": busybox_ref, "command": ["sleep", "3600"]}))

    assert await eventually(lambda: waiting_reason(kubectl, "nosuchtag", "ErrImagePull"), 30, what="ErrImagePull")
    backoff = await eventually(
        lambda: waiting_reason(kubectl, "nosuchtag", "ImagePullBackOff"), 30, what="ImagePullBackOff"
    )
    assert backoff["state"]["waiting"]["message"].startswith(f'Back-off pulling image "{registry.host}/busybox:nope"')
    events = await event_reasons(kubectl, "nosuchtag")
    assert "BackOff" in events and any(m.startswith("Failed to pull image") for m in events["Failed"])
    assert "Error: ImagePullBackOff" in events["Failed"]

    never = await eventually(lambda: waiting_reason(kubectl, "never", "ErrImageNeverPull"), 30, what="NeverPull")
    assert "is not present with pull policy of Never" in never["state"]["waiting"]["message"]
    bad = await eventually(lambda: waiting_reason(kubectl, "badname", "InvalidImageName"), 30, what="InvalidName")
    assert "Bad Name!" in bad["state"]["waiting"]["message"]

    assert await eventually(lambda: running(kubectl, "fine"), 60, what="a good Pod Running meanwhile")
    assert agent.alive


async def test_oci_and_process_pods_reach_each_other_by_ip(kubectl, node, busybox_ref):
    name, _, _ = node
    server = {
        "image": busybox_ref,
        "command": ["sh", "-c", "mkdir -p /www && echo 'served by busybox httpd' > /www/index.html && "
                    "exec httpd -f -p 8080 -h /www"],
    }  # fmt: skip
    await kubectl.apply(pod("oci-web", name, ISOLATED, server))
    web = await eventually(lambda: running(kubectl, "oci-web"), 60, what="oci-web Running")
    ip = web["status"]["podIP"]
    fetch = f"import urllib.request as u; assert b'busybox' in u.urlopen('http://{ip}:8080/', timeout=5).read()"
    # Root: sys.executable may live under /root (pyenv), which the process handler's default user cannot enter.
    as_root = {"runAsUser": 0}
    client = {"image": "host", "command": [sys.executable, "-c", fetch], "securityContext": as_root}
    await kubectl.apply(pod("proc-client", name, PROCS, client, restartPolicy="Never"))

    async def finished():
        obj = await kubectl.get("pod", "proc-client")
        return obj if obj and obj["status"].get("phase") in ("Succeeded", "Failed") else None

    done = await eventually(finished, 60, what="proc-client finished")
    assert done["status"]["phase"] == "Succeeded", done["status"]
    # And the other way: a process Pod serves, an OCI Pod fetches with busybox wget.
    serve = [sys.executable, "-m", "http.server", "8081", "--bind", "0.0.0.0"]
    await kubectl.apply(pod("proc-web", name, PROCS, {"image": "host", "command": serve, "securityContext": as_root}))
    proc_ip = (await eventually(lambda: running(kubectl, "proc-web"), 60, what="proc-web Running"))["status"]["podIP"]
    get = {
        "image": busybox_ref,
        "command": ["sh", "-c", f"timeout 10 wget -q -O - http://{proc_ip}:8081/ | grep -q Directory"],
    }
    await kubectl.apply(pod("oci-client", name, ISOLATED, get, restartPolicy="Never"))

    async def oci_finished():
        obj = await kubectl.get("pod", "oci-client")
        return obj if obj and obj["status"].get("phase") in ("Succeeded", "Failed") else None

    done = await eventually(oci_finished, 60, what="oci-client finished")
    assert done["status"]["phase"] == "Succeeded", done["status"]


async def test_same_pod_same_cgroup_values_on_both_backends(kubectl, node, busybox_ref, cgroups):
    name, _, _ = node
    container = {
        "image": busybox_ref,
        "command": ["sleep", "3600"],
        "resources": {"requests": {"cpu": "100m", "memory": "32Mi"}, "limits": {"cpu": "300m", "memory": "96Mi"}},
    }
    await kubectl.apply(pod("same-oci", name, ISOLATED, container))
    await kubectl.apply(pod("same-proc", name, PROCS, container))
    values = {}
    for pod_name in ("same-oci", "same-proc"):
        obj = await eventually(lambda n=pod_name: running(kubectl, n), 60, what=f"{pod_name} Running")
        values[pod_name] = cgroups.read_values(cgroups.pod_path(obj))
    assert values["same-oci"] == values["same-proc"]
    assert values["same-oci"]["memory.limit_in_bytes"] == str((96 + 120) * 1024 * 1024)
    assert values["same-oci"]["cpu.shares"] == str(350 * 1024 // 1000)  # request 100m + overhead 250m


async def test_exec_and_port_forward_into_a_runc_pod(kubectl, node, busybox_ref):
    """kubectl exec (exit code, stdin) and port-forward reach a container run by runc."""
    name, _, _ = node
    server = {
        "image": busybox_ref,
        "command": ["sh", "-c", "mkdir -p /www && echo inside > /www/index.html && "
                    "exec httpd -f -p 127.0.0.1:8080 -h /www"],
    }  # fmt: skip
    await kubectl.apply(pod("exec-me", name, ISOLATED, server))
    await eventually(lambda: running(kubectl, "exec-me"), 60, what="exec-me Running")

    code, out, err = await kubectl.run(
        "exec", "exec-me", "--", "sh", "-c", "echo hi; ps -o pid,comm; exit 3", check=False
    )
    assert code == 3 and out.startswith("hi\n"), (code, out, err)
    assert "httpd" in out  # the container's own pid namespace: its processes only
    code, out, _ = await kubectl.run("exec", "-i", "exec-me", "--", "cat", stdin="through stdin\n")
    assert (code, out) == (0, "through stdin\n")

    # httpd listens on the Pod's loopback only: port-forward connects inside the Pod's namespace.
    local = free_port()
    argv, env = manage.kubectl_argv(kubectl.cluster, ["port-forward", "pod/exec-me", f"{local}:8080"])
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert b"Forwarding from" in await asyncio.wait_for(proc.stdout.readline(), 20)

        async def fetch() -> bytes | None:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", local)
                writer.write(b"GET / HTTP/1.0\r\n\r\n")
                body = await asyncio.wait_for(reader.read(), 5)
                writer.close()
                return body or None
            except OSError:
                return None

        assert b"inside" in await eventually(fetch, 20, what="an answer through the port-forward")
    finally:
        proc.terminate()
        await proc.wait()


async def test_kubectl_cp_into_and_out_of_a_runc_pod(kubectl, node, busybox_ref, tmp_path):
    """kubectl cp runs tar in the container: the busybox image has all of busybox's applets."""
    name, _, _ = node
    box = {"image": busybox_ref, "command": ["sleep", "3600"]}
    await kubectl.apply(pod("cp-me", name, ISOLATED, box))
    await eventually(lambda: running(kubectl, "cp-me"), 60, what="cp-me Running")
    data = os.urandom(300_000) + b"\x00\n end"
    (tmp_path / "in.bin").write_bytes(data)
    await kubectl("cp", str(tmp_path / "in.bin"), "cp-me:/tmp/in.bin", "-c", "c")
    code, out, err = await kubectl.run("exec", "cp-me", "--", "sh", "-c", "wc -c < /tmp/in.bin; ls -l /bin/tar")
    assert code == 0 and out.split()[0] == str(len(data)), (out, err)
    await kubectl("cp", "cp-me:/tmp/in.bin", str(tmp_path / "out.bin"), "-c", "c")
    assert (tmp_path / "out.bin").read_bytes() == data


async def test_fifty_runc_pods_leave_no_namespace_veth_address_or_mount(kubectl, node, busybox_ref):
    name, _, state = node
    netns_before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    names = [f"fifty-{i}" for i in range(50)]
    container = {"image": busybox_ref, "command": ["sleep", "3600"]}
    await kubectl.apply("\n---\n".join(pod(n, name, LIGHT, container) for n in names))

    async def all_running():
        items = (await kubectl.json("get", "pods"))["items"]
        ours = [p for p in items if p["metadata"]["name"].startswith("fifty-")]
        ok = [p for p in ours if p["status"].get("phase") == "Running" and p["status"].get("podIP")]
        return ok if len(ok) == 50 else None

    running_pods = await eventually(all_running, 180, interval=1, what="50 runc Pods Running")
    assert len({p["status"]["podIP"] for p in running_pods}) == 50
    assert any(str(state) in line for line in Path("/proc/self/mountinfo").read_text().splitlines())
    await kubectl.run("delete", "pods", "--all", "--wait=true", "--timeout=120s")

    async def clean():
        mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(state) in line]
        netns = {n for n in os.listdir("/run/netns") if n.startswith("emu-")} - netns_before
        ipam = json.loads((state / "network" / "ipam.json").read_text())["allocations"]
        return (not mounts and not netns and not ipam and not bridge_ports(default_bridge(name))) or None

    await eventually(clean, 60, interval=1, what="no mount, namespace, address or veth left")


async def test_exec_with_a_tty_into_a_runc_pod(kubectl, node, busybox_ref):
    """kubectl exec -it on a real terminal into a container run by runc: a TTY, its size, a resize."""
    name, _, _ = node
    await kubectl.apply(pod("tty-me", name, ISOLATED, {"image": busybox_ref, "command": ["sleep", "3600"]}))
    await eventually(lambda: running(kubectl, "tty-me"), 60, what="tty-me Running")
    argv, env = manage.kubectl_argv(kubectl.cluster, ["exec", "-it", "tty-me", "--", "sh"])
    await check_exec_tty_and_resize(argv, env)


@pytest.fixture(scope="module")
async def private_registry(tmp_path_factory):
    """A registry that wants a password (token auth, as Docker Hub and most registries do)."""
    reg = await start_registry(tmp_path_factory.mktemp("private-registry"), users={"puller": "s3cret"}, auth="token")
    await push_image(reg.url, "team/box", "1", busybox_files(), config=IMAGE_CONFIG, auth=("puller", "s3cret"))
    yield reg
    await reg.stop()


async def test_image_pull_secret_for_a_private_registry(kubectl, node, private_registry):
    """imagePullSecrets: the agent reads the Pod's kubernetes.io/dockerconfigjson Secret (the node
    authorizer lets it read only its Pods' Secrets) and pulls with it; without one the pull is refused."""
    name, _, _ = node
    image = f"{private_registry.host}/team/box:1"
    auth = base64.b64encode(b"puller:s3cret").decode()
    config = json.dumps({"auths": {private_registry.host: {"auth": auth}}})
    secret = {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "regcred"},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64.b64encode(config.encode()).decode()},
    }  # fmt: skip
    await kubectl.apply(json.dumps(secret))
    try:
        container = {"image": image, "command": ["sleep", "3600"]}
        # Without the secret first: once an image is on the node, IfNotPresent does not pull again.
        await kubectl.apply(pod("no-secret", name, ISOLATED, container))
        refused = await eventually(lambda: waiting_reason(kubectl, "no-secret", "ErrImagePull"), 30, what="refused")
        assert "unauthorized" in refused["state"]["waiting"]["message"].lower()
        await kubectl.apply(pod("with-secret", name, ISOLATED, container, imagePullSecrets=[{"name": "regcred"}]))
        assert await eventually(lambda: running(kubectl, "with-secret"), 60, what="Running with the pull secret")
    finally:
        await kubectl.run("delete", "secret", "regcred", check=False)


async def test_privileged_runc_container_gets_the_hosts_own_capabilities(kubectl, node, busybox_ref):
    """Issue 17 item 13: a privileged container gets the capabilities the runtime itself holds (as
    containerd grants them), not every capability the kernel knows: on a host whose bounding set
    lacks one, runc would fail with "unable to apply caps"."""
    name, _, _ = node
    status = Path("/proc/self/status").read_text()
    fields = (line.partition(":\t") for line in status.splitlines())
    masks = {k: int(v, 16) for k, _, v in fields if k.startswith("Cap")}
    container = {
        "image": busybox_ref,
        "command": ["sh", "-c", "grep CapEff /proc/self/status; sleep 3600"],
        "securityContext": {"privileged": True},
    }
    await kubectl.apply(pod("priv-box", name, ISOLATED, container))
    await eventually(lambda: running(kubectl, "priv-box"), 60, what="priv-box Running")
    text = await eventually(lambda: _logs_with(kubectl, "priv-box", "CapEff"), 20, what="CapEff in the log")
    effective = int(text.split("CapEff:")[1].split()[0], 16)
    assert effective == masks["CapBnd"] & masks["CapEff"]
    await kubectl("delete", "pod", "priv-box", "--wait=true", "--timeout=60s")


def _env_container(runtime_class: str, busybox_ref: str, env: list[dict]) -> dict:
    container: dict = {"command": ["sh", "-c", "env; echo END-OF-ENV; sleep 3600"], "env": env}
    if runtime_class == ISOLATED:
        container["image"] = busybox_ref
    else:
        container["image"] = "host"  # the process backend runs commands on the host
    return container


async def _env_of(kubectl: Kubectl, pod_name: str) -> dict[str, str]:
    text = await eventually(lambda: _logs_with(kubectl, pod_name, "END-OF-ENV"), 30, what=f"{pod_name}'s env")
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@pytest.mark.parametrize("runtime_class", [ISOLATED, PROCS], ids=["oci", "process"])
async def test_downward_api_limit_defaults_and_pod_ip(kubectl, node, busybox_ref, runtime_class):
    """Issue 17 item 8: limits.cpu / limits.memory of a container without limits give the node's
    allocatable; status.podIP is the Pod's own IP on both backends."""
    name, _, _ = node
    pod_name = f"downward-{'oci' if runtime_class == ISOLATED else 'proc'}"
    env = [
        {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1m"}}},
        {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
    ]
    await kubectl.apply(pod(pod_name, name, runtime_class, _env_container(runtime_class, busybox_ref, env)))
    obj = await eventually(lambda: running(kubectl, pod_name), 60, what=f"{pod_name} Running")
    got = await _env_of(kubectl, pod_name)
    allocatable = (await kubectl.get("node", name))["status"]["allocatable"]
    assert got["CPU"] == str(int(parse_quantity(allocatable["cpu"]) * 1000))
    assert got["MEM"] == str(int(parse_quantity(allocatable["memory"])))
    assert got["POD_IP"] == obj["status"]["podIP"] != obj["status"]["hostIP"]
    assert got["HOST_IP"] == obj["status"]["hostIP"]
    await kubectl("delete", "pod", pod_name, "--wait=true", "--timeout=60s")


@pytest.mark.parametrize("runtime_class", [ISOLATED, PROCS], ids=["oci", "process"])
async def test_service_environment_variables(kubectl, node, busybox_ref, runtime_class):
    """Issue 17 item 7: KUBERNETES_SERVICE_HOST and the docker-link variables of the Services in
    the Pod's namespace (enableServiceLinks, the default); only the master Service's without it;
    the spec's env wins and $(VAR) may refer to Service variables."""
    name, _, _ = node
    short = "oci" if runtime_class == ISOLATED else "proc"
    ns = f"svc-{short}-{SUFFIX}"
    await kubectl("create", "namespace", ns)
    await kubectl.apply(json.dumps({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-front", "namespace": ns},
        "spec": {"selector": {"app": "none"}, "ports": [
            {"name": "http", "port": 80, "targetPort": 8080},
            {"name": "dns", "port": 53, "protocol": "UDP"},
        ]},
    }))  # fmt: skip
    svc = await kubectl.get("service", "web-front", "-n", ns)
    kube_ip = (await kubectl.get("service", "kubernetes", "-n", "default"))["spec"]["clusterIP"]
    ip = svc["spec"]["clusterIP"]
    env = [
        {"name": "WEB_FRONT_SERVICE_PORT_HTTP", "value": "mine"},
        {"name": "FRONT_URL", "value": "http://$(WEB_FRONT_SERVICE_HOST):$(WEB_FRONT_SERVICE_PORT)/"},
    ]
    linked = json.loads(pod("linked", name, runtime_class, _env_container(runtime_class, busybox_ref, env)))
    unlinked = json.loads(pod("unlinked", name, runtime_class, _env_container(runtime_class, busybox_ref, [])))
    unlinked["spec"]["enableServiceLinks"] = False
    for obj in (linked, unlinked):
        obj["metadata"]["namespace"] = ns
        await kubectl.apply(json.dumps(obj))
    for pod_name in ("linked", "unlinked"):
        await eventually(lambda n=pod_name: _running_in(kubectl, ns, n), 60, what=f"{pod_name} Running")
    got = await _env_of_ns(kubectl, ns, "linked")
    assert got["KUBERNETES_SERVICE_HOST"] == kube_ip and got["KUBERNETES_SERVICE_PORT"] == "443"
    assert got["KUBERNETES_PORT"] == f"tcp://{kube_ip}:443"
    assert got["WEB_FRONT_SERVICE_HOST"] == ip
    assert got["WEB_FRONT_SERVICE_PORT"] == "80"
    assert got["WEB_FRONT_SERVICE_PORT_HTTP"] == "mine"  # the spec's env overrides
    assert got["WEB_FRONT_SERVICE_PORT_DNS"] == "53"
    assert got["WEB_FRONT_PORT"] == f"tcp://{ip}:80"
    assert got["WEB_FRONT_PORT_80_TCP"] == f"tcp://{ip}:80"
    assert got["WEB_FRONT_PORT_80_TCP_PROTO"] == "tcp"
    assert got["WEB_FRONT_PORT_80_TCP_PORT"] == "80"
    assert got["WEB_FRONT_PORT_80_TCP_ADDR"] == ip
    assert got["WEB_FRONT_PORT_53_UDP"] == f"udp://{ip}:53"
    assert got["FRONT_URL"] == f"http://{ip}:80/"
    plain = await _env_of_ns(kubectl, ns, "unlinked")
    assert plain["KUBERNETES_SERVICE_HOST"] == kube_ip
    assert not [k for k in plain if k.startswith("WEB_FRONT")]
    # Waited for: the agent tears the Pods down (rootfs, shm) before the fixture stops it.
    await kubectl("delete", "namespace", ns, "--wait=true", "--timeout=90s")


async def _terminated(kubectl: Kubectl, pod_name: str) -> dict | None:
    obj = await kubectl.get("pod", pod_name)
    for status in (obj or {}).get("status", {}).get("containerStatuses") or []:
        if "terminated" in status.get("state", {}):
            return status["state"]["terminated"]
    return None


@pytest.mark.parametrize("runtime_class", [ISOLATED, PROCS], ids=["oci", "process"])
async def test_termination_messages(kubectl, node, busybox_ref, runtime_class):
    """Issue 17 item 9: the message file is the container's own (on the process backend never a
    file of the host: not its /dev/termination-log, privileged or not, nor a custom path outside
    /dev, existing or not), and FallbackToLogsOnError gives the log's tail (80 lines, 2048 bytes)
    when the file is empty and the container failed."""
    name, _, _ = node
    short = "oci" if runtime_class == ISOLATED else "proc"
    host_log = Path("/dev/termination-log")
    before = host_log.read_bytes() if host_log.exists() else None
    words = f"last words {uuid.uuid4().hex}"
    said = _env_container(runtime_class, busybox_ref, [])
    said["command"] = ["sh", "-c", f"echo -n '{words}' > /dev/termination-log; exit 0"]
    custom = _env_container(runtime_class, busybox_ref, [])
    custom["command"] = ["sh", "-c", "echo -n custom > /dev/my-message; exit 1"]
    custom["terminationMessagePath"] = "/dev/my-message"
    tail = _env_container(runtime_class, busybox_ref, [])
    tail["command"] = ["sh", "-c", "i=1; while [ $i -le 100 ]; do echo line-$i; i=$((i+1)); done; exit 3"]
    tail["terminationMessagePolicy"] = "FallbackToLogsOnError"
    ok = _env_container(runtime_class, busybox_ref, [])
    ok["command"] = ["sh", "-c", "echo fine; exit 0"]
    ok["terminationMessagePolicy"] = "FallbackToLogsOnError"
    # Paths outside /dev: one that exists on the host (its content must stay), one that does not
    # (it must not appear on the host). Root, so that nothing but the agent's care stops a write.
    existing = Path(f"/tmp/kubelet-emu-msg-existing-{uuid.uuid4().hex[:8]}")
    existing.write_text("the host's own\n")
    missing = Path(f"/tmp/kubelet-emu-msg-missing-{uuid.uuid4().hex[:8]}")
    over = _env_container(runtime_class, busybox_ref, [])
    over["command"] = ["sh", "-c", f"echo -n mine > {existing}; exit 0"]
    over["terminationMessagePath"] = str(existing)
    over["securityContext"] = {"runAsUser": 0}
    elsewhere = _env_container(runtime_class, busybox_ref, [])
    elsewhere["command"] = ["sh", "-c", f"echo -n elsewhere > {missing}; exit 0"]
    elsewhere["terminationMessagePath"] = str(missing)
    elsewhere["securityContext"] = {"runAsUser": 0}
    # Privileged: the host's devices, and still a termination log of its own.
    privileged = _env_container(runtime_class, busybox_ref, [])
    privileged["command"] = ["sh", "-c", f"test -e /dev/null && echo -n '{words}' > /dev/termination-log; exit 0"]
    privileged["securityContext"] = {"privileged": True, "runAsUser": 0}
    # A path in /dev the host lacks (this host may have a /dev/termination-log of its own).
    dev_missing = Path(f"/dev/kubelet-emu-msg-{uuid.uuid4().hex[:8]}")
    priv_dev = _env_container(runtime_class, busybox_ref, [])
    priv_dev["command"] = ["sh", "-c", f"ls /dev/pts /dev/shm >/dev/null && echo -n devices > {dev_missing}; exit 0"]
    priv_dev["terminationMessagePath"] = str(dev_missing)
    priv_dev["securityContext"] = {"privileged": True, "runAsUser": 0}
    pods = {
        "said": said,
        "custom": custom,
        "tail": tail,
        "ok": ok,
        "over": over,
        "priv": privileged,
        "privdev": priv_dev,
    }
    if runtime_class == ISOLATED:
        pods["elsewhere"] = elsewhere
    try:
        for key, container in pods.items():
            await kubectl.apply(pod(f"msg-{key}-{short}", name, runtime_class, container, restartPolicy="Never"))
        if runtime_class == PROCS:  # refused: the file would be made on the host's file system
            refused = f"msg-elsewhere-{short}"
            await kubectl.apply(pod(refused, name, runtime_class, elsewhere, restartPolicy="Never"))
            status = await eventually(
                lambda: waiting_reason(kubectl, refused, "CreateContainerConfigError"), 30, what="refused"
            )
            message = status["state"]["waiting"]["message"]
            assert f"terminationMessagePath {missing} is not a file on this host" in message
            await kubectl("delete", "pod", refused, "--wait=false")
        got = {}
        for key in pods:
            got[key] = await eventually(lambda k=key: _terminated(kubectl, f"msg-{k}-{short}"), 60, what=f"{key} ended")
        assert got["said"].get("message") == words and got["said"]["exitCode"] == 0
        assert got["custom"].get("message") == "custom"
        lines = [f"line-{i}" for i in range(21, 101)]
        assert got["tail"].get("message") == "\n".join(lines) + "\n"
        assert "message" not in got["ok"]  # succeeded: no fallback
        assert got["over"].get("message") == "mine"
        assert got["priv"].get("message") == words and got["priv"]["exitCode"] == 0
        assert got["privdev"].get("message") == "devices" and got["privdev"]["exitCode"] == 0
        assert not dev_missing.exists(), f"{dev_missing} was made in the host's /dev"
        if "elsewhere" in got:
            assert got["elsewhere"].get("message") == "elsewhere"
        after = host_log.read_bytes() if host_log.exists() else None
        assert after == before, "the host's /dev/termination-log was written"
        assert existing.read_text() == "the host's own\n", f"the host's {existing} was written"
        assert not missing.exists(), f"{missing} was made on the host"
    finally:
        existing.unlink(missing_ok=True)
        missing.unlink(missing_ok=True)
        dev_missing.unlink(missing_ok=True)
    for key in pods:
        await kubectl("delete", "pod", f"msg-{key}-{short}", "--wait=false")


async def _running_in(kubectl: Kubectl, ns: str, pod_name: str) -> dict | None:
    obj = await kubectl.get("pod", pod_name, "-n", ns)
    return obj if obj and obj["status"].get("phase") == "Running" else None


async def _env_of_ns(kubectl: Kubectl, ns: str, pod_name: str) -> dict[str, str]:
    async def logs() -> str | None:
        _, out, _ = await kubectl.run("logs", "-n", ns, pod_name, check=False)
        return out if "END-OF-ENV" in out else None

    text = await eventually(logs, 30, what=f"{pod_name}'s env")
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


async def _logs_with(kubectl: Kubectl, pod_name: str, needle: str) -> str | None:
    _, out, _ = await kubectl.run("logs", pod_name, check=False)
    return out if needle in out else None


async def test_secret_volume_on_tmpfs_and_config_private(kubectl, node, busybox_ref):
    """Issue 16: Secret volumes live in memory, config.json (with secretKeyRef values) is 0600 in
    0700 directories, and all of it goes with the Pod."""
    name, _, state = node
    value = f"s3cret-{uuid.uuid4().hex}"
    secret = f"sec-{uuid.uuid4().hex[:6]}"
    await kubectl("create", "secret", "generic", secret, f"--from-literal=password={value}")
    container = {
        "image": busybox_ref,
        "command": ["sh", "-c", "cat /s/password; sleep 3600"],
        "env": [{"name": "P", "valueFrom": {"secretKeyRef": {"name": secret, "key": "password"}}}],
        "volumeMounts": [{"name": "s", "mountPath": "/s"}],
    }
    await kubectl.apply(
        pod("secret-box", name, ISOLATED, container, volumes=[{"name": "s", "secret": {"secretName": secret}}])
    )
    obj = await eventually(lambda: running(kubectl, "secret-box"), 60, what="secret-box Running")
    pod_dir = state / "pods" / f"default_secret-box_{obj['metadata']['uid']}"
    volume = pod_dir / "volumes" / "s"
    mounts = {line.split()[1]: line.split()[2] for line in Path("/proc/mounts").read_text().splitlines()}
    assert mounts.get(str(volume)) == "tmpfs", "the Secret volume is not on a tmpfs"
    config = pod_dir / "c" / "0" / "config.json"
    assert value in config.read_text()
    assert config.stat().st_mode & 0o077 == 0 and config.parent.stat().st_mode & 0o077 == 0
    assert pod_dir.stat().st_mode & 0o077 == 0
    assert exposed_files(state, value) == [], "Secret values readable by other users"
    await kubectl("delete", "pod", "secret-box", "--wait=true", "--timeout=60s")
    await eventually(lambda: asyncio.sleep(0, not pod_dir.exists()), 15, what="the Pod's directory removed")
    assert str(volume) not in Path("/proc/mounts").read_text()
    await kubectl("delete", "secret", secret)
