"""Pod networking on this node: where the pod CIDR comes from and when the bridge is ready.

The controller-manager allocates `spec.podCIDR` some time after the Node is registered, so the
first Pods may arrive before there is a network to put them in: their setup waits here (their
status says ContainerCreating meanwhile) instead of failing.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from agent.config import NetworkSettings
from agent.kube import ApiError, Kube
from agent.logs import kv

log = logging.getLogger("kubelet_emu.network")

CIDR_POLL = 1.0
START_RETRY = 10.0
SETUP_CONCURRENCY = 16
CIDR_NOTICE_AFTER = 30.0  # say once that no CIDR has come yet (a cluster without --allocate-node-cidrs)


def default_bridge(node_name: str) -> str:
    """A bridge name of its own per node (15 characters at most), so several agents share a host."""
    return "emu-" + hashlib.sha256(node_name.encode()).hexdigest()[:8]


def pod_networks(settings: NetworkSettings, node_name: str, state_dir: Path) -> Any:
    """A PodNetworks for this node, or None where pod networking cannot run (not root)."""
    if not settings.enabled:
        return None
    if os.geteuid() != 0:
        log.warning("pod networking needs root; Pods use the host's network", extra=kv(node=node_name))
        return None
    if importlib.util.find_spec("network") is None:  # an install without the network package
        log.warning("pod networking unavailable (no network package); Pods use the host's network")
        return None
    from network.helper_client import NetworkHelper

    return NetworkHelper(
        state_dir / "network", bridge=settings.bridge or default_bridge(node_name), masquerade=settings.masquerade
    )


class NodePodNetwork:
    """The Pod network helper (PodNetworks in a child process) behind a gate: setup() waits until
    the bridge exists with the node's pod CIDR."""

    def __init__(self, networks: Any, kube: Kube, node_name: str, configured_cidr: str | None):
        self.networks = networks
        self.kube = kube
        self.node_name = node_name
        self.configured_cidr = configured_cidr
        self.cidr: str | None = None
        self.ready = asyncio.Event()
        # Pods get their networks in arrival order, a few at a time: all at once, each would wait
        # for all the others (the kernel serialises netlink work) and none could start early.
        self._setup_slots = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def run(self) -> None:
        """Find the CIDR and start the bridge. A failure (an address conflict, say) is logged once and
        retried: Pods needing a network wait in ContainerCreating meanwhile, the others run."""
        self.cidr = self.configured_cidr or await self._node_cidr()
        said = ""
        while True:
            try:
                await self.networks.start(self.cidr)
                break
            except Exception as exc:  # PodNetworkError, NetlinkError, OSError: all retried alike
                if str(exc) != said:
                    said = str(exc)
                    log.error("pod network not started; retrying every 10s: " + said, extra=kv(cidr=self.cidr))
                await asyncio.sleep(START_RETRY)
        log.info("pod network ready", extra=kv(cidr=self.cidr, bridge=self.networks.bridge))
        self.ready.set()

    async def _node_cidr(self) -> str:
        waited, noticed = 0.0, False
        while True:
            try:
                from network.ipam import pod_cidr_from_node

                cidr = pod_cidr_from_node(await self.kube.get(f"/api/v1/nodes/{self.node_name}"))
                if cidr:
                    return cidr
            except ApiError as exc:
                if not exc.not_found:
                    log.debug("reading the node's podCIDR", extra=kv(error=exc.describe()))
            if waited >= CIDR_NOTICE_AFTER and not noticed:
                noticed = True
                log.warning(
                    "no spec.podCIDR on the node yet; Pods wait for it. Set [network] pod_cidr in the config "
                    "if the controller-manager does not allocate node CIDRs",
                    extra=kv(node=self.node_name),
                )
            await asyncio.sleep(CIDR_POLL)
            waited += CIDR_POLL

    async def setup(self, pod_uid: str, namespace: str, name: str) -> Any:
        await self.ready.wait()
        async with self._setup_slots:
            return await self.networks.setup(pod_uid, namespace, name)

    async def teardown(self, pod_uid: str) -> None:
        if not self.ready.is_set():
            # Not started yet, so this run set up nothing for the Pod; what an earlier run left is
            # removed by the orphan cleanup once the network starts.
            return
        await self.networks.teardown(pod_uid)

    async def cleanup_orphans(self, keep: set[str]) -> list[str]:
        """Tear down the networks of Pods not in `keep` (see PodNetworks.cleanup_orphans)."""
        return await self.networks.cleanup_orphans(keep)

    async def stop(self) -> None:
        await self.networks.stop()


async def remove_node_network(state_dir: Path, node_name: str, bridge: str | None = None) -> list[str]:
    """Remove what a decommissioned node left: its Pods' namespaces, veths and addresses, the
    bridge and its iptables rules (they outlive the agent by design, like its containers). Returns
    one line per thing removed. `kubelet-emu reset`, tests and benchmarks call it."""
    if importlib.util.find_spec("pyroute2") is None:
        return []
    from network.pods import reset_node_network

    return await reset_node_network(state_dir / "network", bridge or default_bridge(node_name))
