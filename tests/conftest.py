"""Shared fixtures: one real dev control plane per test session, and real agent processes."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.pod_network import remove_node_network
from cgroups.manager import CgroupManager, detect_mode
from devcluster import manage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The cgroup v2 lane runs the tests on an emulated CPU (QEMU TCG), several times slower than this
# host: it stretches every wait by this factor. Never set it to make a test pass on a real host.
TIMEOUT_SCALE = float(os.environ.get("KUBELET_EMU_TEST_TIMEOUT_SCALE") or 1)


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float, interval: float = 0.5, what: str = "") -> Any:
    """Poll `check` until it returns something truthy; fail with the last value after `timeout`."""
    timeout *= TIMEOUT_SCALE
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what or check}; last value: {last!r}")
        await asyncio.sleep(interval)


class Kubectl:
    """The dev cluster's own kubectl, as a user would run it."""

    def __init__(self, cluster: manage.Cluster):
        self.cluster = cluster

    async def run(self, *args: str, check: bool = True, stdin: str | None = None) -> tuple[int, str, str]:
        argv, env = manage.kubectl_argv(self.cluster, list(args))
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
        if check and proc.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed ({proc.returncode}): {err.decode()}")
        return proc.returncode or 0, out.decode(), err.decode()

    async def __call__(self, *args: str) -> str:
        return (await self.run(*args))[1]

    async def json(self, *args: str) -> Any:
        return json.loads(await self(*args, "-o", "json"))

    async def get(self, *args: str) -> Any | None:
        """The object as JSON, or None when it does not exist."""
        code, out, err = await self.run("get", *args, "-o", "json", check=False)
        if code != 0:
            if "NotFound" in err or "not found" in err:
                return None
            pytest.fail(f"kubectl get {' '.join(args)}: {err}")
        return json.loads(out)

    async def apply(self, manifest: str) -> str:
        return (await self.run("apply", "-f", "-", stdin=manifest))[1]


class AgentProcess:
    """A real `kubelet-emu run` process."""

    def __init__(
        self, proc: asyncio.subprocess.Process, log_path: Path, node: str, config_path: Path | None, state_dir: Path
    ):
        self.state_dir = state_dir
        self.proc = proc
        self.log_path = log_path
        self.node = node
        self.config_path = config_path

    def reload(self, config: str) -> None:
        """Rewrite the config file and send SIGHUP, as an admin would."""
        assert self.config_path is not None
        self.config_path.write_text(config)
        self.proc.send_signal(signal.SIGHUP)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def stop(self) -> None:
        if self.alive:
            self.kill(signal.SIGTERM)
            try:
                await self.wait(10)
            except TimeoutError:
                self.kill(signal.SIGKILL)
                await self.proc.wait()


REPO = Path(__file__).resolve().parent.parent


def agent_argv() -> list[str]:
    """The agent of the tree these tests live in (not whatever an editable install points at)."""
    return [sys.executable, "-m", "agent.cli"]


def agent_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="session")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[manage.Cluster]:
    directory = Path(os.environ.get("KUBELET_EMU_TEST_CLUSTER_DIR") or tmp_path_factory.mktemp("devcluster"))
    # A short grace period keeps the node-lifecycle test quick; everything else is the default.
    # Its own pod range, so Pod networks of concurrent sessions (or a running demo) never collide.
    cidr = f"10.{random.randint(100, 250)}.0.0/16"
    c = await manage.up(directory, port=free_port(), node_monitor_grace_period="20s", quiet=True, cluster_cidr=cidr)
    yield c
    await manage.down(directory)


@pytest.fixture(scope="session")
def kubectl(cluster: manage.Cluster) -> Kubectl:
    return Kubectl(cluster)


@pytest.fixture
async def start_agent(cluster: manage.Cluster, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[AgentProcess]]]:
    started: list[AgentProcess] = []

    async def start(
        node: str,
        config: str | None = None,
        kubeconfig: Path | None = None,
        extra: tuple[str, ...] = (),
        state_dir: Path | None = None,
    ) -> AgentProcess:
        if kubeconfig is None:
            kubeconfig = await manage.node_kubeconfig(cluster.dir, node)
        args = [*agent_argv(), "run", "--kubeconfig", str(kubeconfig), "--node-name", node]
        args += ["--state-dir", str(state_dir or tmp_path / f"state-{node}")]
        config_path = None
        if config is not None:
            config_path = tmp_path / f"{node}-{len(started)}.toml"
            config_path.write_text(config)
            args += ["--config", str(config_path)]
        args += list(extra)
        log_path = tmp_path / f"agent-{node}-{len(started)}.log"
        with open(log_path, "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=agent_env()
            )
        agent = AgentProcess(proc, log_path, node, config_path, state_dir or tmp_path / f"state-{node}")
        started.append(agent)
        return agent

    yield start
    for agent in started:
        await agent.stop()
    for agent in started:
        await remove_node_network(agent.state_dir, agent.node)
    # Leave no stale Nodes behind: they would put the cluster in "full disruption" mode.
    kubectl = Kubectl(cluster)
    for node in {a.node for a in started}:
        await delete_node(kubectl, node)


@pytest.fixture(scope="module")
def cgroups(request: pytest.FixtureRequest) -> Iterator[CgroupManager]:
    """The Pod cgroups under the test module's own CGROUP_ROOT, removed with whatever is left in
    them once the module is done (every Pod is gone by then)."""
    root = request.module.CGROUP_ROOT
    manager = CgroupManager(detect_mode(), root=root)
    yield manager
    manager.remove(root, kill=True)


async def ready_node(
    kubectl: Kubectl,
    start_agent: Callable[..., Awaitable[AgentProcess]],
    name: str,
    config: str,
    state_dir: Path | None = None,
) -> AgentProcess:
    """An agent started as node `name` with `config`, once the node is Ready."""
    agent = await start_agent(name, config, state_dir=state_dir)
    await wait_node_ready(kubectl, name)
    return agent


async def delete_node_pods(kubectl: Kubectl, node: str, wait: bool = True) -> None:
    """Delete the Pods bound to `node`. With `wait`, with a 1 s grace period and until they are
    gone: process and OCI containers outlive a stopped agent by design, so a test's node fixture
    does this while its agent still runs."""
    how = ["--grace-period=1", "--wait=true", "--timeout=60s"] if wait else ["--wait=false"]
    await kubectl.run("delete", "pods", "--field-selector", f"spec.nodeName={node}", *how, check=False)


async def pod_phase(kubectl: Kubectl, name: str, phase: str) -> dict[str, Any] | None:
    """The Pod, when it is in `phase`."""
    obj = await kubectl.get("pod", name)
    return obj if obj and obj.get("status", {}).get("phase") == phase else None


async def events_for(kubectl: Kubectl, name: str) -> list[dict[str, Any]]:
    """The Events about the object called `name`."""
    out = await kubectl.json("get", "events", "--field-selector", f"involvedObject.name={name}")
    return out["items"]


async def delete_node(kubectl: Kubectl, node: str) -> None:
    await kubectl.run("delete", "node", node, "--ignore-not-found", "--wait=false", check=False)


async def wait_node_ready(kubectl: Kubectl, name: str, timeout: float = 20) -> dict[str, Any]:
    async def ready() -> dict[str, Any] | None:
        node = await kubectl.get("node", name)
        c = condition(node, "Ready") if node else None
        return node if c and c["status"] == "True" else None

    return await eventually(ready, timeout, interval=0.2, what=f"node {name} Ready")


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for c in obj.get("status", {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c
    return None
