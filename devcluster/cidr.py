"""A cluster CIDR that nothing on this host routes yet, for a dev cluster that shares the host with
others (test sessions, another demo): the controller-manager gives each node a /24 of it, and an
agent cannot start its Pod network on a /24 another bridge already routes."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable, Iterator

DEFAULT = "10.244.0.0/16"


def parse_proc_net_route(text: str) -> list[tuple[str, ipaddress.IPv4Network]]:
    """(interface, destination) of each route in /proc/net/route (the main IPv4 table; addresses
    in host byte order as hex); the default route is left out (it overlaps everything and
    conflicts with nothing)."""
    networks = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            dest = socket.inet_ntoa(struct.pack("=I", int(fields[1], 16)))
            mask = socket.inet_ntoa(struct.pack("=I", int(fields[7], 16)))
            network = ipaddress.IPv4Network(f"{dest}/{mask}", strict=False)
        except ValueError:
            continue
        if network.prefixlen > 0:
            networks.append((fields[0], network))
    return networks


def host_routes(path: str = "/proc/net/route") -> list[tuple[str, ipaddress.IPv4Network]]:
    try:
        with open(path) as f:
            return parse_proc_net_route(f.read())
    except OSError:
        return []


def candidates() -> Iterator[str]:
    """10.244.0.0/16 (the usual one) first, then 10.1-10.99 (test sessions pick from 10.100-250)."""
    yield DEFAULT
    for second in range(1, 100):
        yield f"10.{second}.0.0/16"


def pick_cluster_cidr(routes: Iterable[ipaddress.IPv4Network | str], options: Iterable[str] | None = None) -> str:
    """The first candidate that overlaps none of `routes`."""
    taken = [ipaddress.ip_network(r, strict=False) for r in routes]
    for cidr in options if options is not None else candidates():
        network = ipaddress.ip_network(cidr)
        if not any(network.overlaps(route) for route in taken if route.version == network.version):
            return cidr
    raise ValueError("no free cluster CIDR: every 10.X.0.0/16 candidate overlaps a route of this host")
