"""KWOK (sigs.k8s.io/kwok), the standard kubelet emulator, as a baseline for the benchmarks.

    python3 bench/kwok.py        # build (or find) the pinned kwok binary and print its path

build() installs `kwok` from the Go module proxy at KWOK_VERSION with the local Go toolchain
and caches it beside a config holding the release's default fast stages
(kustomize/stage/fast: node-initialize, node-heartbeat-with-lease, pod-ready, pod-complete,
pod-delete), read from the module source. kwok has no built-in stages: without --config (or
the Stage CRD) it exits with "no stages found".

start() registers one fake Node the way KWOK's docs do and runs a kwok controller that manages
only that node (--manage-single-node), so Pods created with spec.nodeName set to it go straight
to Running and deleted Pods are removed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.kube import ApiError, Kube
from devcluster import gobuild

KWOK_VERSION = "v0.8.0"  # newest release; needs Go >= 1.26, client-go v0.36.1
MODULE = "sigs.k8s.io/kwok"
LEASE_SECONDS = 40  # kwokctl's default; kwok renews every quarter of it
# The kustomize/stage/fast set of the release, in the order kwokctl loads it.
STAGE_FILES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
)


class KwokError(Exception):
    pass


def cache_dir() -> Path:
    return gobuild.cache_dir("kwok", KWOK_VERSION)


def config_path() -> Path:
    # Named kwok.yaml and used as KWOK_WORKDIR so that kwok never also loads ~/.kwok/kwok.yaml.
    return cache_dir() / "kwok.yaml"


async def _write_stages(go: str, work: Path, env: dict[str, str]) -> None:
    """kwok.yaml in `work`: the release's fast stages, read from the module source."""
    info = json.loads(
        await gobuild.run_go(go, "mod", "download", "-json", f"{MODULE}@{KWOK_VERSION}", cwd=work, env=env)
    )
    source = Path(info["Dir"])
    (work / "kwok.yaml").write_text("---\n".join((source / name).read_text() for name in STAGE_FILES))


async def build() -> Path:
    """The kwok binary at KWOK_VERSION and its config, built once with `go install` and cached."""
    return await gobuild.install(
        "kwok", KWOK_VERSION, f"{MODULE}/cmd/kwok", files=(config_path().name,), after=_write_stages
    )


def node_body(node_name: str, max_pods: int) -> dict[str, Any]:
    """A fake Node as in KWOK's docs: kwok fills in conditions, addresses and nodeInfo."""
    resources = {"cpu": "1k", "memory": "1Ti", "pods": str(max_pods)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node_name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "type": "kwok",
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": node_name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/role": "agent",
                "node-role.kubernetes.io/agent": "",
            },
        },
        "spec": {},  # no taints
        "status": {"allocatable": resources, "capacity": resources},
    }


async def _delete(kube: Kube, path: str, wait: float = 30.0) -> None:
    """Delete an object and wait until it is gone."""
    try:
        await kube.delete(path, {"gracePeriodSeconds": 0})
    except ApiError as exc:
        if exc.not_found:
            return
        raise
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            await kube.get(path)
        except ApiError as exc:
            if exc.not_found:
                return
            raise
        await asyncio.sleep(0.1)
    raise KwokError(f"{path} still exists after {wait:.0f}s")


async def delete_node(kubeconfig: Path, node_name: str) -> None:
    """Delete the Node and its Lease (a new kwok waits out a Lease held by an old one)."""
    kube = await Kube.from_kubeconfig(str(kubeconfig))
    try:
        await _delete(kube, f"/api/v1/nodes/{node_name}")
        await _delete(kube, f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node_name}")
    finally:
        await kube.close()


async def _run(binary: Path, kubeconfig: Path, manage: str, log_path: Path) -> asyncio.subprocess.Process:
    """A kwok controller with the release's stages, managing the Nodes `manage` selects."""
    env = dict(os.environ, KWOK_WORKDIR=str(cache_dir()))
    with open(log_path, "ab") as log:
        return await asyncio.create_subprocess_exec(
            str(binary),
            f"--kubeconfig={kubeconfig.resolve()}",
            f"--config={config_path()}",
            manage,
            f"--node-lease-duration-seconds={LEASE_SECONDS}",
            "--node-ip=127.0.0.1",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
        )


async def start(kubeconfig: Path, node_name: str, max_pods: int, log_path: Path) -> asyncio.subprocess.Process:
    """(Re)create the fake Node and start a kwok controller for it alone. The caller stops it."""
    binary = await build()
    await delete_node(kubeconfig, node_name)
    kube = await Kube.from_kubeconfig(str(kubeconfig))
    try:
        await kube.create("/api/v1/nodes", node_body(node_name, max_pods))
    finally:
        await kube.close()
    return await _run(binary, kubeconfig, f"--manage-single-node={node_name}", log_path)


async def start_fleet(
    kubeconfig: Path, names: list[str], labels: dict[str, str], max_pods: int, log_path: Path
) -> asyncio.subprocess.Process:
    """A kwok controller managing the Nodes with `labels` (--manage-nodes-with-label-selector),
    started first; then the Nodes are created (64 at a time), as `kwokctl scale node` would."""
    selector = ",".join(f"{k}={v}" for k, v in labels.items())
    proc = await _run(await build(), kubeconfig, f"--manage-nodes-with-label-selector={selector}", log_path)
    kube = await Kube.from_kubeconfig(str(kubeconfig))
    sem = asyncio.Semaphore(64)

    async def create(name: str) -> None:
        body = node_body(name, max_pods)
        body["metadata"]["labels"].update(labels)
        async with sem:
            await kube.create("/api/v1/nodes", body)

    try:
        await asyncio.gather(*(create(n) for n in names))
    finally:
        await kube.close()
    return proc


if __name__ == "__main__":
    print(asyncio.run(build()))
