"""What a Pod's network is, apart from the code that makes it (no netlink imports here)."""

from __future__ import annotations

from dataclasses import dataclass


class PodNetworkError(Exception):
    pass


@dataclass(frozen=True)
class PodNet:
    ip: str
    netns_path: str
    gateway: str
    prefix_len: int
    host_veth: str = ""
