"""Agents that join a dev cluster the way a new host joins a kubeadm cluster: `kubelet-emu join`
with the command `dev-cluster token create` printed, then `run --bootstrap-kubeconfig` on restart."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

from conftest import AgentProcess, Kubectl, agent_argv, agent_env, condition, delete_node, eventually, free_port

from agent.pod_network import remove_node_network
from devcluster import manage

EMULATED = """
default_runtime = "fast"
[runtimes.fast]
backend = "emulated"
"""


def join_args(command: str) -> list[str]:
    """`kubelet-emu join SERVER --token T --discovery-token-ca-cert-hash H` -> ["join", SERVER, ...]."""
    words = command.split()
    assert words[:2] == ["kubelet-emu", "join"], command
    return words[1:]


class Joiner:
    """Starts `kubelet-emu join` / `run` processes for one cluster and cleans up after them."""

    def __init__(self, cluster: manage.Cluster, tmp_path: Path):
        self.cluster = cluster
        self.kubectl = Kubectl(cluster)
        self.tmp = tmp_path
        self.agents: list[AgentProcess] = []

    def state_dir(self, node: str) -> Path:
        return self.tmp / f"state-{node}"

    async def _spawn(self, node: str, args: list[str]) -> AgentProcess:
        config = self.tmp / f"{node}.toml"
        config.write_text(EMULATED)
        state = self.state_dir(node)
        args = [*args, "--node-name", node, "--state-dir", str(state), "--config", str(config)]
        args += ["--port", str(free_port())]
        log_path = self.tmp / f"agent-{node}-{len(self.agents)}.log"
        with open(log_path, "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *agent_argv(), *args, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=agent_env()
            )
        agent = AgentProcess(proc, log_path, node, config, state)
        self.agents.append(agent)
        return agent

    async def join(self, node: str, command: str, *extra: str) -> AgentProcess:
        return await self._spawn(node, [*join_args(command), *extra])

    async def run(self, node: str, *extra: str) -> AgentProcess:
        """The agent again, as a service would start it after the join."""
        state = self.state_dir(node)
        args = ["run", "--kubeconfig", str(state / "kubeconfig"), "--bootstrap-kubeconfig"]
        return await self._spawn(node, [*args, str(state / "bootstrap-kubeconfig"), *extra])

    async def join_only(self, command: str, state: Path) -> tuple[int, str]:
        """`join --write-only`: (exit code, stderr)."""
        proc = await asyncio.create_subprocess_exec(
            *agent_argv(), *join_args(command), "--write-only", "--state-dir", str(state), "--node-name", "emu-x",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=agent_env(),
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, err.decode()

    async def close(self) -> None:
        for agent in self.agents:
            await agent.stop()
        for agent in self.agents:
            await remove_node_network(agent.state_dir, agent.node)
        for node in {a.node for a in self.agents}:
            await delete_node(self.kubectl, node)

    async def wait_ready(self, node: str, timeout: float = 60) -> dict[str, Any]:
        async def ready() -> dict[str, Any] | None:
            obj = await self.kubectl.get("node", node)
            c = condition(obj, "Ready") if obj else None
            return obj if c and c["status"] == "True" else None

        return await eventually(ready, timeout, interval=0.2, what=f"node {node} Ready")


async def stop(agent: AgentProcess) -> None:
    agent.kill(signal.SIGTERM)
    await agent.wait(10)


async def csrs(kubectl: Kubectl) -> list[dict[str, Any]]:
    return json.loads(await kubectl("get", "csr", "-o", "json"))["items"]
