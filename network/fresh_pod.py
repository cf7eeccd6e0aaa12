"""A new Pod's network, made in one thread with seven hand-built rtnetlink requests.

This is the hot path of a mass start. Through pyroute2 the same requests cost ~3 ms of CPU per
Pod in message building, argument processing and parsing, about as much as the kernel's own
work; built with struct they cost microseconds. Only this fixed sequence for a namespace made
just now is done by hand; repairs, dumps and the bridge stay with pyroute2 (network/pods.py).

The thread: opens a netlink socket in the host namespace, unshare()s a new network namespace,
bind-mounts it at its path, opens a second socket there, returns to the host namespace, then
creates the veth pair (host end on the bridge, `eth0` in the Pod), and configures the Pod side.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import socket
import struct
import threading

from network.netns import CLONE_NEWNET, MS_BIND, NetnsError, _check, _ensure_shared_run_dir, _libc

# rtnetlink constants (linux/rtnetlink.h, linux/if_link.h, linux/veth.h)
RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_NEWROUTE = 16, 18, 20, 24
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_REPLACE = 0x1, 0x4, 0x200, 0x400, 0x100
IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO, IFLA_IFALIAS, IFLA_NET_NS_FD = 3, 10, 18, 20, 28
IFLA_NUM_TX_QUEUES, IFLA_NUM_RX_QUEUES = 31, 32
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_OIF, RTA_GATEWAY = 4, 5
IFF_UP = 0x1
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 3, 0, 1
LOOPBACK_IFINDEX = 1

NLMSGHDR = struct.Struct("=IHHII")
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst len, src len, tos, table, protocol, scope, type, flags


class FreshPodError(OSError):
    """A step failed; the message names it and the interface."""


def _attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)


def _name(value: str) -> bytes:
    return value.encode() + b"\0"


class _Rtnl:
    """A blocking NETLINK_ROUTE socket in the namespace it was opened in."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def request(self, kind: int, flags: int, body: bytes, what: str) -> bytes:
        """Send one request; returns the first answer that is not an acknowledgement (b"" for an ack)."""
        self.seq += 1
        self.sock.send(NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | flags, self.seq, 0) + body)
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset + NLMSGHDR.size <= len(data):
                length, msg_type, _, seq, _ = NLMSGHDR.unpack_from(data, offset)
                if seq == self.seq:
                    if msg_type != NLMSG_ERROR:
                        return data[offset + NLMSGHDR.size : offset + length]
                    (code,) = struct.unpack_from("=i", data, offset + NLMSGHDR.size)
                    if code == 0:
                        return b""
                    raise FreshPodError(-code, f"{what}: {os.strerror(-code)}")
                offset += max(length, NLMSGHDR.size) + (-length % 4)


# One queue each way, asked for at creation. Otherwise the kernel makes one per CPU and then cuts
# them to one, waiting for an RCU grace period while it holds the rtnl lock: under load that wait
# (tens of ms) stalled every other Pod's netlink request and namespace creation behind it.
ONE_QUEUE = _attr(IFLA_NUM_TX_QUEUES, struct.pack("=I", 1)) + _attr(IFLA_NUM_RX_QUEUES, struct.pack("=I", 1))


def _create_veth(host: _Rtnl, veth: str, peer_netns_fd: int, bridge_index: int) -> None:
    peer = IFINFOMSG.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _name("eth0")) + ONE_QUEUE
    peer += _attr(IFLA_NET_NS_FD, struct.pack("=I", peer_netns_fd))
    linkinfo = _attr(IFLA_INFO_KIND, _name("veth")) + _attr(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer))
    body = (
        IFINFOMSG.pack(0, 0, 0, 0, 0)
        + _attr(IFLA_IFNAME, _name(veth))
        + _attr(IFLA_MASTER, struct.pack("=I", bridge_index))
        + ONE_QUEUE
        + _attr(IFLA_LINKINFO, linkinfo)
    )
    host.request(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body, f"create veth {veth}")


def _set_up(rtnl: _Rtnl, index: int, ifname: str = "", alias: str = "") -> None:
    body = IFINFOMSG.pack(0, 0, index, IFF_UP, IFF_UP)
    if ifname:
        body += _attr(IFLA_IFNAME, _name(ifname))
    if alias:
        body += _attr(IFLA_IFALIAS, alias.encode())
    rtnl.request(RTM_NEWLINK, NLM_F_ACK, body, f"set {ifname or f'interface {index}'} up")


def _link_index(rtnl: _Rtnl, ifname: str) -> int:
    body = IFINFOMSG.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _name(ifname))
    answer = rtnl.request(RTM_GETLINK, 0, body, f"find {ifname}")
    return IFINFOMSG.unpack_from(answer)[2]


def configure_pod_side(pod: _Rtnl, ip: str, prefix_len: int, gateway: str) -> None:
    """lo up; eth0 with the Pod's address, up; the default route through the gateway."""
    _set_up(pod, LOOPBACK_IFINDEX)
    eth0 = _link_index(pod, "eth0")
    address = ipaddress.IPv4Address(ip).packed
    body = IFADDRMSG.pack(socket.AF_INET, prefix_len, 0, RT_SCOPE_UNIVERSE, eth0)
    body += _attr(IFA_LOCAL, address) + _attr(IFA_ADDRESS, address)
    pod.request(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body, f"add {ip}/{prefix_len} to eth0")
    _set_up(pod, eth0)
    body = RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
    body += _attr(RTA_GATEWAY, ipaddress.IPv4Address(gateway).packed) + _attr(RTA_OIF, struct.pack("=I", eth0))
    pod.request(RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body, f"default route via {gateway}")


def _disable_ipv6(sysctl_dir: str) -> None:
    # /proc/sys/net shows the namespace of the thread that opens it; no file: a kernel without IPv6.
    with contextlib.suppress(FileNotFoundError), open(f"/proc/sys/net/ipv6/conf/{sysctl_dir}/disable_ipv6", "w") as f:
        f.write("1")


def setup_fresh_pod_sync(
    path: str, veth: str, bridge_index: int, alias: str, ip: str, prefix_len: int, gateway: str
) -> None:
    """Make the namespace at `path` and the Pod's network in it; the caller removes what is left
    when this fails. Runs on a pooled thread: the thread enters the new namespace only to make
    it and returns to its own before anything else (a thread that cannot return ends the
    process rather than serve later work in the wrong namespace)."""
    host = _Rtnl()
    host_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    pod: _Rtnl | None = None
    pod_ns = -1
    try:
        _ensure_shared_run_dir()
        if os.path.exists(path):
            os.unlink(path)  # an empty mount point left by a crash between creating and mounting it
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
        _check(_libc.unshare(CLONE_NEWNET), f"unshare a network namespace for {path}")
        try:
            _disable_ipv6("default")  # eth0 will be made here: no IPv6 on it; lo keeps ::1
            source = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
            _check(_libc.mount(source, path.encode(), b"none", MS_BIND, None), f"bind-mount the namespace to {path}")
            pod = _Rtnl()
            pod_ns = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        finally:
            _return_home(host_ns)
        _create_veth(host, veth, pod_ns, bridge_index)
        _disable_ipv6(veth)  # before it is up: the bridge port never starts IPv6 autoconfiguration
        _set_up(host, 0, ifname=veth, alias=alias)
        configure_pod_side(pod, ip, prefix_len, gateway)
    except NetnsError as e:
        raise FreshPodError(e.errno or errno.EIO, str(e)) from e
    finally:
        host.close()
        if pod is not None:
            pod.close()
        os.close(host_ns)
        if pod_ns >= 0:
            os.close(pod_ns)


def _return_home(host_ns: int) -> None:
    if _libc.setns(host_ns, CLONE_NEWNET) != 0:
        err = os.strerror(ctypes.get_errno())
        os.write(2, f"network helper: a thread cannot return to the host network namespace ({err}); exiting\n".encode())
        os._exit(70)
