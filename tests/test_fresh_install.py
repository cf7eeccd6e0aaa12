"""A fresh install: the agent starts with the default configuration from the installed command,
and an environment that lacks a dependency gets one line naming it, not a traceback.

CI runs the whole suite in a new virtual environment without system site packages (.ci/run), so
an undeclared dependency fails there; these tests pin down what a user sees."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO, Kubectl, delete_node, wait_node_ready

from agent.pod_network import remove_node_network
from devcluster import manage

pytestmark = pytest.mark.cluster


def installed_command() -> Path:
    command = Path(sys.prefix) / "bin" / "kubelet-emu"
    if not command.exists():
        pytest.skip(f"kubelet-emu is not installed in {sys.prefix} (pip install -e .)")
    return command


async def test_installed_command_with_default_config_joins(
    cluster: manage.Cluster, kubectl: Kubectl, tmp_path: Path
) -> None:
    """`kubelet-emu run` as the README shows it: no --config, the command pip installed."""
    node = "fresh-default"
    kubeconfig = await manage.node_kubeconfig(cluster.dir, node)
    state = tmp_path / "state"
    log_path = tmp_path / "agent.log"
    with open(log_path, "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            str(installed_command()), "run", "--kubeconfig", str(kubeconfig), "--node-name", node,
            "--state-dir", str(state), "--port", "0",
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
    try:
        ready = await wait_node_ready(kubectl, node, timeout=30)
        assert ready["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] > 0
        # The kubelet API serves with the self-signed certificate made by cryptography at start.
        assert (state / "pki" / "kubelet.crt").is_file()
        assert (state / "pki" / "kubelet.key").stat().st_mode & 0o777 == 0o600
        code, out, err = await kubectl.run("get", "--raw", f"/api/v1/nodes/{node}/proxy/healthz")
        assert (code, out) == (0, "ok"), err
    finally:
        proc.terminate()
        await proc.wait()
        await remove_node_network(state, node)
        await delete_node(kubectl, node)
    assert "Traceback" not in log_path.read_text()


def environment_without(tmp_path: Path, missing: str) -> Path:
    """A new virtual environment holding this one's packages except `missing`: a user's machine
    where that package was never installed. Returns its python."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    target = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    source = Path(sysconfig.get_paths()["purelib"])
    for entry in source.iterdir():
        if entry.name.split("-")[0].lower() == missing:
            continue
        link = target / entry.name
        if not link.exists():
            link.symlink_to(entry)
    return python


async def test_missing_dependency_is_named_in_one_line(
    cluster: manage.Cluster, kubectl: Kubectl, tmp_path: Path
) -> None:
    """The report of issue 14: no cryptography made the agent exit blaming the state dir, with
    'coroutine ... was never awaited' warnings. Now: one line naming the package and the fix."""
    python = environment_without(tmp_path, "cryptography")
    probe = await asyncio.create_subprocess_exec(
        str(python), "-c", "import cryptography", stderr=asyncio.subprocess.DEVNULL
    )
    assert await probe.wait() != 0, "the new environment should not see cryptography"
    node = "fresh-nocrypto"
    kubeconfig = await manage.node_kubeconfig(cluster.dir, node)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        str(python), "-m", "agent.cli", "run", "--kubeconfig", str(kubeconfig), "--node-name", node,
        "--state-dir", str(tmp_path / "state"), "--port", "0",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
        await delete_node(kubectl, node)
    text = err.decode()
    assert proc.returncode == 2, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "cryptography" in lines[0] and "pip install" in lines[0], text
    assert "never awaited" not in text and "Traceback" not in text


async def test_kubectl_reports_the_pinned_release(kubectl: Kubectl) -> None:
    """The built kubectl and API server are stamped with the release go.mod pins (it was
    v0.0.0-master+$Format:%H$, which `kubectl version` could not parse)."""
    versions = json.loads(await kubectl("version", "-o", "json"))
    pinned = manage.kubernetes_version()
    assert pinned == "v1.36.3"
    assert versions["clientVersion"]["gitVersion"] == pinned
    assert versions["serverVersion"]["gitVersion"] == pinned
    assert (versions["serverVersion"]["major"], versions["serverVersion"]["minor"]) == ("1", "36")
