"""The [network] table: the Pod network (bridge, pod CIDR, masquerade)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from agent.config.tables import _q, _Table

_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


_NETWORK_KEYS = {"enabled", "pod_cidr", "bridge", "masquerade"}


@dataclass(frozen=True)
class NetworkSettings:
    """Pod networking: a bridge on the node, a namespace, veth and IP per Pod."""

    enabled: bool = True
    pod_cidr: str | None = None  # None: the Node's spec.podCIDR, allocated by the controller-manager
    bridge: str | None = None  # None: "emu-" + a hash of the node name (several agents may share a host)
    masquerade: bool = False  # SNAT traffic leaving the node from Pod IPs


def _parse_network(t: _Table, warnings: list[str]) -> NetworkSettings:
    t.warn_unknown(_NETWORK_KEYS, warnings)
    cidr = t.str_("pod_cidr")
    if cidr is not None:
        try:
            net = ipaddress.ip_network(cidr, strict=True)
        except ValueError:
            raise t.error(f'pod_cidr {_q(cidr)} is not a network such as "10.244.0.0/24"') from None
        if net.version != 4 or net.num_addresses < 4:
            raise t.error(f"pod_cidr {_q(cidr)} must be an IPv4 network with room for Pods (at most /30)")
    bridge = t.str_("bridge")
    if bridge is not None and not _IFNAME.fullmatch(bridge):
        raise t.error(f"bridge {_q(bridge)} is not an interface name (1-15 letters, digits, '-', '_', '.')")
    return NetworkSettings(
        enabled=t.bool_("enabled", True), pod_cidr=cidr, bridge=bridge, masquerade=t.bool_("masquerade", False)
    )
