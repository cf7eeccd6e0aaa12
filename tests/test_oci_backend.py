"""The oci backend driving the real runc with real cgroups, namespaces and processes.

Only the image store is a stand-in (tests/oci_images.py: a busybox rootfs), until the images
package is merged; ConfigMaps and Secrets come from a dict instead of the API server.
Every test removes its sandbox; the session removes its cgroup root, runc state and mounts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from oci_images import LocalImages, build_busybox_rootfs, busybox_available

from cgroups.manager import CgroupManager, detect_mode
from runtimes.base import BackendContext, ContainerHandle, CreateContainerConfigError, RunContainerError, Sandbox
from runtimes.crilog import read_logs, rotated_files
from runtimes.handler import Handler
from runtimes.oci.backend import OciBackend
from runtimes.oci.cgroups import cgroup_mounts, remove_everywhere
from runtimes.registry import backend_class

RUNC = "/usr/sbin/runc"
CGROUP_ROOT = f"kubelet-emu-test-{uuid.uuid4().hex[:6]}"


def _host_v1() -> bool:
    try:
        return detect_mode().version == 1
    except Exception:
        return False


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the oci backend needs root (runc, cgroups, mounts)"),
    pytest.mark.skipif(not os.access(RUNC, os.X_OK), reason=f"runc is not installed at {RUNC}"),
    pytest.mark.skipif(not busybox_available(), reason="/bin/busybox (busybox-static) builds the test rootfs"),
]

OBJECTS: dict[tuple[str, str, str], dict] = {
    ("ConfigMap", "default", "app-config"): {"data": {"greeting": "hello from configmap", "other": "x"}},
    ("Secret", "default", "app-secret"): {"data": {"password": base64.b64encode(b"s3cret").decode()}},
}


async def lookup(kind: str, namespace: str, name: str) -> dict | None:
    return OBJECTS.get((kind, namespace, name))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("oci")
    yield base
    # Mounts a failed test left (runc's containers and cgroups are gone by now: see `cgroups`).
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        point = line.split()[4]
        if point.startswith(str(base)):
            subprocess.run(["umount", "-l", point], capture_output=True)


@pytest.fixture(scope="module")
def cgroups(base_dir: Path) -> Iterator[CgroupManager]:
    manager = CgroupManager(detect_mode(), root=CGROUP_ROOT)
    yield manager
    # Whatever a failed test left: runc's containers first (they own cgroups in every hierarchy),
    # then every process and cgroup under the test root.
    root = base_dir / "state" / "runtime"
    listed = subprocess.run([RUNC, "--root", str(root), "list", "-q"], capture_output=True, text=True).stdout.split()
    for container_id in listed:
        subprocess.run([RUNC, "--root", str(root), "delete", "--force", container_id], capture_output=True)
    with contextlib.suppress(Exception):
        manager.remove(CGROUP_ROOT, kill=True)
    remove_everywhere(CGROUP_ROOT)


@pytest.fixture(scope="module")
def images(base_dir: Path) -> LocalImages:
    store = LocalImages()
    rootfs = build_busybox_rootfs(base_dir / "busybox-rootfs")
    store.add("busybox", rootfs, Cmd=["sh"], Env=["FROM_IMAGE=1", "OVERRIDE=image"], WorkingDir="/tmp")
    store.add("busybox-app", rootfs, Entrypoint=["sh", "-c"], Cmd=["id -u; id -G"], User="app")
    return store


def make_backend(base_dir: Path, cgroups: CgroupManager, images: LocalImages, **handler: Any) -> OciBackend:
    context = BackendContext(
        node_name="node-oci", state_dir=base_dir / "state", pods_dir=base_dir / "pods", lookup=lookup,
        cgroups=cgroups, images=images, log_max_size=1024 * 1024, log_max_files=2,
    )  # fmt: skip
    return OciBackend(Handler(name="runc", backend="oci", runtime_path=RUNC, **handler), context)


@pytest.fixture
async def backend(base_dir: Path, cgroups: CgroupManager, images: LocalImages) -> AsyncIterator[OciBackend]:
    backend = make_backend(base_dir, cgroups, images)
    yield backend
    await backend.close()  # its launcher ends; containers would stay (each test removes its own)


def pod_of(*containers: dict, overhead: dict | None = None, **spec: Any) -> dict:
    name = f"p-{uuid.uuid4().hex[:6]}"
    pod = {
        "metadata": {"name": name, "namespace": "default", "uid": str(uuid.uuid4())},
        "spec": {"containers": list(containers), "terminationGracePeriodSeconds": 5, **spec},
    }
    if overhead:
        pod["spec"]["overhead"] = overhead
    return pod


def ctr(script: str, name: str = "main", **extra: Any) -> dict:
    return {"name": name, "image": "busybox", "command": ["sh", "-c", script], **extra}


@contextlib.asynccontextmanager
async def sandbox_of(backend: OciBackend, pod: dict) -> AsyncIterator[Sandbox]:
    sandbox = await backend.create_sandbox(pod)
    try:
        yield sandbox
    finally:
        await backend.remove_sandbox(sandbox, pod)


async def run(backend: OciBackend, sandbox: Sandbox, pod: dict, container: dict) -> ContainerHandle:
    handle = await backend.create_container(sandbox, pod, container, 0)
    await backend.start_container(handle)
    return handle


def log_path(backend: OciBackend, pod: dict, name: str = "main", restart: int = 0) -> Path:
    meta = pod["metadata"]
    return backend.pods_dir / f"{meta['namespace']}_{meta['name']}_{meta['uid']}" / name / f"{restart}.log"


async def log_has(path: Path, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    content = ""
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        await asyncio.sleep(0.05)
    pytest.fail(f"{path} never had {text!r}; it has:\n{content}")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def cgroup_of(pid: int, controller: str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    raise AssertionError(f"no {controller} line in /proc/{pid}/cgroup")


def test_registered_as_a_built_in() -> None:
    assert backend_class("oci") is OciBackend


async def test_container_logs_runs_in_own_pid_namespace_and_pod_cgroup(backend: OciBackend, cgroups) -> None:
    container = ctr("echo hello; echo oops >&2; echo pid=$$$$; sleep 300", resources={"limits": {"memory": "64Mi"}})
    pod = pod_of(container, overhead={"memory": "32Mi"})
    async with sandbox_of(backend, pod) as sandbox:
        started = time.monotonic()
        handle = await run(backend, sandbox, pod, container)
        latency = time.monotonic() - started
        content = await log_has(log_path(backend, pod), "pid=1")
        assert " stdout F hello\n" in content and " stderr F oops\n" in content
        pid = handle.extra["state"]["pid"]

        pod_cgroup = "/" + cgroups.pod_path(pod)
        assert 2 <= int(Path(f"/proc/{pid}/oom_score_adj").read_text()) <= 999  # Burstable, by the kubelet's rule
        assert cgroup_of(pid, "memory") == f"{pod_cgroup}/main"
        assert cgroup_of(pid, "cpu") == f"{pod_cgroup}/main"
        if _host_v1():
            memory = detect_mode().mounts["memory"]
            assert (Path(memory + pod_cgroup) / "main" / "memory.limit_in_bytes").read_text().strip() == str(64 << 20)
            # The Pod's cgroup (the agent's, overhead included) is the container's parent.
            assert (Path(memory + pod_cgroup) / "memory.limit_in_bytes").read_text().strip() == str(96 << 20)

        code, out = await backend.exec(handle, ["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '; exit 7"])
        assert (code, out) == (7, b"sleep 300 ")  # the shell exec'd its last command: pid 1 of its own namespace
        state = await backend.runtime_state(handle.id)
        assert state and state["status"] == "running" and state["pid"] == pid
        await backend.stop_container(handle, 0.5)  # sh as pid 1 ignores SIGTERM: SIGKILL after the grace
        exit_ = await backend.wait_container(handle)
        assert (exit_.exit_code, exit_.signal, exit_.reason) == (137, 9, None)
        await backend.remove_container(handle)
    print(f"create+start latency with runc: {latency * 1000:.0f} ms")


async def test_exit_code_env_user_and_workdir(backend: OciBackend) -> None:
    container = ctr("echo $FROM_IMAGE $OVERRIDE $MINE $HOSTNAME; pwd; id -u; exit 3",
                    env=[{"name": "OVERRIDE", "value": "ctr"}, {"name": "MINE", "value": "$(OVERRIDE)-x"}],
                    securityContext={"runAsUser": 1000})  # fmt: skip
    pod = pod_of(container)
    async with sandbox_of(backend, pod) as sandbox:
        handle = await run(backend, sandbox, pod, container)
        exit_ = await asyncio.wait_for(backend.wait_container(handle), 20)
        assert exit_.exit_code == 3 and exit_.reason is None
        content = await log_has(log_path(backend, pod), "1000")
        assert f"F 1 ctr ctr-x {pod['metadata']['name']}\n" in content and " F /tmp\n" in content
        await backend.remove_container(handle)


async def test_termination_message_file_and_log_fallback(backend: OciBackend) -> None:
    to_file = ctr("echo 'last words' > /dev/termination-log; exit 1", name="file", securityContext={"runAsUser": 1000})
    custom = ctr("echo custom > /tmp/why; exit 0", name="custom", terminationMessagePath="/tmp/why")
    fallback = ctr("echo first; echo boom; exit 2", name="fallback", terminationMessagePolicy="FallbackToLogsOnError")
    pod = pod_of(to_file, custom, fallback)
    async with sandbox_of(backend, pod) as sandbox:
        for container, want in ((to_file, "last words\n"), (custom, "custom\n"), (fallback, "first\nboom\n")):
            handle = await run(backend, sandbox, pod, container)
            exit_ = await asyncio.wait_for(backend.wait_container(handle), 20)
            assert exit_.message == want, container["name"]
            await backend.remove_container(handle)


async def test_image_entrypoint_and_named_user(backend: OciBackend) -> None:
    container = {"name": "main", "image": "busybox-app"}
    pod = pod_of(container, securityContext={"supplementalGroups": [4242]})
    async with sandbox_of(backend, pod) as sandbox:
        handle = await run(backend, sandbox, pod, container)
        assert (await asyncio.wait_for(backend.wait_container(handle), 20)).exit_code == 0
        content = await log_has(log_path(backend, pod), "F 1000\n")
        assert "F 1000 3000 4242\n" in content  # primary group app, extra (lists app), supplementalGroups
        await backend.remove_container(handle)


async def test_stop_sends_sigterm_then_waits_the_grace(backend: OciBackend) -> None:
    container = ctr("trap 'echo got TERM; exit 0' TERM; echo ready; while true; do sleep 0.1; done")
    pod = pod_of(container)
    async with sandbox_of(backend, pod) as sandbox:
        handle = await run(backend, sandbox, pod, container)
        await log_has(log_path(backend, pod), "ready")
        started = time.monotonic()
        await backend.stop_container(handle, 10)
        assert time.monotonic() - started < 5
        exit_ = await backend.wait_container(handle)
        assert exit_.exit_code == 0 and exit_.signal is None
        await log_has(log_path(backend, pod), "got TERM")
        await backend.remove_container(handle)


async def test_stop_leaves_the_pre_stop_hook_to_the_agent(backend: OciBackend) -> None:
    # The agent runs lifecycle hooks (agent/hooks.py) as the kubelet does; the runtime only stops.
    pre_stop = {"exec": {"command": ["sh", "-c", "echo pre-stop > /proc/1/fd/1"]}}
    container = ctr("trap 'echo term; exit 0' TERM; while true; do sleep 0.1; done", lifecycle={"preStop": pre_stop})
    pod = pod_of(container)
    async with sandbox_of(backend, pod) as sandbox:
        handle = await run(backend, sandbox, pod, container)
        await backend.stop_container(handle, 10)
        assert (await backend.wait_container(handle)).exit_code == 0
        content = await log_has(log_path(backend, pod), "term")
        assert "pre-stop" not in content
        await backend.remove_container(handle)


async def test_exec_timeout_kills_the_command_in_the_container(backend: OciBackend) -> None:
    container = ctr("sleep 300")
    pod = pod_of(container)
    async with sandbox_of(backend, pod) as sandbox:
        handle = await run(backend, sandbox, pod, container)
        with pytest.raises(TimeoutError):
            await backend.exec(handle, ["sleep", "77"], timeout=0.5)
        code, out = await backend.exec(handle, ["ps", "-o", "args"])
        assert code == 0 and b"sleep 77" not in out
        await backend.stop_container(handle, 0)
        await backend.remove_container(handle)


async def test_log_rotation(base_dir, cgroups, images) -> None:
    backend = make_backend(base_dir, cgroups, images)
    backend.context = dataclasses.replace(backend.context, log_max_size=4096, log_max_files=3)
    request_close = backend.close
    # Bursts of 40 records (~3.7 KB) a second apart: a file rotates at most once a second (its
    # name is that second), so a faster flood would outgrow 4096 bytes.
    container = ctr(
        "i=0; while [ $i -lt 160 ]; do echo line-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; i=$((i+1)); "
        "[ $((i % 40)) = 0 ] && [ $i -lt 160 ] && sleep 1; done; true"
    )
    pod = pod_of(container)
    async with sandbox_of(backend, pod) as sandbox:
        handle = await run(backend, sandbox, pod, container)
        assert (await asyncio.wait_for(backend.wait_container(handle), 20)).exit_code == 0
        path = log_path(backend, pod)
        rotated = rotated_files(str(path))
        assert len(rotated) == 2 and all(os.path.getsize(p) <= 4096 for p in [*rotated, str(path)])
        assert read_logs(str(path)).decode().splitlines()[-1].startswith("line-159-")
        await backend.remove_container(handle)
    await request_close()


async def test_oom_killed(backend: OciBackend) -> None:
    # tail buffers its "line": /dev/zero has no newline, so it grows until the OOM killer comes.
    container = ctr("tail /dev/zero", resources={"limits": {"memory": "16Mi"}})
    pod = pod_of(container)
    async with sandbox_of(backend, pod) as sandbox:
        handle = await run(backend, sandbox, pod, container)
        exit_ = await asyncio.wait_for(backend.wait_container(handle), 60)
        assert (exit_.exit_code, exit_.reason) == (137, "OOMKilled")
        await backend.remove_container(handle)


async def test_config_map_secret_and_empty_dir_volumes(backend: OciBackend) -> None:
    volumes = [
        {"name": "cfg", "configMap": {"name": "app-config", "items": [{"key": "greeting", "path": "greet.txt",
                                                                        "mode": 0o600}]}},
        {"name": "sec", "secret": {"secretName": "app-secret", "defaultMode": 0o440}},
        {"name": "scratch", "emptyDir": {"medium": "Memory"}},
        {"name": "meta", "downwardAPI": {"items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]}},
    ]  # fmt: skip
    mounts = [{"name": "cfg", "mountPath": "/etc/cfg"}, {"name": "sec", "mountPath": "/etc/sec"},
              {"name": "scratch", "mountPath": "/scratch"}, {"name": "meta", "mountPath": "/etc/meta"}]  # fmt: skip
    writer = ctr("echo shared > /scratch/f; sleep 300", volumeMounts=mounts)
    reader = ctr("sleep 300", name="reader", volumeMounts=mounts)
    pod = pod_of(writer, reader, volumes=volumes)
    async with sandbox_of(backend, pod) as sandbox:
        # Created together, as the Pod worker does: one tmpfs for the Memory emptyDir, seen by both.
        handles = list(await asyncio.gather(*(run(backend, sandbox, pod, c) for c in (writer, reader))))
        script = (
            "cat /etc/cfg/greet.txt; echo; stat -L -c %a /etc/cfg/greet.txt; ls /etc/cfg; cat /etc/sec/password; echo;"
            "stat -L -c %a /etc/sec/password; cat /etc/meta/name; echo; sleep 0.3; cat /scratch/f;"
            "mount | grep ' /scratch ' | cut -d' ' -f5; touch /etc/cfg/new 2>/dev/null || echo read-only"
        )
        code, out = await backend.exec(handles[1], ["sh", "-c", script])
        assert code == 0, out
        lines = out.decode().splitlines()
        assert lines[:3] == ["hello from configmap", "600", "greet.txt"]
        assert lines[3:6] == ["s3cret", "440", pod["metadata"]["name"]]
        assert lines[6:8] == ["shared", "tmpfs"]
        assert lines[-1] == "read-only"
        for handle in handles:
            await backend.stop_container(handle, 0)
            await backend.remove_container(handle)


async def test_read_only_root_filesystem_and_no_new_privileges(backend: OciBackend) -> None:
    container = ctr("sleep 300", securityContext={"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False})
    pod = pod_of(container)
    async with sandbox_of(backend, pod) as sandbox:
        handle = await run(backend, sandbox, pod, container)
        code, out = await backend.exec(handle, ["touch", "/new-file"])
        assert code != 0 and b"Read-only file system" in out
        code, out = await backend.exec(handle, ["grep", "NoNewPrivs", "/proc/self/status"])
        assert out.split() == [b"NoNewPrivs:", b"1"]
        await backend.stop_container(handle, 0)
        await backend.remove_container(handle)


async def test_seccomp_runtime_default_denies_namespaces(backend: OciBackend) -> None:
    script = "unshare -U true && echo userns-ok; unshare -U true 2>&1 | head -1 >&2; sleep 300"
    plain = ctr(script, name="plain")
    confined = ctr(script, name="confined", securityContext={"seccompProfile": {"type": "RuntimeDefault"}})
    pod = pod_of(plain, confined)
    async with sandbox_of(backend, pod) as sandbox:
        handles = [await run(backend, sandbox, pod, c) for c in (plain, confined)]
        await log_has(log_path(backend, pod, "plain"), "userns-ok")
        content = await log_has(log_path(backend, pod, "confined"), "Operation not permitted")
        assert "userns-ok" not in content
        code, out = await backend.exec(handles[1], ["grep", "Seccomp:", "/proc/1/status"])
        assert code == 0 and out.split() == [b"Seccomp:", b"2"]  # filter mode
        for handle in handles:
            await backend.stop_container(handle, 0)
            await backend.remove_container(handle)


async def test_host_path_and_privileged_refused_by_default(backend: OciBackend) -> None:
    host = ctr("true", volumeMounts=[{"name": "logs", "mountPath": "/logs"}])
    pod = pod_of(host, volumes=[{"name": "logs", "hostPath": {"path": "/var/log"}}])
    async with sandbox_of(backend, pod) as sandbox:
        with pytest.raises(CreateContainerConfigError, match="volume 'logs' is a hostPath"):
            await backend.create_container(sandbox, pod, host, 0)
        privileged = ctr("true", name="priv", securityContext={"privileged": True})
        with pytest.raises(CreateContainerConfigError, match="privileged"):
            await backend.create_container(sandbox, pod, privileged, 0)


async def test_pod_containers_share_ipc_uts_and_network_not_pid(backend: OciBackend) -> None:
    a, b = ctr("sleep 300", name="a"), ctr("sleep 300", name="b")
    pod = pod_of(a, b, hostname="custom-host")
    async with sandbox_of(backend, pod) as sandbox:
        handles = [await run(backend, sandbox, pod, c) for c in (a, b)]
        pids = [h.extra["state"]["pid"] for h in handles]
        for kind in ("ipc", "uts", "net"):
            assert os.readlink(f"/proc/{pids[0]}/ns/{kind}") == os.readlink(f"/proc/{pids[1]}/ns/{kind}")
        assert os.readlink(f"/proc/{pids[0]}/ns/pid") != os.readlink(f"/proc/{pids[1]}/ns/pid")
        assert os.readlink(f"/proc/{pids[0]}/ns/net") != os.readlink("/proc/self/ns/net")
        code, out = await backend.exec(handles[0], ["sh", "-c", "hostname; cat /etc/hostname; grep custom /etc/hosts"])
        assert code == 0, out
        assert out.decode().split() == ["custom-host", "custom-host", "127.0.1.1", "custom-host"]
        for handle in handles:
            await backend.stop_container(handle, 0)
            await backend.remove_container(handle)


async def test_host_network_pod_uses_the_node_network_and_hostname(backend: OciBackend) -> None:
    container = ctr("sleep 300")
    pod = pod_of(container, hostNetwork=True)
    async with sandbox_of(backend, pod) as sandbox:
        assert sandbox.netns is None and sandbox.ips == ()
        handle = await run(backend, sandbox, pod, container)
        pid = handle.extra["state"]["pid"]
        for kind in ("net", "uts"):
            assert os.readlink(f"/proc/{pid}/ns/{kind}") == os.readlink(
                f"/proc/self/ns/{kind}"
            )  # the agent's, i.e. the node's
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        code, out = await backend.exec(handle, ["hostname"])
        assert (code, out.decode().strip()) == (0, os.uname().nodename)
        await backend.stop_container(handle, 0)
        await backend.remove_container(handle)


async def test_share_process_namespace(backend: OciBackend) -> None:
    a, b = ctr("sleep 301", name="a"), ctr("sleep 302", name="b")
    pod = pod_of(a, b, shareProcessNamespace=True)
    async with sandbox_of(backend, pod) as sandbox:
        handles = [await run(backend, sandbox, pod, c) for c in (a, b)]
        code, out = await backend.exec(handles[0], ["ps", "-o", "pid,comm,args"])
        assert code == 0, out
        text = out.decode()
        assert "sleep 301" in text and "sleep 302" in text
        assert text.splitlines()[1].split()[:2] == ["1", "pause"]  # pid 1 is the Pod's holder, as pause would be
        for handle in handles:
            await backend.stop_container(handle, 0)
            await backend.remove_container(handle)


async def test_container_survives_a_backend_restart(base_dir, cgroups, images) -> None:
    first = make_backend(base_dir, cgroups, images)
    container = ctr("trap 'exit 0' TERM; i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done")
    pod = pod_of(container)
    sandbox = await first.create_sandbox(pod)
    try:
        handle = await run(first, sandbox, pod, container)
        await log_has(log_path(first, pod), "tick 1")
        await first.close()
        del first

        second = make_backend(base_dir, cgroups, images)  # a new agent: the same state dir, nothing in memory
        sandbox2 = await second.create_sandbox(pod)
        assert sandbox2 == sandbox
        status = {"name": "main", "restartCount": 0, "containerID": f"oci://{handle.id}", "imageID": "x"}
        adopted = await second.adopt_container(sandbox2, pod, container, status)
        assert adopted is not None and adopted.id == handle.id and adopted.started_at == handle.started_at
        code, out = await second.exec(adopted, ["echo", "still here"])
        assert (code, out) == (0, b"still here\n")
        await log_has(log_path(second, pod), "tick 8")  # the shim kept logging while nobody watched
        await second.stop_container(adopted, 5)
        assert (await second.wait_container(adopted)).exit_code == 0
        await second.remove_container(adopted)
        assert await second.adopt_container(sandbox2, pod, container, {**status, "restartCount": 1}) is None
    finally:
        cleaner = make_backend(base_dir, cgroups, images)
        await cleaner.remove_sandbox(sandbox, pod)
        await cleaner.close()
        with contextlib.suppress(NameError):
            await second.close()


async def test_exec_stream_pipes_and_tty(backend: OciBackend) -> None:
    container = ctr("sleep 300")
    pod = pod_of(container)
    async with sandbox_of(backend, pod) as sandbox:
        handle = await run(backend, sandbox, pod, container)
        proc = await backend.exec_stream(sandbox, handle, ["sh", "-c", "read x; echo got $x; echo err >&2; exit 4"],
                                         tty=False, stdin=True)  # fmt: skip
        proc.stdin.write(b"line\n")
        await proc.stdin.drain()
        proc.stdin.close()
        assert await asyncio.wait_for(proc.stdout.read(), 10) == b"got line\n"
        assert await proc.stderr.read() == b"err\n"
        assert await proc.wait() == 4

        tty = await backend.exec_stream(sandbox, handle, ["sh", "-c", "stty size; tty; read x; echo got $x"],
                                        tty=True, stdin=True)  # fmt: skip
        await tty.resize(100, 40)
        tty.stdin.write(b"abc\n")
        await tty.stdin.drain()
        output = b""
        with contextlib.suppress(OSError):  # EIO on the master once the pty's last user is gone
            while b"got abc" not in output:
                chunk = await asyncio.wait_for(tty.stdout.read(1024), 10)
                if not chunk:
                    break
                output += chunk
        assert b"/dev/pts/" in output and b"got abc" in output
        assert await asyncio.wait_for(tty.wait(), 10) == 0
        await backend.stop_container(handle, 0)
        await backend.remove_container(handle)


async def test_attach_streams_output_and_stdin(backend: OciBackend) -> None:
    container = ctr("echo started; while read line; do echo got $line; echo err $line >&2; done; echo bye; exit 5",
                    stdin=True, stdinOnce=True)  # fmt: skip
    pod = pod_of(container)
    async with sandbox_of(backend, pod) as sandbox:
        handle = await run(backend, sandbox, pod, container)
        await log_has(log_path(backend, pod), "started")
        watcher = await backend.attach(sandbox, handle, tty=False, stdin=False)  # output only
        client = await backend.attach(sandbox, handle, tty=False, stdin=True)
        client.stdin.write(b"one\n")
        await client.stdin.drain()
        assert await asyncio.wait_for(client.stdout.readline(), 10) == b"got one\n"
        assert await asyncio.wait_for(client.stderr.readline(), 10) == b"err one\n"
        assert await asyncio.wait_for(watcher.stdout.readline(), 10) == b"got one\n"
        client.stdin.close()  # stdinOnce: the container's stdin closes with the first client's
        await client.stdin.drain()
        assert await asyncio.wait_for(client.stdout.read(), 10) == b"bye\n"
        # Attach ends with success whatever the code (the kubelet's); the code is the status's.
        assert await asyncio.wait_for(client.wait(), 10) == 0
        assert (await backend.wait_container(handle)).exit_code == 5
        await watcher.kill()
        await log_has(log_path(backend, pod), "got one")
        with pytest.raises(RunContainerError, match="not running"):
            await backend.attach(sandbox, handle, tty=False, stdin=False)
        await backend.remove_container(handle)


async def test_a_tty_container_gets_a_terminal_that_attach_drives_and_resizes(backend: OciBackend) -> None:
    """`tty: true` (kubectl run -it, kubectl debug -it): the container's stdio is a terminal whose
    master the shim holds; attach writes to it, reads its echo and output, and resizes it."""
    container = {"name": "main", "image": "busybox", "command": ["sh"], "stdin": True, "tty": True}
    pod = pod_of(container)
    async with sandbox_of(backend, pod) as sandbox:
        handle = await run(backend, sandbox, pod, container)
        client = await backend.attach(sandbox, handle, tty=True, stdin=True)
        assert client.stderr is None
        await client.resize(111, 33)
        client.stdin.write(b"tty; echo T=$TERM; stty size; exit 6\n")
        await client.stdin.drain()
        out = await asyncio.wait_for(client.stdout.read(), 20)
        assert b"/dev/pts/0" in out and b"T=xterm" in out and b"33 111" in out, out
        assert await asyncio.wait_for(client.wait(), 10) == 0
        assert (await backend.wait_container(handle)).exit_code == 6
        await log_has(log_path(backend, pod), "T=xterm")  # the terminal's output is the log's stdout
        await backend.remove_container(handle)


async def test_port_forward_reaches_the_pod_loopback(backend: OciBackend) -> None:
    container = ctr("mkdir -p /www && echo pod-page > /www/index.html && httpd -f -p 127.0.0.1:8080 -h /www")
    pod = pod_of(container)
    async with sandbox_of(backend, pod) as sandbox:
        handle = await run(backend, sandbox, pod, container)
        with pytest.raises(OSError):  # not on the host's loopback: the Pod has its own network namespace
            await asyncio.open_connection("127.0.0.1", 8080)
        for _ in range(50):
            try:
                reader, writer = await backend.port_forward(sandbox, pod, 8080)
                break
            except OSError:
                await asyncio.sleep(0.1)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert response.startswith(b"HTTP/1.") and response.endswith(b"pod-page\n")
        await backend.stop_container(handle, 0)
        await backend.remove_container(handle)


async def test_remove_leaves_no_runtime_state_mounts_cgroups_or_processes(backend: OciBackend, cgroups) -> None:
    container = ctr("sleep 300", volumeMounts=[{"name": "mem", "mountPath": "/mem"}])
    pod = pod_of(container, volumes=[{"name": "mem", "emptyDir": {"medium": "Memory"}}])
    sandbox = await backend.create_sandbox(pod)
    handle = await run(backend, sandbox, pod, container)
    pid = handle.extra["state"]["pid"]
    shim_pid = handle.extra["state"]["shim_pid"]
    pause_pid = json.loads((log_path(backend, pod).parent.parent / "sandbox.json").read_text())["pause_pid"]
    pod_dir = log_path(backend, pod).parent.parent
    assert any(str(pod_dir) in line for line in Path("/proc/self/mountinfo").read_text().splitlines())

    # remove_sandbox alone must clean up a running container too (the Pod worker may be gone).
    await backend.remove_sandbox(sandbox, pod)
    await backend.remove_sandbox(sandbox, pod)  # idempotent
    await backend.remove_container(handle)  # and so is this, after the fact

    assert await backend.runtime_state(handle.id) is None
    assert not any(str(pod_dir) in line for line in Path("/proc/self/mountinfo").read_text().splitlines())
    pod_cgroup = cgroups.pod_path(pod)
    assert [m for m in cgroup_mounts() if os.path.exists(os.path.join(m, pod_cgroup))] == []
    for gone in (pid, pause_pid, shim_pid):  # the shim reaps the container, writes exit.json, then ends
        for _ in range(50):
            if not Path(f"/proc/{gone}").exists():
                break
            await asyncio.sleep(0.1)
        assert not Path(f"/proc/{gone}").exists(), cmdline(gone)
    assert log_path(backend, pod).exists()  # logs stay until the Pod directory is collected
    assert not (log_path(backend, pod).parent / "0" / "rootfs").exists()


async def test_create_twice_with_the_same_restart_count_replaces_the_stale_container(backend: OciBackend) -> None:
    container = ctr("echo once")
    pod = pod_of(container)
    async with sandbox_of(backend, pod) as sandbox:
        stale = await backend.create_container(sandbox, pod, container, 0)  # created, never started
        handle = await backend.create_container(sandbox, pod, container, 0)
        assert handle.id == stale.id
        await backend.start_container(handle)
        assert (await asyncio.wait_for(backend.wait_container(handle), 20)).exit_code == 0
        await backend.remove_container(handle)


@pytest.fixture(autouse=True)
def _no_leftover_containers(base_dir: Path) -> Iterator[None]:
    yield
    root = base_dir / "state" / "runtime"
    if root.exists():
        listed = subprocess.run([RUNC, "--root", str(root), "list", "-q"], capture_output=True, text=True)
        assert listed.stdout.split() == [], "a test left runc containers behind"


# --- with the real image service and Pod networks ----------------------------------------------------


@pytest.mark.skipif(
    not os.access("/usr/bin/docker-registry", os.X_OK),
    reason="docker-registry is not installed (Debian package docker-registry)",
)
async def test_real_image_pull_overlay_rootfs_and_pod_network(base_dir: Path, cgroups: CgroupManager) -> None:
    from images.build import busybox_files, push_image
    from images.local_registry import start_registry
    from images.reference import parse_reference
    from images.service import ImageService
    from network.pods import PodNetworks

    registry = await start_registry(base_dir / "registry")
    networks = PodNetworks(base_dir / "net", bridge=f"oci{uuid.uuid4().hex[:5]}", netns_prefix="ocitest-")
    images = ImageService(base_dir / "images", insecure_registries={registry.host})
    try:
        await push_image(registry.url, "busybox", "1", busybox_files(), config={"Cmd": ["sh"], "WorkingDir": "/"})
        ref = f"{registry.host}/busybox:1"
        image = await images.pull(parse_reference(ref))
        await networks.start("10.251.9.0/24")
        context = BackendContext(
            node_name="node-oci", state_dir=base_dir / "state", pods_dir=base_dir / "pods", lookup=lookup,
            cgroups=cgroups, images=images, network=networks,
        )  # fmt: skip
        backend = OciBackend(Handler(name="runc", backend="oci", runtime_path=RUNC), context)
        script = "mkdir /www; echo from-registry > /www/index.html; httpd -f -p 8080 -h /www"
        container = {"name": "web", "image": ref, "command": ["sh", "-c", script]}
        pod = pod_of(container)
        async with sandbox_of(backend, pod) as sandbox:
            assert sandbox.ips and sandbox.netns
            handle = await run(backend, sandbox, pod, container)
            assert handle.image_id == image.image_id
            for _ in range(50):
                with contextlib.suppress(OSError):
                    reader, writer = await asyncio.open_connection(sandbox.ips[0], 8080)  # the Pod IP, from the node
                    break
                await asyncio.sleep(0.1)
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(), 10)).endswith(b"from-registry\n")
            writer.close()
            code, out = await backend.exec(handle, ["sh", "-c", "grep ' / / ' /proc/1/mountinfo; tail -1 /etc/hosts"])
            assert code == 0 and b" - overlay " in out and f"{sandbox.ips[0]}\t".encode() in out
            await backend.stop_container(handle, 0)
            await backend.remove_container(handle)
        assert not any(str(base_dir / "pods") in line for line in Path("/proc/self/mountinfo").read_text().splitlines())
    finally:
        with contextlib.suppress(NameError):
            await backend.close()
        await networks.stop(remove_bridge=True)
        await images.close()
        await registry.stop()
