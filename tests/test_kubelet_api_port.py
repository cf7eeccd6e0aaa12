"""Issue 20 item 5: with `[kubelet_api] port = 0` the agent keeps the port it picked across
restarts (remembered in the state dir) while the port stays free, so scrape targets hold."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest
from conftest import Kubectl, eventually, wait_node_ready

from agent.config import KubeletAPISettings
from agent.kubelet_api.server import PORT_FILE, bind

CONFIG = """
default_runtime = "alpha"
[kubelet_api]
port = 0
[runtimes.alpha]
backend = "emulated"
"""


def test_port_zero_is_remembered_and_reused_while_free(tmp_path: Path, caplog):
    settings = KubeletAPISettings(address="127.0.0.1", port=0)
    first = bind(settings, state_dir=tmp_path)
    port = first.getsockname()[1]
    assert (tmp_path / PORT_FILE).read_text().strip() == str(port)
    first.close()
    again = bind(settings, state_dir=tmp_path)
    assert again.getsockname()[1] == port
    # Taken by someone else meanwhile: a new free port, said in the log, and remembered instead.
    with socket.socket() as thief:
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.close()
        thief.bind(("127.0.0.1", port))
        thief.listen()
        moved = bind(settings, state_dir=tmp_path)
    new_port = moved.getsockname()[1]
    moved.close()
    assert new_port != port
    assert (tmp_path / PORT_FILE).read_text().strip() == str(new_port)
    assert "the kubelet API port used before is taken now" in caplog.text
    # A damaged record is ignored, not fatal.
    (tmp_path / PORT_FILE).write_text("ninety\n")
    fresh = bind(settings, state_dir=tmp_path)
    assert fresh.getsockname()[1] > 0
    fresh.close()


async def daemon_port(kubectl: Kubectl, node: str) -> int | None:
    obj = await kubectl.get("node", node)
    port = ((obj or {}).get("status", {}).get("daemonEndpoints") or {}).get("kubeletEndpoint", {}).get("Port")
    return port or None


@pytest.mark.cluster
async def test_the_node_advertises_the_same_port_after_a_restart(kubectl, start_agent, tmp_path):
    name = f"emu-port-{uuid.uuid4().hex[:6]}"
    state = tmp_path / "state"
    agent = await start_agent(name, CONFIG, state_dir=state)
    await wait_node_ready(kubectl, name)
    port = await eventually(lambda: daemon_port(kubectl, name), 10, what="status.daemonEndpoints")
    assert port != 10250
    assert (state / PORT_FILE).read_text().strip() == str(port)
    await agent.stop()

    agent = await start_agent(name, CONFIG, state_dir=state)
    await wait_node_ready(kubectl, name)
    await eventually(lambda: _listening(port), 20, what=f"the restarted agent on port {port}")
    assert await daemon_port(kubectl, name) == port
    assert agent.alive


async def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0
