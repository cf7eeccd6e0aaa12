"""Client certificate rotation against a dev cluster that signs short certificates.

The quick test (1-minute certificates, two rotations in about two minutes) is in the default run;
the slow one (3-minute certificates, about six minutes) runs with `pytest -m slow`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path

import pytest
from conftest import Kubectl, eventually, free_port
from join_helpers import Joiner, stop

from devcluster import manage

pytestmark = pytest.mark.cluster

ROTATED = "client certificate rotated"


@pytest.fixture(scope="session")
async def signing_cluster(tmp_path_factory) -> AsyncIterator[Callable[[str], Awaitable[manage.Cluster]]]:
    """A second dev cluster per signing duration, started on first use (rotation tests only)."""
    started: dict[str, manage.Cluster] = {}

    async def get(duration: str) -> manage.Cluster:
        if duration not in started:
            directory = Path(tmp_path_factory.mktemp(f"devcluster-signing-{duration}"))
            started[duration] = await manage.up(
                directory, port=free_port(), node_monitor_grace_period="20s", quiet=True,
                cluster_cidr=f"10.{random.randint(100, 250)}.0.0/16", cluster_signing_duration=duration,
            )  # fmt: skip
        return started[duration]

    yield get
    for c in started.values():
        await manage.down(c.dir)


def _micro(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


async def rotate_and_watch(cluster: manage.Cluster, tmp_path: Path, node: str, rotations: int, timeout: float):
    kubectl = Kubectl(cluster)
    joiner = Joiner(cluster, tmp_path)
    try:
        agent = await joiner.join(node, await manage.token_create(cluster.dir))
        await joiner.wait_ready(node)
        pod = f"{node}-pod"
        await kubectl.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: {pod}, namespace: default}}
spec:
  nodeName: {node}
  containers: [{{name: c, image: example.com/app:1}}]
""")

        async def running():
            p = await kubectl.get("pod", pod)
            return p if p and p["status"].get("phase") == "Running" else None

        before = await eventually(running, 60, what="the pod Running")
        container_id = before["status"]["containerStatuses"][0]["containerID"]

        renew_times: list[float] = []
        api_failures: list[str] = []
        started = time.monotonic()
        last_api = 0.0
        while agent.log.count(ROTATED) < rotations:
            assert time.monotonic() - started < timeout, f"fewer than {rotations} rotations in {timeout:.0f}s"
            assert agent.alive, agent.log[-2000:]
            lease = await kubectl.get("lease", "-n", "kube-node-lease", node)
            if lease:
                t = _micro(lease["spec"]["renewTime"])
                if not renew_times or t != renew_times[-1]:
                    renew_times.append(t)
            if time.monotonic() - last_api > 5:  # the kubelet API (its authn/authz go through the agent's client)
                last_api = time.monotonic()
                code, _, err = await kubectl.run("get", "--raw", f"/api/v1/nodes/{node}/proxy/pods", check=False)
                if code != 0:
                    api_failures.append(err.strip())
            await asyncio.sleep(1)
        renew_times.append(time.time())
        gaps = [b - a for a, b in itertools.pairwise(renew_times)]
        lines = [line for line in agent.log.splitlines() if ROTATED in line]
        print(f"\n{len(lines)} rotations in {time.monotonic() - started:.0f}s; lease max gap {max(gaps):.1f}s")
        for line in lines:
            print(line)
        assert max(gaps) < 20, f"lease gaps {gaps}"  # renewed every 10 s; the node goes NotReady after 40 s
        assert not api_failures, api_failures
        assert "cannot renew node lease" not in agent.log

        after = await kubectl.get("pod", pod)
        status = after["status"]["containerStatuses"][0]
        assert after["status"]["phase"] == "Running"
        assert status["containerID"] == container_id and status["restartCount"] == 0

        pki = joiner.state_dir(node) / "pki"
        files = sorted(p.name for p in pki.glob("kubelet-client-2*.pem"))
        assert len(files) <= 2, files  # the current one and the previous
        current = (pki / "kubelet-client-current.pem").resolve()
        from cryptography import x509

        serial = f"{x509.load_pem_x509_certificate(current.read_bytes()).serial_number:x}"

        # A restart (as a service would run it) uses the current certificate: no new bootstrap.
        await stop(agent)
        again = await joiner.run(node)
        await eventually(lambda: asyncio.sleep(0, "rotation scheduled" in again.log), 30, what="restart")
        scheduled = re.search(r'msg="client certificate rotation scheduled" serial=(\w+)', again.log)
        assert scheduled and scheduled.group(1) == serial, again.log
        assert "TLS bootstrap" not in again.log
        await joiner.wait_ready(node)
        await kubectl.run("delete", "pod", pod, "--wait=false", check=False)
    finally:
        await joiner.close()


async def test_rotation_with_one_minute_certificates(signing_cluster, tmp_path):
    cluster = await signing_cluster("1m")
    await rotate_and_watch(cluster, tmp_path, "emu-rotate-1m", rotations=2, timeout=180)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("KUBELET_EMU_SKIP_SLOW") == "1",
    reason="KUBELET_EMU_SKIP_SLOW=1 asks to skip the 3-minute certificates (about 8 minutes)",
)
async def test_rotation_with_three_minute_certificates(signing_cluster, tmp_path):
    cluster = await signing_cluster("3m")
    await rotate_and_watch(cluster, tmp_path, "emu-rotate-3m", rotations=2, timeout=480)
