"""Facts about this host that the Node object advertises."""

from __future__ import annotations

import ipaddress
import os
import platform
import shutil
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

# Kubernetes names architectures the Go way.
_GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    cpus: int
    memory_bytes: int
    ephemeral_storage_bytes: int
    kernel: str
    os_image: str
    arch: str
    machine_id: str
    boot_id: str
    system_uuid: str
    swap_bytes: int = 0  # SwapTotal: reported as status.nodeInfo.swap.capacity


def _read(path: str, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def _os_image() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return "Linux"


def _meminfo_bytes(key: str) -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    return 0


def _memory_bytes() -> int:
    return _meminfo_bytes("MemTotal")


def go_arch(machine: str) -> str:
    return _GO_ARCH.get(machine, machine)


def read_host_info(state_dir: str) -> HostInfo:
    try:
        cpus = len(os.sched_getaffinity(0))
    except OSError:
        cpus = os.cpu_count() or 1
    try:
        storage = shutil.disk_usage(state_dir).total
    except OSError:
        storage = 0
    return HostInfo(
        hostname=socket.gethostname().lower(),
        cpus=cpus,
        memory_bytes=_memory_bytes(),
        ephemeral_storage_bytes=storage,
        kernel=platform.release(),
        os_image=_os_image(),
        arch=go_arch(platform.machine()),
        machine_id=_read("/etc/machine-id"),
        boot_id=_read("/proc/sys/kernel/random/boot_id"),
        system_uuid=_read("/sys/class/dmi/id/product_uuid"),
        swap_bytes=_meminfo_bytes("SwapTotal"),
    )


def address_toward(server_url: str) -> str:
    """The local IP the API server can reach us at: the source address of a route to it. With the
    API server on this host that is loopback, which it refuses to proxy to (`kubectl get --raw
    .../nodes/N/proxy/...`, metrics-server), so the host's outgoing address is preferred then."""
    parts = urlsplit(server_url)
    address = _route_source(parts.hostname or "127.0.0.1", parts.port or 443) or "127.0.0.1"
    if ipaddress.ip_address(address).is_loopback:
        # A documentation address: only the route is looked up, nothing is sent.
        outgoing = _route_source("192.0.2.123", 9)
        if outgoing and not ipaddress.ip_address(outgoing).is_loopback:
            return outgoing
    return address


def _route_source(host: str, port: int) -> str | None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)  # UDP connect sends nothing; it only picks a route
            return s.getsockname()[0]
    except OSError:
        return None
