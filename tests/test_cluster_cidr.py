"""The demo's cluster CIDR: one this host routes nowhere, remembered in the demo's directory."""

from __future__ import annotations

import ipaddress

import pytest

from agent.demo import CIDR_FILE, NODE, choose_cluster_cidr
from agent.pod_network import default_bridge
from devcluster.cidr import DEFAULT, parse_proc_net_route, pick_cluster_cidr

# /proc/net/route of a host with another cluster's bridge on 10.244.0.0/24 and a LAN on 10.1.0.0/16.
PROC_NET_ROUTE = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
emu-1a2b3c4d\t0000F40A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth1\t0000010A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
"""


def net(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


def test_routes_are_read_from_proc_net_route_without_the_default_route():
    assert parse_proc_net_route(PROC_NET_ROUTE) == [
        ("eth0", net("192.0.2.0/24")),
        ("emu-1a2b3c4d", net("10.244.0.0/24")),
        ("eth1", net("10.1.0.0/16")),
    ]


def test_the_picker_skips_every_routed_range():
    routes = [n for _, n in parse_proc_net_route(PROC_NET_ROUTE)]
    assert pick_cluster_cidr([]) == DEFAULT
    assert pick_cluster_cidr([net("192.0.2.0/24")]) == DEFAULT
    assert pick_cluster_cidr(routes) == "10.2.0.0/16"  # 10.244 (a bridge's /24) and 10.1 (a LAN) are taken
    assert pick_cluster_cidr(["10.0.0.0/8"], ["10.244.0.0/16", "172.31.0.0/16"]) == "172.31.0.0/16"
    with pytest.raises(ValueError, match="no free cluster CIDR"):
        pick_cluster_cidr(["10.0.0.0/8"])


def test_the_demo_remembers_its_cidr_and_moves_only_when_another_interface_routes_it(tmp_path):
    routes = parse_proc_net_route(PROC_NET_ROUTE)
    assert choose_cluster_cidr(tmp_path, running=False, routes=routes) == ("10.2.0.0/16", False)
    assert choose_cluster_cidr(tmp_path, running=False, routes=[]) == (DEFAULT, False)
    (tmp_path / CIDR_FILE).write_text("10.7.0.0/16\n")
    assert choose_cluster_cidr(tmp_path, running=False, routes=routes) == ("10.7.0.0/16", False)
    # Routed through the demo node's own bridge (an agent stopped without reset): still ours.
    own = [(default_bridge(NODE), net("10.7.3.0/24"))]
    assert choose_cluster_cidr(tmp_path, running=False, routes=own) == ("10.7.0.0/16", False)
    # Another cluster's bridge took it meanwhile: a free one, and the caller hears it changed.
    other = [("emu-99999999", net("10.7.3.0/24"))]
    assert choose_cluster_cidr(tmp_path, running=False, routes=other) == (DEFAULT, True)
    # A running cluster keeps what it was started with, whatever the routes say.
    assert choose_cluster_cidr(tmp_path, running=True, routes=other) == ("10.7.0.0/16", False)
    (tmp_path / CIDR_FILE).unlink()
    assert choose_cluster_cidr(tmp_path, running=True, routes=routes) == (DEFAULT, False)
