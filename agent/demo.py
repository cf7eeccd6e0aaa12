"""`kubelet-emu demo`: the dev cluster, one agent and the examples, in one command."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from devcluster import manage

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NODE = "emu-demo"


def _say(text: str) -> None:
    print(text, flush=True)


async def _kubectl(cluster: manage.Cluster, *args: str, stdin: bytes | None = None) -> tuple[int, str]:
    argv, env = manage.kubectl_argv(cluster, list(args))
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate(stdin)
    return proc.returncode or 0, out.decode()


def _agent_pid(directory: Path) -> int | None:
    try:
        pid = int((directory / "agent.pid").read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


async def _start_agent(cluster: manage.Cluster, directory: Path, config: Path | None) -> int:
    pid = _agent_pid(directory)
    if pid:
        return pid
    kubeconfig = await manage.node_kubeconfig(cluster.dir, NODE)
    argv = [sys.executable, "-m", "agent.cli", "run", "--kubeconfig", str(kubeconfig), "--node-name", NODE]
    argv += ["--state-dir", str(directory / "agent-state")]
    if config:
        argv += ["--config", str(config)]
    with open(directory / "agent.log", "ab") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    (directory / "agent.pid").write_text(str(proc.pid))
    return proc.pid


async def demo(directory: Path, port: int) -> int:
    _say(f"1. dev control plane in {directory} (the first run builds it with Go: several minutes)")
    cluster = await manage.up(directory, port=port)
    _say(f"   ready at {cluster.server}; admin kubeconfig {cluster.admin_kubeconfig}")

    config = EXAMPLES / "demo" / "agent.toml"
    config_arg = config if config.exists() else None
    _say(f"2. kubelet-emu joins as node {NODE} (config: {config_arg or 'built-in default'})")
    await _start_agent(cluster, directory, config_arg)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        code, out = await _kubectl(cluster, "get", "node", NODE, "-o", "jsonpath={.status.conditions[-1].status}")
        if code == 0 and out.strip() == "True":
            break
        await asyncio.sleep(0.5)
    else:
        _say(f"   the node did not become Ready; see {directory / 'agent.log'}")
        return 1
    _say((await _kubectl(cluster, "get", "nodes", "-o", "wide"))[1])

    manifests = sorted((EXAMPLES / "demo").glob("*.yaml")) if (EXAMPLES / "demo").is_dir() else []
    if manifests:
        _say("3. RuntimeClasses and Pods from examples/demo/")
        for path in manifests:
            code, out = await _kubectl(cluster, "apply", "-f", str(path))
            _say("   " + out.strip().replace("\n", "\n   "))
        await asyncio.sleep(5)
        _say((await _kubectl(cluster, "get", "runtimeclass"))[1])
        columns = (
            "custom-columns=POD:.metadata.name,CLASS:.spec.runtimeClassName,NODE:.spec.nodeName,"
            "PHASE:.status.phase,REASON:.status.reason,CONTAINER-ID:.status.containerStatuses[0].containerID"
        )
        _say((await _kubectl(cluster, "get", "pods", "-o", columns))[1])
        if os.geteuid() == 0 and config_arg:
            _say("4. The Pod cgroups and where their limits come from (kubelet-emu cgroups)")
            await asyncio.sleep(2)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.cli", "cgroups", "--state-dir", str(directory / "agent-state"),
                "--config", str(config_arg), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await proc.communicate()
            _say(out.decode())
    kubectl = f"kubelet-emu dev-cluster kubectl --dir {directory} --"
    _say(f"Try:   {kubectl} get nodes,pods -o wide\n      {kubectl} describe pod <name>")
    _say(f"Stop:  kubelet-emu demo --down --dir {directory}")
    return 0


async def down(directory: Path) -> int:
    pid = _agent_pid(directory)
    cluster = manage.read_cluster(directory)
    if pid and cluster:
        # Containers of the process backend outlive the agent by design: delete the Pods
        # first so the agent stops them and removes their cgroups.
        await _kubectl(cluster, "delete", "pods", "--all", "--wait=true", "--timeout=60s")
    if pid:
        os.killpg(pid, signal.SIGTERM)
        (directory / "agent.pid").unlink(missing_ok=True)
    await manage.down(directory)
    _say("demo stopped")
    return 0
