"""PodNetworks: a bridge per agent, and per Pod a network namespace, a veth pair and an address.

    host:  <bridge> (gateway = first host address of the pod CIDR)
              |-- ve<hash of netns name>  ==veth==  eth0 in /run/netns/<prefix><pod uid>

Every step of setup() is idempotent, so calling it again (after an agent restart too) checks
and repairs the Pod's network instead of failing. Order matters for crash safety: the address
is allocated before anything is created and released after everything is removed, so the IPAM
state file lists every Pod that may have something left on the host; cleanup_orphans() works
from it. Pods (namespaces, veths, addresses) and the bridge outlive the agent, like containers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from network import fresh_pod, iptables
from network.ipam import IPAM
from network.link_delete import delete_link_blocking
from network.netns import is_netns, list_netns, netlink_socket_in, netns_path, remove_netns
from network.podnet import PodNet, PodNetworkError

log = logging.getLogger(__name__)

IFNAMSIZ = 15  # longest interface name Linux accepts
IFALIAS_MAX = 255
POD_IFNAME = "eth0"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def host_veth_name(netns_name: str) -> str:
    """The host end of a Pod's veth pair: 15 characters, unique per namespace name (so per agent
    prefix and Pod UID); a Pod UID is too long to use as it is."""
    return "ve" + hashlib.sha256(netns_name.encode()).hexdigest()[: IFNAMSIZ - 2]


def bridge_mac(bridge: str) -> str:
    """A fixed, locally administered MAC for the bridge. Without one, a Linux bridge takes the
    lowest MAC of its ports, so it changes as Pods come and go and Pods' ARP entries for the
    gateway go stale."""
    digest = hashlib.sha256(f"kubelet-emu bridge {bridge}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


async def _listed(result: Any) -> list[Any]:
    """pyroute2 answers with a list or an async generator depending on the request."""
    if isinstance(result, list | tuple):
        return list(result)
    return [msg async for msg in result]


@asynccontextmanager
async def _host_netlink() -> AsyncIterator[AsyncIPRoute]:
    ipr = AsyncIPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


@asynccontextmanager
async def _pod_netlink(path: str) -> AsyncIterator[AsyncIPRoute]:
    ipr = AsyncIPRoute(fileno=await netlink_socket_in(path))
    try:
        yield ipr
    finally:
        ipr.close()


async def _link_index(ipr: AsyncIPRoute, ifname: str) -> int | None:
    found = await ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


async def _delete_link(ipr: AsyncIPRoute, ifname: str) -> bool:
    try:
        await ipr.link("del", ifname=ifname)
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return False
        raise
    return True


async def _ensure_address(ipr: AsyncIPRoute, index: int, address: str, prefix_len: int) -> None:
    try:
        await ipr.addr("add", index=index, address=address, prefixlen=prefix_len)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise


@dataclass
class _PodLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class PodNetworks:
    """Pod networking for one agent. Several agents on one host need different bridges, netns
    prefixes, state directories and pod CIDRs."""

    def __init__(
        self, state_dir: Path, bridge: str = "emu0", masquerade: bool = False, netns_prefix: str = "emu-"
    ) -> None:
        if not 0 < len(bridge) <= IFNAMSIZ or "/" in bridge or " " in bridge:
            raise PodNetworkError(f"bridge name {bridge!r} is not a valid interface name (1-{IFNAMSIZ} characters)")
        if not netns_prefix or "/" in netns_prefix:
            raise PodNetworkError(f"netns prefix {netns_prefix!r} must be non-empty and contain no '/'")
        self.state_dir = Path(state_dir)
        self.bridge = bridge
        self.masquerade = masquerade
        self.netns_prefix = netns_prefix
        self._ipam: IPAM | None = None
        self._locks: dict[str, _PodLock] = {}
        self._host: AsyncIPRoute | None = None
        self._host_loop: asyncio.AbstractEventLoop | None = None

    # --- node level -------------------------------------------------------------------------

    @property
    def ipam(self) -> IPAM:
        if self._ipam is None:
            raise PodNetworkError("Pod networking is not started: call PodNetworks.start(pod_cidr) first")
        return self._ipam

    @property
    def pod_cidr(self) -> str:
        return self.ipam.cidr

    @property
    def gateway(self) -> str:
        return self.ipam.gateway

    @property
    def prefix_len(self) -> int:
        return self.ipam.prefix_len

    async def start(self, pod_cidr: str) -> None:
        """Create (or adopt) the bridge with the gateway address, enable IP forwarding, let traffic
        in and out of the bridge through the FORWARD chain, and add or remove the MASQUERADE rule
        as configured."""
        ipam = IPAM(self.state_dir / "ipam.json", pod_cidr)
        await ipam.owners()  # fails now, not at the first Pod, when the state file disagrees
        await self._ensure_bridge(ipam.gateway, ipam.prefix_len, ipam.cidr)
        await asyncio.to_thread(self._enable_forwarding)
        await self._ensure_iptables(ipam.cidr)
        self._ipam = ipam

    async def _ensure_iptables(self, cidr: str) -> None:
        masquerade = iptables.masquerade_rule(cidr, self.bridge)
        if iptables.iptables_binary() is None:
            if self.masquerade:
                await iptables.ensure_rule(masquerade)  # fails, saying what to install
            log.warning(
                "no iptables here: FORWARD rules for bridge %s skipped; a DROP policy would cut Pods off", self.bridge
            )
            return
        for rule in iptables.forward_rules(self.bridge):
            await iptables.ensure_rule(rule, first=True)
        if self.masquerade:
            await iptables.ensure_rule(masquerade)
        else:
            await iptables.remove_rule(masquerade)  # left by an earlier run with masquerade on

    async def stop(self, remove_bridge: bool = False) -> None:
        """Remove the MASQUERADE rule. Pods keep their networks (they outlive the agent, and so do
        the bridge and its FORWARD rules) unless `remove_bridge`."""
        if self._ipam is None:
            return
        if self.masquerade:
            await iptables.remove_rule(iptables.masquerade_rule(self._ipam.cidr, self.bridge))
        if remove_bridge:
            async with _host_netlink() as ipr:
                await _delete_link(ipr, self.bridge)
            if iptables.iptables_binary() is not None:
                for rule in iptables.forward_rules(self.bridge):
                    await iptables.remove_rule(rule)
        if self._host is not None:
            self._host.close()
            self._host = self._host_loop = None

    async def _ensure_bridge(self, gateway: str, prefix_len: int, cidr: str) -> None:
        async with _host_netlink() as ipr:
            index = await _link_index(ipr, self.bridge)
            await self._refuse_overlapping_route(ipr, index, cidr)
            if index is None:
                try:
                    await ipr.link("add", ifname=self.bridge, kind="bridge", address=bridge_mac(self.bridge))
                except NetlinkError as e:
                    if e.code != errno.EEXIST:  # EEXIST: another task made it meanwhile
                        raise PodNetworkError(f"cannot create bridge {self.bridge}: {e}") from e
                index = await _link_index(ipr, self.bridge)
            if index is None:
                raise PodNetworkError(f"bridge {self.bridge} vanished while it was being set up")
            link = (await _listed(await ipr.link("get", index=index)))[0]
            kind = link.get(("linkinfo", "kind"))
            if kind != "bridge":
                raise PodNetworkError(
                    f"interface {self.bridge} exists but is a {kind or 'plain'} interface, not a bridge; "
                    "remove it or configure another bridge name"
                )
            await _ensure_address(ipr, index, gateway, prefix_len)
            await ipr.link("set", index=index, state="up")

    async def _refuse_overlapping_route(self, ipr: AsyncIPRoute, bridge_index: int | None, cidr: str) -> None:
        """Another interface already routing this CIDR (another agent's bridge, say) would take
        some of our Pods' traffic."""
        network, prefix = cidr.split("/")
        for route in await _listed(await ipr.get_routes(family=socket.AF_INET, table=254)):
            if route.get("dst") == network and route["dst_len"] == int(prefix) and route.get("oif") != bridge_index:
                oif = route.get("oif")
                name = (await _listed(await ipr.link("get", index=oif)))[0].get("ifname") if oif else "(multipath)"
                raise PodNetworkError(
                    f"pod CIDR {cidr} is already routed through interface {name}; give bridge {self.bridge} "
                    "its own pod CIDR (or remove the other interface's address)"
                )

    @staticmethod
    def _enable_forwarding() -> None:
        if IP_FORWARD.read_text().strip() != "1":
            IP_FORWARD.write_text("1\n")

    # --- per Pod ----------------------------------------------------------------------------

    def netns_name(self, pod_uid: str) -> str:
        return f"{self.netns_prefix}{pod_uid}"

    def netns_path(self, pod_uid: str) -> str:
        return netns_path(self.netns_name(pod_uid))

    def host_veth(self, pod_uid: str) -> str:
        return host_veth_name(self.netns_name(pod_uid))

    @asynccontextmanager
    async def _pod_lock(self, pod_uid: str) -> AsyncIterator[None]:
        """Serialises setup and teardown of one Pod; the lock is dropped when nobody uses it."""
        entry = self._locks.setdefault(pod_uid, _PodLock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[pod_uid]

    async def setup(self, pod_uid: str, namespace: str, name: str) -> PodNet:
        """Give the Pod its namespace, veth and address; returns what it has when it has them."""
        if not pod_uid or "/" in pod_uid:
            raise PodNetworkError(f"pod {namespace}/{name}: invalid pod UID {pod_uid!r}")
        ipam = self.ipam
        path = self.netns_path(pod_uid)
        async with self._pod_lock(pod_uid):
            existed = is_netns(path)
            try:
                ip, held = await ipam.claim(pod_uid)
                existed = existed or held
                veth = self.host_veth(pod_uid)
                alias = f"kubelet-emu pod uid {pod_uid} {namespace}/{name}"[:IFALIAS_MAX]  # whose it is, in `ip link`
                repair = is_netns(path) or await self._setup_fresh(path, veth, alias, ip)
                if repair:  # an existing namespace (a restart, a retry): check and repair each piece
                    async with _pod_netlink(path) as pod:
                        await self._ensure_veth(pod, veth, path, alias)
                        await self._configure_pod_side(pod, path, ip, ipam.gateway, ipam.prefix_len)
            except BaseException as e:
                if not existed:  # roll back what this call made; an existing Pod is left for teardown()
                    await self._roll_back(pod_uid, namespace, name)
                if isinstance(e, Exception) and not isinstance(e, PodNetworkError):
                    raise PodNetworkError(f"network setup for pod {namespace}/{name} ({pod_uid}) failed: {e}") from e
                raise
            return PodNet(ip=ip, netns_path=path, gateway=ipam.gateway, prefix_len=ipam.prefix_len, host_veth=veth)

    async def _roll_back(self, pod_uid: str, namespace: str, name: str) -> None:
        try:
            await asyncio.shield(self._teardown_locked(pod_uid))
        except Exception:  # the setup error matters more; teardown() can finish the job later
            log.exception("rolling back the network of pod %s/%s (%s) failed", namespace, name, pod_uid)

    async def _setup_fresh(self, path: str, veth: str, alias: str, ip: str) -> bool:
        """A new namespace with everything in it, on the fast path (network/fresh_pod.py). True when
        a stale host end of the veth was in the way: the caller repairs the namespace then."""
        ipam, bridge_index = self.ipam, await self._bridge_index()
        try:
            await asyncio.to_thread(
                fresh_pod.setup_fresh_pod_sync, path, veth, bridge_index, alias, ip, ipam.prefix_len, ipam.gateway
            )
        except fresh_pod.FreshPodError as e:
            if e.errno == errno.EEXIST and is_netns(path):
                return True  # a host end left by a namespace deleted by hand; the namespace is made
            raise
        return False

    def _host_socket(self) -> AsyncIPRoute:
        """One netlink socket to the host namespace, kept: opening one costs more than a request."""
        loop = asyncio.get_running_loop()
        if self._host is None or self._host_loop is not loop:
            self._host, self._host_loop = AsyncIPRoute(), loop
        return self._host

    async def _bridge_index(self) -> int:
        """The bridge's index, from sysfs (a file read, no netlink); the bridge is made again if
        someone deleted it."""
        index_file = Path(f"/sys/class/net/{self.bridge}/ifindex")
        try:
            return int(index_file.read_text())
        except FileNotFoundError:
            pass
        log.warning("bridge %s is gone; recreating it", self.bridge)  # other Pods re-attach on their next setup
        await self._ensure_bridge(self.ipam.gateway, self.ipam.prefix_len, self.ipam.cidr)
        try:
            return int(index_file.read_text())
        except FileNotFoundError:
            raise PodNetworkError(f"bridge {self.bridge} is gone and could not be recreated") from None

    async def _ensure_veth(self, pod: AsyncIPRoute, veth: str, path: str, alias: str) -> None:
        host = self._host_socket()
        bridge_index = await self._bridge_index()
        host_index = await _link_index(host, veth)
        pod_index = await _link_index(pod, POD_IFNAME)
        if host_index is None or pod_index is None:
            # Half a pair (or none): start over with a fresh pair.
            if host_index is not None:
                await _delete_link(host, veth)
            if pod_index is not None:
                await _delete_link(pod, POD_IFNAME)
            await self._add_veth(host, veth, path, bridge_index)
        await host.link("set", ifname=veth, master=bridge_index, state="up", ifalias=alias)

    async def _add_veth(self, host: AsyncIPRoute, veth: str, path: str, bridge_index: int) -> None:
        """The pair, with the host end on the bridge (up once its IPv6 is off)."""
        ns_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            one_queue = {"num_tx_queues": 1, "num_rx_queues": 1}  # as network/fresh_pod.py, which says why
            peer = {"ifname": POD_IFNAME, "net_ns_fd": ns_fd, **one_queue}
            await host.link("add", ifname=veth, kind="veth", master=bridge_index, peer=peer, **one_queue)
        finally:
            os.close(ns_fd)
        # A bridge port needs no IPv6 of its own; off before it is up, so the kernel never starts
        # address autoconfiguration on it (per Pod work that slows down mass starts).
        with contextlib.suppress(FileNotFoundError):
            Path(f"/proc/sys/net/ipv6/conf/{veth}/disable_ipv6").write_text("1")

    @staticmethod
    async def _configure_pod_side(pod: AsyncIPRoute, path: str, ip: str, gateway: str, prefix_len: int) -> None:
        lo = await _link_index(pod, "lo")
        eth0 = await _link_index(pod, POD_IFNAME)
        if lo is None or eth0 is None:
            raise PodNetworkError(f"namespace {path} lacks lo or {POD_IFNAME}")
        await pod.link("set", index=lo, state="up")
        # Any other IPv4 address (a stale one from a lost state file, or added by hand) goes.
        for addr in await _listed(await pod.addr("dump", index=eth0, family=socket.AF_INET)):
            if (addr.get("address"), addr["prefixlen"]) != (ip, prefix_len):
                await pod.addr("del", index=eth0, address=addr.get("address"), prefixlen=addr["prefixlen"])
        await _ensure_address(pod, eth0, ip, prefix_len)
        await pod.link("set", index=eth0, state="up")
        await pod.route("replace", dst="0.0.0.0/0", gateway=gateway, oif=eth0)

    async def get(self, pod_uid: str) -> PodNet | None:
        """What setup() gave the Pod, when it has an address and a namespace (no changes made)."""
        ip = await self.ipam.address_of(pod_uid)
        path = self.netns_path(pod_uid)
        if ip is None or not is_netns(path):
            return None
        ipam = self.ipam
        return PodNet(ip, path, ipam.gateway, ipam.prefix_len, self.host_veth(pod_uid))

    async def teardown(self, pod_uid: str) -> None:
        """Remove the Pod's veth and namespace and free its address; fine when there is nothing."""
        async with self._pod_lock(pod_uid):
            await self._teardown_locked(pod_uid)

    async def _teardown_locked(self, pod_uid: str) -> None:
        # Deleting one end of a veth pair deletes both. Off this loop: the kernel takes tens of ms.
        await asyncio.to_thread(delete_link_blocking, self.host_veth(pod_uid))
        await remove_netns(self.netns_path(pod_uid))
        await self.ipam.release(pod_uid)

    async def pods(self) -> dict[str, str]:
        """Pod UID -> address, for every Pod with an address."""
        return await self.ipam.owners()

    async def cleanup_orphans(self, keep: set[str]) -> list[str]:
        """Tear down the networks of Pods not in `keep` (the Pods this node still runs), and remove
        ports of our bridge that belong to no kept Pod. Returns the UIDs torn down."""
        owners = await self.ipam.owners()
        prefix = self.netns_prefix
        # A namespace of ours without an address happens only when the state file was lost; take
        # those too, but only when their veth is on our bridge (another agent may share the prefix).
        ours_by_port = set()
        async with _host_netlink() as host:
            bridge_index = await _link_index(host, self.bridge)
            ports = (
                [link.get("ifname") for link in await _listed(await host.link("dump", master=bridge_index))]
                if bridge_index is not None
                else []
            )
        for name in list_netns(prefix):
            uid = name[len(prefix) :]
            if host_veth_name(name) in ports:
                ours_by_port.add(uid)
        orphans = sorted((set(owners) | ours_by_port) - keep)
        await asyncio.gather(*(self.teardown(uid) for uid in orphans))
        kept_veths = {self.host_veth(uid) for uid in keep}
        async with _host_netlink() as host:
            for port in ports:
                if port.startswith("ve") and port not in kept_veths and await _delete_link(host, port):
                    log.info("removed stray veth %s from bridge %s", port, self.bridge)
        if orphans:
            log.info("removed the networks of %d Pods no longer on this node: %s", len(orphans), ", ".join(orphans))
        return orphans


async def reset_node_network(state_dir: Path, bridge: str, netns_prefix: str = "emu-") -> list[str]:
    """Remove everything of one node's Pod network from the host, without starting anything (no
    bridge is made, no route checked): each Pod's veth and namespace (those in the IPAM state file,
    and namespaces of ours whose veth is on the bridge), stray ports of the bridge, the bridge, and
    every iptables rule carrying the bridge's comment. Returns one line per thing removed, so a
    second call returns []. The IPAM state file is emptied, not deleted."""
    state_dir = Path(state_dir)
    removed: list[str] = []
    state_file = state_dir / "ipam.json"
    ipam = None
    owners: dict[str, str] = {}
    if state_file.exists():
        cidr = json.loads(state_file.read_text())["cidr"]
        ipam = IPAM(state_file, cidr)
        owners = await asyncio.to_thread(ipam.owners_sync)
    async with _host_netlink() as host:
        bridge_index = await _link_index(host, bridge)
        ports = (
            [link.get("ifname") for link in await _listed(await host.link("dump", master=bridge_index))]
            if bridge_index is not None
            else []
        )
    uids = set(owners)
    for name in list_netns(netns_prefix):
        if host_veth_name(name) in ports:
            uids.add(name[len(netns_prefix) :])
    for uid in sorted(uids):
        netns = f"{netns_prefix}{uid}"
        veth = host_veth_name(netns)
        if await asyncio.to_thread(delete_link_blocking, veth):
            removed.append(f"veth {veth} (pod {uid})")
        if await remove_netns(netns_path(netns)):
            removed.append(f"network namespace {netns}")
        if ipam is not None and uid in owners:
            await asyncio.to_thread(ipam.release_sync, uid)
            removed.append(f"address {owners[uid]} (pod {uid})")
    async with _host_netlink() as host:
        for port in ports:
            if port and port.startswith("ve") and await _delete_link(host, port):
                removed.append(f"veth {port} (on bridge {bridge})")
        if await _delete_link(host, bridge):
            removed.append(f"bridge {bridge}")
    for rule in await iptables.rules_of(bridge):
        if await iptables.remove_rule(rule):
            removed.append(f"iptables rule {rule}")
    return removed
