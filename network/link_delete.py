"""Delete a network interface by name from a worker thread.

The kernel deletes an interface inside the sending syscall and, for a veth, waits there for RCU
grace periods (20-40 ms). Through an asyncio netlink socket that wait would stall its event loop;
here it stalls only the calling thread, and several deletions wait side by side. pyroute2 builds
the message; the socket is a plain blocking one, used once.
"""

from __future__ import annotations

import errno
import socket
import struct

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_DELLINK
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id


def delete_link_blocking(ifname: str) -> bool:
    """Delete `ifname` in the calling thread's network namespace; False when there is none."""
    msg = ifinfmsg()
    msg["header"]["type"] = RTM_DELLINK
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg["header"]["sequence_number"] = 1
    msg["attrs"] = [("IFLA_IFNAME", ifname)]
    msg.encode()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as sock:
        sock.send(msg.data)
        while True:
            reply = sock.recv(65536)
            _, kind, _, sequence, _ = NLMSGHDR.unpack_from(reply)
            if kind != NLMSG_ERROR or sequence != 1:
                continue  # not our acknowledgement
            (code,) = struct.unpack_from("=i", reply, NLMSGHDR.size)
            if code == 0:
                return True
            if -code == errno.ENODEV:
                return False
            raise NetlinkError(-code, f"delete interface {ifname}: {errno.errorcode.get(-code, -code)}")
