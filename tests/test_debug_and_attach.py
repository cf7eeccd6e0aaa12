"""Issue 20: `kubectl debug` (ephemeral containers) and the streaming details kubectl relies on,
against a real control plane, real kubectl, real runc and real process containers.

- `kubectl debug -i POD --target=C` into a runc Pod and a process Pod: the debug shell sees the
  target's processes; status.ephemeralContainerStatuses; `kubectl logs -c`; it is never started
  again, not even by a restarted agent; an emulated Pod reports it running.
- `kubectl exec -it` into a runc container gets TERM=xterm unless the container sets TERM.
- `kubectl run -i --rm --restart=Never` on a runc handler prints the output once and returns the
  container's exit code (attach ends with Success, as the kubelet's; the code comes from the status).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import shutil
import signal
import termios
import uuid
from pathlib import Path

import pytest
from conftest import Kubectl, delete_node_pods, eventually, ready_node
from helpers import read_pty_until, set_winsize

from devcluster import manage

pytest_plugins = ["registry_fixture"]
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(os.geteuid() != 0, reason="runc, process containers and pod cgroups need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed (Debian package runc)"),
]

SUFFIX = uuid.uuid4().hex[:6]
CGROUP_ROOT = f"kubelet-emu-debug-{SUFFIX}"
ISOLATED, PROCS, FAKE = f"isolated-{SUFFIX}", f"procs-{SUFFIX}", f"fake-{SUFFIX}"


def config(runc_root: Path) -> str:
    return f"""
[node]
cgroup_root = "{CGROUP_ROOT}"
[runtimes.isolated]
backend = "oci"
runtime_path = "{shutil.which("runc")}"
runtime_root = "{runc_root}"
[runtimes.procs]
backend = "process"
[runtimes.fake]
backend = "emulated"
"""


def pod(name: str, node: str, runtime_class: str, container: dict) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"nodeName": node, "runtimeClassName": runtime_class, "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "main", **container}]},
    })  # fmt: skip


@pytest.fixture(scope="module")
async def runtime_classes(cluster):
    kubectl = Kubectl(cluster)
    for name, handler in ((ISOLATED, "isolated"), (PROCS, "procs"), (FAKE, "fake")):
        await kubectl.apply(json.dumps({
            "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": name}, "handler": handler,
        }))  # fmt: skip
    yield
    await kubectl.run("delete", "runtimeclass", ISOLATED, PROCS, FAKE, check=False)


@pytest.fixture
async def node(kubectl, start_agent, tmp_path, runtime_classes, cgroups):
    name = f"emu-debug-{uuid.uuid4().hex[:6]}"
    state = tmp_path / "state"
    agent = await ready_node(kubectl, start_agent, name, config(tmp_path / "runc"), state)
    yield name, agent, state, tmp_path / "runc"
    # Containers outlive a stopped agent by design: delete the node's Pods while it runs.
    await delete_node_pods(kubectl, name)


async def running(kubectl: Kubectl, name: str) -> dict | None:
    obj = await kubectl.get("pod", name)
    return obj if obj and obj["status"].get("phase") == "Running" else None


async def ephemeral_status(kubectl: Kubectl, pod_name: str, container: str) -> dict | None:
    obj = await kubectl.get("pod", pod_name)
    for status in (obj or {}).get("status", {}).get("ephemeralContainerStatuses") or []:
        if status["name"] == container:
            return status
    return None


async def terminated(kubectl: Kubectl, pod_name: str, container: str) -> dict | None:
    status = await ephemeral_status(kubectl, pod_name, container)
    return status if status and "terminated" in status["state"] else None


async def debug_session(kubectl: Kubectl, pod_name: str, image: str, script: str, *flags: str) -> str:
    """`echo SCRIPT | kubectl debug -i POD --image=IMAGE -c dbg FLAGS -- sh`: what the shell printed."""
    code, out, err = await kubectl.run(
        "debug", "-i", pod_name, f"--image={image}", "-c", "dbg", *flags, "--", "sh", stdin=script, check=False
    )
    assert code == 0, f"kubectl debug ended with {code}: {err}"
    assert "falling back" not in err, err
    return out


async def test_kubectl_debug_into_a_runc_pod_shares_the_targets_pid_namespace(kubectl, node, busybox_ref, start_agent):
    name, agent, state, runc_root = node
    await kubectl.apply(pod("boxed", name, ISOLATED, {"image": busybox_ref, "command": ["sleep", "98765"]}))
    await eventually(lambda: running(kubectl, "boxed"), 60, what="boxed Running")

    out = await debug_session(kubectl, "boxed", busybox_ref, "ps -o pid,args; exit 7\n", "--target=main")
    table = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in out.splitlines()[1:] if line.strip()}
    assert table.get("1") == "sleep 98765", out  # the target's pid 1: its namespace, not a new one
    assert any(args == "sh" for args in table.values()), out

    done = await eventually(lambda: terminated(kubectl, "boxed", "dbg"), 30, what="dbg terminated")
    term = done["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (7, "Error"), done
    assert done["restartCount"] == 0 and done["ready"] is False and done["containerID"].startswith("oci://"), done
    assert done["image"] == busybox_ref and done["imageID"], done
    _, logs, _ = await kubectl.run("logs", "boxed", "-c", "dbg")
    assert "sleep 98765" in logs, logs
    pod_now = await kubectl.get("pod", "boxed")
    assert pod_now["status"]["phase"] == "Running"
    assert pod_now["status"]["containerStatuses"][0]["restartCount"] == 0  # the Pod's own container untouched
    events = (await kubectl.json("get", "events", "--field-selector", "involvedObject.name=boxed"))["items"]
    assert any(e["reason"] == "Started" and e["message"] == "Started container dbg" for e in events), events

    # Without --target: a pid namespace of its own (the Pod shares none), so no `sleep` in sight.
    out = await debug_session(kubectl, "boxed", busybox_ref, "ps -o pid,args; exit 0\n", "-c", "dbg2")
    assert "sleep 98765" not in out and out.strip(), out

    # Never started again: not now, not by an agent restarted on the same state.
    await asyncio.sleep(2)
    assert (await ephemeral_status(kubectl, "boxed", "dbg")) == done
    await agent.stop()
    await ready_node(kubectl, start_agent, name, config(runc_root), state)
    await asyncio.sleep(3)
    after = await ephemeral_status(kubectl, "boxed", "dbg")
    assert after is not None and after["state"] == done["state"] and after["restartCount"] == 0, after
    runs = list((state / "pods").glob("default_boxed_*/dbg/*.log"))
    assert [p.name for p in runs] == ["0.log"], runs  # one run of it, ever


async def test_kubectl_debug_into_a_process_pod(kubectl, node):
    """The process backend runs every container in the host's pid namespace (there is no per-Pod
    one), so the debug container sees the target's processes, as with --target, and more."""
    name, *_ = node
    await kubectl.apply(pod("procs", name, PROCS, {"image": "host", "command": ["sleep", "98766"]}))
    await eventually(lambda: running(kubectl, "procs"), 60, what="procs Running")

    out = await debug_session(kubectl, "procs", "host", "ps -eo user,args; id -u; exit 5\n", "--target=main")
    assert any(line.split(None, 1)[1:] == ["sleep 98766"] for line in out.splitlines()), out
    assert out.splitlines()[-1] == "65534", out  # the handler's default user, as any process container

    done = await eventually(lambda: terminated(kubectl, "procs", "dbg"), 30, what="dbg terminated")
    assert done["state"]["terminated"]["exitCode"] == 5 and done["restartCount"] == 0, done
    assert done["containerID"].startswith("process://"), done
    _, logs, _ = await kubectl.run("logs", "procs", "-c", "dbg")
    assert "sleep 98766" in logs, logs
    await asyncio.sleep(2)
    assert (await ephemeral_status(kubectl, "procs", "dbg")) == done

    # A target that does not exist: the API server refuses it before the node sees anything.
    code, _, err = await kubectl.run(
        "debug", "procs", "--image=host", "-c", "dbg3", "--target=nope", "--", "true", check=False
    )
    assert code != 0 and "nope" in err, err


async def test_ephemeral_container_on_the_emulated_backend_is_reported_running(kubectl, node):
    name, *_ = node
    await kubectl.apply(pod("played", name, FAKE, {"image": "busybox"}))
    await eventually(lambda: running(kubectl, "played"), 30, what="played Running")
    await kubectl.run("debug", "played", "--image=busybox", "-c", "dbg", "--target=main", "--", "sh")

    async def dbg_running() -> dict | None:
        status = await ephemeral_status(kubectl, "played", "dbg")
        return status if status and "running" in status["state"] else None

    status = await eventually(dbg_running, 30, what="dbg running")
    assert status["containerID"].startswith("emulated://") and status["ready"] is False, status


async def _run_on_a_terminal(argv: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run kubectl with a pseudo-terminal as its stdin/stdout (so -t takes effect): (code, output)."""
    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        *argv, env={**env, "TERM": "dumb"}, stdin=slave, stdout=slave, stderr=slave, start_new_session=True
    )
    os.close(slave)
    loop = asyncio.get_running_loop()
    output = b""
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(loop.run_in_executor(None, os.read, master, 4096), timeout)
            except OSError:  # EIO: every slave end closed
                break
            if not chunk:
                break
            output += chunk
        return await asyncio.wait_for(proc.wait(), timeout), output.decode(errors="replace")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(master)


async def test_tty_exec_into_runc_gets_term_xterm_unless_the_container_sets_term(kubectl, node, busybox_ref):
    name, *_ = node
    sleeper = {"image": busybox_ref, "command": ["sleep", "3600"]}
    await kubectl.apply(pod("plain-term", name, ISOLATED, sleeper))
    await kubectl.apply(pod("own-term", name, ISOLATED, {**sleeper, "env": [{"name": "TERM", "value": "vt100"}]}))
    for pod_name in ("plain-term", "own-term"):
        await eventually(lambda n=pod_name: running(kubectl, n), 60, what=f"{pod_name} Running")

    script = "echo TERM=[$TERM]"
    for pod_name, want in (("plain-term", "TERM=[xterm]"), ("own-term", "TERM=[vt100]")):
        argv, env = manage.kubectl_argv(kubectl.cluster, ["exec", "-it", pod_name, "--", "sh", "-c", script])
        code, out = await _run_on_a_terminal(argv, env)
        assert code == 0 and want in out, out
    # Without a TTY the container's own environment, which sets no TERM.
    _, out, _ = await kubectl.run("exec", "plain-term", "--", "sh", "-c", script)
    assert out == "TERM=[]\n", out


async def test_kubectl_run_rm_prints_once_and_returns_the_exit_code(kubectl, node, busybox_ref):
    name, *_ = node
    overrides = json.dumps({"apiVersion": "v1", "spec": {"nodeName": name, "runtimeClassName": ISOLATED}})
    code, out, err = await kubectl.run(
        "run", "oneshot", "-i", "--rm", "--restart=Never", f"--image={busybox_ref}", f"--overrides={overrides}",
        "--pod-running-timeout=2m", "--", "sh", "-c", 'read line; echo "got $line"; echo to-stderr >&2; exit 3',
        stdin="hello\n", check=False,
    )  # fmt: skip
    assert code == 3, (out, err)
    assert out.count("got hello") == 1, out
    assert "falling back" not in err and "couldn't attach" not in err, err
    assert "to-stderr" in err or "to-stderr" in out, (out, err)

    async def gone() -> bool:
        return await kubectl.get("pod", "oneshot") is None

    await eventually(gone, 30, what="oneshot deleted by --rm")


@pytest.mark.parametrize("backend", ["runc", "process"])
async def test_kubectl_debug_it_gives_a_terminal(kubectl, node, busybox_ref, backend):
    """What a user types: `kubectl debug -it POD --image=... --target=main -- sh` on a terminal. The
    ephemeral container has `tty: true`, so its shell runs on a terminal of the terminal's size."""
    name, *_ = node
    runtime_class, image = (ISOLATED, busybox_ref) if backend == "runc" else (PROCS, "host")
    pod_name = f"tty-{backend}"
    await kubectl.apply(pod(pod_name, name, runtime_class, {"image": image, "command": ["sleep", "3600"]}))
    await eventually(lambda: running(kubectl, pod_name), 60, what=f"{pod_name} Running")
    argv, env = manage.kubectl_argv(
        kubectl.cluster, ["debug", "-it", pod_name, f"--image={image}", "-c", "dbg", "--target=main", "--", "sh"]
    )
    master, slave = pty.openpty()
    set_winsize(slave, 33, 111)
    proc = await asyncio.create_subprocess_exec(
        *argv, env={**env, "TERM": "dumb"}, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )  # fmt: skip
    os.close(slave)
    try:
        await read_pty_until(master, r"[Ee]nter|\$ |# ", 60)  # kubectl's hint, or the shell's prompt
        os.write(master, b"[ -t 0 ] && echo IS-A-$((6*7)); stty size; echo T=$TERM\n")
        out = await read_pty_until(master, r"T=\w+", 20)
        assert "IS-A-42" in out and "33 111" in out and "T=xterm" in out, out
        set_winsize(master, 40, 132)  # the user's terminal is resized: kubectl sends it on
        os.kill(proc.pid, signal.SIGWINCH)
        await asyncio.sleep(0.5)
        os.write(master, b"stty size\n")
        await read_pty_until(master, r"40 132", 10)
        os.write(master, b"exit 3\n")
        assert await asyncio.wait_for(proc.wait(), 20) == 0  # attach ends with success (the kubelet's)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(master)
    done = await eventually(lambda: terminated(kubectl, pod_name, "dbg"), 30, what="dbg terminated")
    assert done["state"]["terminated"]["exitCode"] == 3 and done["restartCount"] == 0, done
